"""Logprobs in OpenAI's two formats: chat (``content`` entries) and completions (parallel lists)."""

from __future__ import annotations

from .vllm_manager import ServedModel


def _tok_str(served: ServedModel, tid: int) -> str:
    return served.tokenizer.decode([tid])


def chat_logprobs(served: ServedModel, token_ids: list[int], lps, top_n: int) -> dict | None:
    if lps is None:
        return None
    content = []
    for tid, d in zip(token_ids, lps):
        s = _tok_str(served, tid)
        top = sorted(d.items(), key=lambda kv: -kv[1])[:top_n]
        content.append({"token": s, "logprob": d[tid], "bytes": list(s.encode()),
                        "top_logprobs": [{"token": _tok_str(served, t), "logprob": v,
                                          "bytes": list(_tok_str(served, t).encode())} for t, v in top]})
    return {"content": content}


def completion_logprobs(served: ServedModel, token_ids: list[int], lps, top_n: int,
                        offset: int = 0) -> dict | None:
    if lps is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = offset
    for tid, d in zip(token_ids, lps):
        s = _tok_str(served, tid)
        tokens.append(s)
        token_lps.append(d[tid])
        top = sorted(d.items(), key=lambda kv: -kv[1])[:top_n]
        tops.append({_tok_str(served, t): v for t, v in top})
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
