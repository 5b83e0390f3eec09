"""The shared limiter: several processes on one key pace, count, cut and park as one.

"Processes" here are limiters or brokers with their own process ids on one store: the
memory store on a fake clock for the unit tests, a SQLite file for the brokers in a row,
and a real ``redis-server`` that is stopped and restarted mid-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import errno
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from conftest import (
    CountingStore,
    Harness,
    OutageStore,
    account,
    asins,
    drive,
    key_doc,
    make_config,
)
from structlog.testing import capture_logs

from broker.engine.adaptive import AdaptiveSettings, CircuitState, ThrottleVerdict
from broker.engine.shared_limiter import (
    SendRefused,
    SharedAdaptiveRate,
    SharedCircuit,
    SharedKeyLimiter,
    SharedState,
    account_day_limit,
    shared_key_parts,
)
from broker.errors import ConfigError, StateUnavailableError
from broker.simulator.settings import SimulatorSettings
from broker.state import Decision, KeyLimits, MemoryStateStore, StateKey
from broker.state.redis import RedisStateStore
from broker.state.redis_server import RedisServer, redis_server_binary
from broker.testing import FakeClock, settle

KEY = StateKey.of("http://sim", "cred", name="k")


def _store(clock: FakeClock) -> MemoryStateStore:
    return MemoryStateStore(
        lambda: int(clock.monotonic() * 1e6), lambda: int(clock.utcnow().timestamp() * 1e6)
    )


def _limiter(
    clock: FakeClock, store: MemoryStateStore, name: str, limits: KeyLimits | None = None
) -> SharedKeyLimiter:
    limits = limits or KeyLimits(5.0, 0.05, 5.0, day_limit=1000, tpd=1000)
    return SharedKeyLimiter(clock, store, KEY, limits, process_id=name)


async def _parked_by_another(
    clock: FakeClock, store: MemoryStateStore, *, park_s: float
) -> tuple[SharedKeyLimiter, float]:
    """Process a takes a 429 (a cut) and parks the key for Amazon's spent quota; process b,
    returned, learns the park from the store (a refused send). Also the cut rate."""
    settings = AdaptiveSettings(park_s=park_s, probe_jitter=0.0)
    a, b = _limiter(clock, store, "a"), _limiter(clock, store, "b")
    circuit_a = SharedCircuit(a, clock, random=lambda: 0.0, settings=settings)
    a.record_throttled(await a.commit())
    await clock.advance(0.001)
    cut = (await a.refresh()).rate
    circuit_a.open(ThrottleVerdict.QUOTA_EXHAUSTED)
    await clock.advance(0.001)
    with pytest.raises(SendRefused, match="parked"):
        await b.commit()
    return b, cut


class _Skewed:
    """A clock whose wall time runs ``ahead_s`` ahead of ``inner``'s (its timers are inner's)."""

    def __init__(self, inner: FakeClock, ahead_s: float) -> None:
        self._inner, self._ahead_s = inner, ahead_s

    def monotonic(self) -> float:
        return self._inner.monotonic()

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)

    def utcnow(self) -> dt.datetime:
        return self._inner.utcnow() + dt.timedelta(seconds=self._ahead_s)


async def _send_loop(limiter: SharedKeyLimiter, sent: list[tuple[str, float]], name: str) -> None:
    while True:
        await limiter.wait_ready()
        try:
            sent.append((name, await limiter.commit()))
        except SendRefused:
            continue


class TestPacing:
    """Two processes' sends are spaced as one key's."""

    async def test_two_processes_share_one_rate(self) -> None:
        """Two limiters at 5/s on one key send 5/s together, never closer than 200 ms."""
        clock = FakeClock()
        store = _store(clock)
        sent: list[tuple[str, float]] = []
        tasks = [asyncio.create_task(_send_loop(_limiter(clock, store, n), sent, n)) for n in "ab"]
        await clock.advance(10.0)
        for task in tasks:
            task.cancel()
        times = sorted(t for _, t in sent)
        assert 49 <= len(times) <= 52
        assert min(b - a for a, b in itertools.pairwise(times)) >= 0.2 - 1e-6
        assert {n for n, _ in sent} == {"a", "b"}

    async def test_a_dead_process_costs_at_most_one_slot(self) -> None:
        """A process that reserved and died delays the others by one slot, no more."""
        clock = FakeClock()
        store = _store(clock)
        dead = _limiter(clock, store, "dead")
        await dead.commit()
        dying = asyncio.create_task(dead.commit())  # reserves the next slot, then is killed
        await asyncio.sleep(0)
        dying.cancel()
        alive = _limiter(clock, store, "alive")
        start = clock.monotonic()
        task = asyncio.create_task(alive.commit())
        await clock.advance(1.0)
        assert task.done()
        assert task.result() - start == pytest.approx(0.4, abs=1e-5)


class TestSharedFeedback:
    """Cuts, pauses and parks made by one process hold for the other."""

    async def test_a_round_of_429s_in_two_processes_cuts_once(self) -> None:
        """Both processes report a 429 of sends decided before any cut: one 10 % cut."""
        clock = FakeClock()
        store = _store(clock)
        a, b = _limiter(clock, store, "a"), _limiter(clock, store, "b")
        sent_a = await a.commit()
        task = asyncio.create_task(b.commit())
        await clock.advance(0.201)
        sent_b = task.result()
        await clock.advance(0.05)
        a.record_throttled(sent_a)
        b.record_throttled(sent_b)
        await clock.advance(0.01)
        assert (await a.refresh()).rate == pytest.approx(4.5)
        assert (await b.refresh()).rate == pytest.approx(4.5)

    async def test_a_pause_in_one_process_holds_the_other(self) -> None:
        """A Retry-After pause seen by one process moves the other's next slot past it."""
        clock = FakeClock()
        store = _store(clock)
        a, b = _limiter(clock, store, "a"), _limiter(clock, store, "b")
        await a.commit()
        a.pause_until(clock.monotonic() + 3.0, reason="Retry-After")
        await clock.advance(0.001)
        start = clock.monotonic()
        task = asyncio.create_task(b.commit())
        await clock.advance(3.5)
        assert task.result() - start >= 2.99
        assert (await b.refresh()).pause_reason == ""  # over by now

    async def test_a_park_in_one_process_refuses_the_other(self) -> None:
        """One process's circuit parks the key: the other's commit is refused until the probe."""
        clock = FakeClock()
        store = _store(clock)
        settings = AdaptiveSettings(park_s=60.0, probe_jitter=0.0)
        a, b = _limiter(clock, store, "a"), _limiter(clock, store, "b")
        circuit_a = SharedCircuit(a, clock, random=lambda: 0.0, settings=settings)
        await a.commit()
        circuit_a.open(ThrottleVerdict.QUOTA_EXHAUSTED)
        await clock.advance(0.001)
        with pytest.raises(SendRefused) as info:
            await b.commit()
        assert info.value.refusal == "parked"
        assert b.last_decision is not None
        assert b.last_decision.park_reason == "daily quota exhausted"
        waiter = asyncio.create_task(b.wait_ready())
        await clock.advance(30.0)
        assert not waiter.done()  # held for the park
        await clock.advance(31.0)
        assert waiter.done()
        probe_at = await b.commit()  # the single probe
        assert b.last_decision.probe
        with pytest.raises(SendRefused, match="probing"):
            await a.commit()
        b.record_success(demand_limited=False)  # the probe got through: unpark for all
        await clock.advance(0.001)
        assert (await a.refresh()).parked_until_us == 0
        assert probe_at > 0

    async def test_a_park_survives_a_store_that_lost_the_key(self) -> None:
        """The store loses the key (Redis restarted empty) while it is parked: a process
        that learnt the park from the store, and so has no park of its own, is still
        refused, and the key's rate is not back at nominal. It was sent through at once."""
        clock = FakeClock()
        store = _store(clock)
        b, cut = await _parked_by_another(clock, store, park_s=60.0)
        store.drop(KEY)
        await clock.advance(1.0)
        with pytest.raises(SendRefused, match="parked"):
            await b.commit()
        assert b.last_decision is not None
        assert b.last_decision.park_reason == "daily quota exhausted"
        assert b.last_decision.rate == pytest.approx(cut)
        assert cut < 5.0

    async def test_a_park_survives_a_lost_store_while_a_process_waits_it_out(self) -> None:
        """A process waiting out an hour's park in wait_ready asks the store again every
        30 s; the store loses the key meanwhile: its next ask still carries the park, and it
        keeps waiting. Its mark was empty (each recheck dropped the last answer), and the
        key came back unparked at the nominal rate."""
        clock = FakeClock()
        store = _store(clock)
        b, _ = await _parked_by_another(clock, store, park_s=3600.0)
        waiter = asyncio.create_task(b.wait_ready())
        await clock.advance(45.0)  # one recheck, at 30 s
        assert not waiter.done()
        store.drop(KEY)
        await clock.advance(30.0)  # the next recheck asks the store that lost the key
        assert not waiter.done()
        assert b.last_decision is not None
        assert b.last_decision.parked_until_us > 0
        waiter.cancel()

    async def test_two_losses_in_a_day_lose_no_sends(self) -> None:
        """P sends 5, the store loses the key, Q sends 2, it loses the key again, P sends
        1: the day's count is 8. It was 6: P's mark (its count, plus the sends since the
        last loss) knew nothing of Q's 2, granted in a generation P never saw."""
        clock = FakeClock()
        store = _store(clock)
        p, q = _limiter(clock, store, "p"), _limiter(clock, store, "q")
        for _ in range(5):
            await p.commit()
            await clock.advance(0.5)
        store.drop(KEY)
        for _ in range(2):
            await q.commit()
            await clock.advance(0.5)
        store.drop(KEY)
        await p.commit()
        await clock.advance(0.5)
        assert (await q.refresh()).count == 8
        assert (await p.refresh()).count == 8

    async def test_a_loss_after_every_few_sends_loses_no_sends(self) -> None:
        """Three processes take turns sending, the store losing the key after every second
        send (Redis flushed again and again): the day's count, once each has asked again,
        is every send granted. Each mark knew only its last generation, and a record that
        forgot every earlier one at each loss counted a fraction (132 sends of a 101 a day
        in a live run with a flush every 0.7 s)."""
        clock = FakeClock()
        store = _store(clock)
        procs = [_limiter(clock, store, name) for name in ("p", "q", "r")]
        sent = 0
        for round_ in range(12):
            for limiter in procs:
                await limiter.commit()
                sent += 1
                await clock.advance(0.5)
                if round_ % 2:
                    store.drop(KEY)
        counts = [(await limiter.refresh()).count for limiter in procs]
        assert counts[-1] == sent == 36

    async def test_a_day_begun_over_another_resets_is_warned_of(self) -> None:
        """Process a (reset 00:00) sends and closes; process b (reset 08:00) asks at 09:00
        and begins a new day: it warns once that two resets taking turns give the key its
        quota twice a day."""
        clock = FakeClock(epoch=dt.datetime(2026, 5, 1, 1, 0, tzinfo=dt.UTC))
        store = _store(clock)
        a = _limiter(clock, store, "a")
        await a.commit()
        await a.aclose()
        await clock.advance(8 * 3600.0)
        limits = dataclasses.replace(
            KeyLimits(5.0, 0.05, 5.0, day_limit=1000, tpd=1000), reset_offset_s=8 * 3600
        )
        b = _limiter(clock, store, "b", limits)
        with capture_logs() as logs:
            await b.commit()
            await clock.advance(0.5)
            await b.commit()
        said = [e for e in logs if e["event"] == "broker.daily_reset_differs"]
        assert [(e["daily_reset_utc"], e["counted_under"]) for e in said] == [("08:00", "00:00")]

    async def test_a_refused_probe_does_not_leave_the_circuit_half_open(self) -> None:
        """Two parked processes: one probes; the other's refused probe re-opens its circuit,
        and once the probe got through it sends again."""
        clock = FakeClock()
        store = _store(clock)
        settings = AdaptiveSettings(park_s=60.0, probe_jitter=0.0)
        a, b = _limiter(clock, store, "a"), _limiter(clock, store, "b")
        circuit_a = SharedCircuit(a, clock, random=lambda: 0.0, settings=settings)
        circuit_b = SharedCircuit(b, clock, random=lambda: 0.0, settings=settings)
        circuit_a.open(ThrottleVerdict.ACCESS_REVOKED)
        circuit_b.open(ThrottleVerdict.ACCESS_REVOKED)
        await clock.advance(60.5)
        assert circuit_a.try_probe()
        assert circuit_b.try_probe()
        await a.commit()  # a's probe is the one
        with pytest.raises(SendRefused, match="probing"):
            await b.commit()
        assert circuit_b.state is CircuitState.OPEN  # not stuck probing
        circuit_a.on_success()  # a's probe got through: unparked for all
        await clock.advance(0.01)
        assert circuit_b.probe_at is not None
        await clock.advance(circuit_b.probe_at - clock.monotonic())
        assert circuit_b.try_probe()
        task = asyncio.create_task(b.commit())
        await clock.advance(0.5)
        assert task.done()
        assert task.result() > 0

    async def test_adaptive_rate_reads_and_cuts_the_shared_rate(self) -> None:
        """SharedAdaptiveRate classifies locally but its rate is the store's."""
        clock = FakeClock()
        store = _store(clock)
        a, b = _limiter(clock, store, "a"), _limiter(clock, store, "b")
        adaptive = SharedAdaptiveRate(a, 5.0, clock=clock)
        sent = await a.commit()
        await clock.advance(0.1)
        assert adaptive.on_throttled(sent) is ThrottleVerdict.RATE
        await clock.advance(0.01)
        await b.refresh()
        assert b.rate == pytest.approx(4.5)
        assert adaptive.rate == pytest.approx(4.5)


