"""A hanging upstream is visible: per-job timeouts, retries logged at warning level with
a redacted URL and what was fetched, the run's progress saying what it waits for, and
no credential in a log line, an error or a metric label.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import REGISTRY
from pytest_aiohttp import AiohttpServer

import worker.jobs
from worker import db, runs
from worker.config import JobSpec
from worker.context import RunContext
from worker.errors import UpstreamError
from worker.jobs.http import HttpJob
from worker.jobs.marketplaces import EmagOffersJob
from worker.ratelimit import Rate, RateLimiter
from worker.upstream import RetryPolicy, Timeouts, Upstream, open_upstream

from .test_catalog_sync import emag_params, start_marketplace, sync

SECRETS = ("s3cret", "tok-abc", "alice")
QUICK = RetryPolicy(attempts=3, base=0.001, cap=0.01)


class Hanging:
    """/hang never answers (until the test ends); /flaky answers 503 once, then 200."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.flaky = 0

    async def handle(self, request: web.Request) -> web.Response:
        if request.path == "/hang":
            await self.release.wait()
            return web.Response(text="too late")
        self.flaky += 1
        return web.Response(status=503 if self.flaky == 1 else 200, text="{}")


@pytest.fixture
async def server(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
) -> AsyncIterator[TestServer]:
    hanging = Hanging()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hanging.handle)
    yield await aiohttp_server(app)
    hanging.release.set()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    # The process defaults: long enough that only a job's own timeout can end a hang.
    async with open_upstream(limiter=RateLimiter(Rate(calls=0)), retry=QUICK) as up:
        yield up


def secret_url(server: TestServer, path: str, *, userinfo: bool = True) -> str:
    who = "alice:s3cret@" if userinfo else ""  # the http kind refuses userinfo itself
    return f"http://{who}127.0.0.1:{server.port}{path}?token=tok-abc&page=5"


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked into {text!r}"


BASE_PARAMS: dict[str, dict[str, Any]] = {
    "http": {"url": "https://receiver.example/run"},
    "emag.offers": {
        "account": "a",
        "platform": "ro",
        "username_env": "U",
        "password_env": "P",
    },
    "ebay.catalog": {
        "account": "a",
        "client_id_env": "I",
        "client_secret_env": "S",
        "queries": ["brake"],
    },
}


@pytest.mark.parametrize("kind", list(BASE_PARAMS))
@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"read_timeout": 0}, "read_timeout"),
        ({"connect_timeout": -1}, "connect_timeout"),
        ({"total_timeout": "60"}, "total_timeout"),
        ({"read_timeout": True}, "read_timeout"),
        ({"connect_timeout": float("inf")}, "connect_timeout"),
        ({"read_timeout": 90, "total_timeout": 60}, "read_timeout"),
    ],
)
def test_timeout_params_are_checked_when_the_jobs_file_loads(
    kind: str, bad: dict[str, Any], named: str
) -> None:
    job = worker.jobs.kinds()[kind]
    good = JobSpec(
        name="j",
        kind=kind,
        schedule=None,
        params=BASE_PARAMS[kind] | {"connect_timeout": 2, "read_timeout": 5.5, "total_timeout": 60},
    )
    job.check(good)
    with pytest.raises(ValueError, match=named):
        job.check(JobSpec(name="j", kind=kind, schedule=None, params=BASE_PARAMS[kind] | bad))


def test_timeouts_keep_the_sessions_where_a_job_sets_none() -> None:
    assert Timeouts.from_params({}) == Timeouts()
    assert Timeouts.from_params({"read_timeout": 2}) == Timeouts(read=2.0)


async def run_http_job(pool: db.Pool, upstream: Upstream, params: dict[str, Any]) -> int:
    """One run of an `http` job; returns its run id (the run may raise)."""
    spec = JobSpec(name="poke", kind="http", schedule=None, params=params)
    HttpJob().check(spec)
    await db.raise_fence(pool, token=1, holder="test")
    run_id = await runs.enqueue(pool, job=spec.name, kind=spec.kind, params=spec.params)
    ctx = RunContext(
        run_id=run_id,
        job=spec,
        token=1,
        trigger="manual",
        slot=None,
        params=spec.params,
        pool=pool,
        upstream=upstream,
        worker_id="test",
    )
    await HttpJob().run(ctx)
    return run_id


