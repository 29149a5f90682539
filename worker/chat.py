"""/v1/chat/completions: render, sample, answer whole or as a stream of deltas; tool calls and
output constraints included."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

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
from .structured import compile_constraint, constraint_of
from .tool_parsers import ToolCallStream, ToolParser, message_calls
from .tools import plan
from .vllm_manager import ServedModel


@dataclass
class ChatJob:
    """A validated chat request, ready to run: prompt ids, sampling params, images, and how the
    answer is read (``parser`` None: plain content)."""

    ids: list[int]
    params: SamplingParams
    mm: object = None
    parser: ToolParser | None = None
    parallel_tool_calls: bool = True


async def prepare(served: ServedModel, req: ChatCompletionRequest, media: MediaPolicy | None = None) -> ChatJob:
    """Everything a chat request needs before it runs; 400s before anything runs."""
    tools = plan(req, served)
    constraint, field = constraint_of(req)
    if tools.constraint is not None:
        if constraint is not None:
            raise APIError(400, f"tool_choice {req.tool_choice!r} constrains the answer to tool calls; it cannot "
                                f"be combined with {field}", field)
        constraint, field = tools.constraint, "tools"
    image_parts: list = []
    ids = render_chat(served, req.messages, req.add_generation_prompt, req.chat_template, image_parts,
                      tools.tools)
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
    keep_special = tools.parser is not None and not tools.parser.skip_special_tokens
    try:
        params = sampling_params(req, served, len(ids), (req.top_logprobs or 0) if req.logprobs else None,
                                 constraint, False if keep_special else None)
    except InvalidParameter as e:
        if e.param == "logprobs":
            raise InvalidParameter("top_logprobs", str(e).replace("logprobs", "top_logprobs", 1)) from e
        raise
    served.validate_prompt(ids, params)
    await compile_constraint(served, constraint, field)
    return ChatJob(ids, params, mm, tools.parser, req.parallel_tool_calls is not False)


def _message(job: ChatJob, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
    """The assistant message of one choice, and its finish reason (``tool_calls`` when it called)."""
    if job.parser is None:
        return {"role": "assistant", "content": text}, finish_reason
    content, calls = message_calls(job.parser, text)
    if not job.parallel_tool_calls:
        calls = calls[:1]
    if not calls:
        return {"role": "assistant", "content": text}, finish_reason
    return ({"role": "assistant", "content": content, "tool_calls": calls},
            "tool_calls" if finish_reason == "stop" else finish_reason)


async def full(served: ServedModel, req: ChatCompletionRequest, job: ChatJob, metrics: WorkerMetrics) -> dict:
    """The whole ``chat.completion`` object."""
    out = await final_output(generate(served, job.ids, job.params, metrics, mm=job.mm))
    choices = []
    for c in out.outputs:
        message, finish = _message(job, c.text, c.finish_reason)
        choices.append({"index": c.index, "message": message,
                        "logprobs": chat_logprobs(served, c.token_ids, c.logprobs, req.top_logprobs or 0),
                        "finish_reason": finish, "stop_reason": c.stop_reason})
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
            "model": req.model, "choices": choices,
            "usage": usage(len(job.ids), sum(len(c.token_ids) for c in out.outputs))}


def _delta(job: ChatJob, calls: ToolCallStream | None, text: str, new_text: str, finished: bool) -> dict:
    """The ``delta`` of one chunk: new content, and with a parser the tool-call deltas."""
    if calls is None:
        return {"content": new_text} if new_text or not finished else {}
    content, tool_deltas = calls.update(text, finished)
    if not job.parallel_tool_calls:
        tool_deltas = [d for d in tool_deltas if d["index"] == 0]
    delta: dict = {"content": content} if content else {}
    if tool_deltas:
        delta["tool_calls"] = tool_deltas
    return delta


async def stream(served: ServedModel, req: ChatCompletionRequest, job: ChatJob,
                 metrics: WorkerMetrics) -> AsyncIterator[str]:
    """SSE events of ``chat.completion.chunk`` deltas, ending with ``[DONE]``."""
    rid, created = new_id("chatcmpl"), int(time.time())
    n = job.params.n
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model}
    extra = {"usage": None} if include_usage else {}
    for i in range(n):
        yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}], **extra})
    sent_text = [0] * n
    sent_toks = [0] * n
    done = [False] * n
    calls = [ToolCallStream(job.parser) if job.parser is not None else None for _ in range(n)]
    completion_tokens = 0
    try:
        async for out in generate(served, job.ids, job.params, metrics, mm=job.mm):
            for c in out.outputs:
                i = c.index
                if done[i]:
                    continue
                new_toks = c.token_ids[sent_toks[i]:]
                if len(c.text) == sent_text[i] and not new_toks and not c.finished:
                    continue
                delta = _delta(job, calls[i], c.text, c.text[sent_text[i]:], c.finished)
                if not delta and not c.finished:
                    continue  # held back (a possible tool-call marker): the tokens go with the next chunk
                lps = c.logprobs[sent_toks[i]:] if c.logprobs is not None else None
                finish = c.finish_reason
                if finish == "stop" and calls[i] is not None and calls[i].called:
                    finish = "tool_calls"
                choice = {"index": i, "delta": delta,
                          "logprobs": chat_logprobs(served, new_toks, lps, req.top_logprobs or 0),
                          "finish_reason": finish}
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
        yield sse({**base, "choices": [], "usage": usage(len(job.ids), completion_tokens)})
    yield SSE_DONE
