"""Soak: three real `worker run` replicas for `--minutes` under leader kills and SIGTERMs.

Jobs: `tick`, an `http` job every second against a local receiver that records the
slot of every call (overlap allow, misfire skip, grace `--grace`, 15 s: a normal
failover, one lease TTL, misses nothing); `emag-main`, an `emag.offers` sync every
minute of a sandbox catalogue of `--items` offers at eMAG's 3 requests/s, limited on
both sides as in production (9 000 offers: 91 requests, about half the minute), with a
few prices changed, offers added and offers removed every minute.

Replicas: r0, r1, r2. r0 is the *anchor*: it is started first (it leads the warm-up and
the first full import) and is never killed or restarted, so its memory and file
descriptors cover the whole soak, through terms it gains and loses. Every `--every`
seconds (30-90 by default; 10-25 when `--minutes` < 5) the current leader gets:
  - r1 or r2 (any incarnation): SIGKILL or SIGTERM, in turn, and a fresh replacement
    (`r1-2`, `r1-3`, ...) is started at once, as Kubernetes would;
  - r0: a freeze instead (SIGSTOP for TTL + 2 s, then SIGCONT): it loses its lease,
    a follower takes over, and r0 wakes fenced and goes on as a follower. The anchor
    may not be restarted, and without losing its terms it would lead to the end.
Killed replicas' replacements start fresh: their memory is printed separately and
not held to the limits.

After the chaos: no more events or catalogue changes; the soak waits for two passes
of the sync that start after it (an offer removed is marked gone after two passes
that do not list it), compares the products table with the sandbox catalogue, then
reads the ledger, the receiver, `leader_terms` and the replicas' /proc.

Exits 1 if a slot ran twice (receiver calls or ledger rows per slot), a slot was
missed that no failover longer than the grace explains, the products differ from the
catalogue, or a replica that ran the whole soak grew by more than `--max-rss-mb`
(10 MB) or `--max-fds` (5) fds. The fds are counted by kind (/proc/<pid>/fd against
/proc/<pid>/net/tcp): pooled client connections (Postgres, the upstream HTTP session's
to the receiver and the sandbox) come and go with the leadership and the pools, so
they are held to the pools' bounds (`POOLED`), and the growth limit applies to the
other fds. A fresh database (`worker migrate --create-db`) and Redis key prefix; both
are dropped at the end, and every process started is stopped, also on Ctrl-C or
failure.

    .venv/bin/python bench/soak.py [--minutes 10] [--items 9000] [--ttl 2] [--seed N]
    .venv/bin/python bench/soak.py --minutes 1      # a short try, about 4 minutes in all
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import orjson
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.cluster import Cluster, Receiver, Replica, current_holder, free_port
from worker.sandbox import SANDBOX, Sandbox, SandboxConfig, build_app

JOBS = """
[[jobs]]
name = "tick"
kind = "http"
schedule = "* * * * * *"
misfire = "skip"
misfire_grace = "{grace}s"
overlap = "allow"
timeout = "10s"
[jobs.params]
url = "{hook}"

