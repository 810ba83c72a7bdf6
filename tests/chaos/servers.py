"""A Postgres and a Redis server of the test's own, on free ports: the scenario may
restart or kill them (the shared servers on 5432 and 6379 are never touched).

Every blocking step runs in a thread: the test's event loop carries the proxies and
the sandbox marketplace, which must not stall while a server restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from ..cluster import free_port

PG_BIN = Path("/usr/lib/postgresql") / sorted(os.listdir("/usr/lib/postgresql"))[-1] / "bin"


def _as_postgres(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    cmd = [str(a) for a in args]
    if os.geteuid() == 0:  # the server refuses to run as root
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, check=check, timeout=60)


class PrivatePostgres:
    """initdb + pg_ctl on a free port; database `worker` is created by `start()`."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="worker-chaos-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self.data = self.root / "data"
        self.port = free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/worker"

    def _ctl(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.root / "log")
        return _as_postgres(PG_BIN / "pg_ctl", "-D", self.data, "-o", opts, "-l", log, *args)

    async def start(self) -> None:
        def init() -> None:
            _as_postgres(PG_BIN / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres")
            self._ctl("-w", "start")

        await asyncio.to_thread(init)
        from worker import db

        await db.create_database_if_missing(self.dsn)

    async def restart(self, mode: str) -> float:
        """`pg_ctl restart -m fast|immediate`; returns how long the server was away."""
        started = time.monotonic()
        await asyncio.to_thread(self._ctl, "-m", mode, "-w", "restart")
        return time.monotonic() - started

    def stop(self) -> None:
        _as_postgres(PG_BIN / "pg_ctl", "-D", self.data, "-m", "immediate", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateRedis:
    """redis-server on a free port, without persistence: a restart starts empty."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            if time.monotonic() > deadline or self.proc.returncode is not None:
                raise RuntimeError("private redis did not start")
            await asyncio.sleep(0.02)

    async def kill(self) -> None:
        """SIGKILL: everything it held (the lease, the token counter) is gone."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@contextlib.asynccontextmanager
async def private_postgres() -> AsyncIterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        await server.start()
        yield server
    finally:
        await asyncio.to_thread(server.stop)


@contextlib.asynccontextmanager
async def private_redis() -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis()
    try:
        await server.start()
        yield server
    finally:
        await server.kill()
