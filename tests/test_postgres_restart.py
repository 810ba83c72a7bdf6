"""A Postgres restart under a running sync: the leader resumes it at once.

The test starts a Postgres server of its own (it restarts it; the shared one is never
touched). The old code left the interrupted run `running` (its end could not be
recorded) until the reaper abandoned it `WORKER_REAP_AFTER` later, and logged the
blip as `run failed` at error level: a 0.3 s restart cost a sync about 16 s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_aiohttp import AiohttpServer

from worker import db, runs
from worker.jobs.marketplaces import EmagOffersJob
from worker.upstream import Upstream

from .cluster import free_port
from .helpers import eventually
from .test_catalog_sync import emag_params, job_spec, leading, start_marketplace, upstream

__all__ = ["upstream"]  # the fixture, imported for pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

PG_BIN = Path("/usr/lib/postgresql") / sorted(os.listdir("/usr/lib/postgresql"))[-1] / "bin"
ITEMS = 3000


def _as_postgres(*args: str) -> subprocess.CompletedProcess[bytes]:
    cmd = [str(a) for a in args]
    if os.geteuid() == 0:  # the server refuses to run as root
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, check=True, timeout=60)


@pytest.fixture
def private_postgres() -> Iterator[tuple[str, Path]]:
    """A Postgres server of this test's own: (dsn of database `worker`, data dir)."""
    root = Path(tempfile.mkdtemp(prefix="worker-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = free_port()
    _as_postgres(PG_BIN / "initdb", "-D", str(data), "-A", "trust", "-U", "postgres")
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    _as_postgres(
        PG_BIN / "pg_ctl", "-D", str(data), "-o", opts, "-w", "-l", str(root / "log"), "start"
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/worker", data
    finally:
        subprocess.run(
            ["runuser", "-u", "postgres", "--"] * (os.geteuid() == 0)
            + [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            check=False,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


async def test_a_sync_interrupted_by_a_postgres_restart_resumes_at_once(
    private_postgres: tuple[str, Path],
    aiohttp_server: AiohttpServer,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dsn, data = private_postgres
    await db.create_database_if_missing(dsn)
    market = await start_marketplace(aiohttp_server, emag_items=ITEMS)
    market.sandbox.faults.delay = 0.02  # about 6 s of pages: time to restart mid-sync
    spec = job_spec(EmagOffersJob(), emag_params(market, monkeypatch), name="sync")
    async with db.open_pool(dsn, timeout=5) as pool:
        async with pool.acquire() as conn:
            await db.migrate(conn)
        async with leading(
            pool, upstream, {"emag.offers": EmagOffersJob()}, [spec], reap_after=60.0
        ):
            first = await runs.enqueue(pool, job="sync", kind="emag.offers", params=spec.params)
            await eventually(lambda: _pages(pool, first, at_least=20), timeout=30, step=0.05)
            restart = await asyncio.to_thread(
                _as_postgres,
                PG_BIN / "pg_ctl",
                "-D",
                str(data),
                "-m",
                "fast",
                "-w",
                "-l",
                str(data.parent / "log"),
                "restart",
            )
            assert restart.returncode == 0
            back_up = time.monotonic()

            async def resumed() -> dict[str, object] | None:
                row = None
                with _quiet():
                    row = await pool.fetchrow(
                        "SELECT id, status FROM runs WHERE resumed_from = $1", first
                    )
                return dict(row) if row and row["status"] != "queued" else None

            await eventually(resumed, timeout=10, step=0.05)
            took = time.monotonic() - back_up
            assert took < 6.0, f"the resume started {took:.1f}s after Postgres was back"

            async def done() -> dict[str, object] | None:
                row = await pool.fetchrow(
                    "SELECT status, stats FROM runs WHERE resumed_from = $1", first
                )
                return dict(row) if row and row["status"] in runs.FINAL else None

            last = await eventually(done, timeout=60, step=0.1)
            interrupted = await runs.get(pool, first)
            products = await pool.fetchval("SELECT count(*) FROM products")
    assert interrupted is not None
    assert interrupted["status"] == "abandoned"
    assert str(interrupted["error"]).startswith("interrupted by a database error")
    assert last["status"] == "succeeded", last
    assert products == ITEMS
    assert last["stats"]["items"] == ITEMS  # type: ignore[index]
    assert not [
        r for r in caplog.records if r.levelno >= logging.ERROR and "run failed" in r.getMessage()
    ]
    print(f"resume started {took:.2f}s after Postgres was back")


async def _pages(pool: db.Pool, run_id: int, *, at_least: int) -> bool:
    pages = await pool.fetchval("SELECT (stats->>'pages')::int FROM runs WHERE id = $1", run_id)
    return bool(pages and pages >= at_least)


class _quiet:
    """Polling across the restart: a failed poll is just a poll that found nothing."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], (*db.DB_ERRORS,))  # type: ignore[arg-type]
