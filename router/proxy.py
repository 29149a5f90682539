"""Forwarding one client request to a worker: pick, retry before the first byte, pass through.

Works on raw ASGI ``send``/``receive`` and :mod:`router.upstream` exchanges: this is the router's
per-request hot path, so it allocates little and awaits nothing it does not need.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from clusterkit.asgi import DisconnectWatch, send_error
from clusterkit.errors import error_body
from clusterkit.registry import WorkerInfo

from .breaker import Breakers
from .inflight import InFlight
from .kv_policy import KVRequest
from .metrics import RouterMetrics
from .policies import Picker
from .settings import RouterSettings
from .state import RegistryView
from .upstream import Exchange, UpstreamError, UpstreamPool

log = logging.getLogger("router.proxy")

RETRY_STATUSES = {429, 500, 502, 503, 504}
# Not passed back to the client: framing is redone by our server, and it adds its own date/server.
DROP_HEADERS = {b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"date", b"server"}


def sse_error(message: str, code: int = 502) -> bytes:
    return f"data: {json.dumps(error_body(code, message))}\n\n".encode()


@dataclass
class RouteTrace:
    """Where one request went, for its request log line."""

    worker: str | None = None  # the last worker tried
    attempts: int = 0


class Proxy:
    """Routes requests over the live workers of a model through one shared :class:`UpstreamPool`."""

    def __init__(self, view: RegistryView, picker: Picker, inflight: InFlight, metrics: RouterMetrics,
                 settings: RouterSettings):
        self.view, self.picker, self.inflight, self.metrics = view, picker, inflight, metrics
        self.breaker = Breakers()
        self.max_attempts = settings.max_attempts
        self.first_byte_timeout = settings.first_byte_timeout
        self.idle_timeout = settings.stream_idle_timeout
        # With request id headers on, the client gets the id from the router's own layer, so the
        # worker's echo of it is dropped rather than sent twice.
        self.drop = DROP_HEADERS | ({b"x-request-id"} if settings.enable_request_id_headers else set())
        token = settings.worker_token
        self.pool = UpstreamPool({"authorization": f"Bearer {token}"} if token else None,
                                 connect_timeout=settings.connect_timeout)

    def close(self) -> None:
        self.pool.close()

    def _candidates(self, model: str, tried: set[str]) -> list[WorkerInfo]:
        live = [w for w in self.view.live(model) if w.id not in tried]
        allowed = [w for w in live if self.breaker.allows(w.id)]
        return allowed or live  # all breakers open: still try rather than fail outright

    async def forward(self, receive, send, path: str, body: bytes, model: str, prompt_text: str = "",
                      endpoint: str = "", request_id: str | None = None, trace: RouteTrace | None = None,
                      kv_request: KVRequest | None = None) -> str:
        """Answer the client from a worker; returns the final status, for the request counter.
        ``request_id`` (already checked to be a safe header value) goes to the worker as
        ``X-Request-Id``; ``trace`` (optional) learns the worker and the number of attempts;
        ``prompt_text`` / ``kv_request``: what the prefix_affinity / kv_aware policies read."""
        watch = DisconnectWatch(receive)
        extra = b"x-request-id: %s\r\n" % request_id.encode() if request_id else b""
        try:
            return await self._forward(watch, send, path, body, model, prompt_text, endpoint, extra, trace,
                                       kv_request)
        finally:
            watch.stop()

    async def _forward(self, watch: DisconnectWatch, send, path, body, model, prompt_text, endpoint,
                       extra: bytes, trace: RouteTrace | None, kv_request: KVRequest | None = None) -> str:
        tried: set[str] = set()
        start = time.perf_counter()
        last_error = "no live worker serves this model"
        status_for_none = 503
        m = self.metrics
        for _ in range(self.max_attempts):
            cands = self._candidates(model, tried)
            if not cands:
                break
            w = self.picker.pick(model, cands, prompt_text, kv_request)
            tried.add(w.id)
            if trace is not None:
                trace.worker, trace.attempts = w.id, trace.attempts + 1
            self.inflight.inc(w.id)
            self.breaker.begin(w.id)
            ex: Exchange | None = None
            settled = False  # the breaker heard how this attempt went
            deadline = time.monotonic() + self.first_byte_timeout
            try:
                ex = self.pool.post(w.url, path, body, extra)
                watch.on_gone = ex.abort  # closing the connection is what cancels the work upstream
                await ex.start(self.first_byte_timeout)
                if ex.status in RETRY_STATUSES:
                    if ex.status >= 500:
                        self.breaker.failure(w.id)
                        settled = True
                    last_error, status_for_none = f"worker {w.id} answered {ex.status}", ex.status
                    m.retries.labels(model, str(ex.status)).inc()
                    continue
                headers = [(k, v) for k, v in ex.headers if k.lower() not in self.drop]
                headers.append((b"x-llmc-worker", w.id.encode()))  # which worker served it
                ctype = ex.header(b"content-type") or b""
                if not ctype.startswith(b"text/event-stream"):
                    # The whole body first: a failure now can still be retried.
                    content = await ex.read(self.idle_timeout)
                    self.breaker.success(w.id)
                    settled = True
                    m.latency.labels(model, endpoint).observe(time.perf_counter() - start)
                    headers.append((b"content-length", b"%d" % len(content)))
                    await send({"type": "http.response.start", "status": ex.status, "headers": headers})
                    await send({"type": "http.response.body", "body": content})
                    return str(ex.status)
                # Streaming: hold the head until the first event, so a worker that dies or stalls
                # before producing anything is still retried invisibly.
                first = await ex.next_data(max(0.001, deadline - time.monotonic()))
                if first is None:
                    raise UpstreamError("stream ended before any event")
                self.breaker.success(w.id)
                settled = True
                m.latency.labels(model, endpoint).observe(time.perf_counter() - start)
                return await self._relay(watch, send, ex, first, headers, model, w.id)
            except UpstreamError as e:
                if watch.gone:
                    return "499"
                self.breaker.failure(w.id)
                settled = True
                kind = e.kind if e.kind in ("connect", "timeout") else ("read" if ex.status else "no-response")
                last_error = f"worker {w.id} failed ({kind}: {e})"
                # A refused connection reached nothing (the worker is gone): 503, retry later.
                status_for_none = {"timeout": 504, "connect": 503}.get(kind, 502)
                m.retries.labels(model, kind).inc()
            finally:
                if not settled:
                    self.breaker.release(w.id)
                if ex is not None:
                    ex.close()
                watch.on_gone = None
                self.inflight.dec(w.id)
        if watch.gone:
            return "499"
        m.errors.labels(model, "no_worker" if status_for_none == 503 else "upstream").inc()
        if status_for_none == 503 and not tried:
            await send_error(send, 503, f"no live worker serves model {model!r}", "model")
            return "503"
        status = status_for_none if status_for_none in (429, 503, 504) else 502
        await send_error(send, status, f"all attempts failed: {last_error}")
        return str(status)

    async def _relay(self, watch: DisconnectWatch, send, ex: Exchange, first: bytes, headers, model: str,
                     wid: str) -> str:
        """Pass SSE bytes through unchanged, everything buffered in one write; a cut or stalled
        stream ends with an error event, never silently."""
        await send({"type": "http.response.start", "status": ex.status, "headers": headers})
        data: bytes | None = first
        idle = self.idle_timeout
        try:
            while data is not None:
                await send({"type": "http.response.body", "body": data, "more_body": True})
                if watch.gone:
                    return "499"
                data = await ex.next_data(idle)
        except UpstreamError as e:
            if watch.gone:
                return "499"
            self.breaker.failure(wid)
            self.metrics.errors.labels(model, "stream_stalled" if e.kind == "timeout" else "stream_cut").inc()
            log.warning("stream from worker %s %s: %s", wid, "stalled" if e.kind == "timeout" else "cut", e)
            ex.abort()  # the worker sees the client leave and frees the request
            await send({"type": "http.response.body", "more_body": True,
                        "body": sse_error(f"upstream worker {wid} failed mid-stream ({e})") + b"data: [DONE]\n\n"})
            await send({"type": "http.response.body", "body": b""})
            return "stream-cut"
        await send({"type": "http.response.body", "body": b""})
        return str(ex.status)
