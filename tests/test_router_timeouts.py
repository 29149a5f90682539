"""Requests that hang are not forever (SPEC §4): a worker that accepts a connection and never
answers is given up on before the first byte and the request goes elsewhere; a stream that
stalls ends with the SSE error event."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
from procs import start_manager, start_worker

TOKEN = "timeouts-token"
WAUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakeWorker:
    """A TCP server in its own thread: ``mode`` "silent" reads requests and never answers;
    "stall" answers with an SSE head and one event, then nothing."""

    def __init__(self, mode: str):
        self.mode = mode
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(5)

    def _run(self):
        asyncio.set_event_loop(self.loop)

        async def handle(reader, writer):
            try:
                await reader.readuntil(b"\r\n\r\n")
                if self.mode == "stall":
                    event = b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n'
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(event), event))
                    await writer.drain()
                await reader.read()  # until the router gives up and closes
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        async def start():
            self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
            self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
            self.ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("timeouts")
    cfg = tmp / "manager.yaml"
    cfg.write_text("manager:\n  first_byte_timeout: 1\n  stream_idle_timeout: 1\n  policy: round_robin\n")
    fakes = {"silent": FakeWorker("silent"), "stall": FakeWorker("stall")}
    procs = []
    try:
        mgr, url = start_manager(tmp, "--config", str(cfg), "--worker-token", TOKEN,
                                 "--data-dir", str(tmp / "redis"))
        procs.append(mgr)
        wproc, _ = start_worker(tmp, f"m={model_dir / 'tiny-llama'}", "--manager-url", url,
                                "--heartbeat-interval", "1", env={"WORKER_TOKEN": TOKEN}, ready_headers=WAUTH)
        procs.append(wproc)
        for wid, model in (("silent", "m"), ("stall", "stalling")):
            r = httpx.post(f"{url}/workers", headers=WAUTH, json={
                "id": wid, "url": fakes[wid].url, "models": [{"name": model}]})
            assert r.status_code == 200, r.text
        deadline = time.monotonic() + 30
        while len(httpx.get(f"{url}/workers", headers=WAUTH).json()) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        yield url, mgr
    finally:
        for p in reversed(procs):
            p.stop()
        for f in fakes.values():
            f.close()


def test_a_silent_worker_is_given_up_on_and_the_request_retried(cluster):
    url, _ = cluster
    served_by = []
    for i in range(4):  # round robin: every other first pick is the silent worker
        t = time.monotonic()
        r = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": f"hello {i}", "max_tokens": 2},
                       timeout=30)
        assert r.status_code == 200, r.text
        assert time.monotonic() - t < 10
        served_by.append(r.headers["x-llmc-worker"])
    assert "silent" not in served_by
    metrics = httpx.get(f"{url}/metrics").text
    assert 'router_retries_total{model="m",reason="timeout"}' in metrics, metrics


def test_a_silent_only_worker_gives_a_504_not_a_hang(cluster):
    url, _ = cluster
    r = httpx.post(f"{url}/workers", headers=WAUTH, json={
        "id": "silent2", "url": httpx.get(f"{url}/workers/silent", headers=WAUTH).json()["url"],
        "models": [{"name": "only-silent"}]})
    assert r.status_code == 200
    time.sleep(0.5)
    t = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json={"model": "only-silent", "prompt": "x"}, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["type"] == "server_error", r.text
    assert time.monotonic() - t < 8


def test_a_stalled_stream_ends_with_the_error_event(cluster):
    url, _ = cluster
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                      json={"model": "stalling", "prompt": "x", "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert json.loads(events[0])["choices"][0]["text"] == "x"
    err = json.loads(events[-2])
    assert "error" in err and "no data from the worker" in err["error"]["message"], events
    assert events[-1] == "[DONE]"
