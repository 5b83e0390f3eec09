"""The values the key-state layer trades in: a key's identity, its limits, feedback, a decision.

Every send decision and every piece of feedback is one call to a store
(:class:`broker.state.store.KeyStateStore`) with these values; the store applies the
feedback and, when asked, reserves the next slot and counts the day, in one atomic step.
Times inside the store are integer microseconds on the *store's* clock (the machine's
monotonic clock for SQLite's slots, pauses and parks, with its wall clock for the daily
window; Redis's ``TIME`` for Redis); callers only ever receive durations
(``wait_s``) and read store times back through the same store, so no client clock is trusted
across processes or machines.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.ratecontrol import RecoveryTuning

__all__ = [
    "PROCESS_RECENT_S",
    "Decision",
    "Feedback",
    "KeyLimits",
    "ProcessMark",
    "StateKey",
    "day_number",
]

#: A process that made a decision for a key within this many seconds is "seen recently".
PROCESS_RECENT_S = 60.0

_US = 1_000_000
_DAY_S = 86_400


def day_number(now_us: int, reset_offset_s: int) -> int:
    """The daily window ``now_us`` falls in, as days since 1970-01-01 (the window's start date).

    The same boundary as :class:`broker.engine.quota.DailyBudget`: a window starts at
    ``reset_offset_s`` seconds after 00:00 UTC (0 by default) and lasts one day.
    """
    return (now_us // _US - reset_offset_s) // _DAY_S


def day_end_us(day: int, reset_offset_s: int) -> int:
    """The store time (µs) at which daily window ``day`` ends."""
    return ((day + 1) * _DAY_S + reset_offset_s) * _US


@dataclass(frozen=True, slots=True)
class StateKey:
    """Which shared state a key uses: a hash of its API endpoint and credential id.

    Two processes share a key's rate, day and health exactly when they talk to the same
    endpoint with the same credential. The secret never enters the identity. Separate
    embedded simulators listen on different ports, so their keys never meet.

    Attributes:
        digest: 32 hex digits of SHA-256 over endpoint and credential id.
        name: the key's label in this process's config (for ``broker status``; not identity).
    """

    digest: str
    name: str = ""

    @classmethod
    def of(cls, endpoint: str, credential_id: str, *, name: str = "") -> StateKey:
        """Build the identity of ``credential_id`` at ``endpoint`` (a URL or ``"amazon"``)."""
        raw = f"{endpoint.rstrip('/').lower()}\x00{credential_id}".encode()
        return cls(hashlib.sha256(raw).hexdigest()[:32], name)


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """What a key is allowed and how its shared rate adapts (from the config, per process).

    Attributes:
        nominal_rate: the configured TPS: start rate and, unless discovering, the cap.
        min_rate: the floor of the adaptive rate.
        max_rate: the cap of the adaptive rate.
        day_limit: sends allowed per daily window (TPD times the guard); None: unlimited.
        tpd: the configured TPD (for status), None: unlimited.
        reset_offset_s: seconds after 00:00 UTC the daily window starts.
        beta: the cut per fresh 429.
        increase: the log-rate gain per demand-limited success at boost 1.
        boost_every: successes per doubling of the increase.
        max_boost: the largest boost.
        horizon_s: a slot further ahead than this is not reserved (the caller waits, asks again).
        probe_lease_s: how long a parked key's single probe holds the key before another
            process may probe (a probing process that died frees it after this).
        tuning: the ceiling-aware controller's parameters, or None for plain AIMD.
    """

    nominal_rate: float
    min_rate: float
    max_rate: float
    day_limit: int | None = None
    tpd: int | None = None
    reset_offset_s: int = 0
    beta: float = 0.1
    increase: float = -math.log1p(-0.1) * 0.01 / 0.99
    boost_every: int = 50
    max_boost: float = 8.0
    horizon_s: float = 5.0
    probe_lease_s: float = 60.0
    #: the ceiling-aware controller (``broker/ratecontrol.py``); None: plain target-loss
    #: AIMD with ``beta`` and ``increase``
    tuning: RecoveryTuning | None = None

    def __post_init__(self) -> None:
        for rate in (self.nominal_rate, self.min_rate, self.max_rate):
            if not (rate > 0.0 and math.isfinite(rate)):
                raise ValueError(f"rates must be positive and finite, got {rate!r}")
        if not self.min_rate <= self.nominal_rate <= self.max_rate:
            raise ValueError("need min_rate <= nominal_rate <= max_rate")
        if self.day_limit is not None and self.day_limit < 0:
            raise ValueError("day_limit must be >= 0")
        if self.horizon_s <= 0.0 or self.probe_lease_s <= 0.0:
            raise ValueError("horizon_s and probe_lease_s must be positive")


@dataclass(frozen=True, slots=True)
class Feedback:
    """What a process learnt since its last call, applied atomically before any reservation.

    Attributes:
        successes: demand-limited successes (each raises the shared rate, boosted).
        throttled: store times (µs) at which throttled requests' slots were decided (their
            decision's ``now_us``); each one decided after the last cut cuts the shared rate
            once, so a round of 429s cuts once, however many processes see it.
        pause_s: hold the key this long from the store's now (Retry-After, outage); 0: none.
        pause_reason: why, for ``broker status`` and ``/readyz``.
        park_s: park the key this long (its 429s mean quota spent / access revoked); 0: none.
        park_reason: the verdict, for ``broker status``.
        unpark: a request got through: close the circuit and restart at the nominal rate.
        set_rate: an operator's rate, applied as is (clamped to the limits); None: none.
        release_probe_us: the lease end (µs, the store's clock) of a parked key's probe this
            process was granted and got no answer about the quota for (never sent, or failed
            by its own network, token endpoint or a 5xx): if the key still holds that lease,
            it ends ``probe_again_s`` from the store's now instead of when it would have
            run out, and any process may probe then; 0: none.
        probe_again_s: see ``release_probe_us`` (0: at once).
        leaving: the process is closing: it no longer counts as using the key, and a daily
            limit it alone kept lower than the others' stops holding at once, not a minute
            later (a tpd raised between two runs must not read as the day spent).
        answered: a request of the process succeeded since its last call: the key's run
            of 429s (``Decision.run_429s``) is over.
        run_429s: the 429s since the process's last answer (after it, when ``answered``),
            added to the key's run.
    """

    successes: int = 0
    throttled: tuple[int, ...] = ()
    pause_s: float = 0.0
    pause_reason: str = ""
    park_s: float = 0.0
    park_reason: str = ""
    unpark: bool = False
    set_rate: float | None = None
    release_probe_us: int = 0
    probe_again_s: float = 0.0
    leaving: bool = False
    answered: bool = False
    run_429s: int = 0


@dataclass(frozen=True, slots=True)
class ProcessMark:
    """Who is asking: a process id, and what it last saw of the key.

    The mark lets a store that lost its data (Redis restarted empty) rebuild the key from
    what the surviving processes saw last, instead of starting afresh: the day's count (the
    highest any of them saw, plus the sends granted since the loss), the shared rate and a
    park (a key parked for Amazon's spent quota stays parked, and is not hammered at the
    nominal rate again). The rate comes from the first process to ask the lost record; a
    park from any mark of before the loss (its ``gen``), unless a probe lifted a park or
    Amazon answered since; a record that was not lost knows better than any mark.

    Attributes:
        process_id: ``host:pid:nonce``, unique per process run.
        hwm_day: the daily window the mark belongs to (-1: none).
        hwm_count: the highest count this process saw (or made) in that window.
        rate: the shared rate of its last decision (0: none yet).
        parked_until_us, park_reason: the park of its last decision (store time; 0: none).
        gen: the generation of the key's record its last decision came from (see
            :attr:`Decision.gen`); "" before its first.
        gen_sends: the sends granted in that generation in ``hwm_day``, as of that decision
            (:attr:`Decision.gen_sends`): a record rebuilt after a later loss sums these over
            the generations the marks name, so sends granted in a generation the asker never
            saw count too.
        own_sends: the sends this process was granted in ``hwm_day``: a record rebuilt
            after losses sums them over the processes that ask, whatever each saw of the
            others.
    """

    process_id: str
    hwm_day: int = -1
    hwm_count: int = 0
    rate: float = 0.0
    parked_until_us: int = 0
    park_reason: str = ""
    gen: str = ""
    gen_sends: int = 0
    own_sends: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    """A store's answer: whether a send was reserved, how long to wait, and the key's state.

    Attributes:
        granted: a slot was reserved and counted; send after ``wait_s``.
        wait_s: granted: seconds until the reserved slot; refused: seconds before asking again.
        refusal: why not granted (``"daily quota"``, ``"parked"``, ``"probing"``,
            ``"horizon"``), or None (granted, or a query that asked for no slot).
        probe: this grant is the single probe of a parked key.
        now_us: the store's clock at the decision.
        slot_us: the reserved slot (store time; 0 when none).
        next_slot_us: the next free slot after this decision.
        rate: the shared rate now.
        day: the daily window (days since 1970-01-01 at the reset offset).
        count: sends counted in that window, this one included.
        paused_until_us, pause_reason: the key's pause (0 and "" when none).
        parked_until_us, park_reason: the key's circuit (0 and "" when closed).
        last_429_us: when a 429 was last reported (0: never).
        cut: this call's feedback cut the rate.
        processes: processes seen using the key within ``PROCESS_RECENT_S``.
        day_limit: the daily limit the key keeps to now: the lowest any process asked with
            recently (see ``_agree_day``), else the caller's own; None: unlimited.
        wall_us: the store's wall clock at the decision, which judged ``day``: a process
            whose own wall clock is wrong counts the day by this, not by its own.
        run_429s: the key's 429s in a row, over every process (see ``Feedback.run_429s``).
        gen: the generation of the key's record: new each time the store starts it afresh
            (a key never seen, or lost: Redis restarted empty). A process whose mark names
            another one saw the key before that, and what it saw then is news to the record.
        gen_sends: the sends granted in that generation in window ``day``, this one included.
        day_taken_over_s: this call started a new day at the caller's daily reset over a
            day counted under another one: that one's offset (s after 00:00 UTC); -1: not so.
        answered_today: a process told of an answer of the key since the day counted began
            (under the reset it was counted under; it ends at ``window_end_us``): its access
            is fine, so sustained 429s mean the day's quota is spent.
        window_end_us: when the window ``count`` belongs to ends (µs, the store's wall
            clock): the caller's next reset, or another live process's when the key keeps
            to the window counted under that one's reset (two configs differ). Every store
            tells it.
    """

    granted: bool
    wait_s: float
    refusal: str | None
    probe: bool
    now_us: int
    slot_us: int
    next_slot_us: int
    rate: float
    day: int
    count: int
    paused_until_us: int
    pause_reason: str
    parked_until_us: int
    park_reason: str
    last_429_us: int
    cut: bool
    processes: int
    wall_us: int
    day_limit: int | None = None
    run_429s: int = 0
    gen: str = ""
    window_end_us: int = 0
    gen_sends: int = 0
    day_taken_over_s: int = -1
    answered_today: bool = False
