"""Stuck runs (issue 11): `POST /runs/cleanup-stuck`, `worker cleanup-stuck`, and the
leader finding its own, against real Postgres and Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY
from pytest_aiohttp import AiohttpClient
from redis.asyncio import Redis

from worker import db, executor, reaper, runs, stuck
from worker.config import JobSpec, Settings
from worker.context import RunContext
from worker.lease import Lease
from worker.scheduler import Leader
from worker.upstream import Upstream, open_upstream
from worker.web.app import WebState, build_app

from .helpers import RecordingJob, eventually, grant_for, leading, settings_with_jobs

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "s3cret"
HOUR = 3600.0
JOBS = """
[[jobs]]
name = "sync"
kind = "gate"

[[jobs]]
name = "poke"
kind = "rec"
"""

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]


class Gate:
    """A resumable kind whose runs go on until the test opens the gate."""

    resumable = True

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.runs: list[RunContext] = []

    def check(self, spec: JobSpec) -> None:
        pass

    async def run(self, ctx: RunContext) -> Any:
        self.runs.append(ctx)
        await self.open.wait()
        return {"done": True}


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with open_upstream() as up:
        yield up


@pytest.fixture
async def make_client(
    aiohttp_client: AiohttpClient, pool: db.Pool, redis: Redis, key_prefix: str, database_url: str
) -> MakeClient:
    """An API replica (not the leader) over the real stores."""

    async def make(**overrides: Any) -> Client:
        settings = Settings(
            api_key=API_KEY,
            key_prefix=key_prefix,
            database_url=database_url,
            worker_id="api-replica",
        )
        state = WebState(
            settings=dataclasses.replace(settings, **overrides),
            pool=pool,
            redis=redis,
            lease=Lease(redis, prefix=key_prefix),
        )
        return await aiohttp_client(build_app(state))

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client()


def key(value: str = API_KEY) -> dict[str, str]:
    return {"X-API-Key": value}


def counted() -> tuple[float, float]:
    """worker_stuck_runs_detected_total and worker_stuck_runs_recovered_total."""
    return (
        REGISTRY.get_sample_value("worker_stuck_runs_detected_total") or 0.0,
        REGISTRY.get_sample_value("worker_stuck_runs_recovered_total") or 0.0,
    )


async def seed(
    pool: db.Pool,
    *,
    status: str = "running",
    running_for: float = HOUR,
    silent_for: float = HOUR,
    token: int = 1,
    job: str = "sync",
    kind: str = "gate",
) -> int:
    """A run row as a leader (`old-leader`, term `token`) left it."""
    run_id: int = await pool.fetchval(
        "INSERT INTO runs (job, kind, trigger, status, token, worker_id, created_at,"
        " started_at, heartbeat_at) VALUES ($1, $2, 'manual', $3, $4, 'old-leader',"
        " now() - make_interval(secs => $5),"
        " CASE WHEN $3 = 'running' THEN now() - make_interval(secs => $5) END,"
        " CASE WHEN $3 = 'running' THEN now() - make_interval(secs => $6) END)"
        " RETURNING id",
        job,
        kind,
        status,
        token,
        running_for,
        silent_for,
    )
    return run_id


async def run_row(pool: db.Pool, run_id: int) -> dict[str, Any]:
    row = await runs.get(pool, run_id)
    assert row is not None
    return row


async def cleanup(client: Client, query: str = "") -> dict[str, Any]:
    response = await client.post(f"/runs/cleanup-stuck{query}", headers=key())
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def assert_error(client: Client, query: str, status: int, code: str, **kw: Any) -> str:
    response = await client.post(f"/runs/cleanup-stuck{query}", **kw)
    assert response.status == status, await response.text()
    body = await response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    message: str = body["error"]["message"]
    return message


# --- the endpoint ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["4", "61", "x", "-15", "15.0", "1e1", "+15"])
async def test_timeout_minutes_out_of_bounds_is_400(
    client: Client, pool: db.Pool, value: str
) -> None:
    stale = await seed(pool)
    message = await assert_error(
        client, f"?timeout_minutes={value}", 400, "bad_timeout_minutes", headers=key()
    )
    assert message.startswith("timeout_minutes: must be a whole number from 5 to 60")
    assert (await run_row(pool, stale))["status"] == "running"


async def test_other_parameters_are_refused(client: Client) -> None:
    await assert_error(client, "?minutes=15", 400, "unknown_parameter", headers=key())
    await assert_error(
        client, "?timeout_minutes=5&timeout_minutes=6", 400, "bad_timeout_minutes", headers=key()
    )
    await assert_error(client, "", 400, "unknown_field", headers=key(), json={"minutes": 5})


async def test_bounds_themselves_are_accepted(client: Client) -> None:
    for query in ("?timeout_minutes=5", "?timeout_minutes=60", "", "?timeout_minutes="):
        assert await cleanup(client, query) == {"count": 0, "ids": []}


async def test_cleanup_needs_the_key(
    client: Client, make_client: MakeClient, pool: db.Pool
) -> None:
    stale = await seed(pool)
    await assert_error(client, "", 401, "unauthorized")
    await assert_error(client, "", 401, "unauthorized", headers=key("wrong"))
    # The key is checked before the parameters: no hint about them without it.
    await assert_error(client, "?timeout_minutes=4", 401, "unauthorized")
    disabled = await make_client(api_key=None)
    await assert_error(disabled, "", 403, "api_disabled", headers=key())
    assert (await run_row(pool, stale))["status"] == "running"
    response = await client.get("/runs/cleanup-stuck")
    assert response.status in (400, 405)  # a GET is no cleanup


async def test_cleanup_fails_stuck_runs_and_leaves_live_and_queued_ones(
    client: Client, pool: db.Pool
) -> None:
    stale = await seed(pool)
    older_stale = await seed(pool, running_for=3 * HOUR, silent_for=2.5 * HOUR, token=2)
    fresh = await seed(pool, silent_for=0)  # running for an hour, heartbeat just written
    recent = await seed(pool, silent_for=5)  # heartbeat 5 s old: one beat late, not stuck
    young = await seed(pool, running_for=10 * 60, silent_for=10 * 60)  # only 10 minutes
    queued = await seed(pool, status="queued")
    before = counted()

    assert await cleanup(client) == {"count": 2, "ids": [stale, older_stale]}

    after = counted()
    assert (after[0] - before[0], after[1] - before[1]) == (2, 2)
    row = await run_row(pool, stale)
    assert row["status"] == "failed"
    assert row["finished_at"] is not None
    assert row["error"] == (
        "stuck: running for 1h00m with no heartbeat for 1h00m (its leader: old-leader,"
        " token 1); marked failed by api:api-replica"
    )
    assert (
        "running for 3h00m with no heartbeat for 2h30m"
        in (await run_row(pool, older_stale))["error"]
    )
    for untouched in (fresh, recent, young):
        row = await run_row(pool, untouched)
        assert (row["status"], row["finished_at"], row["error"]) == ("running", None, None)
    assert (await run_row(pool, queued))["status"] == "queued"
    # Nothing is resumed: a cleanup is a verdict.
    assert await pool.fetchval("SELECT count(*) FROM runs WHERE resumed_from IS NOT NULL") == 0

    # A shorter bound takes the ten-minute run; the ended ones are not ended again.
    assert await cleanup(client, "?timeout_minutes=5") == {"count": 1, "ids": [young]}
    assert await cleanup(client, "?timeout_minutes=5") == {"count": 0, "ids": []}
    assert (await run_row(pool, stale))["error"].endswith("api:api-replica")


async def test_a_run_being_ended_right_now_is_skipped_not_waited_for(
    client: Client, pool: db.Pool, database_url: str
) -> None:
    """Its leader holds the row (recording its end): the cleanup does not wait for the
    lock and does not list it; the leader's end is what stays."""
    stale = await seed(pool)
    leader_conn = await asyncpg.connect(database_url)
    try:
        tx = leader_conn.transaction()
        await tx.start()
        await leader_conn.execute("SELECT 1 FROM runs WHERE id = $1 FOR UPDATE", stale)
        async with asyncio.timeout(5):
            assert await cleanup(client) == {"count": 0, "ids": []}
        await leader_conn.execute(
            "UPDATE runs SET status = 'succeeded', finished_at = now()"
            " WHERE id = $1 AND status = 'running'",
            stale,
        )
        await tx.commit()
    finally:
        await leader_conn.close()
    row = await run_row(pool, stale)
    assert (row["status"], row["error"]) == ("succeeded", None)


