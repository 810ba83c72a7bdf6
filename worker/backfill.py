"""Backfill: queue every slot of a job's schedule in a past range, through the ledger.

A backfilled slot is a `queued` row with its slot and trigger `backfill`, inserted
with the same `UNIQUE (job, slot)` the planner claims by: a slot that already has a
row (run, missed, queued…) is skipped and reported, never run twice. The leader's
queue drain starts the rows in id order, which is slot order, and obeys the job's
overlap policy (forbid: one at a time), so nothing here needs the leader.

Only the past may be backfilled: the planner resumes from the newest slot in the
ledger at the start of a term, and a queued future slot would make it skip the
real slots before it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from itertools import islice
from typing import Any

from .config import JobSpec
from .db import NOTIFY_CHANNEL, Pool
from .errors import WorkerError

DEFAULT_MAX = 1000
# The most one request may ask for with `max`: a backfill is a batch of runs, not a way
# to replay years of a per-second job.
HARD_MAX = 10_000
# Counting a refused range stops here ("more than …"): a year of a per-second job is
# 31 million slots, and the count only has to say how far over the limit it is.
COUNT_CEILING = 100_000
SHOWN_SKIPPED = 20


class BackfillError(WorkerError):
    """A backfill request refused; `field` names what is wrong (from, to, max, schedule)."""

    def __init__(self, field: str, message: str, *, count: int | None = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.count = count


@dataclass(frozen=True)
class Outcome:
    """What a backfill did: the range's slots, and which of them already had a row."""

    slots: list[datetime]
    skipped: list[datetime]

    @property
    def queued(self) -> int:
        return len(self.slots) - len(self.skipped)

    def public(self) -> dict[str, Any]:
        """The answer the API and the CLI (`--json`) give."""
        return {
            "queued": self.queued,
            "skipped": len(self.skipped),
            "first": self.slots[0].isoformat() if self.slots else None,
            "last": self.slots[-1].isoformat() if self.slots else None,
            "skipped_slots": [s.isoformat() for s in self.skipped[:SHOWN_SKIPPED]],
        }


def bound(text: str, spec: JobSpec, field: str) -> datetime:
    """A `from`/`to` value: an ISO date-time with an offset, or a date (midnight in the
    job's timezone). BackfillError names the field."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            tz = spec.schedule.tz if spec.schedule else None
            return datetime.combine(day, time(), tz)
        instant = datetime.fromisoformat(text)
    except ValueError:
        raise BackfillError(
            field, f"{text[:40]!r} is not a date (2026-05-01) or a date-time with an offset"
        ) from None
    if instant.tzinfo is None:
        raise BackfillError(
            field, f"{text!r} has no offset (write 2026-05-01T18:00+02:00, or a date)"
        )
    return instant


def slots_in(
    spec: JobSpec, start: datetime, end: datetime, *, now: datetime, limit: int
) -> list[datetime]:
    """The job's slots s with start <= s <= end, oldest first, checked against the rules:
    a schedule, start <= end <= now, and at most `limit` slots."""
    if spec.schedule is None:
        raise BackfillError("schedule", f"job {spec.name!r} has no schedule: nothing to backfill")
    if not 1 <= limit <= HARD_MAX:
        raise BackfillError("max", f"must be a whole number from 1 to {HARD_MAX}, got {limit}")
    if start > end:
        raise BackfillError("from", f"{start.isoformat()} is after to ({end.isoformat()})")
    if end > now:
        raise BackfillError(
            "to",
            f"{end.isoformat()} is in the future (now {now.isoformat()}): only past slots"
            " can be backfilled; the scheduler runs the future ones",
        )
    # Slots fall on whole seconds: one second back makes `start` itself included.
    found = spec.schedule.slots_between(start - timedelta(seconds=1), end)
    slots = [s for s in islice(found, COUNT_CEILING + 1) if s >= start]
    if len(slots) > limit:
        shown = f"more than {COUNT_CEILING}" if len(slots) > COUNT_CEILING else str(len(slots))
        raise BackfillError(
            "max",
            f"the range holds {shown} slots, more than the maximum of {limit}:"
            f" narrow the range, or raise max (at most {HARD_MAX})",
            count=len(slots),
        )
    return slots


async def queue(pool: Pool, spec: JobSpec, slots: list[datetime], *, requested_by: str) -> Outcome:
    """Insert a queued `backfill` row per slot, in slot order; slots with a row are
    skipped. The leader is woken by NOTIFY (any replica may call this)."""
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            "INSERT INTO runs (job, kind, slot, trigger, status, params, requested_by)"
            " SELECT $1, $2, s, 'backfill', 'queued', $4, $5"
            " FROM unnest($3::timestamptz[]) s ORDER BY s"
            " ON CONFLICT (job, slot) DO NOTHING RETURNING slot",
            spec.name,
            spec.kind,
            slots,
            dict(spec.params),
            requested_by,
        )
        if rows:
            await conn.execute("SELECT pg_notify($1, 'backfill')", NOTIFY_CHANNEL)
    queued = {r["slot"] for r in rows}
    return Outcome(slots=slots, skipped=[s for s in slots if s not in queued])


async def backfill(
    pool: Pool,
    spec: JobSpec,
    *,
    start: datetime,
    end: datetime,
    now: datetime,
    limit: int = DEFAULT_MAX,
    requested_by: str,
) -> Outcome:
    """Check the range and queue its slots (see `slots_in` and `queue`)."""
    # Enumerating up to COUNT_CEILING slots takes a few seconds: off the event loop.
    slots = await asyncio.to_thread(slots_in, spec, start, end, now=now, limit=limit)
    return await queue(pool, spec, slots, requested_by=requested_by)
