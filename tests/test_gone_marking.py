"""Gone-marking that a live catalogue cannot fool (issue 8, item 4).

Offset paging over a live catalogue can miss an item in one pass (it shifts from one
page to the next while the pass runs); the old code marked it gone at once. And a
vendor answering a truncated list made a "complete" pass that wiped the catalogue.
"""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from pytest_aiohttp import AiohttpServer

from worker import db
from worker.config import JobSpec
from worker.jobs.marketplaces import EmagOffersJob
from worker.upstream import Upstream

from .test_catalog_sync import emag_params, products, start_marketplace, sync, upstream

__all__ = ["upstream"]  # the fixture, imported for pytest


def gone_ids(rows: dict[str, dict[str, object]]) -> list[str]:
    return sorted(eid for eid, row in rows.items() if row["gone_at"])


async def test_an_item_is_gone_only_after_missing_from_gone_after_passes(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    market = await start_marketplace(aiohttp_server)
    job = EmagOffersJob()
    params = emag_params(market, monkeypatch, mark_gone=True)  # gone_after: 2 by default
    assert (await sync(pool, upstream, job, params)).error is None
    market.sandbox.catalog.remove_emag_offer("ro", "main", 7)

    once = await sync(pool, upstream, job, params)
    assert once.error is None
    assert once.stats["gone"] == 0, "one missed pass must not mark an item gone"
    check = once.stats["gone_check"]
    assert (check["missing"], check["gone"], check["gone_after"]) == (1, 0, 2)
    assert gone_ids(await products(pool, "emag", "main")) == []

    twice = await sync(pool, upstream, job, params)
    assert twice.stats["gone"] == 1
    assert gone_ids(await products(pool, "emag", "main")) == ["7"]


async def test_an_item_missed_once_and_seen_again_starts_from_zero(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The live-catalogue case: missed by one pass (it moved pages), listed by the next,
    missed again by the one after: never two passes in a row, never gone."""
    full = await start_marketplace(aiohttp_server)
    job = EmagOffersJob()
    assert (
        await sync(pool, upstream, job, emag_params(full, monkeypatch, mark_gone=True))
    ).error is None
    shifted = await start_marketplace(aiohttp_server)
    shifted.sandbox.catalog.remove_emag_offer("ro", "main", 7)
    for market in (shifted, full, shifted):
        out = await sync(pool, upstream, job, emag_params(market, monkeypatch, mark_gone=True))
        assert out.error is None
        assert out.stats["gone"] == 0
    rows = await products(pool, "emag", "main")
    assert gone_ids(rows) == []
    missed = await pool.fetchval(
        "SELECT missed_passes FROM products WHERE source = 'emag' AND external_id = '7'"
    )
    assert missed == 1


async def test_a_truncated_answer_marks_nothing_gone_and_says_so(
    aiohttp_server: AiohttpServer,
    pool: db.Pool,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The vendor lists 10 of 45 live items in an otherwise normal, complete pass: the
    guard (a pass must list at least half the live items) keeps the catalogue."""
    full = await start_marketplace(aiohttp_server)
    job = EmagOffersJob()
    params = {"mark_gone": True, "gone_after": 1}
    assert (await sync(pool, upstream, job, emag_params(full, monkeypatch, **params))).error is None
    truncated = await start_marketplace(aiohttp_server, emag_items=10)
    before = REGISTRY.get_sample_value("worker_gone_guard_trips_total", {"job": "sync"}) or 0.0

    out = await sync(pool, upstream, job, emag_params(truncated, monkeypatch, **params))

    assert out.error is None
    assert out.stats["gone"] == 0
    check = out.stats["gone_check"]
    assert check["guarded"] is True
    assert (check["seen"], check["live_before"], check["gone_guard"]) == (10, 45, 0.5)
    assert any("gone guard" in w for w in out.stats["warnings"])
    assert gone_ids(await products(pool, "emag", "main")) == []
    after = REGISTRY.get_sample_value("worker_gone_guard_trips_total", {"job": "sync"})
    assert after == before + 1


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"gone_after": 0}, "gone_after"),
        ({"gone_after": "2"}, "gone_after"),
        ({"gone_guard": 1.5}, "gone_guard"),
        ({"gone_guard": True}, "gone_guard"),
    ],
)
def test_gone_settings_are_checked_when_the_jobs_file_loads(
    params: dict[str, object], name: str
) -> None:
    spec = JobSpec(
        name="j",
        kind="emag.offers",
        schedule=None,
        params={"account": "main", "platform": "ro", **params},
    )
    with pytest.raises(ValueError, match=name):
        EmagOffersJob().check(spec)
