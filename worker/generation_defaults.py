"""Request defaults from a model's ``generation_config.json``, as ``vllm serve --generation-config``
reads them: ``auto`` (the default) takes the model's own file, ``vllm`` ignores it, and any other
value is a directory holding a ``generation_config.json``. A request's own value always wins."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# The sampling values vLLM takes from a generation config; max_new_tokens becomes max_tokens.
KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _read(directory: str) -> dict:
    path = Path(directory) / "generation_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    if Path(directory).exists():
        return {}
    try:  # a hub id: transformers fetches it (or fails offline: no defaults)
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(directory).to_diff_dict()
    except (OSError, ValueError):
        return {}


def sampling_defaults(source: str, mode: str = "auto") -> dict:
    """The request defaults a model's generation config gives: a subset of ``KEYS`` plus
    ``max_tokens``; empty for ``mode == "vllm"``."""
    if mode == "vllm":
        return {}
    try:
        data = _read(source if mode == "auto" else mode)
    except (OSError, ValueError) as e:
        raise ValueError(f"generation config of {source!r} ({mode}) could not be read: {e}") from e
    out = {k: data[k] for k in KEYS if data.get(k) is not None}
    if isinstance(data.get("max_new_tokens"), int) and data["max_new_tokens"] > 0:
        out["max_tokens"] = data["max_new_tokens"]
    return out
