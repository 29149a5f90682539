"""Security of the control plane and the API: the worker token guards every registry write (401
before the body) and, like client keys, never reaches a log; secrets are compared in constant
time; rate limits hold across router replicas under concurrency. Real redis, manager, router and
worker processes wherever the behaviour is theirs."""

from __future__ import annotations

import ast
import asyncio
import json
import secrets
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest
import redis.asyncio as aioredis
from procs import ROOT, start_manager, start_redis, start_router, start_worker, wait_until

from clusterkit import auth
from clusterkit.errors import APIError
from router.front import token_estimate
from router.ratelimit import RateLimiter
from router.settings import RouterSettings
from worker.config import WorkerConfig

WT = "wt-" + secrets.token_hex(16)  # the worker token
CK = "ck-" + secrets.token_hex(16)  # a client key
CK2 = "ck2-" + secrets.token_hex(16)
WRONG_TOKEN = "wrongwt-" + secrets.token_hex(12)
WRONG_KEY = "wrongck-" + secrets.token_hex(12)
SECRETS = {"worker token": WT, "client key": CK, "second client key": CK2, "wrong token": WRONG_TOKEN,
           "wrong key": WRONG_KEY}


def bearer(t: str) -> dict:
    return {"Authorization": f"Bearer {t}"}


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code
    return err


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    r = start_redis(tmp_path_factory.mktemp("sec-redis"))
    yield r
    r.stop()


@pytest.fixture(scope="module")
def cluster(model_dir, redis_server, tmp_path_factory):
    """Manager + router replica + worker, all logging at debug level with request logs on; the
    secrets reach each process through a flag or the environment."""
    tmp = tmp_path_factory.mktemp("sec-cluster")
    debug = ("--log-level", "debug", "--enable-log-requests")
    procs = []
    try:
        mgr, murl = start_manager(tmp, "--redis-url", redis_server.url, "--worker-token", WT, "--heartbeat-ttl", "5",
                                  *debug, env={"ROUTER_API_KEYS": f"{CK},{CK2}"})
        procs.append(mgr)
        rtr, rurl = start_router(tmp, redis_server.url, "--api-key", CK, "--api-key", CK2, *debug,
                                 env={"WORKER_TOKEN": WT})
        procs.append(rtr)
        wrk, wurl = start_worker(tmp, f"m={model_dir / 'tiny-llama'}", "--manager-url", murl,
                                 "--heartbeat-interval", "0.5", *debug, env={"WORKER_TOKEN": WT},
                                 ready_headers=bearer(WT))
        procs.append(wrk)
        wait_until(lambda: httpx.get(f"{rurl}/v1/models", headers=bearer(CK)).json()["data"],
                   what="the worker registered and seen by the replica")
        yield {"manager": murl, "router": rurl, "worker": wurl, "procs": procs}
    finally:
        for p in procs:
            p.stop()


def _fake_worker(wid: str) -> bytes:
    return json.dumps({"id": wid, "url": "http://127.0.0.1:9", "models": [{"name": f"fake-{wid}"}]}).encode()


WRONG_AUTH = [{}, bearer(WRONG_TOKEN), bearer(CK), bearer(WT[:-1]), bearer(WT + "0"), bearer(WT.upper()),
              {"Authorization": f"Basic {WT}"}, {"Authorization": WT}, {"Authorization": "Bearer"}]


def _writes(wid: str) -> list[tuple[str, str, bytes]]:
    return [("POST", "/workers", _fake_worker(wid)), ("POST", f"/workers/{wid}/heartbeat", b'{"load": {}}'),
            ("POST", f"/workers/{wid}/drain", b""), ("DELETE", f"/workers/{wid}", b"")]


