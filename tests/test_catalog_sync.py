"""The catalogue store and the generic sync job, against real Postgres and the sandbox.

Every run here is queued as `worker trigger` queues it (`runs.enqueue`) and run by a
real leader term (`Leader.run`), which starts it, records its end and resumes it; the
store tests call `catalog` directly. The helpers at the top (a sandbox on a local
port, a leader term, one run of a job, the products table as a dict) are shared with
test_emag.py, test_ebay.py and test_catalog_faults.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer
from redis.asyncio import Redis

from worker import catalog, db, runs
from worker.catalog import Item
from worker.config import JobSpec, Settings
from worker.context import JobKind, RunContext
from worker.jobs.marketplaces import EbayCatalogJob, EmagOffersJob
from worker.lease import Grant, Lease
from worker.sandbox import REQUESTS, SANDBOX, RequestRecord, Sandbox, SandboxConfig, build_app
from worker.sandbox.state import Clock
from worker.scheduler import Leader
from worker.upstream import RetryPolicy, Upstream, open_upstream

from .conftest import dsn_for
from .helpers import eventually, settings_with_jobs

QUICK = RetryPolicy(attempts=3, base=0.01)
TOKEN = 1  # the fence token the store tests write under
EMAG_USER_ENV = "TEST_EMAG_USER"
EMAG_PASSWORD_ENV = "TEST_EMAG_PASSWORD"
EBAY_ID_ENV = "TEST_EBAY_CLIENT_ID"
EBAY_SECRET_ENV = "TEST_EBAY_CLIENT_SECRET"
KIND_NAMES = {EmagOffersJob: "emag.offers", EbayCatalogJob: "ebay.catalog"}
RUN_BOUND = 60.0  # seconds any one run of these tests may take, slow machines included


# -- shared helpers -------------------------------------------------------------


@dataclass
class Marketplace:
    """A sandbox marketplace served on a local port."""

    app: web.Application
    server: TestServer

    @property
    def sandbox(self) -> Sandbox:
        return self.app[SANDBOX]

    @property
    def requests(self) -> list[RequestRecord]:
        return self.app[REQUESTS]

    @property
    def emag_url(self) -> str:
        return str(self.server.make_url("/emag/ro/api-3"))

    @property
    def ebay_url(self) -> str:
        return str(self.server.make_url("/")).rstrip("/")

    def statuses(self, api: str) -> list[int]:
        return [r.status for r in self.requests if r.api == api]

    def pages_read(self, status: int = 200) -> list[int]:
        """eMAG pages (or eBay pages) answered with `status`, in arrival order."""
        return [
            r.page
            for r in self.requests
            if r.page is not None and r.status == status and r.api in ("emag", "ebay")
        ]


async def start_marketplace(
    aiohttp_server: AiohttpServer, *, clock: Clock | None = None, **config: Any
) -> Marketplace:
    """A sandbox with small catalogues and no rate limit unless the test asks for them."""
    settings = SandboxConfig(**{"emag_items": 45, "ebay_items": 60, "rate": 0, **config})
    app = build_app(settings) if clock is None else build_app(settings, clock=clock)
    return Marketplace(app, await aiohttp_server(app))


def emag_params(
    market: Marketplace, monkeypatch: pytest.MonkeyPatch, **extra: Any
) -> dict[str, Any]:
    monkeypatch.setenv(EMAG_USER_ENV, "main@example.com")
    monkeypatch.setenv(EMAG_PASSWORD_ENV, "main-secret")
    return {
        "account": "main",
        "base_url": market.emag_url,
        "username_env": EMAG_USER_ENV,
        "password_env": EMAG_PASSWORD_ENV,
        "items_per_page": 10,
        "rate_limit": 0,
        **extra,
    }


def ebay_params(
    market: Marketplace, monkeypatch: pytest.MonkeyPatch, **extra: Any
) -> dict[str, Any]:
    monkeypatch.setenv(EBAY_ID_ENV, "sandbox-client")
    monkeypatch.setenv(EBAY_SECRET_ENV, "sandbox-secret")
    return {
        "account": "parts",
        "base_url": market.ebay_url,
        "client_id_env": EBAY_ID_ENV,
        "client_secret_env": EBAY_SECRET_ENV,
        "sellers": ["acme-parts", "best-brakes"],
        "queries": ["brake"],
        "limit": 20,
        "rate_limit": 0,
        **extra,
    }


@dataclass
class Outcome:
    """One finished run: its result and error as the leader recorded them, and its row."""

    run_id: int
    result: Any
    error: str | None
    row: dict[str, Any]

    @property
    def stats(self) -> dict[str, Any]:
        return dict(self.row["stats"])

    @property
    def cursor(self) -> Any:
        return self.row["cursor"]


def kind_of(job: JobKind) -> str:
    """The registered name of a catalogue job kind (subclasses included)."""
    return next(name for cls, name in KIND_NAMES.items() if isinstance(job, cls))


def job_spec(job: JobKind, params: Mapping[str, Any], *, name: str = "sync") -> JobSpec:
    """A manual-only job of `job`'s kind, checked as loading the jobs file checks it."""
    spec = JobSpec(name=name, kind=kind_of(job), schedule=None, params=dict(params))
    job.check(spec)
    return spec


