"""`parse.eventim` against the fake Eventim endpoint, each run under a real leader.

The fake (worker/sandbox/eventim.py) is written from the vendor notes and started by
each test; what it serves is compared with what the operation saved in run_items.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pytest_aiohttp import AiohttpServer

from worker import db, run_items, runs
from worker.config import JobSpec
from worker.connectors.eventim import SITES as SITES_KNOWN
from worker.connectors.eventim import map_product
from worker.jobs.parse_eventim import EventimJob
from worker.sandbox.eventim import BASE_PATH, EVENTIM, SITES, EventimConfig, EventimSite, build_app
from worker.upstream import Upstream

from .test_catalog_sync import final, leading, upstream

__all__ = ["upstream"]  # the fixture, imported for pytest

KIND = "parse.eventim"
DE, AT, FI = "web__eventim-de", "web__oeticket-at", "web__lippu-fi"


@dataclass
class Fake:
    site: EventimSite
    base_url: str

    def products(self, web_id: str = DE) -> list[dict[str, Any]]:
        """What the site holds, in the order a DateAsc search serves it."""
        return self.site.select(web_id, {})

    def product_requests(self) -> list[dict[str, str]]:
        return [r.query for r in self.site.requests if r.path.endswith("/products")]


async def start(aiohttp_server: AiohttpServer, **config: Any) -> Fake:
    app = build_app(EventimConfig(**config))
    server = await aiohttp_server(app)
    return Fake(app[EVENTIM], str(server.make_url(BASE_PATH)))


def params_for(fake: Fake, **extra: Any) -> dict[str, Any]:
    return {"base_url": fake.base_url, "rate_limit": 0, "page_size": 20, **extra}


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


async def parse(
    pool: db.Pool,
    upstream: Upstream,
    params: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
) -> Operation:
    """One operation, queued as POST /parsing/create queues it, run by a real leader."""
    job = EventimJob()
    spec = JobSpec(name="eventim", kind=KIND, schedule=None, params=dict(params))
    job.check(spec)
    async with leading(pool, upstream, {KIND: job}, [spec]):
        op = await runs.enqueue(
            pool, job="eventim", kind=KIND, params={**params, "meta": dict(meta or {})}
        )
        row = await final(pool, op)
    return Operation(row, await run_items.read(pool, op))


def ids(products: list[Any]) -> list[str]:
    return [p["productId"] for p in products]


def category_names(product: Mapping[str, Any]) -> set[str]:
    """A product's categories and their parents."""
    found = {c["name"] for c in product["categories"]}
    return found | {
        c["parentCategory"]["name"] for c in product["categories"] if "parentCategory" in c
    }


def starts_of(product: Mapping[str, Any]) -> datetime:
    return datetime.fromisoformat(product["typeAttributes"]["liveEntertainment"]["startDate"])


def local_day(product: Mapping[str, Any]) -> date:
    return date.fromisoformat(product["typeAttributes"]["liveEntertainment"]["startDate"][:10])


# -- saving, paging ---------------------------------------------------------------------


