"""VLLMManager: one engine per served model, loaded in turn, sharing the device's memory."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from engine.async_engine import AsyncEngine
from engine.async_pooling import AsyncPoolingEngine
from engine.llm_engine import LLMEngine
from engine.model_loader import ModelLoadError, resolve_device
from engine.model_runner import ModelRunner
from engine.multimodal import ImagePreprocessor
from engine.pooling import PoolingEngine, is_embedding_model

from .config import ModelSettings, WorkerConfig

log = logging.getLogger(__name__)


class UnknownModel(KeyError):
    """No engine on this worker serves the requested model name."""


@dataclass
class ServedModel:
    """A model as the API sees it."""

    name: str
    source: str
    kind: str  # "generate" or "embed"
    max_model_len: int
    engine: AsyncEngine | AsyncPoolingEngine
    tokenizer: object
    chat_template: str | None = None
    kv_capacity_tokens: int = 0
    images: object = None  # ImagePreprocessor of a vision-language model
    created: int = 0

    def stats(self) -> dict:
        if self.kind != "generate":
            return {"num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0}
        return self.engine.stats()


def _read_template(value: str | None) -> str | None:
    if value is None:
        return None
    p = Path(value)
    if len(value) < 4096 and p.suffix in (".jinja", ".j2", ".txt") and p.is_file():
        return p.read_text()
    return value


class VLLMManager:
    """Owns every engine of a worker and the split of memory between them.

    On CUDA every model's weights load first; then ``gpu_memory_utilization`` of the device, less
    what is already used, is split across generation models (``gpu_memory_share`` each, equal by
    default) as KV cache. On CPU each model gets its own ``kv_cache_memory`` (or the worker-wide
    default). The split and each model's KV capacity in tokens are logged.
    """

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.models: dict[str, ServedModel] = {}

    def load_all(self) -> None:
        cfg = self.config
        device = resolve_device(cfg.device)
        runners: dict[str, tuple[ModelSettings, ModelRunner]] = {}
        poolers: dict[str, tuple[ModelSettings, PoolingEngine]] = {}
        for m in tqdm(cfg.models, desc="loading models", unit="model"):
            ecfg = cfg.engine_config(m, str(device))
            try:
                if Path(m.source).is_dir() and is_embedding_model(m.source):
                    poolers[m.name] = (m, PoolingEngine(ecfg))
                else:
                    runners[m.name] = (m, ModelRunner(ecfg))
            except ModelLoadError as e:
                raise ModelLoadError(f"model {m.name!r}: {e}") from e
            except Exception as e:
                raise ModelLoadError(f"model {m.name!r} ({m.source}) failed to load: "
                                     f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        budgets = self._kv_budgets(device, runners)
        for name, (m, runner) in runners.items():
            ecfg = cfg.engine_config(m, str(device))
            if m.num_kv_blocks is None:
                ecfg = replace(ecfg, kv_cache_memory=budgets[name])
            try:
                eng = LLMEngine(ecfg, runner=runner)
            except ValueError as e:
                raise ModelLoadError(f"model {name!r}: {e}") from e
            template = _read_template(m.chat_template) or getattr(eng.tokenizer, "chat_template", None)
            cap = eng.num_kv_blocks * ecfg.block_size
            images = ImagePreprocessor(m.source, runner.hf_config) if runner.is_vl else None
            self.models[name] = ServedModel(name=name, source=m.source, kind="generate",
                                            max_model_len=eng.max_model_len, engine=AsyncEngine(eng),
                                            tokenizer=eng.tokenizer, chat_template=template,
                                            kv_capacity_tokens=cap, images=images)
            log.info("model %s: KV cache %.1f MiB = %d blocks = %d tokens, max_model_len %d",
                     name, eng.num_kv_blocks * runner.bytes_per_block / 2**20, eng.num_kv_blocks, cap,
                     eng.max_model_len)
        for name, (m, pe) in poolers.items():
            self.models[name] = ServedModel(name=name, source=m.source, kind="embed",
                                            max_model_len=pe.max_model_len,
                                            engine=AsyncPoolingEngine(pe), tokenizer=pe.tokenizer)
            log.info("model %s: embedding model (%s pooling%s), max_model_len %d", name, pe.pooling,
                     ", normalized" if pe.normalize else "", pe.max_model_len)
        # Keep the configured order for listings.
        order = [m.name for m in cfg.models]
        self.models = {n: self.models[n] for n in order}

    def _kv_budgets(self, device: torch.device, runners) -> dict[str, int]:
        cfg = self.config
        if not runners:
            return {}
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            usable = max(0, int(free - total * (1 - cfg.gpu_memory_utilization)))
            shares = {n: (m.gpu_memory_share or 0.0) for n, (m, _) in runners.items()}
            unset = [n for n, s in shares.items() if s == 0.0]
            rest = max(0.0, 1.0 - sum(shares.values()))
            for n in unset:
                shares[n] = rest / len(unset)
            budgets = {n: (m.kv_cache_memory or int(usable * shares[n])) for n, (m, _) in runners.items()}
            log.info("CUDA KV split of %.1f GiB: %s", usable / 2**30,
                     ", ".join(f"{n}={b / 2**30:.2f} GiB" for n, b in budgets.items()))
        else:
            budgets = {n: (m.kv_cache_memory or cfg.cpu_kv_cache_memory) for n, (m, _) in runners.items()}
            log.info("CPU KV split: %s", ", ".join(f"{n}={b / 2**20:.0f} MiB" for n, b in budgets.items()))
        return budgets

    def get(self, name: str) -> ServedModel:
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModel(name) from None

    @property
    def healthy(self) -> bool:
        return all(m.engine.is_alive for m in self.models.values())

    def load_report(self) -> dict[str, dict]:
        """Per-model load for heartbeats and metrics."""
        return {name: m.stats() for name, m in self.models.items()}

    def shutdown(self) -> None:
        for m in self.models.values():
            m.engine.shutdown()
