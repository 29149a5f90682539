"""How the worker's own exceptions reach clients: the engine's and the manager's error types in
the shared error table (one table for the raw-ASGI routes and the FastAPI routes)."""

from __future__ import annotations

from PIL.Image import DecompressionBombError

from clusterkit.errors import APIError, ErrorTable
from engine.sampling_params import InvalidParameter

from .vllm_manager import UnknownModel

ERRORS = ErrorTable({
    InvalidParameter: lambda e: APIError(400, str(e), e.param),
    UnknownModel: lambda e: APIError(404, f"The model `{e.args[0]}` does not exist.", "model", "model_not_found"),
    # PIL refuses images declaring over ~179M pixels as soon as it reads their header, wherever
    # that happens: such an image is too large, never a server error.
    DecompressionBombError: lambda e: APIError(413, f"image too large: {e}", "messages", "image_too_large"),
})
