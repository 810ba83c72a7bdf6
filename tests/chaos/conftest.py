"""The chaos suite's marker and which scenarios `make test` runs.

Every scenario is marked `chaos`. `make chaos` (CHAOS=all) runs them all; a plain
`pytest` / `make test` runs the scenarios listed in `EVERY_TIME` and skips the rest, so
the whole suite stays well under its time budget (the figures are in docs/faults.md).
"""

from __future__ import annotations

import os

import pytest

# The scenarios every `make test` runs (about a minute together): the fence under a
# freeze inside and outside a fenced transaction, a crash, and the partition from
# Postgres. The rest are in `make chaos` (about 2.5 minutes for all).
EVERY_TIME = {
    "test_kill_9_of_the_leader_mid_sync",
    "test_sigstop_of_the_leader_past_its_ttl[outside]",
    "test_sigstop_of_the_leader_past_its_ttl[inside]",
    "test_leader_cut_off_from_postgres",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: a chaos scenario (make chaos runs them all)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CHAOS") == "all":
        return
    skip = pytest.mark.skip(reason="chaos scenario: run with `make chaos`")
    for item in items:
        if item.get_closest_marker("chaos") and item.name not in EVERY_TIME:
            item.add_marker(skip)
