"""Seed 001's parsing-server API: create an operation, read its results, list the
unprocessed ones, clean up. Same paths and JSON shapes as the seed; every endpoint
needs `X-API-Key`.

`POST /parsing/create` only writes a queued run (any replica may take the request);
the leader runs it. Reading the results of a finished operation marks it processed;
listing the unprocessed ones does not (see docs/parsing.md for why).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping
from datetime import date, datetime
from typing import Any

from aiohttp import web

from .. import operations, run_items, runs
from ..config import JobSpec, Settings
from ..parsing import TYPES
from .app import STATE, _require_key, json_response
from .query import MAX_ID, MAX_LIMIT, MAX_TEXT, ApiError, Query, no_query, read_body
from .query import shown as _shown

log = logging.getLogger(__name__)

Checkers = Mapping[str, Callable[[JobSpec], None]]
# The job kinds' own params checkers (`JobKind.check`), when the app was given them: a
# meta the parser would refuse at run time is then refused at create, with its reason.
CHECKERS = web.AppKey("parsing_checkers", Checkers)

MAX_BODY = 8 * 1024 * 1024  # the main server sends whole city objects from its database
MAX_LIST = 10_000  # entries in one of meta's lists
MAX_DEPTH = 32  # nesting inside meta
DEFAULT_CLEANUP_DAYS = 30
MAX_DAYS = 36_500
UNPROCESSED_LIMIT = 100
# Each list's entries: a name, or an object (as the main server stores it) named by
# this key or `title`, as a string or an object of translations; `aliases` add names.
META_LISTS = {"countries": "code", "cities": "name", "categories": "name"}
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_ID = re.compile(r"[0-9]{1,19}")
_QUOTED_FIELD = re.compile(r"'(meta[^']*)'[: ]\s*(.*)", re.DOTALL)


def _bad_meta(field: str, message: str) -> ApiError:
    return ApiError(400, "bad_meta", f"{field}: {message}")


async def _body(request: web.Request, fields: tuple[str, ...]) -> dict[str, Any]:
    return await read_body(request, fields, max_bytes=MAX_BODY)


def _served(settings: Settings) -> dict[str, JobSpec]:
    """The seed's types this replica's jobs file can run: type -> the job that runs it
    (the first job of the type's kind, preferring one that may be triggered)."""
    served: dict[str, JobSpec] = {}
    for type_name, kind in TYPES.items():
        specs = [j for j in settings.jobs if j.kind == kind]
        if specs:
            served[type_name] = next((j for j in specs if j.manual), specs[0])
    return served


def _job_for(settings: Settings, type_name: Any) -> JobSpec:
    served = _served(settings)
    valid = ", ".join(served) or "none (the jobs file has no parse.* job)"
    if not isinstance(type_name, str) or not type_name:
        raise ApiError(400, "bad_type", f"type: required, one of {valid}")
    spec = served.get(type_name)
    if spec is None:
        if type_name in TYPES:
            why = f"the jobs file has no job of kind {TYPES[type_name]}"
            raise ApiError(
                400,
                "bad_type",
                f"type: {type_name!r} is not served here: {why}; valid types: {valid}",
            )
        raise ApiError(
            400, "bad_type", f"type: unknown type {_shown(type_name)}; valid types: {valid}"
        )
    if not spec.manual:
        raise ApiError(409, "not_manual", f"type: job {spec.name!r} has manual = false")
    return spec


def check_meta(meta: Any) -> dict[str, Any]:
    """The operation's `meta`, checked: a JSON object (absent or null: empty);
    `countries`, `cities`, `categories` lists of names or named objects (META_LISTS);
    `dates` `{from, to}`, each a date or a date-time with offset, from <= to; any other
    key passed on to the parser as sent. A null list or `dates` counts as not given
    (the seed's main server may send its not-yet-loaded cache)."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise _bad_meta("meta", f"must be an object, got {_shown(meta)}")
    _check_json(meta)
    given = (*META_LISTS, "dates")
    out = {k: v for k, v in meta.items() if v is not None or k not in given}
    for name, key in META_LISTS.items():
        if name in out:
            _check_list(f"meta.{name}", out[name], key=key)
    if "dates" in out:
        _check_dates(out["dates"])
    return out


def _check_list(field: str, value: Any, *, key: str) -> None:
    if not isinstance(value, list):
        raise _bad_meta(field, f"must be a list, got {_shown(value)}")
    if len(value) > MAX_LIST:
        raise _bad_meta(field, f"at most {MAX_LIST} entries, got {len(value)}")
    for i, entry in enumerate(value):
        where = f"{field}[{i}]"
        if isinstance(entry, str):
            if not entry.strip() or len(entry) > MAX_TEXT:
                raise _bad_meta(where, f"a name must be 1 to {MAX_TEXT} characters")
            continue
        if not isinstance(entry, dict):
            raise _bad_meta(
                where,
                f"must be a name or an object (as the main server stores it), got {_shown(entry)}",
            )
        if not _names_something(entry, key):
            raise _bad_meta(
                where,
                f"an object must carry {key!r} or 'title' (a string or an object of"
                f" translations) or 'aliases', got {_shown(entry)}",
            )


def _names_something(entry: Mapping[str, Any], key: str) -> bool:
    name = entry.get(key) or entry.get("title")
    found = list(name.values()) if isinstance(name, dict) else [name]
    aliases = entry.get("aliases")
    found += aliases if isinstance(aliases, list) else []
    return any(isinstance(n, str) and n.strip() for n in found)


def _check_dates(value: Any) -> None:
    if not isinstance(value, dict) or not value:
        raise _bad_meta("meta.dates", f"must be an object {{from, to}}, got {_shown(value)}")
    unknown = sorted(set(value) - {"from", "to"})
    if unknown:
        raise _bad_meta("meta.dates", f"unknown key {unknown[0]!r}; it takes from and to")
    found = {
        k: _bound(f"meta.dates.{k}", value[k]) for k in ("from", "to") if value.get(k) is not None
    }
    if not found:
        raise _bad_meta("meta.dates", "give from, to or both")
    first, last = found.get("from"), found.get("to")
    if first is not None and last is not None and type(first) is type(last) and first > last:
        raise _bad_meta("meta.dates", f"from ({value['from']}) is after to ({value['to']})")


def _bound(field: str, raw: Any) -> date | datetime:
    """A date (YYYY-MM-DD), or an ISO 8601 date-time with its offset."""
    if isinstance(raw, str) and _DATE.fullmatch(raw):
        try:
            return date.fromisoformat(raw)
        except ValueError:
            pass
    elif isinstance(raw, str) and len(raw) > 10:
        try:
            instant = datetime.fromisoformat(raw)
        except ValueError:
            pass
        else:
            if instant.tzinfo is not None:
                return instant
    raise _bad_meta(
        field, f"must be a date (YYYY-MM-DD) or a date-time with offset, got {_shown(raw)}"
    )


def _check_json(meta: Mapping[str, Any]) -> None:
    """No NUL character anywhere (Postgres cannot store it in jsonb) and no deeper
    nesting than MAX_DEPTH; walked without recursion."""
    stack: list[tuple[str, Any, int]] = [("meta", meta, 0)]
    while stack:
        where, value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _bad_meta(where, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, str) and "\x00" in value:
            raise _bad_meta(where, "must not contain a NUL character")
        if isinstance(value, dict):
            for k, v in value.items():
                if "\x00" in k:
                    raise _bad_meta(where, "a key must not contain a NUL character")
                stack.append((f"{where}.{k}", v, depth + 1))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", v, depth + 1) for i, v in enumerate(value))


def _check_with_kind(
    check: Callable[[JobSpec], None] | None, spec: JobSpec, params: dict[str, Any]
) -> None:
    """What the parser itself says of the run's params (two-letter country codes, …)."""
    if check is None:
        return
    try:
        check(dataclasses.replace(spec, params=params))
    except (ValueError, TypeError, KeyError) as exc:
        text = str(exc)
        quoted = _QUOTED_FIELD.match(text)
        field, why = quoted.groups() if quoted else ("meta", text)
        raise _bad_meta(field, f"{why} (the {spec.kind} parser refuses it)") from None


def _operation_id(raw: str) -> int:
    """Any id that cannot be an operation's is simply not found (the seed: 404)."""
    value = int(raw) if _ID.fullmatch(raw) else 0
    if not 0 < value <= MAX_ID:
        raise ApiError(404, "unknown_operation", f"operationId: no parsing operation {_shown(raw)}")
    return value


def _entry(op: operations.Operation, events: list[Any]) -> dict[str, Any]:
    return {"operation": op.view(), "events": events, "totalEvents": len(events)}


async def create(request: web.Request) -> web.Response:
    _require_key(request)
    no_query(request)
    state = request.app[STATE]
    body = await _body(request, ("type", "meta"))
    spec = _job_for(state.settings, body.get("type"))
    params = {**spec.params, "meta": check_meta(body.get("meta"))}
    _check_with_kind(request.app.get(CHECKERS, {}).get(spec.kind), spec, params)
    run_id = await runs.enqueue(
        state.pool,
        job=spec.name,
        kind=spec.kind,
        params=params,
        trigger="api",
        requested_by=f"api:{state.settings.worker_id}",
    )
    log.info("operation %s (%s) queued as a run of %s", run_id, body["type"], spec.name)
    return json_response(
        {
            "status": "ok",
            "operationId": str(run_id),
            "message": "Operation created; the leader starts it",
        }
    )


async def results(request: web.Request) -> web.Response:
    _require_key(request)
    no_query(request)
    pool = request.app[STATE].pool
    raw = request.match_info["operationId"]
    op = await operations.get(pool, _operation_id(raw))
    if op is None:
        raise ApiError(404, "unknown_operation", f"operationId: no parsing operation {_shown(raw)}")
    # The chain was read first: if it says finished, every batch was saved before it.
    events = await run_items.read(pool, op.id)
    answer = {"status": "ok", **_entry(op, events)}
    if op.finished and await operations.mark_processed(pool, op.id):
        log.info("operation %s (%s) read: marked processed", op.id, op.status)
    return json_response(answer)


async def unprocessed(request: web.Request) -> web.Response:
    _require_key(request)
    q = Query(request.query, ("limit",))
    pool = request.app[STATE].pool
    found = await operations.unprocessed(
        pool, limit=q.integer("limit", default=UNPROCESSED_LIMIT, lo=1, hi=MAX_LIMIT)
    )
    entries = [_entry(op, await run_items.read(pool, op.id)) for op in found]
    return json_response({"status": "ok", "operations": entries})


async def cleanup(request: web.Request) -> web.Response:
    _require_key(request)
    no_query(request)
    body = await _body(request, ("days",))
    days = body.get("days", DEFAULT_CLEANUP_DAYS)
    if days is None:
        days = DEFAULT_CLEANUP_DAYS
    if isinstance(days, bool) or not isinstance(days, int | float) or not 0 <= days <= MAX_DAYS:
        raise ApiError(
            400, "bad_days", f"days: must be a number from 0 to {MAX_DAYS}, got {_shown(days)}"
        )
    deleted = await run_items.delete_processed(request.app[STATE].pool, older_than_days=days)
    log.info("cleanup: deleted %d events of processed operations older than %g days", deleted, days)
    return json_response({"status": "ok", "deletedCount": deleted, "message": "Cleanup completed"})


def add_routes(app: web.Application, *, checkers: Checkers | None = None) -> None:
    """The `/parsing/*` routes; with `checkers` (kind -> `JobKind.check`), create also
    asks the operation's parser whether it can read the meta."""
    if checkers is not None:
        app[CHECKERS] = checkers
    app.router.add_post("/parsing/create", create)
    app.router.add_get("/parsing/results/{operationId}", results)
    app.router.add_get("/parsing/unprocessed", unprocessed)
    app.router.add_post("/parsing/cleanup", cleanup)
