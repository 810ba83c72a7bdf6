"""Pausing a job's schedule (issue 10): by an operator, or by the leader after
`pause_after_failures` failed runs in a row. The state lives in `job_state`, so every
replica and every later leader sees it. Slots that come due while a job is paused are
not owed: planning picks up at `resumed_at`.
"""

from __future__ import annotations

from typing import Any

from .db import Connection, Pool

_STATE = "job, paused_at, paused_by, pause_note, resumed_at, last_paused_at, failure_streak"


async def pause(pool: Pool | Connection, job: str, *, by: str, note: str) -> dict[str, Any]:
    """Pause `job` (a no-op on a paused job, which keeps who paused it and why)."""
    # A job never planned yet gets its row here (its `since` is now, as on first sight).
    row = await pool.fetchrow(
        "INSERT INTO job_state AS s (job, paused_at, paused_by, pause_note)"
        " VALUES ($1, now(), $2, $3) ON CONFLICT (job) DO UPDATE SET"
        " paused_by = CASE WHEN s.paused_at IS NULL THEN $2 ELSE s.paused_by END,"
        " pause_note = CASE WHEN s.paused_at IS NULL THEN $3 ELSE s.pause_note END,"
        " paused_at = coalesce(s.paused_at, now())"
        f" RETURNING {_STATE}",
        job,
        by,
        note,
    )
    return dict(row)


async def resume(pool: Pool, job: str) -> dict[str, Any]:
    """Resume `job`: slots from now on are planned; the ones of the pause are not owed."""
    await pool.execute("INSERT INTO job_state (job) VALUES ($1) ON CONFLICT DO NOTHING", job)
    row = await pool.fetchrow(
        "UPDATE job_state SET last_paused_at = coalesce(paused_at, last_paused_at),"
        " resumed_at = CASE WHEN paused_at IS NULL THEN resumed_at ELSE now() END,"
        " paused_at = NULL, failure_streak = 0"
        f" WHERE job = $1 RETURNING {_STATE}",
        job,
    )
    return dict(row)


async def paused_jobs(conn: Connection) -> set[str]:
    rows = await conn.fetch("SELECT job FROM job_state WHERE paused_at IS NOT NULL")
    return {r["job"] for r in rows}


async def states(pool: Pool) -> dict[str, dict[str, Any]]:
    """Every job's pause state and failure streak, for /jobs and the status page."""
    rows = await pool.fetch(f"SELECT {_STATE} FROM job_state")
    return {r["job"]: dict(r) for r in rows}


async def record_outcome(
    conn: Connection, job: str, *, status: str, error: str | None, pause_after: int | None
) -> bool:
    """Count a failed run (a success resets the count); pause the job when the streak
    reaches `pause_after`. True when this outcome paused it."""
    if status not in ("failed", "succeeded"):
        return False
    row = await conn.fetchrow(
        "INSERT INTO job_state AS s (job, failure_streak)"
        " VALUES ($1, CASE WHEN $2::boolean THEN 1 ELSE 0 END)"
        " ON CONFLICT (job) DO UPDATE SET failure_streak ="
        "   CASE WHEN $2::boolean THEN s.failure_streak + 1 ELSE 0 END"
        " RETURNING failure_streak, paused_at",
        job,
        status == "failed",
    )
    if pause_after is None or row["failure_streak"] < pause_after or row["paused_at"]:
        return False
    await pause(
        conn,
        job,
        by="leader",
        note=f"paused after {row['failure_streak']} failed runs in a row; last error: {error}",
    )
    return True
