"""A key's pacing, daily count, adaptive rate and circuit kept in a shared ``KeyStateStore``.

:class:`SharedKeyLimiter` is a :class:`broker.engine.limiter.KeyLimiter` whose state lives
in a :mod:`broker.state` store, so every process (and, with Redis, every machine) using a
key paces, counts and adapts as one:

- ``commit()`` is the one atomic decision per send: the store applies this process's
  pending feedback, reserves ``max(now, next slot, paused until)``, counts the day and
  answers how long to wait; the limiter sleeps that long and returns. One store call (one
  Redis round trip) per send. A refusal that will not clear soon (daily quota spent, key
  parked by any process, another process probing) raises :class:`SendRefused`, so the
  dispatcher puts its batch back; ``wait_ready()`` then sleeps until the store said to ask
  again. A slot beyond the horizon is waited for and asked again inside ``commit``,
  unless a pause puts it there: that is refused too, so the batch goes back to the queue.
- ``wait_ready()`` makes no store call in the steady state: it sleeps until shortly before
  the next slot the last answer named (half an interval, at most 100 ms), so ``commit``
  books the slot ahead and a late wake-up does not shift the key's grid. The store is the
  judge; the estimate only saves round trips.
- Feedback (demand-limited successes, 429s with their send slot, Retry-After and outage
  pauses, parks and unparks, an operator's rate) is queued and rides on the next decision;
  pauses, parks and 429s are also flushed at once in the background so other processes
  stop promptly. A 429 cuts the shared rate only if its request was sent after the last
  cut, so N processes seeing one round of 429s cut once, not N times.
- Store unreachable (Redis down): nothing is sent. ``commit`` and ``wait_ready`` retry with
  a growing interval (up to 10 s); ``blocked_reason`` says why, for ``/readyz``. Pending
  feedback is kept and applied when the store is back.

:class:`SharedAdaptiveRate` and :class:`SharedCircuit` keep the engine's classifier and
circuit interfaces, but write their decisions (cuts, increases, parks, unparks) to the
shared store through the limiter; :func:`shared_key_parts` builds the three for one key.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from broker.engine.adaptive import (
    AdaptiveRate,
    AdaptiveSettings,
    Circuit,
    CircuitState,
    ThrottleVerdict,
)
from broker.engine.quota import day_limit
from broker.errors import ConfigError, StateUnavailableError
from broker.logs import get_logger
from broker.redisfaults import cancel_kept
from broker.state import (
    PROCESS_RECENT_S,
    Decision,
    Feedback,
    KeyLimits,
    KeyStateStore,
    ProcessMark,
    StateKey,
    day_number,
)

if TYPE_CHECKING:
    from broker.clock import Clock
    from broker.config import BrokerConfig, KeyConfig

__all__ = [
    "SendRefused",
    "SharedAdaptiveRate",
    "SharedCircuit",
    "SharedKeyLimiter",
    "SharedState",
    "account_day_limit",
    "key_limits",
    "shared_key_parts",
]

logger = get_logger("broker")

_US = 1_000_000
#: A key held (parked, idle) re-asks the store at least this often. Each ask carries this
#: process's high-water mark of the day's count and its park, so a Redis that restarted
#: empty learns them again within this time from any process still waiting (a cheap call).
_RECHECK_S = 30.0
#: ...and this often while its daily quota holds it: a store that lost the day (Redis
#: restarted empty, the SQLite file deleted) learns the spent count back within this time,
#: or a process started meanwhile sent for as long (a hunt's newcomer: 20 requests past the
#: day in 30 s); and a hold by another process's lower tpd (a ``broker lookup`` with a lower
#: one) goes the moment that process closes: a running job must not sit idle long after.
_QUOTA_RECHECK_S = 2.0

#: How long closing waits for the store (its last feedback and the leave mark), seconds.
_CLOSE_S = 1.0
#: Retry interval while the store is unreachable: doubling from the first to the cap.
_UNAVAILABLE_FIRST_S = 0.5
_UNAVAILABLE_CAP_S = 10.0
#: How many recent sends remember when (store time) their slot was decided: a 429 cuts only
#: if that was after the last cut, since slots decided before it were spaced at the old rate.
_REMEMBERED_SENDS = 256
#: How early wait_ready returns before the expected slot, at most (half an interval below).
_LEAD_S = 0.1
#: A probe that met a 429 parks the key again for this long.
_REPARK_S = 900.0


class SendRefused(RuntimeError):
    """The store refused the send (daily quota, parked, probing): put the batch back.

    Raised by :meth:`SharedKeyLimiter.commit` when another process spent the day's last
    request or parked the key between ``wait_ready`` and ``commit``.
    """

    def __init__(self, refusal: str, wait_s: float) -> None:
        self.refusal = refusal
        self.wait_s = wait_s
        super().__init__(f"send refused by the key-state store: {refusal}")


@dataclass(frozen=True, slots=True)
class SharedState:
    """What a broker needs to put its keys' state in a store.

    Attributes:
        store: the opened store.
        endpoint: the API endpoint's identity (base URL, or ``amazon:<protocol>``): with
            the credential id it makes the key's :class:`broker.state.StateKey`.
        process_id: this process run's id (``broker.state.process_id()``).
    """

    store: KeyStateStore
    endpoint: str
    process_id: str


def key_limits(key: KeyConfig, config: BrokerConfig, settings: AdaptiveSettings) -> KeyLimits:
    """The store's view of ``key``: rates, daily limit and adaptive tuning from the config."""
    max_rate = key.tps * (settings.discover_factor if settings.discover else 1.0)
    return KeyLimits(
        nominal_rate=key.tps,
        min_rate=min(settings.min_rate_per_s, key.tps),
        max_rate=max_rate,
        day_limit=day_limit(key.tpd, config.rate.tpd_guard),
        tpd=key.tpd,
        reset_offset_s=config.rate.daily_reset_s,
        beta=settings.beta,
        increase=settings.increase_per_success,
        boost_every=settings.boost_every,
        max_boost=settings.max_boost,
        tuning=settings.tuning(),
    )


