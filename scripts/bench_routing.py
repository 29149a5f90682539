"""Routing policies side by side: the same seeded multi-turn chat workload on a fresh cluster per
policy (round_robin, least_load, prefix_affinity, kv_aware).

    python scripts/make_tiny_models.py --out models --route-bench
    python scripts/bench_routing.py

Each policy gets a fresh manager (embedded Redis, ``--policy P``) and ``--workers`` workers serving
the same model (``models/bench-llama-route``: ~10M parameters, so a 1,000-token prefill costs
~0.25 s on one core while a cached one costs ~0.02 s) with a KV pool too small to hold every
session (``--kv-blocks``). The workload: ``--sessions`` chat sessions, each starting from one of
``--system-prompts`` long shared system prompts, ``--turns`` turns each (a new user message, the
answer appended to the history); ``--concurrency`` client slots run turns of sessions that are not
already waiting on a turn, in a seeded random order, so sessions interleave and their histories
compete for the pools. Every request streams (temperature 0, ``ignore_eos``, ``--max-tokens``).

Per policy it prints: the cluster's prefix-cache hit rate (hit tokens over queried tokens, from
the workers' ``vllm:prefix_cache_*`` counters), TTFT p50/p99, output tokens/s, requests per
worker (max/min, from the workers' ``vllm:request_success_total``) and the manager's (router's)
CPU per request; for kv_aware also its routing CPU (tokenizing and hashing) per request. Then the
issue's bars as ratios: kv_aware's hit rate over least_load's and over the best policy's, its
TTFT p50 over least_load's, and its max/min.

Workers run one torch thread each (OMP_NUM_THREADS=1); on this 2-core machine two workers, the
manager and the client share the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_serving import Server, free_port, pct  # noqa: E402

POLICIES = ("round_robin", "least_load", "prefix_affinity", "kv_aware")
WORDS = ("the of and to in is was for on that with as by at from his it an were are which this be or has had "
         "not but first one their its new after who they have her she two been other when there all during "
         "into school time may years more most only over city some world would where later up such used many "
         "can state about national out known university united then made").split()


def text_of(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children that were waited for (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(x) for x in fields[11:15]) / ticks


def scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} for the series we read."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out


def series(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


class Cluster:
    """A manager with its embedded Redis and ``n`` workers, all on this machine."""

    def __init__(self, args, policy: str, logdir: Path):
        self.logdir = logdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data = logdir / f"redis-{policy}"
        data.mkdir()
        self.manager = Server([sys.executable, "-m", "manager", "--host", "127.0.0.1", "--port", str(self.port),
                               "--data-dir", str(data), "--policy", policy, "--heartbeat-ttl", "10"],
                              logdir / f"manager-{policy}.log")
        self.manager.wait(self.url + "/health", 60)
        cfg = logdir / "worker.yaml"
        cfg.write_text(yaml.safe_dump({
            "engine_defaults": {"max_num_seqs": args.max_num_seqs},
            "worker": {"heartbeat_interval": 1, "models": [
                {"name": "bench", "source": str(Path(args.model).resolve()), "num_kv_blocks": args.kv_blocks,
                 "max_model_len": args.max_model_len}]}}))
        env = {"OMP_NUM_THREADS": "1"}
        self.worker_urls = []
        self.workers = []
        for i in range(args.workers):
            port = free_port()
            self.workers.append(Server([sys.executable, "-m", "worker", "--models",
                                        f"bench={Path(args.model).resolve()}", "--host", "127.0.0.1",
                                        "--port", str(port), "--config", str(cfg), "--manager-url", self.url],
                                       logdir / f"worker{i}-{policy}.log", env=env))
            self.worker_urls.append(f"http://127.0.0.1:{port}")
        for w, url in zip(self.workers, self.worker_urls):
            w.wait(url + "/v1/models", 300)
        deadline = time.monotonic() + 60
        while len(httpx.get(self.url + "/workers", timeout=5).json()) < args.workers:
            if time.monotonic() > deadline:
                raise TimeoutError("workers did not register")
            time.sleep(0.2)

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        self.manager.stop()


async def turn(client: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int) -> tuple[float, str, int]:
    """One streamed chat turn: (TTFT seconds, answer text, completion tokens)."""
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    parts: list[str] = []
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            for choice in event.get("choices", []):
                delta = choice.get("delta", {})
                content = delta.get("content")
                if content is not None and "role" not in delta:  # the role chunk comes before any token
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    parts.append(content)
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.perf_counter() - t0), "".join(parts), tokens


async def workload(args, url: str) -> dict:
    rng = random.Random(args.seed)
    systems = [text_of(rng, args.system_words) for _ in range(args.system_prompts)]
    sessions = [{"messages": [{"role": "system", "content": systems[i % len(systems)]}], "turns": 0}
                for i in range(args.sessions)]
    users = [[text_of(rng, args.user_words) for _ in range(args.turns)] for _ in range(args.sessions)]
    order = random.Random(args.seed + 1)
    idle = list(range(args.sessions))
    ttfts: list[float] = []
    out_tokens = 0
    errors = 0
    lock = asyncio.Lock()

    ready_at = [0.0] * args.sessions
    think = random.Random(args.seed + 2)

    async def slot(client):
        nonlocal out_tokens, errors
        while True:
            async with lock:
                pending = [i for i in idle if sessions[i]["turns"] < args.turns]
                now = time.monotonic()
                ready = [i for i in pending if ready_at[i] <= now]
                if not ready:
                    if not pending:
                        return
                    wait = min(ready_at[i] for i in pending) - now
                else:
                    i = order.choice(ready)
                    idle.remove(i)
            if not ready:
                await asyncio.sleep(wait)
                continue
            s = sessions[i]
            s["messages"].append({"role": "user", "content": users[i][s["turns"]]})
            try:
                ttft, answer, n = await turn(client, url, s["messages"], args.max_tokens)
                ttfts.append(ttft)
                out_tokens += n
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors += 1
                print(f"  request failed: {e}", file=sys.stderr)
                answer = ""
            s["messages"].append({"role": "assistant", "content": answer})
            s["turns"] += 1
            async with lock:
                # the person reads the answer before the next turn
                ready_at[i] = time.monotonic() + think.uniform(0, 2 * args.think_time)
                idle.append(i)

    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(slot(client) for _ in range(args.concurrency)))
        wall = time.perf_counter() - t0
    return {"ttfts": ttfts, "out_tokens": out_tokens, "wall": wall, "errors": errors,
            "requests": len(ttfts) + errors}


def run_policy(args, policy: str, logdir: Path) -> dict:
    cluster = Cluster(args, policy, logdir)
    try:
        # Warm-up straight to each worker (first-request costs), then once through the router
        # (kv_aware fetches the model's tokenizer on its first request).
        for url in cluster.worker_urls:
            httpx.post(url + "/v1/chat/completions", timeout=120, json={
                "model": "bench", "messages": [{"role": "user", "content": "warm up " + str(url)}],
                "max_tokens": 4}).raise_for_status()
        httpx.post(cluster.url + "/v1/chat/completions", timeout=120, json={
            "model": "bench", "messages": [{"role": "user", "content": "warm up the router"}],
            "max_tokens": 2}).raise_for_status()
        time.sleep(1.0)
        before = [scrape(u) for u in cluster.worker_urls]
        router_before = scrape(cluster.url)
        cpu0 = cpu_seconds(cluster.manager.p.pid)
        result = asyncio.run(workload(args, cluster.url))
        cpu1 = cpu_seconds(cluster.manager.p.pid)
        after = [scrape(u) for u in cluster.worker_urls]
        router_after = scrape(cluster.url)
    finally:
        cluster.stop()
    q = sum(series(a, "vllm:prefix_cache_queries_total") - series(b, "vllm:prefix_cache_queries_total")
            for a, b in zip(after, before))
    h = sum(series(a, "vllm:prefix_cache_hits_total") - series(b, "vllm:prefix_cache_hits_total")
            for a, b in zip(after, before))
    per_worker = [series(a, "vllm:request_success_total") - series(b, "vllm:request_success_total")
                  for a, b in zip(after, before)]
    n = max(1, result["requests"])
    route_cpu = (series(router_after, "router_kv_route_cpu_seconds_total")
                 - series(router_before, "router_kv_route_cpu_seconds_total"))
    kv = {k: series(router_after, name) - series(router_before, name) for k, name in (
        ("by_cache", 'router_kv_routed_total{by="cache"}'), ("by_load", 'router_kv_routed_total{by="load"}'),
        ("untokenized", "router_kv_untokenized_total"), ("predicted", "router_kv_cached_tokens_total"),
        ("tokenized", "router_kv_prompt_tokens_total"))}
    return {
        "policy": policy, "kv": kv, "hit_rate": h / q if q else 0.0, "ttft_p50": pct(result["ttfts"], 50),
        "ttft_p99": pct(result["ttfts"], 99), "tok_s": result["out_tokens"] / result["wall"],
        "per_worker": per_worker, "balance": max(per_worker) / max(1.0, min(per_worker)),
        "router_cpu_ms": (cpu1 - cpu0) / n * 1000, "route_cpu_ms": route_cpu / n * 1000,
        "errors": result["errors"], "requests": result["requests"], "wall": result["wall"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "bench-llama-route"))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sessions", type=int, default=24)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--system-prompts", type=int, default=2)
    ap.add_argument("--system-words", type=int, default=120)
    ap.add_argument("--user-words", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--think-time", type=float, default=1.0, help="mean seconds between a session's turns")
    ap.add_argument("--kv-blocks", type=int, default=640, help="per worker, 16 tokens each")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-logs", action="store_true")
    args = ap.parse_args(argv)
    if not (Path(args.model) / "config.json").exists():
        print(f"no model at {args.model}; run: python scripts/make_tiny_models.py --out models --route-bench")
        return 2
    logdir = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    print(f"{args.workers} workers x {args.kv_blocks} KV blocks; {args.sessions} sessions x {args.turns} turns, "
          f"{args.system_prompts} system prompts of {args.system_words} words, {args.user_words}-word turns, "
          f"{args.max_tokens} output tokens, concurrency {args.concurrency}; {os.cpu_count()} cores; logs {logdir}")
    rows = []
    try:
        for policy in args.policies.split(","):
            row = run_policy(args, policy, logdir)
            rows.append(row)
            kv = row["kv"]
            extra = (f"; routed by cache {kv['by_cache']:.0f}, by load {kv['by_load']:.0f} ({kv['untokenized']:.0f} "
                     f"untokenized), index-predicted hits {kv['predicted'] / max(1, kv['tokenized']):.1%}"
                     if policy == "kv_aware" else "")
            print(f"  {policy}: {row['requests']} requests in {row['wall']:.1f} s, {row['errors']} errors{extra}",
                  flush=True)
    finally:
        if not args.keep_logs:
            shutil.rmtree(logdir, ignore_errors=True)
    print()
    print("| policy | hit rate | TTFT p50 (ms) | TTFT p99 (ms) | output tok/s | requests per worker | max/min "
          "| router CPU/request (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cpu = f"{r['router_cpu_ms']:.2f}" + (f" (routing {r['route_cpu_ms']:.2f})" if r["policy"] == "kv_aware" else "")
        print(f"| {r['policy']} | {r['hit_rate']:.1%} | {r['ttft_p50'] * 1000:.0f} | {r['ttft_p99'] * 1000:.0f} "
              f"| {r['tok_s']:.1f} | {'/'.join(str(int(x)) for x in r['per_worker'])} | {r['balance']:.2f} | {cpu} |")
    by = {r["policy"]: r for r in rows}
    if "kv_aware" in by and "least_load" in by:
        kv, ll = by["kv_aware"], by["least_load"]
        best = max(r["hit_rate"] for r in rows)
        print()
        print(f"kv_aware hit rate / least_load's: {kv['hit_rate'] / max(1e-9, ll['hit_rate']):.2f}x (bar >= 1.3)")
        print(f"kv_aware hit rate / best policy's: {kv['hit_rate'] / max(1e-9, best):.2f}x (bar >= 0.9)")
        print(f"kv_aware TTFT p50 / least_load's: {kv['ttft_p50'] / ll['ttft_p50']:.2f}x (bar <= 0.8)")
        print(f"kv_aware requests per worker max/min: {kv['balance']:.2f} (bar <= 1.5)")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
