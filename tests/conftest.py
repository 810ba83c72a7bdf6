"""Fixtures: a migrated template database copied per test, a Redis key prefix per test."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from redis.asyncio import Redis

from worker import db

PG_ADMIN = os.environ.get("TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TEMPLATE = f"worker_test_tpl_{os.getpid()}"


def dsn_for(name: str) -> str:
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _drop_leftovers() -> None:
    """Drop test databases of earlier sessions that were killed before cleaning up."""
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        names = [
            r["datname"]
            for r in await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE 'worker\\_test\\_%'"
            )
        ]
        for name in names:
            pid = name.removeprefix("worker_test_").removeprefix("tpl_").split("_")[0]
            if pid.isdigit() and not _alive(int(pid)):
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session")
def template_db() -> Iterator[str]:
    """One migrated database per test session; tests get copies of it."""

    async def build() -> None:
        await _drop_leftovers()
        await _admin(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
        await _admin(f'CREATE DATABASE "{TEMPLATE}"')
        conn = await asyncpg.connect(dsn_for(TEMPLATE))
        try:
            await db.migrate(conn)
        finally:
            await conn.close()

    asyncio.run(build())
    yield TEMPLATE
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)'))


@pytest.fixture
async def database_url(template_db: str) -> AsyncIterator[str]:
    """A fresh database, a copy of the migrated template, dropped after the test."""
    name = f"worker_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    await _admin(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    try:
        yield dsn_for(name)
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[db.Pool]:
    async with db.open_pool(database_url, timeout=10) as p:
        yield p


@pytest.fixture
def key_prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
async def redis(key_prefix: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
    try:
        yield client
    finally:
        keys = [k async for k in client.scan_iter(match=f"{key_prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def private_redis(tmp_path: object) -> Iterator[tuple[str, int]]:
    """A Redis server of this test's own, on a free port: the test may stop or kill it."""
    import subprocess
    import time

    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while (
        subprocess.run(
            ["redis-cli", "-p", str(port), "ping"], capture_output=True, check=False
        ).stdout.strip()
        != b"PONG"
    ):
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("private redis did not start")
        time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0", proc.pid
    finally:
        import signal as _signal

        with __import__("contextlib").suppress(ProcessLookupError):
            os.kill(proc.pid, _signal.SIGCONT)
        proc.kill()
        proc.wait()
