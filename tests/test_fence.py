"""The Postgres fence: a stale leader's writes are refused, terms are recorded."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from worker import db
from worker.errors import Fenced


async def test_fenced_write_with_stale_token_is_rejected(pool: db.Pool) -> None:
    await db.raise_fence(pool, token=5, holder="old")
    async with db.fenced(pool, 5) as conn:
        await conn.execute("INSERT INTO job_state (job) VALUES ('written-by-5')")
    await db.raise_fence(pool, token=6, holder="new")
    with pytest.raises(Fenced) as info:
        async with db.fenced(pool, 5) as conn:
            await conn.execute("INSERT INTO job_state (job) VALUES ('written-by-stale-5')")
    assert info.value.current == 6
    jobs = {r["job"] for r in await pool.fetch("SELECT job FROM job_state")}
    assert jobs == {"written-by-5"}


async def test_raise_fence_refuses_an_older_token(pool: db.Pool) -> None:
    await db.raise_fence(pool, token=9, holder="b")
    with pytest.raises(Fenced):
        await db.raise_fence(pool, token=8, holder="a")
    assert await pool.fetchval("SELECT token FROM fence") == 9


async def test_raise_waits_for_inflight_fenced_transaction(pool: db.Pool) -> None:
    """A transaction that passed the fence check commits before the new term starts."""
    await db.raise_fence(pool, token=1, holder="a")
    inside = asyncio.Event()
    release = asyncio.Event()

    async def old_leader_write() -> None:
        async with db.fenced(pool, 1) as conn:
            inside.set()
            await release.wait()
            await conn.execute("INSERT INTO job_state (job) VALUES ('in-flight')")

    writer = asyncio.create_task(old_leader_write())
    await inside.wait()
    raiser = asyncio.create_task(db.raise_fence(pool, token=2, holder="b"))
    await asyncio.sleep(0.2)
    assert not raiser.done(), "the raise must wait for the in-flight fenced transaction"
    release.set()
    await writer
    await raiser
    with pytest.raises(Fenced):
        async with db.fenced(pool, 1):
            pass


async def test_terms_are_recorded_and_closed(pool: db.Pool) -> None:
    await db.raise_fence(pool, token=3, holder="a")
    await db.raise_fence(pool, token=4, holder="b")
    await db.end_term(pool, token=4, reason="shutdown")
    rows = await pool.fetch(
        "SELECT token, holder, ended_at, end_reason FROM leader_terms ORDER BY token"
    )
    assert [(r["token"], r["holder"], r["end_reason"]) for r in rows] == [
        (3, "a", "superseded"),
        (4, "b", "shutdown"),
    ]
    assert all(r["ended_at"] is not None for r in rows)


async def test_a_session_idle_in_a_transaction_is_ended_by_the_server(database_url: str) -> None:
    """`hold` (the lease TTL in a replica) bounds how long a frozen leader's session can
    sit inside a transaction holding the fence row; statements are bounded server-side."""
    async with db.open_pool(database_url, timeout=3, hold=0.5, min_size=1, max_size=1) as pool:
        async with pool.acquire() as conn:
            assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == "500ms"
            assert await conn.fetchval("SHOW statement_timeout") == "4s"

            async def frozen_inside_a_transaction() -> None:
                async with conn.transaction():
                    await conn.fetchval("SELECT token FROM fence WHERE id = 1 FOR SHARE")
                    await asyncio.sleep(1.5)  # a leader frozen between two statements
                    await conn.fetchval("SELECT 1")

            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
                await frozen_inside_a_transaction()
        holders = await pool.fetchval(
            "SELECT count(*) FROM pg_locks WHERE relation = 'fence'::regclass"
            " AND mode = 'RowShareLock'"
        )
        assert holders == 0
