"""The leader under faults (issue 7, items 3, 6b, 10, 12 and 13), against real Postgres and Redis.

Every test here is written so that it fails on the leader as it was before the rewrite
(each docstring names the defect it guards); the job kinds are defined here, so no
upstream is called.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from croniter import CroniterBadDateError
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from worker import db, runs
from worker.config import JobSpec
from worker.context import RunContext
from worker.lease import Grant, Lease
from worker.schedule import CronSchedule
from worker.scheduler import Leader
from worker.upstream import Upstream, open_upstream

from .helpers import RecordingJob, eventually, grant_for, leading, settings_with_jobs


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with open_upstream() as up:
        yield up


class Resumable:
    """A resumable kind that records each run and sleeps `sleep` seconds."""

    resumable = True

    def __init__(self, sleep: float = 60.0) -> None:
        self.sleep = sleep
        self.runs: list[RunContext] = []

    def check(self, spec: JobSpec) -> None:
        pass

    async def run(self, ctx: RunContext) -> Any:
        self.runs.append(ctx)
        await asyncio.sleep(self.sleep)
        return {"done": True}


def metric(name: str, job: str) -> float:
    return REGISTRY.get_sample_value(name, {"job": job}) or 0.0


async def newer_grant(redis: Redis, prefix: str, holder: str, *, above: int) -> Grant:
    """A grant whose token is above `above` (an older term's token already in the fence)."""
    await Lease(redis, prefix=prefix).raise_epoch(above)
    grant = await grant_for(redis, prefix, holder)
    assert grant.token > above
    return grant


async def insert_old_running(pool: db.Pool, *, job: str, kind: str, token: int) -> int:
    """A run an older term started and still heartbeats (its leader is only slow)."""
    run_id: int = await pool.fetchval(
        "INSERT INTO runs (job, kind, trigger, status, token, worker_id, started_at,"
        " heartbeat_at) VALUES ($1, $2, 'manual', 'running', $3, 'old-leader', now(), now())"
        " RETURNING id",
        job,
        kind,
        token,
    )
    return run_id


async def status_of(pool: db.Pool, run_id: int) -> str:
    status: str = await pool.fetchval("SELECT status FROM runs WHERE id = $1", run_id)
    return status


# --- item 6b: overlap = forbid is decided from the ledger ---------------------------------

EVERY_SECOND_FORBID = """
[[jobs]]
name = "faults-forbid"
kind = "rec"
schedule = "* * * * * *"
overlap = "forbid"
misfire = "skip"
misfire_grace = "1s"
"""

MANUAL_FORBID = """
[[jobs]]
name = "faults-manual-forbid"
kind = "rec"
overlap = "forbid"
"""


async def test_forbid_waits_for_an_older_terms_running_run_of_a_scheduled_job(
    tmp_path: Path,
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
) -> None:
    """Item 6b: forbid was checked against this leader's in-memory runs only, so after a
    failover the new leader started a fresh slot while the old term's run was still
    `running`. Now no slot of the job starts until the ledger holds no running run."""
    job_name = "faults-forbid"
    await db.raise_fence(pool, token=1, holder="old-leader")
    old = await insert_old_running(pool, job=job_name, kind="rec", token=1)
    settings = settings_with_jobs(
        tmp_path, EVERY_SECOND_FORBID, database_url=database_url, reap_after=60.0
    )
    job = RecordingJob()
    grant = await newer_grant(redis, key_prefix, "new-leader", above=1)
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"rec": job})

    async def started_by_new_term() -> int:
        n: int = await pool.fetchval(
            "SELECT count(*) FROM runs WHERE job = $1 AND token = $2"
            " AND status IN ('running', 'succeeded')",
            job_name,
            grant.token,
        )
        return n

    async with leading(leader, grant):
        await eventually(lambda: pool.fetchval("SELECT count(*) FROM leader_terms"))
        await asyncio.sleep(3.0)  # three slots come due while the old run is running
        assert await started_by_new_term() == 0
        assert job.runs == []
        assert await status_of(pool, old) == "running"  # not reaped: its heartbeat is fresh

        # The old term's run ends: the next slot starts.
        await pool.execute(
            "UPDATE runs SET status = 'succeeded', finished_at = now() WHERE id = $1", old
        )
        await eventually(lambda: job.runs, timeout=5.0)
        await eventually(started_by_new_term, timeout=5.0)
        assert all(ctx.slot is not None for ctx in job.runs)


