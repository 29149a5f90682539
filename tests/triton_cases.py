"""The cases of tests/test_triton_attention.py: the Triton attention kernels
(engine/triton_attention.py) against their torch references, and the engine run through them with
greedy parity against ``transformers``.

Not collected by itself (no ``test_`` prefix): Triton decides when a kernel is defined (at import)
whether it compiles it or runs it in its CPU interpreter, from ``TRITON_INTERPRET``, and other test
modules of a pytest process may already have imported the kernels. ``test_triton_attention.py``
runs this file in a fresh process with ``TRITON_INTERPRET=1`` (on CPU), and on a CUDA machine once
more without it (compiled, on the GPU).
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from conftest import hf_greedy

from engine import SamplingParams

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("run through tests/test_triton_attention.py (it sets TRITON_INTERPRET=1)", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"

import engine.triton_attention as ta  # noqa: E402  (after the mode is settled)

BS = 4  # small blocks: contexts of a few tokens cross several of them
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# -- helpers ------------------------------------------------------------------------------------
def random_cache(n_blocks: int, n_kv: int, d: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n_blocks * BS, 2, n_kv, d, generator=gen).to(dtype).to(DEVICE)


def scattered_tables(lens: list[int], n_blocks: int, rng: random.Random) -> list[list[int]]:
    """Each sequence gets its own blocks, shuffled so that a table is never a contiguous range."""
    free = list(range(n_blocks))
    rng.shuffle(free)
    tables = []
    for n in lens:
        k = -(-n // BS)
        tables.append(free[:k])
        free = free[k:]
    return tables


def packed_rows(t: int, h: int, d: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """[T, H, D] as the engine hands it over: a transposed view of a [H, T, D] tensor."""
    return torch.randn(h, t, d, generator=gen).to(dtype).to(DEVICE).transpose(0, 1)


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    err = (a.float() - b.float()).abs().max().item()
    assert err <= TOL[dtype], f"max abs error {err}"


SHAPES = [(4, 2, 16), (4, 4, 24), (6, 2, 16)]  # (query heads, KV heads, head dim): GQA, MHA + odd D, G=3


# -- decode -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window", [0, 5, 20])
@pytest.mark.parametrize("split", [False, True])
def test_decode_matches_reference(dtype, shape, window, split):
    h, n_kv, d = shape
    gen = torch.Generator().manual_seed(hash((h, n_kv, d, window)) % 1000)
    lens = [1, 4, 7, 16, 23, 37]  # one token, one full block, partial blocks, many blocks
    n_blocks = 32
    tables = scattered_tables(lens, n_blocks, random.Random(len(lens)))
    width = max(map(len, tables)) + 1  # wider than needed: entries past a context are never read
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    cl = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    cache = random_cache(n_blocks, n_kv, d, dtype, gen)
    q = packed_rows(len(lens) + 3, h, d, dtype, gen)[:len(lens)]  # decode rows lead the packed row
    out = torch.full((len(lens) + 3, h, d), 7.0, dtype=dtype, device=DEVICE)
    kernel = (ta.TritonDecodeKernel(split_threshold=0, partition_size=16, block_n=16) if split
              else ta.TritonDecodeKernel(block_n=16))
    # Pieces of 16 positions: split whenever more than 16 can be read (no window, or 20).
    splits = kernel.num_splits(len(lens), n_kv, min(width * BS, window or width * BS))
    assert (splits > 1) == (split and window != 5)
    kernel(q, cache, bt, cl, out[:len(lens)], BS, d ** -0.5, window)
    ref = ta.reference_decode(q, cache, bt, cl, BS, d ** -0.5, window)
    close(out[:len(lens)], ref, dtype)
    assert (out[len(lens):] == 7.0).all(), "rows past the decode rows were written"


def test_decode_splits_long_context_and_window_bounds_them():
    kernel = ta.TritonDecodeKernel(split_threshold=64, partition_size=32, block_n=16, target_programs=64)
    assert kernel.num_splits(2, 2, 64) == 1  # short: one program per (sequence, KV head)
    assert kernel.num_splits(2, 2, 200) == 7  # ceil(200 / 32) pieces
    assert kernel.num_splits(8, 4, 200) == 2  # the batch alone nearly fills the target
    # A context of 100 under a window of 10 reads 10 positions: results agree with the reference.
    gen = torch.Generator().manual_seed(5)
    cache = random_cache(40, 2, 16, torch.float32, gen)
    tables = scattered_tables([100, 70], 40, random.Random(1))
    bt = torch.tensor([t + [0] * (25 - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    cl = torch.tensor([100, 70], dtype=torch.int32, device=DEVICE)
    q = packed_rows(2, 4, 16, torch.float32, gen)
    for window in (0, 10):
        out = torch.empty(2, 4, 16, device=DEVICE)
        kernel(q, cache, bt, cl, out, BS, 0.25, window)
        close(out, ta.reference_decode(q, cache, bt, cl, BS, 0.25, window), torch.float32)


# -- prefill ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window", [0, 6])
def test_prefill_matches_reference(dtype, shape, window):
    h, n_kv, d = shape
    gen = torch.Generator().manual_seed(hash((h, n_kv, d, window, 1)) % 1000)
    # (query count, cached context): a fresh prompt longer than one query tile, chunks after
    # aligned and unaligned cached contexts, a one-token chunk.
    seqs = [(21, 0), (5, 8), (9, 11), (1, 30)]
    n_blocks = 40
    tables = scattered_tables([n + c for n, c in seqs], n_blocks, random.Random(3))
    first = 2  # rows 0-1 stand for the step's decode rows
    spans, row = [], first
    for (n, c), table in zip(seqs, tables):
        spans.append((row, n, c, table))
        row += n
    batch = ta.PrefillBatch.build(spans, BS, DEVICE)
    assert batch.max_q_len == 21 and batch.block_tables.shape[1] == max(map(len, tables))
    cache = random_cache(n_blocks, n_kv, d, dtype, gen)
    q = packed_rows(row, h, d, dtype, gen)
    out = torch.full((row, h, d), 7.0, dtype=dtype, device=DEVICE)
    ta.prefill_attention(q, cache, batch, out, BS, d ** -0.5, window, block_m=16, block_n=16)
    ref = ta.reference_prefill(q, cache, batch, BS, d ** -0.5, window)
    close(out[first:], ref[first:], dtype)
    assert (out[:first] == 7.0).all(), "rows outside the batch were written"


def test_prefill_of_last_positions_equals_decode():
    """A one-token prefill chunk after a cached context is exactly a decode step."""
    gen = torch.Generator().manual_seed(9)
    cache = random_cache(16, 2, 16, torch.float32, gen)
    tables = scattered_tables([23, 9], 16, random.Random(4))
    q = packed_rows(2, 4, 16, torch.float32, gen)
    batch = ta.PrefillBatch.build([(0, 1, 22, tables[0]), (1, 1, 8, tables[1])], BS, DEVICE)
    pre = torch.empty(2, 4, 16, device=DEVICE)
    dec = torch.empty(2, 4, 16, device=DEVICE)
    ta.prefill_attention(q, cache, batch, pre, BS, 0.25, 5, block_m=16, block_n=16)
    bt = torch.tensor([tables[0], tables[1] + [0] * (len(tables[0]) - len(tables[1]))], dtype=torch.int32,
                      device=DEVICE)
    ta.TritonDecodeKernel(block_n=16)(q, cache, bt, torch.tensor([23, 9], dtype=torch.int32, device=DEVICE),
                                      dec, BS, 0.25, 5)
    close(pre, dec, torch.float32)


# -- KV write -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_kv,d", [(2, 16), (3, 24)])
def test_write_kv_matches_reference(dtype, n_kv, d):
    gen = torch.Generator().manual_seed(n_kv * d)
    cache = random_cache(8, n_kv, d, dtype, gen)
    t = 9
    key = torch.randn(1, n_kv, t, d, generator=gen).to(dtype).to(DEVICE)[0].transpose(0, 1)  # engine layout
    value = torch.randn(1, n_kv, t, d, generator=gen).to(dtype).to(DEVICE)[0].transpose(0, 1)
    slots = torch.tensor([5, 0, 31, 6, -1, 17, 18, 19, 2], dtype=torch.long, device=DEVICE)  # -1: padding
    got, want = cache.clone(), cache.clone()
    ta.write_kv(got, key, value, slots)
    ta.reference_write_kv(want, key, value, slots)
    assert torch.equal(got, want)
    assert not torch.equal(got, cache)


# -- the engine through the kernels --------------------------------------------------------------
def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("kind", ["llama", "mistral"])  # mistral: sliding window 24
def test_engine_greedy_parity_through_triton(kind, make_llm, hf_reference):
    from engine.triton_attention import TritonDecodeKernel

    hf, tok = hf_reference(kind)
    llm = make_llm(kind, attention_backend="triton", device=DEVICE, max_num_seqs=4)
    runner = llm.engine.runner
    assert isinstance(runner.decode_kernel, TritonDecodeKernel) and runner.triton is not None
    rng = random.Random(11)
    system = [rng.randrange(3, len(tok)) for _ in range(36)]  # two full blocks of 16 and a bit
    prompts = [[rng.randrange(3, len(tok)) for _ in range(n)] for n in (5, 29)]
    # Two fresh prompts together (prefill + decode in the same steps), then two that share the
    # first one's 32 cached tokens: their prefill starts at ctx_start 32.
    first = llm.generate([{"prompt_token_ids": p} for p in [system + [7, 8]] + prompts], greedy(6))
    shared = [system + [9] * 4, system[:33]]
    rest = llm.generate([{"prompt_token_ids": p} for p in shared], greedy(6))
    assert [o.num_cached_tokens for o in rest] == [32, 32]
    for p, o in zip([system + [7, 8]] + prompts + shared, first + rest):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 6)


def test_engine_chunked_prefill_through_triton(make_llm, hf_reference):
    """Chunks of 8 tokens: every chunk after the first attends over the cached ones."""
    hf, tok = hf_reference("mistral")
    llm = make_llm("mistral", attention_backend="triton", device=DEVICE, max_num_batched_tokens=8)
    prompt = [random.Random(2).randrange(3, len(tok)) for _ in range(30)]
    out = llm.generate({"prompt_token_ids": prompt}, greedy(4))[0]
    assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 4)
