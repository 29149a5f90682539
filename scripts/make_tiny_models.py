"""Build tiny random-weight models and a tokenizer trained offline (no downloads).

    python scripts/make_tiny_models.py --out models            # tiny llama, qwen2, qwen3, mistral
    python scripts/make_tiny_models.py --out models --bench    # also the ~150M benchmark Llama
    python scripts/make_tiny_models.py --out models --serve-bench  # the serving-benchmark Llama
    python scripts/make_tiny_models.py --out models --kinds '' --shape qwen2.5-0.5b,qwen2.5-1.5b
    python scripts/make_tiny_models.py --shape qwen2.5-0.5b --dry-run  # print the config, build nothing

Every model directory holds a byte-level BPE tokenizer (trained here on text from Python's own
docstrings plus some multilingual samples), a ChatML chat template and a generation_config whose
eos_token_id is a list.
"""

from __future__ import annotations

import argparse
import json
import pydoc
import sys
from pathlib import Path

# The system turn listing the tools (both templates below): the system message's content first,
# then the signatures inside <tools></tools> and how to call one.
TOOLS_SYSTEM_TURN = (
    "{%- set skip_first = tools and messages and messages[0]['role'] == 'system' -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if skip_first -%}{{- content(messages[0]['content']) + '\\n\\n' -}}{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call functions. Their signatures, inside <tools></tools>:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nTo call one, answer with its name and arguments as a JSON object in '"
    " + '<tool_call></tool_call> tags:'"
    " + '\\n<tool_call>\\n{\"name\": <name>, \"arguments\": <arguments object>}\\n</tool_call><|im_end|>\\n' -}}"
    "{%- endif -%}"
)

# ChatML with tool use in the style of Qwen2.5's template (written here): tools are listed in the
# system turn inside <tools></tools>, an assistant's calls are <tool_call> JSON objects, and
# consecutive tool results go into one user turn as <tool_response> blocks.
CHAT_TEMPLATE = (
    "{%- macro content(c) -%}"
    "{%- if c is string -%}{{- c -}}"
    "{%- elif c is not none -%}{%- for part in c -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] in ('image', 'image_url') -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    + TOOLS_SYSTEM_TURN +
    "{%- for message in messages -%}"
    "{%- if loop.first and skip_first -%}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + content(message['content']) + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content(message['content']) -}}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "{%- if not loop.first or message['content'] -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": ' + (fn['name'] | tojson) + ', \"arguments\": ' -}}"
    "{{- fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson) -}}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# tiny-qwen3's own template, in the style of Qwen3's (written here): CHAT_TEMPLATE's ChatML and tools,
# plus thinking. An assistant turn after the last user message shows its reasoning (its
# reasoning_content, or the <think> part of its content) as "<think>\n...\n</think>\n\n"; earlier
# turns keep only their answer. With add_generation_prompt and enable_thinking false, the assistant
# turn opens with an empty think block, so the model answers without thinking.
QWEN3_CHAT_TEMPLATE = (
    "{%- macro content(c) -%}"
    "{%- if c is string -%}{{- c -}}"
    "{%- elif c is not none -%}{%- for part in c -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    + TOOLS_SYSTEM_TURN +
    "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and skip_first -%}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + content(message['content']) + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set answer = content(message['content']) -%}"
    "{%- set reasoning = message['reasoning_content'] if message['reasoning_content'] is string else '' -%}"
    "{%- if '</think>' in answer -%}"
    "{%- if not reasoning -%}{%- set reasoning = answer.split('</think>')[0].split('<think>')[-1] -%}{%- endif -%}"
    "{%- set answer = answer.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if loop.index0 > ns.last_query and reasoning.strip('\\n') -%}"
    "{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{{- answer -}}"
    "{%- if message['tool_calls'] -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "{%- if not loop.first or answer -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": ' + (fn['name'] | tojson) + ', \"arguments\": ' -}}"
    "{{- fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson) -}}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content(message['content']) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)
TEMPLATES = {"qwen3": QWEN3_CHAT_TEMPLATE}  # the other kinds: CHAT_TEMPLATE
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]
THINK_TOKENS = ["<think>", "</think>"]
MULTILINGUAL = [
    "Grüße aus München, schöne Straße und Käse.", "Café crème, déjà vu, naïve façade.",
    "你好，世界。今天天气很好，我们去公园散步吧。", "こんにちは、世界。東京は大きな都市です。",
    "Привет, мир! Как дела?", "مرحبا بالعالم", "emoji: 🙂 🚀 🎉 👍 ❤️", "Ελληνικά γράμματα αβγδ",
]
TINY_KINDS = ("llama", "qwen2", "qwen3", "mistral")
VL_KINDS = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
# Real architectures with random weights, for GPU benchmarks (``--shape``): the values of the public
# Qwen2.5-0.5B-Instruct and Qwen2.5-1.5B-Instruct config.json files, written here from them. Qwen2
# always has q/k/v biases; sliding windows are off in both (use_sliding_window false: transformers
# then saves sliding_window as null, and max_window_layers is inert). The token ids (eos, pad) are
# our tokenizer's, not Qwen's. Parameters: 494,032,768 and 1,543,714,304 (embeddings tied).
QWEN25_COMMON = dict(vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                     rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=True,
                     use_sliding_window=False, sliding_window=32768, max_window_layers=21,
                     attention_dropout=0.0, initializer_range=0.02)
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, **QWEN25_COMMON),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, **QWEN25_COMMON),
}


