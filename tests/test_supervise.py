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
