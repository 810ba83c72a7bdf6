"""The window kept in Redis: shared by every limiter with the same prefix, so it holds
across a leader hand-off and for every replica; and a Redis that fails never hangs a call.

Each limiter has its own session, as two replicas would; the server records arrivals.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from worker.ratelimit import Rate, RateLimiter
from worker.sandbox import max_in_window
from worker.upstream import RetryPolicy, Upstream, open_upstream

NO_RETRY = RetryPolicy(attempts=1)
RATE = Rate(calls=3, period=1.0)


class Arrivals:
    def __init__(self) -> None:
        self.times: list[float] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.times.append(time.monotonic())
        return web.Response(text="{}")


@pytest.fixture
def arrivals() -> Arrivals:
    return Arrivals()


@pytest.fixture
async def url(
    arrivals: Arrivals, aiohttp_server: Callable[[web.Application], Awaitable[TestServer]]
) -> str:
    app = web.Application()
    app.router.add_get("/", arrivals.handle)
    server = await aiohttp_server(app)
    return str(server.make_url("/"))


async def calls(upstream: Upstream, url: str, count: int) -> None:
    responses = await asyncio.gather(
        *(upstream.request("GET", url, limit_key="acct") for _ in range(count))
    )
    assert [r.status for r in responses] == [200] * count


async def test_two_replicas_sharing_redis_never_exceed_the_limit_together(
    url: str, arrivals: Arrivals, redis: Redis, key_prefix: str
) -> None:
    async with (
        open_upstream(
            limiter=RateLimiter(RATE, redis=redis, prefix=key_prefix), retry=NO_RETRY
        ) as one,
        open_upstream(
            limiter=RateLimiter(RATE, redis=redis, prefix=key_prefix), retry=NO_RETRY
        ) as two,
    ):
        await asyncio.gather(calls(one, url, 6), calls(two, url, 6))

    assert len(arrivals.times) == 12
    assert max_in_window(arrivals.times, RATE.period) <= RATE.calls
    # The window's key expires by itself: nothing is left behind for good.
    ttl = await redis.pttl(f"{key_prefix}ratelimit:acct")
    assert -2 <= ttl <= 3000


async def test_new_leaders_first_calls_count_the_old_leaders_last(
    url: str, arrivals: Arrivals, redis: Redis, key_prefix: str
) -> None:
    # The old leader spends its whole budget, then goes (its limiter and session with it).
    async with open_upstream(
        limiter=RateLimiter(RATE, redis=redis, prefix=key_prefix), retry=NO_RETRY
    ) as old:
        await calls(old, url, 3)
    last_of_old = max(arrivals.times)
    first_of_old = min(arrivals.times)

    async with open_upstream(
        limiter=RateLimiter(RATE, redis=redis, prefix=key_prefix), retry=NO_RETRY
    ) as new:
        await calls(new, url, 3)

    new_arrivals = sorted(arrivals.times)[3:]
    assert new_arrivals[0] > last_of_old
    assert new_arrivals[0] - first_of_old >= RATE.period
    assert max_in_window(arrivals.times, RATE.period) <= RATE.calls


async def test_a_redis_that_does_not_answer_never_hangs_a_call(
    url: str, arrivals: Arrivals, private_redis: tuple[str, int]
) -> None:
    redis_url, pid = private_redis
    client = Redis.from_url(redis_url, socket_timeout=30, socket_connect_timeout=30)
    errors_before = REGISTRY.get_sample_value("worker_rate_limit_redis_errors_total") or 0.0
    limiter = RateLimiter(RATE, redis=client, prefix="t:", redis_timeout=0.2)
    os.kill(pid, signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        async with open_upstream(limiter=limiter, retry=NO_RETRY) as upstream:
            started = time.monotonic()
            await asyncio.wait_for(calls(upstream, url, 6), timeout=10)
            elapsed = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
        await client.aclose()

    # The local window still holds: 6 calls at 3 per second take a period and more.
    assert max_in_window(arrivals.times, RATE.period) <= RATE.calls
    assert RATE.period <= elapsed < 5.0
    errors = REGISTRY.get_sample_value("worker_rate_limit_redis_errors_total") or 0.0
    assert errors > errors_before


async def test_a_redis_that_is_gone_falls_back_to_the_local_window(
    url: str, arrivals: Arrivals, private_redis: tuple[str, int]
) -> None:
    redis_url, pid = private_redis
    os.kill(pid, signal.SIGKILL)
    client = Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
    limiter = RateLimiter(RATE, redis=client, prefix="t:", redis_timeout=0.5)
    try:
        async with open_upstream(limiter=limiter, retry=NO_RETRY) as upstream:
            await asyncio.wait_for(calls(upstream, url, 4), timeout=10)
    finally:
        await client.aclose()
    assert max_in_window(arrivals.times, RATE.period) <= RATE.calls


async def test_a_call_that_never_went_out_counts_from_its_end(
    redis: Redis, key_prefix: str
) -> None:
    # No HTTP layer marks the permit: the window counts from the end of the call,
    # later than any arrival could be, in this process and in the other.
    rate = Rate(calls=1, period=0.5)
    one = RateLimiter(rate, redis=redis, prefix=key_prefix)
    two = RateLimiter(rate, redis=redis, prefix=key_prefix)
    loop = asyncio.get_running_loop()
    async with one.slot("k"):
        await asyncio.sleep(0.3)
    ended = loop.time()
    async with two.slot("k"):
        admitted = loop.time()
    assert admitted - ended >= 0.5
