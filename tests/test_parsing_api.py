"""Seed 001's parsing-server API (`/parsing/*`) and `worker operations`, over real
Postgres and Redis, with operations run by a real leader term.

The job kind behind `parsingEventsFromFienta` is a small `ParseJob` whose source makes
up its events from the operation's `meta` (`count`, `fail_at`), so each test says in
the request what the "site" does.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient
from redis.asyncio import Redis

from worker import cli, db, operations, run_items, runs
from worker.config import JobSpec, Settings, load_jobs
from worker.context import RunContext
from worker.jobs.parse import Bad, EventSource, ParseJob
from worker.lease import Lease
from worker.upstream import Upstream
from worker.web.app import WebState, build_app
from worker.web.parsing import CHECKERS, MAX_BODY, Checkers

from .helpers import eventually
from .test_api import API_KEY, assert_error, key
from .test_catalog_sync import final, leading, upstream

__all__ = ["upstream"]  # the fixture, imported for pytest

FIENTA = "parsingEventsFromFienta"
SITE = "https://fienta.example/api/v1/public/events"
JOBS = """
[[jobs]]
name = "fienta-events"
kind = "parse.fienta"
[jobs.params]
source = "fienta"

[[jobs]]
name = "poke"
kind = "http"
[jobs.params]
url = "http://127.0.0.1:1/x"
"""
OPERATION_KEYS = {
    "_id",
    "type",
    "status",
    "statistics",
    "errorText",
    "infoText",
    "createdAt",
    "finish_time",
    "is_processed",
}

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]


class FakeSite:
    """`meta.count` events (default 25) tagged with the first city asked for; raises at
    event `meta.fail_at`; with `stall_after`, waits there for `gate` (for ever, unless
    the test opens it)."""

    def __init__(self, meta: dict[str, Any], *, stall_after: int | None) -> None:
        self.count = int(meta.get("count", 25))
        self.fail_at = meta.get("fail_at")
        self.city = (meta.get("cities") or ["anywhere"])[0]
        self.stall_after = stall_after

    @property
    def expected(self) -> int | None:
        return self.count

    async def events(self) -> AsyncGenerator[dict[str, Any] | Bad, None]:
        for i in range(self.count):
            if i == self.stall_after:
                await asyncio.Event().wait()
            if i == self.fail_at:
                raise RuntimeError(f"the site went away at event {i}: {SITE}?key=SECRET")
            yield {"source": "fienta", "external_id": str(i), "city": self.city}


class FakeFienta(ParseJob):
    """Stands for `parse.fienta` (written elsewhere): its source is a FakeSite."""

    def __init__(self, *, stall_after: int | None = None) -> None:
        self.stall_after = stall_after

    def check_source(self, spec: JobSpec) -> None:
        count = spec.params.get("meta", {}).get("count", 25)
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"'meta.count' must be a whole number, got {count!r}")

    def source(self, ctx: RunContext) -> EventSource:
        return FakeSite(dict(ctx.params["meta"]), stall_after=self.stall_after)


@pytest.fixture
def settings(tmp_path: Path, database_url: str, key_prefix: str) -> Settings:
    path = tmp_path / "jobs.toml"
    path.write_text(JOBS, encoding="utf-8")
    return Settings(
        jobs=load_jobs(path),
        jobs_file=path,
        api_key=API_KEY,
        key_prefix=key_prefix,
        database_url=database_url,
        worker_id="test-replica",
    )


@pytest.fixture
async def make_client(
    aiohttp_client: AiohttpClient, settings: Settings, pool: db.Pool, redis: Redis, key_prefix: str
) -> MakeClient:
    async def make(*, checkers: Checkers | None = None, **overrides: Any) -> Client:
        state = WebState(
            settings=dataclasses.replace(settings, **overrides),
            pool=pool,
            redis=redis,
            lease=Lease(redis, prefix=key_prefix),
        )
        app = build_app(state)
        if checkers is not None:
            app[CHECKERS] = checkers
        return await aiohttp_client(app)

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client()


async def create(client: Client, meta: Any = None, type_name: str = FIENTA) -> int:
    body: dict[str, Any] = {"type": type_name}
    if meta is not None:
        body["meta"] = meta
    response = await client.post("/parsing/create", json=body, headers=key())
    assert response.status == 200, await response.text()
    answer = await response.json()
    assert set(answer) == {"status", "operationId", "message"}
    assert answer["status"] == "ok"
    assert isinstance(answer["operationId"], str)
    return int(answer["operationId"])


async def results(client: Client, operation_id: int | str) -> dict[str, Any]:
    response = await client.get(f"/parsing/results/{operation_id}", headers=key())
    assert response.status == 200, await response.text()
    answer: dict[str, Any] = await response.json()
    assert set(answer) == {"status", "operation", "events", "totalEvents"}
    assert answer["status"] == "ok"
    assert set(answer["operation"]) == OPERATION_KEYS
    assert answer["totalEvents"] == len(answer["events"])
    return answer


async def unprocessed(client: Client, query: str = "") -> list[dict[str, Any]]:
    response = await client.get(f"/parsing/unprocessed{query}", headers=key())
    assert response.status == 200, await response.text()
    answer = await response.json()
    assert set(answer) == {"status", "operations"}
    assert answer["status"] == "ok"
    for entry in answer["operations"]:
        assert set(entry) == {"operation", "events", "totalEvents"}
        assert entry["totalEvents"] == len(entry["events"])
    found: list[dict[str, Any]] = answer["operations"]
    return found


async def run_all(
    pool: db.Pool, upstream: Upstream, settings: Settings, *op_ids: int, job: FakeFienta
) -> None:
    """A leader term that runs the queued operations to their end."""
    async with leading(pool, upstream, {"parse.fienta": job}, settings.jobs):
        for op in op_ids:
            await final(pool, op)


async def processed_at(pool: db.Pool, op: int) -> Any:
    return await pool.fetchval("SELECT processed_at FROM runs WHERE id = $1", op)


# --- create ------------------------------------------------------------------------


async def test_create_queues_a_run_and_answers_at_once(client: Client, pool: db.Pool) -> None:
    meta = {"cities": [{"_id": "c1", "name": {"en": "Tallinn"}}], "dates": {"from": "2025-03-01"}}
    op = await create(client, meta)
    run = await runs.get(pool, op)
    assert run is not None
    assert (run["job"], run["kind"], run["status"], run["trigger"], run["requested_by"]) == (
        "fienta-events",
        "parse.fienta",
        "queued",
        "api",
        "api:test-replica",
    )
    assert run["params"] == {"source": "fienta", "meta": meta}

    pending = await results(client, op)
    assert pending["operation"]["status"] == "pending"
    assert pending["operation"]["_id"] == str(op)
    assert pending["operation"]["type"] == FIENTA
    assert (pending["events"], pending["totalEvents"]) == ([], 0)
    assert pending["operation"]["finish_time"] is None
    assert await processed_at(pool, op) is None  # not finished: not processed
    assert await unprocessed(client) == []


async def test_the_leader_runs_it_and_results_show_the_events(
    client: Client, pool: db.Pool, upstream: Upstream, settings: Settings
) -> None:
    op = await create(client, {"cities": ["Tartu"], "count": 25})
    await run_all(pool, upstream, settings, op, job=FakeFienta())

    answer = await results(client, op)
    operation = answer["operation"]
    assert operation["status"] == "success"
    assert operation["errorText"] == ""
    assert operation["infoText"] == "done: processed 25 of 25 events, batch 3 of 3 (0 failed)"
    assert orjson.loads(operation["statistics"])["events"] == 25
    assert operation["createdAt"] is not None
    assert operation["finish_time"] is not None
    assert answer["totalEvents"] == 25
    assert [e["external_id"] for e in answer["events"]] == [str(i) for i in range(25)]
    assert {e["city"] for e in answer["events"]} == {"Tartu"}  # meta reached the parser


@pytest.mark.parametrize(
    "meta",
    [
        {},
        {"cities": ["Tallinn", {"name": "Tartu", "country": "EE"}], "countries": ["EE"]},
        {"countries": None, "cities": None, "categories": None, "dates": None},
        {
            "countries": [{"_id": "ee", "code": "EE", "name": "Estonia"}],
            "categories": [{"_id": 7, "title": {"en": "Music", "et": None}}],
            "cities": [{"_id": 3, "slug": "narva", "aliases": ["Narva"]}],
            "dates": {"to": "2025-12-31"},
        },
        {"dates": {"from": "2025-03-30T00:00:00+03:00", "to": "2025-03-31T00:00:00Z"}},
        {"dates": {"from": "2025-01-01", "to": "2025-01-01"}, "locale": "et", "extra": [1]},
    ],
    ids=["empty", "names-and-objects", "nulls", "objects", "instants", "one-day-and-other-keys"],
)
async def test_create_accepts_the_meta_the_main_server_sends(
    client: Client, pool: db.Pool, meta: dict[str, Any]
) -> None:
    op = await create(client, meta)
    run = await runs.get(pool, op)
    assert run is not None
    sent = {k: v for k, v in meta.items() if v is not None}
    assert run["params"]["meta"] == sent


async def test_create_without_meta_is_an_empty_meta(client: Client, pool: db.Pool) -> None:
    op = await create(client)
    run = await runs.get(pool, op)
    assert run is not None
    assert run["params"]["meta"] == {}


async def test_an_unknown_type_is_400_naming_it_and_the_valid_ones(
    client: Client, pool: db.Pool
) -> None:
    response = await client.post("/parsing/create", json={"type": "parsingX"}, headers=key())
    message = await assert_error(response, 400, "bad_type")
    assert "parsingX" in message
    assert FIENTA in message
    assert message.startswith("type:")

    # A seed type whose job kind the jobs file does not run: named, with the kind.
    eventim = {"type": "parsingEventsFromEventim", "meta": {}}
    response = await client.post("/parsing/create", json=eventim, headers=key())
    message = await assert_error(response, 400, "bad_type")
    assert "parsingEventsFromEventim" in message
    assert "parse.eventim" in message
    assert FIENTA in message

    for body in ({"meta": {}}, {"type": 5}, {"type": ""}):
        response = await client.post("/parsing/create", json=body, headers=key())
        assert "type" in await assert_error(response, 400, "bad_type")
    assert await runs.search(pool) == []


async def test_a_type_whose_job_may_not_be_triggered_is_409(
    make_client: MakeClient, settings: Settings, pool: db.Pool
) -> None:
    locked = tuple(dataclasses.replace(j, manual=False) for j in settings.jobs)
    client = await make_client(jobs=locked)
    response = await client.post("/parsing/create", json={"type": FIENTA}, headers=key())
    assert "manual" in await assert_error(response, 409, "not_manual")
    assert await runs.search(pool) == []


@pytest.mark.parametrize(
    ("meta", "field"),
    [
        ([1, 2], "meta"),
        ("cities", "meta"),
        ({"cities": "Tallinn"}, "meta.cities"),
        ({"countries": {"EE": 1}}, "meta.countries"),
        ({"cities": ["Tallinn", 5]}, "meta.cities[1]"),
        ({"cities": [{}]}, "meta.cities[0]"),
        ({"cities": ["  "]}, "meta.cities[0]"),
        ({"categories": [{"name": 3}]}, "meta.categories[0]"),
        ({"categories": [{"_id": 7, "slug": "music"}]}, "meta.categories[0]"),
        ({"cities": [{"name": {"en": ["x"]}}]}, "meta.cities[0]"),
        ({"cities": [{"name": {"en": " "}, "aliases": "Tartu"}]}, "meta.cities[0]"),
        ({"countries": ["EE", {"name": "Latvia"}]}, "meta.countries[1]"),
        ({"dates": "2025-01-01"}, "meta.dates"),
        ({"dates": {}}, "meta.dates"),
        ({"dates": {"from": "2025-13-01"}}, "meta.dates.from"),
        ({"dates": {"from": "yesterday"}}, "meta.dates.from"),
        ({"dates": {"to": 20250101}}, "meta.dates.to"),
        ({"dates": {"to": ""}}, "meta.dates.to"),
        ({"dates": {"from": "2025-03-30T10:00:00"}}, "meta.dates.from"),  # no offset
        ({"dates": {"from": "2025-03-02T00:00:00Z", "to": "2025-03-01T23:00:00Z"}}, "meta.dates"),
        ({"dates": {"from": "2025-02-01", "to": "2025-01-31"}}, "meta.dates"),
        ({"dates": {"from": "2025-01-01", "until": "2025-02-01"}}, "meta.dates"),
        ({"cities": [{"name": "Tal\x00linn"}]}, "meta.cities[0].name"),
        ({"note": {"deep": [{"x": "a\x00"}]}}, "meta.note.deep[0].x"),
    ],
)
async def test_bad_meta_is_400_naming_the_field(
    client: Client, pool: db.Pool, meta: Any, field: str
) -> None:
    response = await client.post(
        "/parsing/create", json={"type": FIENTA, "meta": meta}, headers=key()
    )
    message = await assert_error(response, 400, "bad_meta")
    assert message.startswith(f"{field}: "), message
    assert await runs.search(pool) == []


async def test_the_parser_is_asked_about_the_meta_when_the_app_has_its_checker(
    make_client: MakeClient, pool: db.Pool
) -> None:
    client = await make_client(checkers={"parse.fienta": FakeFienta().check})
    bad = {"type": FIENTA, "meta": {"count": "many"}}
    response = await client.post("/parsing/create", json=bad, headers=key())
    message = await assert_error(response, 400, "bad_meta")
    assert message.startswith("meta.count: must be a whole number, got 'many'"), message
    assert "parse.fienta" in message
    assert await runs.search(pool) == []
    assert await create(client, {"count": 3}) > 0


async def test_meta_nested_too_deep_is_400(client: Client, pool: db.Pool) -> None:
    deep: Any = "x"
    for _ in range(40):
        deep = [deep]
    response = await client.post(
        "/parsing/create", json={"type": FIENTA, "meta": {"deep": deep}}, headers=key()
    )
    assert "nested deeper" in await assert_error(response, 400, "bad_meta")
    assert await runs.search(pool) == []


@pytest.mark.parametrize(
    ("body", "code", "word"),
    [
        (b"{not json", "bad_body", "JSON"),
        (b"[1]", "bad_body", "object"),
        (b'{"type": "parsingEventsFromFienta", "mata": {}}', "unknown_field", "mata"),
    ],
)
async def test_a_bad_body_is_400(
    client: Client, pool: db.Pool, body: bytes, code: str, word: str
) -> None:
    response = await client.post("/parsing/create", data=body, headers=key())
    assert word in await assert_error(response, 400, code)
    assert await runs.search(pool) == []


async def test_a_body_over_the_limit_is_413(client: Client, pool: db.Pool) -> None:
    body = orjson.dumps({"type": FIENTA, "meta": {"x": "a" * MAX_BODY}})
    response = await client.post("/parsing/create", data=io.BytesIO(body), headers=key())
    await assert_error(response, 413, "body_too_large")
    assert await runs.search(pool) == []


# --- authentication ------------------------------------------------------------------

ENDPOINTS = [
    ("POST", "/parsing/create"),
    ("GET", "/parsing/results/1"),
    ("GET", "/parsing/unprocessed"),
    ("POST", "/parsing/cleanup"),
]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
@pytest.mark.parametrize("headers", [{}, key("wrong"), key("")], ids=["none", "wrong", "empty"])
async def test_every_endpoint_needs_the_key(
    client: Client, pool: db.Pool, method: str, path: str, headers: dict[str, str]
) -> None:
    body = {"type": FIENTA} if path.endswith("create") else None
    response = await client.request(method, path, json=body, headers=headers)
    await assert_error(response, 401, "unauthorized")
    assert await runs.search(pool) == []


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
async def test_every_endpoint_is_403_without_a_key_configured(
    make_client: MakeClient, method: str, path: str
) -> None:
    client = await make_client(api_key=None)
    response = await client.request(method, path, headers=key())
    assert "WORKER_API_KEY" in await assert_error(response, 403, "api_disabled")


# --- results -------------------------------------------------------------------------


async def test_results_of_an_unknown_id_is_404(client: Client, pool: db.Pool) -> None:
    other = await runs.enqueue(pool, job="poke", kind="http", params={})  # not an operation
    # A scheduled slot of a parsing job that was skipped never ran: not an operation.
    async with pool.acquire() as conn:
        slot = datetime(2025, 1, 6, 2, tzinfo=UTC)
        await runs.record_missed_many(conn, [("fienta-events", "parse.fienta", slot, "test")])
    missed = await pool.fetchval("SELECT id FROM runs WHERE status = 'missed'")
    assert await operations.recent(pool, limit=10) == []
    for op_id in ("12345", "abc", "0", "-1", "99999999999999999999", str(other), str(missed)):
        response = await client.get(f"/parsing/results/{op_id}", headers=key())
        assert "operationId" in await assert_error(response, 404, "unknown_operation")


async def test_reading_a_finished_operation_marks_it_processed_once(
    client: Client, pool: db.Pool, upstream: Upstream, settings: Settings
) -> None:
    op = await create(client, {"count": 3})
    await run_all(pool, upstream, settings, op, job=FakeFienta())
    assert await processed_at(pool, op) is None

    first = await results(client, op)
    assert first["operation"]["is_processed"] is False  # nobody had read it before
    marked = await processed_at(pool, op)
    assert marked is not None

    second = await results(client, op)
    assert second["operation"]["is_processed"] is True
    assert await processed_at(pool, op) == marked  # only once
    assert second["events"] == first["events"]
    assert await unprocessed(client) == []


async def test_an_error_operation_keeps_and_returns_its_events(
    client: Client, pool: db.Pool, upstream: Upstream, settings: Settings
) -> None:
    """The site fails at event 13: the first batch of ten was saved, and is returned
    with status `error` by both `results` and `unprocessed`."""
    op = await create(client, {"count": 25, "fail_at": 13})
    await run_all(pool, upstream, settings, op, job=FakeFienta())

    for _ in range(2):  # listing does not mark them processed
        [entry] = await unprocessed(client)
        assert entry["operation"]["_id"] == str(op)
        assert entry["operation"]["status"] == "error"
        assert entry["totalEvents"] == 10
    assert await processed_at(pool, op) is None

    answer = await results(client, op)
    assert answer["operation"]["status"] == "error"
    assert "the site went away at event 13" in answer["operation"]["errorText"]
    assert "SECRET" not in answer["operation"]["errorText"]  # shown as /runs shows it
    assert answer["operation"]["finish_time"] is not None
    assert [e["external_id"] for e in answer["events"]] == [str(i) for i in range(10)]
    assert await processed_at(pool, op) is not None
    assert await unprocessed(client) == []


# --- unprocessed ---------------------------------------------------------------------


async def test_unprocessed_lists_finished_unread_operations_with_events(
    client: Client,
    pool: db.Pool,
    upstream: Upstream,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(operations, "_SCAN_BATCH", 2)  # several batches of chains
    ok_old = await create(client, {"count": 4})
    no_events = await create(client, {"count": 4, "fail_at": 0})  # error, nothing saved
    ok_read = await create(client, {"count": 2})
    ok_new = await create(client, {"count": 12})
    await run_all(pool, upstream, settings, ok_old, no_events, ok_read, ok_new, job=FakeFienta())
    await results(client, ok_read)
    still_pending = await create(client, {"count": 1})

    found = await unprocessed(client)
    assert [e["operation"]["_id"] for e in found] == [str(ok_old), str(ok_new)]  # oldest first
    assert [e["totalEvents"] for e in found] == [4, 12]
    assert all(e["operation"]["status"] == "success" for e in found)
    assert all(e["operation"]["is_processed"] is False for e in found)
    assert still_pending not in (int(e["operation"]["_id"]) for e in found)

    [first] = await unprocessed(client, "?limit=1")
    assert first["operation"]["_id"] == str(ok_old)
    for query, code in (("?limit=0", "bad_limit"), ("?lmit=1", "unknown_parameter")):
        response = await client.get(f"/parsing/unprocessed{query}", headers=key())
        await assert_error(response, 400, code)


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/parsing/create"), ("GET", "/parsing/results/1"), ("POST", "/parsing/cleanup")],
)
async def test_endpoints_without_query_parameters_refuse_one(
    client: Client, pool: db.Pool, method: str, path: str
) -> None:
    response = await client.request(
        method, f"{path}?type={FIENTA}", json={"type": FIENTA}, headers=key()
    )
    assert "'type'" in await assert_error(response, 400, "unknown_parameter")
    assert await runs.search(pool) == []


# --- resumed operations ---------------------------------------------------------------


async def stalled_then_handed_off(
    client: Client, pool: db.Pool, upstream: Upstream, settings: Settings
) -> int:
    """An operation whose leader stopped after 23 of 25 events (two batches saved)."""
    op = await create(client, {"count": 25})

    async def two_batches() -> bool:
        return bool(
            await pool.fetchval("SELECT count(*) FROM run_items WHERE operation_id = $1", op) == 20
        )

    async with leading(pool, upstream, {"parse.fienta": FakeFienta(stall_after=23)}, settings.jobs):
        await eventually(two_batches, timeout=10)
    run = await runs.get(pool, op)
    assert run is not None
    assert run["status"] == "abandoned"
    return op


async def test_a_resumed_operation_reads_as_one(
    client: Client, pool: db.Pool, upstream: Upstream, settings: Settings
) -> None:
    op = await stalled_then_handed_off(client, pool, upstream, settings)
    async with leading(pool, upstream, {"parse.fienta": FakeFienta()}, settings.jobs):

        async def resumed() -> int | None:
            found: int | None = await pool.fetchval(
                "SELECT id FROM runs WHERE resumed_from = $1", op
            )
            return found

        resume = await eventually(resumed, timeout=10)
        assert (await final(pool, resume))["status"] == "succeeded"

    answer = await results(client, op)
    assert answer["operation"]["_id"] == str(op)
    assert answer["operation"]["status"] == "success"
    assert answer["operation"]["infoText"].startswith("done: processed 25 of 25 events")
    assert [e["external_id"] for e in answer["events"]] == [str(i) for i in range(25)]
    assert await processed_at(pool, op) is not None
    # The resume is a run of the operation, not an operation of its own.
    response = await client.get(f"/parsing/results/{resume}", headers=key())
    await assert_error(response, 404, "unknown_operation")
    ops = await operations.recent(pool, limit=10)
    assert [o.id for o in ops] == [op]
    assert [r["id"] for r in ops[0].chain] == [op, resume]


async def test_an_operation_waiting_for_its_resume_is_still_processing(
    client: Client, pool: db.Pool, upstream: Upstream, settings: Settings
) -> None:
    op = await stalled_then_handed_off(client, pool, upstream, settings)
    handed_off = await results(client, op)  # before any leader queued the resume
    assert handed_off["operation"]["status"] == "processing"
    assert await processed_at(pool, op) is None  # not finished: must not be marked

    async with db.fenced(pool, await pool.fetchval("SELECT token FROM fence")) as conn:
        assert len(await runs.queue_resumes(conn, kinds=["parse.fienta"], max_attempts=5)) == 1
    queued = await results(client, op)
    assert queued["operation"]["status"] == "processing"
    assert queued["totalEvents"] == 20
    assert await processed_at(pool, op) is None
    assert await unprocessed(client) == []


# --- cleanup -------------------------------------------------------------------------


async def stored_operation(pool: db.Pool, *, age_days: float, processed: bool, events: int) -> int:
    """A finished operation `age_days` old with `events` saved events."""
    op = await runs.enqueue(
        pool, job="fienta-events", kind="parse.fienta", params={"meta": {}}, trigger="api"
    )
    await pool.execute(
        "UPDATE runs SET status = 'succeeded', finished_at = now(),"
        " created_at = now() - make_interval(days => $2::int),"
        " processed_at = CASE WHEN $3 THEN now() END WHERE id = $1",
        op,
        int(age_days),
        processed,
    )
    async with pool.acquire() as conn:
        items = [{"external_id": str(i)} for i in range(events)]
        await run_items.save_batch(conn, op, batch=1, first_seq=0, items=items)
    return op


async def cleanup(client: Client, body: Any = None) -> dict[str, Any]:
    response = await client.post("/parsing/cleanup", json=body, headers=key())
    assert response.status == 200, await response.text()
    answer: dict[str, Any] = await response.json()
    assert set(answer) == {"status", "deletedCount", "message"}
    assert (answer["status"], answer["message"]) == ("ok", "Cleanup completed")
    return answer


async def test_cleanup_deletes_only_processed_events_older_than_n_days(
    client: Client, pool: db.Pool
) -> None:
    old_read = await stored_operation(pool, age_days=40, processed=True, events=3)
    old_unread = await stored_operation(pool, age_days=40, processed=False, events=4)
    recent_read = await stored_operation(pool, age_days=10, processed=True, events=5)

    async def left() -> dict[int, int]:
        return {
            op: len(await run_items.read(pool, op)) for op in (old_read, old_unread, recent_read)
        }

    assert (await cleanup(client))["deletedCount"] == 3  # the default: 30 days
    assert await left() == {old_read: 0, old_unread: 4, recent_read: 5}
    assert (await cleanup(client, {"days": 30}))["deletedCount"] == 0
    assert (await cleanup(client, {"days": 7}))["deletedCount"] == 5
    assert await left() == {old_read: 0, old_unread: 4, recent_read: 0}
    # The operations themselves stay readable, with no events left.
    answer = await results(client, old_read)
    assert (answer["operation"]["status"], answer["totalEvents"]) == ("success", 0)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"days": -1}, "bad_days"),
        ({"days": "30"}, "bad_days"),
        ({"days": True}, "bad_days"),
        ({"days": 100_000}, "bad_days"),
        ({"dys": 3}, "unknown_field"),
    ],
)
async def test_cleanup_bad_days_is_400(client: Client, pool: db.Pool, body: Any, code: str) -> None:
    op = await stored_operation(pool, age_days=40, processed=True, events=2)
    response = await client.post("/parsing/cleanup", json=body, headers=key())
    message = await assert_error(response, 400, code)
    assert "days" in message or "dys" in message
    assert len(await run_items.read(pool, op)) == 2


# --- worker operations -----------------------------------------------------------------


async def test_worker_operations_lists_them_newest_first(
    client: Client,
    pool: db.Pool,
    upstream: Upstream,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(operations, "_SCAN_BATCH", 2)  # several batches of chains
    ok = await create(client, {"count": 3})
    failed = await create(client, {"count": 25, "fail_at": 12})
    await run_all(pool, upstream, settings, ok, failed, job=FakeFienta())
    await results(client, ok)
    pending = await create(client, {"count": 1})

    def args(**given: Any) -> argparse.Namespace:
        return argparse.Namespace(**{"status": None, "limit": 20, "json": False, **given})

    assert await cli.cmd_operations(args(json=True), settings) == 0
    views = orjson.loads(capsys.readouterr().out)
    assert [v["_id"] for v in views] == [str(pending), str(failed), str(ok)]
    assert [v["status"] for v in views] == ["pending", "error", "success"]
    assert [v["is_processed"] for v in views] == [False, False, True]
    assert [v["totalEvents"] for v in views] == [0, 10, 3]

    assert await cli.cmd_operations(args(), settings) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[1].startswith(f"#{failed} ")
    assert FIENTA in lines[1]
    assert " error " in lines[1]
    assert "unread" in lines[1]
    assert "processed 10 of 25 events" in lines[1]
    assert "the site went away" in lines[1]
    assert "processed" in lines[2].split()

    assert await cli.cmd_operations(args(status="error", limit=1, json=True), settings) == 0
    assert [v["_id"] for v in orjson.loads(capsys.readouterr().out)] == [str(failed)]
    assert await cli.cmd_operations(args(status="success", json=True), settings) == 0
    assert [v["_id"] for v in orjson.loads(capsys.readouterr().out)] == [str(ok)]
    assert await cli.cmd_operations(args(limit=1, json=True), settings) == 0
    assert [v["_id"] for v in orjson.loads(capsys.readouterr().out)] == [str(pending)]
    assert await cli.cmd_operations(args(status="processing"), settings) == 0
    assert capsys.readouterr().out == "no parsing operations\n"
