"""The reaper, leader only: abandons runs whose leader went away, queues their resumes,
gives up on chains out of attempts (loudly), and prunes old runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from . import db, metrics, runs
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
    next_prune = 0.0
    while True:
        await asyncio.sleep(REAP_EVERY)
        try:
            await reap_now(
                settings=settings, pool=pool, kinds=kinds, token=token, executor=executor
            )
            loop_time = asyncio.get_running_loop().time()
            if loop_time >= next_prune:
                next_prune = loop_time + PRUNE_EVERY
                async with db.fenced(pool, token) as conn:
                    pruned = await runs.prune(conn, keep=settings.keep_runs)
                if pruned:
                    log.info("pruned %d finished runs older than the retention", pruned)
        except Fenced:
            fenced.set()
            wake.set()
            return
        except db.DB_ERRORS as exc:
            log.warning("reaper failed (%s), retrying in %.0fs", exc, REAP_EVERY)


async def reap_now(
    *, settings: Settings, pool: Pool, kinds: Mapping[str, JobKind], token: int, executor: Executor
) -> None:
    """One pass. A new term runs one before it plans any slot, so the resume of a sync
    its predecessor handed off is queued before a new slot of that job could start."""
    resumable = [name for name, kind in kinds.items() if kind.resumable]
    async with db.fenced(pool, token) as conn:
        await _reap_once(conn, settings, token, executor, resumable)


async def _reap_once(
    conn: db.Connection, settings: Settings, token: int, executor: Executor, resumable: list[str]
) -> None:
    for row in await runs.reap(
        conn, token=token, stale_after=settings.reap_after, live=list(executor.active)
    ):
        metrics.RUNS.labels(row["job"], "abandoned").inc()
        log.warning("run %s of %s abandoned: %s", row["id"], row["job"], row["error"])
    for new, old in await runs.queue_resumes(conn, kinds=resumable, max_attempts=MAX_ATTEMPTS):
        log.info("run %s queued to resume abandoned run %s", new, old)
    for row in await runs.give_up(conn, kinds=resumable, max_attempts=MAX_ATTEMPTS):
        metrics.RUNS_GIVEN_UP.labels(row["job"]).inc()
        log.error(
            "run %s of %s given up for good after %d failed attempts: %s",
            row["id"],
            row["job"],
            row["attempt"],
            row["error"],
        )
