"""The Triton attention kernels (engine/triton_attention.py), proven without a GPU.

Triton decides when a kernel is defined (at import) whether it compiles it or runs it in its CPU
interpreter, from ``TRITON_INTERPRET``; other test modules of this pytest process may have imported
the kernels already. So the cases (tests/triton_cases.py: each kernel against its torch reference,
and the engine through the kernels against ``transformers``' greedy tokens) run in a fresh process
with ``TRITON_INTERPRET=1``, and on a CUDA machine once more without it, compiled, on the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
CASES = Path(__file__).with_name("triton_cases.py")


def run_cases(interpret: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-m", "pytest", str(CASES), "-q", "-x", "-p", "no:cacheprovider"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (r.stdout + r.stderr)[-8000:]
    assert r.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail and "skipped" not in tail, tail
    return tail


def test_kernels_and_engine_through_triton():
    """Every case under the interpreter (any machine); on CUDA also compiled on the GPU."""
    run_cases(interpret=True)
    if torch.cuda.is_available():
        run_cases(interpret=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only machine's answer")
def test_triton_backend_on_cpu_needs_the_interpreter(make_llm):
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        make_llm("llama", attention_backend="triton", device="cpu")


def test_prefill_span_window_mask_is_built_on_the_given_device():
    """The torch path's sliding-window masks follow the query's device (CUDA once failed here)."""
    from engine.attention import PrefillSpan

    span = PrefillSpan(start=3, end=7, ctx_start=5)
    mask = span.window_mask(3, "meta")  # a device other than the CPU, available everywhere
    assert mask.device.type == "meta" and mask.shape == (4, 9)
    want = [[k <= q and k > q - 3 for k in range(9)] for q in range(5, 9)]
    assert span.window_mask(3).tolist() == want
