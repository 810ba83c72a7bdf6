"""Seed 001's main-server role: ask a remote parsing server for parsing operations on a
schedule, read their results, file their events (`worker.events`).

- `remote_parsing.create` (Monday: Fienta, …): POST /parsing/create {type, meta}, then a
  local operation `pending` holding the remote id. The remote down, or refusing: the
  run fails and no operation is recorded (the seed's rule).
- `remote_parsing.read` (a day later): the newest local operation of its type still
  open; GET /parsing/results/{id}. Still pending or processing there: left for the
  sweep. Success, or error with events: filed now. The remote down: the operation is
  marked `error` with the reason, and the run fails.
- `remote_parsing.sweep` (Sunday): GET /parsing/unprocessed; each operation listed is
  recorded locally if it is unknown and read as `read` reads; then each local
  operation still open, so none waits for ever on a week the remote was down.

The seed forbids triggering these by hand: a job of these kinds must say
`manual = false`, and POST /jobs/{name}/trigger answers 400 with `NOT_BY_HAND`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlsplit
from zoneinfo import ZoneInfo

import orjson

from .. import events
from ..config import JobSpec, secret
from ..context import RunContext
from ..errors import ConfigError, JobError, UpstreamError
from ..events import NOT_BY_HAND, LocalOperation
from ..logs import redact
from ..merge import strip_nul
from ..parsing import TYPES
from ..ratelimit import Rate
from ..upstream import Response, Timeouts, Upstream, error_detail, host_label, redact_url

SERVER_URL_ENV = "PARSING_SERVER_URL"


def run_day(slot: datetime | None, timezone: str) -> date:
    """The day a run is for, in the job's timezone (a Monday 01:00 Kyiv slot is Sunday
    in UTC): where `days_ahead` windows start."""
    return (slot or datetime.now(UTC)).astimezone(ZoneInfo(timezone)).date()


API_KEY_ENV = "PARSING_SERVER_API_KEY"
STATUSES = ("pending", "processing", "success", "error")
MAX_LISTS = 20  # GET /parsing/unprocessed calls in one sweep
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_COMMON = {
    "server_url_env",
    "api_key_env",
    "rate_limit",
    "connect_timeout",
    "read_timeout",
    "total_timeout",
}
_META_LISTS = ("countries", "cities", "categories")


class ParsingServerError(JobError):
    """The parsing server could not be reached, or answered an error or nonsense."""


@dataclass(frozen=True)
class Results:
    """One operation as the parsing server shows it: the seed's `operation` and events."""

    operation: dict[str, Any]
    events: list[Any]

    @property
    def remote_id(self) -> str:
        return str(self.operation.get("_id") or "")


class ParsingServer:
    """The seed's ParsingServerServices: the three calls, with `X-API-Key`, through the
    shared rate-limited client. Every failure is a ParsingServerError saying why."""

    def __init__(self, upstream: Upstream, *, url: str, api_key: str) -> None:
        self.upstream = upstream
        self.url = url.rstrip("/")
        self.name = redact_url(self.url)  # what the local operations record
        self.limit_key = f"parsing-server:{host_label(url)}"
        self._headers = {"X-API-Key": api_key}

    async def create(self, type_name: str, meta: Mapping[str, Any]) -> str:
        """POST /parsing/create; the remote operation's id."""
        body = orjson.dumps({"type": type_name, "meta": meta})
        answer = await self._call("POST", "/parsing/create", what="create", data=body)
        found = answer.get("operationId")
        if isinstance(found, bool) or not isinstance(found, str | int) or found == "":
            raise ParsingServerError(
                f"parsing server {self.name}: create answered without an operationId:"
                f" {orjson.dumps(answer).decode()[:200]}"
            )
        return str(found)

    async def results(self, remote_id: str) -> Results:
        """GET /parsing/results/{id}: the operation and all its events."""
        what = f"results of operation {remote_id}"
        answer = await self._call("GET", f"/parsing/results/{quote(remote_id, safe='')}", what=what)
        return self._results(answer, what)

    async def unprocessed(self) -> list[Results]:
        """GET /parsing/unprocessed: the finished operations nobody has read yet."""
        answer = await self._call("GET", "/parsing/unprocessed", what="unprocessed operations")
        listed = answer.get("operations") or []
        if not isinstance(listed, list):
            raise ParsingServerError(f"parsing server {self.name}: 'operations' is not a list")
        found = [self._results(e, "unprocessed operations") for e in listed]
        return [r for r in found if r.remote_id]  # one without an id cannot be read

    def _results(self, answer: Any, what: str) -> Results:
        operation = answer.get("operation") if isinstance(answer, dict) else None
        if not isinstance(operation, dict) or operation.get("status") not in STATUSES:
            shown = orjson.dumps(operation).decode()[:200]
            raise ParsingServerError(
                f"parsing server {self.name}: {what}: not an operation with a status: {shown}"
            )
        found = answer.get("events") or []
        if not isinstance(found, list):
            raise ParsingServerError(f"parsing server {self.name}: {what}: 'events' is not a list")
        return Results(strip_nul(operation), found)

    async def _call(self, method: str, path: str, *, what: str, **kwargs: Any) -> dict[str, Any]:
        headers = {**self._headers, "Content-Type": "application/json"}
        try:
            response = await self.upstream.request(
                method,
                self.url + path,
                limit_key=self.limit_key,
                what=what,
                headers=headers,
                **kwargs,
            )
            body = response.json() if response.ok else None
        except UpstreamError as exc:
            raise ParsingServerError(f"parsing server {self.name} unreachable: {exc}") from None
        if not response.ok:
            raise ParsingServerError(
                f"parsing server {self.name}: {what}: {method} {response.url} answered"
                f" HTTP {response.status}: {_detail(response)}"
            )
        if not isinstance(body, dict):
            raise ParsingServerError(f"parsing server {self.name}: {what}: not a JSON object")
        return body