async def test_a_jobs_read_timeout_ends_a_hang_and_the_progress_says_so(
    server: TestServer, pool: db.Pool, upstream: Upstream
) -> None:
    url = secret_url(server, "/hang", userinfo=False)
    params = {"url": url, "read_timeout": 0.3, "rate_limit": 0}
    with pytest.raises(UpstreamError) as caught:
        # The session's own read timeout is 30 s: only the job's can end this in time.
        async with asyncio.timeout(10):
            await run_http_job(pool, upstream, params)

    message = str(caught.value)
    assert "a read timeout" in message
    assert f"127.0.0.1:{server.port}/hang" in message
    assert "after 3 attempts" in message
    assert_no_secret(message)
    assert_no_secret(caught.value.url)
    progress = await pool.fetchval("SELECT progress->>'message' FROM runs")
    assert progress.endswith("retry 2/2 after a read timeout")
    assert_no_secret(progress)


async def test_retries_are_warnings_naming_what_and_the_redacted_url(
    server: TestServer, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    told: list[str] = []

    async def on_retry(message: str) -> None:
        told.append(message)

    client = upstream.bound(on_retry=on_retry)
    with caplog.at_level(logging.INFO, logger="worker.upstream"):
        response = await client.request("GET", secret_url(server, "/flaky"), what="page 5")

    assert response.status == 200
    assert_no_secret(response.url)
    [record] = [r for r in caplog.records if r.name == "worker.upstream"]
    assert record.levelno == logging.WARNING
    line = record.getMessage()
    assert line.startswith("upstream page 5: GET http://")
    assert f"127.0.0.1:{server.port}/flaky?token=" in line
    assert "HTTP 503" in line
    assert "retry 1/2" in line
    assert_no_secret(line)
    assert told == ["page 5: retry 1/2 after HTTP 503"]


async def test_an_upstream_error_names_what_was_fetched_without_secrets(
    server: TestServer, upstream: Upstream
) -> None:
    client = upstream.bound(timeouts=Timeouts(read=0.2))
    with pytest.raises(UpstreamError) as caught:
        await client.request("GET", secret_url(server, "/hang"), what="page 7")

    message = str(caught.value)
    assert message.startswith("page 7: GET http://")
    assert "a read timeout" in message
    assert_no_secret(message)


def label_values() -> list[str]:
    return [
        value
        for family in REGISTRY.collect()
        if family.name.startswith(("worker_upstream", "worker_rate_limit"))
        for sample in family.samples
        for value in sample.labels.values()
    ]


async def test_metric_labels_carry_the_host_and_port_only(server: TestServer) -> None:
    # Limited by the default key (so the wait is observed under it) and retried once.
    async with open_upstream(retry=QUICK) as upstream:
        response = await upstream.request("GET", secret_url(server, "/flaky"))
    assert response.status == 200

    values = label_values()
    assert f"127.0.0.1:{server.port}" in values
    for value in values:
        assert_no_secret(value)


async def test_a_catalogue_run_waiting_on_a_page_says_so(
    aiohttp_server: AiohttpServer, pool: db.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    market = await start_marketplace(aiohttp_server)
    faults = market.sandbox.faults
    faults.delay, faults.slow_pages = 3.0, {3}
    params = emag_params(market, monkeypatch, read_timeout=0.2)

    async with open_upstream(retry=QUICK) as upstream:  # the session's read timeout: 30 s
        async with asyncio.timeout(20):
            out = await sync(pool, upstream, EmagOffersJob(), params)

    assert out.error is not None
    assert "a read timeout" in out.error
    assert "/product_offer/read" in out.error
    assert out.row["progress"]["message"].endswith("retry 2/2 after a read timeout")
