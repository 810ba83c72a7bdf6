"""The generic catalogue sync: any connector's pages, upserted in fenced group commits.

A fetcher task pulls pages from the connector while the writer commits: each commit
takes *whatever pages have arrived* (up to a row budget) in one fenced transaction
that upserts the items, stores the cursor of the last page and updates progress and
heartbeat. Under a 3/s limit that is one page per commit, so a crash refetches at most
the page in flight; with the limit lifted pages pile up during a commit and go in
together, so the database sets the pace.

The last page commits with the cursor {"finished": true, "complete": …} rather than an
empty one (which would read as "not started"): a run interrupted after that commit is
resumed without fetching anything, and only ends the pass (marking gone, once).
An item the database refuses is counted as failed and sampled; the run goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from .. import catalog, metrics
from ..config import JobSpec
from ..connectors.base import Connector, DetailSource, Page
from ..context import RunContext
from ..errors import ItemGone, JobError, UpstreamError
from ..looplag import drop

FAILED_SAMPLE = 20
MAX_DETAIL_CALLS = 1000  # per run; eBay's default Browse quota is 5 000 calls a day
DETAIL_BATCH = 10  # details fetched side by side (the rate limiter paces them)
GONE_AFTER = 2  # complete passes an item must be missing from before it is marked gone
GONE_GUARD = 0.5  # a pass listing fewer than this share of the live items marks nothing
MAX_ROWS_PER_COMMIT = 5000
QUEUE_PAGES = 64
FETCHER_STOP = 5.0  # seconds a cancelled fetcher gets to close the connector
FETCHER_RECANCEL = 0.2  # cancelled again after this long, if a cancellation was lost
FINISHED = "finished"  # the key of the cursor that records a pass fetched to its end
_DONE = object()


class CatalogJob(ABC):
    """Base of the catalogue job kinds; subclasses build the connector."""

    resumable = True
    has_details = False  # the connector can fetch one item's details (`details = true`)

    def check(self, spec: JobSpec) -> None:
        p = spec.params
        for key in ("max_pages",):
            if key in p and (not isinstance(p[key], int) or p[key] < 1):
                raise ValueError(f"'{key}' must be a whole number >= 1, got {p[key]!r}")
        if "mark_gone" in p and not isinstance(p["mark_gone"], bool):
            raise ValueError(f"'mark_gone' must be true or false, got {p['mark_gone']!r}")
        after = p.get("gone_after", GONE_AFTER)
        if isinstance(after, bool) or not isinstance(after, int) or after < 1:
            raise ValueError(f"'gone_after' must be a whole number of passes >= 1, got {after!r}")
        if "details" in p and not isinstance(p["details"], bool):
            raise ValueError(f"'details' must be true or false, got {p['details']!r}")
        if p.get("details") and not self.has_details:
            raise ValueError(f"'details': {spec.kind} has no item details to fetch")
        calls = p.get("max_detail_calls", MAX_DETAIL_CALLS)
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
            raise ValueError(f"'max_detail_calls' must be a whole number >= 0, got {calls!r}")
        guard = p.get("gone_guard", GONE_GUARD)
        if isinstance(guard, bool) or not isinstance(guard, int | float) or not 0 <= guard <= 1:
            raise ValueError(f"'gone_guard' must be a share from 0 to 1, got {guard!r}")
        if not isinstance(p.get("account", ""), str):
            raise ValueError("'account' must be a string")
        self.check_connector(spec)

    @abstractmethod
    def check_connector(self, spec: JobSpec) -> None:
        """Validate the connector's own params (raise ValueError naming the param)."""

    @abstractmethod
    def connector(self, ctx: RunContext) -> Connector:
        """Build the connector for one run."""

    async def run(self, ctx: RunContext) -> dict[str, Any]:
        connector = self.connector(ctx)
        sync = _Sync(ctx, connector)
        return await sync.run()


