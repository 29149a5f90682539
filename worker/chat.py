"""/v1/chat/completions: render, sample, answer whole or as a stream of deltas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from clusterkit.errors import APIError
from engine import SamplingParams
from engine.sampling_params import InvalidParameter

from .logprobs import chat_logprobs
from .media import MediaPolicy, load_image
from .metrics import WorkerMetrics
from .prompts import render_chat
from .protocol import ChatCompletionRequest
from .sampling import sampling_params
from .streaming import SSE_DONE, error_event, final_output, generate, new_id, sse, usage
from .vllm_manager import ServedModel


async def prepare(served: ServedModel, req: ChatCompletionRequest, media: MediaPolicy | None = None
                  ) -> tuple[list[int], SamplingParams, object]:
    """Prompt ids, sampling params and processed images of a chat request; 400s before anything runs."""
    image_parts: list = []
    ids = render_chat(served, req.messages, req.add_generation_prompt, req.chat_template, image_parts)
    mm = None
    if image_parts:
        loaded = [await load_image(part, media or MediaPolicy()) for part in image_parts]
        try:
            mm = await asyncio.to_thread(served.images, [im for im, _ in loaded], [raw for _, raw in loaded])
            ids = served.images.expand(ids, mm)
        except ValueError as e:
            raise APIError(400, f"images could not be processed: {e}", "messages") from e
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
    try:
        params = sampling_params(req, served, len(ids), (req.top_logprobs or 0) if req.logprobs else None)
    except InvalidParameter as e:
        if e.param == "logprobs":
            raise InvalidParameter("top_logprobs", str(e).replace("logprobs", "top_logprobs", 1)) from e
        raise
    served.validate_prompt(ids, params)
    return ids, params, mm


async def full(served: ServedModel, req: ChatCompletionRequest, ids, params, metrics: WorkerMetrics,
               mm=None) -> dict:
    """The whole ``chat.completion`` object."""
    out = await final_output(generate(served, ids, params, metrics, mm=mm))
    choices = []
    for c in out.outputs:
        choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                        "logprobs": chat_logprobs(served, c.token_ids, c.logprobs, req.top_logprobs or 0),
                        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
            "model": req.model, "choices": choices,
            "usage": usage(len(ids), sum(len(c.token_ids) for c in out.outputs))}


async def stream(served: ServedModel, req: ChatCompletionRequest, ids, params, metrics: WorkerMetrics,
                 mm=None) -> AsyncIterator[str]:
    """SSE events of ``chat.completion.chunk`` deltas, ending with ``[DONE]``."""
    rid, created = new_id("chatcmpl"), int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model}
    extra = {"usage": None} if include_usage else {}
    for i in range(params.n):
        yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}], **extra})
    sent_text = [0] * params.n
    sent_toks = [0] * params.n
    done = [False] * params.n
    completion_tokens = 0
    try:
        async for out in generate(served, ids, params, metrics, mm=mm):
            for c in out.outputs:
                i = c.index
                if done[i]:
                    continue
                delta_text = c.text[sent_text[i]:]
                new_toks = c.token_ids[sent_toks[i]:]
                lps = c.logprobs[sent_toks[i]:] if c.logprobs is not None else None
                if not delta_text and not new_toks and not c.finished:
                    continue
                choice = {"index": i, "delta": {"content": delta_text} if delta_text or not c.finished else {},
                          "logprobs": chat_logprobs(served, new_toks, lps, req.top_logprobs or 0),
                          "finish_reason": c.finish_reason}
                if c.finished:
                    choice["stop_reason"] = c.stop_reason
                    done[i] = True
                sent_text[i], sent_toks[i] = len(c.text), len(c.token_ids)
                yield sse({**base, "choices": [choice], **extra})
            completion_tokens = sum(len(c.token_ids) for c in out.outputs)
    except Exception as e:  # the stream has started: end it with an error event, never silently
        yield sse(error_event(e))
        yield SSE_DONE
        return
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage(len(ids), completion_tokens)})
    yield SSE_DONE
