"""Chat templates are code: they run in a small pool of renderer processes, with a time limit.

A Jinja render is pure Python that holds the GIL for as long as it runs, and a thread cannot be
stopped. Rendered on the event loop (or in a thread), one template with two nested loops took
~18 s here: every other request of every model, and the heartbeats, waited behind it until the
manager evicted the worker. So every render (the model's template or a request's own) goes to a
renderer process (:mod:`worker.template_process`), and the event loop only awaits its answer:

- processes are fresh interpreters (``python -m worker.template_process``: fork+exec, as
  multiprocessing's ``spawn`` does, never a bare ``fork`` of the worker and its torch threads;
  unlike ``spawn`` it neither re-imports the worker's main module nor adds a resource-tracker
  process), import only transformers' Jinja renderer, and start with the worker (its lifespan);
- a render over ``timeout`` seconds raises :class:`RenderTimeout`; its process is killed
  (SIGKILL) and replaced in the background;
- ``min_processes`` stay warm; a request that finds none idle for ``GROW_AFTER_S`` (renders
  normally take well under a millisecond) starts another, up to ``max_processes``, so one slow render
  does not hold up the rest; extra processes retire after ``RETIRE_AFTER_S`` idle;
- :meth:`TemplateRenderer.stop` kills them all, and each also dies with the worker (PDEATHSIG),
  so none outlives it.

Cost, measured on the shared 2-core CPU box for a normal chat request (system + user message,
tiny-qwen3's template): rendering in-process with ``apply_chat_template`` took ~0.05 ms; the
round trip to a renderer process takes ~0.3 ms wall (0.25-0.5 ms under load), of which the
worker's own thread spends ~0.1 ms (JSON, socket I/O, two loop wake-ups); the rest it spends
serving others. Encoding the text (unchanged, in the worker) takes ~0.15 ms.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import template_process

log = logging.getLogger("worker.templates")

GROW_AFTER_S = 0.1  # a waiting render starts another process (below the max) after this long
RETIRE_AFTER_S = 60.0  # processes beyond the warm ones stop after this long idle
START_TIMEOUT_S = 120.0  # for a new process to import the renderer and say ready


class RenderTimeout(Exception):
    """The template ran past the time limit; its process was killed."""


class RenderError(Exception):
    """The template (or its inputs) failed, or the process died while rendering. ``kind``:
    ``template``, ``too_long`` (more text than the model can take) or ``died``."""

    def __init__(self, message: str, kind: str = "template"):
        super().__init__(message)
        self.kind = kind


@dataclass
class RenderJob:
    """Everything a renderer process needs for one chat, all JSON data: the template, the
    messages as the template gets them (image parts already placeholders), tools and documents as
    JSON schemas/dicts, the tokenizer's special-token strings (``bos_token``, ``eos_token``...)
    and the extra template variables (``chat_template_kwargs``)."""

    template: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    special_tokens: dict[str, Any] | None = None
    variables: dict[str, Any] | None = None
    max_chars: int = 2**31 - 1  # longer rendered text is an error, never shipped back

    def frame(self) -> bytes:
        job = dict(vars(self))  # shallow: asdict's deep copy cost more than the whole round trip
        job["special_tokens"] = job["special_tokens"] or {}
        job["variables"] = job["variables"] or {}
        return template_process.encode_frame(job)


class _Process:
    """One renderer process and the worker's end of its socket."""

    def __init__(self, process, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.process, self.reader, self.writer = process, reader, writer
        self.idle_since = time.monotonic()

    async def exchange(self, frame: bytes) -> dict:
        self.writer.write(frame)
        await self.writer.drain()
        return await _read_frame(self.reader)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.writer.close()


def _child_env() -> dict[str, str]:
    """The worker's environment, with this package importable wherever the worker was started and
    one BLAS thread (numpy comes with the renderer's imports; rendering never uses it)."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root,
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


async def _read_frame(reader: asyncio.StreamReader) -> dict:
    (n,) = template_process.HEADER.unpack(await reader.readexactly(template_process.HEADER.size))
    return template_process.decode_frame(await reader.readexactly(n))


class TemplateRenderer:
    """The worker's pool of chat-template renderer processes (see the module docstring).

    ``trust_request_templates``: whether requests may bring their own ``chat_template``
    (``--trust-request-chat-template``); the pool runs whatever it is given, the callers check."""

    def __init__(self, min_processes: int = 2, max_processes: int = 4, timeout: float = 10.0,
                 trust_request_templates: bool = False):
        if not 1 <= min_processes <= max_processes:
            raise ValueError("need 1 <= min_processes <= max_processes")
        self.min_processes, self.max_processes = min_processes, max_processes
        self.timeout = timeout
        self.trust_request_templates = trust_request_templates
        self._procs: set[_Process] = set()
        self._idle: list[_Process] = []
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._starting: set[subprocess.Popen] = set()  # processes not yet ready
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the warm processes and wait until each is ready to render."""
        procs = await asyncio.gather(*(self._launch() for _ in range(self.min_processes)), return_exceptions=True)
        for p in procs:
            if isinstance(p, _Process):
                self._procs.add(p)
                self._idle.append(p)
        failed = [p for p in procs if not isinstance(p, _Process)]
        if failed:
            self.stop()
            raise RuntimeError(f"chat template renderer processes did not start: {failed[0]}")
        log.info("chat templates: %d renderer processes (up to %d), time limit %g s", self.min_processes,
                 self.max_processes, self.timeout)

    def stop(self) -> None:
        """Kill every renderer process (starting ones too) and reap them; later renders fail."""
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        for w in self._waiters:
            if not w.done():
                w.set_exception(RuntimeError("the chat template renderer has stopped"))
        self._waiters.clear()
        for p in list(self._procs):
            p.kill()
        for proc in list(self._starting):
            if proc.poll() is None:
                proc.kill()
        for proc in [p.process for p in self._procs] + list(self._starting):
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                log.error("chat template renderer %d did not exit after SIGKILL", proc.pid)
        self._procs.clear()
        self._idle.clear()
        self._starting.clear()

    @property
    def pids(self) -> list[int]:
        """Process ids of the live renderer processes (for logs and tests)."""
        return sorted(p.process.pid for p in self._procs)

    # -- rendering -------------------------------------------------------------------------------
    async def render(self, job: RenderJob) -> str:
        """The rendered text of ``job``; :class:`RenderTimeout` past the time limit,
        :class:`RenderError` when the template fails. Never blocks the event loop."""
        if self._closed:
            raise RuntimeError("the chat template renderer has stopped")
        frame = job.frame()
        proc = await self._acquire()
        deadline = time.monotonic() + self.timeout
        exchange = asyncio.get_running_loop().create_task(proc.exchange(frame))
        try:
            done, _ = await asyncio.wait((exchange,), timeout=self.timeout)  # never cancels the exchange
        except asyncio.CancelledError:
            self._settle(proc, exchange, deadline)  # the caller left; the process finishes its job first
            raise
        if not done:
            exchange.cancel()
            self._discard(proc, f"took longer than {self.timeout:g} s")
            raise RenderTimeout(f"rendering took longer than {self.timeout:g} s")
        try:
            reply = exchange.result()
        except (EOFError, OSError, ValueError) as e:
            self._discard(proc, f"failed: {type(e).__name__}")
            raise RenderError(f"the renderer process exited while rendering (status {proc.process.poll()})",
                              "died") from None
        self._release(proc)
        if "error" in reply:
            raise RenderError(reply["error"], reply.get("kind", "template"))
        return reply["text"]

    # -- the pool --------------------------------------------------------------------------------
    async def _acquire(self) -> _Process:
        if self._idle:
            return self._idle.pop()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            try:
                return await asyncio.wait_for(asyncio.shield(waiter), GROW_AFTER_S)
            except TimeoutError:
                self._grow()  # every process is busy for longer than a normal render takes
                return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())
            else:
                waiter.cancel()
            raise

    def _release(self, proc: _Process) -> None:
        """A process is free: to the longest waiting render, else idle."""
        if self._closed:
            proc.kill()
            return
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(proc)
                return
        proc.idle_since = time.monotonic()
        self._idle.append(proc)
        self._retire_idle()

    def _retire_idle(self) -> None:
        now = time.monotonic()
        for p in list(self._idle):
            if len(self._procs) <= self.min_processes:
                return
            if now - p.idle_since > RETIRE_AFTER_S:
                self._idle.remove(p)
                self._discard(p, "retired after idling", replace=False)

    def _discard(self, proc: _Process, why: str, replace: bool = True) -> None:
        """Kill a process (stuck, dead or retired), reap it in the background, and keep the pool
        at its warm size (and growing while renders wait)."""
        log.log(logging.INFO if why.startswith("retired") else logging.WARNING,
                "chat template renderer %d %s; killed", proc.process.pid, why)
        self._procs.discard(proc)
        proc.kill()
        self._background(self._reap(proc.process))
        if replace and not self._closed:
            if len(self._procs) + len(self._starting) < self.min_processes:
                self._grow()
            elif self._waiters:
                self._grow()

    def _grow(self) -> None:
        if not self._closed and len(self._procs) + len(self._starting) < self.max_processes:
            self._background(self._add())

    async def _add(self) -> None:
        try:
            proc = await self._launch()
        except Exception as e:  # noqa: BLE001 - logged; waiters fail only when nothing can serve them
            log.error("a chat template renderer process did not start: %s", e)
            if not self._procs and not self._starting:
                while self._waiters:
                    w = self._waiters.popleft()
                    if not w.done():
                        w.set_exception(RenderError(f"no chat template renderer process could start: {e}", "died"))
            return
        self._procs.add(proc)
        self._release(proc)

    async def _launch(self) -> _Process:
        """Start a renderer process and wait for its ready frame. Called on the event-loop thread
        (see ``template_process._exit_with_parent``)."""
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker.template_process", str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=_child_env())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._starting.add(proc)
        try:
            reader, writer = await asyncio.open_connection(sock=ours)
            try:
                hello = await asyncio.wait_for(_read_frame(reader), START_TIMEOUT_S)
            except BaseException:
                writer.close()
                raise
            if hello.get("ready") is not True:
                writer.close()
                raise RuntimeError(f"unexpected first frame {hello!r}")
        except BaseException as e:
            ours.close()
            if proc.poll() is None:
                proc.kill()
            self._background(self._reap(proc))
            if isinstance(e, (EOFError, OSError)):
                raise RuntimeError(f"renderer process exited while starting (status {proc.poll()})") from None
            raise
        finally:
            self._starting.discard(proc)
        if self._closed:
            proc.kill()
            writer.close()
            raise RuntimeError("the chat template renderer has stopped")
        return _Process(proc, reader, writer)

    def _settle(self, proc: _Process, exchange: asyncio.Future, deadline: float) -> None:
        """After the caller of a render left: wait (up to its time limit) for the process to
        answer, then reuse it; a process that does not answer in time is killed."""
        async def settle():
            try:
                await asyncio.wait_for(exchange, max(0.0, deadline - time.monotonic()))
            except BaseException:
                self._discard(proc, "did not answer an abandoned render in time")
                return
            self._release(proc)
        self._background(settle())

    async def _reap(self, process: subprocess.Popen) -> None:
        """Collect a killed process's exit status without blocking the loop."""
        for _ in range(500):
            if process.poll() is not None:
                return
            await asyncio.sleep(0.01)

    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
