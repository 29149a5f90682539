"""The worker's inference routes as a raw ASGI layer in front of the FastAPI app.

``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` carry nearly all traffic, and
the worker's HTTP thread shares the GIL with the engine loop: every microsecond spent here is one
the engine does not get. So these skip FastAPI's per-request machinery (routing, dependency
resolution, ``jsonable_encoder``, response classes) and validate the body straight from JSON with
pydantic. Everything else (models list, tokenize, health, metrics) goes on to FastAPI.

A client that leaves is noticed by :class:`~clusterkit.asgi.DisconnectWatch`, which cancels the
request's task: that cancellation is what aborts the engine request and frees its KV blocks.

With ``--enable-log-requests`` each request ends with one :class:`RequestLog` line; without it the
only cost is one ``is None`` check per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydantic import BaseModel

from clusterkit.asgi import DisconnectWatch, dumps, read_body, send_exception, send_json
from clusterkit.auth import require_bearer
from clusterkit.errors import APIError
from clusterkit.http_options import request_id_of
from clusterkit.request_log import prompt_excerpt, request_line
from engine import SamplingParams

from . import chat, completions, embeddings
from .errors import ERRORS
from .media import MediaPolicy
from .metrics import WorkerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from .vllm_manager import ServedModel, VLLMManager

# A new start message per response (see _serve): outer layers (CORS, request ids) may edit it.
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]

ROUTES: dict[str, tuple[type[BaseModel], str]] = {
    "/v1/chat/completions": (ChatCompletionRequest, "generate"),
    "/v1/completions": (CompletionRequest, "generate"),
    "/v1/embeddings": (EmbeddingRequest, "embed"),
}


@dataclass
class RequestRecord:
    """What the log line of one request shows (never its headers: keys and tokens travel there)."""

    id: str
    endpoint: str
    start: float = field(default_factory=time.perf_counter)
    model: str | None = None
    fields: dict = field(default_factory=dict)  # prompt tokens, sampling summary, stream
    prompt: str | None = None  # the first max_log_len characters, when max_log_len > 0


class RequestLog:
    """``--enable-log-requests``: one line per inference request, on logger ``worker.requests``:
    request id, model, endpoint, prompt token count, sampling summary, status and latency; the
    prompt's first ``max_log_len`` characters only when ``max_log_len`` > 0."""

    def __init__(self, max_log_len: int = 0):
        self.max_log_len = max_log_len
        self.log = logging.getLogger("worker.requests")

    def start(self, scope, endpoint: str) -> RequestRecord:
        return RequestRecord(request_id_of(scope), endpoint)

    def prompts(self, rec: RequestRecord, served: ServedModel, ids: list[list[int]], params: SamplingParams,
                text: str | None, stream: bool) -> None:
        """Note the prepared prompts (``text``: the first one's text when the client sent text)."""
        rec.fields.update(stream=stream, prompt_tokens=sum(len(x) for x in ids), max_tokens=params.max_tokens,
                          temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k if params.top_k > 0 else None, n=params.n, seed=params.seed,
                          constrained=True if params.structured_outputs is not None else None)
        if self.max_log_len > 0:
            if text is None:  # a rendered chat or token ids: the text the model reads
                text = served.tokenizer.decode(ids[0][:self.max_log_len])
            rec.prompt = prompt_excerpt(text, self.max_log_len)

    def embeddings(self, rec: RequestRecord, req: EmbeddingRequest, result: dict) -> None:
        rec.fields["prompt_tokens"] = result["usage"]["prompt_tokens"]
        if self.max_log_len > 0:
            first = req.input if isinstance(req.input, str) else (req.input or [None])[0]
            if isinstance(first, str):
                rec.prompt = prompt_excerpt(first, self.max_log_len)

    def finish(self, rec: RequestRecord, status: int) -> None:
        latency_ms = round((time.perf_counter() - rec.start) * 1000, 1)
        self.log.info("request %s", request_line({"id": rec.id, "model": rec.model, "endpoint": rec.endpoint,
                                                   **rec.fields, "status": status, "latency_ms": latency_ms,
                                                   "prompt": rec.prompt}))