async def test_forbid_holds_a_queued_manual_run_while_an_older_terms_run_is_running(
    tmp_path: Path,
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
) -> None:
    """Item 6b: the queue was drained with forbid checked against this term's runs only,
    so a manual run of a forbid job started next to the old term's still-running run."""
    job_name = "faults-manual-forbid"
    await db.raise_fence(pool, token=1, holder="old-leader")
    old = await insert_old_running(pool, job=job_name, kind="rec", token=1)
    settings = settings_with_jobs(
        tmp_path, MANUAL_FORBID, database_url=database_url, reap_after=60.0
    )
    job = RecordingJob()
    grant = await newer_grant(redis, key_prefix, "new-leader", above=1)
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"rec": job})
    async with leading(leader, grant):
        await eventually(lambda: pool.fetchval("SELECT count(*) FROM leader_terms"))
        queued = await runs.enqueue(pool, job=job_name, kind="rec", params={}, requested_by="t")
        await asyncio.sleep(3.0)  # the NOTIFY and a few polls go by
        assert await status_of(pool, queued) == "queued"
        assert job.runs == []

        await pool.execute(
            "UPDATE runs SET status = 'succeeded', finished_at = now() WHERE id = $1", old
        )

        async def done() -> bool:
            return await status_of(pool, queued) == "succeeded"

        await eventually(done, timeout=5.0)
        assert [ctx.run_id for ctx in job.runs] == [queued]
        run = await runs.get(pool, queued)
        assert run is not None
        assert run["token"] == grant.token


# --- item 6b: a resume overtaken by a newer complete pass is dropped ----------------------

MANUAL_RESUMABLE = """
[[jobs]]
name = "{name}"
kind = "res"
"""


@pytest.mark.parametrize("newer_pass", [True, False], ids=["overtaken", "control"])
async def test_resume_overtaken_by_a_newer_complete_pass_is_superseded(
    tmp_path: Path,
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
    newer_pass: bool,
) -> None:
    """Item 6b: the resume of an older pass ran *after* a newer complete pass of the same
    job (fetching old pages again; with mark_gone, marking gone what the newer pass saw).
    Now it is recorded `superseded`, naming the newer run, and never executed. Control:
    with no newer pass the resume runs."""
    job_name = "faults-overtaken"
    abandoned = await pool.fetchval(
        "INSERT INTO runs (job, kind, trigger, status, attempt, cursor, error, started_at,"
        " finished_at) VALUES ($1, 'res', 'manual', 'abandoned', 1, '{\"page\": 3}',"
        " 'its leader (token 1) went away', now() - interval '1 minute', now())"
        " RETURNING id",
        job_name,
    )
    newer = None
    if newer_pass:
        newer = await pool.fetchval(
            "INSERT INTO runs (job, kind, trigger, status, started_at, finished_at)"
            " VALUES ($1, 'res', 'manual', 'succeeded', now() - interval '30 seconds', now())"
            " RETURNING id",
            job_name,
        )
    resume = await runs.enqueue(
        pool,
        job=job_name,
        kind="res",
        params={},
        trigger="resume",
        requested_by="reaper",
        resumed_from=abandoned,
        cursor={"page": 3},
        attempt=2,
    )
    settings = settings_with_jobs(
        tmp_path, MANUAL_RESUMABLE.format(name=job_name), database_url=database_url
    )
    kind = Resumable(sleep=0)
    superseded_before = metric("worker_runs_superseded_total", job_name)
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"res": kind})
    async with leading(leader, await grant_for(redis, key_prefix, "me")):

        async def ended() -> bool:
            return await status_of(pool, resume) in runs.FINAL

        await eventually(ended, timeout=5.0)
        run = await runs.get(pool, resume)
        assert run is not None
        if newer_pass:
            assert run["status"] == "superseded"
            assert f"run {newer}" in run["error"]
            assert kind.runs == []
            assert metric("worker_runs_superseded_total", job_name) == superseded_before + 1
        else:
            assert run["status"] == "succeeded"
            assert [ctx.run_id for ctx in kind.runs] == [resume]
            assert kind.runs[0].cursor == {"page": 3}


