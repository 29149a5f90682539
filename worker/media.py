"""Fetching and checking images named in chat content parts.

``data:`` URLs are always allowed; ``file://`` paths only under configured media directories;
http(s) only for allow-listed domains (nothing else is ever fetched, redirects are not followed).
Encoded size and decoded pixel count are capped before an image is fully decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

import httpx
from PIL import Image, UnidentifiedImageError

from clusterkit.errors import APIError


@dataclass
class MediaPolicy:
    media_dirs: list[str] = field(default_factory=list)
    allowed_domains: list[str] = field(default_factory=list)
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 16_000_000
    fetch_timeout: float = 10.0


def _too_large(msg: str) -> APIError:
    return APIError(413, msg, "messages", "image_too_large")


def _bad(msg: str) -> APIError:
    return APIError(400, msg, "messages", "invalid_image")


def decode_image(data: bytes, policy: MediaPolicy) -> Image.Image:
    """Bytes -> RGB image, refusing oversize inputs before decoding the pixels."""
    if len(data) > policy.max_image_bytes:
        raise _too_large(f"image is {len(data)} bytes; the limit is {policy.max_image_bytes}")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except (UnidentifiedImageError, OSError) as e:
        raise _bad("image_url does not hold a decodable image") from e
    w, h = img.size
    if w * h > policy.max_image_pixels:
        raise _too_large(f"image is {w}x{h} = {w * h} pixels; the limit is {policy.max_image_pixels}")
    try:
        img.load()
    except (OSError, Image.DecompressionBombError) as e:
        raise _bad(f"image could not be decoded: {e}") from e
    return img.convert("RGB")


def _data_url(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise _bad("data: image URLs must be base64 encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad("image_url holds invalid base64") from e


def _file_url(url: str, policy: MediaPolicy) -> bytes:
    path = os.path.realpath(unquote(urlparse(url).path))
    for root in policy.media_dirs:
        root = os.path.realpath(root)
        if os.path.commonpath([root, path]) == root:
            if not os.path.isfile(path):
                raise _bad("file:// image not found")
            if os.path.getsize(path) > policy.max_image_bytes:
                raise _too_large(f"image file exceeds {policy.max_image_bytes} bytes")
            with open(path, "rb") as f:
                return f.read()
    raise APIError(400, "file:// images are only read from configured media directories", "messages",
                   "image_url_not_allowed")


def _domain_allowed(host: str, allowed: list[str]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == d.lower() or host.endswith("." + d.lower()) for d in allowed)


async def _http_url(url: str, policy: MediaPolicy) -> bytes:
    host = urlparse(url).hostname or ""
    if not _domain_allowed(host, policy.allowed_domains):
        raise APIError(400, f"fetching images from {host or url!r} is not allowed", "messages",
                       "image_url_not_allowed")
    try:
        async with httpx.AsyncClient(timeout=policy.fetch_timeout, follow_redirects=False) as c:
            async with c.stream("GET", url) as r:
                if r.status_code != 200:
                    raise _bad(f"image URL answered HTTP {r.status_code}")
                buf = bytearray()
                async for chunk in r.aiter_bytes():
                    buf += chunk
                    if len(buf) > policy.max_image_bytes:
                        raise _too_large(f"image exceeds {policy.max_image_bytes} bytes")
                return bytes(buf)
    except httpx.HTTPError as e:
        raise _bad(f"could not fetch image: {type(e).__name__}") from e


async def load_image(part: dict, policy: MediaPolicy) -> tuple[Image.Image, bytes]:
    """A content part of type image_url -> (image, encoded bytes)."""
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise _bad("image_url.url is required")
    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        data = _data_url(url)
    elif scheme == "file":
        data = _file_url(url, policy)
    elif scheme in ("http", "https"):
        data = await _http_url(url, policy)
    else:
        raise APIError(400, f"unsupported image URL scheme {scheme!r}", "messages", "image_url_not_allowed")
    return decode_image(data, policy), data
