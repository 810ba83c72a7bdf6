"""The generic parsing operation (seed 001): events saved ten at a time with progress, a
crash keeps every finished batch, and the resume goes on from the last one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from worker import db, run_items, runs
from worker.config import JobSpec
from worker.context import RunContext
from worker.jobs.parse import Bad, EventSource, ParseJob
from worker.upstream import Upstream

from .helpers import eventually
from .test_catalog_sync import final, leading, upstream

__all__ = ["upstream"]  # the fixture, imported for pytest


class Source:
    """`n` events, event `bad` unreadable; after `stall_after` events it waits on `gate`."""

    def __init__(self, n: int, *, bad: int | None = None, stall_after: int | None = None) -> None:
        self.n, self.bad, self.stall_after = n, bad, stall_after
        self.gate = asyncio.Event()
        self.yielded = 0

    @property
    def expected(self) -> int | None:
        return self.n

    async def events(self) -> AsyncGenerator[dict[str, Any] | Bad, None]:
        for i in range(self.n):
            if self.stall_after is not None and i == self.stall_after:
                await self.gate.wait()
            self.yielded += 1
            if i == self.bad:
                yield Bad(str(i), "no start date")
            else:
                yield {"source": "test", "external_id": str(i), "title": f"event {i}"}


class TestParser(ParseJob):
    __test__ = False

    def __init__(self, source: Source) -> None:
        self.src = source

    def check_source(self, spec: JobSpec) -> None:
        pass

    def source(self, ctx: RunContext) -> EventSource:
        return self.src


SPEC = JobSpec(name="parse-test", kind="parse.test", schedule=None, params={})


async def test_events_are_saved_in_batches_of_ten_with_progress(
    pool: db.Pool, upstream: Upstream
) -> None:
    source = Source(25, bad=3)
    async with leading(pool, upstream, {"parse.test": TestParser(source)}, [SPEC]):
        op = await runs.enqueue(pool, job="parse-test", kind="parse.test", params={})
        row = await final(pool, op)
    assert row["status"] == "succeeded", row["error"]
    items = await run_items.read(pool, op)
    assert [i["external_id"] for i in items] == [str(i) for i in range(25) if i != 3]
    batches = await pool.fetch(
        "SELECT batch, count(*) AS n FROM run_items WHERE operation_id = $1 GROUP BY batch"
        " ORDER BY batch",
        op,
    )
    assert [(b["batch"], b["n"]) for b in batches] == [(1, 10), (2, 10), (3, 4)]
    assert row["stats"]["failed"] == 1
    assert row["stats"]["failed_sample"] == [{"id": "3", "reason": "no start date"}]
    assert row["progress"]["message"] == "done: processed 24 of 25 events, batch 3 of 3 (1 failed)"


async def test_a_crash_keeps_finished_batches_and_the_resume_goes_on(
    pool: db.Pool, upstream: Upstream
) -> None:
    """The leader stops (as a crash would leave it: its term ends) after 23 events; the
    two finished batches stay; the resume saves the rest once, numbering on."""
    first = Source(40, stall_after=23)
    async with leading(pool, upstream, {"parse.test": TestParser(first)}, [SPEC]):
        op = await runs.enqueue(pool, job="parse-test", kind="parse.test", params={})

        async def two_batches() -> bool:
            saved = await pool.fetchval(
                "SELECT count(*) FROM run_items WHERE operation_id = $1", op
            )
            return bool(saved == 20)

        await eventually(two_batches, timeout=10)
        progress = await pool.fetchval("SELECT progress->>'message' FROM runs WHERE id = $1", op)
        assert progress == "processed 20 of 40 events, batch 2 of 4 (0 failed)"
    interrupted = await runs.get(pool, op)
    assert interrupted is not None
    assert interrupted["status"] == "abandoned"
    assert await run_items.read(pool, op) != []  # kept

    second = Source(40)
    async with leading(pool, upstream, {"parse.test": TestParser(second)}, [SPEC]):
        async with db.fenced(pool, await pool.fetchval("SELECT token FROM fence")) as conn:
            queued = await runs.queue_resumes(conn, kinds=["parse.test"], max_attempts=5)
        assert len(queued) == 1
        resumed = await final(pool, queued[0][0])
    assert resumed["status"] == "succeeded", resumed["error"]
    items = await run_items.read(pool, op)
    assert [i["external_id"] for i in items] == [str(i) for i in range(40)]
    batches = await pool.fetchval("SELECT max(batch) FROM run_items WHERE operation_id = $1", op)
    assert batches == 4


@pytest.mark.parametrize("meta", [[1, 2], "x"])
def test_meta_must_be_a_table(meta: object) -> None:
    spec = JobSpec(name="p", kind="parse.test", schedule=None, params={"meta": meta})
    with pytest.raises(ValueError, match="meta"):
        TestParser(Source(1)).check(spec)
