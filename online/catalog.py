"""The item catalogue the filters read: category, price, availability, title.

Loaded from the lake's `items` table at start-up and kept current by UpsertItems, which
writes the lake first (so a restart sees the same catalogue) and then swaps the entries
in memory. Items the catalogue does not know are treated as available, uncategorised.

Besides the dict by id, the catalogue keeps per-model *row views* (`Catalog.rows(model)`):
numpy arrays aligned with the model's item rows (availability, category code), so a
request filters FAISS candidates with a few vector operations instead of one dict lookup
per candidate. A view is built once per model (at the swap, or on first use), grows when
items are added to the model online, and UpsertItems updates every live view in place.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from lake.tables import Lake

log = logging.getLogger(__name__)

NO_CATEGORY = 0
"""Category code of items without a category (real categories are coded from 1)."""


@dataclass(frozen=True, slots=True)
class ItemInfo:
    item_id: str
    category: str | None = None
    price: float | None = None
    available: bool = True
    title: str | None = None


UNKNOWN = ItemInfo(item_id="")
ITEM_FIELDS = ("category", "price", "available", "title")
"""The fields an upsert may set; each one it leaves out keeps its value."""


class RowModel(Protocol):
    """What a row view needs from a model: its item ids by row and rows by id."""

    item_ids: list[str]
    item_row: dict[str, int]


class RowView:
    """Catalogue attributes of one model's item rows.

    `available[r]` and `category[r]` (a code from `Catalog.category_code`) describe row r.
    Rows at or beyond `len(view)` (items the model got after the view last grew) are
    unknown to the view: callers treat them like items missing from the catalogue.
    Readers take `available` / `category` once per request; writers (upsert, growth) hold
    the catalogue's lock and either assign elements or replace both arrays, and bump
    `version`. `derived` is a small bounded cache (oldest out, by count and by bytes) for
    what callers compute from the whole view (search-time filters): entries are
    (version, value, nbytes) and stale once `version` moved, so every upsert costs each
    filter in use one recomputation.
    """

    __slots__ = ("available", "category", "version", "derived", "_derived_lock",
                 "__weakref__")
    MAX_DERIVED = 128
    MAX_DERIVED_BYTES = 256 * 1024 * 1024

    def __init__(self, available: np.ndarray, category: np.ndarray) -> None:
        self.available = available
        self.category = category
        self.version = 0
        self.derived: OrderedDict[Any, tuple[int, Any, int]] = OrderedDict()
        self._derived_lock = threading.Lock()

    def get_derived(self, key: Any) -> tuple[bool, Any]:
        """(found, value) of `key` if it was computed at the current version."""
        hit = self.derived.get(key)
        if hit is None or hit[0] != self.version:
            return False, None
        return True, hit[1]

    def put_derived(self, key: Any, version: int, value: Any, nbytes: int = 0) -> None:
        """Remember `value` (holding `nbytes` of arrays), computed as of `version`."""
        with self._derived_lock:
            self.derived.pop(key, None)  # re-inserted as the newest
            self.derived[key] = (version, value, nbytes)
            while len(self.derived) > 1 and (len(self.derived) > self.MAX_DERIVED or
                                             self.derived_bytes > self.MAX_DERIVED_BYTES):
                self.derived.popitem(last=False)

    @property
    def derived_bytes(self) -> int:
        return sum(entry[2] for entry in list(self.derived.values()))

    def __len__(self) -> int:
        return int(self.category.shape[0])


class Catalog:
    def __init__(self, lake: Lake | None = None) -> None:
        self._lake = lake
        self._items: dict[str, ItemInfo] = {}
        self._write_lock = threading.RLock()  # upsert holds it across write + apply
        self._codes: dict[str, int] = {}
        self._views: weakref.WeakKeyDictionary[Any, RowView] = weakref.WeakKeyDictionary()
        # Called with each upsert once it is in the lake (the fleet channel tells the peers).
        self.published: Callable[[list[Mapping[str, Any]]], None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def get(self, item_id: str) -> ItemInfo:
        return self._items.get(item_id, UNKNOWN)

    # -- category codes ----------------------------------------------------------------
    def category_code(self, category: str | None) -> int | None:
        """The code of a category; NO_CATEGORY for None; None for a category no item has."""
        if category is None:
            return NO_CATEGORY
        return self._codes.get(category)

    @property
    def n_codes(self) -> int:
        """How many category codes exist (codes run from 1 to n_codes)."""
        return len(self._codes)

    def category_codes(self, categories: Iterable[str]) -> list[int]:
        """Codes of the categories some item has (unknown categories are left out)."""
        codes = self._codes
        return [codes[c] for c in categories if c in codes]

    def _code(self, category: str | None) -> int:
        """Code of `category`, assigning a new one (caller holds the write lock)."""
        if category is None:
            return NO_CATEGORY
        code = self._codes.get(category)
        if code is None:
            code = len(self._codes) + 1
            self._codes[category] = code
        return code

    # -- row views ---------------------------------------------------------------------
    def rows(self, model: RowModel) -> RowView:
        """The row view of `model`, built on first use and grown to its current items."""
        view = self._views.get(model)
        n = len(model.item_ids)
        if view is not None and len(view) >= n:
            return view
        with self._write_lock:
            view = self._views.get(model)
            if view is None:
                view = RowView(np.ones(0, dtype=bool), np.zeros(0, dtype=np.int32))
                self._views[model] = view
            self._grow(view, model.item_ids)
            return view

    def _grow(self, view: RowView, item_ids: Sequence[str]) -> None:
        """Extend `view` to len(item_ids) rows (caller holds the write lock)."""
        start, n = len(view), len(item_ids)
        if n <= start:
            return
        avail = np.ones(n, dtype=bool)
        cat = np.zeros(n, dtype=np.int32)
        avail[:start] = view.available
        cat[:start] = view.category
        items = self._items
        for r in range(start, n):
            info = items.get(item_ids[r])
            if info is not None:
                avail[r] = info.available
                cat[r] = self._code(info.category)
        # Category first: a reader that sees the longer `available` also has the codes.
        view.category = cat
        view.available = avail
        view.version += 1

    # -- loading and upserts -----------------------------------------------------------
    def load(self) -> int:
        """(Re)load the whole catalogue from the lake; returns the number of items."""
        if self._lake is None or not self._lake.exists("items"):
            return 0
        table = self._lake.read("items", columns=["item_id", "category", "price", "available",
                                                  "title"])
        items = {
            r["item_id"]: ItemInfo(r["item_id"], r["category"], r["price"],
                                   bool(r["available"]), r["title"])
            for r in table.to_pylist()
        }
        with self._write_lock:
            for info in items.values():
                self._code(info.category)
            self._items = items
            self._views = weakref.WeakKeyDictionary()  # rebuilt from the new dict on use
        log.info("catalog loaded", extra={"items": len(items)})
        return len(items)

    def upsert(self, items: Iterable[Mapping[str, Any]]) -> int:
        """Write items to the lake (merge by item_id), then update the in-memory view.

        Each item carries `item_id` and only the fields it sets (`ITEM_FIELDS`): a field
        that is absent keeps its stored value (a new item gets the defaults: available,
        no category, price or title), so `{item_id, available: false}` touches nothing
        but availability.
        """
        items = list(items)
        if not items:
            return 0
        with self._write_lock:
            if self._lake is not None:
                write_items(self._lake, items)
            n = self.apply(items)
        if self.published is not None:  # in the lake by now: peers may apply it
            self.published(items)
        return n

    def apply(self, items: Iterable[Mapping[str, Any]]) -> int:
        """Update the in-memory view only (an upsert already in the lake, e.g. a peer's)."""
        items = list(items)
        with self._write_lock:
            infos = []
            for i in items:
                iid = str(i["item_id"])
                cur = self._items.get(iid) or ItemInfo(iid)
                infos.append(replace(cur, **{k: i[k] for k in ITEM_FIELDS if k in i}))
            for x in infos:  # each assignment is atomic; readers only ever call get()
                self._code(x.category)
                self._items[x.item_id] = x
            for model, view in list(self._views.items()):
                n = len(view)
                for x in infos:
                    r = model.item_row.get(x.item_id)
                    if r is not None and r < n:
                        view.available[r] = x.available
                        view.category[r] = self._code(x.category)
                view.version += 1
        return len(infos)


def write_items(lake: Lake, items: Sequence[Mapping[str, Any]]) -> None:
    """One lake merge per set of fields given: matched rows update just those fields."""
    now = datetime.now(UTC)
    groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for i in items:
        groups.setdefault(tuple(k for k in ITEM_FIELDS if k in i), []).append(i)
    for fields, rows in groups.items():
        table = pa.table({
            "item_id": [str(r["item_id"]) for r in rows],
            **{k: [r.get(k, getattr(UNKNOWN, k)) for r in rows] for k in ITEM_FIELDS},
            "updated_at": [now] * len(rows),
        })
        lake.upsert("items", table, update_columns=[*fields, "updated_at"])
