"""Logprobs in OpenAI's two formats (chat ``content`` entries, completions parallel lists) and
vLLM's ``prompt_logprobs`` entries.

A token's string is its own decoding, or ``token_id:N`` under vLLM's ``return_tokens_as_token_ids``
(for tokens that are not valid text on their own, e.g. half of a multi-byte character)."""

from __future__ import annotations

from .vllm_manager import ServedModel


class TokenNames:
    """How tokens are written in logprobs: decoded, or as ``token_id:N``; memoised per response."""

    def __init__(self, served: ServedModel, as_ids: bool = False):
        self.served, self.as_ids = served, as_ids
        self._cache: dict[int, str] = {}

    def __call__(self, tid: int) -> str:
        s = self._cache.get(tid)
        if s is None:
            s = f"token_id:{tid}" if self.as_ids else self.served.tokenizer.decode([tid])
            self._cache[tid] = s
        return s


def _top(d: dict[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(d.items(), key=lambda kv: -kv[1])[:n]


def chat_logprobs(names: TokenNames, token_ids: list[int], lps, top_n: int) -> dict | None:
    if lps is None:
        return None
    content = []
    for tid, d in zip(token_ids, lps):
        s = names(tid)
        content.append({"token": s, "logprob": d[tid], "bytes": list(s.encode()),
                        "top_logprobs": [{"token": names(t), "logprob": v, "bytes": list(names(t).encode())}
                                         for t, v in _top(d, top_n)]})
    return {"content": content}


def completion_logprobs(names: TokenNames, token_ids: list[int], lps, top_n: int,
                        offset: int = 0) -> dict | None:
    """Parallel lists for ``token_ids``; an entry of ``lps`` that is None (the first prompt token:
    nothing precedes it) gives a null logprob and null top logprobs, as OpenAI's echo does."""
    if lps is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = offset
    for tid, d in zip(token_ids, lps):
        s = names(tid)
        tokens.append(s)
        token_lps.append(None if d is None else d[tid])
        tops.append(None if d is None else {names(t): v for t, v in _top(d, top_n)})
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def join(a: dict | None, b: dict | None) -> dict | None:
    """Two completions logprobs blocks as one (the echoed prompt's, then the output's)."""
    if a is None or b is None:
        return a or b
    return {k: a[k] + b[k] for k in a}


def prompt_logprobs(names: TokenNames, prompt_ids: list[int], lps, ranks, top_n: int) -> list | None:
    """vLLM's ``prompt_logprobs``: per prompt token None (the first) or ``{token_id: {logprob, rank,
    decoded_token}}`` holding the prompt token and the top ``top_n`` there; ranks start at 1."""
    if lps is None:
        return None
    out: list = []
    for i, (tid, d) in enumerate(zip(prompt_ids, lps)):
        if d is None:
            out.append(None)
            continue
        entry = {str(tid): {"logprob": d[tid], "rank": ranks[i] if ranks else None, "decoded_token": names(tid)}}
        for r, (t, v) in enumerate(_top(d, top_n), 1):
            entry.setdefault(str(t), {"logprob": v, "rank": r, "decoded_token": names(t)})
        out.append(entry)
    return out
