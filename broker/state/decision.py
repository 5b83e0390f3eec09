"""The send decision itself, as a pure function over one key's record.

The memory and SQLite stores run :func:`decide` inside their lock or transaction; the
Redis store runs the same steps as a Lua script (``broker/state/redis.py``), and the tests
hold both to the same behaviour. One call:

1. rolls the daily window forward (never back: a wall clock stepping back over midnight
   does not reopen a day already spent) and raises the count to the caller's high-water mark
   (plus the sends granted since the record started afresh, for a mark from before that,
   or the sum of the sends each earlier generation was told to have granted, if more);
2. applies the caller's feedback: an operator rate, demand-limited successes (the
   target-loss increase of ``ratelimit.md`` 6.1, boosted), throttles (one cut per *round*:
   only a request sent after the last cut cuts again), a pause, a park, an unpark;
3. if asked to reserve: refuses while parked (admitting exactly one probe per lease once
   the park is over), when the day's limit is reached, or when the slot lies beyond the
   horizon; else books ``slot = max(next_slot, now, paused_until)`` (a next slot at most
   ``slack`` in the past keeps the grid, so a late wake-up is not lost), moves the next
   slot one interval on and counts the send.

A process that dies after reserving wastes only the slots it reserved: one per dispatcher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Final

from broker.ratecontrol import RecoveryState, cut_rate, recovered_rate
from broker.state.model import (
    PROCESS_RECENT_S,
    Decision,
    Feedback,
    KeyLimits,
    ProcessMark,
    day_end_us,
    day_number,
)

__all__ = ["PROCESS_KEEP_S", "Record", "decide", "process_entry", "slack_us"]

_US = 1_000_000
_DAY_US: Final = 86_400 * _US
#: Processes not seen for this long are dropped from a key's record.
PROCESS_KEEP_S = 600.0
#: At most this many earlier generations are kept in a record's ``prior`` (the smallest
#: goes first): losses in one day are few, and the count already holds what one told.
PRIOR_KEEP: Final = 16
#: At most this many processes' own sends are kept in a record's ``own`` (the smallest goes).
OWN_KEEP: Final = 256
#: A 429 this long (seconds) after the key's last one starts a new run of 429s.
RUN_GAP_S: Final = 60.0
#: From this many 429s in a row over every process (the classifier's streak limit), each
#: one cuts the rate, even one whose send was decided before the last cut.
RUN_CUTS_FROM: Final = 10


def slack_us(interval_us: int) -> int:
    """How far in the past a next slot may lie and still be booked (keeps the grid).

    A quarter interval, at most 50 ms: enough for timer lateness, a store round trip and a
    busy machine's scheduling delay, never enough for two sends closer than a server's
    burst of 2 tolerates (it is below one interval).
    """
    return min(interval_us // 4, 50_000)


@dataclass(slots=True)
class Record:
    """One key's shared state (mutable: the store owns it between decisions)."""

    rate: float = 0.0
    #: the configured rate the key paces by: the lowest one asked with recently
    nominal: float = 0.0
    #: when a process with that configured rate last asked (µs)
    nominal_seen: int = 0
    next_slot: int = 0
    cut_at: int = 0
    cuts: int = 0
    boost: float = 1.0
    streak: int = 0
    day: int = -1
    #: the reset offset (s after 00:00 UTC) ``day`` was counted under (-1: unknown, an
    #: older broker's record: the caller's is assumed); a caller of another reads ``day``
    #: as its own window holding that day's start
    day_offset: int = -1
    count: int = 0
    paused_until: int = 0
    pause_reason: str = ""
    parked_until: int = 0
    park_reason: str = ""
    probing_until: int = 0
    last_429: int = 0
    epoch: str = ""
    processes: dict[str, int] = field(default_factory=dict)
    #: the ceiling-aware controller's memory (see broker/ratecontrol.py): the throttled
    #: rate while recovering, the probe-wait multiplier, "still coming down", and the
    #: times of the last two cuts (µs)
    rc_top: float = 0.0
    rc_level: float = 1.0
    rc_descending: bool = False
    rc_recent: list[int] = field(default_factory=list)
    #: the daily limit the key keeps to: the lowest one asked with recently (-1: none)
    day_cap: int = -1
    #: when a process with that daily limit last asked (µs)
    day_cap_seen: int = 0
    #: 429s in a row for the key, over every process: an answer by any process, or a gap of
    #: RUN_GAP_S, ends the run (each process's classifier reads it, so N processes on a key
    #: whose quota is spent need one streak of 429s between them, not one each)
    run_429s: int = 0
    #: the record's generation (the store time it was started afresh at and the process that
    #: asked then, as text), the sends granted in the day since then, and whether a park was
    #: lifted or Amazon answered since then: a process whose mark names another generation
    #: saw the key before it was lost, and its count plus the sends since is a floor of the
    #: day's, its park stands unless one was lifted or Amazon answered
    gen: str = ""
    gen_sends: int = 0
    gen_unparked: bool = False
    #: the most sends granted in each earlier generation of the day (by its name) that a
    #: mark has told of: sends of disjoint generations, so their sum plus ``gen_sends`` is a
    #: floor of the day's count even when no one process saw every generation (two losses)
    prior: dict[str, int] = field(default_factory=dict)
    #: the sends each process was granted in the day (by process id), the most it told or
    #: was granted here: their sum is a floor of the day's count that survives any number
    #: of losses, once each live process has asked again (at most OWN_KEEP kept)
    own: dict[str, int] = field(default_factory=dict)
    #: when a process last told of an answer of the key (wall clock, µs; 0: never): a key
    #: answered in the asking process's daily window has access, so that process's sustained
    #: 429s at the floor mean the day's quota is spent, not access revoked. A time, not a
    #: day number: processes of two daily resets read it each in their own window.
    answered_at: int = 0

    def to_json(self) -> dict[str, object]:
        """The record as a JSON-able mapping."""
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_json(cls, data: object) -> Record:
        """Rebuild a record written by :meth:`to_json` (unknown fields are ignored).

        Raises:
            ValueError: ``data`` is not such a record: not an object, or a field of the
                wrong type (a damaged row must not fail later, inside a decision).
        """
        if not isinstance(data, dict):
            raise ValueError(f"not a key record but {type(data).__name__}")
        # Another version of the broker may have written more fields: keep those known here.
        known = {k: v for k, v in data.items() if k in cls.__slots__}
        fresh = cls()
        for name, value in known.items():
            if not _same_kind(value, getattr(fresh, name)):
                raise ValueError(f"field {name!r} is {value!r}")
        return cls(**known)


