"""Job kinds `parse.schema_org` (any site publishing schema.org events) and
`parse.kontramarka` (seed 001's Kontramarka: one configured instance of it).

`parse.schema_org` params: `urls` (listing pages: URLs, `{page}` where a page number
goes, or tables `{url, city, city_aliases, category, category_aliases, country}` naming
what the page's events share), `url_pattern` (one more paged URL), `timezone`
(required: the zone of times without an offset), `source`, `country`, `currency`,
`first_page`, `max_pages`, `selectors`, `untyped`, `id_pattern`, `rate_limit`,
`user_agent` or `contact`, `respect_robots`, `connect_timeout`, `read_timeout`,
`total_timeout`. `parse.kontramarka` builds its listings from `cities` x `categories`
instead (see KONTRAMARKA_* and docs/parsing.md). The operation's `meta` chooses the
listings (by their city and country) and filters events locally.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..config import JobSpec
from ..connectors.schema_org import Keep, SchemaOrgEvents, Selectors
from ..connectors.schema_org_map import Defaults, Listing
from ..context import RunContext
from ..errors import JobError
from ..parsing import EventSource
from ..ratelimit import Rate
from ..robots import user_agent
from ..upstream import Timeouts, host_label
from .parse import ParseJob
from .parsers import Meta, fold

DEFAULT_RATE = 0.5  # no quota is published: a person's paging pace (as for Eventim)
_LISTING_KEYS = {"url", "city", "city_aliases", "category", "category_aliases", "country"}

# Kontramarka (kontramarka.md): no API; city subdomains with a language path and a
# category, paged with `?page=N` (the Odessa bot's `odessa.kontramarka.ua/ru/{theatre|
# concert|circus|clubs}?page=N`; `lviv.kontramarka.ua/uk/standUp`).
KONTRAMARKA_LISTING = "https://{city}.kontramarka.ua/{language}/{category}?page={page}"
# The subdomains the notes show (odessa, lviv, dnepr, if); the names are ours.
KONTRAMARKA_CITIES: dict[str, tuple[str, ...]] = {
    "odessa": ("Odesa", "Odessa", "Одеса", "Одесса"),
    "lviv": ("Lviv", "Львів", "Львов", "Lwów"),
    "dnepr": ("Dnipro", "Дніпро", "Днепр", "Dnepr"),
    "if": ("Ivano-Frankivsk", "Івано-Франківськ", "Ивано-Франковск"),
}
# The category slugs the notes show; the names are ours.
KONTRAMARKA_CATEGORIES: dict[str, tuple[str, ...]] = {
    "theatre": ("Theatre", "Theater", "Театр", "Театри", "Театры"),
    "concert": ("Concerts", "Concert", "Концерти", "Концерты", "Концерт"),
    "circus": ("Circus", "Цирк"),
    "clubs": ("Clubs", "Club", "Клуби", "Клубы"),
    "standUp": ("Stand-up", "Standup", "Стендап", "Стенд-ап"),
}
KONTRAMARKA_DEFAULTS: dict[str, Any] = {
    "source": "kontramarka",
    "timezone": "Europe/Kyiv",  # kontramarka.ua sells in Ukraine; the notes give no zone
    "country": "UA",
    "currency": "UAH",
    "untyped": True,  # JSON-LD objects with startDate + url count (the stand-up aggregator)
    # The event URL's last segment without ".html", as the Odessa bot takes its id
    # ("href minus leading /ru/ and .html"): `<slug>-<id>`, whatever the language path.
    "id_pattern": r"/([^/?#]+-\d+)\.html(?:[?#]|$)",
    "max_pages": 30,
    # The Odessa bot's listing markup (age unknown, may be stale): the card, the title
    # and price the microdata does not carry. `selectors` params replace these one by one.
    "selectors": {
        "card": ".cat_item",
        "title": ".block-info__title span",
        "price": ".block-info__price",
    },
}


@dataclass(frozen=True)
class Settings:
    """A job's params, read and checked once."""

    listings: tuple[Listing, ...]
    defaults: Defaults
    selectors: Selectors
    first_page: int = 1
    max_pages: int = 20
    untyped: bool = False
    rate: float = DEFAULT_RATE
    agent: str = field(default_factory=user_agent)
    respect_robots: bool = True
    timeouts: Timeouts = field(default_factory=Timeouts)
    group: str | None = None  # one rate-limit key for every host of the site