# --- item 12: a hand-off does not spend the resume budget --------------------------------


async def test_hand_offs_do_not_spend_the_resume_budget(
    tmp_path: Path,
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
) -> None:
    """Item 12: every graceful hand-off (SIGTERM of the leader in a rolling deploy) counted
    as a failed attempt, so after five the resume chain ended with nothing queued and no
    log line. Now six hand-offs in a row leave the chain at attempt 1, still resuming."""
    job_name = "faults-handoff"
    settings = settings_with_jobs(
        tmp_path,
        MANUAL_RESUMABLE.format(name=job_name),
        database_url=database_url,
        reap_after=1.0,
        worker_id="replica",
    )
    kind = Resumable(sleep=60)
    lease = Lease(redis, prefix=key_prefix)
    hand_offs = 6
    for term in range(hand_offs + 1):
        grant, _ = await lease.acquire(holder=f"replica-{term}", ttl=30)
        assert grant is not None
        leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"res": kind})
        task = asyncio.create_task(leader.run(grant))
        try:
            if term == 0:
                await runs.enqueue(pool, job=job_name, kind="res", params={}, requested_by="t")

            # The new term's reaper queues the resume of the handed-off run; it starts.
            def started_in_this_term(token: int = grant.token) -> bool:
                return bool(kind.runs) and kind.runs[-1].token == token

            await eventually(started_in_this_term, timeout=8.0)
            ctx = kind.runs[-1]
            assert ctx.attempt == 1, f"term {term}: a hand-off spent an attempt"
            assert ctx.trigger == ("manual" if term == 0 else "resume")
            if term == hand_offs:
                run = await runs.get(pool, ctx.run_id)
                assert run is not None
                assert (run["status"], run["attempt"]) == ("running", 1)
        finally:
            task.cancel("shutdown")  # as the elector does on SIGTERM
            with pytest.raises(asyncio.CancelledError):
                await task
        assert await lease.release(grant)

    chain = [ctx.run_id for ctx in kind.runs]
    assert len(chain) == hand_offs + 1
    assert [ctx.resumed_from for ctx in kind.runs] == [None, *chain[:-1]]
    rows = await pool.fetch(
        "SELECT id, status, handed_off, attempt, given_up_at, error FROM runs"
        " WHERE job = $1 ORDER BY id",
        job_name,
    )
    assert [r["id"] for r in rows] == chain
    for r in rows:
        assert r["status"] == "abandoned"
        assert r["handed_off"] is True
        assert r["attempt"] == 1
        assert r["given_up_at"] is None
        assert "shutdown" in r["error"]


