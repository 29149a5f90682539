"""OpenAI-shaped errors (``{"error": {"message", "type", "param", "code"}}``) and the request-size
limit, shared by the worker and the router. Imports nothing heavy: the control plane uses it too."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 502: "server_error", 503: "service_unavailable",
          504: "server_error"}


class APIError(Exception):
    """Raised by handlers to answer with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code if code is not None else status}}


def error_response(status: int, message: str, param: str | None = None, code=None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def validation_error(errs: list[dict]) -> APIError:
    """pydantic's errors (locations inside the request body) -> a 400 naming the field at fault."""
    first = errs[0] if errs else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('msg')}", None)
    loc = tuple(first.get("loc", ()))
    param = str(loc[0]) if loc else None
    # Union members show up in the location as type names; keep the field path only.
    path = ".".join(str(p) for p in loc if isinstance(p, int) or str(p).isidentifier())
    msg = first.get("msg", "invalid value")
    return APIError(400, f"{path or param}: {msg}" if param else msg, param)


def _in_body(loc) -> tuple:
    """FastAPI's error location without its leading ``body``/``query``/``path``."""
    loc = tuple(loc)
    return loc[1:] if loc[:1] in (("body",), ("query",), ("path",)) else loc


def install(app) -> None:
    """Register handlers so every error the app can raise comes out in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        err = validation_error([{**x, "loc": _in_body(x.get("loc", ()))} for x in e.errors()])
        return error_response(err.status, err.message, err.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), None)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}", None)


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``limit`` bytes, by header or by counting chunks."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                return await self._reject(send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send):
        resp = error_response(413, f"request body exceeds {self.limit} bytes", None, "request_too_large")
        await resp({"type": "http"}, None, send)
