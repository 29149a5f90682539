"""Tool calls in model output: the parsers of vLLM's ``--tool-call-parser`` names (``hermes``,
``llama3_json``, ``mistral``), the formats of our constrained tool choices, and the stream differ
that turns a growing answer into OpenAI's tool-call deltas."""

from .base import ParseResult, ToolCallStream, ToolCallText, ToolParser, message_calls
from .parsers import PARSERS, NamedCallParser, RequiredCallsParser

__all__ = ["PARSERS", "NamedCallParser", "ParseResult", "RequiredCallsParser", "ToolCallStream",
           "ToolCallText", "ToolParser", "message_calls"]
