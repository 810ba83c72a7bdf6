"""One schema.org `Event` as a normalised event (docs/parsing.md, "Kontramarka and
schema.org sources"): which nodes are events, and how each property is read.

Nodes come from extruct: a JSON-LD block's objects as written, or microdata items in
its "uniform" shape (`@type`, properties as keys). Values are read the way schema.org
publishers write them: a property may be one value or a list, text may be HTML-escaped
or a `{"@value"}` object, a JSON-LD node may stand for another by its `@id`, a type may
be `MusicEvent`, `schema:MusicEvent` or `https://schema.org/MusicEvent`.
"""

from __future__ import annotations

import hashlib
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urljoin, urlsplit
from zoneinfo import ZoneInfo

from .fienta import parse_price

# schema.org's Event and its subtypes (the deprecated UserInteraction ones left out).
EVENT_TYPES = frozenset(
    {
        "Event",
        "BusinessEvent",
        "ChildrensEvent",
        "ComedyEvent",
        "CourseInstance",
        "DanceEvent",
        "DeliveryEvent",
        "EducationEvent",
        "EventSeries",
        "ExhibitionEvent",
        "Festival",
        "FoodEvent",
        "Hackathon",
        "LiteraryEvent",
        "MusicEvent",
        "PublicationEvent",
        "BroadcastEvent",
        "OnDemandEvent",
        "SaleEvent",
        "ScreeningEvent",
        "SocialEvent",
        "SportsEvent",
        "TheaterEvent",
        "VisualArtsEvent",
    }
)
MAX_DEPTH = 32  # deeper nesting is not markup anyone writes by hand
# schema.org ItemAvailability -> the sale statuses every parser reports (Fienta's words).
_AVAILABILITY = {
    "instock": "on_sale",
    "limitedavailability": "on_sale",
    "onlineonly": "on_sale",
    "instoreonly": "on_sale",
    "backorder": "on_sale",
    "soldout": "sold_out",
    "outofstock": "sold_out",
    "preorder": "not_on_sale",
    "presale": "not_on_sale",
    "discontinued": "sale_ended",
}
_STATUS = {
    "eventscheduled": "scheduled",
    "eventcancelled": "cancelled",
    "eventpostponed": "postponed",
    "eventrescheduled": "rescheduled",
    "eventmovedonline": "moved_online",
}


@dataclass(frozen=True)
class Listing:
    """A listing page, paged when `url` holds `{page}`, and what its events share when
    their markup does not say it: a city, a category, a country. The aliases are the
    names `meta` may use for them (matched loosely by the job)."""

    url: str
    city: str | None = None
    city_aliases: tuple[str, ...] = ()
    category: str | None = None
    category_aliases: tuple[str, ...] = ()
    country: str | None = None

    @property
    def paged(self) -> bool:
        return "{page}" in self.url

    def page_url(self, page: int) -> str:
        return self.url.replace("{page}", str(page))

    @property
    def label(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.netloc}{parts.path}".replace("{page}", "N")


@dataclass(frozen=True)
class Defaults:
    """What a source says of all its events: its name, the zone of times given without
    an offset, a country and currency for markup without them, and the pattern taking
    a site's own event number out of an event URL (group 1)."""

    source: str
    zone: ZoneInfo
    country: str | None = None
    currency: str | None = None
    id_pattern: re.Pattern[str] | None = None


@dataclass(frozen=True)
class Found:
    """One event node as found: the node (JSON-safe), the JSON-LD nodes of its block by
    `@id` (to follow references), where it was found, and its microdata element."""

    node: Mapping[str, Any]
    where: str
    refs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    element: Any = None

    def url(self, page_url: str) -> str | None:
        return _link(self.node.get("url"), page_url)

    def candidates(self, page_url: str) -> list[str]:
        """Its identity, best first: an absolute `@id` (or microdata `itemid`), its URL.
        Blank nodes (`_:b0`) and ids relative to the listing page are no identity."""
        found = []
        for key in ("@id", "id"):
            value = self.node.get(key)
            if isinstance(value, str) and value.strip().startswith(("http://", "https://", "urn:")):
                found.append(value.strip())
        url = self.url(page_url)
        return [*found, url] if url else found


