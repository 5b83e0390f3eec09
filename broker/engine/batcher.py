"""Batching: lookups grouped into GetItems batches of up to 10, and the queue keys take work from.

A :class:`Lookup` is one (marketplace, ASIN, resources) question shared by every caller
who asked it; its callers are *receivers*, called synchronously with the answer (no
future and no loop hop per ASIN). The :class:`Batcher` groups lookups of the same
marketplace and resources into a :class:`Batch`, handing it to the :class:`WorkQueue`
when it is full or its linger time is up. Key dispatchers take batches from the queue;
a batch that must be tried again (after a 429, an expired token, a transient error) goes
back to the head of the queue, so the retry never waits behind new work.

A lookup always knows the batch it waits in, so a lookup every caller gave up on leaves
its batch at once, and an emptied batch leaves the batcher or the queue: abandoned work
holds no memory and is never sent (N11). A caller winding down (``stream(stop=)``) waits for
a lookup only while its request is on the wire: the lookup lists it in ``leaving``, and the
caller lets go of it once the batch comes back (queued again after a 429, or waiting out a
retry delay) instead of waiting for it to be sent again. A batch's attempt state
(:class:`~broker.engine.attempt.Attempts`) travels with it and only the executor edits it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import itertools
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from broker.engine.attempt import Attempts

if TYPE_CHECKING:
    from broker.api.base import Operation
    from broker.clock import Clock
    from broker.models import ItemResult, Query

__all__ = [
    "Batch",
    "BatchPlace",
    "Batcher",
    "Leaving",
    "Lookup",
    "Receiver",
    "Room",
    "WorkQueue",
]

_batch_ids = itertools.count(1)


class Receiver(Protocol):
    """A caller waiting for lookups: told each outcome synchronously, with its own query."""

    def receive(self, lookup: Lookup, query: Query, outcome: ItemResult | BaseException) -> None:
        """``lookup`` (asked as ``query``) ended with ``outcome``."""


class Leaving(Protocol):
    """A caller winding down (a stream told to stop): it waits only for requests on the wire."""

    def let_go(self, lookup: Lookup) -> None:
        """``lookup``'s batch is about to be queued again: stop waiting for it (detach)."""


class Room:
    """A counting gate: at most ``size`` holders; ``take`` waits only when it is full.

    Like ``asyncio.Semaphore``, but taking free room is a plain decrement with no await
    (one per ASIN on the hot path), and waiters are woken first in, first out.
    """

    __slots__ = ("_free", "_waiters")

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def try_take(self) -> bool:
        """Take one unit if one is free now (no await: the hot path)."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    async def take(self) -> None:
        """Take one unit, waiting while there is none."""
        if self.try_take():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # Woken and cancelled in the same turn: the unit was ours; pass it on.
                self.give()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def give(self) -> None:
        """Return one unit, handing it to the oldest waiter if any."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


class BatchPlace(enum.Enum):
    """Where a batch is: what must happen to it when its last lookup is abandoned."""

    #: filling up in the batcher
    LINGERING = "lingering"
    #: in the work queue, waiting for a key
    QUEUED = "queued"
    #: taken by a key, its send not yet counted (the key-state store may be slow to answer):
    #: a caller winding down lets it go as it would a queued one
    BOOKING = "booking"
    #: with the executor, being sent
    ACTIVE = "active"
    #: with the executor, waiting out a retry delay: nothing on the wire, so a caller
    #: winding down lets it go as it would a queued one
    WAITING = "waiting"


