"""Tests for broker.engine.limiter: the GCRA pacer and the local key limiter."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime

import pytest

from broker.engine.limiter import KeyLimiter, LocalKeyLimiter, Pacer
from broker.engine.quota import DailyBudget
from broker.testing import FakeClock, settle


class LateClock(FakeClock):
    """A fake clock whose timers fire ``lateness_s`` after their deadline, like a busy loop."""

    def __init__(self, lateness_s: float) -> None:
        super().__init__()
        self.lateness_s = lateness_s

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` plus the configured lateness."""
        await super().sleep(seconds + self.lateness_s)


async def _send_n(clock: FakeClock, pacer: Pacer, n: int) -> list[float]:
    async def dispatcher() -> list[float]:
        sent = []
        for _ in range(n):
            await pacer.wait_ready()
            sent.append(pacer.commit())
        return sent

    task = asyncio.create_task(dispatcher())
    await clock.run_until(task)
    return task.result()


class TestPrecision:
    @pytest.mark.parametrize("rate", [0.05, 1.0, 10.0, 100.0, 3.7])
    async def test_n_sends_take_n_minus_one_intervals(self, rate: float) -> None:
        """N sends at rate r go out exactly 1/r apart, the first at once."""
        clock = FakeClock()
        start = clock.monotonic()
        sent = await _send_n(clock, Pacer(clock, rate), 50)
        assert sent[0] == start
        for k, t in enumerate(sent):
            assert t - start == pytest.approx(k / rate, rel=1e-9, abs=1e-9)

    async def test_late_wakeups_do_not_lose_slots(self) -> None:
        """Timer lateness is credited back, so N sends take (N-1)/r plus one lateness."""
        clock = LateClock(lateness_s=0.03)
        start = clock.monotonic()
        pacer = Pacer(clock, 10.0)
        sent = await _send_n(clock, pacer, 101)
        # Without the credit each interval would be 0.13 s: 13 s for 100 intervals.
        assert sent[-1] - start == pytest.approx(10.0 + 0.03)
        assert pacer.next_ready() - start == pytest.approx(10.1)

    async def test_lateness_of_a_whole_interval_is_not_credited(self) -> None:
        """A wake-up later than one interval books the send now: no burst of two."""
        clock = LateClock(lateness_s=0.25)
        start = clock.monotonic()
        pacer = Pacer(clock, 10.0)
        sent = await _send_n(clock, pacer, 3)
        assert sent[1] - sent[0] == pytest.approx(0.35)
        assert sent[2] - sent[1] == pytest.approx(0.35)
        assert pacer.next_ready() - start == pytest.approx(0.8)

    async def test_idle_time_is_not_credited(self) -> None:
        """Time spent waiting for work after the slot does not let the next send come early."""
        clock = FakeClock()
        pacer = Pacer(clock, 10.0)
        pacer.commit()
        waiter = asyncio.create_task(pacer.wait_ready())
        await clock.run_until(waiter)
        await clock.advance(0.09)  # the dispatcher waited for work
        sent = pacer.commit()
        assert pacer.next_ready() - sent == pytest.approx(0.1)

    async def test_idle_key_is_ready_at_once(self) -> None:
        """A key idle for longer than an interval does not bank a burst."""
        clock = FakeClock()
        pacer = Pacer(clock, 1.0)
        pacer.commit()
        await clock.advance(10.0)
        assert pacer.ready_now()
        sent = pacer.commit()
        assert pacer.next_ready() - sent == pytest.approx(1.0)
        assert not pacer.ready_now()

    async def test_slot_already_past_when_waited_for_earns_nothing(self) -> None:
        """A wait that finds its slot long past (an idle key) credits no lateness."""
        clock = FakeClock()
        pacer = Pacer(clock, 10.0)
        pacer.commit()
        await clock.advance(0.15)  # idle for one and a half intervals
        await pacer.wait_ready()
        sent = pacer.commit()
        assert pacer.next_ready() - sent == pytest.approx(0.1)


