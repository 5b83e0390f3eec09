"""Per-key pacing: a reservation-style GCRA pacer, and the ``KeyLimiter`` seam around it.

Why our own pacer and not aiolimiter (``ratelimit.md`` 0.6, 2.7, 6.1 point 2): the adaptive
controller changes a key's rate after every fresh 429, and aiolimiter cannot do that. Its
rate is computed once in ``__init__``; setting ``max_rate`` only changes the burst (and
lowering it stalls the limiter), and a waiter already asleep keeps its old timer. Its only
no-burst configuration, ``AsyncLimiter(1, 1/R)``, also loses every timer's lateness, while
``AsyncLimiter(R, 1)`` spends a burst of R at start. :class:`Pacer` keeps one number, the
last slot, on the injected clock; the next slot is ``last + 1/r``, so a rate change applies
from the next slot and re-arms a sleeping dispatcher at once. A wake-up that fires late is
credited back, so slots stay on the grid and timer lateness is not lost.

``benchmarks/pacer_precision.py`` (real time, CPython 3.11.7 asyncio loop, 5 s or 20
intervals per rate) measured achieved rate / nominal: at 1, 10 and 100/s this pacer
99.995 %, 99.979 %, 99.919 %; ``AsyncLimiter(1, 1/R)`` 99.871 %, 99.636 %, 97.085 %
(it loses each wake-up's ~1 ms of lateness); ``AsyncLimiter(100, 1)`` sent 199 requests in
its first second. The price of crediting lateness: single gaps can be shorter than
``1/R`` by the lateness (min gap 8.2 ms at 100/s), which a server with any burst tolerance
absorbs (``ratelimit.md`` 5.3: 100 % with 0 429s at B >= 1.5 in the same real-time test).

:class:`KeyLimiter` is what the pipeline needs from one key's pacing and daily budget, so a
shared backend (``broker.engine.shared_limiter.SharedKeyLimiter``: the key's state in a
SQLite file or Redis, ``ratelimit.md`` 6.2) can replace :class:`LocalKeyLimiter`.
"""

from __future__ import annotations

import asyncio
import functools
import math
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import datetime

    from broker.clock import Clock
    from broker.engine.quota import DailyBudget

__all__ = ["KeyLimiter", "LocalKeyLimiter", "Pacer"]

# Slots closer than this to "now" count as due. Without it, float rounding between
# ``now + (due - now)`` and ``due`` could leave a waiter one ulp short of its slot forever.
_DUE_EPSILON_S = 1e-6

# An exhausted daily budget re-reads the wall clock at least this often while it waits,
# so a corrected clock (or a reset boundary we estimated wrong) is noticed.
_BUDGET_RECHECK_S = 300.0


def _wake_up(wake: asyncio.Future[None], _sleeper: object) -> None:
    if not wake.done():
        wake.set_result(None)


def _check_rate(rate_per_s: float) -> float:
    if not (rate_per_s > 0.0 and math.isfinite(rate_per_s)):
        raise ValueError(f"rate must be a positive finite number, got {rate_per_s!r}")
    return float(rate_per_s)


