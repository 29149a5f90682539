"""One-GPU benchmark: this engine against transformers continuous batching on the same model, plus
our batch-1 decode step against the memory-bandwidth floor, all in one run.

    python scripts/make_tiny_models.py --out models --kinds '' --shape qwen2.5-0.5b
    python scripts/bench_gpu.py --model models/qwen2.5-0.5b-random --json /tmp/bench-gpu.json
    python scripts/bench_gpu.py --device cpu --model models/tiny-llama --batches 1,2 --quick  # smoke run

Workloads (token ids drawn at random with a fixed seed, greedy, EOS ignored, every request asks
for the same number of tokens):
- decode at each ``--batches`` size B: B requests of ``--prompt-len`` tokens that each generate
  ``--output-len`` tokens, all admitted at once (both systems run at most B sequences). Output
  tokens/s = B x output-len / wall time; the short prompts keep prefill a small share of it.
- prefill: ``--prefill-requests`` prompts of ``--prefill-len`` tokens, one output token each;
  prompt tokens/s = requests x prefill-len / wall time.

Systems (each warmed up with the cell's own batch size first, on other prompts, so no prefix-cache
hit helps the timed run):
- ours: ``engine.LLM(model, dtype, device, max_num_seqs=B)``, other settings at their defaults
  (``--engine-opt key=value`` to change one), one ``generate`` call.
- transformers CB: ``model.continuous_batching_context_manager`` (what ``generate_batch`` runs)
  with ``max_requests_per_batch=B``; its attention is ``--hf-attn`` (transformers switches sdpa
  to flash attention itself where flash-attn is installed), paged KV, and its CUDA-graph setting
  per ``--hf-graphs``: ``auto`` (transformers' own choice: on with flash attention, off with
  sdpa) and ``on`` (forced), each a column; the ratio is against the faster. On CPU there are no
  graphs, so only ``auto`` runs.

Bandwidth floor of one decode step at batch 1: bytes read per step (every weight once, the input
embedding table only if untied, plus the KV of the mean context, prompt-len + output-len / 2) over
the device's copy bandwidth, measured as 2 x bytes / time of a large tensor copy (read + write).
Our step time is (t(output-len) - t(1)) / (output-len - 1) on one batch-1 engine.

Prints a markdown table (device name first) and, with ``--json``, writes every figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OURS = "ours"
HF = "transformers CB"


@dataclass(frozen=True)
class Cell:
    """One workload: ``batch`` is the most sequences a system may run at once."""

    name: str
    batch: int
    prompts: list[list[int]]
    warmup: list[list[int]]
    max_tokens: int
    prefill: bool = False

    @property
    def tokens(self) -> int:
        """Tokens the cell's rate counts: outputs for decode, prompt tokens for prefill."""
        if self.prefill:
            return sum(len(p) for p in self.prompts)
        return len(self.prompts) * self.max_tokens


@dataclass
class Row:
    """Tokens/s of one cell for every system that ran it."""

    cell: str
    tok_s: dict[str, float] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)


def random_prompts(n: int, length: int, vocab: int, seed: str) -> list[list[int]]:
    """``n`` seeded prompts of ``length`` ids in [3, vocab) (low ids are often special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def decode_cell(args, batch: int) -> Cell:
    return Cell(f"decode b={batch}", batch, random_prompts(batch, args.prompt_len, args.vocab, f"decode|{batch}"),
                random_prompts(batch, args.prompt_len, args.vocab, f"warm|{batch}"), args.output_len)


def make_cells(args) -> list[Cell]:
    """A decode cell per batch size, then the prefill cell."""
    n, plen = args.prefill_requests, args.prefill_len
    prefill = Cell(f"prefill {n}x{plen}", min(n, 256), random_prompts(n, plen, args.vocab, "prefill"),
                   random_prompts(min(n, 4), plen, args.vocab, "warm|prefill"), 1, prefill=True)
    return [decode_cell(args, b) for b in args.batches] + [prefill]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def copy_bandwidth(device: str, nbytes: int, repeats: int = 5, copies: int = 10) -> float:
    """Bytes/s of a device-to-device tensor copy, counting the bytes read and the bytes written."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)  # ones: every page is touched
    dst = torch.zeros_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        for _ in range(copies):
            dst.copy_(src)
        sync(device)
        best = min(best, (time.perf_counter() - t) / copies)
    del src, dst
    free_memory(device)
    return 2 * nbytes / best


