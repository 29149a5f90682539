"""Chat messages as chat templates read them: the one rule the worker (which renders) and the
router (which renders again to hash prompts for kv_aware) must apply identically."""

from __future__ import annotations

import json


def template_tool_calls(calls: list[dict]) -> list[dict]:
    """Assistant tool calls as templates read them: OpenAI clients send ``arguments`` as a JSON
    string, templates (and transformers' examples) expect the object, so a string holding a JSON
    object is parsed (as vLLM does); anything else is left as sent."""
    out = []
    for call in calls:
        fn = call.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            try:
                args = json.loads(fn["arguments"])
            except ValueError:
                args = None
            if isinstance(args, dict):
                call = {**call, "function": {**fn, "arguments": args}}
        out.append(call)
    return out
