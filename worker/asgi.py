"""Raw-ASGI helpers for the hot paths of the worker and the router.

Generation requests and proxied requests skip FastAPI: its routing, dependency resolution,
``Request`` objects, response classes and ``jsonable_encoder`` cost more CPU per small request than
the work itself. These helpers are what such a route needs instead: a bounded body, bearer-token
checks, JSON and OpenAI-shaped error responses, and noticing that the client left.
Imports nothing heavy: the control plane uses it too.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable

from .errors import APIError, error_body

JSON_HEADERS = [(b"content-type", b"application/json")]


def bearer_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The token of an ``Authorization: Bearer`` header in raw ASGI headers ("" if none)."""
    for k, v in headers:
        if k == b"authorization":
            s = v.decode("latin-1")
            return s[7:].strip() if s[:7].lower() == "bearer " else ""
    return ""


def key_allowed(given: str, allowed: list[str]) -> bool:
    """Constant-time membership: every key is compared, whatever matches."""
    ok = False
    for a in allowed:
        ok |= hmac.compare_digest(given.encode(), a.encode())
    return ok


async def read_body(scope, receive, limit: int) -> bytes:
    """The whole request body; 413 past ``limit`` bytes (by header, or by counting chunks).
    Raises ``ConnectionAbortedError`` if the client leaves while sending it."""
    for k, v in scope["headers"]:
        if k == b"content-length" and v.isdigit() and int(v) > limit:
            raise APIError(413, f"request body exceeds {limit} bytes", None, "request_too_large")
    parts, seen = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ConnectionAbortedError
        chunk = msg.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            raise APIError(413, f"request body exceeds {limit} bytes", None, "request_too_large")
        parts.append(chunk)
        if not msg.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def dumps(obj) -> bytes:
    """Compact JSON as OpenAI sends it (NaN/inf are errors, not invalid JSON on the wire)."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


async def send_json(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """A whole JSON response (``body`` already encoded)."""
    await send({"type": "http.response.start", "status": status,
                "headers": JSON_HEADERS + [(b"content-length", b"%d" % len(body)), *headers]})
    await send({"type": "http.response.body", "body": body})


async def send_error(send, status: int, message: str, param: str | None = None, code=None,
                     headers: list[tuple[bytes, bytes]] = ()) -> None:
    """A whole OpenAI-shaped error response."""
    await send_json(send, status, json.dumps(error_body(status, message, param, code)).encode(), headers)


async def send_internal_error(send, message: str) -> None:
    """A 500 in OpenAI's shape, unless the response had already started (the server then ends
    the connection, which is all a client mid-response can be told)."""
    try:
        await send_error(send, 500, message)
    except RuntimeError:
        pass


class DisconnectWatch:
    """Notices the client leaving while we work on its behalf and calls ``on_gone`` once.

    Watching needs a task awaiting ``receive()``; most requests finish in milliseconds, so that
    task is only started once a request has been in flight for ``after`` seconds. Call
    :meth:`stop` before sending the end of the response: a server also reports
    ``http.disconnect`` once a response is complete."""

    __slots__ = ("gone", "on_gone", "task", "timer", "receive")

    def __init__(self, receive, on_gone: Callable[[], object] | None = None, after: float = 0.05):
        self.gone = False
        self.on_gone = on_gone
        self.task: asyncio.Task | None = None
        self.receive = receive
        self.timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(after, self._start)

    def _start(self) -> None:
        self.timer = None
        self.task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        if self.on_gone is not None:
            self.on_gone()

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.task is not None:
            self.task.cancel()
            self.task = None
