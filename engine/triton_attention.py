"""Triton kernels of the GPU attention path: paged decode, prefill over cached context, KV write.

The KV pool layout is the runner's: one tensor per layer, ``[slots, 2 (k, v), kv_heads, dim]``,
and token ``pos`` of a sequence lives in slot ``table[pos // block_size] * block_size +
pos % block_size``. Every kernel reads K/V through the block tables in place (no gather copy).

- :class:`TritonDecodeKernel`: one query token per sequence, the callable the runner puts into
  ``AttentionMetadata.decode_kernel``. One program per (sequence, KV head) attends all query heads
  of that KV head at once (GQA: K/V read once per group). Long contexts are split over several
  programs (flash-decoding) whose partial results a second kernel merges.
- :func:`prefill_attention`: varlen causal queries (:class:`PrefillBatch`) after ``ctx_start``
  cached tokens each; the step's own K/V are in the cache already (:func:`write_kv` runs first).
- :func:`write_kv`: store a step's K/V at its slots.

Softmax runs online in float32 (base 2, the scale folded in) and sliding windows keep the last
``window`` positions of each query, as ``engine.attention`` does. The ``reference_*`` functions are
plain torch loops with the same contracts, for the tests.

Triton decides when a kernel is defined whether it compiles for the GPU or runs in its CPU
interpreter (``TRITON_INTERPRET=1`` in the environment at import time of this module):
:data:`INTERPRETED` says which one this process got.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOG2E = 1.4426950408889634
# "No sliding window" is passed as a window longer than any context, so the kernels never branch.
_NO_WINDOW = 1 << 30


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _tile(requested: int, elem_size: int, block_d: int) -> int:
    # Rows of 512+ bytes (float32 heads of 128, half heads of 256) in 64-row tiles overflow the
    # shared memory of pre-Hopper GPUs: such rows get tiles of 32.
    return requested if elem_size * block_d < 512 else min(requested, 32)


@triton.jit
def _kv_write_kernel(K, V, KV, Slots, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_slot, stride_kv, stride_h, n_kv, D,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per token: all its KV heads. A negative slot (a padding row) writes nothing.
    t = tl.program_id(0)
    slot = tl.load(Slots + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < n_kv) & (offs_d[None, :] < D)
    mask = mask & ((tl.zeros([BLOCK_H, BLOCK_D], tl.int64) + slot) >= 0)
    dst = KV + slot * stride_slot + offs_h[:, None] * stride_h + offs_d[None, :]
    k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(dst, k.to(KV.dtype.element_ty), mask=mask)
    tl.store(dst + stride_kv, v.to(KV.dtype.element_ty), mask=mask)


@triton.jit
def _kv_tile(kv_base, table, pos, valid, offs_d, D, stride_slot, stride_kv,
             BLOCK_SIZE: tl.constexpr, UPCAST: tl.constexpr):
    """K and V of positions ``pos`` (``valid`` ones) of one sequence and KV head, through its block table."""
    blk = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0)
    slot = blk.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
    nd_mask = valid[:, None] & (offs_d[None, :] < D)
    ptr = kv_base + slot[:, None] * stride_slot + offs_d[None, :]
    k = tl.load(ptr, mask=nd_mask, other=0.0)
    v = tl.load(ptr + stride_kv, mask=nd_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc, IEEE: tl.constexpr):
    """One tile of online softmax: ``s`` are base-2 scores (-inf where not attended)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(Q, KV, Tables, Lens, Out, MidAcc, MidM, MidL,
                   stride_qb, stride_qh, stride_ob, stride_oh, stride_slot, stride_kv, stride_h,
                   stride_tb, scale_log2, window, partition, n_heads, D,
                   G: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
                   IEEE: tl.constexpr, UPCAST: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(Lens + b)
    lo = tl.maximum(ctx - window, 0)
    hi = ctx
    if SPLIT:  # this program's share of [lo, ctx): ``partition`` positions (maybe none)
        lo = lo + split * partition
        hi = tl.minimum(ctx, lo + partition)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * G + offs_g
    gd_mask = (offs_g[:, None] < G) & (offs_d[None, :] < D)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=gd_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)  # finite: no NaN before a first key
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    kv_base = KV + kvh * stride_h
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n
        valid = pos < hi
        k, v = _kv_tile(kv_base, Tables + b * stride_tb, pos, valid, offs_d, D, stride_slot, stride_kv,
                        BLOCK_SIZE, UPCAST)
        s = tl.where(valid[None, :], _dot(q, tl.trans(k), IEEE) * scale_log2, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, IEEE)

    if SPLIT:  # unnormalised partials, merged by _decode_reduce_kernel
        n_split = tl.num_programs(2)
        row = (b * n_heads + heads) * n_split + split
        g_mask = offs_g < G
        tl.store(MidAcc + row[:, None] * D + offs_d[None, :], acc, mask=gd_mask)
        tl.store(MidM + row, m_i, mask=g_mask)
        tl.store(MidL + row, l_i, mask=g_mask)
    else:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(Out.dtype.element_ty), mask=gd_mask)


