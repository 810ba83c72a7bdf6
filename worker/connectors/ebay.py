"""eBay Browse API: item summaries per query term for a set of sellers.

OAuth client-credentials token from {base}/identity/v1/oauth2/token (cached until
shortly before `expires_in`), then GET {base}/buy/browse/v1/item_summary/search
with q, filter=sellers:{…}, limit (200 max) and offset paging. eBay pages at most
10 000 results per query: beyond that a query cannot be paged, which is warned
about and makes the pass incomplete (so nothing is marked gone). Items are
deduplicated by itemId across queries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..catalog import Item, text, to_decimal
from ..errors import UpstreamError
from ..upstream import Response, Upstream, error_detail
from .base import Page, map_all

SCOPE = "https://api.ebay.com/oauth/api_scope"
MAX_LIMIT = 200
MAX_RESULTS = 10_000


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
        self.limit = limit
        self.limit_key = limit_key or f"ebay:{account}"
        self._complete = False
        self._truncated = False
        self._seen: set[str] = set()

    @property
    def complete(self) -> bool:
        return self._complete and not self._truncated

    async def pages(self, cursor: Any) -> AsyncGenerator[Page, None]:
        q_index = int(cursor.get("query", 0)) if isinstance(cursor, Mapping) else 0
        offset = int(cursor.get("offset", 0)) if isinstance(cursor, Mapping) else 0
        while q_index < len(self.queries):
            term = self.queries[q_index]
            body = await self._search(term, offset)
            total = int(body.get("total", 0))
            summaries = body.get("itemSummaries") or []
            warnings = []
            next_offset = offset + self.limit
            has_more = next_offset < total and bool(summaries)
            if has_more and next_offset + self.limit > MAX_RESULTS:
                # eBay refuses offset + limit > 10 000: the rest of this query is out of reach.
                has_more = False
                self._truncated = True
                warnings.append(
                    f"query {term!r} matches {total} items; eBay pages only the first"
                    f" {MAX_RESULTS}, so {total - next_offset} were not fetched"
                )
            items, failed = self._map(summaries)
            pages = max(1, -(-min(total, MAX_RESULTS) // self.limit))
            label = (
                f"query {q_index + 1}/{len(self.queries)} {term!r},"
                f" page {offset // self.limit + 1}/{pages}"
            )
            if has_more:
                cursor = {"query": q_index, "offset": next_offset}
                offset = next_offset
            else:
                q_index, offset = q_index + 1, 0
                cursor = {"query": q_index, "offset": 0} if q_index < len(self.queries) else None
            yield Page(items=items, failed=failed, cursor=cursor, label=label, warnings=warnings)
        self._complete = True

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
        url = f"{self.base_url}/buy/browse/v1/item_summary/search"
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
                what=f"query {term!r}, page {offset // self.limit + 1}",
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
            return _body(response, term)
        raise AssertionError("unreachable")


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
        ean=text(raw.get("gtin")),
        price=to_decimal(price.get("value")),
        currency=text(price.get("currency")),
        stock=None,
        status=None,
        url=text(raw.get("itemWebUrl")),
    )