class _Sync:
    def __init__(self, ctx: RunContext, connector: Connector) -> None:
        self.ctx = ctx
        self.connector = connector
        self.max_pages: int | None = ctx.params.get("max_pages")
        self.mark_gone = bool(ctx.params.get("mark_gone", False))
        self.gone_after = int(ctx.params.get("gone_after", GONE_AFTER))
        self.gone_guard = float(ctx.params.get("gone_guard", GONE_GUARD))
        self.details: DetailSource | None = None
        if ctx.params.get("details") and isinstance(connector, DetailSource):
            self.details = connector
            for key in ("details_fetched", "details_failed", "detail_calls"):
                ctx.stats.setdefault(key, 0)
        s = ctx.stats
        for key in ("pages", "items", "created", "updated", "unchanged", "failed", "cleaned"):
            s.setdefault(key, 0)
        s.setdefault("failed_sample", [])
        # Pages committed by the runs this one resumes count towards max_pages.
        self.pages_before: int = s["pages"]
        s.setdefault("warnings", [])
        self.capped = False

    async def run(self) -> dict[str, Any]:
        ctx, stats = self.ctx, self.ctx.stats
        end = finished(ctx.cursor)
        if end is None:
            await self._fetch_and_write()
            if self.capped:
                raise JobError(
                    f"stopped at max_pages={self.max_pages}: more pages remain; the"
                    f" {stats['items']} items fetched are kept (raise max_pages to sync all)"
                )
            end = finished(ctx.cursor) or _finished(complete=self.connector.complete)
        else:
            # Resumed after its last page was committed: nothing is fetched again, only
            # the end of the pass (which the interrupted run may or may not have done).
            ctx.log.info("pass already fetched to its end; finishing it")
        if self.details is not None:
            await self._fetch_details(self.details)
        gone = await self._end_pass(end)
        return {k: stats[k] for k in ("pages", "items", "created", "updated", "unchanged")} | {
            "failed": stats["failed"],
            "gone": gone,
        }

    async def _fetch_details(self, source: DetailSource) -> None:
        """Fetch the details of items created or changed (by this pass or an earlier one
        whose run ran out of `max_detail_calls`), up to what is left of the cap."""
        ctx, stats = self.ctx, self.ctx.stats
        cap = int(ctx.params.get("max_detail_calls", MAX_DETAIL_CALLS))
        where = {"source": self.connector.source, "account": self.connector.account}
        budget = max(cap - stats["detail_calls"], 0)
        async with ctx.fenced() as conn:
            ids, pending = await catalog.pending_details(conn, limit=budget, **where)
        for start in range(0, len(ids), DETAIL_BATCH):
            batch = ids[start : start + DETAIL_BATCH]
            answers = await asyncio.gather(
                *(source.details(eid) for eid in batch), return_exceptions=True
            )
            fetched: list[catalog.Details] = []
            ended: list[str] = []
            for eid, answer in zip(batch, answers, strict=True):
                if isinstance(answer, catalog.Details):
                    fetched.append(answer)
                elif isinstance(answer, UpstreamError):
                    stats["details_failed"] += 1
                    if isinstance(answer, ItemGone):
                        ended.append(eid)  # listed by the pass, ended since: nothing to fetch
                    room = max(FAILED_SAMPLE - len(stats["failed_sample"]), 0)
                    if room:
                        stats["failed_sample"].append({"id": eid, "reason": f"details: {answer}"})
                        ctx.log.warning("details of %s not fetched: %s", eid, answer)
                elif isinstance(answer, BaseException):
                    raise answer
            stats["detail_calls"] += len(batch)
            stats["details_fetched"] += len(fetched)
            async with ctx.fenced() as conn:
                await catalog.store_details(conn, details=fetched, **where)
                await catalog.drop_pending(conn, ids=ended, **where)
                await ctx.progress(
                    message=f"details {start + len(batch)}/{len(ids)}"
                    f" ({stats['details_failed']} failed, {pending - len(ids)} left for the"
                    " next pass)",
                    conn=conn,
                )
        stats["details_left"] = max(pending - stats["details_fetched"], 0)
        if stats["details_left"]:
            warning = (
                f"details: {stats['details_left']} items left for the next pass"
                f" (max_detail_calls = {cap})"
            )
            if warning not in stats["warnings"]:
                stats["warnings"].append(warning)

    async def _end_pass(self, end: dict[str, Any]) -> int:
        """Mark gone (once per pass) and record the final progress with the finished cursor."""
        ctx, stats = self.ctx, self.ctx.stats
        if not (self.mark_gone and end["complete"]):
            if self.mark_gone and "pass incomplete: items not marked gone" not in stats["warnings"]:
                stats["warnings"].append("pass incomplete: items not marked gone")
            await ctx.progress(message=self._message(None, done=True), cursor=end)
            return 0
        if "gone" in end:  # marked before the run was interrupted
            stats["gone"] = end["gone"]
            await ctx.progress(message=self._message(None, done=True), cursor=end)
            return int(end["gone"])
        async with ctx.fenced() as conn:
            chain = await catalog.run_chain(conn, ctx.run_id)
            check = await catalog.mark_gone(
                conn,
                source=self.connector.source,
                account=self.connector.account,
                run_ids=chain,
                gone_after=self.gone_after,
                guard=self.gone_guard,
            )
            gone = check.gone
            stats["gone"] = gone
            stats["gone_check"] = check.as_stats(gone_after=self.gone_after, guard=self.gone_guard)
            if check.guarded:
                warning = (
                    f"gone guard: this pass listed {check.seen} items, fewer than"
                    f" {self.gone_guard:.0%} of the {check.live_before} live before it;"
                    " nothing was counted missing or marked gone"
                )
                stats["warnings"].append(warning)
                ctx.log.warning(warning)
                metrics.GONE_GUARD_TRIPS.labels(ctx.job.name).inc()
            # In the same transaction: a resume never marks twice (the chain's seen ids
            # are gone by then, so a second marking would take every item).
            await ctx.progress(
                message=self._message(None, done=True), cursor={**end, "gone": gone}, conn=conn
            )
        return gone

    async def _fetch_and_write(self) -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=QUEUE_PAGES)
        fetcher = asyncio.create_task(self._fetch(queue), name=f"fetch-{self.ctx.run_id}")
        fetcher.add_done_callback(_retrieve)
        try:
            await self._write(queue)
            await fetcher  # surfaces a fetch error after the pages before it were kept
        finally:
            if not fetcher.done():
                # The writer failed (or the run was cancelled): stop the fetcher.
                await _stop(fetcher)
                if not fetcher.done():
                    self.ctx.log.warning("the fetcher did not stop within %gs", FETCHER_STOP)

    async def _fetch(self, queue: asyncio.Queue[Any]) -> None:
        fetched = self.pages_before
        try:
            # aclosing: stopping at max_pages cancels the connector's prefetch at once.
            async with contextlib.aclosing(self.connector.pages(self.ctx.cursor)) as pages:
                async for page in pages:
                    if isinstance(page.cursor, Mapping) and FINISHED in page.cursor:
                        raise JobError(
                            f"{self.connector.source} connector returned the cursor"
                            f" {page.cursor!r}, which is reserved for a finished pass"
                        )
                    await queue.put(page)
                    fetched += 1
                    if (
                        self.max_pages is not None
                        and fetched >= self.max_pages
                        and page.cursor is not None
                    ):
                        self.capped = True
                        break
        except asyncio.CancelledError:
            raise  # the run is ending: nobody reads the queue any more, so put nothing
        except Exception:
            await queue.put(_DONE)  # the writer keeps the pages before the failure
            raise
        await queue.put(_DONE)

    async def _write(self, queue: asyncio.Queue[Any]) -> None:
        done = False
        while not done:
            group: list[Page] = []
            rows = 0
            entry = await queue.get()
            while True:
                if entry is _DONE:
                    done = True
                    break
                group.append(entry)
                rows += len(entry.items)
                if entry.cursor is None:
                    # The last page: the fetcher's end follows at once, and with it the
                    # connector's verdict on the pass, committed with this page.
                    entry = await queue.get()
                    continue
                if rows >= MAX_ROWS_PER_COMMIT or queue.empty():
                    break
                entry = queue.get_nowait()
            if group:
                await self._commit(group, ended=done)

    async def _commit(self, group: list[Page], *, ended: bool) -> None:
        ctx, stats = self.ctx, self.ctx.stats
        items = [item for page in group for item in page.items]
        last = group[-1]
        cursor = last.cursor
        if ended and cursor is None:
            cursor = _finished(complete=self.connector.complete)
        try:
            async with ctx.fenced() as conn:
                counts = await catalog.upsert(
                    conn,
                    source=self.connector.source,
                    account=self.connector.account,
                    items=items,
                    seen_by=ctx.run_id if self.mark_gone else None,
                    want_details=self.details is not None,
                )
                stats["pages"] += len(group)
                stats["items"] += len(items) - len(counts.failed)
                stats["created"] += counts.created
                stats["updated"] += counts.updated
                stats["unchanged"] += counts.unchanged
                stats["cleaned"] += counts.cleaned
                for page in group:
                    self._failed(page.failed)
                    for warning in page.warnings:
                        if warning not in stats["warnings"]:
                            stats["warnings"].append(warning)
                            ctx.log.warning(warning)
                self._failed(counts.failed)
                await ctx.progress(
                    done=stats["items"],
                    total=last.total,
                    message=self._message(last),
                    cursor=cursor,
                    conn=conn,
                )
        except TimeoutError as exc:
            # asyncpg's timeout says nothing; name what was being written.
            raise TimeoutError(
                f"writing {len(items)} items ({last.label}) to the database timed out"
            ) from exc
        # The group's pages, items and raw JSON are freed in a thread, off the loop.
        await drop(items, group)

    def _failed(self, failed: list[tuple[str, str]]) -> None:
        """Count items that were not stored; keep (and log) the first few as a sample."""
        stats = self.ctx.stats
        stats["failed"] += len(failed)
        room = max(FAILED_SAMPLE - len(stats["failed_sample"]), 0)
        for eid, why in failed[:room]:
            stats["failed_sample"].append({"id": eid, "reason": why})
            self.ctx.log.warning("item %s not stored: %s", eid, why)

    def _message(self, page: Page | None, *, done: bool = False) -> str:
        s = self.ctx.stats
        items = f"{s['items']:,}".replace(",", " ")
        head = "done" if done else (page.label if page else "")
        text = (
            f"{head}, {items} items ({s['created']} new, {s['updated']} changed,"
            f" {s['unchanged']} unchanged, {s['failed']} failed)"
        )
        if done and "gone" in s:
            text += f", {s['gone']} gone"
        if done and "details_left" in s:
            text += f"; details of {s['details_fetched']} items fetched"
            text += f" ({s['details_left']} left for the next pass)" if s["details_left"] else ""
        return text


