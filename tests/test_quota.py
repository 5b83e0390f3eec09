"""Tests for broker.engine.quota: the per-key daily budget and its store."""

from __future__ import annotations

from datetime import UTC, date, datetime, time

import pytest

from broker.engine.quota import BatchedBudgetStore, BudgetStore, DailyBudget, MemoryBudgetStore
from broker.testing import FakeClock

# FakeClock's wall time starts at 2026-05-01 12:00 UTC: midnight is 12 h away.
TO_MIDNIGHT_S = 12 * 3600.0
DAY1 = date(2026, 5, 1)
DAY2 = date(2026, 5, 2)


class TestCounting:
    def test_counts_and_guards_at_99_percent(self) -> None:
        """The default guard allows floor(0.99 * TPD) sends, then refuses."""
        budget = DailyBudget(FakeClock(), 8640)
        assert budget.limit == 8553
        for _ in range(8553):
            assert budget.try_spend()
        assert budget.exhausted
        assert budget.remaining == 0
        assert not budget.try_spend()
        assert budget.spent == 8553
        assert budget.used_fraction == pytest.approx(8553 / 8640)

    def test_remaining_counts_down(self) -> None:
        """remaining is the guard's limit minus what was spent."""
        budget = DailyBudget(FakeClock(), 100)
        assert budget.remaining == 99
        budget.try_spend()
        assert (budget.spent, budget.remaining, budget.exhausted) == (1, 98, False)

    def test_unlimited_counts_but_never_refuses(self) -> None:
        """tpd=None counts sends but never guards."""
        budget = DailyBudget(FakeClock(), None)
        for _ in range(10_000):
            assert budget.try_spend()
        assert budget.spent == 10_000
        assert budget.remaining is None
        assert budget.used_fraction is None
        assert not budget.exhausted

    def test_tiny_budgets(self) -> None:
        """A TPD of 1 still allows its one send; a TPD of 0 allows none."""
        one = DailyBudget(FakeClock(), 1)
        assert one.try_spend()
        assert not one.try_spend()
        zero = DailyBudget(FakeClock(), 0)
        assert zero.exhausted
        assert not zero.try_spend()
        assert zero.used_fraction == 1.0

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"tpd": -1},
            {"tpd": 10, "guard_fraction": 0.0},
            {"tpd": 10, "guard_fraction": 1.5},
            {"tpd": 10, "reset_time_utc": time(8, 0, tzinfo=UTC)},
        ],
    )
    def test_invalid_arguments(self, kwargs: dict[str, object]) -> None:
        """Bad TPD, guard or reset time are refused at construction."""
        with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
            DailyBudget(FakeClock(), **kwargs)  # type: ignore[arg-type]


class TestWindow:
    async def test_resets_at_utc_midnight(self) -> None:
        """The count starts again when the UTC day changes, and resets_at moves a day on."""
        clock = FakeClock()
        budget = DailyBudget(clock, 10, guard_fraction=1.0)
        for _ in range(10):
            budget.try_spend()
        assert budget.exhausted
        assert budget.resets_at() == datetime(2026, 5, 2, tzinfo=UTC)
        assert budget.seconds_until_reset() == pytest.approx(TO_MIDNIGHT_S)
        await clock.advance(TO_MIDNIGHT_S - 0.001)
        assert budget.exhausted
        await clock.advance(0.001)
        assert (budget.exhausted, budget.spent, budget.day) == (False, 0, DAY2)
        assert budget.resets_at() == datetime(2026, 5, 3, tzinfo=UTC)

    async def test_configurable_reset_time(self) -> None:
        """A reset at 08:00 UTC puts 12:00 in the window that started at 08:00 that day."""
        clock = FakeClock()
        budget = DailyBudget(clock, 10, reset_time_utc=time(8, 0))
        assert budget.day == DAY1
        assert budget.resets_at() == datetime(2026, 5, 2, 8, 0, tzinfo=UTC)
        budget.try_spend()
        await clock.advance(TO_MIDNIGHT_S)  # midnight is not this window's boundary
        assert budget.spent == 1
        await clock.advance(8 * 3600.0)
        assert budget.spent == 0
        assert budget.day == DAY2


