"""The eBay catalogue sync against the sandbox: OAuth tokens, de-duplication, paging, errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from decimal import Decimal
from typing import Any

import pytest
from pytest_aiohttp import AiohttpServer

from worker import db
from worker.jobs.marketplaces import EbayCatalogJob
from worker.upstream import Upstream, open_upstream

from .test_catalog_sync import (
    EBAY_SECRET_ENV,
    QUICK,
    Marketplace,
    Outcome,
    ebay_params,
    fields_of,
    products,
    start_marketplace,
    sync,
)

SELLERS = ("acme-parts", "best-brakes")


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with open_upstream(retry=QUICK) as up:
        yield up


class SandboxClock:
    """The sandbox's clock, moved by hand (token expiry without waiting)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ebay_expected(items: Iterable[Mapping[str, Any]]) -> dict[str, tuple[Any, ...]]:
    """The products rows of these item summaries (FIELDS order: no stock, EAN or SKU)."""
    return {
        i["itemId"]: (
            i["title"],
            Decimal(i["price"]["value"]),
            i["price"]["currency"],
            None,
            None,
            None,
        )
        for i in items
    }


def found(market: Marketplace, *queries: str, sellers: Iterable[str] = SELLERS) -> list[Any]:
    catalog = market.sandbox.catalog
    return [item for q in queries for item in catalog.ebay_search(q=q, sellers=list(sellers))]


