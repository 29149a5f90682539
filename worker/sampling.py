"""OpenAI/vLLM request fields -> the engine's SamplingParams."""

from __future__ import annotations

from engine import SamplingParams, StructuredOutputsParams
from engine.sampling_params import InvalidParameter

from .protocol import SamplingFields
from .vllm_manager import ServedModel

# Defaults of the fields a model's generation config may override (worker/generation_defaults.py).
_DEFAULTS = (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("min_p", 0.0), ("repetition_penalty", 1.0))


def logit_bias_of(req: SamplingFields) -> dict[int, float] | None:
    """OpenAI sends token ids as JSON object keys (strings)."""
    if not req.logit_bias:
        return None
    out = {}
    for key, value in req.logit_bias.items():
        try:
            out[int(key)] = float(value)
        except ValueError:
            raise InvalidParameter("logit_bias", f"logit_bias keys must be token ids, got {key!r}") from None
    return out


def truncate_prompt(req: SamplingFields, served: ServedModel, ids: list[int]) -> list[int]:
    """vLLM's ``truncate_prompt_tokens``: the engine's rule (the last k tokens; -1: the context
    length), applied here so usage, echo and prompt logprobs all see the prompt that runs."""
    return served.truncate_prompt(ids, req.truncate_prompt_tokens)


def sampling_params(req: SamplingFields, served: ServedModel, prompt_len: int,
                    logprobs: int | None, structured_outputs: StructuredOutputsParams | None = None,
                    skip_special_tokens: bool | None = None, prompt_logprobs: int | None = None,
                    max_tokens: int | None = None) -> SamplingParams:
    """The engine's parameters of one prompt. The model's generation-config defaults fill what the
    request leaves unset; ``max_tokens`` (given) overrides the request's, e.g. 0 for echo only."""
    defaults = served.sampling_defaults
    if max_tokens is None:
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:
        room = max(1, served.max_model_len - prompt_len)
        max_tokens = min(defaults.get("max_tokens", room), room)
    kw = dict(n=req.n, max_tokens=max_tokens, stop=req.stop, stop_token_ids=req.stop_token_ids,
              seed=req.seed, ignore_eos=req.ignore_eos, logprobs=logprobs,
              skip_special_tokens=req.skip_special_tokens if skip_special_tokens is None else skip_special_tokens,
              include_stop_str_in_output=req.include_stop_str_in_output, structured_outputs=structured_outputs,
              presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
              min_tokens=req.min_tokens, logit_bias=logit_bias_of(req), bad_words=req.bad_words,
              allowed_token_ids=req.allowed_token_ids,
              prompt_logprobs=req.prompt_logprobs if prompt_logprobs is None else prompt_logprobs)
    for name, default in _DEFAULTS:
        value = getattr(req, name)
        kw[name] = defaults.get(name, default) if value is None else value
    try:
        params = SamplingParams(**kw)
    except InvalidParameter as e:
        if e.param == "max_tokens" and req.max_completion_tokens is not None:
            raise InvalidParameter("max_completion_tokens",
                                   str(e).replace("max_tokens", "max_completion_tokens")) from None
        raise
    return params
