"""Manager and router start-up failures: non-zero exit with a one-line reason."""

import socket
import subprocess
import sys

from procs import ROOT, free_port


def run(*args, timeout=60):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_router_and_manager_exit_when_redis_is_unreachable():
    # the URL's password never reaches the message (stderr ends up in logs)
    dead = f"redis://:pw-not-for-logs@127.0.0.1:{free_port()}/0"
    for prog in ("router", "manager"):
        r = run("-m", prog, "--redis-url", dead, "--host", "127.0.0.1", "--port", str(free_port()))
        assert r.returncode == 1, r.stderr
        lines = [x for x in r.stderr.splitlines() if x.startswith(f"{prog}: error:")]
        assert len(lines) == 1 and "unreachable" in lines[0] and ":***@127.0.0.1" in lines[0]
        assert "pw-not-for-logs" not in r.stderr + r.stdout


def test_router_requires_redis_url_and_manager_refuses_busy_port(tmp_path):
    r = run("-m", "router", "--port", str(free_port()))
    assert r.returncode == 1 and "router: error: --redis-url is required" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run("-m", "manager", "--host", "127.0.0.1", "--port", str(s.getsockname()[1]),
                "--data-dir", str(tmp_path / "d"))
    assert r.returncode == 1 and "manager: error: cannot listen on 127.0.0.1" in r.stderr
