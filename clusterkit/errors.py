"""OpenAI-shaped errors (``{"error": {"message", "type", "param", "code"}}``) and the one table
that turns exceptions into them, used by the raw-ASGI hot paths and the FastAPI routes alike."""

from __future__ import annotations

from collections.abc import Callable, Mapping

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 502: "server_error", 503: "service_unavailable",
               504: "server_error"}


class APIError(Exception):
    """Raised by handlers to answer with an OpenAI-shaped error; ``headers`` are extra response
    headers (e.g. ``Retry-After``) as raw ASGI pairs."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | int | None = None,
                 headers: list[tuple[bytes, bytes]] | tuple = ()):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = list(headers)


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None) -> dict:
    """The OpenAI error object for ``status``."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code if code is not None else status}}


def too_large(limit: int) -> APIError:
    """The 413 every body limit answers with."""
    return APIError(413, f"request body exceeds {limit} bytes", None, "request_too_large")


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


Translator = Callable[[Exception], APIError]


class ErrorTable:
    """Exception type -> OpenAI error, for the exceptions a process's own layers raise (the engine's
    ``InvalidParameter``, the worker's ``UnknownModel``...). :class:`APIError` and pydantic's
    ``ValidationError`` are always known; anything else is a 500."""

    def __init__(self, translators: Mapping[type[Exception], Translator] | None = None):
        self.translators = dict(translators or {})

    def to_api_error(self, e: Exception) -> APIError | None:
        """The client-facing error for ``e``, or None when ``e`` is a bug (a 500)."""
        if isinstance(e, APIError):
            return e
        for kind, translate in self.translators.items():
            if isinstance(e, kind):
                return translate(e)
        from pydantic import ValidationError

        if isinstance(e, ValidationError):
            return validation_error(e.errors(include_url=False))
        return None
