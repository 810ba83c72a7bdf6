"""Cron slots across DST and the misfire/overlap plan (pure functions)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from worker.schedule import CronSchedule, plan_slots

BUCHAREST = "Europe/Bucharest"  # EET/EEST: jumps 03:00 -> 04:00 in March, 04:00 -> 03:00 in Oct


def local(slots: list[datetime], tz: str) -> list[str]:
    cron = CronSchedule("* * * * *", tz)
    return [s.astimezone(cron.tz).isoformat() for s in slots]


def test_spring_forward_nonexistent_time_runs_at_the_jump_once() -> None:
    daily = CronSchedule("30 3 * * *", BUCHAREST)
    got = list(
        daily.slots_between(datetime(2026, 3, 28, tzinfo=UTC), datetime(2026, 3, 31, tzinfo=UTC))
    )
    assert local(got, BUCHAREST) == [
        "2026-03-28T03:30:00+02:00",
        "2026-03-29T04:00:00+03:00",  # 03:30 does not exist that day: the next valid instant
        "2026-03-30T03:30:00+03:00",
    ]


def test_spring_forward_every_15_minutes_skips_the_gap_without_duplicates() -> None:
    cron = CronSchedule("*/15 * * * *", BUCHAREST)
    got = list(
        cron.slots_between(
            datetime(2026, 3, 29, 0, 30, tzinfo=UTC), datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
        )
    )
    assert local(got, BUCHAREST) == [
        "2026-03-29T02:45:00+02:00",
        "2026-03-29T04:00:00+03:00",  # 03:00..03:45 do not exist: one run at the jump
        "2026-03-29T04:15:00+03:00",
        "2026-03-29T04:30:00+03:00",
    ]
    assert len(set(got)) == len(got)


def test_fall_back_ambiguous_time_runs_once() -> None:
    daily = CronSchedule("30 3 * * *", BUCHAREST)
    got = list(
        daily.slots_between(datetime(2026, 10, 24, tzinfo=UTC), datetime(2026, 10, 27, tzinfo=UTC))
    )
    assert local(got, BUCHAREST) == [
        "2026-10-24T03:30:00+03:00",
        "2026-10-25T03:30:00+03:00",  # 03:30 happens twice that day: the first one only
        "2026-10-26T03:30:00+02:00",
    ]


def test_fall_back_hourly_has_no_duplicate_hour() -> None:
    cron = CronSchedule("0 * * * *", BUCHAREST)
    got = list(
        cron.slots_between(
            datetime(2026, 10, 24, 23, 30, tzinfo=UTC), datetime(2026, 10, 25, 3, 30, tzinfo=UTC)
        )
    )
    assert local(got, BUCHAREST) == [
        "2026-10-25T03:00:00+03:00",
        "2026-10-25T04:00:00+02:00",
        "2026-10-25T05:00:00+02:00",
    ]
    assert all(b - a >= timedelta(hours=1) for a, b in itertools.pairwise(got))


def test_after_inside_the_repeated_hour_does_not_rerun() -> None:
    cron = CronSchedule("30 3 * * *", BUCHAREST)
    # 01:15 UTC is 03:15 local, second pass (EET); the 03:30 slot already ran at 00:30 UTC.
    after = datetime(2026, 10, 25, 1, 15, tzinfo=UTC)
    assert cron.next_after(after) == datetime(2026, 10, 26, 1, 30, tzinfo=UTC)


def test_six_fields_means_seconds_first() -> None:
    cron = CronSchedule("*/20 * * * * *", "UTC")
    start = datetime(2026, 1, 1, tzinfo=UTC)
    got = list(cron.slots_between(start, start + timedelta(minutes=1)))
    assert [s.second for s in got] == [20, 40, 0]


@pytest.mark.parametrize("expr", ["* * * *", "61 * * * *", "* * * * * * *", "x y z a b"])
def test_bad_cron_is_refused(expr: str) -> None:
    with pytest.raises(ValueError, match="cron"):
        CronSchedule(expr)


NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def minutes_ago(*ms: int) -> list[datetime]:
    return [NOW - timedelta(minutes=m) for m in ms]


def test_misfire_skip_runs_only_on_time_slots() -> None:
    due = minutes_ago(30, 20, 10, 0)
    plan = plan_slots(due, now=NOW, misfire="skip", grace=60, busy=False, overlap="allow")
    assert plan.run == minutes_ago(0)
    assert plan.missed == minutes_ago(30, 20, 10)


def test_misfire_latest_runs_the_newest_late_slot() -> None:
    due = minutes_ago(30, 20, 10)
    plan = plan_slots(due, now=NOW, misfire="latest", grace=60, busy=False, overlap="forbid")
    assert plan.run == minutes_ago(10)
    assert plan.missed == minutes_ago(30, 20)


def test_misfire_all_runs_each_slot_one_at_a_time_with_forbid() -> None:
    due = minutes_ago(30, 20, 10)
    plan = plan_slots(due, now=NOW, misfire="all", grace=60, busy=False, overlap="forbid")
    assert plan.run == minutes_ago(30)
    assert plan.missed == []
    plan = plan_slots(due, now=NOW, misfire="all", grace=60, busy=False, overlap="allow")
    assert plan.run == due


def test_forbid_while_busy_decides_nothing() -> None:
    plan = plan_slots(
        minutes_ago(1), now=NOW, misfire="skip", grace=600, busy=True, overlap="forbid"
    )
    assert plan.run == []
    assert plan.missed == []


def test_skip_with_nothing_on_time_runs_nothing() -> None:
    plan = plan_slots(
        minutes_ago(30), now=NOW, misfire="skip", grace=60, busy=False, overlap="forbid"
    )
    assert plan.run == []
    assert plan.missed == minutes_ago(30)


@pytest.mark.parametrize(
    ("expr", "after", "until"),
    [
        (
            "*/15 * * * *",
            datetime(2026, 3, 29, 0, 30, tzinfo=UTC),
            datetime(2026, 3, 29, 1, 30, tzinfo=UTC),
        ),
        (
            "*/30 * * * *",
            datetime(2026, 10, 24, 22, tzinfo=UTC),
            datetime(2026, 10, 25, 2, tzinfo=UTC),
        ),
        ("30 3 * * *", datetime(2026, 3, 27, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC)),
        (
            "0 * * * *",
            datetime(2026, 10, 24, 23, 30, tzinfo=UTC),
            datetime(2026, 10, 25, 3, 30, tzinfo=UTC),
        ),
    ],
)
def test_newest_between_walks_back_to_the_same_slots(
    expr: str, after: datetime, until: datetime
) -> None:
    cron = CronSchedule(expr, BUCHAREST)
    assert cron.newest_between(after, until, 10_000) == list(cron.slots_between(after, until))


def test_newest_between_is_bounded_after_a_very_long_outage() -> None:
    every_second = CronSchedule("* * * * * *", "UTC")
    until = datetime(2026, 1, 15, tzinfo=UTC)
    newest = every_second.newest_between(until - timedelta(days=14), until, 1000)
    assert len(newest) == 1000
    assert newest[-1] == until
    assert newest[0] == until - timedelta(seconds=999)
