"""Redirects: a job's credentials never follow one to another origin.

Two local servers are two origins (same host, other port). `here` redirects (to
itself or to `there`) and both record every request that reached them. aiohttp on
its own drops only `Authorization` across origins: the `X-API-Key` of an `http` job's
`headers_env` would go along.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from worker.ratelimit import Rate, RateLimiter
from worker.upstream import MAX_REDIRECTS, Upstream, open_upstream

SECRETS = {"X-API-Key": "k-123", "Authorization": "Bearer t-456", "X-Token": "t-789"}
PLAIN = {"Accept": "application/json", "User-Agent": "sync-worker-test"}

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


@dataclass
class Origin:
    """A server that answers /hop with `status` to `location` and records everything."""

    status: int = 302
    location: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)
    server: TestServer | None = None

    def url(self, path: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(path))

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "headers": dict(request.headers),
                "body": await request.read(),
            }
        )
        if request.path == "/hop":
            return web.Response(status=self.status, headers={"Location": self.location})
        if request.path == "/loop":
            return web.Response(status=302, headers={"Location": "/loop"})
        return web.json_response({"ok": True})


async def start(origin: Origin, aiohttp_server: ServerFactory) -> Origin:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", origin.handle)
    origin.server = await aiohttp_server(app)
    return origin


@pytest.fixture
async def here(aiohttp_server: ServerFactory) -> Origin:
    return await start(Origin(), aiohttp_server)


@pytest.fixture
async def there(aiohttp_server: ServerFactory) -> Origin:
    return await start(Origin(), aiohttp_server)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with open_upstream(limiter=RateLimiter(Rate(calls=0))) as up:
        yield up


async def test_credentials_do_not_follow_a_redirect_to_another_origin(
    here: Origin, there: Origin, upstream: Upstream
) -> None:
    here.location = there.url("/landing?x=1")
    response = await upstream.request("GET", here.url("/hop"), headers={**SECRETS, **PLAIN})

    assert response.status == 200
    assert [r["path"] for r in here.seen] == ["/hop"]
    assert all(here.seen[0]["headers"].get(k) == v for k, v in SECRETS.items())
    [landed] = there.seen
    assert landed["path"] == "/landing"
    assert landed["query"] == {"x": "1"}
    sent = {k.lower() for k in landed["headers"]}
    assert not sent & {k.lower() for k in SECRETS}, landed["headers"]
    assert all(landed["headers"].get(k) == v for k, v in PLAIN.items())


async def test_credentials_follow_a_redirect_within_the_origin(
    here: Origin, upstream: Upstream
) -> None:
    here.location = "/landing"
    response = await upstream.request("GET", here.url("/hop"), headers=SECRETS)

    assert response.status == 200
    assert [r["path"] for r in here.seen] == ["/hop", "/landing"]
    assert all(here.seen[1]["headers"].get(k) == v for k, v in SECRETS.items())


async def test_a_303_after_a_post_goes_on_as_a_get_without_the_body(
    here: Origin, there: Origin, upstream: Upstream
) -> None:
    here.status, here.location = 303, there.url("/done")
    response = await upstream.request("POST", here.url("/hop"), json={"a": 1}, params={"q": "s"})

    assert response.status == 200
    assert here.seen[0]["method"] == "POST"
    assert here.seen[0]["query"] == {"q": "s"}
    [landed] = there.seen
    assert (landed["method"], landed["body"], landed["query"]) == ("GET", b"", {})


@pytest.mark.parametrize("status", [307, 308])
async def test_a_307_or_308_keeps_the_method_and_the_body(
    status: int, here: Origin, upstream: Upstream
) -> None:
    here.status, here.location = status, "/again"
    response = await upstream.request("POST", here.url("/hop"), json={"a": 1})

    assert response.status == 200
    landed = here.seen[1]
    assert landed["method"] == "POST"
    assert json.loads(landed["body"]) == {"a": 1}


async def test_a_redirect_loop_ends_with_its_last_answer(here: Origin, upstream: Upstream) -> None:
    response = await upstream.request("GET", here.url("/loop"))

    assert response.status == 302
    assert len(here.seen) == MAX_REDIRECTS + 1
