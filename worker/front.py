"""The worker's inference routes as a raw ASGI layer in front of the FastAPI app.

``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` carry nearly all traffic, and
the worker's HTTP thread shares the GIL with the engine loop: every microsecond spent here is one
the engine does not get. So these skip FastAPI's per-request machinery (routing, dependency
resolution, ``jsonable_encoder``, response classes) and validate the body straight from JSON with
pydantic. Everything else (models list, tokenize, health, metrics) goes on to FastAPI.

A client that leaves is noticed by :class:`~worker.asgi.DisconnectWatch`, which cancels the
request's task: that cancellation is what aborts the engine request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from pydantic import BaseModel, ValidationError

from engine.sampling_params import InvalidParameter

from . import serving
from .asgi import (DisconnectWatch, bearer_of, dumps, key_allowed, read_body, send_error, send_internal_error,
                   send_json)
from .errors import APIError, validation_error
from .media import MediaPolicy
from .metrics import WorkerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from .vllm_manager import ServedModel, UnknownModel, VLLMManager

log = logging.getLogger("worker")

SSE_START = {"type": "http.response.start", "status": 200,
             "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                         (b"x-accel-buffering", b"no")]}

ROUTES: dict[str, tuple[type[BaseModel], str]] = {
    "/v1/chat/completions": (ChatCompletionRequest, "generate"),
    "/v1/completions": (CompletionRequest, "generate"),
    "/v1/embeddings": (EmbeddingRequest, "embed"),
}


class InferenceRoutes:
    """ASGI middleware serving :data:`ROUTES`; every other request passes to ``app``."""

    def __init__(self, app, *, manager: VLLMManager, metrics: WorkerMetrics, media: MediaPolicy,
                 tokens: list[str], max_body_bytes: int):
        self.app, self.manager, self.metrics, self.media = app, manager, metrics, media
        self.tokens, self.max_body_bytes = tokens, max_body_bytes

    async def __call__(self, scope, receive, send):
        route = ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            return await self.app(scope, receive, send)
        try:
            if scope["method"] != "POST":
                raise APIError(405, f"method {scope['method']} not allowed; use POST", None, "method_not_allowed")
            if self.tokens and not key_allowed(bearer_of(scope["headers"]), self.tokens):
                raise APIError(401, "missing or invalid bearer token", None, "invalid_api_key")
            raw = await read_body(scope, receive, self.max_body_bytes)
            try:
                req = route[0].model_validate_json(raw)
            except ValidationError as e:
                raise validation_error(e.errors(include_url=False)) from None
            await self._serve(req, self._model(req.model, route[1]), receive, send)
        except APIError as e:
            await send_error(send, e.status, e.message, e.param, e.code)
        except InvalidParameter as e:
            await send_error(send, 400, str(e), e.param)
        except UnknownModel as e:
            await send_error(send, 404, f"The model `{e.args[0]}` does not exist.", "model", "model_not_found")
        except ConnectionAbortedError:
            pass  # the client left while sending its body
        except Exception as e:  # a bug must cost one request, not the connection or the process
            log.exception("error on %s", scope["path"])
            await send_internal_error(send, f"internal error: {type(e).__name__}: {e}")

    def _model(self, name: str, kind: str) -> ServedModel:
        served = self.manager.get(name)
        if served.kind != kind:
            raise APIError(400, f"model {name!r} is an embedding model; use /v1/embeddings" if kind == "generate"
                           else f"model {name!r} does not produce embeddings", "model")
        return served

    async def _serve(self, req, served: ServedModel, receive, send) -> None:
        """Run the request under a disconnect watch: a client that leaves cancels this task,
        which aborts its engine request(s) wherever they are."""
        watch = DisconnectWatch(receive, asyncio.current_task().cancel)
        stream: AsyncIterator[str] | None = None
        try:
            work = await self._start(req, served)
            if isinstance(work, dict):
                watch.stop()  # before the last send: a finished response also reads as a disconnect
                return await send_json(send, 200, dumps(work))
            stream = work
            await send(SSE_START)
            async for event in stream:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            watch.stop()
            await send({"type": "http.response.body", "body": b""})
        except asyncio.CancelledError:
            if not watch.gone:
                raise  # the server is shutting down: let it
            asyncio.current_task().uncancel()  # the client left; nobody is there to answer
        finally:
            watch.stop()
            if stream is not None:
                await stream.aclose()

    async def _start(self, req, served: ServedModel) -> dict | AsyncIterator[str]:
        """The whole response body, or the SSE events of a streamed one."""
        m = self.metrics
        if isinstance(req, EmbeddingRequest):
            return await serving.embeddings(served, req)
        if isinstance(req, ChatCompletionRequest):
            ids, params, mm = await serving.prepare_chat(served, req, self.media)
            if req.stream:
                return serving.chat_stream(served, req, ids, params, m, mm)
            return await serving.chat_full(served, req, ids, params, m, mm)
        items = serving.prepare_completion(served, req)
        if req.stream:
            return serving.completion_stream(served, req, items, m)
        return await serving.completion_full(served, req, items, m)
