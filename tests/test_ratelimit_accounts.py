"""Whose budget a marketplace call spends: eMAG limits each seller account on its own.

The sandbox counts per platform and per account it authenticates (as eMAG does), so
the limiter's key must follow the login, not the job's `account` name: two jobs that
log in as the same seller share 3 requests/s; two sellers get 3 each.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pytest_aiohttp import AiohttpServer

from worker import db
from worker.config import JobSpec
from worker.connectors.emag import EmagOffers
from worker.context import RunContext
from worker.jobs.marketplaces import EmagOffersJob
from worker.sandbox import max_in_window
from worker.upstream import RetryPolicy, Upstream, open_upstream

from .test_catalog_sync import Marketplace, start_marketplace

PAGES = 6  # 60 offers, 10 a page: one count and six reads per pass


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    # Enough attempts that a refused request is retried, not fatal: 429s are counted.
    async with open_upstream(retry=RetryPolicy(attempts=8, base=0.01)) as up:
        yield up


def context(pool: db.Pool, upstream: Upstream, name: str, params: dict[str, Any]) -> RunContext:
    spec = JobSpec(name=name, kind="emag.offers", schedule=None, params=params)
    EmagOffersJob().check(spec)
    return RunContext(
        run_id=1,
        job=spec,
        token=1,
        trigger="manual",
        slot=None,
        params=params,
        pool=pool,
        upstream=upstream,
        worker_id="test",
    )


def emag(market: Marketplace, account: str, login: str) -> dict[str, Any]:
    return {
        "account": account,
        "base_url": market.emag_url,
        "username_env": f"TEST_{login.upper()}_USER",
        "password_env": f"TEST_{login.upper()}_PASSWORD",
        "items_per_page": 10,
    }


@pytest.fixture(autouse=True)
def logins(monkeypatch: pytest.MonkeyPatch) -> None:
    for login in ("main", "fbe"):
        monkeypatch.setenv(f"TEST_{login.upper()}_USER", f"{login}@example.com")
        monkeypatch.setenv(f"TEST_{login.upper()}_PASSWORD", f"{login}-secret")


async def read_all(job: EmagOffersJob, ctx: RunContext) -> int:
    pages = 0
    async for _ in job.connector(ctx).pages(None):
        pages += 1
    return pages


async def test_two_jobs_logged_in_as_one_seller_share_its_budget(
    aiohttp_server: AiohttpServer, pool: db.Pool, upstream: Upstream
) -> None:
    market = await start_marketplace(aiohttp_server, rate=3, emag_items=60)
    job = EmagOffersJob()
    # Different names (say, a full pass and a price watcher), the same seller login.
    one = context(pool, upstream, "offers", emag(market, "main", "main"))
    two = context(pool, upstream, "watch", emag(market, "main-watch", "main"))

    assert await asyncio.gather(read_all(job, one), read_all(job, two)) == [PAGES, PAGES]

    emag_requests = [r for r in market.requests if r.api == "emag"]
    assert [r.status for r in emag_requests].count(429) == 0
    assert max_in_window([r.at for r in emag_requests], 1.0) <= 3


async def test_two_sellers_each_get_their_own_budget(
    aiohttp_server: AiohttpServer, pool: db.Pool, upstream: Upstream
) -> None:
    market = await start_marketplace(aiohttp_server, rate=3, emag_items=60)
    job = EmagOffersJob()
    main = context(pool, upstream, "main", emag(market, "main", "main"))
    fbe = context(pool, upstream, "fbe", emag(market, "fbe", "fbe"))

    assert await asyncio.gather(read_all(job, main), read_all(job, fbe)) == [PAGES, PAGES]

    statuses = [r.status for r in market.requests if r.api == "emag"]
    assert statuses.count(429) == 0
    for seller in ("main", "fbe"):
        times = [r.at for r in market.requests if r.who == seller]
        assert max_in_window(times, 1.0) <= 3
    # Side by side, not one after the other: more than 3 in some second altogether.
    assert max_in_window([r.at for r in market.requests if r.api == "emag"], 1.0) > 3


async def test_limit_key_names_the_host_never_the_login(pool: db.Pool, upstream: Upstream) -> None:
    params = {
        "account": "main",
        "base_url": "https://user:pw@marketplace-api.emag.ro/api-3",
        "username_env": "TEST_MAIN_USER",
        "password_env": "TEST_MAIN_PASSWORD",
    }
    connector = EmagOffersJob().connector(context(pool, upstream, "k", params))
    assert isinstance(connector, EmagOffers)
    key = connector.limit_key
    assert key.startswith("emag:marketplace-api.emag.ro:")
    assert "main" not in key
    assert "example.com" not in key
    assert "pw" not in key
