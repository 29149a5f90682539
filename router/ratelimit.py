"""Per-key rate limits (requests/min and tokens/min) as Redis token buckets shared by replicas."""

from __future__ import annotations

import hashlib
import time

import redis.asyncio as aioredis

# KEYS[1] bucket; ARGV: capacity, refill per second, cost, now. Returns {allowed, retry_after_ms}.
_BUCKET = """
local cap = tonumber(ARGV[1]); local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3]); local now = tonumber(ARGV[4])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or cap; local ts = tonumber(b[2]) or now
tokens = math.min(cap, tokens + (now - ts) * rate)
local allowed = 0; local wait = 0
if tokens >= cost then tokens = tokens - cost; allowed = 1
else wait = math.ceil((cost - tokens) / rate * 1000) end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(cap / rate * 1000) + 1000)
return {allowed, wait}
"""


class RateLimiter:
    """``requests_per_minute`` and ``tokens_per_minute`` per client key (0 = unlimited)."""

    def __init__(self, client: aioredis.Redis, requests_per_minute: int = 0, tokens_per_minute: int = 0):
        self.r = client
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self._script = client.register_script(_BUCKET)

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    async def check(self, api_key: str, tokens: int) -> float | None:
        """None if allowed, else seconds until a retry could pass."""
        ident = hashlib.sha256(api_key.encode()).hexdigest()[:16]  # never store the key itself
        now = time.time()
        for kind, per_min, cost in (("req", self.rpm, 1), ("tok", self.tpm, max(1, tokens))):
            if not per_min:
                continue
            if cost > per_min:
                return 60.0
            allowed, wait_ms = await self._script(keys=[f"llmc:rl:{ident}:{kind}"],
                                                  args=[per_min, per_min / 60.0, cost, now])
            if not allowed:
                return wait_ms / 1000.0
        return None