class TestBooked:
    async def test_booked_is_told_before_the_wait_for_the_slot(self) -> None:
        """commit(booked) calls booked as soon as the store has counted the send, before it
        waits for the slot: a stop in that wait must not let go of a send paid for."""
        clock = FakeClock()
        store = _store(clock)
        a, b = _limiter(clock, store, "a"), _limiter(clock, store, "b")
        await a.commit()
        told: list[float] = []
        sending = asyncio.create_task(b.commit(lambda: told.append(clock.monotonic())))
        await settle()
        assert told == [clock.monotonic()]  # counted, and still waiting for its slot
        assert not sending.done()
        await clock.advance(0.3)
        assert sending.done()


class TestRunOf429s:
    async def test_processes_share_the_evidence_of_a_spent_quota(self) -> None:
        """Two processes on a key at its floor rate, each with 5 of the 10 429s in a row the
        classifier needs: the 10th 429 of the key, whichever process gets it, is read as
        not a rate problem; each process needed its own 10 (N processes, N times the 429s
        before the key parked)."""
        clock = FakeClock()
        store = _store(clock)
        floor = KeyLimits(0.05, 0.05, 0.05, day_limit=1000, tpd=1000)
        limiters = [_limiter(clock, store, name, floor) for name in ("a", "b")]
        rates = [SharedAdaptiveRate(limiter, 0.05, clock=clock) for limiter in limiters]
        verdicts = []
        for turn in range(10):
            limiter, adaptive = limiters[turn % 2], rates[turn % 2]
            await limiter.refresh()  # each send's decision carries the key's run back
            verdicts.append(adaptive.on_throttled(clock.monotonic()))
            await clock.advance(1.0)
        assert verdicts[:9] == [ThrottleVerdict.RATE] * 9
        assert verdicts[9] is not ThrottleVerdict.RATE

    async def test_a_success_ends_the_run_for_every_process(self) -> None:
        """A success of one process ends the key's run at once (told to the store then, not
        at its next send): the other's next 429 starts anew."""
        clock = FakeClock()
        store = _store(clock)
        a, b = _limiter(clock, store, "a"), _limiter(clock, store, "b")
        for _ in range(4):
            a.record_throttled(clock.monotonic())
        await a.refresh()
        await b.refresh()
        await settle()  # the flushes the 429s asked for are done
        assert b.run_429s == 4
        a.record_success(demand_limited=False)
        assert a.run_429s == 0
        await settle()  # no call of a's own: the success is told by itself
        b.record_throttled(clock.monotonic())
        await b.refresh()
        assert b.run_429s == 1

    async def test_another_process_success_lowers_the_count_a_process_took_on(self) -> None:
        """At the floor rate: a has 8 429s, b one (b counts 9); a's success ends the run, so
        b's next 429 is the run's first, not a tenth that parks the key (b kept the larger of
        its own count and the key's)."""
        clock = FakeClock()
        store = _store(clock)
        floor = KeyLimits(0.05, 0.05, 0.05, day_limit=1000, tpd=1000)
        a, b = _limiter(clock, store, "a", floor), _limiter(clock, store, "b", floor)
        adaptive = SharedAdaptiveRate(b, 0.05, clock=clock)
        for _ in range(8):
            a.record_throttled(clock.monotonic())
        await a.refresh()
        await b.refresh()
        assert adaptive.on_throttled(clock.monotonic()) is ThrottleVerdict.RATE  # the 9th
        await b.refresh()
        a.record_success(demand_limited=False)
        await settle()
        await b.refresh()
        assert adaptive.on_throttled(clock.monotonic()) is ThrottleVerdict.RATE


