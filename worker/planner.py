"""Slot planning for one leadership term: which cron slots are due, claimed, or missed.

Each job is planned on its own: an error in one job's planning (a schedule croniter
cannot follow, a value the database refuses) is logged, counted, recorded on the job
for every replica's /jobs and status page, and the other jobs go on. Transient
database errors and a moved fence are the caller's to handle.

A tick costs what is due, not how many jobs there are. Each job's next slot waits in a
queue of due times (`DueTimes`); a tick takes the jobs whose time has come, plus the
few it must look at again (slots still owed: a forbid job's run still going, no room
in the executor; a job failing to plan; one whose start is not read yet). Their
decisions are written together: every missed slot and every claim of the tick in one
fenced transaction, one statement each. Where a job's planning starts is read for all
jobs at once at the start of a term (and for the new or changed jobs of a reload), and
jobs on the same cron expression share one croniter walk per tick (`_Slots`).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from . import db, metrics, pauses, runs
from .config import JobSpec
from .db import Pool
from .errors import Fenced
from .executor import Executor
from .schedule import CronSchedule, Plan, plan_slots

# Overlap policies that decide, with the ledger, what a slot meeting a running run does.
COLLIDING = frozenset({"skip", "buffer_one", "cancel_other"})

log = logging.getLogger(__name__)

# How many slots one tick considers per job; older ones of a long outage are dropped
# (and counted) rather than written as a flood of `missed` rows.
MAX_DUE = 1000
POLL_EVERY = 1.0


class DueTimes:
    """When each job is next due. Jobs due at the same instant share one heap entry, so
    taking a thousand jobs on one schedule costs one pop."""

    def __init__(self) -> None:
        self._heap: list[datetime] = []
        self._at: dict[datetime, set[str]] = {}
        self._when: dict[str, datetime] = {}

    def __len__(self) -> int:
        return len(self._when)

    def put(self, name: str, when: datetime) -> None:
        self.drop(name)
        jobs = self._at.get(when)
        if jobs is None:
            jobs = self._at[when] = set()
            heapq.heappush(self._heap, when)
        jobs.add(name)
        self._when[name] = when

    def drop(self, name: str) -> None:
        when = self._when.pop(name, None)
        if when is not None:
            self._at[when].discard(name)

    def when(self, name: str) -> datetime | None:
        return self._when.get(name)

    def pop_due(self, now: datetime) -> set[str]:
        """Take out the jobs due at or before `now`."""
        due: set[str] = set()
        while self._heap and self._heap[0] <= now:
            for name in self._at.pop(heapq.heappop(self._heap)):
                del self._when[name]
                due.add(name)
        return due

    def first(self) -> datetime | None:
        """The earliest time a job is due, if any."""
        while self._heap and not self._at[self._heap[0]]:
            del self._at[heapq.heappop(self._heap)]
        return self._heap[0] if self._heap else None


class _Slots:
    """One tick's slot arithmetic, shared by the jobs on the same schedule: hundreds of
    jobs on one cron expression (one per seller account) cost one croniter walk
    (`CronSchedule.key`)."""

    def __init__(self) -> None:
        self._due: dict[tuple[object, ...], list[datetime]] = {}
        self._next: dict[tuple[object, ...], datetime] = {}

    def due(self, schedule: CronSchedule, after: datetime, now: datetime) -> list[datetime]:
        """The newest MAX_DUE + 1 slots after `after` up to `now`, oldest first."""
        key = (schedule.key, after, now)
        found = self._due.get(key)
        if found is None:
            found = self._due[key] = schedule.newest_between(after, now, MAX_DUE + 1)
        return found

    def next_after(self, schedule: CronSchedule, after: datetime) -> datetime:
        key = (schedule.key, after)
        found = self._next.get(key)
        if found is None:
            found = self._next[key] = schedule.next_after(after)
        return found


@dataclass
class _Decision:
    """What one tick decided for one job; written by `Planner._write`."""

    spec: JobSpec
    due: list[datetime]
    plan: Plan
    running: list[int] | None = None  # a COLLIDING job's running runs it collides with
    failed: bool = False


class Planner:
    """Claims due slots for the jobs with a schedule."""

    def __init__(
        self,
        *,
        jobs: list[JobSpec],
        pool: Pool,
        token: int,
        executor: Executor,
        now: Callable[[], datetime],
    ) -> None:
        self.jobs: list[JobSpec] = []
        self._specs: dict[str, JobSpec] = {}
        self._order: dict[str, int] = {}
        self._failing: dict[str, str] = {}
        self._after: dict[str, datetime] = {}  # job -> newest slot decided
        self._unread: set[str] = set()  # where planning starts is not read yet
        self._again: set[str] = set()  # planned at every tick until settled
        self._due = DueTimes()
        self.use(jobs)
        self.pool = pool
        self.token = token
        self.executor = executor
        self._now = now

    def use(self, jobs: list[JobSpec]) -> None:
        """Plan `jobs` from the next tick on (a reload): a new or changed job's start is
        read again from the ledger, which knows whether its schedule changed."""
        before = self._specs
        self.jobs = [j for j in jobs if j.schedule is not None]
        self._specs = {j.name: j for j in self.jobs}
        self._order = {j.name: i for i, j in enumerate(self.jobs)}
        for spec in self.jobs:
            old = before.get(spec.name)
            if old is None or not old.same_as(spec):
                self._forget(spec.name)
                self._unread.add(spec.name)
                self._again.add(spec.name)
                # "" = not known to fail, so the first good plan clears what an earlier
                # term (or the job's earlier form) may have recorded.
                self._failing[spec.name] = ""
        for name in before.keys() - self._specs.keys():
            self._forget(name)
            self._failing.pop(name, None)

    def _forget(self, name: str) -> None:
        self._after.pop(name, None)
        self._unread.discard(name)
        self._again.discard(name)
        self._due.drop(name)

    async def tick(self) -> datetime:
        """Plan the jobs that are due; returns when the next slot is due."""
        now = self._now()
        if self._unread:
            await self._read_starts()
        due = self._due.pop_due(now) | self._again
        if due:
            # Until their decisions are written: a tick that fails plans them again.
            self._again |= due
            async with db.fenced(self.pool, self.token) as conn:
                busy, running = await runs.active_runs(conn)
                paused = await pauses.paused_jobs(conn)
            specs = [self._specs[n] for n in sorted(due, key=self._order.__getitem__)]
            await self._plan(specs, now, busy=busy, running=running, paused=paused)
        next_due = now + timedelta(seconds=POLL_EVERY)
        first = self._due.first()
        return next_due if first is None else min(next_due, first)

    async def _read_starts(self) -> None:
        """Where planning of each unread job starts, decided from the ledger: one
        statement for all of them (a term's start reads every job)."""
        specs = [self._specs[n] for n in sorted(self._unread, key=self._order.__getitem__)]
        starts: dict[str, datetime] = {}
        try:
            async with db.fenced(self.pool, self.token) as conn:
                starts = await runs.plan_from(conn, [(s.name, s.schedule_key) for s in specs])
        except db.DB_ERRORS as exc:
            if db.is_transient(exc):
                raise
            # A value the database refuses: read them one by one to find whose.
            for spec in specs:
                try:
                    async with db.fenced(self.pool, self.token) as conn:
                        starts.update(await runs.plan_from(conn, [(spec.name, spec.schedule_key)]))
                except db.DB_ERRORS as exc:
                    if db.is_transient(exc):
                        raise
                    await self._failed(spec, exc)
        for name, start in starts.items():
            self._after[name] = start
            self._unread.discard(name)

    async def _plan(
        self,
        specs: list[JobSpec],
        now: datetime,
        *,
        busy: set[str],
        running: dict[str, list[int]],
        paused: set[str],
    ) -> None:
        slots = _Slots()
        decisions: list[_Decision] = []
        for spec in specs:
            assert spec.schedule is not None
            name = spec.name
            if name in self._unread:
                continue  # its start could not be read: recorded, tried again next tick
            if name in paused:
                # Slots that come due while a job is paused are not owed.
                self._after[name] = now
                await self._settle(spec, slots, now, quiet=True)
                continue
            try:
                due = self._due_slots(spec, slots, now)
                colliding = running.get(name, []) if spec.overlap in COLLIDING else None
                plan = plan_slots(
                    due,
                    now=now,
                    misfire=spec.misfire,
                    grace=spec.misfire_grace,
                    # Decided from the ledger: a running run of the job, whatever term.
                    busy=bool(colliding) if colliding is not None else name in busy,
                    overlap=spec.overlap,
                )
            except ValueError as exc:  # croniter's errors subclass ValueError
                await self._failed(spec, exc)
                continue
            decisions.append(_Decision(spec, due, plan, running=colliding or None))
        await self._write(decisions)
        recovered = []
        for d in decisions:
            if not d.failed and await self._settle(d.spec, slots, now, due=d.due):
                recovered.append(d.spec.name)
        await self._recovered([n for n in recovered if n in self._failing])

    def _due_slots(self, spec: JobSpec, slots: _Slots, now: datetime) -> list[datetime]:
        assert spec.schedule is not None
        after = self._after[spec.name]
        due = slots.due(spec.schedule, after, now)
        if len(due) > MAX_DUE:
            # Bounded work after a very long outage: older slots get no row.
            due = due[1:]
            log.warning(
                "%s: slots between %s and %s of a long outage dropped (not recorded)",
                spec.name,
                after.isoformat(),
                due[0].isoformat(),
            )
        return due

    async def _settle(
        self,
        spec: JobSpec,
        slots: _Slots,
        now: datetime,
        *,
        due: list[datetime] | None = None,
        quiet: bool = False,
    ) -> bool:
        """After a job's decisions are written: keep it for the next tick while it still
        owes due slots, else queue it for its next slot. False if that failed."""
        assert spec.schedule is not None
        name = spec.name
        if due and due[-1] > self._after[name]:
            return True  # slots still owed: planned again next tick (it stays in _again)
        try:
            self._due.put(name, slots.next_after(spec.schedule, max(self._after[name], now)))
        except ValueError as exc:
            if not quiet:
                await self._failed(spec, exc)
            return False
        self._again.discard(name)
        return True

    async def _write(self, decisions: list[_Decision]) -> None:
        """Record the tick's decisions: missed slots and claims of every job in one
        transaction; a value the database refuses fails only its job."""
        try:
            await self._commit(decisions)
        except (Fenced, *db.DB_ERRORS) as exc:
            if isinstance(exc, Fenced) or db.is_transient(exc):
                raise
            if len(decisions) == 1:
                await self._failed(decisions[0].spec, exc)
                decisions[0].failed = True
                return
            for d in decisions:  # nothing was written: again, one job at a time
                await self._write([d])
            return
        for d in decisions:
            if d.running:
                try:
                    for slot in d.plan.run:
                        await self._collide(d.spec, slot, d.running)
                        self._decided(d.spec, slot)
                except (Fenced, *db.DB_ERRORS) as exc:
                    if isinstance(exc, Fenced) or db.is_transient(exc):
                        raise
                    await self._failed(d.spec, exc)
                    d.failed = True

    async def _commit(self, decisions: list[_Decision]) -> None:
        missed = sorted(
            ((slot, self._order[d.spec.name], d.spec) for d in decisions for slot in d.plan.missed),
            key=lambda m: m[:2],
        )
        # Oldest slot first across jobs, up to the executor's room; the rest stay due.
        claims = sorted(
            (
                (slot, self._order[d.spec.name], d.spec)
                for d in decisions
                if not d.running
                for slot in d.plan.run
            ),
            key=lambda c: c[:2],
        )[: max(self.executor.room, 0)]
        if not missed and not claims:
            return
        async with db.fenced(self.pool, self.token) as conn:
            counts = await runs.record_missed_many(
                conn,
                [
                    (s.name, s.kind, slot, f"slot missed (misfire={s.misfire})")
                    for slot, _, s in missed
                ],
            )
            rows = await runs.claim_slots(
                conn,
                [(s.name, s.kind, slot, s.params) for slot, _, s in claims],
                token=self.token,
                worker_id=self.executor.settings.worker_id,
            )
        for slot, _, spec in missed:
            self._decided(spec, slot)
        for name, n in sorted(counts.items(), key=lambda c: self._order.get(c[0], 0)):
            metrics.MISSED_SLOTS.labels(name).inc(n)
            log.warning("%s: %d slot(s) recorded as missed", name, n)
        for slot, _, spec in claims:
            self._decided(spec, slot)
        for row in rows:
            await self.executor.spawn(row)

    def _decided(self, spec: JobSpec, slot: datetime) -> None:
        self._after[spec.name] = max(self._after[spec.name], slot)

    async def _collide(self, spec: JobSpec, slot: datetime, running: list[int]) -> None:
        """A slot came due while run(s) `running` of the job go on (overlap skip,
        buffer_one or cancel_other): skip it, buffer it, or cancel the others for it."""
        other = running[-1]
        policy = spec.overlap
        async with db.fenced(self.pool, self.token) as conn:
            if policy == "buffer_one":
                waiting = await runs.buffered_slot(conn, spec.name)
                if waiting is None:
                    queued = await runs.queue_slot(
                        conn, job=spec.name, kind=spec.kind, slot=slot, params=spec.params
                    )
                    log.info("%s: slot %s waits for run %s", spec.name, slot.isoformat(), other)
                    if queued is not None:
                        return
                policy = "skip"
                reason = f"skipped: run {other} was still going and slot run {waiting} waits"
            elif policy == "cancel_other":
                await runs.queue_slot(
                    conn, job=spec.name, kind=spec.kind, slot=slot, params=spec.params
                )
            else:
                reason = f"skipped: run {other} of the job was still going (overlap=skip)"
            if policy == "skip":
                n = await runs.record_skipped(
                    conn, job=spec.name, kind=spec.kind, slots=[slot], reason=reason
                )
                metrics.SKIPPED_SLOTS.labels(spec.name).inc(n)
                log.warning("%s: slot %s %s", spec.name, slot.isoformat(), reason)
                return
        for run_id in running:  # cancel_other
            await runs.request_cancel(self.pool, run_id, by=f"slot {slot.isoformat()}")
            log.warning(
                "%s: run %s cancelled for the newer slot %s (overlap=cancel_other)",
                spec.name,
                run_id,
                slot.isoformat(),
            )

    async def _failed(self, spec: JobSpec, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        metrics.PLANNING_ERRORS.labels(spec.name).inc()
        self._again.add(spec.name)  # tried again at every tick
        if self._failing.get(spec.name) != error:
            log.error("%s: cannot plan its slots (%s); other jobs go on", spec.name, error)
            self._failing[spec.name] = error
            async with db.fenced(self.pool, self.token) as conn:
                await runs.set_job_error(conn, spec.name, error)

    async def _recovered(self, names: Iterable[str]) -> None:
        names = list(names)
        if not names:
            return
        async with db.fenced(self.pool, self.token) as conn:
            await runs.clear_job_errors(conn, names)
        for name in names:
            if self._failing.pop(name, None):
                log.info("%s: planning works again", name)
