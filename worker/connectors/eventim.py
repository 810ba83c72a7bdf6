"""Eventim's web-search exploration endpoint (`GET {base}/v1/products`), read defensively.

Nothing here is documented by Eventim: the endpoint, its params and its answer are
what open-source clients send and read (see ../shared/vendor/eventim.md and
docs/parsing.md). So the connector trusts little:

- Paging. Clients disagree about it (one says `page` is ignored, one that
  `totalPages` is unreliable), so `totalPages` never ends a scan: a scan ends on an
  empty page, or on a page that adds no product id the scan has not seen (a repeat),
  whichever comes first, and at the latest after `max_pages` pages (a warning).
  A 4xx for a page past the announced `totalPages` also ends it.
- Filters. Each meta city is its own scan (`city_names` with one value: how the
  site joins several is unverified); one category is sent as `categories`, several
  are filtered here only; dates go as `date_from`/`date_to`. Every filter is also
  applied locally, so a server that ignores a param costs requests, not accuracy.
- Products. Each one maps on its own; one that cannot be read is a `Bad`, never fatal.
  `startDate` must carry an offset: the UTC instant is stored with the offset given.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import AsyncGenerator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeGuard
from urllib.parse import urlencode

from ..errors import JobError, UpstreamError
from ..parsing import Bad, keep_warning
from ..robots import ensure_allowed
from ..upstream import Response, Upstream, error_detail

SOURCE = "eventim"
BASE_URL = "https://public-api.eventim.com/websearch/search/api/exploration"
MAX_TOP = 50  # "max: 50", in two independent notes
RESULT_CEILING = 10_000  # "10.000-Treffer-Limit der API": more per query may be cut off
_PAST_END = frozenset({400, 404, 416})  # a page past the announced end may be refused

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Site:
    """One Eventim storefront: its `webId`, the country it sells in, its language."""

    web_id: str
    country: str  # ISO 3166-1 alpha-2
    language: str


# The webIds eventim.md lists; country from the storefront's domain, language its own.
SITES: dict[str, Site] = {
    s.web_id: s
    for s in (
        Site("web__eventim-de", "DE", "de"),
        Site("web__oeticket-at", "AT", "de"),
        Site("web__ticketcorner-ch", "CH", "de"),
        Site("web__eventim-fr", "FR", "fr"),
        Site("web__lippu-fi", "FI", "fi"),
        Site("web__ticketone-it", "IT", "it"),
        Site("web__eventim-svn", "SI", "sl"),
        Site("web__eventim-co-il", "IL", "he"),
        Site("web__eventim-hrv", "HR", "hr"),
        Site("web__eventim-bgr", "BG", "bg"),
    )
}

# Eventim's `status` (Available, SoldOut, Cancelled seen) in the words every parser
# reports: sale status as Fienta's (on_sale, sold_out, not_on_sale), event status.
_SALE_STATUS = {"available": "on_sale", "cancelled": "not_on_sale", "canceled": "not_on_sale"}
_EVENT_STATUS = {"cancelled": "cancelled", "canceled": "cancelled", "postponed": "postponed"}


def fold(name: str) -> str:
    """A name compared loosely: case, accents and spacing ignored ("Zürich" = "zurich")."""
    decomposed = unicodedata.normalize("NFKD", name)
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(bare.casefold().split())


@dataclass(frozen=True)
class Filters:
    """What an operation asks for, on one site. Empty means any.

    `cities` are scanned one by one (the spelling sent); `city_names` and
    `categories` hold every spelling that matches locally; `category` is the one
    category sent to the site, if exactly one was asked for.
    """

    cities: tuple[str, ...] = ()
    city_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    category: str | None = None
    date_from: date | datetime | None = None  # a date: the local start date; else the instant
    date_to: date | datetime | None = None

    def params(self) -> dict[str, str]:
        """The search params every scan of these filters sends (not the city)."""
        sent: dict[str, str] = {}
        if self.date_from is not None:
            sent["date_from"] = _day(self.date_from, -1)
        if self.date_to is not None:
            sent["date_to"] = _day(self.date_to, +1)
        if self.category:
            sent["categories"] = self.category
        return sent

    def refuses(self, event: Mapping[str, Any], starts: datetime) -> str | None:
        """Why the event is outside these filters (None: it is in)."""
        if self.date_from is not None and _compare(starts, self.date_from) < 0:
            return "date"
        if self.date_to is not None and _compare(starts, self.date_to) > 0:
            return "date"
        names = self.city_names or self.cities
        if names and not any(_same_city(event.get("city"), c) for c in names):
            return "city"
        if self.categories:
            wanted = {fold(c) for c in self.categories}
            if not wanted & {fold(c) for c in event["categories"]}:
                return "category"
        return None


def _day(bound: date | datetime, widen: int) -> str:
    """The `date_from`/`date_to` sent for a bound: a date as it is; an instant's UTC date
    widened by a day, as the site's own zone for the param is not known."""
    if isinstance(bound, datetime):
        return (bound.astimezone(UTC).date() + timedelta(days=widen)).isoformat()
    return bound.isoformat()


