"""Tests for broker.engine.adaptive: target-loss AIMD, 429 verdicts and the key circuit."""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import random
from datetime import datetime, timedelta

import pytest

from broker.engine.adaptive import (
    AdaptiveRate,
    AdaptiveSettings,
    Circuit,
    CircuitState,
    ThrottleVerdict,
)
from broker.engine.limiter import Pacer
from broker.testing import FAKE_EPOCH, FakeClock

A = -math.log(0.9) * 0.01 / 0.99


class ManualClock:
    """A clock set by hand, for synchronous virtual-time models."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        """Return the time set by hand."""
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Never used by the synchronous model."""
        raise AssertionError("the model does not sleep")

    def utcnow(self) -> datetime:
        """Wall time follows the manual time."""
        return FAKE_EPOCH + timedelta(seconds=self.now)


#: Pure target-loss AIMD: no recovery curve, and the cap zone cut like any other.
TL_ONLY: dict[str, object] = {"recovery": False, "cap_beta": 0.1, "cap_target_loss": 0.01}


def _rate(nominal: float = 1.0, **settings: object) -> tuple[ManualClock, AdaptiveRate]:
    clock = ManualClock()
    config = AdaptiveSettings(**{**TL_ONLY, **settings})  # type: ignore[arg-type]
    return clock, AdaptiveRate(nominal, clock=clock, settings=config)


def _full(nominal: float = 5.0, **settings: object) -> tuple[ManualClock, AdaptiveRate]:
    """The controller with every default: recovery curve and cap zone on."""
    clock = ManualClock()
    config = AdaptiveSettings(**settings)  # type: ignore[arg-type]
    return clock, AdaptiveRate(nominal, clock=clock, settings=config)


def _run_of_429s(clock: ManualClock, ctl: AdaptiveRate, count: int) -> list[float]:
    """``count`` 429s half a second apart, each for a send made after the last cut.

    Returns the rate each 429 was sent at, then the rate after the last one.
    """
    rates = [ctl.rate]
    for _ in range(count):
        clock.now += 0.5
        ctl.on_throttled(sent_at=clock.now - 0.1)
        rates.append(ctl.rate)
    return rates


class TestSettings:
    def test_defaults(self) -> None:
        """Defaults are ratelimit.md 6.3: beta 0.1, p 1 %, floor 0.05, boost x2/50 to x8."""
        s = AdaptiveSettings()
        assert (s.beta, s.target_loss, s.min_rate_per_s) == (0.1, 0.01, 0.05)
        assert (s.boost_every, s.max_boost, s.discover, s.discover_factor) == (50, 8.0, False, 10.0)
        assert (s.park_s, s.max_park_s, s.retry_after_cap_s) == (900.0, 3600.0, 60.0)
        assert s.increase_per_success == pytest.approx(A)
        assert s.increase_per_success == pytest.approx(0.00106, abs=5e-6)

    @pytest.mark.parametrize(
        "kwargs", [{"beta": 0.0}, {"target_loss": 1.0}, {"min_rate_per_s": 0.0}, {"park_s": 0.0}]
    )
    def test_invalid_settings(self, kwargs: dict[str, float]) -> None:
        """Out-of-range tuning is refused."""
        with pytest.raises(ValueError):  # noqa: PT011 - messages differ per field
            AdaptiveSettings(**kwargs)  # type: ignore[arg-type]

    def test_frozen(self) -> None:
        """Settings are an immutable value."""
        with pytest.raises(dataclasses.FrozenInstanceError):
            AdaptiveSettings().beta = 0.2  # type: ignore[misc]

    def test_range(self) -> None:
        """r0 = cap = nominal; discover mode raises the cap to 10x; the floor never tops nominal."""
        _, plain = _rate(2.0)
        assert (plain.rate, plain.max_rate, plain.min_rate) == (2.0, 2.0, 0.05)
        _, discover = _rate(2.0, discover=True)
        assert (discover.rate, discover.max_rate) == (2.0, 20.0)
        _, slow = _rate(0.01)
        assert slow.min_rate == 0.01
        with pytest.raises(ValueError, match="nominal"):
            AdaptiveRate(0.0, clock=ManualClock())


