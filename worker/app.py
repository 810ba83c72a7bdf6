"""Wires the actors of one replica together: pools, web, elector, leader work, signals.

Each actor is a named task under one supervisor: if one dies unexpectedly the process
logs it and exits non-zero, so Kubernetes restarts it rather than keeping a zombie.
Shutdown (SIGTERM/SIGINT): readyz -> 503, cancel leader work (runs record why),
release the lease (followers take over at once), close the HTTP server and pools.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager

from aiohttp import web
from redis.asyncio import Redis

from . import db, looplag, reload, replicas
from .config import JobSpec, Settings
from .context import JobKind
from .election import Elector
from .errors import ConfigError
from .lease import Grant, Lease
from .ratelimit import RateLimiter
from .reload import LiveSettings
from .scheduler import Leader
from .upstream import Upstream, open_upstream
from .web import parsing as parsing_routes
from .web.app import WebState, build_app

log = logging.getLogger(__name__)

_ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, object]], None]


@asynccontextmanager
async def open_redis(url: str, *, timeout: float = 5.0) -> AsyncIterator[Redis]:
    """A Redis client with timeouts on connect and on every command."""
    redis = Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
        decode_responses=False,
    )
    try:
        yield redis
    finally:
        await redis.aclose()


def stray_error_handler(crashed: asyncio.Event, stop: asyncio.Event) -> _ExceptionHandler:
    """The event loop's exception handler: a crash stops the replica, a report does not.

    An exception nobody awaited is a bug: it is logged with its context and the replica
    stops (exit 1 after a clean shutdown) rather than run on half-broken. A library's
    report that carries no exception is not a crash: asyncpg, for one, says "Resetting
    connection with an active transaction" when a leader that froze inside a
    transaction wakes up and its connection goes back to the pool.
    """

    def handle(_: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        error = context.get("exception")
        if not isinstance(error, BaseException):
            log.warning("event loop report: %s", context.get("message"))
            return
        future = context.get("future")
        if future is not None and _of_the_driver(future) and db.is_transient(error):
            # A bare future, or a task, of the database driver (asyncpg's, when a leader
            # woken from a freeze finds its connection ended, or the release of a
            # connection cut off by a partition) that held a lost-connection error nobody
            # awaited: the connection's own users got the error too. Our own tasks' lost
            # exceptions below are still taken for a crash.
            log.warning("%s: %s: %s", context.get("message"), type(error).__name__, error)
            return
        log.critical(
            "unhandled error: %s",
            context.get("message"),
            exc_info=error,
            extra={"task": repr(context.get("task") or context.get("future") or "")[:200]},
        )
        crashed.set()
        stop.set()

    return handle


def _of_the_driver(future: object) -> bool:
    """A future not of ours: a bare one, or a task running asyncpg's own code."""
    if not isinstance(future, asyncio.Task):
        return True
    code = getattr(future.get_coro(), "cr_code", None)
    return code is not None and f"{os.sep}asyncpg{os.sep}" in code.co_filename


