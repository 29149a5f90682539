"""The tool-call formats models write, by vLLM's ``--tool-call-parser`` names, and the two formats
our own constrained tool choices produce."""

from __future__ import annotations

import random
import re
import string

from .base import ParseResult, ToolCallText, ToolParser, call_text, well_formed
from .partial_json import Incomplete, Invalid, longest_marker_prefix, scan_call, scan_value, skip_ws

_NAME = re.compile(r"([A-Za-z0-9_.\-]+)(?:\[ARGS\])?")


def _split_calls(text: str, final: bool, pieces: list[tuple[str, ToolCallText | None]]) -> ParseResult:
    """Assemble a result from ordered pieces: ("text", None) is content, (raw, call) a call whose raw
    text becomes content when it turns out malformed (at the end, or already invalid)."""
    out = ParseResult()
    for raw, call in pieces:
        if call is None:
            out.content += raw
        elif final and not well_formed(call):
            out.content += raw
        else:
            out.calls.append(call)
    return out


def _scan_call_list(text: str, i: int, calls: list[ToolCallText],
                    args_keys: tuple[str, ...] = ("arguments", "parameters")) -> None:
    """Append the call objects of the JSON list starting at ``text[i] == "["`` to ``calls``, as far
    as the text goes; :class:`Invalid` when it stops being such a list."""
    i = skip_ws(text, i + 1)
    while i < len(text) and text[i] != "]":
        scan = scan_call(text, i, args_keys)
        calls.append(call_text(text, scan))
        if scan.end is None:
            return
        i = skip_ws(text, scan.end)
        if i < len(text) and text[i] == ",":
            i = skip_ws(text, i + 1)
        elif i < len(text) and text[i] != "]":
            raise Invalid("expected ',' or ']'")


class HermesParser(ToolParser):
    """Qwen2.5/Qwen3 and Hermes: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
    any number of them, with free text before."""

    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def parse(self, text: str, final: bool) -> ParseResult:
        pieces: list[tuple[str, ToolCallText | None]] = []
        pos = 0
        while True:
            start = text.find(self.START, pos)
            if start == -1:
                tail = text[pos:]
                if not final:
                    tail = tail[:len(tail) - longest_marker_prefix(tail, self.START)]
                # text between or after calls is content only when it says something
                if tail and (not pieces or tail.strip()):
                    pieces.append((tail, None))
                break
            between = text[pos:start]
            if between and (not pieces or between.strip()):
                pieces.append((between, None))
            body = start + len(self.START)
            end = text.find(self.END, body)
            stop = end if end != -1 else len(text)
            inner = text[:stop]
            try:
                scan = scan_call(inner, skip_ws(inner, body))
                call = call_text(inner, scan)
                if end != -1 and (scan.end is None or inner[scan.end:].strip()):
                    raise Invalid("text after the call object")
                if end == -1 and not final and scan.end is not None and inner[scan.end:].strip():
                    raise Invalid("text after the call object")
            except Invalid:
                raw = text[start:end + len(self.END)] if end != -1 else text[start:]
                if end == -1 and not final:
                    break  # wait: the end tag may still come and the raw text with it
                pieces.append((raw, None))
                pos = end + len(self.END) if end != -1 else len(text)
                continue
            if end != -1:
                call.complete = scan.end is not None
            raw = text[start:end + len(self.END)] if end != -1 else text[start:]
            pieces.append((raw, call))
            if end == -1:
                break
            pos = end + len(self.END)
        return _split_calls(text, final, pieces)


class Llama3JsonParser(ToolParser):
    """Llama 3.1-3.3 JSON tool calling: the answer is ``{"name": ..., "parameters": {...}}`` (or
    ``"arguments"``), optionally after ``<|python_tag|>``, several separated by ``;``. An answer
    that does not start that way is plain content."""

    name = "llama3_json"
    TAG = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> ParseResult:
        i = skip_ws(text, 0)
        if text.startswith(self.TAG, i):
            i = skip_ws(text, i + len(self.TAG))
        elif not final and self.TAG.startswith(text[i:]) and i < len(text):
            return ParseResult()  # may still become the tag
        if i >= len(text):
            return ParseResult(content=text if final else "")
        if text[i] != "{":
            return ParseResult(content=text)
        calls: list[ToolCallText] = []
        try:
            while True:
                scan = scan_call(text, i)
                calls.append(call_text(text, scan))
                if scan.end is None:
                    break
                i = skip_ws(text, scan.end)
                if i >= len(text):
                    break
                if text[i] != ";":
                    raise Invalid("expected ';' between calls")
                i = skip_ws(text, i + 1)
                if i >= len(text):
                    break
        except Invalid:
            return ParseResult(content=text) if final else _after_calls(text, calls)
        if final and not all(well_formed(c) for c in calls):
            return ParseResult(content=text)
        return ParseResult(calls=calls)


