"""Seed 001's main-server role (`remote_parsing.*`) against a real parsing server: this
project's own `/parsing/*` routes, served on a local port by a second app over a second
database, its operations run by a real leader term of that deployment.

The parser behind `parsingEventsFromFienta` on the parsing server is a small `ParseJob`
whose events are whatever the test puts on its `Site`; the main server's runs are
queued as the scheduler queues them and run by a real leader term over the test's own
database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpClient
from redis.asyncio import Redis

from worker import db, events, runs
from worker.config import JobSpec, Settings, load_jobs
from worker.context import JobKind, RunContext
from worker.errors import ConfigError
from worker.jobs import checkers, kinds
from worker.jobs.parse import Bad, EventSource, ParseJob
from worker.jobs.remote_parsing import build_meta
from worker.lease import Lease
from worker.upstream import Upstream
from worker.web.app import WebState, build_app

from .conftest import _admin, dsn_for, free_port
from .helpers import eventually
from .test_api import API_KEY, assert_error, key
from .test_catalog_sync import final, leading, upstream

__all__ = ["upstream"]  # the fixture, imported for pytest

FIENTA = "parsingEventsFromFienta"
URL_ENV, KEY_ENV = "TEST_PARSING_SERVER_URL", "TEST_PARSING_SERVER_API_KEY"
SERVER = {"server_url_env": URL_ENV, "api_key_env": KEY_ENV, "rate_limit": 0}
CITIES = [{"_id": "64f1", "name": {"en": "Tallinn", "ru": "Таллин"}}, "Tartu"]


# -- the parsing server -----------------------------------------------------------------


@dataclass
class Site:
    """What the fake parser finds: `events`, failing before event `fail_at`; with
    `stall_at`, it waits there until `go` is set."""

    events: list[dict[str, Any]] = field(default_factory=list)
    fail_at: int | None = None
    stall_at: int | None = None
    go: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def expected(self) -> int | None:
        return len(self.events)

    async def stream(self) -> AsyncGenerator[dict[str, Any] | Bad, None]:
        for i, event in enumerate(list(self.events)):
            if i == self.stall_at:
                await self.go.wait()
            if i == self.fail_at:
                raise RuntimeError(f"the site went away at event {i}")
            yield dict(event)


class SiteSource:
    def __init__(self, site: Site) -> None:
        self.site = site

    @property
    def expected(self) -> int | None:
        return self.site.expected

    def events(self) -> AsyncGenerator[dict[str, Any] | Bad, None]:
        return self.site.stream()


class SiteJob(ParseJob):
    """Stands for `parse.fienta` on the parsing server."""

    def __init__(self, site: Site) -> None:
        self.site = site

    def check_source(self, spec: JobSpec) -> None:
        pass

    def source(self, ctx: RunContext) -> EventSource:
        return SiteSource(self.site)


def event(n: int, **changes: Any) -> dict[str, Any]:
    """A normalised event, as the parsers make them (docs/parsing.md)."""
    start = datetime(2026, 6, 1, 16, 0, tzinfo=UTC) + timedelta(days=n)
    return {
        "source": "fienta",
        "external_id": str(100_000 + n),
        "title": f"Concert #{n}",
        "starts_at": start.isoformat().replace("+00:00", "Z"),
        "ends_at": None,
        "timezone": "Europe/Tallinn",
        "venue": "Kultuurikatel",
        "address": "Põhja pst 27a, 10415 Tallinn",
        "city": "Tallinn",
        "country": "EE",
        "category": "Music",
        "categories": ["Music"],
        "price_min": 10 + n,
        "price_max": None,
        "currency": "EUR",
        "sale_status": "on_sale",
        "url": f"https://fienta.example/e/{n}",
        "image": None,
        "raw": {"id": 100_000 + n, "title": f"Concert #{n}"},
        **changes,
    }


class ParsingServer:
    """This project's parsing-server deployment: its database, its `/parsing/*` routes
    on a fixed local port (stopped and started again by the tests), its parser's site."""

    def __init__(self, pool: db.Pool, state: WebState, upstream: Upstream) -> None:
        self.pool, self.state, self.upstream = pool, state, upstream
        self.port = free_port()
        self.site = Site()
        self.server: TestServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = TestServer(build_app(self.state), host="127.0.0.1", port=self.port)
        await self.server.start_server()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None

    @contextlib.asynccontextmanager
    async def leader(self) -> AsyncIterator[None]:
        """A leader term of the parsing server: it runs the queued operations."""
        async with leading(
            self.pool, self.upstream, {"parse.fienta": SiteJob(self.site)}, self.state.settings.jobs
        ):
            yield

    async def run(self, *operation_ids: str) -> None:
        """Run these operations to their end."""
        async with self.leader():
            for op in operation_ids:
                await final(self.pool, int(op))

    async def status(self, operation_id: str) -> str:
        row = await runs.get(self.pool, int(operation_id))
        assert row is not None
        return str(row["status"])


