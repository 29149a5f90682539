"""Forwarding one client request to a worker: pick, retry before the first byte, pass through."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from manager.registry import WorkerInfo
from worker.errors import ClientDisconnected, error_response, unless_disconnected

from .inflight import InFlight
from .metrics import RouterMetrics
from .policies import Picker
from .transport import LeanTransport
from .state import RegistryView

log = logging.getLogger("router.proxy")

RETRY_STATUSES = {429, 500, 502, 503, 504}
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}


@dataclass
class Breaker:
    """Per-worker circuit breaker: open after ``threshold`` consecutive failures, half-open after
    ``cooldown`` seconds (one trial request), closed again on success."""

    threshold: int = 3
    cooldown: float = 5.0
    failures: dict[str, int] = field(default_factory=dict)
    opened_at: dict[str, float] = field(default_factory=dict)

    def allows(self, wid: str) -> bool:
        t = self.opened_at.get(wid)
        if t is None:
            return True
        if time.monotonic() - t >= self.cooldown:
            self.opened_at[wid] = time.monotonic()  # half-open: let one through, re-arm
            return True
        return False

    def success(self, wid: str) -> None:
        self.failures.pop(wid, None)
        self.opened_at.pop(wid, None)

    def failure(self, wid: str) -> None:
        n = self.failures.get(wid, 0) + 1
        self.failures[wid] = n
        if n >= self.threshold:
            if wid not in self.opened_at:
                log.warning("circuit breaker open for worker %s after %d failures", wid, n)
            self.opened_at[wid] = time.monotonic()

    def states(self) -> dict[str, int]:
        return {wid: 1 for wid in self.opened_at}


def sse_error(message: str, code: int = 502) -> bytes:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return f"data: {json.dumps(body)}\n\n".encode()


class Proxy:
    """Routes requests over the live workers of a model with one shared ``httpx.AsyncClient``."""

    def __init__(self, view: RegistryView, picker: Picker, inflight: InFlight, metrics: RouterMetrics,
                 worker_token: str | None = None, max_attempts: int = 3, timeout: float = 600.0):
        self.view, self.picker, self.inflight, self.metrics = view, picker, inflight, metrics
        self.breaker = Breaker()
        self.max_attempts = max_attempts
        headers = {"Authorization": f"Bearer {worker_token}"} if worker_token else {}
        self.client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout, connect=3.0),
                                        transport=LeanTransport(), trust_env=False)

    async def close(self) -> None:
        await self.client.aclose()

    def _candidates(self, model: str, tried: set[str]) -> list[WorkerInfo]:
        live = [w for w in self.view.live(model) if w.id not in tried]
        allowed = [w for w in live if self.breaker.allows(w.id)]
        return allowed or live  # all breakers open: still try rather than fail outright

    async def forward(self, request: Request, path: str, body: bytes, model: str, stream: bool,
                      prompt_text: str = "", endpoint: str = "") -> Response:
        tried: set[str] = set()
        start = time.perf_counter()
        last_error = "no live worker serves this model"
        status_for_none = 503
        for attempt in range(self.max_attempts):
            cands = self._candidates(model, tried)
            if not cands:
                break
            w = self.picker.pick(model, cands, prompt_text)
            tried.add(w.id)
            self.inflight.inc(w.id)
            released = False

            def release():
                nonlocal released
                if not released:
                    released = True
                    self.inflight.dec(w.id)

            try:
                req = self.client.build_request("POST", w.url.rstrip("/") + path, content=body,
                                                headers={"content-type": "application/json"})
                resp = await self.client.send(req, stream=True)
            except httpx.HTTPError as e:
                release()
                self.breaker.failure(w.id)
                last_error, status_for_none = f"worker {w.id} unreachable ({type(e).__name__})", 502
                self.metrics.retries.labels(model, "connect").inc()
                continue
            if resp.status_code in RETRY_STATUSES:
                await resp.aclose()
                release()
                if resp.status_code >= 500:
                    self.breaker.failure(w.id)
                last_error, status_for_none = f"worker {w.id} answered {resp.status_code}", resp.status_code
                self.metrics.retries.labels(model, str(resp.status_code)).inc()
                continue
            headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_HEADERS}
            headers["x-llmc-worker"] = w.id  # which worker served it: for operators and tests
            if not stream or not resp.headers.get("content-type", "").startswith("text/event-stream"):
                try:
                    content = await unless_disconnected(request, resp.aread())
                except httpx.HTTPError as e:  # died before we sent a byte: try another worker
                    release()
                    self.breaker.failure(w.id)
                    last_error, status_for_none = f"worker {w.id} failed mid-response ({type(e).__name__})", 502
                    self.metrics.retries.labels(model, "read").inc()
                    continue
                except ClientDisconnected:
                    release()
                    self.metrics.requests.labels(model, endpoint, "499").inc()
                    return Response(status_code=499)
                finally:
                    await resp.aclose()
                release()
                self.breaker.success(w.id)
                self.metrics.latency.labels(model, endpoint).observe(time.perf_counter() - start)
                self.metrics.requests.labels(model, endpoint, str(resp.status_code)).inc()
                return Response(content, status_code=resp.status_code, headers=headers)
            # Streaming: hold the response until the first chunk arrives, so a worker that dies
            # before producing anything is still retried invisibly.
            it = resp.aiter_raw()
            try:
                first = await it.__anext__()
            except (httpx.HTTPError, StopAsyncIteration) as e:
                await resp.aclose()
                release()
                self.breaker.failure(w.id)
                last_error, status_for_none = f"worker {w.id} failed before streaming ({type(e).__name__})", 502
                self.metrics.retries.labels(model, "stream-start").inc()
                continue
            self.breaker.success(w.id)
            self.metrics.latency.labels(model, endpoint).observe(time.perf_counter() - start)
            return StreamingResponse(self._relay(first, it, resp, release, model, endpoint, w.id),
                                     status_code=resp.status_code, headers=headers)
        self.metrics.errors.labels(model, "no_worker" if status_for_none == 503 else "upstream").inc()
        self.metrics.requests.labels(model, endpoint, str(status_for_none)).inc()
        if status_for_none == 503 and not tried:
            return error_response(503, f"no live worker serves model {model!r}", "model")
        return error_response(status_for_none if status_for_none in (429, 503) else 502,
                              f"all attempts failed: {last_error}", None)

    async def _relay(self, first: bytes, it, resp: httpx.Response, release, model: str, endpoint: str,
                     wid: str):
        """Pass SSE bytes through unchanged; a cut stream ends with an error event, never silently."""
        status = str(resp.status_code)
        try:
            yield first
            async for chunk in it:
                yield chunk
        except httpx.HTTPError as e:
            status = "stream-cut"
            self.breaker.failure(wid)
            self.metrics.errors.labels(model, "stream_cut").inc()
            log.warning("stream from worker %s cut: %s", wid, type(e).__name__)
            yield sse_error(f"upstream worker {wid} failed mid-stream ({type(e).__name__})")
            yield b"data: [DONE]\n\n"
        finally:
            await resp.aclose()  # also what tells the worker a departed client is gone
            release()
            self.metrics.requests.labels(model, endpoint, status).inc()
