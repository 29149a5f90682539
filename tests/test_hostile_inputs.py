"""Hostile input against a real worker and a real router (the manager's): huge and deeply nested
JSON, invalid UTF-8, slow bodies and heads (slowloris), oversized headers, thousands of stop
strings, ``n`` and ``max_tokens`` at and past their limits, prompts at the context limit, numbers
out of range, images that decompress to huge sizes, an image URL that redirects elsewhere.

Each gets its status in OpenAI's error shape, never a 500; the processes keep serving others
meanwhile and afterwards, and no KV block stays held (checked after every test)."""

from __future__ import annotations

import base64
import http.server
import io
import json
import select
import socket
import struct
import threading
import time
import zlib

import httpx
import pytest
from PIL import Image
from procs import start_manager, start_worker, wait_until

TOKEN = "worker-secret-hostile"
WAUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT = 2  # header_timeout and body_timeout of both processes, seconds
LIMITS = f"  header_timeout: {TIMEOUT}\n  body_timeout: {TIMEOUT}\n  max_header_bytes: 16KiB\n"
CONTEXT = 1024  # tiny-llama's max_model_len
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    cfg = tmp / "manager.yaml"
    cfg.write_text("manager:\n  max_body_bytes: 1MiB\n" + LIMITS)
    mgr, url = start_manager(tmp, "--config", str(cfg), "--worker-token", TOKEN, "--data-dir", str(tmp / "redis"))
    try:
        worker, wurl = start_worker(tmp, f"llama={model_dir / 'tiny-llama'},vl={model_dir / 'tiny-qwen2-vl'}",
                                    "--manager-url", url, "--heartbeat-interval", "1", env={"WORKER_TOKEN": TOKEN},
                                    ready_headers=WAUTH, worker_yaml=LIMITS + "  allowed_image_domains: [localhost]\n")
        try:
            wait_until(lambda: len(httpx.get(f"{url}/v1/models").json()["data"]) == 2, what="models routed")
            yield {"worker": wurl, "router": url, "worker_proc": worker}
        finally:
            assert worker.stop() == 0, worker.log()[-3000:]
    finally:
        mgr.stop()


def target(cluster, which: str) -> tuple[str, dict]:
    return (cluster["worker"], WAUTH) if which == "worker" else (cluster["router"], {})


def metric(wurl: str, name: str, model: str) -> float:
    for line in httpx.get(f"{wurl}/metrics").text.splitlines():
        if line.startswith(name + "{") and f'model_name="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def idle(wurl: str) -> bool:
    return all(metric(wurl, "vllm:num_requests_running", m) == 0 and metric(wurl, "vllm:kv_cache_usage_perc", m) == 0
               for m in ("llama", "vl"))


@pytest.fixture(autouse=True)
def serving_and_no_leak(cluster):
    """After every test: both processes answer a normal request, the worker is alive, and every
    KV block is back (no request left running)."""
    yield
    for url, headers in (target(cluster, "worker"), target(cluster, "router")):
        r = httpx.post(f"{url}{COMPLETIONS}", json={"model": "llama", "prompt": "still fine", "max_tokens": 2},
                       headers=headers, timeout=30)
        assert r.status_code == 200, r.text
    assert cluster["worker_proc"].p.poll() is None
    wait_until(lambda: idle(cluster["worker"]), what="no request running, no KV block held")


