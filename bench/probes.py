"""Probe latency while the replica leads a catalogue sync.

A real `worker run` replica (the only one, so it leads) and the sandbox marketplace
(rate limit lifted, `--items` offers), each its own process. Each round:
  - idle: `wrk` on /healthz and on /readyz at once, one connection each, a request
    every `--gap` ms, for `--seconds`;
  - sync: the same, started once an emag.offers sync of the whole catalogue (rate
    limit lifted, products emptied first) has committed its first pages; the sync
    must still be running when the window ends (else: raise --items);
  - the sync's throughput: its items over its run time, from the runs table.
Beside the latencies it prints the limit they chase, measured in the same window:
the event loop's worst lag (the replica runs under a sampler that sleeps 5 ms at a
time and records each overshoot; the same yardstick for a tree without
`worker_event_loop_lag_seconds`), and the longest garbage-collector pause, which
stops the loop too and cannot be sliced.

    .venv/bin/python bench/probes.py [--items 200000] [--rounds 3] [--seconds 5]

It measures whichever `worker` package `python -m worker` imports: the tree before a
change is measured with `PYTHONPATH=<that tree>` and its own `--database-url` (the
trees' migrations may differ).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from redis.asyncio import Redis

WRK = "/usr/bin/wrk"
API_KEY = "bench-key"
JOB = "bench-offers"
LAG_TICK = 0.005  # the sampler's sleep, seconds
STACK_AFTER = 0.004  # --stacks: a stack is sampled once the loop is this late ...
STACK_EVERY = 0.001  # ... and again after this long while it still is
JOBS = """
[[jobs]]
name = "{job}"
kind = "emag.offers"
timeout = "30m"
[jobs.params]
account = "main"
platform = "ro"
base_url = "{base}/emag/ro/api-3"
username_env = "BENCH_EMAG_USER"
password_env = "BENCH_EMAG_PASS"
rate_limit = 0
prefetch = 4
"""
# One request every PROBE_GAP_MS per connection (a prober, not a flood), and the
# figures as one JSON line; wrk's latencies are in microseconds.
WRK_SCRIPT = """
local gap = tonumber(os.getenv("PROBE_GAP_MS") or "10")
function delay() return gap end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "errors": %d, "p50": %d, "p99": %d, "max": %d}\\n',
    summary.requests, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


# --- in the replica: `worker run` beside a loop-lag sampler ----------------------------


