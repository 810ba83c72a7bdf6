"""Chaos scenarios: three real replicas, an eMAG sync in progress, one fault each.

Every scenario ends with `Chaos.finish` (see harness.py): the catalogue is exact, no
slot ran twice, the fence audit holds, no run is left running, no replica exited
non-zero, and the time without a working leader is within the scenario's bound.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from worker.db import RAISE_LOCK_WAIT
from worker.sandbox import SANDBOX

from ..conftest import REDIS_URL
from .harness import RETRY, TICK, TTL, WORK_GRACE, Bound, Chaos, sleep_checking
from .servers import private_postgres, private_redis

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(240)]

# How long a failover may take after the leader stops renewing: its lease expires
# (at most one TTL after its last renewal), a follower's next try (a retry period),
# the new term's first slot (the tick is due every second), and a second of slack
# for a loaded two-core machine.
FAILOVER = Bound(TTL + RETRY + TICK + 1.0, f"ttl {TTL:g} + retry {RETRY:g} + tick {TICK:g} + 1")


def shared(tmp_path: Path, database_url: str, key_prefix: str, **kw: object) -> Chaos:
    """A cluster on the shared Postgres and Redis (nothing is restarted)."""
    return Chaos(
        tmp_path,
        database_url=database_url,
        redis_url=REDIS_URL,
        key_prefix=key_prefix,
        **kw,  # type: ignore[arg-type]
    )


async def test_kill_9_of_the_leader_mid_sync(
    tmp_path: Path, database_url: str, key_prefix: str
) -> None:
    """Nothing of the dead leader's is left behind: its lease expires, its sync is
    abandoned by the next leader's reaper and resumed from the last committed page."""
    async with shared(tmp_path, database_url, key_prefix, items=1500) as chaos:
        leader, _ = await chaos.working_leader()
        await chaos.start_sync()
        await chaos.wait_pages(3)
        since = await chaos.db_now()
        chaos.signal(leader, signal.SIGKILL)
        await chaos.finish("kill -9 of the leader mid-sync", FAILOVER, since=since)


@pytest.mark.parametrize("inside", [False, True], ids=["outside", "inside"])
async def test_sigstop_of_the_leader_past_its_ttl(
    tmp_path: Path, database_url: str, key_prefix: str, inside: bool
) -> None:
    """A leader frozen past its TTL, between two fenced transactions or inside one
    (its session holds the fence row), is replaced within the failover bound (plus the
    raise's lock wait when it holds the fence), and writes nothing once it wakes."""
    async with shared(tmp_path, database_url, key_prefix, items=1500) as chaos:
        leader, token = await chaos.working_leader()
        await chaos.start_sync()
        await chaos.wait_pages(3)
        holders = await chaos.freeze(leader, inside=inside)
        since = await chaos.db_now()
        frozen = time.monotonic()
        _, new_token = await chaos.working_leader(not_token=token)
        took = time.monotonic() - frozen
        await sleep_checking(chaos, max(TTL + 1.0 - took, 0.5))  # stay frozen past the TTL
        if inside:
            ended = await chaos.pool.fetchval(
                "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = ANY($1::int[])", holders
            )
            assert ended, "the frozen leader's session still holds the fence"
        chaos.signal(leader, signal.SIGCONT)
        chaos.note(
            f"term {new_token} ran a slot {took:.2f}s after the freeze; the leader woke"
            f" {time.monotonic() - frozen:.1f}s after it"
        )
        bound = FAILOVER
        if inside:
            bound = Bound(
                FAILOVER.seconds + RAISE_LOCK_WAIT,
                f"{FAILOVER.formula} + raise lock wait {RAISE_LOCK_WAIT:g}",
            )
        where = "inside" if inside else "outside"
        await chaos.finish(
            f"SIGSTOP of the leader {where} a fenced transaction", bound, since=since
        )


