"""Benchmark the rate limiter against a local server that records when requests arrive.

Run `.venv/bin/python bench/ratelimit.py [--calls 60] [--concurrency 10] [--redis URL]`: the
calls go through Upstream with the default Rate (keyed by host; with `--redis`, the window is
kept in that Redis as in production), then through a bare aiohttp loop with no limiter.
Exits 1 if more than `Rate.calls` requests ever arrived inside one period.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from redis.asyncio import Redis

from worker.ratelimit import Rate, RateLimiter
from worker.sandbox import max_in_window
from worker.upstream import open_upstream

ARRIVALS = web.AppKey("arrivals", list[float])


@dataclass(frozen=True)
class Result:
    calls: int
    elapsed: float
    max_in_window: int
    sustained: float  # over whole windows: (calls - Rate.calls) / span
    spacing: float  # mean gap between arrival i and arrival i + Rate.calls


async def record(request: web.Request) -> web.Response:
    request.app[ARRIVALS].append(time.monotonic())
    return web.Response(text="{}", content_type="application/json")


async def drive(calls: int, concurrency: int, call: Callable[[], Awaitable[int]]) -> float:
    """Run `calls` calls from `concurrency` callers; returns the elapsed seconds."""
    todo = iter(range(calls))

    async def caller() -> None:
        for _ in todo:  # shared iterator: each call is taken by exactly one caller
            status = await call()
            if status != 200:
                raise RuntimeError(f"server answered HTTP {status}")

    started = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        for i in range(concurrency):
            tg.create_task(caller(), name=f"caller-{i}")
    return time.monotonic() - started


def summarise(arrivals: list[float], elapsed: float, rate: Rate) -> Result:
    times = sorted(arrivals)
    span = times[-1] - times[0]
    # Arrivals come in bursts of `calls`: counting whole bursts has no edge effect.
    sustained = (len(times) - rate.calls) / span if span > 0 else float("inf")
    gaps = [b - a for a, b in zip(times, times[rate.calls :], strict=False)]
    spacing = sum(gaps) / len(gaps) if gaps else 0.0
    return Result(len(times), elapsed, max_in_window(times, rate.period), sustained, spacing)


async def run(
    rate: Rate, calls: int, concurrency: int, redis: Redis | None
) -> tuple[Result, Result]:
    app = web.Application()
    app[ARRIVALS] = []
    app.router.add_get("/", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        url = f"http://127.0.0.1:{port}/"

        limiter = RateLimiter(rate, redis=redis, prefix=f"bench:{time.time_ns()}:")
        async with open_upstream(limiter=limiter) as upstream:

            async def limited() -> int:
                return (await upstream.request("GET", url)).status

            elapsed = await drive(calls, concurrency, limited)
        with_limit = summarise(app[ARRIVALS], elapsed, rate)

        app[ARRIVALS].clear()
        async with aiohttp.ClientSession() as session:

            async def bare() -> int:
                async with session.get(url) as resp:
                    await resp.read()
                    return resp.status

            elapsed = await drive(calls, concurrency, bare)
        without_limit = summarise(app[ARRIVALS], elapsed, rate)
    finally:
        await runner.cleanup()
    return with_limit, without_limit


async def measure(rate: Rate, args: argparse.Namespace) -> tuple[Result, Result]:
    if not args.redis:
        return await run(rate, args.calls, args.concurrency, None)
    redis = Redis.from_url(args.redis, socket_timeout=5, socket_connect_timeout=5)
    try:
        return await run(rate, args.calls, args.concurrency, redis)
    finally:
        await redis.aclose()


def report(title: str, result: Result, rate: Rate) -> None:
    ceiling = rate.calls / (rate.period + rate.margin)
    rows = [
        ("total calls", f"{result.calls}"),
        ("elapsed", f"{result.elapsed:.2f} s"),
        (f"most arrivals in any {rate.period:g} s", f"{result.max_in_window} (limit {rate.calls})"),
        (f"sustained (calls-{rate.calls})/span", f"{result.sustained:.2f} /s"),
        (f"ceiling {rate.calls}/({rate.period:g}+{rate.margin:g})", f"{ceiling:.2f} /s"),
        ("sustained / ceiling", f"{result.sustained / ceiling:.3f}"),
        (f"mean gap, call i to i+{rate.calls}", f"{result.spacing:.3f} s"),
    ]
    print(title)
    for label, value in rows:
        print(f"  {label:<30} {value}")


def main() -> int:
    parser = argparse.ArgumentParser(description="Benchmark the upstream rate limiter.")
    parser.add_argument("--calls", type=int, default=60, help="calls per run (default 60)")
    parser.add_argument("--concurrency", type=int, default=10, help="concurrent callers")
    parser.add_argument("--redis", metavar="URL", help="keep the window in this Redis")
    args = parser.parse_args()
    if args.calls < 2 or args.concurrency < 1:
        parser.error("need --calls >= 2 and --concurrency >= 1")
    rate = Rate()
    with_limit, without_limit = asyncio.run(measure(rate, args))
    window = "Redis window" if args.redis else "local window"
    report(
        f"limited: Upstream, default Rate, by host, {window}, {args.concurrency} callers",
        with_limit,
        rate,
    )
    report(f"unlimited: bare aiohttp, {args.concurrency} callers", without_limit, rate)
    if with_limit.max_in_window > rate.calls:
        print(f"FAIL: {with_limit.max_in_window} arrivals in one {rate.period:g} s window")
        return 1
    print(f"OK: never more than {rate.calls} arrivals in any {rate.period:g} s window")
    return 0


if __name__ == "__main__":
    sys.exit(main())