class InferenceRoutes:
    """ASGI middleware serving :data:`ROUTES` (below ``root_path``); every other request passes
    to ``app``. ``request_log``: None unless requests are logged."""

    def __init__(self, app, *, manager: VLLMManager, metrics: WorkerMetrics, media: MediaPolicy,
                 tokens: list[str], max_body_bytes: int, root_path: str = "",
                 request_log: RequestLog | None = None, body_timeout: float | None = None):
        self.app, self.manager, self.metrics, self.media = app, manager, metrics, media
        self.tokens, self.max_body_bytes, self.body_timeout = tokens, max_body_bytes, body_timeout
        # RootPath (clusterkit.http_options) leaves the prefix in scope["path"]: match it whole.
        self.routes = {root_path + p: (*r, p) for p, r in ROUTES.items()}
        self.request_log = request_log

    async def __call__(self, scope, receive, send):
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            return await self.app(scope, receive, send)
        if self.request_log is None:
            await self._handle(scope, receive, send, route, None)
            return
        rec = self.request_log.start(scope, route[2])
        status = 500
        try:
            status = await self._handle(scope, receive, send, route, rec)
        finally:
            self.request_log.finish(rec, status)

    async def _handle(self, scope, receive, send, route, rec: RequestRecord | None) -> int:
        """Answer one request; returns its status (499: the client left)."""
        try:
            if scope["method"] != "POST":
                raise APIError(405, f"method {scope['method']} not allowed; use POST", None, "method_not_allowed",
                               [(b"allow", b"POST")])
            require_bearer(scope["headers"], self.tokens, "missing or invalid bearer token")
            raw = await read_body(scope, receive, self.max_body_bytes, self.body_timeout)
            req = route[0].model_validate_json(raw)
            if rec is not None:
                rec.model = req.model
            return await self._serve(req, self._model(req.model, route[1]), receive, send, rec)
        except ConnectionAbortedError:
            return 499  # the client left while sending its body
        except Exception as e:  # a bad request costs an error answer; a bug costs one request
            return await send_exception(send, e, ERRORS, scope["path"])

    def _model(self, name: str, kind: str) -> ServedModel:
        served = self.manager.get(name)
        if served.kind != kind:
            raise APIError(400, f"model {name!r} is an embedding model; use /v1/embeddings" if kind == "generate"
                           else f"model {name!r} does not produce embeddings", "model")
        return served

    async def _serve(self, req, served: ServedModel, receive, send, rec: RequestRecord | None) -> int:
        """Run the request under a disconnect watch: a client that leaves cancels this task,
        which aborts its engine request(s) wherever they are."""
        watch = DisconnectWatch(receive, asyncio.current_task().cancel)
        stream: AsyncIterator[str] | None = None
        try:
            work = await self._start(req, served, rec)
            if isinstance(work, dict):
                watch.stop()  # before the last send: a finished response also reads as a disconnect
                await send_json(send, 200, dumps(work))
                return 200
            stream = work
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            async for event in stream:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            watch.stop()
            await send({"type": "http.response.body", "body": b""})
            return 200
        except asyncio.CancelledError:
            if not watch.gone:
                raise  # the server is shutting down: let it
            asyncio.current_task().uncancel()  # the client left; nobody is there to answer
            return 499
        finally:
            watch.stop()
            if stream is not None:
                await stream.aclose()

    async def _start(self, req, served: ServedModel, rec: RequestRecord | None) -> dict | AsyncIterator[str]:
        """The whole response body, or the SSE events of a streamed one."""
        m = self.metrics
        if isinstance(req, EmbeddingRequest):
            result = await embeddings.create(served, req)
            if rec is not None:
                self.request_log.embeddings(rec, req, result)
            return result
        if isinstance(req, ChatCompletionRequest):
            job = await chat.prepare(served, req, self.media)
            if rec is not None:
                self.request_log.prompts(rec, served, [job.ids], job.params, None, req.stream)
            if req.stream:
                return chat.stream(served, req, job, m)
            return await chat.full(served, req, job, m)
        items = await completions.prepare(served, req)
        if rec is not None and items:
            self.request_log.prompts(rec, served, [i.ids for i in items], items[0].params, items[0].text, req.stream)
        if req.stream:
            return completions.stream(served, req, items, m)
        return await completions.full(served, req, items, m)
