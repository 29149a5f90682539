"""VLLMManager: one engine per served model, loaded in turn, sharing the device's memory."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from functools import cached_property
from pathlib import Path

from tqdm.auto import tqdm

from engine import SamplingParams, StructuredOutputsParams
from engine.async_engine import AsyncEngine
from engine.async_pooling import AsyncPoolingEngine
from engine.kv_budget import kv_budgets
from engine.llm_engine import LLMEngine
from engine.model_loader import ModelLoadError, resolve_device
from engine.model_runner import ModelRunner
from engine.multimodal import ImagePreprocessor
from engine.outputs import RequestOutput
from engine.pooling import PoolingEngine, is_embedding_model

from .config import ModelSettings, WorkerConfig
from .generation_defaults import sampling_defaults
from .template_renderer import TemplateRenderer

log = logging.getLogger(__name__)

IDLE_STATS = {"num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0}


class UnknownModel(KeyError):
    """No engine on this worker serves the requested model name."""


class ServedModel:
    """A model as the API sees it: what it is called, what it accepts, and the calls the
    serving layer makes (generate, embed, validate), so nothing reaches into its engine."""

    def __init__(self, name: str, source: str, engine: AsyncEngine | AsyncPoolingEngine, tokenizer,
                 max_model_len: int, vocab_size: int, chat_template: str | None = None, images=None,
                 kv_capacity_tokens: int = 0, tool_call_parser: str | None = None,
                 enable_auto_tool_choice: bool = False, reasoning_parser: str | None = None):
        self.name, self.source, self.tokenizer = name, source, tokenizer
        self.names = [name]  # every name it answers to (served_model_name aliases after its own)
        self.kind = "embed" if isinstance(engine, AsyncPoolingEngine) else "generate"
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self.chat_template = chat_template
        self.images: ImagePreprocessor | None = images  # vision-language models only
        self.kv_capacity_tokens = kv_capacity_tokens
        self.tool_call_parser, self.enable_auto_tool_choice = tool_call_parser, enable_auto_tool_choice
        self.reasoning_parser = reasoning_parser  # worker/reasoning_parsers name; None: no thinking split
        self.created = int(time.time())
        self.sampling_defaults: dict = {}  # request defaults from generation_config (generation_defaults.py)
        self.chat_template_kwargs: dict = {}  # template variables from config; a request's own win
        self.renderer: TemplateRenderer | None = None  # where its chat templates run (the worker's pool)
        self._engine = engine

    # -- generation models ------------------------------------------------------------------------
    def validate_prompt(self, ids: list[int], params: SamplingParams) -> None:
        """``InvalidParameter`` for prompts that cannot run (context length, vocabulary)."""
        self._engine.engine.validate_prompt(ids, params)

    def truncate_prompt(self, ids: list[int], k: int | None) -> list[int]:
        """The prompt ``truncate_prompt_tokens=k`` leaves (the engine's rule; ``InvalidParameter``
        naming the field for a bad k)."""
        if k is None:
            return ids
        return self._engine.engine.truncate_prompt(ids, SamplingParams(max_tokens=None, truncate_prompt_tokens=k))

    async def compile_grammar(self, spec: StructuredOutputsParams) -> None:
        """Compile an output constraint off the event loop and the engine loop (then cached);
        ``InvalidParameter`` when it does not compile."""
        await self._engine.compile_grammar(spec)

    def generate(self, ids: list[int], params: SamplingParams, prompt: str | None = None,
                 mm=None, cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Engine outputs of one request; leaving the iteration early aborts it. ``cache_salt``
        (vLLM's): the request reuses cached KV only of requests that gave the same salt."""
        salt = hashlib.sha256(cache_salt.encode()).digest() if cache_salt else b""
        return self._engine.generate(prompt=prompt, prompt_token_ids=ids, params=params, mm=mm,
                                     prefix_salt=salt)

    @property
    def async_engine(self) -> AsyncEngine:
        """The engine loop itself, for what feeds on it (the KV event publisher)."""
        return self._engine

    # -- embedding models -------------------------------------------------------------------------
    @property
    def normalizes(self) -> bool:
        """Whether the model's embeddings are unit vectors."""
        return self.kind == "embed" and self._engine.engine.normalize

    async def embed(self, batch: list[list[int]]) -> list[list[float]]:
        return await self._engine.embed(batch)

    # -- KV-aware routing (clusterkit/kv_wire.py) -------------------------------------------------
    @property
    def kv_block_size(self) -> int | None:
        """Tokens per KV block of the engine (None: an embedding model)."""
        return self._engine.engine.kv.block_size if self.kind == "generate" else None

    @property
    def kv_root(self) -> str | None:
        """Hex of the engine's model root, the seed of its block-hash chains (None: embeddings)."""
        return self._engine.engine.kv.model_root.hex() if self.kind == "generate" else None

    @cached_property
    def tokenizer_digest(self) -> str | None:
        """Digest of what renders and tokenizes this model's prompts (``/tokenizer_info``'s); taken
        once, after loading (the tokenizer, templates and template variables never change). None:
        its tokenizer cannot be serialized for routers."""
        from .tokenizer_info import NoTokenizerJSON, payload  # it imports prompts, which imports this module

        try:
            return payload(self)["digest"]
        except NoTokenizerJSON:
            return None

    # -- both -------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Load for heartbeats and metrics (running, waiting, KV usage, cache and preemption counts)."""
        return self._engine.stats() if self.kind == "generate" else IDLE_STATS

    @property
    def is_alive(self) -> bool:
        return self._engine.is_alive

    def shutdown(self) -> None:
        self._engine.shutdown()