def test_every_registry_write_needs_the_worker_token(cluster):
    murl = cluster["manager"]
    wid = "sec-" + secrets.token_hex(4)

    def listed() -> dict | None:
        r = httpx.get(f"{murl}/workers/{wid}", headers=bearer(WT))
        return r.json() if r.status_code == 200 else None

    # Refused writes change nothing: not registered...
    for method, path, body in _writes(wid):
        for h in WRONG_AUTH:
            r = httpx.request(method, murl + path, content=body, headers={**h, "content-type": "application/json"})
            err = assert_openai_error(r, 401, "invalid_worker_token")
            assert err["type"] == "authentication_error"
            assert all(s not in r.text for s in SECRETS.values())
    assert listed() is None
    # ...and a registered worker is neither drained nor removed by them.
    assert httpx.post(f"{murl}/workers", content=_fake_worker(wid), headers=bearer(WT)).status_code == 200
    for method, path, body in _writes(wid)[2:]:
        for h in WRONG_AUTH:
            assert httpx.request(method, murl + path, content=body, headers=h).status_code == 401
    assert listed()["status"] == "ready"
    # The token does every write.
    for method, path, body in _writes(wid):
        r = httpx.request(method, murl + path, content=body, headers=bearer(WT))
        assert r.status_code == 200, (path, r.text)
    assert listed() is None  # deleted last


def _raw(url: str, method: str, path: str, headers: dict, wait: float) -> bytes | None:
    """A request whose head promises a body that never comes; the first bytes of the answer, or
    None when none came within ``wait`` seconds."""
    u = urlparse(url)
    head = (f"{method} {path} HTTP/1.1\r\nHost: {u.hostname}\r\ncontent-type: application/json\r\n"
            f"content-length: 4000\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n")
    with socket.create_connection((u.hostname, u.port), timeout=wait) as s:
        s.sendall(head.encode())
        try:
            return s.recv(4096)
        except TimeoutError:
            return None


def test_registry_writes_are_refused_before_the_body_is_read(cluster):
    murl = cluster["manager"]
    for method, path, body in _writes("sec-body"):
        for h in ({}, bearer(WRONG_TOKEN)):
            answer = _raw(murl, method, path, h, wait=30)
            assert answer is not None and answer.startswith(b"HTTP/1.1 401"), (path, answer)
        if body:  # register and heartbeat read a body: with the token the manager does wait for it
            assert _raw(murl, method, path, bearer(WT), wait=1.5) is None, path


def test_keys_are_checked_on_every_client_path(cluster):
    for base in (cluster["manager"], cluster["router"]):
        body = {"model": "m", "prompt": "hello", "max_tokens": 2}
        for h in ({}, bearer(WRONG_KEY), bearer(CK[:-1]), bearer(CK + "x"), bearer(WT[:8])):
            assert_openai_error(httpx.post(f"{base}/v1/completions", json=body, headers=h), 401, "invalid_api_key")
            assert_openai_error(httpx.get(f"{base}/v1/models", headers=h), 401)
            assert_openai_error(httpx.get(f"{base}/workers", headers=h), 401)
        for key in (CK, CK2):
            r = httpx.post(f"{base}/v1/completions", json=body, headers=bearer(key), timeout=60)
            assert r.status_code == 200, (r.text, cluster["procs"][0].log()[-4000:])
        with httpx.stream("POST", f"{base}/v1/chat/completions", headers=bearer(CK), timeout=60,
                          json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                "stream": True}) as r:
            assert r.status_code == 200 and "[DONE]" in r.read().decode()
        assert httpx.get(f"{base}/workers", headers=bearer(WT)).status_code == 200  # readable with the token
    w = cluster["worker"]
    for h in ({}, bearer(WRONG_TOKEN), bearer(CK)):
        assert_openai_error(httpx.post(f"{w}/v1/completions", json={"model": "m", "prompt": "x"}, headers=h), 401)
        assert_openai_error(httpx.post(f"{w}/tokenize", json={"model": "m", "prompt": "x"}, headers=h), 401)
    assert httpx.post(f"{w}/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1},
                      headers=bearer(WT), timeout=60).status_code == 200


