"""KV-aware routing's tokenization: the router computes a request's prompt token ids from the
worker's ``/tokenizer_info`` with ``tokenizers`` and ``jinja2`` alone (router/prompt_tokens.py),
and they must be the ids the worker's engine runs. Checked against a real worker process: its
``/tokenize`` and, for what /tokenize does not cover, the ids its engine echoes back (chat
``prompt_logprobs``, completions ``echo`` with ``return_tokens_as_token_ids``)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import httpx
import pytest
from procs import start_manager, start_worker, wait_until

from router.prompt_tokens import CHAT, COMPLETIONS, ModelTokenizer, PromptTokens

TOKEN = "tok-prompt-7c1e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BOS = "<|endoftext|>"

# A template exercising transformers' Jinja environment: namespace, loop controls, the
# {% generation %} tag, tojson (non-ASCII kept, indent, messages' key order), dict(),
# strftime_now, raise_exception, a configured variable and a special-token variable, and the
# whitespace control of trim_blocks / lstrip_blocks.
FANCY = """{%- set ns = namespace(system='', turns=0) -%}
{%- if messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] -%}{%- endif -%}
<|im_start|>system
Today: {{ strftime_now('%d %B %Y') }} / style: {{ house_style | default('none') }}
{{ ns.system }}
{% if tools %}
Tools: {{ tools | tojson(indent=2) }}
{% endif %}
<|im_end|>
{% for m in messages %}
    {% if m['role'] == 'system' %}{% continue %}{% endif %}
    {% if m['role'] == 'forbidden' %}{{ raise_exception('role forbidden is not allowed') }}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
<|im_start|>{{ m['role'] }} #{{ ns.turns }}
{% generation %}{{ m | tojson }}{% endgeneration %}

{% if m['content'] is string %}{{ m['content'] }}{% else %}
{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endif %}<|im_end|>
    {% if loop.index >= 40 %}{% break %}{% endif %}
{% endfor %}
{{ dict(eos=eos_token, n=ns.turns) | tojson }}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
TOOL_USE = ("TOOL USE {{ tools | length }} {{ tools[0] | tojson }}\n"
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city", "strict": False,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# the same tool with its keys in another order and an extra one: the worker dumps declared fields first
WEATHER_SHUFFLED = {"function": {"parameters": WEATHER["function"]["parameters"], "x-note": "ünïcode",
                                 "name": "get_time"}, "type": "function", "x-extra": 1}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}