[[jobs]]
name = "emag-main"
kind = "emag.offers"
schedule = "* * * * *"
misfire = "latest"
misfire_grace = "60s"
overlap = "forbid"
timeout = "5m"
[jobs.params]
account = "main"
platform = "ro"
base_url = "{base}/emag/ro/api-3"
username_env = "T_EMAG_USER"
password_env = "T_EMAG_PASS"
mark_gone = true
"""

ANCHOR = "r0"
SLOTS = ("r0", "r1", "r2")
WATCH_STEP = 0.02  # how often the lease is read
SAMPLE_EVERY = 5.0  # how often each replica's /proc is read
POOL_MAX = 10  # a replica's Postgres pool (worker/db.py open_pool max_size)
# Pooled client connections and the most of each a replica may hold: the Postgres pool
# plus the leader's LISTEN connection; the upstream session's keep-alive connections to
# one host (the rate limiter lets 3 calls be in flight; idle ones close after 15 s).
POOLED = {"postgres": POOL_MAX + 1, "receiver": 6, "sandbox": 6}
SETTLED = 20.0  # a tick slot older than this (grace + margin) has been decided


# -- what the soak records ------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """The lease as the watcher saw it from `at` (monotonic) on."""

    at: float
    holder: str | None
    token: int | None


@dataclass
class Event:
    """One thing done to the leader."""

    n: int
    action: str  # kill | term | freeze
    victim: str
    token: int
    at: float  # monotonic
    wall: float
    replacement: str | None = None
    exit_code: int | None = None
    exit_after: float | None = None


@dataclass(frozen=True)
class Usage:
    at: float
    rss_kb: int
    fds: int
    leading: bool
    kinds: dict[str, int]  # the fds by what they are (see `fd_kinds`)

    @property
    def unpooled(self) -> int:
        """Fds other than pooled client connections (Postgres, the upstream HTTP
        connector's to the receiver and the sandbox): those come and go with the pools
        and the leadership, and are held to the pools' bounds instead."""
        return self.fds - sum(self.kinds.get(k, 0) for k in POOLED)


@dataclass
class Life:
    """One incarnation of a replica slot: r1, then r1-2 after a kill, ..."""

    replica: Replica
    started: float
    ended: float | None = None
    samples: list[Usage] = field(default_factory=list)


def proc_rss_kb(pid: int) -> int | None:
    """VmRSS from /proc/<pid>/status; None once the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None  # a zombie: it has no memory left to report


def tcp_sockets() -> dict[str, tuple[int, int, str]]:
    """Socket inode -> (local port, remote port, state), from /proc/net/tcp{,6}: the
    replicas share this process's network namespace. The kernel walks every socket to
    write these files (some 7 ms here), so they are read once per round."""
    found = {}
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
                f = line.split()
                local, remote = int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16)
                found[f[9]] = (local, remote, f[3])
    return found


def fd_kinds(
    pid: int, own_port: int, peers: dict[int, str], sockets: dict[str, tuple[int, int, str]]
) -> dict[str, int] | None:
    """The process's open fds by what they are: `postgres`, `redis`, `receiver` and
    `sandbox` connections (by the remote port), `api` (its listening socket and
    accepted connections), other sockets (the event loop's self-pipe), files, ..."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    kinds: Counter[str] = Counter()
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            tcp = sockets.get(target[8:-1])
            if tcp is None:
                kinds["unix/other socket"] += 1
            elif tcp[0] == own_port:
                kinds["api"] += 1
            else:
                kinds[peers.get(tcp[1], f"tcp:{tcp[1]}")] += 1
        elif target.startswith(("pipe:", "anon_inode:")):
            kinds[target.split(":")[0]] += 1
        else:
            kinds["file"] += 1
    return dict(kinds)


def read_usage(
    procs: list[tuple[str, int, int]], peers: dict[int, str]
) -> dict[str, tuple[int, dict[str, int]]]:
    """worker id -> (VmRSS kB, fds by kind) for each (worker id, pid, API port)."""
    sockets = tcp_sockets()
    found = {}
    for wid, pid, port in procs:
        rss = proc_rss_kb(pid)
        kinds = fd_kinds(pid, port, peers, sockets)
        if rss is not None and kinds is not None:
            found[wid] = (rss, kinds)
    return found


class LeaderWatch:
    """Reads the lease every WATCH_STEP and keeps every change. It also keeps this
    process's event-loop stalls (a sleep that overran by more than 10 ms): the sandbox
    runs on this loop and records a request's arrival when its handler runs."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis, self.prefix = redis, prefix
        self.seen: list[Seen] = []
        self.stalls: list[tuple[float, float]] = []  # (when it ended, seconds late)

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set. Not stopped by a cancel alone: on Python 3.11 a cancel
        that lands while redis-py sends a command can be lost (`asyncio.wait_for` in
        `Connection.send_packed_command` returns the finished send and drops the
        CancelledError), and the first soak's clean-up hung on this task for an hour."""
        while not stop.is_set():
            try:
                got = await current_holder(self.redis, self.prefix)
            except RedisError:
                got = None
            holder, token = got if got is not None else (None, None)
            if not self.seen or (self.seen[-1].holder, self.seen[-1].token) != (holder, token):
                self.seen.append(Seen(time.monotonic(), holder, token))
            before = time.monotonic()
            await asyncio.sleep(WATCH_STEP)
            late = time.monotonic() - before - WATCH_STEP
            if late > 0.01:
                self.stalls.append((before + WATCH_STEP + late, late))

    @property
    def now(self) -> Seen:
        return self.seen[-1] if self.seen else Seen(0.0, None, None)

    def first_after(self, at: float, *, not_token: int) -> Seen | None:
        return next(
            (s for s in self.seen if s.at >= at and s.token is not None and s.token != not_token),
            None,
        )


@dataclass
class Soak:
    args: argparse.Namespace
    cluster: Cluster
    receiver: Receiver
    sandbox: Sandbox
    pool: asyncpg.Pool
    watch: LeaderWatch
    rng: random.Random
    peers: dict[int, str]  # remote port -> what it is, for `fd_kinds`
    lives: dict[str, Life] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    generation: Counter[str] = field(default_factory=Counter)
    mutations: Counter[str] = field(default_factory=Counter)
    loads: list[tuple[float, float, float]] = field(default_factory=list)
    began: float = 0.0
    begin_wall: float = 0.0
    measured_at: float = 0.0
    chaos_end: float = 0.0
    chaos_end_wall: float = 0.0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self, slot: str) -> Replica:
        self.generation[slot] += 1
        n = self.generation[slot]
        replica = self.cluster.start(slot if n == 1 else f"{slot}-{n}")
        self.lives[replica.worker_id] = Life(replica, time.monotonic())
        return replica

    def elapsed(self, at: float | None = None) -> float:
        return (time.monotonic() if at is None else at) - self.began

    def background(self, coro: Any, name: str) -> None:
        self.tasks.append(asyncio.create_task(coro, name=name))

    async def sample_forever(self) -> None:
        while not self.stop.is_set():
            await self.sample()
            await asyncio.sleep(SAMPLE_EVERY)

    async def sample(self) -> None:
        """Read each live replica's /proc, in a thread: this loop also serves the
        sandbox, which counts a request's arrival when its handler runs, so a stall here
        would bunch arrivals and earn 429s that the worker did not cause."""
        leader, now = self.watch.now.holder, time.monotonic()
        procs = []
        for wid, life in self.lives.items():
            if life.ended is None and life.replica.proc.poll() is not None:
                life.ended = now
            if life.ended is None:
                procs.append((wid, life.replica.proc.pid, life.replica.port))
        for wid, (rss, kinds) in (await asyncio.to_thread(read_usage, procs, self.peers)).items():
            usage = Usage(now, rss, sum(kinds.values()), leader == wid, kinds)
            self.lives[wid].samples.append(usage)


# -- set-up and tear-down -------------------------------------------------------------


async def migrate(dsn: str) -> None:
    """`worker migrate --create-db` on the fresh database."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "migrate",
        "--create-db",
        env={**os.environ, "DATABASE_URL": dsn},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"worker migrate --create-db failed:\n{out.decode(errors='replace')}")


async def drop_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def delete_keys(redis: Redis, prefix: str) -> None:
    keys = [key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)]
    if keys:
        await redis.delete(*keys)


@contextlib.asynccontextmanager
async def sandbox(items: int) -> AsyncIterator[tuple[web.Application, str]]:
    """The sandbox marketplace at eMAG's 3 requests/s: (app, base URL)."""
    app = build_app(SandboxConfig(emag_items=items, rate=3))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield app, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def stop_everything(cluster: Cluster) -> None:
    """SIGTERM (after SIGCONT) every live replica while the receiver and the sandbox
    still answer, then kill what is left: also when this wait is cancelled (Ctrl-C)."""
    try:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(cluster.stop_gracefully(timeout=15), 20)
    finally:
        cluster.stop_all()
        for r in cluster.replicas:
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()


async def stop_tasks(tasks: list[asyncio.Task[None]], stop: asyncio.Event | None = None) -> None:
    """Set `stop`, cancel, and wait a bounded time: a task that lost its cancel (see
    `LeaderWatch.run`) ends at its next look at `stop`, and none can hold the exit."""
    if stop is not None:
        stop.set()
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=5)


