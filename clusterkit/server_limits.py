"""Limits on request heads that uvicorn's httptools protocol does not set itself.

uvicorn (with httptools, which every process here serves with) keeps reading a request head for
as long and as far as the client sends it: a 2 MB header line is buffered and handed to the app, and
a connection that sends half a request line, or nothing, is held open forever (slowloris). The
ASGI app only ever sees complete heads, so these limits live in the protocol: a head larger than
``max_header_bytes`` is answered 431 and the connection closed; a head not complete
``header_timeout`` seconds after the connection opened (or after the previous response ended) is
answered 408 and closed, or just closed when not one byte of it came. Bodies are the app's:
:func:`clusterkit.asgi.read_body` bounds them in size and time.

A refused connection is closed the way servers close on a client still sending (a "lingering
close"): the answer, then our end of the stream, then whatever still arrives is read and dropped
for :data:`LINGER` seconds before the socket closes, so the client reads the answer instead of a
connection reset.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .asgi import dumps
from .errors import error_body

LINGER = 2.0  # seconds a refused connection is drained before it closes


def _reply(status: int, reason: bytes, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 response in OpenAI's error shape that ends the connection."""
    body = dumps(error_body(status, message, None, code))
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, reason, len(body))) + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a size and a time limit on every request head (see the
    module docstring); :func:`guarded_protocol` makes one with given limits."""

    max_header_bytes = 64 * 2**10
    header_timeout = 30.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_bytes = 0
        self._awaiting_head = True  # bytes received now belong to a request head
        self._refused = False  # answered 431/408: everything still arriving is dropped
        self._head_timer = None
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._awaiting_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # A head still incomplete after this chunk: refused once it has grown past the limit (a
        # head completed by it is measured exactly in on_headers_complete).
        if self._awaiting_head and self._head_bytes > self.max_header_bytes and not self._refused:
            self._refuse_too_large()

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._awaiting_head, self._head_bytes = False, 0
        self._cancel_head_timer()
        if len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers) > self.max_header_bytes:
            self._refuse_too_large()
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        super().on_message_complete()
        self._awaiting_head = True  # what follows is the next request's head

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        busy = self.cycle is not None and not self.cycle.response_complete  # a response is under way
        if not self._awaiting_head or busy or self.transport.is_closing():
            return
        if self._head_bytes:
            self._refuse(_reply(408, b"Request Timeout", f"request head not received within "
                                                          f"{self.header_timeout:g} s", "request_timeout"))
        else:  # an idle connection: nothing was asked, nothing to answer
            self.transport.close()

    def _refuse_too_large(self) -> None:
        self._refuse(_reply(431, b"Request Header Fields Too Large",
                            f"request head exceeds {self.max_header_bytes} bytes", "request_header_too_large"))

    def _refuse(self, response: bytes) -> None:
        """Answer, then close lingering (see the module docstring)."""
        self._refused = True
        self._cancel_head_timer()
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a response is under way: an answer now would corrupt it
            return
        self.transport.write(response)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.flow.resume_reading()
            self.loop.call_later(LINGER, self.transport.close)
        else:
            self.transport.close()


def guarded_protocol(max_header_bytes: int, header_timeout: float) -> type[GuardedHttpToolsProtocol]:
    """A :class:`GuardedHttpToolsProtocol` class with these limits, for ``uvicorn.Config(http=...)``."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,),
                {"max_header_bytes": max_header_bytes, "header_timeout": header_timeout})