@dataclass(slots=True, eq=False)
class Lookup:
    """One question in flight: ``query`` is complete (marketplace and resources filled in).

    ``receivers`` holds each waiting caller with the query it asked (its tag included);
    :meth:`finish` hands every one of them the outcome, each with its own query.
    """

    query: Query
    #: (receiver, the caller's own query) for every caller still waiting
    receivers: list[tuple[Receiver, Query]] = field(default_factory=list)
    #: the batch the lookup waits in (None before it is batched)
    batch: Batch | None = None
    done: bool = False
    #: called once when the lookup ends (with its outcome) or is abandoned (with None):
    #: the intake's bookkeeping
    on_done: Callable[[Lookup, ItemResult | BaseException | None], None] | None = None
    #: callers that wait for this lookup only while its request is on the wire: told to let
    #: go when its batch is queued again (a 429, a retry, a split)
    leaving: list[Leaving] | None = None

    @property
    def asin(self) -> str:
        """The normalised ASIN asked for."""
        return self.query.asin

    @property
    def marketplace(self) -> str:
        """The marketplace asked for, e.g. ``www.amazon.com``."""
        return self.query.marketplace or ""

    @property
    def resources(self) -> tuple[str, ...]:
        """The resources asked for."""
        return self.query.resources or ()

    @property
    def group(self) -> tuple[str, tuple[str, ...]]:
        """Lookups of one group may share a request."""
        query = self.query
        return (query.marketplace or "", query.resources or ())

    def finish(self, outcome: ItemResult | BaseException) -> bool:
        """End the lookup: every receiver gets ``outcome``. False if it had already ended."""
        if self.done:
            return False
        self.done = True
        receivers, self.receivers = self.receivers, []
        self._leave(outcome)
        for receiver, query in receivers:
            if query is self.query or isinstance(outcome, BaseException):
                receiver.receive(self, query, outcome)
            else:
                receiver.receive(self, query, replace(outcome, query=query))
        return True

    def detach(self, receiver: Receiver) -> None:
        """A caller stops waiting; the last one to leave abandons the lookup (never sent)."""
        if self.done:
            return
        self.receivers = [entry for entry in self.receivers if entry[0] is not receiver]
        if not self.receivers:
            self.done = True
            self._leave(None)

    def _leave(self, outcome: ItemResult | BaseException | None) -> None:
        batch, self.batch = self.batch, None
        if batch is not None:
            batch.remove(self)
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done(self, outcome)


@dataclass(slots=True, eq=False, weakref_slot=True)
class Batch:
    """The unit a key sends: up to 10 lookups of one group, or one other operation."""

    marketplace: str
    lookups: list[Lookup] = field(default_factory=list)
    resources: tuple[str, ...] = ()
    #: set for SearchItems / GetVariations / GetBrowseNodes; None for GetItems
    operation: Operation | None = None
    params: Mapping[str, object] | None = None
    op_future: asyncio.Future[Mapping[str, object]] | None = None
    #: the attempt state; only the executor edits it
    attempts: Attempts = field(default_factory=Attempts)
    place: BatchPlace = BatchPlace.ACTIVE
    #: told when the batch's last lookup is abandoned while it lingers or queues
    on_empty: Callable[[Batch], None] | None = None
    batch_id: int = field(default_factory=lambda: next(_batch_ids))

    @classmethod
    def of(cls, lookups: list[Lookup], *, attempts: Attempts | None = None) -> Batch:
        """A GetItems batch of ``lookups`` (one group), each lookup pointed at it."""
        first = lookups[0]
        batch = cls(
            first.marketplace,
            lookups,
            first.resources,
            attempts=attempts if attempts is not None else Attempts(),
        )
        for lookup in lookups:
            lookup.batch = batch
        return batch

    @property
    def asins(self) -> list[str]:
        """The ASINs this batch asks for."""
        return [lookup.query.asin for lookup in self.lookups]

    def add(self, lookup: Lookup) -> None:
        """Add a lookup of this batch's group."""
        self.lookups.append(lookup)
        lookup.batch = self

    def remove(self, lookup: Lookup) -> None:
        """Take an ended or abandoned lookup out; tell the holder if the batch emptied."""
        try:
            self.lookups.remove(lookup)
        except ValueError:
            return
        if not self.lookups and self.on_empty is not None:
            self.on_empty(self)

    def booked(self) -> None:
        """The key counted the batch's send: from here on its callers wait for its answer,
        even when winding down (the send is paid for)."""
        self.place = BatchPlace.ACTIVE

    def fail(self, error: BaseException) -> None:
        """End every open lookup (or the operation) of the batch with ``error``."""
        if self.operation is not None:
            if self.op_future is not None and not self.op_future.done():
                self.op_future.set_exception(error)
            return
        for lookup in list(self.lookups):
            lookup.finish(error)

    def release_leaving(self) -> None:
        """Callers winding down let go of the batch's lookups, which are not on the wire
        (queued again, or waiting out a retry delay); a lookup nobody else waits for leaves
        the batch (an emptied batch leaves the queue)."""
        for lookup in self.lookups:
            if lookup.leaving is not None:
                break
        else:
            return  # the usual case, every queued batch: no copy of the list
        for lookup in list(self.lookups):
            if lookup.leaving is not None:
                leaving, lookup.leaving = lookup.leaving, None
                for caller in leaving:
                    caller.let_go(lookup)

    def live(self) -> bool:
        """True while some caller still waits for an answer."""
        if self.operation is not None:
            return self.op_future is not None and not self.op_future.done()
        return bool(self.lookups)


