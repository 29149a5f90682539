"""Chat templates as transformers renders them, without transformers: the sandboxed Jinja
environment (``render_jinja_template``'s options, filters and globals) and a request's messages
and tools shaped as the worker hands them to the template (``worker/prompts.py``,
``worker/protocol.py``), including ``continue_final_message``'s mark and cut.

Whatever cannot be shaped faithfully raises :class:`Unfit`.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from clusterkit.chat_messages import template_tool_calls

# transformers' marker for continue_final_message: appended to the final message, found in the
# rendered text, and cut there (with any spacing the template trimmed).
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Message fields the worker's ChatMessage declares, in its order: pydantic dumps them first.
_MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id")
_FUNCTION_FIELDS = ("name", "description", "parameters", "strict")
_REASONING_NAMES = ("reasoning_content", "thinking", "reasoning")


class Unfit(Exception):
    """The request cannot be reproduced here (or the worker would refuse it): route by load."""


# -- the Jinja environment transformers renders chat templates in ------------------------------------
def _jinja_at_least(version: str, want: tuple[int, ...]) -> bool:
    parts = []
    for piece in version.split(".")[:len(want)]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts) >= want


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (assistant-mask markers): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _public(name) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"a chat template may not set {name!r} on a namespace")


class _Namespace(Namespace):
    """Jinja's ``namespace()`` without underscore names (no way to CPython internals)."""

    def __init__(*args, **kwargs):  # Jinja's own signature trick: namespace(self=...) works
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _public(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _public(name)
        Namespace.__setitem__(self, name, value)


class _DictBuilder:
    """``dict(...)`` and ``dict.fromkeys(...)`` in templates, without handing them the type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Not Jinja's own: no HTML escaping, non-ASCII kept
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise TemplateError(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def template_environment() -> ImmutableSandboxedEnvironment:
    """A sandboxed Jinja environment that renders chat templates as transformers does."""
    if not _jinja_at_least(jinja2.__version__, (3, 1, 6)):
        raise RuntimeError(f"jinja2>=3.1.6 is needed to render chat templates (sandbox fixes); "
                           f"found {jinja2.__version__}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_DictBuilder(),
                       namespace=_Namespace)
    return env


# -- messages and tools, as the worker's pydantic models keep them ----------------------------------
def optional(value, kind) -> Any:
    """``value`` if it is None or a ``kind``; else :class:`Unfit` (the worker refuses it)."""
    if value is not None and not isinstance(value, kind):
        raise Unfit(kind.__name__)
    return value


def _tool_calls(calls: list) -> list:
    """The worker's rule (:func:`clusterkit.chat_messages.template_tool_calls`), for calls it
    would have accepted."""
    if not all(isinstance(call, dict) for call in calls):
        raise Unfit("tool_calls")
    return template_tool_calls(calls)


def _content(content, vision: bool, parts_ok: bool):
    """Content as the template gets it: text parts kept as parts where the template reads parts
    (on a model without images), else joined by newlines."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Unfit("content")
    texts = []
    for part in content:
        if not isinstance(part, dict):
            raise Unfit("content part")
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise Unfit("content part")  # images (expanded by the worker), or a part it refuses
        texts.append(part["text"])
    return [dict(p) for p in content] if parts_ok and not vision else "\n".join(texts)


def template_message(m, vision: bool, parts_ok: bool) -> dict:
    """One message as the renderer gets it: declared fields first, then the others as sent,
    ``reasoning`` also as ``reasoning_content``, None-valued keys dropped."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise Unfit("message")
    if m.get("reasoning") is not None and m.get("reasoning_content") is None:
        m = {**m, "reasoning_content": m["reasoning"]}
    optional(m.get("name"), str)
    optional(m.get("tool_call_id"), str)
    calls = optional(m.get("tool_calls"), list)
    out = {k: m[k] for k in _MESSAGE_FIELDS if k in m}
    out.update((k, v) for k, v in m.items() if k not in out)
    out["content"] = _content(m.get("content"), vision, parts_ok)
    if calls is not None:
        out["tool_calls"] = _tool_calls(calls)
    return {k: v for k, v in out.items() if v is not None}


def template_tools(tools) -> list[dict] | None:
    """Tools as the worker dumps them (declared fields first, unset ones left out); None when
    there are none."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise Unfit("tools")
    out = []
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or t.get("type", "function") != "function":
            raise Unfit("tools")
        name = fn.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= 256:
            raise Unfit("tools")
        optional(fn.get("description"), str)
        optional(fn.get("parameters"), dict)
        optional(fn.get("strict"), bool)
        dumped_fn = {k: fn[k] for k in _FUNCTION_FIELDS if k in fn}
        dumped_fn.update((k, v) for k, v in fn.items() if k not in dumped_fn)
        tool = {"type": t["type"]} if "type" in t else {}
        tool["function"] = dumped_fn
        tool.update((k, v) for k, v in t.items() if k not in tool)
        out.append(tool)
    return out or None


def alias_reasoning(message: dict) -> dict:
    """transformers: a message's reasoning under any of its names reaches the template as
    ``reasoning_content`` and (for gpt-oss templates) ``thinking``."""
    reasoning = next((message[k] for k in _REASONING_NAMES if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


# -- continue_final_message ------------------------------------------------------------------------
def mark_final(chat: list[dict], source: str) -> str:
    """continue_final_message: tag the final message's text (its last text part) so the
    render can be cut right after it; returns the text before the tag."""
    last = chat[-1]
    final = last.get("content")
    if final is None or "content" not in source:
        raise Unfit("continue_final_message")
    if isinstance(final, list):
        for i in range(len(final) - 1, -1, -1):
            if "text" in final[i]:
                part = dict(final[i])
                text = part["text"]
                part["text"] = text + _CONTINUE_TAG
                last["content"] = [*final[:i], part, *final[i + 1:]]
                return text
        raise Unfit("continue_final_message")
    last["content"] = final + _CONTINUE_TAG
    return final


def cut_at_mark(text: str, final: str) -> str:
    """The rendered ``text`` cut right after the final message ``final`` (see :func:`mark_final`)."""
    mark = _CONTINUE_TAG.strip()
    if final.strip() not in text or mark not in text:
        raise Unfit("continue_final_message")  # the template dropped part of the message
    at = text.rindex(mark)
    if text.startswith(_CONTINUE_TAG, at):
        return text[:at]
    return text[:at].rstrip()  # the template trimmed the message's trailing space