# --- the race with the run's own leader ------------------------------------------------


def stop_heartbeat() -> None:
    """The leader's heartbeat loop dies (the fault: the executor still holds its runs)."""
    [beat] = [t for t in asyncio.all_tasks() if t.get_name() == "run-heartbeat"]
    beat.cancel()


async def wait_running(pool: db.Pool, run_id: int) -> None:
    async def running() -> bool:
        return bool((await run_row(pool, run_id))["status"] == "running")

    await eventually(running)


async def test_the_runs_leader_ending_it_after_a_cleanup_changes_nothing(
    tmp_path: Path,
    pool: db.Pool,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
    client: Client,
) -> None:
    """A leader whose heartbeat loop died while it still runs the run; an operator
    cleans it up; then the run returns and its leader records its end: the cleanup's
    ending stays, once, and nothing resumes it."""
    gate = Gate()
    settings = settings_with_jobs(tmp_path, JOBS)
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"gate": gate})
    async with leading(leader, await grant_for(redis, key_prefix, "the-leader")):
        run_id = await runs.enqueue(pool, job="sync", kind="gate", params={})
        await wait_running(pool, run_id)
        await eventually(lambda: gate.runs)
        stop_heartbeat()
        await pool.execute(
            "UPDATE runs SET started_at = now() - interval '1 hour',"
            " heartbeat_at = now() - interval '50 minutes' WHERE id = $1",
            run_id,
        )
        assert await cleanup(client) == {"count": 1, "ids": [run_id]}
        cleaned = await run_row(pool, run_id)
        assert cleaned["status"] == "failed"
        assert "no heartbeat for 50m00s" in cleaned["error"]

        gate.open.set()  # the run returns; its leader records `succeeded`
        assert leader.executor is not None
        await eventually(lambda: not leader.executor.active)  # type: ignore[union-attr]
        ended = await run_row(pool, run_id)
        for column in ("status", "error", "finished_at", "result", "handed_off"):
            assert ended[column] == cleaned[column], column
        assert await pool.fetchval("SELECT count(*) FROM runs") == 1  # no resume
        streak = await pool.fetchval("SELECT failure_streak FROM job_state WHERE job = 'sync'")
        assert not streak  # the leader's late end counted no outcome


