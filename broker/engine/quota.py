"""Per-key daily request budget (TPD): counts sends per UTC day and refuses past a guard.

A new key gets 1 TPS but only 8640 TPD, so the day runs out long before the per-second
rate does (``ratelimit.md`` 0.1). :class:`DailyBudget` counts one request per send in the
current window, refuses once ``guard_fraction`` of TPD is used, and rolls over at the
reset boundary (default 00:00 UTC; Amazon does not document it, so it is configurable).

Choices:

- **No refund for 429s.** Whether a throttled request counts against TPD at Amazon is an
  open question (``ratelimit.md`` 6.5). Counting it is the safe side: over-counting parks a
  key a little early, under-counting sends requests Amazon will refuse all evening.
- **Wall-clock jumps** (``reliability.md`` B14). The day comes from ``clock.utcnow()``, but
  the budget keeps the latest day it has seen: a clock stepping backwards over midnight
  does not hand out a second copy of a day already spent. A forward jump into the next day
  starts that day; there is no way to tell a wrong jump from an NTP correction.
- **Persistence** goes through a :class:`BudgetStore` so the daemon can keep the count
  across restarts; the count is saved after every change (a store may buffer).
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable

    from broker.clock import Clock

__all__ = [
    "BatchedBudgetStore",
    "BudgetStore",
    "DailyBudget",
    "MemoryBudgetStore",
    "day_limit",
]


def day_limit(tpd: int | None, guard_fraction: float) -> int | None:
    """Sends the guard allows per window: ``floor(tpd * guard)``, at least 1 for any TPD > 0.

    ``None`` for an unlimited key; 0 for a key with TPD 0. The shared key state
    (``broker.state``) counts against the same limit.
    """
    if tpd is None:
        return None
    return 0 if tpd == 0 else max(1, math.floor(tpd * guard_fraction))


class BudgetStore(Protocol):
    """Protocol: where daily request counts persist between runs.

    - ``load(key_name, day)`` returns the count saved for that key and window day, or 0.
    - ``save(key_name, day, count)`` records the count (idempotent; the latest call wins).
    - ``day`` is the window's start date in UTC (the date of the window's reset instant).
    """

    def load(self, key_name: str, day: date) -> int: ...

    def save(self, key_name: str, day: date, count: int) -> None: ...


class MemoryBudgetStore:
    """The default :class:`BudgetStore`: a dict, so counts live as long as the process."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[tuple[str, date], int] = {}

    def load(self, key_name: str, day: date) -> int:
        """Return the saved count for ``key_name`` on ``day`` (0 when none)."""
        return self._counts.get((key_name, day), 0)

    def save(self, key_name: str, day: date, count: int) -> None:
        """Record ``count`` for ``key_name`` on ``day``."""
        self._counts[(key_name, day)] = count

    def __repr__(self) -> str:
        return f"MemoryBudgetStore(entries={len(self._counts)})"


class BatchedBudgetStore:
    """Writes the latest counts through to ``inner`` at most once per ``every_s``.

    A durable store (the job ledger fsyncs each commit) written on every request costs
    more than the request itself at high rates. Batching bounds what a crash can lose to
    ``every_s`` seconds of sends, which the TPD guard's margin (1 % of TPD by default)
    covers at any rate Amazon grants; :meth:`flush` writes the rest at a clean stop.

    Args:
        inner: the store written through to.
        monotonic: the time source deciding when to write.
        every_s: the longest a count stays unwritten while sends go on.
    """

    __slots__ = ("_dirty", "_every_s", "_inner", "_last", "_monotonic")

    def __init__(
        self, inner: BudgetStore, *, monotonic: Callable[[], float], every_s: float = 1.0
    ) -> None:
        self._inner = inner
        self._monotonic = monotonic
        self._every_s = every_s
        self._dirty: dict[tuple[str, date], int] = {}
        self._last: float | None = None

    def load(self, key_name: str, day: date) -> int:
        """Return the latest count: the unwritten one, else the inner store's."""
        pending = self._dirty.get((key_name, day))
        return pending if pending is not None else self._inner.load(key_name, day)

    def save(self, key_name: str, day: date, count: int) -> None:
        """Remember ``count``; write everything through when ``every_s`` has passed."""
        self._dirty[(key_name, day)] = count
        now = self._monotonic()
        if self._last is None or now - self._last >= self._every_s:
            self.flush()

    def flush(self) -> None:
        """Write every unwritten count through to the inner store now."""
        self._last = self._monotonic()
        # One entry at a time, so a failing write keeps what it did not write.
        for entry in list(self._dirty):
            self._inner.save(entry[0], entry[1], self._dirty[entry])
            del self._dirty[entry]

    def __repr__(self) -> str:
        return f"BatchedBudgetStore({self._inner!r}, unwritten={len(self._dirty)})"


