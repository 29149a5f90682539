"""The router's KV index (router/kv_index.py) against a real redis-server: fed only through
``KVStore`` (the manager's writes), it mirrors the store, converges across replicas, rebuilds
mid-run, heals gaps and Redis losses, and stays within its memory bound."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from procs import free_port, start_redis

from clusterkit.kv_wire import STREAM, KVEventsBody, KVStore
from clusterkit.registry import ModelInfo, RegisterBody, Registry, redis_client, worker_key
from router.kv_index import KVIndex

FAST = {"check_interval": 0.2, "block_ms": 100}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    r = start_redis(tmp_path_factory.mktemp("kv_index"))
    try:
        yield r.url
    finally:
        r.stop()


def hx(n: int) -> str:
    return f"{n:032x}"


def hb(n: int) -> bytes:
    return bytes.fromhex(hx(n))


class Sim:
    """One registered worker as the manager's store sees it: an epoch, the next batch seq and
    the truth (the hashes each model's engine holds)."""

    def __init__(self, client, store: KVStore, wid: str, models=("m",)):
        self.client, self.store, self.wid, self.models = client, store, wid, list(models)
        self.epoch, self.seq, self.truth = "", {}, {}

    async def register(self) -> Sim:
        await Registry(self.client).register(RegisterBody(
            id=self.wid, url="http://127.0.0.1:1/", models=[ModelInfo(name=m) for m in self.models]))
        return self

    async def restart(self, t: float | None = None) -> None:
        """New engines: a new epoch and an empty snapshot per model."""
        self.epoch = uuid.uuid4().hex[:8]
        for m in self.models:
            self.truth[m] = set()
            self.seq[m] = -1
            await self.snapshot(m, t)

    async def snapshot(self, model: str, t: float | None = None) -> None:
        body = KVEventsBody(model=model, epoch=self.epoch, first_seq=max(self.seq[model], 0),
                            last_seq=self.seq[model], time=t or time.time(),
                            snapshot=[hx(n) for n in sorted(self.truth[model])])
        assert await self.store.apply(self.wid, body) == KVStore.APPLIED

    async def batch(self, model: str, *ops, n: int = 1, t: float | None = None) -> int:
        """Batches seq+1..seq+n holding ``ops`` (("+", [ints]), ("-", [ints]), ("*",)); a refused
        one is answered with a snapshot, as a worker does."""
        wire = [(op[0], [hx(x) for x in op[1]]) if op[0] != "*" else ("*",) for op in ops]
        body = KVEventsBody(model=model, epoch=self.epoch, first_seq=self.seq[model] + 1,
                            last_seq=self.seq[model] + n, time=t or time.time(), ops=wire)
        self.seq[model] += n
        for op in ops:
            if op[0] == "+":
                self.truth[model].update(op[1])
            elif op[0] == "-":
                self.truth[model].difference_update(op[1])
            else:
                self.truth[model].clear()
        res = await self.store.apply(self.wid, body)
        if res == KVStore.RESYNC:
            await self.snapshot(model)
        return res


async def until(pred, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        res = pred()
        if asyncio.iscoroutine(res):
            res = await res
        if res:
            return res
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout}s")
        await asyncio.sleep(0.02)


async def mirrors(idx: KVIndex, store: KVStore) -> bool:
    """True when the index holds exactly the store's engines, seqs and hashes."""
    listed = await store.engines()
    if idx.engines() != len(listed):
        return False
    total = 0
    for w, m in listed:
        epoch, seq, hexes = await store.read_engine(w, m)
        if idx.engine_state(w, m) != (epoch, seq, len(hexes)):
            return False
        if any(idx.match(w, m, [bytes.fromhex(h)]) != 1 for h in hexes):
            return False
        total += len(hexes)
    return len(idx) == total


async def setup(redis_url: str, maxlen: int = 100_000):
    client = redis_client(redis_url)
    await client.flushall()
    return client, KVStore(client, worker_key, maxlen=maxlen)


def while_blocked(redis_url: str, work) -> None:
    """Run ``work(store)`` on its own loop in a thread while the caller's loop (and so the
    index's task) is blocked: the index then lags behind everything ``work`` writes."""
    async def run():
        client = redis_client(redis_url)
        try:
            await work(client, KVStore(client, worker_key))
        finally:
            await client.aclose()
    with ThreadPoolExecutor(1) as ex:
        ex.submit(asyncio.run, run()).result()


def test_index_follows_ops_snapshots_and_measures_lag(redis_url):
    async def main():
        client, store = await setup(redis_url)
        idx = KVIndex(store, **FAST)
        await idx.start()
        try:
            w = await Sim(client, store, "w1", ["a", "b"]).register()
            await w.restart()
            # the restart's snapshots read first: a read that already covers the batch below would
            # skip its entry (and the lag it carries)
            await until(lambda: all(idx.engine_state("w1", m) == (w.epoch, -1, 0) for m in "ab"),
                        what="restart read")
            chain = list(range(1, 11))
            await w.batch("a", ("+", chain), t=time.time() - 5)
            await until(lambda: idx.match("w1", "a", [hb(n) for n in chain]) == 10, what="stored chain")
            assert 5 <= idx.lag_seconds < 7, idx.lag_seconds
            assert idx.match("w1", "b", [hb(1)]) == 0, "another model's engine shares nothing"
            assert idx.match("w2", "a", [hb(1)]) == 0
            assert idx.match("w1", "a", [hb(1), hb(99), hb(3)]) == 1, "the match stops at the first miss"

            applied = idx.events_applied
            await w.batch("a", ("-", [6]), ("+", [11]), n=3)  # three engine batches in one body
            await until(lambda: idx.engine_state("w1", "a") == (w.epoch, w.seq["a"], 10), what="removal")
            assert idx.match("w1", "a", [hb(n) for n in chain]) == 5
            assert idx.events_applied == applied + 1
            assert idx.lag_seconds < 2

            await w.batch("a", ("*",), ("+", [20, 21]))
            await until(lambda: idx.engine_state("w1", "a") == (w.epoch, w.seq["a"], 2), what="clear")
            assert idx.match("w1", "a", [hb(1)]) == 0 and idx.match("w1", "a", [hb(20), hb(21)]) == 2

            # A snapshot (the worker's answer to a refused batch) replaces the set: read again.
            resyncs = idx.resyncs
            w.truth["b"] = {7, 8, 9}
            w.seq["b"] = 40
            await w.snapshot("b")
            await until(lambda: idx.match("w1", "b", [hb(7), hb(8), hb(9)]) == 3, what="snapshot")
            assert idx.resyncs > resyncs
            assert await mirrors(idx, store)
        finally:
            await idx.stop()
            await client.aclose()
    asyncio.run(main())


def test_two_replicas_converge_on_a_random_workload(redis_url):
    async def main():
        client, store = await setup(redis_url)
        c1, c2 = redis_client(redis_url), redis_client(redis_url)
        a, b = KVIndex(KVStore(c1, worker_key), **FAST), KVIndex(KVStore(c2, worker_key), **FAST)
        await a.start()
        await b.start()
        try:
            rng = random.Random(7)
            sims = [await Sim(client, store, f"w{i}", ["m1", "m2"]).register() for i in range(3)]
            for s in sims:
                await s.restart()
            next_hash = 1
            for _ in range(400):
                s = rng.choice(sims)
                m = rng.choice(s.models)
                roll = rng.random()
                if roll < 0.6:
                    new = list(range(next_hash, next_hash + rng.randint(1, 8)))
                    next_hash += len(new)
                    held = sorted(s.truth[m])
                    gone = rng.sample(held, min(len(held), rng.randint(0, 3)))
                    await s.batch(m, ("+", new), ("-", gone), n=rng.randint(1, 3))
                elif roll < 0.7:
                    await s.batch(m, ("*",), ("+", [next_hash]))
                    next_hash += 1
                elif roll < 0.8:
                    await s.snapshot(m)
                elif roll < 0.9:
                    await s.restart()
                else:
                    await store.drop_worker(s.wid)
                    await s.restart()
                if rng.random() < 0.05:
                    await asyncio.sleep(0.05)  # let the replicas catch up now and then
            await until(lambda: mirrors(a, store), what="replica a mirrors the store")
            await until(lambda: mirrors(b, store), what="replica b mirrors the store")
            for s in sims:
                for m in s.models:
                    everything = [hb(n) for n in range(1, next_hash)]
                    held = [hb(n) for n in sorted(s.truth[m])]
                    assert a.match(s.wid, m, held) == b.match(s.wid, m, held) == len(held)
                    assert sum(a.match(s.wid, m, [h]) for h in everything) == len(held)
                    assert a.engine_state(s.wid, m) == b.engine_state(s.wid, m)
            assert a.events_applied > 100 and b.events_applied > 100
        finally:
            await a.stop()
            await b.stop()
            for c in (client, c1, c2):
                await c.aclose()
    asyncio.run(main())


def test_index_started_mid_run_rebuilds_from_a_trimmed_stream(redis_url):
    async def main():
        client, store = await setup(redis_url, maxlen=20)
        await client.config_set("stream-node-max-entries", 5)  # so MAXLEN ~ 20 really trims
        first = KVIndex(store, **FAST)
        await first.start()
        late = None
        try:
            rng = random.Random(3)
            sims = [await Sim(client, store, f"w{i}").register() for i in range(2)]
            for s in sims:
                await s.restart()
            for i in range(200):
                s = rng.choice(sims)
                held = sorted(s.truth["m"])
                await s.batch("m", ("+", [1000 * i + 1, 1000 * i + 2]), ("-", rng.sample(held, min(2, len(held)))))
            assert await client.xlen(STREAM) < 100, "the stream was trimmed"
            late = KVIndex(KVStore(redis_client(redis_url), worker_key), **FAST)
            await late.start()
            assert await mirrors(late, store), "start() reads every engine's set"
            for i in range(200, 230):
                await rng.choice(sims).batch("m", ("+", [1000 * i + 1]))
            await until(lambda: mirrors(late, store), what="late index follows")
            await until(lambda: mirrors(first, store), what="first index follows")
            for s in sims:
                held = [hb(n) for n in sorted(s.truth["m"])]
                assert late.match(s.wid, "m", held) == first.match(s.wid, "m", held) == len(held)
        finally:
            await first.stop()
            if late is not None:
                await late.stop()
                await late.store.r.aclose()
            await client.config_set("stream-node-max-entries", 100)
            await client.aclose()
    asyncio.run(main())


def test_a_gap_in_the_stream_reads_the_engine_again(redis_url):
    async def main():
        client, store = await setup(redis_url)
        idx = KVIndex(store, check_interval=60, block_ms=100)  # no periodic check: the gap alone
        await idx.start()
        try:
            w = await Sim(client, store, "w1").register()
            await w.restart()
            await w.batch("m", ("+", [1, 2, 3]))
            await until(lambda: idx.match("w1", "m", [hb(1), hb(2), hb(3)]) == 3)
            resyncs = idx.resyncs

            async def burst(c, st):
                ws = Sim(c, st, "w1")
                ws.epoch, ws.seq, ws.truth = w.epoch, dict(w.seq), {"m": set(w.truth["m"])}
                for i in range(10):
                    await ws.batch("m", ("+", [10 + i]), ("-", [1] if i == 0 else []))
                await c.xtrim(STREAM, maxlen=1, approximate=False)  # the middle batches are gone
                w.seq, w.truth = ws.seq, ws.truth
            while_blocked(redis_url, burst)
            await until(lambda: idx.engine_state("w1", "m") == (w.epoch, w.seq["m"], len(w.truth["m"])),
                        what="re-read after the gap")
            assert idx.resyncs == resyncs + 1
            assert idx.match("w1", "m", [hb(1)]) == 0
            assert idx.match("w1", "m", [hb(n) for n in [2, 3, *range(10, 20)]]) == 12
            assert await mirrors(idx, store)
        finally:
            await idx.stop()
            await client.aclose()
    asyncio.run(main())


def test_a_lagging_index_reads_a_restarted_engine_once(redis_url):
    # A worker restarts (snapshot of a new epoch), works, resends its snapshot, leaves and comes
    # back, all while the index lags: the first entry that needs a read makes the index read the
    # set as it is now, and every later entry of that engine up to then is already in it (a
    # stale "gone" must not drop the engine the read found, a stale snapshot is no new read).
    async def main():
        client, store = await setup(redis_url)
        idx = KVIndex(store, check_interval=60, block_ms=100)
        await idx.start()
        try:
            w = await Sim(client, store, "w1").register()
            await w.restart()
            await w.batch("m", ("+", [1, 2]))
            await until(lambda: idx.match("w1", "m", [hb(1), hb(2)]) == 2)
            resyncs, skipped = idx.resyncs, idx.events_skipped

            async def churn(c, st):
                ws = Sim(c, st, "w1")
                ws.epoch, ws.seq, ws.truth = w.epoch, dict(w.seq), {"m": set(w.truth["m"])}
                await ws.batch("m", ("+", [3]))
                await ws.restart()
                for i in range(20):
                    await ws.batch("m", ("+", [100 + i]))
                await ws.snapshot("m")
                await st.drop_worker("w1")
                await ws.restart()
                await ws.batch("m", ("+", [500, 501]))
                w.epoch, w.seq, w.truth = ws.epoch, ws.seq, ws.truth
            while_blocked(redis_url, churn)
            await until(lambda: idx.engine_state("w1", "m") == (w.epoch, 0, 2), what="newest epoch")
            await asyncio.sleep(0.3)  # every entry handled
            assert idx.engine_state("w1", "m") == (w.epoch, 0, 2), "a stale entry undid the read"
            assert idx.resyncs == resyncs + 1
            assert idx.events_skipped >= skipped + 23
            assert idx.match("w1", "m", [hb(1)]) == 0 and idx.match("w1", "m", [hb(500), hb(501)]) == 2
            assert await mirrors(idx, store)
        finally:
            await idx.stop()
            await client.aclose()
    asyncio.run(main())


def test_a_gone_entry_drops_every_engine_of_the_worker(redis_url):
    async def main():
        client, store = await setup(redis_url)
        idx = KVIndex(store, check_interval=60, block_ms=100)  # the stream alone, no periodic check
        await idx.start()
        try:
            sims = [await Sim(client, store, f"w{i}", ["a", "b"]).register() for i in range(2)]
            for i, s in enumerate(sims):
                await s.restart()
                await s.batch("a", ("+", [i * 10 + 1, i * 10 + 2]))
                await s.batch("b", ("+", [i * 10 + 3]))
            await until(lambda: idx.engines() == 4 and len(idx) == 6)
            await store.drop_worker("w0")  # deregistered: the manager drops its engines
            await until(lambda: idx.engines() == 2, what="gone entry")
            assert idx.match("w0", "a", [hb(1)]) == 0 and idx.match("w0", "b", [hb(3)]) == 0
            assert len(idx) == 3 and idx.match("w1", "a", [hb(11), hb(12)]) == 2
            assert await mirrors(idx, store)
        finally:
            await idx.stop()
            await client.aclose()
    asyncio.run(main())


def test_retain_drops_workers_the_registry_lost(redis_url):
    async def main():
        client, store = await setup(redis_url)
        idx = KVIndex(store, **FAST)
        await idx.start()
        try:
            sims = [await Sim(client, store, f"w{i}", ["a", "b"]).register() for i in range(3)]
            for i, s in enumerate(sims):
                await s.restart()
                await s.batch("a", ("+", [i * 10 + 1, i * 10 + 2]))
                await s.batch("b", ("+", [i * 10 + 3]))
            await until(lambda: idx.engines() == 6 and len(idx) == 9)

            # Evicted from the registry, its keys still in the store: the router retains the rest.
            idx.retain({"w1"})
            assert idx.engines() == 2 and len(idx) == 3
            assert idx.match("w2", "a", [hb(21)]) == 0 and idx.match("w0", "b", [hb(3)]) == 0
            await sims[2].batch("a", ("+", [25]))  # late ops of a retired worker are ignored
            await asyncio.sleep(0.6)  # several periodic checks: they do not bring it back either
            assert idx.match("w2", "a", [hb(25)]) == 0 and idx.engines() == 2

            idx.retain({"w1", "w2"})  # listed again: the periodic check reads it back
            await until(lambda: idx.match("w2", "a", [hb(21), hb(22), hb(25)]) == 3, what="un-retired")
            await until(lambda: idx.engines() == 4, what="both engines read back")  # one by one
            idx.retain({"w1"})
            await sims[2].restart()  # a restarted worker's snapshot brings it back at once
            await sims[2].batch("a", ("+", [30]))
            await until(lambda: idx.match("w2", "a", [hb(30)]) == 1, what="snapshot after retire")
            assert idx.match("w0", "a", [hb(1)]) == 0, "w0 is still retired"
        finally:
            await idx.stop()
            await client.aclose()
    asyncio.run(main())


class RacingStore(KVStore):
    """A real store that lets ``before_read`` write first when the index reads an engine: the
    race between start()'s stream position and its reads of the sets, made certain."""

    before_read = None

    async def read_engine(self, wid: str, model: str):
        hook, self.before_read = self.before_read, None
        if hook is not None:
            await hook()
        return await super().read_engine(wid, model)


def test_entries_a_read_already_holds_are_skipped(redis_url):
    async def main():
        client, store = await setup(redis_url)
        w = await Sim(client, store, "w1").register()
        await w.restart()
        racing = RacingStore(client, worker_key)

        async def work():
            for i in range(5):
                await w.batch("m", ("+", [i + 1]))
        racing.before_read = work
        idx = KVIndex(racing, check_interval=60, block_ms=100)
        await idx.start()  # position taken before the five batches, the set read after them
        try:
            assert idx.engine_state("w1", "m") == (w.epoch, 4, 5)
            await until(lambda: idx.events_skipped == 5, what="five entries skipped")
            await w.batch("m", ("+", [6]))
            await until(lambda: idx.engine_state("w1", "m") == (w.epoch, 5, 6))
            assert idx.resyncs == 1, "one read at start, none for entries it already held"
            assert idx.events_applied == 1
        finally:
            await idx.stop()
            await client.aclose()
    asyncio.run(main())


def test_memory_bound_refuses_adds_but_never_removals(redis_url):
    async def main():
        client, store = await setup(redis_url)
        idx = KVIndex(store, max_blocks=10, **FAST)
        await idx.start()
        try:
            a = await Sim(client, store, "wa").register()
            b = await Sim(client, store, "wb").register()
            await a.restart()
            await b.restart()
            await a.batch("m", ("+", list(range(1, 9))))
            await until(lambda: len(idx) == 8)
            await b.batch("m", ("+", [101, 102, 103, 104, 105]))  # parents first: 101, 102 kept
            await until(lambda: idx.engine_state("wb", "m") == (b.epoch, 0, 2))
            assert len(idx) == 10 and idx.dropped_blocks == 3
            assert idx.match("wb", "m", [hb(n) for n in range(101, 106)]) == 2, "fewer hits"

            await a.batch("m", ("+", [9]), ("-", [1, 2, 3, 4]))
            await until(lambda: idx.engine_state("wa", "m") == (a.epoch, 1, 4))
            assert idx.dropped_blocks == 4 and len(idx) == 6
            assert idx.match("wa", "m", [hb(n) for n in [1, 2, 3, 4, 9]]) == 0, "removals apply"
            await b.batch("m", ("+", [106, 107, 108, 109, 110]))
            await until(lambda: len(idx) == 10)
            assert idx.dropped_blocks == 5

            # Never a hash the engine does not hold: every hash the index reports is the truth's.
            for s in (a, b):
                for n in range(1, 200):
                    if idx.match(s.wid, "m", [hb(n)]):
                        assert n in s.truth["m"]

            # A full read under the bound keeps it too.
            b.truth["m"] = set(range(200, 230))
            await b.snapshot("m")
            await until(lambda: sum(idx.match("wb", "m", [hb(n)]) for n in range(200, 230)) == 6)
            assert len(idx) == 10 and idx.engine_state("wb", "m")[2] == 6
            assert idx.dropped_blocks == 5 + 24
        finally:
            await idx.stop()
            await client.aclose()
    asyncio.run(main())


def test_flushall_empties_what_the_store_lost(redis_url):
    async def main():
        client, store = await setup(redis_url)
        idx = KVIndex(store, **FAST)
        await idx.start()
        try:
            w = await Sim(client, store, "w1").register()
            await w.restart()
            await w.batch("m", ("+", [1, 2, 3]))
            await until(lambda: len(idx) == 3)
            await client.flushall()
            await until(lambda: idx.engines() == 0 and len(idx) == 0, what="flushed engines dropped")
            await w.register()  # the worker re-registers on its next heartbeat
            assert await w.batch("m", ("+", [4])) == KVStore.RESYNC  # and answers with a snapshot
            await until(lambda: idx.match("w1", "m", [hb(1), hb(2), hb(3), hb(4)]) == 4)
            assert await mirrors(idx, store)
        finally:
            await idx.stop()
            await client.aclose()
    asyncio.run(main())


def test_redis_restart_empties_the_index_then_refills_it(tmp_path):
    async def main():
        port = free_port()
        server = start_redis(tmp_path, port)
        client = redis_client(server.url)
        store = KVStore(client, worker_key)
        idx = KVIndex(store, **FAST)
        try:
            await idx.start()
            w = await Sim(client, store, "w1").register()
            await w.restart()
            await w.batch("m", ("+", [1, 2, 3]))
            await until(lambda: len(idx) == 3)
            server.stop()
            await asyncio.sleep(0.3)
            server = start_redis(tmp_path, port)  # empty
            await until(lambda: idx.engines() == 0 and idx.redis_ok, timeout=10, what="emptied after restart")
            await w.register()
            w.seq["m"] = 7
            await w.snapshot("m")
            await until(lambda: mirrors(idx, store), what="refilled")
            assert idx.match("w1", "m", [hb(1), hb(2), hb(3)]) == 3
        finally:
            await idx.stop()
            await client.aclose()
            server.stop()
    asyncio.run(main())