# -- the phases -----------------------------------------------------------------------


async def wait_for(what: str, timeout: float, check: Any, step: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        await asyncio.sleep(step)


async def start_cluster(s: Soak) -> None:
    """The anchor first (it leads the warm-up), then the other two."""
    anchor = s.start(ANCHOR)
    await s.cluster.wait_ready(anchor, timeout=60)

    async def anchor_leads() -> bool:
        return s.watch.now.holder == ANCHOR

    await wait_for("the anchor leading", 30, anchor_leads)
    others = [s.start(slot) for slot in SLOTS if slot != ANCHOR]
    await asyncio.gather(*(s.cluster.wait_ready(r, timeout=60) for r in others))


async def warm_up(s: Soak) -> None:
    """A first full import of the catalogue (triggered now, not at the next minute),
    then at least `--warmup` seconds since the start; then the 'start' figures."""
    leader = s.cluster.by_id(ANCHOR)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{leader.url}/jobs/emag-main/trigger", headers={"X-API-Key": s.cluster.api_key}
        ) as resp,
    ):
        if resp.status != 202:
            raise RuntimeError(f"trigger answered {resp.status}: {await resp.text()}")

    async def imported() -> bool:
        return bool(
            await s.pool.fetchval(
                "SELECT count(*) FROM runs WHERE job = 'emag-main' AND status = 'succeeded'"
            )
        )

    await wait_for("the first import", 240, imported, step=0.5)
    await asyncio.sleep(max(0.0, s.args.warmup - s.elapsed()))
    await s.sample()
    s.measured_at = time.monotonic()


async def chaos(s: Soak, until: float) -> None:
    """Until `until`: hit the leader at random intervals. Kills and SIGTERMs alternate
    (the first one drawn at random), so every soak has both."""
    lo, hi = s.args.every
    signals = ["kill", "term"]
    s.rng.shuffle(signals)
    hits = itertools.cycle(signals)
    while True:
        pause = s.rng.uniform(lo, hi)
        if time.monotonic() + pause > until:
            return
        await asyncio.sleep(pause)
        victim = await live_leader(s)
        seen = s.watch.now
        assert seen.token is not None
        action = "freeze" if victim.worker_id == ANCHOR else next(hits)
        event = Event(len(s.events) + 1, action, victim.worker_id, seen.token, 0.0, 0.0)
        s.events.append(event)
        pid = victim.proc.pid
        event.at, event.wall = time.monotonic(), time.time()
        if action == "freeze":
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(s.args.ttl + 2.0)
            finally:
                os.kill(pid, signal.SIGCONT)
        else:
            os.kill(pid, signal.SIGKILL if action == "kill" else signal.SIGTERM)
            replacement = s.start(victim.worker_id.split("-")[0])
            event.replacement = replacement.worker_id
            s.background(reap_and_ready(s, victim, replacement, event), f"replace-{event.n}")
        print(
            f"[{clock(s.elapsed(event.at))}] event {event.n}: {action} {victim.worker_id} "
            f"(token {event.token})"
            + (f", started {event.replacement}" if event.replacement else ""),
            flush=True,
        )


