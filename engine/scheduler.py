"""Continuous-batching scheduler: token budget, decodes first, chunked prefill, preemption."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_cache_manager import KVCacheManager
from .sequence import SeqStatus, Sequence


@dataclass
class ScheduledSeq:
    """``num_new_tokens`` of ``seq`` computed this step, starting at position ``start``.

    ``completes``: afterwards every token has K/V, so the last one's logits get sampled.
    """

    seq: Sequence
    num_new_tokens: int
    start: int = 0
    completes: bool = False

    @classmethod
    def of(cls, seq: Sequence, n: int) -> ScheduledSeq:
        return cls(seq, n, seq.num_computed_tokens, seq.num_computed_tokens + n == seq.num_tokens)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """FCFS scheduler over sequences.

    Each step spends at most ``max_num_batched_tokens``: first one token for every running sequence
    that is decoding, then the rest of partially prefilled running sequences, then new waiting
    sequences (chunked when the budget runs out). When the pool runs dry the newest running sequence
    is preempted by recompute: its blocks are freed and it goes back to the front of the queue.
    """

    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # -- queue management ------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked sequence joins the running set directly (it shares its parent's blocks)."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence wherever it is and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)
        seq.status = SeqStatus.FINISHED

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- scheduling ------------------------------------------------------------------------------
    def _preempt(self, victim: Sequence, out: SchedulerOutput, chosen: dict[int, ScheduledSeq]) -> int:
        """Preempt ``victim``; returns the budget it gives back if it was already scheduled."""
        self.running.remove(victim)
        self.kv.free(victim)
        victim.status = SeqStatus.WAITING
        self.waiting.appendleft(victim)
        out.preempted.append(victim)
        self.num_preemptions += 1
        refund = 0
        if victim.seq_id in chosen:
            refund = chosen.pop(victim.seq_id).num_new_tokens
        return refund

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        chosen: dict[int, ScheduledSeq] = {}  # insertion order is the batch order

        decodes = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        prefills = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        for seq in decodes + prefills:
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.allocate_slots(seq, n, out.blocks_to_copy):
                victim = self.running[-1]
                budget += self._preempt(victim, out, chosen)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                continue
            chosen[seq.seq_id] = ScheduledSeq.of(seq, n)
            budget -= n

        # New sequences only when nobody had to be preempted (they would just thrash).
        if not out.preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                req = seq.request
                pending_forks = (req.params.n - 1) if (req is not None and not req.forked) else 0
                if self.running and len(self.running) + 1 + pending_forks > self.max_num_seqs:
                    break
                # A cache hit would hide positions whose prompt logprobs are still wanted.
                lookup = seq.num_computed_tokens == 0 and not (req is not None and req.needs_prompt_logprobs)
                hits = self.kv.find_cached_prefix(seq) if lookup else []
                n = min(seq.num_tokens - len(hits) * self.kv.block_size, budget)
                if not self.kv.allocate_slots(seq, n, out.blocks_to_copy, cached_blocks=hits):
                    break
                if hits or (lookup and self.kv.enable_prefix_caching):
                    self.kv.record_prefix_query(seq, len(hits) * self.kv.block_size)
                if seq.num_output_tokens == 0:
                    seq.num_cached_tokens = len(hits) * self.kv.block_size
                self.waiting.popleft()
                seq.status = SeqStatus.RUNNING
                self.running.append(seq)
                chosen[seq.seq_id] = ScheduledSeq.of(seq, n)
                budget -= n

        out.scheduled = list(chosen.values())
        return out

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance computed-token counts once the runner has written the step's K/V."""
        for s in out.scheduled:
            s.seq.num_computed_tokens = s.start + s.num_new_tokens
            self.kv.cache_computed_blocks(s.seq, s.start)
