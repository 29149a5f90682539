"""Offline throughput: this engine vs transformers generate (static batches) vs generate_batch.

One run, one workload, three systems, same model and maximum batch size:

    python scripts/make_tiny_models.py --out models --bench
    python scripts/bench_engine.py --model models/bench-llama-150m

Workload: 64 requests, prompt lengths 32-512 and output lengths 16-256 (seeded random token ids),
EOS ignored. Output tokens/s counts the tokens each request asked for; static batches pad and run to
the longest request of their batch, which is that path's real cost.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def workload(n: int, vocab: int, seed: int, pmin: int, pmax: int, omin: int, omax: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(pmin, pmax))] for _ in range(n)]
    outs = [rng.randint(omin, omax) for _ in range(n)]
    return prompts, outs


def run_ours(args, prompts, outs):
    from engine import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.batch_size,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False)
    sp = lambda m: SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": prompts[0][:32]}], sp(4))  # warm-up
    t = time.perf_counter()
    res = llm.generate([{"prompt_token_ids": p} for p in prompts], [sp(m) for m in outs])
    dt = time.perf_counter() - t
    got = [len(r.outputs[0].token_ids) for r in res]
    assert got == outs, "engine produced the wrong number of tokens"
    del llm
    return dt, [r.outputs[0].token_ids for r in res]


def load_hf(args, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype), **kw).eval()


def run_hf_static(args, prompts, outs):
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
    results = []
    for i in range(0, len(prompts), args.batch_size):
        ps, os_ = prompts[i:i + args.batch_size], outs[i:i + args.batch_size]
        gen = batch_generate(ps, max(os_))
        results += [gen[j, :os_[j]].tolist() for j in range(len(ps))]
    dt = time.perf_counter() - t
    del model
    return dt, results


def run_hf_cb(args, prompts, outs):
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = load_hf(args)
    gen_cfg = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=max(outs))
    cb_cfg = ContinuousBatchingConfig(max_requests_per_batch=args.batch_size)
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
    results = [list(done[i].generated_tokens) for i in ids]
    del model, manager
    return dt, results


SYSTEMS = {"ours": run_ours, "hf-generate (static)": run_hf_static, "hf-generate_batch (CB)": run_hf_cb}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/bench-llama-150m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32, help="max sequences per batch, all systems")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--prompt-len", default="32,512")
    ap.add_argument("--output-len", default="16,256")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    pmin, pmax = map(int, args.prompt_len.split(","))
    omin, omax = map(int, args.output_len.split(","))
    prompts, outs = workload(args.num_requests, vocab, args.seed, pmin, pmax, omin, omax)
    total_out = sum(outs)
    print(f"model={args.model} dtype={args.dtype} requests={len(prompts)} "
          f"prompt_tokens={sum(map(len, prompts))} output_tokens={total_out} batch={args.batch_size} "
          f"cpu_cores={os.cpu_count()} torch_threads={torch.get_num_threads()}", flush=True)
    rows = {}
    tokens = {}
    for name in args.systems.split(","):
        dt, toks = SYSTEMS[name](args, prompts, outs)
        rows[name] = total_out / dt
        tokens[name] = toks
        print(f"  {name:<24} {dt:8.1f} s  {rows[name]:8.1f} out tok/s", flush=True)
        gc.collect()
    print()
    print("| system | output tokens/s | ours / system |")
    print("|---|---:|---:|")
    for name, tps in rows.items():
        ratio = rows["ours"] / tps if "ours" in rows else float("nan")
        print(f"| {name} | {tps:.1f} | {ratio:.2f}x |")
    peers = [v for k, v in rows.items() if k != "ours"]
    if "ours" in rows and peers:
        print(f"\nours vs the faster transformers path: {rows['ours'] / max(peers):.2f}x")
    if "ours" in tokens and "hf-generate (static)" in tokens:
        same = sum(a == b for a, b in zip(tokens["ours"], tokens["hf-generate (static)"]))
        print(f"greedy outputs identical to static generate: {same}/{len(outs)} (bfloat16; padding and "
              f"batch shape change rounding, so a few may differ)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
