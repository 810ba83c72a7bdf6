"""A fake Fienta public events API, written from the vendor notes (fienta.md).

`GET /api/v1/public/events` answers the documented envelope (`success` object, `time`
object) with `events`, the record fields public clients read (no official field table
exists), `starts_at` / `ends_at` as local time without an offset. It filters by
`country`, `organizer` (comma separated ids) and `starts_from` (YYYY-MM-DD; the
official name is not known, one client uses this one), defaulting to "today"; returns
at most `cap` (1 000) events, in start order (an assumption: Fienta does not say);
and allows `rate` requests per `period` (80 a minute) per caller, answering over it
with the documented 429 body and its top-level `retry_after`, no Retry-After header.
`/robots.txt` is served as configured (None: 404).

Events are generated from the seed: every country's events spread over `days` days
from `first_day`, plus, on every daylight-saving change in that range (Europe/Tallinn:
the last Sundays of March and October), events at 19:00 the day before and the day
of, and one at 03:30 on the day itself, a time the change skips (March) or repeats
(October). Tests break records with `faults.malformed_ids` or add any with `inject`.

Mount it with `add_routes(app, site)` beside other fakes, or alone with `build_app`.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

from .sites import SiteRequest, log_request, robots_answer
from .state import json_response

Clock = Callable[[], float]

ZONES = {"EE": "Europe/Tallinn", "LV": "Europe/Riga", "LT": "Europe/Vilnius", "ES": "Europe/Madrid"}
# (city, postal code, county) per country; the address reads "<street>, <code> <city>[, county]".
PLACES = {
    "EE": [("Tallinn", "10412", "Harju maakond"), ("Tartu", "51004", "Tartu maakond")],
    "LV": [("Rīga", "LV-1050", ""), ("Liepāja", "LV-3401", "")],
    "LT": [("Vilnius", "LT-01100", "")],
    "ES": [("Madrid", "28013", ""), ("Barcelona", "08001", "")],
}
STREETS = {"EE": "Telliskivi", "LV": "Brīvības iela", "LT": "Gedimino pr.", "ES": "Calle de Atocha"}
CATEGORIES = ("music", "theatre", "comedy", "conference", "sport", "kids")
SALE = ("onSale", "onSale", "onSale", "soldOut", "notOnSale", "saleEnded")
HOURS = ("10:00", "12:30", "18:00", "19:00", "21:30")
DEFAULT_ROBOTS = "User-agent: *\nDisallow: /admin/\n"


@dataclass(frozen=True, kw_only=True)
class FientaConfig:
    """What the fake serves; the same config always serves the same events."""

    seed: int = 1
    first_day: date | None = None  # None: today (UTC)
    days: int = 30
    events: dict[str, int] = field(default_factory=lambda: {"EE": 40, "LV": 15, "ES": 10})
    """Generated events per country (each a key of ZONES)."""
    today: date | None = None
    """The default of the start filter ("Defaults to current time"); None: first_day."""
    cap: int = 1000
    rate: int = 80
    period: float = 60.0
    robots_txt: str | None = DEFAULT_ROBOTS

    def __post_init__(self) -> None:
        unknown = set(self.events) - set(ZONES)
        if unknown or self.days < 1 or self.cap < 1 or self.rate < 0 or self.period <= 0:
            raise ValueError(f"bad fake Fienta config (unknown countries {sorted(unknown)}?)")


@dataclass
class FientaFaults:
    """What the fake breaks on purpose; change it at run time through `site.faults`."""

    rate_limited_next: int = 0
    """The next N requests get the documented 429 (as if another client on the same IP
    had used the minute up), asking to wait `retry_after` seconds; until then every
    request is refused again, with the seconds left."""
    retry_after: int = 2
    malformed_ids: set[int] = field(default_factory=set)
    """These events are served broken: no title, `starts_at` not a date."""


FientaRequest = SiteRequest


class FientaSite:
    """The fake's state: its events by country, robots.txt, faults, request log."""

    def __init__(self, config: FientaConfig | None = None, *, clock: Clock = time.monotonic):
        self.config = config = config or FientaConfig()
        self.clock = clock
        self.first_day = config.first_day or datetime.now(UTC).date()
        self.today = config.today or self.first_day
        self.robots_txt = config.robots_txt
        self.robots_status = 200  # what /robots.txt answers with (with robots_txt as body)
        self.faults = FientaFaults()
        self.requests: list[FientaRequest] = []
        self.events: dict[str, list[dict[str, Any]]] = {
            country: generate(country, n, seed=config.seed, first=self.first_day, days=config.days)
            for country, n in sorted(config.events.items())
        }
        self.injected: dict[str, list[Any]] = {}
        self._arrivals: dict[str, deque[float]] = {}
        self._blocked_until = -math.inf

    def inject(self, record: Any, *, country: str = "EE") -> None:
        """Serve `record` as it is, after `country`'s events, whatever the filters."""
        self.injected.setdefault(country, []).append(record)

    def select(self, country: str | None, organizers: set[int], starts_from: date) -> list[Any]:
        """The events a query asks for, in start order, capped."""
        countries = [country] if country else sorted(self.events.keys() | self.injected.keys())
        found = [
            self._served(e)
            for c in countries
            for e in self.events.get(c, [])
            if (not organizers or e.get("organizer_id") in organizers)
            and str(e.get("starts_at", "")) >= starts_from.isoformat()
        ]
        found.sort(key=lambda e: (str(e.get("starts_at", "")), str(e.get("id"))))
        found += [r for c in countries for r in self.injected.get(c, [])]
        return found[: self.config.cap]

    def _served(self, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("id") not in self.faults.malformed_ids:
            return event
        broken = {k: v for k, v in event.items() if k != "title"}
        return {**broken, "starts_at": "next Friday at eight"}

    def refusal(self, who: str) -> int | None:
        """Seconds to wait if this request is refused for the rate limit, else None."""
        now = self.clock()
        if now < self._blocked_until:
            return max(1, math.ceil(self._blocked_until - now))
        if self.faults.rate_limited_next > 0:
            self.faults.rate_limited_next -= 1
            self._blocked_until = now + self.faults.retry_after
            return self.faults.retry_after
        if not self.config.rate:
            return None
        arrivals = self._arrivals.setdefault(who, deque())
        while arrivals and arrivals[0] <= now - self.config.period:
            arrivals.popleft()
        if len(arrivals) >= self.config.rate:
            return max(1, math.ceil(arrivals[0] + self.config.period - now))
        arrivals.append(now)
        return None


def generate(country: str, n: int, *, seed: int, first: date, days: int) -> list[dict[str, Any]]:
    """`n` events of one country over `days` days, plus its DST-change events."""
    rng = random.Random(f"{seed}:{country}")
    zone = ZoneInfo(ZONES[country])
    base = 100_000 * (sorted(ZONES).index(country) + 1)
    slots = [(first + timedelta(days=i * days // max(n, 1)), rng.choice(HOURS)) for i in range(n)]
    for day, odd in _changes(zone, first, days):
        slots += [(day - timedelta(days=1), "19:00"), (day, "19:00"), (day, odd)]
    organizers = [base // 10 + k for k in range(1, 4)]
    return [
        _event(rng, country, base + i + 1, day, hour, rng.choice(organizers))
        for i, (day, hour) in enumerate(slots)
    ]


def _changes(zone: ZoneInfo, first: date, days: int) -> list[tuple[date, str]]:
    """(day, a local HH:MM the change skips or repeats) for each offset change in range."""
    found = []
    start = datetime(first.year, first.month, first.day, tzinfo=UTC) - timedelta(hours=14)
    for step in range(days * 48):
        before = (start + timedelta(minutes=30 * step)).astimezone(zone)
        after = (start + timedelta(minutes=30 * (step + 1))).astimezone(zone)
        old, new = before.utcoffset(), after.utcoffset()
        if old is None or new is None or old == new:
            continue
        # Wall times between the old and the new reading of the change instant are
        # skipped (spring) or repeated (autumn); take one half an hour in.
        instant = after.astimezone(UTC).replace(tzinfo=None)
        odd = instant + min(old, new) + timedelta(minutes=30)
        if first <= odd.date() < first + timedelta(days=days):
            found.append((odd.date(), odd.strftime("%H:%M")))
    return found


def _event(
    rng: random.Random, country: str, ident: int, day: date, hour: str, organizer: int
) -> dict[str, Any]:
    city, code, county = rng.choice(PLACES[country])
    venue = f"{rng.choice(('Kultuurikatel', 'Vaba Lava', 'Arena', 'Club'))} {city}"
    starts = f"{day.isoformat()} {hour}:00"
    end = datetime.fromisoformat(starts) + timedelta(hours=rng.choice((1, 2, 3)))
    slug = f"event-{ident}"
    price = rng.choice((None, 5, 10, 12.5, 25))
    record: dict[str, Any] = {
        "id": ident,
        "title": f"{rng.choice(CATEGORIES).title()} night #{ident} in {city}",
        "starts_at": starts,
        "ends_at": "" if ident % 7 == 0 else end.strftime("%Y-%m-%d %H:%M:%S"),
        "duration_string": f"{day:%a %d. %B %Y} at {hour}",
        "notes_about_time": "",
        "event_status": "cancelled" if ident % 11 == 0 else "scheduled",
        "sale_status": rng.choice(SALE),
        "attendance_mode": "offline",
        "venue": venue,
        "venue_id": ident % 50,
        "address": ", ".join(
            p for p in (f"{STREETS[country]} {ident % 90 + 1}", f"{code} {city}", county) if p
        ),
        "address_postal_code": code,
        "description": f"<p>Event {ident}</p>",
        "url": f"https://fienta.com/{slug}",
        "buy_tickets_url": f"https://fienta.com/{slug}?tickets",
        "image_url": f"https://fienta.com/uploads/{slug}.jpg",
        "image_small_url": f"https://fienta.com/uploads/{slug}-small.jpg",
        "series_id": "",
        "organizer_id": organizer,
        "organizer_name": f"Organiser {organizer}",
        "categories": rng.sample(CATEGORIES, rng.choice((1, 2))),
    }
    if price is not None:
        record["price_from_string"] = f"From {price} EUR"
    return record


def _status(code: int, user: str, internal: str) -> dict[str, Any]:
    return {"code": code, "user_message": user, "internal_message": internal}


def _time() -> dict[str, Any]:
    """The `time` object of Fienta's answers, in its own zone."""
    now = datetime.now(ZoneInfo("Europe/Tallinn"))
    offset = now.strftime("%z")
    return {
        "timestamp": int(now.timestamp()),
        "date": now.strftime("%Y-%m-%d"),
        "time": now.strftime("%H:%M:%S"),
        "full_datetime": now.isoformat(timespec="seconds"),
        "timezone": "Europe/Tallinn",
        "timezone_short": now.tzname(),
        "gmt": offset,
    }


def _error(status: int, user: str, internal: str, **extra: Any) -> web.Response:
    body = {"errors": [_status(status, user, internal)], "time": _time(), **extra}
    return json_response(body, status=status)


async def _events(request: web.Request) -> web.Response:
    site = request.app[FIENTA]
    record = _record(site, request)
    wait = site.refusal(request.remote or "?")
    if wait is not None:
        record.status = 429
        return _error(
            429,
            "Too many requests, please slow down the request.",
            "too_many_requests",
            retry_after=wait,
        )
    query = request.query
    try:
        organizers = {int(o) for o in query.get("organizer", "").split(",") if o.strip()}
        starts = query.get("starts_from")
        starts_from = date.fromisoformat(starts) if starts else site.today
    except ValueError:
        record.status = 400
        return _error(400, "Invalid request parameters.", "invalid_parameters")
    events = site.select(query.get("country", "").upper() or None, organizers, starts_from)
    record.status = 200
    return json_response(
        {
            "success": _status(200, "Events returned successfully", "events_returned_successfully"),
            "time": _time(),
            "count": len(events),
            "events": events,
        }
    )


async def _robots(request: web.Request) -> web.Response:
    site = request.app[FIENTA]
    return robots_answer(_record(site, request), site.robots_txt, site.robots_status)


def _record(site: FientaSite, request: web.Request) -> FientaRequest:
    return log_request(site.requests, site.clock, request, FientaRequest)


def add_routes(app: web.Application, site: FientaSite) -> None:
    """Serve the fake at the root of `app`: the API under /api/v1, and /robots.txt."""
    app[FIENTA] = site
    app.router.add_get("/api/v1/public/events", _events)
    app.router.add_get("/robots.txt", _robots)


def build_app(
    config: FientaConfig | None = None, *, clock: Clock = time.monotonic
) -> web.Application:
    """The fake alone; its state is `app[FIENTA]`, its API base `<origin>/api/v1`."""
    app = web.Application()
    add_routes(app, FientaSite(config, clock=clock))
    return app


FIENTA = web.AppKey("fienta", FientaSite)
