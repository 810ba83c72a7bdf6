"""The one outbound HTTP client: timeouts, rate limiting, retries with backoff, metrics.

Retries: connection errors, timeouts, 5xx and 429 (honouring Retry-After), with
exponential backoff and full jitter. Never other 4xx: those are our mistake.

The loop is written out rather than built on tenacity: the wait depends on the
answer (Retry-After, a 429 without it waits one rate window), the last answer is
returned rather than raised, each attempt takes its own rate-limit permit, and a
retry is reported to the caller. Each is a line here, and a callback there.

URLs are shown redacted everywhere (logs, errors, `Response.url`): no userinfo, no
query values. Metric labels carry the host (and port) only.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, ClassVar
from urllib.parse import urlsplit

import aiohttp
import orjson
import yarl
from multidict import CIMultiDict

from . import metrics
from .errors import UpstreamError
from .logs import redact
from .ratelimit import Permit, RateLimiter

log = logging.getLogger(__name__)

REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10  # aiohttp's own default
# The request headers a redirect to another origin keeps: none that can carry a secret.
SAFE_ACROSS_ORIGINS = frozenset({"accept", "accept-language", "content-type", "user-agent"})


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    base: float = 0.5
    cap: float = 30.0
    max_retry_after: float = 120.0  # a server asking for longer gets this much
    rate_limited_wait: float = 1.0  # after a 429 without Retry-After, on an unlimited key

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt)], attempt from 0."""
        return random.uniform(0, min(self.cap, self.base * 2**attempt))


@dataclass(frozen=True)
class Timeouts:
    """Per-job timeouts in seconds; None keeps the session's (see `open_upstream`)."""

    connect: float | None = None  # a connection: pool wait, DNS, TCP, TLS
    read: float | None = None  # the longest silence while waiting for or reading the answer
    total: float | None = None  # one attempt, end to end

    PARAMS: ClassVar[dict[str, str]] = {
        "connect_timeout": "connect",
        "read_timeout": "read",
        "total_timeout": "total",
    }

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Timeouts:
        """From job params `connect_timeout`, `read_timeout`, `total_timeout`.

        Raises ValueError naming the param when one is not a positive number of seconds,
        or when the total is shorter than the connect or read timeout.
        """
        values: dict[str, float] = {}
        for param, field in cls.PARAMS.items():
            if param not in params:
                continue
            value = params[param]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"'{param}' must be a number of seconds, got {value!r}")
            if not 0 < value < math.inf:
                raise ValueError(f"'{param}' must be more than 0 seconds, got {value!r}")
            values[field] = float(value)
        total = values.get("total")
        for field in ("connect", "read"):
            if total is not None and values.get(field, 0.0) > total:
                raise ValueError(
                    f"'{field}_timeout' ({values[field]:g}s) is longer than"
                    f" 'total_timeout' ({total:g}s)"
                )
        return cls(**values)

    def apply(self, base: aiohttp.ClientTimeout) -> aiohttp.ClientTimeout:
        """`base` with the timeouts this sets."""
        connect = self.connect
        return aiohttp.ClientTimeout(
            total=base.total if self.total is None else self.total,
            connect=base.connect if connect is None else connect,
            sock_connect=base.sock_connect if connect is None else connect,
            sock_read=base.sock_read if self.read is None else self.read,
            ceil_threshold=base.ceil_threshold,
        )


