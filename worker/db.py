"""The Postgres pool, migrations under an advisory lock, and fenced transactions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from decimal import Decimal
from importlib import resources
from typing import Any, TypeAlias
from urllib.parse import urlsplit

import asyncpg
import orjson

from .errors import ConfigError, Fenced, Unreachable

log = logging.getLogger(__name__)

# Any constant works; it only has to be the same in every replica.
MIGRATION_LOCK = 0x5F3C_0001
NOTIFY_CHANNEL = "worker_runs"
APPLICATION_NAME = "sync-worker"
# How long a new leader's raise waits for the fence lock before it ends the sessions
# of older terms that hold it (a frozen leader inside a fenced transaction).
RAISE_LOCK_WAIT = 0.5

Pool: TypeAlias = asyncpg.Pool
Connection: TypeAlias = asyncpg.Connection


async def _init_connection(conn: Connection) -> None:
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(
            typ,
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


class BoundedPool(asyncpg.Pool):  # type: ignore[misc]  # asyncpg ships no types
    """A pool whose every acquire (including those inside `fetch`, `execute`, …) has a
    timeout: a pool exhausted by stuck connections raises TimeoutError, never hangs."""

    acquire_timeout: float = 10.0

    def acquire(self, *, timeout: float | None = None) -> Any:
        return super().acquire(timeout=self.acquire_timeout if timeout is None else timeout)


def session_bounds(*, timeout: float, hold: float | None) -> dict[str, str]:
    """Server-side settings for every connection of the pool.

    `statement_timeout` ends a statement the server is still running after `timeout`
    (the client-side timeout alone leaves it running). `hold` bounds how long a
    session may sit idle inside a transaction: a leader frozen (SIGSTOP, GC pause)
    between two statements of a fenced transaction keeps its lock on the fence row
    only that long. TCP keepalives let the server notice a peer that vanished (a
    cut network, a dead host) instead of holding its locks until the kernel gives up.
    """
    settings = {
        "application_name": APPLICATION_NAME,
        "statement_timeout": str(int(timeout * 1000) + 1000),
        "tcp_keepalives_idle": "5",
        "tcp_keepalives_interval": "2",
        "tcp_keepalives_count": "3",
    }
    if hold is not None:
        settings["idle_in_transaction_session_timeout"] = str(max(int(hold * 1000), 500))
    return settings


@asynccontextmanager
async def open_pool(
    dsn: str,
    *,
    timeout: float = 10.0,
    min_size: int = 1,
    max_size: int = 10,
    hold: float | None = None,
) -> AsyncIterator[Pool]:
    """A pool whose every statement and acquire has a timeout.

    `hold`: the longest a session may sit idle inside a transaction (the lease TTL
    for a replica, so a frozen leader's locks go with its lease).
    """
    try:
        pool = await _create_pool(
            dsn, timeout=timeout, min_size=min_size, max_size=max_size, hold=hold
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise Unreachable(
            f"cannot reach Postgres at {where(dsn)} (DATABASE_URL): {type(exc).__name__}: {exc}"
        ) from exc
    try:
        yield pool
    finally:
        try:
            # A connection never given back (a bug, or a run that would not stop) must
            # not hold the shutdown: past the timeout the rest are closed hard.
            await asyncio.wait_for(pool.close(), timeout=timeout)
        except TimeoutError:
            log.warning("pool did not close within %.0fs: terminating its connections", timeout)
            pool.terminate()


async def _create_pool(
    dsn: str, *, timeout: float, min_size: int, max_size: int, hold: float | None
) -> Pool:
    pool = BoundedPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        max_queries=50000,
        max_inactive_connection_lifetime=300.0,
        setup=None,
        init=_init_connection,
        reset=None,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        timeout=timeout,
        command_timeout=timeout,
        server_settings=session_bounds(timeout=timeout, hold=hold),
    )
    pool.acquire_timeout = timeout
    await pool
    return pool


async def connect(dsn: str, *, timeout: float = 10.0) -> Connection:
    """One connection outside the pool (e.g. for LISTEN), with the same bounds."""
    conn: Connection = await asyncpg.connect(
        dsn,
        timeout=timeout,
        command_timeout=timeout,
        server_settings=session_bounds(timeout=timeout, hold=None),
    )
    await _init_connection(conn)
    return conn


_CLIENT_STATE = asyncpg.exceptions.InternalClientError

# SQLSTATE classes of errors that say nothing about the statement itself: the
# connection, the server or a concurrent transaction. Retrying can succeed.
_TRANSIENT_CLASSES = ("08", "40", "53", "57", "58")
_TRANSIENT_STATES = {"55P03", "55006"}  # lock_not_available, object_in_use


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying (a lost connection, a restart, a timeout, a
    deadlock); False for deterministic ones (bad data, a constraint, a syntax error)."""
    if isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError | _CLIENT_STATE):
        # InternalClientError: a connection left mid-operation by a timeout or a lost
        # server ("another operation is in progress"); the pool replaces it.
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        return state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_STATES
    return False


