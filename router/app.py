"""The routing front end: OpenAI endpoints forwarded to live workers, plus read-only registry views."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import Response

from manager.registry import Registry
from worker.errors import APIError, BodyLimit, error_response, install as install_errors

from .inflight import InFlight
from .metrics import RouterMetrics
from .policies import Picker, PrefixIndex
from .proxy import Proxy
from .ratelimit import RateLimiter
from .settings import RouterSettings
from .state import RegistryView

log = logging.getLogger("router")

Hook = Callable[[], Awaitable[None]]


def bearer(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else ""


def matches(given: str, allowed: list[str]) -> bool:
    return any(hmac.compare_digest(given.encode(), a.encode()) for a in allowed)


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


def create_router_app(settings: RouterSettings, redis_client: aioredis.Redis, title: str = "llm-cluster router",
                      on_startup: list[Hook] | None = None, on_shutdown: list[Hook] | None = None) -> FastAPI:
    registry = Registry(redis_client, settings.heartbeat_ttl)
    view = RegistryView(registry, settings.resync_interval)
    inflight = InFlight(redis_client)
    picker = Picker(settings.policy, inflight.total, PrefixIndex(settings.prefix_index_size))
    proxy: Proxy | None = None
    limiter = RateLimiter(redis_client, settings.requests_per_minute, settings.tokens_per_minute)

    def inflight_all() -> dict[str, int]:
        return {wid: inflight.total(wid) for wid in view.workers}

    metrics = RouterMetrics(inflight_all, lambda: proxy.breaker.states() if proxy else {})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal proxy
        proxy = Proxy(view, picker, inflight, metrics, settings.worker_token, settings.max_attempts)
        app.state.proxy = proxy
        await view.start()
        await inflight.start()
        for hook in on_startup or []:
            await hook()
        log.info("router ready: policy=%s workers=%d redis=%s", settings.policy, len(view.workers),
                 "ok" if view.redis_ok else "unreachable")
        try:
            yield
        finally:
            for hook in on_shutdown or []:
                await hook()
            await inflight.stop()
            await view.stop()
            await proxy.close()

    app = FastAPI(title=title, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.view, app.state.registry, app.state.inflight = view, registry, inflight
    app.state.picker, app.state.settings, app.state.metrics = picker, settings, metrics
    install_errors(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    def require_client(request: Request) -> str:
        if not settings.api_keys:
            return request.client.host if request.client else "anonymous"
        key = bearer(request)
        if not key or not matches(key, settings.api_keys):
            raise APIError(401, "missing or invalid API key", None, "invalid_api_key")
        return key

    def require_reader(request: Request) -> None:
        allowed = list(settings.api_keys) + ([settings.worker_token] if settings.worker_token else [])
        if allowed and not matches(bearer(request), allowed):
            raise APIError(401, "a client key or the worker token is required", None, "invalid_api_key")

    app.state.require_reader = require_reader

    @app.get("/health")
    async def health():
        try:
            await redis_client.ping()
        except Exception as e:
            return error_response(503, f"redis unreachable: {type(e).__name__}", None)
        return {"status": "ok", "workers": len(view.live())}

    @app.get("/metrics")
    async def prom():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        require_client(request)
        return {"object": "list", "data": [
            {"id": m["name"], "object": "model", "created": 0, "owned_by": "llm-cluster",
             "max_model_len": m.get("max_model_len"), "kind": m.get("kind")} for m in view.models()]}

    @app.get("/workers")
    async def workers(request: Request):
        require_reader(request)
        return [w.public() | {"inflight": inflight.total(w.id)} for w in view.workers.values()]

    @app.get("/workers/{wid}")
    async def worker(wid: str, request: Request):
        require_reader(request)
        w = view.workers.get(wid) or await registry.get(wid)
        if w is None:
            raise APIError(404, f"unknown worker {wid!r}", "id")
        return w.public() | {"inflight": inflight.total(w.id)}

    async def route(request: Request, path: str, endpoint: str):
        client_key = require_client(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}", None) from e
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise APIError(400, "model: field required (a string)", "model")
        model = body["model"]
        if limiter.enabled:
            wait = await limiter.check(client_key, token_estimate(body, len(raw)))
            if wait is not None:
                metrics.requests.labels(model, endpoint, "429").inc()
                return error_response(429, "rate limit exceeded for this API key", None, "rate_limit_exceeded",
                                      headers={"Retry-After": str(max(1, int(wait + 0.999)))})
        if not view.live(model):
            known = any(model in w.model_names for w in view.workers.values())
            metrics.requests.labels(model, endpoint, "404" if not known else "503").inc()
            if not known:
                raise APIError(404, f"The model `{model}` does not exist.", "model", "model_not_found")
            raise APIError(503, f"no live worker serves model {model!r}", "model")
        text = prompt_text_of(body) if settings.policy == "prefix_affinity" else ""
        return await proxy.forward(request, path, raw, model, bool(body.get("stream")), text, endpoint)

    for path, endpoint in (("/v1/chat/completions", "chat"), ("/v1/completions", "completions"),
                           ("/v1/embeddings", "embeddings"), ("/tokenize", "tokenize"),
                           ("/detokenize", "detokenize")):
        async def handler(request: Request, _p=path, _e=endpoint):
            return await route(request, _p, _e)
        app.add_api_route(path, handler, methods=["POST"], name=endpoint)

    return app