def _detail(response: Response) -> str:
    """Our parsing server's `{"error": {"code", "message"}}`, or whatever was said."""
    try:
        body = orjson.loads(response.body)
    except orjson.JSONDecodeError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return f"{error.get('code')}: {error['message']}"
    return error_detail(response)


# -- params ----------------------------------------------------------------------------


def _check_common(spec: JobSpec, allowed: set[str]) -> None:
    if spec.manual:
        raise ValueError(
            f"{spec.kind} runs on its schedule only: set manual = false ({NOT_BY_HAND})"
        )
    p = spec.params
    unknown = sorted(set(p) - allowed - _COMMON)
    if unknown:
        known = ", ".join(sorted(allowed | _COMMON))
        raise ValueError(f"unknown param {unknown[0]!r}; {spec.kind} takes {known}")
    for name, default in (("server_url_env", SERVER_URL_ENV), ("api_key_env", API_KEY_ENV)):
        value = p.get(name, default)
        if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
            raise ValueError(f"'{name}' must name an environment variable, got {value!r}")
    rate = p.get("rate_limit", 1)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or rate < 0:
        raise ValueError(f"'rate_limit' must be a number of calls per second, got {rate!r}")
    Timeouts.from_params(p)


def _check_type(spec: JobSpec) -> None:
    value = spec.params.get("type")
    if value not in TYPES:
        raise ValueError(f"'type' must be one of {', '.join(TYPES)}, got {value!r}")


def _check_meta(p: Mapping[str, Any]) -> None:
    for name in _META_LISTS:
        value = p.get(name, [])
        if not isinstance(value, list) or not all(
            (isinstance(v, str) and v.strip()) or isinstance(v, dict) for v in value
        ):
            raise ValueError(f"'{name}' must be a list of names or tables, got {value!r}")
    if "dates" in p and "days_ahead" in p:
        raise ValueError("give 'dates' or 'days_ahead', not both")
    if "dates" in p:
        dates = p["dates"]
        if not isinstance(dates, dict) or not dates or set(dates) - {"from", "to"}:
            raise ValueError(f"'dates' must be a table {{from, to}}, got {dates!r}")
        for key, value in dates.items():
            if not isinstance(value, str | date):
                raise ValueError(f"'dates.{key}' must be a date, got {value!r}")
    ahead = p.get("days_ahead", 1)
    if isinstance(ahead, bool) or not isinstance(ahead, int) or not 1 <= ahead <= 3650:
        raise ValueError(f"'days_ahead' must be a whole number of days, 1 to 3650, got {ahead!r}")


def build_meta(p: Mapping[str, Any], today: date) -> dict[str, Any]:
    """The seed's `meta`: the configured countries, cities and categories as given, and
    `dates` as given or `days_ahead` days from `today`."""
    meta: dict[str, Any] = {name: p[name] for name in _META_LISTS if name in p}
    if "dates" in p:
        meta["dates"] = {
            k: v.isoformat() if isinstance(v, date) else v for k, v in p["dates"].items()
        }
    elif "days_ahead" in p:
        last = today + timedelta(days=int(p["days_ahead"]))
        meta["dates"] = {"from": today.isoformat(), "to": last.isoformat()}
    return meta


