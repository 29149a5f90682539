"""The HTTP server options of ``vllm serve`` that the worker, the router and the manager share,
with vLLM's flag names: CORS, a root path behind a path-prefix proxy, ``X-Request-Id`` headers and
request logging.

Each option is an ASGI layer around a process's whole entrypoint (the raw-ASGI hot path included),
added only when the option is on: with every option off the entrypoint is exactly what it was, so
a request pays nothing for options it does not use.
"""

from __future__ import annotations

import argparse
import json
import re
import uuid
from importlib import metadata
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, field_validator

from .config import ByteSize

REQUEST_ID = "llmc.request_id"
"""Scope key under which :class:`RequestIdHeaders` leaves the request's id for inner layers."""

_ORIGIN = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s?#]+$")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token: methods and header names
_ROOT_PATH = re.compile(r"^(/[^\s?#/]+)+$")
MAX_REQUEST_ID_BYTES = 256


def _string_list(value: Any) -> Any:
    """A list of strings from config values or repeated flags, where any item may itself be a JSON
    list (vLLM's flags take ``'["a", "b"]'``); a lone string is one item."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return value  # pydantic names the type error
    out: list[Any] = []
    for item in value:
        if isinstance(item, str) and item.lstrip().startswith("["):
            try:
                parsed = json.loads(item)
            except json.JSONDecodeError:
                raise ValueError(f"{item!r} is not a JSON list") from None
            if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
                raise ValueError(f"{item!r} is not a JSON list of strings")
            out.extend(parsed)
        else:
            out.append(item)
    return out


StringList = Annotated[list[str], BeforeValidator(_string_list)]
"""A list of strings given as a YAML list, one string, repeated flags or JSON-list strings."""


class ServerOptions(BaseModel):
    """Settings every HTTP process of the cluster has (a base of the worker's and the router's
    settings; each is documented in config.yaml)."""

    allowed_origins: StringList = Field(default_factory=list)  # CORS is off while this is empty
    allowed_methods: StringList = Field(default_factory=lambda: ["*"])
    allowed_headers: StringList = Field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    root_path: str = ""
    enable_request_id_headers: bool = False
    enable_log_requests: bool = False
    max_log_len: int = Field(0, ge=0)  # prompt characters in request log lines (0: none)
    # Slow and oversized requests (slowloris): clusterkit.server_limits and clusterkit.asgi.
    header_timeout: float = Field(30.0, gt=0)  # seconds to send a request head; then 408, closed
    body_timeout: float = Field(60.0, gt=0)  # seconds to send a whole body after its head; then 408
    max_header_bytes: ByteSize = Field(64 * 2**10, gt=0)  # a larger request head: 431, closed

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for o in v:
            if o != "*" and not _ORIGIN.match(o):
                raise ValueError(f"{o!r} is not an origin (scheme://host[:port], no path, or *)")
        return v

    @field_validator("allowed_methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        for m in v:
            if m != "*" and not (m.isascii() and m.isalpha()):
                raise ValueError(f"{m!r} is not an HTTP method (e.g. GET, POST, or *)")
        return [m.upper() for m in v]

    @field_validator("allowed_headers")
    @classmethod
    def _headers(cls, v: list[str]) -> list[str]:
        for h in v:
            if not _TOKEN.match(h):
                raise ValueError(f"{h!r} is not a header name (or *)")
        return v

    @field_validator("root_path")
    @classmethod
    def _root_path(cls, v: str) -> str:
        v = v.rstrip("/")
        if v and not _ROOT_PATH.match(v):
            raise ValueError(f"{v!r} is not a URL path prefix (e.g. /llm)")
        return v

    @property
    def cors(self) -> bool:
        return bool(self.allowed_origins)


def add_server_flags(ap: argparse.ArgumentParser) -> None:
    """vLLM's flags for :class:`ServerOptions`. Values are checked by the settings model, so a bad
    one ends the process with the same one-line reason as a bad config.yaml value."""
    many = "repeatable, or a JSON list"
    ap.add_argument("--allowed-origins", dest="allowed_origins", action="append",
                    help=f"CORS: origins allowed (scheme://host[:port] or *; {many}); none: CORS off")
    ap.add_argument("--allowed-methods", dest="allowed_methods", action="append",
                    help=f"CORS: methods allowed ({many}; default *)")
    ap.add_argument("--allowed-headers", dest="allowed_headers", action="append",
                    help=f"CORS: request headers allowed ({many}; default *)")
    ap.add_argument("--allow-credentials", dest="allow_credentials", action="store_true", default=None,
                    help="CORS: allow credentials")
    ap.add_argument("--root-path", dest="root_path", help="path prefix when served behind a proxy (e.g. /llm)")
    ap.add_argument("--enable-request-id-headers", dest="enable_request_id_headers", action="store_true",
                    default=None, help="answer with X-Request-Id: the client's, or a new one")
    ap.add_argument("--enable-log-requests", dest="enable_log_requests", action="store_true", default=None,
                    help="log one line per request")
    ap.add_argument("--max-log-len", dest="max_log_len",
                    help="prompt characters shown in request log lines (default 0: none)")


def with_server_options(app, opts: ServerOptions, expose: tuple[str, ...] = ()):
    """``app`` wrapped in the layers ``opts`` turns on (outermost first: root path, CORS, request
    ids); ``app`` itself when none is on. ``expose``: response headers a browser may read."""
    from starlette.middleware.cors import CORSMiddleware

    if opts.enable_request_id_headers:
        app = RequestIdHeaders(app)
        expose = (*expose, "X-Request-Id")
    if opts.cors:
        app = CORSMiddleware(app, allow_origins=opts.allowed_origins, allow_methods=opts.allowed_methods,
                             allow_headers=opts.allowed_headers, allow_credentials=opts.allow_credentials,
                             expose_headers=expose)
    if opts.root_path:
        app = RootPath(app, opts.root_path)
    return app


class RootPath:
    """Serves an app below ``prefix`` (``--root-path``). A proxy may pass the prefix on or strip it
    (uvicorn's own root_path assumes it strips it, and would then double a passed-on prefix), so
    both are served, as vLLM does. The scope is left in ASGI's form: ``root_path`` is the prefix and
    ``path`` starts with it; raw-ASGI routes match the prefixed paths, FastAPI strips it itself."""

    def __init__(self, app, prefix: str):
        self.app, self.prefix, self.raw_prefix = app, prefix, prefix.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            p, path = self.prefix, scope["path"]
            if not (path.startswith(p) and (len(path) == len(p) or path[len(p)] == "/")):
                scope["path"] = p + path
                if scope.get("raw_path") is not None:
                    scope["raw_path"] = self.raw_prefix + scope["raw_path"]
            scope["root_path"] = p
        await self.app(scope, receive, send)


def client_request_id(headers) -> str | None:
    """The client's ``X-Request-Id`` from raw ASGI headers, if it is one we can pass on and echo
    (visible ASCII, at most 256 bytes); None otherwise."""
    for k, v in headers:
        if k == b"x-request-id":
            v = v.strip()
            if 0 < len(v) <= MAX_REQUEST_ID_BYTES and all(0x20 <= c < 0x7f for c in v):
                return v.decode("ascii")
            return None
    return None


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_of(scope) -> str:
    """The id of a request: the one :class:`RequestIdHeaders` settled on, else the client's, else
    a new one (for log lines when ids are not sent back)."""
    return scope.get(REQUEST_ID) or client_request_id(scope["headers"]) or new_request_id()


class RequestIdHeaders:
    """``--enable-request-id-headers``: every response carries ``X-Request-Id``, the client's when
    it sent one, else a new uuid hex; inner layers find it under ``scope[REQUEST_ID]``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = client_request_id(scope["headers"]) or new_request_id()
        scope[REQUEST_ID] = rid
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                # A new message: senders may pass the same dict for every response.
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def package_version() -> str:
    """This package's installed version (``GET /version``)."""
    try:
        return metadata.version("llm-cluster")
    except metadata.PackageNotFoundError:
        return "unknown"
