"""The sandbox marketplace: settings, the aiohttp app, `serve` and the CLI entry point.

Run it with `worker sandbox` and point the worker's eMAG and eBay connectors at
the printed base URLs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field

from aiohttp import web

from ..errors import ConfigError
from . import ebay, emag
from .catalog import Catalog
from .state import (
    RECORD,
    REQUESTS,
    SANDBOX,
    Clock,
    Faults,
    Rejected,
    RequestRecord,
    Sandbox,
    json_response,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _default_accounts() -> dict[str, tuple[str, str]]:
    return {"main": ("main@example.com", "main-secret"), "fbe": ("fbe@example.com", "fbe-secret")}


@dataclass(frozen=True, kw_only=True)
class SandboxConfig:
    """What the sandbox serves. The same seed always serves the same catalogue."""

    seed: int = 1
    emag_platforms: tuple[str, ...] = ("ro",)
    emag_accounts: Mapping[str, tuple[str, str]] = field(default_factory=_default_accounts)
    """account name -> (username, password); the same accounts exist on every platform."""
    emag_items: int = 1000
    """Offers per (platform, account)."""
    ebay_sellers: tuple[str, ...] = ("acme-parts", "best-brakes")
    ebay_items: int = 300
    """Items per seller."""
    ebay_client_id: str = "sandbox-client"
    ebay_client_secret: str = "sandbox-secret"
    rate: int = 3
    """Requests per account (eMAG) or client (eBay) per `period`; 0 is unlimited."""
    period: float = 1.0
    token_ttl: float = 7200.0
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        if self.rate < 0 or self.period <= 0:
            raise ConfigError("sandbox rate must be >= 0 (0 = unlimited) and period > 0")
        if self.emag_items < 0 or self.ebay_items < 0:
            raise ConfigError("sandbox item counts must not be negative")
        if self.token_ttl <= 0:
            raise ConfigError("sandbox token_ttl must be positive")
        usernames = [username for username, _ in self.emag_accounts.values()]
        if len(set(usernames)) != len(usernames):
            raise ConfigError("sandbox eMAG usernames must be unique")


def build_app(config: SandboxConfig, *, clock: Clock = time.monotonic) -> web.Application:
    """The sandbox app, both APIs mounted; its state is `app[SANDBOX]`."""
    catalog = Catalog(
        seed=config.seed,
        emag_platforms=config.emag_platforms,
        emag_accounts=config.emag_accounts,
        emag_items=config.emag_items,
        ebay_sellers=config.ebay_sellers,
        ebay_items=config.ebay_items,
    )
    users = {
        username: (account, password)
        for account, (username, password) in config.emag_accounts.items()
    }
    sandbox = Sandbox(
        catalog=catalog,
        faults=copy.deepcopy(config.faults),  # apps built from one config don't share faults
        emag_users={platform: dict(users) for platform in config.emag_platforms},
        ebay_client=(config.ebay_client_id, config.ebay_client_secret),
        rate=config.rate,
        period=config.period,
        token_ttl=config.token_ttl,
        clock=clock,
    )
    app = web.Application(middlewares=[_record])
    app[SANDBOX] = sandbox
    app[REQUESTS] = sandbox.requests
    emag.add_routes(app)
    ebay.add_routes(app)
    app.router.add_get("/_sandbox/requests", _requests)
    app.router.add_get("/_sandbox/stats", _stats)
    app.router.add_get("/_sandbox/faults", _faults)
    app.router.add_post("/_sandbox/faults", _faults)
    return app


@web.middleware
async def _record(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Log every API request (not /_sandbox ones) with its arrival time and status."""
    if request.path.startswith("/_sandbox/"):
        return await handler(request)
    sandbox = request.app[SANDBOX]
    record = RequestRecord(at=sandbox.clock(), method=request.method, path=request.path)
    sandbox.requests.append(record)
    request[RECORD] = record
    try:
        await sandbox.hold_while_hung()
        response = await handler(request)
    except Rejected as rejected:
        response = rejected.response
    except web.HTTPException as exc:
        record.status = exc.status
        raise
    except Exception:
        record.status = 500  # a sandbox bug: aiohttp answers 500 and logs it
        raise
    record.status = response.status
    return response


async def _requests(request: web.Request) -> web.Response:
    return json_response([asdict(record) for record in request.app[SANDBOX].requests])


async def _stats(request: web.Request) -> web.Response:
    """Counts by status, API and caller, and each caller's busiest window."""
    sandbox = request.app[SANDBOX]
    records = sandbox.requests
    arrivals: defaultdict[str, list[float]] = defaultdict(list)
    for record in records:
        if record.who and record.status != 429 and record.api != "oauth":
            arrivals[f"{record.api}:{record.who}"].append(record.at)
    catalog = sandbox.catalog
    return json_response(
        {
            "requests": len(records),
            "by_status": Counter(str(r.status) for r in records),
            "by_api": Counter(r.api for r in records),
            "by_caller": Counter(f"{r.api}:{r.who}" for r in records if r.who),
            "peak_per_period": {
                who: max_in_window(ts, sandbox.period) for who, ts in arrivals.items()
            },
            "tokens_issued": sandbox.tokens_issued,
            "rate": sandbox.limit(),
            "catalog": {
                "emag": {f"{p}/{a}": catalog.emag_count(p, a) for p, a in catalog.emag_accounts()},
                "ebay": {s: catalog.ebay_count(s) for s in catalog.ebay_sellers()},
            },
        }
    )


