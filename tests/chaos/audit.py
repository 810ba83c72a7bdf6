"""The fence audit check: no term wrote anything after a newer term began.

`write_audit` (migration 0014) has one row per (transaction, table) that changed rows,
with the token `db.fenced` set for the transaction and the time of its last statement
on the table (`at`, the database's clock). `leader_terms.started_at` is when each term
took the fence row (the clock inside the raise, after it got the row lock). A fenced
transaction of term T reads the fence FOR SHARE, so it commits before term T+1's raise
gets the row, or it is refused: every audited write of T comes before the start of
every newer term. The check looks for the opposite, and for writes under a token that
never started a term, or before its own term started.

Writes with token NULL (the API queueing a run, an operator's pause) are not leader
writes and are not checked.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime

import asyncpg

# Each audited write of a leader, with the first term newer than its token (if any).
_STALE = """
SELECT a.id, a.tbl, a.token, a.txid, a.first_at, a.at,
       own.started_at AS own_start, next.token AS newer, next.started_at AS newer_start
FROM write_audit a
LEFT JOIN leader_terms own ON own.token = a.token
LEFT JOIN LATERAL (
    SELECT t.token, t.started_at FROM leader_terms t
    WHERE t.token > a.token ORDER BY t.started_at LIMIT 1
) next ON true
WHERE a.token IS NOT NULL
  AND (own.token IS NULL OR a.first_at < own.started_at OR a.at >= next.started_at)
ORDER BY a.id
"""


@dataclass(frozen=True)
class StaleWrite:
    """An audited write the fence should have made impossible."""

    tbl: str
    token: int
    txid: int
    at: datetime
    why: str

    def __str__(self) -> str:
        return (
            f"{self.tbl} written by token {self.token} (txid {self.txid}) at {self.at}: {self.why}"
        )


async def stale_writes(conn: asyncpg.Connection | asyncpg.Pool) -> list[StaleWrite]:
    """Every audited leader write that breaks the fence's promise (empty when it held)."""
    found = []
    for r in await conn.fetch(_STALE):
        if r["own_start"] is None:
            why = "no term with this token ever started"
        elif r["first_at"] < r["own_start"]:
            why = f"before its own term started ({r['own_start']})"
        else:
            lag = (r["at"] - r["newer_start"]).total_seconds()
            why = f"{lag:.3f}s after term {r['newer']} started ({r['newer_start']})"
        found.append(StaleWrite(r["tbl"], r["token"], r["txid"], r["at"], why))
    return found


async def assert_fence_held(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    """Fail listing the stale writes, if any; returns how many leader writes were checked."""
    stale = await stale_writes(conn)
    assert not stale, "writes landed after a newer term began:\n" + "\n".join(map(str, stale))
    checked: int = await conn.fetchval("SELECT count(*) FROM write_audit WHERE token IS NOT NULL")
    return checked


async def longest_silence(
    conn: asyncpg.Connection | asyncpg.Pool, *, since: datetime, until: datetime
) -> tuple[float, datetime | None]:
    """The longest time between two consecutive leader writes (any term) in the window,
    the window's ends included, and when that silence began. With a job due every
    second, a working leader writes at least once a second: this is the time the
    cluster went without a working leader, measured on the database's clock."""
    rows = await conn.fetch(
        "SELECT at FROM ("
        "  SELECT at FROM write_audit WHERE token IS NOT NULL AND at > $1 AND at < $2"
        "  UNION ALL SELECT $1 UNION ALL SELECT $2) w ORDER BY at",
        since,
        until,
    )
    best, began = 0.0, None
    for before, after in itertools.pairwise(rows):
        gap = (after["at"] - before["at"]).total_seconds()
        if gap > best:
            best, began = gap, before["at"]
    return best, began
