"""The sandbox's runtime state: faults, the request log, rate windows, issued tokens."""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import orjson
from aiohttp import web

from .catalog import Catalog

Clock = Callable[[], float]

FAIL_STATUSES = (500, 502, 503)


@dataclass
class Faults:
    """What the sandbox breaks on purpose; change it at run time through `SANDBOX`.

    Pages are 1-based; for eBay the page of a request is `offset // limit + 1`.
    Page faults are persistent (remove the page to heal it); `fail_next` is
    consumed one request at a time.
    """

    delay: float = 0.0
    """Seconds to wait before answering a slow page."""
    slow_pages: set[int] = field(default_factory=set)
    """Pages that are slow; empty means every page (when `delay` > 0)."""
    fail_next: int = 0
    """The next N data requests (not token requests) fail with `fail_status`."""
    fail_status: int = 503
    malformed_json_pages: set[int] = field(default_factory=set)
    malformed_item_pages: set[int] = field(default_factory=set)
    """The first item on these pages loses its id and gets the price "abc"."""
    nul_item_pages: set[int] = field(default_factory=set)
    """eMAG: the first item on these pages carries NUL characters (see `with_nul`)."""
    emag_count_as_strings: bool = True
    """eMAG: count values as strings (`"noOfItems": "38"`), as clients see them; false
    sends numbers. eMAG's document does not define the count answer at all."""
    emag_count_without_fields: bool = False
    """eMAG: count answers `"results": {}`, without noOfItems, noOfPages, itemsPerPage."""
    emag_count_value: Any = None
    """eMAG: when not None, count answers this as noOfItems and noOfPages ("abc", -1, …)."""
    emag_count_error: str = ""
    """eMAG: when set, count answers HTTP 200, isError true, with this message."""
    emag_rate_limited_next: int = 0
    """eMAG: the next N requests get the documented 429, whatever the window holds (as if
    another client of the same seller login had used the window up)."""
    error_pages: set[int] = field(default_factory=set)
    """eMAG: HTTP 200 with isError true; eBay: HTTP 500 with errorId 12000."""
    ebay_total_skew: int = 0
    """eBay: percent by which `total` misstates the matches (-20: 20 % too few, +20: 20 %
    too many). eBay calls `total` "just an indicator"; `next` always tells the truth."""
    ebay_next_past_cap: bool = False
    """eBay: on the page that reaches the 10 000th result, still offer `next` when more
    items match (at an offset it then refuses, 12029). eBay's documents do not say."""
    rate_limit: bool = True
    """False lifts the rate limit (for benchmarks)."""
    hang: bool = False
    """While true, every API request (eMAG, eBay, OAuth) is held without an answer: an
    upstream that hangs. Clearing it answers the requests still held, as if the
    upstream woke up (a client that gave up meanwhile is gone by then)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.fail_status not in FAIL_STATUSES:
            raise ValueError(f"fail_status must be one of {FAIL_STATUSES}, not {self.fail_status}")
        if self.delay < 0 or self.fail_next < 0:
            raise ValueError("delay and fail_next must not be negative")
        if self.emag_rate_limited_next < 0 or not isinstance(self.emag_count_error, str):
            raise ValueError("emag_rate_limited_next must be >= 0, emag_count_error a string")
        if self.ebay_total_skew < -100:
            raise ValueError("ebay_total_skew is a percent and must be -100 or more")

    def is_slow(self, page: int) -> bool:
        return self.delay > 0 and (not self.slow_pages or page in self.slow_pages)

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply a JSON object of field values (lists for the page sets)."""
        kinds = {f.name: str(f.type) for f in fields(self)}
        new: dict[str, Any] = {}
        for name, value in changes.items():
            kind = kinds.get(name)
            if kind is None:
                raise ValueError(f"unknown fault {name!r}")
            if kind == "bool" and not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false")
            if kind.startswith("set"):
                value = {int(page) for page in value}
            elif kind in ("int", "float"):
                value = int(value) if kind == "int" else float(value)
            new[name] = value
        replace(self, **new)  # validates the result before anything changes
        for name, value in new.items():
            setattr(self, name, value)

    def as_json(self) -> dict[str, Any]:
        return {
            name: sorted(value) if isinstance(value, set) else value
            for name, value in asdict(self).items()
        }


