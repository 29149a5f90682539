"""Constrained decoding in the engine: outputs follow their grammar whatever the (random) weights,
under n > 1, preemption, chunked prefill, prefix caching, stop strings and max_tokens, and
unconstrained requests batched with them are untouched."""

from __future__ import annotations

import json
import re

import pytest

from engine import SamplingParams, StructuredOutputsParams
from engine.sampling_params import InvalidParameter

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 130},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "ok": {"type": "boolean"}},
    "required": ["name", "age", "tags", "ok"], "additionalProperties": False}


def check_person(text: str) -> None:
    doc = json.loads(text)
    assert list(doc) == ["name", "age", "tags", "ok"]
    assert isinstance(doc["name"], str) and len(doc["name"]) <= 12
    assert isinstance(doc["age"], int) and 0 <= doc["age"] <= 130
    assert set(doc["tags"]) <= {"a", "b", "c"} and len(doc["tags"]) <= 3
    assert isinstance(doc["ok"], bool)


def so(**kw) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kw)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_json_schema_output_parses_for_every_choice(make_llm, kind):
    llm = make_llm(kind)
    out = llm.generate(["Describe a person:"], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=120,
                                                             structured_outputs=so(json=PERSON)))[0]
    assert len(out.outputs) == 4
    for c in out.outputs:
        assert c.finish_reason == "stop", c.text
        check_person(c.text)
    assert len({c.text for c in out.outputs}) > 1  # each choice has its own matcher and seed


def test_regex_choice_grammar_and_json_object(make_llm):
    llm = make_llm("llama")
    cases = [
        (so(regex=r"[a-z]{2,4}-[0-9]{3}"), lambda t: re.fullmatch(r"[a-z]{2,4}-[0-9]{3}", t)),
        (so(choice=["red", "green", 'say "hi"']), lambda t: t in ("red", "green", 'say "hi"')),
        (so(grammar='root ::= "(" [0-9]+ ("+" [0-9]+)* ")"'), lambda t: re.fullmatch(r"\(\d+(\+\d+)*\)", t)),
        (so(grammar='start: "x" NUM+\nNUM: /[0-9]/'), lambda t: re.fullmatch(r"x[0-9]+", t)),  # Lark
    ]
    params = [SamplingParams(n=3, temperature=1.0, seed=i, max_tokens=400, structured_outputs=s)
              for i, (s, _) in enumerate(cases)]
    outs = llm.generate(["a"] * len(cases), params)
    for (_, ok), out in zip(cases, outs):
        for c in out.outputs:
            assert c.finish_reason == "stop" and ok(c.text), c.text
    # Any JSON object: free-form keys and strings of a random model may run past max_tokens, but
    # every output that ended did so as a complete object
    out = llm.generate(["a"], SamplingParams(n=8, temperature=1.0, seed=0, max_tokens=300,
                                             structured_outputs=so(json_object=True)))[0]
    ended = [c for c in out.outputs if c.finish_reason == "stop"]
    assert ended and all(isinstance(json.loads(c.text), dict) for c in ended)
    assert all(c.text.startswith("{") for c in out.outputs)


def test_greedy_constrained_is_deterministic_and_unconstrained_neighbours_unchanged(make_llm):
    llm = make_llm("llama")
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(["tell me"], free)[0].outputs[0].token_ids
    con = SamplingParams(temperature=0, max_tokens=100, structured_outputs=so(json=PERSON))
    mixed = llm.generate(["tell me", "Describe a person:", "tell me"], [free, con, free])
    assert mixed[0].outputs[0].token_ids == alone and mixed[2].outputs[0].token_ids == alone
    again = llm.generate(["Describe a person:"], con)[0].outputs[0]
    assert again.token_ids == mixed[1].outputs[0].token_ids
    if again.finish_reason == "stop":
        check_person(again.text)


def test_sampling_params_keep_working_under_a_grammar(make_llm):
    llm = make_llm("llama")
    s = so(regex=r"[a-z ]{30}")
    for extra in ({"top_k": 3}, {"top_p": 0.5}, {"min_p": 0.2}, {"repetition_penalty": 1.5},
                  {"frequency_penalty": 1.0}):
        p = SamplingParams(temperature=0.9, seed=11, max_tokens=40, structured_outputs=s, **extra)
        a, b = (llm.generate(["words:"], p)[0].outputs[0] for _ in range(2))
        assert a.token_ids == b.token_ids  # seeded: reproducible
        assert re.fullmatch(r"[a-z ]{30}", a.text), (extra, a.text)
    # top_k=1 under the mask is greedy under the mask
    g = llm.generate(["words:"], SamplingParams(temperature=0, max_tokens=40, structured_outputs=s))[0]
    k1 = llm.generate(["words:"], SamplingParams(temperature=1.0, top_k=1, seed=3, max_tokens=40,
                                                 structured_outputs=s))[0]
    assert g.outputs[0].token_ids == k1.outputs[0].token_ids


