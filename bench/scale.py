"""Scheduler scale: N `http` jobs coming due in the same second, on one real replica.

Each job (one per seller account, say) calls a local receiver (an aiohttp server in
this process) every `--period` seconds, rate limit lifted, misfire = "all" with a one
hour grace and overlap = "allow", so every slot is owed and must run exactly once. For
each N it prints: how long the replica takes to be ready (/readyz) and to know all N
jobs (their `job_state` rows, written by its first tick); then, over `--rounds` slots,
the slots run against those due, duplicates, how late each run started after its slot
(the ledger's `started_at`, and when its request reached the receiver: p50/p99/max),
and the leader's CPU (from /proc). In the same run it measures the limits they chase:
one bare `INSERT … SELECT FROM unnest` of N run rows in one statement (claiming the
slots), and N bare GETs to the receiver from one aiohttp session (the runs' requests).

    .venv/bin/python bench/scale.py --jobs 1000 5000 10000 [--repeat 1] [--period 30]

The replica runs the tree this file is in (its `worker` package), so a copy of this
file in another work tree measures that tree.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.cluster import free_port
from worker import db

ROOT = Path(__file__).resolve().parents[1]

ADMIN = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1/postgres")
DATABASE = "worker_bench_scale"
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CLK_TCK = os.sysconf("SC_CLK_TCK")

JOB = """
[[jobs]]
name = "acct-{i:05d}"
kind = "http"
schedule = "*/{period} * * * * *"
misfire = "all"
misfire_grace = "1h"
overlap = "allow"
timeout = "60s"
[jobs.params]
url = "{url}?account={i}"
rate_limit = 0
"""


class Receiver:
    """The system the jobs call: records (job, slot) and the wall-clock arrival."""

    def __init__(self) -> None:
        self.hits: list[tuple[str, str, float]] = []
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        h = request.headers
        self.hits.append((h.get("X-Worker-Job", ""), h.get("X-Worker-Slot", ""), time.time()))
        return web.Response(text="ok")

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_get("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=4096).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat, utime and stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


@dataclass
class Figures:
    jobs: int
    ready: float = 0.0
    known: float = 0.0
    due: int = 0
    ran: int = 0
    missed: int = 0
    duplicates: int = 0
    started: list[float] = field(default_factory=list)  # started_at - slot, seconds
    arrived: list[float] = field(default_factory=list)  # receiver arrival - slot
    cpu: float = 0.0  # share of one core over the measured rounds
    insert_limit: float = 0.0  # one bare INSERT of N run rows
    http_limit: float = 0.0  # N bare GETs to the receiver
    per_slot: list[tuple[str, float, int]] = field(default_factory=list)  # first start, runs

    @property
    def lost(self) -> int:
        return self.due - self.ran - self.missed


async def fresh_database() -> str:
    admin = await asyncpg.connect(ADMIN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await admin.close()
    url = ADMIN.rsplit("/", 1)[0] + "/" + DATABASE
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
    finally:
        await conn.close()
    return url


def start_replica(
    workdir: Path, database_url: str, jobs_file: Path, n: int
) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": database_url,
        "REDIS_URL": REDIS_URL,
        "WORKER_KEY_PREFIX": f"bench:{uuid.uuid4().hex[:8]}:",
        "WORKER_ID": "scale-0",
        "WORKER_HTTP_HOST": "127.0.0.1",
        "WORKER_HTTP_PORT": str(port),
        "WORKER_JOBS_FILE": str(jobs_file),
        "WORKER_API_KEY": "bench",
        "WORKER_LOG_FORMAT": "json",
        "WORKER_LOG_LEVEL": "WARNING",
        "WORKER_MAX_RUNS": str(2 * n + 100),
        "WORKER_SHUTDOWN_GRACE": "10",
    }
    log = workdir / "replica.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, f"http://127.0.0.1:{port}", log


async def wait_until(predicate: object, *, timeout: float, what: str, log: Path) -> float:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()  # type: ignore[operator]
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.time()
        if time.monotonic() > deadline:
            tail = log.read_bytes()[-2000:].decode(errors="replace")  # noqa: ASYNC240
            raise TimeoutError(f"{what} not within {timeout:.0f}s:\n{tail}")
        await asyncio.sleep(0.02)


async def bare_insert(url: str, n: int) -> float:
    """The floor of claiming N slots: one INSERT of N run rows, in an empty copy of runs."""
    conn = await asyncpg.connect(url)
    took = []
    try:
        for _ in range(3):
            await conn.execute("DROP TABLE IF EXISTS runs_floor")
            await conn.execute("CREATE TABLE runs_floor (LIKE runs INCLUDING ALL)")
            jobs = [f"acct-{i:05d}" for i in range(n)]
            slot = datetime.now(UTC).replace(microsecond=0)
            began = time.perf_counter()
            await conn.fetch(
                "INSERT INTO runs_floor (job, kind, slot, trigger, status, token, params,"
                " worker_id, started_at, heartbeat_at)"
                " SELECT j, 'http', $2, 'schedule', 'running', 1, '{}', 'w', now(), now()"
                " FROM unnest($1::text[]) j ON CONFLICT (job, slot) DO NOTHING RETURNING *",
                jobs,
                slot,
            )
            took.append(time.perf_counter() - began)
        await conn.execute("DROP TABLE runs_floor")
    finally:
        await conn.close()
    return statistics.median(took)


BARE_GETS = """
import asyncio, sys, time
import aiohttp