async def live_leader(s: Soak) -> Replica:
    """The replica holding the lease, alive (not a dead one whose lease still runs)."""

    async def found() -> Replica | None:
        holder = s.watch.now.holder
        if holder is None:
            return None
        replica = s.cluster.by_id(holder)
        return replica if replica.proc.poll() is None else None

    replica: Replica = await wait_for("a live leader", 60, found, step=WATCH_STEP)
    return replica


async def reap_and_ready(s: Soak, old: Replica, new: Replica, event: Event) -> None:
    async def exited() -> bool:
        return old.proc.poll() is not None

    with contextlib.suppress(TimeoutError):
        await wait_for(f"{old.worker_id} exiting", 30, exited, step=0.02)
    event.exit_code = old.proc.poll()
    event.exit_after = time.monotonic() - event.at
    s.lives[old.worker_id].ended = time.monotonic()
    try:
        await s.cluster.wait_ready(new, timeout=60)
    except (RuntimeError, TimeoutError) as exc:
        print(f"replacement {new.worker_id} did not come up: {exc}", flush=True)


async def mutate_forever(s: Soak) -> None:
    """Once a minute, at a random moment of it: 20 prices changed, 5 offers added and 5
    removed (a generator of its own, so the events' draws do not shift these)."""
    items = s.args.items
    rng = random.Random(s.args.seed + 1)
    while True:
        moment = rng.uniform(0, 60)
        await asyncio.sleep(moment)
        apply_changes(s, rng, items)
        await asyncio.sleep(60 - moment)


def apply_changes(s: Soak, rng: random.Random, items: int) -> None:
    catalog = s.sandbox.catalog
    for what, n in (("price", 20), ("remove", 5)):
        done = 0
        while done < n:
            offer = rng.randint(1, items)
            try:
                if what == "price":
                    catalog.set_emag_price("ro", "main", offer, round(rng.uniform(10, 2500), 2))
                else:
                    catalog.remove_emag_offer("ro", "main", offer)
            except LookupError:  # removed earlier
                continue
            done += 1
        s.mutations[what] += n
    for _ in range(5):
        catalog.add_emag_offer("ro", "main")
    s.mutations["add"] += 5


async def progress_forever(s: Soak) -> None:
    while True:
        await asyncio.sleep(60)
        s.loads.append(os.getloadavg())
        seen = s.watch.now
        ok = await s.pool.fetchval(
            "SELECT count(*) FROM runs WHERE job = 'emag-main' AND status = 'succeeded'"
        )
        anchor = s.lives[ANCHOR].samples[-1] if s.lives[ANCHOR].samples else None
        print(
            f"[{clock(s.elapsed())}] leader {seen.holder} (token {seen.token}), "
            f"{len(s.events)} events, {len(s.receiver.hits)} receiver calls, {ok} syncs done, "
            + (f"r0 {anchor.rss_kb / 1024:.1f} MB {anchor.fds} fds, " if anchor else "")
            + f"load {s.loads[-1][0]:.2f}",
            flush=True,
        )


async def final_passes(s: Soak, timeout: float) -> int:
    """Wait for two passes of the sync that start after the chaos to succeed."""

    async def passes() -> int:
        return int(
            await s.pool.fetchval(
                "SELECT count(*) FROM runs WHERE job = 'emag-main' AND status = 'succeeded'"
                " AND trigger = 'schedule' AND created_at > to_timestamp($1)",
                s.chaos_end_wall,
            )
        )

    with contextlib.suppress(TimeoutError):
        await wait_for("two passes after the chaos", timeout, lambda: _at_least(passes, 2), 1.0)
    return await passes()


async def _at_least(count: Any, n: int) -> bool:
    return bool(await count() >= n)


# -- the figures ----------------------------------------------------------------------


def clock(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{seconds % 60:04.1f}"


def mb(kb: float) -> str:
    return f"{kb / 1024:.1f} MB"


def epoch(value: datetime) -> float:
    return value.replace(tzinfo=value.tzinfo or UTC).timestamp()


@dataclass
class Checks:
    items: list[tuple[str, bool, str]] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.items.append((name, ok, detail))

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.items)


async def report_leaders(s: Soak) -> list[dict[str, Any]]:
    terms = [
        dict(r)
        for r in await s.pool.fetch(
            "SELECT token, holder, started_at, ended_at, end_reason FROM leader_terms"
            " ORDER BY token"
        )
    ]
    victims = {e.token: e for e in s.events}
    print(f"\nleader terms: {len(terms)}, transitions: {max(len(terms) - 1, 0)}")
    for t in terms:
        start = t["started_at"].timestamp() - s.begin_wall
        end = t["ended_at"].timestamp() - s.begin_wall if t["ended_at"] else None
        cause = victims.get(t["token"])
        print(
            f"  token {t['token']:>3}  {t['holder']:<6} from +{start:7.1f}s"
            + (f" to +{end:7.1f}s ({end - start:6.1f}s)" if end is not None else " (at the end)")
            + f"  {t['end_reason'] or '':<12}"
            + (f"  ended by event {cause.n}: {cause.action}" if cause else "")
        )
    unplanned = [t for t in terms[:-1] if t["token"] not in victims and t["ended_at"] is not None]
    print(f"  transitions no event caused: {len(unplanned)}")
    return terms


