"""/v1/embeddings."""

from __future__ import annotations

import base64
import struct

from clusterkit.errors import APIError

from . import field_policy
from .protocol import EmbeddingRequest
from .vllm_manager import ServedModel


async def create(served: ServedModel, req: EmbeddingRequest) -> dict:
    """The ``list`` of embeddings of every input (strings or token ids)."""
    field_policy.check(req.model_extra, field_policy.EMBEDDINGS)
    inp = req.input
    if isinstance(inp, str):
        inp = [inp]
    if inp and all(isinstance(x, int) for x in inp):
        inp = [inp]
    if not inp:
        raise APIError(400, "input must not be empty", "input")
    batch = [served.tokenizer.encode(x, add_special_tokens=req.add_special_tokens) if isinstance(x, str) else list(x)
             for x in inp]
    vocab = served.vocab_size
    for ids in batch:
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"input token ids must be in [0, {vocab})", "input")
    vecs = await served.embed(batch)
    if req.dimensions is not None:
        if not 0 < req.dimensions <= len(vecs[0]):
            raise APIError(400, f"dimensions must be in [1, {len(vecs[0])}]", "dimensions")
        vecs = [v[:req.dimensions] for v in vecs]
        if served.normalizes:  # a truncated unit vector is renormalised
            vecs = [[x / (sum(y * y for y in v) ** 0.5 or 1.0) for x in v] for v in vecs]
    data = []
    for i, v in enumerate(vecs):
        emb = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() \
            if req.encoding_format == "base64" else v
        data.append({"object": "embedding", "index": i, "embedding": emb})
    n = sum(len(b) for b in batch)
    return {"object": "list", "data": data, "model": req.model,
            "usage": {"prompt_tokens": n, "total_tokens": n}}
