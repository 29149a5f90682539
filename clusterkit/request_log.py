"""Request log lines (``--enable-log-requests``): one line per request, ``key=value`` fields.

Values that could hold spaces, quotes or line breaks are JSON-quoted, so a prompt excerpt never
splits a line or forges a field. Callers pass only what they choose to show: request headers
(where keys and worker tokens travel) are never among the fields.
"""

from __future__ import annotations

import json

_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./:,+@[]")


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.4g}"
    s = str(v)
    if s and all(c in _PLAIN for c in s):
        return s
    return json.dumps(s, ensure_ascii=not s.isprintable())


def request_line(fields: dict[str, object]) -> str:
    """``k=v k=v ...`` of the fields that are not None, in the given order."""
    return " ".join(f"{k}={_value(v)}" for k, v in fields.items() if v is not None)


def prompt_excerpt(text: str, max_len: int) -> str | None:
    """The first ``max_len`` characters of a prompt; None when prompts are not to be logged."""
    return text[:max_len] if max_len > 0 else None
