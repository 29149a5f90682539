"""Sampling: seeds, n > 1 sharing blocks, penalties, filters, stop ids, EOS, validation."""

import pytest

from engine import InvalidParameter, SamplingParams

PROMPT = "Once upon a time in a land far away"


def test_seeded_sampling_reproducible_alone_and_batched(make_llm):
    llm = make_llm("llama")
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, seed=42, ignore_eos=True)
    alone = llm.generate(PROMPT, sp)[0].outputs[0].token_ids
    again = llm.generate(PROMPT, sp)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)] * 5
    batched = llm.generate(["x y z", PROMPT, "hello", "abc", "q", "zz"], [others[0], sp, *others[1:]])
    assert alone == again == batched[1].outputs[0].token_ids
    other_seed = llm.generate(PROMPT, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, seed=43,
                                                     ignore_eos=True))[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_choices_share_prompt_blocks_and_use_seed_plus_i(make_llm):
    llm = make_llm("qwen2", block_size=4)
    eng = llm.engine
    prompt_ids = eng.tokenize(PROMPT * 3)
    sp = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7, ignore_eos=True)
    rid = "shared"
    eng.add_request(rid, prompt_token_ids=prompt_ids, params=sp)
    eng.step()  # prefill + fork + first token of each choice
    req = eng.requests[rid]
    assert len(req.seqs) == 3
    full_prompt_blocks = len(prompt_ids) // 4
    tables = [s.block_table for s in req.seqs]
    assert tables[0][:full_prompt_blocks] == tables[1][:full_prompt_blocks] == tables[2][:full_prompt_blocks]
    assert all(eng.kv.pool.blocks[b].ref_cnt == 3 for b in tables[0][:full_prompt_blocks])
    outs = None
    while eng.has_unfinished_requests():
        outs = eng.step() or outs
    choices = outs[0].outputs
    assert [c.index for c in choices] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in choices}) == 3  # seed + i: the choices differ
    # choice i equals a single request seeded with seed + i
    for i, c in enumerate(choices):
        single = llm.generate({"prompt_token_ids": prompt_ids},
                              SamplingParams(temperature=1.0, max_tokens=8, seed=7 + i, ignore_eos=True))
        assert single[0].outputs[0].token_ids == c.token_ids


def test_top_k_one_is_greedy_and_min_p_one_is_greedy(make_llm):
    llm = make_llm("llama")
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    topk = llm.generate(PROMPT, SamplingParams(temperature=1.5, top_k=1, max_tokens=16, ignore_eos=True))
    minp = llm.generate(PROMPT, SamplingParams(temperature=1.5, min_p=1.0, max_tokens=16, ignore_eos=True))
    assert greedy[0].outputs[0].token_ids == topk[0].outputs[0].token_ids == minp[0].outputs[0].token_ids


def test_penalties_change_repetition(make_llm):
    llm = make_llm("llama")
    base = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    toks = base.outputs[0].token_ids
    assert len(set(toks)) < len(toks), "the tiny model should repeat itself greedily"
    for sp in (SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, frequency_penalty=2.0),
               SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, presence_penalty=2.0),
               SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, repetition_penalty=5.0)):
        out = llm.generate(PROMPT, sp)[0].outputs[0].token_ids
        assert out != toks
        assert len(set(out)) > len(set(toks))


def test_stop_token_ids_eos_and_length(make_llm):
    llm = make_llm("qwen3")
    free = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    toks = free.outputs[0].token_ids
    assert free.outputs[0].finish_reason == "length" and len(toks) == 30
    stop_at = toks[10]
    first = toks.index(stop_at)
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_at]))[0]
    c = out.outputs[0]
    assert c.token_ids == toks[:first + 1] and c.finish_reason == "stop" and c.stop_reason == stop_at


def test_generation_stops_on_any_eos_of_generation_config(make_llm):
    import random

    llm = make_llm("qwen3")
    eng = llm.engine
    tok = eng.tokenizer
    eos = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    assert eng.eos_token_ids == eos  # the list in generation_config.json, not just one id
    # Find prompts whose greedy continuation really emits one of the EOS ids.
    rng = random.Random(0)
    prompts = [[rng.randrange(3, len(tok)) for _ in range(rng.randint(2, 12))] for _ in range(96)]
    free = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    hits = [(p, o.outputs[0].token_ids) for p, o in zip(prompts, free)
            if eos & set(o.outputs[0].token_ids)]
    assert hits, "no prompt reached EOS; widen the search"
    seen = set()
    for p, toks in hits:
        cut = next(i for i, t in enumerate(toks) if t in eos)
        seen.add(toks[cut])
        out = llm.generate({"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=40))[0]
        c = out.outputs[0]
        assert c.token_ids == toks[:cut + 1] and c.finish_reason == "stop" and c.stop_reason is None
        assert "<|im_end|>" not in c.text and "<|endoftext|>" not in c.text


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.1),
    ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0),
    ("max_tokens", -1), ("n", 0), ("logprobs", 21), ("stop", [""]), ("stop_token_ids", [-1]),
])
def test_invalid_parameters_raise_naming_the_field(field, value):
    with pytest.raises(InvalidParameter) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field and field in str(e.value)


def test_bad_prompts_rejected_before_scheduling(make_llm):
    llm = make_llm("llama", max_model_len=64)
    eng = llm.engine
    with pytest.raises(InvalidParameter, match="maximum context length is 64"):
        eng.add_request("a", prompt_token_ids=[5] * 60, params=SamplingParams(max_tokens=10))
    with pytest.raises(InvalidParameter, match="outside the vocabulary"):
        eng.add_request("b", prompt_token_ids=[5, 10**6], params=SamplingParams(max_tokens=1))
    with pytest.raises(InvalidParameter):
        eng.add_request("c", prompt_token_ids=[], params=SamplingParams(max_tokens=1))
    assert not eng.requests and eng.kv.pool.num_free_blocks == eng.kv.pool.num_blocks
    # The engine keeps serving.
    assert llm.generate("hi", SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids


def test_abort_frees_every_block(make_llm):
    llm = make_llm("llama")
    eng = llm.engine
    for i in range(4):
        eng.add_request(str(i), prompt=PROMPT * (i + 1), params=SamplingParams(max_tokens=50, n=2,
                                                                             ignore_eos=True))
    for _ in range(5):
        eng.step()
    assert eng.kv.pool.num_used_blocks > 0
    for i in range(4):
        out = eng.abort(str(i))
        assert out.finished and all(c.finish_reason == "abort" for c in out.outputs)
    assert eng.kv.pool.num_free_blocks == eng.kv.pool.num_blocks
