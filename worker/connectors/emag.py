"""eMAG Marketplace API (v4.4.x): product offers, paged with product_offer/count + read.

From eMAG's document (v4.4.9): POST {base}/product_offer/count and /read with
{"data": {"currentPage", "itemsPerPage"}} (100 at most, §1.3), HTTP Basic auth, the
{"isError", "messages", "results"} envelope whose isError must be false (§1.4), and
3 requests/s per seller login across all non-order resources (§1.5), answered over
the limit with a 429 that has no envelope and no Retry-After.

The document never shows the count answer's body. Clients see
{"noOfItems": "38", "noOfPages": "1", "itemsPerPage": "100"}; anything the connector
cannot read as that fails the run, quoting the answer, rather than passing for an
empty catalogue (which `mark_gone` would take as every offer gone).

Real responses differ from the docs (prices as strings, `stock` as a list), so items
are mapped defensively and the raw item is always kept.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from ..catalog import Item, text, to_count, to_decimal
from ..errors import UpstreamError
from ..upstream import Response, Upstream, error_detail
from .base import Page, map_page

PLATFORMS = {
    "ro": "https://marketplace-api.emag.ro/api-3",
    "bg": "https://marketplace-api.emag.bg/api-3",
    "hu": "https://marketplace-api.emag.hu/api-3",
    "fd-ro": "https://marketplace-ro-api.fashiondays.com/api-3",
    "fd-bg": "https://marketplace-bg-api.fashiondays.com/api-3",
}
MAX_PER_PAGE = 100
QUOTED = 300  # characters of an answer quoted in an error
_STATUS = {"0": "inactive", "1": "active", "2": "end_of_life"}
_DIGITS = re.compile(r"[0-9]{1,18}")


@dataclass(frozen=True)
class Count:
    """What a product_offer/count answer announces: offers, and pages of our size."""

    items: int
    pages: int


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
        count = await self._count()
        total_items, total_pages = count.items, count.pages
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
                items, failed = await map_page(results, map_offer, id_field="id")
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

    async def _count(self) -> Count:
        """The count, or an UpstreamError quoting an answer that does not give one."""
        response, body = await self._call("product_offer/count", {"itemsPerPage": self.per_page})
        try:
            return read_count(body.get("results"), self.per_page)
        except ValueError as exc:
            raise UpstreamError(
                f"eMAG product_offer/count answer at {response.url} cannot be read ({exc});"
                " without a count the pass cannot tell where the catalogue ends, so it stops"
                f" here and marks nothing gone. The answer: {quote(response.body)}",
                status=response.status,
                url=response.url,
            ) from None

    async def _read(self, page: int) -> list[Any]:
        response, body = await self._call(
            "product_offer/read",
            {"currentPage": page, "itemsPerPage": self.per_page},
            what=f"page {page}",
        )
        results = body.get("results")
        if not isinstance(results, list):
            raise UpstreamError(
                f"eMAG product_offer/read page {page}: results is not a list:"
                f" {quote(response.body)}",
                url=response.url,
            )
        return results

    async def _call(
        self, action: str, data: Mapping[str, Any], *, what: str = ""
    ) -> tuple[Response, dict[str, Any]]:
        url = f"{self.base_url}/{action}"
        response = await self.upstream.request(
            "POST",
            url,
            what=what or action,
            limit_key=self.limit_key,
            json={"data": dict(data)},
            headers=self.auth_header,
        )
        return response, read_envelope(response)


def read_envelope(response: Response) -> dict[str, Any]:
    """The envelope of an answer (§1.4: isError false, messages, results), or an
    UpstreamError that shows what eMAG said.

    A 429 left after the retries is eMAG's rate limit (§1.5: `{"message": "API rate
    limit exceeded"}`, no envelope), not a malformed answer.
    """
    status, url = response.status, response.url
    if status == 429:
        raise UpstreamError(
            f"eMAG kept refusing for its rate limit (HTTP 429: {error_detail(response)}) at"
            f" {url}, each retry a rate window later; lower rate_limit, or look for another"
            " client using the same seller login",
            status=status,
            url=url,
        )
    if status in (401, 403):
        raise UpstreamError(
            f"eMAG refused the credentials (HTTP {status}) at {url}: {error_detail(response)}",
            status=status,
            url=url,
        )
    if not response.ok:
        raise UpstreamError(
            f"eMAG answered HTTP {status} at {url}: {error_detail(response)}",
            status=status,
            url=url,
        )
    body = response.json()
    if not isinstance(body, dict) or "isError" not in body:
        raise UpstreamError(
            f"eMAG answered without an envelope (no isError) at {url}: {quote(response.body)}",
            status=status,
            url=url,
        )
    flag = body["isError"]
    if flag is False:
        return body
    if flag is True:
        raise UpstreamError(f"eMAG isError at {url}: {_messages(body, response)}", url=url)
    raise UpstreamError(
        f"eMAG answered isError {quote(orjson.dumps(flag))}, not false, at {url}: the call"
        f" was most likely not interpreted. The answer: {quote(response.body)}",
        url=url,
    )


def read_count(results: Any, per_page: int) -> Count:
    """The offers and pages announced by the `results` of a product_offer/count answer.

    eMAG's document does not define it; clients see `{"noOfItems": "38", "noOfPages":
    "1", "itemsPerPage": "100"}`. `noOfItems` is required: a whole number of 0 or more,
    as a JSON number or a string of digits. `noOfPages`, when present, must be one too;
    it can only lengthen the pass (it may have been worked out for another page size),
    never shorten it. Raises ValueError saying what is wrong.
    """
    if not isinstance(results, Mapping):
        kind = "null" if results is None else f"a {type(results).__name__}"
        raise ValueError(f"results is {kind}, not an object with noOfItems")
    if "noOfItems" not in results:
        raise ValueError("results has no noOfItems")
    items = _whole(results["noOfItems"], "noOfItems")
    pages = -(-items // per_page)
    if "noOfPages" in results:
        pages = max(pages, _whole(results["noOfPages"], "noOfPages"))
    return Count(items=items, pages=pages)


def _whole(value: Any, name: str) -> int:
    """A count sent as a JSON number or a string of digits ("38"); ValueError otherwise."""
    whole: int | None = None
    if isinstance(value, bool):
        pass  # a JSON true is not 1 offer
    elif isinstance(value, int):
        whole = value
    elif (isinstance(value, float) and value.is_integer()) or (
        isinstance(value, str) and _DIGITS.fullmatch(value)
    ):
        whole = int(value)
    if whole is None or whole < 0:
        raise ValueError(f"{name} is {quote(orjson.dumps(value))}, not a whole number >= 0")
    return whole


def _messages(body: Mapping[str, Any], response: Response) -> str:
    """What an isError answer says: its `messages` (a list, or one string), else a
    `message` (as the document words one answer) or `errors`, else the answer itself."""
    for key in ("messages", "message", "errors"):
        value = body.get(key)
        parts = value if isinstance(value, list) else [value]
        said = [
            part if isinstance(part, str) else orjson.dumps(part).decode()
            for part in parts
            if part not in (None, "", [], {})
        ]
        if said:
            return quote("; ".join(said).encode())
    return f"(no message) {quote(response.body)}"


def quote(raw: bytes) -> str:
    """An answer fit for an error: decoded, control characters escaped (a NUL cannot be
    stored in Postgres text), cut to QUOTED characters."""
    text = raw.decode("utf-8", "replace")
    cut = text[:QUOTED]
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    return shown if len(text) <= QUOTED else f"{shown}… ({len(raw)} bytes)"


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
