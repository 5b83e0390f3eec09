"""Public test helpers: a fake clock and a loop-settling helper.

These are part of the product (as ``structlog.testing`` is): users of the library can
drive their own tests of code that uses the broker without real sleeps.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from datetime import UTC, datetime, timedelta

__all__ = ["FakeClock", "settle"]

#: Where fake wall time starts: a fixed, reproducible instant.
FAKE_EPOCH = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)


class FakeClock:
    """A clock that only moves when told to, for deterministic tests.

    ``monotonic()`` starts at a large odd offset (as trio's clocks do) so code that
    mixes this clock with ``time.monotonic()`` breaks visibly. ``advance(seconds)``
    moves time forward and wakes sleepers whose deadline passed, in deadline order.
    ``utcnow()`` is a fixed epoch plus elapsed fake time plus ``wall_offset`` (set it
    to simulate a wrong wall clock).
    """

    #: Its times mean nothing to other processes: a Broker on it keeps its keys' state in
    #: memory unless ``[state]`` names a path (see :class:`broker.clock.Clock`).
    private_time = True

    def __init__(self, *, start: float = 123_456.789, epoch: datetime = FAKE_EPOCH) -> None:
        self._start = start
        self._now = start
        self._epoch = epoch
        self.wall_offset = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        """Return fake monotonic seconds."""
        return self._now

    def utcnow(self) -> datetime:
        """Return the fake epoch plus elapsed fake time (plus ``wall_offset``)."""
        return self._epoch + timedelta(seconds=self._now - self._start + self.wall_offset)

    async def sleep(self, seconds: float) -> None:
        """Wait until fake time has advanced by ``seconds`` (a yield when ``seconds <= 0``)."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), future))
        await future

    @property
    def sleepers(self) -> int:
        """How many tasks are sleeping on this clock right now."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    def next_deadline(self) -> float | None:
        """The earliest deadline of a live sleeper, or None."""
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
        return self._sleepers[0][0] if self._sleepers else None

    def _wake_due(self) -> None:
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking sleepers in deadline order as it passes them.

        Between wake-ups the loop is settled, so a woken task that sleeps again with a
        deadline still inside the window is woken in the same call.
        """
        if seconds < 0:
            raise ValueError("time only moves forward")
        target = self._now + seconds
        while True:
            await settle()
            deadline = self.next_deadline()
            if deadline is None or deadline > target:
                break
            self._now = max(self._now, deadline)
            self._wake_due()
        self._now = target
        await settle()

    async def run_until(
        self,
        awaitable_done: asyncio.Future[object] | asyncio.Task[object],
        *,
        limit: float = 86_400.0 * 30,
    ) -> None:
        """Jump from deadline to deadline until ``awaitable_done`` finishes (autojump).

        Raises:
            TimeoutError: if fake time passes ``limit`` seconds first, or nothing is
                sleeping while the task is still blocked (a deadlock on something
                other than this clock).
        """
        end = self._now + limit
        while not awaitable_done.done():
            await settle()
            if awaitable_done.done():
                break
            deadline = self.next_deadline()
            if deadline is None:
                raise TimeoutError("task blocked with no sleeper on the fake clock")
            if deadline > end:
                raise TimeoutError(f"fake time limit of {limit} s reached")
            self._now = max(self._now, deadline)
            self._wake_due()


async def settle(rounds: int = 20) -> None:
    """Spin the loop until nothing is immediately runnable (bounded by ``rounds`` idle passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)
