"""Job kind `http`: a scheduled HTTP request, e.g. the main server poking a parser.

Every request carries X-Worker-Job, X-Worker-Run, X-Worker-Slot (ISO 8601, empty for
manual runs) and X-Worker-Token, so the receiver can deduplicate by slot and refuse
a stale leader by token. It goes through the rate limiter keyed by host.

Credentials never sit in the jobs file: `headers_env` maps a header to the
environment variable holding its value (or, when it is unset, `<VARIABLE>_FILE`
naming a file that does), read when a run starts; a header whose name looks like a
credential is refused in plain `headers`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from ..config import JobSpec, secret
from ..context import RunContext
from ..errors import ConfigError, JobError
from ..logs import redact
from ..ratelimit import Rate
from ..upstream import Timeouts

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Headers that carry credentials; they may only come from the environment.
_SECRET_HEADER = re.compile(r"auth|cookie|token|secret|passw|api[-_]?key|access[-_]?key", re.I)


class HttpJob:
    """Params: url, method (GET), optional json body, headers, headers_env, rate_limit."""

    resumable = False

    def check(self, spec: JobSpec) -> None:
        p = spec.params
        url = p.get("url")
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"'url' must be an http(s) URL, got {redact(url)!r}")
        _check_url(url)
        method = str(p.get("method", "GET")).upper()
        if method not in METHODS:
            raise ValueError(f"'method' must be one of {', '.join(METHODS)}, got {method!r}")
        headers = p.get("headers", {})
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise ValueError("'headers' must be a table of strings")
        _check_headers(headers, p.get("headers_env", {}))
        rate = p.get("rate_limit", 3)
        if not isinstance(rate, int | float) or isinstance(rate, bool) or rate < 0:
            raise ValueError(f"'rate_limit' must be a number of calls per second, got {rate!r}")
        Timeouts.from_params(p)  # connect_timeout, read_timeout, total_timeout

    async def run(self, ctx: RunContext) -> dict[str, Any]:
        p = ctx.params
        url: str = p["url"]
        method = str(p.get("method", "GET")).upper()
        headers = {str(k): str(v) for k, v in dict(p.get("headers", {})).items()}
        headers.update(_from_env(p.get("headers_env", {}), ctx.job.name))
        headers.update(
            {
                "X-Worker-Job": ctx.job.name,
                "X-Worker-Run": str(ctx.run_id),
                "X-Worker-Slot": ctx.slot.isoformat() if ctx.slot else "",
                "X-Worker-Token": str(ctx.token),
            }
        )
        host = _host(url)  # never the userinfo: the key is a metric label
        rate = p.get("rate_limit")
        if rate is not None:
            ctx.upstream.limiter.configure_once(host, Rate.per_second(float(rate)))
        kwargs: dict[str, Any] = {"headers": headers}
        if "json" in p:
            kwargs["json"] = p["json"]
        upstream = ctx.upstream.bound(timeouts=Timeouts.from_params(p), on_retry=ctx.note)
        response = await upstream.request(method, url, limit_key=host, **kwargs)
        result = {"status": response.status, "bytes": len(response.body)}
        await ctx.progress(done=1, total=1, message=f"HTTP {response.status}")
        if not response.ok:
            snippet = response.body[:200].decode("utf-8", "replace")
            raise JobError(f"{method} {redact(url)} answered HTTP {response.status}: {snippet}")
        return result


def _check_url(url: str) -> None:
    if "@" in urlsplit(url).netloc:
        raise ValueError(
            "'url' carries credentials (user:password@), and secrets never go into the"
            ' jobs file: send them with headers_env = {Authorization = "RECEIVER_AUTH"}'
        )
    try:
        _host(url)
    except ValueError:
        raise ValueError(f"'url' has a bad port: {redact(url)!r}") from None


def _check_headers(headers: Mapping[str, str], headers_env: Any) -> None:
    for name in headers:
        if _SECRET_HEADER.search(name):
            raise ValueError(
                f"'headers': {name!r} carries a credential, and secrets never go into the"
                f" jobs file: put its value in an environment variable and name it in"
                f" 'headers_env', e.g. headers_env = {{{name} = \"RECEIVER_AUTH\"}}"
            )
    if not isinstance(headers_env, dict) or not all(
        isinstance(v, str) for v in headers_env.values()
    ):
        raise ValueError(
            "'headers_env' must be a table of header = environment variable name,"
            ' e.g. {Authorization = "RECEIVER_AUTH"}'
        )
    plain = {name.lower() for name in headers}
    for name, var in headers_env.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"'headers_env': {name!r} is not a valid header name")
        if not _ENV_NAME.fullmatch(var):
            raise ValueError(
                f"'headers_env': {name} = {var!r} is not a valid environment variable name"
                " (letters, digits and _, not starting with a digit)"
            )
        if name.lower() in plain:
            raise ValueError(f"header {name!r} is in both 'headers' and 'headers_env'")


def _from_env(headers_env: Mapping[str, str], job: str) -> dict[str, str]:
    """Header values from the environment (or the files `<VAR>_FILE` name), read now so
    a rotated secret is picked up."""
    values = {}
    for name, var in headers_env.items():
        where = f"headers_env {name!r} of job {job!r}"
        try:
            value = secret(var)
        except ConfigError as exc:
            raise JobError(f"{exc} ({where})") from None
        if not value:
            raise JobError(f"environment variable {var} (or {var}_FILE) ({where}) is not set")
        values[name] = value
    return values


def _host(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
