"""A fake Eventim web-search exploration endpoint, written from the vendor notes (eventim.md).

`GET /websearch/search/api/exploration/v1/products` takes what clients send: `webId`,
`language` and `page` (1-based), all three required; `top` (20 by default, at most 50);
`city_names` (comma separated), `categories` (`|` separated, a name or its parent's),
`date_from` / `date_to` (YYYY-MM-DD, the local start date), `in_stock`, `sort`
(`DateAsc` by default, `DateDesc`). It answers `products`, `facets`, `results`,
`totalResults`, `page` and `totalPages`; a page past the last is empty. Products carry
the fields the notes list: `productId` as a string, `typeAttributes.liveEntertainment`
with `startDate` (and sometimes `endDate`) as local time WITH its offset, `location`
with `geoLocation` on about 60% of them, a `price` on most. `/robots.txt` is served as
configured (None: 404).

Products are generated from the seed over `days` days from `first_day` (by default
across both 2026 daylight-saving changes, and some at 00:30 local, the previous day
in UTC). `faults` (changed at run time through `site.faults`) make the paging lie,
answer 429, or break products; the request log shows what clients asked.

Mount it with `add_routes(app, site)`, or alone with `build_app`; its base URL for
`parse.eventim` is `<origin>/websearch/search/api/exploration`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

from .sites import SiteRequest, log_request, robots_answer
from .state import json_response

Clock = Callable[[], float]

BASE_PATH = "/websearch/search/api/exploration"
MAX_TOP = 50


@dataclass(frozen=True)
class FakeSite:
    """A storefront: country, zone, domain, and its (city, postal code, lat, lon)."""

    country: str
    zone: str
    domain: str
    cities: tuple[tuple[str, str, float, float], ...]


SITES = {
    "web__eventim-de": FakeSite(
        "DE",
        "Europe/Berlin",
        "www.eventim.de",
        (
            ("Berlin", "10243", 52.5058, 13.4435),
            ("München", "80939", 48.2188, 11.6247),
            ("Hamburg", "20359", 53.5541, 9.9656),
            ("Frankfurt am Main", "60528", 50.0686, 8.6455),
            ("Köln", "50679", 50.9384, 6.9831),
        ),
    ),
    "web__oeticket-at": FakeSite(
        "AT",
        "Europe/Vienna",
        "www.oeticket.com",
        (("Wien", "1150", 48.2016, 16.3372), ("Graz", "8010", 47.0707, 15.4395)),
    ),
    "web__lippu-fi": FakeSite(
        "FI", "Europe/Helsinki", "www.lippu.fi", (("Helsinki", "00240", 60.1873, 24.9255),)
    ),
}
CATEGORIES = (
    ("Konzerte", ("Pop & Rock", "Klassik", "Jazz")),
    ("Kultur", ("Theater", "Oper")),
    ("Sport", ("Fußball",)),
    ("Comedy", ()),
)
ARTICLES = ("Die", "The", "Los")
ACTS = ("Ärzte", "Band", "Solisten")
HOURS = ("19:00", "20:00", "18:30", "11:00", "00:30")
STATUSES = ("Available", "Available", "Available", "SoldOut", "Cancelled")
BROKEN = ("no_offset", "bad_date", "no_name", "no_id", "not_object")
DEFAULT_ROBOTS = "User-agent: *\nDisallow: /checkout/\n"


@dataclass(frozen=True, kw_only=True)
class EventimConfig:
    """What the fake serves; the same config always serves the same products."""

    seed: int = 1
    products: Mapping[str, int] = field(
        default_factory=lambda: {"web__eventim-de": 95, "web__oeticket-at": 30}
    )
    """Generated products per webId (each a key of SITES)."""
    first_day: date = date(2026, 3, 20)
    days: int = 240
    default_top: int = 20  # "~20/page default" (the Israeli notes)
    robots_txt: str | None = DEFAULT_ROBOTS

    def __post_init__(self) -> None:
        unknown = set(self.products) - set(SITES)
        if unknown or self.days < 1 or not 1 <= self.default_top <= MAX_TOP:
            raise ValueError(f"bad fake Eventim config (unknown webIds {sorted(unknown)}?)")


@dataclass
class EventimFaults:
    """What the fake breaks on purpose."""

    total_pages_shift: int = 0
    """`totalPages` announced is the true count plus this (never below 0): it lies."""
    repeat_last: bool = False
    """Every page past the last serves the last one again, forever."""
    ignore_page: bool = False
    """Every page serves page 1 ("silently ignores its page param")."""
    ignore_filters: bool = False
    """City, category and date params are ignored: every product of the webId."""
    past_end_status: int | None = None
    """A page past the last is answered with this status instead of an empty page."""
    blocked: bool = False
    """Every product request gets the bot protection's 403 "Access Denied" page."""
    rate_limited_next: int = 0
    """The next N product requests get a 429, with `retry_after` as Retry-After."""
    retry_after: str | None = "1"
    malformed: dict[str, str] = field(default_factory=dict)
    """productId -> how it is served broken (one of BROKEN)."""