def error(r: httpx.Response, status: int, param: str | None = None, code=None) -> dict:
    """``r`` is an OpenAI-shaped error with ``status`` (naming ``param``, with ``code``, when given)."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def post(url: str, path: str, headers: dict, body=None, content: bytes | None = None, **kw) -> httpx.Response:
    if body is not None:
        content = json.dumps(body).encode()
    return httpx.post(f"{url}{path}", content=content, headers={"content-type": "application/json", **headers},
                      timeout=kw.pop("timeout", 60), **kw)


def chat(**kw) -> dict:
    return {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def exchange(url: str, data: bytes, wait: float = 15.0, trickled: bytes = b"", every: float = 0.05) -> bytes:
    """Send ``data`` on a raw connection, then ``trickled`` one byte every ``every`` seconds until
    the server answers, then read until the server closes the connection; ``<timeout>`` marks a
    server that never did."""
    with socket.create_connection(("127.0.0.1", port_of(url))) as s:
        s.settimeout(wait)
        try:
            s.sendall(data)
            for b in trickled:
                if select.select([s], [], [], 0)[0]:
                    break  # answered: stop sending, read it
                s.sendall(bytes([b]))
                time.sleep(every)
        except OSError:
            pass  # the server closed while we were sending: what it answered is still read
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            return out + b"<timeout>"
        except ConnectionResetError:
            pass
        return out


def response_of(raw: bytes) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one raw HTTP/1.1 response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body[:int(headers["content-length"])])


# -- size and shape of the JSON --------------------------------------------------------------------

@pytest.mark.parametrize("which", ["worker", "router"])
def test_huge_bodies(cluster, which):
    url, h = target(cluster, which)
    limit = 2**20
    # Just under the limit: read whole and answered (a field nobody defines is ignored, as vLLM does).
    near = {"model": "llama", "prompt": "x", "max_tokens": 1, "padding": "a" * (limit - 100)}
    r = post(url, COMPLETIONS, h, near)
    assert limit - 100 < len(r.request.content) <= limit and r.status_code == 200, r.text
    # Over it: 413 by Content-Length, and by counting when the body comes chunked (no length).
    big = json.dumps({**near, "padding": "a" * limit}).encode()
    error(post(url, COMPLETIONS, h, content=big), 413, code="request_too_large")
    error(post(url, COMPLETIONS, h, content=iter([big[:4096], big[4096:]])), 413, code="request_too_large")
    # FastAPI's routes too (the worker's /tokenize): a 413, not FastAPI's "error parsing the body" 400.
    error(post(url, "/tokenize", h, content=iter([big[:4096], big[4096:]])), 413, code="request_too_large")


@pytest.mark.parametrize("which", ["worker", "router"])
@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, "/tokenize"])
def test_deeply_nested_json_is_a_400(cluster, which, path):
    url, h = target(cluster, which)
    deep = b'{"model":"llama","messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    err = error(post(url, path, h, content=deep), 400)
    if path != "/tokenize" or which == "router":  # raw routes say why (FastAPI: "error parsing the body")
        assert "JSON" in err["message"], err
    error(post(url, path, h, content=b"[" * 200_000), 400)


@pytest.mark.parametrize("which", ["worker", "router"])
def test_invalid_utf8_and_lone_surrogates(cluster, which):
    url, h = target(cluster, which)
    bad = b'{"model":"llama","messages":[{"role":"user","content":"\xff\xfe\xc3"}],"max_tokens":2}'
    error(post(url, CHAT, h, content=bad), 400)
    error(post(url, "/tokenize", h, content=b'{"model":"llama","prompt":"\xff"}'), 400)
    # "\ud800" is valid JSON but no text: refused where it is read, never a 500.
    lone = b'{"model":"llama","prompt":"\\ud800","max_tokens":2}'
    error(post(url, COMPLETIONS, h, content=lone), 400)
    if which == "router":  # the router reads the model name itself
        error(post(url, COMPLETIONS, h, content=b'{"model":"\\udfff","prompt":"x"}'), 400, "model")


# -- slow clients and big heads -------------------------------------------------------------------

@pytest.mark.parametrize("which", ["worker", "router"])
def test_slow_body_is_cut_off_while_others_are_served(cluster, which):
    url, h = target(cluster, which)
    auth = "".join(f"{k}: {v}\r\n" for k, v in h.items()).encode()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth +
            b"Content-Length: 200\r\n\r\n")
    results: dict[str, bytes] = {}
    slow = [threading.Thread(target=lambda: results.__setitem__("stalled", exchange(url, head + b'{"model":'))),
            threading.Thread(target=lambda: results.__setitem__(
                "trickled", exchange(url, head, trickled=b'{"model":"llama","prompt":"' + b"x" * 170)))]
    for t in slow:
        t.start()
    # Meanwhile others are served as usual.
    r = post(url, COMPLETIONS, h, {"model": "llama", "prompt": "meanwhile", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    for t in slow:
        t.join(30)
    for kind in ("stalled", "trickled"):  # one deadline for the whole body: trickling does not extend it
        status, headers, body = response_of(results[kind])
        assert status == 408 and headers["connection"] == "close", results[kind][:300]
        assert body["error"]["code"] == "request_timeout"
        assert not results[kind].endswith(b"<timeout>")  # and the connection was closed


@pytest.mark.parametrize("which", ["worker", "router"])
def test_slow_or_missing_request_head_is_cut_off(cluster, which):
    url, _ = target(cluster, which)
    raw = exchange(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ", wait=TIMEOUT * 5)
    status, headers, body = response_of(raw)
    assert status == 408 and body["error"]["code"] == "request_timeout" and headers["connection"] == "close"
    # Connections that never send a byte are closed too (after the same time), without an answer.
    with socket.create_connection(("127.0.0.1", port_of(url))) as s:
        s.settimeout(TIMEOUT * 5)
        assert s.recv(100) == b""


@pytest.mark.parametrize("which", ["worker", "router"])
def test_oversized_headers_431(cluster, which):
    url, h = target(cluster, which)
    for extra in ({"X-Big": "a" * 20_000}, {f"X-H{i}": "v" * 20 for i in range(1000)}):
        r = httpx.get(f"{url}/health", headers=extra)
        error(r, 431, code="request_header_too_large")
    # A head sent in pieces, past the limit and still growing: answered as soon as it is too big.
    raw = exchange(url, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000)
    assert response_of(raw)[0] == 431
    assert httpx.get(f"{url}/health", headers={"X-Fine": "a" * 8000}).status_code == 200
    r = httpx.get(f"{url}{CHAT}", headers=h)  # a wrong method says which one is right
    assert error(r, 405)["code"] == "method_not_allowed" and r.headers["allow"] == "POST"


# -- parameters at and past their limits ----------------------------------------------------------

@pytest.mark.parametrize("which", ["worker", "router"])
def test_stop_strings_are_capped(cluster, which):
    url, h = target(cluster, which)
    assert "64" in error(post(url, CHAT, h, chat(stop=[f"s{i}" for i in range(5000)])), 400, "stop")["message"]
    error(post(url, CHAT, h, chat(stop=["x" * 513])), 400, "stop")
    error(post(url, COMPLETIONS, h, {"model": "llama", "prompt": "x", "stop": "x" * 513}), 400, "stop")
    r = post(url, CHAT, h, chat(stop=[f"{i:03d}" + "x" * 508 for i in range(64)], max_tokens=8))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("which", ["worker", "router"])
def test_n_at_its_limit(cluster, which):
    url, h = target(cluster, which)
    r = post(url, COMPLETIONS, h, {"model": "llama", "prompt": "pick", "n": 128, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 128, r.text
    error(post(url, COMPLETIONS, h, {"model": "llama", "prompt": "pick", "n": 129, "max_tokens": 1}), 400, "n")
    # n = 10**30 used to fork sequences in the engine loop until memory ran out (the worker hung).
    error(post(url, CHAT, h, chat(n=10**30)), 400, "n")


@pytest.mark.parametrize("which", ["worker", "router"])
def test_prompt_and_max_tokens_at_the_context_limit(cluster, which):
    url, h = target(cluster, which)
    ids = [7] * 1000
    r = post(url, COMPLETIONS, h, {"model": "llama", "prompt": ids, "max_tokens": CONTEXT - 1000, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"] == {"prompt_tokens": 1000, "completion_tokens": CONTEXT - 1000,
                                                          "total_tokens": CONTEXT}, r.text
    error(post(url, COMPLETIONS, h, {"model": "llama", "prompt": ids, "max_tokens": CONTEXT - 999}), 400, "max_tokens")
    r = post(url, COMPLETIONS, h, {"model": "llama", "prompt": [7] * (CONTEXT - 1), "max_tokens": 1})
    assert r.status_code == 200, r.text
    err = error(post(url, COMPLETIONS, h, {"model": "llama", "prompt": [7] * CONTEXT, "max_tokens": 1}), 400, "prompt")
    assert str(CONTEXT) in err["message"]
    # A chat prompt: its rendered length as /tokenize counts it.
    messages = [{"role": "user", "content": "word " * 300}]
    n = post(url, "/tokenize", h, {"model": "llama", "messages": messages}).json()["count"]
    r = post(url, CHAT, h, {"model": "llama", "messages": messages, "max_tokens": CONTEXT - n, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == CONTEXT, r.text
    r = post(url, CHAT, h, {"model": "llama", "messages": messages, "max_tokens": CONTEXT - n + 1})
    error(r, 400, "max_tokens")


@pytest.mark.parametrize("which", ["worker", "router"])
def test_out_of_range_and_mistyped_numbers_are_400s(cluster, which):
    url, h = target(cluster, which)
    # A long stream runs beside them: a bad value must fail its own request only (a top_k past
    # 64 bits used to fail the whole engine step, batch-mates included).
    body = {"model": "llama", "prompt": "keep going", "max_tokens": 200, "ignore_eos": True, "stream": True}
    streamed: list[str] = []
    t = threading.Thread(target=lambda: streamed.extend(
        httpx.post(f"{url}{COMPLETIONS}", json=body, headers=h, timeout=60).text.split("\n\n")))
    t.start()
    for field, value in (("seed", 2**64), ("top_k", 2**64), ("max_tokens", True), ("n", "2"), ("stream", 1),
                         ("max_tokens", 2.0), ("temperature", "0.5")):
        error(post(url, COMPLETIONS, h, {"model": "llama", "prompt": "x", "max_tokens": 2, field: value}), 400, field)
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        raw = b'{"model":"llama","prompt":"x","max_tokens":2,"temperature":' + literal + b"}"
        error(post(url, COMPLETIONS, h, content=raw), 400, "temperature")
    error(post(url, "/detokenize", h, {"model": "llama", "tokens": [True, 5]}), 400, "tokens")
    t.join(60)
    assert streamed[-2] == "data: [DONE]" and not any('"error"' in e for e in streamed), streamed[-3:]
    assert all(e.startswith("data: ") for e in streamed if e)
    assert sum(1 for e in streamed if e.startswith("data: {")) >= 100


def test_tiny_temperatures_are_greedy(cluster):
    """A temperature that underflows float32 used to sample from NaN probabilities (token 0, every
    time); below 1e-5 it is greedy, as in vLLM."""
    url, h = target(cluster, "worker")
    body = {"model": "llama", "prompt": "the same answer", "max_tokens": 8, "ignore_eos": True}
    greedy = post(url, COMPLETIONS, h, {**body, "temperature": 0}).json()["choices"][0]["text"]
    for t in (1e-300, 1e-6):
        assert post(url, COMPLETIONS, h, {**body, "temperature": t}).json()["choices"][0]["text"] == greedy


# -- images ---------------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, rows: int | None = None) -> bytes:
    """A grayscale PNG of zeros, built by hand: ``rows`` < ``height`` makes one whose header
    declares more than its data holds."""
    z = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    data = b"".join(z.compress(row) for _ in range(height if rows is None else rows)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b""))


def image_chat(url: str) -> dict:
    return {"model": "vl", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}}]}]}


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("which", ["worker", "router"])
def test_images_that_decompress_to_huge_sizes_413(cluster, which):
    url, h = target(cluster, which)
    # 30000 x 30000 declared in 100 bytes: PIL itself refuses it on reading the header (it used
    # to escape as a 500).
    declared = png(30000, 30000, rows=1)
    assert len(declared) < 200
    error(post(url, CHAT, h, image_chat(data_url(declared))), 413, "messages", "image_too_large")
    # A decompression bomb: 64 megapixels of zeros in ~60 KB, refused before decoding.
    bomb = png(8000, 8000)
    assert len(bomb) < 100_000
    err = error(post(url, CHAT, h, image_chat(data_url(bomb))), 413, "messages", "image_too_large")
    assert "pixels" in err["message"]
    # A GIF of 3000 frames: only its first frame is an image here; answered, and quickly freed.
    frames = [Image.new("P", (16, 16), i % 256) for i in range(3000)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=10)
    r = post(url, CHAT, h, image_chat(data_url(buf.getvalue(), "gif")))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 4  # the image's tokens are counted


class _Recorder(http.server.ThreadingHTTPServer):
    """A local HTTP server recording the paths it is asked for; ``/redirect`` answers 302 to
    ``location``."""

    def __init__(self, location: str = ""):
        self.paths: list[str] = []
        self.location = location
        rec = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                rec.paths.append(self.path)
                if self.path.startswith("/redirect"):
                    self.send_response(302)
                    self.send_header("Location", rec.location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = png(4, 4)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.mark.parametrize("which", ["worker", "router"])
def test_image_url_redirecting_to_a_disallowed_host_is_not_followed(cluster, which):
    url, h = target(cluster, which)
    secret = _Recorder()
    allowed = _Recorder(f"http://127.0.0.1:{secret.server_address[1]}/secret.png")
    try:
        port = allowed.server_address[1]
        # localhost is allow-listed (by name, exactly): its image is fetched...
        r = post(url, CHAT, h, image_chat(f"http://localhost:{port}/fine.png"))
        assert r.status_code == 200, r.text
        # ... but its redirect to a host that is not is a 400, and that host is never asked.
        err = error(post(url, CHAT, h, image_chat(f"http://localhost:{port}/redirect")), 400, "messages")
        assert "302" in err["message"] or "redirect" in err["message"].lower(), err
        assert allowed.paths == ["/fine.png", "/redirect"] and secret.paths == []
    finally:
        allowed.shutdown()
        secret.shutdown()


# -- the router's own bookkeeping -----------------------------------------------------------------

def test_made_up_model_names_do_not_grow_the_router_metrics(cluster):
    url = cluster["router"]
    for i in range(30):
        error(post(url, COMPLETIONS, {}, {"model": f"no-such-model-{i}", "prompt": "x"}), 404, "model")
    text = httpx.get(f"{url}/metrics").text
    assert "no-such-model" not in text
    assert 'router_requests_total{endpoint="completions",model="-",status="404"}' in text, \
        [line for line in text.splitlines() if line.startswith("router_requests_total")]
    assert 'model="llama"' in text  # known models keep their own series
