"""What the router costs: the same workload direct to a worker and through the manager's router.

    python scripts/make_tiny_models.py --out models --serve-bench
    python scripts/bench_router.py

Starts a manager (embedded Redis) and one worker serving a tiny model and the serving-benchmark
model, then runs, alternating direct and routed rounds so drift hits both alike:
  1. 1-token non-streaming completions at concurrency 32 (tiny model): latency p50/p99 per round
     and the router's added latency (routed minus direct, per percentile, median over rounds);
  2. streaming completions at concurrency 16 (serving-benchmark model): output tokens/s;
  3. 64 streams of the tiny model, where tokens are cheap and the per-chunk relay cost shows.

``--ab-ref REV`` also starts REV's manager and worker (from a git worktree) and interleaves their
rounds with this tree's: a same-run A/B of the router and the worker.

The one-token rounds use wrk when it is installed (Debian's ``wrk``: C, so the client's own CPU
does not distort a comparison on a small machine), else a Python client. The worker runs with one
torch thread (OMP_NUM_THREADS=1): these models gain nothing from two, and a second OpenMP thread
spinning between ops takes the core the router and the load generator need.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_serving import Server, free_port, pct  # noqa: E402


async def latency_round(url: str, model: str, n: int, concurrency: int) -> list[float]:
    """Latencies of ``n`` one-token completions sent ``concurrency`` at a time."""
    lat: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:
        sem = asyncio.Semaphore(concurrency)

        async def one(i):
            async with sem:
                t = time.perf_counter()
                r = await c.post(url, json={"model": model, "prompt": f"ping {i}", "max_tokens": 1,
                                            "temperature": 0})
                lat.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text[:200]

        await asyncio.gather(*(one(i) for i in range(n)))
    return lat


async def stream_round(url: str, model: str, n: int, concurrency: int, max_tokens: int) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    tokens = 0
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        sem = asyncio.Semaphore(concurrency)

        async def one(i):
            nonlocal tokens
            async with sem:
                body = {"model": model, "prompt": f"tell me a story number {i} " * 8, "max_tokens": max_tokens,
                        "stream": True, "ignore_eos": True, "temperature": 0,
                        "stream_options": {"include_usage": True}}
                async with c.stream("POST", url, json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {") and '"usage":{' in line:
                            tokens += json.loads(line[6:])["usage"]["completion_tokens"]

        t = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return tokens / (time.perf_counter() - t)


def python_round(url: str, model: str, n: int, concurrency: int) -> dict:
    t = time.perf_counter()
    lat = asyncio.run(latency_round(url, model, n, concurrency))
    rps = n / (time.perf_counter() - t)
    return {"50%": pct(lat, 50) * 1e3, "99%": pct(lat, 99) * 1e3, "rps": rps, "n": n}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk_round(url: str, model: str, concurrency: int, seconds: int) -> dict:
    """One-token requests from wrk (C, nearly free of client CPU): p50/p99 (ms) and requests/s."""
    script = Path(tempfile.mkdtemp()) / "post.lua"
    body = json.dumps({"model": model, "prompt": "ping", "max_tokens": 1, "temperature": 0})
    script.write_text(f"wrk.method = 'POST'\nwrk.body = '{body}'\n"
                      f"wrk.headers['Content-Type'] = 'application/json'\n")
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout

    def ms(v: str) -> float:
        for unit, f in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
            if v.endswith(unit):
                return float(v[:-len(unit)]) * f
        return float(v)

    res = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in ("50%", "99%"):
            res[parts[0]] = ms(parts[1])
        if line.startswith("Requests/sec:"):
            res["rps"] = float(parts[1])
        if "requests in" in line:
            res["n"] = int(parts[0])
        if "Non-2xx" in line or "Socket errors" in line:
            raise RuntimeError(f"wrk saw errors: {line}")
    return res


class Cluster:
    """A manager (embedded Redis) and one worker serving ``tiny`` and ``stream``, run from ``tree``
    (this checkout, or a git worktree of another commit for an A/B run)."""

    def __init__(self, tree: Path, tag: str, args, tmp: Path):
        self.tag, self.tree = tag, tree
        mport, wport = free_port(), free_port()
        d = tmp / tag
        d.mkdir()
        self.mgr = Server([sys.executable, "-m", "manager", "--host", "127.0.0.1", "--port", str(mport),
                           "--data-dir", str(d / "redis"), "--log-level", "warning"], d / "manager.log", cwd=tree)
        cfg = d / "worker.yaml"
        cfg.write_text("engine_defaults:\n  max_num_seqs: 64\nworker:\n  cpu_kv_cache_memory: 512MiB\n")
        self.worker = None
        self.mgr.wait(f"http://127.0.0.1:{mport}/health")
        self.worker = Server([sys.executable, "-m", "worker", "--models",
                              f"tiny={Path(args.tiny_model).resolve()},stream={Path(args.stream_model).resolve()}",
                              "--host", "127.0.0.1", "--port", str(wport), "--config", str(cfg), "--manager-url",
                              f"http://127.0.0.1:{mport}", "--heartbeat-interval", "1", "--log-level", "warning"],
                             d / "worker.log", env={"OMP_NUM_THREADS": "1"}, cwd=tree)
        self.worker.wait(f"http://127.0.0.1:{wport}/health")
        deadline = time.monotonic() + 30
        while not httpx.get(f"http://127.0.0.1:{mport}/v1/models").json()["data"]:
            if time.monotonic() > deadline:
                raise TimeoutError("worker never registered")
            time.sleep(0.2)
        self.urls = {"direct": f"http://127.0.0.1:{wport}/v1/completions",
                     "router": f"http://127.0.0.1:{mport}/v1/completions"}

    def stop(self):
        if self.worker:
            self.worker.stop()
        self.mgr.stop()


def worktree(ref: str, tmp: Path) -> Path:
    """A checkout of ``ref`` beside this one (removed at the end), on the same filesystem: a
    tree under /tmp measured ~5-10% apart from the same code under the repository here."""
    path = ROOT / ".bench-worktrees" / f"router-{os.getpid()}"
    subprocess.run(["git", "worktree", "add", "--detach", str(path), ref], cwd=ROOT, check=True,
                   capture_output=True)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny-model", default="models/tiny-llama")
    ap.add_argument("--stream-model", default="models/bench-llama-serve")
    ap.add_argument("--requests", type=int, default=640, help="1-token requests per round (python client)")
    ap.add_argument("--seconds", type=int, default=5, help="length of a one-token round (wrk)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--stream-requests", type=int, default=32)
    ap.add_argument("--stream-rounds", type=int, default=4)
    ap.add_argument("--stream-concurrency", type=int, default=16)
    ap.add_argument("--stream-tokens", type=int, default=128)
    ap.add_argument("--cheap-streams", type=int, default=64,
                    help="concurrent streams of the tiny model, where tokens are cheap and the relay shows")
    ap.add_argument("--cheap-tokens", type=int, default=256)
    ap.add_argument("--ab-ref", help="also run this git revision's manager and worker, rounds interleaved "
                                     "(same-run A/B of the router and the worker)")
    ap.add_argument("--load-generator", choices=["auto", "python", "wrk"], default="auto",
                    help="client for the one-token rounds; auto: wrk when installed")
    args = ap.parse_args(argv)
    gen = args.load_generator
    if gen == "auto":
        gen = "wrk" if shutil.which("wrk") else "python"
    elif gen == "wrk" and not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk (or use --load-generator python)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-router-"))
    trees = [("this", ROOT)]
    clusters: list[Cluster] = []
    base = None
    try:
        if args.ab_ref:
            base = worktree(args.ab_ref, tmp)
            trees.append((args.ab_ref, base))
        for tag, tree in trees:
            clusters.append(Cluster(tree, tag, args, tmp))
        print(f"cpu_cores={os.cpu_count()} load_generator={gen} concurrency={args.concurrency} "
              f"rounds={args.rounds} " + (f"seconds/round={args.seconds}" if gen == "wrk"
                                           else f"requests/round={args.requests}")
              + (f" A/B: this tree vs {args.ab_ref}" if args.ab_ref else ""), flush=True)

        def one_round(url: str) -> dict:
            if gen == "wrk":
                return wrk_round(url, "tiny", args.concurrency, args.seconds)
            return python_round(url, "tiny", args.requests, args.concurrency)

        legs = [(c, path) for c in clusters for path in ("direct", "router")]
        for c, path in legs:  # warm-up
            one_round(c.urls[path])
        res = {(c.tag, path): [] for c, path in legs}
        cpu = {c.tag: 0.0 for c in clusters}  # each manager's CPU during its routed rounds
        solo = {k: [] for k in res}
        tps = {k: [] for k in res}
        cheap = {k: [] for k in res}
        for i in range(args.rounds):
            for c, path in (legs if i % 2 == 0 else legs[::-1]):  # ABBA: no leg always first
                c0 = cpu_seconds(c.mgr.p.pid)
                res[(c.tag, path)].append(one_round(c.urls[path]))
                if path == "router":
                    cpu[c.tag] += cpu_seconds(c.mgr.p.pid) - c0
        for i in range(args.rounds):  # unloaded: the bare cost of the extra hop
            for c, path in (legs if i % 2 == 0 else legs[::-1]):
                solo[(c.tag, path)] += asyncio.run(latency_round(c.urls[path], "tiny", 100, 1))
        for i in range(args.stream_rounds):
            for c, path in (legs if i % 2 == 0 else legs[::-1]):
                tps[(c.tag, path)].append(asyncio.run(stream_round(
                    c.urls[path], "stream", args.stream_requests, args.stream_concurrency, args.stream_tokens)))
                cheap[(c.tag, path)].append(asyncio.run(stream_round(
                    c.urls[path], "tiny", args.cheap_streams, args.cheap_streams, args.cheap_tokens)))
    finally:
        for c in clusters:
            c.stop()
        if base is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
    for c in clusters:
        print(f"\n[{c.tag}] per round (p50 ms / p99 ms / requests/s), direct vs router:")
        for i, (d, r) in enumerate(zip(res[(c.tag, "direct")], res[(c.tag, "router")])):
            print(f"  round {i + 1}: {d['50%']:6.2f} / {d['99%']:6.2f} / {d['rps']:5.0f}   "
                  f"{r['50%']:6.2f} / {r['99%']:6.2f} / {r['rps']:5.0f}   "
                  f"added p50 {r['50%'] - d['50%']:+.2f} p99 {r['99%'] - d['99%']:+.2f}")
    print()
    print(f"| tree | path | 1-token p50 (ms), c={args.concurrency} | p99 (ms) | requests/s | p50 (ms), c=1 | "
          f"p99 (ms), c=1 | stream tok/s, c={args.stream_concurrency} | tiny-model stream tok/s, "
          f"c={args.cheap_streams} |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    summary = {}
    for c, path in legs:
        k = (c.tag, path)
        p50, p99 = median([r["50%"] for r in res[k]]), median([r["99%"] for r in res[k]])
        rps = median([r["rps"] for r in res[k]])
        q = (pct(solo[k], 50) * 1e3, pct(solo[k], 99) * 1e3)
        summary[k] = {"stream": median(tps[k]), "cheap": median(cheap[k]), "rps": rps}
        print(f"| {c.tag} | {path} | {p50:.2f} | {p99:.2f} | {rps:.0f} | {q[0]:.2f} | {q[1]:.2f} | "
              f"{summary[k]['stream']:.1f} | {summary[k]['cheap']:.0f} |")
    for c in clusters:
        d, r = res[(c.tag, "direct")], res[(c.tag, "router")]
        added = [median([b[q] - a[q] for a, b in zip(d, r)]) for q in ("50%", "99%")]
        sd, sr = summary[(c.tag, "direct")], summary[(c.tag, "router")]
        print(f"\n[{c.tag}] router CPU per routed request: {1e6 * cpu[c.tag] / sum(x['n'] for x in r):.0f} us; "
              f"added at c={args.concurrency} (median of per-round differences): p50 {added[0]:+.2f} ms "
              f"(bar <= 2), p99 {added[1]:+.2f} ms (bar <= 10); streaming through the router: "
              f"{100 * sr['stream'] / sd['stream']:.1f}% of direct (c={args.stream_concurrency}), "
              f"{100 * sr['cheap'] / sd['cheap']:.1f}% of direct (tiny model, c={args.cheap_streams}; bar >= 97%)")
    if len(clusters) == 2:
        a, b = clusters[0].tag, clusters[1].tag
        print(f"\nA/B, {a} / {b} (medians; > 1 is better for throughput):")
        for path in ("direct", "router"):
            x, y = summary[(a, path)], summary[(b, path)]
            print(f"  {path}: 1-token requests/s {x['rps'] / y['rps']:.3f}, "
                  f"stream tok/s {x['stream'] / y['stream']:.3f}, "
                  f"tiny-model stream tok/s {x['cheap'] / y['cheap']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
