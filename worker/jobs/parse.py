"""The generic parsing operation (seed 001): any event source, saved in batches of ten.

A parser (`EventSource`) turns a site into normalised events, one at a time; this job
saves them ten at a time in fenced transactions, each with its progress in the
operation's `infoText` ("processed 40 of 120 events, batch 4 of 12"). A run resumed
after a crash or a hand-off skips the events its operation already saved (sources
yield in a stable order) and goes on numbering from the last batch. One bad event is
counted and sampled, never fatal.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from .. import run_items
from ..config import JobSpec
from ..context import RunContext
from ..parsing import Bad, EventSource
from ..upstream import Timeouts

FAILED_SAMPLE = 20


class ParseJob(ABC):
    """Base of the `parse.*` job kinds; subclasses validate their params and build the
    source. A run's params are the job's params plus the operation's `meta`."""

    resumable = True

    def check(self, spec: JobSpec) -> None:
        p = spec.params
        meta = p.get("meta", {})
        if not isinstance(meta, Mapping):
            raise ValueError("'meta' must be a table")
        # What every parser takes: how it introduces itself, robots.txt, timeouts.
        for key in ("user_agent", "contact"):
            value = p.get(key, "x")
            if not isinstance(value, str) or not value.strip() or "\n" in value or "\r" in value:
                raise ValueError(f"'{key}' must be a one-line string, got {value!r}")
        if not isinstance(p.get("respect_robots", True), bool):
            raise ValueError("'respect_robots' must be true or false")
        Timeouts.from_params(p)
        self.check_source(spec)

    @abstractmethod
    def check_source(self, spec: JobSpec) -> None:
        """Validate the source's own params (raise ValueError naming the param)."""

    @abstractmethod
    def source(self, ctx: RunContext) -> EventSource:
        """Build the source for one run."""

    async def run(self, ctx: RunContext) -> dict[str, Any]:
        return await _Operation(ctx, self.source(ctx)).run()


class _Operation:
    def __init__(self, ctx: RunContext, source: EventSource) -> None:
        self.ctx = ctx
        self.source = source
        s = ctx.stats
        for key in ("events", "failed"):
            s.setdefault(key, 0)
        s.setdefault("failed_sample", [])

    async def run(self) -> dict[str, Any]:
        ctx, stats = self.ctx, self.ctx.stats
        async with ctx.fenced() as conn:
            operation = await run_items.operation_of(conn, ctx.run_id)
            done, batches = await run_items.saved(conn, operation)
        stats["events"] = done
        skip, pending = done, []
        async with contextlib.aclosing(self.source.events()) as events:
            async for event in events:
                if skip:  # saved (or counted bad) by an earlier run of this operation
                    skip -= not isinstance(event, Bad)
                    continue
                if isinstance(event, Bad):
                    self._bad(event)
                    continue
                pending.append(event)
                if len(pending) == run_items.BATCH_SIZE:
                    batches = await self._save(operation, batches, pending)
                    pending = []
        if pending:
            batches = await self._save(operation, batches, pending)
        await ctx.progress(message=self._message(batches, done=True), done=stats["events"])
        return {"events": stats["events"], "failed": stats["failed"], "batches": batches}

    async def _save(self, operation: int, batches: int, events: list[dict[str, Any]]) -> int:
        ctx, stats = self.ctx, self.ctx.stats
        batch = batches + 1
        async with ctx.fenced() as conn:
            await run_items.save_batch(
                conn, operation, batch=batch, first_seq=stats["events"], items=events
            )
            stats["events"] += len(events)
            await ctx.progress(
                done=stats["events"],
                total=self.source.expected,
                message=self._message(batch),
                conn=conn,
            )
        return batch

    def _bad(self, bad: Bad) -> None:
        stats = self.ctx.stats
        stats["failed"] += 1
        if len(stats["failed_sample"]) < FAILED_SAMPLE:
            stats["failed_sample"].append({"id": bad.external_id, "reason": bad.reason})
            self.ctx.log.warning("event %s not read: %s", bad.external_id, bad.reason)

    def _message(self, batch: int, *, done: bool = False) -> str:
        stats, expected = self.ctx.stats, self.source.expected
        total = max(expected or 0, stats["events"])
        batches = -(-total // run_items.BATCH_SIZE) if total else batch
        head = "done: " if done else ""
        return (
            f"{head}processed {stats['events']} of {total} events, batch {batch} of"
            f" {max(batches, batch)} ({stats['failed']} failed)"
        )


__all__ = ["Bad", "EventSource", "ParseJob"]
