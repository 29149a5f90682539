"""The router's HTTP/1.1 client (router/upstream.py) against a real TCP server whose replies the
test scripts: keep-alive reuse, chunked bodies, stale pooled connections, aborts, backpressure."""

from __future__ import annotations

import asyncio

import pytest

from router.upstream import PAUSE_AT, UpstreamError, UpstreamPool


class ScriptedServer:
    """Accepts connections, reads each request (head + content-length body) and answers with
    ``reply(request_bytes, writer)``; records every connection and request."""

    def __init__(self, reply):
        self.reply = reply
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()
        self.server = None

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                req = head + await reader.readexactly(length)
                self.requests.append(req)
                if await self.reply(req, writer) == "close":
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed.set()
        finally:
            writer.close()


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


async def echo(req: bytes, writer):
    writer.write(ok(req.split(b"\r\n\r\n", 1)[1]))


def test_keep_alive_reuses_one_connection_and_sends_a_proper_request():
    async def main():
        async with ScriptedServer(echo) as srv:
            pool = UpstreamPool({"authorization": "Bearer tok"})
            for i in range(20):
                ex = pool.post(srv.url, "/v1/completions", b'{"i": %d}' % i)
                await ex.start()
                assert ex.status == 200 and ex.header(b"content-type") == b"application/json"
                assert await ex.read() == b'{"i": %d}' % i
                ex.close()
            assert srv.connections == 1  # a connection per request would exhaust ports under load
            first = srv.requests[0]
            assert first.startswith(b"POST /v1/completions HTTP/1.1\r\n")
            assert b"\r\nauthorization: Bearer tok\r\n" in first and b"\r\ncontent-length: 8\r\n" in first
            assert b"\r\nhost: 127.0.0.1:" in first
            pool.close()
    asyncio.run(main())


def test_chunked_body_arrives_in_order_as_it_is_sent():
    async def chunked(req, writer):
        writer.write(SSE_HEAD)
        for i in range(5):
            data = b"data: %d\n\n" % i
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")

    async def main():
        async with ScriptedServer(chunked) as srv:
            pool = UpstreamPool()
            for _ in range(2):
                ex = pool.post(srv.url, "/s", b"{}")
                await ex.start()
                got = []
                while (c := await ex.next_data()) is not None:
                    got.append(c)
                ex.close()
                assert b"".join(got) == b"".join(b"data: %d\n\n" % i for i in range(5))
                assert len(got) >= 2  # streamed, not buffered to the end
            assert srv.connections == 1
            pool.close()
    asyncio.run(main())


def test_a_pooled_connection_the_worker_closed_is_replaced_transparently():
    async def answer_then_hang_up(req, writer):
        writer.write(ok(b"{}"))  # keep-alive by HTTP/1.1 rules, then an idle-timeout style close
        await writer.drain()
        return "close"

    async def main():
        async with ScriptedServer(answer_then_hang_up) as srv:
            pool = UpstreamPool()
            for _ in range(3):
                ex = pool.post(srv.url, "/x", b"{}")
                await ex.start()
                assert await ex.read() == b"{}"
                ex.close()
                await asyncio.sleep(0.05)
            assert srv.connections == 3 and len(srv.requests) == 3
            pool.close()
    asyncio.run(main())


def test_abort_mid_body_closes_the_connection_and_fails_the_reader():
    async def slow_stream(req, writer):
        writer.write(SSE_HEAD)
        for _ in range(200):
            writer.write(b"6\r\ndata: \r\n")
            await writer.drain()
            await asyncio.sleep(0.02)

    async def main():
        async with ScriptedServer(slow_stream) as srv:
            pool = UpstreamPool()
            ex = pool.post(srv.url, "/s", b"{}")
            await ex.start()
            assert (await ex.next_data()).startswith(b"data: ")
            ex.abort()
            with pytest.raises(UpstreamError):
                while await ex.next_data() is not None:
                    pass
            ex.close()
            await asyncio.wait_for(srv.closed.wait(), 5)  # the worker saw the client go
            assert not pool.idle[("127.0.0.1", int(srv.url.rsplit(":", 1)[1]), False)]
            pool.close()
    asyncio.run(main())


def test_slow_reader_pauses_the_socket_instead_of_buffering_everything():
    total = 8 * PAUSE_AT

    async def big(req, writer):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        for _ in range(total // 65536):
            writer.write(b"x" * 65536)
            await writer.drain()

    async def main():
        async with ScriptedServer(big) as srv:
            pool = UpstreamPool()
            ex = pool.post(srv.url, "/big", b"{}")
            await ex.start()
            await asyncio.sleep(0.5)  # the server would have sent everything by now if unthrottled
            assert ex.conn.paused and ex._buffered < PAUSE_AT + 2 * 65536 * 4
            assert len(await ex.read()) == total
            ex.close()
            pool.close()
    asyncio.run(main())


def test_refused_and_truncated_responses_raise_upstream_errors():
    async def truncated(req, writer):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await writer.drain()
        return "close"

    async def main():
        pool = UpstreamPool()
        async with ScriptedServer(echo) as srv:
            dead = srv.url
        ex = pool.post(dead, "/x", b"{}")
        with pytest.raises(UpstreamError) as e:
            await ex.start()
        assert e.value.kind == "connect"
        async with ScriptedServer(truncated) as srv:
            ex = pool.post(srv.url, "/x", b"{}")
            await ex.start()
            with pytest.raises(UpstreamError):
                await ex.read()
            ex.close()
        pool.close()
    asyncio.run(main())


def test_a_worker_that_never_answers_times_out_before_the_first_byte():
    async def silent(req, writer):
        await asyncio.sleep(30)  # accepts, reads the request, never answers

    async def main():
        async with ScriptedServer(silent) as srv:
            pool = UpstreamPool()
            ex = pool.post(srv.url, "/x", b"{}")
            loop = asyncio.get_running_loop()
            t = loop.time()
            with pytest.raises(UpstreamError) as err:
                await ex.start(timeout=0.3)
            assert err.value.kind == "timeout" and 0.25 < loop.time() - t < 2.0
            ex.close()
            assert not any(pool.idle.values())  # that connection is closed, never reused
            pool.close()
    asyncio.run(main())


def test_a_stalled_body_times_out_and_buffered_chunks_come_in_one_read():
    async def stall(req, writer):
        writer.write(SSE_HEAD)
        for i in range(3):  # three events at once, then silence
            data = b"data: %d\n\n" % i
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await writer.drain()
        await asyncio.sleep(30)

    async def main():
        async with ScriptedServer(stall) as srv:
            pool = UpstreamPool()
            ex = pool.post(srv.url, "/s", b"{}")
            await ex.start(timeout=5)
            await asyncio.sleep(0.2)  # let all three arrive
            assert await ex.next_data(1.0) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
            with pytest.raises(UpstreamError) as err:
                await ex.next_data(0.3)
            assert err.value.kind == "timeout"
            ex.close()
            pool.close()
    asyncio.run(main())
