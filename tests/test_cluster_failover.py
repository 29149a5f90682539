"""Failures: a worker SIGKILLed under load, a stream cut by it, Redis restarting, embedded Redis."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import threading
import time

import httpx
import pytest
from procs import start_manager, start_redis, start_worker, wait_until

TOKEN = "failover-token"
WAUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def env(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failover")
    redis = start_redis(tmp)
    procs = {}
    state = {"redis": redis, "procs": procs, "tmp": tmp, "model_dir": model_dir}
    mgr = None
    try:
        mgr, url = start_manager(tmp, "--redis-url", redis.url, "--worker-token", TOKEN, "--heartbeat-ttl", "3")
        for name in ("a", "b"):
            procs[name] = start_worker(tmp, f"m={model_dir / 'tiny-llama'}", "--manager-url", url,
                                       "--heartbeat-interval", "0.5", env={"WORKER_TOKEN": TOKEN},
                                       ready_headers=WAUTH)
        wait_until(lambda: len(httpx.get(f"{url}/workers", headers=WAUTH).json()) == 2, what="2 workers")
        state["url"] = url
        yield state
    finally:
        for p, _ in procs.values():
            p.stop()
        if mgr is not None:
            mgr.stop()
        redis.stop()
        state["redis"].stop()  # the restart test swaps in a new server


def workers(url):
    return httpx.get(f"{url}/workers", headers=WAUTH).json()


def test_sigkill_under_load_loses_no_unstarted_request(env):
    url = env["url"]
    ids = {w["url"]: w["id"] for w in workers(url)}
    # A stream that has started on some worker: that worker is the victim.
    body = {"model": "m", "prompt": "story " * 40, "max_tokens": 900, "stream": True, "ignore_eos": True}
    results: list = []

    async def load():
        async with httpx.AsyncClient(timeout=120) as c:
            rs = await asyncio.gather(*(c.post(f"{url}/v1/completions", json={
                "model": "m", "prompt": f"request {i}", "max_tokens": 300, "ignore_eos": True}) for i in range(16)))
            results.extend(rs)

    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        victim_id = r.headers["x-llmc-worker"]
        lines = r.iter_lines()
        first = [next(lines) for _ in range(3)]
        assert all(x.startswith("data: ") or x == "" for x in first)
        t = threading.Thread(target=lambda: asyncio.run(load()))
        t.start()
        time.sleep(0.3)
        victim = next(name for name, (p, wurl) in env["procs"].items() if ids[wurl] == victim_id)
        killed_at = time.monotonic()
        env["procs"][victim][0].stop(sig=signal.SIGKILL)
        rest = [x for x in lines if x.startswith("data: ")]
    # The started stream ends with an error event (then [DONE]), never a silent truncation.
    assert rest[-1] == "data: [DONE]"
    err = json.loads(rest[-2][6:])
    assert "error" in err and victim_id in err["error"]["message"]
    t.join(120)
    # None of the non-streaming requests had sent a byte: all were retried and succeeded.
    assert len(results) == 16
    assert all(r.status_code == 200 for r in results), [r.text[:200] for r in results if r.status_code != 200]
    assert all(r.json()["usage"]["completion_tokens"] == 300 for r in results)
    survivor_id = next(w for w in ids.values() if w != victim_id)
    assert all(r.headers["x-llmc-worker"] == survivor_id for r in results[-4:])
    # The dead worker leaves the registry within its TTL (3 s) plus one sweep.
    wait_until(lambda: [w["id"] for w in workers(url)] == [survivor_id], timeout=6, what="eviction")
    assert time.monotonic() - killed_at < 6
    metrics = httpx.get(f"{url}/metrics").text
    assert "router_retries_total" in metrics
    env["procs"].pop(victim)


def test_redis_restart_brings_every_worker_back(env):
    url = env["url"]
    env["procs"]["c"] = start_worker(env["tmp"], f"m={env['model_dir'] / 'tiny-llama'}", "--manager-url", url,
                                     "--heartbeat-interval", "0.5", env={"WORKER_TOKEN": TOKEN},
                                     ready_headers=WAUTH)
    wait_until(lambda: len(workers(url)) == 2, what="2 workers")
    before = sorted(w["id"] for w in workers(url))
    redis = env["redis"]
    port = redis.port
    redis.stop()  # no persistence: the registry is gone
    restarted = start_redis(env["tmp"], port=port)
    env["redis"] = restarted
    t0 = time.monotonic()
    wait_until(lambda: sorted(w["id"] for w in workers(url)) == before, timeout=10, what="re-registration")
    # Within about one heartbeat interval (0.5 s) plus the router's resync.
    assert time.monotonic() - t0 < 5
    r = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "back", "max_tokens": 3})
    assert r.status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200


def test_manager_with_embedded_redis(tmp_path):
    data = tmp_path / "data"
    proc, url = start_manager(tmp_path, "--data-dir", str(data), "--worker-token", TOKEN)
    try:
        r = httpx.post(f"{url}/workers", headers=WAUTH, json={
            "id": "w1", "url": "http://127.0.0.1:9", "models": [{"name": "x", "kind": "generate",
                                                                 "max_model_len": 8}]})
        assert r.status_code == 200
        assert [w["id"] for w in workers(url)] == ["w1"]
        assert httpx.post(f"{url}/workers/w1/drain", headers=WAUTH).status_code == 200
        wait_until(lambda: workers(url)[0]["status"] == "draining", what="draining")
        assert httpx.get(f"{url}/v1/models").json()["data"] == []  # draining workers are not listed
        m = re.search(r"embedded redis on redis://127\.0\.0\.1:(\d+)", proc.log())
        port = int(m.group(1))
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # the embedded redis runs
    finally:
        assert proc.stop() == 0
    with pytest.raises(OSError):  # and stopped with the manager
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert any(data.iterdir())  # persisted under --data-dir
    assert "worker: ready" not in proc.log() and "manager" in proc.log()
