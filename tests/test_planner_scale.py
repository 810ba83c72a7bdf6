"""The planner at scale (issue 12, item 4): a queue of due times, so a tick costs what is
due; a tick's claims in one statement; starts read for all jobs at once. Behaviour, not
timing: every slot decided once, the rest of the planner's rules kept."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from worker import db, pauses, runs
from worker.config import JobSpec
from worker.errors import Fenced
from worker.planner import DueTimes, Planner
from worker.schedule import CronSchedule

T = datetime(2026, 3, 2, 12, 0, 0, tzinfo=UTC)


class FakeExecutor:
    """Room for `room` runs; records what it was asked to spawn (nothing runs)."""

    def __init__(self, room: int = 100_000) -> None:
        self.room = room
        self.spawned: list[dict[str, Any]] = []
        self.settings = SimpleNamespace(worker_id="scale-test")

    async def spawn(self, row: dict[str, Any]) -> None:
        self.spawned.append(row)
        self.room -= 1


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def every_second(name: str, **fields: Any) -> JobSpec:
    values: dict[str, Any] = {
        "misfire": "all",
        "misfire_grace": 3600.0,
        "overlap": "allow",
        **fields,
    }
    return JobSpec(name=name, kind="rec", schedule=CronSchedule("* * * * * *"), **values)


async def seen_since(pool: db.Pool, jobs: list[JobSpec], since: datetime) -> None:
    """The jobs were first seen at `since` (their ledger starts there)."""
    await pool.executemany(
        "INSERT INTO job_state (job, since) VALUES ($1, $2)", [(j.name, since) for j in jobs]
    )


async def planner_for(
    pool: db.Pool, jobs: list[JobSpec], clock: Clock, executor: FakeExecutor, token: int = 1
) -> Planner:
    await db.raise_fence(pool, token=token, holder=f"t{token}")
    return Planner(jobs=jobs, pool=pool, token=token, executor=executor, now=clock)  # type: ignore[arg-type]


async def ledger(pool: db.Pool) -> dict[tuple[str, datetime], str]:
    rows = await pool.fetch("SELECT job, slot, status FROM runs WHERE slot IS NOT NULL")
    return {(r["job"], r["slot"]): r["status"] for r in rows}


# --- the queue of due times ------------------------------------------------------------


def test_due_times_take_what_is_due_and_share_an_instant() -> None:
    due = DueTimes()
    for i in range(1000):
        due.put(f"acct-{i}", T)
    due.put("late", T + timedelta(minutes=1))
    assert due.first() == T
    assert due.pop_due(T - timedelta(seconds=1)) == set()
    assert len(due.pop_due(T)) == 1000
    assert due.first() == T + timedelta(minutes=1)
    # Put again: the job moves (a reload or a resume re-plans it), it is never due twice.
    due.put("late", T + timedelta(seconds=5))
    due.put("late", T + timedelta(seconds=7))
    assert due.when("late") == T + timedelta(seconds=7)
    assert due.pop_due(T + timedelta(hours=1)) == {"late"}
    due.put("gone", T)
    due.drop("gone")
    assert due.first() is None
    assert due.pop_due(T + timedelta(hours=1)) == set()


# --- a tick claims what is due in one statement ------------------------------------------


async def test_2000_jobs_due_in_one_second_are_claimed_exactly_once_in_one_tick(
    pool: db.Pool,
) -> None:
    jobs = [every_second(f"acct-{i:04d}") for i in range(2000)]
    await seen_since(pool, jobs, T - timedelta(milliseconds=500))
    clock = Clock(T + timedelta(milliseconds=300))
    executor = FakeExecutor()
    planner = await planner_for(pool, jobs, clock, executor)
    upcoming = await planner.tick()
    assert upcoming == T + timedelta(seconds=1), "the next slot of the 2000 jobs"
    assert len(executor.spawned) == 2000
    assert {r["slot"] for r in executor.spawned} == {T}
    assert sorted(r["job"] for r in executor.spawned) == [j.name for j in jobs]
    assert await pool.fetchval("SELECT count(*) FROM runs WHERE slot = $1", T) == 2000
    # The same second again, then a second term over the same ledger: nothing twice.
    await planner.tick()
    other = FakeExecutor()
    second = await planner_for(pool, jobs, clock, other, token=2)
    await second.tick()
    assert other.spawned == []
    assert len(executor.spawned) == 2000
    # The next second: the old term is fenced out, the new one claims the 2000 once.
    clock.now += timedelta(seconds=1)
    with pytest.raises(Fenced):
        await planner.tick()
    await second.tick()
    assert len(other.spawned) == 2000
    assert {r["slot"] for r in other.spawned} == {T + timedelta(seconds=1)}
    rows = await pool.fetchval("SELECT count(DISTINCT (job, slot)) FROM runs")
    assert rows == await pool.fetchval("SELECT count(*) FROM runs") == 4000


async def test_the_next_second_is_claimed_once_more(pool: db.Pool) -> None:
    jobs = [every_second(f"acct-{i:04d}") for i in range(300)]
    await seen_since(pool, jobs, T - timedelta(milliseconds=500))
    clock = Clock(T)
    executor = FakeExecutor()
    planner = await planner_for(pool, jobs, clock, executor)
    for _ in range(3):
        await planner.tick()
        clock.now += timedelta(seconds=1)
    slots = [(r["job"], r["slot"]) for r in executor.spawned]
    assert len(slots) == len(set(slots)) == 900
    assert {s for _, s in slots} == {T, T + timedelta(seconds=1), T + timedelta(seconds=2)}


async def test_the_bulk_claim_skips_slots_already_in_the_ledger(pool: db.Pool) -> None:
    await db.raise_fence(pool, token=1, holder="t")
    await pool.execute(
        "INSERT INTO runs (job, kind, slot, trigger, status) VALUES"
        " ('a', 'rec', $1, 'backfill', 'queued'), ('b', 'rec', $1, 'schedule', 'missed')",
        T,
    )
    claims = [(name, "rec", T, {"n": i}) for i, name in enumerate("abc")]
    claims.append(("a", "rec", T + timedelta(seconds=1), {}))
    async with db.fenced(pool, 1) as conn:
        rows = await runs.claim_slots(conn, claims, token=1, worker_id="w")
    assert [(r["job"], r["slot"]) for r in rows] == [("c", T), ("a", T + timedelta(seconds=1))]
    assert rows[0]["params"] == {"n": 2}
    assert rows[0]["status"] == "running"
    assert rows[0]["token"] == 1
    states = await ledger(pool)
    assert states[("a", T)] == "queued"
    assert states[("b", T)] == "missed"
    async with db.fenced(pool, 1) as conn:
        assert await runs.claim_slots(conn, claims, token=1, worker_id="w") == []


# --- the rules the planner kept --------------------------------------------------------


async def test_slots_beyond_the_executors_room_wait_then_meet_their_misfire_policy(
    pool: db.Pool,
) -> None:
    """Room for 3 runs, 10 jobs due: 3 claimed, 7 wait (not lost, not claimed twice);
    when room is back five seconds later, the waiting slots past the 2 s grace are
    missed (misfire = skip) and the on-time ones run."""
    jobs = [every_second(f"j{i}", misfire="skip", misfire_grace=2.0) for i in range(10)]
    await seen_since(pool, jobs, T - timedelta(milliseconds=500))
    clock = Clock(T + timedelta(milliseconds=100))
    executor = FakeExecutor(room=3)
    planner = await planner_for(pool, jobs, clock, executor)
    await planner.tick()
    assert [r["job"] for r in executor.spawned] == ["j0", "j1", "j2"]
    clock.now += timedelta(milliseconds=500)
    await planner.tick()  # no room: the others still wait
    assert len(executor.spawned) == 3
    executor.room = 1000
    clock.now = T + timedelta(seconds=5)
    await planner.tick()
    states = await ledger(pool)
    for job in jobs:
        for k in range(6):
            slot = T + timedelta(seconds=k)
            if job.name in ("j0", "j1", "j2") and k == 0:
                assert states[(job.name, slot)] == "running"
            elif k < 3:  # more than 2 s late when there was room again
                assert states[(job.name, slot)] == "missed", (job.name, k)
            else:
                assert states[(job.name, slot)] == "running", (job.name, k)
    claimed = [(r["job"], r["slot"]) for r in executor.spawned]
    assert len(claimed) == len(set(claimed))


async def test_a_paused_job_leaves_the_queue_and_comes_back_after_its_resume(
    pool: db.Pool,
) -> None:
    jobs = [every_second("p"), every_second("q")]
    await seen_since(pool, jobs, T - timedelta(milliseconds=500))
    clock = Clock(T)
    executor = FakeExecutor()
    planner = await planner_for(pool, jobs, clock, executor)
    await planner.tick()
    await pauses.pause(pool, "p", by="test", note="")
    for _ in range(3):
        clock.now += timedelta(seconds=1)
        await planner.tick()
    await pauses.resume(pool, "p")
    clock.now += timedelta(seconds=2)
    await planner.tick()
    p_slots = sorted(r["slot"] for r in executor.spawned if r["job"] == "p")
    q_slots = sorted(r["slot"] for r in executor.spawned if r["job"] == "q")
    assert q_slots == [T + timedelta(seconds=k) for k in range(6)]
    # Not owed: the three slots it was paused for; planned again from the resume on.
    assert p_slots == [T, T + timedelta(seconds=4), T + timedelta(seconds=5)]


async def test_a_reload_replans_a_changed_job_from_the_ledger_and_drops_a_removed_one(
    pool: db.Pool,
) -> None:
    yearly = JobSpec(
        name="r", kind="rec", schedule=CronSchedule("0 0 1 1 *"), misfire="all", overlap="allow"
    )
    gone = every_second("gone")
    start = datetime.now(UTC).replace(microsecond=0)
    await seen_since(pool, [yearly, gone], start - timedelta(hours=1))
    clock = Clock(start)
    executor = FakeExecutor()
    planner = await planner_for(pool, [yearly, gone], clock, executor)
    await planner.tick()
    assert not [r for r in executor.spawned if r["job"] == "r"], "a yearly job has nothing due"
    changed_at = datetime.now(UTC)
    planner.use([every_second("r")])  # now every second; "gone" left the file
    clock.now = start + timedelta(seconds=3)
    spawned = len(executor.spawned)
    await planner.tick()
    new = executor.spawned[spawned:]
    assert {r["job"] for r in new} == {"r"}, "a removed job was still planned"
    # From the change on (decided from the ledger's schedule_since), not from an hour ago.
    assert new, "the changed job was not planned again"
    assert min(r["slot"] for r in new) >= changed_at - timedelta(seconds=1)


async def test_a_value_the_database_refuses_fails_only_its_job(pool: db.Pool) -> None:
    """The tick's claims go in one statement; a value Postgres refuses in one job's
    params (a NUL in jsonb) must not stop the others: that job records the error."""
    good = [every_second(f"ok-{i}") for i in range(5)]
    bad = every_second("bad", params={"note": "nul \x00 byte"})
    jobs = [*good[:2], bad, *good[2:]]
    await seen_since(pool, jobs, T - timedelta(milliseconds=500))
    executor = FakeExecutor()
    planner = await planner_for(pool, jobs, Clock(T), executor)
    await planner.tick()
    assert sorted(r["job"] for r in executor.spawned) == [j.name for j in good]
    error = await pool.fetchval("SELECT error FROM job_state WHERE job = 'bad'")
    assert error is not None
    assert "Unicode" in error or "\\u0000" in error
    assert await pool.fetchval("SELECT count(*) FROM runs WHERE job = 'bad'") == 0
