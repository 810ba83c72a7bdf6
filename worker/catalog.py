"""The catalogue store: set-based batch upsert of synced items, gone-marking, queries.

One batch is COPYed into a per-connection staging table and merged with a single
`INSERT … ON CONFLICT … WHERE hash differs` (`worker.merge`, shared with seed 001's
events): rows whose content hash is unchanged are not rewritten at all, and the
database, not a per-row round trip, sets the pace. A large batch goes in a few parts,
and is encoded in a thread: the event loop that runs the sync also answers the probes.

One bad item never costs the batch: NUL characters (which Postgres refuses in text
and in jsonb) are removed before the merge, and an item the database still refuses
is found by bisecting the batch under savepoints and reported, while the rest commits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from . import merge
from .db import Connection, Pool, like_literal
from .looplag import drop, off_loop

MAX_PRICE = Decimal(10) ** 10  # numeric(14, 4)
# The catalogue as a batch-merge target: `source` and `account` are the same for a
# whole batch ($1, $2); `$3` is `want_details` (see `upsert`).
PRODUCTS = merge.Target(
    table="products",
    alias="p",
    key=("source", "account", "external_id"),
    constants=("source", "account"),
    staged=(
        ("external_id", "text"),
        ("name", "text"),
        ("sku", "text"),
        ("ean", "text"),
        ("price", "text"),  # numeric's binary encoding costs asyncpg twice as much
        ("currency", "text"),
        ("stock", "integer"),
        ("status", "text"),
        ("url", "text"),
        ("raw", "text"),
        ("hash", "bytea"),
    ),
    casts={"raw": "jsonb", "price": "numeric"},
    computed={"details_pending": "$3"},
    updates={
        "ean": "CASE WHEN $3 THEN coalesce(EXCLUDED.ean, p.ean) ELSE EXCLUDED.ean END",
        "details_pending": "p.details_pending OR $3",
    },
    also_set={"last_seen": "now()", "gone_at": "NULL", "missed_passes": "0"},
    rewrite_when="p.gone_at IS NOT NULL",
    label=("external_id",),
)
PUBLIC_COLUMNS = (
    "source, account, external_id, name, sku, ean, mpn, brand, price, currency, stock,"
    " status, url, first_seen, last_seen, gone_at, details, details_at, details_pending"
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


@dataclass(frozen=True)
class Details:
    """What an item's own page says that its summary in a list does not.

    `aspects` are the item specifics (name -> values); `compatibility` the parts
    compatibility rows where the vendor gives them (None when it does not).
    """

    external_id: str
    ean: str | None = None
    mpn: str | None = None
    brand: str | None = None
    aspects: dict[str, list[str]] = field(default_factory=dict)
    compatibility: list[dict[str, Any]] | None = None
    raw: dict[str, Any] = field(default_factory=dict)


# The shared mechanism's names, as this module has always offered them.
UpsertCounts = merge.Counts
REFUSED = merge.REFUSED
Record = merge.Record
strip_nul = merge.strip_nul
_TEXT_FIELDS = ("external_id", "name", "sku", "ean", "currency", "status", "url")


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


def clean(item: Item) -> tuple[Item, bool]:
    """The item with NUL characters removed from its text fields; True if any were.

    `raw` is cleaned where it is serialised (see `_record`), where the check is free.
    """
    dirty: dict[str, Any] = {
        name: value.replace(merge.NUL, "")
        for name in _TEXT_FIELDS
        if isinstance(value := getattr(item, name), str) and merge.NUL in value
    }
    return (replace(item, **dirty), True) if dirty else (item, False)


def _record(item: Item) -> tuple[Record, bool]:
    """The staging row of a clean item, with the hash of exactly the raw JSON stored."""
    raw, digest, cleaned = merge.encode_json(item.raw)
    row = (
        item.external_id,
        item.name,
        item.sku,
        item.ean,
        None if item.price is None else str(item.price),  # exact: Decimal's str round-trips
        item.currency,
        item.stock,
        item.status,
        item.url,
        raw,
        digest,
    )
    return row, cleaned


async def upsert(
    conn: Connection,
    *,
    source: str,
    account: str,
    items: Sequence[Item],
    seen_by: int | None = None,
    want_details: bool = False,
) -> UpsertCounts:
    """Merge a batch inside the caller's transaction; counts created/updated/unchanged.

    NUL characters are removed first. An item the database still refuses is left out
    and reported in `failed` with the database's reason; the others are stored. With
    `seen_by`, the ids of the batch (refused items included: they are still listed
    upstream) are recorded as seen by that run, for `mark_gone`. With `want_details`,
    every row created or changed is flagged `details_pending`, and a summary that
    lacks the EAN does not erase the one its details brought.
    """
    counts = UpsertCounts()
    # Encoding a batch is the sync's longest CPU-bound work: done in a thread, so the
    # probes served by the event loop do not wait for it.
    records, ids = await off_loop(len(items), _records, items, counts)
    if records:
        counts.add(await merge.upsert(conn, PRODUCTS, records, source, account, want_details))
    if seen_by is not None and ids:
        await record_seen(conn, run_id=seen_by, external_ids=ids)
    await drop(records, ids)
    return counts


def _records(items: Sequence[Item], counts: UpsertCounts) -> tuple[list[Record], list[str]]:
    """The staging rows of a batch (an id twice: the later copy wins) and its distinct
    ids; items whose raw JSON cannot be stored go to `counts.failed`, cleaned ones are
    counted in `counts.cleaned`. Pure CPU work, run off the loop (`upsert`)."""
    latest: dict[str, tuple[Item, bool]] = {}
    for item in items:
        item, dirty = clean(item)
        latest[item.external_id] = item, dirty
    records: list[Record] = []
    for item, dirty in latest.values():
        try:
            row, raw_dirty = _record(item)
        except orjson.JSONEncodeError as exc:  # e.g. an integer beyond 64 bits
            counts.failed.append((item.external_id, f"raw item is not storable JSON: {exc}"))
            continue
        records.append(row)
        counts.cleaned += dirty or raw_dirty
    return records, list(latest)


async def pending_details(
    conn: Connection, *, source: str, account: str, limit: int
) -> tuple[list[str], int]:
    """Up to `limit` ids whose details are still to be fetched, and how many there are:
    those created or changed since their details were fetched, and those never fetched
    (a catalogue synced before `details` was turned on)."""
    where = (
        "source = $1 AND account = $2 AND (details_pending OR details_at IS NULL)"
        " AND gone_at IS NULL"
    )
    total: int = await conn.fetchval(
        f"SELECT count(*) FROM products WHERE {where}", source, account
    )
    rows = await conn.fetch(
        f"SELECT external_id FROM products WHERE {where} ORDER BY last_seen DESC, external_id"
        " LIMIT $3",
        source,
        account,
        limit,
    )
    return [r["external_id"] for r in rows], total


async def store_details(
    conn: Connection, *, source: str, account: str, details: Sequence[Details]
) -> None:
    """Store fetched details beside the summary's fields; the item is no longer pending."""
    await conn.executemany(
        "UPDATE products SET ean = coalesce($4, ean), mpn = $5, brand = $6,"
        " details = $7::jsonb, details_at = now(), details_pending = false"
        " WHERE source = $1 AND account = $2 AND external_id = $3",
        [
            (
                source,
                account,
                d.external_id,
                strip_nul(d.ean),
                strip_nul(d.mpn),
                strip_nul(d.brand),
                strip_nul({"aspects": d.aspects, "compatibility": d.compatibility, "raw": d.raw}),
            )
            for d in details
        ],
    )


