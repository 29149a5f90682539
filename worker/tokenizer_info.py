"""``GET /tokenizer_info``: everything a router needs to compute a model's prompt token ids
itself, without transformers (KV-aware routing, SPEC §4 ``kv_aware``; the router's side is
``router/prompt_tokens.py``).

The payload is what :func:`worker.prompts.render_chat` and
:func:`worker.prompts.completion_prompts` use: the live tokenizer serialized by ``tokenizers``
(the runtime one, with the post-processor transformers built, so BOS handling is the worker's),
whether it splits special tokens, the chat template(s) and which of them read content as parts,
the template variables (the tokenizer's special tokens, the model's configured
``chat_template_kwargs``), ``max_model_len`` (``truncate_prompt_tokens=-1``), the rendered
chat's size limit and whether the model takes images (its text parts are then joined, see
``prompts._content_of``).

``digest`` is a SHA-256 over all of that: the registry carries it (``tokenizer_digest``), and
routers cache one tokenizer per digest. Truncation and padding are left out of the serialized
tokenizer: transformers clears them on the first encode, which must not change the digest.
"""

from __future__ import annotations

import hashlib
import json

from tokenizers import Tokenizer

from .prompts import MAX_CHARS_PER_TOKEN, template_takes_parts

# The fields the digest covers, in the payload (everything but the model's name and the digest).
DIGEST_FIELDS = ("tokenizer", "split_special_tokens", "chat_template", "template_takes_parts", "special_tokens",
                 "chat_template_kwargs", "max_model_len", "max_prompt_chars", "vision")


def _takes_parts(template):
    if isinstance(template, dict):
        return {name: template_takes_parts(t) for name, t in template.items() if isinstance(t, str)}
    return template_takes_parts(template) if isinstance(template, str) else None


def digest_of(fields: dict) -> str:
    """SHA-256 (hex) of the :data:`DIGEST_FIELDS` of a payload."""
    canon = json.dumps({k: fields[k] for k in DIGEST_FIELDS}, sort_keys=True, ensure_ascii=False,
                       separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


class NoTokenizerJSON(Exception):
    """The model's tokenizer has no ``tokenizers`` backend (e.g. a SentencePiece-only one): routers
    cannot reproduce its prompts."""


def backend_json(tokenizer) -> str:
    """The JSON of a transformers tokenizer's ``tokenizers`` backend, without truncation and
    padding (:class:`NoTokenizerJSON` when it has no such backend). Call it on the thread that
    encodes with the tokenizer: transformers changes those settings as it encodes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise NoTokenizerJSON(f"{type(tokenizer).__name__} has no tokenizers backend to serialize")
    if backend.truncation is None and backend.padding is None:  # as after transformers' first encode
        return backend.to_str()
    clone = Tokenizer.from_str(backend.to_str())
    clone.no_truncation()
    clone.no_padding()
    return clone.to_str()


def payload(served, raw_tokenizer: str | None = None) -> dict:
    """The ``/tokenizer_info`` answer of a served model (:class:`worker.vllm_manager.ServedModel`).
    ``raw_tokenizer``: :func:`backend_json` of its tokenizer when already taken."""
    tok = served.tokenizer
    if raw_tokenizer is None:
        raw_tokenizer = backend_json(tok)
    fields = {
        "model": served.name,
        "kind": served.kind,
        "tokenizer": raw_tokenizer,
        "split_special_tokens": bool(getattr(tok, "split_special_tokens", False)),
        "chat_template": served.chat_template,
        "template_takes_parts": _takes_parts(served.chat_template),
        "special_tokens": tok.special_tokens_map,
        "chat_template_kwargs": served.chat_template_kwargs,
        "max_model_len": served.max_model_len,
        "max_prompt_chars": served.max_model_len * MAX_CHARS_PER_TOKEN,  # longer rendered chats are refused
        "vision": served.images is not None,
    }
    fields["digest"] = digest_of(fields)
    return fields


def encoded(served, raw_tokenizer: str | None = None) -> bytes:
    """The payload as the JSON bytes of the HTTP answer (built off the event loop by the route:
    a large vocabulary's JSON takes tens of milliseconds)."""
    return json.dumps(payload(served, raw_tokenizer), ensure_ascii=False,
                      separators=(",", ":")).encode()
