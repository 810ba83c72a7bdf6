"""Retention: old finished runs go, the newest slot of each job and live runs stay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from worker import db, runs


async def test_prune_keeps_the_slot_ledger_and_active_runs(pool: db.Pool) -> None:
    old = datetime.now(UTC) - timedelta(days=30)

    async def add(job: str, slot: datetime | None, status: str, age: datetime) -> int:
        run_id: int = await pool.fetchval(
            "INSERT INTO runs (job, kind, slot, trigger, status, created_at, finished_at)"
            " VALUES ($1, 'http', $2, $3, $4, $5, $6) RETURNING id",
            job,
            slot,
            "schedule" if slot else "manual",
            status,
            age,
            age if status in runs.FINAL else None,
        )
        return run_id

    oldest = await add("a", old, "succeeded", old)
    newest_slot_of_a = await add("a", old + timedelta(minutes=1), "missed", old)
    old_manual = await add("a", None, "failed", old)
    queued = await add("b", None, "queued", old)
    recent = await add("b", datetime.now(UTC), "succeeded", datetime.now(UTC))
    resumed = await pool.fetchval(
        "INSERT INTO runs (job, kind, trigger, status, resumed_from) VALUES"
        " ('a', 'http', 'resume', 'queued', $1) RETURNING id",
        old_manual,
    )
    await pool.execute("INSERT INTO sync_seen (run_id, external_id) VALUES ($1, 'x')", oldest)

    async with pool.acquire() as conn:
        pruned = await runs.prune(conn, keep=7 * 86400)

    left = {r["id"] for r in await pool.fetch("SELECT id FROM runs")}
    assert pruned == 2
    assert left == {newest_slot_of_a, queued, recent, resumed}
    assert await pool.fetchval("SELECT resumed_from FROM runs WHERE id = $1", resumed) is None
    assert await pool.fetchval("SELECT count(*) FROM sync_seen") == 0
    # The newest slot the scheduler decided stays: where its planning picks up.
    newest = "SELECT max(slot) FROM runs WHERE job = 'a' AND trigger <> 'backfill'"
    assert await pool.fetchval(newest) == old + timedelta(minutes=1)


async def test_prune_keeps_parsing_operations_nobody_has_read(pool: db.Pool) -> None:
    """Their results go only through POST /parsing/cleanup, once processed: the run
    retention used to delete them (and, by cascade, their events) unread."""
    from worker import run_items

    await db.raise_fence(pool, token=1, holder="t")
    ids = {}
    for name, processed in (("unread", False), ("read", True)):
        ids[name] = await pool.fetchval(
            "INSERT INTO runs (job, kind, trigger, status, created_at, finished_at,"
            " processed_at) VALUES ('p', 'parse.test', 'api', 'succeeded',"
            " now() - interval '30 days', now() - interval '30 days',"
            " CASE WHEN $1 THEN now() END) RETURNING id",
            processed,
        )
        async with db.fenced(pool, 1) as conn:
            await run_items.save_batch(conn, ids[name], batch=1, first_seq=0, items=[{"e": 1}])
    resume = await pool.fetchval(
        "INSERT INTO runs (job, kind, trigger, status, resumed_from, created_at, finished_at)"
        " VALUES ('p', 'parse.test', 'resume', 'succeeded', $1, now() - interval '30 days',"
        " now() - interval '30 days') RETURNING id",
        ids["unread"],
    )
    async with db.fenced(pool, 1) as conn:
        await runs.prune(conn, keep=86400)
    left = {r["id"] for r in await pool.fetch("SELECT id FROM runs")}
    assert left == {ids["unread"], resume}
    assert await run_items.read(pool, ids["unread"]) == [{"e": 1}]