async def test_failed_attempts_spend_the_budget_and_a_spent_chain_is_given_up_loudly(
    tmp_path: Path,
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Item 12, the other side: a run whose leader went away (reaped: stale heartbeat, an
    older term) is a failed attempt and spends one; a chain out of attempts used to end
    silently. Now it is marked given up, logged at error level and counted."""
    spent, young = "faults-spent", "faults-young"
    await db.raise_fence(pool, token=1, holder="dead-leader")
    ids = {}
    for name, attempt in ((spent, 5), (young, 2)):
        ids[name] = await pool.fetchval(
            "INSERT INTO runs (job, kind, trigger, status, token, attempt, started_at,"
            " heartbeat_at) VALUES ($1, 'res', 'resume', 'running', 1, $2,"
            " now() - interval '1 hour', now() - interval '1 hour') RETURNING id",
            name,
            attempt,
        )
    toml = MANUAL_RESUMABLE.format(name=spent) + MANUAL_RESUMABLE.format(name=young)
    settings = settings_with_jobs(tmp_path, toml, database_url=database_url, reap_after=1.0)
    kind = Resumable(sleep=60)
    given_up_before = metric("worker_runs_given_up_total", spent)
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"res": kind})
    async with leading(leader, await newer_grant(redis, key_prefix, "me", above=1)):

        async def given_up() -> bool:
            row = await pool.fetchrow("SELECT given_up_at FROM runs WHERE id = $1", ids[spent])
            return row["given_up_at"] is not None

        await eventually(given_up, timeout=8.0)
        # The young chain spent one attempt and goes on.
        await eventually(lambda: kind.runs, timeout=5.0)
        assert [(ctx.job.name, ctx.attempt, ctx.resumed_from) for ctx in kind.runs] == [
            (young, 3, ids[young])
        ]

    row = await runs.get(pool, ids[spent])
    assert row is not None
    assert row["status"] == "abandoned"
    assert row["handed_off"] is False
    assert "given up" in row["error"]
    assert await pool.fetchval("SELECT count(*) FROM runs WHERE job = $1", spent) == 1
    assert metric("worker_runs_given_up_total", spent) == given_up_before + 1
    errors = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and "given up" in r.getMessage()
    ]
    assert len(errors) == 1
    assert spent in errors[0]


# --- item 13: a database blip under a run --------------------------------------------------


class BlipOnce:
    """A resumable kind whose first run sits in a fenced transaction until the test ends
    its database session; its resume succeeds at once."""

    resumable = True

    def __init__(self) -> None:
        self.runs: list[RunContext] = []
        self.backend: int | None = None
        self.in_transaction = asyncio.Event()

    def check(self, spec: JobSpec) -> None:
        pass

    async def run(self, ctx: RunContext) -> Any:
        self.runs.append(ctx)
        if ctx.trigger == "manual":
            async with ctx.fenced() as conn:
                self.backend = await conn.fetchval("SELECT pg_backend_pid()")
                self.in_transaction.set()
                await conn.execute("SELECT pg_sleep(30)")
        return {"resumed": ctx.trigger == "resume"}


class DivideByZero:
    """A resumable kind whose run meets a deterministic database error."""

    resumable = True

    def __init__(self) -> None:
        self.runs: list[RunContext] = []

    def check(self, spec: JobSpec) -> None:
        pass

    async def run(self, ctx: RunContext) -> Any:
        self.runs.append(ctx)
        async with ctx.fenced() as conn:
            return await conn.fetchval("SELECT 1 / 0")


async def test_a_database_blip_under_a_run_resumes_it_at_once(
    tmp_path: Path,
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Item 13: a run whose database connection dropped was recorded `failed` with a
    `run failed` error log (or stayed `running` until the reaper took it, reap_after
    later). Now it is `abandoned` as interrupted, logged as a warning, and the same
    leader queues and starts its resume at once."""
    job_name = "faults-blip"
    settings = settings_with_jobs(
        tmp_path, MANUAL_RESUMABLE.format(name=job_name), database_url=database_url, reap_after=60
    )
    kind = BlipOnce()
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"res": kind})
    async with leading(leader, await grant_for(redis, key_prefix, "me")):
        first = await runs.enqueue(pool, job=job_name, kind="res", params={}, requested_by="t")
        async with asyncio.timeout(5):
            await kind.in_transaction.wait()
        # The database ends the run's session under it (as a Postgres restart would).
        assert await pool.fetchval("SELECT pg_terminate_backend($1)", kind.backend)
        blip = time.monotonic()

        async def resumed() -> asyncpg.Record | None:
            row: asyncpg.Record | None = await pool.fetchrow(
                "SELECT id, status, attempt FROM runs"
                " WHERE resumed_from = $1 AND status = 'succeeded'",
                first,
            )
            return row

        resume = await eventually(resumed, timeout=8.0)
        assert time.monotonic() - blip < 5.0  # not reap_after (60 s) later
        assert [ctx.run_id for ctx in kind.runs] == [first, resume["id"]]

    run = await runs.get(pool, first)
    assert run is not None
    assert run["status"] == "abandoned"
    assert run["error"].startswith("interrupted by a database error")
    assert run["handed_off"] is False
    assert resume["attempt"] == 2  # a real interruption spends an attempt
    failed_logs = [
        r for r in caplog.records if r.levelno >= logging.ERROR and "run failed" in r.getMessage()
    ]
    assert failed_logs == []


