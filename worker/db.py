"""The Postgres pool, migrations under an advisory lock, and fenced transactions."""

from __future__ import annotations

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


@asynccontextmanager
async def open_pool(
    dsn: str, *, timeout: float = 10.0, min_size: int = 1, max_size: int = 10
) -> AsyncIterator[Pool]:
    """A pool whose every statement and acquire has a timeout."""
    try:
        pool = await _create_pool(dsn, timeout=timeout, min_size=min_size, max_size=max_size)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise Unreachable(
            f"cannot reach Postgres at {where(dsn)} (DATABASE_URL): {type(exc).__name__}: {exc}"
        ) from exc
    try:
        yield pool
    finally:
        await pool.close()


async def _create_pool(dsn: str, *, timeout: float, min_size: int, max_size: int) -> Pool:
    pool: Pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout,
        command_timeout=timeout,
        init=_init_connection,
        server_settings={"application_name": "sync-worker"},
    )
    return pool


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


@asynccontextmanager
async def fenced(pool: Pool, token: int) -> AsyncIterator[Connection]:
    """A transaction that commits only while `token` is the newest leader's.

    The fence row is read FOR SHARE, so a new leader's raise waits for this
    transaction and every transaction after the raise sees the new token.
    """
    async with pool.acquire() as conn, conn.transaction():
        current = await conn.fetchval("SELECT token FROM fence WHERE id = 1 FOR SHARE")
        if current != token:
            raise Fenced(token, current)
        yield conn


async def raise_fence(pool: Pool, *, token: int, holder: str) -> None:
    """Claim the fence for a new term and record it; Fenced if a newer term exists."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "UPDATE fence SET token = $1, holder = $2, raised_at = now()"
            " WHERE id = 1 AND token < $1 RETURNING token",
            token,
            holder,
        )
        if row is None:
            current = await conn.fetchval("SELECT token FROM fence WHERE id = 1")
            raise Fenced(token, current)
        await conn.execute(
            "UPDATE leader_terms SET ended_at = now(), end_reason = 'superseded'"
            " WHERE ended_at IS NULL AND token < $1",
            token,
        )
        await conn.execute(
            "INSERT INTO leader_terms (token, holder) VALUES ($1, $2)", token, holder
        )


async def end_term(pool: Pool, *, token: int, reason: str) -> None:
    """Close our term's record; a no-op if a successor already closed it."""
    async with fenced(pool, token) as conn:
        await conn.execute(
            "UPDATE leader_terms SET ended_at = now(), end_reason = $2"
            " WHERE token = $1 AND ended_at IS NULL",
            token,
            reason,
        )


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
