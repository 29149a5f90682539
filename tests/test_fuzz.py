"""Fuzzing: schemathesis drives a real worker and a real router (the manager's) from their own
/openapi.json, the raw-ASGI inference routes included, with data that fits the schemas and data
that does not. Every answer must be a 2xx, or an error in OpenAI's shape with a status the schema
documents and that makes sense for the route (never a 5xx), within a time limit (no hang), and
the processes must still serve normal requests afterwards with no KV block left held.

Bounded and deterministic: a fixed number of examples per operation, derandomized generation, no
shrinking, and generated requests ask for at most a few tokens."""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
import schemathesis.checks as checks
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from procs import start_manager, start_worker, wait_until
from schemathesis import GenerationMode

TOKEN = "worker-secret-fuzz"
WAUTH = {"Authorization": f"Bearer {TOKEN}"}
MODELS = ["llama", "minilm"]
EXAMPLES = 25  # per operation and target; the inference routes take most of the time
CALL_TIMEOUT = 30  # seconds: a request past it is a hang
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, checks.negative_data_rejection]
# Statuses that make sense per target (each operation's own list is in its schema).
WORKER_STATUSES = {400, 404, 405, 413}
ROUTER_STATUSES = {400, 401, 404, 405, 413}  # no rate limits here; 5xx would mean a worker failed


@pytest.fixture(scope="module")
def cluster(model_dir, minilm_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    mgr, url = start_manager(tmp, "--worker-token", TOKEN, "--data-dir", str(tmp / "redis"))
    try:
        worker, wurl = start_worker(tmp, f"llama={model_dir / 'tiny-llama'},minilm={minilm_dir}",
                                    "--manager-url", url, "--heartbeat-interval", "1",
                                    env={"WORKER_TOKEN": TOKEN}, ready_headers=WAUTH)
        try:
            wait_until(lambda: sorted(m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]) == MODELS,
                       what="models routed")
            yield {"router": url, "worker": wurl}
        finally:
            assert worker.stop() == 0, worker.log()[-3000:]
    finally:
        mgr.stop()


def focused_schema(url: str) -> dict:
    """The app's published schema with ``model`` limited to the served names, so that generated
    requests reach the models rather than all ending in 404."""
    raw = httpx.get(f"{url}/openapi.json").json()
    for name, comp in raw["components"]["schemas"].items():
        if name.endswith("Request") and "model" in comp.get("properties", {}):
            comp["properties"]["model"] = {"enum": MODELS}
    return raw


def bounded(case) -> None:
    """Generated requests ask for at most 4 tokens and 8 choices: the run tests the API, not how
    fast a tiny model writes long answers."""
    body = case.body
    if not isinstance(body, dict):
        return
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 4  # absent, a request may run to the end of the context
    for key, cap in (("max_tokens", 4), ("max_completion_tokens", 4), ("n", 8)):
        v = body.get(key)
        if type(v) is int and v > cap:
            body[key] = cap


def openai_error(response) -> str | None:
    """Why an error response is not in OpenAI's shape (None when it is)."""
    try:
        err = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"not an OpenAI error object: {response.text[:200]!r}"
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
        return f"error keys {sorted(err) if isinstance(err, dict) else err!r}"
    if not isinstance(err["message"], str) or not err["message"]:
        return "empty error message"
    return None


def fuzz(url: str, statuses: set[int], headers: dict | None = None) -> tuple[list[str], int]:
    """Every operation of ``url``'s schema, EXAMPLES times, positive and negative data; returns the
    findings (empty when all is well) and the number of requests sent."""
    schema = schemathesis.openapi.from_dict(focused_schema(url))
    findings: list[str] = []
    sent = sum(fuzz_operation(result.ok(), url, statuses, headers, findings)
               for result in schema.get_all_operations())
    return findings, sent


