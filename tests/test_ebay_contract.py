"""The eBay connector against the contract of eBay's OpenAPI document for the Browse API
(v1.20.4), with the sandbox's contract behaviours switched on: `total` only an estimate,
`next` the paging signal, the 10 000-result cap for any `limit`, `q` at most 100
characters, `warnings[]` in a 200 answer, `price.value` a string, no `gtin` in a summary.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient, AiohttpServer
from yarl import URL

from worker import db
from worker.config import load_jobs
from worker.connectors.ebay import EbayCatalog, TokenCache, last_offset, next_offset
from worker.errors import ConfigError, UpstreamError
from worker.jobs import checkers, kinds
from worker.jobs.marketplaces import EbayCatalogJob
from worker.ratelimit import Rate
from worker.sandbox import SANDBOX, SandboxConfig, build_app
from worker.upstream import Upstream, open_upstream

from .test_catalog_sync import (
    EBAY_ID_ENV,
    EBAY_SECRET_ENV,
    QUICK,
    Marketplace,
    ebay_params,
    products,
    start_marketplace,
    sync,
)

SELLERS = ["acme-parts", "best-brakes"]
SEARCH = "/buy/browse/v1/item_summary/search"
STALE = "v1|1|0"  # stored by an earlier pass and not listed any more


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with open_upstream(retry=QUICK) as up:
        yield up


def found(market: Marketplace, q: str, sellers: Iterable[str] = SELLERS) -> list[Any]:
    return market.sandbox.catalog.ebay_search(q=q, sellers=list(sellers))


def search_offsets(market: Marketplace) -> list[int]:
    return [r.offset for r in market.requests if r.api == "ebay" and r.offset is not None]


async def store_stale(pool: db.Pool) -> None:
    """A row an earlier pass stored that no query finds now: a complete pass that marks
    gone (with gone_after = 1) marks it, an incomplete one must not."""
    await pool.execute(
        "INSERT INTO products (source, account, external_id, raw, hash)"
        " VALUES ('ebay', 'parts', $1, '{}', '\\x00')",
        STALE,
    )


async def stale_gone(pool: db.Pool) -> bool:
    return (
        await pool.fetchval("SELECT gone_at FROM products WHERE external_id = $1", STALE)
        is not None
    )


# -- total is an estimate; next is the paging signal ----------------------------------


async def test_total_that_under_counts_still_stores_every_listing_and_completes(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    listed = {item["itemId"] for item in found(market, "brake")}
    params = ebay_params(market, monkeypatch, limit=10, mark_gone=True, gone_after=1)
    job = EbayCatalogJob()
    assert (await sync(pool, upstream, job, params)).error is None
    assert set(await products(pool, "ebay", "parts")) == listed

    market.sandbox.faults.ebay_total_skew = -20
    estimate = len(listed) * 80 // 100
    # Paging by total would stop at the page that reaches the estimate and miss the rest.
    assert math.ceil(estimate / 10) * 10 < len(listed)
    again = await sync(pool, upstream, job, params)

    assert again.error is None
    assert again.stats["items"] == again.stats["unchanged"] == len(listed)
    assert again.stats["gone"] == 0
    assert again.cursor["complete"] is True
    rows = await products(pool, "ebay", "parts")
    assert {eid for eid, row in rows.items() if row["gone_at"] is None} == listed
    assert again.stats["pages"] == math.ceil(len(listed) / 10)


async def test_total_that_over_counts_ends_where_next_is_absent_and_completes(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    market.sandbox.faults.ebay_total_skew = 20
    listed = len(found(market, "brake"))
    pages = math.ceil(listed / 10)
    # Paging by total would ask for a page past the last one, which has no `next`.
    assert pages * 10 < listed * 120 // 100
    await store_stale(pool)
    params = ebay_params(market, monkeypatch, limit=10, mark_gone=True, gone_after=1)

    out = await sync(pool, upstream, EbayCatalogJob(), params)

    assert out.error is None
    assert search_offsets(market) == [10 * n for n in range(pages)]  # not one past the end
    assert market.statuses("ebay") == [200] * pages
    assert (out.stats["pages"], out.stats["items"]) == (pages, listed)
    assert out.cursor["complete"] is True
    assert await stale_gone(pool)  # a complete pass: what it did not see is marked
    assert not any("incomplete" in w for w in out.stats["warnings"])


async def test_progress_shows_total_only_as_an_estimate(
    aiohttp_server: AiohttpServer, upstream: Upstream
) -> None:
    market = await start_marketplace(aiohttp_server)
    market.sandbox.faults.ebay_total_skew = -20  # 48 listed, 38 estimated
    upstream.limiter.configure_once("ebay:parts", Rate(calls=0))
    connector = EbayCatalog(
        upstream=upstream,
        tokens=TokenCache(),
        base_url=market.ebay_url,
        account="parts",
        client_id="sandbox-client",
        client_secret="sandbox-secret",
        marketplace_id="EBAY_US",
        sellers=SELLERS,
        queries=["brake"],
        limit=10,
    )

    labels = [page.label async for page in connector.pages(None)]

    assert labels == [
        "query 1/1 'brake', page 1 of ~4",
        "query 1/1 'brake', page 2 of ~4",
        "query 1/1 'brake', page 3 of ~4",
        "query 1/1 'brake', page 4 of ~5",  # `next` says there is more than total did
        "query 1/1 'brake', page 5 of ~5",
    ]
    assert connector.complete


@pytest.mark.parametrize(
    ("link", "expected"),
    [
        (None, None),
        ("https://api.ebay.com/buy/browse/v1/item_summary/search?q=x&limit=10&offset=30", 30),
        ("https://api.ebay.com/buy/browse/v1/item_summary/search?q=x&limit=10", 30),
    ],
)
def test_next_gives_the_offset_it_encodes(link: str | None, expected: int | None) -> None:
    body = {} if link is None else {"next": link}
    assert next_offset(body, offset=20, limit=10, term="x") == expected


@pytest.mark.parametrize("offset", ["20", "10", "35", "abc"])
def test_next_that_cannot_be_followed_fails_rather_than_loops(offset: str) -> None:
    link = f"https://api.ebay.com/buy/browse/v1/item_summary/search?q=x&offset={offset}"
    with pytest.raises(UpstreamError, match="cannot follow next="):
        next_offset({"next": link}, offset=20, limit=10, term="x")


# -- the 10 000-result cap, for any limit -------------------------------------------------


@pytest.mark.parametrize(("limit", "last"), [(150, 9_900), (199, 9_950)])
@pytest.mark.parametrize("next_past_cap", [False, True], ids=["no-next-at-cap", "next-at-cap"])
async def test_limit_that_does_not_divide_10_000_reaches_the_cap_and_is_incomplete(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
    limit: int,
    last: int,
    next_past_cap: bool,
) -> None:
    market = await start_marketplace(aiohttp_server, ebay_sellers=("big",), ebay_items=10_050)
    market.sandbox.faults.ebay_next_past_cap = next_past_cap
    assert len(found(market, "for", sellers=["big"])) == 10_050  # "for" is in every title
    await store_stale(pool)
    params = ebay_params(
        market,
        monkeypatch,
        sellers=["big"],
        queries=["for"],
        limit=limit,
        mark_gone=True,
        gone_after=1,
    )

    out = await sync(pool, upstream, EbayCatalogJob(), params)

    assert out.error is None
    offsets = search_offsets(market)
    assert all(offset % limit == 0 and offset < 10_000 for offset in offsets)
    assert max(offsets) == last  # the last page eBay serves is fetched too
    assert set(market.statuses("ebay")) == {200}
    assert out.stats["items"] == 10_000  # everything eBay will show, the last page included
    warnings = out.stats["warnings"]
    assert any("10000" in w and "'for'" in w for w in warnings), warnings
    assert "pass incomplete: items not marked gone" in warnings
    assert out.cursor["complete"] is False
    assert not await stale_gone(pool)


@pytest.mark.parametrize(
    ("limit", "last"), [(1, 9_999), (7, 9_996), (150, 9_900), (199, 9_950), (200, 9_800)]
)
def test_last_reachable_offset_is_the_last_multiple_of_limit_below_10_000(
    limit: int, last: int
) -> None:
    assert last_offset(limit) == last


# -- q at most 100 characters, and the other rules a jobs file can break ----------------


def ebay_jobs_file(tmp_path: Path, *, queries: list[str], sellers: list[str]) -> Path:
    path = tmp_path / "jobs.toml"
    path.write_text(
        "[[jobs]]\n"
        'name = "ebay-long"\n'
        'kind = "ebay.catalog"\n'
        "[jobs.params]\n"
        'account = "parts"\n'
        f'client_id_env = "{EBAY_ID_ENV}"\n'
        f'client_secret_env = "{EBAY_SECRET_ENV}"\n'
        f"queries = [{', '.join(map(repr, queries))}]\n"
        f"sellers = [{', '.join(map(repr, sellers))}]\n"
    )
    return path


def test_query_term_over_100_characters_is_refused_at_load_naming_job_and_term(
    tmp_path: Path,
) -> None:
    checks = checkers(kinds())
    fits = "brake pad " * 10  # exactly 100 characters
    long = fits + "x"
    assert len(fits) == 100
    assert load_jobs(ebay_jobs_file(tmp_path, queries=[fits], sellers=[]), kinds=checks)

    with pytest.raises(ConfigError) as refused:
        load_jobs(ebay_jobs_file(tmp_path, queries=["brake", long], sellers=[]), kinds=checks)

    message = str(refused.value)
    assert "job 'ebay-long'" in message
    assert repr(long) in message
    assert "101 characters" in message
    assert "100" in message


@pytest.mark.parametrize(
    ("queries", "sellers", "why"),
    [
        (["brake*"], [], "wildcard"),
        (["   "], [], "blank"),
        (["brake"], [f"seller-{n}" for n in range(251)], "250"),
    ],
)
def test_other_documented_request_rules_are_refused_at_load(
    tmp_path: Path, queries: list[str], sellers: list[str], why: str
) -> None:
    path = ebay_jobs_file(tmp_path, queries=queries, sellers=sellers)
    with pytest.raises(ConfigError, match=f"job 'ebay-long'.*{why}"):
        load_jobs(path, kinds=checkers(kinds()))


# -- warnings[] in a 200 answer -------------------------------------------------------------


async def test_unknown_seller_warning_is_recorded_on_the_run(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    params = ebay_params(market, monkeypatch, sellers=["acme-parts", "ghost-seller"])

    out = await sync(pool, upstream, EbayCatalogJob(), params)

    assert out.error is None
    warnings = out.stats["warnings"]
    assert [w for w in warnings if "12003" in w and "ghost-seller" in w], warnings
    assert len(warnings) == 1  # once per run, not once per page
    expected = {item["itemId"] for item in found(market, "brake", sellers=["acme-parts"])}
    assert set(await products(pool, "ebay", "parts")) == expected


# -- price.value is a string; a summary has no gtin -----------------------------------------


async def test_prices_are_stored_as_the_exact_decimals_sent(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    sent = ["19.99", "1234567.8901", "0.10", "9999999999.9999", "0.0001"]
    ids = [item["itemId"] for item in found(market, "brake")[: len(sent)]]
    for item_id, value in zip(ids, sent, strict=True):
        market.sandbox.catalog.set_ebay_price(item_id, value)

    out = await sync(pool, upstream, EbayCatalogJob(), ebay_params(market, monkeypatch))

    assert out.error is None
    assert out.stats["failed"] == 0
    rows = await products(pool, "ebay", "parts")
    for item_id, value in zip(ids, sent, strict=True):
        stored = rows[item_id]["price"]
        assert isinstance(stored, Decimal)
        assert stored == Decimal(value), (value, stored)


async def test_price_the_contract_does_not_allow_is_refused_not_rounded(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    catalog = market.sandbox.catalog
    number, too_fine, fine = (item["itemId"] for item in found(market, "brake")[:3])
    # A JSON number has been through binary floating point before we see it; five
    # decimals would be rounded by the price column. Neither may be stored as a price.
    catalog.ebay_item(number)["price"] = {"value": 19.99, "currency": "USD"}
    catalog.set_ebay_price(too_fine, "0.12345")
    catalog.set_ebay_price(fine, "0.1234")

    out = await sync(pool, upstream, EbayCatalogJob(), ebay_params(market, monkeypatch))

    assert out.error is None
    rows = await products(pool, "ebay", "parts")
    assert number not in rows
    assert too_fine not in rows
    assert rows[fine]["price"] == Decimal("0.1234")
    reasons = {s["id"]: s["reason"] for s in out.stats["failed_sample"]}
    assert "not a string" in reasons[number]
    assert "decimal places" in reasons[too_fine]
    assert out.stats["failed"] == 2


async def test_gtin_in_a_summary_is_not_stored_as_ean(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    with_gtin = [item["itemId"] for item in found(market, "brake")[:3]]
    for item_id in with_gtin:  # not a field of ItemSummary: the sandbox never sends it
        market.sandbox.catalog.ebay_item(item_id)["gtin"] = "0885909950805"

    out = await sync(pool, upstream, EbayCatalogJob(), ebay_params(market, monkeypatch))

    assert out.error is None
    rows = await products(pool, "ebay", "parts")
    assert all(rows[item_id]["ean"] is None for item_id in with_gtin)
    assert all(row["ean"] is None for row in rows.values())


# -- the sandbox keeps to the document, so the tests above mean something ---------------------


async def ebay_client(aiohttp_client: AiohttpClient, **config: Any) -> TestClient[Any, Any]:
    """A client of a fresh sandbox that sends a valid token and marketplace header."""
    app = build_app(SandboxConfig(**{"emag_items": 0, "ebay_items": 60, "rate": 0, **config}))
    client = await aiohttp_client(app)
    resp = await client.post(
        "/identity/v1/oauth2/token",
        data={"grant_type": "client_credentials", "scope": "https://api.ebay.com/oauth/api_scope"},
        headers={"Authorization": aiohttp.encode_basic_auth("sandbox-client", "sandbox-secret")},
    )
    token = (await resp.json())["access_token"]
    client.session.headers.update(
        {"Authorization": f"Bearer {token}", "X-EBAY-C-MARKETPLACE-ID": "EBAY_US"}
    )
    return client


async def get(client: TestClient[Any, Any], status: int = 200, **params: str) -> Any:
    resp = await client.get(SEARCH, params={"q": "brake", **params})
    assert resp.status == status, await resp.text()
    return await resp.json()


def ids(body: Any) -> list[str]:
    return [item["itemId"] for item in body.get("itemSummaries", [])]


async def test_sandbox_next_and_prev_only_where_there_is_such_a_page(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await ebay_client(aiohttp_client)
    first = await get(client, limit="20")
    assert "prev" not in first
    assert URL(first["next"]).query["offset"] == "20"
    middle = await get(client, limit="20", offset="20")
    assert URL(middle["prev"]).query["offset"] == "0"
    assert URL(middle["next"]).query["offset"] == "40"
    last = await get(client, limit="20", offset="40")
    assert "prev" in last
    assert "next" not in last
    assert len(last["itemSummaries"]) == last["total"] - 40
    assert all(isinstance(i["price"]["value"], str) for i in first["itemSummaries"])


async def test_sandbox_total_is_an_estimate(aiohttp_client: AiohttpClient) -> None:
    client = await ebay_client(aiohttp_client)
    faults = client.app[SANDBOX].faults
    true = (await get(client, limit="200"))["total"]
    faults.ebay_total_skew = -20
    under = await get(client, limit="200")
    assert under["total"] == true * 80 // 100
    assert len(under["itemSummaries"]) == true
    assert "next" not in under
    faults.ebay_total_skew = 20
    assert (await get(client, limit="200"))["total"] == true * 120 // 100


async def test_sandbox_offset_rules_are_the_documented_ones(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await ebay_client(aiohttp_client, ebay_sellers=("big",), ebay_items=10_050)
    # Below 10 000 and a multiple of limit is answered, cut at the 10 000th result.
    last = await get(client, q="for", limit="150", offset="9900")
    assert len(last["itemSummaries"]) == 100
    assert "next" not in last
    client.app[SANDBOX].faults.ebay_next_past_cap = True
    past = await get(client, q="for", limit="150", offset="9900")
    assert URL(past["next"]).query["offset"] == "10050"
    for params, error_id in [
        ({"offset": "10000", "limit": "50"}, 12029),
        ({"offset": "10050", "limit": "150"}, 12029),
        ({"offset": "9950", "limit": "100"}, 12515),
        ({"limit": "0"}, 12006),
        ({"limit": "201"}, 12006),
        ({"q": ""}, 12001),
        ({"filter": "sellers:{" + "|".join(f"s{n}" for n in range(251)) + "}"}, 12032),
    ]:
        body = await get(client, 400, **{"q": "for", **params})
        assert body["errors"][0]["errorId"] == error_id, params


async def test_sandbox_cuts_q_at_100_characters(aiohttp_client: AiohttpClient) -> None:
    client = await ebay_client(aiohttp_client)
    within = "brake" + " for" * 23 + "   "  # 100 characters; "for" is in every title
    assert len(within) == 100
    cut = await get(client, q=within + "nosuchword", limit="200")
    assert ids(cut) == ids(await get(client, q="brake", limit="200"))
    assert cut["total"] > 0 == (await get(client, q="brake nosuchword"))["total"]


async def test_sandbox_warns_of_an_unknown_seller_in_a_200_answer(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await ebay_client(aiohttp_client)
    warned = await get(client, filter="sellers:{acme-parts|ghost-seller}")
    assert [w["errorId"] for w in warned["warnings"]] == [12003]
    assert warned["warnings"][0]["parameters"] == [{"name": "sellers", "value": "ghost-seller"}]
    assert ids(warned) == ids(await get(client, filter="sellers:{acme-parts}"))
    assert "warnings" not in await get(client, filter="sellers:{acme-parts}")
