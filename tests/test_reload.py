"""Reloading the jobs file without a restart (issue 10, item 5): SIGHUP, POST
/admin/reload, the file watch; a valid file takes effect on the next tick, an invalid one
is refused with the start's own error and the running jobs stay."""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from worker import db, jobs, metrics, reload
from worker.config import Settings, load_jobs
from worker.errors import ConfigError
from worker.lease import Lease
from worker.reload import LiveSettings
from worker.scheduler import Leader
from worker.upstream import Upstream
from worker.web.app import WebState, build_app

from .cluster import Cluster
from .conftest import REDIS_URL
from .helpers import RecordingJob, eventually, grant_for, leading
from .test_config import CLASHING
from .test_leader_faults import upstream

__all__ = ["upstream"]  # the fixture, imported for pytest

EVERY_SECOND = """
[[jobs]]
name = "{name}"
kind = "rec"
schedule = "{schedule}"
misfire = "{misfire}"
misfire_grace = "2h"
"""


def job(name: str, schedule: str = "* * * * * *", misfire: str = "all") -> str:
    return EVERY_SECOND.format(name=name, schedule=schedule, misfire=misfire)


def live_over(path: Path, toml: str, **overrides: Any) -> LiveSettings:
    path.write_text(toml)
    settings = Settings(jobs=load_jobs(path), jobs_file=path, **overrides)
    return LiveSettings(settings, checkers={"rec": lambda spec: None})


def refused_count() -> float:
    return metrics.CONFIG_RELOADS.labels("refused")._value.get()


# --- the reload itself --------------------------------------------------------------


def test_a_valid_file_replaces_the_jobs_and_says_what_changed(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    live = live_over(path, job("a") + job("b") + job("c"))
    seen: list[Settings] = []
    live.subscribe(seen.append)
    path.write_text(job("a") + job("b", "*/5 * * * * *") + job("d"))
    change = live.reload("test")
    assert (change.added, change.removed, change.changed) == (["d"], ["c"], ["b"])
    assert [j.name for j in live.current.jobs] == ["a", "b", "d"]
    assert seen == [live.current]
    assert live.version == change.version == 1
    assert "added d" in change.summary()
    assert "removed c" in change.summary()
    # Reading the same file again changes nothing and bumps no version.
    again = live.reload("test")
    assert again.unchanged
    assert live.version == 1
    assert len(seen) == 1


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("[[jobs]\nname=", "is not valid TOML"),
        (job("a").replace('kind = "rec"', 'kind = "nope"'), "kind 'nope' is unknown"),
        (job("a") + job("a"), "name is used twice"),
        (job("a").replace("* * * * * *", "99 * * * *"), "field 'schedule'"),
    ],
)
def test_an_invalid_file_is_refused_with_the_start_error_and_the_jobs_stay(
    tmp_path: Path, content: str, fragment: str
) -> None:
    path = tmp_path / "jobs.toml"
    live = live_over(path, job("a") + job("b"))
    before = live.current
    path.write_text(content)
    refused = refused_count()
    with pytest.raises(ConfigError) as caught:
        live.reload("test")
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)
    # The very line a replica prints when it starts with this file.
    with pytest.raises(ConfigError) as at_start:
        load_jobs(path, kinds={"rec": lambda spec: None})
    assert str(caught.value) == str(at_start.value)
    assert live.current is before
    assert live.version == 0
    assert refused_count() == refused + 1


