"""Per-lookup access to an item cache for the engine, batched underneath.

The engine admits lookups one at a time; the stores want lists. :class:`CacheFront` turns
the gets made in one event-loop tick into one ``get_many`` and writes answers behind the
pipeline in batches (``put_many``), so a lookup pays a future, not a thread hop or a round
trip of its own. A failing store (a damaged or locked file, a full disk, Redis down) never
fails a lookup: a read becomes a miss and a write is dropped. After a failure the store is
left alone for a minute, with one warning naming it and the remedy, so a damaged file costs
one warning and a locked one one wait, not one per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from broker.cache.base import key_of
from broker.clock import LoopClock
from broker.errors import BrokerClosedError, BrokerError
from broker.logs import get_logger
from broker.models import Status
from broker.redisfaults import cancel_kept

if TYPE_CHECKING:
    from broker.cache.base import ItemCache
    from broker.cache.policy import CacheKey, CacheStats
    from broker.clock import Clock
    from broker.models import ItemResult, Query

__all__ = ["CacheFront"]

_log = get_logger("broker.cache")

#: Answers waiting to be written at most; beyond it new answers are not cached (counted).
_MAX_PENDING_WRITES: Final = 50_000
#: The answers :meth:`CacheFront.put` hands to the store: kept, or deleting the key's entry.
_WRITTEN: Final = frozenset({Status.OK, Status.NOT_FOUND})
#: Seconds a failed store is left alone: reads are misses and writes dropped meanwhile.
COOL_OFF_S: Final = 60.0


class CacheFront:
    """Coalesced reads and write-behind over an :class:`~broker.cache.base.ItemCache`.

    Args:
        cache: the store; closed by :meth:`aclose`.
        max_age_s: a per-run override of the policy's max age (``--max-age``), or None.
        read: False to serve nothing (every get a miss) and still write every answer: a
            refresh, whose fresh answers later lookups should get.
        clock: the monotonic clock of the cool-off after a failure.
        read_batch: the most keys one ``get_many`` carries.
        write_batch: the most answers one ``put_many`` carries.
    """

    def __init__(
        self,
        cache: ItemCache,
        *,
        max_age_s: float | None = None,
        read: bool = True,
        clock: Clock | None = None,
        read_batch: int = 1_000,
        write_batch: int = 1_000,
    ) -> None:
        self.cache = cache
        self._clock: Clock = clock or LoopClock()
        self._down_until = -math.inf
        # The failure the warning told, and whether writes or reads failed, while the store
        # stays out (said again at debug level).
        self._outage: tuple[str, bool] | None = None
        self._max_age_s = max_age_s
        self._serves = read
        self._read_batch = read_batch
        self._write_batch = write_batch
        self._reads: list[tuple[Query, asyncio.Future[ItemResult | None]]] = []
        # Answers read ahead by prefetch(), taken by the get()s of the same keys until the
        # caller discards them.
        self._ahead: dict[CacheKey, ItemResult | None] = {}
        self._read_scheduled = False
        self._writes: list[ItemResult] = []
        self._writer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        #: answers not cached because the write queue was full or the store failed
        self.dropped_writes = 0
        #: reads answered as misses because the store failed
        self.failed_reads = 0

    async def prefetch(self, queries: Sequence[Query]) -> None:
        """Read ``queries`` in one batch now, so their :meth:`get` returns without waiting.

        For a caller that knows its whole input (``get_items``): each lookup's own
        ``get`` then neither suspends nor delays the batcher's linger timer.
        """
        if self._closed or not self._serves or not queries or self._down():
            return  # while the store is left alone, each get() is a counted miss
        try:
            # Uncounted: each get() counts its own lookup, served or not (an answer read
            # now may be too old by the time it is asked). In the caller's own task: a
            # cancel (its timeout) that redis-py lost is raised.
            with cancel_kept():
                results = await self.cache.get_many(queries, max_age_s=self._max_age_s, count=False)
        except Exception as exc:
            self._failed(exc, writing=False)
            return  # the store is left alone now: each get() is a counted miss
        self._worked(writing=False)
        for query, result in zip(queries, results, strict=True):
            self._ahead[key_of(query)] = result

    def discard(self, queries: Sequence[Query]) -> None:
        """Forget the answers read ahead for ``queries`` (the caller is done with them)."""
        for query in queries:
            self._ahead.pop(key_of(query), None)

    def fresh(self, result: ItemResult) -> bool:
        """True while ``result``, served by this cache, may still be handed on (its age
        checked again now, against this run's limit)."""
        return self.cache.is_fresh(result, max_age_s=self._max_age_s)

    async def get(self, query: Query) -> ItemResult | None:
        """The cached answer for a complete ``query`` (``cached=True``), or None."""
        if self._closed or not self._serves:
            return None
        if self._ahead:
            key = key_of(query)
            if key in self._ahead:
                # Left for another get of the same key in the chunk (two tags, a repeated
                # row), each get counted as its own lookup; discard() forgets it.
                ahead = self._ahead[key]
                # Read ahead maybe long ago (the caller waited for capacity, or for a daily
                # reset): still fresh? If not, a miss, and gone for the other gets of its key.
                if ahead is not None and not self.cache.is_fresh(ahead, max_age_s=self._max_age_s):
                    self._ahead[key] = ahead = None
                self.cache.tally(hit=ahead is not None)
                return None if ahead is None else dataclasses.replace(ahead, query=query)
        if self._down():
            self.failed_reads += 1
            return None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ItemResult | None] = loop.create_future()
        self._reads.append((query, future))
        if not self._read_scheduled:
            self._read_scheduled = True
            # After the other callbacks of this tick: their gets join the same batch.
            loop.call_soon(self._start_read)
        return await future

    def _start_read(self) -> None:
        self._read_scheduled = False
        while self._reads:
            batch, self._reads = self._reads[: self._read_batch], self._reads[self._read_batch :]
            task = asyncio.get_running_loop().create_task(
                self._read(batch), context=contextvars.Context()
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _read(self, batch: list[tuple[Query, asyncio.Future[ItemResult | None]]]) -> None:
        results: Sequence[ItemResult | None] = [None] * len(batch)
        if self._down():
            self.failed_reads += len(batch)
        else:
            try:
                results = await self.cache.get_many(
                    [query for query, _ in batch], max_age_s=self._max_age_s
                )
            except Exception as exc:
                self.failed_reads += len(batch)
                self._failed(exc, writing=False)
            else:
                self._worked(writing=False)
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    def put(self, result: ItemResult) -> None:
        """Queue an answer for the store: an ``ok`` one is kept, a ``not_found`` one deletes
        what is kept for its key (answers served from the cache are left alone)."""
        if self._closed or result.cached or result.status not in _WRITTEN:
            return
        if len(self._writes) >= _MAX_PENDING_WRITES:
            self.dropped_writes += 1
            return
        self._writes.append(result)
        if self._writer is None or self._writer.done():
            # In a context of its own: started from a send, it would log its
            # cache.unavailable with that send's key and batch_id bound.
            self._writer = asyncio.get_running_loop().create_task(
                self._write(), context=contextvars.Context()
            )

    async def _write(self) -> None:
        while self._writes:
            batch = self._writes[: self._write_batch]
            del self._writes[: self._write_batch]
            if self._down():
                self.dropped_writes += len(batch)
                continue
            try:
                await self.cache.put_many(batch)
            except Exception as exc:
                self.dropped_writes += len(batch)
                self._failed(exc, writing=True)
            else:
                self._worked(writing=True)

    def _down(self) -> bool:
        """True while a failed store is left alone."""
        return self._clock.monotonic() < self._down_until

    def _failed(self, error: Exception, *, writing: bool) -> None:
        """The store failed: leave it alone a while, warning once per outage (naming it and
        the remedy; the same failure again after each cool-off is said at debug level, or a
        day-long Redis outage made 1,440 warnings a process)."""
        if self._down():
            return  # begun before the failure that started this cool-off: already told
        self._down_until = self._clock.monotonic() + COOL_OFF_S
        message = self.cache.describe_failure(error)
        told = self._outage
        say = _log.debug if told is not None and told[0] == message else _log.warning
        self._outage = (message, writing)
        say(
            "cache.unavailable",
            error=type(error).__name__,
            message=f"{message}; lookups go on without it meanwhile",
            retry_in_s=COOL_OFF_S,
        )

    def _worked(self, *, writing: bool) -> None:
        """The store answered: an outage warned of is over, and said so; only when what
        failed works (reads of a full disk's file work while its writes fail)."""
        if self._outage is not None and self._outage[1] == writing:
            self._outage = None
            _log.info("cache.restored", note="the item cache answers again")

    async def flush(self) -> None:
        """Wait until every queued answer is stored (or dropped)."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)
        if self._writes:
            self._writer = asyncio.get_running_loop().create_task(
                self._write(), context=contextvars.Context()
            )
            await self._writer

    async def stats(self) -> CacheStats:
        """The store's stats (hits, misses, requests saved, entries, bytes, evictions), the
        lookups a failing store could not answer counted among the misses.

        Raises:
            BrokerError: the store failed and is left alone meanwhile (asked, a hung Redis
                held every /metrics scrape for its 5-s timeout).
            BrokerClosedError: the cache is closed (no store failure: nothing is logged).
        """
        if self._closed:
            raise BrokerClosedError("the item cache is closed with its broker")
        if self._down() and self._outage is not None and not self._outage[1]:
            # Left alone for a failed read (writes alone failing, as on a full disk, leave
            # the reads and the stats working).
            raise BrokerError(f"the item cache is left alone after a failure: {self._outage[0]}")
        try:
            stats = await self.cache.stats()
        except Exception as exc:
            # A failing stats starts the cool-off too: an idle daemon's scrapes asked a hung
            # Redis each time.
            self._failed(exc, writing=False)
            raise
        # An idle daemon's scrapes may be all that touch the cache: an outage they saw ends
        # here (else the next one was told at debug level, as the same outage).
        self._worked(writing=False)
        return dataclasses.replace(stats, misses=stats.misses + self.failed_reads)

    async def aclose(self) -> None:
        """Write what is queued, finish pending reads, close the store; idempotent."""
        if self._closed:
            return
        with contextlib.suppress(Exception):
            await self.flush()
        self._closed = True
        self._ahead.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.cache.aclose()
