"""Turning OpenAI requests into engine requests and engine outputs into OpenAI responses."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from engine import SamplingParams
from engine.outputs import RequestOutput
from engine.sampling_params import InvalidParameter

from .errors import APIError
from .media import MediaPolicy, load_image
from .metrics import WorkerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, SamplingFields
from .vllm_manager import ServedModel


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


# -- prompts -------------------------------------------------------------------------------------
def _content_of(content, images: list | None):
    """Message content for the chat template. Text parts are joined; with ``images`` (a VL model)
    image parts stay as ``{"type": "image"}`` placeholders and are collected, in order."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts, parts = [], []
    for i, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(400, f"messages content part {i} of type text needs a string 'text'",
                               "messages")
            texts.append(part["text"])
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("image_url", "input_image", "image"):
            if images is None:
                raise APIError(400, "this model does not accept images", "messages")
            images.append(part)
            parts.append({"type": "image"})
        else:
            raise APIError(400, f"unsupported content part type {kind!r}", "messages")
    return parts if images is not None and len(parts) != len(texts) else "\n".join(texts)


def render_chat(served: ServedModel, messages, add_generation_prompt: bool = True,
                chat_template: str | None = None, images: list | None = None) -> list[int]:
    """Chat messages -> prompt token ids through the model's (or the configured) chat template.
    Image parts are appended to ``images`` (VL models) and leave one placeholder each."""
    template = chat_template or served.chat_template
    if not template:
        raise APIError(400, f"model {served.name!r} has no chat template; use /v1/completions or "
                            f"configure chat_template", "messages")
    if served.images is None:
        images = None
    msgs = [{"role": m.role, "content": _content_of(m.content, images),
             **({"name": m.name} if m.name else {})} for m in messages]
    try:
        text = served.tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                                    add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja errors: the template rejected these messages
        raise APIError(400, f"chat template failed: {e}", "messages") from e
    return served.tokenizer.encode(text, add_special_tokens=False)


