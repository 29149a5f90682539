"""Reasoning-aware constrained decoding: a request's grammar applies to the answer, not the thinking.

With ``EngineConfig.reasoning_parser`` set, every constrained sequence carries a
:class:`ThinkState`. While THINKING its tokens are free (no mask) and its grammar matcher does not
move; the token ``</think>`` switches it to ANSWERING, from which on the grammar constrains every
token. MAY_OPEN (Qwen3 without a marker in the prompt: thinking is optional) lets the first token
be the grammar's allowed set plus ``<think>``: taking ``<think>`` starts the thinking, anything else
is already the answer and goes to the matcher.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

PARSERS = ("qwen3", "deepseek_r1")
THINK_START, THINK_END = "<think>", "</think>"


class ThinkState(enum.Enum):
    THINKING = "thinking"
    ANSWERING = "answering"
    MAY_OPEN = "may_open"


def check_parser(name: str | None) -> None:
    """ValueError for a reasoning parser this engine does not know."""
    if name is not None and name not in PARSERS:
        raise ValueError(f"reasoning_parser must be one of {', '.join(PARSERS)}, got {name!r}")


@dataclass(frozen=True)
class ReasoningGate:
    """The two marker ids of one tokenizer and the parser's rule for prompts without a marker."""

    parser: str
    start_id: int
    end_id: int
    special_ids: frozenset[int] = frozenset()  # turn markers: the prompt's scan stops at them

    @classmethod
    def for_tokenizer(cls, parser: str, tokenizer) -> ReasoningGate:
        """ValueError when the tokenizer lacks ``<think>`` / ``</think>`` as single tokens."""
        check_parser(parser)
        vocab = tokenizer.get_vocab()
        missing = [t for t in (THINK_START, THINK_END) if t not in vocab]
        if missing:
            raise ValueError(f"reasoning_parser {parser!r} needs the tokens {THINK_START} and {THINK_END} "
                             f"in the tokenizer; missing: {', '.join(missing)}")
        return cls(parser, vocab[THINK_START], vocab[THINK_END], frozenset(tokenizer.all_special_ids))

    def initial_state(self, prompt_ids: list[int]) -> ThinkState:
        """From the last marker in the prompt's final turn: ``<think>`` open -> thinking,
        ``</think>`` -> answering; a special token (``<|im_end|>``, ``<|im_start|>``) before any
        marker ends the scan, so an earlier turn's ``</think>`` does not close this one (the
        worker's reasoning parsers read prompts by the same rule). No marker: DeepSeek-R1 reasons
        first, Qwen3 may or may not open a thinking block."""
        for t in reversed(prompt_ids):
            if t == self.start_id:
                return ThinkState.THINKING
            if t == self.end_id:
                return ThinkState.ANSWERING
            if t in self.special_ids:
                break
        return ThinkState.THINKING if self.parser == "deepseek_r1" else ThinkState.MAY_OPEN

    def advance(self, state: ThinkState, tok: int) -> tuple[ThinkState, bool]:
        """The state after ``tok`` and whether ``tok`` belongs to the answer (goes to the matcher)."""
        if state is ThinkState.ANSWERING:
            return state, True
        if state is ThinkState.THINKING:
            return (ThinkState.ANSWERING if tok == self.end_id else state), False
        if tok == self.start_id:  # MAY_OPEN
            return ThinkState.THINKING, False
        return ThinkState.ANSWERING, True
