"""/v1/completions: one or more prompts, answered whole or as a stream.

``echo`` puts the prompt before each choice's text; with ``logprobs`` the prompt's tokens come
first in the logprobs too (the first one's logprob null: nothing precedes it), which is how
evaluation harnesses score a continuation (``echo``, ``logprobs: 1``, ``max_tokens: 0`` or 1)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine import SamplingParams
from engine.outputs import RequestOutput
from engine.sampling_params import InvalidParameter

from . import field_policy
from .logprobs import TokenNames, completion_logprobs, join, prompt_logprobs
from .metrics import WorkerMetrics
from .prompts import completion_prompts
from .protocol import CompletionRequest
from .sampling import sampling_params, truncate_prompt
from .streaming import SSE_DONE, error_event, final_output, generate, new_id, sse, usage
from .structured import compile_constraint, constraint_of
from .vllm_manager import ServedModel


@dataclass
class Item:
    """One prompt of the request, ready to run."""

    text: str | None
    ids: list[int]
    params: SamplingParams


async def prepare(served: ServedModel, req: CompletionRequest) -> list[Item]:
    """One item per prompt; 400s before anything runs."""
    field_policy.check(req.model_extra, field_policy.COMPLETIONS)
    field_policy.check_best_of((req.model_extra or {}).get("best_of"), req.n)
    if req.prompt_logprobs is not None and req.stream:
        raise InvalidParameter("prompt_logprobs", "prompt_logprobs are not available on streamed completions")
    max_tokens = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
    if max_tokens == 0 and not req.echo:
        raise InvalidParameter("max_tokens", "max_tokens must be >= 1 (0 is allowed only with echo)")
    # echo + logprobs scores the prompt: its tokens' logprobs come from the engine's prompt logprobs
    echo_lp = req.logprobs if req.echo and req.logprobs is not None else None
    want_prompt_lp = req.prompt_logprobs if req.prompt_logprobs is not None else echo_lp
    if want_prompt_lp is not None and echo_lp is not None:
        want_prompt_lp = max(want_prompt_lp, echo_lp)
    constraint, field = constraint_of(req)
    items = []
    for text, ids in completion_prompts(served, req.prompt, req.add_special_tokens):
        if req.truncate_prompt_tokens is not None:
            ids, text = truncate_prompt(req, served, ids), None
        params = sampling_params(req, served, len(ids), req.logprobs, constraint,
                                 prompt_logprobs=want_prompt_lp)
        served.validate_prompt(ids, params)
        items.append(Item(text, ids, params))
    await compile_constraint(served, constraint, field)
    return items


def _echo_text(served: ServedModel, item: Item) -> str:
    return item.text if item.text is not None else served.tokenizer.decode(item.ids)


def _echo_logprobs(names: TokenNames, req: CompletionRequest, item: Item, out: RequestOutput) -> dict | None:
    """The echoed prompt's part of the logprobs (None when none were asked for)."""
    if not req.echo or req.logprobs is None:
        return None
    return completion_logprobs(names, item.ids, out.prompt_logprobs, req.logprobs)


def _prompt_lps(names: TokenNames, req: CompletionRequest, item: Item, out: RequestOutput) -> dict:
    if req.prompt_logprobs is None:
        return {}
    return {"prompt_logprobs": prompt_logprobs(names, item.ids, out.prompt_logprobs, out.prompt_token_ranks,
                                               req.prompt_logprobs)}


async def full(served: ServedModel, req: CompletionRequest, items: list[Item], metrics: WorkerMetrics) -> dict:
    """The whole ``text_completion`` object (choices ordered prompt by prompt)."""
    outs = await asyncio.gather(*(final_output(generate(served, it.ids, it.params, metrics, it.text,
                                                        cache_salt=req.cache_salt))
                                  for it in items))
    names = TokenNames(served, req.return_tokens_as_token_ids)
    choices = []
    prompt_tokens = completion_tokens = 0
    for k, (item, out) in enumerate(zip(items, outs)):
        prompt_tokens += len(item.ids)
        prefix = _echo_text(served, item) if req.echo else ""
        echo_lps = _echo_logprobs(names, req, item, out)
        for c in out.outputs:
            completion_tokens += len(c.token_ids)
            lps = completion_logprobs(names, c.token_ids, c.logprobs, req.logprobs or 0, len(prefix))
            choices.append({"index": k * item.params.n + c.index, "text": prefix + c.text,
                            "logprobs": join(echo_lps, lps), "finish_reason": c.finish_reason,
                            "stop_reason": c.stop_reason, **_prompt_lps(names, req, item, out)})
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
            "model": req.model, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


async def stream(served: ServedModel, req: CompletionRequest, items: list[Item],
                 metrics: WorkerMetrics) -> AsyncIterator[str]:
    """SSE events of every prompt's choices as they progress, ending with ``[DONE]``. An echoed
    prompt goes first; with logprobs it waits for the prompt's logprobs (after its prefill)."""
    rid, created = new_id("cmpl"), int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base = {"id": rid, "object": "text_completion", "created": created, "model": req.model}
    extra = {"usage": None} if include_usage else {}
    names = TokenNames(served, req.return_tokens_as_token_ids)
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, item: Item):
        try:
            async for out in generate(served, item.ids, item.params, metrics, item.text, cache_salt=req.cache_salt):
                await queue.put((k, out))
        except Exception as e:
            await queue.put((k, e))
        finally:
            await queue.put((k, None))

    def echo_events(k: int, out: RequestOutput | None):
        item = items[k]
        text = _echo_text(served, item)
        lps = _echo_logprobs(names, req, item, out) if out is not None else None
        for i in range(item.params.n):
            yield sse({**base, "choices": [{"index": k * item.params.n + i, "text": text, "logprobs": lps,
                                            "finish_reason": None}], **extra})

    tasks = [asyncio.create_task(pump(k, it)) for k, it in enumerate(items)]
    sent: dict[tuple[int, int], tuple[int, int]] = {}
    comp_tokens = [0] * len(items)
    echo_pending = [req.echo] * len(items)
    live = len(items)
    try:
        if req.echo and req.logprobs is None:
            for k in range(len(items)):
                echo_pending[k] = False
                for event in echo_events(k, None):
                    yield event
        while live:
            k, out = await queue.get()
            if out is None:
                live -= 1
                continue
            if isinstance(out, Exception):
                yield sse(error_event(out))
                yield SSE_DONE
                return
            if echo_pending[k]:
                echo_pending[k] = False
                for event in echo_events(k, out):
                    yield event
            n = items[k].params.n
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
                    "logprobs": completion_logprobs(names, toks, lps, req.logprobs or 0),
                    "finish_reason": c.finish_reason,
                    **({"stop_reason": c.stop_reason} if c.finished else {})}], **extra})
                sent[(k, c.index)] = (-1, -1) if c.finished else (len(c.text), len(c.token_ids))
            comp_tokens[k] = sum(len(c.token_ids) for c in out.outputs)
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(sum(len(it.ids) for it in items), sum(comp_tokens))})
        yield SSE_DONE
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
