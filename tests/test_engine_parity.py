"""Greedy parity with transformers ``generate`` under every scheduling situation, and logprobs."""

import random

import pytest
import torch
from conftest import hf_greedy

from engine import SamplingParams

KINDS = ["llama", "qwen2", "qwen3", "mistral"]  # mistral: sliding window 24 is exercised


def greedy(max_tokens):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def random_prompts(n, lo, hi, vocab, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def assert_parity(hf_model, prompts, outs, max_tokens):
    for i, (p, o) in enumerate(zip(prompts, outs)):
        mt = max_tokens[i] if isinstance(max_tokens, list) else max_tokens
        assert o.outputs[0].token_ids == hf_greedy(hf_model, p, mt), f"prompt {i} diverged"
        assert o.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("kind", KINDS)
def test_single_request(kind, make_llm, hf_reference):
    hf, tok = hf_reference(kind)
    llm = make_llm(kind)
    prompt = "The quick brown fox jumps over the lazy dog."
    out = llm.generate(prompt, greedy(48))[0]
    ids = tok.encode(prompt)
    assert out.prompt_token_ids == ids
    assert out.outputs[0].token_ids == hf_greedy(hf, ids, 48)
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("kind,backend", [(k, "auto") for k in KINDS] + [("llama", "torch"), ("mistral", "torch")]
                         + [("llama", "unfused"), ("qwen3", "unfused")])
def test_sixteen_concurrent_mixed_lengths(kind, backend, make_llm, hf_reference):
    """``auto`` is the native CPU decode kernel here; ``torch`` the gather path CUDA uses;
    ``unfused`` transformers' own layer forward instead of engine/fused_layers.py's."""
    hf, tok = hf_reference(kind)
    fuse = backend != "unfused"
    llm = make_llm(kind, max_num_seqs=16, attention_backend="auto" if not fuse else backend, fuse_layers=fuse)
    assert (llm.engine.runner.decode_kernel is not None) == (backend != "torch")
    assert llm.engine.runner.fused_layers == (hf.config.num_hidden_layers if fuse else 0)
    prompts = random_prompts(16, 3, 120, len(tok), seed=1)
    rng = random.Random(2)
    lens = [rng.randint(4, 40) for _ in prompts]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [greedy(m) for m in lens])
    assert [len(o.outputs[0].token_ids) for o in outs] == lens
    assert_parity(hf, prompts, outs, lens)


@pytest.mark.parametrize("kind", KINDS[:3])
def test_chunked_prefill_small_budget(kind, make_llm, hf_reference):
    hf, tok = hf_reference(kind)
    llm = make_llm(kind, max_num_batched_tokens=16)
    prompts = random_prompts(4, 40, 90, len(tok), seed=3)
    eng = llm.engine
    chunked = []
    orig = eng.scheduler.schedule

    def spy():
        out = orig()
        chunked.extend(s for s in out.scheduled if s.num_new_tokens > 1 and not s.completes)
        assert out.num_batched_tokens <= 16
        return out

    eng.scheduler.schedule = spy
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(20))
    assert chunked, "no prompt was split into chunks"
    assert_parity(hf, prompts, outs, 20)


@pytest.mark.parametrize("kind", KINDS[:3])
def test_preemption_by_recompute(kind, make_llm, hf_reference):
    hf, tok = hf_reference(kind)
    # 24 blocks of 16 tokens; 8 requests of ~50 prompt + 40 output need ~48 blocks.
    llm = make_llm(kind, num_kv_blocks=24, max_model_len=256, enable_prefix_caching=False)
    prompts = random_prompts(8, 40, 60, len(tok), seed=4)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(40))
    assert llm.engine.scheduler.num_preemptions > 0
    assert_parity(hf, prompts, outs, 40)


@pytest.mark.parametrize("kind", KINDS[:3])
def test_prefix_cache_hits_on_shared_system_prompt(kind, make_llm, hf_reference):
    hf, tok = hf_reference(kind)
    llm = make_llm(kind)
    system = random_prompts(1, 70, 70, len(tok), seed=5)[0]
    tails = random_prompts(6, 2, 30, len(tok), seed=6)
    prompts = [system + t for t in tails]
    first = llm.generate({"prompt_token_ids": prompts[0]}, greedy(16))
    rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], greedy(16))
    stats = llm.engine.stats()
    assert stats["prefix_cache_hits"] >= 5 * 64  # 4 full blocks of the system prompt, 5 times
    assert all(o.num_cached_tokens == 64 for o in rest)
    assert_parity(hf, prompts, first + rest, 16)


