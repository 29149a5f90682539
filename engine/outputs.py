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
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    error: BaseException | None = None
    metrics: dict = field(default_factory=dict)


@dataclass
class EmbeddingOutput:
    request_id: str
    embedding: list[float]
    num_prompt_tokens: int