def _server(ctx: RunContext) -> ParsingServer:
    p = ctx.params
    url = _env(str(p.get("server_url_env", SERVER_URL_ENV)), ctx.job.name)
    if urlsplit(url).scheme not in ("http", "https"):
        raise JobError(
            f"{p.get('server_url_env', SERVER_URL_ENV)} must be an http(s) URL, got {redact(url)!r}"
        )
    key = _env(str(p.get("api_key_env", API_KEY_ENV)), ctx.job.name)
    upstream = ctx.upstream.bound(timeouts=Timeouts.from_params(p), on_retry=ctx.note)
    server = ParsingServer(upstream, url=url, api_key=key)
    upstream.limiter.configure_once(
        server.limit_key, Rate.per_second(float(p.get("rate_limit", 1)))
    )
    return server


def _env(name: str, job: str) -> str:
    """The variable, or the file `<name>_FILE` names; read when a run starts, so a
    rotated key is picked up."""
    try:
        value = secret(name)
    except ConfigError as exc:
        raise JobError(f"{exc} (for job {job!r})") from None
    if not value:
        raise JobError(f"environment variable {name} (or {name}_FILE) (for job {job!r}) is not set")
    return value


# -- processing (the seed's processParsingResults) -----------------------------------


def _when(value: Any) -> datetime | None:
    try:
        found = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return found if found is None or found.tzinfo else found.replace(tzinfo=UTC)


