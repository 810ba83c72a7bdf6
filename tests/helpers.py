"""Shared test helpers: job kinds that record what they do, settings builders, waiting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from worker.config import JobSpec, Settings, load_jobs
from worker.context import RunContext
from worker.lease import Grant, Lease
from worker.scheduler import Leader


class RecordingJob:
    """A job kind that records each run's slot and sleeps `params.sleep` seconds."""

    resumable = False

    def __init__(self) -> None:
        self.runs: list[RunContext] = []

    def check(self, spec: JobSpec) -> None:
        pass

    async def run(self, ctx: RunContext) -> Any:
        self.runs.append(ctx)
        await asyncio.sleep(float(ctx.params.get("sleep", 0)))
        if ctx.params.get("fail"):
            raise RuntimeError("asked to fail")
        return {"slot": ctx.slot.isoformat() if ctx.slot else None}


def settings_with_jobs(tmp_path: Path, toml: str, **overrides: Any) -> Settings:
    path = tmp_path / "jobs.toml"
    path.write_text(toml)
    return Settings(jobs=load_jobs(path), jobs_file=path, **overrides)


async def eventually(predicate: Callable[[], Any], timeout: float = 5.0, step: float = 0.02) -> Any:
    """Poll a sync or async predicate until it is truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(step)


@asynccontextmanager
async def leading(leader: Leader, grant: Grant) -> AsyncIterator[None]:
    """Run the leader work for the block, then end the term as the elector would."""
    task = asyncio.create_task(leader.run(grant))
    try:
        yield
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def grant_for(redis: Redis, prefix: str, holder: str) -> Grant:
    grant, _ = await Lease(redis, prefix=prefix).acquire(holder=holder, ttl=30)
    assert grant is not None
    return grant