async def test_a_deterministic_database_error_fails_the_run_without_a_resume(
    tmp_path: Path,
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
) -> None:
    """Item 3 (related) and 13: every PostgresError was treated as transient. A
    deterministic one (here division by zero, a DataError) must fail the run, not be
    resumed to fail again."""
    job_name = "faults-div0"
    settings = settings_with_jobs(
        tmp_path, MANUAL_RESUMABLE.format(name=job_name), database_url=database_url, reap_after=1
    )
    kind = DivideByZero()
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"res": kind})
    async with leading(leader, await grant_for(redis, key_prefix, "me")):
        run_id = await runs.enqueue(pool, job=job_name, kind="res", params={}, requested_by="t")

        async def ended() -> bool:
            return await status_of(pool, run_id) in runs.FINAL

        await eventually(ended, timeout=5.0)
        await asyncio.sleep(2.5)  # a reaper pass goes by
        run = await runs.get(pool, run_id)
        assert run is not None
        assert run["status"] == "failed"
        assert "DivisionByZeroError" in run["error"]
        assert await pool.fetchval("SELECT count(*) FROM runs WHERE job = $1", job_name) == 1
        assert len(kind.runs) == 1


# --- item 10: every pool acquire is bounded; LISTEN has its own connection ----------------


async def test_an_exhausted_pool_times_out_instead_of_hanging(database_url: str) -> None:
    """Item 10: `pool.fetchval` and friends acquired with no timeout, so a pool whose
    connections were all stuck hung its callers forever. Now they raise TimeoutError."""
    async with (
        asyncio.timeout(10),  # the old pool hangs: fail, do not hang the suite
        db.open_pool(database_url, timeout=1, min_size=1, max_size=1) as pool,
        pool.acquire() as held,
    ):
        assert await held.fetchval("SELECT 1") == 1
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            await pool.fetchval("SELECT 1")
        assert time.monotonic() - start < 3.5


MANUAL_QUICK = """
[[jobs]]
name = "faults-listen"
kind = "rec"
"""


async def test_listen_does_not_hold_a_pool_connection(
    tmp_path: Path, database_url: str, redis: Redis, key_prefix: str, upstream: Upstream
) -> None:
    """Item 10: the leader LISTENed on a pool connection for its whole term, so a pool of
    two had one left for everything else. Now LISTEN has a connection of its own: with
    the leader up and idle, both pool connections can be taken."""
    settings = settings_with_jobs(tmp_path, MANUAL_QUICK, database_url=database_url)
    job = RecordingJob()
    async with (
        asyncio.timeout(30),  # fail, do not hang, if a connection is never given back
        db.open_pool(database_url, timeout=10, min_size=1, max_size=2) as pool,
    ):
        leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"rec": job})
        async with leading(leader, await grant_for(redis, key_prefix, "me")):
            run_id = await runs.enqueue(
                pool, job="faults-listen", kind="rec", params={}, requested_by="t"
            )

            async def done() -> bool:
                return await status_of(pool, run_id) == "succeeded"

            await eventually(done, timeout=5.0)

            async def listening() -> int:
                n: int = await pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND query LIKE 'LISTEN %'"
                )
                return n

            assert await eventually(listening, timeout=5.0) == 1
            # Both of the pool's connections, while the leader is up (and idle).
            first = await pool.acquire(timeout=5)
            try:
                second = await pool.acquire(timeout=5)
                try:
                    pids = {
                        await first.fetchval("SELECT pg_backend_pid()"),
                        await second.fetchval("SELECT pg_backend_pid()"),
                    }
                    assert len(pids) == 2
                finally:
                    await pool.release(second)
            finally:
                await pool.release(first)


