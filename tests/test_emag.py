"""The eMAG offers sync against the sandbox: errors, credentials, the rate limit, retries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from pytest_aiohttp import AiohttpServer

from worker import db
from worker.jobs.marketplaces import EmagOffersJob
from worker.sandbox import max_in_window
from worker.upstream import RetryPolicy, Upstream, open_upstream

from .helpers import eventually
from .test_catalog_sync import (
    EMAG_PASSWORD_ENV,
    QUICK,
    Marketplace,
    emag_catalogue,
    emag_params,
    fields_of,
    products,
    start_marketplace,
    sync,
)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with open_upstream(retry=QUICK) as up:
        yield up


def peak_per_second(market: Marketplace, account: str = "main") -> int:
    """The most requests of one account that reached the sandbox in any 1 s window."""
    times = [r.at for r in market.requests if r.api == "emag" and r.who == account]
    return max_in_window(times, 1.0)


async def test_is_error_fails_the_run_with_emags_message(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    market.sandbox.faults.error_pages = {3}

    out = await sync(pool, upstream, EmagOffersJob(), emag_params(market, monkeypatch))

    assert out.row["status"] == "failed"
    assert out.error is not None
    assert "isError" in out.error
    assert "Sandbox fault: page 3 could not be read" in out.error
    assert set(await products(pool, "emag", "main")) == {str(i) for i in range(1, 21)}
    assert out.cursor == {"page": 3}


async def test_wrong_password_fails_at_once_with_a_credentials_error(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    params = emag_params(market, monkeypatch)
    monkeypatch.setenv(EMAG_PASSWORD_ENV, "not-the-password")

    out = await sync(pool, upstream, EmagOffersJob(), params)

    assert out.error is not None
    assert "refused the credentials (HTTP 401)" in out.error
    assert "not-the-password" not in out.error
    assert market.statuses("emag") == [401]  # not retried
    assert await products(pool, "emag", "main") == {}


async def test_unset_credentials_variable_is_named(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    params = emag_params(market, monkeypatch)
    monkeypatch.delenv(EMAG_PASSWORD_ENV)

    out = await sync(pool, upstream, EmagOffersJob(), params)

    assert out.error is not None
    assert f"environment variable {EMAG_PASSWORD_ENV}" in out.error
    assert "password_env" in out.error
    assert market.requests == []


async def test_default_rate_limit_keeps_under_the_sandbox_limit(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 1 count + 6 reads at eMAG's 3 requests/s: a little over 2 s.
    market = await start_marketplace(aiohttp_server, rate=3, emag_items=60)
    params = emag_params(market, monkeypatch)
    del params["rate_limit"]  # the default: 3 per second

    out = await sync(pool, upstream, EmagOffersJob(), params)

    assert out.error is None
    assert 429 not in market.statuses("emag")
    assert peak_per_second(market) <= 3
    assert len(market.requests) == 7
    assert fields_of(await products(pool, "emag", "main")) == emag_catalogue(market)


async def test_too_high_rate_limit_meets_429s_that_are_backed_off_and_retried(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server, rate=3, emag_items=60)
    params = emag_params(market, monkeypatch, rate_limit=10, prefetch=3)
    # Enough attempts that a request refused a few times in a row still gets through.
    async with open_upstream(retry=RetryPolicy(attempts=12, base=0.01)) as upstream:
        out = await sync(pool, upstream, EmagOffersJob(), params)

    assert out.error is None
    statuses = market.statuses("emag")
    assert 429 in statuses
    assert statuses.count(200) == 7  # every request got through in the end
    assert sorted(market.pages_read()) == [1, 2, 3, 4, 5, 6]
    assert fields_of(await products(pool, "emag", "main")) == emag_catalogue(market)


async def test_503s_are_retried_and_the_sync_succeeds(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    market.sandbox.faults.fail_next = 2
    market.sandbox.faults.fail_status = 503

    out = await sync(pool, upstream, EmagOffersJob(), emag_params(market, monkeypatch))

    assert out.error is None
    assert market.statuses("emag").count(503) == 2
    assert fields_of(await products(pool, "emag", "main")) == emag_catalogue(market)


async def test_5xx_beyond_the_retries_fails_the_run(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    market.sandbox.faults.fail_next = 50
    market.sandbox.faults.fail_status = 502

    out = await sync(pool, upstream, EmagOffersJob(), emag_params(market, monkeypatch))

    assert out.error is not None
    assert "502" in out.error
    assert market.statuses("emag") == [502] * QUICK.attempts


async def test_5xx_beyond_the_retries_is_reported_as_the_status(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    market.sandbox.faults.fail_next = 50
    market.sandbox.faults.fail_status = 502

    out = await sync(pool, upstream, EmagOffersJob(), emag_params(market, monkeypatch))

    assert out.error is not None
    assert "HTTP 502" in out.error
    assert "malformed JSON" not in out.error


async def test_slow_page_times_out_and_is_retried(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    faults = market.sandbox.faults
    faults.delay, faults.slow_pages = 2.0, {2}

    async def heal_after_first_try() -> None:
        await eventually(lambda: 2 in [r.page for r in market.requests])
        faults.delay = 0.0  # the request already waiting stays slow; its retry is not

    healer = asyncio.create_task(heal_after_first_try())
    async with open_upstream(retry=QUICK, read_timeout=0.3) as upstream:
        out = await sync(pool, upstream, EmagOffersJob(), emag_params(market, monkeypatch))
    await healer

    assert out.error is None
    tries = [r.status for r in market.requests if r.page == 2]
    assert len(tries) == 2  # the timed-out try and the retry
    assert tries[-1] == 200
    assert fields_of(await products(pool, "emag", "main")) == emag_catalogue(market)


async def test_page_that_keeps_timing_out_fails_the_run_with_a_timeout_reason(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    faults = market.sandbox.faults
    faults.delay, faults.slow_pages = 0.6, {3}

    async with open_upstream(retry=QUICK, read_timeout=0.2) as upstream:
        out = await sync(pool, upstream, EmagOffersJob(), emag_params(market, monkeypatch))

    assert out.error is not None
    assert "timeout" in out.error.lower()
    assert f"after {QUICK.attempts} attempts" in out.error
    assert [r.page for r in market.requests].count(3) == QUICK.attempts
    assert out.cursor == {"page": 3}
    assert set(await products(pool, "emag", "main")) == {str(i) for i in range(1, 21)}


async def test_malformed_json_fails_the_run_and_keeps_earlier_pages(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    market.sandbox.faults.malformed_json_pages = {4}

    out = await sync(pool, upstream, EmagOffersJob(), emag_params(market, monkeypatch))

    assert out.row["status"] == "failed"
    assert out.error is not None
    assert "malformed JSON" in out.error
    expected = {k: v for k, v in emag_catalogue(market).items() if int(k) <= 30}
    assert fields_of(await products(pool, "emag", "main")) == expected
    assert out.cursor == {"page": 4}
    assert out.stats["pages"] == 3
