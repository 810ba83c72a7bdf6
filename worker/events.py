"""Seed 001's main-server store: the events filed from parsing operations, and the
local operations that hold the remote operations' ids. Every SQL statement of both,
and the seed's rule that the jobs behind them are never triggered by hand. What a
parsing server sent is stored without NUL characters (Postgres refuses them).

Events are filed by (source, external id) through the catalogue's batch upsert
(`worker.merge`): created, updated and unchanged are counted in the database, an
event whose content hash is unchanged is not rewritten, NUL characters are removed
and an event the database refuses is isolated and reported, never fatal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import orjson

from . import merge
from .catalog import to_decimal
from .db import Connection, Pool, like_literal
from .merge import strip_nul

# The main server's parsing jobs run on their schedule only; the seed forbids calling
# them by hand (its OperationsController answers 400 with this reason).
SCHEDULE_ONLY_KINDS = frozenset(
    {"remote_parsing.create", "remote_parsing.read", "remote_parsing.sweep"}
)
NOT_BY_HAND = (
    "this operation cannot be triggered by hand: it runs automatically on its schedule"
    " (seed 001: «Этот тип операции нельзя вызывать вручную. Он выполняется автоматически"
    " по расписанию.»)"
)
BATCH = 5000  # events merged per statement
FAILED_SAMPLE = 20
OPEN = ("pending", "processing")

EVENTS = merge.Target(
    table="events",
    alias="e",
    key=("source", "external_id"),
    staged=(
        ("source", "text"),
        ("external_id", "text"),
        ("title", "text"),
        ("starts_at", "timestamptz"),
        ("ends_at", "timestamptz"),
        ("timezone", "text"),
        ("venue", "text"),
        ("address", "text"),
        ("city", "text"),
        ("country", "text"),
        ("category", "text"),
        ("price_min", "numeric"),
        ("price_max", "numeric"),
        ("currency", "text"),
        ("sale_status", "text"),
        ("url", "text"),
        ("image", "text"),
        ("raw", "text"),
        ("hash", "bytea"),
    ),
    casts={"raw": "jsonb"},
    also_set={"last_seen": "now()"},
    label=("source", "external_id"),
)
PUBLIC_COLUMNS = (
    "source, external_id, title, starts_at, ends_at, timezone, venue, address, city, country,"
    " category, price_min, price_max, currency, sale_status, url, image, first_seen, last_seen"
)
_TEXTS = (
    "timezone",
    "venue",
    "address",
    "city",
    "country",
    "category",
    "currency",
    "sale_status",
    "url",
    "image",
)


class NotAnEvent(ValueError):
    """An entry of `events` that cannot be filed; the message says why."""


def _text(event: Mapping[str, Any], name: str) -> tuple[str | None, bool]:
    value = event.get(name)
    if value is None or value == "" or isinstance(value, bool):
        return None, False
    if isinstance(value, int | float):
        return str(value), False
    if not isinstance(value, str):
        return None, False  # a structure where text was expected: `raw` keeps it
    return merge.without_nul(value)


def _instant(event: Mapping[str, Any], name: str) -> datetime | None:
    value = event.get(name)
    if value is None or value == "":
        return None
    try:
        instant = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        instant = None
    if instant is None:
        raise NotAnEvent(f"{name} {str(value)[:60]!r} is not an ISO date-time")
    if instant.tzinfo is None:
        raise NotAnEvent(f"{name} {value!r} has no UTC offset: its instant is unknown")
    return instant


def _price(event: Mapping[str, Any], name: str) -> Decimal | None:
    try:
        return to_decimal(event.get(name))
    except ValueError as exc:
        raise NotAnEvent(f"{name}: {exc}") from None


def to_record(event: Any, *, source: str) -> tuple[merge.Record, bool]:
    """The staging row of a normalised event (docs/parsing.md), and whether NULs were
    removed. `source` is used when the event names none. Raises NotAnEvent."""
    if not isinstance(event, dict):
        raise NotAnEvent(f"not a JSON object: {orjson.dumps(event).decode()[:60]}")
    src, dirty_src = _text(event, "source")
    eid, dirty_id = _text(event, "external_id")
    title, dirty_title = _text(event, "title")
    if eid is None:
        raise NotAnEvent("no external_id")
    if title is None:
        raise NotAnEvent("no title")
    starts_at = _instant(event, "starts_at")
    if starts_at is None:
        raise NotAnEvent("no starts_at")
    found = [_text(event, name) for name in _TEXTS]
    texts = [value for value, _ in found]
    try:
        raw, digest, dirty_raw = merge.encode_json(event)
    except orjson.JSONEncodeError as exc:
        raise NotAnEvent(f"not storable JSON: {exc}") from None
    row = (
        src or source,
        eid,
        title,
        starts_at,
        _instant(event, "ends_at"),
        *texts[:6],
        _price(event, "price_min"),
        _price(event, "price_max"),
        *texts[6:],
        raw,
        digest,
    )
    dirty = dirty_src or dirty_id or dirty_title or dirty_raw or any(d for _, d in found)
    return row, dirty


def _label(event: Any, source: str) -> str:
    if isinstance(event, dict):
        return f"{event.get('source') or source}/{event.get('external_id') or '?'}"
    return f"{source}/?"


async def file_events(conn: Connection, events: Sequence[Any], *, source: str) -> dict[str, Any]:
    """File a parsing operation's events inside the caller's transaction.

    Returns the statistics the seed's main server keeps on the operation: `created`,
    `updated`, `unchanged`, `failed` (not filed: not an event, or refused by the
    database), `total` (events received), `duplicates` (an id sent twice: the later
    copy is filed), `cleaned` (NULs removed), `failed_sample` (id and reason).
    created + updated + unchanged + failed + duplicates = total.
    """
    counts = merge.Counts()
    latest: dict[tuple[str, str], merge.Record] = {}
    mapped = 0
    for event in events:
        try:
            row, dirty = to_record(event, source=source)
        except NotAnEvent as exc:
            counts.failed.append((_label(event, source), str(exc)))
            continue
        mapped += 1
        latest[(row[0], row[1])] = row  # an id twice: the later copy wins
        counts.cleaned += dirty
    records = list(latest.values())
    for start in range(0, len(records), BATCH):
        counts.add(await merge.upsert(conn, EVENTS, records[start : start + BATCH]))
    return {
        "created": counts.created,
        "updated": counts.updated,
        "unchanged": counts.unchanged,
        "failed": len(counts.failed),
        "total": len(events),
        "duplicates": mapped - len(records),
        "cleaned": counts.cleaned,
        "failed_sample": [{"id": i, "reason": r} for i, r in counts.failed[:FAILED_SAMPLE]],
    }


def day_or_instant(text: str, *, end: bool = False) -> datetime:
    """A `--from`/`--to` bound: an ISO date (UTC midnight; for `end`, the next midnight,
    so the day is included) or a date-time with an offset. ValueError says what is wrong."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime.combine(day + timedelta(days=end), time(), UTC)
        instant = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a date (2026-12-01) or a date-time with an offset"
        ) from None
    if instant.tzinfo is None:
        raise ValueError(f"{text!r} has no offset (write 2026-12-01T18:00+02:00, or a date)")
    return instant


