"""Structured outputs and tool calling with the clients people use (the openai SDK, LangChain's
ChatOpenAI, litellm), against a worker directly and through the router, with random-weight models:
outputs parse and validate against their schemas because decoding is constrained."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import openai
import pytest
from procs import start_manager, start_redis, start_worker, wait_until
from pydantic import BaseModel, Field
from transformers import AutoTokenizer

TOKEN = "worker-secret-so"
KEY = "client-key-so"


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    mood: Literal["happy", "sad", "calm"]
    verified: bool


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 8}},
                   "required": ["tz"], "additionalProperties": False}}}


def check_args(name: str, arguments: str) -> dict:
    args = json.loads(arguments)
    if name == "get_weather":
        assert set(args) == {"city", "unit"} and len(args["city"]) <= 16 and args["unit"] in ("celsius", "fahrenheit")
    else:
        assert name == "get_time" and set(args) == {"tz"} and len(args["tz"]) <= 8
    return args


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("structured")
    redis = start_redis(tmp)
    procs = []
    try:
        mgr, url = start_manager(tmp, "--redis-url", redis.url, "--worker-token", TOKEN, "--api-key", KEY)
        procs.append(mgr)
        qwen = model_dir / "tiny-qwen2"
        yaml = (f"  models:\n    - name: qwen\n      source: {qwen}\n      enable_auto_tool_choice: true\n"
                f"      tool_call_parser: hermes\n")
        w, wurl = start_worker(tmp, f"qwen={qwen},llama={model_dir / 'tiny-llama'}", "--manager-url", url,
                               "--heartbeat-interval", "0.5", env={"WORKER_TOKEN": TOKEN},
                               ready_headers={"Authorization": f"Bearer {TOKEN}"}, worker_yaml=yaml)
        procs.append(w)
        wait_until(lambda: len(httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
                               .json()["data"]) == 2, what="models routed")
        yield {"router": url, "worker": wurl, "tmp": tmp}
    finally:
        for p in reversed(procs):
            p.stop()
        redis.stop()


@pytest.fixture(scope="module")
def ends_lists(model_dir) -> dict[str, float]:
    """A logit bias on "]": random weights may keep adding calls to a list of tool calls until
    max_tokens; the bias (taken only where the grammar allows "]") lets the list end."""
    tok = AutoTokenizer.from_pretrained(model_dir / "tiny-llama")
    return {str(tok.convert_tokens_to_ids("]")): 5.0}


@pytest.fixture(params=["worker", "router"])
def base(request, cluster) -> str:
    """The base URL of the OpenAI API: the worker itself, or the cluster's router."""
    return cluster[request.param]


def oa(base: str, cluster) -> openai.OpenAI:
    key = TOKEN if base == cluster["worker"] else KEY
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


MSGS = [{"role": "user", "content": "Give me a person as JSON."}]


def test_openai_parse_with_a_pydantic_model(base, cluster):
    r = oa(base, cluster).chat.completions.parse(model="qwen", messages=MSGS, response_format=Person, seed=1)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Person) and r.choices[0].finish_reason == "stop"
    assert Person.model_validate_json(r.choices[0].message.content) == parsed


