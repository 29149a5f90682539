"""kv_aware end to end: workers' engines -> manager -> Redis -> every router replica's index ->
where requests go.

One cluster for the module: a real Redis, a manager and two router replicas with ``--policy
kv_aware`` (the second with no load slack), and two workers serving a tiny Llama with a KV pool
small enough to evict. A prompt is put in one worker's cache by sending it to that worker
directly (no router involved), so where the routers then send it can only come from what the
worker published. ``x-llmc-worker`` says which worker answered.
"""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest
from procs import start_manager, start_redis, start_router, start_worker, wait_until

TOKEN = "kv-routing-secret"
WAUTH = {"Authorization": f"Bearer {TOKEN}"}
WORKER_YAML = ("  kv_events_interval: 0.05\n  models:\n  - name: m\n    source: {path}\n"
               "    block_size: 4\n    num_kv_blocks: 96\n    max_model_len: 192\n")
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def prompt(seed: int, words: int = 16) -> str:
    """A distinct ~80-token text per seed."""
    return " ".join(WORDS[(seed * 7 + i * (seed % 5 + 1)) % len(WORDS)] + str((seed + i) % 10) for i in range(words))


def metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def complete(url: str, text: str, max_tokens: int = 1, headers: dict | None = None) -> str:
    """One completion; the id of the worker that answered (from the router's header)."""
    r = httpx.post(url + "/v1/completions", headers=headers, timeout=60,
                   json={"model": "m", "prompt": text, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.headers.get("x-llmc-worker", "")


class Cluster:
    def __init__(self, tmp, model_dir):
        self.tmp, self.model_dir = tmp, model_dir
        self.procs = []
        self.redis = start_redis(tmp)
        cfg = tmp / "control.yaml"
        cfg.write_text("router:\n  kv_load_slack: 0\n")
        common = ["--worker-token", TOKEN, "--heartbeat-ttl", "2", "--policy", "kv_aware"]
        self.manager, self.url = self._keep(start_manager(tmp, "--redis-url", self.redis.url, *common))
        self.router, self.router_url = self._keep(start_router(tmp, self.redis.url, *common))
        # the no-slack replica: any load difference beats any cache hit
        self.eager, self.eager_url = self._keep(start_router(tmp, self.redis.url, *common, "--config", str(cfg)))
        self.workers: dict[str, tuple] = {}  # id -> (proc, url)
        for _ in range(2):
            self.add_worker()

    def _keep(self, pair):
        self.procs.append(pair[0])
        return pair

    def add_worker(self) -> str:
        path = self.model_dir / "tiny-llama"
        proc, wurl = start_worker(self.tmp, f"m={path}", "--manager-url", self.url, "--heartbeat-interval", "0.3",
                                  env={"WORKER_TOKEN": TOKEN}, ready_headers=WAUTH,
                                  worker_yaml=WORKER_YAML.format(path=path))
        self.procs.append(proc)
        wid = wait_until(lambda: next(w["id"] for w in httpx.get(f"{self.url}/workers", headers=WAUTH).json()
                                      if w["url"] == wurl), what="worker registered")
        self.workers[wid] = (proc, wurl)
        return wid

    def routers(self) -> list[str]:
        return [self.url, self.router_url, self.eager_url]

    def warm(self, urls: list[str]) -> None:
        """Each router fetches the model's tokenizer on its first kv_aware request (meanwhile it
        routes by load)."""
        for url in urls:
            wait_until(lambda u=url: self._tokenized(u), timeout=30, what="tokenizer fetched")

    @staticmethod
    def _tokenized(url: str) -> bool:
        before = metric(url, "router_kv_untokenized_total")
        complete(url, "is it tokenized now")
        return metric(url, "router_kv_untokenized_total") == before

    def cache_on(self, wid: str, text: str) -> None:
        """Put ``text`` in worker ``wid``'s cache (directly, no router) and wait until every router's
        index holds its blocks."""
        before = {u: metric(u, "router_kv_events_applied_total") for u in self.routers()}
        complete(self.workers[wid][1], text, headers=WAUTH)
        for u in self.routers():
            wait_until(lambda u=u: metric(u, "router_kv_events_applied_total") > before[u], what=f"{u} saw events")

    def stop(self):
        for p in reversed(self.procs):
            p.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, model_dir):
    c = Cluster(tmp_path_factory.mktemp("kv-routing"), model_dir)
    try:
        c.warm(c.routers())
        yield c
    finally:
        c.stop()


def test_requests_follow_the_cache_and_replicas_agree(cluster):
    a, b = sorted(cluster.workers)
    p, q = prompt(1), prompt(2)
    cluster.cache_on(a, p)
    cluster.cache_on(b, q)
    hits = {u: metric(u, 'router_kv_routed_total{by="cache"}') for u in cluster.routers()}
    for url in (cluster.url, cluster.router_url):  # both replicas, idle cluster
        for _ in range(3):
            assert complete(url, p) == a
            assert complete(url, q) == b
        assert metric(url, 'router_kv_routed_total{by="cache"}') == hits[url] + 6
    # A prompt extending a cached one follows it too (the longest cached prefix wins).
    assert complete(cluster.router_url, p + " and then some more words") == a
    # New prompts, nothing cached anywhere: ties go by rendezvous hashing, so the replicas agree.
    # (Between the two, each replica's view of the other's in-flight counts catches up: 0.2 s.)
    for seed in range(10, 16):
        text = prompt(seed)
        first = complete(cluster.url, text)
        time.sleep(0.5)
        assert complete(cluster.router_url, text) == first


def test_load_slack_spreads_a_hot_prefix(cluster):
    a, b = sorted(cluster.workers)
    hot = prompt(3)
    cluster.cache_on(a, hot)

    async def burst(url: str, n: int) -> list[str]:
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i):
                r = await client.post(url + "/v1/completions", json={
                    "model": "m", "prompt": hot + f" request {i}", "max_tokens": 24, "temperature": 0,
                    "ignore_eos": True})
                assert r.status_code == 200, r.text
                return r.headers["x-llmc-worker"]
            return await asyncio.gather(*(one(i) for i in range(n)))

    # Default slack (4 load units): four at once all stay on the worker holding the prefix.
    assert asyncio.run(burst(cluster.url, 4)) == [a] * 4
    # No slack: once the holder is busier than the other worker, the prefix spreads.
    went = asyncio.run(burst(cluster.eager_url, 8))
    assert went.count(a) >= 2 and went.count(b) >= 2, went


