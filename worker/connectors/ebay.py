"""eBay Browse API: item summaries per query term for a set of sellers.

OAuth client-credentials token from {base}/identity/v1/oauth2/token (cached until
shortly before `expires_in`), then GET {base}/buy/browse/v1/item_summary/search
with q, filter=sellers:{…}, limit and offset. Items are deduplicated by itemId
across queries.

The contract is eBay's OpenAPI document for the Browse API (v1.20.4):

- a query is paged while the answer carries `next`; `total` is "just an
  indicator" that eBay says not to page by, so it is only shown as an estimate;
- `offset` must be below 10 000 and a multiple of `limit` (1..200): a query that
  reaches the 10 000th result cannot be paged further, which is warned about and
  makes the pass incomplete (so nothing is marked gone);
- `warnings[]` in a 200 answer (an unknown seller, for one) go on the run;
- `price.value` is a string, kept as the exact decimal it spells;
- an item summary has no `gtin` (item details do).

`details()` is `GET {base}/buy/browse/v1/item/{item_id}` (getItem, no fieldgroups:
the default answer carries `gtin`, `mpn`, `brand` and `localizedAspects`). getItem
has no compatibility rows, and `check_compatibility` only answers whether one named
vehicle fits, so `Details.compatibility` stays None.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from ..catalog import Item, text, to_decimal
from ..errors import ItemGone, UpstreamError
from ..upstream import Response, Upstream, error_detail
from .base import Details, Page, map_all

SCOPE = "https://api.ebay.com/oauth/api_scope"
MAX_LIMIT = 200
MAX_RESULTS = 10_000  # results eBay shows of one query: offset must stay below it
MAX_QUERY_CHARS = 100  # eBay cuts a longer q, so it would search for another term
MAX_SELLERS = 250  # in one sellers:{…} filter (error 12032 beyond)
PRICE_PLACES = 4  # products.price is numeric(14, 4): more decimals would be rounded
_PRICE_STEP = Decimal(1).scaleb(-PRICE_PLACES)
ITEM_NOT_FOUND = 11001  # getItem: "The specified item ID was not found."
_GTIN = re.compile(r"\d{8}|\d{12,14}")  # GTIN-8, UPC-A (12), EAN-13, GTIN-14
# What sellers enter for an identifier a part does not have (eBay's convention for
# item specifics); it names no MPN or brand, so it is not stored as one.
_NOT_GIVEN = frozenset({"does not apply", "n/a"})


def last_offset(limit: int) -> int:
    """The highest offset eBay serves for `limit`: its last multiple below 10 000."""
    return (MAX_RESULTS - 1) // limit * limit


@dataclass
class _Token:
    value: str
    expires_at: float  # monotonic


class TokenCache:
    """Application tokens per (token URL, client id), shared by the runs of a process."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.issued = 0

    async def get(
        self, upstream: Upstream, *, url: str, client_id: str, secret: str, limit_key: str
    ) -> str:
        key = (url, client_id)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            if cached is not None and time.monotonic() < cached.expires_at:
                return cached.value
            response = await upstream.request(
                "POST",
                url,
                limit_key=limit_key,
                headers={"Authorization": aiohttp.encode_basic_auth(client_id, secret)},
                data={"grant_type": "client_credentials", "scope": SCOPE},
            )
            body = response.json() if response.body else {}
            if not response.ok or not isinstance(body, dict) or "access_token" not in body:
                why = (
                    body.get("error_description") or body.get("error")
                    if isinstance(body, dict)
                    else ""
                )
                raise UpstreamError(
                    f"eBay OAuth token request failed (HTTP {response.status}): {why or body}",
                    status=response.status,
                    url=url,
                )
            lifetime = float(body.get("expires_in", 7200))
            # Refresh a minute early, or a tenth of the lifetime for short-lived tokens.
            margin = min(60.0, lifetime / 10)
            self._tokens[key] = _Token(
                str(body["access_token"]), time.monotonic() + lifetime - margin
            )
            self.issued += 1
            return self._tokens[key].value

    def forget(self, url: str, client_id: str) -> None:
        self._tokens.pop((url, client_id), None)


