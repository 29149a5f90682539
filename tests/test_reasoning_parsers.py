"""Reasoning parsers on whole outputs and on the same outputs streamed in every split (character by
character, in random chunks, with markers cut across chunks): the deltas add up to the whole
result, whatever the prompt left open or closed."""

from __future__ import annotations

import random

import pytest

from worker.reasoning_parsers import PARSERS, DeepSeekR1ReasoningParser, Qwen3ReasoningParser, prompt_thinking
from worker.reasoning_parsers.base import marker_prefix

# Where the prompt left the thinking (prompt_thinking reads it from the prompt's tokens).
OPEN, CLOSED, NONE = "open", "closed", "none"


def streamed(parser, text: str, cuts: list[int]) -> tuple[str | None, str | None, list[tuple[str, str]]]:
    """Feed the prefixes ``text[:k]`` for k in ``cuts`` (the last one final); rebuild the split a
    client sees from the deltas, None where a part never had a delta (or only empty ones)."""
    s = parser.stream()
    deltas = []
    for k in cuts:
        deltas.append(s.update(text[:k], k == len(text)))
    reasoning = "".join(r for r, _ in deltas)
    content = "".join(c for _, c in deltas)
    # the stream's own record agrees with its deltas
    assert (s.reasoning or "") == reasoning and (s.content or "") == content
    return (reasoning if s.reasoning is not None else None), (content or None), deltas


def every_split(text: str) -> list[list[int]]:
    """Char by char, whole at once, every two-piece cut, and a few random chunkings."""
    n = len(text)
    splits = [list(range(1, n + 1)) or [0], [n], [0, n]]
    splits += [[k, n] for k in range(1, n)]
    for seed in range(8):
        rng = random.Random(seed)
        if n > 1:
            splits.append(sorted(set(rng.sample(range(1, n), k=min(n - 1, rng.randint(1, 6))))) + [n])
    return splits


def check(parser, text: str, reasoning: str | None, content: str | None) -> None:
    assert parser.split(text) == (reasoning, content), text
    for cuts in every_split(text):
        r, c, _ = streamed(parser, text, cuts)
        assert (r, c) == (reasoning, content), (text, cuts)


# (where the prompt left the thinking, output, reasoning, content)
QWEN3 = [
    # the model opens the thinking itself (Qwen3's own template, thinking on)
    (NONE, "<think>\nLet me see.\n</think>\n\nThe answer is 4.", "\nLet me see.\n", "\n\nThe answer is 4."),
    (NONE, "<think>a</think>b", "a", "b"),
    # no <think> at the start and none open in the prompt: all answer
    (NONE, "The answer is 4.", None, "The answer is 4."),
    (NONE, "Answer first <think>x</think> y", None, "Answer first <think>x</think> y"),
    (NONE, " <think>x</think>", None, " <think>x</think>"),
    (NONE, "<thin", None, "<thin"),
    (NONE, "<", None, "<"),
    (NONE, "", None, None),
    # cut inside the thinking (max_tokens): all reasoning, no answer
    (NONE, "<think>\nstill thinking </thi", "\nstill thinking </thi", None),
    (NONE, "<think>", "", None),
    # empty reasoning; nothing after </think>
    (NONE, "<think></think>", "", None),
    (NONE, "<think>\n\n</think>\n\nHi", "\n\n", "\n\nHi"),
    (NONE, "<think>x</think>\n\n", "x", "\n\n"),
    # the template opened the thinking: the output starts inside it
    (OPEN, "I reason.\n</think>\n\nDone.", "I reason.\n", "\n\nDone."),
    (OPEN, "<think>I reason.</think>Done.", "I reason.", "Done."),
    (OPEN, "no end in sight", "no end in sight", None),
    (OPEN, "", "", None),
    (OPEN, "</think>", "", None),
    (OPEN, "<thin", "<thin", None),
    # the template closed the thinking (enable_thinking false): all answer, markers and all
    (CLOSED, '{"a": 1}', None, '{"a": 1}'),
    (CLOSED, "<think>x</think>y", None, "<think>x</think>y"),
    (CLOSED, "", None, None),
    # a second </think> is answer text
    (NONE, "<think>a</think>b</think>c", "a", "b</think>c"),
    # non-ASCII around the markers
    (NONE, "<think>déjà vu 🙂</think>答え", "déjà vu 🙂", "答え"),
]

DEEPSEEK_R1 = [
    (NONE, "<think>\nLet me see.\n</think>\n\nThe answer is 4.", "\nLet me see.\n", "\n\nThe answer is 4."),
    # R1 often starts without <think> (the template put it in the prompt): reasoning all the same
    (NONE, "Let me see.\n</think>\n\n4", "Let me see.\n", "\n\n4"),
    (OPEN, "Let me see.\n</think>\n\n4", "Let me see.\n", "\n\n4"),
    (OPEN, "<think>x</think>y", "x", "y"),
    # no </think> at all: all reasoning
    (NONE, "The answer is 4.", "The answer is 4.", None),
    (NONE, "<think>cut </th", "cut </th", None),
    (NONE, "", "", None),
    (NONE, "<thin", "<thin", None),
    # only a leading <think> is dropped
    (NONE, "a<think>b</think>c", "a<think>b", "c"),
    (NONE, "</think>", "", None),
    (NONE, "</think>answer", "", "answer"),
    (NONE, "<think></think>\n\nx", "", "\n\nx"),
    (CLOSED, "answer </think> text", None, "answer </think> text"),
]


