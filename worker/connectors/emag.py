"""eMAG Marketplace API (v4.4.x): product offers, paged with product_offer/count + read.

POST {base}/product_offer/count and /read with {"data": {"currentPage", "itemsPerPage"}}
(100 at most), HTTP Basic auth, the {"isError", "messages", "results"} envelope.
Real responses differ from the docs (prices as strings, `stock` as a list), so items
are mapped defensively and the raw item is always kept. Limit: 3 requests/s per
account across all non-order resources, so the limiter key is the account.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import aiohttp

from ..catalog import Item, text, to_count, to_decimal
from ..errors import UpstreamError
from ..upstream import Response, Upstream, error_detail
from .base import Page, map_all

PLATFORMS = {
    "ro": "https://marketplace-api.emag.ro/api-3",
    "bg": "https://marketplace-api.emag.bg/api-3",
    "hu": "https://marketplace-api.emag.hu/api-3",
    "fd-ro": "https://marketplace-ro-api.fashiondays.com/api-3",
    "fd-bg": "https://marketplace-bg-api.fashiondays.com/api-3",
}
MAX_PER_PAGE = 100
_STATUS = {"0": "inactive", "1": "active", "2": "end_of_life"}


class EmagOffers:
    """Pages of one account's offers on one platform; cursor {"page": next page}."""

    source = "emag"

    def __init__(
        self,
        *,
        upstream: Upstream,
        base_url: str,
        account: str,
        username: str,
        password: str,
        items_per_page: int = MAX_PER_PAGE,
        prefetch: int = 2,
        limit_key: str | None = None,
    ) -> None:
        self.upstream = upstream
        self.base_url = base_url.rstrip("/")
        self.account = account
        self.auth_header = {"Authorization": aiohttp.encode_basic_auth(username, password)}
        self.per_page = items_per_page
        self.prefetch = max(1, prefetch)
        self.limit_key = limit_key or f"emag:{account}"
        self._complete = False

    @property
    def complete(self) -> bool:
        return self._complete

    async def pages(self, cursor: Any) -> AsyncGenerator[Page, None]:
        start = int(cursor["page"]) if isinstance(cursor, Mapping) and "page" in cursor else 1
        counted = await self._call("product_offer/count", {"itemsPerPage": self.per_page})
        total_items = _int(counted.get("noOfItems"), 0)
        total_pages = _int(counted.get("noOfPages"), -(-total_items // self.per_page))
        if start > total_pages:
            self._complete = True
            return
        # A small window of pages in flight; under the rate limit it changes nothing,
        # with the limit lifted it hides the round trip.
        window: deque[asyncio.Task[list[Any]]] = deque()
        next_page = start
        try:
            while window or next_page <= total_pages:
                while next_page <= total_pages and len(window) < self.prefetch:
                    window.append(asyncio.create_task(self._read(next_page)))
                    next_page += 1
                page_no = next_page - len(window)
                results = await window.popleft()
                last = page_no >= total_pages or len(results) < self.per_page
                items, failed = map_all(results, map_offer, id_field="id")
                yield Page(
                    items=items,
                    failed=failed,
                    cursor=None if last else {"page": page_no + 1},
                    total=total_items,
                    label=f"page {page_no}/{total_pages}",
                )
                if last:
                    self._complete = True
                    return
        finally:
            for task in window:
                task.cancel()

    async def _read(self, page: int) -> list[Any]:
        results = await self._call(
            "product_offer/read",
            {"currentPage": page, "itemsPerPage": self.per_page},
            what=f"page {page}",
        )
        if not isinstance(results, list):
            raise UpstreamError(f"eMAG product_offer/read page {page}: results is not a list")
        return results

    async def _call(self, action: str, data: Mapping[str, Any], *, what: str = "") -> Any:
        url = f"{self.base_url}/{action}"
        response = await self.upstream.request(
            "POST",
            url,
            what=what or action,
            limit_key=self.limit_key,
            json={"data": dict(data)},
            headers=self.auth_header,
        )
        body = _envelope(response)
        return body.get("results")


def _envelope(response: Response) -> dict[str, Any]:
    """The parsed envelope, or an UpstreamError that shows what eMAG said."""
    if response.status in (401, 403):
        raise UpstreamError(
            f"eMAG refused the credentials (HTTP {response.status}) at {response.url}",
            status=response.status,
            url=response.url,
        )
    if not response.ok:
        raise UpstreamError(
            f"eMAG answered HTTP {response.status} at {response.url}: {error_detail(response)}",
            status=response.status,
            url=response.url,
        )
    body = response.json()
    if not isinstance(body, dict) or "isError" not in body:
        raise UpstreamError(
            f"eMAG answered without an envelope at {response.url}", url=response.url
        )
    if body["isError"]:
        messages = body.get("messages") or ["(no message)"]
        text = "; ".join(m if isinstance(m, str) else str(m) for m in messages)
        raise UpstreamError(f"eMAG isError at {response.url}: {text}", url=response.url)
    return body


def map_offer(raw: Any) -> Item:
    """One offer as an Item. Kept flat: it runs for every item of every page."""
    if not isinstance(raw, dict):
        raise TypeError(f"offer is a {type(raw).__name__}, not an object")
    get = raw.get
    ident = get("id")
    if ident is None or ident == "":
        raise ValueError("offer has no id")
    status = get("status")
    ean = get("ean")
    if isinstance(ean, list):
        ean = ean[0] if ean else None
    return Item(
        external_id=str(ident),
        raw=raw,
        name=text(get("name")),
        sku=text(get("part_number")),
        ean=text(ean),
        price=to_decimal(get("sale_price")),
        currency=text(get("currency")),
        stock=_stock(raw),
        status=_STATUS.get(str(status), str(status)) if status is not None else None,
        url=text(get("url")),
    )


def _stock(raw: Mapping[str, Any]) -> int | None:
    general = raw.get("general_stock")
    if general is not None and general != "":
        return to_count(general)
    stock = raw.get("stock")
    if isinstance(stock, list):
        return to_count(sum(int(s.get("value", 0)) for s in stock if isinstance(s, dict)))
    return to_count(stock)


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default
