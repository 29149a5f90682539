"""Prompt logprobs (``SamplingParams.prompt_logprobs``) equal transformers' float32 log_softmax,
whatever the scheduling: one chunk, many chunks, a cached prefix, preemption, n > 1, max_tokens=0."""

from __future__ import annotations

import random

import pytest
import torch

from engine import InvalidParameter, SamplingParams
from engine.model_runner import PROMPT_LOGPROB_SLICE

KINDS = ["llama", "qwen2", "qwen3"]
ATOL = 1e-4


def random_prompts(n, lo, hi, vocab, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def reference(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] float32 log_softmax of transformers' logits for the whole prompt."""
    with torch.inference_mode():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def check(out, ref: torch.Tensor, k: int) -> None:
    """Every prompt position once, in order, each entry as transformers computes it."""
    ids = out.prompt_token_ids
    lps, ranks = out.prompt_logprobs, out.prompt_token_ranks
    assert len(lps) == len(ids) == len(ranks)
    assert lps[0] is None and ranks[0] is None
    for j in range(1, len(ids)):
        row, entry = ref[j - 1], lps[j]
        assert next(iter(entry)) == ids[j], "the prompt token comes first"
        top = row.topk(k).indices.tolist() if k else []
        assert set(entry) == {ids[j], *top}
        for tok, value in entry.items():
            assert abs(value - row[tok].item()) < ATOL, (j, tok)
        assert ranks[j] == int((row > row[ids[j]]).sum()) + 1
        rest = list(entry.values())[1:]  # the top k, most likely first
        assert rest == sorted(rest, reverse=True)


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_logprobs_match_transformers(kind, make_llm, hf_reference):
    hf, tok = hf_reference(kind)
    llm = make_llm(kind)
    # One long prompt (more rows than one LM-head slice), one short, k = 5 and k = 0.
    long = random_prompts(1, PROMPT_LOGPROB_SLICE + 40, PROMPT_LOGPROB_SLICE + 60, len(tok), seed=1)[0]
    short = random_prompts(1, 12, 12, len(tok), seed=2)[0]
    outs = llm.generate([{"prompt_token_ids": long}, {"prompt_token_ids": short}],
                        [SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=5),
                         SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=0)])
    check(outs[0], reference(hf, long), 5)
    check(outs[1], reference(hf, short), 0)
    assert all(len(e) == 1 for e in outs[1].prompt_logprobs[1:])
    # A text prompt: the same, through the tokenizer.
    out = llm.generate("The quick brown fox jumps over the lazy dog.",
                       SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    check(out, reference(hf, out.prompt_token_ids), 2)
    # Without the field nothing is computed or returned.
    plain = llm.generate({"prompt_token_ids": short}, SamplingParams(temperature=0, max_tokens=3))[0]
    assert plain.prompt_logprobs is None and plain.prompt_token_ranks is None
    assert plain.outputs[0].token_ids == outs[1].outputs[0].token_ids


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_prefill_computes_them_chunk_by_chunk(kind, make_llm, hf_reference):
    hf, tok = hf_reference(kind)
    llm = make_llm(kind, max_num_batched_tokens=16)
    eng = llm.engine
    chunks = []
    orig = eng.scheduler.schedule

    def spy():
        out = orig()
        chunks.extend(s for s in out.scheduled if s.num_new_tokens > 1 and not s.completes
                      and s.seq.request.params.prompt_logprobs is not None)
        return out

    eng.scheduler.schedule = spy
    prompts = random_prompts(4, 40, 90, len(tok), seed=3)
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=3),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),  # neighbours without
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=1),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert chunks, "no prompt-logprob prompt was split into chunks"
    check(outs[0], reference(hf, prompts[0]), 3)
    check(outs[2], reference(hf, prompts[2]), 1)
    assert outs[1].prompt_logprobs is None
    # Greedy tokens are those of the same requests without prompt logprobs.
    again = make_llm(kind).generate([{"prompt_token_ids": p} for p in prompts],
                                    SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in again]


@pytest.mark.parametrize("kind", KINDS)
def test_a_cached_prefix_does_not_hide_positions(kind, make_llm, hf_reference):
    hf, tok = hf_reference(kind)
    llm = make_llm(kind)
    system = random_prompts(1, 70, 70, len(tok), seed=5)[0]
    a, b, c = (system + t for t in random_prompts(3, 5, 20, len(tok), seed=6))
    llm.generate({"prompt_token_ids": a}, SamplingParams(max_tokens=2))  # caches the system blocks
    out = llm.generate({"prompt_token_ids": b}, SamplingParams(max_tokens=2, prompt_logprobs=4))[0]
    assert out.num_cached_tokens == 0
    check(out, reference(hf, b), 4)
    # The cache was there (and still is): a request without prompt logprobs hits it.
    assert llm.generate({"prompt_token_ids": c}, SamplingParams(max_tokens=2))[0].num_cached_tokens == 64