def _compare(starts: datetime, bound: date | datetime) -> int:
    """-1, 0, 1 as the start is before, at, after the bound: its instant against an
    instant, its local date (in the offset the site gave) against a date."""
    if isinstance(bound, datetime):
        return (starts > bound) - (starts < bound)
    day = starts.date()
    return (day > bound) - (day < bound)


def _same_city(city: Any, wanted: str) -> bool:
    """Whether `city` is `wanted`, or starts with it as a word ("Frankfurt am Main")."""
    if not isinstance(city, str):
        return False
    have, want = fold(city), fold(wanted)
    return have == want or have.startswith((want + " ", want + "-", want + "/", want + "("))


@dataclass
class _Scan:
    """One paged query: a site and (maybe) one city."""

    site: Site
    city: str | None
    seen: set[str] = field(default_factory=set)  # product ids read
    unnamed: int = 0  # products read without an id
    total: int | None = None  # totalResults, as announced on page 1

    @property
    def label(self) -> str:
        return f"{self.site.web_id}" + (f" city {self.city!r}" if self.city else "")


class EventimEvents:
    """The events of the given sites matching `filters`, in a stable order: an
    `EventSource` (worker/parsing.py).

    `stats` is the run's stats (mutated: pages, filtered, duplicates, warnings).
    """

    def __init__(
        self,
        *,
        upstream: Upstream,
        sites: Sequence[Site],
        filters: Mapping[str, Filters],
        stats: MutableMapping[str, Any],
        base_url: str = BASE_URL,
        page_size: int = MAX_TOP,
        max_pages: int = 50,
        user_agent: str,
        respect_robots: bool = True,
        limit_key: str | None = None,
    ) -> None:
        self.upstream = upstream
        self.sites = list(sites)
        self.filters = {s.web_id: filters.get(s.web_id, Filters()) for s in self.sites}
        self.stats = stats
        self.base_url = base_url.rstrip("/")
        self.page_size = page_size
        self.max_pages = max_pages
        self.headers = {"User-Agent": user_agent, "Accept": "application/json"}
        self.respect_robots = respect_robots
        self.limit_key = limit_key
        self._expected: int | None = None
        for key in ("pages", "filtered", "duplicates"):
            stats[key] = 0  # a resumed run reads the site again from the start
        stats.setdefault("warnings", [])

    @property
    def expected(self) -> int | None:
        """What the scans begun so far announce (`totalResults`): an upper bound, as
        filtered and duplicate products are not yielded."""
        return self._expected

    async def events(self) -> AsyncGenerator[dict[str, Any] | Bad, None]:
        scans = self._scans()
        if scans and self.respect_robots:
            await ensure_allowed(
                self.upstream,
                f"{self.base_url}/v1/products",
                agent=self.headers["User-Agent"],
                limit_key=self.limit_key,
            )
        done: set[str] = set()  # product ids yielded (or found bad) by any scan
        for scan in scans:
            async for product in self._products(scan):
                outcome = self._read(product, scan.site, done)
                if outcome is not None:
                    yield outcome

    def _scans(self) -> list[_Scan]:
        scans: list[_Scan] = []
        for site in self.sites:
            cities = self.filters[site.web_id].cities
            scans += [_Scan(site, city) for city in cities] or [_Scan(site, None)]
        return scans

    def _read(self, product: Any, site: Site, done: set[str]) -> dict[str, Any] | Bad | None:
        """The product as an event, a `Bad`, or None (seen already, or filtered out)."""
        ident = _product_id(product)
        if ident is not None and ident in done:
            self.stats["duplicates"] += 1
            return None
        if ident is not None:
            done.add(ident)
        try:
            event, starts = map_product(product, site)
        except (ValueError, TypeError, KeyError) as exc:
            return Bad(ident or "?", str(exc))
        if self.filters[site.web_id].refuses(event, starts):
            self.stats["filtered"] += 1
            return None
        return event

    async def _products(self, scan: _Scan) -> AsyncGenerator[Any, None]:
        """The products of one scan, page by page, until its end (see the module doc)."""
        pages: int | None = None  # the last totalPages announced: never trusted to stop
        for page in range(1, self.max_pages + 1):
            body = await self._page(scan, page, past_end=pages is not None and page > pages)
            products: list[Any] = body["products"] if body is not None else []
            ids = {i for i in map(_product_id, products) if i is not None}
            if not products or (ids and ids <= scan.seen):  # the end, or a repeat
                self._check_count(scan)
                return
            scan.seen |= ids
            scan.unnamed += sum(i is None for i in map(_product_id, products))
            pages = self._announced(scan, body or {}, pages)
            for product in products:
                yield product
        self.warn(
            f"{scan.label}: stopped at max_pages={self.max_pages} (totalPages said"
            f" {pages}); more events may remain: raise max_pages or narrow the dates"
        )

    def _announced(self, scan: _Scan, body: Mapping[str, Any], pages: int | None) -> int | None:
        """Note the scan's `totalResults` (first page) into `expected`; the `totalPages`
        this page announces (else the last one)."""
        total = body.get("totalResults")
        if scan.total is None and _count(total):
            scan.total = total
            self._expected = (self._expected or 0) + total
            if total > RESULT_CEILING:
                self.warn(
                    f"{scan.label}: {total} results announced; the site is said to return"
                    f" at most ~{RESULT_CEILING} per query: narrow the dates"
                )
        announced = body.get("totalPages")
        return announced if _count(announced) else pages

    def _check_count(self, scan: _Scan) -> None:
        """Warn when a scan ended short of what it announced (a page param ignored?)."""
        read = len(scan.seen) + scan.unnamed
        if scan.total is not None and read < scan.total:
            self.warn(
                f"{scan.label}: the pages ended after {read} of the {scan.total} products"
                " announced (totalResults); the site may be ignoring 'page' or capping results"
            )

    async def _page(self, scan: _Scan, page: int, *, past_end: bool) -> dict[str, Any] | None:
        """One page's answer (None: a refusal past the announced end, i.e. the end)."""
        query = {
            "webId": scan.site.web_id,
            "language": scan.site.language,
            "page": str(page),
            "top": str(self.page_size),
            "sort": "DateAsc",  # a stable order, so a resume skips what it saved
            **self.filters[scan.site.web_id].params(),
        }
        if scan.city:
            query["city_names"] = scan.city
        what = f"{scan.label} page {page}"
        url = f"{self.base_url}/v1/products?{urlencode(query)}"
        response = await self.upstream.request(
            "GET", url, limit_key=self.limit_key, what=what, headers=self.headers
        )
        self.stats["pages"] += 1
        if past_end and response.status in _PAST_END:
            return None
        if not response.ok:
            raise JobError(_refusal(what, response))
        body = response.json()
        if not isinstance(body, dict) or not isinstance(body.get("products"), list):
            raise UpstreamError(
                f"{what}: the answer has no 'products' list: {response.body[:200]!r}",
                status=response.status,
                url=response.url,
            )
        return body

    def warn(self, warning: str) -> None:
        """Keep a warning in the run's stats (the first few) and log it."""
        log.warning("%s", warning)
        keep_warning(self.stats, warning)


