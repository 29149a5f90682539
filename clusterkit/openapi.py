"""``/openapi.json`` for every route, the raw-ASGI ones included, with errors as clients get them.

The inference routes of the worker and the router are raw ASGI layers in front of their FastAPI
apps (``worker/front.py``, ``router/front.py``), so FastAPI's generated schema does not list them.
:func:`publish` adds them to an app's schema, each with its JSON request body (a component: the
worker's pydantic request models, see :func:`request_components`), its 200 answers (JSON, and SSE
for the streaming routes) and its error statuses. It also describes FastAPI's own routes as they
really answer: every error in OpenAI's shape (:data:`ERROR_SCHEMA`), a bad body or parameter 400
(FastAPI's generic 422 never reaches a client here), anything else under ``default``.

The request bodies come from one place: ``worker.protocol``'s models. The router may not import the
worker (SPEC §7), so it publishes a snapshot of their JSON schemas kept beside this module,
``openapi_requests.json``, written by ``python -m worker.openapi`` and checked against the models
by the tests. The router forwards bodies unchanged, so the worker's schema is the router's
contract too (it checks only that the body is a JSON object naming a ``model``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

REQUESTS_SNAPSHOT = Path(__file__).with_name("openapi_requests.json")

ERROR = "ErrorResponse"
ERROR_SCHEMA = {
    "type": "object", "required": ["error"], "title": ERROR,
    "description": "OpenAI's error shape, for every error of every route.",
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"], "description": "the request field at fault"},
                       "code": {"type": ["string", "integer", "null"]}}}}}

STATUS_TEXT = {
    400: "Bad parameters, a body that is not valid JSON, or a prompt longer than the model's context",
    401: "Missing or wrong bearer key",
    404: "Unknown model (or path)",
    408: "The request (head or body) did not arrive in time; the connection is closed",
    413: "Body or image too large",
    429: "Rate-limited (see Retry-After)",
    502: "No worker answered the request",
    503: "No live worker serves the model (or a dependency is unreachable)",
    504: "No worker answered in time",
}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def error_response(status: int | str) -> dict:
    """The response object of one error status (or ``default``)."""
    text = STATUS_TEXT.get(status, "Any other error") if isinstance(status, int) else "Any other error"
    return {"description": text, "content": {"application/json": {"schema": _ref(ERROR)}}}


def _obj(required: list[str], **props) -> dict:
    return {"type": "object", "required": required, "properties": props}


_STR, _INT = {"type": "string"}, {"type": "integer"}
USAGE = _obj(["prompt_tokens", "total_tokens"], prompt_tokens=_INT, completion_tokens=_INT, total_tokens=_INT)
CHAT_COMPLETION = _obj(["id", "object", "created", "model", "choices", "usage"], id=_STR,
                       object={"const": "chat.completion"}, created=_INT, model=_STR, usage=USAGE,
                       choices={"type": "array", "items": _obj(["index", "message", "finish_reason"],
                                                               index=_INT, message={"type": "object"})})
COMPLETION = _obj(["id", "object", "created", "model", "choices", "usage"], id=_STR,
                  object={"const": "text_completion"}, created=_INT, model=_STR, usage=USAGE,
                  choices={"type": "array", "items": _obj(["index", "text", "finish_reason"],
                                                          index=_INT, text=_STR)})
EMBEDDINGS = _obj(["object", "data", "model", "usage"], object={"const": "list"}, model=_STR, usage=USAGE,
                  data={"type": "array", "items": _obj(["index", "embedding"], index=_INT)})
TOKENIZE = _obj(["count", "tokens", "max_model_len"], count=_INT, max_model_len=_INT,
                tokens={"type": "array", "items": _INT})
DETOKENIZE = _obj(["prompt"], prompt=_STR)
SSE_EVENT = {**_obj(["data"], data=_STR), "description": "data: one JSON chunk (an error object when the "
                                                         "stream fails); the last event's data is [DONE]"}


@dataclass(frozen=True)
class RawRoute:
    """A raw-ASGI POST route as ``/openapi.json`` describes it: the component name of its JSON
    body, the JSON schema of its 200 answer, whether it may stream (SSE), its error statuses."""

    path: str
    summary: str
    request: str
    answer: dict
    streams: bool = False
    errors: tuple[int, ...] = (400, 401, 404, 408, 413)

    def operation(self) -> dict:
        ok = {"application/json": {"schema": self.answer}}
        if self.streams:  # one event (as OpenAPI before 3.2 reads an SSE schema)
            ok["text/event-stream"] = {"schema": SSE_EVENT}
        return {"summary": self.summary, "operationId": self.path.strip("/").replace("/", "_"),
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(self.request)}}},
                "responses": {"200": {"description": "The answer (a stream of SSE events with stream: true)"
                                      if self.streams else "The answer", "content": ok},
                              **{str(s): error_response(s) for s in self.errors}}}


def inference_routes(errors: tuple[int, ...], tokenize: bool = False) -> list[RawRoute]:
    """The OpenAI routes served raw (``tokenize``: /tokenize and /detokenize too, as the router
    serves them), each answering ``errors``."""
    routes = [RawRoute("/v1/chat/completions", "Chat completion", "ChatCompletionRequest", CHAT_COMPLETION,
                       True, errors),
              RawRoute("/v1/completions", "Completion", "CompletionRequest", COMPLETION, True, errors),
              RawRoute("/v1/embeddings", "Embeddings", "EmbeddingRequest", EMBEDDINGS, False, errors)]
    if tokenize:
        routes += [RawRoute("/tokenize", "Tokenize a prompt or chat", "TokenizeRequest", TOKENIZE, False, errors),
                   RawRoute("/detokenize", "Token ids to text", "DetokenizeRequest", DETOKENIZE, False, errors)]
    return routes


def request_components() -> dict[str, dict]:
    """The request bodies' JSON schemas (components) from the snapshot of ``worker.protocol``."""
    return json.loads(REQUESTS_SNAPSHOT.read_text())


def _describe(schema: dict, routes: list[RawRoute], components: dict[str, dict]) -> None:
    """FastAPI's generated ``schema`` -> what the app serves (in place)."""
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        comps.pop(name, None)
    comps[ERROR] = ERROR_SCHEMA
    for name, body in components.items():
        comps.setdefault(name, body)
    seen: set[str] = set()
    for item in schema.setdefault("paths", {}).values():
        for method, op in item.items():
            responses = op.setdefault("responses", {})
            if responses.pop("422", None) is not None:  # ours are 400s, in OpenAI's shape
                responses["400"] = error_response(400)
            responses.setdefault("default", error_response("default"))
            if op.get("operationId") in seen:  # FastAPI repeats one id for a route with several methods
                op["operationId"] = f"{op['operationId']}_{method}"
            seen.add(op.get("operationId"))
    for r in routes:
        schema["paths"].setdefault(r.path, {})["post"] = r.operation()


def publish(app, routes: list[RawRoute], components: dict[str, dict]) -> None:
    """Make ``app``'s ``/openapi.json`` list ``routes`` (raw ASGI, below the same root path as the
    app's own) with their request ``components``, and describe its errors as they are sent."""
    generate = app.openapi
    described: dict | None = None

    def openapi() -> dict:
        nonlocal described
        schema = generate()  # cached by FastAPI; a new dict only when routes were added since
        if schema is not described:
            _describe(schema, routes, components)
            described = schema
        return schema

    app.openapi = openapi
