"""Secrets stay secret: header values come from the environment, and no API answer, CLI
output, log line or metric label shows a credential."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY
from pytest_aiohttp import AiohttpClient
from redis.asyncio import Redis

import worker.jobs
from worker import db, logs, runs
from worker.config import JobSpec, Settings, load_jobs
from worker.context import RunContext
from worker.errors import ConfigError, JobError
from worker.jobs.http import HttpJob
from worker.lease import Lease
from worker.logs import REDACTED, redact
from worker.upstream import RetryPolicy, Upstream, open_upstream
from worker.web.app import WebState, build_app

from .test_api import JOBS

Client = TestClient[Any, Any]

# Each secret is distinctive, so finding it anywhere in an output is a leak.
SECRETS = ("pw-s3cr3t", "tok-s3cr3t", "hdr-s3cr3t", "key-s3cr3t", "pass-s3cr3t")
LEAKY_PARAMS = {
    "url": "https://alice:pw-s3cr3t@example.com/poke?token=tok-s3cr3t&page=2",
    "headers": {"Authorization": "Bearer hdr-s3cr3t", "Accept": "application/json"},
    "headers_env": {"X-Api-Key": "RECEIVER_KEY"},
    "json": {"api_key": "key-s3cr3t", "db_password": "pass-s3cr3t", "batch": 7},
    "rate_limit": 2,
}
# A job whose webhook URL carries a password and a token: shown by /jobs and `worker jobs`.
HOOKED = """
[[jobs]]
name = "hooked"
kind = "http"
webhooks = ["https://alice:pw-s3cr3t@hooks.example/x?token=tok-s3cr3t"]
[jobs.params]
url = "http://127.0.0.1:1/x"
"""
LEAKY_ERROR = "GET https://alice:pw-s3cr3t@example.com/poke?token=tok-s3cr3t failed: HTTP 500"


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret} leaked in: {text[:2000]}"


# --- redact() ----------------------------------------------------------------------


def test_redact_hides_values_of_secret_looking_names() -> None:
    shown = redact(LEAKY_PARAMS)
    assert_no_secret(orjson.dumps(shown).decode())
    # Header names stay visible (which headers are sent), their values do not.
    assert shown["headers"] == {"Authorization": REDACTED, "Accept": REDACTED}
    assert shown["json"] == {"api_key": REDACTED, "db_password": REDACTED, "batch": 7}
    # *_env params name variables; the names are not secrets and help find the variable.
    assert shown["headers_env"] == {"X-Api-Key": "RECEIVER_KEY"}
    assert shown["rate_limit"] == 2
    assert shown["url"] == (f"https://{REDACTED}@example.com/poke?token={REDACTED}&page={REDACTED}")


@pytest.mark.parametrize(
    "name",
    ["token", "access_token", "client_secret", "password", "api_key", "Authorization", "headers"],
)
def test_redact_names(name: str) -> None:
    assert redact({name: "v"}) == {name: REDACTED}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("no url here", "no url here"),
        ("see https://h.example/x.", "see https://h.example/x."),
        (
            "(at http://u:p@h:81/a?b=c#d=e)",
            f"(at http://{REDACTED}@h:81/a?b={REDACTED}#d={REDACTED})",
        ),
        ("GET http://h/x?flag failed", f"GET http://h/x?{REDACTED} failed"),
        ("two: http://h/?a=1 http://h/?b=2", f"two: http://h/?a={REDACTED} http://h/?b={REDACTED}"),
    ],
)
def test_redact_urls_in_text(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(expected) == expected  # redacting twice changes nothing


# --- headers_env -------------------------------------------------------------------


class Receiver:
    """A local HTTP server standing in for the receiver; records each request's headers."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        self.status = 200

    async def handle(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        return web.Response(status=self.status, text="ok")


@pytest.fixture
async def receiver(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
) -> tuple[Receiver, str]:
    rec = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    server = await aiohttp_server(app)
    return rec, f"http://127.0.0.1:{server.port}"


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with open_upstream(retry=RetryPolicy(attempts=2, base=0.001, cap=0.01)) as up:
        yield up


def http_job(tmp_path: Path, params: str) -> JobSpec:
    path = tmp_path / "jobs.toml"
    path.write_text(f'[[jobs]]\nname = "poke"\nkind = "http"\n[jobs.params]\n{params}\n')
    [spec] = load_jobs(path, kinds=worker.jobs.checkers(worker.jobs.kinds()))
    return spec


def unchecked_job(url: str) -> JobSpec:
    """A spec the load checks never saw (they refuse credentials in the URL)."""
    return JobSpec(name="poke", kind="http", schedule=None, params={"url": url})


async def run_job(pool: db.Pool, upstream: Upstream, spec: JobSpec, *, fence: bool = True) -> Any:
    """Run `spec` once as leader 1; `fence=False` for the second run of a test."""
    if fence:
        await db.raise_fence(pool, token=1, holder="test")
    run_id = await runs.enqueue(pool, job=spec.name, kind=spec.kind, params=spec.params)
    ctx = RunContext(
        run_id=run_id,
        job=spec,
        token=1,
        trigger="manual",
        slot=None,
        params=spec.params,
        pool=pool,
        upstream=upstream,
        worker_id="test",
    )
    return await HttpJob().run(ctx)


async def test_headers_env_sends_the_value_from_the_environment(
    tmp_path: Path,
    pool: db.Pool,
    upstream: Upstream,
    receiver: tuple[Receiver, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec, base = receiver
    spec = http_job(
        tmp_path,
        f'url = "{base}/poke"\nheaders = {{Accept = "text/plain"}}\n'
        'headers_env = {Authorization = "RECEIVER_AUTH"}',
    )
    # Read when the run starts, not when the file is loaded: a rotated secret is picked up.
    monkeypatch.setenv("RECEIVER_AUTH", "Bearer hdr-s3cr3t")
    assert await run_job(pool, upstream, spec) == {"status": 200, "bytes": 2}
    [sent] = rec.headers
    assert sent["Authorization"] == "Bearer hdr-s3cr3t"
    assert sent["Accept"] == "text/plain"
    assert sent["X-Worker-Job"] == "poke"
    # The run row holds the variable's name, never its value.
    assert_no_secret(orjson.dumps(await pool.fetchval("SELECT params FROM runs")).decode())


async def test_a_missing_variable_fails_the_run_naming_it(
    tmp_path: Path,
    pool: db.Pool,
    upstream: Upstream,
    receiver: tuple[Receiver, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec, base = receiver
    spec = http_job(tmp_path, f'url = "{base}/poke"\nheaders_env = {{Authorization = "NOT_SET_X"}}')
    monkeypatch.delenv("NOT_SET_X", raising=False)
    with pytest.raises(JobError, match="NOT_SET_X") as caught:
        await run_job(pool, upstream, spec)
    assert "Authorization" in str(caught.value)
    assert rec.headers == []  # nothing was sent without the credential


@pytest.fixture
def auth_from_file(
    tmp_path: Path, receiver: tuple[Receiver, str], monkeypatch: pytest.MonkeyPatch
) -> tuple[Receiver, JobSpec]:
    """A job sending Authorization from RECEIVER_AUTH, left unset (RECEIVER_AUTH_FILE is
    for the test to set)."""
    rec, base = receiver
    spec = http_job(
        tmp_path, f'url = "{base}/poke"\nheaders_env = {{Authorization = "RECEIVER_AUTH"}}'
    )
    monkeypatch.delenv("RECEIVER_AUTH", raising=False)
    return rec, spec


async def test_headers_env_reads_the_file_when_the_variable_is_unset(
    tmp_path: Path,
    pool: db.Pool,
    upstream: Upstream,
    auth_from_file: tuple[Receiver, JobSpec],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec, spec = auth_from_file
    secret_file = tmp_path / "receiver-auth"
    secret_file.write_text("Bearer hdr-s3cr3t\n", encoding="utf-8")  # a mounted Secret
    monkeypatch.setenv("RECEIVER_AUTH_FILE", str(secret_file))
    assert await run_job(pool, upstream, spec) == {"status": 200, "bytes": 2}
    # Read when the run starts: a rotated file is picked up by the next run.
    secret_file.write_text("Bearer rotated\n", encoding="utf-8")
    await run_job(pool, upstream, spec, fence=False)
    assert [sent["Authorization"] for sent in rec.headers] == [
        "Bearer hdr-s3cr3t",
        "Bearer rotated",
    ]

    # The variable and its file both set: the run fails naming both, sending nothing.
    monkeypatch.setenv("RECEIVER_AUTH", "Bearer hdr-s3cr3t")
    with pytest.raises(JobError, match="RECEIVER_AUTH and RECEIVER_AUTH_FILE") as caught:
        await run_job(pool, upstream, spec, fence=False)
    assert "'poke'" in str(caught.value)
    assert_no_secret(str(caught.value))
    assert len(rec.headers) == 2


async def test_an_unreadable_credential_file_fails_the_run_naming_it(
    tmp_path: Path,
    pool: db.Pool,
    upstream: Upstream,
    auth_from_file: tuple[Receiver, JobSpec],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec, spec = auth_from_file
    monkeypatch.setenv("RECEIVER_AUTH_FILE", str(tmp_path))  # a directory
    with pytest.raises(JobError) as caught:
        await run_job(pool, upstream, spec)
    message = str(caught.value)
    assert message.startswith(f"RECEIVER_AUTH_FILE: cannot read {tmp_path}")
    assert "Authorization" in message
    assert rec.headers == []


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ('headers_env = {Authorization = "1BAD"}', "1BAD"),
        ('headers_env = {Authorization = "HAS SPACE"}', "HAS SPACE"),
        ('headers_env = {Authorization = ""}', "Authorization"),
        ("headers_env = {Authorization = 3}", "headers_env"),
        ('headers_env = ["RECEIVER_AUTH"]', "headers_env"),
        ('headers_env = {"Bad Name" = "RECEIVER_AUTH"}', "Bad Name"),
        (
            'headers = {Accept = "a"}\nheaders_env = {accept = "RECEIVER_ACCEPT"}',
            "accept",
        ),
        ('headers = {Authorization = "Bearer hdr-s3cr3t"}', "headers_env"),
        ('headers = {X-Api-Key = "key-s3cr3t"}', "headers_env"),
        ('headers = {Cookie = "session=pass-s3cr3t"}', "headers_env"),
    ],
)
def test_headers_and_headers_env_are_validated_at_load(
    tmp_path: Path, params: str, named: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        http_job(tmp_path, f'url = "http://127.0.0.1:1/x"\n{params}')
    message = str(caught.value)
    assert "'poke'" in message
    assert named in message
    assert_no_secret(message)


def test_credentials_in_the_url_are_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="headers_env") as caught:
        http_job(tmp_path, 'url = "http://alice:pw-s3cr3t@127.0.0.1:1/x"')
    assert_no_secret(str(caught.value))


async def test_credentials_in_the_url_reach_no_metric_label(
    pool: db.Pool, upstream: Upstream, receiver: tuple[Receiver, str]
) -> None:
    _, base = receiver
    with_userinfo = base.replace("http://", "http://alice:pw-s3cr3t@")
    await run_job(pool, upstream, unchecked_job(f"{with_userinfo}/poke"))
    labels = [
        f"{sample.name}{sample.labels}"
        for metric in REGISTRY.collect()
        for sample in metric.samples
    ]
    assert any(base.removeprefix("http://") in label for label in labels)
    assert_no_secret("\n".join(labels))


async def test_a_failing_request_names_the_url_without_its_secrets(
    tmp_path: Path, pool: db.Pool, upstream: Upstream, receiver: tuple[Receiver, str]
) -> None:
    rec, base = receiver
    rec.status = 403
    spec = http_job(tmp_path, f'url = "{base}/poke?token=tok-s3cr3t"')
    with pytest.raises(JobError) as caught:
        await run_job(pool, upstream, spec)
    assert f"{base}/poke?token={REDACTED}" in str(caught.value)
    assert_no_secret(str(caught.value))


# --- API, status page, CLI ------------------------------------------------------------


@pytest.fixture
async def leaky_run(pool: db.Pool) -> int:
    """A finished run whose params, error and progress carry every kind of secret."""
    run_id: int = await pool.fetchval(
        "INSERT INTO runs (job, kind, trigger, status, params, error, progress, started_at,"
        " finished_at) VALUES ('poke', 'http', 'manual', 'failed', $1, $2, $3, now(), now())"
        " RETURNING id",
        LEAKY_PARAMS,
        LEAKY_ERROR,
        {"message": "retrying https://example.com/poke?token=tok-s3cr3t"},
    )
    return run_id


@pytest.fixture
def jobs_file(tmp_path: Path) -> Path:
    path = tmp_path / "jobs.toml"
    path.write_text(JOBS + HOOKED, encoding="utf-8")
    return path


@pytest.fixture
async def client(
    aiohttp_client: AiohttpClient,
    jobs_file: Path,
    database_url: str,
    pool: db.Pool,
    redis: Redis,
    key_prefix: str,
) -> Client:
    settings = Settings(jobs=load_jobs(jobs_file), key_prefix=key_prefix, database_url=database_url)
    state = WebState(
        settings=settings, pool=pool, redis=redis, lease=Lease(redis, prefix=key_prefix)
    )
    return await aiohttp_client(build_app(state))


@pytest.mark.parametrize("path", ["/runs", "/runs/{id}", "/jobs", "/jobs/poke", "/"])
async def test_no_api_answer_shows_a_secret(client: Client, leaky_run: int, path: str) -> None:
    response = await client.get(path.format(id=leaky_run))
    assert response.status == 200
    text = await response.text()
    assert str(leaky_run) in text
    assert_no_secret(text)


async def test_the_api_still_shows_what_is_not_secret(client: Client, leaky_run: int) -> None:
    run = await (await client.get(f"/runs/{leaky_run}")).json()
    assert run["params"]["headers_env"] == {"X-Api-Key": "RECEIVER_KEY"}
    assert run["params"]["json"]["batch"] == 7
    assert run["params"]["url"].startswith(f"https://{REDACTED}@example.com/poke?token=")
    assert run["error"].endswith("failed: HTTP 500")
    assert run["token"] is None  # the fencing token column is not a secret, and not hidden


@pytest.mark.parametrize(
    "args",
    [["runs"], ["runs", "--json"], ["runs", "--id", "{id}"], ["jobs"], ["jobs", "--json"]],
)
def test_no_cli_output_shows_a_secret(
    database_url: str, jobs_file: Path, leaky_run: int, args: list[str]
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "worker", *(a.format(id=leaky_run) for a in args)],
        env={
            **os.environ,
            "DATABASE_URL": database_url,
            "WORKER_JOBS_FILE": str(jobs_file),
            "WORKER_WEBHOOK_SECRET": "a-long-random-string-the-receivers-know",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert str(leaky_run) in done.stdout
    assert_no_secret(done.stdout + done.stderr)


# --- logs ------------------------------------------------------------------------------


@pytest.fixture
def log_setup() -> Iterator[Callable[[str], None]]:
    """`logs.setup` for the test (it replaces the root handlers), undone afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    access = logging.getLogger("aiohttp.access").level

    def setup(fmt: str) -> None:
        logs.setup(fmt=fmt, level="DEBUG")

    yield setup
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(access)


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_no_log_line_shows_a_secret(
    fmt: str,
    log_setup: Callable[[str], None],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    pool: db.Pool,
    upstream: Upstream,
    receiver: tuple[Receiver, str],
) -> None:
    log_setup(fmt)
    rec, base = receiver
    rec.status = 503  # retried: the upstream client logs the URL of each retry
    spec = unchecked_job(base.replace("//", "//alice:pw-s3cr3t@") + "/x?token=tok-s3cr3t")
    log = logging.getLogger("worker.test")
    try:
        await run_job(pool, upstream, spec)
    except JobError:
        log.exception("run failed")  # as the scheduler logs a failed run
    log.warning("calling %s", LEAKY_PARAMS["url"], extra={"target": LEAKY_PARAMS["url"]})
    try:
        raise RuntimeError(LEAKY_ERROR)
    except RuntimeError:
        log.exception("unexpected")
    err = capsys.readouterr().err
    assert "retry" in err
    assert "example.com" in err
    assert_no_secret(err)
