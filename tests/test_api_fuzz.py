"""Property-based fuzzing of the whole HTTP API with schemathesis, against a live worker.

A real `worker run` (WORKER_ROLE=http: the API, no leader, so nothing runs and the seeded
rows stay as seeded) on a free port, over a copy of the test database with runs,
products, events, webhook deliveries and parsing operations in it, with both keys set
(WORKER_API_KEY, WORKER_READ_KEY) so every endpoint is exercised past its key.
Schemathesis reads worker/web/openapi.yaml (what each replica serves at /openapi.json,
reduced to its routes: tests/test_openapi.py) and, for every operation, sends its
examples, its coverage cases (each bound, each missing or wrong-typed field, each method
the path does not take) and MAX_EXAMPLES generated requests, valid and invalid. Half the
time a job, run or operation that exists stands in for a generated path value; dates at
the ends of Python's datetime and a header that is not UTF-8 are mixed in the same way.
Every answer must be: no 5xx; a status, content type and body the document gives for
that operation; an error in the JSON envelope; a refusal (4xx) of what the document
rules out, and an acceptance of what it allows (but where a rule the document cannot
say refuses it: SEMANTIC_400). Then the worker's log must hold no error.

Deterministic (a fixed seed, derandomized); the number of cases sent is printed at the
end, shown without -s. FUZZ_MAX_EXAMPLES=200 digs deeper (about 2 minutes).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import requests
import schemathesis
from hypothesis import strategies as st
from redis import Redis

from worker.web.openapi import document

from .conftest import REDIS_URL, _admin, dsn_for, free_port

API_KEY = "fuzz-key"
READ_KEY = "fuzz-read-key"
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "30"))
SEED = 20_261_122
JOBS = """
[[jobs]]
name = "poke"
kind = "http"
schedule = "*/5 * * * *"
timezone = "Europe/Bucharest"
pause_after_failures = 3
webhooks = ["http://127.0.0.1:1/hook?token=not-shown"]
[jobs.params]
url = "http://127.0.0.1:1/x"

[[jobs]]
name = "locked"
kind = "http"
schedule = "0 3 * * *"
manual = false
[jobs.params]
url = "http://127.0.0.1:1/x"

[[jobs]]
name = "adhoc"
kind = "http"
[jobs.params]
url = "http://127.0.0.1:1/x"

[[jobs]]
name = "fienta-events"
kind = "parse.fienta"
[jobs.params]
base_url = "http://127.0.0.1:1/api/v1"
timezone = "Europe/Tallinn"

[[jobs]]
name = "eventim-events"
kind = "parse.eventim"
[jobs.params]
base_url = "http://127.0.0.1:1/websearch/search/api/exploration"
web_ids = ["web__eventim-de"]

[[jobs]]
name = "kontramarka-events"
kind = "parse.kontramarka"
[jobs.params]
listing_url = "http://127.0.0.1:1/{city}/{language}/{category}?page={page}"

