"""Webhooks on run completion: signed, delivered from an outbox, never lost.

The outbox rows are written by a trigger on `runs` and `job_state` (migration 0013) in
the very transaction that ends the run or pauses the job: a crash can neither lose a
delivery nor make one for a run that did not end. The leader delivers them here, in the
background, at least once: a row is claimed (its next attempt pushed past the request's
timeout), posted, and its outcome recorded, each under the fence. A leader that dies
between the POST and the record leaves the row to its successor, which posts it again
with the same event id: receivers deduplicate on `X-Webhook-Id`.

Each request is signed like Stripe's and GitHub's: `X-Webhook-Signature: sha256=<hex>`
is the HMAC-SHA256, keyed with `WORKER_WEBHOOK_SECRET`, of `"<timestamp>." + body`, with
the timestamp in `X-Webhook-Timestamp`; `verify()` is the receiver's side, refusing a
forged body and a replay older than its tolerance.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import time
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp
import orjson

from . import db, metrics
from .db import Connection, Pool
from .errors import Fenced
from .logs import redact

log = logging.getLogger(__name__)

ID_HEADER = "X-Webhook-Id"
EVENT_HEADER = "X-Webhook-Event"
TIMESTAMP_HEADER = "X-Webhook-Timestamp"
SIGNATURE_HEADER = "X-Webhook-Signature"
EVENTS = ("run.succeeded", "run.failed", "run.cancelled", "run.missed", "job.paused")

POLL_EVERY = 1.0
MAX_BACKOFF = 3600.0
MAX_ANSWER = 300  # characters of a receiver's answer kept with the attempt


class BadSignature(ValueError):
    """A webhook request that does not prove it came from us, now."""


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: float = 300.0,
    now: float | None = None,
) -> None:
    """The receiver's check: raises `BadSignature` unless the body is ours and fresh."""
    stamp = headers.get(TIMESTAMP_HEADER, "")
    given = headers.get(SIGNATURE_HEADER, "")
    if not stamp.isdigit() or not given:
        raise BadSignature(f"missing {TIMESTAMP_HEADER} or {SIGNATURE_HEADER}")
    if not hmac.compare_digest(given.encode(), sign(secret, int(stamp), body).encode()):
        raise BadSignature("signature does not match the body")
    age = (time.time() if now is None else now) - int(stamp)
    if abs(age) > tolerance:
        raise BadSignature(f"timestamp is {age:.0f}s off (a replay?); tolerance {tolerance:g}s")


async def sync_targets(conn: Connection, targets: Iterable[tuple[str, str]]) -> None:
    """Make `webhook_targets` the leader's (job or '*', url) pairs."""
    pairs = sorted(set(targets))
    await conn.execute("DELETE FROM webhook_targets")
    if pairs:
        await conn.executemany("INSERT INTO webhook_targets (job, url) VALUES ($1, $2)", pairs)


_VIEW = (
    "id, event_id, event, job, run_id, url, state, attempts, next_attempt_at, last_status,"
    " last_error, history, created_at, delivered_at"
)


def public(row: Mapping[str, Any]) -> dict[str, Any]:
    """A delivery as the API shows it (the URL's secrets redacted)."""
    view = db.jsonable(dict(row))
    view["event_id"] = str(row["event_id"])
    view["url"] = redact(row["url"], name="url")
    if view["state"] != "pending":
        view["next_attempt_at"] = None
    return view


async def for_run(pool: Pool, run_id: int) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        f"SELECT {_VIEW} FROM webhook_outbox WHERE run_id = $1 ORDER BY id", run_id
    )
    return [public(r) for r in rows]


async def recent(
    pool: Pool, *, state: str | None = None, job: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        f"SELECT {_VIEW} FROM webhook_outbox WHERE ($1::text IS NULL OR state = $1)"
        " AND ($2::text IS NULL OR job = $2) ORDER BY id DESC LIMIT $3",
        state,
        job,
        limit,
    )
    return [public(r) for r in rows]


async def prune(conn: Connection, *, keep: float) -> int:
    """Delete delivered and given-up deliveries older than `keep` seconds."""
    done: str = await conn.execute(
        "DELETE FROM webhook_outbox WHERE state <> 'pending'"
        " AND created_at < now() - make_interval(secs => $1)",
        keep,
    )
    return int(done.split()[-1])


