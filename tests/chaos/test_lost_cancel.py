"""A cancelled sync stops paging even when a page read swallows the cancellation.

Found by the chaos suite (SIGSTOP of the leader outside a fenced transaction): on
Python 3.11, `asyncio.wait_for` (redis-py's, under the rate limiter) returns a result
that arrived together with the cancellation and drops the cancellation. After a
freeze everything arrives at once, so the page read the fetcher awaited completed
normally, and the fetcher, whose cancellation had gone into that read, kept paging: the
woken leader fetched the rest of the catalogue (ten pages of fifteen, at the rate
limit, beside its successor's resume) and its term took FETCHER_STOP to end. Here a
connector's read swallows the first cancellation, deterministically.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

from worker import db, runs
from worker.catalog import Item
from worker.config import JobSpec
from worker.connectors.base import Connector, Page
from worker.context import RunContext
from worker.jobs.catalog import CatalogJob
from worker.upstream import Upstream

from ..helpers import eventually
from ..test_catalog_sync import leading, upstream

__all__ = ["upstream"]  # the fixture


class SwallowingReads:
    """Endless pages; the first read cancelled returns its page instead of raising, as
    3.11's wait_for does when the answer and the cancellation arrive together."""

    source = "fake"
    account = "a"
    complete = False

    def __init__(self) -> None:
        self.reads: list[float] = []
        self.swallowed = False

    async def pages(self, cursor: Any) -> AsyncGenerator[Page, None]:
        page = int(cursor["page"]) if cursor else 1
        while True:
            items = await asyncio.create_task(self._read(page))
            yield Page(items=items, cursor={"page": page + 1}, label=f"page {page}")
            page += 1

    async def _read(self, page: int) -> list[Item]:
        self.reads.append(time.monotonic())
        try:
            await asyncio.sleep(0.1)
        except asyncio.CancelledError:
            if self.swallowed:
                raise
            self.swallowed = True
        return [Item(external_id=str(page), raw={"id": page})]


class Endless(CatalogJob):
    def __init__(self) -> None:
        self.connector_ = SwallowingReads()

    def check_connector(self, spec: JobSpec) -> None:
        pass

    def connector(self, ctx: RunContext) -> Connector:
        return self.connector_


async def test_a_sync_whose_read_swallows_the_cancellation_stops_paging(
    pool: db.Pool, upstream: Upstream
) -> None:
    job = Endless()
    spec = JobSpec(name="endless", kind="fake.catalog", schedule=None, params={"account": "a"})
    async with leading(pool, upstream, {"fake.catalog": job}, [spec]):
        await runs.enqueue(pool, job="endless", kind="fake.catalog", params=spec.params)
        reads = job.connector_.reads
        await eventually(lambda: len(reads) >= 5, timeout=10)
        cancelled = time.monotonic()  # leaving the block cancels the term, and the run
    ended = time.monotonic() - cancelled
    await asyncio.sleep(0.5)
    assert job.connector_.swallowed
    after = [t for t in reads if t > cancelled]
    # Cancelled again FETCHER_RECANCEL (0.2 s) later: a read or two, not the catalogue.
    assert len(after) <= 3, f"{len(after)} pages read after the run was cancelled"
    assert ended < 1.0, f"the term took {ended:.1f}s to end"