async def drop_pending(conn: Connection, *, source: str, account: str, ids: Sequence[str]) -> None:
    """Stop asking for these items' details (the vendor says they no longer exist)."""
    await conn.execute(
        "UPDATE products SET details_pending = false, details_at = now(),"
        " details = '{\"ended\": true}'::jsonb"
        " WHERE source = $1 AND account = $2 AND external_id = ANY($3::text[])",
        source,
        account,
        list(ids),
    )


async def record_seen(conn: Connection, *, run_id: int, external_ids: Iterable[str]) -> None:
    """Remember which ids this pass saw (only needed when it will mark the rest gone)."""
    await conn.copy_records_to_table(
        "sync_seen",
        records=[(run_id, eid) for eid in external_ids],
        columns=("run_id", "external_id"),
    )


@dataclass(frozen=True)
class GoneCheck:
    """What the end of a complete pass decided about the items it did not see."""

    live_before: int  # items of (source, account) not gone when the pass ended
    seen: int  # distinct items the pass (all runs of its chain) listed
    missing: int  # live items it did not list: one more missed pass each
    gone: int  # of those, the ones now missing from `gone_after` passes: marked gone
    guarded: bool  # the pass saw too few items to judge: nothing was counted

    def as_stats(self, *, gone_after: int, guard: float) -> dict[str, Any]:
        return {
            "live_before": self.live_before,
            "seen": self.seen,
            "missing": self.missing,
            "gone": self.gone,
            "gone_after": gone_after,
            "gone_guard": guard,
            "guarded": self.guarded,
        }


