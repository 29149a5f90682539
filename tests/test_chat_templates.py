"""Chat templates are code (SPEC §3.1): they render in renderer processes under a time limit, a
request's own template only on a trusting worker; chat_template_kwargs (enable_thinking),
continue_final_message and add_special_tokens reach the template and the encoding exactly as
transformers' apply_chat_template + encode would have them."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from procs import ROOT, start_manager, start_worker, wait_until

from worker.config import build_config
from worker.template_renderer import RenderError, RenderJob, RenderTimeout, TemplateRenderer

# Two nested loops: ~18 s of pure-Python Jinja on this box, far past any time limit used here.
SLOW = ("{% for i in range(20000) %}{% for j in range(20000) %}{% endfor %}{% endfor %}"
        "{{ messages[0]['content'] }}")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
HI = [{"role": "user", "content": "Hi there!"}]


# -- processes ----------------------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # state, ppid, ...


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def renderer_children(pid: int) -> set[int]:
    """Live renderer processes whose parent is ``pid``."""
    out = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        st = _stat(int(d.name))
        if st is None or st[1] != str(pid) or st[0] == "Z":
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if b"worker.template_process" in cmd:
            out.add(int(d.name))
    return out


# -- the renderer alone -------------------------------------------------------------------------
def test_renders_byte_identical_to_apply_chat_template(model_dir):
    from transformers import AutoTokenizer

    llama = AutoTokenizer.from_pretrained(model_dir / "tiny-llama")
    qwen3 = AutoTokenizer.from_pretrained(model_dir / "tiny-qwen3")
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21 C"},
        {"role": "user", "content": [{"type": "text", "text": "Thanks!"}, {"type": "text", "text": "And?"}]},
    ]
    thinking = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "two and two"},
                {"role": "user", "content": "3+3?"},
                {"role": "assistant", "content": "It is", "reasoning": "three and three"}]
    cases = [  # (tokenizer, messages, options)
        (llama, HI, {"add_generation_prompt": True}),
        (llama, HI, {"add_generation_prompt": False}),
        (llama, history, {"add_generation_prompt": True, "tools": [WEATHER]}),
        (llama, history[:3] + [{"role": "assistant", "content": "Let me"}], {"continue_final_message": True}),
        (qwen3, history, {"add_generation_prompt": True, "tools": [WEATHER]}),
        (qwen3, thinking[:3], {"add_generation_prompt": True}),
        (qwen3, thinking[:3], {"add_generation_prompt": True, "enable_thinking": False}),
        (qwen3, thinking[:3], {"add_generation_prompt": True, "enable_thinking": True}),
        (qwen3, thinking, {"add_generation_prompt": False}),
        (qwen3, thinking, {"continue_final_message": True}),
    ]
    docs_template = "{{ bos_token }}{% for d in documents %}[{{ d.title }}]{% endfor %}{{ eos_token }}{{ x }}"

    async def run():
        r = TemplateRenderer(1, 1, timeout=30)
        await r.start()
        try:
            for tok, msgs, opts in cases:
                opts = dict(opts)
                tools = opts.pop("tools", None)
                agp = opts.pop("add_generation_prompt", False)
                cont = opts.pop("continue_final_message", False)
                want = tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=agp,
                                               continue_final_message=cont, tokenize=False, **opts)
                got = await r.render(RenderJob(tok.chat_template, json.loads(json.dumps(msgs)), tools,
                                               add_generation_prompt=agp, continue_final_message=cont,
                                               special_tokens=tok.special_tokens_map, variables=opts))
                assert got == want, (msgs, opts)
            docs = [{"title": "a", "text": "x"}, {"title": "b", "text": "y"}]
            want = llama.apply_chat_template(HI, documents=docs, chat_template=docs_template, tokenize=False,
                                             x="!", eos_token="<eos>")
            got = await r.render(RenderJob(docs_template, HI, documents=docs,
                                           special_tokens=llama.special_tokens_map,
                                           variables={"x": "!", "eos_token": "<eos>"}))
            assert got == want == "[a][b]<eos>!"
        finally:
            r.stop()

    asyncio.run(run())


def test_slow_render_is_killed_and_never_stalls_the_loop():
    async def run():
        r = TemplateRenderer(1, 2, timeout=1.5)
        await r.start()
        try:
            [first] = r.pids
            gaps = []
            stop = asyncio.Event()

            async def tick():  # how long the event loop ever went without running us
                last = time.monotonic()
                while not stop.is_set():
                    await asyncio.sleep(0.01)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

            ticker = asyncio.create_task(tick())
            t0 = time.monotonic()
            slow = asyncio.create_task(r.render(RenderJob(SLOW, HI)))
            await asyncio.sleep(0.2)
            quick = await r.render(RenderJob("{{ messages[0]['content'] }}", HI))  # the pool grows for it
            assert quick == "Hi there!"
            with pytest.raises(RenderTimeout):
                await slow
            assert 1.5 <= time.monotonic() - t0 < 6
            stop.set()
            await ticker
            assert max(gaps) < 0.5, max(gaps)
            wait = time.monotonic() + 10
            while alive(first) and time.monotonic() < wait:
                await asyncio.sleep(0.05)
            assert not alive(first), "the stuck renderer was not killed"
            assert first not in r.pids and len(r.pids) >= 1
            with pytest.raises(RenderError) as e:
                await r.render(RenderJob("{{ raise_exception('no system role here') }}", HI))
            assert e.value.kind == "template" and "no system role here" in str(e.value)
            with pytest.raises(RenderError) as e:
                await r.render(RenderJob("{% for i in range(100) %}xxxxxxxxxx{% endfor %}", HI, max_chars=500))
            assert e.value.kind == "too_long"
            # a caller that leaves mid-render: its process finishes that job before serving another,
            # so no later render ever reads an earlier job's answer
            medium = "{% for i in range(2500) %}{% for j in range(2500) %}{% endfor %}{% endfor %}A"
            left = asyncio.create_task(r.render(RenderJob(medium, HI)))
            await asyncio.sleep(0.05)
            left.cancel()
            outs = await asyncio.gather(*(r.render(RenderJob(f"B{i}", HI)) for i in range(4)))
            assert outs == [f"B{i}" for i in range(4)]
            pids = r.pids
        finally:
            r.stop()
        assert not any(alive(p) for p in pids)

    asyncio.run(run())


def test_renderers_die_with_a_killed_parent(tmp_path):
    """SIGKILL leaves no cleanup to run: the kernel kills the renderers (PDEATHSIG)."""
    script = ("import asyncio, os, sys, time\n"
              "from worker.template_renderer import TemplateRenderer\n"
              "async def main():\n"
              "    r = TemplateRenderer(2, 2)\n"
              "    await r.start()\n"
              "    print(' '.join(map(str, r.pids)), flush=True)\n"
              "    await asyncio.sleep(300)\n"
              "asyncio.run(main())\n")
    p = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(x) for x in p.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(x) for x in pids)
        p.kill()
        p.wait()
        wait_until(lambda: not any(alive(x) for x in pids), timeout=10, what="renderers gone")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# -- config -------------------------------------------------------------------------------------
def test_config_settings_and_their_bad_values():
    ok = build_config({"worker": {"trust_request_chat_template": True, "chat_template_timeout": 2,
                                  "models": [{"source": "m", "chat_template_kwargs": {"enable_thinking": False}}]}},
                      {})
    assert ok.trust_request_chat_template and ok.chat_template_timeout == 2
    assert ok.models[0].chat_template_kwargs == {"enable_thinking": False}
    default = build_config({}, {"models": "m"})
    assert not default.trust_request_chat_template and default.chat_template_timeout == 10
    assert (default.chat_template_processes, default.chat_template_max_processes) == (2, 4)
    assert build_config({}, {"models": "m", "trust_request_chat_template": True}).trust_request_chat_template
    from clusterkit.config import ConfigError

    for bad in ({"chat_template_kwargs": {"messages": []}}, {"chat_template_kwargs": [1]}):
        with pytest.raises(ConfigError, match="chat_template_kwargs"):
            build_config({"worker": {"models": [{"source": "m", **bad}]}}, {})
    for bad in ({"chat_template_timeout": 0}, {"chat_template_processes": 0}, {"trust_request_chat_template": "maybe"},
                {"chat_template_processes": 3, "chat_template_max_processes": 2}):
        with pytest.raises(ConfigError, match="chat_template"):
            build_config({"worker": bad}, {"models": "m"})


# -- a real worker ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    """A manager (heartbeat TTL 2 s) and a worker trusting request templates (time limit 2 s, beats
    every 0.5 s) serving llama, qwen (tiny-qwen3), qwen-nothink (enable_thinking false by
    config) and slow (a model whose own template never finishes in time)."""
    tmp = tmp_path_factory.mktemp("templates")
    mgr, murl = start_manager(tmp, "--heartbeat-ttl", "2")
    try:
        qwen, llama = model_dir / "tiny-qwen3", model_dir / "tiny-llama"
        # entries found by name; their sources are spelled differently from --models', since an
        # entry whose source matches would lend its settings to llama and qwen too
        yaml = ("  chat_template_timeout: 2\n  models:\n"
                f"    - name: qwen-nothink\n      source: {qwen}/.\n"
                "      chat_template_kwargs: {enable_thinking: false}\n"
                f"    - name: slow\n      source: {llama}/.\n      chat_template: {json.dumps(SLOW)}\n")
        w, wurl = start_worker(tmp, f"llama={llama},qwen={qwen},qwen-nothink={qwen},slow={llama}",
                               "--trust-request-chat-template", "--manager-url", murl, "--heartbeat-interval", "0.5",
                               worker_yaml=yaml)
        try:
            wait_until(lambda: len(httpx.get(f"{murl}/workers").json()) == 1, what="registration")
            yield {"worker": wurl, "manager": murl, "proc": w, "manager_proc": mgr}
        finally:
            w.stop()
    finally:
        mgr.stop()


def tokenize(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/tokenize", json=body, timeout=60)


def chat(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"max_tokens": 1, **body}, timeout=60)


def hf_ids(tok, messages, add_special_tokens=False, **kw) -> list[int]:
    return tok.encode(tok.apply_chat_template(messages, tokenize=False, **kw), add_special_tokens=add_special_tokens)


def test_request_template_is_used_when_trusted(cluster, model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir / "tiny-llama")
    url, template = cluster["worker"], "<|im_start|>{{ messages[0]['content'] | upper }}<|im_end|>"
    want = tok.encode("<|im_start|>HI THERE!<|im_end|>", add_special_tokens=False)
    r = tokenize(url, model="llama", messages=HI, chat_template=template)
    assert r.status_code == 200 and r.json()["tokens"] == want
    r = chat(url, model="llama", messages=HI, chat_template=template)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(want)
    r = chat(url, model="llama", messages=HI, chat_template="{{ raise_exception('nope, not this') }}")
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "chat_template" and "nope, not this" in err["message"]


def test_slow_template_holds_up_no_other_model_nor_the_heartbeat(cluster):
    url, murl, pid = cluster["worker"], cluster["manager"], cluster["proc"].p.pid
    before = renderer_children(pid)
    assert len(before) == 2  # the warm pool

    def b_latency() -> float:
        t = time.monotonic()
        r = chat(url, model="qwen", messages=HI, max_tokens=4, ignore_eos=True)
        assert r.status_code == 200, r.text
        return time.monotonic() - t

    def listed() -> bool:
        return [w["url"] for w in httpx.get(f"{murl}/workers", timeout=10).json() if w["status"] == "ready"] == [url]

    b_latency()
    bound = 3 * max(b_latency() for _ in range(5)) + 0.5
    slow: dict = {}

    def send_slow():
        t = time.monotonic()
        slow["r"] = chat(url, model="llama", messages=HI, chat_template=SLOW)
        slow["s"] = time.monotonic() - t

    th = threading.Thread(target=send_slow)
    th.start()
    time.sleep(0.3)
    during, seen = [], []
    while th.is_alive():
        during.append(b_latency())
        seen.append(listed())
    th.join()
    assert during and max(during) < bound, (during, bound)
    assert all(seen), seen
    r, took = slow["r"], slow["s"]
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "chat_template" and "too long" in err["message"], r.text
    assert 2 <= took < 10, took
    time.sleep(2.5)  # longer than the manager's TTL
    assert listed()
    assert "evicted" not in cluster["manager_proc"].log()
    # the stuck process was killed and replaced; rendering goes on
    wait_until(lambda: len(renderer_children(pid)) == 2 and not before <= renderer_children(pid),
               timeout=20, what="the killed renderer replaced")
    assert chat(url, model="llama", messages=HI).status_code == 200
    assert tokenize(url, model="llama", messages=HI, chat_template="{{ messages[0]['content'] }}").status_code == 200


def test_slow_model_template_times_out_too(cluster):
    t = time.monotonic()
    r = chat(cluster["worker"], model="slow", messages=HI)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "messages" and "too long" in err["message"]
    assert 2 <= time.monotonic() - t < 10


def test_enable_thinking_reaches_the_template(cluster, model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir / "tiny-qwen3")
    url = cluster["worker"]
    want = {v: hf_ids(tok, HI, add_generation_prompt=True, **({} if v is None else {"enable_thinking": v}))
            for v in (None, False, True)}
    assert want[False] != want[True] == want[None]
    for model, default in (("qwen", None), ("qwen-nothink", False)):
        for value in (None, False, True):
            kwargs = {} if value is None else {"chat_template_kwargs": {"enable_thinking": value}}
            expected = want[value if value is not None else default]  # the request's value wins
            r = tokenize(url, model=model, messages=HI, **kwargs)
            assert r.status_code == 200 and r.json()["tokens"] == expected, (model, value)
            r = chat(url, model=model, messages=HI, **kwargs)
            assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(expected), (model, value)


def test_continue_final_message(cluster, model_dir):
    from transformers import AutoTokenizer

    url = cluster["worker"]
    msgs = [*HI, {"role": "assistant", "content": "Hello! The answer is", "reasoning_content": "greet back"}]
    for model, kind in (("llama", "tiny-llama"), ("qwen", "tiny-qwen3")):
        tok = AutoTokenizer.from_pretrained(model_dir / kind)
        want = hf_ids(tok, msgs, continue_final_message=True)
        r = tokenize(url, model=model, messages=msgs, continue_final_message=True, add_generation_prompt=False)
        assert r.status_code == 200 and r.json()["tokens"] == want
        assert tok.decode(want).endswith("The answer is")
        r = chat(url, model=model, messages=msgs, continue_final_message=True, add_generation_prompt=False)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(want)
    for send in (chat, tokenize):
        r = send(url, model="llama", messages=msgs, continue_final_message=True)  # add_generation_prompt: true
        assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"
        r = send(url, model="llama", messages=HI, continue_final_message=True, add_generation_prompt=False)
        assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"
        assert "assistant" in r.json()["error"]["message"]


@pytest.mark.parametrize("field, value", [
    ("chat_template", 123), ("chat_template_kwargs", [1]), ("chat_template_kwargs", "enable_thinking"),
    ("chat_template_kwargs", {"messages": []}), ("chat_template_kwargs", {"add_generation_prompt": False}),
    ("continue_final_message", "maybe"), ("add_special_tokens", "maybe"), ("add_generation_prompt", [True]),
])
def test_bad_values_are_400_naming_the_field(cluster, field, value):
    for send in (chat, tokenize):
        r = send(cluster["worker"], model="qwen", messages=HI, **{field: value})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == field, (send.__name__, r.text)


# -- a worker that does not trust request templates ---------------------------------------------
def bos_model(model_dir: Path, tmp: Path) -> Path:
    """tiny-llama whose tokenizer adds a BOS (<|endoftext|>) when asked for special tokens."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    path = tmp / "tiny-llama-bos"
    shutil.copytree(model_dir / "tiny-llama", path)
    tok = AutoTokenizer.from_pretrained(path)
    bos = "<|endoftext|>"
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))])
    tok.save_pretrained(path)
    return path


