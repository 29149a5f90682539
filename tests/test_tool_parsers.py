"""Tool-call parsers on whole answers and on the same answers streamed character by character:
several calls, text before a call, malformed calls kept as content, never an exception."""

from __future__ import annotations

import json
import random

import pytest

from worker.tool_parsers import PARSERS, NamedCallParser, RequiredCallsParser, ToolCallStream, message_calls
from worker.tool_parsers.partial_json import Incomplete, Invalid, scan_call, scan_value


def stream(parser, text: str, chunks: list[int] | None = None) -> tuple[str, list[dict]]:
    """Feed ``text`` in pieces (every character by default) and rebuild what a client sees."""
    cuts = chunks or list(range(1, len(text) + 1))
    s = ToolCallStream(parser)
    content, calls, ids = "", {}, {}
    for k in cuts:
        c, deltas = s.update(text[:k], k == len(text))
        content += c
        for d in deltas:
            i = d["index"]
            if "id" in d:  # the first delta of a call: index, id, type, name (arguments empty)
                assert i not in calls and d["type"] == "function" and d["function"]["arguments"] == ""
                assert i == len(calls)  # indices in order
                calls[i] = {"name": d["function"]["name"], "arguments": ""}
                ids[i] = d["id"]
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                calls[i]["arguments"] += d["function"]["arguments"]
    assert len(set(ids.values())) == len(ids)
    return content, [calls[i] for i in sorted(calls)]


def whole(parser, text: str) -> tuple[str | None, list[dict]]:
    content, calls = message_calls(parser, text)
    return content, [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls]


def random_cuts(text: str, seed: int) -> list[int]:
    rng = random.Random(seed)
    cuts = sorted(set(rng.sample(range(1, len(text)), k=min(len(text) - 1, 12))) | {len(text)})
    return cuts


CASES = {
    "hermes": [
        # (answer, expected content, expected calls)
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
         None, [("get_weather", {"city": "Paris"})]),
        ('Let me look.\n<tool_call>\n{"name": "a", "arguments": {"x": [1, 2.5, {"y": "}"}]}}\n</tool_call>\n'
         '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>',
         "Let me look.\n", [("a", {"x": [1, 2.5, {"y": "}"}]}), ("b", {})]),
        ('Plain answer with <b>tags</b> and a "<tool" word.', 'Plain answer with <b>tags</b> and a "<tool" word.', []),
        ('x <tool_call>{"name": oops}</tool_call> y', 'x <tool_call>{"name": oops}</tool_call> y', []),
        ('<tool_call>{"name": "a", "arguments": "not an object"}</tool_call>',
         '<tool_call>{"name": "a", "arguments": "not an object"}</tool_call>', []),
        ('<tool_call>\n{"name": "a", "arguments": {"q": "\\"quoted\\" \\u00e9"}}\n</tool_call>',
         None, [("a", {"q": '"quoted" é'})]),
    ],
    "llama3_json": [
        ('{"name": "f", "parameters": {"x": 1}}', None, [("f", {"x": 1})]),
        ('<|python_tag|>{"name": "f", "parameters": {"x": 1}}; {"name": "g", "arguments": {"y": "z"}}',
         None, [("f", {"x": 1}), ("g", {"y": "z"})]),
        ("The answer is 42.", "The answer is 42.", []),
        # a stream cannot take back a call it sent before the text went wrong: it keeps the call
        # and the rest is content; the whole answer, read at once, is all content
        ('{"name": "f", "parameters": {"x": 1}} trailing words', '{"name": "f", "parameters": {"x": 1}} trailing words',
         [], ("trailing words", [("f", {"x": 1})])),
    ],
    "mistral": [
        ('[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]',
         None, [("f", {"a": 1}), ("g", {})]),
        ('Sure. [TOOL_CALLS][{"name": "f", "arguments": {"a": "b"}}]', "Sure. ", [("f", {"a": "b"})]),
        ('[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g{"b": [2]}', None, [("f", {"a": 1}), ("g", {"b": [2]})]),
        ("No tools needed [TOOL", "No tools needed [TOOL", []),
        ('[TOOL_CALLS][{"name": 3}]', '[TOOL_CALLS][{"name": 3}]', []),
    ],
}


