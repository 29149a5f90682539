"""How the worker's own exceptions reach clients: the engine's and the manager's error types in
the shared error table (one table for the raw-ASGI routes and the FastAPI routes)."""

from __future__ import annotations

from clusterkit.errors import APIError, ErrorTable
from engine.sampling_params import InvalidParameter

from .vllm_manager import UnknownModel

ERRORS = ErrorTable({
    InvalidParameter: lambda e: APIError(400, str(e), e.param),
    UnknownModel: lambda e: APIError(404, f"The model `{e.args[0]}` does not exist.", "model", "model_not_found"),
})