async def test_rolling_restart_three_rounds_during_one_sync(
    tmp_path: Path, database_url: str, key_prefix: str
) -> None:
    """Every replica restarted one by one (SIGTERM, exit 0, a replacement started),
    three rounds, while one sync runs: each hand-off of the leader is graceful (the
    lease is released, the sync handed off and resumed), and the sync lands."""
    async with shared(tmp_path, database_url, key_prefix, items=6000) as chaos:
        await chaos.working_leader()
        await chaos.start_sync()
        await chaos.wait_pages(3)
        since = await chaos.db_now()
        stops: list[float] = []
        for _ in range(3):
            for old in [r for r in chaos.cluster.replicas if r.proc.poll() is None]:
                stops.append(await chaos.stop(old))
                await chaos.start_replica()
        last = await chaos.pool.fetchrow(
            "SELECT status FROM runs WHERE job = 'emag-main' ORDER BY id DESC LIMIT 1"
        )
        assert last["status"] != "succeeded", "the sync ended before the rounds did: more items"
        chaos.note(
            f"9 restarts, SIGTERM to exit {min(stops):.1f}-{max(stops):.1f}s;"
            f" sync at page {await chaos.pages()} after the last"
        )
        graceful = Bound(TICK + 2.0, f"tick {TICK:g} + 2 (hand-off by release, not expiry)")
        await chaos.finish("rolling restart, 3 rounds of 3 replicas", graceful, since=since)


async def test_redis_killed_and_restarted_empty(tmp_path: Path, key_prefix: str) -> None:
    """Redis SIGKILLed mid-sync and started again without its data: the leader steps
    down (renew deadline missed, or the lease gone), the token counter starts again below
    the fence, the first new leader raises it and steps down, the next one leads."""
    outage = 1.0
    async with (
        private_postgres() as pg,
        private_redis() as redis,
        Chaos(
            tmp_path,
            database_url=pg.dsn,
            redis_url=redis.url,
            key_prefix=key_prefix,
            items=1500,
        ) as chaos,
    ):
        _, token = await chaos.working_leader()
        await chaos.start_sync()
        await chaos.wait_pages(3)
        since = await chaos.db_now()
        await redis.kill()
        await sleep_checking(chaos, outage)
        await redis.start()
        _, new_token = await chaos.working_leader(not_token=token)
        chaos.note(f"term {new_token} after term {token}: tokens kept increasing")
        assert new_token > token
        bound = Bound(
            outage + TTL + 2 * RETRY + TICK + 1.0,
            f"outage {outage:g} + ttl {TTL:g} + 2 retries {2 * RETRY:g} + tick {TICK:g} + 1",
        )
        await chaos.finish("Redis killed and restarted empty", bound, since=since)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgres_restarted(tmp_path: Path, key_prefix: str, mode: str) -> None:
    """Postgres restarted (`pg_ctl restart -m fast|immediate`) while the leader is inside
    a fenced transaction of the sync (it is held there with SIGSTOP for the restart, far
    less than its renew deadline): the transaction is lost, the run is recorded as
    interrupted and resumed at once by the same leader, which keeps its lease; nothing
    is lost or doubled."""
    async with (
        private_postgres() as pg,
        Chaos(
            tmp_path, database_url=pg.dsn, redis_url=REDIS_URL, key_prefix=key_prefix, items=1500
        ) as chaos,
    ):
        leader, token = await chaos.working_leader()
        await chaos.start_sync()
        await chaos.wait_pages(3)
        await chaos.freeze(leader, inside=True, writing="products")
        since = await chaos.db_now()
        try:
            away = await pg.restart(mode)
        finally:
            chaos.signal(leader, signal.SIGCONT)
        chaos.note(f"pg_ctl restart -m {mode} took {away:.2f}s")
        chain = await chaos.wait_sync_done(timeout=60)
        assert len(chain) == 2, f"the sync should have been interrupted once: {chain}"
        assert str(chain[0]["error"]).startswith("interrupted by a database error"), chain[0]
        assert {r["token"] for r in chain} == {token}, "the lease should not have moved"
        bound = Bound(away + TICK + 2.0, f"restart {away:.1f} + tick {TICK:g} + 2 (a failed tick)")
        await chaos.finish(f"Postgres restarted ({mode})", bound, since=since)