def test_untrusting_worker_add_special_tokens_and_clean_exit(model_dir, tmp_path):
    from transformers import AutoTokenizer

    path = bos_model(model_dir, tmp_path)
    tok = AutoTokenizer.from_pretrained(path)
    proc, url = start_worker(tmp_path, f"bos={path}")
    try:
        children = renderer_children(proc.p.pid)
        assert len(children) == 2
        for send in (chat, tokenize):
            r = send(url, model="bos", messages=HI, chat_template="{{ messages[0]['content'] }}")
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == "chat_template"
            assert "--trust-request-chat-template" in err["message"]
        plain = hf_ids(tok, HI, add_generation_prompt=True)
        with_bos = hf_ids(tok, HI, add_special_tokens=True, add_generation_prompt=True)
        assert with_bos == [tok.convert_tokens_to_ids("<|endoftext|>"), *plain]
        for flag, want in ((None, plain), (False, plain), (True, with_bos)):
            extra = {} if flag is None else {"add_special_tokens": flag}
            r = tokenize(url, model="bos", messages=HI, **extra)
            assert r.status_code == 200 and r.json()["tokens"] == want, flag
            r = chat(url, model="bos", messages=HI, **extra)
            assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(want), flag
        # a text prompt keeps vLLM's default (special tokens added)
        assert tokenize(url, model="bos", prompt="Hi").json()["tokens"] == tok.encode("Hi")
        # SIGTERM to the worker alone (not its process group): it stops its renderers itself
        os.kill(proc.p.pid, signal.SIGTERM)
        assert proc.p.wait(30) == 0, proc.log()[-2000:]
        wait_until(lambda: not any(alive(c) for c in children), timeout=10, what="renderers gone")
    finally:
        proc.stop()
