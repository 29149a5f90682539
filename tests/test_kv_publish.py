"""KV events from a worker's engines into Redis through the manager (KV-aware routing's feed).

Real Redis, a real manager process, real worker processes with a tiny model and a KV pool small
enough that blocks are evicted. The ground truth for what a worker's cache holds is the same
engine run in this process on the same prompts (same model path and dtype: same hashes), or for
in-process publishers the engine itself.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal

import httpx
import pytest
import redis
from procs import start_manager, start_redis, start_worker, wait_until

from clusterkit.kv_wire import STREAM, block_hashes, blocks_key, meta_key, root_hash
from engine.async_engine import AsyncEngine
from engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from engine.sampling_params import SamplingParams
from worker.kv_publisher import KVEventPublisher
from worker.registration import Registrar

TOKEN = "kv-worker-secret"
WAUTH = {"Authorization": f"Bearer {TOKEN}"}
BS, BLOCKS, MAXLEN = 4, 24, 64  # 96 tokens of KV: a handful of prompts evict earlier ones
ENGINE = {"block_size": BS, "num_kv_blocks": BLOCKS, "max_model_len": MAXLEN}


@pytest.fixture
def cluster(tmp_path):
    """Redis and a manager (heartbeat TTL 2 s, so the sweeper acts within a few seconds)."""
    rds = start_redis(tmp_path)
    procs = []
    try:
        mgr, url = start_manager(tmp_path, "--redis-url", rds.url, "--worker-token", TOKEN, "--heartbeat-ttl", "2")
        procs.append(mgr)
        client = redis.Redis.from_url(rds.url, decode_responses=True)
        yield {"url": url, "redis": client, "tmp": tmp_path, "procs": procs}
        client.close()
    finally:
        for p in reversed(procs):
            p.stop()
        rds.stop()


def start_kv_worker(c, model_dir):
    path = model_dir / "tiny-llama"
    yaml = (f"  kv_events_interval: 0.05\n  models:\n  - name: m\n    source: {path}\n"
            f"    block_size: {BS}\n    num_kv_blocks: {BLOCKS}\n    max_model_len: {MAXLEN}\n")
    proc, wurl = start_worker(c["tmp"], f"m={path}", "--manager-url", c["url"], "--heartbeat-interval", "0.3",
                              env={"WORKER_TOKEN": TOKEN}, ready_headers=WAUTH, worker_yaml=yaml)
    c["procs"].append(proc)
    wid = wait_until(lambda: next(w["id"] for w in httpx.get(f"{c['url']}/workers", headers=WAUTH).json()
                                  if w["url"] == wurl), what="worker registered")
    return proc, wurl, wid


def redis_set(r, wid, model="m") -> set[str]:
    return r.smembers(blocks_key(wid, model))


def entries(r, wid, model="m") -> list[dict]:
    return [f for _, f in r.xrange(STREAM) if f["w"] == wid and f["m"] == model]


def replay(stream: list[dict]) -> set[str]:
    """The set the stream's entries describe, starting from its one snapshot (of an empty cache)."""
    assert stream[0]["k"] == "snapshot", stream[0]
    held, seq = set(), int(stream[0]["s"])
    for e in stream[1:]:
        assert e["k"] == "ops" and e["e"] == stream[0]["e"]
        assert int(e["f"]) == seq + 1, "ops entries must follow on without a gap"
        seq = int(e["s"])
        for op in json.loads(e["d"]):
            if op[0] == "*":
                held.clear()
            elif op[0] == "+":
                held.update(op[1])
            else:
                held.difference_update(op[1])
    return held


def prompts(n: int, seed: int = 3) -> list[list[int]]:
    """Token-id prompts of 17-37 tokens, most sharing one of two 12-token prefixes."""
    rng = random.Random(seed)
    systems = [[rng.randrange(3, 300) for _ in range(12)] for _ in range(2)]
    return [(systems[i % 2] if i % 3 else []) + [rng.randrange(3, 300) for _ in range(rng.randint(5, 25))]
            for i in range(n)]


def hexes(hashes) -> set[str]:
    return {h.hex() for h in hashes}