class DailyBudget:
    """A per-key counter of requests in the current daily window, with a guard below TPD.

    Args:
        clock: the wall time (``utcnow()``) decides which window we are in.
        tpd: transactions per day Amazon grants the key; ``None`` means unlimited (the
            counter still counts, but never refuses).
        key_name: the name the store files counts under.
        guard_fraction: refuse once this share of ``tpd`` is spent (0.99 keeps a margin for
            requests in flight and for Amazon counting slightly differently).
        reset_time_utc: the time of day (UTC) the window resets; a naive ``time``.
        store: persistence; defaults to a private :class:`MemoryBudgetStore`.

    Raises:
        ValueError: for a negative ``tpd``, a ``guard_fraction`` outside (0, 1] or a
            ``reset_time_utc`` with a timezone.
    """

    __slots__ = ("_clock", "_day", "_key_name", "_limit", "_offset", "_spent", "_store", "_tpd")

    def __init__(
        self,
        clock: Clock,
        tpd: int | None,
        *,
        key_name: str = "",
        guard_fraction: float = 0.99,
        reset_time_utc: time = time(0, 0),
        store: BudgetStore | None = None,
    ) -> None:
        if tpd is not None and tpd < 0:
            raise ValueError(f"tpd must be >= 0 or None, got {tpd}")
        if not 0.0 < guard_fraction <= 1.0:
            raise ValueError(f"guard_fraction must be in (0, 1], got {guard_fraction}")
        if reset_time_utc.tzinfo is not None:
            raise ValueError("reset_time_utc is a naive time read as UTC")
        self._clock = clock
        self._tpd = tpd
        self._key_name = key_name
        self._store: BudgetStore = store if store is not None else MemoryBudgetStore()
        # A key with any TPD may always send at least once; the guard only trims the top.
        self._limit = day_limit(tpd, guard_fraction)
        self._offset = timedelta(
            hours=reset_time_utc.hour,
            minutes=reset_time_utc.minute,
            seconds=reset_time_utc.second,
            microseconds=reset_time_utc.microsecond,
        )
        self._day = self._window_day()
        self._spent = self._store.load(key_name, self._day)

    def _window_day(self) -> date:
        return (self._clock.utcnow().astimezone(UTC) - self._offset).date()

    def _roll(self) -> None:
        day = self._window_day()
        # Only forward: a wall clock stepping back must not reopen a day already spent.
        if day > self._day:
            self._day = day
            self._spent = self._store.load(self._key_name, day)

    @property
    def tpd(self) -> int | None:
        """The key's transactions per day (``None``: unlimited)."""
        return self._tpd

    @property
    def limit(self) -> int | None:
        """How many sends the guard allows per window (``None``: unlimited)."""
        return self._limit

    @property
    def day(self) -> date:
        """The current window's day (the latest seen, see the module notes on clock jumps)."""
        self._roll()
        return self._day

    @property
    def spent(self) -> int:
        """Requests counted in the current window."""
        self._roll()
        return self._spent

    @property
    def remaining(self) -> int | None:
        """Sends the guard still allows in this window (``None``: unlimited)."""
        self._roll()
        if self._limit is None:
            return None
        return max(0, self._limit - self._spent)

    @property
    def exhausted(self) -> bool:
        """True when the guard refuses further sends until :meth:`resets_at`."""
        self._roll()
        return self._limit is not None and self._spent >= self._limit

    @property
    def used_fraction(self) -> float | None:
        """The share of TPD spent in this window (``None``: unlimited; 1.0 for TPD 0)."""
        self._roll()
        if self._tpd is None:
            return None
        if self._tpd == 0:
            return 1.0
        return self._spent / self._tpd

    def resets_at(self) -> datetime:
        """Return the UTC instant the current window ends."""
        self._roll()
        start = datetime.combine(self._day, time(0, 0), tzinfo=UTC) + self._offset
        return start + timedelta(days=1)

    def seconds_until_reset(self) -> float:
        """Seconds of wall time until :meth:`resets_at` (0 when already past)."""
        return max(0.0, (self.resets_at() - self._clock.utcnow()).total_seconds())

    def try_spend(self) -> bool:
        """Count one request if the guard allows it.

        Returns:
            True when the request was counted (the caller may send it); False when the
            window's guard is reached (the caller must not send).
        """
        self._roll()
        if self._limit is not None and self._spent >= self._limit:
            return False
        self._spent += 1
        self._store.save(self._key_name, self._day, self._spent)
        return True

    def __repr__(self) -> str:
        self._roll()
        return (
            f"DailyBudget(key={self._key_name!r}, day={self._day.isoformat()}, "
            f"spent={self._spent}, limit={self._limit}, tpd={self._tpd})"
        )
