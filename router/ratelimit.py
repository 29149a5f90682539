"""Per-key rate limits (requests/min and tokens/min) as Redis token buckets shared by replicas.

Both buckets of a key are checked and charged by one Lua script, so a request is admitted only
when both have room and a refused request costs nothing. The script reads the clock with Redis
``TIME``: every replica then refills from the same clock (replicas' own clocks differ, and one
ahead of the others would refill buckets early each time it follows them).
"""

from __future__ import annotations

import hashlib

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from clusterkit.errors import APIError

# KEYS: the buckets; ARGV: capacity, refill per second, cost for each bucket in turn.
# Returns {allowed (0/1), ms until the refused request could pass}.
_BUCKETS = """
if redis.replicate_commands then redis.replicate_commands() end  -- TIME before writes on Redis < 5
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local level, stamp, wait = {}, {}, 0
for i = 1, #KEYS do
  local cap, rate, cost = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local b = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local tokens = tonumber(b[1]) or cap
  local ts = math.min(tonumber(b[2]) or now, now)  -- a clock step back refills nothing
  tokens = math.min(cap, tokens + (now - ts) * rate)
  if tokens < cost then wait = math.max(wait, (cost - tokens) / rate) end
  level[i], stamp[i] = tokens, now
end
local allowed = 0
if wait == 0 then allowed = 1 end
for i = 1, #KEYS do
  local cap, rate, cost = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local tokens = level[i]
  if allowed == 1 then tokens = tokens - cost end
  redis.call('HSET', KEYS[i], 'tokens', string.format('%.17g', tokens), 'ts', string.format('%.6f', stamp[i]))
  redis.call('PEXPIRE', KEYS[i], math.ceil(cap / rate * 1000) + 1000)
end
return {allowed, math.ceil(wait * 1000)}
"""


class RateLimiter:
    """``requests_per_minute`` and ``tokens_per_minute`` per client key (0 = unlimited).

    A bucket holds at most one minute's allowance (its burst) and refills continuously, so over
    any window of ``T`` seconds a key is admitted at most ``limit * (1 + T / 60)``, however many
    replicas share the Redis."""

    def __init__(self, client: aioredis.Redis, requests_per_minute: int = 0, tokens_per_minute: int = 0):
        self.r = client
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self._script = client.register_script(_BUCKETS)

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    async def check(self, api_key: str, tokens: int) -> float | None:
        """None if allowed (and charged), else seconds until a retry could pass. A request that
        costs more tokens than a whole minute's allowance can never pass: 60 s, nothing charged.
        Redis unreachable: a retryable 503 (limits are never skipped)."""
        ident = hashlib.sha256(api_key.encode()).hexdigest()[:16]  # never store the key itself
        keys: list[str] = []
        args: list[float] = []
        for kind, per_min, cost in (("req", self.rpm, 1), ("tok", self.tpm, max(1, tokens))):
            if not per_min:
                continue
            if cost > per_min:
                return 60.0
            keys.append(f"llmc:rl:{ident}:{kind}")
            args += [per_min, per_min / 60.0, cost]
        if not keys:
            return None
        try:
            allowed, wait_ms = await self._script(keys=keys, args=args)
        except (RedisError, OSError) as e:
            raise APIError(503, f"rate limits cannot be checked: redis unreachable ({type(e).__name__})",
                           None, "rate_limiter_unavailable", [(b"retry-after", b"1")]) from None
        return None if allowed else wait_ms / 1000.0