def _refusal(what: str, response: Response) -> str:
    detail = error_detail(response)
    if response.status == 403:
        return (
            f"{what}: Eventim answered 403 ({detail}); its bot protection is reported to"
            " block some clients and user agents per site: check 'user_agent' and 'web_ids'"
        )
    if response.status == 429:
        return f"{what}: still rate limited (429) after the retries; lower 'rate_limit'"
    return f"{what}: Eventim answered HTTP {response.status}: {detail}"


def _count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _product_id(product: Any) -> str | None:
    if not isinstance(product, dict):
        return None
    ident = product.get("productId")
    if isinstance(ident, bool) or not isinstance(ident, str | int) or ident == "":
        return None
    return str(ident)


def map_product(product: Any, site: Site) -> tuple[dict[str, Any], datetime]:
    """The normalised event of one product (docs/parsing.md) and its start in the offset
    the site gave. Raises ValueError/TypeError/KeyError saying what is wrong."""
    if not isinstance(product, dict):
        raise TypeError(f"a product must be an object, got {type(product).__name__}")
    ident = _product_id(product)
    if ident is None:
        raise ValueError("no productId")
    name = product.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError("no name")
    attributes = product.get("typeAttributes")
    live = attributes.get("liveEntertainment") if isinstance(attributes, dict) else None
    if not isinstance(live, dict):
        raise ValueError("no typeAttributes.liveEntertainment")
    starts = _instant(live.get("startDate"), "startDate")
    ends = _instant(live["endDate"], "endDate") if live.get("endDate") else None
    location = live.get("location") or {}
    if not isinstance(location, dict):
        raise TypeError("location must be an object")
    categories = _categories(product.get("categories") or [])
    city, postal = _text(location.get("city")), _text(location.get("postalCode"))
    event = {
        "source": SOURCE,
        "external_id": ident,
        "title": name.strip(),
        "starts_at": _utc(starts),
        "ends_at": _utc(ends) if ends else None,
        "timezone": _offset(starts),
        "venue": _text(location.get("name")),
        "address": " ".join(p for p in (postal, city) if p) or None,
        "city": city,
        "country": site.country,
        **_coordinates(location.get("geoLocation")),
        "category": categories[0] if categories else None,
        "categories": categories,
        "price_min": _price(product.get("price")),
        "price_max": None,  # a product carries one ("from") price
        "currency": _text(product.get("currency")),
        "sale_status": _sale_status(product),
        "event_status": _EVENT_STATUS.get(str(product.get("status")).casefold()),
        "url": _link(product),
        "image": _text(product.get("imageUrl")),
        "raw": product,
    }
    return event, starts


