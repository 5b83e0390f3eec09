"""A batch's attempt state: how often it was sent, throttled, re-authorized, and for how long.

One :class:`Attempts` travels with each batch through its retries (a throttled batch may go
back to the queue for whichever key can send soonest) and only the executor edits it, so
no other module counts or un-counts attempts. ``age`` leaves out the time the batch waited
out an outage (K6): a network it cannot fix must not age a lookup into failure; and the time
it waited past when it was due again (after a 429, or a retry's backoff) for a key that could
not send: its pace, a pause, a park, its daily quota, none of them the batch's retrying.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Attempts"]


@dataclass(slots=True, eq=False)
class Attempts:
    """Counters of one batch's attempts, on the engine's monotonic clock."""

    #: requests that carried the batch and reached the API (or may have)
    sent: int = 0
    #: of those, how many were answered 429 (they never count toward failing it)
    throttled: int = 0
    #: when the first counted request went (None until one did)
    first_sent_at: float | None = None
    #: seconds spent waiting out outages since the first send, left out of ``age``
    paused_s: float = 0.0
    #: when the batch began waiting out an outage (None when it is not)
    unreachable_since: float | None = None
    #: when the batch was due to go again, back in the queue (None when it is not): the
    #: wait past it is the key's, left out of ``age``
    due_at: float | None = None
    #: token refreshes or re-signings spent (bounded to avoid a loop)
    auth_retries: int = 0
    #: when the first request refused for its credentials went (None until one was)
    auth_refused_at: float | None = None
    #: times the responses left this batch's ASIN out (single-ASIN re-asks only)
    missing: int = 0
    #: the token drop this batch last went back for (see ``Authorizer.dropped``): once
    #: per drop, so a token endpoint that fails afterwards is met, not dodged for ever
    bounced_at_drop: int | None = None
    #: the last transient error, reported if every attempt fails
    last_error: BaseException | None = None
    #: a retry of a failed attempt is scheduled: the next request that goes is a retry
    #: (counted then, so one whose callers left before it went is not)
    retry_due: bool = False

    def begin(self, sent_at: float) -> None:
        """A request carrying the batch is about to go at ``sent_at``."""
        self.sent += 1
        if self.first_sent_at is None:
            self.first_sent_at = sent_at
        if self.unreachable_since is not None:
            self.paused_s += max(0.0, sent_at - self.unreachable_since)
            self.unreachable_since = None
        if self.due_at is not None:
            self.paused_s += max(0.0, sent_at - self.due_at)
            self.due_at = None

    def requeued(self, due_at: float) -> None:
        """The batch goes back to the queue, due to go again at ``due_at`` (at once after a
        429; after the backoff for a retry): a wait past that, for its key, is not aged.
        A daily quota spent while a 503's retry waited failed the lookup at its next 503 (a
        night's wait "retrying" past ``max_age_s``), two attempts of six."""
        if self.unreachable_since is None:
            self.due_at = due_at

    def not_sent(self, now: float, *, outage: bool = False) -> None:
        """The attempt begun last never reached the API: it does not count.

        With ``outage`` the time from ``now`` until the next attempt is left out of ``age``.
        """
        self.sent = max(0, self.sent - 1)
        if self.sent == 0:
            self.first_sent_at = None
            self.paused_s = 0.0
        if outage and self.unreachable_since is None and self.first_sent_at is not None:
            self.unreachable_since = now

    @property
    def fresh(self) -> bool:
        """True while nothing has happened to the batch: never sent, throttled, refused or
        re-asked, so a lookup added now starts with the same (empty) history."""
        return (
            self.sent == 0
            and self.throttled == 0
            and self.auth_retries == 0
            and self.auth_refused_at is None
            and self.missing == 0
            and self.last_error is None
        )

    @property
    def failures(self) -> int:
        """Counted attempts that were not throttled: the retry policy's attempt number."""
        return max(1, self.sent - self.throttled)

    def age(self, now: float) -> float:
        """Seconds since the first send, less the time spent waiting out outages and waiting
        for the key past when the batch was due."""
        if self.first_sent_at is None:
            return 0.0
        paused = self.paused_s
        if self.unreachable_since is not None:
            paused += max(0.0, now - self.unreachable_since)
        if self.due_at is not None:
            paused += max(0.0, now - self.due_at)
        return max(0.0, now - self.first_sent_at - paused)

    def child(self, *, missed: bool = False) -> Attempts:
        """The state for one ASIN re-asked alone: the same history (``missed``: one more miss)."""
        return Attempts(
            sent=self.sent,
            throttled=self.throttled,
            first_sent_at=self.first_sent_at,
            paused_s=self.paused_s,
            auth_retries=self.auth_retries,
            auth_refused_at=self.auth_refused_at,
            missing=self.missing + 1 if missed else self.missing,
            last_error=self.last_error,
        )
