"""What every reasoning parser shares: where the prompt left the thinking, the split of a whole
output into reasoning and answer, and the stream that makes the same split incrementally."""

from __future__ import annotations

from typing import Literal

START, END = "<think>", "</think>"

# Where the rendered prompt leaves the model: inside an open ``<think>`` (the template opened it),
# after a ``</think>`` (the template closed it: Qwen3 with enable_thinking false), or neither.
PromptThinking = Literal["open", "closed", "none"]

# The phases of an output, in order: before the answer may begin with an optional <think>
# ("opening": reasoning follows either way; "deciding": reasoning only if the <think> is there),
# inside the reasoning, then the answer.
Phase = Literal["opening", "deciding", "reasoning", "content"]


def prompt_thinking(prompt_ids: list[int], start_id: int, end_id: int, special_ids: set[int]) -> PromptThinking:
    """The thinking state the rendered prompt leaves: the last ``<think>`` / ``</think>`` token
    decides, if it is in the final turn (no special token, such as ``<|im_end|>`` or
    ``<|im_start|>``, after it). So a template's ``<think>\\n`` or ``<think>\\n\\n</think>\\n\\n``
    counts, and so does a ``<think>\\nSo far`` prefill of ``continue_final_message``, while a
    ``</think>`` of an earlier turn in the history does not close this one's."""
    for t in reversed(prompt_ids):
        if t == start_id:
            return "open"
        if t == end_id:
            return "closed"
        if t in special_ids:
            return "none"
    return "none"


def marker_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``: text a
    stream holds back while it might still become the marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ReasoningParser:
    """Splits a chat answer into the model's reasoning and its answer, by vLLM's
    ``--reasoning-parser`` rules. One instance per request, told where the prompt left the
    thinking (:func:`prompt_thinking`): :meth:`split` reads a whole output, :meth:`stream` gives a
    per-choice incremental reader whose deltas add up to :meth:`split`'s result.

    Whitespace is kept as the model wrote it (vLLM strips none): ``<think>\\nx\\n</think>\\n\\ny``
    is reasoning ``"\\nx\\n"`` and content ``"\\n\\ny"``."""

    name = "base"

    def __init__(self, prompt: PromptThinking = "none"):
        self.prompt = prompt

    @property
    def first_phase(self) -> Phase:  # pragma: no cover - abstract
        raise NotImplementedError

    def split(self, text: str) -> tuple[str | None, str | None]:
        """A whole output -> (reasoning, content). Reasoning is None where the model did not think
        (``""`` where it thought nothing); content is None where there is no answer (the output
        ended inside the reasoning, or nothing follows ``</think>``)."""
        phase = self.first_phase
        if phase == "content":
            return None, text or None
        if text.startswith(START):
            text = text[len(START):]
        elif phase == "deciding":
            return None, text or None
        reasoning, found, content = text.partition(END)
        return reasoning, (content or None) if found else None

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self.first_phase)


class ReasoningStream:
    """The split of one streamed choice, made as its text grows: :meth:`update` takes the whole
    text so far and returns the new (reasoning, content). A possible marker at the end of the text
    (``<thi``, ``</thin``) is held back until the next update or the final one shows what it is."""

    def __init__(self, phase: Phase):
        self.phase: Phase = phase
        self.pos = 0  # text[:pos] has been consumed: emitted, or dropped as a marker
        self.reasoning: str | None = None  # everything emitted so far, by part
        self.content: str | None = "" if phase == "content" else None

    def update(self, text: str, final: bool) -> tuple[str, str]:
        """New reasoning and new content since the last update (``final``: the text is whole)."""
        new_reasoning = new_content = ""
        while True:
            rest = text[self.pos:]
            if self.phase in ("opening", "deciding"):
                if not final and len(rest) < len(START) and START.startswith(rest):
                    break  # "", "<", "<thi": may still become the opening <think>
                if rest.startswith(START):
                    self.pos += len(START)
                    self._enter("reasoning")
                else:
                    self._enter("reasoning" if self.phase == "opening" else "content")
            elif self.phase == "reasoning":
                end = rest.find(END)
                if end != -1:
                    new_reasoning += rest[:end]
                    self.pos += end + len(END)
                    self._enter("content")
                    continue
                keep = 0 if final else marker_prefix(rest, END)
                new_reasoning += rest[:len(rest) - keep]
                self.pos += len(rest) - keep
                break
            else:
                new_content += rest
                self.pos = len(text)
                break
        if self.reasoning is not None:
            self.reasoning += new_reasoning
        if self.content is not None:
            self.content += new_content
        return new_reasoning, new_content

    def _enter(self, phase: Phase) -> None:
        self.phase = phase
        if phase == "reasoning":
            self.reasoning = ""
        elif phase == "content":
            self.content = ""

    @property
    def answer(self) -> str:
        """The answer so far (``""`` before it begins): what tool-call parsing reads."""
        return self.content or ""
