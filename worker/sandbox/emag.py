"""The eMAG Marketplace API (v4.4.x) product_offer count/read, as the sandbox serves it.

Routes: POST /emag/{platform}/api-3/product_offer/count and .../read, HTTP
Basic auth per account, the {"isError", "messages", "results"} envelope, at
most 100 items per page, and the per-login request limit answered with the 429
that eMAG's document (v4.4.9, §1.5) shows. The count answer is not in eMAG's
document: it is served as clients see it, numeric strings, and can be broken
on purpose (see `Faults`).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from .state import (
    RECORD,
    SANDBOX,
    Rejected,
    Sandbox,
    basic_credentials,
    failure_response,
    json_response,
    truncated_json,
    with_nul,
)

MAX_PER_PAGE = 100
EMAG_RATE = 3  # eMAG's documented limit for product_offer: 3 requests per second
RATE_LIMITED = b'{"message":"API rate limit exceeded"}'
PREFIX = "/emag/{platform}/api-3/product_offer"


def add_routes(app: web.Application) -> None:
    app.router.add_post(f"{PREFIX}/count", count)
    app.router.add_post(f"{PREFIX}/read", read)


def envelope(results: Any, *messages: str) -> dict[str, Any]:
    return {"isError": bool(messages), "messages": list(messages), "results": results}


@dataclass(frozen=True)
class _Caller:
    platform: str
    account: str
    headers: Mapping[str, str]


async def count(request: web.Request) -> web.Response:
    """`noOfItems`/`noOfPages`/`itemsPerPage`: strings, as clients of the real API see
    them; numbers, missing fields, any value or isError when the faults say so."""
    sandbox, caller = _admit(request)
    data = await _data(request)
    per_page = _int_field(data, "itemsPerPage", MAX_PER_PAGE)
    if not 1 <= per_page <= MAX_PER_PAGE:
        return _error(caller, f"itemsPerPage must be between 1 and {MAX_PER_PAGE}")
    faults = sandbox.faults
    if faults.emag_count_error:
        return _error(caller, faults.emag_count_error)
    total = sandbox.catalog.emag_count(caller.platform, caller.account)
    results: dict[str, Any] = {
        "noOfItems": total,
        "noOfPages": -(-total // per_page),
        "itemsPerPage": per_page,
    }
    if faults.emag_count_as_strings:
        results = {key: str(value) for key, value in results.items()}
    if faults.emag_count_value is not None:
        results["noOfItems"] = results["noOfPages"] = faults.emag_count_value
    if faults.emag_count_without_fields:
        results = {}
    return json_response(envelope(results), headers=caller.headers)


async def read(request: web.Request) -> web.Response:
    """One page of offers; faults for the page are applied here."""
    sandbox, caller = _admit(request)
    data = await _data(request)
    page = _int_field(data, "currentPage", 1)
    per_page = _int_field(data, "itemsPerPage", MAX_PER_PAGE)
    request[RECORD].page = page
    if not 1 <= per_page <= MAX_PER_PAGE:
        return _error(caller, f"itemsPerPage must be between 1 and {MAX_PER_PAGE}")
    if page < 1:
        return _error(caller, "currentPage must be 1 or more")
    await sandbox.page_delay(page)
    faults = sandbox.faults
    if page in faults.error_pages:
        return _error(caller, f"Sandbox fault: page {page} could not be read")
    offers = sandbox.catalog.emag_page(
        caller.platform, caller.account, page=page, per_page=per_page
    )
    if page in faults.malformed_item_pages and offers:
        broken = dict(offers[0], sale_price="abc")
        del broken["id"]
        offers[0] = broken
    if page in faults.nul_item_pages and offers:
        offers[0] = with_nul(offers[0])
    if page in faults.malformed_json_pages:
        return truncated_json(envelope(offers))
    return json_response(envelope(offers), headers=caller.headers)


def _admit(request: web.Request) -> tuple[Sandbox, _Caller]:
    """Authenticate, apply the rate limit and queued failures, in that order."""
    sandbox = request.app[SANDBOX]
    record = request[RECORD]
    record.api = "emag"
    platform = request.match_info["platform"]
    users = sandbox.emag_users.get(platform)
    if users is None:
        raise Rejected(json_response(envelope([], f"Unknown platform {platform!r}"), status=404))
    account = _authenticate(request, users)
    if account is None:
        raise Rejected(
            json_response(
                envelope([], "Invalid username or password"),
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="eMAG Marketplace API"'},
            )
        )
    record.who = account
    headers: dict[str, str] = {}
    limit = sandbox.limit()
    if sandbox.faults.emag_rate_limited_next > 0:
        sandbox.faults.emag_rate_limited_next -= 1
        raise Rejected(_rate_limited(limit or EMAG_RATE))
    if limit:
        # One window per seller login on one platform (logins and accounts are 1:1).
        remaining = sandbox.window.admit(f"emag:{platform}:{account}", limit)
        if remaining is None:
            raise Rejected(_rate_limited(limit))
        headers = {
            "X-RateLimit-Limit-3second": str(limit),
            "X-RateLimit-Remaining-3second": str(remaining),
        }
    status = sandbox.take_failure()
    if status is not None:
        raise Rejected(failure_response(status))
    return sandbox, _Caller(platform=platform, account=account, headers=headers)


def _rate_limited(limit: int) -> web.Response:
    """The 429 of eMAG's document (v4.4.9, §1.5), byte for byte: no isError envelope
    and no Retry-After (its `Server: kong` suggests a gateway in front of the API)."""
    return web.Response(
        status=429,
        body=RATE_LIMITED,
        headers={
            "Content-Type": "application/json; charset=utf-8",
            "X-RateLimit-Limit-3second": str(limit),
            "X-RateLimit-Remaining-3second": "0",
            "Server": "kong/0.12.1",
        },
    )


def _authenticate(request: web.Request, users: Mapping[str, tuple[str, str]]) -> str | None:
    """The account whose Basic credentials the request carries, if they are right."""
    credentials = basic_credentials(request.headers.get("Authorization", ""))
    if credentials is None:
        return None
    login, given = credentials
    account, password = users.get(login, ("", ""))
    if not account or not hmac.compare_digest(password.encode(), given.encode()):
        return None
    return account


async def _data(request: web.Request) -> Mapping[str, Any]:
    """The request's parameters: JSON {"data": {...}} or bare, or a PHP-style form."""
    if request.content_type == "application/x-www-form-urlencoded":
        form = await request.post()
        return {
            key.removeprefix("data[").removesuffix("]"): value
            for key, value in form.items()
            if isinstance(value, str)
        }
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Rejected(json_response(envelope([], "Invalid JSON in request body"))) from None
    if not isinstance(body, dict):
        raise Rejected(json_response(envelope([], "The request body must be a JSON object")))
    data = body.get("data", body)
    return data if isinstance(data, dict) else {}


def _int_field(data: Mapping[str, Any], name: str, default: int) -> int:
    value = data.get(name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise Rejected(json_response(envelope([], f"{name} must be an integer"))) from None


def _error(caller: _Caller, message: str) -> web.Response:
    return json_response(envelope([], message), headers=caller.headers)
