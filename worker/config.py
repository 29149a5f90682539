"""Worker settings: defaults < config.yaml < environment (secrets) < command-line flags.

The settings are pydantic models that forbid unknown keys, so a typo in config.yaml is a one-line
error at start-up rather than a setting silently left at its default."""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from clusterkit.config import ByteSize, ConfigError, config_error, merge, parse_bytes
from clusterkit.http_options import ServerOptions, StringList
from engine import EngineConfig
from engine.kv_budget import DEFAULT_CPU_KV_BYTES, KVRequest

from .template_process import check_template_kwargs

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
ToolParserName = Literal["hermes", "llama3_json", "mistral"]  # worker/tool_parsers
ReasoningParserName = Literal["qwen3", "deepseek_r1"]  # worker/reasoning_parsers
# Engine settings config.yaml may give (engine_defaults, or per model); the rest are the worker's.
# reasoning_parser is the worker's (resolved per model, then handed to the engine).
ENGINE_KEYS = {f.name for f in fields(EngineConfig)} - {"model", "device", "gpu_memory_utilization", "reasoning_parser"}


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Settings):
    """One served model: its name, where it comes from, and its engine settings."""

    name: str = Field(min_length=1)
    source: str = Field(min_length=1)
    dtype: Dtype | None = None
    max_model_len: int | None = Field(None, ge=1)
    kv_cache_memory: ByteSize | None = Field(None, gt=0)  # bytes (CPU; on CUDA overrides the share)
    num_kv_blocks: int | None = Field(None, ge=1)
    gpu_memory_share: float | None = Field(None, gt=0, le=1)  # of the CUDA KV budget; default: equal split
    max_num_seqs: int | None = Field(None, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    block_size: int | None = Field(None, ge=1)
    enable_prefix_caching: bool | None = None
    chat_template: str | None = None  # a template string, or a path to a .jinja file
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)  # template variables; a request's win
    enable_auto_tool_choice: bool | None = None  # default: the worker's
    tool_call_parser: ToolParserName | None = None  # default: the worker's
    reasoning_parser: ReasoningParserName | None = None  # default: the worker's
    generation_config: str | None = None  # default: the worker's ("auto")
    served_model_name: StringList = Field(default_factory=list)  # more names it answers to

    def kv_request(self) -> KVRequest:
        return KVRequest(self.kv_cache_memory, self.gpu_memory_share)

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_template_kwargs(v, "chat_template_kwargs")
        try:
            json.dumps(v)  # they travel to the renderer processes as JSON
        except (TypeError, ValueError) as e:
            raise ValueError(f"chat_template_kwargs must be JSON data: {e}") from None
        return v

    def read_chat_template(self) -> str | None:
        """The configured template: a file's text when it names a template file, else itself."""
        v = self.chat_template
        if v is not None and len(v) < 4096 and Path(v).suffix in (".jinja", ".j2", ".txt") and Path(v).is_file():
            return Path(v).read_text()
        return v


