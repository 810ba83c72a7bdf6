"""The status page: who leads, the replicas, the jobs and the runs, live.

Server-rendered from Jinja templates (autoescaped) with a stylesheet and a little
plain JavaScript from `static/`: the page polls `GET /ui/state` (the same views as
JSON) and updates itself in place; `/ui/runs/{id}` is a run's own page, polling
`GET /runs/{id}`. Every value shown went through the API's `redact()`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp_jinja2
import jinja2
import orjson
from aiohttp import web
from redis.exceptions import RedisError

from .. import events, replicas, runs, webhooks
from ..config import JobSpec
from ..logs import redact
from ..robots import version
from .app import STATE, Handler, WebState, can_read, json_response
from .query import MAX_ID, ApiError, Query, no_query, parse_run_id

HERE = Path(__file__).parent
PAGE_SIZE = 25
CHART_RUNS = 20
SECURITY_HEADERS = {
    # The API key lives in sessionStorage: no script but ours may ever run here.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'"
    " 'unsafe-inline'; img-src 'self' data:; object-src 'none'; base-uri 'none';"
    " frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
_DAYS = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("", "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


# --- words and times ---------------------------------------------------------------


def _names(field: str, names: Sequence[str]) -> str | None:
    """`1-5,0` as `Mon-Fri, Sun`; None for a step, `L` or anything unusual."""
    words = []
    for part in field.split(","):
        ends = part.split("-")
        if len(ends) > 2 or not all(e.isdigit() or (e.isalpha() and len(e) == 3) for e in ends):
            return None
        if any(e.isdigit() and int(e) >= len(names) for e in ends):
            return None
        words.append("-".join(names[int(e)] if e.isdigit() else e.title() for e in ends))
    return ", ".join(words)


def _clock(minute: str, hour: str, second: str) -> str | None:
    """The time-of-day part of a cron expression in words."""
    if second.startswith("*/") and minute == hour == "*":
        return f"every {second[2:]} seconds"
    if not second.isdigit():
        return None
    sec = f":{int(second):02d}" if second != "0" else ""
    if minute == hour == "*":
        return f"every minute at second {int(second)}" if sec else "every minute"
    if minute.startswith("*/") and hour == "*" and not sec:
        return f"every {minute[2:]} minutes"
    mins = minute.split(",")
    if not all(m.isdigit() for m in mins):
        return None
    past = ", ".join(f":{int(m):02d}{sec}" for m in mins)
    if hour == "*":
        return f"every hour at {past}"
    if hour.startswith("*/"):
        return f"every {hour[2:]} hours at {past}"
    hours = hour.split(",")
    if all(h.isdigit() for h in hours) and len(hours) * len(mins) <= 4:
        return "at " + ", ".join(f"{int(h):02d}:{int(m):02d}{sec}" for h in hours for m in mins)
    span = hour.split("-")
    if len(span) == 2 and all(h.isdigit() for h in span):
        return f"every hour at {past}, {int(span[0]):02d}:00-{int(span[1]):02d}:59"
    return None


def cron_words(expr: str | None) -> str | None:
    """A cron expression in words ("every 5 minutes", "at 03:00 on Mon-Fri"), or None
    when it is too unusual to say briefly (the page shows the expression anyway)."""
    fields = (expr or "").split()
    second = fields.pop(0) if len(fields) == 6 else "0"
    if len(fields) != 5:
        return None
    minute, hour, dom, month, dow = fields
    days: list[str | None] = []
    if dom != "*":
        numbers = _names(dom, [str(n) for n in range(32)])
        days.append(numbers and f"on day {numbers}" + (" of the month" if month == "*" else ""))
    if dow != "*":
        names = _names(dow, _DAYS)
        days.append(names and f"on {names}")
    months = _names(month, _MONTHS) if month != "*" else ""
    clock = _clock(minute, hour, second)
    if clock is None or months is None or None in days:
        return None
    if clock.startswith("at ") and not days and not months:
        return f"every day {clock}"
    when = " or ".join(d for d in days if d)
    return " ".join(w for w in (clock, when, months and f"in {months}") if w)


def _parse(iso: str | None) -> datetime | None:
    return datetime.fromisoformat(iso) if iso else None


def ago(iso: str | None, now: datetime | None = None) -> str:
    """`12s ago`, `in 3m`, `2h ago`; `-` for no time."""
    when = _parse(iso)
    if when is None:
        return "-"
    seconds = ((now or datetime.now(UTC)) - when).total_seconds()
    text = duration(abs(seconds), short=True)
    return f"in {text}" if seconds < 0 else f"{text} ago"


def duration(seconds: float | None, *, short: bool = False) -> str:
    """`0.4s`, `42s`, `3m 05s`, `2h 10m`, `3d`; `-` for none."""
    if seconds is None:
        return "-"
    if seconds < 10 and not short:
        return f"{seconds:.1f}s"
    if seconds < 90:
        return f"{seconds:.0f}s"
    minutes, sec = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m" if short else f"{minutes}m {sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h" if short else f"{hours}h {minutes:02d}m"
    return f"{hours // 24}d"


def elapsed(iso: str | None) -> str:
    """How long ago `iso` was, as a duration: a running run's time so far."""
    when = _parse(iso)
    return duration((datetime.now(UTC) - when).total_seconds()) if when else "-"