@pytest.mark.parametrize("prompt,text,reasoning,content", QWEN3)
def test_qwen3(prompt, text, reasoning, content):
    check(Qwen3ReasoningParser(prompt), text, reasoning, content)


@pytest.mark.parametrize("prompt,text,reasoning,content", DEEPSEEK_R1)
def test_deepseek_r1(prompt, text, reasoning, content):
    check(DeepSeekR1ReasoningParser(prompt), text, reasoning, content)


def test_registry_names():
    assert set(PARSERS) == {"qwen3", "deepseek_r1"}
    assert all(PARSERS[name].name == name for name in PARSERS)


def test_prompt_thinking_reads_the_final_turn():
    """Token ids: 1 <think>, 2 </think>, 3 and 4 special (<|im_start|>, <|im_end|>), others text."""
    def state(*ids):
        return prompt_thinking(list(ids), 1, 2, {3, 4})
    assert state(3, 10, 11, 4, 3, 12, 13, 1, 13) == OPEN  # the template opened it: "<think>\n"
    assert state(3, 10, 11, 4, 3, 12, 13, 1, 13, 13, 2, 13, 13) == CLOSED  # "<think>\n\n</think>\n\n"
    assert state(3, 10, 11, 4, 3, 12, 13) == NONE  # no marker
    assert state(3, 12, 1, 13, 14, 15) == OPEN  # continue_final_message of "<think>\nSo far"
    assert state(3, 12, 1, 13, 2, 14, 15) == CLOSED  # ... of "<think>x</think>The answer"
    # a thinking of an earlier turn, open or closed, says nothing about this one
    assert state(3, 12, 1, 13, 2, 13, 14, 4, 3, 10, 11, 4, 3, 12, 13) == NONE
    assert state(3, 12, 1, 13, 4, 3, 12, 13) == NONE
    assert state() == NONE and state(1) == OPEN and state(13, 2) == CLOSED


def test_marker_split_across_chunks_is_held_back():
    """While the text ends in what may become ``</think>``, nothing of it is emitted; once it is
    the marker, it is dropped and the answer follows."""
    s = Qwen3ReasoningParser(NONE).stream()
    assert s.update("<th", False) == ("", "")
    assert s.update("<think>ab", False) == ("ab", "")
    assert s.update("<think>ab</", False) == ("", "")
    assert s.update("<think>ab</thi", False) == ("", "")
    assert s.update("<think>ab</thin", False) == ("", "")
    assert s.update("<think>ab</think>", False) == ("", "")
    assert s.phase == "content" and s.reasoning == "ab" and s.content == ""
    assert s.update("<think>ab</think>\n\nc", False) == ("", "\n\nc")
    assert s.update("<think>ab</think>\n\ncd", True) == ("", "d")


def test_false_marker_prefix_is_released():
    """A held ``</thi`` that turns out to be other text goes out as reasoning."""
    s = DeepSeekR1ReasoningParser(NONE).stream()
    assert s.update("x </thi", False) == ("x ", "")
    assert s.update("x </thing>", False) == ("</thing>", "")
    assert s.update("x </thing> <", False) == (" ", "")
    assert s.update("x </thing> <", True) == ("<", "")
    assert s.content is None


def test_deciding_holds_only_a_possible_opening():
    s = Qwen3ReasoningParser(NONE).stream()
    assert s.update("", False) == ("", "")
    assert s.update("<", False) == ("", "")
    assert s.update("<b", False) == ("", "<b")  # cannot become <think>: the answer began
    assert s.update("<b><think>", False) == ("", "><think>")
    assert s.reasoning is None


def test_random_texts_stream_like_whole():
    """Random texts over an alphabet dense in marker pieces, both parsers, every prompt state."""
    pieces = ["<think>", "</think>", "<", "</", "</thi", "<thi", "think>", ">", "\n", "a", "é", " "]
    rng = random.Random(1234)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        for cls in (Qwen3ReasoningParser, DeepSeekR1ReasoningParser):
            for prompt in (OPEN, CLOSED, NONE):
                parser = cls(prompt)
                whole = parser.split(text)
                for cuts in (list(range(1, len(text) + 1)) or [0], sorted(set(rng.sample(range(0, len(text) + 1),
                                                                                          k=min(3, len(text) + 1))) |
                                                                           {len(text)})):
                    r, c, _ = streamed(parser, text, cuts)
                    assert (r, c) == whole, (cls.name, prompt, text, cuts)
                # the parts are the text minus at most the two markers
                rebuilt = (whole[0] or "") + (whole[1] or "")
                assert len(text) - len(rebuilt) in (0, len("<think>"), len("</think>"), len("<think></think>"))


def test_marker_prefix():
    assert marker_prefix("abc</thi", "</think>") == 5
    assert marker_prefix("abc<", "</think>") == 1
    assert marker_prefix("abc", "</think>") == 0
    assert marker_prefix("</think>", "</think>") == 0  # whole marker: not a proper prefix
