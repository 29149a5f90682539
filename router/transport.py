"""A lean HTTP/1.1 transport for the router's shared ``httpx.AsyncClient``.

httpcore probes every pooled connection (through anyio) on every request; at a few hundred
requests/s that was most of the router's CPU. Router-to-worker traffic is plain HTTP/1.1 on a
trusted network, so this transport keeps a LIFO pool of asyncio streams per worker and speaks just
what uvicorn answers with: Content-Length or chunked bodies. Anything else (https) goes to httpx's
default transport.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import httpx


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:
            pass


class _Body(httpx.AsyncByteStream):
    """Response body: yields payload bytes as they arrive (chunked framing removed)."""

    def __init__(self, transport: "LeanTransport", key, conn: _Conn, length: int | None, chunked: bool,
                 keep_alive: bool):
        self.t, self.key, self.conn = transport, key, conn
        self.length, self.chunked, self.keep_alive = length, chunked, keep_alive
        self.done = False

    async def __aiter__(self):
        r = self.conn.reader
        try:
            if self.chunked:
                while True:
                    line = await r.readline()
                    if not line:
                        raise httpx.RemoteProtocolError("connection closed mid-body")
                    size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        while (await r.readline()) not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        break
                    data = await r.readexactly(size)
                    await r.readexactly(2)
                    yield data
            elif self.length is not None:
                left = self.length
                while left > 0:
                    data = await r.read(min(left, 65536))
                    if not data:
                        raise httpx.RemoteProtocolError("connection closed mid-body")
                    left -= len(data)
                    yield data
            else:  # delimited by close
                self.keep_alive = False
                while data := await r.read(65536):
                    yield data
            self.done = True
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            raise httpx.ReadError(str(e) or type(e).__name__) from e

    async def aclose(self) -> None:
        if self.conn is None:
            return
        conn, self.conn = self.conn, None
        if self.done and self.keep_alive:
            self.t._release(self.key, conn)
        else:
            conn.close()  # abandoned mid-body (client left): closing tells the worker


class LeanTransport(httpx.AsyncBaseTransport):
    def __init__(self, max_idle_per_host: int = 64, connect_timeout: float = 3.0):
        self.max_idle = max_idle_per_host
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], list[_Conn]] = defaultdict(list)
        self._fallback = httpx.AsyncHTTPTransport()

    def _release(self, key, conn: _Conn) -> None:
        pool = self._idle[key]
        if len(pool) < self.max_idle and not conn.reader.at_eof():
            pool.append(conn)
        else:
            conn.close()

    async def _connect(self, key) -> _Conn:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*key, limit=2**20),
                                                    self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise httpx.ConnectError(f"{type(e).__name__}: {e}") from e
        return _Conn(reader, writer)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            return await self._fallback.handle_async_request(request)
        key = (url.host, url.port or 80)
        body = request.content if hasattr(request, "_content") else b"".join([c async for c in request.stream])
        head = [f"{request.method} {url.raw_path.decode()} HTTP/1.1\r\n".encode()]
        for k, v in request.headers.raw:
            if k.lower() not in (b"content-length", b"transfer-encoding", b"connection"):
                head.append(k + b": " + v + b"\r\n")
        head.append(b"content-length: %d\r\n\r\n" % len(body))
        payload = b"".join(head) + body
        pool = self._idle[key]
        # A pooled connection may have been closed by the worker: retry once on a fresh one.
        for attempt in range(2):
            reused = bool(pool) and attempt == 0
            conn = pool.pop() if reused else await self._connect(key)
            try:
                conn.writer.write(payload)
                await conn.writer.drain()
                status_line = await conn.reader.readline()
                if not status_line:
                    raise ConnectionResetError("connection closed before the response")
                break
            except (ConnectionError, OSError) as e:
                conn.close()
                if reused:
                    continue
                raise httpx.ReadError(f"{type(e).__name__}: {e}") from e
        parts = status_line.split(b" ", 2)
        status = int(parts[1])
        headers: list[tuple[bytes, bytes]] = []
        length, chunked, keep_alive = None, False, True
        try:
            while (line := await conn.reader.readline()) not in (b"\r\n", b"\n", b""):
                k, _, v = line.partition(b":")
                k, v = k.strip(), v.strip()
                lk = k.lower()
                if lk == b"content-length":
                    length = int(v)
                elif lk == b"transfer-encoding" and b"chunked" in v.lower():
                    chunked = True
                elif lk == b"connection" and v.lower() == b"close":
                    keep_alive = False
                headers.append((k, v))
        except (ConnectionError, OSError) as e:
            conn.close()
            raise httpx.ReadError(f"{type(e).__name__}: {e}") from e
        stream = _Body(self, key, conn, length, chunked, keep_alive)
        return httpx.Response(status, headers=headers, stream=stream, request=request)

    async def aclose(self) -> None:
        for pool in self._idle.values():
            for c in pool:
                c.close()
        self._idle.clear()
        await self._fallback.aclose()
