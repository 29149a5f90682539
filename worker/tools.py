"""Tool use on chat requests: what the template sees, how the answer is constrained, and how it
is read back into ``tool_calls``.

- ``none``: tools are still rendered (the model may talk about them), the answer is content.
- ``auto`` (the default when tools are given): the model's ``tool_call_parser`` reads the answer;
  a model without ``enable_auto_tool_choice`` answers 400, as vLLM does.
- ``required`` / a named function: the answer is constrained to a JSON schema of valid calls built
  from the tools' parameter schemas, so the calls parse whatever the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from clusterkit.errors import APIError
from engine import StructuredOutputsParams

from .protocol import ChatCompletionRequest, NamedToolChoice
from .tool_parsers import PARSERS, NamedCallParser, RequiredCallsParser, ToolParser
from .vllm_manager import ServedModel

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class ToolPlan:
    tools: list[dict] | None = None  # as the template gets them
    parser: ToolParser | None = None  # None: the answer is plain content
    constraint: StructuredOutputsParams | None = None


def tool_dicts(tools) -> list[dict]:
    """Tools as the client sent them (every key), for the chat template."""
    return [t.model_dump(exclude_unset=True) for t in tools]


def _parameters(tool) -> dict:
    return tool.function.parameters or EMPTY_PARAMETERS


def required_schema(tools, parallel: bool) -> dict:
    """JSON schema of a list of calls ``[{"name": ..., "parameters": {...}}]`` to these tools."""
    items = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [t.function.name]}, "parameters": _parameters(t)},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def plan(req: ChatCompletionRequest, served: ServedModel) -> ToolPlan:
    """Validate the tool fields of a chat request and decide how its answer is produced and read."""
    for legacy in ("functions", "function_call"):
        if getattr(req, legacy) is not None:
            raise APIError(400, f"{legacy} is the deprecated function-calling API and is not supported; "
                                f"use tools and tool_choice", legacy)
    tools = req.tools or []
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    if not tools:
        if choice != "none":
            raise APIError(400, "tool_choice needs tools", "tool_choice")
        return ToolPlan()
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, f"tool names must be unique, got {names}", "tools")
    rendered = tool_dicts(tools)
    parallel = req.parallel_tool_calls is not False
    if choice == "none":
        return ToolPlan(rendered)
    if choice == "auto":
        if not (served.enable_auto_tool_choice and served.tool_call_parser):
            raise APIError(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                                f"to be set for model {served.name!r}", "tool_choice")
        return ToolPlan(rendered, PARSERS[served.tool_call_parser]())
    if choice == "required":
        return ToolPlan(rendered, RequiredCallsParser(),
                        StructuredOutputsParams(json=required_schema(tools, parallel)))
    assert isinstance(choice, NamedToolChoice)
    by_name = {t.function.name: t for t in tools}
    tool = by_name.get(choice.function.name)
    if tool is None:
        raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools {names}",
                       "tool_choice")
    return ToolPlan(rendered, NamedCallParser(tool.function.name), StructuredOutputsParams(json=_parameters(tool)))
