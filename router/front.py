"""The router's OpenAI routes as a raw ASGI layer in front of the FastAPI app.

Every proxied request passes here, so this skips what FastAPI would add per request (routing,
``Request`` objects, dependency resolution, response classes): it checks the key, reads the body
under the size limit, finds the model, applies the rate limit and hands over to :class:`Proxy`.
Every other path (registry views, metrics, dashboard, registry writes) goes on to FastAPI.

A client's ``X-Request-Id`` always goes on to the worker; with ``--enable-request-id-headers`` (or
``--enable-log-requests``) a request without one gets a new one, so the router's and the worker's
log lines of a request share its id.
"""

from __future__ import annotations

import json
import logging
import time

from clusterkit.asgi import read_body, send_exception
from clusterkit.auth import require_bearer
from clusterkit.errors import APIError, ErrorTable
from clusterkit.http_options import REQUEST_ID, client_request_id, new_request_id
from clusterkit.request_log import request_line

from .kv_policy import KVRequest
from .metrics import RouterMetrics
from .proxy import Proxy, RouteTrace
from .ratelimit import RateLimiter
from .settings import RouterSettings
from .state import RegistryView

log = logging.getLogger("router")
request_log = logging.getLogger("router.requests")

ALLOW_POST = (b"allow", b"POST")
ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/embeddings": "embeddings",
          "/tokenize": "tokenize", "/detokenize": "detokenize"}


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def prompt_text_of(body: dict) -> str:
    """The text the prefix-affinity policy keys on: the whole prompt, as sent."""
    if "messages" in body:
        return json.dumps(body["messages"], separators=(",", ":"), ensure_ascii=False)
    p = body.get("prompt", body.get("input", ""))
    return p if isinstance(p, str) else json.dumps(p, separators=(",", ":"))


def token_estimate(body: dict, raw_len: int) -> int:
    """Tokens a request may cost, for tokens/min limits: ~4 bytes per prompt token plus max_tokens."""
    out = body.get("max_completion_tokens") or body.get("max_tokens") or 16
    n = body.get("n", 1) if isinstance(body.get("n", 1), int) else 1
    return raw_len // 4 + int(out) * max(1, n) if isinstance(out, int) else raw_len // 4


class ProxyRoutes:
    """ASGI middleware serving :data:`ROUTES` (below the root path) through the proxy; everything
    else passes to ``app``."""

    def __init__(self, app, *, settings: RouterSettings, view: RegistryView, limiter: RateLimiter,
                 metrics: RouterMetrics, proxy: Proxy):
        self.app, self.settings, self.view, self.limiter, self.metrics = app, settings, view, limiter, metrics
        self.proxy = proxy
        self.errors = ErrorTable()
        # RootPath (clusterkit.http_options) leaves the prefix in scope["path"]: match it whole,
        # forward the path without it.
        self.routes = {settings.root_path + p: (p, e) for p, e in ROUTES.items()}
        self.log_requests = settings.enable_log_requests

    async def __call__(self, scope, receive, send):
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            return await self.app(scope, receive, send)
        path, endpoint = route
        rid = scope.get(REQUEST_ID) or client_request_id(scope["headers"])
        trace = None
        if self.log_requests:
            rid, trace, start = rid or new_request_id(), RouteTrace(), time.perf_counter()
        # Metrics are labelled by model names the registry knows only: names clients make up would
        # each add series without bound.
        model = label = "-"
        try:
            if scope["method"] != "POST":
                raise APIError(405, f"method {scope['method']} not allowed; use POST", None, "method_not_allowed",
                               [ALLOW_POST])
            client = self._client_of(scope)
            raw = await read_body(scope, receive, self.settings.max_body_bytes, self.settings.body_timeout)
            body = self._parse(raw)
            model = body["model"]
            if self.limiter.enabled:
                wait = await self.limiter.check(client, token_estimate(body, len(raw)))
                if wait is not None:
                    label = model if self._known(model) else "-"
                    raise APIError(429, "rate limit exceeded for this API key", None, "rate_limit_exceeded",
                                   [(b"retry-after", str(max(1, int(wait + 0.999))).encode())])
            if not self.view.live(model):
                if not self._known(model):
                    raise APIError(404, f"The model `{model}` does not exist.", "model", "model_not_found")
                label = model
                raise APIError(503, f"no live worker serves model {model!r}", "model")
            label = model
            policy = self.settings.policy
            text = prompt_text_of(body) if policy == "prefix_affinity" else ""
            kv = KVRequest(path, body) if policy == "kv_aware" and endpoint in ("chat", "completions") else None
            status = await self.proxy.forward(receive, send, path, raw, model, text, endpoint, rid, trace, kv)
        except ConnectionAbortedError:
            status = "499"
        except Exception as e:  # APIError (refused before routing, read_body's 413), or a bug
            status = str(await send_exception(send, e, self.errors, scope["path"]))
        self.metrics.requests.labels(label, endpoint, status).inc()
        if trace is not None:
            request_log.info("request %s", request_line({
                "id": rid, "model": model, "endpoint": path, "worker": trace.worker, "status": status,
                "latency_ms": round((time.perf_counter() - start) * 1000, 1), "attempts": trace.attempts}))

    def _known(self, model: str) -> bool:
        """Whether any registered worker served ``model`` since start-up (live or not, or gone:
        a model whose workers all left is a 503, not a 404)."""
        return self.view.knows(model)

    def _client_of(self, scope) -> str:
        """The client's key (rate limits are per key), or its address when keys are off."""
        if not self.settings.api_keys:
            c = scope.get("client")
            return c[0] if c else "anonymous"
        return require_bearer(scope["headers"], self.settings.api_keys)

    @staticmethod
    def _parse(raw: bytes) -> dict:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from e
        except RecursionError:  # e.g. 100k nested arrays: the decoder's depth, not ours to raise
            raise APIError(400, "request body is not valid JSON: nested too deeply") from None
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise APIError(400, "model: field required (a string)", "model")
        if not body["model"].isascii() and not _utf8(body["model"]):
            # a lone surrogate ("\ud800") parses but is no text: it cannot name a model, or a metric
            raise APIError(400, "model: not valid Unicode text", "model")
        return body