def test_max_tokens_cut_ends_with_length_and_stop_strings_still_apply(make_llm):
    llm = make_llm("llama")
    out = llm.generate(["x"], SamplingParams(temperature=0, max_tokens=5, structured_outputs=so(json=PERSON)))[0]
    c = out.outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 5 and c.text.startswith('{"name":')
    out = llm.generate(["x"], SamplingParams(temperature=0, max_tokens=60, stop=['"age"'],
                                             structured_outputs=so(json=PERSON)))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == '"age"'
    assert out.text.startswith('{"name": "') and '"age"' not in out.text


def test_eos_only_where_the_grammar_may_end(make_llm):
    """Unconstrained, this model stops on EOS early in some of these seeded choices; constrained,
    EOS only comes once the document is complete, so every ended output parses."""
    llm = make_llm("llama")
    eos = llm.engine.eos_token_ids
    free = llm.generate(["stop now"], SamplingParams(n=16, temperature=1.0, seed=5, max_tokens=200))[0]
    assert sum(c.finish_reason == "stop" and len(c.token_ids) < 40 for c in free.outputs) >= 2
    p = SamplingParams(n=16, temperature=1.0, seed=5, max_tokens=200, structured_outputs=so(json=PERSON))
    for c in llm.generate(["stop now"], p)[0].outputs:
        assert c.finish_reason == "stop" and c.token_ids[-1] in eos
        assert not set(c.token_ids[:-1]) & eos
        check_person(c.text)


def test_preemption_chunked_prefill_and_prefix_cache_keep_outputs_valid(make_llm):
    # 24 blocks of 16 tokens for 6 sequences of ~40+120 tokens: some must be preempted and
    # recomputed; the 40-token budget chunks every prefill; the shared prompt hits the prefix cache.
    llm = make_llm("llama", num_kv_blocks=24, max_num_batched_tokens=40, max_model_len=384)
    prompt = "A long shared system prompt about people, repeated: " * 3
    p = SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=150, structured_outputs=so(json=PERSON))
    filler = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    outs = llm.generate([prompt + str(i) for i in range(4)] + ["filler"] * 2, [p] * 4 + [filler] * 2)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv.stats.hits > 0
    for out in outs[:4]:
        for c in out.outputs:
            assert c.finish_reason == "stop", c.text
            check_person(c.text)


def test_a_preempted_constrained_sequence_resumes_where_it_was(make_llm):
    """The same seeded request gives the same tokens with and without preemption."""
    prompt = "Describe a person:"
    p = SamplingParams(temperature=1.0, seed=21, max_tokens=120, structured_outputs=so(json=PERSON))
    ref = make_llm("llama").generate([prompt], p)[0].outputs[0].token_ids
    tight = make_llm("llama", num_kv_blocks=16, max_model_len=256)
    filler = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
    outs = tight.generate([prompt, "filler one", "filler two"], [p, filler, filler])
    assert tight.engine.scheduler.num_preemptions > 0
    assert outs[0].outputs[0].token_ids == ref


def test_bad_constraints_are_invalid_parameters(make_llm):
    llm = make_llm("llama")
    for bad in ({"json": {"type": "objectt"}}, {"regex": "(ab"}, {"grammar": 'root ::= "a" |'},
                {"json": "{not json"}):
        with pytest.raises(InvalidParameter) as e:
            llm.generate(["x"], SamplingParams(structured_outputs=so(**bad)))
        assert e.value.param == "structured_outputs" and "does not compile" in str(e.value)
    for bad in ({}, {"json": PERSON, "regex": "a"}, {"choice": []}, {"regex": ""}):
        with pytest.raises(InvalidParameter):
            so(**bad)
    assert not llm.engine.requests


def test_compiled_grammars_are_cached_by_spec(make_llm):
    llm = make_llm("llama")
    g = llm.engine.grammars
    a = g.compile(so(json=PERSON))
    assert g.compile(so(json=json.dumps(PERSON))) is a  # same schema text, same grammar
    assert g.compile(so(json=PERSON, disable_any_whitespace=False)) is not a
    assert g.compile(so(regex="a+")) is g.compile(so(regex="a+"))


# -- reasoning_parser: the grammar applies to the answer, after </think> ---------------------------