class Stalls:
    """Records, as text lines for the bench, each overshoot of a LAG_TICK sleep
    (`<monotonic> <lag>`) and each garbage-collector pass (`gc <monotonic> <took>`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lines: list[str] = []
        self.gc_started = 0.0
        self.beat = time.monotonic()  # the sampler's last wake-up
        self.stacks: list[str] = []  # see watch_stacks
        self.stacks_path = ""

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.gc_started = time.monotonic()
        else:
            took = time.monotonic() - self.gc_started
            gen = info.get("generation", "?")
            self.lines.append(f"gc {self.gc_started:.6f} {took:.6f} {gen}\n")

    def flush(self) -> None:
        with open(self.path, "a", encoding="ascii") as out:
            out.writelines(self.lines)
        self.lines.clear()
        if self.stacks_path:
            stacks, self.stacks = self.stacks, []
            with open(self.stacks_path, "a", encoding="utf-8") as out:
                out.writelines(stacks)

    async def sample(self) -> None:
        loop = asyncio.get_running_loop()
        flushed = loop.time()
        while True:
            due = loop.time() + LAG_TICK
            await asyncio.sleep(LAG_TICK)
            now = loop.time()
            self.beat = time.monotonic()
            self.lines.append(f"{self.beat:.6f} {max(now - due, 0.0):.6f}\n")
            if now - flushed > 0.25:
                self.flush()
                flushed = now


def watch_stacks(stalls: Stalls, path: str) -> None:
    """While the loop is late by more than STACK_AFTER, sample the main thread's stack
    every STACK_EVERY (SIGALRM) and append it, innermost frame first, to `path`: where
    the stretches that hold the loop are spent. A signal handler runs between two
    bytecodes, so a long call into C is charged to the line that made it. A diagnosis,
    not a measurement: the timer interrupts what it watches."""
    stalls.stacks_path = path

    def sample(signum: int, frame: Any) -> None:
        now = time.monotonic()
        if now - stalls.beat - LAG_TICK < STACK_AFTER:
            return
        names = []
        while frame is not None and len(names) < 14:
            code = frame.f_code
            names.append(f"{Path(code.co_filename).name}:{code.co_name}:{frame.f_lineno}")
            frame = frame.f_back
        stalls.stacks.append(f"{now:.6f} {' < '.join(names)}\n")  # no I/O in a handler

    signal.signal(signal.SIGALRM, sample)
    signal.setitimer(signal.ITIMER_REAL, STACK_EVERY, STACK_EVERY)


def replica_main(stalls_file: str) -> int:
    """`worker run`, its loop sampled: asyncio.run runs the sampler beside it."""
    from worker import cli

    stalls = Stalls(stalls_file)
    gc.callbacks.append(stalls.on_gc)
    if stacks := os.environ.get("BENCH_STACKS"):
        watch_stacks(stalls, stacks)
    plain_run = asyncio.run

    def run_sampled(main: Coroutine[Any, Any, int], **kwargs: Any) -> int:
        async def both() -> int:
            sampler = asyncio.create_task(stalls.sample(), name="bench-lag-sampler")
            try:
                return await main
            finally:
                sampler.cancel()

        return plain_run(both(), **kwargs)

    asyncio.run = run_sampled  # type: ignore[assignment]
    return cli.main(["run"])


# --- the bench ------------------------------------------------------------------------


@dataclass
class Probe:
    p50: float  # milliseconds
    p99: float
    max: float
    requests: int
    errors: int


@dataclass
class Window:
    healthz: Probe
    readyz: Probe
    lag: float  # worst loop lag, milliseconds
    gc: float  # longest garbage-collector pause, milliseconds
    load: float  # 1-minute load average at the start
    start: float = 0.0  # monotonic
    end: float = 0.0
    gc_passes: str = "none"  # the collector's passes by generation


@dataclass
class Sync:
    items: int
    seconds: float
    covered: bool  # still running when the probe window ended
    cpu: float = 0.0  # the replica's CPU seconds over the sync (probes answered included)

    @property
    def rate(self) -> float:
        return self.items / self.seconds

    @property
    def cpu_per_item(self) -> float:
        """Microseconds of the replica's CPU per item: less moved by other processes
        taking the cores than items/s is."""
        return self.cpu / self.items * 1e6


@dataclass
class Setup:
    base: str  # the replica's URL
    emag: str  # the sandbox's eMAG base URL
    ingest: Path  # bench/ingest.py of the measured tree
    key_prefix: str  # the replica's Redis keys
    script: Path
    stalls: Path
    seconds: float
    gap: int
    stacks: Path | None = None  # --stacks: where the replica samples its stalled stacks
    pid: int = 0  # the replica's

    def cpu(self) -> float:
        """The replica's CPU seconds so far (user + system, /proc/<pid>/stat)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


