"""The item cache interface, and the freshness and counting logic every home shares.

A home (memory, SQLite, Redis) only loads, stores and deletes :class:`~broker.cache.entry.Entry`
values; :class:`StoreCache` decides what is fresh for the resources asked, rebuilds
results, drops corrupt entries, and counts hits, misses and evictions.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import ClassVar, Protocol, Self

from broker.cache.entry import CorruptEntry, Entry, decode, encode
from broker.cache.policy import CEILING_S, CacheKey, CachePolicy, CacheStats, check_max_age
from broker.clock import Clock, LoopClock
from broker.logs import get_logger
from broker.models import ItemResult, Query, Status

__all__ = ["ItemCache", "StoreCache", "key_of"]

_log = get_logger("broker.cache")


def key_of(query: Query) -> CacheKey:
    """The cache key of a complete query (marketplace and resources filled in).

    Raises:
        ValueError: the query's marketplace or resources are still None (the broker fills
            them from the config before asking the cache).
    """
    if query.marketplace is None or query.resources is None:
        raise ValueError("the cache needs a complete query: marketplace and resources set")
    return CacheKey.of(query.marketplace, query.asin, query.resources)


def _key_of_result(result: ItemResult) -> CacheKey:
    """The key of a result carrying its complete query."""
    assert result.query is not None
    assert result.query.resources is not None
    return CacheKey.of(
        result.query.marketplace or result.marketplace, result.asin, result.query.resources
    )


class ItemCache(Protocol):
    """Protocol: a per-item cache of successful answers, within Amazon's 24-hour rule.

    Every method is a coroutine and takes whole lists, so a caller pays one round trip
    (or one thread hop) per batch of lookups, not per ASIN.
    """

    policy: CachePolicy

    async def get_many(
        self, queries: Sequence[Query], *, max_age_s: float | None = None, count: bool = True
    ) -> list[ItemResult | None]:
        """Return, aligned with ``queries``, a cached result (``cached=True``) or None;
        ``count``: as hits and misses (else the caller counts them, :meth:`tally`)."""
        ...

    async def put_many(self, results: Iterable[ItemResult]) -> int:
        """Store the ``ok`` results among ``results``; return how many were stored."""
        ...

    def is_fresh(self, result: ItemResult, *, max_age_s: float | None = None) -> bool:
        """True while a cached ``result`` may still be served (its age checked again now)."""
        ...

    def tally(self, *, hit: bool) -> None:
        """Count one lookup read uncounted (``get_many(count=False)``) as a hit or a miss."""
        ...

    async def purge(
        self, *, older_than_s: float | None = None, asins: Iterable[str] | None = None
    ) -> int:
        """Delete entries (all, those older than ``older_than_s``, or of ``asins``)."""
        ...

    async def stats(self) -> CacheStats:
        """Return the counters and what the store holds now."""
        ...

    async def aclose(self) -> None:
        """Release the store (connections, threads); idempotent."""
        ...

    def describe_failure(self, error: BaseException) -> str:
        """One line for ``error`` of the store: where it is, what failed, what to do."""
        ...


class StoreCache(abc.ABC):
    """An :class:`ItemCache` over a storage home that subclasses provide.

    Args:
        policy: max ages and size bound.
        namespace: whose answers these are, kept apart from every other source's: the
            broker passes :func:`broker.cache.open.cache_namespace` (protocol, endpoint and
            the keys' partner tags).
        clock: wall time for ages (``utcnow``); entries are shared across processes, so
            only wall time makes sense.
        batch_size: ASINs per GetItems request, to count requests saved.
    """

    #: What a failing home raises (damaged, unwritable, out of reach): the command line
    #: reports these as one line instead of a traceback.
    failures: ClassVar[tuple[type[Exception], ...]] = (OSError,)
    #: True for a home that deletes answers past the 24-hour ceiling by itself (Redis TTLs);
    #: the others are swept here (:meth:`_expire`).
    expires_itself: ClassVar[bool] = False

    def __init__(
        self,
        policy: CachePolicy,
        *,
        namespace: str = "creators",
        clock: Clock | None = None,
        batch_size: int = 10,
    ) -> None:
        self.policy = policy
        self.namespace = namespace
        self._clock: Clock = clock or LoopClock()
        self._batch_size = batch_size
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._swept = False

    @property
    def where(self) -> str:
        """Where the answers are kept, for ``broker cache stats`` and messages."""
        return "this process"

    def describe_failure(self, error: BaseException) -> str:
        """One line for ``error`` of the store: where it is, what failed, what to do."""
        where, remedy = self._failure_advice(error)
        failed = f"{type(error).__name__}: {error}"
        return f"the item cache ({where}) cannot be used ({failed})" + (
            f"; {remedy}" if remedy else ""
        )

    def wrong_config(self, error: BaseException) -> bool:
        """True when ``error`` (one of :attr:`failures`) is the config's to mend (a
        password refused), not the store out of order."""
        return False

    def _failure_advice(self, error: BaseException) -> tuple[str, str]:
        """Where the home is, and what to do when it fails with ``error`` ("" when the
        error says it)."""
        return type(self).__name__, "see the error"

    # -- the home: subclasses implement these ------------------------------------------

    @abc.abstractmethod
    async def _load(self, keys: Sequence[CacheKey]) -> dict[CacheKey, Entry]:
        """Return the stored entries among ``keys`` (absent keys left out)."""

    @abc.abstractmethod
    async def _store(self, entries: Sequence[Entry], *, expire_before: float) -> int:
        """Store ``entries`` atomically, drop entries fetched before ``expire_before``, keep
        the size bound by evicting the oldest; return how many were evicted.

        A store whose writers share this machine's clock (memory, SQLite) also drops entries
        stamped more than ``FUTURE_S`` ahead of now: written while the clock ran ahead, they
        would otherwise be served up to a day past the moment Amazon sent them. Redis's
        own TTL, in real seconds from the write, bounds them there.
        """

    @abc.abstractmethod
    async def _delete(
        self,
        keys: Sequence[CacheKey] | None,
        *,
        fetched_before: float | None,
        asins: Sequence[str] | None,
        every_resource_set: bool = False,
    ) -> int:
        """Delete the given keys, or entries matching the filters (all when none).

        ``every_resource_set``: each key stands for its (marketplace, ASIN), and every
        answer kept for it goes, whatever its resources (an item Amazon no longer has).
        """

    @abc.abstractmethod
    async def _measure(self) -> tuple[int, int, float | None]:
        """Return (entries, payload bytes, oldest fetched_at) of what the home holds."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the home; idempotent."""

    # -- the shared logic ---------------------------------------------------------------

    def _now(self) -> float:
        return self._clock.utcnow().timestamp()

    async def get_many(
        self, queries: Sequence[Query], *, max_age_s: float | None = None, count: bool = True
    ) -> list[ItemResult | None]:
        """Return, aligned with ``queries``, a cached result or None for each; ``count``:
        as hits and misses (else the caller counts each one it serves or not, :meth:`tally`).

        A result is served when the store holds an answer for the same marketplace, ASIN
        and resource set that is fresh enough: younger than ``max_age_s`` (default: the
        policy's) and, when the resources include offers, than ``offers_max_age_s``.
        Served results have ``cached=True``, ``attempts=0``, their original ``fetched_at``
        and the caller's query (with its tag).

        Raises:
            ValueError: a query lacks its marketplace or resources.
            ConfigError: ``max_age_s`` is above the 86,400 s ceiling.
        """
        if max_age_s is not None:
            check_max_age(max_age_s, "max_age_s")
        keys = [key_of(query) for query in queries]
        if not keys:
            return []
        if not self._swept:
            # Answers left past the ceiling by processes that since stopped (a machine idle
            # over a weekend) go at the first read, not at the next write.
            self._swept = True
            if not self.expires_itself:
                # A read first: with nothing expired, no write lock is waited for.
                _, _, oldest = await self._measure()
                await self._expire_if_due(oldest)
        if not (self.policy.enabled or (max_age_s or 0) > 0):
            if count:
                self._misses += len(keys)
            return [None] * len(keys)
        entries = await self._load(list(dict.fromkeys(keys)))
        now = self._now()
        out: list[ItemResult | None] = []
        corrupt: list[Entry] = []
        for query, key in zip(queries, keys, strict=True):
            entry = entries.get(key)
            result = None
            if entry is not None and self.policy.fresh(key, now - entry.fetched_at, max_age_s):
                try:
                    result = decode(entry, query)
                except CorruptEntry:
                    _log.warning("cache.corrupt_entry", marketplace=key.marketplace, asin=key.asin)
                    corrupt.append(entry)
                    entries.pop(key)
            out.append(result)
        if count:
            hits = sum(1 for result in out if result is not None)
            self._hits += hits
            self._misses += len(out) - hits
        if corrupt:
            await self._drop_corrupt(corrupt)
        return out

    async def _drop_corrupt(self, entries: Sequence[Entry]) -> None:
        """Delete damaged entries, best effort: the read they were found in stands whatever
        happens here (a lock held too long, a read-only file), each a miss of its own."""
        try:
            await self._delete_unchanged(entries)
        except self.failures as exc:
            _log.warning("cache.corrupt_entry_kept", entries=len(entries), error=str(exc))

    async def _delete_unchanged(self, entries: Sequence[Entry]) -> None:
        """Delete each of ``entries`` whose key still holds it as it was read.

        Not by key alone: another process may have stored a good answer for the key since
        the damaged one was read. A home other processes share overrides this; here the
        key's entry is deleted whatever it holds (no one else writes to it).
        """
        await self._delete([entry.key for entry in entries], fetched_before=None, asins=None)

    def tally(self, *, hit: bool) -> None:
        """Count one lookup read uncounted (``get_many(count=False)``) as a hit or a miss,
        when the caller serves it or not: an answer read ahead may age past its limit before
        it is asked (the counters only ever grow, as Prometheus counters must)."""
        if hit:
            self._hits += 1
        else:
            self._misses += 1

    def is_fresh(self, result: ItemResult, *, max_age_s: float | None = None) -> bool:
        """True while a cached ``result`` may still be served, by the policy, now.

        A result read ahead and held (``CacheFront.prefetch``) is checked again before
        it is served, so a long wait never stretches the 24-hour rule.
        """
        if result.fetched_at is None or result.query is None:
            return False
        key = key_of(result.query)
        return self.policy.fresh(key, self._now() - result.fetched_at.timestamp(), max_age_s)

    async def put_many(self, results: Iterable[ItemResult]) -> int:
        """Store the ``ok`` answers among ``results``; return how many were stored.

        not_found, invalid and failed results are never stored, nor results that were
        themselves served from the cache (that would restart their age). A ``not_found``
        answer from Amazon deletes what is stored for its key: the item is gone, and its
        older ``ok`` answer must not be served again.

        Raises:
            ValueError: an ``ok`` result without a complete ``query`` (its resource set is
                unknown, so it cannot be keyed).
        """
        entries: dict[CacheKey, Entry] = {}
        # The item is gone, not one resource set of it: every answer kept for its
        # (marketplace, ASIN) goes, whatever resources each was asked with.
        gone: dict[tuple[str, str], CacheKey] = {}
        for result in results:
            if result.cached or result.fetched_at is None:
                continue
            if result.status is Status.NOT_FOUND:
                if result.query is not None and result.query.resources is not None:
                    key = _key_of_result(result)
                    item = (key.marketplace, key.asin)
                    gone[item] = key
                    # The later answer wins, as between batches.
                    for held in [k for k in entries if (k.marketplace, k.asin) == item]:
                        del entries[held]
                continue
            if result.status is not Status.OK:
                continue
            if result.query is None or result.query.resources is None:
                raise ValueError(
                    f"cannot cache {result.asin}: the result carries no complete query "
                    "(marketplace and resources)"
                )
            key = _key_of_result(result)
            gone.pop((key.marketplace, key.asin), None)
            entries[key] = encode(key, result)
        if gone:
            await self._delete(
                list(gone.values()), fetched_before=None, asins=None, every_resource_set=True
            )
        if not entries:
            return 0
        evicted = await self._store(list(entries.values()), expire_before=self._now() - CEILING_S)
        if evicted:
            self._evictions += evicted
            # A cache at its cap evicts on every write: counted (stats, metrics), not news.
            _log.debug("cache.evicted", entries=evicted)
        return len(entries)

    async def purge(
        self, *, older_than_s: float | None = None, asins: Iterable[str] | None = None
    ) -> int:
        """Delete entries; return how many went.

        Args:
            older_than_s: only entries fetched longer ago than this.
            asins: only entries of these ASINs (any marketplace and resources).
        With neither, everything in this namespace goes.
        """
        before = None if older_than_s is None else self._now() - older_than_s
        wanted = None if asins is None else sorted({a.strip().upper() for a in asins})
        removed = await self._delete(None, fetched_before=before, asins=wanted)
        _log.info("cache.purged", entries=removed)
        return removed

    async def stats(self) -> CacheStats:
        """Return this object's counters and what the home holds now (answers past the
        24-hour ceiling are deleted first, so none is counted)."""
        entries, size, oldest = await self._measure()
        if await self._expire_if_due(oldest):
            entries, size, oldest = await self._measure()
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            requests_saved=self._hits // self._batch_size,
            entries=entries,
            bytes=size,
            evictions=self._evictions,
            oldest_age_s=None if oldest is None else max(0.0, self._now() - oldest),
        )

    async def _expire_if_due(self, oldest: float | None) -> bool:
        """Delete this namespace's answers past the 24-hour ceiling (Amazon's rule) when the
        oldest answer (``oldest``, its fetch time; None: none) is past it; True if it was."""
        if self.expires_itself or oldest is None or self._now() - oldest <= CEILING_S:
            return False
        try:
            removed = await self._delete(None, fetched_before=self._now() - CEILING_S, asins=None)
        except self.failures as exc:
            # Best effort, as for damaged entries: a file this process may only read keeps
            # them (never served: every read checks the age), and its reads and `broker
            # cache stats` go on, counting them, where both failed (exit 74).
            _log.warning("cache.expired_kept", error=str(exc))
            return False
        if removed:
            _log.info("cache.expired", entries=removed)
        return True

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