class TestDailyQuota:
    """The day's count is the key's, not a process's."""

    async def test_refusal_at_the_limit_raises_send_refused(self) -> None:
        """Another process spent the last request: commit raises SendRefused, exhausted is set."""
        clock = FakeClock()
        store = _store(clock)
        limits = KeyLimits(5.0, 0.05, 5.0, day_limit=2, tpd=2)
        a, b = _limiter(clock, store, "a", limits), _limiter(clock, store, "b", limits)
        await a.commit()
        task = asyncio.create_task(a.commit())
        await clock.advance(0.3)
        await task
        with pytest.raises(SendRefused, match="daily quota"):
            await b.commit()
        assert b.exhausted
        assert b.remaining == 0
        assert b.used_fraction == 1.0

    async def test_a_park_reads_alike_on_a_machine_whose_clock_runs_ahead(self) -> None:
        """A park's probe time is told by the store's clock, as the daily reset is: a
        process 8 h ahead shows the same instant as one on time. It showed its own clock's,
        8 h later, beside a reset told by the store's."""
        clock = FakeClock()
        store = _store(clock)
        settings = AdaptiveSettings(park_s=900.0, probe_jitter=0.0)
        on_time = _limiter(clock, store, "a")
        ahead = SharedKeyLimiter(
            _Skewed(clock, 8 * 3600.0), store, KEY, on_time._limits, process_id="b"
        )
        SharedCircuit(on_time, clock, random=lambda: 0.0, settings=settings).open(
            ThrottleVerdict.QUOTA_EXHAUSTED
        )
        await on_time.refresh()
        await ahead.refresh()
        parked_a, parked_b = on_time.parked(), ahead.parked()
        assert parked_a is not None
        assert parked_b is not None
        assert abs((parked_b[1] - parked_a[1]).total_seconds()) < 1.0
        assert ahead.wall_now() == on_time.wall_now()

    async def test_a_process_whose_clock_runs_ahead_counts_the_stores_day(self) -> None:
        """A process 6 h ahead of the store's clock, past midnight by its own clock, still
        sees the store's spent day: exhausted, nothing left, waiting until the store's reset."""
        clock = FakeClock(epoch=dt.datetime(2026, 12, 3, 20, 0, tzinfo=dt.UTC))
        store_wall = lambda: int(clock.utcnow().timestamp() * 1e6)  # noqa: E731
        store = MemoryStateStore(lambda: int(clock.monotonic() * 1e6), store_wall)
        limits = KeyLimits(5.0, 0.05, 5.0, day_limit=2, tpd=2)
        # 02:00 the next day by its own clock
        ahead = SharedKeyLimiter(_Skewed(clock, 6 * 3600.0), store, KEY, limits, process_id="a")
        for _ in range(2):
            sending = asyncio.create_task(ahead.commit())
            await clock.advance(0.3)
            await sending
        assert ahead.exhausted
        assert ahead.remaining == 0
        assert ahead.resets_at() == dt.datetime(2026, 12, 4, tzinfo=dt.UTC)
        waiting = asyncio.create_task(ahead.wait_ready())
        await clock.advance(3 * 3600.0)  # 23:00 by the store: the day is still spent
        assert not waiting.done()
        await clock.advance(3600.0 + 31.0)  # past the store's midnight: a new day
        assert waiting.done()
        assert ahead.spent == 0

    async def test_a_waiting_process_reasserts_the_day_after_an_empty_restart(self) -> None:
        """The store loses the day (Redis restarted empty, the SQLite file deleted); a
        process waiting for the quota brings its count back within 2 s, so a newcomer spends
        at most that long again (30 s: a hunt's newcomer sent 20 requests past the day)."""
        clock = FakeClock()
        store = _store(clock)
        limits = KeyLimits(1.0, 0.05, 1.0, day_limit=100, tpd=100)
        a, b = _limiter(clock, store, "a", limits), _limiter(clock, store, "b", limits)
        for _ in range(100):
            sending = asyncio.create_task(a.commit())
            await clock.advance(1.0)
            await sending
        waiting = asyncio.create_task(a.wait_ready())  # the day is spent: a waits for it
        await clock.advance(5.0)
        store._records.clear()  # the restart
        granted = 0
        for _ in range(100):
            await clock.advance(1.0)
            try:
                sending = asyncio.create_task(b.commit())
                await clock.advance(0.0)
                await sending
            except SendRefused:
                break
            granted += 1
        assert granted <= 3
        waiting.cancel()

    async def test_a_process_held_to_another_reset_s_window_reads_the_day_spent(
        self,
    ) -> None:
        """A process whose own reset passed half an hour ago, held to the window another
        live process's reset counts (an hour old, spent): it reads the key as spent until
        that window's end, a day after the other's reset. Judged by its own reset, it read
        the key as not spent (no quota warning, no --no-wait stop), while every send of
        it was refused."""
        clock = FakeClock()
        store = _store(clock)
        now_s = int(clock.utcnow().timestamp())
        limits = KeyLimits(5.0, 0.05, 5.0, day_limit=2, tpd=3)
        first = dataclasses.replace(limits, reset_offset_s=(now_s - 3_600) % 86_400)
        other = dataclasses.replace(limits, reset_offset_s=(now_s - 1_800) % 86_400)
        a, c = _limiter(clock, store, "a", first), _limiter(clock, store, "c", other)
        for _ in range(2):
            sending = asyncio.create_task(a.commit())
            await clock.advance(0.5)
            await sending
        await c.refresh()
        assert (c.exhausted, c.spent) == (True, 2)
        assert c.resets_at() == a.resets_at()
        assert c.resets_at() == dt.datetime.fromtimestamp(now_s - 3_600 + 86_400, dt.UTC)

    async def test_a_spent_day_reads_spent_while_a_wait_asks_the_store_again(self) -> None:
        """While a key waiting for its reset asks the store again (every 2 s), and while the
        store is out of reach, it still reads as spent by the last answer: the quota
        metrics, /readyz and the progress line read it as not spent for each ask."""
        clock = FakeClock()
        store = _GatedStore(clock)
        limits = KeyLimits(5.0, 0.05, 5.0, day_limit=2, tpd=2)
        limiter = SharedKeyLimiter(clock, cast("Any", store), KEY, limits, process_id="a")
        await _send(clock, limiter, 2)
        assert (limiter.exhausted, limiter.spent, limiter.remaining) == (True, 2, 0)
        waiting = asyncio.create_task(limiter.wait_ready())
        await clock.advance(0.0)
        store.gate.clear()  # the next ask takes a while (a Redis round trip, stretched)
        before = store.calls
        await clock.advance(2.5)  # the hold ends: the wait asks again
        assert store.calls == before + 1
        assert (limiter.exhausted, limiter.spent, limiter.remaining) == (True, 2, 0)
        store.down = True
        store.gate.set()
        await clock.advance(30.0)  # its asks fail meanwhile
        assert store.calls > before + 1
        assert (limiter.exhausted, limiter.spent, limiter.remaining) == (True, 2, 0)
        store.down = False
        await clock.advance(30.0)
        assert (limiter.exhausted, limiter.spent) == (True, 2)
        assert not waiting.done()
        waiting.cancel()

    async def test_a_park_reads_parked_while_a_wait_asks_the_store_again(self) -> None:
        """A key parked for 15 minutes still reads as parked, at its reason, while its wait
        asks the store again (every 30 s)."""
        clock = FakeClock()
        store = _GatedStore(clock)
        limiter = SharedKeyLimiter(
            clock, cast("Any", store), KEY, KeyLimits(5.0, 0.05, 5.0), process_id="a"
        )
        await limiter.commit()
        limiter.park(900.0, "quota_exhausted")
        await limiter.refresh()
        rate = limiter.rate
        waiting = asyncio.create_task(limiter.wait_ready())
        await clock.advance(0.0)
        store.gate.clear()
        before = store.calls
        await clock.advance(30.0)
        assert store.calls == before + 1
        parked = limiter.parked()
        assert parked is not None
        assert parked[0] == "quota_exhausted"
        assert limiter.rate == rate
        store.gate.set()
        waiting.cancel()

    async def test_a_parked_key_asks_the_store_every_30_s(self) -> None:
        """A key parked for 15 minutes asks the store at least every 30 s while it waits."""
        clock = FakeClock()
        store = CountingStore(_store(clock))
        limiter = SharedKeyLimiter(
            clock, cast("Any", store), KEY, KeyLimits(5.0, 0.05, 5.0), process_id="a"
        )
        await limiter.commit()
        limiter.park(900.0, "quota_exhausted")
        await limiter.refresh()
        waiting = asyncio.create_task(limiter.wait_ready())
        before = store.calls
        for _ in range(20):
            await clock.advance(30.0)
        assert store.calls - before >= 19  # 600 s of waiting: an ask each 30 s
        assert not waiting.done()
        waiting.cancel()

    async def test_two_brokers_in_a_row_stay_within_tpd(
        self, harness: Harness, tmp_path: Path
    ) -> None:
        """N6: two runs in a row on one key with tpd 30 send 29 requests in all, not 50."""
        clock = FakeClock()
        settings = SimulatorSettings(
            accounts=(account("demo", "demo-id", "demo-secret", tps=5.0, tpd=1000),),
            burst=2,  # as in the benchmark: the store's µs clock may send a µs before the grid
        )
        sim = await harness.simulator(settings, clock=clock)
        # Named: on a fake clock, the default is a store per broker (see Broker's clock).
        state = {"path": str(tmp_path / "keys.sqlite3")}
        config = make_config(sim.url, keys=[key_doc(tps=5.0, tpd=30)], state=state)
        spent = []
        for run in range(2):
            transport = await harness.transport()
            broker = await harness.broker(config, clock=clock, transport=transport)
            task = asyncio.get_running_loop().create_task(broker.get_items(asins(250, f"B{run}")))
            with contextlib.suppress(TimeoutError):
                await drive(clock, task, transport, limit_s=60.0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            (key,) = broker.metrics().keys
            spent.append(key.daily_spent)
        assert 25 <= spent[0] < 29  # 25 batches (a linger flush may split one)
        assert spent[1] == 29  # the second run counted on from the first one's count
        assert key.reason == "waiting for daily quota"
        demo = sim.stats.accounts["demo"]
        assert demo.accepted + demo.throttled == 29  # 30 less the 1 % guard, 429s included


async def _one_key(harness: Harness, clock: FakeClock) -> tuple[Any, Any, Any]:
    """A simulator with one 5/s key on ``clock``, a transport to it, and a config naming it."""
    settings = SimulatorSettings(
        accounts=(account("demo", "demo-id", "demo-secret", tps=5.0, tpd=100_000),),
        burst=2,
    )
    sim = await harness.simulator(settings, clock=clock)
    transport = await harness.transport()
    return sim, transport, make_config(sim.url, keys=[key_doc(tps=5.0, tpd=100_000)])


class TestConcurrentBrokers:
    """Brokers in one event loop stand in for processes sharing a key."""

    async def test_two_brokers_share_the_rate_without_429s(self, harness: Harness) -> None:
        """Two brokers on one store and one 5/s key: 5/s together, no 429."""
        clock = FakeClock()
        sim, transport, config = await _one_key(harness, clock)
        store = _store(clock)
        brokers = [
            await harness.broker(config, clock=clock, transport=transport, state_store=store)
            for _ in range(2)
        ]
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(b.get_items(asins(200, f"B{i}"))) for i, b in enumerate(brokers)]
        start = clock.monotonic()
        await drive(clock, asyncio.gather(*tasks), transport)
        elapsed = clock.monotonic() - start
        stats = sim.stats.accounts["demo"]
        assert stats.throttled == 0
        assert stats.accepted == 40
        assert 7.6 <= elapsed <= 8.5  # 40 sends at 5/s: 39 gaps of 200 ms

    async def test_a_long_pause_from_another_process_lets_another_key_send(
        self, harness: Harness
    ) -> None:
        """Another process pauses key one for 30 s (a Retry-After) while both keys send: the
        batch key one then asks to book goes back to the queue and key two sends it,
        instead of key one holding it for the 30 s inside its booking."""
        from broker.state import Feedback

        clock = FakeClock()
        settings = SimulatorSettings(
            accounts=(
                account("one", "one-id", "demo-secret", tps=5.0, tpd=100_000),
                account("two", "two-id", "demo-secret", tps=5.0, tpd=100_000),
            ),
            burst=2,
        )
        sim = await harness.simulator(settings, clock=clock)
        transport = await harness.transport()
        config = make_config(
            sim.url,
            keys=[
                key_doc("one", credential_id="one-id", tps=5.0),
                key_doc("two", credential_id="two-id", tps=5.0),
            ],
        )
        store = _store(clock)
        broker = await harness.broker(config, clock=clock, transport=transport, state_store=store)
        other = KeyLimits(5.0, 0.05, 5.0, day_limit=99_000, tpd=100_000)
        pause = Feedback(pause_s=30.0, pause_reason="Retry-After")

        async def pause_one() -> None:
            await clock.sleep(1.0)
            await store.decide(
                StateKey.of(sim.url, "one-id"), other, feedback=pause, reserve=False, process=None
            )

        loop = asyncio.get_running_loop()
        start = clock.monotonic()
        task = loop.create_task(broker.get_items(asins(200, "B")))
        await drive(clock, asyncio.gather(task, loop.create_task(pause_one())), transport)
        assert all(r.ok for r in task.result())
        # 20 requests: about 1 s on both keys, then the rest on key two alone.
        assert clock.monotonic() - start < 5.0

    async def test_a_park_set_by_another_process_shows_here(self, harness: Harness) -> None:
        """A key another process parked shows parked here too, with the park's reason and
        probe time, while this process waits: /readyz, /metrics and --no-wait read it."""
        from broker.jobs.runner import quota_wait
        from broker.state import Feedback

        clock = FakeClock()
        sim, transport, config = await _one_key(harness, clock)
        store = _store(clock)
        broker = await harness.broker(config, clock=clock, transport=transport, state_store=store)
        loop = asyncio.get_running_loop()
        await drive(clock, loop.create_task(broker.get_items(asins(10, "B"))), transport)
        (key,) = broker.metrics().keys
        assert (key.state, key.reason) == ("active", None)
        other = KeyLimits(5.0, 0.05, 5.0, day_limit=99_000, tpd=100_000)
        park = Feedback(park_s=900.0, park_reason="daily quota exhausted")
        state_key = StateKey.of(sim.url, "demo-id")
        await store.decide(state_key, other, feedback=park, reserve=False, process=None)
        waiting = loop.create_task(broker.get_items(asins(10, "C")))
        await clock.advance(1.0)
        (key,) = broker.metrics().keys
        assert (key.state, key.reason) == ("parked", "daily quota exhausted")
        probe_at = clock.utcnow() + dt.timedelta(seconds=899.0)
        assert key.until == probe_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert quota_wait(broker.metrics(), now=clock.utcnow()) == key.until
        assert not waiting.done()
        assert sim.stats.accounts["demo"].accepted == 1  # nothing sent into the park
        waiting.cancel()

    async def test_a_day_another_process_spent_is_warned_about_here(self, harness: Harness) -> None:
        """A process that learns from the shared state that the day is spent (another spent
        it, and it never reaches a send) still logs broker.daily_quota_spent, once."""
        clock = FakeClock()
        sim = await harness.simulator(
            SimulatorSettings(accounts=(account("demo", "demo-id", "demo-secret", tps=5.0),)),
            clock=clock,
        )
        transport = await harness.transport()
        config = make_config(sim.url, keys=[key_doc(tps=5.0, tpd=10)])
        store = _store(clock)
        spender, waiter = [
            await harness.broker(config, clock=clock, transport=transport, state_store=store)
            for _ in range(2)
        ]
        loop = asyncio.get_running_loop()
        with capture_logs() as logs:
            spending = loop.create_task(spender.get_items(asins(200, "A")))
            await clock.advance(10.0)
            waiting = loop.create_task(waiter.get_items(asins(10, "B")))
            await clock.advance(120.0)
        warnings = [e for e in logs if e["event"] == "broker.daily_quota_spent"]
        assert len(warnings) == 2  # one per process, though the second never sent
        assert sim.stats.accounts["demo"].accepted == 9
        assert not waiting.done()
        spending.cancel()
        waiting.cancel()

    async def test_a_hold_by_another_process_s_lower_tpd_is_logged_as_such(
        self, harness: Harness
    ) -> None:
        """A broker with tpd 1000 held by another's tpd 10 logs broker.daily_quota_held with
        an until a minute away at most, not broker.daily_quota_spent with the reset (it
        said the day was spent until midnight while it waited seconds)."""
        clock = FakeClock()
        sim = await harness.simulator(
            SimulatorSettings(accounts=(account("demo", "demo-id", "demo-secret", tps=5.0),)),
            clock=clock,
        )
        transport = await harness.transport()
        store = _store(clock)
        low, high = [
            await harness.broker(
                make_config(sim.url, keys=[key_doc(tps=5.0, tpd=tpd)]),
                clock=clock,
                transport=transport,
                state_store=store,
            )
            for tpd in (10, 1000)
        ]
        loop = asyncio.get_running_loop()
        with capture_logs() as logs:
            spending = loop.create_task(low.get_items(asins(200, "A")))
            await clock.advance(10.0)
            waiting = loop.create_task(high.get_items(asins(10, "B")))
            await clock.advance(20.0)
        held = [e for e in logs if e["event"] == "broker.daily_quota_held"]
        spent = [e for e in logs if e["event"] == "broker.daily_quota_spent"]
        assert len(held) == 1
        until = dt.datetime.fromisoformat(held[0]["until"])
        assert until <= clock.utcnow() + dt.timedelta(seconds=61)
        assert len(spent) == 1  # the low process's own day
        assert not waiting.done()
        spending.cancel()
        waiting.cancel()

    async def test_an_idle_broker_reasserts_the_day_after_an_empty_restart(
        self, harness: Harness
    ) -> None:
        """A broker with no work (an idle daemon) still asks the store every 30 s: after the
        store loses the key (Redis restarted empty) the day's count is back within 30 s."""
        clock = FakeClock()
        _, transport, config = await _one_key(harness, clock)
        store = CountingStore(_store(clock))  # standing in for Redis
        broker = await harness.broker(
            config, clock=clock, transport=transport, state_store=cast("Any", store)
        )
        await drive(
            clock,
            asyncio.get_running_loop().create_task(broker.get_items(asins(50, "B"))),
            transport,
        )
        (key,) = broker.metrics().keys
        assert key.daily_spent == 5
        await clock.advance(120.0)  # idle
        store.inner._records.clear()  # the restart
        await clock.advance(31.0)
        (record,) = store.inner._records.values()
        assert record.count == 5

    async def test_an_idle_broker_outlives_a_store_error_on_a_beat(self, harness: Harness) -> None:
        """A keep-alive beat that meets a store error (a full disk) is logged and tried again
        at the next beat; the engine does not stop, and work after the disk is freed is done."""
        clock = FakeClock()
        _, transport, config = await _one_key(harness, clock)
        store = _DiskFull(_store(clock))
        broker = await harness.broker(
            config, clock=clock, transport=transport, state_store=cast("Any", store)
        )
        loop = asyncio.get_running_loop()
        await drive(clock, loop.create_task(broker.get_items(asins(10, "B"))), transport)
        store.full = True  # the disk fills while the broker is idle
        await clock.advance(65.0)  # two beats meet the error
        assert store.refused >= 2
        store.full = False
        later = loop.create_task(broker.get_items(asins(10, "C")))
        await drive(clock, later, transport)
        assert all(r.ok for r in later.result())


