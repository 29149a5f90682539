"""lm-evaluation-harness (``local-completions``) against a real worker on a multiple-choice task
shipped in tests/data/lm_eval: every choice's loglikelihood must equal what transformers gives it.

The harness scores a choice by sending context + continuation token ids with ``echo``,
``logprobs: 1`` and ``max_tokens: 1`` and summing the continuation's prompt logprobs; before
prompt logprobs existed every choice scored 0.0 and the task reported a perfect score."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from procs import ROOT, start_worker

DATA = ROOT / "tests" / "data" / "lm_eval"


def hf_loglikelihood(hf, tok, context: str, continuation: str) -> float:
    """The harness's own split (context ids, then the rest of the whole string's ids), scored by
    transformers in float32."""
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    cont = whole[len(ctx):]
    with torch.inference_mode():
        logp = torch.log_softmax(hf(torch.tensor([ctx + cont])).logits[0].float(), -1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


@pytest.fixture(scope="module")
def worker(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm_eval")
    proc, url = start_worker(tmp, f"llama={model_dir / 'tiny-llama'}")
    yield url, tmp
    assert proc.stop() == 0, proc.log()[-2000:]


def test_lm_eval_multiple_choice_loglikelihoods_equal_transformers(worker, model_dir, hf_reference):
    url, tmp = worker
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text((DATA / "tiny_mc.yaml").read_text()
                                        .replace("DATA_FILE", str(DATA / "tiny_mc.jsonl")))
    out = tmp / "results"
    args = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
            f"model=llama,base_url={url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={model_dir / 'tiny-llama'},num_concurrent=2,max_retries=1,max_length=1024",
            "--tasks", "tiny_mc", "--include_path", str(tasks), "--batch_size", "4",
            "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "unused"}
    run = subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    samples = [json.loads(line) for f in out.rglob("samples_tiny_mc_*.jsonl") for line in f.read_text().splitlines()]
    docs = [json.loads(line) for line in (DATA / "tiny_mc.jsonl").read_text().splitlines()]
    assert len(samples) == len(docs)
    hf, tok = hf_reference("llama")
    scored = 0
    for s in samples:
        doc = docs[s["doc_id"]]
        lls = [float(r[0]) for r in s["filtered_resps"]]
        assert len(lls) == len(doc["choices"])
        for choice, ll in zip(doc["choices"], lls):
            want = hf_loglikelihood(hf, tok, doc["question"], " " + choice)
            assert ll < 0 and abs(ll - want) < 1e-3, (doc["question"], choice, ll, want)
            scored += 1
    assert scored == sum(len(d["choices"]) for d in docs)
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    acc = results["results"]["tiny_mc"]["acc,none"]
    expected = sum(
        max(range(len(d["choices"])), key=lambda i: hf_loglikelihood(hf, tok, d["question"], " " + d["choices"][i]))
        == d["answer"] for d in docs) / len(docs)
    assert abs(acc - expected) < 1e-9
    assert Path(out).exists()
