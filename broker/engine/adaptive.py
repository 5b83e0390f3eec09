"""Adaptive per-key rate after 429s: target-loss AIMD, naming a 429, and parking a key.

:class:`AdaptiveRate` is the "TL" controller of ``ratelimit.md`` 6.1 point 4, which held
92-100 % of the true rate at about 1.3 % 429s in every simulated server model, including
ones where the configured rate was wrong in either direction (5.3). A fresh 429 cuts the
rate by ``beta``; a success while the key had queued work raises it by ``e^(a*boost)``,
where ``a = -ln(1-beta) * p/(1-p)`` makes the long-run 429 share ``p``.

A PA-API 429 also means "daily quota spent" or "access revoked" (0.2). Treating those as
rate throttling would pin the key at its floor for hours, so :meth:`AdaptiveRate.on_throttled`
returns a :class:`ThrottleVerdict`, and a :class:`Circuit` parks a key with a non-rate
verdict and lets one jittered probe through per park interval.
"""

from __future__ import annotations

import collections
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from broker.ratecontrol import RecoveryState, RecoveryTuning, cut_rate, recovered_rate

if TYPE_CHECKING:
    from broker.clock import Clock

__all__ = ["AdaptiveRate", "AdaptiveSettings", "Circuit", "CircuitState", "ThrottleVerdict"]

#: The controller's defaults live with its arithmetic; the settings below repeat none of them.
_TUNING = RecoveryTuning()


