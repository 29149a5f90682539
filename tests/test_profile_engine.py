"""scripts/profile_engine.py sorts py-spy samples by the innermost frame of ours or torch's."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import profile_engine as pe  # noqa: E402

STEP = ["main (profile_engine.py:1)", "LLM.generate (engine/llm.py:79)", "LLMEngine.step (engine/llm_engine.py:242)"]
FORWARD = [*STEP, "ModelRunner.execute (engine/model_runner.py:329)",
           "LlamaForCausalLM.forward (transformers/models/llama/modeling_llama.py:456)",
           "FusedDecoderLayer.forward (engine/fused_layers.py:140)"]


def test_innermost_known_frame_decides():
    assert pe.classify([*FORWARD, "FusedProjection.__call__ (engine/fused_layers.py:64)",
                        "SmallGemmKernel.__call__ (engine/cpu_kernels.py:140)"]) == pe.RULES[0][0]
    assert pe.classify([*FORWARD, "paged_attention (engine/attention.py:130)",
                        "PagedDecodeKernel.__call__ (engine/cpu_kernels.py:95)"]) == pe.DECODE_KERNEL
    assert pe.classify([*FORWARD, "paged_attention (engine/attention.py:126)"]) == pe.ATTENTION_REST
    assert pe.classify([*FORWARD, "FusedOps.rms_norm (engine/cpu_kernels.py:175)"]).startswith("fused")
    # Python of the forward itself, and the engine's own work around the step
    assert pe.classify(FORWARD) == pe.REST
    assert pe.classify([*STEP, "Sampler.__call__ (engine/sampler.py:40)"]) == "sampling"
    assert pe.classify([*STEP, "Scheduler.schedule (engine/scheduler.py:110)"]).startswith("scheduler")
    assert pe.classify(STEP).startswith("scheduler")


def test_raw_output_is_counted_inside_generate_only(tmp_path):
    raw = tmp_path / "raw.txt"
    raw.write_text(";".join(FORWARD) + " 7\n"
                   + ";".join([*STEP, "Sampler.__call__ (engine/sampler.py:40)"]) + " 3\n"
                   + "<module> (x.py:1);other (x.py:2) 5\n")
    assert pe.read_raw(raw) == {pe.REST: 7, "sampling": 3}
