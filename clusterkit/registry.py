"""The worker registry: its wire schema (what workers send) and its Redis layout (what every
control-plane process reads and the manager writes).

Keys (prefix ``llmc:``):
  worker:{id}      hash: id, url, models (JSON list of {name, kind, max_model_len, alias_of}: one
                   entry per served name), status
                   (ready|draining), last_heartbeat, registered_at, load (JSON); it never
                   expires by itself: the manager's sweeper evicts silent workers, so while the
                   manager is down (nobody can heartbeat) the last known workers stay routable
  model:{name}     set of worker ids serving the model
  heartbeats       sorted set id -> last heartbeat time (the sweeper evicts the stale end)
  events           pub/sub channel: every change publishes the worker id (RESYNC: all of them),
                   routers resync

Heartbeats, status changes and evictions run as Lua scripts: each is one atomic step, so a
heartbeat racing an eviction either refreshes a whole record or finds none (never a stub
record without a URL), and an eviction never removes a worker whose heartbeat just landed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, field_validator
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

PREFIX = "llmc:"
EVENTS = PREFIX + "events"
RESYNC = "*"  # published on EVENTS instead of a worker id: every router reads the whole registry again
HEARTBEATS = PREFIX + "heartbeats"


def worker_key(wid: str) -> str:
    return f"{PREFIX}worker:{wid}"


def model_key(name: str) -> str:
    return f"{PREFIX}model:{name}"


def redis_client(url: str) -> aioredis.Redis:
    """The async client every control-plane process uses: stale connections (a Redis restart)
    are retried with backoff instead of failing the first command after it."""
    return aioredis.from_url(url, decode_responses=True, socket_connect_timeout=3, socket_timeout=5,
                             health_check_interval=10,
                             retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 4),
                             retry_on_error=[RedisConnectionError, RedisTimeoutError])


# -- wire schema (worker -> manager) ---------------------------------------------------------------
class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelInfo(_Wire):
    """One model a worker serves."""

    model_config = ConfigDict(extra="allow")  # newer workers may describe more
    name: str = Field(min_length=1)
    kind: str = "generate"
    max_model_len: int | None = None
    # Set on another served name of a model (served_model_name): the model's first name. Left out
    # of the wire when unset, so a model's own entry stays {name, kind, max_model_len}.
    alias_of: str | None = Field(None, exclude_if=lambda v: v is None)
    # KV-aware routing (clusterkit/kv_wire.py), generation models only: the engine's block size,
    # its model root (hex; the seed of its hash chains) and a digest of what renders and
    # tokenizes its prompts (tokenizer + chat template), under which routers cache the tokenizer
    # they fetch from the worker's /tokenizer_info.
    kv_block_size: int | None = Field(None, exclude_if=lambda v: v is None)
    kv_root: str | None = Field(None, exclude_if=lambda v: v is None)
    tokenizer_digest: str | None = Field(None, exclude_if=lambda v: v is None)


class RegisterBody(_Wire):
    """``POST /workers``."""

    id: str = Field(min_length=1, max_length=128)
    url: str
    models: list[ModelInfo]
    load: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return v


class HeartbeatBody(_Wire):
    """``POST /workers/{id}/heartbeat``."""

    load: dict[str, dict[str, Any]] = Field(default_factory=dict)


# -- records ---------------------------------------------------------------------------------------
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
    def from_hash(cls, h: dict) -> WorkerInfo:
        return cls(id=h["id"], url=h["url"], models=json.loads(h.get("models", "[]")),
                   status=h.get("status", "ready"), last_heartbeat=float(h.get("last_heartbeat", 0)),
                   registered_at=float(h.get("registered_at", 0)), load=json.loads(h.get("load", "{}")))


# KEYS: worker hash, heartbeats zset; ARGV: id, now, load JSON, events channel
_HEARTBEAT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'last_heartbeat', ARGV[2], 'load', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 1
"""

# KEYS: heartbeats zset; ARGV: now, events channel, RESYNC, worker key prefix, then the ids.
# Heartbeats that keep the load, all in one step and announced as one RESYNC, so routers see
# them all at once (one by one, the first renewed would leave the rest a TTL behind it).
_RENEW = """
local renewed = {}
for i = 5, #ARGV do
  local key = ARGV[4] .. ARGV[i]
  if redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, 'last_heartbeat', ARGV[1])
    redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i])
    renewed[#renewed + 1] = ARGV[i]
  end
end
if #renewed > 0 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return renewed
"""

