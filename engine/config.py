"""Engine configuration: one frozen dataclass passed down explicitly to every component."""

from __future__ import annotations

from dataclasses import dataclass

from .reasoning import check_parser


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one engine instance (one model).

    Exactly one of ``num_kv_blocks`` / ``kv_cache_memory`` may be set; when neither is, the KV pool is
    sized from free device memory on CUDA, or from a conservative default budget on CPU.
    """

    model: str
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None  # bytes
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    trust_remote_code: bool = False
    # CPU GEMMs of bfloat16/float16 models: "amx" runs decode-sized ones (<= 32 rows) of bfloat16
    # models on the AMX kernel of engine/csrc/small_gemm.cpp (1.4-1.6x F.linear's weight bandwidth
    # here) and the rest natively, "native" all in the model dtype, "fp32" in float32 (weights
    # upcast once); "auto": amx where the CPU has AMX-BF16, else fp32 only where the CPU lacks
    # native half math.
    cpu_linear: str = "auto"
    # Decode attention: "native" (CPU kernel of engine/csrc reading K/V blocks in place), "torch"
    # (gather + SDPA, any device), "triton" (engine/triton_attention.py: decode, prefill and KV
    # write as Triton kernels; on CPU only under TRITON_INTERPRET=1, for tests), "auto": triton on
    # CUDA, native on CPU when it builds, else torch.
    attention_backend: str = "auto"
    # CPU: Llama-family decoder layers (Llama, Mistral, Qwen2, Qwen3) run their elementwise steps
    # as fused kernels and q/k/v (gate/up) as one GEMM (engine/fused_layers.py); False keeps
    # transformers' module forward. The 150M benchmark Llama at 8 rows: see the README.
    fuse_layers: bool = True
    # Run one full dummy batch at start-up (LLMEngine._warm_up), so the first real burst does not
    # pay first-use costs (GEMM kernel builds, allocator growth); nothing of it is kept or counted.
    warmup: bool = True
    # CPU: keep freed activation memory in the process instead of faulting it in again every step
    # (glibc malloc settings, process-wide: engine/host_memory.py). ~20% faster long prefills here.
    keep_freed_memory: bool = True
    # "qwen3" or "deepseek_r1": a request's structured-output grammar then constrains only the
    # answer, after the model's <think>...</think> block (engine/reasoning.py).
    reasoning_parser: str | None = None
    # Record prefix-cache changes (engine/kv_events.py) for LLMEngine.take_kv_events().
    enable_kv_events: bool = False

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.num_kv_blocks is not None and self.kv_cache_memory is not None:
            raise ValueError("give at most one of num_kv_blocks and kv_cache_memory")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.cpu_linear not in ("auto", "amx", "native", "fp32"):
            raise ValueError(f"cpu_linear must be auto, amx, native or fp32, got {self.cpu_linear!r}")
        if self.attention_backend not in ("auto", "native", "torch", "triton"):
            raise ValueError("attention_backend must be auto, native, torch or triton, "
                             f"got {self.attention_backend!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        check_parser(self.reasoning_parser)