@contextlib.asynccontextmanager
async def leading(
    pool: db.Pool,
    upstream: Upstream,
    kinds: Mapping[str, JobKind],
    jobs: Sequence[JobSpec],
    **settings: Any,
) -> AsyncIterator[Leader]:
    """A real leader term over the test's database for the block, with the next token
    above the fence (as the elector would grant it); ended as the elector ends it."""
    token = int(await pool.fetchval("SELECT token FROM fence")) + 1
    database = await pool.fetchval("SELECT current_database()")
    config = Settings(
        jobs=tuple(jobs),
        database_url=dsn_for(database),
        worker_id=f"leader-{token}",
        **settings,
    )
    leader = Leader(settings=config, pool=pool, upstream=upstream, kinds=kinds)
    grant = Grant(holder=config.worker_id, token=token, since="", address="", raw=b"")
    task = asyncio.create_task(leader.run(grant), name=f"leader-{token}")
    try:
        yield leader
    finally:
        task.cancel("test over")
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def final(pool: db.Pool, run_id: int, timeout: float = RUN_BOUND) -> dict[str, Any]:
    """The run's row once it has a final status."""

    async def ended() -> dict[str, Any] | None:
        row = await runs.get(pool, run_id)
        return row if row is not None and row["status"] in runs.FINAL else None

    row: dict[str, Any] = await eventually(ended, timeout=timeout)
    return row


async def sync(
    pool: db.Pool,
    upstream: Upstream,
    job: JobKind,
    params: Mapping[str, Any],
    *,
    name: str = "sync",
    resume: Outcome | None = None,
) -> Outcome:
    """One run of a catalogue job: queued, then started and ended by a real leader term.

    With `resume`, the run is queued as the reaper queues a resume of that run: its
    cursor, its stats and attempt + 1.
    """
    spec = job_spec(job, params, name=name)
    if resume is None:
        run_id = await runs.enqueue(
            pool, job=name, kind=spec.kind, params=spec.params, requested_by="test"
        )
    else:
        run_id = await runs.enqueue(
            pool,
            job=name,
            kind=spec.kind,
            params=spec.params,
            trigger="resume",
            requested_by="test",
            resumed_from=resume.run_id,
            cursor=resume.cursor,
            attempt=resume.row["attempt"] + 1,
        )
        await pool.execute("UPDATE runs SET stats = $2 WHERE id = $1", run_id, resume.stats)
    async with leading(pool, upstream, {spec.kind: job}, [spec]):
        row = await final(pool, run_id)
    return Outcome(run_id, row["result"], row["error"], row)


async def products(pool: db.Pool, source: str, account: str) -> dict[str, dict[str, Any]]:
    """The products of one (source, account) by external id, with each row's xmin."""
    rows = await pool.fetch(
        "SELECT external_id, name, price, currency, stock, ean, sku, gone_at,"
        " xmin::text::bigint AS xmin FROM products WHERE source = $1 AND account = $2",
        source,
        account,
    )
    return {r["external_id"]: dict(r) for r in rows}


