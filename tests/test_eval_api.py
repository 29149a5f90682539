"""Evaluation-grade logprobs, sampling extras, generation-config defaults and the field policy,
through a real worker with the openai SDK and raw HTTP; logprob values checked against
transformers' float32 ``log_softmax``."""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest
import torch
from conftest import hf_greedy
from procs import start_worker


@pytest.fixture(scope="module")
def worker(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    gen = tmp / "llama-gen"  # the same weights with sampling defaults in generation_config.json
    shutil.copytree(model_dir / "tiny-llama", gen)
    cfg = json.loads((gen / "generation_config.json").read_text())
    (gen / "generation_config.json").write_text(json.dumps({**cfg, "temperature": 0.0, "max_new_tokens": 4}))
    # "plain" serves the same directory ignoring its generation config (spelt differently: a config
    # entry lends its settings to every --models entry with the same source)
    yaml = f"  models:\n    - name: plain\n      source: {gen}/.\n      generation_config: vllm\n"
    proc, url = start_worker(tmp, f"llama={model_dir / 'tiny-llama'},qwen={model_dir / 'tiny-qwen2'},"
                                  f"gen={gen},plain={gen}/.", worker_yaml=yaml)
    yield url
    assert proc.stop() == 0, proc.log()[-2000:]


@pytest.fixture(scope="module")
def client(worker):
    return openai.OpenAI(base_url=f"{worker}/v1", api_key="unused", max_retries=0)


def ref_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """transformers' float32 log_softmax at every position of ``ids``."""
    with torch.inference_mode():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)


