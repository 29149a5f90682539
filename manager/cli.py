"""``python -m manager``: registry + router + dashboard on one port, with an embedded Redis by default."""

from __future__ import annotations

import argparse
import asyncio
import logging

from router.cli import add_common_args, check_redis, fail, serve, settings_from, setup_logging

log = logging.getLogger("manager")


def main(argv: list[str] | None = None) -> int:
    from .registry import redis_client

    from worker.cli import _check_port
    from worker.config import ConfigError, load_yaml

    from .app import create_manager_app
    from .embedded_redis import EmbeddedRedis

    ap = argparse.ArgumentParser(prog="python -m manager", description=__doc__)
    add_common_args(ap)
    ap.add_argument("--data-dir", dest="data_dir", help="where the embedded Redis keeps its data")
    args = ap.parse_args(argv)
    setup_logging(args.log_level)
    embedded = None
    try:
        file_data = load_yaml(args.config)
        section = file_data.get("manager", {}) or {}
        s = settings_from(section, args, defaults={"port": 8000})
        data_dir = args.data_dir or section.get("data_dir") or ".llmc-data"
        _check_port(s.host, s.port)
        if not s.redis_url:
            embedded = EmbeddedRedis(data_dir).start()
            s.redis_url = embedded.url
        asyncio.run(check_redis(s.redis_url))
    except (ConfigError, ValueError) as e:
        return fail("manager", str(e))
    except Exception as e:
        if embedded:
            embedded.stop()
        return fail("manager", f"redis at {s.redis_url} unreachable ({type(e).__name__}: {e})")
    if not s.worker_token:
        log.warning("no worker token: anyone who can reach this port can register workers")
    client = redis_client(s.redis_url)
    try:
        serve(create_manager_app(s, client), s)
    finally:
        if embedded:
            embedded.stop()
            log.info("embedded redis stopped")
    return 0
