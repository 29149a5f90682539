"""An :class:`LLMEngine` driven by a background thread, consumed with ``async for``."""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future

from .kv_events import KVEventBatch
from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import InvalidParameter, SamplingParams, StructuredOutputsParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped; no request can run on it any more."""


class AsyncEngine:
    """Thread-backed engine loop with per-request async streams.

    Only the engine thread touches the engine. Callers talk to it through an inbox (add, abort,
    call) that the thread drains between steps, so the event loop never waits for a forward pass.
    ``generate`` validates in the caller (bad parameters raise before anything is scheduled), then
    yields a :class:`RequestOutput` every step the request makes progress. Leaving the
    ``async for`` early (client gone, task cancelled) aborts the request and frees its blocks.
    A failing step fails the requests in it and the loop carries on.

    With ``enable_kv_events`` on, the loop takes the engine's KV event batches after every step
    and inbox drain and hands each to ``kv_sink`` (on the engine thread: it must be quick and
    never block); without a sink they are taken and dropped, so they never pile up.
    :meth:`kv_snapshot` gives the whole prefix cache at a batch seq.
    """

    def __init__(self, engine: LLMEngine, kv_sink: Callable[[KVEventBatch], None] | None = None):
        self.engine = engine
        # Read by the engine thread each time it takes events; set it with set_kv_sink.
        self.kv_sink = kv_sink
        self._kv_on = bool(engine.config.enable_kv_events)
        self._kv_last_seq = -1  # seq of the last batch taken from the engine (-1: none yet)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._streams_lock = threading.Lock()
        self._ids = itertools.count()
        self._stats = engine.stats()
        self.dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return self.dead is None and self._thread.is_alive()

    def stats(self) -> dict:
        """Snapshot of the engine's load, refreshed after every step (never blocks)."""
        return self._stats

    async def generate(self, prompt: str | None = None, params: SamplingParams | None = None,
                       request_id: str | None = None, prompt_token_ids: list[int] | None = None,
                       prefix_salt: bytes = b"", mm=None) -> AsyncIterator[RequestOutput]:
        if not self.is_alive:
            raise EngineDeadError(f"engine is not running: {self.dead}")
        params = params or SamplingParams()
        if prompt_token_ids is None:
            if prompt is None:
                raise InvalidParameter("prompt", "either prompt or prompt_token_ids is required")
            prompt_token_ids = self.engine.tokenize(prompt)
        self.engine.validate_prompt(prompt_token_ids, params)
        if params.structured_outputs is not None:  # compiled here, so the loop finds it cached
            await self.compile_grammar(params.structured_outputs)
        rid = request_id or f"req-{next(self._ids)}"
        queue_: asyncio.Queue = asyncio.Queue()
        with self._streams_lock:
            if rid in self._streams:
                raise InvalidParameter("request_id", f"request id {rid!r} is already running")
            self._streams[rid] = (asyncio.get_running_loop(), queue_)
        self._send(("add", rid, prompt, list(prompt_token_ids), params, prefix_salt, mm))
        finished = False
        try:
            while True:
                item = await queue_.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)

    async def compile_grammar(self, spec: StructuredOutputsParams) -> None:
        """Compile (or find cached) the grammar of ``spec`` in a worker thread, never on the engine
        loop; :class:`InvalidParameter` when it does not compile."""
        await asyncio.to_thread(self.engine.grammars.compile, spec)

    def abort(self, request_id: str) -> None:
        with self._streams_lock:
            self._streams.pop(request_id, None)
        self._send(("abort", request_id))

    def call(self, fn, *args, timeout: float | None = 60.0, **kwargs):
        """Run ``fn(engine, ...)`` on the engine thread between steps and return its result.
        Blocks the caller: for tests and tools, not for the event loop."""
        fut: Future = Future()
        self._send(("call", fut, fn, args, kwargs))
        return fut.result(timeout)

    def set_kv_sink(self, sink: Callable[[KVEventBatch], None] | None) -> None:
        """Hand every later KV event batch to ``sink`` (called on the engine thread); None: drop
        them. Batches taken before were handed to the previous sink: :meth:`kv_snapshot` covers them."""
        self.kv_sink = sink

    async def kv_snapshot(self) -> tuple[int, list[bytes]]:
        """Every hash the prefix cache can hit now, with the seq of the last KV event batch taken
        (-1: none yet). Runs on the engine thread between steps, after pending events went to the
        sink, so the sink has seen exactly the batches up to that seq when this returns."""
        if not self.is_alive:
            raise EngineDeadError(f"engine is not running: {self.dead}")
        fut: Future = Future()
        self._send(("call", fut, self._kv_snapshot_here, (), {}))
        return await asyncio.wrap_future(fut)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still running end with an EngineDeadError."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    # -- loop ------------------------------------------------------------------------------------
    def _kv_snapshot_here(self, engine: LLMEngine) -> tuple[int, list[bytes]]:
        self._flush_kv()
        return self._kv_last_seq, list(engine.kv.pool.cached_hashes())

    def _flush_kv(self) -> None:
        """Hand the engine's KV events since the last call to the sink (engine thread only)."""
        if not self._kv_on:
            return
        batch = self.engine.take_kv_events()
        if batch is None:
            return
        self._kv_last_seq = batch.seq
        sink = self.kv_sink
        if sink is None:
            return
        try:
            sink(batch)
        except Exception:  # a lost batch is a seq gap, which the consumer resyncs from
            log.exception("KV event sink failed")

    def _send(self, msg) -> None:
        self._inbox.put(msg)
        self._wake.set()

    def _deliver(self, rid: str, item) -> None:
        with self._streams_lock:
            entry = self._streams.get(rid)
            if entry is not None and (isinstance(item, BaseException) or item.finished):
                del self._streams[rid]
        if entry is None:
            return
        loop, queue_ = entry
        try:
            loop.call_soon_threadsafe(queue_.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed; nobody is listening
            pass

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            kind = msg[0]
            if kind == "add":
                _, rid, prompt, ids, params, salt, mm = msg
                with self._streams_lock:
                    wanted = rid in self._streams
                if not wanted:  # aborted before it was ever added
                    continue
                try:
                    self.engine.add_request(rid, prompt=prompt, prompt_token_ids=ids, params=params,
                                            prefix_salt=salt, mm=mm)
                except Exception as e:
                    self._deliver(rid, e)
            elif kind == "abort":
                self.engine.abort(msg[1])
            elif kind == "call":
                _, fut, fn, args, kwargs = msg
                try:
                    fut.set_result(fn(self.engine, *args, **kwargs))
                except Exception as e:
                    fut.set_exception(e)

    def _run(self) -> None:
        try:
            while not self._stop:
                self._drain_inbox()
                self._flush_kv()  # calls and aborts may change the cache too
                if not self.engine.has_unfinished_requests():
                    self._stats = self.engine.stats()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                try:
                    outs = self.engine.step()
                except Exception as e:  # a scheduler/sampler bug: fail what is in flight, go on
                    log.exception("engine step failed")
                    outs = []
                    for rid in list(self.engine.requests):
                        self.engine.abort(rid)
                        self._deliver(rid, RuntimeError(f"engine step failed: {e}"))
                for out in outs:
                    self._deliver(out.request_id, out.error if out.error is not None else out)
                self._flush_kv()
                self._stats = self.engine.stats()
        except BaseException as e:  # pragma: no cover - unrecoverable
            self.dead = e
            log.exception("engine loop died")
        finally:
            err = EngineDeadError("engine shut down" if self.dead is None else f"engine died: {self.dead}")
            if self.dead is None:
                self.dead = err
            self._drain_inbox()
            with self._streams_lock:
                rids = list(self._streams)
            for rid in rids:
                self.engine.abort(rid)
                self._deliver(rid, err)
            self._flush_kv()
