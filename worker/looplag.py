"""The event loop's lag: how late a timer fires, measured and exported; and what keeps
it short.

One loop serves the probes (/healthz, /readyz) and, on the leader, runs the syncs. A
stretch of CPU-bound work (parsing pages, mapping, hashing, encoding a COPY) or a pass
of the garbage collector delays every other callback by its length, so a probe waits
for the longest one. `monitor` measures that delay; `off_loop` runs a sync's bulk CPU
work (mapping a page, encoding a batch, freeing it) in one thread; `tune_runtime`
keeps the collector's full passes short and rare and the GIL's hand-over quick.

A thread gains no parallelism (orjson and the hashing of small values hold the GIL),
but it takes the sync's work out of the loop's turns: the loop, whenever it has
something to do, gets the GIL within the interpreter's switch interval, lowered from
5 ms to SWITCH_INTERVAL, and a probe waits that long instead of for whatever the sync
had ready in that turn. Slicing the work (a time check per item, the loop let in
between) bounds a stretch too, but each turn still runs every task's slice in a row:
measured (bench/probes.py, docs/benchmarks.md), a probe's p99 during a sync went from
13-17 ms with slices to 8-10 ms, the loop's worst lag from 18-32 ms to 9-13 ms.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from . import metrics

INTERVAL = 0.1  # seconds between two measurements of the monitor
FULL_PASSES_AFTER = 1000  # middle-generation collections before a full one (see tune_gc)
SWITCH_INTERVAL = 0.0002  # seconds a thread holding the GIL keeps it from a waiting one
OFF_LOOP_AT = 50  # items: smaller batches are not worth a thread's hand-over

P = ParamSpec("P")
R = TypeVar("R")


async def monitor(stop: asyncio.Event, *, interval: float = INTERVAL) -> None:
    """Until `stop` is set: sleep `interval`, and observe how late the wake-up came in
    `worker_event_loop_lag_seconds` (0 when on time)."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        due = loop.time() + interval
        await asyncio.sleep(interval)
        metrics.EVENT_LOOP_LAG.observe(max(loop.time() - due, 0.0))


def tune_gc() -> None:
    """Keep the garbage collector's full passes short and rare: each one stops the loop
    for as long as it walks the heap, and no slice can cut it.

    The objects built at start-up (modules, classes, the app: some 75 000) live as long
    as the process, yet each full pass walks them all: about 50 ms on a busy two-core
    host. They are frozen (left out of every pass), after a collection so that no
    garbage is kept for good. What remains is a sync's pages in flight: a full pass
    comes once the objects promoted since the last one reach a quarter of the heap,
    which a sync with the rate limit lifted reaches several times a second. Waiting
    for `FULL_PASSES_AFTER` middle-generation passes (CPython's default: 10) makes that
    a hundred times rarer: a sync at full speed makes some 20 such passes a second, so
    a full pass (15-30 ms of its in-flight pages) comes once in 50 s rather than once
    in 5 s; cyclic garbage waits that much longer to be freed (the soak's RSS
    growth, bench/soak.py, is the check on that).

    Called once, when the replica has started.
    """
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_PASSES_AFTER)


def tune_runtime() -> None:
    """Called once, when the replica has started: the collector (`tune_gc`) and the
    GIL's switch interval (see the module's text)."""
    tune_gc()
    sys.setswitchinterval(SWITCH_INTERVAL)


async def off_loop(size: int, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """`fn(*args, **kwargs)` in the replica's CPU thread when its work covers `size` >=
    OFF_LOOP_AT items, else here: pure CPU-bound work (no loop, no shared state) that would hold
    the loop for milliseconds. A cancelled caller does not stop the thread; it ends
    its call, which is short, and the result is dropped."""
    if size < OFF_LOOP_AT:
        return fn(*args, **kwargs)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_cpu(), functools.partial(fn, *args, **kwargs))


@functools.cache
def _cpu() -> ThreadPoolExecutor:
    """The one thread of `off_loop`, for every sync of the replica. One, not asyncio's
    default pool: with several threads taking turns at the GIL every switch interval,
    the sync ran a quarter slower (23 000 items/s against 29 000 with one thread and
    30 800 with everything on the loop, bench/probes.py); its work is serialised anyway.
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-cpu")


async def drop(*batches: list[Any]) -> None:
    """Empty these lists, which hold the last references to a large batch, in a thread
    (`off_loop`): freeing 5 000 rows of tuples and strings, or pages of items with their
    raw JSON, takes milliseconds of CPU, all in one stretch wherever the last
    reference goes."""
    await off_loop(sum(len(b) for b in batches), _clear, batches)


def _clear(batches: tuple[list[Any], ...]) -> None:
    for batch in batches:
        batch.clear()