class TestCut:
    def test_cut_only_for_requests_sent_after_the_last_cut(self) -> None:
        """A 429 cuts once; 429s of requests sent before that cut do not cut again."""
        clock, ctl = _rate()
        clock.now = 1001.0
        assert ctl.on_throttled(sent_at=1000.0) is ThrottleVerdict.RATE
        assert ctl.rate == pytest.approx(0.9)
        assert ctl.last_cut_at == 1001.0
        clock.now = 1001.2
        ctl.on_throttled(sent_at=1000.5)  # in flight when we cut
        assert ctl.rate == pytest.approx(0.9)
        clock.now = 1003.0
        ctl.on_throttled(sent_at=1002.0)
        assert ctl.rate == pytest.approx(0.81)
        assert ctl.cuts == 2

    def test_cut_stops_at_the_floor(self) -> None:
        """Cuts never go below r_min."""
        clock, ctl = _rate()
        for _ in range(100):
            clock.now += 1.0
            ctl.on_throttled(sent_at=clock.now - 0.5)
            ctl.on_success(demand_limited=False)  # keep the 429 streak short
            assert ctl.rate >= 0.05
        assert ctl.rate == 0.05


class TestRecovery:
    def test_increase_follows_the_formula(self) -> None:
        """Each demand-limited success multiplies the rate by e^(a * boost)."""
        clock, ctl = _rate()
        clock.now += 1
        ctl.on_throttled(sent_at=clock.now - 0.5)
        for _ in range(49):
            ctl.on_success(demand_limited=True)
        assert ctl.rate == pytest.approx(0.9 * math.exp(49 * A), rel=1e-12)

    def test_recovery_reaches_the_cap_and_stops(self) -> None:
        """Recovery climbs back to r_cap and never above it."""
        clock, ctl = _rate()
        clock.now += 1
        ctl.on_throttled(sent_at=clock.now - 0.5)
        # ln(1/0.9) = 0.105 = 50a + 50(2a) - 0.054, so the cap is reached inside 100 successes.
        for _ in range(100):
            ctl.on_success(demand_limited=True)
        assert ctl.rate == 1.0
        for _ in range(500):
            ctl.on_success(demand_limited=True)
        assert ctl.rate == 1.0

    def test_no_increase_when_not_demand_limited(self) -> None:
        """An idle key's successes do not raise its rate or its boost."""
        clock, ctl = _rate()
        clock.now += 1
        ctl.on_throttled(sent_at=clock.now - 0.5)
        for _ in range(200):
            ctl.on_success(demand_limited=False)
        assert ctl.rate == pytest.approx(0.9)
        assert ctl.boost == 1.0

    def test_boost_doubles_every_50_and_caps_at_8(self) -> None:
        """Boost goes 1, 2, 4, 8 per 50 successes, stays at 8, and the step grows with it."""
        _, ctl = _rate(1.0, discover=True, discover_factor=1e6)
        boosts = []
        for _ in range(4):
            for _ in range(50):
                ctl.on_success(demand_limited=True)
            boosts.append(ctl.boost)
        assert boosts == [2.0, 4.0, 8.0, 8.0]
        before = ctl.rate
        ctl.on_success(demand_limited=True)
        assert ctl.rate == pytest.approx(before * math.exp(8 * A))

    def test_boost_resets_on_a_429(self) -> None:
        """Any 429, even one that does not cut, resets the boost and its streak."""
        _, ctl = _rate(1.0, discover=True)
        for _ in range(120):
            ctl.on_success(demand_limited=True)
        assert ctl.boost == 4.0
        ctl.on_throttled(sent_at=-math.inf)  # stale: no cut
        assert ctl.boost == 1.0
        for _ in range(49):
            ctl.on_success(demand_limited=True)
        assert ctl.boost == 1.0
        ctl.on_success(demand_limited=True)
        assert ctl.boost == 2.0

    def test_reset_returns_to_nominal(self) -> None:
        """reset() restores r0 and makes earlier sends stale."""
        clock, ctl = _rate()
        for _ in range(5):
            clock.now += 1
            ctl.on_throttled(sent_at=clock.now - 0.5)
        clock.now += 1
        ctl.reset()
        assert ctl.rate == 1.0
        assert ctl.consecutive_throttles == 0
        ctl.on_throttled(sent_at=clock.now - 0.5)
        assert ctl.rate == 1.0

    def test_repr_shows_live_state(self) -> None:
        """The repr shows the rate, its range, boost and 429 counters."""
        _, ctl = _rate()
        ctl.on_throttled(sent_at=0.0)
        assert repr(ctl) == (
            "AdaptiveRate(rate=0.9/s, range=[0.05, 1], boost=1, consecutive_429=1, "
            "share_429=1.000, cuts=1)"
        )


