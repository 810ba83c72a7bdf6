"""Crash-failover and graceful hand-off times of real `worker run` processes.

Three replicas (TTL 2 s by default). Each crash trial `kill -9`s the leader and times
until another replica holds the lease; the limit it chases is the lease's remaining
TTL at the kill (nobody may take over before it expires), printed alongside as the
overhead past expiry. Each graceful trial SIGTERMs the leader and times until a new
holder; the hand-off cannot beat the leader's own release, timed too.

    .venv/bin/python bench/failover.py [--trials 10] [--ttl 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.cluster import Cluster, Receiver, current_holder, wait_new_holder
from worker import db

JOBS = """
[[jobs]]
name = "every-second"
kind = "http"
schedule = "* * * * * *"
misfire = "skip"
overlap = "allow"
[jobs.params]
url = "{url}"
"""


async def heard_release(pubsub: PubSub, timeout: float) -> float:
    """When the leader's release announcement arrives."""
    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
    if msg is None:
        raise TimeoutError("no release announced")
    return time.monotonic()


async def trial(cluster: Cluster, redis: Redis, *, crash: bool) -> tuple[float, float]:
    """One failover; returns (seconds to a new leader, seconds of the limit)."""
    prefix = cluster.key_prefix
    holder, token, _ = await wait_new_holder(redis, prefix, not_token=None, timeout=15)
    replica = cluster.by_id(holder)
    await asyncio.sleep(1.0)  # let it lead for a while, mid-renew-cycle
    pttl = await redis.pttl(f"{prefix}leader")
    pubsub = redis.pubsub()
    await pubsub.subscribe(f"{prefix}leader:released")
    await pubsub.get_message(timeout=1.0)
    released = asyncio.create_task(heard_release(pubsub, 15))
    began = time.monotonic()
    os.kill(replica.proc.pid, signal.SIGKILL if crash else signal.SIGTERM)
    if crash:
        _, _, took = await wait_new_holder(redis, prefix, not_token=token, timeout=15, step=0.002)
        limit = pttl / 1000
    else:
        _, _, took = await wait_new_holder(redis, prefix, not_token=token, timeout=15, step=0.002)
        limit = await released - began
    if crash:
        released.cancel()
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    replica.proc.wait(timeout=30)
    cluster.replicas.remove(replica)
    await cluster.wait_ready(cluster.start(f"{holder.split('.')[0]}.{uuid.uuid4().hex[:4]}"))
    return took - began, limit


def summary(name: str, values: list[float], limits: list[float], limit_name: str) -> None:
    over = [v - lim for v, lim in zip(values, limits, strict=True)]
    print(
        f"{name:<18} median {statistics.median(values):.3f}s  max {max(values):.3f}s   "
        f"{limit_name} median {statistics.median(limits):.3f}s   "
        f"overhead past it: median {statistics.median(over) * 1000:.0f}ms "
        f"max {max(over) * 1000:.0f}ms"
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1/worker_bench"
        ),
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args()

    await db.create_database_if_missing(args.database_url)
    conn = await asyncpg.connect(args.database_url)
    await db.migrate(conn)
    await conn.close()
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    redis = Redis.from_url(args.redis_url)
    crash: list[tuple[float, float]] = []
    graceful: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        async with Receiver() as receiver:
            jobs = Path(tmp) / "jobs.toml"
            jobs.write_text(JOBS.format(url=receiver.url))
            cluster = Cluster(
                args.database_url, args.redis_url, prefix, jobs, Path(tmp), ttl=args.ttl
            )
            try:
                for i in range(3):
                    cluster.start(f"r{i}")
                await asyncio.gather(*(cluster.wait_ready(r) for r in cluster.replicas))
                for i in range(args.trials):
                    crash.append(await trial(cluster, redis, crash=True))
                    graceful.append(await trial(cluster, redis, crash=False))
                    print(
                        f"trial {i + 1:>2}: crash {crash[-1][0]:.3f}s (lease had "
                        f"{crash[-1][1]:.3f}s left)  graceful {graceful[-1][0] * 1000:.0f}ms "
                        f"(released after {graceful[-1][1] * 1000:.0f}ms)",
                        flush=True,
                    )
                assert await current_holder(redis, prefix) is not None
            finally:
                cluster.stop_all()
                await redis.delete(f"{prefix}leader", f"{prefix}leader:epoch")
                await redis.aclose()
    print(f"\n{args.trials} trials each, TTL {args.ttl:g}s, 3 replicas")
    summary("crash (kill -9)", [c[0] for c in crash], [c[1] for c in crash], "lease TTL left")
    summary("graceful (TERM)", [g[0] for g in graceful], [g[1] for g in graceful], "release")
    crash_max = max(c[0] for c in crash)
    graceful_max = max(g[0] for g in graceful)
    print(
        f"targets: crash <= TTL + 0.3s = {args.ttl + 0.3:.1f}s: "
        f"{'met' if crash_max <= args.ttl + 0.3 else 'MISSED'} (max {crash_max:.3f}s); "
        f"graceful <= 0.2s: {'met' if graceful_max <= 0.2 else 'MISSED'} "
        f"(max {graceful_max:.3f}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
