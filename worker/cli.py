"""``python -m worker``: load the models, serve the OpenAI API, join the cluster."""

from __future__ import annotations

import argparse
import os

from clusterkit import cli
from clusterkit.config import ConfigError, load_yaml
from clusterkit.http_options import add_server_flags

from .config import build_config


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
    ap.add_argument("--enable-auto-tool-choice", dest="enable_auto_tool_choice", action="store_true",
                    default=None, help='tool_choice "auto" for every model (per model: config.yaml)')
    ap.add_argument("--tool-call-parser", dest="tool_call_parser", choices=["hermes", "llama3_json", "mistral"],
                    help="how tool calls are read from answers under \"auto\" (per model: config.yaml)")
    ap.add_argument("--trust-request-chat-template", dest="trust_request_chat_template", action="store_true",
                    default=None, help="let requests bring their own chat_template (templates are code)")
    ap.add_argument("--reasoning-parser", dest="reasoning_parser", choices=["qwen3", "deepseek_r1"],
                    help="split thinking into reasoning_content for every model (per model: config.yaml)")
    ap.add_argument("--generation-config", dest="generation_config",
                    help="auto (default): request defaults from each model's generation_config.json; "
                         "vllm: none; or a directory holding one")
    ap.add_argument("--served-model-name", dest="served_model_name", nargs="+", action="extend",
                    help="more names the one served model answers to (per model: config.yaml)")
    add_server_flags(ap)  # CORS, --root-path, request ids, request logs (vLLM's names)
    ap.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging(args.log_level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = build_config(load_yaml(args.config), vars(args))
        cli.check_port(cfg.host, cfg.port)
    except ConfigError as e:
        return cli.fail("worker", str(e))

    from engine.model_loader import ModelLoadError

    from .api import create_app, entrypoint
    from .registration import Registrar, registered_models
    from .vllm_manager import VLLMManager

    manager = VLLMManager(cfg)
    try:
        manager.load_all()
    except (ModelLoadError, ValueError) as e:
        return cli.fail("worker", str(e).splitlines()[0])
    registrar = None
    if cfg.manager_url:
        public = cfg.public_url or f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}"
        registrar = Registrar(cfg.manager_url, public, registered_models(manager.models.values()),
                              manager.load_report,
                              cfg.heartbeat_interval, cfg.worker_token)
    kv_publisher = None
    if registrar is not None and cfg.publishes_kv_events:
        from .kv_publisher import KVEventPublisher

        # Under the registrar's worker id; one feed per generation model, by its first name.
        engines = {name: m.async_engine for name, m in manager.models.items() if m.kind == "generate"}
        kv_publisher = KVEventPublisher(cfg.manager_url, registrar.worker_id, engines, cfg.worker_token,
                                        cfg.kv_events_interval)
    app = create_app(manager, cfg, registrar, kv_publisher)
    if not cli.serve(entrypoint(app), cfg.host, cfg.port, limits=cfg):
        return cli.fail("worker", f"server on {cfg.host}:{cfg.port} did not start")
    return 0
