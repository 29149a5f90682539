"""An :class:`LLMEngine` driven by a background thread, consumed with ``async for``."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator

from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped; no request can run on it any more."""


class AsyncEngine:
    """Thread-backed engine loop with per-request async streams.

    ``generate`` validates synchronously (bad parameters raise in the caller before anything is
    scheduled), then yields a :class:`RequestOutput` every step the request makes progress. Leaving
    the ``async for`` early (client gone, task cancelled) aborts the request and frees its blocks.
    A failing step fails the requests in it and the loop carries on.
    """

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self.dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return self.dead is None and self._thread.is_alive()

    async def generate(self, prompt: str | None = None, params: SamplingParams | None = None,
                       request_id: str | None = None, prompt_token_ids: list[int] | None = None,
                       prefix_salt: bytes = b"") -> AsyncIterator[RequestOutput]:
        if not self.is_alive:
            raise EngineDeadError(f"engine is not running: {self.dead}")
        rid = request_id or f"req-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self.engine.add_request(rid, prompt=prompt, prompt_token_ids=prompt_token_ids,
                                    params=params, prefix_salt=prefix_salt)
            self._streams[rid] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
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

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort(request_id)
            self._streams.pop(request_id, None)

    def call(self, fn, *args, **kwargs):
        """Run ``fn(engine, ...)`` under the engine lock (stats, tokenization)."""
        with self._lock:
            return fn(self.engine, *args, **kwargs)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still running end with an EngineDeadError."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    # -- loop ------------------------------------------------------------------------------------
    def _deliver(self, rid: str, item) -> None:
        entry = self._streams.get(rid)
        if entry is None:
            return
        loop, queue = entry
        if isinstance(item, BaseException) or item.finished:
            self._streams.pop(rid, None)
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed; nobody is listening
            pass

    def _run(self) -> None:
        try:
            while not self._stop:
                with self._lock:
                    busy = self.engine.has_unfinished_requests()
                if not busy:
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                with self._lock:
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
        except BaseException as e:  # pragma: no cover - unrecoverable
            self.dead = e
            log.exception("engine loop died")
        finally:
            err = EngineDeadError("engine shut down" if self.dead is None else f"engine died: {self.dead}")
            if self.dead is None and self._stop:
                self.dead = err
            with self._lock:
                for rid in list(self._streams):
                    self.engine.abort(rid)
                    self._deliver(rid, err)
