"""Fetching and checking images named in chat content parts.

``data:`` URLs are always allowed; ``file://`` paths only under configured media directories;
http(s) only from hosts in ``allowed_domains``. Encoded size and decoded pixel count are capped
before an image is fully decoded.

An http(s) fetch never reaches a loopback, private, link-local, shared, multicast, reserved or
unspecified address (SSRF) unless the URL's host is listed *exactly* in ``allowed_domains``: a
host allowed only as a subdomain of a listed domain must resolve to public addresses only, so a
name under an allowed domain pointed at an internal address is refused. The host is parsed by
the same parser the request uses (httpx), resolved here, and every address it resolves to is
checked; the connection then goes to a checked address (pinned: a second lookup that answers
differently, DNS rebinding, is never made) while the Host header, TLS SNI and certificate check
still use the host name. Numeric host forms (``0x7f000001``, ``2130706433``, ``127.1``,
``[::ffff:127.0.0.1]``) resolve like any name and are checked by address; they are never matched
as subdomains. Redirects are not followed (a 3xx answer is a 400), proxies and ``.netrc`` from
the environment are ignored, and the whole fetch (resolution included) has one deadline.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

import httpx
from PIL import Image, UnidentifiedImageError

from clusterkit.errors import APIError

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""``(host, port) -> addresses`` (textual IPs); raises ``OSError`` when the name does not resolve."""


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for ``host`` (off the event loop), in its order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _tls_context() -> ssl.SSLContext:
    # certifi's roots, or SSL_CERT_FILE / SSL_CERT_DIR when the operator sets them; verification on.
    return httpx.create_ssl_context(trust_env=True)


@dataclass
class MediaPolicy:
    """Where images may come from and how big they may be. ``resolver`` is the one name lookup
    http(s) fetches make."""

    media_dirs: list[str] = field(default_factory=list)
    allowed_domains: list[str] = field(default_factory=list)
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 16_000_000
    fetch_timeout: float = 10.0  # the whole fetch: resolution, connection, headers and body
    resolver: Resolver = system_resolver
    tls: ssl.SSLContext = field(default_factory=_tls_context)


def _too_large(msg: str) -> APIError:
    return APIError(413, msg, "messages", "image_too_large")


def _bad(msg: str) -> APIError:
    return APIError(400, msg, "messages", "invalid_image")


def _not_allowed(msg: str) -> APIError:
    return APIError(400, msg, "messages", "image_url_not_allowed")


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
    raise _not_allowed("file:// images are only read from configured media directories")


# -- which hosts and addresses -------------------------------------------------------------------

# A last label of digits or 0x-hex makes a host an IPv4 address in some form (WHATWG URL,
# inet_aton): such hosts match only an allow-list entry spelled the same, never as a subdomain.
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def normalize_host(host: str) -> str:
    """The form hosts and allow-list entries are compared in: lower case, no trailing dot, no
    IPv6 brackets, IDNA (ASCII) for international names."""
    h = host.strip().lower().rstrip(".")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    try:
        return h.encode("idna").decode("ascii") if not h.isascii() else h
    except UnicodeError:
        return h


def _is_numeric(host: str) -> bool:
    if ":" in host:  # an IPv6 literal
        return True
    return bool(_NUMERIC_LABEL.match(host.rsplit(".", 1)[-1]))


def host_listing(host: str, allowed: list[str]) -> str | None:
    """How ``host`` is allow-listed: "exact" (listed itself: may resolve anywhere), "domain" (a
    subdomain of a listed domain: public addresses only) or None (not allowed)."""
    h = normalize_host(host)
    entries = [normalize_host(d) for d in allowed]
    if h and h in entries:
        return "exact"
    if h and not _is_numeric(h) and any(e and h.endswith("." + e) for e in entries):
        return "domain"
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries and may be routed to (mapped, NAT64, 6to4, Teredo)."""
    out = []
    if ip.ipv4_mapped is not None:
        out.append(ip.ipv4_mapped)
    if ip in _NAT64:
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        out.append(ip.sixtofour)
    if ip.teredo is not None:
        out.extend(ip.teredo)
    return out


def is_public_address(addr: str) -> bool:
    """True when ``addr`` is a globally routable unicast address: not loopback, private (10/8,
    172.16/12, 192.168/16, fc00::/7), shared (100.64/10), link-local (169.254/16, fe80::/10),
    multicast, reserved or unspecified, directly or through an IPv4 address it embeds."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return is_public_address(str(ip.ipv4_mapped))
    if not ip.is_global or ip.is_multicast or ip.is_private or ip.is_loopback or ip.is_link_local \
            or ip.is_reserved or ip.is_unspecified:
        return False
    return ip.version == 4 or all(is_public_address(str(v4)) for v4 in _embedded_ipv4(ip))


