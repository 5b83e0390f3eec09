"""The key-state stores: memory, SQLite and Redis make the same atomic decisions.

Memory and SQLite run on a fake clock; Redis runs on its own ``TIME`` (a real
``redis-server`` on a free loopback port, started for this module), so its tests assert
relations between answers rather than absolute times.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import math
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from conftest import ENV, key_doc, sqlite_db
from structlog.testing import capture_logs

from broker.config import StateConfig, parse_config, redacted_url
from broker.errors import ConfigError, StateUnavailableError
from broker.ratecontrol import RecoveryTuning
from broker.sqlitewal import state_dir
from broker.state import (
    Decision,
    Feedback,
    KeyLimits,
    KeyStateStore,
    MemoryStateStore,
    ProcessMark,
    StateKey,
    day_number,
    local_state_path,
    open_store,
)
from broker.state.decision import Record, decide
from broker.state.redis import RedisStateStore
from broker.state.redis_server import RedisServer, redis_server_binary
from broker.state.sqlite import SqliteStateStore

needs_redis = pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server")

_T0 = 1_800_000_000_000_000  # µs, a fixed instant (2027-01-15 08:00 UTC)
KEY = StateKey.of("http://127.0.0.1:1", "cred-1", name="k1")
LIMITS = KeyLimits(nominal_rate=5.0, min_rate=0.05, max_rate=5.0, day_limit=100, tpd=101)
ME = ProcessMark("test:1:a")


@dataclass
class Backend:
    """A store under test and a way to let its time pass."""

    name: str
    store: KeyStateStore
    fake: list[int] | None  # the fake clock (µs), None for Redis's real clock

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass on the store's clock."""
        if self.fake is not None:
            self.fake[0] += int(seconds * 1_000_000)
        else:
            await asyncio.sleep(seconds)

    async def reserve(
        self, limits: KeyLimits = LIMITS, *, process: ProcessMark | None = ME, **feedback: Any
    ) -> Decision:
        """One reserving decision with optional feedback, asked by ``process``."""
        return await self.store.decide(
            KEY, limits, feedback=Feedback(**feedback), reserve=True, process=process
        )

    async def leave(self, limits: KeyLimits, process: ProcessMark) -> Decision:
        """``process`` closes and tells the store so (reserving nothing)."""
        return await self.store.decide(
            KEY, limits, feedback=Feedback(leaving=True), reserve=False, process=process
        )


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the module (each test uses fresh keys through a fresh prefix)."""
    if redis_server_binary() is None:
        pytest.skip("no redis-server")
    with RedisServer() as server:
        yield server


@pytest.fixture(params=["memory", "local", pytest.param("redis", marks=needs_redis)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Each store home in turn."""
    clock = [_T0]
    store: KeyStateStore
    if request.param == "memory":
        store = MemoryStateStore(lambda: clock[0], lambda: clock[0])
    elif request.param == "local":
        store = SqliteStateStore(
            tmp_path / "s" / "keys.sqlite3", now_us=lambda: clock[0], wall_us=lambda: clock[0]
        )
    else:
        server = request.getfixturevalue("redis_server")
        store = RedisStateStore(server.url, key_prefix=f"t-{request.node.name}:")
    yield Backend(request.param, store, None if request.param == "redis" else clock)
    await store.aclose()


class TestReserve:
    """One decision reserves the next slot and counts the day."""

    async def test_slots_are_one_interval_apart(self, backend: Backend) -> None:
        """Three back-to-back reservations get slots 200 ms apart at 5/s; the first is now."""
        first = await backend.reserve()
        second = await backend.reserve()
        third = await backend.reserve()
        assert [first.granted, second.granted, third.granted] == [True, True, True]
        assert first.wait_s == 0.0
        assert second.slot_us - first.slot_us == 200_000
        assert third.slot_us - second.slot_us == 200_000
        assert third.count == 3
        assert 0.3 <= third.wait_s <= 0.4  # less the time the calls took

    async def test_day_limit_refuses_without_counting(self, backend: Backend) -> None:
        """At the day's limit the store refuses with "daily quota" and the count stays put."""
        limits = KeyLimits(5.0, 0.05, 5.0, day_limit=2, tpd=3)
        assert (await backend.reserve(limits)).granted
        assert (await backend.reserve(limits)).granted
        refused = await backend.reserve(limits)
        assert not refused.granted
        assert refused.refusal == "daily quota"
        assert refused.count == 2
        assert refused.wait_s > 0

    async def test_slot_beyond_horizon_is_not_reserved(self, backend: Backend) -> None:
        """A slot further out than the horizon is refused with the time to ask again."""
        limits = KeyLimits(5.0, 0.05, 5.0, horizon_s=0.5)
        granted = [await backend.reserve(limits) for _ in range(3)]
        assert all(d.granted for d in granted)
        refused = await backend.reserve(limits)
        assert refused.refusal == "horizon"
        assert refused.count == 3
        assert 0.0 < refused.wait_s <= 0.11

    async def test_idle_key_starts_at_now(self, backend: Backend) -> None:
        """After an idle spell the next slot is now, not a backlog of old slots (no burst)."""
        await backend.reserve()
        await backend.advance(0.5)
        later = await backend.reserve()
        again = await backend.reserve()
        assert later.wait_s == 0.0
        assert again.slot_us - later.slot_us == 200_000

    async def test_a_clock_stepped_back_holds_the_key_no_longer_than_the_horizon(
        self, backend: Backend
    ) -> None:
        """The store's clock stepped back an hour (an NTP step of Redis's TIME, a fake's
        rewind): the next slot booked before the step is pulled back to the horizon, so the
        key waits one interval and then sends, not an hour."""
        if backend.fake is None:
            pytest.skip("needs the store's clock moved (Redis runs on its own)")
        for _ in range(3):
            assert (await backend.reserve()).granted
        backend.fake[0] -= 3_600 * 1_000_000
        held = await backend.reserve()
        assert held.refusal == "horizon"
        assert held.wait_s == pytest.approx(0.2)  # one interval past the horizon
        await backend.advance(held.wait_s)
        after = await backend.reserve()
        assert after.granted
        assert after.wait_s <= LIMITS.horizon_s


TUNED = replace(LIMITS, tuning=RecoveryTuning())


class TestCeilingAwareController:
    """Every home, Redis's script included, runs broker/ratecontrol.py's controller."""

    async def _throttle_once(self, backend: Backend) -> Decision:
        await backend.advance(0.01)  # the send is decided after the last cut: a fresh 429
        sent = await backend.reserve(TUNED)
        return await backend.store.decide(
            KEY, TUNED, feedback=Feedback(throttled=(sent.now_us,)), reserve=False, process=ME
        )

    async def test_a_run_cuts_10_percent_near_the_cap_then_20_below_it(
        self, backend: Backend
    ) -> None:
        """Cuts of 3, 3, 10, 10, 10 then 20 %: a run near the cap, then a drop below it."""
        rates = [(await self._throttle_once(backend)).rate for _ in range(6)]
        expected, rate = [], 5.0
        for factor in (0.97, 0.97, 0.9, 0.9, 0.9, 0.8):
            rate *= factor
            expected.append(rate)
        assert rates == pytest.approx(expected)

    async def test_after_a_drop_the_rate_regrows_on_the_recovery_curve(
        self, backend: Backend
    ) -> None:
        """Below the cap zone a drop remembers its rate: the next success regrows to 90 % of it."""
        rates = [(await self._throttle_once(backend)).rate for _ in range(6)]
        throttled_at, dropped_to = rates[4], rates[5]  # 3.43 -> 2.74 (20 %)
        grown = (await backend.reserve(TUNED, successes=1)).rate
        # The curve starts at 1 - beta of the throttled rate (3.09); the plain AIMD would
        # add a fraction of a percent to 2.74.
        assert grown > 1.1 * dropped_to
        assert 0.9 * throttled_at <= grown < 0.93 * throttled_at


