"""A leader frozen *inside* a fenced transaction must not halt the cluster.

Real `worker run` processes. The leader runs a sync with the rate limit lifted, so it
spends most of its time inside fenced transactions; it is SIGSTOPped at a moment when
`pg_locks` shows its session holding the fence row lock. The old code let that lock
live as long as the frozen process: every successor's fence raise timed out, and no
job ran at all. Now a successor runs jobs within about one TTL, the frozen leader's
writes are refused when it wakes, and it wakes into a follower (it does not exit).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from redis.asyncio import Redis

from worker.sandbox import SandboxConfig, build_app

from .cluster import Cluster, Receiver, free_port, wait_new_holder
from .conftest import REDIS_URL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

JOBS = """
[[jobs]]
name = "emag-fast"
kind = "emag.offers"
timeout = "5m"
[jobs.params]
account = "main"
platform = "ro"
base_url = "{base}/emag/ro/api-3"
username_env = "T_EMAG_USER"
password_env = "T_EMAG_PASS"
rate_limit = 0
mark_gone = true

[[jobs]]
name = "tick"
kind = "http"
schedule = "* * * * * *"
misfire = "skip"
misfire_grace = "1s"
overlap = "allow"
timeout = "10s"
[jobs.params]
url = "{hook}"
"""

FENCE_HOLDERS = (
    "SELECT a.pid, a.state FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'relation' AND l.relation = 'fence'::regclass AND l.granted"
    " AND l.mode = 'RowShareLock' AND a.datname = current_database()"
)


async def freeze_inside_a_fenced_transaction(conn: asyncpg.Connection, pid: int) -> list[int]:
    """SIGSTOP `pid` until it is caught holding the fence lock; the holders' backends."""
    for _ in range(400):
        os.kill(pid, signal.SIGSTOP)
        holders = [r["pid"] for r in await conn.fetch(FENCE_HOLDERS)]
        if holders:
            return holders
        os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(random.uniform(0.005, 0.03))
    raise AssertionError("never caught the leader inside a fenced transaction")


async def test_successor_runs_jobs_while_the_old_leader_is_frozen_holding_the_fence(
    tmp_path: Path, database_url: str, key_prefix: str, redis: Redis
) -> None:
    sandbox = web.AppRunner(build_app(SandboxConfig(emag_items=200_000, rate=0)), access_log=None)
    await sandbox.setup()
    port = free_port()
    await web.TCPSite(sandbox, "127.0.0.1", port).start()
    async with Receiver() as receiver:
        jobs = tmp_path / "jobs.toml"
        jobs.write_text(JOBS.format(base=f"http://127.0.0.1:{port}", hook=receiver.url))
        cluster = Cluster(
            database_url,
            REDIS_URL,
            key_prefix,
            jobs,
            tmp_path,
            ttl=2.0,
            extra_env={"T_EMAG_USER": "main@example.com", "T_EMAG_PASS": "main-secret"},
        )
        conn = await asyncpg.connect(database_url)
        try:
            old = cluster.start("old")
            await cluster.wait_ready(old)
            _, old_token, _ = await wait_new_holder(redis, key_prefix, not_token=None, timeout=10)
            new = cluster.start("new")
            await cluster.wait_ready(new)
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"{old.url}/jobs/emag-fast/trigger", headers={"X-API-Key": cluster.api_key}
                ) as resp,
            ):
                assert resp.status == 202
                sync_run = (await resp.json())["run_id"]
            deadline = time.monotonic() + 30
            while not await conn.fetchval(
                "SELECT (stats->>'pages')::int > 2 FROM runs WHERE id = $1", sync_run
            ):
                assert time.monotonic() < deadline, f"the sync made no progress:\n{old.log()}"
                await asyncio.sleep(0.05)

            holders = await freeze_inside_a_fenced_transaction(conn, old.proc.pid)
            frozen_at = time.monotonic()
            _, new_token, _ = await wait_new_holder(
                redis, key_prefix, not_token=old_token, timeout=15
            )
            # The new term runs a job: the receiver sees its token.
            deadline = frozen_at + cluster.ttl + 8.0
            while not any(h.token == new_token for h in receiver.hits):
                assert time.monotonic() < deadline, (
                    "no job ran under the new term while the old leader was frozen;"
                    f" fence holders now: {await conn.fetch(FENCE_HOLDERS)}\n{new.log()[-3000:]}"
                )
                await asyncio.sleep(0.05)
            took = time.monotonic() - frozen_at
            still_there = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", holders
            )
            assert still_there == 0, "the frozen leader's sessions should have been ended"
            committed = await conn.fetchrow(
                "SELECT cursor, stats FROM runs WHERE id = $1", sync_run
            )

            os.kill(old.proc.pid, signal.SIGCONT)
            await asyncio.sleep(3.0)  # it wakes, finds its connection gone, steps down

            # Nothing the old leader tried after waking landed: its run's cursor and
            # stats are what they were when the successor took over.
            after = await conn.fetchrow(
                "SELECT cursor, stats, status, token FROM runs WHERE id = $1", sync_run
            )
            assert (after["cursor"], after["stats"]) == (
                committed["cursor"],
                committed["stats"],
            )
            assert after["status"] in ("running", "abandoned")
            late = await conn.fetchval(
                "SELECT count(*) FROM runs r JOIN leader_terms t ON t.token = $2"
                " WHERE r.token = $1 AND r.started_at > t.started_at",
                old_token,
                new_token,
            )
            assert late == 0, "the old leader started a run after the takeover"
            # The woken leader is a healthy follower, not a crashed process.
            assert old.proc.poll() is None, old.log()[-3000:]
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{old.url}/healthz") as resp:
                    assert resp.status == 200
                async with http.get(f"{old.url}/leader") as resp:
                    assert (await resp.json())["self"] is False
            assert "unhandled error" not in old.log()
            print(f"new term ran a job {took:.2f}s after the freeze (ttl {cluster.ttl}s)")
        finally:
            cluster.stop_all()
            await conn.close()
            await sandbox.cleanup()