async def test_feedback_survives_a_store_error() -> None:
    """Feedback taken for a decision that fails with any store error (a full disk, not only an
    unreachable store) is kept for the next decision: the 429 still cuts the shared rate."""
    clock = FakeClock()
    store = _DiskFull(_store(clock))
    limiter = _limiter(clock, cast("Any", store), "a")
    sent_at = await limiter.commit()
    limiter.record_throttled(sent_at)
    store.full = True
    with pytest.raises(OSError, match="disk full"):
        await limiter.refresh()
    store.full = False
    assert (await limiter.refresh()).rate < 5.0


class _DiskFull:
    """A store whose decisions fail with ENOSPC while ``full`` is set (standing in for a
    shared home: a memory one gets no keep-alive beats)."""

    def __init__(self, inner: MemoryStateStore) -> None:
        self._inner = inner
        self.full = False
        self.refused = 0
        self.backend = "local"
        self.where = inner.where

    async def decide(self, *args: Any, **kwargs: Any) -> Decision:
        if self.full:
            self.refused += 1
            raise OSError(errno.ENOSPC, "keys.sqlite3: disk full")
        return await self._inner.decide(*args, **kwargs)

    async def view(self, *args: Any, **kwargs: Any) -> Any:
        return await self._inner.view(*args, **kwargs)

    async def aclose(self) -> None:
        await self._inner.aclose()


