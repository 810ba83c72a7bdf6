"""The HTTP API every replica serves, against real Postgres and Redis."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient
from redis.asyncio import Redis

from worker import db, runs
from worker.config import Settings, load_jobs
from worker.lease import Lease
from worker.web.app import WebState, build_app

API_KEY = "s3cret"
JOBS = """
[[jobs]]
name = "poke"
kind = "http"
schedule = "*/5 * * * *"
timezone = "Europe/Bucharest"
[jobs.params]
url = "http://127.0.0.1:1/x"

[[jobs]]
name = "locked"
kind = "http"
schedule = "0 3 * * *"
manual = false
[jobs.params]
url = "http://127.0.0.1:1/x"
"""


Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[tuple[Client, WebState]]]


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
    aiohttp_client: AiohttpClient,
    settings: Settings,
    pool: db.Pool,
    redis: Redis,
    key_prefix: str,
) -> MakeClient:
    """Build the app over real stores; `overrides` replace Settings fields."""

    async def make(
        *, redis_client: Redis | None = None, **overrides: Any
    ) -> tuple[Client, WebState]:
        r = redis_client or redis
        state = WebState(
            settings=dataclasses.replace(settings, **overrides),
            pool=pool,
            redis=r,
            lease=Lease(r, prefix=key_prefix),
        )
        return await aiohttp_client(build_app(state)), state

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    c, _ = await make_client()
    return c


async def assert_error(response: ClientResponse, status: int, code: str | None = None) -> str:
    """The response is `status` with the {"error": {"code", "message"}} body; returns message."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    message: str = body["error"]["message"]
    return message


def key(value: str = API_KEY) -> dict[str, str]:
    return {"X-API-Key": value}


# --- trigger ---------------------------------------------------------------------


async def test_trigger_queues_a_manual_run(client: Client, pool: db.Pool) -> None:
    response = await client.post("/jobs/poke/trigger", headers=key())
    assert response.status == 202
    body = await response.json()
    run_id = body["run_id"]
    assert isinstance(run_id, int)
    run = await runs.get(pool, run_id)
    assert run is not None
    assert (run["job"], run["kind"], run["status"], run["trigger"]) == (
        "poke",
        "http",
        "queued",
        "manual",
    )
    assert run["params"] == {"url": "http://127.0.0.1:1/x"}
    assert run["slot"] is None


@pytest.mark.parametrize("headers", [{}, key("wrong"), key("")], ids=["none", "wrong", "empty"])
async def test_trigger_needs_the_key(
    client: Client, pool: db.Pool, headers: dict[str, str]
) -> None:
    await assert_error(await client.post("/jobs/poke/trigger", headers=headers), 401)
    assert await runs.search(pool) == []


async def test_trigger_unknown_job_is_404(client: Client) -> None:
    message = await assert_error(await client.post("/jobs/nope/trigger", headers=key()), 404)
    assert "nope" in message


async def test_trigger_of_a_non_manual_job_is_409(client: Client, pool: db.Pool) -> None:
    message = await assert_error(await client.post("/jobs/locked/trigger", headers=key()), 409)
    assert "manual" in message
    assert await runs.search(pool) == []


async def test_trigger_is_403_without_an_api_key_configured(
    make_client: MakeClient, pool: db.Pool
) -> None:
    client, _ = await make_client(api_key=None)
    for headers in ({}, key()):
        message = await assert_error(await client.post("/jobs/poke/trigger", headers=headers), 403)
        assert "WORKER_API_KEY" in message
    assert await runs.search(pool) == []


async def test_trigger_only_accepts_post(client: Client) -> None:
    await assert_error(await client.get("/jobs/poke/trigger", headers=key()), 405)


# --- jobs ------------------------------------------------------------------------


async def test_list_jobs(client: Client) -> None:
    response = await client.get("/jobs")
    assert response.status == 200
    jobs = {j["name"]: j for j in (await response.json())["jobs"]}
    assert set(jobs) == {"poke", "locked"}
    poke, locked = jobs["poke"], jobs["locked"]
    assert (poke["schedule"], poke["timezone"], poke["manual"]) == (
        "*/5 * * * *",
        "Europe/Bucharest",
        True,
    )
    assert (locked["schedule"], locked["timezone"], locked["manual"]) == (
        "0 3 * * *",
        "UTC",
        False,
    )
    now = datetime.now(UTC)
    for job in (poke, locked):
        assert job["last_run"] is None
        assert datetime.fromisoformat(job["next_slot"]) > now
    nxt = datetime.fromisoformat(locked["next_slot"]).astimezone(UTC)
    assert (nxt.hour, nxt.minute, nxt.second) == (3, 0, 0)
    assert datetime.fromisoformat(poke["next_slot"]).minute % 5 == 0


