"""A rate limiter that counts *arrivals*: never more than N requests in any window of one period.

Each key (an upstream account or host) gets a semaphore of N permits, so at most N of
this process's calls are in flight. A permit comes back one period (plus a small
margin) after its request actually *went out*, and not before the call ends. The HTTP
layer says when that was (`Permit.sent()`, from aiohttp's trace hooks); without it the
call's end stands in, which is later, so never too early. So a first call that spends
200 ms on DNS, TCP and TLS holds its permit 200 ms longer, and the server, which counts
arrivals, never sees N + 1 inside its window.

With a Redis client the window is also kept in Redis, one sorted set per key, so it
holds for every replica and across a leader hand-off: the new leader's first calls
count the old leader's last ones. Redis's own clock (`TIME`) orders the entries; our
clock only measures how long ago a request went out. If Redis fails or is slow, the
call goes on under the local window alone (see docs/ratelimit.md).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import metrics

log = logging.getLogger(__name__)

# A window is a sorted set: member -> the time (µs, Redis clock) until which it counts.
# The prelude of both scripts: `now` from Redis's clock, and `keep` to expire the key a
# second after its last entry stops counting. Scores go through string.format('%d'):
# Lua's tostring keeps only 14 digits.
_PRELUDE = """
local function keep(key, now)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIRE', key, math.ceil((tonumber(last[2]) - now) / 1000) + 1000)
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""

# KEYS: window. ARGV: limit, pending_us, member.
# Admit when fewer than `limit` entries still count: record `member`, counting for
# `pending_us` until its request is marked sent. 0 when admitted, else the µs until
# the oldest entry stops counting.
_ADMIT = (
    _PRELUDE
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], string.format('%d', now + tonumber(ARGV[2])), ARGV[3])
  keep(KEYS[1], now)
  return 0
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(first[2]) - now)
"""
)

# KEYS: window. ARGV: member, age_us, window_us.
# The request of `member` went out `age_us` ago: it counts until then + window.
_MARK = (
    _PRELUDE
    + """
