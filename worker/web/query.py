"""What the API accepts: one reader for query parameters and path ids, and the error
it answers with.

Every refusal is an `ApiError` 400 whose code is `bad_<parameter>` (or
`unknown_parameter`) and whose message names the parameter and what it accepts, so
no input reaches the database that it would refuse (ids past bigint, NUL in text).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web
from multidict import MultiMapping

from ..errors import WorkerError

MAX_ID = 2**63 - 1  # ids are bigint
MAX_LIMIT = 1000
MAX_OFFSET = 1_000_000
MAX_TEXT = 200
MAX_NESTING = 64  # arrays and objects in a body (a parsing meta: 32 inside it)
TRUE, FALSE = ("true", "1"), ("false", "0")
# Python's datetime ends with years 1 and 9999: a bound closer to either end than this
# cannot be moved to UTC or stepped back to the slot before it.
EDGE = timedelta(days=2)
FIRST, LAST = datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)

_INTEGER = re.compile(r"-?[0-9]{1,30}")  # ASCII digits only: int() also takes "+5", "1_0"


class ApiError(WorkerError):
    """An error answered as {"error": {"code", "message"}} with an HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def bad(name: str, message: str) -> ApiError:
    return ApiError(400, f"bad_{name}", f"{name}: {message}")


def integer(raw: str, name: str, *, lo: int, hi: int) -> int:
    """A whole number from `lo` to `hi`, written in ASCII digits."""
    value = int(raw) if _INTEGER.fullmatch(raw) else None
    if value is None or not lo <= value <= hi:
        raise bad(name, f"must be a whole number from {lo} to {hi}, got {_shown(raw)}")
    return value


def in_range(name: str, raw: str, value: datetime) -> datetime:
    """`value` (a bound read from `raw`) if it lies EDGE inside years 1 to 9999 in UTC, as
    stepping back to the slot before it and Postgres' driver need; else 400
    bad_<name>. A value without an offset is left to its reader to refuse."""
    try:
        if value.tzinfo is not None and not FIRST + EDGE <= value.astimezone(UTC) <= LAST - EDGE:
            raise out_of_range(name, raw)
    except OverflowError:
        raise out_of_range(name, raw) from None
    return value


def utc_clamped(value: datetime) -> datetime:
    """`value` in UTC; past either end of Python's datetime (an offset on 0001-01-01 or
    9999-12-31), that end: a search bound, as no row can be stored beyond it."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        return FIRST if value.year == 1 else LAST


def out_of_range(name: str, raw: str) -> ApiError:
    return bad(name, f"{_shown(raw)} is out of range: years 1 to 9999, two days off either end")


def parse_run_id(raw: str) -> int:
    """A run id from the path: 1 to the largest bigint."""
    return integer(raw, "id", lo=1, hi=MAX_ID)


def _shown(raw: str) -> str:
    return repr(raw if len(raw) <= 40 else raw[:40] + "…")


class Query:
    """The query string of one request, read against the parameters an endpoint takes.

    An unknown or repeated parameter is refused at once; an empty value counts as
    not given.
    """

    def __init__(self, query: MultiMapping[str], takes: Sequence[str]) -> None:
        for name in query:
            if name not in takes:
                raise ApiError(
                    400,
                    "unknown_parameter",
                    f"unknown query parameter {_shown(name)}; this endpoint takes"
                    f" {', '.join(takes) or 'none'}",
                )
            if len(query.getall(name)) > 1:
                raise bad(name, "given more than once; give it once")
        self._query = query

    def text(self, name: str) -> str | None:
        """A string of at most MAX_TEXT characters with no NUL; None if not given."""
        raw = self._query.get(name) or None
        if raw is not None and "\x00" in raw:
            raise bad(name, "must not contain a NUL character")
        if raw is not None and len(raw) > MAX_TEXT:
            raise bad(name, f"must be at most {MAX_TEXT} characters, got {len(raw)}")
        return raw

    def choice(self, name: str, options: Sequence[str]) -> str | None:
        raw = self._query.get(name) or None
        if raw is not None and raw not in options:
            raise bad(name, f"must be one of {', '.join(options)}, got {_shown(raw)}")
        return raw

    def integer(self, name: str, *, default: int, lo: int, hi: int) -> int:
        raw = self._query.get(name) or None
        return default if raw is None else integer(raw, name, lo=lo, hi=hi)

    def boolean(self, name: str, *, default: bool) -> bool:
        """true or 1, false or 0 (any case)."""
        raw = self._query.get(name) or None
        if raw is None:
            return default
        if raw.lower() in TRUE + FALSE:
            return raw.lower() in TRUE
        raise bad(name, f"must be true or false (or 1 or 0), got {_shown(raw)}")


def shown(value: Any) -> str:
    text = orjson.dumps(value).decode() if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:60] + "…"


def no_query(request: web.Request) -> None:
    """Refuse any query parameter: the endpoint takes none."""
    Query(request.query, ())


def _unique_keys(pairs: list[tuple[str, Any]]) -> None:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ApiError(400, "bad_body", f"body: key {_shown(key)} appears twice in one object")
        seen.add(key)


def _depth_at_most(value: Any, limit: int) -> bool:
    """Whether `value` nests at most `limit` arrays and objects deep (walked without
    recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return True


def parse_json(raw: bytes) -> Any:
    """I-JSON (RFC 7493), as a body must be: orjson refuses what is not UTF-8, a byte
    order mark, NaN and Infinity, a lone surrogate; nesting past MAX_NESTING levels
    and a key twice in one object are refused too (orjson would keep the last value
    silently)."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "bad_body", f"body: not valid JSON: {exc}") from None
    if isinstance(value, dict | list):
        if not _depth_at_most(value, MAX_NESTING):
            raise ApiError(400, "bad_body", f"body: nested deeper than {MAX_NESTING} levels")
        # orjson keeps no record of the keys it replaced: a second, stdlib pass looks.
        json.loads(raw, object_pairs_hook=_unique_keys)
    return value


async def read_body(
    request: web.Request, fields: tuple[str, ...], *, max_bytes: int = 64 * 1024
) -> dict[str, Any]:
    """The JSON object sent (see `parse_json`), at most `max_bytes`, with only these
    fields; an empty body is an empty object. Its Content-Type is not looked at."""
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, "body_too_large", f"body: at most {max_bytes} bytes are accepted")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    # A parsing meta of whole city lists takes a good part of a second to check: in a
    # thread, the event loop (the probes among it) gets its turns meanwhile.
    body = parse_json(raw) if len(raw) < 1024 * 1024 else await asyncio.to_thread(parse_json, raw)
    if not isinstance(body, dict):
        raise ApiError(400, "bad_body", f"body: must be a JSON object, got {shown(body)}")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise ApiError(
            400,
            "unknown_field",
            f"body: unknown field {unknown[0]!r}; this endpoint takes {', '.join(fields)}",
        )
    return body
