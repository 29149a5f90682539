"""vLLM's server flags on the worker, the router and the manager (SPEC §3.1): CORS, --root-path,
X-Request-Id headers, request logs, several served names per model, /ping and /version.

One control plane with real processes: Redis, a manager with every option on, a router replica
with every option off, and two workers (one with the options on and three names for its model,
one with them off)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata

import httpx
import openai
import pytest
from procs import ROOT, Proc, free_port, start_manager, start_redis, start_router, wait_until

TOKEN = "worker-token-Zq81"
KEY = "client-key-Xv27"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "http://app.example"
ALIASES = ["alias-a", "alias-b"]
PROMPT = "The quick brown fox jumps over the lazy dog ZEBRA-MARKER"
VERSION = metadata.version("llm-cluster")


def start_named_worker(tmp, model_yaml: str, models: str, names: list[str], *extra: str) -> tuple[Proc, str]:
    """A worker whose ``/v1/models`` is ready when it lists exactly ``names`` (aliases included)."""
    port = free_port()
    cfg = tmp / f"worker-{port}.yaml"
    cfg.write_text("worker:\n  cpu_kv_cache_memory: 8MiB\n" + model_yaml +
                   "engine_defaults:\n  max_num_seqs: 8\n  dtype: float32\n")
    proc = Proc(["-m", "worker", "--models", models, "--host", "127.0.0.1", "--port", str(port),
                 "--config", str(cfg), *extra], tmp / f"worker-{port}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(f"{url}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"},
                       ok=lambda r: r.status_code == 200 and sorted(m["id"] for m in r.json()["data"]) == sorted(names))
    except Exception:
        proc.stop()
        raise
    return proc, url


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flags")
    redis = start_redis(tmp)
    procs: list[Proc] = []
    try:
        # The manager: every option on (as flags), below /gw.
        mgr, murl = start_manager(tmp, "--redis-url", redis.url, "--worker-token", TOKEN, "--api-key", KEY,
                                  "--enable-request-id-headers", "--enable-log-requests",
                                  "--allowed-origins", f'["{ORIGIN}"]', "--root-path", "/gw/")
        procs.append(mgr)
        # A router replica: every option off.
        rtr, rurl = start_router(tmp, redis.url, "--worker-token", TOKEN, "--api-key", KEY)
        procs.append(rtr)
        # Worker 1: options on (some as config.yaml keys), llama answering to three names.
        llama = model_dir / "tiny-llama"
        w1, w1url = start_named_worker(
            tmp, f"  enable_request_id_headers: true\n  models:\n  - name: llama\n    source: {llama}\n"
                 f"    served_model_name: [{', '.join(ALIASES)}]\n",
            f"llama={llama}", ["llama", *ALIASES], "--manager-url", murl, "--worker-token", TOKEN,
            "--heartbeat-interval", "0.5", "--enable-log-requests", "--max-log-len", "12",
            "--allowed-origins", ORIGIN, "--root-path", "/w1")
        procs.append(w1)
        # Worker 2: options off but request logs (no --max-log-len: no prompt text).
        w2, w2url = start_named_worker(tmp, "  enable_log_requests: true\n", f"q={model_dir / 'tiny-qwen3'}", ["q"],
                                       "--manager-url", murl, "--worker-token", TOKEN, "--heartbeat-interval", "0.5")
        procs.append(w2)
        wait_until(lambda: len(httpx.get(f"{murl}/workers", headers=AUTH).json()) == 2, what="2 workers")
        yield {"manager": murl, "router": rurl, "w1": w1url, "w2": w2url,
               "procs": {"manager": mgr, "router": rtr, "w1": w1, "w2": w2}}
    finally:
        for p in reversed(procs):
            p.stop()
        redis.stop()


def wauth() -> dict:
    return {"Authorization": f"Bearer {TOKEN}"}


def chat_body(model: str, content: str = "Hi there", **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4,
            "temperature": 0, **kw}


def request_lines(proc: Proc, logger: str) -> list[str]:
    return [line for line in proc.log().splitlines() if f"{logger}: request " in line]


def field(line: str, name: str) -> str | None:
    m = re.search(rf"(?:^| ){name}=(\"(?:[^\"\\]|\\.)*\"|\S+)", line.split(": request ", 1)[1])
    if m is None:
        return None
    v = m.group(1)
    return json.loads(v) if v.startswith('"') else v


def stream_chat(url: str, headers: dict, body: dict) -> tuple[httpx.Response, str]:
    with httpx.stream("POST", url, json={**body, "stream": True}, headers=headers, timeout=60) as r:
        text = "".join(r.iter_text())
    return r, text


# -- CORS -------------------------------------------------------------------------------------------
def test_cors_is_off_by_default(cluster):
    w2 = cluster["w2"]
    h = {**wauth(), "Origin": ORIGIN}
    answers = [httpx.post(f"{w2}/v1/chat/completions", json=chat_body("q"), headers=h, timeout=60),
               httpx.get(f"{w2}/v1/models", headers=h),
               httpx.options(f"{w2}/v1/chat/completions",
                             headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}),
               httpx.post(f"{cluster['router']}/v1/chat/completions", json=chat_body("q"),
                          headers={**AUTH, "Origin": ORIGIN}, timeout=60)]
    for r in answers:
        assert not [k for k in r.headers if k.lower().startswith("access-control-")], dict(r.headers)
    assert [r.status_code for r in answers] == [200, 200, 405, 200], [r.text for r in answers]


def test_cors_preflight_and_headers_on_streams_through_the_raw_routes(cluster):
    for base, auth, model in ((f"{cluster['manager']}/gw", AUTH, "alias-a"), (f"{cluster['w1']}/w1", wauth(), "llama")):
        pre = httpx.options(f"{base}/v1/chat/completions", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert pre.status_code == 200, pre.text
        assert pre.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        r, text = stream_chat(f"{base}/v1/chat/completions", {**auth, "Origin": ORIGIN}, chat_body(model))
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert text.rstrip().endswith("data: [DONE]")
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()  # ids are on on both
        # Another origin is not allowed: no allow-origin header.
        other = httpx.post(f"{base}/v1/chat/completions", json=chat_body(model),
                           headers={**auth, "Origin": "http://evil.example"}, timeout=60)
        assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    # Errors answered by the raw layer and FastAPI routes carry the headers too.
    bad = httpx.post(f"{cluster['manager']}/gw/v1/chat/completions", json=chat_body("no-such-model"),
                     headers={**AUTH, "Origin": ORIGIN})
    assert bad.status_code == 404 and bad.headers["access-control-allow-origin"] == ORIGIN
    models = httpx.get(f"{cluster['manager']}/gw/v1/models", headers={**AUTH, "Origin": ORIGIN})
    assert models.headers["access-control-allow-origin"] == ORIGIN


# -- root path --------------------------------------------------------------------------------------
def test_root_path_serves_prefixed_and_stripped_paths(cluster):
    m = cluster["manager"]
    for base in (f"{m}/gw", m):  # a proxy may pass the prefix on or strip it
        assert httpx.get(f"{base}/health").status_code == 200
        assert "alias-a" in [x["id"] for x in httpx.get(f"{base}/v1/models", headers=AUTH).json()["data"]]
    client = openai.OpenAI(base_url=f"{m}/gw/v1", api_key=KEY, max_retries=0)
    r = client.completions.create(model="alias-b", prompt="hello", max_tokens=3, temperature=0)
    assert r.model == "alias-b" and r.usage.completion_tokens == 3
    w1 = cluster["w1"]
    c = openai.OpenAI(base_url=f"{w1}/w1/v1", api_key=TOKEN, max_retries=0)
    assert c.chat.completions.create(**chat_body("llama")).usage.completion_tokens == 4
    assert httpx.post(f"{w1}/w1/tokenize", json={"model": "llama", "prompt": "hi"}, headers=wauth()).json()["count"] > 0
    # Only the prefix itself is taken off: a path that merely starts with its letters is not served.
    assert httpx.post(f"{w1}/w1x/v1/completions", json={"model": "llama", "prompt": "x"},
                      headers=wauth()).status_code == 404
    # The worker registered its unprefixed URL; the router reaches it (the worker takes both forms).
    assert httpx.get(f"{m}/gw/workers", headers=AUTH).status_code == 200


# -- request ids ------------------------------------------------------------------------------------
def test_worker_echoes_or_makes_request_ids(cluster):
    w1, w2 = cluster["w1"], cluster["w2"]
    r = httpx.post(f"{w1}/v1/completions", json={"model": "llama", "prompt": "a", "max_tokens": 2},
                   headers={**wauth(), "X-Request-Id": "client-id-1"})
    assert r.status_code == 200 and r.headers.get_list("x-request-id") == ["client-id-1"]
    r = httpx.post(f"{w1}/v1/completions", json={"model": "llama", "prompt": "a", "max_tokens": 2}, headers=wauth())
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    r, _ = stream_chat(f"{w1}/v1/chat/completions", {**wauth(), "X-Request-Id": "client-id-2"}, chat_body("llama"))
    assert r.headers.get_list("x-request-id") == ["client-id-2"]  # SSE responses too
    bad = httpx.post(f"{w1}/v1/chat/completions", json={"model": "llama"}, headers={**wauth(), "X-Request-Id": "e1"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "e1"  # and errors
    assert httpx.get(f"{w1}/health", headers={"X-Request-Id": "h1"}).headers["x-request-id"] == "h1"
    # Off by default: nothing added.
    r = httpx.post(f"{w2}/v1/completions", json={"model": "q", "prompt": "a", "max_tokens": 2},
                   headers={**wauth(), "X-Request-Id": "client-id-3"})
    assert r.status_code == 200 and "x-request-id" not in r.headers


def test_router_makes_passes_and_returns_request_ids(cluster):
    m, rtr = cluster["manager"], cluster["router"]
    w1_log, mgr_log = cluster["procs"]["w1"], cluster["procs"]["manager"]
    body = chat_body("alias-a")
    # The manager (ids on) makes one: returned once, forwarded (the worker logs it), logged.
    r = httpx.post(f"{m}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    rid = r.headers["x-request-id"]
    assert r.status_code == 200 and r.headers.get_list("x-request-id") == [rid] and re.fullmatch(r"[0-9a-f]{32}", rid)
    wait_until(lambda: any(field(x, "id") == rid for x in request_lines(w1_log, "worker.requests")), what="worker line")
    line = wait_until(lambda: next((x for x in request_lines(mgr_log, "router.requests") if field(x, "id") == rid),
                                   None), what="router line")
    assert field(line, "model") == "alias-a" and field(line, "status") == "200" and field(line, "attempts") == "1"
    assert field(line, "worker") == r.headers["x-llmc-worker"] and float(field(line, "latency_ms")) > 0
    # The client's own id wins, streams included.
    r, _ = stream_chat(f"{m}/v1/chat/completions", {**AUTH, "X-Request-Id": "mine-1"}, body)
    assert r.headers.get_list("x-request-id") == ["mine-1"]
    wait_until(lambda: any(field(x, "id") == "mine-1" for x in request_lines(w1_log, "worker.requests")),
               what="worker line")
    # A replica with ids off still passes the client's id through to the worker.
    r = httpx.post(f"{rtr}/v1/completions", json={"model": "alias-b", "prompt": "x", "max_tokens": 2},
                   headers={**AUTH, "X-Request-Id": "through-replica-7"}, timeout=60)
    assert r.status_code == 200
    wait_until(lambda: any(field(x, "id") == "through-replica-7" and field(x, "model") == "alias-b"
                           for x in request_lines(w1_log, "worker.requests")), what="passed-through id")
    assert not request_lines(cluster["procs"]["router"], "router.requests")  # its logs are off
    # A header value we could not forward safely is replaced, never passed on.
    r = httpx.post(f"{m}/v1/completions", json={"model": "alias-b", "prompt": "x", "max_tokens": 2},
                   headers={**AUTH, "X-Request-Id": "x" * 300})
    assert r.status_code == 200 and len(r.headers["x-request-id"]) == 32


# -- request logs -----------------------------------------------------------------------------------
def test_request_log_lines_prompt_excerpts_and_no_secrets(cluster):
    w1, w2 = cluster["w1"], cluster["w2"]
    r = httpx.post(f"{w1}/v1/completions", json={"model": "alias-b", "prompt": PROMPT, "max_tokens": 3,
                                                 "temperature": 0.5, "seed": 7},
                   headers={**wauth(), "X-Request-Id": "log-check-1"})
    assert r.status_code == 200
    wait_until(lambda: any(field(x, "id") == "log-check-1" for x in request_lines(cluster["procs"]["w1"],
                                                                                   "worker.requests")), what="line")
    line = next(x for x in request_lines(cluster["procs"]["w1"], "worker.requests") if field(x, "id") == "log-check-1")
    assert field(line, "model") == "alias-b" and field(line, "endpoint") == "/v1/completions"
    assert field(line, "status") == "200" and int(field(line, "prompt_tokens")) == r.json()["usage"]["prompt_tokens"]
    assert field(line, "max_tokens") == "3" and field(line, "temperature") == "0.5" and field(line, "seed") == "7"
    assert field(line, "prompt") == PROMPT[:12]  # --max-log-len 12
    assert float(field(line, "latency_ms")) > 0
    # Chat prompts are logged as the model reads them (rendered), cut at max-log-len too.
    httpx.post(f"{w1}/v1/chat/completions", json=chat_body("llama", PROMPT), headers=wauth(), timeout=60)
    # Without --max-log-len no prompt text at all.
    r = httpx.post(f"{w2}/v1/chat/completions", json=chat_body("q", PROMPT), headers={**wauth(), "X-Request-Id": "q1"},
                   timeout=60)
    assert r.status_code == 200
    wait_until(lambda: any(field(x, "id") == "q1" for x in request_lines(cluster["procs"]["w2"], "worker.requests")),
               what="line")
    line = next(x for x in request_lines(cluster["procs"]["w2"], "worker.requests") if field(x, "id") == "q1")
    assert field(line, "prompt") is None and field(line, "model") == "q" and field(line, "stream") == "false"
    # A refused request is logged with its status.
    httpx.post(f"{w2}/v1/completions", json={"model": "nope", "prompt": "x"}, headers={**wauth(), "X-Request-Id": "q2"})
    wait_until(lambda: any(field(x, "id") == "q2" and field(x, "status") == "404"
                           for x in request_lines(cluster["procs"]["w2"], "worker.requests")), what="404 line")
    for name, proc in cluster["procs"].items():
        log = proc.log()
        assert "ZEBRA-MARKER" not in log and "fox jumps" not in log, name
        assert TOKEN not in log and KEY not in log, name  # never keys or worker tokens
    assert request_lines(cluster["procs"]["manager"], "router.requests")


# -- served names -----------------------------------------------------------------------------------
def test_aliases_listed_served_and_routed(cluster):
    w1 = cluster["w1"]
    data = httpx.get(f"{w1}/v1/models", headers=wauth()).json()["data"]
    assert [d["id"] for d in data] == ["llama", *ALIASES]
    for d in data:
        assert d["object"] == "model" and d["owned_by"] == "llm-cluster" and d["root"].endswith("tiny-llama")
        assert isinstance(d["created"], int) and d["max_model_len"] > 0
    for base in (cluster["manager"], cluster["router"]):
        listed = {d["id"]: d for d in httpx.get(f"{base}/v1/models", headers=AUTH).json()["data"]}
        assert sorted(listed) == sorted(["llama", *ALIASES, "q"])
        for name in ("llama", *ALIASES):
            d = listed[name]
            assert d["object"] == "model" and d["owned_by"] == "llm-cluster" and isinstance(d["created"], int)
            assert d["root"] == "llama"  # the model's first name: worker paths stay on the worker
            assert d["max_model_len"] == data[0]["max_model_len"] and d["kind"] == "generate"
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
        outs = [client.chat.completions.create(**chat_body(name)) for name in ("llama", *ALIASES)]
        assert [o.model for o in outs] == ["llama", *ALIASES]  # the name the request used
        assert len({o.choices[0].message.content for o in outs}) == 1  # one model behind them
    # Every alias reports the model's load in heartbeats.
    workers = httpx.get(f"{cluster['manager']}/workers", headers=AUTH).json()
    w = next(x for x in workers if "alias-a" in x["models"])
    assert set(w["load"]) == {"llama", *ALIASES} and w["load"]["alias-a"] == w["load"]["llama"]


# -- /ping, /version --------------------------------------------------------------------------------
def test_ping_and_version_everywhere(cluster):
    for base in (cluster["w1"], cluster["w1"] + "/w1", cluster["w2"], cluster["manager"], cluster["manager"] + "/gw",
                 cluster["router"]):
        assert httpx.get(f"{base}/ping").status_code == 200
        assert httpx.post(f"{base}/ping").status_code == 200
        assert httpx.get(f"{base}/version").json() == {"version": VERSION}


def test_ping_is_503_once_an_engine_is_dead(model_dir):
    import asyncio

    from worker.api import create_app, entrypoint
    from worker.config import build_config
    from worker.vllm_manager import VLLMManager

    cfg = build_config({"worker": {"cpu_kv_cache_memory": "4MiB"}, "engine_defaults": {"dtype": "float32"}},
                       {"models": f"m={model_dir / 'tiny-llama'}", "served_model_name": ["m2"]}, env={})
    manager = VLLMManager(cfg)
    manager.load_all()

    async def check() -> list[int]:
        transport = httpx.ASGITransport(app=entrypoint(create_app(manager, cfg)))
        async with httpx.AsyncClient(transport=transport, base_url="http://w") as c:
            out = [(await c.get("/ping")).status_code, (await c.post("/ping")).status_code]
            assert [m["id"] for m in (await c.get("/v1/models")).json()["data"]] == ["m", "m2"]
            manager.models["m"].shutdown()  # the engine loop stops: the model is dead
            return out + [(await c.get("/ping")).status_code, (await c.post("/ping")).status_code]

    try:
        assert asyncio.run(check()) == [200, 200, 503, 503]
    finally:
        manager.shutdown()


# -- bad values -------------------------------------------------------------------------------------
BAD = [
    ("worker", ["--models", "a=/m/a", "--allowed-origins", "example.com"], "allowed_origins"),
    ("worker", ["--models", "a=/m/a", "--allowed-origins", '["http://a.example", 3]'], "allowed_origins"),
    ("worker", ["--models", "a=/m/a", "--allowed-methods", "GE T"], "allowed_methods"),
    ("worker", ["--models", "a=/m/a", "--allowed-headers", "x y"], "allowed_headers"),
    ("worker", ["--models", "a=/m/a", "--root-path", "api"], "root_path"),
    ("worker", ["--models", "a=/m/a", "--max-log-len", "-1"], "max_log_len"),
    ("worker", ["--models", "a=/m/a,b=/m/b", "--served-model-name", "x"], "served_model_name"),
    ("worker", ["--models", "a=/m/a,b=/m/b", "--config", "{dup}"], "'b' is used by models"),
    ("worker", ["--models", "a=/m/a", "--config", "{bools}"], "allow_credentials"),
    ("worker", ["--models", "a=/m/a", "--config", "{empty}"], "empty served_model_name"),
    ("router", ["--redis-url", "redis://127.0.0.1:1/0", "--allowed-origins", "[not json"], "allowed_origins"),
    ("router", ["--redis-url", "redis://127.0.0.1:1/0", "--max-log-len", "lots"], "max_log_len"),
    ("router", ["--redis-url", "redis://127.0.0.1:1/0", "--config", "{rtr}"], "enable_log_requests"),
    ("manager", ["--root-path", "/a b"], "root_path"),
    ("manager", ["--config", "{mgr}"], "enable_request_id_headers"),
]


def test_bad_values_exit_with_a_one_line_reason(tmp_path):
    files = {"dup": "worker:\n  models:\n  - {name: a, source: /m/a, served_model_name: b}\n",
             "bools": "worker:\n  allow_credentials: maybe\n",
             "empty": "worker:\n  models:\n  - {name: a, source: /m/a, served_model_name: ['']}\n",
             "rtr": "router:\n  enable_log_requests: maybe\n",
             "mgr": "manager:\n  enable_request_id_headers: perhaps\n"}
    for name, text in files.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    runs = []
    for prog, args, what in BAD:  # started together: each fails before loading anything
        args = [a.format(**{k: str(tmp_path / f"{k}.yaml") for k in files}) for a in args]
        p = subprocess.Popen([sys.executable, "-m", prog, *args, "--port", str(free_port())], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs.append((prog, args, what, p))
    for prog, args, what, p in runs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 1, (args, err[-2000:])
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{prog}: error:") and what in lines[0], (args, err[-2000:])
