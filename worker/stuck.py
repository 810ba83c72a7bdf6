"""Stuck runs: the ledger says `running`, and nothing is seeing the run through.

The heartbeat is the one liveness signal every replica can read. The leader's executor
writes it every `HEARTBEAT_EVERY` seconds for every run it holds, whatever the run is
doing, and each committed page refreshes it; so a heartbeat older than `silence()`
means no live executor vouches for the run. Who finds such a run decides what it is:

* a run of an older term: its leader went away. That is a failover, not a stuck run:
  the reaper abandons it and resumes a resumable one from its cursor (`worker.reaper`);
* a run of this term that the executor no longer holds (it ended, but its end could
  not be written): the reaper abandons it the same way, and `lost()` counts it here;
* a run this term's executor still holds whose heartbeat stopped anyway (the heartbeat
  loop died): `end_held()` fails it. A resumable one is not resumed: its coroutine may
  still be going, and a resume would run the same pass beside it;
* `clean_up()` (`POST /runs/cleanup-stuck`, `worker cleanup-stuck`, on any replica):
  every run running longer than the operator's bound with a silent heartbeat, failed
  and not resumed. A live leader's reaper takes the runs of dead terms after
  `reap_after`, long before that bound, so what is left for it is what nothing
  automatic takes: no leader, a leader whose reaper keeps failing, a held run whose
  heartbeat stopped.

A replica that is not the leader may end these rows because no live leader looks after
them (that is what the silent heartbeat says), and because every ending goes through
`runs.finish`, which changes a row only while it is `running`, on rows
`runs.silent_running` locked: a run is ended once, by whoever gets there first, and the
loser changes nothing. The run's own leader waking later (a frozen process, a coroutine
that outlived its heartbeat) finds its end already written and leaves it as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from . import executor, metrics, runs
from .config import Settings
from .db import Connection, Pool

log = logging.getLogger(__name__)

# cleanup-stuck's bound on how long a run has been running, in minutes.
MIN_MINUTES, MAX_MINUTES, DEFAULT_MINUTES = 5, 60, 15
# A reaper pass that starts this much later than its period after the one before (this
# process stalled, or the pass was slow) starts the count of steady time again.
STALL = 1.0


def silence(settings: Settings) -> float:
    """How old a run's heartbeat must be for the run to be no one's: the reaper's bound
    (`reap_after`), and never under three heartbeat periods, so one late or failed
    heartbeat never makes a live run look stuck, whatever a replica's WORKER_REAP_AFTER."""
    return max(settings.reap_after, 3 * executor.HEARTBEAT_EVERY)


def span(seconds: float) -> str:
    """A duration as an operator reads it: 1h02m, 4m05s, 12s."""
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


async def clean_up(
    pool: Pool, *, minutes: int, settings: Settings, by: str
) -> list[dict[str, Any]]:
    """Fail every run `running` for more than `minutes` whose heartbeat is older than
    `silence()`; returns them ({id, job, error}) for the caller to report. Any replica
    may call it."""
    if not MIN_MINUTES <= minutes <= MAX_MINUTES:
        raise ValueError(f"minutes must be from {MIN_MINUTES} to {MAX_MINUTES}, got {minutes}")
    ended = []
    async with pool.acquire() as conn, conn.transaction():
        silent = await runs.silent_running(
            conn, silent_for=silence(settings), running_for=minutes * 60.0
        )
        found(silent)
        for row in silent:
            error = (
                f"stuck: running for {span(row['running_s'])} with no heartbeat for"
                f" {span(row['silent_s'])} (its leader: {row['worker_id']}, token"
                f" {row['token']}); marked failed by {by}"
            )
            if await runs.finish(conn, row["id"], status="failed", error=error):
                ended.append({"id": row["id"], "job": row["job"], "error": error})
    recovered(ended)
    for run in ended:
        metrics.RUNS.labels(run["job"], "failed").inc()
    return ended


def lost(reaped: Iterable[dict[str, Any]], *, token: int) -> list[dict[str, Any]]:
    """Of the runs the reaper just abandoned, this term's own (counted as found): runs
    the executor no longer holds though the ledger still said `running` (their end
    could not be written). Runs of older terms are a failover, not stuck."""
    own = [row for row in reaped if row["token"] == token]
    found(own)
    return own


async def end_held(
    conn: Connection, *, token: int, held: Sequence[int], settings: Settings
) -> list[dict[str, Any]]:
    """Fail the runs this term's executor holds whose heartbeat is silent anyway, in the
    leader's fenced transaction; returns them. Call it only when `Steadiness` says the
    heartbeat loop has had its chances to write (see there)."""
    if not held:
        return []
    ended = []
    silent = await runs.silent_running(
        conn, silent_for=silence(settings), token=token, only=list(held)
    )
    found(silent)
    for row in silent:
        error = (
            f"stuck: no heartbeat for {span(row['silent_s'])} while its leader"
            f" ({settings.worker_id}, token {token}) still held it, running for"
            f" {span(row['running_s'])}; marked failed by leader:{settings.worker_id}"
        )
        if await runs.finish(conn, row["id"], status="failed", error=error):
            metrics.RUNS.labels(row["job"], "failed").inc()
            log.error("run %s of %s is stuck: %s", row["id"], row["job"], error)
            ended.append({"id": row["id"], "job": row["job"], "error": error})
    return ended


def found(stuck: Sequence[Any]) -> None:
    """Count stuck runs found (their ending may still fail to commit)."""
    metrics.STUCK_RUNS_DETECTED.inc(len(stuck))


def recovered(ended: Sequence[Any]) -> None:
    """Count stuck runs ended, once their ending is committed."""
    metrics.STUCK_RUNS_RECOVERED.inc(len(ended))


class Steadiness:
    """Since when this leader's reaper passes have come on time with the database
    answering.

    A held run's heartbeat can go silent with nothing stuck: while the database was
    down (the heartbeats failed, and so did the passes) or while this process stalled
    (a blocked event loop runs neither). Held runs are judged only once the passes have
    been steady for `silence()`, so the heartbeat loop has had its chances to write.
    """

    def __init__(self, now: float, *, every: float) -> None:
        self._every = every
        self._last = now
        self._since: float | None = now

    def steady_for(self, now: float) -> float:
        """Called as a pass starts: for how long the passes have been steady."""
        if self._since is None or now - self._last > self._every + STALL:
            self._since = now
        self._last = now
        return now - self._since

    def failed(self) -> None:
        """The pass failed (the database did not answer)."""
        self._since = None