def stamp(iso: str | None) -> str:
    when = _parse(iso)
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if when else "-"


# --- views: what the templates and the page's script read (JSON-able) ----------------


def run_view(run: Mapping[str, Any]) -> dict[str, Any]:
    """A run as a row shows it: the API's view, its progress as a percentage, and its
    counters (the stats that are plain numbers)."""
    out = runs.public(run)
    progress = out.get("progress") or {}
    done, total, pct = progress.get("done"), progress.get("total"), None
    if isinstance(done, int) and isinstance(total, int) and total > 0:
        pct = min(100, round(100 * done / total))
    stats = redact(out.get("stats") or {})
    return {
        **{k: out.get(k) for k in ("id", "job", "kind", "trigger", "status", "slot", "attempt")},
        **{k: out.get(k) for k in ("created_at", "started_at", "finished_at", "duration")},
        "done": done,
        "total": total,
        "pct": pct,
        "message": str(progress.get("message") or ""),
        "error": str(out.get("error") or ""),
        "counters": [[k, v] for k, v in stats.items() if type(v) in (int, float)][:8],
        "active": out["status"] in runs.ACTIVE,
        "cancelling": out["status"] == "running" and out.get("cancel_requested_at") is not None,
    }


def by_hand(spec: JobSpec) -> bool:
    """Whether an operator may run the job (the API's `requested_job` refuses others)."""
    return spec.manual and spec.kind not in events.SCHEDULE_ONLY_KINDS


def job_view(view: Mapping[str, Any], spec: JobSpec, history: Mapping[str, Any]) -> dict[str, Any]:
    """A job's card: schedule in words and cron, next slot, last run, pause, failure
    streak, missed and skipped slots of the last day, what an operator may do."""
    job = runs.public_job(view)
    next_slot, last = view["next_slot"], view["last_run"]
    newest = history["runs"][0] if history["runs"] else None
    return {
        **{k: job[k] for k in ("name", "kind", "schedule", "timezone", "next_slot")},
        **{k: job[k] for k in ("paused", "paused_by", "paused_at", "failure_streak")},
        "words": cron_words(job["schedule"]),
        "next_local": (
            next_slot.astimezone(ZoneInfo(spec.timezone)).strftime("%a %H:%M:%S")
            if next_slot
            else None
        ),
        "last_run": run_view(last) if last else None,
        "note": redact(job["note"]) if job["note"] else None,
        "planning_error": redact(job["planning_error"]) if job["planning_error"] else None,
        "missed": history["missed"],
        "skipped": history["skipped"],
        "last_gap": history["last_gap"].isoformat() if history["last_gap"] else None,
        "can_run": by_hand(spec),
        "can_backfill": by_hand(spec) and spec.schedule is not None,
        "chart_key": f"{newest['id']}:{newest['status']}" if newest else "",
    }


