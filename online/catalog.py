"""The item catalogue the filters read: category, price, availability, title.

Loaded from the lake's `items` table at start-up and kept current by UpsertItems, which
writes the lake first (so a restart sees the same catalogue) and then swaps the entries
in memory. Items the catalogue does not know are treated as available, uncategorised.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from lake.tables import Lake

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ItemInfo:
    item_id: str
    category: str | None = None
    price: float | None = None
    available: bool = True
    title: str | None = None


UNKNOWN = ItemInfo(item_id="")


class Catalog:
    def __init__(self, lake: Lake | None = None) -> None:
        self._lake = lake
        self._items: dict[str, ItemInfo] = {}
        self._write_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, item_id: str) -> ItemInfo:
        return self._items.get(item_id, UNKNOWN)

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
        self._items = items
        log.info("catalog loaded", extra={"items": len(items)})
        return len(items)

    def upsert(self, items: Iterable[Mapping[str, Any]]) -> int:
        """Write items to the lake (merge by item_id), then update the in-memory view."""
        infos = [ItemInfo(str(i["item_id"]), i.get("category"), i.get("price"),
                          bool(i.get("available", True)), i.get("title")) for i in items]
        if not infos:
            return 0
        with self._write_lock:
            if self._lake is not None:
                now = datetime.now(UTC)
                table = pa.table({
                    "item_id": [x.item_id for x in infos],
                    "category": [x.category for x in infos],
                    "price": [x.price for x in infos],
                    "available": [x.available for x in infos],
                    "title": [x.title for x in infos],
                    "updated_at": [now] * len(infos),
                })
                self._lake.upsert("items", table)
            for x in infos:  # each assignment is atomic; readers only ever call get()
                self._items[x.item_id] = x
        return len(infos)
