"""OpenAI/vLLM request fields -> the engine's SamplingParams."""

from __future__ import annotations

from engine import SamplingParams, StructuredOutputsParams
from engine.sampling_params import InvalidParameter

from .protocol import SamplingFields
from .vllm_manager import ServedModel


def sampling_params(req: SamplingFields, served: ServedModel, prompt_len: int,
                    logprobs: int | None, structured_outputs: StructuredOutputsParams | None = None,
                    skip_special_tokens: bool | None = None) -> SamplingParams:
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:
        max_tokens = max(1, served.max_model_len - prompt_len)
    kw = dict(n=req.n, max_tokens=max_tokens, stop=req.stop, stop_token_ids=req.stop_token_ids,
              seed=req.seed, ignore_eos=req.ignore_eos, logprobs=logprobs,
              skip_special_tokens=req.skip_special_tokens if skip_special_tokens is None else skip_special_tokens,
              include_stop_str_in_output=req.include_stop_str_in_output, structured_outputs=structured_outputs)
    for name, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("min_p", 0.0),
                          ("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                          ("repetition_penalty", 1.0)):
        value = getattr(req, name)
        kw[name] = default if value is None else value
    try:
        params = SamplingParams(**kw)
    except InvalidParameter as e:
        if e.param == "max_tokens" and req.max_completion_tokens is not None:
            raise InvalidParameter("max_completion_tokens",
                                   str(e).replace("max_tokens", "max_completion_tokens")) from None
        raise
    return params
