"""Results a consumer reads later (seed 001's parsed events): saved in batches as a run
produces them, read back by operation, cleaned up once processed.

An operation is the first run of a resume chain: a resumed run keeps adding to the
same list, continuing its numbering, so a crash never loses a finished batch and never
stores one twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .catalog import strip_nul
from .db import Connection, Pool

BATCH_SIZE = 10  # the seed saves events ten at a time, with progress after each batch


async def operation_of(conn: Connection, run_id: int) -> int:
    """The operation a run belongs to: the first run of its resume chain."""
    root: int = await conn.fetchval(
        "WITH RECURSIVE chain(id, resumed_from) AS ("
        "  SELECT id, resumed_from FROM runs WHERE id = $1"
        "  UNION ALL SELECT r.id, r.resumed_from FROM runs r JOIN chain c ON r.id = c.resumed_from"
        ") SELECT min(id) FROM chain",
        run_id,
    )
    return root


async def saved(conn: Connection, operation_id: int) -> tuple[int, int]:
    """(items, batches) already saved for the operation: where a resume goes on."""
    row = await conn.fetchrow(
        "SELECT count(*) AS items, coalesce(max(batch), 0) AS batches FROM run_items"
        " WHERE operation_id = $1",
        operation_id,
    )
    return int(row["items"]), int(row["batches"])


async def save_batch(
    conn: Connection, operation_id: int, *, batch: int, first_seq: int, items: Sequence[Any]
) -> None:
    """Store one batch (inside the caller's fenced transaction, with its progress)."""
    await conn.executemany(
        "INSERT INTO run_items (operation_id, seq, batch, item) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (operation_id, seq) DO NOTHING",
        [(operation_id, first_seq + i, batch, strip_nul(item)) for i, item in enumerate(items)],
    )


async def read(pool: Pool, operation_id: int) -> list[Any]:
    """Every item of the operation, in the order they were produced."""
    rows = await pool.fetch(
        "SELECT item FROM run_items WHERE operation_id = $1 ORDER BY seq", operation_id
    )
    return [r["item"] for r in rows]


async def delete_processed(pool: Pool, *, older_than_days: float) -> int:
    """Delete the items of processed operations created more than `older_than_days` ago;
    an operation nobody has read yet keeps its items, however old."""
    result: str = await pool.execute(
        "DELETE FROM run_items i USING runs r WHERE r.id = i.operation_id"
        " AND r.processed_at IS NOT NULL"
        " AND r.created_at < now() - make_interval(secs => $1)",
        older_than_days * 86400.0,
    )
    return int(result.split()[-1])
