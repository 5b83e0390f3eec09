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

#: uvloop's tick: its clock and timers count whole milliseconds.
_TICK_S = 0.001
#: How early a wake-up may come and still count as on time: the default loop runs a timer
#: up to its clock's resolution (a nanosecond) before the timer's instant.
_EARLY_S = 1e-6


class Clock(Protocol):
    """Protocol: the broker's source of time.

    - ``monotonic()`` is seconds on a clock that never jumps, for rates and deadlines.
    - ``sleep(seconds)`` waits that long on the same clock (never negative).
    - ``utcnow()`` is wall time (timezone-aware UTC), only for signatures, daily windows
      and timestamps in output rows.

    A clock whose times mean nothing to other processes (a test's fake clock) says so with
    a true ``private_time`` attribute: a Broker on it then keeps its keys' state out of the
    machine's shared file unless ``[state]`` names a path.
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
        """Sleep until the loop's clock has moved on by ``seconds``; 0, less or NaN: one yield.

        uvloop counts its clock and its timers in whole milliseconds: a timer can fire up to
        half a millisecond early, and one under half a millisecond fires at once. A caller
        that loops until an instant (the pacer) would then busy-wait, waking hundreds of
        times per wait, and could act before its instant. So the rest is slept again, at
        least one tick at a time, until the loop's own clock says the time has come.
        """
        if not seconds > 0.0:
            # Also NaN, which would otherwise reach the loop's timer heap.
            await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        await asyncio.sleep(seconds)
        # Not a busy-wait: each round is a timer of at least one tick, and one or two do.
        while (rest := until - loop.time()) > _EARLY_S:  # noqa: ASYNC110
            await asyncio.sleep(max(rest, _TICK_S))

    def utcnow(self) -> datetime:
        """Return the current UTC wall time."""
        return datetime.now(UTC)

    def __repr__(self) -> str:
        return "LoopClock()"