async def serve(
    settings: Settings,
    kinds: Mapping[str, JobKind],
    *,
    cross_check: Callable[[Sequence[JobSpec]], None] | None = None,
) -> int:
    """Run one replica until SIGTERM/SIGINT; returns the process exit code.

    SIGHUP re-reads the jobs file (`worker.reload`)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    crashed = asyncio.Event()
    loop.set_exception_handler(stray_error_handler(crashed, stop))
    async with (
        open_redis(settings.redis_url) as redis,
        db.open_pool(
            settings.database_url, timeout=settings.db_timeout, hold=settings.lease.ttl
        ) as pool,
        open_upstream(limiter=RateLimiter(redis=redis, prefix=settings.key_prefix)) as upstream,
    ):
        async with pool.acquire() as conn:
            for name in await db.migrate(conn):
                log.info("migration %s applied", name)
        live = LiveSettings(
            settings,
            checkers={name: kind.check for name, kind in kinds.items()},
            cross_check=cross_check,
        )
        loop.add_signal_handler(signal.SIGHUP, _reload_on_signal, live)
        try:
            code = await _run_actors(live, kinds, stop, redis, pool, upstream)
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
    return 1 if crashed.is_set() else code


def _reload_on_signal(live: LiveSettings) -> None:
    with contextlib.suppress(ConfigError):  # logged; the running jobs stay
        live.reload("SIGHUP")


async def _run_actors(
    live: LiveSettings,
    kinds: Mapping[str, JobKind],
    stop: asyncio.Event,
    redis: Redis,
    pool: db.Pool,
    upstream: Upstream,
) -> int:
    settings = live.current
    lease = Lease(redis, prefix=settings.key_prefix)
    state = WebState(settings=settings, pool=pool, redis=redis, lease=lease, live=live)
    live.subscribe(state.adopt)
    app = build_app(state)
    # POST /parsing/create asks the operation's parser whether it can read the meta.
    app[parsing_routes.CHECKERS] = {name: kind.check for name, kind in kinds.items()}
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.http_host, settings.http_port, shutdown_timeout=2.0)
        try:
            await site.start()
        except OSError as exc:  # a setting or the machine is wrong: say which, in one line
            why = {
                errno.EADDRINUSE: "the port is already in use (WORKER_HTTP_PORT)",
                errno.EACCES: "permission denied for this port (WORKER_HTTP_PORT)",
                errno.EADDRNOTAVAIL: "no such address on this machine (WORKER_HTTP_HOST)",
            }.get(exc.errno or 0, f"{exc.strerror or exc} (WORKER_HTTP_HOST, WORKER_HTTP_PORT)")
            where = f"{settings.http_host}:{settings.http_port}"
            raise ConfigError(f"cannot listen on {where}: {why}") from None
        port = _bound_port(runner, settings.http_port)
        log.info(
            "worker %s serving http on %s:%d (role %s, %d jobs)",
            settings.worker_id,
            settings.http_host,
            port,
            settings.role,
            len(settings.jobs),
        )

        async def lead(grant: Grant) -> None:
            leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds=kinds, live=live)
            await leader.run(grant)

        actors: set[asyncio.Task[None]] = {
            asyncio.create_task(
                reload.listen_for_reloads(
                    redis, settings.key_prefix, settings.worker_id, live, stop
                ),
                name="reload-listener",
            )
        }
        if settings.jobs_file is not None and settings.jobs_watch > 0:
            actors.add(
                asyncio.create_task(live.watch(stop, settings.jobs_watch), name="jobs-file-watch")
            )
        if settings.campaigns:
            state.elector = Elector(
                redis=redis,
                lease=lease,
                settings=settings.lease,
                worker_id=settings.worker_id,
                work=lead,
                address=f"http://{_advertised_host(settings)}:{port}",
                work_grace=settings.shutdown_grace / 2,
            )
            actors.add(asyncio.create_task(state.elector.run(stop), name="elector"))
        address = f"http://{_advertised_host(settings)}:{port}"
        actors.add(
            asyncio.create_task(
                replicas.run(redis, settings, address=address, stop=stop), name="replicas"
            )
        )
        looplag.tune_runtime()
        actors.add(asyncio.create_task(looplag.monitor(stop), name="loop-lag"))
        return await _supervise(actors, stop, state, settings.shutdown_grace)
    finally:
        await runner.cleanup()


async def _supervise(
    actors: set[asyncio.Task[None]], stop: asyncio.Event, state: WebState, grace: float
) -> int:
    stopping = asyncio.create_task(stop.wait(), name="signal-wait")
    done, _ = await asyncio.wait({stopping, *actors}, return_when="FIRST_COMPLETED")
    code = 0
    for task in done - {stopping}:
        if not task.cancelled() and task.exception() is not None:
            log.critical("actor %s died", task.get_name(), exc_info=task.exception())
            code = 1
        elif not stop.is_set():
            log.critical("actor %s ended unexpectedly", task.get_name())
            code = 1
    log.info("shutting down (grace %.0fs)", grace)
    state.shutting_down.set()
    stop.set()
    stopping.cancel()
    pending = {t for t in actors if not t.done()}
    if pending:
        finished, late = await asyncio.wait(pending, timeout=grace)
        for task in late:
            log.error("actor %s did not stop within the grace period", task.get_name())
            task.cancel()
            code = 1
        for task in finished:
            if not task.cancelled() and task.exception() is not None:
                log.error(
                    "actor %s failed while stopping", task.get_name(), exc_info=task.exception()
                )
                code = 1
    with contextlib.suppress(asyncio.CancelledError):
        await stopping
    return code


def _bound_port(runner: web.AppRunner, configured: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return configured


def _advertised_host(settings: Settings) -> str:
    if settings.http_host in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return settings.http_host
