"""Worker settings: defaults < config.yaml < environment (secrets) < command-line flags."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from engine import EngineConfig

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_bytes(value: int | str | None) -> int | None:
    """``512MiB``, ``2GB``, ``1048576`` -> bytes."""
    if value is None or isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"not a size: {value!r} (use e.g. 512MiB, 2GiB or a byte count)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


class ConfigError(ValueError):
    """Bad configuration; the message is the one-line reason printed on exit."""


@dataclass
class ModelSettings:
    """One served model: its name, where it comes from, and its engine settings."""

    name: str
    source: str
    dtype: str | None = None
    max_model_len: int | None = None
    kv_cache_memory: int | None = None  # bytes (CPU; on CUDA overrides the share)
    num_kv_blocks: int | None = None
    gpu_memory_share: float | None = None  # share of the KV budget on CUDA; default: equal split
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int | None = None
    enable_prefix_caching: bool | None = None
    chat_template: str | None = None  # a template string, or a path to a .jinja file


@dataclass
class WorkerConfig:
    """Everything ``python -m worker`` needs."""

    models: list[ModelSettings] = field(default_factory=list)
    host: str = "0.0.0.0"
    port: int = 8100
    manager_url: str | None = None
    public_url: str | None = None
    worker_token: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    heartbeat_interval: float = 5.0
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_memory: int = 256 * 2**20  # per model, when the model sets none
    max_body_bytes: int = 32 * 2**20
    media_dirs: list[str] = field(default_factory=list)  # file:// images are read only under these
    allowed_image_domains: list[str] = field(default_factory=list)  # http(s) images only from these
    max_image_bytes: int = 20 * 2**20  # per encoded image
    max_image_pixels: int = 16_000_000  # per decoded image
    engine_defaults: dict[str, Any] = field(default_factory=dict)

    def engine_config(self, m: ModelSettings, device: str) -> EngineConfig:
        """The engine settings of one model: defaults, then the model's own, then worker-wide."""
        opts: dict[str, Any] = {k: v for k, v in self.engine_defaults.items() if v is not None}
        for f in fields(ModelSettings):
            v = getattr(m, f.name)
            if f.name in {f2.name for f2 in fields(EngineConfig)} and v is not None:
                opts[f.name] = v
        opts["device"] = device
        if m.dtype is None:
            opts["dtype"] = self.dtype if self.dtype != "auto" else opts.get("dtype", "auto")
        opts["gpu_memory_utilization"] = self.gpu_memory_utilization
        if "kv_cache_memory" in opts:
            opts["kv_cache_memory"] = parse_bytes(opts["kv_cache_memory"])
        known = {f.name for f in fields(EngineConfig)}
        return EngineConfig(model=m.source, **{k: v for k, v in opts.items() if k in known})


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


def load_yaml(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping")
    return data


def _model_settings(entry: dict[str, Any]) -> ModelSettings:
    known = {f.name for f in fields(ModelSettings)}
    unknown = set(entry) - known
    if unknown:
        raise ConfigError(f"unknown model settings {sorted(unknown)} for {entry.get('name')!r}")
    entry = dict(entry)
    if "source" not in entry:
        raise ConfigError(f"model entry {entry} has no source")
    entry.setdefault("name", entry["source"])
    if entry.get("kv_cache_memory") is not None:
        entry["kv_cache_memory"] = parse_bytes(entry["kv_cache_memory"])
    return ModelSettings(**entry)


def build_config(file_data: dict[str, Any], flags: dict[str, Any], env: dict[str, str] | None = None
                 ) -> WorkerConfig:
    """Merge the file's ``worker:`` section, secrets from the environment and flags (flags win)."""
    env = os.environ if env is None else env
    section = dict(file_data.get("worker") or {})
    file_models = [_model_settings(m) for m in section.pop("models", None) or []]
    cfg_fields = {f.name for f in fields(WorkerConfig)} - {"models", "engine_defaults"}
    unknown = set(section) - cfg_fields
    if unknown:
        raise ConfigError(f"unknown worker settings in config: {sorted(unknown)}")
    cfg = WorkerConfig(engine_defaults=dict(file_data.get("engine_defaults") or {}), **section)
    if env.get("WORKER_TOKEN"):
        cfg.worker_token = env["WORKER_TOKEN"]
    for k, v in flags.items():
        if v is not None and k in cfg_fields:
            setattr(cfg, k, v)
    cfg.cpu_kv_cache_memory = parse_bytes(cfg.cpu_kv_cache_memory)
    cfg.max_body_bytes = parse_bytes(cfg.max_body_bytes)
    cfg.max_image_bytes = parse_bytes(cfg.max_image_bytes)
    if flags.get("models"):
        by_name = {m.name: m for m in file_models}
        by_source = {m.source: m for m in file_models}
        models = []
        for spec in str(flags["models"]).split(","):
            name, source = parse_model_spec(spec)
            base = by_name.get(name) or by_source.get(source)
            models.append(replace(base, name=name, source=source) if base else ModelSettings(name, source))
        cfg.models = models
    else:
        cfg.models = file_models
    if not cfg.models:
        raise ConfigError("no models: pass --models or list them under worker.models in the config")
    names = [m.name for m in cfg.models]
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate served model names: {names}")
    if cfg.heartbeat_interval <= 0:
        raise ConfigError("heartbeat_interval must be positive")
    return cfg