def walk(items: Sequence[Any], *, where: str, untyped: bool = False) -> list[Found]:
    """Every event node in what extruct read from one JSON-LD block or a page's
    microdata: at any depth (`@graph`, lists, `ItemList`s), and an event's `subEvent`s.
    An event that only groups sub-events (no `startDate`) is not an event itself."""
    refs: dict[str, Mapping[str, Any]] = {}
    _index(items, refs, 0)
    out: list[Found] = []

    def visit(value: Any, depth: int) -> None:
        if depth > MAX_DEPTH:
            return
        if isinstance(value, list):
            for each in value:
                visit(each, depth + 1)
            return
        if not isinstance(value, Mapping):
            return
        node = _plain(value)
        if not _is_event(node, untyped):
            for key, each in node.items():
                if key != "htmlNode":
                    visit(each, depth + 1)
            return
        subs = [node.get(k) for k in ("subEvent", "subEvents") if node.get(k)]
        if node.get("startDate") or not subs:
            out.append(Found(_clean(node), where, refs, node.get("htmlNode")))
        for sub in subs:
            visit(sub, depth + 1)

    visit(list(items), 0)
    return out


def map_event(
    found: Found, *, page_url: str, listing: Listing, fill: Mapping[str, str], defaults: Defaults
) -> tuple[dict[str, Any], datetime]:
    """The normalised event and its start in the offset (or zone) it was given in.
    Markup first; then `fill` (what the selectors found); then the listing's and the
    source's defaults. ValueError/TypeError say why a node is not an event."""
    node, refs = found.node, found.refs
    work = _deref(node.get("workPerformed"), refs)
    title = (
        _text(node.get("name"))
        or _text(node.get("headline"))
        or (_text(work.get("name")) if isinstance(work, Mapping) else None)
        or fill.get("title")
    )
    if title is None:
        raise ValueError("no name")
    zone = defaults.zone
    starts, offset_given = _when(node.get("startDate"), zone, "startDate")
    if starts is None:
        raise ValueError("no startDate")
    ends, _ = _when(node.get("endDate"), zone, "endDate", end=True)
    place = _place(node.get("location"), refs)
    prices = _offers(node.get("offers"), refs)
    if prices["price_min"] is None and fill.get("price"):
        low, high, currency = parse_price(fill["price"])
        prices.update(price_min=low, price_max=high, currency=currency)
    if prices["price_min"] is not None and not prices["currency"]:
        prices["currency"] = defaults.currency  # a one-currency site's markup may omit it
    url = found.url(page_url) or _link(fill.get("url"), page_url)
    venue = place["venue"] or fill.get("venue")
    types = [t for t in _types(node.get("@type")) if t in EVENT_TYPES and t != "Event"]
    categories = list(dict.fromkeys(c for c in (fill.get("category"), listing.category) if c))
    categories += [t for t in types if t not in categories]
    event = {
        "source": defaults.source,
        "external_id": _external_id(found, page_url, defaults, title, starts, venue),
        "title": title,
        "starts_at": _utc(starts),
        "ends_at": _utc(ends) if ends else None,
        "timezone": _zone_label(starts, zone, offset_given),
        "venue": venue,
        "address": place["address"] or fill.get("address"),
        "city": place["city"] or fill.get("city") or listing.city,
        "country": place["country"]
        or _code(fill.get("country"))
        or listing.country
        or defaults.country,
        "latitude": place["latitude"],
        "longitude": place["longitude"],
        "category": categories[0] if categories else None,
        "categories": categories,
        **prices,
        "event_status": _enum(node.get("eventStatus"), _STATUS),
        "url": url,
        "image": _image(node.get("image"), refs, page_url) or _link(fill.get("image"), page_url),
        "raw": dict(node),
    }
    return event, starts


def identity(found: Found, page_url: str, defaults: Defaults) -> str | None:
    """The event's id from its markup: an absolute `@id`, else its URL; with an
    `id_pattern`, the site's own number in the first of them it matches (group 1)."""
    candidates = found.candidates(page_url)
    if defaults.id_pattern is not None:
        for candidate in candidates:
            match = defaults.id_pattern.search(candidate)
            if match:
                return match.group(1)
    return candidates[0] if candidates else None