class TestRateChange:
    async def test_cut_mid_wait_rearms(self) -> None:
        """Cutting the rate while the dispatcher sleeps moves its wake-up later at once."""
        clock = FakeClock()
        pacer = Pacer(clock, 1.0)
        t0 = pacer.commit()
        waiter = asyncio.create_task(pacer.wait_ready())
        await clock.advance(0.5)
        pacer.set_rate(0.5)
        assert pacer.next_ready() - t0 == pytest.approx(2.0)
        await clock.advance(0.9)  # past the old slot at t0 + 1
        assert not waiter.done()
        await clock.advance(0.6)
        assert waiter.done()
        assert clock.monotonic() - t0 == pytest.approx(2.0)

    async def test_raise_mid_wait_rearms(self) -> None:
        """Raising the rate wakes a dispatcher asleep on the old long interval."""
        clock = FakeClock()
        pacer = Pacer(clock, 0.1)
        t0 = pacer.commit()
        waiter = asyncio.create_task(pacer.wait_ready())
        await clock.advance(1.0)
        assert not waiter.done()
        pacer.set_rate(100.0)
        await settle()
        assert waiter.done()
        assert clock.monotonic() - t0 == pytest.approx(1.0)
        assert clock.sleepers == 0

    async def test_raise_to_a_slot_still_ahead(self) -> None:
        """A raise whose new slot is still ahead re-arms to exactly that slot."""
        clock = FakeClock()
        pacer = Pacer(clock, 0.1)
        t0 = pacer.commit()
        waiter = asyncio.create_task(pacer.wait_ready())
        await clock.advance(1.0)
        pacer.set_rate(0.5)
        await clock.advance(0.99)
        assert not waiter.done()
        await clock.advance(0.01)
        assert waiter.done()
        assert clock.monotonic() - t0 == pytest.approx(2.0)

    async def test_new_rate_applies_from_next_slot(self) -> None:
        """After a change, sends are spaced at the new rate from the last send on."""
        clock = FakeClock()
        pacer = Pacer(clock, 1.0)
        first = (await _send_n(clock, pacer, 2))[-1]
        pacer.set_rate(4.0)
        sent = await _send_n(clock, pacer, 3)
        assert [t - first for t in sent] == pytest.approx([0.25, 0.5, 0.75])
        assert pacer.rate == 4.0

    @pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
    def test_invalid_rate_rejected(self, bad: float) -> None:
        """A rate that is not positive and finite is a programming error."""
        with pytest.raises(ValueError, match="rate"):
            Pacer(FakeClock(), bad)
        with pytest.raises(ValueError, match="rate"):
            Pacer(FakeClock(), 1.0).set_rate(bad)


class TestPause:
    async def test_pause_holds_until_then_sends(self) -> None:
        """pause_until holds the next slot until the pause ends, then paces from there."""
        clock = FakeClock()
        pacer = Pacer(clock, 1.0)
        t0 = pacer.commit()
        pacer.pause_until(t0 + 5.0)
        assert pacer.next_ready() == t0 + 5.0
        sent = await _send_n(clock, pacer, 2)
        assert [t - t0 for t in sent] == pytest.approx([5.0, 6.0])

    async def test_pause_mid_wait_rearms_and_only_extends(self) -> None:
        """A pause set while waiting delays the wake-up; a shorter pause later is ignored."""
        clock = FakeClock()
        pacer = Pacer(clock, 1.0)
        t0 = pacer.commit()
        waiter = asyncio.create_task(pacer.wait_ready())
        await clock.advance(0.5)
        pacer.pause_until(t0 + 3.0)
        pacer.pause_until(t0 + 2.0)
        assert pacer.paused_until == t0 + 3.0
        await clock.advance(2.4)
        assert not waiter.done()
        await clock.advance(0.1)
        assert waiter.done()

    async def test_resume_lifts_the_pause(self) -> None:
        """resume() wakes a dispatcher held only by a pause."""
        clock = FakeClock()
        pacer = Pacer(clock, 1.0)
        pacer.pause_until(clock.monotonic() + 60.0)
        waiter = asyncio.create_task(pacer.wait_ready())
        await clock.advance(1.0)
        assert not waiter.done()
        pacer.resume()
        await settle()
        assert waiter.done()
        assert pacer.paused_until == -math.inf


class TestCancellation:
    async def test_cancelled_wait_leaves_no_state(self) -> None:
        """Cancelling wait_ready consumes no slot, leaves no sleeper and allows a new wait."""
        clock = FakeClock()
        pacer = Pacer(clock, 1.0)
        t0 = pacer.commit()
        before = pacer.next_ready()
        waiter = asyncio.create_task(pacer.wait_ready())
        await clock.advance(0.4)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await settle()
        assert clock.sleepers == 0
        assert pacer.next_ready() == before
        assert "waiting=False" in repr(pacer)
        again = asyncio.create_task(pacer.wait_ready())
        await clock.run_until(again)
        assert clock.monotonic() - t0 == pytest.approx(1.0)

    async def test_second_waiter_is_refused(self) -> None:
        """Two tasks waiting on one pacer is a programming error."""
        clock = FakeClock()
        pacer = Pacer(clock, 1.0)
        pacer.commit()
        waiter = asyncio.create_task(pacer.wait_ready())
        await settle()
        with pytest.raises(RuntimeError, match="one dispatcher"):
            await pacer.wait_ready()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter


