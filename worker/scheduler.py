"""The leader-only actor: raises the fence, claims slots, drains queued runs, runs them.

One instance lives for one leadership term. Cancelling `run()` (the elector does it
when the term ends) cancels every run it started; each run records why it stopped
while the fence is still ours, so nothing is left `running`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import aiojobs
import asyncpg

from . import db, logs, metrics, runs
from .config import JobSpec, Settings
from .context import JobKind, RunContext
from .db import Pool
from .election import StepDown
from .errors import Fenced
from .lease import Grant
from .schedule import plan_slots
from .upstream import Upstream

log = logging.getLogger(__name__)

# How many slots one tick considers per job; older ones of a long outage are dropped
# (and counted) rather than written as a flood of `missed` rows.
MAX_DUE = 1000
HEARTBEAT_EVERY = 5.0
POLL_EVERY = 1.0
REAP_EVERY = 2.0
PRUNE_EVERY = 600.0
MAX_ATTEMPTS = 5
_TRANSIENT = (asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError)


class Leader:
    """Leader work for one term; `Leader(...).run` is the elector's `work` callback."""

    def __init__(
        self,
        *,
        settings: Settings,
        pool: Pool,
        upstream: Upstream,
        kinds: Mapping[str, JobKind],
        now: Any = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.upstream = upstream
        self.kinds = kinds
        self.jobs = {j.name: j for j in settings.jobs}
        self._now = now or (lambda: datetime.now(UTC))
        self._wake = asyncio.Event()
        self._fenced = asyncio.Event()
        self._active: dict[int, str] = {}  # run id -> job name
        self._jobs: dict[int, aiojobs.Job[None]] = {}
        self._cancelling: set[int] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._after: dict[str, datetime] = {}  # job -> newest slot decided
        self.token = 0
        self.stop_reason = "leadership ended"

    async def run(self, grant: Grant) -> None:
        self.token = grant.token
        logs.bind(token=grant.token)
        try:
            await db.raise_fence(self.pool, token=grant.token, holder=self.settings.worker_id)
        except Fenced as exc:
            raise StepDown(str(exc), fence=exc.current) from exc
        except _TRANSIENT as exc:
            # No database, no leading: hand the lease back rather than exit.
            raise StepDown(f"cannot raise the fence: {type(exc).__name__}: {exc}") from exc
        scheduler = aiojobs.Scheduler(limit=None, close_timeout=self.settings.shutdown_grace / 2)
        listener = await self._listen()
        heart = asyncio.create_task(self._heartbeat(), name="run-heartbeat")
        reaper = asyncio.create_task(self._reaper(), name="reaper")
        try:
            await self._loop(scheduler)
        except asyncio.CancelledError as exc:
            self.stop_reason = f"leadership ended: {exc.args[0] if exc.args else 'cancelled'}"
            raise
        finally:
            heart.cancel()
            reaper.cancel()
            await scheduler.close()
            await self._unlisten(listener)
            with contextlib.suppress(Fenced, *_TRANSIENT):
                await db.end_term(self.pool, token=self.token, reason=self.stop_reason)

    async def _loop(self, scheduler: aiojobs.Scheduler) -> None:
        failures = 0
        while True:
            if self._fenced.is_set():
                raise StepDown("a newer leader raised the fence")
            # Cleared before the tick, so a wake-up that arrives during it is not lost.
            self._wake.clear()
            try:
                pause = await self._tick(scheduler)
                failures = 0
            except Fenced as exc:
                raise StepDown(str(exc)) from exc
            except _TRANSIENT as exc:
                failures += 1
                pause = min(POLL_EVERY * failures, 10.0)
                log.warning("scheduler tick failed (%s), retrying in %.0fs", exc, pause)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._wake.wait()

    async def _tick(self, scheduler: aiojobs.Scheduler) -> float:
        """Claim due slots and queued runs; returns seconds until the next slot is due."""
        await self._honour_cancels()
        # Queued runs first: a resume of an interrupted pass goes before a new slot.
        await self._drain_queue(scheduler)
        now = self._now()
        busy = set(self._active.values())
        next_due = now + timedelta(seconds=POLL_EVERY)
        for spec in self.jobs.values():
            if spec.schedule is None:
                continue
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
                busy=spec.name in busy,
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
            for slot in plan.run:
                if len(self._active) >= self.settings.max_concurrent_runs:
                    break
                async with db.fenced(self.pool, self.token) as conn:
                    row = await runs.claim_slot(
                        conn,
                        job=spec.name,
                        kind=spec.kind,
                        slot=slot,
                        token=self.token,
                        worker_id=self.settings.worker_id,
                        params=spec.params,
                    )
                self._after[spec.name] = max(self._after[spec.name], slot)
                if row is not None:
                    await self._spawn(scheduler, row)
            upcoming = spec.schedule.next_after(max(self._after[spec.name], now))
            next_due = min(next_due, upcoming)
        return max(0.0, (next_due - self._now()).total_seconds())

    async def _decided_until(self, spec: JobSpec) -> datetime:
        if spec.name not in self._after:
            async with db.fenced(self.pool, self.token) as conn:
                since = await runs.job_since(conn, spec.name)
            last = await runs.last_slot(self.pool, spec.name)
            self._after[spec.name] = max(since, last) if last else since
        return self._after[spec.name]

    async def _drain_queue(self, scheduler: aiojobs.Scheduler) -> None:
        while len(self._active) < self.settings.max_concurrent_runs:
            skip = {
                name
                for name in set(self._active.values())
                if (spec := self.jobs.get(name)) is not None and spec.overlap == "forbid"
            }
            async with db.fenced(self.pool, self.token) as conn:
                row = await runs.start_queued(
                    conn, token=self.token, worker_id=self.settings.worker_id, skip_jobs=skip
                )
            if row is None:
                return
            await self._spawn(scheduler, row)

    async def _spawn(self, scheduler: aiojobs.Scheduler, row: dict[str, Any]) -> None:
        self._active[row["id"]] = row["job"]
        metrics.RUNS_ACTIVE.set(len(self._active))
        self._jobs[row["id"]] = await scheduler.spawn(self._execute(row), name=f"run-{row['id']}")

    async def _honour_cancels(self) -> None:
        """Stop the runs someone asked to cancel (the request may come from any replica)."""
        if not self._active:
            return
        for run_id in await runs.cancel_requested(self.pool, list(self._active)):
            job = self._jobs.get(run_id)
            if job is not None and run_id not in self._cancelling:
                self._cancelling.add(run_id)
                log.info("cancelling run %s on request", run_id)
                # Not awaited here: the run records its end itself.
                closing = asyncio.create_task(job.close(), name=f"cancel-{run_id}")
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)

    async def _execute(self, row: dict[str, Any]) -> None:
        """One run, from start to a final status; isolates every failure of the run."""
        run_id, name = row["id"], row["job"]
        logs.bind(job=name, run_id=run_id, token=self.token)
        spec = self.jobs.get(name)
        kind = self.kinds.get(spec.kind) if spec else None
        started = asyncio.get_running_loop().time()
        status, error, result = "failed", None, None
        try:
            if spec is None or kind is None:
                error = f"job {name!r} is not in this leader's jobs file"
                return
            ctx = RunContext(
                run_id=run_id,
                job=spec,
                token=self.token,
                trigger=row["trigger"],
                slot=row["slot"],
                params=row["params"] or spec.params,
                pool=self.pool,
                upstream=self.upstream,
                worker_id=self.settings.worker_id,
                cursor=row["cursor"],
                attempt=row["attempt"],
                resumed_from=row["resumed_from"],
                stats=dict(row["stats"] or {}),
            )
            log.info("run started (%s)", row["trigger"])
            deadline = asyncio.timeout(spec.timeout)
            try:
                async with deadline:
                    result = await kind.run(ctx)
                status = "succeeded"
            except TimeoutError:
                if not deadline.expired():
                    raise
                error = f"timed out after {spec.timeout:g}s"
        except asyncio.CancelledError:
            if run_id not in self._cancelling:
                status, error = "abandoned", self.stop_reason
                raise
            status, error = "cancelled", "cancelled on request"
        except Fenced as exc:
            status, error = "abandoned", str(exc)
            self._fenced.set()
            self._wake.set()
        except Exception as exc:  # the run's isolation boundary
            error = f"{type(exc).__name__}: {exc}"
            log.exception("run failed")
        finally:
            await self._finish(run_id, name, status, error, result, started)

    async def _finish(
        self,
        run_id: int,
        name: str,
        status: str,
        error: str | None,
        result: Any,
        started: float,
    ) -> None:
        try:
            async with db.fenced(self.pool, self.token) as conn:
                await runs.finish(conn, run_id, status=status, error=error, result=result)
        except Fenced:
            status = "abandoned"
            log.warning("run end not recorded: a newer leader holds the fence")
        except _TRANSIENT as exc:
            log.error("run end not recorded (%s); the next leader will reap it", exc)
        finally:
            self._active.pop(run_id, None)
            self._jobs.pop(run_id, None)
            self._cancelling.discard(run_id)
            metrics.RUNS_ACTIVE.set(len(self._active))
            metrics.RUNS.labels(name, status).inc()
            metrics.RUN_DURATION.labels(name).observe(asyncio.get_running_loop().time() - started)
            log.log(
                logging.INFO if status == "succeeded" else logging.WARNING,
                "run %s%s",
                status,
                f": {error}" if error else "",
            )
            self._wake.set()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_EVERY)
            if not self._active:
                continue
            try:
                async with db.fenced(self.pool, self.token) as conn:
                    await runs.heartbeat(conn, list(self._active))
            except Fenced:
                self._fenced.set()
                self._wake.set()
            except _TRANSIENT as exc:
                log.warning("heartbeat failed: %s", exc)

    async def _reaper(self) -> None:
        """Abandon runs whose leader died; queue resumes of the resumable ones."""
        resumable = [name for name, kind in self.kinds.items() if kind.resumable]
        next_prune = 0.0
        while True:
            try:
                async with db.fenced(self.pool, self.token) as conn:
                    for row in await runs.reap(
                        conn,
                        token=self.token,
                        stale_after=self.settings.reap_after,
                        live=list(self._active),
                    ):
                        metrics.RUNS.labels(row["job"], "abandoned").inc()
                        log.warning(
                            "run %s of %s abandoned: %s", row["id"], row["job"], row["error"]
                        )
                    for new, old in await runs.queue_resumes(
                        conn, kinds=resumable, max_attempts=MAX_ATTEMPTS
                    ):
                        log.info("run %s queued to resume abandoned run %s", new, old)
                    loop_time = asyncio.get_running_loop().time()
                    if loop_time >= next_prune:
                        next_prune = loop_time + PRUNE_EVERY
                        pruned = await runs.prune(conn, keep=self.settings.keep_runs)
                        if pruned:
                            log.info("pruned %d finished runs older than the retention", pruned)
            except Fenced:
                self._fenced.set()
                self._wake.set()
                return
            except _TRANSIENT as exc:
                log.warning("reaper failed: %s", exc)
            await asyncio.sleep(REAP_EVERY)

    async def _listen(self) -> db.Connection | None:
        """LISTEN for queued runs; the 1 s poll covers us if this fails."""
        try:
            conn = await self.pool.acquire()
            await conn.add_listener(db.NOTIFY_CHANNEL, self._on_notify)
        except _TRANSIENT as exc:
            log.warning("LISTEN failed, polling only: %s", exc)
            return None
        return conn

    async def _unlisten(self, conn: db.Connection | None) -> None:
        if conn is None:
            return
        with contextlib.suppress(*_TRANSIENT):
            await conn.remove_listener(db.NOTIFY_CHANNEL, self._on_notify)
        with contextlib.suppress(*_TRANSIENT):
            await self.pool.release(conn)

    def _on_notify(self, *_: object) -> None:
        self._wake.set()
