"""A fake Kontramarka-like events site, written from the vendor notes (kontramarka.md).

Kontramarka has no API: its listing pages carry schema.org markup. The fake serves
listings `/{city}/{language}/{category}?page=N` (the real site puts the city in the
subdomain, `https://{city}.kontramarka.ua/{language}/{category}?page=N`; one test
server cannot, so `parse.kontramarka`'s `listing_url` points here with the city in
the path) and `/robots.txt` (None: 404). Each city's pages use one markup:

- `microdata`, the Odessa bot's: cards `#inner-events-contaienr .cat_item` (sic), each
  an `itemscope` Event with `meta[itemprop=image]`, `meta[itemprop=startDate]` (local
  time, NO offset), `div[itemprop=location]` with `meta[itemprop=name|address]`,
  `a[itemprop=url]` (relative); the title in `.block-info__title span` and the price
  in `.block-info__price` only (no `name`, no `offers`);
- `json-ld`, the stand-up aggregator's: the same cards without microdata, and the
  events in `<script type="application/ld+json">`: a list on page 1, 4, ...; an
  `@graph` whose places are `@id` references on page 2, 5, ...; one block per event
  on page 3, 6, ...; start times with their offset, `offers`, a PostalAddress, and
  every fifth event without an `@type` ("objects with @type Event (or startDate+url)");
- `both`: the microdata cards and the JSON-LD of the same events.

Events are generated from the seed in Europe/Kyiv across both 2026 DST changes,
`page_size` a page in start order. `site.faults` switches: `past_end` (what a page
past the last serves: `empty`, `repeat_last`, `first`, `404`), `broken_blocks` (event
ids served in a JSON-LD block of their own that is not valid JSON), `malformed`
(`{id: "no_start" | "bad_date" | "no_name"}`), `rate_limited_next` with `retry_after`
(429 with Retry-After), `blocked` (403). `site.requests` logs what clients asked.
"""

from __future__ import annotations

import html
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

import orjson
from aiohttp import web

from .sites import SiteRequest, log_request, robots_answer

Clock = Callable[[], float]
Markup = Literal["microdata", "json-ld", "both"]

ZONE = ZoneInfo("Europe/Kyiv")
CITIES = {
    "odessa": ("Одеса", "вул. Чайковського, 1", "65026"),
    "lviv": ("Львів", "просп. Свободи, 28", "79000"),
    "dnepr": ("Дніпро", "просп. Яворницького, 72", "49000"),
    "if": ("Івано-Франківськ", "вул. Незалежності, 42", "76018"),
}
TYPES = {"theatre": "TheaterEvent", "concert": "MusicEvent", "standUp": "ComedyEvent"}
TITLES = ("Лебедине озеро", "Кайдашева сім'я", "Наталка Полтавка", "Стендап «Без цензури»")
HOURS = ((19, 0), (18, 30), (20, 0), (12, 0), (3, 30))  # 03:30: skipped or repeated by DST
DEFAULT_ROBOTS = "User-agent: *\nDisallow: /admin/\nDisallow: /basket/\n"


@dataclass(frozen=True, kw_only=True)
class KontramarkaConfig:
    """What the fake serves; the same config always serves the same events."""

    seed: int = 1
    cities: Mapping[str, Markup] = field(
        default_factory=lambda: {"odessa": "microdata", "lviv": "json-ld", "dnepr": "both"}
    )
    categories: tuple[str, ...] = ("theatre", "concert", "standUp")
    events: int = 23  # per city and category
    page_size: int = 10
    first_day: date = date(2026, 3, 20)
    days: int = 240
    robots_txt: str | None = DEFAULT_ROBOTS

    def __post_init__(self) -> None:
        if set(self.cities) - set(CITIES) or set(self.categories) - set(TYPES):
            raise ValueError(f"bad fake Kontramarka config: cities in {list(CITIES)} only")


@dataclass
class KontramarkaFaults:
    """What the fake breaks on purpose."""

    past_end: Literal["empty", "repeat_last", "first", "404"] = "empty"
    broken_blocks: set[str] = field(default_factory=set)
    """Event ids served in a JSON-LD block of their own that is not valid JSON."""
    malformed: dict[str, str] = field(default_factory=dict)
    """Event id -> "no_start" | "bad_date" | "no_name", in every markup."""
    rate_limited_next: int = 0
    retry_after: str | None = "1"
    blocked: bool = False


@dataclass(frozen=True)
class FakeEvent:
    id: str
    city: str
    category: str
    title: str
    starts: datetime  # aware, Europe/Kyiv
    venue: str
    price_min: int
    price_max: int
    sold_out: bool
    untyped: bool  # in JSON-LD: no @type

    @property
    def path(self) -> str:
        return f"/uk/event-{self.category.lower()}-{self.id}.html"

    @property
    def local(self) -> str:
        """The start as the microdata gives it: local time, no offset."""
        return self.starts.strftime("%Y-%m-%dT%H:%M")


class KontramarkaRequest(SiteRequest):
    @property
    def page(self) -> int:
        value = self.query.get("page", "1")
        return int(value) if value.isdigit() else 1


