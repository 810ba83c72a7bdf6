"""Webhooks on run completion (issue 11, item 3): signed, written to an outbox in the
transaction that ends the run, delivered by the leader with retries, never lost across
a leader crash, never slowing a run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from redis.asyncio import Redis

from worker import db, metrics, pauses, runs, webhooks
from worker.config import Settings
from worker.errors import ConfigError
from worker.lease import Lease
from worker.scheduler import Leader
from worker.upstream import Upstream

from .cluster import free_port
from .helpers import RecordingJob, eventually, grant_for, leading, settings_with_jobs
from .test_leader_faults import upstream

__all__ = ["upstream"]  # the fixture, imported for pytest

SECRET = "whsec-test-0123456789"

JOB = """
[[jobs]]
name = "hooked"
kind = "rec"
schedule = "* * * * * *"
misfire = "skip"
{extra}
[jobs.params]
sleep = 0
"""


@dataclass
class Hit:
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = orjson.loads(self.body)
        return parsed


@dataclass
class Receiver:
    """A webhook receiver: answers each request with `plan`'s next entry ("ok", "fail",
    "hang"), then `after`; records every request it got, before answering."""

    plan: list[str] = field(default_factory=list)
    after: str = "ok"
    hits: list[Hit] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        self.hits.append(Hit(dict(request.headers), await request.read(), time.monotonic()))
        what = self.plan.pop(0) if self.plan else self.after
        if what == "hang":
            await asyncio.sleep(3600)
        if what == "fail":
            return web.Response(status=503, text="busy, try later")
        return web.Response(text="ok")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver(port=free_port())
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", rec.port).start()
    try:
        yield rec
    finally:
        await runner.cleanup()


def hooked_settings(tmp_path: Path, database_url: str, url: str, **more: Any) -> Settings:
    options: dict[str, Any] = {"webhook_backoff": 0.2, "webhook_timeout": 2.0, **more}
    return settings_with_jobs(
        tmp_path,
        JOB.format(extra=f'webhooks = ["{url}"]'),
        database_url=database_url,
        webhook_secret=SECRET,
        **options,
    )


async def outbox(pool: db.Pool) -> list[dict[str, Any]]:
    return [dict(r) for r in await pool.fetch("SELECT * FROM webhook_outbox ORDER BY id")]


# --- signing -------------------------------------------------------------------------


def signed(body: bytes, stamp: int, secret: str = SECRET) -> dict[str, str]:
    return {
        webhooks.TIMESTAMP_HEADER: str(stamp),
        webhooks.SIGNATURE_HEADER: webhooks.sign(secret, stamp, body),
    }


def test_a_receiver_accepts_our_signature_and_refuses_forgeries_and_replays() -> None:
    body = b'{"event":"run.succeeded","run_id":7}'
    now = int(time.time())
    webhooks.verify(SECRET, signed(body, now), body)
    with pytest.raises(webhooks.BadSignature, match="does not match"):
        webhooks.verify(SECRET, signed(body, now), body.replace(b"7", b"8"))
    with pytest.raises(webhooks.BadSignature, match="does not match"):
        webhooks.verify(SECRET, signed(body, now, secret="guess"), body)
    # A captured request sent again later: the signature is right, the time is not.
    with pytest.raises(webhooks.BadSignature, match="a replay"):
        webhooks.verify(SECRET, signed(body, now - 3600), body)
    # The timestamp is signed too: moving it forward breaks the signature.
    moved = {**signed(body, now - 3600), webhooks.TIMESTAMP_HEADER: str(now)}
    with pytest.raises(webhooks.BadSignature, match="does not match"):
        webhooks.verify(SECRET, moved, body)
    with pytest.raises(webhooks.BadSignature, match="missing"):
        webhooks.verify(SECRET, {}, body)


def test_webhooks_need_a_secret_and_real_urls(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text(JOB.format(extra='webhooks = ["https://hooks.example/x"]'))
    env = {"WORKER_JOBS_FILE": str(path)}
    with pytest.raises(ConfigError, match=r"job 'hooked': webhooks: .*WORKER_WEBHOOK_SECRET"):
        Settings.from_env(env)
    assert Settings.from_env({**env, "WORKER_WEBHOOK_SECRET": "x"}).webhook_targets() == [
        ("hooked", "https://hooks.example/x")
    ]
    path.write_text(JOB.format(extra='webhooks = ["ftp://hooks.example/x"]'))
    with pytest.raises(ConfigError, match="field 'webhooks': expected an http"):
        Settings.from_env({**env, "WORKER_WEBHOOK_SECRET": "x"})
    with pytest.raises(ConfigError, match="WORKER_WEBHOOK_URLS: expected an http"):
        Settings.from_env({"WORKER_WEBHOOK_URLS": "https://a.example/, hooks"})


# --- the outbox: written with the run's end, only then ---------------------------------


async def test_every_way_a_run_ends_writes_its_delivery_in_the_same_transaction(
    pool: db.Pool,
) -> None:
    async with pool.acquire() as conn:
        await webhooks.sync_targets(
            conn, [("*", "http://all.example/"), ("a", "http://a.example/")]
        )
        running = await conn.fetchval(
            "INSERT INTO runs (job, kind, trigger, status, started_at)"
            " VALUES ('a', 'k', 'manual', 'running', now()) RETURNING id"
        )
        queued = await conn.fetchval(
            "INSERT INTO runs (job, kind, trigger, status) VALUES ('b', 'k', 'manual', 'queued')"
            " RETURNING id"
        )
    assert await outbox(pool) == [], "a run that did not end has no delivery"

    # Ended, then rolled back (a fenced transaction refused, a crash): no delivery.
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        assert await runs.finish(conn, running, status="succeeded")
        assert len(await conn.fetch("SELECT 1 FROM webhook_outbox")) == 2
        await tx.rollback()
    assert await outbox(pool) == []

    async with pool.acquire() as conn:
        assert await runs.finish(conn, running, status="failed", error="boom")
    assert await runs.request_cancel(pool, queued, by="api:test") == "queued"
    async with pool.acquire() as conn:
        slot = await conn.fetchval("SELECT now() - interval '1 h'")
        await runs.record_missed_many(conn, [("b", "k", slot, "x")])
    await pauses.pause(pool, "b", by="ops", note="upstream down")
    rows = await outbox(pool)
    got = sorted((r["event"], r["job"], r["url"]) for r in rows)
    assert got == [
        ("job.paused", "b", "http://all.example/"),
        ("run.cancelled", "b", "http://all.example/"),
        ("run.failed", "a", "http://a.example/"),
        ("run.failed", "a", "http://all.example/"),
        ("run.missed", "b", "http://all.example/"),
    ]
    failed = next(r for r in rows if r["event"] == "run.failed")
    assert failed["payload"]["run_id"] == running
    assert failed["payload"]["error"] == "boom"
    assert failed["payload"]["status"] == "failed"
    assert failed["payload"]["finished_at"] is not None
    paused = next(r for r in rows if r["event"] == "job.paused")
    assert paused["payload"]["note"] == "upstream down"
    assert len({r["event_id"] for r in rows}) == len(rows)


async def test_an_abandoned_run_that_nothing_resumes_is_reported_failed_once(
    pool: db.Pool,
) -> None:
    """A dead leader's runs are abandoned by the reaper: the resumable one goes on in a
    resume (no event yet); the one whose kind does not resume ends there: run.failed,
    once. A run abandoned long before is left alone."""
    async with pool.acquire() as conn:
        await webhooks.sync_targets(conn, [("*", "http://all.example/")])
        ids = [
            await conn.fetchval(
                "INSERT INTO runs (job, kind, trigger, status, token, started_at, heartbeat_at)"
                " VALUES ($1, $2, 'schedule', 'running', 3, now() - interval '10 min',"
                " now() - interval '10 min') RETURNING id",
                job,
                kind,
            )
            for job, kind in (("call", "http"), ("sync", "res"))
        ]
        old = await conn.fetchval(
            "INSERT INTO runs (job, kind, trigger, status, finished_at)"
            " VALUES ('call', 'http', 'schedule', 'abandoned', now() - interval '3 days')"
            " RETURNING id"
        )
    for _ in range(2):  # a second pass of the reaper finds nothing more to report
        async with pool.acquire() as conn, conn.transaction():
            await runs.reap(conn, token=4, stale_after=60, live=[])
            await runs.end_unresumable(conn, resumable=["res"])
    rows = await outbox(pool)
    assert [(r["event"], r["payload"]["run_id"]) for r in rows] == [("run.failed", ids[0])]
    assert rows[0]["payload"]["status"] == "abandoned"
    assert "does not resume" in rows[0]["payload"]["error"]
    statuses = dict(await pool.fetch("SELECT id, given_up_at IS NOT NULL FROM runs"))
    assert statuses == {ids[0]: True, ids[1]: False, old: False}


# --- delivery ---------------------------------------------------------------------------


async def test_the_leader_delivers_signed_events_that_the_receiver_verifies(
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
    tmp_path: Path,
    receiver: Receiver,
) -> None:
    settings = hooked_settings(tmp_path, database_url, receiver.url)
    rec = RecordingJob()
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"rec": rec})
    async with leading(leader, await grant_for(redis, key_prefix, "a")):
        await eventually(lambda: len(receiver.hits) >= 2, timeout=15)
        # ... and their answers recorded, before the term ends.
        await eventually(
            lambda: pool.fetchval(
                "SELECT count(*) >= 2 FROM webhook_outbox WHERE state = 'delivered'"
            ),
            timeout=15,
        )
    for hit in receiver.hits:
        webhooks.verify(SECRET, hit.headers, hit.body)
        event = hit.event
        assert event["event"] == hit.headers[webhooks.EVENT_HEADER] == "run.succeeded"
        assert event["id"] == hit.headers[webhooks.ID_HEADER]
        assert event["job"] == "hooked"
        assert set(event) >= {"run_id", "slot", "status", "stats", "error", "started_at"}
        run = await runs.get(pool, event["run_id"])
        assert run is not None
        assert run["status"] == "succeeded"
    delivered = [r for r in await outbox(pool) if r["state"] == "delivered"]
    assert len(delivered) >= 2
    assert all(r["attempts"] == 1 for r in delivered)
    shown = await webhooks.for_run(pool, receiver.hits[0].event["run_id"])
    assert shown[0]["state"] == "delivered"
    assert shown[0]["history"][0]["status"] == 200


async def test_a_failing_receiver_is_retried_with_the_same_event_then_given_up(
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
    tmp_path: Path,
    receiver: Receiver,
) -> None:
    receiver.plan = ["fail", "fail"]
    receiver.after = "ok"
    settings = hooked_settings(tmp_path, database_url, receiver.url, webhook_max_attempts=3)
    async with pool.acquire() as conn:
        await webhooks.sync_targets(conn, settings.webhook_targets())
        run_id = await conn.fetchval(
            "INSERT INTO runs (job, kind, trigger, status) VALUES ('hooked', 'rec', 'manual',"
            " 'succeeded') RETURNING id"
        )
    await Lease(redis, prefix=key_prefix).raise_epoch(10)
    grant = await grant_for(redis, key_prefix, "a")
    async with pool.acquire() as conn:
        await conn.execute("UPDATE fence SET token = $1 WHERE id = 1", grant.token)
    given_up = metrics.WEBHOOK_DELIVERIES.labels("given_up")._value.get()
    deliverer = webhooks.Deliverer(
        pool=pool, token=grant.token, secret=SECRET, timeout=2, max_attempts=3, backoff=0.2
    )
    task = asyncio.create_task(deliverer.run())
    try:
        await eventually(lambda: len(receiver.hits) >= 3, timeout=15)
        [row] = await webhooks.for_run(pool, run_id)
        assert len({h.headers[webhooks.ID_HEADER] for h in receiver.hits}) == 1
        await eventually(
            lambda: pool.fetchval("SELECT state = 'delivered' FROM webhook_outbox"), timeout=5
        )
        [row] = await webhooks.for_run(pool, run_id)
        assert row["attempts"] == 3
        assert [h["status"] for h in row["history"]] == [503, 503, 200]
        assert "busy, try later" in row["history"][0]["error"]
        # Backoff: the retries were spaced, not sent back to back.
        assert receiver.hits[2].at - receiver.hits[0].at >= 0.2 * 0.8 * 3 - 0.05

        # A receiver that never takes it: given up after max_attempts, counted, kept.
        receiver.after = "fail"
        async with pool.acquire() as conn:
            await conn.execute("UPDATE runs SET status = 'failed' WHERE id = $1", run_id)
        await eventually(
            lambda: pool.fetchval("SELECT count(*) FROM webhook_outbox WHERE state = 'failed'"),
            timeout=15,
        )
        assert metrics.WEBHOOK_DELIVERIES.labels("given_up")._value.get() == given_up + 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_delivery_cut_by_a_leader_crash_is_sent_by_the_next_leader_with_its_id(
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
    tmp_path: Path,
    receiver: Receiver,
) -> None:
    """The worst moment: the receiver got the request, and the leader died before it
    heard the answer. The next leader sends it again, with the same event id."""
    receiver.plan = ["hang"]
    settings = hooked_settings(tmp_path, database_url, receiver.url, webhook_timeout=30.0)
    rec = RecordingJob()
    first = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"rec": rec})
    async with leading(first, await grant_for(redis, key_prefix, "a")):
        await eventually(lambda: len(receiver.hits) >= 1, timeout=15)
        # Pause the schedule: the next term runs nothing new, only the outbox.
        await pauses.pause(pool, "hooked", by="test", note="")
    cut = receiver.hits[0].headers[webhooks.ID_HEADER]
    row = await pool.fetchrow("SELECT * FROM webhook_outbox WHERE event_id = $1::uuid", cut)
    assert row["state"] == "pending"
    assert row["attempts"] == 0, "the cut attempt must not count as answered"
    # The claim outlives the term (timeout + 5 s): shorten it, as if that time had passed.
    async with pool.acquire() as conn:
        await conn.execute("UPDATE webhook_outbox SET next_attempt_at = now()")
    await Lease(redis, prefix=key_prefix).raise_epoch(100)
    await redis.delete(f"{key_prefix}leader")
    second = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"rec": rec})
    async with leading(second, await grant_for(redis, key_prefix, "b")):
        await eventually(
            lambda: pool.fetchval(
                "SELECT state = 'delivered' FROM webhook_outbox WHERE event_id = $1::uuid", cut
            ),
            timeout=15,
        )
        # The others of the first term (the pause's job.paused among them) go too.
        await eventually(
            lambda: pool.fetchval(
                "SELECT count(*) = 0 FROM webhook_outbox WHERE state = 'pending'"
            ),
            timeout=15,
        )
    again = [h for h in receiver.hits[1:] if h.headers[webhooks.ID_HEADER] == cut]
    assert len(again) == 1, "sent once more, with the same event id"
    assert again[0].body == receiver.hits[0].body


async def test_a_hanging_receiver_does_not_slow_the_runs(
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
    tmp_path: Path,
    receiver: Receiver,
) -> None:
    receiver.after = "hang"
    settings = hooked_settings(tmp_path, database_url, receiver.url, webhook_timeout=60.0)
    rec = RecordingJob()
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"rec": rec})
    async with leading(leader, await grant_for(redis, key_prefix, "a")):
        await eventually(lambda: len(receiver.hits) >= 1, timeout=15)
        # Every delivery hangs (8 at a time, a minute each): the schedule goes on.
        await eventually(lambda: len(rec.runs) >= len(receiver.hits) + 3, timeout=15)
    rows = await pool.fetch(
        "SELECT finished_at - started_at AS took FROM runs"
        " WHERE job = 'hooked' AND status = 'succeeded'"
    )
    assert len(rows) >= 4
    assert max(r["took"].total_seconds() for r in rows) < 2.0


async def test_prune_drops_old_answered_deliveries_and_keeps_pending_ones(pool: db.Pool) -> None:
    async with pool.acquire() as conn:
        for state, age in (("delivered", 30), ("failed", 30), ("pending", 30), ("delivered", 1)):
            await conn.execute(
                "INSERT INTO webhook_outbox (event, job, url, payload, state, created_at)"
                " VALUES ('run.succeeded', 'j', 'http://x/', '{}', $1,"
                " now() - make_interval(days => $2))",
                state,
                age,
            )
        assert await webhooks.prune(conn, keep=7 * 86400) == 2
    left = sorted(r["state"] for r in await outbox(pool))
    assert left == ["delivered", "pending"]
