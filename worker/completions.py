"""/v1/completions: one or more prompts, answered whole or as a stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from engine import SamplingParams

from .logprobs import completion_logprobs
from .metrics import WorkerMetrics
from .prompts import completion_prompts
from .protocol import CompletionRequest
from .sampling import sampling_params
from .streaming import SSE_DONE, error_event, final_output, generate, new_id, sse, usage
from .structured import compile_constraint, constraint_of
from .vllm_manager import ServedModel


async def prepare(served: ServedModel, req: CompletionRequest) -> list[tuple[str | None, list[int], SamplingParams]]:
    """(text, ids, params) per prompt; 400s before anything runs."""
    constraint, field = constraint_of(req)
    items = []
    for text, ids in completion_prompts(served, req.prompt):
        params = sampling_params(req, served, len(ids), req.logprobs, constraint)
        served.validate_prompt(ids, params)
        items.append((text, ids, params))
    await compile_constraint(served, constraint, field)
    return items


def _echo_text(served: ServedModel, text: str | None, ids: list[int]) -> str:
    return text if text is not None else served.tokenizer.decode(ids)


async def full(served: ServedModel, req: CompletionRequest, items, metrics: WorkerMetrics) -> dict:
    """The whole ``text_completion`` object (choices ordered prompt by prompt)."""
    outs = await asyncio.gather(*(final_output(generate(served, ids, p, metrics, text))
                                  for text, ids, p in items))
    choices = []
    prompt_tokens = completion_tokens = 0
    for k, ((text, ids, p), out) in enumerate(zip(items, outs)):
        prompt_tokens += len(ids)
        prefix = _echo_text(served, text, ids) if req.echo else ""
        for c in out.outputs:
            completion_tokens += len(c.token_ids)
            choices.append({"index": k * p.n + c.index, "text": prefix + c.text,
                            "logprobs": completion_logprobs(served, c.token_ids, c.logprobs,
                                                            req.logprobs or 0, len(prefix)),
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
            "model": req.model, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


async def stream(served: ServedModel, req: CompletionRequest, items, metrics: WorkerMetrics) -> AsyncIterator[str]:
    """SSE events of every prompt's choices as they progress, ending with ``[DONE]``."""
    rid, created = new_id("cmpl"), int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base = {"id": rid, "object": "text_completion", "created": created, "model": req.model}
    extra = {"usage": None} if include_usage else {}
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k, text, ids, p):
        try:
            async for out in generate(served, ids, p, metrics, text):
                await queue.put((k, out))
        except Exception as e:
            await queue.put((k, e))
        finally:
            await queue.put((k, None))

    tasks = [asyncio.create_task(pump(k, t, ids, p)) for k, (t, ids, p) in enumerate(items)]
    sent: dict[tuple[int, int], tuple[int, int]] = {}
    comp_tokens = [0] * len(items)
    live = len(items)
    try:
        if req.echo:
            for k, (text, ids, p) in enumerate(items):
                for i in range(p.n):
                    yield sse({**base, "choices": [{"index": k * p.n + i, "text": _echo_text(served, text, ids),
                                                    "logprobs": None, "finish_reason": None}], **extra})
        while live:
            k, out = await queue.get()
            if out is None:
                live -= 1
                continue
            if isinstance(out, Exception):
                yield sse(error_event(out))
                yield SSE_DONE
                return
            n = items[k][2].n
            for c in out.outputs:
                st, tk = sent.get((k, c.index), (0, 0))
                if st == -1:
                    continue
                delta, toks = c.text[st:], c.token_ids[tk:]
                if not delta and not toks and not c.finished:
                    continue
                lps = c.logprobs[tk:] if c.logprobs is not None else None
                yield sse({**base, "choices": [{
                    "index": k * n + c.index, "text": delta,
                    "logprobs": completion_logprobs(served, toks, lps, req.logprobs or 0),
                    "finish_reason": c.finish_reason,
                    **({"stop_reason": c.stop_reason} if c.finished else {})}], **extra})
                sent[(k, c.index)] = (-1, -1) if c.finished else (len(c.text), len(c.token_ids))
            comp_tokens[k] = sum(len(c.token_ids) for c in out.outputs)
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(sum(len(i[1]) for i in items),
                                                             sum(comp_tokens))})
        yield SSE_DONE
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