@pytest.fixture
async def remote_pool(template_db: str) -> AsyncIterator[db.Pool]:
    """The parsing server's own database: a second copy of the migrated template."""
    name = f"worker_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    await _admin(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    try:
        async with db.open_pool(dsn_for(name), timeout=10) as pool:
            yield pool
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def remote(
    tmp_path: Path, remote_pool: db.Pool, redis: Redis, key_prefix: str, upstream: Upstream
) -> AsyncIterator[ParsingServer]:
    path = tmp_path / "parsing-server.toml"
    path.write_text('[[jobs]]\nname = "fienta-events"\nkind = "parse.fienta"\n')
    database = await remote_pool.fetchval("SELECT current_database()")
    settings = Settings(
        jobs=load_jobs(path),
        jobs_file=path,
        api_key=API_KEY,
        key_prefix=f"{key_prefix}remote:",
        database_url=dsn_for(database),
        worker_id="parsing-server",
    )
    lease = Lease(redis, prefix=settings.key_prefix)
    server = ParsingServer(
        remote_pool,
        WebState(settings=settings, pool=remote_pool, redis=redis, lease=lease),
        upstream,
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# -- the main server ------------------------------------------------------------------


def main_jobs(**create: Any) -> tuple[JobSpec, ...]:
    """The seed's Fienta pair and the sweep, checked as loading the jobs file checks them."""
    registry = kinds()
    specs = (
        JobSpec(
            name="create-fienta",
            kind="remote_parsing.create",
            schedule=None,
            manual=False,
            params={
                k: v
                for k, v in {
                    "type": FIENTA,
                    "countries": ["EE"],
                    "cities": CITIES,
                    "days_ahead": 90,
                    **SERVER,
                    **create,
                }.items()
                if v is not None  # None: leave the param out
            },
        ),
        JobSpec(
            name="read-fienta",
            kind="remote_parsing.read",
            schedule=None,
            manual=False,
            params={"type": FIENTA, **SERVER},
        ),
        JobSpec(
            name="sweep", kind="remote_parsing.sweep", schedule=None, manual=False, params=SERVER
        ),
    )
    for spec in specs:
        registry[spec.kind].check(spec)
    return specs


@dataclass
class Main:
    """The main server: the test's database, its jobs, a leader term per run."""

    pool: db.Pool
    upstream: Upstream
    jobs: tuple[JobSpec, ...]
    registry: dict[str, JobKind] = field(default_factory=kinds)

    async def run(self, name: str) -> dict[str, Any]:
        """One run of the job, queued as the scheduler queues it; its final row."""
        spec = next(j for j in self.jobs if j.name == name)
        run_id = await runs.enqueue(
            self.pool, job=name, kind=spec.kind, params=spec.params, trigger="schedule"
        )
        async with leading(self.pool, self.upstream, self.registry, self.jobs):
            return await final(self.pool, run_id)

    async def operations(self) -> list[dict[str, Any]]:
        return list(reversed(await events.operations(self.pool, limit=100)))

    async def events(self) -> dict[str, dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT *, xmin::text::bigint AS xmin FROM events ORDER BY external_id"
        )
        return {r["external_id"]: dict(r) for r in rows}


@pytest.fixture
def main(
    pool: db.Pool, upstream: Upstream, remote: ParsingServer, monkeypatch: pytest.MonkeyPatch
) -> Main:
    monkeypatch.setenv(URL_ENV, remote.url)
    monkeypatch.setenv(KEY_ENV, API_KEY)
    return Main(pool, upstream, main_jobs())


async def created_operation(main: Main) -> dict[str, Any]:
    """Run create-fienta; the local operation it recorded."""
    row = await main.run("create-fienta")
    assert row["status"] == "succeeded", row["error"]
    [op] = [o for o in await main.operations() if o["created_by"] == row["id"]]
    return op


def counts(statistics: dict[str, Any]) -> tuple[int, ...]:
    keys = ("created", "updated", "unchanged", "failed", "total")
    return tuple(statistics[k] for k in keys)


# -- create -------------------------------------------------------------------------------


async def test_create_records_a_local_operation_holding_the_remote_id(
    main: Main, remote: ParsingServer
) -> None:
    today = datetime.now(UTC).date()
    op = await created_operation(main)

    assert (op["type"], op["status"], op["server"]) == (FIENTA, "pending", remote.url)
    assert op["processed_at"] is None
    assert op["finished_at"] is None
    # The remote operation exists, queued, with the meta the job built.
    sent = await runs.get(remote.pool, int(op["remote_id"]))
    assert sent is not None
    assert (sent["kind"], sent["status"], sent["trigger"]) == ("parse.fienta", "queued", "api")
    dates = {"from": today.isoformat(), "to": (today + timedelta(days=90)).isoformat()}
    expected = {"countries": ["EE"], "cities": CITIES, "dates": dates}
    assert sent["params"]["meta"] == expected == op["meta"]


@pytest.mark.parametrize("fault", ["down", "wrong-key", "refused-meta"])
async def test_create_fails_and_records_nothing_when_the_remote_is_down_or_refuses(
    main: Main, remote: ParsingServer, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    if fault == "down":
        await remote.stop()
    elif fault == "wrong-key":
        monkeypatch.setenv(KEY_ENV, "not-the-key")
    else:  # the parsing server answers 400 naming the field
        main.jobs = main_jobs(cities=[{"_id": "64f1", "slug": "tallinn"}])

    row = await main.run("create-fienta")

    assert row["status"] == "failed"
    why = {
        "down": "unreachable",
        "wrong-key": "HTTP 401: unauthorized",
        "refused-meta": "HTTP 400: bad_meta: meta.cities[0]",
    }[fault]
    assert why in row["error"], row["error"]
    assert remote.url in row["error"]
    assert "not-the-key" not in row["error"]
    assert API_KEY not in row["error"]
    assert await main.operations() == []
    assert await runs.search(remote.pool) == []


# -- read ---------------------------------------------------------------------------------


async def test_read_files_the_events_and_a_second_cycle_counts_what_changed(
    main: Main, remote: ParsingServer
) -> None:
    remote.site.events = [event(n) for n in range(25)]
    first = await created_operation(main)
    await remote.run(first["remote_id"])

    row = await main.run("read-fienta")

    assert row["status"] == "succeeded", row["error"]
    assert row["result"]["outcome"] == "success"
    [op] = await main.operations()
    assert (op["status"], op["error_text"]) == ("success", "")
    assert counts(op["statistics"]) == (25, 0, 0, 0, 25)
    assert op["processed_at"] is not None
    assert op["processed_by"] == row["id"]
    assert op["info_text"] == "done: processed 25 of 25 events, batch 3 of 3 (0 failed)"
    assert op["remote"]["_id"] == first["remote_id"]
    before = await main.events()
    assert len(before) == 25
    stored = before["100003"]
    assert (stored["source"], stored["title"], stored["city"]) == (
        "fienta",
        "Concert #3",
        "Tallinn",
    )
    assert stored["starts_at"] == datetime(2026, 6, 4, 16, 0, tzinfo=UTC)
    assert (stored["price_min"], stored["currency"]) == (Decimal(13), "EUR")
    assert stored["raw"]["raw"] == {"id": 100_003, "title": "Concert #3"}
    # Read on the parsing server: nothing left for the sweep.
    assert await remote.status(first["remote_id"]) == "succeeded"
    processed = await remote.pool.fetchval(
        "SELECT processed_at FROM runs WHERE id = $1", int(first["remote_id"])
    )
    assert processed is not None

    # The next week: one event changed, one new, the rest as they were.
    remote.site.events[7] = event(7, title="Concert #7 (moved)")
    remote.site.events.append(event(25))
    second = await created_operation(main)
    await remote.run(second["remote_id"])
    row = await main.run("read-fienta")

    assert row["status"] == "succeeded", row["error"]
    ops = await main.operations()
    assert [o["status"] for o in ops] == ["success", "success"]
    assert counts(ops[1]["statistics"]) == (1, 1, 24, 0, 26)
    assert counts(ops[0]["statistics"]) == (25, 0, 0, 0, 25)  # the first one untouched
    after = await main.events()
    assert after["100007"]["title"] == "Concert #7 (moved)"
    assert after["100025"]["title"] == "Concert #25"
    unchanged = [eid for eid in before if eid != "100007"]
    assert all(after[eid]["xmin"] == before[eid]["xmin"] for eid in unchanged)  # not rewritten
    assert after["100007"]["xmin"] != before["100007"]["xmin"]
    assert after["100007"]["first_seen"] == before["100007"]["first_seen"]


async def test_read_leaves_a_pending_or_processing_operation_for_the_sweep(
    main: Main, remote: ParsingServer
) -> None:
    remote.site.events = [event(n) for n in range(25)]
    remote.site.stall_at = 12
    op = await created_operation(main)

    row = await main.run("read-fienta")  # no leader on the parsing server yet: pending
    assert row["status"] == "succeeded", row["error"]
    assert row["result"]["outcome"] == "left"
    assert "still pending" in row["progress"]["message"]
    [local] = await main.operations()
    assert (local["status"], local["processed_at"]) == ("pending", None)
    assert await main.events() == {}

    async with remote.leader():  # the operation starts, saves a batch, stalls
        await eventually(
            lambda: remote.pool.fetchval(
                "SELECT count(*) = 10 FROM run_items WHERE operation_id = $1", int(op["remote_id"])
            ),
            timeout=30,
        )
        row = await main.run("read-fienta")
        assert row["result"]["outcome"] == "left"
        [local] = await main.operations()
        assert local["status"] == "processing"
        assert local["info_text"] == "processed 10 of 25 events, batch 1 of 3 (0 failed)"
        assert await main.events() == {}  # the seed: a running operation is not filed

        remote.site.go.set()
        await final(remote.pool, int(op["remote_id"]))

    row = await main.run("sweep")

    assert row["status"] == "succeeded", row["error"]
    assert row["result"] == {"processed": 1, "recorded": 0, "left": 0, "unreadable": 0}
    [local] = await main.operations()
    assert local["status"] == "success"
    assert counts(local["statistics"]) == (25, 0, 0, 0, 25)
    assert local["processed_by"] == row["id"]
    assert len(await main.events()) == 25


async def test_an_error_with_events_is_processed_and_one_without_events_recorded(
    main: Main, remote: ParsingServer
) -> None:
    remote.site.events = [event(n) for n in range(25)]
    remote.site.fail_at = 13  # one batch of ten saved, then the site goes away
    op = await created_operation(main)
    await remote.run(op["remote_id"])
    assert await remote.status(op["remote_id"]) == "failed"

    row = await main.run("read-fienta")

    assert row["status"] == "succeeded", row["error"]
    assert row["result"]["outcome"] == "error"
    [local] = await main.operations()
    assert local["status"] == "error"
    assert "the site went away at event 13" in local["error_text"]
    assert counts(local["statistics"]) == (10, 0, 0, 0, 10)
    assert local["processed_at"] is not None
    assert sorted(await main.events()) == [str(100_000 + n) for n in range(10)]

    remote.site.fail_at = 0  # nothing saved at all
    op = await created_operation(main)
    await remote.run(op["remote_id"])
    row = await main.run("read-fienta")

    assert row["status"] == "succeeded", row["error"]
    local = (await main.operations())[1]
    assert (local["status"], counts(local["statistics"])) == ("error", (0, 0, 0, 0, 0))
    assert "the site went away at event 0" in local["error_text"]
    assert local["processed_at"] is not None
    assert len(await main.events()) == 10


async def test_the_remote_down_at_read_marks_the_operation_error_and_the_sweep_recovers_it(
    main: Main, remote: ParsingServer
) -> None:
    remote.site.events = [event(n) for n in range(5)]
    op = await created_operation(main)
    await remote.run(op["remote_id"])
    await remote.stop()

    row = await main.run("read-fienta")

    assert row["status"] == "failed"
    assert f"operation {op['id']}" in row["error"]
    assert "unreachable" in row["error"]
    [local] = await main.operations()
    assert local["status"] == "error"
    assert "unreachable" in local["error_text"]
    assert remote.url in local["error_text"]
    assert local["finished_at"] is not None
    assert (local["processed_at"], local["statistics"]) == (None, {})
    assert await main.events() == {}

    # The seed: no retry; the Sunday sweep takes what the parsing server still lists.
    await remote.start()
    row = await main.run("sweep")

    assert row["status"] == "succeeded", row["error"]
    [local] = await main.operations()
    assert (local["status"], local["error_text"]) == ("success", "")
    assert counts(local["statistics"]) == (5, 0, 0, 0, 5)
    assert len(await main.events()) == 5


async def test_the_sweep_records_the_operations_it_did_not_know(
    main: Main, remote: ParsingServer, aiohttp_client: AiohttpClient
) -> None:
    remote.site.events = [event(n) for n in range(12)]
    # Two operations asked of the parsing server by someone else (or whose local record
    # was lost): the main server has never heard of them.
    client = await aiohttp_client(build_app(remote.state))
    ids = []
    for cities in (["Tallinn"], ["Tartu"]):
        body = {"type": FIENTA, "meta": {"cities": cities}}
        response = await client.post("/parsing/create", json=body, headers=key())
        assert response.status == 200, await response.text()
        ids.append((await response.json())["operationId"])
    await remote.run(*ids)
    known = await created_operation(main)  # and one it knows, still pending there

    row = await main.run("sweep")

    assert row["status"] == "succeeded", row["error"]
    assert row["result"] == {"processed": 2, "recorded": 2, "left": 1, "unreadable": 0}
    ops = {o["remote_id"]: o for o in await main.operations()}
    assert set(ops) == {*ids, known["remote_id"]}
    for remote_id in ids:
        found = ops[remote_id]
        assert (found["type"], found["status"], found["meta"]) == (FIENTA, "success", None)
        assert found["created_by"] == found["processed_by"] == row["id"]
    assert counts(ops[ids[0]]["statistics"]) == (12, 0, 0, 0, 12)
    assert counts(ops[ids[1]]["statistics"]) == (0, 0, 12, 0, 12)  # the same events again
    assert ops[known["remote_id"]]["status"] == "pending"
    assert len(await main.events()) == 12

    again = await main.run("sweep")  # both were read: the parsing server lists nothing
    assert again["result"] == {"processed": 0, "recorded": 0, "left": 1, "unreadable": 0}


# -- never by hand --------------------------------------------------------------------


async def test_these_jobs_cannot_be_triggered_by_hand(
    main: Main,
    aiohttp_client: AiohttpClient,
    pool: db.Pool,
    redis: Redis,
    key_prefix: str,
    tmp_path: Path,
) -> None:
    settings = Settings(jobs=main.jobs, api_key=API_KEY, key_prefix=key_prefix)
    state = WebState(
        settings=settings, pool=pool, redis=redis, lease=Lease(redis, prefix=key_prefix)
    )
    client = await aiohttp_client(build_app(state))
    for spec in main.jobs:
        response = await client.post(f"/jobs/{spec.name}/trigger", headers=key())
        message = await assert_error(response, 400, "schedule_only")
        assert "Этот тип операции нельзя вызывать вручную" in message
        assert spec.name in message
    assert await runs.search(pool) == []

    # A jobs file that leaves `manual` at its default is refused when it is loaded.
    path = tmp_path / "jobs.toml"
    path.write_text(
        '[[jobs]]\nname = "sweep"\nkind = "remote_parsing.sweep"\nschedule = "0 2 * * 0"\n'
    )
    with pytest.raises(ConfigError, match="set manual = false"):
        load_jobs(path, kinds=checkers(kinds()))
    path.write_text(path.read_text() + "manual = false\n")
    assert [j.manual for j in load_jobs(path, kinds=checkers(kinds()))] == [False]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"type": "parsingX"}, "'type' must be one of"),
        ({"citys": ["Tallinn"]}, "unknown param 'citys'"),
        ({"cities": "Tallinn"}, "'cities' must be a list"),
        ({"dates": {"from": "2025-01-01"}, "days_ahead": 7}, "not both"),
        ({"dates": {"since": "2025-01-01"}, "days_ahead": None}, "'dates' must be a table"),
        ({"dates": {"from": 20250101}, "days_ahead": None}, "'dates.from' must be a date"),
        ({"days_ahead": 0}, "'days_ahead'"),
        ({"server_url_env": "not a name"}, "'server_url_env'"),
    ],
)
def test_create_params_are_checked_when_the_jobs_file_loads(
    params: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        main_jobs(**params)


# -- the store ------------------------------------------------------------------------


async def test_filing_isolates_what_cannot_be_an_event_or_is_refused(pool: db.Pool) -> None:
    await db.raise_fence(pool, token=1, holder="t")
    batch: list[Any] = [
        event(1),
        event(2, title="Nul\x00 night", raw={"note": "a\x00b"}),
        event(3, price_min="9999999999.99999"),  # rounds past numeric(14, 4): the database refuses
        event(4, starts_at="2026-06-05T19:00:00"),  # no offset: its instant is unknown
        event(5, title=None),
        "not an event",
        event(6, price_min="1e9999"),
        event(1, title="Concert #1, again"),  # the same id twice: the later copy is filed
    ]
    async with db.fenced(pool, 1) as conn:
        stats = await events.file_events(conn, batch, source="fienta")

    assert (stats["created"], stats["failed"], stats["duplicates"], stats["cleaned"]) == (
        2,
        5,
        1,
        1,
    )
    assert stats["total"] == 8
    reasons = {s["id"]: s["reason"] for s in stats["failed_sample"]}
    assert "refused by the database" in reasons["fienta/100003"]
    assert "no UTC offset" in reasons["fienta/100004"]
    assert reasons["fienta/100005"] == "no title"
    assert "not a JSON object" in reasons["fienta/?"]
    assert "out of range" in reasons["fienta/100006"]
    rows = {r["external_id"]: r for r in await pool.fetch("SELECT * FROM events")}
    assert sorted(rows) == ["100001", "100002"]
    assert rows["100001"]["title"] == "Concert #1, again"
    assert rows["100002"]["title"] == "Nul night"
    assert rows["100002"]["raw"]["raw"] == {"note": "ab"}

    # Filed again as they are now stored: nothing is rewritten.
    async with db.fenced(pool, 1) as conn:
        again = await events.file_events(
            conn,
            [event(1, title="Concert #1, again"), event(2, title="Nul night", raw={"note": "ab"})],
            source="fienta",
        )
    assert (again["created"], again["updated"], again["unchanged"]) == (0, 0, 2)


def test_an_event_without_a_source_takes_the_operation_s() -> None:
    row, _ = events.to_record({**event(1), "source": None}, source="eventim")
    assert row[:2] == ("eventim", "100001")
    row, _ = events.to_record(event(1), source="eventim")  # one that names its own keeps it
    assert row[:2] == ("fienta", "100001")


def test_meta_carries_the_configured_lists_and_dates() -> None:
    today = date(2026, 3, 2)
    params = {"type": FIENTA, "categories": [{"name": "Music"}], "days_ahead": 6}
    assert build_meta(params, today) == {
        "categories": [{"name": "Music"}],
        "dates": {"from": "2026-03-02", "to": "2026-03-08"},
    }
    # Dates written in TOML are dates, not strings: sent as YYYY-MM-DD.
    fixed = {"cities": ["Tartu"], "dates": {"from": date(2026, 4, 1), "to": "2026-04-30"}}
    assert build_meta(fixed, today) == {
        "cities": ["Tartu"],
        "dates": {"from": "2026-04-01", "to": "2026-04-30"},
    }
    assert build_meta({"type": FIENTA}, today) == {}


@pytest.fixture(autouse=True)
def _no_real_parsing_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default variable names must never reach a real server from a test."""
    monkeypatch.delenv("PARSING_SERVER_URL", raising=False)
    monkeypatch.delenv("PARSING_SERVER_API_KEY", raising=False)


async def test_what_another_parsing_server_sends_with_nul_characters_is_stored(
    pool: db.Pool,
) -> None:
    await db.raise_fence(pool, token=1, holder="t")
    run_id = await runs.enqueue(pool, job="sweep", kind="remote_parsing.sweep", params={})
    async with db.fenced(pool, 1) as conn:
        op, recorded = await events.record_operation(
            conn, type_name=FIENTA, server="http://x", remote_id="7", run_id=run_id
        )
        stats = await events.file_events(conn, [{"external_id": "a\x00b"}], source="fienta")
        await events.mark_processed(
            conn,
            op.id,
            status="error",
            statistics=stats,
            error_text="boom\x00",
            info_text="half\x00way",
            remote={"_id": "7", "errorText": "boom\x00"},
            finished_at=None,
            run_id=run_id,
        )
    assert recorded
    [row] = await events.operations(pool)
    assert row["statistics"]["failed_sample"] == [{"id": "fienta/ab", "reason": "no title"}]
    assert (row["error_text"], row["info_text"], row["remote"]["errorText"]) == (
        "boom",
        "halfway",
        "boom",
    )
    async with db.fenced(pool, 1) as conn:
        await events.mark_error(conn, op.id, reason="down\x00")
        again, recorded = await events.record_operation(
            conn, type_name=FIENTA, server="http://x", remote_id="7", run_id=run_id
        )
    assert (again.id, recorded) == (op.id, False)
    [row] = await events.operations(pool)
    assert (row["status"], row["error_text"]) == ("error", "down")


def test_days_ahead_windows_start_on_the_local_day_of_the_slot() -> None:
    from datetime import UTC, date, datetime

    from worker.jobs.remote_parsing import run_day

    monday_1am_kyiv = datetime(2026, 11, 29, 23, 0, tzinfo=UTC)  # 01:00 on Monday in Kyiv
    assert run_day(monday_1am_kyiv, "Europe/Kyiv") == date(2026, 11, 30)
    assert run_day(monday_1am_kyiv, "UTC") == date(2026, 11, 29)
