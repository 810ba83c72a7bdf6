"""What the fake event sites (Fienta, Eventim, Kontramarka) share: the request log and
robots.txt, each served at the root of its own origin as the real sites do."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web


@dataclass
class SiteRequest:
    """One request a fake site received, for tests to inspect."""

    at: float
    path: str
    query: dict[str, str]
    user_agent: str
    status: int = 0


R = TypeVar("R", bound=SiteRequest)


def log_request(log: list[R], clock: Callable[[], float], request: web.Request, kind: type[R]) -> R:
    """Append the request to `log` (as a `kind`) and return the record."""
    record = kind(
        at=clock(),
        path=request.path,
        query=dict(request.query),
        user_agent=request.headers.get("User-Agent", ""),
    )
    log.append(record)
    return record


def robots_answer(record: SiteRequest, text: str | None, status: int = 200) -> web.Response:
    """The site's robots.txt (`text`), or a 404 when it has none; noted on `record`."""
    if text is None:
        record.status = 404
        return web.Response(status=404, text="Not Found")
    record.status = status
    return web.Response(status=status, text=text, content_type="text/plain")
