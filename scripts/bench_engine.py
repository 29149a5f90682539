"""Offline throughput matrix: this engine vs transformers ``generate`` (static batches) vs
transformers continuous batching (the ``generate_batch`` manager), every cell in one run.

    python scripts/make_tiny_models.py --out models --bench
    python scripts/bench_engine.py --model models/bench-llama-150m --json /tmp/bench-engine.json
    python scripts/bench_engine.py --batch-limits 16 --prompt-lens 32,512 --output-lens 16,256  # one cell

Cells: batch limit (``--batch-limits 8,16,32,64``: the most sequences any system runs at once) x
prompt lengths (``--prompt-lens short=16,128 long=256,1024``) x output lengths (``--output-lens
short=16,64 long=128,256``), plus the ``--extra-cell`` (default: the workload of issue 10, batch 16,
prompts 32-512, outputs 16-256, 64 requests). A cell runs ``max(16, 2 x batch limit)`` requests
(``--requests-per-cell-factor``, ``--min-requests``) with seeded random token ids and lengths, EOS ignored, greedy.
Output tokens/s counts the tokens each request asked for.

How each system is driven:
- ours: ``LLM(model, dtype, max_num_seqs=batch limit)``, every other setting at its default, one
  ``generate`` call with one ``SamplingParams(max_tokens=...)`` per request.
- transformers ``generate``: ``sdpa`` attention, left-padded batches of ``batch limit`` requests in
  order, each run to its longest request (``min_new_tokens`` = ``max_new_tokens``), as its docs
  show batched generation.
- transformers continuous batching: ``init_continuous_batching`` + ``add_request(ids,
  max_new_tokens=...)`` per request (``generate_batch`` takes one ``max_new_tokens`` for all),
  ``max_requests_per_batch`` = batch limit, a KV pool sized for the cell, and the page size and
  ``max_batch_tokens`` given by ``--cb-page-size`` / ``--cb-max-batch-tokens`` (defaults 256 and 256,
  the best of ``--tune-cb``'s sweep on the Xeon; the issue's measurement used 16 and 512; on the AMD
  machine the sweep put every setting within noise of the others). Warmed up with the measured
  settings first.

Prints a markdown row per cell, then the worst cell (minimum ratio of ours to the faster
transformers path) and the geometric mean of the ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEERS = ("hf-generate (static)", "hf-generate_batch (CB)")


@dataclass(frozen=True)
class Cell:
    batch: int
    prompt: tuple[str, int, int]
    output: tuple[str, int, int]
    num_requests: int

    @property
    def label(self) -> str:
        return (f"b={self.batch} prompt {self.prompt[0]} {self.prompt[1]}-{self.prompt[2]} "
                f"output {self.output[0]} {self.output[1]}-{self.output[2]} n={self.num_requests}")


def workload(cell: Cell, vocab: int, seed: int):
    """Seeded random prompts (token ids) and output lengths of one cell."""
    rng = random.Random(f"{seed}|{cell.prompt}|{cell.output}|{cell.num_requests}")
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(cell.prompt[1], cell.prompt[2]))]
               for _ in range(cell.num_requests)]
    outs = [rng.randint(cell.output[1], cell.output[2]) for _ in range(cell.num_requests)]
    return prompts, outs


def run_ours(args, cell, prompts, outs):
    from engine import LLM, SamplingParams

    opts = {} if args.max_num_batched_tokens is None else {"max_num_batched_tokens": args.max_num_batched_tokens}
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=cell.batch, **opts)
    sp = lambda m: SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": prompts[0][:32]}], sp(4))  # warm-up
    t = time.perf_counter()
    res = llm.generate([{"prompt_token_ids": p} for p in prompts], [sp(m) for m in outs])
    dt = time.perf_counter() - t
    if [len(r.outputs[0].token_ids) for r in res] != outs:
        raise RuntimeError("engine produced the wrong number of tokens")
    del llm
    return dt


def load_hf(args, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype), **kw).eval()


def run_hf_static(args, cell, prompts, outs):
    model = load_hf(args, attn_implementation="sdpa")
    pad = 0

    def batch_generate(ps, max_new):
        width = max(len(p) for p in ps)
        ids = torch.full((len(ps), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(ps):  # left padding, as generate expects for decoder-only models
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            return model.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                                  do_sample=False, eos_token_id=None, pad_token_id=pad)[:, width:]

    batch_generate([prompts[0][:32]], 4)  # warm-up
    t = time.perf_counter()
    for i in range(0, len(prompts), cell.batch):
        gen = batch_generate(prompts[i:i + cell.batch], max(outs[i:i + cell.batch]))
        if gen.shape[1] != max(outs[i:i + cell.batch]):
            raise RuntimeError("generate produced the wrong number of tokens")
    return time.perf_counter() - t


def run_hf_cb(args, cell, prompts, outs, page_size=None, max_batch_tokens=None):
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    page = page_size or args.cb_page_size
    model = load_hf(args)
    gen_cfg = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=max(outs))
    # A pool for every sequence of the cell at its longest, in pages, with headroom.
    per_seq = -(-(cell.prompt[2] + cell.output[2]) // page)
    cb_cfg = ContinuousBatchingConfig(max_requests_per_batch=cell.batch, page_size=page,
                                      num_blocks=int(per_seq * cell.batch * 1.25) + 4,
                                      max_batch_tokens=max_batch_tokens or args.cb_max_batch_tokens)
    manager = model.init_continuous_batching(generation_config=gen_cfg, continuous_batching_config=cb_cfg)
    manager.start()
    try:
        # Warm-up with the measured settings (the manager takes them from the first request).
        wid = manager.add_request(prompts[0][:32], max_new_tokens=4)
        while True:
            r = manager.get_result(timeout=60)
            if r is not None and r.request_id == wid and r.is_finished():
                break
        t = time.perf_counter()
        ids = [manager.add_request(p, max_new_tokens=m) for p, m in zip(prompts, outs)]
        done = {}
        while len(done) < len(ids):
            r = manager.get_result(timeout=120)
            if r is None:
                if not manager.is_running():
                    raise RuntimeError("transformers continuous batching stopped")
                continue
            if r.is_finished():
                done[r.request_id] = r
        dt = time.perf_counter() - t
    finally:
        manager.stop(block=True, timeout=10)
    if [len(done[i].generated_tokens) for i in ids] != outs:
        raise RuntimeError("continuous batching produced the wrong number of tokens")
    del model, manager
    return dt


SYSTEMS = {"ours": run_ours, PEERS[0]: run_hf_static, PEERS[1]: run_hf_cb}


def parse_ranges(items: list[str]) -> list[tuple[str, int, int]]:
    out = []
    for item in items:
        name, _, rng = item.rpartition("=")
        lo, hi = map(int, rng.split(","))
        out.append((name or f"{lo}-{hi}", lo, hi))
    return out


def make_cells(args) -> list[Cell]:
    cells = []
    for b in map(int, args.batch_limits.split(",")):
        n = max(args.min_requests, int(args.requests_per_cell_factor * b))
        for p in parse_ranges(args.prompt_lens):
            for o in parse_ranges(args.output_lens):
                cells.append(Cell(b, p, o, n))
    if args.extra_cell:
        b, p, o, n = args.extra_cell.split(":")
        cells.append(Cell(int(b), parse_ranges([p])[0], parse_ranges([o])[0], int(n)))
    return cells


def tune_cb(args, vocab: int) -> None:
    """Sweep the continuous-batching manager's page size and token budget on one cell."""
    cell = make_cells(args)[0]
    prompts, outs = workload(cell, vocab, args.seed)
    print(f"tuning transformers continuous batching on {cell.label}")
    for page in (16, 64, 256):
        for mbt in (256, 512, 1024, 2048):
            dt = run_hf_cb(args, cell, prompts, outs, page_size=page, max_batch_tokens=mbt)
            print(f"  page_size={page:<4} max_batch_tokens={mbt:<5} {sum(outs) / dt:8.1f} out tok/s", flush=True)
            gc.collect()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/bench-llama-150m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-limits", default="8,16,32,64")
    ap.add_argument("--prompt-lens", nargs="+", default=["short=16,128", "long=256,1024"])
    ap.add_argument("--output-lens", nargs="+", default=["short=16,64", "long=128,256"])
    ap.add_argument("--requests-per-cell-factor", type=float, default=2.0)
    ap.add_argument("--min-requests", type=int, default=16)
    ap.add_argument("--extra-cell", default="16:issue=32,512:issue=16,256:64",
                    help="BATCH:PROMPTS:OUTPUTS:N, one more cell ('' for none)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="ours; default: the engine's")
    ap.add_argument("--cb-page-size", type=int, default=256)
    ap.add_argument("--cb-max-batch-tokens", type=int, default=256)
    ap.add_argument("--tune-cb", action="store_true", help="sweep the CB manager's settings on the first cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--json", default=None, help="write every cell's figures here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    if args.tune_cb:
        tune_cb(args, vocab)
        return 0
    systems = args.systems.split(",")
    cells = make_cells(args)
    print(f"model={args.model} dtype={args.dtype} cpu_cores={os.cpu_count()} "
          f"torch_threads={torch.get_num_threads()} cells={len(cells)} systems={systems} "
          f"cb_page_size={args.cb_page_size} cb_max_batch_tokens={args.cb_max_batch_tokens}", flush=True)
    results = []
    for cell in cells:
        prompts, outs = workload(cell, vocab, args.seed)
        row = {"cell": cell.label, "batch": cell.batch, "prompt": cell.prompt, "output": cell.output,
               "requests": cell.num_requests, "output_tokens": sum(outs), "tok_s": {}}
        for name in systems:
            dt = SYSTEMS[name](args, cell, prompts, outs)
            row["tok_s"][name] = sum(outs) / dt
            print(f"  {cell.label:<60} {name:<24} {dt:8.1f} s {row['tok_s'][name]:8.1f} out tok/s",
                  file=sys.stderr, flush=True)
            gc.collect()
        results.append(row)
    print_table(results, systems)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def print_table(results: list[dict], systems: list[str]) -> None:
    peers = [p for p in PEERS if p in systems]
    print("\n| batch | prompts | outputs | requests | " + " | ".join(f"{s} tok/s" for s in systems)
          + (" | ours / faster transformers |" if "ours" in systems and peers else " |"))
    print("|---:|---|---|---:|" + "---:|" * (len(systems) + (1 if "ours" in systems and peers else 0)))
    ratios = []
    for r in results:
        cells = [f"{r['tok_s'][s]:.1f}" for s in systems]
        if "ours" in systems and peers:
            ratio = r["tok_s"]["ours"] / max(r["tok_s"][p] for p in peers)
            r["ratio"] = ratio
            ratios.append((ratio, r["cell"]))
            cells.append(f"**{ratio:.2f}x**")
        p, o = r["prompt"], r["output"]
        print(f"| {r['batch']} | {p[0]} {p[1]}-{p[2]} | {o[0]} {o[1]}-{o[2]} | {r['requests']} | "
              + " | ".join(cells) + " |")
    if ratios:
        worst = min(ratios)
        gmean = math.exp(sum(math.log(x) for x, _ in ratios) / len(ratios))
        print(f"\nours / faster transformers path: worst cell {worst[0]:.2f}x ({worst[1]}), "
              f"geometric mean {gmean:.2f}x over {len(ratios)} cells")


if __name__ == "__main__":
    sys.exit(main())
