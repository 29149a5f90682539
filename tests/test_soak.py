"""Soak and chaos: ``scripts/soak.py`` for one minute, and regressions for what the soak found."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from procs import ROOT, Proc, start_manager, start_redis, start_router, start_worker, wait_until

from clusterkit.registry import EVENTS, HEARTBEATS, RESYNC, ModelInfo, RegisterBody, Registry, redis_client, worker_key
from router.state import RegistryView

TOKEN = "soak-test-token"
WAUTH = {"Authorization": f"Bearer {TOKEN}"}


def _ours(pid: int, workdir: Path) -> bool:
    """Whether ``pid`` is still a process the soak started (its command line or its working
    directory names the soak's workdir: redis-server rewrites its title but runs in --dir)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return str(workdir) in cmdline or cwd == str(workdir)


def _leftovers(workdir: Path) -> list[int]:
    pids = workdir / "pids.txt"
    if not pids.exists():
        return []
    return [int(line.split()[0]) for line in pids.read_text().splitlines() if line.strip()
            and _ours(int(line.split()[0]), workdir)]


@pytest.mark.timeout(420)
def test_one_minute_soak_loses_nothing(model_dir, tmp_path):
    workdir, out = tmp_path / "soak", tmp_path / "soak.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "soak.py"), "--duration", "60", "--workers", "2",
           "--clients", "6", "--fault-spacing", "12", "--models-dir", str(model_dir),
           "--workdir", str(workdir), "--json", str(out)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        output, _ = p.communicate(timeout=360)
    finally:
        if p.poll() is None:  # the script cleans up on SIGTERM; SIGKILL if it does not
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        left = _leftovers(workdir)
        for pid in left:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not left, f"processes the soak started were left running: {left}"
    assert p.returncode == 0, output[-6000:]
    result = json.loads(out.read_text())
    req = result["requests"]
    assert req["lost"] == 0, result["lost_examples"]
    assert req["streams_cut_without_error_event"] == 0, result["truncated_examples"]
    assert req["succeeded"] > 100 and req["abandoned_by_client"] > 0
    # Every input class ran, and every fault was injected.
    assert set(req["by_kind"]) == {"chat", "chat-stream", "chat-stream-n2", "completions", "completions-n2",
                                   "completions-stream", "completions-stream-n2", "embeddings"}
    assert {f["kind"] for f in result["faults"]} == {"kill", "redis", "drain", "undrain", "manager"}
    for f in result["faults"]:
        assert f["converged_s"] is not None and f["converged_s"] <= f["bound_s"], f
    # No KV block held and no request left on any worker once the load stopped.
    for worker, per in result["kv"].items():
        for model, v in per.items():
            assert v["kv_usage"] == 0 and v["running"] == 0 and v["waiting"] == 0, (worker, model, v)
            assert v["leaked_blocks"] == 0, (worker, model, v)
    assert all(c["ok"] for c in result["checks"]), result["checks"]
    for line in ("lost requests", "streams cut without the error event", "KV blocks leaked"):
        assert line in output


def _complete(url: str, model: str = "m") -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 2},
                      timeout=30)


def _workers(url: str) -> list[dict]:
    return httpx.get(f"{url}/workers", headers=WAUTH, timeout=5).json()


def _manager_on(tmp: Path, port: int, redis_url: str, ttl: str) -> Proc:
    proc = Proc(["-m", "manager", "--host", "127.0.0.1", "--port", str(port), "--redis-url", redis_url,
                 "--heartbeat-ttl", ttl], tmp / f"manager-{port}-{time.monotonic_ns()}.log", {"WORKER_TOKEN": TOKEN})
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
    except Exception:
        proc.stop()
        raise
    return proc


