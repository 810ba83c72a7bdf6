"""The aiohttp application every replica serves: probes, metrics, the run/job API."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_async.aio.web import server_stats
from redis.asyncio import Redis

from .. import backfill, catalog, events, runs, stuck, webhooks
from ..config import JobSpec, Settings
from ..db import Pool, jsonable
from ..election import Elector
from ..lease import Holder, Lease
from ..reload import LiveSettings
from .query import (
    LAST,
    MAX_LIMIT,
    MAX_OFFSET,
    ApiError,
    Query,
    in_range,
    no_query,
    parse_run_id,
    read_body,
    utc_clamped,
)

log = logging.getLogger(__name__)

# A URL or one header longer than this is answered 414 / 431 with the JSON error body.
MAX_URL = MAX_HEADER = 8190
# aiohttp's parser refuses longer lines itself (plain-text 400): set above ours, so
# that what a careless client sends gets our answer, and a flood is still cut short.
PARSER_LIMITS = {"max_line_size": 8 * MAX_URL, "max_field_size": 2 * MAX_HEADER}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# `/runs/{id}`, but not the literal path beside it: GET /runs/cleanup-stuck is a 405 that
# says POST (as the OpenAPI document has it), not a run id that is not a number.
RUN_PATH = r"/runs/{id:(?!cleanup-stuck$)[^{}/]+}"


@dataclass
class WebState:
    """What the handlers read; built by `worker.app` and stored under `STATE`."""

    settings: Settings
    pool: Pool
    redis: Redis
    lease: Lease
    elector: Elector | None = None
    shutting_down: asyncio.Event = field(default_factory=asyncio.Event)
    live: LiveSettings | None = None

    def adopt(self, settings: Settings) -> None:
        """A reloaded jobs file: the next request sees the new jobs."""
        self.settings = settings


STATE = web.AppKey("state", WebState)


def json_response(data: Any, *, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS),
        status=status,
        content_type="application/json",
    )


def error_response(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        _check_sizes(request)
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
        if "Allow" in exc.headers:  # a 405 says which methods the path takes (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error; see the worker's log")


def _check_sizes(request: web.Request) -> None:
    if len(request.raw_path) > MAX_URL:
        raise ApiError(
            414,
            "url_too_long",
            f"the URL is {len(request.raw_path)} bytes; at most {MAX_URL} are accepted",
        )
    for name, value in request.raw_headers:
        if len(name) + len(value) > MAX_HEADER:
            shown = name[:64].decode("latin-1")
            raise ApiError(
                431,
                "header_too_large",
                f"header {shown} is {len(name) + len(value)} bytes; at most {MAX_HEADER}",
            )


def _client_mistakes(record: logging.LogRecord) -> bool:
    """aiohttp logs a request it cannot parse (too long, malformed) as an error with a
    traceback; it is the client's mistake, so it becomes one line at info level."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
        # aiohttp's call: log.exception("Error handling request from %s", request.remote)
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.msg = "answered HTTP %d to a request from %s that could not be parsed: %s"
        record.args = (exc.code, peer, type(exc).__name__)
        record.exc_info = record.exc_text = None
    return True


# aiohttp's request handler logs to this logger (passed in `handler_args`).
server_log = logging.getLogger("worker.web.server")
server_log.addFilter(_client_mistakes)


async def healthz(request: web.Request) -> web.Response:
    elector = request.app[STATE].elector
    if elector is not None and not elector.healthy():
        return json_response(
            {"status": "unhealthy", "reason": "leading without a lease renewal past the deadline"},
            status=503,
        )
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.shutting_down.is_set():
        return json_response({"status": "unready", "down": ["shutting down"]}, status=503)

    async def check(name: str, probe: Awaitable[Any]) -> str | None:
        try:
            async with asyncio.timeout(1.0):
                await probe
        except Exception as exc:  # a probe reports, never raises
            return f"{name}: {type(exc).__name__} {exc}".strip()
        return None

    results = await asyncio.gather(
        check("redis", state.redis.ping()), check("postgres", state.pool.fetchval("SELECT 1"))
    )
    down = [r for r in results if r]
    if down:
        return json_response({"status": "unready", "down": down}, status=503)
    return json_response({"status": "ready"})


