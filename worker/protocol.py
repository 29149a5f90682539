"""OpenAI-compatible wire formats (pydantic).

Request models keep the fields they do not declare (``model_extra``): fields that neither OpenAI
nor vLLM define are ignored, as vLLM does, while the ones they define and we do not implement are
answered 400 by :mod:`worker.field_policy` rather than dropped."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.sampling_params import SamplingParams

# Caps on what one request may ask for (hostile-input bounds; published in /openapi.json).
MAX_N = 128  # choices per prompt (OpenAI's own cap): every choice is a running sequence
MAX_STOP_STRINGS = 64  # every stop string is searched after every token of every choice
MAX_STOP_CHARS = 512  # per stop string: the longest one is held back from streams
# Values that reach torch as 64-bit integers (seeds, top_k): larger ones cannot be represented.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


def _range(**bounds) -> dict:
    """The engine's range of a field (``engine.SamplingParams`` checks it, naming the field) in
    the published schema: ``Field(None, **_range(minimum=0))``."""
    return {"json_schema_extra": bounds}


_LOGPROBS = _range(minimum=0, maximum=SamplingParams.MAX_LOGPROBS)


def _bounded_stop_schema(schema: dict) -> None:
    """The stop caps in the published schema (the validator below enforces them)."""
    for alt in schema.get("anyOf", ()):
        if alt.get("type") == "string":
            alt["maxLength"] = MAX_STOP_CHARS
        elif alt.get("type") == "array":
            alt["maxItems"] = MAX_STOP_STRINGS
            alt["items"]["maxLength"] = MAX_STOP_CHARS


class _Req(BaseModel):
    # Types as OpenAI checks them (strict: no "5" or 5.0 for an integer, no 1 or "true" for a
    # boolean, no true for a token id; an integer is a number), and NaN or infinities (which
    # Python's JSON accepts) are no parameter's value.
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(_Req):
    include_usage: bool = False


class JsonSchemaFormat(_Req):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Req):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(_Req):
    """Fields shared by chat and completions requests."""

    model: str
    max_tokens: int | None = Field(None, **_range(minimum=0))
    max_completion_tokens: int | None = Field(None, **_range(minimum=0))
    temperature: float | None = Field(None, **_range(minimum=0))
    top_p: float | None = Field(None, **_range(exclusiveMinimum=0, maximum=1))
    top_k: Int64 | None = Field(None, **_range(minimum=-1))
    min_p: float | None = Field(None, **_range(minimum=0, maximum=1))
    n: int = Field(1, le=MAX_N, **_range(minimum=1))
    stop: str | list[str] | None = Field(None, json_schema_extra=_bounded_stop_schema)
    stop_token_ids: list[int] | None = Field(None, **_range(items={"type": "integer", "minimum": 0}))
    seed: Int64 | None = None
    presence_penalty: float | None = Field(None, **_range(minimum=-2, maximum=2))
    frequency_penalty: float | None = Field(None, **_range(minimum=-2, maximum=2))
    repetition_penalty: float | None = Field(None, **_range(exclusiveMinimum=0))
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_*
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    # vLLM's sampling extras and evaluation fields
    min_tokens: int = Field(0, **_range(minimum=0))
    logit_bias: dict[str, float] | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = Field(None, **_LOGPROBS)
    return_tokens_as_token_ids: bool = False
    cache_salt: str | None = Field(None, min_length=1)

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, v):
        """Stop strings cost detokenizer work per token, so their number and length are capped."""
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        longest = max((len(s) for s in stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"stop strings may be at most {MAX_STOP_CHARS} characters, got one of {longest}")
        return v


class ChatMessage(BaseModel):
    """A message as the client sent it: every key (``tool_calls``, ``tool_call_id``, ``name``, and
    any a template reads) goes to the chat template unchanged."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _reasoning_name(cls, data: Any) -> Any:
        """An assistant turn sent back with vLLM's newer ``reasoning`` reaches the template as
        ``reasoning_content`` too, the name chat templates (Qwen3's) read."""
        if isinstance(data, dict) and data.get("reasoning") is not None and data.get("reasoning_content") is None:
            data = {**data, "reasoning_content": data["reasoning"]}
        return data


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Req):
    name: str


class NamedToolChoice(_Req):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, **_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the last (assistant) message is left open to continue
    add_special_tokens: bool = False  # the template writes BOS & co.; true also adds the tokenizer's
    chat_template: str | None = None  # a request's own: only with --trust-request-chat-template
    chat_template_kwargs: dict[str, Any] | None = None  # template variables, over the model's defaults
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    include_reasoning: bool = True  # vLLM's: false drops the reasoning of a reasoning model's answer
    # the legacy function-calling fields: refused by name rather than dropped
    functions: list[Any] | None = None
    function_call: Any = None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str | list[int]]
    logprobs: int | None = Field(None, **_LOGPROBS)
    echo: bool = False
    add_special_tokens: bool = True  # vLLM's: e.g. BOS before a text prompt

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v


class EmbeddingRequest(_Req):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None
    dimensions: int | None = None
    add_special_tokens: bool = True


class TokenizeRequest(_Req):
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[ToolDef] | None = None
    add_special_tokens: bool | None = None  # default: true for prompt, false for messages (vLLM's)
    add_generation_prompt: bool = True
    # with messages, as on chat completions (vLLM's TokenizeChatRequest)
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Req):
    model: str
    tokens: list[int]
