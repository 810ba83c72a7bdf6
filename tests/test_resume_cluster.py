"""A sync whose leader is `kill -9`ed mid-run is resumed by the next leader from its cursor."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from worker import db
from worker.sandbox import REQUESTS, SANDBOX

from .cluster import emag_sync_cluster, wait_new_holder
from .conftest import REDIS_URL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ITEMS = 3000  # 30 pages of 100 at 3 requests/s: about 10 s of sync


async def test_killed_leader_sync_resumes_from_cursor(
    tmp_path: Path, database_url: str, key_prefix: str, redis: Redis
) -> None:
    async with emag_sync_cluster(
        tmp_path,
        database_url,
        REDIS_URL,
        key_prefix,
        items=ITEMS,
        extra_env={"WORKER_REAP_AFTER": "1s"},
    ) as (app, cluster):
        for i in range(2):
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
            first_run = (await resp.json())["run_id"]

        async with db.open_pool(database_url) as pool:
            # Kill the leader once a third of the pages are committed.
            deadline = time.monotonic() + 30
            while True:
                cursor = await pool.fetchval("SELECT cursor FROM runs WHERE id = $1", first_run)
                if cursor and cursor["page"] > 10:
                    break
                assert time.monotonic() < deadline, "the sync made no progress"
                await asyncio.sleep(0.05)
            os.kill(cluster.by_id(holder).proc.pid, signal.SIGKILL)
            await wait_new_holder(redis, key_prefix, not_token=token, timeout=10)

            deadline = time.monotonic() + 60
            while True:
                resumed = await pool.fetchrow(
                    "SELECT id, status, stats, resumed_from, cursor FROM runs"
                    " WHERE trigger = 'resume' ORDER BY id DESC LIMIT 1"
                )
                if resumed and resumed["status"] not in ("queued", "running"):
                    break
                assert time.monotonic() < deadline, "no resume run finished"
                await asyncio.sleep(0.1)
            abandoned = await pool.fetchrow(
                "SELECT status, cursor FROM runs WHERE id = $1", first_run
            )
            products = await pool.fetch(
                "SELECT external_id, price FROM products WHERE source = 'emag' AND account = 'main'"
                " AND gone_at IS NULL"
            )

        assert abandoned["status"] == "abandoned"
        assert resumed["status"] == "succeeded", resumed
        assert resumed["resumed_from"] == first_run
        assert resumed["stats"]["items"] == ITEMS  # stats carried across the resume
        # The table equals the fake's catalogue.
        catalog = app[SANDBOX].catalog
        expected = {str(o["id"]) for o in catalog.emag_offers("ro", "main")}
        assert {r["external_id"] for r in products} == expected
        # No page before the abandoned run's last committed cursor was fetched twice.
        committed_to = abandoned["cursor"]["page"]
        fetched = Counter(
            r.page
            for r in app[REQUESTS]
            if r.path.endswith("/product_offer/read") and r.status == 200 and r.page
        )
        again = [p for p, n in fetched.items() if n > 1 and p < committed_to]
        assert again == [], f"pages fetched twice: {again}"
        assert set(fetched) == set(range(1, ITEMS // 100 + 1))
        # The limiter kept the sandbox's 3 requests/s: it never had to answer 429.
        assert not [r for r in app[REQUESTS] if r.status == 429]
