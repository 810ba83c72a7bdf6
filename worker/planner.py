"""Slot planning for one leadership term: which cron slots are due, claimed, or missed.

Each job is planned on its own: an error in one job's planning (a schedule croniter
cannot follow, a value the database refuses) is logged, counted, recorded on the job
for every replica's /jobs and status page, and the other jobs go on. Transient
database errors and a moved fence are the caller's to handle.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from . import db, metrics, pauses, runs
from .config import JobSpec
from .db import Pool
from .errors import Fenced
from .executor import Executor
from .schedule import plan_slots

# Overlap policies that decide, with the ledger, what a slot meeting a running run does.
COLLIDING = frozenset({"skip", "buffer_one", "cancel_other"})

log = logging.getLogger(__name__)

# How many slots one tick considers per job; older ones of a long outage are dropped
# (and counted) rather than written as a flood of `missed` rows.
MAX_DUE = 1000
POLL_EVERY = 1.0


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
        self._failing: dict[str, str] = {}
        self._after: dict[str, datetime] = {}  # job -> newest slot decided
        self.use(jobs)
        self.pool = pool
        self.token = token
        self.executor = executor
        self._now = now

    def use(self, jobs: list[JobSpec]) -> None:
        """Plan `jobs` from the next tick on (a reload): a new or changed job's start is
        read again from the ledger, which knows whether its schedule changed."""
        before = {j.name: j for j in self.jobs}
        self.jobs = [j for j in jobs if j.schedule is not None]
        for spec in self.jobs:
            old = before.get(spec.name)
            if old is None or not old.same_as(spec):
                self._after.pop(spec.name, None)
                # "" = not known to fail, so the first good plan clears what an earlier
                # term (or the job's earlier form) may have recorded.
                self._failing[spec.name] = ""
        for name in before.keys() - {j.name for j in self.jobs}:
            self._after.pop(name, None)
            self._failing.pop(name, None)

    async def tick(self) -> datetime:
        """Plan every job once; returns when the next slot is due."""
        now = self._now()
        next_due = now + timedelta(seconds=POLL_EVERY)
        async with db.fenced(self.pool, self.token) as conn:
            busy, running = await runs.active_runs(conn)
            paused = await pauses.paused_jobs(conn)
        for spec in self.jobs:
            if spec.name in paused:
                # Slots that come due while a job is paused are not owed.
                self._after[spec.name] = now
                continue
            try:
                if spec.overlap in COLLIDING:
                    # Decided from the ledger: a running run of the job, whatever term.
                    upcoming = await self._plan(spec, now, running=running.get(spec.name, []))
                else:
                    upcoming = await self._plan(spec, now, busy=spec.name in busy)
            except (Fenced, *db.DB_ERRORS) as exc:
                if isinstance(exc, Fenced) or db.is_transient(exc):
                    raise
                await self._failed(spec, exc)
                continue
            except ValueError as exc:  # croniter's errors subclass ValueError
                await self._failed(spec, exc)
                continue
            if spec.name in self._failing:
                await self._recovered(spec)
            next_due = min(next_due, upcoming)
        return next_due

    async def _plan(
        self,
        spec: JobSpec,
        now: datetime,
        *,
        busy: bool = False,
        running: list[int] | None = None,
    ) -> datetime:
        assert spec.schedule is not None
        if running is not None:
            busy = bool(running)
        after = await self._decided_until(spec)
        due = spec.schedule.newest_between(after, now, MAX_DUE + 1)
        if len(due) > MAX_DUE:
            # Bounded work after a very long outage: older slots get no row.
            due = due[1:]
            log.warning(
                "%s: slots between %s and %s of a long outage dropped (not recorded)",
                spec.name,
                after.isoformat(),
                due[0].isoformat(),
            )
        plan = plan_slots(
            due,
            now=now,
            misfire=spec.misfire,
            grace=spec.misfire_grace,
            busy=busy,
            overlap=spec.overlap,
        )
        if plan.missed:
            async with db.fenced(self.pool, self.token) as conn:
                n = await runs.record_missed(
                    conn,
                    job=spec.name,
                    kind=spec.kind,
                    slots=plan.missed,
                    reason=f"slot missed (misfire={spec.misfire})",
                )
            metrics.MISSED_SLOTS.labels(spec.name).inc(n)
            log.warning("%s: %d slot(s) recorded as missed", spec.name, n)
            self._after[spec.name] = max(self._after[spec.name], plan.missed[-1])
        if busy and running and spec.overlap in COLLIDING:
            for slot in plan.run:
                await self._collide(spec, slot, running)
                self._after[spec.name] = max(self._after[spec.name], slot)
            return spec.schedule.next_after(max(self._after[spec.name], now))
        for slot in plan.run:
            if self.executor.room <= 0:
                break
            async with db.fenced(self.pool, self.token) as conn:
                row = await runs.claim_slot(
                    conn,
                    job=spec.name,
                    kind=spec.kind,
                    slot=slot,
                    token=self.token,
                    worker_id=self.executor.settings.worker_id,
                    params=spec.params,
                )
            self._after[spec.name] = max(self._after[spec.name], slot)
            if row is not None:
                await self.executor.spawn(row)
        return spec.schedule.next_after(max(self._after[spec.name], now))

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

    async def _decided_until(self, spec: JobSpec) -> datetime:
        if spec.name not in self._after:
            async with db.fenced(self.pool, self.token) as conn:
                since = await runs.job_since(conn, spec.name, spec.schedule_key)
                resumed = await pauses.resumed_at(conn, spec.name)
            last = await runs.last_slot(self.pool, spec.name)
            # Planning picks up at the newest of: when the job was first seen, its newest
            # slot, and when it was last resumed (a pause's slots are not owed).
            self._after[spec.name] = max(t for t in (since, last, resumed) if t is not None)
        return self._after[spec.name]

    async def _failed(self, spec: JobSpec, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        metrics.PLANNING_ERRORS.labels(spec.name).inc()
        if self._failing.get(spec.name) != error:
            log.error("%s: cannot plan its slots (%s); other jobs go on", spec.name, error)
            self._failing[spec.name] = error
            async with db.fenced(self.pool, self.token) as conn:
                await runs.set_job_error(conn, spec.name, error)

    async def _recovered(self, spec: JobSpec) -> None:
        if self._failing.pop(spec.name):
            log.info("%s: planning works again", spec.name)
        async with db.fenced(self.pool, self.token) as conn:
            await runs.set_job_error(conn, spec.name, None)