async def test_upstream_hangs(tmp_path: Path, database_url: str, key_prefix: str) -> None:
    """The marketplace stops answering for longer than the job's read timeout: the sync
    waits and retries (its progress says so), the leader keeps its lease and keeps
    running the other jobs, and the sync completes when the upstream answers again."""
    hang = 5.0
    async with shared(
        tmp_path, database_url, key_prefix, items=1500, sync_params="read_timeout = 2"
    ) as chaos:
        _, token = await chaos.working_leader()
        run_id = await chaos.start_sync()
        await chaos.wait_pages(3)
        since = await chaos.db_now()
        faults = chaos.app[SANDBOX].faults
        faults.hang = True
        messages = set()
        ends = time.monotonic() + hang
        while time.monotonic() < ends:
            chaos.assert_alive()
            messages.add(
                await chaos.pool.fetchval(
                    "SELECT progress->>'message' FROM runs WHERE id = $1", run_id
                )
            )
            await asyncio.sleep(0.1)
        faults.hang = False
        assert (await chaos.holder() or ("", 0))[1] == token, "the leader changed"
        retries = sorted(m for m in messages if m and "retry" in m)
        assert retries, f"the run's progress never said it was retrying: {messages}"
        chaos.note(f"progress during the hang: {retries[0]!r}")
        bound = Bound(TICK + 1.0, f"tick {TICK:g} + 1 (the leader is not affected)")
        await chaos.finish("the upstream hangs", bound, since=since)


async def test_leader_cut_off_from_postgres(
    tmp_path: Path, database_url: str, key_prefix: str
) -> None:
    """A partition between the leader and Postgres, while Redis still renews its lease.
    It used to keep the lease for as long as the partition lasted, every tick failing,
    and the cluster had no working leader. Now its first failed tick past a lease TTL
    without the database makes it hand the lease on; a replica that reaches Postgres
    takes over (ending the cut-off leader's sessions that hold the fence), and the
    cut-off leader's writes held in the network are refused when they arrive."""
    db_timeout = 3.0
    async with shared(
        tmp_path,
        database_url,
        key_prefix,
        items=1500,
        proxies=True,
        env={"WORKER_DB_TIMEOUT": str(db_timeout)},
    ) as chaos:
        leader, token = await chaos.working_leader()
        await chaos.start_sync()
        await chaos.wait_pages(3)
        since = await chaos.db_now()
        cut = time.monotonic()
        chaos.pg_proxy[leader.worker_id].cut()
        _, new_token = await chaos.working_leader(not_token=token, timeout=60)
        chaos.note(f"term {new_token} ran a slot {time.monotonic() - cut:.2f}s after the cut")
        await sleep_checking(chaos, 2.0)
        chaos.pg_proxy[leader.worker_id].heal()
        # Its first failed tick (begun up to a tick after the cut) fails after the
        # database timeout; its term closes within the work grace; the successor's raise
        # may wait for the fence lock before ending the cut-off leader's sessions.
        bound = Bound(
            TICK + db_timeout + WORK_GRACE + RAISE_LOCK_WAIT + TICK + 1.0,
            f"tick {TICK:g} + db timeout {db_timeout:g} + work grace {WORK_GRACE:g}"
            f" + raise lock wait {RAISE_LOCK_WAIT:g} + tick {TICK:g} + 1",
        )
        # Its fetcher goes on at 3 pages/s while its writer waits for the database.
        stalled = int(3 * (TICK + db_timeout + WORK_GRACE))
        await chaos.finish(
            "the leader cut off from Postgres", bound, since=since, refetch_extra=stalled
        )


async def test_leader_cut_off_from_redis(
    tmp_path: Path, database_url: str, key_prefix: str
) -> None:
    """A partition between the leader and Redis: it cannot renew, stops its work at the
    renew deadline (its runs record that they were handed off), its lease expires, and a
    follower takes over; healed, it comes back as a follower."""
    async with shared(tmp_path, database_url, key_prefix, items=1500, proxies=True) as chaos:
        leader, token = await chaos.working_leader()
        await chaos.start_sync()
        await chaos.wait_pages(3)
        since = await chaos.db_now()
        cut = time.monotonic()
        chaos.redis_proxy[leader.worker_id].cut()
        _, new_token = await chaos.working_leader(not_token=token)
        chaos.note(f"term {new_token} ran a slot {time.monotonic() - cut:.2f}s after the cut")
        await sleep_checking(chaos, 2.0)
        chaos.redis_proxy[leader.worker_id].heal()
        await chaos.finish("the leader cut off from Redis", FAILOVER, since=since)
