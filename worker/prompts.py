"""Prompts: chat messages through the model's chat template, and the prompt shapes of
/v1/completions, as token ids."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from clusterkit.chat_messages import template_tool_calls
from clusterkit.errors import APIError

from .template_process import check_template_kwargs
from .template_renderer import RenderError, RenderJob, RenderTimeout
from .vllm_manager import ServedModel

# Rendered text longer than max_model_len * this cannot fit the model's context (tokens of real
# prompts average ~4 characters), so the renderer refuses it rather than shipping it back.
MAX_CHARS_PER_TOKEN = 64


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


def chat_messages(messages, images: list | None, parts_ok: bool) -> list[dict]:
    """The request's messages as the template gets them: every key the client sent, content parts
    as the template reads them, tool-call arguments as objects."""
    out = []
    for m in messages:
        msg = m.model_dump(exclude_unset=True)
        msg["content"] = _content_of(m.content, images, parts_ok)
        if m.tool_calls is not None:
            msg["tool_calls"] = template_tool_calls(m.tool_calls)
        out.append(msg)
    return out


@dataclass(frozen=True)
class ChatOptions:
    """How a request's chat is rendered and encoded (vLLM's field names): ``add_generation_prompt``
    opens an assistant turn; ``continue_final_message`` leaves the last (assistant) message open
    for the model to continue; ``add_special_tokens`` adds the tokenizer's own (e.g. BOS) when
    encoding, off by default since the template writes them; ``chat_template`` is a request's own
    template (trusted workers only); ``chat_template_kwargs`` are extra template variables over
    the model's configured ones."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @classmethod
    def of(cls, req) -> ChatOptions:
        """The options of a chat completion or a /tokenize request with messages."""
        return cls(req.add_generation_prompt, req.continue_final_message, bool(req.add_special_tokens),
                   req.chat_template, req.chat_template_kwargs)


def _check_options(served: ServedModel, messages, options: ChatOptions) -> None:
    if options.chat_template is not None and not served.renderer.trust_request_templates:
        raise APIError(400, "a request's own chat_template is not accepted: chat templates are code, and this "
                            "worker runs only its models' templates (start it with --trust-request-chat-template "
                            "to allow them)", "chat_template")
    if options.continue_final_message:
        if options.add_generation_prompt:
            raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true: set "
                                "add_generation_prompt to false to continue the final message",
                           "continue_final_message")
        if messages[-1].role != "assistant":
            raise APIError(400, f"continue_final_message needs the last message to be the assistant's, "
                                f"not {messages[-1].role!r}", "continue_final_message")
    if options.chat_template_kwargs:
        try:
            check_template_kwargs(options.chat_template_kwargs, "chat_template_kwargs")
        except ValueError as e:
            raise APIError(400, str(e), "chat_template_kwargs") from None


def _template_of(served: ServedModel, requested: str | None, tools) -> str | None:
    """The template to render: the request's own, else the model's (configured, else the
    tokenizer's; of a tokenizer's named templates, ``tool_use`` when tools are given, else
    ``default``, as transformers picks)."""
    template = requested if requested is not None else served.chat_template
    if isinstance(template, dict):
        template = (template.get("tool_use") if tools is not None and "tool_use" in template
                    else template.get("default"))
    return template


async def render_chat(served: ServedModel, messages, options: ChatOptions = ChatOptions(),
                      images: list | None = None, tools: list[dict] | None = None) -> list[int]:
    """Chat messages (and tools) -> prompt token ids through the model's (or the request's) chat
    template, exactly as ``apply_chat_template`` renders them, then the tokenizer. The template
    runs in a renderer process (:mod:`worker.template_renderer`) under a time limit, so it never
    holds up the event loop; encoding stays here. Image parts are appended to ``images`` (VL
    models) and leave one placeholder each: the images never leave the worker."""
    _check_options(served, messages, options)
    template = _template_of(served, options.chat_template, tools)
    if not template:
        raise APIError(400, f"model {served.name!r} has no chat template; use /v1/completions or "
                            f"configure chat_template", "messages")
    if served.images is None:
        images = None
    job = RenderJob(template, chat_messages(messages, images, template_takes_parts(template)), tools,
                    add_generation_prompt=options.add_generation_prompt,
                    continue_final_message=options.continue_final_message,
                    special_tokens=served.tokenizer.special_tokens_map,
                    variables={**served.chat_template_kwargs, **(options.chat_template_kwargs or {})},
                    max_chars=served.max_model_len * MAX_CHARS_PER_TOKEN)
    culprit = "chat_template" if options.chat_template is not None else "messages"
    try:
        text = await served.renderer.render(job)
    except RenderTimeout:
        raise APIError(400, f"the chat template took too long to render these messages (over the "
                            f"{served.renderer.timeout:g} s limit); rendering was stopped", culprit) from None
    except RenderError as e:
        if e.kind == "too_long":
            raise APIError(400, f"{e}: {served.max_model_len} tokens", "messages") from None
        param = ("continue_final_message" if options.continue_final_message and "continue_final_message" in str(e)
                 else culprit)
        raise APIError(400, f"chat template failed: {e}", param) from None
    return served.tokenizer.encode(text, add_special_tokens=options.add_special_tokens)


def completion_prompts(served: ServedModel, prompt, add_special_tokens: bool = True
                       ) -> list[tuple[str | None, list[int]]]:
    """The four prompt shapes of /v1/completions -> [(text or None, token ids)]; text prompts get
    the tokenizer's special tokens (e.g. BOS) unless ``add_special_tokens`` is false."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append((p, served.tokenizer.encode(p, add_special_tokens=add_special_tokens)))
        else:
            out.append((None, list(p)))
    return out