class TestFeedback:
    """Feedback is applied atomically before the reservation."""

    async def test_one_cut_per_round_of_429s(self, backend: Backend) -> None:
        """Two 429s of sends decided before the cut cut once; one decided after it cuts again."""
        sent = [await backend.reserve() for _ in range(3)]
        d = await backend.store.decide(
            KEY,
            LIMITS,
            feedback=Feedback(throttled=(sent[0].now_us, sent[1].now_us)),
            reserve=False,
            process=ME,
        )
        assert d.cut
        assert d.rate == pytest.approx(4.5)
        d = await backend.store.decide(
            KEY,
            LIMITS,
            feedback=Feedback(throttled=(sent[2].now_us,)),
            reserve=False,
            process=ME,
        )
        assert not d.cut
        assert d.rate == pytest.approx(4.5)
        await backend.advance(0.01)
        after = await backend.reserve()
        d = await backend.store.decide(
            KEY,
            LIMITS,
            feedback=Feedback(throttled=(after.now_us,)),
            reserve=False,
            process=ME,
        )
        assert d.cut
        assert d.rate == pytest.approx(4.05)
        assert d.last_429_us > 0

    async def test_a_run_of_429s_is_counted_over_every_process(self, backend: Backend) -> None:
        """Each process's 429s add to the key's one run; any process's success ends it, and
        a 429 long after the last one starts a new run."""
        other = ProcessMark("test:2:b")

        async def report(process: ProcessMark, **feedback: Any) -> Decision:
            return await backend.store.decide(
                KEY, LIMITS, feedback=Feedback(**feedback), reserve=False, process=process
            )

        sent = await backend.reserve()
        assert (await report(ME, throttled=(sent.now_us,) * 3, run_429s=3)).run_429s == 3
        assert (await report(other, throttled=(sent.now_us,) * 2, run_429s=2)).run_429s == 5
        # A success, then a 429 of that same process: the run starts again from it.
        assert (await report(other, answered=True, run_429s=1, throttled=(1,))).run_429s == 1
        await backend.advance(61.0 if backend.fake is not None else 0.0)
        if backend.fake is not None:
            assert (await report(ME, throttled=(1,), run_429s=1)).run_429s == 1

    async def test_a_long_run_of_429s_cuts_for_each_one(self, backend: Backend) -> None:
        """Once the key's run of 429s reaches ten with no success anywhere (a quota spent,
        not a rate: processes that booked ahead would otherwise keep it near its old rate
        round after round), a 429 cuts even when its send was decided before the last cut."""
        sent = await backend.reserve()
        first = await backend.reserve(throttled=(sent.now_us + 1,), run_429s=1)
        assert first.cut
        # Decided before that cut: within the run's first ten, it does not cut again.
        early = await backend.reserve(throttled=(sent.now_us,) * 8, run_429s=8)
        assert not early.cut
        assert early.run_429s == 9
        tenth = await backend.reserve(throttled=(sent.now_us,), run_429s=1)
        assert tenth.run_429s == 10
        assert tenth.cut
        assert tenth.rate < early.rate

    async def test_a_report_crossing_the_mark_cuts_only_past_it(self, backend: Backend) -> None:
        """Nine late 429s reported at once after a round's cut take the run from 1 to 10:
        only the tenth cuts (all nine did, the mark judged once for the whole report)."""
        sent = await backend.reserve()
        first = await backend.reserve(throttled=(sent.now_us + 1,), run_429s=1)
        assert first.cut
        late = await backend.reserve(throttled=(sent.now_us,) * 9, run_429s=9)
        assert late.run_429s == 10
        assert late.rate == pytest.approx(first.rate * 0.9)

    async def test_a_run_the_gap_ended_reads_as_none(self, backend: Backend) -> None:
        """Nine 429s, then a minute and more with none: the key reads no run (a process's
        next 429 is the first of a new one), not nine waiting for a tenth."""
        if backend.fake is None:
            pytest.skip("needs the store's clock moved (Redis runs on its own)")
        sent = await backend.reserve()
        nine = await backend.reserve(throttled=(sent.now_us + 1,) * 9, run_429s=9)
        assert nine.run_429s == 9
        await backend.advance(61.0)
        assert (await backend.reserve()).run_429s == 0

    async def test_the_daily_window_resets_at_the_offset(self, backend: Backend) -> None:
        """With the window reset at 08:30 UTC ([rate] daily_reset_utc), a key spent at
        08:00 waits until 08:30, not until midnight, and starts a new count then."""
        if backend.fake is None:
            pytest.skip("needs the store's clock moved (Redis runs on its own)")
        limits = replace(LIMITS, day_limit=2, reset_offset_s=8 * 3_600 + 1_800)
        assert (await backend.reserve(limits)).granted  # _T0 is 08:00 UTC
        assert (await backend.reserve(limits)).granted
        spent = await backend.reserve(limits)
        assert spent.refusal == "daily quota"
        assert spent.wait_s == pytest.approx(1_800, abs=1)
        await backend.advance(1_801)
        again = await backend.reserve(limits)
        assert again.granted
        assert again.count == 1

    async def test_a_reset_moved_later_ends_the_day_at_its_new_time(self, backend: Backend) -> None:
        """[rate] daily_reset_utc moved from an hour ago to half an hour ago, a spent key:
        the day counted ended at the new reset, so the key sends again at once; it was held
        until the new reset's time the next day (23.5 h)."""
        now_s = (backend.fake[0] if backend.fake is not None else time.time_ns() // 1_000) // (
            1_000_000
        )
        early = replace(LIMITS, day_limit=2, reset_offset_s=(now_s - 3_600) % 86_400)
        later = replace(early, reset_offset_s=(now_s - 1_800) % 86_400)
        assert (await backend.reserve(early)).granted
        assert (await backend.reserve(early)).granted
        assert (await backend.reserve(early)).refusal == "daily quota"
        moved = await backend.reserve(later)
        assert moved.granted
        assert moved.count == 1

    async def test_two_resets_sharing_a_key_start_the_day_over_once(self, backend: Backend) -> None:
        """Two processes whose daily_reset_utc differ (a config changed while the old
        daemon runs) alternating on a key: the day starts over at most once, then both keep
        to the one count. Each rewrote the day into its own reset, losing a day every round
        trip, so the count started over at every send: 40 of 40 granted against 10."""
        now_s = (backend.fake[0] if backend.fake is not None else time.time_ns() // 1_000) // (
            1_000_000
        )
        early = replace(LIMITS, day_limit=10, reset_offset_s=(now_s - 3_600) % 86_400)
        later = replace(early, reset_offset_s=(now_s - 1_800) % 86_400)
        granted = 0
        for i in range(40):
            granted += (await backend.reserve(later if i % 2 else early)).granted
        assert granted <= 10 + 1

    async def test_a_live_process_s_reset_holds_for_one_of_another_reset(
        self, backend: Backend
    ) -> None:
        """Two live processes whose daily_reset_utc differ: the day the first counts holds
        for the second, whose own reset came since, until the first closes; then the
        second's reset takes over at once. Each started the day over at its own reset: a
        hunt's key got its quota twice a day."""
        now_s = (backend.fake[0] if backend.fake is not None else time.time_ns() // 1_000) // (
            1_000_000
        )
        early = replace(LIMITS, day_limit=2, reset_offset_s=(now_s - 3_600) % 86_400)
        later = replace(early, reset_offset_s=(now_s - 1_800) % 86_400)
        first, second = ProcessMark("first:1:a"), ProcessMark("second:2:b")
        assert (await backend.reserve(early, process=first)).granted
        assert (await backend.reserve(early, process=first)).granted
        held = await backend.reserve(later, process=second)
        assert held.refusal == "daily quota"
        assert held.wait_s == pytest.approx(82_800, abs=60)  # the first's reset, 23 h away
        assert held.window_end_us - held.wall_us == pytest.approx(82_800e6, abs=60e6)
        await backend.leave(early, first)
        moved = await backend.reserve(later, process=second)
        assert moved.granted
        assert moved.count == 1

    async def test_a_reset_holds_while_any_process_of_it_lives(self, backend: Backend) -> None:
        """Two processes of one reset and one of another: the first two's day holds for the
        third until both have closed, not until either one closes (the one that closed
        let the third start a new day while the other still sent on the old one)."""
        now_s = (backend.fake[0] if backend.fake is not None else time.time_ns() // 1_000) // (
            1_000_000
        )
        early = replace(LIMITS, day_limit=2, reset_offset_s=(now_s - 3_600) % 86_400)
        later = replace(early, reset_offset_s=(now_s - 1_800) % 86_400)
        a, b, c = ProcessMark("a:1:a"), ProcessMark("b:2:b"), ProcessMark("c:3:c")
        assert (await backend.reserve(early, process=a)).granted
        assert (await backend.reserve(early, process=b)).granted
        await backend.leave(early, b)
        assert (await backend.reserve(later, process=c)).refusal == "daily quota"
        await backend.leave(early, a)
        assert (await backend.reserve(later, process=c)).granted

    async def test_a_view_keeps_to_the_limit_of_the_processes_using_the_key(
        self, backend: Backend
    ) -> None:
        """broker status with a lower tpd than the process sending on the key shows that
        process's limit, not its own (it showed the key waiting for its quota, 118/99,
        while the process sent on it); with no process using the key, its own."""
        sender = replace(LIMITS, day_limit=5)
        for _ in range(3):
            assert (await backend.reserve(sender)).granted
        viewer = replace(LIMITS, day_limit=2)
        seen = await backend.store.view(KEY, viewer)
        assert (seen.decision.day_limit, seen.decision.count) == (5, 3)
        await backend.leave(sender, ME)
        assert (await backend.store.view(KEY, viewer)).decision.day_limit == 2

    async def test_a_caller_with_no_process_keeps_its_own_daily_limit(
        self, backend: Backend
    ) -> None:
        """A reserving decision asked with no process mark keeps to its own daily limit
        too, on every store (only a view tells the processes' limit instead): the local
        stores took it for a view and granted past it."""
        assert (await backend.reserve(replace(LIMITS, day_limit=5))).granted
        low = replace(LIMITS, day_limit=2)
        granted = [(await backend.reserve(low, process=None)).granted for _ in range(3)]
        assert granted == [True, False, False]

    async def test_a_view_writes_nothing(self, backend: Backend) -> None:
        """view (broker status) with another tps neither resets the shared rate nor counts."""
        sent = await backend.reserve()
        cut = await backend.reserve(throttled=(sent.now_us,))
        assert cut.rate == pytest.approx(4.5)
        other_tps = replace(LIMITS, nominal_rate=3.0, max_rate=3.0)
        seen = await backend.store.view(KEY, other_tps)
        assert seen.decision.count == 2
        after = await backend.store.decide(
            KEY, LIMITS, feedback=Feedback(), reserve=False, process=ME
        )
        assert after.rate == pytest.approx(4.5)  # not reset by the view's other nominal
        assert after.count == 2

    async def test_a_view_tells_a_key_no_broker_used_there(self, backend: Backend) -> None:
        """view says whether the store holds the key at all, so broker status shows "never
        used" instead of a fresh key's figures (active, the day's quota left) for a key its
        daemon keeps under another prefix or file; and the view stores nothing itself."""
        assert not (await backend.store.view(KEY, LIMITS)).stored
        assert not (await backend.store.view(KEY, LIMITS)).stored
        await backend.reserve()
        assert (await backend.store.view(KEY, LIMITS)).stored

    async def test_successes_raise_the_rate_to_the_cap(self, backend: Backend) -> None:
        """Demand-limited successes raise a cut rate, never above the cap."""
        sent = await backend.reserve()
        await backend.reserve(throttled=(sent.now_us,))
        raised = await backend.reserve(successes=10)
        assert 4.5 < raised.rate < 5.0
        capped = await backend.reserve(successes=5000)
        assert capped.rate == pytest.approx(5.0)

    async def test_pause_holds_the_next_slot(self, backend: Backend) -> None:
        """A Retry-After pause of 1 s puts the next slot 1 s out, with its reason."""
        await backend.reserve()
        paused = await backend.store.decide(
            KEY,
            LIMITS,
            feedback=Feedback(pause_s=1.0, pause_reason="Retry-After"),
            reserve=False,
            process=ME,
        )
        assert paused.pause_reason == "Retry-After"
        held = await backend.reserve()
        assert held.granted
        assert 0.8 <= held.wait_s <= 1.0

    async def test_a_shorter_pause_never_shortens_a_longer_one(self, backend: Backend) -> None:
        """A 60 s pause, then another process's 1 s one: the key stays paused until the
        60 s end, with its reason (the later, shorter pause does not cut it short)."""

        async def pause(seconds: float, reason: str) -> Decision:
            return await backend.store.decide(
                KEY,
                LIMITS,
                feedback=Feedback(pause_s=seconds, pause_reason=reason),
                reserve=False,
                process=ME,
            )

        long = await pause(60.0, "Retry-After")
        assert long.paused_until_us - long.now_us == 60_000_000
        short = await pause(1.0, "outage")
        assert short.paused_until_us == long.paused_until_us
        assert short.pause_reason == "Retry-After"

    async def test_park_admits_one_probe_then_unpark(self, backend: Backend) -> None:
        """Parked: refused; after the park one probe, others refused; a success unparks."""
        await backend.reserve()
        parked = await backend.reserve(park_s=0.2, park_reason="daily quota exhausted")
        assert parked.refusal == "parked"
        assert parked.park_reason == "daily quota exhausted"
        await backend.advance(0.25)
        probe = await backend.reserve()
        assert probe.granted
        assert probe.probe
        other = await backend.reserve()
        assert other.refusal == "probing"
        back = await backend.reserve(unpark=True)
        assert back.granted
        assert not back.probe
        assert back.parked_until_us == 0
        assert back.rate == pytest.approx(5.0)

    async def test_a_probe_lease_is_freed_only_by_its_holder(self, backend: Backend) -> None:
        """A probe given back (never sent, or failed by the prober's own network) frees its
        lease for the next prober at once; a stale lease end frees nothing."""
        await backend.reserve(park_s=0.2, park_reason="daily quota exhausted")
        await backend.advance(0.25)
        probe = await backend.reserve()
        assert probe.probe
        lease_end = probe.now_us + int(LIMITS.probe_lease_s * 1_000_000)
        stale = await backend.reserve(release_probe_us=lease_end - 1)
        assert stale.refusal == "probing"
        again = await backend.reserve(release_probe_us=lease_end)
        assert again.granted
        assert again.probe

    async def test_a_probe_lease_can_end_early_instead(self, backend: Backend) -> None:
        """A probe failed on Amazon's side ends its lease after the prober's own short wait
        (probe_again_s), not the whole lease: every process may probe after that wait."""
        await backend.reserve(park_s=0.2, park_reason="daily quota exhausted")
        await backend.advance(0.25)
        probe = await backend.reserve()
        assert probe.probe
        lease_end = probe.now_us + int(LIMITS.probe_lease_s * 1_000_000)
        held = await backend.reserve(release_probe_us=lease_end, probe_again_s=0.3)
        assert held.refusal == "probing"
        assert held.wait_s <= 0.3
        await backend.advance(0.35)
        again = await backend.reserve()
        assert again.granted
        assert again.probe

    async def test_a_parked_key_is_not_parked_longer_by_late_429s(self, backend: Backend) -> None:
        """A second park while parked (late 429s) keeps the first park's end."""
        first = await backend.reserve(park_s=10.0, park_reason="access revoked")
        second = await backend.reserve(park_s=100.0, park_reason="access revoked")
        assert second.parked_until_us == first.parked_until_us

    async def test_lifting_a_park_restores_the_nominal_rate(self, backend: Backend) -> None:
        """A key cut to its floor rate, parked, then unparked (a request got through)
        restarts at the nominal rate, not at the floor it was parked at."""

        async def report(**feedback: Any) -> Decision:
            return await backend.store.decide(
                KEY, LIMITS, feedback=Feedback(**feedback), reserve=False, process=ME
            )

        floor = await report(set_rate=LIMITS.min_rate)
        assert floor.rate == pytest.approx(LIMITS.min_rate)
        parked = await report(park_s=60.0, park_reason="daily quota exhausted")
        assert parked.parked_until_us > 0
        assert parked.rate == pytest.approx(LIMITS.min_rate)
        back = await report(unpark=True)
        assert back.parked_until_us == 0
        assert back.rate == pytest.approx(LIMITS.nominal_rate)


async def _lose_the_key(backend: Backend, request: pytest.FixtureRequest) -> None:
    """Make the store lose KEY's record: dropped in memory, Redis restarted empty."""
    if isinstance(backend.store, MemoryStateStore):
        backend.store.drop(KEY)
    elif backend.name == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        await asyncio.to_thread(server.restart)
    else:
        pytest.skip("a SQLite file does not lose rows")


