"""Start real `worker run` processes for multi-process tests and benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web
from redis.asyncio import Redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Replica:
    worker_id: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Cluster:
    """N replicas sharing one database and one Redis key prefix."""

    database_url: str
    redis_url: str
    key_prefix: str
    jobs_file: Path
    workdir: Path
    ttl: float = 2.0
    api_key: str = "test-key"
    extra_env: dict[str, str] = field(default_factory=dict)
    replicas: list[Replica] = field(default_factory=list)

    def start(self, worker_id: str, overrides: dict[str, str] | None = None) -> Replica:
        """Start `worker run` as `worker_id`; `overrides` take precedence over the
        cluster's environment for this replica (e.g. its own DATABASE_URL, a proxy)."""
        port = free_port()
        env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "WORKER_KEY_PREFIX": self.key_prefix,
            "WORKER_ID": worker_id,
            "WORKER_HTTP_HOST": "127.0.0.1",
            "WORKER_HTTP_PORT": str(port),
            "WORKER_LEASE_TTL": str(self.ttl),
            "WORKER_JOBS_FILE": str(self.jobs_file),
            "WORKER_API_KEY": self.api_key,
            "WORKER_LOG_FORMAT": "json",
            "WORKER_SHUTDOWN_GRACE": "5",
            **self.extra_env,
            **(overrides or {}),
        }
        log_path = self.workdir / f"{worker_id}.log"
        out = log_path.open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
        out.close()
        replica = Replica(worker_id, port, proc, log_path)
        self.replicas.append(replica)
        return replica

    def by_id(self, worker_id: str) -> Replica:
        return next(r for r in self.replicas if r.worker_id == worker_id)

    async def wait_ready(self, replica: Replica, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                if replica.proc.poll() is not None:
                    raise RuntimeError(f"{replica.worker_id} exited:\n{replica.log()[-3000:]}")
                try:
                    async with http.get(f"{replica.url}/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{replica.worker_id} not ready:\n{replica.log()[-3000:]}")
                await asyncio.sleep(0.05)

    async def stop_gracefully(self, timeout: float = 20.0) -> dict[str, int | None]:
        """SIGTERM every live replica (SIGCONT first) and wait for them without blocking
        the event loop (it may carry servers the replicas still talk to while they stop).
        Returns each replica's exit code; None for one still running after `timeout`
        (`stop_all` kills it)."""
        for r in self.replicas:
            if r.proc.poll() is None:
                os.kill(r.proc.pid, signal.SIGCONT)
                r.proc.terminate()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(r.proc.poll() is not None for r in self.replicas):
                break
            await asyncio.sleep(0.05)
        return {r.worker_id: r.proc.poll() for r in self.replicas}

    def stop_all(self) -> None:
        for r in self.replicas:
            if r.proc.poll() is None:
                os.kill(r.proc.pid, signal.SIGCONT)
                r.proc.terminate()
        for r in self.replicas:
            try:
                r.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()


async def current_holder(redis: Redis, prefix: str) -> tuple[str, int] | None:
    raw = await redis.get(f"{prefix}leader")
    if raw is None:
        return None
    data = orjson.loads(raw)
    return str(data["holder"]), int(data["token"])


async def wait_new_holder(
    redis: Redis, prefix: str, *, not_token: int | None, timeout: float, step: float = 0.01
) -> tuple[str, int, float]:
    """Wait until a term other than `not_token` holds the lease: (holder, token, when)."""
    deadline = time.monotonic() + timeout
    while True:
        got = await current_holder(redis, prefix)
        if got is not None and got[1] != not_token:
            return got[0], got[1], time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no new leader within {timeout}s")
        await asyncio.sleep(step)


@dataclass
class Hit:
    job: str
    run: str
    slot: str
    token: int
    at: float


class Receiver:
    """A local HTTP server standing in for the system the `http` job calls."""

    def __init__(self, delay: float = 0.0) -> None:
        self.hits: list[Hit] = []
        self.delay = delay
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        h = request.headers
        self.hits.append(
            Hit(
                h.get("X-Worker-Job", ""),
                h.get("X-Worker-Run", ""),
                h.get("X-Worker-Slot", ""),
                int(h.get("X-Worker-Token", "0") or 0),
                time.monotonic(),
            )
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.json_response({"ok": True})

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def slots(self) -> list[str]:
        return [h.slot for h in self.hits if h.slot]


EMAG_SYNC_JOB = """
[[jobs]]
name = "emag-main"
kind = "emag.offers"
timeout = "5m"
[jobs.params]
account = "main"
platform = "ro"
base_url = "{base}/emag/ro/api-3"
username_env = "T_EMAG_USER"
password_env = "T_EMAG_PASS"
mark_gone = true
"""


@contextlib.asynccontextmanager
async def emag_sync_cluster(
    tmp_path: Path,
    database_url: str,
    redis_url: str,
    key_prefix: str,
    *,
    items: int,
    extra_env: dict[str, str] | None = None,
) -> AsyncIterator[tuple[web.Application, Cluster]]:
    """A sandbox marketplace (3 requests/s) with `items` offers, and a cluster (no
    replica started yet) whose jobs file syncs its eMAG account `main` with mark_gone.
    Both are stopped on leaving."""
    from worker.sandbox import SandboxConfig, build_app

    app = build_app(SandboxConfig(emag_items=items, rate=3))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(EMAG_SYNC_JOB.format(base=f"http://127.0.0.1:{port}"))
    cluster = Cluster(
        database_url,
        redis_url,
        key_prefix,
        jobs,
        tmp_path,
        ttl=2.0,
        extra_env={
            "T_EMAG_USER": "main@example.com",
            "T_EMAG_PASS": "main-secret",
            **(extra_env or {}),
        },
    )
    try:
        yield app, cluster
    finally:
        cluster.stop_all()
        await runner.cleanup()
