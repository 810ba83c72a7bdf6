"""Parsing operations as seed 001's parsing server shows them.

An operation is a run of a `parse.*` job kind, queued by `POST /parsing/create`; its
resumes (after a crash or a hand-off) continue the same operation. This module maps
the seed's operation types to job kinds and our run rows to the seed's JSON shape.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import orjson


@dataclass(frozen=True)
class Bad:
    """An event the source could not read: its id (or "?") and why."""

    external_id: str
    reason: str


class EventSource(Protocol):
    """A parser: the site's events matching `meta`, normalised, in a stable order."""

    @property
    def expected(self) -> int | None:
        """How many events the source expects to yield, once known (for progress)."""
        ...

    def events(self) -> AsyncGenerator[dict[str, Any] | Bad, None]:
        """Each event as a JSON object (see docs/parsing.md), or `Bad` for one it
        could not read."""
        ...


MAX_WARNINGS = 20  # warnings a run's stats keep; the log has every one


def keep_warning(stats: MutableMapping[str, Any], warning: str) -> None:
    """Keep `warning` in the run's stats (once, and only the first MAX_WARNINGS)."""
    warnings = stats.setdefault("warnings", [])
    if warning not in warnings and len(warnings) < MAX_WARNINGS:
        warnings.append(warning)


# The seed's `type` values, and the job kind that does each.
TYPES: dict[str, str] = {
    "parsingEventsFromFienta": "parse.fienta",
    "parsingEventsFromEventim": "parse.eventim",
    "parsingEventsFromKontramarka": "parse.kontramarka",
}

# How long after an abandoned run the reaper still queues its resume (runs.queue_resumes).
RESUME_WINDOW = timedelta(days=1)

# Our run status -> the seed's operation status.
_STATUS = {
    "queued": "pending",
    "running": "processing",
    "succeeded": "success",
}


def seed_status(chain: Sequence[Mapping[str, Any]]) -> str:
    """The operation's status from the runs of its chain, oldest first.

    A run abandoned by a crash or a hand-off whose resume is queued or running is
    still `processing` (the newest run decides); an operation whose last run ended in
    any other way than success is `error`.
    """
    newest = chain[-1]
    if newest["status"] == "queued" and len(chain) > 1:
        return "processing"  # a resume waiting for the leader
    if newest["status"] == "abandoned" and newest.get("given_up_at") is None:
        finished = newest.get("finished_at")
        if isinstance(finished, datetime) and datetime.now(UTC) - finished < RESUME_WINDOW:
            return "processing"  # handed off or crashed: the reaper queues its resume
    return _STATUS.get(newest["status"], "error")


def _iso(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else None


def operation_view(chain: Sequence[Mapping[str, Any]], *, type_name: str) -> dict[str, Any]:
    """The seed's `operation` object for an operation whose runs are `chain` (oldest
    first): `_id`, `type`, `status`, `statistics` (a JSON string, as the seed has it),
    `errorText`, `infoText` (the progress), `createdAt`, `finish_time`, `is_processed`."""
    first, newest = chain[0], chain[-1]
    status = seed_status(chain)
    progress = newest.get("progress") or {}
    return {
        "_id": str(first["id"]),
        "type": type_name,
        "status": status,
        "statistics": orjson.dumps(newest.get("stats") or {}).decode(),
        "errorText": (newest.get("error") or "") if status == "error" else "",
        "infoText": progress.get("message") or "",
        "createdAt": _iso(first.get("created_at")),
        "finish_time": _iso(newest.get("finished_at")) if status in ("success", "error") else None,
        "is_processed": first.get("processed_at") is not None,
    }