def test_no_secret_reaches_any_log(cluster):
    """Runs after the sessions above (writes with wrong tokens, requests with wrong keys); every
    process is stopped first so its shutdown lines are in too."""
    procs = cluster["procs"]
    for p in reversed(procs):
        p.stop()
    for p in procs:
        text = p.log()
        assert " DEBUG " in text, f"{p.log_path.name} was not logging at debug level"
        for what, s in SECRETS.items():
            assert s not in text, f"the {what} appears in {p.log_path.name}"
            assert s[-16:] not in text, f"part of the {what} appears in {p.log_path.name}"


def test_settings_never_show_secrets():
    rs = RouterSettings(worker_token=WT, api_keys=[CK])
    wc = WorkerConfig(worker_token=WT)
    for text in (repr(rs), str(rs), repr(wc), str(wc)):
        assert WT not in text and CK not in text


# -- constant-time comparisons -------------------------------------------------------------------

def test_key_check_compares_every_key_whatever_matches(monkeypatch):
    calls = []
    real = auth.hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    keys = ["k-one", "a-much-longer-key-two", "k3"]
    for given, expected in (("k-one", True), ("k3", True), ("nope", False), ("k-on", False), ("k-one ", False),
                            ("K-ONE", False), ("", False), ("a-much-longer-key-two", True)):
        calls.clear()
        assert auth.key_allowed(given, keys) is expected, given
        # Every key compared, as equal-length digests (the length of a key does not show).
        assert calls == [(32, 32)] * len(keys), given


SECRET_NAMES = {"worker_token", "api_key", "api_keys", "secret", "password", "authorization", "bearer_of"}
# Also names of secrets where requests are authenticated (elsewhere "token" means a token id).
AUTH_NAMES = {"token", "tokens", "bearer"}
AUTH_MODULES = {"clusterkit", "router", "manager", "worker/front.py", "worker/api.py", "worker/registration.py"}


def _name_of(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Call):
        return _name_of(node.func)
    return None


def test_secrets_are_compared_only_by_the_constant_time_check():
    """No ``==``, ``!=``, ``in`` on a token or key anywhere in the services (``x in keys`` stops at
    the first match and at each key's first differing byte); only clusterkit/auth.py compares."""
    offenders = []
    for pkg in ("clusterkit", "router", "manager", "worker"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path == ROOT / "clusterkit" / "auth.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Compare) and any(
                        isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops):
                    names = {_name_of(x) for x in (node.left, *node.comparators)}
                    rel = path.relative_to(ROOT)
                    auth_module = rel.parts[0] in AUTH_MODULES or str(rel) in AUTH_MODULES
                    if names & SECRET_NAMES or (auth_module and names & AUTH_NAMES):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
                if isinstance(node, ast.Attribute) and node.attr == "compare_digest":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} (compare_digest outside auth.py)")
    assert offenders == []


# -- rate limits ---------------------------------------------------------------------------------

RPM, TPM = 30, 3000


@pytest.fixture(scope="module")
def replicas(redis_server, tmp_path_factory):
    """Two router replicas sharing one Redis, limits per key; no workers (an admitted request is
    answered 404 model_not_found: the limit is charged before the model is looked up)."""
    tmp = tmp_path_factory.mktemp("sec-replicas")
    keys = ["rl-" + secrets.token_hex(8) for _ in range(3)]
    args = [a for k in keys for a in ("--api-key", k)]
    args += ["--rate-limit-rpm", str(RPM), "--rate-limit-tpm", str(TPM), "--log-level", "debug"]
    started = []
    try:
        for _ in range(2):
            started.append(start_router(tmp, redis_server.url, *args))
        yield [url for _, url in started], keys
    finally:
        for p, _ in started:
            p.stop()
    for p, _ in started:
        assert all(k not in p.log() for k in keys)


async def _burst(urls: list[str], key: str, body: bytes, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=2 * n)
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:
        return await asyncio.gather(*(
            c.post(f"{urls[i % len(urls)]}/v1/completions", content=body,
                   headers={**bearer(key), "content-type": "application/json"}) for i in range(n)))