class TestCeilingAwareRecovery:
    """The defaults: small cuts for jitter at the cap, a fast climb after a real drop."""

    def test_isolated_429_at_the_cap_is_a_small_cut(self) -> None:
        """One 429 at the configured rate cuts by cap_beta (3 %), not beta."""
        clock, ctl = _full()
        clock.now += 10
        ctl.on_throttled(sent_at=clock.now - 0.1)
        assert ctl.rate == pytest.approx(5.0 * 0.97)

    def test_a_run_near_the_cap_cuts_by_beta_then_below_it_by_drop_beta(self) -> None:
        """A run of 429s cuts by beta (10 %) near the cap, by drop_beta (20 %) below it."""
        clock, ctl = _full()
        rates = _run_of_429s(clock, ctl, 6)
        # The 3rd to 5th 429s come at 4.70, 4.23 and 3.81 (>= 0.75 x 5), the 6th at 3.43.
        cuts = [after / before for before, after in itertools.pairwise(rates)]
        assert cuts == pytest.approx([0.97, 0.97, 0.9, 0.9, 0.9, 0.8])

    def test_a_run_near_the_cap_does_not_probe_back_to_it(self) -> None:
        """After a run near the cap the key creeps back slowly instead of probing the cap."""
        clock, ctl = _full()
        after_run = _run_of_429s(clock, ctl, 3)[-1]
        for _ in range(100):  # 20 s at 5/s: a recovery probe would be back near 5 by now
            clock.now += 0.2
            ctl.on_success(demand_limited=True)
        assert after_run < ctl.rate < after_run * 1.06

    def test_climbs_back_within_seconds_after_a_drop(self) -> None:
        """After a drop the key regains its configured rate in seconds, not minutes."""
        clock, ctl = _full()
        low = _run_of_429s(clock, ctl, 8)[-1]
        assert low < 2.6
        start = clock.now
        while ctl.rate < 4.5 and clock.now - start < 60:
            clock.now += 1.0 / max(ctl.rate, 0.1)
            ctl.on_success(demand_limited=True)
        assert ctl.rate >= 4.5
        assert clock.now - start <= 12.0

    def test_a_throttled_probe_returns_below_the_last_limit(self) -> None:
        """A probe's 429 goes back under the limit found before, not a step below the peak."""
        clock, ctl = _full()
        limit = _run_of_429s(clock, ctl, 7)[-2]  # the rate the last 429 was sent at
        start = clock.now
        while ctl.rate < limit * 1.1 and clock.now - start < 30.0:
            clock.now += 0.2
            ctl.on_success(demand_limited=True)
        assert limit * 1.1 <= ctl.rate < 0.75 * 5.0
        clock.now += 0.2
        ctl.on_throttled(sent_at=clock.now - 0.1)
        assert ctl.rate < limit

    def test_a_probe_throttled_far_above_the_last_limit_keeps_the_new_one(self) -> None:
        """The server's rate came back part of the way (a drop to 0.5 of 10 TPS, then up to
        5): the probe's first 429 at more than twice the old limit cuts from where it was
        sent, as a fresh drop does; it went back under the old limit and probed up again,
        a sawtooth at a fifth of what the server allowed."""
        clock, ctl = _full(10.0)
        limit = _run_of_429s(clock, ctl, 16)[-2]
        assert limit < 0.8
        start = clock.now
        while ctl.rate < 5.2 and clock.now - start < 60.0:
            clock.now += 1.0 / ctl.rate
            ctl.on_success(demand_limited=True)
        peak = ctl.rate
        assert 5.2 <= peak < 0.75 * 10.0
        clock.now += 0.1
        ctl.on_throttled(sent_at=clock.now - 0.05)
        assert ctl.rate == pytest.approx(peak * 0.9)
        for _ in range(20):  # the new limit is where the climb starts from again
            clock.now += 1.0 / ctl.rate
            ctl.on_success(demand_limited=True)
        assert ctl.rate >= 0.9 * peak


