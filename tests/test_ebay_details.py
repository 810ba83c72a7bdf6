"""eBay item details (getItem, `GET /buy/browse/v1/item/{item_id}`) against the sandbox.

The connector maps the `Item` of eBay's OpenAPI document for the Browse API (v1.20.4):
`gtin` -> ean, `mpn`, `brand`, `localizedAspects` -> aspects; getItem carries no
compatibility rows. An ended item is a 404 (errorId 11001); a token eBay rejects
early is renewed once; detail calls share the search's rate-limit key.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pytest_aiohttp import AiohttpServer

from worker.connectors.base import DetailSource
from worker.connectors.ebay import EbayCatalog, ItemGone, TokenCache, item_gone, map_details
from worker.errors import UpstreamError
from worker.ratelimit import Rate
from worker.sandbox import max_in_window
from worker.upstream import Response, Upstream, open_upstream

from .test_catalog_sync import QUICK, Marketplace, start_marketplace

SELLERS = ("acme-parts", "best-brakes")
ITEM_PATH = "/buy/browse/v1/item/"
KEY = "ebay:parts"


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with open_upstream(retry=QUICK) as up:
        yield up


def connector(
    market: Marketplace, upstream: Upstream, *, rate: Rate | None = None, **extra: Any
) -> EbayCatalog:
    """The connector as EbayCatalogJob builds it, on limiter key `KEY` (unlimited unless
    `rate` is given)."""
    upstream.limiter.configure_once(KEY, rate or Rate(calls=0))
    settings: dict[str, Any] = {
        "upstream": upstream,
        "tokens": TokenCache(),
        "base_url": market.ebay_url,
        "account": "parts",
        "client_id": "sandbox-client",
        "client_secret": "sandbox-secret",
        "marketplace_id": "EBAY_US",
        "sellers": SELLERS,
        "queries": ["brake"],
        "limit": 10,
        "limit_key": KEY,
        **extra,
    }
    return EbayCatalog(**settings)


def detail_calls(market: Marketplace) -> list[int]:
    """Statuses of the getItem requests the sandbox answered, in order."""
    return [r.status for r in market.requests if r.path.startswith(ITEM_PATH)]


def brake_items(market: Marketplace) -> list[dict[str, Any]]:
    return market.sandbox.catalog.ebay_search(q="brake", sellers=list(SELLERS))


async def test_details_map_gtin_mpn_brand_and_aspects(
    aiohttp_server: AiohttpServer, upstream: Upstream
) -> None:
    market = await start_marketplace(aiohttp_server)
    ebay = connector(market, upstream)
    assert isinstance(ebay, DetailSource)
    catalog = market.sandbox.catalog
    items = brake_items(market)

    for item in items:
        item_id = item["itemId"]
        served = catalog.ebay_details(item_id)
        got = await ebay.details(item_id)

        assert got.external_id == item_id
        assert got.ean == served.get("gtin")
        assert got.brand == served["brand"] == item["title"].split()[0]
        assert got.mpn == (None if served["mpn"] == "Does Not Apply" else served["mpn"])
        assert got.aspects == {a["name"]: [a["value"]] for a in served["localizedAspects"]}
        assert got.compatibility is None  # getItem carries none
        assert got.raw == served  # the whole answer, summary fields included

    # The sandbox's catalogue covers both GTIN lengths, items without one and the
    # seller's "Does Not Apply" as MPN.
    served_all = [catalog.ebay_details(i["itemId"]) for i in items]
    assert {len(d.get("gtin", "")) for d in served_all} == {0, 12, 13}
    assert any(d["mpn"] == "Does Not Apply" for d in served_all)
    assert detail_calls(market) == [200] * len(items)
    # The ids (`v1|<n>|0`) went out URL-encoded and arrived whole.
    assert [r.path for r in market.requests if r.path.startswith(ITEM_PATH)] == [
        ITEM_PATH + i["itemId"] for i in items
    ]


async def test_details_follow_the_item_as_it_changes(
    aiohttp_server: AiohttpServer, upstream: Upstream
) -> None:
    market = await start_marketplace(aiohttp_server)
    catalog = market.sandbox.catalog
    item_id = brake_items(market)[0]["itemId"]
    catalog.set_ebay_price(item_id, "19.99")

    got = await connector(market, upstream).details(item_id)

    assert got.raw["price"] == {"value": "19.99", "currency": "USD"}
    assert got.raw == catalog.ebay_details(item_id)  # the same seed, the same details


def test_map_details_groups_aspects_and_drops_what_is_no_identifier() -> None:
    body = {
        "itemId": "v1|1|0",
        "gtin": " Does not apply ",
        "mpn": "Does Not Apply",
        "brand": "",
        "localizedAspects": [
            {"type": "STRING", "name": "Brand", "value": "Bosch"},
            {"type": "STRING_ARRAY", "name": "Placement on Vehicle", "value": "Front, Left"},
            {"type": "STRING", "name": "Placement on Vehicle", "value": "Rear"},
            {"type": "STRING", "name": "Placement on Vehicle", "value": "Rear"},
            {"type": "STRING", "name": "", "value": "nameless"},
            {"type": "STRING", "name": "Colour"},
            "not an aspect",
        ],
    }

    got = map_details("v1|1|0", body)

    assert (got.ean, got.mpn, got.brand) == (None, None, None)
    # A STRING_ARRAY's value is one string in the document: kept whole, never split.
    assert got.aspects == {"Brand": ["Bosch"], "Placement on Vehicle": ["Front, Left", "Rear"]}
    assert got.raw == body
    assert map_details("x", {"gtin": "4006381333931", "mpn": " 0 986 494 "}).ean == (
        "4006381333931"
    )
    assert map_details("x", {"mpn": " 0 986 494 "}).mpn == "0 986 494"
    assert map_details("x", {"localizedAspects": "junk"}).aspects == {}


async def test_unknown_item_raises_item_gone_naming_the_404_and_11001(
    aiohttp_server: AiohttpServer, upstream: Upstream
) -> None:
    market = await start_marketplace(aiohttp_server)
    ebay = connector(market, upstream)
    ended = brake_items(market)[0]["itemId"]
    market.sandbox.catalog.remove_ebay_item(ended)  # sold or delisted since the pass

    for item_id in ("v1|999999999999|0", ended):
        with pytest.raises(ItemGone) as raised:
            await ebay.details(item_id)
        assert isinstance(raised.value, UpstreamError)
        assert raised.value.status == 404
        message = str(raised.value)
        assert item_id in message
        assert "HTTP 404" in message
        assert "11001: The specified item Id was not found." in message

    assert detail_calls(market) == [404, 404]  # a 404 is not retried


@pytest.mark.parametrize(
    ("status", "body", "gone"),
    [
        (404, b'{"errors": [{"errorId": 11001, "message": "not found"}]}', True),
        (400, b'{"errors": [{"errorId": 11001, "message": "not found"}]}', True),  # as listed
        (404, b"<html><body>404 Not Found</body></html>", False),  # a proxy, a wrong URL
        (404, b'{"errors": [{"errorId": 11002}]}', False),
        (400, b'{"errors": [{"errorId": 11004, "message": "being updated"}]}', False),
        (500, b'{"errors": [{"errorId": 11000}]}', False),
        (404, b"", False),
    ],
)
def test_only_errorid_11001_means_the_item_is_gone(status: int, body: bytes, gone: bool) -> None:
    assert (
        item_gone(Response(status, {}, body, "https://api.ebay.com/buy/browse/v1/item/x")) is gone
    )


async def test_other_failures_are_upstream_errors_not_item_gone(
    aiohttp_server: AiohttpServer, upstream: Upstream
) -> None:
    market = await start_marketplace(aiohttp_server)
    item_id = brake_items(market)[0]["itemId"]
    market.sandbox.faults.fail_next = 10  # more than the retries

    with pytest.raises(UpstreamError) as raised:
        await connector(market, upstream).details(item_id)

    assert not isinstance(raised.value, ItemGone)
    assert f"item {item_id}" in str(raised.value)
    assert detail_calls(market) == [503] * QUICK.attempts

    unsupported = connector(market, upstream, marketplace_id="EBAY_XX")
    market.sandbox.faults.fail_next = 0
    with pytest.raises(UpstreamError, match=r"HTTP 400.*11011") as refused:
        await unsupported.details(item_id)
    assert not isinstance(refused.value, ItemGone)


async def test_token_rejected_early_is_renewed_once(
    aiohttp_server: AiohttpServer, upstream: Upstream
) -> None:
    market = await start_marketplace(aiohttp_server)
    ebay = connector(market, upstream)
    first, second = (i["itemId"] for i in brake_items(market)[:2])
    await ebay.details(first)
    assert market.sandbox.tokens_issued == 1

    market.sandbox.tokens.clear()  # eBay drops the token while the worker still trusts it
    got = await ebay.details(second)

    assert got.external_id == second
    assert market.sandbox.tokens_issued == 2
    assert detail_calls(market) == [200, 401, 200]


async def test_token_rejected_twice_fails_with_the_401(
    aiohttp_server: AiohttpServer, upstream: Upstream
) -> None:
    # Every look at the sandbox's clock is a minute later: each token expires unused.
    clock = itertools.count(1000.0, 60.0)
    market = await start_marketplace(aiohttp_server, clock=lambda: next(clock), token_ttl=1.0)
    item_id = brake_items(market)[0]["itemId"]

    with pytest.raises(UpstreamError, match=r"HTTP 401.*1001") as raised:
        await connector(market, upstream).details(item_id)

    assert not isinstance(raised.value, ItemGone)
    assert market.sandbox.tokens_issued == 2
    assert detail_calls(market) == [401, 401]  # renewed once, never in a loop


async def test_detail_calls_share_the_search_rate_limit(
    aiohttp_server: AiohttpServer, upstream: Upstream
) -> None:
    market = await start_marketplace(aiohttp_server, rate=3)  # the sandbox: 3/s per client
    ebay = connector(market, upstream, rate=Rate.per_second(3))
    items = brake_items(market)[:6]

    async def search() -> int:
        return sum([len(page.items) async for page in ebay.pages(None)])

    found, *details = await asyncio.gather(
        search(), *(ebay.details(item["itemId"]) for item in items)
    )

    assert found == len(brake_items(market))
    assert [d.external_id for d in details] == [i["itemId"] for i in items]
    ebay_requests = [r for r in market.requests if r.api == "ebay"]
    assert len(detail_calls(market)) == len(items)
    assert len(ebay_requests) > len(items) + 3  # search pages and detail calls, together
    # One budget for both: the sandbox counts them in one window per client and never
    # had to refuse one, and no second of arrivals held more than eBay's 3.
    assert 429 not in [r.status for r in ebay_requests]
    assert {r.who for r in ebay_requests} == {"sandbox-client"}
    assert max_in_window([r.at for r in ebay_requests], 1.0) <= 3
