"""What a run is given (`RunContext`) and what a job kind must provide (`JobKind`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from . import db, runs
from .config import JobSpec
from .db import Connection, Pool
from .upstream import Upstream

_UNSET: Any = object()


class JobKind(Protocol):
    """A kind of job (`http`, `emag.offers`, …): validates its params, runs one run."""

    resumable: bool

    def check(self, spec: JobSpec) -> None:
        """Raise ValueError naming the bad param; called when the jobs file is loaded."""

    async def run(self, ctx: RunContext) -> Any:
        """Do the work; return a JSON-able result. Raise to fail the run."""


@dataclass
class RunContext:
    """Everything one run may touch. A run never touches Redis or the lease."""

    run_id: int
    job: JobSpec
    token: int
    trigger: str
    slot: datetime | None
    params: Mapping[str, Any]
    pool: Pool
    upstream: Upstream
    worker_id: str
    cursor: Any = None
    attempt: int = 1
    resumed_from: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("worker.run"))

    def fenced(self) -> AbstractAsyncContextManager[Connection]:
        """A transaction that commits only while this run's leader is still the leader."""
        return db.fenced(self.pool, self.token)

    async def progress(
        self,
        *,
        done: int | None = None,
        total: int | None = None,
        message: str | None = None,
        cursor: Any = _UNSET,
        conn: Connection | None = None,
    ) -> None:
        """Record progress, stats and (optionally) the checkpoint cursor, fenced.

        Pass `conn` to make it part of a fenced transaction the caller already holds
        (so the data of a page and its cursor commit together).
        """
        values = {"done": done, "total": total, "message": message}
        progress = {k: v for k, v in values.items() if v is not None}
        if cursor is not _UNSET:
            self.cursor = cursor
        async with self._conn(conn) as c:
            await runs.save_progress(
                c,
                self.run_id,
                progress=progress,
                stats=self.stats,
                cursor=None if cursor is _UNSET else cursor,
                set_cursor=cursor is not _UNSET,
            )

    @asynccontextmanager
    async def _conn(self, conn: Connection | None) -> AsyncIterator[Connection]:
        if conn is not None:
            yield conn
        else:
            async with self.fenced() as c:
                yield c

    async def note(self, message: str) -> None:
        """Set the progress message alone, in its own fenced transaction: what the run
        is waiting for ("page 5: retry 1/3 after a read timeout"). Counts, stats and
        the cursor stay as last committed; the next `progress()` replaces the message."""
        async with self.fenced() as c:
            await runs.save_progress(c, self.run_id, progress={"message": message})
