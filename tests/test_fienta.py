"""`parse.fienta` against the fake Fienta (worker/sandbox/fienta.py), under a real leader.

Each run is queued as `POST /parsing/create` queues it: the job's params plus the
operation's `meta`. Expected values are worked out here from the fake's records and
fixed UTC instants, not by the parser's own code.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from worker import db, run_items, runs
from worker.config import JobSpec
from worker.jobs.parsers import FientaJob, Meta
from worker.robots import user_agent
from worker.sandbox.fienta import FIENTA, FientaConfig, FientaSite, build_app
from worker.upstream import Upstream

from .test_catalog_sync import final, leading, upstream

__all__ = ["upstream"]  # the fixture, imported for pytest

FIRST = date(2025, 3, 25)  # five days before Europe/Tallinn's change to summer time
CONTACT = "https://example.test/sync-worker"
KIND = "parse.fienta"


@dataclass
class Fake:
    site: FientaSite
    server: TestServer

    @property
    def base_url(self) -> str:
        return str(self.server.make_url("/api/v1"))

    def api_requests(self) -> list[Any]:
        return [r for r in self.site.requests if r.path == "/api/v1/public/events"]


async def start_fienta(aiohttp_server: AiohttpServer, **config: Any) -> Fake:
    app = build_app(FientaConfig(**{"first_day": FIRST, "days": 10, **config}))
    return Fake(app[FIENTA], await aiohttp_server(app))


def job_params(fake: Fake, **extra: Any) -> dict[str, Any]:
    return {
        "base_url": fake.base_url,
        "timezone": "Europe/Tallinn",
        "countries": ["EE"],
        "rate_limit": 0,
        "contact": CONTACT,
        **extra,
    }


async def parse(
    pool: db.Pool,
    upstream: Upstream,
    params: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One operation: queued with the job's params plus `meta`, run by a real leader."""
    job = FientaJob()
    spec = JobSpec(name="fienta", kind=KIND, schedule=None, params=dict(params))
    job.check(spec)
    run_id = await runs.enqueue(
        pool, job="fienta", kind=KIND, params={**params, "meta": dict(meta or {})}
    )
    async with leading(pool, upstream, {KIND: job}, [spec]):
        return await final(pool, run_id)


async def saved(pool: db.Pool, row: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["external_id"]: e for e in await run_items.read(pool, row["id"])}