class TestNextReady:
    async def test_fresh_pacer_is_ready(self) -> None:
        """A pacer that never sent is ready at any time."""
        clock = FakeClock()
        pacer = Pacer(clock, 2.0)
        assert pacer.next_ready() == -math.inf
        assert pacer.ready_now()
        await pacer.wait_ready()
        assert clock.sleepers == 0

    def test_next_ready_after_commit_and_pause(self) -> None:
        """next_ready is the later of the next grid slot and the pause's end."""
        clock = FakeClock()
        pacer = Pacer(clock, 2.0)
        t0 = pacer.commit()
        assert pacer.next_ready() == t0 + 0.5
        assert not pacer.ready_now()
        pacer.pause_until(t0 + 0.2)
        assert pacer.next_ready() == t0 + 0.5
        pacer.pause_until(t0 + 7.0)
        assert pacer.next_ready() == t0 + 7.0

    def test_commit_before_the_slot_books_the_future_slot(self) -> None:
        """Committing early reserves the due slot, so the one after moves on by an interval."""
        clock = FakeClock()
        pacer = Pacer(clock, 1.0)
        t0 = pacer.commit()
        pacer.commit()
        assert pacer.next_ready() == t0 + 2.0

    def test_repr_shows_live_state(self) -> None:
        """The repr shows rate, next slot, pause and whether a task waits."""
        clock = FakeClock()
        pacer = Pacer(clock, 2.0)
        pacer.commit()
        text = repr(pacer)
        assert text.startswith("Pacer(rate=2/s, next_ready=")
        assert "waiting=False" in text


def _local(clock: FakeClock, *, rate: float = 1.0, tpd: int | None = 3) -> LocalKeyLimiter:
    budget = DailyBudget(clock, tpd, key_name="k", guard_fraction=1.0)
    return LocalKeyLimiter(clock, Pacer(clock, rate), budget)


class TestLocalKeyLimiter:
    async def test_commit_counts_against_pacer_and_budget(self) -> None:
        """Each commit uses one slot and one unit of the daily budget."""
        clock = FakeClock()
        limiter: KeyLimiter = _local(clock)
        await limiter.wait_ready()
        t0 = await limiter.commit()
        assert limiter.spent == 1
        assert limiter.remaining == 2
        assert limiter.next_ready() == t0 + 1.0
        assert not limiter.ready_now()
        assert not limiter.exhausted
        assert limiter.used_fraction == pytest.approx(1 / 3)

    async def test_spent_budget_waits_for_the_reset(self) -> None:
        """Once the day's budget is spent, wait_ready returns only after the UTC reset."""
        clock = FakeClock()
        limiter = _local(clock)
        for _ in range(3):
            await clock.run_until(asyncio.ensure_future(limiter.wait_ready()))
            await limiter.commit()
        assert limiter.exhausted
        reset = limiter.resets_at()
        assert reset == datetime(2026, 5, 2, tzinfo=UTC)
        expected = clock.monotonic() + (reset - clock.utcnow()).total_seconds()
        assert limiter.next_ready() == pytest.approx(expected, abs=1e-6)
        waiter = asyncio.create_task(limiter.wait_ready())
        await clock.run_until(waiter)
        assert clock.utcnow() >= reset
        assert clock.monotonic() == pytest.approx(expected, abs=1e-6)
        assert limiter.spent == 0
        assert limiter.ready_now()

    async def test_commit_without_budget_is_refused(self) -> None:
        """Committing past the guard (skipping wait_ready) is a programming error."""
        clock = FakeClock()
        limiter = _local(clock, tpd=1)
        await limiter.commit()
        with pytest.raises(RuntimeError, match="budget"):
            await limiter.commit()

    async def test_rate_and_pause_pass_through(self) -> None:
        """set_rate, pause_until and resume act on the key's pacer."""
        clock = FakeClock()
        limiter = _local(clock, tpd=None)
        t0 = await limiter.commit()
        limiter.set_rate(4.0)
        assert limiter.rate == 4.0
        assert limiter.next_ready() == t0 + 0.25
        limiter.pause_until(t0 + 9.0)
        assert limiter.next_ready() == t0 + 9.0
        limiter.resume()
        assert limiter.next_ready() == t0 + 0.25
        assert limiter.remaining is None
        assert "LocalKeyLimiter(Pacer(rate=4/s" in repr(limiter)
