"""The catalogue store: set-based batch upsert of synced items, gone-marking, queries.

One batch is COPYed into a per-connection staging table and merged with a single
`INSERT … ON CONFLICT … WHERE hash differs`: rows whose content hash is unchanged
are not rewritten at all, and the database, not a per-row round trip, sets the pace.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from .db import Connection, Pool

MAX_PRICE = Decimal(10) ** 10  # numeric(14, 4)
_STAGE = "products_stage"
_STAGE_COLUMNS = (
    "external_id",
    "name",
    "sku",
    "ean",
    "price",
    "currency",
    "stock",
    "status",
    "url",
    "raw",
    "hash",
)
PUBLIC_COLUMNS = (
    "source, account, external_id, name, sku, ean, price, currency, stock, status, url,"
    " first_seen, last_seen, gone_at"
)


@dataclass(slots=True)
class Item:
    """One catalogue item as a connector maps it; `raw` is the upstream JSON object."""

    external_id: str
    raw: dict[str, Any]
    name: str | None = None
    sku: str | None = None
    ean: str | None = None
    price: Decimal | None = None
    currency: str | None = None
    stock: int | None = None
    status: str | None = None
    url: str | None = None


@dataclass
class UpsertCounts:
    created: int = 0
    updated: int = 0
    unchanged: int = 0


def to_decimal(value: Any) -> Decimal | None:
    """Prices arrive as numbers or strings ("123.4500"); None when absent or unreadable."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        number = Decimal(value if isinstance(value, str | int) else str(value))
    except InvalidOperation:
        try:
            number = Decimal(str(value).strip().replace(",", "."))
        except InvalidOperation:
            raise ValueError(f"price {value!r} is not a number") from None
    if not number.is_finite() or abs(number) >= MAX_PRICE:
        raise ValueError(f"price {value!r} is out of range")
    return number


def to_count(value: Any) -> int | None:
    """A stock count that fits the column; ValueError otherwise."""
    if value is None or value == "":
        return None
    count = int(value)
    if not -(2**31) < count < 2**31:
        raise ValueError(f"stock {value!r} is out of range")
    return count


def text(value: Any) -> str | None:
    """Optional text field: None for missing or empty, else its string form."""
    return None if value is None or value == "" else str(value)


async def _ensure_stage(conn: Connection) -> None:
    # Temp tables live per connection; ON COMMIT DELETE ROWS empties it after each batch.
    await conn.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} ("
        " external_id text, name text, sku text, ean text, price numeric, currency text,"
        " stock integer, status text, url text, raw text, hash bytea) ON COMMIT DELETE ROWS"
    )


async def upsert(
    conn: Connection, *, source: str, account: str, items: Sequence[Item]
) -> UpsertCounts:
    """Merge a batch (inside the caller's transaction); counts created/updated/unchanged."""
    latest: dict[str, Item] = {item.external_id: item for item in items}
    if not latest:
        return UpsertCounts()
    records = []
    for item in latest.values():
        raw = orjson.dumps(item.raw, option=orjson.OPT_SORT_KEYS)
        records.append(
            (
                item.external_id,
                item.name,
                item.sku,
                item.ean,
                item.price,
                item.currency,
                item.stock,
                item.status,
                item.url,
                raw.decode(),
                hashlib.blake2b(raw, digest_size=16).digest(),
            )
        )
    await _ensure_stage(conn)
    await conn.execute(f"TRUNCATE {_STAGE}")  # a second batch in the same transaction
    await conn.copy_records_to_table(_STAGE, records=records, columns=_STAGE_COLUMNS)
    # Counted in the database: one row back per batch, not one per changed item.
    row = await conn.fetchrow(
        "WITH merged AS (INSERT INTO products AS p (source, account, external_id, name, sku,"
        " ean, price, currency, stock, status, url, raw, hash)"
        " SELECT $1, $2, external_id, name, sku, ean, price, currency, stock, status, url,"
        f" raw::jsonb, hash FROM {_STAGE}"
        " ON CONFLICT (source, account, external_id) DO UPDATE SET"
        " name = EXCLUDED.name, sku = EXCLUDED.sku, ean = EXCLUDED.ean,"
        " price = EXCLUDED.price, currency = EXCLUDED.currency, stock = EXCLUDED.stock,"
        " status = EXCLUDED.status, url = EXCLUDED.url, raw = EXCLUDED.raw,"
        " hash = EXCLUDED.hash, last_seen = now(), gone_at = NULL"
        " WHERE p.hash <> EXCLUDED.hash OR p.gone_at IS NOT NULL"
        " RETURNING (xmax = 0) AS created)"
        " SELECT count(*) FILTER (WHERE created) AS created, count(*) AS written FROM merged",
        source,
        account,
    )
    created, written = int(row["created"]), int(row["written"])
    return UpsertCounts(created=created, updated=written - created, unchanged=len(latest) - written)


async def record_seen(conn: Connection, *, run_id: int, external_ids: Iterable[str]) -> None:
    """Remember which ids this pass saw (only needed when it will mark the rest gone)."""
    await conn.copy_records_to_table(
        "sync_seen",
        records=[(run_id, eid) for eid in external_ids],
        columns=("run_id", "external_id"),
    )


async def mark_gone(conn: Connection, *, source: str, account: str, run_ids: list[int]) -> int:
    """After a complete pass: items of (source, account) no run of the pass saw are gone."""
    result: str = await conn.execute(
        "UPDATE products p SET gone_at = now()"
        " WHERE p.source = $1 AND p.account = $2 AND p.gone_at IS NULL AND NOT EXISTS ("
        "   SELECT 1 FROM sync_seen s"
        "   WHERE s.run_id = ANY($3::bigint[]) AND s.external_id = p.external_id)",
        source,
        account,
        run_ids,
    )
    await conn.execute("DELETE FROM sync_seen WHERE run_id = ANY($1::bigint[])", run_ids)
    return int(result.split()[-1])


async def run_chain(conn: Connection, run_id: int) -> list[int]:
    """This run and the runs it resumed, newest first."""
    rows = await conn.fetch(
        "WITH RECURSIVE chain(id, resumed_from) AS ("
        "  SELECT id, resumed_from FROM runs WHERE id = $1"
        "  UNION ALL SELECT r.id, r.resumed_from FROM runs r JOIN chain c ON r.id = c.resumed_from"
        ") SELECT id FROM chain",
        run_id,
    )
    return [int(r["id"]) for r in rows]


async def search(
    pool: Pool,
    *,
    source: str | None = None,
    account: str | None = None,
    text: str | None = None,
    include_gone: bool = True,
    limit: int = 50,
    offset: int = 0,
) -> tuple[int, list[dict[str, Any]]]:
    """Products matching the filters (text matches name, sku, ean or id): (total, page)."""
    where = (
        " WHERE ($1::text IS NULL OR source = $1) AND ($2::text IS NULL OR account = $2)"
        " AND ($3::text IS NULL OR name ILIKE '%' || $3 || '%' OR sku ILIKE '%' || $3 || '%'"
        "      OR ean = $3 OR external_id = $3)"
        " AND ($4 OR gone_at IS NULL)"
    )
    args = (source, account, text, include_gone)
    total: int = await pool.fetchval(f"SELECT count(*) FROM products{where}", *args)
    rows = await pool.fetch(
        f"SELECT {PUBLIC_COLUMNS} FROM products{where}"
        " ORDER BY source, account, external_id LIMIT $5 OFFSET $6",
        *args,
        limit,
        offset,
    )
    return total, [dict(r) for r in rows]
