"""The router's HTTP/1.1 client to workers: keep-alive connections as asyncio protocols.

Router-to-worker traffic is plain HTTP/1.1 on a trusted network, one request per connection at a
time. A general client (httpx over httpcore and anyio) spent more CPU per request than the worker
needed to answer a one-token completion, so this module does just that job: a LIFO pool of
keep-alive connections per worker, requests written in one ``write``, responses parsed by
``httptools`` (the C parser uvicorn uses) straight from ``data_received``. Reading pauses while
a slow client has not taken the buffered body, so a stream cannot pile up in router memory.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import defaultdict, deque
from urllib.parse import urlsplit

import httptools

PAUSE_AT = 256 * 1024  # buffered body bytes at which reading from the worker pauses
_NEVER = float("inf")


class UpstreamError(Exception):
    """Connecting to, sending to or receiving from a worker failed."""

    def __init__(self, message: str, kind: str = "read"):
        super().__init__(message)
        self.kind = kind  # "connect", "read" or "timeout"


class Exchange:
    """One request to a worker and its response: :meth:`start` sends it and waits for the
    response head; body bytes follow through :meth:`next_data`. :meth:`abort` may be called at
    any point (the client left): it closes the connection, which the worker notices."""

    __slots__ = ("pool", "key", "payload", "status", "headers", "conn", "aborted", "_chunks", "_buffered",
                 "_waiter", "_done", "_error", "_closed", "_last_data", "_head_deadline", "_idle_limit")

    def __init__(self, pool: UpstreamPool, key: tuple[str, int, bool], payload: bytes):
        self.pool, self.key, self.payload = pool, key, payload
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.conn: _Conn | None = None
        self.aborted = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future | None = None
        self._done = False
        self._error: Exception | None = None
        self._closed = False
        # Deadlines, checked by the pool's watchdog (no timer per request): loop times.
        self._last_data = 0.0  # the head's or the last body bytes' arrival
        self._head_deadline = _NEVER
        self._idle_limit = _NEVER  # while waiting for body bytes

    def header(self, name: bytes) -> bytes | None:
        """A response header by lower-case name."""
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    async def start(self, timeout: float | None = None) -> None:
        """Send the request (on a pooled connection if one is alive) and wait for the head, at
        most ``timeout`` seconds after sending (then :class:`UpstreamError` of kind ``timeout``
        and the connection is closed, which the worker sees as the client leaving)."""
        idle = self.pool.idle[self.key]
        while idle:
            conn = idle.pop()
            if conn.lost:
                continue
            try:
                await self._run(conn, timeout)
                return
            except UpstreamError as e:
                if conn.got_bytes or self.aborted or e.kind == "timeout":
                    raise
                # Closed before answering: the worker dropped an idle connection as we reused it,
                # so nothing was processed. Reset and try the next one.
                self.status, self.headers, self._done, self._error = 0, [], False, None
        conn = await self.pool.connect(self.key)
        if self.aborted:
            conn.close()
            raise UpstreamError("aborted")
        await self._run(conn, timeout)

    async def _run(self, conn: _Conn, timeout: float | None) -> None:
        self.conn = conn
        head = conn.begin(self)
        if timeout is not None:
            self._last_data = self.pool.watch(self, timeout)  # the clock starts with the request
            self._head_deadline = self._last_data + timeout
        try:
            await head
        except BaseException:
            self.conn = None
            conn.close()
            raise
        self._head_deadline = _NEVER
        self._last_data = self.pool.loop.time()

    def _check_deadlines(self, now: float) -> None:
        """The pool's watchdog asks: fail whatever waited too long."""
        conn = self.conn
        if now >= self._head_deadline and conn is not None:
            conn.head_timed_out(self._head_deadline - self._last_data)
        w = self._waiter
        if w is not None and not w.done() and now - self._last_data >= self._idle_limit:
            if conn is not None and conn.paused:
                self._last_data = now  # held back by a slow client, not silent
            else:
                w.set_exception(UpstreamError(f"no data from the worker for {self._idle_limit:g} s", "timeout"))

    def abort(self) -> None:
        """Give up on this exchange now (safe at any stage, and more than once)."""
        self.aborted = True
        if self.conn is not None:
            self.conn.close()

    # called by the connection
    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._last_data = self.pool.loop.time()
        self._buffered += len(data)
        if self._buffered >= PAUSE_AT:
            self.conn.pause()
        self._wake()

    def _finish(self, error: Exception | None = None) -> None:
        if not self._done:
            self._done, self._error = True, error
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def next_data(self, idle_timeout: float | None = None) -> bytes | None:
        """Every body byte buffered so far, waiting for some if there is none (at most
        ``idle_timeout`` seconds: then :class:`UpstreamError` of kind ``timeout``); None at the
        end; :class:`UpstreamError` if the connection broke mid-body. Taking all that is buffered
        at once keeps the relay at one write per wake-up, however many chunks arrived."""
        if not self._chunks:
            await self._wait(idle_timeout)
            if not self._chunks:
                if self._error is not None:
                    raise self._error
                return None
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self.conn is not None:
            self.conn.resume()
        return data

    async def _wait(self, timeout: float | None) -> None:
        if timeout is not None:
            self._idle_limit = timeout
            self.pool.watch(self, timeout)
        while not self._chunks and not self._done:
            self._waiter = w = self.pool.loop.create_future()
            try:
                await w
            finally:
                self._waiter = None

    async def read(self, idle_timeout: float | None = None) -> bytes:
        """The whole remaining body."""
        parts = []
        while (c := await self.next_data(idle_timeout)) is not None:
            parts.append(c)
        return b"".join(parts)

    def close(self) -> None:
        """Done with the exchange: a fully read response returns its connection to the pool;
        anything else closes it, which is what tells the worker the client has gone."""
        if self._closed:
            return
        self._closed = True
        self.pool.watched.discard(self)
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.finished(reusable=self._done and self._error is None and not self._chunks)


