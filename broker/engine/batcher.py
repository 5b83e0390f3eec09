"""Batching: lookups grouped into GetItems batches of up to 10, and the queue keys take work from.

A :class:`Lookup` is one (marketplace, ASIN, resources) question with the future its
callers await. The :class:`Batcher` groups lookups of the same marketplace and resources,
flushing a group when it is full or when its linger time is up, into the
:class:`WorkQueue`. Key dispatchers take batches from the work queue; a batch that must
be tried again (after a 429, an expired token, a transient error) goes back to the head
of the queue, so the retry never waits behind new work.

Lookups and batches are mutable records on purpose: they carry an ASIN's attempt count
and last error through its retries inside the executor, and are never shared outside it.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.api.base import Operation
    from broker.clock import Clock
    from broker.models import ItemResult

__all__ = ["Batch", "Batcher", "Lookup", "WorkQueue"]

_batch_ids = itertools.count(1)


@dataclass(slots=True, eq=False)
class Lookup:
    """One ASIN question in flight, shared by every caller who asked it."""

    marketplace: str
    asin: str
    resources: tuple[str, ...]
    future: asyncio.Future[ItemResult]
    attempts: int = 0
    first_sent_at: float | None = None
    #: the last transient error, reported if every attempt fails
    last_error: BaseException | None = None
    #: times the response did not mention this ASIN
    missing: int = 0
    #: attempts answered with 429; they never count toward failing the lookup
    throttles: int = 0
    #: callers still waiting for the answer; the last one to give up cancels the lookup
    waiters: int = 1

    @property
    def group(self) -> tuple[str, tuple[str, ...]]:
        """Lookups of one group may share a request."""
        return (self.marketplace, self.resources)


@dataclass(slots=True, eq=False)
class Batch:
    """The unit a key sends: up to 10 lookups of one group, or one other operation."""

    marketplace: str
    lookups: list[Lookup] = field(default_factory=list)
    #: set for SearchItems / GetVariations / GetBrowseNodes; None for GetItems
    operation: Operation | None = None
    params: Mapping[str, object] | None = None
    op_future: asyncio.Future[Mapping[str, object]] | None = None
    op_attempts: int = 0
    op_throttles: int = 0
    op_first_sent_at: float | None = None
    #: token refreshes or re-signings spent on this batch (bounded to avoid a loop)
    auth_retries: int = 0
    batch_id: int = field(default_factory=lambda: next(_batch_ids))

    @property
    def asins(self) -> list[str]:
        """The ASINs this batch asks for."""
        return [lookup.asin for lookup in self.lookups]

    @property
    def resources(self) -> tuple[str, ...]:
        """The resources of this batch's group."""
        return self.lookups[0].resources if self.lookups else ()

    def live(self) -> bool:
        """True while some caller still waits for an answer."""
        if self.operation is not None:
            return self.op_future is not None and not self.op_future.done()
        return any(not lookup.future.done() for lookup in self.lookups)


class WorkQueue:
    """Batches waiting for a key, FIFO, with a head lane for retries.

    ``get(marketplaces)`` returns the oldest batch for one of the given marketplaces
    (a key serves only the marketplaces it has a partner tag for). Its size is bounded
    upstream: the broker admits at most ``queue_size`` outstanding lookups.
    """

    __slots__ = ("_batches", "_changed")

    def __init__(self) -> None:
        self._batches: collections.deque[Batch] = collections.deque()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._batches)

    def put(self, batch: Batch) -> None:
        """Queue a new batch behind the others."""
        self._batches.append(batch)
        self._changed.set()

    def put_front(self, batch: Batch) -> None:
        """Queue a batch to be retried ahead of new work."""
        self._batches.appendleft(batch)
        self._changed.set()

    def has_work_for(self, marketplaces: Collection[str]) -> bool:
        """True if a queued batch is for one of ``marketplaces`` (stops at the first)."""
        return any(b.marketplace in marketplaces for b in self._batches)

    def take(self, marketplaces: Collection[str]) -> Batch | None:
        """Remove and return the oldest live batch for ``marketplaces``; drop dead ones met."""
        index = 0
        while index < len(self._batches):
            batch = self._batches[index]
            if batch.marketplace not in marketplaces:
                index += 1
                continue
            del self._batches[index]
            if batch.live():
                return batch
        return None

    async def get(self, marketplaces: Callable[[], Collection[str]]) -> Batch:
        """Wait for a batch one of ``marketplaces()`` can serve (re-read on every change)."""
        while True:
            batch = self.take(marketplaces())
            if batch is not None:
                return batch
            self._changed.clear()
            await self._changed.wait()

    def wake(self) -> None:
        """Wake waiting getters so they re-read their marketplaces (a key changed state)."""
        self._changed.set()

    def drain(self, marketplace: str | None = None) -> list[Batch]:
        """Remove and return every queued batch (of one marketplace, or all)."""
        kept: collections.deque[Batch] = collections.deque()
        taken: list[Batch] = []
        for batch in self._batches:
            (taken if marketplace in (None, batch.marketplace) else kept).append(batch)
        self._batches = kept
        return taken


class Batcher:
    """Groups lookups into batches of up to ``batch_size``; flushes full or lingering groups.

    ``add`` is synchronous and cheap (no queue hop per ASIN); ``run`` is the one task
    that flushes groups whose linger time is up, sleeping on the injected clock.
    """

    __slots__ = ("_batch_size", "_clock", "_groups", "_linger_s", "_new_group", "_work")

    def __init__(
        self, work: WorkQueue, *, clock: Clock, batch_size: int = 10, linger_s: float = 0.05
    ) -> None:
        if not 1 <= batch_size <= 10:
            raise ValueError("batch_size must be between 1 and 10")
        self._work = work
        self._clock = clock
        self._batch_size = batch_size
        self._linger_s = linger_s
        # Insertion order = age order, so the first group is always the next to expire.
        self._groups: dict[tuple[str, tuple[str, ...]], tuple[float, list[Lookup]]] = {}
        self._new_group = asyncio.Event()

    def add(self, lookup: Lookup) -> None:
        """Add a lookup to its group; a full group goes to the work queue at once."""
        key = lookup.group
        entry = self._groups.get(key)
        if entry is None:
            if self._batch_size == 1 or self._linger_s <= 0:
                self._work.put(Batch(lookup.marketplace, [lookup]))
                return
            self._groups[key] = (self._clock.monotonic() + self._linger_s, [lookup])
            self._new_group.set()
            return
        entry[1].append(lookup)
        if len(entry[1]) >= self._batch_size:
            del self._groups[key]
            self._work.put(Batch(lookup.marketplace, entry[1]))

    def flush(self) -> None:
        """Send every partial group now (end of input)."""
        groups, self._groups = self._groups, {}
        for (marketplace, _), (_, lookups) in groups.items():
            self._work.put(Batch(marketplace, lookups))

    def pending(self) -> int:
        """Lookups waiting in partial groups."""
        return sum(len(lookups) for _, lookups in self._groups.values())

    async def run(self) -> None:
        """Flush groups as their linger time runs out; runs until cancelled."""
        while True:
            if not self._groups:
                self._new_group.clear()
                await self._new_group.wait()
                continue
            key, (deadline, lookups) = next(iter(self._groups.items()))
            wait = deadline - self._clock.monotonic()
            if wait > 0:
                await self._clock.sleep(wait)
                continue
            current = self._groups.get(key)
            # The group may have filled and been replaced by a younger one meanwhile.
            if current is not None and current[0] == deadline:
                del self._groups[key]
                self._work.put(Batch(key[0], lookups))
