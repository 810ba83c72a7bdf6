"""The catalogue sync under hostile input and faults (issue 7, items 4, 5 and 6(a)).

A bad item is cleaned or isolated, never fatal to its batch or to later passes; a
commit that fails while the page queue is full ends the run at once; cancelling a run
always cancels it; a run interrupted after its last page was committed is resumed
without fetching anything again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import pytest
from pytest_aiohttp import AiohttpServer

from worker import catalog, db, runs
from worker.catalog import Item
from worker.config import JobSpec
from worker.connectors.base import Connector, Page
from worker.context import RunContext
from worker.db import Connection
from worker.jobs import catalog as catalog_job
from worker.jobs.marketplaces import EmagOffersJob
from worker.sandbox.state import with_nul
from worker.upstream import Upstream, open_upstream

from .helpers import eventually
from .test_catalog_sync import (
    QUICK,
    RUN_BOUND,
    TOKEN,
    emag_catalogue,
    emag_params,
    fields_of,
    final,
    job_spec,
    leading,
    products,
    start_marketplace,
    sync,
)

SMALL_QUEUE = 4  # pages: a queue this short fills within a few requests
STOP_BOUND = 10.0  # seconds a stopped run may take to end, slow machines included


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with open_upstream(retry=QUICK) as up:
        yield up


def stored_hash(raw: Mapping[str, Any]) -> bytes:
    """The content hash of a raw item, as the store computes it."""
    return hashlib.blake2b(orjson.dumps(raw, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()


# -- item 4: a bad item -----------------------------------------------------------


async def test_nul_characters_are_removed_and_every_pass_completes(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    market.sandbox.faults.nul_item_pages = {2}  # offer 11: NUL in its name and nested
    params = emag_params(market, monkeypatch, mark_gone=True, gone_after=1)
    offer = market.sandbox.catalog.emag_page("ro", "main", page=2, per_page=10)[0]
    hostile = with_nul(offer)
    assert "\x00" in hostile["name"]

    first = await sync(pool, upstream, EmagOffersJob(), params)

    assert first.error is None, first.error
    assert (first.stats["cleaned"], first.stats["failed"], first.stats["items"]) == (1, 0, 45)
    row = await pool.fetchrow(
        "SELECT name, raw, hash, xmin::text AS xmin FROM products WHERE external_id = '11'"
    )
    assert row["name"] == offer["name"]  # "Bos\x00ch …" stored as "Bosch …"
    assert row["raw"]["characteristics"] == [{"id": 1, "name": "colour", "value": "red"}]
    assert row["raw"] == catalog.strip_nul(hostile)
    assert bytes(row["hash"]) == stored_hash(row["raw"])  # the hash is of what is stored

    # The next pass gets the same item again: it is unchanged, and the pass ends.
    market.sandbox.catalog.remove_emag_offer("ro", "main", 45)
    second = await sync(pool, upstream, EmagOffersJob(), params)

    assert second.error is None, second.error
    assert (second.stats["unchanged"], second.stats["gone"]) == (44, 1)
    again = await pool.fetchval("SELECT xmin::text FROM products WHERE external_id = '11'")
    assert again == row["xmin"]  # not rewritten: the cleaned hash is stable


async def test_upsert_leaves_out_what_the_database_refuses_and_stores_the_rest(
    pool: db.Pool,
) -> None:
    await db.raise_fence(pool, token=TOKEN, holder="t")
    items = [
        Item(external_id=str(n), raw={"id": n}, name=f"item {n}", price=Decimal(n))
        for n in range(1, 11)
    ]
    # Values a connector's checks would stop, handed straight to the store.
    items[3].price = Decimal("1e12")  # numeric(14, 4) overflows
    items[6].stock = 2**40  # no int4
    items[8] = Item(external_id="9\x00", raw={"id\x00": {"deep": ["x\x00"]}}, name="n\x00ine")

    async with db.fenced(pool, TOKEN) as conn:
        counts = await catalog.upsert(conn, source="s", account="a", items=items)
        # The transaction is still usable: the refusals were rolled back to a savepoint.
        more = await catalog.upsert(
            conn, source="s", account="a", items=[Item(external_id="11", raw={})]
        )

    assert (counts.created, counts.updated, counts.unchanged) == (8, 0, 0)
    assert counts.cleaned == 1
    reasons = dict(counts.failed)
    assert set(reasons) == {"4", "7"}
    assert "NumericValueOutOfRangeError: numeric field overflow" in reasons["4"]
    assert "refused by the database" in reasons["4"]
    assert "int32" in reasons["7"]
    assert more.created == 1
    rows = {r["external_id"]: r for r in await pool.fetch("SELECT * FROM products")}
    assert set(rows) == {"1", "2", "3", "5", "6", "8", "9", "10", "11"}
    assert (rows["9"]["name"], rows["9"]["raw"]) == ("nine", {"id": {"deep": ["x"]}})
    assert bytes(rows["9"]["hash"]) == stored_hash({"id": {"deep": ["x"]}})


async def test_upsert_records_every_listed_id_as_seen_refused_ones_too(pool: db.Pool) -> None:
    await db.raise_fence(pool, token=TOKEN, holder="t")
    items = [Item(external_id="ok", raw={}), Item(external_id="b\x00ad", raw={}, stock=2**40)]
    async with db.fenced(pool, TOKEN) as conn:
        counts = await catalog.upsert(conn, source="s", account="a", items=items, seen_by=7)
    assert [eid for eid, _ in counts.failed] == ["bad"]
    # Still listed upstream, so its earlier row (if any) must not be marked gone.
    seen = await pool.fetch("SELECT external_id FROM sync_seen WHERE run_id = 7 ORDER BY 1")
    assert [r["external_id"] for r in seen] == ["bad", "ok"]


class _OverpricedOffer:
    """The eMAG connector, with offer 12 priced past what `products.price` holds."""

    def __init__(self, inner: Connector) -> None:
        self.inner = inner
        self.source = inner.source
        self.account = inner.account

    @property
    def complete(self) -> bool:
        return self.inner.complete

    async def pages(self, cursor: Any) -> AsyncGenerator[Page, None]:
        async for page in self.inner.pages(cursor):
            for item in page.items:
                if item.external_id == "12":
                    item.price = Decimal("1e12")
            yield page


class OverpricingEmag(EmagOffersJob):
    def connector(self, ctx: RunContext) -> Connector:
        return _OverpricedOffer(super().connector(ctx))


async def test_item_the_database_refuses_is_counted_and_sampled_and_the_run_succeeds(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    params = emag_params(market, monkeypatch, mark_gone=True, gone_after=1)

    out = await sync(pool, upstream, OverpricingEmag(), params)

    assert out.error is None, out.error
    assert out.row["status"] == "succeeded"
    assert out.stats["failed"] == out.result["failed"] == 1
    [sample] = out.stats["failed_sample"]
    assert sample["id"] == "12"
    assert "refused by the database: NumericValueOutOfRangeError" in sample["reason"]
    assert (out.stats["items"], out.stats["created"], out.stats["gone"]) == (44, 44, 0)
    expected = emag_catalogue(market)
    del expected["12"]
    assert fields_of(await products(pool, "emag", "main")) == expected


# -- item 5: a failed commit, a cancelled run ----------------------------------------


@asynccontextmanager
async def products_locked(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """Another session holds a lock that makes every write to `products` wait."""
    conn = await asyncpg.connect(database_url)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("LOCK TABLE products IN SHARE ROW EXCLUSIVE MODE")
        yield conn
        await tx.rollback()
    finally:
        await conn.close()


async def writes_waiting(pool: db.Pool) -> int:
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'products'::regclass"
        )
    )


async def test_commit_timing_out_while_the_queue_is_full_ends_the_run_promptly(
    aiohttp_server: AiohttpServer,
    database_url: str,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(catalog_job, "QUEUE_PAGES", SMALL_QUEUE)
    market = await start_marketplace(aiohttp_server, emag_items=300)  # 30 pages, no limit
    spec = job_spec(EmagOffersJob(), emag_params(market, monkeypatch))
    # Every statement of this pool is bounded at 2 s (client side, and server side).
    async with (
        db.open_pool(database_url, timeout=2.0) as pool,
        leading(pool, upstream, {spec.kind: EmagOffersJob()}, [spec]),
        products_locked(database_url),
    ):
        started = asyncio.get_running_loop().time()
        run_id = await runs.enqueue(
            pool, job=spec.name, kind=spec.kind, params=spec.params, requested_by="t"
        )
        row = await final(pool, run_id, timeout=30.0)
        took = asyncio.get_running_loop().time() - started
        pages_when_it_ended = len(market.pages_read())

    # The fetcher had filled the queue behind the commit and stopped: it was waiting to
    # put one more page (it fetches all 30 in well under the 2 s the commit waited).
    assert SMALL_QUEUE + 2 <= pages_when_it_ended < 30
    assert row["status"] in ("failed", "abandoned")  # ended, not left hanging
    assert "timed out" in row["error"] or "statement timeout" in row["error"], row["error"]
    assert took < 20.0


async def fetcher_stopped(pages_read: Callable[[], list[int]]) -> None:
    """Wait until pages stop arriving: the fetcher waits to put a page in a full queue."""
    last, quiet_since = -1, 0.0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STOP_BOUND
    while loop.time() < deadline:
        served = len(pages_read())
        if served != last:
            last, quiet_since = served, loop.time()
        elif served >= SMALL_QUEUE + 2 and loop.time() - quiet_since > 0.3:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the fetcher kept fetching ({last} pages)")


def direct_context(pool: db.Pool, upstream: Upstream, spec: JobSpec) -> RunContext:
    """What the executor hands a run, for tests that hold the run's task themselves
    (there is no run row: these tests look at the task, not at the ledger)."""
    return RunContext(
        run_id=0,
        job=spec,
        token=TOKEN,
        trigger="manual",
        slot=None,
        params=spec.params,
        pool=pool,
        upstream=upstream,
        worker_id="test",
    )


async def test_cancelling_a_run_whose_page_queue_is_full_cancels_it(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    database_url: str,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(catalog_job, "QUEUE_PAGES", SMALL_QUEUE)
    market = await start_marketplace(aiohttp_server, emag_items=300)
    job = EmagOffersJob()
    spec = job_spec(job, emag_params(market, monkeypatch))
    await db.raise_fence(pool, token=TOKEN, holder="t")
    async with products_locked(database_url):
        task = asyncio.create_task(job.run(direct_context(pool, upstream, spec)))
        try:
            # The writer waits for the lock; the fetcher has filled the queue behind it.
            await eventually(lambda: writes_waiting(pool), timeout=STOP_BOUND)
            await fetcher_stopped(market.pages_read)
            task.cancel()
            await asyncio.wait([task], timeout=STOP_BOUND)
            assert task.done(), "the cancelled run did not end"
            assert task.cancelled()
        finally:
            await _stop(task)


@dataclass
class _SlowToClose:
    """A connector that serves one page, then waits on upstream; closing it takes a while."""

    source: str = "fake"
    account: str = "a"
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def complete(self) -> bool:
        return False

    async def pages(self, cursor: Any) -> AsyncGenerator[Page, None]:
        try:
            yield Page(items=[Item(external_id="1", raw={})], cursor={"page": 2}, label="page 1")
            await asyncio.Event().wait()  # page 2 never comes
        finally:
            self.closing.set()
            await self.closed.wait()


class SlowToCloseJob(EmagOffersJob):
    def __init__(self, connector: _SlowToClose) -> None:
        self.fake = connector

    def connector(self, ctx: RunContext) -> Connector:
        return self.fake


async def test_run_cancelled_while_its_fetcher_closes_the_connector_is_cancelled(
    pool: db.Pool, upstream: Upstream
) -> None:
    fake = _SlowToClose()
    job = SlowToCloseJob(fake)
    spec = JobSpec(name="sync", kind="emag.offers", schedule=None, params={"account": "a"})
    await db.raise_fence(pool, token=TOKEN + 1, holder="newer")  # the first commit fails
    task = asyncio.create_task(job.run(direct_context(pool, upstream, spec)))
    try:
        # The commit was fenced; the run is stopping its fetcher, which is closing.
        await asyncio.wait_for(fake.closing.wait(), STOP_BOUND)
        task.cancel()
        await asyncio.wait([task], timeout=STOP_BOUND)
        assert task.done(), "the cancelled run did not end"
        assert task.cancelled(), f"the run's cancellation was swallowed: {task.exception()!r}"
    finally:
        fake.closed.set()
        await _stop(task)


async def _stop(task: asyncio.Task[Any]) -> None:
    """End a test's run task whatever state it was left in."""
    for _ in range(3):
        if task.done():
            break
        task.cancel()
        await asyncio.wait([task], timeout=STOP_BOUND)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: the test has already said what was wrong