def report_failovers(s: Soak, terms: list[dict[str, Any]], grace: float) -> None:
    """Each event's time without a working leader: from the lease (polled), from
    `leader_terms` (the new term's start) and from the receiver (its calls' gap)."""
    started = {t["token"]: t["started_at"].timestamp() for t in terms}
    ended = {t["token"]: t["ended_at"] for t in terms}
    hits = sorted((h.at, h.token) for h in s.receiver.hits if h.job == "tick")
    print(f"\nfailovers: {len(s.events)} (time without a working leader)")
    print(
        "    #  at        action  victim  -> new leader   lease  leader_terms  receiver gap"
        "  (normal cadence 1 s)"
    )
    by_action: defaultdict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for e in s.events:
        new = s.watch.first_after(e.at, not_token=e.token)
        if new is None or new.token is None:
            print(f"  {e.n:>3}  +{s.elapsed(e.at):7.1f}s {e.action:<6}  {e.victim:<6}  none seen")
            continue
        lease = new.at - e.at
        term = started.get(new.token, math.nan) - e.wall
        before = [at for at, _ in hits if at <= e.at]
        after = [at for at, tok in hits if tok == new.token]
        gap = (after[0] - before[-1]) if before and after else math.nan
        by_action[e.action].append((lease, term, gap))
        extra = ""
        if e.action == "term" and ended.get(e.token) is not None:
            extra = f"  released after {ended[e.token].timestamp() - e.wall:.3f}s"
        if e.exit_code is not None and e.action == "term":
            extra += f", exit {e.exit_code} after {e.exit_after:.2f}s"
        print(
            f"  {e.n:>3}  +{s.elapsed(e.at):7.1f}s {e.action:<6}  {e.victim:<6}  -> "
            f"{new.holder:<6} t{new.token:<4} {lease:6.3f}s  {term:8.3f}s  {gap:8.3f}s{extra}"
        )
    for action, values in sorted(by_action.items()):
        leases, terms_, gaps = zip(*values, strict=True)
        print(
            f"  {action:<6} x{len(values):<2} lease median {statistics.median(leases):.3f}s "
            f"max {max(leases):.3f}s; leader_terms max {max(terms_):.3f}s; receiver gap "
            f"median {statistics.median(gaps):.2f}s max {max(gaps):.2f}s"
            f" (misfire grace {grace:g}s)"
        )