class WorkQueue:
    """Batches waiting for a key in three lanes, taken in order: retries (the newest
    first), then new operations (searches, in the order made), then new GetItems batches
    (FIFO). A caller's search must not wait out another caller's bulk lookups (up to
    ``queue_size`` of them, minutes at a few TPS), and a retry goes ahead of everything.

    ``take(marketplaces)`` returns the first batch, by that order, for one of the given
    marketplaces (a key serves only the marketplaces it has a partner tag for). A batch
    whose lookups were all abandoned is dropped at once (:meth:`discard`). Its size is
    bounded upstream: the intake admits at most ``queue_size`` outstanding lookups per
    marketplace.
    """

    __slots__ = ("_changed", "_lanes", "_new", "_operations", "_retries")

    def __init__(self) -> None:
        self._retries: collections.deque[Batch] = collections.deque()
        self._operations: collections.deque[Batch] = collections.deque()
        self._new: collections.deque[Batch] = collections.deque()
        # In the order they are taken from.
        self._lanes = (self._retries, self._operations, self._new)
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return sum(len(lane) for lane in self._lanes)

    def _queued(self) -> Iterator[Batch]:
        return itertools.chain.from_iterable(self._lanes)

    def _admit(self, batch: Batch) -> None:
        batch.place = BatchPlace.QUEUED
        batch.on_empty = self.discard
        batch.release_leaving()
        self._changed.set()

    def put(self, batch: Batch) -> None:
        """Queue a new GetItems batch behind the others."""
        self._new.append(batch)
        self._admit(batch)

    def put_front(self, batch: Batch) -> None:
        """Queue a batch to be retried ahead of everything."""
        self._retries.appendleft(batch)
        self._admit(batch)

    def put_ahead(self, batch: Batch) -> None:
        """Queue a new operation (a search) ahead of the GetItems batches, behind the
        retries and the operations queued before it."""
        self._operations.append(batch)
        self._admit(batch)

    def discard(self, batch: Batch) -> None:
        """Drop a queued batch (its last lookup was abandoned)."""
        if batch.place is BatchPlace.QUEUED:
            for lane in self._lanes:
                with contextlib.suppress(ValueError):
                    lane.remove(batch)
                    break
            batch.place = BatchPlace.ACTIVE
            batch.on_empty = None

    def marketplaces(self) -> tuple[str, ...]:
        """The marketplaces queued batches are for, sorted (one pass over the queue)."""
        return tuple(sorted({batch.marketplace for batch in self._queued()}))

    def has_work_for(self, marketplaces: Collection[str]) -> bool:
        """True if a queued batch is for one of ``marketplaces`` (stops at the first)."""
        # Plain loops, not any() over a chained generator: asked twice per send.
        for lane in self._lanes:
            for batch in lane:
                if batch.marketplace in marketplaces:
                    return True
        return False

    def take(self, marketplaces: Collection[str]) -> Batch | None:
        """Remove and return the first live batch for ``marketplaces``, lane by lane."""
        for lane in self._lanes:
            index = 0
            while index < len(lane):
                batch = lane[index]
                if batch.marketplace not in marketplaces:
                    index += 1
                    continue
                del lane[index]
                batch.place = BatchPlace.BOOKING
                batch.on_empty = None
                if batch.live():
                    return batch
        return None

    async def wait_for(self, marketplaces: Callable[[], Collection[str]]) -> None:
        """Wait until a batch one of ``marketplaces()`` can serve is queued (not taking it)."""
        while not self.has_work_for(marketplaces()):
            self._changed.clear()
            await self._changed.wait()

    def wake(self) -> None:
        """Wake waiting getters so they re-read their marketplaces (a key changed state)."""
        self._changed.set()

    def drain(self, marketplace: str | None = None) -> list[Batch]:
        """Remove and return every queued batch (of one marketplace, or all)."""
        taken: list[Batch] = []
        for lane in self._lanes:
            kept: list[Batch] = []
            for batch in lane:
                (taken if marketplace in (None, batch.marketplace) else kept).append(batch)
            lane.clear()
            lane.extend(kept)
        for batch in taken:
            batch.place = BatchPlace.ACTIVE
            batch.on_empty = None
        return taken


