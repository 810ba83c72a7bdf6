"""The event loop's lag (issue 12, item 3): exported, moved by a blocked loop; and the
threads that keep a sync's CPU-bound work from blocking it.

The stretch tests measure the loop thread's CPU time between two turns of a ticker task,
not wall time: on a busy machine the process is descheduled at any moment, which
says nothing about how long the loop ran one stretch. The collector is off while they
measure: a full pass stops the loop however the work is cut (`freeze_startup_heap`).
"""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal

import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker import catalog, db, looplag
from worker.catalog import Item
from worker.connectors.base import map_page

from .test_api import Client, client, make_client, settings

__all__ = ["client", "make_client", "settings"]  # fixtures, for pytest

METRIC = "worker_event_loop_lag_seconds"
TOKEN = 7
STRETCH = 0.01  # seconds: the longest CPU stretch off-loop work may leave on the loop
COPY_STRETCH = 0.005  # ... and a batch's COPY, in parts of COPY_ROWS rows


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


async def test_off_loop_runs_large_work_in_one_thread_and_small_work_here() -> None:
    here = threading.get_ident()

    def slow_ident() -> int:
        time.sleep(0.01)  # the calls overlap: a pool of threads would use several
        return threading.get_ident()

    large = [looplag.off_loop(looplag.OFF_LOOP_AT, slow_ident) for _ in range(4)]
    threads = set(await asyncio.gather(*large))
    assert len(threads) == 1  # one CPU thread: its calls do not contend for the GIL
    assert here not in threads
    assert await looplag.off_loop(looplag.OFF_LOOP_AT - 1, threading.get_ident) == here


async def test_a_large_page_is_mapped_off_the_loop(no_collector: None) -> None:
    """Mapping 100 items at 1 ms of CPU each holds no turn of the loop for long."""
    threads: set[int] = set()

    def mapper(raw: dict[str, int]) -> Item:
        threads.add(threading.get_ident())
        _busy(0.001)
        return Item(external_id=str(raw["id"]), raw=raw)

    raws = [{"id": n} for n in range(100)]
    mapped: list[Item] = []

    async def work() -> None:
        items, failed = await map_page(raws, mapper, id_field="id")
        assert failed == []
        mapped.extend(items)

    assert await longest_stretch(work) < STRETCH
    assert [item.external_id for item in mapped] == [str(n) for n in range(100)]
    assert threading.get_ident() not in threads


def test_tune_runtime_shortens_the_gil_switch_interval() -> None:
    before = sys.getswitchinterval()
    try:
        looplag.tune_runtime()
        assert sys.getswitchinterval() == pytest.approx(looplag.SWITCH_INTERVAL)
    finally:
        sys.setswitchinterval(before)
        gc.unfreeze()
        gc.set_threshold(700, 10, 10)


async def test_a_large_batch_is_encoded_and_copied_in_short_stretches(
    pool: db.Pool, no_collector: None
) -> None:
    """Encoding 20 000 items and COPYing their rows takes some 150 ms of CPU in all:
    encoded in a thread and COPYed COPY_ROWS rows at a time, no turn of the loop takes
    more than a few milliseconds (about 2; one COPY of them all takes about 12)."""
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
        for n in range(20_000)
    ]
    counts = catalog.UpsertCounts()

    async def upsert() -> None:
        async with db.fenced(pool, TOKEN) as conn:
            counts.add(await catalog.upsert(conn, source="s", account="a", items=items))

    assert await longest_stretch(upsert) < COPY_STRETCH
    assert (counts.created, counts.failed) == (20_000, [])
    assert await pool.fetchval("SELECT count(*) FROM products") == 20_000
