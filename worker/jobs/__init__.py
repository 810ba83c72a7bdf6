"""The job kinds this worker knows, by the name used in the jobs file's `kind`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from ..config import JobSpec
from ..context import JobKind
from .http import HttpJob
from .marketplaces import EbayCatalogJob, EmagOffersJob
from .parse_eventim import EventimJob
from .parse_schema_org import KontramarkaJob, SchemaOrgJob
from .parsers import FientaJob
from .remote_parsing import RemoteCreateJob, RemoteReadJob, RemoteSweepJob


def kinds() -> dict[str, JobKind]:
    """A fresh registry of every job kind."""
    return {
        "http": HttpJob(),
        "emag.offers": EmagOffersJob(),
        "ebay.catalog": EbayCatalogJob(),
        "parse.fienta": FientaJob(),
        "parse.eventim": EventimJob(),
        "parse.schema_org": SchemaOrgJob(),
        "parse.kontramarka": KontramarkaJob(),
        "remote_parsing.create": RemoteCreateJob(),
        "remote_parsing.read": RemoteReadJob(),
        "remote_parsing.sweep": RemoteSweepJob(),
    }


def checkers(registry: Mapping[str, JobKind]) -> dict[str, Callable[[JobSpec], None]]:
    """Per-kind params checkers, for `Settings.from_env(kinds=…)`."""
    return {name: kind.check for name, kind in registry.items()}


# Params that only change how a pass runs, not which catalogue it reads.
_PACING = {
    "max_pages",
    "rate_limit",
    "mark_gone",
    "items_per_page",
    "limit",
    "prefetch",
    "connect_timeout",
    "read_timeout",
    "total_timeout",
    "gone_after",
    "gone_guard",
    "details",
    "max_detail_calls",
}
_SOURCES = {"emag.offers": "emag", "ebay.catalog": "ebay"}


def cross_check(specs: Sequence[JobSpec]) -> None:
    """Catalogue jobs writing the same (source, account) must read the same catalogue.

    Otherwise each would mark the other's items gone: give each platform, seller set
    or query set its own `account` name.
    """
    seen: dict[tuple[str, str], JobSpec] = {}
    for spec in specs:
        source = _SOURCES.get(spec.kind)
        if source is None:
            continue
        key = (source, str(spec.params.get("account")))
        other = seen.setdefault(key, spec)
        if other is spec:
            continue
        mine = {k: v for k, v in spec.params.items() if k not in _PACING}
        theirs = {k: v for k, v in other.params.items() if k not in _PACING}
        if mine != theirs:
            raise ValueError(
                f"jobs {other.name!r} and {spec.name!r} both write {source} account"
                f" {key[1]!r} but read different catalogues; give each its own 'account'"
            )