@pytest.mark.parametrize("name,case", [(n, c) for n, cs in CASES.items() for c in cs])
def test_parsers_whole_and_streamed(name, case):
    text, want_content, want_calls, *streamed = case
    parser = PARSERS[name]()
    content, calls = whole(parser, text)
    assert content == want_content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == want_calls
    want_s_content, want_s_calls = streamed[0] if streamed else (want_content or "", want_calls)
    for cuts in (None, random_cuts(text, 1), random_cuts(text, 2)):
        s_content, s_calls = stream(PARSERS[name](), text, cuts)
        assert s_content == want_s_content
        assert [(c["name"], json.loads(c["arguments"])) for c in s_calls] == want_s_calls
        if not streamed:
            assert [c["arguments"] for c in s_calls] == [c["arguments"] for c in calls]


def test_streamed_arguments_arrive_before_the_call_ends():
    """The parser works on partial text: the name goes out as soon as its string closes and the
    arguments grow with the text, before the closing tag exists."""
    text = 'Hi <tool_call>{"name": "search", "arguments": {"query": "long query text here"}}</tool_call>'
    s = ToolCallStream(PARSERS["hermes"]())
    cut = text.index("long") + 4
    content, deltas = s.update(text[:cut], False)
    assert content == "Hi "
    assert deltas[0]["function"]["name"] == "search"
    assert deltas[1]["function"]["arguments"] == '{"query": "long'


def test_content_is_held_back_only_while_it_may_become_a_marker():
    s = ToolCallStream(PARSERS["hermes"]())
    assert s.update("Hello <tool", False) == ("Hello ", [])
    assert s.update("Hello <tools are", False) == ("<tools are", [])


def test_cut_call_stays_a_call_in_a_stream_and_is_content_when_whole():
    text = '<tool_call>{"name": "a", "arguments": {"q": 1'
    content, calls = whole(PARSERS["hermes"](), text)
    assert content == text and calls == []
    s_content, s_calls = stream(PARSERS["hermes"](), text)
    assert s_content == "" and s_calls == [{"name": "a", "arguments": '{"q": 1'}]


def test_required_and_named_formats():
    text = '[{"name": "f", "parameters": {"a": "x"}}, {"name": "g", "parameters": {}}]'
    assert whole(RequiredCallsParser(), text) == (None, [{"name": "f", "arguments": '{"a": "x"}'},
                                                         {"name": "g", "arguments": "{}"}])
    assert stream(RequiredCallsParser(), text)[1] == whole(RequiredCallsParser(), text)[1]
    assert whole(NamedCallParser("f"), '{"a": 1}') == (None, [{"name": "f", "arguments": '{"a": 1}'}])
    assert stream(NamedCallParser("f"), '{"a": 1}')[1] == [{"name": "f", "arguments": '{"a": 1}'}]


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_parsers_never_raise_on_garbage(name):
    rng = random.Random(0)
    alphabet = ['{', '}', '[', ']', '"', ':', ',', ' ', 'a', '1', '\\', '<tool_call>', '</tool_call>',
                '[TOOL_CALLS]', '[ARGS]', '<|python_tag|>', '"name"', '"arguments"', '"parameters"', ';', '\n']
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        content, calls = whole(PARSERS[name](), text)
        for c in calls:
            assert isinstance(json.loads(c["arguments"]), dict)
        stream(PARSERS[name](), text) if text else None
        if not calls:
            assert content == text


def test_partial_json_scanner():
    assert scan_value('{"a": [1, {"b": "x\\"y"}]} tail', 0) == 25
    for cut in ('{"a": 1', '{"a": -', '{"a": 1.5e', '{"a": tr', '["x', '"ab\\'):
        with pytest.raises(Incomplete):
            scan_value(cut, 0)
    for bad in ('{"a" 1}', '{"a": 01}', '[1 2]', '{"a": tx}', '"a\nb"'):
        with pytest.raises(Invalid):
            scan_value(bad, 0)
    s = '{"name": "get", "arguments": {"k": "v"}}'
    c = scan_call(s, 0)
    assert (c.name, c.args_text(s), c.end) == ("get", '{"k": "v"}', len(s))
    c = scan_call(s[:-6], 0)
    assert c.name == "get" and c.args_end is None and c.args_text(s[:-6]) == '{"k":'
