"""The native CPU decode kernel against a plain torch reference, and float32-GEMM linears."""

import pytest
import torch
from torch import nn

from engine import cpu_kernels, cpu_linear


@pytest.fixture(scope="module")
def kernel():
    k = cpu_kernels.load()
    assert k is not None, "the CPU decode kernel must build on the test machine (g++ is installed)"
    return k


def reference(q, kv, tables, lens, bs, scale, window):
    """Softmax attention of each sequence's one query over its paged context, in float32."""
    b_, h, d = q.shape
    g = h // kv.shape[2]
    outs = []
    for b in range(b_):
        n = int(lens[b])
        pos = torch.arange(n)
        slots = tables[b][pos // bs].long() * bs + pos % bs
        k = kv[slots, 0].float().repeat_interleave(g, 1)  # [n, H, D]
        v = kv[slots, 1].float().repeat_interleave(g, 1)
        s = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        if window:
            s[:, :max(0, n - window)] = float("-inf")
        outs.append(torch.einsum("hn,nhd->hd", s.softmax(-1), v))
    return torch.stack(outs)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(16, 8, 64), (4, 4, 32), (8, 1, 128), (6, 2, 80)])
@pytest.mark.parametrize("window", [0, 20])
def test_kernel_matches_reference(kernel, dtype, tol, heads, kv_heads, dim, window):
    torch.manual_seed(0)
    bs, nblocks = 16, 300
    kv = torch.randn(nblocks * bs, 2, kv_heads, dim).to(dtype)
    lens = torch.tensor([1, 17, 33, 250, 700], dtype=torch.int32)
    tables = torch.randperm(nblocks)[:5 * 48].int().view(5, 48).contiguous()  # scattered blocks
    # Queries as the model hands them over: a [H, T, D] view of a [T, H, D] buffer.
    q = torch.randn(1, heads, 8, dim).to(dtype)[0].transpose(0, 1)[:5]
    out = torch.full((8, heads, dim), float("nan"), dtype=dtype)
    kernel(q, kv, tables, lens, out[:5], bs, dim ** -0.5, window)
    ref = reference(q, kv, tables, lens, bs, dim ** -0.5, window)
    assert torch.allclose(out[:5].float(), ref, atol=tol, rtol=tol)
    assert torch.isnan(out[5:]).all(), "rows past the batch must be left untouched"


def test_kernel_rejects_bad_layouts(kernel):
    kv = torch.zeros(32, 2, 2, 8)
    q = torch.zeros(1, 4, 8)
    with pytest.raises(ValueError):
        kernel(q, kv, torch.zeros(1, 2, dtype=torch.int64), torch.ones(1, dtype=torch.int32), q.clone(), 16, 1.0)
    with pytest.raises(ValueError):
        kernel(q.bfloat16(), kv, torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
               q.clone(), 16, 1.0)


def test_kernel_cache_is_keyed_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_KERNEL_CACHE", str(tmp_path))
    assert cpu_kernels.load() is not None
    built = list(tmp_path.glob("paged_decode-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    assert cpu_kernels.load() is not None
    assert built[0].stat().st_mtime_ns == mtime, "a cached build must be reused, not rebuilt"


def test_kernel_falls_back_without_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMC_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert cpu_kernels.load() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 7, 300])  # the decode-sized (W @ x^T) and the F.linear branch
@pytest.mark.parametrize("out_features", [96, 4 * cpu_linear.SLICE_ROWS + 100])  # one GEMM, slices
def test_fp32_accum_linear_is_a_float32_gemm(dtype, rows, out_features):
    torch.manual_seed(0)
    lin = nn.Linear(256, out_features, bias=True).to(dtype)
    wrapped = cpu_linear.Fp32AccumLinear(lin)
    x = torch.randn(rows, 1, 256).to(dtype)
    y = wrapped(x)
    assert y.dtype == dtype and y.shape == (rows, 1, out_features) and y.is_contiguous()
    exact = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    # float32 accumulation, then one rounding to the model dtype: within that dtype's half-ulp.
    eps = {torch.float32: 1e-5, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    assert torch.allclose(y.double(), exact, rtol=eps * 1.01, atol=1e-5)
    assert wrapped.weight.dtype == torch.float32
    assert torch.equal(wrapped.weight.to(dtype), lin.weight), "weights upcast exactly"


def test_adapt_linears_swaps_every_half_linear():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 4), nn.ReLU())).bfloat16()
    assert cpu_linear.adapt_linears(model) == 2
    assert all(not isinstance(m, nn.Linear) for m in model.modules())
    assert model(torch.randn(3, 8).bfloat16()).dtype == torch.bfloat16


def test_choose_mode():
    cpu = torch.device("cpu")
    assert cpu_linear.choose_mode("auto", torch.float32, cpu) == "fp32"
    assert cpu_linear.choose_mode("auto", torch.bfloat16, torch.device("meta")) == "native"
    assert cpu_linear.choose_mode("fp32", torch.bfloat16, cpu) == "fp32"
    assert cpu_linear.choose_mode("native", torch.bfloat16, cpu) == "native"
    auto = cpu_linear.choose_mode("auto", torch.bfloat16, cpu)
    assert auto == ("native" if cpu_linear.has_native_half(torch.bfloat16) else "fp32")
    with pytest.raises(ValueError):
        cpu_linear.choose_mode("fast", torch.bfloat16, cpu)


def test_keep_freed_memory_sets_glibc_malloc_options():
    """A 4 MiB block freed and allocated again comes back from the heap, not from a fresh mmap
    (which would fault every page in again): the address repeats and the process keeps no mmap'd
    chunk for it."""
    import ctypes

    from engine import host_memory

    assert host_memory.keep_freed_memory() and host_memory.keep_freed_memory()  # idempotent
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc.mallinfo2.restype = MallInfo2
    before = libc.mallinfo2().hblkhd
    p = libc.malloc(4 * 2**20)
    assert libc.mallinfo2().hblkhd == before  # not an mmap'd chunk
    libc.free(p)
    q = libc.malloc(4 * 2**20)
    libc.free(q)
    assert q == p