async def _addresses(url: httpx.URL, policy: MediaPolicy) -> list[str]:
    """The checked addresses to connect to for ``url``; a 400 when its host is not allowed or
    resolves (even in part) to an address it may not reach."""
    host = url.raw_host.decode("ascii")
    listing = host_listing(host, policy.allowed_domains)
    if listing is None:
        raise _not_allowed(f"fetching images from {host!r} is not allowed")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        addrs = await policy.resolver(host, port)
    except (OSError, UnicodeError) as e:
        raise _bad(f"could not resolve image host {host!r}") from e
    if not addrs:
        raise _bad(f"could not resolve image host {host!r}")
    if listing != "exact" and not all(is_public_address(a) for a in addrs):
        # The addresses themselves stay unsaid: they may be internal.
        raise _not_allowed(f"fetching images from {host!r} is not allowed: it resolves to a private, "
                           f"loopback or otherwise non-public address (only hosts listed exactly in "
                           f"allowed_image_domains may)")
    return addrs


# -- fetching ------------------------------------------------------------------------------------

def _parse_url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as e:
        raise _not_allowed(f"image URL is not valid: {e}") from e
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise _not_allowed("image URL must be http(s) with a host")
    return parsed


async def _send_pinned(client: httpx.AsyncClient, url: httpx.URL, addrs: list[str]) -> httpx.Response:
    """GET ``url`` over a connection to one of ``addrs`` (in order, the next if one refuses),
    with the URL's own Host header and, for https, its host name as SNI and certificate name."""
    headers = {"Host": url.netloc.decode("ascii"), "Accept-Encoding": "identity"}
    ext = {"sni_hostname": url.raw_host.decode("ascii")} if url.scheme == "https" else {}
    last: httpx.HTTPError | None = None
    for addr in addrs:
        request = client.build_request("GET", url.copy_with(host=addr.split("%", 1)[0]), headers=headers,
                                       extensions=ext)
        try:
            return await client.send(request, stream=True)
        except httpx.ConnectError as e:
            last = e
    assert last is not None
    raise last


async def _read_capped(r: httpx.Response, limit: int) -> bytes:
    declared = r.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(f"image exceeds {limit} bytes")
    buf = bytearray()
    # Raw bytes: identity was asked for, and a compressed answer is not decoded here (a small
    # gzip body could otherwise inflate past the limit within one chunk).
    async for chunk in r.aiter_raw():
        buf += chunk
        if len(buf) > limit:
            raise _too_large(f"image exceeds {limit} bytes")
    return bytes(buf)


async def _http_url(url: str, policy: MediaPolicy) -> bytes:
    target = _parse_url(url)
    try:
        async with asyncio.timeout(policy.fetch_timeout):
            addrs = await _addresses(target, policy)
            async with httpx.AsyncClient(timeout=policy.fetch_timeout, follow_redirects=False, trust_env=False,
                                         verify=policy.tls) as client:
                r = await _send_pinned(client, target, addrs)
                try:
                    if r.is_redirect:
                        raise _bad(f"image URL answered HTTP {r.status_code}; redirects are not followed")
                    if r.status_code != 200:
                        raise _bad(f"image URL answered HTTP {r.status_code}")
                    return await _read_capped(r, policy.max_image_bytes)
                finally:
                    await r.aclose()
    except TimeoutError as e:
        raise _bad(f"fetching the image took longer than {policy.fetch_timeout:g}s") from e
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
        raise _not_allowed(f"unsupported image URL scheme {scheme!r}")
    return decode_image(data, policy), data
