"""Sampling extras as vLLM names them: logit_bias, min_tokens, bad_words, allowed_token_ids,
truncate_prompt_tokens. They steer what is sampled; reported logprobs stay the raw model's."""

from __future__ import annotations

import re

import pytest
import torch

from engine import InvalidParameter, SamplingParams
from engine.logit_controls import bad_words_token_ids

PROMPT = "Once upon a time in a land far away"


def greedy(**kw) -> SamplingParams:
    kw.setdefault("max_tokens", 12)
    return SamplingParams(temperature=0, **kw)


def tokens(llm, prompt, params) -> list[int]:
    return llm.generate(prompt, params)[0].outputs[0].token_ids


def test_logit_bias_plus_100_forces_a_token_greedy_and_sampled(make_llm, hf_reference):
    llm = make_llm("llama")
    base = tokens(llm, PROMPT, greedy(ignore_eos=True))
    forced = next(t for t in range(100, 200) if t not in base)
    for p in (greedy(ignore_eos=True, logit_bias={forced: 100}, logprobs=1),
              SamplingParams(temperature=1.0, seed=1, max_tokens=12, ignore_eos=True, logit_bias={forced: 100},
                             logprobs=1),
              SamplingParams(temperature=1.3, top_p=0.9, top_k=5, max_tokens=12, ignore_eos=True,
                             logit_bias={str(forced): 250})):  # string keys as JSON sends them, clamped
        out = llm.generate(PROMPT, p)[0].outputs[0]
        assert out.token_ids == [forced] * 12
    # The reported logprob is the raw model's, not the biased one (which would be ~0).
    hf, tok = hf_reference("llama")
    ids = tok.encode(PROMPT)
    with torch.inference_mode():
        raw = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
    first = llm.generate(PROMPT, greedy(ignore_eos=True, logit_bias={forced: 100}, logprobs=0))[0]
    assert abs(first.outputs[0].logprobs[0][forced] - raw[forced].item()) < 1e-4
    assert raw[forced].item() < -1.0


def test_logit_bias_minus_100_bans_tokens_and_leaves_neighbours_alone(make_llm):
    llm = make_llm("llama")
    base = tokens(llm, PROMPT, greedy(max_tokens=24, ignore_eos=True))
    banned = {t: -100 for t in set(base)}
    plain = greedy(max_tokens=24, ignore_eos=True)
    outs = llm.generate([PROMPT, PROMPT, "other text"],
                        [plain, greedy(max_tokens=24, ignore_eos=True, logit_bias=banned), plain])
    assert outs[0].outputs[0].token_ids == base
    assert not set(outs[1].outputs[0].token_ids) & set(banned)
    assert outs[2].outputs[0].token_ids == tokens(llm, "other text", plain)
    assert SamplingParams(logit_bias={"5": 1e6, 6: -1e6}).logit_bias == {5: 100.0, 6: -100.0}


def test_min_tokens_holds_against_eos(make_llm):
    llm = make_llm("qwen3")
    eos = sorted(llm.engine.eos_token_ids)
    to_eos = {t: 100 for t in eos}  # EOS is the greedy choice at every step
    out = llm.generate(PROMPT, greedy(max_tokens=20, logit_bias=to_eos))[0].outputs[0]
    assert len(out.token_ids) == 1 and out.token_ids[0] in eos and out.finish_reason == "stop"
    for sp in (greedy(max_tokens=20, logit_bias=to_eos, min_tokens=6),
               SamplingParams(temperature=1.0, seed=2, max_tokens=20, logit_bias=to_eos, min_tokens=6)):
        out = llm.generate(PROMPT, sp)[0].outputs[0]
        assert len(out.token_ids) == 7 and out.finish_reason == "stop" and out.stop_reason is None
        assert not set(out.token_ids[:6]) & set(eos) and out.token_ids[6] in eos
    # min_tokens == max_tokens: EOS never comes.
    out = llm.generate(PROMPT, greedy(max_tokens=5, logit_bias=to_eos, min_tokens=5))[0].outputs[0]
    assert out.finish_reason == "length" and not set(out.token_ids) & set(eos)
    # Under ignore_eos nothing changes for EOS: it is not masked (and never stopped anyway).
    out = llm.generate(PROMPT, greedy(max_tokens=5, logit_bias=to_eos, min_tokens=3, ignore_eos=True))[0]
    assert set(out.outputs[0].token_ids) <= set(eos) and len(out.outputs[0].token_ids) == 5