async def test_get_job_shows_its_last_run(client: Client) -> None:
    before = await client.get("/jobs/poke")
    assert before.status == 200
    assert (await before.json())["last_run"] is None

    run_id = (await (await client.post("/jobs/poke/trigger", headers=key())).json())["run_id"]
    response = await client.get("/jobs/poke")
    assert response.status == 200
    job = await response.json()
    assert job["name"] == "poke"
    assert job["schedule"] == "*/5 * * * *"
    assert job["timezone"] == "Europe/Bucharest"
    assert job["next_slot"] is not None
    assert job["last_run"]["id"] == run_id
    assert job["last_run"]["status"] == "queued"
    # The other job's view is untouched.
    assert (await (await client.get("/jobs/locked")).json())["last_run"] is None


async def test_get_unknown_job_is_404(client: Client) -> None:
    assert "nope" in await assert_error(await client.get("/jobs/nope"), 404, "unknown_job")


async def test_job_without_schedule_has_no_next_slot(
    make_client: MakeClient, settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "manual.toml"
    path.write_text('[[jobs]]\nname = "adhoc"\nkind = "http"\n', encoding="utf-8")
    client, _ = await make_client(jobs=load_jobs(path))
    job = await (await client.get("/jobs/adhoc")).json()
    assert job["schedule"] is None
    assert job["next_slot"] is None


# --- runs ------------------------------------------------------------------------


@pytest.fixture
async def some_runs(pool: db.Pool) -> dict[str, int]:
    """poke: one succeeded, one queued; locked: one queued. Returns their ids."""
    ids = {}
    for name, job in (("poke_done", "poke"), ("poke_queued", "poke"), ("locked", "locked")):
        ids[name] = await runs.enqueue(pool, job=job, kind="http", params={})
        if name == "poke_done":
            async with pool.acquire() as conn:
                started = await runs.start_queued(conn, token=1, worker_id="w", forbid=[])
                assert started is not None
                assert started["id"] == ids[name]
                await runs.finish(conn, ids[name], status="succeeded", result={"ok": True})
    return ids


async def run_ids(client: Client, query: str) -> list[int]:
    response = await client.get(f"/runs{query}")
    assert response.status == 200, await response.text()
    return [r["id"] for r in (await response.json())["runs"]]


async def test_list_runs_filters(client: Client, some_runs: dict[str, int]) -> None:
    done, queued, locked = some_runs["poke_done"], some_runs["poke_queued"], some_runs["locked"]
    assert await run_ids(client, "") == [locked, queued, done]  # newest first
    assert await run_ids(client, "?job=poke") == [queued, done]
    assert await run_ids(client, "?status=queued") == [locked, queued]
    assert await run_ids(client, "?job=poke&status=succeeded") == [done]
    assert await run_ids(client, "?job=locked&status=succeeded") == []
    assert await run_ids(client, "?job=nope") == []
    assert await run_ids(client, "?limit=1") == [locked]
    assert await run_ids(client, "?job=&status=&limit=2") == [locked, queued]


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("?status=bogus", "bad_status"),
        ("?limit=abc", "bad_limit"),
        ("?limit=0", "bad_limit"),
        ("?limit=1001", "bad_limit"),
    ],
)
async def test_list_runs_rejects_bad_query(client: Client, query: str, code: str) -> None:
    await assert_error(await client.get(f"/runs{query}"), 400, code)


async def test_get_run(client: Client, some_runs: dict[str, int]) -> None:
    response = await client.get(f"/runs/{some_runs['poke_done']}")
    assert response.status == 200
    run = await response.json()
    assert run["id"] == some_runs["poke_done"]
    assert run["job"] == "poke"
    assert run["status"] == "succeeded"
    assert run["result"] == {"ok": True}
    assert isinstance(run["duration"], float)
    assert run["duration"] >= 0
    datetime.fromisoformat(run["created_at"])
    queued = await (await client.get(f"/runs/{some_runs['poke_queued']}")).json()
    assert queued["status"] == "queued"
    assert queued["duration"] is None


async def test_get_unknown_run_is_404(client: Client) -> None:
    assert "999999" in await assert_error(await client.get("/runs/999999"), 404, "unknown_run")


async def test_get_run_with_a_bad_id_is_400(client: Client) -> None:
    await assert_error(await client.get("/runs/abc"), 400, "bad_id")


# --- leader ----------------------------------------------------------------------


async def test_leader_when_nobody_leads(client: Client) -> None:
    response = await client.get("/leader")
    assert response.status == 200
    body = await response.json()
    assert body["holder"] is None
    assert body["token"] is None
    assert body["self"] is False
    assert body["self_id"] == "test-replica"


async def test_leader_when_we_lead(make_client: MakeClient, settings: Settings) -> None:
    client, state = await make_client()
    grant, _ = await state.lease.acquire(
        holder=settings.worker_id, ttl=5.0, address="http://test-replica:8080"
    )
    assert grant is not None
    body = await (await client.get("/leader")).json()
    assert body["holder"] == settings.worker_id
    assert body["self"] is True
    assert body["token"] == grant.token
    assert 0 < body["ttl_ms"] <= 5000
    assert body["address"] == "http://test-replica:8080"
    assert body["since"] == grant.since