# --- the leader's own detection ----------------------------------------------------------


async def test_the_leader_recovers_its_own_lost_runs_and_counts_them(
    tmp_path: Path, pool: db.Pool, redis: Redis, key_prefix: str, upstream: Upstream
) -> None:
    """Runs of this term the executor does not hold (their end could not be written):
    abandoned by the reaper, a resumable one resumed, both counted as stuck; a dead
    term's run is a failover, reaped but not counted."""
    settings = settings_with_jobs(tmp_path, JOBS, reap_after=1.0)
    leader = Leader(
        settings=settings,
        pool=pool,
        upstream=upstream,
        kinds={"gate": Gate(), "rec": RecordingJob()},
    )
    grant = await grant_for(redis, key_prefix, "the-leader")
    before = counted()
    async with leading(leader, grant):
        await eventually(lambda: pool.fetchval("SELECT count(*) FROM leader_terms"))
        resumable = await seed(pool, token=grant.token)
        plain = await seed(pool, token=grant.token, job="poke", kind="rec")
        failover = await seed(pool, token=grant.token - 1, job="poke", kind="rec")

        async def ended() -> bool:
            rows = [await run_row(pool, r) for r in (resumable, plain, failover)]
            return all(r["status"] == "abandoned" for r in rows)

        await eventually(ended, timeout=10)
        resume = await pool.fetchval("SELECT id FROM runs WHERE resumed_from = $1", resumable)
        assert resume is not None
    assert "could not be recorded" in (await run_row(pool, plain))["error"]
    after = counted()
    assert (after[0] - before[0], after[1] - before[1]) == (2, 2)


