"""Images in chat completions through a real worker (and the router), with the openai client."""

from __future__ import annotations

import asyncio
import base64
import http.server
import threading

import httpx
import openai
import pytest
from PIL import Image
from procs import start_manager, start_worker, wait_until
from test_vl_parity import hf_generate, image, png


def data_url(im: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(im)).decode()


def msg(*urls: str, text: str = "What is in the picture?"):
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    image(40).save(d / "cat.png")
    return d


@pytest.fixture(scope="module")
def image_server(media_dir):
    """A real local HTTP server for allow-listed image URLs."""
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(media_dir), **k)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://localhost:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(scope="module")
def vl_worker(model_dir, media_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vlworker")
    yaml = (f"  media_dirs: [{media_dir}]\n  allowed_image_domains: [localhost]\n"
            f"  max_image_pixels: 200000\n")
    proc, url = start_worker(tmp, f"vl2={model_dir / 'tiny-qwen2-vl'},vl25={model_dir / 'tiny-qwen2.5-vl'},"
                                  f"vl3={model_dir / 'tiny-qwen3-vl'},text={model_dir / 'tiny-llama'}",
                             worker_yaml=yaml)
    yield url, tmp
    proc.stop()


@pytest.fixture(scope="module")
def client(vl_worker):
    return openai.OpenAI(base_url=f"{vl_worker[0]}/v1", api_key="x", max_retries=0)


FAMILIES = [("vl2", "qwen2-vl"), ("vl25", "qwen2.5-vl"), ("vl3", "qwen3-vl")]


def reference(hf_vl, kind, ims, n=12):
    model, tok, pre = hf_vl(kind)
    content = [{"type": "image"}] * len(ims) + [{"type": "text", "text": "What is in the picture?"}]
    prompt = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                     add_generation_prompt=True)
    ref = hf_generate(model, pre, tok, prompt, ims, n)
    mm = pre(ims, [png(i) for i in ims])
    expanded = pre.expand(tok.encode(prompt, add_special_tokens=False), mm)
    return tok.decode(ref, skip_special_tokens=True), len(expanded)


@pytest.mark.parametrize("name,kind", FAMILIES)
def test_chat_with_images_matches_transformers(client, vl_worker, hf_vl, name, kind):
    kw = dict(model=name, temperature=0, max_tokens=12, extra_body={"ignore_eos": True})
    for seeds in ([41], [42, 43]):  # one image; two images in one message
        ims = [image(s) for s in seeds]
        r = client.chat.completions.create(messages=msg(*map(data_url, ims)), **kw)
        text, n_prompt = reference(hf_vl, kind, ims)
        assert r.choices[0].message.content == text
        assert r.usage.prompt_tokens == n_prompt  # counts the expanded image tokens
        assert r.usage.completion_tokens == 12
    # Two concurrent requests, same prompt, different images: each matches, and they differ.
    async def both():
        c = openai.AsyncOpenAI(base_url=f"{vl_worker[0]}/v1", api_key="x", max_retries=0)
        rs = await asyncio.gather(*(c.chat.completions.create(messages=msg(data_url(image(s))), **kw)
                                    for s in (50, 51)))
        await c.close()
        return [r.choices[0].message.content for r in rs]

    got = asyncio.run(both())
    want = [reference(hf_vl, kind, [image(s)])[0] for s in (50, 51)]
    assert got == want and got[0] != got[1]


def test_streaming_with_image_and_text_model_alongside(client):
    kw = dict(model="vl2", messages=msg(data_url(image(44))), temperature=0, max_tokens=10,
              extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                       if c.choices)
    assert streamed == full
    t = client.chat.completions.create(model="text", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert t.usage.completion_tokens >= 1


def test_file_and_allowlisted_http_images(client, media_dir, image_server):
    kw = dict(model="vl2", temperature=0, max_tokens=6, extra_body={"ignore_eos": True})
    via_file = client.chat.completions.create(messages=msg(f"file://{media_dir / 'cat.png'}"), **kw)
    via_http = client.chat.completions.create(messages=msg(f"{image_server}/cat.png"), **kw)
    via_data = client.chat.completions.create(messages=msg(data_url(image(40))), **kw)
    assert via_file.choices[0].message.content == via_http.choices[0].message.content \
        == via_data.choices[0].message.content


def post(worker, messages, model="vl2"):
    return httpx.post(f"{worker[0]}/v1/chat/completions", timeout=30,
                      json={"model": model, "messages": messages, "max_tokens": 4})


def test_bad_images_get_400_or_413_and_the_worker_keeps_serving(vl_worker, media_dir, tmp_path):
    outside = tmp_path / "secret.png"
    image(45).save(outside)
    big = Image.new("RGB", (600, 600), "red")  # 360k pixels > the configured 200k
    cases = [
        (msg("data:image/png;base64,@@not-base64@@"), 400),
        (msg("data:image/png;base64," + base64.b64encode(b"definitely not an image").decode()), 400),
        (msg(data_url(big)), 413),
        (msg("http://example.com/cat.png"), 400),  # domain not on the allow-list: never fetched
        (msg(f"file://{outside}"), 400),  # outside the media directories
        (msg(f"file://{media_dir}/../{outside.parent.name}/secret.png"), 400),
        (msg("ftp://localhost/cat.png"), 400),
    ]
    for messages, status in cases:
        r = post(vl_worker, messages)
        assert r.status_code == status, (messages[0]["content"][0], r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == "messages"
    r = post(vl_worker, msg(data_url(image(46))), model="text")
    assert r.status_code == 400 and "does not accept images" in r.json()["error"]["message"]
    ok = post(vl_worker, msg(data_url(image(47))))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    metrics = httpx.get(f"{vl_worker[0]}/metrics").text
    assert 'vllm:kv_cache_usage_perc{model_name="vl2"} 0.0' in metrics


def test_images_through_the_router(model_dir, tmp_path, client):
    mgr, murl = start_manager(tmp_path, "--heartbeat-ttl", "5")
    try:
        w, wurl = start_worker(tmp_path, f"vl2={model_dir / 'tiny-qwen2-vl'}", "--manager-url", murl,
                               "--heartbeat-interval", "0.5")
        try:
            wait_until(lambda: httpx.get(f"{murl}/v1/models").json()["data"], what="registration")
            routed = openai.OpenAI(base_url=f"{murl}/v1", api_key="x", max_retries=0)
            kw = dict(model="vl2", messages=msg(data_url(image(48))), temperature=0, max_tokens=8,
                      extra_body={"ignore_eos": True})
            assert routed.chat.completions.create(**kw).choices[0].message.content == \
                client.chat.completions.create(**kw).choices[0].message.content
        finally:
            w.stop()
    finally:
        mgr.stop()
