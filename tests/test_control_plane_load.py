"""The control plane under data-plane load: heartbeats get through a busy manager, and one that
does not is retried rather than costing the worker its place."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import redis
from procs import start_manager, start_redis, start_worker

from worker.registration import Registrar


def test_heartbeat_survives_the_manager_closing_a_reused_keep_alive_connection():
    # A manager (any HTTP server) closes idle keep-alive connections on its own timer; a heartbeat
    # sent on such a connection as it closes gets a ReadError. The old registrar counted that as
    # the manager being down and backed off past the TTL; now it resends on a fresh connection.
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next((ln.split(b":")[1] for ln in head.split(b"\r\n")
                                   if ln.lower().startswith(b"content-length:")), b"0"))
                await reader.readexactly(length)
                seen.append(head.split(b" ")[1])
                if b"/heartbeat" in head and len(seen) % 2 == 0:
                    writer.close()  # the idle-close race: the request is dropped unanswered
                    return
                body = b'{"id": "w", "heartbeat_ttl": 15}' if head.startswith(b"POST /workers ") else b'{"ok": true}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reg = Registrar(f"http://127.0.0.1:{port}", "http://127.0.0.1:1", [{"name": "m"}], lambda: {},
                        interval=5.0, worker_id="w")
        await reg._tick()  # registers
        for _ in range(6):
            await reg._tick()
        assert reg.registered and reg.failures == 0 and reg.heartbeats_sent == 6, seen
        await reg._client.aclose()
        server.close()
        await server.wait_closed()
    asyncio.run(main())


def test_heartbeats_get_through_a_manager_busy_routing(model_dir, tmp_path):
    r = start_redis(tmp_path)
    procs = []
    try:
        mgr, url = start_manager(tmp_path, "--redis-url", r.url, "--heartbeat-ttl", "3")
        procs.append(mgr)
        wproc, _ = start_worker(tmp_path, f"m={model_dir / 'tiny-llama'}", "--manager-url", url,
                                "--heartbeat-interval", "1")
        procs.append(wproc)
        deadline = time.monotonic() + 30
        while not httpx.get(f"{url}/v1/models").json()["data"]:
            assert time.monotonic() < deadline, "worker never registered"
            time.sleep(0.2)
        client = redis.Redis.from_url(r.url, decode_responses=True)
        missing: list[float] = []
        stop = threading.Event()

        def watch():  # the registry, read straight from Redis four times a second
            while not stop.is_set():
                if not client.smembers("llmc:model:m"):
                    missing.append(time.monotonic())
                time.sleep(0.25)

        statuses: dict[int, int] = {}

        async def load(seconds: float):
            limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
            async with httpx.AsyncClient(timeout=30, limits=limits) as c:
                end = time.monotonic() + seconds

                async def one():
                    while time.monotonic() < end:
                        resp = await c.post(f"{url}/v1/completions",
                                            json={"model": "m", "prompt": "hi", "max_tokens": 1})
                        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1

                await asyncio.gather(*(one() for _ in range(32)))

        t = threading.Thread(target=watch)
        t.start()
        try:
            asyncio.run(load(8.0))
        finally:
            stop.set()
            t.join()
        assert missing == [], f"the worker left the registry for {len(missing) * 0.25:.2f}s under load"
        assert set(statuses) == {200} and statuses[200] > 50, statuses
        assert "evicted" not in mgr.log(), mgr.log()[-2000:]
        assert "registering again" not in wproc.log(), wproc.log()[-2000:]
    finally:
        for p in reversed(procs):
            p.stop()
        r.stop()
