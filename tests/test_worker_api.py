"""End-to-end: a real worker process with two tiny generation models and MiniLM, driven by the
official openai client and raw HTTP."""

from __future__ import annotations

import base64
import json
import struct
import time

import httpx
import openai
import pytest
import torch
from conftest import hf_greedy
from procs import start_worker


@pytest.fixture(scope="module")
def worker(model_dir, minilm_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("worker")
    proc, url = start_worker(tmp, f"llama={model_dir / 'tiny-llama'},{model_dir / 'tiny-qwen3'},"
                                  f"minilm={minilm_dir}")
    yield url
    assert proc.stop() == 0, proc.log()[-2000:]
    assert "deregistered" not in proc.log()  # standalone: no manager


@pytest.fixture(scope="module")
def client(worker):
    return openai.OpenAI(base_url=f"{worker}/v1", api_key="unused", max_retries=0)


def metric(url: str, name: str, model: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model_name="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_models_listed_with_names_as_given(client, model_dir):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["llama", str(model_dir / "tiny-qwen3"), "minilm"]


def test_greedy_chat_equals_transformers_generate_with_exact_usage(client, hf_reference):
    hf, tok = hf_reference("llama")
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there!"}]
    r = client.chat.completions.create(model="llama", messages=messages, temperature=0, max_tokens=24,
                                       extra_body={"ignore_eos": True})
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    ref = hf_greedy(hf, list(ids), 24)
    assert r.choices[0].message.content == tok.decode(ref, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 24
    assert r.usage.total_tokens == len(ids) + 24
    assert r.choices[0].finish_reason == "length"


def test_completions_prompt_shapes_echo_and_logprobs(client, model_dir, hf_reference):
    name = str(model_dir / "tiny-qwen3")
    hf, tok = hf_reference("qwen3")
    ids = tok.encode("count: one two")
    r = client.completions.create(model=name, prompt=["count: one two", ids], temperature=0, max_tokens=8,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == r.choices[1].text == tok.decode(hf_greedy(hf, ids, 8))
    assert r.usage.prompt_tokens == 2 * len(ids) and r.usage.completion_tokens == 16
    e = client.completions.create(model=name, prompt="count: one two", temperature=0, max_tokens=8,
                                  echo=True, logprobs=3, extra_body={"ignore_eos": True})
    c = e.choices[0]
    assert c.text == "count: one two" + r.choices[0].text
    # the echoed prompt's tokens come first (the first has no logprob), then the 8 generated
    assert len(c.logprobs.tokens) == len(ids) + 8 and len(c.logprobs.top_logprobs) == len(ids) + 8
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert all(len(t) >= 1 for t in c.logprobs.top_logprobs[1:])
    with torch.inference_mode():
        full = torch.tensor([ids + hf_greedy(hf, ids, 8)])
        ref = torch.log_softmax(hf(full).logits[0], -1)
    for k, lp in enumerate(c.logprobs.token_logprobs[len(ids):]):
        assert abs(lp - ref[len(ids) - 1 + k].max().item()) < 1e-4


def test_streaming_chat_matches_non_stream_and_reports_usage(client):
    kw = dict(model="llama", messages=[{"role": "user", "content": "Stream please"}], temperature=0,
              max_tokens=20, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_raw_sse_framing_ends_with_done(worker):
    body = {"model": "llama", "prompt": "hello", "max_tokens": 5, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{worker}/v1/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_n_two_seeded_choices_differ_and_repeat(client):
    kw = dict(model="llama", messages=[{"role": "user", "content": "Pick"}], temperature=1.0,
              max_tokens=12, n=2, seed=123, extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert a.choices[0].message.content != a.choices[1].message.content
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens == 24
    streamed = list(client.chat.completions.create(stream=True, **kw))
    per_choice = {0: "", 1: ""}
    for ch in streamed:
        for c in ch.choices:
            per_choice[c.index] += c.delta.content or ""
    assert [per_choice[0], per_choice[1]] == [c.message.content for c in a.choices]


def test_stop_strings_and_chat_logprobs(client):
    kw = dict(model="llama", messages=[{"role": "user", "content": "Go on"}], temperature=0, max_tokens=30,
              extra_body={"ignore_eos": True})
    text = client.chat.completions.create(**kw).choices[0].message.content
    stop = text[7:10]
    r = client.chat.completions.create(stop=[stop], **kw)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[:text.index(stop)]
    lp = client.chat.completions.create(logprobs=True, top_logprobs=2, **kw).choices[0].logprobs.content
    assert len(lp) == 30 and all(len(t.top_logprobs) == 2 for t in lp)
    assert all(t.logprob <= 0 for t in lp)


def test_embeddings_float_and_base64(client, minilm_dir):
    from engine import LLM

    r = client.embeddings.create(model="minilm", input=["a cat", "a dog"])
    b = client.embeddings.create(model="minilm", input="a cat", encoding_format="base64")
    assert len(r.data) == 2 and len(r.data[0].embedding) == 384
    assert r.usage.prompt_tokens > 0
    ref = LLM(str(minilm_dir), dtype="float32").embed(["a cat"])[0]
    assert max(abs(x - y) for x, y in zip(r.data[0].embedding, ref)) < 1e-5
    decoded = b.data[0].embedding
    if isinstance(decoded, str):
        raw = base64.b64decode(decoded)
        decoded = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    assert max(abs(x - y) for x, y in zip(decoded, ref)) < 1e-5


def test_tokenize_detokenize(worker):
    r = httpx.post(f"{worker}/tokenize", json={"model": "llama", "prompt": "hello world"}).json()
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 1024
    d = httpx.post(f"{worker}/detokenize", json={"model": "llama", "tokens": r["tokens"]}).json()
    assert d["prompt"] == "hello world"
    chat = httpx.post(f"{worker}/tokenize", json={"model": "llama", "messages": [
        {"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 3


BAD = [
    ({"temperature": -1}, "temperature"), ({"top_p": 2}, "top_p"), ({"top_k": -5}, "top_k"),
    ({"min_p": 3}, "min_p"), ({"n": 0}, "n"), ({"max_tokens": 0}, "max_tokens"),
    ({"presence_penalty": 9}, "presence_penalty"), ({"frequency_penalty": -9}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"max_tokens": "many"}, "max_tokens"),
    ({"stop_token_ids": [-3]}, "stop_token_ids"), ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"messages": []}, "messages"),
]


@pytest.mark.parametrize("patch,param", BAD)
def test_bad_parameters_400_naming_the_field(worker, patch, param):
    body = {"model": "llama", "messages": [{"role": "user", "content": "x"}], **patch}
    r = httpx.post(f"{worker}/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and param in err["message"]
    assert err["type"] == "invalid_request_error"


def test_other_bad_inputs_and_worker_keeps_serving(worker, client):
    r = httpx.post(f"{worker}/v1/completions", json={"model": "llama", "prompt": "x " * 1000,
                                                     "max_tokens": 100})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "1024" in msg and "100" in msg  # both numbers: the limit and what was asked
    r = httpx.post(f"{worker}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{worker}/v1/completions", content=b'{"model": "llama", "prompt": ',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{worker}/v1/completions", content=b'{"model":"llama","prompt":"' + b"a" * (2 << 20) + b'"}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(f"{worker}/v1/embeddings", json={"model": "llama", "input": "x"})
    assert r.status_code == 400
    r = httpx.post(f"{worker}/v1/chat/completions", json={"model": "minilm", "messages": [
        {"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.post(f"{worker}/v1/completions", json=["not", "an", "object"])
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{worker}/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = httpx.post(f"{worker}/v1/completions", json={"model": "llama", "prompt": [10**8]})
    assert r.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="llama", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    ok = client.completions.create(model="llama", prompt="still fine", max_tokens=3)
    assert ok.choices[0].text is not None and ok.usage.completion_tokens >= 1
    assert metric(worker, "vllm:kv_cache_usage_perc", "llama") == 0.0


def finished(url: str, reason: str, model: str = "llama") -> float:
    """``vllm:request_success_total`` for one finish reason (0 before the first such request)."""
    key = f'vllm:request_success_total{{finished_reason="{reason}",model_name="{model}"}}'
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(key):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_idle(worker, model, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (metric(worker, "vllm:num_requests_running", model) == 0
                and metric(worker, "vllm:kv_cache_usage_perc", model) == 0.0):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "long story " * 20}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "long story " * 20}]}),
])
def test_disconnect_mid_stream_frees_kv_blocks(worker, path, body):
    body = {"model": "llama", "max_tokens": 600, "stream": True, "ignore_eos": True, **body}
    aborted, completed = finished(worker, "abort"), finished(worker, "length")
    with httpx.stream("POST", f"{worker}{path}", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: "):
                got += 1
            if got >= 5:
                break
        assert metric(worker, "vllm:kv_cache_usage_perc", "llama") > 0
    assert _wait_idle(worker, "llama"), "blocks were not returned after the client left"
    # Aborted, not run to its 600 tokens for nobody.
    assert finished(worker, "abort") == aborted + 1 and finished(worker, "length") == completed


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "keep going"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "keep going"}]}),
])
def test_disconnect_non_streaming_aborts(worker, path, body):
    body = {"model": "llama", "max_tokens": 1000, "ignore_eos": True, **body}
    aborted, completed = finished(worker, "abort"), finished(worker, "length")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{worker}{path}", json=body, timeout=0.3)
    assert _wait_idle(worker, "llama")
    assert finished(worker, "abort") == aborted + 1 and finished(worker, "length") == completed


def test_metrics_use_vllm_names(worker, client):
    client.completions.create(model="llama", prompt="metrics", max_tokens=4, extra_body={"ignore_eos": True})
    text = httpx.get(f"{worker}/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket"):
        assert name in text, name
    assert metric(worker, "vllm:generation_tokens_total", "llama") >= 4


def test_worker_token_guards_v1_and_metrics_exist_from_start_up(model_dir, tmp_path):
    proc, url = start_worker(tmp_path, f"llama={model_dir / 'tiny-llama'}", "--worker-token", "s3cret",
                             ready_headers={"Authorization": "Bearer s3cret"})
    try:
        # Before any request, every per-model series is there at zero (rate() works from the start).
        text = httpx.get(f"{url}/metrics").text
        for series in ('vllm:prompt_tokens_total{model_name="llama"} 0.0',
                       'vllm:generation_tokens_total{model_name="llama"} 0.0',
                       'vllm:request_success_total{finished_reason="stop",model_name="llama"} 0.0',
                       'vllm:request_success_total{finished_reason="length",model_name="llama"} 0.0',
                       'vllm:e2e_request_latency_seconds_count{model_name="llama"} 0.0',
                       'vllm:time_to_first_token_seconds_count{model_name="llama"} 0.0',
                       'vllm:prefix_cache_queries_total{model_name="llama"} 0.0',
                       'vllm:prefix_cache_hits_total{model_name="llama"} 0.0',
                       'vllm:num_preemptions_total{model_name="llama"} 0.0'):
            assert series in text, series
        assert httpx.get(f"{url}/v1/models").status_code == 401
        r = httpx.post(f"{url}/v1/completions", json={"model": "llama", "prompt": "x"},
                       headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert c.completions.create(model="llama", prompt="x", max_tokens=2).usage.completion_tokens >= 1
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no token
        shared = "a prompt long enough to fill several KV blocks " * 6
        for _ in range(2):
            c.completions.create(model="llama", prompt=shared, max_tokens=1)
        assert metric(url, "vllm:prefix_cache_queries_total", "llama") > 0
        assert metric(url, "vllm:prefix_cache_hits_total", "llama") >= 32  # the second one hit
        assert "s3cret" not in proc.log()
    finally:
        proc.stop()
