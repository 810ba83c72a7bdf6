"""Typed, frozen settings from the environment and the jobs file, validated when built.

Every error names the variable (or the job and field) and says what is wrong, so a
replica with bad configuration stops at start with one readable line.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .durations import parse_duration
from .errors import ConfigError
from .schedule import OVERLAPS, CronSchedule, Misfire, Overlap

Role = Literal["all", "http", "scheduler"]
ROLES: tuple[Role, ...] = ("all", "http", "scheduler")


# The least share of the lease TTL kept between the renew deadline and expiry.
STOP_ROOM = 0.15

# Variables that hold a secret; each may instead name a file, as `<NAME>_FILE` (the
# Docker and Kubernetes secrets convention): a mounted file stays out of the process
# environment, which `kubectl describe`, `docker inspect` and child processes show.
SECRETS = (
    "WORKER_API_KEY",
    "WORKER_READ_KEY",
    "WORKER_WEBHOOK_SECRET",
    "DATABASE_URL",
    "REDIS_URL",
)
MAX_SECRET_FILE = 64 * 1024  # a longer file is the wrong file (or /dev/zero)


@dataclass(frozen=True)
class LeaseSettings:
    """Timing of the Redis lease; validated so that ttl > renew_deadline > retry."""

    ttl: float = 10.0
    renew_deadline: float | None = None
    retry: float | None = None

    @property
    def deadline(self) -> float:
        return self.renew_deadline if self.renew_deadline is not None else self.ttl * 2 / 3

    @property
    def retry_period(self) -> float:
        return self.retry if self.retry is not None else self.ttl / 5

    @property
    def renew_every(self) -> float:
        return self.ttl / 3

    def validate(self) -> None:
        if not self.ttl > self.deadline > self.retry_period > 0:
            raise ConfigError(
                "WORKER_LEASE_TTL / WORKER_LEASE_RENEW_DEADLINE / WORKER_LEASE_RETRY: need "
                f"ttl > renew_deadline > retry > 0, got {self.ttl:g} > {self.deadline:g} > "
                f"{self.retry_period:g}"
            )
        # A leader that missed its deadline cancels its work then; the lease must still
        # be its own for as long as that takes (a retry period at least, and a share of
        # the TTL for the event loop to get round to it on a loaded machine).
        room = max(self.retry_period, self.ttl * STOP_ROOM)
        if self.ttl - self.deadline < room:
            raise ConfigError(
                "WORKER_LEASE_RENEW_DEADLINE: leave room to stop leader work before the lease"
                f" expires: ttl - renew_deadline must be at least {room:g}s (the retry period"
                f" or {STOP_ROOM:.0%} of the ttl), got {self.ttl:g} - {self.deadline:g};"
                f" try WORKER_LEASE_RENEW_DEADLINE={self.ttl - room:g} or less"
            )


@dataclass(frozen=True)
class JobSpec:
    """One `[[jobs]]` table of the jobs file."""

    name: str
    kind: str
    schedule: CronSchedule | None
    timezone: str = "UTC"
    timeout: float = 3600.0
    misfire: Misfire = "latest"
    misfire_grace: float = 60.0
    overlap: Overlap = "forbid"
    manual: bool = True
    pause_after_failures: int | None = None
    webhooks: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def schedule_key(self) -> str | None:
        """The schedule as the ledger records it: a change makes planning start afresh."""
        return f"{self.schedule.expr} {self.timezone}" if self.schedule else None

    def same_as(self, other: JobSpec) -> bool:
        return self.describe() == other.describe() and self.params == other.params

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "schedule": self.schedule.expr if self.schedule else None,
            "timezone": self.timezone,
            "timeout": self.timeout,
            "misfire": self.misfire,
            "misfire_grace": self.misfire_grace,
            "overlap": self.overlap,
            "manual": self.manual,
            "pause_after_failures": self.pause_after_failures,
            "webhooks": list(self.webhooks),
        }


@dataclass(frozen=True)
class Settings:
    """Everything a replica needs, built once by `Settings.from_env()`."""

    # The URLs carry passwords: like the keys, they stay out of repr() and so of logs.
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    database_url: str = field(default="postgresql://postgres@127.0.0.1:5432/worker", repr=False)
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    key_prefix: str = "worker:"
    lease: LeaseSettings = field(default_factory=LeaseSettings)
    jobs_file: Path | None = None
    jobs_watch: float = 5.0
    api_key: str | None = field(default=None, repr=False)
    read_key: str | None = field(default=None, repr=False)
    role: Role = "all"
    shutdown_grace: float = 20.0
    log_format: Literal["auto", "json", "text"] = "auto"
    log_level: str = "INFO"
    max_concurrent_runs: int = 8
    db_timeout: float = 10.0
    reap_after: float = 15.0
    keep_runs: float = 14 * 86400.0
    webhook_urls: tuple[str, ...] = ()
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_timeout: float = 10.0
    webhook_max_attempts: int = 10
    webhook_backoff: float = 5.0
    jobs: tuple[JobSpec, ...] = ()

    @property
    def campaigns(self) -> bool:
        return self.role != "http"

    @property
    def public_api(self) -> bool:
        return self.role != "scheduler"

    def job(self, name: str) -> JobSpec | None:
        return next((j for j in self.jobs if j.name == name), None)

    def webhook_targets(self) -> list[tuple[str, str]]:
        """(job, url) pairs to deliver to; job '*' = every job (`WORKER_WEBHOOK_URLS`)."""
        return [("*", url) for url in self.webhook_urls] + [
            (j.name, url) for j in self.jobs for url in j.webhooks
        ]

    def check_webhooks(self) -> None:
        """Webhooks are signed: a URL without `WORKER_WEBHOOK_SECRET` is refused."""
        if self.webhook_targets() and not self.webhook_secret:
            first = self.webhook_targets()[0]
            where = "WORKER_WEBHOOK_URLS" if first[0] == "*" else f"job {first[0]!r}: webhooks"
            raise ConfigError(
                f"{where}: webhooks are signed, set WORKER_WEBHOOK_SECRET or"
                " WORKER_WEBHOOK_SECRET_FILE (a long random string the receivers also know)"
            )

    def check_keys(self) -> None:
        """A read key is a key of its own: readers must not hold the write key."""
        if self.read_key is not None and self.read_key == self.api_key:
            raise ConfigError(
                "WORKER_READ_KEY: it is the same as WORKER_API_KEY, so every reader could also"
                " write; give readers a key of their own, or leave WORKER_READ_KEY unset"
            )

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        kinds: Mapping[str, Callable[[JobSpec], None]] | None = None,
        cross_check: Callable[[Sequence[JobSpec]], None] | None = None,
    ) -> Settings:
        """Build and validate settings; `kinds` maps job kinds to their params checker."""
        env = os.environ if env is None else env
        e = _Env(env)
        lease = LeaseSettings(
            ttl=e.seconds("WORKER_LEASE_TTL", 10.0),
            renew_deadline=e.seconds_or_none("WORKER_LEASE_RENEW_DEADLINE"),
            retry=e.seconds_or_none("WORKER_LEASE_RETRY"),
        )
        lease.validate()
        jobs_file = e.get("WORKER_JOBS_FILE")
        path = Path(jobs_file) if jobs_file else None
        settings = cls(
            redis_url=e.url("REDIS_URL", cls.redis_url, ("redis://", "rediss://", "unix://")),
            database_url=e.url("DATABASE_URL", cls.database_url, ("postgresql://", "postgres://")),
            worker_id=e.get("WORKER_ID") or f"{socket.gethostname()}-{os.getpid()}",
            http_host=e.get("WORKER_HTTP_HOST") or cls.http_host,
            http_port=e.integer("WORKER_HTTP_PORT", cls.http_port, lo=0, hi=65535),
            key_prefix=e.get("WORKER_KEY_PREFIX") or cls.key_prefix,
            lease=lease,
            jobs_file=path,
            jobs_watch=e.seconds("WORKER_JOBS_WATCH", cls.jobs_watch),
            api_key=e.secret("WORKER_API_KEY"),
            read_key=e.secret("WORKER_READ_KEY"),
            role=cast(Role, e.choice("WORKER_ROLE", "all", ROLES)),
            shutdown_grace=e.seconds("WORKER_SHUTDOWN_GRACE", cls.shutdown_grace),
            log_format=cast(
                Literal["auto", "json", "text"],
                e.choice("WORKER_LOG_FORMAT", "auto", ("auto", "json", "text")),
            ),
            log_level=e.choice(
                "WORKER_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"), upper=True
            ),
            max_concurrent_runs=e.integer("WORKER_MAX_RUNS", cls.max_concurrent_runs, lo=1),
            db_timeout=e.seconds("WORKER_DB_TIMEOUT", cls.db_timeout),
            reap_after=e.seconds("WORKER_REAP_AFTER", cls.reap_after),
            keep_runs=e.seconds("WORKER_KEEP_RUNS", cls.keep_runs),
            webhook_urls=e.urls("WORKER_WEBHOOK_URLS"),
            webhook_secret=e.secret("WORKER_WEBHOOK_SECRET"),
            webhook_timeout=e.seconds("WORKER_WEBHOOK_TIMEOUT", cls.webhook_timeout),
            webhook_max_attempts=e.integer(
                "WORKER_WEBHOOK_MAX_ATTEMPTS", cls.webhook_max_attempts, lo=1, hi=100
            ),
            webhook_backoff=e.seconds("WORKER_WEBHOOK_BACKOFF", cls.webhook_backoff),
            jobs=load_jobs(path, kinds=kinds, cross_check=cross_check) if path else (),
        )
        settings.check_webhooks()
        settings.check_keys()
        return settings


class _Env:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def get(self, name: str) -> str | None:
        value = self.env.get(name)
        return value.strip() if value is not None and value.strip() else None

    def secret(self, name: str) -> str | None:
        return secret(name, self.env)

    def seconds(self, name: str, default: float) -> float:
        value = self.seconds_or_none(name)
        return default if value is None else value

    def seconds_or_none(self, name: str) -> float | None:
        raw = self.get(name)
        if raw is None:
            return None
        try:
            return parse_duration(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None

    def integer(self, name: str, default: int, *, lo: int = 0, hi: int | None = None) -> int:
        raw = self.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
            raise ConfigError(f"{name}: must be {bound}, got {value}")
        return value

    def choice(
        self, name: str, default: str, options: tuple[str, ...], *, upper: bool = False
    ) -> str:
        raw = self.get(name)
        if raw is None:
            return default
        value = raw.upper() if upper else raw.lower()
        if value not in options:
            raise ConfigError(f"{name}: must be one of {', '.join(options)}; got {raw!r}")
        return value

    def urls(self, name: str) -> tuple[str, ...]:
        """A comma-separated list of http(s) URLs."""
        raw = self.get(name)
        if raw is None:
            return ()
        found = tuple(u.strip() for u in raw.split(",") if u.strip())
        for url in found:
            why = webhook_url_problem(url)
            if why:
                raise ConfigError(f"{name}: {why}")
        return found

    def url(self, name: str, default: str, schemes: tuple[str, ...]) -> str:
        """A URL that may hold a password: from `name` or the file `<name>_FILE`."""
        raw = self.secret(name)
        if raw is None:
            return default
        if not raw.startswith(schemes):
            where = f"{name}_FILE" if self.get(f"{name}_FILE") else name
            scheme = raw.split("://")[0] if "://" in raw else ""
            # Only a scheme is shown: anything else may be the password itself.
            got = (
                f"{scheme!r}://…"
                if _SCHEME.fullmatch(scheme)
                else "something else (not shown: it may be a secret)"
            )
            raise ConfigError(
                f"{where}: expected a URL starting with {' or '.join(schemes)}, got {got}"
            )
        return raw


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,19}")


def secret(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """The secret `name`: the variable's value, or else the content of the file that
    `<name>_FILE` names with one trailing newline stripped; None when neither is set.

    Read this way both for the settings (SECRETS) and for the credentials that job
    params name (`password_env`, `headers_env`, …). Both set, or a file that cannot be
    read or is empty: a ConfigError naming the variables and the path, never the content.
    """
    env = os.environ if env is None else env
    value = (env.get(name) or "").strip() or None
    path = (env.get(f"{name}_FILE") or "").strip() or None
    if path is None:
        return value
    if value is not None:
        raise ConfigError(
            f"{name} and {name}_FILE are both set: set only one (the file keeps the secret"
            " out of the environment)"
        )
    return _secret_file(f"{name}_FILE", Path(path))


def _secret_file(variable: str, path: Path) -> str:
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_SECRET_FILE + 1)
    except FileNotFoundError:
        raise ConfigError(f"{variable}: {path} does not exist") from None
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise ConfigError(f"{variable}: cannot read {path}: {why}") from None
    if len(raw) > MAX_SECRET_FILE:
        raise ConfigError(
            f"{variable}: {path} is larger than {MAX_SECRET_FILE // 1024} KiB; a secret file"
            " holds only the secret"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{variable}: {path} is not UTF-8 text") from None
    # `echo secret > file` and most editors end the file with a newline; it is not part
    # of the secret. Any other whitespace is kept: it may be.
    text = text.removesuffix("\r\n") if text.endswith("\r\n") else text.removesuffix("\n")
    if not text.strip():
        raise ConfigError(f"{variable}: {path} is empty")
    return text


def webhook_url_problem(url: str) -> str | None:
    """Why `url` cannot take webhooks, or None."""
    if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
        return f"expected an http:// or https:// URL, got {url.split('://')[0]!r}://…"
    if any(c.isspace() for c in url) or len(url) > 2000:
        return "a URL has no spaces and at most 2000 characters"
    return None


_JOB_FIELDS = {
    "name",
    "kind",
    "schedule",
    "timezone",
    "timeout",
    "misfire",
    "misfire_grace",
    "overlap",
    "manual",
    "pause_after_failures",
    "webhooks",
    "params",
}


def load_jobs(
    path: Path,
    *,
    kinds: Mapping[str, Callable[[JobSpec], None]] | None = None,
    cross_check: Callable[[Sequence[JobSpec]], None] | None = None,
) -> tuple[JobSpec, ...]:
    """Read and validate a jobs file; errors name the file, the job and the field."""
    return parse_jobs(path, read_jobs_file(path), kinds=kinds, cross_check=cross_check)


def read_jobs_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"WORKER_JOBS_FILE: {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"WORKER_JOBS_FILE: cannot read {path}: {exc.strerror}") from None


def parse_jobs(
    path: Path,
    raw: bytes,
    *,
    kinds: Mapping[str, Callable[[JobSpec], None]] | None = None,
    cross_check: Callable[[Sequence[JobSpec]], None] | None = None,
) -> tuple[JobSpec, ...]:
    """Validate the jobs file `path` whose content is `raw`."""
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"WORKER_JOBS_FILE: {path} is not UTF-8 text: {exc.reason}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"WORKER_JOBS_FILE: {path} is not valid TOML: {exc}") from None
    tables = data.get("jobs", [])
    if not isinstance(tables, list):
        raise ConfigError(f"{path}: 'jobs' must be an array of tables ([[jobs]])")
    jobs: list[JobSpec] = []
    names: set[str] = set()
    for i, table in enumerate(tables):
        job = _job_from_table(path, i, table)
        if job.name in names:
            raise ConfigError(f"{path}: job {job.name!r}: name is used twice")
        names.add(job.name)
        if kinds is not None:
            check = kinds.get(job.kind)
            if check is None:
                raise ConfigError(
                    f"{path}: job {job.name!r}: kind {job.kind!r} is unknown; "
                    f"known kinds: {', '.join(sorted(kinds))}"
                )
            try:
                check(job)
            except (ValueError, TypeError, KeyError) as exc:
                raise ConfigError(f"{path}: job {job.name!r}: params: {exc}") from None
        jobs.append(job)
    if cross_check is not None:
        try:
            cross_check(jobs)
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return tuple(jobs)


def _job_from_table(path: Path, index: int, table: Any) -> JobSpec:
    where = f"{path}: jobs[{index}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    name = table.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: field 'name' is required (a non-empty string)")
    where = f"{path}: job {name!r}"
    unknown = set(table) - _JOB_FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")

    def bad(fld: str, why: str) -> ConfigError:
        return ConfigError(f"{where}: field {fld!r}: {why}")

    kind = table.get("kind")
    if not isinstance(kind, str) or not kind:
        raise bad("kind", "is required (a string such as 'http')")
    tz_name = table.get("timezone", "UTC")
    try:
        ZoneInfo(str(tz_name))
    except (ZoneInfoNotFoundError, ValueError):
        raise bad("timezone", f"unknown timezone {tz_name!r}") from None
    schedule: CronSchedule | None = None
    expr = table.get("schedule")
    if expr is not None:
        if not isinstance(expr, str):
            raise bad("schedule", "must be a cron string")
        try:
            schedule = CronSchedule(expr, str(tz_name))
        except ValueError as exc:
            raise bad("schedule", str(exc)) from None
    durations: dict[str, float] = {}
    for fld, default in (("timeout", 3600.0), ("misfire_grace", 60.0)):
        try:
            durations[fld] = parse_duration(table[fld]) if fld in table else default
        except ValueError as exc:
            raise bad(fld, str(exc)) from None
    misfire = table.get("misfire", "latest")
    if misfire not in ("skip", "latest", "all"):
        raise bad("misfire", f"must be skip, latest or all; got {misfire!r}")
    overlap = table.get("overlap", "forbid")
    if overlap not in OVERLAPS:
        raise bad("overlap", f"must be one of {', '.join(OVERLAPS)}; got {overlap!r}")
    manual = table.get("manual", True)
    if not isinstance(manual, bool):
        raise bad("manual", f"must be true or false; got {manual!r}")
    pause_after = table.get("pause_after_failures")
    if pause_after is not None and (
        isinstance(pause_after, bool) or not isinstance(pause_after, int) or pause_after < 1
    ):
        raise bad(
            "pause_after_failures",
            f"must be a whole number >= 1 (or left out); got {pause_after!r}",
        )
    hooks = table.get("webhooks", [])
    if not isinstance(hooks, list) or not all(isinstance(u, str) for u in hooks):
        raise bad("webhooks", 'must be a list of URLs, e.g. ["https://hooks.example/sync"]')
    for url in hooks:
        why = webhook_url_problem(url)
        if why:
            raise bad("webhooks", why)
    params = table.get("params", {})
    if not isinstance(params, dict):
        raise bad("params", "must be a table ([jobs.params])")
    return JobSpec(
        name=name,
        kind=kind,
        schedule=schedule,
        timezone=str(tz_name),
        timeout=durations["timeout"],
        misfire=misfire,
        misfire_grace=durations["misfire_grace"],
        overlap=overlap,
        manual=manual,
        pause_after_failures=pause_after,
        webhooks=tuple(hooks),
        params=params,
    )
