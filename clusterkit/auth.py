"""Bearer-token checks: one path for the raw-ASGI routes and the FastAPI routes of every process."""

from __future__ import annotations

import hmac

from .errors import APIError


def bearer_of(headers) -> str:
    """The token of an ``Authorization: Bearer`` header in raw ASGI headers ("" if none)."""
    for k, v in headers:
        if k == b"authorization":
            s = v.decode("latin-1")
            return s[7:].strip() if s[:7].lower() == "bearer " else ""
    return ""


def key_allowed(given: str, allowed: list[str]) -> bool:
    """Constant-time membership: every key is compared, whatever matches."""
    ok = False
    g = given.encode()
    for a in allowed:
        ok |= hmac.compare_digest(g, a.encode())
    return ok


def require_bearer(headers, allowed: list[str], message: str = "missing or invalid API key",
                   code: str = "invalid_api_key") -> str:
    """The caller's token when it is one of ``allowed`` (anything goes when ``allowed`` is empty:
    returns ""); else a 401."""
    if not allowed:
        return ""
    key = bearer_of(headers)
    if not key or not key_allowed(key, allowed):
        raise APIError(401, message, None, code)
    return key
