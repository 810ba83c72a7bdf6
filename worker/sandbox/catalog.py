"""A deterministic marketplace catalogue for the sandbox, generated from a seed.

eMAG offers are generated lazily, one page at a time, from a hash of (seed,
platform, account, index): a 100 000-offer account costs nothing until it is
read, and a page costs only its own items. Test mutations (price changes,
removals, additions) are kept as small overlays on top of the generated base.
eBay catalogues are small (a search can reach at most 10 000 items), so their
items are built once, up front.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]

QUERY_TERMS = ("OEM", "brake", "filter", "sensor")
"""Search terms the eBay titles are built to contain; several items match more than one."""

CURRENCIES = {"ro": "RON", "bg": "BGN", "hu": "HUF"}

_BRANDS = ("Bosch", "Brembo", "Valeo", "Febi", "Mann", "NGK", "Denso", "TRW")
_EMAG_PARTS = (
    "brake pad set",
    "brake disc",
    "oil filter",
    "air filter",
    "spark plug",
    "wiper blade",
    "water pump",
    "timing belt kit",
)
_EBAY_PARTS = (
    "Brake Pad Set",
    "Brake Rotor",
    "Brake Caliper",
    "Brake Pad Wear Sensor",
    "Oil Filter",
    "Cabin Air Filter",
    "O2 Oxygen Sensor",
    "ABS Wheel Speed Sensor",
    "Fuel Pump",
    "Ignition Coil",
)
_VEHICLES = ("Honda Civic", "Toyota Corolla", "Ford Focus", "VW Golf", "BMW 320i", "Dacia Logan")
_CONDITIONS = (("New", "1000"), ("New", "1000"), ("Used", "3000"), ("Remanufactured", "2500"))
_KEY_ALPHABET = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"
_MASK = (1 << 64) - 1
_WORD = re.compile(r"[a-z0-9]+")
_FIRST_LEGACY_ID = 110_000_000_000


def _mix(x: int) -> int:
    """splitmix64: a cheap, well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _salt(seed: int, name: str) -> int:
    """A stable 64-bit salt (Python's str hash is randomised per process)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest())


def _key(h: int, length: int = 9) -> str:
    chars = []
    for _ in range(length):
        h, digit = divmod(h, len(_KEY_ALPHABET))
        chars.append(_KEY_ALPHABET[digit])
    return "".join(chars)


def _ean(h: int) -> str:
    """A valid EAN-13 with the Romanian GS1 prefix 594."""
    body = f"594{h % 10**9:09d}"
    total = sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(body))
    return body + str((10 - total % 10) % 10)


def _gtin(h: int, length: int) -> str:
    """A GTIN of `length` digits (12: UPC-A, 13: EAN-13) with a valid check digit."""
    body = f"{h % 10 ** (length - 1):0{length - 1}d}"
    if length == 13 and body[0] == "0":
        body = "4" + body[1:]  # a German GS1 prefix rather than a UPC in disguise
    total = sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(reversed(body), 1))
    return body + str((10 - total % 10) % 10)


def words(text: str) -> frozenset[str]:
    """The lower-cased words of a title or query."""
    return frozenset(_WORD.findall(text.lower()))


def matches(query: str, title_words: frozenset[str]) -> bool:
    """eBay keyword semantics: words separated by spaces AND, "(a, b)" ORs."""
    q = query.strip()
    if q.startswith("(") and q.endswith(")"):
        alternatives = [words(part) for part in q[1:-1].split(",")]
        return any(alt and alt <= title_words for alt in alternatives)
    wanted = words(q)
    return bool(wanted) and wanted <= title_words


@dataclass
class _EmagShelf:
    """One (platform, account): generated offers 1..size plus the test overlays."""

    platform: str
    salt: int
    size: int
    next_id: int
    removed: set[int] = field(default_factory=set)
    prices: dict[int, float | str] = field(default_factory=dict)
    added: list[JSON] = field(default_factory=list)
    visible_cache: list[int] | None = None

    def visible(self) -> Sequence[int]:
        """Indices of the generated offers still listed, in order."""
        if not self.removed:
            return range(self.size)
        if self.visible_cache is None:
            self.visible_cache = [i for i in range(self.size) if i + 1 not in self.removed]
        return self.visible_cache


class Catalog:
    """The sandbox's marketplace data; the same seed always gives the same catalogue."""

    def __init__(
        self,
        *,
        seed: int,
        emag_platforms: Iterable[str],
        emag_accounts: Iterable[str],
        emag_items: int,
        ebay_sellers: Iterable[str],
        ebay_items: int,
    ) -> None:
        self.seed = seed
        accounts = list(emag_accounts)
        self._shelves = {
            (platform, account): _EmagShelf(
                platform=platform,
                salt=_salt(seed, f"emag:{platform}:{account}"),
                size=emag_items,
                next_id=emag_items + 1,
            )
            for platform in emag_platforms
            for account in accounts
        }
        self._sellers: dict[str, list[JSON]] = {}
        self._ebay_index: dict[str, tuple[str, JSON]] = {}
        self._ebay_words: dict[str, frozenset[str]] = {}
        self._searches: dict[tuple[str, tuple[str, ...]], list[JSON]] = {}
        self._next_legacy = _FIRST_LEGACY_ID
        for seller in ebay_sellers:
            self._sellers[seller] = []
            for i in range(ebay_items):
                self._store_ebay(seller, self._ebay_item(seller, i))

    # -- eMAG ---------------------------------------------------------------

    def emag_count(self, platform: str, account: str) -> int:
        shelf = self._shelf(platform, account)
        return len(shelf.visible()) + len(shelf.added)

    def emag_page(self, platform: str, account: str, *, page: int, per_page: int) -> list[JSON]:
        """The offers on a 1-based page; fresh dicts the caller may change."""
        shelf = self._shelf(platform, account)
        visible = shelf.visible()
        start = (page - 1) * per_page
        end = min(start + per_page, len(visible) + len(shelf.added))
        out = []
        for pos in range(max(start, 0), end):
            if pos < len(visible):
                out.append(self._emag_offer(shelf, visible[pos]))
            else:
                out.append(dict(shelf.added[pos - len(visible)]))
        return out

    def emag_offers(self, platform: str, account: str) -> Iterator[JSON]:
        """Every listed offer of an account, in paging order."""
        shelf = self._shelf(platform, account)
        for index in shelf.visible():
            yield self._emag_offer(shelf, index)
        yield from (dict(offer) for offer in shelf.added)

    def set_emag_price(
        self, platform: str, account: str, offer_id: int, sale_price: float | str
    ) -> None:
        shelf = self._shelf(platform, account)
        for offer in shelf.added:
            if offer["id"] == offer_id:
                offer["sale_price"] = sale_price
                return
        self._check_generated(shelf, offer_id)
        shelf.prices[offer_id] = sale_price

    def remove_emag_offer(self, platform: str, account: str, offer_id: int) -> None:
        shelf = self._shelf(platform, account)
        for n, offer in enumerate(shelf.added):
            if offer["id"] == offer_id:
                del shelf.added[n]
                return
        self._check_generated(shelf, offer_id)
        shelf.removed.add(offer_id)
        shelf.visible_cache = None

    def add_emag_offer(
        self,
        platform: str,
        account: str,
        *,
        name: str | None = None,
        sale_price: float | str | None = None,
    ) -> JSON:
        """Append a new offer (next free id) and return a copy of it."""
        shelf = self._shelf(platform, account)
        offer = self._emag_offer(shelf, shelf.next_id - 1)
        shelf.next_id += 1
        if name is not None:
            offer["name"] = name
        if sale_price is not None:
            offer["sale_price"] = sale_price
        shelf.added.append(offer)
        return dict(offer)

    def emag_accounts(self) -> list[tuple[str, str]]:
        return list(self._shelves)

    def _shelf(self, platform: str, account: str) -> _EmagShelf:
        try:
            return self._shelves[platform, account]
        except KeyError:
            raise LookupError(f"no eMAG account {account!r} on platform {platform!r}") from None

    @staticmethod
    def _check_generated(shelf: _EmagShelf, offer_id: int) -> None:
        if not 1 <= offer_id <= shelf.size or offer_id in shelf.removed:
            raise LookupError(f"no eMAG offer {offer_id}")

    def _emag_offer(self, shelf: _EmagShelf, index: int) -> JSON:
        h1 = _mix(shelf.salt + index)
        h2 = _mix(h1)
        h3 = _mix(h2)
        offer_id = index + 1
        brand = _BRANDS[h1 % len(_BRANDS)]
        part = _EMAG_PARTS[(h1 >> 8) % len(_EMAG_PARTS)]
        price = (999 + h2 % 250_000) / 100
        # Real responses mix numbers and 4-decimal strings for prices.
        sale_price: float | str = f"{price:.4f}" if (h2 >> 32) % 4 == 0 else price
        stock = [{"warehouse_id": 1, "value": h3 % 60}]
        if (h3 >> 8) % 5 == 0:
            stock.append({"warehouse_id": 2, "value": (h3 >> 16) % 30})
        n_eans = (0, 2, 1, 1, 1, 1)[(h3 >> 24) % 6]
        pnk = "D" + _key(h2 >> 20, 8)
        offer: JSON = {
            "id": offer_id,
            "part_number": f"SB-{shelf.salt % 1000:03d}-{offer_id:07d}",
            "part_number_key": pnk,
            "name": f"{brand} {part} {1000 + (h1 >> 16) % 9000}",
            "brand": brand,
            "sale_price": shelf.prices.get(offer_id, sale_price),
            "recommended_price": round(price * 1.15, 2),
            "currency": CURRENCIES.get(shelf.platform, "EUR"),
            "general_stock": sum(s["value"] for s in stock),
            "stock": stock,
            "status": 0 if (h3 >> 32) % 10 == 0 else 1,
            "ean": [_ean(h3 >> (8 * k)) for k in range(n_eans)],
        }
        if (h3 >> 40) % 8:
            offer["url"] = f"https://www.emag.{shelf.platform}/{part.replace(' ', '-')}/pd/{pnk}/"
        return offer

    # -- eBay ---------------------------------------------------------------

    def ebay_sellers(self) -> list[str]:
        return list(self._sellers)

    def ebay_count(self, seller: str) -> int:
        return len(self._sellers[seller])

    def ebay_search(self, *, q: str, sellers: Sequence[str] | None = None) -> list[JSON]:
        """Items matching `q` (from `sellers`, or all), in a stable order; do not mutate."""
        chosen = tuple(self._sellers) if sellers is None else tuple(sellers)
        key = (q, chosen)
        found = self._searches.get(key)
        if found is None:
            found = [
                item
                for seller in chosen
                for item in self._sellers.get(seller, ())
                if matches(q, self._ebay_words[item["itemId"]])
            ]
            if len(self._searches) > 256:
                self._searches.clear()
            self._searches[key] = found
        return found

    def ebay_item(self, item_id: str) -> JSON:
        return self._ebay_lookup(item_id)[1]

    def ebay_details(self, item_id: str) -> JSON:
        """The item as getItem answers it: its summary plus `gtin`, `mpn`, `brand` and
        `localizedAspects`, generated from the seed and the item id (and read from the
        title, so the brand and part agree with it); a fresh dict."""
        item = self._ebay_lookup(item_id)[1]
        h = _mix(_salt(self.seed, f"ebay-details:{item_id}"))
        title = item["title"]
        brand = next((b for b in _BRANDS if title.startswith(b)), None)
        part = next((p for p in _EBAY_PARTS if p in title), None)
        details: JSON = dict(item)
        aspects: list[JSON] = []
        if brand is not None:
            details["brand"] = brand
            aspects.append({"type": "STRING", "name": "Brand", "value": brand})
        # Most items carry a GTIN (UPC-A or EAN-13), some none; some sellers enter
        # "Does Not Apply" for the part number, as eBay lets them.
        kind = h % 8
        if kind:
            details["gtin"] = _gtin(h >> 8, 12 if kind < 4 else 13)
        mpn = "Does Not Apply" if (h >> 48) % 10 == 0 else f"{_key(h >> 16, 6)}-{h % 1000:03d}"
        details["mpn"] = mpn
        aspects.append({"type": "STRING", "name": "Manufacturer Part Number", "value": mpn})
        if part is not None:
            aspects.append({"type": "STRING", "name": "Type", "value": part})
        if part is not None and part.startswith("Brake"):
            # The document types `value` a string even for STRING_ARRAY.
            both = (h >> 40) % 3 == 0
            placement = "Front, Rear" if both else ("Front", "Rear")[(h >> 42) % 2]
            kind_name = "STRING_ARRAY" if both else "STRING"
            aspects.append({"type": kind_name, "name": "Placement on Vehicle", "value": placement})
        fitment = ("Direct Replacement", "Performance/Custom")[(h >> 44) % 4 == 0]
        aspects.append({"type": "STRING", "name": "Fitment Type", "value": fitment})
        details["localizedAspects"] = aspects
        return details

    def ebay_terms_of(self, item_id: str) -> frozenset[str]:
        """Which of `QUERY_TERMS` the item is found by."""
        title_words = self._ebay_words[item_id]
        return frozenset(term for term in QUERY_TERMS if matches(term, title_words))

    def set_ebay_price(self, item_id: str, value: str) -> None:
        item = self._ebay_lookup(item_id)[1]
        item["price"] = {**item["price"], "value": value}

    def remove_ebay_item(self, item_id: str) -> None:
        seller, item = self._ebay_lookup(item_id)
        self._sellers[seller].remove(item)
        del self._ebay_index[item_id], self._ebay_words[item_id]
        self._searches.clear()

    def add_ebay_item(
        self, seller: str, *, title: str | None = None, price: str | None = None
    ) -> JSON:
        """Append a new item for `seller` and return it."""
        if seller not in self._sellers:
            raise LookupError(f"no eBay seller {seller!r}")
        item = self._ebay_item(seller, len(self._sellers[seller]) + 1_000_000)
        if title is not None:
            item["title"] = title
        if price is not None:
            item["price"] = {"value": price, "currency": "USD"}
        self._store_ebay(seller, item)
        return item

    def _ebay_lookup(self, item_id: str) -> tuple[str, JSON]:
        try:
            return self._ebay_index[item_id]
        except KeyError:
            raise LookupError(f"no eBay item {item_id!r}") from None

    def _store_ebay(self, seller: str, item: JSON) -> None:
        self._sellers[seller].append(item)
        self._ebay_index[item["itemId"]] = (seller, item)
        self._ebay_words[item["itemId"]] = words(item["title"])
        self._searches.clear()

    def _ebay_item(self, seller: str, index: int) -> JSON:
        salt = _salt(self.seed, f"ebay:{seller}")
        h = _mix(salt + index)
        h2 = _mix(h)
        legacy = self._next_legacy
        self._next_legacy += 1
        oem = "OEM " if (h >> 16) % 2 == 0 else ""
        title = (
            f"{_BRANDS[h % len(_BRANDS)]} {oem}{_EBAY_PARTS[(h >> 8) % len(_EBAY_PARTS)]}"
            f" for {_VEHICLES[(h >> 20) % len(_VEHICLES)]} {2005 + (h >> 28) % 18}"
        )
        condition, condition_id = _CONDITIONS[(h >> 36) % len(_CONDITIONS)]
        return {
            "itemId": f"v1|{legacy}|0",
            "title": title,
            "price": {"value": f"{(499 + h2 % 50_000) / 100:.2f}", "currency": "USD"},
            "itemWebUrl": f"https://www.ebay.com/itm/{legacy}",
            "seller": {
                "username": seller,
                "feedbackPercentage": f"{95 + salt % 50 / 10:.1f}",
                "feedbackScore": salt % 50_000,
            },
            "condition": condition,
            "conditionId": condition_id,
            "image": {"imageUrl": f"https://i.ebayimg.com/images/g/{_key(h2, 16)}/s-l225.jpg"},
            "buyingOptions": ["FIXED_PRICE"],
            "legacyItemId": str(legacy),
        }
