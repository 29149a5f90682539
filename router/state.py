"""The router's in-memory view of the registry: change notifications plus periodic resyncs."""

from __future__ import annotations

import asyncio
import logging
import time

from clusterkit.registry import EVENTS, RESYNC, Registry, WorkerInfo

log = logging.getLogger("router.state")


class RegistryView:
    """Snapshot of live workers, refreshed by Redis pub/sub events, plus full resyncs (the app
    schedules :meth:`resync` periodically; that heals missed events and Redis restarts)."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.workers: dict[str, WorkerInfo] = {}
        # Every model name a registered worker served since start-up: one whose workers are all
        # gone for now is a 503 (retry later), not a 404. Only registered workers add names.
        self.known_models: set[str] = set()
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
        listed = {w.id: w for w in workers}
        # A worker missing from the listing but heard from within the TTL stays: Redis may have
        # restarted empty, and it registers again on its next heartbeat. (Deregistrations and
        # evictions arrive as events first; one really gone fails over on connect meanwhile.)
        cutoff = time.time() - self.registry.ttl
        for wid, w in self.workers.items():
            if wid not in listed and w.last_heartbeat >= cutoff:
                listed[wid] = w
        self.workers = listed
        for w in workers:
            self.known_models.update(w.model_names)

    async def _refresh_one(self, wid: str) -> None:
        info = await self.registry.get(wid)
        if info is None:
            self.workers.pop(wid, None)
        else:
            self.workers[wid] = info
            self.known_models.update(info.model_names)

    async def _listen(self) -> None:
        backoff = 0.2
        while True:
            try:
                pubsub = self.registry.r.pubsub()
                await pubsub.subscribe(EVENTS)
                # Read the whole registry once subscribed: what was published before (a starting
                # manager's RESYNC, changes while reconnecting) is then never missed.
                await self.resync()
                backoff = 0.2
                async for msg in pubsub.listen():
                    if msg.get("type") == "message":
                        await (self.resync() if msg["data"] == RESYNC else self._refresh_one(msg["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("registry events lost (%s); reconnecting", type(e).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def knows(self, model: str) -> bool:
        """Whether a registered worker served ``model`` since this view started."""
        return model in self.known_models

    def live(self, model: str | None = None) -> list[WorkerInfo]:
        """Ready workers heard from within a TTL of the newest heartbeat the registry holds (of
        now, if that is earlier), optionally serving ``model``. A dead worker falls a TTL behind
        the others; but when heartbeats stop reaching the registry at all, its writer (the
        manager) or Redis is down, not every worker: the last known ones stay live together (a
        dead one fails over on connect) until the manager's sweeper, back, evicts the silent."""
        newest = max((w.last_heartbeat for w in self.workers.values()), default=0.0)
        cutoff = min(time.time(), newest) - self.registry.ttl
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