class Batcher:
    """Groups lookups into batches of up to ``batch_size``; flushes full or lingering groups.

    ``add`` is synchronous and cheap (no queue hop per ASIN); ``run`` is the one task
    that flushes groups whose linger time is up, sleeping on the injected clock.
    """

    __slots__ = (
        "_batch_size",
        "_clock",
        "_groups",
        "_linger_s",
        "_new_group",
        "_queued",
        "_work",
    )

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
        self._groups: dict[tuple[str, tuple[str, ...]], tuple[float, Batch]] = {}
        # The last partial batch of each group sent to the queue, while it may take more
        # (weakly: a batch sent and answered is not kept alive here).
        self._queued: dict[tuple[str, tuple[str, ...]], weakref.ref[Batch]] = {}
        self._new_group = asyncio.Event()

    def add(self, lookup: Lookup) -> None:
        """Add a lookup to its group; a full group goes to the work queue at once.

        A partial batch of the group that waits in the queue, never sent, takes the lookup
        first: callers asking at once (a web app's requests, each for one ASIN, each
        ending its input at once) share requests instead of sending one each, and so do
        callers that arrive while a batch waits for its key's next slot.
        """
        key = lookup.group
        entry = self._groups.get(key)
        if entry is None:
            if self._top_up(key, lookup):
                return
            batch = Batch.of([lookup])
            if self._batch_size == 1:
                self._work.put(batch)  # no batching asked for: nothing is topped up either
                return
            # A linger of 0 still groups: the lookups added before the flush task's next
            # turn (a caller's whole admission) share the batch, then it goes at once.
            batch.place = BatchPlace.LINGERING
            batch.on_empty = self._dropped
            self._groups[key] = (self._clock.monotonic() + self._linger_s, batch)
            self._new_group.set()
            return
        batch = entry[1]
        batch.add(lookup)
        if len(batch.lookups) >= self._batch_size:
            del self._groups[key]
            self._work.put(batch)

    def _top_up(self, key: tuple[str, tuple[str, ...]], lookup: Lookup) -> bool:
        """Add ``lookup`` to the group's queued partial batch if it may still take it."""
        ref = self._queued.get(key)
        batch = None if ref is None else ref()
        if (
            batch is None
            or batch.place is not BatchPlace.QUEUED
            or not batch.attempts.fresh
            or len(batch.lookups) >= self._batch_size
        ):
            if ref is not None:
                del self._queued[key]
            return False
        batch.add(lookup)
        if len(batch.lookups) >= self._batch_size:
            del self._queued[key]
        return True

    def _send(self, batch: Batch) -> None:
        """Put a batch of the batcher's in the queue; a partial one may still be topped up."""
        self._work.put(batch)
        if len(batch.lookups) < self._batch_size:
            key = (batch.marketplace, batch.resources)
            queued = self._queued

            def forget(ref: weakref.ref[Batch]) -> None:
                # The batch is gone: its entry goes too, unless a newer batch took the key.
                if queued.get(key) is ref:
                    del queued[key]

            queued[key] = weakref.ref(batch, forget)

    def _dropped(self, batch: Batch) -> None:
        """A lingering group lost its last lookup: forget it."""
        key = (batch.marketplace, batch.resources)
        entry = self._groups.get(key)
        if entry is not None and entry[1] is batch:
            del self._groups[key]

    def flush(self) -> None:
        """Send every partial group now (end of input)."""
        groups, self._groups = self._groups, {}
        for _, batch in groups.values():
            self._send(batch)

    def drain(self, marketplace: str) -> list[Batch]:
        """Remove and return the lingering groups of ``marketplace`` (no key serves it)."""
        taken = [batch for _, batch in self._groups.values() if batch.marketplace == marketplace]
        for batch in taken:
            del self._groups[(batch.marketplace, batch.resources)]
            batch.place = BatchPlace.ACTIVE
            batch.on_empty = None
        return taken

    def pending(self, marketplace: str) -> int:
        """Lookups of ``marketplace`` waiting in partial groups."""
        return sum(
            len(batch.lookups)
            for _, batch in self._groups.values()
            if batch.marketplace == marketplace
        )

    async def run(self) -> None:
        """Flush groups as their linger time runs out; runs until cancelled."""
        while True:
            if not self._groups:
                self._new_group.clear()
                await self._new_group.wait()
                continue
            key, (deadline, batch) = next(iter(self._groups.items()))
            wait = deadline - self._clock.monotonic()
            if wait > 0:
                await self._clock.sleep(wait)
                continue
            # Read again after each sleep (the group may have filled and gone, a younger
            # one in its place), so the first group here is due now: send it.
            del self._groups[key]
            self._send(batch)