def test_manager_outage_longer_than_the_ttl_keeps_every_worker(model_dir, tmp_path):
    """Found by the soak: a manager restart that took longer than the heartbeat TTL emptied the
    registry (worker records expired in Redis, the router's own cutoff dropped them, the restarted
    manager's first sweep evicted them, and workers backed off for up to 60 s), so every router
    replica answered 404/503 with every worker up. And a model whose last worker left was a 404."""
    env = {"WORKER_TOKEN": TOKEN}
    redis = start_redis(tmp_path)
    procs: list[Proc] = []
    try:
        mgr, murl = start_manager(tmp_path, "--redis-url", redis.url, "--heartbeat-ttl", "2", env=env)
        procs.append(mgr)
        router, rurl = start_router(tmp_path, redis.url, "--heartbeat-ttl", "2", env=env)
        procs.append(router)
        worker, _ = start_worker(tmp_path, f"m={model_dir / 'tiny-llama'}", "--manager-url", murl,
                                 "--heartbeat-interval", "0.3", env=env, ready_headers=WAUTH)
        procs.append(worker)
        wait_until(lambda: len(_workers(rurl)) == 1, what="the worker registered")
        wid = _workers(rurl)[0]["id"]

        mgr.stop()
        time.sleep(5)  # 2.5 TTLs without a heartbeat reaching the registry
        assert [w["id"] for w in _workers(rurl)] == [wid]
        r = _complete(rurl)
        assert r.status_code == 200, r.text  # was 404: the record had expired

        mgr = _manager_on(tmp_path, int(murl.rsplit(":", 1)[1]), redis.url, "2")
        procs.append(mgr)
        back = time.time()
        wait_until(lambda: _workers(murl)[0]["last_heartbeat"] > back, timeout=10, what="a heartbeat")
        time.sleep(3)  # past the manager's grace (one TTL from its start): the worker was heard from
        # within it, so it was never evicted and never had to register again.
        assert [w["id"] for w in _workers(murl)] == [wid]
        assert "evicted" not in mgr.log() and "registered worker" not in mgr.log(), mgr.log()[-2000:]
        assert _complete(rurl).status_code == 200

        # Its only worker gone, the model is unavailable (503, retry later), not unknown (404).
        worker.stop(signal.SIGKILL)
        r = _complete(rurl)
        assert r.status_code == 503, r.text  # connection refused: was 502
        wait_until(lambda: _workers(rurl) == [], timeout=6, what="eviction")
        r = _complete(rurl)
        assert r.status_code == 503 and r.json()["error"]["code"] != "model_not_found", r.text
        assert _complete(rurl, "never-served").status_code == 404
    finally:
        for p in procs:
            p.stop()
        redis.stop()


def test_router_view_rides_out_an_empty_restarted_redis_and_a_silent_registry(tmp_path):
    """Found by the soak: right after Redis restarted empty, a router resync emptied its view
    until the workers registered again (up to one heartbeat later), and requests in between got
    503 with every worker up. Workers heard from within the TTL now stay; and when no heartbeat at
    all reaches the registry for a TTL (manager down), the view keeps routing to the last ones."""
    redis = start_redis(tmp_path)

    async def main():
        client = redis_client(redis.url)
        reg = Registry(client, ttl=1.0)
        view = RegistryView(reg)
        try:
            await reg.register(RegisterBody(id="w1", url="http://127.0.0.1:1", models=[ModelInfo(name="m")]))
            await view.resync()
            assert [w.id for w in view.live("m")] == ["w1"]
            await client.flushall()  # what a restarted Redis without persistence holds
            await view.resync()
            assert [w.id for w in view.live("m")] == ["w1"]
            assert view.knows("m") and not view.knows("other")
            await asyncio.sleep(1.2)  # a TTL without a heartbeat, and no record: gone
            await view.resync()
            assert view.workers == {} and view.live("m") == []
            assert view.knows("m")  # still a 503 (its workers left), not a 404

            # Records whose heartbeats all stopped (nobody writes the registry): still routable,
            # together, although their last heartbeats were not at the same moment.
            await reg.register(RegisterBody(id="w1", url="http://127.0.0.1:1", models=[ModelInfo(name="m")]))
            await asyncio.sleep(0.5)
            await reg.register(RegisterBody(id="w2", url="http://127.0.0.1:2", models=[ModelInfo(name="m")]))
            await view.resync()
            await asyncio.sleep(0.7)  # w1 is a TTL old now, w2 not yet
            assert sorted(w.id for w in view.live("m")) == ["w1", "w2"]
            await asyncio.sleep(0.5)
            await view.resync()
            assert sorted(w.id for w in view.live("m")) == ["w1", "w2"]
            # ...until one heartbeat lands: then the silent ones are judged by the TTL again.
            await reg.register(RegisterBody(id="w3", url="http://127.0.0.1:3", models=[ModelInfo(name="m")]))
            await view.resync()
            assert [w.id for w in view.live("m")] == ["w3"]
            assert await client.zscore(HEARTBEATS, "w2") is not None  # eviction is the sweeper's job
            assert await client.ttl(worker_key("w2")) == -1  # and records never expire by themselves
        finally:
            await client.aclose()

    try:
        asyncio.run(main())
    finally:
        redis.stop()


