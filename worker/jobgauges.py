"""The per-job gauges the leader exports: failure streak, pause, last success, period.

The leader sets them from Postgres every few seconds (`refresh`) and removes them when
its term ends (`clear`), so only the replica that leads exports them: a follower's
stale copy would outlive the next leader's view, and alerts read them with `max by job`.
The values come from the ledger every replica shares (`job_state`, `runs`), not from
the leader's memory, so a new leader exports the same values its predecessor did.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from prometheus_client import Gauge

from . import metrics
from .config import JobSpec
from .db import Pool
from .schedule import CronSchedule

# Who `pauses.record_outcome` names when the leader pauses a job after
# pause_after_failures failed runs in a row; any other `paused_by` is an operator's.
AUTO_PAUSED_BY = "leader"
PAUSED_BY = ("operator", "failures")
# Gaps between slots looked at for a job's expected period: the current one (from the
# newest slot before now to the next) and those of the next slots. Eight slots see a
# weekday-only daily job's weekend; the current gap covers a dense schedule's night.
AHEAD = 8
_LOOK_BACK = timedelta(days=366)
_LOOK_AHEAD = timedelta(days=366 * 5)

_GAUGES: tuple[Gauge, ...] = (
    metrics.JOB_FAILURE_STREAK,
    metrics.JOB_PAUSED,
    metrics.JOB_LAST_SUCCESS,
    metrics.JOB_EXPECTED_PERIOD,
)

# What `refresh` last set on each gauge, label set -> value: only this module sets them.
_SHOWN: dict[Gauge, dict[tuple[str, ...], float]] = {}

# One query for every job: its pause state and streak, and its newest succeeded run
# (walked by the runs_job_created index, newest first, so it stops at the first one).
_STATE = """
SELECT j.job, s.failure_streak, s.paused_at, s.paused_by,
       (SELECT r.finished_at FROM runs r
         WHERE r.job = j.job AND r.status = 'succeeded' AND r.finished_at IS NOT NULL
         ORDER BY r.id DESC LIMIT 1) AS last_success
FROM unnest($1::text[]) AS j(job)
LEFT JOIN job_state s ON s.job = j.job
"""


async def refresh(pool: Pool, specs: Sequence[JobSpec], now: datetime) -> None:
    """Set every JOB_* gauge for `specs` from Postgres, and drop the label sets of jobs
    no longer in `specs` (a reloaded jobs file). Database errors propagate: the gauges
    then keep their last values."""
    rows = await pool.fetch(_STATE, [spec.name for spec in specs])
    by_job = {row["job"]: row for row in rows}
    streak: dict[tuple[str, ...], float] = {}
    paused: dict[tuple[str, ...], float] = {}
    last_success: dict[tuple[str, ...], float] = {}
    period: dict[tuple[str, ...], float] = {}
    # Jobs on the same schedule (one per seller account) share one computation: 10 000
    # of them took 5 s of the leader's loop every refresh.
    gaps: dict[tuple[object, ...], float | None] = {}
    for spec in specs:
        row = by_job.get(spec.name)
        streak[(spec.name,)] = float(row["failure_streak"] or 0) if row else 0.0
        by = pauser(row["paused_by"]) if row and row["paused_at"] else None
        for who in PAUSED_BY:
            paused[(spec.name, who)] = 1.0 if who == by else 0.0
        if row and row["last_success"] is not None:
            last_success[(spec.name,)] = row["last_success"].timestamp()
        if spec.schedule is not None:
            key = spec.schedule.key
            if key not in gaps:
                gaps[key] = expected_period(spec.schedule, now)
            gap = gaps[key]
            if gap is not None:
                period[(spec.name,)] = gap
    # No await from here on: a scrape sees all of this refresh or none of it.
    _replace(metrics.JOB_FAILURE_STREAK, streak)
    _replace(metrics.JOB_PAUSED, paused)
    _replace(metrics.JOB_LAST_SUCCESS, last_success)
    _replace(metrics.JOB_EXPECTED_PERIOD, period)


def clear() -> None:
    """Remove every JOB_* label set: called when this replica stops leading."""
    for gauge in _GAUGES:
        gauge.clear()
    _SHOWN.clear()


def pauser(paused_by: str | None) -> str:
    """The `by` label of a pause: `failures` for the leader's own, else `operator`."""
    return "failures" if paused_by == AUTO_PAUSED_BY else "operator"


def expected_period(schedule: CronSchedule, now: datetime) -> float | None:
    """The longest gap, in seconds, between consecutive slots of `schedule` around `now`:
    the gap `now` is in and those of the next AHEAD slots. None when the schedule has
    fewer than two slots in reach (no gap to measure)."""
    try:
        before = schedule.newest_between(now - _LOOK_BACK, now, 1)
        ahead = itertools.islice(schedule.slots_between(now, now + _LOOK_AHEAD), AHEAD)
        slots = [*before, *ahead]
    except ValueError:  # croniter found no date where it looked: nothing to measure
        return None
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(slots)]
    return max(gaps) if gaps else None


def _replace(gauge: Gauge, values: Mapping[tuple[str, ...], float]) -> None:
    """Make `values` the gauge's only label sets, touching only what changed since the
    last refresh (`_SHOWN`): with 10 000 jobs, walking the gauges' samples and setting
    every value held the loop 0.3 s of each refresh; unchanged, it now costs a lookup."""
    shown = _SHOWN.setdefault(gauge, {})
    for labels in shown.keys() - values.keys():
        with contextlib.suppress(KeyError):  # already gone
            gauge.remove(*labels)
        del shown[labels]
    for labels, value in values.items():
        if shown.get(labels) != value:
            gauge.labels(*labels).set(value)
            shown[labels] = value
