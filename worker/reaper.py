"""The reaper, leader only: abandons runs whose leader went away, queues their resumes,
gives up on chains out of attempts (loudly), ends this term's stuck runs (see
`worker.stuck`), and prunes old runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from . import db, metrics, runs, stuck, webhooks
from .config import Settings
from .context import JobKind
from .db import Pool
from .errors import Fenced
from .executor import MAX_ATTEMPTS, Executor

log = logging.getLogger(__name__)

REAP_EVERY = 2.0
PRUNE_EVERY = 600.0


async def reap_forever(
    *,
    settings: Settings,
    pool: Pool,
    kinds: Mapping[str, JobKind],
    token: int,
    executor: Executor,
    fenced: asyncio.Event,
    wake: asyncio.Event,
) -> None:
    """Every REAP_EVERY seconds, until a newer leader raises the fence."""
    loop = asyncio.get_running_loop()
    next_prune = 0.0
    steadiness = stuck.Steadiness(loop.time(), every=REAP_EVERY)
    while True:
        await asyncio.sleep(REAP_EVERY)
        steady = steadiness.steady_for(loop.time()) >= stuck.silence(settings)
        try:
            await reap_now(
                settings=settings,
                pool=pool,
                kinds=kinds,
                token=token,
                executor=executor,
                judge_held=steady,
            )
            if loop.time() >= next_prune:
                next_prune = loop.time() + PRUNE_EVERY
                async with db.fenced(pool, token) as conn:
                    pruned = await runs.prune(conn, keep=settings.keep_runs)
                    hooks = await webhooks.prune(conn, keep=settings.keep_runs)
                    await db.prune_audit(conn, keep=settings.keep_runs)
                if pruned or hooks:
                    log.info(
                        "pruned %d finished runs and %d webhook deliveries older than the"
                        " retention",
                        pruned,
                        hooks,
                    )
        except Fenced:
            fenced.set()
            wake.set()
            return
        except db.DB_ERRORS as exc:
            steadiness.failed()
            log.warning("reaper failed (%s), retrying in %.0fs", exc, REAP_EVERY)


async def reap_now(
    *,
    settings: Settings,
    pool: Pool,
    kinds: Mapping[str, JobKind],
    token: int,
    executor: Executor,
    judge_held: bool = False,
) -> None:
    """One pass. A new term runs one before it plans any slot, so the resume of a sync
    its predecessor handed off is queued before a new slot of that job could start.
    With `judge_held`, runs the executor still holds are judged stuck by their
    heartbeat too (only once the passes have been steady: `stuck.Steadiness`)."""
    resumable = [name for name, kind in kinds.items() if kind.resumable]
    async with db.fenced(pool, token) as conn:
        committed = await _reap_once(conn, settings, token, executor, resumable, judge_held)
    committed()


async def _reap_once(
    conn: db.Connection,
    settings: Settings,
    token: int,
    executor: Executor,
    resumable: list[str],
    judge_held: bool,
) -> Callable[[], None]:
    """One pass in the caller's transaction. Returns what to count and log once it has
    committed: a pass retried after a lost commit must not count its runs twice."""
    reaped = await runs.reap(
        conn, token=token, stale_after=settings.reap_after, live=list(executor.active)
    )
    ended = stuck.lost(reaped, token=token)
    if judge_held:
        ended += await stuck.end_held(
            conn, token=token, held=list(executor.active), settings=settings
        )
    resumed = await runs.queue_resumes(conn, kinds=resumable, max_attempts=MAX_ATTEMPTS)
    unresumable = await runs.end_unresumable(conn, resumable=resumable)
    given_up = await runs.give_up(conn, kinds=resumable, max_attempts=MAX_ATTEMPTS)

    def committed() -> None:
        for row in reaped:
            metrics.RUNS.labels(row["job"], "abandoned").inc()
            log.warning("run %s of %s abandoned: %s", row["id"], row["job"], row["error"])
        for new, old in resumed:
            log.info("run %s queued to resume abandoned run %s", new, old)
        for row in unresumable:
            log.warning("run %s of %s ends abandoned: %s", row["id"], row["job"], row["error"])
        for row in given_up:
            metrics.RUNS_GIVEN_UP.labels(row["job"]).inc()
            log.error(
                "run %s of %s given up for good after %d failed attempts: %s",
                row["id"],
                row["job"],
                row["attempt"],
                row["error"],
            )
        stuck.recovered(ended)

    return committed