async def leader(request: web.Request) -> web.Response:
    no_query(request)
    state = request.app[STATE]
    current = await state.lease.current()
    me = state.settings.worker_id
    view = current.as_dict() if current else dict.fromkeys(Holder.FIELDS)
    return json_response({**view, "self": bool(current and current.holder == me), "self_id": me})


async def list_jobs(request: web.Request) -> web.Response:
    no_query(request)
    state = request.app[STATE]
    overview = await runs.job_overview(state.pool, state.settings.jobs, datetime.now(UTC))
    return json_response({"jobs": [runs.public_job(view) for view in overview]})


async def get_job(request: web.Request) -> web.Response:
    no_query(request)
    state = request.app[STATE]
    spec = state.settings.job(request.match_info["name"])
    if spec is None:
        raise ApiError(404, "unknown_job", f"no job named {request.match_info['name']!r}")
    [view] = await runs.job_overview(state.pool, [spec], datetime.now(UTC))
    return json_response(runs.public_job(view))


async def list_runs(request: web.Request) -> web.Response:
    q = Query(request.query, ("job", "status", "limit"))
    found = await runs.search(
        request.app[STATE].pool,
        job=q.text("job"),
        status=q.choice("status", runs.STATUSES),
        limit=q.integer("limit", default=50, lo=1, hi=MAX_LIMIT),
    )
    return json_response({"runs": [runs.public(r) for r in found]})


async def get_run(request: web.Request) -> web.Response:
    run_id = parse_run_id(request.match_info["id"])
    no_query(request)
    run = await runs.get(request.app[STATE].pool, run_id)
    if run is None:
        raise ApiError(404, "unknown_run", f"no run {run_id}")
    deliveries = await webhooks.for_run(request.app[STATE].pool, run_id)
    return json_response({**runs.public(run), "webhooks": deliveries})


async def list_webhooks(request: web.Request) -> web.Response:
    """`GET /webhooks?state=&job=&limit=`: recent deliveries, newest first."""
    q = Query(request.query, ("state", "job", "limit"))
    state = q.choice("state", ("pending", "delivered", "failed"))
    rows = await webhooks.recent(
        request.app[STATE].pool,
        state=state,
        job=q.text("job"),
        limit=q.integer("limit", default=50, lo=1, hi=MAX_LIMIT),
    )
    return json_response({"webhooks": rows})


async def cancel_run(request: web.Request) -> web.Response:
    _require_key(request)
    run_id = parse_run_id(request.match_info["id"])
    no_query(request)
    await read_body(request, ())
    state = request.app[STATE]
    before = await runs.request_cancel(state.pool, run_id, by=f"api:{state.settings.worker_id}")
    if before is None:
        raise ApiError(404, "unknown_run", f"no run {run_id}")
    if before == "queued":
        return json_response({"run_id": run_id, "status": "cancelled"})
    if before == "running":
        return json_response({"run_id": run_id, "status": "cancelling"}, status=202)
    raise ApiError(409, "finished", f"run {run_id} already ended: {before}")


async def cleanup_stuck(request: web.Request) -> web.Response:
    """`?timeout_minutes=N` (5 to 60, default 15): the runs `running` longer than that
    whose heartbeat is silent are marked failed (`worker.stuck`); {"count", "ids"}."""
    _require_key(request)
    q = Query(request.query, ("timeout_minutes",))
    minutes = q.integer(
        "timeout_minutes", default=stuck.DEFAULT_MINUTES, lo=stuck.MIN_MINUTES, hi=stuck.MAX_MINUTES
    )
    await read_body(request, ())
    state = request.app[STATE]
    ended = await stuck.clean_up(
        state.pool, minutes=minutes, settings=state.settings, by=f"api:{state.settings.worker_id}"
    )
    for run in ended:
        log.warning("run %s of %s cleaned up: %s", run["id"], run["job"], run["error"])
    return json_response({"count": len(ended), "ids": [run["id"] for run in ended]})