class Deliverer:
    """Delivers due outbox rows for one leadership term, a few at a time."""

    def __init__(
        self,
        *,
        pool: Pool,
        token: int,
        secret: str | None,
        timeout: float = 10.0,
        max_attempts: int = 10,
        backoff: float = 5.0,
        concurrency: int = 8,
    ) -> None:
        self.pool = pool
        self.token = token
        self.secret = secret
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.concurrency = concurrency
        self._done = asyncio.Event()

    async def run(self) -> None:
        """Deliver until cancelled (the term ended) or fenced."""
        inflight: set[asyncio.Task[None]] = set()
        timeout = aiohttp.ClientTimeout(total=self.timeout, connect=min(5.0, self.timeout))
        failures = 0
        async with aiohttp.ClientSession(timeout=timeout) as http:
            try:
                while True:
                    self._done.clear()
                    pause = POLL_EVERY
                    try:
                        room = self.concurrency - len(inflight)
                        for row in await self._claim(room) if room > 0 else []:
                            task = asyncio.create_task(
                                self._deliver(http, row), name=f"webhook-{row['id']}"
                            )
                            inflight.add(task)
                            task.add_done_callback(inflight.discard)
                        failures = 0
                    except Fenced:
                        log.warning("webhook delivery stops: a newer leader holds the fence")
                        return
                    except db.DB_ERRORS as exc:
                        failures += 1
                        pause = min(POLL_EVERY * 2**failures, 30.0)
                        log.warning("webhook outbox not read (%s); again in %.0fs", exc, pause)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(pause):
                            await self._done.wait()
            finally:
                for task in inflight:
                    task.cancel()
                await asyncio.gather(*inflight, return_exceptions=True)
                metrics.WEBHOOK_PENDING.set(0)

    async def _claim(self, room: int) -> list[dict[str, Any]]:
        """Take up to `room` due rows; each is ours until its request could have ended."""
        async with db.fenced(self.pool, self.token) as conn:
            rows = await conn.fetch(
                "UPDATE webhook_outbox SET next_attempt_at = now() + make_interval(secs => $2)"
                " WHERE id IN (SELECT id FROM webhook_outbox WHERE state = 'pending'"
                "   AND next_attempt_at <= now() ORDER BY next_attempt_at, id LIMIT $1"
                "   FOR UPDATE SKIP LOCKED)"
                " RETURNING id, event_id, event, job, url, payload, attempts",
                room,
                self.timeout + 5.0,
            )
            pending = await conn.fetchval(
                "SELECT count(*) FROM webhook_outbox WHERE state = 'pending'"
            )
        metrics.WEBHOOK_PENDING.set(pending)
        return sorted((dict(r) for r in rows), key=lambda r: int(r["id"]))

    async def _deliver(self, http: aiohttp.ClientSession, row: dict[str, Any]) -> None:
        body = orjson.dumps({"id": str(row["event_id"]), **row["payload"]})
        stamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "sync-worker-webhooks",
            ID_HEADER: str(row["event_id"]),
            EVENT_HEADER: row["event"],
            TIMESTAMP_HEADER: str(stamp),
        }
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, stamp, body)
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            async with http.post(
                row["url"], data=body, headers=headers, allow_redirects=False
            ) as resp:
                status = resp.status
                if not 200 <= status < 300:
                    answer = (await resp.text(errors="replace"))[:MAX_ANSWER]
                    error = f"HTTP {status}: {answer}".strip()
        except TimeoutError:
            error = f"no answer within {self.timeout:g}s"
        except aiohttp.ClientError as exc:
            error = f"{type(exc).__name__}: {exc}"
        ms = int((time.monotonic() - started) * 1000)
        try:
            await self._record(row, status=status, error=error, ms=ms)
        except (Fenced, *db.DB_ERRORS) as exc:
            # The row stays claimed until its lock runs out, then goes again: same id.
            log.warning("webhook %s outcome not recorded (%s)", row["event_id"], exc)
        finally:
            self._done.set()

    async def _record(
        self, row: dict[str, Any], *, status: int | None, error: str | None, ms: int
    ) -> None:
        ok = error is None
        attempts = int(row["attempts"]) + 1
        given_up = not ok and attempts >= self.max_attempts
        delay = min(self.backoff * 2 ** (attempts - 1), MAX_BACKOFF) * random.uniform(0.8, 1.2)
        async with db.fenced(self.pool, self.token) as conn:
            await conn.execute(
                "UPDATE webhook_outbox SET attempts = $2, last_status = $3, last_error = $4,"
                " state = $5, delivered_at = CASE WHEN $5 = 'delivered' THEN now() END,"
                " next_attempt_at = now() + make_interval(secs => $6),"
                " history = history || jsonb_build_array(jsonb_build_object("
                "   'at', now(), 'status', $3::int, 'error', $4::text, 'ms', $7::int))"
                " WHERE id = $1 AND state = 'pending'",
                row["id"],
                attempts,
                status,
                error,
                "delivered" if ok else "failed" if given_up else "pending",
                delay,
                ms,
            )
        where = redact(row["url"], name="url")
        if ok:
            metrics.WEBHOOK_DELIVERIES.labels("delivered").inc()
            log.info("webhook %s %s delivered to %s", row["event"], row["event_id"], where)
        elif given_up:
            metrics.WEBHOOK_DELIVERIES.labels("given_up").inc()
            log.error(
                "webhook %s %s to %s given up after %d attempts: %s",
                row["event"],
                row["event_id"],
                where,
                attempts,
                error,
            )
        else:
            metrics.WEBHOOK_DELIVERIES.labels("failed").inc()
            log.warning(
                "webhook %s %s to %s failed (attempt %d, next in %.0fs): %s",
                row["event"],
                row["event_id"],
                where,
                attempts,
                delay,
                error,
            )