class SharedKeyLimiter:
    """The :class:`broker.engine.limiter.KeyLimiter` of one key, backed by a shared store.

    Args:
        clock: the engine's clock (sleeping, and mapping sends to store time).
        store: where the key's state lives.
        key: the key's identity in the store.
        limits: the key's limits and tuning.
        process_id: this process run's id.
        give_up_after_s: how long the store may stay unreachable before a send gives up
            with :class:`~broker.errors.StateUnavailableError` (the outage budget): a key
            never sends without its shared state, and a run must not wait for it forever.
        sibling_day_limits: the daily limits of this process's other keys on the same
            account (two config entries naming one credential): theirs hold the key as
            this one's own does, until the reset.
    """

    def __init__(
        self,
        clock: Clock,
        store: KeyStateStore,
        key: StateKey,
        limits: KeyLimits,
        *,
        process_id: str,
        give_up_after_s: float = math.inf,
        sibling_day_limits: Sequence[int | None] = (),
    ) -> None:
        self._give_up_after_s = give_up_after_s
        # The lowest daily limit this process itself keeps the key to (None: unlimited).
        self._own_day_limit = min(
            (limit for limit in (limits.day_limit, *sibling_day_limits) if limit is not None),
            default=None,
        )
        self._unavailable_since: float | None = None
        self._clock = clock
        self._store = store
        self._key = key
        self._limits = limits
        self._process_id = process_id
        self._last: Decision | None = None
        # A wait must ask the store before it trusts the last answer again (a hold or a long
        # wait ended). The answer itself is kept meanwhile: the key's figures (metrics,
        # /readyz, progress) read it until a new one comes, not the config's nominal ones.
        self._ask_again = False
        # store seconds minus local monotonic seconds, from the last answer
        self._offset = 0.0
        # the store's wall seconds minus local monotonic seconds (None: no answer yet); the
        # day is the store's, so a process whose wall clock is wrong still counts it right
        self._wall_offset: float | None = None
        # when this process last asked the store (monotonic), for keep_alive
        self._asked_at = clock.monotonic()
        #: when the last call the store failed (out of reach) ended
        self._failed_at = -math.inf
        #: when the last call work waited on failed, and the first such call of the
        #: current outage began (the keep-alive's beats count for neither)
        self._work_failed_at = -math.inf
        self._outage_began = -math.inf
        # broker.state_refused was logged (a store refusing this config, said once)
        self._refusal_said = False
        self._hold_until = -math.inf
        self._hwm_day = -1
        self._hwm_count = 0
        # The key record's generation in the store's latest answer, and that answer's time.
        self._gen = ""
        self._gen_at = -1
        # The sends granted in that generation, as of that answer.
        self._gen_sends = 0
        # The sends the store granted this process in the day ``_hwm_day``.
        self._own_sends = 0
        self._successes = 0
        self._throttled: list[int] = []
        # A success since the last call (the key's run of 429s is over), and the 429s since
        # this process's last success, not yet reported.
        self._answered = False
        self._run_429s = 0
        self._pause_s = 0.0
        self._pause_reason = ""
        self._park_s = 0.0
        self._park_reason = ""
        self._unpark = False
        self._set_rate: float | None = None
        self._release_probe_us = 0
        self._probe_again_s = 0.0
        # The lease end (store µs) of the parked key's probe this process holds; 0: none.
        self._probe_lease_us = 0
        self._sends: OrderedDict[float, tuple[int, bool]] = OrderedDict()
        self._refusal_listeners: list[Callable[[str, float], None]] = []
        self._unavailable: StateUnavailableError | None = None
        self._unavailable_failures = 0
        self._flusher: asyncio.Task[None] | None = None
        # Set by aclose: the last call tells the store this process leaves.
        self._leaving = False

    # -- the store ----------------------------------------------------------------------------

    @property
    def key(self) -> StateKey:
        """The key's identity in the store."""
        return self._key

    @property
    def limits(self) -> KeyLimits:
        """The key's limits as the store sees them."""
        return self._limits

    @property
    def last_decision(self) -> Decision | None:
        """The store's last answer (``None`` before the first)."""
        return self._last

    def add_refusal_listener(self, listener: Callable[[str, float], None]) -> None:
        """Call ``listener(refusal, wait_s)`` whenever the store refuses a send, or
        :meth:`wait_ready` finds the day spent (refusal ``"quota"``)."""
        self._refusal_listeners.append(listener)

    @property
    def blocked_reason(self) -> str | None:
        """Why the key cannot send because of its state store (``None``: it can)."""
        if self._unavailable is None:
            return None
        return str(self._unavailable)

    def _take_feedback(self) -> Feedback:
        feedback = Feedback(
            successes=self._successes,
            throttled=tuple(self._throttled),
            pause_s=self._pause_s,
            pause_reason=self._pause_reason,
            park_s=self._park_s,
            park_reason=self._park_reason,
            unpark=self._unpark,
            set_rate=self._set_rate,
            release_probe_us=self._release_probe_us,
            probe_again_s=self._probe_again_s,
            leaving=self._leaving,
            answered=self._answered,
            run_429s=self._run_429s,
        )
        self._successes = 0
        self._throttled = []
        self._answered = False
        self._run_429s = 0
        self._pause_s = 0.0
        self._pause_reason = ""
        self._park_s = 0.0
        self._park_reason = ""
        self._unpark = False
        self._set_rate = None
        self._release_probe_us = 0
        self._probe_again_s = 0.0
        return feedback

    def _restore_feedback(self, feedback: Feedback) -> None:
        self._successes += feedback.successes
        self._throttled = list(feedback.throttled) + self._throttled
        if not self._answered:
            # No success since: the run goes on from the restored one.
            self._answered = feedback.answered
            self._run_429s += feedback.run_429s
        if feedback.pause_s > self._pause_s:
            self._pause_s, self._pause_reason = feedback.pause_s, feedback.pause_reason
        if feedback.park_s > self._park_s:
            self._park_s, self._park_reason = feedback.park_s, feedback.park_reason
        self._unpark = self._unpark or feedback.unpark
        if self._set_rate is None:
            self._set_rate = feedback.set_rate
        if not self._release_probe_us:
            self._release_probe_us = feedback.release_probe_us
            self._probe_again_s = feedback.probe_again_s

    async def _call(self, *, reserve: bool, for_work: bool = True) -> Decision:
        """Ask the store; ``for_work``: work waits on the answer (a send, a wait, the open's
        first ask), not the keep-alive's beat or a feedback flush."""
        asked = self._asked_at = self._clock.monotonic()
        feedback = self._take_feedback()
        # What the process saw of the key goes in its mark (a store that lost it rebuilds
        # from it).
        seen = self._last
        mark = ProcessMark(
            self._process_id,
            self._hwm_day,
            self._hwm_count,
            rate=0.0 if seen is None else seen.rate,
            parked_until_us=0 if seen is None else seen.parked_until_us,
            park_reason="" if seen is None else seen.park_reason,
            gen=self._gen,
            gen_sends=self._gen_sends,
            own_sends=self._own_sends,
        )
        try:
            with cancel_kept():
                decision = await self._store.decide(
                    self._key, self._limits, feedback=feedback, reserve=reserve, process=mark
                )
        except StateUnavailableError as exc:
            self._restore_feedback(feedback)
            if self._unavailable is None:
                logger.error(
                    "broker.state_unavailable",
                    key=self._key.name,
                    backend=exc.backend,
                    reason=exc.reason,
                )
            if for_work:
                # The first failing ask of work waiting on the store, if the last was long
                # ago or the store answered since: what the outage budget counts from.
                if self._unavailable is None or asked - self._work_failed_at > _RECHECK_S:
                    self._outage_began = asked
                else:
                    self._outage_began = min(self._outage_began, asked)
            self._unavailable = exc
            self._unavailable_failures += 1
            self._failed_at = self._clock.monotonic()
            if for_work:
                self._work_failed_at = self._failed_at
            raise
        except Exception:
            # Any other store failure (a full disk, a refused password) keeps it too; not a
            # cancel, after which the store may have applied it already.
            self._restore_feedback(feedback)
            raise
        if self._unavailable is not None:
            logger.info("broker.state_restored", key=self._key.name, backend=self._store.backend)
        self._unavailable = None
        self._unavailable_since = None
        self._unavailable_failures = 0
        # Whole µs, rounded up: a store on this process's own clock (truncated to the µs)
        # then maps its slots back to exactly the local instants they were taken from.
        local_us = self._clock.monotonic() * _US
        self._offset = math.ceil(decision.now_us - local_us) / _US
        self._wall_offset = (decision.wall_us - local_us) / _US
        self._last = decision
        if decision.now_us >= self._gen_at:
            # The record's generation as of the latest answer by the store's clock: two
            # calls that end out of order across a loss must not pair the old generation
            # with a count that already holds sends since (they would be added twice).
            self._gen, self._gen_at = decision.gen, decision.now_us
            self._gen_sends = decision.gen_sends
        if decision.day_taken_over_s >= 0:
            self._say_reset_differs(decision.day_taken_over_s)
        if decision.day > self._hwm_day:
            self._hwm_day, self._hwm_count = decision.day, decision.count
            self._own_sends = 0
        elif decision.day == self._hwm_day:
            self._hwm_count = max(self._hwm_count, decision.count)
        if decision.granted and decision.day == self._hwm_day:
            self._own_sends += 1
        if decision.cut:
            # One per cutting 429: at info a fleet would log about a line a second.
            logger.debug("broker.rate_cut", key=self._key.name, rate=round(decision.rate, 4))
        return decision

    def _say_reset_differs(self, other_s: int) -> None:
        """Warn that this process started the key's day at its reset over a day counted
        under another reset (``other_s``): a changed ``daily_reset_utc`` does so once, but
        processes of two resets taking turns on a key give it its quota twice a day."""
        logger.warning(
            "broker.daily_reset_differs",
            key=self._key.name,
            daily_reset_utc=_hhmm(self._limits.reset_offset_s),
            counted_under=_hhmm(other_s),
            note="a new day began at this process's daily reset over one counted under "
            "another; if processes with different [rate] daily_reset_utc take turns on this "
            "key, it may send up to twice its quota a day: give them one",
        )

    async def _wait_for_store(self, exc: StateUnavailableError, asked: float) -> None:
        """Sleep before asking the unreachable store again, or give up once it has been out
        of reach for ``give_up_after_s``; ``asked``: when the failed call began."""
        # Timed from the start of the call that failed before this outage's first wait (a
        # hung Redis fails a call only at its timeout, which then counted too), or from the
        # first failing ask of work in this outage when it began within the budget before
        # (the broker's first ask, at start): a hung Redis was waited out for twice the
        # budget. Not from the keep-alive's beats: work arriving at an outage an idle
        # process sat through gets its whole budget, as it would a minute later.
        now = self._clock.monotonic()
        if self._unavailable_since is None:
            since = min(now, asked)
            if asked - self._outage_began <= self._give_up_after_s:
                since = min(since, self._outage_began)
            self._unavailable_since = since
        left = self._give_up_after_s - (now - self._unavailable_since)
        if left <= 0:
            raise StateUnavailableError(
                exc.backend,
                f"{exc.reason}; still so after {self._give_up_after_s:g} s (the outage budget)",
            ) from exc
        # The last pause ends with the budget: the store is asked once more then, and the
        # wait gives up on time instead of a backoff step (up to 10 s) late.
        await self._clock.sleep(min(self._unavailable_pause(), left))

    def _unavailable_pause(self) -> float:
        return min(
            _UNAVAILABLE_CAP_S,
            _UNAVAILABLE_FIRST_S * 2.0 ** min(max(self._unavailable_failures - 1, 0), 10),
        )

    def _kick(self) -> None:
        """Send urgent feedback (a pause, a park, a 429) now instead of with the next send."""
        if self._flusher is not None and not self._flusher.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._flusher = loop.create_task(self._flush())

    async def _flush(self) -> None:
        """Best effort: tell the store what is pending, reserving nothing. On any failure
        the feedback is kept for the next decision and the failure logged; a send meets a
        lasting one itself, so nothing here ends the engine."""
        try:
            await self._call(reserve=False, for_work=False)
        except StateUnavailableError:
            pass  # logged by _call, once per outage
        except ConfigError as exc:
            # Not tried again in vain: the next send meets it and stops the engine (78).
            # Said once, so an idle daemon whose Redis password was rotated says so.
            if not self._refusal_said:
                self._refusal_said = True
                logger.error("broker.state_refused", key=self._key.name, error=str(exc))
        except Exception as exc:
            logger.warning(
                "broker.state_flush_failed",
                key=self._key.name,
                error=f"{type(exc).__name__}: {exc}",
            )

    async def keep_alive(self) -> None:
        """Run for the engine's life: ask the store (reserving nothing) whenever this process
        has not asked it for ``_RECHECK_S``: idle with no work, or parked; while the store is
        out of reach, at the outage's growing interval instead.

        Each ask carries this process's count of the day, so a Redis that restarted empty
        learns it again within that time even from a daemon with nothing to do, and marks
        the process as still using the key. A beat is best effort: whatever it meets (an
        unreachable store, a full disk, a refused password) is logged and asked again at the
        next beat, never ending the engine; a send meets a lasting failure itself.

        A store in this process's memory is never lost and shared with nobody: nothing to
        beat for, so this returns at once (and sets no timer a fake clock would jump to).
        """
        if self._store.backend == "memory":
            return
        if self._last is None:
            # At once, not a beat later: a daemon started idle with its store out of reach
            # says so (/readyz) within a socket timeout, instead of ready for half a minute.
            await self._flush()
        while True:
            # Out of reach, asked again at the outage's growing interval (up to 10 s): an
            # idle key would learn a beat late that the store is back (/readyz not ready).
            if self._unavailable is None:
                due = self._asked_at + _RECHECK_S
            else:
                # From the failed call's end: a hung Redis fails a call only at its timeout,
                # and from its start the next ask came at once, back to back.
                due = max(self._asked_at, self._failed_at) + self._unavailable_pause()
            now = self._clock.monotonic()
            if now < due:
                await self._clock.sleep(due - now)
                continue
            await self._flush()

    async def refresh(self) -> Decision:
        """Apply pending feedback and read the key's state, reserving nothing.

        Raises:
            StateUnavailableError: the store cannot be reached.
        """
        return await self._call(reserve=False)

    async def aclose(self) -> None:
        """Tell the store what is pending and that this process leaves (best effort), and
        stop the background flusher.

        Leaving lets a lower daily limit this process alone kept go at once (a tpd raised
        for the next run). Bounded by ``_CLOSE_S`` and skipped while the store is out of
        reach: a stop must not wait out an outage (two socket timeouts per key), which
        outlasted systemd's stop timeout; what is lost is at most this process's last
        feedback.
        """
        if self._unavailable is not None:
            if self._flusher is not None:
                self._flusher.cancel()
            return
        self._leaving = True
        try:
            async with asyncio.timeout(_CLOSE_S):
                if self._flusher is not None and not self._flusher.done():
                    await asyncio.gather(self._flusher, return_exceptions=True)
                await self._flush()
        except TimeoutError:
            if self._flusher is not None:
                self._flusher.cancel()

    # -- KeyLimiter ---------------------------------------------------------------------------

    def _local(self, store_us: int) -> float:
        return store_us / _US - self._offset

    async def wait_ready(self) -> None:
        """Wait until the key may send, by the store's last answer; no store call when fresh.

        While the store is unreachable this keeps asking it, with a growing interval, and
        returns only once it answers: a key never sends without its shared state.

        Raises:
            StateUnavailableError: the store stayed unreachable for ``give_up_after_s``.
        """
        while True:
            if self._last is None or self._ask_again or self._unavailable is not None:
                asked = self._clock.monotonic()
                try:
                    await self._call(reserve=False)
                except StateUnavailableError as exc:
                    await self._wait_for_store(exc, asked)
                    continue
                self._ask_again = False
            now = self._clock.monotonic()
            if self.exhausted and self._hold_until <= now:
                wait_s = self.quota_until().timestamp() - self._store_wall()
                self._hold_until = now + min(max(wait_s, 1e-3), _QUOTA_RECHECK_S)
                for listener in self._refusal_listeners:
                    listener("quota", wait_s)
            if self._hold_until > now:
                await self._clock.sleep(min(self._hold_until - now, _RECHECK_S))
                if self._clock.monotonic() >= self._hold_until:
                    self._hold_until = -math.inf
                    self._ask_again = True
                continue
            # Return a little before the slot: commit reserves it ahead and sleeps the exact
            # rest, so a late wake-up (a busy machine) delays one send, not the key's grid.
            due = self.next_ready() - min(0.5 / self.rate, _LEAD_S)
            if due <= now:
                return
            # Then look again: a pause or park may have come in while we slept. A long wait (a
            # park of 15 minutes or more) asks the store again every _RECHECK_S, as a spent
            # day does: another process may have lifted it, and each ask carries our count.
            if due - now > _RECHECK_S:
                await self._clock.sleep(_RECHECK_S)
                self._ask_again = True
                continue
            await self._clock.sleep(due - now)

    async def commit(self, booked: Callable[[], None] | None = None) -> float:
        """Reserve and count one send in the store, wait for its slot, return the send time.

        ``booked`` is called once the store has granted and counted the send, before the
        wait for its slot: from then on the send is paid for.

        Raises:
            SendRefused: the daily quota is spent, the key is parked or being probed by
                another process, or another process's pause reaches past the horizon: put
                the batch back and ``wait_ready`` again.
        """
        while True:
            asked = self._clock.monotonic()
            try:
                decision = await self._call(reserve=True)
            except StateUnavailableError as exc:
                await self._wait_for_store(exc, asked)
                continue
            if decision.granted:
                if booked is not None:
                    booked()
                if decision.wait_s > 0:
                    # One µs (the store's resolution) past the slot: the first send of a run
                    # went out up to a µs after its truncated slot, and a strict server
                    # (burst 1) refuses anything a hair before its own grid.
                    delay = decision.slot_us / _US - self._offset + 1e-6 - self._clock.monotonic()
                    await self._clock.sleep(max(delay, 0.0))
                sent_at = self._clock.monotonic()
                if decision.probe:
                    # As the store sets it: the probe's lease runs from its decision.
                    self._probe_lease_us = decision.now_us + int(self._limits.probe_lease_s * _US)
                self._sends[sent_at] = (decision.now_us, decision.probe)
                while len(self._sends) > _REMEMBERED_SENDS:
                    self._sends.popitem(last=False)
                return sent_at
            if decision.refusal == "horizon" and not self._paused_past_horizon(decision):
                # Other processes booked the slots up to the horizon: ours is a few
                # intervals away, waited for here.
                await self._clock.sleep(decision.wait_s)
                continue
            # A pause another process set (a Retry-After, up to 60 s) is refused like a
            # park: the batch goes back to the queue, where another key may send it, instead
            # of waiting out the pause in this key's hands.
            refusal = decision.refusal or "refused"
            wait_s, recheck_s = decision.wait_s, _RECHECK_S
            if refusal == "daily quota":
                wait_s = min(wait_s, self.quota_until().timestamp() - self._store_wall())
                recheck_s = _QUOTA_RECHECK_S
            self._hold_until = self._clock.monotonic() + min(max(wait_s, 0.0), recheck_s)
            for listener in self._refusal_listeners:
                listener(refusal, wait_s)
            raise SendRefused(refusal, wait_s)

    def _own_day_spent(self) -> bool:
        """True when this process's own daily limit for the key (its lowest entry's) is
        spent: the key waits for the reset, not for another process to close."""
        own = self._own_day_limit
        return own is not None and self.spent >= own

    def _paused_past_horizon(self, decision: Decision) -> bool:
        """True when a pause, not the other processes' bookings, keeps the slot past the
        horizon."""
        pause_us = decision.paused_until_us - decision.now_us
        return bool(decision.paused_until_us) and pause_us > self._limits.horizon_s * _US

    def parked(self) -> tuple[str, datetime] | None:
        """The park the store held at its last answer, set by any process: its reason and
        the UTC instant of its probe; ``None`` when the key is not parked (or it ran out)."""
        last = self._last
        if last is None or not last.parked_until_us:
            return None
        left_s = self._local(last.parked_until_us) - self._clock.monotonic()
        if left_s <= 0:
            return None
        return last.park_reason or "parked", self.wall_now() + timedelta(seconds=left_s)

    def wall_now(self) -> datetime:
        """The wall clock the key's times are told by: the store's (see ``_store_wall``),
        so a park's probe and the daily reset read alike on every machine."""
        return datetime.fromtimestamp(self._store_wall(), UTC)

    def next_ready(self) -> float:
        """Monotonic time the key can send next, by the last answer (``-inf``: ask now)."""
        if self._last is None:
            return -math.inf
        ready = max(self._local(self._last.next_slot_us), self._hold_until)
        if self._last.parked_until_us:
            ready = max(ready, self._local(self._last.parked_until_us))
        return ready

    def ready_now(self) -> bool:
        """True when the last answer says the key may send now."""
        return self._unavailable is None and self._clock.monotonic() >= self.next_ready()

    @property
    def rate(self) -> float:
        """The shared rate (the nominal rate before the first answer)."""
        return self._limits.nominal_rate if self._last is None else self._last.rate

    def set_rate(self, rate_per_s: float) -> None:
        """Set the shared rate (an operator's change); the shared rate itself is a no-op."""
        if not (rate_per_s > 0.0 and math.isfinite(rate_per_s)):
            raise ValueError(f"rate must be a positive finite number, got {rate_per_s!r}")
        if not math.isclose(rate_per_s, self.rate, rel_tol=1e-9):
            self._set_rate = rate_per_s

    def pause_until(self, monotonic_t: float, *, reason: str = "paused") -> None:
        """Hold the key, for every process, until ``monotonic_t`` (only extends)."""
        pause_s = monotonic_t - self._clock.monotonic()
        if pause_s <= 0:
            return
        if pause_s > self._pause_s:
            self._pause_s, self._pause_reason = pause_s, reason
        self._hold_until = max(self._hold_until, monotonic_t)
        self._kick()

    def resume(self) -> None:
        """Lift this process's local hold (a shared pause runs out on its own)."""
        self._hold_until = -math.inf

    def record_success(self, *, demand_limited: bool) -> None:
        """A request got through: raise the shared rate if demand-limited; unpark if parked;
        the key's run of 429s is over."""
        ended = self._run_429s or (self._last is not None and self._last.run_429s)
        self._answered = True
        self._run_429s = 0
        if ended:
            # Told at once, not at the next send: the other processes' 429s would grow a
            # run that is over, and past RUN_CUTS_FROM each of them would cut.
            self._kick()
        if demand_limited:
            self._successes += 1
        if self._last is not None and self._last.parked_until_us:
            self._unpark = True
            self._kick()

    def record_throttled(self, sent_at: float) -> None:
        """A request sent at ``sent_at`` got a 429: report it with its decision's store time."""
        slot, probe = self._sends.pop(sent_at, (int((sent_at + self._offset) * _US), False))
        self._throttled.append(slot)
        self._run_429s += 1
        if probe and self._last is not None:
            self.park(_REPARK_S, self._last.park_reason or "probe throttled")
        self._kick()

    @property
    def run_429s(self) -> int:
        """The key's 429s in a row over every process, as far as this process knows: the
        store's count at its last answer, plus this process's own since (only its own once
        it had a success the store has not heard of)."""
        shared = 0 if self._answered or self._last is None else self._last.run_429s
        return shared + self._run_429s

    @property
    def answered_today(self) -> bool:
        """True when the store's last answer said a process told of an answer of the key in
        its current daily window (this process's own answers are the key's to count)."""
        return self._last is not None and self._last.answered_today

    def park(self, park_s: float, reason: str, *, exact: bool = False) -> None:
        """Park the key for every process for ``park_s`` (its 429s are not about rate).

        Of two parks before the store hears of them the longer wins, unless ``exact``: the
        circuit's own length, which is the word on it (a throttled probe's re-park of
        ``_REPARK_S``, set first, held the key 15 minutes past a circuit's probe just
        after the daily reset)."""
        if exact or park_s > self._park_s:
            self._park_s, self._park_reason = park_s, reason
        self._probe_lease_us = 0  # a park ends any probe lease
        self._kick()

    def unpark(self) -> None:
        """Close the key's circuit for every process."""
        self._unpark = True
        self._probe_lease_us = 0
        self._kick()

    def release_probe(self, again_s: float = 0.0) -> None:
        """The probe this process was granted got no answer about the quota (never sent, or
        failed by this process's own network, token endpoint or a 5xx): end its lease
        ``again_s`` from now, instead of when it would run out (``probe_lease_s``), and
        any process may probe then."""
        if self._probe_lease_us:
            self._release_probe_us, self._probe_lease_us = self._probe_lease_us, 0
            self._probe_again_s = again_s
            self._kick()

    def _store_wall(self) -> float:
        """The store's wall clock now, in seconds, by its last answer.

        The daily window is the store's: Redis judges it by its own TIME, so a process whose
        clock is hours off must not start a new day (and send into a spent one) on its own.
        Before the first answer, this process's wall clock stands in.
        """
        if self._wall_offset is None:
            return self._clock.utcnow().timestamp()
        return self._clock.monotonic() + self._wall_offset

    def _current_day(self) -> int:
        return day_number(int(self._store_wall() * _US), self._limits.reset_offset_s)

    @property
    def spent(self) -> int:
        """Requests counted in today's window, by the last answer (all processes)."""
        last = self._last
        # The store's window, which another live process's reset may hold: judged by this
        # process's own reset, a window it keeps to read as over, and the key as not spent,
        # while every send was refused for the day.
        if last is None or self._store_wall() * _US >= last.window_end_us:
            return 0
        return last.count

    @property
    def day_limit(self) -> int | None:
        """The daily limit the key keeps to, by the last answer: the lowest one a process
        sharing the key asked with recently, else this config's (``None``: unlimited)."""
        return self._limits.day_limit if self._last is None else self._last.day_limit

    @property
    def remaining(self) -> int | None:
        """Sends left today under the guard (``None``: unlimited)."""
        limit = self.day_limit
        return None if limit is None else max(0, limit - self.spent)

    @property
    def exhausted(self) -> bool:
        """True when the last answer says the day's limit is reached."""
        limit = self.day_limit
        return limit is not None and self.spent >= limit

    @property
    def used_fraction(self) -> float | None:
        """Share of TPD spent today (``None``: unlimited; 1.0 for TPD 0).

        Of the agreed daily limit when a process sharing the key keeps it lower than this
        config's (a 429 near it reads as the quota spent, not as the rate).
        """
        limit = self.day_limit
        if limit is not None and limit != self._limits.day_limit:
            return 1.0 if limit == 0 else self.spent / limit
        tpd = self._limits.tpd
        if tpd is None:
            return None
        return 1.0 if tpd == 0 else self.spent / tpd

    def quota_until(self) -> datetime:
        """When the daily count lets the key send again: the reset once this config's own
        limit is spent (a lower one of another entry of this config on the same account
        included); while only another process's lower tpd holds it, a minute from now at
        most (it lapses a minute after that process's last ask, at once when it closes), so
        --no-wait and the daemon do not wait for the reset on a passing lookup's limit."""
        if self._own_day_spent():
            return self.resets_at()
        held = datetime.fromtimestamp(self._store_wall() + PROCESS_RECENT_S, UTC)
        return min(self.resets_at(), held)

    def resets_at(self) -> datetime:
        """The UTC instant today's window ends, by the store's clock (the store's window
        while it lasts: another live process's reset may hold it)."""
        last = self._last
        if last is not None and self._store_wall() * _US < last.window_end_us:
            return datetime.fromtimestamp(last.window_end_us / _US, UTC)
        day = self._current_day() if last is None else max(last.day, self._current_day())
        seconds = (day + 1) * 86_400 + self._limits.reset_offset_s
        return datetime.fromtimestamp(seconds, UTC)

    def __repr__(self) -> str:
        return (
            f"SharedKeyLimiter({self._key.name!r}, {self._store.backend}, rate={self.rate:.4g}/s, "
            f"spent={self.spent}, limit={self.day_limit})"
        )


