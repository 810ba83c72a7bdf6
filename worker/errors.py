"""The package's exceptions: one base, one subclass per kind of failure."""

from __future__ import annotations


class WorkerError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(WorkerError):
    """Bad settings or a bad jobs file; the message names the variable and the fix."""


class Fenced(WorkerError):
    """A leader write was refused because a newer leader raised the fence."""

    def __init__(self, token: int, current: int | None) -> None:
        super().__init__(f"write fenced: our token {token} is stale, the fence is at {current}")
        self.token = token
        self.current = current


class UpstreamError(WorkerError):
    """An upstream API call failed for good (after retries, or a non-retryable status)."""

    def __init__(self, message: str, *, status: int | None = None, url: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.url = url


class ItemGone(UpstreamError):
    """The vendor says the item no longer exists: it ended (sold, expired, delisted) or
    never existed (eBay getItem's errorId 11001)."""


class JobError(WorkerError):
    """A run failed for a reason the job itself reports (a cap reached, a bad response)."""


class Unreachable(WorkerError):
    """A service the worker needs (Postgres, Redis) did not answer; the message names it."""
