"""Pause and resume a job's schedule, and pause after repeated failures (issue 10, items
1 and 2): kept in Postgres, so every replica and every later leader obeys it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import REGISTRY
from redis.asyncio import Redis

from worker import db, pauses, runs
from worker.lease import Lease
from worker.scheduler import Leader
from worker.upstream import Upstream

from .helpers import RecordingJob, eventually, grant_for, leading, settings_with_jobs
from .test_api import Client, assert_error, client, make_client, settings
from .test_leader_faults import upstream

__all__ = ["client", "make_client", "settings", "upstream"]  # fixtures, for pytest

EVERY_SECOND = """
[[jobs]]
name = "{name}"
kind = "rec"
schedule = "* * * * * *"
misfire = "{misfire}"
misfire_grace = "1h"
overlap = "allow"
{extra}
[jobs.params]
{params}
"""


def jobs(name: str, *, misfire: str = "all", extra: str = "", params: str = "") -> str:
    return EVERY_SECOND.format(name=name, misfire=misfire, extra=extra, params=params)


async def slots_of(pool: db.Pool, job: str) -> list[object]:
    rows = await pool.fetch("SELECT slot FROM runs WHERE job = $1 ORDER BY slot", job)
    return [r["slot"] for r in rows]


async def test_paused_slots_are_not_owed_even_across_a_failover(
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    """Paused under one leader, resumed under the next: with misfire = all and a 1 h
    grace, the old code would run every slot of the pause after the resume."""
    settings = settings_with_jobs(tmp_path, jobs("pz"), database_url=database_url)
    job = RecordingJob()
    first = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"rec": job})
    async with leading(first, await grant_for(redis, key_prefix, "a")):
        await eventually(lambda: len(job.runs) >= 1, timeout=5)
        await pauses.pause(pool, "pz", by="test", note="upstream maintenance")
        await asyncio.sleep(0.3)  # a run of the slot in flight may still start
        during = len(job.runs)
        await asyncio.sleep(2.0)
        assert len(job.runs) == during, "a paused job ran"
    paused_at = (await pauses.states(pool))["pz"]["paused_at"]
    for holder, token in (("b", 100), ("c", 200)):
        await Lease(redis, prefix=key_prefix).raise_epoch(token)
        await redis.delete(f"{key_prefix}leader")
        leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"rec": job})
        async with leading(leader, await grant_for(redis, key_prefix, holder)):
            if holder == "b":  # a new leader while the job is paused: it obeys the pause
                await asyncio.sleep(1.5)
                assert len(job.runs) == during, "the new leader ran a paused job"
            else:  # resumed while nobody led: the next leader owes nothing of the pause
                await eventually(lambda: len(job.runs) >= during + 2, timeout=5)
        if holder == "b":
            resumed = (await pauses.resume(pool, "pz"))["resumed_at"]
            await asyncio.sleep(1.2)
    owed = [s for s in await slots_of(pool, "pz") if paused_at < s <= resumed]  # type: ignore[operator]
    assert owed == [], f"slots of the pause were run after the resume: {owed}"


async def test_a_job_that_keeps_failing_is_paused(
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    toml = jobs("flaky", extra="pause_after_failures = 2", params="fail = true")
    settings = settings_with_jobs(tmp_path, toml, database_url=database_url)
    job = RecordingJob()
    before = REGISTRY.get_sample_value("worker_jobs_auto_paused_total", {"job": "flaky"}) or 0
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"rec": job})
    async with leading(leader, await grant_for(redis, key_prefix, "a")):

        async def paused() -> bool:
            return bool((await pauses.states(pool)).get("flaky", {}).get("paused_at"))

        await eventually(paused, timeout=10)
        await asyncio.sleep(1.5)
        failed = await pool.fetchval(
            "SELECT count(*) FROM runs WHERE job = 'flaky' AND status = 'failed'"
        )
    state = (await pauses.states(pool))["flaky"]
    assert state["paused_by"] == "leader"
    assert "2 failed runs in a row" in state["pause_note"]
    assert "asked to fail" in state["pause_note"]
    assert failed == 2, "it kept running after it was paused"
    after = REGISTRY.get_sample_value("worker_jobs_auto_paused_total", {"job": "flaky"})
    assert after == before + 1


async def test_a_success_resets_the_failure_streak(pool: db.Pool) -> None:
    await db.raise_fence(pool, token=1, holder="t")
    async with db.fenced(pool, 1) as conn:
        for status in ("failed", "failed", "succeeded", "failed"):
            paused = await pauses.record_outcome(
                conn, "j", status=status, error="boom", pause_after=3
            )
            assert not paused
    assert (await pauses.states(pool))["j"]["failure_streak"] == 1


async def test_pause_and_resume_over_the_api(client: Client, pool: db.Pool) -> None:
    from .test_api import API_KEY

    key = {"X-API-Key": API_KEY}
    assert (await client.post("/jobs/poke/pause")).status == 401
    await assert_error(await client.post("/jobs/nope/pause", headers=key), 404, "unknown_job")
    await assert_error(
        await client.post("/jobs/poke/pause", headers=key, json={"note": 5}), 400, "bad_note"
    )
    resp = await client.post("/jobs/poke/pause", headers=key, json={"note": "deploy"})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert (body["paused"], body["note"]) == (True, "deploy")
    jobs_view = {j["name"]: j for j in (await (await client.get("/jobs")).json())["jobs"]}
    assert jobs_view["poke"]["paused"] is True
    assert jobs_view["poke"]["note"] == "deploy"
    assert jobs_view["poke"]["paused_by"].startswith("api:")
    page = await (await client.get("/")).text()
    assert "paused by api:" in page
    resp = await client.post("/jobs/poke/resume", headers=key)
    assert (await resp.json())["paused"] is False
    jobs_view = {j["name"]: j for j in (await (await client.get("/jobs")).json())["jobs"]}
    assert jobs_view["poke"]["paused"] is False
    assert jobs_view["poke"]["last_pause"]["to"] is not None
    assert await runs.last_runs(pool) == {}
