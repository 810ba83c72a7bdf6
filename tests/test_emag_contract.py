"""eMAG's published contract (API v4.4.9), held against the connector and the sandbox.

What eMAG's own document leaves open (the body of a product_offer/count answer) is
read strictly: a count the connector cannot read fails the run, quoting the answer,
instead of passing for an empty, complete catalogue. The rate-limit answer is the
one §1.5 shows: HTTP 429, `{"message":"API rate limit exceeded"}`, X-RateLimit-*-3second
headers, no isError and no Retry-After. See docs/catalog.md, "eMAG".
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpServer

from worker import db
from worker.connectors.emag import read_count, read_envelope
from worker.errors import UpstreamError
from worker.jobs.marketplaces import EmagOffersJob
from worker.upstream import Response, RetryPolicy, Upstream, open_upstream

from .test_catalog_sync import (
    QUICK,
    Marketplace,
    emag_catalogue,
    emag_params,
    fields_of,
    products,
    start_marketplace,
    sync,
)

MAIN = {"Authorization": aiohttp.encode_basic_auth("main@example.com", "main-secret")}
FBE = {"Authorization": aiohttp.encode_basic_auth("fbe@example.com", "fbe-secret")}
RATE_LIMITED = b'{"message":"API rate limit exceeded"}'


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with open_upstream(retry=QUICK) as up:
        yield up


async def post(
    market: Marketplace, action: str, data: dict[str, Any], login: dict[str, str] = MAIN
) -> Response:
    """One request to the sandbox's eMAG, as the `main` seller unless told otherwise."""
    url = f"{market.emag_url}/product_offer/{action}"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json={"data": data}, headers=login) as resp,
    ):
        return Response(resp.status, CIMultiDict(resp.headers), await resp.read(), url)


def gone(rows: dict[str, dict[str, Any]]) -> list[str]:
    return sorted(eid for eid, row in rows.items() if row["gone_at"] is not None)


def reads_after(market: Marketplace, before: int) -> list[int]:
    """The pages read (any status) by the requests after the first `before`."""
    return [r.page for r in market.requests[before:] if r.page is not None]


# -- the count ----------------------------------------------------------------------