class _GcraServer:
    """A server-side GCRA at the true rate with burst B, deciding at arrival."""

    def __init__(self, rate: float, burst: float) -> None:
        self.interval = 1.0 / rate
        self.tau = (burst - 1.0) * self.interval
        self.tat = -math.inf

    def admit(self, arrival: float) -> bool:
        if arrival < self.tat - self.tau:
            return False
        self.tat = max(self.tat, arrival) + self.interval
        return True


def _simulate(
    *, true_rate: float, burst: float, sends: int, seed: int
) -> tuple[float, float, AdaptiveRate]:
    """Drive Pacer + AdaptiveRate against a GCRA server in virtual time; infinite backlog.

    One-way delay 40 ms + Exp(10 ms), 120 ms service; returns (utilisation of the true rate,
    429 share) over the sends after a warm-up of 300.
    """
    rng = random.Random(seed)
    clock = ManualClock()
    ctl = AdaptiveRate(1.0, clock=clock)
    pacer = Pacer(clock, ctl.rate)
    server = _GcraServer(true_rate, burst)
    events: list[tuple[float, int, str, float, bool]] = []
    seq = 0
    sent = 0
    warmup_end = math.inf
    accepted = throttled = 0
    while sent < sends or events:
        next_send = max(pacer.next_ready(), clock.now) if sent < sends else math.inf
        if events and events[0][0] <= next_send:
            when, _, kind, sent_at, ok = heapq.heappop(events)
            clock.now = when
            if kind == "arrive":
                ok = server.admit(when)
                seq += 1
                heapq.heappush(events, (when + 0.12 + 0.04, seq, "respond", sent_at, ok))
                if sent_at >= warmup_end:
                    accepted += ok
                    throttled += not ok
            elif ok:
                pacer.set_rate(ctl.on_success(demand_limited=True) or ctl.rate)
            else:
                ctl.on_throttled(sent_at)
                pacer.set_rate(ctl.rate)
            continue
        clock.now = next_send
        sent_at = pacer.commit()
        sent += 1
        if sent == 300:
            warmup_end = sent_at
        seq += 1
        arrival = sent_at + 0.04 + rng.expovariate(100.0)
        heapq.heappush(events, (arrival, seq, "arrive", sent_at, False))
    span = clock.now - warmup_end
    return accepted / (true_rate * span), throttled / (accepted + throttled), ctl


class TestEquilibrium:
    @pytest.mark.parametrize("seed", [1, 2, 3])
    def test_429_share_near_target_below_the_cap(self, seed: int) -> None:
        """Against a server at 0.8x nominal, TL keeps >= 98 % of the true rate at ~1.3 % 429s."""
        utilisation, share, ctl = _simulate(true_rate=0.8, burst=2.0, sends=4000, seed=seed)
        # p = 1 % plus the boost's overshoot; ratelimit.md 5.3 measured 99.1 % / 1.3 %.
        assert 0.01 <= share <= 0.02
        assert utilisation >= 0.98
        assert 0.7 < ctl.rate < 0.9

    def test_strict_server_at_nominal(self) -> None:
        """A strict GCRA (B=1) at nominal: jitter costs 429s, TL holds >= 90 % at <= 2 %."""
        utilisation, share, _ = _simulate(true_rate=1.0, burst=1.0, sends=4000, seed=5)
        assert share <= 0.02
        assert utilisation >= 0.90

    def test_benign_server_at_the_cap_sees_no_429(self) -> None:
        """With the true rate at nominal and some burst tolerance, TL stays at the cap, 0 % 429."""
        utilisation, share, ctl = _simulate(true_rate=1.0, burst=2.0, sends=1500, seed=4)
        assert share == 0.0
        assert utilisation >= 0.99
        assert ctl.rate == 1.0