class EbayCatalog:
    """Pages of item summaries; cursor {"query": index into queries, "offset": n}."""

    source = "ebay"

    def __init__(
        self,
        *,
        upstream: Upstream,
        tokens: TokenCache,
        base_url: str,
        account: str,
        client_id: str,
        client_secret: str,
        marketplace_id: str,
        sellers: Sequence[str],
        queries: Sequence[str],
        limit: int = MAX_LIMIT,
        limit_key: str | None = None,
    ) -> None:
        self.upstream = upstream
        self.tokens = tokens
        self.base_url = base_url.rstrip("/")
        self.token_url = f"{self.base_url}/identity/v1/oauth2/token"
        self.account = account
        self.client_id = client_id
        self.client_secret = client_secret
        self.marketplace_id = marketplace_id
        self.sellers = list(sellers)
        self.queries = list(queries)
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"eBay limit must be 1..{MAX_LIMIT}, got {limit}")
        self.limit = limit
        self.last_offset = last_offset(limit)
        self.limit_key = limit_key or f"ebay:{account}"
        self._complete = False
        self._truncated = False
        self._seen: set[str] = set()

    @property
    def complete(self) -> bool:
        return self._complete and not self._truncated

    async def pages(self, cursor: Any) -> AsyncGenerator[Page, None]:
        q_index, offset = self._start(cursor)
        while q_index < len(self.queries):
            term = self.queries[q_index]
            body = await self._search(term, offset)
            summaries = body.get("itemSummaries") or []
            if not isinstance(summaries, list):
                raise UpstreamError(f"eBay search {term!r}: itemSummaries is not a list")
            following = next_offset(body, offset=offset, limit=self.limit, term=term)
            estimate = _estimate(body)
            warnings = _warnings(body)
            if offset + len(summaries) >= MAX_RESULTS or (
                following is not None and following > self.last_offset
            ):
                # eBay shows no result past the 10 000th, whatever `next` or `total` say
                # (and whether or not it still offers `next` there is not documented).
                following = None
                self._truncated = True
                about = "no estimate" if estimate is None else f"eBay estimates {estimate} matches"
                warnings.append(
                    f"query {term!r} reached eBay's cap of {MAX_RESULTS} results per query"
                    f" ({about}): results past it were not fetched; split it into narrower"
                    " queries"
                )
            items, failed = self._map(summaries)
            page = offset // self.limit + 1
            label = (
                f"query {q_index + 1}/{len(self.queries)} {term!r},"
                f" page {page} of ~{self._pages(estimate, page, more=following is not None)}"
            )
            if following is not None:
                offset = following
                cursor = {"query": q_index, "offset": offset}
            else:
                q_index, offset = q_index + 1, 0
                cursor = {"query": q_index, "offset": 0} if q_index < len(self.queries) else None
            yield Page(items=items, failed=failed, cursor=cursor, label=label, warnings=warnings)
        self._complete = True

    def _start(self, cursor: Any) -> tuple[int, int]:
        """(query index, offset) to start from; a stored offset eBay would refuse (the
        params changed since) restarts that query, which only re-reads unchanged items."""
        if not isinstance(cursor, Mapping):
            return 0, 0
        q_index, offset = int(cursor.get("query", 0)), int(cursor.get("offset", 0))
        if not 0 <= offset <= self.last_offset or offset % self.limit:
            offset = 0
        return q_index, offset

    def _pages(self, estimate: int | None, page: int, *, more: bool) -> int:
        """The page count `total` suggests, never below the pages known to exist."""
        guess = -(-min(estimate or 0, MAX_RESULTS) // self.limit)
        return max(guess, page + 1 if more else page)

    def _map(self, summaries: list[Any]) -> tuple[list[Item], list[tuple[str, str]]]:
        items, failed = map_all(summaries, map_summary, id_field="itemId")
        fresh = [item for item in items if item.external_id not in self._seen]
        # Items found by an earlier query of this pass are not stored again.
        self._seen.update(item.external_id for item in fresh)
        return fresh, failed

    async def _search(self, term: str, offset: int) -> dict[str, Any]:
        params = {"q": term, "limit": str(self.limit), "offset": str(offset)}
        if self.sellers:
            params["filter"] = "sellers:{" + "|".join(self.sellers) + "}"
        response = await self._get(
            f"{self.base_url}/buy/browse/v1/item_summary/search",
            what=f"query {term!r}, page {offset // self.limit + 1}",
            params=params,
        )
        return _body(response, term)

    async def details(self, external_id: str) -> Details:
        """One item's getItem answer, mapped; raises ItemGone for an item eBay no
        longer has, UpstreamError with eBay's error for any other failure."""
        url = f"{self.base_url}/buy/browse/v1/item/{quote(external_id, safe='')}"
        response = await self._get(url, what=f"item {external_id}")
        if not response.ok:
            detail = error_detail(response)
            error = ItemGone if item_gone(response) else UpstreamError
            raise error(
                f"eBay item {external_id} failed (HTTP {response.status}): {detail}",
                status=response.status,
                url=response.url,
            )
        body = response.json()
        if not isinstance(body, dict):
            raise UpstreamError(f"eBay item {external_id}: the answer is not a JSON object")
        return map_details(external_id, body)

    async def _get(
        self, url: str, *, what: str, params: Mapping[str, str] | None = None
    ) -> Response:
        """GET with the application token, renewed once when eBay rejects it early."""
        for attempt in range(2):
            token = await self.tokens.get(
                self.upstream,
                url=self.token_url,
                client_id=self.client_id,
                secret=self.client_secret,
                limit_key=self.limit_key,
            )
            response = await self.upstream.request(
                "GET",
                url,
                what=what,
                limit_key=self.limit_key,
                params=params,
                headers={
                    "Authorization": f"Bearer {token}",
                    "X-EBAY-C-MARKETPLACE-ID": self.marketplace_id,
                },
            )
            if response.status == 401 and attempt == 0:
                self.tokens.forget(self.token_url, self.client_id)  # expired early: renew once
                continue
            return response
        raise AssertionError("unreachable")


def map_details(external_id: str, body: Mapping[str, Any]) -> Details:
    """getItem's `Item` as Details: `gtin` -> ean (only a GTIN's digits), `mpn`,
    `brand`, `localizedAspects` -> aspects; the whole answer is kept as raw.

    `localizedAspects` is a list of TypedNameValue {name, type, value}. `value` is a
    string even for type STRING_ARRAY, and the document does not say how such an array
    is spelled in it, so each value is kept as sent (never split on commas); a name
    given more than once collects its values in order.
    """
    aspects: dict[str, list[str]] = {}
    listed = body.get("localizedAspects")
    for aspect in listed if isinstance(listed, list) else ():
        if not isinstance(aspect, Mapping):
            continue
        name, value = text(aspect.get("name")), text(aspect.get("value"))
        if name is None or value is None:
            continue
        values = aspects.setdefault(name, [])
        if value not in values:
            values.append(value)
    gtin = (text(body.get("gtin")) or "").strip()
    return Details(
        external_id=external_id,
        ean=gtin if _GTIN.fullmatch(gtin) else None,
        mpn=_given(body.get("mpn")),
        brand=_given(body.get("brand")),
        aspects=aspects,
        compatibility=None,  # getItem carries no compatibility rows (see the module doc)
        raw=dict(body),
    )


def _given(value: Any) -> str | None:
    """A text identifier, or None when absent or the seller's "Does not apply"."""
    found = (text(value) or "").strip()
    return None if not found or found.casefold() in _NOT_GIVEN else found


def item_gone(response: Response) -> bool:
    """Whether a failed getItem says the item does not exist: errorId 11001.

    eBay sends it with HTTP 404; the document lists it under 400, so the status is not
    looked at. A 404 without it (a proxy's, or a wrong base URL) is not taken for an
    ended item: nothing is given up on because of a misrouted request.
    """
    try:
        body = response.json()
    except UpstreamError:
        return False
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list):
        return False
    return any(isinstance(e, Mapping) and e.get("errorId") == ITEM_NOT_FOUND for e in errors)