class TestDayAndProcesses:
    """The daily count survives a lost store through high-water marks; processes are seen."""

    async def test_an_answer_told_by_one_process_is_today_s_for_every_process(
        self, backend: Backend
    ) -> None:
        """One process's answer of the key today is told to another that never had one (its
        429s at the floor mean a spent quota, not access revoked); the next day it is not."""
        assert not (await backend.reserve()).answered_today
        await backend.reserve(successes=1, answered=True)
        other = await backend.reserve(process=ProcessMark("other:2:b"))
        assert other.answered_today
        if backend.fake is not None:  # Redis's clock is real: no day passes in a test
            await backend.advance(86_400.0)
            assert not (await backend.reserve(process=ProcessMark("other:2:b"))).answered_today

    @pytest.mark.parametrize(
        ("answer_reset_h", "answer_at_h", "asker_reset_h", "asked_at_h", "today"),
        [
            (0, 7, 0, 9, True),  # one reset: answered this morning
            (0, 7, 8, 9, False),  # the asker's window began at 08:00, after the answer
            (8, 31, 0, 31.5, True),  # the asker's window began at 00:00, before the answer
        ],
    )
    def test_answered_today_is_judged_in_the_asking_process_s_window(
        self,
        answer_reset_h: int,
        answer_at_h: float,
        asker_reset_h: int,
        asked_at_h: float,
        today: bool,
    ) -> None:
        """Processes of two daily resets on one key: an answer told by one is "today" for
        the other when it falls in the other's own window (a day number under one reset read
        under the other said the opposite, both ways)."""
        midnight_s = 20_000 * 86_400

        def limits(reset_h: int) -> KeyLimits:
            return replace(LIMITS, day_limit=8640, reset_offset_s=reset_h * 3600)

        def at(hours: float) -> int:
            return int((midnight_s + hours * 3600) * 1_000_000)

        record, teller, asker = Record(), ProcessMark("a:1:a"), ProcessMark("b:2:b")
        t = at(answer_at_h)
        told = Feedback(successes=1, answered=True)
        decide(record, t, limits(answer_reset_h), feedback=told, reserve=True, process=teller)
        leave = Feedback(leaving=True)
        decide(record, t, limits(answer_reset_h), feedback=leave, reserve=False, process=teller)
        t = at(asked_at_h)
        asked = decide(
            record, t, limits(asker_reset_h), feedback=Feedback(), reserve=True, process=asker
        )
        assert asked.answered_today is today

    def test_answered_today_looks_back_no_further_than_the_day_counted(self) -> None:
        """A day counted under a 00:00 reset (a send at 01:00), read at 03:00 by a process
        whose reset is 08:00: its window is the one holding that day's start, which began
        at 00:00, so yesterday's 10:00 answer is not today's (24 h before the window's end,
        08:00, took it in)."""
        midnight_s = 20_000 * 86_400

        def at(hours: float) -> int:
            return int((midnight_s + hours * 3600) * 1_000_000)

        old = replace(LIMITS, day_limit=8640, reset_offset_s=0)
        new = replace(old, reset_offset_s=8 * 3600)
        record, teller, asker = Record(), ProcessMark("a:1:a"), ProcessMark("b:2:b")
        told = Feedback(successes=1, answered=True)
        decide(record, at(-14), old, feedback=told, reserve=True, process=teller)
        decide(record, at(1), old, feedback=Feedback(), reserve=True, process=teller)
        leave = Feedback(leaving=True)
        decide(record, at(1), old, feedback=leave, reserve=False, process=teller)
        asked = decide(record, at(3), new, feedback=Feedback(), reserve=True, process=asker)
        assert not asked.answered_today

    async def test_high_water_mark_rebuilds_a_lost_count(
        self, backend: Backend, request: pytest.FixtureRequest
    ) -> None:
        """A store that lost the key takes the asking process's high-water mark, not zero."""
        first = await backend.reserve()
        await _lose_the_key(backend, request)
        mark = ProcessMark("test:1:a", first.day, 42)
        d = await backend.reserve(process=mark)
        assert d.count == 43

    async def test_a_lost_store_keeps_the_park_and_rate_a_process_saw(
        self, backend: Backend, request: pytest.FixtureRequest
    ) -> None:
        """A store that lost the key (Redis restarted empty) takes the park and the rate the
        asking process saw last: a key parked for Amazon's spent day stays parked, and the
        rate is not back at nominal. It forgot both, and the processes sent a new round of
        429s at the full rate. A record that is not lost is never re-parked by a mark (an
        unpark by another process stands)."""
        first = await backend.reserve()
        parked_until = first.now_us + 600 * 1_000_000
        await _lose_the_key(backend, request)
        mark = ProcessMark(
            "test:1:a",
            first.day,
            first.count,
            rate=0.5,
            parked_until_us=parked_until,
            park_reason="quota spent",
        )
        d = await backend.reserve(process=mark)
        assert not d.granted
        assert d.refusal == "parked"
        assert d.parked_until_us == parked_until
        assert d.park_reason == "quota spent"
        assert d.rate == pytest.approx(0.5)
        # Unparked by another process's probe: a later stale mark does not park it again.
        other = ProcessMark("other:2:b")
        await backend.store.decide(
            KEY, LIMITS, feedback=Feedback(unpark=True), reserve=False, process=other
        )
        again = await backend.reserve(process=mark)
        assert again.parked_until_us == 0
        assert again.granted

    async def test_sends_since_a_loss_add_to_a_higher_mark_from_before_it(
        self, backend: Backend, request: pytest.FixtureRequest
    ) -> None:
        """After the store lost the key, a process that saw more of the day before the loss
        than the count rebuilt so far adds the sends granted since to its mark: four
        processes on a key whose Redis restarted empty sent 31 against a limit of 29, as a
        higher mark swallowed the sends the lower marks were granted."""
        first = await backend.reserve()
        await _lose_the_key(backend, request)
        low = ProcessMark("low:1:a", first.day, 20, gen=first.gen)
        one = await backend.store.decide(
            KEY, LIMITS, feedback=Feedback(), reserve=True, process=low
        )
        assert one.count == 21
        low = ProcessMark("low:1:a", first.day, one.count, gen=one.gen)  # it learnt the new one
        two = await backend.store.decide(
            KEY, LIMITS, feedback=Feedback(), reserve=True, process=low
        )
        assert two.count == 22
        high = ProcessMark("high:2:b", first.day, 24, gen=first.gen)  # the last before the loss
        three = await backend.store.decide(
            KEY, LIMITS, feedback=Feedback(), reserve=True, process=high
        )
        assert three.count == 24 + 3  # 24 sent before the loss, 3 since
        again = await backend.store.decide(
            KEY, LIMITS, feedback=Feedback(), reserve=False, process=low
        )
        assert again.count == 27  # a mark of the new generation adds nothing

    async def test_sends_of_a_generation_the_asker_never_saw_still_count(
        self, backend: Backend, request: pytest.FixtureRequest
    ) -> None:
        """Each earlier generation's sends that a mark reports are counted once, summed
        over generations: after two losses a mark of the first generation and one of the
        second both add theirs (the larger of the two floors swallowed the other's)."""
        first = await backend.reserve()
        await _lose_the_key(backend, request)
        await backend.reserve(process=ProcessMark("q:2:b"))
        second = await backend.reserve(process=ProcessMark("q:2:b"))
        assert second.gen_sends == 2
        await _lose_the_key(backend, request)
        p = ProcessMark("p:1:a", first.day, 5, gen=first.gen, gen_sends=5)
        one = await backend.reserve(process=p)
        assert one.count == 6  # 5 before the first loss, 1 since the second
        assert one.gen_sends == 1
        q = ProcessMark("q:2:b", first.day, second.count, gen=second.gen, gen_sends=2)
        again = await backend.store.decide(
            KEY, LIMITS, feedback=Feedback(), reserve=False, process=q
        )
        assert again.count == 5 + 2 + 1
        twice = await backend.store.decide(
            KEY, LIMITS, feedback=Feedback(), reserve=False, process=q
        )
        assert twice.count == 8  # a generation reported again is counted once

    async def test_earlier_generations_beyond_the_kept_ones_drop_the_smallest(
        self, backend: Backend, request: pytest.FixtureRequest
    ) -> None:
        """A record keeps the sends of at most PRIOR_KEEP earlier generations; one more
        drops the smallest (a floor still, only a lower one), and a count never goes down."""
        from broker.state.decision import PRIOR_KEEP

        first = await backend.reserve()
        await _lose_the_key(backend, request)
        for n in range(PRIOR_KEEP + 1):
            mark = ProcessMark(f"p{n}:1:a", first.day, 0, gen=f"g{n:02}", gen_sends=n + 1)
            told = await backend.store.decide(
                KEY, LIMITS, feedback=Feedback(), reserve=False, process=mark
            )
        assert told.count == sum(range(2, PRIOR_KEEP + 2))  # g00's 1 dropped
        again = ProcessMark("p0:1:a", first.day, 0, gen="g00", gen_sends=1)
        d = await backend.store.decide(
            KEY, LIMITS, feedback=Feedback(), reserve=False, process=again
        )
        assert d.count == told.count  # g00 told again: the smallest, dropped again
        more = ProcessMark("p0:1:a", first.day, 0, gen="g00", gen_sends=10)
        d = await backend.store.decide(
            KEY, LIMITS, feedback=Feedback(), reserve=False, process=more
        )
        assert d.count == sum(range(3, PRIOR_KEEP + 2)) + 10  # g01's 2 dropped now

    async def test_each_process_s_own_sends_rebuild_a_lost_count(
        self, backend: Backend, request: pytest.FixtureRequest
    ) -> None:
        """After a loss, each process's mark tells the sends it was granted today: the record
        sums them over the processes that ask (exactly the day's, once every process that
        sent has asked), whatever generation each last saw; told again, a process's sends
        count once."""
        first = await backend.reserve()
        await _lose_the_key(backend, request)
        await _lose_the_key(backend, request)
        marks = [ProcessMark(f"p{n}:1:a", first.day, 3, gen="old", own_sends=n) for n in (4, 5)]
        for mark in marks:
            told = await backend.store.decide(
                KEY, LIMITS, feedback=Feedback(), reserve=False, process=mark
            )
        assert told.count == 9
        again = await backend.store.decide(
            KEY, LIMITS, feedback=Feedback(), reserve=True, process=marks[0]
        )
        assert again.count == 10  # p4's 4 and its new send, p5's 5

    async def test_a_day_begun_over_one_of_another_reset_is_told(self, backend: Backend) -> None:
        """A process whose daily reset differs from the one the key's day was counted under
        (none of that reset's processes live) begins a new day at its own reset: the
        decision says so, with the other reset, once (processes of two resets taking turns
        gave the key its quota twice a day, unsaid)."""
        into_day = await _store_now_s(backend) % 86_400
        if into_day < 120:
            pytest.skip("too close to the store's midnight")
        first = await backend.reserve()
        assert first.day_taken_over_s == -1
        await backend.leave(LIMITS, ME)
        later = replace(LIMITS, reset_offset_s=into_day - 60)
        other = ProcessMark("other:2:b")
        taken = await backend.reserve(later, process=other)
        assert taken.day_taken_over_s == 0
        assert taken.count == 1  # a new day
        again = await backend.reserve(later, process=other)
        assert again.day_taken_over_s == -1

    async def test_a_park_from_before_a_loss_stands_whoever_asks_first(
        self, backend: Backend, request: pytest.FixtureRequest
    ) -> None:
        """A park a process saw before the store lost the key holds even when another
        process, which never saw it, asked the rebuilt store first: the key was unparked and
        sent 429s on Amazon's spent day."""
        first = await backend.reserve()
        await _lose_the_key(backend, request)
        unaware = ProcessMark("unaware:1:a", first.day, first.count, gen=first.gen)
        granted = await backend.store.decide(
            KEY, LIMITS, feedback=Feedback(), reserve=True, process=unaware
        )
        assert granted.granted
        parked_until = granted.now_us + 600 * 1_000_000
        aware = ProcessMark(
            "aware:2:b",
            first.day,
            first.count,
            parked_until_us=parked_until,
            park_reason="quota spent",
            gen=first.gen,
        )
        d = await backend.store.decide(
            KEY, LIMITS, feedback=Feedback(), reserve=True, process=aware
        )
        assert d.refusal == "parked"
        assert d.parked_until_us == parked_until

    async def test_an_answer_since_a_loss_ends_a_park_from_before_it(
        self, backend: Backend, request: pytest.FixtureRequest
    ) -> None:
        """A park a process saw before the loss does not come back once Amazon answered a
        send of the rebuilt key: the quota is not spent (it parked the key for an hour
        while Amazon answered)."""
        first = await backend.reserve()
        await _lose_the_key(backend, request)
        unaware = ProcessMark("unaware:1:a", first.day, first.count, gen=first.gen)
        granted = await backend.store.decide(
            KEY, LIMITS, feedback=Feedback(), reserve=True, process=unaware
        )
        unaware = ProcessMark("unaware:1:a", first.day, granted.count, gen=granted.gen)
        await backend.store.decide(
            KEY,
            LIMITS,
            feedback=Feedback(successes=1, answered=True),
            reserve=False,
            process=unaware,
        )
        aware = ProcessMark(
            "aware:2:b",
            first.day,
            first.count,
            parked_until_us=granted.now_us + 600 * 1_000_000,
            park_reason="quota spent",
            gen=first.gen,
        )
        d = await backend.store.decide(
            KEY, LIMITS, feedback=Feedback(), reserve=True, process=aware
        )
        assert d.parked_until_us == 0
        assert d.granted

    async def test_processes_seen_recently(self, backend: Backend) -> None:
        """Two process ids asking make two processes seen; a view registers none."""
        await backend.reserve()
        await backend.store.decide(
            KEY, LIMITS, feedback=Feedback(), reserve=False, process=ProcessMark("other:2:b")
        )
        view = await backend.store.view(KEY, LIMITS)
        assert view.decision.processes == 2
        assert view.decision.count == 1

    async def test_a_cut_rate_survives_a_silence_of_the_same_tps(
        self, backend: Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A key whose rate was cut keeps the cut when, after more than a minute of silence,
        a process with the same tps asks again (a new run, a reboot): no reset to nominal."""
        silence = 61.0
        if backend.fake is None:  # Redis's real clock: a shorter "minute" for the script
            monkeypatch.setattr("broker.state.redis.PROCESS_RECENT_S", 1.0)
            silence = 1.5
        sent = await backend.reserve()
        cut = await backend.reserve(throttled=(sent.now_us + 1,))
        assert cut.rate == pytest.approx(4.5)
        await backend.advance(silence)
        assert (await backend.reserve()).rate == pytest.approx(4.5)

    async def test_processes_with_different_tps_agree_on_the_lowest(
        self, backend: Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A rolling config change (one process at 5 TPS, one at 2) does not reset the shared
        rate on each call: both pace at 2 while the 2-TPS process asks; the 5 takes over once
        it has been silent for a minute."""
        old = replace(LIMITS, nominal_rate=5.0, max_rate=5.0)
        new = replace(LIMITS, nominal_rate=2.0, max_rate=2.0)
        other = ProcessMark("other:2:b")

        await backend.reserve(old)
        assert (await backend.reserve(new, process=other)).rate == 2.0
        rates = []
        for _ in range(3):
            rates.append((await backend.reserve(old)).rate)
            rates.append((await backend.reserve(new, process=other)).rate)
        assert rates == [2.0] * 6
        first, second = await backend.reserve(old), await backend.reserve(old)
        assert second.slot_us - first.slot_us == 500_000  # the 5-TPS process paces at 2 too
        silence = 61.0
        if backend.fake is None:  # Redis's real clock: a shorter "minute" for the script
            monkeypatch.setattr("broker.state.redis.PROCESS_RECENT_S", 1.0)
            silence = 1.5
        await backend.advance(silence)
        assert (await backend.reserve(old)).rate == 5.0
        assert (await backend.reserve(old)).rate == 5.0

    async def test_processes_with_different_tpd_keep_to_the_lowest(
        self, backend: Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A rolling change of tpd (one process allowed 3 a day, one 6, one unlimited):
        while the 3 asks, all stop at 3 (the key's quota is the account's); the higher
        limit takes over once the 3 has been silent for a minute."""
        low = replace(LIMITS, day_limit=3, tpd=3)
        high = replace(LIMITS, day_limit=6, tpd=6)
        unlimited = replace(LIMITS, day_limit=None, tpd=None)
        other = ProcessMark("other:2:b")

        assert (await backend.reserve(high)).granted
        assert (await backend.reserve(low, process=other)).granted
        assert (await backend.reserve(unlimited)).granted
        refused = [
            await backend.reserve(high),
            await backend.reserve(unlimited),
            await backend.reserve(low, process=other),
        ]
        assert [d.refusal for d in refused] == ["daily quota"] * 3
        assert refused[0].count == 3
        assert [d.day_limit for d in refused] == [3, 3, 3]  # each caller is told the agreed one
        silence = 61.0
        if backend.fake is None:  # Redis's real clock: a shorter "minute" for the script
            monkeypatch.setattr("broker.state.redis.PROCESS_RECENT_S", 1.0)
            silence = 1.5
        await backend.advance(silence)
        granted = [(await backend.reserve(high)).granted for _ in range(4)]
        assert granted == [True, True, True, False]

    async def test_a_lower_daily_limit_leaves_with_its_process(self, backend: Backend) -> None:
        """The process that kept the daily limit low (tpd 3) closes and says so: a process
        with tpd 6 sends its 4th at once, instead of being told the day is spent until the
        reset (a tpd raised between two runs; the cap held a minute, and the rerun was
        told to wait for midnight)."""
        low = replace(LIMITS, day_limit=3, tpd=3)
        high = replace(LIMITS, day_limit=6, tpd=6)
        before = ProcessMark("before:1:a")

        granted = [(await backend.reserve(low, process=before)).granted for _ in range(4)]
        assert granted == [True] * 3 + [False]
        await backend.leave(low, before)
        after = await backend.reserve(high)
        assert after.granted
        assert after.day_limit == 6
        assert after.processes == 1  # the one that left is not counted

    async def test_an_older_broker_s_lower_daily_limit_holds(
        self, backend: Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An older broker on the key (a daemon not yet restarted after an upgrade) keeps
        its tpd 3 in day_cap, not in its entry: a process allowed 6 stops at 3 while it
        asks, and goes on once it has been silent a minute. It spent past the 3 (841 of
        732 in a rolling upgrade)."""
        high = replace(LIMITS, day_limit=6, tpd=6)
        unlimited = replace(LIMITS, day_limit=None, tpd=None)
        older = ProcessMark("older:1:a")
        # Its sends: counted, and entered under its id alone, as an older broker enters.
        for _ in range(3):
            assert (await backend.reserve(unlimited, process=older)).granted
        await _as_an_older_broker_left_it(backend, day_cap=3)
        refused = await backend.reserve(high)
        assert refused.refusal == "daily quota"
        assert refused.day_limit == 3
        # A process of this version with the same limit asks and leaves: the older
        # broker's cap, asked with since, stays.
        same, newer = replace(LIMITS, day_limit=3, tpd=3), ProcessMark("newer:2:b")
        assert not (await backend.reserve(same, process=newer)).granted
        await backend.advance(0.01)
        await _as_an_older_broker_left_it(backend, day_cap=3)
        await backend.leave(same, newer)
        assert (await backend.reserve(high)).day_limit == 3
        silence = 61.0
        if backend.fake is None:  # Redis's real clock: a shorter "minute" for the script
            monkeypatch.setattr("broker.state.redis.PROCESS_RECENT_S", 1.0)
            silence = 1.5
        await backend.advance(silence)
        later = await backend.reserve(high)
        assert later.granted
        assert later.day_limit == 6

    async def test_a_leaving_process_keeps_a_cap_others_may_need(self, backend: Backend) -> None:
        """Two processes keep tpd 3 and a third has 6: when the last of the two to ask
        closes, the other is still there, so the 6 is refused at 3 as before (the leave
        cleared the cap, and the 6 overspent until the other asked again)."""
        low = replace(LIMITS, day_limit=3, tpd=3)
        high = replace(LIMITS, day_limit=6, tpd=6)
        first, second = ProcessMark("first:1:a"), ProcessMark("second:2:b")

        assert (await backend.reserve(low, process=first)).granted
        assert (await backend.reserve(low, process=second)).granted
        assert (await backend.reserve(high)).granted
        await backend.leave(low, second)
        refused = await backend.reserve(high)
        assert not refused.granted
        assert refused.day_limit == 3

    async def test_a_lower_limit_leaves_while_others_run(self, backend: Backend) -> None:
        """A one-off process with tpd 3 (a `broker lookup`) spends the day beside a run with
        tpd 6 and closes: the run sends its 4th at once. It was told the day was spent until
        the reset, and a daemon deferred its job until midnight."""
        low = replace(LIMITS, day_limit=3, tpd=3)
        high = replace(LIMITS, day_limit=6, tpd=6)
        lookup = ProcessMark("lookup:9:c")

        assert (await backend.reserve(high)).granted
        assert (await backend.reserve(low, process=lookup)).granted
        assert (await backend.reserve(low, process=lookup)).granted
        assert not (await backend.reserve(high)).granted
        await backend.leave(low, lookup)
        again = await backend.reserve(high)
        assert again.granted
        assert again.day_limit == 6

    async def test_a_clock_stepped_back_a_day_does_not_reopen_the_day(
        self, backend: Backend
    ) -> None:
        """The day's limit spent, then the store's clock one day earlier (a wall clock
        stepped back over midnight): the day counted stays, with its count, and the key is
        refused for the daily quota; the earlier day is not opened again."""
        if backend.fake is None:
            pytest.skip("needs the store's clock moved (Redis runs on its own)")
        limits = replace(LIMITS, day_limit=2)
        spent = [await backend.reserve(limits) for _ in range(2)]
        assert [d.granted for d in spent] == [True, True]
        backend.fake[0] -= 86_400 * 1_000_000
        earlier = await backend.reserve(limits)
        assert earlier.refusal == "daily quota"
        assert (earlier.day, earlier.count) == (spent[1].day, 2)

    async def test_day_rolls_over_at_the_reset(self) -> None:
        """The count restarts when the daily window moves on, and never moves back."""
        clock = [_T0]
        store = MemoryStateStore(lambda: clock[0], lambda: clock[0])
        limits = KeyLimits(5.0, 0.05, 5.0, day_limit=1)
        assert (
            await store.decide(KEY, limits, feedback=Feedback(), reserve=True, process=ME)
        ).granted
        refused = await store.decide(KEY, limits, feedback=Feedback(), reserve=True, process=ME)
        assert refused.refusal == "daily quota"
        clock[0] += int(refused.wait_s * 1_000_000) + 1
        assert (
            await store.decide(KEY, limits, feedback=Feedback(), reserve=True, process=ME)
        ).granted


class TestIdentityAndConfig:
    """Key identity, day numbering and the [state] table."""

    def test_identity_is_endpoint_plus_credential(self) -> None:
        """Another endpoint or credential is another key; case and a trailing / are not."""
        a = StateKey.of("http://127.0.0.1:8787/", "cred", name="x")
        assert a.digest == StateKey.of("HTTP://127.0.0.1:8787", "cred", name="y").digest
        assert a.digest != StateKey.of("http://127.0.0.1:8788", "cred").digest
        assert a.digest != StateKey.of("http://127.0.0.1:8787", "cred2").digest
        assert "cred" not in a.digest

    def test_day_number_matches_the_daily_budget(self) -> None:
        """The store's day boundary is the DailyBudget's: 00:00 UTC plus the reset offset."""
        midnight = 1_800_000_000 - 1_800_000_000 % 86_400
        assert day_number((midnight - 1) * 1_000_000, 0) == midnight // 86_400 - 1
        assert day_number(midnight * 1_000_000, 0) == midnight // 86_400
        assert day_number(midnight * 1_000_000, 3600) == midnight // 86_400 - 1

    def test_state_table_defaults_to_local(self) -> None:
        """No [state] table: the local SQLite store in the user's state directory."""
        config = parse_config({"keys": [key_doc()]}, environ=ENV, source="t")
        assert config.state == StateConfig()
        assert config.state.backend == "local"

    def test_redis_password_comes_from_the_environment(self) -> None:
        """redis_password_env names a variable; its value is a Secret, never in repr."""
        doc = {
            "keys": [key_doc()],
            "state": {
                "backend": "redis",
                "redis_url": "redis://10.0.0.5:6379/2",
                "redis_password_env": "REDIS_PW",
                "key_prefix": "x:",
            },
        }
        config = parse_config(doc, environ={**ENV, "REDIS_PW": "hunter2"}, source="t")
        assert config.state.redis_password is not None
        assert config.state.redis_password.reveal() == "hunter2"
        assert "hunter2" not in repr(config.state)
        with pytest.raises(ConfigError, match="REDIS_PW is not set"):
            parse_config(doc, environ=ENV, source="t")

    @pytest.mark.parametrize(
        ("state", "message"),
        [
            ({"backend": "etcd"}, "must be"),
            ({"backend": "redis"}, "redis_url"),
            ({"backend": "redis", "redis_url": "http://x"}, "redis://"),
            ({"backend": "redis", "redis_url": "redis://:pw@x:1"}, "must not hold a password"),
            (
                {"backend": "redis", "redis_url": "redis://x:1/0?PassWord=TopSecretPW"},
                "must not hold a password",
            ),
            ({"colour": "blue"}, "colour"),
            ({"backend": "redis", "redis_url": "REDIS://127.0.0.1:6379/0"}, "lower case"),
            ({"backend": "redis", "redis_url": "redis:/127.0.0.1:6379/0"}, "two slashes"),
        ],
    )
    def test_bad_state_tables_are_refused(self, state: dict[str, object], message: str) -> None:
        """Unknown backends, missing or credentialed URLs and unknown keys are config errors."""
        doc = {"keys": [key_doc()], "state": state}
        with pytest.raises(ConfigError, match=message):
            parse_config(doc, environ=ENV, source="t")

    @pytest.mark.parametrize("blanks", ["{} ", " {}", "\t{}\n"])
    def test_key_state_and_cache_share_one_directory(self, tmp_path: Path, blanks: str) -> None:
        """Blanks around $XDG_STATE_HOME: the key state and the item cache still meet in one
        directory (the cache kept them, a trailing blank made a second directory and a
        leading one sent the cache to ~/.local/state)."""
        from broker.cache import default_cache_path

        env = {"XDG_STATE_HOME": blanks.format(tmp_path)}
        assert local_state_path(StateConfig(), env).parent == tmp_path / "asin-broker"
        assert default_cache_path(env).parent == tmp_path / "asin-broker"

    @pytest.mark.parametrize("home", [None, "", "relative/home"])
    def test_no_home_directory_is_a_config_error(
        self, monkeypatch: pytest.MonkeyPatch, home: str | None
    ) -> None:
        """With no XDG_STATE_HOME and no home (HOME unset and no passwd entry, empty, or
        relative), the default state directory is a ConfigError naming the settings that
        mend it: it was a RuntimeError, and an empty HOME put the state in /.local/state."""

        def no_home() -> Path:
            raise RuntimeError("Could not determine home directory.")

        monkeypatch.setattr(Path, "home", no_home)
        environ = {} if home is None else {"HOME": home}
        with pytest.raises(ConfigError) as caught:
            state_dir(environ)
        assert "no home directory" in str(caught.value)
        assert "XDG_STATE_HOME" in str(caught.value)
        assert "[state] path" in str(caught.value)

    def test_state_dir_follows_xdg(self, tmp_path: Path) -> None:
        """$XDG_STATE_HOME/asin-broker, else ~/.local/state/asin-broker; created mode 0700."""
        assert state_dir({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "asin-broker"
        assert state_dir({}) == Path.home() / ".local" / "state" / "asin-broker"
        store = open_store(StateConfig(), {"XDG_STATE_HOME": str(tmp_path)})
        try:
            assert store.backend == "local"
            assert (tmp_path / "asin-broker").stat().st_mode & 0o777 == 0o700
            assert store.where.endswith("asin-broker/keys.sqlite3")
        finally:
            asyncio.run(store.aclose())

    def test_redacted_url_hides_credentials(self) -> None:
        """A URL with a user or password is shown without them."""
        assert redacted_url("redis://u:pw@h:1/0") == "redis://h:1/0"
        assert redacted_url("redis://h:1/0") == "redis://h:1/0"
        assert redacted_url("redis://h:1/0?password=TopSecretPW") == "redis://h:1/0"

    def test_redacted_url_keeps_the_database_and_the_socket(self) -> None:
        """What tells two deployments apart stays: a ``?db=`` query (redis-py's database
        then) and a unix socket's path, written as given; only credentials go. Status and
        messages showed ``redis://h:1/0`` for ``/0?db=2`` and ``unix:/run/r.sock``."""
        assert redacted_url("redis://h:1/0?db=2") == "redis://h:1/0?db=2"
        assert redacted_url("redis://h:1/0?password=pw&db=2") == "redis://h:1/0?db=2"
        assert redacted_url("unix:///run/redis.sock?db=3") == "unix:///run/redis.sock?db=3"
        assert (
            redacted_url("unix://:pw@/run/redis.sock?username=u&password=pw")
            == "unix:///run/redis.sock"
        )
        assert redacted_url("redis://u:pw@[::1]:6379/0") == "redis://[::1]:6379/0"
        # redis-py takes any parameter as a keyword: the TLS key's passphrase is one.
        assert redacted_url("rediss://h:6380/0?ssl_password=KeyPW&db=1") == "rediss://h:6380/0?db=1"


class TestUnavailable:
    """A store that cannot be reached raises StateUnavailableError, never answers wrongly."""

    async def test_a_hung_redis_is_asked_once_per_call_not_twice(self) -> None:
        """A Redis that answers the handshake but never the script (paused, swamped) fails
        a call after one timeout, the script sent once: a timed-out call was sent again (2 x
        the timeout per call, the outage budget overshot, and a Redis that was only slow
        ran the script twice: a slot and a count lost)."""
        pytest.importorskip("redis")
        scripts = 0

        async def hang_on_scripts(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            # Crude RESP: every command is +OK (PING +PONG) but EVALSHA/EVAL, never answered.
            nonlocal scripts
            buffer = b""
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(4096):
                    buffer += data
                    while b"\r\n" in buffer:
                        line, _, buffer = buffer.partition(b"\r\n")
                        word = line.upper()
                        if word in (b"EVALSHA", b"EVAL"):
                            scripts += 1
                        elif word in (b"PING", b"CLIENT", b"SELECT", b"HELLO", b"INFO"):
                            writer.write(b"+PONG\r\n" if word == b"PING" else b"+OK\r\n")
                            await writer.drain()
            writer.close()

        server = await asyncio.start_server(hang_on_scripts, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        store = RedisStateStore(f"redis://127.0.0.1:{port}/0", key_prefix="t-hung:", timeout_s=0.2)
        try:
            with pytest.raises(StateUnavailableError):
                await store.decide(KEY, LIMITS, feedback=Feedback(), reserve=True, process=ME)
            assert scripts == 1
        finally:
            await store.aclose()
            server.close()
            await server.wait_closed()

    @needs_redis
    async def test_a_redis_that_takes_no_writes_is_unavailable_to_a_view(
        self, redis_server: RedisServer
    ) -> None:
        """A read-only Redis (a replica; out of memory under noeviction is alike) pauses
        every broker on it: broker status's view says it is unavailable, naming the error.
        It showed the keys "active", exit 0, while no broker could send."""
        from redis.asyncio import Redis

        from broker.state.redis_server import free_port

        admin = Redis.from_url(redis_server.url)
        store = RedisStateStore(redis_server.url, key_prefix="t-readonly:")
        try:
            await admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
            with pytest.raises(StateUnavailableError, match=r"READONLY|ReadOnly"):
                await store.view(KEY, LIMITS)
        finally:
            await admin.execute_command("REPLICAOF", "NO", "ONE")
            await admin.aclose()
            await store.aclose()

    @needs_redis
    async def test_a_redis_user_barred_from_scripts_is_a_config_error(
        self, redis_server: RedisServer
    ) -> None:
        """A Redis ACL user that may not run scripts is a config error naming what to grant
        (exit 78 at once); it was "Redis unavailable", waited out for the outage budget."""
        from redis.asyncio import Redis

        admin = Redis.from_url(redis_server.url)
        url = redis_server.url.replace("redis://", "redis://limited@", 1)
        store = RedisStateStore(url, password="limited-pw", key_prefix="t-noperm:")
        try:
            await admin.execute_command(
                "ACL", "SETUSER", "limited", "on", ">limited-pw", "~*", "+@read", "+ping", "+hello"
            )
            with pytest.raises(ConfigError, match=r"permission.*\+@scripting") as info:
                await store.decide(KEY, LIMITS, feedback=Feedback(), reserve=True, process=ME)
            assert "limited-pw" not in str(info.value)
        finally:
            await admin.execute_command("ACL", "DELUSER", "limited")
            await admin.aclose()
            await store.aclose()

    @needs_redis
    async def test_the_documented_redis_permissions_are_enough_and_each_is_needed(
        self, redis_server: RedisServer
    ) -> None:
        """A user granted REDIS_PERMISSIONS (what the README and the error name) decides
        and views; one without +time, which only the script runs, is a config error too, not
        an outage (Redis gives that refusal as a plain error, not NOPERM)."""
        from redis.asyncio import Redis

        from broker.state.redis import REDIS_PERMISSIONS

        admin = Redis.from_url(redis_server.url)
        granted = REDIS_PERMISSIONS.split()
        users = {"full": granted, "notime": [p for p in granted if p != "+time"]}
        stores = {}
        try:
            for name, permissions in users.items():
                await admin.execute_command("ACL", "SETUSER", name, "on", ">pw", "~*", *permissions)
                url = redis_server.url.replace("redis://", f"redis://{name}@", 1)
                stores[name] = RedisStateStore(url, password="pw", key_prefix=f"t-acl-{name}:")
            full = stores["full"]
            await full.decide(KEY, LIMITS, feedback=Feedback(), reserve=True, process=ME)
            await full.view(KEY, LIMITS)
            with pytest.raises(ConfigError, match="lacks a permission"):
                await stores["notime"].decide(
                    KEY, LIMITS, feedback=Feedback(), reserve=True, process=ME
                )
        finally:
            for name in users:
                await admin.execute_command("ACL", "DELUSER", name)
            await admin.aclose()
            for store in stores.values():
                await store.aclose()

    def test_a_redis_cluster_is_a_config_error(self) -> None:
        """A Redis Cluster node redirecting a key elsewhere (MOVED) is a config error saying
        a cluster is not supported; it was an outage, waited out for the budget."""
        from redis.exceptions import (
            AskError,
            ClusterCrossSlotError,
            ClusterDownError,
            MovedError,
            ResponseError,
        )

        store = RedisStateStore("redis://127.0.0.1:1/0")
        for error in (
            MovedError("10661 127.0.0.1:37053"),
            AskError("5338 127.0.0.1:37054"),
            ResponseError("MOVED 10661 127.0.0.1:37053"),  # as redis-py 5.0 gives it
            ResponseError("CLUSTERDOWN The cluster is down"),
            # As redis-py 5 gives them, the first word gone (a node with no slots: it
            # waited out the budget, exit 69).
            ClusterDownError("Hash slot not served"),
            ClusterCrossSlotError("Keys in request don't hash to the same slot"),
        ):
            failure = store._failure(error)
            assert isinstance(failure, ConfigError)
            assert "Redis Cluster" in str(failure)
        asyncio.run(store.aclose())

    @needs_redis
    async def test_rediss_to_a_plain_redis_hints_at_tls(self, redis_server: RedisServer) -> None:
        """A rediss:// URL whose server does not answer the TLS handshake says the server may
        not speak TLS, not only "timeout connecting"."""
        url = redis_server.url.replace("redis://", "rediss://", 1)
        store = RedisStateStore(url, timeout_s=0.3)
        with pytest.raises(StateUnavailableError, match=r"TLS.*redis://"):
            await store.decide(KEY, LIMITS, feedback=Feedback(), reserve=True, process=ME)
        await store.aclose()

    @needs_redis
    async def test_an_evicting_redis_is_named_once(self, redis_server: RedisServer) -> None:
        """A Redis with a memory limit and an evicting policy may drop a key's state at any
        time (each loss sends at several times the key's rate for a moment, and undercounts
        its day): the store warns once, saying to use noeviction."""
        from redis.asyncio import Redis

        admin = Redis.from_url(redis_server.url)
        store = RedisStateStore(redis_server.url, key_prefix="t-evict:")
        try:
            await admin.config_set("maxmemory", "512mb")
            await admin.config_set("maxmemory-policy", "allkeys-lru")
            with capture_logs() as logs:
                for _ in range(3):
                    await store.decide(KEY, LIMITS, feedback=Feedback(), reserve=True, process=ME)
            said = [e for e in logs if e["event"] == "broker.state_evictable"]
            assert len(said) == 1
            assert said[0]["policy"] == "allkeys-lru"
            assert "noeviction" in said[0]["remedy"]
        finally:
            await admin.config_set("maxmemory", "0")
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.aclose()
            await store.aclose()

    @needs_redis
    async def test_a_redis_without_a_memory_limit_is_not_named(
        self, redis_server: RedisServer
    ) -> None:
        """No memory limit (the default) evicts nothing, whatever the policy: no warning."""
        store = RedisStateStore(redis_server.url, key_prefix="t-noevict:")
        with capture_logs() as logs:
            await store.decide(KEY, LIMITS, feedback=Feedback(), reserve=True, process=ME)
        assert [e for e in logs if e["event"] == "broker.state_evictable"] == []
        await store.aclose()

    async def test_redis_down_raises_state_unavailable(self) -> None:
        """Nothing listening on the port: a clear error naming the backend and the URL."""
        from broker.state.redis_server import free_port

        store = RedisStateStore(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
        with pytest.raises(StateUnavailableError) as info:
            await store.decide(KEY, LIMITS, feedback=Feedback(), reserve=True, process=ME)
        assert info.value.backend == "redis"
        await store.aclose()


class TestBrokenStateFile:
    """A state file that waiting cannot mend ends the run (exit 74) with what to do."""

    def test_unwritable_state_dir_is_an_io_error(self, tmp_path: Path) -> None:
        """A state path whose directory cannot be created (a file in the way, a read-only
        file system) is an OSError naming it, not a store to wait for."""
        blocker = tmp_path / "file"
        blocker.write_text("x")
        with pytest.raises(OSError, match="cannot create or enter its directory") as info:
            SqliteStateStore(blocker / "sub" / "keys.sqlite3")
        assert not isinstance(info.value, StateUnavailableError)

    def test_a_directory_at_the_path_is_an_io_error(self, tmp_path: Path) -> None:
        """A directory where the file should be: an OSError saying the path must be a file."""
        (tmp_path / "keys.sqlite3").mkdir()
        with pytest.raises(OSError, match="the path must be a file"):
            SqliteStateStore(tmp_path / "keys.sqlite3")

    def test_damaged_file_is_an_io_error_naming_the_remedy(self, tmp_path: Path) -> None:
        """A file that is not SQLite: an OSError (EIO) saying it may be deleted, not a wait."""
        path = tmp_path / "keys.sqlite3"
        path.write_bytes(os.urandom(8192))
        with pytest.raises(OSError, match="damaged") as info:
            SqliteStateStore(path)
        assert info.value.errno == errno.EIO
        assert "delete it" in str(info.value)

    def test_a_table_of_another_shape_is_an_io_error_at_once(self, tmp_path: Path) -> None:
        """A key_state table with other columns (another version's file, another program's)
        is an OSError when the file is opened, naming the columns: it was taken for an
        outage, waited out for the whole outage budget (exit 69 after 900 s), while
        broker status showed every key fine."""
        path = tmp_path / "keys.sqlite3"
        with sqlite_db(path) as conn:
            conn.execute("CREATE TABLE key_state (digest TEXT PRIMARY KEY, data BLOB)")
        with pytest.raises(OSError, match="lacks columns") as info:
            SqliteStateStore(path)
        assert not isinstance(info.value, StateUnavailableError)
        assert "it has data, digest" in str(info.value)

    def test_another_programs_database_is_refused_and_left_untouched(self, tmp_path: Path) -> None:
        """[state] path naming another program's SQLite database (a typo, a job's SQLite
        output): an I/O error saying so, and the file keeps its tables and journal mode; the
        store added its table to it and switched it to WAL."""
        path = tmp_path / "orders.db"
        with sqlite_db(path) as conn:
            conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, total REAL)")
        with pytest.raises(OSError, match="another program's") as info:
            SqliteStateStore(path)
        assert info.value.errno == errno.EIO
        assert "[state] path" in str(info.value)
        with sqlite_db(path) as conn:
            assert [n for (n,) in conn.execute("SELECT name FROM sqlite_schema")] == ["orders"]
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)

    async def test_a_table_with_more_columns_is_fine(self, tmp_path: Path) -> None:
        """A later version's key_state table with a column more still works here: the
        decisions count the day as usual."""
        path = tmp_path / "keys.sqlite3"
        with sqlite_db(path) as conn:
            conn.execute(
                "CREATE TABLE key_state (digest TEXT PRIMARY KEY, name TEXT NOT NULL, "
                "data BLOB NOT NULL, extra TEXT)"
            )
        clock = [_T0]
        store = SqliteStateStore(path, now_us=lambda: clock[0], wall_us=lambda: clock[0])
        try:
            backend = Backend("local", store, clock)
            first = await backend.reserve()
            second = await backend.reserve()
        finally:
            await store.aclose()
        assert (first.granted, second.granted) == (True, True)
        assert second.count == 2

    def test_a_file_that_is_not_sqlite_says_to_check_the_path(self, tmp_path: Path) -> None:
        """A file that is no SQLite database (a job file named by mistake) is not only
        called damaged with advice to delete it: the message says to check [state] path."""
        path = tmp_path / "asins.txt"
        path.write_text("B0C1234567\nB0C1234568\n" * 100)
        with pytest.raises(OSError, match="not a SQLite database") as info:
            SqliteStateStore(path)
        assert "[state] path" in str(info.value)

    async def test_read_only_file_is_an_io_error(self, tmp_path: Path) -> None:
        """SQLite's READONLY (a read-only file or mount) is EROFS, not a pause that never ends."""
        store = SqliteStateStore(tmp_path / "keys.sqlite3")
        refused = sqlite3.OperationalError("attempt to write a readonly database")
        refused.sqlite_errorcode = sqlite3.SQLITE_READONLY  # type: ignore[attr-defined]
        failure = store._failure(refused)
        assert isinstance(failure, OSError)
        assert failure.errno == errno.EROFS
        await store.aclose()

    async def test_a_path_longer_than_sqlite_opens_says_so(self, tmp_path: Path) -> None:
        """A key-state file whose full path is over the 504 bytes SQLite opens is refused
        naming that limit, not "the path must be a file this user can write"."""
        folder = tmp_path
        while len(os.fsencode(folder)) < 520:
            folder = folder / ("e" * 50)
        with pytest.raises(OSError, match="longer than the 504 bytes SQLite can open") as info:
            SqliteStateStore(folder / "keys.sqlite3")
        assert info.value.errno == errno.ENAMETOOLONG

    async def test_a_held_lock_does_not_stall_the_loop(self, tmp_path: Path) -> None:
        """Another process holding the file's write lock: the decision gives up in a fraction
        of a second (the key pauses and asks again), instead of blocking the loop 10 s."""
        path = tmp_path / "keys.sqlite3"
        store = SqliteStateStore(path)
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            started = time.monotonic()
            with pytest.raises(StateUnavailableError, match="locked"):
                await store.decide(KEY, LIMITS, feedback=Feedback(), reserve=True, process=ME)
            assert time.monotonic() - started < 2.0
        finally:
            holder.execute("ROLLBACK")
            holder.close()
            await store.aclose()

    def test_lookup_with_an_unopenable_state_path_says_so_at_once(
        self,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A state path that cannot be made: exit 74 at once, naming it, no claim of a wait."""
        from broker import cli

        blocker = tmp_path / "file"
        blocker.write_text("x")
        config = tmp_path / "config.toml"
        config.write_text(_toml_with_state_file(blocker / "keys.sqlite3"))
        monkeypatch.setenv("ASINB_DEMO_SECRET", "demo-secret")
        args = ["lookup", "B0TEST0001", "--config", str(config), "--outage-budget", "300"]
        assert cli.main(args) == 74
        said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("broker:")]
        assert len(said) == 1
        assert "cannot create or enter its directory" in said[0]
        assert f"{blocker} is a file, not a directory" in said[0]  # not "File exists"
        assert "[Errno" not in said[0]
        assert "after" not in said[0]  # nothing was waited for

    def test_a_file_in_the_way_deeper_up_is_the_one_named(self, tmp_path: Path) -> None:
        """A state path whose folder is under a regular file names that file, not the
        deepest folder mkdir tried (which does not exist)."""
        from broker.state.sqlite import SqliteStateStore

        blocker = tmp_path / "afile"
        blocker.write_text("x")
        with pytest.raises(OSError, match="is a file") as caught:
            SqliteStateStore(blocker / "a" / "b" / "keys.sqlite3")
        assert f"{blocker} is a file, not a directory" in str(caught.value)
        assert f"{blocker / 'a' / 'b'} is a file" not in str(caught.value)

    def test_run_with_a_damaged_state_file_exits_74(
        self,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """broker run and broker lookup say the file is damaged and exit 74, no traceback."""
        from broker import cli

        damaged = tmp_path / "keys.sqlite3"
        damaged.write_bytes(os.urandom(8192))
        config = tmp_path / "config.toml"
        config.write_text(_toml_with_state_file(damaged))
        monkeypatch.setenv("ASINB_DEMO_SECRET", "demo-secret")
        (tmp_path / "job.txt").write_text("B0TEST0001\n")
        out = str(tmp_path / "out.jsonl")
        assert (
            cli.main(["run", str(tmp_path / "job.txt"), "--config", str(config), "--out", out])
            == 74
        )
        assert cli.main(["lookup", "B0TEST0001", "--config", str(config)]) == 74
        err = capsys.readouterr().err
        said = [line for line in err.splitlines() if line.startswith("broker: ")]
        assert len(said) == 2
        assert all("damaged" in line and "delete it" in line for line in said)
        assert not any("[Errno" in line for line in said)
        assert "Traceback" not in err


class TestSqliteReuse:
    """The SQLite store reuses the record it last wrote only while the row is unchanged."""

    async def test_two_stores_on_one_file_see_each_others_writes(self, tmp_path: Path) -> None:
        """Alternating decisions of two stores (two processes) take consecutive slots."""
        clock = [_T0]
        path = tmp_path / "keys.sqlite3"
        a, b = (
            SqliteStateStore(path, now_us=lambda: clock[0], wall_us=lambda: clock[0])
            for _ in range(2)
        )
        decisions = [await Backend("local", s, clock).reserve() for s in (a, b, a, a, b)]
        assert [d.count for d in decisions] == [1, 2, 3, 4, 5]
        assert [d.slot_us - _T0 for d in decisions] == [0, 200_000, 400_000, 600_000, 800_000]
        await a.aclose()
        await b.aclose()

    async def test_a_deleted_file_is_followed_and_shared_again(self, tmp_path: Path) -> None:
        """The file deleted while two stores (processes) use it, and a third starts: the
        first two open the new file at their next decision, so all three share slots (not
        an unlinked copy beside the new one), with a warning each; the day's count is
        rebuilt from the processes' own marks and the sends granted since the delete."""
        clock = [_T0]
        path = tmp_path / "keys.sqlite3"

        def store() -> SqliteStateStore:
            return SqliteStateStore(path, now_us=lambda: clock[0], wall_us=lambda: clock[0])

        a, b = store(), store()
        before = [await Backend("local", s, clock).reserve() for s in (a, b)]
        assert [d.count for d in before] == [1, 2]
        for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            leftover.unlink(missing_ok=True)
        c = store()  # a process started after the delete: it makes the new file
        clock[0] += 1_000_000  # the others look at the path once a second
        # Each process brings its mark of the day's count, as the engine's limiter does.
        day = before[1].day
        marks = {a: ProcessMark("a", day, 2), b: ProcessMark("b", day, 2), c: ProcessMark("c")}
        with capture_logs() as logs:
            after = [
                await s.decide(KEY, LIMITS, feedback=Feedback(), reserve=True, process=marks[s])
                for s in (c, a, b, c)
            ]
        grid = [d.slot_us - _T0 - 1_000_000 for d in after]
        assert grid == [0, 200_000, 400_000, 600_000]  # one grid for all three
        # 2 before the delete, then 4 more: c's first grant (it knew of none) is counted
        # once a's mark of the 2 arrives.
        assert [d.count for d in after] == [1, 4, 5, 6]
        assert [e["event"] for e in logs].count("broker.state_file_replaced") == 2
        for s in (a, b, c):
            await s.aclose()

    async def test_a_file_deleted_with_its_journal_is_made_again(self, tmp_path: Path) -> None:
        """Deleted with its -wal and -shm while one store alone uses it: that store makes the
        file again at its next decision a second later, where later processes meet it."""
        clock = [_T0]
        path = tmp_path / "keys.sqlite3"
        a = SqliteStateStore(path, now_us=lambda: clock[0], wall_us=lambda: clock[0])
        assert (await Backend("local", a, clock).reserve()).count == 1
        for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            leftover.unlink()
        clock[0] += 1_000_000
        await Backend("local", a, clock).reserve()
        assert path.exists()
        await a.aclose()

    async def test_a_file_deleted_alone_leaves_the_processes_on_it(self, tmp_path: Path) -> None:
        """Only the file deleted, its -wal and -shm left (still the old database's): the
        running stores stay on the file they have and go on deciding, with no I/O error."""
        clock = [_T0]
        path = tmp_path / "keys.sqlite3"
        a, b = (
            SqliteStateStore(path, now_us=lambda: clock[0], wall_us=lambda: clock[0])
            for _ in range(2)
        )
        assert [(await Backend("local", s, clock).reserve()).count for s in (a, b)] == [1, 2]
        path.unlink()
        clock[0] += 2_000_000
        later = [await Backend("local", s, clock).reserve() for s in (a, b, a)]
        assert [d.count for d in later] == [3, 4, 5]
        assert not path.exists()
        await a.aclose()
        await b.aclose()

    async def test_a_new_process_beside_orphaned_wal_refuses_and_harms_none(
        self, tmp_path: Path
    ) -> None:
        """The file deleted alone while a store uses it, then a new process starts: it
        refuses (an OSError naming the -wal and -shm to delete), creates no file beside
        them, and the running store goes on deciding (it was killed by an I/O error)."""
        clock = [_T0]
        path = tmp_path / "keys.sqlite3"

        def store() -> SqliteStateStore:
            return SqliteStateStore(path, now_us=lambda: clock[0], wall_us=lambda: clock[0])

        a = store()
        assert (await Backend("local", a, clock).reserve()).count == 1
        path.unlink()
        with pytest.raises(OSError, match=r"-wal") as info:
            store()
        assert "-shm" in str(info.value)
        assert not path.exists()
        clock[0] += 2_000_000
        later = [await Backend("local", a, clock).reserve() for _ in range(3)]
        assert [d.count for d in later] == [2, 3, 4]
        await a.aclose()

    async def test_a_linked_path_whose_target_is_deleted_alone_is_guarded_too(
        self, tmp_path: Path
    ) -> None:
        """[state] path a symbolic link, its target deleted alone: the running stores stay
        on the file they have and a new process refuses, as for a plain path (the journals
        were looked for beside the link, not the target: one store took the file for
        replaced, reopened beside the live -wal and died of "disk I/O error", and a new
        process made a fresh file there)."""
        clock = [_T0]
        (tmp_path / "real").mkdir()
        target = tmp_path / "real" / "keys.sqlite3"
        link = tmp_path / "keys.sqlite3"
        link.symlink_to(target)

        def store() -> SqliteStateStore:
            return SqliteStateStore(link, now_us=lambda: clock[0], wall_us=lambda: clock[0])

        a, b = store(), store()
        assert [(await Backend("local", s, clock).reserve()).count for s in (a, b)] == [1, 2]
        target.unlink()
        with pytest.raises(OSError, match=r"-wal"):
            store()
        assert not target.exists()
        clock[0] += 2_000_000
        with capture_logs() as logs:
            later = [await Backend("local", s, clock).reserve() for s in (a, b, a)]
        assert [d.count for d in later] == [3, 4, 5]
        assert "broker.state_file_replaced" not in [e["event"] for e in logs]
        await a.aclose()
        await b.aclose()

    async def test_a_link_pointed_at_another_file_is_followed_by_the_running_stores(
        self, tmp_path: Path
    ) -> None:
        """[state] path a link, pointed at a copy of the file while a store runs: the
        running store follows it at its next look, as for a file replaced at a plain path,
        and shares the count with a store opened since (each counted in its own file)."""
        import shutil

        clock = [_T0]
        (tmp_path / "one").mkdir()
        (tmp_path / "two").mkdir()
        link = tmp_path / "keys.sqlite3"
        link.symlink_to(tmp_path / "one" / "keys.sqlite3")

        def store() -> SqliteStateStore:
            return SqliteStateStore(link, now_us=lambda: clock[0], wall_us=lambda: clock[0])

        a = store()
        assert (await Backend("local", a, clock).reserve()).count == 1
        with sqlite_db(tmp_path / "one" / "keys.sqlite3") as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        shutil.copy(tmp_path / "one" / "keys.sqlite3", tmp_path / "two" / "keys.sqlite3")
        link.unlink()
        link.symlink_to(tmp_path / "two" / "keys.sqlite3")
        b = store()
        clock[0] += 2_000_000
        counts = [(await Backend("local", s, clock).reserve()).count for s in (a, b, a, b)]
        assert counts == [2, 3, 4, 5]
        await a.aclose()
        await b.aclose()

    def test_a_path_naming_a_pipe_is_refused_and_nothing_is_left_beside_it(
        self, tmp_path: Path
    ) -> None:
        """A [state] path naming a FIFO or a device is refused before SQLite opens it (it
        left a -journal beside it)."""
        from broker.sqlitewal import RefusedFileError

        path = tmp_path / "keys.fifo"
        os.mkfifo(path)
        with pytest.raises(RefusedFileError, match=r"not a file: set \[state\] path"):
            SqliteStateStore(path)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.fifo"]

    async def test_a_file_made_meanwhile_is_no_orphan(self, tmp_path: Path) -> None:
        """The orphan check looks at the file again: a process that found no file while
        another made it (with its -wal) starts on it, not refuses a healthy first start."""
        from broker.sqlitewal import refuse_orphans

        clock = [_T0]
        path = tmp_path / "keys.sqlite3"
        a = SqliteStateStore(path, now_us=lambda: clock[0], wall_us=lambda: clock[0])
        assert (await Backend("local", a, clock).reserve()).count == 1
        assert await asyncio.to_thread(os.path.exists, f"{path}-wal")
        # What a process that looked before `a` made the file runs:
        refuse_orphans(path, "the key state")
        await a.aclose()

    async def test_a_failed_write_is_not_remembered(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A decision whose write failed leaves no trace: the next one starts from the file."""
        import broker.state.sqlite as sqlite_module

        clock = [_T0]
        store = SqliteStateStore(
            tmp_path / "keys.sqlite3", now_us=lambda: clock[0], wall_us=lambda: clock[0]
        )
        local = Backend("local", store, clock)
        assert (await local.reserve()).count == 1

        class FailingJson:
            @staticmethod
            def dumps(record: object) -> bytes:
                raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(sqlite_module, "orjson", FailingJson)
        with pytest.raises(StateUnavailableError):
            await local.reserve()
        monkeypatch.undo()
        after = await local.reserve()
        assert (after.count, after.slot_us - _T0) == (2, 200_000)
        await store.aclose()

    async def test_a_new_state_file_is_private(self, tmp_path: Path) -> None:
        """The key-state file is created 0600 in a 0700 directory, like the item cache."""
        path = tmp_path / "state" / "keys.sqlite3"
        store = SqliteStateStore(path)
        await Backend("local", store, None).reserve()
        await store.aclose()
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    async def test_a_new_file_has_small_pages_and_an_old_one_keeps_its_own(
        self, tmp_path: Path
    ) -> None:
        """A new state file gets 1 KiB pages (one per decision goes to the WAL); old ones stay."""
        fresh = tmp_path / "new.sqlite3"
        store = SqliteStateStore(fresh)
        await Backend("local", store, None).reserve()
        await store.aclose()
        old = tmp_path / "old.sqlite3"
        conn = sqlite3.connect(old)
        conn.execute("CREATE TABLE key_state (digest TEXT PRIMARY KEY, name TEXT, data BLOB)")
        conn.close()
        store = SqliteStateStore(old)
        assert (await Backend("local", store, None).reserve()).count == 1
        await store.aclose()
        sizes = {}
        for path in (fresh, old):
            conn = sqlite3.connect(path)
            sizes[path.name] = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.close()
        assert sizes == {"new.sqlite3": 1024, "old.sqlite3": 4096}


_WORKER = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from broker.state import Feedback, KeyLimits, ProcessMark, StateKey
    from broker.state.sqlite import SqliteStateStore

    async def main() -> None:
        path, name, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
        store = SqliteStateStore(path)
        key = StateKey.of("http://sim", "cred")
        limits = KeyLimits(2000.0, 1.0, 2000.0, day_limit=150, horizon_s=60.0)
        slots = []
        for _ in range(n):
            d = await store.decide(
                key, limits, feedback=Feedback(), reserve=True, process=ProcessMark(name)
            )
            if d.granted:
                slots.append(d.slot_us)
        print(json.dumps(slots))

    asyncio.run(main())
    """
)


class TestManyProcesses:
    """Several processes on one SQLite file: every slot once, the day never over its limit."""

    def test_processes_share_slots_and_the_day(self, tmp_path: Path) -> None:
        """4 processes x 60 reservations, limit 150: 150 granted, distinct slots 500 µs apart."""
        db = tmp_path / "keys.sqlite3"
        env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _WORKER, str(db), f"p{i}", "60"],
                stdout=subprocess.PIPE,
                env=env,
            )
            for i in range(4)
        ]
        slots: list[int] = []
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0
            slots += json.loads(out)
        assert len(slots) == 150
        ordered = sorted(slots)
        assert len(set(ordered)) == 150
        gaps = [b - a for a, b in itertools.pairwise(ordered)]
        assert min(gaps) >= 500 - 125  # a quarter interval of slack keeps the grid


async def _as_an_older_broker_left_it(backend: Backend, *, day_cap: int) -> None:
    """Write into KEY's record what an older broker writes when it asks with ``day_cap`` as
    its daily limit: the cap, seen now (it keeps its limit nowhere else)."""
    if backend.fake is not None:
        now = backend.fake[0]
        if isinstance(backend.store, MemoryStateStore):
            record = backend.store._records[KEY.digest]
            record.day_cap, record.day_cap_seen = day_cap, now
            return
        assert isinstance(backend.store, SqliteStateStore)
        with sqlite_db(backend.store._path) as conn:
            (data,) = conn.execute(
                "SELECT data FROM key_state WHERE digest = ?", (KEY.digest,)
            ).fetchone()
            record = Record.from_json(json.loads(data))
            record.day_cap, record.day_cap_seen = day_cap, now
            conn.execute(
                "UPDATE key_state SET data = ? WHERE digest = ?",
                (json.dumps(record.to_json()), KEY.digest),
            )
        conn.close()
        return
    assert isinstance(backend.store, RedisStateStore)
    client = backend.store._client
    seconds, micros = await client.time()
    await client.hset(
        backend.store._keys(KEY)[0],
        mapping={"day_cap": day_cap, "day_cap_seen": seconds * 1_000_000 + micros},
    )


def test_a_record_an_older_broker_wrote_takes_no_park_from_a_mark() -> None:
    """A record without a generation (an older broker rewrote it, keeping none) was not
    lost: a mark carrying a park does not park it again (an unpark by the older broker's
    probe stands)."""
    record = Record(rate=5.0, nominal=5.0, day=1)
    mark = ProcessMark("new:1:a", 1, 0, parked_until_us=_T0 + 600_000_000, gen="123:x")
    decision = decide(record, _T0, LIMITS, feedback=Feedback(), reserve=True, process=mark)
    assert decision.granted
    assert decision.parked_until_us == 0


def test_the_lua_decision_keeps_as_many_generations_as_decision_py() -> None:
    """decide.lua's prior_keep and own_keep are decision.PRIOR_KEEP and OWN_KEEP (constants
    there, not arguments)."""
    import re

    import broker.state as state_package
    from broker.state.decision import OWN_KEEP, PRIOR_KEEP

    lua = (Path(state_package.__file__).with_name("decide.lua")).read_text()
    (value,) = re.findall(r"^local prior_keep = (\d+) ", lua, flags=re.MULTILINE)
    assert int(value) == PRIOR_KEEP
    (value,) = re.findall(r"^local own_keep = (\d+) ", lua, flags=re.MULTILINE)
    assert int(value) == OWN_KEEP


def test_the_lua_decision_probes_as_ratecontrol_does() -> None:
    """decide.lua's probe_far is ratecontrol.PROBE_FAR: the Redis home cuts a far-throttled
    probe as the memory and SQLite homes do (a constant there, not an argument)."""
    import re

    import broker.state as state_package
    from broker.ratecontrol import PROBE_FAR

    lua = (Path(state_package.__file__).with_name("decide.lua")).read_text()
    (value,) = re.findall(r"^local probe_far = ([0-9.]+)$", lua, flags=re.MULTILINE)
    assert float(value) == PROBE_FAR
    assert "r <= probe_far * previous" in lua


async def _store_now_s(backend: Backend) -> int:
    """The store's wall clock in whole seconds (Redis: its TIME)."""
    if backend.fake is not None:
        return backend.fake[0] // 1_000_000
    assert isinstance(backend.store, RedisStateStore)
    seconds, _ = await backend.store._client.time()
    return int(seconds)


async def _redis_set(backend: Backend, **fields: int) -> None:
    """Write fields into KEY's Redis hash (stands in for a clock step or a time gone by)."""
    assert isinstance(backend.store, RedisStateStore)
    mapping: dict[Any, Any] = dict(fields)
    await backend.store._client.hset(backend.store._keys(KEY)[0], mapping=mapping)


async def _redis_now_us(backend: Backend) -> int:
    assert isinstance(backend.store, RedisStateStore)
    seconds, micros = await backend.store._client.time()
    return int(seconds) * 1_000_000 + int(micros)


class TestGridSlack:
    """A late wake-up keeps the key's grid."""

    async def test_a_slot_a_little_in_the_past_keeps_the_grid(self, backend: Backend) -> None:
        """A next slot a quarter interval or less in the past is still booked (a late wake-up
        does not shift the key's grid): the slot is the old one, one interval on."""
        first = await backend.reserve()
        await backend.advance(0.205)  # 5 ms past the next slot; slack is 50 ms at 5/s
        late = await backend.reserve()
        assert late.granted
        assert late.slot_us == first.slot_us + 200_000
        assert late.wait_s == 0.0

    async def test_a_slot_further_in_the_past_is_not_caught_up(self, backend: Backend) -> None:
        """A next slot more than the slack in the past (a key idle for a while) is not booked:
        the key sends now and again one interval later, never two at once to catch up."""
        await backend.reserve()  # 5/s: the next slot 200 ms on
        await backend.advance(0.7)  # idle: that slot is 500 ms in the past
        first = await backend.reserve()
        second = await backend.reserve()
        assert first.granted
        assert second.granted
        assert first.wait_s == 0.0
        assert second.slot_us - first.slot_us == 200_000
        # About an interval less what passed between the two (Redis round trips included;
        # the other worker may hold the core): a catch-up burst would wait nothing.
        assert second.wait_s >= 0.1


class TestRebootAndWallClock:
    """The local home's two clocks: monotonic slots, a wall-clock day, a reboot."""

    async def test_a_reboot_drops_the_monotonic_times_and_keeps_the_day(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The machine rebooted (another boot id; the monotonic clock restarts near 0): a
        pause and a park set before it, in the old clock's µs, are dropped, not held for
        the old uptime; the day's count, on the wall clock, stays."""
        path = tmp_path / "keys.sqlite3"
        mono, wall = [5_000_000_000_000], [_T0]  # ~58 days of uptime
        monkeypatch.setattr("broker.state.sqlite.boot_epoch", lambda: "boot-1")
        before = SqliteStateStore(path, now_us=lambda: mono[0], wall_us=lambda: wall[0])
        await before.decide(KEY, LIMITS, feedback=Feedback(), reserve=True, process=ME)
        await before.decide(
            KEY,
            LIMITS,
            feedback=Feedback(pause_s=60.0, park_s=900.0, park_reason="quota"),
            reserve=False,
            process=ME,
        )
        await before.aclose()
        monkeypatch.setattr("broker.state.sqlite.boot_epoch", lambda: "boot-2")
        mono[0] = 30_000_000  # 30 s after the reboot
        wall[0] += 60_000_000
        after = SqliteStateStore(path, now_us=lambda: mono[0], wall_us=lambda: wall[0])
        d = await after.decide(KEY, LIMITS, feedback=Feedback(), reserve=True, process=ME)
        await after.aclose()
        assert d.granted
        assert d.wait_s == 0.0
        assert d.parked_until_us == 0
        assert d.count == 2

    async def test_a_file_two_machines_write_is_said_once_and_a_reboot_is_not(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A local state file on a disk two machines share: a key this process wrote, then
        rewritten under another boot id, is warned of once (each machine silently dropped
        the other's pacing and parks); a store opening after a reboot is not warned."""
        path = tmp_path / "keys.sqlite3"
        clock = [_T0]
        monkeypatch.setattr("broker.state.sqlite.boot_epoch", lambda: "boot-a")
        a = SqliteStateStore(path, now_us=lambda: clock[0], wall_us=lambda: clock[0])
        monkeypatch.setattr("broker.state.sqlite.boot_epoch", lambda: "boot-b")
        b = SqliteStateStore(path, now_us=lambda: clock[0], wall_us=lambda: clock[0])
        with capture_logs() as logs:
            await a.decide(KEY, LIMITS, feedback=Feedback(), reserve=True, process=ME)
            await b.decide(KEY, LIMITS, feedback=Feedback(), reserve=True, process=ME)
        assert [e for e in logs if e["event"] == "broker.state_shared_across_machines"] == []
        with capture_logs() as logs:
            for _ in range(3):
                await a.decide(KEY, LIMITS, feedback=Feedback(), reserve=True, process=ME)
                await b.decide(KEY, LIMITS, feedback=Feedback(), reserve=True, process=ME)
        said = [e for e in logs if e["event"] == "broker.state_shared_across_machines"]
        assert len(said) == 2  # once by each store
        assert 'backend = "redis"' in said[0]["note"]
        await a.aclose()
        await b.aclose()
        # A process that cannot read its boot id (a container hiding it) tells nothing.
        monkeypatch.setattr("broker.state.sqlite.boot_epoch", lambda: "")
        blind = SqliteStateStore(path, now_us=lambda: clock[0], wall_us=lambda: clock[0])
        monkeypatch.setattr("broker.state.sqlite.boot_epoch", lambda: "boot-a")
        seeing = SqliteStateStore(path, now_us=lambda: clock[0], wall_us=lambda: clock[0])
        with capture_logs() as logs:
            for _ in range(3):
                await blind.decide(KEY, LIMITS, feedback=Feedback(), reserve=True, process=ME)
                await seeing.decide(KEY, LIMITS, feedback=Feedback(), reserve=True, process=ME)
        assert [e for e in logs if e["event"] == "broker.state_shared_across_machines"] == []
        await blind.aclose()
        await seeing.aclose()

    @pytest.mark.parametrize("home", ["memory", "local"])
    async def test_the_day_and_its_reset_follow_the_wall_clock(
        self, home: str, tmp_path: Path
    ) -> None:
        """Slots run on the monotonic clock, the day on the wall clock: a spent key is told
        to ask again at the wall clock's reset, not at a time on the monotonic clock (which
        counts from boot, and read as decades away)."""
        mono, wall = [123_456_789_000], [_T0]  # _T0 is 08:00 UTC: the reset is in 16 h
        store: Any
        if home == "memory":
            store = MemoryStateStore(lambda: mono[0], lambda: wall[0])
        else:
            store = SqliteStateStore(
                tmp_path / "keys.sqlite3", now_us=lambda: mono[0], wall_us=lambda: wall[0]
            )
        limits = replace(LIMITS, day_limit=1)
        granted = await store.decide(KEY, limits, feedback=Feedback(), reserve=True, process=ME)
        refused = await store.decide(KEY, limits, feedback=Feedback(), reserve=True, process=ME)
        await store.aclose()
        assert granted.day == day_number(_T0, 0)
        assert refused.refusal == "daily quota"
        assert refused.wait_s == pytest.approx(16 * 3_600, abs=1)

    async def test_a_view_shows_the_park_and_pause_the_store_holds(self, tmp_path: Path) -> None:
        """broker status (view) of a local store reads the park and pause a process set, by
        the same boot's clock: it does not read them as another boot's and drop them."""
        clock = [_T0]
        store = SqliteStateStore(
            tmp_path / "keys.sqlite3", now_us=lambda: clock[0], wall_us=lambda: clock[0]
        )
        await store.decide(
            KEY,
            LIMITS,
            feedback=Feedback(
                pause_s=30.0, pause_reason="Retry-After", park_s=900.0, park_reason="quota"
            ),
            reserve=False,
            process=ME,
        )
        view = await store.view(KEY, LIMITS)
        await store.aclose()
        assert view.decision.parked_until_us == _T0 + 900_000_000
        assert view.decision.park_reason == "quota"
        assert view.decision.pause_reason == "Retry-After"


class TestDailyWindowEverywhere:
    """The daily window's reset and hold, on every home."""

    @pytest.mark.parametrize("reset_in_s", [86_400 - 1_800, 1_800])
    async def test_a_spent_key_waits_until_the_offset_reset(
        self, backend: Backend, reset_in_s: int
    ) -> None:
        """With the reset half an hour ago, or half an hour ahead ([rate] daily_reset_utc),
        a spent key is told to wait until that reset (23.5 h, 30 min) on every home, Redis's
        script included: the day is counted from the offset, not from 00:00 UTC."""
        now_s = await _store_now_s(backend)
        limits = replace(LIMITS, day_limit=1, reset_offset_s=(now_s + reset_in_s) % 86_400)
        assert (await backend.reserve(limits)).granted
        spent = await backend.reserve(limits)
        assert spent.refusal == "daily quota"
        assert spent.wait_s == pytest.approx(reset_in_s, abs=5)

    async def test_redis_does_not_reopen_a_day_its_clock_stepped_back_from(
        self, backend: Backend
    ) -> None:
        """Redis's TIME stepped back over midnight (the hash holds tomorrow's day, spent):
        the script keeps the day counted and refuses; it does not start the earlier day."""
        if backend.name != "redis":
            pytest.skip("Redis only: its clock is stepped by writing the hash")
        limits = replace(LIMITS, day_limit=2)
        spent = [await backend.reserve(limits) for _ in range(2)]
        assert [d.granted for d in spent] == [True, True]
        await _redis_set(backend, day=spent[1].day + 1)
        later = await backend.reserve(limits)
        assert later.refusal == "daily quota"
        assert (later.day, later.count) == (spent[1].day + 1, 2)

    async def test_a_lower_daily_limit_holds_for_a_minute_after_its_last_ask(
        self, backend: Backend
    ) -> None:
        """A process with a lower tpd (a `kill -9`'d lookup) holds the key's day for a minute
        after its last ask, not less: the others stop at its limit for those 60 s."""
        if backend.fake is None:
            pytest.skip("needs the store's clock moved (Redis runs on its own)")
        low = replace(LIMITS, day_limit=1, tpd=1)
        high = replace(LIMITS, day_limit=6, tpd=6)
        assert (await backend.reserve(low, process=ProcessMark("low:1:a"))).granted
        await backend.advance(59.0)
        held = await backend.reserve(high)
        assert held.refusal == "daily quota"
        assert held.day_limit == 1
        await backend.advance(2.0)
        assert (await backend.reserve(high)).granted


class TestRateClamps:
    """The shared rate stays within the limits and is not undone by stale news."""

    async def test_an_unpark_of_a_key_no_longer_parked_keeps_the_rate(
        self, backend: Backend
    ) -> None:
        """A second process's circuit closing after the key was unparked and cut again
        (its late unpark) leaves the learnt rate; only lifting a park restarts at nominal."""
        await backend.reserve(park_s=0.2, park_reason="quota")
        await backend.advance(0.25)
        probe = await backend.reserve()
        assert probe.probe
        await backend.reserve(unpark=True)
        await backend.advance(0.01)
        sent = await backend.reserve()
        cut = await backend.reserve(throttled=(sent.now_us,))
        assert cut.rate == pytest.approx(4.5)
        late = await backend.reserve(unpark=True)
        assert late.rate == pytest.approx(4.5)

    async def test_an_operator_rate_is_clamped_to_the_limits(self, backend: Backend) -> None:
        """set_rate beyond the key's limits is clamped: above max_rate to it, below min_rate
        to it (never sent at 50/s on a 5/s key)."""
        high = await backend.reserve(set_rate=50.0)
        assert high.rate == pytest.approx(LIMITS.max_rate)
        low = await backend.reserve(set_rate=0.001)
        assert low.rate == pytest.approx(LIMITS.min_rate)

    async def test_successes_boost_and_a_429_ends_the_boost(self, backend: Backend) -> None:
        """The increase doubles after each 50 clean successes (ratelimit.md 6.3: x2 per 50,
        max x8), and a 429 resets it: the first success after it gains the unboosted step."""
        limits = replace(LIMITS, nominal_rate=1.0, max_rate=50.0)
        inc = limits.increase
        await backend.reserve(limits, set_rate=1.0)
        boosted = await backend.reserve(limits, successes=100)
        assert boosted.rate == pytest.approx(math.exp(inc * (50 + 2 * 50)), rel=1e-6)
        await backend.advance(0.01)
        sent = await backend.reserve(limits)
        cut = await backend.reserve(limits, throttled=(sent.now_us,))
        assert cut.cut
        after = await backend.reserve(limits, successes=1)
        assert after.rate == pytest.approx(cut.rate * math.exp(inc), rel=1e-9)

    async def test_a_lost_key_clamps_a_mark_s_rate_to_the_limits(
        self, backend: Backend, request: pytest.FixtureRequest
    ) -> None:
        """A mark carrying a rate above the key's max (its tps lowered since) rebuilds a lost
        key at the max, not above it."""
        first = await backend.reserve()
        await _lose_the_key(backend, request)
        mark = ProcessMark("test:1:a", first.day, first.count, rate=50.0)
        d = await backend.reserve(process=mark)
        assert d.rate == pytest.approx(LIMITS.max_rate)

    async def test_a_rate_above_a_lowered_cap_is_clamped(self, backend: Backend) -> None:
        """A rate discovered above tps (discover mode) is clamped to the cap of a process
        without it (discover turned off, tps the same): it does not go on at the old rate."""
        discover = replace(LIMITS, max_rate=50.0)
        high = await backend.reserve(discover, set_rate=20.0)
        assert high.rate == pytest.approx(20.0)
        plain = await backend.reserve(LIMITS)
        assert plain.rate == pytest.approx(LIMITS.max_rate)

    async def test_a_record_not_lost_takes_no_rate_from_a_mark(self, backend: Backend) -> None:
        """A mark's rate rebuilds only a lost record: a record that was not lost keeps its
        cut rate when a process that saw the nominal rate last asks (every home, the
        script included)."""
        sent = await backend.reserve()
        cut = await backend.reserve(throttled=(sent.now_us + 1,))
        assert cut.rate == pytest.approx(4.5)
        stale = ProcessMark("other:2:b", cut.day, cut.count, rate=5.0, gen=cut.gen)
        d = await backend.reserve(process=stale)
        assert d.rate == pytest.approx(4.5)

    async def test_a_mark_s_park_never_shortens_a_longer_one(
        self, backend: Backend, request: pytest.FixtureRequest
    ) -> None:
        """After a loss, a key parked again for longer (900 s) keeps that park when a
        process whose mark from before the loss carries a shorter one asks: a mark's park
        only ever lengthens the key's."""
        first = await backend.reserve()
        await _lose_the_key(backend, request)
        await backend.advance(1.0)  # the rebuilt record is another generation
        parked = await backend.reserve(park_s=900.0, park_reason="access revoked")
        assert parked.refusal == "parked"
        older = ProcessMark(
            "older:2:b",
            first.day,
            first.count,
            parked_until_us=parked.now_us + 300 * 1_000_000,
            park_reason="quota spent",
            gen=first.gen,
        )
        d = await backend.reserve(process=older)
        assert d.refusal == "parked"
        assert d.parked_until_us == parked.parked_until_us
        assert d.park_reason == "access revoked"


class TestOlderBrokerCap:
    """An older broker's day_cap lapses like an entry's limit."""

    async def test_an_older_broker_s_cap_lapses_for_an_unlimited_process(
        self, backend: Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An older broker's tpd 3 (kept in day_cap) holds an unlimited process while the
        older one asks, and lapses a minute after it went silent (_agree_day: read "while
        one asked with it in that minute"), not forever."""
        unlimited = replace(LIMITS, day_limit=None, tpd=None)
        for _ in range(3):
            assert (await backend.reserve(unlimited)).granted
        await _as_an_older_broker_left_it(backend, day_cap=3)
        held = await backend.reserve(unlimited)
        assert held.refusal == "daily quota"
        silence = 61.0
        if backend.fake is None:  # Redis's real clock: a shorter "minute" for the script
            monkeypatch.setattr("broker.state.redis.PROCESS_RECENT_S", 1.0)
            silence = 1.5
        await backend.advance(silence)
        later = await backend.reserve(unlimited)
        assert later.granted
        assert later.day_limit is None


class TestProcessesRunsAndExpiry:
    """Processes seen, the run gap and the slot clamp in the script, the keys' TTL."""

    async def test_processes_count_only_those_seen_in_the_last_minute(
        self, backend: Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """broker status counts the processes that asked in the last minute: one silent
        longer (killed) is no longer counted."""
        silence = 61.0
        if backend.fake is None:  # Redis's real clock: a shorter "minute" for the script
            monkeypatch.setattr("broker.state.redis.PROCESS_RECENT_S", 1.0)
            silence = 1.5
        await backend.reserve(process=ProcessMark("gone:9:z"))
        assert (await backend.reserve()).processes == 2
        await backend.advance(silence)
        assert (await backend.reserve()).processes == 1
        assert (await backend.store.view(KEY, LIMITS)).decision.processes == 1

    async def test_one_process_under_two_limits_counts_once(self, backend: Backend) -> None:
        """Two [[keys]] entries naming one credential in one process, each with its own tpd,
        enter the process twice (one entry per limit): broker status counted it as two."""
        lower = replace(LIMITS, day_limit=40, tpd=40)
        await backend.reserve()
        await backend.reserve(lower)
        assert (await backend.store.view(KEY, LIMITS)).decision.processes == 1
        await backend.reserve(process=ProcessMark("other:2:b"))
        assert (await backend.store.view(KEY, LIMITS)).decision.processes == 2

    async def test_a_run_of_429s_ends_after_a_minute_not_before(self, backend: Backend) -> None:
        """The run gap is a minute on every home (the script's run_gap is RUN_GAP_S): a run
        whose last 429 was 30 s ago goes on (reads 9); one 61 s old reads as none, and the
        next 429 starts a new run at 1."""
        sent = await backend.reserve()
        await backend.reserve(throttled=(sent.now_us + 1,) * 9, run_429s=9)
        if backend.fake is None:
            now = await _redis_now_us(backend)
            await _redis_set(backend, last_429=now - 30_000_000)
        else:
            await backend.advance(30.0)
        assert (await backend.reserve()).run_429s == 9
        if backend.fake is None:
            await _redis_set(backend, last_429=now - 61_000_000)
        else:
            await backend.advance(31.0)
        assert (await backend.reserve()).run_429s == 0
        assert (await backend.reserve(throttled=(1,), run_429s=1)).run_429s == 1

    async def test_redis_pulls_a_slot_booked_far_ahead_back_to_the_horizon(
        self, backend: Backend
    ) -> None:
        """Redis's TIME stepped back an hour (the hash's next slot an hour ahead): the key
        waits one interval past the horizon, then sends, not an hour."""
        if backend.name != "redis":
            pytest.skip("Redis only: its clock is stepped by writing the hash")
        await backend.reserve()
        now = await _redis_now_us(backend)
        await _redis_set(backend, next_slot=now + 3_600_000_000)
        held = await backend.reserve()
        assert held.refusal == "horizon"
        assert held.wait_s <= 0.25

    async def test_redis_as_a_read_only_replica_is_named_so(self, backend: Backend) -> None:
        """A Redis that is a read-only replica is unavailable with what to do: name its
        primary (the message said only that it refused the write)."""
        if backend.name != "redis":
            pytest.skip("Redis only")
        assert isinstance(backend.store, RedisStateStore)
        from broker.state.redis_server import free_port

        client = backend.store._client
        await client.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
        try:
            with pytest.raises(StateUnavailableError, match=r"read-only replica: name its primary"):
                await backend.reserve()
        finally:
            await client.execute_command("REPLICAOF", "NO", "ONE")

    async def test_redis_reads_a_damaged_prior_field_as_none(self, backend: Backend) -> None:
        """A hash whose ``prior`` field is not a JSON object of counts (written by hand, or
        damaged) decides as if it held none, and is written back whole."""
        if backend.name != "redis":
            pytest.skip("Redis only")
        assert isinstance(backend.store, RedisStateStore)
        first = await backend.reserve()
        name = backend.store._keys(KEY)[0]
        for junk in ("{not json", '["a"]', '{"g": "x"}'):
            await backend.store._client.hset(name, "prior", junk)
            d = await backend.reserve()
            assert d.granted
            assert d.count > first.count
            assert await backend.store._client.hget(name, "prior") in (b"{}", "{}")

    async def test_redis_keys_expire_after_two_idle_days(self, backend: Backend) -> None:
        """A key's hash and its process set carry the two-day TTL (README: a key's hash
        expires after two idle days), refreshed by each decision."""
        if backend.name != "redis":
            pytest.skip("Redis only")
        assert isinstance(backend.store, RedisStateStore)
        await backend.reserve()
        client = backend.store._client
        for name in backend.store._keys(KEY):
            ttl = await client.pttl(name)
            assert 2 * 86_400_000 - 60_000 < ttl <= 2 * 86_400_000


class TestForeignRows:
    """Rows another version wrote, or damaged ones."""

    async def _write_row(self, tmp_path: Path, **fields: object) -> SqliteStateStore:
        clock = [_T0]
        path = tmp_path / "keys.sqlite3"
        store = SqliteStateStore(path, now_us=lambda: clock[0], wall_us=lambda: clock[0])
        await store.decide(KEY, LIMITS, feedback=Feedback(), reserve=True, process=ME)
        with sqlite_db(path) as conn:
            (data,) = conn.execute(
                "SELECT data FROM key_state WHERE digest = ?", (KEY.digest,)
            ).fetchone()
            record = json.loads(data)
            record.update(fields)
            conn.execute(
                "UPDATE key_state SET data = ? WHERE digest = ?", (json.dumps(record), KEY.digest)
            )
        return store

    async def test_a_row_with_a_field_of_the_wrong_type_is_damaged(self, tmp_path: Path) -> None:
        """A row whose rate is text (a damaged or foreign row) is an I/O error naming the
        remedy when it is read, not a TypeError deep inside a decision."""
        store = await self._write_row(tmp_path, rate="fast")
        with pytest.raises(OSError, match="damaged") as info:
            await store.decide(KEY, LIMITS, feedback=Feedback(), reserve=True, process=ME)
        await store.aclose()
        assert info.value.errno == errno.EIO

    async def test_a_row_with_fields_of_a_later_version_is_read(self, tmp_path: Path) -> None:
        """A row a later broker wrote, with fields this one does not know, is read with the
        known ones: the count goes on from it."""
        store = await self._write_row(tmp_path, count=7, shiny_new_field=[1, 2])
        d = await store.decide(KEY, LIMITS, feedback=Feedback(), reserve=True, process=ME)
        await store.aclose()
        assert d.granted
        assert d.count == 8


def test_a_negative_daily_limit_is_refused() -> None:
    """KeyLimits refuses a negative day_limit: the Redis script reads -1 as unlimited and
    the other homes as spent, so such a limit must never reach a store."""
    with pytest.raises(ValueError, match="day_limit"):
        KeyLimits(5.0, 0.05, 5.0, day_limit=-1)


@needs_redis
class TestThrowawayRedisServer:
    """The tests' own redis-server starts as itself, even when parallel workers race for ports."""

    def test_a_port_taken_before_the_server_binds_it_moves_to_another(
        self, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A port found free that another worker's server binds first was reached as if it
        were this server's (two tests shared one Redis); another port is tried instead."""
        from redis import Redis

        import broker.state.redis_server as module

        ports = iter([redis_server.port])
        real = module.free_port
        monkeypatch.setattr(module, "free_port", lambda: next(ports, None) or real())
        with RedisServer() as second:
            assert second.port != redis_server.port
            with Redis.from_url(second.url) as client:
                info = client.info("server")
            assert info["process_id"] != _server_pid_of(redis_server)

    def test_a_port_given_and_taken_is_an_error(self, redis_server: RedisServer) -> None:
        """A port the caller chose and another server holds is refused, not shared."""
        with pytest.raises(RuntimeError, match="could not start"):
            RedisServer(redis_server.port).start()


def _server_pid_of(server: RedisServer) -> int:
    from redis import Redis

    with Redis.from_url(server.url) as client:
        return int(client.info("server")["process_id"])


def test_the_embedded_simulator_s_keys_gather_no_rows_in_a_named_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With ``endpoint = "simulator"`` and a ``[state] path``, lookups leave no file: each
    run's simulator has a new port, so its keys are new, and the file gained a row per run
    for ever (966 rows after 500 runs)."""
    from conftest import embedded_toml

    from broker import cli

    path = tmp_path / "keys.sqlite3"
    config = tmp_path / "config.toml"
    config.write_text(embedded_toml() + f'\n[state]\npath = "{path}"\n')
    for _ in range(2):
        assert cli.main(["lookup", "B0TEST0001", "--config", str(config)]) == 0
    capsys.readouterr()
    assert not path.exists()


def _toml_with_state_file(path: Path) -> str:
    """A config whose key state is the file ``path``, opened when the broker starts, before
    anything is sent: an endpoint nothing answers at (the embedded simulator's keys stay in
    memory whatever [state] says, a new port each run), its secret in $ASINB_DEMO_SECRET."""
    return (
        '[api]\nendpoint = "http://127.0.0.1:9"\n[[keys]]\nname = "demo"\n'
        'credential_id = "demo-id"\ncredential_secret_env = "ASINB_DEMO_SECRET"\n'
        'version = "3.1"\npartner_tags = { "www.amazon.com" = "demo-20" }\n'
        f'[log]\nformat = "json"\n[state]\npath = "{path}"\n'
    )
