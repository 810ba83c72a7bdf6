"""`parse.kontramarka` and `parse.schema_org` against the fake Kontramarka, each run
under a real leader.

The fake (worker/sandbox/kontramarka.py) is written from the vendor notes and started
by each test: Odessa's pages carry microdata (local times, no offset), Lviv's JSON-LD
(a list, an @graph with places by @id, one block per event, by page), Dnipro's both.
What it serves is compared with what the operation saved in run_items.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pytest_aiohttp import AiohttpServer

from worker import db, run_items, runs
from worker.config import JobSpec
from worker.connectors.schema_org import read_page
from worker.connectors.schema_org_map import Defaults, Listing, map_event, walk
from worker.jobs.parse import ParseJob
from worker.jobs.parse_schema_org import KontramarkaJob, SchemaOrgJob
from worker.sandbox.kontramarka import (
    KONTRAMARKA,
    FakeEvent,
    KontramarkaConfig,
    KontramarkaSite,
    build_app,
)
from worker.upstream import Upstream

from .test_catalog_sync import final, leading, upstream

__all__ = ["upstream"]  # the fixture, imported for pytest

KYIV = ZoneInfo("Europe/Kyiv")
CITY_NAMES = {"odessa": "Odesa", "lviv": "Lviv", "dnepr": "Dnipro"}


@dataclass
class Fake:
    site: KontramarkaSite
    origin: str

    @property
    def listing_url(self) -> str:
        return self.origin + "/{city}/{language}/{category}?page={page}"

    def listing_requests(self) -> list[str]:
        return [r.path for r in self.site.requests if r.path != "/robots.txt"]


async def start(aiohttp_server: AiohttpServer, **config: Any) -> Fake:
    app = build_app(KontramarkaConfig(**config))
    server = await aiohttp_server(app)
    return Fake(app[KONTRAMARKA], str(server.make_url("")).rstrip("/"))


def kontramarka(fake: Fake, **extra: Any) -> dict[str, Any]:
    """parse.kontramarka params for the fake: its cities (the notes' four less Ivano-
    Frankivsk, which the fake does not serve) and categories."""
    return {
        "listing_url": fake.listing_url,
        "cities": list(fake.site.config.cities),
        "categories": list(fake.site.config.categories),
        "rate_limit": 0,
        **extra,
    }


@dataclass
class Operation:
    row: dict[str, Any]
    items: list[dict[str, Any]]

    @property
    def stats(self) -> dict[str, Any]:
        return dict(self.row["stats"])

    @property
    def ids(self) -> list[str]:
        return [i["external_id"] for i in self.items]

    def by_id(self) -> dict[str, dict[str, Any]]:
        return {i["external_id"]: i for i in self.items}


async def parse(
    pool: db.Pool,
    upstream: Upstream,
    params: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
    *,
    job: ParseJob | None = None,
) -> Operation:
    """One operation, queued as POST /parsing/create queues it, run by a real leader."""
    job = job or KontramarkaJob()
    kind = "parse.schema_org" if type(job) is SchemaOrgJob else "parse.kontramarka"
    spec = JobSpec(name="events", kind=kind, schedule=None, params=dict(params))
    job.check(spec)
    async with leading(pool, upstream, {kind: job}, [spec]):
        op = await runs.enqueue(
            pool, job="events", kind=kind, params={**params, "meta": dict(meta or {})}
        )
        row = await final(pool, op)
    return Operation(row, await run_items.read(pool, op))


def ident(event: FakeEvent) -> str:
    """The id parse.kontramarka gives: the event URL's `<slug>-<id>`."""
    return event.path.removeprefix("/uk/").removesuffix(".html")


def ids(events: list[FakeEvent]) -> list[str]:
    return [ident(e) for e in events]


