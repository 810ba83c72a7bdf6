"""Seed 001 end to end: two deployments on this machine, each real `worker run` processes.

- The *parsing server*: its own database and Redis key prefix, a jobs file with
  `parse.fienta`, `parse.eventim` and `parse.kontramarka` pointing at the three fakes
  (worker/sandbox/) that this test serves on free ports.
- The *main server*: another database and key prefix, a jobs file with the seed's weekly
  cycle (examples/jobs.toml: create / read per type, the Sunday sweep, `manual = false`),
  `PARSING_SERVER_URL` the parsing server's port, `PARSING_SERVER_API_KEY` its key.

The week is driven by queueing the main server's runs in the database in the seed's
order, as its scheduler would (its API refuses these kinds by hand, by design): create
Fienta, read Fienta, create Eventim, read Eventim, create Kontramarka, read Kontramarka,
sweep. A read is queued once the remote operation has finished (the seed reads a day
later). Then the fakes change (one event changed, one new, per source) and a second
week runs; in it Kontramarka's site is held while its read runs, so the read finds the
operation still running and leaves it for the sweep, which files it (the seed's path).

Expected events are worked out from the fakes' own records and the `meta` the main
server sent, not by the parsers' code.

The main server's jobs keep the seed's schedules (02:00 UTC): a run of this test that
straddles 02:00 UTC would see the scheduler queue one more run of that day's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from worker import db, events, runs
from worker.config import JobSpec, load_jobs
from worker.sandbox import eventim, fienta, kontramarka

from .cluster import Cluster, free_port, wait_new_holder
from .conftest import REDIS_URL, _admin, dsn_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PARSING_KEY = "parsing-server-key"
MAIN_KEY = "main-server-key"
FIENTA, EVENTIM, KONTRAMARKA = (
    "parsingEventsFromFienta",
    "parsingEventsFromEventim",
    "parsingEventsFromKontramarka",
)
SOURCES = {FIENTA: "fienta", EVENTIM: "eventim", KONTRAMARKA: "kontramarka"}
CYCLE = (  # the seed's week, Monday to Saturday, then Sunday's sweep
    ("create-fienta", "read-fienta", FIENTA),
    ("create-eventim", "read-eventim", EVENTIM),
    ("create-kontramarka", "read-kontramarka", KONTRAMARKA),
)
DE = "web__eventim-de"
RUN_BOUND = 90.0  # seconds one run may take on a noisy 2-core machine
CONTACT = "https://example.test/weekly-cycle"


# -- the fakes --------------------------------------------------------------------------


@dataclass
class Fakes:
    fienta: fienta.FientaSite
    eventim: eventim.EventimSite
    kontramarka: kontramarka.KontramarkaSite
    ports: dict[str, int]
    gate: asyncio.Event
    """Kontramarka's listing pages wait for this (robots.txt does not): cleared, the
    operation is held running."""

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    first = datetime.now(UTC).date() + timedelta(days=1)
    gate = asyncio.Event()
    gate.set()

    @web.middleware
    async def held(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path != "/robots.txt":
            await gate.wait()
        response: web.StreamResponse = await handler(request)
        return response

    # Events over more days than the main server asks for (90): the dates filter bites.
    fienta_site = fienta.FientaSite(fienta.FientaConfig(first_day=first, days=100))
    eventim_site = eventim.EventimSite(
        eventim.EventimConfig(first_day=first, days=120, products={DE: 60, "web__oeticket-at": 20})
    )
    kontramarka_site = kontramarka.KontramarkaSite(
        kontramarka.KontramarkaConfig(first_day=first, days=120, events=12)
    )
    apps = {
        "fienta": web.Application(),
        "eventim": web.Application(),
        "kontramarka": web.Application(middlewares=[held]),
    }
    fienta.add_routes(apps["fienta"], fienta_site)
    eventim.add_routes(apps["eventim"], eventim_site)
    kontramarka.add_routes(apps["kontramarka"], kontramarka_site)
    runners, ports = [], {}
    try:
        for name, app in apps.items():
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            runners.append(runner)
            ports[name] = free_port()
            await web.TCPSite(runner, "127.0.0.1", ports[name]).start()
        yield Fakes(fienta_site, eventim_site, kontramarka_site, ports, gate)
    finally:
        gate.set()
        for runner in runners:
            await runner.cleanup()


# -- the two deployments ----------------------------------------------------------------


def parsing_jobs(fakes: Fakes) -> str:
    return f"""
