"""What constrained decoding costs: output tokens/s with a ``json_schema`` constraint over the same
workload without one, on one worker, in one run; plus grammar compile times.

    python scripts/make_tiny_models.py --out models --serve-bench
    python scripts/bench_structured.py --model models/bench-llama-serve

The model and workload are the serving benchmark's (``scripts/bench_serving.py``: the same prompt
generator, streaming ``/v1/completions``, greedy, concurrency = batch limit, ``max_num_seqs`` = batch
limit). Each cell runs twice on the same worker, plain and constrained, in alternating order from
cell to cell, with a one-character mark in front of every prompt that differs between the two runs
(otherwise the second run would find its prompts in the prefix cache). The constrained run asks for
an object whose ``entries`` array needs at least 256 items, so it cannot end before ``max_tokens``
(like the plain run, which ignores EOS): both produce the same number of tokens, and the ratio is the
per-token price of the mask (fill, apply, accept) and of the rest of the machinery.
Compile times: a 20-field schema (the one of ``scripts/compare_grammar_backends.py``) compiled cold on this
model's tokenizer, then again from the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_serving import WARMUP_REQUESTS, Cell, drive, free_port, make_workload, parse_ranges, start_ours, summarize  # noqa: E402

LONG_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "entries": {"type": "array", "minItems": 256, "items": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                           "tag": {"type": "string", "maxLength": 12}},
            "required": ["id", "tag"], "additionalProperties": False}}},
    "required": ["title", "entries"], "additionalProperties": False}


def body(prompt: str, max_tokens: int, constrained: bool) -> dict:
    b = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0,
         "ignore_eos": True, "stream_options": {"include_usage": True}}
    if constrained:
        b["response_format"] = {"type": "json_schema", "json_schema": {"name": "long", "schema": LONG_SCHEMA}}
    return b


def compile_times(model: str) -> tuple[float, float]:
    """(cold, cached) compile seconds of the 20-field schema on ``model``'s tokenizer."""
    from compare_grammar_backends import schema_20
    from transformers import AutoConfig, AutoTokenizer

    from engine import StructuredOutputsParams
    from engine.llm_engine import eos_ids_of
    from engine.structured_output import GrammarCompiler

    tok = AutoTokenizer.from_pretrained(model)
    cfg = AutoConfig.from_pretrained(model)
    g = GrammarCompiler(tok, cfg.vocab_size, eos_ids_of(model, cfg, tok))
    g._xgr()  # the tokenizer index is built once per model, at its first constrained request
    spec = StructuredOutputsParams(json=schema_20()[0])
    t0 = time.perf_counter()
    g.compile(spec)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    g.compile(spec)
    return cold, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/bench-llama-serve")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-limits", default="8,16")
    ap.add_argument("--prompt-lens", nargs="+", default=["short=16,128", "long=256,1024"])
    ap.add_argument("--output-lens", nargs="+", default=["long=128,256"])
    ap.add_argument("--requests-per-cell-factor", type=float, default=2.0)
    ap.add_argument("--min-requests", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-dir", default="/tmp/bench-structured")
    args = ap.parse_args(argv)
    from transformers import AutoConfig, AutoTokenizer

    args.batch_limits = [int(b) for b in args.batch_limits.split(",")]
    prompts, outputs = parse_ranges(args.prompt_lens), parse_ranges(args.output_lens)
    args.max_seq = max(p[1] for p in prompts.values()) + max(o[1] for o in outputs.values())
    args.max_pos = AutoConfig.from_pretrained(args.model).max_position_embeddings
    args.max_num_batched_tokens = None
    tok = AutoTokenizer.from_pretrained(args.model)
    cold, cached = compile_times(args.model)
    print(f"model={args.model} dtype={args.dtype}; 20-field schema compile: {cold * 1e3:.1f} ms cold, "
          f"{cached * 1e3:.3f} ms cached", flush=True)
    rows, ratios = [], []
    logdir = Path(args.log_dir)
    logdir.mkdir(parents=True, exist_ok=True)
    for batch in args.batch_limits:
        port = free_port()
        srv = start_ours(args, batch, port, logdir)
        try:
            srv.wait(f"http://127.0.0.1:{port}/v1/models")
            url = f"http://127.0.0.1:{port}/v1/completions"
            for k, ((pn, pr), (on, orng)) in enumerate((p, o) for p in prompts.items() for o in outputs.items()):
                cell = Cell(batch, pn, pr, on, orng)
                n = max(args.min_requests, int(args.requests_per_cell_factor * batch)) + WARMUP_REQUESTS
                work = make_workload(tok, n, args.seed + batch, pr, orng)
                res = {}
                for constrained in ((False, True) if k % 2 == 0 else (True, False)):
                    # A one-character mark per run keeps the second run of a cell from hitting the
                    # prefix cache the first one filled (same lengths, no shared block).
                    mark = "1" if constrained else "0"
                    bodies = [body(mark + p, m, constrained) for p, m in work]
                    asyncio.run(drive(url, bodies[:WARMUP_REQUESTS], WARMUP_REQUESTS, None, args.seed))
                    results, wall = asyncio.run(drive(url, bodies[WARMUP_REQUESTS:], batch, None, args.seed))
                    s = summarize(results, wall)
                    if s["failed"]:
                        raise SystemExit(f"{cell.label}: {s['failed']} requests failed: {s['errors']}")
                    res[constrained] = s
                    print(f"  {cell.label} {'json_schema' if constrained else 'plain'}: "
                          f"{s['out_tok_s']:.1f} out tok/s, ttft p50 {s['ttft_p50'] * 1e3:.0f} ms, "
                          f"itl p50 {s['itl_p50'] * 1e3:.1f} ms", file=sys.stderr, flush=True)
                ratio = res[True]["out_tok_s"] / res[False]["out_tok_s"]
                ratios.append((ratio, cell.label))
                rows.append((cell, res, ratio))
        finally:
            srv.stop()
    print("\n| batch | prompts | outputs | plain tok/s | json_schema tok/s | ratio | plain ITL p50 ms | "
          "json_schema ITL p50 ms |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for cell, res, ratio in rows:
        spans = f"{Cell.span(cell.prompt_name, cell.prompt)} | {Cell.span(cell.output_name, cell.output)}"
        plain, con = res[False], res[True]
        print(f"| {cell.batch} | {spans} | {plain['out_tok_s']:.1f} | {con['out_tok_s']:.1f} | **{ratio:.2f}** | "
              f"{plain['itl_p50'] * 1e3:.1f} | {con['itl_p50'] * 1e3:.1f} |")
    worst = min(ratios)
    gmean = math.exp(sum(math.log(r) for r, _ in ratios) / len(ratios))
    print(f"\njson_schema / plain output tok/s: worst {worst[0]:.3f} ({worst[1]}), geometric mean {gmean:.3f} "
          f"over {len(ratios)} cells; 20-field schema compile {cold * 1e3:.1f} ms cold, {cached * 1e3:.3f} ms cached")
    return 0


if __name__ == "__main__":
    sys.exit(main())