def _instant(value: Any, what: str) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"no {what}")
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not an ISO-8601 date-time") from None
    if when.utcoffset() is None:
        raise ValueError(f"{what} {value!r} has no UTC offset: its instant is unknown")
    return when


def _utc(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")  # as every parser writes it


def _offset(when: datetime) -> str:
    """The offset the site gave, as "+02:00"."""
    delta = when.utcoffset() or timedelta(0)
    minutes = int(delta.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def _text(value: Any) -> str | None:
    return value.strip() or None if isinstance(value, str) else None


def _coordinates(geo: Any) -> dict[str, float | None]:
    """`latitude` and `longitude` from `geoLocation` (on ~60% of products), else None."""
    found: dict[str, float | None] = {"latitude": None, "longitude": None}
    if isinstance(geo, dict):
        lat, lon = _number(geo.get("latitude")), _number(geo.get("longitude"))
        if lat is not None and lon is not None and abs(lat) <= 90 and abs(lon) <= 180:
            found.update(latitude=lat, longitude=lon)
    return found


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else None


def _categories(raw: Any) -> list[str]:
    """Category names, each followed by its parent's, in the product's order."""
    names: list[str] = []
    for category in raw if isinstance(raw, list) else []:
        if not isinstance(category, dict):
            continue
        parent = category.get("parentCategory")
        for name in (
            category.get("name"),
            parent.get("name") if isinstance(parent, dict) else None,
        ):
            if isinstance(name, str) and name and name not in names:
                names.append(name)
    return names


def _price(value: Any) -> float | None:
    """A JSON number; a numeric string is read too (one client typed price a string).
    Anything else is no price (the raw product keeps what was sent)."""
    if isinstance(value, str):
        try:
            value = float(value.strip().replace(",", "."))
        except ValueError:
            return None
    price = _number(value)
    return price if price is not None and 0 <= price < float("inf") else None


def _sale_status(product: Mapping[str, Any]) -> str | None:
    status = product.get("status")
    if isinstance(status, str) and status.strip():
        snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", status.strip()).lower()  # SoldOut
        return _SALE_STATUS.get(snake, snake)
    stock = product.get("inStock")
    return None if not isinstance(stock, bool) else "on_sale" if stock else "sold_out"


def _link(product: Mapping[str, Any]) -> str | None:
    link = product.get("link")
    if isinstance(link, str) and link.startswith(("https://", "http://")):
        return link
    url = product.get("url")
    if isinstance(url, dict) and isinstance(url.get("domain"), str):
        path = url.get("path") if isinstance(url.get("path"), str) else ""
        return f"https://{url['domain']}{path}"
    return None
