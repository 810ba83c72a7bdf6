"""What every catalogue connector provides: pages of mapped items and a resume cursor;
and what one that can fetch an item's details adds (`DetailSource`)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..catalog import Details, Item
from ..looplag import off_loop


@dataclass
class Page:
    """One fetched page.

    `cursor` is what to pass back to `pages()` to continue *after* this page (None when
    this was the last page). It must be JSON, and never an object with a "finished" key:
    the sync stores {"finished": true, …} once the last page is committed. `failed`
    holds (external id or "?", reason) for items that could not be mapped: they are
    counted and sampled, never fatal.
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
        """Once `pages()` has ended: whether the pass covered the whole catalogue."""
        ...


def map_all(
    raws: list[Any], mapper: Callable[[Any], Item], *, id_field: str
) -> tuple[list[Item], list[tuple[str, str]]]:
    """Map a page's raw items; a bad one becomes (its id or "?", reason), never an error."""
    items: list[Item] = []
    failed: list[tuple[str, str]] = []
    for raw in raws:
        try:
            items.append(mapper(raw))
        except (ValueError, TypeError, KeyError) as exc:
            ident = raw.get(id_field) if isinstance(raw, dict) else None
            failed.append((str(ident) if ident not in (None, "") else "?", str(exc)))
    return items, failed


async def map_page(
    raws: list[Any], mapper: Callable[[Any], Item], *, id_field: str
) -> tuple[list[Item], list[tuple[str, str]]]:
    """`map_all` for a whole page: a large one is mapped in a thread, off the loop that
    answers the probes (`looplag.off_loop`); the mapper must be a pure function."""
    return await off_loop(len(raws), map_all, raws, mapper, id_field=id_field)


@runtime_checkable
class DetailSource(Protocol):
    """A connector that can fetch one item's details (one upstream call per item)."""

    async def details(self, external_id: str) -> Details:
        """The item's details; raise UpstreamError when the vendor cannot give them
        (a 404 for an item ended since the pass listed it, say)."""
        ...


__all__ = ["Connector", "DetailSource", "Details", "Page", "map_all", "map_page"]