class SchemaOrgJob(ParseJob):
    """`parse.schema_org`; see the module doc for its params."""

    kind = "parse.schema_org"

    def check_source(self, spec: JobSpec) -> None:
        self.settings(spec.params)
        Meta.from_params(spec.params)

    def settings(self, params: Mapping[str, Any]) -> Settings:
        """The params as settings; ValueError names the param."""
        listings = [_listing(e, f"urls[{i}]") for i, e in enumerate(_list(params, "urls"))]
        if "url_pattern" in params:
            pattern = params["url_pattern"]
            if not isinstance(pattern, str) or "{page}" not in pattern:
                raise ValueError("'url_pattern' must be a URL holding {page}")
            listings.append(_listing(pattern, "url_pattern"))
        if not listings:
            raise ValueError("'urls' or 'url_pattern' is required: the listing pages to read")
        host = urlsplit(listings[0].url).hostname or "?"
        return common(params, listings, source=str(params.get("source") or host), group=None)

    def source(self, ctx: RunContext) -> EventSource:
        p = ctx.params
        try:
            settings, meta = self.settings(p), Meta.from_params(p)
        except ValueError as exc:
            raise JobError(f"{self.kind} cannot read this operation: {exc}") from None
        listings, warnings = choose(settings, meta, p.get("meta") or {})
        keys = {_key(settings, listing.url) for listing in listings}
        for key in keys:
            ctx.upstream.limiter.configure_once(key, Rate.per_second(settings.rate))
        events = SchemaOrgEvents(
            upstream=ctx.upstream.bound(timeouts=settings.timeouts, on_retry=ctx.note),
            listings=listings,
            defaults=settings.defaults,
            selectors=settings.selectors,
            keep=keeper(meta),
            stats=ctx.stats,
            limit_key=lambda url: _key(settings, url),
            user_agent=settings.agent,
            first_page=settings.first_page,
            max_pages=settings.max_pages,
            untyped=settings.untyped,
            respect_robots=settings.respect_robots,
        )
        for warning in warnings:
            events.warn(warning)
        return events


class KontramarkaJob(SchemaOrgJob):
    """`parse.kontramarka`: the listings `listing_url` x `cities` x `categories`, with
    Kontramarka's defaults (KONTRAMARKA_DEFAULTS) under the job's own params."""

    kind = "parse.kontramarka"

    def settings(self, params: Mapping[str, Any]) -> Settings:
        for key in ("urls", "url_pattern"):
            if key in params:
                raise ValueError(f"'{key}' is not a parse.kontramarka param: set 'cities'")
        template = params.get("listing_url", KONTRAMARKA_LISTING)
        if not isinstance(template, str) or "{city}" not in template:
            raise ValueError("'listing_url' must be a URL holding {city} (and {category}, {page})")
        language = params.get("language", "uk")
        if not isinstance(language, str) or not re.fullmatch(r"[a-z]{2}", language):
            raise ValueError(f"'language' must be a two-letter code (uk, ru), got {language!r}")
        cities = _table(params, "cities", KONTRAMARKA_CITIES)
        categories = _table(params, "categories", KONTRAMARKA_CATEGORIES)
        if "{category}" not in template:
            categories = {"": ()}
        merged = {**KONTRAMARKA_DEFAULTS, **params}
        own = params.get("selectors") or {}
        if not isinstance(own, Mapping):
            raise ValueError("'selectors' must be a table {field = \"css\", ...}")
        selectors = {**KONTRAMARKA_DEFAULTS["selectors"], **own}
        merged["selectors"] = {k: v for k, v in selectors.items() if v is not False}
        listings = [
            Listing(
                url=template.replace("{city}", city)
                .replace("{language}", language)
                .replace("{category}", category),
                city=city_names[0],
                city_aliases=(city, *city_names),
                category=category_names[0] if category_names else None,
                category_aliases=(category, *category_names) if category else (),
                country=str(merged["country"]).upper(),
            )
            for city, city_names in cities.items()
            for category, category_names in categories.items()
        ]
        for listing in listings:
            _listing(listing.url, "listing_url")
        base = (urlsplit(template).netloc or "?").removeprefix("{city}.")
        return common(merged, listings, source=str(merged["source"]), group=f"kontramarka:{base}")