def chart(
    history: Sequence[Mapping[str, Any]], *, width: int = 240, height: int = 56
) -> dict[str, Any]:
    """Bars of the last runs' durations (oldest left, coloured by status) and a line of
    their item counts, each on its own scale; `history` is newest first."""
    shown = list(reversed(history[:CHART_RUNS]))
    took = [r["took"] for r in shown]
    items = [r["items"] if type(r["items"]) in (int, float) else None for r in shown]
    top = max((t for t in took if t is not None), default=0.0) or 1.0
    most = max((i for i in items if i is not None), default=0) or 1
    slot = width / CHART_RUNS
    left = width - slot * len(shown)
    bars, dots = [], []
    for n, (run, t, i) in enumerate(zip(shown, took, items, strict=True)):
        x = left + n * slot
        h = max(2.0, (height - 4) * t / top) if t is not None else 3.0
        label = f"run #{run['id']} {run['status']}, {duration(t)}" + (f", {i} items" if i else "")
        bars.append(
            {
                "x": x + 1,
                "y": height - h,
                "w": slot - 2,
                "h": h,
                "status": run["status"],
                "label": label,
            }
        )
        if i is not None:
            dots.append((f"{x + slot / 2:.1f}", f"{height - 3 - (height - 8) * i / most:.1f}"))
    return {
        "width": width,
        "height": height,
        "bars": bars,
        "line": " ".join(f"{x},{y}" for x, y in dots),
        "dots": dots,
        "top": duration(top) if any(t is not None for t in took) else None,
        "most": most if dots else None,
    }


async def _leader(state: WebState) -> tuple[dict[str, Any] | None, str | None]:
    try:
        current = await state.lease.current()
    except (RedisError, OSError, TimeoutError) as exc:
        return None, f"cannot read the lease from Redis: {type(exc).__name__} {exc}".strip()
    if current is None:
        return None, None
    return {**current.as_dict(), "self": current.holder == state.settings.worker_id}, None


async def _replicas(
    state: WebState, leader: dict[str, Any] | None
) -> tuple[list[dict[str, Any]], str | None]:
    try:
        found = await replicas.registry_for(state.redis, state.settings).list()
    except (RedisError, OSError, TimeoutError) as exc:
        return [], f"cannot list the replicas: {type(exc).__name__} {exc}".strip()
    holder, me = leader and leader["holder"], state.settings.worker_id
    return [{**r.as_dict(), "leader": r.id == holder, "self": r.id == me} for r in found], None


async def snapshot(
    state: WebState, filters: Mapping[str, Any], *, chart_runs: int = 1
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Everything the status page shows, as JSON-able views; and each job's history of
    its last `chart_runs` runs."""
    now = datetime.now(UTC)
    specs = state.settings.jobs
    leader, leader_error = await _leader(state)
    found, replicas_error = await _replicas(state, leader)
    overview = await runs.job_overview(state.pool, specs, now)
    history = await runs.recent_history(state.pool, [s.name for s in specs], runs=chart_runs)
    limit = filters["limit"]
    page = await runs.page(
        state.pool,
        job=filters["job"],
        status=filters["status"],
        before=filters["before"],
        limit=limit + 1,
    )
    data = {
        "now": now.isoformat(),
        "me": _me(state),
        "leader": leader,
        "leader_error": leader_error,
        "replicas": found,
        "replicas_error": replicas_error,
        "jobs": [job_view(v, s, history[s.name]) for v, s in zip(overview, specs, strict=True)],
        "attention": [run_view(r) for r in await runs.needing_attention(state.pool)],
        "runs": [run_view(r) for r in page[:limit]],
        "older": page[limit - 1]["id"] if len(page) > limit else None,
    }
    return data, history


def _me(state: WebState) -> dict[str, str]:
    settings = state.settings
    return {"id": settings.worker_id, "role": settings.role, "version": version()}


def _filters(request: web.Request) -> dict[str, Any]:
    q = Query(request.query, ("job", "status", "before", "limit"))
    return {
        "job": q.text("job"),
        "status": q.choice("status", runs.STATUSES),
        "before": q.integer("before", default=0, lo=0, hi=MAX_ID) or None,
        "limit": q.integer("limit", default=PAGE_SIZE, lo=1, hi=200),
    }


# --- handlers ----------------------------------------------------------------------


def _html(
    name: str, request: web.Request, context: dict[str, Any], *, status: int = 200
) -> web.Response:
    context.setdefault("me", _me(request.app[STATE]))
    context.setdefault("now", datetime.now(UTC).isoformat())
    context.setdefault("locked", False)
    response = aiohttp_jinja2.render_template(name, request, context, status=status)
    response.headers.update(SECURITY_HEADERS)
    return response


def _shell(name: str, request: web.Request, **context: Any) -> web.Response:
    """The page without its data, for a request without the read key (WORKER_READ_KEY):
    its script asks for the key, then loads the page with it."""
    return _html(name, request, {**context, "locked": True, "me": None})


async def index(request: web.Request) -> web.Response:
    if not can_read(request):
        return _shell("index.html", request)
    state = request.app[STATE]
    filters = _filters(request)
    data, history = await snapshot(state, filters, chart_runs=CHART_RUNS)
    context = {**data, "filters": filters, "statuses": runs.STATUSES, "history": history}
    return _html("index.html", request, context)


async def ui_state(request: web.Request) -> web.Response:
    """`GET /ui/state`: the page's data (leader, replicas, jobs, the runs that need
    attention, a page of runs) as JSON; the page polls it."""
    data, _ = await snapshot(request.app[STATE], _filters(request))
    return json_response(data)


async def job_chart(request: web.Request) -> web.Response:
    """A job's chart, the HTML fragment the page swaps in when a run of it ends."""
    state = request.app[STATE]
    name = request.match_info["name"]
    if state.settings.job(name) is None:
        raise ApiError(404, "unknown_job", f"no job named {name!r}")
    history = await runs.recent_history(state.pool, [name], runs=CHART_RUNS)
    return _html("chart.html", request, {"job": name, "history": history[name]["runs"]})


