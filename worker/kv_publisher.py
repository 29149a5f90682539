"""Publishing the prefix caches of a worker's generation engines to the manager (KV-aware routing).

Each engine hands its KV event batches (engine/kv_events.py) to a sink on its own thread; the
sink only appends them to a per-model buffer. An apscheduler job on the event loop posts each
model's buffered batches as one body (the fields of :class:`clusterkit.kv_wire.KVEventsBody`) to
``POST {manager}/workers/{id}/kv-events``, which applies them to the Redis set every router
replica reads. The store checks that batches follow on without a gap (epoch, seq); when they do
not (409: Redis lost them, an answer got lost on its way back, events were dropped here) the
publisher sends a snapshot: the engine's whole hash set at a batch seq, which replaces what the
store held. An idle model posts an empty batch every few seconds, so a store that lost its set
while nothing changed asks for the snapshot too. A worker starts with a snapshot, under a new
epoch, so whatever an earlier run of the same worker id left in the store is replaced.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import httpx
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from engine.async_engine import AsyncEngine
from engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

log = logging.getLogger("worker.kv_publisher")

MAX_PENDING_HASHES = 100_000  # buffered per model while the manager is away; past it: a snapshot
MAX_BACKOFF_S = 2.0
SNAPSHOT_TIMEOUT_S = 60.0  # the engine answers between steps; a dead one never does
BIG = 5_000  # hashes above which a body is built off the event loop
PROBE_S = 5.0  # an idle model posts an empty batch this often: a store that lost its set (Redis
# restarted empty) answers 409 and gets a snapshot, though the cache has not changed


def _n_hashes(batch: KVEventBatch) -> int:
    return sum(len(e.block_hashes) for e in batch.events if not isinstance(e, AllBlocksCleared))


@dataclass
class _Feed:
    """One model's buffer between its engine thread (the sink) and the posting job."""

    name: str
    engine: AsyncEngine
    max_pending: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: list[tuple[KVEventBatch, float]] = field(default_factory=list)  # (batch, taken at)
    pending_hashes: int = 0
    need_snapshot: bool = True  # every run starts with one
    dropped: int = 0  # batches dropped on overflow
    sent_seq: int = -1  # the last batch seq the store accepted
    last_ok: float = 0.0  # monotonic time of the last accepted post

    def sink(self, batch: KVEventBatch) -> None:
        """Called on the engine thread: buffer the batch; past the bound drop everything buffered
        (a snapshot replaces it), so a manager that is away never costs unbounded memory."""
        n = _n_hashes(batch)
        with self.lock:
            self.pending.append((batch, time.time()))
            self.pending_hashes += n
            if self.pending_hashes > self.max_pending:
                self.dropped += len(self.pending)
                self.pending.clear()
                self.pending_hashes = 0
                self.need_snapshot = True

    def peek(self) -> list[tuple[KVEventBatch, float]]:
        with self.lock:
            return list(self.pending)

    def drop_through(self, seq: int) -> None:
        """Forget the batches up to ``seq`` (sent, or covered by a snapshot at ``seq``)."""
        with self.lock:
            keep = [(b, t) for b, t in self.pending if b.seq > seq]
            if len(keep) != len(self.pending):
                self.pending = keep
                self.pending_hashes = sum(_n_hashes(b) for b, _ in keep)


def ops_of(batches: list[KVEventBatch]) -> list[list]:
    """The wire ops of batches, in order: ``["+", hexes]`` (stored), ``["-", hexes]`` (removed),
    ``["*"]`` (all cleared); neighbouring runs of one kind are merged."""
    ops: list[list] = []
    for batch in batches:
        for ev in batch.events:
            if isinstance(ev, AllBlocksCleared):
                ops.append(["*"])
                continue
            kind = "+" if isinstance(ev, BlockStored) else "-" if isinstance(ev, BlockRemoved) else None
            if kind is None or not ev.block_hashes:
                continue
            hexes = [h.hex() for h in ev.block_hashes]
            if ops and ops[-1][0] == kind:
                ops[-1][1].extend(hexes)
            else:
                ops.append([kind, hexes])
    return ops


