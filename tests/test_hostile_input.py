"""Hostile and careless input: every mistake is a 4xx naming the parameter, never a 500.

The API and the CLI run against real Postgres; the CLI and `worker run` as subprocesses,
the way a user meets them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient
from redis.asyncio import Redis

from worker import db, runs
from worker.config import Settings, load_jobs
from worker.lease import Lease
from worker.web.app import WebState, build_app

from .conftest import REDIS_URL, free_port
from .test_api import API_KEY, JOBS, assert_error

Client = TestClient[Any, Any]
BIGINT_MAX = 2**63 - 1
HUGE = "99999999999999999999"


@pytest.fixture
async def client(
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    database_url: str,
    pool: db.Pool,
    redis: Redis,
    key_prefix: str,
) -> Client:
    path = tmp_path / "jobs.toml"
    path.write_text(JOBS, encoding="utf-8")
    settings = Settings(
        jobs=load_jobs(path),
        api_key=API_KEY,
        key_prefix=key_prefix,
        database_url=database_url,
        worker_id="test-replica",
    )
    state = WebState(
        settings=settings, pool=pool, redis=redis, lease=Lease(redis, prefix=key_prefix)
    )
    return await aiohttp_client(build_app(state))


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [(r.name, r.levelname, r.getMessage()) for r in bad]


# --- numbers out of range ----------------------------------------------------------


@pytest.mark.parametrize(
    "run_id", [str(BIGINT_MAX + 1), HUGE, "-1", "0", "1e3", "\uff11\uff12", "+5", "1_000"]
)
async def test_run_ids_out_of_range_are_400(
    client: Client, run_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    headers = {"X-API-Key": API_KEY}
    message = await assert_error(await client.get(f"/runs/{run_id}"), 400, "bad_id")
    assert "id" in message
    await assert_error(await client.post(f"/runs/{run_id}/cancel", headers=headers), 400, "bad_id")
    no_errors_logged(caplog)


async def test_the_largest_bigint_is_a_valid_id(client: Client) -> None:
    await assert_error(await client.get(f"/runs/{BIGINT_MAX}"), 404, "unknown_run")


@pytest.mark.parametrize(
    ("query", "code"),
    [
        (f"?offset={HUGE}", "bad_offset"),
        ("?offset=-1", "bad_offset"),
        ("?offset=1000001", "bad_offset"),
        (f"?limit={HUGE}", "bad_limit"),
        ("?limit=0", "bad_limit"),
        ("?limit=1001", "bad_limit"),
        ("?limit=ten", "bad_limit"),
    ],
)
async def test_products_paging_out_of_range_is_400(
    client: Client, query: str, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    message = await assert_error(await client.get(f"/products{query}"), 400, code)
    assert code.removeprefix("bad_") in message
    no_errors_logged(caplog)


async def test_runs_limit_out_of_range_is_400(client: Client) -> None:
    await assert_error(await client.get(f"/runs?limit={HUGE}"), 400, "bad_limit")


# --- text parameters ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/runs", "job"),
        ("/runs", "status"),
        ("/products", "source"),
        ("/products", "account"),
        ("/products", "search"),
    ],
)
async def test_a_nul_character_is_400_naming_the_parameter(
    client: Client, path: str, param: str, caplog: pytest.LogCaptureFixture
) -> None:
    message = await assert_error(await client.get(f"{path}?{param}=a%00b"), 400, f"bad_{param}")
    assert param in message
    no_errors_logged(caplog)


async def test_an_unknown_status_lists_the_valid_ones(client: Client) -> None:
    message = await assert_error(await client.get("/runs?status=bogus"), 400, "bad_status")
    for status in runs.STATUSES:
        assert status in message


@pytest.mark.parametrize(
    ("path", "query", "param"),
    [
        ("/runs", "job=a&job=b", "job"),
        ("/runs", "limit=1&limit=2", "limit"),
        ("/products", "search=a&search=b", "search"),
        ("/products", "gone=true&gone=false", "gone"),
    ],
)
async def test_a_repeated_parameter_is_400(
    client: Client, path: str, query: str, param: str
) -> None:
    message = await assert_error(await client.get(f"{path}?{query}"), 400, f"bad_{param}")
    assert param in message
    assert "more than once" in message


@pytest.mark.parametrize(("path", "param"), [("/runs", "stauts"), ("/products", "q")])
async def test_an_unknown_parameter_is_400(client: Client, path: str, param: str) -> None:
    message = await assert_error(await client.get(f"{path}?{param}=x"), 400, "unknown_parameter")
    assert param in message


# --- products: gone and search ---------------------------------------------------------


@pytest.fixture
async def products(pool: db.Pool) -> None:
    """Three items of emag/main; `old` is gone."""
    await pool.executemany(
        "INSERT INTO products (source, account, external_id, name, sku, raw, hash)"
        " VALUES ('emag', 'main', $1, $2, $3, '{}', '')",
        [
            ("1", "100% cotton shirt", "SKU_1"),
            ("2", "brake pad", "SKU-2"),
            ("3", "old item", "OLD"),
        ],
    )
    await pool.execute("UPDATE products SET gone_at = now() WHERE external_id = '3'")


async def product_ids(client: Client, query: str) -> list[str]:
    response = await client.get(f"/products?{query}")
    assert response.status == 200, await response.text()
    return [i["external_id"] for i in (await response.json())["items"]]


async def test_gone_accepts_its_documented_values(client: Client, products: None) -> None:
    assert await product_ids(client, "") == ["1", "2", "3"]
    for value in ("true", "1", "TRUE"):
        assert await product_ids(client, f"gone={value}") == ["1", "2", "3"]
    for value in ("false", "0", "False"):
        assert await product_ids(client, f"gone={value}") == ["1", "2"]


@pytest.mark.parametrize("value", ["maybe", "2", "off", "%00"])
async def test_gone_refuses_anything_else(client: Client, products: None, value: str) -> None:
    message = await assert_error(await client.get(f"/products?gone={value}"), 400, "bad_gone")
    assert "true" in message
    assert "false" in message


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        ("%25", ["1"]),  # a literal percent sign, not "anything"
        ("_", ["1"]),  # a literal underscore (SKU_1), not "any one character"
        ("brake", ["2"]),
        ("\\", []),
        ("2", ["2"]),  # an exact external id
    ],
)
async def test_search_text_is_literal(
    client: Client, products: None, search: str, expected: list[str]
) -> None:
    assert await product_ids(client, f"search={search}") == expected


# --- oversized requests -----------------------------------------------------------------


async def test_a_url_over_8190_bytes_is_a_json_414(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    message = await assert_error(await client.get("/runs?job=" + "a" * 9000), 414, "url_too_long")
    assert "8190" in message
    no_errors_logged(caplog)


async def test_a_header_over_8190_bytes_is_a_json_431(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    response = await client.get("/runs", headers={"X-Big": "b" * 9000})
    message = await assert_error(response, 431, "header_too_large")
    assert "X-Big" in message
    no_errors_logged(caplog)


async def raw_request(client: Client, head: bytes) -> bytes:
    """Send `head` as is over a new connection; the server's whole answer."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "head",
    [
        b"GET /runs?job=" + b"a" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /runs HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 200_000 + b"\r\n\r\n",
        b"GET /runs HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    ],
    ids=["url", "header", "malformed"],
)
async def test_a_request_the_parser_refuses_is_a_4xx_without_a_traceback(
    client: Client, caplog: pytest.LogCaptureFixture, head: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    answer = await raw_request(client, head)
    status = int(answer.split(b" ", 2)[1])
    assert 400 <= status < 500, answer[:200]
    no_errors_logged(caplog)


# --- the CLI ------------------------------------------------------------------------


def worker_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`worker ARGS…` in a subprocess, with `env` over this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["runs", "--limit", "-1"], "--limit"),
        (["runs", "--limit", "0"], "--limit"),
        (["runs", "--limit", HUGE], "--limit"),
        (["runs", "--id", HUGE], "--id"),
        (["runs", "--id", "-1"], "--id"),
        (["products", "--limit", "-1"], "--limit"),
        (["products", "--offset", "-1"], "--offset"),
        (["products", "--offset", HUGE], "--offset"),
        (["cancel", HUGE], "RUN_ID"),
        (["cancel", "0"], "RUN_ID"),
    ],
)
def test_cli_bad_numbers_print_one_line_and_exit_2(
    database_url: str, args: list[str], named: str
) -> None:
    done = worker_cli(*args, env={"DATABASE_URL": database_url})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert named in lines[0]
    assert "Traceback" not in done.stderr


def test_cli_accepts_numbers_in_range(database_url: str) -> None:
    done = worker_cli("runs", "--limit", "1000", env={"DATABASE_URL": database_url})
    assert done.returncode == 0, done.stderr
    done = worker_cli("runs", "--id", str(BIGINT_MAX), env={"DATABASE_URL": database_url})
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == f"no run {BIGINT_MAX}"


def test_a_port_in_use_is_named_as_such(database_url: str, key_prefix: str) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = worker_cli(
            "run",
            env={
                "DATABASE_URL": database_url,
                "REDIS_URL": REDIS_URL,
                "WORKER_KEY_PREFIX": key_prefix,
                "WORKER_HTTP_PORT": str(port),
                "WORKER_ROLE": "http",
                "WORKER_LOG_LEVEL": "ERROR",
            },
        )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0] == (
        f"error: cannot listen on 127.0.0.1:{port}: the port is already in use (WORKER_HTTP_PORT)"
    )