def test_params_are_checked_by_the_kinds_and_across_jobs(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text('[[jobs]]\nname = "p"\nkind = "http"\n[jobs.params]\nurl = "http://x/"\n')
    registry = jobs.kinds()
    settings = Settings(jobs=load_jobs(path), jobs_file=path)
    live = LiveSettings(settings, checkers=jobs.checkers(registry), cross_check=jobs.cross_check)
    path.write_text('[[jobs]]\nname = "p"\nkind = "http"\n[jobs.params]\nurl = 5\n')
    with pytest.raises(ConfigError, match="job 'p': params"):
        live.reload("test")
    path.write_text(CLASHING.format(platform="bg"))
    with pytest.raises(ConfigError, match="both write emag account 'main'"):
        live.reload("test")
    assert [j.name for j in live.current.jobs] == ["p"]


def test_the_watch_sees_a_content_change_not_a_touch(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    live = live_over(path, job("a"))
    assert not live.changed_on_disk()
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert not live.changed_on_disk(), "a touch that changes nothing is no reload"
    # A ConfigMap update: a new file swapped in under the same name.
    fresh = tmp_path / "new.toml"
    fresh.write_text(job("a") + job("b"))
    fresh.replace(path)
    assert live.changed_on_disk()
    assert not live.changed_on_disk(), "seen once"


async def test_the_watch_reloads_and_survives_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    live = live_over(path, job("a"))
    stop = asyncio.Event()
    watch = asyncio.create_task(live.watch(stop, every=0.05))
    try:
        path.write_text(job("a") + job("b"))
        await eventually(lambda: live.current.job("b") is not None, timeout=5)
        path.write_text("not toml [")
        refused = refused_count()
        await eventually(lambda: refused_count() > refused, timeout=5)
        assert live.current.job("b") is not None
        path.write_text(job("c"))
        await eventually(lambda: [j.name for j in live.current.jobs] == ["c"], timeout=5)
    finally:
        stop.set()
        await asyncio.wait_for(watch, 5)


# --- the leader takes it up on its next tick ------------------------------------------


async def slots_of(pool: db.Pool, name: str) -> list[datetime]:
    rows = await pool.fetch("SELECT slot FROM runs WHERE job = $1 ORDER BY slot", name)
    return [r["slot"] for r in rows]


async def test_added_jobs_start_from_now_removed_ones_stop_and_keep_their_history(
    pool: db.Pool, redis: Redis, key_prefix: str, upstream: Upstream, tmp_path: Path
) -> None:
    path = tmp_path / "jobs.toml"
    live = live_over(path, job("stay") + job("go"))
    rec = RecordingJob()
    leader = Leader(
        settings=live.current, pool=pool, upstream=upstream, kinds={"rec": rec}, live=live
    )
    async with leading(leader, await grant_for(redis, key_prefix, "a")):
        await eventually(lambda: len(rec.runs) >= 4, timeout=10)
        path.write_text(job("stay") + job("new"))
        live.reload("test")
        reloaded = datetime.now(UTC)
        await eventually(lambda: any(r.job.name == "new" for r in rec.runs), timeout=10)
        # "go" may have one slot in flight from the tick that was going on.
        await asyncio.sleep(2.5)
    go = await slots_of(pool, "go")
    assert go, "the removed job's history is kept"
    assert max(go) <= reloaded + timedelta(seconds=1), "a removed job was still scheduled"
    new = await slots_of(pool, "new")
    assert new
    assert min(new) >= reloaded - timedelta(seconds=1), "an added job ran old slots"
    assert len(await slots_of(pool, "stay")) >= 5


async def test_a_changed_schedule_starts_from_now_also_for_the_next_leader(
    pool: db.Pool, redis: Redis, key_prefix: str, upstream: Upstream, tmp_path: Path
) -> None:
    """A job last run an hour ago, rescheduled to every second with misfire=all and a
    2 h grace: without the ledger's record of the change, the hour of new-schedule slots
    would be owed (and run) by this leader or by the next."""
    path = tmp_path / "jobs.toml"
    # A run cut at the end of the first term may be left for the reaper: make it quick.
    live = live_over(path, job("r", "0 0 1 1 *"), reap_after=2.0)
    hour_ago = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO job_state (job, since) VALUES ('r', $1)", hour_ago - timedelta(days=1)
        )
        await conn.execute(
            "INSERT INTO runs (job, kind, slot, trigger, status, finished_at)"
            " VALUES ('r', 'rec', $1, 'schedule', 'succeeded', $1)",
            hour_ago,
        )
    rec = RecordingJob()
    first = Leader(
        settings=live.current, pool=pool, upstream=upstream, kinds={"rec": rec}, live=live
    )
    async with leading(first, await grant_for(redis, key_prefix, "a")):
        await asyncio.sleep(1.0)  # the old schedule: nothing due
        path.write_text(job("r", "* * * * * *"))
        live.reload("test")
        changed = datetime.now(UTC)
        await eventually(lambda: len(rec.runs) >= 2, timeout=10)
    await Lease(redis, prefix=key_prefix).raise_epoch(100)
    await redis.delete(f"{key_prefix}leader")
    second = Leader(
        settings=live.current, pool=pool, upstream=upstream, kinds={"rec": rec}, live=live
    )
    async with leading(second, await grant_for(redis, key_prefix, "b")):
        await eventually(lambda: len(rec.runs) >= 5, timeout=20)
    slots = await slots_of(pool, "r")
    assert slots[0] == hour_ago
    assert all(s >= changed - timedelta(seconds=1) for s in slots[1:]), slots[:5]
    assert len(slots) < 60, "the hour under the new schedule was owed"


async def test_a_job_removed_and_added_back_does_not_owe_the_gap(
    pool: db.Pool, redis: Redis, key_prefix: str, upstream: Upstream, tmp_path: Path
) -> None:
    path = tmp_path / "jobs.toml"
    live = live_over(path, job("keep") + job("back"))
    rec = RecordingJob()
    leader = Leader(
        settings=live.current, pool=pool, upstream=upstream, kinds={"rec": rec}, live=live
    )
    async with leading(leader, await grant_for(redis, key_prefix, "a")):
        await eventually(lambda: any(r.job.name == "back" for r in rec.runs), timeout=10)
        path.write_text(job("keep"))
        live.reload("test")
        removed = datetime.now(UTC)
        await asyncio.sleep(3.0)
        path.write_text(job("keep") + job("back"))
        live.reload("test")
        added = datetime.now(UTC)
        await eventually(
            lambda: any(r.job.name == "back" and r.slot and r.slot >= added for r in rec.runs),
            timeout=10,
        )
    gap = [s for s in await slots_of(pool, "back") if removed + timedelta(seconds=1) < s < added]
    assert gap == [], f"slots of the removed span were run: {gap}"
    assert await pool.fetchval("SELECT removed_at FROM job_state WHERE job = 'back'") is None


# --- over HTTP, and between replicas ----------------------------------------------------


async def test_post_admin_reload_answers_the_change_and_asks_the_others(
    aiohttp_client: Any, pool: db.Pool, redis: Redis, key_prefix: str, tmp_path: Path
) -> None:
    path = tmp_path / "jobs.toml"
    live = live_over(path, job("a"), api_key="k", key_prefix=key_prefix, worker_id="one")
    state = WebState(
        settings=live.current,
        pool=pool,
        redis=redis,
        lease=Lease(redis, prefix=key_prefix),
        live=live,
    )
    live.subscribe(state.adopt)
    client = await aiohttp_client(build_app(state))
    # A second replica, mounting the same file, listening for the others' reloads.
    other = live_over(path, job("a"), key_prefix=key_prefix, worker_id="two")
    stop = asyncio.Event()
    listener = asyncio.create_task(reload.listen_for_reloads(redis, key_prefix, "two", other, stop))
    try:
        await asyncio.sleep(0.3)  # subscribed
        assert (await client.post("/admin/reload")).status == 401
        path.write_text(job("a") + job("b"))
        resp = await client.post("/admin/reload", headers={"X-API-Key": "k"})
        body = await resp.json()
        assert resp.status == 200, body
        assert body["added"] == ["b"]
        assert body["replica"] == "one"
        assert body["replicas_listening"] == 1  # "two" (this app runs no listener)
        names = [j["name"] for j in (await (await client.get("/jobs")).json())["jobs"]]
        assert "b" in names
        await eventually(lambda: other.current.job("b") is not None, timeout=5)

        path.write_text("[[jobs]]\nkind = 3\n")
        resp = await client.post("/admin/reload", headers={"X-API-Key": "k"})
        body = await resp.json()
        assert resp.status == 422
        assert body["error"]["code"] == "invalid_jobs_file"
        assert "field 'name' is required" in body["error"]["message"]
        assert state.settings.job("b") is not None, "the running jobs stay"
    finally:
        stop.set()
        await asyncio.wait_for(listener, 5)


# --- a real replica: SIGHUP and the file watch -------------------------------------------


async def jobs_of(http: aiohttp.ClientSession, url: str) -> list[str]:
    async with http.get(f"{url}/jobs") as resp:
        return [j["name"] for j in (await resp.json())["jobs"]]


async def test_sighup_and_the_file_watch_reload_a_running_replica(
    database_url: str, key_prefix: str, tmp_path: Path
) -> None:
    path = tmp_path / "jobs.toml"
    http_job = '[[jobs]]\nname = "{}"\nkind = "http"\n[jobs.params]\nurl = "http://127.0.0.1:1/"\n'
    path.write_text(http_job.format("first"))
    cluster = Cluster(
        database_url,
        REDIS_URL,
        key_prefix,
        path,
        tmp_path,
        extra_env={"WORKER_JOBS_WATCH": "0.2", "WORKER_LOG_FORMAT": "text"},
    )
    replica = cluster.start("hup")
    try:
        await cluster.wait_ready(replica)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            # The watch: a ConfigMap-style swap of the file.
            fresh = tmp_path / "swap.toml"
            fresh.write_text(http_job.format("first") + http_job.format("second"))
            fresh.replace(path)

            async def has(names: list[str]) -> bool:
                return await jobs_of(http, replica.url) == names

            await eventually(lambda: has(["first", "second"]), timeout=10)
            assert "jobs file reloaded (the file changed on disk): added second" in replica.log()

            # An invalid file: refused in the log, the replica and its jobs stay.
            path.write_text("[[jobs]]\nname = 1\n")
            await eventually(lambda: "reload (the file changed on disk) refused" in replica.log())
            assert await jobs_of(http, replica.url) == ["first", "second"]
            assert replica.proc.poll() is None

            # SIGHUP re-reads it (the watch is slower than the signal here by design).
            path.write_text(http_job.format("third"))
            os.kill(replica.proc.pid, signal.SIGHUP)
            await eventually(lambda: has(["third"]), timeout=10)
            assert "jobs file reloaded (" in replica.log()
    finally:
        cluster.stop_all()
    assert replica.proc.returncode == 0, replica.log()[-2000:]