class VLLMManager:
    """Owns every engine of a worker and the split of memory between them.

    Every model's weights load first; then each generation model gets its KV budget from
    :func:`engine.kv_budget.kv_budgets` (on CUDA a share of what is left, on CPU a fixed size).
    The split and each model's KV capacity in tokens are logged.
    """

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.models: dict[str, ServedModel] = {}
        self.by_name: dict[str, ServedModel] = {}  # every served name, aliases included
        # chat templates render in these processes; the app's lifespan starts and stops them
        self.renderer = TemplateRenderer(config.chat_template_processes, config.chat_template_max_processes,
                                         config.chat_template_timeout, config.trust_request_chat_template)

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
        budgets = kv_budgets(device, {n: m.kv_request() for n, (m, _) in runners.items()},
                             cfg.gpu_memory_utilization, cfg.cpu_kv_cache_memory)
        if budgets:
            log.info("%s KV split: %s", device.type.upper(),
                     ", ".join(f"{n}={b / 2**20:.0f} MiB" for n, b in budgets.items()))
        for name, (m, runner) in runners.items():
            ecfg = cfg.engine_config(m, str(device))
            if m.num_kv_blocks is None:
                ecfg = replace(ecfg, kv_cache_memory=budgets[name])
            try:
                eng = LLMEngine(ecfg, runner=runner)
            except ValueError as e:
                raise ModelLoadError(f"model {name!r}: {e}") from e
            template = m.read_chat_template() or getattr(eng.tokenizer, "chat_template", None)
            cap = eng.num_kv_blocks * ecfg.block_size
            images = ImagePreprocessor(m.source, runner.hf_config) if runner.is_vl else None
            self.models[name] = ServedModel(name, m.source, AsyncEngine(eng), eng.tokenizer, eng.max_model_len,
                                            eng.vocab_size, template, images, cap, cfg.tool_parser(m),
                                            cfg.auto_tool_choice(m), cfg.reasoning_parser_of(m))
            self.models[name].sampling_defaults = sampling_defaults(m.source, cfg.generation_config_of(m))
            self.models[name].chat_template_kwargs = dict(m.chat_template_kwargs)
            self.models[name].renderer = self.renderer
            log.info("model %s: KV cache %.1f MiB = %d blocks = %d tokens, max_model_len %d",
                     name, eng.num_kv_blocks * runner.bytes_per_block / 2**20, eng.num_kv_blocks, cap,
                     eng.max_model_len)
        for name, (m, pe) in poolers.items():
            self.models[name] = ServedModel(name, m.source, AsyncPoolingEngine(pe), pe.tokenizer, pe.max_model_len,
                                            pe.hf_config.vocab_size)
            self.models[name].renderer = self.renderer  # /tokenize with messages answers from the renderer
            log.info("model %s: embedding model (%s pooling%s), max_model_len %d", name, pe.pooling,
                     ", normalized" if pe.normalize else "", pe.max_model_len)
        self.models = {m.name: self.models[m.name] for m in cfg.models}  # the configured order
        for m in cfg.models:
            served = self.models[m.name]
            served.names = cfg.served_names(m)
            self.by_name.update(dict.fromkeys(served.names, served))

    def get(self, name: str) -> ServedModel:
        try:
            return self.by_name[name]
        except KeyError:
            raise UnknownModel(name) from None

    @property
    def healthy(self) -> bool:
        return all(m.is_alive for m in self.models.values())

    def load_report(self) -> dict[str, dict]:
        """Per-model load for heartbeats and metrics."""
        return {name: m.stats() for name, m in self.models.items()}

    def shutdown(self) -> None:
        for m in self.models.values():
            m.shutdown()
