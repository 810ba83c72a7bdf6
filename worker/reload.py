"""Reloading the jobs file without a restart: SIGHUP, `POST /admin/reload`, a file watch.

`LiveSettings` holds the replica's current settings; a reload re-reads the jobs file,
validates it exactly as at start (kinds' params checkers, the cross-job check) and, when
it is valid, replaces the settings whole. Readers take `live.current` when they need it:
the leader at the top of each tick, the web handlers through their state. An invalid
file is refused with the same one-line error as at start and the running configuration
stays. Only the jobs file is re-read: the environment's settings need a restart.

In Kubernetes the ConfigMap changes under the pod (the kubelet swaps a symlink); the
watch polls the file's modification time and, when it moved, its hash, so an edit that
changes nothing is not a reload and a swap that keeps the mtime is still seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import metrics
from .config import JobSpec, Settings, parse_jobs, read_jobs_file
from .errors import ConfigError

log = logging.getLogger(__name__)

WATCH_EVERY = 5.0

Checkers = Mapping[str, Callable[[JobSpec], None]]
CrossCheck = Callable[[Sequence[JobSpec]], None]


@dataclass(frozen=True)
class Reloaded:
    """What a reload changed; `version` counts the applied reloads of this replica."""

    version: int
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    @property
    def unchanged(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def summary(self) -> str:
        if self.unchanged:
            return "no job changed"
        parts = [
            f"{what} {', '.join(names)}"
            for what, names in (
                ("added", self.added),
                ("removed", self.removed),
                ("changed", self.changed),
            )
            if names
        ]
        return "; ".join(parts)

    def public(self) -> dict[str, object]:
        return {
            "version": self.version,
            "added": self.added,
            "removed": self.removed,
            "changed": self.changed,
            "summary": self.summary(),
        }


class LiveSettings:
    """The replica's settings, replaced whole when the jobs file is reloaded."""

    def __init__(
        self,
        settings: Settings,
        *,
        checkers: Checkers | None = None,
        cross_check: CrossCheck | None = None,
    ) -> None:
        self.current = settings
        self.version = 0
        self._checkers = checkers
        self._cross_check = cross_check
        self._listeners: list[Callable[[Settings], None]] = []
        path = settings.jobs_file
        self._stamp = _stamp(path) if path else None
        self._digest = _digest(path) if path else None

    def subscribe(self, listener: Callable[[Settings], None]) -> None:
        """`listener(new_settings)` is called after every applied reload."""
        self._listeners.append(listener)

    def reload(self, why: str) -> Reloaded:
        """Re-read the jobs file; raises `ConfigError` (one line) if it is not valid."""
        path = self.current.jobs_file
        if path is None:
            metrics.CONFIG_RELOADS.labels("refused").inc()
            raise ConfigError("WORKER_JOBS_FILE is not set: there is no jobs file to reload")
        try:
            self._stamp = _stamp(path)
            raw = read_jobs_file(path)
            jobs = parse_jobs(path, raw, kinds=self._checkers, cross_check=self._cross_check)
            dataclasses.replace(self.current, jobs=jobs).check_webhooks()
        except ConfigError as exc:
            metrics.CONFIG_RELOADS.labels("refused").inc()
            log.error("jobs file reload (%s) refused, the running jobs stay: %s", why, exc)
            raise
        self._digest = hashlib.sha256(raw).hexdigest()
        change = _compare(self.current.jobs, jobs, self.version + 1)
        if change.unchanged:
            metrics.CONFIG_RELOADS.labels("unchanged").inc()
            log.info("jobs file reload (%s): no job changed", why)
            return dataclasses.replace(change, version=self.version)
        self.version = change.version
        self.current = dataclasses.replace(self.current, jobs=jobs)
        for listener in self._listeners:
            listener(self.current)
        metrics.CONFIG_RELOADS.labels("applied").inc()
        log.warning("jobs file reloaded (%s): %s", why, change.summary())
        return change

    def changed_on_disk(self) -> bool:
        """Whether the file's mtime (or size, or inode) and then its hash moved."""
        path = self.current.jobs_file
        if path is None:
            return False
        stamp = _stamp(path)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return _digest(path) != self._digest

    async def watch(self, stop: asyncio.Event, every: float = WATCH_EVERY) -> None:
        """Reload when the jobs file changes on disk, until `stop` is set."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await stop.wait()
            if stop.is_set():
                return
            if self.changed_on_disk():
                with contextlib.suppress(ConfigError):  # logged; the running jobs stay
                    self.reload("the file changed on disk")


def _compare(old: Sequence[JobSpec], new: Sequence[JobSpec], version: int) -> Reloaded:
    before = {j.name: j for j in old}
    after = {j.name: j for j in new}
    return Reloaded(
        version=version,
        added=[n for n in after if n not in before],
        removed=[n for n in before if n not in after],
        changed=[n for n, j in after.items() if n in before and not j.same_as(before[n])],
    )


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()  # follows the ConfigMap's symlink to the file it names now
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def channel(prefix: str) -> str:
    return f"{prefix}reload"


async def ask_everyone(redis: Redis, prefix: str, sender: str) -> int:
    """Ask every replica to re-read its jobs file; returns how many listen (the sender's
    own listener among them: it ignores its own request)."""
    listening: int = await redis.publish(channel(prefix), sender.encode())
    return listening


async def listen_for_reloads(
    redis: Redis, prefix: str, me: str, live: LiveSettings, stop: asyncio.Event
) -> None:
    """Reload when another replica was asked to (`POST /admin/reload` reaches one
    replica; every replica mounts the same file). Rides out Redis outages."""
    pause = 1.0
    while not stop.is_set():
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel(prefix))
            pause = 1.0
            while not stop.is_set():
                message = await pubsub.get_message(timeout=1.0)
                if message is None or message.get("type") != "message":
                    continue
                sender = bytes(message["data"]).decode(errors="replace")
                if sender != me:
                    with contextlib.suppress(ConfigError):  # logged; the running jobs stay
                        live.reload(f"asked through replica {sender}")
        except (RedisError, OSError) as exc:
            log.warning("reload channel lost (%s); listening again in %.0fs", exc, pause)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await stop.wait()
            pause = min(pause * 2, 30.0)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
