"""Upstream.request against a local aiohttp server that answers from a script per path."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import REGISTRY

from worker.errors import UpstreamError
from worker.ratelimit import Rate, RateLimiter
from worker.upstream import RetryPolicy, Upstream, open_upstream, retry_after

HOST = "127.0.0.1"
QUICK = RetryPolicy(attempts=4, base=0.001, cap=0.01)

Reply = tuple[int, dict[str, str], bytes]


class Script:
    """Per path, the replies to give in order (the last one repeats), and the arrival times."""

    def __init__(self) -> None:
        self.replies: dict[str, list[Reply]] = {}
        self.hits: dict[str, list[float]] = {}
        self.hang = asyncio.Event()  # set before the server closes, so /hang handlers end

    def on(self, path: str, *replies: int | Reply) -> str:
        self.replies[path] = [r if isinstance(r, tuple) else (r, {}, b"{}") for r in replies]
        return path

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.hits.setdefault(path, []).append(time.monotonic())
        if path == "/hang":
            await self.hang.wait()
            return web.Response(text="too late")
        replies = self.replies[path]
        status, headers, body = replies.pop(0) if len(replies) > 1 else replies[0]
        return web.Response(status=status, headers=headers, body=body)


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
async def server(
    script: Script, aiohttp_server: Callable[[web.Application], Awaitable[TestServer]]
) -> AsyncIterator[TestServer]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", script.handle)
    yield await aiohttp_server(app)
    script.hang.set()  # before aiohttp_server's teardown closes the server


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    # Unlimited, so the tests measure retry waits and not the rate limiter.
    async with open_upstream(limiter=RateLimiter(Rate(calls=0)), retry=QUICK) as up:
        yield up


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port bound but not listening: connections are refused and no one else can take it."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        yield int(sock.getsockname()[1])


def requests_total(code: str, host: str) -> float:
    """The attempts counted for `host` (its label is host:port, never userinfo)."""
    value = REGISTRY.get_sample_value(
        "worker_upstream_requests_total", {"host": host, "code": code}
    )
    return value or 0.0


async def test_retries_server_errors_then_succeeds(
    server: TestServer, script: Script, upstream: Upstream
) -> None:
    path = script.on("/flaky", 500, 502, 503, (200, {}, b'{"ok": true}'))
    host = f"{HOST}:{server.port}"
    before = {code: requests_total(code, host) for code in ("500", "502", "503", "200")}

    response = await upstream.request("GET", str(server.make_url(path)))

    assert response.status == 200
    assert response.ok
    assert response.json() == {"ok": True}
    assert len(script.hits[path]) == 4
    for code in before:
        assert requests_total(code, host) - before[code] == 1


async def test_returns_last_server_error_when_attempts_run_out(
    server: TestServer, script: Script, upstream: Upstream
) -> None:
    path = script.on("/down", 503)
    response = await upstream.request(
        "GET", str(server.make_url(path)), retry=RetryPolicy(attempts=3, base=0.001)
    )
    assert response.status == 503
    assert not response.ok
    assert len(script.hits[path]) == 3


async def test_429_waits_for_retry_after(
    server: TestServer, script: Script, upstream: Upstream
) -> None:
    path = script.on("/busy", (429, {"Retry-After": "0.2"}, b""), 200)
    host = f"{HOST}:{server.port}"
    before = requests_total("429", host)

    response = await upstream.request("GET", str(server.make_url(path)))

    assert response.status == 200
    first, second = script.hits[path]
    # The backoff alone is at most 0.01 s; the gap comes from Retry-After.
    assert second - first >= 0.2
    assert requests_total("429", host) - before == 1


async def test_extra_retry_statuses(server: TestServer, script: Script, upstream: Upstream) -> None:
    path = script.on("/conflict", 409, 200)
    response = await upstream.request(
        "POST", str(server.make_url(path)), retry_statuses=frozenset({409})
    )
    assert response.status == 200
    assert len(script.hits[path]) == 2


@pytest.mark.parametrize("status", [400, 401, 404])
async def test_client_errors_are_not_retried(
    server: TestServer, script: Script, upstream: Upstream, status: int
) -> None:
    path = script.on(f"/no/{status}", (status, {}, b"nope"), 200)
    host = f"{HOST}:{server.port}"
    before = requests_total(str(status), host)

    response = await upstream.request("GET", str(server.make_url(path)))

    assert response.status == status
    assert response.body == b"nope"
    assert len(script.hits[path]) == 1
    assert requests_total(str(status), host) - before == 1


async def test_connection_errors_are_retried_then_raised(
    upstream: Upstream, refused_port: int
) -> None:
    url = f"http://{HOST}:{refused_port}/nothing"
    host = f"{HOST}:{refused_port}"
    before = requests_total("error", host)

    with pytest.raises(UpstreamError) as caught:
        await upstream.request("GET", url, retry=RetryPolicy(attempts=3, base=0.001))

    message = str(caught.value)
    assert url in message
    assert "after 3 attempts" in message
    assert "ClientConnectorError" in message
    assert caught.value.url == url
    assert requests_total("error", host) - before == 3


async def test_timeouts_are_retried_then_raised(server: TestServer, script: Script) -> None:
    url = str(server.make_url("/hang"))
    host = f"{HOST}:{server.port}"
    before = requests_total("timeout", host)

    async with open_upstream(
        limiter=RateLimiter(Rate(calls=0)), read_timeout=0.2, retry=QUICK
    ) as up:
        with pytest.raises(UpstreamError) as caught:
            await up.request("GET", url, retry=RetryPolicy(attempts=2, base=0.001))

    assert url in str(caught.value)
    assert "after 2 attempts" in str(caught.value)
    assert "Timeout" in str(caught.value)
    assert len(script.hits["/hang"]) == 2
    assert requests_total("timeout", host) - before == 2


async def test_malformed_json_raises_upstream_error(
    server: TestServer, script: Script, upstream: Upstream
) -> None:
    path = script.on("/broken", (200, {"Content-Type": "application/json"}, b'{"items": [1, 2'))
    url = str(server.make_url(path))
    response = await upstream.request("GET", url)

    with pytest.raises(UpstreamError, match="malformed JSON") as caught:
        response.json()
    assert url in str(caught.value)
    assert caught.value.status == 200
    assert caught.value.url == url


async def test_limit_key_defaults_to_host_and_port(
    server: TestServer, script: Script, upstream: Upstream
) -> None:
    path = script.on("/ok", 200)
    upstream.limiter.configure(f"{HOST}:{server.port}", Rate(calls=1, period=0.3, margin=0.0))
    await asyncio.gather(*(upstream.request("GET", str(server.make_url(path))) for _ in range(2)))
    first, second = sorted(script.hits[path])
    assert second - first >= 0.3


def test_retry_after_seconds() -> None:
    assert retry_after({"Retry-After": "120"}) == 120.0
    assert retry_after({"Retry-After": "0.2"}) == 0.2
    assert retry_after({"retry-after": "3"}) == 3.0
    assert retry_after({"Retry-After": "-5"}) == 0.0


def test_retry_after_http_date() -> None:
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    wait = retry_after({"Retry-After": future})
    assert wait is not None
    assert 28.0 <= wait <= 30.0  # the header has whole seconds
    past = email.utils.formatdate(time.time() - 30, usegmt=True)
    assert retry_after({"Retry-After": past}) == 0.0
    # An HTTP date without a zone is read as UTC, like GMT.
    naive = email.utils.formatdate(time.time() + 30, usegmt=True).replace(" GMT", " -0000")
    naive_wait = retry_after({"Retry-After": naive})
    assert naive_wait is not None
    assert 28.0 <= naive_wait <= 30.0


@pytest.mark.parametrize("headers", [{}, {"Retry-After": ""}, {"Retry-After": "soon"}])
def test_retry_after_absent_or_unreadable(headers: dict[str, str]) -> None:
    assert retry_after(headers) is None


def test_backoff_is_full_jitter_under_the_cap() -> None:
    policy = RetryPolicy(base=0.5, cap=3.0)
    waits = [policy.backoff(attempt) for attempt in range(8) for _ in range(50)]
    assert all(0.0 <= w <= 3.0 for w in waits)
    assert all(0.0 <= policy.backoff(0) <= 0.5 for _ in range(50))


async def test_429_without_retry_after_waits_out_the_rate_window(
    server: TestServer, script: Script, upstream: Upstream
) -> None:
    # eMAG answers 429 with X-RateLimit-*-3second headers and no Retry-After.
    headers = {"X-RateLimit-Limit-3second": "3", "X-RateLimit-Remaining-3second": "0"}
    path = script.on("/limited", (429, headers, b'{"message": "API rate limit exceeded"}'), 200)
    policy = RetryPolicy(attempts=3, base=0.001, cap=0.01, rate_limited_wait=0.3)

    response = await upstream.request("GET", str(server.make_url(path)), retry=policy)

    assert response.status == 200
    first, second = script.hits[path]
    assert second - first >= 0.3
