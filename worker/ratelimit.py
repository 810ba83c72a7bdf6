"""A rate limiter that counts call *starts*: never more than N in any window of one period.

Each key (an upstream host or account) gets a semaphore of N permits. A permit is
taken before a call starts and given back one period (plus a small margin) after
that start, and not before the call ends. So at most N calls start in any window
of `period`, at most N are in flight, and under load the rate stays near N/period.
The margin covers network jitter: the server counts arrivals, not our starts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from . import metrics


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

    def __post_init__(self) -> None:
        if self.calls < 0 or self.period <= 0 or self.margin < 0:
            raise ValueError(f"bad rate: {self.calls} calls per {self.period}s")


class RateLimiter:
    """Per-key limiters created on first use with the rate given (or the default)."""

    def __init__(self, default: Rate | None = None) -> None:
        self.default = default or Rate()
        self._buckets: dict[str, tuple[Rate, asyncio.Semaphore]] = {}

    def configure(self, key: str, rate: Rate) -> None:
        """Set the rate of one key (before its first call, or to replace it when idle)."""
        self._buckets[key] = (rate, asyncio.Semaphore(rate.calls or 1))

    def configure_once(self, key: str, rate: Rate) -> None:
        """Set the rate of a key unless it already has one (calls in flight keep theirs)."""
        if key not in self._buckets:
            self.configure(key, rate)

    @asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[None]:
        """Hold a permit for one call to `key`; the body is the call."""
        if key not in self._buckets:
            self.configure(key, self.default)
        rate, sem = self._buckets[key]
        if rate.calls == 0:
            yield
            return
        loop = asyncio.get_running_loop()
        asked = loop.time()
        await sem.acquire()
        started = loop.time()
        metrics.RATE_LIMIT_WAIT.labels(key).observe(started - asked)
        try:
            yield
        finally:
            delay = started + rate.period + rate.margin - loop.time()
            if delay > 0:
                loop.call_later(delay, sem.release)
            else:
                sem.release()
