"""``make_tiny_models.py --shape``: random-weight models with the real Qwen2.5 architectures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, _load_script

# The public Qwen2.5-0.5B / 1.5B (Instruct) config values.
REAL = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, params=494_032_768),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, params=1_543_714_304),
}


@pytest.fixture(scope="module")
def mk():
    return _load_script("make_tiny_models")


@pytest.mark.parametrize("shape", sorted(REAL))
def test_shape_config_has_the_real_values(mk, shape):
    cfg = mk.shape_config(shape, eos=[2, 0])
    want = dict(REAL[shape])
    params = want.pop("params")
    for key, value in want.items():
        assert getattr(cfg, key) == value, key
    assert cfg.model_type == "qwen2"
    assert cfg.vocab_size == 151936 and cfg.tie_word_embeddings is True
    assert cfg.max_position_embeddings == 32768 and cfg.rope_parameters["rope_theta"] == 1_000_000.0
    assert cfg.rms_norm_eps == 1e-6 and cfg.hidden_act == "silu"
    assert cfg.sliding_window is None and set(cfg.layer_types) == {"full_attention"}
    assert cfg.eos_token_id == 2 and cfg.pad_token_id == 0
    # The parameter count of the real model, from the architecture built on the meta device.
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v biases


def test_dry_run_prints_configs_and_builds_nothing(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_models.py"), "--out", str(tmp_path / "m"),
                           "--shape", "qwen2.5-0.5b,qwen2.5-1.5b", "--dry-run"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [x["shape"] for x in lines] == ["qwen2.5-0.5b", "qwen2.5-1.5b"]
    for x in lines:
        for key, value in REAL[x["shape"]].items():
            if key != "params":
                assert x["config"][key] == value, key
        assert x["config"]["vocab_size"] == 151936 and x["config"]["tie_word_embeddings"] is True
    assert not (tmp_path / "m").exists()


def test_unknown_shape_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_models.py"), "--out", str(tmp_path),
                           "--kinds", "", "--shape", "qwen2.5-7b"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown --shape" in proc.stderr


@pytest.mark.timeout(240)
def test_build_the_0_5b_shape(mk, tmp_path):
    """Building it takes ~15 s and ~1.7 GB here; the saved checkpoint is the real size, bfloat16."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    assert mk.main(["--out", str(tmp_path), "--kinds", "", "--shape", "qwen2.5-0.5b"]) == 0
    path = tmp_path / "qwen2.5-0.5b-random"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen2.5-0.5b-random"]  # --kinds '': nothing else
    cfg = AutoConfig.from_pretrained(path)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (896, 24, 151936)
    numel, dtypes = 0, set()
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for name in st.keys():
                t = st.get_slice(name)
                numel += torch.Size(t.get_shape()).numel()
                dtypes.add(t.get_dtype())
    assert numel == REAL["qwen2.5-0.5b"]["params"]  # tied: the LM head is not stored twice
    assert dtypes == {"BF16"}
    tok = AutoTokenizer.from_pretrained(path)
    # Our small tokenizer: its ids are a prefix of the model's vocabulary; eos is its <|im_end|>.
    assert len(tok) < cfg.vocab_size
    assert cfg.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