def finished(cursor: Any) -> dict[str, Any] | None:
    """The end-of-pass record if `cursor` is one (see `_finished`), else None."""
    if isinstance(cursor, Mapping) and cursor.get(FINISHED) is True:
        return dict(cursor)
    return None


def _finished(*, complete: bool) -> dict[str, Any]:
    """The cursor stored with a pass's last page: {"finished": true, "complete": …}.

    A NULL cursor means "not started"; this one means "every page is committed", so a
    resume only ends the pass. End-of-pass marking adds "gone": n. No connector cursor
    may be a JSON object with a "finished" key (the fetcher refuses one).
    """
    return {FINISHED: True, "complete": complete}


async def _stop(fetcher: asyncio.Task[None]) -> None:
    """Cancel the fetcher until it ends, for up to FETCHER_STOP seconds.

    Once is not always enough on Python 3.11: its `asyncio.wait_for` (redis-py's, under
    the rate limiter) returns a result that arrived together with the cancellation and
    drops the cancellation. The page read the fetcher awaited then completes, and the
    fetcher, whose cancellation went into that read, goes on paging: after a leader woke
    from a freeze it fetched the rest of the catalogue beside its successor's resume.
    `asyncio.wait` neither raises the fetcher's end nor swallows a cancellation of the run.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FETCHER_STOP
    while not fetcher.done() and loop.time() < deadline:
        fetcher.cancel()
        await asyncio.wait([fetcher], timeout=min(FETCHER_RECANCEL, deadline - loop.time()))


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark the fetcher's exception as seen: the run reports it, or the writer's error."""
    if not task.cancelled():
        task.exception()
