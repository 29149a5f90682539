"""``python -m router``: a stateless routing replica on the shared Redis registry."""

from __future__ import annotations

import argparse
import asyncio
import os

from clusterkit import cli
from clusterkit.config import ConfigError, load_yaml
from clusterkit.http_options import add_server_flags

from .settings import POLICIES, RouterSettings, build_settings


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The flags the router and the manager share."""
    ap.add_argument("--config", help="config.yaml (flags win over it)")
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    ap.add_argument("--redis-url", dest="redis_url")
    ap.add_argument("--worker-token", dest="worker_token", help="shared secret (or env WORKER_TOKEN)")
    ap.add_argument("--api-key", dest="api_keys", action="append",
                    help="client key (repeatable; or env ROUTER_API_KEYS, comma-separated)")
    ap.add_argument("--policy", choices=POLICIES)
    ap.add_argument("--heartbeat-ttl", dest="heartbeat_ttl", type=float)
    ap.add_argument("--rate-limit-rpm", dest="requests_per_minute", type=int, help="requests/min per key")
    ap.add_argument("--rate-limit-tpm", dest="tokens_per_minute", type=int, help="tokens/min per key")
    add_server_flags(ap)  # CORS, --root-path, request ids, request logs (vLLM's names)
    ap.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"))


def flags_of(args: argparse.Namespace) -> dict:
    """The settings given on the command line."""
    return {k: v for k, v in vars(args).items() if k in RouterSettings.model_fields and v is not None}


async def check_redis(url: str) -> None:
    """Raises unless the Redis at ``url`` answers a PING."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(url, decode_responses=True, socket_connect_timeout=3)
    try:
        await client.ping()
    finally:
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    from clusterkit.registry import redis_client

    from .app import create_router_app, entrypoint

    ap = argparse.ArgumentParser(prog="python -m router", description=__doc__)
    add_common_args(ap)
    args = ap.parse_args(argv)
    cli.setup_logging(args.log_level)
    try:
        s = build_settings(load_yaml(args.config).get("router"), flags_of(args))
        if not s.redis_url:
            raise ConfigError("--redis-url is required (the registry the manager keeps)")
        cli.check_port(s.host, s.port)
    except ConfigError as e:
        return cli.fail("router", str(e))
    try:
        asyncio.run(check_redis(s.redis_url))
    except Exception as e:
        return cli.fail("router", f"redis at {cli.redact_url(s.redis_url)} unreachable ({type(e).__name__})")
    app = create_router_app(s, redis_client(s.redis_url))
    return 0 if cli.serve(entrypoint(app), s.host, s.port, limits=s) else cli.fail("router", "server did not start")
