"""Llama-family decoder layers run with fused kernels on CPU.

A transformers decoder layer runs ~45 small torch ops between its GEMMs (RMSNorm is 6, rotary 14,
the attention module's views and transposes, the residual adds) and goes through ~10 module calls.
At decode sizes every op costs its dispatch for microseconds of arithmetic: for the 150M benchmark
Llama at 8 rows that was ~8 ms of a ~25 ms step outside the GEMMs on a 2-core Xeon.
:class:`FusedDecoderLayer` takes over the layer's ``forward`` and runs, per layer:

    norm -> q/k/v projection (one GEMM over the concatenated weight) -> rotary, in place ->
    paged attention -> o_proj -> residual add + norm (one call) -> gate/up projection (one GEMM)
    -> SiLU * up (one call) -> down_proj -> residual add

with the elementwise steps of ``csrc/fused_ops.cpp``, which round as the modules do (see there).
The weights stay the model's own parameters: fusing q/k/v (and gate/up) concatenates them once
and makes each original parameter a view of the result, so nothing is held twice. The layers it
does not know (other architectures, vision-language decoders, partial rotary, another activation)
keep transformers' forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import attention
from .cpu_kernels import FusedOps, SmallGemmKernel
from .cpu_linear import SmallBatchLinear, small_batch_gemm

log = logging.getLogger(__name__)

LAYER_CLASSES = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


@dataclass
class FusedProjection:
    """Several linears of one input as one GEMM: ``weight`` [sum of outputs, in] (the original
    weights are views of it), ``bias`` likewise or None."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    bias32: torch.Tensor | None
    gemm: SmallGemmKernel | None

    @classmethod
    def join(cls, linears: list[nn.Module], gemm: SmallGemmKernel | None) -> FusedProjection:
        weight = torch.cat([m.weight.detach() for m in linears])
        has_bias = [m.bias is not None for m in linears]
        bias = torch.cat([m.bias.detach() for m in linears]) if all(has_bias) else None
        row = 0
        for m in linears:  # each parameter becomes a view of the joined tensor: no second copy
            n = m.weight.shape[0]
            m.weight.data = weight[row:row + n]
            if bias is not None:
                m.bias.data = bias[row:row + n]
            row += n
        return cls(weight, bias, None if bias is None else bias.float().contiguous(), gemm)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemm is not None and x.shape[0]:
            return small_batch_gemm(x, self.weight, self.bias, self.bias32, self.gemm)
        return F.linear(x, self.weight, self.bias)


def _rms(module: nn.Module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and getattr(module, "weight", None) is not None)


def _plain(module: nn.Module) -> bool:
    """A linear whose weight can be joined with its siblings' (model dtype, plain layout)."""
    return type(module) in (nn.Linear, SmallBatchLinear)


class FusedDecoderLayer:
    """The fused forward of one decoder layer (see the module docstring)."""

    def __init__(self, layer: nn.Module, ops: FusedOps, gemm: SmallGemmKernel | None):
        attn, mlp = layer.self_attn, layer.mlp
        self.ops = ops
        self.attn = attn
        self.ln1, self.ln2 = layer.input_layernorm, layer.post_attention_layernorm
        self.q_norm = getattr(attn, "q_norm", None)
        self.k_norm = getattr(attn, "k_norm", None)
        self.head_dim = attn.head_dim
        self.n_heads = attn.q_proj.out_features // self.head_dim
        self.n_kv = attn.k_proj.out_features // self.head_dim
        # Qwen2/Qwen3 keep it per layer (None on full-attention layers); Mistral reads its config.
        self.sliding_window = (attn.sliding_window if hasattr(attn, "sliding_window")
                               else getattr(attn.config, "sliding_window", None))
        projs = [attn.q_proj, attn.k_proj, attn.v_proj]
        biases = {m.bias is None for m in projs}
        self.qkv = FusedProjection.join(projs, gemm) if all(map(_plain, projs)) and len(biases) == 1 else None
        self.projs = projs
        self.o_proj, self.down_proj = attn.o_proj, mlp.down_proj
        gu = [mlp.gate_proj, mlp.up_proj]
        self.gate_up = FusedProjection.join(gu, gemm) if all(map(_plain, gu)) else None
        self.gate_proj, self.up_proj = gu

    @staticmethod
    def supports(layer: nn.Module, dtype: torch.dtype) -> bool:
        """Whether ``layer`` is a decoder layer this forward reproduces."""
        if type(layer).__name__ not in LAYER_CLASSES or dtype not in FusedOps.DTYPES:
            return False
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return False
        cfg = getattr(attn, "config", None)
        if getattr(cfg, "hidden_act", None) != "silu" or getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
            return False
        if not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
            return False
        if not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            return False
        if not (_rms(layer.input_layernorm) and _rms(layer.post_attention_layernorm)):
            return False
        return all(_rms(getattr(attn, n)) for n in ("q_norm", "k_norm") if hasattr(attn, n))

    def _head_norm(self, x: torch.Tensor, norm: nn.Module, heads: int) -> torch.Tensor:
        """Qwen3's per-head RMSNorm of a [T, heads * D] projection: a new contiguous tensor."""
        t = x.shape[0]
        y, _ = self.ops.rms_norm(x.reshape(t * heads, self.head_dim), norm.weight, norm.variance_epsilon)
        return y.view(t, heads * self.head_dim)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs) -> torch.Tensor:
        ops, hd = self.ops, self.head_dim
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        t = x.shape[0]
        h, _ = ops.rms_norm(x, self.ln1.weight, self.ln1.variance_epsilon)
        nq, nk = self.n_heads * hd, self.n_kv * hd
        if self.qkv is not None:
            qkv = self.qkv(h)
            q, k, v = qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:]
        else:
            q, k, v = (p(h) for p in self.projs)
        if self.q_norm is not None:
            q = self._head_norm(q, self.q_norm, self.n_heads)
            k = self._head_norm(k, self.k_norm, self.n_kv)
        cos, sin = position_embeddings
        cos, sin = cos.reshape(t, -1), sin.reshape(t, -1)
        ops.rotary(q, self.n_heads, cos, sin)
        ops.rotary(k, self.n_kv, cos, sin)
        # [1, heads, T, D] views, as transformers hands them to an attention function
        heads = [y.view(t, n, hd).transpose(0, 1).unsqueeze(0) for y, n in ((q, self.n_heads), (k, self.n_kv),
                                                                          (v, self.n_kv))]
        out, _ = attention.paged_attention(self.attn, *heads, None, scaling=self.attn.scaling,
                                           sliding_window=self.sliding_window, paged_attn=kwargs.get("paged_attn"))
        a = self.o_proj(out.view(t, nq))
        h, resid = ops.rms_norm(a, self.ln2.weight, self.ln2.variance_epsilon, residual=x)
        if self.gate_up is not None:
            gu = self.gate_up(h)
            inter = gu.shape[1] // 2
            act = ops.silu_mul(gu[:, :inter], gu[:, inter:])
        else:
            act = ops.silu_mul(self.gate_proj(h), self.up_proj(h))
        return (resid + self.down_proj(act)).view(shape)


def install(model: nn.Module, dtype: torch.dtype, ops: FusedOps, gemm: SmallGemmKernel | None = None) -> int:
    """Give every supported decoder layer of ``model`` the fused forward; the number of layers."""
    n = 0
    for layer in model.modules():
        if FusedDecoderLayer.supports(layer, dtype):
            layer.forward = FusedDecoderLayer(layer, ops, gemm).forward
            n += 1
    return n
