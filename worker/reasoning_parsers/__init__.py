"""Reasoning in model output: the parsers of vLLM's ``--reasoning-parser`` names (``qwen3``,
``deepseek_r1``) that split a chat answer into ``reasoning_content`` and ``content``, whole or
incrementally over a stream."""

from .base import END as THINK_END
from .base import START as THINK_START
from .base import PromptThinking, ReasoningParser, ReasoningStream, prompt_thinking
from .parsers import PARSERS, DeepSeekR1ReasoningParser, Qwen3ReasoningParser

__all__ = ["PARSERS", "THINK_END", "THINK_START", "DeepSeekR1ReasoningParser", "PromptThinking",
           "Qwen3ReasoningParser", "ReasoningParser", "ReasoningStream", "prompt_thinking"]
