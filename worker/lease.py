"""The Redis lease: acquire with a fencing token, owner-checked renew and release.

The value stored under `{prefix}leader` is readable JSON (holder, token, since,
address), so `redis-cli GET worker:leader` and `PTTL` answer who leads and until when.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from redis.asyncio import Redis

# KEYS: leader, epoch. ARGV: holder, ttl_ms, since, address.
# Returns {1, value} when granted, {0, current value or false, pttl} otherwise.
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current then
  return {0, current, redis.call('PTTL', KEYS[1])}
end
local token = redis.call('INCR', KEYS[2])
local value = cjson.encode({holder = ARGV[1], token = token, since = ARGV[3], address = ARGV[4]})
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return {1, value}
"""

# KEYS: leader. ARGV: our value, ttl_ms. 1 if renewed, 0 if the lease is not ours.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: leader, channel. ARGV: our value. 1 if released (and announced), 0 if not ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""

# KEYS: epoch. ARGV: floor. Raise the token counter to at least `floor`; never lower it.
_RAISE_EPOCH = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
  return tonumber(ARGV[1])
end
return current
"""


@dataclass(frozen=True)
class Grant:
    """A lease we hold: the exact stored value is our proof of ownership."""

    holder: str
    token: int
    since: str
    address: str
    raw: bytes


@dataclass(frozen=True)
class Holder:
    """Who holds the lease right now, as read from Redis."""

    holder: str
    token: int
    since: str
    address: str
    ttl_ms: int

    FIELDS = ("holder", "token", "since", "address", "ttl_ms")

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}


class Lease:
    """Lease operations for one key prefix. Stateless: the caller keeps its `Grant`."""

    def __init__(self, redis: Redis, *, prefix: str = "worker:") -> None:
        self.redis = redis
        self.key = f"{prefix}leader"
        self.epoch_key = f"{prefix}leader:epoch"
        self.channel = f"{prefix}leader:released"
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._raise_epoch = redis.register_script(_RAISE_EPOCH)

    async def acquire(
        self, *, holder: str, ttl: float, address: str = ""
    ) -> tuple[Grant | None, int]:
        """Try once. Returns (grant, 0) on success, (None, pttl_ms) when someone holds it."""
        since = datetime.now(UTC).isoformat(timespec="milliseconds")
        reply = await self._acquire(
            keys=[self.key, self.epoch_key], args=[holder, _ms(ttl), since, address]
        )
        if int(reply[0]) == 1:
            raw = _as_bytes(reply[1])
            data = orjson.loads(raw)
            return Grant(holder, int(data["token"]), since, address, raw), 0
        pttl = int(reply[2]) if len(reply) > 2 else -2
        return None, pttl

    async def renew(self, grant: Grant, *, ttl: float) -> bool:
        """Extend our lease; False when it is no longer ours."""
        return int(await self._renew(keys=[self.key], args=[grant.raw, _ms(ttl)])) == 1

    async def release(self, grant: Grant) -> bool:
        """Drop our lease and tell followers at once; False when it was not ours."""
        return int(await self._release(keys=[self.key, self.channel], args=[grant.raw])) == 1

    async def raise_epoch(self, floor: int) -> int:
        """Make the next token exceed `floor` (after Redis lost the counter); returns it."""
        return int(await self._raise_epoch(keys=[self.epoch_key], args=[floor]))

    async def current(self) -> Holder | None:
        """Who leads now, or None."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(self.key)
            pipe.pttl(self.key)
            raw, pttl = await pipe.execute()
        if raw is None:
            return None
        data = orjson.loads(raw)
        return Holder(
            holder=str(data.get("holder", "")),
            token=int(data.get("token", 0)),
            since=str(data.get("since", "")),
            address=str(data.get("address", "")),
            ttl_ms=int(pttl),
        )


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