# -- item 6(a): a finished pass is recorded as finished ------------------------------


@dataclass
class _FreezingContext(RunContext):
    """A run whose leader freezes for good once the pass's last page is committed."""

    frozen: asyncio.Event = field(default_factory=asyncio.Event)

    def fenced(self) -> Any:
        if isinstance(self.cursor, Mapping) and self.cursor.get("finished") is True:
            self.frozen.set()
            return _never()
        return super().fenced()


@asynccontextmanager
async def _never() -> AsyncIterator[Connection]:
    await asyncio.get_running_loop().create_future()
    raise AssertionError("unreachable")
    yield


class FreezingEmag(EmagOffersJob):
    """The eMAG job kind, run by a leader that freezes after the last page's commit."""

    def __init__(self) -> None:
        self.frozen = asyncio.Event()

    async def run(self, ctx: RunContext) -> dict[str, Any]:
        values = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(RunContext)}
        return await super().run(_FreezingContext(**values, frozen=self.frozen))


async def test_resume_after_the_last_page_was_committed_fetches_nothing(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    # max_pages is exactly the catalogue's 5 pages: a resume that fetched again would
    # fail at once, its pages counted on top of the 5 already committed.
    params = emag_params(market, monkeypatch, mark_gone=True, max_pages=5, gone_after=1)
    assert (await sync(pool, upstream, EmagOffersJob(), params)).error is None
    market.sandbox.catalog.remove_emag_offer("ro", "main", 45)
    spec = job_spec(EmagOffersJob(), params)
    freezing = FreezingEmag()
    run_id = await runs.enqueue(pool, job=spec.name, kind=spec.kind, params=spec.params)

    async def frozen_or_ended() -> bool:
        row = await runs.get(pool, run_id)
        return freezing.frozen.is_set() or (row is not None and row["status"] in runs.FINAL)

    async with leading(pool, upstream, {spec.kind: freezing}, [spec]):
        await eventually(frozen_or_ended, timeout=RUN_BOUND)
    # That leader is gone: its run was abandoned after its last page was committed.
    cut = await runs.get(pool, run_id)
    assert cut is not None
    assert (cut["status"], cut["cursor"]) == ("abandoned", {"finished": True, "complete": True})
    assert (cut["stats"]["pages"], cut["stats"]["items"]) == (5, 44)
    assert "gone" not in cut["stats"]
    requests_before = len(market.requests)

    async with leading(pool, upstream, {spec.kind: EmagOffersJob()}, [spec]):
        resume_id = await eventually(
            lambda: pool.fetchval("SELECT id FROM runs WHERE resumed_from = $1", run_id)
        )
        resume = await final(pool, resume_id)

    assert resume["status"] == "succeeded", resume["error"]
    assert market.requests[requests_before:] == []  # not a page, not even the count
    stats = resume["stats"]
    assert (stats["pages"], stats["items"], stats["unchanged"], stats["created"]) == (5, 44, 44, 0)
    assert resume["result"] == {
        "pages": 5,
        "items": 44,
        "created": 0,
        "updated": 0,
        "unchanged": 44,
        "failed": 0,
        "gone": 1,
    }
    assert resume["cursor"] == {"finished": True, "complete": True, "gone": 1}
    rows = await products(pool, "emag", "main")
    assert [eid for eid, row in rows.items() if row["gone_at"]] == ["45"]
