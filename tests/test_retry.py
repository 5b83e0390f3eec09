"""Tests for broker.engine.retry: the retry policy and the per-key retry budget."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from broker.engine.retry import RetryBudget, RetryPolicy
from broker.errors import (
    ApiError,
    AuthError,
    BadRequestError,
    ConnectError,
    RequestTimeout,
    ResponseError,
    ServerError,
    ThrottledError,
    TransportError,
)
from broker.testing import FakeClock


def _policy(u: float = 0.5, **kwargs: float) -> RetryPolicy:
    return RetryPolicy(random=lambda: u, **kwargs)  # type: ignore[arg-type]


def _throttled(retry_after: float | None = None) -> ThrottledError:
    return ThrottledError("TooManyRequests", "slow down", status=429, retry_after=retry_after)


TRANSIENT = [
    TransportError("reset"),
    ConnectError("refused"),
    RequestTimeout("timed out"),
    ResponseError("truncated body", status=200),
    ServerError("InternalFailure", "oops", status=500),
]


class TestPolicyDefaults:
    def test_defaults_are_the_documented_ones(self) -> None:
        """Defaults: 6 attempts, 10 min, 0.5 s base, 30 s cap, Retry-After capped at 60 s."""
        policy = RetryPolicy()
        assert (policy.max_attempts, policy.max_age_s) == (6, 600.0)
        assert (policy.base_delay_s, policy.max_delay_s, policy.retry_after_cap_s) == (
            0.5,
            30.0,
            60.0,
        )
        with pytest.raises(dataclasses.FrozenInstanceError):
            policy.max_attempts = 3  # type: ignore[misc]

    @pytest.mark.parametrize("kwargs", [{"max_attempts": 0}, {"base_delay_s": -1.0}])
    def test_invalid_values_rejected(self, kwargs: dict[str, float]) -> None:
        """Nonsense limits are refused at construction."""
        with pytest.raises(ValueError, match=">="):
            RetryPolicy(**kwargs)  # type: ignore[arg-type]

    def test_attempt_counts_from_one(self) -> None:
        """attempt 0 is a programming error."""
        with pytest.raises(ValueError, match="from 1"):
            _policy().next_delay(0, TransportError("x"))


class TestThrottled:
    @pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5])
    def test_throttle_retries_at_once(self, attempt: int) -> None:
        """A 429 is re-queued with no delay: the lowered pacer is the backoff."""
        assert _policy().next_delay(attempt, _throttled()) == 0.0

    def test_throttle_ignores_retry_after(self) -> None:
        """A 429's Retry-After pauses the key elsewhere; the batch itself waits 0 s."""
        assert _policy().next_delay(1, _throttled(retry_after=30.0)) == 0.0

    def test_throttle_still_bounded_by_attempts(self) -> None:
        """The sixth failed attempt gives up even for 429s."""
        assert _policy().next_delay(6, _throttled()) is None


class TestTransient:
    @pytest.mark.parametrize("error", TRANSIENT, ids=lambda e: type(e).__name__)
    def test_full_jitter_delays(self, error: BaseException) -> None:
        """Transient errors wait U(0, min(30, 0.5 * 2**(n-1))): here u = 0.5."""
        policy = _policy(0.5, max_attempts=20)
        delays = [policy.next_delay(n, error) for n in range(1, 10)]
        assert delays == pytest.approx([0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0])

    def test_jitter_spans_zero_to_ceiling(self) -> None:
        """The random draw scales the whole ceiling: 0 gives 0, just under 1 gives the ceiling."""
        error = TransportError("reset")
        assert _policy(0.0).next_delay(3, error) == 0.0
        assert _policy(0.999).next_delay(3, error) == pytest.approx(1.998)

    def test_no_overflow_at_attempt_1000(self) -> None:
        """Huge attempt numbers are clamped to the cap instead of overflowing."""
        policy = _policy(1.0, max_attempts=10_000, max_age_s=1e9)
        assert policy.next_delay(1000, TransportError("x")) == 30.0
        assert policy.next_delay(9999, ServerError("X", "y", status=503)) == 30.0

    def test_server_retry_after_wins_bounded(self) -> None:
        """A 5xx Retry-After longer than the jitter wins, clamped to 60 s."""
        policy = _policy(0.5)
        assert policy.next_delay(1, ServerError("X", "y", status=503, retry_after=10.0)) == 10.0
        assert policy.next_delay(1, ServerError("X", "y", status=503, retry_after=900.0)) == 60.0
        assert policy.next_delay(5, ServerError("X", "y", status=503, retry_after=0.1)) == 4.0


