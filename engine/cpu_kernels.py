"""Native CPU kernels (``engine/csrc``), compiled at first use with the machine's C++ compiler.

Three sources share one library: paged decode attention (``paged_decode.cpp``), decode-sized
bfloat16 GEMMs on AMX (``small_gemm.cpp``) and the fused elementwise steps of a decoder layer
(``fused_ops.cpp``: RMSNorm with its residual add, rotary embedding, SiLU-and-multiply).
The shared library is built with ``-O3 -march=native -fopenmp`` into a cache directory
(``$LLMC_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/llm-cluster/kernels``, else
``~/.cache/llm-cluster/kernels``) under a name that hashes the sources, the flags, the compiler's
version and this CPU's feature flags, so a rebuilt machine or an edited kernel never loads a stale
binary. Building takes about 2 s once; concurrent processes race benignly (atomic rename). Calls
go through ``ctypes``, which releases the GIL while the kernel runs. Where no compiler is found or
the build fails, :func:`load` returns ``None`` and the engine keeps its torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).parent / "csrc" / name
                for name in ("paged_decode.cpp", "small_gemm.cpp", "fused_ops.cpp"))
HEADERS = (Path(__file__).parent / "csrc" / "vec_exp.h",)  # included, not compiled: hashed too
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def cache_dir() -> Path:
    if os.environ.get("LLMC_KERNEL_CACHE"):
        return Path(os.environ["LLMC_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llm-cluster" / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([*(src.read_text() for src in SOURCES + HEADERS), " ".join(FLAGS), version,
                                     _cpu_flags()]).encode()).hexdigest()[:16]
    out_dir = cache_dir()
    target = out_dir / f"kernels-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, *map(str, SOURCES)], check=True, capture_output=True,
                       text=True, timeout=300)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class PagedDecodeKernel:
    """ctypes binding of ``paged_decode_attention`` (see ``csrc/paged_decode.cpp``)."""

    def __init__(self, lib: ctypes.CDLL):
        fn = lib.paged_decode_attention
        i, n, p = ctypes.c_int, ctypes.c_long, ctypes.c_void_p
        fn.argtypes = [i, p, n, n, p, p, i, p, p, n, n, i, i, i, i, i, ctypes.c_float, i, i]
        fn.restype = i
        self._fn = fn

    def __call__(self, q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                 ctx_lens: torch.Tensor, out: torch.Tensor, block_size: int, scale: float,
                 window: int = 0) -> None:
        """Attend one query token per sequence over its paged context, writing ``out`` in place.

        q, out: [B, H, D] views (any strides over B and H, unit stride over D), the cache's dtype;
        kv_cache: [slots, 2, Hkv, D] contiguous; block_tables: int32 [B, max_blocks] contiguous;
        ctx_lens: int32 [B]; window: attend only the last ``window`` positions (0: all)."""
        b, h, d = q.shape
        n_kv = kv_cache.shape[2]
        if not (q.stride(2) == 1 and out.stride(2) == 1 and kv_cache.is_contiguous()
                and block_tables.is_contiguous() and ctx_lens.is_contiguous()
                and q.dtype == kv_cache.dtype == out.dtype and block_tables.dtype == torch.int32
                and ctx_lens.dtype == torch.int32):
            raise ValueError("paged decode kernel: unsupported layout or dtype")
        rc = self._fn(_DTYPE_CODES[q.dtype], q.data_ptr(), q.stride(0), q.stride(1), kv_cache.data_ptr(),
                      block_tables.data_ptr(), block_tables.shape[1], ctx_lens.data_ptr(), out.data_ptr(),
                      out.stride(0), out.stride(1), b, h, n_kv, d, block_size, float(scale), int(window),
                      torch.get_num_threads())
        if rc != 0:
            raise ValueError(f"paged decode kernel does not take H={h}, Hkv={n_kv}, D={d}")

    @staticmethod
    def supports(dtype: torch.dtype, n_heads: int, n_kv_heads: int, head_dim: int) -> bool:
        return (dtype in _DTYPE_CODES and n_kv_heads > 0 and n_heads % n_kv_heads == 0
                and n_heads // n_kv_heads <= 16 and 0 < head_dim <= 256)


class SmallGemmKernel:
    """ctypes binding of ``small_gemm_bf16`` (see ``csrc/small_gemm.cpp``): bfloat16
    ``x @ w.T (+ bias)`` for up to :attr:`MAX_ROWS` rows on AMX tiles."""

    MAX_ROWS = 32

    def __init__(self, lib: ctypes.CDLL):
        fn = lib.small_gemm_bf16
        p, n = ctypes.c_void_p, ctypes.c_long
        fn.argtypes = [p, n, p, p, p, n, n, n, n, ctypes.c_int]
        fn.restype = ctypes.c_int
        self._fn = fn

    @classmethod
    def supports(cls, weight: torch.Tensor) -> bool:
        """Whether this kernel takes ``weight`` (bfloat16 ``[N, K]``, contiguous, K % 32 == 0)."""
        return (weight.dtype == torch.bfloat16 and weight.dim() == 2 and weight.is_contiguous()
                and weight.device.type == "cpu" and weight.shape[1] % 32 == 0)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x``: bfloat16 [M, K] with unit stride along K, M <= MAX_ROWS; ``bias``: float32 [N]
        or None. Returns a new bfloat16 [M, N]."""
        m, k = x.shape
        n = weight.shape[0]
        if not (x.dtype == torch.bfloat16 and x.stride(1) == 1 and 0 < m <= self.MAX_ROWS
                and weight.shape[1] == k and self.supports(weight)
                and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))):
            raise ValueError("small GEMM kernel: unsupported shape, layout or dtype")
        y = torch.empty(m, n, dtype=torch.bfloat16)
        rc = self._fn(x.data_ptr(), x.stride(0), weight.data_ptr(),
                      None if bias is None else bias.data_ptr(), y.data_ptr(), n, m, n, k,
                      torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"small GEMM kernel failed (code {rc})")
        return y


