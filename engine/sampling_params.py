"""Per-request sampling settings, validated before anything is scheduled."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class InvalidParameter(ValueError):
    """A request parameter is out of range; ``param`` names the offending field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class StructuredOutputsParams:
    """A constraint on the output, as vLLM names it: exactly one of ``json`` (a JSON schema, dict or
    string), ``regex``, ``choice`` (a list of strings), ``grammar`` (EBNF with ``::=``, else Lark)
    or ``json_object=True`` (any JSON object).

    JSON comes out compact (``", "`` and ``": "`` separators) unless ``disable_any_whitespace`` is
    False: free whitespace lets a model ramble spaces forever inside a valid document.
    """

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool | None = None

    KINDS = ("json", "regex", "choice", "grammar", "json_object")

    def __post_init__(self) -> None:
        given = [k for k in self.KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise InvalidParameter("structured_outputs", "give exactly one of json, regex, choice, grammar "
                                                         f"or json_object (got {given or 'none'})")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise InvalidParameter("structured_outputs", "json must be a JSON schema (object or string)")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise InvalidParameter("structured_outputs", f"{name} must be a non-empty string")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidParameter("structured_outputs", "choice must be a non-empty list of non-empty strings")

    @property
    def kind(self) -> str:
        return next(k for k in self.KINDS if getattr(self, k) not in (None, False))

    @property
    def any_whitespace(self) -> bool:
        return self.disable_any_whitespace is False


@dataclass
class SamplingParams:
    """Sampling settings of one request, mirroring ``vllm.SamplingParams``.

    ``temperature == 0`` (or below 1e-5, as vLLM) means greedy. ``logprobs`` is the number of top
    logprobs returned per generated token (0 returns only the sampled token's logprob; None returns nothing);
    ``prompt_logprobs`` the same for every prompt token (the first has none).

    Logit controls, applied to the logits that are sampled from (greedy included), never to the
    reported logprobs: ``logit_bias`` (token id -> bias, clamped to [-100, 100] as OpenAI does),
    ``min_tokens`` (EOS and ``stop_token_ids`` masked, stop strings ignored, until that many
    output tokens exist), ``bad_words`` (vLLM's semantics, see ``engine/logit_controls.py``) and
    ``allowed_token_ids``. ``truncate_prompt_tokens`` keeps the last k prompt tokens (-1: the
    model's context length). ``max_tokens=0`` prefills the prompt (for its prompt logprobs) and
    finishes with ``"length"`` without sampling.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    detokenize: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    extra: dict = field(default_factory=dict)

    MAX_LOGPROBS = 20
    GREEDY_BELOW = 1e-5  # temperatures under this sample greedily
    MAX_LOGIT_BIAS = 100.0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.min_tokens is None:
            self.min_tokens = 0
        if self.logit_bias:
            self.logit_bias = _clamped_bias(self.logit_bias, self.MAX_LOGIT_BIAS)
        if self.bad_words is not None:
            self.bad_words = [self.bad_words] if isinstance(self.bad_words, str) else list(self.bad_words)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`InvalidParameter` naming the first out-of-range field."""
        def bad(param: str, msg: str) -> None:
            raise InvalidParameter(param, f"{param} {msg}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", f"must be an integer >= 1, got {self.n!r}")
        if self.temperature < 0:
            bad("temperature", f"must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", f"must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 0):
            bad("max_tokens", f"must be an integer >= 0, got {self.max_tokens!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= self.MAX_LOGPROBS:
            bad("logprobs", f"must be in [0, {self.MAX_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= self.MAX_LOGPROBS):
            bad("prompt_logprobs", f"must be an integer in [0, {self.MAX_LOGPROBS}], got {self.prompt_logprobs!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            bad("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.bad_words is not None and any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            bad("bad_words", "must hold non-empty strings")
        if self.allowed_token_ids is not None and (
                not self.allowed_token_ids
                or any(not _is_int(t) or t < 0 for t in self.allowed_token_ids)):
            bad("allowed_token_ids", "must be a non-empty list of token ids")
        if self.truncate_prompt_tokens is not None and (
                not _is_int(self.truncate_prompt_tokens)
                or (self.truncate_prompt_tokens < 1 and self.truncate_prompt_tokens != -1)):
            bad("truncate_prompt_tokens", f"must be -1 or an integer >= 1, got {self.truncate_prompt_tokens!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", f"must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must hold non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must hold non-negative integers")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs,
                                                                  StructuredOutputsParams):
            bad("structured_outputs", "must be a StructuredOutputsParams")

    @property
    def greedy(self) -> bool:
        # As vLLM: a temperature this small is greedy (dividing logits by it would overflow them
        # to infinities and sample from NaN probabilities).
        return self.temperature < self.GREEDY_BELOW

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def has_logit_controls(self) -> bool:
        """Whether any of logit_bias, min_tokens, bad_words, allowed_token_ids is in use."""
        return bool(self.logit_bias or self.min_tokens or self.bad_words
                    or self.allowed_token_ids is not None)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _clamped_bias(bias, limit: float) -> dict[int, float]:
    """Token id keys (OpenAI sends them as strings) with float values clamped to +-``limit``."""
    if not isinstance(bias, dict):
        raise InvalidParameter("logit_bias", "logit_bias must map token ids to numbers")
    out = {}
    for key, value in bias.items():
        try:
            tid = int(key) if not isinstance(key, bool) else None
            val = float(value)
        except (TypeError, ValueError):
            tid = None
        if tid is None or tid < 0 or isinstance(value, bool) or val != val:
            raise InvalidParameter("logit_bias", f"logit_bias must map token ids to numbers, "
                                                 f"got {key!r}: {value!r}")
        out[tid] = min(limit, max(-limit, val))
    return out