@contextmanager
def processes(args: argparse.Namespace, workdir: Path, key_prefix: str) -> Iterator[Setup]:
    """The sandbox and the replica, started and (on leaving) stopped."""
    import worker

    sandbox_port, replica_port = free_port(), free_port()
    jobs = workdir / "jobs.toml"
    jobs.write_text(JOBS.format(job=JOB, base=f"http://127.0.0.1:{sandbox_port}"))
    setup = Setup(
        f"http://127.0.0.1:{replica_port}",
        f"http://127.0.0.1:{sandbox_port}/emag/ro/api-3",
        Path(worker.__file__).resolve().parents[1] / "bench" / "ingest.py",
        key_prefix,
        workdir / "probe.lua",
        workdir / "stalls.txt",
        args.seconds,
        args.gap,
        workdir / "stacks.txt" if args.stacks else None,
    )
    setup.script.write_text(WRK_SCRIPT)
    setup.stalls.touch()
    env = {
        **os.environ,
        "DATABASE_URL": args.database_url,
        "REDIS_URL": args.redis_url,
        "WORKER_KEY_PREFIX": setup.key_prefix,
        "WORKER_ID": "probes",
        "WORKER_HTTP_HOST": "127.0.0.1",
        "WORKER_HTTP_PORT": str(replica_port),
        "WORKER_JOBS_FILE": str(jobs),
        "WORKER_API_KEY": API_KEY,
        "WORKER_LOG_FORMAT": "json",
        "WORKER_LOG_LEVEL": "WARNING",
        "BENCH_EMAG_USER": "main@example.com",
        "BENCH_EMAG_PASS": "main-secret",
    }
    if setup.stacks is not None:
        env["BENCH_STACKS"] = str(setup.stacks)
    sandbox_cmd = [sys.executable, "-m", "worker", "sandbox", "--port", str(sandbox_port)]
    procs = [
        subprocess.Popen(
            [*sandbox_cmd, "--rate", "0", "--emag-items", str(args.items)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    log_path = workdir / "replica.log"
    with log_path.open("wb") as log:
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--replica", str(setup.stalls)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        wait_port(sandbox_port, procs[0], "the sandbox")
        wait_port(replica_port, procs[1], "the replica")
        setup.pid = procs[1].pid
        yield setup
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if procs[1].returncode != 0:
            print(log_path.read_text(errors="replace")[-3000:])


async def forget_keys(redis_url: str, prefix: str) -> None:
    """Delete the replica's Redis keys (its lease's epoch outlives it otherwise)."""
    redis = Redis.from_url(redis_url)
    try:
        keys = [key async for key in redis.scan_iter(match=f"{prefix}*")]
        if keys:
            await redis.delete(*keys)
    finally:
        await redis.aclose()


async def wrk(url: str, setup: Setup) -> Probe:
    proc = await asyncio.create_subprocess_exec(
        WRK,
        "-t1",
        "-c1",
        f"-d{setup.seconds:g}s",
        "-s",
        str(setup.script),
        url,
        env={**os.environ, "PROBE_GAP_MS": str(setup.gap)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed: {err.decode()}")
    got = orjson.loads(next(ln for ln in out.decode().splitlines() if ln.startswith("{")))
    ms = {k: got[k] / 1000 for k in ("p50", "p99", "max")}
    return Probe(requests=got["requests"], errors=got["errors"], **ms)


def worst_stalls(path: Path, start: float, end: float) -> tuple[float, float, str]:
    """The worst loop lag and the longest collector pause in [start, end], ms, and
    the collector's passes by generation (count, longest)."""
    lag = pause = 0.0
    passes: dict[str, list[float]] = {}
    for line in path.read_text(encoding="ascii").splitlines():
        fields = line.split()
        if fields[0] == "gc":
            at, took = float(fields[1]), float(fields[2])
            if start <= at <= end:
                pause = max(pause, took)
                passes.setdefault(fields[3] if len(fields) > 3 else "?", []).append(took)
            continue
        at, late = float(fields[0]), float(fields[1])
        # A sample taken just after the window may report a stall that began inside it.
        if start <= at <= end + LAG_TICK:
            lag = max(lag, late)
    generations = ", ".join(
        f"gen{g} {len(t)}x (longest {max(t) * 1000:.1f} ms)" for g, t in sorted(passes.items())
    )
    return lag * 1000, pause * 1000, generations or "none"


async def window(setup: Setup) -> Window:
    """Both probes for `setup.seconds`, and the stalls of the loop meanwhile."""
    load = os.getloadavg()[0]
    start = time.monotonic()
    healthz, readyz = await asyncio.gather(
        wrk(f"{setup.base}/healthz", setup), wrk(f"{setup.base}/readyz", setup)
    )
    end = time.monotonic()
    await asyncio.sleep(0.4)  # the sampler writes its lines every 0.25 s
    lag, pause, passes = worst_stalls(setup.stalls, start, end)
    return Window(healthz, readyz, lag, pause, load, start, end, passes)


async def run_row(pool: asyncpg.Pool, run_id: int) -> asyncpg.Record:
    row: asyncpg.Record = await pool.fetchrow(
        "SELECT status, error, progress, stats,"
        " extract(epoch FROM finished_at - started_at)::float8 AS took FROM runs WHERE id = $1",
        run_id,
    )
    return row


async def wait_run(
    pool: asyncpg.Pool, run_id: int, until: Callable[[asyncpg.Record], bool], timeout: float
) -> asyncpg.Record:
    deadline = time.monotonic() + timeout
    while True:
        row = await run_row(pool, run_id)
        if until(row):
            return row
        if row["status"] not in ("queued", "running") or time.monotonic() > deadline:
            raise RuntimeError(f"run {run_id}: {row['status']} {row['error']}")
        await asyncio.sleep(0.02)


def committed_pages(row: asyncpg.Record) -> bool:
    progress = orjson.loads(row["progress"]) if row["progress"] else {}
    return row["status"] == "running" and bool(progress.get("done"))


async def sync_round(
    pool: asyncpg.Pool, http: aiohttp.ClientSession, setup: Setup
) -> tuple[Window, Sync]:
    """A sync of the whole catalogue, probed once its first pages are committed."""
    await pool.execute("TRUNCATE products, sync_seen")
    cpu = setup.cpu()
    url = f"{setup.base}/jobs/{JOB}/trigger"
    async with http.post(url, headers={"X-API-Key": API_KEY}) as answer:
        assert answer.status == 202, await answer.text()
        run_id = int((await answer.json())["run_id"])
    await wait_run(pool, run_id, committed_pages, timeout=60)
    probed = await window(setup)
    covered = (await run_row(pool, run_id))["status"] == "running"
    row = await wait_run(pool, run_id, lambda r: r["status"] == "succeeded", timeout=1800)
    cpu = setup.cpu() - cpu
    items = int(orjson.loads(row["stats"])["items"])
    return probed, Sync(items, row["took"], covered, cpu)


async def beside_round(beside_url: str, setup: Setup) -> tuple[Window, Sync]:
    """The same sync in another process (bench/ingest.py of the measured tree, into its
    own database), probing the idle replica meanwhile: what the machine leaves a probe
    whose loop is free while a sync loads its cores, the floor the `sync` figures chase."""
    conn = await asyncpg.connect(beside_url)
    try:
        await conn.execute("TRUNCATE products, sync_seen")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(setup.ingest),
            "--child",
            setup.emag,
            "--account",
            "beside",
            env={**os.environ, "BENCH_DATABASE_URL": beside_url},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not await conn.fetchval("SELECT count(*) > 0 FROM products"):
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the sync beside did not get going ({proc.returncode})")
            await asyncio.sleep(0.02)
    finally:
        await conn.close()
    probed = await window(setup)
    covered = proc.returncode is None
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the sync beside failed ({proc.returncode})")
    result = orjson.loads(out.splitlines()[-1])
    return probed, Sync(int(result["items"]), float(result["seconds"]), covered)


async def wait_leading(http: aiohttp.ClientSession, base: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        async with http.get(f"{base}/leader", headers={"X-API-Key": API_KEY}) as answer:
            if answer.status == 200 and (await answer.json()).get("self"):
                return
        if time.monotonic() > deadline:
            raise RuntimeError("the replica did not take the lease")
        await asyncio.sleep(0.1)


def show(name: str, w: Window) -> None:
    for path, p in (("/healthz", w.healthz), ("/readyz", w.readyz)):
        print(
            f"  {name:<6} {path:<8} p50 {p.p50:7.2f} ms  p99 {p.p99:7.2f} ms"
            f"  max {p.max:7.2f} ms  ({p.requests} requests, {p.errors} errors)"
        )
    print(
        f"  {name:<6} worst loop lag {w.lag:7.2f} ms  (longest gc pause {w.gc:6.2f} ms,"
        f" load {w.load:.2f})\n  {name:<6} gc passes: {w.gc_passes}"
    )


PERCENTILES = ("p50", "p99", "max")


def show_medians(name: str, windows: list[Window]) -> None:
    for path in ("healthz", "readyz"):
        probes = [getattr(w, path) for w in windows]
        p50, p99, top = (statistics.median(getattr(p, k) for p in probes) for k in PERCENTILES)
        print(f"{name:<6} /{path:<7} p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  max {top:7.2f} ms")
    lag = statistics.median(w.lag for w in windows)
    pause = statistics.median(w.gc for w in windows)
    print(f"{name:<6} worst loop lag {lag:7.2f} ms  (longest gc pause {pause:6.2f} ms)")


def show_stacks(path: Path, windows: list[Window], top: int = 15) -> None:
    """The stacks most often sampled while the loop was late, in the sync windows."""
    seen: Counter[str] = Counter()
    for line in path.read_text(encoding="utf-8").splitlines():
        at, stack = line.split(" ", 1)
        if any(w.start <= float(at) <= w.end for w in windows):
            # From the innermost frame out to the task's own coroutine.
            seen[stack.split(" < base_events.py:")[0].split(" < events.py:_run")[0]] += 1
    total = sum(seen.values())
    print(f"\nstacks sampled while the loop was late during the syncs ({total} samples):")
    for stack, n in seen.most_common(top):
        print(f"{n:6d} {n / total:6.1%}  {stack}")


@dataclass
class Rounds:
    idle: list[Window] = field(default_factory=list)
    beside: list[Window] = field(default_factory=list)
    busy: list[Window] = field(default_factory=list)
    elsewhere: list[Sync] = field(default_factory=list)  # the syncs beside
    syncs: list[Sync] = field(default_factory=list)  # the replica's own


def show_sync(name: str, sync: Sync) -> None:
    late = "" if sync.covered else "  (ENDED BEFORE THE WINDOW DID: raise --items)"
    took = f"{sync.items} items in {sync.seconds:.2f} s"
    cpu = f", {sync.cpu_per_item:.1f} µs of the replica's CPU per item" if sync.cpu else ""
    print(f"  {name:<6} {took}: {sync.rate:,.0f} items/s{cpu}{late}", flush=True)


async def bench(args: argparse.Namespace, setup: Setup, beside_url: str) -> Rounds:
    rounds = Rounds()
    pool = await asyncpg.create_pool(args.database_url, min_size=1, max_size=2)
    async with pool, aiohttp.ClientSession() as http:
        await wait_leading(http, setup.base)
        for n in range(1, args.rounds + 1):
            print(f"round {n}:", flush=True)
            rounds.idle.append(await window(setup))
            show("idle", rounds.idle[-1])
            probed, sync = await beside_round(beside_url, setup)
            rounds.beside.append(probed)
            rounds.elsewhere.append(sync)
            show("beside", probed)
            show_sync("beside", sync)
            probed, sync = await sync_round(pool, http, setup)
            rounds.busy.append(probed)
            rounds.syncs.append(sync)
            show("sync", probed)
            show_sync("sync", sync)
    return rounds


async def main(args: argparse.Namespace) -> int:
    import worker
    from worker import db

    print(f"worker package: {Path(worker.__file__).parent}")
    beside_url = f"{args.database_url}_beside"
    for url in (args.database_url, beside_url):
        await db.create_database_if_missing(url)
    conn = await asyncpg.connect(beside_url)
    try:
        await db.migrate(conn)
    finally:
        await conn.close()
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    try:
        with tempfile.TemporaryDirectory() as tmp, processes(args, Path(tmp), prefix) as setup:
            rounds = await bench(args, setup, beside_url)
            if setup.stacks is not None:
                show_stacks(setup.stacks, rounds.busy)
    finally:
        await forget_keys(args.redis_url, prefix)  # the replica has stopped
    print(
        f"\nmedian of {args.rounds} rounds ({args.items} offers; wrk -c1 per path, a request"
        f" every {args.gap} ms, {args.seconds:g} s windows):"
    )
    show_medians("idle", rounds.idle)
    show_medians("beside", rounds.beside)
    show_medians("sync", rounds.busy)
    for name, syncs in (("beside", rounds.elsewhere), ("sync", rounds.syncs)):
        rate = statistics.median(s.rate for s in syncs)
        print(f"{name:<6} throughput {rate:,.0f} items/s")
    per_item = statistics.median(s.cpu_per_item for s in rounds.syncs)
    print(f"sync   replica CPU {per_item:.1f} µs per item")
    p99 = statistics.median(w.healthz.p99 for w in rounds.busy)
    floor = statistics.median(w.healthz.p99 for w in rounds.beside)
    lag = statistics.median(w.lag for w in rounds.busy)
    print(
        f"targets during the sync: /healthz p99 <= 10 ms: {'met' if p99 <= 10 else 'MISSED'}"
        f" ({p99:.2f} ms; {floor:.2f} ms with the same sync in another process);"
        f" loop lag <= 20 ms: {'met' if lag <= 20 else 'MISSED'} ({lag:.2f} ms)"
    )
    if not all(s.covered for s in rounds.syncs + rounds.elsewhere):
        print("WARNING: a sync ended before its probe window did: raise --items")
    return 0


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000, help="offers in the catalogue")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="each probe window")
    parser.add_argument("--gap", type=int, default=5, help="ms between probes, per path")
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1/worker_probes"
        ),
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument(
        "--stacks",
        action="store_true",
        help="sample the replica's stack while its loop is late (a diagnosis: it slows it)",
    )
    parser.add_argument("--replica", metavar="STALLS_FILE", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    parsed = arguments()
    if parsed.replica:
        sys.exit(replica_main(parsed.replica))
    sys.exit(asyncio.run(main(parsed)))
