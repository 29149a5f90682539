"""Result types returned by the engines (mirroring vLLM's)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One choice: cumulative ``text`` and ``token_ids`` so far."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """One request's progress: its prompt (after ``truncate_prompt_tokens``) and its choices.

    ``prompt_logprobs`` (with ``SamplingParams.prompt_logprobs=k``): one entry per prompt token, the
    first None; each other a dict {token_id: logprob} holding the prompt token first, then the top
    k at that position, most likely first (the prompt token is not repeated when it is among them).
    ``prompt_token_ranks`` runs parallel to it: the rank of each prompt token (1 = most likely, i.e.
    1 + the number of tokens strictly more likely), the first None. The other entries are the top
    k, so sorted by logprob (descending) they rank 1..k. Values are the raw model distribution
    (float32 log_softmax). Both lists are shared with the engine: read, never mutate.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    error: BaseException | None = None
    metrics: dict = field(default_factory=dict)
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_token_ranks: list[int | None] | None = None


@dataclass
class EmbeddingOutput:
    request_id: str
    embedding: list[float]
    num_prompt_tokens: int
