"""Set-based batch upsert, shared by every table keyed by an external id with a content
hash (the catalogue's `products`, seed 001's `events`).

A batch is COPYed into a per-connection staging table and merged with a single
`INSERT … ON CONFLICT … DO UPDATE … WHERE hash differs`: a row whose content hash is
unchanged is not rewritten at all, and created / updated / unchanged are counted in
the database (one row back per batch). A `Target` says which table, which columns
are staged, which come from the call's arguments and how a changed row is updated;
its SQL is built once per target, from those constants, never from data.

One bad row never costs the batch: `encode_json` and `without_nul` remove the NUL
characters Postgres refuses in text and jsonb before the merge, and a row the
database still refuses is found by bisecting the batch under savepoints and reported
with the database's reason, while the rest commits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import asyncpg
import orjson

from .db import Connection

Record = tuple[Any, ...]

# What the database (or asyncpg, encoding a value) refuses because of the data itself:
# SQLSTATE class 22 (data exception) and 23 (integrity constraint), and a value asyncpg
# cannot encode. The same row fails the same way every time, so it is isolated, never
# retried; anything else (a timeout, a lost connection, the fence) fails the commit.
REFUSED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, ValueError, OverflowError)
NUL = "\x00"
# Rows per COPY into the staging table; the batch is then merged in one statement.
# asyncpg encodes a COPY's rows in one stretch on the event loop, without letting it in
# (about 1 µs a row): a probe waits a millisecond for one COPY, not a batch's worth.
COPY_ROWS = 1000
_JSON_NUL = b"\\u0000"  # how orjson writes a NUL inside a JSON string


@dataclass
class Counts:
    """What a merge did. `failed` holds (row label, reason) for the rows not stored;
    `cleaned` counts the rows whose NUL characters were removed."""

    created: int = 0
    updated: int = 0
    unchanged: int = 0
    cleaned: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    def add(self, other: Counts) -> None:
        self.created += other.created
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.cleaned += other.cleaned
        self.failed.extend(other.failed)


@dataclass(frozen=True)
class Target:
    """A table merged by batch. Names and expressions are code constants.

    `staged`: (column, SQL type) in the order of each record; `casts` converts a staged
    column on insert (`raw` is staged as text, stored as jsonb). `constants`: columns
    filled from the call's arguments `$1…$n`, the same for the whole batch. `computed`:
    further inserted columns and their expressions. On conflict every inserted column
    but the key takes `EXCLUDED.column`, or its expression in `updates`; `also_set`
    adds assignments; all only `WHERE alias.hash <> EXCLUDED.hash`, or `rewrite_when`.
    `label`: the staged columns naming a refused row in `Counts.failed`.
    """

    table: str
    alias: str
    key: tuple[str, ...]
    staged: tuple[tuple[str, str], ...]
    label: tuple[str, ...]
    constants: tuple[str, ...] = ()
    casts: Mapping[str, str] = field(default_factory=dict)
    computed: Mapping[str, str] = field(default_factory=dict)
    updates: Mapping[str, str] = field(default_factory=dict)
    also_set: Mapping[str, str] = field(default_factory=dict)
    rewrite_when: str = ""

    @property
    def stage(self) -> str:
        return f"{self.table}_stage"

    @cached_property
    def columns(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.staged)

    @cached_property
    def create_stage(self) -> str:
        # Temp tables live per connection; ON COMMIT DELETE ROWS empties it after each batch.
        typed = ", ".join(f"{name} {sql_type}" for name, sql_type in self.staged)
        return f"CREATE TEMP TABLE IF NOT EXISTS {self.stage} ({typed}) ON COMMIT DELETE ROWS"

    @cached_property
    def truncate(self) -> str:
        return f"TRUNCATE {self.stage}"

    @cached_property
    def merge(self) -> str:
        staged = [(c, f"{c}::{self.casts[c]}" if c in self.casts else c) for c in self.columns]
        inserted = [
            *((c, f"${i}") for i, c in enumerate(self.constants, 1)),
            *staged,
            *self.computed.items(),
        ]
        fixed = {*self.key, *self.constants}
        sets = [
            f"{c} = {self.updates.get(c, f'EXCLUDED.{c}')}" for c, _ in inserted if c not in fixed
        ]
        sets += [f"{c} = {expr}" for c, expr in self.also_set.items()]
        changed = f"{self.alias}.hash <> EXCLUDED.hash"
        if self.rewrite_when:
            changed += f" OR {self.rewrite_when}"
        return (
            f"WITH merged AS (INSERT INTO {self.table} AS {self.alias}"
            f" ({', '.join(c for c, _ in inserted)})"
            f" SELECT {', '.join(e for _, e in inserted)} FROM {self.stage}"
            f" ON CONFLICT ({', '.join(self.key)}) DO UPDATE SET {', '.join(sets)}"
            f" WHERE {changed} RETURNING (xmax = 0) AS created)"
            " SELECT count(*) FILTER (WHERE created) AS created, count(*) AS written FROM merged"
        )

    def name_of(self, record: Record) -> str:
        """How `Counts.failed` names a record: its `label` columns joined by '/'."""
        columns = self.columns
        return "/".join(str(record[columns.index(c)]) for c in self.label)


def strip_nul(value: Any) -> Any:
    """A JSON value with every NUL character removed, in keys and values, at any depth."""
    if isinstance(value, str):
        return value.replace(NUL, "")
    if isinstance(value, dict):
        return {strip_nul(k): strip_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_nul(v) for v in value]
    return value


def without_nul(value: str | None) -> tuple[str | None, bool]:
    """A text value without NUL characters, and whether it had any."""
    if value is not None and NUL in value:
        return value.replace(NUL, ""), True
    return value, False


def encode_json(value: Any) -> tuple[str, bytes, bool]:
    """`value` as stored: its JSON text (sorted keys, NULs removed), the content hash of
    exactly that text, and whether NULs were removed. Raises orjson.JSONEncodeError for
    a value JSON cannot hold (an integer beyond 64 bits)."""
    raw = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    cleaned = False
    if _JSON_NUL in raw:  # the check is free where the text is made anyway
        stripped = orjson.dumps(strip_nul(value), option=orjson.OPT_SORT_KEYS)
        cleaned, raw = stripped != raw, stripped
    return raw.decode(), hashlib.blake2b(raw, digest_size=16).digest(), cleaned


async def upsert(conn: Connection, target: Target, records: Sequence[Record], *args: Any) -> Counts:
    """Merge `records` (one per key: the caller drops earlier copies) inside the caller's
    transaction; `args` fill `target.constants` and any further `$n` of its expressions.
    A record the database refuses is left out and reported in `failed`."""
    if not records:
        return Counts()
    await conn.execute(target.create_stage)
    return await _isolated(conn, target, list(records), args)


async def _isolated(
    conn: Connection,
    target: Target,
    records: list[Record],
    args: tuple[Any, ...],
) -> Counts:
    """Merge under a savepoint; when the database refuses the batch, bisect it so the
    good rows are stored and each refused one is reported with the reason."""
    try:
        async with conn.transaction():  # nested: a SAVEPOINT, so a refusal undoes only this
            return await _merge(conn, target, records, args)
    except REFUSED as exc:
        if len(records) == 1:
            by = "the database" if isinstance(exc, asyncpg.PostgresError) else "asyncpg"
            reason = " ".join(f"refused by {by}: {type(exc).__name__}: {exc}".split())
            return Counts(failed=[(target.name_of(records[0]), reason)])
    half = len(records) // 2
    counts = await _isolated(conn, target, records[:half], args)
    counts.add(await _isolated(conn, target, records[half:], args))
    return counts


async def _merge(
    conn: Connection,
    target: Target,
    records: list[Record],
    args: tuple[Any, ...],
) -> Counts:
    await conn.execute(target.truncate)  # a second batch in the same transaction
    for start in range(0, len(records), COPY_ROWS):
        chunk = records[start : start + COPY_ROWS]
        await conn.copy_records_to_table(target.stage, records=chunk, columns=target.columns)
    row = await conn.fetchrow(target.merge, *args)
    created, written = int(row["created"]), int(row["written"])
    return Counts(created=created, updated=written - created, unchanged=len(records) - written)