[[jobs]]
name = "fienta-events"
kind = "parse.fienta"
timeout = "5m"
[jobs.params]
base_url = "{fakes.url("fienta")}/api/v1"
timezone = "Europe/Tallinn"
timezones = {{ LV = "Europe/Riga", ES = "Europe/Madrid" }}
countries = ["EE", "LV", "ES"]
contact = "{CONTACT}"

[[jobs]]
name = "eventim-events"
kind = "parse.eventim"
timeout = "5m"
[jobs.params]
base_url = "{fakes.url("eventim")}{eventim.BASE_PATH}"
web_ids = ["{DE}", "web__oeticket-at"]
page_size = 50
rate_limit = 20
contact = "{CONTACT}"

[[jobs]]
name = "kontramarka-events"
kind = "parse.kontramarka"
timeout = "5m"
[jobs.params]
listing_url = "{fakes.url("kontramarka")}/{{city}}/{{language}}/{{category}}?page={{page}}"
cities = ["odessa", "lviv", "dnepr"]
categories = ["theatre", "concert", "standUp"]
rate_limit = 20
contact = "{CONTACT}"
"""


MAIN_JOBS = """
[[jobs]]
name = "create-fienta"
kind = "remote_parsing.create"
schedule = "0 2 * * 1"            # Monday: ask for Fienta
timezone = "UTC"
manual = false
[jobs.params]
type = "parsingEventsFromFienta"
countries = ["EE"]
cities = [{ _id = "64f1", name = { en = "Tallinn", ru = "Таллин" } }]
days_ahead = 90

[[jobs]]
name = "read-fienta"
kind = "remote_parsing.read"
schedule = "0 2 * * 2"            # Tuesday: read Fienta's results
timezone = "UTC"
manual = false
[jobs.params]
type = "parsingEventsFromFienta"

[[jobs]]
name = "create-eventim"
kind = "remote_parsing.create"
schedule = "0 2 * * 3"            # Wednesday: ask for Eventim
timezone = "UTC"
manual = false
[jobs.params]
type = "parsingEventsFromEventim"
countries = ["DE"]
days_ahead = 90

[[jobs]]
name = "read-eventim"
kind = "remote_parsing.read"
schedule = "0 2 * * 4"            # Thursday: read Eventim's results
timezone = "UTC"
manual = false
[jobs.params]
type = "parsingEventsFromEventim"

[[jobs]]
name = "create-kontramarka"
kind = "remote_parsing.create"
schedule = "0 2 * * 5"            # Friday: ask for Kontramarka
timezone = "UTC"
manual = false
[jobs.params]
type = "parsingEventsFromKontramarka"
cities = ["Одеса", { _id = "c-lviv", name = { en = "Lviv", uk = "Львів" } }]
days_ahead = 90

[[jobs]]
name = "read-kontramarka"
kind = "remote_parsing.read"
schedule = "0 2 * * 6"            # Saturday: read Kontramarka's results
timezone = "UTC"
manual = false
[jobs.params]
type = "parsingEventsFromKontramarka"

[[jobs]]
name = "sweep-parsing"
kind = "remote_parsing.sweep"
schedule = "0 2 * * 0"            # Sunday: every operation not yet read
timezone = "UTC"
manual = false
"""


@pytest.fixture
async def parsing_database_url(template_db: str) -> AsyncIterator[str]:
    """The parsing server's own database: a second copy of the migrated template."""
    name = f"worker_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    await _admin(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    try:
        yield dsn_for(name)
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Deployment:
    cluster: Cluster
    pool: db.Pool
    prefix: str
    jobs: dict[str, JobSpec]

    @property
    def url(self) -> str:
        return self.cluster.replicas[0].url

    def logs(self) -> str:
        return "\n".join(r.log()[-6000:] for r in self.cluster.replicas)


@pytest.fixture
def clusters(
    database_url: str, parsing_database_url: str, redis: Redis, fakes: Fakes
) -> Iterator[list[Cluster]]:
    """The deployments' processes, stopped before their databases, Redis keys and fakes
    go (this fixture depends on those, so it is torn down first)."""
    made: list[Cluster] = []
    yield made
    for cluster in made:
        cluster.stop_all()


def start(
    clusters: list[Cluster],
    workdir: Path,
    *,
    database_url: str,
    prefix: str,
    jobs: str,
    api_key: str,
    env: dict[str, str] | None = None,
) -> tuple[Cluster, dict[str, JobSpec]]:
    """One deployment's `worker run` replica, started over its database and key prefix;
    its jobs as the worker reads them."""
    workdir.mkdir()
    jobs_file = workdir / "jobs.toml"
    jobs_file.write_text(jobs)
    specs = {spec.name: spec for spec in load_jobs(jobs_file)}
    cluster = Cluster(
        database_url, REDIS_URL, prefix, jobs_file, workdir, api_key=api_key, extra_env=env or {}
    )
    clusters.append(cluster)
    cluster.start(f"{workdir.name}-0")
    return cluster, specs


