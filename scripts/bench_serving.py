"""HTTP serving benchmark matrix in the style of vLLM's benchmark_serving: our worker vs
``transformers serve --continuous-batching``, same model directory, same workloads, one run.

    python scripts/make_tiny_models.py --out models --serve-bench
    python scripts/bench_serving.py --model models/bench-llama-serve --json /tmp/bench-serving.json
    # a subset: one batch limit, short prompts only, only our worker
    python scripts/bench_serving.py --batch-limits 8 --prompt-lens short=16,128 --systems ours
    # same-run A/B of our worker against another commit's (from a git worktree), no peer
    python scripts/bench_serving.py --systems ours --ab-ref HEAD~1

Cells are batch limit x prompt-length range x output-length range (``--batch-limits 8,16,32,64``,
``--prompt-lens short=16,128 long=256,1024``, ``--output-lens short=16,64 long=128,256``). A cell sends
``max(16, factor * batch_limit)`` streaming /v1/completions requests (``--requests-per-cell-factor``, default 2)
with lengths uniform in the cell's ranges, the same texts to both systems, EOS ignored, greedy, at a client
concurrency equal to the batch limit (optionally paced by a Poisson ``--request-rate``). Reported per system:
output tokens/s, TTFT, ITL (gaps between streamed chunks that carry text) and TPOT, p50/p99. ITL depends on
how a server chunks its stream (transformers serve sends one chunk per token but writes all chunks queued since
its last write at once, giving near-zero gaps when it lags); TPOT, in the JSON, does not.

Each server is started once per batch limit (its settings depend on nothing else), serves all that batch
limit's cells and is stopped before the other system starts, so the two never compete for the CPU. Before
every cell's timed run each server gets warm-up requests from that cell with the measured sampling settings.
Both KV pools hold batch limit x (longest prompt + longest output of any cell) tokens, rounded up to whole
blocks per sequence (but at least one sequence of the model's full length), plus ``KV_HEADROOM``.

- ours: ``python -m worker`` with a temporary config.yaml: ``max_num_seqs`` = batch limit, ``num_kv_blocks``
  for the pool above, our engine's defaults for everything else (``--max-num-batched-tokens`` overrides the
  per-step token budget).
- transformers serve: ``--continuous-batching --cb-num-blocks N --cb-max-batch-tokens M``. N is the pool above
  in its default 256-token pages (``--cb-block-size`` is deprecated); the headroom covers its scheduler, which
  admits no new prefill while fewer than 15% of pages are free. M is the same per-step token budget as ours
  (``--cb-max-batch-tokens`` overrides). Its own default, 8192, is not used: on CPU its attention over a step
  is dense across all the step's requests ([step tokens, step + cached tokens] mask, preallocated for M and
  the whole pool), so a larger M mostly buys quadratic work and memory. It has no flag for max concurrent requests
  (its ``max_requests_per_batch`` defaults to 1024), so the client concurrency alone holds it to the batch
  limit. It needs ``accelerate``, wants the model named by its directory path, rejects ``ignore_eos`` (EOS is
  disabled through ``generation_config``), ends streams without ``[DONE]``, and its continuous-batching
  manager takes sampling settings from the first request it sees.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import httpx
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig  # noqa: E402

PEER = "transformers-serve"
SYSTEMS = ("ours", PEER)
KV_HEADROOM = 1.25  # pool size over the worst-case demand, for schedulers' free-block margins
MIN_REQUESTS = 16
WARMUP_REQUESTS = 2
OUR_DEFAULTS = {f.name: f.default for f in fields(EngineConfig)}


@dataclass(frozen=True)
class Cell:
    batch: int
    prompt_name: str
    prompt: tuple[int, int]
    output_name: str
    output: tuple[int, int]

    @staticmethod
    def span(name: str, lengths: tuple[int, int]) -> str:
        text = f"{lengths[0]}-{lengths[1]}"
        return text if name == text else f"{name} {text}"

    @property
    def label(self) -> str:
        return f"batch={self.batch} prompt={self.prompt_name} output={self.output_name}"


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    gaps: list[float] = field(default_factory=list)
    error: str = ""


# -- command line ---------------------------------------------------------------------------------

def parse_ranges(items: list[str]) -> dict[str, tuple[int, int]]:
    """``["short=16,128", "long=256,1024"]`` -> {name: (lo, hi)}; an unnamed ``lo,hi`` is named ``lo-hi``."""
    out = {}
    for item in items:
        name, _, span = item.rpartition("=")
        lo, hi = (int(x) for x in span.split(","))
        if not 1 <= lo <= hi:
            raise SystemExit(f"bad length range {item!r}: need 1 <= lo <= hi")
        out[name or f"{lo}-{hi}"] = (lo, hi)
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/bench-llama-serve")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-limits", default="8,16,32,64",
                    help="max concurrent sequences per cell, comma separated (= client concurrency)")
    ap.add_argument("--prompt-lens", nargs="+", default=["short=16,128", "long=256,1024"],
                    help="NAME=LO,HI prompt token ranges")
    ap.add_argument("--output-lens", nargs="+", default=["short=16,64", "long=128,256"],
                    help="NAME=LO,HI output token ranges")
    ap.add_argument("--requests-per-cell-factor", type=float, default=2.0,
                    help="requests per cell = max(--min-requests, factor * batch limit)")
    ap.add_argument("--min-requests", type=int, default=MIN_REQUESTS)
    ap.add_argument("--request-rate", type=float, default=None, help="Poisson rate (req/s); default: all at once")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="our per-step token budget (default: our engine's)")
    ap.add_argument("--cb-max-batch-tokens", type=int, default=None,
                    help="transformers serve per-step token budget (default: the same as ours)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--log-dir", default="/tmp/bench-serving")
    ap.add_argument("--json", default=None, help="write raw per-cell results here")
    ap.add_argument("--ab-ref", default=None,
                    help="also run this git revision's worker (system 'base') in every cell: a same-run A/B")
    args = ap.parse_args(argv)
    args.batch_limits = [int(b) for b in args.batch_limits.split(",")]
    args.prompt_lens = parse_ranges(args.prompt_lens)
    args.output_lens = parse_ranges(args.output_lens)
    args.systems = args.systems.split(",")
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    if args.ab_ref:
        args.systems.insert(args.systems.index("ours") + 1 if "ours" in args.systems else 0, "base")
    return args


def make_cells(args) -> list[Cell]:
    return [Cell(b, pn, pr, on, orng) for b in args.batch_limits
            for pn, pr in args.prompt_lens.items() for on, orng in args.output_lens.items()]


# -- workload -------------------------------------------------------------------------------------

def make_workload(tok, n: int, seed: int, plen: tuple[int, int], olen: tuple[int, int]):
    """``n`` (prompt text, max_tokens) pairs; the prompts' token counts (this tokenizer) fall in ``plen``."""
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