class KVEventPublisher:
    """Posts the KV events of a worker's generation engines to the manager (see the module doc).

    ``engines`` maps each generation model's first served name to its :class:`AsyncEngine`
    (built with ``enable_kv_events``). ``worker_id`` must be the registrar's: the manager refuses
    (404) batches of a worker its registry does not hold; they stay buffered until it does.
    Counters for tests and metrics: ``batches_sent``, ``snapshots_sent``, ``resyncs`` (409s),
    ``failures`` (posts that did not get through) and :attr:`dropped` (batches dropped on
    overflow, replaced by a snapshot).
    """

    def __init__(self, manager_url: str, worker_id: str, engines: dict[str, AsyncEngine],
                 worker_token: str | None = None, interval: float = 0.05,
                 max_pending_hashes: int = MAX_PENDING_HASHES, timeout: float = 10.0,
                 probe_interval: float = PROBE_S):
        self.manager_url = manager_url.rstrip("/")
        self.worker_id = worker_id
        self.interval, self.probe_interval = interval, probe_interval
        self.epoch = uuid.uuid4().hex  # new every worker start: the store replaces what it held
        self._feeds = [_Feed(name, eng, max_pending_hashes) for name, eng in engines.items()]
        headers = {"Authorization": f"Bearer {worker_token}"} if worker_token else {}
        self._client = httpx.AsyncClient(headers=headers, timeout=timeout)
        self._scheduler = AsyncIOScheduler()
        self._url = f"{self.manager_url}/workers/{worker_id}/kv-events"
        self._next_try = 0.0
        self._fails_in_row = 0
        self.batches_sent = self.snapshots_sent = self.resyncs = self.failures = 0

    @property
    def dropped(self) -> int:
        return sum(f.dropped for f in self._feeds)

    @property
    def models(self) -> list[str]:
        return [f.name for f in self._feeds]

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Attach the sinks and start posting (each model's first post is its snapshot)."""
        for f in self._feeds:
            f.engine.set_kv_sink(f.sink)
        self._scheduler.add_job(self.flush, "interval", seconds=self.interval, max_instances=1,
                                coalesce=True, misfire_grace_time=None, id="kv-events")
        self._scheduler.start()

    async def stop(self) -> None:
        """Stop posting and detach the sinks (the manager drops our sets when we deregister)."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        for f in self._feeds:
            f.engine.set_kv_sink(None)
        await self._client.aclose()

    # -- posting ---------------------------------------------------------------------------------
    async def flush(self) -> None:
        """Post every model's buffered batches (or its snapshot, when one is due) once."""
        if time.monotonic() < self._next_try:
            return
        failed = False
        for f in self._feeds:
            if not f.engine.is_alive:  # nothing more comes from it; the worker reports unhealthy
                continue
            try:
                ok = await (self._send_snapshot(f) if f.need_snapshot else self._send_ops(f))
            except (TimeoutError, httpx.HTTPError, OSError, RuntimeError) as e:
                # RuntimeError: the engine died meanwhile (EngineDeadError) or the client is closed.
                log.debug("kv-events for %s failed: %s", f.name, type(e).__name__)
                ok = False
            if not ok:
                self.failures += 1
                failed = True
        # Back off while the manager refuses or is away; the buffers are bounded meanwhile.
        self._fails_in_row = self._fails_in_row + 1 if failed else 0
        if failed:
            self._next_try = time.monotonic() + min(MAX_BACKOFF_S, self.interval * 2 ** self._fails_in_row)

    async def _post(self, body: dict, n_hashes: int) -> int:
        """POST one body (the fields of ``KVEventsBody``, which the manager validates)."""
        content = await asyncio.to_thread(_dumps, body) if n_hashes > BIG else _dumps(body)
        r = await self._client.post(self._url, content=content, headers={"content-type": "application/json"})
        return r.status_code

    async def _send_ops(self, f: _Feed) -> bool:
        batches = f.peek()
        if batches:
            ops = ops_of([b for b, _ in batches])
            first, last, taken = batches[0][0].seq, batches[-1][0].seq, batches[-1][1]
        elif time.monotonic() - f.last_ok >= self.probe_interval:
            ops, first, last, taken = [], f.sent_seq + 1, f.sent_seq, time.time()  # the probe
        else:
            return True
        body = {"model": f.name, "epoch": self.epoch, "first_seq": first, "last_seq": last,
                "time": taken, "ops": ops}
        status = await self._post(body, sum(len(op[1]) for op in ops if len(op) > 1))
        if status == 200:
            f.drop_through(last)
            f.sent_seq, f.last_ok = last, time.monotonic()
            self.batches_sent += len(batches)
            return True
        if status == 409:  # the store's epoch or seq is not ours: replace its set
            self.resyncs += 1
            log.info("kv-events for %s: the manager asks for a resync (batches %d-%d); sending a snapshot",
                     f.name, first, last)
            with f.lock:
                f.need_snapshot = True
            return await self._send_snapshot(f)
        self._log_refused(f, status)
        return False  # 404 (not registered yet, or any more) and others: keep the batches, retry

    async def _send_snapshot(self, f: _Feed) -> bool:
        with f.lock:
            f.need_snapshot = False  # set again by an overflow from here on: then one more snapshot
        status = 0
        try:
            seq, hashes = await asyncio.wait_for(f.engine.kv_snapshot(), SNAPSHOT_TIMEOUT_S)
            f.drop_through(seq)  # the snapshot covers them
            taken = time.time()
            hexes = await asyncio.to_thread(_hexes, hashes) if len(hashes) > BIG else _hexes(hashes)
            body = {"model": f.name, "epoch": self.epoch, "first_seq": max(seq, 0), "last_seq": seq,
                    "time": taken, "snapshot": hexes}
            status = await self._post(body, len(hexes))
        finally:
            if status != 200:
                with f.lock:
                    f.need_snapshot = True
        if status == 200:
            f.sent_seq, f.last_ok = seq, time.monotonic()
            self.snapshots_sent += 1
            log.debug("kv snapshot of %s sent: %d blocks at seq %d", f.name, len(hexes), seq)
            return True
        self._log_refused(f, status)
        return False

    def _log_refused(self, f: _Feed, status: int) -> None:
        if status == 404:
            log.debug("kv-events for %s: the manager does not know worker %s (yet); retrying",
                      f.name, self.worker_id)
        else:
            log.warning("kv-events for %s refused by the manager: HTTP %d", f.name, status)


def _hexes(hashes: list[bytes]) -> list[str]:
    return [h.hex() for h in hashes]


def _dumps(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()