async def test_leader_when_another_replica_leads(make_client: MakeClient) -> None:
    client, state = await make_client()
    grant, _ = await state.lease.acquire(holder="other-replica", ttl=5.0)
    assert grant is not None
    body = await (await client.get("/leader")).json()
    assert body["holder"] == "other-replica"
    assert body["self"] is False
    assert body["token"] == grant.token


# --- probes and metrics ----------------------------------------------------------


async def test_healthz(client: Client) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    assert (await response.json())["status"] == "ok"


async def test_readyz_and_shutting_down(make_client: MakeClient) -> None:
    client, state = await make_client()
    response = await client.get("/readyz")
    assert response.status == 200, await response.text()
    assert (await response.json())["status"] == "ready"

    state.shutting_down.set()
    response = await client.get("/readyz")
    assert response.status == 503
    assert "shutting down" in await response.text()
    # Liveness is unaffected: a draining replica must not be restarted.
    assert (await client.get("/healthz")).status == 200


@pytest.fixture
async def dead_redis() -> AsyncIterator[Redis]:
    """A client for a port where nothing listens."""
    client = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    try:
        yield client
    finally:
        await client.aclose()


async def test_readyz_names_redis_when_it_is_down(
    make_client: MakeClient, dead_redis: Redis
) -> None:
    client, _ = await make_client(redis_client=dead_redis)
    response = await client.get("/readyz")
    assert response.status == 503
    body = await response.json()
    assert body["status"] == "unready"
    assert len(body["down"]) == 1, body
    assert body["down"][0].startswith("redis"), body
    # Liveness does not depend on Redis.
    assert (await client.get("/healthz")).status == 200


async def test_metrics(client: Client) -> None:
    response = await client.get("/metrics")
    assert response.status == 200
    text = await response.text()
    assert "worker_leader" in text
    assert "process_cpu_seconds_total" in text


# --- role=scheduler ----------------------------------------------------------------


async def test_scheduler_role_serves_no_api(make_client: MakeClient) -> None:
    client, _ = await make_client(role="scheduler")
    for path in ("/jobs", "/jobs/poke", "/runs", "/leader"):
        await assert_error(await client.get(path), 404)
    await assert_error(await client.post("/jobs/poke/trigger", headers=key()), 404)
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    metrics = await client.get("/metrics")
    assert metrics.status == 200
    assert "worker_leader" in await metrics.text()


async def test_unknown_path_has_the_error_body(client: Client) -> None:
    await assert_error(await client.get("/nowhere"), 404, "not_found")


async def test_error_answers_raise_no_warning(client: Client) -> None:
    await assert_error(await client.post("/jobs/poke/trigger"), 401, "unauthorized")


async def test_status_page_shows_leader_jobs_and_runs_escaped(
    client: Client, pool: db.Pool, redis: Redis, key_prefix: str
) -> None:
    await Lease(redis, prefix=key_prefix).acquire(holder="test-replica", ttl=10)
    await pool.execute(
        "INSERT INTO runs (job, kind, trigger, status, error, progress, started_at, finished_at)"
        " VALUES ('poke', 'http', 'manual', 'failed', '<script>alert(1)</script>',"
        ' \'{"done": 3, "total": 4, "message": "page 3/4"}\', now(), now())'
    )
    response = await client.get("/")
    assert response.status == 200
    assert response.content_type == "text/html"
    page = await response.text()
    assert "<b>test-replica</b> leads" in page
    assert "this replica" in page
    assert "poke" in page
    assert "locked" in page
    assert "page 3/4" in page
    assert 'style="width:75%"' in page
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


async def test_status_page_without_leader_says_so(client: Client) -> None:
    page = await (await client.get("/")).text()
    assert "nobody leads right now" in page
    assert "no runs yet" in page


async def test_cancel_needs_the_key_and_a_live_run(client: Client, pool: db.Pool) -> None:
    queued = await runs.enqueue(pool, job="poke", kind="http", params={})
    done = await pool.fetchval(
        "INSERT INTO runs (job, kind, trigger, status, finished_at)"
        " VALUES ('poke', 'http', 'manual', 'succeeded', now()) RETURNING id"
    )
    await assert_error(await client.post(f"/runs/{queued}/cancel"), 401, "unauthorized")
    headers = {"X-API-Key": API_KEY}
    response = await client.post(f"/runs/{queued}/cancel", headers=headers)
    assert response.status == 200
    assert (await response.json())["status"] == "cancelled"
    await assert_error(await client.post(f"/runs/{done}/cancel", headers=headers), 409, "finished")
    await assert_error(await client.post("/runs/999999/cancel", headers=headers), 404)
    await assert_error(await client.post("/runs/x/cancel", headers=headers), 400, "bad_id")
