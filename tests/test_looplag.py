"""The event loop's lag (issue 12, item 3): exported, moved by a blocked loop; and the
slices that keep a sync's CPU-bound work from blocking it.

The slice tests measure the loop thread's CPU time between two turns of a ticker task,
not wall time: on a busy machine the process is descheduled at any moment, which
says nothing about how long the loop ran one stretch. The collector is off while they
measure: a full pass stops the loop however the work is cut (`freeze_startup_heap`).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal

import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker import catalog, db, looplag
from worker.catalog import Item

from .test_api import Client, client, make_client, settings

__all__ = ["client", "make_client", "settings"]  # fixtures, for pytest

METRIC = "worker_event_loop_lag_seconds"
TOKEN = 7
STRETCH = 0.01  # seconds: the longest CPU stretch a sliced batch may run


def _samples(exposition: str) -> dict[str, float]:
    """The lag histogram's samples: `_sum`, `_count` and `_bucket:<le>`."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        if family.name != METRIC:
            continue
        for sample in family.samples:
            le = sample.labels.get("le")
            out[f"{sample.name}:{le}" if le else sample.name] = sample.value
    return out


async def _scrape(client: Client) -> dict[str, float]:
    response = await client.get("/metrics")
    assert response.status == 200
    return _samples(await response.text())


async def test_lag_is_exported_and_moves_when_the_loop_is_blocked(client: Client) -> None:
    before = await _scrape(client)
    assert f"{METRIC}_count" in before  # declared before any sample
    stop = asyncio.Event()
    monitor = asyncio.create_task(looplag.monitor(stop, interval=0.01))
    await asyncio.sleep(0.05)
    _busy(0.3)  # a long CPU-bound stretch: every task on the loop waits it out
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(monitor, timeout=1)
    after = await _scrape(client)

    assert after[f"{METRIC}_count"] >= before[f"{METRIC}_count"] + 3
    assert after[f"{METRIC}_sum"] - before[f"{METRIC}_sum"] >= 0.25
    # The blocked tick went into a bucket above a quarter of a second.
    over = [
        after[f"{METRIC}_bucket:{le}"] - before[f"{METRIC}_bucket:{le}"] for le in ("0.25", "+Inf")
    ]
    assert over[1] - over[0] >= 1


async def test_monitor_ends_once_told_to_stop() -> None:
    stop = asyncio.Event()
    monitor = asyncio.create_task(looplag.monitor(stop, interval=0.05))
    await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(monitor, timeout=0.5)


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def longest_stretch(work: Callable[[], Awaitable[object]]) -> float:
    """The most CPU time the loop thread spent between two turns of a ticker while
    `work` ran: the longest stretch any task held the loop."""
    longest = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal longest
        last = time.thread_time()
        while not done.is_set():
            await asyncio.sleep(0)
            now = time.thread_time()
            longest = max(longest, now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        await work()
    finally:
        done.set()
        await ticking
    return longest


def _busy(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def test_slices_let_the_loop_in_during_cpu_bound_work(no_collector: None) -> None:
    async def unsliced() -> None:
        for _ in range(100):
            _busy(0.001)

    async def sliced() -> None:
        slices = looplag.Slices(budget=0.002)
        for _ in range(100):
            _busy(0.001)
            if slices.over():
                await slices.next()

    assert await longest_stretch(unsliced) >= 0.09  # the yardstick sees a long stretch
    assert await longest_stretch(sliced) < STRETCH


async def test_a_large_batch_is_encoded_and_copied_in_short_stretches(
    pool: db.Pool, no_collector: None
) -> None:
    """Encoding 6 000 items and COPYing their rows takes some 60 ms of CPU in all: in
    slices and COPYs of COPY_ROWS rows, no stretch comes near it."""
    await db.raise_fence(pool, token=TOKEN, holder="t")
    raw = {
        "name": "Brembo brake pad set",
        "stock": [{"warehouse_id": 1, "value": 58}],
        "ean": ["5945750532782"],
        "url": "https://www.emag.ro/brake-pad-set/pd/D14BKAUP3/",
    }
    items = [
        Item(
            external_id=str(n),
            raw={**raw, "id": n},
            name=f"item {n}",
            sku=f"SB-{n}",
            price=Decimal(n) / 100,
            currency="RON",
            stock=n % 50,
            status="active",
        )
        for n in range(6000)
    ]
    counts = catalog.UpsertCounts()

    async def upsert() -> None:
        async with db.fenced(pool, TOKEN) as conn:
            counts.add(await catalog.upsert(conn, source="s", account="a", items=items))

    assert await longest_stretch(upsert) < STRETCH
    assert (counts.created, counts.failed) == (6000, [])
    assert await pool.fetchval("SELECT count(*) FROM products") == 6000
