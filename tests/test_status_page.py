"""The status page and its JSON, the run page and the replica registry, against real
Postgres and Redis (the browser test is test_status_browser.py)."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import lxml.html
import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient
from redis.asyncio import Redis

from worker import db, replicas
from worker.config import LeaseSettings, Settings, load_jobs
from worker.lease import Lease
from worker.web.app import WebState, build_app
from worker.web.status import cron_words

from .helpers import eventually

HOSTILE = "<img src=x onerror=alert(1)>\"'&"
JOBS = f"""
[[jobs]]
name = "often"
kind = "http"
schedule = "*/5 * * * *"
timezone = "Europe/Bucharest"
[jobs.params]
url = "http://127.0.0.1:1/x"

[[jobs]]
name = "nightly"
kind = "http"
schedule = "0 3 * * 1-5"
manual = false
[jobs.params]
url = "http://127.0.0.1:1/x"

[[jobs]]
name = '''{HOSTILE}'''
kind = "http"
[jobs.params]
url = "http://127.0.0.1:1/x"
"""

Client = TestClient[Any, Any]


@pytest.fixture
async def state(tmp_path: Path, pool: db.Pool, redis: Redis, key_prefix: str) -> WebState:
    path = tmp_path / "jobs.toml"
    path.write_text(JOBS, encoding="utf-8")
    settings = Settings(
        jobs=load_jobs(path),
        jobs_file=path,
        api_key="k",
        key_prefix=key_prefix,
        worker_id="web-1",
        lease=LeaseSettings(ttl=2.0),
    )
    return WebState(
        settings=settings, pool=pool, redis=redis, lease=Lease(redis, prefix=key_prefix)
    )


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, state: WebState) -> Client:
    return await aiohttp_client(build_app(state))


async def add_run(pool: db.Pool, job: str, status: str, **values: Any) -> int:
    """A row of `runs` as the leader would have left it."""
    now = datetime.now(UTC)
    row = {
        "kind": "http",
        "trigger": "manual",
        "created_at": now,
        "started_at": None if status in ("queued", "missed", "skipped") else now,
        "finished_at": None if status in ("queued", "running") else now,
        **values,
    }
    columns = ["job", "status", *row]
    marks = ", ".join(f"${n}" for n in range(1, len(columns) + 1))
    run_id: int = await pool.fetchval(
        f"INSERT INTO runs ({', '.join(columns)}) VALUES ({marks}) RETURNING id",
        job,
        status,
        *row.values(),
    )
    return run_id


def parse(page: str) -> Any:
    return lxml.html.fromstring(page)


def text(node: Any) -> str:
    """The element's visible text (hidden elements left out), a space between the
    texts of its elements."""
    node = copy.deepcopy(node)
    for hidden in node.xpath(".//*[@hidden]"):
        hidden.drop_tree()
    return " ".join(" ".join(node.itertext()).split())


def row_ids(tree: Any, table: str) -> list[int]:
    return [int(k) for k in tree.xpath(f'//table[@id="{table}"]/tbody/tr/@data-key')]


# --- the page ----------------------------------------------------------------------


async def test_the_page_shows_leader_replicas_jobs_and_runs(
    client: Client, state: WebState, pool: db.Pool, redis: Redis
) -> None:
    grant, _ = await state.lease.acquire(holder="leader-1", ttl=10, address="http://10.0.0.5:8080")
    assert grant is not None
    registry = replicas.registry_for(redis, state.settings)
    for name, role in (("leader-1", "all"), ("web-1", "http")):
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        await registry.announce(
            replicas.Replica(name, role, "1.2.3", f"http://{name}", stamp, stamp)
        )
    ago = datetime.now(UTC) - timedelta(minutes=3)
    for n in range(3):
        await add_run(
            pool,
            "often",
            "succeeded",
            started_at=ago,
            finished_at=ago + timedelta(seconds=10 + n),
            stats={"items": 100 * (n + 1), "failed_sample": [{"id": "x", "reason": "y"}]},
        )
    await add_run(pool, "often", "missed", slot=ago, trigger="schedule", error="leader down")
    await add_run(pool, "often", "skipped", slot=ago + timedelta(minutes=1), trigger="schedule")
    running = await add_run(
        pool,
        "often",
        "running",
        started_at=ago,
        progress={"done": 30, "total": 120, "message": "page 3 of 12"},
        stats={"items": 300},
    )

    response = await client.get("/")
    assert response.status == 200
    assert response.content_type == "text/html"
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    page = await response.text()
    tree = parse(page)
    leader = text(tree.get_element_by_id("leader"))
    assert "leader-1 leads" in leader
    assert f"Token {grant.token}" in leader
    assert "http://10.0.0.5:8080" in leader
    assert "this replica" not in leader  # the page is served by web-1
    replica_rows = tree.xpath('//table[@id="replicas"]/tbody/tr')
    assert [r.get("data-key") for r in replica_rows] == ["leader-1", "web-1"]
    assert "leader" in text(replica_rows[0])
    assert "1.2.3" in text(replica_rows[0])
    assert "this replica" in text(replica_rows[1])

    cards = {c.get("data-job"): c for c in tree.xpath("//article[@data-job]")}
    assert set(cards) == {"often", "nightly", HOSTILE}
    often = text(cards["often"])
    assert "every 5 minutes */5 * * * * Europe/Bucharest" in often
    assert "Missed / skipped 1 / 1 in 24 h" in often
    assert f"#{running}" in often
    assert "25% (30 of 120)" in often
    assert len(cards["often"].xpath(".//svg/rect")) == 4  # three ended, one running
    assert "items, most 300" in often
    nightly = text(cards["nightly"])
    assert "at 03:00 on Mon-Fri 0 3 * * 1-5" in nightly
    assert "never ran" in nightly
    # manual = false: no "run now", but it may be paused; no schedule: nothing but run now.
    assert cards["nightly"].xpath(".//button/@data-action") == ["pause", "resume"]
    assert cards[HOSTILE].xpath(".//button/@data-action") == ["trigger"]

    assert row_ids(tree, "attention") == [running]
    assert row_ids(tree, "recent")[0] == running
    bar = tree.xpath(f'//table[@id="attention"]//tr[@data-key="{running}"]//*[@role="progressbar"]')
    assert bar[0].get("aria-valuenow") == "25"
    assert 'style="width:25%"' in page


async def test_running_and_failed_runs_stay_on_top_of_a_frequent_job(
    client: Client, pool: db.Pool
) -> None:
    long_ago = datetime.now(UTC) - timedelta(hours=2)
    running = await add_run(pool, "nightly", "running", started_at=long_ago)
    failed = await add_run(pool, "nightly", "failed", error="boom", finished_at=long_ago)
    old_failure = await add_run(
        pool, "nightly", "failed", finished_at=datetime.now(UTC) - timedelta(days=2)
    )
    failed_too = await add_run(pool, "nightly", "abandoned", finished_at=long_ago)
    backfill = [await add_run(pool, "nightly", "queued", trigger="backfill") for _ in range(30)]
    for _ in range(60):
        await add_run(pool, "often", "succeeded")

    tree = parse(await (await client.get("/")).text())
    # Running, the 20 queued runs next to start, then failures newest first.
    assert row_ids(tree, "attention") == [running, *backfill[:20], failed_too, failed]
    assert old_failure not in row_ids(tree, "attention")
    recent = row_ids(tree, "recent")
    assert len(recent) == 25
    assert not {running, failed, failed_too} & set(recent)
    # Paging: the next page starts below the last row shown.
    older = tree.xpath('//a[@data-f="older"]/@href')[0]
    assert f"before={recent[-1]}" in older
    page2 = row_ids(parse(await (await client.get(older)).text()), "recent")
    assert page2[0] == recent[-1] - 1
    assert len(page2) == 25


async def test_filters_by_job_and_status(client: Client, pool: db.Pool) -> None:
    a = await add_run(pool, "often", "failed")
    await add_run(pool, "often", "succeeded")
    await add_run(pool, "nightly", "failed")
    tree = parse(await (await client.get("/?job=often&status=failed")).text())
    assert row_ids(tree, "recent") == [a]
    assert tree.xpath('//select[@name="status"]/option[@selected]/text()') == ["failed"]
    state = await (
        await client.get("/ui/state", params={"job": "often", "status": "failed"})
    ).json()
    assert [r["id"] for r in state["runs"]] == [a]
    bad = await client.get("/?status=bogus")
    assert bad.status == 400
    assert (await bad.json())["error"]["code"] == "bad_status"


async def test_hostile_names_and_errors_are_escaped(client: Client, pool: db.Pool) -> None:
    run_id = await add_run(
        pool,
        HOSTILE,
        "failed",
        error=f"upstream said {HOSTILE}",
        progress={"message": HOSTILE, "done": 1, "total": 2},
        stats={HOSTILE: 1, "failed_sample": [{"id": HOSTILE, "reason": HOSTILE}]},
        cursor={"page": HOSTILE},
    )
    pages = [
        await (await client.get("/")).text(),
        await (await client.get(f"/ui/runs/{run_id}")).text(),
        await (await client.get("/ui/jobs/often/chart")).text(),
    ]
    for page in pages:
        assert "<img" not in page
        assert "onerror=alert(1)>" not in page
    escaped = "&lt;img src=x onerror=alert(1)&gt;&#34;&#39;&amp;"
    assert escaped in pages[0]
    assert escaped in pages[1]
    # Each element's text is the name as written, not markup.
    tree = parse(pages[0])
    assert (
        tree.xpath(f'//table[@id="attention"]//tr[@data-key="{run_id}"]//td[@data-f="job"]')[0].text
        == HOSTILE
    )
    assert HOSTILE in tree.xpath("//article[@data-job]/header/h3/text()")


async def test_the_run_page(client: Client, pool: db.Pool) -> None:
    first = await add_run(pool, "often", "abandoned", error="its leader (token 3) went away")
    second = await add_run(
        pool,
        "often",
        "running",
        trigger="resume",
        resumed_from=first,
        attempt=2,
        heartbeat_at=datetime.now(UTC),
        progress={"done": 5, "total": 10, "message": "page 5"},
        stats={"items": 500, "failed": 1, "failed_sample": [{"id": "sku-9", "reason": "bad ean"}]},
        cursor={"page": 6},
        params={"url": "https://user:pw@example.com/x?token=abc"},
    )
    third = await add_run(pool, "often", "queued", trigger="resume", resumed_from=second)
    response = await client.get(f"/ui/runs/{second}")
    assert response.status == 200
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    page = await response.text()
    tree = parse(page)
    head = text(tree.get_element_by_id("run"))
    assert f"Run #{second} of often" in head
    assert "running" in head
    assert "page 5" in head
    assert "50% (5 of 10)" in head
    assert "Attempt 2" in head
    stats = text(tree.xpath('//tbody[@data-f="stats"]')[0])
    assert "items 500" in stats
    assert "failed_sample" not in stats
    assert text(tree.xpath('//tbody[@data-f="sample"]')[0]) == "sku-9 bad ean"
    assert '"page": 6' in tree.xpath('//pre[@data-f="cursor"]/text()')[0]
    chain = [
        int(a.removeprefix("/ui/runs/")) for a in tree.xpath('//ol[@class="chain"]/li/a/@href')
    ]
    assert chain == [first, second, third]
    assert tree.xpath('//ol[@class="chain"]/li[@aria-current]/a/text()') == [f"#{second}"]
    assert text(tree.xpath('//p[@data-f="webhooks-empty"]')[0]) == "none"
    assert "pw@" not in page
    assert "abc" not in page
    for field in ("Created", "Started", "Last heartbeat", "Finished", "Took"):
        assert tree.xpath(f'//dt[text()="{field}"]')

    # Its webhook deliveries, the URL's secrets redacted.
    await pool.execute(
        "INSERT INTO webhook_outbox (event, job, run_id, url, payload, state, attempts,"
        " last_status, last_error, delivered_at) VALUES ('run.succeeded', 'often', $1,"
        " 'https://hooks.example/x?token=hush', '{}', 'delivered', 2, 200, 'HTTP 502', now())",
        first,
    )
    hooks = parse(await (await client.get(f"/ui/runs/{first}")).text())
    [delivery] = hooks.xpath('//tbody[@data-f="webhooks"]/tr')
    assert text(delivery).startswith("run.succeeded https://hooks.example/x?token=")
    assert "delivered HTTP 200 2 HTTP 502" in text(delivery)
    assert "hush" not in text(delivery)

    missing = await client.get("/ui/runs/999999")
    assert missing.status == 404
    assert "There is no run 999999" in await missing.text()
    assert (await client.get("/ui/runs/abc")).status == 400


async def test_state_json_is_what_the_page_polls(
    client: Client, state: WebState, pool: db.Pool
) -> None:
    run_id = await add_run(pool, "often", "running", progress={"done": 1, "total": 4})
    data = await (await client.get("/ui/state")).json()
    assert set(data) >= {"leader", "replicas", "jobs", "attention", "runs", "older", "me"}
    assert data["leader"] is None
    assert data["me"]["id"] == "web-1"
    assert data["attention"][0]["id"] == run_id
    assert data["attention"][0]["pct"] == 25
    assert data["attention"][0]["active"] is True
    often = next(j for j in data["jobs"] if j["name"] == "often")
    assert often["words"] == "every 5 minutes"
    assert often["chart_key"] == f"{run_id}:running"
    assert often["can_run"]
    assert often["can_backfill"]


async def test_static_assets_are_served(client: Client) -> None:
    page = parse(await (await client.get("/")).text())
    for url in page.xpath("//link[@rel='stylesheet']/@href | //script/@src"):
        response = await client.get(url)
        assert response.status == 200, url
        assert response.content_type in ("text/css", "text/javascript", "application/javascript")


async def test_the_page_says_when_redis_is_away(
    aiohttp_client: AiohttpClient, state: WebState
) -> None:
    away = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    try:
        broken = dataclasses.replace(state, redis=away, lease=Lease(away, prefix="x:"))
        client = await aiohttp_client(build_app(broken))
        response = await client.get("/")
        assert response.status == 200
        page = text(parse(await response.text()))
        assert "cannot read the lease from Redis" in page
        assert "cannot list the replicas" in page
        assert (await client.get("/replicas")).status == 503
    finally:
        await away.aclose()


# --- the replica registry ----------------------------------------------------------


def replica(name: str) -> replicas.Replica:
    return replicas.Replica(
        name, "all", "0.1.0", f"http://{name}:8080", "2026-01-01T00:00:00+00:00", ""
    )


async def test_entries_expire_after_their_ttl(redis: Redis, key_prefix: str) -> None:
    registry = replicas.Registry(redis, prefix=key_prefix, ttl=0.3, timeout=1)
    await registry.announce(replica("a"))
    await registry.announce(replica("b"))
    assert [r.id for r in await registry.list()] == ["a", "b"]
    assert 0 < await redis.pttl(f"{key_prefix}replica:a") <= 300
    await asyncio.sleep(0.2)
    await registry.announce(replica("b"))  # b refreshed, a not
    await asyncio.sleep(0.2)
    assert [r.id for r in await registry.list()] == ["b"]
    await asyncio.sleep(0.35)
    assert await registry.list() == []


async def test_a_prefix_lists_only_its_own_replicas(redis: Redis, key_prefix: str) -> None:
    odd = replicas.Registry(redis, prefix=f"{key_prefix}a*[b]?:", ttl=5, timeout=1)
    other = replicas.Registry(redis, prefix=f"{key_prefix}ax[b]y:", ttl=5, timeout=1)
    await odd.announce(replica("mine"))
    await other.announce(replica("theirs"))
    await redis.set(f"{key_prefix}a*[b]?:replica:junk", b"not json", px=5000)
    assert [r.id for r in await odd.list()] == ["mine"]
    assert [r.id for r in await other.list()] == ["theirs"]


async def test_the_loop_refreshes_and_withdraws(redis: Redis, key_prefix: str) -> None:
    registry = replicas.Registry(redis, prefix=key_prefix, ttl=0.6, timeout=1)
    stop = asyncio.Event()
    task = asyncio.create_task(replicas.keep_registered(registry, replica("me"), stop, every=0.2))
    first = await eventually(registry.list)
    await asyncio.sleep(1.0)  # longer than the TTL: only refreshes keep it
    [again] = await registry.list()
    assert again.last_seen >= first[0].last_seen
    assert again.last_seen
    stop.set()
    await asyncio.wait_for(task, 2)
    assert await registry.list() == []


async def test_get_replicas(client: Client, state: WebState, redis: Redis) -> None:
    await state.lease.acquire(holder="web-1", ttl=10)
    stop = asyncio.Event()
    task = asyncio.create_task(
        replicas.run(redis, state.settings, address="http://127.0.0.1:1", stop=stop)
    )
    try:
        body = await eventually(lambda: _listed(client))
        [me] = body["replicas"]
        assert (me["id"], me["role"], me["address"]) == ("web-1", "all", "http://127.0.0.1:1")
        assert me["leader"] is True
        assert me["self"] is True
        assert me["started"] <= me["last_seen"]
        ttl = await redis.pttl(f"{state.settings.key_prefix}replica:web-1")
        assert 2000 < ttl <= 3 * 2000  # a few lease TTLs
    finally:
        stop.set()
        await task
    assert (await _replicas(client)) == {"replicas": []}


async def _replicas(client: Client) -> Any:
    response = await client.get("/replicas")
    assert response.status == 200
    return await response.json()


async def _listed(client: Client) -> Any:
    body = await _replicas(client)
    return body if body["replicas"] else None


# --- the schedule in words ---------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "words"),
    [
        ("* * * * *", "every minute"),
        ("*/5 * * * *", "every 5 minutes"),
        ("0 3 * * *", "every day at 03:00"),
        ("30 6 * * 1-5", "at 06:30 on Mon-Fri"),
        ("0 */2 * * *", "every 2 hours at :00"),
        ("15,45 * * * *", "every hour at :15, :45"),
        ("0 0 1 * *", "at 00:00 on day 1 of the month"),
        ("0 0 1 1,7 *", "at 00:00 on day 1 in Jan, Jul"),
        ("0 9-17 * * mon-fri", "every hour at :00, 09:00-17:59 on Mon-Fri"),
        ("30 * * * * *", "every minute at second 30"),
        ("*/10 * * * * *", "every 10 seconds"),
        ("0 0 L * *", None),
        ("*/7 1-5/2 * * *", None),
        (None, None),
    ],
)
def test_cron_words(expr: str | None, words: str | None) -> None:
    assert cron_words(expr) == words