def corpus() -> list[str]:
    """Deterministic training text: docstrings of stdlib modules, plus multilingual lines."""
    import collections
    import dataclasses
    import functools
    import itertools
    import json as js
    import os
    import re
    import string
    import textwrap
    texts = []
    for mod in (collections, dataclasses, functools, itertools, js, os, re, string, textwrap):
        texts.append(pydoc.render_doc(mod, renderer=pydoc.plaintext))
    return texts + MULTILINGUAL * 50


def train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token=None,
                                   additional_special_tokens=SPECIAL)
    # Reasoning markers as Qwen3 and DeepSeek-R1 have them: added tokens that are not special, so
    # they stay in decoded text (with skip_special_tokens) for the reasoning parsers to split on.
    fast.add_tokens(THINK_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_config(kind: str, vocab: int, eos: list[int], big: bool | str = False):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if big == "route":  # the routing benchmark's: prefill long enough to matter, ~10M parameters
        common = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=4096)
    elif big:  # the benchmark model: ~150M parameters
        common = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048)
    else:
        common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    common.update(vocab_size=vocab, eos_token_id=eos[0], pad_token_id=eos[-1], bos_token_id=None,
                  tie_word_embeddings=False, initializer_range=0.2 if not big else 0.02)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen2":
        return Qwen2Config(**common)
    if kind == "qwen3":
        return Qwen3Config(head_dim=16 if not big else 64, **common)
    if kind == "mistral":
        return MistralConfig(sliding_window=24, **common)
    raise ValueError(kind)