[[jobs]]
name = "sweep-parsing"
kind = "remote_parsing.sweep"
schedule = "0 2 * * 0"
manual = false
"""
JOB_NAMES = ["poke", "locked", "adhoc", "fienta-events", "sweep-parsing"]
STATIC = ["status.css", "common.js", "index.js", "run.js", "favicon.svg"]
# Answers that are not errors of the request, and so not the error envelope.
NOT_ENVELOPE = {("GET", "/healthz", 503), ("GET", "/readyz", 503), ("GET", "/ui/runs/{id}", 404)}
# Operations where a request the document allows may still be refused 400 for what a
# schema cannot say: a backfill range in the future or over `max` slots, a kind that
# runs only on its schedule, a `meta` the parser refuses, a NUL deep inside `meta`.
SEMANTIC_400 = ["/jobs/{name}/trigger", "/jobs/{name}/backfill", "/parsing/create"]


# --- a live worker over a seeded database ------------------------------------------


async def seed(dsn: str) -> dict[str, list[Any]]:
    """Runs of every kind of ending, products, events, webhook deliveries, parsing
    operations (one unread); returns the run and operation ids."""
    conn = await asyncpg.connect(dsn)
    try:
        run = (
            "INSERT INTO runs (job, kind, slot, trigger, status, params, progress, stats, result,"
            " error, token, started_at, finished_at, heartbeat_at, processed_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $12, $14)"
            " RETURNING id"
        )
        hour_ago = "now() - interval '1 hour'"
        rows: list[tuple[Any, ...]] = [
            ("poke", "http", "succeeded", {"items": 3}, {"ok": True}, None, True),
            ("poke", "http", "failed", {}, None, "boom at https://u:p@host/x?token=t", True),
            ("poke", "http", "running", {"items": 1}, None, None, False),
            ("poke", "http", "queued", {}, None, None, None),
            ("adhoc", "http", "cancelled", {}, None, None, True),
            ("locked", "http", "missed", {}, None, None, True),
            ("fienta-events", "parse.fienta", "succeeded", {"events": 2}, None, None, True),
            ("fienta-events", "parse.fienta", "succeeded", {"events": 1}, None, None, True),
            ("fienta-events", "parse.fienta", "queued", {}, None, None, None),
        ]
        ids: list[int] = []
        for job, kind, status, stats, result, error, ended in rows:
            started = None if ended is None else await conn.fetchval(f"SELECT {hour_ago}")
            finished = await conn.fetchval("SELECT now()") if ended else None
            slot = started if status == "missed" else None
            run_id = await conn.fetchval(
                run,
                job,
                kind,
                slot,
                "schedule" if slot else "manual",
                status,
                orjson.dumps({"url": "http://127.0.0.1:1/x", "headers": {"X-Key": "k"}}).decode(),
                orjson.dumps({"done": 1, "total": 3, "message": "page 1/3"}).decode(),
                orjson.dumps(stats).decode(),
                None if result is None else orjson.dumps(result).decode(),
                error,
                7,
                started,
                finished,
                None,
            )
            ids.append(run_id)
        operations = ids[6:9]
        await conn.execute("UPDATE runs SET processed_at = now() WHERE id = $1", operations[1])
        for op, count in ((operations[0], 2), (operations[1], 1)):
            await conn.executemany(
                "INSERT INTO run_items (operation_id, seq, batch, item) VALUES ($1, $2, 0, $3)",
                [
                    (op, i, orjson.dumps({"external_id": str(i), "title": "t"}).decode())
                    for i in range(count)
                ],
            )
        await conn.executemany(
            "INSERT INTO products (source, account, external_id, name, sku, ean, price, stock,"
            " raw, hash, gone_at) VALUES ('emag', 'main', $1, $2, $3, $4, $5, $6, '{}', '', $7)",
            [
                ("1", "100% cotton shirt", "SKU_1", "5940000000001", 19.99, 3, None),
                ("2", "brake pad", "SKU-2", None, None, None, None),
                ("3", "old item", "OLD", None, 1, 0, await conn.fetchval("SELECT now()")),
            ],
        )
        await conn.executemany(
            "INSERT INTO events (source, external_id, title, starts_at, city, venue, price_min,"
            " raw, hash) VALUES ('fienta', $1, $2, now() + $3 * interval '1 day', $4, 'Hall',"
            " 10.5, '{}', '')",
            [("e1", "Concert", 3, "Tallinn"), ("e2", "Play", 10, "Riga"), ("e3", "Old", -5, None)],
        )
        await conn.executemany(
            "INSERT INTO webhook_outbox (event, job, run_id, url, payload, state, attempts,"
            " last_status, last_error, history, delivered_at)"
            " VALUES ($1, 'poke', $2, 'http://127.0.0.1:1/hook?token=t', '{}', $3, $4, $5, $6,"
            " $7, CASE WHEN $3 = 'delivered' THEN now() END)",
            [
                ("run.succeeded", ids[0], "delivered", 1, 200, None, "[]"),
                ("run.failed", ids[1], "pending", 2, 500, "HTTP 500", '[{"at": "x", "ms": 3}]'),
                ("run.failed", ids[1], "failed", 8, None, "refused", "[]"),
            ],
        )
        await conn.execute(
            "INSERT INTO job_state (job, paused_at, paused_by, pause_note)"
            " VALUES ('locked', now(), 'seed', 'maintenance')"
        )
        return {"id": ids, "operationId": [str(op) for op in operations]}
    finally:
        await conn.close()


class Worker:
    """One `worker run` process serving the API on a free port."""

    def __init__(self, workdir: Path, database_url: str, key_prefix: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "worker.log"
        jobs = workdir / "jobs.toml"
        jobs.write_text(JOBS, encoding="utf-8")
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": REDIS_URL,
            "WORKER_KEY_PREFIX": key_prefix,
            "WORKER_ID": "fuzzed",
            "WORKER_ROLE": "http",
            "WORKER_HTTP_HOST": "127.0.0.1",
            "WORKER_HTTP_PORT": str(self.port),
            "WORKER_JOBS_FILE": str(jobs),
            "WORKER_API_KEY": API_KEY,
            "WORKER_READ_KEY": READ_KEY,
            "WORKER_WEBHOOK_SECRET": "fuzz-webhook-secret-of-some-length",
            "WORKER_LOG_FORMAT": "json",
            "WORKER_SHUTDOWN_GRACE": "2",
            "PARSING_SERVER_URL": "http://127.0.0.1:1",
            "PARSING_SERVER_API_KEY": "x",
        }
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker", "run"], env=env, stdout=out, stderr=out
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited:\n{self.log()[-3000:]}")
            try:
                if requests.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker is not ready:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Fuzzed:
    """What the run saw: cases and answers by operation, and the time it took."""

    def __init__(self) -> None:
        self.cases: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.started = self.last = time.monotonic()

    def saw(self, case: schemathesis.Case, status: int) -> None:
        self.cases[case.operation.label] += 1
        self.statuses[status] += 1
        self.last = time.monotonic()

    def summary(self) -> str:
        took = self.last - self.started
        answers = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        return (
            f"schemathesis: {sum(self.cases.values())} generated cases over"
            f" {len(self.cases)} operations in {took:.1f}s (seed {SEED}); answers {answers}"
        )


@pytest.fixture(scope="module")
def worker(template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    name = f"worker_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    key_prefix = f"test:{uuid.uuid4().hex[:12]}:"
    asyncio.run(_admin(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"'))
    live = None
    try:
        known = asyncio.run(seed(dsn_for(name)))
        KNOWN.update(known, name=JOB_NAMES, filename=STATIC)
        live = Worker(tmp_path_factory.mktemp("fuzz"), dsn_for(name), key_prefix)
        live.wait_ready()
        yield live
    finally:
        if live is not None:
            live.stop()
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        redis = Redis.from_url(REDIS_URL)
        try:
            keys = list(redis.scan_iter(match=f"{key_prefix}*"))
            if keys:
                redis.delete(*keys)
        finally:
            redis.close()


@pytest.fixture(scope="module")
def fuzzed(worker: Worker, request: pytest.FixtureRequest) -> Iterator[Fuzzed]:
    seen = Fuzzed()
    yield seen
    line = seen.summary()
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is not None and reporter is not None:
        with capture.global_and_fixture_disabled():  # shown without -s too
            reporter.write_line(line)
    else:
        print(line, file=sys.stderr)


@pytest.fixture(scope="module")
def http(worker: Worker) -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


CONFIG = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large"],
        "request-timeout": 10,
        "auth": {"openapi": {"apiKey": {"api_key": API_KEY}, "readKey": {"api_key": READ_KEY}}},
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        "phases": {"stateful": {"enabled": False}},
        # A 5xx is never an answer of the contract (the probes' 503 aside, below).
        "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "4xx"]}},
        "operations": [
            {
                "include-path": SEMANTIC_400,
                "checks": {
                    "positive_data_acceptance": {
                        "expected-statuses": ["2xx", "400", "401", "403", "404", "409"]
                    }
                },
            },
            {
                "include-path": ["/healthz", "/readyz"],
                "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "4xx", 503]}},
            },
        ],
    }
)
# The document as written (tests/test_openapi.py: what each replica serves is this,
# reduced to its routes); the live worker's address is given with each call.
schema = schemathesis.openapi.from_dict(document(), config=CONFIG)
# Filled by the `worker` fixture: path values that exist (job names, run ids, …).
KNOWN: dict[str, list[Any]] = {}


@schema.hook
def flatmap_path_parameters(
    context: schemathesis.HookContext, path_parameters: dict[str, Any]
) -> st.SearchStrategy[Any]:
    """Half the time a job, run or operation that exists, so the handlers get past 404."""
    params = path_parameters
    if not params or not all(k in KNOWN and _plausible(k, v) for k, v in params.items()):
        return st.just(params)
    real = st.fixed_dictionaries({k: st.sampled_from(KNOWN[k]) for k in params})
    return st.one_of(st.just(params), real)


# Values a generator seldom draws that the handlers must answer all the same: the ends
# of Python's datetime (where a step of a day, or a move to UTC, overflows), the widest
# offset; and a header that is not ASCII (requests sends it as Latin-1, not UTF-8).
EDGE_DATES = [
    "0001-01-01",
    "0001-01-01T00:00:00+05:00",
    "9999-12-31",
    "9999-12-31T23:59:59-05:00",
    "2026-02-28T23:59:59.999999+14:00",
]
ODD_HEADER = "Zoë Ünal"


def _with_edge_dates(value: Any) -> st.SearchStrategy[Any]:
    keys = [k for k in ("from", "to") if isinstance(value, dict) and k in value]
    if not keys:
        return st.just(value)
    edges = st.fixed_dictionaries({k: st.sampled_from(EDGE_DATES) for k in keys})
    return st.one_of(st.just(value), edges.map(lambda e: {**value, **e}))


@schema.hook
def flatmap_query(context: schemathesis.HookContext, query: Any) -> st.SearchStrategy[Any]:
    return _with_edge_dates(query)


@schema.hook
def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
    return _with_edge_dates(body)


@schema.hook
def flatmap_headers(context: schemathesis.HookContext, headers: Any) -> st.SearchStrategy[Any]:
    if context.operation is None or context.operation.path != "/jobs/{name}/pause":
        return st.just(headers)
    return st.one_of(st.just(headers), st.just({**(headers or {}), "X-Requested-By": ODD_HEADER}))


def _plausible(name: str, value: Any) -> bool:
    """Whether a generated path value is one the document allows (a negative one stays)."""
    if name == "id":
        return isinstance(value, int) and not isinstance(value, bool) and 1 <= value < 2**63
    return isinstance(value, str)


def error_envelope(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Every 4xx and 5xx is `{"error": {"code", "message"}}`, but for the answers that are
    no error of the request (NOT_ENVELOPE)."""
    status = response.status_code
    if status < 400 or (case.method.upper(), case.path, status) in NOT_ENVELOPE:
        return
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith("application/json"), f"{status} answered as {content_type}"
    body = orjson.loads(response.content)
    assert isinstance(body, dict), body
    assert set(body) == {"error"}, body
    assert isinstance(body["error"], dict), body
    assert set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["code"], str), body
    assert isinstance(body["error"]["message"], str), body
    assert body["error"]["message"], body


