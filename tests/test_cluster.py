"""The control plane with real Redis, real worker processes and the openai client."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from procs import start_manager, start_redis, start_router, start_worker, wait_until

TOKEN = "worker-secret-1"
KEY = "client-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
WAUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    redis = start_redis(tmp)
    procs = []
    try:
        mgr, url = start_manager(tmp, "--redis-url", redis.url, "--worker-token", TOKEN, "--api-key", KEY,
                                 "--heartbeat-ttl", "3")
        procs.append(mgr)
        workers = []
        for _ in range(2):
            w, wurl = start_worker(tmp, f"m={model_dir / 'tiny-llama'}", "--manager-url", url,
                                   "--heartbeat-interval", "0.5", env={"WORKER_TOKEN": TOKEN},
                                   ready_headers=WAUTH)
            procs.append(w)
            workers.append(wurl)
        wait_until(lambda: len(httpx.get(f"{url}/workers", headers=AUTH).json()) == 2, what="2 workers")
        yield {"url": url, "redis": redis, "workers": workers, "tmp": tmp}
    finally:
        for p in reversed(procs):
            p.stop()
        redis.stop()


def worker_metric(wurl: str, name: str) -> float:
    text = httpx.get(f"{wurl}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and 'model_name="m"' in line)


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def test_registration_shows_in_models(cluster):
    ids = [m.id for m in client(cluster["url"]).models.list().data]
    assert ids == ["m"]  # two workers serve it: listed once
    workers = httpx.get(f"{cluster['url']}/workers", headers=WAUTH).json()  # worker token reads too
    assert sorted(w["url"] for w in workers) == sorted(cluster["workers"])
    assert all(w["status"] == "ready" and w["models"] == ["m"] for w in workers)
    one = httpx.get(f"{cluster['url']}/workers/{workers[0]['id']}", headers=AUTH).json()
    assert one["id"] == workers[0]["id"]


def test_both_workers_get_traffic(cluster):
    before = [worker_metric(w, "vllm:request_success_total") for w in cluster["workers"]]

    async def burst():
        c = openai.AsyncOpenAI(base_url=f"{cluster['url']}/v1", api_key=KEY, max_retries=0)
        rs = await asyncio.gather(*(c.completions.create(model="m", prompt=f"req {i}", max_tokens=20,
                                                         extra_body={"ignore_eos": True}) for i in range(16)))
        await c.close()
        return rs

    rs = asyncio.run(burst())
    assert all(r.usage.completion_tokens == 20 for r in rs)
    after = [worker_metric(w, "vllm:request_success_total") for w in cluster["workers"]]
    gained = [a - b for a, b in zip(after, before)]
    assert sum(gained) == 16 and all(g >= 3 for g in gained), gained


def test_auth_401s(cluster):
    url = cluster["url"]
    assert httpx.get(f"{url}/v1/models").status_code == 401
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": []},
                   headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    # Registry writes need the worker token, checked before the body (garbage body, still 401).
    for method, path in (("POST", "/workers"), ("POST", "/workers/x/heartbeat"), ("POST", "/workers/x/drain"),
                         ("DELETE", "/workers/x")):
        r = httpx.request(method, f"{url}{path}", content=b"not json", headers=AUTH)
        assert r.status_code == 401, (method, path)
    assert httpx.get(f"{url}/workers").status_code == 401
    r = httpx.post(f"{url}/workers/unknown/heartbeat", json={"load": {}}, headers=WAUTH)
    assert r.status_code == 404  # tells a worker to register again
    with pytest.raises(openai.NotFoundError):
        client(url).completions.create(model="nope", prompt="x", max_tokens=1)


def test_router_bad_input_gets_openai_errors_and_disturbs_nothing(cluster):
    url = cluster["url"]
    chat = f"{url}/v1/chat/completions"

    def err(r, status):
        assert r.status_code == status, r.text
        e = r.json()["error"]
        assert set(e) == {"message", "type", "param", "code"} and e["message"]
        return e

    err(httpx.post(chat, content=b"{not json", headers=AUTH), 400)
    assert err(httpx.post(chat, json={"messages": []}, headers=AUTH), 400)["param"] == "model"
    assert err(httpx.post(chat, json={"model": "nope", "messages": []}, headers=AUTH), 404)["code"] == \
        "model_not_found"
    err(httpx.get(chat, headers=AUTH), 405)
    err(httpx.post(chat, content=b"x" * (33 * 2**20), headers=AUTH | {"content-type": "application/json"}), 413)
    # The worker's own validation errors pass through untouched, with the worker that answered.
    r = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": -1}, headers=AUTH)
    assert err(r, 400) and r.headers["x-llmc-worker"]
    # Nothing above disturbed the router or the workers.
    out = client(url).completions.create(model="m", prompt="still fine", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3
    for w in cluster["workers"]:
        assert worker_metric(w, "vllm:num_requests_running") == 0


def test_two_router_replicas_share_inflight_counts(cluster):
    rproc, rurl = start_router(cluster["tmp"], cluster["redis"].url, "--worker-token", TOKEN, "--api-key", KEY)
    try:
        assert [m["id"] for m in httpx.get(f"{rurl}/v1/models", headers=AUTH).json()["data"]] == ["m"]
        body = {"model": "m", "prompt": "slow " * 60, "max_tokens": 900, "stream": True, "ignore_eos": True}

        async def stream_all():
            async with httpx.AsyncClient(timeout=60) as c:
                async def one():
                    async with c.stream("POST", f"{rurl}/v1/completions", json=body, headers=AUTH) as r:
                        async for _ in r.aiter_lines():
                            pass
                await asyncio.gather(*(one() for _ in range(6)))

        import threading

        t = threading.Thread(target=lambda: asyncio.run(stream_all()))
        t.start()
        # The manager routes none of these itself: any in-flight it reports came from the replica
        # through Redis.
        seen = 0
        while t.is_alive():
            seen = max(seen, sum(w["inflight"] for w in httpx.get(f"{cluster['url']}/workers",
                                                                   headers=AUTH).json()))
            time.sleep(0.02)
        t.join()
        assert seen >= 2, "the manager never saw the replica's in-flight requests"
        wait_until(lambda: sum(w["inflight"] for w in httpx.get(
            f"{cluster['url']}/workers", headers=AUTH).json()) == 0, timeout=5, what="counts back to 0")
    finally:
        rproc.stop()


def test_rate_limit_429(cluster):
    rproc, rurl = start_router(cluster["tmp"], cluster["redis"].url, "--worker-token", TOKEN,
                               "--api-key", "limited-key", "--rate-limit-rpm", "3")
    try:
        h = {"Authorization": "Bearer limited-key"}
        codes = [httpx.post(f"{rurl}/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1},
                            headers=h).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
        r = httpx.post(f"{rurl}/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1}, headers=h)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        rproc.stop()


def _running(cluster) -> float:
    return sum(worker_metric(w, "vllm:num_requests_running") for w in cluster["workers"])


def test_client_disconnect_reaches_the_worker(cluster):
    url = cluster["url"]
    body = {"model": "m", "prompt": "go on", "max_tokens": 900, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=30) as r:
        it = r.iter_lines()
        for _ in range(3):
            next(it)
        assert _running(cluster) >= 1
    wait_until(lambda: _running(cluster) == 0, timeout=10, what="stream aborted on the worker")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, headers=AUTH, timeout=0.5)
    wait_until(lambda: _running(cluster) == 0, timeout=10, what="non-stream aborted on the worker")
    wait_until(lambda: all(worker_metric(w, "vllm:kv_cache_usage_perc") == 0 for w in cluster["workers"]),
               timeout=5, what="KV blocks back")


def test_prefix_affinity_keeps_shared_prefix_on_one_worker(cluster):
    rproc, rurl = start_router(cluster["tmp"], cluster["redis"].url, "--worker-token", TOKEN, "--api-key", KEY,
                               "--policy", "prefix_affinity")
    try:
        system = "You are a helpful assistant. " * 12
        served = []
        for i in range(8):
            r = httpx.post(f"{rurl}/v1/chat/completions", headers=AUTH, json={
                "model": "m", "max_tokens": 2, "messages": [{"role": "system", "content": system},
                                                            {"role": "user", "content": f"question {i}"}]})
            assert r.status_code == 200
            served.append(r.headers["x-llmc-worker"])
        assert len(set(served)) == 1, served  # the other worker was idle, yet the prefix stuck
        other = {"model": "m", "max_tokens": 2, "messages": [{"role": "system", "content": "Different. " * 12},
                                                             {"role": "user", "content": "q"}]}
        assert httpx.post(f"{rurl}/v1/chat/completions", headers=AUTH, json=other).status_code == 200
    finally:
        rproc.stop()


def test_dashboard_in_headless_chromium(cluster, tmp_path):
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is installed by scripts/test.sh"
    workers = httpx.get(f"{cluster['url']}/workers", headers=AUTH).json()
    out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                          "--no-first-run", "--disable-background-networking", "--disable-component-update",
                          "--disable-sync", f"--user-data-dir={tmp_path / 'chrome'}",
                          "--virtual-time-budget=5000", "--dump-dom", f"{cluster['url']}/#key={KEY}"],
                         capture_output=True, text=True, timeout=60)
    dom = out.stdout
    assert "worker-row" in dom, out.stderr[-2000:]
    for w in workers:
        assert w["id"] in dom and w["url"] in dom
    assert "2 worker(s), 1 model(s)" in dom