@dataclass(frozen=True, slots=True)
class AdaptiveSettings:
    """Tuning of the adaptive rate, the 429 classifier and the circuit (``ratelimit.md`` 6.3).

    Attributes:
        beta: share of the rate cut per fresh 429 (0.1: seven 429s absorb a halving).
        target_loss: the 429 share ``p`` the increase aims at (1 %, about 1.3 % measured).
        min_rate_per_s: the floor ``r_min`` (0.05/s: one probe per 20 s at worst); a key
            whose nominal rate is lower uses its nominal rate as floor.
        discover: allow the rate above nominal, up to ``discover_factor`` times it, to find
            a grown quota. Off by default: with a known cap, benign servers see 0 % 429s.
        discover_factor: ``r_cap / nominal`` in discover mode.
        boost_every: successes (while demand-limited, since the last 429) per doubling of
            the increase.
        max_boost: the largest multiplier of the increase.
        retry_after_cap_s: the longest pause a Retry-After can impose.
        window: sends in the 429-share window of the classifier.
        streak_limit: consecutive 429s that, near the floor, mean "not a rate problem".
        window_loss_limit: a 429 share over a full window above which, near the floor, the
            429s are not about rate.
        floor_factor: "near the floor" means ``rate <= floor_factor * r_min``.
        quota_nearly_fraction: share of TPD used from which sustained 429s at the floor are
            named "daily quota exhausted" rather than "access revoked".
        park_s: the circuit's first park interval (15 min).
        max_park_s: the longest park interval; each failed probe doubles up to it (60 min).
        probe_jitter: a probe waits ``park * (1 + probe_jitter * u)``, ``u`` in [0, 1), so
            keys and machines parked together do not probe together.
        recovery: after a cut, climb back on a cubic curve in time towards the rate that
            was throttled and then past it towards the configured rate (below), instead of
            only the slow per-success increase.
        regrow_s: seconds to climb from the cut back to ``plateau`` times the throttled rate.
        plateau: the share of the throttled rate the key holds until it probes higher.
        probe_after_s: seconds after a cut before the key probes above its plateau, and at
            least ``probe_after_sends`` sends at the plateau rate (a slow key must not spend
            a 429 every few requests). Each probe throttled at about the same rate doubles
            the wait, up to ``max_probe_after_s`` times that (a server that really is
            slower is probed less often); a cut at a clearly different rate resets it.
        probe_after_sends: see ``probe_after_s``.
        cap_beta: the cut for an isolated 429 sent within ``cap_zone`` of the configured
            rate (see :mod:`broker.ratecontrol`), where the increase per success is matched
            to it; a run of 429s there cuts by ``beta`` and starts no recovery probe.
        cap_zone: the share of the configured rate from which a key counts as at its cap.
        drop_beta: the cut for the third and later 429s within 5 s below ``cap_zone`` (the
            server slowed down).
        cap_target_loss: the 429 share the increase aims at within ``cap_zone``.
        probe_gain: ``c`` of the probe curve ``plateau + c * (t - probe_after)^3``, as a
            share of the throttled rate (0.01: +8 % after 2 s, x1.6 after 4 s, x2.2 after 5 s).
    """

    beta: float = _TUNING.beta
    target_loss: float = 0.01
    min_rate_per_s: float = 0.05
    discover: bool = False
    discover_factor: float = 10.0
    boost_every: int = 50
    max_boost: float = 8.0
    retry_after_cap_s: float = 60.0
    window: int = 50
    streak_limit: int = 10
    window_loss_limit: float = 0.5
    floor_factor: float = 2.0
    quota_nearly_fraction: float = 0.9
    park_s: float = 900.0
    max_park_s: float = 3600.0
    probe_jitter: float = 0.1
    recovery: bool = _TUNING.recovery
    regrow_s: float = _TUNING.regrow_s
    plateau: float = _TUNING.plateau
    probe_after_s: float = _TUNING.probe_after_s
    probe_after_sends: int = _TUNING.probe_after_sends
    max_probe_after_s: float = _TUNING.max_probe_after_s
    probe_gain: float = _TUNING.probe_gain
    cap_beta: float = _TUNING.cap_beta
    cap_zone: float = _TUNING.cap_zone
    drop_beta: float = _TUNING.drop_beta
    cap_target_loss: float = _TUNING.cap_target_loss

    def __post_init__(self) -> None:
        if not 0.0 < self.beta < 1.0:
            raise ValueError(f"beta must be in (0, 1), got {self.beta}")
        if not 0.0 < self.target_loss < 1.0:
            raise ValueError(f"target_loss must be in (0, 1), got {self.target_loss}")
        if not (self.min_rate_per_s > 0.0 and math.isfinite(self.min_rate_per_s)):
            raise ValueError(f"min_rate_per_s must be positive, got {self.min_rate_per_s}")
        if self.discover_factor < 1.0 or self.max_boost < 1.0:
            raise ValueError("discover_factor and max_boost must be >= 1")
        if self.boost_every < 1 or self.window < 1 or self.streak_limit < 1:
            raise ValueError("boost_every, window and streak_limit must be >= 1")
        if self.park_s <= 0.0 or self.max_park_s < self.park_s or self.probe_jitter < 0.0:
            raise ValueError("need 0 < park_s <= max_park_s and probe_jitter >= 0")
        if self.retry_after_cap_s < 0.0:
            raise ValueError("retry_after_cap_s must be >= 0")
        if not 0.0 < self.plateau <= 1.0 or self.regrow_s <= 0.0 or self.probe_gain <= 0.0:
            raise ValueError("need 0 < plateau <= 1, regrow_s > 0 and probe_gain > 0")
        if not 0.0 < self.probe_after_s <= self.max_probe_after_s:
            raise ValueError("need 0 < probe_after_s <= max_probe_after_s")

    def tuning(self) -> RecoveryTuning:
        """The ceiling-aware controller's parameters (``broker/ratecontrol.py``)."""
        return RecoveryTuning(**{f.name: getattr(self, f.name) for f in fields(RecoveryTuning)})

    @property
    def increase_per_success(self) -> float:
        """``a = -ln(1-beta) * p/(1-p)``: the log-rate gain per success at boost 1."""
        return -math.log1p(-self.beta) * self.target_loss / (1.0 - self.target_loss)


class ThrottleVerdict(enum.Enum):
    """What a 429 most likely means for the key."""

    #: per-second throttling: the rate controller handles it, the batch is re-queued
    RATE = "rate"
    #: the daily quota (TPD) is spent: park the key until the window resets, probe rarely
    QUOTA_EXHAUSTED = "daily quota exhausted"
    #: sustained 429s at the floor rate with budget left: the account is not eligible or
    #: its access was revoked (30 days without referred sales); park and probe rarely
    ACCESS_REVOKED = "account not eligible / access revoked"


