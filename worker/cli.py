"""``python -m worker``: load the models, serve the OpenAI API, join the cluster."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import socket
import sys

from .config import ConfigError, build_config, load_yaml


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    ap.add_argument("--models", help="comma-separated [name=]source specs")
    ap.add_argument("--config", help="config.yaml (flags win over it)")
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    ap.add_argument("--manager-url", dest="manager_url")
    ap.add_argument("--public-url", dest="public_url", help="URL the router uses to reach us")
    ap.add_argument("--worker-token", dest="worker_token", help="shared secret (or env WORKER_TOKEN)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--heartbeat-interval", dest="heartbeat_interval", type=float)
    ap.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"))
    return ap.parse_args(argv)


def _server_class():
    import contextlib
    import signal

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

    return CleanExitServer


def fail(reason: str) -> int:
    print(f"worker: error: {reason}", file=sys.stderr, flush=True)
    return 1


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from e


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "apscheduler"):  # one line per heartbeat is noise, not news
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = build_config(load_yaml(args.config), vars(args))
        _check_port(cfg.host, cfg.port)
    except (ConfigError, ValueError) as e:
        return fail(str(e))

    import uvicorn

    from engine.model_loader import ModelLoadError

    CleanExitServer = _server_class()

    from .api import create_app, entrypoint
    from .registration import Registrar
    from .vllm_manager import VLLMManager

    manager = VLLMManager(cfg)
    try:
        manager.load_all()
    except (ModelLoadError, ValueError) as e:
        return fail(str(e).splitlines()[0])
    registrar = None
    if cfg.manager_url:
        public = cfg.public_url or f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}"
        models = [{"name": m.name, "kind": m.kind, "max_model_len": m.max_model_len}
                  for m in manager.models.values()]
        registrar = Registrar(cfg.manager_url, public, models, manager.load_report,
                              cfg.heartbeat_interval, cfg.worker_token)
    app = create_app(manager, cfg, registrar)
    # Everything loaded so far (weights' modules, tokenizers, transformers' import graph) lives as
    # long as the process. Freezing it keeps the cyclic GC from rescanning it: unfrozen, full
    # collections under load paused serving for up to ~240 ms (p99 of one-token requests).
    gc.collect()
    gc.freeze()
    server = CleanExitServer(uvicorn.Config(entrypoint(app), host=cfg.host, port=cfg.port, log_level="warning",
                                           timeout_graceful_shutdown=10, access_log=False))
    server.run()
    return 0 if server.started else fail(f"server on {cfg.host}:{cfg.port} did not start")
