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
from datetime import UTC, datetime, timedelta

from . import db, jobgauges, logs, metrics, runs, webhooks
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
from .reload import LiveSettings
from .schedule import ONE_AT_A_TIME
from .upstream import Upstream

log = logging.getLogger(__name__)

# How often the leader refreshes the per-job gauges (failure streak, paused, last success).
JOB_GAUGES_EVERY = 5.0
# Terms still closing after their leader handed on the lease (kept referenced).
_LATE: set[asyncio.Task[None]] = set()


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
        live: LiveSettings | None = None,
    ) -> None:
        self.settings = live.current if live is not None else settings
        self.live = live
        self.pool = pool
        self.upstream = upstream
        self.kinds = kinds
        self.jobs = {j.name: j for j in self.settings.jobs}
        self._now = now or (lambda: datetime.now(UTC))
        self._wake = asyncio.Event()
        self._fenced = asyncio.Event()
        self.token = 0
        self.executor: Executor | None = None
        self._targets: list[tuple[str, str]] | None = None  # webhook targets written

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
                webhooks.Deliverer(
                    pool=self.pool,
                    token=self.token,
                    secret=self.settings.webhook_secret,
                    timeout=self.settings.webhook_timeout,
                    max_attempts=self.settings.webhook_max_attempts,
                    backoff=self.settings.webhook_backoff,
                ).run(),
                name="webhooks",
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
            jobgauges.clear()  # a follower exports no stale job state
            for task in helpers:
                task.cancel()
            closing = asyncio.create_task(
                self._close(executor, helpers, reason), name=f"close-term-{self.token}"
            )
            # Bounded like the elector's wait for leader work it cancels: a term that ends
            # because its database is gone must not keep the lease while its runs try to
            # record their ends. What is late goes on in the background; once a successor
            # leads, the fence refuses it.
            grace = self.settings.shutdown_grace / 2
            done, _ = await asyncio.wait({closing}, timeout=grace)
            if not done:
                log.warning("term %d still closing after %.1fs: handing on", self.token, grace)
                _LATE.add(closing)
                closing.add_done_callback(_LATE.discard)

    async def _close(
        self, executor: Executor, helpers: list[asyncio.Task[None]], reason: str
    ) -> None:
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
        gauges_at = self._now()
        clock = asyncio.get_running_loop().time
        last_ok = clock()  # when the last tick that reached the database began
        while True:
            began = clock()
            if self._fenced.is_set():
                raise StepDown("a newer leader raised the fence")
            # Cleared before the tick, so a wake-up that arrives during it is not lost.
            self._wake.clear()
            try:
                await self._adopt_reload(executor, planner)
                await self._write_webhook_targets()
                await executor.honour_cancels()
                # Queued runs first: a resume of an interrupted pass goes before a new slot.
                await self._drain_queue(executor)
                next_due = await planner.tick()
                if self._now() >= gauges_at:
                    gauges_at = self._now() + timedelta(seconds=JOB_GAUGES_EVERY)
                    await jobgauges.refresh(self.pool, list(self.jobs.values()), self._now())
                pause = max(0.0, (next_due - self._now()).total_seconds())
                failures = 0
                last_ok = began
            except Fenced as exc:
                raise StepDown(str(exc)) from exc
            except db.DB_ERRORS as exc:
                # Transient: the database is restarting. Deterministic: a bug of ours the
                # next tick will likely meet again; either way the replica stays up.
                failures += 1
                # A leader that cannot reach the database for a whole lease TTL (cut off
                # from it, while Redis still renews its lease) hands the lease on: another
                # replica may reach it. If none can, each new leader's fence raise fails
                # and it hands the lease on in turn, at no cost.
                blind = clock() - last_ok
                if db.is_transient(exc) and blind >= self.settings.lease.ttl:
                    raise StepDown(
                        f"no database for {blind:.0f}s ({type(exc).__name__}: {exc})"
                    ) from exc
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

    async def _adopt_reload(self, executor: Executor, planner: Planner) -> None:
        """Take up a reloaded jobs file at the top of a tick: added jobs are planned from
        now, removed ones no longer (their history stays), changed ones as they now read."""
        if self.live is None or self.live.current is self.settings:
            return
        new = self.live.current
        removed = [name for name in self.jobs if new.job(name) is None]
        if removed:
            async with db.fenced(self.pool, self.token) as conn:
                await runs.mark_removed(conn, removed)
        self.settings = executor.settings = new
        self.jobs = executor.jobs = {j.name: j for j in new.jobs}
        planner.use(list(new.jobs))
        log.info("leader took up the reloaded jobs file (%d jobs)", len(new.jobs))

    async def _write_webhook_targets(self) -> None:
        """The outbox trigger reads the targets from Postgres: the leader's file rules."""
        targets = self.settings.webhook_targets()
        if targets != self._targets:
            async with db.fenced(self.pool, self.token) as conn:
                await webhooks.sync_targets(conn, targets)
            self._targets = targets

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