class FusedOps:
    """ctypes bindings of ``csrc/fused_ops.cpp``: a decoder layer's elementwise steps in one call
    each, rounding as the transformers modules do (float32 and bfloat16 only)."""

    DTYPES = (torch.float32, torch.bfloat16)

    def __init__(self, lib: ctypes.CDLL):
        p, n, i, f = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
        self._norm = lib.fused_rms_norm
        self._norm.argtypes = [i, p, n, p, n, p, n, p, p, n, n, n, f, i]
        self._rotary = lib.fused_rotary
        self._rotary.argtypes = [i, p, n, i, i, p, n, p, n, n, i]
        self._silu = lib.fused_silu_mul
        self._silu.argtypes = [i, p, n, p, n, n, p, n, n, i]
        for fn in (self._norm, self._rotary, self._silu):
            fn.restype = ctypes.c_int

    @staticmethod
    def _rows(x: torch.Tensor) -> bool:
        return x.dim() == 2 and x.stride(1) == 1

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(h) * weight, h)`` with ``h = residual + x`` (rounded to the dtype), or ``h = x``
        without a residual. x, residual: [rows, dim] with unit stride along dim."""
        rows, dim = x.shape
        if not (self._rows(x) and x.dtype in self.DTYPES and weight.dtype == x.dtype and weight.is_contiguous()
                and weight.numel() == dim and (residual is None or (self._rows(residual)
                                                                    and residual.shape == x.shape
                                                                    and residual.dtype == x.dtype))):
            raise ValueError("fused rms_norm: unsupported shape, layout or dtype")
        y = torch.empty(rows, dim, dtype=x.dtype)
        h = x if residual is None else torch.empty(rows, dim, dtype=x.dtype)
        r = residual
        self._norm(_DTYPE_CODES[x.dtype], x.data_ptr(), x.stride(0), None if r is None else r.data_ptr(),
                   0 if r is None else r.stride(0), h.data_ptr(), h.stride(0), weight.data_ptr(), y.data_ptr(),
                   dim, rows, dim, float(eps), torch.get_num_threads())
        return y, h

    def rotary(self, x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate ``x`` [rows, heads * D] (unit stride along it) in place by ``cos``/``sin``
        [rows, D], as transformers' ``apply_rotary_pos_emb`` (rotate-half convention)."""
        rows = x.shape[0]
        d = cos.shape[-1]
        if not (self._rows(x) and x.shape[1] >= heads * d and x.dtype in self.DTYPES and cos.dtype == sin.dtype
                == x.dtype and self._rows(cos) and self._rows(sin) and cos.shape == sin.shape == (rows, d)
                and d % 2 == 0):
            raise ValueError("fused rotary: unsupported shape, layout or dtype")
        self._rotary(_DTYPE_CODES[x.dtype], x.data_ptr(), x.stride(0), heads, d, cos.data_ptr(), cos.stride(0),
                     sin.data_ptr(), sin.stride(0), rows, torch.get_num_threads())

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` ([rows, I] each, unit stride along I) as a new [rows, I]."""
        rows, inter = gate.shape
        if not (self._rows(gate) and self._rows(up) and gate.shape == up.shape and gate.dtype in self.DTYPES
                and up.dtype == gate.dtype):
            raise ValueError("fused silu_mul: unsupported shape, layout or dtype")
        y = torch.empty(rows, inter, dtype=gate.dtype)
        self._silu(_DTYPE_CODES[gate.dtype], gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), inter,
                   y.data_ptr(), inter, rows, torch.get_num_threads())
        return y


@dataclass
class CpuKernels:
    """Everything the library offers on this machine (``None`` where a kernel is unavailable)."""

    decode: PagedDecodeKernel | None
    gemm: SmallGemmKernel | None
    fused: FusedOps | None


def _library() -> ctypes.CDLL | None:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        log.warning("no C++ compiler found: the CPU kernels of engine/csrc are off (torch paths)")
        return None
    try:
        return ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("building the CPU kernels failed (%s): using the torch paths",
                    detail.strip().splitlines()[-1] if detail.strip() else type(e).__name__)
        return None


def load() -> PagedDecodeKernel | None:
    """Build (once per machine) and load the decode-attention kernel; ``None`` where that is not
    possible."""
    lib = _library()
    return None if lib is None else PagedDecodeKernel(lib)


def load_all() -> CpuKernels:
    """Build (once per machine) and load the library, with every kernel it has here."""
    lib = _library()
    if lib is None:
        return CpuKernels(None, None, None)
    return CpuKernels(PagedDecodeKernel(lib), SmallGemmKernel(lib) if lib.small_gemm_available() else None,
                      FusedOps(lib))


def load_fused() -> FusedOps | None:
    """The fused elementwise steps; ``None`` where the library cannot be built."""
    lib = _library()
    return None if lib is None else FusedOps(lib)


def load_small_gemm() -> SmallGemmKernel | None:
    """The AMX small-batch GEMM where this CPU, compiler and kernel have it; else ``None``."""
    lib = _library()
    if lib is None or not lib.small_gemm_available():
        return None
    return SmallGemmKernel(lib)