class EventimRequest(SiteRequest):
    @property
    def page(self) -> int | None:
        value = self.query.get("page", "")
        return int(value) if value.isdigit() else None


class EventimSite:
    """The fake's state: products by webId, robots.txt, faults, request log."""

    def __init__(self, config: EventimConfig | None = None, *, clock: Clock = time.monotonic):
        self.config = config = config or EventimConfig()
        self.clock = clock
        self.robots_txt = config.robots_txt
        self.faults = EventimFaults()
        self.requests: list[EventimRequest] = []
        self.products: dict[str, list[dict[str, Any]]] = {
            web_id: generate(web_id, n, seed=config.seed, first=config.first_day, days=config.days)
            for web_id, n in sorted(config.products.items())
        }

    def pages_asked(self, status: int = 200) -> list[int | None]:
        """The `page` of each product request answered with `status`, in order."""
        return [
            r.page for r in self.requests if r.path.endswith("/products") and r.status == status
        ]

    def select(self, web_id: str, query: Mapping[str, str]) -> list[dict[str, Any]]:
        """The products a query asks for, in its order (start, then id)."""
        cities = {c.strip().casefold() for c in query.get("city_names", "").split(",") if c.strip()}
        wanted = {c.strip().casefold() for c in query.get("categories", "").split("|") if c.strip()}
        first, last = (
            date.fromisoformat(query[k]) if query.get(k) else None for k in ("date_from", "date_to")
        )
        if self.faults.ignore_filters:
            cities, wanted, first, last = set(), set(), None, None
        found = []
        for product in self.products.get(web_id, []):
            live = product["typeAttributes"]["liveEntertainment"]
            day = date.fromisoformat(live["startDate"][:10])
            names = {c["name"].casefold() for c in product["categories"]}
            names |= {
                c["parentCategory"]["name"].casefold()
                for c in product["categories"]
                if "parentCategory" in c
            }
            if (
                (not cities or live["location"]["city"].casefold() in cities)
                and (not wanted or names & wanted)
                and (first is None or day >= first)
                and (last is None or day <= last)
                and (query.get("in_stock") != "true" or product["inStock"])
            ):
                found.append(product)
        found.sort(
            key=lambda p: (_instant(p), p["productId"]), reverse=query.get("sort") == "DateDesc"
        )
        return [self._served(p) for p in found]

    def _served(self, product: dict[str, Any]) -> Any:
        how = self.faults.malformed.get(product["productId"])
        if how is None:
            return product
        broken = {**product, "typeAttributes": {"liveEntertainment": dict(_live(product))}}
        live = broken["typeAttributes"]["liveEntertainment"]
        if how == "no_offset":
            live["startDate"] = live["startDate"][:19]
        elif how == "bad_date":
            live["startDate"] = "Freitag, 20 Uhr"
        elif how == "no_name":
            del broken["name"]
        elif how == "no_id":
            del broken["productId"]
        elif how == "not_object":
            return f"product {product['productId']}"
        return broken


def _live(product: Mapping[str, Any]) -> dict[str, Any]:
    live: dict[str, Any] = product["typeAttributes"]["liveEntertainment"]
    return live


def _instant(product: Mapping[str, Any]) -> datetime:
    return datetime.fromisoformat(_live(product)["startDate"])


