"""HTTP serving benchmark in the style of vLLM's benchmark_serving: our worker vs
``transformers serve --continuous-batching``, same model directory, same workload, one run.

    python scripts/make_tiny_models.py --out models --serve-bench
    python scripts/bench_serving.py --model models/bench-llama-serve

Each server is started by this script, warmed up with the measured settings, driven with streaming
/v1/completions requests at a fixed concurrency (or a Poisson request rate), then stopped, so the
two never compete for the CPU. Reports output tokens/s, TTFT, inter-token latency (gaps between
streamed chunks) and TPOT, p50/p99, and our ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    gaps: list[float] = field(default_factory=list)
    error: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_workload(model: str, n: int, seed: int, plen: tuple[int, int], olen: tuple[int, int]):
    """Text prompts whose token counts (with this model's tokenizer) fall in ``plen``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rng = random.Random(seed)
    special = set(tok.all_special_ids)
    ids = [i for i in range(len(tok)) if i not in special]
    out = []
    for _ in range(n):
        target = rng.randint(*plen)
        text = tok.decode([rng.choice(ids) for _ in range(target)])
        text = tok.decode(tok.encode(text)[:target])  # round-trip so both servers see equal text
        out.append((text, rng.randint(*olen)))
    return out


def body_for(system: str, model: str, prompt: str, max_tokens: int) -> dict:
    if system == "ours":
        return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    # transformers serve rejects unknown fields such as ignore_eos: disable EOS via generation_config.
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "generation_config": json.dumps({"eos_token_id": -1, "do_sample": False,
                                             "max_new_tokens": max_tokens})}


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    start = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    tokens = 0
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return Result(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    return Result(False, error=str(obj["error"]))
                if obj.get("usage"):
                    tokens = obj["usage"].get("completion_tokens", tokens)
                if any(c.get("text") for c in obj.get("choices", [])):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
    except httpx.HTTPError as e:
        return Result(False, error=type(e).__name__)
    end = time.perf_counter()
    if first is None:  # tokens may still have been generated (usage says): count them, fail it
        return Result(False, latency=end - start, output_tokens=tokens, error="no text streamed")
    return Result(True, ttft=first - start, latency=end - start, output_tokens=tokens or body["max_tokens"],
                  gaps=gaps)


async def drive(url: str, bodies: list[dict], concurrency: int, rate: float | None, seed: int):
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        sem = asyncio.Semaphore(concurrency)
        rng = random.Random(seed)

        async def run(b):
            async with sem:
                return await one_request(client, url, b)

        start = time.perf_counter()
        tasks = []
        for b in bodies:
            tasks.append(asyncio.create_task(run(b)))
            if rate:
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))
    return xs[k]


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    gaps = [g for r in ok for g in r.gaps]
    return {"ok": len(ok), "failed": len(results) - len(ok), "wall_s": wall,
            "out_tok_s": sum(r.output_tokens for r in results) / wall,
            "ttft_p50": pct([r.ttft for r in ok], 50), "ttft_p99": pct([r.ttft for r in ok], 99),
            "itl_p50": pct(gaps, 50), "itl_p99": pct(gaps, 99),
            "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99),
            "errors": sorted({r.error for r in results if not r.ok})[:3]}


class Server:
    def __init__(self, args: list[str], log: Path, env: dict | None = None, preexec=None):
        self.log = open(log, "w")
        self.p = subprocess.Popen(args, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                                  start_new_session=True, preexec_fn=preexec)

    def wait(self, url: str, timeout: float = 300):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"server exited ({self.p.returncode}); see {self.log.name}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(url)

    def stop(self):
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self.log.close()


def start(system: str, args) -> tuple[Server, str, str]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    logdir = Path(args.log_dir)
    logdir.mkdir(parents=True, exist_ok=True)
    if system == "ours":
        cfg = logdir / "bench-worker.yaml"
        cfg.write_text(f"engine_defaults:\n  max_num_seqs: {args.concurrency}\n"
                       f"  max_num_batched_tokens: {args.max_num_batched_tokens}\n"
                       f"worker:\n  cpu_kv_cache_memory: 1GiB\n")
        srv = Server([sys.executable, "-m", "worker", "--models", f"bench={args.model}", "--host", "127.0.0.1",
                      "--port", str(port), "--dtype", args.dtype, "--config", str(cfg)],
                     logdir / "bench-worker.log")
        srv.wait(f"{base}/v1/models")
        return srv, f"{base}/v1/completions", "bench"
    exe = [sys.executable, "-c", "from transformers.cli.transformers import main; main()"]
    srv = Server([*exe, "serve", str(Path(args.model).resolve()), "--continuous-batching", "--host",
                  "127.0.0.1", "--port", str(port), "--dtype", args.dtype, "--log-level", "warning"],
                 logdir / "bench-transformers-serve.log")
    srv.wait(f"{base}/health")
    return srv, f"{base}/v1/completions", str(Path(args.model).resolve())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/bench-llama-serve")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--request-rate", type=float, default=None, help="Poisson rate (req/s); default: all at once")
    ap.add_argument("--prompt-len", default="64,384")
    ap.add_argument("--output-len", default="32,128")
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--systems", default="ours,transformers-serve")
    ap.add_argument("--log-dir", default="/tmp/bench-serving")
    args = ap.parse_args(argv)
    plen = tuple(map(int, args.prompt_len.split(",")))
    olen = tuple(map(int, args.output_len.split(",")))
    work = make_workload(args.model, args.num_prompts, args.seed, plen, olen)
    print(f"model={args.model} dtype={args.dtype} prompts={len(work)} concurrency={args.concurrency} "
          f"rate={args.request_rate or 'inf'} prompt_len={plen} output_len={olen} cpu_cores={os.cpu_count()}",
          flush=True)
    rows = {}
    for system in args.systems.split(","):
        srv, url, model_name = start(system, args)
        try:
            warm = [body_for(system, model_name, work[0][0], work[0][1])] * 2
            asyncio.run(drive(url, warm, 2, None, args.seed))
            bodies = [body_for(system, model_name, p, m) for p, m in work]
            results, wall = asyncio.run(drive(url, bodies, args.concurrency, args.request_rate, args.seed))
        finally:
            srv.stop()
        rows[system] = summarize(results, wall)
        s = rows[system]
        print(f"  {system:<20} ok={s['ok']} failed={s['failed']} wall={s['wall_s']:.1f}s "
              f"out_tok/s={s['out_tok_s']:.1f} ttft_p50={s['ttft_p50'] * 1000:.0f}ms "
              f"itl_p50={s['itl_p50'] * 1000:.1f}ms {s['errors'] or ''}", flush=True)
    print()
    print("| system | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) | TPOT p50 (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, s in rows.items():
        print(f"| {name} | {s['out_tok_s']:.1f} | {s['ttft_p50'] * 1e3:.0f} | {s['ttft_p99'] * 1e3:.0f} | "
              f"{s['itl_p50'] * 1e3:.1f} | {s['itl_p99'] * 1e3:.1f} | {s['tpot_p50'] * 1e3:.1f} |")
    if "ours" in rows and "transformers-serve" in rows:
        a, b = rows["ours"], rows["transformers-serve"]
        print(f"\nours / transformers serve: output tok/s {a['out_tok_s'] / b['out_tok_s']:.2f}x, "
              f"TTFT p50 {b['ttft_p50'] / a['ttft_p50']:.2f}x lower")
    return 0 if all(r["failed"] == 0 for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
