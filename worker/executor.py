"""Run execution for one leadership term: spawn, deadline, heartbeat, cancel, record the end.

Every run ends with a recorded status while the fence is still ours: `succeeded`,
`failed` (the run's own error), `cancelled` (on request), or `abandoned` (leadership
ended, the fence moved, or the database dropped it mid-run). Recording that end is
retried through database blips; a run the database interrupted is queued to resume
at once, rather than waiting for the reaper.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

import aiojobs

from . import db, logs, metrics, pauses, runs
from .config import JobSpec, Settings
from .context import JobKind, RunContext
from .db import Pool
from .errors import Fenced
from .upstream import Upstream

log = logging.getLogger(__name__)

HEARTBEAT_EVERY = 5.0
MAX_ATTEMPTS = 5


class Executor:
    """The runs of one term. `fenced` is set when a write found a newer leader."""

    def __init__(
        self,
        *,
        settings: Settings,
        pool: Pool,
        upstream: Upstream,
        kinds: Mapping[str, JobKind],
        token: int,
        wake: asyncio.Event,
        fenced: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.upstream = upstream
        self.kinds = kinds
        self.token = token
        self.jobs = {j.name: j for j in settings.jobs}
        self._wake = wake
        self._fenced = fenced
        self.active: dict[int, str] = {}  # run id -> job name
        self._jobs: dict[int, aiojobs.Job[None]] = {}
        self._cancelling: set[int] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._scheduler = aiojobs.Scheduler(
            limit=None,
            close_timeout=settings.shutdown_grace / 2,
            exception_handler=_report_job_trouble,
        )
        self.stop_reason = "leadership ended"

    @property
    def room(self) -> int:
        return self.settings.max_concurrent_runs - len(self.active)

    async def spawn(self, row: dict[str, Any]) -> None:
        self.active[row["id"]] = row["job"]
        metrics.RUNS_ACTIVE.set(len(self.active))
        job = await self._scheduler.spawn(self._execute(row), name=f"run-{row['id']}")
        self._jobs[row["id"]] = job

    async def close(self, reason: str) -> None:
        """Cancel every run (each records `abandoned: reason`) and wait for them."""
        self.stop_reason = reason
        await self._scheduler.close()

    async def honour_cancels(self) -> None:
        """Stop the runs someone asked to cancel (the request may come from any replica)."""
        if not self.active:
            return
        for run_id in await runs.cancel_requested(self.pool, list(self.active)):
            job = self._jobs.get(run_id)
            if job is not None and run_id not in self._cancelling:
                self._cancelling.add(run_id)
                log.info("cancelling run %s on request", run_id)
                # Not awaited here: the run records its end itself.
                closing = asyncio.create_task(job.close(), name=f"cancel-{run_id}")
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)

    async def heartbeat(self) -> None:
        """Keep the heartbeat of this term's runs fresh, so no reaper takes them."""
        while True:
            await asyncio.sleep(HEARTBEAT_EVERY)
            if not self.active:
                continue
            try:
                async with db.fenced(self.pool, self.token) as conn:
                    await runs.heartbeat(conn, list(self.active))
            except Fenced:
                self._on_fenced()
            except db.DB_ERRORS as exc:
                log.warning("heartbeat not recorded (%s): next try in %.0fs", exc, HEARTBEAT_EVERY)

    def _on_fenced(self) -> None:
        self._fenced.set()
        self._wake.set()

    def _context(self, row: dict[str, Any], spec: JobSpec) -> RunContext:
        return RunContext(
            run_id=row["id"],
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

    async def _execute(self, row: dict[str, Any]) -> None:
        """One run, from start to a final status; isolates every failure of the run."""
        run_id, name = row["id"], row["job"]
        logs.bind(job=name, run_id=run_id, token=self.token)
        spec = self.jobs.get(name)
        kind = self.kinds.get(spec.kind) if spec else None
        started = asyncio.get_running_loop().time()
        end = _End()
        try:
            if spec is None or kind is None:
                end.error = f"job {name!r} is not in this leader's jobs file"
                return
            log.info("run started (%s, attempt %d)", row["trigger"], row["attempt"])
            deadline = asyncio.timeout(spec.timeout)
            try:
                async with deadline:
                    end.result = await kind.run(self._context(row, spec))
                end.status = "succeeded"
            except TimeoutError:
                if not deadline.expired():
                    raise
                end.error = f"timed out after {spec.timeout:g}s"
        except asyncio.CancelledError:
            if run_id not in self._cancelling:
                end.status, end.error, end.handed_off = "abandoned", self.stop_reason, True
                raise
            end.status, end.error = "cancelled", "cancelled on request"
        except Fenced as exc:
            end.status, end.error, end.handed_off = "abandoned", str(exc), True
            self._on_fenced()
        except Exception as exc:  # the run's isolation boundary
            end.error = _describe(exc)
            if _interrupted_by_database(exc):
                # The database (or its connection) failed under the run, not the run
                # itself: what it committed is kept, and it resumes from there.
                end.status, end.resume = "abandoned", kind is not None and kind.resumable
                end.error = f"interrupted by a database error: {end.error}"
                log.warning("run interrupted by a database error: %s", _describe(exc))
            else:
                log.exception("run failed")
        finally:
            await self._finish(run_id, name, end, started)

    async def _finish(self, run_id: int, name: str, end: _End, started: float) -> None:
        try:
            await self._record_end(run_id, name, end)
        finally:
            self.active.pop(run_id, None)
            self._jobs.pop(run_id, None)
            self._cancelling.discard(run_id)
            metrics.RUNS_ACTIVE.set(len(self.active))
            if end.ended_elsewhere:
                log.warning(
                    "run already ended elsewhere (cleaned up as stuck); its %s is not recorded",
                    end.status,
                )
            else:
                metrics.RUNS.labels(name, end.status).inc()
                metrics.RUN_DURATION.labels(name).observe(
                    asyncio.get_running_loop().time() - started
                )
                log.log(
                    logging.INFO if end.status == "succeeded" else logging.WARNING,
                    "run %s%s",
                    end.status,
                    f": {end.error}" if end.error else "",
                )
            self._wake.set()

    async def _count_outcome(
        self, conn: db.Connection, spec: JobSpec, end: _End
    ) -> Callable[[], None]:
        """Record the outcome in the end's transaction; returns what to count and log
        once that transaction has committed (a retried commit would count twice)."""
        # Items a succeeded run returned: a catalogue pass's `items` (products or offers
        # upserted), a parsing operation's `events`; other kinds write none. A resumed
        # pass returns its whole chain's count and only its last run succeeds: once.
        result = end.result if isinstance(end.result, dict) else {}
        items = result.get("items", result.get("events"))
        paused = await pauses.record_outcome(
            conn,
            spec.name,
            status=end.status,
            error=end.error,
            pause_after=spec.pause_after_failures,
        )

        def committed() -> None:
            if end.status == "succeeded" and type(items) is int and items > 0:
                metrics.ITEMS_SYNCED.labels(spec.name).inc(items)
            if paused:
                metrics.JOBS_AUTO_PAUSED.labels(spec.name).inc()
                log.warning(
                    "%s paused after %d failed runs in a row (pause_after_failures);"
                    " last error: %s",
                    spec.name,
                    spec.pause_after_failures,
                    end.error,
                )

        return committed

    async def _record_end(self, run_id: int, job: str, end: _End) -> None:
        """Write the run's end, retrying through database blips for up to `reap_after`
        (after that the reaper would take the run anyway)."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.settings.reap_after
        pause = 0.1
        while True:
            counted: Callable[[], None] | None = None
            try:
                async with db.fenced(self.pool, self.token) as conn:
                    finished = await runs.finish(
                        conn,
                        run_id,
                        status=end.status,
                        error=end.error,
                        result=end.result,
                        handed_off=end.handed_off,
                    )
                    spec = self.jobs.get(job)
                    end.ended_elsewhere = not finished
                    if finished and spec is not None:
                        counted = await self._count_outcome(conn, spec, end)
                    if end.resume:
                        for new, _ in await runs.queue_resumes(
                            conn,
                            kinds=[k for k, v in self.kinds.items() if v.resumable],
                            max_attempts=MAX_ATTEMPTS,
                            only=[run_id],
                        ):
                            log.info("run %s queued to resume it at once", new)
                if counted is not None:
                    counted()
                return
            except Fenced:
                end.status = "abandoned"
                log.warning("run end not recorded: a newer leader holds the fence")
                return
            except db.DB_ERRORS as exc:
                if not db.is_transient(exc) or loop.time() + pause > give_up_at:
                    log.error("run end not recorded (%s); the reaper will take the run", exc)
                    return
                log.warning("run end not recorded yet (%s): retrying in %.1fs", exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)


def _report_job_trouble(_: aiojobs.Scheduler, context: dict[str, Any]) -> None:
    """aiojobs' reports (a run that did not stop within the close timeout while the term
    ended, say, still recording its end through a slow database) are the executor's
    business, not a crash of the process: the event loop's handler would stop the
    replica for them."""
    job = context.get("job")
    log.error(
        "%s: %s",
        context.get("message"),
        getattr(job, "name", None) or job,
        exc_info=context.get("exception"),
    )


class _End:
    """How a run ended, filled in as it ends."""

    __slots__ = ("ended_elsewhere", "error", "handed_off", "result", "resume", "status")

    def __init__(self) -> None:
        self.ended_elsewhere = False  # the row was no longer running: a cleanup ended it
        self.status = "failed"
        self.error: str | None = None
        self.result: Any = None
        self.handed_off = False
        self.resume = False


def _database_error(exc: BaseException) -> BaseException | None:
    """The database error behind `exc`: itself, or the one it was raised while handling
    (a connection that died inside a transaction surfaces as the transaction's exit
    failing on a closed connection; the cause is in its context)."""
    seen = 0
    current: BaseException | None = exc
    found: BaseException | None = None
    while current is not None and seen < 5:
        if isinstance(current, db.DB_ERRORS) and not isinstance(current, OSError | TimeoutError):
            found = current
        current = current.__context__
        seen += 1
    return found


def _interrupted_by_database(exc: BaseException) -> bool:
    """The database failed under the run (a restart, a lost connection), as opposed to
    the run's own error. A statement timeout counts as the run's: retrying the same
    statement would most likely time out again."""
    found = _database_error(exc)
    if found is None or getattr(found, "sqlstate", None) == "57014":
        return False
    return db.is_transient(found)


def _describe(exc: BaseException) -> str:
    found = _database_error(exc)
    if found is not None:
        exc = found
    return f"{type(exc).__name__}: {exc}"
