"""MiniLM embeddings through the pooling engine match a plain transformers mean-pool reference."""

import torch
from transformers import AutoModel, AutoTokenizer

from engine import LLM

TEXTS = ["A man is eating food.", "A man is riding a horse.", "The new movie is awesome",
         "short", "A much longer sentence that goes on and on about nothing in particular at all."]


def reference(path, texts):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_minilm_matches_mean_pool_reference(minilm_dir):
    llm = LLM(str(minilm_dir), dtype="float32")
    vecs = torch.tensor(llm.embed(TEXTS))
    ref = reference(minilm_dir, TEXTS)
    assert vecs.shape == (len(TEXTS), 384)
    cos = torch.nn.functional.cosine_similarity(vecs, ref, dim=-1)
    assert (1 - cos).max().item() < 1e-5
    assert torch.allclose(vecs.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)  # normalised
    # Real weights: paraphrase-ish pairs are closer than unrelated ones.
    assert (vecs[0] @ vecs[1]) > (vecs[0] @ vecs[2])
    # Single-text call equals the batched one (padding must not leak into the pool).
    alone = torch.tensor(llm.embed(TEXTS[3]))
    assert torch.allclose(alone[0], vecs[3], atol=1e-5)
