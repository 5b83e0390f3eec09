"""Per-key quotas of the simulator: a GCRA token bucket for TPS and a daily counter for TPD.

This is the simulator's own limiter, independent of the broker's: it decides, on the
simulator's clock, whether one request (one transaction, however many ids it carries) may
pass. GCRA keeps one number per key (the theoretical arrival time), so a check costs a few
float operations; a throttled request consumes nothing. The daily counter resets at 00:00 UTC
of the simulator's (skewed) wall clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta

__all__ = ["KeyQuota", "QuotaDecision"]


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    """The verdict on one request: allowed, or throttled with the wait until it would pass."""

    allowed: bool
    retry_after_s: float = 0.0
    #: "tps" or "tpd" when throttled
    limit: str = ""


class KeyQuota:
    """One key's TPS bucket (GCRA, depth ``burst``) and TPD counter.

    ``tps`` and ``tpd`` may be changed at runtime (``/_sim/control``); a rate change takes
    effect from the next request on, without a burst of saved-up tokens.
    """

    __slots__ = ("_burst", "_count", "_day", "_interval", "_last", "_tat", "tpd")

    def __init__(self, tps: float, tpd: int, burst: int) -> None:
        if tps <= 0 or burst < 1:
            raise ValueError("tps must be positive and burst at least 1")
        self._interval = 1.0 / tps
        self._burst = burst
        self._tat = float("-inf")
        # When the last transaction was admitted (a rate change rescales what it left owed).
        self._last = float("-inf")
        self.tpd = tpd
        self._day: date | None = None
        self._count = 0

    @property
    def tps(self) -> float:
        """The allowed transactions per second."""
        return 1.0 / self._interval

    @tps.setter
    def tps(self, value: float) -> None:
        if value <= 0:
            raise ValueError("tps must be positive")
        old, self._interval = self._interval, 1.0 / value
        if self._last > float("-inf"):
            # What the admitted transactions still owe, counted in the new interval: the
            # next is due a new interval after the last one admitted (a key raised from
            # 0.001 to 5 TPS stayed throttled for 1,000 s), and a spent burst stays spent
            # (lowered, a burst of 10 let 7 through at once).
            self._tat = self._last + (self._tat - self._last) * self._interval / old

    def used_on(self, wall: datetime) -> int:
        """Transactions accepted so far on the day of ``wall`` (UTC): 0 once it has turned,
        before any is asked that day."""
        return self._count if wall.date() == self._day else 0

    def check(self, now: float, wall: datetime) -> QuotaDecision:
        """Admit or refuse one transaction at monotonic ``now`` and wall time ``wall`` (UTC)."""
        today = wall.date()
        if today != self._day:
            self._day = today
            self._count = 0
        if self._count >= self.tpd:
            midnight = datetime.combine(
                today + timedelta(days=1), datetime.min.time(), tzinfo=wall.tzinfo
            )
            return QuotaDecision(False, (midnight - wall).total_seconds(), "tpd")
        tolerance = (self._burst - 1) * self._interval
        earliest = self._tat - tolerance
        if now < earliest:
            return QuotaDecision(False, earliest - now, "tps")
        self._tat = max(self._tat, now) + self._interval
        self._last = now
        self._count += 1
        return QuotaDecision(True)
