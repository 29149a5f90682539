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

from . import field_policy
from .logprobs import TokenNames, chat_logprobs, prompt_logprobs
from .media import MediaPolicy, load_image
from .metrics import WorkerMetrics
from .prompts import ChatOptions, render_chat
from .protocol import ChatCompletionRequest
from .reasoning_parsers import PARSERS as REASONING_PARSERS
from .reasoning_parsers import THINK_END, THINK_START, ReasoningParser, ReasoningStream, prompt_thinking
from .sampling import sampling_params, truncate_prompt
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
    reasoning: ReasoningParser | None = None  # None: no reasoning parser, the whole text is the answer
    include_reasoning: bool = True


def reasoning_of(served: ServedModel, ids: list[int]) -> ReasoningParser | None:
    """The model's reasoning parser for this prompt (None: it has none), told whether the prompt
    leaves the thinking open, closed, or neither."""
    if served.reasoning_parser is None:
        return None
    tok = served.tokenizer
    state = prompt_thinking(ids, tok.convert_tokens_to_ids(THINK_START), tok.convert_tokens_to_ids(THINK_END),
                            set(tok.all_special_ids))
    return REASONING_PARSERS[served.reasoning_parser](state)


async def prepare(served: ServedModel, req: ChatCompletionRequest, media: MediaPolicy | None = None) -> ChatJob:
    """Everything a chat request needs before it runs; 400s before anything runs."""
    field_policy.check(req.model_extra, field_policy.CHAT)
    if req.prompt_logprobs is not None and req.stream:
        raise InvalidParameter("prompt_logprobs", "prompt_logprobs are not available on streamed chat completions")
    if (req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens) == 0:
        raise InvalidParameter("max_tokens", "max_tokens must be >= 1")
    tools = plan(req, served)
    constraint, field = constraint_of(req)
    if tools.constraint is not None:
        if constraint is not None:
            raise APIError(400, f"tool_choice {req.tool_choice!r} constrains the answer to tool calls; it cannot "
                                f"be combined with {field}", field)
        constraint, field = tools.constraint, "tools"
    image_parts: list = []
    ids = await render_chat(served, req.messages, ChatOptions.of(req), image_parts, tools.tools)
    mm = None
    if image_parts:
        loaded = [await load_image(part, media or MediaPolicy()) for part in image_parts]
        try:
            mm = await asyncio.to_thread(served.images, [im for im, _ in loaded], [raw for _, raw in loaded])
            ids = served.images.expand(ids, mm)
        except ValueError as e:
            raise APIError(400, f"images could not be processed: {e}", "messages") from e
    if req.truncate_prompt_tokens is not None:
        if mm is not None:
            raise APIError(400, "truncate_prompt_tokens cannot cut a prompt holding images", "truncate_prompt_tokens")
        ids = truncate_prompt(req, served, ids)
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
    return ChatJob(ids, params, mm, tools.parser, req.parallel_tool_calls is not False, reasoning_of(served, ids),
                   req.include_reasoning)


def _message(job: ChatJob, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
    """The assistant message of one choice, and its finish reason (``tool_calls`` when it called).
    With a reasoning parser the thinking goes to ``reasoning_content`` (and vLLM's newer name
    ``reasoning``), and only the answer after it is content and read for tool calls."""
    message: dict = {"role": "assistant"}
    answer: str | None = text
    if job.reasoning is not None:
        thought, answer = job.reasoning.split(text)
        message["reasoning_content"] = message["reasoning"] = thought if job.include_reasoning else None
    if job.parser is None or answer is None:
        return {**message, "content": answer}, finish_reason
    content, calls = message_calls(job.parser, answer)
    if not job.parallel_tool_calls:
        calls = calls[:1]
    if not calls:
        return {**message, "content": answer}, finish_reason
    return ({**message, "content": content, "tool_calls": calls},
            "tool_calls" if finish_reason == "stop" else finish_reason)


async def full(served: ServedModel, req: ChatCompletionRequest, job: ChatJob, metrics: WorkerMetrics) -> dict:
    """The whole ``chat.completion`` object."""
    out = await final_output(generate(served, job.ids, job.params, metrics, mm=job.mm, cache_salt=req.cache_salt))
    names = TokenNames(served, req.return_tokens_as_token_ids)
    choices = []
    for c in out.outputs:
        message, finish = _message(job, c.text, c.finish_reason)
        choices.append({"index": c.index, "message": message,
                        "logprobs": chat_logprobs(names, c.token_ids, c.logprobs, req.top_logprobs or 0),
                        "finish_reason": finish, "stop_reason": c.stop_reason})
    answer = {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
              "model": req.model, "choices": choices,
              "usage": usage(len(job.ids), sum(len(c.token_ids) for c in out.outputs))}
    if req.prompt_logprobs is not None:  # vLLM puts them beside the choices
        answer["prompt_logprobs"] = prompt_logprobs(names, job.ids, out.prompt_logprobs, out.prompt_token_ranks,
                                                    req.prompt_logprobs)
    return answer


def _delta(job: ChatJob, calls: ToolCallStream | None, thinking: ReasoningStream | None, text: str,
           new_text: str, finished: bool) -> dict:
    """The ``delta`` of one chunk: new reasoning (with a reasoning parser), new content, and with a
    tool parser the tool-call deltas, read from the answer after the reasoning only."""
    delta: dict = {}
    if thinking is not None:
        thought, new_text = thinking.update(text, finished)
        text = thinking.answer
        if thought and job.include_reasoning:
            delta["reasoning_content"] = delta["reasoning"] = thought
        if calls is None:
            return {**delta, "content": new_text} if new_text else delta
    if calls is None:
        return {"content": new_text} if new_text or not finished else {}
    content, tool_deltas = calls.update(text, finished)
    if not job.parallel_tool_calls:
        tool_deltas = [d for d in tool_deltas if d["index"] == 0]
    if content:
        delta["content"] = content
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
    thinking = [job.reasoning.stream() if job.reasoning is not None else None for _ in range(n)]
    completion_tokens = 0
    names = TokenNames(served, req.return_tokens_as_token_ids)
    try:
        async for out in generate(served, job.ids, job.params, metrics, mm=job.mm, cache_salt=req.cache_salt):
            for c in out.outputs:
                i = c.index
                if done[i]:
                    continue
                new_toks = c.token_ids[sent_toks[i]:]
                if len(c.text) == sent_text[i] and not new_toks and not c.finished:
                    continue
                delta = _delta(job, calls[i], thinking[i], c.text, c.text[sent_text[i]:], c.finished)
                if not delta and not c.finished:
                    continue  # held back (a possible marker, dropped reasoning): the tokens go with the next chunk
                lps = c.logprobs[sent_toks[i]:] if c.logprobs is not None else None
                finish = c.finish_reason
                if finish == "stop" and calls[i] is not None and calls[i].called:
                    finish = "tool_calls"
                choice = {"index": i, "delta": delta,
                          "logprobs": chat_logprobs(names, new_toks, lps, req.top_logprobs or 0),
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
