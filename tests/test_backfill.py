"""Backfill (issue 10, item 3): a past range of a job's slots queued through the ledger,
run once each, in order, obeying overlap, across a failover."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient
from redis.asyncio import Redis

from worker import backfill, cli, db, runs
from worker.config import Settings
from worker.lease import Lease
from worker.scheduler import Leader
from worker.upstream import Upstream, open_upstream
from worker.web.app import WebState, build_app

from .helpers import RecordingJob, eventually, grant_for, leading, settings_with_jobs

API_KEY = "s3cret"
JOBS = """
[[jobs]]
name = "hourly"
kind = "rec"
schedule = "0 * * * *"
overlap = "forbid"
[jobs.params]
sleep = {sleep}

[[jobs]]
name = "local"
kind = "rec"
schedule = "0 0 * * *"
timezone = "Europe/Bucharest"

[[jobs]]
name = "minutely"
kind = "rec"
schedule = "* * * * *"

[[jobs]]
name = "by-hand"
kind = "rec"
"""

START = datetime(2026, 5, 1, 10, tzinfo=UTC)
SIX = [START + timedelta(hours=h) for h in range(6)]  # 10:00 .. 15:00, both ends
RANGE = {"from": "2026-05-01T10:00:00+00:00", "to": "2026-05-01T15:00:00+00:00"}

Client = TestClient[Any, Any]


def settings_for(tmp_path: Path, *, sleep: float = 0.0, **overrides: Any) -> Settings:
    return settings_with_jobs(
        tmp_path, JOBS.format(sleep=sleep), api_key=API_KEY, worker_id="test-replica", **overrides
    )


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with open_upstream() as up:
        yield up


@pytest.fixture
async def client(
    aiohttp_client: AiohttpClient, tmp_path: Path, pool: db.Pool, redis: Redis, key_prefix: str
) -> Client:
    state = WebState(
        settings=settings_for(tmp_path),
        pool=pool,
        redis=redis,
        lease=Lease(redis, prefix=key_prefix),
    )
    return await aiohttp_client(build_app(state))


async def post(client: Client, job: str, body: Any, *, key: str | None = API_KEY) -> Any:
    headers = {"X-API-Key": key} if key else {}
    resp = await client.post(f"/jobs/{job}/backfill", json=body, headers=headers)
    return resp.status, await resp.json()


async def ledger(pool: db.Pool, job: str = "hourly") -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT id, slot, trigger, status, params FROM runs WHERE job = $1 ORDER BY id", job
    )
    return [dict(r) for r in rows]


async def test_api_queues_every_slot_of_the_range_in_order(client: Client, pool: db.Pool) -> None:
    status, body = await post(client, "hourly", RANGE)
    assert status == 202, body
    assert body == {
        "queued": 6,
        "skipped": 0,
        "first": SIX[0].isoformat(),
        "last": SIX[-1].isoformat(),
        "skipped_slots": [],
    }
    rows = await ledger(pool)
    assert [r["slot"] for r in rows] == SIX  # ids follow the slots: the drain's order
    assert {(r["trigger"], r["status"]) for r in rows} == {("backfill", "queued")}
    assert rows[0]["params"] == {"sleep": 0.0}


async def test_a_date_means_midnight_in_the_jobs_timezone(client: Client, pool: db.Pool) -> None:
    status, body = await post(client, "local", {"from": "2026-05-01", "to": "2026-05-02"})
    assert status == 202, body
    # Bucharest is UTC+3 in May: local midnights are 21:00 UTC the evening before.
    assert body["first"] == "2026-04-30T21:00:00+00:00"
    assert body["last"] == "2026-05-01T21:00:00+00:00"
    assert body["queued"] == 2


async def test_slots_with_a_row_are_skipped_and_reported(client: Client, pool: db.Pool) -> None:
    await db.raise_fence(pool, token=1, holder="a")
    async with db.fenced(pool, 1) as conn:
        await runs.record_missed_many(conn, [("hourly", "rec", SIX[1], "slot missed")])
        await runs.claim_slots(conn, [("hourly", "rec", SIX[4], {})], token=1, worker_id="w")
    status, body = await post(client, "hourly", RANGE)
    assert status == 202, body
    assert body["queued"] == 4
    assert body["skipped"] == 2
    assert body["skipped_slots"] == [SIX[1].isoformat(), SIX[4].isoformat()]
    # Asked again, nothing is queued twice.
    status, again = await post(client, "hourly", RANGE)
    assert (status, again["queued"], again["skipped"]) == (202, 0, 6)
    assert len(again["skipped_slots"]) == 6
    statuses = [r["status"] for r in await ledger(pool)]
    assert sorted(statuses) == ["missed"] + ["queued"] * 4 + ["running"]


async def test_a_range_over_the_maximum_is_refused_with_its_count(
    client: Client, pool: db.Pool
) -> None:
    status, body = await post(client, "hourly", {**RANGE, "max": 5})
    assert status == 400
    assert body["error"]["code"] == "bad_max"
    assert "6 slots" in body["error"]["message"]
    # The default maximum is 1 000: two days of a per-minute job are 2 881 slots.
    two_days = {"from": "2026-05-01T00:00:00Z", "to": "2026-05-03T00:00:00Z"}
    status, body = await post(client, "minutely", two_days)
    assert status == 400
    assert "2881 slots" in body["error"]["message"]
    assert "1000" in body["error"]["message"]
    assert await pool.fetchval("SELECT count(*) FROM runs") == 0
    status, body = await post(client, "minutely", {**two_days, "max": 3000})
    assert (status, body["queued"]) == (202, 2881)


@pytest.mark.parametrize(
    ("job", "body", "code", "named"),
    [
        ("hourly", {"from": RANGE["to"], "to": RANGE["from"]}, "bad_from", "from:"),
        ("hourly", {"from": RANGE["from"], "to": "2999-01-01T00:00:00Z"}, "bad_to", "future"),
        ("by-hand", RANGE, "bad_schedule", "no schedule"),
        ("hourly", {"from": "2026-05-01T10:00", "to": RANGE["to"]}, "bad_from", "offset"),
        ("hourly", {"to": RANGE["to"]}, "bad_from", "required"),
        ("hourly", {**RANGE, "max": 0}, "bad_max", "max:"),
        ("hourly", {**RANGE, "max": "7"}, "bad_max", "max:"),
    ],
)
async def test_bad_requests_are_refused_naming_the_field(
    client: Client, pool: db.Pool, job: str, body: dict[str, Any], code: str, named: str
) -> None:
    status, answer = await post(client, job, body)
    assert status == 400, answer
    assert answer["error"]["code"] == code
    assert named in answer["error"]["message"]
    assert await pool.fetchval("SELECT count(*) FROM runs") == 0


async def test_backfill_needs_the_api_key(client: Client, pool: db.Pool) -> None:
    assert (await post(client, "hourly", RANGE, key=None))[0] == 401
    assert (await post(client, "hourly", RANGE, key="wrong"))[0] == 401
    assert await pool.fetchval("SELECT count(*) FROM runs") == 0


async def test_cli_queues_the_same_slots(
    tmp_path: Path, pool: db.Pool, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(tmp_path, database_url=database_url)
    argv = ["backfill", "hourly", "--from", RANGE["from"], "--to", RANGE["to"]]
    assert await cli.cmd_backfill(cli._parser().parse_args(argv), settings) == 0
    assert "queued 6; skipped 0" in capsys.readouterr().out
    rows = await ledger(pool)
    assert [r["slot"] for r in rows] == SIX
    assert {r["trigger"] for r in rows} == {"backfill"}
    assert await cli.cmd_backfill(cli._parser().parse_args([*argv, "--json"]), settings) == 0
    assert '"skipped":6' in capsys.readouterr().out
    refused = [*argv, "--max", "5"]
    assert await cli.cmd_backfill(cli._parser().parse_args(refused), settings) == 2
    assert "6 slots" in capsys.readouterr().err


async def test_the_leader_runs_backfilled_slots_in_order_one_at_a_time(
    tmp_path: Path, pool: db.Pool, redis: Redis, key_prefix: str, upstream: Upstream
) -> None:
    settings = settings_for(tmp_path, sleep=0.1)
    spec = settings.job("hourly")
    assert spec is not None
    job = RecordingJob()
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"rec": job})
    async with leading(leader, await grant_for(redis, key_prefix, "me")):
        await eventually(lambda: pool.fetchval("SELECT count(*) FROM leader_terms"))
        done = await backfill.backfill(
            pool, spec, start=SIX[0], end=SIX[-1], now=datetime.now(UTC), requested_by="test"
        )
        assert done.queued == 6
        await eventually(
            lambda: pool.fetchval("SELECT count(*) = 6 FROM runs WHERE status = 'succeeded'"),
            timeout=10,
        )
    assert [c.slot for c in job.runs] == SIX
    assert {c.trigger for c in job.runs} == {"backfill"}
    rows = await pool.fetch(
        "SELECT started_at, finished_at FROM runs WHERE job = 'hourly' ORDER BY slot"
    )
    for before, after in itertools.pairwise(rows):
        assert after["started_at"] >= before["finished_at"], "overlap=forbid runs overlapped"


async def test_a_backfill_survives_a_failover_and_runs_each_slot_once(
    tmp_path: Path, pool: db.Pool, redis: Redis, key_prefix: str, upstream: Upstream
) -> None:
    settings = settings_for(tmp_path, sleep=0.3)
    spec = settings.job("hourly")
    assert spec is not None
    job = RecordingJob()
    done = await backfill.backfill(
        pool, spec, start=SIX[0], end=SIX[-1], now=datetime.now(UTC), requested_by="test"
    )
    assert done.queued == 6
    first = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"rec": job})
    async with leading(first, await grant_for(redis, key_prefix, "a")):
        await eventually(lambda: len(job.runs) >= 3, timeout=10)
    ran_in_first = len(job.runs)
    assert ran_in_first < 6
    await redis.delete(f"{key_prefix}leader")  # the elector hands the lease back
    second = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"rec": job})
    async with leading(second, await grant_for(redis, key_prefix, "b")):
        await eventually(
            lambda: pool.fetchval(
                "SELECT count(*) = 0 FROM runs WHERE status IN ('queued', 'running')"
            ),
            timeout=10,
        )
        await asyncio.sleep(0.3)  # room for a wrong second run of a slot to show up
    slots = [c.slot for c in job.runs]
    assert slots == SIX, "a backfilled slot ran twice, or not at all, or out of order"
    tokens = {c.token for c in job.runs}
    assert len(tokens) == 2  # both terms ran part of it
    assert await pool.fetchval("SELECT count(*) FROM runs WHERE job = 'hourly'") == 6
