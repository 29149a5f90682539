"""CPU linear layers: AMX GEMMs for decode-sized batches, float32 GEMMs where half math is missing.

**Small batches on AMX (``amx``).** A decode step streams every weight for a few rows; on a 2-core
Xeon with AMX, oneDNN's ``F.linear`` read bfloat16 weights at ~10 GB/s there, the kernel of
``csrc/small_gemm.cpp`` at ~16 GB/s (the 150M benchmark Llama's GEMMs for 8 rows: 24.5 -> 17 ms a
step; 32 rows 33 -> 28 ms). :class:`SmallBatchLinear` sends up to 32 rows to it and the rest
(prefill) to ``F.linear``, on the same weight tensor (no copy, tied weights stay tied); its
results equalled ``F.linear``'s bit for bit in the tests.

**Float32 (``fp32``): half precision on CPUs without native half arithmetic.**

On CPUs with AVX-512-BF16 or AMX, oneDNN runs bfloat16 GEMMs natively. Without them (AVX2-only
parts, e.g. the 2-core AMD EPYC this was measured on), ``F.linear`` in bfloat16 falls back to a
conversion-bound path: 18-20 GFLOP/s for a [256 x 1024] x [1024 x 2816] GEMM against 130 GFLOP/s
for the same GEMM in float32, and 4.7 ms vs 2.0 ms at 16 rows (torch 2.13.0). In a profile of the
150M benchmark Llama in bfloat16, ``aten::mm`` was 90% of the time.

A bfloat16 GEMM already multiplies in float32 and accumulates in float32; only its inputs and its
output are bfloat16. :class:`Fp32AccumLinear` does exactly that with the float32 kernel: weights
are upcast once (exactly: every bfloat16 value is a float32 value), each input is upcast, and the
output is rounded back to the model's dtype, so activations, the KV cache and logits keep the
model's dtype. The cost is float32 weight memory (2x the bfloat16 weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Up to this many rows, ``W @ x^T`` beats ``x @ W^T`` (what ``F.linear`` runs) with torch 2.13's
# CPU sgemm: median ms on 2 AVX2 cores, F.linear / transposed, for a [2816 x 1024] weight:
# 16 rows 1.40 / 0.82, 64 rows 3.56 / 3.19, 128 rows 5.83 / 4.75, 512 rows 18.1 / 23.7; the
# [32000 x 1024] lm_head at 16 rows: 29.5 / 18.9.
TRANSPOSED_MAX_ROWS = 256
# Wide weights (an lm_head) go in slices of this many output rows: [32000 x 1024] at 16 rows
# measured 22.5 ms in one GEMM, 13.3 ms in slices of 2000.
SLICE_ROWS = 2048


class Fp32AccumLinear(nn.Module):
    """``nn.Linear`` whose GEMM runs in float32; input and output stay in ``out_dtype``.

    Small batches (decode steps) run as ``W @ x^T``, which the CPU sgemm does faster here."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = linear.weight.dtype
        self.weight = nn.Parameter(linear.weight.detach().float(), requires_grad=False)
        self.bias = (nn.Parameter(linear.bias.detach().float(), requires_grad=False)
                     if linear.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > TRANSPOSED_MAX_ROWS:
            return F.linear(x.float(), self.weight, self.bias).to(self.out_dtype)
        xt = x.reshape(rows, self.in_features).float().t()
        if self.out_features > 4 * SLICE_ROWS:
            yt = xt.new_empty(self.out_features, rows)
            for a in range(0, self.out_features, SLICE_ROWS):
                torch.mm(self.weight[a:a + SLICE_ROWS], xt, out=yt[a:a + SLICE_ROWS])
            y = yt.t()
        else:
            y = torch.mm(self.weight, xt).t()
        if self.bias is not None:
            y = y + self.bias
        # One copy back to row-major (and the model dtype) for the reshapes that follow.
        y = y.contiguous() if self.out_dtype == torch.float32 else y.to(
            self.out_dtype, memory_format=torch.contiguous_format)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, out_dtype={self.out_dtype}"


def padded_rows(rows: int) -> int:
    """Row count a CPU bfloat16 GEMM of ``rows`` rows runs at: a multiple of 32 up to 512, of 128
    beyond (27 shapes from 33 to 2048 rows; at most 25% padding from 128 rows on).

    oneDNN builds a JIT kernel per shape on first use: on the 2-core AMX Xeon a step whose row
    count was new paid ~2 ms per weight shape (the 150M Llama's 4 GEMM shapes at 40-150 rows:
    13-37 ms first, 7-15 ms after). Every prefill chunk has its own row count, so a fresh worker's
    first minute of traffic paid it on nearly every step (B=16 short prompts over HTTP: ITL p50 88
    ms in the first cell against 41 in the next)."""
    if rows <= 512:
        return -(-rows // 32) * 32
    return -(-rows // 128) * 128


def bucketed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` of ``x`` [rows, K] computed at :func:`padded_rows` rows (zero rows appended);
    the result is the first ``rows`` rows, contiguous."""
    rows = x.shape[0]
    padded = padded_rows(rows)
    if padded != rows:
        xp = x.new_empty(padded, x.shape[1])
        xp[:rows] = x
        xp[rows:] = 0
        x = xp
    return F.linear(x, weight, bias)[:rows]


def small_batch_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     bias32: torch.Tensor | None, kernel) -> torch.Tensor:
    """``F.linear`` of a bfloat16 ``x`` [rows >= 1, K] on the AMX machine: up to ``kernel.MAX_ROWS``
    rows on the AMX kernel (``bias32``: the bias in float32, added before its one rounding), more at
    :func:`padded_rows` rows through oneDNN."""
    if x.shape[0] <= kernel.MAX_ROWS:
        return kernel(x if x.stride(1) == 1 else x.contiguous(), weight, bias32)
    return bucketed_linear(x, weight, bias)


class SmallBatchLinear(nn.Module):
    """``nn.Linear`` (bfloat16) whose GEMMs of up to ``kernel.MAX_ROWS`` rows run on the AMX
    kernel; larger ones go to ``F.linear`` at padded row counts. Keeps the original weight and bias parameters."""

    def __init__(self, linear: nn.Linear, kernel):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        # The kernel adds the bias in float32 before its one rounding, as oneDNN does.
        self._bias32 = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self._kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if x.dim() else 0
        # The kernel computes no gradients: autograd (never in the engine) keeps F.linear.
        if rows and x.dtype == torch.bfloat16 and not (torch.is_grad_enabled() and self.weight.requires_grad):
            y = small_batch_gemm(x.reshape(rows, self.in_features), self.weight, self.bias, self._bias32,
                                 self._kernel)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, small batches on AMX"


def has_native_half(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` natively (AVX-512-BF16/AMX-BF16, AVX-512-FP16/AMX-FP16)."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if dtype == torch.bfloat16:
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    if dtype == torch.float16:
        return bool(caps.get("avx512_fp16") or caps.get("amx_fp16"))
    return True


MODES = ("auto", "amx", "native", "fp32")


def choose_mode(mode: str, dtype: torch.dtype, device: torch.device, amx_available: bool = False) -> str:
    """``amx``, ``native`` or ``fp32`` for the linear layers of a model.

    ``auto``: ``amx`` for bfloat16 models where the AMX kernel runs (``amx_available``),
    ``native`` for other half-precision models on CPUs with native half math, ``fp32`` for float32
    models (the faster GEMM orientation) and for half-precision models on CPUs without it. Off the
    CPU, always ``native``."""
    if mode not in MODES:
        raise ValueError(f"cpu_linear must be one of {', '.join(MODES)}, got {mode!r}")
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return "native"
    if mode == "auto":
        if dtype == torch.bfloat16 and amx_available:
            return "amx"
        return "native" if dtype != torch.float32 and has_native_half(dtype) else "fp32"
    if mode == "amx" and not (dtype == torch.bfloat16 and amx_available):
        raise ValueError(f"cpu_linear: amx needs a bfloat16 model and a CPU with AMX-BF16 (model: {dtype})")
    return mode


def adapt_linears(model: nn.Module, mode: str = "fp32", kernel=None) -> int:
    """Swap every ``nn.Linear`` of ``model`` for :class:`Fp32AccumLinear` (``fp32``) or, for
    bfloat16 weights the ``kernel`` takes, :class:`SmallBatchLinear` (``amx``).

    ``fp32``: tied weights (an ``lm_head`` sharing the embedding matrix) get their own float32
    copy for the GEMM; the embedding keeps the original. Returns the number of layers swapped."""
    if mode not in ("fp32", "amx"):
        raise ValueError(f"adapt_linears: mode must be fp32 or amx, got {mode!r}")
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            if mode == "fp32" and child.weight.dtype in (torch.float32, torch.bfloat16, torch.float16):
                setattr(parent, name, Fp32AccumLinear(child))
                swapped += 1
            elif mode == "amx" and kernel is not None and kernel.supports(child.weight):
                setattr(parent, name, SmallBatchLinear(child, kernel))
                swapped += 1
    return swapped
