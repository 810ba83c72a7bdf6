"""The run store: every SQL statement about runs, in one place.

Leader writes take a connection from `db.fenced()`; the few writes any replica may
make (enqueueing a manual run) and all reads take the pool.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson

from .config import JobSpec
from .db import NOTIFY_CHANNEL, Connection, Pool, jsonable
from .logs import redact

ACTIVE = ("queued", "running")
# Hand-offs one resume chain may have before a hand-off counts as a failed attempt.
MAX_HANDOFFS = 30


FINAL = ("succeeded", "failed", "cancelled", "abandoned", "missed", "superseded", "skipped")
STATUSES = ACTIVE + FINAL

_COLUMNS = (
    "id, job, kind, slot, trigger, status, token, attempt, params, cursor, progress, stats,"
    " result, error, resumed_from, requested_by, worker_id, heartbeat_at, created_at,"
    " started_at, finished_at, cancel_requested_at, handed_off, handoffs, given_up_at"
)


def _free(cap: str) -> str:
    """SQL: run `r` was handed off and its chain is still under the hand-off cap `cap`
    (a query parameter), so resuming it does not spend an attempt."""
    return f"(r.handed_off AND r.handoffs < {cap})"


async def plan_from(
    conn: Connection, jobs: Sequence[tuple[str, str | None]]
) -> dict[str, datetime]:
    """Where planning of each (job, schedule) starts, in one statement: the newest of
    - when the scheduler first saw the job (recorded now if never), or later when its
      schedule changed or it came back after a reload removed it (`schedule` is the
      cron expression and timezone the leader plans with; a row that knows none yet,
      written before schedules were recorded, adopts it as is);
    - its newest slot the scheduler decided (backfilled slots are an operator's: they
      must not hide slots owed from an outage before them);
    - when it was last resumed (a pause's slots are not owed)."""
    rows = await conn.fetch(
        """
        WITH seen AS (
            INSERT INTO job_state AS s (job, schedule)
            SELECT j.job, j.schedule FROM unnest($1::text[], $2::text[]) AS j(job, schedule)
            ORDER BY j.job
            ON CONFLICT (job) DO UPDATE SET
                schedule_since = CASE
                    WHEN s.removed_at IS NOT NULL
                      OR (s.schedule IS NOT NULL
                          AND s.schedule IS DISTINCT FROM EXCLUDED.schedule)
                    THEN now() ELSE s.schedule_since END,
                schedule = EXCLUDED.schedule,
                removed_at = NULL
            RETURNING s.job, greatest(s.since, s.schedule_since) AS since, s.resumed_at
        )
        SELECT seen.job, greatest(seen.since, seen.resumed_at, (
            SELECT max(r.slot) FROM runs r WHERE r.job = seen.job AND r.trigger <> 'backfill'
        )) AS start FROM seen
        """,
        [job for job, _ in jobs],
        [schedule for _, schedule in jobs],
    )
    return {r["job"]: r["start"] for r in rows}


async def mark_removed(conn: Connection, jobs: Sequence[str]) -> None:
    """A reload took `jobs` out of the jobs file: should one come back, it starts from then."""
    await conn.execute(
        "UPDATE job_state SET removed_at = now()"
        " WHERE job = ANY($1::text[]) AND removed_at IS NULL",
        list(jobs),
    )


async def claim_slots(
    conn: Connection,
    claims: Sequence[tuple[str, str, datetime, Mapping[str, Any]]],
    *,
    token: int,
    worker_id: str,
) -> list[dict[str, Any]]:
    """Insert the running row of each (job, kind, slot, params), in one statement and in
    their order; returns the rows inserted (a slot that already has a row is skipped:
    claimed once, whoever asks)."""
    rows = await conn.fetch(
        "INSERT INTO runs (job, kind, slot, trigger, status, token, params, worker_id,"
        " started_at, heartbeat_at)"
        " SELECT c.job, c.kind, c.slot, 'schedule', 'running', $5, c.params::jsonb, $6,"
        " now(), now()"
        " FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[])"
        " WITH ORDINALITY AS c(job, kind, slot, params, n) ORDER BY c.n"
        f" ON CONFLICT (job, slot) DO NOTHING RETURNING {_COLUMNS}",
        [c[0] for c in claims],
        [c[1] for c in claims],
        [c[2] for c in claims],
        [orjson.dumps(dict(c[3])).decode() for c in claims],
        token,
        worker_id,
    )
    return [dict(r) for r in rows]


async def record_missed_many(
    conn: Connection, missed: Sequence[tuple[str, str, datetime, str]]
) -> Counter[str]:
    """Store each skipped (job, kind, slot, reason) as a `missed` row, in one statement;
    returns how many new rows each job got."""
    rows = await conn.fetch(
        "INSERT INTO runs (job, kind, slot, trigger, status, error, finished_at)"
        " SELECT m.job, m.kind, m.slot, 'schedule', 'missed', m.reason, now()"
        " FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[])"
        " WITH ORDINALITY AS m(job, kind, slot, reason, n) ORDER BY m.n"
        " ON CONFLICT (job, slot) DO NOTHING RETURNING job",
        [m[0] for m in missed],
        [m[1] for m in missed],
        [m[2] for m in missed],
        [m[3] for m in missed],
    )
    return Counter(r["job"] for r in rows)


async def enqueue(
    pool: Pool,
    *,
    job: str,
    kind: str,
    params: Mapping[str, Any],
    trigger: str = "manual",
    requested_by: str = "",
    resumed_from: int | None = None,
    cursor: Any = None,
    attempt: int = 1,
) -> int:
    """Queue a run for the leader to pick up (any replica may call this)."""
    async with pool.acquire() as conn, conn.transaction():
        run_id: int = await conn.fetchval(
            "INSERT INTO runs (job, kind, trigger, status, params, requested_by, resumed_from,"
            " cursor, attempt) VALUES ($1, $2, $3, 'queued', $4, $5, $6, $7, $8) RETURNING id",
            job,
            kind,
            trigger,
            dict(params),
            requested_by,
            resumed_from,
            cursor,
            attempt,
        )
        await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, str(run_id))
    return run_id


