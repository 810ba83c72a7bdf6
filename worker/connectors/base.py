"""What every catalogue connector provides: pages of mapped items and a resume cursor."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..catalog import Item


@dataclass
class Page:
    """One fetched page.

    `cursor` is what to pass back to `pages()` to continue *after* this page (None when
    this was the last page). `failed` holds (external id or "?", reason) for items that
    could not be mapped: they are counted and sampled, never fatal.
    """

    items: list[Item]
    cursor: Any
    label: str
    total: int | None = None
    failed: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class Connector(Protocol):
    """An upstream API that yields a catalogue as pages."""

    source: str
    account: str

    def pages(self, cursor: Any) -> AsyncGenerator[Page, None]:
        """Pages from `cursor` (None: from the start) to the end of the catalogue."""
        ...

    @property
    def complete(self) -> bool:
        """After iterating: whether the pass covered the whole catalogue."""
        ...