@pytest.mark.parametrize("kind,model", [("llama", "llama"), ("qwen2", "qwen")])
def test_echo_logprobs_put_the_prompt_first_with_transformers_values(client, hf_reference, kind, model):
    hf, tok = hf_reference(kind)
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = tok.encode(prompt)
    r = client.completions.create(model=model, prompt=prompt, echo=True, logprobs=2, max_tokens=3,
                                  temperature=0, extra_body={"ignore_eos": True})
    c = r.choices[0]
    out = hf_greedy(hf, ids, 3)
    assert c.text == prompt + tok.decode(out)
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.tokens[:len(ids)] == [tok.decode([t]) for t in ids]
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 3
    # by id (two tokens may decode to the same text, e.g. halves of one character)
    r = client.completions.create(model=model, prompt=prompt, echo=True, logprobs=2, max_tokens=3,
                                  temperature=0, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    assert lp.tokens == [f"token_id:{t}" for t in ids + out]
    ref = ref_logprobs(hf, ids + out)
    for i in range(1, len(ids) + 3):
        t = (ids + out)[i]
        assert abs(lp.token_logprobs[i] - ref[i - 1, t].item()) < 1e-4, i
        top = lp.top_logprobs[i]
        assert len(top) == 2
        for v, best in zip(*ref[i - 1].topk(2)):
            assert abs(top[f"token_id:{best.item()}"] - v.item()) < 1e-4


def test_max_tokens_zero_with_echo_returns_just_the_prompt(client, hf_reference, worker):
    hf, tok = hf_reference("llama")
    prompts = ["one two three four", "def f(x): return x"]
    r = client.completions.create(model="llama", prompt=prompts, echo=True, logprobs=1, max_tokens=0)
    for p, c in zip(prompts, r.choices):
        ids = tok.encode(p)
        assert c.text == p and c.finish_reason == "length"
        assert len(c.logprobs.token_logprobs) == len(ids)
        ref = ref_logprobs(hf, ids)
        want = sum(ref[i - 1, ids[i]].item() for i in range(1, len(ids)))
        assert abs(sum(c.logprobs.token_logprobs[1:]) - want) < 1e-3
    assert r.usage.completion_tokens == 0
    bad = httpx.post(f"{worker}/v1/completions", json={"model": "llama", "prompt": "x", "max_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"


def test_streamed_echo_sends_the_prompt_with_its_logprobs_first(client, hf_reference):
    hf, tok = hf_reference("llama")
    prompt = "streams carry logprobs too"
    ids = tok.encode(prompt)
    chunks = list(client.completions.create(model="llama", prompt=prompt, echo=True, logprobs=1, max_tokens=2,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}))
    first = chunks[0].choices[0]
    assert first.text == prompt and first.logprobs.token_logprobs[0] is None
    assert len(first.logprobs.tokens) == len(ids)
    ref = ref_logprobs(hf, ids)
    assert abs(first.logprobs.token_logprobs[-1] - ref[len(ids) - 2, ids[-1]].item()) < 1e-4
    assert "".join(ch.choices[0].text for ch in chunks) == prompt + tok.decode(hf_greedy(hf, ids, 2))


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_prompt_logprobs_vllm_shape_equal_transformers(client, hf_reference, endpoint):
    hf, tok = hf_reference("qwen2")
    if endpoint == "completions":
        ids = tok.encode("prompt logprobs for every token")
        r = client.completions.create(model="qwen", prompt=ids, max_tokens=1, extra_body={"prompt_logprobs": 3})
        entries = r.choices[0].model_extra["prompt_logprobs"]
    else:
        messages = [{"role": "user", "content": "score my prompt"}]
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        r = client.chat.completions.create(model="qwen", messages=messages, max_tokens=1,
                                           extra_body={"prompt_logprobs": 3})
        entries = r.model_extra["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    ref = ref_logprobs(hf, ids)
    for i in range(1, len(ids)):
        e = entries[i]
        mine = e[str(ids[i])]
        assert abs(mine["logprob"] - ref[i - 1, ids[i]].item()) < 1e-4
        assert mine["rank"] == int((ref[i - 1] > ref[i - 1, ids[i]]).sum()) + 1
        assert mine["decoded_token"] == tok.decode([ids[i]])
        top = ref[i - 1].topk(3)
        for rank, (v, t) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
            assert abs(e[str(t)]["logprob"] - v) < 1e-4 and e[str(t)]["rank"] == rank
        assert len(e) in (3, 4)


def test_return_tokens_as_token_ids(client, hf_reference):
    _, tok = hf_reference("llama")
    ids = tok.encode("ids please")
    r = client.completions.create(model="llama", prompt=ids, echo=True, logprobs=1, max_tokens=1,
                                  extra_body={"return_tokens_as_token_ids": True})
    toks = r.choices[0].logprobs.tokens
    assert toks[:len(ids)] == [f"token_id:{t}" for t in ids]
    assert all(t.startswith("token_id:") for t in toks)


def test_logit_bias_forces_and_bans_tokens(client, hf_reference):
    hf, tok = hf_reference("llama")
    forced = tok.encode(" zebra")[0]
    r = client.completions.create(model="llama", prompt="anything", max_tokens=5, temperature=0,
                                  logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode([forced] * 5)
    s = client.completions.create(model="llama", prompt="anything", max_tokens=5, temperature=1.0, seed=3,
                                  logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert s.choices[0].text == tok.decode([forced] * 5)
    ids = tok.encode("anything")
    greedy = hf_greedy(hf, ids, 1)[0]
    b = client.completions.create(model="llama", prompt="anything", max_tokens=1, temperature=0,
                                  logit_bias={str(greedy): -100}, extra_body={"ignore_eos": True})
    assert tok.encode(b.choices[0].text) != [greedy]


def test_min_tokens_holds_against_eos_and_stop_token_ids(client, hf_reference):
    _, tok = hf_reference("llama")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    # EOS is the greedy choice everywhere; min_tokens keeps it out for the first 6 tokens
    r = client.completions.create(model="llama", prompt="hello", max_tokens=20, temperature=0,
                                  logit_bias={str(eos): 50}, extra_body={"min_tokens": 6})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 7
    stop_id = tok.encode(" yes")[0]
    s = client.completions.create(model="llama", prompt="hello", max_tokens=20, temperature=0,
                                  logit_bias={str(stop_id): 50},
                                  extra_body={"min_tokens": 4, "stop_token_ids": [stop_id]})
    assert s.choices[0].finish_reason == "stop" and s.usage.completion_tokens == 5


def _token_ids(choice) -> list[int]:
    """The exact sampled ids (logprobs with return_tokens_as_token_ids), not a re-tokenization."""
    return [int(t.split(":", 1)[1]) for t in choice.logprobs.tokens]


def test_bad_words_and_allowed_token_ids(client, hf_reference):
    hf, tok = hf_reference("llama")
    ids = tok.encode("the the the")
    free = hf_greedy(hf, ids, 8)
    word = tok.decode(free[:2]).strip()  # what greedy decoding would say first: banned now
    ext = {"ignore_eos": True, "return_tokens_as_token_ids": True}
    r = client.completions.create(model="llama", prompt=ids, max_tokens=8, temperature=0, logprobs=0,
                                  extra_body={**ext, "bad_words": [word]})
    out = _token_ids(r.choices[0])
    assert out != free
    for b in {tuple(tok.encode(word)), tuple(tok.encode(" " + word))}:
        assert all(tuple(out[i:i + len(b)]) != b for i in range(len(out))), (b, out)
    allowed = sorted(set(tok.encode(" a b c d")))
    a = client.completions.create(model="llama", prompt=ids, max_tokens=8, temperature=1.0, seed=1, logprobs=0,
                                  extra_body={**ext, "allowed_token_ids": allowed})
    assert set(_token_ids(a.choices[0])) <= set(allowed)


def test_truncate_prompt_tokens_keeps_the_tail(client, hf_reference):
    hf, tok = hf_reference("llama")
    ids = tok.encode("alpha beta gamma delta epsilon zeta eta theta iota kappa")
    r = client.completions.create(model="llama", prompt=ids, max_tokens=3, temperature=0,
                                  extra_body={"truncate_prompt_tokens": 5, "ignore_eos": True})
    assert r.usage.prompt_tokens == 5
    assert r.choices[0].text == tok.decode(hf_greedy(hf, ids[-5:], 3))
    c = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "long " * 40}],
                                       max_tokens=2, extra_body={"truncate_prompt_tokens": 7})
    assert c.usage.prompt_tokens == 7


def test_cache_salt_separates_prefix_cache_hits(worker, client):
    def hits() -> float:
        for line in httpx.get(f"{worker}/metrics").text.splitlines():
            if line.startswith('vllm:prefix_cache_hits_total{model_name="qwen"}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    prompt = "a shared system prompt that spans several KV blocks " * 4
    client.completions.create(model="qwen", prompt=prompt, max_tokens=1, extra_body={"cache_salt": "tenant-a"})
    before = hits()
    client.completions.create(model="qwen", prompt=prompt, max_tokens=1, extra_body={"cache_salt": "tenant-b"})
    assert hits() == before  # another tenant's salt: no reuse
    client.completions.create(model="qwen", prompt=prompt, max_tokens=1, extra_body={"cache_salt": "tenant-a"})
    assert hits() > before


def test_generation_config_values_are_request_defaults(client):
    a = client.completions.create(model="gen", prompt="defaults from the model", extra_body={"ignore_eos": True})
    assert a.usage.completion_tokens == 4 and a.choices[0].finish_reason == "length"  # max_new_tokens
    b = client.completions.create(model="gen", prompt="defaults from the model", extra_body={"ignore_eos": True})
    greedy = client.completions.create(model="gen", prompt="defaults from the model", temperature=0, max_tokens=4,
                                       extra_body={"ignore_eos": True})
    assert a.choices[0].text == b.choices[0].text == greedy.choices[0].text  # temperature 0.0 from the file
    own = client.completions.create(model="gen", prompt="defaults from the model", max_tokens=9,
                                    extra_body={"ignore_eos": True})
    assert own.usage.completion_tokens == 9  # the request's own value wins
    plain = client.completions.create(model="plain", prompt="defaults from the model", extra_body={"ignore_eos": True})
    assert plain.usage.completion_tokens > 4  # generation_config: vllm ignores the file


REFUSED = [
    ("chat", {"use_beam_search": True}, "use_beam_search"),
    ("chat", {"length_penalty": 0.5}, "length_penalty"),
    ("chat", {"spaces_between_special_tokens": False}, "spaces_between_special_tokens"),
    ("chat", {"logits_processors": ["my.Processor"]}, "logits_processors"),
    ("chat", {"priority": 3}, "priority"),
    ("chat", {"best_of": 3}, "best_of"),
    ("chat", {"echo": True}, "echo"),
    ("chat", {"documents": [{"title": "a", "text": "b"}]}, "documents"),
    ("chat", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("chat", {"modalities": ["text", "audio"]}, "modalities"),
    ("chat", {"web_search_options": {}}, None),  # empty: harmless
    ("chat", {"reasoning_effort": "high"}, "reasoning_effort"),
    ("chat", {"verbosity": "low"}, "verbosity"),
    ("chat", {"vllm_xargs": {"a": 1}}, "vllm_xargs"),
    ("chat", {"kv_transfer_params": {"do_remote_prefill": True}}, "kv_transfer_params"),
    ("chat", {"mm_processor_kwargs": {"fps": 2}}, "mm_processor_kwargs"),
    ("completions", {"suffix": "tail"}, "suffix"),
    ("completions", {"best_of": 2}, "best_of"),
    ("completions", {"prompt_embeds": "AAAA"}, "prompt_embeds"),
    ("completions", {"use_beam_search": True}, "use_beam_search"),
]


@pytest.mark.parametrize("endpoint,patch,param", REFUSED)
def test_unimplemented_fields_that_change_output_are_400(worker, endpoint, patch, param):
    body = {"model": "llama", "max_tokens": 2, **patch}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": "x"}]
    else:
        body["prompt"] = "x"
    r = httpx.post(f"{worker}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}", json=body)
    if param is None:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"]


def test_harmless_defaults_and_unknown_fields_are_accepted(worker):
    body = {"model": "llama", "prompt": "x", "max_tokens": 2, "use_beam_search": False, "length_penalty": 1.0,
            "best_of": 1, "priority": 0, "spaces_between_special_tokens": True, "suffix": None,
            "some_client_specific_field": {"anything": 1}, "metadata": {"k": "v"}, "store": False,
            "service_tier": "auto"}
    assert httpx.post(f"{worker}/v1/completions", json=body).status_code == 200
    chat = {"model": "llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
            "modalities": ["text"], "echo": False, "prompt_cache_key": "k", "safety_identifier": "u"}
    assert httpx.post(f"{worker}/v1/chat/completions", json=chat).status_code == 200


BAD_VALUES = [
    ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 50, "max_tokens": 5}, "min_tokens"),
    ({"bad_words": [""]}, "bad_words"), ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [99999999]}, "allowed_token_ids"), ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": 10**6}, "truncate_prompt_tokens"), ({"prompt_logprobs": 50}, "prompt_logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"), ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"cache_salt": ""}, "cache_salt"), ({"return_tokens_as_token_ids": "maybe"}, "return_tokens_as_token_ids"),
]


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
@pytest.mark.parametrize("patch,param", BAD_VALUES)
def test_bad_values_of_new_fields_are_400_naming_them(worker, endpoint, patch, param):
    body = {"model": "llama", "max_tokens": 5, **patch}
    if endpoint == "completions":
        body["prompt"] = "x"
    else:
        body["messages"] = [{"role": "user", "content": "x"}]
    r = httpx.post(f"{worker}/v1/{endpoint}", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
