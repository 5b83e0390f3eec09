"""Time as a dependency: one object both reads the time and waits, so tests can fake both.

Nothing else in the broker calls ``time.time()``, ``datetime.now()`` or ``asyncio.sleep``;
every stage takes a :class:`Clock`. :class:`LoopClock` reads the running loop's clock, so
loop-time tools can fast-forward whole runs; ``broker.testing.FakeClock`` drives unit tests.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol

__all__ = ["Clock", "LoopClock"]


class Clock(Protocol):
    """Protocol: the broker's source of time.

    - ``monotonic()`` is seconds on a clock that never jumps, for rates and deadlines.
    - ``sleep(seconds)`` waits that long on the same clock (never negative).
    - ``utcnow()`` is wall time (timezone-aware UTC), only for signatures, daily windows
      and timestamps in output rows.
    """

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...

    def utcnow(self) -> datetime: ...


class LoopClock:
    """The real clock: the running event loop's time and ``asyncio.sleep``."""

    __slots__ = ()

    def monotonic(self) -> float:
        """Return the running loop's time (``time.monotonic`` outside a loop)."""
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:
            return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """Sleep on the loop; negative durations return at once (after one yield)."""
        await asyncio.sleep(max(0.0, seconds))

    def utcnow(self) -> datetime:
        """Return the current UTC wall time."""
        return datetime.now(UTC)

    def __repr__(self) -> str:
        return "LoopClock()"
