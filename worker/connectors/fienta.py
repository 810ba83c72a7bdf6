"""Fienta's public events API, mapped to normalised events (docs/parsing.md#fienta).

What Fienta documents (the vendor notes, fienta.md, "From A"): `GET {base}/public/events`
on base `https://fienta.com/api/v1`, no auth; "Returns maximum of 1000 events"; 80
requests a minute per user or IP, refused with a 429 whose body carries a top-level
`retry_after` (seconds) and says nothing of a Retry-After header; a country filter, a
locale, a comma separated organiser list and a start filter whose name the excerpt
cuts off. The names `country`, `locale`, `organizer` come from many clients; the start
filter's `starts_from` (YYYY-MM-DD) from one, unconfirmed. The event fields come from
clients only (no official field table): `id`, `title`, `starts_at` as local time
without an offset, `venue`, `address`, `categories`, … Records carry no country and no
zone: the country is the one asked for, the zone the configured one for it.

An answer that holds the cap is continued from the last start date it reaches (the
start filter), until an answer is short, brings nothing new, or `max_requests`; the
run is warned when the cap may have hidden events.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from .. import robots
from ..errors import UpstreamError
from ..upstream import Response

BASE_URL = "https://fienta.com/api/v1"
EVENTS_PATH = "/public/events"
MAX_EVENTS = 1000  # "Returns maximum of 1000 events." (official)
START_PARAM = "starts_from"  # one client's name for the start filter (unconfirmed)
QUOTED = 300  # characters of an answer quoted in an error

_SALE = {"available": "on_sale", "soldOutSoon": "on_sale"}  # the Next.js client's values


@dataclass(frozen=True)
class Query:
    """One kind of request: a country (or none), organisers, locale, start date."""

    country: str | None = None
    organizers: tuple[str, ...] = ()
    locale: str = "en"
    starts_from: date | None = None

    def params(self, starts_from: date | None) -> dict[str, str]:
        params = {"locale": self.locale}
        if self.country:
            params["country"] = self.country
        if self.organizers:
            params["organizer"] = ",".join(self.organizers)
        if starts_from is not None:
            params[START_PARAM] = starts_from.isoformat()
        return params

    @property
    def label(self) -> str:
        return f"events {self.country}" if self.country else "events"


@dataclass(frozen=True)
class Zones:
    """The zone `starts_at` is given in: per country when the table names it, else the
    source's. Configuration only, never the server's clock."""

    default: ZoneInfo
    by_country: Mapping[str, ZoneInfo] = field(default_factory=dict)

    def of(self, country: str | None) -> ZoneInfo:
        return self.by_country.get(country or "", self.default)


class FientaClient:
    """The records of one run: robots.txt first (unless turned off), then every query,
    deduplicated by id and in id order, so a resumed run sees them in the same order."""

    def __init__(
        self,
        *,
        client: robots.Fetcher,
        base_url: str,
        agent: str,
        limit_key: str,
        respect_robots: bool = True,
        max_requests: int = 10,
        warn: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.client = client
        self.url = base_url.rstrip("/") + EVENTS_PATH
        self.agent = agent
        self.limit_key = limit_key
        self.respect_robots = respect_robots
        self.max_requests = max_requests
        self.warn = warn

    async def records(self, queries: Sequence[Query]) -> list[tuple[Any, Query]]:
        """(record, the query that found it) for every record the queries return."""
        if self.respect_robots:
            await robots.ensure_allowed(
                self.client, self.url, agent=self.agent, limit_key=self.limit_key
            )
        found: dict[str, tuple[Any, Query]] = {}
        for query in queries:
            await self._fetch(query, found)
        return [found[key] for key in sorted(found, key=_order)]

    async def _fetch(self, query: Query, found: dict[str, tuple[Any, Query]]) -> None:
        """Every record of one query into `found`, continuing past the cap."""
        starts_from = query.starts_from
        for _ in range(self.max_requests):
            answer = await self._answer(query, starts_from)
            for raw in answer:
                key = ident(raw)
                found.setdefault(key if key != "?" else f"?{len(found)}", (raw, query))
            if len(answer) < MAX_EVENTS:
                return
            last = max(filter(None, map(_local_day, answer)), default=None)
            if last is None or (starts_from is not None and last <= starts_from):
                self.warn(
                    f"{query.label}: an answer held Fienta's cap of {MAX_EVENTS} events and"
                    " the start filter could not get past it: some events may be missing;"
                    " narrow the job by organizer or country"
                )
                return
            starts_from = last
        self.warn(
            f"{query.label}: still {MAX_EVENTS} events an answer after max_requests ="
            f" {self.max_requests} answers: later events may be missing"
        )

    async def _answer(self, query: Query, starts_from: date | None) -> list[Any]:
        what = query.label + (f" from {starts_from}" if starts_from else "")
        response = await self.client.request(
            "GET",
            self.url,
            params=query.params(starts_from),
            headers={"User-Agent": self.agent, "Accept": "application/json"},
            limit_key=self.limit_key,
            what=what,
        )
        return read_events(response, what)


def read_events(response: Response, what: str) -> list[Any]:
    """The `events` array of an answer, or an UpstreamError saying what Fienta said."""
    status, url = response.status, response.url
    if status == 429:
        raise UpstreamError(
            f"Fienta kept refusing {what} for its rate limit (HTTP 429, 80 requests a"
            f" minute per user or IP): {_detail(response)}; lower rate_limit, or look for"
            " another client on the same IP",
            status=status,
            url=url,
        )
    if not response.ok:
        raise UpstreamError(
            f"Fienta answered {what} with HTTP {status} at {url}: {_detail(response)}",
            status=status,
            url=url,
        )
    body = response.json()
    events = body.get("events") if isinstance(body, dict) else None
    if not isinstance(events, list):
        raise UpstreamError(
            f"Fienta's answer to {what} at {url} has no 'events' array: {_quote(response.body)}",
            status=status,
            url=url,
        )
    return events


# -- mapping -----------------------------------------------------------------------


def map_event(raw: Any, *, country: str | None, zone: ZoneInfo) -> dict[str, Any]:
    """One Fienta record as a normalised event; ValueError says why it cannot be."""
    if not isinstance(raw, dict):
        raise ValueError(f"the record is not an object but {type(raw).__name__}")
    external_id = ident(raw)
    if external_id == "?":
        raise ValueError("the record has no id")
    title = _text(raw.get("title")) or _text(raw.get("name"))
    if title is None:
        raise ValueError("the record has no title")
    starts = _instant(raw.get("starts_at"), zone, "starts_at")
    if starts is None:
        raise ValueError("the record has no starts_at")
    address = _text(raw.get("address"))
    listed = raw.get("categories")
    listed = listed if isinstance(listed, list) else [listed]
    categories = [c.strip() for c in listed if isinstance(c, str) and c.strip()]
    price_min, price_max, currency = parse_price(_text(raw.get("price_from_string")))
    sale = _text(raw.get("sale_status")) or _text(raw.get("sales_status"))
    return {
        "source": "fienta",
        "external_id": external_id,
        "title": title,
        "starts_at": _iso(starts),
        "ends_at": _iso(_instant(raw.get("ends_at"), zone, "ends_at")),
        "timezone": zone.key,
        "venue": _text(raw.get("venue")),
        "address": address,
        "city": city_of(address, _text(raw.get("address_postal_code"))),
        "country": country,
        "category": categories[0] if categories else None,
        "categories": categories,
        "price_min": price_min,
        "price_max": price_max,
        "currency": currency,
        "sale_status": _snake(sale) if sale else None,
        "event_status": _text(raw.get("event_status")),
        "url": _text(raw.get("url")) or _text(raw.get("buy_tickets_url")),
        "image": _text(raw.get("image_url")) or _text(raw.get("image_small_url")),
        "raw": raw,
    }


def _instant(value: Any, zone: ZoneInfo, name: str) -> datetime | None:
    """`YYYY-MM-DD HH:MM:SS` local to `zone` (an offset, if one is there, wins) as UTC.

    A local time that a DST change skips or repeats is read with fold=0 (PEP 495): one
    in the spring gap keeps the offset before the change (03:30 becomes 04:30 summer
    time); one in the autumn overlap is its first occurrence (summer time)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} {value!r} is not a date-time string")
    try:
        local = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{name} {value!r} is not a date-time (YYYY-MM-DD HH:MM:SS)") from None
    if local.tzinfo is None:
        local = local.replace(tzinfo=zone)
    return local.astimezone(UTC)


