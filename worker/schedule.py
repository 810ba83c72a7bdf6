"""Cron slots in a job's timezone, DST-safe, and the misfire/overlap plan.

Slots are computed on naive local wall-clock times and only then placed on the
time line, so DST is decided in one place:
- a local time that does not exist (spring forward) runs at the next valid
  instant, the moment the clocks jump;
- a local time that happens twice (fall back) runs once, at its first occurrence.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Literal
from zoneinfo import ZoneInfo

from croniter import croniter

Misfire = Literal["skip", "latest", "all"]
Overlap = Literal["forbid", "allow", "skip", "buffer_one", "cancel_other"]
OVERLAPS: tuple[Overlap, ...] = ("forbid", "allow", "skip", "buffer_one", "cancel_other")
# Policies under which at most one run of the job executes at a time.
ONE_AT_A_TIME = frozenset({"forbid", "skip", "buffer_one", "cancel_other"})


class CronSchedule:
    """A 5-field cron expression, or 6 fields with seconds first, in a timezone."""

    def __init__(self, expr: str, tz: str | tzinfo = "UTC") -> None:
        fields = expr.split()
        if len(fields) not in (5, 6):
            raise ValueError(
                f"cron needs 5 fields (min hour day month weekday) or 6 with seconds first, "
                f"got {len(fields)} in {expr!r}"
            )
        self.expr = expr
        self.with_seconds = len(fields) == 6
        self.tz = ZoneInfo(tz) if isinstance(tz, str) else tz
        # Schedules with the same key give the same slots: jobs on one schedule (one per
        # seller account) share its slot arithmetic (the planner, the job gauges).
        self.key: tuple[object, ...] = (type(self), expr, self.tz)
        try:
            it = self._iter(datetime(2000, 1, 1))
        except (ValueError, KeyError, TypeError) as exc:  # croniter's errors subclass ValueError
            raise ValueError(f"bad cron expression {expr!r}: {exc}") from None
        try:
            # Valid syntax can still name no real date ("0 0 30 2 *"): croniter only
            # finds out when asked for a slot, which would be in the leader's loop.
            it.get_next(datetime)
        except ValueError:
            raise ValueError(
                f"cron {expr!r} never matches a real date (a day that its months do not have?)"
            ) from None

    def _iter(self, start_local: datetime) -> croniter:
        return croniter(self.expr, start_local, second_at_beginning=self.with_seconds)

    def slots_between(self, after: datetime, until: datetime) -> Iterator[datetime]:
        """Slots s (aware, UTC) with after < s <= until, in order, each instant once."""
        # No look-back is needed: an instant before a DST jump has a local time before
        # the gap, so croniter still yields the gap's slots, which map to the jump.
        start = after.astimezone(self.tz).replace(tzinfo=None)
        it = self._iter(start)
        last: datetime | None = None
        while True:
            naive: datetime = it.get_next(datetime)
            instant = self._place(naive)
            if instant > until:
                return
            if instant > after and instant != last:
                last = instant
                yield instant

    def newest_between(self, after: datetime, until: datetime, limit: int) -> list[datetime]:
        """The newest `limit` slots s with after < s <= until, oldest first.

        Walks backwards from `until`, so the work is bounded by `limit` however long
        ago `after` is (a per-second job after a two-week outage: 1.2 million slots).
        """
        it = self._iter(until.astimezone(self.tz).replace(tzinfo=None) + timedelta(seconds=1))
        found: list[datetime] = []
        while len(found) < limit:
            instant = self._place(it.get_prev(datetime))
            if instant <= after:
                break
            if instant <= until and (not found or instant != found[-1]):
                found.append(instant)
        found.reverse()
        return found

    def next_after(self, after: datetime) -> datetime:
        """The first slot strictly after `after`."""
        horizon = after + timedelta(days=366 * 5)
        for slot in self.slots_between(after, horizon):
            return slot
        raise ValueError(f"cron {self.expr!r} has no slot within five years")

    def _place(self, naive: datetime) -> datetime:
        """Put a local wall-clock time on the UTC time line (see module docstring)."""
        first = naive.replace(tzinfo=self.tz, fold=0)
        if _exists(first):
            return first.astimezone(UTC)
        # In a gap fold=0 maps past the jump and fold=1 before it; the jump lies between.
        lo = naive.replace(tzinfo=self.tz, fold=1).astimezone(UTC)
        hi = first.astimezone(UTC)
        after_offset = hi.astimezone(self.tz).utcoffset()
        while (hi - lo) > timedelta(seconds=1):
            mid = lo + (hi - lo) / 2
            mid = mid.replace(microsecond=0)
            if mid.astimezone(self.tz).utcoffset() == after_offset:
                hi = mid
            else:
                lo = mid
        return hi


def _exists(local: datetime) -> bool:
    back = local.astimezone(UTC).astimezone(local.tzinfo)
    return back.replace(tzinfo=None) == local.replace(tzinfo=None)


@dataclass(frozen=True)
class Plan:
    """What to do with the due slots of one job at one tick."""

    run: list[datetime] = field(default_factory=list)
    missed: list[datetime] = field(default_factory=list)


def plan_slots(
    due: list[datetime],
    *,
    now: datetime,
    misfire: Misfire,
    grace: float,
    busy: bool,
    overlap: Overlap,
) -> Plan:
    """Decide which due slots run and which are recorded as missed.

    `due` are the unclaimed slots up to `now`, oldest first. A slot is late when it is
    more than `grace` seconds old. With overlap=forbid and a run in progress nothing is
    decided: the slots wait, and if they grow late the misfire policy decides later.
    """
    if not due or (busy and overlap == "forbid"):
        return Plan()
    if busy and overlap != "allow":
        # skip, buffer_one, cancel_other: the planner decides with the ledger (see
        # planner.Planner._collide); here only the misfire policy's part is decided.
        return _collide(due, now=now, misfire=misfire, grace=grace)
    limit = timedelta(seconds=grace)
    late = [s for s in due if now - s > limit]
    on_time = [s for s in due if now - s <= limit]
    if misfire == "skip":
        run, missed = on_time, late
    elif misfire == "latest":
        run, missed = due[-1:], due[:-1]
    else:
        run, missed = list(due), []
    if overlap in ONE_AT_A_TIME:
        # One at a time: the rest stay due and are planned again once this run ends.
        if misfire == "all":
            return Plan(run=run[:1], missed=missed)
        return Plan(run=run[-1:], missed=missed + run[:-1])
    return Plan(run=run, missed=missed)


def _collide(due: list[datetime], *, now: datetime, misfire: Misfire, grace: float) -> Plan:
    """Due slots meeting a running run of the job (overlap skip, buffer_one or
    cancel_other): the slot that may run is offered in `run` for the planner to skip,
    buffer or start (cancelling the other); the rest are `missed` by the misfire policy."""
    limit = timedelta(seconds=grace)
    if misfire == "skip":
        on_time = [s for s in due if now - s <= limit]
        late = [s for s in due if now - s > limit]
        return Plan(run=on_time[-1:], missed=late + on_time[:-1])
    return Plan(run=due[-1:], missed=due[:-1])
