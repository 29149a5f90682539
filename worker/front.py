"""The worker's inference routes as a raw ASGI layer in front of the FastAPI app.

``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` carry nearly all traffic, and
the worker's HTTP thread shares the GIL with the engine loop: every microsecond spent here is one
the engine does not get. So these skip FastAPI's per-request machinery (routing, dependency
resolution, ``jsonable_encoder``, response classes) and validate the body straight from JSON with
pydantic. Everything else (models list, tokenize, health, metrics) goes on to FastAPI.

A client that leaves is noticed by :class:`~clusterkit.asgi.DisconnectWatch`, which cancels the
request's task: that cancellation is what aborts the engine request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pydantic import BaseModel

from clusterkit.asgi import DisconnectWatch, dumps, read_body, send_exception, send_json
from clusterkit.auth import require_bearer
from clusterkit.errors import APIError

from . import chat, completions, embeddings
from .errors import ERRORS
from .media import MediaPolicy
from .metrics import WorkerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from .vllm_manager import ServedModel, VLLMManager

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
            require_bearer(scope["headers"], self.tokens, "missing or invalid bearer token")
            raw = await read_body(scope, receive, self.max_body_bytes)
            req = route[0].model_validate_json(raw)
            await self._serve(req, self._model(req.model, route[1]), receive, send)
        except ConnectionAbortedError:
            pass  # the client left while sending its body
        except Exception as e:  # a bad request costs an error answer; a bug costs one request
            await send_exception(send, e, ERRORS, scope["path"])

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
            return await embeddings.create(served, req)
        if isinstance(req, ChatCompletionRequest):
            job = await chat.prepare(served, req, self.media)
            if req.stream:
                return chat.stream(served, req, job, m)
            return await chat.full(served, req, job, m)
        items = await completions.prepare(served, req)
        if req.stream:
            return completions.stream(served, req, items, m)
        return await completions.full(served, req, items, m)
