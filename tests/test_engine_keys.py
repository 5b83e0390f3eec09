"""Per-key state: marketplaces served, disabling, parking and probing, and snapshots."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import Awaitable
from typing import Any, TypeVar, cast

import pytest
from conftest import US, CountingStore, key_doc, make_config
from structlog.testing import capture_logs

from broker.engine.adaptive import CircuitState, ThrottleVerdict
from broker.engine.authorizer import SigV4Authorizer
from broker.engine.keys import (
    OUTAGE_CODE,
    OUTAGE_RETRY_S,
    CredentialsVerdict,
    KeyHealth,
    KeyState,
)
from broker.engine.metrics import MetricsSnapshot
from broker.engine.shared_limiter import SharedState
from broker.errors import EndpointUnreachable, ThrottledError, TransportError
from broker.jobs.metrics_http import SpoolSnapshot, render_metrics
from broker.models import Secret
from broker.state import MemoryStateStore
from broker.testing import FakeClock

DE = "www.amazon.de"


T = TypeVar("T")


def _key(
    clock: FakeClock,
    shared: SharedState | None = None,
    *,
    rng: random.Random | None = None,
    **fields: object,
) -> KeyState:
    config = make_config(
        "https://creators.test", keys=[key_doc(tags={US: "demo-20", DE: "demo-22"}, **fields)]
    )
    authorizer = SigV4Authorizer("AKID", Secret("s"), clock=clock)
    return KeyState.from_config(
        config.keys[0],
        authorizer,
        config=config,
        clock=clock,
        rng=rng or random.Random(0),
        shared=shared,
    )


async def test_snapshot_left_today_is_where_the_key_stops() -> None:
    """daily_left counts down from tpd times the guard (the stop point broker status shows),
    not from tpd; daily_limit stays the configured tpd."""
    clock = FakeClock()
    key = _key(clock, tpd=100_000)
    assert await _driven(clock, key.wait_ready(), within_s=1.0) is None
    assert await _driven(clock, key.try_send(), within_s=1.0) is not None
    snapshot = key.snapshot()
    assert (snapshot.daily_limit, snapshot.daily_spent) == (100_000, 1)
    assert snapshot.daily_left == 98_999


async def test_a_key_parked_with_its_day_spent_waits_until_the_reset() -> None:
    """A key whose own daily count is spent and that Amazon's 429 parked (its last request
    took the last of the budget) reports the reset as its wait, not the probe 15 minutes
    away: --no-wait said "run again after 13:43" and the daemon re-deferred every 15
    minutes until midnight."""
    clock = FakeClock()
    key = _key(clock, tpd=2)
    assert await _driven(clock, key.try_send(), within_s=2.0) is not None
    assert key.limiter.exhausted
    key.circuit.open(ThrottleVerdict.QUOTA_EXHAUSTED)
    snapshot = key.snapshot()
    assert snapshot.state == "parked"
    assert snapshot.until == snapshot.daily_resets_at is not None


async def test_a_429_after_the_day_is_spent_does_not_park_past_the_reset() -> None:
    """A 429 answering the request that spent the key's own daily count (one in flight at
    23:59) leaves the key held by its daily limit, not parked: the park's 15 minutes held it,
    and every run and daemon of it, past the reset. It sends again right after the reset;
    a Retry-After of hours (the server's own reset) still parks it."""
    clock = FakeClock()
    key = _key(clock, tpd=2)
    assert await _driven(clock, key.try_send(), within_s=2.0) is not None
    assert key.limiter.exhausted
    verdict = key.on_throttled(
        ThrottledError("TooManyRequests", "x", status=429), clock.monotonic() - 0.1
    )
    assert verdict is ThrottleVerdict.QUOTA_EXHAUSTED
    assert key.circuit.state is CircuitState.CLOSED
    reset = key.limiter.resets_at()
    await clock.advance((reset - clock.utcnow()).total_seconds() + 1.0)
    assert await _driven(clock, key.try_send(), within_s=2.0) is not None
    # The server naming its own reset, hours away: parked until then, as before.
    assert key.limiter.exhausted
    key.on_throttled(
        ThrottledError("TooManyRequests", "x", status=429, retry_after=7200.0),
        clock.monotonic() - 0.1,
    )
    assert key.circuit.state is CircuitState.OPEN


async def test_a_429_while_another_process_s_lower_tpd_holds_the_key_parks_it() -> None:
    """Held only by another process's lower tpd (a lookup's), a 429 read as the quota spent
    parks the key as before: that hold lapses when the lookup closes, and unparked the key
    would send into Amazon's spent quota until ten 429s parked it."""
    clock = FakeClock()
    store = MemoryStateStore(
        lambda: int(clock.monotonic() * 1e6), lambda: int(clock.utcnow().timestamp() * 1e6)
    )
    shared = cast("Any", store)
    low = _key(clock, SharedState(shared, "https://creators.test", "low"), tpd=2)
    high = _key(clock, SharedState(shared, "https://creators.test", "high"), tpd=1000)
    assert await _driven(clock, low.try_send(), within_s=2.0) is not None
    assert await _driven(clock, high.try_send(), within_s=2.0) is None
    assert high.limiter.exhausted
    assert high.limiter.quota_until() < high.limiter.resets_at()
    high.on_throttled(ThrottledError("TooManyRequests", "x", status=429), clock.monotonic())
    assert high.circuit.state is CircuitState.OPEN


async def test_a_probe_that_spends_the_day_and_meets_a_429_is_parked_again() -> None:
    """A parked key's probe takes the day's last request and is answered 429: the key is
    parked again, the probe settled. Left unparked (the day's limit holds it), it stayed
    probing for good, and this process never sent with the key again."""
    clock = FakeClock()
    key = _key(clock, tpd=2)
    key.circuit.open(ThrottleVerdict.ACCESS_REVOKED)
    await clock.advance(3_600.0)
    assert await _driven(clock, key.wait_ready(), within_s=2.0) is None
    assert await _driven(clock, key.try_send(), within_s=2.0) is not None
    assert key.circuit.state is CircuitState.PROBING
    assert key.limiter.exhausted
    key.on_throttled(ThrottledError("TooManyRequests", "x", status=429), clock.monotonic())
    assert key.circuit.state is CircuitState.OPEN


async def test_a_spent_daily_quota_is_logged_once_per_window() -> None:
    """A key that runs out of its daily quota says so once (a warning naming the reset), so
    a library caller whose lookups now wait for hours sees why; asking again says nothing."""
    clock = FakeClock()
    key = _key(clock, tpd=2)
    with capture_logs() as logs:
        sent = [await _driven(clock, key.try_send(), within_s=2.0) for _ in range(4)]
    assert sent[0] is not None
    assert sent[-1] is None
    spent = [e for e in logs if e["event"] == "broker.daily_quota_spent"]
    assert len(spent) == 1
    assert spent[0]["log_level"] == "warning"
    assert spent[0]["key"] == "demo"
    assert spent[0]["resets_at"].endswith("T00:00:00Z")


async def test_a_hold_that_comes_in_during_a_probe_wait_gives_the_probe_back() -> None:
    """A local hold arriving while a claimed probe waits for its slot: the probe slot goes
    back and the key probes once the hold ends, instead of waiting on PROBING for good."""
    clock = FakeClock()
    key = _key(clock)
    probe_at = key.circuit.open(ThrottleVerdict.QUOTA_EXHAUSTED)
    await clock.advance(probe_at - clock.monotonic() + 0.1)
    key.limiter = _HoldOnce(key, clock)  # type: ignore[assignment]
    await _driven(clock, key.wait_ready(), within_s=120.0)
    assert key.limiter.held  # type: ignore[attr-defined]
    assert key.circuit.state is CircuitState.PROBING  # the probe claimed after the hold


class _HoldOnce:
    """The key's limiter, but its first wait lets a local hold in (an outage seen then)."""

    def __init__(self, key: KeyState, clock: FakeClock) -> None:
        self._inner = key.limiter
        self._key = key
        self._clock = clock
        self.held = False

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    async def wait_ready(self) -> None:
        if not self.held:
            self.held = True
            self._key.on_unreachable(ConnectionError("no route"), self._clock.monotonic())
        await self._inner.wait_ready()


async def test_a_parked_key_beats_to_the_shared_state_while_it_waits() -> None:
    """The process that parked a key asks the store every 30 s while it waits for its probe
    (its keep-alive, each ask carrying its count of the day), not once the park ends 15-60
    minutes later."""
    clock = FakeClock()
    store = CountingStore(
        MemoryStateStore(
            lambda: int(clock.monotonic() * 1e6), lambda: int(clock.utcnow().timestamp() * 1e6)
        )
    )
    key = _key(clock, SharedState(cast("Any", store), "https://creators.test", "a"))
    key.circuit.open(ThrottleVerdict.QUOTA_EXHAUSTED)
    waiting = asyncio.create_task(key.wait_ready())
    beating = asyncio.create_task(key.limiter.keep_alive())  # as the engine runs it
    await clock.advance(0.0)
    before = store.calls
    for _ in range(20):
        await clock.advance(30.0)
    assert store.calls - before >= 19
    assert not waiting.done()
    waiting.cancel()
    beating.cancel()


class TestOutagesStayLocal:
    """What one process cannot reach is its own trouble, not every process's."""

    @pytest.mark.parametrize("trouble", ["network", "token endpoint"])
    async def test_one_process_outage_does_not_pause_the_other(self, trouble: str) -> None:
        """An outage or failing token endpoint seen by process a holds a, never b."""
        clock = FakeClock()
        store = MemoryStateStore(
            lambda: int(clock.monotonic() * 1e6), lambda: int(clock.utcnow().timestamp() * 1e6)
        )
        a = _key(clock, SharedState(store, "https://creators.test", "a"))
        b = _key(clock, SharedState(store, "https://creators.test", "b"))
        for key in (a, b):
            assert await _driven(clock, key.wait_ready(), within_s=1.0) is None
            assert await _driven(clock, key.try_send(), within_s=1.0) is not None
        sent_at = clock.monotonic()
        if trouble == "network":
            a.on_unreachable(ConnectionError("no route"), sent_at)
        else:
            a.pause_after_error(ConnectionError("no route"), sent_at)
        assert a.next_ready() - clock.monotonic() >= 0.5  # a jittered pause of its own
        # b keeps its pace: it is told of no pause when it next asks the store for a slot.
        await _driven(clock, b.wait_ready(), within_s=0.5)
        assert await _driven(clock, b.try_send(), within_s=0.5) is not None
        assert b.health is KeyHealth.ACTIVE

    @pytest.mark.parametrize("trouble", ["network", "callers left", "5xx"])
    async def test_a_probe_that_met_no_answer_does_not_park_the_key_again(
        self, trouble: str
    ) -> None:
        """Process a wins a parked key's probe, then its own network or token endpoint
        fails it, or its callers leave: the key is not parked again for every process, and
        b may probe at once. A 5xx (Amazon's side) does not park it again either: the
        probe's lease ends with a's own 15-s wait, which every process then shares."""
        clock = FakeClock()
        store = MemoryStateStore(
            lambda: int(clock.monotonic() * 1e6), lambda: int(clock.utcnow().timestamp() * 1e6)
        )
        a = _key(clock, SharedState(store, "https://creators.test", "a"))
        b = _key(clock, SharedState(store, "https://creators.test", "b"))
        probe_at = a.circuit.open(ThrottleVerdict.QUOTA_EXHAUSTED)
        await clock.advance(probe_at - clock.monotonic() + 1.0)
        assert await _driven(clock, a.wait_ready(), within_s=1.0) is None
        assert await _driven(clock, a.try_send(), within_s=1.0) is not None
        assert a.limiter.last_decision is not None
        assert a.limiter.last_decision.probe
        if trouble == "callers left":
            a.abandon_probe()
        else:
            a.on_failed_attempt(transient=True, reached=trouble == "5xx")
        await clock.advance(0.01)
        decision = await b.limiter.refresh()
        assert decision.parked_until_us <= decision.now_us  # not parked again
        if trouble == "5xx":
            assert await b.try_send() is None  # refused: a's lease holds, for a's wait
            assert b.limiter.last_decision is not None
            assert b.limiter.last_decision.refusal == "probing"
            await clock.advance(15.0)
        assert await _driven(clock, b.try_send(), within_s=1.0) is not None
        assert b.limiter.last_decision is not None
        assert b.limiter.last_decision.probe


async def _driven(clock: FakeClock, step: Awaitable[T], *, within_s: float) -> T:
    """Await ``step`` while moving the fake clock on; fail if it takes longer than ``within_s``."""
    task = asyncio.ensure_future(step)
    waited = 0.0
    while not task.done():
        assert waited <= within_s, "still waiting"
        await clock.advance(0.01)
        waited += 0.01
    return task.result()


class TestMarketplaces:
    """Which marketplaces a key serves."""

    def test_disable_one_marketplace(self) -> None:
        """A key+marketplace failure removes just that marketplace, once."""
        key = _key(FakeClock())
        assert key.serves(US)
        assert key.serves(DE)
        assert not key.serves("www.amazon.fr")
        assert key.disable("InvalidPartnerTag", "bad tag", "fix it", marketplace=DE)
        assert not key.disable("InvalidPartnerTag", "bad tag", "fix it", marketplace=DE)
        assert key.serves(US)
        assert not key.serves(DE)
        assert list(key.active_marketplaces()) == [US]
        failure = key.failure_for(DE)
        assert failure is not None
        assert failure.code == "InvalidPartnerTag"
        assert key.health is KeyHealth.ACTIVE
        snapshot = key.snapshot()
        assert snapshot.state == "active"
        assert snapshot.reason == f"out of rotation for {DE} (InvalidPartnerTag)"
        assert snapshot.marketplaces == (US,)
        assert snapshot.markets_out == ((DE, "InvalidPartnerTag"),)

    def test_a_marketplace_out_of_rotation_is_in_the_metrics(self) -> None:
        """/metrics has asinb_key_marketplace_disabled 1 for a key Amazon rejected in one
        of its marketplaces (a wrong tag), which the alert reads: such a key stays active,
        so asinb_key_state never told, and only the log did."""
        key = _key(FakeClock())
        key.disable("InvalidPartnerTag", "bad tag", "fix it", marketplace=DE)
        m = MetricsSnapshot(0, {}, 0, 0, 0, {}, (0,) * 11, 0.0, 0, 0, 0, keys=(key.snapshot(),))
        text = render_metrics(m, SpoolSnapshot())
        assert "# TYPE asinb_key_marketplace_disabled gauge" in text
        sample = (
            'asinb_key_marketplace_disabled{code="InvalidPartnerTag",key="demo",'
            f'marketplace="{DE}"}} 1'
        )
        assert sample in text.splitlines()
        assert 'asinb_key_state{key="demo",state="active"} 1' in text.splitlines()

    def test_a_key_out_of_every_marketplace_is_disabled(self) -> None:
        """A key whose every marketplace left rotation (a wrong tag on its only store) is
        disabled, as /metrics, its alert and /readyz must see; it showed active."""
        key = _key(FakeClock())
        key.disable("InvalidPartnerTag", "bad tag", "fix the US tag", marketplace=US)
        key.disable("InvalidPartnerTag", "bad tag", "fix the DE tag", marketplace=DE)
        assert key.health is KeyHealth.DISABLED
        snapshot = key.snapshot()
        assert snapshot.state == "disabled"
        assert snapshot.reason == (
            f"out of rotation for {US} (InvalidPartnerTag), {DE} (InvalidPartnerTag)"
        )
        assert snapshot.marketplaces == ()

    def test_disable_whole_key(self) -> None:
        """A key-level failure removes every marketplace; the snapshot says why."""
        key = _key(FakeClock())
        assert key.disable("InvalidSignature", "bad sig", "check the secret")
        assert not key.disable("InvalidSignature", "bad sig", "check the secret")
        assert not key.serves(US)
        assert list(key.active_marketplaces()) == []
        snapshot = key.snapshot()
        assert snapshot.state == "disabled"
        assert snapshot.reason == "InvalidSignature: check the secret"


def _throttled_with(retry_after: float) -> tuple[FakeClock, KeyState, ThrottleVerdict]:
    """A 5-TPS key answered a 429 carrying ``retry_after``, and the verdict."""
    clock = FakeClock()
    key = _key(clock, tps=5.0)
    verdict = key.on_throttled(
        ThrottledError("TooManyRequests", "x", status=429, retry_after=retry_after),
        clock.monotonic() + 0.001,
    )
    return clock, key, verdict


async def test_a_key_parked_for_its_spent_day_says_what_to_do() -> None:
    """The warning that parks a key for Amazon's spent daily quota carries a remedy (it
    waits by itself; more keys, or a tpd matching the account's quota, finish sooner)."""
    clock = FakeClock()
    key = _key(clock, tps=5.0)
    with capture_logs() as logs:
        key.on_throttled(
            ThrottledError("TooManyRequests", "x", status=429, retry_after=3600.0),
            clock.monotonic() + 0.001,
        )
    (parked,) = [e for e in logs if e["event"] == "broker.key_parked"]
    assert parked["verdict"] == ThrottleVerdict.QUOTA_EXHAUSTED.value
    assert "daily window has reset" in parked["remedy"]
    assert "tpd" in parked["remedy"]


async def test_a_key_parked_as_not_eligible_points_at_associates_central() -> None:
    """A key parked after 429s at the floor rate with its day's budget left says the account
    may have lost API access, and where to check, instead of a bare verdict."""
    clock = FakeClock()
    key = _key(clock)
    with capture_logs() as logs:
        for _ in range(1000):
            if key.circuit.state is CircuitState.OPEN:
                break
            await clock.advance(30.0)
            key.on_throttled(
                ThrottledError("TooManyRequests", "x", status=429), clock.monotonic() - 1.0
            )
    (parked,) = [e for e in logs if e["event"] == "broker.key_parked"]
    assert parked["verdict"] == ThrottleVerdict.ACCESS_REVOKED.value
    assert "Associates Central" in parked["remedy"]


@pytest.mark.parametrize(
    ("answered_s_before", "verdict"),
    [
        (600.0, ThrottleVerdict.QUOTA_EXHAUSTED),  # 23:45 today
        (86_400.0 + 300.0, ThrottleVerdict.ACCESS_REVOKED),  # 23:50 yesterday
    ],
)
async def test_sustained_429s_after_an_answer_today_name_the_quota(
    answered_s_before: float, verdict: ThrottleVerdict
) -> None:
    """A key answered earlier in today's window has access: sustained 429s at the floor
    with most of its tpd left mean the account's quota is lower than tpd and spent, not
    "access revoked" (which sent the user to Associates Central). An answer from an earlier
    window says nothing of today."""
    clock = FakeClock()
    clock.wall_offset = 11 * 3600 + 55 * 60 - answered_s_before  # ends at 23:55 UTC
    key = _key(clock, tpd=8640)
    key.on_success(clock.monotonic(), US, demand_limited=False)
    await clock.advance(answered_s_before)
    with capture_logs() as logs:
        for _ in range(200):
            if key.circuit.state is CircuitState.OPEN:
                break
            await clock.advance(1.0)
            key.on_throttled(ThrottledError("TooManyRequests", "x", status=429), clock.monotonic())
    assert key.limiter.used_fraction is not None
    assert key.limiter.used_fraction < 0.1
    (parked,) = [e for e in logs if e["event"] == "broker.key_parked"]
    assert parked["verdict"] == verdict.value


def _store_on(clock: FakeClock, home: str, tmp_path: Any) -> Any:
    """A key-state store on ``clock``: ``"memory store"`` or ``"sqlite store"`` (a file in
    ``tmp_path``)."""
    now_us = lambda: int(clock.monotonic() * 1e6)  # noqa: E731
    wall_us = lambda: int(clock.utcnow().timestamp() * 1e6)  # noqa: E731
    if home == "memory store":
        return MemoryStateStore(now_us, wall_us)
    from broker.state.sqlite import SqliteStateStore

    return SqliteStateStore(tmp_path / "state.db", now_us=now_us, wall_us=wall_us)


@pytest.mark.parametrize("home", ["memory store", "sqlite store"])
async def test_another_process_s_answer_today_names_the_quota(home: str, tmp_path: Any) -> None:
    """Two processes share a key: the first was answered this morning, the second (a later
    run) meets sustained 429s at the floor. The key's access is fine, so its park says the
    day's quota is spent; it said "access revoked" (and pointed at Associates Central),
    since only this process's own answers counted."""
    clock = FakeClock()
    clock.wall_offset = 9 * 3600  # 21:00 UTC
    store = _store_on(clock, home, tmp_path)
    morning = _key(clock, SharedState(store, "https://creators.test", "h:1:a"), tpd=8640)
    assert await _driven(clock, morning.try_send(), within_s=1.0) is not None
    morning.on_success(clock.monotonic(), US, demand_limited=False)
    assert await _driven(clock, morning.try_send(), within_s=1.0) is not None  # tells it
    await clock.advance(3600.0)
    later = _key(clock, SharedState(store, "https://creators.test", "h:2:b"), tpd=8640)
    throttled = ThrottledError("TooManyRequests", "x", status=429)
    with capture_logs() as logs:
        for _ in range(200):
            if later.circuit.state is CircuitState.OPEN:
                break
            sent = await _driven(clock, later.try_send(), within_s=60.0)
            assert sent is not None
            later.on_throttled(throttled, clock.monotonic())
    (parked,) = [e for e in logs if e["event"] == "broker.key_parked"]
    assert parked["verdict"] == ThrottleVerdict.QUOTA_EXHAUSTED.value


@pytest.mark.parametrize("home", ["process", "memory store", "sqlite store"])
@pytest.mark.parametrize("parked_at", ["23:55", "23:40, its probe throttled at 23:56"])
async def test_a_park_without_a_told_length_probes_just_after_the_daily_reset(
    home: str, parked_at: str, tmp_path: Any
) -> None:
    """An account whose real quota is below tpd spends it late in the day with the key's
    own count far from spent: its 429s read as "access revoked", and the park (15 to 60
    minutes) ran on past the reset, so every day began up to an hour late. The probe now
    comes a minute after the reset at the latest, wherever the key's state lives, and so
    does the next one after a probe throttled before the reset (a shared key's store kept
    the probe's own re-park of 15 minutes instead)."""
    clock = FakeClock()
    clock.wall_offset = 11 * 3600 + int(parked_at[3:5]) * 60  # 23:MM UTC
    shared = None
    if home != "process":
        shared = SharedState(_store_on(clock, home, tmp_path), "https://creators.test", "k")
    key = _key(clock, shared, tpd=8640)
    throttled = ThrottledError("TooManyRequests", "x", status=429)
    for _ in range(200):
        if key.circuit.state is CircuitState.OPEN:
            break
        await clock.advance(1.0)
        key.on_throttled(throttled, clock.monotonic())
    assert key.circuit.verdict is ThrottleVerdict.ACCESS_REVOKED
    midnight = dt.datetime(2026, 5, 2, tzinfo=dt.UTC)
    if "probe" in parked_at:
        await clock.advance(key.circuit.probe_at - clock.monotonic() + 0.1)  # type: ignore[operator]
        assert await _driven(clock, key.wait_ready(), within_s=60.0) is None
        sent_at = await _driven(clock, key.try_send(), within_s=60.0)
        assert sent_at is not None
        assert key.circuit.state is CircuitState.PROBING
        key.on_throttled(throttled, sent_at)
    until_reset = (midnight - clock.utcnow()).total_seconds()
    assert 0 < until_reset < 300
    probe_in = key.circuit.probe_at - clock.monotonic()  # type: ignore[operator]
    assert until_reset < probe_in <= until_reset + 60.001
    if shared is not None:  # every process sharing the key reads the same probe time
        await cast("Any", key.limiter).refresh()
        parked = key.limiter.parked()
        assert parked is not None
        assert midnight < parked[1] <= midnight + dt.timedelta(minutes=1)


class TestCircuit:
    """A parked key is probed, and every probe outcome settles the circuit."""

    def _parked(self, clock: FakeClock) -> KeyState:
        key = _key(clock)
        key.circuit.open(ThrottleVerdict.ACCESS_REVOKED)
        assert key.health is KeyHealth.PARKED
        assert key.snapshot().reason == ThrottleVerdict.ACCESS_REVOKED.value
        return key

    async def test_probe_failing_transiently_probes_again_soon(self) -> None:
        """A probe that meets a 5xx, a reset or a failing token endpoint learnt nothing about
        the quota: the key waits a short while and probes again (longer after each such
        failure), instead of being wedged half-open or parked for a doubled 30 minutes."""
        clock = FakeClock()
        key = self._parked(clock)
        await clock.advance(4000)
        waits = []
        for _ in range(3):
            assert key.circuit.try_probe()
            assert key.circuit.state is CircuitState.PROBING
            key.on_failed_attempt(transient=True)
            assert key.circuit.state is CircuitState.OPEN
            probe_at = key.circuit.probe_at
            assert probe_at is not None
            waits.append(probe_at - clock.monotonic())
            await clock.advance(waits[-1])
        assert 0 < waits[0] < waits[1] < waits[2] <= 120
        # A probe answered by a 429 after them parks for the next step of the park, as if
        # they had not happened (900 s, then 1800 s).
        assert key.circuit.try_probe()
        assert key.circuit.open(ThrottleVerdict.ACCESS_REVOKED) - clock.monotonic() >= 1800

    async def test_probe_answered_closes(self) -> None:
        """A probe answered with anything but a 429 or a transient failure closes the circuit."""
        clock = FakeClock()
        key = self._parked(clock)
        await clock.advance(4000)
        assert key.circuit.try_probe()
        key.on_failed_attempt(transient=False)
        assert key.circuit.state is CircuitState.CLOSED
        assert key.health is KeyHealth.ACTIVE

    def test_failed_attempt_outside_probe_changes_nothing(self) -> None:
        """An ordinary failure of an active key leaves the circuit closed."""
        key = _key(FakeClock())
        key.on_failed_attempt(transient=True)
        assert key.circuit.state is CircuitState.CLOSED

    def test_retry_after_pauses(self) -> None:
        """A 429 with Retry-After pauses the key and cuts its rate."""
        clock = FakeClock()
        key = _key(clock, tps=10.0)
        sent = clock.monotonic()
        key.on_throttled(
            ThrottledError("TooManyRequests", "x", status=429, retry_after=3.0), sent + 0.001
        )
        assert key.health is KeyHealth.PAUSED
        assert key.limiter.rate < 10.0
        assert key.snapshot().reason == "Retry-After"
        # Until when, as broker status says it: the live progress and metrics said null.
        until = key.snapshot().until
        assert until is not None
        expected = key.limiter.wall_now() + dt.timedelta(seconds=3.0)
        assert abs(dt.datetime.fromisoformat(until) - expected) <= dt.timedelta(seconds=1)

    def test_a_retry_after_of_hours_parks_the_key_for_its_quota(self) -> None:
        """A 429 whose Retry-After is at least a park long (a server telling the seconds to
        its daily reset) parks the key as out of its daily quota at once: paused a minute
        at a time, it sent one 429'd request a minute for hours, and --no-wait never ended."""
        clock, key, verdict = _throttled_with(43_200.0)
        assert verdict is ThrottleVerdict.QUOTA_EXHAUSTED
        assert key.health is KeyHealth.PARKED
        assert key.snapshot().reason == ThrottleVerdict.QUOTA_EXHAUSTED.value
        assert key.limiter.rate == 5.0  # not the rate's doing: not cut
        # No probe before the time the server named (not every 15 to 60 minutes).
        assert key.circuit.probe_at == clock.monotonic() + 43_200.0

    def test_a_retry_after_of_minutes_only_pauses(self) -> None:
        """A Retry-After shorter than a park (two minutes) pauses the key (capped at a
        minute) and cuts its rate: a rate limit, not a spent quota."""
        _, key, verdict = _throttled_with(120.0)
        assert verdict is ThrottleVerdict.RATE
        assert key.health is KeyHealth.PAUSED

    async def test_token_endpoint_failures_back_off(self) -> None:
        """Repeated token-endpoint failures pause the key longer each time, capped at 60 s."""
        clock = FakeClock()
        key = _key(clock)
        pauses: list[float] = []
        for _ in range(8):
            # Each attempt begins once the previous pause is over: a new round each time.
            await clock.advance(pauses[-1] if pauses else 1.0)
            key.pause_after_error(ConnectionError("down"), clock.monotonic() - 0.1)
            pauses.append(key.next_ready() - clock.monotonic())
        assert pauses[:3] == [2.0, 4.0, 8.0]
        assert pauses[-1] == 60.0
        assert key.snapshot().reason == "token endpoint: ConnectionError"

    def test_one_failed_token_fetch_is_one_round(self) -> None:
        """Batches that waited on one (single-flight) token fetch fail together: one pause,
        not one doubling per batch."""
        clock = FakeClock()
        key = _key(clock)
        sent_at = clock.monotonic() - 0.5  # all four began before the fetch failed
        for _ in range(4):
            key.pause_after_error(ConnectionError("down"), sent_at)
        assert key.next_ready() - clock.monotonic() == 2.0


class TestOutageClock:
    """The outage budget counts only time the endpoint is seen to be down."""

    async def test_idle_gap_starts_a_new_outage(self) -> None:
        """One failure, an hour idle, one more failure: a fresh outage, not an hour-long one."""
        clock = FakeClock()
        key = _key(clock)
        assert not key.on_unreachable(ConnectionRefusedError(), clock.monotonic())
        await clock.advance(3600.0)
        assert not key.on_unreachable(ConnectionRefusedError(), clock.monotonic())
        assert key.outage_s == 0.0

    async def test_an_outage_counts_from_the_failed_send_not_before_an_answer(self) -> None:
        """A request that hung 30 s counts from its send; one answered meanwhile (at 2 s)
        moves the outage's start to that answer: the endpoint was reachable then."""
        clock = FakeClock()
        key = _key(clock)
        sent = clock.monotonic()
        await clock.advance(30.0)
        key.on_unreachable(ConnectionRefusedError(), sent)
        assert key.outage_s == 30.0
        key.on_reachable()
        sent = clock.monotonic()
        await clock.advance(2.0)
        key.on_reachable()
        await clock.advance(28.0)
        key.on_unreachable(ConnectionRefusedError(), sent)
        assert key.outage_s == 28.0

    async def test_continuing_outage_spends_the_budget(self) -> None:
        """Failures every minute for the whole budget take the key out."""
        clock = FakeClock()
        key = _key(clock)
        spent = False
        for _ in range(16):
            spent = key.on_unreachable(ConnectionRefusedError(), clock.monotonic())
            await clock.advance(60.0)
        assert spent
        assert key.outage_s >= key.outage_budget_s


async def test_a_usable_answer_ends_a_streak_of_failures() -> None:
    """Nine transient failures, a usable answer, then one more failure: no systemic failure
    (scattered 5xx over a busy run added up to ten and held the key as in an outage)."""
    clock = FakeClock()
    key = _key(clock)
    for _ in range(9):
        key.on_failed_answer()
    key.on_reachable()
    key.on_failed_answer()
    assert not key.failing_systemically
    for _ in range(9):
        key.on_failed_answer()
    assert key.failing_systemically


async def test_a_key_revived_after_an_outage_fails_at_its_first_unreachable_send() -> None:
    """A key an outage took out, revived 30 s later, goes out again at the first send that
    finds the endpoint still down: it does not wait out a whole new outage budget."""
    clock = FakeClock()
    key = _key(clock)
    key.disable(OUTAGE_CODE, "unreachable", "check the network")
    await clock.advance(OUTAGE_RETRY_S)
    assert key.revive()
    assert key.on_unreachable(EndpointUnreachable("refused"), clock.monotonic())


async def test_a_lone_batch_refused_with_fresh_credentials_rejects_them() -> None:
    """With no other request of the key in flight or waiting, one refusal of fresh
    credentials takes them as rejected at once (nothing else could show they work)."""
    clock = FakeClock()
    key = _key(clock)
    since = clock.monotonic()
    assert await _driven(clock, key.try_send(), within_s=1.0) is not None  # the batch's send
    key.on_credentials_refused(US)
    assert key.judge_credentials(since, US, others_waiting=False) is CredentialsVerdict.REJECTED
    assert key.judge_credentials(since, US, others_waiting=True) is CredentialsVerdict.UNDECIDED


async def test_a_retry_after_of_a_week_parks_the_key_a_day_at_most() -> None:
    """A Retry-After longer than any daily quota (a week) parks the key for a day, jitter
    aside, not for the week."""
    clock, key, _ = _throttled_with(7 * 86_400.0)
    assert key.circuit.state is CircuitState.OPEN
    probe_at = key.circuit.probe_at
    assert probe_at is not None
    assert 86_400.0 - 1e-6 <= probe_at - clock.monotonic() <= 86_400.0 * 1.1


async def _token_pauses(key: KeyState, clock: FakeClock, count: int) -> list[float]:
    """The pauses ``count`` token-endpoint failures in a row give ``key`` (each sent after
    the previous pause)."""
    pauses = []
    for _ in range(count):
        await clock.advance(1.0)
        with capture_logs() as logs:
            key.pause_after_error(TransportError("token endpoint down"), clock.monotonic())
        (event,) = [e for e in logs if e["event"] == "broker.token_fetch_failed"]
        pauses.append(event["pause_s"])
    return pauses


async def test_an_answer_starts_the_token_pauses_afresh() -> None:
    """Token-endpoint failures double the key's pause; a request answered since starts the
    next failure at the first pause again, not at the long one before."""
    clock = FakeClock()
    key = _key(clock)
    first = await _token_pauses(key, clock, 3)
    assert first[0] < first[1] < first[2]
    key.on_success(clock.monotonic(), US, demand_limited=False)
    assert await _token_pauses(key, clock, 1) == first[:1]


async def test_outage_pauses_are_jittered_per_key() -> None:
    """Two keys meeting the same outage pause for different times (drawn from each key's
    randomness), so keys and machines do not probe the endpoint in step."""
    clock = FakeClock()
    holds = []
    for seed in (1, 2):
        key = _key(clock, rng=random.Random(seed))
        key.on_unreachable(EndpointUnreachable("refused"), clock.monotonic())
        holds.append(key.next_ready())
    assert holds[0] != holds[1]


async def test_credentials_refused_everywhere_are_no_marketplace_s_alone() -> None:
    """Credentials accepted in the US are taken as working there only until the US refuses
    them too: then a refusal in Germany is no longer Germany's alone (they were revoked)."""
    clock = FakeClock()
    key = _key(clock)
    key.on_success(clock.monotonic(), US, demand_limited=False)
    assert key.accepted_elsewhere(DE)
    key.on_credentials_refused(US)
    assert not key.accepted_elsewhere(DE)
