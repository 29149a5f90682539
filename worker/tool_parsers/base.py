"""What every tool-call parser returns, and the stream differ that turns successive parses of a
growing text into OpenAI's tool-call deltas."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from .partial_json import CallScan


@dataclass
class ToolCallText:
    """One call as parsed so far: ``name`` None until its string has closed; ``arguments`` the raw
    JSON text of the arguments (growing while ``complete`` is False)."""

    name: str | None
    arguments: str
    complete: bool = False
    end: int | None = None  # where the call's text ends, once complete


@dataclass
class ParseResult:
    """``content``: the text that is not part of any call (while streaming, only what can no longer
    turn into a call marker). ``calls``: in order."""

    content: str = ""
    calls: list[ToolCallText] = field(default_factory=list)


class ToolParser:
    """Splits a model's answer into content and tool calls; ``parse`` is a pure function of the
    whole text so far. With ``final`` False it reports what is certain for a stream; with ``final``
    True only well-formed calls count and anything malformed is content, never an error."""

    name = "base"
    skip_special_tokens = True  # False where the call marker is a special token (Mistral)

    def parse(self, text: str, final: bool) -> ParseResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def new_call_id(self) -> str:
        return f"chatcmpl-tool-{uuid.uuid4().hex}"


def call_text(s: str, scan: CallScan) -> ToolCallText:
    return ToolCallText(scan.name, scan.args_text(s), scan.end is not None, scan.end)


def well_formed(call: ToolCallText) -> bool:
    """A finished call: a name and arguments that are a JSON object."""
    if not call.complete or not call.name:
        return False
    try:
        return isinstance(json.loads(call.arguments), dict)
    except ValueError:
        return False


class ToolCallStream:
    """Deltas for one streamed choice: feed the whole text so far, get the new content and the
    tool-call deltas OpenAI sends (first ``index``, ``id``, ``type`` and ``function.name`` of a
    call, then ``function.arguments`` fragments)."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.content_sent = ""
        self.calls: list[tuple[str, str]] = []  # (id, arguments sent so far) per announced call

    def update(self, text: str, final: bool) -> tuple[str, list[dict]]:
        result = self.parser.parse(text, final)
        if final and len(result.calls) < len(self.calls):
            # A call already announced turned out malformed (most often: cut by max_tokens). The
            # stream cannot take its header back, so it stays a (partial) call.
            result = self.parser.parse(text, False)
        content = ""
        if result.content.startswith(self.content_sent):
            content = result.content[len(self.content_sent):]
            self.content_sent = result.content
        deltas: list[dict] = []
        for i, call in enumerate(result.calls):
            if call.name is None or not call.arguments:
                break  # announced once its arguments have begun validly; later calls wait their turn
            if i == len(self.calls):
                cid = self.parser.new_call_id()
                self.calls.append((cid, ""))
                deltas.append({"index": i, "id": cid, "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            cid, sent = self.calls[i]
            if len(call.arguments) > len(sent) and call.arguments.startswith(sent):
                deltas.append({"index": i, "function": {"arguments": call.arguments[len(sent):]}})
                self.calls[i] = (cid, call.arguments)
        return content, deltas

    @property
    def called(self) -> bool:
        return bool(self.calls)


def message_calls(parser: ToolParser, text: str) -> tuple[str | None, list[dict]]:
    """A whole answer -> (content or None, ``tool_calls`` of the message)."""
    result = parser.parse(text, final=True)
    calls = [{"id": parser.new_call_id(), "type": "function",
              "function": {"name": c.name, "arguments": c.arguments}} for c in result.calls]
    content = result.content if result.content.strip() or not calls else None
    return content, calls
