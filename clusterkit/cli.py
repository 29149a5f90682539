"""Process plumbing every command line shares: one-line failures, logging, port checks and
serving an ASGI app with uvicorn."""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import socket
import sys
from urllib.parse import urlsplit, urlunsplit

from .config import ConfigError


def fail(prog: str, reason: str) -> int:
    """Print ``prog: error: reason`` on stderr and return the exit status 1."""
    print(f"{prog}: error: {reason}", file=sys.stderr, flush=True)
    return 1


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (Redis URLs may carry one), for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per heartbeat or job run is noise, not news; our periodic jobs log their own
    # failures, so apscheduler's "skipped"/"missed" lines under load would only repeat them.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


def check_port(host: str, port: int) -> None:
    """ConfigError (the one-line reason) unless ``host:port`` can be listened on."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from e


def serve(app, host: str, port: int, keep_alive: float = 5.0, limits=None) -> bool:
    """Serve ``app`` until SIGINT/SIGTERM (a clean exit, status 0); False if it never started.
    ``limits`` (a :class:`~clusterkit.http_options.ServerOptions`): the request-head limits
    (``max_header_bytes``, ``header_timeout``) of :mod:`clusterkit.server_limits`; None: its defaults.

    Everything loaded before this call (modules, weights, tokenizers) lives as long as the
    process, so it is frozen out of the cyclic GC first: unfrozen, full collections under load
    paused serving for up to ~240 ms (p99 of one-token requests on a worker)."""
    import uvicorn

    class CleanExitServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM after a graceful shutdown; we exit 0 instead."""

        @contextlib.contextmanager
        def capture_signals(self):
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    from .server_limits import GuardedHttpToolsProtocol, guarded_protocol

    http = GuardedHttpToolsProtocol if limits is None else guarded_protocol(limits.max_header_bytes,
                                                                            limits.header_timeout)
    gc.collect()
    gc.freeze()
    server = CleanExitServer(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                            timeout_graceful_shutdown=10, timeout_keep_alive=keep_alive,
                                            http=http))
    server.run()
    return server.started
