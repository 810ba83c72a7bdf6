"""The sandbox marketplace: eMAG and eBay shapes, limits, faults and observability."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import encode_basic_auth, web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from worker.sandbox import QUERY_TERMS, REQUESTS, SANDBOX, Catalog, Faults, SandboxConfig
from worker.sandbox import app as sandbox_app
from worker.sandbox.app import build_app, serve

EMAG = "/emag/ro/api-3/product_offer"
TOKEN = "/identity/v1/oauth2/token"
SEARCH = "/buy/browse/v1/item_summary/search"
MAIN = {"Authorization": encode_basic_auth("main@example.com", "main-secret")}
FBE = {"Authorization": encode_basic_auth("fbe@example.com", "fbe-secret")}
EBAY_BASIC = {"Authorization": encode_basic_auth("sandbox-client", "sandbox-secret")}
GRANT = {"grant_type": "client_credentials", "scope": "https://api.ebay.com/oauth/api_scope"}

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


class FakeClock:
    """The sandbox clock, moved by hand: windows and token expiry without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_client(aiohttp_client: AiohttpClient, clock: FakeClock) -> MakeClient:
    async def make(*, real_clock: bool = False, **overrides: Any) -> Client:
        config = SandboxConfig(**{"emag_items": 250, "ebay_items": 120, **overrides})
        app = build_app(config, clock=time.monotonic if real_clock else clock)
        return await aiohttp_client(app)

    return make


async def read(client: Client, page: int, per_page: int = 100, headers: Any = MAIN) -> Any:
    body = {"data": {"currentPage": page, "itemsPerPage": per_page}}
    resp = await client.post(f"{EMAG}/read", json=body, headers=headers)
    assert resp.status == 200
    return await resp.json()


async def ebay_token(client: Client) -> dict[str, str]:
    resp = await client.post(TOKEN, data=GRANT, headers=EBAY_BASIC)
    assert resp.status == 200
    token = (await resp.json())["access_token"]
    return {"Authorization": f"Bearer {token}", "X-EBAY-C-MARKETPLACE-ID": "EBAY_US"}


async def search(client: Client, headers: dict[str, str], **params: str) -> Any:
    resp = await client.get(SEARCH, params=params, headers=headers)
    assert resp.status == 200, await resp.text()
    return await resp.json()


# -- eMAG ----------------------------------------------------------------------


async def test_count_and_read_page_through_the_whole_account(
    make_client: MakeClient, clock: FakeClock
) -> None:
    client = await make_client()
    resp = await client.post(f"{EMAG}/count", json={"data": {}}, headers=MAIN)
    assert await resp.json() == {
        "isError": False,
        "messages": [],
        "results": {"noOfItems": "250", "noOfPages": "3", "itemsPerPage": "100"},
    }
    assert resp.headers["X-RateLimit-Limit-3second"] == "3"
    ids = []
    for page in (1, 2, 3):
        clock.now += 1.0  # stay inside 3 requests/s
        body = await read(client, page)
        assert body["isError"] is False
        assert body["messages"] == []
        ids += [offer["id"] for offer in body["results"]]
    assert ids == list(range(1, 251))
    clock.now += 1.0
    assert (await read(client, 4))["results"] == []


async def test_offers_have_the_documented_fields_and_are_deterministic() -> None:
    def catalog(seed: int) -> Catalog:
        return Catalog(
            seed=seed,
            emag_platforms=["ro"],
            emag_accounts=["main"],
            emag_items=200,
            ebay_sellers=["s"],
            ebay_items=5,
        )

    offers = catalog(7).emag_page("ro", "main", page=1, per_page=100)
    assert offers == catalog(7).emag_page("ro", "main", page=1, per_page=100)
    assert offers != catalog(8).emag_page("ro", "main", page=1, per_page=100)
    for offer in offers:
        assert isinstance(offer["id"], int)
        assert offer["currency"] == "RON"
        assert offer["status"] in (0, 1)
        assert all(isinstance(e, str) for e in offer["ean"])
        assert offer["general_stock"] == sum(s["value"] for s in offer["stock"])
        assert {"warehouse_id", "value"} == set(offer["stock"][0])
        assert {"part_number", "part_number_key", "name", "brand", "recommended_price"} <= set(
            offer
        )
    prices = [offer["sale_price"] for offer in offers]
    assert any(isinstance(p, str) and len(p.split(".")[1]) == 4 for p in prices)
    assert any(isinstance(p, float) for p in prices)


