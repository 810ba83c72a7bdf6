"""Parsing operations (seed 001) read back from the run ledger: every SQL statement the
parsing API and `worker operations` need, in one place.

An operation is the first run of a `parse.*` job kind together with the resumes that
continued it (a chain linked by `resumed_from`); its id is the first run's id and its
events are the `run_items` saved under that id. `processed_at` on the first run is the
seed's `is_processed`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from .db import Pool
from .logs import redact
from .parsing import TYPES, operation_view, seed_status

FINISHED = ("success", "error")
SEED_STATUSES = ("pending", "processing", "success", "error")
_TYPE_OF_KIND = {kind: name for name, kind in reversed(TYPES.items())}
_SCAN_BATCH = 100

_CHAIN_COLUMNS = (
    "r.id, r.job, r.kind, r.trigger, r.status, r.progress, r.stats, r.error, r.attempt,"
    " r.handed_off, r.given_up_at, r.resumed_from, r.requested_by, r.created_at,"
    " r.started_at, r.finished_at, r.processed_at"
)

# Roots: the first run of each chain. A resume is never a root, even one whose first
# run was pruned (`resumed_from` then became NULL); a missed slot never ran at all.
# `$2` picks one operation, `$3` only unprocessed ones, `$4` is the keyset bound.
_SCAN = (
    "WITH RECURSIVE roots AS ("
    "  SELECT r.id, (SELECT count(*) FROM run_items i WHERE i.operation_id = r.id) AS events"
    "  FROM runs r WHERE r.kind = ANY($1::text[]) AND r.resumed_from IS NULL"
    "  AND r.trigger <> 'resume' AND r.status <> 'missed'"
    "  AND ($2::bigint IS NULL OR r.id = $2) AND (NOT $3::bool OR r.processed_at IS NULL)"
    "  AND ($4::bigint IS NULL OR r.id {cmp} $4) ORDER BY r.id {order} LIMIT $5"
    "), chain(operation_id, id, depth) AS ("
    "  SELECT id, id, 0 FROM roots"
    "  UNION ALL SELECT c.operation_id, r.id, c.depth + 1"
    "  FROM runs r JOIN chain c ON r.resumed_from = c.id"
    f") SELECT c.operation_id, o.events, {_CHAIN_COLUMNS}"
    " FROM chain c JOIN runs r ON r.id = c.id JOIN roots o ON o.id = c.operation_id"
    " ORDER BY c.operation_id {order}, c.depth"
)
_NEWEST_FIRST = _SCAN.format(cmp="<", order="DESC")
_OLDEST_FIRST = _SCAN.format(cmp=">", order="ASC")


@dataclass(frozen=True)
class Operation:
    """One parsing operation: its runs, oldest first, and how many events it saved."""

    id: int
    type_name: str
    chain: tuple[Mapping[str, Any], ...]
    total_events: int

    @property
    def status(self) -> str:
        """The seed's status: pending, processing, success or error."""
        return seed_status(self.chain)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def processed(self) -> bool:
        return self.chain[0]["processed_at"] is not None

    @property
    def deliverable(self) -> bool:
        """Finished, not yet processed, and worth processing: a success, or an error
        that kept some events (the seed: partial results must not be lost)."""
        return (
            self.finished
            and not self.processed
            and (self.status == "success" or self.total_events > 0)
        )

    def view(self) -> dict[str, Any]:
        """The seed's `operation` object."""
        return operation_view(self.chain, type_name=self.type_name)


def kinds() -> list[str]:
    """The job kinds whose runs are parsing operations."""
    return list(_TYPE_OF_KIND)


async def get(pool: Pool, operation_id: int) -> Operation | None:
    """The operation with this id; None if there is no such run, or the run is not
    the first run of a parsing operation (a resume, another kind of job)."""
    if not 0 < operation_id < 2**63:
        return None
    found = await _batch(pool, one=operation_id)
    return found[0] if found else None


async def unprocessed(pool: Pool, *, limit: int) -> list[Operation]:
    """Up to `limit` deliverable operations (see `Operation.deliverable`), oldest first."""
    out: list[Operation] = []
    async for op in _scan(pool, newest_first=False, only_unprocessed=True):
        if op.deliverable:
            out.append(op)
            if len(out) == limit:
                break
    return out


async def recent(pool: Pool, *, status: str | None = None, limit: int) -> list[Operation]:
    """Up to `limit` operations, newest first, only those in the seed's `status` if given."""
    out: list[Operation] = []
    async for op in _scan(pool, newest_first=True):
        if status is None or op.status == status:
            out.append(op)
            if len(out) == limit:
                break
    return out


async def mark_processed(pool: Pool, operation_id: int) -> bool:
    """Set `processed_at` once; True if this call set it."""
    done: str = await pool.execute(
        "UPDATE runs SET processed_at = now() WHERE id = $1 AND processed_at IS NULL",
        operation_id,
    )
    return done.split()[-1] != "0"


async def _scan(
    pool: Pool, *, newest_first: bool, only_unprocessed: bool = False
) -> AsyncIterator[Operation]:
    """Every operation in id order, read a batch of chains at a time: which ones a
    caller wants depends on the seed's status, computed from the chain in Python."""
    after: int | None = None
    while True:
        batch = await _batch(
            pool, after=after, newest_first=newest_first, only_unprocessed=only_unprocessed
        )
        for op in batch:
            yield op
        if len(batch) < _SCAN_BATCH:
            return
        after = batch[-1].id


async def _batch(
    pool: Pool,
    *,
    one: int | None = None,
    after: int | None = None,
    newest_first: bool = True,
    only_unprocessed: bool = False,
) -> list[Operation]:
    rows = await pool.fetch(
        _NEWEST_FIRST if newest_first else _OLDEST_FIRST,
        kinds(),
        one,
        only_unprocessed,
        after,
        _SCAN_BATCH,
    )
    chains: dict[int, list[dict[str, Any]]] = {}
    events: dict[int, int] = {}
    for row in rows:
        run = dict(row)
        operation_id = run.pop("operation_id")
        events[operation_id] = int(run.pop("events"))
        # What a run's error or progress message quotes (an upstream URL) is shown
        # the way every other API answer shows it.
        for key in ("error", "progress", "stats"):
            run[key] = redact(run[key])
        chains.setdefault(operation_id, []).append(run)
    return [
        Operation(
            id=operation_id,
            type_name=_TYPE_OF_KIND[chain[0]["kind"]],
            chain=tuple(chain),
            total_events=events[operation_id],
        )
        for operation_id, chain in chains.items()
    ]