async def start_queued(
    conn: Connection, *, token: int, worker_id: str, forbid: Iterable[str]
) -> dict[str, Any] | None:
    """Take the oldest queued run that may start and mark it running.

    A run of a job in `forbid` (overlap = forbid) may start only when the ledger holds
    no running run of that job, whatever term started it: after a failover the old
    term's run is still `running` until it is reaped, and nothing may overlap it.
    """
    row = await conn.fetchrow(
        "UPDATE runs SET status = 'running', token = $1, worker_id = $2, started_at = now(),"
        " heartbeat_at = now() WHERE id = ("
        "   SELECT q.id FROM runs q WHERE q.status = 'queued' AND NOT ("
        "     q.job = ANY($3::text[]) AND EXISTS ("
        "       SELECT 1 FROM runs o WHERE o.job = q.job AND o.status = 'running'))"
        "   ORDER BY q.id LIMIT 1 FOR UPDATE SKIP LOCKED)"
        f" RETURNING {_COLUMNS}",
        token,
        worker_id,
        list(forbid),
    )
    return dict(row) if row else None


async def active_runs(conn: Connection) -> tuple[set[str], dict[str, list[int]]]:
    """From the ledger, whatever term started them: the jobs with a queued or running
    run, and the running runs of each job (oldest first). One query a tick."""
    rows = await conn.fetch(
        "SELECT job, id, status FROM runs WHERE status IN ('queued', 'running') ORDER BY id"
    )
    running: dict[str, list[int]] = {}
    for r in rows:
        if r["status"] == "running":
            running.setdefault(r["job"], []).append(int(r["id"]))
    return {r["job"] for r in rows}, running