def _at_floor(ctl: AdaptiveRate, clock: ManualClock) -> None:
    while ctl.rate > 2 * ctl.min_rate:
        clock.now += 1.0
        ctl.on_throttled(sent_at=clock.now - 0.5)
        ctl.on_success(demand_limited=False)
    # Flush the 429-share window with successes an idle key would see (no raise).
    for _ in range(ctl.settings.window):
        ctl.on_success(demand_limited=False)
    assert ctl.throttle_share == 0.0


class TestVerdict:
    def test_spent_counter_means_quota(self) -> None:
        """Any 429 once the daily counter is spent is 'quota exhausted', and does not cut."""
        _, ctl = _rate()
        verdict = ctl.on_throttled(sent_at=5000.0, budget_exhausted=True, quota_used=0.99)
        assert verdict is ThrottleVerdict.QUOTA_EXHAUSTED
        assert verdict.value == "daily quota exhausted"
        assert ctl.rate == 1.0

    def test_streak_at_high_rate_is_rate(self) -> None:
        """Ten consecutive 429s while the rate is still high are plain throttling."""
        clock, ctl = _rate()
        for _ in range(10):
            clock.now += 1.0
            verdict = ctl.on_throttled(sent_at=clock.now - 0.5)
        assert verdict is ThrottleVerdict.RATE
        assert ctl.consecutive_throttles == 10

    @pytest.mark.parametrize(
        ("quota_used", "expected"),
        [
            (0.95, ThrottleVerdict.QUOTA_EXHAUSTED),
            (0.2, ThrottleVerdict.ACCESS_REVOKED),
            (None, ThrottleVerdict.ACCESS_REVOKED),
        ],
    )
    def test_streak_at_floor(self, quota_used: float | None, expected: ThrottleVerdict) -> None:
        """Ten consecutive 429s at the floor: quota if the day is nearly spent, else revoked."""
        clock, ctl = _rate()
        _at_floor(ctl, clock)
        verdicts = []
        for _ in range(10):
            clock.now += 10.0
            verdicts.append(ctl.on_throttled(sent_at=clock.now - 1.0, quota_used=quota_used))
        assert verdicts[:9] == [ThrottleVerdict.RATE] * 9
        assert verdicts[9] is expected
        rate = ctl.rate
        clock.now += 10.0
        assert ctl.on_throttled(sent_at=clock.now - 1.0, quota_used=quota_used) is expected
        assert ctl.rate == rate  # a non-rate verdict never cuts

    def test_share_over_window_at_floor(self) -> None:
        """Over 50 % 429s over the last 50 sends at the floor is named, without a long streak."""
        clock, ctl = _rate()
        _at_floor(ctl, clock)
        verdict = ThrottleVerdict.RATE
        for i in range(50):
            clock.now += 10.0
            if i % 3 == 2:
                ctl.on_success(demand_limited=False)
            else:
                verdict = ctl.on_throttled(sent_at=clock.now - 1.0)
        assert ctl.consecutive_throttles < 10
        assert ctl.throttle_share > 0.5
        assert verdict is ThrottleVerdict.ACCESS_REVOKED

    def test_success_breaks_the_streak(self) -> None:
        """A success resets the consecutive-429 count."""
        clock, ctl = _rate()
        _at_floor(ctl, clock)
        for _ in range(9):
            ctl.on_throttled(sent_at=-math.inf)
        ctl.on_success(demand_limited=True)
        assert ctl.on_throttled(sent_at=-math.inf) is ThrottleVerdict.RATE

    @pytest.mark.parametrize(
        ("retry_after", "pause"),
        [(None, 0.0), (5.0, 5.0), (600.0, 60.0), (-3.0, 0.0), (math.nan, 0.0), (math.inf, 60.0)],
    )
    def test_pause_for_is_bounded(self, retry_after: float | None, pause: float) -> None:
        """Retry-After becomes a key pause clamped to [0, 60] s."""
        _, ctl = _rate()
        assert ctl.pause_for(retry_after) == pause