async def main(url: str, n: int) -> None:
    async with aiohttp.ClientSession() as http:
        async def get(i: int) -> None:
            async with http.get(url, params={"account": str(i)}) as resp:
                await resp.read()
        began = time.perf_counter()
        await asyncio.gather(*(get(i) for i in range(n)))
        print(time.perf_counter() - began)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def bare_http(url: str, n: int) -> float:
    """The floor of N runs reaching the receiver: N bare GETs from one aiohttp session
    in another process (its default 100 connections, as the worker's), no database."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", BARE_GETS, url, str(n), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return float(out.decode().strip())


async def trial(n: int, *, period: int, rounds: int) -> Figures:
    figures = Figures(jobs=n)
    url = await fresh_database()
    async with Receiver() as receiver, aiohttp.ClientSession() as http:
        with tempfile.TemporaryDirectory() as tmp:
            jobs_file = Path(tmp) / "jobs.toml"
            jobs_file.write_text(
                "".join(JOB.format(i=i, period=period, url=receiver.url) for i in range(n))
            )
            began = time.time()
            proc, base, log = start_replica(Path(tmp), url, jobs_file, n)
            pool = await asyncpg.connect(url)
            try:

                async def ready() -> bool:
                    if proc.poll() is not None:
                        raise RuntimeError(log.read_text(errors="replace")[-3000:])
                    try:
                        async with http.get(f"{base}/readyz") as resp:
                            return resp.status == 200
                    except aiohttp.ClientError:
                        return False

                async def known() -> bool:
                    return bool(await pool.fetchval("SELECT count(*) FROM job_state") >= n)

                figures.ready = await wait_until(ready, timeout=120, what="ready", log=log) - began
                figures.known = await wait_until(known, timeout=600, what="known", log=log) - began
                # The measured slots: `rounds` slots from the first one a second away.
                first = datetime.fromtimestamp(time.time() + 1.0, UTC).replace(microsecond=0)
                first += timedelta(seconds=-first.second % period)
                slots = [first + timedelta(seconds=period * k) for k in range(rounds)]
                end = slots[-1] + timedelta(seconds=period)
                await asyncio.sleep(max(0.0, first.timestamp() - 0.5 - time.time()))
                cpu0, wall0 = cpu_seconds(proc.pid), time.time()
                await asyncio.sleep(max(0.0, end.timestamp() - 0.5 - time.time()))
                figures.cpu = (cpu_seconds(proc.pid) - cpu0) / (time.time() - wall0)
                figures.due = n * rounds
                wanted = {s.isoformat() for s in slots}

                def arrived() -> int:
                    return len({(j, s) for j, s, _ in receiver.hits if s in wanted})

                # Late runs may still be coming: wait until all arrive or none for 10 s.
                last, quiet = -1, time.monotonic()
                while arrived() < figures.due and time.monotonic() - quiet < 10:
                    if arrived() != last:
                        last, quiet = arrived(), time.monotonic()
                    await asyncio.sleep(0.2)
                rows = await pool.fetch(
                    "SELECT job, slot, status,"
                    " extract(epoch FROM started_at - slot)::float8 AS late"
                    " FROM runs WHERE slot = ANY($1::timestamptz[])",
                    slots,
                )
            finally:
                await pool.close()
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        figures.http_limit = await bare_http(receiver.url, n)
    hits = [(j, s, at) for j, s, at in receiver.hits if s in wanted]
    seen = {(j, s) for j, s, _ in hits}
    figures.ran = len(seen)
    figures.duplicates = len(hits) - len(seen)
    figures.missed = sum(r["status"] == "missed" for r in rows)
    figures.started = [r["late"] for r in rows if r["late"] is not None]
    for slot in slots:
        late = [r["late"] for r in rows if r["slot"] == slot and r["late"] is not None]
        figures.per_slot.append((slot.strftime("%H:%M:%S"), min(late, default=0), len(late)))
    figures.arrived = [at - datetime.fromisoformat(s).timestamp() for _, s, at in hits]
    figures.insert_limit = await bare_insert(url, n)
    return figures


def show(f: Figures) -> None:
    s, a = f.started, f.arrived
    print(
        f"N={f.jobs:>5}  ready {f.ready:5.2f}s  all jobs known {f.known:6.2f}s  "
        f"ran {f.ran}/{f.due} (missed {f.missed}, lost {f.lost}, duplicates {f.duplicates})\n"
        f"         started after slot  p50 {pct(s, 0.5):6.3f}s  p99 {pct(s, 0.99):6.3f}s"
        f"  max {max(s, default=0):6.3f}s\n"
        f"         reached receiver    p50 {pct(a, 0.5):6.3f}s  p99 {pct(a, 0.99):6.3f}s"
        f"  max {max(a, default=0):6.3f}s\n"
        f"         per slot (first start, runs): "
        + ", ".join(f"{t} +{late:.3f}s {n}" for t, late, n in f.per_slot)
        + "\n"
        f"         leader CPU {f.cpu:6.1%} of a core\n"
        f"         limits: one INSERT of {f.jobs} rows {f.insert_limit:.3f}s"
        f" (started p99 / it = {pct(s, 0.99) / f.insert_limit:.1f}x);"
        f" {f.jobs} bare GETs {f.http_limit:.3f}s (reached p99 / it ="
        f" {pct(a, 0.99) / f.http_limit:.1f}x)",
        flush=True,
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--period", type=int, default=30, help="seconds between slots")
    parser.add_argument("--rounds", type=int, default=2, help="slots measured per trial")
    args = parser.parse_args()
    print(
        f"tree {Path(db.__file__).parents[1]}, {args.rounds} slot(s) of every"
        f" {args.period}s measured per trial"
    )
    results: dict[int, list[Figures]] = {}
    for n in args.jobs:
        for _ in range(args.repeat):
            figures = await trial(n, period=args.period, rounds=args.rounds)
            show(figures)
            results.setdefault(n, []).append(figures)
    print("\nmedians over the trials")
    for n, trials in results.items():
        p99 = statistics.median(pct(f.started, 0.99) for f in trials)
        arrived = statistics.median(pct(f.arrived, 0.99) for f in trials)
        limit = statistics.median(f.insert_limit for f in trials)
        http = statistics.median(f.http_limit for f in trials)
        print(
            f"N={n:>5}  started p99 {p99:6.3f}s  reached p99 {arrived:6.3f}s  "
            f"CPU {statistics.median(f.cpu for f in trials):6.1%}  "
            f"ready {statistics.median(f.ready for f in trials):5.2f}s  "
            f"known {statistics.median(f.known for f in trials):6.2f}s  "
            f"lost {sum(f.lost for f in trials)}  duplicates {sum(f.duplicates for f in trials)}  "
            f"INSERT limit {limit:.3f}s ({p99 / limit:.1f}x)  "
            f"GET limit {http:.3f}s ({arrived / http:.1f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
