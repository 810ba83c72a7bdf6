"""Schedule control over HTTP (issue 10): pause and resume a job's schedule."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from .. import pauses
from .app import STATE, _require_key, json_response, requested_job
from .query import ApiError, read_body

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


async def pause(request: web.Request) -> web.Response:
    """`POST /jobs/{name}/pause {note}`: its slots are not owed until it is resumed."""
    _require_key(request)
    name = _job(request)
    body = await read_body(request, ("note",))
    note = body.get("note", "")
    if not isinstance(note, str) or len(note) > MAX_NOTE or "\x00" in note:
        raise ApiError(400, "bad_note", f"note: text of at most {MAX_NOTE} characters")
    state = request.app[STATE]
    by = request.headers.get("X-Requested-By", "")[:100] or f"api:{state.settings.worker_id}"
    row = await pauses.pause(state.pool, name, by=by, note=note)
    log.warning("job %s paused by %s: %s", name, row["paused_by"], row["pause_note"] or "")
    return json_response(_view(row))


async def resume(request: web.Request) -> web.Response:
    """`POST /jobs/{name}/resume`: slots from now on run; those of the pause are not owed."""
    _require_key(request)
    name = _job(request)
    await read_body(request, ())
    row = await pauses.resume(request.app[STATE].pool, name)
    log.warning("job %s resumed", name)
    return json_response(_view(row))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/jobs/{name}/pause", pause)
    app.router.add_post("/jobs/{name}/resume", resume)