async def run_page(request: web.Request) -> web.Response:
    """`GET /ui/runs/{id}`: one run's progress, stats, failed items, cursor, resume
    chain, timings and webhook deliveries."""
    state = request.app[STATE]
    run_id = parse_run_id(request.match_info["id"])
    if not can_read(request):
        return _shell("run.html", request, run=None, run_id=run_id)
    run = await runs.get(state.pool, run_id)
    if run is None:
        return _html("run.html", request, {"run": None, "run_id": run_id}, status=404)
    public = runs.public(run)
    stats = redact(run.get("stats") or {})
    context = {
        "run": run_view(run),
        "run_id": run_id,
        "detail": public,
        "stats": {k: v for k, v in stats.items() if k != "failed_sample"},
        "sample": stats.get("failed_sample") or [],
        "cursor": _pretty(redact(run.get("cursor"))),
        "result": _pretty(redact(run.get("result"))),
        "params": _pretty(public.get("params")),
        "chain": [run_view(r) for r in await runs.resume_chain(state.pool, run_id)],
        "webhooks": await webhooks.for_run(state.pool, run_id),
    }
    return _html("run.html", request, context)


async def list_replicas(request: web.Request) -> web.Response:
    """`GET /replicas`: every replica that announced itself within its TTL."""
    no_query(request)
    state = request.app[STATE]
    leader, _ = await _leader(state)
    found, error = await _replicas(state, leader)
    if error:
        raise ApiError(503, "redis_unavailable", error)
    return json_response({"replicas": found})


def _pretty(value: Any, limit: int = 20_000) -> str | None:
    if value is None:
        return None
    text = orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()
    return text if len(text) <= limit else text[:limit] + "\n… (cut)"


def _setup_templates(app: web.Application) -> None:
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # everything, .html and .svg alike
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(ago=ago, duration=duration, elapsed=elapsed, stamp=stamp)
    env.globals.update(chart=chart, asset=lambda name: app.router["static"].url_for(filename=name))


ASSETS = frozenset(p.name for p in (HERE / "static").iterdir())


@web.middleware
async def _missing_assets(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's static route answers a missing file itself, once the handler returned
    (an empty 404, past the error middleware): refused here, it is the API's JSON 404."""
    resource = request.match_info.route.resource
    static = resource is not None and resource.name == "static"
    if static and request.match_info.get("filename") not in ASSETS:
        raise web.HTTPNotFound()
    return await handler(request)


def add_routes(app: web.Application) -> None:
    _setup_templates(app)
    app.middlewares.append(_missing_assets)
    app.router.add_static("/static/", HERE / "static", name="static", append_version=True)
    app.router.add_get("/", index)
    app.router.add_get("/ui/state", ui_state)
    app.router.add_get("/ui/runs/{id}", run_page)
    app.router.add_get("/ui/jobs/{name}/chart", job_chart)
    app.router.add_get("/replicas", list_replicas)
