"""The ceiling-aware rate controller's arithmetic, shared by the in-process and shared keys.

A key's configured TPS is a known ceiling. Three kinds of 429 reach a key:

- an isolated 429 at (or near) the ceiling is arrival jitter against a strict server: the
  key slows by ``cap_beta`` (3 %) and creeps back with a gain matched to that cut, so it
  settles where about ``cap_target_loss`` of its requests are throttled;
- 429s in quick succession (three within 5 s) near the ceiling cut by ``beta`` each, and
  the key creeps back as above: against a strict server a run there is still jitter, and
  probing back up to the ceiling would only meet the next run (``burst1`` in
  ``benchmarks/README.md``);
- 429s below that zone (``cap_zone`` of the ceiling) mean the server's rate is lower: each
  fresh one cuts by ``beta`` (``drop_beta`` within a run), and the key remembers the rate
  that was throttled. From there it climbs on a cubic curve in time
  (``ratelimit.md`` 1.3, CUBIC in shape): back to ``plateau`` times that rate within
  ``regrow_s``, flat until the probe time, then convex above it, so a server whose rate came
  back is found within seconds while one that stayed slow costs about one 429 per probe. A
  throttled probe keeps the known limit and doubles the wait before the next probe, unless
  it had climbed to more than ``PROBE_FAR`` times that limit: the server's rate came back
  part of the way, and the probe's rate is the new limit.

Everything here is pure arithmetic on a :class:`RecoveryState` and times in seconds, so the
engine's :class:`~broker.engine.adaptive.AdaptiveRate` (one process) and the shared key
state's decision (``broker/state/decision.py``, every process of a machine) apply the same
controller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = [
    "DROP_WINDOW_S",
    "PROBE_FAR",
    "RecoveryState",
    "RecoveryTuning",
    "cut_rate",
    "recovered_rate",
]

#: Three cuts within this many seconds mean the server's rate dropped (not jitter).
DROP_WINDOW_S = 5.0


@dataclass(frozen=True, slots=True)
class RecoveryTuning:
    """The controller's parameters (see :class:`~broker.engine.adaptive.AdaptiveSettings`)."""

    beta: float = 0.1
    recovery: bool = True
    cap_beta: float = 0.03
    cap_zone: float = 0.75
    cap_target_loss: float = 0.0125
    drop_beta: float = 0.2
    regrow_s: float = 2.0
    plateau: float = 0.97
    probe_after_s: float = 3.0
    probe_after_sends: int = 8
    max_probe_after_s: float = 6.0
    probe_gain: float = 0.01

    @property
    def cap_gain(self) -> float:
        """The log-rate gain per success within the cap zone (matched to ``cap_beta``)."""
        loss = self.cap_target_loss
        return -math.log1p(-self.cap_beta) * loss / (1.0 - loss)


@dataclass(slots=True)
class RecoveryState:
    """What the controller remembers between outcomes (times in seconds, any epoch)."""

    #: when the last cut happened (-inf before any)
    last_cut: float = -math.inf
    #: the rate the last fresh 429 was sent at while recovering (0: not recovering)
    top: float = 0.0
    #: multiplier of the probe wait (1, 2, 4 ... up to max_probe_after_s / probe_after_s)
    probe_level: float = 1.0
    #: the last cut came while still coming down: hold the cut rate until the probe
    descending: bool = False
    #: times of the last two cuts, to tell a run of 429s from an isolated one
    recent: list[float] = field(default_factory=list)

    def reset(self, now: float) -> None:
        """Forget the recovery (the circuit closed, the key starts at its nominal rate)."""
        self.last_cut = now
        self.top = 0.0
        self.probe_level = 1.0
        self.descending = False
        self.recent = []


#: A throttled probe sent at more than this many times the last limit found a new one.
PROBE_FAR = 2.0


def _probe_wait(state: RecoveryState, tuning: RecoveryTuning, top: float) -> float:
    sends = tuning.probe_after_sends / (top * tuning.plateau)
    return state.probe_level * max(tuning.probe_after_s, sends)


def cut_rate(
    state: RecoveryState, rate: float, now: float, *, max_rate: float, tuning: RecoveryTuning
) -> float:
    """The rate after a fresh 429 (one sent after the last cut) at ``rate``; updates ``state``.

    The caller clamps the result to its floor and stamps ``last_cut`` (done here too).
    """
    recent = [t for t in state.recent if now - t <= DROP_WINDOW_S]
    dropped = len(recent) >= 2
    state.recent = [*recent, now][-2:]
    at_cap = rate >= tuning.cap_zone * max_rate
    previous = state.top if state.top > 0 else None
    since_cut = now - state.last_cut
    state.last_cut = now
    if not tuning.recovery or at_cap:
        # Near the ceiling there is no lower limit worth probing back up to: an isolated
        # 429 is arrival jitter (the small cut); a run cuts by beta and the key creeps
        # back with the small gain, since probing up to the ceiling again would meet a
        # strict server where it throttles every other request. A run that takes the rate
        # below the zone is a drop, handled below.
        state.top = 0.0
        return rate * (1.0 - (tuning.cap_beta if at_cap and not dropped else tuning.beta))
    beta = tuning.drop_beta if dropped else tuning.beta
    if (
        previous is not None
        and since_cut >= _probe_wait(state, tuning, previous)
        and rate <= PROBE_FAR * previous
    ):
        # A probe above the last limit was throttled: the limit still holds (not the
        # probe's peak), and the server is slower than configured: probe less often.
        limit = tuning.max_probe_after_s / tuning.probe_after_s
        state.probe_level = min(limit, state.probe_level * 2.0)
        return min(rate * (1.0 - beta), previous * (1.0 - beta))
    # Else a fresh limit: the first 429s of a drop, or a probe that climbed to more than
    # PROBE_FAR times the last limit before its first 429 (the server's rate came back
    # part of the way: going back under the old limit made a sawtooth far below the new).
    state.descending = previous is not None and rate < 0.97 * previous
    if previous is None or abs(rate - previous) > 0.1 * previous:
        state.probe_level = 1.0
    state.top = rate
    return rate * (1.0 - beta)


def recovered_rate(
    state: RecoveryState,
    rate: float,
    now: float,
    *,
    nominal: float,
    max_rate: float,
    gain: float,
    discover: bool,
    tuning: RecoveryTuning,
) -> float:
    """The rate after a demand-limited success; ``gain`` is the target-loss step (boosted).

    Near the cap (outside discover mode) the step is the small one matched to
    ``cap_beta``; while recovering from a drop, at least the recovery curve's rate.
    """
    if rate >= tuning.cap_zone * max_rate and not discover:
        gain = tuning.cap_gain
    grown = rate * math.exp(gain)
    top = state.top
    if tuning.recovery and top > 0:
        t = now - state.last_cut
        wait = _probe_wait(state, tuning, top)
        cut = 1.0 - tuning.beta
        plateau = cut if state.descending else tuning.plateau
        if t < wait:
            frac = min(1.0, t / tuning.regrow_s)
            share = plateau - (plateau - cut) * (1.0 - frac) ** 3
        else:
            share = plateau + tuning.probe_gain * (t - wait) ** 3
        grown = max(grown, top * share)
    grown = min(max_rate, grown)
    if grown >= nominal:
        # Back at the configured rate: the recovery is over.
        state.top = 0.0
    return grown
