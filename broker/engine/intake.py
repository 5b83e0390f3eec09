"""Intake: a caller's query made complete, validated, deduplicated and admitted.

Every query is completed with the config's marketplace and resources, so the result that
answers it carries exactly what was asked. Ids that are not ASINs, marketplaces that are
not Amazon's, and marketplaces no key is configured for are answered at once, as results
(``invalid`` / ``failed``), never sent. Everything else joins the one in-flight lookup of
its (marketplace, ASIN, resources), or starts one when fewer than ``queue_size`` of its
marketplace are outstanding: admission waits for room, and re-checks afterwards that a key
can still serve the marketplace (N5). The room is per marketplace so that lookups no key can
send for hours (a UK key waiting out its daily quota) never keep a fresh US key idle. A
lookup every caller left is dropped at once, so a new caller of the same ASIN starts afresh
instead of inheriting another caller's cancellation (N8).

With an item cache (``[cache]``), a fresh cached answer is served here and never enters a
batch, and every ok answer is written to the cache when its lookup ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from broker.api.marketplaces import NAMING, not_a_name
from broker.api.marketplaces import marketplace as lookup_marketplace
from broker.api.resources import resolve_resources
from broker.asin import check_asin, plain_asin
from broker.engine.batcher import Lookup, Room
from broker.errors import describe
from broker.models import ErrorDetail, ItemResult, Protocol, Query, Status

if TYPE_CHECKING:
    from broker.cache import CacheFront
    from broker.engine.batcher import Batcher, Receiver
    from broker.engine.metrics import EngineMetrics
    from broker.engine.scheduler import KeyPool

__all__ = ["Ident", "Intake", "ident_of"]

#: What makes two queries one lookup: (marketplace, ASIN, resources); the tag is left out.
Ident = tuple[str, str, tuple[str, ...]]


def ident_of(query: Query) -> Ident:
    """The lookup identity of a completed query (marketplace and resources filled in)."""
    return (query.marketplace or "", query.asin, query.resources or ())


def _echo(resources: object) -> tuple[str, ...]:
    """A refused query's resources as it gave them (a lone string stays one name)."""
    if isinstance(resources, str) or not isinstance(resources, Iterable):
        return (str(resources),)
    return tuple(str(name) for name in resources)


def _named(own: str | None, call: str | None, store: str | None, default: str) -> str:
    """The marketplace a query asks: its own, else its call's, else a product URL's store,
    else the config's. An empty name (an unset variable) is a name too, and an unknown one:
    the default store is no guess for it."""
    if own is not None:
        return own
    if call is not None:
        return call
    return store or default