@schema.parametrize()
def test_every_answer_is_in_the_contract(
    case: schemathesis.Case, worker: Worker, http: requests.Session, fuzzed: Fuzzed
) -> None:
    response = case.call(base_url=worker.url, session=http)
    fuzzed.saw(case, response.status_code)
    case.validate_response(response, additional_checks=[error_envelope])


# --- what the fuzzing found, pinned ------------------------------------------------


def error_code(response: requests.Response) -> str:
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    code: str = body["error"]["code"]
    return code


def writes() -> dict[str, str]:
    return {"X-API-Key": API_KEY}


def test_a_method_not_allowed_names_the_allowed_ones(worker: Worker) -> None:
    response = requests.delete(f"{worker.url}/jobs", timeout=5)
    assert response.status_code == 405
    assert error_code(response) == "method_not_allowed"
    assert response.headers["Allow"] == "GET,HEAD"
    # Not a run id: the literal path beside /runs/{id} takes POST only.
    response = requests.get(f"{worker.url}/runs/cleanup-stuck", headers=writes(), timeout=5)
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"


def test_a_missing_static_file_is_the_json_404(worker: Worker) -> None:
    assert error_code(requests.get(f"{worker.url}/static/nope.css", timeout=5)) == "not_found"
    response = requests.get(f"{worker.url}/static/status.css", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/css")


@pytest.mark.parametrize("edge", EDGE_DATES)
def test_event_bounds_at_the_ends_of_time_are_answered(worker: Worker, edge: str) -> None:
    for name in ("from", "to"):
        response = requests.get(
            f"{worker.url}/events", params={name: edge}, headers=writes(), timeout=5
        )
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("edge", EDGE_DATES[:4])
def test_backfill_bounds_at_the_ends_of_time_are_refused(worker: Worker, edge: str) -> None:
    body = {"from": edge, "to": "2020-01-01"} if edge < "5" else {"from": "2020-01-01", "to": edge}
    response = requests.post(
        f"{worker.url}/jobs/poke/backfill", json=body, headers=writes(), timeout=5
    )
    assert response.status_code == 400, response.text
    assert error_code(response) in ("bad_from", "bad_to")
    assert "out of range" in response.json()["error"]["message"]


def test_a_requested_by_that_is_not_utf8_is_stored_replaced(worker: Worker) -> None:
    # requests sends a header as Latin-1: "ë" is the byte 0xEB, no UTF-8.
    response = requests.post(
        f"{worker.url}/jobs/adhoc/pause",
        headers={**writes(), "X-Requested-By": ODD_HEADER},
        timeout=5,
    )
    assert response.status_code == 200, response.text
    assert response.json()["paused_by"] == "Zo\ufffd \ufffdnal"
    requests.post(f"{worker.url}/jobs/adhoc/resume", headers=writes(), timeout=5)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b'{"note": "a", "note": "b"}', "bad_body"),
        (b'{"note": NaN}', "bad_body"),
        (b'{"note": 1e400}', "bad_body"),
        (b'{"note": "\\ud800"}', "bad_body"),
        (b"\xef\xbb\xbf{}", "bad_body"),
        (b'{"x": ' + b"[" * 64 + b"]" * 64 + b"}", "bad_body"),
        (b'{"notes": "a"}', "unknown_field"),
        (b"[]", "bad_body"),
    ],
)
def test_a_body_that_is_not_i_json_is_refused(worker: Worker, raw: bytes, code: str) -> None:
    response = requests.post(
        f"{worker.url}/jobs/poke/pause",
        data=raw,
        headers={**writes(), "Content-Type": "application/json"},
        timeout=5,
    )
    assert response.status_code == 400, response.text
    assert error_code(response) == code