async def record_skipped(
    conn: Connection, *, job: str, kind: str, slots: Iterable[datetime], reason: str
) -> int:
    """Store slots not run because a run of the job was going (overlap = skip, or a
    second slot under buffer_one); returns how many were new."""
    result: str = await conn.execute(
        "INSERT INTO runs (job, kind, slot, trigger, status, error, finished_at)"
        " SELECT $1, $2, s, 'schedule', 'skipped', $4, now() FROM unnest($3::timestamptz[]) s"
        " ON CONFLICT (job, slot) DO NOTHING",
        job,
        kind,
        list(slots),
        reason,
    )
    return int(result.split()[-1])


async def queue_slot(
    conn: Connection, *, job: str, kind: str, slot: datetime, params: Mapping[str, Any]
) -> int | None:
    """Claim a slot as a queued run, to start when the job's running run ends
    (buffer_one, cancel_other); None if the slot already has a row."""
    run_id: int | None = await conn.fetchval(
        "INSERT INTO runs (job, kind, slot, trigger, status, params)"
        " VALUES ($1, $2, $3, 'schedule', 'queued', $4)"
        " ON CONFLICT (job, slot) DO NOTHING RETURNING id",
        job,
        kind,
        slot,
        dict(params),
    )
    if run_id is not None:
        await conn.execute("SELECT pg_notify($1, 'slot')", NOTIFY_CHANNEL)
    return run_id


async def buffered_slot(conn: Connection, job: str) -> int | None:
    """The id of the job's slot waiting in the queue, if any (buffer_one keeps one)."""
    run_id: int | None = await conn.fetchval(
        "SELECT id FROM runs WHERE job = $1 AND status = 'queued' AND slot IS NOT NULL"
        " ORDER BY id LIMIT 1",
        job,
    )
    return run_id


async def supersede_if_overtaken(conn: Connection, run_id: int) -> int | None:
    """Drop a resume whose pass a newer complete pass of its job has overtaken.

    The pass began with the first run of the resume chain; a run of the same job that
    succeeded after that start saw a newer catalogue, so resuming the older pass would
    only fetch old pages again (and could mark gone what the newer pass saw). Returns
    the newer run's id when the resume was recorded as `superseded`.
    """
    newer: int | None = await conn.fetchval(
        "WITH RECURSIVE chain(id, resumed_from) AS ("
        "  SELECT id, resumed_from FROM runs WHERE id = $1"
        "  UNION ALL SELECT r.id, r.resumed_from FROM runs r JOIN chain c ON r.id = c.resumed_from"
        ") SELECT max(s.id) FROM runs s, runs me"
        " WHERE me.id = $1 AND s.job = me.job AND s.status = 'succeeded'"
        " AND s.id > (SELECT min(id) FROM chain) AND NOT s.id IN (SELECT id FROM chain)",
        run_id,
    )
    if newer is None:
        return None
    await conn.execute(
        "UPDATE runs SET status = 'superseded', finished_at = now(),"
        " error = 'superseded by run ' || $2::bigint || ', a newer complete pass'"
        " WHERE id = $1",
        run_id,
        newer,
    )
    return newer


async def set_job_error(conn: Connection, job: str, error: str | None) -> None:
    """Record (or clear, with None) why the scheduler could not plan `job`."""
    await conn.execute(
        "INSERT INTO job_state (job, error, error_at) VALUES ($1, $2,"
        " CASE WHEN $2::text IS NULL THEN NULL ELSE now() END)"
        " ON CONFLICT (job) DO UPDATE SET error = EXCLUDED.error, error_at = EXCLUDED.error_at"
        " WHERE job_state.error IS DISTINCT FROM EXCLUDED.error",
        job,
        error,
    )


async def clear_job_errors(conn: Connection, jobs: Sequence[str]) -> None:
    """`set_job_error(conn, job, None)` for many jobs whose planning works (again)."""
    await conn.execute(
        "UPDATE job_state s SET error = NULL, error_at = NULL FROM unnest($1::text[]) AS j(job)"
        " WHERE s.job = j.job AND s.error IS NOT NULL",
        list(jobs),
    )