async def test_count_without_its_fields_fails_the_run_quoting_it_and_marks_nothing_gone(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    # Gone-marking with every guard lowered: only the connector stands between a
    # count it cannot read and a catalogue marked gone.
    params = emag_params(market, monkeypatch, mark_gone=True, gone_after=1, gone_guard=0)
    job = EmagOffersJob()
    assert (await sync(pool, upstream, job, params)).error is None
    assert len(await products(pool, "emag", "main")) == 45
    market.sandbox.faults.emag_count_without_fields = True
    before = len(market.requests)

    out = await sync(pool, upstream, job, params)

    assert out.row["status"] == "failed"
    assert out.error is not None
    assert "product_offer/count" in out.error
    assert "noOfItems" in out.error
    assert '{"isError":false,"messages":[],"results":{}}' in out.error  # the answer, quoted
    assert reads_after(market, before) == []  # not a single page read on a count like that
    rows = await products(pool, "emag", "main")
    assert len(rows) == 45
    assert gone(rows) == []
    assert "gone" not in out.stats


@pytest.mark.parametrize("as_strings", [True, False], ids=["strings", "numbers"])
async def test_counts_as_numeric_strings_or_numbers_sync_every_offer(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
    as_strings: bool,
) -> None:
    market = await start_marketplace(aiohttp_server)
    market.sandbox.faults.emag_count_as_strings = as_strings
    body = (await post(market, "count", {"itemsPerPage": 10})).json()
    expected: dict[str, Any] = {"noOfItems": 45, "noOfPages": 5, "itemsPerPage": 10}
    if as_strings:  # as clients see them: {"noOfItems": "38", ...}
        expected = {key: str(value) for key, value in expected.items()}
    assert body == {"isError": False, "messages": [], "results": expected}

    out = await sync(pool, upstream, EmagOffersJob(), emag_params(market, monkeypatch))

    assert out.error is None
    assert out.result["items"] == 45
    assert out.row["progress"]["total"] == 45
    assert fields_of(await products(pool, "emag", "main")) == emag_catalogue(market)


@pytest.mark.parametrize(
    "value", ["abc", -1, True, 3.5, "-1", "3.5", "", [45], {"value": 45}], ids=repr
)
async def test_a_count_that_is_not_a_whole_number_fails_the_run(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
    value: Any,
) -> None:
    market = await start_marketplace(aiohttp_server)
    market.sandbox.faults.emag_count_value = value
    params = emag_params(market, monkeypatch, mark_gone=True, gone_after=1, gone_guard=0)

    out = await sync(pool, upstream, EmagOffersJob(), params)

    assert out.row["status"] == "failed"
    assert out.error is not None
    assert "product_offer/count" in out.error
    assert "noOfItems" in out.error
    assert '"results":{"noOfItems":' in out.error  # the answer, quoted
    assert market.pages_read() == []
    assert await products(pool, "emag", "main") == {}


@pytest.mark.parametrize(
    ("results", "items", "pages"),
    [
        ({"noOfItems": "38", "noOfPages": "1", "itemsPerPage": "100"}, 38, 1),
        ({"noOfItems": 38, "noOfPages": 1}, 38, 1),
        ({"noOfItems": 38.0}, 38, 1),  # noOfPages is optional: worked out from the items
        ({"noOfItems": "0", "noOfPages": "0"}, 0, 0),
        # A page count that disagrees is never allowed to shorten the pass.
        ({"noOfItems": "250", "noOfPages": "1"}, 250, 3),
        ({"noOfItems": "38", "noOfPages": "4"}, 38, 4),
    ],
)
def test_read_count_takes_whole_numbers_and_numeric_strings(
    results: Any, items: int, pages: int
) -> None:
    count = read_count(results, per_page=100)
    assert (count.items, count.pages) == (items, pages)


@pytest.mark.parametrize(
    "results",
    [
        {},
        [],
        None,
        38,
        "38",
        {"noOfPages": "1"},
        {"noOfItems": "38", "noOfPages": "x"},
        {"noOfItems": "38", "noOfPages": -1},
        {"noOfItems": " 38"},
        {"noOfItems": "1e3"},
        {"noOfItems": float("inf")},
        {"noOfItems": False},
        {"noOfItems": None},
        {"noOfItems": "38", "noOfPages": None},
    ],
    ids=repr,
)
def test_read_count_refuses_anything_else(results: Any) -> None:
    with pytest.raises(ValueError, match="noOf"):
        read_count(results, per_page=100)


# -- isError ------------------------------------------------------------------------


async def test_is_error_count_fails_the_run_with_emags_message(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    market.sandbox.faults.emag_count_error = "Invalid vendor ip [203.0.113.7]"
    assert (await post(market, "count", {})).json() == {
        "isError": True,
        "messages": ["Invalid vendor ip [203.0.113.7]"],
        "results": [],
    }

    out = await sync(pool, upstream, EmagOffersJob(), emag_params(market, monkeypatch))

    assert out.row["status"] == "failed"
    assert out.error is not None
    assert "isError" in out.error
    assert "Invalid vendor ip [203.0.113.7]" in out.error
    assert market.statuses("emag") == [200, 200]  # the probe above and the count: no retry
    assert market.pages_read() == []


def answer(body: bytes, status: int = 200) -> Response:
    return Response(status, {}, body, "https://marketplace-api.emag.ro/api-3/product_offer/read")


@pytest.mark.parametrize(
    ("body", "shown"),
    [
        (
            b'{"isError":true,"messages":["Invalid vendor ip [x]"],"results":[]}',
            "Invalid vendor ip",
        ),
        # The document words this one as "isError:true" and "message: ...".
        (
            b'{"isError":true,"message":"Maximum input vars of 4000 exceeded"}',
            "Maximum input vars of 4000 exceeded",
        ),
        (b'{"isError":true,"messages":"You are not allowed to use this API"}', "not allowed"),
        (b'{"isError":true,"messages":[{"code":7,"text":"Bad filter"}]}', '"text":"Bad filter"'),
        (b'{"isError":true,"messages":[],"errors":["status must be 0 or 1"]}', "status must be"),
        (b'{"isError":true,"messages":[]}', '{"isError":true,"messages":[]}'),
    ],
)
def test_is_error_answers_show_what_emag_said(body: bytes, shown: str) -> None:
    with pytest.raises(UpstreamError, match="isError") as caught:
        read_envelope(answer(body))
    assert shown in str(caught.value)  # a string of messages is not split into characters


@pytest.mark.parametrize(
    "body",
    [b'{"isError":"false","results":[]}', b'{"isError":null,"results":[]}', b'{"isError":0}'],
)
def test_is_error_other_than_false_is_not_success(body: bytes) -> None:
    # §1.4: the answer "must contain the key isError and its value must be false".
    with pytest.raises(UpstreamError, match="isError") as caught:
        read_envelope(answer(body))
    assert body.decode() in str(caught.value)


# -- the rate limit -----------------------------------------------------------------


async def test_429_is_the_answer_the_document_shows(aiohttp_server: AiohttpServer) -> None:
    market = await start_marketplace(aiohttp_server, rate=3)
    for _ in range(3):
        assert (await post(market, "count", {})).status == 200

    refused = await post(market, "count", {})

    assert refused.status == 429
    assert refused.body == RATE_LIMITED  # no isError: the gateway answers, not the API
    assert refused.headers["Content-Type"] == "application/json; charset=utf-8"
    assert refused.headers["X-RateLimit-Limit-3second"] == "3"
    assert refused.headers["X-RateLimit-Remaining-3second"] == "0"
    assert "Retry-After" not in refused.headers
    # Per seller login: another seller on the same platform has its own window.
    assert (await post(market, "count", {}, login=FBE)).status == 200


async def test_429_with_emags_body_is_retried_after_one_window_and_the_sync_completes(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server, emag_items=25)
    # Another client of the same seller login has used the window up: the count and
    # its first retry are refused with the documented 429 (no Retry-After).
    market.sandbox.faults.emag_rate_limited_next = 2
    params = emag_params(market, monkeypatch, rate_limit=3)  # eMAG's 3 requests/s
    async with open_upstream(retry=RetryPolicy(attempts=4, base=0.01)) as upstream:
        out = await sync(pool, upstream, EmagOffersJob(), params)

    assert out.error is None, out.error
    emag = [r for r in market.requests if r.api == "emag"]
    assert [r.status for r in emag] == [429, 429, 200, 200, 200, 200]
    window = 1.0 + 0.03  # Rate.per_second(3).window: one second and the limiter's margin
    for refused, retry in itertools.pairwise(emag[:3]):
        assert retry.at - refused.at >= window - 0.01
    assert sorted(market.pages_read()) == [1, 2, 3]
    assert out.result["items"] == 25
    assert fields_of(await products(pool, "emag", "main")) == emag_catalogue(market)


async def test_429_that_outlasts_the_retries_fails_as_a_rate_limit_not_a_bad_envelope(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    market.sandbox.faults.emag_rate_limited_next = 50
    policy = RetryPolicy(attempts=2, base=0.01, rate_limited_wait=0.05)
    async with open_upstream(retry=policy) as upstream:
        out = await sync(pool, upstream, EmagOffersJob(), emag_params(market, monkeypatch))

    assert out.error is not None
    assert "rate limit" in out.error
    assert "HTTP 429" in out.error
    assert "API rate limit exceeded" in out.error
    assert "envelope" not in out.error
    assert market.statuses("emag") == [429, 429]
