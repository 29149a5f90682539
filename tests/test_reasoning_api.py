"""Reasoning models on a real worker: the thinking goes to ``reasoning_content`` / ``reasoning``,
``content`` holds only the answer, whole or streamed; tool calls and structured outputs read the
answer; ``include_reasoning: false`` drops the thinking; /v1/completions does not split.

The weights are random, so the model's own thinking is not predictable. The tests drive it with a
``logit_bias`` on ``</think>`` (the marker then turns up after a few tokens) and compare with a
second served name of the same weights and template without a reasoning parser: the same seed
gives the same tokens, so the raw text there is exactly what the parser split here."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from procs import start_worker
from transformers import AutoTokenizer

from engine import SamplingParams
from worker.chat import ChatJob, _delta, _message
from worker.config import build_config
from worker.reasoning_parsers import DeepSeekR1ReasoningParser, Qwen3ReasoningParser, prompt_thinking
from worker.tool_parsers import PARSERS as TOOL_PARSERS
from worker.tool_parsers import RequiredCallsParser, ToolCallStream

# ChatML like the tiny models' template; the generation prompt leaves the thinking open (as
# Qwen3-Thinking-2507's does) or closed (as Qwen3's with enable_thinking false). Assistant turns
# sent back with their reasoning show it, as Qwen3's template does.
TEMPLATE = ("{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' -}}"
            "{%- if m['role'] == 'assistant' and m['reasoning_content'] -%}"
            "{{- '<think>\\n' + m['reasoning_content'] + '\\n</think>\\n\\n' -}}{%- endif -%}"
            "{{- (m['content'] if m['content'] is string else '') + '<|im_end|>\\n' -}}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' + GEN -}}{%- endif -%}")
OPEN_TEMPLATE = TEMPLATE.replace("GEN", "'<think>\\n'")
QWEN3_TEMPLATE = TEMPLATE.replace(
    "GEN", "('<think>\\n\\n</think>\\n\\n' if enable_thinking is defined and enable_thinking is false else '')")

END_ID = 1025  # </think> in the tiny tokenizer (checked in the fixture)
START_ID = 1024
# </think> biased up, both EOS ids (0, 2) down: a thought may not end the reply, so a "stop" is the
# grammar's own end after the answer. Without it a sampled EOS inside the thinking leaves no answer
# at all, which the unconstrained thinking allows and which made these tests depend on the seeds.
NO_STOP_IN_THOUGHT = {str(END_ID): 4, "0": -100, "2": -100}
MSGS = [{"role": "user", "content": "What is 2 + 2?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12}}, "required": ["city"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def worker(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reasoning")
    src = model_dir / "tiny-qwen3"
    tok = AutoTokenizer.from_pretrained(src)
    assert tok.convert_tokens_to_ids(["<think>", "</think>"]) == [START_ID, END_ID]
    assert json.loads((src / "generation_config.json").read_text())["eos_token_id"] == [2, 0]  # NO_STOP_IN_THOUGHT
    open_t, qwen3_t = tmp / "open.jinja", tmp / "qwen3.jinja"
    open_t.write_text(OPEN_TEMPLATE)
    qwen3_t.write_text(QWEN3_TEMPLATE)
    hermes = "      enable_auto_tool_choice: true\n      tool_call_parser: hermes\n"
    yaml = ("  models:\n"
            f"    - name: think\n      source: {src}\n      chat_template: {open_t}\n"
            f"      reasoning_parser: qwen3\n{hermes}"
            f"    - name: think-raw\n      source: {src}\n      chat_template: {open_t}\n{hermes}"
            f"    - name: q3\n      source: {src}\n      chat_template: {qwen3_t}\n"
            f"      reasoning_parser: qwen3\n{hermes}"
            f"    - name: r1\n      source: {src}\n      chat_template: {qwen3_t}\n"
            f"      reasoning_parser: deepseek_r1\n"
            f"    - name: raw\n      source: {src}\n      chat_template: {qwen3_t}\n")
    names = ["think", "think-raw", "q3", "r1", "raw"]
    proc, url = start_worker(tmp, ",".join(f"{n}={src}" for n in names), worker_yaml=yaml)
    try:
        yield {"url": url, "tok": tok}
    finally:
        proc.stop()


def chat(url: str, model: str, **body) -> dict:
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": model, "messages": MSGS, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def chat_stream(url: str, model: str, **body) -> list[dict]:
    """The chunks of a streamed chat completion (``[DONE]`` checked and dropped)."""
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120,
                      json={"model": model, "messages": MSGS, "stream": True, **body}) as r:
        assert r.status_code == 200
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def rebuilt(chunks: list[dict], index: int = 0) -> dict:
    """What a client makes of one streamed choice: the reasoning and content deltas joined (None
    where none came), with both reasoning names always equal and no reasoning after the answer
    began."""
    reasoning, content, finish, answering = [], [], None, False
    for chunk in chunks:
        for ch in chunk["choices"]:
            if ch["index"] != index:
                continue
            d = ch["delta"]
            assert d.get("reasoning_content") == d.get("reasoning")
            if d.get("reasoning_content"):
                assert not answering, "reasoning after the answer began"
                reasoning.append(d["reasoning_content"])
            if d.get("content"):
                answering = True
                content.append(d["content"])
            finish = ch["finish_reason"] or finish
    return {"reasoning": "".join(reasoning) if reasoning else None, "content": "".join(content) or None,
            "finish_reason": finish}


def sampled(worker, model: str, want, bias: dict | None = None, seeds=range(40), **body) -> tuple[dict, str]:
    """The first seed whose raw output (``model`` has no reasoning parser) satisfies ``want``:
    (the request body that produced it, that raw text)."""
    for seed in seeds:
        req = {"seed": seed, "temperature": 1.0, "max_tokens": 24, "logit_bias": bias or {}, **body}
        text = chat(worker["url"], model, **req)["choices"][0]["message"]["content"]
        if want(text):
            return req, text
    pytest.fail(f"no seed gave a raw output that fits ({model})")


def ends_thinking_mid_way(text: str) -> bool:
    k = text.find("</think>")
    return 0 < k and len(text) > k + len("</think>") and not text.startswith("<think>")


def prompt_state(worker, model: str, **body) -> str:
    r = httpx.post(f"{worker['url']}/tokenize", json={"model": model, "messages": MSGS, **body})
    assert r.status_code == 200, r.text
    tok = worker["tok"]
    return prompt_thinking(r.json()["tokens"], START_ID, END_ID, set(tok.all_special_ids))


def test_prompts_leave_the_thinking_as_the_templates_say(worker):
    assert prompt_state(worker, "think") == "open"
    assert prompt_state(worker, "q3") == "none"
    assert prompt_state(worker, "q3", chat_template_kwargs={"enable_thinking": False}) == "closed"


def test_thinking_opened_by_the_prompt_splits_at_the_end_marker(worker):
    url = worker["url"]
    req, raw = sampled(worker, "think-raw", ends_thinking_mid_way, {str(END_ID): 4})
    thought, answer = raw.split("</think>", 1)
    r = chat(url, "think", **req)
    msg = r["choices"][0]["message"]
    assert msg["reasoning_content"] == msg["reasoning"] == thought
    assert msg["content"] == answer and "</think>" not in thought
    assert (thought, answer) == Qwen3ReasoningParser("open").split(raw)
    assert r["usage"]["completion_tokens"] == 24
    # streamed: the deltas add up to the same split
    s = rebuilt(chat_stream(url, "think", **req))
    assert s == {"reasoning": thought, "content": answer, "finish_reason": r["choices"][0]["finish_reason"]}


def test_no_end_marker_is_all_reasoning(worker):
    url = worker["url"]
    req, raw = sampled(worker, "think-raw", lambda t: "</think>" not in t and len(t) > 5)
    msg = chat(url, "think", **req)["choices"][0]["message"]
    assert msg["reasoning_content"] == msg["reasoning"] == raw and msg["content"] is None
    assert rebuilt(chat_stream(url, "think", **req)) == {"reasoning": raw, "content": None, "finish_reason": "length"}


def test_n2_streams_split_each_choice(worker):
    url = worker["url"]
    req = {"seed": 11, "temperature": 1.0, "max_tokens": 20, "logit_bias": {str(END_ID): 4}, "n": 2}
    raws = [c["message"]["content"] for c in chat(url, "think-raw", **req)["choices"]]
    whole = chat(url, "think", **req)["choices"]
    chunks = chat_stream(url, "think", **req)
    for i, raw in enumerate(raws):
        thought, answer = Qwen3ReasoningParser("open").split(raw)
        assert (whole[i]["message"]["reasoning_content"], whole[i]["message"]["content"]) == (thought, answer)
        s = rebuilt(chunks, i)
        assert (s["reasoning"] or "", s["content"]) == (thought, answer)


def test_deepseek_r1_reasons_until_the_end_marker(worker):
    url = worker["url"]
    req, raw = sampled(worker, "raw", ends_thinking_mid_way, {str(END_ID): 4})
    thought, answer = raw.split("</think>", 1)
    msg = chat(url, "r1", **req)["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["reasoning"], msg["content"]) == (thought, thought, answer)
    assert (thought, answer) == DeepSeekR1ReasoningParser("none").split(raw)
    assert rebuilt(chat_stream(url, "r1", **req))["content"] == answer
    # without the marker, all of it is reasoning
    req, raw = sampled(worker, "raw", lambda t: "</think>" not in t and len(t) > 5)
    msg = chat(url, "r1", **req)["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == (raw, None)


def test_qwen3_thinks_only_when_the_output_opens_it(worker):
    """No marker in the prompt: an output that starts with <think> thinks, any other is all answer."""
    url = worker["url"]
    req, raw = sampled(worker, "raw", lambda t: not t.startswith("<think>") and len(t) > 5)
    msg = chat(url, "q3", **req)["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["reasoning"], msg["content"]) == (None, None, raw)
    assert rebuilt(chat_stream(url, "q3", **req)) == {"reasoning": None, "content": raw, "finish_reason": "length"}

    def opens_and_closes(t: str) -> bool:
        return t.startswith("<think>") and "</think>" in t[7:] and not t.endswith("</think>")
    req, raw = sampled(worker, "raw", opens_and_closes, {str(START_ID): 6, str(END_ID): 3}, seeds=range(200))
    thought, answer = raw[len("<think>"):].split("</think>", 1)
    msg = chat(url, "q3", **req)["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == (thought, answer)
    assert rebuilt(chat_stream(url, "q3", **req))["reasoning"] == thought


def test_include_reasoning_false_drops_the_thinking(worker):
    url = worker["url"]
    req, raw = sampled(worker, "think-raw", ends_thinking_mid_way, {str(END_ID): 4})
    answer = raw.split("</think>", 1)[1]
    msg = chat(url, "think", include_reasoning=False, **req)["choices"][0]["message"]
    assert msg["content"] == answer and msg["reasoning_content"] is None and msg["reasoning"] is None
    chunks = chat_stream(url, "think", include_reasoning=False, **req)
    assert not any("reasoning_content" in ch["delta"] or "reasoning" in ch["delta"]
                   for chunk in chunks for ch in chunk["choices"])
    assert rebuilt(chunks)["content"] == answer
    # the streamed logprobs still cover every token, reasoning included
    chunks = chat_stream(url, "think", include_reasoning=False, logprobs=True, **req)
    assert sum(len(ch["logprobs"]["content"]) for chunk in chunks[1:] for ch in chunk["choices"]) == 24


def test_models_without_a_reasoning_parser_are_unchanged(worker):
    req, raw = sampled(worker, "think-raw", ends_thinking_mid_way, {str(END_ID): 4})
    msg = chat(worker["url"], "think-raw", **req)["choices"][0]["message"]
    assert "reasoning_content" not in msg and msg["content"] == raw


def test_completions_do_not_split(worker):
    url = worker["url"]
    r = httpx.post(f"{url}/v1/completions", json={"model": "think", "prompt": "<think>\nx", "max_tokens": 12,
                                                   "logit_bias": {str(END_ID): 100}}).json()
    ch = r["choices"][0]
    assert ch["text"] == "</think>" * 12 and "reasoning_content" not in ch


def test_structured_output_constrains_the_answer_after_the_thinking(worker):
    """The grammar applies once the thinking ends: the thinking is free text, the answer valid JSON."""
    url = worker["url"]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
    done = 0
    for seed in range(6):
        r = chat(url, "think", seed=seed, temperature=1.0, max_tokens=60, logit_bias=NO_STOP_IN_THOUGHT,
                 response_format=fmt)
        ch = r["choices"][0]
        if ch["finish_reason"] != "stop":
            continue
        done += 1
        assert ch["message"]["reasoning_content"] is not None
        assert isinstance(json.loads(ch["message"]["content"])["ok"], bool)
    assert done
    # enable_thinking false: the template closed the thinking, all is answer, constrained from the
    # first token (even where the model would rather open a thinking: <think> biased up)
    off = {"chat_template_kwargs": {"enable_thinking": False}, "response_format": fmt,
           "logit_bias": {str(START_ID): 8}}
    for seed in range(3):
        m = chat(url, "q3", seed=seed, **off)["choices"][0]["message"]
        assert m["reasoning_content"] is None and isinstance(json.loads(m["content"])["ok"], bool)
        s = rebuilt(chat_stream(url, "q3", seed=seed, **off))
        assert s["reasoning"] is None and json.loads(s["content"]) == json.loads(m["content"])


def test_enable_thinking_false_is_all_answer(worker):
    """Even text that looks like thinking is answer once the prompt closed the thinking."""
    url = worker["url"]
    off = {"chat_template_kwargs": {"enable_thinking": False}}

    def looks_like_thinking(t: str) -> bool:
        return t.startswith("<think>") and "</think>" in t
    req, raw = sampled(worker, "raw", looks_like_thinking, {str(START_ID): 6, str(END_ID): 3}, seeds=range(200), **off)
    msg = chat(url, "q3", **req)["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == (None, raw)
    assert rebuilt(chat_stream(url, "q3", **req)) == {"reasoning": None, "content": raw, "finish_reason": "length"}


def test_continued_thinking_prefill_is_reasoning(worker):
    """continue_final_message with an assistant prefix that opened the thinking: the output
    continues inside it."""
    url = worker["url"]
    prefill = [*MSGS, {"role": "assistant", "content": "<think>\nSo far"}]
    body = {"messages": prefill, "continue_final_message": True, "add_generation_prompt": False}
    req, raw = sampled(worker, "raw", ends_thinking_mid_way, {str(END_ID): 4}, **body)
    thought, answer = raw.split("</think>", 1)
    msg = chat(url, "q3", **req)["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == (thought, answer)
    assert rebuilt(chat_stream(url, "q3", **req))["reasoning"] == thought


def test_tool_choice_required_reads_the_answer(worker):
    url = worker["url"]
    called = 0
    for seed in range(6):
        r = chat(url, "think", seed=seed, temperature=1.0, max_tokens=100, logit_bias=NO_STOP_IN_THOUGHT,
                 tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
        ch = r["choices"][0]
        if ch["finish_reason"] == "length":
            continue
        called += 1
        msg = ch["message"]
        assert ch["finish_reason"] == "tool_calls" and msg["content"] is None
        assert msg["reasoning_content"] is not None and "get_weather" not in msg["reasoning_content"]
        assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather"]
        assert set(json.loads(msg["tool_calls"][0]["function"]["arguments"])) == {"city"}
    assert called


def test_openai_sdk_and_langchain_read_the_answer(worker):
    from langchain_openai import ChatOpenAI

    url = worker["url"]
    req, raw = sampled(worker, "think-raw", ends_thinking_mid_way, {str(END_ID): 4})
    thought, answer = raw.split("</think>", 1)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    extra = {"logit_bias": req["logit_bias"]}
    kw = {"model": "think", "messages": MSGS, "seed": req["seed"], "temperature": 1.0, "max_tokens": 24}
    msg = client.chat.completions.create(**kw, extra_body=extra).choices[0].message
    assert msg.content == answer
    assert msg.reasoning_content == msg.reasoning == thought  # extra fields the SDK keeps
    reasoning, content = "", ""
    with client.chat.completions.create(**kw, extra_body=extra, stream=True) as s:
        for chunk in s:
            for ch in chunk.choices:
                reasoning += getattr(ch.delta, "reasoning_content", None) or ""
                content += ch.delta.content or ""
    assert (reasoning, content) == (thought, answer)
    # LangChain's ChatOpenAI reads OpenAI's fields only: the answer is the message content, the
    # reasoning (a vLLM extra) is not kept anywhere on the message
    llm = ChatOpenAI(model="think", base_url=f"{url}/v1", api_key="x", max_retries=0, seed=req["seed"],
                     temperature=1.0, max_tokens=24, extra_body=extra)
    ai = llm.invoke(MSGS[0]["content"])
    assert ai.content == answer
    assert not {"reasoning_content", "reasoning"} & set(ai.additional_kwargs)
    assert "".join(c.content for c in llm.stream(MSGS[0]["content"])) == answer


def test_reasoning_sent_back_reaches_the_template(worker):
    url, tok = worker["url"], worker["tok"]
    for key in ("reasoning_content", "reasoning"):
        history = [*MSGS, {"role": "assistant", "content": "4", key: "two and two"},
                   {"role": "user", "content": "And 3 + 3?"}]
        ids = httpx.post(f"{url}/tokenize", json={"model": "think", "messages": history}).json()["tokens"]
        text = tok.decode(ids, skip_special_tokens=False)
        assert "<|im_start|>assistant\n<think>\ntwo and two\n</think>\n\n4<|im_end|>" in text, key
    # and a chat request with it runs (its prompt holds the history's reasoning)
    body = {"model": "think", "max_tokens": 1, "messages": history}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    assert r["usage"]["prompt_tokens"] == len(ids)


# -- the chat answer of a reasoning model, without a server: tool calls come from the answer only --

def test_tool_calls_in_the_reasoning_are_not_calls():
    job = ChatJob([], SamplingParams(), parser=TOOL_PARSERS["hermes"](), reasoning=Qwen3ReasoningParser("none"))
    call = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    text = f"<think>\nmaybe {call.replace('f', 'g')}\n</think>\n\n{call}"
    msg, finish = _message(job, text, "stop")
    assert finish == "tool_calls" and msg["content"] is None
    assert msg["reasoning_content"] == msg["reasoning"] == f"\nmaybe {call.replace('f', 'g')}\n"
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["f"]
    # streamed in every two-piece cut: the same reasoning, one call, no content
    for k in range(1, len(text)):
        stream, thinking = ToolCallStream(job.parser), job.reasoning.stream()
        deltas = [_delta(job, stream, thinking, text[:k], "", False), _delta(job, stream, thinking, text, "", True)]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == msg["reasoning_content"]
        assert not "".join(d.get("content", "") for d in deltas).strip()  # at most the whitespace before the call
        names = [tc["function"]["name"] for d in deltas for tc in d.get("tool_calls", []) if "id" in tc]
        assert names == ["f"] and stream.called
    # only thinking, no answer: no calls, content None
    msg, finish = _message(job, f"<think>{call}", "length")
    assert (msg["content"], finish, "tool_calls" in msg) == (None, "length", False)
    # a required call after the thinking
    job = ChatJob([], SamplingParams(), parser=RequiredCallsParser(), reasoning=DeepSeekR1ReasoningParser("none"))
    msg, finish = _message(job, 'hmm</think>[{"name": "f", "parameters": {}}]', "stop")
    assert (msg["reasoning_content"], msg["content"], finish) == ("hmm", None, "tool_calls")


def test_unknown_reasoning_parser_is_a_config_error(tmp_path):
    from clusterkit.config import ConfigError

    with pytest.raises(ConfigError, match="reasoning_parser") as e:
        build_config({"worker": {"models": [{"name": "a", "source": "x", "reasoning_parser": "qwen"}]}}, {})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="reasoning_parser"):
        build_config({"worker": {"models": [{"name": "a", "source": "x"}]}}, {"reasoning_parser": "r1"})
    cfg = build_config({"worker": {"reasoning_parser": "deepseek_r1", "models": [
        {"name": "a", "source": "x"}, {"name": "b", "source": "x", "reasoning_parser": "qwen3"}]}}, {})
    assert [cfg.engine_config(m, "cpu").reasoning_parser for m in cfg.models] == ["deepseek_r1", "qwen3"]