def _think_ids(llm) -> tuple[int, int]:
    tok = llm.engine.tokenizer
    return tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")


def test_reasoning_gate_thinks_freely_then_constrains_the_answer(make_llm):
    llm = make_llm("llama", reasoning_parser="qwen3")
    start, end = _think_ids(llm)
    prompt = llm.engine.tokenize("Describe a person:") + [start]  # the template opened the block
    # The smallest bias on </think> that makes greedy decoding close the block within 24 tokens:
    # the thinking before it is then the model's own free greedy text.
    for bias in range(0, 60, 2):
        free = llm.generate({"prompt_token_ids": prompt},
                            SamplingParams(temperature=0, max_tokens=24, logit_bias={end: bias}))[0]
        if end in free.outputs[0].token_ids:
            break
    free_ids = free.outputs[0].token_ids
    cut = free_ids.index(end)
    assert cut >= 2, "the block closed at once; the test needs some thinking first"
    con = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=150, logit_bias={end: bias},
                                      structured_outputs=so(json=PERSON)))[0].outputs[0]
    assert con.token_ids[:cut + 1] == free_ids[:cut + 1]  # no mask while thinking
    assert not llm.engine.tokenizer.decode(free_ids[:cut]).startswith("{")
    assert con.finish_reason == "stop"
    check_person(con.text.split("</think>", 1)[1])


def test_reasoning_gate_start_states(make_llm, model_dir):
    from engine import LLM

    plain = make_llm("llama")
    qwen3 = make_llm("llama", reasoning_parser="qwen3")
    start, end = _think_ids(qwen3)
    ids = qwen3.engine.tokenize("Describe a person:")
    con = SamplingParams(temperature=0, max_tokens=150, structured_outputs=so(json=PERSON))
    # </think> last in the prompt: answering from the first token, as without a reasoning parser.
    answered = [start, 5, 6, end] + ids
    out = qwen3.generate({"prompt_token_ids": answered}, con)[0].outputs[0]
    assert out.token_ids == plain.generate({"prompt_token_ids": answered}, con)[0].outputs[0].token_ids
    check_person(out.text)
    # No marker, qwen3: the first token may be <think> (the grammar alone forbids it)...
    opened = qwen3.generate({"prompt_token_ids": ids}, SamplingParams(
        temperature=0, max_tokens=8, logit_bias={start: 100}, structured_outputs=so(json=PERSON)))[0].outputs[0]
    assert opened.token_ids == [start] * 8  # ...and then it thinks, unconstrained
    # ...or anything the grammar allows, which is then the answer.
    direct = SamplingParams(temperature=0, max_tokens=150, logit_bias={start: -100},
                            structured_outputs=so(json=PERSON))
    out = qwen3.generate({"prompt_token_ids": ids}, direct)[0].outputs[0]
    assert out.token_ids == plain.generate({"prompt_token_ids": ids}, direct)[0].outputs[0].token_ids
    check_person(out.text)
    # No marker, deepseek_r1: it reasons first, so the first tokens are free.
    r1 = make_llm("llama", reasoning_parser="deepseek_r1")
    free = SamplingParams(temperature=0, max_tokens=10, logit_bias={end: -100}, ignore_eos=True)
    want = r1.generate({"prompt_token_ids": ids}, free)[0].outputs[0].token_ids
    got = r1.generate({"prompt_token_ids": ids}, SamplingParams(
        temperature=0, max_tokens=10, logit_bias={end: -100}, ignore_eos=True,
        structured_outputs=so(json=PERSON)))[0].outputs[0].token_ids
    assert got == want and not r1.engine.tokenizer.decode(want).startswith("{")
    # n > 1 and preemption keep each choice's state.
    tight = make_llm("llama", reasoning_parser="qwen3", num_kv_blocks=16, max_model_len=256)
    p = SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=150, structured_outputs=so(json=PERSON))
    filler = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
    outs = tight.generate([{"prompt_token_ids": answered}, "filler one", "filler two"], [p, filler, filler])
    assert tight.engine.scheduler.num_preemptions > 0
    for c in outs[0].outputs:
        assert c.finish_reason == "stop"
        check_person(c.text)
    with pytest.raises(ValueError, match="reasoning_parser"):
        LLM(str(model_dir / "tiny-llama"), reasoning_parser="granite")


def test_reasoning_parser_needs_the_think_tokens(minilm_dir):
    from transformers import AutoTokenizer

    from engine.reasoning import ReasoningGate

    with pytest.raises(ValueError, match="<think> and </think>"):
        ReasoningGate.for_tokenizer("deepseek_r1", AutoTokenizer.from_pretrained(minilm_dir))
