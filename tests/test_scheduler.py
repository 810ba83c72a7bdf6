"""The leader's scheduler against real Postgres and Redis: claims, misfire, manual runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from worker import db, runs
from worker.config import LeaseSettings
from worker.election import Elector, StepDown
from worker.lease import Grant, Lease
from worker.scheduler import Leader
from worker.upstream import Upstream, open_upstream

from .helpers import RecordingJob, eventually, grant_for, leading, settings_with_jobs

EVERY_MINUTE = """
[[jobs]]
name = "tick"
kind = "rec"
schedule = "* * * * *"
misfire = "{misfire}"
misfire_grace = "90s"
overlap = "forbid"
"""

MANUAL_ONLY = """
[[jobs]]
name = "on-demand"
kind = "rec"
"""


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with open_upstream() as up:
        yield up


async def test_concurrent_claims_of_one_slot_insert_one_run(pool: db.Pool) -> None:
    await db.raise_fence(pool, token=1, holder="a")
    slot = datetime(2026, 1, 1, tzinfo=UTC)

    async def claim(worker: str) -> list[dict[str, object]]:
        async with db.fenced(pool, 1) as conn:
            return await runs.claim_slots(
                conn, [("j", "http", slot, {})], token=1, worker_id=worker
            )

    results = await asyncio.gather(*(claim(f"w{i}") for i in range(8)))
    assert sum(len(r) for r in results) == 1
    assert await pool.fetchval("SELECT count(*) FROM runs WHERE job = 'j'") == 1


EVERY_SECOND = """
[[jobs]]
name = "second"
kind = "rec"
schedule = "* * * * * *"
misfire = "skip"
misfire_grace = "1s"
overlap = "allow"
"""


async def test_split_brain_two_live_leaders_race_and_the_stale_one_stops(
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    """Two leaders really running at once (the old one never learnt it lost the lease),
    both planning the same every-second slots. Every slot runs once; once the newer
    term has raised the fence the older one claims nothing more and steps down."""
    settings = settings_with_jobs(tmp_path, EVERY_SECOND, database_url=database_url)
    job = RecordingJob()
    old_grant = await grant_for(redis, key_prefix, "old")
    await redis.delete(f"{key_prefix}leader")  # the lease is lost; "old" never hears of it
    new_grant = await grant_for(redis, key_prefix, "new")
    old_leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"rec": job})
    new_leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"rec": job})
    old_task = asyncio.create_task(old_leader.run(old_grant))
    await eventually(lambda: any(c.token == old_grant.token for c in job.runs), timeout=5)
    async with leading(new_leader, new_grant):
        with pytest.raises(StepDown):
            await asyncio.wait_for(old_task, timeout=10)
        stepped_down = len(job.runs)
        await eventually(lambda: sum(c.token == new_grant.token for c in job.runs) >= 2)
    late = [c for c in job.runs[stepped_down:] if c.token == old_grant.token]
    assert late == [], "the stale leader ran a slot after it stepped down"
    slots = [c.slot for c in job.runs]
    assert len(slots) == len(set(slots)), "a slot ran twice"
    in_use = [h for h in pool._holders if h._in_use is not None]
    assert in_use == [], "a connection was not given back to the pool"
    tokens = {r["token"] for r in await pool.fetch("SELECT token FROM runs")}
    assert tokens == {old_grant.token, new_grant.token}


@pytest.mark.parametrize(
    ("misfire", "grace", "ran", "missed"),
    [
        # The 12:00 slot is 30 s old: within a 90 s grace it is on time and runs.
        ("skip", "90s", ["12:00"], 9),
        # With a 10 s grace nothing is on time: every slot is recorded missed.
        ("skip", "10s", [], 10),
        ("latest", "10s", ["12:00"], 9),
        ("all", "10s", [f"11:{m}" for m in range(51, 60)] + ["12:00"], 0),
    ],
)
async def test_misfire_after_an_outage(
    tmp_path: Path,
    pool: db.Pool,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
    misfire: str,
    grace: str,
    ran: list[str],
    missed: int,
) -> None:
    # The previous leader ran the 11:50 slot, then the cluster was down until 12:00:30.
    now = datetime(2026, 5, 1, 12, 0, 30, tzinfo=UTC)
    last = datetime(2026, 5, 1, 11, 50, tzinfo=UTC)
    await pool.execute("INSERT INTO job_state (job, since) VALUES ('tick', $1)", last)
    await pool.execute(
        "INSERT INTO runs (job, kind, slot, trigger, status) VALUES ('tick', 'rec', $1,"
        " 'schedule', 'succeeded')",
        last,
    )
    toml = EVERY_MINUTE.format(misfire=misfire).replace('"90s"', f'"{grace}"')
    settings = settings_with_jobs(tmp_path, toml)
    job = RecordingJob()
    leader = Leader(
        settings=settings, pool=pool, upstream=upstream, kinds={"rec": job}, now=lambda: now
    )
    expected = [datetime.fromisoformat(f"2026-05-01T{hm}:00+00:00") for hm in ran]
    query = "SELECT slot, status FROM runs WHERE job = 'tick' AND slot > $1"

    async def decided() -> bool:
        statuses = [r["status"] for r in await pool.fetch(query, last)]
        return statuses.count("missed") == missed and statuses.count("succeeded") == len(expected)

    async with leading(leader, await grant_for(redis, key_prefix, "me")):
        await eventually(decided)
        await asyncio.sleep(0.2)  # and nothing more happens
    assert sorted(ctx.slot for ctx in job.runs if ctx.slot) == expected
    rows = await pool.fetch(query, last)
    assert sum(r["status"] == "missed" for r in rows) == missed
    assert len({r["slot"] for r in rows}) == len(rows) == missed + len(expected)


async def test_manual_run_queued_by_another_replica_runs_on_the_leader(
    tmp_path: Path,
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
) -> None:
    settings = settings_with_jobs(tmp_path, MANUAL_ONLY, worker_id="leader-pod")
    job = RecordingJob()
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"rec": job})
    async with leading(leader, await grant_for(redis, key_prefix, "leader-pod")):
        await eventually(lambda: pool.fetchval("SELECT count(*) FROM leader_terms"))
        # Another replica (its own pool) only writes a queued row and NOTIFYs.
        async with db.open_pool(database_url) as other:
            run_id = await runs.enqueue(
                other, job="on-demand", kind="rec", params={}, requested_by="api"
            )

        async def finished() -> bool:
            run = await runs.get(pool, run_id)
            return run is not None and run["status"] == "succeeded"

        await eventually(finished, timeout=3.0)
        run = await runs.get(pool, run_id)
        assert run is not None
        assert run["worker_id"] == "leader-pod"
        assert run["trigger"] == "manual"
        assert run["slot"] is None


async def test_cancelled_leader_marks_its_runs_abandoned(
    tmp_path: Path, pool: db.Pool, redis: Redis, key_prefix: str, upstream: Upstream
) -> None:
    settings = settings_with_jobs(tmp_path, MANUAL_ONLY + "[jobs.params]\nsleep = 30\n")
    job = RecordingJob()
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"rec": job})
    task = asyncio.create_task(leader.run(await grant_for(redis, key_prefix, "me")))
    run_id = await runs.enqueue(pool, job="on-demand", kind="rec", params={"sleep": 30})
    await eventually(lambda: job.runs)
    task.cancel("shutdown")
    with pytest.raises(asyncio.CancelledError):
        await task
    run = await runs.get(pool, run_id)
    assert run is not None
    assert run["status"] == "abandoned"
    assert "shutdown" in run["error"]
    term = await pool.fetchrow("SELECT ended_at, end_reason FROM leader_terms")
    assert term["ended_at"] is not None


async def test_run_timeout_and_failure_are_recorded(
    tmp_path: Path, pool: db.Pool, redis: Redis, key_prefix: str, upstream: Upstream
) -> None:
    toml = MANUAL_ONLY.replace('kind = "rec"', 'kind = "rec"\ntimeout = "0.3s"\noverlap = "allow"')
    settings = settings_with_jobs(tmp_path, toml)
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"rec": RecordingJob()})
    async with leading(leader, await grant_for(redis, key_prefix, "me")):
        slow = await runs.enqueue(pool, job="on-demand", kind="rec", params={"sleep": 5})
        bad = await runs.enqueue(pool, job="on-demand", kind="rec", params={"fail": True})

        async def both_done() -> bool:
            rows = [await runs.get(pool, slow), await runs.get(pool, bad)]
            return all(r is not None and r["status"] in runs.FINAL for r in rows)

        await eventually(both_done)
        slow_run, bad_run = await runs.get(pool, slow), await runs.get(pool, bad)
        assert slow_run is not None
        assert bad_run is not None
        assert (slow_run["status"], slow_run["error"]) == ("failed", "timed out after 0.3s")
        assert bad_run["status"] == "failed"
        assert "asked to fail" in bad_run["error"]


async def test_leader_reaps_its_own_run_whose_end_was_not_recorded(
    tmp_path: Path, pool: db.Pool, redis: Redis, key_prefix: str, upstream: Upstream
) -> None:
    settings = settings_with_jobs(tmp_path, MANUAL_ONLY, reap_after=1.0)
    grant = await grant_for(redis, key_prefix, "me")
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"rec": RecordingJob()})
    async with leading(leader, grant):
        await eventually(lambda: pool.fetchval("SELECT count(*) FROM leader_terms"))
        # A run of this very term that no longer executes (say Postgres blinked as it ended).
        orphan = await pool.fetchval(
            "INSERT INTO runs (job, kind, trigger, status, token, started_at, heartbeat_at)"
            " VALUES ('on-demand', 'rec', 'manual', 'running', $1, now(),"
            " now() - interval '1 hour')"
            " RETURNING id",
            grant.token,
        )

        async def reaped() -> bool:
            return (
                await pool.fetchval("SELECT status FROM runs WHERE id = $1", orphan) == "abandoned"
            )

        await eventually(reaped, timeout=5.0)

        async def given_up() -> bool:
            query = "SELECT given_up_at IS NOT NULL FROM runs WHERE id = $1"
            return bool(await pool.fetchval(query, orphan))

        # Its kind does not resume: nothing continues it, so it ends here (run.failed).
        await eventually(given_up, timeout=5.0)
        error = await pool.fetchval("SELECT error FROM runs WHERE id = $1", orphan)
        assert "could not be recorded" in error
        assert "does not resume" in error


async def test_winning_the_lease_without_a_database_steps_down(
    tmp_path: Path, database_url: str, redis: Redis, key_prefix: str, upstream: Upstream
) -> None:
    settings = settings_with_jobs(tmp_path, MANUAL_ONLY)
    async with db.open_pool(database_url, timeout=2, min_size=0) as pool:
        admin = await asyncpg.connect(database_url.rsplit("/", 1)[0] + "/postgres")
        await admin.execute(f'DROP DATABASE "{database_url.rsplit("/", 1)[1]}" WITH (FORCE)')
        await admin.close()
        leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={})
        with pytest.raises(StepDown, match="cannot raise the fence"):
            await leader.run(await grant_for(redis, key_prefix, "me"))


async def test_token_counter_lost_by_redis_catches_up_with_the_fence(
    tmp_path: Path, pool: db.Pool, redis: Redis, key_prefix: str, upstream: Upstream
) -> None:
    # Postgres remembers term 50; Redis restarted without persistence and counts from 0.
    await db.raise_fence(pool, token=50, holder="before-the-restart")
    settings = settings_with_jobs(tmp_path, MANUAL_ONLY)

    async def work(grant: Grant) -> None:
        await Leader(settings=settings, pool=pool, upstream=upstream, kinds={}).run(grant)

    elector = Elector(
        redis=redis,
        lease=Lease(redis, prefix=key_prefix),
        settings=LeaseSettings(ttl=2.0, renew_deadline=1.5, retry=0.2),
        worker_id="me",
        work=work,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(elector.run(stop))
    # The first grant (token 1) is fenced; the counter is raised, the next grant is 51.
    await eventually(lambda: elector.state.leader and elector.state.token == 51, timeout=5.0)
    assert await pool.fetchval("SELECT token FROM fence") == 51
    stop.set()
    await task


async def test_cancel_stops_a_running_run_and_drops_a_queued_one(
    tmp_path: Path,
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
) -> None:
    settings = settings_with_jobs(tmp_path, MANUAL_ONLY)
    job = RecordingJob()
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"rec": job})
    async with leading(leader, await grant_for(redis, key_prefix, "me")):
        long_run = await runs.enqueue(pool, job="on-demand", kind="rec", params={"sleep": 60})
        waiting = await runs.enqueue(pool, job="on-demand", kind="rec", params={})  # overlap=forbid
        await eventually(lambda: job.runs)
        async with db.open_pool(database_url) as other:  # the request comes from another replica
            assert await runs.request_cancel(other, waiting, by="test") == "queued"
            assert await runs.request_cancel(other, long_run, by="test") == "running"

        async def stopped() -> bool:
            return (
                await pool.fetchval("SELECT status FROM runs WHERE id = $1", long_run)
                == "cancelled"
            )

        await eventually(stopped, timeout=5.0)
        assert [ctx.run_id for ctx in job.runs] == [long_run]  # the queued one never started
        rows = {r["id"]: r for r in await pool.fetch("SELECT id, status, error FROM runs")}
        assert rows[waiting]["status"] == "cancelled"
        assert rows[long_run]["error"] == "cancelled on request"
        assert await runs.request_cancel(pool, long_run, by="test") == "cancelled"  # ended: no-op
        await asyncio.sleep(2.5)  # a reaper pass: cancelled runs are not resumed
        assert await pool.fetchval("SELECT count(*) FROM runs WHERE trigger = 'resume'") == 0