class SharedAdaptiveRate(AdaptiveRate):
    """The engine's 429 classifier, with the rate itself kept in the shared store.

    Each outcome still feeds the local classifier (consecutive 429s, the 429 share), which
    decides the verdict; the rate moves only in the store: a demand-limited success raises
    it, a 429 sent after the last cut cuts it, for every process at once.
    """

    __slots__ = ("_limiter",)

    def __init__(
        self,
        limiter: SharedKeyLimiter,
        nominal_rate_per_s: float,
        *,
        clock: Clock,
        settings: AdaptiveSettings | None = None,
    ) -> None:
        super().__init__(nominal_rate_per_s, clock=clock, settings=settings)
        self._limiter = limiter

    @property
    def rate(self) -> float:
        """The shared rate."""
        return self._limiter.rate

    def _raise(self) -> None:
        # The rate moves in the store (record_success); nothing to compute here.
        return

    def _cut(self) -> None:
        # The store cuts once per round for every process (record_throttled).
        return

    def on_success(self, *, demand_limited: bool) -> float:
        """Record a success locally and report it to the store; return the shared rate."""
        super().on_success(demand_limited=demand_limited)
        self._limiter.record_success(demand_limited=demand_limited)
        return self._limiter.rate

    def on_throttled(
        self,
        sent_at: float,
        *,
        budget_exhausted: bool = False,
        quota_used: float | None = None,
        retry_after_s: float | None = None,
        answered_today: bool = False,
    ) -> ThrottleVerdict:
        """Classify the 429 with the shared rate and the key's run of 429s over every
        process, and report it (the store decides the cut)."""
        self._rate = self._limiter.rate
        self._limiter.record_throttled(sent_at)
        # Counted over every process: N processes on a key whose quota is spent need one
        # streak of 429s between them before it parks, not one each (N times the 429s).
        # The key's run, not the larger of it and this process's own: another process's
        # success ends both (the parent class counts this one in).
        self._consecutive = self._limiter.run_429s - 1
        return super().on_throttled(
            sent_at,
            budget_exhausted=budget_exhausted,
            quota_used=quota_used,
            retry_after_s=retry_after_s,
            # Another process's answer today says the key's access is fine as well as one
            # of this process (a later run of the day named a spent quota "access revoked").
            answered_today=answered_today or self._limiter.answered_today,
        )