@pytest.mark.parametrize("kind", KINDS[:3])
def test_logprobs_match_hf_log_softmax(kind, make_llm, hf_reference):
    hf, tok = hf_reference(kind)
    llm = make_llm(kind)
    prompt = random_prompts(1, 20, 20, len(tok), seed=7)[0]
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5))[0]
    gen = out.outputs[0].token_ids
    full = torch.tensor([prompt + gen])
    with torch.inference_mode():
        ref = torch.log_softmax(hf(full).logits[0].float(), dim=-1)
    for step, lp in enumerate(out.outputs[0].logprobs):
        row = ref[len(prompt) - 1 + step]
        assert gen[step] in lp
        assert set(row.topk(5).indices.tolist()) <= set(lp)
        for tok_id, value in lp.items():
            assert abs(value - row[tok_id].item()) < 1e-4


def test_amx_linears_give_the_native_tokens(make_llm):
    """bfloat16 on a CPU with AMX: the small-batch GEMM kernel (decode steps, short prefills) gives
    the same greedy tokens as plain F.linear for concurrent requests of mixed lengths."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if not caps.get("amx_bf16"):
        pytest.skip("this CPU has no AMX-BF16")
    from engine.cpu_linear import SmallBatchLinear

    amx = make_llm("llama", dtype="bfloat16", max_num_seqs=8, cpu_linear="amx")
    native = make_llm("llama", dtype="bfloat16", max_num_seqs=8, cpu_linear="native")
    assert amx.engine.runner.linear_mode == "amx" and native.engine.runner.linear_mode == "native"
    assert any(isinstance(m, SmallBatchLinear) for m in amx.engine.runner.model.modules())
    prompts = random_prompts(12, 3, 60, 500, seed=5)
    lens = [random.Random(i).randint(4, 30) for i in range(len(prompts))]
    got = amx.generate([{"prompt_token_ids": p} for p in prompts], [greedy(m) for m in lens])
    want = native.generate([{"prompt_token_ids": p} for p in prompts], [greedy(m) for m in lens])
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_fused_layers_in_bfloat16_follow_the_module_forward(kind, make_llm):
    """bfloat16, where the fused path also joins q/k/v and gate/up into one GEMM each: prompt
    logprobs (every position of 6 prompts, so every layer's output at prefill sizes) stay within
    bfloat16 rounding of transformers' module forward. Greedy tokens of random-weight models can
    part at near-ties after a few steps in bfloat16, so the values are compared, not the tokens."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    prompts = [{"prompt_token_ids": p} for p in random_prompts(6, 20, 90, 500, seed=9)]
    fused = make_llm(kind, dtype="bfloat16", max_num_seqs=8, fuse_layers=True)
    plain = make_llm(kind, dtype="bfloat16", max_num_seqs=8, fuse_layers=False)
    assert fused.engine.runner.fused_layers > 0 and plain.engine.runner.fused_layers == 0
    diffs = []
    for a, b in zip(fused.generate(prompts, params), plain.generate(prompts, params)):
        for da, db in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            ((ta, va),), ((tb, vb),) = da.items(), db.items()
            assert ta == tb  # the prompt token itself
            diffs.append(abs(va - vb))
    assert max(diffs) < 0.1 and sum(diffs) / len(diffs) < 0.02, (max(diffs), sum(diffs) / len(diffs))


def test_start_up_warm_up_leaves_nothing_behind(make_llm, hf_reference):
    """The warm-up batch runs at start-up, then the engine starts empty: every block free, no
    prefix-cache entry or query counted, the KV cache zeroed, and greedy tokens unchanged."""
    hf, _ = hf_reference("llama")
    llm = make_llm("llama", max_num_seqs=8)
    eng = llm.engine
    assert eng.warmup_sequences == 8
    stats = eng.stats()
    assert stats["num_free_blocks"] == stats["num_kv_blocks"] and stats["prefix_cache_queries"] == 0
    assert all(not kv.any() for kv in eng.runner.kv_caches)
    cold = make_llm("llama", max_num_seqs=8, warmup=False)
    assert cold.engine.warmup_sequences == 0
    prompts = random_prompts(4, 5, 40, 500, seed=11)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(12))
    assert_parity(hf, prompts, outs, 12)
