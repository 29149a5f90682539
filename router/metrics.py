"""Prometheus metrics of a router replica (its own registry, no process-global state)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class _Live:
    def __init__(self, inflight: Callable[[], dict[str, int]], breakers: Callable[[], dict[str, int]]):
        self._inflight, self._breakers = inflight, breakers

    def collect(self):
        g = GaugeMetricFamily("router_worker_inflight_requests",
                              "Requests in flight per worker, all router replicas", labels=["worker"])
        for wid, n in self._inflight().items():
            g.add_metric([wid], n)
        b = GaugeMetricFamily("router_worker_breaker_open", "1 while a worker's circuit breaker is open",
                              labels=["worker"])
        for wid, state in self._breakers().items():
            b.add_metric([wid], state)
        yield g
        yield b


class _KVAware:
    """kv_aware's decisions (router/kv_policy.py ``KVStats``) and its index (router/kv_index.py)."""

    def __init__(self, chooser, index):
        self.chooser, self.index = chooser, index

    def collect(self):
        s = self.chooser.stats
        routed = CounterMetricFamily("router_kv_routed", "kv_aware decisions: to a worker holding part of the "
                                     "prompt (cache) or by load alone (load)", labels=["by"])
        routed.add_metric(["cache"], s.by_cache)
        routed.add_metric(["load"], s.by_load)
        yield routed
        yield CounterMetricFamily("router_kv_untokenized", "Requests kv_aware could not tokenize (tokenizer not "
                                  "fetched yet, own chat template, images): routed by load", value=s.untokenized)
        yield CounterMetricFamily("router_kv_prompt_tokens", "Prompt tokens of the requests kv_aware tokenized",
                                  value=s.prompt_tokens)
        yield CounterMetricFamily("router_kv_cached_tokens", "Of those, tokens the chosen worker held per the index",
                                  value=s.cached_tokens)
        yield CounterMetricFamily("router_kv_route_cpu_seconds", "CPU time kv_aware spent choosing (tokenizing, "
                                  "hashing, index lookups)", value=s.route_seconds)
        ix = self.index
        yield GaugeMetricFamily("router_kv_index_blocks", "Block hashes in the cluster-wide KV index", value=len(ix))
        yield GaugeMetricFamily("router_kv_index_engines", "Engines (worker, model) in the KV index",
                                value=ix.engines())
        yield GaugeMetricFamily("router_kv_event_lag_seconds", "Age of the last KV event applied, when applied "
                                "(worker step to this replica's index)", value=ix.lag_seconds)
        yield CounterMetricFamily("router_kv_events_applied", "KV event entries applied to the index",
                                  value=ix.events_applied)
        yield CounterMetricFamily("router_kv_index_resyncs", "Engines re-read from Redis (start, gaps, snapshots)",
                                  value=ix.resyncs)
        yield CounterMetricFamily("router_kv_index_dropped_blocks", "Block hashes refused by the index's memory "
                                  "bound", value=ix.dropped_blocks)


class RouterMetrics:
    def __init__(self, inflight: Callable[[], dict[str, int]], breakers: Callable[[], dict[str, int]]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("router_requests", "Requests routed, by final status",
                                ["model", "endpoint", "status"], registry=r)
        self.errors = Counter("router_errors", "Requests that ended in an error", ["model", "reason"],
                              registry=r)
        self.retries = Counter("router_retries", "Attempts retried on another worker", ["model", "reason"],
                               registry=r)
        self.latency = Histogram("router_request_latency_seconds", "Time to the response head",
                                 ["model", "endpoint"], registry=r,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                                          5, 10, 30, 60))
        r.register(_Live(inflight, breakers))

    def add_kv_aware(self, chooser, index) -> None:
        """Export the kv_aware policy's decisions and index."""
        self.registry.register(_KVAware(chooser, index))

    def render(self) -> bytes:
        return generate_latest(self.registry)