needs_redis = pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server")


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    """A redis-server of this test's own."""
    server = RedisServer()
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.__exit__, None, None, None)


@needs_redis
class TestRedisOutage:
    """Redis stopped and restarted mid-run: the key pauses, then goes on; the day survives."""

    async def test_stop_and_empty_restart(self, redis_server: RedisServer) -> None:
        """While Redis is down nothing is sent and blocked_reason says why; after an empty
        restart sending resumes and the day's count continues from the high-water mark."""
        from broker.clock import LoopClock

        clock = LoopClock()
        store = RedisStateStore(redis_server.url, timeout_s=0.5)
        limits = KeyLimits(50.0, 1.0, 50.0, day_limit=1000, tpd=1000)
        limiter = SharedKeyLimiter(clock, store, KEY, limits, process_id="p1")
        for _ in range(5):
            await limiter.wait_ready()
            await limiter.commit()
        assert limiter.spent == 5
        await asyncio.to_thread(redis_server.stop)
        blocked = asyncio.create_task(limiter.commit())
        await asyncio.sleep(1.5)
        assert not blocked.done()  # never sends without its shared state
        assert limiter.blocked_reason is not None
        assert "redis" in limiter.blocked_reason
        await asyncio.to_thread(redis_server.start)
        await asyncio.wait_for(blocked, timeout=15.0)
        assert limiter.blocked_reason is None
        assert limiter.spent == 6  # rebuilt from the high-water mark, not restarted at 1
        await store.aclose()

    async def test_store_error_is_clear(self) -> None:
        """A Redis nobody listens on: refresh raises StateUnavailableError."""
        from broker.state.redis_server import free_port

        clock = FakeClock()
        store = RedisStateStore(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.3)
        limiter = SharedKeyLimiter(clock, store, KEY, KeyLimits(5.0, 0.05, 5.0), process_id="p")
        with pytest.raises(StateUnavailableError):
            await limiter.refresh()
        assert limiter.blocked_reason is not None
        await store.aclose()


@needs_redis
async def test_wrong_redis_password_is_a_config_error() -> None:
    """Redis refusing the password is a ConfigError naming the setting, not a wait forever."""
    server = RedisServer(password="right-one")
    await asyncio.to_thread(server.start)
    try:
        store = RedisStateStore(server.url, password="wrong-one", timeout_s=0.5)
        limiter = SharedKeyLimiter(
            FakeClock(), store, KEY, KeyLimits(5.0, 0.05, 5.0), process_id="p"
        )
        with pytest.raises(ConfigError) as info:
            await limiter.refresh()
        assert info.value.path == "state.redis_password_env"
        assert "wrong-one" not in str(info.value)
        # Feedback pushed between sends meets the same refusal: said once, as what it is
        # (it was "a write failed and is tried again" before the run stopped with exit 78).
        with capture_logs() as logs:
            await limiter._flush()
            await limiter._flush()
        assert [(e["event"], e["log_level"]) for e in logs] == [("broker.state_refused", "error")]
        assert "wrong-one" not in str(logs)
        await store.aclose()
    finally:
        await asyncio.to_thread(server.__exit__, None, None, None)


@needs_redis
async def test_a_password_redis_asks_for_and_none_given_says_to_configure_one() -> None:
    """A Redis that requires a password, with no [state] redis_password_env: the
    ConfigError says to set one, not to "set the password's variable to the right value"
    of a setting the file does not have."""
    server = RedisServer(password="right-one")
    await asyncio.to_thread(server.start)
    try:
        store = RedisStateStore(server.url, timeout_s=0.5)
        limiter = SharedKeyLimiter(
            FakeClock(), store, KEY, KeyLimits(5.0, 0.05, 5.0), process_id="p"
        )
        with pytest.raises(ConfigError) as info:
            await limiter.refresh()
        assert info.value.path == "state.redis_password_env"
        assert "requires a password and none is configured" in str(info.value)
        await store.aclose()
    finally:
        await asyncio.to_thread(server.__exit__, None, None, None)


def test_an_unauthenticated_protocol_error_is_a_missing_password() -> None:
    """redis-py 5.0 (the declared floor) meets a password-protected Redis with "Protocol
    error: unauthenticated multibulk length", a plain ResponseError: a missing password too
    (exit 78), not an outage waited out for the whole budget (exit 69)."""
    from redis.exceptions import ResponseError

    store = RedisStateStore("redis://127.0.0.1:1/0", timeout_s=0.5)
    failure = store._failure(ResponseError("Protocol error: unauthenticated multibulk length"))
    assert isinstance(failure, ConfigError)
    assert failure.path == "state.redis_password_env"
    assert "requires a password and none is configured" in failure.message


@needs_redis
async def test_redis_database_out_of_range_is_a_config_error(redis_server: RedisServer) -> None:
    """A redis_url naming a database the server does not have (/99 of 16) is a ConfigError
    naming the setting, not an outage waited out for the whole budget (exit 69)."""
    store = RedisStateStore(redis_server.url.rsplit("/", 1)[0] + "/99", timeout_s=0.5)
    limiter = SharedKeyLimiter(FakeClock(), store, KEY, KeyLimits(5.0, 0.05, 5.0), process_id="p")
    with pytest.raises(ConfigError) as info:
        await limiter.refresh()
    assert info.value.path == "state.redis_url"
    assert "database" in info.value.message
    await store.aclose()


