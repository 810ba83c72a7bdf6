"""Job kinds `emag.offers` and `ebay.catalog`: the catalogue sync with their connectors.

Credentials never sit in the jobs file: params name the environment variables that
hold them (`username_env`, `client_secret_env`, …) or, when such a variable is unset,
`<NAME>_FILE` naming a file that does; read when a run starts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from ..config import JobSpec, secret
from ..connectors.base import Connector
from ..connectors.ebay import MAX_LIMIT, MAX_QUERY_CHARS, MAX_SELLERS, EbayCatalog, TokenCache
from ..connectors.emag import MAX_PER_PAGE, PLATFORMS, EmagOffers
from ..context import RunContext
from ..errors import ConfigError, JobError
from ..ratelimit import Rate
from ..upstream import Timeouts, Upstream, host_label
from .catalog import CatalogJob


def _secret(params: Mapping[str, Any], key: str, job: str) -> str:
    """The credential the param `key` names: the variable, or the file `<NAME>_FILE`."""
    name = params[key]
    try:
        value = secret(name)
    except ConfigError as exc:
        raise JobError(f"{exc} ({key} of job {job!r})") from None
    if not value:
        raise JobError(
            f"environment variable {name} (or {name}_FILE) ({key} of job {job!r}) is not set"
        )
    return value


def _need_str(params: Mapping[str, Any], key: str) -> None:
    if not isinstance(params.get(key), str) or not params[key]:
        raise ValueError(f"'{key}' is required (a string)")


def _check_url(params: Mapping[str, Any], key: str) -> None:
    if key in params and urlsplit(str(params[key])).scheme not in ("http", "https"):
        raise ValueError(f"'{key}' must be an http(s) URL, got {params[key]!r}")


def _check_rate(params: Mapping[str, Any]) -> None:
    rate = params.get("rate_limit", 3)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or rate < 0:
        raise ValueError(f"'rate_limit' must be calls per second (0 = unlimited), got {rate!r}")


def _limit_key(ctx: RunContext, source: str, base_url: str, login: str) -> str:
    """The limiter key: the API host and who logs in there, e.g. `emag:<host>:<digest>`.

    The vendor counts requests per seller account (eMAG) or application (eBay): per
    login on one API, whatever the job calls its `account`. Two jobs with the same
    login share one budget; the same name on two platforms gets two. The login goes
    in as a digest: the key is a metric label and a Redis key.
    """
    digest = hashlib.sha256(login.encode()).hexdigest()[:12]
    key = f"{source}:{host_label(base_url)}:{digest}"
    rate = ctx.params.get("rate_limit", 3)
    ctx.upstream.limiter.configure_once(key, Rate.per_second(float(rate)))
    return key


def _upstream(ctx: RunContext) -> Upstream:
    """The run's client: the job's timeouts; each retry shown as the run's progress."""
    return ctx.upstream.bound(timeouts=Timeouts.from_params(ctx.params), on_retry=ctx.note)


class EmagOffersJob(CatalogJob):
    """Params: account, platform | base_url, username_env, password_env, items_per_page,
    max_pages, rate_limit, mark_gone, prefetch, connect_timeout, read_timeout, total_timeout."""

    def check_connector(self, spec: JobSpec) -> None:
        p = spec.params
        for key in ("account", "username_env", "password_env"):
            _need_str(p, key)
        if "base_url" not in p and p.get("platform") not in PLATFORMS:
            raise ValueError(
                f"'platform' must be one of {', '.join(PLATFORMS)} (or set 'base_url'),"
                f" got {p.get('platform')!r}"
            )
        _check_url(p, "base_url")
        per_page = p.get("items_per_page", MAX_PER_PAGE)
        if not isinstance(per_page, int) or not 1 <= per_page <= MAX_PER_PAGE:
            raise ValueError(f"'items_per_page' must be 1..{MAX_PER_PAGE}, got {per_page!r}")
        _check_rate(p)
        Timeouts.from_params(p)

    def connector(self, ctx: RunContext) -> Connector:
        p = ctx.params
        base_url = p.get("base_url") or PLATFORMS[p["platform"]]
        username = _secret(p, "username_env", ctx.job.name)
        return EmagOffers(
            upstream=_upstream(ctx),
            base_url=base_url,
            account=p["account"],
            username=username,
            password=_secret(p, "password_env", ctx.job.name),
            items_per_page=int(p.get("items_per_page", MAX_PER_PAGE)),
            prefetch=int(p.get("prefetch", 2)),
            limit_key=_limit_key(ctx, "emag", base_url, username),
        )


class EbayCatalogJob(CatalogJob):
    """Params: account, base_url, client_id_env, client_secret_env, marketplace_id,
    sellers, queries, limit, max_pages, rate_limit, mark_gone, connect_timeout, read_timeout,
    total_timeout, details, max_detail_calls."""

    has_details = True

    def __init__(self) -> None:
        self.tokens = TokenCache()

    def check_connector(self, spec: JobSpec) -> None:
        p = spec.params
        for key in ("account", "client_id_env", "client_secret_env"):
            _need_str(p, key)
        _check_url(p, "base_url")
        for key in ("queries", "sellers"):
            value = p.get(key, [] if key == "sellers" else None)
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"'{key}' must be a list of strings")
        if not p["queries"]:
            raise ValueError("'queries' must name at least one search term")
        for term in p["queries"]:
            self._check_term(term)
        sellers = p.get("sellers", [])
        if len(sellers) > MAX_SELLERS:
            raise ValueError(
                f"'sellers' names {len(sellers)} sellers; eBay takes at most {MAX_SELLERS}"
                " in one filter (error 12032): split them over several jobs"
            )
        limit = p.get("limit", MAX_LIMIT)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"'limit' must be 1..{MAX_LIMIT}, got {limit!r}")
        _check_rate(p)
        Timeouts.from_params(p)

    @staticmethod
    def _check_term(term: str) -> None:
        """The rules of the Browse API's `q` that a jobs file can break."""
        if len(term) > MAX_QUERY_CHARS:
            raise ValueError(
                f"'queries' term {term!r} is {len(term)} characters; eBay takes at most"
                f" {MAX_QUERY_CHARS} and cuts a longer one, so it would search for another term"
            )
        if not term.strip():
            raise ValueError(f"'queries' term {term!r} is blank: eBay needs a keyword")
        if "*" in term:
            raise ValueError(f"'queries' term {term!r} has a '*': eBay allows no wildcard in q")

    def connector(self, ctx: RunContext) -> Connector:
        p = ctx.params
        base_url = p.get("base_url", "https://api.ebay.com")
        client_id = _secret(p, "client_id_env", ctx.job.name)
        return EbayCatalog(
            upstream=_upstream(ctx),
            tokens=self.tokens,
            base_url=base_url,
            account=p["account"],
            client_id=client_id,
            client_secret=_secret(p, "client_secret_env", ctx.job.name),
            marketplace_id=p.get("marketplace_id", "EBAY_US"),
            sellers=p.get("sellers", []),
            queries=p["queries"],
            limit=int(p.get("limit", MAX_LIMIT)),
            limit_key=_limit_key(ctx, "ebay", base_url, client_id),
        )
