"""The worker's side of the registry protocol, against a small real HTTP stand-in manager."""

from __future__ import annotations

import threading
import time

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from procs import free_port, start_worker


class StandInManager:
    """A real HTTP server speaking SPEC §3's registry endpoints, recording every call."""

    def __init__(self, token: str):
        self.calls: list[tuple[str, str, dict | None, str]] = []
        self.known: set[str] = set()
        self.mode = "ok"  # ok | forget | down
        app = FastAPI()

        def auth_ok(req: Request) -> bool:
            return req.headers.get("authorization") == f"Bearer {token}"

        @app.post("/workers")
        async def register(req: Request):
            body = await req.json()
            self.calls.append(("register", body["id"], body, req.headers.get("authorization", "")))
            if not auth_ok(req):
                return JSONResponse({"error": {"message": "bad token"}}, status_code=401)
            if self.mode == "down":
                return JSONResponse({"error": {"message": "down"}}, status_code=503)
            self.known.add(body["id"])
            return {"id": body["id"]}

        @app.post("/workers/{wid}/heartbeat")
        async def heartbeat(wid: str, req: Request):
            body = await req.json()
            self.calls.append(("heartbeat", wid, body, req.headers.get("authorization", "")))
            if self.mode == "down":
                return JSONResponse({"error": {"message": "down"}}, status_code=503)
            if self.mode == "forget":
                self.known.discard(wid)
                self.mode = "ok"
            if wid not in self.known:
                return JSONResponse({"error": {"message": "unknown worker"}}, status_code=404)
            return {"ok": True}

        @app.delete("/workers/{wid}")
        async def deregister(wid: str, req: Request):
            self.calls.append(("deregister", wid, None, req.headers.get("authorization", "")))
            self.known.discard(wid)
            return {"ok": True}

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)

    def kinds(self) -> list[str]:
        return [c[0] for c in self.calls]

    def wait_for(self, pred, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(0.05)
        raise TimeoutError(f"condition not met; calls: {self.kinds()}")


def test_register_heartbeat_reregister_backoff_deregister(model_dir, minilm_dir, tmp_path):
    token = "tok-9f8e7d"
    with StandInManager(token) as mgr:
        proc, url = start_worker(
            tmp_path, f"chat={model_dir / 'tiny-qwen2'},emb={minilm_dir}",
            "--manager-url", f"http://127.0.0.1:{mgr.port}", "--public-url", "http://gpu-box.example:18000",
            "--heartbeat-interval", "0.3", env={"WORKER_TOKEN": token},
            ready_headers={"Authorization": f"Bearer {token}"})
        try:
            mgr.wait_for(lambda: "register" in mgr.kinds())
            _, wid, body, auth = mgr.calls[0]
            assert auth == f"Bearer {token}"
            assert body["url"] == "http://gpu-box.example:18000"  # public URL, not the bind address
            chat, emb = body["models"]
            # KV-aware routing's fields on the generation model (clusterkit/kv_wire.py), none on the other
            assert {k: chat.pop(k) is not None for k in ("kv_block_size", "kv_root", "tokenizer_digest")} == \
                {"kv_block_size": True, "kv_root": True, "tokenizer_digest": True}
            assert chat == {"name": "chat", "kind": "generate", "max_model_len": 1024}
            assert emb == {"name": "emb", "kind": "embed", "max_model_len": 256}
            mgr.wait_for(lambda: mgr.kinds().count("heartbeat") >= 2)
            hb = next(c for c in mgr.calls if c[0] == "heartbeat")
            assert hb[1] == wid and set(hb[2]["load"]) == {"chat", "emb"}
            assert {"num_running", "num_waiting", "kv_cache_usage"} <= set(hb[2]["load"]["chat"])

            # The manager forgets us (e.g. Redis restarted): 404 -> register again, same id.
            mgr.mode = "forget"
            mgr.wait_for(lambda: mgr.kinds().count("register") >= 2)
            assert [c[1] for c in mgr.calls if c[0] == "register"] == [wid, wid]

            # Manager down: the worker backs off and keeps serving.
            mgr.mode = "down"
            n0 = len(mgr.calls)
            time.sleep(2.5)
            failed = len(mgr.calls) - n0
            # Past the TTL (0.9 s: 3 intervals, the stand-in names none) retries back off to half
            # the TTL, every other tick: at most 6 attempts where the cadence would make 8.
            assert 1 <= failed <= 6, f"{failed} attempts in 2.5s at a 0.3s interval: no backoff"
            r = httpx.post(f"{url}/v1/completions", json={"model": "chat", "prompt": "hi", "max_tokens": 2},
                           headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200
            mgr.mode = "ok"
            mgr.wait_for(lambda: mgr.calls[-1][0] == "heartbeat" and mgr.mode == "ok", timeout=30)
        finally:
            code = proc.stop()
        assert code == 0
        assert mgr.kinds()[-1] == "deregister" and mgr.calls[-1][1] == wid
        assert token not in proc.log()  # secrets are never logged


def test_worker_without_manager_runs_standalone(model_dir, tmp_path):
    proc, url = start_worker(tmp_path, f"{model_dir / 'tiny-llama'}")
    try:
        r = httpx.post(f"{url}/v1/completions", json={"model": str(model_dir / "tiny-llama"),
                                                      "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        assert proc.stop() == 0
    assert "registered" not in proc.log()
