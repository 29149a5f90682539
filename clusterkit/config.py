"""Configuration plumbing: the YAML file, byte sizes, and the error that ends a process with a
one-line reason."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BeforeValidator, ValidationError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


class ConfigError(ValueError):
    """Bad configuration; the message is the one-line reason printed on exit."""


def parse_bytes(value: int | str | None) -> int | None:
    """``512MiB``, ``2GB``, ``1048576`` -> bytes."""
    if value is None or isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"not a size: {value!r} (use e.g. 512MiB, 2GiB or a byte count)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


ByteSize = Annotated[int, BeforeValidator(parse_bytes)]
"""A pydantic field type taking ``512MiB``-style sizes or byte counts."""


def load_yaml(path: str | None) -> dict[str, Any]:
    """The config file's mapping ({} without a file); ConfigError if missing or malformed."""
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


def config_error(e: ValidationError, where: str) -> ConfigError:
    """A settings model's validation error as one line naming the setting."""
    first = e.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        return ConfigError(f"unknown {where} setting {loc!r}")
    msg = str(first.get("msg")).removeprefix("Value error, ")
    return ConfigError(f"{where} setting {loc}: {msg}" if loc else f"{where} settings: {msg}")


def merge(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """Later layers win; ``None`` values in a layer mean "not given" (unset flags)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for k, v in (layer or {}).items():
            if v is not None:
                out[k] = v
    return out
