"""The item cache in process memory: for tests, and for a library user with no state dir."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from broker.cache.base import StoreCache
from broker.cache.policy import FUTURE_S

if TYPE_CHECKING:
    from broker.cache.entry import Entry
    from broker.cache.policy import CacheKey, CachePolicy
    from broker.clock import Clock

__all__ = ["MemoryCache"]

#: How often a store scans every entry for answers expired out of store order, or stamped
#: ahead of the clock (seconds of the cache's clock).
_SWEEP_EVERY_S: Final = 60.0


class MemoryCache(StoreCache):
    """Entries in a dict kept in store order, so the oldest answers are evicted first.

    Answers are stored as they arrive from Amazon, so store order is ``fetched_at``
    order; a re-stored key moves to the end. A store drops the expired answers at the front;
    the rest (one stored out of order, one stamped ahead of the clock) at most once a minute
    (reads never serve them meanwhile): a scan of every entry at each store, 16 ms at
    100,000, cut the broker's rate to a quarter once the cache filled.
    """

    def __init__(
        self,
        policy: CachePolicy,
        *,
        namespace: str = "creators",
        clock: Clock | None = None,
        batch_size: int = 10,
    ) -> None:
        super().__init__(policy, namespace=namespace, clock=clock, batch_size=batch_size)
        self._entries: dict[CacheKey, Entry] = {}
        self._bytes = 0
        # The keys of each (marketplace, ASIN): Amazon's not_found drops every resource set.
        self._by_item: dict[tuple[str, str], set[CacheKey]] = {}
        self._swept_at = -math.inf

    async def _load(self, keys: Sequence[CacheKey]) -> dict[CacheKey, Entry]:
        return {key: self._entries[key] for key in keys if key in self._entries}

    async def _store(self, entries: Sequence[Entry], *, expire_before: float) -> int:
        ahead = self._now() + FUTURE_S
        for entry in entries:
            held = self._entries.get(entry.key)
            if held is not None and entry.fetched_at < held.fetched_at <= ahead:
                continue  # a late writer's older answer never replaces a newer one
            self._drop(entry.key)
            self._entries[entry.key] = entry
            self._bytes += entry.size
            self._by_item.setdefault((entry.key.marketplace, entry.key.asin), set()).add(entry.key)

        def kept(entry: Entry) -> bool:
            return expire_before <= entry.fetched_at <= ahead

        while self._entries:
            oldest = next(iter(self._entries.values()))
            if kept(oldest):
                break
            self._drop(oldest.key)
        now = self._now()
        # Also at once when the clock was set back since the last sweep.
        if not 0 <= now - self._swept_at < _SWEEP_EVERY_S:
            self._swept_at = now
            for key in [key for key, entry in self._entries.items() if not kept(entry)]:
                self._drop(key)
        evicted = 0
        max_bytes = self.policy.max_bytes
        while len(self._entries) > self.policy.max_items or (max_bytes and self._bytes > max_bytes):
            self._drop(next(iter(self._entries)))
            evicted += 1
        return evicted

    def _drop(self, key: CacheKey) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._bytes -= entry.size
        item = (key.marketplace, key.asin)
        keys = self._by_item.get(item)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_item[item]
        return True

    async def _delete(
        self,
        keys: Sequence[CacheKey] | None,
        *,
        fetched_before: float | None,
        asins: Sequence[str] | None,
        every_resource_set: bool = False,
    ) -> int:
        if keys is not None and every_resource_set:
            items = {(key.marketplace, key.asin) for key in keys}
            keys = [key for item in items for key in self._by_item.get(item, ())]
        if keys is None:
            wanted = set(asins) if asins is not None else None
            keys = [
                key
                for key, entry in self._entries.items()
                if (fetched_before is None or entry.fetched_at < fetched_before)
                and (wanted is None or key.asin in wanted)
            ]
        return sum(self._drop(key) for key in keys)

    async def _measure(self) -> tuple[int, int, float | None]:
        oldest = min((e.fetched_at for e in self._entries.values()), default=None)
        return len(self._entries), self._bytes, oldest

    async def aclose(self) -> None:
        """Nothing to release."""

    def __repr__(self) -> str:
        return f"MemoryCache(entries={len(self._entries)}, max_age_s={self.policy.max_age_s:g})"