class WorkerConfig(_Settings, ServerOptions):
    """Everything ``python -m worker`` needs (each setting is documented in config.yaml)."""

    models: list[ModelSettings] = Field(default_factory=list)
    host: str = "0.0.0.0"
    port: int = Field(8100, ge=0, le=65535)
    manager_url: str | None = None
    public_url: str | None = None
    worker_token: str | None = Field(None, repr=False)  # a secret: never in a repr or log
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Dtype = "auto"
    heartbeat_interval: float = Field(5.0, gt=0)
    # KV-aware routing: with a manager, publish each generation engine's prefix-cache changes
    # (worker/kv_publisher.py) every kv_events_interval seconds.
    kv_events: bool = True
    kv_events_interval: float = Field(0.1, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    cpu_kv_cache_memory: ByteSize = Field(DEFAULT_CPU_KV_BYTES, gt=0)  # per model, when it sets none
    max_body_bytes: ByteSize = Field(32 * 2**20, gt=0)
    media_dirs: list[str] = Field(default_factory=list)  # file:// images are read only under these
    allowed_image_domains: list[str] = Field(default_factory=list)  # http(s) images only from these
    max_image_bytes: ByteSize = Field(20 * 2**20, gt=0)  # per encoded image
    max_image_pixels: int = Field(16_000_000, gt=0)  # per decoded image
    enable_auto_tool_choice: bool = False  # tool_choice "auto" (per model in models[])
    tool_call_parser: ToolParserName | None = None  # how "auto" reads calls (per model in models[])
    reasoning_parser: ReasoningParserName | None = None  # thinking -> reasoning_content (per model in models[])
    generation_config: str = Field("auto", min_length=1)  # auto | vllm | a directory (per model in models[])
    served_model_name: StringList = Field(default_factory=list)  # more names of the one model served
    # Chat templates are code (worker/template_renderer.py): a request's own only when trusted; every
    # render in a pool of renderer processes, with a time limit.
    trust_request_chat_template: bool = False
    chat_template_timeout: float = Field(10.0, gt=0)  # seconds per render; over it: 400
    chat_template_processes: int = Field(2, ge=1)  # renderer processes kept warm
    chat_template_max_processes: int = Field(4, ge=1)  # the pool grows to this while renders wait
    engine_defaults: dict[str, Any] = Field(default_factory=dict)

    @field_validator("engine_defaults")
    @classmethod
    def _engine_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - ENGINE_KEYS)
        if unknown:
            raise ValueError(f"unknown engine settings {unknown}")
        return v

    @field_validator("models")
    @classmethod
    def _unique(cls, v: list[ModelSettings]) -> list[ModelSettings]:
        names = [m.name for m in v]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate served model names: {names}")
        return v

    @model_validator(mode="after")
    def _tool_choice(self) -> WorkerConfig:
        for m in self.models:
            if self.auto_tool_choice(m) and not self.tool_parser(m):
                raise ValueError(f"model {m.name!r}: enable_auto_tool_choice needs tool_call_parser "
                                 f"(hermes, llama3_json or mistral)")
        return self

    @model_validator(mode="after")
    def _template_pool(self) -> WorkerConfig:
        if self.chat_template_max_processes < self.chat_template_processes:
            raise ValueError(f"chat_template_max_processes ({self.chat_template_max_processes}) is below "
                             f"chat_template_processes ({self.chat_template_processes})")
        return self

    @model_validator(mode="after")
    def _generation_configs(self) -> WorkerConfig:
        for m in self.models:
            mode = self.generation_config_of(m)
            if mode not in ("auto", "vllm") and not (Path(mode) / "generation_config.json").is_file():
                raise ValueError(f"model {m.name!r}: generation_config must be auto, vllm or a directory "
                                 f"holding generation_config.json, got {mode!r}")
        return self

    @model_validator(mode="after")
    def _served_names(self) -> WorkerConfig:
        if self.served_model_name and len(self.models) != 1:
            raise ValueError("served_model_name (--served-model-name) needs exactly one served model; "
                             "give served_model_name per model under worker.models instead")
        owner: dict[str, str] = {}
        for m in self.models:
            for n in self.served_names(m):
                if not n.strip():
                    raise ValueError(f"model {m.name!r}: empty served_model_name")
                if owner.setdefault(n, m.name) != m.name:
                    raise ValueError(f"served model name {n!r} is used by models {owner[n]!r} and {m.name!r}")
        return self

    def served_names(self, m: ModelSettings) -> list[str]:
        """Every name ``m`` answers to: its own name first, then its served_model_name aliases."""
        extra = self.served_model_name if len(self.models) == 1 else []
        return list(dict.fromkeys([m.name, *m.served_model_name, *extra]))

    def auto_tool_choice(self, m: ModelSettings) -> bool:
        return self.enable_auto_tool_choice if m.enable_auto_tool_choice is None else m.enable_auto_tool_choice

    def tool_parser(self, m: ModelSettings) -> str | None:
        return m.tool_call_parser or self.tool_call_parser

    def reasoning_parser_of(self, m: ModelSettings) -> str | None:
        return m.reasoning_parser or self.reasoning_parser

    def generation_config_of(self, m: ModelSettings) -> str:
        return m.generation_config or self.generation_config

    @property
    def publishes_kv_events(self) -> bool:
        """Whether the engines record KV events for the manager (kv_events, and a manager)."""
        return self.kv_events and bool(self.manager_url)

    def engine_config(self, m: ModelSettings, device: str) -> EngineConfig:
        """The engine settings of one model: engine defaults, then the model's own, then worker-wide."""
        opts = {k: v for k, v in self.engine_defaults.items() if v is not None}
        opts.update(m.model_dump(include=ENGINE_KEYS, exclude_none=True))
        if m.dtype is None and self.dtype != "auto":
            opts["dtype"] = self.dtype
        if "kv_cache_memory" in opts:
            opts["kv_cache_memory"] = parse_bytes(opts["kv_cache_memory"])
        if self.publishes_kv_events:
            opts["enable_kv_events"] = True
        return EngineConfig(model=m.source, device=device, gpu_memory_utilization=self.gpu_memory_utilization,
                            reasoning_parser=self.reasoning_parser_of(m), **opts)


def parse_model_spec(spec: str) -> tuple[str, str]:
    """``[name=]source`` -> (served name, source); the name defaults to the source as typed."""
    spec = spec.strip()
    if not spec:
        raise ConfigError("empty model spec in --models")
    if "=" in spec:
        name, source = spec.split("=", 1)
        if not name or not source:
            raise ConfigError(f"bad model spec {spec!r}: use [name=]source")
        return name, source
    return spec, spec


def _models(file_models: list[dict], spec: str | None) -> list[dict]:
    """The served models: ``--models`` when given (file entries with the same name or source
    contribute their settings), else the file's list."""
    entries = []
    for e in file_models:
        if not isinstance(e, dict) or "source" not in e:
            raise ConfigError(f"model entry {e!r} has no source")
        entries.append({"name": e["source"], **e})
    if not spec:
        return entries
    by_name = {e["name"]: e for e in entries}
    by_source = {e["source"]: e for e in entries}
    out = []
    for part in spec.split(","):
        name, source = parse_model_spec(part)
        base = by_name.get(name) or by_source.get(source) or {}
        out.append({**base, "name": name, "source": source})
    return out


def build_config(file_data: dict[str, Any], flags: dict[str, Any], env: dict[str, str] | None = None
                 ) -> WorkerConfig:
    """Merge the file's ``worker:`` and ``engine_defaults:`` sections, secrets from the environment
    and flags (flags win); ConfigError with a one-line reason on anything invalid."""
    env = os.environ if env is None else env
    section = dict(file_data.get("worker") or {})
    models = _models(section.pop("models", None) or [], flags.get("models"))
    flags = {k: v for k, v in flags.items() if k in WorkerConfig.model_fields and k != "models"}
    if not models:
        raise ConfigError("no models: pass --models or list them under worker.models in the config")
    secrets = {"worker_token": env["WORKER_TOKEN"]} if env.get("WORKER_TOKEN") else {}
    values = merge(section, secrets, flags)
    values["models"] = models
    values["engine_defaults"] = dict(file_data.get("engine_defaults") or {})
    try:
        return WorkerConfig.model_validate(values)
    except ValidationError as e:
        raise config_error(e, "worker") from None