@contextlib.asynccontextmanager
async def two_deployments(
    clusters: list[Cluster],
    redis: Redis,
    tmp_path: Path,
    fakes: Fakes,
    *,
    main_db: str,
    parsing_db: str,
    key_prefix: str,
    parsing_key_of_main: str = PARSING_KEY,
) -> AsyncIterator[tuple[Deployment, Deployment]]:
    """The parsing server and the main server, each one replica leading its own prefix."""
    parsing_cluster, parsing_jobs_ = start(
        clusters,
        tmp_path / "parsing",
        database_url=parsing_db,
        prefix=f"{key_prefix}parsing:",
        jobs=parsing_jobs(fakes),
        api_key=PARSING_KEY,
    )
    main_cluster, main_jobs = start(
        clusters,
        tmp_path / "main",
        database_url=main_db,
        prefix=f"{key_prefix}main:",
        jobs=MAIN_JOBS,
        api_key=MAIN_KEY,
        env={
            "PARSING_SERVER_URL": parsing_cluster.replicas[0].url,
            "PARSING_SERVER_API_KEY": parsing_key_of_main,
        },
    )
    async with (
        db.open_pool(parsing_db, timeout=10) as parsing_pool,
        db.open_pool(main_db, timeout=10) as main_pool,
    ):
        parsing = Deployment(
            parsing_cluster, parsing_pool, parsing_cluster.key_prefix, parsing_jobs_
        )
        main = Deployment(main_cluster, main_pool, main_cluster.key_prefix, main_jobs)
        try:
            for d in (parsing, main):
                await d.cluster.wait_ready(d.cluster.replicas[0], timeout=60)
                await wait_new_holder(redis, d.prefix, not_token=None, timeout=60, step=0.1)
            yield parsing, main
        except BaseException:
            print("---- parsing server log ----\n" + parsing.logs())
            print("---- main server log ----\n" + main.logs())
            raise


# -- driving the week -------------------------------------------------------------------