async def test_events_land_in_run_items_in_batches_with_progress(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start(aiohttp_server)
    op = await parse(pool, upstream, params_for(fake, contact="ops@example.com"))

    assert op.row["status"] == "succeeded", op.row["error"]
    products = fake.products()
    assert op.ids == ids(products)  # all 95, in the site's order
    batches = await pool.fetch(
        "SELECT batch, count(*) AS n FROM run_items WHERE operation_id = $1 GROUP BY batch"
        " ORDER BY batch",
        op.row["id"],
    )
    assert [b["n"] for b in batches] == [10] * 9 + [5]
    assert (
        op.row["progress"]["message"]
        == "done: processed 95 of 95 events, batch 10 of 10 (0 failed)"
    )
    assert op.stats["pages"] == 6
    assert op.stats["warnings"] == []

    first, raw = op.items[0], products[0]
    live = raw["typeAttributes"]["liveEntertainment"]
    assert first["raw"] == raw
    assert first["source"] == "eventim"
    assert first["title"] == raw["name"]
    assert first["venue"] == live["location"]["name"]
    assert first["city"] == live["location"]["city"]
    assert first["country"] == "DE"
    assert first["url"] == raw["link"]
    assert first["image"] == raw["imageUrl"]
    assert first["currency"] == "EUR"
    assert first["price_min"] == raw.get("price")
    by_status = {i["raw"]["status"]: i["sale_status"] for i in op.items}
    assert by_status == {"Available": "on_sale", "SoldOut": "sold_out", "Cancelled": "not_on_sale"}
    geo = [
        i
        for i in op.items
        if "geoLocation" in i["raw"]["typeAttributes"]["liveEntertainment"]["location"]
    ]
    assert geo
    assert all(i["latitude"] and i["longitude"] for i in geo)

    agents = {r.user_agent for r in fake.site.requests}
    assert len(agents) == 1
    assert agents.pop().startswith("sync-worker/")
    assert [r.path for r in fake.site.requests].count("/robots.txt") == 1


@pytest.mark.parametrize("shift", [0, -3, -5, 4], ids=["honest", "too-small", "zero", "too-large"])
async def test_paging_ends_on_the_first_empty_page_whatever_total_pages_says(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer, shift: int
) -> None:
    """95 products, 20 a page: five pages and an empty sixth, however wrong totalPages
    is (2 pages, 0 pages or 9): nothing lost, nothing asked past the empty page."""
    fake = await start(aiohttp_server)
    fake.site.faults.total_pages_shift = shift
    op = await parse(pool, upstream, params_for(fake))

    assert op.row["status"] == "succeeded", op.row["error"]
    assert op.ids == ids(fake.products())
    assert fake.site.pages_asked() == [1, 2, 3, 4, 5, 6]
    assert op.stats["warnings"] == []


async def test_a_page_repeated_forever_ends_the_scan_without_error(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start(aiohttp_server)
    fake.site.faults.repeat_last = True
    fake.site.faults.total_pages_shift = 100  # and totalPages promises more
    op = await parse(pool, upstream, params_for(fake))

    assert op.row["status"] == "succeeded", op.row["error"]
    assert op.ids == ids(fake.products())  # once each
    assert fake.site.pages_asked() == [1, 2, 3, 4, 5, 6]  # page 6 repeats page 5
    assert op.stats["warnings"] == []


async def test_a_site_ignoring_page_ends_at_once_with_a_warning(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    """ "The API ... silently ignores its page param" (one client): page 2 repeats page 1;
    the run keeps what it read and says that it read less than was announced."""
    fake = await start(aiohttp_server)
    fake.site.faults.ignore_page = True
    op = await parse(pool, upstream, params_for(fake))

    assert op.row["status"] == "succeeded", op.row["error"]
    assert op.ids == ids(fake.products())[:20]
    assert fake.site.pages_asked() == [1, 2]
    assert op.stats["warnings"] == [
        "web__eventim-de: the pages ended after 20 of the 95 products announced"
        " (totalResults); the site may be ignoring 'page' or capping results"
    ]


async def test_a_page_past_the_announced_end_refused_with_404_is_the_end(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start(aiohttp_server)
    fake.site.faults.past_end_status = 404
    op = await parse(pool, upstream, params_for(fake))

    assert op.row["status"] == "succeeded", op.row["error"]
    assert op.ids == ids(fake.products())
    assert fake.site.pages_asked(404) == [6]


async def test_the_page_cap_is_a_warning_not_an_error(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start(aiohttp_server)
    op = await parse(pool, upstream, params_for(fake, max_pages=2))

    assert op.row["status"] == "succeeded", op.row["error"]
    assert op.ids == ids(fake.products())[:40]
    assert fake.site.pages_asked() == [1, 2]
    assert op.stats["warnings"] == [
        "web__eventim-de: stopped at max_pages=2 (totalPages said 5); more events may"
        " remain: raise max_pages or narrow the dates"
    ]


# -- time ----------------------------------------------------------------------------


async def test_start_dates_with_offsets_are_stored_as_utc_instants(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    """Berlin and Helsinki products across both 2026 DST changes: each start is the
    instant of its local wall time in its site's zone, the offset given is kept."""
    fake = await start(aiohttp_server, products={DE: 95, FI: 40})
    op = await parse(pool, upstream, params_for(fake, web_ids=[DE, FI]))

    assert op.row["status"] == "succeeded", op.row["error"]
    assert len(op.items) == 135
    offsets: dict[str, set[str]] = {"DE": set(), "FI": set()}
    for item in op.items:
        live = item["raw"]["typeAttributes"]["liveEntertainment"]
        zone = ZoneInfo(SITES[DE if item["country"] == "DE" else FI].zone)
        wall = datetime.fromisoformat(live["startDate"][:19]).replace(tzinfo=zone)
        assert item["starts_at"] == wall.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        assert item["timezone"] == live["startDate"][19:]
        offsets[item["country"]].add(item["timezone"])
        if "endDate" in live:
            end = datetime.fromisoformat(live["endDate"]).astimezone(UTC)
            assert item["ends_at"] == end.strftime("%Y-%m-%dT%H:%M:%SZ")
        else:
            assert item["ends_at"] is None
    assert offsets == {"DE": {"+01:00", "+02:00"}, "FI": {"+02:00", "+03:00"}}
    # A start at 00:30 local is the evening before in UTC.
    late = next(
        i
        for i in op.items
        if i["raw"]["typeAttributes"]["liveEntertainment"]["startDate"][11:16] == "00:30"
    )
    assert (
        late["starts_at"][:10]
        < late["raw"]["typeAttributes"]["liveEntertainment"]["startDate"][:10]
    )


# -- failures ------------------------------------------------------------------------


async def test_a_429_is_retried_after_retry_after_and_the_run_completes(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start(aiohttp_server)
    fake.site.faults.rate_limited_next = 2  # Retry-After: 1
    op = await parse(pool, upstream, params_for(fake))

    assert op.row["status"] == "succeeded", op.row["error"]
    assert op.ids == ids(fake.products())
    asked = [r for r in fake.site.requests if r.path.endswith("/products")]
    assert [r.status for r in asked[:3]] == [429, 429, 200]
    first_429, second_429, retried = asked[:3]
    assert second_429.at - first_429.at >= 0.95  # Retry-After: 1
    assert retried.at - second_429.at >= 0.95


async def test_a_429_that_outlasts_the_retries_fails_the_run_clearly(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start(aiohttp_server)
    fake.site.faults.rate_limited_next = 10
    fake.site.faults.retry_after = "0"
    op = await parse(pool, upstream, params_for(fake))

    assert op.row["status"] == "failed"
    assert "web__eventim-de page 1: still rate limited (429) after the retries" in op.row["error"]


async def test_the_bot_protection_403_fails_the_run_saying_what_to_check(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start(aiohttp_server)
    fake.site.faults.blocked = True
    op = await parse(pool, upstream, params_for(fake))

    assert op.row["status"] == "failed"
    assert op.row["error"].startswith("JobError: web__eventim-de page 1: Eventim answered 403")
    assert "check 'user_agent' and 'web_ids'" in op.row["error"]


@pytest.mark.parametrize(
    "robots",
    [
        "User-agent: *\nDisallow: /websearch/\n",
        "User-agent: sync-worker\nDisallow: /\n\nUser-agent: *\nAllow: /\n",
    ],
    ids=["everyone", "us"],
)
async def test_a_robots_refusal_fails_the_run_before_any_search(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer, robots: str
) -> None:
    fake = await start(aiohttp_server, robots_txt=robots)
    op = await parse(pool, upstream, params_for(fake))

    assert op.row["status"] == "failed"
    assert op.row["error"].startswith("Disallowed: robots.txt at http://")
    assert (
        "disallows /websearch/search/api/exploration/v1/products for 'sync-worker'"
        in (op.row["error"])
    )
    assert fake.product_requests() == []
    assert op.items == []


async def test_robots_404_allows_and_respect_robots_false_skips_it(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    missing = await start(aiohttp_server, robots_txt=None)
    op = await parse(pool, upstream, params_for(missing))
    assert op.row["status"] == "succeeded", op.row["error"]
    assert len(op.items) == 95

    closed = await start(aiohttp_server, robots_txt="User-agent: *\nDisallow: /\n")
    op = await parse(pool, upstream, params_for(closed, respect_robots=False))
    assert op.row["status"] == "succeeded", op.row["error"]
    assert "/robots.txt" not in [r.path for r in closed.site.requests]


async def test_malformed_products_are_counted_and_sampled_and_the_run_succeeds(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start(aiohttp_server)
    all_ids = ids(fake.products())
    broken = dict(
        zip(all_ids[3:8], ["no_offset", "bad_date", "no_name", "no_id", "not_object"], strict=True)
    )
    fake.site.faults.malformed = broken
    op = await parse(pool, upstream, params_for(fake))

    assert op.row["status"] == "succeeded", op.row["error"]
    assert op.ids == [i for i in all_ids if i not in broken]
    assert op.stats["failed"] == 5
    a, b, c = all_ids[3:6]
    start_date = fake.products()[3]["typeAttributes"]["liveEntertainment"]["startDate"]
    assert op.stats["failed_sample"] == [
        {
            "id": a,
            "reason": f"startDate {start_date[:19]!r} has no UTC offset: its instant is unknown",
        },
        {"id": b, "reason": "startDate 'Freitag, 20 Uhr' is not an ISO-8601 date-time"},
        {"id": c, "reason": "no name"},
        {"id": "?", "reason": "no productId"},
        {"id": "?", "reason": "a product must be an object, got str"},
    ]
    assert op.row["progress"]["message"].endswith("(5 failed)")


# -- meta ----------------------------------------------------------------------------


async def test_meta_cities_are_one_search_each_in_the_sites_language(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start(aiohttp_server)
    meta = {
        "cities": [
            "Berlin",
            {"name": {"en": "Munich", "de": "München"}, "country": {"code": "DE"}},
            {"name": "Tallinn", "country": "EE"},  # no Estonian storefront configured
        ]
    }
    op = await parse(pool, upstream, params_for(fake), meta)

    assert op.row["status"] == "succeeded", op.row["error"]
    wanted = [
        p
        for p in fake.products()
        if p["typeAttributes"]["liveEntertainment"]["location"]["city"] in ("Berlin", "München")
    ]
    assert sorted(op.ids) == sorted(ids(wanted))
    assert {i["city"] for i in op.items} == {"Berlin", "München"}
    assert {q.get("city_names") for q in fake.product_requests()} == {"Berlin", "München"}
    assert op.stats["warnings"] == ["meta.cities: 1 in countries no storefront here reads: Tallinn"]


async def test_meta_dates_and_one_category_are_sent_and_checked_locally(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start(aiohttp_server)
    meta = {
        "dates": {"from": "2026-05-01", "to": "2026-08-31"},
        "categories": [{"name": "Konzerte"}],
    }
    op = await parse(pool, upstream, params_for(fake), meta)

    assert op.row["status"] == "succeeded", op.row["error"]
    wanted = [
        p
        for p in fake.products()
        if date(2026, 5, 1) <= local_day(p) <= date(2026, 8, 31) and "Konzerte" in category_names(p)
    ]
    assert wanted
    assert op.ids == ids(wanted)
    sent = fake.product_requests()[0]
    assert (sent["date_from"], sent["date_to"], sent["categories"]) == (
        "2026-05-01",
        "2026-08-31",
        "Konzerte",
    )


async def test_meta_dates_with_offsets_bound_the_start_instant(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    """A date-time bound is an instant: the site is sent the day around it (its own
    zone for the param is not known), the start instants are compared here."""
    fake = await start(aiohttp_server)
    meta = {"dates": {"from": "2026-05-01T19:30:00+02:00", "to": "2026-06-01T00:00:00Z"}}
    op = await parse(pool, upstream, params_for(fake), meta)

    assert op.row["status"] == "succeeded", op.row["error"]
    first = datetime(2026, 5, 1, 17, 30, tzinfo=UTC)
    last = datetime(2026, 6, 1, tzinfo=UTC)
    wanted = [p for p in fake.products() if first <= starts_of(p) <= last]
    assert wanted
    assert op.ids == ids(wanted)
    sent = fake.product_requests()[0]
    assert (sent["date_from"], sent["date_to"]) == ("2026-04-30", "2026-06-02")
    assert op.stats["filtered"] > 0  # the widened days brought some outside the bounds


async def test_several_categories_are_filtered_locally_only(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    """How the site joins several categories is unverified: none is sent; a category
    matches a product's own or its parent."""
    fake = await start(aiohttp_server)
    op = await parse(pool, upstream, params_for(fake), {"categories": ["comedy", "Kultur"]})

    assert op.row["status"] == "succeeded", op.row["error"]
    wanted = [p for p in fake.products() if category_names(p) & {"Comedy", "Kultur"}]
    assert wanted
    # Some name Kultur only as the parent of their one category.
    assert any("Kultur" not in {c["name"] for c in p["categories"]} for p in wanted)
    assert op.ids == ids(wanted)
    assert all("categories" not in q for q in fake.product_requests())


async def test_a_site_ignoring_the_search_params_is_filtered_locally(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    """Each product comes back from both city searches: saved once, counted a duplicate
    the second time; "Frankfurt" finds "Frankfurt am Main"."""
    fake = await start(aiohttp_server)
    fake.site.faults.ignore_filters = True
    meta = {
        "cities": ["Frankfurt", "Köln"],
        "dates": {"to": "2026-06-30"},
        "categories": ["Sport"],
    }
    op = await parse(pool, upstream, params_for(fake), meta)

    assert op.row["status"] == "succeeded", op.row["error"]
    wanted = [
        p
        for p in fake.products()
        if p["typeAttributes"]["liveEntertainment"]["location"]["city"]
        in ("Frankfurt am Main", "Köln")
        and local_day(p) <= date(2026, 6, 30)
        and "Sport" in category_names(p)
    ]
    assert wanted
    assert op.ids == ids(wanted)
    assert op.stats["filtered"] == 95 - len(wanted)
    assert op.stats["duplicates"] == 95


async def test_meta_countries_choose_the_storefronts(
    pool: db.Pool, upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    fake = await start(aiohttp_server)
    op = await parse(
        pool, upstream, params_for(fake, web_ids=[DE, AT]), {"countries": ["at", "FR"]}
    )

    assert op.row["status"] == "succeeded", op.row["error"]
    assert op.ids == ids(fake.products(AT))
    assert {i["country"] for i in op.items} == {"AT"}
    assert {q["webId"] for q in fake.product_requests()} == {AT}
    assert op.stats["warnings"] == ["meta.countries: no storefront in web_ids for FR"]

    fake.site.requests.clear()
    op = await parse(pool, upstream, params_for(fake), {"countries": [{"code": "FR"}]})
    assert op.row["status"] == "succeeded", op.row["error"]
    assert op.items == []
    assert fake.site.requests == []
    assert "nothing to read: no storefront in web_ids matches meta" in op.stats["warnings"]


# -- params --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"base_url": "ftp://x"}, "base_url"),
        ({"web_ids": ["web__nowhere"]}, "web_ids"),
        ({"web_ids": [{"web_id": "web__x", "country": "Xanadu", "language": "x"}]}, "web_ids"),
        ({"web_ids": []}, "web_ids"),
        ({"page_size": 51}, "page_size"),
        ({"max_pages": 0}, "max_pages"),
        ({"rate_limit": -1}, "rate_limit"),
        ({"rate_limit": True}, "rate_limit"),
        ({"user_agent": "evil\r\nX-Injected: 1"}, "user_agent"),
        ({"respect_robots": "no"}, "respect_robots"),
        ({"read_timeout": 0}, "read_timeout"),
        ({"meta": {"cities": "Berlin"}}, "meta.cities"),
        ({"meta": {"dates": {"from": "tomorrow"}}}, "meta.dates.from"),
        ({"meta": {"dates": {"to": "2026-05-01T20:00:00"}}}, "meta.dates.to"),
        ({"meta": {"dates": {"from": "2026-05-02", "to": "2026-05-01"}}}, "meta.dates.from"),
        ({"meta": {"countries": ["Germany"]}}, r"meta.countries\[0\]"),
        ({"meta": {"countries": [{"name": "Germany"}]}}, r"meta.countries\[0\]"),
    ],
)
def test_bad_params_are_refused_naming_the_param(params: dict[str, Any], named: str) -> None:
    spec = JobSpec(name="e", kind=KIND, schedule=None, params=params)
    with pytest.raises(ValueError, match=named):
        EventimJob().check(spec)


def test_a_storefront_not_in_the_notes_can_be_configured() -> None:
    site = {"web_id": "web__eventim-nl", "country": "nl", "language": "nl"}
    EventimJob().check(JobSpec(name="e", kind=KIND, schedule=None, params={"web_ids": [site]}))


# -- mapping -------------------------------------------------------------------------

BERLIN = SITES_KNOWN["web__eventim-de"]


def product(**fields: Any) -> dict[str, Any]:
    live = {"startDate": "2026-10-25T02:30:00+01:00", "location": {"name": "Halle", "city": "Köln"}}
    return {
        "productId": "1",
        "name": "Show",
        "typeAttributes": {"liveEntertainment": live},
        **fields,
    }


def test_a_product_maps_with_what_the_notes_allow() -> None:
    raw = product(
        price="19,90",
        url={"domain": "www.eventim.de", "path": "/event/x/"},
        inStock=False,
        categories=[{"name": "Pop", "parentCategory": {"name": "Konzerte"}}],
    )
    raw["typeAttributes"]["liveEntertainment"]["endDate"] = "2026-10-25T06:00:00Z"
    event, starts = map_product(raw, BERLIN)
    # 02:30 happens twice that night in Berlin; the offset says which: the second (CET).
    assert (event["starts_at"], event["ends_at"], event["timezone"]) == (
        "2026-10-25T01:30:00Z",
        "2026-10-25T06:00:00Z",
        "+01:00",
    )
    assert starts.isoformat() == "2026-10-25T02:30:00+01:00"
    assert event["price_min"] == 19.9
    assert event["url"] == "https://www.eventim.de/event/x/"
    assert event["sale_status"] == "sold_out"
    assert (event["category"], event["categories"]) == ("Pop", ["Pop", "Konzerte"])
    assert (event["latitude"], event["longitude"], event["address"]) == (None, None, "Köln")

    unpriced, _ = map_product(product(price="n/a"), BERLIN)
    assert unpriced["price_min"] is None  # unreadable: no price, the raw keeps it
    raw = product()
    raw["typeAttributes"]["liveEntertainment"]["startDate"] = "2026-06-01T20:00:00-05:00"
    assert map_product(raw, BERLIN)[0]["starts_at"] == "2026-06-02T01:00:00Z"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (product(typeAttributes=[]), "no typeAttributes.liveEntertainment"),
        (product(typeAttributes={"liveEntertainment": {"location": {}}}), "no startDate"),
        (product(name=" "), "no name"),
        (product(productId=True), "no productId"),
        (["not", "a", "product"], "a product must be an object"),
    ],
)
def test_a_product_that_cannot_be_mapped_says_why(raw: Any, reason: str) -> None:
    with pytest.raises((ValueError, TypeError), match=reason):
        map_product(raw, BERLIN)