class SharedCircuit(Circuit):
    """The engine's circuit, whose parks and recoveries apply to every process of the key."""

    __slots__ = ("_limiter",)

    def __init__(
        self,
        limiter: SharedKeyLimiter,
        clock: Clock,
        *,
        random: Callable[[], float],
        settings: AdaptiveSettings | None = None,
    ) -> None:
        super().__init__(clock, random=random, settings=settings)
        self._limiter = limiter
        limiter.add_refusal_listener(self._refused)

    def _refused(self, refusal: str, wait_s: float) -> None:
        """The store refused our probe (another process probes, or re-parked): wait again.

        Without this, a process whose probe was refused would stay half-open for good,
        since no outcome of its own would ever settle the probe.
        """
        if self._state is CircuitState.PROBING:
            self._state = CircuitState.OPEN
            self._probe_at = self._clock.monotonic() + min(wait_s, _RECHECK_S)

    def open(
        self,
        verdict: ThrottleVerdict,
        *,
        at_least_s: float = 0.0,
        at_most_s: float = math.inf,
    ) -> float:
        """Park the key here and in the store (every process) until the probe time."""
        probe_at = super().open(verdict, at_least_s=at_least_s, at_most_s=at_most_s)
        self._limiter.park(max(0.0, probe_at - self._clock.monotonic()), verdict.value, exact=True)
        return probe_at

    def on_success(self) -> None:
        """Close the circuit here and in the store."""
        if self.verdict is not None:
            self._limiter.unpark()
        super().on_success()

    def abandon_probe(self) -> None:
        """Hand the probe on here, and to every process: its lease in the store is freed."""
        if self._state is CircuitState.PROBING:
            self._limiter.release_probe()
        super().abandon_probe()

    def probe_unsettled(self, *, hand_on: bool = False) -> None:
        """Probe again soon, here and in the store. A failure of this process's own
        (``hand_on``) frees the probe's lease at once, so any other process may probe now;
        one of Amazon's side (a 5xx, a reset) ends the lease when this process's own wait
        does, so every process shares that one wait instead of each probing on its own."""
        probing = self._state is CircuitState.PROBING
        super().probe_unsettled(hand_on=hand_on)
        if probing and self._probe_at is not None:
            wait = max(0.0, self._probe_at - self._clock.monotonic())
            self._limiter.release_probe(0.0 if hand_on else wait)


