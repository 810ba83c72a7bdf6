"""`GET /events` and `worker events`: the events the main server filed, filtered."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from worker import db, events

from .test_api import Client, assert_error, client, make_client, settings

__all__ = ["client", "make_client", "settings"]  # fixtures, imported for pytest

EVENTS = [
    {
        "source": "fienta",
        "external_id": "1",
        "title": "Jazz night",
        "starts_at": "2026-12-01T18:00:00Z",
        "city": "Tallinn",
        "venue": "Kultuurikatel",
    },
    {
        "source": "fienta",
        "external_id": "2",
        "title": "100% Comedy",
        "starts_at": "2026-12-02T21:30:00Z",
        "city": "Tartu",
        "venue": "Vanemuine",
    },
    {
        "source": "eventim",
        "external_id": "9",
        "title": "Oper",
        "starts_at": "2026-12-05T19:00:00Z",
        "city": "Berlin",
        "venue": "Staatsoper",
    },
]


@pytest.fixture
async def filed(pool: db.Pool) -> None:
    async with pool.acquire() as conn, conn.transaction():
        for source in ("fienta", "eventim"):
            stats = await events.file_events(
                conn, [e for e in EVENTS if e["source"] == source], source=source
            )
            assert stats["failed"] == 0, stats


async def titles(client: Client, query: str) -> list[str]:
    resp = await client.get(f"/events?{query}")
    assert resp.status == 200, await resp.text()
    return [e["title"] for e in (await resp.json())["items"]]


async def test_filters(client: Client, filed: None) -> None:
    assert await titles(client, "") == ["Jazz night", "100% Comedy", "Oper"]
    assert await titles(client, "source=fienta&city=tartu") == ["100% Comedy"]
    assert await titles(client, "from=2026-12-02&to=2026-12-02") == ["100% Comedy"]
    assert await titles(client, "from=2026-12-01T19:30%2B01:00") == ["100% Comedy", "Oper"]
    assert await titles(client, "search=100%25") == ["100% Comedy"]  # literal %


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("from=yesterday", "bad_from"),
        ("to=2026-12-01T10:00", "bad_to"),
        ("limit=0", "bad_limit"),
        ("city=a%00b", "bad_city"),
        ("colour=blue", "unknown_parameter"),
    ],
)
async def test_bad_input_is_a_400_naming_the_parameter(
    client: Client, query: str, code: str
) -> None:
    await assert_error(await client.get(f"/events?{query}"), 400, code)


def test_cli_events(database_url: str, filed: None) -> None:
    env = {**os.environ, "DATABASE_URL": database_url}
    env.pop("WORKER_JOBS_FILE", None)
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "worker", "events", "--source", "fienta", "--json"],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert orjson.loads(out.stdout)["total"] == 2
    bad = subprocess.run(
        [sys.executable, "-m", "worker", "events", "--from", "soon"],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "--from" in bad.stderr