def _after_calls(text: str, calls: list[ToolCallText], content: str = "") -> ParseResult:
    """A stream's view once the text stops being calls: the finished calls (already sent) stay,
    and the text after the last of them is content."""
    done = [c for c in calls if c.complete and c.end is not None]
    if not done:
        return ParseResult(content=text)
    return ParseResult(content=content + text[done[-1].end:].lstrip("]; \n\t,"), calls=done)


class MistralParser(ToolParser):
    """Mistral: ``[TOOL_CALLS]`` then a JSON list of ``{"name", "arguments"}`` objects, or (v11+
    tokenizers) ``name{...}`` / ``name[ARGS]{...}`` per call. The marker is a special token, so
    requests keep special tokens in the text; call ids are 9 alphanumerics, as Mistral's
    templates require."""

    name = "mistral"
    skip_special_tokens = False
    MARKER = "[TOOL_CALLS]"
    ARGS = "[ARGS]"

    def new_call_id(self) -> str:
        return "".join(random.choices(string.ascii_letters + string.digits, k=9))

    def parse(self, text: str, final: bool) -> ParseResult:
        start = text.find(self.MARKER)
        if start == -1:
            keep = len(text) if final else len(text) - longest_marker_prefix(text, self.MARKER)
            return ParseResult(content=text[:keep])
        content = text[:start]
        calls: list[ToolCallText] = []
        i = skip_ws(text, start + len(self.MARKER))
        try:
            if i < len(text) and text[i] == "[":  # a JSON list of call objects
                _scan_call_list(text, i, calls)
            else:  # name{args} or name[ARGS]{args}, repeated after more markers
                while i < len(text):
                    m = _NAME.match(text, i)
                    if m is None:
                        raise Invalid("expected a function name")
                    j = m.end()
                    if j >= len(text) or (text[j] == "[" and self.ARGS.startswith(text[j:])):
                        break  # the name (or its [ARGS]) may still grow
                    if text[j] != "{":
                        raise Invalid("expected the arguments object")
                    try:
                        end = scan_value(text, j)
                    except Incomplete:
                        calls.append(ToolCallText(m.group(1), text[j:], False))
                        break
                    calls.append(ToolCallText(m.group(1), text[j:end], True, end))
                    i = skip_ws(text, end)
                    if text.startswith(self.MARKER, i):
                        i = skip_ws(text, i + len(self.MARKER))
                    elif i < len(text) and not (not final and self.MARKER.startswith(text[i:])):
                        raise Invalid("text after the calls")
                    else:
                        break
        except Invalid:
            return ParseResult(content=text) if final else _after_calls(text, calls, content)
        if final and not (calls and all(well_formed(c) for c in calls)):
            return ParseResult(content=text)
        return ParseResult(content=content, calls=calls)


class RequiredCallsParser(ToolParser):
    """``tool_choice: "required"``: the output is constrained to ``[{"name": ..., "parameters":
    {...}}, ...]``, so it is all calls."""

    name = "required"

    def parse(self, text: str, final: bool) -> ParseResult:
        calls: list[ToolCallText] = []
        i = skip_ws(text, 0)
        if i >= len(text) or text[i] != "[":
            return ParseResult(content=text if final else "")
        try:
            _scan_call_list(text, i, calls, ("parameters", "arguments"))
        except Invalid:
            return ParseResult(content=text) if final else _after_calls(text, calls)
        if final:
            calls = [c for c in calls if well_formed(c)]
        return ParseResult(calls=calls)


class NamedCallParser(ToolParser):
    """A named ``tool_choice``: the output is constrained to that function's arguments."""

    name = "named"

    def __init__(self, function: str):
        self.function = function

    def parse(self, text: str, final: bool) -> ParseResult:
        body = text.strip() if final else text.lstrip()
        return ParseResult(calls=[ToolCallText(self.function, body, final)])


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}