SYSTEM_USER = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there!"}]
MULTI_TURN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
              {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"}]
PARTS = [{"role": "user", "content": [{"type": "text", "text": "first part"}, {"type": "text", "text": "second"}]}]
TOOL_TURNS = [
    {"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL, {
        "id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Bern"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "12°C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "9°C"},
    {"role": "assistant", "content": "Zürich 12°C, Bern 9°C.", "tool_calls": [
        {"id": "c3", "type": "function", "function": {"name": "get_weather", "arguments": "not json {"}}]},
    {"role": "user", "content": "Thanks"}]
UNICODE = [{"role": "user", "content": "Grüße 🙂🚀 — 你好, мир! 👍🏽 e\u0301 \u200b tab\tend"}]
REASONING = [{"role": "user", "content": "Think first."},
             {"role": "assistant", "content": "The answer is 7.", "reasoning": "3 + 4 = 7"},
             {"role": "user", "content": "Why?"}]
REASONING_LAST = [{"role": "user", "content": "Think first."},
                  {"role": "assistant", "content": "The answer is 7.", "reasoning": "3 + 4 = 7"}]
EXTRA_KEYS = [{"content": "odd key order", "x-meta": {"k": [1, 2]}, "role": "user", "name": "ann"}]
CONTINUE = [{"role": "user", "content": "Write a haiku."}, {"role": "assistant", "content": "Autumn moonlight "}]
CONTINUE_PARTS = [{"role": "user", "content": "Go on."},
                  {"role": "assistant", "content": [{"type": "text", "text": "One, two,"}]}]

CASES = {
    "system_user": {"messages": SYSTEM_USER},
    "multi_turn": {"messages": MULTI_TURN},
    "parts": {"messages": PARTS},
    "tools": {"messages": TOOL_TURNS, "tools": [WEATHER, WEATHER_SHUFFLED], "tool_choice": "none"},
    "unicode": {"messages": UNICODE},
    "reasoning": {"messages": REASONING},
    "reasoning_last": {"messages": REASONING_LAST, "add_generation_prompt": False},
    "extra_keys": {"messages": EXTRA_KEYS},
    "no_generation_prompt": {"messages": MULTI_TURN, "add_generation_prompt": False},
    "continue": {"messages": CONTINUE, "add_generation_prompt": False, "continue_final_message": True},
    "continue_parts": {"messages": CONTINUE_PARTS, "add_generation_prompt": False, "continue_final_message": True},
    "special_tokens": {"messages": SYSTEM_USER, "add_special_tokens": True},
    "no_special_tokens": {"messages": SYSTEM_USER, "add_special_tokens": False},
    "no_thinking": {"messages": SYSTEM_USER, "chat_template_kwargs": {"enable_thinking": False}},
    "thinking_on": {"messages": REASONING, "chat_template_kwargs": {"enable_thinking": True}},
    "empty_tools": {"messages": SYSTEM_USER, "tools": []},
    "truncate": {"messages": MULTI_TURN, "truncate_prompt_tokens": 9},
    "truncate_all": {"messages": MULTI_TURN, "truncate_prompt_tokens": -1},
}
# chat request fields /tokenize does not take (compared with the engine's echo only)
CHAT_ONLY = {"truncate_prompt_tokens", "tool_choice"}
MODELS = ["llama", "qwen2", "qwen3", "qwen3-nothink", "bos", "named", "fancy", "vl"]


def _bos_model(model_dir, tmp):
    """tiny-llama whose tokenizer's post-processor adds a BOS token."""
    from tokenizers import Tokenizer, processors

    path = tmp / "tiny-llama-bos"
    shutil.copytree(model_dir / "tiny-llama", path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    tok.save(str(path / "tokenizer.json"))
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "bos_token": BOS}))
    return path


def _named_model(model_dir, tmp):
    """tiny-qwen2 whose tokenizer has named templates: ``default`` and ``tool_use``."""
    from transformers import AutoTokenizer

    path = tmp / "tiny-qwen2-named"
    shutil.copytree(model_dir / "tiny-qwen2", path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = {"default": tok.chat_template, "tool_use": TOOL_USE}
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def worker(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prompt_tokens")
    fancy = tmp / "fancy.jinja"
    fancy.write_text(FANCY)
    qwen3, llama = model_dir / "tiny-qwen3", model_dir / "tiny-llama"
    # entries are found by name (their sources are never one of --models')
    yaml = ("  models:\n"
            "    - name: qwen3\n      source: by-name-qwen3\n"
            "      enable_auto_tool_choice: true\n      tool_call_parser: hermes\n"
            "    - name: qwen3-nothink\n      source: by-name-nothink\n"
            "      chat_template_kwargs: {enable_thinking: false}\n"
            f"    - name: fancy\n      source: by-name-fancy\n      chat_template: {fancy}\n"
            "      chat_template_kwargs: {house_style: plain}\n")
    models = {"llama": llama, "qwen2": model_dir / "tiny-qwen2", "qwen3": qwen3, "qwen3-nothink": qwen3,
              "bos": _bos_model(model_dir, tmp), "named": _named_model(model_dir, tmp), "fancy": llama,
              "vl": model_dir / "tiny-qwen2-vl"}
    proc, url = start_worker(tmp, ",".join(f"{n}={p}" for n, p in models.items()), env={"WORKER_TOKEN": TOKEN},
                             ready_headers=AUTH, worker_yaml=yaml)
    try:
        infos = {}
        for name in models:
            r = httpx.get(f"{url}/tokenizer_info", params={"model": name}, headers=AUTH, timeout=60)
            assert r.status_code == 200, r.text
            infos[name] = r.json()
        yield {"url": url, "infos": infos, "proc": proc}
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]


@pytest.fixture(scope="module")
def tokenizers_(worker):
    return {name: ModelTokenizer(info) for name, info in worker["infos"].items()}


# -- what the worker runs ---------------------------------------------------------------------------
def engine_chat_ids(url: str, body: dict) -> tuple[int, list[int]] | None:
    """(prompt length, ids after the first) of a chat request as the engine ran it (its prompt
    logprobs name every prompt token but the first); None when the worker refuses it."""
    r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=120,
                   json={**body, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0})
    if r.status_code != 200:
        return None
    out = r.json()
    lps = out["prompt_logprobs"]
    assert lps[0] is None and len(lps) == out["usage"]["prompt_tokens"]
    return len(lps), [int(next(iter(e))) for e in lps[1:]]


