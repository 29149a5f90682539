"""Raw-ASGI helpers for the hot paths of the worker and the router, and the FastAPI glue that
gives every other route the same errors, body limit and key checks.

Generation requests and proxied requests skip FastAPI: its routing, dependency resolution,
``Request`` objects, response classes and ``jsonable_encoder`` cost more CPU per small request than
the work itself. These helpers are what such a route needs instead: a bounded body (in size and in
time: a client trickling its body is answered 408 and disconnected), JSON and OpenAI-shaped error
responses, and noticing that the client left.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from starlette.exceptions import HTTPException

from .errors import APIError, ErrorTable, error_body, too_large, validation_error

CLOSE = (b"connection", b"close")

JSON_HEADERS = [(b"content-type", b"application/json")]
log = logging.getLogger(__name__)


def declared_too_long(scope, limit: int) -> bool:
    """True when the request's Content-Length already exceeds ``limit``."""
    for k, v in scope.get("headers", ()):
        if k == b"content-length":
            return v.isdigit() and int(v) > limit
    return False


def body_timed_out(timeout: float) -> APIError:
    """The 408 for a body that did not arrive in time; the connection is closed after it (the
    rest of a trickled body is not waited for)."""
    return APIError(408, f"request body not received within {timeout:g} s", None, "request_timeout", [CLOSE])


async def read_body(scope, receive, limit: int, timeout: float | None = None) -> bytes:
    """The whole request body; 413 past ``limit`` bytes (by header, or by counting chunks), 408
    when it has not all arrived ``timeout`` seconds after the head (slow clients: one timer for
    the whole body, so trickling bytes does not extend it). Raises ``ConnectionAbortedError`` if
    the client leaves while sending it."""
    if declared_too_long(scope, limit):
        raise too_large(limit)
    if timeout is None:
        return await _read_body(receive, limit)
    try:
        async with asyncio.timeout(timeout):
            return await _read_body(receive, limit)
    except TimeoutError:
        raise body_timed_out(timeout) from None


async def _read_body(receive, limit: int) -> bytes:
    parts, seen = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ConnectionAbortedError
        chunk = msg.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            raise too_large(limit)
        parts.append(chunk)
        if not msg.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def dumps(obj) -> bytes:
    """Compact JSON as OpenAI sends it (NaN/inf are errors, not invalid JSON on the wire). A lone
    surrogate (JSON may carry ``"\\ud800"``, e.g. in a model name echoed by an error) has no UTF-8
    form: such text goes out escaped, which is still valid JSON."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(obj, allow_nan=False, separators=(",", ":")).encode()


async def send_json(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | tuple = ()) -> None:
    """A whole JSON response (``body`` already encoded)."""
    await send({"type": "http.response.start", "status": status,
                "headers": JSON_HEADERS + [(b"content-length", b"%d" % len(body)), *headers]})
    await send({"type": "http.response.body", "body": body})


async def send_error(send, status: int, message: str, param: str | None = None, code=None,
                     headers: list[tuple[bytes, bytes]] | tuple = ()) -> None:
    """A whole OpenAI-shaped error response."""
    await send_json(send, status, dumps(error_body(status, message, param, code)), headers)


async def send_exception(send, e: Exception, table: ErrorTable, where: str = "") -> int:
    """Answer with the error ``table`` gives for ``e`` (a 500 if none); returns the status.
    A response that had already started cannot be answered: the server then ends the
    connection, which is all a client mid-response can be told."""
    err = table.to_api_error(e)
    if err is None:
        log.error("internal error%s", f" on {where}" if where else "", exc_info=e)
        err = APIError(500, f"internal error: {type(e).__name__}: {e}")
    try:
        await send_error(send, err.status, err.message, err.param, err.code, err.headers)
    except RuntimeError:  # response already started
        pass
    return err.status


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


class BodyRefused(HTTPException):
    """A body :class:`BodyLimit` refused (413, 408) while a FastAPI route read it. An HTTPException,
    so FastAPI passes it on as it is rather than turning it into its own 400."""

    def __init__(self, err: APIError):
        super().__init__(err.status, err.message)
        self.err = err


class BodyLimit:
    """ASGI middleware for the FastAPI routes: the same 413 and 408 as :func:`read_body`."""

    def __init__(self, app, limit: int, timeout: float | None = None):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if declared_too_long(scope, self.limit):
            err = too_large(self.limit)
            return await send_error(send, err.status, err.message, err.param, err.code)
        seen, done = 0, False
        deadline = None if self.timeout is None else asyncio.get_running_loop().time() + self.timeout

        async def limited():
            nonlocal seen, done
            if done or deadline is None:  # after the body: e.g. a wait for the disconnect
                msg = await receive()
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        msg = await receive()
                except TimeoutError:
                    raise BodyRefused(body_timed_out(self.timeout)) from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise BodyRefused(too_large(self.limit))
                done = not msg.get("more_body", False)
            return msg

        try:
            await self.app(scope, limited, send)
        except BodyRefused as e:
            err = e.err
            await send_error(send, err.status, err.message, err.param, err.code, err.headers)


def install_error_handlers(app, table: ErrorTable, body_limit: int, body_timeout: float | None = None) -> None:
    """Every error a FastAPI app can raise comes out in OpenAI's shape through ``table``, and
    bodies over ``body_limit`` bytes or ``body_timeout`` seconds get the hot path's 413 or 408."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def respond(err: APIError) -> JSONResponse:
        return JSONResponse(error_body(err.status, err.message, err.param, err.code), status_code=err.status,
                            headers={k.decode(): v.decode() for k, v in err.headers} or None)

    def in_body(loc) -> tuple:
        loc = tuple(loc)  # FastAPI's location starts with body/query/path
        return loc[1:] if loc[:1] in (("body",), ("query",), ("path",)) else loc

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        return respond(validation_error([{**x, "loc": in_body(x.get("loc", ()))} for x in e.errors()]))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        # e.headers carry e.g. a 405's Allow
        headers = [(k.lower().encode(), v.encode()) for k, v in (e.headers or {}).items()]
        return respond(APIError(e.status_code, str(e.detail), None, None, headers))

    @app.exception_handler(BodyRefused)
    async def _refused(_: Request, e: BodyRefused):
        return respond(e.err)

    async def _known(_: Request, e: Exception):
        return respond(table.to_api_error(e))

    # Known kinds get their own handlers: Starlette re-raises (and logs) what only the catch-all
    # ``Exception`` handler takes, which a 400 must not do.
    for kind in (APIError, *table.translators):
        app.add_exception_handler(kind, _known)

    @app.exception_handler(Exception)
    async def _any(request: Request, e: Exception):
        err = table.to_api_error(e)
        if err is None:
            log.error("internal error on %s", request.url.path, exc_info=e)
            err = APIError(500, f"internal error: {type(e).__name__}: {e}")
        return respond(err)

    app.add_middleware(BodyLimit, limit=body_limit, timeout=body_timeout)
