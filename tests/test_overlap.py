"""Overlap policies beyond forbid and allow (issue 10, item 4): skip, buffer_one and
cancel_other, decided from the ledger so they hold across a failover."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from worker import db
from worker.config import JobSpec
from worker.context import RunContext
from worker.lease import Lease
from worker.scheduler import Leader
from worker.upstream import Upstream

from .helpers import eventually, grant_for, leading, settings_with_jobs
from .test_leader_faults import upstream

__all__ = ["upstream"]  # the fixture, imported for pytest

JOB = """
[[jobs]]
name = "{name}"
kind = "slow"
schedule = "* * * * * *"
misfire = "latest"
misfire_grace = "1h"
overlap = "{overlap}"
"""


class Slow:
    """Each run sleeps `seconds`; records (slot, start, end) of the runs that ended."""

    resumable = False

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.spans: list[tuple[Any, float, float]] = []
        self.started: list[Any] = []

    def check(self, spec: JobSpec) -> None:
        pass

    async def run(self, ctx: RunContext) -> Any:
        start = time.monotonic()
        self.started.append(ctx.slot)
        try:
            await asyncio.sleep(self.seconds)
        finally:
            self.spans.append((ctx.slot, start, time.monotonic()))


def never_overlapping(spans: list[tuple[Any, float, float]]) -> bool:
    ordered = sorted(spans, key=lambda s: s[1])
    return all(a[2] <= b[1] + 0.05 for a, b in itertools.pairwise(ordered))


async def statuses(pool: db.Pool, job: str) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT status, count(*) AS n FROM runs WHERE job = $1 GROUP BY status", job
    )
    return {r["status"]: int(r["n"]) for r in rows}


async def test_skip_records_the_slots_that_met_a_running_run(
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    settings = settings_with_jobs(
        tmp_path, JOB.format(name="ov-skip", overlap="skip"), database_url=database_url
    )
    job = Slow(2.2)
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"slow": job})
    async with leading(leader, await grant_for(redis, key_prefix, "a")):
        await eventually(lambda: len(job.spans) >= 2, timeout=15)
    counts = await statuses(pool, "ov-skip")
    assert counts.get("skipped", 0) >= 2, counts
    reason = await pool.fetchval(
        "SELECT error FROM runs WHERE job = 'ov-skip' AND status = 'skipped' LIMIT 1"
    )
    assert "was still going" in reason
    assert never_overlapping(job.spans)


async def test_buffer_one_keeps_one_slot_waiting_and_skips_the_rest(
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    """The buffered slot survives a failover: queued by one term, run once by the next."""
    settings = settings_with_jobs(
        tmp_path, JOB.format(name="ov-buf", overlap="buffer_one"), database_url=database_url
    )
    job = Slow(2.5)
    first = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"slow": job})
    async with leading(first, await grant_for(redis, key_prefix, "a")):

        async def buffered() -> bool:
            queued = await pool.fetchval(
                "SELECT count(*) FROM runs WHERE job = 'ov-buf' AND status = 'queued'"
            )
            return bool(queued == 1)

        await eventually(buffered, timeout=10)
        assert (
            await pool.fetchval(
                "SELECT count(*) FROM runs WHERE job = 'ov-buf' AND status = 'queued'"
            )
            <= 1
        )
    waiting = await pool.fetchval(
        "SELECT slot FROM runs WHERE job = 'ov-buf' AND status = 'queued'"
    )
    await Lease(redis, prefix=key_prefix).raise_epoch(100)
    await redis.delete(f"{key_prefix}leader")
    second = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"slow": job})
    async with leading(second, await grant_for(redis, key_prefix, "b")):
        await eventually(lambda: waiting in job.started, timeout=10)
        await asyncio.sleep(3.0)
    assert job.started.count(waiting) == 1, "the buffered slot ran twice"
    counts = await statuses(pool, "ov-buf")
    assert counts.get("skipped", 0) >= 1, counts
    assert never_overlapping(job.spans)


async def test_cancel_other_cancels_the_running_run_for_the_new_slot(
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    settings = settings_with_jobs(
        tmp_path, JOB.format(name="ov-cancel", overlap="cancel_other"), database_url=database_url
    )
    job = Slow(30.0)
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"slow": job})
    async with leading(leader, await grant_for(redis, key_prefix, "a")):

        async def cancelled_twice() -> bool:
            return (await statuses(pool, "ov-cancel")).get("cancelled", 0) >= 2

        await eventually(cancelled_twice, timeout=15)
    by = await pool.fetch(
        "SELECT requested_by FROM runs WHERE job = 'ov-cancel' AND status = 'cancelled'"
    )
    assert all(str(r["requested_by"]).startswith("slot ") for r in by)
    assert never_overlapping(job.spans)


async def test_cancel_other_of_a_dead_leader_waits_for_the_reaper_then_runs_the_slot_once(
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    """The worst moment: a leader queued the newer slot and asked its running run to stop,
    then died before it could honour the cancel. The next leader cannot stop a run it
    does not hold: the newer slot waits until the reaper has abandoned the old run (its
    heartbeat went stale), then runs once; no slot starts twice, no two runs overlap."""
    settings = settings_with_jobs(
        tmp_path,
        JOB.format(name="ov-dead", overlap="cancel_other"),
        database_url=database_url,
        reap_after=2.0,
    )
    async with pool.acquire() as conn:
        old = await conn.fetchval(
            "INSERT INTO runs (job, kind, slot, trigger, status, token, worker_id, started_at,"
            " heartbeat_at, cancel_requested_at, requested_by)"
            " VALUES ('ov-dead', 'slow', date_trunc('second', now()) - interval '2 s',"
            " 'schedule', 'running', 1, 'dead-leader', now(), now(), now(), 'slot x')"
            " RETURNING id"
        )
        newer = await conn.fetchval(
            "INSERT INTO runs (job, kind, slot, trigger, status)"
            " VALUES ('ov-dead', 'slow', date_trunc('second', now()) - interval '1 s',"
            " 'schedule', 'queued') RETURNING slot"
        )
    await Lease(redis, prefix=key_prefix).raise_epoch(100)
    job = Slow(0.3)
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"slow": job})
    async with leading(leader, await grant_for(redis, key_prefix, "b")):
        await eventually(lambda: newer in job.started, timeout=15)
        await asyncio.sleep(2.0)
    ended = await pool.fetchrow("SELECT status, finished_at FROM runs WHERE id = $1", old)
    assert ended["status"] in ("abandoned", "cancelled"), ended
    started = await pool.fetch(
        "SELECT slot, started_at FROM runs WHERE job = 'ov-dead' AND id <> $1"
        " AND started_at IS NOT NULL",
        old,
    )
    assert started, "nothing ran after the failover"
    first_start = min(r["started_at"] for r in started)
    assert first_start >= ended["finished_at"], "a new slot started beside the dead term's run"
    assert job.started.count(newer) == 1
    assert len(job.started) == len(set(job.started)), "a slot ran twice"
    assert never_overlapping(job.spans)