def max_in_window(times: list[float], period: float) -> int:
    """Most arrivals inside any window of `period` (two pointers over sorted times)."""
    times = sorted(times)
    best = start = 0
    for end, at in enumerate(times):
        while times[start] <= at - period:
            start += 1
        best = max(best, end - start + 1)
    return best


async def _faults(request: web.Request) -> web.Response:
    """GET the current faults; POST a JSON object of fields to change them."""
    faults = request.app[SANDBOX].faults
    if request.method == "POST":
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise TypeError("expected a JSON object")
            faults.update(changes)
        except (ValueError, TypeError) as exc:
            return json_response({"error": str(exc)}, status=400)
    return json_response(faults.as_json())


async def serve(
    config: SandboxConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8900,
    fienta_port: int | None = None,
    eventim_port: int | None = None,
    kontramarka_port: int | None = None,
) -> None:
    """Serve the sandbox until cancelled, after printing one line with the base URLs.

    With `fienta_port` / `eventim_port`, the fake event sites too, each on its own port
    (each serves its own robots.txt at its root, as the real sites do).
    """
    runner = web.AppRunner(build_app(config), access_log=None)
    await runner.setup()
    sites = []
    try:
        for name, make, port_, path in (
            ("Fienta", _fienta_app, fienta_port, "/api/v1"),
            ("Eventim", _eventim_app, eventim_port, "/websearch/search/api/exploration"),
            ("Kontramarka", _kontramarka_app, kontramarka_port, "/{city}/{language}/…"),
        ):
            if port_ is None:
                continue
            other = web.AppRunner(make(config.seed), access_log=None)
            await other.setup()
            sites.append(other)
            await web.TCPSite(other, host, port_).start()
            print(f"sandbox {name}: http://{host}:{port_}{path}", flush=True)
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        base = f"http://{host}:{bound}"
        emag_urls = ", ".join(f"{base}/emag/{p}/api-3" for p in config.emag_platforms)
        print(
            f"sandbox marketplace: eMAG {emag_urls} "
            f"(accounts {', '.join(config.emag_accounts)}) | eBay {base} "
            f"(client {config.ebay_client_id}) | stats {base}/_sandbox/stats",
            flush=True,
        )
        await asyncio.Event().wait()
    finally:
        for other in sites:
            await other.cleanup()
        await runner.cleanup()


def _fienta_app(seed: int) -> web.Application:
    from .fienta import FientaConfig
    from .fienta import build_app as fienta_app

    return fienta_app(FientaConfig(seed=seed))


def _kontramarka_app(seed: int) -> web.Application:
    from .kontramarka import KontramarkaConfig
    from .kontramarka import build_app as kontramarka_app

    return kontramarka_app(KontramarkaConfig(seed=seed))


def _eventim_app(seed: int) -> web.Application:
    from .eventim import EventimConfig
    from .eventim import build_app as eventim_app

    return eventim_app(EventimConfig(seed=seed))


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worker sandbox",
        description="A local eMAG + eBay marketplace with a generated catalogue, "
        "a rate limit and fault injection.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--seed", type=int, default=1, help="catalogue seed (default 1)")
    parser.add_argument("--emag-items", type=_count, default=1000, help="offers per eMAG account")
    parser.add_argument("--ebay-items", type=_count, default=300, help="items per eBay seller")
    parser.add_argument("--rate", type=_count, default=3, help="requests/s per account; 0 = off")
    parser.add_argument("--token-ttl", type=_seconds, default=7200.0, help="eBay token lifetime")
    parser.add_argument(
        "--slow-every", type=_seconds, default=0.0, metavar="SECONDS", help="delay every page"
    )
    parser.add_argument(
        "--fail-next", type=_count, default=0, metavar="N", help="fail the first N data requests"
    )
    parser.add_argument("--fail-status", type=int, choices=(500, 502, 503), default=503)
    parser.add_argument(
        "--fienta-port", type=int, default=None, help="also serve a fake Fienta on this port"
    )
    parser.add_argument(
        "--eventim-port", type=int, default=None, help="also serve a fake Eventim on this port"
    )
    parser.add_argument(
        "--kontramarka-port",
        type=int,
        default=None,
        help="also serve a fake Kontramarka (schema.org listings) on this port",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """`worker sandbox`: serve until Ctrl-C."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.token_ttl <= 0:
        parser.error("--token-ttl must be positive")
    config = SandboxConfig(
        seed=args.seed,
        emag_items=args.emag_items,
        ebay_items=args.ebay_items,
        rate=args.rate,
        token_ttl=args.token_ttl,
        faults=Faults(
            delay=args.slow_every, fail_next=args.fail_next, fail_status=args.fail_status
        ),
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve(
                config,
                host=args.host,
                port=args.port,
                fienta_port=args.fienta_port,
                eventim_port=args.eventim_port,
                kontramarka_port=args.kontramarka_port,
            )
        )
    return 0