def test_json_schema_n2_and_json_object(base, cluster, model_dir):
    c = oa(base, cluster)
    schema = Person.model_json_schema()
    r = c.chat.completions.create(model="llama", messages=MSGS, n=2, seed=3, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
    assert len(r.choices) == 2
    docs = [Person.model_validate_json(ch.message.content) for ch in r.choices]
    assert docs[0] != docs[1]
    # random weights ramble inside an unbounded object; a bias on "}" (taken only where the grammar
    # allows it) lets most choices close within the budget
    close = AutoTokenizer.from_pretrained(model_dir / "tiny-llama").convert_tokens_to_ids("}")
    r = c.chat.completions.create(model="llama", messages=MSGS, n=6, seed=0, max_tokens=300,
                                  response_format={"type": "json_object"}, logit_bias={str(close): 6})
    ended = [ch for ch in r.choices if ch.finish_reason == "stop"]
    assert ended and all(isinstance(json.loads(ch.message.content), dict) for ch in ended)


def test_regex_choice_and_grammar_extra_fields(base, cluster):
    c = oa(base, cluster)
    r = c.chat.completions.create(model="llama", messages=MSGS, seed=2,
                                  extra_body={"guided_regex": r"[A-Z][a-z]{2,6} [0-9]{2}"})
    assert re.fullmatch(r"[A-Z][a-z]{2,6} [0-9]{2}", r.choices[0].message.content)
    r = c.chat.completions.create(model="llama", messages=MSGS, n=3, seed=2,
                                  extra_body={"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}})
    assert all(ch.message.content in ("alpha", "beta", "gamma") for ch in r.choices)
    r = c.chat.completions.create(model="llama", messages=MSGS, seed=2,
                                  extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no")
    r = c.completions.create(model="llama", prompt="Numbers:", seed=2, max_tokens=50,
                             extra_body={"guided_grammar": 'root ::= "[" [0-9]+ ("," [0-9]+)* "]"'})
    assert re.fullmatch(r"\[\d+(,\d+)*\]", r.choices[0].text)
    r = c.completions.create(model="llama", prompt="A person:", seed=2, max_tokens=80,
                             extra_body={"guided_json": Person.model_json_schema()})
    Person.model_validate_json(r.choices[0].text)


def test_constraints_that_do_not_compile_are_400_naming_the_field(base, cluster):
    c = oa(base, cluster)
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectt"}}}},
         "response_format"),
        ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex"),
        ({"extra_body": {"guided_grammar": 'root ::= "a" |'}}, "guided_grammar"),
        ({"extra_body": {"structured_outputs": {"json": "{not json"}}}, "structured_outputs"),
        ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}}, "structured_outputs"),
        ({"extra_body": {"structured_outputs": {"structural_tag": "x"}}}, "structured_outputs"),
        ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}}, "guided_regex"),
        ({"extra_body": {"guided_whitespace_pattern": " "}}, "guided_whitespace_pattern"),
        ({"extra_body": {"functions": [{"name": "f", "parameters": {}}]}}, "functions"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="llama", messages=MSGS, **kw)
        assert e.value.status_code == 400 and e.value.body["param"] == param, (kw, e.value.body)
    # the model still serves
    assert c.chat.completions.create(model="llama", messages=MSGS, max_tokens=2).choices[0].finish_reason


def test_streamed_json_schema_with_n2(base, cluster):
    c = oa(base, cluster)
    texts = {0: "", 1: ""}
    finish = {}
    with c.chat.completions.create(model="qwen", messages=MSGS, n=2, seed=5, stream=True, response_format={
            "type": "json_schema", "json_schema": {"name": "p", "schema": Person.model_json_schema()}}) as s:
        for chunk in s:
            for ch in chunk.choices:
                texts[ch.index] += ch.delta.content or ""
                if ch.finish_reason:
                    finish[ch.index] = ch.finish_reason
    assert finish == {0: "stop", 1: "stop"}
    for t in texts.values():
        Person.model_validate_json(t)


def test_tool_choice_required_and_named(base, cluster, ends_lists):
    c = oa(base, cluster)
    r = c.chat.completions.create(model="llama", messages=[{"role": "user", "content": "weather and time?"}],
                                  tools=[WEATHER, TIME], tool_choice="required", seed=4, logit_bias=ends_lists)
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and m.content is None and m.tool_calls
    for call in m.tool_calls:
        assert call.type == "function" and call.id
        check_args(call.function.name, call.function.arguments)
    r = c.chat.completions.create(model="llama", messages=[{"role": "user", "content": "time?"}],
                                  tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False,
                                  seed=4, n=3)
    assert all(len(ch.message.tool_calls) == 1 for ch in r.choices)
    r = c.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "weather?"}],
                                  tools=[WEATHER, TIME], seed=4,
                                  tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and r.choices[0].finish_reason == "tool_calls"
    check_args("get_time", call.function.arguments)


