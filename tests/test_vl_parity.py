"""Vision-language models through our engine vs transformers generate (greedy, float32)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from engine import SamplingParams

KINDS = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]


def image(seed: int, w: int = 90, h: int = 60) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def chat_prompt(tok, n_images: int, text: str) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                   add_generation_prompt=True)


def hf_generate(model, pre, tok, prompt: str, images: list, n: int) -> list[int]:
    mm = pre(images, [png(i) for i in images])
    ids = pre.expand(tok.encode(prompt, add_special_tokens=False), mm)
    t = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(input_ids=t, attention_mask=torch.ones_like(t),
                             mm_token_type_ids=(t == model.config.image_token_id).int(),
                             pixel_values=mm.pixel_values, image_grid_thw=mm.image_grid_thw,
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, len(ids):].tolist()


GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.mark.parametrize("kind", KINDS)
def test_one_and_two_images_match_transformers(kind, make_llm, hf_vl):
    model, tok, pre = hf_vl(kind)
    llm = make_llm(kind)
    one = chat_prompt(tok, 1, "Describe the image.")
    two = chat_prompt(tok, 2, "Compare the images.")
    outs = llm.generate([{"prompt": one, "multi_modal_data": {"image": [image(1)]}},
                         {"prompt": two, "multi_modal_data": {"image": [image(2), image(3, 70, 50)]}}], GREEDY)
    assert outs[0].outputs[0].token_ids == hf_generate(model, pre, tok, one, [image(1)], 16)
    assert outs[1].outputs[0].token_ids == hf_generate(model, pre, tok, two, [image(2), image(3, 70, 50)], 16)
    # The usage count includes the expanded image tokens.
    assert len(outs[0].prompt_token_ids) > len(tok.encode(one, add_special_tokens=False))


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_different_images_and_prefix_cache_keys(kind, make_llm, hf_vl):
    model, tok, pre = hf_vl(kind)
    llm = make_llm(kind, block_size=4)
    prompt = chat_prompt(tok, 1, "What is shown here?")
    a, b = image(10), image(11)
    outs = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": [a]}},
                         {"prompt": prompt, "multi_modal_data": {"image": [b]}}], GREEDY)
    ta, tb = outs[0].outputs[0].token_ids, outs[1].outputs[0].token_ids
    assert ta == hf_generate(model, pre, tok, prompt, [a], 16)
    assert tb == hf_generate(model, pre, tok, prompt, [b], 16)
    assert ta != tb
    # Sequentially, with prefix caching on: a different image must not reuse the first one's blocks...
    again_b = llm.generate({"prompt": prompt, "multi_modal_data": {"image": [b]}}, GREEDY)[0]
    assert again_b.outputs[0].token_ids == tb
    c = image(12)
    other = llm.generate({"prompt": prompt, "multi_modal_data": {"image": [c]}}, GREEDY)[0]
    assert other.num_cached_tokens == 0
    assert other.outputs[0].token_ids == hf_generate(model, pre, tok, prompt, [c], 16)
    # ...while the same image does hit the cache.
    assert again_b.num_cached_tokens > 0


def test_chunked_prefill_through_image_tokens(make_llm, hf_vl):
    model, tok, pre = hf_vl("qwen2.5-vl")
    llm = make_llm("qwen2.5-vl", max_num_batched_tokens=8)
    prompt = chat_prompt(tok, 2, "Chunk me.")
    imgs = [image(20, 100, 70), image(21)]
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": imgs}}, GREEDY)[0]
    assert len(out.prompt_token_ids) > 16  # several chunks, image rows split across them
    assert out.outputs[0].token_ids == hf_generate(model, pre, tok, prompt, imgs, 16)


def test_text_only_request_on_vl_model(make_llm, hf_vl):
    model, tok, pre = hf_vl("qwen2-vl")
    llm = make_llm("qwen2-vl")
    ids = tok.encode("plain text prompt", add_special_tokens=False)
    out = llm.generate({"prompt_token_ids": ids}, GREEDY)[0]
    t = torch.tensor([ids])
    with torch.inference_mode():
        ref = model.generate(input_ids=t, attention_mask=torch.ones_like(t), max_new_tokens=16,
                             min_new_tokens=16, do_sample=False, eos_token_id=None)[0, len(ids):].tolist()
    assert out.outputs[0].token_ids == ref
