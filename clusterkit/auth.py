"""Bearer-token checks: one path for the raw-ASGI routes and the FastAPI routes of every process.

Secrets are only ever compared here, in constant time: both sides are hashed to fixed-length
digests first (``hmac.compare_digest`` alone still leaks the length of a key), and every allowed
key is compared, whichever matches.
"""

from __future__ import annotations

import hashlib
import hmac

from .errors import APIError


def bearer_of(headers) -> str:
    """The token of an ``Authorization: Bearer`` header in raw ASGI headers ("" if none)."""
    for k, v in headers:
        if k == b"authorization":
            s = v.decode("latin-1")
            return s[7:].strip() if s[:7].lower() == "bearer " else ""
    return ""


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def key_allowed(given: str, allowed: list[str]) -> bool:
    """Constant-time membership: the digest of ``given`` is compared with the digest of every key
    in ``allowed``, without stopping at a match (``given in allowed`` would stop at the first
    differing byte of each key and at the first match)."""
    g = _digest(given)
    ok = 0
    for a in allowed:
        ok |= hmac.compare_digest(g, _digest(a))
    return bool(ok)


def require_bearer(headers, allowed: list[str], message: str = "missing or invalid API key",
                   code: str = "invalid_api_key") -> str:
    """The caller's token when it is one of ``allowed`` (anything goes when ``allowed`` is empty:
    returns ""); else a 401. Neither the token nor the keys go into the error or any log."""
    if not allowed:
        return ""
    key = bearer_of(headers)
    if not key or not key_allowed(key, allowed):
        raise APIError(401, message, None, code)
    return key
