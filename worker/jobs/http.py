"""Job kind `http`: a scheduled HTTP request, e.g. the main server poking a parser.

Every request carries X-Worker-Job, X-Worker-Run, X-Worker-Slot (ISO 8601, empty for
manual runs) and X-Worker-Token, so the receiver can deduplicate by slot and refuse
a stale leader by token. It goes through the rate limiter keyed by host.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from ..config import JobSpec
from ..context import RunContext
from ..errors import JobError
from ..ratelimit import Rate

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")


class HttpJob:
    """Params: url, method (GET), optional json body, headers, rate_limit (calls/s)."""

    resumable = False

    def check(self, spec: JobSpec) -> None:
        p = spec.params
        url = p.get("url")
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"'url' must be an http(s) URL, got {url!r}")
        method = str(p.get("method", "GET")).upper()
        if method not in METHODS:
            raise ValueError(f"'method' must be one of {', '.join(METHODS)}, got {method!r}")
        headers = p.get("headers", {})
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise ValueError("'headers' must be a table of strings")
        rate = p.get("rate_limit", 3)
        if not isinstance(rate, int | float) or isinstance(rate, bool) or rate < 0:
            raise ValueError(f"'rate_limit' must be a number of calls per second, got {rate!r}")

    async def run(self, ctx: RunContext) -> dict[str, Any]:
        p = ctx.params
        url: str = p["url"]
        method = str(p.get("method", "GET")).upper()
        headers = {str(k): str(v) for k, v in dict(p.get("headers", {})).items()}
        headers.update(
            {
                "X-Worker-Job": ctx.job.name,
                "X-Worker-Run": str(ctx.run_id),
                "X-Worker-Slot": ctx.slot.isoformat() if ctx.slot else "",
                "X-Worker-Token": str(ctx.token),
            }
        )
        host = urlsplit(url).netloc
        rate = p.get("rate_limit")
        if rate is not None:
            ctx.upstream.limiter.configure_once(host, Rate.per_second(float(rate)))
        kwargs: dict[str, Any] = {"headers": headers}
        if "json" in p:
            kwargs["json"] = p["json"]
        response = await ctx.upstream.request(method, url, limit_key=host, **kwargs)
        result = {"status": response.status, "bytes": len(response.body)}
        await ctx.progress(done=1, total=1, message=f"HTTP {response.status}")
        if not response.ok:
            snippet = response.body[:200].decode("utf-8", "replace")
            raise JobError(f"{method} {url} answered HTTP {response.status}: {snippet}")
        return result