def utc(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- extraction and the normalised event ------------------------------------------------


async def test_json_ld_and_microdata_events_are_extracted_and_normalised(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start(aiohttp_server)
    op = await parse(pool, upstream, kontramarka(fake, contact="ops@example.com"))

    assert op.row["status"] == "succeeded", op.row["error"]
    served = fake.site.events()
    assert op.ids == ids(served)  # every event once, listing by listing, in page order
    dnepr = len(fake.site.events("dnepr"))
    assert op.stats["duplicates"] == dnepr  # Dnipro's pages carry each event twice
    assert (op.stats["failed"], op.stats["warnings"]) == (0, [])
    n = len(served)
    assert op.row["progress"]["message"] == (
        f"done: processed {n} of {n} events, batch {-(-n // 10)} of {-(-n // 10)} (0 failed)"
    )

    items, origin = op.by_id(), fake.origin
    for event in served:
        item = items[ident(event)]
        assert item["source"] == "kontramarka"
        assert item["title"] == event.title
        assert item["starts_at"] == utc(event.starts)
        assert item["timezone"] == "Europe/Kyiv"
        assert item["venue"] == event.venue
        assert item["country"] == "UA"
        assert item["url"] == origin + event.path
        assert item["image"] == f"{origin}/img/{event.id}.jpg"
        assert (item["price_min"], item["price_max"], item["currency"]) == (
            event.price_min,
            event.price_max,
            "UAH",
        )
        category = {"theatre": "Theatre", "concert": "Concerts", "standUp": "Stand-up"}
        assert item["category"] == category[event.category]
        if event.city == "odessa":  # microdata: what the cards and the listing give
            assert item["raw"]["@type"] in ("TheaterEvent", "MusicEvent", "ComedyEvent")
            assert item["city"] == "Odesa"  # the listing's: the markup names no city
            assert item["address"] == "вул. Чайковського, 1"
            assert (item["ends_at"], item["sale_status"]) == (None, None)
        else:  # JSON-LD (Dnipro: found before the same event's microdata)
            assert item["city"] == {"lviv": "Львів", "dnepr": "Дніпро"}[event.city]
            assert item["address"].endswith(item["city"])
            assert item["ends_at"] is not None
            assert item["sale_status"] == ("sold_out" if event.sold_out else "on_sale")
            assert item["event_status"] == "scheduled"

    # Every fifth Lviv event has no @type: read as an event ("startDate+url", the notes).
    untyped = [e for e in fake.site.events("lviv") if e.untyped]
    assert untyped
    assert all("@type" not in items[ident(e)]["raw"] for e in untyped)
    assert len({r.user_agent for r in fake.site.requests}) == 1
    assert fake.site.requests[0].user_agent.startswith("sync-worker/")
    assert fake.site.requests[0].user_agent.endswith("(+ops@example.com)")
    assert [r.path for r in fake.site.requests].count("/robots.txt") == 1


async def test_an_at_graph_with_places_by_reference_is_read(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    """Lviv's page 2 is one @graph whose events point at their places by @id."""
    fake = await start(aiohttp_server, cities={"lviv": "json-ld"}, categories=("concert",))
    op = await parse(pool, upstream, kontramarka(fake))

    assert op.row["status"] == "succeeded", op.row["error"]
    second = fake.site.page("lviv", "concert", 2)
    assert second
    items = op.by_id()
    for event in second:
        item = items[ident(event)]
        assert set(item["raw"]["location"]) == {"@id"}  # a reference in the markup
        assert item["venue"] == event.venue
        assert item["address"] == "просп. Свободи, 28, 79000 Львів"
    assert op.ids == ids(fake.site.events())


async def test_a_broken_json_ld_block_fails_its_events_not_the_page_or_the_run(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start(aiohttp_server, cities={"lviv": "json-ld"}, categories=("theatre",))
    served = fake.site.events()
    broken = served[3]
    fake.site.faults.broken_blocks = {broken.id}
    op = await parse(pool, upstream, kontramarka(fake))

    assert op.row["status"] == "succeeded", op.row["error"]
    assert op.ids == [ident(e) for e in served if e is not broken]
    assert op.stats["failed"] == 1
    [sample] = op.stats["failed_sample"]
    assert sample["id"] == "?"
    assert re.fullmatch(
        r"http://.+/lviv/uk/theatre\?page=1: JSON-LD block 2 of 2 is not valid JSON \(.+\)",
        sample["reason"],
    ), sample["reason"]


async def test_events_that_cannot_be_read_are_counted_and_sampled(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start(aiohttp_server, categories=("theatre",))
    odessa, lviv = fake.site.events("odessa"), fake.site.events("lviv")
    fake.site.faults.malformed = {
        odessa[1].id: "no_start",
        odessa[2].id: "bad_date",
        lviv[0].id: "no_name",
    }
    op = await parse(pool, upstream, kontramarka(fake))

    assert op.row["status"] == "succeeded", op.row["error"]
    left_out = {ident(odessa[1]), ident(odessa[2]), ident(lviv[0])}
    assert op.ids == [i for i in ids(fake.site.events()) if i not in left_out]
    reasons = [(s["id"], s["reason"]) for s in op.stats["failed_sample"]]
    # Each with the id it would have had; Odessa's are microdata, Lviv's JSON-LD.
    assert [(i, r.split(": ", 1)[1]) for i, r in reasons] == [
        (ident(odessa[1]), "no startDate"),
        (ident(odessa[2]), "startDate 'завтра ввечері' is not an ISO 8601 date or date-time"),
        (ident(lviv[0]), "no name"),
    ]
    assert reasons[0][1].startswith("microdata on http://")
    assert reasons[2][1].startswith("JSON-LD block 1 of 1 on http://")
    assert op.row["progress"]["message"].endswith("(3 failed)")


# -- time ------------------------------------------------------------------------------


async def test_a_time_without_offset_is_read_in_the_configured_zone(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    """Odessa's microdata gives local times without an offset, across both 2026 DST
    changes: each is the instant of that wall time in Europe/Kyiv (the default), or
    in whatever zone the job configures."""
    fake = await start(aiohttp_server, cities={"odessa": "microdata"})
    op = await parse(pool, upstream, kontramarka(fake))

    assert op.row["status"] == "succeeded", op.row["error"]
    offsets = set()
    for event, item in zip(fake.site.events(), op.items, strict=True):
        wall = datetime.fromisoformat(item["raw"]["startDate"])
        assert wall.tzinfo is None
        assert item["starts_at"] == utc(wall.replace(tzinfo=KYIV)) == utc(event.starts)
        assert item["timezone"] == "Europe/Kyiv"
        offsets.add(wall.replace(tzinfo=KYIV).utcoffset())
    assert len(offsets) == 2  # winter and summer time

    op = await parse(pool, upstream, kontramarka(fake, timezone="America/New_York"))
    first = fake.site.events()[0]
    wall = first.starts.replace(tzinfo=None)
    assert op.items[0]["starts_at"] == utc(wall.replace(tzinfo=ZoneInfo("America/New_York")))
    assert op.items[0]["timezone"] == "America/New_York"


def test_offsets_zones_and_bare_dates() -> None:
    defaults = Defaults(source="s", zone=KYIV)
    listing = Listing(url="https://x.example/events")

    def mapped(**node: Any) -> dict[str, Any]:
        found = walk([{"@type": "Event", "name": "A", **node}], where="t")[0]
        event, _ = map_event(
            found, page_url=listing.url, listing=listing, fill={}, defaults=defaults
        )
        return event

    summer = mapped(startDate="2026-07-01T19:00:00+03:00")
    assert (summer["starts_at"], summer["timezone"]) == ("2026-07-01T16:00:00Z", "Europe/Kyiv")
    elsewhere = mapped(startDate="2026-07-01T19:00:00+02:00")  # not Kyiv's offset then
    assert (elsewhere["starts_at"], elsewhere["timezone"]) == ("2026-07-01T17:00:00Z", "+02:00")
    day = mapped(startDate="2026-07-01", endDate="2026-07-03")
    assert (day["starts_at"], day["ends_at"]) == ("2026-06-30T21:00:00Z", "2026-07-03T21:00:00Z")
    # 03:30 on 2026-03-29 does not exist in Kyiv (03:00 -> 04:00): fold=0 keeps +02:00.
    assert mapped(startDate="2026-03-29T03:30")["starts_at"] == "2026-03-29T01:30:00Z"


# -- paging ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("past_end", "asked", "status_404"),
    [("empty", 4, []), ("repeat_last", 4, []), ("first", 4, []), ("404", 3, [4])],
)
async def test_paging_stops_on_an_empty_repeated_or_missing_page(
    pool: db.Pool,
    upstream: Upstream,
    aiohttp_server: AiohttpServer,
    past_end: Any,
    asked: int,
    status_404: list[int],
) -> None:
    """23 events, 10 a page: three pages, then whatever the site serves past the end."""
    fake = await start(aiohttp_server, cities={"lviv": "json-ld"}, categories=("concert",))
    fake.site.faults.past_end = past_end
    op = await parse(pool, upstream, kontramarka(fake))

    assert op.row["status"] == "succeeded", op.row["error"]
    assert op.ids == ids(fake.site.events())
    assert [p for _, p in fake.site.pages_asked()] == list(range(1, asked + 1))
    assert [p for _, p in fake.site.pages_asked(404)] == status_404
    assert op.stats["duplicates"] == 0
    assert op.stats["warnings"] == []


async def test_the_page_cap_is_a_warning_not_an_error(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start(aiohttp_server, cities={"odessa": "microdata"}, categories=("concert",))
    op = await parse(pool, upstream, kontramarka(fake, max_pages=2))

    assert op.row["status"] == "succeeded", op.row["error"]
    assert op.ids == ids(fake.site.events())[:20]
    assert [p for _, p in fake.site.pages_asked()] == [1, 2]
    host = fake.origin.removeprefix("http://")
    assert op.stats["warnings"] == [
        f"{host}/odessa/uk/concert: stopped at max_pages=2; more events may remain: raise max_pages"
    ]


async def test_a_listing_that_does_not_exist_is_a_warning_unless_none_does(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start(aiohttp_server, cities={"odessa": "microdata"}, categories=("concert",))
    op = await parse(pool, upstream, kontramarka(fake, categories=["concert", "circus"]))

    assert op.row["status"] == "succeeded", op.row["error"]
    assert op.ids == ids(fake.site.events())
    host = fake.origin.removeprefix("http://")
    assert op.stats["warnings"] == [
        f"{host}/odessa/uk/circus page 1: HTTP 404, the listing is skipped"
    ]

    op = await parse(pool, upstream, kontramarka(fake, categories=["circus"]))
    assert op.row["status"] == "failed"
    assert "none of the 1 listings could be read" in op.row["error"]


# -- selectors and the generic kind ----------------------------------------------------


async def test_selectors_from_configuration_fill_what_the_markup_lacks(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    """Odessa's microdata has no name, no price and no city: parse.schema_org reading
    it without selectors finds events it cannot name; with them, everything."""
    fake = await start(aiohttp_server, cities={"odessa": "microdata"}, categories=("theatre",))
    listing = fake.origin + "/odessa/uk/theatre?page={page}"
    bare = {"url_pattern": listing, "timezone": "Europe/Kyiv", "rate_limit": 0}
    op = await parse(pool, upstream, bare, job=SchemaOrgJob())

    assert op.row["status"] == "succeeded", op.row["error"]
    served = fake.site.events()
    assert op.items == []
    assert op.stats["failed"] == len(served)
    assert {s["reason"].rsplit(": ", 1)[1] for s in op.stats["failed_sample"]} == {"no name"}

    selectors = {
        "card": ".cat_item",
        "title": ".block-info__title span",
        "price": {"xpath": ".//div[@class='block-info__price']"},
        "city": {"css": "h1.city-title", "scope": "page"},
    }
    op = await parse(
        pool, upstream, {**bare, "selectors": selectors, "currency": "UAH"}, job=SchemaOrgJob()
    )
    assert op.row["status"] == "succeeded", op.row["error"]
    assert op.ids == [fake.origin + e.path for e in served]  # no id_pattern: the URL
    for event, item in zip(served, op.items, strict=True):
        assert item["source"] == "127.0.0.1"
        assert item["title"] == event.title
        assert item["city"] == "Одеса"
        assert (item["price_min"], item["price_max"], item["currency"]) == (
            event.price_min,
            event.price_max,
            "UAH",
        )
        assert item["categories"] == ["TheaterEvent"]


async def test_listings_carry_what_their_events_share(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    """parse.schema_org with `urls` tables: a listing's city and category go to its
    events; meta.cities picks the listings; the markup's own city still wins."""
    fake = await start(aiohttp_server, categories=("concert",))
    urls = [
        {"url": fake.origin + f"/{c}/uk/concert?page={{page}}", "city": CITY_NAMES[c]}
        | {"category": "Live", "country": "ua"}
        for c in ("odessa", "lviv")
    ]
    params = {
        "urls": urls,
        "timezone": "Europe/Kyiv",
        "rate_limit": 0,
        "selectors": {"card": ".cat_item", "title": ".block-info__title span"},
    }
    op = await parse(pool, upstream, params, {"cities": ["Lviv"]}, job=SchemaOrgJob())

    assert op.row["status"] == "succeeded", op.row["error"]
    # Without `untyped` (parse.kontramarka's default), a JSON-LD object with no @type
    # is no event.
    lviv = fake.site.events("lviv")
    assert op.ids == [fake.origin + e.path for e in lviv if not e.untyped]
    assert any(e.untyped for e in lviv)
    assert {i["city"] for i in op.items} == {"Львів"}
    assert {i["category"] for i in op.items} == {"Live"}
    assert {p.split("/")[1] for p in fake.listing_requests()} == {"lviv"}


# -- politeness ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "robots",
    ["User-agent: *\nDisallow: /lviv/\n", "User-agent: sync-worker\nDisallow: /\n"],
    ids=["one-city", "us"],
)
async def test_a_robots_refusal_fails_the_run_before_any_listing_is_read(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer, robots: str
) -> None:
    fake = await start(aiohttp_server, robots_txt=robots)
    op = await parse(pool, upstream, kontramarka(fake))

    assert op.row["status"] == "failed"
    assert re.match(
        r"Disallowed: robots.txt at http://[^ ]+/robots.txt disallows /(lviv|odessa)/uk/\w+"
        r" for 'sync-worker'",
        op.row["error"],
    ), op.row["error"]
    assert fake.listing_requests() == []
    assert op.items == []


async def test_robots_404_allows_and_respect_robots_false_skips_it(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    missing = await start(aiohttp_server, robots_txt=None, cities={"lviv": "json-ld"})
    op = await parse(pool, upstream, kontramarka(missing))
    assert op.row["status"] == "succeeded", op.row["error"]
    assert op.ids == ids(missing.site.events())

    closed = await start(aiohttp_server, robots_txt="User-agent: *\nDisallow: /\n")
    op = await parse(pool, upstream, kontramarka(closed, respect_robots=False))
    assert op.row["status"] == "succeeded", op.row["error"]
    assert "/robots.txt" not in [r.path for r in closed.site.requests]


async def test_a_429_is_retried_after_retry_after_and_the_run_completes(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start(aiohttp_server, cities={"lviv": "json-ld"}, categories=("concert",))
    fake.site.faults.rate_limited_next = 2  # Retry-After: 1
    op = await parse(pool, upstream, kontramarka(fake))

    assert op.row["status"] == "succeeded", op.row["error"]
    assert op.ids == ids(fake.site.events())
    asked = [r for r in fake.site.requests if r.path != "/robots.txt"]
    assert [r.status for r in asked[:3]] == [429, 429, 200]
    assert asked[1].at - asked[0].at >= 0.95
    assert asked[2].at - asked[1].at >= 0.95


async def test_a_429_that_outlasts_the_retries_or_a_403_fails_the_run_clearly(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start(aiohttp_server, cities={"lviv": "json-ld"}, categories=("concert",))
    fake.site.faults.rate_limited_next = 10
    fake.site.faults.retry_after = "0"
    op = await parse(pool, upstream, kontramarka(fake))
    assert op.row["status"] == "failed"
    assert "/lviv/uk/concert page 1: still rate limited (429) after the retries" in op.row["error"]

    fake.site.faults.rate_limited_next = 0
    fake.site.faults.blocked = True
    op = await parse(pool, upstream, kontramarka(fake))
    assert op.row["status"] == "failed"
    assert "/lviv/uk/concert page 1: the site answered 403" in op.row["error"]


# -- meta ------------------------------------------------------------------------------


async def test_meta_cities_choose_the_city_listings(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start(aiohttp_server)
    meta = {"cities": [{"_id": "c1", "name": {"en": "Lviv", "uk": "Львів"}}, "Одеса", "Kyiv"]}
    op = await parse(pool, upstream, kontramarka(fake), meta)

    assert op.row["status"] == "succeeded", op.row["error"]
    wanted = fake.site.events("odessa") + fake.site.events("lviv")
    assert op.ids == ids(wanted)
    assert {p.split("/")[1] for p in fake.listing_requests()} == {"odessa", "lviv"}
    assert op.stats["warnings"] == ["meta.cities: no listing here for Kyiv"]


async def test_meta_categories_and_dates_are_filtered_locally(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start(aiohttp_server)
    meta = {
        "categories": [{"name": {"en": "Concert", "uk": "Концерти"}}, "stand-up"],
        "dates": {"from": "2026-05-01", "to": "2026-08-31"},
    }
    op = await parse(pool, upstream, kontramarka(fake), meta)

    assert op.row["status"] == "succeeded", op.row["error"]
    wanted = [
        e
        for e in fake.site.events()
        if e.category in ("concert", "standUp")
        and date(2026, 5, 1) <= e.starts.date() <= date(2026, 8, 31)
    ]
    assert wanted
    assert op.ids == ids(wanted)
    assert {p.split("/")[3] for p in fake.listing_requests()} == {"theatre", "concert", "standUp"}
    assert op.stats["filtered"] == len(fake.site.events()) - len(wanted)


async def test_meta_dates_with_offsets_bound_the_start_instant(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start(aiohttp_server, cities={"odessa": "microdata"})
    meta = {"dates": {"from": "2026-05-01T16:00:00Z", "to": "2026-06-01T00:00:00+03:00"}}
    op = await parse(pool, upstream, kontramarka(fake), meta)

    assert op.row["status"] == "succeeded", op.row["error"]
    first, last = datetime(2026, 5, 1, 16, tzinfo=UTC), datetime(2026, 5, 31, 21, tzinfo=UTC)
    wanted = [e for e in fake.site.events() if first <= e.starts <= last]
    assert wanted
    assert op.ids == ids(wanted)


async def test_meta_countries_elsewhere_read_nothing(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start(aiohttp_server)
    op = await parse(pool, upstream, kontramarka(fake), {"countries": ["EE"]})

    assert op.row["status"] == "succeeded", op.row["error"]
    assert op.items == []
    assert fake.site.requests == []
    assert op.stats["warnings"] == ["nothing to read: no listing matches meta"]


# -- params ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"listing_url": "ftp://{city}.x/{page}"}, "listing_url"),
        ({"listing_url": "https://kontramarka.ua/{page}"}, "listing_url"),
        ({"urls": ["https://x.example/"]}, "urls"),
        ({"cities": "lviv"}, "cities"),
        ({"cities": {"kyiv": []}}, r"cities\.kyiv"),
        ({"language": "ukr"}, "language"),
        ({"timezone": "Europe/Atlantis"}, "timezone"),
        ({"country": "Ukraine"}, "country"),
        ({"currency": "грн"}, "currency"),
        ({"id_pattern": "no group"}, "id_pattern"),
        ({"id_pattern": "("}, "id_pattern"),
        ({"max_pages": 0}, "max_pages"),
        ({"rate_limit": -1}, "rate_limit"),
        ({"user_agent": "evil\r\nX-Injected: 1"}, "user_agent"),
        ({"respect_robots": "no"}, "respect_robots"),
        ({"selectors": {"city": {"css": "h1 >>"}}}, r"selectors\.city"),
        ({"selectors": {"city": {"xpath": "//*["}}}, r"selectors\.city"),
        ({"selectors": {"colour": ".c"}}, r"selectors\.colour"),
        ({"selectors": {"card": {"css": ".c", "scope": "page"}}}, r"selectors\.card"),
        ({"read_timeout": 0}, "read_timeout"),
        ({"meta": {"dates": {"from": "tomorrow"}}}, r"meta\.dates\.from"),
    ],
)
def test_bad_kontramarka_params_are_refused_naming_the_param(
    params: dict[str, Any], named: str
) -> None:
    spec = JobSpec(name="k", kind="parse.kontramarka", schedule=None, params=params)
    with pytest.raises(ValueError, match=named):
        KontramarkaJob().check(spec)


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"timezone": "UTC"}, "urls"),
        ({"urls": ["https://x.example/"]}, "timezone"),
        ({"urls": ["https://x.example/{page}/{page}"], "timezone": "UTC"}, r"urls\[0\]"),
        ({"urls": [{"url": "https://x/", "town": "A"}], "timezone": "UTC"}, r"urls\[0\]"),
        ({"url_pattern": "https://x.example/", "timezone": "UTC"}, "url_pattern"),
    ],
)
def test_bad_schema_org_params_are_refused_naming_the_param(
    params: dict[str, Any], named: str
) -> None:
    spec = JobSpec(name="s", kind="parse.schema_org", schedule=None, params=params)
    with pytest.raises(ValueError, match=named):
        SchemaOrgJob().check(spec)


def test_kontramarka_defaults_follow_the_notes() -> None:
    settings = KontramarkaJob().settings({})
    urls = [listing.url for listing in settings.listings]
    assert "https://odessa.kontramarka.ua/uk/theatre?page={page}" in urls
    assert "https://lviv.kontramarka.ua/uk/standUp?page={page}" in urls
    assert len(urls) == 4 * 5  # odessa, lviv, dnepr, if x theatre, concert, circus, clubs, standUp
    assert settings.defaults.zone.key == "Europe/Kyiv"
    assert (settings.defaults.country, settings.defaults.currency) == ("UA", "UAH")
    assert settings.group == "kontramarka:kontramarka.ua"  # one pace for every subdomain
    assert settings.selectors.card is not None
    assert settings.selectors.card.expression == ".cat_item"


# -- extraction, unit ------------------------------------------------------------------


def test_events_are_found_wherever_the_markup_puts_them() -> None:
    body = b"""<html><head>
    <script type="application/ld+json">{"@context": "https://schema.org", "@type": "ItemList",
      "itemListElement": [{"@type": "ListItem", "item": {"@type": "schema:DanceEvent",
      "name": "In a list", "startDate": "2026-05-01T19:00:00+03:00", "@id": "urn:e:1"}}]}</script>
    <script type="application/ld+json">{"@type": "EventSeries", "name": "Tour", "subEvent": [
      {"@type": "MusicEvent", "name": "Leg &amp; one", "startDate": "2026-05-02T19:00:00Z",
       "location": {"@type": "VirtualLocation", "url": "https://stream"}},
      {"@type": "MusicEvent", "name": {"@value": "Leg two"}, "startDate": "2026-05-03T19:00Z",
       "location": [{"@type": "VirtualLocation"}, {"@type": "Place", "name": "Hall",
         "geo": {"latitude": "50.45", "longitude": 30.52}}],
       "offers": [{"price": "300.00", "priceCurrency": "uah", "availability": "SoldOut"},
                  {"price": 20, "priceCurrency": "EUR", "availability": "InStock"}]}]}</script>
    <script type="application/ld+json">{"@type": "Organization", "name": "not an event"}</script>
    </head><body>
    <div itemscope itemtype="https://schema.org/Event" itemid="https://x.example/e/7">
      <span itemprop="name">Microdata</span>
      <time itemprop="startDate" datetime="2026-05-04">4</time>
      <div itemprop="location" itemscope itemtype="https://schema.org/Place">
        <span itemprop="name">Club</span>
        <div itemprop="address" itemscope itemtype="https://schema.org/PostalAddress">
          <span itemprop="addressLocality">Kyiv</span><span itemprop="addressCountry">UA</span>
        </div></div>
      <link itemprop="eventStatus" href="https://schema.org/EventPostponed"></div>
    </body></html>"""
    page = read_page(body, "https://x.example/list?page=1")
    assert page.broken == []
    defaults = Defaults(source="x", zone=KYIV)
    listing = Listing(url="https://x.example/list?page={page}")
    events = [
        map_event(f, page_url=page.url, listing=listing, fill={}, defaults=defaults)[0]
        for f in page.found
    ]
    assert [e["title"] for e in events] == ["In a list", "Leg & one", "Leg two", "Microdata"]
    listed, one, two, micro = events
    assert listed["external_id"] == "urn:e:1"
    assert listed["categories"] == ["DanceEvent"]
    assert one["external_id"].startswith("sha256:")  # no @id, no url: a hash
    assert one["venue"] is None
    assert (two["venue"], two["latitude"], two["longitude"]) == ("Hall", 50.45, 30.52)
    assert (two["price_min"], two["price_max"], two["currency"]) == (300.0, 300.0, "UAH")
    assert two["sale_status"] == "on_sale"  # one offer on sale is enough
    assert micro["external_id"] == "https://x.example/e/7"
    assert (micro["city"], micro["country"], micro["event_status"]) == ("Kyiv", "UA", "postponed")
    assert micro["starts_at"] == "2026-05-03T21:00:00Z"  # a bare date: local midnight
    assert "htmlNode" not in str(micro["raw"])