class _GatedStore(OutageStore):
    """A shared store whose decisions wait while ``gate`` is clear, as a Redis call yields
    to the loop (a SQLite one does not); out of reach while ``down`` is set."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.gate = asyncio.Event()
        self.gate.set()
        self.calls = 0

    async def decide(self, *args: Any, **kwargs: Any) -> Decision:
        self.calls += 1
        await self.gate.wait()
        return await super().decide(*args, **kwargs)


class _DownStore:
    """A store that never answers (Redis down for good)."""

    backend = "redis"

    async def decide(self, *args: object, **kwargs: object) -> Decision:
        raise StateUnavailableError("redis", "redis://127.0.0.1:1/0: ConnectionError")

    async def aclose(self) -> None:
        return None


async def _send(clock: FakeClock, limiter: SharedKeyLimiter, count: int) -> None:
    """Book ``count`` sends through ``limiter``, a second apart on the fake clock."""
    for _ in range(count):
        sending = asyncio.create_task(limiter.commit())
        await clock.advance(1.0)
        await sending


class TestAgreedDailyLimit:
    async def test_higher_configured_process_sees_the_agreed_limit_spent(self) -> None:
        """A process configured with tpd 100 beside one with 3: once 3 are sent it reports
        the day spent (exhausted, none left), as its sends are refused, so --no-wait stops
        it and its status does not claim 97 left."""
        clock = FakeClock()
        store = _store(clock)
        low = _limiter(clock, store, "low", KeyLimits(5.0, 0.05, 5.0, day_limit=3, tpd=3))
        high = _limiter(clock, store, "high", KeyLimits(5.0, 0.05, 5.0, day_limit=100, tpd=100))
        await _send(clock, low, 3)
        await high.refresh()
        assert high.exhausted
        assert high.remaining == 0
        assert high.used_fraction == 1.0  # of the agreed limit: a 429 now reads as quota
        assert low.exhausted
        view = await store.view(KEY, KeyLimits(5.0, 0.05, 5.0, day_limit=100, tpd=100))
        assert view.decision.day_limit == 3  # what `broker status` shows as the limit
        # Held by the other's limit, which lapses within a minute once it stops asking (at
        # once when it closes): --no-wait and the daemon wait that long, not for the reset.
        assert high.quota_until() <= clock.utcnow() + dt.timedelta(seconds=61)
        assert low.quota_until() == low.resets_at()

    async def test_another_entry_of_the_config_on_the_account_holds_it_to_the_reset(
        self,
    ) -> None:
        """Two [[keys]] entries naming one account (tpd 1000 and tpd 3): once the lower
        one's day is spent, the other waits for the reset, as for its own limit; it was
        told another process held it, a minute at a time, all day (--no-wait's "until"
        moved on a minute at each run, and the run never ended)."""
        clock = FakeClock()
        store = _store(clock)
        config = make_config(
            "https://creators.test",
            keys=[key_doc("ka", tps=5.0, tpd=1000), key_doc("kb", tps=5.0, tpd=3)],
        )
        shared = SharedState(cast("Any", store), "https://creators.test", "p")
        ka, kb = (
            shared_key_parts(
                key,
                config=config,
                settings=AdaptiveSettings(),
                clock=clock,
                random=lambda: 0.0,
                shared=shared,
            )[0]
            for key in config.keys
        )
        while not kb.exhausted:
            await _send(clock, kb, 1)
        await ka.refresh()
        assert ka.exhausted
        assert ka.quota_until() == ka.resets_at()

    async def test_a_rerun_with_a_higher_tpd_sends_at_once(self) -> None:
        """A run with tpd 3 spends its day and closes; the next run, with tpd raised to 6,
        is not told the day is spent (--no-wait stopped it until midnight, and the daemon
        deferred its job for hours) and sends its 4th request at once."""
        clock = FakeClock()
        store = _store(clock)
        first = _limiter(clock, store, "first", KeyLimits(5.0, 0.05, 5.0, day_limit=3, tpd=3))
        await _send(clock, first, 3)
        await first.aclose()
        rerun = _limiter(clock, store, "rerun", KeyLimits(5.0, 0.05, 5.0, day_limit=6, tpd=6))
        await rerun.refresh()
        assert not rerun.exhausted
        assert rerun.remaining == 3
        sending = asyncio.create_task(rerun.commit())
        await clock.advance(1.0)
        await sending

    async def test_a_key_held_by_another_process_s_lower_tpd_sends_soon_after_it_closes(
        self,
    ) -> None:
        """A run (tpd 100) held by a lookup's tpd 3 asks the store again within 2 s, so it
        sends about at once after the lookup closes, not up to 30 s later; and it is told
        the hold lasts a minute at most, not until the reset."""
        clock = FakeClock()
        store = _store(clock)
        low = _limiter(clock, store, "low", KeyLimits(5.0, 0.05, 5.0, day_limit=3, tpd=3))
        high = _limiter(clock, store, "high", KeyLimits(5.0, 0.05, 5.0, day_limit=100, tpd=100))
        told: list[tuple[str, float]] = []
        high.add_refusal_listener(lambda refusal, wait_s: told.append((refusal, wait_s)))
        await _send(clock, low, 3)
        await high.refresh()
        waiting = asyncio.create_task(high.wait_ready())
        await clock.advance(1.0)
        assert not waiting.done()
        assert told
        assert all(wait_s <= 61.0 for _, wait_s in told)
        await low.aclose()
        await clock.advance(2.5)
        assert waiting.done()
        await waiting


class TestClosing:
    async def test_closing_does_not_wait_out_a_hung_store(self) -> None:
        """A store that stopped answering (Redis SIGSTOPped) holds a closing key about a
        second, not two socket timeouts per key one after another (36 s for four keys,
        past systemd's stop timeout); one known to be out of reach, not at all."""
        clock = FakeClock()
        hung = _HungStore()
        limiter = SharedKeyLimiter(clock, hung, KEY, KeyLimits(5.0, 0.05, 5.0), process_id="p")
        started = time.monotonic()
        await limiter.aclose()
        assert time.monotonic() - started < 3.0
        assert hung.calls == 1
        down = SharedKeyLimiter(clock, _DownStore(), KEY, KeyLimits(5.0, 0.05, 5.0), process_id="q")
        with pytest.raises(StateUnavailableError):
            await down.refresh()
        started = time.monotonic()
        await down.aclose()
        assert time.monotonic() - started < 0.5


async def test_an_idle_broker_learns_at_once_that_its_store_is_down() -> None:
    """A broker that has sent nothing (an idle daemon) asks its key-state store at start, so
    a store out of reach pauses its keys (/readyz says so) at once; it was ready for the
    first 30 s, until the first keep-alive beat."""
    from broker.client import Broker
    from broker.engine.transport import MockTransport

    async def never(request: object) -> object:
        raise AssertionError("nothing is sent")

    clock = FakeClock()
    config = make_config("http://127.0.0.1:9", keys=[key_doc()])
    store: Any = _DownStore()
    async with Broker(
        config, clock=clock, transport=MockTransport(never), state_store=store
    ) as broker:  # type: ignore[arg-type]
        await settle()
        (key,) = broker.metrics().keys
    assert key.state == "paused"
    assert key.reason is not None
    assert "unavailable" in key.reason


async def test_an_idle_key_learns_within_10_s_that_its_store_is_back() -> None:
    """An idle key whose store went out of reach asks it again at the growing interval of
    an outage (up to 10 s), not at the idle beat: an idle daemon was not ready for about
    30 s after Redis came back."""
    clock = FakeClock()
    store = OutageStore(clock)
    limiter = SharedKeyLimiter(clock, store, KEY, KeyLimits(5.0, 0.05, 5.0), process_id="p")
    beating = asyncio.create_task(limiter.keep_alive())
    await clock.advance(1.0)
    store.down = True
    await clock.advance(31.0)  # the idle beat meets the outage
    assert limiter.blocked_reason is not None
    await clock.advance(60.0)
    store.down = False
    await clock.advance(10.5)
    assert limiter.blocked_reason is None
    beating.cancel()
    await asyncio.gather(beating, return_exceptions=True)


class _CancelLosingStore(MemoryStateStore):
    """A store (a Redis, as redis-py reaches it on Python 3.11) whose decision, cancelled
    as it completes, returns (or raises the send's own error) all the same: 3.11's
    asyncio.wait_for, which redis-py sends each command under, loses a cancel that lands as
    the send completes."""

    backend = "redis"  # type: ignore[assignment]

    def __init__(self, *, then_fails: bool = False) -> None:
        super().__init__()
        self.calls = 0
        self.then_fails = then_fails

    async def decide(self, *args: Any, **kwargs: Any) -> Decision:
        self.calls += 1
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        if self.then_fails:
            # The send's own error comes out instead (a reset socket at shutdown).
            raise StateUnavailableError("redis", "redis://127.0.0.1:6379/0: ConnectionError")
        return await super().decide(*args, **kwargs)


@pytest.mark.parametrize("then_fails", [False, True])
async def test_a_cancel_lost_in_a_store_call_still_ends_the_keep_alive(then_fails: bool) -> None:
    """A close that cancels the keep-alive while it asks a Redis that loses the cancel (and
    returns, or raises the send's own error) ends it all the same: it went on beating, and
    the close waited for it for ever."""
    clock = FakeClock()
    store = _CancelLosingStore(then_fails=then_fails)
    limiter = SharedKeyLimiter(clock, store, KEY, KeyLimits(5.0, 0.05, 5.0), process_id="p")
    beating = asyncio.create_task(limiter.keep_alive())
    await settle()
    assert store.calls == 1  # asking the store
    beating.cancel()
    await settle()
    assert beating.cancelled()


class _HungStore(MemoryStateStore):
    """A store whose every decision waits for ever."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def decide(self, *args: object, **kwargs: object) -> Decision:
        self.calls += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def _slow_down_store(clock: FakeClock, timeout_s: float) -> Any:
    """A store that fails each call only after ``timeout_s`` (a hung Redis's timeout)."""

    class _SlowDownStore(_DownStore):
        async def decide(self, *args: object, **kwargs: object) -> Decision:
            await clock.sleep(timeout_s)
            return await super().decide(*args, **kwargs)

    return _SlowDownStore()


class TestGivingUp:
    async def test_unreachable_store_gives_up_after_the_outage_budget(self) -> None:
        """A store out of reach for give_up_after_s ends the wait with StateUnavailableError
        when the budget is spent, not a backoff step later, and says the budget."""
        clock = FakeClock()
        limits = KeyLimits(5.0, 0.05, 5.0)
        store: Any = _DownStore()
        limiter = SharedKeyLimiter(clock, store, KEY, limits, process_id="p", give_up_after_s=30.0)
        started = clock.monotonic()
        waiting = asyncio.create_task(limiter.wait_ready())
        while not waiting.done() and clock.monotonic() - started < 120:
            await clock.advance(0.1)
        with pytest.raises(StateUnavailableError, match=r"still so after 30 s \(the outage"):
            waiting.result()
        assert 30.0 <= clock.monotonic() - started <= 30.5

    async def test_the_budget_counts_from_the_start_of_the_first_failing_call(self) -> None:
        """A store that fails each call only after its timeout (a hung Redis, 4 s here):
        the budget counts from when the first failing call began, so the wait gives up
        within one call of the budget; it counted from when that call had failed, a
        timeout late."""
        clock = FakeClock()
        store = _slow_down_store(clock, 4.0)
        limits = KeyLimits(5.0, 0.05, 5.0)
        limiter = SharedKeyLimiter(clock, store, KEY, limits, process_id="p", give_up_after_s=10.0)
        started = clock.monotonic()
        waiting = asyncio.create_task(limiter.wait_ready())
        while not waiting.done() and clock.monotonic() - started < 120:
            await clock.advance(0.1)
        with pytest.raises(StateUnavailableError, match="still so after 10 s"):
            waiting.result()
        assert clock.monotonic() - started <= 10.0 + 4.0 + 0.5

    async def test_the_keep_alive_asking_meanwhile_does_not_stretch_the_budget(self) -> None:
        """A hung Redis (each call fails at its 2-s timeout) with the keep-alive asking too,
        as in every run: the wait gives up within one call of the budget, counted from the
        outage's first failing call (the broker's first ask, at start). It timed the budget
        from the last ask of any, which the keep-alive, re-asking back to back, kept
        moving: 5 s of budget ran 11 s."""
        clock = FakeClock()
        store = _slow_down_store(clock, 2.0)
        limits = KeyLimits(5.0, 0.05, 5.0)
        limiter = SharedKeyLimiter(clock, store, KEY, limits, process_id="p", give_up_after_s=5.0)
        began = clock.monotonic()
        opening = asyncio.create_task(limiter.refresh())  # the broker's first ask, at start
        while not opening.done():
            await clock.advance(0.05)
        with pytest.raises(StateUnavailableError):
            opening.result()
        beating = asyncio.create_task(limiter.keep_alive())
        waiting = asyncio.create_task(limiter.wait_ready())
        while not waiting.done() and clock.monotonic() - began < 60:
            await clock.advance(0.05)
        beating.cancel()
        with pytest.raises(StateUnavailableError, match="still so after 5 s"):
            waiting.result()
        assert clock.monotonic() - began <= 5.0 + 2.0 + 0.2

    @pytest.mark.parametrize("arrives_s", [1.0, 30.0, 59.0])
    async def test_work_arriving_in_an_outage_gets_its_whole_budget(self, arrives_s: float) -> None:
        """An idle process whose keep-alive has met the store down since 0 s gets work at
        ``arrives_s``: the work waits its whole budget, as work a minute later does; it was
        left what remained of the budget since the keep-alive's first failure (1 s of 60)."""
        clock = FakeClock()
        store: Any = _DownStore()
        limits = KeyLimits(5.0, 0.05, 5.0)
        limiter = SharedKeyLimiter(clock, store, KEY, limits, process_id="p", give_up_after_s=60.0)
        beating = asyncio.create_task(limiter.keep_alive())
        await clock.advance(arrives_s)
        arrived = clock.monotonic()
        waiting = asyncio.create_task(limiter.wait_ready())
        while not waiting.done() and clock.monotonic() - arrived < 200:
            await clock.advance(0.1)
        beating.cancel()
        with pytest.raises(StateUnavailableError):
            waiting.result()
        assert 60.0 <= clock.monotonic() - arrived <= 60.5

    async def test_an_old_failure_does_not_shorten_a_new_outage(self) -> None:
        """A store call that failed an hour ago does not make a new outage give up at once."""
        clock = FakeClock()
        store: Any = _DownStore()
        limits = KeyLimits(5.0, 0.05, 5.0)
        limiter = SharedKeyLimiter(clock, store, KEY, limits, process_id="p", give_up_after_s=30.0)
        with pytest.raises(StateUnavailableError):
            await limiter.refresh()  # a background flush's failure, say
        await clock.advance(3600.0)
        waiting = asyncio.create_task(limiter.wait_ready())
        await clock.advance(10.0)
        assert not waiting.done()  # still waiting out the new outage's budget
        await clock.advance(40.0)
        assert waiting.done()
        with pytest.raises(StateUnavailableError):
            waiting.result()

    def test_lookup_with_redis_down_exits_69_within_its_budget(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """broker lookup against a Redis nobody listens on exits 69 after --outage-budget."""
        from conftest import embedded_toml

        from broker import cli
        from broker.state.redis_server import free_port

        config = tmp_path / "config.toml"
        state = f'\n[state]\nbackend = "redis"\nredis_url = "redis://127.0.0.1:{free_port()}/0"\n'
        config.write_text(embedded_toml() + state)
        started = time.monotonic()
        code = cli.main(["lookup", "B0TEST0001", "--config", str(config), "--outage-budget", "2"])
        assert code == 69
        assert time.monotonic() - started < 60
        err = capsys.readouterr().err
        assert "key-state store (redis) unavailable" in err
        assert re.search(r"still so after \d+ s \(the outage budget\)", err)
        # Said to be the store's, not the API's (it read "without a usable answer").
        assert "the key-state store out of reach for the outage budget (" in err
        assert "rows" not in err  # a lookup has no rows left pending
        # The documented end of an outage, not a bug: no "task crashed" event; the key is
        # taken out, as by an endpoint's outage.
        assert "task_crashed" not in err
        assert "broker.key_disabled" in err
        assert "StateUnavailable" in err


@needs_redis
def test_lookup_with_a_redis_asking_a_password_exits_78_without_a_crash_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """broker lookup against a Redis that requires a password none was given for: exit
    78 saying to configure one, logged as the engine stopping, not as a task crash."""
    from conftest import embedded_toml

    from broker import cli

    server = RedisServer(password="right-one")
    server.start()
    try:
        config = tmp_path / "config.toml"
        state = f'\n[state]\nbackend = "redis"\nredis_url = "{server.url}"\n'
        config.write_text(embedded_toml() + state)
        assert cli.main(["lookup", "B0TEST0001", "--config", str(config)]) == 78
    finally:
        server.__exit__(None, None, None)
    err = capsys.readouterr().err
    assert "requires a password and none is configured" in err
    assert "task_crashed" not in err


@needs_redis
async def test_a_broker_opened_on_a_redis_refusing_it_fails_at_once(tmp_path: Path) -> None:
    """Opening a broker whose key-state Redis asks a password none was given for raises
    the ConfigError at once (exit 78 at start): it opened, and an idle ``broker serve`` said
    it was ready until its first job, possibly hours later, then exited 78."""
    from conftest import embedded_toml

    from broker import Broker

    server = RedisServer(password="right-one")
    await asyncio.to_thread(server.start)
    try:
        config = tmp_path / "config.toml"
        state = f'\n[state]\nbackend = "redis"\nredis_url = "{server.url}"\n'
        config.write_text(embedded_toml() + state)
        with pytest.raises(ConfigError, match="requires a password and none is configured"):
            async with Broker.from_config(config):
                pass
    finally:
        await asyncio.to_thread(server.__exit__, None, None, None)


_PACED_WORKER = """
import asyncio, sys, time
from pathlib import Path
from broker.clock import LoopClock
from broker.engine.shared_limiter import SharedKeyLimiter
from broker.state import KeyLimits, StateKey
from broker.state.sqlite import SqliteStateStore

async def main() -> None:
    store = SqliteStateStore(Path(sys.argv[1]))
    limiter = SharedKeyLimiter(
        LoopClock(), store, StateKey.of("http://sim", "cred"),
        KeyLimits(20.0, 1.0, 20.0), process_id=sys.argv[2],
    )
    stop = time.monotonic() + float(sys.argv[3])
    while time.monotonic() < stop:
        await limiter.wait_ready()
        sent = await limiter.commit()
        print(time.monotonic(), flush=True)

asyncio.run(main())
"""


class TestKilledProcess:
    """kill -9 of one process: the other goes on at the key's full rate."""

    def test_survivor_keeps_the_full_rate(self, tmp_path: Path) -> None:
        """Two processes pace one 20/s key on a SQLite file; one is killed; the other sends 20/s."""
        db = tmp_path / "keys.sqlite3"
        env = {**os.environ, "PYTHONPATH": str(Path.cwd())}

        def start(name: str, seconds: float, *, output: bool) -> subprocess.Popen[str]:
            return subprocess.Popen(
                [sys.executable, "-c", _PACED_WORKER, str(db), name, str(seconds)],
                stdout=subprocess.PIPE if output else subprocess.DEVNULL,
                text=True,
                env=env,
            )

        victim = start("victim", 30.0, output=False)
        survivor = start("survivor", 4.0, output=True)
        assert survivor.stdout is not None
        first = float(survivor.stdout.readline())  # both are up and sending
        time.sleep(max(0.0, first + 1.0 - time.monotonic()))
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        victim.wait()
        rest, _ = survivor.communicate(timeout=60)
        assert survivor.returncode == 0
        times = [float(line) for line in rest.split()]
        before = [t for t in times if first + 0.2 <= t < killed_at]
        assert len(before) <= 0.65 * 20 * (killed_at - first - 0.2) + 1  # sharing: about half
        after = [t for t in times if killed_at + 0.5 <= t]
        assert len(after) >= 10
        # The median gap, not a count in a window: a loaded machine stalls the survivor now
        # and then, but its sends in between keep the key's 1/20 s (a dead process still
        # holding its share would leave 1/10 s).
        gaps = sorted(b - a for a, b in itertools.pairwise(after))
        assert gaps[len(gaps) // 2] < 0.075


def _one_failing(clock: FakeClock) -> tuple[_DiskFull, SharedKeyLimiter, SharedKeyLimiter]:
    """Two processes on one store: ``a`` reaches it through a disk that can fill, ``b`` not."""
    inner = _store(clock)
    store = _DiskFull(inner)
    return store, _limiter(clock, cast("Any", store), "a"), _limiter(clock, inner, "b")


async def _seen_once_the_disk_mends(
    clock: FakeClock, store: _DiskFull, a: SharedKeyLimiter, b: SharedKeyLimiter
) -> Decision:
    """``a``'s feedback meets the full disk (its flush, then its ask, fail); the disk mends
    and ``a`` asks again: what ``b`` then reads from the store."""
    await clock.advance(0.0)  # the background flush meets the full disk
    with pytest.raises(OSError, match="disk full"):
        await a.refresh()
    store.full = False
    await a.refresh()
    return await b.refresh()


async def test_a_pause_and_a_park_survive_a_store_error() -> None:
    """A Retry-After pause and a park taken for a decision that fails (a full disk) are kept
    and reach the store when it is back: the other process is held too (README: nothing is
    lost, feedback is kept)."""
    clock = FakeClock()
    store, a, b = _one_failing(clock)
    await a.commit()
    store.full = True
    a.pause_until(clock.monotonic() + 30.0, reason="Retry-After")
    a.park(900.0, "quota_exhausted")
    seen = await _seen_once_the_disk_mends(clock, store, a, b)
    assert seen.pause_reason == "Retry-After"
    assert seen.paused_until_us - seen.now_us == pytest.approx(30_000_000, abs=1_000)
    assert seen.park_reason == "quota_exhausted"
    assert seen.parked_until_us - seen.now_us == pytest.approx(900_000_000, abs=1_000)


async def test_an_unpark_survives_a_store_error() -> None:
    """A probe's success (unpark) taken for a decision that fails is kept and lifts the park
    for every process once the store is back: the key is not left parked for all."""
    clock = FakeClock()
    store, a, b = _one_failing(clock)
    a.park(1.0, "quota_exhausted")
    await a.refresh()
    await clock.advance(1.5)
    await a.commit()  # the probe
    store.full = True
    a.record_success(demand_limited=False)  # the probe got through: unpark
    seen = await _seen_once_the_disk_mends(clock, store, a, b)
    assert seen.parked_until_us == 0


async def test_the_count_read_after_the_reset_is_the_new_day_s() -> None:
    """Past the store's daily reset, a limiter whose last answer is of the day before reads
    nothing spent (spent 0, the whole limit left, not exhausted) before it asks again:
    /metrics and status must not show yesterday's count as today's."""
    clock = FakeClock(epoch=dt.datetime(2026, 12, 3, 23, 59, 0, tzinfo=dt.UTC))
    store = _store(clock)
    limits = KeyLimits(5.0, 0.05, 5.0, day_limit=2, tpd=2)
    a = _limiter(clock, store, "a", limits)
    for _ in range(2):
        sending = asyncio.create_task(a.commit())
        await clock.advance(0.3)
        await sending
    assert a.exhausted
    await clock.advance(120.0)  # 00:01 the next day by the store's clock; no ask since
    assert a.spent == 0
    assert a.remaining == 2
    assert not a.exhausted


async def test_a_released_probe_of_a_later_slot_frees_the_lease() -> None:
    """A probe granted a slot after a pause (its send later than its decision) and given
    back (its own network failed) frees the store's lease: the lease is the decision's, so
    another process probes at once, not after the 60 s lease."""
    clock = FakeClock()
    store = _store(clock)
    a, b = _limiter(clock, store, "a"), _limiter(clock, store, "b")
    a.park(1.0, "quota_exhausted")
    a.pause_until(clock.monotonic() + 3.0, reason="Retry-After")
    await a.refresh()
    await clock.advance(1.5)  # the park is over, the pause not: the probe's slot is at 3 s
    probing = asyncio.create_task(a.commit())
    await clock.advance(1.6)
    await probing
    assert a.last_decision is not None
    assert a.last_decision.probe
    a.release_probe()
    await clock.advance(0.0)  # the background flush
    await clock.advance(0.3)
    sending = asyncio.create_task(b.commit())
    await clock.advance(0.5)
    await sending
    assert b.last_decision is not None
    assert b.last_decision.probe


async def test_closing_asks_no_store_known_to_be_out_of_reach() -> None:
    """A key whose store is out of reach closes without asking it again (README: a closing
    process does not wait at all while the store is out of reach): the leave is skipped,
    not tried for up to a second per key."""

    class _Down:
        backend = "redis"
        calls = 0

        async def decide(self, *args: object, **kwargs: object) -> Any:
            self.calls += 1
            raise StateUnavailableError("redis", "redis://127.0.0.1:1/0: ConnectionError")

        async def aclose(self) -> None:
            return None

    down = _Down()
    limiter = SharedKeyLimiter(
        FakeClock(), cast("Any", down), KEY, KeyLimits(5.0, 0.05, 5.0), process_id="q"
    )
    with pytest.raises(StateUnavailableError):
        await limiter.refresh()
    await limiter.aclose()
    assert down.calls == 1


async def test_a_park_that_ran_out_reads_as_none() -> None:
    """parked() tells the park the store held at its last answer only while it lasts: once
    its time ran out (the probe is due) it reads None, not a probe time in the past."""
    clock = FakeClock()
    a = _limiter(clock, _store(clock), "a")
    a.park(10.0, "quota_exhausted")
    await a.refresh()
    parked = a.parked()
    assert parked is not None
    assert parked[0] == "quota_exhausted"
    await clock.advance(10.5)
    assert a.parked() is None


def test_an_account_s_day_limit_is_the_lowest_of_its_entries() -> None:
    """Two entries of one credential keep to the lower tpd (times the guard), an entry with
    no tpd does not lift it, and another credential keeps its own."""
    keys = [
        key_doc("a", tpd=1000),
        key_doc("b", tpd=500),
        key_doc("c", tpd=0),
        key_doc("other", credential_id="other-id", tpd=0),
    ]
    config = make_config("http://127.0.0.1:9", keys=keys)
    assert [account_day_limit(key, config) for key in config.keys] == [495, 495, 495, None]


def test_a_config_of_many_keys_is_scanned_once_for_their_day_limits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Asked key by key (as a broker starts them), the day limits of 2,000 keys cost one
    pass over them, not one per key: a scan of every key for each made a config of 10,000
    keys take 20 s to start, and `broker bench --keys 100000` hours."""
    from broker.engine import shared_limiter

    keys = [key_doc(f"k{i}", credential_id=f"id-{i % 700}", tpd=1000 + i) for i in range(2000)]
    config = make_config("http://127.0.0.1:9", keys=keys)
    calls = 0
    real = shared_limiter.day_limit

    def counted(tpd: int | None, guard: float) -> int | None:
        nonlocal calls
        calls += 1
        return real(tpd, guard)

    monkeypatch.setattr(shared_limiter, "day_limit", counted)
    limits = [account_day_limit(key, config) for key in config.keys]
    assert calls <= 2 * len(keys)
    assert limits[0] == limits[700] == shared_limiter.day_limit(1000, 0.99)