def test_min_tokens_holds_against_stop_token_ids_and_stop_strings(make_llm):
    llm = make_llm("qwen3")
    base = tokens(llm, PROMPT, greedy(max_tokens=30, ignore_eos=True))
    stop_id = next(t for t in range(100, 200) if t not in base)
    out = llm.generate(PROMPT, greedy(max_tokens=30, ignore_eos=True, stop_token_ids=[stop_id],
                                      logit_bias={stop_id: 100}, min_tokens=4))[0].outputs[0]
    assert out.token_ids[:4] != [stop_id] * 4 and stop_id not in out.token_ids[:4]
    assert len(out.token_ids) == 5 and out.token_ids[-1] == stop_id and out.stop_reason == stop_id
    # A stop string the greedy text reaches within its first few tokens.
    text = llm.generate(PROMPT, greedy(max_tokens=30, ignore_eos=True))[0].outputs[0].text
    early = text.lstrip()[:2]
    stopped = llm.generate(PROMPT, greedy(max_tokens=30, ignore_eos=True, stop=[early]))[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == early and len(stopped.token_ids) < 10
    held = llm.generate(PROMPT, greedy(max_tokens=30, ignore_eos=True, stop=[early], min_tokens=10))[0].outputs[0]
    assert len(held.token_ids) >= 10 and held.token_ids == base[:len(held.token_ids)]
    assert held.text.startswith(text[:len(text) - len(text.lstrip()) + 2])


def test_a_grammar_that_terminates_still_ends_before_min_tokens(make_llm):
    from engine import StructuredOutputsParams as SO

    llm = make_llm("llama")
    # Two EOS ids; the bias leaves the grammar's end to the second one (with every id masked the
    # argmax would be token 0, the first).
    first_eos, other_eos = sorted(llm.engine.eos_token_ids)
    for sp in (greedy(max_tokens=40, min_tokens=30, structured_outputs=SO(choice=["yes", "no"]),
                      logit_bias={first_eos: -100}),
               SamplingParams(temperature=1.0, seed=1, max_tokens=40, min_tokens=30, logit_bias={first_eos: -100},
                              structured_outputs=SO(regex="[a-c]{3}"))):
        out = llm.generate(PROMPT, sp)[0].outputs[0]
        assert out.finish_reason == "stop" and len(out.token_ids) < 30
        assert out.token_ids[-1] == other_eos
        assert out.text in ("yes", "no") or re.fullmatch("[a-c]{3}", out.text)


def _single_token_word(tok, ids: list[int]) -> tuple[str, set[int]] | None:
    for t in ids:
        word = tok.decode([t]).strip()
        if not word.isalpha():
            continue
        variants = bad_words_token_ids(tok, [word])
        if [t] in variants and all(len(v) == 1 for v in variants):
            return word, {v[0] for v in variants}
    return None


def _two_token_word(tok, ids: list[int]) -> tuple[str, list[list[int]]] | None:
    for a, b in zip(ids, ids[1:]):
        word = tok.decode([a, b])
        if not word.strip() or "\ufffd" in word:
            continue
        variants = bad_words_token_ids(tok, [word])
        if [a, b] in variants:
            return word, variants
    return None


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_bad_words_single_and_multi_token_never_appear(make_llm):
    llm = make_llm("llama")
    tok = llm.engine.tokenizer
    prompts = ["Once upon a time", "The meaning of it all is", "def main():", "In the beginning"]
    bases = [tokens(llm, p, greedy(max_tokens=40, ignore_eos=True)) for p in prompts]
    single = next(((p, b, w) for p, b in zip(prompts, bases) if (w := _single_token_word(tok, b))), None)
    multi = next(((p, b, w) for p, b in zip(prompts, bases) if (w := _two_token_word(tok, b))), None)
    assert single and multi, "no usable word in the greedy outputs; try other prompts"

    prompt, base, (word, ids) = single
    out = tokens(llm, prompt, greedy(max_tokens=40, ignore_eos=True, bad_words=[word]))
    assert set(base) & ids and not set(out) & ids

    prompt, base, (word, variants) = multi
    assert any(_contains(base, v) for v in variants)
    out = tokens(llm, prompt, greedy(max_tokens=40, ignore_eos=True, bad_words=[word]))
    assert not any(_contains(out, v) for v in variants)
    # Only the last token is banned, and only after the others: the first one still appears alone.
    first = [v[0] for v in variants if len(v) > 1]
    assert out != base and (set(first) & set(out) or not set(first) & set(base))
    sampled = llm.generate(prompt, SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=40, ignore_eos=True,
                                                  bad_words=[word, "zz"]))[0]
    for c in sampled.outputs:
        assert not any(_contains(c.token_ids, v) for v in variants)