async def test_items_per_page_over_100_is_an_error(make_client: MakeClient) -> None:
    client = await make_client()
    body = await read(client, 1, per_page=101)
    assert body["isError"] is True
    assert body["messages"]
    assert body["results"] == []


async def test_php_style_form_body_is_accepted(make_client: MakeClient) -> None:
    client = await make_client()
    form = {"data[currentPage]": "3", "data[itemsPerPage]": "100"}
    resp = await client.post(f"{EMAG}/read", data=form, headers=MAIN)
    assert len((await resp.json())["results"]) == 50


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": encode_basic_auth("main@example.com", "wrong")},
        {"Authorization": encode_basic_auth("nobody@example.com", "main-secret")},
        {"Authorization": "Basic !!!"},
    ],
)
async def test_bad_or_missing_auth_is_401(make_client: MakeClient, headers: Any) -> None:
    client = await make_client()
    resp = await client.post(f"{EMAG}/read", json={}, headers=headers)
    assert resp.status == 401
    assert (await resp.json())["isError"] is True


async def test_unknown_platform_is_404(make_client: MakeClient) -> None:
    client = await make_client()
    resp = await client.post("/emag/xx/api-3/product_offer/read", json={}, headers=MAIN)
    assert resp.status == 404


async def test_fourth_request_within_a_second_is_429_per_account(
    make_client: MakeClient, clock: FakeClock
) -> None:
    client = await make_client()
    for remaining in ("2", "1", "0"):
        resp = await client.post(f"{EMAG}/count", headers=MAIN)
        assert resp.headers["X-RateLimit-Remaining-3second"] == remaining
    clock.now += 0.999
    resp = await client.post(f"{EMAG}/count", headers=MAIN)
    assert resp.status == 429
    assert await resp.json() == {"message": "API rate limit exceeded"}
    assert "Retry-After" not in resp.headers  # eMAG documents none on its 429
    assert resp.headers["X-RateLimit-Limit-3second"] == "3"
    assert resp.headers["X-RateLimit-Remaining-3second"] == "0"
    other = await client.post(f"{EMAG}/count", headers=FBE)
    assert other.status == 200  # another account has its own window
    clock.now += 0.001  # the first arrival has left the window
    assert (await client.post(f"{EMAG}/count", headers=MAIN)).status == 200


async def test_window_counts_real_arrivals(make_client: MakeClient) -> None:
    client = await make_client(real_clock=True)
    statuses = await asyncio.gather(*(client.post(f"{EMAG}/count", headers=MAIN) for _ in range(4)))
    assert sorted(r.status for r in statuses) == [200, 200, 200, 429]


async def test_rate_limit_can_be_lifted(make_client: MakeClient) -> None:
    for client in (await make_client(rate=0), await make_client(faults=Faults(rate_limit=False))):
        for _ in range(10):
            resp = await client.post(f"{EMAG}/count", headers=MAIN)
            assert resp.status == 200
            assert "X-RateLimit-Limit-3second" not in resp.headers


async def test_catalog_mutations_show_up_in_the_api(make_client: MakeClient) -> None:
    client = await make_client(rate=0)
    catalog = client.app[SANDBOX].catalog
    catalog.set_emag_price("ro", "main", 5, "99.0000")
    catalog.remove_emag_offer("ro", "main", 7)
    added = catalog.add_emag_offer("ro", "main", name="New thing", sale_price=12.5)
    assert added["id"] == 251
    offers = [o for page in (1, 2, 3) for o in (await read(client, page))["results"]]
    by_id = {o["id"]: o for o in offers}
    assert len(offers) == 250
    assert 7 not in by_id
    assert by_id[5]["sale_price"] == "99.0000"
    assert offers[-1] == added
    assert catalog.emag_count("ro", "main") == 250
    with pytest.raises(LookupError):
        catalog.remove_emag_offer("ro", "main", 7)