async def search(
    pool: Pool,
    *,
    source: str | None = None,
    city: str | None = None,
    starts_from: datetime | None = None,
    starts_to: datetime | None = None,
    text: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[int, list[dict[str, Any]]]:
    """Events matching every filter given, by start: (total, page). `city` is matched
    case-insensitively; `text` is a literal substring of the title or the venue."""
    where = (
        " WHERE ($1::text IS NULL OR source = $1) AND ($2::text IS NULL OR lower(city) = lower($2))"
        " AND ($3::timestamptz IS NULL OR starts_at >= $3)"
        " AND ($4::timestamptz IS NULL OR starts_at < $4)"
        " AND ($5::text IS NULL OR title ILIKE '%' || $5 || '%' OR venue ILIKE '%' || $5 || '%')"
    )
    literal = like_literal(text)
    args = (source, city, starts_from, starts_to, literal)
    total: int = await pool.fetchval(f"SELECT count(*) FROM events{where}", *args)
    rows = await pool.fetch(
        f"SELECT {PUBLIC_COLUMNS} FROM events{where}"
        " ORDER BY starts_at, source, external_id LIMIT $6 OFFSET $7",
        *args,
        limit,
        offset,
    )
    return total, [dict(r) for r in rows]


# -- local operations (the seed's OperationsSchema on the main server) ---------------


@dataclass(frozen=True)
class LocalOperation:
    """A row of `remote_operations`: a parsing operation asked of a parsing server."""

    id: int
    type: str
    server: str
    remote_id: str
    status: str
    created_at: datetime

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> LocalOperation:
        return cls(*(row[k] for k in ("id", "type", "server", "remote_id", "status", "created_at")))


_LOCAL = "id, type, server, remote_id, status, created_at"


async def record_operation(
    conn: Connection,
    *,
    type_name: str,
    server: str,
    remote_id: str,
    run_id: int,
    meta: Mapping[str, Any] | None = None,
) -> tuple[LocalOperation, bool]:
    """The local operation of (server, remote id), recorded `pending` unless it already
    was; True if this call recorded it."""
    row = await conn.fetchrow(
        "INSERT INTO remote_operations (type, server, remote_id, meta, created_by)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (server, remote_id) DO NOTHING"
        f" RETURNING {_LOCAL}",
        type_name,
        server,
        remote_id,
        None if meta is None else dict(meta),
        run_id,
    )
    if row is not None:
        return LocalOperation.of(row), True
    row = await conn.fetchrow(
        f"SELECT {_LOCAL} FROM remote_operations WHERE server = $1 AND remote_id = $2",
        server,
        remote_id,
    )
    return LocalOperation.of(row), False


async def newest_open(pool: Pool, *, server: str, type_name: str) -> LocalOperation | None:
    """The newest operation of this type on this server still pending or processing."""
    row = await pool.fetchrow(
        f"SELECT {_LOCAL} FROM remote_operations WHERE server = $1 AND type = $2"
        " AND status IN ('pending', 'processing') ORDER BY created_at DESC, id DESC LIMIT 1",
        server,
        type_name,
    )
    return None if row is None else LocalOperation.of(row)


async def open_operations(pool: Pool, *, server: str, limit: int) -> list[LocalOperation]:
    """Up to `limit` operations on this server still pending or processing, oldest first."""
    rows = await pool.fetch(
        f"SELECT {_LOCAL} FROM remote_operations WHERE server = $1"
        " AND status IN ('pending', 'processing') ORDER BY created_at, id LIMIT $2",
        server,
        limit,
    )
    return [LocalOperation.of(r) for r in rows]


async def mark_waiting(
    conn: Connection, operation_id: int, *, status: str, info_text: str, remote: Any
) -> None:
    """The remote operation is still pending or processing: say so, file nothing."""
    await conn.execute(
        "UPDATE remote_operations SET status = $2, info_text = $3, remote = $4 WHERE id = $1",
        operation_id,
        status,
        strip_nul(info_text),
        strip_nul(remote),
    )


async def mark_processed(
    conn: Connection,
    operation_id: int,
    *,
    status: str,
    statistics: Mapping[str, Any],
    error_text: str,
    info_text: str,
    remote: Any,
    finished_at: datetime | None,
    run_id: int,
) -> None:
    """The remote operation finished and its events were filed by `run_id`."""
    await conn.execute(
        "UPDATE remote_operations SET status = $2, statistics = $3, error_text = $4,"
        " info_text = $5, remote = $6, finished_at = coalesce($7, now()),"
        " processed_at = now(), processed_by = $8 WHERE id = $1",
        operation_id,
        status,
        strip_nul(dict(statistics)),
        strip_nul(error_text),
        strip_nul(info_text),
        strip_nul(remote),
        finished_at,
        run_id,
    )


async def mark_error(conn: Connection, operation_id: int, *, reason: str) -> None:
    """The results could not be read (the seed: the remote is down): `error`, with why.
    Not processed: the sweep files the operation if the remote lists it later."""
    await conn.execute(
        "UPDATE remote_operations SET status = 'error', error_text = $2, finished_at = now()"
        " WHERE id = $1",
        operation_id,
        strip_nul(reason),
    )


async def operations(
    pool: Pool, *, status: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """Local operations, newest first (every column), only those in `status` if given."""
    rows = await pool.fetch(
        "SELECT * FROM remote_operations WHERE ($1::text IS NULL OR status = $1)"
        " ORDER BY created_at DESC, id DESC LIMIT $2",
        status,
        limit,
    )
    return [dict(r) for r in rows]
