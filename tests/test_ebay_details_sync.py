"""eBay `details = true` (issue 8, item 2): item details for created or changed items only,
within a per-run cap, the rest carried to the next pass; run by a real leader."""

from __future__ import annotations

import pytest
from pytest_aiohttp import AiohttpServer

from worker import db
from worker.config import JobSpec
from worker.jobs.marketplaces import EbayCatalogJob, EmagOffersJob
from worker.upstream import Upstream

from .test_catalog_sync import Marketplace, ebay_params, start_marketplace, sync, upstream

__all__ = ["upstream"]  # the fixture, imported for pytest


def detail_calls(market: Marketplace) -> int:
    return sum(1 for r in market.requests if "/buy/browse/v1/item/" in r.path and r.status == 200)


async def stored(pool: db.Pool) -> dict[str, dict[str, object]]:
    rows = await pool.fetch(
        "SELECT external_id, ean, mpn, brand, details, details_at, details_pending"
        " FROM products WHERE source = 'ebay' AND account = 'parts'"
    )
    return {r["external_id"]: dict(r) for r in rows}


async def test_details_are_fetched_for_new_and_changed_items_only(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    params = ebay_params(market, monkeypatch, details=True)
    job = EbayCatalogJob()

    first = await sync(pool, upstream, job, params)
    assert first.error is None
    rows = await stored(pool)
    assert detail_calls(market) == len(rows) == first.stats["details_fetched"]
    assert all(r["details_at"] is not None and not r["details_pending"] for r in rows.values())
    # What the summary lacks, from the item's own page, as the sandbox served it.
    some = next(eid for eid, r in rows.items() if r["ean"])
    served = market.sandbox.catalog.ebay_details(some)
    assert rows[some]["ean"] == served["gtin"]
    assert rows[some]["brand"] == served["brand"]
    assert rows[some]["details"]["aspects"]  # type: ignore[index]
    assert any(r["mpn"] for r in rows.values())

    again = await sync(pool, upstream, job, params)
    assert again.stats["unchanged"] == len(rows)
    assert detail_calls(market) == len(rows), "an unchanged item's details were fetched again"
    assert again.stats["details_fetched"] == 0

    changed = sorted(rows)[0]
    market.sandbox.catalog.set_ebay_price(changed, "1.99")
    third = await sync(pool, upstream, job, params)
    assert third.stats["updated"] == 1
    assert third.stats["details_fetched"] == 1
    assert detail_calls(market) == len(rows) + 1
    assert (await stored(pool))[changed]["ean"] == rows[changed]["ean"], "EAN lost on change"


async def test_the_cap_carries_the_rest_to_the_next_pass(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    params = ebay_params(market, monkeypatch, details=True, max_detail_calls=5)
    job = EbayCatalogJob()

    first = await sync(pool, upstream, job, params)
    total = len(await stored(pool))
    assert total > 10
    assert (first.stats["details_fetched"], first.stats["details_left"]) == (5, total - 5)
    assert any("left for the next pass" in w for w in first.stats["warnings"])

    second = await sync(pool, upstream, job, params)  # nothing changed upstream
    assert second.stats["details_fetched"] == 5
    assert second.stats["details_left"] == total - 10
    pending = sum(1 for r in (await stored(pool)).values() if r["details_pending"])
    assert pending == total - 10
    assert detail_calls(market) == 10


async def test_an_item_ended_since_the_listing_is_dropped_not_retried(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    params = ebay_params(market, monkeypatch, details=True, max_detail_calls=0)
    job = EbayCatalogJob()
    assert (await sync(pool, upstream, job, params)).error is None  # listed, no details yet
    ended = sorted(await stored(pool))[0]
    market.sandbox.catalog.remove_ebay_item(ended)

    out = await sync(pool, upstream, job, {**params, "max_detail_calls": 1000})

    assert out.error is None
    assert out.stats["details_failed"] == 1
    assert any(s["id"] == ended and "details" in s["reason"] for s in out.stats["failed_sample"])
    assert (await stored(pool))[ended]["details_pending"] is False


def test_details_only_where_the_connector_has_them() -> None:
    spec = JobSpec(
        name="offers",
        kind="emag.offers",
        schedule=None,
        params={"account": "main", "platform": "ro", "details": True},
    )
    with pytest.raises(ValueError, match="details"):
        EmagOffersJob().check(spec)
    bad_cap = JobSpec(
        name="parts",
        kind="ebay.catalog",
        schedule=None,
        params={"account": "p", "queries": ["brake"], "max_detail_calls": -1},
    )
    with pytest.raises(ValueError, match="max_detail_calls"):
        EbayCatalogJob().check(bad_cap)


async def test_turning_details_on_fills_in_a_catalogue_synced_without_them(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seen running `make run` on a catalogue synced before `details` existed: every
    item was unchanged, so none was ever fetched. Items never fetched are owed too."""
    market = await start_marketplace(aiohttp_server)
    job = EbayCatalogJob()
    assert (await sync(pool, upstream, job, ebay_params(market, monkeypatch))).error is None
    total = len(await stored(pool))
    out = await sync(pool, upstream, job, ebay_params(market, monkeypatch, details=True))
    assert out.stats["unchanged"] == total
    assert out.stats["details_fetched"] == total
    assert all(r["details_at"] for r in (await stored(pool)).values())