def outages(s: Soak, terms: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(event wall time, the next term's start) for each event: the slots due in between
    wait for the next leader."""
    started = {t["token"]: t["started_at"].timestamp() for t in terms}
    out = []
    for e in s.events:
        new = s.watch.first_after(e.at, not_token=e.token)
        if new is not None and new.token in started:
            out.append((e.wall, started[new.token]))
    return out


async def report_ticks(
    s: Soak, terms: list[dict[str, Any]], end_wall: float, checks: Checks
) -> None:
    since = await s.pool.fetchval("SELECT since FROM job_state WHERE job = 'tick'")
    first, last = math.ceil(epoch(since)), math.floor(end_wall - SETTLED)
    rows: defaultdict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in await s.pool.fetch(
        "SELECT slot, status, error, token FROM runs WHERE job = 'tick' AND slot IS NOT NULL"
    ):
        rows[round(r["slot"].timestamp())].append(dict(r))
    calls: Counter[int] = Counter()
    for h in s.receiver.hits:
        if h.job == "tick" and h.slot:
            calls[round(datetime.fromisoformat(h.slot).timestamp())] += 1
    windows = outages(s, terms)
    grace = s.args.grace
    ran = missed_design = 0
    unexplained: list[tuple[int, str]] = []
    lost: Counter[str] = Counter()
    recorded_other: Counter[str] = Counter()
    dup_calls = dup_rows = 0
    for slot in range(first, last + 1):
        here, n = rows.get(slot, []), calls.get(slot, 0)
        dup_calls += n > 1
        dup_rows += len(here) > 1
        status = here[0]["status"] if here else None
        if n:
            ran += 1
            if status != "succeeded":
                recorded_other[str(status)] += 1
        elif status in (None, "missed"):
            late = [new - slot for at, new in windows if at - 1 <= slot <= new]
            if late and max(late) > grace:
                missed_design += 1
            else:
                unexplained.append(
                    (slot, f"{status or 'no row'} {here[0]['error'] if here else ''}")
                )
        else:
            lost[str(status)] += 1
    stray = sum(n for slot, n in calls.items() if slot not in rows)
    due = last - first + 1
    missed = missed_design + len(unexplained)
    print(f"\ntick (every second): {due} slots due from +{first - s.begin_wall:.0f}s to the end")
    print(f"  ran (the receiver was called)      {ran}")
    if recorded_other:
        print(f"    of which recorded other than succeeded: {dict(recorded_other)}")
    print(
        f"  missed (no run row or `missed`)    {missed}: {missed_design} by design (due during "
        f"a failover longer than the {grace:g}s grace), {len(unexplained)} unexplained"
    )
    for slot, why in unexplained[:10]:
        print(f"    +{slot - s.begin_wall:.0f}s {datetime.fromtimestamp(slot, UTC):%H:%M:%S} {why}")
    print(
        f"  claimed by a leader that stopped before calling: {sum(lost.values())} {dict(lost)}"
        " (at most once: a claimed slot is never run again, and `http` runs are not resumed)"
    )
    print(f"  duplicated: {dup_calls} slots called twice, {dup_rows} slots with two ledger rows")
    print(f"  receiver calls for a slot with no ledger row: {stray}")
    checks.add("tick: duplicated", dup_calls + dup_rows == 0, f"{dup_calls + dup_rows}")
    checks.add("tick: calls without a ledger row", stray == 0, f"{stray}")
    checks.add("tick: unexplained misses", not unexplained, f"{len(unexplained)}")


async def report_syncs(s: Soak, passes_after: int, checks: Checks) -> None:
    since = await s.pool.fetchval("SELECT since FROM job_state WHERE job = 'emag-main'")
    runs = [
        dict(r)
        for r in await s.pool.fetch(
            "SELECT id, slot, trigger, status, stats::text AS stats, error FROM runs"
            " WHERE job = 'emag-main' ORDER BY id"
        )
    ]
    by_slot: Counter[int] = Counter(round(r["slot"].timestamp()) for r in runs if r["slot"])
    status_of = {round(r["slot"].timestamp()): r["status"] for r in runs if r["slot"]}
    first = math.ceil(epoch(since) / 60) * 60
    last = math.floor(s.chaos_end_wall / 60) * 60
    due = list(range(first, last + 1, 60))
    missed = [m for m in due if status_of.get(m) in (None, "missed")]
    table = Counter((r["trigger"], r["status"]) for r in runs)
    totals: Counter[str] = Counter()
    for r in runs:
        if r["status"] == "succeeded":
            stats = orjson.loads(r["stats"] or "{}")
            for key in ("created", "updated", "gone"):
                totals[key] += int(stats.get(key) or 0)
    ok = sum(n for (_, status), n in table.items() if status == "succeeded")
    print(f"\nemag-main (every minute, {s.args.items} offers at 3 requests/s)")
    print(f"  passes completed: {ok} ({passes_after} of them after the chaos)")
    print("  runs: " + ", ".join(f"{t}/{st} {n}" for (t, st), n in sorted(table.items())))
    print(
        f"  minute slots due up to the chaos's end: {len(due)}, missed {len(missed)} "
        "(by design: overlap forbid + misfire latest coalesce the minutes a pass and its "
        "resumes run past)"
    )
    print(
        f"  written by the passes: {totals['created']} created, {totals['updated']} updated, "
        f"{totals['gone']} marked gone; catalogue changes: {dict(s.mutations)}"
    )
    dup = sum(1 for n in by_slot.values() if n > 1)
    checks.add("emag-main: slots with two ledger rows", dup == 0, f"{dup}")

    live = {
        r["external_id"]: orjson.loads(r["raw"])
        for r in await s.pool.fetch(
            "SELECT external_id, raw::text AS raw FROM products"
            " WHERE source = 'emag' AND account = 'main' AND gone_at IS NULL"
        )
    }
    want = {str(o["id"]): o for o in s.sandbox.catalog.emag_offers("ro", "main")}
    absent = want.keys() - live.keys()
    extra = live.keys() - want.keys()
    differ = [k for k in want.keys() & live.keys() if live[k] != want[k]]
    same = not absent and not extra and not differ
    print(
        f"  products vs the sandbox catalogue: {len(live)} live rows, {len(want)} offers; "
        f"{len(absent)} missing, {len(extra)} not listed any more, {len(differ)} differ: "
        + ("EQUAL" if same else "DIFFERENT")
    )
    checks.add("products equal the catalogue", same, f"{len(absent)}/{len(extra)}/{len(differ)}")
    statuses = Counter(str(r.status) for r in s.sandbox.requests)
    print(f"  sandbox requests by status: {dict(sorted(statuses.items()))}")
    calls = [q for q in s.sandbox.requests if q.api == "emag" and q.status != 429]
    for q in [q for q in s.sandbox.requests if q.status == 429][:10]:
        near = min(s.events, key=lambda e: abs(e.at - q.at), default=None)
        earlier = [c.at for c in calls if q.at - 1.0 < c.at <= q.at]
        stall = max((late for at, late in s.watch.stalls if q.at - 2.0 <= at <= q.at), default=0)
        print(
            f"    429 at +{s.elapsed(q.at):.1f}s: {len(earlier)} admitted in the second before it"
            f" (at -{', -'.join(f'{(q.at - at) * 1000:.0f}' for at in earlier)} ms); this"
            f" process's loop stalled {stall * 1000:.0f} ms at most in the 2 s before"
            + (
                f"; nearest event {near.n} ({near.action}) at +{s.elapsed(near.at):.1f}s"
                if near
                else ""
            )
        )
    worst = sorted(late for _, late in s.watch.stalls)
    if worst:
        print(
            f"  this process's loop (it serves the sandbox) stalled > 10 ms {len(worst)} times,"
            f" > 30 ms (the limiter's margin) {sum(w > 0.03 for w in worst)} times, worst"
            f" {worst[-1] * 1000:.0f} ms"
        )


def led_for(s: Soak, wid: str) -> float:
    """Seconds `wid` held the lease, from the watcher's record."""
    seen = [*s.watch.seen, Seen(time.monotonic(), None, None)]
    return sum(b.at - a.at for a, b in itertools.pairwise(seen) if a.holder == wid)


def report_memory(s: Soak, checks: Checks) -> None:
    max_kb, max_fds = s.args.max_rss_mb * 1024, s.args.max_fds
    print(
        f"\nmemory and file descriptors (/proc/<pid>/status VmRSS, /proc/<pid>/fd); "
        f"'start' = {clock(s.elapsed(s.measured_at))} after the start (after the warm-up), "
        "for a replacement 'start' is its own start + the warm-up"
    )
    print(
        "  replica  lived           role        start             end"
        "               growth           led"
    )
    whole_lives = []
    for wid, life in s.lives.items():
        if not life.samples:
            continue
        whole = life.started <= s.measured_at and life.ended is None
        if whole:
            first = next(u for u in life.samples if u.at >= s.measured_at)
            whole_lives.append((wid, first, life.samples[-1]))
        lived = f"+{s.elapsed(life.started):.0f}s.." + (
            "end" if life.ended is None else f"+{s.elapsed(life.ended):.0f}s"
        )
        if not whole:
            settled = [u for u in life.samples if u.at >= life.started + s.args.warmup]
            if not settled:
                print(f"  {wid:<7}  {lived:<14}  (lived less than the warm-up: not measured)")
                continue
            first = settled[0]
        end = life.samples[-1]
        roles = f"{'L' if first.leading else 'F'}->{'L' if end.leading else 'F'}"
        print(
            f"  {wid:<7}  {lived:<14}  {roles:<10}  {mb(first.rss_kb):>8} {first.fds:>3} fds"
            f"  {mb(end.rss_kb):>8} {end.fds:>3} fds  {(end.rss_kb - first.rss_kb) / 1024:+5.1f} MB"
            f" {end.fds - first.fds:+3d} fds  {led_for(s, wid):5.0f}s"
            + ("  whole soak" if whole else "  fresh (not held to the limits)")
        )
    print(
        "  (role L/F = leader/follower at the two samples. Pooled client connections come and"
        " go with the leadership and the pools, Postgres idle ones after 300 s, HTTP ones"
        f" after 15 s: they are held to the pools' bounds {POOLED}, the other fds to the"
        " growth limit)"
    )
    for wid, first, end in whole_lives:
        names = sorted(first.kinds.keys() | end.kinds.keys())
        print(
            f"  {wid} fds by kind, start -> end: "
            + ", ".join(f"{k} {first.kinds.get(k, 0)}->{end.kinds.get(k, 0)}" for k in names)
        )
        after = [u for u in s.lives[wid].samples if u.at >= s.measured_at]
        minutely = after[:: max(1, round(60 / SAMPLE_EVERY))] + after[-1:]
        print(
            f"  {wid} RSS each minute (* = leading): "
            + " ".join(f"{u.rss_kb / 1024:.1f}{'*' if u.leading else ''}" for u in minutely)
        )
        grow_kb = end.rss_kb - first.rss_kb
        grow_fds = end.unpooled - first.unpooled
        checks.add(f"{wid}: RSS growth", grow_kb <= max_kb, f"{grow_kb / 1024:+.1f} MB")
        checks.add(
            f"{wid}: fd growth (other than pooled connections)",
            grow_fds <= max_fds,
            f"{grow_fds:+d} (all fds {end.fds - first.fds:+d})",
        )
        for kind, bound in POOLED.items():
            most = max(u.kinds.get(kind, 0) for u in s.lives[wid].samples)
            checks.add(f"{wid}: {kind} connections, most at once", most <= bound, f"{most}")


def report_logs(s: Soak) -> None:
    print("\nlog lines at warning level and above, per replica (top messages)")
    for wid, life in s.lives.items():
        levels: Counter[str] = Counter()
        msgs: Counter[str] = Counter()
        for line in life.replica.log().splitlines():
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                levels["non-json"] += 1
                continue
            level = str(rec.get("level", ""))
            levels[level] += 1
            if level in ("warning", "error", "critical"):
                msgs[f"{level}: {str(rec.get('msg', ''))[:150]}"] += 1
        worst = {k: v for k, v in levels.items() if k in ("warning", "error", "critical")}
        print(f"  {wid:<7} {worst or 'none'}")
        for msg, n in msgs.most_common(4):
            print(f"      {n:>4} x {msg}")


# -- main -----------------------------------------------------------------------------


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="chaos phase length")
    parser.add_argument("--items", type=int, default=9000, help="offers in the catalogue")
    parser.add_argument("--ttl", type=float, default=2.0, help="lease TTL, seconds")
    parser.add_argument("--grace", type=float, default=15.0, help="tick's misfire_grace")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before 'start'")
    parser.add_argument(
        "--every", type=float, nargs=2, metavar=("MIN", "MAX"), help="seconds between events"
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-rss-mb", type=float, default=10.0)
    parser.add_argument("--max-fds", type=int, default=5)
    parser.add_argument("--keep-logs", action="store_true", help="keep the replicas' logs")
    parser.add_argument(
        "--pg",
        default=os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="an admin URL of the server; the soak's database gets a fresh name beside it",
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args()
    if args.every is None:
        args.every = (30.0, 90.0) if args.minutes >= 5 else (10.0, 25.0)
    if args.seed is None:
        args.seed = random.randrange(1 << 32)
    return args


async def run(args: argparse.Namespace, dsn: str, prefix: str, workdir: Path) -> Checks:
    redis = Redis.from_url(args.redis_url)
    watch = LeaderWatch(redis, prefix)
    checks = Checks()
    try:
        async with (
            Receiver() as receiver,
            sandbox(args.items) as (app, base),
            asyncpg.create_pool(dsn, min_size=1, max_size=2) as pool,
        ):
            jobs = workdir / "jobs.toml"
            jobs.write_text(JOBS.format(grace=args.grace, hook=receiver.url, base=base))
            cluster = Cluster(
                dsn,
                args.redis_url,
                prefix,
                jobs,
                workdir,
                ttl=args.ttl,
                extra_env={"T_EMAG_USER": "main@example.com", "T_EMAG_PASS": "main-secret"},
            )
            rng = random.Random(args.seed)
            peers = {
                urlsplit(dsn).port or 5432: "postgres",
                urlsplit(args.redis_url).port or 6379: "redis",
                receiver.port: "receiver",
                urlsplit(base).port or 80: "sandbox",
            }
            s = Soak(args, cluster, receiver, app[SANDBOX], pool, watch, rng, peers)
            try:
                await soak(s, checks)
            finally:
                try:
                    await stop_everything(cluster)
                finally:
                    await stop_tasks(s.tasks, s.stop)
    finally:
        with contextlib.suppress(Exception):
            await delete_keys(redis, prefix)
        await redis.aclose()
    return checks


async def soak(s: Soak, checks: Checks) -> None:
    args = s.args
    s.began, s.begin_wall = time.monotonic(), time.time()
    load0 = os.getloadavg()
    print(
        f"soak: {args.minutes:g} min of chaos, 3 replicas (TTL {args.ttl:g}s), tick every second "
        f"(grace {args.grace:g}s), emag-main every minute ({args.items} offers, 3 req/s), "
        f"an event every {args.every[0]:g}-{args.every[1]:g}s, seed {args.seed}",
        flush=True,
    )
    print(f"load average at the start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    s.background(s.watch.run(s.stop), "watch")
    s.background(s.sample_forever(), "sample")
    await start_cluster(s)
    await warm_up(s)
    print(f"[{clock(s.elapsed())}] warmed up (first import done): chaos begins", flush=True)
    s.background(mutate_forever(s), "mutate")
    s.background(progress_forever(s), "progress")
    await chaos(s, time.monotonic() + args.minutes * 60)
    await asyncio.sleep(max(0.0, s.measured_at + args.minutes * 60 - time.monotonic()))
    s.chaos_end, s.chaos_end_wall = time.monotonic(), time.time()
    # Catalogue changes and progress lines stop; the watch and the sampler go on.
    await stop_tasks(s.tasks[2:])
    print(f"[{clock(s.elapsed())}] chaos over: waiting for two clean passes of the sync")
    passes_after = await final_passes(s, timeout=300)
    await s.sample()
    end_wall = time.time()
    load1 = os.getloadavg()

    terms = await report_leaders(s)
    report_failovers(s, terms, args.grace)
    await report_ticks(s, terms, end_wall, checks)
    await report_syncs(s, passes_after, checks)
    report_memory(s, checks)
    report_logs(s)
    ones = [load[0] for load in s.loads] or [load1[0]]
    print(
        f"\nload average (1/5/15 min): start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
        f"end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; 1-min load each minute: "
        f"mean {statistics.mean(ones):.2f}, max {max(ones):.2f} ({os.cpu_count()} cores)"
    )
    print(f"soak took {clock(s.elapsed())} in all")


async def main() -> int:
    args = parse()
    name = f"worker_soak_{uuid.uuid4().hex[:8]}"
    dsn = args.pg.rsplit("/", 1)[0] + "/" + name
    prefix = f"soak:{uuid.uuid4().hex[:8]}:"
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    checks: Checks | None = None
    try:
        await migrate(dsn)
        checks = await run(args, dsn, prefix, workdir)
    finally:
        with contextlib.suppress(Exception):
            await drop_database(args.pg, name)
        if checks is not None and checks.ok and not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"replica logs kept in {workdir}")
    print("\nchecks:")
    for what, ok, detail in checks.items:
        print(f"  {'ok  ' if ok else 'FAIL'}  {what}: {detail}")
    print("result: " + ("OK" if checks.ok else "FAILED"))
    return 0 if checks.ok else 1


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: the replicas are stopped, the database and the Redis keys dropped")
        sys.exit(130)
