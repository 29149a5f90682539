"""A request's output constraint, from whichever field it came in: OpenAI's ``response_format``,
vLLM's ``structured_outputs``, or vLLM's older top-level ``guided_*`` fields."""

from __future__ import annotations

from clusterkit.errors import APIError
from engine import StructuredOutputsParams
from engine.sampling_params import InvalidParameter

from .protocol import SamplingFields
from .vllm_manager import ServedModel

# structured_outputs keys we honour; vLLM's others change the output and are refused by name
SO_KEYS = {"json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace"}
BACKENDS = (None, "auto", "xgrammar")


def _make(field: str, **kw) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kw)
    except InvalidParameter as e:
        raise APIError(400, f"{field}: {e}", field) from None


def constraint_of(req: SamplingFields) -> tuple[StructuredOutputsParams | None, str | None]:
    """The constraint and the name of the field that asked for it (for 400s), or (None, None)."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", _make("response_format", json_object=True)))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise APIError(400, "response_format of type json_schema needs json_schema.schema", "response_format")
        found.append(("response_format", _make("response_format", json=rf.json_schema.schema_)))
    if req.structured_outputs:
        unknown = sorted(set(req.structured_outputs) - SO_KEYS)
        if unknown:
            raise APIError(400, f"structured_outputs.{unknown[0]} is not supported; use json, regex, choice, "
                                f"grammar or json_object", "structured_outputs")
        found.append(("structured_outputs", _make("structured_outputs", **req.structured_outputs)))
    for field, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                       ("guided_grammar", "grammar")):
        value = getattr(req, field)
        if value is not None:
            found.append((field, _make(field, **{key: value})))
    if req.guided_whitespace_pattern is not None:
        raise APIError(400, "guided_whitespace_pattern is not supported (JSON is written compact; "
                            "structured_outputs.disable_any_whitespace=false allows any whitespace)",
                       "guided_whitespace_pattern")
    if req.guided_decoding_backend not in BACKENDS:
        raise APIError(400, f"guided_decoding_backend {req.guided_decoding_backend!r} is not available; "
                            f"this server uses xgrammar", "guided_decoding_backend")
    if len(found) > 1:
        raise APIError(400, f"give one output constraint, not {found[0][0]} and {found[1][0]}", found[1][0])
    if not found:
        return None, None
    field, spec = found[0]
    return spec, field


async def compile_constraint(served: ServedModel, spec: StructuredOutputsParams | None, field: str | None) -> None:
    """Compile ``spec`` off the event loop (then cached in the engine); a 400 naming ``field``, the
    request field it came in, when it does not compile."""
    if spec is None:
        return
    try:
        await served.compile_grammar(spec)
    except InvalidParameter as e:
        raise APIError(400, str(e), field) from None