# Told of each retry before its wait, e.g. "page 5: retry 1/3 after a read timeout".
OnRetry = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str  # redacted: fit for messages

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
    """Shared client session plus the rate limiter; one per process.

    `bound()` gives a run its own view: the same session and limiter, with the job's
    timeouts and a callback told of each retry.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        limiter: RateLimiter,
        *,
        retry: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
        on_retry: OnRetry | None = None,
    ) -> None:
        self.session = session
        self.limiter = limiter
        self.retry = retry or RetryPolicy()
        self.timeout = (timeouts or Timeouts()).apply(session.timeout)
        self.on_retry = on_retry

    def bound(
        self, *, timeouts: Timeouts | None = None, on_retry: OnRetry | None = None
    ) -> Upstream:
        """This client with other timeouts and/or a retry callback (e.g. one run's)."""
        on_retry = on_retry or self.on_retry
        view = Upstream(self.session, self.limiter, retry=self.retry, on_retry=on_retry)
        view.timeout = (timeouts or Timeouts()).apply(self.timeout)
        return view

    async def request(
        self,
        method: str,
        url: str,
        *,
        limit_key: str | None = None,
        retry: RetryPolicy | None = None,
        retry_statuses: frozenset[int] = frozenset(),
        what: str | None = None,
        **kwargs: Any,
    ) -> Response:
        """Send with retries; returns the last response (any status) or raises UpstreamError.

        A final non-2xx is returned, not raised: callers decide what a status means.
        `limit_key` defaults to the URL's host[:port]. `what` names what is fetched
        ("page 5") in logs, errors and retry messages.
        """
        policy = retry or self.retry
        shown = redact_url(url)
        host = host_label(url)
        key = limit_key or host
        fetching = f"{what}: " if what else ""  # prefixes log lines and the error
        last_error = ""
        for attempt in range(policy.attempts):
            outcome = await self._attempt(method, url, shown, host, key, kwargs)
            if isinstance(outcome, Response):
                status = outcome.status
                retryable = status >= 500 or status == 429 or status in retry_statuses
                if not retryable or attempt == policy.attempts - 1:
                    return outcome
                code, reason = str(status), f"HTTP {status}"
                last_error = reason
                wait = self._wait_after(policy, attempt, key, outcome)
            else:
                code, reason, last_error = outcome
                wait = policy.backoff(attempt)
            if attempt == policy.attempts - 1:
                break
            metrics.UPSTREAM_RETRIES.labels(host, code).inc()
            log.warning(
                "upstream %s%s %s failed (%s), retry %d/%d in %.2fs",
                fetching,
                method,
                shown,
                last_error,
                attempt + 1,
                policy.attempts - 1,
                wait,
                extra={"url": shown},
            )
            label = what or f"{method} {shown}"
            await self._pause(
                f"{label}: retry {attempt + 1}/{policy.attempts - 1} after {reason}", wait
            )
        raise UpstreamError(
            f"{fetching}{method} {shown} failed after {policy.attempts} attempts: {last_error}",
            url=shown,
        )

    async def _attempt(
        self, method: str, url: str, shown: str, host: str, key: str, kwargs: dict[str, Any]
    ) -> Response | tuple[str, str, str]:
        """One attempt: the response, or (metric code, reason, error text) of a failure."""
        pending = self.timeout.connect or self.timeout.sock_connect or self.timeout.total or 60.0
        try:
            async with self.limiter.slot(key, pending=pending) as permit:
                started = time.perf_counter()  # latency excludes the wait for a permit
                response = await self._follow(method, url, shown, permit, kwargs)
        except (aiohttp.ClientError, TimeoutError) as exc:
            timeout = isinstance(exc, TimeoutError)
            code = "timeout" if timeout else "error"
            metrics.UPSTREAM_REQUESTS.labels(host, code).inc()
            text = redact(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            return code, _reason(exc), f"{_reason(exc)} ({text})" if timeout else text
        metrics.UPSTREAM_REQUESTS.labels(host, str(response.status)).inc()
        metrics.UPSTREAM_DURATION.labels(host).observe(time.perf_counter() - started)
        return response

    async def _follow(
        self, method: str, url: str, shown: str, permit: Permit, kwargs: dict[str, Any]
    ) -> Response:
        """One request and the redirects it is answered with (up to MAX_REDIRECTS),
        followed here rather than by aiohttp: aiohttp keeps every header but
        `Authorization` on a redirect to another origin, and a job's credentials also
        travel as `X-API-Key` and the like (`headers_env`). Across origins only the
        headers in `SAFE_ACROSS_ORIGINS` go on; a 303, and a 301 or 302 after a POST,
        go on as a GET without the body, as browsers do."""
        first = yarl.URL(url)
        for hop in range(MAX_REDIRECTS + 1):
            async with self.session.request(
                method,
                url,
                timeout=self.timeout,
                trace_request_ctx=permit,
                allow_redirects=False,
                **kwargs,
            ) as resp:
                body = await resp.read()
                location = resp.headers.get("Location")
                if resp.status not in REDIRECTS or not location or hop == MAX_REDIRECTS:
                    return Response(resp.status, CIMultiDict(resp.headers), body, shown)
                target = resp.url.join(yarl.URL(location))
            if target.scheme not in ("http", "https"):
                raise aiohttp.InvalidURL(f"redirected to a {target.scheme or 'relative'} URL")
            kwargs = {k: v for k, v in kwargs.items() if k != "params"}  # in the Location
            if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
                method = "GET"
                kwargs = {k: v for k, v in kwargs.items() if k not in ("json", "data")}
            if target.origin() != first.origin():
                kwargs = _safe_across_origins(kwargs)
            url = str(target)
        raise AssertionError("unreachable")  # the last hop returns

    def _wait_after(self, policy: RetryPolicy, attempt: int, key: str, response: Response) -> float:
        asked = retry_after(response.headers)
        if asked is None:
            # Some APIs say it in the body instead: Fienta's 429 carries a top-level
            # `retry_after` in seconds and no header.
            asked = body_retry_after(response)
        if asked is None and response.status == 429:
            # A rate limit without Retry-After (eMAG sends only X-RateLimit-*):
            # retrying inside the same window would only be refused again.
            rate = self.limiter.rate(key)
            asked = rate.window if rate.calls else policy.rate_limited_wait
        return max(policy.backoff(attempt), min(asked or 0.0, policy.max_retry_after))

    async def _pause(self, message: str, wait: float) -> None:
        """Sleep out the wait while `on_retry` is told (bounded: it delays the retry by
        at most a few seconds, and its failure costs only a log line)."""
        on_retry = self.on_retry
        if on_retry is None:
            await asyncio.sleep(wait)
            return

        async def tell() -> None:
            try:
                async with asyncio.timeout(max(wait, 5.0)):
                    await on_retry(message)
            except Exception:  # isolation: a progress note must not fail the fetch
                log.warning("could not report %r", message, exc_info=True)

        async with asyncio.TaskGroup() as group:
            group.create_task(tell(), name="upstream-on-retry")
            group.create_task(asyncio.sleep(wait), name="upstream-backoff")


def _reason(exc: BaseException) -> str:
    """A failed attempt in a few words, for the progress message."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "a connect timeout"
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return "a read timeout"
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return "a timeout"
    if isinstance(exc, TimeoutError):
        return "the total timeout"
    return "a connection error"


def host_label(url: str) -> str:
    """`host[:port]` of a URL: never its userinfo. The metric label and default limit key."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{host}:{port}" if port else host


def redact_url(url: str) -> str:
    """The URL fit to show: no userinfo, no query or fragment values."""
    shown: str = redact(url)
    return shown


def sent_tracer() -> aiohttp.TraceConfig:
    """Tells a call's `Permit` (its `trace_request_ctx`) when its request goes out."""

    async def on_sent(_: aiohttp.ClientSession, ctx: SimpleNamespace, __: object) -> None:
        permit = ctx.trace_request_ctx
        if isinstance(permit, Permit):
            permit.sent()

    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(on_sent)
    trace.on_request_chunk_sent.append(on_sent)
    trace.freeze()
    return trace


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


def body_retry_after(response: Response) -> float | None:
    """A 429's top-level `retry_after` (seconds) in a JSON body, if it has one."""
    if response.status != 429 or not response.body.lstrip().startswith(b"{"):
        return None
    try:
        body = orjson.loads(response.body)
    except orjson.JSONDecodeError:
        return None
    value = body.get("retry_after") if isinstance(body, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return float(value)


def _safe_across_origins(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A request's arguments fit for another origin: no credentials, headers kept only
    when in SAFE_ACROSS_ORIGINS."""
    kept = {k: v for k, v in kwargs.items() if k not in ("auth", "cookies")}
    headers = kwargs.get("headers")
    if headers:
        kept["headers"] = {k: v for k, v in headers.items() if k.lower() in SAFE_ACROSS_ORIGINS}
    return kept


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
    read_timeout: float = 30.0,
    total_timeout: float = 120.0,
    retry: RetryPolicy | None = None,
) -> AsyncIterator[Upstream]:
    """One ClientSession with explicit connect/read/total timeouts (jobs may override them)
    and the trace hooks that tell the rate limiter when each request went out."""
    timeout = aiohttp.ClientTimeout(
        total=total_timeout,
        connect=connect_timeout,
        sock_connect=connect_timeout,
        sock_read=read_timeout,
    )
    async with aiohttp.ClientSession(
        timeout=timeout, raise_for_status=False, trace_configs=[sent_tracer()]
    ) as session:
        yield Upstream(session, limiter or RateLimiter(), retry=retry)