FIELDS = ("name", "price", "currency", "stock", "ean", "sku")


def fields_of(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[Any, ...]]:
    return {eid: tuple(row[f] for f in FIELDS) for eid, row in rows.items()}


def emag_expected(offers: Iterable[Mapping[str, Any]]) -> dict[str, tuple[Any, ...]]:
    """What the products rows of these sandbox offers must hold (FIELDS order)."""
    return {
        str(o["id"]): (
            o["name"],
            Decimal(str(o["sale_price"])),
            o["currency"],
            o["general_stock"],
            o["ean"][0] if o["ean"] else None,
            o["part_number"],
        )
        for o in offers
    }


def emag_catalogue(market: Marketplace, account: str = "main") -> dict[str, tuple[Any, ...]]:
    return emag_expected(market.sandbox.catalog.emag_offers("ro", account))


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with open_upstream(retry=QUICK) as up:
        yield up


# -- the store --------------------------------------------------------------------


def _items(prices: Mapping[str, str]) -> list[Item]:
    return [
        Item(external_id=eid, raw={"id": eid, "price": p}, name=f"item {eid}", price=Decimal(p))
        for eid, p in prices.items()
    ]


async def test_upsert_counts_and_rewrites_only_changed_rows(pool: db.Pool) -> None:
    await db.raise_fence(pool, token=TOKEN, holder="t")
    async with db.fenced(pool, TOKEN) as conn:
        first = await catalog.upsert(
            conn, source="s", account="a", items=_items({"1": "1.5", "2": "2.5", "3": "3.5"})
        )
    assert (first.created, first.updated, first.unchanged) == (3, 0, 0)
    before = await products(pool, "s", "a")
    await pool.execute("UPDATE products SET gone_at = now() WHERE external_id = '3'")

    batch = _items({"1": "1.5", "2": "9.25", "3": "3.5", "4": "4.0"})
    batch.insert(0, _items({"2": "0.01"})[0])  # an earlier copy in the same batch: the last wins
    async with db.fenced(pool, TOKEN) as conn:
        second = await catalog.upsert(conn, source="s", account="a", items=batch)

    # 2 changed, 3 came back (gone_at cleared), 4 is new, 1 is left alone.
    assert (second.created, second.updated, second.unchanged) == (1, 2, 1)
    after = await products(pool, "s", "a")
    assert after["1"]["xmin"] == before["1"]["xmin"]
    assert after["2"]["price"] == Decimal("9.25")
    assert after["2"]["xmin"] != before["2"]["xmin"]
    assert after["3"]["gone_at"] is None
    assert after["4"]["name"] == "item 4"


async def test_mark_gone_covers_the_whole_run_chain(pool: db.Pool) -> None:
    await db.raise_fence(pool, token=TOKEN, holder="t")
    first = await pool.fetchval(
        "INSERT INTO runs (job, kind, trigger, status) VALUES ('j', 'k', 'manual', 'abandoned')"
        " RETURNING id"
    )
    second = await pool.fetchval(
        "INSERT INTO runs (job, kind, trigger, status, resumed_from)"
        " VALUES ('j', 'k', 'resume', 'running', $1) RETURNING id",
        first,
    )
    for account, batch in (("a", {"1": "1", "2": "2"}), ("b", {"9": "9"})):
        async with db.fenced(pool, TOKEN) as conn:
            await catalog.upsert(conn, source="s", account=account, items=_items(batch))
    async with db.fenced(pool, TOKEN) as conn:
        await catalog.record_seen(conn, run_id=first, external_ids=["1"])
        await catalog.record_seen(conn, run_id=second, external_ids=["3"])
        chain = await catalog.run_chain(conn, second)
        gone = (await catalog.mark_gone(conn, source="s", account="a", run_ids=chain)).gone
    assert chain == [second, first]
    assert gone == 1
    rows = await pool.fetch(
        "SELECT account, external_id, gone_at IS NOT NULL AS gone FROM products"
    )
    assert {(r["account"], r["external_id"]): r["gone"] for r in rows} == {
        ("a", "1"): False,
        ("a", "2"): True,
        ("b", "9"): False,  # another account's rows are never touched
    }
    assert await pool.fetchval("SELECT count(*) FROM sync_seen") == 0


