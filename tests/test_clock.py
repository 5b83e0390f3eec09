"""LoopClock keeps the Clock contract on both event loops the broker runs on.

uvloop counts its clock and its timers in whole milliseconds: ``asyncio.sleep`` of less
than half a millisecond returns at once there, and a longer one can return up to half a
millisecond early. These tests sleep for real, a few milliseconds in all.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
import uvloop

from broker.clock import LoopClock

T = TypeVar("T")

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


def _run(loop: str, coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(coro())


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_sleep_never_returns_before_its_time(loop: str) -> None:
    """LoopClock.sleep returns only once the loop's clock has moved on by the time asked."""

    async def main() -> list[float]:
        clock = LoopClock()
        short = []
        for seconds in (0.0001, 0.0004, 0.0006, 0.0009, 0.0015, 0.0001, 0.0004):
            start = clock.monotonic()
            await clock.sleep(seconds)
            if clock.monotonic() - start < seconds - 1e-6:
                short.append(seconds)
        return short

    assert _run(loop, main) == []


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_waiting_for_an_instant_does_not_busy_wait(loop: str) -> None:
    """A caller looping until an instant (as the pacer does) sleeps a few times, not hundreds."""

    async def main() -> int:
        clock = LoopClock()
        rounds = 0
        for _ in range(5):
            until = clock.monotonic() + 0.0003
            while (rest := until - clock.monotonic()) > 0:
                await clock.sleep(rest)
                rounds += 1
        return rounds

    assert _run(loop, main) <= 10


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_sleep_of_nothing_yields_once(loop: str) -> None:
    """sleep(0), negative durations and NaN return at once, after letting other tasks run."""

    async def main() -> list[str]:
        order: list[str] = []

        async def other() -> None:
            order.append("other")

        for seconds in (0.0, -1.0, math.nan):
            task = asyncio.get_running_loop().create_task(other())
            await LoopClock().sleep(seconds)
            order.append("after sleep")
            await task
        return order

    assert _run(loop, main) == ["other", "after sleep"] * 3