def account_day_limit(key: KeyConfig, config: BrokerConfig) -> int | None:
    """The lowest daily limit of ``config``'s entries naming ``key``'s credential (one
    account), ``key`` among them: every process of this config keeps the key to it."""
    return _ACCOUNT_DAY_LIMITS.of(config).get(key.credential_id)


class _AccountDayLimits:
    """The lowest daily limit of each credential of the last config asked about, found in
    one pass over its keys: asked key by key while a broker starts, a scan of every key for
    each one took 3 s of the start of a config of 10,000 keys (of 100,000: some 5 minutes)."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        # (keys, guard, limits), replaced whole: threads asking about two configs at once
        # each read one config's entry, never one's keys with the other's limits.
        self._last: tuple[tuple[KeyConfig, ...], float, dict[str, int | None]] | None = None

    def of(self, config: BrokerConfig) -> dict[str, int | None]:
        keys, guard = config.keys, config.rate.tpd_guard
        last = self._last
        if last is not None and last[0] is keys and last[1] == guard:
            return last[2]
        limits: dict[str, int | None] = {}
        for key in keys:
            limit = day_limit(key.tpd, guard)
            known = limits.get(key.credential_id)
            limits[key.credential_id] = (
                limit if known is None else known if limit is None else min(known, limit)
            )
        self._last = (keys, guard, limits)
        return limits


_ACCOUNT_DAY_LIMITS = _AccountDayLimits()


def shared_key_parts(
    key: KeyConfig,
    *,
    config: BrokerConfig,
    settings: AdaptiveSettings,
    clock: Clock,
    random: Callable[[], float],
    shared: SharedState,
) -> tuple[SharedKeyLimiter, SharedAdaptiveRate, SharedCircuit]:
    """Build one key's limiter, adaptive rate and circuit on the shared store."""
    limiter = SharedKeyLimiter(
        clock,
        shared.store,
        StateKey.of(shared.endpoint, key.credential_id, name=key.name),
        key_limits(key, config, settings),
        process_id=shared.process_id,
        give_up_after_s=config.retry.outage_budget_s,
        sibling_day_limits=[account_day_limit(key, config)],
    )
    adaptive = SharedAdaptiveRate(limiter, key.tps, clock=clock, settings=settings)
    circuit = SharedCircuit(limiter, clock, random=random, settings=settings)
    return limiter, adaptive, circuit


def _hhmm(offset_s: int) -> str:
    """A daily reset's offset (s after 00:00 UTC) as ``daily_reset_utc`` writes it."""
    hours, rest = divmod(offset_s, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours:02d}:{minutes:02d}" + (f":{seconds:02d}" if seconds else "")
