"""The router's cluster-wide KV index: which block hashes each engine's prefix cache holds.

Every router replica keeps one, fed only from Redis (the layout and rules of
``clusterkit/kv_wire.py``), so replicas agree without talking to each other.

How it stays right:

- :meth:`KVIndex.start` reads the stream's last id, then every engine's set; a background task
  then reads the stream from that id. An ``ops`` entry is applied only when its epoch is the one
  held and its first seq follows the held seq; one the read already holds (same epoch, last seq
  <= held seq) is skipped; anything else (unknown engine, other epoch, a gap, a ``snapshot``)
  reads that engine's set again. ``gone`` drops every engine of the worker.
- Before re-reading an engine the index notes the stream's newest id: every entry up to it is
  already in what the read returns, so later entries of that engine up to that id are skipped
  (a lagging replica re-reads an engine once, not once per stale entry).
- A Redis error reconnects with backoff and reads everything again (Redis may have restarted
  empty: engines the store no longer holds are dropped).
- Every ``check_interval`` seconds a cheap check runs between stream reads: Redis's ``run_id``
  (a restart the client's own retries hid -> read everything again), then each engine's
  (epoch, seq) in the store against the index's. Engines the store no longer holds (FLUSHALL, a
  missed ``gone``) are dropped at once; a held (epoch, seq) that differs is re-read only when it
  still has not reached, at the next check, what the store showed at this one (so a replica that
  is merely a few entries behind on the stream is not made to re-read busy engines).
- :meth:`KVIndex.retain` drops the engines of workers the registry no longer holds and keeps
  them out (their late ``ops`` are ignored) until the registry lists them again or they send a
  snapshot (which the store accepts only from a registered worker).

Memory bound: at most ``max_blocks`` hashes in total. Adds beyond it are refused (counted in
``dropped_blocks``); removals and clears always apply. So the index only ever holds hashes that
engines did hold (up to the stream's lag): a full index means fewer cache hits seen (a refused
block also ends the prefix match there), never a hit that is not there. Within one stored op the
first hashes (parents before children) are kept, which is what prefix matches use; a set read
under the bound keeps an arbitrary part of it. One engine may take the whole bound. A hash costs
about 100 bytes here (a 16-byte ``bytes`` object and its set slot): the default bound is about
200 MB per router replica.

``lag_seconds`` compares the router's clock with the ``t`` the worker stamped: skew between the
two hosts shows up in it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from itertools import islice

from clusterkit.kv_wire import STREAM, KVStore, meta_key

log = logging.getLogger("router.kv_index")

EngineKey = tuple[str, str]  # (worker id, model)


def _stream_id(eid: str) -> tuple[int, int]:
    ms, _, n = eid.partition("-")
    return int(ms), int(n or 0)


@dataclass
class _Engine:
    epoch: str
    seq: int
    hashes: set[bytes] = field(default_factory=set)


class KVIndex:
    """Block hashes per (worker, model) engine, mirrored from Redis; see the module docstring.

    ``match`` and ``retain`` are plain calls on the event loop; all Redis work runs in one
    background task, so no locks are needed."""

    def __init__(self, store: KVStore, max_blocks: int = 2_000_000, *, check_interval: float = 5.0,
                 block_ms: int = 1000, count: int = 300):
        self.store = store
        self.max_blocks = max_blocks
        self.check_interval = check_interval
        self.block_ms = block_ms
        self.count = count
        # observability
        self.lag_seconds = 0.0
        self.events_applied = 0  # ops applied in order, gone entries
        self.events_skipped = 0  # entries a read already held
        self.resyncs = 0  # engine sets read (at start, after a gap or snapshot, by the check)
        self.dropped_blocks = 0  # adds refused by the memory bound
        self.redis_ok = False  # False from a Redis error until everything was read again
        self._engines: dict[EngineKey, _Engine] = {}
        self._size = 0
        self._pos = "0-0"  # last stream id handled
        self._covered: dict[EngineKey, tuple[int, int]] = {}  # re-read after that stream id
        self._retired: set[str] = set()  # workers retain() dropped
        self._suspects: dict[EngineKey, tuple[str, int]] = {}  # store state seen at the last check
        self._run_id: str | None = None
        self._next_check = 0.0
        self._task: asyncio.Task | None = None
        self._stopping = False

    # -- reading -------------------------------------------------------------------------------
    def match(self, wid: str, model: str, hashes: list[bytes]) -> int:
        """How many leading ``hashes`` the engine (``wid``, ``model``) holds (stops at the first
        miss)."""
        eng = self._engines.get((wid, model))
        if eng is None:
            return 0
        held = eng.hashes
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def __len__(self) -> int:
        """Hashes held, all engines together."""
        return self._size

    def engines(self) -> int:
        """Engines held."""
        return len(self._engines)

    def engine_state(self, wid: str, model: str) -> tuple[str, int, int] | None:
        """(epoch, seq, hashes held) of one engine, or None; for debugging and tests."""
        eng = self._engines.get((wid, model))
        return None if eng is None else (eng.epoch, eng.seq, len(eng.hashes))

    def retain(self, live_worker_ids: set[str]) -> None:
        """Drop the engines of workers not in ``live_worker_ids`` (the registry's, after a
        resync) and ignore their entries until they are listed again or send a snapshot."""
        for key in [k for k in self._engines if k[0] not in live_worker_ids]:
            self._drop(key)
            self._retired.add(key[0])
        self._retired -= live_worker_ids

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Read the whole store, then follow the stream in a background task. If Redis is down
        the task keeps trying (with backoff) and the index stays empty meanwhile."""
        synced = True
        try:
            await self._resync_all()
        except Exception as e:  # Redis down: routing goes on by load until it is back
            log.warning("kv index: initial read failed (%s); retrying in the background", type(e).__name__)
            synced = False
        self._stopping = False
        self._task = asyncio.create_task(self._follow(synced))

    async def stop(self) -> None:
        """End the background task. A cancel landing just as a Redis reply completes can be
        lost inside the client (Python 3.11's ``wait_for``), so the task also checks a flag
        between reads and the cancel is repeated until the task is done."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        while not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=0.2)
        if not task.cancelled() and task.exception() is not None:
            log.debug("kv index task ended with %r", task.exception())

    # -- background ----------------------------------------------------------------------------
    async def _follow(self, synced: bool) -> None:
        backoff = 0.1
        while not self._stopping:
            try:
                if not synced:
                    await self._resync_all()
                    synced = True
                    backoff = 0.1
                await self._read_stream()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self.redis_ok:
                    log.warning("kv index: redis error (%s: %s); reconnecting", type(e).__name__, e)
                self.redis_ok = False
                synced = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _read_stream(self) -> None:
        r = self.store.r
        self._next_check = time.monotonic() + self.check_interval
        while not self._stopping:
            resp = await r.xread({STREAM: self._pos}, count=self.count, block=self.block_ms)
            for _name, entries in resp or ():
                for eid, fields in entries:
                    await self._handle(eid, fields)
                    self._pos = eid
            if time.monotonic() >= self._next_check:
                if await self._check():
                    await self._resync_all()
                self._next_check = time.monotonic() + self.check_interval

    async def _resync_all(self) -> None:
        """Read every engine again; the stream is then followed from the id read first."""
        r = self.store.r
        run_id = (await r.info("server")).get("run_id")
        pos = await self.store.last_id()
        listed = await self.store.engines()
        self._covered.clear()
        self._suspects.clear()
        wanted = {k for k in listed if k[0] not in self._retired}
        for key in [k for k in self._engines if k not in wanted]:
            self._drop(key)
        for key in wanted:
            await self._read(key)
        self._pos, self._run_id, self.redis_ok = pos, run_id, True

    async def _check(self) -> bool:
        """The periodic consistency check; True when Redis restarted (read everything again)."""
        r = self.store.r
        run_id = (await r.info("server")).get("run_id")
        if run_id != self._run_id:
            log.warning("kv index: redis restarted; reading every engine again")
            return True
        listed = await self.store.engines()
        pipe = r.pipeline(transaction=False)
        for w, m in listed:
            pipe.hmget(meta_key(w, m), "epoch", "seq")
        states = await pipe.execute()
        store: dict[EngineKey, tuple[str, int]] = {
            k: (e, int(s)) for k, (e, s) in zip(listed, states) if e is not None and s is not None}
        for key in [k for k in self._engines if k not in store]:
            self._drop(key)  # the store lost it (FLUSHALL, a missed gone): its hashes are unknown
        self._retired &= {w for w, _ in store}
        pos = _stream_id(self._pos)
        self._covered = {k: c for k, c in self._covered.items() if c > pos}
        suspects: dict[EngineKey, tuple[str, int]] = {}
        for key, state in store.items():
            if key[0] in self._retired:
                continue
            eng = self._engines.get(key)
            if eng is not None and (eng.epoch, eng.seq) == state:
                continue
            seen = self._suspects.get(key)
            reached = (seen is not None and eng is not None and eng.epoch == seen[0] and eng.seq >= seen[1])
            if seen is not None and not reached:
                log.info("kv index: %s behind the store (%s); reading it again", key, state)
                await self._read(key, note_pos=True)
            else:
                suspects[key] = state
        self._suspects = suspects
        return False

    async def _handle(self, eid: str, f: dict) -> None:
        kind, wid = f.get("k"), f.get("w", "")
        if kind == "gone":
            for key in [k for k in self._engines if k[0] == wid]:
                if not self._covers(key, eid):
                    self._drop(key)
            self._applied(f)
            return
        if kind not in ("ops", "snapshot"):
            return  # a kind this router does not know (a newer writer): the periodic check heals
        key = (wid, f.get("m", ""))
        if wid in self._retired:
            if kind != "snapshot":
                return
            self._retired.discard(wid)  # the store took a snapshot: the worker is registered again
        if self._covers(key, eid):
            self.events_skipped += 1
            return
        eng = self._engines.get(key)
        try:
            if kind == "ops" and eng is not None and eng.epoch == f["e"]:
                first, last = int(f["f"]), int(f["s"])
                if first == eng.seq + 1:
                    self._apply_ops(eng, json.loads(f["d"]))
                    eng.seq = last
                    self._applied(f)
                    return
                if last <= eng.seq:
                    self.events_skipped += 1
                    return
        except (KeyError, ValueError, TypeError) as e:  # a malformed entry: trust the set instead
            log.warning("kv index: bad stream entry %s (%s); reading %s again", eid, e, key)
        await self._read(key, note_pos=True)
        self._applied(f, count=False)

    # -- changes -------------------------------------------------------------------------------
    def _applied(self, f: dict, count: bool = True) -> None:
        if count:
            self.events_applied += 1
        try:
            self.lag_seconds = max(0.0, time.time() - float(f["t"]))
        except (KeyError, ValueError):
            pass

    def _covers(self, key: EngineKey, eid: str) -> bool:
        """True when a re-read of ``key`` already holds entry ``eid``."""
        upto = self._covered.get(key)
        if upto is None:
            return False
        if _stream_id(eid) <= upto:
            return True
        del self._covered[key]  # entries come in order: never needed again
        return False

    async def _read(self, key: EngineKey, note_pos: bool = False) -> None:
        """Replace one engine with the store's set (drop it if the store has none)."""
        pos = await self.store.last_id() if note_pos else None
        epoch, seq, hexes = await self.store.read_engine(*key)
        self.resyncs += 1
        self._suspects.pop(key, None)
        if pos is not None:
            self._covered[key] = _stream_id(pos)
        self._drop(key)
        if epoch is None or key[0] in self._retired:  # retain() may have run while reading
            return
        room = max(0, self.max_blocks - self._size)
        if len(hexes) > room:
            self.dropped_blocks += len(hexes) - room
            hexes = islice(hexes, room)
        hashes = {bytes.fromhex(h) for h in hexes}
        self._engines[key] = _Engine(epoch, seq, hashes)
        self._size += len(hashes)

    def _drop(self, key: EngineKey) -> None:
        eng = self._engines.pop(key, None)
        if eng is not None:
            self._size -= len(eng.hashes)

    def _apply_ops(self, eng: _Engine, ops: list) -> None:
        held = eng.hashes
        for op in ops:
            kind = op[0]
            if kind == "+":
                new = [h for h in dict.fromkeys(map(bytes.fromhex, op[1])) if h not in held]
                room = max(0, self.max_blocks - self._size)
                if len(new) > room:
                    self.dropped_blocks += len(new) - room
                    new = new[:room]
                held.update(new)
                self._size += len(new)
            elif kind == "-":
                before = len(held)
                held.difference_update(map(bytes.fromhex, op[1]))
                self._size -= before - len(held)
            elif kind == "*":
                self._size -= len(held)
                held.clear()
            else:
                raise ValueError(f"unknown op {kind!r}")
