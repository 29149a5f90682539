"""Prometheus metrics of a router replica (its own registry, no process-global state)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily


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

    def render(self) -> bytes:
        return generate_latest(self.registry)