def _iso(instant: datetime | None) -> str | None:
    return instant.strftime("%Y-%m-%dT%H:%M:%SZ") if instant else None


def _local_day(raw: Any) -> date | None:
    """The local start date of a record (to continue past the cap), or None."""
    value = raw.get("starts_at") if isinstance(raw, dict) else None
    try:
        return date.fromisoformat(value[:10]) if isinstance(value, str) else None
    except ValueError:
        return None


_CODE_FIRST = re.compile(r"^(?:[A-Z]{1,3}-)?\d{3,6}(?:[ -]\d{2,3})?\s+(?P<city>\D.*)$")
_CODE_LAST = re.compile(r"^(?P<city>\D.*?)\s+(?:[A-Z]{1,3}-)?\d{3,6}$")


def city_of(address: str | None, postal_code: str | None = None) -> str | None:
    """The city in a Fienta address ("Telliskivi 60a, 10412 Tallinn, Harju maakond"):
    the part beside the postal code. Fienta has no city field (fienta.md)."""
    if not address:
        return None
    for part in (p.strip() for p in address.split(",")):
        if postal_code and postal_code in part:
            city = part.replace(postal_code, "").strip(" -")
            if city and not city.isdigit():
                return city
        found = _CODE_FIRST.match(part) or _CODE_LAST.match(part)
        if found:
            return found["city"].strip()
    return None