def _check_burst(rs: list[httpx.Response], max_retry_after: int) -> int:
    """The number admitted; every refusal is a proper 429."""
    admitted = 0
    for r in rs:
        if r.status_code == 429:
            err = assert_openai_error(r, 429, "rate_limit_exceeded")
            assert err["type"] == "rate_limit_error"
            assert 1 <= int(r.headers["retry-after"]) <= max_retry_after, r.headers["retry-after"]
        else:
            assert_openai_error(r, 404, "model_not_found")
            admitted += 1
    return admitted


def test_requests_per_minute_hold_across_replicas(replicas):
    urls, keys = replicas
    body = json.dumps({"model": "absent", "prompt": "x", "max_tokens": 1}).encode()
    t0 = time.monotonic()
    rs = asyncio.run(_burst(urls, keys[0], body, 160))
    window = time.monotonic() - t0
    admitted = _check_burst(rs, max_retry_after=2)  # one request refills in 60/RPM = 2 s
    assert RPM <= admitted <= RPM + RPM * window / 60, (admitted, window)
    # The next request passes once Retry-After has passed.
    wait = max(int(r.headers["retry-after"]) for r in rs if r.status_code == 429)
    time.sleep(wait + 0.2)
    assert httpx.post(f"{urls[1]}/v1/completions", content=body, headers=bearer(keys[0])).status_code == 404
    # Another key has its own bucket.
    assert httpx.post(f"{urls[0]}/v1/completions", content=body, headers=bearer(keys[1])).status_code == 404


def test_tokens_per_minute_hold_across_replicas(replicas):
    urls, keys = replicas
    body = json.dumps({"model": "absent", "prompt": "count the tokens", "max_tokens": 400}).encode()
    cost = token_estimate(json.loads(body), len(body))
    t0 = time.monotonic()
    rs = asyncio.run(_burst(urls, keys[2], body, 40))
    window = time.monotonic() - t0
    admitted = _check_burst(rs, max_retry_after=-(-cost * 60 // TPM))
    assert TPM // cost <= admitted and admitted * cost <= TPM + TPM * window / 60, (admitted, cost, window)


def _limiter(url: str, rpm: int, tpm: int) -> RateLimiter:
    return RateLimiter(aioredis.from_url(url, decode_responses=True), rpm, tpm)


def test_a_refused_request_costs_nothing(redis_server):
    async def go():
        lim = _limiter(redis_server.url, 5, 100)
        key = secrets.token_hex(8)
        assert await lim.check(key, 80) is None
        assert await lim.check(key, 80) is not None  # over the tokens/min: refused...
        # ...without using one of the 4 requests left this minute.
        assert [await lim.check(key, 1) for _ in range(4)] == [None] * 4
        assert await lim.check(key, 1) is not None
        # More tokens than a minute allows can never pass, and charges nothing either.
        other = secrets.token_hex(8)
        assert await lim.check(other, 101) == 60.0
        assert [await lim.check(other, 20) for _ in range(5)] == [None] * 5
        await lim.r.aclose()

    asyncio.run(go())


def test_replica_clocks_do_not_matter(redis_server, monkeypatch):
    """Two replicas, one with its clock ten minutes behind: the bucket refills by Redis's clock,
    so the lagging replica is neither refused for the skew nor admitting more than the burst."""
    async def go():
        a, b = _limiter(redis_server.url, 5, 0), _limiter(redis_server.url, 5, 0)
        key = secrets.token_hex(8)
        real = time.time
        results = []
        for i in range(8):
            lag = i % 2 == 1
            monkeypatch.setattr(time, "time", (lambda: real() - 600) if lag else real)
            results.append(await (b if lag else a).check(key, 1))
        monkeypatch.setattr(time, "time", real)
        assert results[:5] == [None] * 5 and all(r is not None for r in results[5:]), results
        await a.r.aclose()
        await b.r.aclose()

    asyncio.run(go())


def test_rate_limits_never_skipped_when_redis_is_down():
    async def go():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        lim = _limiter(f"redis://127.0.0.1:{port}/0", 5, 0)
        with pytest.raises(APIError) as e:
            await lim.check("k", 1)
        assert e.value.status == 503 and dict(e.value.headers)[b"retry-after"] == b"1"
        await lim.r.aclose()

    asyncio.run(go())