async def test_items_found_by_several_queries_are_stored_once(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    hits = found(market, "brake", "sensor")
    unique = ebay_expected(hits)
    assert len(unique) < len(hits)  # the two queries overlap
    params = ebay_params(market, monkeypatch, queries=["brake", "sensor"])

    out = await sync(pool, upstream, EbayCatalogJob(), params)

    assert out.error is None
    assert fields_of(await products(pool, "ebay", "parts")) == unique
    assert out.stats["items"] == out.stats["created"] == len(unique)
    assert out.cursor == {"finished": True, "complete": True}


async def test_changed_price_updates_and_a_repeat_sync_writes_nothing(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    params = ebay_params(market, monkeypatch, mark_gone=True, gone_after=1)
    job = EbayCatalogJob()
    assert (await sync(pool, upstream, job, params)).error is None
    before = await products(pool, "ebay", "parts")
    same = await sync(pool, upstream, job, params)
    assert await products(pool, "ebay", "parts") == before
    assert (same.stats["created"], same.stats["updated"]) == (0, 0)
    assert same.stats["unchanged"] == len(before)

    first, second = sorted(before)[:2]
    market.sandbox.catalog.set_ebay_price(first, "1.99")
    market.sandbox.catalog.remove_ebay_item(second)
    again = await sync(pool, upstream, job, params)

    assert again.error is None
    assert (again.stats["updated"], again.stats["gone"]) == (1, 1)
    after = await products(pool, "ebay", "parts")
    assert after[first]["price"] == Decimal("1.99")
    assert after[second]["gone_at"] is not None
    untouched = set(before) - {first, second}
    assert all(after[eid]["xmin"] == before[eid]["xmin"] for eid in untouched)


async def test_token_is_reused_across_pages_and_runs(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    params = ebay_params(market, monkeypatch, queries=["brake", "filter"])
    job = EbayCatalogJob()

    for _ in range(2):
        assert (await sync(pool, upstream, job, params)).error is None

    assert len([s for s in market.statuses("ebay") if s == 200]) > 4
    assert market.sandbox.tokens_issued == 1
    assert market.statuses("oauth") == [200]


async def test_expired_token_is_renewed_before_use(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server, token_ttl=1.0)
    params = ebay_params(market, monkeypatch, queries=["sensor"], limit=200)
    job = EbayCatalogJob()
    assert (await sync(pool, upstream, job, params)).error is None
    assert market.sandbox.tokens_issued == 1

    await asyncio.sleep(1.0)  # the 1 s token is past its refresh point (0.9 s)
    assert (await sync(pool, upstream, job, params)).error is None

    assert market.sandbox.tokens_issued == 2
    assert 401 not in market.statuses("ebay")


async def test_token_rejected_early_is_renewed_once(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = SandboxClock()
    market = await start_marketplace(aiohttp_server, clock=clock, token_ttl=600.0)
    params = ebay_params(market, monkeypatch)
    job = EbayCatalogJob()
    assert (await sync(pool, upstream, job, params)).error is None

    clock.now += 3600  # the sandbox expires the token while the worker still trusts it
    out = await sync(pool, upstream, job, params)

    assert out.error is None
    assert market.sandbox.tokens_issued == 2
    assert market.statuses("ebay").count(401) == 1
    assert out.stats["unchanged"] == len(found(market, "brake"))


async def sync_more_than_10_000(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Marketplace, Outcome]:
    """A mark_gone sync of a query matching 10 050 items, of which eBay pages 10 000."""
    market = await start_marketplace(aiohttp_server, ebay_sellers=("big",), ebay_items=10_050)
    assert len(found(market, "for", sellers=["big"])) == 10_050  # "for" is in every title
    # Stored by an earlier pass, and not found now: a complete pass would mark it gone.
    await pool.execute(
        "INSERT INTO products (source, account, external_id, raw, hash)"
        " VALUES ('ebay', 'parts', 'v1|1|0', '{}', '\\x00')"
    )
    params = ebay_params(
        market, monkeypatch, sellers=["big"], queries=["for"], limit=200, mark_gone=True
    )
    return market, await sync(pool, upstream, EbayCatalogJob(), params)


async def test_paging_stops_at_10_000_with_a_warning_and_nothing_marked_gone(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market, out = await sync_more_than_10_000(aiohttp_server, pool, upstream, monkeypatch)

    assert out.error is None
    assert (out.stats["pages"], out.stats["items"]) == (50, 10_000)
    assert max(r.offset or 0 for r in market.requests) == 9_800
    assert 400 not in market.statuses("ebay")
    warnings = out.stats["warnings"]
    assert any("'for' reached eBay's cap of 10000" in w and "10050" in w for w in warnings), (
        warnings
    )
    assert out.result["gone"] == 0
    stale = await pool.fetchval("SELECT gone_at FROM products WHERE external_id = 'v1|1|0'")
    assert stale is None
    assert await pool.fetchval("SELECT count(*) FROM products WHERE gone_at IS NULL") == 10_001


async def test_incomplete_pass_warning_and_final_message_are_stored(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, out = await sync_more_than_10_000(aiohttp_server, pool, upstream, monkeypatch)

    assert out.error is None
    assert "pass incomplete: items not marked gone" in out.stats["warnings"]
    assert out.row["progress"]["message"].startswith("done")


async def test_ebay_errors_are_surfaced_in_the_run_error(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    market.sandbox.faults.error_pages = {2}

    out = await sync(pool, upstream, EbayCatalogJob(), ebay_params(market, monkeypatch))

    assert out.error is not None
    assert "12000: There was a problem with an eBay internal system or process." in out.error
    assert market.statuses("ebay").count(500) == QUICK.attempts  # a 500 is retried first
    assert len(await products(pool, "ebay", "parts")) == 20  # page 1 is kept
    assert out.cursor == {"query": 0, "offset": 20}


async def test_bad_request_is_not_retried_and_names_the_error(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    params = ebay_params(market, monkeypatch, marketplace_id="EBAY_XX")

    out = await sync(pool, upstream, EbayCatalogJob(), params)

    assert out.error is not None
    assert "HTTP 400" in out.error
    assert "12019: The X-EBAY-C-MARKETPLACE-ID header" in out.error
    assert market.statuses("ebay") == [400]


async def test_wrong_client_secret_fails_with_the_oauth_error(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    params = ebay_params(market, monkeypatch)
    monkeypatch.setenv(EBAY_SECRET_ENV, "wrong")

    out = await sync(pool, upstream, EbayCatalogJob(), params)

    assert out.error is not None
    assert "OAuth token request failed (HTTP 401): client authentication failed" in out.error
    assert [r.status for r in market.requests] == [401]
