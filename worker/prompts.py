"""Prompts: chat messages through the model's chat template, and the prompt shapes of
/v1/completions, as token ids."""

from __future__ import annotations

import json
import re

from clusterkit.errors import APIError

from .vllm_manager import ServedModel


def template_takes_parts(template: str) -> bool:
    """Whether a chat template reads content as a list of parts (OpenAI's format) rather than only
    as a string: such templates loop over the content or test its type."""
    return bool(_PARTS.search(template))


_PARTS = re.compile(r"for\s+\w+\s+in\s+[\w.\[\]'\"]*content|content\s*(\]\s*)?is\s+(not\s+)?string"
                    r"|content\s*(\]\s*)?is\s+(not\s+)?(iterable|sequence|mapping)")


def _content_of(content, images: list | None, parts_ok: bool):
    """Message content for the chat template. Text parts stay parts where the template reads parts,
    else they are joined. With ``images`` (a VL model) image parts become ``{"type": "image"}``
    placeholders and are collected, in order."""
    if content is None or isinstance(content, str):
        return content
    texts, parts = [], []
    for i, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(400, f"messages content part {i} of type text needs a string 'text'",
                               "messages")
            texts.append(part["text"])
            parts.append(part)
        elif kind in ("image_url", "input_image", "image"):
            if images is None:
                raise APIError(400, "this model does not accept images", "messages")
            images.append(part)
            parts.append({"type": "image"})
        else:
            raise APIError(400, f"unsupported content part type {kind!r}", "messages")
    if len(parts) != len(texts) or (parts_ok and images is None):
        return parts
    return "\n".join(texts)


def _tool_calls_of(calls: list[dict]) -> list[dict]:
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


def chat_messages(messages, images: list | None, parts_ok: bool) -> list[dict]:
    """The request's messages as the template gets them: every key the client sent, content parts
    as the template reads them, tool-call arguments as objects."""
    out = []
    for m in messages:
        msg = m.model_dump(exclude_unset=True)
        msg["content"] = _content_of(m.content, images, parts_ok)
        if m.tool_calls is not None:
            msg["tool_calls"] = _tool_calls_of(m.tool_calls)
        out.append(msg)
    return out


def render_chat(served: ServedModel, messages, add_generation_prompt: bool = True,
                chat_template: str | None = None, images: list | None = None,
                tools: list[dict] | None = None) -> list[int]:
    """Chat messages (and tools) -> prompt token ids through the model's (or the configured) chat
    template, exactly as ``apply_chat_template`` renders them. Image parts are appended to
    ``images`` (VL models) and leave one placeholder each."""
    template = chat_template or served.chat_template
    if not template:
        raise APIError(400, f"model {served.name!r} has no chat template; use /v1/completions or "
                            f"configure chat_template", "messages")
    if served.images is None:
        images = None
    msgs = chat_messages(messages, images, template_takes_parts(template))
    try:
        text = served.tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False, tools=tools,
                                                    add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja errors: the template rejected these messages
        raise APIError(400, f"chat template failed: {e}", "messages") from e
    return served.tokenizer.encode(text, add_special_tokens=False)


def completion_prompts(served: ServedModel, prompt) -> list[tuple[str | None, list[int]]]:
    """The four prompt shapes of /v1/completions -> [(text or None, token ids)]."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append((p, served.tokenizer.encode(p, add_special_tokens=True)))
        else:
            out.append((None, list(p)))
    return out