class TestCircuit:
    def _circuit(self, u: float = 0.5) -> tuple[FakeClock, Circuit]:
        clock = FakeClock()
        return clock, Circuit(clock, random=lambda: u)

    async def test_open_probe_close(self) -> None:
        """Open parks 15 min plus jitter, admits one probe, and a success closes it."""
        clock, circuit = self._circuit(0.5)
        assert circuit.try_probe()  # closed: everything passes
        t0 = clock.monotonic()
        probe_at = circuit.open(ThrottleVerdict.ACCESS_REVOKED)
        assert probe_at - t0 == pytest.approx(900.0 * 1.05)
        assert circuit.state is CircuitState.OPEN
        assert circuit.verdict is ThrottleVerdict.ACCESS_REVOKED
        await clock.advance(944.0)
        assert not circuit.try_probe()
        await clock.advance(1.0)
        assert circuit.try_probe()
        # Only one probe at a time.
        assert (circuit.state, circuit.try_probe()) == (CircuitState.PROBING, False)
        circuit.on_success()
        assert repr(circuit).startswith("Circuit(state=CLOSED, verdict=None, probe_at=None")
        assert circuit.try_probe()

    async def test_failed_probes_double_to_an_hour(self) -> None:
        """Each failed probe doubles the park: 15, 30, 60, 60 min (jitter 0 here)."""
        clock, circuit = self._circuit(0.0)
        parks = []
        for _ in range(4):
            start = clock.monotonic()
            probe_at = circuit.open(ThrottleVerdict.QUOTA_EXHAUSTED)
            parks.append(probe_at - start)
            await clock.advance(probe_at - start)
            assert circuit.try_probe()
        assert parks == pytest.approx([900.0, 1800.0, 3600.0, 3600.0])
        circuit.on_success()
        assert circuit.open(ThrottleVerdict.QUOTA_EXHAUSTED) - clock.monotonic() == 900.0

    async def test_open_while_open_does_not_extend(self) -> None:
        """Late 429s of requests sent before the park neither extend nor double it."""
        clock, circuit = self._circuit(0.0)
        first = circuit.open(ThrottleVerdict.ACCESS_REVOKED)
        await clock.advance(100.0)
        assert circuit.open(ThrottleVerdict.ACCESS_REVOKED) == first
        assert "opens=1" in repr(circuit)

    async def test_unsettled_probes_wait_double_up_to_the_park(self) -> None:
        """Probes that learn nothing (5xx) are tried again 15 s, 30 s, ... later, the wait
        never longer than the park (15 min): a key meeting 5xx for hours still probes."""
        clock, circuit = self._circuit(0.0)
        circuit.open(ThrottleVerdict.QUOTA_EXHAUSTED)
        waits = []
        for _ in range(10):
            probe_at = circuit.probe_at
            assert probe_at is not None
            await clock.advance(probe_at - clock.monotonic())
            assert circuit.try_probe()
            circuit.probe_unsettled()
            probe_at = circuit.probe_at
            assert probe_at is not None
            waits.append(probe_at - clock.monotonic())
        assert waits == pytest.approx([15.0, 30.0, 60.0, 120.0, 240.0, 480.0] + [900.0] * 4)

    def test_jitter_comes_from_the_injected_random(self) -> None:
        """The probe time spreads over [park, 1.1 * park) with the injected draw."""
        clock = FakeClock()
        low = Circuit(clock, random=lambda: 0.0).open(ThrottleVerdict.ACCESS_REVOKED)
        high = Circuit(clock, random=lambda: 0.999).open(ThrottleVerdict.ACCESS_REVOKED)
        assert low - clock.monotonic() == 900.0
        assert high - clock.monotonic() == pytest.approx(900.0 * 1.0999)
