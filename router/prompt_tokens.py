"""A request's prompt token ids, computed in the router exactly as the worker computes them, so
KV-aware routing can hash the blocks the engine will hash (``clusterkit.kv_wire.block_hashes``).

Only ``tokenizers`` and ``jinja2`` (never torch or transformers): each model's tokenizer, chat
templates and template variables come from its workers' ``GET /tokenizer_info``
(``worker/tokenizer_info.py``), cached per ``tokenizer_digest`` (the registry carries it).

:class:`ModelTokenizer` reproduces the worker's path: the body's fields as its pydantic models
keep them (``worker/protocol.py``), the messages as ``worker/prompts.py`` hands them to the
template, the template rendered the way transformers' ``render_jinja_template`` renders it
(sandboxed Jinja with ``trim_blocks`` / ``lstrip_blocks`` / loop controls, its ``tojson``,
``raise_exception``, ``strftime_now``, ``dict`` and ``namespace``, the ``{% generation %}`` tag,
None-valued keys dropped, reasoning fields aliased, ``continue_final_message``), then the
tokenizer and ``truncate_prompt_tokens``. Whatever it cannot reproduce faithfully and cheaply it
answers None (route by load): a request's own ``chat_template``, images (the worker expands
them), ``documents``, a template error, a malformed body. A /v1/completions request with several
prompts runs one engine request per prompt; its first prompt stands for it.

Templates render in this process, on the caller's thread: a model's template is the operator's
choice (a request's own never runs here), and prompts whose text could not fit the model's
context are refused before rendering.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import httpx
import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from tokenizers import Tokenizer

log = logging.getLogger("router.prompt_tokens")

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

# transformers' marker for continue_final_message: appended to the final message, found in the
# rendered text, and cut there (with any spacing the template trimmed).
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Message fields the worker's ChatMessage declares, in its order: pydantic dumps them first.
_MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id")
_FUNCTION_FIELDS = ("name", "description", "parameters", "strict")
_REASONING_NAMES = ("reasoning_content", "thinking", "reasoning")
# Arguments the renderer passes itself (worker/template_process.py refuses them as kwargs).
_RESERVED = frozenset({"messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
                       "chat_template", "conversation", "conversations", "tokenize",
                       "return_assistant_tokens_mask", "return_dict", "tokenizer_kwargs"})


class _Unfit(Exception):
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


# -- request fields, as the worker's pydantic models keep them --------------------------------------
def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None and name not in body:
        return default
    if not isinstance(value, bool):  # strict on the worker: no 1, no "true", no null
        raise _Unfit(name)
    return value


def _optional(value, kind) -> Any:
    if value is not None and not isinstance(value, kind):
        raise _Unfit(kind.__name__)
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tool_calls(calls: list) -> list:
    """``arguments`` sent as a JSON string holding an object reach the template as the object."""
    out = []
    for call in calls:
        if not isinstance(call, dict):
            raise _Unfit("tool_calls")
        fn = call.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            try:
                args = json.loads(fn["arguments"])
            except ValueError:
                args = None
            if isinstance(args, dict):
                call = {**call, "function": {**fn, "arguments": args}}
        out.append(call)
    return out


def _content(content, vision: bool, parts_ok: bool):
    """Content as the template gets it: text parts kept as parts where the template reads parts
    (on a model without images), else joined by newlines."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _Unfit("content")
    texts = []
    for part in content:
        if not isinstance(part, dict):
            raise _Unfit("content part")
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise _Unfit("content part")  # images (expanded by the worker), or a part it refuses
        texts.append(part["text"])
    return [dict(p) for p in content] if parts_ok and not vision else "\n".join(texts)


