"""The limiter counts arrivals: a slow new connection must not squeeze N + 1 requests into
one of the server's windows, and a warm connection still gets close to N per period.

The server records when each request reaches it; assertions count those arrivals in
windows, so a slow machine makes the tests slower, not flaky.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from worker.ratelimit import Rate, RateLimiter
from worker.sandbox import max_in_window
from worker.upstream import RetryPolicy, Upstream, open_upstream

NO_RETRY = RetryPolicy(attempts=1)
NEW_CONNECTION_DELAY = 0.2
HOST = "127.0.0.1"

ServerFactory = Callable[..., Awaitable[TestServer]]


class SlowProxy:
    """A TCP proxy that holds each new connection `delay` seconds before passing bytes on.

    With TLS behind it, the client's handshake (and so its request) waits out the delay,
    as with a slow DNS lookup, TCP connect or TLS handshake on a real network; requests
    on a connection already open pass at once.
    """

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port = target_port
        self.delay = delay
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, HOST, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await asyncio.sleep(self.delay)
        up_reader, up_writer = await asyncio.open_connection(HOST, self.target_port)
        pipes = [
            asyncio.create_task(_pipe(reader, up_writer)),
            asyncio.create_task(_pipe(up_reader, writer)),
        ]
        self._tasks.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)
        self._tasks.difference_update(pipes)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


@pytest.fixture(scope="module")
def tls(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context) for a self-signed certificate of 127.0.0.1."""
    folder: Path = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    # fmt: off
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )
    # fmt: on
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


class Arrivals:
    def __init__(self) -> None:
        self.times: list[float] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.times.append(time.monotonic())
        return web.Response(text="{}")


@pytest.fixture
def arrivals() -> Arrivals:
    return Arrivals()


@pytest.fixture
async def app(arrivals: Arrivals) -> web.Application:
    application = web.Application()
    application.router.add_get("/", arrivals.handle)
    return application


@pytest.fixture
async def slow_proxy(
    app: web.Application, aiohttp_server: ServerFactory, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> AsyncIterator[SlowProxy]:
    server = await aiohttp_server(app, ssl=tls[0])
    proxy = SlowProxy(server.port, NEW_CONNECTION_DELAY)
    await proxy.start()
    yield proxy
    await proxy.close()


async def test_slow_new_connections_do_not_squeeze_an_extra_arrival_into_a_window(
    slow_proxy: SlowProxy, arrivals: Arrivals, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    # Three calls open three new connections (each reaches the server 0.2 s late); the
    # next three reuse them and arrive at once. Counting from the starts, the fourth
    # would land 0.8 s after the first arrival. The margin is wide (0.1 s) so the
    # test does not hang on scheduling noise; the delay is twice that.
    rate = Rate(calls=3, period=1.0, margin=0.1)
    url = f"https://{HOST}:{slow_proxy.port}/"
    async with open_upstream(limiter=RateLimiter(rate), retry=NO_RETRY) as upstream:
        responses = await asyncio.gather(
            *(upstream.request("GET", url, ssl=tls[1]) for _ in range(6))
        )

    assert [r.status for r in responses] == [200] * 6
    assert slow_proxy.connections >= 3  # the first three did open new connections
    assert max_in_window(arrivals.times, rate.period) <= rate.calls


async def sustained_rate(upstream: Upstream, url: str, arrivals: Arrivals, *, calls: int) -> float:
    """Calls per second the server saw, over whole windows: (calls - N) / span."""
    # Warm the connections first, on a key that is not limited.
    upstream.limiter.configure("warm-up", Rate(calls=0))
    await asyncio.gather(*(upstream.request("GET", url, limit_key="warm-up") for _ in range(3)))
    arrivals.times.clear()
    await asyncio.gather(*(upstream.request("GET", url) for _ in range(calls)))
    times = sorted(arrivals.times)
    assert max_in_window(times, 1.0) <= 3
    return (len(times) - 3) / (times[-1] - times[0])


@pytest.mark.parametrize("shared", [False, True], ids=["local", "redis"])
async def test_sustained_rate_on_a_warm_connection_stays_near_the_limit(
    app: web.Application,
    aiohttp_server: ServerFactory,
    arrivals: Arrivals,
    redis: Redis,
    key_prefix: str,
    shared: bool,
) -> None:
    server = await aiohttp_server(app)
    limiter = RateLimiter(
        Rate(calls=3, period=1.0), redis=redis if shared else None, prefix=key_prefix
    )
    async with open_upstream(limiter=limiter, retry=NO_RETRY) as upstream:
        rate = await sustained_rate(upstream, str(server.make_url("/")), arrivals, calls=15)
    assert rate >= 0.95 * 3, f"sustained {rate:.3f}/s"