async def job_states(pool: Pool) -> dict[str, dict[str, Any]]:
    """Each job's pause state and failure streak (worker.pauses keeps them)."""
    rows = await pool.fetch(
        "SELECT job, paused_at, paused_by, pause_note, resumed_at, last_paused_at,"
        " failure_streak FROM job_state"
    )
    return {r["job"]: dict(r) for r in rows}


def _pause_view(state: Mapping[str, Any]) -> dict[str, Any]:
    """`paused`, who, when and why; the last pause's span; the current failure streak."""
    return {
        "paused": state.get("paused_at") is not None,
        "paused_by": state.get("paused_by") if state.get("paused_at") else None,
        "paused_at": state.get("paused_at"),
        "note": state.get("pause_note") if state.get("paused_at") else None,
        "last_pause": (
            {"from": state["last_paused_at"], "to": state.get("resumed_at")}
            if state.get("last_paused_at")
            else None
        ),
        "failure_streak": state.get("failure_streak", 0),
    }


async def job_errors(pool: Pool) -> dict[str, dict[str, Any]]:
    """Jobs whose planning is failing: {job: {error, error_at}}."""
    rows = await pool.fetch("SELECT job, error, error_at FROM job_state WHERE error IS NOT NULL")
    return {r["job"]: {"error": r["error"], "error_at": r["error_at"]} for r in rows}


async def heartbeat(conn: Connection, run_ids: list[int]) -> None:
    await conn.execute(
        "UPDATE runs SET heartbeat_at = now() WHERE id = ANY($1::bigint[]) AND status = 'running'",
        run_ids,
    )


async def save_progress(
    conn: Connection,
    run_id: int,
    *,
    progress: Mapping[str, Any] | None = None,
    stats: Mapping[str, Any] | None = None,
    cursor: Any = None,
    set_cursor: bool = False,
) -> None:
    """Update progress/stats (merged) and, when `set_cursor`, the checkpoint cursor."""
    await conn.execute(
        "UPDATE runs SET progress = progress || $2, stats = stats || $3,"
        " cursor = CASE WHEN $4 THEN $5::jsonb ELSE cursor END, heartbeat_at = now()"
        " WHERE id = $1",
        run_id,
        dict(progress or {}),
        dict(stats or {}),
        set_cursor,
        cursor,
    )


async def finish(
    conn: Connection,
    run_id: int,
    *,
    status: str,
    error: str | None = None,
    result: Any = None,
    handed_off: bool = False,
) -> bool:
    """Record a run's end; False if it was no longer running (already recorded)."""
    done: str = await conn.execute(
        "UPDATE runs SET status = $2, error = $3, result = $4, handed_off = $5,"
        " finished_at = now() WHERE id = $1 AND status = 'running'",
        run_id,
        status,
        error,
        result,
        handed_off,
    )
    return done.split()[-1] != "0"


async def reap(
    conn: Connection, *, token: int, stale_after: float, live: list[int]
) -> list[dict[str, Any]]:
    """Runs left `running` with no one to finish them, and a stale heartbeat: abandoned.

    That is a run of an older leader, or one of ours that is no longer executing
    (its final status could not be written). The fence already stops a stale leader's
    writes; waiting for the heartbeat to go stale also gives a frozen (not dead) old
    leader time to notice and stop calling upstream.
    """
    rows = await conn.fetch(
        "UPDATE runs SET status = 'abandoned', finished_at = now(),"
        " error = coalesce(error, CASE WHEN token < $1"
        "   THEN 'its leader (token ' || token || ') went away'"
        "   ELSE 'it ended but its final status could not be recorded' END)"
        " WHERE status = 'running' AND (token < $1 OR NOT (id = ANY($3::bigint[])))"
        " AND coalesce(heartbeat_at, started_at, created_at) < now() - make_interval(secs => $2)"
        f" RETURNING {_COLUMNS}",
        token,
        stale_after,
        live,
    )
    return [dict(r) for r in rows]