def requests_per_cell(args, batch: int) -> int:
    return max(args.min_requests, int(args.requests_per_cell_factor * batch))


def body_for(system: str, model: str, prompt: str, max_tokens: int) -> dict:
    if system in ("ours", "base"):
        return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    # transformers serve rejects unknown fields such as ignore_eos: disable EOS via generation_config.
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "generation_config": json.dumps({"eos_token_id": -1, "do_sample": False,
                                             "max_new_tokens": max_tokens})}


# -- client ---------------------------------------------------------------------------------------

async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    """One streamed completion. A stream may end with ``[DONE]`` (ours) or just close (transformers serve)."""
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


# -- servers --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args: list[str], log: Path, env: dict | None = None, cwd: Path = ROOT):
        self.log = open(log, "w")
        self.p = subprocess.Popen(args, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, start_new_session=True)

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
        """Stop the server's whole process group and wait until every member is gone: a child
        still exiting (or a generation thread finishing) would share the cores with the next
        system's first cell."""
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        deadline = time.monotonic() + 30
        while group_alive(self.p.pid):
            if time.monotonic() > deadline:
                os.killpg(self.p.pid, signal.SIGKILL)
                deadline = time.monotonic() + 30
            time.sleep(0.1)
        self.log.close()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cpu_busy(window: float = 0.5) -> float:
    """Fraction of the machine's CPU time spent busy over ``window`` seconds (/proc/stat)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle
    t0, i0 = sample()
    time.sleep(window)
    t1, i1 = sample()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_idle(limit: float = 60.0, threshold: float = 0.1) -> float:
    """Wait (up to ``limit`` s) until the machine is idle, so a cell does not start while
    something else (a server still shutting down, a build) holds the cores; the last reading."""
    deadline = time.monotonic() + limit
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy()
    if busy > threshold:
        print(f"  warning: machine still {busy:.0%} busy before the cell", file=sys.stderr, flush=True)
    return busy


def pool_blocks(args, batch: int, block: int) -> int:
    """Blocks of ``block`` tokens for ``batch`` sequences of ``args.max_seq`` tokens (at least one sequence of
    the model's full length, which our engine insists on), plus ``KV_HEADROOM``."""
    need = max(batch * math.ceil(args.max_seq / block), math.ceil(args.max_pos / block))
    return math.ceil(need * KV_HEADROOM)


def start_ours(args, batch: int, port: int, logdir: Path, tree: Path = ROOT, tag: str = "worker") -> Server:
    engine = {"max_num_seqs": batch}
    if args.max_num_batched_tokens is not None:
        engine["max_num_batched_tokens"] = args.max_num_batched_tokens
    model = {"name": "bench", "source": args.model,
             "num_kv_blocks": pool_blocks(args, batch, OUR_DEFAULTS["block_size"])}
    model["source"] = str(Path(args.model).resolve())
    cfg = logdir / f"{tag}-batch{batch}.yaml"
    cfg.write_text(yaml.safe_dump({"engine_defaults": engine, "worker": {"models": [model]}}))
    return Server([sys.executable, "-m", "worker", "--models", f"bench={model['source']}", "--host", "127.0.0.1",
                   "--port", str(port), "--dtype", args.dtype, "--config", str(cfg)],
                  logdir / f"{tag}-batch{batch}.log", cwd=tree)


def start_peer(args, batch: int, port: int, logdir: Path) -> Server:
    from transformers import ContinuousBatchingConfig

    page = ContinuousBatchingConfig().page_size
    step_tokens = (args.cb_max_batch_tokens or args.max_num_batched_tokens
                   or OUR_DEFAULTS["max_num_batched_tokens"])
    exe = [sys.executable, "-c", "from transformers.cli.transformers import main; main()"]
    return Server([*exe, "serve", str(Path(args.model).resolve()), "--continuous-batching",
                   "--cb-num-blocks", str(pool_blocks(args, batch, page)),
                   "--cb-max-batch-tokens", str(step_tokens),
                   "--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype, "--log-level", "warning"],
                  logdir / f"transformers-serve-batch{batch}.log")


def start(system: str, args, batch: int) -> tuple[Server, str, str]:
    """Start ``system`` for one batch limit; returns (server, completions URL, model name to request)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    logdir = Path(args.log_dir)
    logdir.mkdir(parents=True, exist_ok=True)
    if system == "ours":
        srv = start_ours(args, batch, port, logdir)
        health, model_name = f"{base}/v1/models", "bench"
    elif system == "base":
        srv = start_ours(args, batch, port, logdir, args.base_tree, "base")
        health, model_name = f"{base}/v1/models", "bench"
    else:
        srv = start_peer(args, batch, port, logdir)
        health, model_name = f"{base}/health", str(Path(args.model).resolve())
    try:
        srv.wait(health)
    except BaseException:
        srv.stop()
        raise
    return srv, f"{base}/v1/completions", model_name


# -- matrix ---------------------------------------------------------------------------------------

def warmup_requests(batch: int) -> int:
    """A cell's warm-up: one full batch at its concurrency, so neither server meets a batch of
    that size (its buffers, its GEMM shapes) for the first time in the timed part."""
    return max(WARMUP_REQUESTS, batch)


def run_cell(system: str, url: str, model_name: str, cell: Cell, work, args) -> dict:
    """Warm up with the first :func:`warmup_requests` of ``work`` (distinct prompts: no
    prefix-cache hits later), then time the rest."""
    bodies = [body_for(system, model_name, p, m) for p, m in work]
    warm = warmup_requests(cell.batch)
    wait_idle()
    asyncio.run(drive(url, bodies[:warm], cell.batch, None, args.seed))
    wait_idle()
    results, wall = asyncio.run(drive(url, bodies[warm:], cell.batch, args.request_rate, args.seed))
    s = summarize(results, wall)
    print(f"  {cell.label} {system}: ok={s['ok']} failed={s['failed']} wall={s['wall_s']:.1f}s "
          f"out_tok/s={s['out_tok_s']:.1f} ttft_p50={s['ttft_p50'] * 1e3:.0f}ms "
          f"itl_p50={s['itl_p50'] * 1e3:.1f}ms {s['errors'] or ''}", file=sys.stderr, flush=True)
    return s


def run_batch_limit(batch: int, cells: list[Cell], workloads: dict, args) -> dict:
    """All cells of one batch limit: each system's server started once, then stopped."""
    out: dict[Cell, dict] = {c: {} for c in cells}
    # Alternate the order between batch limits, so drift does not always favour one system.
    order = args.systems if args.batch_limits.index(batch) % 2 == 0 else args.systems[::-1]
    for system in order:
        srv, url, model_name = start(system, args, batch)
        try:
            for cell in cells:
                out[cell][system] = run_cell(system, url, model_name, cell, workloads[cell], args)
        finally:
            srv.stop()
    return out


def fmt_ms(x: float) -> str:
    return f"{x * 1e3:.1f}" if x == x else "-"


def compare(res: dict) -> dict | None:
    if "ours" not in res or PEER not in res:
        return None
    a, b = res["ours"], res[PEER]
    return {"ratio": a["out_tok_s"] / b["out_tok_s"] if b["out_tok_s"] else float("inf"),
            "ttft_ok": a["ttft_p50"] <= b["ttft_p50"], "itl_ok": a["itl_p50"] <= b["itl_p50"]}


TABLE_HEADER = ("| batch | prompt | output | ours tok/s | peer tok/s | ratio | ours TTFT p50 ms | peer TTFT p50 ms "
                "| ours ITL p50 ms | peer ITL p50 ms | TTFT no worse | ITL no worse |\n"
                "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|:---:|")


def table_row(cell: Cell, res: dict) -> str:
    def col(system: str, key: str) -> str:
        s = res.get(system)
        if s is None:
            return "-"
        if key == "out_tok_s":
            return f"{s[key]:.1f}" + (f" ({s['failed']} failed)" if s["failed"] else "")
        return fmt_ms(s[key])

    def flag(key: str) -> str:
        return "-" if c is None else ("yes" if c[key] else "NO")

    c = compare(res)
    cols = [str(cell.batch), Cell.span(cell.prompt_name, cell.prompt), Cell.span(cell.output_name, cell.output),
            col("ours", "out_tok_s"), col(PEER, "out_tok_s"), f"{c['ratio']:.2f}x" if c else "-",
            col("ours", "ttft_p50"), col(PEER, "ttft_p50"), col("ours", "itl_p50"), col(PEER, "itl_p50"),
            flag("ttft_ok"), flag("itl_ok")]
    return "| " + " | ".join(cols) + " |"


def print_ab(results: dict[Cell, dict], ref: str) -> None:
    """Ours against the ``--ab-ref`` build, cell by cell."""
    rows = [(cell, res["ours"], res["base"]) for cell, res in results.items() if "ours" in res and "base" in res]
    if not rows:
        return
    print(f"\nA/B, this tree / {ref} (tok/s ratio > 1 is better; TTFT and ITL p50 in ms):")
    print("| batch | prompt | output | this tok/s | base tok/s | ratio | this TTFT | base TTFT | this ITL | base ITL |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for cell, a, b in rows:
        r = a["out_tok_s"] / b["out_tok_s"] if b["out_tok_s"] else float("inf")
        ratios.append(r)
        spans = f"{Cell.span(cell.prompt_name, cell.prompt)} | {Cell.span(cell.output_name, cell.output)}"
        print(f"| {cell.batch} | {spans} | {a['out_tok_s']:.1f} | {b['out_tok_s']:.1f} | {r:.3f} | "
              f"{fmt_ms(a['ttft_p50'])} | {fmt_ms(b['ttft_p50'])} | {fmt_ms(a['itl_p50'])} | {fmt_ms(b['itl_p50'])} |")
    print(f"A/B throughput ratio: min {min(ratios):.3f}, geometric mean {statistics.geometric_mean(ratios):.3f} "
          f"over {len(ratios)} cells")


def print_summary(results: dict[Cell, dict]) -> None:
    comps = {cell: c for cell, res in results.items() if (c := compare(res))}
    if not comps:
        return
    worst = min(comps, key=lambda cell: comps[cell]["ratio"])
    ratios = [c["ratio"] for c in comps.values()]
    geo = statistics.geometric_mean(ratios) if all(r > 0 for r in ratios) else float("nan")
    n = len(comps)
    print(f"\nthroughput ratio ours / transformers serve: min {comps[worst]['ratio']:.2f}x ({worst.label}), "
          f"geometric mean {geo:.2f}x over {n} cells")
    print(f"TTFT p50 no worse than transformers serve in {sum(c['ttft_ok'] for c in comps.values())}/{n} cells; "
          f"ITL p50 no worse in {sum(c['itl_ok'] for c in comps.values())}/{n} cells")


def write_json(path: str, header: dict, results: dict[Cell, dict]) -> None:
    cells = [{"batch": c.batch, "prompt_name": c.prompt_name, "prompt_len": c.prompt,
              "output_name": c.output_name, "output_len": c.output, "results": res,
              "comparison": compare(res)} for c, res in results.items()]
    Path(path).write_text(json.dumps({"header": header, "cells": cells}, indent=2))


def main(argv=None) -> int:
    from transformers import AutoConfig, AutoTokenizer

    args = parse_args(argv)
    cells = make_cells(args)
    args.max_seq = max(p[1] for p in args.prompt_lens.values()) + max(o[1] for o in args.output_lens.values())
    args.max_pos = AutoConfig.from_pretrained(args.model).max_position_embeddings
    if args.max_seq > args.max_pos:
        raise SystemExit(f"longest prompt + output ({args.max_seq}) exceeds the model's {args.max_pos} positions")
    tok = AutoTokenizer.from_pretrained(args.model)
    header = {"model": args.model, "dtype": args.dtype, "systems": args.systems, "cpu_count": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "request_rate": args.request_rate,
              "requests_per_cell_factor": args.requests_per_cell_factor, "max_seq_tokens": args.max_seq}
    print(" ".join(f"{k}={v}" for k, v in header.items()), flush=True)
    print(TABLE_HEADER, flush=True)
    results: dict[Cell, dict] = {}
    args.base_tree = None
    if args.ab_ref:
        # Beside this tree, on the same filesystem (a tree under /tmp measured ~5-10% apart).
        args.base_tree = ROOT / ".bench-worktrees" / f"serving-{os.getpid()}"
        subprocess.run(["git", "worktree", "remove", "--force", str(args.base_tree)], cwd=ROOT, capture_output=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(args.base_tree), args.ab_ref], cwd=ROOT,
                       check=True, capture_output=True)
    try:
        run_matrix(args, cells, tok, results)
    finally:
        if args.base_tree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(args.base_tree)], cwd=ROOT,
                           capture_output=True)
    print_summary(results)
    if args.ab_ref:
        print_ab(results, args.ab_ref)
    if args.json:
        write_json(args.json, header, results)
    return 0 if all(s["failed"] == 0 for res in results.values() for s in res.values()) else 1


def run_matrix(args, cells: list[Cell], tok, results: dict[Cell, dict]) -> None:
    for batch in args.batch_limits:
        mine = [c for c in cells if c.batch == batch]
        n = warmup_requests(batch) + requests_per_cell(args, batch)
        workloads = {c: make_workload(tok, n, args.seed + i, c.prompt, c.output) for i, c in enumerate(mine)}
        for cell, res in run_batch_limit(batch, mine, workloads, args).items():
            results[cell] = res
            print(table_row(cell, res), flush=True)


if __name__ == "__main__":
    sys.exit(main())
