"""A leader that cannot reach Postgres hands the lease on (found by the chaos suite).

Its pool goes through a proxy the test cuts: a partition, while nothing is wrong with
Redis. The leader used to keep leading, every tick failing, for as long as the
partition lasted. Now its first tick that fails after a whole lease TTL without the
database ends the term, and closing the term (its runs recording their ends through
the dead database) is bounded by half the shutdown grace.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import pytest

from worker import db
from worker.config import LeaseSettings, Settings
from worker.election import StepDown
from worker.lease import Grant
from worker.scheduler import Leader
from worker.upstream import Upstream

from ..test_catalog_sync import upstream
from .harness import through
from .proxy import Proxy

__all__ = ["upstream"]  # the fixture

TTL = 1.0
DB_TIMEOUT = 1.0
GRACE = 2.0


async def test_a_leader_cut_off_from_postgres_steps_down(
    database_url: str, upstream: Upstream
) -> None:
    async with (
        Proxy("127.0.0.1", urlsplit(database_url).port or 5432) as proxy,
        db.open_pool(through(database_url, proxy.port), timeout=DB_TIMEOUT) as pool,
    ):
        token = int(await pool.fetchval("SELECT token FROM fence")) + 1
        settings = Settings(
            database_url=through(database_url, proxy.port),
            worker_id="cut-off",
            lease=LeaseSettings(ttl=TTL, renew_deadline=0.6, retry=0.2),
            db_timeout=DB_TIMEOUT,
            shutdown_grace=GRACE,
        )
        leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={})
        grant = Grant(holder="cut-off", token=token, since="", address="", raw=b"")
        task = asyncio.create_task(leader.run(grant))
        try:
            deadline = time.monotonic() + 10
            while not await pool.fetchval("SELECT count(*) FROM leader_terms"):
                assert time.monotonic() < deadline, "the term never started"
                assert not task.done(), task
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # a few good ticks
            proxy.cut()
            cut = time.monotonic()
            with pytest.raises(StepDown, match="no database for"):
                await asyncio.wait_for(task, timeout=15)
            took = time.monotonic() - cut
        finally:
            task.cancel()
            proxy.heal()
    # The next tick (within a second) fails after the database timeout, a TTL after the
    # last good one; the term's close then takes at most half the grace. Measured 3.5 s.
    bound = 1.0 + DB_TIMEOUT + GRACE / 2 + 3.0  # slack for a loaded machine
    assert took < bound, f"stepped down {took:.1f}s after the cut"
    print(f"stepped down {took:.2f}s after the cut")
