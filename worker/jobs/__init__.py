"""The job kinds this worker knows, by the name used in the jobs file's `kind`."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ..config import JobSpec
from ..context import JobKind
from .http import HttpJob
from .marketplaces import EbayCatalogJob, EmagOffersJob


def kinds() -> dict[str, JobKind]:
    """A fresh registry of every job kind."""
    return {"http": HttpJob(), "emag.offers": EmagOffersJob(), "ebay.catalog": EbayCatalogJob()}


def checkers(registry: Mapping[str, JobKind]) -> dict[str, Callable[[JobSpec], None]]:
    """Per-kind params checkers, for `Settings.from_env(kinds=…)`."""
    return {name: kind.check for name, kind in registry.items()}
