"""Three real `worker run` processes: one leader, fast failover, no slot run twice."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from worker import db

from .cluster import Cluster, Receiver, current_holder, wait_new_holder
from .conftest import REDIS_URL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

JOBS = """
[[jobs]]
name = "every-second"
kind = "http"
schedule = "* * * * * *"
misfire = "skip"
misfire_grace = "1s"
overlap = "allow"
timeout = "10s"
[jobs.params]
url = "{url}"
method = "POST"
json = {{ hello = "world" }}

[[jobs]]
name = "on-demand"
kind = "http"
timeout = "10s"
[jobs.params]
url = "{url}"
"""


@pytest.fixture
def cluster_factory(tmp_path: Path, database_url: str, key_prefix: str) -> Iterator[list[Cluster]]:
    made: list[Cluster] = []
    yield made
    for c in made:
        c.stop_all()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


def make_cluster(
    made: list[Cluster], tmp_path: Path, database_url: str, key_prefix: str, url: str
) -> Cluster:
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(JOBS.format(url=url))
    cluster = Cluster(database_url, REDIS_URL, key_prefix, jobs, tmp_path, ttl=2.0)
    made.append(cluster)
    return cluster


async def leaders_by_api(cluster: Cluster) -> list[str]:
    """Ask every live replica whether it leads."""
    out = []
    async with aiohttp.ClientSession() as http:
        for r in cluster.replicas:
            if r.proc.poll() is not None:
                continue
            async with http.get(f"{r.url}/leader") as resp:
                body = await resp.json()
                if body["self"]:
                    out.append(r.worker_id)
    return out


async def test_three_replicas_failover_without_double_runs(
    cluster_factory: list[Cluster],
    tmp_path: Path,
    database_url: str,
    key_prefix: str,
    redis: Redis,
    receiver: Receiver,
) -> None:
    cluster = make_cluster(cluster_factory, tmp_path, database_url, key_prefix, receiver.url)
    for i in range(3):
        cluster.start(f"w{i}")
    await asyncio.gather(*(cluster.wait_ready(r) for r in cluster.replicas))
    holder, token, _ = await wait_new_holder(redis, key_prefix, not_token=None, timeout=10)
    await asyncio.sleep(2.5)
    assert await leaders_by_api(cluster) == [holder]

    # kill -9 the leader: another replica leads within TTL + 1 s.
    killed = time.monotonic()
    os.kill(cluster.by_id(holder).proc.pid, signal.SIGKILL)
    holder2, token2, t = await wait_new_holder(redis, key_prefix, not_token=token, timeout=10)
    assert t - killed <= cluster.ttl + 1.0, f"crash failover took {t - killed:.2f}s"
    assert holder2 != holder
    assert token2 > token
    await asyncio.sleep(2.5)

    # SIGTERM the leader: it releases the lease, another leads within 1 s.
    termed = time.monotonic()
    os.kill(cluster.by_id(holder2).proc.pid, signal.SIGTERM)
    holder3, _token3, t = await wait_new_holder(redis, key_prefix, not_token=token2, timeout=10)
    assert t - termed <= 1.0, f"graceful hand-off took {t - termed:.2f}s"
    assert holder3 not in (holder, holder2)
    assert cluster.by_id(holder2).proc.wait(timeout=10) == 0
    await asyncio.sleep(2.5)

    # A manual run asked of a replica that does not lead runs on the leader.
    # Only the leader is left: start a fresh follower to ask.
    spare = cluster.start("w3")
    await cluster.wait_ready(spare)
    assert await leaders_by_api(cluster) == [holder3]
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{spare.url}/jobs/on-demand/trigger", headers={"X-API-Key": cluster.api_key}
        ) as resp,
    ):
        assert resp.status == 202
        run_id = (await resp.json())["run_id"]
    deadline = time.monotonic() + 5
    while not any(h.run == str(run_id) for h in receiver.hits):
        assert time.monotonic() < deadline, "manual run did not reach the receiver"
        await asyncio.sleep(0.05)

    # No slot was ever run twice, across a crash and a hand-off.
    slots = receiver.slots()
    assert len(slots) >= 5
    twice = [s for s, n in Counter(slots).items() if n > 1]
    assert twice == [], f"slots run twice: {twice}"
    async with db.open_pool(database_url) as pool:
        run = await pool.fetchrow("SELECT status, worker_id FROM runs WHERE id = $1", run_id)
        terms = await pool.fetch("SELECT token, ended_at FROM leader_terms ORDER BY token")
    assert run["worker_id"] == holder3
    assert all(t["ended_at"] is not None for t in terms[:-1])
    # Terms never overlap, judged by what reached the outside world: in arrival order
    # at the receiver, the tokens of the calls never go down (no call of an older
    # term arrives after a newer term's first call).
    arrivals = [h.token for h in sorted(receiver.hits, key=lambda h: h.at)]
    back = [(a, b) for a, b in itertools.pairwise(arrivals) if b < a]
    assert back == [], f"an older term called out after a newer one: {back}"
    assert len(set(arrivals)) >= 3, "the hits should span the three terms"
    assert await current_holder(redis, key_prefix) is not None


SLOW_JOB = """
[[jobs]]
name = "slow"
kind = "http"
schedule = "* * * * * *"
misfire = "skip"
misfire_grace = "1s"
overlap = "allow"
timeout = "30s"
[jobs.params]
url = "{url}"
"""


async def test_stopped_leader_is_fenced_after_takeover(
    cluster_factory: list[Cluster],
    tmp_path: Path,
    database_url: str,
    key_prefix: str,
    redis: Redis,
) -> None:
    async with Receiver(delay=1.5) as receiver:
        jobs = tmp_path / "slow.toml"
        jobs.write_text(SLOW_JOB.format(url=receiver.url))
        cluster = Cluster(database_url, REDIS_URL, key_prefix, jobs, tmp_path, ttl=2.0)
        cluster_factory.append(cluster)
        for i in range(2):
            cluster.start(f"s{i}")
        await asyncio.gather(*(cluster.wait_ready(r) for r in cluster.replicas))
        old, old_token, _ = await wait_new_holder(redis, key_prefix, not_token=None, timeout=10)
        # Stop the leader while its runs are waiting on the slow receiver.
        deadline = time.monotonic() + 5
        while not any(h.token == old_token for h in receiver.hits):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        stale = cluster.by_id(old)
        os.kill(stale.proc.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        new, new_token, _ = await wait_new_holder(
            redis, key_prefix, not_token=old_token, timeout=10
        )
        assert new != old
        await asyncio.sleep(max(0.0, 3.5 - (time.monotonic() - stopped_at)))  # past TTL
        os.kill(stale.proc.pid, signal.SIGCONT)
        await asyncio.sleep(3.0)  # the stale leader wakes, tries to write, steps down

        assert stale.proc.poll() is None, "the stale leader must survive as a follower"
        log = stale.log()
        assert "stepped down" in log
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{stale.url}/healthz") as resp:
                assert resp.status == 200
            async with http.get(f"{stale.url}/leader") as resp:
                assert (await resp.json())["self"] is False
        async with db.open_pool(database_url) as pool:
            takeover = await pool.fetchval(
                "SELECT started_at FROM leader_terms WHERE token = $1", new_token
            )
            stale_runs = await pool.fetch(
                "SELECT id, status, started_at, finished_at, heartbeat_at FROM runs"
                " WHERE token = $1",
                old_token,
            )
            late_runs = await pool.fetchval(
                "SELECT count(*) FROM runs WHERE token = $1 AND started_at > $2",
                old_token,
                takeover,
            )
        assert stale_runs, "the stale leader had runs in flight"
        assert late_runs == 0, "a stale leader claimed a slot after the takeover"
        for run in stale_runs:
            # Nothing the stale leader wrote after the takeover landed: its in-flight runs
            # stay `running` until the new leader's reaper abandons them, never `succeeded`.
            if run["finished_at"] is not None and run["finished_at"] >= takeover:
                assert run["status"] == "abandoned"
            assert run["status"] in ("running", "abandoned") or run["finished_at"] < takeover
            assert run["heartbeat_at"] is None or run["heartbeat_at"] < takeover
