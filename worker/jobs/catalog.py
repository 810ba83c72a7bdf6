"""The generic catalogue sync: any connector's pages, upserted in fenced group commits.

A fetcher task pulls pages from the connector while the writer commits: each commit
takes *whatever pages have arrived* (up to a row budget) in one fenced transaction
that upserts the items, stores the cursor of the last page and updates progress and
heartbeat. Under a 3/s limit that is one page per commit, so a crash refetches at most
the page in flight; with the limit lifted pages pile up during a commit and go in
together, so the database sets the pace.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from typing import Any

from .. import catalog
from ..config import JobSpec
from ..connectors.base import Connector, Page
from ..context import RunContext
from ..errors import JobError

FAILED_SAMPLE = 20
MAX_ROWS_PER_COMMIT = 5000
QUEUE_PAGES = 64
_DONE = object()


class CatalogJob(ABC):
    """Base of the catalogue job kinds; subclasses build the connector."""

    resumable = True

    def check(self, spec: JobSpec) -> None:
        p = spec.params
        for key in ("max_pages",):
            if key in p and (not isinstance(p[key], int) or p[key] < 1):
                raise ValueError(f"'{key}' must be a whole number >= 1, got {p[key]!r}")
        if "mark_gone" in p and not isinstance(p["mark_gone"], bool):
            raise ValueError(f"'mark_gone' must be true or false, got {p['mark_gone']!r}")
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
        s = ctx.stats
        for key in ("pages", "items", "created", "updated", "unchanged", "failed"):
            s.setdefault(key, 0)
        s.setdefault("failed_sample", [])
        # Pages committed by the runs this one resumes count towards max_pages.
        self.pages_before: int = s["pages"]
        s.setdefault("warnings", [])
        self.capped = False

    async def run(self) -> dict[str, Any]:
        ctx = self.ctx
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=QUEUE_PAGES)
        fetcher = asyncio.create_task(self._fetch(queue), name=f"fetch-{ctx.run_id}")
        try:
            await self._write(queue)
            await fetcher  # surfaces a fetch error after the pages before it were kept
        finally:
            fetcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fetcher
        stats = ctx.stats
        if self.capped:
            raise JobError(
                f"stopped at max_pages={self.max_pages}: more pages remain; the"
                f" {stats['items']} items fetched are kept (raise max_pages to sync all)"
            )
        gone = 0
        if self.mark_gone and self.connector.complete:
            async with ctx.fenced() as conn:
                chain = await catalog.run_chain(conn, ctx.run_id)
                gone = await catalog.mark_gone(
                    conn,
                    source=self.connector.source,
                    account=self.connector.account,
                    run_ids=chain,
                )
                stats["gone"] = gone
                await ctx.progress(message=self._message(None, done=True), conn=conn)
        else:
            if self.mark_gone:
                stats["warnings"].append("pass incomplete: items not marked gone")
            await ctx.progress(message=self._message(None, done=True))
        return {k: stats[k] for k in ("pages", "items", "created", "updated", "unchanged")} | {
            "failed": stats["failed"],
            "gone": gone,
        }

    async def _fetch(self, queue: asyncio.Queue[Any]) -> None:
        fetched = self.pages_before
        try:
            # aclosing: stopping at max_pages cancels the connector's prefetch at once.
            async with contextlib.aclosing(self.connector.pages(self.ctx.cursor)) as pages:
                async for page in pages:
                    await queue.put(page)
                    fetched += 1
                    if (
                        self.max_pages is not None
                        and fetched >= self.max_pages
                        and page.cursor is not None
                    ):
                        self.capped = True
                        break
        finally:
            await queue.put(_DONE)

    async def _write(self, queue: asyncio.Queue[Any]) -> None:
        finished = False
        while not finished:
            group: list[Page] = []
            rows = 0
            entry = await queue.get()
            while True:
                if entry is _DONE:
                    finished = True
                    break
                group.append(entry)
                rows += len(entry.items)
                if rows >= MAX_ROWS_PER_COMMIT or queue.empty():
                    break
                entry = queue.get_nowait()
            if group:
                await self._commit(group)

    async def _commit(self, group: list[Page]) -> None:
        ctx, stats = self.ctx, self.ctx.stats
        items = [item for page in group for item in page.items]
        async with ctx.fenced() as conn:
            counts = await catalog.upsert(
                conn, source=self.connector.source, account=self.connector.account, items=items
            )
            if self.mark_gone:
                await catalog.record_seen(
                    conn, run_id=ctx.run_id, external_ids={i.external_id for i in items}
                )
            stats["pages"] += len(group)
            stats["items"] += len(items)
            stats["created"] += counts.created
            stats["updated"] += counts.updated
            stats["unchanged"] += counts.unchanged
            for page in group:
                stats["failed"] += len(page.failed)
                room = FAILED_SAMPLE - len(stats["failed_sample"])
                stats["failed_sample"].extend(
                    {"id": eid, "reason": why} for eid, why in page.failed[: max(room, 0)]
                )
                for warning in page.warnings:
                    if warning not in stats["warnings"]:
                        stats["warnings"].append(warning)
                        ctx.log.warning(warning)
            last = group[-1]
            await ctx.progress(
                done=stats["items"],
                total=last.total,
                message=self._message(last),
                cursor=last.cursor,
                conn=conn,
            )

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
        return text
