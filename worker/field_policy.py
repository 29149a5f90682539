"""Field policy (SPEC §3.1): a request field that OpenAI or vLLM defines and that would change the
output is honoured, or answered 400 naming it. The fields we do not implement are listed here with
the values that mean "off" (sending those is harmless, as clients often send defaults); any other
value is a 400. Fields neither defines are ignored, as vLLM ignores them.

The README's "Field policy" section lists the same table; tests/test_field_policy.py checks both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clusterkit.errors import APIError


@dataclass(frozen=True)
class Refused:
    """A field we answer 400 to, unless its value is one of ``harmless`` (meaning "off")."""

    why: str
    harmless: tuple[Any, ...] = (None,)

    def accepts(self, value: Any) -> bool:
        return any(value == h and type(value) is type(h) for h in self.harmless)


_OFF = (None, False)
_EMPTY = (None, [], {})

# Shared by chat and completions: vLLM's extras and OpenAI fields whose effect we do not produce.
COMMON: dict[str, Refused] = {
    "use_beam_search": Refused("beam search is not implemented", _OFF),
    "length_penalty": Refused("length_penalty only applies to beam search, which is not implemented",
                              (None, 1.0, 1)),
    "spaces_between_special_tokens": Refused(
        "only the default (true) detokenization is implemented", (None, True)),
    "logits_processors": Refused("custom logits processors are not loaded by this server", _EMPTY),
    "priority": Refused("priority scheduling is not enabled (requests run first come, first served)",
                        (None, 0)),
    "kv_transfer_params": Refused("disaggregated prefill (KV transfer) is not implemented", _EMPTY),
    "vllm_xargs": Refused("no custom extensions read vllm_xargs here", _EMPTY),
    "prompt_embeds": Refused("prompt embeddings as input are not supported", _EMPTY),
    "mm_processor_kwargs": Refused("image processor options are not supported", _EMPTY),
    "structural_tag": Refused("structural tags are not supported; use response_format json_schema or "
                              "structured_outputs", (None,)),
    "thinking_token_budget": Refused("a thinking token budget is not implemented", (None,)),
}

CHAT: dict[str, Refused] = {
    **COMMON,
    "best_of": Refused("best_of is not supported on chat completions", (None, 1)),
    "echo": Refused("echo on chat completions (prepending the last message) is not implemented", _OFF),
    "documents": Refused("documents for RAG templates are not passed to templates here", _EMPTY),
    "audio": Refused("audio output is not supported", _EMPTY),
    "modalities": Refused("only text output is supported", (None, ["text"])),
    "web_search_options": Refused("web search is not supported", _EMPTY),
    "verbosity": Refused("verbosity is not supported", (None,)),
    "reasoning_effort": Refused("reasoning_effort is not supported by these models' templates; use "
                                "chat_template_kwargs (e.g. enable_thinking)", (None,)),
}

COMPLETIONS: dict[str, Refused] = {
    **COMMON,
    "suffix": Refused("suffix (insertion) is not supported", (None, "")),
}

EMBEDDINGS: dict[str, Refused] = {
    "truncate_prompt_tokens": Refused("truncation is not implemented for embeddings", (None,)),
    "priority": COMMON["priority"],
}


def check(extra: dict[str, Any] | None, table: dict[str, Refused]) -> None:
    """400 for the first field of ``table`` the request set to a value that would change the
    output. ``extra``: the fields the request model did not declare (pydantic ``model_extra``)."""
    if not extra:
        return
    for name, value in extra.items():
        rule = table.get(name)
        if rule is not None and not rule.accepts(value):
            raise APIError(400, f"{name} is not supported by this server: {rule.why}", name)


def check_best_of(best_of: Any, n: int) -> None:
    """Completions' ``best_of``: honoured only where it equals ``n`` (every candidate returned)."""
    if best_of is not None and best_of != n:
        raise APIError(400, f"best_of={best_of!r} is not supported (only best_of equal to n, {n}): "
                            "ranking candidates by likelihood is not implemented", "best_of")