def common(
    p: Mapping[str, Any], listings: Sequence[Listing], *, source: str, group: str | None
) -> Settings:
    """The params both kinds share; ValueError names the param."""
    zone = p.get("timezone")
    if not isinstance(zone, str) or not zone:
        raise ValueError(
            "'timezone' is required: the zone of schema.org times given without an offset,"
            ' e.g. "Europe/Kyiv"'
        )
    try:
        tz = ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"'timezone': unknown time zone {zone!r}") from None
    country, currency = p.get("country"), p.get("currency")
    if country is not None and not _code(country, 2):
        raise ValueError(f"'country' must be a two-letter code (UA), got {country!r}")
    if currency is not None and not _code(currency, 3):
        raise ValueError(f"'currency' must be a three-letter code (UAH), got {currency!r}")
    pattern = p.get("id_pattern")
    try:
        compiled = re.compile(pattern) if pattern is not None else None
    except (re.error, TypeError):
        compiled = None
    if pattern is not None and (compiled is None or compiled.groups < 1):
        raise ValueError(f"'id_pattern' must be a regular expression with a group, got {pattern!r}")
    if not isinstance(p.get("untyped", True), bool):
        raise ValueError("'untyped' must be true or false")
    rate = p.get("rate_limit", DEFAULT_RATE)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or rate < 0:
        raise ValueError(f"'rate_limit' must be calls per second (0 = unlimited), got {rate!r}")
    return Settings(
        listings=tuple(listings),
        defaults=Defaults(
            source=source,
            zone=tz,
            country=str(country).upper() if country else None,
            currency=str(currency).upper() if currency else None,
            id_pattern=compiled,
        ),
        selectors=Selectors.parse(p.get("selectors", {})),
        first_page=_whole(p, "first_page", 1, low=0),
        max_pages=_whole(p, "max_pages", 20, low=1),
        untyped=bool(p.get("untyped", False)),
        rate=float(rate),
        agent=str(p.get("user_agent") or user_agent(p.get("contact"))),
        respect_robots=bool(p.get("respect_robots", True)),
        timeouts=Timeouts.from_params(p),
        group=group,
    )


def choose(
    settings: Settings, meta: Meta, raw: Mapping[str, Any]
) -> tuple[list[Listing], list[str]]:
    """The listings an operation reads: those for a city and a country it asks for (a
    listing without a city or country is read, and its events matched here), and
    warnings for the cities no listing is for."""
    warnings: list[str] = []
    chosen = []
    for listing in settings.listings:
        names = {fold(n) for n in (listing.city, *listing.city_aliases) if n}
        country = listing.country or settings.defaults.country
        if meta.cities and names and not names & meta.cities:
            continue
        if meta.countries and country and country not in meta.countries:
            continue
        chosen.append(listing)
    if meta.cities and all(listing.city for listing in settings.listings):
        read = {fold(n) for item in chosen for n in (item.city, *item.city_aliases) if n}
        entries = raw.get("cities") or []
        missing = [
            names[0] for names in map(_names, entries) if names and not read & set(map(fold, names))
        ]
        if missing:
            warnings.append(f"meta.cities: no listing here for {', '.join(missing)}")
    if not chosen:
        warnings.append("nothing to read: no listing matches meta")
    return chosen, warnings


def keeper(meta: Meta) -> Keep:
    """Why an event is outside the operation's `meta` (None: it is in)."""

    def refuses(event: Mapping[str, Any], starts: datetime, listing: Listing) -> str | None:
        if meta.countries and event.get("country") not in meta.countries:
            return "country"
        if meta.cities and not _in_city(event, listing, meta.cities):
            return "city"
        if meta.categories:
            found = {fold(c) for c in event.get("categories") or []}
            if listing.category in (event.get("categories") or []):
                found |= {fold(a) for a in listing.category_aliases}
            if not found & meta.categories:
                return "category"
        if meta.start and _outside(starts, meta.start.value, before=True):
            return "date"
        if meta.end and _outside(starts, meta.end.value, before=False):
            return "date"
        return None

    return refuses