class Intake:
    """Admission, completion and deduplication of lookups for one broker."""

    def __init__(
        self,
        *,
        marketplace: str,
        resources: Sequence[str],
        protocol: Protocol,
        queue_size: int,
        pool: KeyPool,
        batcher: Batcher,
        metrics: EngineMetrics,
        closed: Callable[[], BaseException | None],
        cache: CacheFront | None = None,
    ) -> None:
        self._marketplace = marketplace
        self._protocol = protocol
        self._resources = resolve_resources(resources, protocol)
        self._pool = pool
        # The pool's own collections, read once per ASIN without a call: the marketplaces a
        # key is configured for (fixed), and those some key served at its last check
        # (cleared in place when a key leaves; a marketplace not in it is checked in full).
        self._configured = pool.configured_marketplaces
        self._serving = pool.serving_marketplaces
        self._batcher = batcher
        self._metrics = metrics
        self._closed = closed
        self._cache = cache
        self._queue_size = queue_size
        # Room per canonical marketplace (at most the 20-odd Amazon stores).
        self._rooms: dict[str, Room] = {}
        self._inflight: dict[Ident, Lookup] = {}
        # Canonical names of marketplaces as callers spell them ("UK", "amazon.co.uk").
        self._markets: dict[str, str | None] = {}

    def __len__(self) -> int:
        return len(self._inflight)

    def resources(self, names: Sequence[str] | None) -> tuple[str, ...] | None:
        """A call's ``resources=`` in either spelling, as the protocol spells them.

        Raises:
            TypeError, ValueError: not a list of names, or a name the API does not know.
        """
        return None if names is None else resolve_resources(names, self._protocol)

    def complete(
        self,
        item: str | Query,
        marketplace: str | None = None,
        resources: Sequence[str] | None = None,
    ) -> Query | ItemResult:
        """The caller's query made complete, or the result it gets without any request.

        ``resources`` (the call's) must already be resolved (:meth:`resources`); a
        query's own resources are resolved here, and an unknown name makes the query
        ``invalid`` (``InvalidResource``) rather than failing the other queries. A product
        URL's store (``amazon.co.uk``) is its marketplace unless the query or the call
        names one.

        Raises:
            TypeError: ``item`` is neither an ASIN string nor a :class:`Query`.
        """
        if isinstance(item, str):
            raw, own, wanted, tag = item, None, resources, None
        elif isinstance(item, Query):
            raw, own, tag = item.asin, item.marketplace, item.tag
            if not isinstance(raw, str):
                raise TypeError(f"Query.asin must be a string, got {type(raw).__name__}")
            if own is not None and not isinstance(own, str):
                raise not_a_name(own, "Query.marketplace")
            wanted = resources
            if item.resources is not None:
                try:
                    wanted = resolve_resources(item.resources, self._protocol)
                except (TypeError, ValueError) as exc:
                    named = _named(own, marketplace, check_asin(raw).store, self._marketplace)
                    named = self._canonical_market(named) or named
                    return self._immediate(
                        Query(raw, named, _echo(item.resources), tag),
                        "InvalidResource",
                        str(exc),
                    )
        else:
            raise TypeError(f"expected an ASIN string or a Query, got {type(item).__name__}")
        if marketplace is not None and not isinstance(marketplace, str):
            raise not_a_name(marketplace)
        asin = plain_asin(raw)
        store = reason = None
        if asin is None:
            verdict = check_asin(raw)
            asin, store, reason = verdict.asin, verdict.store, verdict.reason
        # The query's own marketplace, else the call's, else a product URL's store
        # (amazon.co.uk), else the config's: what is named beats what is inferred.
        # (_named and the cache hit of _canonical_market, written out: once per ASIN.)
        if own is not None:
            named = own
        elif marketplace is not None:
            named = marketplace
        else:
            named = store or self._marketplace
        try:
            canonical = self._markets[named]
        except KeyError:
            canonical = self._canonical_market(named)
        res = tuple(wanted) if wanted is not None else self._resources
        if canonical is None:
            if store == named:
                # Named by no one: the product URL's own host, an Amazon-looking domain.
                why = (
                    f"the product URL's store {named!r} is no Amazon marketplace; give the "
                    f"lookup a marketplace ({NAMING})"
                )
            else:
                why = f"unknown marketplace {named!r}; {NAMING}"
            return self._immediate(Query(raw, named, res, tag), "UnknownMarketplace", why)
        if asin is None:
            return self._immediate(
                Query(raw, canonical, res, tag), "InvalidAsin", reason or "invalid ASIN"
            )
        query = Query(asin, canonical, res, tag)
        if canonical not in self._configured:
            return self._immediate(
                query,
                "NoKeyForMarketplace",
                f"no key has a partner tag for {canonical}",
                status=Status.FAILED,
                remedy=self._pool.no_tag_remedy(canonical),
            )
        return query

    def _canonical_market(self, name: str) -> str | None:
        try:
            return self._markets[name]
        except KeyError:
            pass
        try:
            canonical: str | None = lookup_marketplace(name).name
        except ValueError:
            canonical = None
        if len(self._markets) < 1024:
            self._markets[name] = canonical
        return canonical

    def _immediate(
        self,
        query: Query,
        code: str,
        message: str,
        *,
        status: Status = Status.INVALID,
        remedy: str | None = None,
    ) -> ItemResult:
        result = ItemResult(
            query.asin,
            query.marketplace or "",
            status,
            error=ErrorDetail(code, message, remedy or describe(code).remedy),
            query=query,
        )
        self._metrics.record_item(result.status)
        return result

    def admit_now(self, query: Query, receiver: Receiver) -> Lookup | None:
        """:meth:`admit` without waiting: None when there is no room now (then await it).

        Most queries are admitted this way, with no coroutine per ASIN (and ident_of,
        _join and the served marketplace's check written out, with no call either).
        """
        market = query.marketplace or ""
        ident = (market, query.asin, query.resources or ())
        lookup = self._inflight.get(ident)
        if lookup is not None and not lookup.done:
            lookup.receivers.append((receiver, query))
            return lookup
        if market not in self._serving:
            self._pool.check_servable(market)
        room = self._rooms.get(market) or self._room(market)
        if self._closed() is not None or not room.try_take():
            return None
        return self._start(ident, query, receiver)

    def _room(self, marketplace: str) -> Room:
        room = self._rooms.get(marketplace)
        if room is None:
            room = self._rooms[marketplace] = Room(self._queue_size)
        return room

    async def admit(self, query: Query, receiver: Receiver) -> Lookup:
        """Attach ``receiver`` to the lookup answering ``query``, starting one if needed.

        Raises:
            NoUsableKeyError: every key that could serve the marketplace left rotation.
            BrokerClosedError / the engine's crash: the broker stopped meanwhile.
        """
        lookup = self.admit_now(query, receiver)
        if lookup is not None:
            return lookup
        market = query.marketplace or ""
        if self._batcher.pending(market) >= self._queue_size:
            # Every lookup holding the room lingers in a partial batch: none can end, and
            # make room, before its linger runs out (a queue_size below batch_size), so
            # waiting for more ASINs to join would only hold them all back.
            self._batcher.flush()
        room = self._room(market)
        await room.take()
        try:
            stopped = self._closed()
            if stopped is not None:
                raise stopped
            # The last key may have left while this caller waited for room (N5).
            self._pool.check_servable(market)
        except BaseException:
            # Hand the room on: the next waiter must also wake and see the same.
            room.give()
            raise
        ident = ident_of(query)
        lookup = self._join(ident, query, receiver)
        if lookup is not None:
            room.give()
            return lookup
        return self._start(ident, query, receiver)

    def _start(self, ident: Ident, query: Query, receiver: Receiver) -> Lookup:
        canonical = (
            query if query.tag is None else Query(query.asin, query.marketplace, query.resources)
        )
        lookup = Lookup(canonical, [(receiver, query)], on_done=self._finished)
        self._inflight[ident] = lookup
        self._batcher.add(lookup)
        return lookup

    def _join(self, ident: Ident, query: Query, receiver: Receiver) -> Lookup | None:
        lookup = self._inflight.get(ident)
        if lookup is None or lookup.done:
            return None
        lookup.receivers.append((receiver, query))
        return lookup

    def _finished(self, lookup: Lookup, outcome: ItemResult | BaseException | None) -> None:
        query = lookup.query
        market = query.marketplace or ""
        ident = (market, query.asin, query.resources or ())  # ident_of, once per ASIN
        if self._inflight.get(ident) is lookup:
            del self._inflight[ident]
        self._rooms[market].give()
        if self._cache is not None and isinstance(outcome, ItemResult):
            # Written behind, in batches: Amazon's ok answers are kept, and its not_found
            # ones delete what was kept (the item is gone); the rest changes nothing.
            self._cache.put(outcome)

    # -- the item cache ---------------------------------------------------------------------

    async def prefetch(self, queries: Sequence[Query | ItemResult]) -> None:
        """Read the cached answers of ``queries`` in one batch (no-op without a cache)."""
        if self._cache is not None:
            await self._cache.prefetch([q for q in queries if isinstance(q, Query)])

    def discard(self, queries: Sequence[Query | ItemResult]) -> None:
        """Forget the answers read ahead for ``queries``: their chunk is done."""
        if self._cache is not None:
            self._cache.discard([q for q in queries if isinstance(q, Query)])

    async def cached(self, query: Query) -> ItemResult | None:
        """A fresh cached answer for ``query`` (``cached=True``), or None to look it up.

        A query already in flight joins its lookup instead: the answer on its way is at
        least as fresh as any cached one.
        """
        if self._cache is None:
            return None
        if ident_of(query) in self._inflight:
            return None
        hit = await self._cache.get(query)
        if hit is not None:
            self._metrics.record_item(hit.status)
        return hit

    def fail_all(self, error: BaseException) -> None:
        """End every lookup in flight with ``error`` (the broker closed or crashed)."""
        for lookup in list(self._inflight.values()):
            lookup.finish(error)
