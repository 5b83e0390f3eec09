"""When to retry a failed request and after how long: a pure policy and a per-key budget.

:class:`RetryPolicy` classifies an error (``ratelimit.md`` 6.1 point 6, ``style.md`` 7):

- a 429 is retried at once (0 s): the key's lowered pacer *is* the backoff, and a
  Retry-After pauses the whole key rather than one batch;
- transport failures, unreadable responses and 5xx wait a full-jitter exponential delay
  ``U(0, min(max_delay, base * 2**(attempt-1)))`` (AWS Architecture Blog, 2015), or a
  server's Retry-After when it is longer (bounded);
- an expired or invalid token and ``RequestExpired`` are retried at once, one time in a
  row: the authorizer refreshes the token or learns the clock offset first;
- every other code follows the catalogue's ``retryable`` flag; non-retryable ones give up.

:class:`RetryBudget` caps a key's retries at 10 % of its sends over a sliding minute, plus
one, like the AWS SDKs' retry quota, so a broken key cannot spend its day on retries.

What a refused retry does differs from botocore on purpose. botocore's empty retry quota
means "no retry": the error goes back to a caller who can decide. Our callers are output
rows, and a row failed for a few bad minutes is worse than a late one, so a refused retry
waits instead (:meth:`RetryPolicy.budget_delay`). It waits the next step of the exponential
schedule with equal jitter, not a flat ``max_delay_s``: every key's total rate is already
capped by its pacer, so the budget only keeps retries from crowding out first attempts,
and a flat 30 s made every refused retry of a fault burst wait the longest delay there is,
and return in lockstep. Outages, the case botocore's quota really guards against, are
handled before the budget: an unreachable endpoint pauses the key without spending
attempts (``keys.py``).
"""

from __future__ import annotations

import collections
import math
import random as _random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broker.errors import (
    ApiError,
    AuthError,
    ResponseError,
    ServerError,
    ThrottledError,
    TransportError,
    describe,
)

if TYPE_CHECKING:
    from broker.clock import Clock

__all__ = ["RetryBudget", "RetryPolicy"]