def _same_kind(value: object, default: object) -> bool:
    """True when ``value`` may stand in a field whose default is ``default`` (an int for a
    float; never a bool for a number)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, dict):
        return isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in value.items()
        )
    if isinstance(default, list):
        return isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
    return type(value) is type(default)


def _agree(record: Record, now: int, limits: KeyLimits, *, asking: bool) -> KeyLimits:
    """The limits the key paces by when processes' configs differ (a rolling change of tps).

    The lowest configured rate asked with in the last ``PROCESS_RECENT_S`` wins: a lower
    one takes over at once (and resets the rate to it), a higher one only once no process
    with the lower one has asked for that long. Without this each process reset the shared
    rate to its own on every call, so the key swung between the two. A caller with a higher
    rate paces by the agreed one, its ceiling scaled alike. ``asking``: a process asks (a
    view neither takes over nor counts as seen).
    """
    mine = limits.nominal_rate
    agreed = record.nominal
    stale = now - record.nominal_seen > int(PROCESS_RECENT_S * _US)
    # Equal rates never take over: that would throw the learnt (cut) rate away.
    if agreed <= 0 or (asking and (mine < agreed or (stale and mine != agreed))):
        record.nominal = record.rate = mine
        agreed = mine
    if agreed == mine:
        if asking:
            record.nominal_seen = now
        return limits
    return replace(
        limits,
        nominal_rate=agreed,
        min_rate=min(limits.min_rate, agreed),
        max_rate=limits.max_rate * agreed / mine,
    )


def _agree_day(
    record: Record, now: int, day_limit: int | None, *, asking: bool, viewing: bool = False
) -> int | None:
    """The daily limit the key keeps to when processes' configs differ (a rolling change
    of tpd): the lowest limit of the processes that asked in the last ``PROCESS_RECENT_S``
    (each one's limit is part of its entry, :func:`process_entry`), so a process configured
    higher (or unlimited) cannot spend the account's quota past what another live process's
    config says it is, and a lower limit leaves with its process when that one closes.

    ``day_cap`` is still written, for older brokers sharing the key (they read only it),
    and still read while one asked with it in that minute: an older broker keeps its limit
    there, not in its entry, and a process of this version with no limit of its own (or a
    higher one) overspent the day past it. A process of this version leaving with the cap's
    limit takes it along (:func:`decide`), as it does its entry.

    ``viewing`` (``broker status``, which sends nothing): the limit of the processes using
    the key, and ``day_limit`` only when none asked in that minute. A lower one of the
    viewer's own showed the key waiting for its quota while a process sent on it.
    """
    recent = int(PROCESS_RECENT_S * _US)
    if asking and day_limit is not None:
        stale = now - record.day_cap_seen > recent
        if (
            record.day_cap < 0
            or day_limit < record.day_cap
            or (stale and day_limit != record.day_cap)
        ):
            record.day_cap = day_limit
        if day_limit == record.day_cap:
            record.day_cap_seen = now
    since = now - recent
    # The lowest of the limits below, in a plain loop (no list per decision).
    lowest = None if viewing else day_limit
    live = False
    for entry, seen in record.processes.items():
        if seen < since:
            continue
        live = True
        if (limit := entry.rpartition(_LIMIT_MARK)[2]).isdigit():
            cap = int(limit)
            if lowest is None or cap < lowest:
                lowest = cap
    if record.day_cap >= 0 and now - record.day_cap_seen <= recent:
        live = True
        cap = record.day_cap
        if lowest is None or cap < lowest:
            lowest = cap
    return day_limit if viewing and not live else lowest


def process_entry(process: ProcessMark, day_limit: int | None, reset_offset_s: int = 0) -> str:
    """How a process is entered among the key's processes: its id, its daily reset (s after
    00:00 UTC) and its daily limit when it has one (``host:pid:nonce~0|8640``): the key
    keeps to the lowest limit, and to the window of a reset a live process counts under."""
    entry = f"{process.process_id}{_OFFSET_MARK}{reset_offset_s}"
    return entry if day_limit is None else f"{entry}{_LIMIT_MARK}{day_limit}"


def _process_id(entry: str) -> str:
    """The process id of an entry among the key's processes (:func:`process_entry`)."""
    return entry.split(_OFFSET_MARK, 1)[0].split(_LIMIT_MARK, 1)[0]


