"""Incremental detokenization: UTF-8 safety and stop strings across token boundaries."""

from transformers import AutoTokenizer

from engine import SamplingParams
from engine.detokenizer import IncrementalDetokenizer


def test_never_emits_half_a_utf8_character(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir / "tiny-llama")
    text = "Grüße 你好，世界 🙂🚀 emoji done"
    ids = tok.encode(text)
    # Byte-level BPE splits some multi-byte characters over several tokens: the test needs one.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    d = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    seen = []
    for i in ids:
        d.add_token(i)
        seen.append(d.visible_text(False))
    d.flush()
    assert d.text == text
    for s in seen:
        assert "\ufffd" not in s and text.startswith(s)


def test_stop_string_across_token_boundaries(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir / "tiny-llama")
    text = "alpha beta gamma delta epsilon"
    ids = tok.encode(text)
    stop = "ma del"  # spans the boundary between "gamma" and "delta" tokens
    pieces = [tok.decode([i]) for i in ids]
    assert not any(stop in p for p in pieces)
    d = IncrementalDetokenizer(tok, [], stop=[stop, "zzz"])
    shown = []
    matched = None
    for i in ids:
        matched = d.add_token(i)
        shown.append(d.visible_text(matched is not None))
        if matched:
            break
    assert matched == stop
    assert d.text == "alpha beta gam"
    for s in shown:  # nothing shown ever holds a partial stop string past the final cut
        assert "ma d" not in s and d.text.startswith(s)
    d2 = IncrementalDetokenizer(tok, [], stop=[stop], include_stop_str_in_output=True)
    for i in ids:
        if d2.add_token(i):
            break
    assert d2.text == "alpha beta gamma del"


def test_engine_stop_strings(make_llm):
    llm = make_llm("llama")
    free = llm.generate("Tell me a story", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    text = free[0].outputs[0].text
    tokens = free[0].outputs[0].token_ids
    tok = llm.engine.tokenizer
    # choose a stop string that straddles the boundary between output tokens 5 and 6
    pre = tok.decode(tokens[:6])
    stop = pre[-2:] + tok.decode(tokens[6:7])[:2]
    assert stop and stop in text
    out = llm.generate("Tell me a story", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                         stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.index(stop)]
    assert stop not in out.text
