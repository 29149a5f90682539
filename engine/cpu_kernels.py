"""Native CPU kernels (``engine/csrc``), compiled at first use with the machine's C++ compiler.

The shared library is built with ``-O3 -march=native -fopenmp`` into a cache directory
(``$LLMC_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/llm-cluster/kernels``, else
``~/.cache/llm-cluster/kernels``) under a name that hashes the source, the flags, the compiler's
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
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"
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
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_flags()])
                         .encode()).hexdigest()[:16]
    out_dir = cache_dir()
    target = out_dir / f"paged_decode-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True,
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


def load() -> PagedDecodeKernel | None:
    """Build (once per machine) and load the kernel; ``None`` where that is not possible."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        log.warning("no C++ compiler found: CPU decode attention uses the torch path")
        return None
    try:
        return PagedDecodeKernel(ctypes.CDLL(str(_build(compiler))))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("building the CPU decode-attention kernel failed (%s): using the torch path",
                    detail.strip().splitlines()[-1] if detail.strip() else type(e).__name__)
        return None