async def silent_running(
    conn: Connection,
    *,
    silent_for: float,
    running_for: float = 0.0,
    token: int | None = None,
    only: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Runs `running` for more than `running_for` seconds whose heartbeat is older than
    `silent_for` seconds, with both ages in seconds, on the database's clock; `token`
    and `only` narrow them to one term and to those ids.

    They stay locked until the caller's transaction ends, so whatever the caller then
    records cannot interleave with a heartbeat or with their leader recording their
    end. A run locked right now (being heartbeated or ended) is skipped, not waited for:
    someone is looking after it.
    """
    rows = await conn.fetch(
        "SELECT id, job, kind, token, worker_id,"
        " extract(epoch FROM now() - coalesce(started_at, created_at))::float8 AS running_s,"
        " extract(epoch FROM now() - coalesce(heartbeat_at, started_at, created_at))::float8"
        "   AS silent_s"
        " FROM runs WHERE status = 'running'"
        " AND coalesce(started_at, created_at) < now() - make_interval(secs => $1)"
        " AND coalesce(heartbeat_at, started_at, created_at) < now() - make_interval(secs => $2)"
        " AND ($3::bigint IS NULL OR token = $3)"
        " AND ($4::bigint[] IS NULL OR id = ANY($4::bigint[]))"
        " ORDER BY id FOR UPDATE SKIP LOCKED",
        running_for,
        silent_for,
        token,
        only,
    )
    return [dict(r) for r in rows]


async def queue_resumes(
    conn: Connection,
    *,
    kinds: list[str],
    max_attempts: int,
    max_handoffs: int = MAX_HANDOFFS,
    within: float = 86400.0,
    only: list[int] | None = None,
) -> list[tuple[int, int]]:
    """Queue a `resume` run for each recently abandoned resumable run not yet resumed.

    The new run starts from the abandoned run's last committed cursor and carries its
    stats, so nothing committed is fetched again. A run handed off (its leader shut
    down or stepped down) keeps its attempt number, up to `max_handoffs` hand-offs in
    one chain; a run that failed (its leader died, the database dropped it), or a
    hand-off past that cap, spends one of `max_attempts`. `only` limits it to those
    run ids. Returns (new id, abandoned id) pairs.
    """
    rows = await conn.fetch(
        "INSERT INTO runs (job, kind, trigger, status, params, cursor, stats, attempt,"
        " handoffs, resumed_from, requested_by)"
        " SELECT r.job, r.kind, 'resume', 'queued', r.params, r.cursor, r.stats,"
        f" r.attempt + CASE WHEN {_free('$5')} THEN 0 ELSE 1 END,"
        " r.handoffs + CASE WHEN r.handed_off THEN 1 ELSE 0 END, r.id, 'reaper' FROM runs r"
        " WHERE r.status = 'abandoned' AND r.kind = ANY($1::text[])"
        f" AND ({_free('$5')} OR r.attempt < $2) AND r.given_up_at IS NULL"
        " AND r.finished_at > now() - make_interval(secs => $3)"
        " AND ($4::bigint[] IS NULL OR r.id = ANY($4::bigint[]))"
        " AND NOT EXISTS (SELECT 1 FROM runs c WHERE c.resumed_from = r.id)"
        " ORDER BY r.id RETURNING id, resumed_from",
        kinds,
        max_attempts,
        within,
        only,
        max_handoffs,
    )
    if rows:
        await conn.execute("SELECT pg_notify($1, 'resume')", NOTIFY_CHANNEL)
    return [(int(r["id"]), int(r["resumed_from"])) for r in rows]


async def give_up(
    conn: Connection, *, kinds: list[str], max_attempts: int, max_handoffs: int = MAX_HANDOFFS
) -> list[dict[str, Any]]:
    """Mark resume chains that ran out of attempts as given up, once; returns them."""
    rows = await conn.fetch(
        "UPDATE runs r SET given_up_at = now(), error = coalesce(r.error, 'abandoned')"
        " || ' (given up after ' || r.attempt || ' failed attempts: nothing continues it)'"
        f" WHERE r.status = 'abandoned' AND r.kind = ANY($1::text[]) AND NOT {_free('$3')}"
        " AND r.attempt >= $2 AND r.given_up_at IS NULL"
        " AND NOT EXISTS (SELECT 1 FROM runs c WHERE c.resumed_from = r.id)"
        f" RETURNING {_COLUMNS}",
        kinds,
        max_attempts,
        max_handoffs,
    )
    return [dict(r) for r in rows]


async def end_unresumable(
    conn: Connection, *, resumable: list[str], within: float = 86400.0
) -> list[dict[str, Any]]:
    """Mark recently abandoned runs of kinds that do not resume (an `http` call cut off
    by its leader's death, say) as given up, once: nothing continues them, so this is
    their end, and the webhook trigger reports it as `run.failed`. Runs abandoned more
    than `within` seconds ago (before this existed) are left as they are."""
    rows = await conn.fetch(
        "UPDATE runs r SET given_up_at = now(), error = coalesce(r.error, 'abandoned')"
        " || ' (its kind does not resume: nothing continues it)'"
        " WHERE r.status = 'abandoned' AND NOT (r.kind = ANY($1::text[]))"
        " AND r.given_up_at IS NULL AND r.finished_at > now() - make_interval(secs => $2)"
        f" RETURNING {_COLUMNS}",
        resumable,
        within,
    )
    return [dict(r) for r in rows]


async def prune(conn: Connection, *, keep: float) -> int:
    """Delete finished runs older than `keep` seconds, and their scratch rows.

    The newest slot row of each job stays: it is where the scheduler's slot ledger
    resumes, so pruning never makes old slots look due again. So does every run of a
    parsing operation with results nobody has read yet (the operation and its
    resumes): those results go only through `POST /parsing/cleanup`, once processed.
    """
    result: str = await conn.execute(
        "WITH RECURSIVE unread(id) AS ("
        "  SELECT o.id FROM runs o WHERE o.processed_at IS NULL AND o.resumed_from IS NULL"
        "  AND EXISTS (SELECT 1 FROM run_items i WHERE i.operation_id = o.id)"
        "  UNION SELECT c.id FROM runs c JOIN unread u ON c.resumed_from = u.id)"
        " DELETE FROM runs r WHERE r.status = ANY($1::text[])"
        " AND coalesce(r.finished_at, r.created_at) < now() - make_interval(secs => $2)"
        " AND (r.slot IS NULL OR EXISTS ("
        "   SELECT 1 FROM runs n WHERE n.job = r.job AND n.slot > r.slot))"
        " AND NOT r.id IN (SELECT id FROM unread)",
        list(FINAL),
        keep,
    )
    await conn.execute(
        "DELETE FROM sync_seen s WHERE NOT EXISTS ("
        "  SELECT 1 FROM runs r WHERE r.id = s.run_id"
        "  AND coalesce(r.finished_at, now()) > now() - interval '1 day')"
    )
    return int(result.split()[-1])


async def request_cancel(pool: Pool, run_id: int, *, by: str) -> str | None:
    """Cancel a queued run now, or ask the leader to cancel a running one.

    Returns the run's status *before* the request: 'queued' (now cancelled),
    'running' (the leader will stop it), a final status (nothing was done), or None
    when there is no such run.
    """
    async with pool.acquire() as conn, conn.transaction():
        status: str | None = await conn.fetchval(
            "SELECT status FROM runs WHERE id = $1 FOR UPDATE", run_id
        )
        if status == "queued":
            await conn.execute(
                "UPDATE runs SET status = 'cancelled', finished_at = now(),"
                " cancel_requested_at = now(), error = $2 WHERE id = $1",
                run_id,
                f"cancelled by {by} before it started",
            )
        if status == "running":
            await conn.execute(
                "UPDATE runs SET cancel_requested_at = coalesce(cancel_requested_at, now()),"
                " requested_by = coalesce(requested_by, $2) WHERE id = $1",
                run_id,
                by,
            )
            await conn.execute("SELECT pg_notify($1, 'cancel')", NOTIFY_CHANNEL)
        return status


async def cancel_requested(pool: Pool, run_ids: list[int]) -> list[int]:
    """Which of these running runs someone asked to cancel."""
    rows = await pool.fetch(
        "SELECT id FROM runs WHERE id = ANY($1::bigint[]) AND status = 'running'"
        " AND cancel_requested_at IS NOT NULL",
        run_ids,
    )
    return [int(r["id"]) for r in rows]


async def get(pool: Pool, run_id: int) -> dict[str, Any] | None:
    if not 0 < run_id < 2**63:
        return None  # ids are bigint: no such run, and Postgres would refuse the query
    row = await pool.fetchrow(f"SELECT {_COLUMNS} FROM runs WHERE id = $1", run_id)
    return dict(row) if row else None


async def search(
    pool: Pool, *, job: str | None = None, status: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        f"SELECT {_COLUMNS} FROM runs"
        " WHERE ($1::text IS NULL OR job = $1) AND ($2::text IS NULL OR status = $2)"
        " ORDER BY id DESC LIMIT $3",
        job,
        status,
        limit,
    )
    return [dict(r) for r in rows]


async def last_runs(pool: Pool) -> dict[str, dict[str, Any]]:
    """The newest run of each job that actually ran (missed slots left out)."""
    rows = await pool.fetch(
        f"SELECT DISTINCT ON (job) {_COLUMNS} FROM runs WHERE status <> 'missed'"
        " ORDER BY job, id DESC"
    )
    return {r["job"]: dict(r) for r in rows}


async def job_overview(pool: Pool, specs: Sequence[JobSpec], now: datetime) -> list[dict[str, Any]]:
    """Each job's settings with its next slot and newest run (raw values)."""
    last = await last_runs(pool)
    errors = await job_errors(pool)
    states = await job_states(pool)
    views = []
    for spec in specs:
        try:
            next_slot = spec.schedule.next_after(now) if spec.schedule else None
        except ValueError:
            next_slot = None  # the schedule names no date ahead; planning_error says so
        error = errors.get(spec.name)
        views.append(
            {
                **spec.describe(),
                "next_slot": next_slot,
                "last_run": last.get(spec.name),
                "planning_error": error["error"] if error else None,
                **_pause_view(states.get(spec.name, {})),
            }
        )
    return views


def public_job(view: Mapping[str, Any]) -> dict[str, Any]:
    """A `job_overview` entry as the API and CLI show it: its webhook URLs lose their
    user, password and query values, as every URL shown does (a receiver's token often
    rides in the query)."""
    next_slot, last_run = view["next_slot"], view["last_run"]
    out = {
        **view,
        "next_slot": next_slot.isoformat() if next_slot else None,
        "last_run": public(last_run) if last_run else None,
    }
    if "webhooks" in out:
        out["webhooks"] = redact(out["webhooks"])
    if isinstance(out.get("paused_at"), datetime):
        out["paused_at"] = out["paused_at"].isoformat()
    if out.get("last_pause"):
        out["last_pause"] = jsonable(out["last_pause"])
    return out


def public(run: Mapping[str, Any]) -> dict[str, Any]:
    """A run as the API and CLI show it: times as ISO 8601, duration in seconds, and
    secrets redacted from its params, error and progress message."""
    out = jsonable(run)
    for key in ("params", "error", "progress"):
        if key in out:
            out[key] = redact(out[key])
    started, finished = run.get("started_at"), run.get("finished_at")
    out["duration"] = (
        (finished - started).total_seconds()
        if isinstance(started, datetime) and isinstance(finished, datetime)
        else None
    )
    return out


# --- the status page's reads (worker.web.status) ---------------------------------------

# Failures stay at the top of the status page this long.
ATTENTION_WINDOW = 86400.0


async def page(
    pool: Pool,
    *,
    job: str | None = None,
    status: str | None = None,
    before: int | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Newest first, like `search`, from the run before id `before` on (a stable page
    while new runs arrive)."""
    rows = await pool.fetch(
        f"SELECT {_COLUMNS} FROM runs"
        " WHERE ($1::text IS NULL OR job = $1) AND ($2::text IS NULL OR status = $2)"
        " AND ($3::bigint IS NULL OR id < $3) ORDER BY id DESC LIMIT $4",
        job,
        status,
        before,
        limit,
    )
    return [dict(r) for r in rows]


async def needing_attention(
    pool: Pool,
    *,
    failures: int = 10,
    within: float = ATTENTION_WINDOW,
    running: int = 100,
    queued: int = 20,
) -> list[dict[str, Any]]:
    """Running runs, then the queued runs next to start, oldest first (a backfill may
    queue a thousand: only the first `queued`), then the newest `failures` failed or
    abandoned runs that ended in the last `within` seconds."""
    rows = await pool.fetch(
        f"SELECT {_COLUMNS} FROM ("
        f"  (SELECT 1 AS part, {_COLUMNS} FROM runs WHERE status = 'running'"
        "    ORDER BY id LIMIT $3)"
        f"  UNION ALL (SELECT 2, {_COLUMNS} FROM runs WHERE status = 'queued'"
        "    ORDER BY id LIMIT $4)"
        f"  UNION ALL (SELECT 3, {_COLUMNS} FROM runs WHERE status IN ('failed', 'abandoned')"
        "    AND finished_at > now() - make_interval(secs => $2) ORDER BY id DESC LIMIT $1)"
        ") a ORDER BY part, CASE WHEN part = 3 THEN -id ELSE id END",
        failures,
        within,
        running,
        queued,
    )
    return [dict(r) for r in rows]


async def recent_history(
    pool: Pool, jobs: Sequence[str], *, runs: int = 20, window: int = 1500
) -> dict[str, dict[str, Any]]:
    """For each job: its last `runs` runs that started, newest first ({id, status,
    took (seconds, None while running), items}), and how many slots of the last day
    were missed and skipped (counted in its newest `window` rows), with the newest."""
    rows = await pool.fetch(
        "SELECT j.job, g.missed, g.skipped, g.last_gap, h.runs"
        " FROM unnest($1::text[]) AS j(job)"
        " CROSS JOIN LATERAL ("
        "   SELECT count(*) FILTER (WHERE w.status = 'missed') AS missed,"
        "   count(*) FILTER (WHERE w.status = 'skipped') AS skipped, max(w.slot) AS last_gap"
        "   FROM (SELECT status, slot, created_at FROM runs WHERE runs.job = j.job"
        "     ORDER BY id DESC LIMIT $3) w"
        "   WHERE w.status IN ('missed', 'skipped') AND w.created_at > now() - interval '1 day'"
        " ) g CROSS JOIN LATERAL ("
        "   SELECT coalesce(jsonb_agg(jsonb_build_object('id', r.id, 'status', r.status,"
        "     'took', extract(epoch FROM r.finished_at - r.started_at)::float8,"
        "     'items', r.stats -> 'items') ORDER BY r.id DESC), '[]') AS runs"
        "   FROM (SELECT id, status, started_at, finished_at, stats FROM runs"
        "     WHERE runs.job = j.job AND started_at IS NOT NULL ORDER BY id DESC LIMIT $2) r"
        " ) h",
        list(jobs),
        runs,
        window,
    )
    return {r["job"]: {k: r[k] for k in ("runs", "missed", "skipped", "last_gap")} for r in rows}


async def resume_chain(pool: Pool, run_id: int) -> list[dict[str, Any]]:
    """The runs of `run_id`'s resume chain, first to last: what it resumed, and what
    resumed it."""
    rows = await pool.fetch(
        "WITH RECURSIVE up(id, resumed_from) AS ("
        "  SELECT id, resumed_from FROM runs WHERE id = $1"
        "  UNION SELECT r.id, r.resumed_from FROM runs r JOIN up ON r.id = up.resumed_from),"
        " down(id) AS ("
        "  SELECT id FROM runs WHERE id = $1"
        "  UNION SELECT r.id FROM runs r JOIN down ON r.resumed_from = down.id)"
        " SELECT id, status, trigger, attempt, created_at, started_at, finished_at, error"
        " FROM runs WHERE id IN (SELECT id FROM up UNION SELECT id FROM down) ORDER BY id",
        run_id,
    )
    return [dict(r) for r in rows]
