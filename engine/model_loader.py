"""Resolving model sources, devices and dtypes, and loading Hugging Face models."""

from __future__ import annotations

import os

import torch


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the model and the reason in one line."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype: str, hf_config, device: torch.device) -> torch.dtype:
    """``auto`` takes the checkpoint's dtype; half precision on CPU becomes bfloat16 (fast there)."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        return _DTYPES[dtype]
    cfg_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(cfg_dtype, str):
        cfg_dtype = _DTYPES.get(cfg_dtype, torch.float32)
    if cfg_dtype is None:
        cfg_dtype = torch.float32
    if device.type == "cpu" and cfg_dtype == torch.float16:
        return torch.bfloat16
    return cfg_dtype


def check_source(source: str) -> None:
    """Fail early, with a clear message, for sources that are neither a directory nor a hub id."""
    if os.path.isdir(source):
        return
    looks_local = source.startswith((".", "/", "~")) or os.sep in source.strip("/").replace("/", "", 1)
    if looks_local:
        raise ModelLoadError(f"model {source!r}: no such directory")


def load_error(source: str, exc: BaseException) -> ModelLoadError:
    where = "local directory" if os.path.isdir(source) else "hub id (is the hub reachable?)"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelLoadError(f"model {source!r} ({where}) failed to load: {first}")
