"""Events from the schema.org markup of listing pages: JSON-LD and microdata, any site.

A listing is a URL, paged when it holds `{page}`. Each page is parsed once with lxml;
`extruct` (Zyte's maintained extractor) reads its microdata and each of its JSON-LD
blocks on its own, so one block that is not valid JSON fails the events of that block
(a `Bad`), never the page or the run. Every `Event` (or subtype, or with `untyped`,
an object with a `startDate` and a `url` or `name`) found anywhere in a block or an
item (`@graph`, lists, `ItemList`s, `subEvent`s) becomes one normalised event
(schema_org_map.py, docs/parsing.md); one that cannot be read is a `Bad`.

Paging trusts nothing the page says: a listing ends on an empty page (no event and
no broken block), a repeat (the same bytes, or only events this listing already
served, e.g. a site serving its last page for any page past the end), a 404 or 410
past its first page, or `max_pages` (a warning). Fields the markup does not carry
(a city, a category, a price) come from configured CSS or XPath selectors, so a site
change is a configuration change; the markup wins where it has the field.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit, urlunsplit

import extruct  # type: ignore[import-untyped]
import lxml.etree
import lxml.html
from cssselect import SelectorError
from extruct.jsonld import JsonLdExtractor  # type: ignore[import-untyped]
from lxml.cssselect import CSSSelector

from ..errors import JobError
from ..parsing import Bad, keep_warning
from ..robots import Disallowed, Fetcher, ensure_allowed
from ..upstream import Response, Upstream, error_detail
from .schema_org_map import Defaults, Found, Listing, identity, map_event, walk

log = logging.getLogger(__name__)

FIELDS = ("title", "venue", "address", "city", "country", "category", "price", "image", "url")
_JSON_LD = lxml.etree.XPath('//script[@type="application/ld+json"]')

Keep = Callable[[Mapping[str, Any], datetime, Listing], str | None]


@dataclass(frozen=True)
class Selector:
    """Where one field is found in the HTML: CSS or XPath, the text (or `attr`, or a
    `<meta>`'s content) of the first match, within the event's card or the page."""

    name: str
    expression: str
    kind: Literal["css", "xpath"] = "css"
    attr: str | None = None
    scope: Literal["event", "page"] = "event"
    compiled: Callable[[Any], Any] = field(compare=False, repr=False, default=lambda _: [])

    @classmethod
    def parse(cls, name: str, spec: Any) -> Selector:
        """From a config value: a CSS selector, or `{css | xpath, attr, scope}`.
        ValueError names `selectors.<name>`."""
        where = f"'selectors.{name}'"
        if isinstance(spec, str):
            spec = {"css": spec}
        if not isinstance(spec, Mapping) or set(spec) - {"css", "xpath", "attr", "scope"}:
            raise ValueError(
                f"{where} must be a CSS selector or a table {{css|xpath, attr, scope}}"
            )
        kinds = [k for k in ("css", "xpath") if k in spec]
        if len(kinds) != 1 or not isinstance(spec[kinds[0]], str) or not spec[kinds[0]].strip():
            raise ValueError(f"{where} needs exactly one of 'css' or 'xpath', a non-empty string")
        kind: Literal["css", "xpath"] = "css" if kinds[0] == "css" else "xpath"
        attr, scope = spec.get("attr"), spec.get("scope", "event")
        if attr is not None and (not isinstance(attr, str) or not attr):
            raise ValueError(f"{where}.attr must be an attribute name")
        if scope not in ("event", "page") or (name == "card" and scope != "event"):
            raise ValueError(f"{where}.scope must be 'event' or 'page' (the card: 'event')")
        expression = spec[kind].strip()
        try:
            compiled: Callable[[Any], Any] = (
                CSSSelector(expression, translator="html")
                if kind == "css"
                else lxml.etree.XPath(expression)
            )
        except (SelectorError, lxml.etree.XPathSyntaxError) as exc:
            raise ValueError(f"{where}: {kind} {expression!r} does not compile: {exc}") from None
        return cls(name, expression, kind, attr, "page" if scope == "page" else "event", compiled)

    def elements(self, root: Any) -> list[Any]:
        found = self.compiled(root)
        return found if isinstance(found, list) else [found]

    def value(self, root: Any) -> str | None:
        """The first non-empty value the selector finds under `root`."""
        for hit in self.elements(root):
            if isinstance(hit, lxml.etree._Element):
                if self.attr:
                    text = hit.get(self.attr)
                elif hit.tag == "meta":
                    text = hit.get("content")
                else:
                    text = hit.xpath("string()")
            else:
                text = str(hit)  # an XPath string, attribute or number
            text = " ".join(str(text or "").split())
            if text:
                return text
        return None


@dataclass(frozen=True)
class Selectors:
    """The configured selectors: `card` (the element holding one event) and fields."""

    card: Selector | None = None
    fields: tuple[Selector, ...] = ()

    @classmethod
    def parse(cls, table: Any) -> Selectors:
        if not isinstance(table, Mapping):
            raise ValueError("'selectors' must be a table {field = \"css\", ...}")
        unknown = sorted(set(table) - {"card", *FIELDS})
        if unknown:
            raise ValueError(
                f"'selectors.{unknown[0]}' is not a field a selector can fill"
                f" ({', '.join(('card', *FIELDS))})"
            )
        card = Selector.parse("card", table["card"]) if "card" in table else None
        found = tuple(Selector.parse(name, table[name]) for name in FIELDS if name in table)
        return cls(card, found)


@dataclass
class Page:
    """One listing page as read: the schema.org events found, the blocks that could
    not be read, and what selectors search."""

    url: str
    digest: str
    tree: Any = None
    found: list[Found] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.found and not self.broken


def read_page(body: bytes, url: str, *, charset: str | None = None, untyped: bool = False) -> Page:
    """Parse a page and find its events: each JSON-LD block on its own, then microdata."""
    page = Page(url, hashlib.sha256(body).hexdigest())
    parser = lxml.html.HTMLParser(encoding=charset) if charset else None
    try:
        page.tree = lxml.html.document_fromstring(body, parser=parser, base_url=url)
    except (lxml.etree.ParserError, ValueError):
        return page  # no document at all: an empty page
    blocks = _JSON_LD(page.tree)
    assert isinstance(blocks, list)
    for number, block in enumerate(blocks, 1):
        where = f"JSON-LD block {number} of {len(blocks)}"
        try:
            items = JsonLdExtractor().extract_items(block)
        except (ValueError, RecursionError) as exc:
            page.broken.append(f"{url}: {where} is not valid JSON ({exc})")
            continue
        page.found += walk(items, where=where, untyped=untyped)
    try:
        items = extruct.extract(
            page.tree, base_url=url, syntaxes=["microdata"], uniform=True, return_html_node=True
        )["microdata"]
    except Exception as exc:  # isolation: one page's microdata, whatever the extractor raises
        log.warning("microdata of %s not read", url, exc_info=True)
        page.broken.append(f"{url}: its microdata could not be read ({type(exc).__name__}: {exc})")
    else:
        page.found += walk(items, where="microdata", untyped=untyped)
    return page


class _Cards:
    """The cards of a page (the `card` selector's elements) and the event each holds:
    a microdata event by its element, a JSON-LD one by a link to its URL."""

    def __init__(self, page: Page, card: Selector | None) -> None:
        self.cards = card.elements(page.tree) if card and page.tree is not None else []
        self.ids = {id(c) for c in self.cards}
        self.by_link: dict[str, Any] = {}
        for each in self.cards:
            for link in each.iter("a"):
                href = link.get("href")
                if href:
                    self.by_link.setdefault(_absolute(href, page.url), each)

    def of(self, found: Found, url: str | None) -> Any:
        if found.element is not None:
            for element in (found.element, *found.element.iterancestors()):
                if id(element) in self.ids:
                    return element
            return found.element
        return self.by_link.get(url.split("#")[0]) if url else None


class _Once:
    """A `Fetcher` asking each URL once a run: an origin's robots.txt is read once."""

    def __init__(self, client: Fetcher) -> None:
        self.client = client
        self.answers: dict[str, Response] = {}

    async def request(
        self,
        method: str,
        url: str,
        *,
        limit_key: str | None = None,
        what: str | None = None,
        **kwargs: Any,
    ) -> Response:
        if url not in self.answers:
            self.answers[url] = await self.client.request(
                method, url, limit_key=limit_key, what=what, **kwargs
            )
        return self.answers[url]


class SchemaOrgEvents:
    """The events of the listings, in listing and page order: an `EventSource`.

    `keep` says why an event is left out (None: kept); `stats` is the run's (mutated:
    pages, duplicates, filtered, warnings); `limit_key` names the rate-limit key of a URL.
    """

    def __init__(
        self,
        *,
        upstream: Upstream,
        listings: Sequence[Listing],
        defaults: Defaults,
        selectors: Selectors,
        keep: Keep,
        stats: MutableMapping[str, Any],
        limit_key: Callable[[str], str],
        user_agent: str,
        first_page: int = 1,
        max_pages: int = 20,
        untyped: bool = False,
        respect_robots: bool = True,
    ) -> None:
        self.upstream = upstream
        self.listings = list(listings)
        self.defaults = defaults
        self.selectors = selectors
        self.keep = keep
        self.stats = stats
        self.limit_key = limit_key
        self.headers = {"User-Agent": user_agent, "Accept": "text/html,application/xhtml+xml"}
        self.first_page = first_page
        self.max_pages = max_pages
        self.untyped = untyped
        self.robots: _Once | None = _Once(upstream) if respect_robots else None
        self.missing: list[str] = []
        for key in ("pages", "duplicates", "filtered"):
            stats[key] = 0  # a resumed run reads the site again from the start
        stats.setdefault("warnings", [])

    @property
    def expected(self) -> int | None:
        return None  # a listing does not say how many events it holds

    async def events(self) -> AsyncGenerator[dict[str, Any] | Bad, None]:
        for listing in self.listings:  # every listing's rules first: a refusal reads nothing
            await self._allowed(listing.page_url(self.first_page))
        done: dict[str, str] = {}  # external id -> start, for every event yielded
        for listing in self.listings:
            async for outcome in self._listing(listing, done):
                yield outcome
        if self.listings and len(self.missing) == len(self.listings):
            raise JobError(
                f"none of the {len(self.listings)} listings could be read: {self.missing[0]}"
                " (and the same for every other): check the listing URLs"
            )

    async def _allowed(self, url: str) -> None:
        if self.robots is not None:
            agent = self.headers["User-Agent"]
            await ensure_allowed(self.robots, url, agent=agent, limit_key=self.limit_key(url))

    async def _listing(
        self, listing: Listing, done: dict[str, str]
    ) -> AsyncGenerator[dict[str, Any] | Bad, None]:
        seen: set[str] = set()  # the ids this listing served: a page of only these repeats
        digests: set[str] = set()
        last = self.first_page + (self.max_pages if listing.paged else 1)
        for number in range(self.first_page, last):
            url = listing.page_url(number)
            if number > self.first_page:
                try:
                    await self._allowed(url)
                except Disallowed as exc:
                    self.warn(f"{listing.label}: page {number} not read: {exc}")
                    return
            page = await self._fetch(listing, url, number)
            if page is None or page.empty or page.digest in digests:
                return
            digests.add(page.digest)
            outcomes = list(self._read(page, listing))
            ids = {o[0]["external_id"] for o in outcomes if isinstance(o, tuple)}
            if ids and ids <= seen:
                return  # only events this listing served already: a repeated page
            seen |= ids
            for reason in page.broken:
                yield Bad("?", reason)
            for outcome in outcomes:
                if isinstance(outcome, Bad):
                    yield outcome
                elif (event := self._admit(*outcome, listing, done)) is not None:
                    yield event
        if listing.paged:
            self.warn(
                f"{listing.label}: stopped at max_pages={self.max_pages}; more events may"
                " remain: raise max_pages"
            )

    def _read(
        self, page: Page, listing: Listing
    ) -> Iterator[tuple[dict[str, Any], datetime] | Bad]:
        cards = _Cards(page, self.selectors.card)
        for found in page.found:
            url = found.url(page.url)
            try:
                fill = self._fill(page, cards.of(found, url))
                yield map_event(
                    found, page_url=page.url, listing=listing, fill=fill, defaults=self.defaults
                )
            except (ValueError, TypeError, KeyError) as exc:
                known = identity(found, page.url, self.defaults) or "?"
                yield Bad(known, f"{found.where} on {page.url}: {exc}")

    def _fill(self, page: Page, card: Any) -> dict[str, str]:
        """What the selectors find for one event (in its card, or on the page)."""
        fill: dict[str, str] = {}
        for selector in self.selectors.fields:
            root = page.tree if selector.scope == "page" else card
            value = selector.value(root) if root is not None else None
            if value is not None:
                fill[selector.name] = value
        return fill

    def _admit(
        self, event: dict[str, Any], starts: datetime, listing: Listing, done: dict[str, str]
    ) -> dict[str, Any] | None:
        """The event unless seen already or filtered out. Two events with one id and two
        starts (sessions of one show under one URL) are both kept, the later one's id
        suffixed with `@<start>`."""
        key, start = event["external_id"], event["starts_at"]
        if key in done and done[key] != start:
            key = event["external_id"] = f"{key}@{start}"
        if key in done:
            self.stats["duplicates"] += 1
            return None
        done[key] = start
        if self.keep(event, starts, listing) is not None:
            self.stats["filtered"] += 1
            return None
        return event

    async def _fetch(self, listing: Listing, url: str, number: int) -> Page | None:
        """One page, or None: the listing has no such page (404/410)."""
        what = f"{listing.label} page {number}"
        response = await self.upstream.request(
            "GET", url, limit_key=self.limit_key(url), what=what, headers=self.headers
        )
        self.stats["pages"] += 1
        if response.status in (404, 410):
            if number == self.first_page:
                self.missing.append(f"{what} answered HTTP {response.status}")
                self.warn(f"{what}: HTTP {response.status}, the listing is skipped")
            return None
        if not response.ok:
            raise JobError(_refusal(what, response))
        return read_page(
            response.body, url, charset=_charset(response.headers), untyped=self.untyped
        )

    def warn(self, warning: str) -> None:
        """Keep a warning in the run's stats (the first few) and log it."""
        log.warning("%s", warning)
        keep_warning(self.stats, warning)


def _refusal(what: str, response: Response) -> str:
    if response.status == 429:
        return f"{what}: still rate limited (429) after the retries; lower 'rate_limit'"
    if response.status in (401, 403):
        return (
            f"{what}: the site answered {response.status} ({error_detail(response)}): it may"
            " refuse crawlers; check 'user_agent' and whether the site allows this"
        )
    return f"{what}: the site answered HTTP {response.status}: {error_detail(response)}"


def _charset(headers: Mapping[str, str]) -> str | None:
    """The charset a Content-Type names, if Python knows it (else lxml sniffs)."""
    for part in headers.get("Content-Type", "").split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.strip().lower() == "charset":
            try:
                return codecs.lookup(value.strip().strip("\"'")).name
            except LookupError:
                return None
    return None


def _absolute(href: str, base: str) -> str:
    """`href` resolved against `base`, without its fragment."""
    parts = urlsplit(urljoin(base, href.strip()))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, ""))