class _Conn(asyncio.Protocol):
    """One keep-alive connection to a worker, carrying one exchange at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int, bool]):
        self.pool, self.key = pool, key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.ex: Exchange | None = None
        self.head: asyncio.Future | None = None
        self.lost = self.got_bytes = self.paused = self.keep_alive = False

    def begin(self, ex: Exchange) -> asyncio.Future:
        self.ex = ex
        self.head = asyncio.get_running_loop().create_future()
        self.got_bytes = self.keep_alive = False
        self.transport.write(ex.payload)
        return self.head

    def finished(self, reusable: bool) -> None:
        self.ex = self.head = None
        if reusable and self.keep_alive and not self.lost and not self.paused:
            self.parser = httptools.HttpResponseParser(self)
            self.pool.release(self)
        else:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.ex is None:  # nothing was asked: a confused peer
            self.transport.close()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(f"bad response from worker: {e}")
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.lost = True
        if self.ex is not None:
            self._fail("connection closed " + ("mid-body" if self.head is None or self.head.done()
                                               else "before the response"))

    def head_timed_out(self, timeout: float) -> None:
        if self.head is not None and not self.head.done():
            self.head.set_exception(UpstreamError(f"no response from the worker in {timeout:.3g} s", "timeout"))

    def _fail(self, message: str) -> None:
        err = UpstreamError(message)
        if self.head is not None and not self.head.done():
            self.head.set_exception(err)
        if self.ex is not None:
            self.ex._finish(err)

    def pause(self) -> None:
        if not self.paused and not self.lost:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and not self.lost:
            self.paused = False
            self.transport.resume_reading()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.ex.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.ex.status = self.parser.get_status_code()
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.ex._feed(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()  # only valid inside this callback
        self.ex._finish()


class UpstreamPool:
    """Keep-alive connections to workers, LIFO per worker so the warmest is reused first."""

    def __init__(self, default_headers: dict[str, str] | None = None, max_idle_per_host: int = 64,
                 connect_timeout: float = 3.0, ssl_context: ssl.SSLContext | None = None):
        self.max_idle = max_idle_per_host
        self.connect_timeout = connect_timeout
        self.idle: dict[tuple[str, int, bool], list[_Conn]] = defaultdict(list)
        self._extra = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in (default_headers or {}).items())
        self._targets: dict[str, tuple[tuple[str, int, bool], bytes, bytes]] = {}
        self._ssl = ssl_context
        self.watched: set[Exchange] = set()  # exchanges with a deadline, checked by one watchdog
        self._watchdog: asyncio.TimerHandle | None = None
        self._tick = 1.0
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def watch(self, ex: Exchange, timeout: float) -> float:
        """Check ``ex``'s deadlines from now on (until it closes); returns the loop time.

        One watchdog timer for the whole pool, ticking a quarter of the shortest limit it has
        seen (0.05-1 s), instead of a timer per request: per-request timers measured ~7% more
        router CPU per one-token request."""
        loop = self.loop
        self.watched.add(ex)
        tick = min(1.0, max(0.05, timeout / 4))
        if tick < self._tick:
            self._tick = tick
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._tick, self._check)
        return loop.time()

    def _check(self) -> None:
        self._watchdog = None
        now = self.loop.time()
        for ex in list(self.watched):
            ex._check_deadlines(now)
        if self.watched:
            self._watchdog = self.loop.call_later(self._tick, self._check)

    def _target(self, base_url: str) -> tuple[tuple[str, int, bool], bytes, bytes]:
        t = self._targets.get(base_url)
        if t is None:
            u = urlsplit(base_url)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise UpstreamError(f"unsupported worker URL {base_url!r}", "connect")
            tls = u.scheme == "https"
            port = u.port or (443 if tls else 80)
            t = ((u.hostname, port, tls), f"{u.hostname}:{port}".encode(), u.path.rstrip("/").encode())
            if len(self._targets) > 4096:  # worker URLs churn over weeks; keep this bounded
                self._targets.clear()
            self._targets[base_url] = t
        return t

    def post(self, base_url: str, path: str, body: bytes, extra_headers: bytes = b"") -> Exchange:
        """A ``POST base_url+path`` exchange, not yet sent: call :meth:`Exchange.start`.
        ``extra_headers``: more header lines, each ending in CRLF (checked by the caller)."""
        key, hostport, prefix = self._target(base_url)
        payload = b"".join((b"POST ", prefix, path.encode(), b" HTTP/1.1\r\nhost: ", hostport,
                            b"\r\ncontent-type: application/json\r\n", self._extra, extra_headers,
                            b"content-length: %d\r\n\r\n" % len(body), body))
        return Exchange(self, key, payload)

    async def connect(self, key: tuple[str, int, bool]) -> _Conn:
        host, port, tls = key
        ctx = None
        if tls:
            ctx = self._ssl = self._ssl or ssl.create_default_context()
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Conn(self, key), host, port, ssl=ctx), self.connect_timeout)
        except (TimeoutError, OSError, ssl.SSLError) as e:
            raise UpstreamError(f"{type(e).__name__}: {e}", "connect") from e
        return conn

    def release(self, conn: _Conn) -> None:
        idle = self.idle[conn.key]
        if len(idle) < self.max_idle:
            idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for idle in self.idle.values():
            for c in idle:
                c.close()
        self.idle.clear()
