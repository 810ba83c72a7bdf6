"""A dying actor ends the process non-zero instead of leaving a zombie replica."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from redis.asyncio import Redis

from worker import db
from worker.app import _supervise
from worker.config import Settings
from worker.lease import Lease
from worker.web.app import WebState


async def test_actor_crash_exits_non_zero_and_stops_the_rest(
    pool: db.Pool, redis: Redis, key_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = WebState(
        settings=Settings(), pool=pool, redis=redis, lease=Lease(redis, prefix=key_prefix)
    )
    stop = asyncio.Event()
    stopped_cleanly = asyncio.Event()

    async def broken() -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("boom")

    async def well_behaved() -> None:
        await stop.wait()
        stopped_cleanly.set()

    actors = {
        asyncio.create_task(broken(), name="broken"),
        asyncio.create_task(well_behaved(), name="healthy"),
    }
    code = await _supervise(actors, stop, state, grace=5)
    assert code == 1
    assert state.shutting_down.is_set()
    assert stopped_cleanly.is_set()
    assert any("actor broken died" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_signal_stop_exits_zero(pool: db.Pool, redis: Redis, key_prefix: str) -> None:
    state = WebState(
        settings=Settings(), pool=pool, redis=redis, lease=Lease(redis, prefix=key_prefix)
    )
    stop = asyncio.Event()

    async def actor() -> None:
        await stop.wait()

    task = asyncio.create_task(actor(), name="actor")
    asyncio.get_running_loop().call_later(0.05, stop.set)
    assert await _supervise({task}, stop, state, grace=5) == 0


async def test_a_library_report_is_not_a_crash_but_a_lost_exception_is(
    pool: db.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """asyncpg reports "Resetting connection with an active transaction" to the event
    loop's exception handler when a connection goes back to the pool inside a
    transaction (a leader woken from a freeze). The old handler took every report for
    a crash and stopped the replica with exit 1."""
    from worker.app import stray_error_handler

    loop = asyncio.get_running_loop()
    crashed, stop = asyncio.Event(), asyncio.Event()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(stray_error_handler(crashed, stop))
    try:
        conn = await pool.acquire()
        await conn.transaction().start()  # not managed: left open on release
        await pool.release(conn)
        assert any(
            "Resetting connection with an active transaction" in r.getMessage()
            for r in caplog.records
        ), "asyncpg's report did not reach the handler"
        assert not crashed.is_set()
        assert not stop.is_set()

        async def lost() -> None:
            raise RuntimeError("nobody awaits me")

        task = asyncio.ensure_future(lost())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        del task  # the "exception was never retrieved" report comes when it is collected
        import gc

        gc.collect()
        assert crashed.is_set()
        assert stop.is_set()
    finally:
        loop.set_exception_handler(previous)


async def test_a_library_future_holding_a_lost_connection_is_not_a_crash() -> None:
    """Seen in the frozen-leader test: when the woken leader's connection turned out to
    be ended, asyncpg left a bare future holding ConnectionDoesNotExistError that
    nobody awaited; the replica took the report for a crash and exited 1."""
    import gc

    import asyncpg

    from worker.app import stray_error_handler

    loop = asyncio.get_running_loop()
    crashed, stop = asyncio.Event(), asyncio.Event()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(stray_error_handler(crashed, stop))
    try:
        future = loop.create_future()
        future.set_exception(
            asyncpg.exceptions.ConnectionDoesNotExistError(
                "connection was closed in the middle of operation"
            )
        )
        del future
        gc.collect()
        await asyncio.sleep(0)
        assert not crashed.is_set()
    finally:
        loop.set_exception_handler(previous)


async def test_a_driver_task_holding_a_lost_connection_is_not_a_crash_but_ours_is() -> None:
    """Seen in the chaos suite's partition from Postgres: asyncpg's own task releasing a
    connection cut off ended with TimeoutError that nobody awaited, and the replica took
    it for a crash. A task of our code losing an exception is still one."""
    import gc

    import asyncpg

    from worker.app import stray_error_handler

    loop = asyncio.get_running_loop()
    crashed, stop = asyncio.Event(), asyncio.Event()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(stray_error_handler(crashed, stop))
    try:
        driver = asyncio.ensure_future(asyncpg.connect("postgresql://127.0.0.1:1/x", timeout=2))
        await asyncio.wait([driver])
        assert isinstance(driver.exception(), OSError)  # looked at: clear it, then lose one
        driver = asyncio.ensure_future(asyncpg.connect("postgresql://127.0.0.1:1/x", timeout=2))
        await asyncio.wait([driver])
        del driver
        gc.collect()
        await asyncio.sleep(0)
        assert not crashed.is_set()

        async def ours() -> None:
            raise TimeoutError("a bug of ours that nobody awaited")

        task = asyncio.ensure_future(ours())
        await asyncio.wait([task])
        del task
        gc.collect()
        await asyncio.sleep(0)
        assert crashed.is_set()
    finally:
        loop.set_exception_handler(previous)