class KontramarkaSite:
    """The fake's state: events by (city, category), robots.txt, faults, request log."""

    def __init__(self, config: KontramarkaConfig | None = None, *, clock: Clock = time.monotonic):
        self.config = config = config or KontramarkaConfig()
        self.clock = clock
        self.robots_txt = config.robots_txt
        self.faults = KontramarkaFaults()
        self.requests: list[KontramarkaRequest] = []
        self.listings: dict[tuple[str, str], list[FakeEvent]] = {}
        serial = 1000
        for city in config.cities:
            for category in config.categories:
                rng = random.Random(f"{config.seed}:{city}:{category}")
                found = []
                for i in range(config.events):
                    serial += 1
                    day = config.first_day + timedelta(days=i * config.days // config.events)
                    found.append(_event(rng, str(serial), city, category, day, i))
                self.listings[city, category] = sorted(found, key=lambda e: (e.starts, e.id))

    def events(self, city: str | None = None, category: str | None = None) -> list[FakeEvent]:
        """Every event served, listing by listing, each in its pages' order."""
        return [
            e
            for (c, k), events in self.listings.items()
            if city in (None, c) and category in (None, k)
            for e in events
        ]

    def pages_asked(self, status: int = 200) -> list[tuple[str, int]]:
        """(path, page) of each listing request answered with `status`, in order."""
        return [
            (r.path, r.page)
            for r in self.requests
            if r.path != "/robots.txt" and r.status == status
        ]

    def page(self, city: str, category: str, number: int) -> list[FakeEvent] | None:
        """The events of one page (None: a 404)."""
        events = self.listings[city, category]
        size = self.config.page_size
        last = max(1, -(-len(events) // size))
        if number > last:
            past = self.faults.past_end
            if past == "404":
                return None
            number = last if past == "repeat_last" else 1 if past == "first" else number
        return events[(number - 1) * size : number * size]


def _event(
    rng: random.Random, ident: str, city: str, category: str, day: date, i: int
) -> FakeEvent:
    hour, minute = HOURS[i % len(HOURS)]
    low = rng.choice((150, 200, 300, 450))
    return FakeEvent(
        id=ident,
        city=city,
        category=category,
        title=f"{rng.choice(TITLES)} #{ident}",
        starts=datetime(day.year, day.month, day.day, hour, minute, tzinfo=ZONE),
        venue=rng.choice(("Театр опери та балету", "Філармонія", "Палац мистецтв")),
        price_min=low,
        price_max=low + rng.choice((0, 200, 550)),
        sold_out=rng.random() < 0.2,
        untyped=i % 5 == 4,
    )


# -- markup --------------------------------------------------------------------------


def render(
    site: KontramarkaSite, city: str, events: list[FakeEvent], number: int, origin: str
) -> str:
    """One listing page as the city's markup has it."""
    markup = site.config.cities[city]
    cards = "\n".join(_card(e, site, microdata=markup != "json-ld") for e in events)
    scripts = _json_ld(site, events, number, origin) if markup != "microdata" else ""
    name = html.escape(CITIES[city][0])
    return (
        f"<!DOCTYPE html><html lang='uk'><head><meta charset='utf-8'><title>Афіша {name}</title>"
        f"{scripts}</head><body><h1 class='city-title'>{name}</h1>"
        f"<div id='inner-events-contaienr'>{cards}</div></body></html>"
    )


def _card(event: FakeEvent, site: KontramarkaSite, *, microdata: bool) -> str:
    broken = site.faults.malformed.get(event.id)
    title = "" if broken == "no_name" else html.escape(event.title)
    start = {"no_start": None, "bad_date": "завтра ввечері"}.get(broken or "", event.local)
    price = f"від {event.price_min} до {event.price_max} грн"
    info = (
        f"<div class='block-info__title'><span>{title}</span></div>"
        f"<div class='block-info__price'>{html.escape(price)}</div>"
        f"<div class='dates'><span class='date_s'>{event.starts:%d.%m}</span></div>"
    )
    if not microdata:
        return (
            f"<div class='cat_item'><a class='cat_item__image' href='{event.path}'>"
            f"<img src='/img/{event.id}.jpg'></a><div class='block-info'>{info}</div></div>"
        )
    kind = TYPES[event.category]
    start_meta = f"<meta itemprop='startDate' content='{html.escape(start)}'>" if start else ""
    return (
        f"<div class='cat_item' itemscope itemtype='http://schema.org/{kind}'>"
        f"<a class='cat_item__image' href='{event.path}'><img src='/img/{event.id}.jpg'></a>"
        f"<div class='block-info'><meta itemprop='image' content='/img/{event.id}.jpg'>"
        f"{start_meta}"
        "<div itemprop='location' itemscope itemtype='http://schema.org/Place'>"
        f"<meta itemprop='name' content='{html.escape(event.venue)}'>"
        f"<meta itemprop='address' content='{html.escape(CITIES[event.city][1])}'></div>"
        f"<a itemprop='url' href='{event.path}'>Купити</a>{info}</div></div>"
    )


def _node(
    event: FakeEvent, site: KontramarkaSite, origin: str, *, place_ref: bool
) -> dict[str, Any]:
    city, street, postal = CITIES[event.city]
    place: dict[str, Any] = {
        "@type": "Place",
        "@id": f"{origin}/venue/{event.city}-{event.venue}",
        "name": event.venue,
        "address": {
            "@type": "PostalAddress",
            "streetAddress": street,
            "postalCode": postal,
            "addressLocality": city,
            "addressCountry": "UA",
        },
    }
    node: dict[str, Any] = {
        "@context": "https://schema.org",
        "@type": TYPES[event.category],
        "name": event.title,
        "startDate": event.starts.isoformat(),
        "endDate": (event.starts + timedelta(hours=2)).isoformat(),
        "url": origin + event.path,
        "image": [origin + f"/img/{event.id}.jpg"],
        "location": {"@id": place["@id"]} if place_ref else place,
        "offers": {
            "@type": "AggregateOffer",
            "lowPrice": event.price_min,
            "highPrice": event.price_max,
            "priceCurrency": "UAH",
            "availability": "https://schema.org/" + ("SoldOut" if event.sold_out else "InStock"),
        },
        "eventStatus": "https://schema.org/EventScheduled",
        "workPerformed": {"@type": "CreativeWork", "name": event.title},
    }
    if event.untyped:
        del node["@type"]
    broken = site.faults.malformed.get(event.id)
    if broken == "no_start":
        del node["startDate"]
    elif broken == "bad_date":
        node["startDate"] = "завтра ввечері"
    elif broken == "no_name":
        del node["name"], node["workPerformed"]
    return node


def _json_ld(site: KontramarkaSite, events: list[FakeEvent], number: int, origin: str) -> str:
    """The page's JSON-LD: a list, an @graph with places by reference, or one block per
    event, by page number; broken events in blocks of their own."""
    whole = [e for e in events if e.id not in site.faults.broken_blocks]
    blocks: list[str] = []
    style = (number - 1) % 3
    if style == 0 and whole:
        blocks.append(_dumps([_node(e, site, origin, place_ref=False) for e in whole]))
    elif style == 1 and whole:
        nodes = [_node(e, site, origin, place_ref=True) for e in whole]
        places = {
            p["@id"]: p
            for e in whole
            for p in [_node(e, site, origin, place_ref=False)["location"]]
        }
        for node in nodes:
            node.pop("@context")
        graph = [*nodes, *places.values(), {"@type": "WebPage", "name": "Афіша"}]
        blocks.append(_dumps({"@context": "https://schema.org", "@graph": graph}))
    else:
        blocks += [_dumps(_node(e, site, origin, place_ref=False)) for e in whole]
    for event in events:
        if event.id in site.faults.broken_blocks:  # cut short: not JSON, not even JSON5
            blocks.append(_dumps(_node(event, site, origin, place_ref=False))[:-40])
    return "".join(f"<script type='application/ld+json'>{b}</script>" for b in blocks)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode().replace("</", "<\\/")


# -- routes --------------------------------------------------------------------------


async def _listing(request: web.Request) -> web.Response:
    site = request.app[KONTRAMARKA]
    record = _record(site, request)
    city, category = request.match_info["city"], request.match_info["category"]
    if site.faults.rate_limited_next > 0:
        site.faults.rate_limited_next -= 1
        record.status = 429
        headers = {"Retry-After": site.faults.retry_after} if site.faults.retry_after else {}
        return web.Response(status=429, text="Too Many Requests", headers=headers)
    if site.faults.blocked:
        record.status = 403
        return web.Response(status=403, text="<html><body>Access denied</body></html>")
    page = request.query.get("page", "1")
    events = (
        site.page(city, category, int(page))
        if (city, category) in site.listings and page.isdigit() and int(page) >= 1
        else None
    )
    if events is None:
        record.status = 404
        return web.Response(status=404, text="<html><body>Сторінку не знайдено</body></html>")
    record.status = 200
    origin = f"{request.scheme}://{request.host}"
    body = render(site, city, events, int(page), origin)
    return web.Response(text=body, content_type="text/html", charset="utf-8")


async def _robots(request: web.Request) -> web.Response:
    site = request.app[KONTRAMARKA]
    return robots_answer(_record(site, request), site.robots_txt)


def _record(site: KontramarkaSite, request: web.Request) -> KontramarkaRequest:
    return log_request(site.requests, site.clock, request, KontramarkaRequest)


def add_routes(app: web.Application, site: KontramarkaSite) -> None:
    """Serve the fake at the root of `app`: the listings and /robots.txt."""
    app[KONTRAMARKA] = site
    app.router.add_get("/{city}/{language}/{category}", _listing)
    app.router.add_get("/robots.txt", _robots)


def build_app(
    config: KontramarkaConfig | None = None, *, clock: Clock = time.monotonic
) -> web.Application:
    """The fake alone; its state is `app[KONTRAMARKA]`. `parse.kontramarka`'s
    `listing_url` for it: `<origin>/{city}/{language}/{category}?page={page}`."""
    app = web.Application()
    add_routes(app, KontramarkaSite(config, clock=clock))
    return app


KONTRAMARKA = web.AppKey("kontramarka", KontramarkaSite)