class AdaptiveRate:
    """The target-loss AIMD controller of one key's rate, plus its 429 classifier.

    Feed it every outcome: :meth:`on_success` for a 2xx and :meth:`on_throttled` for a 429,
    then copy :attr:`rate` into the key's pacer.

    Args:
        nominal_rate_per_s: the key's configured TPS; the start rate and (outside discover
            mode) the cap.
        clock: stamps cuts, to tell 429s sent before a cut from those sent after.
        settings: the tuning; the defaults are ``ratelimit.md`` 6.3.

    Raises:
        ValueError: for a nominal rate that is not positive and finite.
    """

    __slots__ = (
        "_boost",
        "_clock",
        "_consecutive",
        "_cuts",
        "_last_cut_at",
        "_max_rate",
        "_min_rate",
        "_nominal",
        "_outcomes",
        "_rate",
        "_recovery",
        "_settings",
        "_streak",
        "_tuning",
    )

    def __init__(
        self,
        nominal_rate_per_s: float,
        *,
        clock: Clock,
        settings: AdaptiveSettings | None = None,
    ) -> None:
        if not (nominal_rate_per_s > 0.0 and math.isfinite(nominal_rate_per_s)):
            raise ValueError(f"nominal rate must be positive and finite, got {nominal_rate_per_s}")
        self._settings = settings if settings is not None else AdaptiveSettings()
        self._clock = clock
        self._nominal = float(nominal_rate_per_s)
        s = self._settings
        self._min_rate = min(s.min_rate_per_s, self._nominal)
        self._max_rate = self._nominal * (s.discover_factor if s.discover else 1.0)
        self._rate = self._nominal
        self._last_cut_at = -math.inf
        self._cuts = 0
        self._boost = 1.0
        self._streak = 0
        self._consecutive = 0
        # True for a 429, False for a success, over the last `window` outcomes.
        self._outcomes: collections.deque[bool] = collections.deque(maxlen=s.window)
        self._tuning = s.tuning()
        #: the ceiling-aware controller's memory (broker/ratecontrol.py)
        self._recovery = RecoveryState()

    @property
    def settings(self) -> AdaptiveSettings:
        """The tuning in use."""
        return self._settings

    @property
    def rate(self) -> float:
        """The rate the key's pacer should use, in requests per second."""
        return self._rate

    @property
    def min_rate(self) -> float:
        """The floor ``r_min``."""
        return self._min_rate

    @property
    def max_rate(self) -> float:
        """The cap ``r_cap`` (nominal, or ``discover_factor`` times it in discover mode)."""
        return self._max_rate

    @property
    def boost(self) -> float:
        """The current multiplier of the increase (1 to ``max_boost``)."""
        return self._boost

    @property
    def last_cut_at(self) -> float:
        """Monotonic time of the last cut (``-inf`` before any)."""
        return self._last_cut_at

    @property
    def cuts(self) -> int:
        """How many times the rate was cut."""
        return self._cuts

    @property
    def consecutive_throttles(self) -> int:
        """429s since the last success."""
        return self._consecutive

    @property
    def throttle_share(self) -> float:
        """The 429 share over the last ``window`` outcomes (0 before any)."""
        if not self._outcomes:
            return 0.0
        return sum(self._outcomes) / len(self._outcomes)

    def on_success(self, *, demand_limited: bool) -> float:
        """Record a success; raise the rate when the key had queued work.

        Args:
            demand_limited: the key's queue was non-empty when its slot came, so the rate
                (not demand) limited it. An idle key has not tested its rate and is not
                raised, or it would climb to the cap unnoticed and meet a burst of 429s.

        Returns:
            The new rate.
        """
        self._outcomes.append(False)
        self._consecutive = 0
        if demand_limited:
            s = self._settings
            self._raise()
            self._streak += 1
            if self._streak % s.boost_every == 0:
                self._boost = min(s.max_boost, self._boost * 2.0)
        return self._rate

    def on_throttled(
        self,
        sent_at: float,
        *,
        budget_exhausted: bool = False,
        quota_used: float | None = None,
        retry_after_s: float | None = None,
        answered_today: bool = False,
    ) -> ThrottleVerdict:
        """Record a 429 and say what it means; cut the rate for a fresh rate 429.

        Only a 429 for a request sent after the last cut cuts again: earlier ones were paced
        at the old rate. A non-rate verdict never cuts: the rate is not the problem.

        Args:
            sent_at: the monotonic send time of the throttled request (``commit()``'s value).
            budget_exhausted: the key's daily counter has reached its guard.
            quota_used: the share of TPD the key's counter has spent today (``None``:
                unlimited or unknown).
            retry_after_s: the 429's Retry-After, if it had one: one at least a park long
                (``park_s``) says the daily quota is spent, whatever the rate (a server
                telling the seconds to its reset), where pausing a minute at a time would
                only meet it again every minute.
            answered_today: a request of the key was answered in today's daily window. Its
                access is fine, so sustained 429s at the floor mean the day's quota is
                spent, however little of tpd the count says is used (the account's quota
                is lower than its config says).

        Returns:
            The verdict; anything but ``RATE`` means "open the key's circuit".
        """
        self._outcomes.append(True)
        self._consecutive += 1
        self._streak = 0
        self._boost = 1.0
        verdict = self._classify(budget_exhausted, quota_used, retry_after_s, answered_today)
        if verdict is ThrottleVerdict.RATE and sent_at > self._last_cut_at:
            self._cut()
        return verdict

    def _raise(self) -> None:
        """Move the rate up after a demand-limited success (before the boost moves)."""
        self._rate = recovered_rate(
            self._recovery,
            self._rate,
            self._clock.monotonic(),
            nominal=self._nominal,
            max_rate=self._max_rate,
            gain=self._settings.increase_per_success * self._boost,
            discover=self._settings.discover,
            tuning=self._tuning,
        )

    def _cut(self) -> None:
        """Cut the rate for a fresh rate 429."""
        now = self._clock.monotonic()
        cut = cut_rate(
            self._recovery, self._rate, now, max_rate=self._max_rate, tuning=self._tuning
        )
        self._rate = max(self._min_rate, cut)
        self._last_cut_at = now
        self._cuts += 1

    def _classify(
        self,
        budget_exhausted: bool,
        quota_used: float | None,
        retry_after_s: float | None,
        answered_today: bool,
    ) -> ThrottleVerdict:
        s = self._settings
        if budget_exhausted or (retry_after_s is not None and retry_after_s >= s.park_s):
            return ThrottleVerdict.QUOTA_EXHAUSTED
        sustained = self._consecutive >= s.streak_limit or (
            len(self._outcomes) == s.window and self.throttle_share > s.window_loss_limit
        )
        if not sustained or self._rate > s.floor_factor * self._min_rate:
            return ThrottleVerdict.RATE
        if answered_today or (quota_used is not None and quota_used >= s.quota_nearly_fraction):
            return ThrottleVerdict.QUOTA_EXHAUSTED
        return ThrottleVerdict.ACCESS_REVOKED

    def pause_for(self, retry_after_s: float | None) -> float:
        """Return how long a Retry-After should pause the key: clamped to [0, cap].

        ``None``, negative or NaN values mean no pause (0.0).
        """
        if retry_after_s is None or not retry_after_s > 0.0:
            return 0.0
        return min(retry_after_s, self._settings.retry_after_cap_s)

    def reset(self) -> None:
        """Start over at the nominal rate, e.g. when a circuit closes after a quota reset.

        429s of requests sent before the reset no longer cut.
        """
        self._rate = self._nominal
        self._last_cut_at = self._clock.monotonic()
        self._recovery.reset(self._last_cut_at)
        self._boost = 1.0
        self._streak = 0
        self._consecutive = 0
        self._outcomes.clear()

    def __repr__(self) -> str:
        return (
            f"AdaptiveRate(rate={self._rate:.4g}/s, range=[{self._min_rate:g}, "
            f"{self._max_rate:g}], boost={self._boost:g}, consecutive_429={self._consecutive}, "
            f"share_429={self.throttle_share:.3f}, cuts={self._cuts})"
        )


