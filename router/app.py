"""The routing front end: OpenAI endpoints forwarded to live workers, plus read-only registry views."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

from clusterkit.asgi import install_error_handlers
from clusterkit.auth import require_bearer
from clusterkit.errors import APIError, ErrorTable
from clusterkit.http_options import package_version, with_server_options
from clusterkit.kv_wire import KVStore
from clusterkit.registry import Registry, worker_key

from .front import ProxyRoutes
from .inflight import InFlight
from .kv_index import KVIndex
from .kv_policy import KVAwareChooser
from .metrics import RouterMetrics
from .openapi import publish_openapi
from .policies import Picker, PrefixIndex
from .prompt_tokens import PromptTokens
from .proxy import Proxy
from .ratelimit import RateLimiter
from .settings import RouterSettings
from .state import RegistryView

log = logging.getLogger("router")

Hook = Callable[[AsyncIOScheduler], Awaitable[None]]


def entrypoint(app: FastAPI):
    """The ASGI app to serve: the proxied OpenAI routes in front of ``app``, inside the layers the
    server options turn on (CORS, root path, request ids: :mod:`clusterkit.http_options`).
    FastAPI's middleware stack costs more per request than forwarding itself, so the hot path
    never enters it."""
    s = app.state
    routes = ProxyRoutes(app, settings=s.settings, view=s.view, limiter=s.limiter, metrics=s.metrics,
                         proxy=s.proxy)
    return with_server_options(routes, s.settings)


def create_router_app(settings: RouterSettings, redis_client: aioredis.Redis, title: str = "llm-cluster router",
                      on_startup: list[Hook] | None = None) -> FastAPI:
    """The router's FastAPI app (serve it through :func:`entrypoint`). Periodic jobs (registry
    resyncs, in-flight count exchange, and whatever ``on_startup`` hooks add) run on one
    apscheduler scheduler that lives as long as the app."""
    registry = Registry(redis_client, settings.heartbeat_ttl)
    view = RegistryView(registry)
    inflight = InFlight(redis_client)
    kv_index = tokens = chooser = None
    if settings.policy == "kv_aware":
        kv_index = KVIndex(KVStore(redis_client, worker_key), settings.kv_index_max_blocks)
        tokens = PromptTokens(worker_token=settings.worker_token)
        chooser = KVAwareChooser(kv_index, tokens, settings.kv_hit_weight, settings.kv_load_slack)
    picker = Picker(settings.policy, inflight.total, PrefixIndex(settings.prefix_index_size), kv=chooser)
    limiter = RateLimiter(redis_client, settings.requests_per_minute, settings.tokens_per_minute)
    metrics = RouterMetrics(lambda: {wid: inflight.total(wid) for wid in view.workers},
                            lambda: proxy.breaker.states())
    if chooser is not None:
        metrics.add_kv_aware(chooser, kv_index)
    proxy = Proxy(view, picker, inflight, metrics, settings)
    scheduler = AsyncIOScheduler()

    async def resync() -> None:
        await view.resync()
        proxy.breaker.forget(set(view.workers))  # workers gone from the registry
        if kv_index is not None:
            kv_index.retain(set(view.workers))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await view.start()
        if kv_index is not None:
            await kv_index.start()
        every = dict(trigger="interval", max_instances=1, coalesce=True, misfire_grace_time=None)
        scheduler.add_job(resync, seconds=settings.resync_interval, id="resync", **every)
        scheduler.add_job(inflight.sync_quietly, seconds=inflight.interval, id="inflight", **every)
        for hook in on_startup or []:
            await hook(scheduler)
        scheduler.start()
        log.info("router ready: policy=%s workers=%d redis=%s", settings.policy, len(view.workers),
                 "ok" if view.redis_ok else "unreachable")
        try:
            yield
        finally:
            scheduler.shutdown(wait=False)
            await inflight.stop()
            await view.stop()
            if kv_index is not None:
                await kv_index.stop()
                await tokens.close()
            proxy.close()

    app = FastAPI(title=title, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.view, app.state.settings = view, settings
    started = int(time.time())
    app.state.metrics, app.state.proxy, app.state.limiter = metrics, proxy, limiter
    install_error_handlers(app, ErrorTable(), settings.max_body_bytes, settings.body_timeout)
    publish_openapi(app)  # the proxied routes (router/front.py) in /openapi.json too

    def require_reader(request: Request) -> None:
        allowed = list(settings.api_keys) + ([settings.worker_token] if settings.worker_token else [])
        require_bearer(request.scope["headers"], allowed, "a client key or the worker token is required")

    @app.get("/health")
    async def health():
        try:
            await redis_client.ping()
        except Exception as e:
            raise APIError(503, f"redis unreachable: {type(e).__name__}") from None
        return {"status": "ok", "workers": len(view.live())}

    app.add_api_route("/ping", health, methods=["GET", "POST"])  # vLLM's (SageMaker's) health check

    @app.get("/version")
    async def version():
        return {"version": package_version()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prom():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        require_bearer(request.scope["headers"], settings.api_keys)
        return {"object": "list", "data": [
            {"id": m["name"], "object": "model", "created": started, "owned_by": "llm-cluster",
             "root": m.get("alias_of") or m["name"], "parent": None, "max_model_len": m.get("max_model_len"),
             "kind": m.get("kind")} for m in view.models()]}

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
