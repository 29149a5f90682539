"""``python -m router``: a stateless routing replica on the shared Redis registry."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys

from .settings import RouterSettings


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", help="config.yaml (flags win over it)")
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    ap.add_argument("--redis-url", dest="redis_url")
    ap.add_argument("--worker-token", dest="worker_token", help="shared secret (or env WORKER_TOKEN)")
    ap.add_argument("--api-key", dest="api_keys", action="append",
                    help="client key (repeatable; or env ROUTER_API_KEYS, comma-separated)")
    ap.add_argument("--policy", choices=["least_load", "round_robin", "power_of_two", "prefix_affinity"])
    ap.add_argument("--heartbeat-ttl", dest="heartbeat_ttl", type=float)
    ap.add_argument("--rate-limit-rpm", dest="requests_per_minute", type=int, help="requests/min per key")
    ap.add_argument("--rate-limit-tpm", dest="tokens_per_minute", type=int, help="tokens/min per key")
    ap.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"))


def settings_from(section: dict, args: argparse.Namespace, defaults: dict | None = None) -> RouterSettings:
    """File section < environment secrets < flags."""
    from dataclasses import fields

    known = {f.name for f in fields(RouterSettings)}
    values = {**(defaults or {})}
    for k, v in (section or {}).items():
        if k in known:
            values[k] = v
    s = RouterSettings(**values)
    s.apply_env()
    for k in known:
        v = getattr(args, k, None)
        if v is not None:
            setattr(s, k, v)
    return s


def fail(prog: str, reason: str) -> int:
    print(f"{prog}: error: {reason}", file=sys.stderr, flush=True)
    return 1


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def serve(app, settings: RouterSettings) -> None:
    import uvicorn

    from worker.cli import _server_class

    from .app import entrypoint

    gc.collect()
    gc.freeze()  # startup objects live forever: keep full GC passes off the request path
    server = _server_class()(uvicorn.Config(entrypoint(app), host=settings.host, port=settings.port, log_level="warning",
                                            access_log=False, timeout_graceful_shutdown=10))
    server.run()


async def check_redis(url: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url, decode_responses=True, socket_connect_timeout=3)
    try:
        await client.ping()
    finally:
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    import asyncio

    from manager.registry import redis_client

    from worker.cli import _check_port
    from worker.config import ConfigError, load_yaml

    from .app import create_router_app

    ap = argparse.ArgumentParser(prog="python -m router", description=__doc__)
    add_common_args(ap)
    args = ap.parse_args(argv)
    setup_logging(args.log_level)
    try:
        s = settings_from(load_yaml(args.config).get("router", {}), args)
        if not s.redis_url:
            raise ConfigError("--redis-url is required (the registry the manager keeps)")
        _check_port(s.host, s.port)
        asyncio.run(check_redis(s.redis_url))
    except (ConfigError, ValueError) as e:
        return fail("router", str(e))
    except Exception as e:
        return fail("router", f"redis at {s.redis_url} unreachable ({type(e).__name__})")
    client = redis_client(s.redis_url)
    serve(create_router_app(s, client), s)
    return 0