#: Before a process's daily limit in its entry (an id never holds one).
_LIMIT_MARK: Final = "|"
#: Before a process's daily reset in its entry (an id never holds one: its host name
#: cannot); an older broker's entry has none.
_OFFSET_MARK: Final = "~"


def _held_by_another(record: Record, now: int, asker: str) -> bool:
    """True when a process other than ``asker`` that asked in the last ``PROCESS_RECENT_S``
    counts the day under the reset the record's day was counted under (its entry's)."""
    since = now - int(PROCESS_RECENT_S * _US)
    for entry, seen in record.processes.items():
        if seen < since:
            continue
        who, mark, rest = entry.partition(_LIMIT_MARK)[0].rpartition(_OFFSET_MARK)
        if mark and who != asker and rest.isdigit() and int(rest) == record.day_offset:
            return True
    return False


def _tell_prior(record: Record, gen: str, sends: int) -> None:
    """Keep ``sends`` as generation ``gen``'s in ``record.prior`` if it is more than known."""
    if sends > record.prior.get(gen, 0):
        _keep_most(record.prior, gen, sends, PRIOR_KEEP)


def _keep_most(counts: dict[str, int], name: str, value: int, keep: int) -> None:
    """Set ``counts[name] = value``, then drop the smallest entry (the first name of equals:
    decide.lua drops the same one) while more than ``keep`` are kept."""
    counts[name] = value
    while len(counts) > keep:
        del counts[min(counts, key=lambda n: (counts[n], n))]


def _new_day(record: Record, day: int) -> None:
    """Begin window ``day`` in ``record``: the last one's counts go (decide.lua: new_day)."""
    record.day = day
    record.count = record.gen_sends = 0
    record.prior = {}
    record.own = {}


def _day_start(record: Record, window_end: int) -> int:
    """When the day counted began (µs, wall): under the reset it was counted under, which
    another process's changed ``daily_reset_utc`` may make shorter than the 24 h before the
    asker's window end; an older broker's record (offset unknown): 24 h before that end."""
    if record.day >= 0 and record.day_offset >= 0:
        return day_end_us(record.day - 1, record.day_offset)
    return window_end - _DAY_US


def _run_over(record: Record, now: int) -> bool:
    """True once the key's last 429 is more than ``RUN_GAP_S`` old: its run of 429s ended."""
    return now - record.last_429 > RUN_GAP_S * _US


def _clamp(rate: float, limits: KeyLimits) -> float:
    return min(limits.max_rate, max(limits.min_rate, rate))