def test_streamed_tool_calls_arrive_as_openai_sends_them(base, cluster, ends_lists):
    c = oa(base, cluster)
    calls: dict[int, dict] = {}
    first_deltas = {}
    finish = None
    with c.chat.completions.create(model="llama", messages=[{"role": "user", "content": "weather?"}],
                                   tools=[WEATHER, TIME], tool_choice="required", seed=9, stream=True,
                                   logit_bias=ends_lists) as s:
        for chunk in s:
            for ch in chunk.choices:
                finish = ch.finish_reason or finish
                for tc in ch.delta.tool_calls or []:
                    if tc.index not in calls:
                        first_deltas[tc.index] = tc
                        calls[tc.index] = {"name": tc.function.name, "arguments": tc.function.arguments or ""}
                    else:
                        assert tc.id is None and tc.function.name is None
                        calls[tc.index]["arguments"] += tc.function.arguments or ""
    assert finish == "tool_calls" and calls
    for tc in first_deltas.values():
        assert tc.id and tc.type == "function" and tc.function.name
    for call in calls.values():
        check_args(call["name"], call["arguments"])


def test_auto_tool_choice_needs_a_parser_and_tools_reach_the_prompt(base, cluster):
    c = oa(base, cluster)
    user = [{"role": "user", "content": "weather in Paris?"}]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="llama", messages=user, tools=[WEATHER])  # auto by default
    assert e.value.body["param"] == "tool_choice" and "enable-auto-tool-choice" in e.value.body["message"]
    plain = c.chat.completions.create(model="qwen", messages=user, max_tokens=4)
    with_tools = c.chat.completions.create(model="qwen", messages=user, tools=[WEATHER], tool_choice="auto",
                                           max_tokens=4)
    none = c.chat.completions.create(model="qwen", messages=user, tools=[WEATHER], tool_choice="none",
                                     max_tokens=4)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 40
    assert none.usage.prompt_tokens == with_tools.usage.prompt_tokens  # "none" still shows the tools
    assert with_tools.choices[0].message.tool_calls is None or with_tools.choices[0].message.tool_calls == []


def test_tool_history_renders_as_transformers_renders_it(cluster, model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir / "tiny-qwen2")
    sent = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and the time in UTC?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
        {"role": "user", "content": [{"type": "text", "text": "Thanks!"}]},
    ]
    # transformers' documented form: arguments as objects
    hf_msgs = json.loads(json.dumps(sent))
    for call in hf_msgs[2]["tool_calls"]:
        call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    want = tok.apply_chat_template(hf_msgs, tools=[WEATHER, TIME], add_generation_prompt=True, tokenize=False)
    want_ids = tok.encode(want, add_special_tokens=False)
    assert "<tool_response>\n21 C, sunny\n</tool_response>" in want and '"arguments": {"city": "Paris"' in want
    r = httpx.post(f"{cluster['worker']}/tokenize", headers={"Authorization": f"Bearer {TOKEN}"},
                   json={"model": "qwen", "messages": sent, "tools": [WEATHER, TIME]})
    assert r.status_code == 200 and r.json()["tokens"] == want_ids
    for base in (cluster["worker"], cluster["router"]):
        out = oa(base, cluster).chat.completions.create(model="qwen", messages=sent, tools=[WEATHER, TIME],
                                                        tool_choice="none", max_tokens=1)
        assert out.usage.prompt_tokens == len(want_ids)


def test_langchain_structured_output_and_bind_tools(base, cluster):
    from langchain_openai import ChatOpenAI

    key = TOKEN if base == cluster["worker"] else KEY
    llm = ChatOpenAI(model="qwen", base_url=f"{base}/v1", api_key=key, max_retries=0, seed=6)
    person = llm.with_structured_output(Person, method="json_schema").invoke("A person, please.")
    assert isinstance(person, Person)
    person = llm.with_structured_output(Person, method="function_calling").invoke("A person, please.")
    assert isinstance(person, Person)
    ai = llm.bind_tools([WEATHER, TIME], tool_choice="get_weather").invoke("Weather in Oslo?")
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "get_weather"
    check_args("get_weather", json.dumps(ai.tool_calls[0]["args"]))


def test_litellm_tool_call_required(base, cluster, ends_lists):
    import litellm

    key = TOKEN if base == cluster["worker"] else KEY
    r = litellm.completion(model="openai/llama", api_base=f"{base}/v1", api_key=key, seed=8,
                           messages=[{"role": "user", "content": "time in Tokyo?"}],
                           tools=[WEATHER, TIME], tool_choice="required", logit_bias=ends_lists)
    calls = r.choices[0].message.tool_calls
    assert calls and r.choices[0].finish_reason == "tool_calls"
    for call in calls:
        check_args(call.function.name, call.function.arguments)
