"""The `parse.*` job kinds (seed 001's parsers), and the operation's `meta` filters.

A run's params are the job's params plus the operation's `meta` (countries, cities,
categories, dates {from, to}). What the site's API can filter is sent to it; the rest
is matched here on the normalised event (`Meta.keep`), so every parser filters alike.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..config import JobSpec
from ..connectors.fienta import (
    BASE_URL,
    FientaClient,
    Query,
    Zones,
    ident,
    map_event,
)
from ..context import RunContext
from ..errors import JobError
from ..parsing import keep_warning
from ..ratelimit import Rate
from ..robots import user_agent
from ..upstream import Timeouts, host_label
from .parse import Bad, EventSource, ParseJob

_COUNTRY = re.compile(r"[A-Za-z]{2}")


@dataclass(frozen=True)
class Bound:
    """One end of `meta.dates`: a bare date (compared with the event's local start
    date, in its own zone) or an instant with an offset (compared with the start)."""

    value: date | datetime

    @classmethod
    def parse(cls, value: Any, name: str) -> Bound:
        if not isinstance(value, str):
            raise ValueError(f"'{name}' must be a date (YYYY-MM-DD) or a date-time with offset")
        try:
            if len(value) == 10:
                return cls(date.fromisoformat(value))
            instant = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"'{name}' {value!r} is not a date or an ISO date-time") from None
        if instant.tzinfo is None:
            raise ValueError(f"'{name}' {value!r} needs an offset (Z, +02:00) or no time at all")
        return cls(instant.astimezone(UTC))

    def first_day(self) -> date:
        """A day no later than this bound anywhere on earth (for an API's start filter)."""
        value = self.value
        return (value.date() if isinstance(value, datetime) else value) - timedelta(days=1)

    def side(self, start: datetime, zone: ZoneInfo) -> date | datetime:
        """The event's start in this bound's terms: its instant, or its local date."""
        return start if isinstance(self.value, datetime) else start.astimezone(zone).date()


@dataclass(frozen=True)
class Meta:
    """The operation's filters: every one given must match for an event to be kept."""

    countries: tuple[str, ...] = ()
    cities: frozenset[str] = frozenset()
    categories: frozenset[str] = frozenset()
    start: Bound | None = None
    end: Bound | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Meta:
        """From `params["meta"]`; ValueError names the field (`meta.cities[2]`)."""
        meta = params.get("meta") or {}
        if not isinstance(meta, Mapping):
            raise ValueError("'meta' must be a table")
        countries = tuple(c.upper() for c in _names(meta, "countries", key="code"))
        for i, code in enumerate(countries):
            if not _COUNTRY.fullmatch(code):
                raise ValueError(f"'meta.countries[{i}]' must be a two-letter code, got {code!r}")
        dates = meta.get("dates") or {}
        if not isinstance(dates, Mapping):
            raise ValueError("'meta.dates' must be a table {from, to}")
        start, end = (
            Bound.parse(dates[k], f"meta.dates.{k}") if dates.get(k) else None
            for k in ("from", "to")
        )
        if start and end and type(start.value) is type(end.value) and start.value > end.value:
            raise ValueError("'meta.dates.from' is after 'meta.dates.to'")
        return cls(
            countries=tuple(dict.fromkeys(countries)),
            cities=frozenset(map(fold, _names(meta, "cities", key="name"))),
            categories=frozenset(map(fold, _names(meta, "categories", key="name"))),
            start=start,
            end=end,
        )

    def keep(self, event: Mapping[str, Any]) -> bool:
        """Whether a normalised event matches every filter given."""
        if self.countries and event.get("country") not in self.countries:
            return False
        if self.cities and not self._in_city(event):
            return False
        if self.categories:
            found = {fold(c) for c in event.get("categories") or [event.get("category")] if c}
            if not found & self.categories:
                return False
        if self.start or self.end:
            start = datetime.fromisoformat(event["starts_at"])
            zone = ZoneInfo(event.get("timezone") or "UTC")
            if self.start and self.start.side(start, zone) < self.start.value:
                return False
            if self.end and self.end.side(start, zone) > self.end.value:
                return False
        return True

    def _in_city(self, event: Mapping[str, Any]) -> bool:
        """The event's city is one asked for; without a city, the address names one."""
        if event.get("city"):
            return fold(event["city"]) in self.cities
        address = fold(event.get("address") or "")
        return any(re.search(rf"(?<!\w){re.escape(c)}(?!\w)", address) for c in self.cities)


def fold(text: str) -> str:
    """Text compared without case or accents: "Pärnu" ~ "parnu", "Rīga" ~ "riga"."""
    decomposed = unicodedata.normalize("NFKD", text.strip().casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _names(meta: Mapping[str, Any], field: str, *, key: str) -> list[str]:
    """Every name a list gives: each entry a string, or an object (as the main server
    stores it) whose `key` (or `title`) is a string or an object of translations
    ({"en": "Tallinn", "ru": "Таллин"}); an object's `aliases` add names."""
    values = meta.get(field) or []
    if not isinstance(values, list):
        raise ValueError(f"'meta.{field}' must be a list")
    names: list[str] = []
    for i, value in enumerate(values):
        found: list[Any] = [value] if isinstance(value, str) else []
        if isinstance(value, Mapping):
            name = value.get(key) or value.get("title")
            found = list(name.values()) if isinstance(name, Mapping) else [name]
            found += value.get("aliases") or []
        found = [n.strip() for n in found if isinstance(n, str) and n.strip()]
        if not found:
            raise ValueError(f"'meta.{field}[{i}]' must be a name or an object with '{key}'")
        names.extend(found[:1] if field == "countries" else found)
    return names


# -- parse.fienta ------------------------------------------------------------------


class FientaSource:
    """Fienta's events for one run: the client's records, mapped, filtered by `keep`."""

    def __init__(
        self,
        client: FientaClient,
        queries: Sequence[Query],
        zones: Zones,
        keep: Callable[[Mapping[str, Any]], bool],
    ) -> None:
        self.client, self.queries, self.zones, self.keep = client, queries, zones, keep
        self._expected: int | None = None

    @property
    def expected(self) -> int | None:
        return self._expected

    async def events(self) -> AsyncGenerator[dict[str, Any] | Bad, None]:
        out: list[dict[str, Any] | Bad] = []
        for raw, query in await self.client.records(self.queries):
            try:
                event = map_event(raw, country=query.country, zone=self.zones.of(query.country))
            except (ValueError, TypeError) as exc:
                out.append(Bad(ident(raw), str(exc)))
                continue
            if self.keep(event):
                out.append(event)
        self._expected = sum(not isinstance(e, Bad) for e in out)
        for item in out:
            yield item


class FientaJob(ParseJob):
    """Params: timezone (required), timezones, base_url, countries, organizers, locale,
    rate_limit, rate_period, max_requests, user_agent, contact, respect_robots,
    connect_timeout, read_timeout, total_timeout; plus the operation's meta."""

    def check_source(self, spec: JobSpec) -> None:
        p = spec.params
        _zone(p.get("timezone"), "timezone")
        tables = p.get("timezones", {})
        if not isinstance(tables, Mapping):
            raise ValueError("'timezones' must be a table {EE = \"Europe/Tallinn\", ...}")
        for country, zone in tables.items():
            _country(country, f"timezones.{country}")
            _zone(zone, f"timezones.{country}")
        if urlsplit(str(p.get("base_url", BASE_URL))).scheme not in ("http", "https"):
            raise ValueError(f"'base_url' must be an http(s) URL, got {p['base_url']!r}")
        for i, country in enumerate(_list(p, "countries")):
            _country(country, f"countries[{i}]")
        for i, organizer in enumerate(_list(p, "organizers")):
            if isinstance(organizer, bool) or not str(organizer).isdigit():
                raise ValueError(
                    f"'organizers[{i}]' must be a Fienta organiser id, got {organizer!r}"
                )
        if not re.fullmatch(r"[a-z]{2}", str(p.get("locale", "en"))):
            raise ValueError(f"'locale' must be an ISO 639-1 code (en, et), got {p['locale']!r}")
        _whole(p, "rate_limit", 80, low=0)
        _number(p, "rate_period", 60.0)
        _whole(p, "max_requests", 10, low=1)
        Meta.from_params(p)

    def source(self, ctx: RunContext) -> EventSource:
        p = ctx.params
        try:
            meta = Meta.from_params(p)
        except ValueError as exc:
            raise JobError(f"the operation's meta cannot be read: {exc}") from None
        base_url = str(p.get("base_url", BASE_URL))
        limit_key = f"fienta:{host_label(base_url)}"  # Fienta counts per user or IP
        calls, period = int(p.get("rate_limit", 80)), float(p.get("rate_period", 60.0))
        ctx.upstream.limiter.configure_once(limit_key, Rate(calls=calls, period=period))
        upstream = ctx.upstream.bound(timeouts=Timeouts.from_params(p), on_retry=ctx.note)
        client = FientaClient(
            client=upstream,
            base_url=base_url,
            agent=str(p.get("user_agent") or user_agent(p.get("contact"))),
            limit_key=limit_key,
            respect_robots=bool(p.get("respect_robots", True)),
            max_requests=int(p.get("max_requests", 10)),
            warn=lambda message: _warn(ctx, message),
        )
        countries = meta.countries or tuple(str(c).upper() for c in _list(p, "countries"))
        base = Query(
            organizers=tuple(str(o) for o in _list(p, "organizers")),
            locale=str(p.get("locale", "en")),
            starts_from=meta.start.first_day() if meta.start else None,
        )
        queries = [replace(base, country=c) for c in countries] or [base]
        zones = Zones(
            ZoneInfo(p["timezone"]),
            {str(c).upper(): ZoneInfo(z) for c, z in p.get("timezones", {}).items()},
        )
        return FientaSource(client, queries, zones, meta.keep)


def _warn(ctx: RunContext, message: str) -> None:
    """A warning the run's stats keep (the first few), and its log."""
    keep_warning(ctx.stats, message)
    ctx.log.warning("%s", message)


def _zone(name: Any, param: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"'{param}' is required: the zone of Fienta's local start times (they carry"
            ' no offset), e.g. "Europe/Tallinn"'
        )
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"'{param}': unknown time zone {name!r}") from None


def _country(value: Any, param: str) -> None:
    if not isinstance(value, str) or not _COUNTRY.fullmatch(value):
        raise ValueError(f"'{param}' must be a two-letter country code (EE), got {value!r}")


def _list(params: Mapping[str, Any], key: str) -> list[Any]:
    value = params.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f"'{key}' must be a list")
    return value


def _whole(params: Mapping[str, Any], key: str, default: int, *, low: int) -> None:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"'{key}' must be a whole number of at least {low}, got {value!r}")


def _number(params: Mapping[str, Any], key: str, default: float) -> None:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"'{key}' must be a number of seconds above 0, got {value!r}")