@contextlib.contextmanager
def server_zone(name: str) -> Iterator[None]:
    """The process's local zone set to `name` for the block: the parser must not use it."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = name
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


# -- batches, progress, the request itself ---------------------------------------------


async def test_events_land_in_batches_of_ten_with_progress(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start_fienta(aiohttp_server)
    records = fake.site.events["EE"]
    assert len(records) == 43  # 40 spread over the days, 3 around the DST change

    row = await parse(pool, upstream, job_params(fake))

    assert row["status"] == "succeeded", row["error"]
    assert row["result"] == {"events": 43, "failed": 0, "batches": 5}
    assert row["progress"]["message"] == "done: processed 43 of 43 events, batch 5 of 5 (0 failed)"
    batches = await pool.fetch(
        "SELECT batch, count(*) AS n FROM run_items WHERE operation_id = $1 GROUP BY batch"
        " ORDER BY batch",
        row["id"],
    )
    assert [(b["batch"], b["n"]) for b in batches] == [(1, 10), (2, 10), (3, 10), (4, 10), (5, 3)]
    items = await run_items.read(pool, row["id"])
    assert [i["external_id"] for i in items] == sorted(str(r["id"]) for r in records)

    event = {i["external_id"]: i for i in items}["100001"]
    raw = next(r for r in records if r["id"] == 100001)
    assert event["raw"] == raw
    assert event["source"] == "fienta"
    assert event["title"] == raw["title"]
    assert event["venue"] == raw["venue"]
    assert event["address"] == raw["address"]
    assert event["city"] in ("Tallinn", "Tartu")
    assert event["city"] in raw["address"]
    assert event["country"] == "EE"
    assert event["category"] == raw["categories"][0]
    assert event["url"] == raw["url"]
    assert event["image"] == raw["image_url"]
    with_price = next(i for i in items if "price_from_string" in i["raw"])
    amount = float(with_price["raw"]["price_from_string"].split()[1])
    assert (with_price["price_min"], with_price["currency"]) == (amount, "EUR")

    # robots.txt once, first; every request names the project.
    assert [r.path for r in fake.site.requests] == ["/robots.txt", "/api/v1/public/events"]
    assert {r.user_agent for r in fake.site.requests} == {f"sync-worker/0.1.0 (+{CONTACT})"}
    assert user_agent(CONTACT) == f"sync-worker/0.1.0 (+{CONTACT})"
    assert fake.api_requests()[0].query == {"country": "EE", "locale": "en"}


async def test_answers_at_the_cap_are_continued_from_their_last_start_date(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    """Fienta returns at most 1 000 events an answer; the next asks from the last start
    date the answer reached, until an answer falls short."""
    fake = await start_fienta(aiohttp_server, events={"EE": 2500})
    row = await parse(pool, upstream, job_params(fake))
    assert row["status"] == "succeeded", row["error"]
    assert row["result"]["events"] == 2503
    assert set(await saved(pool, row)) == {str(r["id"]) for r in fake.site.events["EE"]}
    assert "warnings" not in row["stats"]
    froms = [r.query.get("starts_from") for r in fake.api_requests()]
    assert len(froms) > 2
    assert froms[0] is None
    assert froms[1:] == sorted(set(froms[1:]))

    # More events on one day than an answer holds: the filter cannot get past them.
    fake = await start_fienta(aiohttp_server, events={"EE": 2100}, days=2)
    row = await parse(pool, upstream, job_params(fake))
    assert row["status"] == "succeeded", row["error"]
    assert row["result"]["events"] == 1000
    assert "could not get past it" in row["stats"]["warnings"][0]


# -- time zones --------------------------------------------------------------------


@pytest.mark.parametrize("local_zone", ["America/New_York", "Asia/Tokyo"])
async def test_local_times_are_read_in_the_configured_zone_across_dst_changes(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer, local_zone: str
) -> None:
    """Fienta's starts_at has no offset; the zone is the job's (per country), never the
    server's. Europe/Tallinn goes to summer time on 2025-03-30 at 03:00 and back on
    2025-10-26 at 04:00; Europe/Madrid an hour earlier in local terms, at 02:00/03:00."""
    fake = await start_fienta(
        aiohttp_server, first_day=date(2025, 3, 27), days=214, events={"EE": 4, "ES": 4}
    )
    params = job_params(fake, countries=["EE", "ES"], timezones={"ES": "Europe/Madrid"})
    with server_zone(local_zone):
        row = await parse(pool, upstream, params)
    assert row["status"] == "succeeded", row["error"]
    events = await saved(pool, row)

    def at(country: str, local: str) -> tuple[str | None, str | None, str | None]:
        """(starts_at, ends_at, timezone) of the event of `country` starting at `local`."""
        raw = next(r for r in fake.site.events[country] if r["starts_at"] == local)
        event = events[str(raw["id"])]
        return event["starts_at"], event["ends_at"], event["timezone"]

    tallinn, madrid = "Europe/Tallinn", "Europe/Madrid"
    assert at("EE", "2025-03-29 19:00:00")[::2] == ("2025-03-29T17:00:00Z", tallinn)  # +02
    assert at("EE", "2025-03-30 19:00:00")[::2] == ("2025-03-30T16:00:00Z", tallinn)  # +03
    assert at("EE", "2025-10-25 19:00:00")[::2] == ("2025-10-25T16:00:00Z", tallinn)  # +03
    assert at("EE", "2025-10-26 19:00:00")[::2] == ("2025-10-26T17:00:00Z", tallinn)  # +02
    assert at("ES", "2025-03-29 19:00:00")[::2] == ("2025-03-29T18:00:00Z", madrid)  # +01
    assert at("ES", "2025-03-30 19:00:00")[::2] == ("2025-03-30T17:00:00Z", madrid)  # +02
    # A time the change skips keeps the offset before it (fold=0): 03:30 +02 = 04:30 +03.
    assert at("EE", "2025-03-30 03:30:00")[0] == "2025-03-30T01:30:00Z"
    assert at("ES", "2025-03-30 02:30:00")[0] == "2025-03-30T01:30:00Z"
    # A time the change repeats is its first occurrence (summer time).
    assert at("EE", "2025-10-26 03:30:00")[0] == "2025-10-26T00:30:00Z"
    # ends_at likewise, when given.
    raw = next(r for r in fake.site.events["EE"] if r["starts_at"] == "2025-03-30 19:00:00")
    hours = int(raw["ends_at"][11:13]) - 19 if raw["ends_at"] else None
    expected_end = f"2025-03-30T{16 + hours}:00:00Z" if hours is not None else None
    assert at("EE", "2025-03-30 19:00:00")[1] == expected_end


def test_the_zone_is_configuration_checked_at_load() -> None:
    job = FientaJob()

    def check(**params: Any) -> None:
        job.check(JobSpec(name="f", kind=KIND, schedule=None, params=params))

    with pytest.raises(ValueError, match="'timezone' is required"):
        check(countries=["EE"])
    with pytest.raises(ValueError, match="'timezone': unknown time zone 'Europe/Talinn'"):
        check(timezone="Europe/Talinn")
    with pytest.raises(ValueError, match=r"'timezones\.LV': unknown time zone 'Riga'"):
        check(timezone="Europe/Tallinn", timezones={"LV": "Riga"})
    with pytest.raises(ValueError, match=r"'meta\.dates\.from'"):
        check(timezone="UTC", meta={"dates": {"from": "2025-03-30T10:00:00"}})
    check(timezone="Europe/Tallinn", timezones={"LV": "Europe/Riga"}, countries=["EE", "LV"])


# -- the rate limit and robots.txt ---------------------------------------------------


async def test_a_429_is_waited_out_for_its_retry_after(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    """The documented 429 carries `retry_after` in its body only; the fake refuses every
    request until it has passed, so retrying any sooner would fail the run."""
    fake = await start_fienta(aiohttp_server)
    fake.site.faults.rate_limited_next = 1
    fake.site.faults.retry_after = 3

    row = await parse(pool, upstream, job_params(fake))

    assert row["status"] == "succeeded", row["error"]
    assert row["result"]["events"] == 43
    calls = fake.api_requests()
    assert [r.status for r in calls] == [429, 200]
    assert calls[1].at - calls[0].at >= 2.9


async def test_the_fake_answers_its_rate_limit_with_the_documented_429(
    aiohttp_server: AiohttpServer,
) -> None:
    fake = await start_fienta(aiohttp_server, rate=2, period=60.0)
    url = fake.base_url + "/public/events"
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.get(url) as ok:
                assert ok.status == 200
                body = await ok.json()
                assert body["success"]["code"] == 200
                assert isinstance(body["events"], list)
        async with session.get(url) as refused:
            assert refused.status == 429
            assert "Retry-After" not in refused.headers
            body = await refused.json()
    assert body["errors"][0]["internal_message"] == "too_many_requests"
    assert isinstance(body["retry_after"], int)
    assert 1 <= body["retry_after"] <= 60


ME_ONLY = "User-agent: sync-worker\nDisallow: /api/\n"
OTHERS = "User-agent: otherbot\nDisallow: /\n\nUser-agent: *\nDisallow: /admin/\n"


@pytest.mark.parametrize(
    ("robots_txt", "respect", "refused"),
    [
        (ME_ONLY, True, True),
        (ME_ONLY, False, False),
        (OTHERS, True, False),
        (None, True, False),
    ],
    ids=["disallowed", "respect_robots-off", "other-agents-only", "404"],
)
async def test_robots_txt(
    pool: db.Pool,
    upstream: Upstream,
    aiohttp_server: AiohttpServer,
    robots_txt: str | None,
    respect: bool,
    refused: bool,
) -> None:
    fake = await start_fienta(aiohttp_server, robots_txt=robots_txt)
    row = await parse(pool, upstream, job_params(fake, respect_robots=respect))
    if refused:
        assert row["status"] == "failed"
        assert row["error"] == (
            f"Disallowed: robots.txt at {fake.base_url.removesuffix('/api/v1')}/robots.txt"
            " disallows /api/v1/public/events for 'sync-worker': the run stops here without"
            " reading it. Set respect_robots = false only if the site has given you permission"
        )
        assert fake.api_requests() == []
        assert await run_items.read(pool, row["id"]) == []
    else:
        assert row["status"] == "succeeded", row["error"]
        assert row["result"]["events"] == 43
        fetched = [r.path for r in fake.site.requests if r.path == "/robots.txt"]
        assert fetched == ([] if not respect else ["/robots.txt"])


@pytest.mark.parametrize(("status", "refused"), [(503, True), (403, False)])
async def test_robots_txt_that_cannot_be_read(
    pool: db.Pool,
    upstream: Upstream,
    aiohttp_server: AiohttpServer,
    status: int,
    refused: bool,
) -> None:
    """RFC 9309: a server error means unknown rules, read as everything disallowed; a
    4xx means no rules (urllib.robotparser's own read() would refuse a 403)."""
    fake = await start_fienta(aiohttp_server, robots_txt="User-agent: *\nDisallow: /\n")
    fake.site.robots_status = status
    row = await parse(pool, upstream, job_params(fake))
    if refused:
        assert row["status"] == "failed"
        assert "robots.txt at" in row["error"]
        assert "could not be read (HTTP 503 after retries)" in row["error"]
        assert fake.api_requests() == []
    else:
        assert row["status"] == "succeeded", row["error"]


# -- bad records and filters ---------------------------------------------------------


async def test_malformed_records_are_counted_and_sampled(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start_fienta(aiohttp_server)
    fake.site.faults.malformed_ids = {100005}
    fake.site.inject({"title": "no id", "starts_at": "2025-03-26 19:00:00"})
    fake.site.inject({"id": 999001, "title": "odd date", "starts_at": "26.03.2025 19:00"})

    row = await parse(pool, upstream, job_params(fake))

    assert row["status"] == "succeeded", row["error"]
    assert row["result"] == {"events": 42, "failed": 3, "batches": 5}
    assert sorted(row["stats"]["failed_sample"], key=lambda s: s["id"]) == [
        {"id": "100005", "reason": "the record has no title"},
        {
            "id": "999001",
            "reason": "starts_at '26.03.2025 19:00' is not a date-time (YYYY-MM-DD HH:MM:SS)",
        },
        {"id": "?", "reason": "the record has no id"},
    ]
    assert "100005" not in await saved(pool, row)
    assert row["progress"]["message"] == "done: processed 42 of 42 events, batch 5 of 5 (3 failed)"


async def test_meta_filters_countries_cities_categories_and_dates(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start_fienta(aiohttp_server)
    meta = {
        "countries": ["EE", {"code": "LV", "name": "Latvia"}],
        "cities": ["Tallinn", {"name": {"en": "Riga", "lv": "Rīga"}}],
        "categories": ["music", "comedy"],
        "dates": {"from": "2025-03-27", "to": "2025-03-30"},
    }
    row = await parse(pool, upstream, job_params(fake, countries=["ES"]), meta)
    assert row["status"] == "succeeded", row["error"]

    expected = {
        str(r["id"])
        for country in ("EE", "LV")
        for r in fake.site.events[country]
        if ("Tallinn" in r["address"] or "Rīga" in r["address"])
        and {"music", "comedy"} & set(r["categories"])
        and "2025-03-27" <= r["starts_at"][:10] <= "2025-03-30"
    }
    assert len(expected) >= 5
    assert set(await saved(pool, row)) == expected
    # The API filters the countries and (a day early, for any zone) the start date.
    assert [(r.query.get("country"), r.query.get("starts_from")) for r in fake.api_requests()] == [
        ("EE", "2025-03-26"),
        ("LV", "2025-03-26"),
    ]


def test_date_bounds_with_an_offset_compare_instants() -> None:
    meta = Meta.from_params({"meta": {"dates": {"from": "2025-03-30T16:30:00+00:00"}}})
    tallinn = {"timezone": "Europe/Tallinn"}
    assert not meta.keep({**tallinn, "starts_at": "2025-03-30T16:00:00Z"})
    assert meta.keep({**tallinn, "starts_at": "2025-03-30T16:30:00Z"})
    by_day = Meta.from_params({"meta": {"dates": {"to": "2025-03-30"}}})
    # 22:30 UTC on the 30th is already the 31st in Tallinn.
    assert by_day.keep({**tallinn, "starts_at": "2025-03-30T20:59:00Z"})
    assert not by_day.keep({**tallinn, "starts_at": "2025-03-30T22:30:00Z"})
    with pytest.raises(ValueError, match=r"'meta.countries\[0\]' must be a two-letter code"):
        Meta.from_params({"meta": {"countries": ["Estonia"]}})
    with pytest.raises(ValueError, match=r"'meta.cities\[1\]' must be a name"):
        Meta.from_params({"meta": {"cities": ["Tallinn", {"id": 3}]}})
