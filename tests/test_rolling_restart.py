"""A rolling restart during a sync: six SIGTERMs of the leader, and the sync still lands.

Real `worker run` processes. Each SIGTERM hands the sync off (its run is recorded
`abandoned`, `handed_off`), the next leader resumes it from its last committed page.
The old code counted every hand-off against the resume budget of 5 attempts: the
chain ended `abandoned: leadership ended: shutdown` with nothing queued, and no log
line said the sync was given up.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from worker import db
from worker.sandbox import SANDBOX

from .cluster import emag_sync_cluster, wait_new_holder
from .conftest import REDIS_URL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ITEMS = 3000  # 30 pages of 100 at 3 requests/s: about 10 s of sync without restarts
HANDOFFS = 6


async def test_a_sync_survives_a_rolling_restart_without_spending_attempts(
    tmp_path: Path, database_url: str, key_prefix: str, redis: Redis
) -> None:
    async with emag_sync_cluster(tmp_path, database_url, REDIS_URL, key_prefix, items=ITEMS) as (
        app,
        cluster,
    ):
        for i in range(3):
            cluster.start(f"r{i}")
        await asyncio.gather(*(cluster.wait_ready(r) for r in cluster.replicas))
        holder, token, _ = await wait_new_holder(redis, key_prefix, not_token=None, timeout=10)
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{cluster.by_id(holder).url}/jobs/emag-main/trigger",
                headers={"X-API-Key": cluster.api_key},
            ) as resp,
        ):
            assert resp.status == 202
            first = (await resp.json())["run_id"]

        async with db.open_pool(database_url) as pool:
            # Rolling restart: SIGTERM the leader once its sync has moved on, start a
            # replacement, repeat.
            for n in range(HANDOFFS):
                await _wait_progress(pool)
                leader = cluster.by_id(holder)
                os.kill(leader.proc.pid, signal.SIGTERM)
                holder, token, _ = await wait_new_holder(
                    redis, key_prefix, not_token=token, timeout=10
                )
                assert leader.proc.wait(timeout=15) == 0
                await cluster.wait_ready(cluster.start(f"r{3 + n}"))

            deadline = time.monotonic() + 90
            while True:
                last = await pool.fetchrow(
                    "SELECT id, status, attempt, stats FROM runs WHERE job = 'emag-main'"
                    " ORDER BY id DESC LIMIT 1"
                )
                if last["status"] not in ("queued", "running", "abandoned"):
                    break
                assert time.monotonic() < deadline, f"the sync never finished: {dict(last)}"
                await asyncio.sleep(0.2)
            chain = await pool.fetch(
                "SELECT id, status, attempt, handed_off, given_up_at FROM runs"
                " WHERE job = 'emag-main' ORDER BY id"
            )
            products = await pool.fetchval(
                "SELECT count(*) FROM products WHERE source = 'emag' AND gone_at IS NULL"
            )
        handed_off = [r for r in chain if r["status"] == "abandoned"]
        assert len(handed_off) >= HANDOFFS - 1, [dict(r) for r in chain]
        assert all(r["handed_off"] for r in handed_off)
        assert all(r["given_up_at"] is None for r in chain)
        assert {r["attempt"] for r in chain} == {1}, "a hand-off spent an attempt"
        assert chain[0]["id"] == first
        assert last["status"] == "succeeded", [dict(r) for r in chain]
        assert last["stats"]["items"] == ITEMS
        expected = {str(o["id"]) for o in app[SANDBOX].catalog.emag_offers("ro", "main")}
        assert products == len(expected)


async def _wait_progress(pool: db.Pool) -> None:
    """Until the running run of the sync has committed a page of its own."""
    deadline = time.monotonic() + 30
    while True:
        moved = await pool.fetchval(
            "SELECT count(*) FROM runs WHERE job = 'emag-main' AND status = 'running'"
            " AND cursor IS NOT NULL AND cursor IS DISTINCT FROM ("
            "   SELECT p.cursor FROM runs p WHERE p.id = runs.resumed_from)"
        )
        if moved:
            return
        assert time.monotonic() < deadline, "the sync made no progress"
        await asyncio.sleep(0.05)
