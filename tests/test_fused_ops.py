"""The fused elementwise kernels of engine/csrc/fused_ops.cpp against the transformers modules they
stand in for (LlamaRMSNorm, apply_rotary_pos_emb, SiLU * up), in float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from engine import cpu_kernels

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def ops():
    fused = cpu_kernels.load_fused()
    assert fused is not None, "the CPU kernels must build here (g++ is a test dependency)"
    return fused


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of the dtype's last place (same-sign values)."""
    bits = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
    return (a.view(bits).to(torch.int64) - b.view(bits).to(torch.int64)).abs()


def close_to_rounding(got: torch.Tensor, want: torch.Tensor, max_frac: float = 0.01) -> None:
    """A sum or an exp computed in another order before the rounding: bfloat16 values equal but for
    rare 1-ulp differences; float32 ones within 1e-6 relative (that float32 difference, carried
    through one or two more products)."""
    if got.dtype == torch.bfloat16:
        d = ulps_apart(got, want)
        assert d.max() <= 1, f"{d.max()} ulps apart"
        assert (d > 0).float().mean() <= max_frac
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 8, 37, 200])
def test_rms_norm_equals_the_module(ops, dtype, rows):
    g = torch.Generator().manual_seed(rows)
    dim = 1024
    norm = LlamaRMSNorm(dim, eps=1e-6).to(dtype)
    norm.weight.data = (torch.randn(dim, generator=g) * 0.3 + 1).to(dtype)
    x = (torch.randn(rows, dim, generator=g) * 3).to(dtype)
    y, h = ops.rms_norm(x, norm.weight.data, norm.variance_epsilon)
    assert h is x
    close_to_rounding(y, norm(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_keeps_the_rounded_residual(ops, dtype):
    g = torch.Generator().manual_seed(1)
    rows, dim = 12, 896
    norm = LlamaRMSNorm(dim, eps=1e-5).to(dtype)
    norm.weight.data = torch.rand(dim, generator=g).to(dtype)
    resid = torch.randn(rows, dim, generator=g).to(dtype)
    # a strided input (a view of a wider buffer), as the o_proj output never is but a caller may pass
    x = torch.randn(rows, 2 * dim, generator=g).to(dtype)[:, :dim]
    y, h = ops.rms_norm(x, norm.weight.data, norm.variance_epsilon, residual=resid)
    assert torch.equal(h, resid + x), "the residual add rounds as torch's"
    close_to_rounding(y, norm(resid + x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_rotary_equals_apply_rotary_pos_emb(ops, dtype, rows):
    g = torch.Generator().manual_seed(rows)
    heads, kv_heads, d = 4, 2, 64
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, generator=g).to(dtype)
    ang = torch.rand(rows, d // 2, generator=g) * 50
    emb = torch.cat([ang, ang], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    q = qkv[:, :heads * d].view(1, rows, heads, d).transpose(1, 2)
    k = qkv[:, heads * d:(heads + kv_heads) * d].view(1, rows, kv_heads, d).transpose(1, 2)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    v_before = qkv[:, (heads + kv_heads) * d:].clone()
    ops.rotary(qkv[:, :heads * d], heads, cos, sin)
    ops.rotary(qkv[:, heads * d:], kv_heads, cos, sin)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert torch.equal(qkv[:, (heads + kv_heads) * d:], v_before), "only the heads asked for move"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 16, 130])
def test_silu_mul_equals_the_mlp_activation(ops, dtype, rows):
    g = torch.Generator().manual_seed(rows)
    inter = 2816 + 8  # not a multiple of 16: the scalar tail too
    gu = (torch.randn(rows, 2 * inter, generator=g) * 4).to(dtype)
    want = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
    close_to_rounding(ops.silu_mul(gu[:, :inter], gu[:, inter:]), want, max_frac=0.002)


def test_rejects_what_it_cannot_take(ops):
    x = torch.randn(4, 64, dtype=torch.float16)
    with pytest.raises(ValueError):
        ops.rms_norm(x, torch.ones(64, dtype=torch.float16), 1e-6)
    with pytest.raises(ValueError):
        ops.rms_norm(torch.randn(4, 64), torch.ones(32), 1e-6)
    with pytest.raises(ValueError):
        ops.rotary(torch.randn(4, 64).t(), 1, torch.randn(64, 64), torch.randn(64, 64))
    with pytest.raises(ValueError):
        ops.silu_mul(torch.randn(4, 63), torch.randn(4, 62))
