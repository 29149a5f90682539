"""scripts/bench_gpu.py runs end to end (on CPU here, with small lengths) and prints its table:
both systems, every workload, the ratios and the bandwidth-floor row."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.timeout(120)
def test_bench_gpu_smoke_on_cpu(model_dir, tmp_path):
    out_json = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--device", "cpu",
         "--model", str(model_dir / "tiny-llama"), "--batches", "1,2", "--quick", "--json", str(out_json)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "## CPU" in out  # the device's name heads the report
    header = next(line for line in out.splitlines() if line.startswith("| workload |"))
    assert "ours tok/s" in header and "transformers CB tok/s" in header and "ours / transformers" in header
    for cell in ("decode b=1", "decode b=2", "prefill 4x32"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {cell} |"))
        figures = [c.strip() for c in row.strip("|").split("|")][1:]
        assert len(figures) == 3, row
        assert all(float(f) > 0 for f in figures[:2]), row  # both systems measured the cell
        assert re.fullmatch(r"\*\*\d+\.\d\dx\*\*", figures[2]), row
    assert re.search(r"\| ours, per step \| \d+\.\d+ \|", out)
    assert re.search(r"\| bandwidth floor: .* GB/s copy bandwidth \| \d+\.\d+ \|", out)
    assert re.search(r"\| \*\*ours / floor\*\* \| \*\*\d+\.\d+x\*\* \|", out)

    report = json.loads(out_json.read_text())
    floor = report["floor"]
    assert floor["bandwidth"] > 0 and floor["step_s"] > 0
    # tiny-llama (untied, float32): every weight but the input embedding table (one row read)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir / "tiny-llama")
    h, v, i, n = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    assert floor["weight_bytes"] == 4 * (n * per_layer + h + v * h + h)
    # KV of the mean context: prompt 8 + output 8 / 2 = 12 tokens, K and V of every layer
    assert floor["kv_bytes"] == 12 * n * 2 * kv * 4
    assert [r["cell"] for r in report["rows"]] == ["decode b=1", "decode b=2", "prefill 4x32"]
