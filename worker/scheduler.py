"""The leader-only actor: one leadership term, from raising the fence to ending the term.

`Leader(...).run(grant)` is the elector's `work` callback. It raises the fence, starts
the term's helpers (the executor's heartbeat, the reaper, the LISTEN connection) and
loops: honour cancel requests, start queued runs, plan due slots. Cancelling `run()`
(the elector does it when the term ends) cancels every run it started; each run
records why it stopped while the fence is still ours, so nothing is left `running`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from . import db, logs, metrics, runs
from .config import Settings
from .context import JobKind
from .db import Pool
from .election import StepDown
from .errors import Fenced
from .executor import Executor
from .lease import Grant
from .listener import listen_forever
from .planner import POLL_EVERY, Planner
from .reaper import reap_forever, reap_now
from .schedule import ONE_AT_A_TIME
from .upstream import Upstream

log = logging.getLogger(__name__)


class Leader:
    """Leader work for one term."""

    def __init__(
        self,
        *,
        settings: Settings,
        pool: Pool,
        upstream: Upstream,
        kinds: Mapping[str, JobKind],
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.upstream = upstream
        self.kinds = kinds
        self.jobs = {j.name: j for j in settings.jobs}
        self._now = now or (lambda: datetime.now(UTC))
        self._wake = asyncio.Event()
        self._fenced = asyncio.Event()
        self.token = 0
        self.executor: Executor | None = None

    async def run(self, grant: Grant) -> None:
        self.token = grant.token
        logs.bind(token=grant.token)
        try:
            ended = await db.raise_fence(
                self.pool, token=grant.token, holder=self.settings.worker_id
            )
        except Fenced as exc:
            raise StepDown(str(exc), fence=exc.current) from exc
        except db.DB_ERRORS as exc:
            # No database, no leading: hand the lease back rather than exit.
            raise StepDown(f"cannot raise the fence: {type(exc).__name__}: {exc}") from exc
        if ended:
            log.warning("ended %d session(s) of an older term that held the fence", len(ended))
        executor = self.executor = Executor(
            settings=self.settings,
            pool=self.pool,
            upstream=self.upstream,
            kinds=self.kinds,
            token=self.token,
            wake=self._wake,
            fenced=self._fenced,
        )
        planner = Planner(
            jobs=list(self.jobs.values()),
            pool=self.pool,
            token=self.token,
            executor=executor,
            now=self._now,
        )
        helpers = [
            asyncio.create_task(executor.heartbeat(), name="run-heartbeat"),
            asyncio.create_task(
                reap_forever(
                    settings=self.settings,
                    pool=self.pool,
                    kinds=self.kinds,
                    token=self.token,
                    executor=executor,
                    fenced=self._fenced,
                    wake=self._wake,
                ),
                name="reaper",
            ),
            asyncio.create_task(
                listen_forever(
                    self.settings.database_url, self._wake, timeout=self.settings.db_timeout
                ),
                name="listener",
            ),
        ]
        reason = "leadership ended"
        try:
            await self._first_reap(executor)
            await self._loop(executor, planner)
        except asyncio.CancelledError as exc:
            reason = f"leadership ended: {exc.args[0] if exc.args else 'cancelled'}"
            raise
        except StepDown as exc:
            reason = f"leadership ended: {exc}"
            raise
        finally:
            for task in helpers:
                task.cancel()
            await executor.close(reason)
            await asyncio.gather(*helpers, return_exceptions=True)
            with contextlib.suppress(Fenced, *db.DB_ERRORS):
                await db.end_term(self.pool, token=self.token, reason=reason)

    async def _first_reap(self, executor: Executor) -> None:
        try:
            await reap_now(
                settings=self.settings,
                pool=self.pool,
                kinds=self.kinds,
                token=self.token,
                executor=executor,
            )
        except Fenced as exc:
            raise StepDown(str(exc)) from exc
        except db.DB_ERRORS as exc:
            log.warning("first reaper pass failed (%s); the reaper will try again", exc)

    async def _loop(self, executor: Executor, planner: Planner) -> None:
        failures = 0
        while True:
            if self._fenced.is_set():
                raise StepDown("a newer leader raised the fence")
            # Cleared before the tick, so a wake-up that arrives during it is not lost.
            self._wake.clear()
            try:
                await executor.honour_cancels()
                # Queued runs first: a resume of an interrupted pass goes before a new slot.
                await self._drain_queue(executor)
                next_due = await planner.tick()
                pause = max(0.0, (next_due - self._now()).total_seconds())
                failures = 0
            except Fenced as exc:
                raise StepDown(str(exc)) from exc
            except db.DB_ERRORS as exc:
                # Transient: the database is restarting. Deterministic: a bug of ours the
                # next tick will likely meet again; either way the replica stays up.
                failures += 1
                pause = min(POLL_EVERY * failures, 10.0)
                log.log(
                    logging.WARNING if db.is_transient(exc) else logging.ERROR,
                    "scheduler tick failed (%s: %s), retrying in %.0fs",
                    type(exc).__name__,
                    exc,
                    pause,
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._wake.wait()

    async def _drain_queue(self, executor: Executor) -> None:
        forbid = [name for name, spec in self.jobs.items() if spec.overlap in ONE_AT_A_TIME]
        while executor.room > 0:
            async with db.fenced(self.pool, self.token) as conn:
                row = await runs.start_queued(
                    conn, token=self.token, worker_id=self.settings.worker_id, forbid=forbid
                )
                if row is not None and row["trigger"] == "resume":
                    newer = await runs.supersede_if_overtaken(conn, row["id"])
                    if newer is not None:
                        metrics.RUNS_SUPERSEDED.labels(row["job"]).inc()
                        log.warning(
                            "resume %s of %s dropped: superseded by run %s, a newer complete pass",
                            row["id"],
                            row["job"],
                            newer,
                        )
                        continue
            if row is None:
                return
            await executor.spawn(row)