def _message(m, vision: bool, parts_ok: bool) -> dict:
    """One message as the renderer gets it: declared fields first, then the others as sent,
    ``reasoning`` also as ``reasoning_content``, None-valued keys dropped."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise _Unfit("message")
    if m.get("reasoning") is not None and m.get("reasoning_content") is None:
        m = {**m, "reasoning_content": m["reasoning"]}
    _optional(m.get("name"), str)
    _optional(m.get("tool_call_id"), str)
    calls = _optional(m.get("tool_calls"), list)
    out = {k: m[k] for k in _MESSAGE_FIELDS if k in m}
    out.update((k, v) for k, v in m.items() if k not in out)
    out["content"] = _content(m.get("content"), vision, parts_ok)
    if calls is not None:
        out["tool_calls"] = _tool_calls(calls)
    return {k: v for k, v in out.items() if v is not None}


def _tools(tools) -> list[dict] | None:
    """Tools as the worker dumps them (declared fields first, unset ones left out); None when
    there are none."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise _Unfit("tools")
    out = []
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or t.get("type", "function") != "function":
            raise _Unfit("tools")
        name = fn.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= 256:
            raise _Unfit("tools")
        _optional(fn.get("description"), str)
        _optional(fn.get("parameters"), dict)
        _optional(fn.get("strict"), bool)
        dumped_fn = {k: fn[k] for k in _FUNCTION_FIELDS if k in fn}
        dumped_fn.update((k, v) for k, v in fn.items() if k not in dumped_fn)
        tool = {"type": t["type"]} if "type" in t else {}
        tool["function"] = dumped_fn
        tool.update((k, v) for k, v in t.items() if k not in tool)
        out.append(tool)
    return out or None


