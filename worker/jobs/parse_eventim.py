"""Job kind `parse.eventim`: Eventim's events through its web-search endpoint (seed 001).

Params, all optional: `base_url`, `web_ids` (the storefronts read; known ids or
`{web_id, country, language}` tables), `page_size` (`top`, at most 50), `max_pages`
(per scan), `rate_limit` (calls per second), `user_agent` or `contact` (added to the
default agent), `respect_robots`, `connect_timeout`, `read_timeout`, `total_timeout`.
The operation's `meta` chooses what is read: `countries` pick among the configured
storefronts, each of `cities` is a scan of its country's storefront, `categories`
and `dates` narrow every scan. See docs/parsing.md#eventim.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any
from urllib.parse import urlsplit

from ..config import JobSpec
from ..connectors.eventim import BASE_URL, MAX_TOP, SITES, EventimEvents, Filters, Site
from ..context import RunContext
from ..errors import JobError
from ..parsing import EventSource
from ..ratelimit import Rate
from ..robots import user_agent
from ..upstream import Timeouts, host_label
from .parse import ParseJob

# No quota is documented, 429s are observed, and a bot protection sits in front of the
# site: this is the storefront's own search backend, so we read it at the pace of a
# person paging through results. A weekly run has the time (50 pages: under 2 minutes).
DEFAULT_RATE = 0.5
DEFAULT_MAX_PAGES = 50
DEFAULT_SITES = ("web__eventim-de",)
_CODE_KEYS = ("code", "iso", "iso2", "isoCode", "alpha2", "countryCode", "country_code")
_CITY_COUNTRY = (*_CODE_KEYS[1:], "country")  # a city's own `code` is not its country


@dataclass
class Plan:
    """What one operation reads: the sites, each site's filters, and warnings about
    what in `meta` no storefront here can read."""

    sites: list[Site]
    filters: dict[str, Filters]
    warnings: list[str] = field(default_factory=list)


class EventimJob(ParseJob):
    """`parse.eventim`; see the module doc for its params."""

    def check_source(self, spec: JobSpec) -> None:
        p = spec.params
        if "base_url" in p and urlsplit(str(p["base_url"])).scheme not in ("http", "https"):
            raise ValueError(f"'base_url' must be an http(s) URL, got {p['base_url']!r}")
        sites = sites_of(p)
        _whole(p, "page_size", 1, MAX_TOP)
        _whole(p, "max_pages", 1, 10_000)
        rate = p.get("rate_limit", DEFAULT_RATE)
        if isinstance(rate, bool) or not isinstance(rate, int | float) or rate < 0:
            raise ValueError(f"'rate_limit' must be calls per second (0 = unlimited), got {rate!r}")
        plan(p.get("meta") or {}, sites)

    def source(self, ctx: RunContext) -> EventSource:
        p = ctx.params
        base_url = str(p.get("base_url", BASE_URL))
        try:
            wanted = plan(p.get("meta") or {}, sites_of(p))
        except ValueError as exc:
            raise JobError(f"parse.eventim cannot read this operation: {exc}") from None
        limit_key = f"eventim:{host_label(base_url)}"  # the site counts us, whichever job
        ctx.upstream.limiter.configure_once(
            limit_key, Rate.per_second(float(p.get("rate_limit", DEFAULT_RATE)))
        )
        connector = EventimEvents(
            upstream=ctx.upstream.bound(timeouts=Timeouts.from_params(p), on_retry=ctx.note),
            sites=wanted.sites,
            filters=wanted.filters,
            stats=ctx.stats,
            base_url=base_url,
            page_size=int(p.get("page_size", MAX_TOP)),
            max_pages=int(p.get("max_pages", DEFAULT_MAX_PAGES)),
            user_agent=str(p.get("user_agent") or user_agent(p.get("contact"))),
            respect_robots=bool(p.get("respect_robots", True)),
            limit_key=limit_key,
        )
        for warning in wanted.warnings:
            connector.warn(warning)
        return connector


def _whole(params: Mapping[str, Any], key: str, low: int, high: int) -> None:
    value = params.get(key, low)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"'{key}' must be a whole number {low}..{high}, got {value!r}")


def sites_of(params: Mapping[str, Any]) -> list[Site]:
    """The storefronts configured by `web_ids`: known ids (eventim.md's list) or tables
    `{web_id, country, language}` for others."""
    raw = params.get("web_ids", list(DEFAULT_SITES))
    if not isinstance(raw, list) or not raw:
        raise ValueError("'web_ids' must be a non-empty list")
    sites: list[Site] = []
    for entry in raw:
        if isinstance(entry, str):
            if entry not in SITES:
                raise ValueError(
                    f"'web_ids': {entry!r} is not a known storefront ({', '.join(SITES)});"
                    " give another as a table {web_id, country, language}"
                )
            sites.append(SITES[entry])
            continue
        if not isinstance(entry, Mapping) or set(entry) != {"web_id", "country", "language"}:
            raise ValueError(f"'web_ids': {entry!r} must be an id or {{web_id, country, language}}")
        country = entry["country"]
        if not all(isinstance(v, str) and v for v in entry.values()) or not _is_code(country):
            raise ValueError(f"'web_ids': {entry!r} needs strings and a 2-letter country code")
        sites.append(Site(entry["web_id"], country.upper(), entry["language"]))
    if len({s.web_id for s in sites}) != len(sites):
        raise ValueError("'web_ids' names a storefront twice")
    return sites


def plan(meta: Mapping[str, Any], configured: Sequence[Site]) -> Plan:
    """The sites and filters of an operation's `meta` (as the parsing API checked it).

    Entries are names or objects whose `name` is a string or translations; a country
    is its ISO 3166-1 alpha-2 code (a string, or an object's `code`); a city object
    may name its country the same way. A date bound is a date or a date-time with an
    offset. Raises ValueError naming the field for what cannot be read (a country
    without a code, a bad date); what only narrows nothing (a city in a country no
    storefront here sells in) is a warning.
    """
    warnings: list[str] = []
    sites = _sites_for(_list(meta, "countries"), configured, warnings)
    dates = meta.get("dates") or {}
    if not isinstance(dates, Mapping):
        raise ValueError("meta.dates must be {from, to}")
    first, last = (_date(dates.get(k), f"meta.dates.{k}") for k in ("from", "to"))
    if first is not None and last is not None and _after(first, last):
        raise ValueError(f"meta.dates.from ({first}) is after meta.dates.to ({last})")
    categories = [c for c in _list(meta, "categories") or [] if _names(c)]
    names = tuple(dict.fromkeys(n for c in categories for n in _names(c)))
    cities = [c for c in _list(meta, "cities") or [] if _names(c) or _unnamed(warnings)]
    out = Plan(sites=[], filters={}, warnings=warnings)
    for site in sites:
        here = [c for c in cities if _code(c, keys=_CITY_COUNTRY) in (None, site.country)]
        if cities and not here:
            continue  # none of the cities asked for is in this site's country
        out.sites.append(site)
        out.filters[site.web_id] = Filters(
            cities=tuple(dict.fromkeys(_spelling(c, site.language) for c in here)),
            city_names=tuple(dict.fromkeys(n for c in here for n in _names(c))),
            categories=names,
            category=_spelling(categories[0], site.language) if len(categories) == 1 else None,
            date_from=first,
            date_to=last,
        )
    read = {s.country for s in out.sites}
    skipped = [_names(c)[0] for c in cities if _code(c, keys=_CITY_COUNTRY) not in (None, *read)]
    if skipped:
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        warnings.append(
            f"meta.cities: {len(skipped)} in countries no storefront here reads:"
            f" {', '.join(skipped[:5])}{more}"
        )
    if not out.sites:
        warnings.append("nothing to read: no storefront in web_ids matches meta")
    return out


def _sites_for(
    countries: list[Any] | None, configured: Sequence[Site], warnings: list[str]
) -> list[Site]:
    """The configured sites in `countries` (all of them when no countries are given)."""
    if countries is None:
        return list(configured)
    codes = set()
    for i, entry in enumerate(countries):
        code = _code(entry)
        if code is None:
            raise ValueError(
                f"meta.countries[{i}] must be a two-letter code (or an object with 'code'),"
                f" got {entry!r}"
            )
        codes.add(code)
    missing = sorted(codes - {s.country for s in configured})
    if missing:
        warnings.append(f"meta.countries: no storefront in web_ids for {', '.join(missing)}")
    return [s for s in configured if s.country in codes]


def _unnamed(warnings: list[str]) -> bool:
    warning = "meta.cities: an entry without a name is ignored"
    if warning not in warnings:
        warnings.append(warning)
    return False


def _list(meta: Mapping[str, Any], key: str) -> list[Any] | None:
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        raise ValueError(f"meta.{key} must be a list")
    return value


def _date(value: Any, where: str) -> date | datetime | None:
    """A `meta.dates` bound: a date (YYYY-MM-DD) or a date-time with an offset."""
    if value is None:
        return None
    try:
        if isinstance(value, str) and len(value) == 10:
            return date.fromisoformat(value)
        instant = datetime.fromisoformat(str(value))
    except ValueError:
        instant = None
    if instant is None or instant.utcoffset() is None:
        raise ValueError(
            f"{where} must be a date (YYYY-MM-DD) or a date-time with an offset, got {value!r}"
        )
    return instant


def _after(first: date | datetime, last: date | datetime) -> bool:
    """Whether `first` is later than `last` (a date and an instant are not compared)."""
    if isinstance(first, datetime) and isinstance(last, datetime):
        return first > last
    if isinstance(first, datetime) or isinstance(last, datetime):
        return False
    return first > last


def _is_code(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 2 and value.isascii() and value.isalpha()


def _code(entry: Any, *, keys: tuple[str, ...] = _CODE_KEYS) -> str | None:
    """The ISO alpha-2 code of a country entry (a code, or an object holding one)."""
    if _is_code(entry):
        return str(entry).upper()
    if isinstance(entry, Mapping):
        for key in keys:
            value = entry.get(key)
            if _is_code(value):
                return str(value).upper()
            if isinstance(value, Mapping) and (code := _code(value)) is not None:
                return code
    return None


def _names(entry: Any) -> list[str]:
    """Every spelling of an entry's name: a string, or an object's `name` (or `title`),
    itself a string or translations, plus its `aliases` (as parse.fienta reads them)."""
    if not isinstance(entry, Mapping):
        found = [entry]
    else:
        name = entry.get("name") or entry.get("title")
        found = list(name.values()) if isinstance(name, Mapping) else [name]
        aliases = entry.get("aliases")
        found += aliases if isinstance(aliases, list) else []
    return list(dict.fromkeys(n.strip() for n in found if isinstance(n, str) and n.strip()))


def _spelling(entry: Any, language: str) -> str:
    """The name sent: in the site's language when translations are given (else English,
    else the first). Only called for entries that have a name."""
    name = entry.get("name") or entry.get("title") if isinstance(entry, Mapping) else None
    if isinstance(name, Mapping):
        for lang in (language, "en"):
            value = name.get(lang)
            if isinstance(value, str) and value.strip():
                return value.strip()
    return _names(entry)[0]
