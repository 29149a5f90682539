"""Prompts: chat messages through the model's chat template, and the prompt shapes of
/v1/completions, as token ids."""

from __future__ import annotations

from clusterkit.errors import APIError

from .vllm_manager import ServedModel


def _content_of(content, images: list | None):
    """Message content for the chat template. Text parts are joined; with ``images`` (a VL model)
    image parts stay as ``{"type": "image"}`` placeholders and are collected, in order."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts, parts = [], []
    for i, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(400, f"messages content part {i} of type text needs a string 'text'",
                               "messages")
            texts.append(part["text"])
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("image_url", "input_image", "image"):
            if images is None:
                raise APIError(400, "this model does not accept images", "messages")
            images.append(part)
            parts.append({"type": "image"})
        else:
            raise APIError(400, f"unsupported content part type {kind!r}", "messages")
    return parts if images is not None and len(parts) != len(texts) else "\n".join(texts)


def render_chat(served: ServedModel, messages, add_generation_prompt: bool = True,
                chat_template: str | None = None, images: list | None = None) -> list[int]:
    """Chat messages -> prompt token ids through the model's (or the configured) chat template.
    Image parts are appended to ``images`` (VL models) and leave one placeholder each."""
    template = chat_template or served.chat_template
    if not template:
        raise APIError(400, f"model {served.name!r} has no chat template; use /v1/completions or "
                            f"configure chat_template", "messages")
    if served.images is None:
        images = None
    msgs = [{"role": m.role, "content": _content_of(m.content, images),
             **({"name": m.name} if m.name else {})} for m in messages]
    try:
        text = served.tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
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