# -- eBay ----------------------------------------------------------------------


async def test_token_is_issued_counted_and_expires(
    make_client: MakeClient, clock: FakeClock
) -> None:
    client = await make_client(token_ttl=2.0)
    resp = await client.post(TOKEN, data=GRANT, headers=EBAY_BASIC)
    body = await resp.json()
    assert body["token_type"] == "Application Access Token"
    assert body["expires_in"] == 2
    headers = {
        "Authorization": f"Bearer {body['access_token']}",
        "X-EBAY-C-MARKETPLACE-ID": "EBAY_US",
    }
    assert (await client.get(SEARCH, params={"q": "OEM"}, headers=headers)).status == 200
    clock.now += 2.0
    resp = await client.get(SEARCH, params={"q": "OEM"}, headers=headers)
    assert resp.status == 401
    assert (await resp.json())["errors"][0]["errorId"] == 1001
    await ebay_token(client)
    assert client.app[SANDBOX].tokens_issued == 2


async def test_token_endpoint_checks_client_grant_and_scope(make_client: MakeClient) -> None:
    client = await make_client()
    wrong = {"Authorization": encode_basic_auth("sandbox-client", "nope")}
    resp = await client.post(TOKEN, data=GRANT, headers=wrong)
    assert resp.status == 401
    assert (await resp.json())["error"] == "invalid_client"
    bad_grant = {**GRANT, "grant_type": "password"}
    resp = await client.post(TOKEN, data=bad_grant, headers=EBAY_BASIC)
    assert (await resp.json())["error"] == "unsupported_grant_type"
    resp = await client.post(TOKEN, data={**GRANT, "scope": "x"}, headers=EBAY_BASIC)
    assert (await resp.json())["error"] == "invalid_scope"


async def test_search_needs_a_valid_token_and_marketplace(make_client: MakeClient) -> None:
    client = await make_client()
    for auth in ({}, {"Authorization": "Bearer forged"}, EBAY_BASIC):
        resp = await client.get(SEARCH, params={"q": "OEM"}, headers=auth)
        assert resp.status == 401
        assert (await resp.json())["errors"][0]["errorId"] == 1001
    headers = await ebay_token(client)
    del headers["X-EBAY-C-MARKETPLACE-ID"]
    assert (await client.get(SEARCH, params={"q": "OEM"}, headers=headers)).status == 400


async def test_search_filters_by_query_and_sellers(make_client: MakeClient) -> None:
    client = await make_client(rate=0)
    headers = await ebay_token(client)
    catalog = client.app[SANDBOX].catalog
    found: dict[str, set[str]] = {}
    for term in ("OEM", "brake"):
        ids: list[str] = []
        offset = 0
        while True:
            body = await search(client, headers, q=term, limit="50", offset=str(offset))
            ids += [item["itemId"] for item in body.get("itemSummaries", [])]
            if "next" not in body:
                break
            offset += 50
        assert len(ids) == len(set(ids)) == body["total"]
        assert all(term.lower() in catalog.ebay_item(i)["title"].lower() for i in ids)
        assert all(term in catalog.ebay_terms_of(i) for i in ids)
        found[term] = set(ids)
    assert found["OEM"] & found["brake"]  # some items match both: dedup matters
    assert found["OEM"] - found["brake"]
    assert found["brake"] - found["OEM"]
    assert set(QUERY_TERMS) >= {"OEM", "brake"}

    one = await search(client, headers, q="OEM", filter="sellers:{best-brakes}", limit="200")
    assert {i["seller"]["username"] for i in one["itemSummaries"]} == {"best-brakes"}
    both = await search(client, headers, q="OEM", filter="sellers:{acme-parts|best-brakes}")
    assert both["total"] == len(found["OEM"]) > one["total"]
    either = await search(client, headers, q="(OEM, brake)")
    assert either["total"] == len(found["OEM"] | found["brake"])