class TestPersistence:
    def test_store_survives_a_restart(self) -> None:
        """A new budget over the same store resumes the day's count."""
        clock = FakeClock()
        store = MemoryBudgetStore()
        first = DailyBudget(clock, 100, key_name="main", store=store)
        for _ in range(7):
            first.try_spend()
        assert store.load("main", DAY1) == 7
        assert store.load("other", DAY1) == 0
        second = DailyBudget(clock, 100, key_name="main", store=store)
        assert second.spent == 7
        assert second.try_spend()
        assert store.load("main", DAY1) == 8

    async def test_new_day_loads_its_own_count(self) -> None:
        """At the rollover the budget loads the new day's saved count (another process's)."""
        clock = FakeClock()
        store = MemoryBudgetStore()
        store.save("main", DAY2, 5)
        budget = DailyBudget(clock, 100, key_name="main", store=store)
        budget.try_spend()
        await clock.advance(TO_MIDNIGHT_S)
        assert budget.spent == 5
        assert store.load("main", DAY1) == 1

    def test_custom_store_is_used(self) -> None:
        """Any object with load/save works as a store (the daemon passes SQLite)."""
        calls: list[tuple[str, date, int]] = []

        class Recording:
            def load(self, key_name: str, day: date) -> int:
                return 41

            def save(self, key_name: str, day: date, count: int) -> None:
                calls.append((key_name, day, count))

        store: BudgetStore = Recording()
        budget = DailyBudget(FakeClock(), 100, key_name="k", store=store)
        assert budget.spent == 41
        budget.try_spend()
        assert calls == [("k", DAY1, 42)]


class TestClockJumps:
    async def test_backward_jump_keeps_the_latest_day(self) -> None:
        """A wall clock stepping back over midnight does not reopen the spent day."""
        clock = FakeClock()
        store = MemoryBudgetStore()
        budget = DailyBudget(clock, 10, guard_fraction=1.0, key_name="k", store=store)
        for _ in range(10):
            budget.try_spend()
        await clock.advance(TO_MIDNIGHT_S + 60.0)
        for _ in range(3):
            budget.try_spend()
        clock.wall_offset = -3600.0  # NTP steps the clock back an hour, into day 1
        assert clock.utcnow().date() == DAY1
        assert budget.day == DAY2
        assert budget.spent == 3
        assert budget.resets_at() == datetime(2026, 5, 3, tzinfo=UTC)
        assert budget.try_spend()
        assert store.load("k", DAY2) == 4
        assert store.load("k", DAY1) == 10

    async def test_backward_jump_within_the_day_changes_nothing(self) -> None:
        """A backwards step that stays inside the day keeps the count."""
        clock = FakeClock()
        budget = DailyBudget(clock, 10)
        budget.try_spend()
        clock.wall_offset = -7200.0
        assert budget.spent == 1
        assert budget.day == DAY1

    def test_forward_jump_starts_the_new_day(self) -> None:
        """A forward step into the next day starts that day's window."""
        clock = FakeClock()
        budget = DailyBudget(clock, 10, guard_fraction=1.0)
        for _ in range(10):
            budget.try_spend()
        clock.wall_offset = TO_MIDNIGHT_S
        assert not budget.exhausted
        assert budget.day == DAY2

    def test_repr_shows_live_state(self) -> None:
        """The repr names the key, the window day and the count."""
        budget = DailyBudget(FakeClock(), 10, key_name="main")
        budget.try_spend()
        assert repr(budget) == ("DailyBudget(key='main', day=2026-05-01, spent=1, limit=9, tpd=10)")


class TestBatchedBudgetStore:
    """Durable budget writes batched to at most one per interval."""

    def _store(self) -> tuple[BatchedBudgetStore, MemoryBudgetStore, list[float]]:
        now = [100.0]
        inner = MemoryBudgetStore()
        return BatchedBudgetStore(inner, monotonic=lambda: now[0], every_s=1.0), inner, now

    def test_first_save_writes_through_then_batches(self) -> None:
        """The first count is written at once; later ones wait for the interval."""
        store, inner, now = self._store()
        day = date(2026, 5, 1)
        store.save("k", day, 1)
        assert inner.load("k", day) == 1
        store.save("k", day, 2)
        store.save("k", day, 3)
        assert inner.load("k", day) == 1
        assert store.load("k", day) == 3
        now[0] += 1.0
        store.save("k", day, 4)
        assert inner.load("k", day) == 4

    def test_flush_writes_every_key(self) -> None:
        """flush writes the unwritten counts of every key and day."""
        store, inner, _ = self._store()
        day = date(2026, 5, 1)
        store.save("a", day, 1)
        store.save("a", day, 2)
        store.save("b", day, 7)
        store.flush()
        assert (inner.load("a", day), inner.load("b", day)) == (2, 7)

    def test_failed_write_keeps_the_unwritten_count(self) -> None:
        """A write that fails leaves its count unwritten for the next flush."""

        class Flaky(MemoryBudgetStore):
            fail = True

            def save(self, key_name: str, day: date, count: int) -> None:
                if self.fail:
                    raise OSError(28, "No space left on device")
                super().save(key_name, day, count)

        inner = Flaky()
        store = BatchedBudgetStore(inner, monotonic=lambda: 0.0)
        day = date(2026, 5, 1)
        with pytest.raises(OSError, match="No space"):
            store.save("k", day, 5)
        inner.fail = False
        store.flush()
        assert inner.load("k", day) == 5