def test_a_starting_manager_renews_the_workers_that_were_live_all_at_once(tmp_path):
    """``Registry.renew`` (the manager's grace at start-up): the workers live when heartbeats
    stopped get a fresh heartbeat in one step, announced with one RESYNC event; one that was
    already a TTL behind them does not."""
    redis = start_redis(tmp_path)

    async def main():
        client = redis_client(redis.url)
        reg = Registry(client, ttl=3.0)
        try:
            for wid in ("a", "b", "dead"):
                await reg.register(RegisterBody(id=wid, url=f"http://127.0.0.1:1/{wid}", models=[ModelInfo(name="m")]))
            t = time.time() - 60  # the manager was down for a minute
            for wid, at in (("a", t), ("b", t - 1), ("dead", t - 10)):
                await client.hset(worker_key(wid), "last_heartbeat", at)
                await client.zadd(HEARTBEATS, {wid: at})
            pubsub = client.pubsub()
            await pubsub.subscribe(EVENTS)
            await pubsub.get_message(timeout=1)  # the subscription's confirmation
            before = time.time()
            assert sorted(await reg.renew()) == ["a", "b"]
            stamps = {w.id: w.last_heartbeat for w in await reg.all()}
            assert stamps["a"] == stamps["b"] >= before and stamps["dead"] == t - 10
            msg = await pubsub.get_message(timeout=2)
            assert msg and msg["data"] == RESYNC
            assert await pubsub.get_message(timeout=0.2) is None  # one event, not one per worker
            await pubsub.aclose()
            assert await reg.sweep() == ["dead"]
        finally:
            await client.aclose()

    try:
        asyncio.run(main())
    finally:
        redis.stop()


def test_router_view_misses_nothing_published_before_it_subscribed(tmp_path):
    """Found by the soak: a restarted manager's own view missed the RESYNC it published while
    its event listener was not subscribed yet, so until each worker's next heartbeat it judged
    the others (stamped before the outage) a TTL behind and answered 503 for their models."""
    redis = start_redis(tmp_path)

    async def main():
        client = redis_client(redis.url)
        reg = Registry(client, ttl=30.0)
        view = RegistryView(reg)
        try:
            await view.resync()  # what start() does before its listener subscribes...
            await reg.register(RegisterBody(id="w1", url="http://127.0.0.1:1", models=[ModelInfo(name="m")]))
            listener = asyncio.create_task(view._listen())  # ...and this event was published before
            for _ in range(100):
                if "w1" in view.workers:
                    break
                await asyncio.sleep(0.02)
            assert "w1" in view.workers
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        finally:
            await client.aclose()

    try:
        asyncio.run(main())
    finally:
        redis.stop()