# --- item 3: an error in one job's planning is isolated to that job ------------------------


class ImpossibleSchedule(CronSchedule):
    """A schedule croniter cannot follow (as "0 0 30 2 *" was before load rejected it)."""

    def newest_between(self, after: datetime, until: datetime, limit: int) -> list[datetime]:
        raise CroniterBadDateError("failed to find prev date")

    def slots_between(self, after: datetime, until: datetime) -> Any:
        raise CroniterBadDateError("failed to find next date")

    def next_after(self, after: datetime) -> datetime:
        raise CroniterBadDateError("failed to find next date")


TWO_EVERY_SECOND = """
[[jobs]]
name = "faults-good"
kind = "rec"
schedule = "* * * * * *"
overlap = "allow"
misfire = "skip"
misfire_grace = "5s"

[[jobs]]
name = "faults-bad"
kind = "rec"
schedule = "* * * * * *"
"""


async def test_a_planning_error_is_isolated_to_its_job(
    tmp_path: Path,
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
) -> None:
    """Item 3, second line of defence: an error in one job's slot planning crashed the
    leader (and, via the lease, every next leader). Now that job records the error (on
    job_state, for /jobs), counts it, and the other jobs keep running."""
    loaded = settings_with_jobs(tmp_path, TWO_EVERY_SECOND, database_url=database_url)
    good, bad = loaded.jobs
    bad = dataclasses.replace(bad, schedule=ImpossibleSchedule("* * * * * *"))
    settings = dataclasses.replace(loaded, jobs=(good, bad))
    job = RecordingJob()
    errors_before = metric("worker_planning_errors_total", bad.name)
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"rec": job})
    task = asyncio.create_task(leader.run(await grant_for(redis, key_prefix, "me")))
    started = time.monotonic()
    try:

        async def good_ran_twice() -> bool:
            n = await pool.fetchval(
                "SELECT count(DISTINCT slot) FROM runs WHERE job = $1 AND status = 'succeeded'",
                good.name,
            )
            return n >= 2

        await eventually(good_ran_twice, timeout=8.0)

        async def recorded() -> str | None:
            error: str | None = await pool.fetchval(
                "SELECT error FROM job_state WHERE job = $1", bad.name
            )
            return error

        error = await eventually(recorded, timeout=5.0)
        assert "CroniterBadDateError" in error
        await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - started)))
        assert not task.done(), "the leader stopped"
        assert metric("worker_planning_errors_total", bad.name) > errors_before
        assert metric("worker_planning_errors_total", good.name) == 0
        overview = {
            v["name"]: v for v in await runs.job_overview(pool, settings.jobs, datetime.now(UTC))
        }
        assert "CroniterBadDateError" in overview[bad.name]["planning_error"]
        assert overview[good.name]["planning_error"] is None
        assert await pool.fetchval("SELECT count(*) FROM runs WHERE job = $1", bad.name) == 0
        assert {ctx.job.name for ctx in job.runs} == {good.name}
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --- a handed-off sync resumes before a new slot of its job starts ------------------------

EVERY_SECOND_RESUMABLE = """
[[jobs]]
name = "faults-handoff-order"
kind = "res"
schedule = "* * * * * *"
overlap = "forbid"
misfire = "latest"
"""


async def test_a_new_term_resumes_a_handed_off_sync_before_starting_a_new_slot(
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    """Seen running `make run` twice: the new term's first tick started a fresh slot of
    the job before its reaper had queued the resume of the pass the old term handed
    off; the resume then waited, and was dropped as superseded. A new term now makes
    one reaper pass before it plans anything, so the interrupted pass goes first."""
    settings = settings_with_jobs(
        tmp_path, EVERY_SECOND_RESUMABLE, database_url=database_url, reap_after=60.0
    )
    await db.raise_fence(pool, token=1, holder="old")
    handed_off: int = await pool.fetchval(
        "INSERT INTO runs (job, kind, slot, trigger, status, token, attempt, cursor, handed_off,"
        " started_at, finished_at, error) VALUES ('faults-handoff-order', 'res', now() - interval"
        " '5 seconds', 'schedule', 'abandoned', 1, 1, '{\"page\": 7}', true, now(), now(),"
        " 'leadership ended: shutdown') RETURNING id"
    )
    job = Resumable(sleep=0.2)
    grant = await newer_grant(redis, key_prefix, "new", above=1)
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"res": job})
    async with leading(leader, grant):
        await eventually(lambda: len(job.runs) >= 2, timeout=10)
    first = job.runs[0]
    assert first.resumed_from == handed_off, (
        f"a new slot ({first.trigger}) started before the resume of run {handed_off}"
    )
    assert first.cursor == {"page": 7}
    assert first.attempt == 1


