"""``python -m manager``: registry + router + dashboard on one port, with an embedded Redis by default."""

from __future__ import annotations

import argparse
import asyncio
import logging

from clusterkit import cli
from clusterkit.config import ConfigError, load_yaml
from router.cli import add_common_args, check_redis, flags_of
from router.settings import build_settings

log = logging.getLogger("manager")


def main(argv: list[str] | None = None) -> int:
    from clusterkit.registry import redis_client
    from router.app import entrypoint

    from .app import create_manager_app
    from .embedded_redis import EmbeddedRedis

    ap = argparse.ArgumentParser(prog="python -m manager", description=__doc__)
    add_common_args(ap)
    ap.add_argument("--data-dir", dest="data_dir", help="where the embedded Redis keeps its data")
    args = ap.parse_args(argv)
    cli.setup_logging(args.log_level)
    embedded = None
    try:
        section = dict(load_yaml(args.config).get("manager") or {})
        data_dir = args.data_dir or section.pop("data_dir", None) or ".llmc-data"
        s = build_settings(section, flags_of(args), defaults={"port": 8000}, where="manager")
        cli.check_port(s.host, s.port)
    except ConfigError as e:
        return cli.fail("manager", str(e))
    try:
        if not s.redis_url:
            embedded = EmbeddedRedis(data_dir).start()
            s.redis_url = embedded.url
        asyncio.run(check_redis(s.redis_url))
    except Exception as e:
        if embedded:
            embedded.stop()
        return cli.fail("manager", f"redis at {cli.redact_url(s.redis_url)} unreachable ({type(e).__name__}: {e})")
    if not s.worker_token:
        log.warning("no worker token: anyone who can reach this port can register workers")
    try:
        started = cli.serve(entrypoint(create_manager_app(s, redis_client(s.redis_url))), s.host, s.port,
                            limits=s)
    finally:
        if embedded:
            embedded.stop()
            log.info("embedded redis stopped")
    return 0 if started else cli.fail("manager", "server did not start")