async def list_products(request: web.Request) -> web.Response:
    q = Query(request.query, ("source", "account", "search", "gone", "limit", "offset"))
    total, items = await catalog.search(
        request.app[STATE].pool,
        source=q.text("source"),
        account=q.text("account"),
        text=q.text("search"),
        include_gone=q.boolean("gone", default=True),
        limit=q.integer("limit", default=50, lo=1, hi=MAX_LIMIT),
        offset=q.integer("offset", default=0, lo=0, hi=MAX_OFFSET),
    )
    return json_response({"total": total, "items": [jsonable(i) for i in items]})


async def list_events(request: web.Request) -> web.Response:
    """Events filed from parsing operations (the main-server role), by start."""
    q = Query(request.query, ("source", "city", "from", "to", "search", "limit", "offset"))
    bounds = {}
    for name in ("from", "to"):
        raw = q.text(name)
        try:
            value = None if raw is None else events.day_or_instant(raw, end=name == "to")
        except ValueError as exc:
            raise ApiError(400, f"bad_{name}", f"{name}: {exc}") from None
        except OverflowError:  # the day after 9999-12-31: nothing starts later
            value = LAST
        bounds[name] = None if value is None else utc_clamped(value)
    total, items = await events.search(
        request.app[STATE].pool,
        source=q.text("source"),
        city=q.text("city"),
        starts_from=bounds["from"],
        starts_to=bounds["to"],
        text=q.text("search"),
        limit=q.integer("limit", default=50, lo=1, hi=MAX_LIMIT),
        offset=q.integer("offset", default=0, lo=0, hi=MAX_OFFSET),
    )
    return json_response({"total": total, "items": [jsonable(i) for i in items]})


# --- keys: X-API-Key is the write key (WORKER_API_KEY) or, for reads, the read key ---

# Open whatever the keys: the kubelet's probes and Prometheus send none, and the page's
# script, styles and icon (no data) let its shell ask for one; the OpenAPI document (no
# data) is what a client generator starts from. By route, not by path.
OPEN_ROUTES = frozenset({"/healthz", "/readyz", "/metrics", "/static", "/openapi.json"})
# Pages whose HTML loads without the read key as a shell holding no data; their script
# then asks for a key (worker.web.status checks `can_read` itself).
SHELLS = frozenset({"/", "/ui/runs/{id}"})


def _digest(key: str) -> bytes:
    # Header values may hold undecodable bytes (kept as surrogates): compared, not refused.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def key_matches(given: str, expected: str) -> bool:
    """Constant time: both sides are hashed first, so neither the content nor the length
    of the expected key shows in how long a wrong guess takes."""
    return hmac.compare_digest(_digest(given), _digest(expected))


def _require_key(request: web.Request) -> None:
    expected = request.app[STATE].settings.api_key
    if not expected:
        raise ApiError(403, "api_disabled", "mutating endpoints are off: set WORKER_API_KEY")
    if not key_matches(request.headers.get("X-API-Key", ""), expected):
        raise ApiError(401, "unauthorized", "missing or wrong X-API-Key")


def can_read(request: web.Request) -> bool:
    """Whether the request may read data: no WORKER_READ_KEY is set, or X-API-Key is the
    read key or the write key."""
    settings = request.app[STATE].settings
    if not settings.read_key:
        return True
    given = request.headers.get("X-API-Key")
    if given is None:
        return False
    # Both compared, always: which key matched does not show in the time taken either.
    matches = [key_matches(given, key) for key in (settings.read_key, settings.api_key) if key]
    return any(matches)


@web.middleware
async def _read_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With WORKER_READ_KEY set, every GET (and HEAD) needs X-API-Key, the read key or the
    write key (401 otherwise), but for OPEN_ROUTES and the page SHELLS."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else None
    if (
        request.method not in ("GET", "HEAD")
        or not request.app[STATE].settings.read_key
        or route in OPEN_ROUTES
    ):
        return await handler(request)
    if route not in SHELLS and not can_read(request):
        raise ApiError(
            401,
            "unauthorized",
            "reading needs a key here: send X-API-Key with the read key (WORKER_READ_KEY)"
            " or the API key (WORKER_API_KEY)",
        )
    response = await handler(request)
    # What a key unlocked is never kept by a cache, to be shown to a request without one.
    response.headers["Cache-Control"] = "no-store"
    vary = response.headers.get("Vary")
    response.headers["Vary"] = f"{vary}, X-API-Key" if vary else "X-API-Key"
    return response