def tokenize_ids(url: str, body: dict) -> list[int] | None:
    r = httpx.post(f"{url}/tokenize", headers=AUTH, timeout=60,
                   json={k: v for k, v in body.items() if k not in CHAT_ONLY})
    return r.json()["tokens"] if r.status_code == 200 else None


def engine_completion_ids(url: str, body: dict) -> list[int] | None:
    """The first prompt's ids as the engine ran them (echoed as ``token_id:N``)."""
    r = httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=120,
                   json={**body, "max_tokens": 0, "echo": True, "logprobs": 0, "return_tokens_as_token_ids": True})
    if r.status_code != 200:
        return None
    return [int(t.split(":", 1)[1]) for t in r.json()["choices"][0]["logprobs"]["tokens"]]


# -- /tokenizer_info --------------------------------------------------------------------------------
def test_tokenizer_info_route_auth_404_and_digest(worker):
    from worker.tokenizer_info import digest_of

    url = worker["url"]
    assert httpx.get(f"{url}/tokenizer_info", params={"model": "llama"}).status_code == 401
    r = httpx.get(f"{url}/tokenizer_info", params={"model": "nope"}, headers=AUTH)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["param"] == "model"
    r = httpx.get(f"{url}/tokenizer_info", headers=AUTH)  # no model named
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    infos = worker["infos"]
    for name, info in infos.items():
        assert info["digest"] == digest_of(info), name  # the digest covers what the router uses
        assert info["max_model_len"] in (1024, 2048) and info["kind"] == "generate"
    assert isinstance(infos["named"]["chat_template"], dict) and set(infos["named"]["chat_template"]) == {
        "default", "tool_use"}
    assert infos["fancy"]["chat_template"] == FANCY
    assert infos["fancy"]["chat_template_kwargs"] == {"house_style": "plain"}
    assert infos["qwen3-nothink"]["chat_template_kwargs"] == {"enable_thinking": False}
    assert infos["bos"]["special_tokens"]["bos_token"] == BOS
    assert infos["vl"]["vision"] is True and infos["llama"]["vision"] is False
    # same tokenizer and template: one digest; any difference in what renders: another
    assert infos["qwen3"]["digest"] != infos["qwen3-nothink"]["digest"]
    assert infos["llama"]["digest"] != infos["fancy"]["digest"] != infos["bos"]["digest"]
    # the digest does not move once the worker has encoded (transformers resets truncation then)
    httpx.post(f"{url}/tokenize", headers=AUTH, json={"model": "llama", "prompt": "hello"})
    again = httpx.get(f"{url}/tokenizer_info", params={"model": "llama"}, headers=AUTH).json()
    assert again["digest"] == infos["llama"]["digest"]


def test_tokenizer_json_leaves_out_truncation_and_padding(model_dir, tmp_path):
    """A tokenizer.json with truncation and padding: transformers clears both on its first encode;
    the serialized tokenizer (and so the digest) is the same before and after."""
    from transformers import AutoTokenizer

    from worker.tokenizer_info import backend_json

    path = tmp_path / "tiny-llama-truncating"
    shutil.copytree(model_dir / "tiny-llama", path)
    data = json.loads((path / "tokenizer.json").read_text())
    data["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    data["padding"] = {"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                       "pad_type_id": 0, "pad_token": BOS}
    (path / "tokenizer.json").write_text(json.dumps(data))
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.backend_tokenizer.truncation is not None
    before = backend_json(tok)
    long_text = "one two three four five six seven eight nine ten eleven"
    ids = tok.encode(long_text, add_special_tokens=False)
    assert tok.backend_tokenizer.truncation is None and len(ids) > 8
    assert backend_json(tok) == before
    assert json.loads(before)["truncation"] is None and json.loads(before)["padding"] is None
    info = {"digest": "d", "max_model_len": 64, "max_prompt_chars": 4096, "tokenizer": before}
    assert ModelTokenizer(info).token_ids(COMPLETIONS, {"prompt": long_text, "add_special_tokens": False}) == ids