async def test_two_upserts_in_one_transaction_merge_only_their_own_batch(pool: db.Pool) -> None:
    await db.raise_fence(pool, token=TOKEN, holder="t")
    async with db.fenced(pool, TOKEN) as conn:
        await catalog.upsert(conn, source="s", account="a", items=_items({"1": "1"}))
        counts = await catalog.upsert(conn, source="s", account="b", items=_items({"9": "9"}))
    assert (counts.created, counts.updated, counts.unchanged) == (1, 0, 0)
    rows = await pool.fetch("SELECT account, external_id FROM products ORDER BY 1, 2")
    assert [tuple(r) for r in rows] == [("a", "1"), ("b", "9")]


def test_prices_parse_from_strings_and_numbers() -> None:
    assert catalog.to_decimal("123.4500") == Decimal("123.45")
    assert catalog.to_decimal(12.5) == Decimal("12.5")
    assert catalog.to_decimal(7) == Decimal(7)
    assert catalog.to_decimal("") is None
    with pytest.raises(ValueError, match="not a number"):
        catalog.to_decimal("abc")


# -- the generic sync job ---------------------------------------------------------


async def test_full_sync_lands_exactly_the_catalogue(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    offers = list(market.sandbox.catalog.emag_offers("ro", "main"))
    # The sandbox mixes "123.4500"-style strings and numbers, as eMAG does.
    assert any(isinstance(o["sale_price"], str) for o in offers)
    assert any(isinstance(o["sale_price"], float) for o in offers)

    out = await sync(pool, upstream, EmagOffersJob(), emag_params(market, monkeypatch))

    assert out.error is None
    assert out.row["status"] == "succeeded"
    assert fields_of(await products(pool, "emag", "main")) == emag_expected(offers)
    assert out.result == {
        "pages": 5,
        "items": 45,
        "created": 45,
        "updated": 0,
        "unchanged": 0,
        "failed": 0,
        "gone": 0,
    }
    # Not an empty cursor (which would read as "not started"): the pass is finished.
    assert out.cursor == {"finished": True, "complete": True}
    assert out.row["progress"]["done"] == 45
    assert out.row["progress"]["total"] == 45


async def test_second_sync_without_changes_writes_nothing(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    params = emag_params(market, monkeypatch, mark_gone=True, gone_after=1)
    job = EmagOffersJob()
    assert (await sync(pool, upstream, job, params)).error is None
    before = await products(pool, "emag", "main")

    again = await sync(pool, upstream, job, params)

    assert again.error is None
    assert await products(pool, "emag", "main") == before  # same xmin: no row rewritten
    stats = again.stats
    assert (stats["created"], stats["updated"], stats["unchanged"]) == (0, 0, 45)
    assert (stats["items"], stats["gone"], stats["failed"]) == (45, 0, 0)


async def test_changed_price_updates_that_row_only(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    params = emag_params(market, monkeypatch)
    job = EmagOffersJob()
    assert (await sync(pool, upstream, job, params)).error is None
    before = await products(pool, "emag", "main")
    market.sandbox.catalog.set_emag_price("ro", "main", 5, "99.0000")
    market.sandbox.catalog.set_emag_price("ro", "main", 17, 12.3)

    again = await sync(pool, upstream, job, params)

    assert again.error is None
    assert (again.stats["updated"], again.stats["unchanged"], again.stats["created"]) == (2, 43, 0)
    after = await products(pool, "emag", "main")
    assert after["5"]["price"] == Decimal("99")
    assert after["17"]["price"] == Decimal("12.3")
    changed = {eid for eid in after if after[eid]["xmin"] != before[eid]["xmin"]}
    assert changed == {"5", "17"}
    assert fields_of(after) == emag_catalogue(market)


async def test_removed_items_gone_only_with_mark_gone_and_cleared_when_back(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    job = EmagOffersJob()
    keep = emag_params(market, monkeypatch, mark_gone=False)
    prune = emag_params(market, monkeypatch, mark_gone=True, gone_after=1)
    assert (await sync(pool, upstream, job, prune)).error is None
    for offer_id in (7, 45):
        market.sandbox.catalog.remove_emag_offer("ro", "main", offer_id)

    without = await sync(pool, upstream, job, keep)
    assert without.error is None
    assert "gone" not in without.stats
    rows = await products(pool, "emag", "main")
    assert [eid for eid, row in rows.items() if row["gone_at"]] == []

    marked = await sync(pool, upstream, job, prune)
    assert marked.error is None
    assert marked.result["gone"] == marked.stats["gone"] == 2
    rows = await products(pool, "emag", "main")
    assert sorted(eid for eid, row in rows.items() if row["gone_at"]) == ["45", "7"]
    assert await pool.fetchval("SELECT count(*) FROM sync_seen") == 0

    # The same seed elsewhere still lists 7 and 45: they are back, no longer gone.
    fresh = await start_marketplace(aiohttp_server)
    back = await sync(
        pool, upstream, job, emag_params(fresh, monkeypatch, mark_gone=True, gone_after=1)
    )
    assert back.error is None
    assert (back.stats["updated"], back.stats["created"], back.stats["gone"]) == (2, 0, 0)
    rows = await products(pool, "emag", "main")
    assert [eid for eid, row in rows.items() if row["gone_at"]] == []
    assert fields_of(rows) == emag_catalogue(fresh)


async def test_malformed_item_is_counted_and_sampled_and_the_rest_lands(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    market.sandbox.faults.malformed_item_pages = {2}

    out = await sync(pool, upstream, EmagOffersJob(), emag_params(market, monkeypatch))

    assert out.error is None
    assert out.stats["failed"] == out.result["failed"] == 1
    assert out.stats["failed_sample"] == [{"id": "?", "reason": "offer has no id"}]
    expected = emag_catalogue(market)
    del expected["11"]  # the first offer of page 2 lost its id
    assert fields_of(await products(pool, "emag", "main")) == expected
    assert out.stats["items"] == 44


async def test_max_pages_cap_fails_the_run_and_keeps_what_was_written(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    params = emag_params(market, monkeypatch, max_pages=2, mark_gone=True, gone_after=1)

    out = await sync(pool, upstream, EmagOffersJob(), params)

    assert out.row["status"] == "failed"
    assert out.error is not None
    assert "max_pages=2" in out.error
    rows = await products(pool, "emag", "main")
    assert set(rows) == {str(i) for i in range(1, 21)}
    assert out.stats["pages"] == 2
    assert out.cursor == {"page": 3}
    assert all(row["gone_at"] is None for row in rows.values())


async def test_max_pages_counts_each_page_once_when_commits_keep_up(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Slow pages fetched one at a time: each page is committed before the next arrives.
    market = await start_marketplace(aiohttp_server)
    market.sandbox.faults.delay = 0.25
    params = emag_params(market, monkeypatch, max_pages=4, prefetch=1)

    out = await sync(pool, upstream, EmagOffersJob(), params)

    assert out.error is not None
    assert "max_pages=4" in out.error
    assert out.stats["pages"] == 4
    assert out.cursor == {"page": 5}


async def test_resume_from_cursor_fetches_no_page_twice(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    job = EmagOffersJob()
    params = emag_params(market, monkeypatch, mark_gone=True, gone_after=1)
    assert (await sync(pool, upstream, job, params)).error is None
    # Gone from the end of the listing (earlier pages keep their offers): the pass that
    # spans the two runs below must mark this one, and only this one, gone.
    market.sandbox.catalog.remove_emag_offer("ro", "main", 45)
    seen_before = len(market.requests)

    first = await sync(pool, upstream, job, {**params, "max_pages": 3})
    assert first.error is not None
    assert "max_pages" in first.error
    resume_page = first.cursor["page"]
    assert resume_page > 1
    second = await sync(pool, upstream, job, params, resume=first)

    assert second.error is None
    assert second.row["resumed_from"] == first.run_id
    assert second.row["attempt"] == 2
    read = [r.page for r in market.requests[seen_before:] if r.page is not None and r.status == 200]
    assert sorted(p for p in read if p < resume_page) == list(range(1, resume_page))
    assert set(read) == set(range(1, 6))
    assert second.stats["pages"] == 5  # carried over from the first run, plus its own
    rows = await products(pool, "emag", "main")
    assert [eid for eid, row in rows.items() if row["gone_at"]] == ["45"]
    assert second.stats["gone"] == 1
    del rows["45"]
    assert fields_of(rows) == emag_catalogue(market)


class StartRecordingEmag(EmagOffersJob):
    """The real eMAG job kind, remembering what each run was started with."""

    def __init__(self) -> None:
        self.started: list[tuple[Any, int, int | None, dict[str, Any]]] = []

    async def run(self, ctx: RunContext) -> dict[str, Any]:
        self.started.append((ctx.cursor, ctx.attempt, ctx.resumed_from, dict(ctx.stats)))
        return await super().run(ctx)


async def test_reaper_abandons_a_dead_leaders_run_and_queues_its_resume(
    aiohttp_server: AiohttpServer,
    tmp_path: Path,
    pool: db.Pool,
    database_url: str,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    params = emag_params(market, monkeypatch)
    lease = Lease(redis, prefix=key_prefix)
    old, _ = await lease.acquire(holder="old", ttl=30)
    assert old is not None
    await db.raise_fence(pool, token=old.token, holder="old")
    # The old leader stored pages 1-2 and died: its row is still `running`.
    stale = await pool.fetchval(
        "INSERT INTO runs (job, kind, trigger, status, token, params, cursor, stats, attempt,"
        " started_at, heartbeat_at) VALUES ('offers', 'emag.offers', 'schedule', 'running', $1,"
        " $2, $3, $4, 2, now() - interval '2 hours', now() - interval '1 hour') RETURNING id",
        old.token,
        params,
        {"page": 3},
        {"pages": 2, "items": 20},
    )
    await lease.release(old)
    new, _ = await lease.acquire(holder="new", ttl=30)
    assert new is not None
    assert new.token > old.token
    settings = settings_with_jobs(
        tmp_path, '[[jobs]]\nname = "offers"\nkind = "emag.offers"\n', worker_id="new"
    )
    settings = dataclasses.replace(settings, reap_after=1.0, database_url=database_url)
    job = StartRecordingEmag()
    leader = Leader(settings=settings, pool=pool, upstream=upstream, kinds={"emag.offers": job})
    task = asyncio.create_task(leader.run(new))
    try:

        async def resume_finished() -> dict[str, Any] | None:
            row = await pool.fetchrow("SELECT id, status FROM runs WHERE resumed_from = $1", stale)
            return await runs.get(pool, row["id"]) if row and row["status"] in runs.FINAL else None

        resume = await eventually(resume_finished, timeout=10)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    old_row = await runs.get(pool, stale)
    assert old_row is not None
    assert old_row["status"] == "abandoned"
    assert f"token {old.token}" in old_row["error"]
    assert (resume["trigger"], resume["requested_by"], resume["params"]) == (
        "resume",
        "reaper",
        params,
    )
    # Queued with the dead run's cursor, stats and attempt + 1, and run from there.
    assert job.started == [({"page": 3}, 3, stale, {"pages": 2, "items": 20})]
    assert resume["attempt"] == 3
    assert resume["status"] == "succeeded", resume["error"]
    assert resume["token"] == new.token
    assert sorted(market.pages_read()) == [3, 4, 5]
    assert resume["stats"]["pages"] == 5
    rows = await products(pool, "emag", "main")
    assert set(rows) == {str(i) for i in range(21, 46)}