def next_offset(body: Mapping[str, Any], *, offset: int, limit: int, term: str) -> int | None:
    """The offset of the next page, or None when the answer has no `next`.

    `next` is a URL; only its offset is taken (the document's own example of it names
    another path and parameter), and the request is built as every other one. A
    `next` without an offset means the following page, `offset + limit`.
    """
    link = body.get("next")
    if not link:
        return None
    raw = URL(str(link)).query.get("offset")
    try:
        following = offset + limit if raw is None else int(raw)
    except ValueError:
        following = -1
    if following <= offset or following % limit:
        raise UpstreamError(
            f"eBay search {term!r}: cannot follow next={link!r} from offset {offset}"
            f" (the next offset must be a later multiple of limit={limit})"
        )
    return following


def _estimate(body: Mapping[str, Any]) -> int | None:
    total = body.get("total")
    return total if isinstance(total, int) and not isinstance(total, bool) else None


def _warnings(body: Mapping[str, Any]) -> list[str]:
    """The answer's `warnings[]` (Error objects, as in `errors`) as run warnings."""
    raw = body.get("warnings")
    if not raw:
        return []
    return [f"eBay warning {_describe(w)}" for w in (raw if isinstance(raw, list) else [raw])]


def _describe(error: Any) -> str:
    if not isinstance(error, Mapping):
        return str(error)
    described = f"{error.get('errorId')}: {error.get('message') or error.get('longMessage')}"
    parameters = error.get("parameters")
    if isinstance(parameters, list):
        named = [f"{p.get('name')}={p.get('value')}" for p in parameters if isinstance(p, Mapping)]
        if named:
            described += f" ({', '.join(named)})"
    return described