async def test_hand_offs_past_the_cap_spend_attempts(pool: db.Pool) -> None:
    """A run that itself makes its leader step down (blocking the event loop past the
    renew deadline) would otherwise be handed off and resumed for ever, flapping the
    leadership: past `max_handoffs` a hand-off counts as a failed attempt."""
    await db.raise_fence(pool, token=1, holder="t")
    run_id = await pool.fetchval(
        "INSERT INTO runs (job, kind, trigger, status, attempt, handed_off, handoffs,"
        " finished_at) VALUES ('faults-flap', 'res', 'manual', 'abandoned', 1, true, 0, now())"
        " RETURNING id"
    )
    attempts = []
    for _ in range(8):
        async with db.fenced(pool, 1) as conn:
            queued = await runs.queue_resumes(
                conn, kinds=["res"], max_attempts=5, max_handoffs=2, only=[run_id]
            )
            given_up = await runs.give_up(conn, kinds=["res"], max_attempts=5, max_handoffs=2)
        if given_up:
            break
        assert len(queued) == 1
        run_id = queued[0][0]
        attempts.append(await pool.fetchval("SELECT attempt FROM runs WHERE id = $1", run_id))
        await pool.execute(  # handed off again
            "UPDATE runs SET status = 'abandoned', handed_off = true, finished_at = now()"
            " WHERE id = $1",
            run_id,
        )
    assert attempts == [1, 1, 2, 3, 4, 5]
    assert given_up
    assert given_up[0]["id"] == run_id


class SlowToStop:
    """A run that takes `linger` seconds to stop once cancelled (a slow final write)."""

    resumable = False

    def __init__(self, linger: float) -> None:
        self.linger = linger
        self.started = asyncio.Event()

    def check(self, spec: JobSpec) -> None:
        pass

    async def run(self, ctx: RunContext) -> Any:
        self.started.set()
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.shield(asyncio.sleep(self.linger))


async def test_a_run_slow_to_stop_is_reported_not_a_crash(
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """aiojobs reports a run that did not stop within its close timeout to the event
    loop's exception handler, with a TimeoutError: the replica's handler took that for
    a crash and exited 1 (seen once: a woken stale leader whose run was still recording
    its end). The executor now handles aiojobs' reports itself."""
    from worker.app import stray_error_handler

    settings = settings_with_jobs(
        tmp_path, MANUAL_ONLY_SLOW, database_url=database_url, shutdown_grace=0.4
    )
    job = SlowToStop(linger=0.6)
    loop = asyncio.get_running_loop()
    crashed, stop = asyncio.Event(), asyncio.Event()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(stray_error_handler(crashed, stop))
    try:
        grant = await grant_for(redis, key_prefix, "a")
        leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"slow": job})
        async with leading(leader, grant):
            await runs.enqueue(pool, job="faults-slow", kind="slow", params={})
            await asyncio.wait_for(job.started.wait(), 10)
        await asyncio.sleep(0.8)  # the run finishes lingering after the report
    finally:
        loop.set_exception_handler(previous)
    assert not crashed.is_set(), "a run slow to stop stopped the replica"
    assert any("Job closing timed out" in r.getMessage() for r in caplog.records)


MANUAL_ONLY_SLOW = """
[[jobs]]
name = "faults-slow"
kind = "slow"
"""
