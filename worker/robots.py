"""Polite crawling: an honest `User-Agent` naming the project, and the site's robots.txt.

A parser fetches `/robots.txt` of the site's origin once per run, through the same
rate-limited client as everything else it sends, and refuses the run (`Disallowed`)
when the path it is about to read is disallowed for its agent. The statuses follow
RFC 9309 §2.3.1: a 4xx (404 above all) means there are no rules, so everything is
allowed; a 5xx or a 429 that outlasts the retries means the rules are unknown, which
the RFC says to read as "everything disallowed". A connection that never answers
fails the run as any upstream failure does.

The standard library's `urllib.robotparser` reads the rules: the first matching rule
of the group for our product token (or `*`) decides, and it knows no `*`/`$`
wildcards inside paths (RFC 9309 lets the longest match decide); good enough to honour
a site that disallows a whole path, which is what sites do to scrapers.
"""

from __future__ import annotations

import functools
import importlib.metadata
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit
from urllib.robotparser import RobotFileParser

from .errors import JobError
from .upstream import Response

PRODUCT = "sync-worker"  # the product token robots.txt groups are matched against


class Fetcher(Protocol):
    """The part of `Upstream` used here (tests may pass a small fake)."""

    async def request(
        self,
        method: str,
        url: str,
        *,
        limit_key: str | None = None,
        what: str | None = None,
        **kwargs: Any,
    ) -> Response: ...


class Disallowed(JobError):
    """The site's robots.txt does not let our agent read what the run needs."""


@functools.cache
def version() -> str:
    """This package's version, as installed."""
    try:
        return importlib.metadata.version("sync-worker")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def user_agent(contact: str | None = None) -> str:
    """`sync-worker/<version>`, plus `(+<contact>)` when the operator gives a URL or an
    address where the site can reach whoever runs it."""
    agent = f"{PRODUCT}/{version()}"
    return f"{agent} (+{contact})" if contact else agent


def robots_url(url: str) -> str:
    """The robots.txt that governs `url`: at the root of its origin."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/robots.txt", "", ""))


async def ensure_allowed(
    client: Fetcher, url: str, *, agent: str, limit_key: str | None = None
) -> None:
    """Fetch the robots.txt governing `url` and raise `Disallowed` unless it lets
    `agent` read `url`. One request; the client's retries apply."""
    where = robots_url(url)
    response = await client.request(
        "GET", where, limit_key=limit_key, what="robots.txt", headers={"User-Agent": agent}
    )
    path = urlsplit(url).path or "/"
    if response.status == 429 or response.status >= 500:
        raise Disallowed(
            f"robots.txt at {where} could not be read (HTTP {response.status} after retries);"
            f" RFC 9309 says to assume everything is disallowed, so the run does not read"
            f" {path}. Try again later, or set respect_robots = false if the site has given"
            " you permission"
        )
    if not response.ok:  # 4xx: no rules (RFC 9309 §2.3.1.3)
        return
    parser = RobotFileParser(where)
    parser.parse(response.body.decode("utf-8", "replace").lstrip("\ufeff").splitlines())
    if not parser.can_fetch(agent, url):
        raise Disallowed(
            f"robots.txt at {where} disallows {path} for {agent.split('/')[0]!r}:"
            " the run stops here without reading it. Set respect_robots = false only if"
            " the site has given you permission"
        )
