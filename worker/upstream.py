"""The one outbound HTTP client: timeouts, rate limiting, retries with backoff, metrics.

Retries: connection errors, timeouts, 5xx and 429 (honouring Retry-After), with
exponential backoff and full jitter. Never other 4xx: those are our mistake.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from multidict import CIMultiDict

from . import metrics
from .errors import UpstreamError
from .ratelimit import RateLimiter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    base: float = 0.5
    cap: float = 30.0
    max_retry_after: float = 120.0  # a server asking for longer gets this much
    rate_limited_wait: float = 1.0  # after a 429 that names no Retry-After

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
        return random.uniform(0, min(self.cap, self.base * 2**attempt))


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            snippet = self.body[:120].decode("utf-8", "replace")
            raise UpstreamError(
                f"malformed JSON from {self.url}: {exc} (body starts {snippet!r})",
                status=self.status,
                url=self.url,
            ) from None


class Upstream:
    """Shared client session plus the rate limiter; one per process."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        limiter: RateLimiter,
        *,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.session = session
        self.limiter = limiter
        self.retry = retry or RetryPolicy()

    async def request(
        self,
        method: str,
        url: str,
        *,
        limit_key: str | None = None,
        retry: RetryPolicy | None = None,
        retry_statuses: frozenset[int] = frozenset(),
        **kwargs: Any,
    ) -> Response:
        """Send with retries; returns the last response (any status) or raises UpstreamError.

        A final non-2xx is returned, not raised: callers decide what a status means.
        `limit_key` defaults to the URL's host.
        """
        policy = retry or self.retry
        host = urlsplit(url).hostname or "?"
        key = limit_key or host
        last_error = ""
        for attempt in range(policy.attempts):
            try:
                async with self.limiter.slot(key):
                    started = time.perf_counter()  # latency excludes the wait for a permit
                    async with self.session.request(method, url, **kwargs) as resp:
                        body = await resp.read()
                        response = Response(resp.status, CIMultiDict(resp.headers), body, url)
            except (aiohttp.ClientError, TimeoutError) as exc:
                code = "timeout" if isinstance(exc, TimeoutError) else "error"
                metrics.UPSTREAM_REQUESTS.labels(host, code).inc()
                last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                wait = policy.backoff(attempt)
            else:
                metrics.UPSTREAM_REQUESTS.labels(host, str(response.status)).inc()
                metrics.UPSTREAM_DURATION.labels(host).observe(time.perf_counter() - started)
                retryable = (
                    response.status >= 500
                    or response.status == 429
                    or response.status in retry_statuses
                )
                if not retryable or attempt == policy.attempts - 1:
                    return response
                last_error = f"HTTP {response.status}"
                asked = retry_after(response.headers)
                if asked is None and response.status == 429:
                    # A rate limit without Retry-After (eMAG sends only X-RateLimit-*):
                    # retrying inside the same window would only be refused again.
                    asked = policy.rate_limited_wait
                wait = max(policy.backoff(attempt), min(asked or 0.0, policy.max_retry_after))
            if attempt < policy.attempts - 1:
                log.info(
                    "upstream %s %s failed (%s), retry %d/%d in %.2fs",
                    method,
                    url,
                    last_error,
                    attempt + 1,
                    policy.attempts - 1,
                    wait,
                )
                await asyncio.sleep(wait)
        raise UpstreamError(
            f"{method} {url} failed after {policy.attempts} attempts: {last_error}", url=url
        )


def error_detail(response: Response) -> str:
    """What an error answer says: eBay's errors, eMAG's messages, or a body snippet."""
    try:
        body = orjson.loads(response.body)
    except orjson.JSONDecodeError:
        return repr(response.body[:160].decode("utf-8", "replace")) if response.body else "(empty)"
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list) and errors:
            return "; ".join(
                f"{e.get('errorId')}: {e.get('message')}" if isinstance(e, dict) else str(e)
                for e in errors
            )
        for key in ("messages", "message", "error_description", "error"):
            if body.get(key):
                value = body[key]
                return "; ".join(map(str, value)) if isinstance(value, list) else str(value)
    return str(body)[:200]


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from Retry-After (seconds or an HTTP date), if present."""
    value = headers.get("Retry-After") or headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


@asynccontextmanager
async def open_upstream(
    *,
    limiter: RateLimiter | None = None,
    connect_timeout: float = 10.0,
    read_timeout: float = 60.0,
    total_timeout: float = 300.0,
    retry: RetryPolicy | None = None,
) -> AsyncIterator[Upstream]:
    """One ClientSession with explicit connect/read/total timeouts."""
    timeout = aiohttp.ClientTimeout(
        total=total_timeout, sock_connect=connect_timeout, sock_read=read_timeout
    )
    async with aiohttp.ClientSession(timeout=timeout, raise_for_status=False) as session:
        yield Upstream(session, limiter or RateLimiter(), retry=retry)