def _in_city(event: Mapping[str, Any], listing: Listing, cities: frozenset[str]) -> bool:
    """A listing for the city holds its events; else the event's city, or (without
    one) the name as a word of its address."""
    if {fold(n) for n in (listing.city, *listing.city_aliases) if n} & cities:
        return True
    if event.get("city"):
        return fold(event["city"]) in cities
    address = fold(event.get("address") or "")
    return any(re.search(rf"(?<!\w){re.escape(c)}(?!\w)", address) for c in cities)


def _outside(starts: datetime, bound: date | datetime, *, before: bool) -> bool:
    """Whether the start is before (or after) a bound: an instant against an instant,
    its local date (in the offset or zone it was given in) against a date."""
    if isinstance(bound, datetime):
        return starts < bound if before else starts > bound
    day = starts.date()
    return day < bound if before else day > bound


def _key(settings: Settings, url: str) -> str:
    return settings.group or f"schema_org:{host_label(url)}"


def _listing(entry: Any, where: str) -> Listing:
    table = {"url": entry} if isinstance(entry, str) else entry
    if not isinstance(table, Mapping) or not isinstance(table.get("url"), str):
        raise ValueError(f"'{where}' must be a URL or a table {{url, city, category, country}}")
    if set(table) - _LISTING_KEYS:
        raise ValueError(f"'{where}': unknown keys {sorted(set(table) - _LISTING_KEYS)}")
    url: str = table["url"]
    parts = urlsplit(url.replace("{page}", "1"))
    if parts.scheme not in ("http", "https") or not parts.hostname or url.count("{page}") > 1:
        raise ValueError(f"'{where}' must be an http(s) URL with at most one {{page}}, got {url!r}")
    texts = {k: table.get(k) for k in ("city", "category", "country")}
    if any(v is not None and (not isinstance(v, str) or not v.strip()) for v in texts.values()):
        raise ValueError(f"'{where}': city, category and country must be names")
    if texts["country"] is not None and not _code(texts["country"], 2):
        raise ValueError(f"'{where}'.country must be a two-letter code")
    aliases = {k: table.get(k, []) for k in ("city_aliases", "category_aliases")}
    if not all(
        isinstance(v, list) and all(isinstance(n, str) for n in v) for v in aliases.values()
    ):
        raise ValueError(f"'{where}': city_aliases and category_aliases must be lists of names")
    return Listing(
        url=url,
        city=texts["city"],
        city_aliases=tuple(aliases["city_aliases"]),
        category=texts["category"],
        category_aliases=tuple(aliases["category_aliases"]),
        country=texts["country"].upper() if texts["country"] else None,
    )


def _table(
    params: Mapping[str, Any], key: str, known: Mapping[str, tuple[str, ...]]
) -> dict[str, tuple[str, ...]]:
    """Kontramarka's `cities` / `categories`: slugs (known ones take their names, others
    are their own name) or a table slug -> names. The default: every known one."""
    value = params.get(key)
    if value is None:
        return dict(known)
    if isinstance(value, list) and value and all(isinstance(s, str) and s for s in value):
        return {s: known.get(s, (s,)) for s in value}
    if isinstance(value, Mapping) and value:
        out = {}
        for slug, names in value.items():
            if (
                not isinstance(names, list)
                or not names
                or not all(isinstance(n, str) for n in names)
            ):
                raise ValueError(f"'{key}.{slug}' must be a non-empty list of names")
            out[str(slug)] = tuple(names)
        return out
    raise ValueError(f"'{key}' must be a non-empty list of slugs or a table slug -> [names]")


def _names(entry: Any) -> list[str]:
    """The spellings of one `meta.cities` entry (as parse.fienta reads them)."""
    if isinstance(entry, str):
        return [entry.strip()] if entry.strip() else []
    if not isinstance(entry, Mapping):
        return []
    name = entry.get("name") or entry.get("title")
    found = list(name.values()) if isinstance(name, Mapping) else [name]
    aliases = entry.get("aliases")
    found += aliases if isinstance(aliases, list) else []
    return [n.strip() for n in found if isinstance(n, str) and n.strip()]


def _list(params: Mapping[str, Any], key: str) -> list[Any]:
    value = params.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f"'{key}' must be a list")
    return value


def _code(value: Any, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and value.isascii() and value.isalpha()


def _whole(params: Mapping[str, Any], key: str, default: int, *, low: int) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 10_000:
        raise ValueError(f"'{key}' must be a whole number {low}..10000, got {value!r}")
    return value