def generate(web_id: str, n: int, *, seed: int, first: date, days: int) -> list[dict[str, Any]]:
    """`n` products of one storefront spread over `days` days from `first`."""
    rng = random.Random(f"{seed}:{web_id}")
    site = SITES[web_id]
    base = 17_350_000 + 100_000 * sorted(SITES).index(web_id)
    return [
        _product(rng, site, str(base + i), first + timedelta(days=i * days // max(n, 1)))
        for i in range(n)
    ]


def _product(rng: random.Random, site: FakeSite, ident: str, day: date) -> dict[str, Any]:
    city, postal, lat, lon = rng.choice(site.cities)
    hour, minute = map(int, rng.choice(HOURS).split(":"))
    starts = datetime(day.year, day.month, day.day, hour, minute, tzinfo=ZoneInfo(site.zone))
    top, subs = rng.choice(CATEGORIES)
    categories: list[dict[str, Any]] = [{"name": top}]
    if subs:
        categories.append({"name": rng.choice(subs), "parentCategory": {"name": top}})
        if rng.random() < 0.3:  # the subcategory alone: the top one is only its parent
            del categories[0]
    artist = f"{rng.choice(ARTICLES)} {rng.choice(ACTS)} {ident[-3:]}"
    path = f"/event/{artist.lower().replace(' ', '-')}-{city.lower()}-{ident}/"
    status = rng.choice(STATUSES)
    location: dict[str, Any] = {
        "name": f"{rng.choice(('Arena', 'Halle', 'Theater'))} {city}",
        "city": city,
    }
    if rng.random() < 0.8:
        location["postalCode"] = postal
    if rng.random() < 0.6:  # "geoLocation present on only ~60% of events"
        location["geoLocation"] = {"longitude": lon, "latitude": lat}
    live: dict[str, Any] = {"startDate": starts.isoformat(), "location": location}
    if rng.random() < 0.3:
        live["endDate"] = (starts + timedelta(hours=rng.choice((2, 3, 26)))).isoformat()
    product: dict[str, Any] = {
        "productId": ident,
        "productGroupId": str(int(ident) // 10),
        "name": f"{artist} - Live {day.year}",
        "type": "LiveEntertainment",
        "status": status,
        "link": f"https://{site.domain}{path}",
        "url": {"path": path, "domain": site.domain},
        "imageUrl": f"https://{site.domain}/obj/media/{ident}.jpg",
        "currency": "EUR",
        "inStock": status == "Available",
        "typeAttributes": {"liveEntertainment": live},
        "attractions": [{"name": artist}],
        "categories": categories,
        "rating": {"count": rng.randint(0, 300), "average": round(rng.uniform(3, 5), 1)},
        "tags": rng.sample(["TICKETDIRECT", "MOBILE_TICKET", "FANSALE"], 2),
        "hasRecommendation": rng.random() < 0.2,
    }
    if rng.random() < 0.85:
        product["price"] = rng.choice((19.9, 39.0, 59.5, 89.0, 11.0))
    return product


def _answer(site: EventimSite, request: web.Request, record: EventimRequest) -> web.Response:
    query = request.query
    if query.get("webId") not in SITES or not query.get("language"):
        record.status = 400
        return json_response({"error": "webId and language are required"}, status=400)
    try:
        page = int(query["page"])
        top = min(MAX_TOP, int(query.get("top", site.config.default_top)))
        products = site.select(query["webId"], query)
    except (KeyError, ValueError):
        record.status = 400
        return json_response({"error": "bad page, top or date"}, status=400)
    if page < 1 or top < 1:
        record.status = 400
        return json_response({"error": "page and top start at 1"}, status=400)
    pages = math.ceil(len(products) / top)
    faults = site.faults
    if faults.past_end_status and page > pages and not (faults.repeat_last or faults.ignore_page):
        record.status = faults.past_end_status
        return json_response({"error": "page out of range"}, status=record.status)
    served = 1 if faults.ignore_page else min(page, pages) if faults.repeat_last else page
    items = products[(served - 1) * top : served * top]
    record.status = 200
    return json_response(
        {
            "products": items,
            "facets": [{"name": "cities", "facetItems": []}],
            "results": len(items),
            "totalResults": len(products),
            "page": page,
            "totalPages": max(0, pages + faults.total_pages_shift),
        }
    )


async def _products(request: web.Request) -> web.Response:
    site = request.app[EVENTIM]
    record = _record(site, request)
    if site.faults.rate_limited_next > 0:
        site.faults.rate_limited_next -= 1
        record.status = 429
        headers = {"Retry-After": site.faults.retry_after} if site.faults.retry_after else {}
        return json_response({"error": "Too Many Requests"}, status=429, headers=headers)
    if site.faults.blocked:
        record.status = 403
        return web.Response(status=403, text="<HTML><HEAD><TITLE>Access Denied</TITLE></HEAD>")
    return _answer(site, request, record)


async def _robots(request: web.Request) -> web.Response:
    site = request.app[EVENTIM]
    return robots_answer(_record(site, request), site.robots_txt)


def _record(site: EventimSite, request: web.Request) -> EventimRequest:
    return log_request(site.requests, site.clock, request, EventimRequest)


def add_routes(app: web.Application, site: EventimSite) -> None:
    """Serve the fake at the root of `app`: the endpoint under BASE_PATH, /robots.txt."""
    app[EVENTIM] = site
    app.router.add_get(f"{BASE_PATH}/v1/products", _products)
    app.router.add_get("/robots.txt", _robots)


def build_app(
    config: EventimConfig | None = None, *, clock: Clock = time.monotonic
) -> web.Application:
    """The fake alone; its state is `app[EVENTIM]`."""
    app = web.Application()
    add_routes(app, EventimSite(config, clock=clock))
    return app


EVENTIM = web.AppKey("eventim", EventimSite)