async def test_ebay_catalog_mutations(make_client: MakeClient) -> None:
    client = await make_client()
    headers = await ebay_token(client)
    catalog = client.app[SANDBOX].catalog
    first = catalog.ebay_search(q="OEM")[0]["itemId"]
    catalog.set_ebay_price(first, "1.23")
    body = await search(client, headers, q="OEM", limit="1")
    assert body["itemSummaries"][0]["price"] == {"value": "1.23", "currency": "USD"}
    total = body["total"]
    catalog.remove_ebay_item(first)
    new = catalog.add_ebay_item("acme-parts", title="OEM widget")
    body = await search(client, headers, q="OEM", limit="200")
    ids = [item["itemId"] for item in body["itemSummaries"]]
    assert body["total"] == total
    assert first not in ids
    assert new["itemId"] in ids


@pytest.mark.parametrize(
    ("params", "error_id"),
    [
        ({"offset": "10000", "limit": "50"}, 12029),
        ({"offset": "10050", "limit": "150"}, 12029),
        ({"offset": "30", "limit": "20"}, 12515),
        ({"offset": "-50", "limit": "50"}, 12004),
        ({"limit": "201"}, 12006),
        ({"limit": "x"}, 12007),
        ({"q": ""}, 12001),
    ],
)
async def test_search_paging_rules(
    make_client: MakeClient, params: dict[str, str], error_id: int
) -> None:
    client = await make_client()
    headers = await ebay_token(client)
    resp = await client.get(SEARCH, params={"q": "OEM", **params}, headers=headers)
    assert resp.status == 400
    assert (await resp.json())["errors"][0]["errorId"] == error_id


async def test_search_stops_at_ten_thousand(make_client: MakeClient) -> None:
    client = await make_client(ebay_items=5100)  # 10 200 items match "for"
    headers = await ebay_token(client)
    last = await search(client, headers, q="for", limit="100", offset="9900")
    assert last["total"] == 10_200
    assert len(last["itemSummaries"]) == 100
    assert "next" not in last
    assert "prev" in last
    beyond = await search(client, headers, q="no-such-word", offset="9900", limit="100")
    assert beyond["total"] == 0
    assert "itemSummaries" not in beyond


async def test_ebay_rate_limit_is_2001(make_client: MakeClient) -> None:
    client = await make_client()
    headers = await ebay_token(client)
    for _ in range(3):
        await search(client, headers, q="OEM")
    resp = await client.get(SEARCH, params={"q": "OEM"}, headers=headers)
    assert resp.status == 429
    error = (await resp.json())["errors"][0]
    assert error["errorId"] == 2001
    assert error["message"] == "The request limit has been reached for the resource."


# -- faults --------------------------------------------------------------------


async def test_slow_pages(make_client: MakeClient) -> None:
    client = await make_client(rate=0, faults=Faults(delay=0.2, slow_pages={2}))
    started = time.monotonic()
    await read(client, 1)
    fast = time.monotonic() - started
    await read(client, 2)
    slow = time.monotonic() - started - fast
    assert slow >= 0.2 > fast


async def test_fail_next_requests(make_client: MakeClient) -> None:
    client = await make_client(rate=0)
    headers = await ebay_token(client)
    client.app[SANDBOX].faults.update({"fail_next": 2, "fail_status": 502})
    assert (await client.post(f"{EMAG}/count", headers=MAIN)).status == 502
    await ebay_token(client)  # token requests neither fail nor use up the count
    assert (await client.get(SEARCH, params={"q": "OEM"}, headers=headers)).status == 502
    assert (await client.post(f"{EMAG}/count", headers=MAIN)).status == 200
    with pytest.raises(ValueError, match="fail_status"):
        Faults(fail_status=404)


async def test_malformed_json_page(make_client: MakeClient) -> None:
    client = await make_client(rate=0, faults=Faults(malformed_json_pages={2}))
    await read(client, 1)
    resp = await client.post(f"{EMAG}/read", json={"data": {"currentPage": 2}}, headers=MAIN)
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(await resp.read())
    headers = await ebay_token(client)
    resp = await client.get(
        SEARCH, params={"q": "for", "limit": "10", "offset": "10"}, headers=headers
    )
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(await resp.read())


