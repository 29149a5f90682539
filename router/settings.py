"""Settings shared by the router replica and the manager's embedded router."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class RouterSettings:
    host: str = "0.0.0.0"
    port: int = 8001
    redis_url: str | None = None
    worker_token: str | None = None
    api_keys: list[str] = field(default_factory=list)
    policy: str = "least_load"
    heartbeat_ttl: float = 15.0
    requests_per_minute: int = 0  # per client key; 0 = unlimited
    tokens_per_minute: int = 0
    max_attempts: int = 3
    resync_interval: float = 2.0
    prefix_index_size: int = 100_000
    max_body_bytes: int = 32 * 2**20

    def apply_env(self, env=os.environ) -> "RouterSettings":
        if env.get("WORKER_TOKEN") and not self.worker_token:
            self.worker_token = env["WORKER_TOKEN"]
        if env.get("ROUTER_API_KEYS") and not self.api_keys:
            self.api_keys = [k.strip() for k in env["ROUTER_API_KEYS"].split(",") if k.strip()]
        return self