def build(out: Path, kind: str, tokenizer, big: bool | str = False, dtype: str = "float32") -> Path:
    """``big``: False (tiny), True (the 150M engine-bench model, vocab 32000), "serve" (the
    same shape with the tokenizer's own vocabulary, so every sampled token decodes to text) or
    "route" (the routing benchmark's ~10M model, tokenizer vocabulary, float32)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    names = {True: "bench-llama-150m", "serve": "bench-llama-serve", "route": "bench-llama-route"}
    name = names.get(big, f"tiny-{kind}")
    path = out / name
    if (path / "config.json").exists():
        return path
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    vocab = 32000 if big is True else len(tokenizer)
    cfg = make_config(kind, vocab, eos, big)
    torch.manual_seed(1234 + TINY_KINDS.index(kind) + (100 if big else 0))
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos[-1], do_sample=False)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.chat_template = TEMPLATES.get(kind, CHAT_TEMPLATE)  # the tokenizer is shared: set back below
    tokenizer.save_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    return path


def shape_config(shape: str, eos: list[int]):
    """The ``Qwen2Config`` of a real architecture in ``SHAPES`` (its full vocabulary of 151,936),
    with ``eos`` (our tokenizer's ids) as end-of-sequence and padding."""
    from transformers import Qwen2Config

    values = dict(SHAPES[shape])
    theta = values.pop("rope_theta")
    return Qwen2Config(rope_parameters={"rope_type": "default", "rope_theta": theta}, eos_token_id=eos[0],
                       pad_token_id=eos[-1], bos_token_id=None, **values)


def build_shape(out: Path, shape: str, tokenizer) -> Path:
    """Save a random-weight bfloat16 model of ``shape`` to ``out/<shape>-random``.

    The embedding keeps the real 151,936 rows, so weight shapes and bytes are those of the real
    model; the tokenizer is our small one, whose ids are the first ``len(tokenizer)`` of them. A
    sampled id beyond it decodes to nothing, so benchmarks should run on token ids (ignore_eos)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = out / f"{shape}-random"
    if (path / "config.json").exists():
        return path
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    torch.manual_seed(2468 + list(SHAPES).index(shape))
    model = AutoModelForCausalLM.from_config(shape_config(shape, eos), dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos[-1], do_sample=False)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)  # carries CHAT_TEMPLATE, Qwen2.5's style
    return path


def make_vl_config(kind: str, tokenizer, eos: list[int]):
    """Tiny random Qwen-VL family configs (vision tower and language model both tiny)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    tid = tokenizer.convert_tokens_to_ids
    ids = dict(image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
               vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"))
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048,
                eos_token_id=eos[0], pad_token_id=eos[-1], bos_token_id=None, initializer_range=0.2)
    if kind == "qwen2-vl":
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_chans=3, initializer_range=0.2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    if kind == "qwen2.5-vl":
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1], in_channels=3, initializer_range=0.2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    if kind == "qwen3-vl":
        text.update(head_dim=16, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3],
                                               "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0], in_channels=3, initializer_range=0.2)
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    raise ValueError(kind)


def build_vl(out: Path, kind: str, tokenizer) -> Path:
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    path = out / f"tiny-{kind}"
    if (path / "config.json").exists():
        return path
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    cfg = make_vl_config(kind, tokenizer, eos)
    torch.manual_seed(4321 + VL_KINDS.index(kind))
    model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos[-1], do_sample=False)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor(kind).save_pretrained(path)
    return path


def image_processor(kind: str):
    """The family's PIL image processor (no torchvision here), sized for tiny test images."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as P

    patch = 16 if kind == "qwen3-vl" else 14  # Qwen3-VL's vision tower uses 16-pixel patches
    side = patch * 2
    return P(patch_size=patch, merge_size=2, temporal_patch_size=2, min_pixels=side * side,
             max_pixels=(side * 4) ** 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models", type=Path)
    ap.add_argument("--kinds", default=",".join(TINY_KINDS + VL_KINDS))
    ap.add_argument("--bench", action="store_true", help="also build the ~150M bfloat16 Llama")
    ap.add_argument("--serve-bench", action="store_true",
                    help="also the serving-benchmark Llama (same shape, tokenizer-sized vocab)")
    ap.add_argument("--route-bench", action="store_true",
                    help="also the routing-benchmark Llama (~10M, float32; scripts/bench_routing.py)")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--shape", action="append", default=[], metavar="NAME[,NAME]",
                    help=f"also a random bfloat16 model of a real architecture ({', '.join(SHAPES)}), "
                         "saved as OUT/NAME-random; repeatable or a comma list")
    ap.add_argument("--dry-run", action="store_true", help="print the --shape configs as JSON, build nothing")
    args = ap.parse_args(argv)
    shapes = [s for item in args.shape for s in item.split(",") if s]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        ap.error(f"unknown --shape {unknown}; known: {list(SHAPES)}")
    tok = train_tokenizer(args.vocab_size)
    if args.dry_run:
        eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
        for shape in shapes:
            print(json.dumps({"shape": shape, "config": shape_config(shape, eos).to_diff_dict()}, sort_keys=True))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in filter(None, args.kinds.split(",")):
        print(build_vl(args.out, kind, tok) if kind in VL_KINDS else build(args.out, kind, tok))
    if args.bench:
        print(build(args.out, "llama", tok, big=True, dtype="bfloat16"))
    if args.serve_bench:
        print(build(args.out, "llama", tok, big="serve", dtype="bfloat16"))
    if args.route_bench:
        print(build(args.out, "llama", tok, big="route"))
    for shape in shapes:
        print(build_shape(args.out, shape, tok))
    return 0


if __name__ == "__main__":
    sys.exit(main())
