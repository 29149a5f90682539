"""The reasoning formats of vLLM's ``--reasoning-parser`` names ``qwen3`` and ``deepseek_r1``:
both think inside ``<think> ... </think>``; they differ in what an output without the opening
``<think>`` means."""

from __future__ import annotations

from .base import Phase, ReasoningParser


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3: the model opens its thinking itself (``<think>`` first in the output), or the
    template opened it at the end of the prompt (Qwen3-Thinking-2507). An output that neither
    starts with ``<think>`` nor follows an open one is all answer, and so is everything after a
    prompt that already closed the thinking (``enable_thinking: false`` renders
    ``<think>\\n\\n</think>\\n\\n``)."""

    name = "qwen3"

    @property
    def first_phase(self) -> Phase:
        return {"closed": "content", "open": "opening", "none": "deciding"}[self.prompt]


class DeepSeekR1ReasoningParser(ReasoningParser):
    """DeepSeek-R1: everything before ``</think>`` is reasoning, whether or not the output (or
    the prompt) opened it with ``<think>``; an output without ``</think>`` is all reasoning. After
    a prompt that closed the thinking, the output is all answer."""

    name = "deepseek_r1"

    @property
    def first_phase(self) -> Phase:
        return "content" if self.prompt == "closed" else "opening"


PARSERS: dict[str, type[ReasoningParser]] = {p.name: p for p in (Qwen3ReasoningParser, DeepSeekR1ReasoningParser)}
