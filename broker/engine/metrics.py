"""Counters the engine keeps while it runs, and the frozen snapshots it hands out.

The daemon renders snapshots as Prometheus text and progress lines; benchmarks read them.
Counting is plain integer arithmetic on the hot path; snapshots are taken on demand.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from broker.models import Status

__all__ = ["LATENCY_BUCKETS_S", "QUOTA_WAIT", "EngineMetrics", "KeySnapshot", "MetricsSnapshot"]

#: A key's ``reason`` while it waits for its daily quota to reset (``until`` says when).
QUOTA_WAIT = "waiting for daily quota"

#: Upper bounds of the request-latency histogram, seconds (Prometheus ``le`` labels).
LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class KeySnapshot:
    """One key's state at a moment."""

    name: str
    state: str
    rate: float
    configured_tps: float
    in_flight: int
    sent: int
    throttled: int
    errors: int
    daily_spent: int
    daily_limit: int | None
    daily_resets_at: str | None
    #: why the key is parked or out of rotation, and until when (ISO UTC), if it is
    reason: str | None = None
    until: str | None = None
    #: sends left today before the key stops: ``tpd`` times the guard, less what is spent
    #: (``None``: unlimited); what ``broker status`` shows as left
    daily_left: int | None = None
    #: the marketplaces the key serves now: its tags, less those out of rotation
    marketplaces: tuple[str, ...] = ()
    #: (marketplace, code) for each marketplace Amazon rejected the key in (a wrong tag)
    markets_out: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """The engine's counters at a moment."""

    requests: int
    responses_by_status: Mapping[int, int]
    throttled: int
    retries: int
    transport_errors: int
    items_by_status: Mapping[str, int]
    latency_buckets: tuple[int, ...]
    latency_sum_s: float
    latency_count: int
    queued_batches: int
    outstanding_lookups: int
    keys: tuple[KeySnapshot, ...] = field(default=())
    #: the marketplaces queued batches wait for a key in (sorted): whose keys' state
    #: decides whether the work can go on
    waiting_markets: tuple[str, ...] = ()
    #: why the engine stopped (a crash, a key-state store the config cannot use); None
    #: while it runs, and after a close that found it running. Every call fails from then
    #: on, whatever the keys say.
    engine_stopped: str | None = None

    def serving(self, markets: Collection[str]) -> tuple[KeySnapshot, ...]:
        """The keys that serve one of ``markets`` now (a key out of rotation in a
        marketplace, for a wrong tag, does not serve it there)."""
        wanted = set(markets)
        return tuple(key for key in self.keys if wanted.intersection(key.marketplaces))


class EngineMetrics:
    """Mutable counters owned by one broker."""

    __slots__ = (
        "_items",
        "_ok",
        "latency_buckets",
        "latency_count",
        "latency_sum_s",
        "requests",
        "responses_by_status",
        "retries",
        "throttled",
        "transport_errors",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.responses_by_status: dict[int, int] = {}
        self.throttled = 0
        self.retries = 0
        self.transport_errors = 0
        # ok answers are counted apart: the test is an identity check, where hashing a
        # Status or reading its ``.value`` is a Python-level call, once per ASIN.
        self._ok = 0
        self._items: dict[str, int] = {}
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.latency_sum_s = 0.0
        self.latency_count = 0

    def record_response(self, status: int, elapsed_s: float) -> None:
        """Count one response and its latency."""
        self.responses_by_status[status] = self.responses_by_status.get(status, 0) + 1
        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS_S, elapsed_s)] += 1
        self.latency_sum_s += elapsed_s
        self.latency_count += 1

    @property
    def items_by_status(self) -> dict[str, int]:
        """Finished lookups by status value (``ok``, ``not_found`` ...)."""
        counts = {Status.OK.value: self._ok} if self._ok else {}
        counts.update(self._items)
        return counts

    def record_item(self, status: Status) -> None:
        """Count one finished lookup by status."""
        if status is Status.OK:
            self._ok += 1
        else:
            self._items[status.value] = self._items.get(status.value, 0) + 1

    def record_ok(self, count: int) -> None:
        """Count ``count`` finished lookups answered ok (a batch's, at once)."""
        self._ok += count

    def snapshot(
        self,
        *,
        queued_batches: int,
        outstanding_lookups: int,
        keys: tuple[KeySnapshot, ...],
        waiting_markets: tuple[str, ...] = (),
        engine_stopped: str | None = None,
    ) -> MetricsSnapshot:
        """Return the counters as a frozen value."""
        return MetricsSnapshot(
            requests=self.requests,
            responses_by_status=dict(self.responses_by_status),
            throttled=self.throttled,
            retries=self.retries,
            transport_errors=self.transport_errors,
            items_by_status=self.items_by_status,
            latency_buckets=tuple(self.latency_buckets),
            latency_sum_s=self.latency_sum_s,
            latency_count=self.latency_count,
            queued_batches=queued_batches,
            outstanding_lookups=outstanding_lookups,
            keys=keys,
            waiting_markets=waiting_markets,
            engine_stopped=engine_stopped,
        )
