"""Where one offline matrix cell's time goes: our engine only, sampled with py-spy.

    pip install py-spy
    python scripts/profile_engine.py --model models/bench-llama-150m --batch 16 --prompt-lens 256,1024 \\
        --output-lens 128,256 --requests 16

Builds the cell's workload exactly as ``scripts/bench_engine.py`` does (same seed, same lengths), runs
``LLM.generate`` once to warm up, then attaches py-spy to this process for the timed ``generate`` only
and sorts every sample by the innermost frame of ours or torch's that it is in: the linear layers
(GEMMs, the LM head included), decode attention (the native kernel), the rest of attention (K/V
writes, prefill SDPA), the fused elementwise ops, sampling, the runner's input preparation, the
scheduler and KV bookkeeping, and the rest (the Python of the layer and model forward). Prints a
markdown table with seconds and shares.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_engine import Cell, workload  # noqa: E402  (same directory)

# (category, file name suffix, function names or None for any); the innermost matching frame wins.
RULES = [
    ("linear layers (GEMMs, LM head included)", "cpu_linear.py", None),
    ("linear layers (GEMMs, LM head included)", "cpu_kernels.py", {"SmallGemmKernel.__call__"}),
    ("linear layers (GEMMs, LM head included)", "fused_layers.py", {"FusedProjection.__call__"}),
    ("linear layers (GEMMs, LM head included)", "torch/nn/modules/linear.py", None),
    ("fused elementwise ops (norms, rotary, SiLU)", "cpu_kernels.py",
     {f"FusedOps.{f}" for f in ("rms_norm", "rotary", "silu_mul", "_rows")}),
    ("sampling", "sampler.py", None),
    ("runner: inputs, metadata", "model_runner.py", {f"ModelRunner.{f}" for f in (
        "prepare", "_prefill_batch", "_decode_group", "_padded_tables", "_slots", "copy_blocks")}),
    ("scheduler, KV manager, bookkeeping", "scheduler.py", None),
    ("scheduler, KV manager, bookkeeping", "kv_cache_manager.py", None),
    ("scheduler, KV manager, bookkeeping", "block_pool.py", None),
    ("scheduler, KV manager, bookkeeping", "llm_engine.py", None),
    ("scheduler, KV manager, bookkeeping", "sequence.py", None),
    ("scheduler, KV manager, bookkeeping", "detokenizer.py", None),
]
DECODE_KERNEL = "decode attention (native kernel)"
ATTENTION_REST = "attention: K/V writes, prefill SDPA"
REST = "rest of the forward (layer and model Python)"


def parse_frame(frame: str) -> tuple[str, str]:
    """``'func (path/file.py:12)'`` -> (func, path)."""
    func, _, loc = frame.rpartition(" (")
    return func, loc.rsplit(":", 1)[0]


def classify(stack: list[str]) -> str:
    """The category of one sample, from its frames (outermost first; py-spy names functions by
    their qualified names, ``Class.method``)."""
    for frame in reversed(stack):
        func, path = parse_frame(frame)
        if path.endswith("cpu_kernels.py") and func == "PagedDecodeKernel.__call__":
            return DECODE_KERNEL
        if path.endswith("attention.py") and func == "paged_attention":
            return ATTENTION_REST
        for name, suffix, funcs in RULES:
            if path.endswith(suffix) and (funcs is None or func in funcs):
                return name
        if path.endswith("model_runner.py"):  # inside the forward, in none of the above
            return REST
    return RULES[-1][0]  # the engine's own loop around the step


def read_raw(path: Path) -> collections.Counter:
    """py-spy's raw (collapsed) output -> samples per category."""
    counts: collections.Counter = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [f for f in stack.split(";") if " (" in f]
        if not any(parse_frame(f)[0] == "LLM.generate" and parse_frame(f)[1].endswith("llm.py") for f in frames):
            continue  # other threads (none expected offline) or py-spy's own start-up
        counts[classify(frames)] += int(n)
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/bench-llama-150m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-lens", default="256,1024")
    ap.add_argument("--output-lens", default="128,256")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-name", default="long", help="the cell's prompt range name (part of its seed)")
    ap.add_argument("--output-name", default="long", help="the cell's output range name (part of its seed)")
    args = ap.parse_args(argv)

    from transformers import AutoConfig

    from engine import LLM, SamplingParams

    plo, phi = map(int, args.prompt_lens.split(","))
    olo, ohi = map(int, args.output_lens.split(","))
    cell = Cell(args.batch, (args.prompt_name, plo, phi), (args.output_name, olo, ohi), args.requests)
    prompts, outs = workload(cell, AutoConfig.from_pretrained(args.model).vocab_size, args.seed)
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.batch)
    sp = lambda m: SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": prompts[0][:32]}], sp(4))  # warm-up, as bench_engine

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "profile.txt"
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(os.getpid()), "--rate", str(args.rate),
                                "--format", "raw", "--output", str(raw), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # py-spy attaches
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts], [sp(m) for m in outs])
        wall = time.perf_counter() - t
        spy.send_signal(signal.SIGINT)
        _, err = spy.communicate(timeout=60)
        if not raw.exists():
            raise SystemExit(f"py-spy wrote nothing: {err.decode()[-500:]}")
        counts = read_raw(raw)
    total = sum(counts.values())
    if not total:
        raise SystemExit("no samples inside generate")
    print(f"{cell.label}: {wall:.1f} s, {sum(outs) / wall:.1f} output tok/s, {total} samples")
    print("| where | seconds | share |\n|---|---:|---:|")
    for name, n in counts.most_common():
        print(f"| {name} | {wall * n / total:.2f} | {100 * n / total:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
