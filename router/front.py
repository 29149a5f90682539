"""The router's OpenAI routes as a raw ASGI layer in front of the FastAPI app.

Every proxied request passes here, so this skips what FastAPI would add per request (routing,
``Request`` objects, dependency resolution, response classes): it checks the key, reads the body
under the size limit, finds the model, applies the rate limit and hands over to :class:`Proxy`.
Every other path (registry views, metrics, dashboard, registry writes) goes on to FastAPI.
"""

from __future__ import annotations

import json
import logging

from worker.asgi import bearer_of, key_allowed, read_body, send_error, send_internal_error
from worker.errors import APIError

from .metrics import RouterMetrics
from .proxy import Proxy
from .ratelimit import RateLimiter
from .settings import RouterSettings
from .state import RegistryView

log = logging.getLogger("router")

ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/embeddings": "embeddings",
          "/tokenize": "tokenize", "/detokenize": "detokenize"}


class Rejected(APIError):
    """A request refused before routing, with any extra response headers (Retry-After)."""

    def __init__(self, status: int, message: str, param: str | None = None, code=None, headers=()):
        super().__init__(status, message, param, code)
        self.headers = headers


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
    """ASGI middleware serving :data:`ROUTES` through the proxy; everything else passes to ``app``."""

    def __init__(self, app, *, settings: RouterSettings, view: RegistryView, limiter: RateLimiter,
                 metrics: RouterMetrics, proxy: Proxy):
        self.app, self.settings, self.view, self.limiter, self.metrics = app, settings, view, limiter, metrics
        self.proxy = proxy

    async def __call__(self, scope, receive, send):
        endpoint = ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None:
            return await self.app(scope, receive, send)
        model = "-"
        try:
            if scope["method"] != "POST":
                raise Rejected(405, f"method {scope['method']} not allowed; use POST", None, "method_not_allowed")
            client = self._client_of(scope)
            raw = await read_body(scope, receive, self.settings.max_body_bytes)
            body = self._parse(raw)
            model = body["model"]
            if self.limiter.enabled:
                wait = await self.limiter.check(client, token_estimate(body, len(raw)))
                if wait is not None:
                    raise Rejected(429, "rate limit exceeded for this API key", None, "rate_limit_exceeded",
                                   [(b"retry-after", str(max(1, int(wait + 0.999))).encode())])
            if not self.view.live(model):
                if not any(w.serves(model) for w in self.view.workers.values()):
                    raise Rejected(404, f"The model `{model}` does not exist.", "model", "model_not_found")
                raise Rejected(503, f"no live worker serves model {model!r}", "model")
            text = prompt_text_of(body) if self.settings.policy == "prefix_affinity" else ""
            status = await self.proxy.forward(receive, send, scope["path"], raw, model, text, endpoint)
        except APIError as e:  # Rejected, or read_body's 413
            await send_error(send, e.status, e.message, e.param, e.code, getattr(e, "headers", ()))
            status = str(e.status)
        except ConnectionAbortedError:
            status = "499"
        except Exception as e:  # a bug must cost one request, not the connection or the process
            log.exception("router error on %s", scope["path"])
            await send_internal_error(send, f"internal error: {type(e).__name__}")
            status = "500"
        self.metrics.requests.labels(model, endpoint, status).inc()

    def _client_of(self, scope) -> str:
        keys = self.settings.api_keys
        if not keys:
            c = scope.get("client")
            return c[0] if c else "anonymous"
        key = bearer_of(scope["headers"])
        if not key or not key_allowed(key, keys):
            raise Rejected(401, "missing or invalid API key", None, "invalid_api_key")
        return key

    @staticmethod
    def _parse(raw: bytes) -> dict:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Rejected(400, f"request body is not valid JSON: {e}") from e
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise Rejected(400, "model: field required (a string)", "model")
        return body
