"""Per-request logit controls (``logit_bias``, ``min_tokens``, ``bad_words``,
``allowed_token_ids``), prepared once when a request is added and applied to a step's logits in a
few batched tensor ops.

They change only the logits a token is sampled from; the logprobs reported to the client are taken
before them (the raw model distribution, as vLLM reports it). Order, as in vLLM: allowed ids, then
the bans (bad words, stop ids before ``min_tokens``), then the bias, so a bias never revives a banned
token (-inf + 100 stays -inf).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling_params import InvalidParameter, SamplingParams
from .sequence import Sequence


@dataclass
class LogitControls:
    """What one request's controls need at every step, in ready-made form."""

    bias_ids: torch.Tensor | None = None  # long [k]
    bias_values: torch.Tensor | None = None  # float32 [k]
    allowed_ids: torch.Tensor | None = None  # long [m]
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences; the last token is the banned one
    min_tokens: int = 0
    min_tokens_banned: tuple[int, ...] = ()  # EOS ids (unless ignore_eos) and stop_token_ids


def bad_words_token_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """vLLM's reading of ``bad_words``: each word (leading whitespace stripped) is tokenized as is,
    and again after a space, so it is caught both at the start of the text and after a space.
    The spaced form is kept only when it starts with a different token and has as many tokens."""
    out: list[list[int]] = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if plain:
            out.append(plain)
        if spaced and (not plain or (spaced[0] != plain[0] and len(spaced) == len(plain))):
            out.append(spaced)
    return out


def check_vocab(params: SamplingParams, vocab_size: int, tokenizer) -> None:
    """Raise :class:`InvalidParameter` for token ids of ``logit_bias`` / ``allowed_token_ids`` (or
    of the tokenized ``bad_words``) outside ``[0, vocab_size)``."""
    checks = [("logit_bias", params.logit_bias or ()), ("allowed_token_ids", params.allowed_token_ids or ())]
    if params.bad_words:
        checks.append(("bad_words", [t for w in bad_words_token_ids(tokenizer, params.bad_words) for t in w]))
    for name, ids in checks:
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidParameter(name, f"{name}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")


def build_controls(params: SamplingParams, tokenizer, vocab_size: int, eos_token_ids: frozenset[int],
                   device: torch.device) -> LogitControls | None:
    """The request's :class:`LogitControls`, or None when it uses none of them (the common case:
    the sampler then skips this stage entirely). Ids are checked by :func:`check_vocab` first."""
    if not params.has_logit_controls:
        return None
    c = LogitControls(min_tokens=params.min_tokens)
    if params.logit_bias:
        ids = sorted(params.logit_bias)
        c.bias_ids = torch.tensor(ids, dtype=torch.long, device=device)
        c.bias_values = torch.tensor([params.logit_bias[t] for t in ids], dtype=torch.float32, device=device)
    if params.allowed_token_ids is not None:
        c.allowed_ids = torch.tensor(sorted(set(params.allowed_token_ids)), dtype=torch.long, device=device)
    if params.bad_words:
        c.bad_words = tuple(tuple(w) for w in bad_words_token_ids(tokenizer, params.bad_words))
    if params.min_tokens:
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        c.min_tokens_banned = tuple(sorted(t for t in stop if 0 <= t < vocab_size))
    return c


def banned_by_bad_words(seq: Sequence, words: tuple[tuple[int, ...], ...]) -> list[int]:
    """Last tokens of the bad words whose other tokens are the tail of ``seq``'s output."""
    n_out = seq.num_output_tokens
    ids = seq.token_ids
    out = []
    for w in words:
        k = len(w) - 1
        if k == 0 or (k <= n_out and tuple(ids[len(ids) - k:]) == w[:-1]):
            out.append(w[-1])
    return out


def apply_logit_controls(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Apply, in place, the controls of every row whose request has them (others untouched)."""
    rows = [(i, s.request.logit_controls) for i, s in enumerate(seqs)
            if s.request is not None and s.request.logit_controls is not None]
    if not rows:
        return
    dev = logits.device
    neg_inf = float("-inf")

    allowed = [(i, c.allowed_ids) for i, c in rows if c.allowed_ids is not None]
    if allowed:
        idx = torch.tensor([i for i, _ in allowed], device=dev)
        keep = torch.zeros(len(allowed), logits.shape[1], dtype=torch.bool, device=dev)
        r = torch.cat([torch.full_like(ids, j) for j, (_, ids) in enumerate(allowed)])
        keep[r, torch.cat([ids for _, ids in allowed])] = True
        logits[idx] = logits[idx].masked_fill(~keep, neg_inf)

    ban_r: list[int] = []
    ban_c: list[int] = []
    min_r: list[int] = []
    min_c: list[int] = []
    for i, c in rows:
        seq = seqs[i]
        if c.bad_words:
            cols = banned_by_bad_words(seq, c.bad_words)
            ban_r += [i] * len(cols)
            ban_c += cols
        if c.min_tokens_banned and seq.num_output_tokens < c.min_tokens:
            min_r += [i] * len(c.min_tokens_banned)
            min_c += c.min_tokens_banned
    if ban_r:
        logits[torch.tensor(ban_r, device=dev), torch.tensor(ban_c, device=dev)] = neg_inf
    if min_r:
        mr, mc = torch.tensor(min_r, device=dev), torch.tensor(min_c, device=dev)
        saved = logits[mr, mc].clone()
        logits[mr, mc] = neg_inf
        # Where the stop ids were all that was left (a grammar that may only end now, or
        # allowed_token_ids of stop ids), they stay: a grammar that terminates still ends it.
        uniq = sorted(set(min_r))
        at = {r: j for j, r in enumerate(uniq)}
        dead = torch.isneginf(logits[torch.tensor(uniq, device=dev)].amax(dim=-1))
        dead = dead[torch.tensor([at[r] for r in min_r], device=dev)]
        logits[mr, mc] = torch.where(dead, saved, logits[mr, mc])

    biased = [(i, c) for i, c in rows if c.bias_ids is not None]
    if biased:
        r = torch.cat([torch.full_like(c.bias_ids, i) for i, c in biased])
        logits.index_put_((r, torch.cat([c.bias_ids for _, c in biased])),
                          torch.cat([c.bias_values for _, c in biased]).to(logits.dtype), accumulate=True)
