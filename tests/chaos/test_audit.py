"""The fence audit (migration 0014) and its check (`audit.py`): what it records, that it
can fail, and that it does not fail on what the fence allows."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from worker import catalog, db
from worker.catalog import Item
from worker.errors import Fenced

from .audit import assert_fence_held, stale_writes

ITEMS = [Item(external_id=str(i), raw={"id": i}) for i in range(1000)]
INSERT_RUN = "INSERT INTO runs (job, kind, trigger, status) VALUES ($1, 'x', 'manual', 'queued')"


async def audit_rows(pool: db.Pool) -> list[dict[str, Any]]:
    rows = await pool.fetch("SELECT tbl, token, first_at, at FROM write_audit ORDER BY id")
    return [dict(r) for r in rows]


async def test_each_fenced_transaction_is_audited_once_per_table_with_its_token(
    pool: db.Pool,
) -> None:
    await db.raise_fence(pool, token=3, holder="a")
    before = len(await audit_rows(pool))
    async with db.fenced(pool, 3) as conn:
        await conn.executemany(INSERT_RUN, [(f"job-{i}",) for i in range(500)])
        await conn.execute("UPDATE runs SET status = 'running' WHERE job LIKE 'job-%'")
        await conn.execute("UPDATE runs SET status = 'failed' WHERE false")  # no row: no write
    async with db.fenced(pool, 3) as conn:
        await conn.execute("UPDATE job_state SET error = 'x' WHERE false")
    async with db.fenced(pool, 3) as conn:  # the bulk tables: one row per table too
        for _ in range(2):
            await catalog.upsert(conn, source="s", account="a", items=ITEMS, seen_by=1)
    await pool.execute(INSERT_RUN, "from-the-api")  # not fenced: no token

    rows = (await audit_rows(pool))[before:]
    assert [(r["tbl"], r["token"]) for r in rows] == [
        ("runs", 3),
        ("products", 3),
        ("sync_seen", 3),
        ("runs", None),
    ]
    assert rows[0]["at"] > rows[0]["first_at"]  # the UPDATE came after the INSERTs
    assert rows[1]["at"] > rows[1]["first_at"]  # the second merge
    assert await assert_fence_held(pool) == 3


async def test_the_check_flags_a_write_of_an_old_token_that_bypassed_the_fence(
    pool: db.Pool,
) -> None:
    await db.raise_fence(pool, token=1, holder="old")
    async with db.fenced(pool, 1) as conn:
        await conn.execute(INSERT_RUN, "in-term")
    await db.raise_fence(pool, token=2, holder="new")
    assert await stale_writes(pool) == []
    with pytest.raises(Fenced):
        async with db.fenced(pool, 1) as conn:
            await conn.execute(INSERT_RUN, "refused")
    assert await stale_writes(pool) == []

    # What a leader without the fence would do: write as token 1 after term 2 began.
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT set_config('worker.token', '1', true)")
        await conn.execute(INSERT_RUN, "stale")

    stale = await stale_writes(pool)
    assert [(s.tbl, s.token) for s in stale] == [("runs", 1)]
    assert "after term 2 started" in stale[0].why
    with pytest.raises(AssertionError, match="writes landed after a newer term began"):
        await assert_fence_held(pool)


async def test_the_check_flags_a_token_that_never_started_a_term(pool: db.Pool) -> None:
    await db.raise_fence(pool, token=1, holder="a")
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT set_config('worker.token', '7', true)")
        await conn.execute(INSERT_RUN, "made-up")
    assert [s.why for s in await stale_writes(pool)] == ["no term with this token ever started"]


async def test_a_write_committed_while_the_raise_waits_comes_before_the_new_term(
    pool: db.Pool,
) -> None:
    """The raise waits for the fence lock of a fenced transaction still open. That
    transaction may write and commit after the raise began, but before the raise got the
    row: the new term starts then. Recorded at the raise transaction's start (`now()`),
    the term would seem to begin before the old term's last write."""
    await db.raise_fence(pool, token=1, holder="old")
    async with db.fenced(pool, 1) as conn:
        raise_began = await conn.fetchval("SELECT clock_timestamp()")
        raising = asyncio.create_task(db.raise_fence(pool, token=2, holder="new", lock_wait=5))
        await asyncio.sleep(0.2)
        assert not raising.done()
        await conn.execute(INSERT_RUN, "last-of-term-1")
    assert await raising == []  # it waited: nobody was ended
    last = await pool.fetchval("SELECT max(at) FROM write_audit WHERE token = 1")
    started = await pool.fetchval("SELECT started_at FROM leader_terms WHERE token = 2")
    assert raise_began < last < started
    await assert_fence_held(pool)


async def test_audit_rows_older_than_the_retention_are_pruned(pool: db.Pool) -> None:
    await db.raise_fence(pool, token=1, holder="a")
    async with db.fenced(pool, 1) as conn:
        await conn.execute(INSERT_RUN, "old")
    await pool.execute("UPDATE write_audit SET first_at = first_at - interval '2 days'")
    async with db.fenced(pool, 1) as conn:
        await conn.execute(INSERT_RUN, "new")
        assert await db.prune_audit(conn, keep=86400) == 2  # the raise's and the old write
    assert [r["token"] for r in await audit_rows(pool)] == [1]