def _external_id(
    found: Found, page_url: str, defaults: Defaults, title: str, starts: datetime, venue: Any
) -> str:
    """`identity`; without an `@id` or a URL, a hash of what makes the event itself:
    its name, start instant and venue."""
    known = identity(found, page_url, defaults)
    if known is not None:
        return known
    key = "\x1f".join((title.casefold(), _utc(starts), str(venue or "").casefold()))
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:24]


def _when(
    value: Any, zone: ZoneInfo, what: str, *, end: bool = False
) -> tuple[datetime | None, bool]:
    """A date-time with its offset (True), or local to `zone` without one (False).

    A bare date is the day's start (an `endDate`: its end, the next midnight). A local
    time a DST change skips or repeats is read with fold=0, as for Fienta."""
    text = _text(value)
    if text is None:
        return None, False
    try:
        if len(text) == 10:
            day = date.fromisoformat(text) + timedelta(days=1 if end else 0)
            return datetime.combine(day, time(), zone), False
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not an ISO 8601 date or date-time") from None
    if when.tzinfo is None:
        return when.replace(tzinfo=zone), False
    return when, True


def _zone_label(starts: datetime, zone: ZoneInfo, offset_given: bool) -> str:
    """The configured zone's name when the time was read in it, or its offset agrees;
    else the offset given ("+02:00"), as for Eventim."""
    offset = starts.utcoffset() or timedelta(0)
    if not offset_given or starts.astimezone(zone).utcoffset() == offset:
        return zone.key
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def _utc(when: datetime) -> str:
    return when.astimezone(ZoneInfo("UTC")).strftime("%Y-%m-%dT%H:%M:%SZ")