def test_allowed_token_ids_restrict_sampling(make_llm):
    llm = make_llm("qwen2")
    allowed = [300, 301, 302, 57]
    for sp in (greedy(max_tokens=16, ignore_eos=True, allowed_token_ids=allowed),
               SamplingParams(n=3, temperature=1.5, seed=4, max_tokens=16, ignore_eos=True,
                              allowed_token_ids=allowed)):
        for c in llm.generate(PROMPT, sp)[0].outputs:
            assert set(c.token_ids) <= set(allowed) and len(c.token_ids) == 16
    # Together with a bias: the biased one among the allowed wins; a biased outsider cannot.
    out = tokens(llm, PROMPT, greedy(max_tokens=6, ignore_eos=True, allowed_token_ids=allowed,
                                     logit_bias={57: 100, 999: 100}))
    assert out == [57] * 6


def test_truncate_prompt_tokens_keeps_the_tail(make_llm):
    llm = make_llm("llama", max_model_len=64)
    ids = llm.engine.tokenize(PROMPT * 3)
    assert len(ids) > 10
    out = llm.generate({"prompt_token_ids": ids}, greedy(truncate_prompt_tokens=10, ignore_eos=True))[0]
    assert out.prompt_token_ids == ids[-10:]
    assert out.outputs[0].token_ids == tokens(llm, {"prompt_token_ids": ids[-10:]}, greedy(ignore_eos=True))
    text = llm.generate(PROMPT * 3, greedy(truncate_prompt_tokens=7, max_tokens=2))[0]
    assert text.prompt_token_ids == ids[-7:]
    # -1: the context length. 100 tokens would not fit; truncated to 64 they do (with nothing generated).
    long = (ids * 10)[:100]
    assert llm.generate({"prompt_token_ids": long}, SamplingParams(max_tokens=0, truncate_prompt_tokens=-1))[0] \
        .prompt_token_ids == long[-64:]
    llm.engine.validate_prompt(long, SamplingParams(max_tokens=4, truncate_prompt_tokens=60))
    with pytest.raises(InvalidParameter) as e:
        llm.engine.add_request("x", prompt_token_ids=long, params=SamplingParams(truncate_prompt_tokens=65))
    assert e.value.param == "truncate_prompt_tokens"
    with pytest.raises(InvalidParameter) as e:
        llm.engine.validate_prompt(long, SamplingParams(max_tokens=4, truncate_prompt_tokens=62))
    assert e.value.param == "max_tokens"


@pytest.mark.parametrize("field,value", [
    ("logit_bias", {"x": 1.0}), ("logit_bias", {-1: 1.0}), ("logit_bias", {5: "a"}), ("logit_bias", [1, 2]),
    ("min_tokens", -1), ("min_tokens", 1.5), ("bad_words", [""]), ("bad_words", ["ok", 3]),
    ("allowed_token_ids", []), ("allowed_token_ids", [-1]), ("allowed_token_ids", ["7"]),
    ("truncate_prompt_tokens", 0), ("truncate_prompt_tokens", -2), ("prompt_logprobs", 21),
])
def test_bad_values_are_invalid_parameters(field, value):
    with pytest.raises(InvalidParameter) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field and field in str(e.value)


def test_min_tokens_above_max_tokens_is_invalid():
    with pytest.raises(InvalidParameter) as e:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert e.value.param == "min_tokens"
    SamplingParams(max_tokens=None, min_tokens=5)


def test_token_ids_outside_the_vocabulary_are_invalid_before_scheduling(make_llm):
    llm = make_llm("llama")
    eng = llm.engine
    for field, value in (("logit_bias", {eng.vocab_size: 5.0}), ("allowed_token_ids", [1, eng.vocab_size + 3])):
        params = SamplingParams(**{field: value})
        with pytest.raises(InvalidParameter) as e:
            eng.validate_prompt([5, 6], params)
        assert e.value.param == field
        with pytest.raises(InvalidParameter) as e:
            llm.generate("hi", params)
        assert e.value.param == field
    assert not eng.requests
