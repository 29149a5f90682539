"""In-flight request counts per worker, shared between router replicas through Redis.

Each replica keeps exact local counts and republishes them as a whole (hash
``llmc:inflight:{replica}`` with a short TTL) a few times a second, and reads the other replicas'
hashes back. Counts cannot drift: they are recomputed from live requests, and a dead replica's
hash simply expires.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter

import redis.asyncio as aioredis

log = logging.getLogger("router.inflight")
KEY = "llmc:inflight:"


class InFlight:
    """Exact local in-flight counts per worker plus the other replicas' (the app schedules
    :meth:`sync_quietly` every ``interval`` seconds)."""

    def __init__(self, client: aioredis.Redis, replica_id: str | None = None, interval: float = 0.2):
        self.r = client
        self.replica_id = replica_id or uuid.uuid4().hex[:12]
        self.interval = interval
        self.local: Counter[str] = Counter()
        self.remote: dict[str, int] = {}

    def inc(self, wid: str) -> None:
        self.local[wid] += 1

    def dec(self, wid: str) -> None:
        self.local[wid] -= 1
        if self.local[wid] <= 0:
            del self.local[wid]

    def total(self, wid: str) -> int:
        return self.local.get(wid, 0) + self.remote.get(wid, 0)

    async def stop(self) -> None:
        """Withdraw this replica's counts."""
        try:
            await self.r.delete(KEY + self.replica_id)
        except Exception:
            pass

    async def sync(self) -> None:
        mine = KEY + self.replica_id
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(mine)
        if self.local:
            pipe.hset(mine, mapping=dict(self.local))
            pipe.pexpire(mine, int(max(2.0, self.interval * 10) * 1000))
        await pipe.execute()
        others: Counter[str] = Counter()
        async for key in self.r.scan_iter(match=KEY + "*", count=100):
            if key == mine:
                continue
            for wid, n in (await self.r.hgetall(key)).items():
                others[wid] += int(n)
        self.remote = dict(others)

    async def sync_quietly(self) -> None:
        """:meth:`sync`, for the scheduler: a Redis outage is logged, not raised."""
        try:
            await self.sync()
        except Exception as e:
            log.debug("in-flight sync failed: %s", type(e).__name__)
