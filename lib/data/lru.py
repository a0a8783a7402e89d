"""LRU: a small least-recently-used cache (volumes, supervoxel maps, feature volumes kept between uses)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable


class LRU:
    """`get(key, make)`: the value kept for `key` (marked as just used), else make()'s, kept; at most
    `size` values stay (the least recently used go first; None: no limit)."""

    def __init__(self, size: int | None):
        self.size = size
        self._items: OrderedDict = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable, make: Callable[[], object]):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        self._items[key] = value
        while self.size is not None and len(self._items) > self.size:
            self._items.popitem(last=False)
        return value
