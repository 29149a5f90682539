"""The native CPU kernels (paged decode attention, the AMX small-batch GEMM) against torch, and the
linear-layer adapters."""

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
    built = list(tmp_path.glob("kernels-*.so"))
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
    assert cpu_linear.choose_mode("auto", torch.bfloat16, cpu, amx_available=True) == "amx"
    assert cpu_linear.choose_mode("auto", torch.float16, cpu, amx_available=True) != "amx"
    assert cpu_linear.choose_mode("auto", torch.float32, cpu, amx_available=True) == "fp32"
    assert cpu_linear.choose_mode("amx", torch.bfloat16, cpu, amx_available=True) == "amx"
    with pytest.raises(ValueError, match="AMX"):
        cpu_linear.choose_mode("amx", torch.bfloat16, cpu, amx_available=False)
    with pytest.raises(ValueError):
        cpu_linear.choose_mode("fast", torch.bfloat16, cpu)


def _has_amx() -> bool:
    return bool((torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}).get("amx_bf16"))


@pytest.fixture(scope="module")
def small_gemm():
    k = cpu_kernels.load_small_gemm()
    if not _has_amx():
        assert k is None, "no AMX here: the kernel must report itself unavailable"
        pytest.skip("this CPU has no AMX-BF16")
    assert k is not None, "this CPU has AMX-BF16: the small-GEMM kernel must build and run"
    return k


@pytest.mark.parametrize("rows", [1, 3, 8, 16, 17, 32])
@pytest.mark.parametrize("n,k", [(2816, 1024), (1026, 64), (37, 96)])  # N % 32 tails included
def test_small_gemm_matches_f_linear(small_gemm, rows, n, k):
    """Bias or not, the AMX kernel gives F.linear's bfloat16 results (both sum exact products in
    float32 and round once); allow a one-ulp flip in at most 1 output in 1000."""
    torch.manual_seed(rows * 7 + n)
    w, b = torch.randn(n, k).bfloat16(), torch.randn(n).bfloat16()
    x = torch.randn(rows, k).bfloat16()
    for bias in (None, b):
        got = small_gemm(x, w, None if bias is None else bias.float())
        want = torch.nn.functional.linear(x, w, bias)
        differ = got != want
        assert differ.float().mean() <= 1e-3
        assert torch.allclose(got.float(), want.float(), rtol=2 ** -7, atol=0)
    strided = torch.randn(rows, k + 32).bfloat16()[:, :k]  # rows farther apart than k
    assert torch.equal(small_gemm(strided, w, None), small_gemm(strided.contiguous(), w, None))


def test_small_gemm_rejects_what_it_cannot_take(small_gemm):
    w = torch.randn(64, 64).bfloat16()
    for x in (torch.randn(33, 64).bfloat16(), torch.randn(2, 64), torch.randn(2, 32).bfloat16()):
        with pytest.raises(ValueError):
            small_gemm(x, w, None)
    assert not small_gemm.supports(torch.randn(64, 48).bfloat16())  # K % 32 != 0
    assert not small_gemm.supports(torch.randn(64, 64))


def test_small_batch_linear_routes_by_rows(small_gemm):
    """Up to 32 rows go to the kernel, more to F.linear; one weight tensor, tied weights stay tied."""
    torch.manual_seed(0)
    lin = nn.Linear(128, 96, bias=True).bfloat16()
    wrapped = cpu_linear.SmallBatchLinear(lin, small_gemm)
    assert wrapped.weight is lin.weight
    calls = []
    real = small_gemm.__call__
    small_gemm_spy = type("Spy", (), {"MAX_ROWS": small_gemm.MAX_ROWS,
                                      "__call__": lambda self, *a: calls.append(a[0].shape) or real(*a)})()
    wrapped._kernel = small_gemm_spy
    with torch.inference_mode():
        for shape in [(1, 1, 128), (4, 1, 128), (2, 16, 128), (40, 128), (3, 20, 128)]:
            x = torch.randn(shape).bfloat16()
            y = wrapped(x)
            assert y.shape == (*shape[:-1], 96)
            assert torch.allclose(y.float(), lin(x).float(), rtol=2 ** -7, atol=1e-6)
    assert calls == [(1, 128), (4, 128), (32, 128)]
    # Layers whose input width the kernel does not take (K % 32 != 0) stay nn.Linear.
    model = nn.Sequential(nn.Linear(64, 64), nn.Sequential(nn.Linear(64, 48), nn.ReLU()), nn.Linear(48, 30)).bfloat16()
    assert cpu_linear.adapt_linears(model, "amx", small_gemm) == 2
    assert type(model[2]) is nn.Linear and isinstance(model[0], cpu_linear.SmallBatchLinear)
    with torch.inference_mode():
        assert model(torch.randn(5, 64).bfloat16()).shape == (5, 30)


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


def test_padded_rows_limits_the_gemm_shapes():
    from engine.cpu_linear import padded_rows

    assert [padded_rows(r) for r in (1, 32, 33, 100, 512, 513, 1000, 2048)] == [32, 32, 64, 128, 512, 640, 1024,
                                                                               2048]
    assert len({padded_rows(r) for r in range(33, 2049)}) == 27
    assert all(padded_rows(r) - r < (32 if r <= 512 else 128) for r in range(1, 4096))
    assert all(padded_rows(r) <= 1.25 * r for r in range(128, 4096))


@pytest.mark.parametrize("rows", [33, 57, 130, 600])
def test_bucketed_linear_gives_the_rows_of_f_linear(rows):
    from engine.cpu_linear import bucketed_linear

    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=g).to(torch.bfloat16)
    b = torch.randn(96, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, 64, generator=g).to(torch.bfloat16)
    y = bucketed_linear(x, w, b)
    assert y.shape == (rows, 96) and y.is_contiguous()
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=0.01, atol=0.02)
