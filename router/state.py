"""The router's in-memory view of the registry: change notifications plus periodic resyncs."""

from __future__ import annotations

import asyncio
import logging
import time

from clusterkit.registry import EVENTS, Registry, WorkerInfo

log = logging.getLogger("router.state")


class RegistryView:
    """Snapshot of live workers, refreshed by Redis pub/sub events, plus full resyncs (the app
    schedules :meth:`resync` periodically; that heals missed events and Redis restarts)."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.workers: dict[str, WorkerInfo] = {}
        self.redis_ok = False
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        await self.resync()
        self._tasks = [asyncio.create_task(self._listen())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def resync(self) -> None:
        try:
            workers = await self.registry.all()
        except Exception as e:  # Redis down: keep the last snapshot, routes keep working
            if self.redis_ok:
                log.warning("registry resync failed (%s); keeping last snapshot", type(e).__name__)
            self.redis_ok = False
            return
        self.redis_ok = True
        self.workers = {w.id: w for w in workers}

    async def _refresh_one(self, wid: str) -> None:
        info = await self.registry.get(wid)
        if info is None:
            self.workers.pop(wid, None)
        else:
            self.workers[wid] = info

    async def _listen(self) -> None:
        backoff = 0.2
        while True:
            try:
                pubsub = self.registry.r.pubsub()
                await pubsub.subscribe(EVENTS)
                backoff = 0.2
                async for msg in pubsub.listen():
                    if msg.get("type") == "message":
                        await self._refresh_one(msg["data"])
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("registry events lost (%s); reconnecting", type(e).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                await self.resync()

    def live(self, model: str | None = None) -> list[WorkerInfo]:
        """Ready workers whose heartbeat is within the TTL, optionally serving ``model``."""
        cutoff = time.time() - self.registry.ttl
        return [w for w in self.workers.values()
                if w.status == "ready" and w.last_heartbeat >= cutoff
                and (model is None or w.serves(model))]

    def models(self) -> list[dict]:
        """Each model of the live workers once (first worker's metadata)."""
        seen: dict[str, dict] = {}
        for w in self.live():
            for m in w.models:
                seen.setdefault(m["name"], m)
        return list(seen.values())
