"""RateLimiter against a local aiohttp server that records when each request arrives.

Timing assertions are one-sided (the limiter forces *at least* this much spacing), so a
slow, noisy machine can make the tests slower but not flaky.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from worker.ratelimit import Rate, RateLimiter
from worker.upstream import RetryPolicy, Upstream, open_upstream

NO_RETRY = RetryPolicy(attempts=1)


class Recorder:
    """Server side of the tests: arrival and end times, and the most requests in flight."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self.ends: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.sleep = 0.0
        # When set, a handler waits (up to 5 s) until this many requests are in flight.
        self.barrier: int | None = None
        self._all_in = asyncio.Event()
        self._arrived = asyncio.Condition()

    async def wait_arrivals(self, count: int) -> None:
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: len(self.arrivals) >= count), 5)

    async def handle(self, request: web.Request) -> web.Response:
        async with self._arrived:
            self.arrivals.append(time.monotonic())
            self._arrived.notify_all()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.barrier is not None:
                if self.in_flight >= self.barrier:
                    self._all_in.set()
                try:
                    await asyncio.wait_for(self._all_in.wait(), 5.0)
                except TimeoutError:
                    return web.Response(status=504, text="barrier not reached")
            sleep = float(request.query.get("sleep", self.sleep))
            await asyncio.sleep(sleep)
            return web.Response(text="ok")
        finally:
            self.in_flight -= 1
            self.ends.append(time.monotonic())


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def server(
    recorder: Recorder, aiohttp_server: Callable[[web.Application], Awaitable[TestServer]]
) -> TestServer:
    app = web.Application()
    app.router.add_get("/", recorder.handle)
    return await aiohttp_server(app)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with open_upstream(limiter=RateLimiter(Rate(calls=3, period=1.0)), retry=NO_RETRY) as up:
        yield up


def max_in_window(arrivals: list[float], period: float) -> int:
    """The most arrivals inside any half-open window [t, t + period)."""
    times = sorted(arrivals)
    return max(
        (sum(1 for u in times[i:] if u < t + period) for i, t in enumerate(times)), default=0
    )


async def test_at_most_three_per_window_and_in_flight(
    server: TestServer, recorder: Recorder, upstream: Upstream
) -> None:
    recorder.sleep = 0.2  # long enough that several calls would overlap without a limit
    url = str(server.make_url("/"))
    started = time.monotonic()
    responses = await asyncio.gather(*(upstream.request("GET", url) for _ in range(10)))
    elapsed = time.monotonic() - started

    assert [r.status for r in responses] == [200] * 10
    assert len(recorder.arrivals) == 10
    assert max_in_window(recorder.arrivals, 1.0) <= 3
    assert recorder.max_in_flight <= 3
    # Ten calls at three per second: the tenth cannot start before three full periods.
    first = min(recorder.arrivals)
    assert max(recorder.arrivals) - first >= 3.0
    assert elapsed >= 3.0


async def test_zero_calls_is_unlimited(server: TestServer, recorder: Recorder) -> None:
    # All ten must be in flight together for any of them to answer 200.
    recorder.barrier = 10
    limiter = RateLimiter(Rate(calls=0))
    async with open_upstream(limiter=limiter, retry=NO_RETRY) as up:
        url = str(server.make_url("/"))
        responses = await asyncio.gather(*(up.request("GET", url) for _ in range(10)))
    assert [r.status for r in responses] == [200] * 10
    assert recorder.max_in_flight == 10


async def test_configure_zero_on_one_key_is_unlimited(
    server: TestServer, recorder: Recorder, upstream: Upstream
) -> None:
    recorder.barrier = 6
    upstream.limiter.configure("free", Rate(calls=0))
    url = str(server.make_url("/"))
    responses = await asyncio.gather(
        *(upstream.request("GET", url, limit_key="free") for _ in range(6))
    )
    assert [r.status for r in responses] == [200] * 6


async def test_keys_are_independent(
    server: TestServer, recorder: Recorder, upstream: Upstream
) -> None:
    # Three calls on each of two keys: six in flight at once only if the keys do not share
    # permits (a shared limiter of three would leave the barrier waiting a whole period).
    recorder.barrier = 6
    url = str(server.make_url("/"))
    responses = await asyncio.gather(
        *(upstream.request("GET", url, limit_key=key) for key in ["a", "b"] * 3)
    )
    assert [r.status for r in responses] == [200] * 6
    assert recorder.max_in_flight == 6


async def test_slow_call_holds_its_permit(
    server: TestServer, recorder: Recorder, upstream: Upstream
) -> None:
    url = str(server.make_url("/"))

    async def slow() -> int:
        return (await upstream.request("GET", url, params={"sleep": "1.5"})).status

    slow_calls = [asyncio.create_task(slow()) for _ in range(3)]
    await recorder.wait_arrivals(3)
    fourth = await upstream.request("GET", url)

    assert fourth.status == 200
    assert await asyncio.gather(*slow_calls) == [200] * 3
    assert recorder.max_in_flight <= 3
    # The fourth call arrived only after a slow one had finished, not one period after
    # the slow ones started.
    fourth_arrival = recorder.arrivals[3]
    assert fourth_arrival >= min(recorder.ends[:3])
    assert fourth_arrival - recorder.arrivals[0] >= 1.5


async def test_permit_held_one_period_after_a_fast_call() -> None:
    limiter = RateLimiter(Rate(calls=1, period=0.3, margin=0.0))
    loop = asyncio.get_running_loop()
    starts: list[float] = []
    for _ in range(3):
        async with limiter.slot("k"):
            starts.append(loop.time())
    assert starts[1] - starts[0] >= 0.3
    assert starts[2] - starts[1] >= 0.3


@pytest.mark.parametrize(
    ("calls", "period", "margin"), [(-1, 1.0, 0.0), (3, 0.0, 0.0), (3, 1.0, -0.1)]
)
def test_bad_rate_is_refused(calls: int, period: float, margin: float) -> None:
    with pytest.raises(ValueError, match="bad rate"):
        Rate(calls=calls, period=period, margin=margin)