@triton.jit
def _decode_reduce_kernel(MidAcc, MidM, MidL, Out, stride_ob, stride_oh, n_heads, n_split, D,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (sequence, query head): rescale each split's partial to the common maximum.
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < n_split
    row = (b * n_heads + h) * n_split + offs_s
    m = tl.load(MidM + row, mask=s_mask, other=-1.0e30)
    lsum = tl.load(MidL + row, mask=s_mask, other=0.0)
    acc = tl.load(MidAcc + row[:, None] * D + offs_d[None, :],
                  mask=s_mask[:, None] & (offs_d[None, :] < D), other=0.0)
    w = tl.exp2(m - tl.max(m, 0))
    total = tl.sum(lsum * w, 0)
    o = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, o.to(Out.dtype.element_ty), mask=offs_d < D)


@triton.jit
def _prefill_kernel(Q, KV, Out, Meta, stride_meta, stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_slot, stride_kv, stride_h, scale_log2, window, D,
                    G: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
                    UPCAST: tl.constexpr):
    # Program (query tile, sequence, query head). Meta row: q_start, q_len, ctx_start, table...
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // G
    meta = Meta + seq * stride_meta
    q_start = tl.load(meta)
    q_len = tl.load(meta + 1)
    ctx_start = tl.load(meta + 2)
    table = meta + 3

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < q_len
    q_pos = ctx_start + offs_m
    md_mask = m_valid[:, None] & (offs_d[None, :] < D)
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=md_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # Keys this tile can see: from the window start of its first query to its last query (causal).
    # A tile past the sequence's queries gets an empty range.
    first = ctx_start + tile * BLOCK_M
    hi = tl.minimum(ctx_start + q_len, first + BLOCK_M)
    lo = tl.maximum(first - window + 1, 0)
    hi = tl.where(tile * BLOCK_M < q_len, hi, lo)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_base = KV + kvh * stride_h
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n
        valid = pos < hi
        k, v = _kv_tile(kv_base, table, pos, valid, offs_d, D, stride_slot, stride_kv, BLOCK_SIZE, UPCAST)
        seen = (valid[None, :] & (pos[None, :] <= q_pos[:, None])
                & (pos[None, :] > q_pos[:, None] - window))
        s = tl.where(seen, _dot(q, tl.trans(k), IEEE) * scale_log2, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, IEEE)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(Out + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             o.to(Out.dtype.element_ty), mask=md_mask)


# The interpreter wraps kernels in its own class; compiled ones are JITFunctions.
INTERPRETED: bool = type(_decode_kernel).__name__ == "InterpretedFunction"


def _upcast(dtype: torch.dtype) -> bool:
    # The interpreter multiplies bfloat16 tiles as their raw 16-bit integers (numpy has no
    # bfloat16), so there the products run in float32; compiled kernels multiply bfloat16 natively.
    return INTERPRETED and dtype == torch.bfloat16