def _apply_feedback(record: Record, now: int, limits: KeyLimits, feedback: Feedback) -> bool:
    cut = False
    if feedback.set_rate is not None and feedback.set_rate > 0 and math.isfinite(feedback.set_rate):
        record.rate = _clamp(feedback.set_rate, limits)
    tuning = limits.tuning
    state = _recovery(record) if tuning is not None else None
    for _ in range(feedback.successes):
        gain = limits.increase * record.boost
        if state is not None and tuning is not None:
            record.rate = recovered_rate(
                state,
                record.rate,
                now / _US,
                nominal=limits.nominal_rate,
                max_rate=limits.max_rate,
                gain=gain,
                discover=limits.max_rate > limits.nominal_rate,
                tuning=tuning,
            )
        else:
            record.rate = min(limits.max_rate, record.rate * math.exp(gain))
        record.streak += 1
        if record.streak % limits.boost_every == 0:
            record.boost = min(limits.max_boost, record.boost * 2.0)
    if feedback.answered:
        record.run_429s = 0
        # Amazon answered since the record started afresh: a park from before is over.
        record.gen_unparked = True
    if feedback.run_429s:
        if _run_over(record, now):
            record.run_429s = 0
        record.run_429s += feedback.run_429s
    # One cut per round: a 429 of a send decided before the last cut was paced at the old
    # rate and says nothing new. But a long run with no success anywhere is no rate round
    # (a quota spent): processes that booked their slots ahead would keep the key near its
    # old rate, round after round, so past RUN_CUTS_FROM every 429 cuts.
    # Judged per 429: the i-th of n reported is the run's (run - (n - 1 - i))-th, so a
    # report that carries the run past the mark cuts only for the 429s past it.
    count = len(feedback.throttled)
    for index, sent_at in enumerate(feedback.throttled):
        long_run = record.run_429s - (count - 1 - index) >= RUN_CUTS_FROM
        record.streak = 0
        record.boost = 1.0
        record.last_429 = now
        if sent_at > record.cut_at or long_run:
            if state is not None and tuning is not None:
                lowered = cut_rate(
                    state, record.rate, now / _US, max_rate=limits.max_rate, tuning=tuning
                )
            else:
                lowered = record.rate * (1.0 - limits.beta)
            record.rate = max(limits.min_rate, lowered)
            record.cut_at = now
            record.cuts += 1
            cut = True
    if feedback.pause_s > 0:
        until = now + int(feedback.pause_s * _US)
        if until > record.paused_until:
            record.paused_until = until
            record.pause_reason = feedback.pause_reason
    if feedback.unpark:
        if record.parked_until:
            record.rate = limits.nominal_rate
            record.cut_at = now
            if state is not None:
                state.reset(now / _US)
            record.boost = 1.0
            record.streak = 0
            record.gen_unparked = True
        record.parked_until = 0
        record.park_reason = ""
        record.probing_until = 0
    if feedback.release_probe_us and record.probing_until == feedback.release_probe_us:
        record.probing_until = now + int(feedback.probe_again_s * _US)
    if feedback.park_s > 0 and not (record.parked_until > now and record.probing_until == 0):
        # A key already parked and not yet probing keeps its park: late 429s of requests sent
        # before it must not stretch it. A failed probe (probing) parks it again.
        record.parked_until = now + int(feedback.park_s * _US)
        record.park_reason = feedback.park_reason
        record.probing_until = 0
    if state is not None:
        _keep(record, state)
    return cut


def _recovery(record: Record) -> RecoveryState:
    """The controller's memory as kept in ``record`` (times in seconds on the store's clock)."""
    return RecoveryState(
        last_cut=record.cut_at / _US if record.cut_at else -math.inf,
        top=record.rc_top,
        probe_level=record.rc_level,
        descending=record.rc_descending,
        # (No comprehension, a call of its own, for the usual empty list.)
        recent=[t / _US for t in record.rc_recent] if record.rc_recent else [],
    )


def _keep(record: Record, state: RecoveryState) -> None:
    record.rc_top = state.top
    record.rc_level = state.probe_level
    record.rc_descending = state.descending
    record.rc_recent = [int(t * _US) for t in state.recent] if state.recent else []


