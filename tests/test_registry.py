"""The registry's Redis layout (clusterkit/registry.py) against a real redis-server: heartbeats,
evictions and registrations racing each other leave whole records or none."""

from __future__ import annotations

import asyncio
import time

import pytest
from procs import start_redis

from clusterkit.registry import HEARTBEATS, ModelInfo, RegisterBody, Registry, model_key, redis_client, worker_key


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    r = start_redis(tmp_path_factory.mktemp("registry"))
    try:
        yield r.url
    finally:
        r.stop()


def body(wid: str) -> RegisterBody:
    return RegisterBody(id=wid, url=f"http://127.0.0.1:1/{wid}", models=[ModelInfo(name="m")])


async def records(client) -> list[dict]:
    return [await client.hgetall(k) async for k in client.scan_iter(match=worker_key("*"))]


def test_heartbeat_racing_registration_never_deletes_the_new_record(redis_url):
    # The old heartbeat created a stub for an unknown id and deleted it in a second step: a
    # registration landing in between was deleted with it, and the worker vanished.
    async def main():
        client = redis_client(redis_url)
        reg = Registry(client, ttl=30)
        await client.flushdb()
        for i in range(150):
            wid = f"w{i}"
            results = await asyncio.gather(reg.heartbeat(wid, {}), reg.register(body(wid)), reg.heartbeat(wid, {}))
            assert (await reg.get(wid)) is not None, f"registration of {wid} lost (heartbeats: {results})"
        for h in await records(client):
            assert "url" in h and "id" in h, f"stub record {h}"
        await client.aclose()
    asyncio.run(main())


def test_heartbeats_racing_evictions_leave_whole_records_or_none(redis_url):
    async def main():
        client = redis_client(redis_url)
        reg = Registry(client, ttl=30)
        await client.flushdb()
        for i in range(100):
            wid = f"w{i}"
            await reg.register(body(wid))
            await asyncio.gather(reg.remove(wid), reg.heartbeat(wid, {"m": {"num_running": 1}}),
                                 reg.set_status(wid, "draining"), reg.heartbeat(wid, {}))
            h = await client.hgetall(worker_key(wid))
            assert not h, f"record {h} survived removal (a stub written after it)"
            assert not await reg.heartbeat(wid, {}), "a heartbeat for a removed worker must say so"
            assert await client.zscore(HEARTBEATS, wid) is None
            assert not await client.sismember(model_key("m"), wid)
        assert await records(client) == []
        await client.aclose()
    asyncio.run(main())


def test_sweep_spares_a_worker_whose_heartbeat_just_landed(redis_url):
    async def main():
        client = redis_client(redis_url)
        reg = Registry(client, ttl=30)
        await client.flushdb()
        await reg.register(body("fresh"))
        await reg.register(body("stale"))
        old = time.time() - 60
        await client.zadd(HEARTBEATS, {"fresh": old, "stale": old})
        # "fresh" heartbeats between the sweep's scan and its eviction: the eviction re-checks.
        assert await reg.remove("fresh", stale_before=time.time() - 30) is True
        await reg.register(body("fresh"))
        await client.zadd(HEARTBEATS, {"stale": old})
        await reg.heartbeat("fresh", {})
        assert not await reg.remove("fresh", stale_before=time.time() - 30)
        assert await reg.sweep() == ["stale"]
        assert [w.id for w in await reg.all()] == ["fresh"]
        await client.aclose()
    asyncio.run(main())