# KEYS: worker hash; ARGV: id, status, events channel
_SET_STATUS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[1])
return 1
"""

# KEYS: worker hash, heartbeats zset; ARGV: id, cutoff (1e308: unconditional), model key prefix,
# events channel. Removes the worker unless its heartbeat is newer than the cutoff.
_REMOVE = """
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
local exists = redis.call('EXISTS', KEYS[1]) == 1
if exists and score and tonumber(score) > tonumber(ARGV[2]) then return 0 end
if exists then
  local models = redis.call('HGET', KEYS[1], 'models')
  if models then
    for _, m in ipairs(cjson.decode(models)) do redis.call('SREM', ARGV[3] .. m['name'], ARGV[1]) end
  end
  redis.call('DEL', KEYS[1])
end
redis.call('ZREM', KEYS[2], ARGV[1])
if exists or score then redis.call('PUBLISH', ARGV[4], ARGV[1]) end
if exists then return 1 end
return 0
"""


class Registry:
    """Registry operations over a ``redis.asyncio`` client (decode_responses=True)."""

    def __init__(self, client: aioredis.Redis, ttl: float = 15.0):
        self.r = client
        self.ttl = ttl
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._renew = client.register_script(_RENEW)
        self._set_status = client.register_script(_SET_STATUS)
        self._remove = client.register_script(_REMOVE)

    async def register(self, body: RegisterBody) -> WorkerInfo:
        now = time.time()
        wid = body.id
        models = [m.model_dump(exclude_none=False) for m in body.models]
        old = await self.get(wid)
        info = WorkerInfo(id=wid, url=body.url, models=models, status="ready", last_heartbeat=now,
                          registered_at=now, load=body.load)
        pipe = self.r.pipeline(transaction=True)
        if old is not None:  # re-registration may change the model list
            for name in set(old.model_names) - set(info.model_names):
                pipe.srem(model_key(name), wid)
        pipe.delete(worker_key(wid))
        pipe.hset(worker_key(wid), mapping={"id": wid, "url": body.url, "models": json.dumps(models),
                                            "status": "ready", "last_heartbeat": now,
                                            "registered_at": now, "load": json.dumps(body.load)})
        for name in info.model_names:
            pipe.sadd(model_key(name), wid)
        pipe.zadd(HEARTBEATS, {wid: now})
        pipe.publish(EVENTS, wid)
        await pipe.execute()
        return info

    async def heartbeat(self, wid: str, load: dict | None) -> bool:
        """Refresh a worker's liveness and load; False (and nothing written) if the registry
        does not know it."""
        ok = await self._heartbeat(keys=[worker_key(wid), HEARTBEATS],
                                   args=[wid, time.time(), json.dumps(load or {}), EVENTS])
        return bool(ok)

    async def renew(self) -> list[str]:
        """The manager's grace after its own start: workers could not heartbeat while it was down,
        so every worker that was live when heartbeats stopped (within a TTL of the newest one) is
        stamped as heard from now and gets one TTL to heartbeat before the sweeper may evict it.
        Returns the renewed ids."""
        scored = await self.r.zrange(HEARTBEATS, 0, -1, withscores=True)
        if not scored:
            return []
        newest = max(score for _, score in scored)
        ids = [wid for wid, score in scored if score >= newest - self.ttl]
        return list(await self._renew(keys=[HEARTBEATS], args=[time.time(), EVENTS, RESYNC, worker_key(""), *ids]))

    async def set_status(self, wid: str, status: str) -> bool:
        return bool(await self._set_status(keys=[worker_key(wid)], args=[wid, status, EVENTS]))

    async def remove(self, wid: str, stale_before: float | None = None) -> bool:
        """Remove a worker (only if its last heartbeat is older than ``stale_before``, when given);
        True if a record was removed."""
        cutoff = "1e308" if stale_before is None else repr(stale_before)  # Lua's tonumber has no inf
        return bool(await self._remove(keys=[worker_key(wid), HEARTBEATS],
                                       args=[wid, cutoff, model_key(""), EVENTS]))

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
        """Evict workers whose heartbeat is older than the TTL (or whose hash is gone); each
        eviction re-checks the heartbeat atomically, so one that just landed wins."""
        cutoff = time.time() - self.ttl
        candidates = set(await self.r.zrangebyscore(HEARTBEATS, "-inf", cutoff))
        for wid in await self.r.zrange(HEARTBEATS, 0, -1):
            if wid not in candidates and not await self.r.exists(worker_key(wid)):
                candidates.add(wid)
        gone = []
        for wid in candidates:
            if await self.remove(wid, stale_before=cutoff) or not await self.r.exists(worker_key(wid)):
                gone.append(wid)
        # Model indexes may still name workers whose hash is gone.
        async for key in self.r.scan_iter(match=model_key("*")):
            for wid in await self.r.smembers(key):
                if not await self.r.exists(worker_key(wid)):
                    await self.r.srem(key, wid)
        return sorted(gone)