def _alias_reasoning(message: dict) -> dict:
    """transformers: a message's reasoning under any of its names reaches the template as
    ``reasoning_content`` and (for gpt-oss templates) ``thinking``."""
    reasoning = next((message[k] for k in _REASONING_NAMES if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


class PieceCache:
    """Encodes text piece by piece, with an LRU cache of the pieces' ids: chat prompts repeat
    (a shared system prompt, a conversation's earlier turns), and encoding is most of the cost.

    The pieces are the text between the tokenizer's own added tokens (those matched before
    normalization): ``tokenizers`` splits there first (leftmost-longest) and handles each piece on
    its own (normalizer, pre-tokenizer, model), so the pieces' ids joined with the tokens' are the
    whole text's. That holds unless something looks beyond a piece, so the cache is off (plain
    encoding) when an added token strips whitespace or must stand alone as a word, when special
    tokens are encoded as text, or when a pre-tokenizer prepends only to a text's first piece
    (Metaspace ``prepend_scheme: first``). Special tokens the post-processor adds are not
    handled here (see :func:`special_affixes`). Not thread-safe: one thread's cache."""

    def __init__(self, tok: Tokenizer, tokenizer_json: dict, split_special_tokens: bool,
                 max_chars: int = 4_000_000, max_piece_chars: int = 200_000):
        self._tok = tok
        self.max_chars, self.max_piece_chars = max_chars, max_piece_chars
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._chars = 0
        self.hits = self.misses = 0
        self._ids: dict[str, int] = {}
        self._split: re.Pattern | None = None
        added = tokenizer_json.get("added_tokens") or []
        if split_special_tokens or _prepends_first(tokenizer_json.get("pre_tokenizer")):
            return
        if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
            return
        self._ids = {t["content"]: t["id"] for t in added if not t.get("normalized") and t.get("content")}
        if self._ids:  # longest first: at a position the longest token wins, as tokenizers' matcher
            self._split = re.compile("|".join(re.escape(c) for c in sorted(self._ids, key=len, reverse=True)))

    @property
    def enabled(self) -> bool:
        return self._split is not None

    def encode(self, text: str) -> list[int]:
        """``text``'s ids without post-processor tokens (``add_special_tokens=False``)."""
        if self._split is None:
            return self._tok.encode(text, add_special_tokens=False).ids
        out: list[int] = []
        pos = 0
        for m in self._split.finditer(text):
            if m.start() > pos:
                out += self._piece(text[pos:m.start()])
            out.append(self._ids[m.group()])
            pos = m.end()
        if pos < len(text):
            out += self._piece(text[pos:])
        return out

    def _piece(self, piece: str) -> list[int]:
        ids = self._cache.get(piece)
        if ids is not None:
            self.hits += 1
            self._cache.move_to_end(piece)
            return ids
        self.misses += 1
        ids = self._tok.encode(piece, add_special_tokens=False).ids
        if len(piece) <= self.max_piece_chars:
            self._cache[piece] = ids
            self._chars += len(piece)
            while self._chars > self.max_chars:
                old, _ = self._cache.popitem(last=False)
                self._chars -= len(old)
        return ids


def special_affixes(tok: Tokenizer) -> tuple[list[int], list[int]] | None:
    """The ids a tokenizer's post-processor puts before and after a single text (e.g. BOS), found
    by encoding probes with and without them; None when they are not one fixed prefix and suffix."""
    found = set()
    for probe in ("a", "hello world", "1 2 3"):
        plain = tok.encode(probe, add_special_tokens=False).ids
        full = tok.encode(probe, add_special_tokens=True).ids
        at = [i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain]
        if len(at) != 1:
            return None
        found.add((tuple(full[:at[0]]), tuple(full[at[0] + len(plain):])))
    if len(found) != 1:
        return None
    prefix, suffix = found.pop()
    return list(prefix), list(suffix)


def _prepends_first(pre_tokenizer) -> bool:
    """Whether a pre-tokenizer (any nested part) treats a text's first piece unlike the others."""
    if isinstance(pre_tokenizer, dict):
        if pre_tokenizer.get("type") == "Metaspace" and pre_tokenizer.get("prepend_scheme", "first") not in (
                "always", "never"):
            return True
        return any(_prepends_first(v) for v in pre_tokenizer.values())
    if isinstance(pre_tokenizer, list):
        return any(_prepends_first(v) for v in pre_tokenizer)
    return False


class ModelTokenizer:
    """One model's prompt rendering and tokenization, built from its ``/tokenizer_info`` JSON.

    ``token_ids(path, body)`` gives the prompt token ids the worker's engine will see for a
    request body, or None when they cannot be reproduced here (see the module docstring). Never
    raises. Call it from one thread (the event loop): its :class:`PieceCache` is not locked.
    Construction (parsing the tokenizer, compiling every template) takes a while for a large
    vocabulary (~0.5 s for 150k tokens here): do it off the event loop."""

    def __init__(self, info: dict):
        try:
            self.model: str = info.get("model", "")
            self.digest: str = info["digest"]
            self.max_model_len: int = int(info["max_model_len"])
            self.max_prompt_chars: int = int(info["max_prompt_chars"])
            self.vision = bool(info.get("vision", False))
            self._variables = {**(info.get("special_tokens") or {}), **(info.get("chat_template_kwargs") or {})}
            self._tok = Tokenizer.from_str(info["tokenizer"])
            split_special = bool(info.get("split_special_tokens", False))
            self.pieces = PieceCache(self._tok, json.loads(info["tokenizer"]), split_special)
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception on bad JSON
            raise ValueError(f"not a /tokenizer_info answer: {type(e).__name__}: {e}") from None
        self._tok.no_truncation()
        self._tok.no_padding()
        self._tok.encode_special_tokens = split_special
        self._affixes = special_affixes(self._tok) if self.pieces.enabled else None
        env = template_environment()
        template, takes_parts = info.get("chat_template"), info.get("template_takes_parts")
        # name -> (source, compiled, reads content parts); a single template is named "default".
        # Names whose template does not compile here stay in _names: chats picking them get None.
        self._templates: dict[str, tuple[str, jinja2.Template, bool]] = {}
        self._named = isinstance(template, dict)
        sources = template if self._named else ({"default": template} if isinstance(template, str) else {})
        self._names = frozenset(sources)
        parts = takes_parts if isinstance(takes_parts, dict) else {"default": bool(takes_parts)}
        for name, source in sources.items():
            if isinstance(source, str) and source:
                try:
                    compiled = env.from_string(source)
                except TemplateError as e:  # the worker answers 400 to every chat of this model too
                    log.warning("model %s: chat template %r does not compile here: %s", self.model, name, e)
                    continue
                self._templates[name] = (source, compiled, bool(parts.get(name, False)))

    # -- public ----------------------------------------------------------------------------------
    def token_ids(self, path: str, body: dict) -> list[int] | None:
        """The prompt token ids of a /v1/chat/completions or /v1/completions body (the first
        prompt of several), None when they cannot be reproduced faithfully here."""
        try:
            if path == CHAT:
                ids = self._chat(body)
            elif path == COMPLETIONS:
                ids = self._completion(body)
            else:
                return None
            return self._truncate(body, ids) or None  # an empty prompt is refused by the worker
        except _Unfit:
            return None
        except Exception as e:  # noqa: BLE001 - a template or tokenizer error: the worker refuses it too
            log.debug("model %s: prompt not reproduced: %s: %s", self.model, type(e).__name__, e)
            return None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """``text`` through the model's tokenizer, as the worker's ``tokenizer.encode``; without
        special tokens through the piece cache."""
        if not add_special_tokens:
            return self.pieces.encode(text)
        if self._affixes is None:
            return self._tok.encode(text, add_special_tokens=True).ids
        prefix, suffix = self._affixes
        return [*prefix, *self.pieces.encode(text), *suffix]

    # -- chat ------------------------------------------------------------------------------------
    def _chat(self, body: dict) -> list[int]:
        if body.get("chat_template") is not None or body.get("documents"):
            raise _Unfit("own template or documents")
        add_generation_prompt = _flag(body, "add_generation_prompt", True)
        continue_final = _flag(body, "continue_final_message", False)
        add_special = _flag(body, "add_special_tokens", False)
        kwargs = _optional(body.get("chat_template_kwargs"), dict) or {}
        if _RESERVED.intersection(kwargs):
            raise _Unfit("chat_template_kwargs")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _Unfit("messages")
        if continue_final and (add_generation_prompt or not isinstance(messages[-1], dict)
                               or messages[-1].get("role") != "assistant"):
            raise _Unfit("continue_final_message")
        tools = _tools(body.get("tools"))
        name = "tool_use" if self._named and tools is not None and "tool_use" in self._names else "default"
        if name not in self._templates:
            raise _Unfit("no chat template")
        source, compiled, parts_ok = self._templates[name]
        chat = [_message(m, self.vision, parts_ok) for m in messages]
        if sum(len(m["content"]) for m in chat if isinstance(m.get("content"), str)) > self.max_prompt_chars:
            raise _Unfit("too long")  # the rendered text would be too: not worth rendering
        chat = [_alias_reasoning(m) for m in chat]
        final = self._mark_final(chat, source) if continue_final else None
        text = compiled.render(messages=chat, tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt, **{**self._variables, **kwargs})
        if final is not None:
            text = self._cut_at_mark(text, final)
        if len(text) > self.max_prompt_chars:
            raise _Unfit("too long")
        return self.encode(text, add_special)

    @staticmethod
    def _mark_final(chat: list[dict], source: str) -> str:
        """continue_final_message: tag the final message's text (its last text part) so the
        render can be cut right after it; returns the text before the tag."""
        last = chat[-1]
        final = last.get("content")
        if final is None or "content" not in source:
            raise _Unfit("continue_final_message")
        if isinstance(final, list):
            for i in range(len(final) - 1, -1, -1):
                if "text" in final[i]:
                    part = dict(final[i])
                    text = part["text"]
                    part["text"] = text + _CONTINUE_TAG
                    last["content"] = [*final[:i], part, *final[i + 1:]]
                    return text
            raise _Unfit("continue_final_message")
        last["content"] = final + _CONTINUE_TAG
        return final

    @staticmethod
    def _cut_at_mark(text: str, final: str) -> str:
        mark = _CONTINUE_TAG.strip()
        if final.strip() not in text or mark not in text:
            raise _Unfit("continue_final_message")  # the template dropped part of the message
        at = text.rindex(mark)
        if text.startswith(_CONTINUE_TAG, at):
            return text[:at]
        return text[:at].rstrip()  # the template trimmed the message's trailing space

    # -- completions -----------------------------------------------------------------------------
    def _completion(self, body: dict) -> list[int]:
        add_special = _flag(body, "add_special_tokens", True)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return self.encode(prompt, add_special)
        if not isinstance(prompt, list) or not prompt:
            raise _Unfit("prompt")
        if all(_is_int(p) for p in prompt):
            return list(prompt)
        first = prompt[0]
        if isinstance(first, str):
            ok = all(isinstance(p, str) or isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt)
            if ok:
                return self.encode(first, add_special)
        elif isinstance(first, list) and all(_is_int(t) for t in first):
            if all(isinstance(p, str) or isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt):
                return list(first)
        raise _Unfit("prompt")

    # -- both ------------------------------------------------------------------------------------
    def _truncate(self, body: dict, ids: list[int]) -> list[int]:
        """vLLM's ``truncate_prompt_tokens``: the last k tokens (-1: the context length)."""
        k = body.get("truncate_prompt_tokens")
        if k is None:
            return ids
        if not _is_int(k) or (k < 1 and k != -1):
            raise _Unfit("truncate_prompt_tokens")
        if k == -1:
            k = self.max_model_len
        if k > self.max_model_len:
            raise _Unfit("truncate_prompt_tokens")
        return ids[-k:]


# -- the routers' cache of model tokenizers ----------------------------------------------------------
Fetch = Callable[[str, str], Awaitable[dict]]


class PromptTokens:
    """Tokenizers of the models a router routes, one per ``tokenizer_digest`` (aliases and
    workers serving the same model share it), fetched from a worker's ``/tokenizer_info`` in
    the background: :meth:`lookup` never waits; a miss starts one fetch per digest (concurrent
    misses share it; after a failure that digest waits 1 s, 2 s, ... up to a minute) and
    answers None until it lands. At most ``max_models`` tokenizers are kept (least recently
    used go first).

    ``fetch(worker_url, model)``: the ``/tokenizer_info`` JSON (default: HTTP GET with the
    worker token as bearer)."""

    MAX_BACKOFF_S = 60.0

    def __init__(self, fetch: Fetch | None = None, worker_token: str | None = None, max_models: int = 64,
                 timeout: float = 30.0):
        if max_models < 1:
            raise ValueError("max_models must be >= 1")
        self._fetch = fetch or self._http_fetch
        self._headers = {"Authorization": f"Bearer {worker_token}"} if worker_token else {}
        self._timeout = timeout
        self.max_models = max_models
        self._cache: OrderedDict[str, ModelTokenizer] = OrderedDict()
        self._pending: dict[str, asyncio.Task] = {}
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()  # digest -> (count, retry at)
        self._client: httpx.AsyncClient | None = None
        self.fetches = 0  # fetches started (for metrics and tests)
        self._closed = False

    def lookup(self, model: str, digest: str | None, worker_url: str) -> ModelTokenizer | None:
        """The tokenizer of ``digest`` if cached; else None, and (from a running event loop) a
        background fetch from ``worker_url`` starts unless one is under way or backing off.
        ``digest`` None (a worker that advertises none): None, nothing fetched."""
        if not digest:
            return None
        tok = self._cache.get(digest)
        if tok is not None:
            self._cache.move_to_end(digest)
            return tok
        self._start(model, digest, worker_url)
        return None

    def token_ids(self, model: str, digest: str | None, worker_url: str, path: str, body: dict) -> list[int] | None:
        """:meth:`ModelTokenizer.token_ids` of the cached tokenizer; None on a miss (see :meth:`lookup`)."""
        tok = self.lookup(model, digest, worker_url)
        return tok.token_ids(path, body) if tok is not None else None

    def __len__(self) -> int:
        return len(self._cache)

    async def close(self) -> None:
        """Stop fetches under way and close the HTTP client."""
        self._closed = True
        tasks = list(self._pending.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- fetching --------------------------------------------------------------------------------
    def _start(self, model: str, digest: str, worker_url: str) -> None:
        if self._closed or digest in self._pending:
            return
        failed = self._failures.get(digest)
        if failed is not None and time.monotonic() < failed[1]:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self.fetches += 1
        task = loop.create_task(self._load(model, digest, worker_url))
        self._pending[digest] = task
        task.add_done_callback(lambda _: self._pending.pop(digest, None))

    async def _load(self, model: str, digest: str, worker_url: str) -> None:
        try:
            info = await self._fetch(worker_url, model)
            tok = await asyncio.to_thread(ModelTokenizer, info)
        except Exception as e:  # noqa: BLE001 - any failure: back off, route by load meanwhile
            self._failed(digest)
            log.warning("tokenizer of model %s from %s not loaded (%s: %s); retrying in %.0f s", model, worker_url,
                        type(e).__name__, e, self._failures[digest][1] - time.monotonic())
            return
        self._cache[tok.digest] = tok
        self._cache.move_to_end(tok.digest)
        while len(self._cache) > self.max_models:
            self._cache.popitem(last=False)
        if tok.digest != digest:  # the worker serves another tokenizer now; the registry will follow
            self._failed(digest)
            log.info("model %s: %s answered digest %s for %s", model, worker_url, tok.digest[:12], digest[:12])
        else:
            self._failures.pop(digest, None)
            log.info("model %s: tokenizer %s loaded from %s", model, digest[:12], worker_url)

    def _failed(self, digest: str) -> None:
        count = self._failures.pop(digest, (0, 0.0))[0] + 1
        self._failures[digest] = (count, time.monotonic() + min(self.MAX_BACKOFF_S, 2.0 ** (count - 1)))
        while len(self._failures) > 4 * self.max_models:
            self._failures.popitem(last=False)

    async def _http_fetch(self, worker_url: str, model: str) -> dict:
        if self._client is None:
            self._client = httpx.AsyncClient(headers=self._headers, timeout=self._timeout)
        r = await self._client.get(f"{worker_url.rstrip('/')}/tokenizer_info", params={"model": model})
        r.raise_for_status()
        return await asyncio.to_thread(json.loads, r.content)  # megabytes for a large vocabulary
