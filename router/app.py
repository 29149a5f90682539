"""The routing front end: OpenAI endpoints forwarded to live workers, plus read-only registry views."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import Response

from manager.registry import Registry
from worker.errors import APIError, BodyLimit, error_response, install as install_errors

from .front import ProxyRoutes, key_allowed
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
    return key_allowed(given, allowed)


def entrypoint(app: FastAPI) -> ProxyRoutes:
    """The ASGI app to serve: the proxied OpenAI routes in front of ``app``. FastAPI's middleware
    stack costs more per request than forwarding itself, so the hot path never enters it."""
    s = app.state
    return ProxyRoutes(app, settings=s.settings, view=s.view, limiter=s.limiter, metrics=s.metrics,
                       proxy=s.proxy)


def create_router_app(settings: RouterSettings, redis_client: aioredis.Redis, title: str = "llm-cluster router",
                      on_startup: list[Hook] | None = None, on_shutdown: list[Hook] | None = None) -> FastAPI:
    registry = Registry(redis_client, settings.heartbeat_ttl)
    view = RegistryView(registry, settings.resync_interval)
    inflight = InFlight(redis_client)
    picker = Picker(settings.policy, inflight.total, PrefixIndex(settings.prefix_index_size))
    limiter = RateLimiter(redis_client, settings.requests_per_minute, settings.tokens_per_minute)

    def inflight_all() -> dict[str, int]:
        return {wid: inflight.total(wid) for wid in view.workers}

    metrics = RouterMetrics(inflight_all, lambda: proxy.breaker.states())
    proxy = Proxy(view, picker, inflight, metrics, settings.worker_token, settings.max_attempts)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
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
            proxy.close()

    app = FastAPI(title=title, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.view, app.state.registry, app.state.inflight = view, registry, inflight
    app.state.picker, app.state.settings, app.state.metrics = picker, settings, metrics
    app.state.proxy = proxy
    install_errors(app)
    app.state.limiter = limiter
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

    return app