def completion_prompts(served: ServedModel, prompt) -> list[tuple[str | None, list[int]]]:
    """The four prompt shapes of /v1/completions -> [(text or None, token ids)]."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append((p, served.tokenizer.encode(p, add_special_tokens=True)))
        else:
            out.append((None, list(p)))
    return out


# -- sampling ------------------------------------------------------------------------------------
def sampling_params(req: SamplingFields, served: ServedModel, prompt_len: int,
                    logprobs: int | None) -> SamplingParams:
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:
        max_tokens = max(1, served.max_model_len - prompt_len)
    kw = dict(n=req.n, max_tokens=max_tokens, stop=req.stop, stop_token_ids=req.stop_token_ids,
              seed=req.seed, ignore_eos=req.ignore_eos, logprobs=logprobs,
              skip_special_tokens=req.skip_special_tokens,
              include_stop_str_in_output=req.include_stop_str_in_output)
    for name, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("min_p", 0.0),
                          ("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                          ("repetition_penalty", 1.0)):
        value = getattr(req, name)
        kw[name] = default if value is None else value
    try:
        params = SamplingParams(**kw)
    except InvalidParameter as e:
        if e.param == "max_tokens" and req.max_completion_tokens is not None:
            raise InvalidParameter("max_completion_tokens", str(e).replace("max_tokens",
                                                                           "max_completion_tokens"))
        raise
    return params


def validate_prompt(served: ServedModel, ids: list[int], params: SamplingParams) -> None:
    """Context-length and vocabulary checks before anything streams (400s, not broken streams)."""
    served.engine.engine.validate_prompt(ids, params)


# -- per-request metrics ---------------------------------------------------------------------------
@dataclass
class Tracker:
    """Latency bookkeeping of one request for the vLLM histograms."""

    metrics: WorkerMetrics
    model: str
    start: float = field(default_factory=time.monotonic)
    first: float | None = None
    last: float | None = None
    tokens: int = 0

    def on_output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        total = sum(len(c.token_ids) for c in out.outputs)
        new = total - self.tokens
        if new <= 0:
            return
        if self.first is None:
            self.first = now
            self.metrics.ttft.labels(self.model).observe(now - self.start)
        elif self.last is not None:
            gap = (now - self.last) / new
            for _ in range(new):
                self.metrics.itl.labels(self.model).observe(gap)
        self.last = now
        self.tokens = total

    def on_finish(self, out: RequestOutput, n_prompts_tokens: int) -> None:
        m = self.model
        self.metrics.e2e.labels(m).observe(time.monotonic() - self.start)
        self.metrics.prompt_tokens.labels(m).inc(n_prompts_tokens)
        self.metrics.generation_tokens.labels(m).inc(sum(len(c.token_ids) for c in out.outputs))
        for c in out.outputs:
            self.metrics.request_success.labels(m, c.finish_reason or "abort").inc()


async def generate(served: ServedModel, ids: list[int], params: SamplingParams, metrics: WorkerMetrics,
                   prompt: str | None = None, mm=None) -> AsyncIterator[RequestOutput]:
    """Engine outputs for one prompt, with metrics recorded."""
    tracker = Tracker(metrics, served.name)
    finished = False
    try:
        async for out in served.engine.generate(prompt=prompt, prompt_token_ids=ids, params=params, mm=mm):
            tracker.on_output(out)
            if out.finished:
                finished = True
                tracker.on_finish(out, len(ids))
            yield out
    finally:
        if not finished:  # client gone or engine error: the engine request was aborted
            metrics.request_success.labels(served.name, "abort").inc(params.n)


async def final_output(agen: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async for out in agen:
        last = out
    assert last is not None
    return last


# -- logprobs formats ------------------------------------------------------------------------------
def _tok_str(served: ServedModel, tid: int) -> str:
    return served.tokenizer.decode([tid])


def chat_logprobs(served: ServedModel, token_ids: list[int], lps, top_n: int) -> dict | None:
    if lps is None:
        return None
    content = []
    for tid, d in zip(token_ids, lps):
        s = _tok_str(served, tid)
        top = sorted(d.items(), key=lambda kv: -kv[1])[:top_n]
        content.append({"token": s, "logprob": d[tid], "bytes": list(s.encode()),
                        "top_logprobs": [{"token": _tok_str(served, t), "logprob": v,
                                          "bytes": list(_tok_str(served, t).encode())} for t, v in top]})
    return {"content": content}


def completion_logprobs(served: ServedModel, token_ids: list[int], lps, top_n: int,
                        offset: int = 0) -> dict | None:
    if lps is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = offset
    for tid, d in zip(token_ids, lps):
        s = _tok_str(served, tid)
        tokens.append(s)
        token_lps.append(d[tid])
        top = sorted(d.items(), key=lambda kv: -kv[1])[:top_n]
        tops.append({_tok_str(served, t): v for t, v in top})
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# -- chat ------------------------------------------------------------------------------------------
async def prepare_chat(served: ServedModel, req: ChatCompletionRequest, media: MediaPolicy | None = None
                       ) -> tuple[list[int], SamplingParams, object]:
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
    validate_prompt(served, ids, params)
    return ids, params, mm


async def chat_full(served: ServedModel, req: ChatCompletionRequest, ids, params,
                    metrics: WorkerMetrics, mm=None) -> dict:
    out = await final_output(generate(served, ids, params, metrics, mm=mm))
    choices = []
    for c in out.outputs:
        choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                        "logprobs": chat_logprobs(served, c.token_ids, c.logprobs, req.top_logprobs or 0),
                        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
            "model": req.model, "choices": choices,
            "usage": usage(len(ids), sum(len(c.token_ids) for c in out.outputs))}


async def chat_stream(served: ServedModel, req: ChatCompletionRequest, ids, params,
                      metrics: WorkerMetrics, mm=None) -> AsyncIterator[str]:
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


def error_event(e: Exception) -> dict:
    return {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error", "param": None,
                      "code": 500}}


# -- completions -----------------------------------------------------------------------------------
def prepare_completion(served: ServedModel, req: CompletionRequest
                       ) -> list[tuple[str | None, list[int], SamplingParams]]:
    items = []
    for text, ids in completion_prompts(served, req.prompt):
        params = sampling_params(req, served, len(ids), req.logprobs)
        validate_prompt(served, ids, params)
        items.append((text, ids, params))
    return items


def _echo_text(served: ServedModel, text: str | None, ids: list[int]) -> str:
    return text if text is not None else served.tokenizer.decode(ids)


async def completion_full(served: ServedModel, req: CompletionRequest, items,
                          metrics: WorkerMetrics) -> dict:
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


async def completion_stream(served: ServedModel, req: CompletionRequest, items,
                            metrics: WorkerMetrics) -> AsyncIterator[str]:
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


# -- embeddings ------------------------------------------------------------------------------------
async def embeddings(served: ServedModel, req: EmbeddingRequest) -> dict:
    inp = req.input
    if isinstance(inp, str):
        inp = [inp]
    if inp and all(isinstance(x, int) for x in inp):
        inp = [inp]
    if not inp:
        raise APIError(400, "input must not be empty", "input")
    batch = [served.tokenizer.encode(x, add_special_tokens=True) if isinstance(x, str) else list(x)
             for x in inp]
    vocab = served.engine.engine.hf_config.vocab_size
    for ids in batch:
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"input token ids must be in [0, {vocab})", "input")
    vecs = await served.engine.embed(batch)
    if req.dimensions is not None:
        if not 0 < req.dimensions <= len(vecs[0]):
            raise APIError(400, f"dimensions must be in [1, {len(vecs[0])}]", "dimensions")
        vecs = [v[:req.dimensions] for v in vecs]
        if served.engine.engine.normalize:  # a truncated unit vector is renormalised
            vecs = [[x / (sum(y * y for y in v) ** 0.5 or 1.0) for x in v] for v in vecs]
    data = []
    for i, v in enumerate(vecs):
        emb = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() \
            if req.encoding_format == "base64" else v
        data.append({"object": "embedding", "index": i, "embedding": emb})
    n = sum(len(b) for b in batch)
    return {"object": "list", "data": data, "model": req.model,
            "usage": {"prompt_tokens": n, "total_tokens": n}}
