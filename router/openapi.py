"""The router's ``/openapi.json``: FastAPI's routes plus the OpenAI routes :mod:`router.front`
serves raw (/v1/chat/completions, /v1/completions, /v1/embeddings, /tokenize, /detokenize).

Their request bodies are the worker's (the router forwards them unchanged), taken from the
snapshot in :mod:`clusterkit.openapi` rather than from ``worker.protocol``: the router loads
nothing of the worker (SPEC §7). Besides the worker's errors, which pass through, the router
answers 429 (rate limits), 502/504 (no worker answered, or not in time) and 503 (no live worker)."""

from __future__ import annotations

from clusterkit.openapi import inference_routes, publish, request_components

ERRORS = (400, 401, 404, 408, 413, 429, 502, 503, 504)


def publish_openapi(app) -> None:
    """List the proxied routes in ``app``'s ``/openapi.json``."""
    publish(app, inference_routes(ERRORS, tokenize=True), request_components())
