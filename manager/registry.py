"""The worker registry in Redis.

Keys (prefix ``llmc:``):
  worker:{id}      hash: id, url, models (JSON list of {name, kind, max_model_len}), status
                   (ready|draining), last_heartbeat, registered_at, load (JSON); EXPIREs after the
                   heartbeat TTL, so a silent worker vanishes even with no sweeper running
  model:{name}     set of worker ids serving the model
  heartbeats       sorted set id -> last heartbeat time (the sweeper evicts the stale end)
  events           pub/sub channel: every change publishes the worker id, routers resync
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeoutError

PREFIX = "llmc:"
EVENTS = PREFIX + "events"
HEARTBEATS = PREFIX + "heartbeats"


def redis_client(url: str) -> aioredis.Redis:
    """The async client every control-plane process uses: stale connections (a Redis restart)
    are retried with backoff instead of failing the first command after it."""
    return aioredis.from_url(url, decode_responses=True, socket_connect_timeout=3, socket_timeout=5,
                             health_check_interval=10,
                             retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 4),
                             retry_on_error=[RedisConnectionError, RedisTimeoutError])


def worker_key(wid: str) -> str:
    return f"{PREFIX}worker:{wid}"


def model_key(name: str) -> str:
    return f"{PREFIX}model:{name}"


@dataclass
class WorkerInfo:
    """A worker as the registry knows it."""

    id: str
    url: str
    models: list[dict]
    status: str = "ready"
    last_heartbeat: float = 0.0
    registered_at: float = 0.0
    load: dict = field(default_factory=dict)

    @property
    def model_names(self) -> list[str]:
        return [m["name"] for m in self.models]

    def serves(self, model: str) -> bool:
        return any(m["name"] == model for m in self.models)

    def public(self) -> dict:
        return {"id": self.id, "url": self.url, "models": self.model_names, "status": self.status,
                "last_heartbeat": self.last_heartbeat, "load": self.load,
                "model_info": self.models}

    @classmethod
    def from_hash(cls, h: dict) -> "WorkerInfo":
        return cls(id=h["id"], url=h["url"], models=json.loads(h.get("models", "[]")),
                   status=h.get("status", "ready"), last_heartbeat=float(h.get("last_heartbeat", 0)),
                   registered_at=float(h.get("registered_at", 0)), load=json.loads(h.get("load", "{}")))


class Registry:
    """Registry operations over a ``redis.asyncio`` client (decode_responses=True)."""

    def __init__(self, client: aioredis.Redis, ttl: float = 15.0):
        self.r = client
        self.ttl = ttl

    async def register(self, wid: str, url: str, models: list[dict], load: dict | None = None) -> WorkerInfo:
        now = time.time()
        old = await self.get(wid)
        info = WorkerInfo(id=wid, url=url, models=models, status="ready", last_heartbeat=now,
                          registered_at=now, load=load or {})
        pipe = self.r.pipeline(transaction=True)
        if old is not None:  # re-registration may change the model list
            for name in set(old.model_names) - set(info.model_names):
                pipe.srem(model_key(name), wid)
        pipe.hset(worker_key(wid), mapping={"id": wid, "url": url, "models": json.dumps(models),
                                            "status": "ready", "last_heartbeat": now,
                                            "registered_at": now, "load": json.dumps(load or {})})
        pipe.pexpire(worker_key(wid), int(self.ttl * 1000))
        for name in info.model_names:
            pipe.sadd(model_key(name), wid)
        pipe.zadd(HEARTBEATS, {wid: now})
        pipe.publish(EVENTS, wid)
        await pipe.execute()
        return info

    async def heartbeat(self, wid: str, load: dict | None) -> bool:
        """Refresh a worker's liveness and load; False if the registry does not know it."""
        now = time.time()
        key = worker_key(wid)
        pipe = self.r.pipeline(transaction=True)
        pipe.exists(key)
        pipe.hset(key, mapping={"last_heartbeat": now, "load": json.dumps(load or {})})
        pipe.pexpire(key, int(self.ttl * 1000))
        pipe.zadd(HEARTBEATS, {wid: now})
        exists = (await pipe.execute())[0]
        if not exists:  # we just created a stub: remove it, the worker must register again
            await self.r.delete(key)
            await self.r.zrem(HEARTBEATS, wid)
            return False
        await self.r.publish(EVENTS, wid)
        return True

    async def set_status(self, wid: str, status: str) -> bool:
        key = worker_key(wid)
        if not await self.r.exists(key):
            return False
        await self.r.hset(key, "status", status)
        await self.r.publish(EVENTS, wid)
        return True

    async def remove(self, wid: str) -> bool:
        info = await self.get(wid)
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(worker_key(wid))
        pipe.zrem(HEARTBEATS, wid)
        for name in (info.model_names if info else []):
            pipe.srem(model_key(name), wid)
        pipe.publish(EVENTS, wid)
        await pipe.execute()
        return info is not None

    async def get(self, wid: str) -> WorkerInfo | None:
        h = await self.r.hgetall(worker_key(wid))
        if not h or "url" not in h:
            return None
        return WorkerInfo.from_hash(h)

    async def all(self) -> list[WorkerInfo]:
        ids = await self.r.zrange(HEARTBEATS, 0, -1)
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for wid in ids:
            pipe.hgetall(worker_key(wid))
        out = []
        for h in await pipe.execute():
            if h and "url" in h:
                out.append(WorkerInfo.from_hash(h))
        return sorted(out, key=lambda w: w.registered_at)

    async def sweep(self) -> list[str]:
        """Evict workers whose heartbeat is older than the TTL (or whose hash expired)."""
        cutoff = time.time() - self.ttl
        stale = set(await self.r.zrangebyscore(HEARTBEATS, "-inf", cutoff))
        for wid in await self.r.zrange(HEARTBEATS, 0, -1):
            if not await self.r.exists(worker_key(wid)):
                stale.add(wid)
        for wid in stale:
            await self.remove(wid)
        # Model indexes may still name workers whose hash expired between sweeps.
        async for key in self.r.scan_iter(match=model_key("*")):
            for wid in await self.r.smembers(key):
                if not await self.r.exists(worker_key(wid)):
                    await self.r.srem(key, wid)
        return sorted(stale)