def test_every_post_bounds_its_body_and_refuses_what_it_does_not_take(worker: Worker) -> None:
    for path in ("/jobs/poke/trigger", "/runs/1/cancel", "/admin/reload", "/jobs/poke/resume"):
        response = requests.post(f"{worker.url}{path}", json={"x": 1}, headers=writes(), timeout=5)
        assert (response.status_code, error_code(response)) == (400, "unknown_field"), path
        response = requests.post(f"{worker.url}{path}?x=1", headers=writes(), timeout=5)
        assert (response.status_code, error_code(response)) == (400, "unknown_parameter"), path
        big = b'{"x": "' + b"a" * 70_000 + b'"}'
        response = requests.post(f"{worker.url}{path}", data=big, headers=writes(), timeout=5)
        assert (response.status_code, error_code(response)) == (413, "body_too_large"), path


def test_reads_need_the_read_key_and_the_document_does_not(worker: Worker) -> None:
    assert error_code(requests.get(f"{worker.url}/jobs", timeout=5)) == "unauthorized"
    response = requests.get(f"{worker.url}/jobs", headers={"X-API-Key": READ_KEY}, timeout=5)
    assert response.status_code == 200
    [poke] = [j for j in response.json()["jobs"] if j["name"] == "poke"]
    assert poke["webhooks"] == ["http://127.0.0.1:1/hook?token=[redacted]"]
    response = requests.get(f"{worker.url}/openapi.json", timeout=5)
    assert response.status_code == 200
    assert response.json()["openapi"].startswith("3.1")


def test_the_worker_logged_no_error(worker: Worker, fuzzed: Fuzzed) -> None:
    """After everything above: no traceback, nothing at error level in the worker's log."""
    bad = []
    for line in worker.log().splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            bad.append(line)  # not a log line: a traceback printed by hand, a crash
            continue
        if entry.get("level") in ("error", "critical") or "exc" in entry:
            bad.append(line)
    assert not bad, "\n".join(bad[:20])