def fuzz_operation(op, url: str, statuses: set[int], headers: dict | None, findings: list[str]) -> int:
    """One operation's examples; what is wrong goes to ``findings``; returns the requests sent."""
    sent = 0

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE)))
    def run(case):
        nonlocal sent
        bounded(case)
        body = json.dumps(case.body, default=str)[:300]
        sent += 1
        try:
            response = case.call(base_url=url, headers=headers, timeout=CALL_TIMEOUT)
        except Exception as e:  # no answer in time, or the connection dropped
            findings.append(f"{op.label}: no answer ({type(e).__name__}: {e}) to {body}")
            return
        try:
            case.validate_response(response, checks=CHECKS)
        except BaseException as e:  # schemathesis' FailureGroup: all failed checks at once
            findings.append(f"{op.label}: {str(e)[:800]}")
        if response.status_code >= 400:
            why = openai_error(response)
            if why or response.status_code not in statuses:
                findings.append(f"{op.label}: {response.status_code} {why or 'unexpected status'} for {body}")

    run()
    return sent


def worker_metric(url: str, name: str, model: str = "llama") -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + "{") and f'model_name="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def assert_still_serving(cluster) -> None:
    for url, headers in ((cluster["worker"], WAUTH), (cluster["router"], {})):
        r = httpx.post(f"{url}/v1/completions", json={"model": "llama", "prompt": "still fine", "max_tokens": 3,
                                                      "ignore_eos": True}, headers=headers, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
        r = httpx.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": "still fine"}, headers=headers)
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
    wait_until(lambda: worker_metric(cluster["worker"], "vllm:num_requests_running") == 0
               and worker_metric(cluster["worker"], "vllm:kv_cache_usage_perc") == 0.0, what="KV blocks freed")


def test_router_snapshot_of_request_schemas_matches_the_worker_models():
    """The router publishes the worker's request schemas from a snapshot (it may not import the
    worker): regenerate it with ``python -m worker.openapi`` when a request model changes."""
    from clusterkit.openapi import request_components
    from worker.openapi import request_components as live

    assert request_components() == json.loads(json.dumps(live())), "run: python -m worker.openapi"


@pytest.mark.parametrize("target", ["worker", "router"])
def test_openapi_lists_every_route_with_openai_errors(cluster, target):
    url = cluster[target]
    schema = httpx.get(f"{url}/openapi.json").json()
    raw = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    for path in raw + ["/tokenize", "/detokenize", "/v1/models", "/health", "/metrics"]:
        assert path in schema["paths"], path
    comps = schema["components"]["schemas"]
    for path, name in zip(raw, ["ChatCompletionRequest", "CompletionRequest", "EmbeddingRequest"]):
        op = schema["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
        assert {"400", "401", "404", "408", "413"} <= set(op["responses"])
    props = comps["ChatCompletionRequest"]["properties"]
    assert props["n"]["maximum"] == 128 and "messages" in comps["ChatCompletionRequest"]["required"]
    assert "text/event-stream" in schema["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    if target == "router":
        assert {"429", "503"} <= set(schema["paths"]["/v1/completions"]["post"]["responses"])
        assert schema["paths"]["/tokenize"]["post"]["requestBody"]  # served raw by the router
    # Validation errors are 400s in OpenAI's shape, never FastAPI's 422 (nor its error models).
    text = json.dumps(schema)
    assert '"422"' not in text and "HTTPValidationError" not in text
    assert schema["paths"]["/tokenize"]["post"]["responses"]["400"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/ErrorResponse"}
    ids = [op["operationId"] for item in schema["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))  # GET and POST /ping no longer share one


def test_fuzz_worker(cluster):
    findings, sent = fuzz(cluster["worker"], WORKER_STATUSES, WAUTH)
    assert not findings, "\n\n".join(findings)
    assert sent >= 5 * EXAMPLES  # the generated operations really ran
    assert_still_serving(cluster)


def test_fuzz_router(cluster):
    findings, sent = fuzz(cluster["router"], ROUTER_STATUSES)
    assert not findings, "\n\n".join(findings)
    assert sent >= 5 * EXAMPLES
    assert_still_serving(cluster)
    # The worker is still registered, ready (the fuzz cannot write the registry without the token).
    workers = httpx.get(f"{cluster['router']}/workers", headers=WAUTH).json()
    assert [w["status"] for w in workers] == ["ready"]