def decide(
    record: Record,
    now: int,
    limits: KeyLimits,
    *,
    feedback: Feedback,
    reserve: bool,
    process: ProcessMark | None,
    wall: int | None = None,
    epoch: str = "",
    view: bool = False,
) -> Decision:
    """Apply ``feedback`` to ``record`` and, if ``reserve``, reserve a send; mutate and answer.

    Args:
        record: the key's state (a fresh ``Record()`` for a key never seen or lost).
        now: the store's clock for slots, pauses and parks, µs (monotonic for local homes).
        limits: the caller's limits for the key.
        feedback: what the caller learnt since its last call.
        reserve: reserve a slot and count it (else only apply feedback and report).
        process: who asks (registered as seen, and its high-water mark applied), or None.
            With ``feedback.leaving`` it is closing: it is no longer counted, and its
            daily limit no longer holds for the others.
        wall: the wall clock in µs, for the daily window (default: ``now``).
        epoch: names the era of ``now`` (the machine's boot id for a monotonic clock); a
            record from another era has its times dropped, as they mean nothing now.
        view: ``broker status`` reads the key (nothing reserved, no process): the daily
            limit told is the one of the processes using the key, ``limits``' only when
            none does.
    """
    if record.epoch != epoch:
        record.epoch = epoch
        record.next_slot = record.cut_at = record.paused_until = 0
        record.rc_recent = []
        record.parked_until = record.probing_until = record.last_429 = 0
        record.pause_reason = record.park_reason = ""
        record.processes = {}
        record.nominal_seen = record.day_cap_seen = 0
    asking = process is not None and not feedback.leaving
    entry = (
        None if process is None else process_entry(process, limits.day_limit, limits.reset_offset_s)
    )
    if entry is not None and feedback.leaving:
        # Its daily limit leaves with it (a tpd raised for the next run); a process of
        # this version still asking with it keeps it in its own entry.
        last = record.processes.pop(entry, None)
        if limits.day_limit == record.day_cap and last is not None and record.day_cap_seen <= last:
            # The cap is its own unless an older broker asked with it since.
            record.day_cap_seen = 0
    # A rate is never stored as 0: a record without one is new, or lost (Redis restarted
    # empty), and is rebuilt from what the asking process saw last (ProcessMark), and from
    # what each process that saw it before tells when it asks (a mark of an older
    # generation): the first to ask after a loss is seldom the one that saw the most.
    lost = record.rate <= 0
    if lost:
        # Named by when and by whom: two losses never get one name.
        asker = "" if process is None else process.process_id
        record.gen, record.gen_sends, record.gen_unparked = f"{now}:{asker}", 0, False
    # A record without a generation was last written by an older broker, which keeps none:
    # nothing tells whether a mark is from before a loss, so none is taken to be.
    before = process is not None and record.gen != "" and process.gen != record.gen
    limits = _agree(record, now, limits, asking=asking)
    day_limit = _agree_day(record, now, limits.day_limit, asking=asking, viewing=view)
    if process is not None:
        if lost and process.rate > 0:
            record.rate = process.rate
        if (
            before
            and not record.gen_unparked
            and process.parked_until_us > max(now, record.parked_until)
        ):
            # Parked before the loss (Amazon's day spent): a probe since would have lifted
            # it, and none did.
            record.parked_until = process.parked_until_us
            record.park_reason = process.park_reason
    if record.rate <= 0:
        record.rate = limits.nominal_rate
    record.rate = _clamp(record.rate, limits)
    if wall is None:
        wall = now
    offset = limits.reset_offset_s
    # Another live process counts the day under another reset (two configs differ): its
    # window holds for this caller too, and starts over only at its own reset. Each
    # starting the day over at its own reset gave the key twice its quota a day. Its
    # entry leaves with it (a clean close at once; a kill a minute after its last ask).
    other_reset = record.day >= 0 and record.day_offset >= 0 and record.day_offset != offset
    kept = other_reset and _held_by_another(
        record, now, "" if process is None else process.process_id
    )
    # The day counted, as this caller's window holding its start: the same day under the
    # same reset; under another (daily_reset_utc changed) it ends at this caller's next
    # reset after its start, not a day after that (a reset moved later held a spent key
    # some 24 h too long). The record keeps the offset it was counted under, so two
    # processes of different resets never shift it back and forth.
    counted = record.day
    taken_over = -1
    if other_reset:
        counted = day_number(day_end_us(record.day - 1, record.day_offset), offset)
    if kept:
        held = day_number(wall, record.day_offset)
        if held > record.day:
            _new_day(record, held)
            counted = day_number(day_end_us(held - 1, record.day_offset), offset)
        window_end = day_end_us(record.day, record.day_offset)
    else:
        day = day_number(wall, offset)
        if day > counted:
            if other_reset:
                # A new day at this caller's reset, over one counted under another: said
                # (processes of two resets taking turns get the key's quota twice a day).
                taken_over = record.day_offset
            counted = day
            _new_day(record, day)
            record.day_offset = offset
        window_end = day_end_us(counted, offset)
    if process is not None:
        if process.hwm_day == counted:
            # A mark from before the loss knew nothing of the sends granted since: they come
            # on top (taking the larger of the two lost every send a lower mark was granted).
            seen = process.hwm_count + (record.gen_sends if before else 0)
            if before and process.gen:
                # And the sends of its generation join those of the other generations told
                # of: after two losses, neither a mark of the first nor one of the second
                # knows of the other's.
                _tell_prior(record, process.gen, process.gen_sends)
                seen = max(seen, sum(record.prior.values()) + record.gen_sends)
            if process.own_sends > record.own.get(process.process_id, 0):
                # What this process was granted today, as it saw it: a loss forgot it.
                _keep_most(record.own, process.process_id, process.own_sends, OWN_KEEP)
                seen = max(seen, sum(record.own.values()))
            if seen > record.count:
                record.count = seen
        if asking and entry is not None:
            record.processes[entry] = now
        horizon = now - int(PROCESS_KEEP_S * _US)
        # Rebuilt only when an entry is that old: the map is read every decision and seldom
        # has one to drop.
        for seen in record.processes.values():
            if seen < horizon:
                record.processes = {p: t for p, t in record.processes.items() if t >= horizon}
                break
    cut = _apply_feedback(record, now, limits, feedback)
    if feedback.answered:
        record.answered_at = wall
    interval = max(1, round(_US / record.rate))
    horizon_us = int(limits.horizon_s * _US)
    # A wall clock stepped back must not hold the key for the size of the step.
    record.next_slot = min(record.next_slot, now + horizon_us + interval)

    granted = False
    probe = False
    refusal: str | None = None
    wait_us = 0
    slot = 0
    if reserve:
        base = record.next_slot if record.next_slot >= now - slack_us(interval) else now
        candidate = max(base, record.paused_until)
        if record.parked_until and now < record.parked_until:
            refusal, wait_us = "parked", record.parked_until - now
        elif record.parked_until and record.probing_until > now:
            refusal, wait_us = "probing", record.probing_until - now
        elif day_limit is not None and record.count >= day_limit:
            refusal = "daily quota"
            wait_us = window_end - wall
        elif candidate - now > horizon_us:
            refusal, wait_us = "horizon", candidate - now - horizon_us
        else:
            granted = True
            slot = candidate
            wait_us = max(0, slot - now)
            record.next_slot = slot + interval
            record.count += 1
            record.gen_sends += 1
            if process is not None:
                _keep_most(
                    record.own,
                    process.process_id,
                    record.own.get(process.process_id, 0) + 1,
                    OWN_KEEP,
                )
            if record.parked_until:
                probe = True
                record.probing_until = now + int(limits.probe_lease_s * _US)
    recent = now - int(PROCESS_RECENT_S * _US)
    # Processes, not entries: one process enters once per daily limit it keeps (two
    # [[keys]] entries of one credential, each with its tpd). Only broker status reads the
    # figure: a send gets the entries' count, as from decide.lua.
    recent_entries = [entry for entry, seen in record.processes.items() if seen >= recent]
    live = len({_process_id(e) for e in recent_entries}) if view else len(recent_entries)
    return Decision(
        granted=granted,
        wait_s=max(0, wait_us) / _US,
        refusal=refusal,
        probe=probe,
        now_us=now,
        slot_us=slot,
        next_slot_us=max(record.next_slot, record.paused_until),
        rate=record.rate,
        day=counted,
        count=record.count,
        paused_until_us=record.paused_until if record.paused_until > now else 0,
        pause_reason=record.pause_reason if record.paused_until > now else "",
        parked_until_us=record.parked_until,
        park_reason=record.park_reason,
        last_429_us=record.last_429,
        cut=cut,
        processes=live,
        wall_us=wall,
        day_limit=day_limit,
        # A run the gap has ended reads as none, as the next 429 will find it.
        run_429s=0 if _run_over(record, now) else record.run_429s,
        gen=record.gen,
        window_end_us=window_end,
        gen_sends=record.gen_sends,
        day_taken_over_s=taken_over,
        answered_today=0 < _day_start(record, window_end) <= record.answered_at,
    )
