"""Prometheus metrics of a worker, named as vLLM names them so existing dashboards work.

Every per-model series exists from start-up at zero (as vLLM's do), so ``rate()`` works from the
first scrape; the engine's own counters (prefix-cache tokens, preemptions) and gauges are read at
scrape time, so they can never drift."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 10.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0)
FINISH_REASONS = ("stop", "length", "abort")

# (metric name, help, key in the engine's stats)
_GAUGES = (("vllm:num_requests_running", "Requests running on the engine", "num_running"),
           ("vllm:num_requests_waiting", "Requests waiting to be scheduled", "num_waiting"),
           ("vllm:kv_cache_usage_perc", "Share of KV blocks held by live requests (1 = full)", "kv_cache_usage"),
           ("vllm:num_free_kv_blocks", "KV blocks free or holding only evictable prefix-cache data",
            "num_free_blocks"))
_COUNTERS = (("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", "prefix_cache_queries"),
             ("vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache", "prefix_cache_hits"),
             ("vllm:num_preemptions", "Requests preempted (recomputed later) for lack of KV blocks",
              "num_preemptions"))


class _EngineCollector:
    """The engines' own gauges and counters, read from their stats at scrape time."""

    def __init__(self, load: Callable[[], dict[str, dict]]):
        self._load = load

    def collect(self):
        load = self._load()
        for name, doc, key in _GAUGES:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            for model, s in load.items():
                g.add_metric([model], s.get(key, 0))
            yield g
        for name, doc, key in _COUNTERS:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            for model, s in load.items():
                c.add_metric([model], s.get(key, 0))
            yield c


class WorkerMetrics:
    """All metrics of one worker in their own registry (no process-global state)."""

    def __init__(self, load: Callable[[], dict[str, dict]]):
        self.registry = r = CollectorRegistry()
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed",
                                     ["model_name"], registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generation tokens produced",
                                         ["model_name"], registry=r)
        self.request_success = Counter("vllm:request_success", "Requests finished",
                                       ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token",
                              ["model_name"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens",
                             ["model_name"], buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to end",
                             ["model_name"], buckets=E2E_BUCKETS, registry=r)
        r.register(_EngineCollector(load))
        for model in load():  # every series from start-up, at zero
            for metric in (self.prompt_tokens, self.generation_tokens, self.ttft, self.itl, self.e2e):
                metric.labels(model)
            for reason in FINISH_REASONS:
                self.request_success.labels(model, reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)