local ends = now - tonumber(ARGV[2]) + tonumber(ARGV[3])
if ends <= now then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('ZADD', KEYS[1], string.format('%d', ends), ARGV[1])
keep(KEYS[1], now)
return 1
"""
)


@dataclass(frozen=True)
class Rate:
    """`calls` per `period` seconds; calls=0 means unlimited."""

    calls: int = 3
    period: float = 1.0
    margin: float = 0.03

    @classmethod
    def per_second(cls, rate: float) -> Rate:
        """A rate from calls per second: 3 -> 3 per 1 s, 0.5 -> 1 per 2 s, 0 -> unlimited."""
        if rate <= 0:
            return cls(calls=0)
        if rate == int(rate):
            return cls(calls=int(rate), period=1.0)
        return cls(calls=1, period=1.0 / rate)

    @property
    def window(self) -> float:
        """How long one request counts after it went out."""
        return self.period + self.margin

    def __post_init__(self) -> None:
        if self.calls < 0 or self.period <= 0 or self.margin < 0:
            raise ValueError(f"bad rate: {self.calls} calls per {self.period}s")


class Permit:
    """One call's permit. The HTTP layer calls `sent()` as its request goes out."""

    __slots__ = ("_loop", "sent_at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.sent_at: float | None = None

    def sent(self) -> None:
        """The request (its headers, or another chunk of its body) went out just now."""
        self.sent_at = self._loop.time()


class RateLimiter:
    """Per-key limiters created on first use with the rate given (or the default).

    `redis` + `prefix`: keep each key's window in Redis too, under
    `{prefix}ratelimit:{key}`, shared by every process with the same prefix. Each Redis
    call gives up after `redis_timeout`; after a failure Redis is left alone for
    `redis_retry` seconds and calls go on under the local window alone.
    """

    def __init__(
        self,
        default: Rate | None = None,
        *,
        redis: Redis | None = None,
        prefix: str = "worker:",
        redis_timeout: float = 0.5,
        redis_retry: float = 1.0,
    ) -> None:
        self.default = default or Rate()
        self.redis = redis
        self.prefix = prefix
        self.redis_timeout = redis_timeout
        self.redis_retry = redis_retry
        self._buckets: dict[str, tuple[Rate, asyncio.Semaphore]] = {}
        self._ids = (f"{uuid.uuid4().hex[:12]}:{n}" for n in itertools.count())
        self._redis_down_until = float("-inf")
        if redis is not None:
            self._admit = redis.register_script(_ADMIT)
            self._mark = redis.register_script(_MARK)

    def configure(self, key: str, rate: Rate) -> None:
        """Set the rate of one key (before its first call, or to replace it when idle)."""
        self._buckets[key] = (rate, asyncio.Semaphore(rate.calls or 1))

    def configure_once(self, key: str, rate: Rate) -> None:
        """Set the rate of a key unless it already has one (calls in flight keep theirs)."""
        if key not in self._buckets:
            self.configure(key, rate)

    def rate(self, key: str) -> Rate:
        """The rate `key` has, or will get on its first call."""
        return self._buckets[key][0] if key in self._buckets else self.default

    @asynccontextmanager
    async def slot(self, key: str, *, pending: float = 30.0) -> AsyncIterator[Permit]:
        """Hold a permit for one call to `key`; the body is the call.

        `pending`: the longest the request may take to go out (connection included);
        in Redis an unmarked entry counts that long plus one window, so a replica that
        dies mid-call blocks a permit no longer than that.
        """
        if key not in self._buckets:
            self.configure(key, self.default)
        rate, sem = self._buckets[key]
        loop = asyncio.get_running_loop()
        permit = Permit(loop)
        if rate.calls == 0:
            yield permit
            return
        asked = loop.time()
        await sem.acquire()
        try:
            member = await self._admit_shared(key, rate, pending + rate.window)
        except BaseException:
            sem.release()
            raise
        metrics.RATE_LIMIT_WAIT.labels(key).observe(loop.time() - asked)
        try:
            yield permit
        finally:
            sent = permit.sent_at if permit.sent_at is not None else loop.time()
            delay = sent + rate.window - loop.time()
            if delay > 0:
                loop.call_later(delay, sem.release)
            else:
                sem.release()
            if member is not None:
                await self._mark_shared(key, member, loop.time() - sent, rate.window)

    async def _admit_shared(self, key: str, rate: Rate, pending: float) -> str | None:
        """Wait for room in the Redis window; the entry's member, or None (local only)."""
        if self.redis is None or asyncio.get_running_loop().time() < self._redis_down_until:
            return None
        member = next(self._ids)
        poll = max(rate.window / 10, 0.001)  # an unmarked entry may free up sooner
        while True:
            try:
                async with asyncio.timeout(self.redis_timeout):
                    wait_us = int(
                        await self._admit(
                            keys=[self._key(key)], args=[rate.calls, _us(pending), member]
                        )
                    )
            except (RedisError, OSError, TimeoutError) as exc:
                self._redis_failed(key, exc)
                return None
            if wait_us <= 0:
                return member
            await asyncio.sleep(min(wait_us / 1e6, poll))

    async def _mark_shared(self, key: str, member: str, age: float, window: float) -> None:
        """Record when the request went out; on failure its entry counts until it expires."""
        try:
            async with asyncio.timeout(self.redis_timeout):
                await self._mark(keys=[self._key(key)], args=[member, _us(age), _us(window)])
        except (RedisError, OSError, TimeoutError) as exc:
            self._redis_failed(key, exc)

    def _redis_failed(self, key: str, exc: BaseException) -> None:
        metrics.RATE_LIMIT_REDIS_ERRORS.inc()
        loop = asyncio.get_running_loop()
        if loop.time() >= self._redis_down_until:
            log.warning(
                "rate limit for %s: Redis failed (%s); local window only for %.1fs",
                key,
                type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}",
                self.redis_retry,
            )
        self._redis_down_until = loop.time() + self.redis_retry

    def _key(self, key: str) -> str:
        return f"{self.prefix}ratelimit:{key}"


def _us(seconds: float) -> int:
    return max(0, round(seconds * 1_000_000))
