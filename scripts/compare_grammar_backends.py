"""Measure the two grammar libraries the engine could use for constrained decoding, here.

    python scripts/compare_grammar_backends.py [--tokenizer models/bench-llama-serve] [--big-vocab 32000]

For xgrammar and llguidance, on this machine and our tokenizers: tokenizer set-up time, the
compile time of a 20-field JSON schema (cold, and again from the library's cache), and the
per-token cost of the work a decode step adds per constrained sequence (fill the next-token
bitmask, apply it to a float32 logits row, accept the token), driving both through the same
valid JSON instance token by token. Prints one table; the README records why the engine uses
the winner.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def schema_20() -> tuple[dict, dict]:
    """A 20-field object schema (strings, integers, numbers, booleans, an enum, an array, a
    nested object) and one valid instance of it."""
    props: dict = {}
    inst: dict = {}
    kinds = ["string", "integer", "number", "boolean"]
    for i in range(16):
        k = kinds[i % 4]
        props[f"field_{i}"] = {"type": k}
        inst[f"field_{i}"] = {"string": f"value {i}", "integer": i * 7, "number": i / 4,
                              "boolean": i % 2 == 0}[k]
    props["color"] = {"enum": ["red", "green", "blue"]}
    inst["color"] = "green"
    props["tags"] = {"type": "array", "items": {"type": "string"}, "maxItems": 4}
    inst["tags"] = ["a", "bc"]
    props["point"] = {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                      "required": ["x", "y"], "additionalProperties": False}
    inst["point"] = {"x": 1.5, "y": -2}
    props["note"] = {"type": ["string", "null"]}
    inst["note"] = None
    schema = {"type": "object", "properties": props, "required": list(props),
              "additionalProperties": False}
    return schema, inst


def big_tokenizer(vocab: int):
    """A byte-level BPE trained here with a larger vocabulary (real models have 32k-150k)."""
    from make_tiny_models import corpus, train_tokenizer  # noqa: F401  (scripts/ on sys.path)
    return train_tokenizer(vocab)


def run_xgrammar(tok, vocab_size: int, schema: str, ids: list[int]) -> dict:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size)
    compiler = xgr.GrammarCompiler(info, max_threads=2)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    cg = compiler.compile_json_schema(schema, strict_mode=True)
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiler.compile_json_schema(schema, strict_mode=True)
    t_cached = time.perf_counter() - t0
    m = xgr.GrammarMatcher(cg)
    mask = xgr.allocate_token_bitmask(1, vocab_size)
    logits = torch.randn(1, vocab_size)
    per = []
    for t in ids:
        s = time.perf_counter()
        m.fill_next_token_bitmask(mask, 0)
        xgr.apply_token_bitmask_inplace(logits, mask)
        ok = m.accept_token(t)
        per.append(time.perf_counter() - s)
        assert ok, "xgrammar rejected a token of a valid instance"
    return {"tokenizer_s": t_tok, "compile_s": t_compile, "cached_s": t_cached, "per_token": per}


def run_llguidance(tok, vocab_size: int, schema: str, ids: list[int]) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab_size)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    llguidance.LLMatcher.validate_grammar(grammar, lltok)
    m = llguidance.LLMatcher(lltok, grammar)
    t_compile = time.perf_counter() - t0
    t_cached = t_compile  # no separate compile step to cache: matchers are built lazily
    mask = lt.allocate_token_bitmask(1, vocab_size)
    logits = torch.randn(1, vocab_size)
    per = []
    for t in ids:
        s = time.perf_counter()
        lt.fill_next_token_bitmask(m, mask, 0)
        lt.apply_token_bitmask_inplace(logits, mask)
        ok = m.consume_token(t)
        per.append(time.perf_counter() - s)
        assert ok, f"llguidance rejected a token of a valid instance: {m.get_error()}"
    return {"tokenizer_s": t_tok, "compile_s": t_compile, "cached_s": t_cached, "per_token": per}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default="models/bench-llama-serve")
    ap.add_argument("--big-vocab", type=int, default=32000, help="also a tokenizer trained with this vocab (0: skip)")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    torch.set_num_threads(1)
    schema, inst = schema_20()
    text = json.dumps(schema)
    toks = [("ours", AutoTokenizer.from_pretrained(args.tokenizer))]
    if args.big_vocab:
        toks.append((f"trained {args.big_vocab}", big_tokenizer(args.big_vocab)))
    print("| tokenizer (vocab) | library | tokenizer set-up ms | 20-field schema compile ms | "
          "again (cached) ms | per token p50 us | per token mean us |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, tok in toks:
        vocab = len(tok)
        ids = tok.encode(json.dumps(inst), add_special_tokens=False)
        for name, fn in (("xgrammar", run_xgrammar), ("llguidance", run_llguidance)):
            fn(tok, vocab, text, ids)  # warm the library (first-call set-up) before timing
            r = fn(tok, vocab, text, ids)
            print(f"| {label} ({vocab}) | {name} | {r['tokenizer_s'] * 1e3:.1f} | {r['compile_s'] * 1e3:.1f} | "
                  f"{r['cached_s'] * 1e3:.2f} | {statistics.median(r['per_token']) * 1e6:.0f} | "
                  f"{statistics.mean(r['per_token']) * 1e6:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