def test_redis_holds_the_worker_cache_through_eviction_flushall_and_exit(cluster, model_dir, make_llm):
    r, url = cluster["redis"], cluster["url"]
    proc, wurl, wid = start_kv_worker(cluster, model_dir)
    # Started with a snapshot of its (empty) cache under a fresh epoch.
    meta = wait_until(lambda: r.hgetall(meta_key(wid, "m")) or None, what="first snapshot")
    assert meta["w"] == wid and meta["m"] == "m" and meta["seq"] == "-1" and len(meta["epoch"]) == 32
    assert redis_set(r, wid) == set()

    local = make_llm("llama", **ENGINE)  # the same engine in this process: the expected cache
    # The engine's salt is f"{model path}|{torch dtype}" (str of a torch dtype: "torch.float32").
    root = root_hash(f"{model_dir / 'tiny-llama'}|torch.float32")
    assert local.engine.kv.model_root == root
    entry = httpx.get(f"{url}/workers/{wid}", headers=WAUTH).json()["model_info"][0]
    # what the worker advertises for routers to hash prompts with
    assert entry["kv_root"] == root.hex() and entry["kv_block_size"] == BS

    seen: set[str] = set()
    ps = prompts(12)
    for i, p in enumerate(ps):
        out = httpx.post(f"{wurl}/v1/completions", headers=WAUTH, timeout=30,
                         json={"model": "m", "prompt": p, "max_tokens": 1, "temperature": 0})
        assert out.status_code == 200, out.text
        local.generate([{"prompt_token_ids": p}], SamplingParams(max_tokens=1, temperature=0))
        want = hexes(local.engine.kv.pool.cached_hashes())
        seen |= want
        wait_until(lambda w=want: redis_set(r, wid) == w, timeout=10, what=f"Redis set after prompt {i}")
        # Every full block of the newest prompt is cached, by the documented hash chain.
        assert hexes(block_hashes(p, BS, root)) <= want
    final = redis_set(r, wid)
    evicted = seen - final
    assert evicted and len(final) <= BLOCKS, "the small pool must have evicted blocks"
    assert not hexes(block_hashes(ps[0], BS, root)) <= final, "the oldest prompt's blocks were evicted"

    # The stream: one snapshot, then ops with contiguous batch seqs whose replay is the set.
    stream = entries(r, wid)
    assert [e["k"] for e in stream].count("snapshot") == 1
    assert replay(stream) == final
    assert any(op[0] == "-" for e in stream[1:] for op in json.loads(e["d"])), "evictions published"
    assert r.hget(meta_key(wid, "m"), "seq") == stream[-1]["s"]
    epoch = meta["epoch"]

    # Redis loses everything: the worker registers again, its next batch is refused (409) and a
    # snapshot restores the whole set, the blocks cached before the flush included.
    r.flushall()
    wait_until(lambda: any(w["id"] == wid for w in httpx.get(f"{url}/workers", headers=WAUTH).json()),
               what="re-registration")
    p = prompts(1, seed=99)[0]
    assert httpx.post(f"{wurl}/v1/completions", headers=WAUTH, timeout=30,
                      json={"model": "m", "prompt": p, "max_tokens": 1}).status_code == 200
    local.generate([{"prompt_token_ids": p}], SamplingParams(max_tokens=1))
    want = hexes(local.engine.kv.pool.cached_hashes())
    assert want - hexes(block_hashes(p, BS, root)), "blocks from before the flush are still cached"
    wait_until(lambda: redis_set(r, wid) == want, timeout=15, what="set restored by a snapshot")
    assert r.hget(meta_key(wid, "m"), "epoch") == epoch  # same run of the worker: same epoch
    assert entries(r, wid)[0]["k"] == "snapshot"

    # SIGTERM: the worker deregisters, the manager drops its keys and tells readers.
    proc.stop(signal.SIGTERM)
    wait_until(lambda: not r.exists(meta_key(wid, "m"), blocks_key(wid, "m")), what="keys dropped")
    assert any(f["k"] == "gone" for f in entries(r, wid, ""))