def test_a_restarted_router_rebuilds_the_index(cluster):
    a, b = sorted(cluster.workers)
    p = prompt(4)
    cluster.cache_on(b, p)
    cluster.router.stop(signal.SIGKILL)
    cluster.router, cluster.router_url = cluster._keep(start_router(
        cluster.tmp, cluster.redis.url, "--worker-token", TOKEN, "--heartbeat-ttl", "2", "--policy", "kv_aware"))
    wait_until(lambda: metric(cluster.router_url, "router_kv_index_blocks") >= 20, what="index read at start")
    cluster.warm([cluster.router_url])
    for _ in range(3):
        assert complete(cluster.router_url, p) == b


def test_eviction_and_a_worker_leaving_update_every_index(cluster):
    a, b = sorted(cluster.workers)
    p = prompt(5)
    cluster.cache_on(a, p)
    assert complete(cluster.url, p) == a
    # Fill a's small pool (96 blocks of 4 tokens) with other prompts: p's blocks are evicted.
    for seed in range(20, 28):
        cluster.cache_on(a, prompt(seed))
    by_load = metric(cluster.url, 'router_kv_routed_total{by="load"}')
    went = complete(cluster.url, p)
    assert metric(cluster.url, 'router_kv_routed_total{by="load"}') == by_load + 1, \
        "p was evicted, so no worker holds it: routed by load"
    assert went in (a, b)

    # A worker that leaves takes its entries with it, on every replica.
    held = {u: metric(u, "router_kv_index_blocks") for u in cluster.routers()}
    proc, _ = cluster.workers.pop(a)
    proc.stop()
    for u in cluster.routers():
        wait_until(lambda u=u: metric(u, "router_kv_index_engines") == 1, what=f"{u} dropped the worker")
        assert metric(u, "router_kv_index_blocks") < held[u]
    # A new worker starts with an empty cache: it appears in the index with no blocks of its own.
    blocks = {u: metric(u, "router_kv_index_blocks") for u in cluster.routers()}
    cluster.add_worker()
    for u in cluster.routers():
        wait_until(lambda u=u: metric(u, "router_kv_index_engines") == 2, what=f"{u} saw the new worker")
        assert metric(u, "router_kv_index_blocks") == blocks[u]


def test_openai_and_langchain_chats_follow_the_cache(cluster):
    """Chats sent with the clients people use: the router renders the chat template itself, so a
    conversation a worker holds (put there directly) routes back to that worker, streamed or not."""
    from langchain_openai import ChatOpenAI
    from openai import OpenAI

    a, b = sorted(cluster.workers)
    messages = [{"role": "system", "content": prompt(6, 10)}, {"role": "user", "content": prompt(7, 8)}]
    direct = OpenAI(base_url=cluster.workers[b][1] + "/v1", api_key=TOKEN)
    direct.chat.completions.create(model="m", messages=messages, max_tokens=1)
    cluster.cache_on(b, prompt(8))  # then wait for the routers to have seen b's events
    routed = OpenAI(base_url=cluster.url + "/v1", api_key="unused")
    hits = metric(cluster.url, 'router_kv_routed_total{by="cache"}')
    raw = routed.chat.completions.with_raw_response.create(model="m", messages=messages, max_tokens=2)
    assert raw.headers["x-llmc-worker"] == b
    with routed.chat.completions.with_streaming_response.create(model="m", messages=messages, max_tokens=2,
                                                                stream=True) as stream:
        assert stream.headers["x-llmc-worker"] == b
        assert any(line.startswith("data: ") for line in stream.iter_lines())
    assert metric(cluster.url, 'router_kv_routed_total{by="cache"}') == hits + 2

    # LangChain's ChatOpenAI, whose message dicts are its own: same prompt tokens, same worker.
    llm = ChatOpenAI(base_url=cluster.router_url + "/v1", api_key="unused", model="m", max_tokens=2,
                     temperature=0)
    hits = metric(cluster.router_url, 'router_kv_routed_total{by="cache"}')
    tokens = metric(cluster.router_url, "router_kv_cached_tokens_total")
    reply = llm.invoke([("system", messages[0]["content"]), ("human", messages[1]["content"])])
    assert reply.response_metadata["model_name"] == "m"
    assert metric(cluster.router_url, 'router_kv_routed_total{by="cache"}') == hits + 1
    assert metric(cluster.router_url, "router_kv_cached_tokens_total") > tokens