@dataclass(slots=True)
class RequestRecord:
    """One request the sandbox answered (its arrival time is on the sandbox clock)."""

    at: float
    method: str
    path: str
    api: str = ""
    who: str = ""
    page: int | None = None
    offset: int | None = None
    status: int = 0


class Rejected(Exception):
    """Raised by a check that has already built the answer to send."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def basic_credentials(header: str) -> tuple[str, str] | None:
    """(login, password) from an `Authorization: Basic ...` header, or None."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    login, colon, password = decoded.partition(":")
    return (login, password) if colon else None


def json_response(
    data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, headers=headers, content_type="application/json"
    )


class RateWindow:
    """At most `limit` admitted arrivals per key in any sliding window of `period`."""

    def __init__(self, *, period: float, clock: Clock) -> None:
        self._period = period
        self._clock = clock
        self._arrivals: dict[str, deque[float]] = {}

    def admit(self, key: str, limit: int) -> int | None:
        """Admit one arrival: the remaining allowance, or None when over the limit."""
        now = self._clock()
        arrivals = self._arrivals.setdefault(key, deque())
        while arrivals and arrivals[0] <= now - self._period:
            arrivals.popleft()
        if len(arrivals) >= limit:
            return None
        arrivals.append(now)
        return limit - len(arrivals)


@dataclass
class Sandbox:
    """Everything the handlers share; stored in the app under `SANDBOX`."""

    catalog: Catalog
    faults: Faults
    emag_users: dict[str, dict[str, tuple[str, str]]]
    """platform -> username -> (account, password)."""
    ebay_client: tuple[str, str]
    rate: int = 3
    period: float = 1.0
    token_ttl: float = 7200.0
    clock: Clock = time.monotonic
    requests: list[RequestRecord] = field(default_factory=list)
    tokens: dict[str, tuple[str, float]] = field(default_factory=dict)
    """access token -> (client id, expiry on the sandbox clock)."""
    tokens_issued: int = 0
    window: RateWindow = field(init=False)

    def __post_init__(self) -> None:
        self.window = RateWindow(period=self.period, clock=self.clock)

    def limit(self) -> int:
        """Requests allowed per window right now; 0 means unlimited."""
        return self.rate if self.faults.rate_limit else 0

    def take_failure(self) -> int | None:
        """The status to fail this request with, if a failure is queued."""
        if self.faults.fail_next <= 0:
            return None
        self.faults.fail_next -= 1
        return self.faults.fail_status

    async def hold_while_hung(self) -> None:
        """Return once `faults.hang` is clear (at once when it is). Polled: faults are
        plain fields, changed by tests and by POST /_sandbox/faults."""
        while True:
            if not self.faults.hang:
                return
            await asyncio.sleep(0.01)

    async def page_delay(self, page: int) -> None:
        if self.faults.is_slow(page):
            await asyncio.sleep(self.faults.delay)


def failure_response(status: int) -> web.Response:
    """What a failing gateway in front of the API sends: not JSON."""
    reason = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
    return web.Response(
        status=status,
        text=f"<html><body><h1>{status} {reason.get(status, 'Error')}</h1></body></html>",
        content_type="text/html",
    )


def with_nul(item: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an offer with NUL characters, which JSON allows and Postgres refuses in
    text and jsonb: inside its name, and in a key and a value of a nested field."""
    hostile = dict(item)
    name = str(hostile.get("name", ""))
    hostile["name"] = f"{name[:3]}\x00{name[3:]}"
    hostile["characteristics"] = [{"id": 1, "name\x00": "colour", "value": "red\x00\x00"}]
    return hostile


def truncated_json(payload: Any) -> web.Response:
    """A 200 whose JSON body is cut in half (a dropped connection behind a proxy)."""
    body = orjson.dumps(payload)
    return web.Response(body=body[: max(len(body) // 2, 1)], content_type="application/json")


SANDBOX = web.AppKey("sandbox", Sandbox)
REQUESTS = web.AppKey("sandbox_requests", list[RequestRecord])
RECORD = web.RequestKey("sandbox_record", RequestRecord)