class TestAuth:
    @pytest.mark.parametrize("code", ["TokenExpired", "InvalidToken", "RequestExpired"])
    def test_refreshable_auth_retries_once(self, code: str) -> None:
        """Token and clock errors retry at once, but not twice in a row."""
        error = AuthError(code, "refresh", status=401)
        policy = _policy()
        assert policy.next_delay(1, error) == 0.0
        assert policy.next_delay(2, error, previous=AuthError(code, "again", status=401)) is None

    def test_refreshable_auth_after_another_error(self) -> None:
        """A token error after a different error still gets its free retry."""
        error = AuthError("TokenExpired", "refresh", status=401)
        assert _policy().next_delay(3, error, previous=_throttled()) == 0.0

    @pytest.mark.parametrize("code", ["InvalidSignature", "UnrecognizedClient", "AccessDenied"])
    def test_fatal_auth_gives_up(self, code: str) -> None:
        """Key-fatal auth codes are never retried."""
        assert _policy().next_delay(1, AuthError(code, "no", status=403)) is None


class TestOthers:
    def test_bad_request_gives_up(self) -> None:
        """A non-retryable 4xx gives up at once."""
        error = BadRequestError("InvalidParameterValue", "bad id", status=400)
        assert _policy().next_delay(1, error) is None

    def test_unknown_api_code_gives_up(self) -> None:
        """An unknown 4xx code is not retried."""
        assert _policy().next_delay(1, ApiError("Weird", "?", status=418)) is None

    def test_retryable_catalogue_code_backs_off(self) -> None:
        """An ApiError whose catalogue entry is retryable backs off like a transient error."""
        error = ApiError("InternalFailure", "oops", status=200)
        assert _policy(0.5).next_delay(2, error) == 0.5

    @pytest.mark.parametrize(
        "error",
        [ValueError("bug"), asyncio.CancelledError(), KeyboardInterrupt()],
        ids=lambda e: type(e).__name__,
    )
    def test_foreign_errors_give_up(self, error: BaseException) -> None:
        """Bugs and cancellation are never retried."""
        assert _policy().next_delay(1, error) is None


class TestLimits:
    def test_max_attempts(self) -> None:
        """Attempt max_attempts - 1 may retry; attempt max_attempts gives up."""
        policy = _policy(0.5, max_attempts=3)
        assert policy.next_delay(2, TransportError("x")) == 0.5
        assert policy.next_delay(3, TransportError("x")) is None

    def test_max_age(self) -> None:
        """A request past max_age_s, or one the delay would carry past it, gives up."""
        policy = _policy(1.0)
        error = TransportError("x")
        assert policy.next_delay(1, error, age_s=600.0) is None
        assert policy.next_delay(1, _throttled(), age_s=600.0) is None
        assert policy.next_delay(1, error, age_s=599.6) is None  # 0.5 s would pass 600
        assert policy.next_delay(1, error, age_s=599.5) == 0.5


class TestRetryBudget:
    def test_floor_allows_one_retry_without_sends(self) -> None:
        """With no sends yet, exactly one retry is allowed (the +1)."""
        budget = RetryBudget(FakeClock())
        assert budget.try_retry()
        assert not budget.try_retry()

    def test_ten_percent_of_sends_plus_one(self) -> None:
        """Retries are capped at 10 % of sends in the window, plus one."""
        budget = RetryBudget(FakeClock())
        for _ in range(50):
            budget.record_send()
        allowed = sum(budget.try_retry() for _ in range(20))
        assert allowed == 6
        assert (budget.sends, budget.retries) == (50, 6)

    async def test_window_slides(self) -> None:
        """Sends and retries older than a minute stop counting."""
        clock = FakeClock()
        budget = RetryBudget(clock)
        for _ in range(20):
            budget.record_send()
        assert sum(budget.try_retry() for _ in range(10)) == 3
        await clock.advance(30.0)
        assert not budget.try_retry()
        await clock.advance(30.0)
        assert (budget.sends, budget.retries) == (0, 0)
        assert budget.try_retry()
        assert "retries=1" in repr(budget)

    def test_invalid_arguments(self) -> None:
        """A non-positive window is refused."""
        with pytest.raises(ValueError, match="window_s"):
            RetryBudget(FakeClock(), window_s=0.0)