def test_new_worker_starts_with_a_snapshot_and_a_killed_one_is_swept(cluster, model_dir):
    r, url = cluster["redis"], cluster["url"]
    proc, wurl, wid = start_kv_worker(cluster, model_dir)
    wait_until(lambda: entries(r, wid), what="first entry")
    first = entries(r, wid)[0]
    assert first["k"] == "snapshot" and first["s"] == "-1" and first["d"] == ""
    p = prompts(1, seed=5)[0]
    assert httpx.post(f"{wurl}/v1/completions", headers=WAUTH, timeout=30,
                      json={"model": "m", "prompt": p, "max_tokens": 1}).status_code == 200
    root = root_hash(f"{model_dir / 'tiny-llama'}|torch.float32")
    wait_until(lambda: redis_set(r, wid) == hexes(block_hashes(p, BS, root)), what="blocks of the prompt")

    # The manager endpoint: token checked before the body, bodies validated, unknown workers 404.
    kv = f"{url}/workers/{wid}/kv-events"
    assert httpx.post(kv, content=b"not json").status_code == 401
    bad = httpx.post(kv, headers=WAUTH, json={"model": "m", "epoch": "e", "first_seq": 0, "last_seq": 0,
                                              "time": 0, "ops": [["+", ["XYZ"]]]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "ops"
    body = {"model": "m", "epoch": "other", "first_seq": 0, "last_seq": 0, "time": 0, "ops": [["+", ["0" * 32]]]}
    stale = httpx.post(kv, headers=WAUTH, json=body)
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "kv_resync"
    unknown = httpx.post(f"{url}/workers/nobody/kv-events", headers=WAUTH, json=body)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_worker"
    assert redis_set(r, wid) == hexes(block_hashes(p, BS, root))  # none of it touched the set

    # SIGKILL: no deregistration; the sweeper evicts the worker and drops its keys.
    proc.stop(signal.SIGKILL)
    wait_until(lambda: not r.exists(meta_key(wid, "m"), blocks_key(wid, "m")), timeout=15,
               what="keys dropped by the sweep")
    assert any(f["k"] == "gone" for f in entries(r, wid, ""))


def test_publisher_404_overflow_resync_and_same_id_restart(cluster, model_dir, make_llm):
    """A publisher in this process over real engines and the real manager: retrying while the
    manager does not know the worker, bounded while batches are refused (then a snapshot), a
    snapshot on 409, and a restart under the same worker id replacing what the store held."""
    r, url = cluster["redis"], cluster["url"]
    wid = "kv-same-id"
    llm1 = make_llm("llama", enable_kv_events=True, **ENGINE)
    llm2 = make_llm("llama", enable_kv_events=True, **ENGINE)
    rng = random.Random(17)
    unshared = [[rng.randrange(3, 300) for _ in range(22)] for _ in range(8)]  # >= 5 new blocks each

    async def run_prompts(eng, ps):
        for p in ps:
            async for _ in eng.generate(prompt_token_ids=p, params=SamplingParams(max_tokens=2)):
                pass

    async def wait_for(pred, what, timeout=10.0):
        for _ in range(int(timeout / 0.05)):
            got = pred()
            if asyncio.iscoroutine(got):
                got = await got
            if got:
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(what)

    async def matches(eng):
        _, hs = await eng.kv_snapshot()
        return redis_set(r, wid, "p") == hexes(hs)

    async def scenario():
        # The registrar's calls, driven by hand so the test decides when the manager knows us.
        reg = Registrar(url, "http://127.0.0.1:9", [{"name": "p", "kind": "generate", "max_model_len": MAXLEN}],
                        lambda: {}, 0.3, TOKEN, wid)
        beating, beat_lock = asyncio.Event(), asyncio.Lock()

        async def keep_alive():
            while True:
                await beating.wait()
                async with beat_lock:
                    if beating.is_set():
                        await reg.heartbeat()  # registers again after a 404
                await asyncio.sleep(0.3)

        keeper = asyncio.create_task(keep_alive())
        eng1 = AsyncEngine(llm1.engine)
        # A bound above what one prompt changes (<= 18 hashes), below what eight change.
        pub1 = KVEventPublisher(url, wid, {"p": eng1}, TOKEN, interval=0.05, max_pending_hashes=24,
                                probe_interval=0.3)
        try:
            await pub1.start()
            await wait_for(lambda: pub1.failures >= 2, "snapshots refused: unknown worker")
            assert pub1.snapshots_sent == 0 and not r.exists(meta_key(wid, "p"))
            await reg.register()
            beating.set()
            await wait_for(lambda: pub1.snapshots_sent == 1, "first snapshot once registered")
            assert r.hget(meta_key(wid, "p"), "epoch") == pub1.epoch and redis_set(r, wid, "p") == set()
            for p in prompts(2, seed=12):
                await run_prompts(eng1, [p])
                await wait_for(lambda: matches(eng1), "ops after the snapshot")
            await wait_for(lambda: pub1.batches_sent >= 2, "batches counted")  # Redis is written first
            assert pub1.resyncs == 0 and pub1.dropped == 0 and pub1.snapshots_sent == 1

            # The manager forgets us: batches are refused (404) and kept, up to the bound; past
            # it they are dropped and a snapshot is due. Once registered again, it goes out.
            beating.clear()
            async with beat_lock:  # no heartbeat in flight that could register us again
                pass
            assert httpx.delete(f"{url}/workers/{wid}", headers=WAUTH).status_code == 200
            assert not r.exists(meta_key(wid, "p"))
            failures = pub1.failures
            await run_prompts(eng1, unshared)
            await wait_for(lambda: pub1.dropped >= 1 and pub1.failures > failures, "overflow while refused")
            beating.set()
            await wait_for(lambda: pub1.snapshots_sent == 2, "snapshot after the overflow")
            await wait_for(lambda: matches(eng1), "set after the overflow")

            # The store loses this engine's meta: the next batch gets 409, a snapshot follows.
            r.delete(meta_key(wid, "p"))
            await run_prompts(eng1, prompts(1, seed=13))
            await wait_for(lambda: pub1.resyncs == 1 and pub1.snapshots_sent == 3, "resync")
            await wait_for(lambda: matches(eng1), "set after the resync")
            assert redis_set(r, wid, "p")

            # Redis loses the set while the cache does not change (no batch to refuse): the idle
            # probe gets the 409, and the snapshot puts the set back.
            held, stream_len = redis_set(r, wid, "p"), r.xlen(STREAM)
            await asyncio.sleep(1.0)  # probes of an idle engine leave no stream entries
            assert r.xlen(STREAM) == stream_len
            r.delete(meta_key(wid, "p"), blocks_key(wid, "p"))
            await wait_for(lambda: pub1.resyncs == 2 and pub1.snapshots_sent == 4, "resync of an idle engine")
            assert redis_set(r, wid, "p") == held
        finally:
            await pub1.stop()
            eng1.shutdown()

        # The same worker id starts again (a fresh engine, a new epoch): its snapshot replaces
        # everything the previous run left.
        eng2 = AsyncEngine(llm2.engine)
        pub2 = KVEventPublisher(url, wid, {"p": eng2}, TOKEN, interval=0.05)
        try:
            assert pub2.epoch != pub1.epoch
            await pub2.start()
            await wait_for(lambda: r.hget(meta_key(wid, "p"), "epoch") == pub2.epoch, "new epoch")
            assert redis_set(r, wid, "p") == set()
            await run_prompts(eng2, prompts(2, seed=14))
            await wait_for(lambda: matches(eng2), "set of the restarted engine")
        finally:
            await pub2.stop()
            keeper.cancel()
            await reg.stop()  # deregisters: the manager drops the keys
            eng2.shutdown()
        assert not r.exists(meta_key(wid, "p"), blocks_key(wid, "p"))

    asyncio.run(scenario())


def test_async_engine_kv_sink_and_snapshot(make_llm):
    """Batches reach the sink in seq order and replay to the snapshot's set; without events the
    sink is never called and the snapshot still lists the cache."""

    async def scenario(llm, sink):
        eng = AsyncEngine(llm.engine, kv_sink=sink)
        try:
            assert await eng.kv_snapshot() == (-1, [])
            for p in prompts(8, seed=21):
                async for _ in eng.generate(prompt_token_ids=p, params=SamplingParams(max_tokens=3)):
                    pass
            return await eng.kv_snapshot()
        finally:
            eng.shutdown()

    got = []
    seq, hashes = asyncio.run(scenario(make_llm("llama", enable_kv_events=True, **ENGINE), got.append))
    assert [b.seq for b in got] == list(range(len(got))) and seq == len(got) - 1
    held: set[bytes] = set()
    for b in got:
        for ev in b.events:
            if isinstance(ev, BlockStored):
                held.update(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                held.difference_update(ev.block_hashes)
            elif isinstance(ev, AllBlocksCleared):
                held.clear()
    assert held == set(hashes) and any(isinstance(ev, BlockRemoved) for b in got for ev in b.events)

    off = []
    seq, hashes = asyncio.run(scenario(make_llm("llama", **ENGINE), off.append))
    assert off == [] and seq == -1 and hashes