class Pacer:
    """A GCRA pacer with burst 1 for one dispatcher task: one send per ``1/rate`` seconds.

    The dispatcher loops ``await wait_ready()``, takes work, ``commit()``, sends. State is
    the last slot used; the next slot is ``last_slot + 1/rate`` (or the end of a pause,
    whichever is later). ``commit`` books the send into ``slot = max(now, next slot)``,
    except that a wake-up the timer delivered late is booked at the slot it was due, so
    lateness is not lost (it never credits time the dispatcher spent idle or waiting for
    work, which would let two sends go out less than ``1/rate`` apart).

    Args:
        clock: reads and waits; all sleeping goes through ``clock.sleep``.
        rate_per_s: the initial rate (positive, finite).

    Raises:
        ValueError: for a rate that is not positive and finite.
    """

    __slots__ = (
        "_clock",
        "_interval",
        "_last_slot",
        "_lateness",
        "_paused_until",
        "_rate",
        "_waiting",
        "_wake",
    )

    def __init__(self, clock: Clock, rate_per_s: float) -> None:
        self._clock = clock
        self._rate = _check_rate(rate_per_s)
        self._interval = 1.0 / self._rate
        self._last_slot: float | None = None
        self._paused_until = -math.inf
        # How late the timer delivered the slot wait_ready last returned for; credited by
        # the next commit and cleared by anything that moves the slot.
        self._lateness = 0.0
        self._waiting = False
        # Created lazily inside wait_ready, so the pacer is not bound to a loop.
        self._wake: asyncio.Future[None] | None = None

    @property
    def rate(self) -> float:
        """The current rate in requests per second."""
        return self._rate

    @property
    def paused_until(self) -> float:
        """Monotonic time a pause ends (``-inf`` when never paused)."""
        return self._paused_until

    def set_rate(self, rate_per_s: float) -> None:
        """Change the rate; it applies from the next slot, and re-arms a waiting dispatcher.

        Raises:
            ValueError: for a rate that is not positive and finite.
        """
        self._rate = _check_rate(rate_per_s)
        self._interval = 1.0 / self._rate
        self._lateness = 0.0
        self._rearm()

    def pause_until(self, monotonic_t: float) -> None:
        """Hold every slot until ``monotonic_t``; a pause only ever extends.

        The caller bounds it (a Retry-After is clamped before it gets here).
        """
        if monotonic_t > self._paused_until:
            self._paused_until = monotonic_t
            self._lateness = 0.0
            self._rearm()

    def resume(self) -> None:
        """Lift any pause now (a circuit closing, an operator)."""
        if self._paused_until != -math.inf:
            self._paused_until = -math.inf
            self._lateness = 0.0
            self._rearm()

    def _tat(self) -> float:
        return -math.inf if self._last_slot is None else self._last_slot + self._interval

    def next_ready(self) -> float:
        """Monotonic time of the next slot, without waiting.

        May lie in the past (ready now); ``-inf`` for a pacer that never sent and is not
        paused. The scheduler compares keys with it to find the one that can send soonest.
        """
        return max(self._tat(), self._paused_until)

    def ready_now(self) -> bool:
        """True when the next slot is due and no pause holds it."""
        return self._clock.monotonic() >= self.next_ready() - _DUE_EPSILON_S

    def _rearm(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def wait_ready(self) -> None:
        """Return when the next slot is due and the key is not paused.

        A rate change or a pause while waiting re-computes the slot at once. Cancelling
        the wait leaves the pacer exactly as it was.

        Raises:
            RuntimeError: if another task is already waiting (one dispatcher per pacer).
        """
        if self._waiting:
            raise RuntimeError("Pacer.wait_ready is already being awaited: one dispatcher per key")
        self._waiting = True
        try:
            await self._wait()
        finally:
            self._waiting = False

    async def _wait(self) -> None:
        loop = asyncio.get_running_loop()
        timer_due: float | None = None
        while True:
            due = self.next_ready()
            now = self._clock.monotonic()
            if now >= due - _DUE_EPSILON_S:
                # Credit only a timer's lateness for this very slot: a slot that was already
                # past when we arrived (idle key) or that moved under us earns nothing.
                self._lateness = max(0.0, now - due) if timer_due == due else 0.0
                return
            wake: asyncio.Future[None] = loop.create_future()
            sleeper = loop.create_task(self._clock.sleep(due - now))
            sleeper.add_done_callback(functools.partial(_wake_up, wake))
            self._wake = wake
            try:
                await wake
            finally:
                self._wake = None
                sleeper.cancel()
            if sleeper.done() and not sleeper.cancelled():
                sleeper.result()  # a failing clock must not pass silently
                timer_due = due
            else:
                timer_due = None

    def commit(self) -> float:
        """Record a send now and move the next slot one interval on.

        The send is booked at ``max(now, next slot)``, with a late timer wake-up booked at
        the slot it was for. Committing before the slot is due (without ``wait_ready``)
        books the future slot, as a GCRA reservation does.

        Returns:
            The monotonic time of the send (now), for "sent after the last cut" checks.
        """
        now = self._clock.monotonic()
        credit = self._lateness if self._lateness < self._interval else 0.0
        self._lateness = 0.0
        self._last_slot = max(self._tat(), self._paused_until, now - credit)
        return now

    def __repr__(self) -> str:
        return (
            f"Pacer(rate={self._rate:g}/s, next_ready={self.next_ready():.6f}, "
            f"paused_until={self._paused_until:.6f}, waiting={self._waiting})"
        )


class KeyLimiter(Protocol):
    """Protocol: one key's pacing and daily budget, as the pipeline uses them.

    - ``await wait_ready()`` returns when the key may send: its next slot is due, no pause
      holds it, and its daily budget is not spent. One dispatcher task per key calls it;
      cancelling it leaves no state behind.
    - ``await commit()`` records one send against both the pacer and the daily budget and
      returns its monotonic send time. A shared backend does both in one atomic call (one
      Redis script), which is why spending the budget is not a separate method here.
    - ``next_ready()`` is the monotonic time the key can send next (may be in the past or
      ``-inf``), without waiting; ``ready_now()`` is its boolean form.
    - ``rate``/``set_rate(r)`` read and change the pacing rate (from the next slot);
      ``pause_until(t, reason=...)`` holds the key until monotonic ``t`` (only extends; the
      reason is shown by ``broker status`` for shared state); ``resume()``
      lifts a pause.
    - ``spent``, ``remaining`` (``None``: unlimited), ``exhausted``, ``used_fraction`` and
      ``resets_at()`` describe the daily budget's current window; ``quota_until()`` is when
      a spent one lets the key send again (the reset, unless shared state holds the key to
      another process's lower limit).
    - ``blocked_reason`` says why the key cannot send because its shared state store is
      unreachable (``None``: it can; always ``None`` for in-process state).
    - ``add_refusal_listener(fn)`` calls ``fn(refusal, wait_s)`` whenever the shared state
      refuses sends (the day spent, the key parked or probed elsewhere); never for
      in-process state, whose refusals are this process's own sends.
    - ``parked()`` is the park the shared state holds, whichever process parked the key:
      its reason and the UTC instant of its probe (``None``: not parked; always ``None``
      for in-process state, whose only park is the key's own circuit).
    - ``await keep_alive()`` runs for the engine's life and tells the shared state this
      process is still here while the key sends nothing (idle or parked): each beat carries
      its count of the day. Returns at once for in-process state.
    """

    async def wait_ready(self) -> None: ...

    async def keep_alive(self) -> None: ...

    async def commit(self, booked: Callable[[], None] | None = None) -> float: ...

    def next_ready(self) -> float: ...

    def ready_now(self) -> bool: ...

    @property
    def rate(self) -> float: ...

    def set_rate(self, rate_per_s: float) -> None: ...

    def pause_until(self, monotonic_t: float, *, reason: str = "paused") -> None: ...

    def resume(self) -> None: ...

    @property
    def spent(self) -> int: ...

    @property
    def remaining(self) -> int | None: ...

    @property
    def exhausted(self) -> bool: ...

    @property
    def used_fraction(self) -> float | None: ...

    def resets_at(self) -> datetime: ...

    def quota_until(self) -> datetime: ...

    def wall_now(self) -> datetime: ...

    @property
    def blocked_reason(self) -> str | None: ...

    def parked(self) -> tuple[str, datetime] | None: ...

    def add_refusal_listener(self, listener: Callable[[str, float], None]) -> None: ...


class LocalKeyLimiter:
    """The in-process :class:`KeyLimiter`: a :class:`Pacer` plus a :class:`DailyBudget`.

    Args:
        clock: the same clock the pacer and budget use.
        pacer: the key's pacer.
        budget: the key's daily budget.
    """

    __slots__ = ("_budget", "_clock", "_pacer")

    def __init__(self, clock: Clock, pacer: Pacer, budget: DailyBudget) -> None:
        self._clock = clock
        self._pacer = pacer
        self._budget = budget

    @property
    def pacer(self) -> Pacer:
        """The key's pacer."""
        return self._pacer

    @property
    def budget(self) -> DailyBudget:
        """The key's daily budget."""
        return self._budget

    async def keep_alive(self) -> None:
        """Nothing to tell: the key's state lives in this process."""

    async def wait_ready(self) -> None:
        """Wait for the key's next slot, and past the daily reset when the budget is spent."""
        while True:
            if self._budget.exhausted:
                # Kept apart from the pacer's pause: a pause only extends, and a wall-clock
                # estimate of the reset must not outlive a corrected clock.
                wait_s = min(self._budget.seconds_until_reset(), _BUDGET_RECHECK_S)
                await self._clock.sleep(max(wait_s, _DUE_EPSILON_S))
                continue
            await self._pacer.wait_ready()
            if not self._budget.exhausted:
                return

    async def commit(self, booked: Callable[[], None] | None = None) -> float:
        """Count the send against the budget and the pacer; return its monotonic time.

        ``booked`` is called once the send is counted (at once here: nothing is awaited).

        Raises:
            RuntimeError: if the budget is spent (the caller skipped ``wait_ready``).
        """
        if not self._budget.try_spend():
            raise RuntimeError("daily budget spent: await wait_ready() before commit()")
        sent_at = self._pacer.commit()
        if booked is not None:
            booked()
        return sent_at

    def next_ready(self) -> float:
        """Monotonic time of the next send: the pacer's slot, or the budget's reset."""
        ready = self._pacer.next_ready()
        if self._budget.exhausted:
            ready = max(ready, self._clock.monotonic() + self._budget.seconds_until_reset())
        return ready

    def ready_now(self) -> bool:
        """True when the pacer's slot is due and the budget allows a send."""
        return not self._budget.exhausted and self._pacer.ready_now()

    @property
    def rate(self) -> float:
        """The pacer's rate in requests per second."""
        return self._pacer.rate

    def set_rate(self, rate_per_s: float) -> None:
        """Change the pacer's rate (from the next slot)."""
        self._pacer.set_rate(rate_per_s)

    def pause_until(self, monotonic_t: float, *, reason: str = "paused") -> None:
        """Hold the key until ``monotonic_t`` (only extends; the reason is for shared state)."""
        self._pacer.pause_until(monotonic_t)

    def resume(self) -> None:
        """Lift the pacer's pause."""
        self._pacer.resume()

    @property
    def spent(self) -> int:
        """Requests counted in the current daily window."""
        return self._budget.spent

    @property
    def remaining(self) -> int | None:
        """Sends left under the daily guard (``None``: unlimited)."""
        return self._budget.remaining

    @property
    def exhausted(self) -> bool:
        """True when the daily guard refuses sends until the reset."""
        return self._budget.exhausted

    @property
    def used_fraction(self) -> float | None:
        """Share of TPD spent today (``None``: unlimited)."""
        return self._budget.used_fraction

    def resets_at(self) -> datetime:
        """The UTC instant the daily window resets."""
        return self._budget.resets_at()

    def quota_until(self) -> datetime:
        """When a spent budget lets the key send again: the reset (in-process state has no
        other process's limit)."""
        return self.resets_at()

    def wall_now(self) -> datetime:
        """The wall clock the key's times are told by: this process's."""
        return self._clock.utcnow()

    @property
    def blocked_reason(self) -> str | None:
        """Always None: in-process state is always reachable."""
        return None

    def parked(self) -> tuple[str, datetime] | None:
        """Always None: the key's own circuit is its only park."""
        return None

    def add_refusal_listener(self, listener: Callable[[str, float], None]) -> None:
        """Nothing to listen to: in-process state refuses nothing this process did not do."""

    def __repr__(self) -> str:
        return f"LocalKeyLimiter({self._pacer!r}, {self._budget!r})"
