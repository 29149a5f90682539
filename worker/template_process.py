"""What runs inside a chat-template renderer process (see :mod:`worker.template_renderer`), and
the frames both sides exchange. Started as ``python -m worker.template_process FD PARENT_PID``
with its end of a socket pair open as FD.

A renderer process imports only what rendering needs: transformers' own Jinja renderer
(``render_jinja_template``: 0.7 s to import, no torch, ~70 MB resident), so its text is
byte-identical to ``tokenizer.apply_chat_template(..., tokenize=False)``. It reads one job at a
time from its socket, renders it and answers; it never tokenizes (the worker does, with the
model's tokenizer).

Frames are a 4-byte big-endian length and a JSON object, ASCII-escaped so that any string a
client sent (lone surrogates included) crosses intact. JSON rather than pickle in both
directions: the child runs untrusted templates, and the worker must never unpickle what such a
process sends back.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys

HEADER = struct.Struct("!I")

# Names the renderer itself passes to the template (or that transformers' apply_chat_template
# takes as its own arguments): chat_template_kwargs may not set them.
RESERVED_TEMPLATE_VARIABLES = frozenset({
    "messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "chat_template",
    "conversation", "conversations", "tokenize", "return_assistant_tokens_mask", "return_dict",
    "tokenizer_kwargs",
})


def check_template_kwargs(kwargs: dict, where: str) -> None:
    """ValueError naming the first key of ``kwargs`` that would override a variable the renderer
    itself sets (messages, tools, add_generation_prompt...)."""
    for key in kwargs:
        if key in RESERVED_TEMPLATE_VARIABLES:
            raise ValueError(f"{where} may not set {key!r}: the renderer sets it "
                             f"(reserved: {', '.join(sorted(RESERVED_TEMPLATE_VARIABLES))})")


def encode_frame(obj: dict) -> bytes:
    """One frame: length header + ASCII JSON."""
    data = json.dumps(obj, separators=(",", ":")).encode("ascii")
    return HEADER.pack(len(data)) + data


def decode_frame(data: bytes) -> dict:
    return json.loads(data)


def _read_frame(stream) -> dict | None:
    """The next frame from a blocking binary stream; None at end of stream."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (n,) = HEADER.unpack(head)
    data = stream.read(n)
    if len(data) < n:
        return None
    return decode_frame(data)


def _exit_with_parent(parent_pid: int) -> None:
    """Linux: the kernel kills this process when the worker dies, even by SIGKILL, so a renderer
    busy with a template is never left running without its worker. The worker starts renderers
    from its event-loop thread, which lives as long as the process (PDEATHSIG follows the thread
    that forked)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the worker died before we asked
        os._exit(0)


def render(job: dict, render_jinja_template) -> str:
    """The chat of ``job`` rendered exactly as ``apply_chat_template(tokenize=False)`` renders it:
    keys whose value is None are dropped from each message, the tokenizer's special-token strings
    are template variables under the request's own, then transformers' renderer (which turns
    tools and documents into plain JSON data, aliases reasoning fields and handles
    ``continue_final_message``). Generation indices (``{% generation %}``) are not asked for."""
    messages = [{k: v for k, v in m.items() if v is not None} for m in job["messages"]]
    variables = {**job["special_tokens"], **job["variables"]}
    rendered, _ = render_jinja_template(
        conversations=[messages], tools=job["tools"], documents=job["documents"],
        chat_template=job["template"], continue_final_message=job["continue_final_message"],
        add_generation_prompt=job["add_generation_prompt"], **variables)
    return rendered[0]


def answer(job: dict, render_jinja_template) -> dict:
    """The reply to one job: ``{"text"}``, or ``{"error", "kind"}`` with kind ``template`` (the
    template or its inputs failed) or ``too_long`` (more text than the model could take)."""
    try:
        text = render(job, render_jinja_template)
    except Exception as e:  # noqa: BLE001 - whatever the template raised is the client's answer
        return {"error": str(e) or type(e).__name__, "kind": "template"}
    if len(text) > job["max_chars"]:
        return {"error": f"the rendered prompt has {len(text)} characters, more than the model's context can hold",
                "kind": "too_long"}
    return {"text": text}


def serve(sock: socket.socket, parent_pid: int) -> None:
    """Entry point of a renderer process: say ready, then answer jobs until the worker closes
    the socket."""
    _exit_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the worker's to handle; it stops us
    from transformers.utils.chat_template_utils import render_jinja_template

    stream = sock.makefile("rb")
    sock.sendall(encode_frame({"ready": True}))
    while (job := _read_frame(stream)) is not None:
        sock.sendall(encode_frame(answer(job, render_jinja_template)))


def main(argv: list[str]) -> int:
    fd, parent_pid = int(argv[0]), int(argv[1])
    serve(socket.socket(fileno=fd), parent_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
