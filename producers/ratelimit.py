"""Per-tenant token buckets in Redis, shared by every gateway replica.

One Lua script refills and takes atomically on the Redis server's clock, so replicas never race
and never disagree about time.
"""

from __future__ import annotations

import math

import redis.asyncio as aioredis

from shared.config import RateLimit

TAKE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) / 1000 * rate)
local allowed, retry_ms = 0, 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  retry_ms = math.ceil((cost - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, retry_ms}
"""


class RateLimiter:
    def __init__(self, client: aioredis.Redis) -> None:
        self._take = client.register_script(TAKE)

    async def take(self, tenant: str, bucket: str, limit: RateLimit, cost: int = 1) -> int | None:
        """None when allowed; otherwise whole seconds to wait before retrying (for Retry-After)."""
        allowed, retry_ms = await self._take(keys=[f"autoglm:ratelimit:{tenant}:{bucket}"],
                                       args=[limit.rate_per_s, limit.burst, cost])
        return None if allowed else max(1, math.ceil(int(retry_ms) / 1000))
