"""How much memory each model's KV cache gets: the one sizing rule for a lone engine and for a
worker hosting several.

On CUDA, what is free once every model's weights are loaded, less the share of the device kept
back by ``gpu_memory_utilization``, is split between the models (``share`` each, the unset
shares splitting the rest equally). On CPU there is no free-memory reading worth trusting (the OS
pages lazily and other processes come and go), so each model gets a fixed budget.
A model's own fixed budget (``kv_cache_memory``) wins on either device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_CPU_KV_BYTES = 512 * 2**20  # per model on CPU, unless configured


@dataclass(frozen=True)
class KVRequest:
    """One model's say in the split: a fixed budget in bytes, or a share of the CUDA budget."""

    fixed_bytes: int | None = None
    share: float | None = None


def kv_budgets(device: torch.device, requests: dict[str, KVRequest], gpu_memory_utilization: float = 0.9,
               cpu_default: int = DEFAULT_CPU_KV_BYTES) -> dict[str, int]:
    """Bytes of KV cache per model name. Call on CUDA only after every model's weights loaded."""
    if device.type != "cuda":
        return {n: r.fixed_bytes or cpu_default for n, r in requests.items()}
    free, total = torch.cuda.mem_get_info(device)
    usable = max(0, int(free - total * (1.0 - gpu_memory_utilization)))
    shares = {n: r.share or 0.0 for n, r in requests.items() if r.fixed_bytes is None}
    unset = [n for n, s in shares.items() if s == 0.0]
    rest = max(0.0, 1.0 - sum(shares.values()))
    for n in unset:
        shares[n] = rest / len(unset)
    return {n: r.fixed_bytes or int(usable * shares[n]) for n, r in requests.items()}
