"""A request's prompt token ids, computed in the router exactly as the worker computes them, so
KV-aware routing can hash the blocks the engine will hash (``clusterkit.kv_wire.block_hashes``).

Only ``tokenizers`` and ``jinja2`` (never torch or transformers): each model's tokenizer, chat
templates and template variables come from its workers' ``GET /tokenizer_info``
(``worker/tokenizer_info.py``), cached per ``tokenizer_digest`` (the registry carries it).

:class:`ModelTokenizer` reproduces the worker's path: the body's fields as its pydantic models
keep them (``worker/protocol.py``), the messages and tools shaped and the template rendered as
the worker and transformers do (:mod:`router.chat_template`), then the tokenizer
(:mod:`router.piece_cache`) and ``truncate_prompt_tokens``. Whatever it cannot reproduce
faithfully and cheaply it answers None (route by load): a request's own ``chat_template``,
images (the worker expands them), ``documents``, a template error, a malformed body. A
/v1/completions request with several prompts runs one engine request per prompt; its first
prompt stands for it. :class:`PromptTokens` keeps one :class:`ModelTokenizer` per tokenizer.

Templates render in this process, on the caller's thread: a model's template is the operator's
choice (a request's own never runs here), and prompts whose text could not fit the model's
context are refused before rendering.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import httpx
import jinja2
from jinja2.exceptions import TemplateError
from tokenizers import Tokenizer

from .chat_template import (
    Unfit,
    alias_reasoning,
    cut_at_mark,
    mark_final,
    optional,
    template_environment,
    template_message,
    template_tools,
)
from .piece_cache import PieceCache, special_affixes

log = logging.getLogger("router.prompt_tokens")

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

# Arguments the renderer passes itself (worker/template_process.py refuses them as kwargs).
_RESERVED = frozenset({"messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
                       "chat_template", "conversation", "conversations", "tokenize",
                       "return_assistant_tokens_mask", "return_dict", "tokenizer_kwargs"})


# -- request fields, as the worker's pydantic models keep them --------------------------------------
def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None and name not in body:
        return default
    if not isinstance(value, bool):  # strict on the worker: no 1, no "true", no null
        raise Unfit(name)
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
        except Unfit:
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
            raise Unfit("own template or documents")
        add_generation_prompt = _flag(body, "add_generation_prompt", True)
        continue_final = _flag(body, "continue_final_message", False)
        add_special = _flag(body, "add_special_tokens", False)
        kwargs = optional(body.get("chat_template_kwargs"), dict) or {}
        if _RESERVED.intersection(kwargs):
            raise Unfit("chat_template_kwargs")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise Unfit("messages")
        if continue_final and (add_generation_prompt or not isinstance(messages[-1], dict)
                               or messages[-1].get("role") != "assistant"):
            raise Unfit("continue_final_message")
        tools = template_tools(body.get("tools"))
        name = "tool_use" if self._named and tools is not None and "tool_use" in self._names else "default"
        if name not in self._templates:
            raise Unfit("no chat template")
        source, compiled, parts_ok = self._templates[name]
        chat = [template_message(m, self.vision, parts_ok) for m in messages]
        if sum(len(m["content"]) for m in chat if isinstance(m.get("content"), str)) > self.max_prompt_chars:
            raise Unfit("too long")  # the rendered text would be too: not worth rendering
        chat = [alias_reasoning(m) for m in chat]
        final = mark_final(chat, source) if continue_final else None
        text = compiled.render(messages=chat, tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt, **{**self._variables, **kwargs})
        if final is not None:
            text = cut_at_mark(text, final)
        if len(text) > self.max_prompt_chars:
            raise Unfit("too long")
        return self.encode(text, add_special)

    # -- completions -----------------------------------------------------------------------------
    def _completion(self, body: dict) -> list[int]:
        add_special = _flag(body, "add_special_tokens", True)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return self.encode(prompt, add_special)
        if not isinstance(prompt, list) or not prompt:
            raise Unfit("prompt")
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
        raise Unfit("prompt")

    # -- both ------------------------------------------------------------------------------------
    def _truncate(self, body: dict, ids: list[int]) -> list[int]:
        """vLLM's ``truncate_prompt_tokens``: the last k tokens (-1: the context length)."""
        k = body.get("truncate_prompt_tokens")
        if k is None:
            return ids
        if not _is_int(k) or (k < 1 and k != -1):
            raise Unfit("truncate_prompt_tokens")
        if k == -1:
            k = self.max_model_len
        if k > self.max_model_len:
            raise Unfit("truncate_prompt_tokens")
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