# Everything a database call can raise that is not a bug of ours; callers catch this
# and then ask is_transient() whether to retry or to fail.
DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, _CLIENT_STATE, OSError, TimeoutError)


def where(url: str) -> str:
    """host:port/path of a service URL, without credentials, for error messages."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{host}{port}{parts.path}"


def _migrations() -> list[tuple[int, str, str]]:
    found = []
    for entry in resources.files("worker.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


async def migrate(conn: Connection) -> list[str]:
    """Apply pending migrations under an advisory lock; return the names applied."""
    applied: list[str] = []
    # A migration may run longer than any statement of the worker's own.
    await conn.execute("SET statement_timeout = 0")
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version int PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in _migrations():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    version,
                    name,
                )
            log.info("applied migration %s", name)
            applied.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
        await conn.execute("RESET statement_timeout")
    return applied


async def create_database_if_missing(dsn: str, *, timeout: float = 10.0) -> bool:
    """Create the database named in `dsn` when it does not exist; True if created."""
    params = _dsn_database(dsn)
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return False
    admin = await asyncpg.connect(params.replace_db("postgres"), timeout=timeout)
    try:
        await admin.execute(f'CREATE DATABASE "{params.name}"')
    except asyncpg.DuplicateDatabaseError:
        return False
    finally:
        await admin.close()
    return True


class _DsnDb:
    def __init__(self, dsn: str, name: str, start: int, end: int) -> None:
        self.dsn, self.name, self.start, self.end = dsn, name, start, end

    def replace_db(self, name: str) -> str:
        return self.dsn[: self.start] + name + self.dsn[self.end :]


def _dsn_database(dsn: str) -> _DsnDb:
    rest = dsn.split("://", 1)[1]
    slash = rest.find("/")
    if slash < 0:
        raise ConfigError("DATABASE_URL: name the database, e.g. postgresql://host/worker")
    start = len(dsn) - len(rest) + slash + 1
    end = dsn.find("?", start)
    end = len(dsn) if end < 0 else end
    name = dsn[start:end]
    if not name or '"' in name:
        raise ConfigError("DATABASE_URL: name the database, e.g. postgresql://host/worker")
    return _DsnDb(dsn, name, start, end)


# Reads the fence for a fenced transaction and sets `worker.token` for it (see `fenced`).
_READ_FENCE = "SELECT token, set_config('worker.token', $1, true) FROM fence WHERE id = 1 FOR SHARE"


@asynccontextmanager
async def fenced(pool: Pool, token: int) -> AsyncIterator[Connection]:
    """A transaction that commits only while `token` is the newest leader's.

    The fence row is read FOR SHARE, so a new leader's raise waits for this
    transaction and every transaction after the raise sees the new token. The same
    statement sets `worker.token` for the transaction: the audit triggers (migration
    0014) record it beside every write, so `write_audit` says which term wrote what, and
    when. (It is set before the check, in the one round trip; a refused transaction
    rolls back, and the setting with it.)
    """
    async with pool.acquire() as conn, conn.transaction():
        current = await conn.fetchval(_READ_FENCE, str(token))
        if current != token:
            raise Fenced(token, current)
        yield conn


async def raise_fence(
    pool: Pool, *, token: int, holder: str, lock_wait: float = RAISE_LOCK_WAIT
) -> list[int]:
    """Claim the fence for a new term and record it; Fenced if a newer term exists.

    A predecessor frozen inside a fenced transaction still holds the fence row FOR
    SHARE, and would hold the raise hostage for as long as it stays frozen. So the
    raise waits `lock_wait` for the lock, then ends the sessions that hold it (they
    read the fence under an older token: it is below ours, or we would not be
    raising), and tries again. Returns the backend pids it ended.
    """
    ended: list[int] = []
    for _ in range(5):
        current = await pool.fetchval("SELECT token FROM fence WHERE id = 1")
        if current is not None and current >= token:
            raise Fenced(token, current)
        try:
            await _raise(pool, token=token, holder=holder, lock_wait=lock_wait)
            return ended
        except asyncpg.LockNotAvailableError:
            pids = await _end_fence_holders(pool)
            ended.extend(pids)
            log.warning("fence held by an older term's session(s) %s: ended them", pids or "(gone)")
    raise Fenced(token, await pool.fetchval("SELECT token FROM fence WHERE id = 1"))


async def _raise(pool: Pool, *, token: int, holder: str, lock_wait: float) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = {max(int(lock_wait * 1000), 1)}")
        row = await conn.fetchrow(
            "UPDATE fence SET token = $1, holder = $2 WHERE id = 1 AND token < $1 RETURNING token",
            token,
            holder,
        )
        if row is None:
            current = await conn.fetchval("SELECT token FROM fence WHERE id = 1")
            raise Fenced(token, current)
        # The term starts once the fence row is ours: the clock read *after* the UPDATE
        # above (its SET was computed before it waited for the older term's last fenced
        # transactions, and now() is when this transaction began). Every write of an older
        # term committed before this instant (see tests/chaos/audit.py).
        started = await conn.fetchval(
            "UPDATE fence SET raised_at = clock_timestamp() WHERE id = 1 RETURNING raised_at"
        )
        await conn.execute(
            "UPDATE leader_terms SET ended_at = $2, end_reason = 'superseded'"
            " WHERE ended_at IS NULL AND token < $1",
            token,
            started,
        )
        await conn.execute(
            "INSERT INTO leader_terms (token, holder, started_at) VALUES ($1, $2, $3)",
            token,
            holder,
            started,
        )


async def _end_fence_holders(pool: Pool) -> list[int]:
    """End the sessions holding a lock on the fence table (a fenced transaction).

    Only our own kind of session (same application name, same database) is ended;
    that needs the same database role or pg_signal_backend.
    """
    rows = await pool.fetch(
        "SELECT l.pid, pg_terminate_backend(l.pid) AS ended FROM pg_locks l"
        " JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'relation' AND l.relation = 'fence'::regclass AND l.granted"
        " AND l.mode = 'RowShareLock' AND l.pid <> pg_backend_pid()"
        " AND a.application_name = $1 AND a.datname = current_database()",
        APPLICATION_NAME,
    )
    return [int(r["pid"]) for r in rows if r["ended"]]


async def end_term(pool: Pool, *, token: int, reason: str) -> None:
    """Close our term's record; a no-op if a successor already closed it."""
    async with fenced(pool, token) as conn:
        await conn.execute(
            "UPDATE leader_terms SET ended_at = now(), end_reason = $2"
            " WHERE token = $1 AND ended_at IS NULL",
            token,
            reason,
        )


async def prune_audit(conn: Connection, *, keep: float) -> int:
    """Delete `write_audit` rows (migration 0014) older than `keep` seconds."""
    done: str = await conn.execute(
        "DELETE FROM write_audit WHERE first_at < now() - make_interval(secs => $1)", keep
    )
    return int(done.split()[-1])


def like_literal(text: str | None) -> str | None:
    """`text` for `ILIKE '%' || $n || '%'` matching itself: `%` and `_` are not wildcards.
    Backslash is LIKE's default escape character, so it is escaped first."""
    if text is None:
        return None
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def jsonable(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row with times as ISO 8601 and decimals as strings, ready for JSON."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, Decimal):
            value = str(value)
        out[key] = value
    return out
