"""The simulator's counters: per key what it accepted, throttled and served, and every fault.

Benchmarks read these (``GET /_sim/stats`` or ``app[STATS_KEY]``) to compute the rate the
server actually granted and how many 429s it sent; tests read them to check that a fault was
really injected. Timestamps are on the simulator's monotonic clock, in bounded rings.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

__all__ = ["RING_SIZE", "AccountStats", "SimulatorStats"]

#: How many request timestamps each ring keeps (the newest win).
RING_SIZE = 100_000


@dataclass(slots=True)
class AccountStats:
    """Counters of one key."""

    accepted: int = 0
    throttled: int = 0
    #: items the catalogue answered, counted before the item faults (a dropped, an extra or
    #: a duplicated item, a truncated body) change what goes on the wire
    items_served: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    accepted_at: deque[float] = field(default_factory=lambda: deque(maxlen=RING_SIZE))
    throttled_at: deque[float] = field(default_factory=lambda: deque(maxlen=RING_SIZE))

    def snapshot(self, since: float | None = None, *, timestamps: bool = True) -> dict[str, object]:
        """A JSON-ready copy; ``since`` keeps only timestamps at or after it."""
        result: dict[str, object] = {
            "accepted": self.accepted,
            "throttled": self.throttled,
            "items_served": self.items_served,
            "errors": dict(self.errors),
        }
        if timestamps:
            low = float("-inf") if since is None else since
            result["accepted_at"] = [t for t in self.accepted_at if t >= low]
            result["throttled_at"] = [t for t in self.throttled_at if t >= low]
        return result


@dataclass(slots=True)
class SimulatorStats:
    """Every counter of one simulator app.

    Attributes:
        accounts: per account name.
        faults: injected faults by kind (each ``[simulator.faults]`` rate's name, an item
            fault only when it changed an answer), plus ``omitted`` (ids of
            ``omitted_asins`` left out of answers).
        unattributed_errors: error codes of requests that named no known key.
        requests: every request the API routes received.
    """

    accounts: dict[str, AccountStats] = field(default_factory=dict)
    faults: Counter[str] = field(default_factory=Counter)
    unattributed_errors: Counter[str] = field(default_factory=Counter)
    requests: int = 0

    def account(self, name: str) -> AccountStats:
        """The counters of ``name``, created on first use."""
        stats = self.accounts.get(name)
        if stats is None:
            stats = self.accounts[name] = AccountStats()
        return stats

    def error(self, account: str | None, code: str) -> None:
        """Count one error ``code`` against ``account`` (or as unattributed)."""
        if account is None:
            self.unattributed_errors[code] += 1
        else:
            self.account(account).errors[code] += 1

    def snapshot(self, since: float | None = None, *, timestamps: bool = True) -> dict[str, object]:
        """A JSON-ready copy of every counter."""
        return {
            "requests": self.requests,
            "accounts": {
                name: stats.snapshot(since, timestamps=timestamps)
                for name, stats in self.accounts.items()
            },
            "faults": dict(self.faults),
            "unattributed_errors": dict(self.unattributed_errors),
        }