# -- chat ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_chat_ids_equal_the_workers(worker, tokenizers_, model):
    url, tok = worker["url"], tokenizers_[model]
    compared = 0
    for case, fields in CASES.items():
        body = {"model": model, **fields}
        ours = tok.token_ids(CHAT, body)
        engine = engine_chat_ids(url, body)
        if engine is None:  # the worker refuses it (e.g. a template without that feature): so may we
            continue
        n, tail = engine
        assert ours is not None, (model, case)
        assert len(ours) == n and ours[1:] == tail, (model, case)
        if not CHAT_ONLY.intersection(fields) and model != "vl":  # /tokenize keeps parts on a VL model
            assert ours == tokenize_ids(url, body), (model, case)
        compared += 1
    assert compared >= len(CASES) - 4, f"{model}: only {compared} cases ran on the worker"


def test_features_really_change_the_ids(tokenizers_):
    """The cases above are not vacuous: each feature changes the prompt where it should."""
    def ids(model, **fields):
        return tokenizers_[model].token_ids(CHAT, {"model": model, **fields})

    bos = tokenizers_["bos"]
    assert ids("bos", messages=SYSTEM_USER, add_special_tokens=True) == [
        bos.encode(BOS, False)[0], *ids("bos", messages=SYSTEM_USER)]
    assert ids("llama", messages=SYSTEM_USER, add_special_tokens=True) == ids("llama", messages=SYSTEM_USER)
    assert ids("qwen3", messages=SYSTEM_USER, chat_template_kwargs={"enable_thinking": False}) == \
        ids("qwen3-nothink", messages=SYSTEM_USER) != ids("qwen3", messages=SYSTEM_USER)
    assert ids("qwen3-nothink", messages=SYSTEM_USER, chat_template_kwargs={"enable_thinking": True}) == \
        ids("qwen3", messages=SYSTEM_USER)  # a request's kwargs win over the model's
    assert tokenizers_["named"]._tok.decode(ids("named", messages=SYSTEM_USER, tools=[WEATHER])).startswith(
        'TOOL USE 1 {"type": "function"')
    assert ids("named", messages=SYSTEM_USER) == ids("qwen2", messages=SYSTEM_USER)
    cont = ids("qwen2", messages=CONTINUE, add_generation_prompt=False, continue_final_message=True)
    closed = ids("qwen2", messages=CONTINUE, add_generation_prompt=False)
    assert cont != closed and len(cont) < len(closed)
    assert ids("qwen2", messages=MULTI_TURN, truncate_prompt_tokens=9) == ids("qwen2", messages=MULTI_TURN)[-9:]
    fancy = tokenizers_["fancy"]
    text = fancy._tok.decode(ids("fancy", messages=TOOL_TURNS, tools=[WEATHER_SHUFFLED]), skip_special_tokens=False)
    assert "style: plain" in text and "Zürich" in text and '"x-note": "ünïcode"' in text
    assert text.index('"name": "get_time"') < text.index('"parameters"')  # declared fields first, as the worker
    assert '"thinking": "3 + 4 = 7"' in fancy._tok.decode(ids("fancy", messages=REASONING))