def _place(value: Any, refs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """venue, address, city, country, latitude, longitude of the first physical place."""
    out: dict[str, Any] = dict.fromkeys(
        ("venue", "address", "city", "country", "latitude", "longitude")
    )
    for candidate in _many(value):
        place = _deref(candidate, refs)
        if isinstance(place, str):
            out["venue"] = _text(place)
            return out
        if not isinstance(place, Mapping) or "VirtualLocation" in _types(place.get("@type")):
            continue
        out["venue"] = _text(place.get("name"))
        address = next(iter(_many(_deref(place.get("address"), refs))), None)
        address = _deref(address, refs)
        if isinstance(address, Mapping):
            postal, locality = (
                _text(address.get("postalCode")),
                _text(address.get("addressLocality")),
            )
            local = " ".join(p for p in (postal, locality) if p)
            parts = [p for p in (_text(address.get("streetAddress")), local) if p]
            out.update(address=", ".join(parts) or None, city=locality)
            out["country"] = _country(_deref(address.get("addressCountry"), refs))
        else:
            out["address"] = _text(address)
        geo = _deref(place.get("geo"), refs)
        if isinstance(geo, Mapping):
            lat, lon = _number(geo.get("latitude")), _number(geo.get("longitude"))
            if lat is not None and lon is not None and abs(lat) <= 90 and abs(lon) <= 180:
                out.update(latitude=lat, longitude=lon)
        return out
    return out


def _offers(value: Any, refs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """price_min, price_max, currency, sale_status from `Offer`s / `AggregateOffer`s.
    Prices in another currency than the first one named are left out."""
    amounts: list[float] = []
    currency: str | None = None
    statuses: list[str] = []
    for each in _many(value):
        offer = _deref(each, refs)
        if not isinstance(offer, Mapping):
            continue
        status = _enum(offer.get("availability"), _AVAILABILITY)
        if status:
            statuses.append(status)
        named = (_text(offer.get("priceCurrency")) or "").upper() or None
        currency = currency or named
        if named and named != currency:
            continue
        for key in ("price", "lowPrice", "highPrice"):
            amount = _amount(offer.get(key))
            if amount is not None:
                amounts.append(amount)
    sale = "on_sale" if "on_sale" in statuses else statuses[0] if statuses else None
    return {
        "price_min": min(amounts) if amounts else None,
        "price_max": max(amounts) if amounts else None,
        "currency": currency if amounts else None,
        "sale_status": sale,
    }


def _amount(value: Any) -> float | None:
    """A price: a number, or text holding one ("300", "300.00", "від 300 грн")."""
    if isinstance(value, str):
        plain = "".join(value.split()).replace(",", ".")
        try:
            value = Decimal(plain)
        except InvalidOperation:
            return parse_price(value)[0]
    number = _number(value) if not isinstance(value, Decimal) else float(value)
    return number if number is not None and 0 <= number < float("inf") else None


def _number(value: Any) -> float | None:
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else None


def _image(value: Any, refs: Mapping[str, Mapping[str, Any]], page_url: str) -> str | None:
    for each in _many(value):
        image = _deref(each, refs)
        if isinstance(image, Mapping):
            image = image.get("url") or image.get("contentUrl")
        link = _link(image, page_url)
        if link:
            return link
    return None


def _link(value: Any, page_url: str) -> str | None:
    """An http(s) URL, resolved against the page (the first of a list)."""
    text = _text(value)
    if text is None:
        return None
    url = urljoin(page_url, text)
    return url if url.startswith(("http://", "https://")) else None


def _text(value: Any) -> str | None:
    """Text, HTML entities decoded and spaces collapsed; the first of a list; the value
    of `{"@value": ...}`; a number as text. None for anything else."""
    if isinstance(value, list):
        return next((t for t in map(_text, value) if t), None)
    if isinstance(value, Mapping):
        value = value.get("@value")
    if isinstance(value, str):
        return " ".join(html.unescape(value).split()) or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _types(value: Any) -> list[str]:
    """Type names without their vocabulary: `https://schema.org/MusicEvent` -> `MusicEvent`."""
    names = []
    for each in value if isinstance(value, list) else [value]:
        if isinstance(each, str) and each.strip():
            names.append(re.split(r"[/#:]", each.strip().rstrip("/"))[-1])
    return names


def _enum(value: Any, table: Mapping[str, str]) -> str | None:
    """A schema.org enumeration member (`https://schema.org/SoldOut`) in our words;
    one we do not know in snake_case."""
    names = _types(_text(value))
    if not names:
        return None
    name = names[0]
    return table.get(name.casefold()) or re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _country(value: Any) -> str | None:
    if isinstance(value, Mapping):
        value = value.get("identifier") or value.get("name")
    return _code(_text(value))


def _code(value: str | None) -> str | None:
    ok = value is not None and len(value) == 2 and value.isascii() and value.isalpha()
    return value.upper() if ok and value else None


def _many(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _deref(value: Any, refs: Mapping[str, Mapping[str, Any]]) -> Any:
    """The node a bare `{"@id": ...}` stands for, in its block; else the value."""
    if isinstance(value, Mapping) and set(value) <= {"@id", "@type"}:
        return refs.get(str(value.get("@id")), value)
    return value


def _is_event(node: Mapping[str, Any], untyped: bool) -> bool:
    types = _types(node.get("@type"))
    if any(t in EVENT_TYPES for t in types):
        return True
    # Without a type: an object with a startDate and a url or name (how a public
    # client reads Kontramarka's JSON-LD, kontramarka.md), when the source asks for it.
    return (
        untyped
        and not types
        and bool(node.get("startDate"))
        and bool(node.get("url") or node.get("name"))
    )


def _plain(value: Mapping[str, Any]) -> Mapping[str, Any]:
    """A microdata item without an itemtype as a node: its properties, its element."""
    if "@type" in value or not isinstance(value.get("properties"), Mapping):
        return value
    return {**value["properties"], "htmlNode": value.get("htmlNode")}


def _clean(value: Any) -> Any:
    """The value without extruct's `htmlNode`s: JSON, fit for `raw`."""
    if isinstance(value, Mapping):
        inner = _plain(value)
        return {k: _clean(v) for k, v in inner.items() if k != "htmlNode"}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _index(value: Any, refs: dict[str, Mapping[str, Any]], depth: int) -> None:
    """Every node of a JSON-LD block that has an `@id` and says more than that."""
    if depth > MAX_DEPTH:
        return
    if isinstance(value, list):
        for each in value:
            _index(each, refs, depth + 1)
    elif isinstance(value, Mapping):
        ident = value.get("@id")
        if isinstance(ident, str) and set(value) - {"@id", "@type"}:
            refs.setdefault(ident, value)
        for each in value.values():
            _index(each, refs, depth + 1)
