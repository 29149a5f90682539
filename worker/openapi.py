"""The worker's ``/openapi.json``: FastAPI's routes plus the raw-ASGI inference routes of
:mod:`worker.front`, whose bodies are the request models of :mod:`worker.protocol` (their JSON
schemas as validation reads them, bounds included).

``python -m worker.openapi [PATH]`` writes those schemas to the snapshot the router publishes
(``clusterkit/openapi_requests.json``; the router may not import the worker): run it after
changing a request model (a test fails until the snapshot matches)."""

from __future__ import annotations

import json
import sys

from pydantic.json_schema import models_json_schema

from clusterkit.openapi import REQUESTS_SNAPSHOT, inference_routes, publish

from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest, TokenizeRequest

REQUEST_MODELS = (ChatCompletionRequest, CompletionRequest, EmbeddingRequest, TokenizeRequest, DetokenizeRequest)
# What the inference routes answer besides 200 (a dead engine's 503 is under "default").
ERRORS = (400, 401, 404, 408, 413)


def request_components() -> dict[str, dict]:
    """Component name -> JSON schema of every request model and the models they hold."""
    _, defs = models_json_schema([(m, "validation") for m in REQUEST_MODELS],
                                 ref_template="#/components/schemas/{model}")
    return defs["$defs"]


def publish_openapi(app) -> None:
    """List the inference routes in ``app``'s ``/openapi.json``."""
    publish(app, inference_routes(ERRORS), request_components())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else str(REQUESTS_SNAPSHOT)
    with open(path, "w") as f:
        json.dump(request_components(), f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
