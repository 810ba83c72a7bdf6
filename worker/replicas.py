"""The replica registry: every replica announces itself in Redis under a TTL.

Each replica keeps `{prefix}replica:{id}` (readable JSON: id, role, version, HTTP
address, started, last seen) alive by writing it again every lease TTL; the key
lives a few lease TTLs, so a replica that died without a word drops out of the list
by itself, and one that shuts down removes its key at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .config import Settings
from .robots import version

log = logging.getLogger(__name__)

# The key outlives this many refreshes: one or two lost writes do not drop a replica.
TTL_REFRESHES = 3
_GLOB = re.compile(r"([*?\[\]\\])")


@dataclass(frozen=True)
class Replica:
    """One replica as it announces itself."""

    id: str
    role: str
    version: str
    address: str
    started: str
    last_seen: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Registry:
    """Registry operations for one key prefix; each Redis call gives up after `timeout`."""

    def __init__(self, redis: Redis, *, prefix: str, ttl: float, timeout: float) -> None:
        self.redis = redis
        self.prefix = f"{prefix}replica:"
        self.ttl = ttl
        self.timeout = timeout

    def key(self, replica_id: str) -> str:
        return f"{self.prefix}{replica_id}"

    async def announce(self, replica: Replica) -> None:
        """Write the replica's entry with a fresh TTL."""
        async with asyncio.timeout(self.timeout):
            await self.redis.set(
                self.key(replica.id), orjson.dumps(replica.as_dict()), px=_ms(self.ttl)
            )

    async def withdraw(self, replica_id: str) -> None:
        async with asyncio.timeout(self.timeout):
            await self.redis.delete(self.key(replica_id))

    async def list(self) -> list[Replica]:
        """Every replica whose entry has not expired, by id (SCAN, never KEYS)."""
        keys: set[bytes] = set()
        async with asyncio.timeout(self.timeout):
            async for key in self.redis.scan_iter(match=_GLOB.sub(r"\\\1", self.prefix) + "*"):
                keys.add(key)
            values = await self.redis.mget(sorted(keys)) if keys else []
        found = []
        for raw in values:
            if raw is None:  # expired between SCAN and MGET
                continue
            try:
                found.append(Replica(**orjson.loads(raw)))
            except (orjson.JSONDecodeError, TypeError):
                log.warning("ignoring a replica entry that is not ours: %r", raw[:200])
        return sorted(found, key=lambda r: r.id)


async def keep_registered(
    registry: Registry, replica: Replica, stop: asyncio.Event, *, every: float
) -> None:
    """Announce `replica` every `every` seconds until `stop`, then withdraw it.

    Redis being away is logged and retried, never fatal: the registry is for people
    looking at the status page, not for anything that decides who leads.
    """
    failing = False
    while not stop.is_set():
        now = datetime.now(UTC).isoformat(timespec="seconds")
        try:
            await registry.announce(replace(replica, last_seen=now))
        except (RedisError, OSError, TimeoutError) as exc:
            if not failing:
                log.warning("cannot announce this replica: %s %s", type(exc).__name__, exc)
            failing = True
        else:
            if failing:
                log.info("announcing this replica again")
            failing = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
    try:
        await registry.withdraw(replica.id)
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("cannot withdraw this replica (it expires by itself): %s", exc)


def registry_for(redis: Redis, settings: Settings) -> Registry:
    """The registry of this deployment: entries live `TTL_REFRESHES` lease TTLs."""
    ttl = settings.lease.ttl
    return Registry(redis, prefix=settings.key_prefix, ttl=ttl * TTL_REFRESHES, timeout=ttl / 2)


async def run(redis: Redis, settings: Settings, *, address: str, stop: asyncio.Event) -> None:
    """The actor: keep this replica in the registry, refreshed every lease TTL."""
    started = datetime.now(UTC).isoformat(timespec="seconds")
    me = Replica(settings.worker_id, settings.role, version(), address, started, started)
    await keep_registered(registry_for(redis, settings), me, stop, every=settings.lease.ttl)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