async def test_malformed_item_page(make_client: MakeClient) -> None:
    client = await make_client(rate=0, faults=Faults(malformed_item_pages={1}))
    offers = (await read(client, 1))["results"]
    assert "id" not in offers[0]
    assert offers[0]["sale_price"] == "abc"
    assert all("id" in offer for offer in offers[1:])
    headers = await ebay_token(client)
    items = (await search(client, headers, q="OEM"))["itemSummaries"]
    assert "itemId" not in items[0]
    assert items[0]["price"]["value"] == "abc"
    assert client.app[SANDBOX].catalog.ebay_search(q="OEM")[0]["itemId"]  # the catalogue is intact


async def test_error_page(make_client: MakeClient) -> None:
    client = await make_client(rate=0, faults=Faults(error_pages={3}))
    body = await read(client, 3)
    assert body["isError"] is True
    assert body["messages"]
    headers = await ebay_token(client)
    resp = await client.get(
        SEARCH, params={"q": "for", "limit": "5", "offset": "10"}, headers=headers
    )
    assert resp.status == 500
    assert (await resp.json())["errors"][0]["errorId"] == 12000


async def test_faults_endpoint(make_client: MakeClient) -> None:
    client = await make_client()
    resp = await client.post("/_sandbox/faults", json={"error_pages": [2], "rate_limit": False})
    assert (await resp.json())["error_pages"] == [2]
    assert client.app[SANDBOX].faults.error_pages == {2}
    assert client.app[SANDBOX].limit() == 0
    resp = await client.post("/_sandbox/faults", json={"delay": 0.5, "slow_pages": [1, 2]})
    assert (await resp.json())["delay"] == 0.5
    for bad in ({"bogus": 1}, {"fail_status": 404, "fail_next": 3}, {"rate_limit": "no"}):
        resp = await client.post("/_sandbox/faults", json=bad)
        assert resp.status == 400
    assert client.app[SANDBOX].faults.fail_next == 0  # a rejected change changes nothing
    assert (await (await client.get("/_sandbox/faults")).json())["slow_pages"] == [1, 2]


# -- observability and serving -------------------------------------------------


async def test_requests_are_recorded(make_client: MakeClient, clock: FakeClock) -> None:
    client = await make_client()
    await read(client, 2)
    await client.post(f"{EMAG}/count", headers=FBE)
    await client.post(f"{EMAG}/read", json={}, headers={})
    records = client.app[REQUESTS]
    assert [(r.who, r.page, r.status) for r in records] == [
        ("main", 2, 200),
        ("fbe", None, 200),
        ("", None, 401),
    ]
    assert records[0].at == clock.now
    assert records[0].path == f"{EMAG}/read"
    listed = await (await client.get("/_sandbox/requests")).json()
    assert listed[0]["who"] == "main"
    assert len(listed) == 3
    stats = await (await client.get("/_sandbox/stats")).json()
    assert stats["by_status"] == {"200": 2, "401": 1}
    assert stats["peak_per_period"] == {"emag:main": 1, "emag:fbe": 1}
    assert stats["catalog"]["emag"]["ro/main"] == 250


async def test_serve_prints_base_urls_and_serves(capsys: pytest.CaptureFixture[str]) -> None:
    task = asyncio.create_task(serve(SandboxConfig(emag_items=10), host="127.0.0.1", port=0))
    for _ in range(200):
        out = capsys.readouterr().out
        if out:
            break
        await asyncio.sleep(0.01)
    assert out.count("\n") == 1
    assert "/emag/ro/api-3" in out
    base = out.split("eMAG ")[1].split("/emag/")[0]
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}{EMAG}/count", headers=MAIN) as resp,
    ):
        assert (await resp.json())["results"]["noOfItems"] == "10"
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_main_rejects_bad_options() -> None:
    with pytest.raises(SystemExit) as exc:
        sandbox_app.main(["--rate", "-1"])
    assert exc.value.code == 2
