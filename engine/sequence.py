"""Requests and their sequences: the plain data the scheduler and engine pass around."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

from .reasoning import ThinkState
from .sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One generated continuation of a request (a request with ``n`` > 1 has ``n`` of them).

    ``token_ids`` holds prompt plus output; ``num_computed_tokens`` of them already have K/V in the
    blocks of ``block_table``. A preempted sequence drops its blocks and resets that count to 0.
    """

    seq_id: int
    request: Request | None
    token_ids: list[int]
    num_prompt_tokens: int
    index: int = 0  # the choice index within its request
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of full blocks
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None
    generator: Any = None  # torch.Generator for seeded sampling, owned by the sampler
    detok: Any = None  # incremental detokenizer state
    grammar: Any = None  # the grammar matcher of a constrained request, advanced with each token
    prefix_salt: bytes = b""  # mixed into the first block hash (e.g. image hashes)
    # Constrained sequences of an engine with a reasoning parser: whether the grammar applies yet
    # (engine/reasoning.py); None: it always does.
    think: ThinkState | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def params(self) -> SamplingParams:
        assert self.request is not None
        return self.request.params


@dataclass(eq=False)
class Request:
    """A user request: one prompt, its sampling params and its ``n`` sequences.

    Only the first sequence exists until the prompt is prefilled; the other ``n - 1`` are then forked
    from it and share its prompt blocks.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    max_model_len: int
    arrival_time: float
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False
    error: BaseException | None = None
    mm: Any = None  # MultiModalInput of a vision-language request
    grammar: Any = None  # CompiledGrammar of a constrained request (each sequence gets a matcher)
    logit_controls: Any = None  # LogitControls (engine/logit_controls.py) when params use any
    # With params.prompt_logprobs: one entry per prompt token computed so far (the first is None),
    # filled chunk by chunk as the prompt is prefilled; once per request whatever ``n``.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_token_ranks: list[int | None] | None = None

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs were asked for and some are still to be computed."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return bool(self.seqs) and all(s.is_finished for s in self.seqs) and (
            self.forked or self.params.n == 1)

    @property
    def max_total_tokens(self) -> int:
        """Tokens a sequence may reach: prompt + max_tokens, capped by the context length."""
        limit = self.max_model_len
        if self.params.max_tokens is not None:
            limit = min(limit, len(self.prompt_token_ids) + self.params.max_tokens)
        return limit


class IdCounter:
    """Monotonic id source owned by one engine (no module-level state)."""

    def __init__(self) -> None:
        self._it = itertools.count()

    def next(self) -> int:
        return next(self._it)
