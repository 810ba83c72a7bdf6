"""The event loop's lag: how late a timer fires, measured and exported; and what keeps
it short.

One loop serves the probes (/healthz, /readyz) and, on the leader, runs the syncs. A
stretch of CPU-bound work (parsing pages, mapping, hashing, encoding a COPY) or a pass
of the garbage collector delays every other callback by its length, so a probe waits
for the longest one. `monitor` measures that delay; `Slices` cuts a CPU-bound loop into
stretches of a few milliseconds with the loop let in between; `tune_gc` keeps the
collector's full passes short and rare.

Slices, not threads: orjson and the hashing of small values hold the GIL, so a thread
gains no parallelism, and the loop, to run at all, waits for the GIL up to the
interpreter's switch interval (5 ms) each time; slicing bounds the stretch itself,
with no executor to manage.
"""

from __future__ import annotations

import asyncio
import gc
import time

from . import metrics

INTERVAL = 0.1  # seconds between two measurements of the monitor
SLICE = 0.002  # seconds of CPU-bound work before the loop is let in
FULL_PASSES_AFTER = 100  # middle-generation collections before a full one (see tune_gc)


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
    which a sync with the rate limit lifted reaches several times a second.
    `FULL_PASSES_AFTER` middle-generation passes (CPython's default: 10) make that ten
    times rarer; cyclic garbage waits that much longer to be freed.

    Called once, when the replica has started.
    """
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_PASSES_AFTER)


class Slices:
    """Cuts a CPU-bound loop into slices of about `budget` seconds:

        slices = Slices()
        for item in items:
            work(item)
            if slices.over():
                await slices.next()

    The time check is per item; the loop is let in (one `sleep(0)`: whatever I/O is
    ready runs first) only once the slice's time is up.
    """

    def __init__(self, budget: float = SLICE) -> None:
        self.budget = budget
        self._until = time.perf_counter() + budget

    def over(self) -> bool:
        """Whether this slice has had its time."""
        return time.perf_counter() >= self._until

    async def next(self) -> None:
        """Let the loop run, then start the next slice."""
        await asyncio.sleep(0)
        self._until = time.perf_counter() + self.budget