@pytest.mark.parametrize("kind", KINDS)
def test_preemption_by_recompute_neither_duplicates_nor_loses(kind, make_llm, hf_reference):
    hf, tok = hf_reference(kind)
    # 24 blocks of 16 tokens, a 32-token budget: prompts are chunked and requests preempted
    # half-way through their prompts, then recomputed from the start.
    llm = make_llm(kind, num_kv_blocks=24, max_model_len=256, max_num_batched_tokens=32,
                   enable_prefix_caching=False)
    eng = llm.engine
    partial = []
    orig = eng.scheduler._preempt

    def spy(victim, out, chosen):
        req = victim.request
        if req.prompt_logprobs is not None and 1 < len(req.prompt_logprobs) < len(req.prompt_token_ids):
            partial.append(victim)
        return orig(victim, out, chosen)

    eng.scheduler._preempt = spy
    prompts = random_prompts(6, 70, 110, len(tok), seed=4)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, prompt_logprobs=2))
    assert eng.scheduler.num_preemptions > 0 and partial, "no request was preempted mid-prompt"
    for p, out in zip(prompts, outs):
        check(out, reference(hf, p), 2)


def test_n_choices_report_them_once(make_llm, hf_reference):
    hf, tok = hf_reference("qwen2")
    llm = make_llm("qwen2", block_size=4)
    prompt = random_prompts(1, 30, 30, len(tok), seed=8)[0]
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True,
                                      prompt_logprobs=2))[0]
    assert len(out.outputs) == 3 and len({tuple(c.token_ids) for c in out.outputs}) > 1
    check(out, reference(hf, prompt), 2)


@pytest.mark.parametrize("kind", KINDS)
def test_max_tokens_zero_prefills_and_finishes_without_tokens(kind, make_llm, hf_reference):
    hf, tok = hf_reference(kind)
    llm = make_llm(kind, max_num_batched_tokens=16)
    prompts = random_prompts(3, 20, 50, len(tok), seed=9)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [SamplingParams(max_tokens=0, prompt_logprobs=1),
                         SamplingParams(max_tokens=0, n=2, prompt_logprobs=0),
                         SamplingParams(max_tokens=0)])  # echo with nothing else: just the prompt
    for p, out in zip(prompts, outs):
        assert out.finished and out.prompt_token_ids == p
        assert [c.index for c in out.outputs] == list(range(len(out.outputs)))
        for c in out.outputs:
            assert c.token_ids == [] and c.text == "" and c.finish_reason == "length"
    assert len(outs[1].outputs) == 2
    check(outs[0], reference(hf, prompts[0]), 1)
    check(outs[1], reference(hf, prompts[1]), 0)
    assert outs[2].prompt_logprobs is None
    # The whole prompt may fill the context when nothing is generated.
    small = make_llm(kind, max_model_len=32)
    whole = random_prompts(1, 32, 32, len(tok), seed=10)[0]
    full = small.generate({"prompt_token_ids": whole}, SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    check(full, reference(hf, whole), 0)


def test_prompt_logprobs_through_the_async_engine(model_dir):
    import asyncio

    from engine import EngineConfig
    from engine.async_engine import AsyncEngine
    from engine.llm_engine import LLMEngine

    eng = AsyncEngine(LLMEngine(EngineConfig(model=str(model_dir / "tiny-llama"), dtype="float32",
                                             num_kv_blocks=64)))

    async def run():
        return [o async for o in eng.generate("stream me the prompt", SamplingParams(max_tokens=3, prompt_logprobs=1))]

    try:
        outs = asyncio.run(run())
    finally:
        eng.shutdown()
    # The first output already carries every prompt position (the prompt is prefilled by then).
    assert len(outs[0].prompt_logprobs) == len(outs[0].prompt_token_ids)
    assert outs[-1].finished and outs[-1].prompt_logprobs == outs[0].prompt_logprobs


@pytest.mark.parametrize("value", [-1, 21, 2.5, "3"])
def test_bad_prompt_logprobs_is_an_invalid_parameter(value):
    with pytest.raises(InvalidParameter) as e:
        SamplingParams(prompt_logprobs=value)
    assert e.value.param == "prompt_logprobs"


def test_max_tokens_below_zero_is_still_invalid():
    with pytest.raises(InvalidParameter) as e:
        SamplingParams(max_tokens=-1)
    assert e.value.param == "max_tokens"


def test_vision_language_prompt_logprobs_match_transformers(make_llm, hf_vl):
    import io

    import numpy as np
    from PIL import Image

    model, tok, pre = hf_vl("qwen2-vl")
    llm = make_llm("qwen2-vl", max_num_batched_tokens=24)  # the image's rows span chunks
    im = Image.fromarray((np.random.RandomState(3).rand(60, 90, 3) * 255).astype("uint8"))
    prompt = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                   {"type": "text", "text": "What is it?"}]}],
                                     tokenize=False, add_generation_prompt=True)
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": [im]}},
                       SamplingParams(max_tokens=1, prompt_logprobs=3))[0]
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    mm = pre([im], [buf.getvalue()])
    ids = out.prompt_token_ids
    t = torch.tensor([ids])
    with torch.inference_mode():
        logits = model(input_ids=t, attention_mask=torch.ones_like(t),
                       mm_token_type_ids=(t == model.config.image_token_id).int(),
                       pixel_values=mm.pixel_values, image_grid_thw=mm.image_grid_thw).logits[0]
    check(out, torch.log_softmax(logits.float(), dim=-1), 3)