def _body(response: Response, term: str) -> dict[str, Any]:
    if not response.ok:
        raise UpstreamError(
            f"eBay search {term!r} failed (HTTP {response.status}): {error_detail(response)}",
            status=response.status,
            url=response.url,
        )
    body = response.json()
    if not isinstance(body, dict):
        raise UpstreamError(f"eBay search {term!r}: the answer is not a JSON object")
    return body


def map_summary(raw: Any) -> Item:
    if not isinstance(raw, dict):
        raise TypeError(f"item summary is a {type(raw).__name__}, not an object")
    ident = raw.get("itemId")
    if not ident:
        raise ValueError("item summary has no itemId")
    price_field = raw.get("price")
    price: dict[str, Any] = price_field if isinstance(price_field, dict) else {}
    return Item(
        external_id=str(ident),
        raw=raw,
        name=text(raw.get("title")),
        sku=None,  # item summaries carry no seller SKU; the raw item is kept
        ean=None,  # ItemSummary has no gtin: only an item's details carry it
        price=exact_price(price.get("value")),
        currency=text(price.get("currency")),
        stock=None,
        status=None,
        url=text(raw.get("itemWebUrl")),
    )


def exact_price(value: Any) -> Decimal | None:
    """`price.value` as the exact decimal its string spells; None when absent.

    The document types it a string. A JSON number has been through binary floating
    point before any code sees it, and more decimals than the price column keeps would
    be rounded by it: neither is stored as a price (the item is counted failed).
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"price.value {value!r} is not a string (eBay sends it as one)")
    number = to_decimal(value)  # also refuses what is not a number or out of range
    if number is not None and number.quantize(_PRICE_STEP) != number:
        raise ValueError(f"price {value!r} has more than {PRICE_PLACES} decimal places")
    return number