def test_unreproducible_requests_give_none(worker, tokenizers_):
    llama, vl = tokenizers_["llama"], tokenizers_["vl"]
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with_image = [{"role": "user", "content": [{"type": "text", "text": "what is it?"}, image]}]
    none_bodies = [
        {"messages": SYSTEM_USER, "chat_template": "{{ messages[0]['content'] }}"},  # a request's own
        {"messages": SYSTEM_USER, "documents": [{"title": "a", "text": "b"}]},
        {"messages": with_image},
        {"messages": []}, {"messages": "hi"}, {"messages": [{"content": "no role"}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        {"messages": SYSTEM_USER, "add_generation_prompt": "yes"},
        {"messages": SYSTEM_USER, "add_special_tokens": None},
        {"messages": CONTINUE, "continue_final_message": True},  # with add_generation_prompt (default true)
        {"messages": SYSTEM_USER, "add_generation_prompt": False, "continue_final_message": True},
        {"messages": SYSTEM_USER, "chat_template_kwargs": {"messages": []}},
        {"messages": SYSTEM_USER, "chat_template_kwargs": "x"},
        {"messages": SYSTEM_USER, "tools": [{"type": "function", "function": {"name": ""}}]},
        {"messages": SYSTEM_USER, "tools": [{"type": "other", "function": {"name": "f"}}]},
        {"messages": SYSTEM_USER, "truncate_prompt_tokens": 0},
        {"messages": SYSTEM_USER, "truncate_prompt_tokens": 5000},
        {"messages": SYSTEM_USER, "truncate_prompt_tokens": True},
        {"messages": [{"role": "user", "content": "x" * 140_000}]},  # longer than the context could hold
    ]
    for body in none_bodies:
        for tok, name in ((llama, "llama"), (vl, "vl")):
            assert tok.token_ids(CHAT, {"model": name, **body}) is None, (name, body)
            assert engine_chat_ids(worker["url"], {"model": name, **body}) is None, (name, body)  # refused there too
    # the template's own raise_exception: the worker answers 400, we None
    forbidden = {"model": "fancy", "messages": [{"role": "forbidden", "content": "x"}]}
    assert tokenizers_["fancy"].token_ids(CHAT, forbidden) is None
    assert engine_chat_ids(worker["url"], forbidden) is None
    # not a route we compute, not a dict, no model info
    assert llama.token_ids("/v1/embeddings", {"model": "llama", "input": "x"}) is None
    assert llama.token_ids(CHAT, None) is None and llama.token_ids(COMPLETIONS, []) is None
    with pytest.raises(ValueError):
        ModelTokenizer({"digest": "x"})


# Corners of the Jinja environment, each rendered here and by the worker's own renderer code
# (transformers' render_jinja_template), in-process.
ENV_TEMPLATES = [
    "{{ dict.fromkeys(['a', 'b'], 1) | tojson }}{{ messages | tojson(ensure_ascii=true) }}"
    "{{ tools | tojson(sort_keys=true, separators=[',', ':']) }}{{ messages[0] | tojson(indent=1) }}",
    "{%- for m in messages -%}{%- if loop.index0 == 1 -%}{%- continue -%}{%- endif -%}"
    "{{ m.role | upper }}:{{ m.content | trim }}|{%- endfor -%}{{ '%05.2f' % 3.14159 }}"
    "{{ bos_token is defined }}{{ eos_token }}{{ pad_token }}",
    "{% generation %}{{ messages[0].content }}{% endgeneration %}\n   {% if true %}\n  x\n{% endif %}\n"
    "  {%- for i in range(5) %}{% if i > 2 %}{% break %}{% endif %} {{ i }}{% endfor %}\n",
    "{{ strftime_now('%Y') }}|{{ messages | map(attribute='role') | join(',') }}|{{ range(3) | list }}"
    "|{{ messages[-1]['content'][::-1] }}|{{ messages | selectattr('role', 'equalto', 'user') | list | length }}",
    "{% for m in messages %}{% for k, v in m.items() %}{{ k }}={{ v }};{% endfor %}\n{% endfor %}",
    "{% set ns = namespace(n=0, s='') %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{% set ns.s = ns.s ~ m.role[0] %}{% endfor %}{{ ns.n }}{{ ns.s }}{{ tools[0].function.name if tools }}",
    "{{ ''.__class__ }}{{ messages.__len__ }}ok",
]
ENV_FAILING = [
    "{% set ns = namespace(_hidden=1) %}x",  # underscore names on a namespace
    "{{ messages.append(1) }}",  # the sandbox is immutable
    "{{ raise_exception('no ' + messages[0].role) }}",
    "{{ messages[0].content.nope.deeper }}",
    "{% for %}",  # does not compile
]
ENV_MESSAGES = [{"role": "system", "content": "  Système 🙂  "},
                {"role": "user", "content": "Hi", "name": "ann", "x-extra": [1, {"b": None}]},
                {"role": "assistant", "content": "ok", "reasoning": "because"},
                {"role": "user", "content": "again\u2028"}]


def test_template_environment_renders_as_transformers(worker, tokenizers_):
    from transformers.utils.chat_template_utils import render_jinja_template

    from worker.prompts import chat_messages
    from worker.protocol import ChatMessage, ToolDef
    from worker.template_process import render
    from worker.tools import tool_dicts

    info = worker["infos"]["llama"]
    body = {"model": "llama", "messages": ENV_MESSAGES, "tools": [WEATHER_SHUFFLED, WEATHER]}
    tools = tool_dicts([ToolDef.model_validate(t) for t in body["tools"]])
    messages = chat_messages([ChatMessage.model_validate(m) for m in ENV_MESSAGES], None, True)
    for template in ENV_TEMPLATES + ENV_FAILING:
        tok = ModelTokenizer({**info, "chat_template": template, "template_takes_parts": True})
        job = {"template": template, "messages": messages, "tools": tools, "documents": None,
               "add_generation_prompt": True, "continue_final_message": False,
               "special_tokens": info["special_tokens"], "variables": {}}
        try:
            text = render(job, render_jinja_template)
        except Exception:  # noqa: BLE001 - the worker answers 400 to it
            assert tok.token_ids(CHAT, body) is None, template
            assert template in ENV_FAILING, template
            continue
        assert template in ENV_TEMPLATES, template
        assert tok.token_ids(CHAT, body) == tok.encode(text, False), (template, text)


# -- completions ----------------------------------------------------------------------------------
COMPLETION_CASES = {
    "text": {"prompt": "count: one two three 🙂"},
    "text_no_special": {"prompt": "count: one two", "add_special_tokens": False},
    "text_special": {"prompt": "<|im_start|>user\nhi<|im_end|>", "add_special_tokens": True},
    "token_ids": {"prompt": [5, 17, 99, 3]},
    "several_text": {"prompt": ["first prompt here", "second"]},
    "several_ids": {"prompt": [[7, 8, 9], "second"]},
    "truncate": {"prompt": "a somewhat longer prompt to cut down", "truncate_prompt_tokens": 4},
    "truncate_ids": {"prompt": [5, 17, 99, 3, 42], "truncate_prompt_tokens": 2},
}


@pytest.mark.parametrize("model", ["llama", "bos", "qwen3"])
def test_completion_ids_equal_the_workers(worker, tokenizers_, model):
    tok = tokenizers_[model]
    for case, fields in COMPLETION_CASES.items():
        body = {"model": model, **fields}
        want = engine_completion_ids(worker["url"], body)
        assert want is not None, (model, case)
        assert tok.token_ids(COMPLETIONS, body) == want, (model, case)
    bos = tok.token_ids(COMPLETIONS, {"model": model, "prompt": "hi"})
    plain = tok.token_ids(COMPLETIONS, {"model": model, "prompt": "hi", "add_special_tokens": False})
    assert (bos == [tok.encode(BOS, False)[0], *plain]) == (model == "bos")
    for bad in ([], [True, 1], [[1], 2], {"a": 1}, None, [["x"]]):
        assert tok.token_ids(COMPLETIONS, {"model": model, "prompt": bad}) is None, bad


# -- the piece cache ------------------------------------------------------------------------------
FRAGMENTS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<s>", "<|im", " ", "  ", "\n", "\n\n", "hello",
             " world", "e\u0301", "\u0301", "café", "🙂", "你好", "x", "user\n", "12 34"]


def _texts(n: int = 300) -> list[str]:
    import random

    rng = random.Random(7)
    return ["", "<|im_start|>", "a<|im_start|>b", " lead<|im_end|> trail "] + [
        "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 14))) for _ in range(n)]


def _metaspace_tokenizer(scheme: str, lstrip: bool):
    """A SentencePiece-like tokenizer (NFC, Metaspace, BOS/EOS post-processor) trained here."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme)
    corpus = ["hello world, a test of the emergency broadcast system", "Grüße aus München e\u0301 café 你好"] * 50
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.add_special_tokens([AddedToken("<|im_start|>", normalized=False, lstrip=lstrip), "<|im_end|>"])
    tok.add_tokens(["<think>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return tok


@pytest.mark.parametrize("scheme,lstrip,enabled", [("always", False, True), ("never", False, True),
                                                   ("first", False, False), ("always", True, False)])
def test_piece_cache_equals_whole_text_encoding(scheme, lstrip, enabled):
    """Pieces between added tokens encode as they do within the whole text, where the cache is
    on; where a piece's encoding would depend on its neighbours it is off (and still exact)."""
    from router.piece_cache import PieceCache, special_affixes

    tok = _metaspace_tokenizer(scheme, lstrip)
    cache = PieceCache(tok, json.loads(tok.to_str()), split_special_tokens=False)
    assert cache.enabled is enabled
    assert special_affixes(tok) == ([1], [2])
    for text in _texts() * 2:  # the second round from the cache
        assert cache.encode(text) == tok.encode(text, add_special_tokens=False).ids, text
    assert (cache.hits > 0) is enabled


def test_piece_cache_on_the_served_tokenizers(worker, tokenizers_):
    from router.piece_cache import PieceCache

    for name, tok in tokenizers_.items():
        assert tok.pieces.enabled, name
        for text in _texts(100) * 2:
            for special in (False, True):
                assert tok.encode(text, special) == tok._tok.encode(text, add_special_tokens=special).ids, (name, text)
    llama = tokenizers_["llama"]._tok
    small = PieceCache(llama, json.loads(worker["infos"]["llama"]["tokenizer"]), False, max_chars=50)
    for text in _texts(50):  # bounded by characters: the least recently used pieces go first
        assert small.encode(text) == llama.encode(text, add_special_tokens=False).ids
        assert small._chars <= 50


# -- the router's cache -----------------------------------------------------------------------------
def test_prompt_tokens_fetches_once_caches_and_shares_by_digest(worker):
    url, infos = worker["url"], worker["infos"]
    body = {"model": "qwen3", "messages": MULTI_TURN}

    async def run():
        cache = PromptTokens(worker_token=TOKEN)
        try:
            digest = infos["qwen3"]["digest"]
            assert cache.lookup("qwen3", digest, url) is None  # a miss starts a background fetch
            for _ in range(20):  # concurrent misses share it
                assert cache.token_ids("qwen3", digest, url, CHAT, body) is None
            assert cache.fetches == 1
            await wait_for(lambda: cache.lookup("qwen3", digest, url) is not None)
            assert cache.fetches == 1 and len(cache) == 1
            tok = cache.lookup("qwen3", digest, url)
            assert tok.digest == digest and tok.model == "qwen3"
            assert cache.token_ids("qwen3", digest, url, CHAT, body) == tokenize_ids(url, body)
            assert cache.lookup("anything", None, url) is None and cache.fetches == 1  # no digest: no fetch
        finally:
            await cache.close()

        # bounded: the least recently used tokenizer goes first
        small = PromptTokens(worker_token=TOKEN, max_models=2)
        try:
            for name in ("llama", "qwen2", "bos"):
                small.lookup(name, infos[name]["digest"], url)
                await wait_for(lambda n=name: small.lookup(n, infos[n]["digest"], url) is not None)
            assert len(small) == 2
            assert small.lookup("bos", infos["bos"]["digest"], url) is not None
            assert small.lookup("qwen2", infos["qwen2"]["digest"], url) is not None
            before = small.fetches
            assert small.lookup("llama", infos["llama"]["digest"], url) is None  # evicted: fetched again
            assert small.fetches == before + 1
        finally:
            await small.close()

    asyncio.run(run())


def test_prompt_tokens_failures_back_off_and_never_raise(worker):
    url, digest = worker["url"], worker["infos"]["llama"]["digest"]
    body = {"model": "llama", "messages": SYSTEM_USER}

    async def run():
        wrong = PromptTokens(worker_token="not-the-token")
        try:
            assert wrong.token_ids("llama", digest, url, CHAT, body) is None
            await wait_for(lambda: not wrong._pending)
            assert wrong.token_ids("llama", digest, url, CHAT, body) is None  # 401: nothing cached
            assert wrong.fetches == 1  # and no new fetch while it backs off
        finally:
            await wrong.close()
        calls = []

        async def stale(worker_url, model):  # a worker now serving another tokenizer under that name
            calls.append((worker_url, model))
            return worker["infos"]["qwen2"]

        other = PromptTokens(fetch=stale)
        try:
            assert other.lookup("llama", digest, url) is None
            await wait_for(lambda: not other._pending)
            assert calls == [(url, "llama")]
            assert other.lookup("llama", digest, url) is None and len(calls) == 1  # backing off
            assert other.lookup("qwen2", worker["infos"]["qwen2"]["digest"], url) is not None  # kept under its own
        finally:
            await other.close()

        gate = asyncio.Event()

        async def slow(worker_url, model):
            await gate.wait()
            return worker["infos"][model]

        dead = PromptTokens(fetch=slow)
        dead.lookup("llama", digest, url)
        await dead.close()  # cancels the fetch under way
        assert dead.lookup("llama", digest, url) is None and dead.fetches == 1  # closed: no new fetches

    asyncio.run(run())
    # outside an event loop: no fetch can start, still no exception
    assert PromptTokens(worker_token=TOKEN).token_ids("llama", digest, url, CHAT, body) is None


async def wait_for(pred, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


# -- registry ------------------------------------------------------------------------------------
def test_registry_entries_carry_block_size_root_and_digest(model_dir, tmp_path):
    mgr, murl = start_manager(tmp_path, "--worker-token", TOKEN)
    try:
        proc, url = start_worker(tmp_path, f"chat={model_dir / 'tiny-qwen2'}", "--manager-url", murl,
                                 "--heartbeat-interval", "0.5", env={"WORKER_TOKEN": TOKEN}, ready_headers=AUTH)
        try:
            workers = wait_until(lambda: httpx.get(f"{murl}/workers", headers=AUTH).json(), what="registration")
            (entry,) = workers[0]["model_info"]
            info = httpx.get(f"{url}/tokenizer_info", params={"model": "chat"}, headers=AUTH).json()
            assert entry["tokenizer_digest"] == info["digest"]
            assert entry["kv_block_size"] >= 1 and len(bytes.fromhex(entry["kv_root"])) == 16
        finally:
            assert proc.stop() == 0
    finally:
        mgr.stop()


# -- cost --------------------------------------------------------------------------------------------
def test_cost_of_a_2000_token_chat(tokenizers_):
    """Printed, not asserted: the router's CPU per request for a ~2000-token chat, with every
    piece new (a new conversation), with only the last turn new (a conversation's next turn: the
    common case KV-aware routing is for) and with the whole prompt seen before."""
    tok = tokenizers_["qwen3"]

    def body(tag: str, last: str) -> dict:
        turns = [{"role": "system", "content": f"{tag} You answer questions about the standard library. " * 20}]
        for i in range(7):
            turns.append({"role": "user", "content": f"{tag} Question {i}: what does itertools.chain do? " * 4})
            turns.append({"role": "assistant", "content": f"{tag} It yields from each of the iterables. " * 4})
        turns.append({"role": "user", "content": f"Thanks, and functools.partial? {last}"})
        return {"model": "qwen3", "messages": turns}

    ids = tok.token_ids(CHAT, body("warm", "0"))
    assert ids is not None and 1500 <= len(ids) <= 3000, len(ids)
    n = 100
    figures = {}
    for kind, make in (("new conversation", lambda i: body(f"cold{i}", "0")),
                       ("next turn", lambda i: body("warm", str(i))),
                       ("all seen", lambda i: body("warm", "0"))):
        bodies = [make(i) for i in range(n)]
        start = time.perf_counter()
        for b in bodies:
            assert tok.token_ids(CHAT, b) is not None
        figures[kind] = (time.perf_counter() - start) / n * 1000
    print(f"\nrouter token_ids, {len(ids)}-token chat of {len(body('x', '0')['messages'])} messages: "
          + ", ".join(f"{k} {v:.2f} ms" for k, v in figures.items()))