_THOUSANDS = re.compile(r"(?<=\d)[ \u00a0\u202f](?=\d{3}(?!\d))")
_AMOUNT = re.compile(r"\d+(?:[.,]\d{1,2})?")
_CURRENCY = re.compile(r"\b[A-Z]{3}\b|[€£$]")
_SYMBOLS = {"€": "EUR", "£": "GBP", "$": "USD"}


def parse_price(text: str | None) -> tuple[float | None, float | None, str | None]:
    """(min, max, currency) from `price_from_string` ("From 10 EUR", "10 - 25 EUR");
    one amount is a minimum only. Nothing readable: (None, None, None)."""
    if not text:
        return None, None, None
    grouped = _THOUSANDS.sub("", text)  # "1 000" is one amount
    try:
        amounts = [Decimal(a.replace(",", ".")) for a in _AMOUNT.findall(grouped)]
    except InvalidOperation:
        return None, None, None
    if not amounts:
        return None, None, None
    found = _CURRENCY.search(text)
    currency = _SYMBOLS.get(found[0], found[0]) if found else None
    high = max(amounts) if len(amounts) > 1 else None
    return _number(min(amounts)), _number(high), currency


def _number(value: Decimal | None) -> float | None:
    return None if value is None else float(value)


def _text(value: Any) -> str | None:
    """Optional text: None when absent, empty or not text (the raw record keeps it)."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _snake(value: str) -> str:
    """`onSale` -> `on_sale`; the Next.js client's values mapped to the same words."""
    value = _SALE.get(value, value)
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", value).lower()


def ident(raw: Any) -> str:
    """A record's id as text, or \"?\"."""
    value = raw.get("id") if isinstance(raw, dict) else None
    if isinstance(value, bool) or value is None or value == "":
        return "?"
    return str(value) if isinstance(value, int | str) else "?"


def _order(key: str) -> tuple[int, int, str]:
    """Numeric ids in number order, then other ids, then records without one."""
    if key.isdigit():
        return 0, int(key), ""
    return (2 if key.startswith("?") else 1), 0, key


def _detail(response: Response) -> str:
    """Fienta's `errors[].user_message` (internal_message), or a body snippet."""
    try:
        body = orjson.loads(response.body)
    except orjson.JSONDecodeError:
        return _quote(response.body) if response.body else "(empty)"
    errors = body.get("errors") if isinstance(body, dict) else None
    if isinstance(errors, list) and errors:
        return "; ".join(
            f"{e.get('user_message')} ({e.get('internal_message')})"
            if isinstance(e, dict)
            else str(e)
            for e in errors
        )
    return _quote(response.body)


def _quote(body: bytes) -> str:
    return repr(body[:QUOTED].decode("utf-8", "replace"))
