"""Schedule control over HTTP (issue 10): pause and resume a job's schedule, reload the
jobs file."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from .. import pauses, reload
from ..errors import ConfigError
from .app import STATE, _require_key, json_response, requested_job
from .query import ApiError, no_query, read_body

log = logging.getLogger(__name__)
MAX_NOTE = 500


def _job(request: web.Request) -> str:
    return requested_job(request, by_hand=False).name


def _view(state: dict[str, Any]) -> dict[str, Any]:
    paused_at = state.get("paused_at")
    return {
        "job": state["job"],
        "paused": paused_at is not None,
        "paused_by": state.get("paused_by") if paused_at else None,
        "paused_at": paused_at.isoformat() if paused_at else None,
        "note": state.get("pause_note") if paused_at else None,
        "resumed_at": state["resumed_at"].isoformat() if state.get("resumed_at") else None,
        "failure_streak": state.get("failure_streak", 0),
    }


def _requested_by(request: web.Request) -> str:
    """The `X-Requested-By` header, its first 100 characters. Bytes that are not UTF-8
    arrive as surrogates, which Postgres cannot store: each becomes U+FFFD."""
    raw = request.headers.get("X-Requested-By", "")
    return raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")[:100]


async def pause(request: web.Request) -> web.Response:
    """`POST /jobs/{name}/pause {note}`: its slots are not owed until it is resumed."""
    _require_key(request)
    name = _job(request)
    no_query(request)
    body = await read_body(request, ("note",))
    note = body.get("note", "")
    if not isinstance(note, str) or len(note) > MAX_NOTE or "\x00" in note:
        raise ApiError(400, "bad_note", f"note: text of at most {MAX_NOTE} characters")
    state = request.app[STATE]
    by = _requested_by(request) or f"api:{state.settings.worker_id}"
    row = await pauses.pause(state.pool, name, by=by, note=note)
    log.warning("job %s paused by %s: %s", name, row["paused_by"], row["pause_note"] or "")
    return json_response(_view(row))


async def resume(request: web.Request) -> web.Response:
    """`POST /jobs/{name}/resume`: slots from now on run; those of the pause are not owed."""
    _require_key(request)
    name = _job(request)
    no_query(request)
    await read_body(request, ())
    row = await pauses.resume(request.app[STATE].pool, name)
    log.warning("job %s resumed", name)
    return json_response(_view(row))


async def reload_jobs(request: web.Request) -> web.Response:
    """`POST /admin/reload`: re-read the jobs file here, and ask every replica to do the
    same (they mount the same file). An invalid file is refused, the running jobs stay."""
    _require_key(request)
    no_query(request)
    await read_body(request, ())
    state = request.app[STATE]
    if state.live is None:
        raise ApiError(409, "no_reload", "this replica was started without a reloadable config")
    me = state.settings.worker_id
    try:
        change = state.live.reload(f"POST /admin/reload to {me}")
    except ConfigError as exc:
        raise ApiError(422, "invalid_jobs_file", str(exc)) from None
    try:
        told: int | None = await reload.ask_everyone(state.redis, state.settings.key_prefix, me)
    except (RedisError, OSError) as exc:
        # The others still see the change through their file watch.
        log.warning("could not ask the other replicas to reload: %s", exc)
        told = None
    return json_response({**change.public(), "replica": me, "replicas_listening": told})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/admin/reload", reload_jobs)
    app.router.add_post("/jobs/{name}/pause", pause)
    app.router.add_post("/jobs/{name}/resume", resume)
