"""The manager's app: the router's endpoints plus registry writes, the sweeper and the dashboard."""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ValidationError

from clusterkit.auth import require_bearer
from clusterkit.errors import APIError, validation_error
from clusterkit.kv_wire import KVEventsBody, KVStore
from clusterkit.registry import HeartbeatBody, RegisterBody, Registry, worker_key
from router.app import create_router_app
from router.settings import RouterSettings

from .dashboard import page

log = logging.getLogger("manager")


def create_manager_app(settings: RouterSettings, redis_client: aioredis.Redis,
                       sweep_interval: float | None = None) -> FastAPI:
    """The router's app (serve it through ``router.app.entrypoint``) with the registry's write
    endpoints, a periodic sweep of silent workers and the dashboard."""
    registry = Registry(redis_client, settings.heartbeat_ttl)
    kv_store = KVStore(redis_client, worker_key)  # workers' prefix caches (KV-aware routing)

    async def drop_kv(wid: str) -> None:
        try:
            await kv_store.drop_worker(wid)
        except Exception as e:  # the next sweep or deregistration does not retry: log it
            log.warning("could not drop the KV index of worker %s: %s", wid, type(e).__name__)

    async def sweep():
        try:
            gone = await registry.sweep()
        except Exception as e:
            log.warning("sweep failed: %s", type(e).__name__)
            return
        for wid in gone:
            log.info("evicted worker %s (no heartbeat for %.0fs)", wid, settings.heartbeat_ttl)
            await drop_kv(wid)

    async def schedule_sweep(scheduler: AsyncIOScheduler):
        # Nobody could heartbeat while we were down: one TTL from now before the sweeper may
        # evict the workers that were live then (else a restart longer than the TTL empties
        # the registry and every router answers 503 with every worker up).
        try:
            renewed = await registry.renew()
            if renewed:
                log.info("renewed %d workers of the registry for one TTL", len(renewed))
        except Exception as e:
            log.warning("could not renew the registry's workers: %s", type(e).__name__)
        scheduler.add_job(sweep, "interval", seconds=sweep_interval or max(0.5, settings.heartbeat_ttl / 5),
                          max_instances=1, coalesce=True, misfire_grace_time=None, id="sweep")

    app = create_router_app(settings, redis_client, title="llm-cluster manager", on_startup=[schedule_sweep])
    view = app.state.view
    workers = [settings.worker_token] if settings.worker_token else []

    def require_worker(request: Request) -> None:
        # Checked before the body is read: unauthenticated writes cost nothing.
        require_bearer(request.scope["headers"], workers, "worker token required", "invalid_worker_token")

    async def body_of(request: Request, model: type[BaseModel]):
        try:
            return model.model_validate_json(await request.body() or b"{}")
        except ValidationError as e:
            raise validation_error(e.errors(include_url=False)) from None

    @app.post("/workers")
    async def register(request: Request):
        require_worker(request)
        body = await body_of(request, RegisterBody)
        info = await registry.register(body)
        await view.resync()
        log.info("registered worker %s at %s with %s", body.id, body.url, info.model_names)
        return {"id": body.id, "heartbeat_ttl": settings.heartbeat_ttl}

    @app.post("/workers/{wid}/heartbeat")
    async def heartbeat(wid: str, request: Request):
        require_worker(request)
        body = await body_of(request, HeartbeatBody)
        if not await registry.heartbeat(wid, body.load):
            raise APIError(404, f"unknown worker {wid!r}; register again", "id", "unknown_worker")
        return {"ok": True}

    @app.post("/workers/{wid}/drain")
    async def drain(wid: str, request: Request):
        require_worker(request)
        if not await registry.set_status(wid, "draining"):
            raise APIError(404, f"unknown worker {wid!r}", "id", "unknown_worker")
        await view.resync()
        return {"id": wid, "status": "draining"}

    @app.delete("/workers/{wid}")
    async def deregister(wid: str, request: Request):
        require_worker(request)
        if not await registry.remove(wid):
            raise APIError(404, f"unknown worker {wid!r}", "id", "unknown_worker")
        await drop_kv(wid)
        await view.resync()
        log.info("worker %s deregistered", wid)
        return {"id": wid, "removed": True}

    @app.post("/workers/{wid}/kv-events")
    async def kv_events(wid: str, request: Request):
        # One model's prefix-cache changes or snapshot (clusterkit/kv_wire.py); a snapshot of a
        # big cache is a few MB of JSON, well under the body limit (max_body_bytes).
        require_worker(request)
        body = await body_of(request, KVEventsBody)
        result = await kv_store.apply(wid, body)
        if result == KVStore.RESYNC:
            raise APIError(409, f"KV events of {body.model!r} do not follow on what the store holds "
                           f"(epoch or seq); send a snapshot", "first_seq", "kv_resync")
        if result == KVStore.UNKNOWN_WORKER:
            raise APIError(404, f"unknown worker {wid!r}; register again", "id", "unknown_worker")
        return {"ok": True}

    dashboard_page = page(settings.root_path)

    @app.get("/", response_class=HTMLResponse)
    async def dashboard():
        return dashboard_page

    return app