class CircuitState(enum.Enum):
    """Where a key's circuit stands."""

    #: normal operation: the key sends at its paced rate
    CLOSED = "closed"
    #: parked until ``probe_at``: nothing is sent
    OPEN = "open"
    #: one probe request is in flight; its outcome closes or re-opens the circuit
    PROBING = "probing"


#: The first wait before a parked key probes again after a probe that learnt nothing about
#: the quota (see Circuit.probe_unsettled).
_UNSETTLED_PROBE_S = 15.0


class Circuit:
    """Parks a key whose 429s are not about rate, and probes it with one request.

    ``open(verdict)`` parks the key for ``park_s`` (15 min), doubling after each failed
    probe up to ``max_park_s`` (60 min), plus jitter. When the park ends, ``try_probe()``
    admits exactly one request; ``on_success()`` closes the circuit, and a failed probe
    (``open`` again) re-parks it for longer. A probe that learnt nothing about the quota
    (``probe_unsettled()``) is tried again after a short wait instead.

    Args:
        clock: the monotonic clock parks are measured on.
        settings: the park intervals and jitter.
        random: returns floats in [0, 1) for the jitter (``random.random``).
    """

    __slots__ = (
        "_clock",
        "_opens",
        "_probe_at",
        "_random",
        "_settings",
        "_state",
        "_unsettled",
        "_verdict",
    )

    def __init__(
        self,
        clock: Clock,
        *,
        random: Callable[[], float],
        settings: AdaptiveSettings | None = None,
    ) -> None:
        self._clock = clock
        self._random = random
        self._settings = settings if settings is not None else AdaptiveSettings()
        self._state = CircuitState.CLOSED
        self._verdict: ThrottleVerdict | None = None
        self._probe_at: float | None = None
        self._opens = 0
        self._unsettled = 0

    @property
    def state(self) -> CircuitState:
        """The circuit's state."""
        return self._state

    @property
    def verdict(self) -> ThrottleVerdict | None:
        """Why the circuit is open or probing (``None`` when closed)."""
        return self._verdict

    @property
    def probe_at(self) -> float | None:
        """Monotonic time the next probe may go (``None`` unless open)."""
        return self._probe_at

    def open(
        self,
        verdict: ThrottleVerdict,
        *,
        at_least_s: float = 0.0,
        at_most_s: float = math.inf,
    ) -> float:
        """Park the key (or re-park it after a failed probe) and return the probe time.

        ``at_least_s``: the server's own word on how long (a Retry-After of hours): the
        probe waits for it, where the park's own steps would probe every 15 to 60 minutes
        until then. ``at_most_s``: the latest the probe may come when the server said
        nothing (just after the key's daily reset: whatever the 429s meant, a new day may
        have ended them). While already open this changes nothing: late 429s of requests
        sent before the park must not stretch it.
        """
        if self._state is CircuitState.OPEN and self._probe_at is not None:
            return self._probe_at
        s = self._settings
        # min() before the power would overflow only after ~1000 failed probes; clamp anyway.
        park = min(s.max_park_s, s.park_s * 2.0 ** min(self._opens, 64))
        self._opens += 1
        self._unsettled = 0
        self._state = CircuitState.OPEN
        self._verdict = verdict
        now = self._clock.monotonic()
        wait = min(park * (1.0 + s.probe_jitter * self._random()), at_most_s)
        self._probe_at = now + max(wait, at_least_s)
        return self._probe_at

    def try_probe(self) -> bool:
        """Admit one probe when the park is over; True means "send exactly one request".

        A closed circuit always admits; a probing one admits nothing more.
        """
        if self._state is CircuitState.CLOSED:
            return True
        if (
            self._state is CircuitState.OPEN
            and self._probe_at is not None
            and self._clock.monotonic() >= self._probe_at
        ):
            self._state = CircuitState.PROBING
            return True
        return False

    def abandon_probe(self) -> None:
        """The probe admitted was never sent (its caller left): admit the next one at once.

        Without this the circuit would stay probing with no probe in flight, and the key
        would never send again (N9).
        """
        if self._state is CircuitState.PROBING:
            self._state = CircuitState.OPEN
            self._probe_at = self._clock.monotonic()

    def probe_unsettled(self, *, hand_on: bool = False) -> None:
        """The probe got no answer about the quota: a 5xx, a reset, or this process's own
        network or token endpoint failed it. Probe again after a short wait, doubled after
        each such probe up to the park interval, without lengthening the park: nothing says
        the quota is still spent, and a failure of this machine's says nothing of Amazon's.
        ``hand_on`` (the failure was this process's own) matters only to a shared circuit.
        """
        if self._state is not CircuitState.PROBING:
            return
        wait = min(self._settings.park_s, _UNSETTLED_PROBE_S * 2.0 ** min(self._unsettled, 16))
        self._unsettled += 1
        self._state = CircuitState.OPEN
        self._probe_at = self._clock.monotonic() + wait

    def on_success(self) -> None:
        """Close the circuit: a request got through (the probe, or one already in flight)."""
        self._state = CircuitState.CLOSED
        self._verdict = None
        self._probe_at = None
        self._opens = 0
        self._unsettled = 0

    def __repr__(self) -> str:
        verdict = None if self._verdict is None else self._verdict.name
        return (
            f"Circuit(state={self._state.name}, verdict={verdict}, probe_at={self._probe_at}, "
            f"opens={self._opens})"
        )