def _say(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _source(type_name: str) -> str:
    """The source of an event that names none: `fienta` for parsingEventsFromFienta."""
    return TYPES.get(type_name, "unknown").removeprefix("parse.")


class _Processor:
    """Reads operations and files their events for one run; counts in `ctx.stats`."""

    def __init__(self, ctx: RunContext, server: ParsingServer) -> None:
        self.ctx, self.server = ctx, server
        for key in ("processed", "left", "unreadable", "created", "updated", "unchanged"):
            ctx.stats.setdefault(key, 0)
        ctx.stats.setdefault("failed_events", 0)

    async def process(self, op: LocalOperation) -> tuple[str, str]:
        """Read the operation and act on its remote status; (outcome, message) where
        outcome is `left`, `success`, `error` (filed), or `unreadable`."""
        ctx, stats = self.ctx, self.ctx.stats
        try:
            found = await self.server.results(op.remote_id)
        except ParsingServerError as exc:
            reason = str(exc)
            async with ctx.fenced() as conn:
                await events.mark_error(conn, op.id, reason=reason)
            stats["unreadable"] += 1
            ctx.log.warning("operation %s marked error: %s", op.id, reason)
            return "unreadable", f"operation {op.id} (remote {op.remote_id}) marked error: {reason}"
        remote = found.operation
        status, info = remote["status"], _say(remote.get("infoText"))
        if status in events.OPEN:  # the seed: not processed now; the sweep takes it
            async with ctx.fenced() as conn:
                await events.mark_waiting(conn, op.id, status=status, info_text=info, remote=remote)
            stats["left"] += 1
            return "left", (
                f"operation {op.id} (remote {op.remote_id}) is still {status} on the parsing"
                f" server ({info or 'no progress yet'}): left for the sweep"
            )
        async with ctx.fenced() as conn:
            filed = await events.file_events(conn, found.events, source=_source(op.type))
            errors = [_say(remote.get("errorText"))] if status == "error" else []
            if filed["failed"]:
                first = filed["failed_sample"][0]
                errors.append(
                    f"{filed['failed']} events not filed (first: {first['id']}: {first['reason']})"
                )
            await events.mark_processed(
                conn,
                op.id,
                status=status,
                statistics=filed,
                error_text="; ".join(e for e in errors if e),
                info_text=info,
                remote=remote,
                finished_at=_when(remote.get("finish_time")),
                run_id=ctx.run_id,
            )
        stats["processed"] += 1
        for key in ("created", "updated", "unchanged"):
            stats[key] += filed[key]
        stats["failed_events"] += filed["failed"]
        return status, (
            f"operation {op.id} (remote {op.remote_id}, {status}): {filed['total']} events,"
            f" {filed['created']} created, {filed['updated']} updated,"
            f" {filed['unchanged']} unchanged, {filed['failed']} failed"
        )


# -- the job kinds -----------------------------------------------------------------------


class RemoteCreateJob:
    """Params: type, countries, cities, categories, dates | days_ahead, and the server's
    (server_url_env, api_key_env, rate_limit, timeouts)."""

    resumable = False

    def check(self, spec: JobSpec) -> None:
        _check_common(spec, {"type", "days_ahead", "dates", *_META_LISTS})
        _check_type(spec)
        _check_meta(spec.params)

    async def run(self, ctx: RunContext) -> dict[str, Any]:
        server = _server(ctx)
        type_name = str(ctx.params["type"])
        meta = build_meta(ctx.params, run_day(ctx.slot, ctx.job.timezone))
        remote_id = await server.create(type_name, meta)  # fails the run: nothing recorded
        async with ctx.fenced() as conn:
            op, _ = await events.record_operation(
                conn,
                type_name=type_name,
                server=server.name,
                remote_id=remote_id,
                meta=meta,
                run_id=ctx.run_id,
            )
            ctx.stats.update(operation=op.id, remote_id=remote_id)
            message = f"operation {op.id} pending: remote operation {remote_id} on {server.name}"
            await ctx.progress(done=1, total=1, message=message, conn=conn)
        return {"operation": op.id, "remote_id": remote_id, "type": type_name}


class RemoteReadJob:
    """Params: type, and the server's. Reads the newest open operation of the type."""

    resumable = False

    def check(self, spec: JobSpec) -> None:
        _check_common(spec, {"type"})
        _check_type(spec)

    async def run(self, ctx: RunContext) -> dict[str, Any]:
        server = _server(ctx)
        type_name = str(ctx.params["type"])
        op = await events.newest_open(ctx.pool, server=server.name, type_name=type_name)
        if op is None:
            message = f"no pending {type_name} operation on {server.name}: nothing to read"
            await ctx.progress(done=0, total=0, message=message)
            return {"operation": None, "outcome": "none"}
        outcome, message = await _Processor(ctx, server).process(op)
        await ctx.progress(done=1, total=1, message=message)
        if outcome == "unreadable":
            raise JobError(message)
        return {"operation": op.id, "remote_id": op.remote_id, "outcome": outcome}


class RemoteSweepJob:
    """Params: max_operations (default 200), and the server's."""

    resumable = False

    def check(self, spec: JobSpec) -> None:
        _check_common(spec, {"max_operations"})
        cap = spec.params.get("max_operations", 200)
        if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= 10_000:
            raise ValueError(f"'max_operations' must be a whole number, 1 to 10000, got {cap!r}")

    async def run(self, ctx: RunContext) -> dict[str, Any]:
        server = _server(ctx)
        cap = int(ctx.params.get("max_operations", 200))
        work = _Processor(ctx, server)
        stats = ctx.stats
        stats.setdefault("recorded", 0)
        seen: set[str] = set()
        unreadable: list[str] = []

        async def one(op: LocalOperation) -> None:
            seen.add(op.remote_id)
            outcome, message = await work.process(op)
            if outcome == "unreadable":
                unreadable.append(message)
            await ctx.progress(done=len(seen), message=message)

        for _ in range(MAX_LISTS):
            listed = [r for r in await server.unprocessed() if r.remote_id not in seen]
            if not listed or len(seen) >= cap:
                break
            for found in listed[: cap - len(seen)]:
                async with ctx.fenced() as conn:
                    op, recorded = await events.record_operation(
                        conn,
                        type_name=_say(found.operation.get("type")) or "unknown",
                        server=server.name,
                        remote_id=found.remote_id,
                        run_id=ctx.run_id,
                    )
                stats["recorded"] += recorded
                await one(op)
        # What the list did not bring: operations read while the remote was still at
        # work, or whose filing failed after the remote had marked them read.
        for op in await events.open_operations(ctx.pool, server=server.name, limit=cap):
            if op.remote_id not in seen and len(seen) < cap:
                await one(op)
        summary = (
            f"swept {len(seen)} operations: {stats['processed']} processed"
            f" ({stats['recorded']} not known before), {stats['left']} still running,"
            f" {stats['unreadable']} unreadable; events {stats['created']} created,"
            f" {stats['updated']} updated, {stats['unchanged']} unchanged"
        )
        await ctx.progress(done=len(seen), total=len(seen), message=summary)
        if unreadable:
            raise JobError(f"{summary}; first: {unreadable[0]}")
        return {k: stats[k] for k in ("processed", "recorded", "left", "unreadable")}
