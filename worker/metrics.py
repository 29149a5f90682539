"""Prometheus metrics of a worker, named as vLLM names them so existing dashboards work."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 10.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0)


class _LoadCollector:
    """Gauges read from the engines at scrape time, so they can never drift."""

    def __init__(self, load: Callable[[], dict[str, dict]]):
        self._load = load

    def collect(self):
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests running on the engine",
                                    labels=["model_name"])
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting to be scheduled",
                                    labels=["model_name"])
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc",
                               "Share of KV blocks held by live requests (1 = full)",
                               labels=["model_name"])
        free = GaugeMetricFamily("vllm:num_free_kv_blocks",
                                 "KV blocks free or holding only evictable prefix-cache data",
                                 labels=["model_name"])
        for name, s in self._load().items():
            running.add_metric([name], s.get("num_running", 0))
            waiting.add_metric([name], s.get("num_waiting", 0))
            kv.add_metric([name], s.get("kv_cache_usage", 0.0))
            if "num_free_blocks" in s:
                free.add_metric([name], s["num_free_blocks"])
        yield from (running, waiting, kv, free)


class WorkerMetrics:
    """All metrics of one worker in their own registry (no process-global state)."""

    def __init__(self, load: Callable[[], dict[str, dict]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed",
                                     ["model_name"], registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generation tokens produced",
                                         ["model_name"], registry=r)
        self.request_success = Counter("vllm:request_success", "Requests finished",
                                       ["model_name", "finished_reason"], registry=r)
        self.request_errors = Counter("worker:request_errors", "Requests answered with an error",
                                      ["model_name", "status"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token",
                              ["model_name"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens",
                             ["model_name"], buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to end",
                             ["model_name"], buckets=E2E_BUCKETS, registry=r)
        r.register(_LoadCollector(load))

    def render(self) -> bytes:
        return generate_latest(self.registry)
