"""Settings of a routing replica, shared by ``python -m router`` and the manager's embedded router."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import ConfigDict, Field, ValidationError

from clusterkit.config import ByteSize, config_error, merge
from clusterkit.http_options import ServerOptions

Policy = Literal["least_load", "round_robin", "power_of_two", "prefix_affinity", "kv_aware"]
POLICIES: tuple[str, ...] = Policy.__args__


class RouterSettings(ServerOptions):
    """Every router setting with its default (documented in config.yaml); the HTTP server options
    (CORS, root path, request ids and logs) come from :class:`ServerOptions`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    host: str = "0.0.0.0"
    port: int = Field(8001, ge=0, le=65535)
    redis_url: str | None = None
    worker_token: str | None = Field(None, repr=False)  # secrets: never in a repr or log
    api_keys: list[str] = Field(default_factory=list, repr=False)
    policy: Policy = "least_load"
    heartbeat_ttl: float = Field(15.0, gt=0)
    requests_per_minute: int = Field(0, ge=0)  # per client key; 0 = unlimited
    tokens_per_minute: int = Field(0, ge=0)
    max_attempts: int = Field(3, ge=1)
    resync_interval: float = Field(2.0, gt=0)
    prefix_index_size: int = Field(100_000, ge=1)
    # kv_aware (router/kv_policy.py): a full-prompt cache hit is worth kv_hit_weight load units,
    # and a worker busier than the least-loaded one by more than kv_load_slack is never chosen.
    kv_hit_weight: float = Field(8.0, ge=0)
    kv_load_slack: float = Field(4.0, ge=0)
    kv_index_max_blocks: int = Field(2_000_000, ge=1)
    max_body_bytes: ByteSize = Field(32 * 2**20, gt=0)
    connect_timeout: float = Field(3.0, gt=0)
    # A non-streamed answer's head comes when it is complete, so this bounds whole non-streamed
    # requests too; a stream's first event counts as its first byte.
    first_byte_timeout: float = Field(300.0, gt=0)
    stream_idle_timeout: float = Field(120.0, gt=0)


def env_secrets(env=os.environ) -> dict:
    """Secrets from the environment (WORKER_TOKEN, ROUTER_API_KEYS comma-separated)."""
    out: dict = {}
    if env.get("WORKER_TOKEN"):
        out["worker_token"] = env["WORKER_TOKEN"]
    keys = [k.strip() for k in env.get("ROUTER_API_KEYS", "").split(",") if k.strip()]
    if keys:
        out["api_keys"] = keys
    return out


def build_settings(section: dict | None, flags: dict, defaults: dict | None = None,
                   where: str = "router", env=os.environ) -> RouterSettings:
    """Defaults < the file's section < environment secrets < flags."""
    try:
        return RouterSettings.model_validate(merge(defaults, section, env_secrets(env), flags))
    except ValidationError as e:
        raise config_error(e, where) from None