async def mark_gone(
    conn: Connection,
    *,
    source: str,
    account: str,
    run_ids: list[int],
    gone_after: int = 1,
    guard: float = 0.0,
) -> GoneCheck:
    """After a complete pass: count a missed pass for each live item of (source,
    account) that no run of the pass saw, and mark gone those missed `gone_after`
    passes in a row; an item seen again starts from zero.

    A pass that listed fewer than `guard` times the items live before it decides nothing
    (a vendor answering a truncated list must not wipe the catalogue).
    """
    live_before: int = await conn.fetchval(
        "SELECT count(*) FROM products WHERE source = $1 AND account = $2 AND gone_at IS NULL",
        source,
        account,
    )
    seen: int = await conn.fetchval(
        "SELECT count(DISTINCT external_id) FROM sync_seen WHERE run_id = ANY($1::bigint[])",
        run_ids,
    )
    if live_before and seen < guard * live_before:
        await conn.execute("DELETE FROM sync_seen WHERE run_id = ANY($1::bigint[])", run_ids)
        return GoneCheck(live_before, seen, missing=0, gone=0, guarded=True)
    seen_here = (
        "EXISTS (SELECT 1 FROM sync_seen s"
        " WHERE s.run_id = ANY($3::bigint[]) AND s.external_id = p.external_id)"
    )
    await conn.execute(
        "UPDATE products p SET missed_passes = 0"
        f" WHERE p.source = $1 AND p.account = $2 AND p.missed_passes > 0 AND {seen_here}",
        source,
        account,
        run_ids,
    )
    row = await conn.fetchrow(
        "WITH missed AS (UPDATE products p SET missed_passes = p.missed_passes + 1,"
        " gone_at = CASE WHEN p.missed_passes + 1 >= $4 THEN now() END"
        f" WHERE p.source = $1 AND p.account = $2 AND p.gone_at IS NULL AND NOT {seen_here}"
        " RETURNING gone_at IS NOT NULL AS gone)"
        " SELECT count(*) AS missing, count(*) FILTER (WHERE gone) AS gone FROM missed",
        source,
        account,
        run_ids,
        gone_after,
    )
    await conn.execute("DELETE FROM sync_seen WHERE run_id = ANY($1::bigint[])", run_ids)
    return GoneCheck(live_before, seen, int(row["missing"]), int(row["gone"]), guarded=False)


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
    """Products matching the filters: (total, page).

    `text` is literal (% and _ match themselves): a substring of the name or sku, or
    the exact ean or id.
    """
    where = (
        " WHERE ($1::text IS NULL OR source = $1) AND ($2::text IS NULL OR account = $2)"
        " AND ($3::text IS NULL OR name ILIKE '%' || $5 || '%' OR sku ILIKE '%' || $5 || '%'"
        "      OR ean = $3 OR external_id = $3)"
        " AND ($4 OR gone_at IS NULL)"
    )
    literal = like_literal(text)
    args = (source, account, text, include_gone, literal)
    total: int = await pool.fetchval(f"SELECT count(*) FROM products{where}", *args)
    rows = await pool.fetch(
        f"SELECT {PUBLIC_COLUMNS} FROM products{where}"
        " ORDER BY source, account, external_id LIMIT $6 OFFSET $7",
        *args,
        limit,
        offset,
    )
    return total, [dict(r) for r in rows]
