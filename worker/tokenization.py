"""/tokenize and /detokenize, vLLM-shaped."""

from __future__ import annotations

from clusterkit.errors import APIError

from .prompts import ChatOptions, render_chat
from .protocol import DetokenizeRequest, TokenizeRequest
from .tools import tool_dicts
from .vllm_manager import ServedModel


async def tokenize(served: ServedModel, req: TokenizeRequest) -> dict:
    """vLLM's two request shapes: ``messages`` (rendered as a chat completion would be, with its
    template fields; ``add_special_tokens`` default false) or ``prompt`` (default true)."""
    if req.messages is not None:
        ids = await render_chat(served, req.messages, ChatOptions.of(req),
                                tools=tool_dicts(req.tools) if req.tools else None)
    elif req.prompt is not None:
        ids = served.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    else:
        raise APIError(400, "give prompt or messages", "prompt")
    return {"count": len(ids), "max_model_len": served.max_model_len, "tokens": ids}


def detokenize(served: ServedModel, req: DetokenizeRequest) -> dict:
    vocab = max(len(served.tokenizer), getattr(served.tokenizer, "vocab_size", 0))
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary", "tokens")
    return {"prompt": served.tokenizer.decode(req.tokens)}
