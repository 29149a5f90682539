"""Scanning JSON that may still be arriving: where values start and end, without waiting for the
end of the text.

A streamed tool call is JSON cut at an arbitrary character. The scanners here walk it once and say
what is known so far: a call object's ``name`` once its string is closed, and where its arguments
value starts and (once closed) ends, so the raw argument text can be streamed as it grows.
``Incomplete`` means the text ended inside a value that could still become valid; ``Invalid``
means no continuation can make it JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

WS = " \t\r\n"
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_NUMBER_PREFIX = re.compile(r"-?(0|[1-9][0-9]*)?(\.[0-9]*)?([eE][+-]?[0-9]*)?")
_LITERALS = ("true", "false", "null")


class Incomplete(Exception):
    """The text ends inside this value."""


class Invalid(ValueError):
    """The text cannot be (the start of) valid JSON here."""


def skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in WS:
        i += 1
    return i


def scan_string(s: str, i: int) -> int:
    """End (exclusive) of the JSON string starting at ``s[i] == '"'``."""
    if i >= len(s):
        raise Incomplete
    if s[i] != '"':
        raise Invalid(f"expected a string at {i}")
    i += 1
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        if c < " ":
            raise Invalid("control character in a string")
        i += 1
    raise Incomplete


def scan_value(s: str, i: int) -> int:
    """End (exclusive) of the JSON value starting at ``i`` (no leading whitespace)."""
    if i >= len(s):
        raise Incomplete
    c = s[i]
    if c == '"':
        return scan_string(s, i)
    if c == "{":
        return _scan_container(s, i, "}", keyed=True)
    if c == "[":
        return _scan_container(s, i, "]", keyed=False)
    if c == "-" or c.isdigit():
        j = i
        while j < len(s) and s[j] in "-+.eE0123456789":
            j += 1
        if j == len(s):  # a number at the end of the text may still grow
            if _NUMBER_PREFIX.fullmatch(s, i):
                raise Incomplete
            raise Invalid(f"bad number at {i}")
        if not _NUMBER.fullmatch(s, i, j):
            raise Invalid(f"bad number at {i}")
        return j
    for lit in _LITERALS:
        if s.startswith(lit, i):
            return i + len(lit)
        if lit.startswith(s[i:]):
            raise Incomplete
    raise Invalid(f"unexpected {c!r} at {i}")


def _scan_container(s: str, i: int, close: str, keyed: bool) -> int:
    i = skip_ws(s, i + 1)
    if i < len(s) and s[i] == close:
        return i + 1
    while True:
        if keyed:
            i = skip_ws(s, scan_string(s, i))
            if i >= len(s):
                raise Incomplete
            if s[i] != ":":
                raise Invalid(f"expected ':' at {i}")
            i = skip_ws(s, i + 1)
        i = skip_ws(s, scan_value(s, i))
        if i >= len(s):
            raise Incomplete
        if s[i] == close:
            return i + 1
        if s[i] != ",":
            raise Invalid(f"expected ',' or {close!r} at {i}")
        i = skip_ws(s, i + 1)


@dataclass
class CallScan:
    """What a (possibly cut) call object ``{"name": ..., "arguments": {...}}`` says so far.

    ``args_end`` is None while the arguments value is still open (it then runs to the end of the
    text); ``end`` is set once the object's closing brace has arrived.
    """

    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    end: int | None = None

    def args_text(self, s: str) -> str:
        if self.args_start is None:
            return ""
        return s[self.args_start:self.args_end if self.args_end is not None else len(s)]


def scan_call(s: str, i: int, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> CallScan:
    """Scan the call object starting at ``s[i] == '{'`` as far as the text goes. Raises
    :class:`Invalid` when it cannot be a call object; stops quietly at the end of the text."""
    out = CallScan()
    if i >= len(s):
        return out
    if s[i] != "{":
        raise Invalid(f"expected '{{' at {i}")
    try:
        i = skip_ws(s, i + 1)
        if i < len(s) and s[i] == "}":
            out.end = i + 1
            return out
        while True:
            k_end = scan_string(s, i)
            key = json.loads(s[i:k_end])
            i = skip_ws(s, k_end)
            if i >= len(s):
                return out
            if s[i] != ":":
                raise Invalid(f"expected ':' at {i}")
            i = skip_ws(s, i + 1)
            if key in args_keys and out.args_start is None:
                out.args_start = i
                if i < len(s) and s[i] not in "{[":  # arguments are an object (or, rarely, a list)
                    raise Invalid("arguments must be a JSON object")
            v_end = scan_value(s, i)  # Incomplete: the value runs to the end of the text
            if key == "name":
                name = json.loads(s[i:v_end])
                if not isinstance(name, str):
                    raise Invalid("name must be a string")
                out.name = name
            elif key in args_keys and out.args_end is None:
                out.args_end = v_end
            i = skip_ws(s, v_end)
            if i >= len(s):
                return out
            if s[i] == "}":
                out.end = i + 1
                return out
            if s[i] != ",":
                raise Invalid(f"expected ',' or '}}' at {i}")
            i = skip_ws(s, i + 1)
    except Incomplete:
        return out


def longest_marker_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker`` (text that
    must be held back while it might still turn into the marker)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