def bytes_per_decode_step(model: str, dtype: torch.dtype, context: float) -> tuple[int, int]:
    """(weight bytes, KV bytes) one batch-1 decode step must read at a mean ``context`` length.

    Weights from the model built on the meta device (no memory): every parameter once (a tied
    embedding counts once, read as the LM head); an untied input embedding is read one row a step.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    weight = sum(p.numel() * p.element_size() for p in net.parameters())
    emb, out = net.get_input_embeddings().weight, net.get_output_embeddings().weight
    if emb is not out:
        weight -= (emb.shape[0] - 1) * emb.shape[1] * emb.element_size()
    text = cfg.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    window = getattr(text, "sliding_window", None)
    ctx = min(context, window) if window else context
    per_token = text.num_hidden_layers * 2 * kv_heads * head_dim * torch.finfo(dtype).bits // 8
    return weight, int(per_token * ctx)


def parse_engine_opts(items: list[str]) -> dict:
    """``key=value`` pairs; values parsed as JSON where they parse (numbers, true/false, null)."""
    opts = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            opts[key] = json.loads(raw)
        except json.JSONDecodeError:
            opts[key] = raw
    return opts


def run_ours(args, cell: Cell, probe_step: bool) -> tuple[float, float | None]:
    """Seconds of the timed ``generate``; with ``probe_step``, also seconds per decode step."""
    from engine import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device=args.device, max_num_seqs=cell.batch, **args.engine_opts)
    try:
        sp = lambda m: SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, detokenize=False)
        llm.generate([{"prompt_token_ids": p} for p in cell.warmup], sp(min(4, cell.max_tokens)))
        seconds = timed_generate(args, llm, cell.prompts, sp(cell.max_tokens), cell.max_tokens)
        step = None
        if probe_step and cell.max_tokens > 1:
            # The same engine, one prompt of the same length not seen before, one token: prefill only.
            one = random_prompts(1, len(cell.prompts[0]), args.vocab, "probe")
            step = (seconds - timed_generate(args, llm, one, sp(1), 1)) / (cell.max_tokens - 1)
        return seconds, step
    finally:
        del llm
        free_memory(args.device)


def timed_generate(args, llm, prompts, params, want: int) -> float:
    sync(args.device)
    t = time.perf_counter()
    res = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    sync(args.device)
    seconds = time.perf_counter() - t
    if any(len(r.outputs[0].token_ids) != want for r in res):
        raise RuntimeError("the engine produced the wrong number of tokens")
    return seconds


class HFRunner:
    """transformers continuous batching on one model loaded once; a fresh manager per cell."""

    def __init__(self, args):
        from transformers import AutoModelForCausalLM

        self.args = args
        self.model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=getattr(torch, args.dtype), attn_implementation=args.hf_attn).to(args.device).eval()

    def run(self, cell: Cell, graphs: str) -> tuple[float, str]:
        """Seconds of the timed cell, and what transformers resolved (attention, graphs)."""
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        args = self.args
        page = args.cb_page_size or 256
        per_seq = -(-(len(cell.prompts[0]) + cell.max_tokens) // page) + 1
        opts = dict(max_requests_per_batch=cell.batch, num_blocks=int(per_seq * cell.batch * 1.25) + 4)
        if args.cb_page_size:
            opts["page_size"] = args.cb_page_size
        if args.cb_max_batch_tokens:
            opts["max_batch_tokens"] = args.cb_max_batch_tokens
        if graphs == "on":
            opts["use_cuda_graph"] = True
        gen = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=cell.max_tokens)
        with self.model.continuous_batching_context_manager(
                generation_config=gen, continuous_batching_config=ContinuousBatchingConfig(**opts),
                block=True, timeout=30, warmup=True, workload_hints=self._hints(cell)) as manager:
            resolved = (f"attn={self.model.config._attn_implementation} "
                        f"graphs={getattr(manager.continuous_batching_config, 'use_cuda_graph', '?')}")
            self._serve(manager, cell.warmup, min(4, cell.max_tokens))
            sync(args.device)
            t = time.perf_counter()
            self._serve(manager, cell.prompts, cell.max_tokens)
            sync(args.device)
            seconds = time.perf_counter() - t
        free_memory(args.device)
        return seconds, resolved

    def _hints(self, cell: Cell):
        try:  # sizing hints as generate_batch gives them; absent from some transformers versions
            from transformers.generation.continuous_batching.utils import WorkloadHints
        except ImportError:
            return None
        return WorkloadHints(max_prompt_length=max(len(p) for p in cell.prompts),
                             max_generated_length=cell.max_tokens, num_requests=len(cell.prompts))

    def _serve(self, manager, prompts: list[list[int]], max_new: int) -> None:
        ids = [manager.add_request(p, max_new_tokens=max_new) for p in prompts]
        done, deadline = {}, time.monotonic() + self.args.cell_timeout
        while len(done) < len(ids):
            r = manager.get_result(timeout=1)
            if r is None:
                if not manager.is_running() or time.monotonic() > deadline:
                    raise RuntimeError("transformers continuous batching stopped or timed out")
            elif r.is_finished():
                done[r.request_id] = r
        if any(len(done[i].generated_tokens) != max_new for i in ids):
            raise RuntimeError("transformers continuous batching produced the wrong number of tokens")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def print_report(args, rows: list[Row], systems: list[str], floor: dict) -> None:
    import transformers

    print(f"\n## {device_name(args.device)}\n")
    print(f"model `{args.model}`, {args.dtype}, device {args.device}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; decode: prompts of {args.prompt_len} tokens, "
          f"{args.output_len} output tokens each; greedy, EOS ignored\n")
    peers = [s for s in systems if s != OURS]
    ratio_col = OURS in systems and bool(peers)
    print("| workload | " + " | ".join(f"{s} tok/s" for s in systems)
          + (" | ours / transformers |" if ratio_col else " |"))
    print("|---|" + "---:|" * (len(systems) + ratio_col))
    for row in rows:
        cells = [f"{row.tok_s[s]:.1f}" if s in row.tok_s else "failed" for s in systems]
        done = [row.tok_s[p] for p in peers if p in row.tok_s]
        if ratio_col:
            cells.append(f"**{row.tok_s[OURS] / max(done):.2f}x**" if OURS in row.tok_s and done else "-")
        print(f"| {row.cell} | " + " | ".join(cells) + " |")
    print()
    for row in rows:  # what transformers resolved (attention, graphs), and any failure
        if row.info:
            print(f"- {row.cell}: " + "; ".join(f"{k}: {v}" for k, v in row.info.items()))
    print()
    if floor:
        print("| batch-1 decode step | ms |\n|---|---:|")
        if floor.get("step_s") is not None:
            print(f"| ours, per step | {floor['step_s'] * 1e3:.3f} |")
        print(f"| bandwidth floor: ({floor['weight_bytes'] / 1e6:.1f} MB weights + {floor['kv_bytes'] / 1e6:.2f} MB"
              f" KV) / {floor['bandwidth'] / 1e9:.0f} GB/s copy bandwidth | {floor['floor_s'] * 1e3:.3f} |")
        if floor.get("step_s") is not None:
            print(f"| **ours / floor** | **{floor['step_s'] / floor['floor_s']:.2f}x** |")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/qwen2.5-0.5b-random")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--batches", default="1,32,128,256", help="decode batch sizes, comma list")
    ap.add_argument("--prompt-len", type=int, default=None, help="decode prompts (default 32; --quick 8)")
    ap.add_argument("--output-len", type=int, default=None, help="decode outputs (default 256; --quick 8)")
    ap.add_argument("--prefill-requests", type=int, default=None, help="default 64; --quick 4")
    ap.add_argument("--prefill-len", type=int, default=None, help="default 1024; --quick 32")
    ap.add_argument("--quick", action="store_true", help="small lengths: checks the script, measures little")
    ap.add_argument("--systems", default=f"{OURS},{HF}", help=f"comma list of {OURS!r}, {HF!r}")
    ap.add_argument("--hf-attn", default="sdpa", help="attn_implementation the transformers model loads with")
    ap.add_argument("--hf-graphs", default=None,
                    help="comma list of auto/on: CUDA-graph settings of transformers CB, one column each "
                         "(default auto,on on CUDA, auto on CPU)")
    ap.add_argument("--cb-page-size", type=int, default=None, help="default: transformers' (CPU: 256)")
    ap.add_argument("--cb-max-batch-tokens", type=int, default=None, help="default: transformers' (CPU: 256)")
    ap.add_argument("--engine-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra engine.LLM option, repeatable (values parsed as JSON where they parse)")
    ap.add_argument("--bandwidth-bytes", type=int, default=None, help="copy size (default 1 GiB; --quick 64 MiB)")
    ap.add_argument("--cell-timeout", type=float, default=600.0, help="seconds a transformers cell may take")
    ap.add_argument("--json", default=None, help="write every figure here")
    args = ap.parse_args(argv)
    on_cpu = args.device == "cpu"
    q = args.quick
    args.dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.prompt_len = args.prompt_len or (8 if q else 32)
    args.output_len = args.output_len or (8 if q else 256)
    args.prefill_requests = args.prefill_requests or (4 if q else 64)
    args.prefill_len = args.prefill_len or (32 if q else 1024)
    args.bandwidth_bytes = args.bandwidth_bytes or (64 << 20 if q else 1 << 30)
    args.hf_graphs = [g for g in (args.hf_graphs or ("auto" if on_cpu else "auto,on")).split(",") if g]
    if on_cpu:
        if "on" in args.hf_graphs:
            print("note: no CUDA graphs on CPU; running transformers CB with graphs=auto only", file=sys.stderr)
        args.hf_graphs = ["auto"]
        args.cb_page_size = args.cb_page_size or 256
        args.cb_max_batch_tokens = args.cb_max_batch_tokens or 256
    args.engine_opts = parse_engine_opts(args.engine_opt)
    args.systems = [s for s in args.systems.split(",") if s]
    if unknown := set(args.systems) - {OURS, HF}:
        ap.error(f"unknown systems {sorted(unknown)}")
    return args


def run_systems(args, cells: list[Cell], columns: list[str]) -> tuple[list[Row], float | None]:
    """Every cell on every system, ours first; a failing cell is recorded, not fatal."""
    rows = [Row(c.name) for c in cells]
    step = None
    if OURS in columns:
        for cell, row in zip(cells, rows):
            try:
                seconds, probe = run_ours(args, cell, probe_step=cell.batch == 1 and not cell.prefill)
            except Exception as e:  # one broken cell must not lose the others
                row.info[OURS] = f"failed: {type(e).__name__}: {e}"
                log(f"{cell.name:<20} {OURS:<26} {row.info[OURS]}")
                continue
            step = probe if probe is not None else step
            row.tok_s[OURS] = cell.tokens / seconds
            log(f"{cell.name:<20} {OURS:<26} {seconds:8.2f} s {row.tok_s[OURS]:10.1f} tok/s")
        if step is None and 1 not in args.batches:  # the floor row still wants our batch-1 step
            step = run_ours(args, decode_cell(args, 1), probe_step=True)[1]
    hf_columns = [c for c in columns if c != OURS]
    if hf_columns:
        hf = HFRunner(args)
        for graphs, name in zip(args.hf_graphs, hf_columns):
            for cell, row in zip(cells, rows):
                try:
                    seconds, resolved = hf.run(cell, graphs)
                except Exception as e:
                    row.info[name] = f"failed: {type(e).__name__}: {e}"
                    log(f"{cell.name:<20} {name:<26} {row.info[name]}")
                    free_memory(args.device)
                    continue
                row.tok_s[name] = cell.tokens / seconds
                row.info[name] = resolved
                log(f"{cell.name:<20} {name:<26} {seconds:8.2f} s {row.tok_s[name]:10.1f} tok/s  ({resolved})")
        del hf
        free_memory(args.device)
    return rows, step


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoConfig

    torch.manual_seed(0)
    args.vocab = AutoConfig.from_pretrained(args.model).get_text_config().vocab_size
    columns = ([OURS] if OURS in args.systems else []) + (
        [HF if g == "auto" else f"{HF} +graphs" for g in args.hf_graphs] if HF in args.systems else [])
    rows, step = run_systems(args, make_cells(args), columns)
    dtype = getattr(torch, args.dtype)
    weight, kv = bytes_per_decode_step(args.model, dtype, args.prompt_len + args.output_len / 2)
    bandwidth = copy_bandwidth(args.device, args.bandwidth_bytes)
    floor = dict(weight_bytes=weight, kv_bytes=kv, bandwidth=bandwidth, floor_s=(weight + kv) / bandwidth,
                 step_s=step)
    print_report(args, rows, columns, floor)
    if args.json:
        out = dict(device=device_name(args.device), model=args.model, dtype=args.dtype, floor=floor,
                   rows=[dict(cell=r.cell, tok_s=r.tok_s, info=r.info) for r in rows])
        Path(args.json).write_text(json.dumps(out, indent=1))
    failed = any(v.startswith("failed") for r in rows for v in r.info.values())
    return 1 if failed else 0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