async def test_the_leader_fails_a_held_run_whose_heartbeat_stopped(
    tmp_path: Path,
    pool: db.Pool,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The executor still holds the run, but the heartbeat loop died: once the passes
    have been steady past the bound, the run is failed with the reason and counted, not
    resumed; when its coroutine returns later, its end changes nothing."""
    monkeypatch.setattr(executor, "HEARTBEAT_EVERY", 0.1)
    monkeypatch.setattr(reaper, "REAP_EVERY", 0.1)
    gate = Gate()
    settings = settings_with_jobs(tmp_path, JOBS, reap_after=1.0, worker_id="the-leader")
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"gate": gate})
    before = counted()
    async with leading(leader, await grant_for(redis, key_prefix, "the-leader")):
        run_id = await runs.enqueue(pool, job="sync", kind="gate", params={})
        await wait_running(pool, run_id)
        # While the heartbeat beats, a held run is never touched, however long it runs.
        await pool.execute(
            "UPDATE runs SET started_at = now() - interval '1 hour' WHERE id = $1", run_id
        )
        await asyncio.sleep(2.0)
        assert (await run_row(pool, run_id))["status"] == "running"
        assert counted() == before

        stop_heartbeat()  # the run goes on

        async def failed() -> bool:
            return bool((await run_row(pool, run_id))["status"] == "failed")

        await eventually(failed, timeout=10)
        cleaned = await run_row(pool, run_id)
        assert cleaned["error"].startswith("stuck: no heartbeat for ")
        held = "while its leader (the-leader, token 1) still held it, running for 1h00m"
        assert held in cleaned["error"]
        assert cleaned["error"].endswith("marked failed by leader:the-leader")
        after = counted()
        assert (after[0] - before[0], after[1] - before[1]) == (1, 1)

        gate.open.set()
        assert leader.executor is not None
        await eventually(lambda: not leader.executor.active)  # type: ignore[union-attr]
        await asyncio.sleep(0.5)  # a few more reaper passes
        ended = await run_row(pool, run_id)
        for column in ("status", "error", "finished_at", "result"):
            assert ended[column] == cleaned[column], column
        assert await pool.fetchval("SELECT count(*) FROM runs") == 1  # not resumed
        assert counted() == after


async def test_after_a_stall_held_runs_are_judged_only_once_passes_are_steady_again(
    tmp_path: Path,
    pool: db.Pool,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stall of the leader's process silences every heartbeat as long: the first
    passes after it must leave the heartbeat loop time to write, not fail held runs.
    (The loop is stopped here so that the wait can be measured.)"""
    monkeypatch.setattr(executor, "HEARTBEAT_EVERY", 0.1)
    monkeypatch.setattr(reaper, "REAP_EVERY", 0.1)
    gate = Gate()
    settings = settings_with_jobs(tmp_path, JOBS, reap_after=1.0)
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"gate": gate})
    async with leading(leader, await grant_for(redis, key_prefix, "the-leader")):
        run_id = await runs.enqueue(pool, job="sync", kind="gate", params={})
        await wait_running(pool, run_id)
        await asyncio.sleep(0.5)
        stop_heartbeat()
        time.sleep(1.5)  # noqa: ASYNC251  # the stall: the whole event loop is held
        woke = time.monotonic()

        async def failed() -> bool:
            return bool((await run_row(pool, run_id))["status"] == "failed")

        await eventually(failed, timeout=10)
        assert time.monotonic() - woke >= 0.9  # silence(): 1 s of steady passes first
        gate.open.set()


def test_held_runs_are_judged_only_after_steady_passes() -> None:
    """After a stall of this process or a failed pass (the database down), heartbeats
    were held back as much as the passes: the count of steady time starts again."""
    steadiness = stuck.Steadiness(100.0, every=2.0)
    assert steadiness.steady_for(102.0) == 2.0
    assert steadiness.steady_for(104.5) == 4.5  # a pass a little late: still steady
    assert steadiness.steady_for(110.0) == 0.0  # 5.5 s after the last one: a stall
    assert steadiness.steady_for(112.0) == 2.0
    steadiness.failed()
    assert steadiness.steady_for(114.0) == 0.0  # the first pass after a failure
    assert steadiness.steady_for(116.0) == 2.0


# --- the command line ---------------------------------------------------------------


async def worker_cli(database_url: str, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        *args,
        cwd=ROOT,
        env={**env, "DATABASE_URL": database_url, "WORKER_ID": "cli-host"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_refuses_bad_minutes_with_one_line(database_url: str, pool: db.Pool) -> None:
    stale = await seed(pool)
    for value in ("4", "61", "x"):
        code, out, err = await worker_cli(database_url, "cleanup-stuck", "--minutes", value)
        assert code == 2, err
        assert out == ""
        assert err.splitlines() == [
            "worker cleanup-stuck: error: argument --minutes: must be a whole number from 5"
            f" to 60, got {value!r} (see worker cleanup-stuck --help)"
        ]
    assert (await run_row(pool, stale))["status"] == "running"


async def test_cli_cleans_up_and_says_what(database_url: str, pool: db.Pool) -> None:
    stale = await seed(pool, running_for=20 * 60, silent_for=20 * 60)
    fresh = await seed(pool, silent_for=0)
    code, out, err = await worker_cli(database_url, "cleanup-stuck", "--minutes", "30")
    assert (code, err) == (0, "")
    assert out == "no stuck runs: none running for over 30 min with no heartbeat for 15s\n"

    code, out, err = await worker_cli(database_url, "cleanup-stuck")
    assert (code, err) == (0, ""), err
    lines = out.splitlines()
    assert lines[0] == f"1 stuck run(s) marked failed: {stale}"
    assert re.fullmatch(
        rf"  #{stale} sync: stuck: running for 20m\d\ds with no heartbeat for 20m\d\ds"
        r" \(its leader: old-leader, token 1\); marked failed by cli",
        lines[1],
    ), lines[1]
    row = await run_row(pool, stale)
    assert (row["status"], row["error"]) == ("failed", lines[1].split(": ", 1)[1])
    assert (await run_row(pool, fresh))["status"] == "running"

    code, out, err = await worker_cli(database_url, "cleanup-stuck", "--minutes", "5", "--json")
    assert (code, err) == (0, "")
    assert orjson.loads(out) == {"count": 0, "ids": []}