def supports(dtype: torch.dtype, n_heads: int, n_kv_heads: int, head_dim: int) -> bool:
    """Whether these kernels take a model of this attention shape and dtype."""
    return (dtype in _DTYPES and n_kv_heads > 0 and n_heads % n_kv_heads == 0
            and n_heads // n_kv_heads <= 64 and 0 < head_dim <= 256)


def _check_cache(kv_cache: torch.Tensor) -> None:
    if kv_cache.dim() != 4 or kv_cache.shape[1] != 2 or kv_cache.stride(3) != 1:
        raise ValueError("kv_cache must be [slots, 2, kv_heads, dim] with unit stride over dim")


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """``kv_cache[slot_mapping[t], 0] = key[t]`` (and ``1``: value) for every token ``t``.

    key/value: [T, Hkv, D] (any strides over T and Hkv, unit stride over D); slot_mapping: [T]
    integer slots, a negative slot skipping its token."""
    _check_cache(kv_cache)
    t, n_kv, d = key.shape
    if t == 0:
        return
    if key.stride(2) != 1 or value.stride(2) != 1:
        raise ValueError("key/value need unit stride over dim")
    _kv_write_kernel[(t,)](key, value, kv_cache, slot_mapping, key.stride(0), key.stride(1),
                           value.stride(0), value.stride(1), kv_cache.stride(0), kv_cache.stride(1),
                           kv_cache.stride(2), n_kv, d, BLOCK_H=triton.next_power_of_2(n_kv),
                           BLOCK_D=triton.next_power_of_2(d), num_warps=1 if n_kv * d <= 1024 else 4)


class TritonDecodeKernel:
    """Paged decode attention with the interface of ``AttentionMetadata.decode_kernel``.

    ``split_threshold``: contexts (bounded by the block tables' width) longer than this are split
    into ``partition_size``-token pieces attended by separate programs, as long as the batch alone
    leaves the GPU short of ``target_programs`` programs; ``split_threshold=0`` forces the split
    path on (tests). ``block_n``: keys per inner-loop tile."""

    def __init__(self, split_threshold: int = 1024, partition_size: int = 512, block_n: int = 64,
                 target_programs: int = 1024):
        if block_n < 16 or block_n & (block_n - 1):
            raise ValueError("block_n must be a power of two >= 16")
        self.split_threshold = split_threshold
        self.partition_size = -(-max(partition_size, block_n) // block_n) * block_n
        self.block_n = block_n
        self.target_programs = target_programs

    def num_splits(self, batch: int, n_kv: int, ctx_bound: int) -> int:
        """Programs per (sequence, KV head) for contexts of at most ``ctx_bound`` tokens."""
        if ctx_bound <= self.split_threshold:
            return 1
        by_len = -(-ctx_bound // self.partition_size)
        if self.split_threshold == 0:
            return by_len
        return max(1, min(by_len, self.target_programs // max(1, batch * n_kv)))

    def __call__(self, q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                 ctx_lens: torch.Tensor, out: torch.Tensor, block_size: int, scale: float,
                 window: int = 0) -> None:
        """Attend one query token per sequence over its paged context, writing ``out`` in place.

        q, out: [B, H, D] (unit stride over D); kv_cache: [slots, 2, Hkv, D]; block_tables: int32
        [B, max_blocks] (contiguous; entries past a context are never read); ctx_lens: int32 [B],
        each >= 1 (0 writes zeros); window > 0: attend only the last ``window`` positions."""
        _check_cache(kv_cache)
        b, h, d = q.shape
        n_kv = kv_cache.shape[2]
        if b == 0:
            return
        if (h % n_kv or q.stride(2) != 1 or out.stride(2) != 1 or not block_tables.is_contiguous()
                or not ctx_lens.is_contiguous() or q.dtype != kv_cache.dtype):
            raise ValueError("triton decode kernel: unsupported layout")
        g = h // n_kv
        win = window if window > 0 else _NO_WINDOW
        bound = min(block_tables.shape[1] * block_size, win)
        splits = self.num_splits(b, n_kv, bound)
        block_d = _pow2(d)
        block_n = _tile(self.block_n, q.element_size(), block_d)
        common = dict(G=g, BLOCK_SIZE=block_size, BLOCK_G=_pow2(g), BLOCK_N=block_n, BLOCK_D=block_d,
                      IEEE=q.dtype == torch.float32, UPCAST=_upcast(q.dtype), num_warps=4)
        scale_log2 = float(scale) * _LOG2E
        if splits == 1:
            _decode_kernel[(b, n_kv, 1)](q, kv_cache, block_tables, ctx_lens, out, out, out, out,
                                         q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                                         kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
                                         block_tables.stride(0), scale_log2, win, 0, h, d,
                                         SPLIT=False, **common)
            return
        mid_acc = torch.empty((b, h, splits, d), dtype=torch.float32, device=q.device)
        mid_m = torch.empty((b, h, splits), dtype=torch.float32, device=q.device)
        mid_l = torch.empty_like(mid_m)
        _decode_kernel[(b, n_kv, splits)](q, kv_cache, block_tables, ctx_lens, out, mid_acc, mid_m, mid_l,
                                          q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                                          kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
                                          block_tables.stride(0), scale_log2, win, self.partition_size,
                                          h, d, SPLIT=True, **common)
        _decode_reduce_kernel[(b, h)](mid_acc, mid_m, mid_l, out, out.stride(0), out.stride(1), h, splits, d,
                                      BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
                                      num_warps=1 if block_d <= 128 else 4)

    @staticmethod
    def supports(dtype: torch.dtype, n_heads: int, n_kv_heads: int, head_dim: int) -> bool:
        return supports(dtype, n_heads, n_kv_heads, head_dim)


@dataclass
class PrefillBatch:
    """The multi-token queries of one step, built once per step on the device.

    ``meta`` row i: query rows start (in the packed row), query count, cached-context length
    ``ctx_start`` (query j of the sequence is at position ctx_start + j), then the sequence's
    block table padded with block 0 to the widest."""

    meta: torch.Tensor  # int32 [P, 3 + max_blocks]
    max_q_len: int

    @classmethod
    def build(cls, spans: list[tuple[int, int, int, list[int]]], block_size: int,
              device: torch.device | str) -> PrefillBatch:
        """``spans``: (q_start, q_len, ctx_start, block_table) per sequence; one host-to-device copy."""
        nblk = max(-(-(c + n) // block_size) for _, n, c, _ in spans)
        rows = [[s, n, c] + table[:nblk] + [0] * (nblk - len(table[:nblk])) for s, n, c, table in spans]
        return cls(torch.tensor(rows, dtype=torch.int32, device=device), max(n for _, n, _, _ in spans))

    @property
    def q_starts(self) -> torch.Tensor:
        return self.meta[:, 0]

    @property
    def q_lens(self) -> torch.Tensor:
        return self.meta[:, 1]

    @property
    def ctx_starts(self) -> torch.Tensor:
        return self.meta[:, 2]

    @property
    def block_tables(self) -> torch.Tensor:
        return self.meta[:, 3:]


def prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, batch: PrefillBatch, out: torch.Tensor,
                      block_size: int, scale: float, window: int = 0, block_m: int = 64,
                      block_n: int = 64) -> None:
    """Causal attention of the batch's query rows over their sequences' cached K/V (the step's
    own K/V included: :func:`write_kv` first), written into those rows of ``out``.

    q, out: [T, H, D] (unit stride over D); window > 0: each query sees only the last ``window``
    positions up to itself. Rows of ``out`` outside the batch are left alone."""
    _check_cache(kv_cache)
    _, h, d = q.shape
    n_kv = kv_cache.shape[2]
    p = batch.meta.shape[0]
    if p == 0 or batch.max_q_len == 0:
        return
    if (h % n_kv or q.stride(2) != 1 or out.stride(2) != 1 or not batch.meta.is_contiguous()
            or q.dtype != kv_cache.dtype):
        raise ValueError("triton prefill kernel: unsupported layout")
    block_d = _pow2(d)
    block_m = _tile(block_m, q.element_size(), block_d)
    block_n = _tile(block_n, q.element_size(), block_d)
    grid = (triton.cdiv(batch.max_q_len, block_m), p, h)
    _prefill_kernel[grid](q, kv_cache, out, batch.meta, batch.meta.stride(0), q.stride(0), q.stride(1),
                          out.stride(0), out.stride(1), kv_cache.stride(0), kv_cache.stride(1),
                          kv_cache.stride(2), float(scale) * _LOG2E, window if window > 0 else _NO_WINDOW,
                          d, G=h // n_kv, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
                          BLOCK_D=block_d, IEEE=q.dtype == torch.float32, UPCAST=_upcast(q.dtype), num_warps=4)


# -- torch references (tests) ------------------------------------------------------------------
def _slots(table: list[int], start: int, end: int, block_size: int) -> list[int]:
    return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor) -> torch.Tensor:
    """q [n, H, D], k/v [L, Hkv, D], mask [n, L] -> [n, H, D], in float32."""
    g = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(g, dim=1)
    v = v.float().repeat_interleave(g, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", torch.softmax(scores, dim=-1), v)


def reference_write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """What :func:`write_kv` does, one token at a time."""
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            kv_cache[slot, 0] = key[t]
            kv_cache[slot, 1] = value[t]


def reference_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                     ctx_lens: torch.Tensor, block_size: int, scale: float, window: int = 0) -> torch.Tensor:
    """What :class:`TritonDecodeKernel` computes, one sequence at a time: [B, H, D] in q's dtype."""
    out = torch.zeros_like(q)
    for i, n in enumerate(ctx_lens.tolist()):
        lo = max(0, n - window) if window > 0 else 0
        idx = torch.tensor(_slots(block_tables[i].tolist(), lo, n, block_size), dtype=torch.long)
        kv = kv_cache[idx.to(kv_cache.device)]
        mask = torch.ones(1, n - lo, dtype=torch.bool, device=q.device)
        out[i] = _attend(q[i:i + 1], kv[:, 0], kv[:, 1], scale, mask)[0].to(q.dtype)
    return out


def reference_prefill(q: torch.Tensor, kv_cache: torch.Tensor, batch: PrefillBatch, block_size: int,
                      scale: float, window: int = 0) -> torch.Tensor:
    """What :func:`prefill_attention` computes, one sequence at a time: [T, H, D] in q's dtype,
    zero outside the batch's rows."""
    out = torch.zeros_like(q)
    for s, n, c, table in zip(batch.q_starts.tolist(), batch.q_lens.tolist(), batch.ctx_starts.tolist(),
                              batch.block_tables.tolist()):
        idx = torch.tensor(_slots(table, 0, c + n, block_size), dtype=torch.long, device=kv_cache.device)
        kv = kv_cache[idx]
        q_pos = torch.arange(c, c + n, device=q.device).unsqueeze(1)
        k_pos = torch.arange(c + n, device=q.device).unsqueeze(0)
        mask = k_pos <= q_pos
        if window > 0:
            mask &= k_pos > q_pos - window
        out[s:s + n] = _attend(q[s:s + n], kv[:, 0], kv[:, 1], scale, mask).to(q.dtype)
    return out
