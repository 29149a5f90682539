"""The manager's app: the router's endpoints plus registry writes, the sweeper and the dashboard."""

from __future__ import annotations

import json
import logging

import redis.asyncio as aioredis
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

from router.app import bearer, create_router_app, matches
from router.settings import RouterSettings
from worker.errors import APIError

from .dashboard import PAGE
from .registry import Registry

log = logging.getLogger("manager")


def create_manager_app(settings: RouterSettings, redis_client: aioredis.Redis,
                       sweep_interval: float | None = None) -> FastAPI:
    registry = Registry(redis_client, settings.heartbeat_ttl)
    scheduler = AsyncIOScheduler()

    async def sweep():
        try:
            gone = await registry.sweep()
        except Exception as e:
            log.warning("sweep failed: %s", type(e).__name__)
            return
        for wid in gone:
            log.info("evicted worker %s (no heartbeat for %.0fs)", wid, settings.heartbeat_ttl)

    async def start():
        scheduler.add_job(sweep, "interval", seconds=sweep_interval or max(0.5, settings.heartbeat_ttl / 5),
                          max_instances=1, coalesce=True, id="sweep")
        scheduler.start()

    async def stop():
        if scheduler.running:
            scheduler.shutdown(wait=False)

    app = create_router_app(settings, redis_client, title="llm-cluster manager", on_startup=[start],
                            on_shutdown=[stop])
    view = app.state.view

    def require_worker(request: Request) -> None:
        # Checked before the body is read: unauthenticated writes cost nothing.
        if settings.worker_token and not matches(bearer(request), [settings.worker_token]):
            raise APIError(401, "worker token required", None, "invalid_worker_token")

    async def json_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}", None) from e
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object", None)
        return body

    @app.post("/workers")
    async def register(request: Request):
        require_worker(request)
        body = await json_body(request)
        wid, url, models = body.get("id"), body.get("url"), body.get("models")
        if not isinstance(wid, str) or not wid or not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise APIError(400, "id (string) and url (http(s) URL) are required", "id")
        if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("name"), str)
                                                   for m in models):
            raise APIError(400, "models must be a list of {name, kind, max_model_len}", "models")
        info = await registry.register(wid, url, models, body.get("load") or {})
        await view.resync()
        log.info("registered worker %s at %s with %s", wid, url, info.model_names)
        return {"id": wid, "heartbeat_ttl": settings.heartbeat_ttl}

    @app.post("/workers/{wid}/heartbeat")
    async def heartbeat(wid: str, request: Request):
        require_worker(request)
        body = await json_body(request)
        if not await registry.heartbeat(wid, body.get("load") or {}):
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
        await view.resync()
        log.info("worker %s deregistered", wid)
        return {"id": wid, "removed": True}

    @app.get("/", response_class=HTMLResponse)
    async def dashboard():
        return PAGE

    return app
