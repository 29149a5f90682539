"""What every generation endpoint shares: engine outputs with metrics recorded, response ids,
SSE framing, usage and the error event that ends a broken stream."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from engine import SamplingParams
from engine.outputs import RequestOutput

from .metrics import WorkerMetrics
from .vllm_manager import ServedModel


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_event(e: Exception) -> dict:
    """The last event of a stream that broke after it started."""
    return {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error", "param": None,
                      "code": 500}}


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
                   prompt: str | None = None, mm=None, cache_salt: str | None = None
                   ) -> AsyncIterator[RequestOutput]:
    """Engine outputs for one prompt, with metrics recorded."""
    tracker = Tracker(metrics, served.name)
    finished = False
    try:
        async for out in served.generate(ids, params, prompt, mm, cache_salt):
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
