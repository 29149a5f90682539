"""Batched sampling on tensors: grammar masks, logit controls, penalties, temperature,
top-k/top-p/min-p, seeds, logprobs."""

from __future__ import annotations

import torch

from .logit_controls import apply_logit_controls
from .reasoning import ReasoningGate, ThinkState
from .sequence import Sequence
from .structured_output import apply_grammar_masks


class Sampler:
    """Turns one float32 logits row per sequence into a token (and optional logprobs).

    Sampling uses the exponential-race trick (argmax of p / q with q ~ Exp(1)), with q drawn from
    the sequence's own generator when it has a seed: so a seeded sequence gets the same tokens
    whether it runs alone or batched with others.
    """

    def __init__(self, device: torch.device, seed: int = 0, reasoning: ReasoningGate | None = None):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.reasoning = reasoning

    def make_generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        return g

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]
                 ) -> tuple[list[int], list[dict[int, float] | None]]:
        n, vocab = logits.shape
        params = [s.params for s in seqs]
        dev = logits.device

        # Logprobs are those of the raw model distribution (as vLLM reports them).
        want_lp = [p.logprobs for p in params]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(k is not None for k in want_lp) else None

        if any(s.grammar is not None for s in seqs):
            # Before every other transform, in place: the step's logits are not read after sampling.
            self._apply_grammars(logits, seqs)
        if any(s.request.logit_controls is not None for s in seqs):
            apply_logit_controls(logits, seqs)
        if any(p.has_penalties for p in params):
            logits = self._apply_penalties(logits.clone(), seqs)

        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        sample_rows = [i for i, p in enumerate(params) if not p.greedy]
        tokens = torch.empty(n, dtype=torch.long, device=dev)
        if len(greedy_rows) == n:  # all greedy: no gathered copy of the logits
            torch.argmax(logits, dim=-1, out=tokens)
        elif greedy_rows:
            idx = torch.tensor(greedy_rows, device=dev)
            tokens[idx] = logits[idx].argmax(dim=-1)
        if sample_rows:
            idx = torch.tensor(sample_rows, device=dev)
            tokens[idx] = self._sample(logits[idx], [seqs[i] for i in sample_rows])

        token_list = tokens.tolist()
        lp_out: list[dict[int, float] | None] = [None] * n
        if raw_logprobs is not None:
            kmax = max(k for k in want_lp if k is not None)
            top_v, top_i = (raw_logprobs.topk(kmax, dim=-1) if kmax > 0 else (None, None))
            chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
            tv = top_v.tolist() if top_v is not None else None
            ti = top_i.tolist() if top_i is not None else None
            for i, k in enumerate(want_lp):
                if k is None:
                    continue
                d = {token_list[i]: chosen[i]}
                for j in range(k):
                    d.setdefault(ti[i][j], tv[i][j])
                lp_out[i] = d
        return token_list, lp_out

    def _apply_grammars(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Grammar masks of the rows whose grammar applies now: none while a sequence is thinking;
        a sequence that may open a thinking block also keeps ``<think>``."""
        matchers = []
        may_open = []
        for i, s in enumerate(seqs):
            if s.think is ThinkState.THINKING:
                matchers.append(None)
                continue
            if s.think is ThinkState.MAY_OPEN:
                may_open.append(i)
            matchers.append(s.grammar)
        if may_open:
            rows = torch.tensor(may_open, device=logits.device)
            start = self.reasoning.start_id
            saved = logits[rows, start].clone()
            apply_grammar_masks(logits, matchers)
            logits[rows, start] = saved
        else:
            apply_grammar_masks(logits, matchers)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        n, vocab = logits.shape
        dev = logits.device
        rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
        for i in rows:
            s, p = seqs[i], seqs[i].params
            out_ids = torch.tensor(s.output_token_ids, dtype=torch.long, device=dev)
            if p.presence_penalty or p.frequency_penalty:
                counts = torch.zeros(vocab, dtype=logits.dtype, device=dev)
                if out_ids.numel():
                    counts.scatter_add_(0, out_ids, torch.ones_like(out_ids, dtype=logits.dtype))
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(s.token_ids)), dtype=torch.long, device=dev)
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                              vals * p.repetition_penalty)
        return logits

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        n, vocab = logits.shape
        dev = logits.device
        params = [s.params for s in seqs]
        temps = torch.tensor([p.temperature for p in params], device=dev).unsqueeze(1)
        logits = logits / temps
        top_ks = [p.top_k for p in params]
        top_ps = [p.top_p for p in params]
        if any(k > 0 for k in top_ks) or any(p < 1.0 for p in top_ps):
            sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
            mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
            if any(k > 0 for k in top_ks):
                k = torch.tensor([k if k > 0 else vocab for k in top_ks], device=dev).unsqueeze(1)
                mask |= torch.arange(vocab, device=dev).unsqueeze(0) >= k
            if any(p < 1.0 for p in top_ps):
                probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
                cum = probs.cumsum(dim=-1)
                tp = torch.tensor(top_ps, device=dev).unsqueeze(1)
                # Drop a token when the mass before it already reaches top_p (always keep the first).
                mask |= (cum - probs) >= tp
            sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(1, sorted_idx, sorted_logits)
        probs = logits.softmax(dim=-1)
        min_ps = [p.min_p for p in params]
        if any(m > 0 for m in min_ps):
            mp = torch.tensor(min_ps, device=dev).unsqueeze(1)
            probs = probs.masked_fill(probs < mp * probs.max(dim=-1, keepdim=True).values, 0.0)
        q = torch.empty_like(probs)
        unseeded = [i for i, s in enumerate(seqs) if s.generator is None]
        if unseeded:
            q[unseeded] = torch.empty(len(unseeded), vocab, device=dev).exponential_(
                generator=self.generator)
        for i, s in enumerate(seqs):
            if s.generator is not None:
                q[i].exponential_(generator=s.generator)
        return (probs / q).argmax(dim=-1)