# 2**62 already exceeds any sane delay cap; clamping the exponent keeps the float finite.
_MAX_EXPONENT = 62


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many times, for how long, and how far apart a request is retried.

    Attributes:
        max_attempts: attempts per request, the first included (6).
        max_age_s: the longest a request may keep retrying after its first send (10 min,
            well inside a 15-minute signature, which is re-signed anyway).
        base_delay_s: the first full-jitter ceiling (0.5 s).
        max_delay_s: the largest full-jitter ceiling (30 s).
        retry_after_cap_s: the most a server's Retry-After can make us wait (60 s).
        random: returns floats in [0, 1) for the jitter; injected so tests are exact.
    """

    max_attempts: int = 6
    max_age_s: float = 600.0
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    retry_after_cap_s: float = 60.0
    random: Callable[[], float] = field(default=_random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.max_age_s < 0 or self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("max_age_s, base_delay_s and max_delay_s must be >= 0")
        if self.retry_after_cap_s < 0:
            raise ValueError("retry_after_cap_s must be >= 0")

    def next_delay(
        self,
        attempt: int,
        error: BaseException,
        *,
        age_s: float = 0.0,
        previous: BaseException | None = None,
    ) -> float | None:
        """Return the delay before the next attempt, or ``None`` to give up.

        Args:
            attempt: attempts made so far, counting the one that just failed (1 after
                the first failure).
            error: what the attempt failed with.
            age_s: seconds since the request's first send; past ``max_age_s`` (or when
                the delay would carry it past) we give up.
            previous: the error of the attempt before, if any; a token or clock error
                that repeats right after its free retry gives up.

        Returns:
            Seconds to wait (0.0: re-queue at once), or ``None``.

        Raises:
            ValueError: if ``attempt`` is below 1.
        """
        if attempt < 1:
            raise ValueError(f"attempt counts from 1, got {attempt}")
        if attempt >= self.max_attempts or age_s >= self.max_age_s:
            return None
        delay = self._classify(attempt, error, previous)
        if delay is None or age_s + delay > self.max_age_s:
            return None
        return delay

    def budget_delay(self, attempt: int) -> float:
        """The wait of a retry the :class:`RetryBudget` refused, after ``attempt`` attempts.

        Equal jitter on the ceiling of the *next* backoff step, ``U(c/2, c)`` with
        ``c = min(max_delay, base * 2**attempt)``: always longer than the step the normal
        backoff would draw from (the budget's point is to slow down), growing as attempts
        do, and spread so refused retries do not come back together.
        """
        ceiling = min(self.max_delay_s, self.base_delay_s * 2.0 ** min(attempt, _MAX_EXPONENT))
        return ceiling * (0.5 + 0.5 * self.random())

    def _classify(
        self, attempt: int, error: BaseException, previous: BaseException | None
    ) -> float | None:
        if isinstance(error, ThrottledError):
            return 0.0
        if isinstance(error, (TransportError, ResponseError, ServerError)):
            return self._backoff(attempt, getattr(error, "retry_after", None))
        if isinstance(error, AuthError):
            if not describe(error.code, status=error.status).retryable:
                return None
            repeated = isinstance(previous, AuthError) and previous.code == error.code
            return None if repeated else 0.0
        if isinstance(error, ApiError) and describe(error.code, status=error.status).retryable:
            return self._backoff(attempt, error.retry_after)
        return None

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        ceiling = min(self.max_delay_s, self.base_delay_s * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
        delay = self.random() * ceiling
        if retry_after_s is not None and retry_after_s > 0.0 and math.isfinite(retry_after_s):
            # The server knows when it recovers better than our estimate; bounded all the same.
            delay = max(delay, min(retry_after_s, self.retry_after_cap_s))
        return delay


class RetryBudget:
    """Per-key cap on retries: at most ``ratio`` of sends over a sliding window, plus ``floor``.

    The dispatcher calls :meth:`record_send` for every request it sends (retries included);
    the retry path asks :meth:`try_retry` before scheduling a retry, which counts it when
    allowed. A refused retry should wait rather than storm.

    Args:
        clock: the monotonic clock the window slides on.
        ratio: retries allowed per send in the window (0.1).
        floor: retries always allowed per window, so a quiet key can still retry (1).
        window_s: the window length (60 s).
    """

    __slots__ = ("_clock", "_floor", "_ratio", "_retries", "_sends", "_window_s")

    def __init__(
        self, clock: Clock, *, ratio: float = 0.1, floor: int = 1, window_s: float = 60.0
    ) -> None:
        if ratio < 0 or floor < 0 or window_s <= 0:
            raise ValueError("need ratio >= 0, floor >= 0 and window_s > 0")
        self._clock = clock
        self._ratio = ratio
        self._floor = floor
        self._window_s = window_s
        self._sends: collections.deque[float] = collections.deque()
        self._retries: collections.deque[float] = collections.deque()

    def _prune(self, now: float) -> None:
        horizon = now - self._window_s
        for stamps in (self._sends, self._retries):
            while stamps and stamps[0] <= horizon:
                stamps.popleft()

    def record_send(self) -> None:
        """Count one send now."""
        now = self._clock.monotonic()
        self._prune(now)
        self._sends.append(now)

    def try_retry(self) -> bool:
        """Count one retry now if the budget allows it; False means "not now"."""
        now = self._clock.monotonic()
        self._prune(now)
        if len(self._retries) >= self._ratio * len(self._sends) + self._floor:
            return False
        self._retries.append(now)
        return True

    @property
    def sends(self) -> int:
        """Sends in the current window."""
        self._prune(self._clock.monotonic())
        return len(self._sends)

    @property
    def retries(self) -> int:
        """Retries in the current window."""
        self._prune(self._clock.monotonic())
        return len(self._retries)

    def __repr__(self) -> str:
        return (
            f"RetryBudget(sends={self.sends}, retries={self.retries}, ratio={self._ratio:g}, "
            f"floor={self._floor}, window_s={self._window_s:g})"
        )