def requested_job(request: web.Request, *, by_hand: bool = True) -> JobSpec:
    """The job named in the path (404 if none); with `by_hand`, one an operator may
    run: not a schedule-only kind (400), not `manual = false` (409)."""
    name = request.match_info["name"]
    spec = request.app[STATE].settings.job(name)
    if spec is None:
        raise ApiError(404, "unknown_job", f"no job named {name!r}")
    if by_hand and spec.kind in events.SCHEDULE_ONLY_KINDS:
        raise ApiError(400, "schedule_only", f"job {name!r}: {events.NOT_BY_HAND}")
    if by_hand and not spec.manual:
        raise ApiError(409, "not_manual", f"job {name!r} has manual = false")
    return spec


async def trigger(request: web.Request) -> web.Response:
    _require_key(request)
    state = request.app[STATE]
    spec = requested_job(request)
    no_query(request)
    await read_body(request, ())
    name = spec.name
    run_id = await runs.enqueue(
        state.pool,
        job=name,
        kind=spec.kind,
        params=spec.params,
        requested_by=f"api:{state.settings.worker_id}",
    )
    log.info("run %s of %s queued via the API", run_id, name)
    return json_response({"run_id": run_id, "status": "queued"}, status=202)


async def backfill_job(request: web.Request) -> web.Response:
    """Queue every slot of the job's schedule in [from, to] (see `worker.backfill`)."""
    _require_key(request)
    state = request.app[STATE]
    spec = requested_job(request)
    no_query(request)
    name = spec.name
    body = await read_body(request, ("from", "to", "max"))
    limit = body.get("max", backfill.DEFAULT_MAX)
    if type(limit) is not int:
        raise ApiError(400, "bad_max", f"max: must be a whole number, got {limit!r}"[:120])
    try:
        bounds = {}
        for field in ("from", "to"):
            raw = body.get(field)
            if not isinstance(raw, str):
                raise backfill.BackfillError(field, "required: an ISO date or date-time")
            bounds[field] = in_range(field, raw, backfill.bound(raw, spec, field))
        done = await backfill.backfill(
            state.pool,
            spec,
            start=bounds["from"],
            end=bounds["to"],
            now=datetime.now(UTC),
            limit=limit,
            requested_by=f"api:{state.settings.worker_id}",
        )
    except backfill.BackfillError as exc:
        raise ApiError(400, f"bad_{exc.field}", str(exc)) from None
    log.info("backfill of %s: %d slot(s) queued, %d skipped", name, done.queued, len(done.skipped))
    return json_response(done.public(), status=202)


def build_app(state: WebState) -> web.Application:
    """The application: probes, metrics and the OpenAPI document always, the API
    unless role=scheduler."""
    app = web.Application(
        middlewares=[_errors, _read_guard], handler_args={**PARSER_LIMITS, "logger": server_log}
    )
    app[STATE] = state
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", server_stats)
    if state.settings.public_api:
        app.router.add_get("/leader", leader)
        app.router.add_get("/jobs", list_jobs)
        app.router.add_get("/jobs/{name}", get_job)
        app.router.add_post("/jobs/{name}/trigger", trigger)
        app.router.add_post("/jobs/{name}/backfill", backfill_job)
        app.router.add_get("/runs", list_runs)
        app.router.add_get(RUN_PATH, get_run)
        app.router.add_post("/runs/{id}/cancel", cancel_run)
        app.router.add_get("/webhooks", list_webhooks)
        app.router.add_post("/runs/cleanup-stuck", cleanup_stuck)
        app.router.add_get("/products", list_products)
        app.router.add_get("/events", list_events)
        # Imported here: they import this module's STATE and helpers.
        from .control import add_routes as add_control_routes
        from .parsing import add_routes
        from .status import add_routes as add_status_routes

        add_routes(app)
        add_control_routes(app)
        add_status_routes(app)
    from .openapi import add_route as add_openapi_route

    add_openapi_route(app)  # last: the document served lists the routes above
    return app