async def poll(check: Callable[[], Awaitable[Any]], *, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        await asyncio.sleep(0.05)


async def final(pool: db.Pool, run_id: int, what: str) -> dict[str, Any]:
    async def ended() -> dict[str, Any] | None:
        row = await runs.get(pool, run_id)
        return row if row is not None and row["status"] in runs.FINAL else None

    row: dict[str, Any] = await poll(ended, timeout=RUN_BOUND, what=what)
    return row


async def run(main: Deployment, name: str) -> dict[str, Any]:
    """Queue one run of the main server's job as its scheduler would; its final row."""
    spec = main.jobs[name]
    run_id = await runs.enqueue(
        main.pool, job=name, kind=spec.kind, params=spec.params, trigger="schedule"
    )
    return await final(main.pool, run_id, f"run {run_id} of {name}")


async def succeeded(main: Deployment, name: str) -> dict[str, Any]:
    row = await run(main, name)
    assert row["status"] == "succeeded", f"{name}: {row['status']}: {row['error']}"
    return row


async def remote_finished(parsing: Deployment, remote_id: str) -> dict[str, Any]:
    """The parsing server's operation once its newest run (the first, or a resume) ended."""

    async def ended() -> dict[str, Any] | None:
        row = await parsing.pool.fetchrow(
            "WITH RECURSIVE op AS (SELECT id, status, error FROM runs WHERE id = $1"
            " UNION ALL SELECT r.id, r.status, r.error FROM runs r"
            "   JOIN op ON r.resumed_from = op.id)"
            " SELECT status, error FROM op ORDER BY id DESC LIMIT 1",
            int(remote_id),
        )
        return dict(row) if row is not None and row["status"] in runs.FINAL else None

    row: dict[str, Any] = await poll(ended, timeout=RUN_BOUND, what=f"remote operation {remote_id}")
    assert row["status"] == "succeeded", row["error"]
    return row


async def week(parsing: Deployment, main: Deployment, fakes: Fakes, *, hold: str = "") -> None:
    """Monday to Sunday. The type `hold` has its site held while its read runs: the read
    leaves the operation for the sweep."""
    left = 0
    for create, read, type_name in CYCLE:
        if type_name == hold:
            fakes.gate.clear()
        row = await succeeded(main, create)
        remote_id = row["result"]["remote_id"]
        if type_name == hold:
            row = await succeeded(main, read)
            assert row["result"]["outcome"] == "left", row["result"]
            assert "left for the sweep" in row["progress"]["message"]
            [op] = [o for o in await ops(main) if o["remote_id"] == remote_id]
            assert (op["status"], op["processed_at"]) in (("pending", None), ("processing", None))
            fakes.gate.set()
            left += 1
            await remote_finished(parsing, remote_id)
            continue
        await remote_finished(parsing, remote_id)  # "a day later"
        row = await succeeded(main, read)
        assert row["result"] == {
            "operation": row["result"]["operation"],
            "remote_id": remote_id,
            "outcome": "success",
        }
    row = await succeeded(main, "sweep-parsing")
    assert row["result"] == {"processed": left, "recorded": 0, "left": 0, "unreadable": 0}


async def ops(main: Deployment) -> list[dict[str, Any]]:
    """The main server's local operations, oldest first."""
    return list(reversed(await events.operations(main.pool, limit=100)))


async def table(main: Deployment) -> dict[str, dict[str, dict[str, Any]]]:
    """The main server's events: source -> external id -> row."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for row in await main.pool.fetch("SELECT *, xmin::text::bigint AS xmin FROM events"):
        found.setdefault(row["source"], {})[row["external_id"]] = dict(row)
    return found


def counts(statistics: dict[str, Any]) -> tuple[int, ...]:
    return tuple(statistics[k] for k in ("created", "updated", "unchanged", "failed", "total"))


# -- what the fakes serve, after the meta the main server sent --------------------------


def bounds(meta: dict[str, Any]) -> tuple[date, date]:
    return date.fromisoformat(meta["dates"]["from"]), date.fromisoformat(meta["dates"]["to"])


def expected_fienta(fakes: Fakes, meta: dict[str, Any]) -> dict[str, str]:
    """EE (meta.countries) events in Tallinn (meta.cities) whose local date is within
    meta.dates: external id -> title."""
    first, last = bounds(meta)
    return {
        str(r["id"]): r["title"]
        for r in fakes.fienta.events["EE"]
        if ", 10412 Tallinn" in r["address"]
        and first <= date.fromisoformat(r["starts_at"][:10]) <= last
    }


def expected_eventim(fakes: Fakes, meta: dict[str, Any]) -> dict[str, str]:
    """eventim.de's products (meta.countries: DE, not AT) within meta.dates (local)."""
    first, last = bounds(meta)
    return {
        p["productId"]: p["name"]
        for p in fakes.eventim.products[DE]
        if first
        <= date.fromisoformat(p["typeAttributes"]["liveEntertainment"]["startDate"][:10])
        <= last
    }


def kontramarka_id(event: kontramarka.FakeEvent) -> str:
    return event.path.removeprefix("/uk/").removesuffix(".html")


def expected_kontramarka(fakes: Fakes, meta: dict[str, Any]) -> dict[str, str]:
    """Odesa's and Lviv's events (meta.cities: not Dnipro) within meta.dates (Kyiv)."""
    first, last = bounds(meta)
    return {
        kontramarka_id(e): e.title
        for city in ("odessa", "lviv")
        for e in fakes.kontramarka.events(city)
        if first <= e.starts.date() <= last
    }


EXPECTED = {FIENTA: expected_fienta, EVENTIM: expected_eventim, KONTRAMARKA: expected_kontramarka}


def change_the_sites(fakes: Fakes, before: dict[str, dict[str, str]]) -> dict[str, tuple[str, str]]:
    """One changed and one new event per source, both within what the main server
    asks for: source -> (changed id, new id)."""
    out = {}

    records = fakes.fienta.events["EE"]
    i, record = next((i, r) for i, r in enumerate(records) if str(r["id"]) in before[FIENTA])
    records[i] = {**record, "title": record["title"] + " (moved)"}
    new = {**record, "id": 100_900, "title": "Premiere #100900 in Tallinn"}
    new["url"] = "https://fienta.com/event-100900"
    records.append(new)
    out["fienta"] = (str(record["id"]), "100900")

    products = fakes.eventim.products[DE]
    i, product = next((i, p) for i, p in enumerate(products) if p["productId"] in before[EVENTIM])
    products[i] = {**product, "name": product["name"] + " (Zusatzshow)"}
    extra = copy.deepcopy(product)
    extra.update(productId="17350900", name="Neue Band 900 - Live", link="https://e.test/900")
    products.append(extra)
    out["eventim"] = (product["productId"], "17350900")

    listing = fakes.kontramarka.listings["lviv", "concert"]
    i, event = next(
        (i, e) for i, e in enumerate(listing) if kontramarka_id(e) in before[KONTRAMARKA]
    )
    listing[i] = dataclasses.replace(event, title=event.title + " (перенесено)")
    fresh = dataclasses.replace(event, id="9001", title="Прем'єра #9001")
    listing.append(fresh)
    listing.sort(key=lambda e: (e.starts, e.id))
    out["kontramarka"] = (kontramarka_id(event), kontramarka_id(fresh))
    return out


# -- the test ---------------------------------------------------------------------------


async def test_two_weekly_cycles_file_the_fakes_events_and_then_their_changes(
    clusters: list[Cluster],
    redis: Redis,
    tmp_path: Path,
    fakes: Fakes,
    database_url: str,
    parsing_database_url: str,
    key_prefix: str,
) -> None:
    async with two_deployments(
        clusters,
        redis,
        tmp_path,
        fakes,
        main_db=database_url,
        parsing_db=parsing_database_url,
        key_prefix=key_prefix,
    ) as (parsing, main):
        # The main server's API refuses these kinds by hand, whatever the file says.
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{main.url}/jobs/read-fienta/trigger", headers={"X-API-Key": MAIN_KEY}
            ) as resp,
        ):
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "schedule_only"

        # -- the first week -------------------------------------------------------------
        await week(parsing, main, fakes)

        first = await ops(main)
        assert [o["type"] for o in first] == [FIENTA, EVENTIM, KONTRAMARKA]
        wanted = {o["type"]: EXPECTED[o["type"]](fakes, o["meta"]) for o in first}
        stored = await table(main)
        assert set(stored) == set(SOURCES.values())
        for op in first:
            source, want = SOURCES[op["type"]], wanted[op["type"]]
            assert want, f"{source}: the meta leaves nothing: the test is wrong"
            assert (op["status"], op["error_text"]) == ("success", ""), op
            assert op["processed_at"] is not None
            n = len(want)
            assert counts(op["statistics"]) == (n, 0, 0, 0, n), (source, op["statistics"])
            assert {k: r["title"] for k, r in stored[source].items()} == want, source
        # The filters bit: each source's site holds more than was asked for.
        assert len(wanted[FIENTA]) < sum(map(len, fakes.fienta.events.values()))
        assert len(wanted[EVENTIM]) < len(fakes.eventim.products[DE])
        assert len(wanted[KONTRAMARKA]) < len(fakes.kontramarka.events())
        # Every operation was read on the parsing server: none left unprocessed.
        unread = await parsing.pool.fetchval(
            "SELECT count(*) FROM runs WHERE trigger = 'api' AND processed_at IS NULL"
        )
        assert unread == 0

        # -- the fakes change; the second week -------------------------------------------
        changed = change_the_sites(fakes, wanted)
        await week(parsing, main, fakes, hold=KONTRAMARKA)

        second = (await ops(main))[3:]
        assert [o["type"] for o in second] == [FIENTA, EVENTIM, KONTRAMARKA]
        after = await table(main)
        for op in second:
            source, n = SOURCES[op["type"]], len(wanted[op["type"]])
            want = EXPECTED[op["type"]](fakes, op["meta"])
            old_id, new_id = changed[source]
            assert (op["status"], op["error_text"]) == ("success", ""), op
            assert counts(op["statistics"]) == (1, 1, n - 1, 0, n + 1), (source, op["statistics"])
            assert {k: r["title"] for k, r in after[source].items()} == want, source
            assert set(after[source]) == set(stored[source]) | {new_id}
            assert after[source][old_id]["title"] != stored[source][old_id]["title"]
            assert after[source][old_id]["first_seen"] == stored[source][old_id]["first_seen"]
            # Unchanged events are not rewritten.
            same = [k for k in stored[source] if k != old_id]
            assert all(after[source][k]["xmin"] == stored[source][k]["xmin"] for k in same)
        # The held Kontramarka operation was filed by the sweep, not by its read.
        sweep = await main.pool.fetchval(
            "SELECT max(id) FROM runs WHERE job = 'sweep-parsing' AND status = 'succeeded'"
        )
        assert second[2]["processed_by"] == sweep
        assert sweep not in {o["processed_by"] for o in second[:2]}  # read by their reads
        # The first week's operations keep their statistics.
        assert [counts(o["statistics"]) for o in (await ops(main))[:3]] == [
            counts(o["statistics"]) for o in first
        ]

        # What a user sees: GET /events on the main server.
        async with aiohttp.ClientSession() as http:
            for type_name, source in SOURCES.items():
                async with http.get(f"{main.url}/events", params={"source": source}) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["total"] == len(wanted[type_name]) + 1
