"""One key's state in the scheduler: its limiter, adaptive rate, circuit, health and counters.

A key serves the marketplaces it has a partner tag for. It is *active*, *paused* (a
Retry-After, a token-endpoint failure, or an endpoint it cannot reach), *parked* (its
circuit is open because its 429s mean "daily quota exhausted" or "access revoked"), or *out
of rotation* (a key-level error such as InvalidSignature or AssociateNotEligible, or an
outage longer than its budget), for all marketplaces or one.

Outages (reliability B13, B15): while a key cannot reach the API or its token endpoint, it
pauses with a growing, jittered interval, and its batches wait without spending attempts.
Any HTTP answer from the API ends the outage. One that lasts ``outage_budget_s`` takes the
key out of rotation with the code ``EndpointUnavailable``, so a run stops (``broker run``
exits 69) with its unfinished rows pending instead of failing them.
"""

from __future__ import annotations

import asyncio
import enum
import math
import random
from collections.abc import Callable, Collection, Sequence
from datetime import datetime, time, timedelta
from typing import TYPE_CHECKING

from broker.api.marketplaces import credential_version
from broker.api.marketplaces import marketplace as lookup_marketplace
from broker.engine.adaptive import (
    AdaptiveRate,
    AdaptiveSettings,
    Circuit,
    CircuitState,
    ThrottleVerdict,
)
from broker.engine.limiter import KeyLimiter, LocalKeyLimiter, Pacer
from broker.engine.metrics import QUOTA_WAIT, KeySnapshot
from broker.engine.quota import BudgetStore, DailyBudget
from broker.engine.retry import RetryBudget
from broker.engine.shared_limiter import SendRefused, SharedState, shared_key_parts
from broker.errors import KeyUnusableError, ThrottledError
from broker.logs import get_logger

if TYPE_CHECKING:
    from broker.clock import Clock
    from broker.config import BrokerConfig, KeyConfig
    from broker.engine.authorizer import Authorizer

__all__ = [
    "OUTAGE_CODE",
    "OUTAGE_CODES",
    "OUTAGE_RETRY_S",
    "STATE_OUTAGE_CODE",
    "CredentialsVerdict",
    "KeyHealth",
    "KeyState",
    "markets_out_reason",
]

logger = get_logger("broker")

#: Pause after a token-endpoint failure, doubling per consecutive failure up to the cap.
_AUTH_PAUSE_S = 1.0
_AUTH_PAUSE_CAP_S = 60.0
#: Pause after the API endpoint could not be reached, doubling per round up to the cap.
_OUTAGE_PAUSE_S = 1.0
_OUTAGE_PAUSE_CAP_S = 60.0
#: Transient failures in a row (across the key's batches) after which the key waits between
#: attempts as in an outage, one at a time (see ``KeyState.failing_systemically``).
_SYSTEMIC_FAILURES = 10
#: The code a key taken out by an outage carries (``broker run`` maps it to exit 69).
OUTAGE_CODE = "EndpointUnavailable"
#: The code a key taken out by its shared key-state store's outage carries (exit 69 too).
STATE_OUTAGE_CODE = "StateUnavailable"
#: The codes of outages: they end by themselves, so a key taken out by one is tried again.
OUTAGE_CODES = frozenset({OUTAGE_CODE, STATE_OUTAGE_CODE})
#: A key an outage took out is tried again, once, by a call made this long after: a broker
#: kept for the life of an application outlives the outage (see ``KeyState.revive``).
OUTAGE_RETRY_S = 30.0
#: A failure this long after the previous one starts a new outage: a continuing outage fails
#: again at least once per longest pause (plus a timeout), so a longer silence means the key
#: was idle, not that the endpoint stayed down, and must not count toward the budget.
_OUTAGE_GAP_S = 2 * max(_OUTAGE_PAUSE_CAP_S, _AUTH_PAUSE_CAP_S)
#: A parked key reads its circuit again this often: another process may have closed it (the
#: limiter's keep-alive brings the store's word at least as often).
_PARKED_RECHECK_S = 30.0
#: The longest park a Retry-After sets: a day, the longest a daily quota lasts.
_LONGEST_TOLD_PARK_S = 86_400.0
#: A park the server gave no length for probes at the latest this long after the key's
#: daily reset: an account whose quota is lower than its tpd spends it while the key's own
#: count is far from spent, and parks of 15 to 60 minutes ran on past the reset, so each day
#: began late. The minute allows for Amazon's clock and this one disagreeing.
_AFTER_RESET_S = 60.0
#: What ``broker.key_parked`` tells its reader to do, by verdict.
_PARK_REMEDY = {
    ThrottleVerdict.QUOTA_EXHAUSTED: (
        "None needed: the key probes now and then (just after its daily reset at the "
        "latest, unless Amazon's Retry-After named a later time), and sends again once "
        "Amazon's daily window has reset. To finish sooner, add keys of "
        "other accounts; if this comes well before the key's tpd is spent, the account's "
        "quota is lower than tpd says: lower it."
    ),
    ThrottleVerdict.ACCESS_REVOKED: (
        "Amazon answers only 429s, even at the lowest rate with the day's quota left: the "
        "account may not be eligible yet or may have lost API access (no referred sales in "
        "30 days). Check it in Associates Central; the key probes now and then meanwhile, "
        "and just after the daily reset at the latest."
    ),
}
#: Refusals in a row that reject a key's credentials whatever else is waiting: one batch's
#: three (its first credentials and two fresh ones) and another batch's three.
_REJECT_AFTER = 6


class CredentialsVerdict(enum.Enum):
    """What a key's requests say of its credentials after a batch's fresh ones were refused."""

    #: a request sent since was accepted: they work, and the refusals were the server's noise
    ACCEPTED = "accepted"
    #: refused again and again, and nothing left to say otherwise: take the key out
    REJECTED = "rejected"
    #: requests in flight or waiting may yet say either: let them go first
    UNDECIDED = "undecided"


class KeyHealth(enum.Enum):
    """Where a key stands."""

    #: sending at its (adaptive) rate
    ACTIVE = "active"
    #: waiting out a Retry-After or a token-endpoint failure
    PAUSED = "paused"
    #: circuit open: quota exhausted or access revoked; probed rarely
    PARKED = "parked"
    #: a key-level error took it out of rotation until the config is fixed
    DISABLED = "disabled"


def markets_out_reason(markets_out: Sequence[tuple[str, str]]) -> str:
    """A key's reason for the marketplaces it is out of, short, from its (marketplace, code)
    pairs (the live progress line shows it; each remedy is in its ``broker.key_disabled``
    event). A key out of all of them is disabled with this as its reason, which tells it
    from a key rejected as a whole."""
    return "out of rotation for " + ", ".join(f"{market} ({code})" for market, code in markets_out)


class KeyState:
    """Everything the dispatcher and the executor need to know about one key."""

    def __init__(
        self,
        config: KeyConfig,
        authorizer: Authorizer,
        *,
        limiter: KeyLimiter,
        adaptive: AdaptiveRate,
        circuit: Circuit,
        retry_budget: RetryBudget,
        clock: Clock,
        outage_budget_s: float = 900.0,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.name = config.name
        self.authorizer = authorizer
        self.limiter = limiter
        self.adaptive = adaptive
        self.circuit = circuit
        self.retry_budget = retry_budget
        self._clock = clock
        self._slots = asyncio.Semaphore(config.max_in_flight)
        self._in_flight = 0
        # Set whenever a request of the key ends: the dispatcher's wait for one at a time.
        self._request_ended = asyncio.Event()
        self.sent = 0
        self.throttled = 0
        self.errors = 0
        self._auth_failures = 0
        self._auth_paused_at = -math.inf
        # Per marketplace: the send time of the last accepted request, and the refusals of
        # credentials since (a region may refuse what another accepts).
        self._accepted_sent_at: dict[str, float] = {}
        self._refused_in_a_row: dict[str, int] = {}
        self._disabled: KeyUnusableError | None = None
        self._disabled_at = -math.inf
        self._disabled_markets: dict[str, KeyUnusableError] = {}
        # active_marketplaces() while the key is in rotation, and how many marketplaces were
        # out when it was made (the map only grows): read four times per send.
        self._active: tuple[str, ...] = ()
        self._active_for = -1
        self._paused_reason: str | None = None
        # This process's own hold (monotonic): a token endpoint or a network this process
        # cannot reach is its trouble, not every process's (the shared state is not told).
        self._local_hold_until = -math.inf
        # the reset of the daily window whose spent quota was last logged
        self._quota_noted: datetime | None = None
        # True from the hold by another process's lower tpd being logged to the next send
        self._quota_held_noted = False
        # The shared state may say the day is spent while the limiter waits (another process
        # spent it): the warning must not depend on this process reaching a send.
        limiter.add_refusal_listener(lambda _refusal, _wait_s: self._note_quota_spent())
        #: how long an outage (no answer from the endpoints) may last before the key is out
        self.outage_budget_s = outage_budget_s
        self._jitter = jitter
        self._outage_since: float | None = None
        self._outage_last = -math.inf
        #: When the API last gave a usable answer: an outage begins no earlier.
        self._reachable_at = -math.inf
        self._outage_rounds = 0
        # Transient failures (5xx, resets, unreadable answers) since the last usable answer,
        # and when the last one came.
        self._failing = 0
        self._failing_last = -math.inf
        self._outage_paused_at = -math.inf
        # Revived after an outage took the key out: its budget is spent, so the next
        # failure to reach the endpoint takes it out again at once.
        self._outage_probe = False

    @classmethod
    def from_config(
        cls,
        key: KeyConfig,
        authorizer: Authorizer,
        *,
        config: BrokerConfig,
        clock: Clock,
        rng: random.Random,
        budget_store: BudgetStore | None = None,
        shared: SharedState | None = None,
    ) -> KeyState:
        """Build a key's state with the rate settings of ``config`` (in ``shared``'s store)."""
        rate = config.rate
        settings = AdaptiveSettings(
            beta=rate.beta,
            target_loss=rate.target_429_share,
            min_rate_per_s=min(rate.min_rate, key.tps),
            discover=rate.discover,
            retry_after_cap_s=rate.retry_after_cap_s,
        )
        limiter: KeyLimiter
        adaptive: AdaptiveRate
        circuit: Circuit
        if shared is not None:
            limiter, adaptive, circuit = shared_key_parts(
                key, config=config, settings=settings, clock=clock, random=rng.random, shared=shared
            )
        else:
            budget = DailyBudget(
                clock,
                key.tpd,
                key_name=key.name,
                guard_fraction=rate.tpd_guard,
                reset_time_utc=time(
                    rate.daily_reset_s // 3_600,
                    rate.daily_reset_s // 60 % 60,
                    rate.daily_reset_s % 60,
                ),
                store=budget_store,
            )
            limiter = LocalKeyLimiter(clock, Pacer(clock, key.tps), budget)
            adaptive = AdaptiveRate(key.tps, clock=clock, settings=settings)
            circuit = Circuit(clock, random=rng.random, settings=settings)
        return cls(
            key,
            authorizer,
            limiter=limiter,
            adaptive=adaptive,
            circuit=circuit,
            retry_budget=RetryBudget(clock),
            clock=clock,
            outage_budget_s=config.retry.outage_budget_s,
            jitter=rng.random,
        )

    # -- marketplaces -------------------------------------------------------------------------

    @property
    def tagged_marketplaces(self) -> Collection[str]:
        """Every marketplace this key has a partner tag for."""
        return self.config.partner_tags.keys()

    def has_tag(self, marketplace: str) -> bool:
        """True if the key has a partner tag for ``marketplace``."""
        return marketplace in self.config.partner_tags

    def partner_tag(self, marketplace: str) -> str:
        """The key's tracking id in ``marketplace``."""
        return self.config.partner_tags[marketplace]

    def region(self, marketplace: str) -> str:
        """The SigV4 region of ``marketplace`` (PA-API; unused by the Creators API)."""
        try:
            return lookup_marketplace(marketplace).paapi_region
        except ValueError:
            return "us-east-1"

    def serves(self, marketplace: str) -> bool:
        """True while the key may be given work for ``marketplace``."""
        return (
            self._disabled is None
            and marketplace not in self._disabled_markets
            and self.has_tag(marketplace)
        )

    def active_marketplaces(self) -> Collection[str]:
        """Marketplaces the key takes work for right now."""
        if self._disabled is not None:
            return ()
        out = self._disabled_markets
        if self._active_for != len(out):
            self._active = tuple(m for m in self.config.partner_tags if m not in out)
            self._active_for = len(out)
        return self._active

    def failure_for(self, marketplace: str) -> KeyUnusableError | None:
        """Why the key cannot serve ``marketplace``, if it cannot."""
        return self._disabled or self._disabled_markets.get(marketplace)

    # -- slots and pacing ---------------------------------------------------------------------

    async def acquire_slot(self) -> None:
        """Wait for an in-flight slot (at most ``max_in_flight`` requests at once)."""
        await self._slots.acquire()

    def release_slot(self, *, sent: bool = False) -> None:
        """Give back an in-flight slot (``sent``: its request, booked by try_send, is done)."""
        if sent:
            self._in_flight -= 1
            self._request_ended.set()
        self._slots.release()

    async def wait_ready(self) -> None:
        """Wait until the key may send: its pacer slot, pause, circuit and daily budget."""
        while True:
            # This process's own hold first: a probe slot claimed below must be used at once.
            now = self._clock.monotonic()
            if now < self._local_hold_until:
                await self._clock.sleep(self._local_hold_until - now)
                continue
            if self.circuit.state is CircuitState.PROBING:
                await self._clock.sleep(1.0)
                continue
            if self._in_flight and self.failing_systemically:
                # While every answer fails, one request at a time: each costs its batch an
                # attempt, so a burst after each pause would fail batches for nothing.
                self._request_ended.clear()
                await self._request_ended.wait()
                continue
            probe_at = self.circuit.probe_at
            if probe_at is not None and not math.isinf(probe_at):
                now = self._clock.monotonic()
                if now < probe_at:
                    await self._clock.sleep(min(probe_at - now, _PARKED_RECHECK_S))
                    continue
                if not self.circuit.try_probe():
                    await self._clock.sleep(1.0)
                    continue
            await self.limiter.wait_ready()
            if self._clock.monotonic() < self._local_hold_until:
                # A hold of this process's came in while the limiter waited (N7); a probe
                # slot claimed above goes back, or the circuit would wait on it for good.
                self.circuit.abandon_probe()
                continue
            self._paused_reason = None
            return

    def next_ready(self) -> float:
        """Monotonic time the key may send next: its limiter's answer and this process's own
        hold (an outage or a failing token endpoint seen here)."""
        return max(self.limiter.next_ready(), self._local_hold_until)

    def abandon_probe(self) -> None:
        """A probe slot :meth:`wait_ready` admitted was not used: hand it to the next send."""
        self.circuit.abandon_probe()

    async def try_send(self, booked: Callable[[], None] | None = None) -> float | None:
        """Book a send now; None when the daily budget is spent (wait_ready again).

        ``booked`` is called once the send is counted, before the wait for its slot.
        """
        if self.limiter.exhausted:
            self._note_quota_spent()
            return None
        try:
            sent_at = await self.limiter.commit(booked)
        except SendRefused:
            # Another process spent the day or parked the key meanwhile; the limiter told
            # the refusal listeners, a spent day's warning among them.
            return None
        # Counted here, not when the slot is taken: a dispatcher holds a slot while it
        # waits for work, and an idle key must not show a request in flight.
        self._in_flight += 1
        self._quota_held_noted = False
        return sent_at

    def _note_quota_spent(self) -> None:
        """Warn once per daily window that the key now waits for its reset: lookups that only
        it can serve wait for hours, and a library caller should learn why from the log.
        A hold by another process's lower tpd is told once per hold (at info level: it
        lapses when that process closes). Nothing when the quota is not spent (a refusal
        for another reason)."""
        if not self.limiter.exhausted:
            return
        resets_at = self.limiter.resets_at()
        until = self.limiter.quota_until()
        if until < resets_at:
            # Only another process's lower tpd holds the key (a lookup with a lower one):
            # not this config's quota, and not until the reset.
            if not self._quota_held_noted:
                self._quota_held_noted = True
                logger.info(
                    "broker.daily_quota_held",
                    key=self.name,
                    spent=self.limiter.spent,
                    until=_utc_text(until),
                    note="another process on this key keeps a lower tpd; it lapses when "
                    "that process closes",
                )
            return
        if self._quota_noted == resets_at:
            return
        self._quota_noted = resets_at
        logger.warning(
            "broker.daily_quota_spent",
            key=self.name,
            spent=self.limiter.spent,
            resets_at=_utc_text(resets_at),
        )

    # -- feedback -----------------------------------------------------------------------------

    def on_success(self, sent_at: float, marketplace: str, *, demand_limited: bool) -> None:
        """A request of this key for ``marketplace`` was answered (not throttled)."""
        self._auth_failures = 0
        accepted = self._accepted_sent_at.get(marketplace, -math.inf)
        self._accepted_sent_at[marketplace] = max(accepted, sent_at)
        self._refused_in_a_row[marketplace] = 0
        if self.circuit.verdict is not None:
            self.circuit.on_success()
            self.adaptive.reset()
            logger.info("broker.key_recovered", key=self.name)
        self.limiter.set_rate(self.adaptive.on_success(demand_limited=demand_limited))

    def on_credentials_refused(self, marketplace: str) -> None:
        """A request for ``marketplace`` was refused for its token or signature (a 401 a
        fresh one may fix)."""
        self._refused_in_a_row[marketplace] = self._refused_in_a_row.get(marketplace, 0) + 1

    def judge_credentials(
        self, since: float, marketplace: str, *, others_waiting: bool
    ) -> CredentialsVerdict:
        """Judge the key's credentials in ``marketplace`` once a batch first refused at
        ``since`` had its fresh credentials refused too (``others_waiting``: other work for
        the marketplace could be sent on this key).

        Credentials are taken just before a send, so a request sent since ``since`` carried
        credentials at least as fresh as the refused ones: one accepted in the marketplace
        means they work. A batch alone proves nothing either way while others are in flight
        or waiting, since a server may refuse a valid token now and then; ``_REJECT_AFTER``
        refusals in a row there, or no other request to ask, reject them.
        """
        if self._accepted_sent_at.get(marketplace, -math.inf) >= since:
            return CredentialsVerdict.ACCEPTED
        if self._refused_in_a_row.get(marketplace, 0) >= _REJECT_AFTER:
            return CredentialsVerdict.REJECTED
        # This request still holds its own in-flight place until its send task ends.
        if self._in_flight > 1 or others_waiting:
            return CredentialsVerdict.UNDECIDED
        return CredentialsVerdict.REJECTED

    def region_left_out(self, marketplace: str) -> str | None:
        """The region of the key's Creators credential version when ``marketplace`` lies
        outside it (Amazon refuses its tokens there, InvalidIssuer, whatever it accepts in
        its own region); None for a PA-API key or a marketplace of its region."""
        if self.config.version is None:
            return None
        region = credential_version(self.config.version).region
        return None if lookup_marketplace(marketplace).region is region else region.value

    def accepted_elsewhere(self, marketplace: str) -> bool:
        """True when the credentials were accepted in another marketplace, and not refused
        there since: their rejection is ``marketplace``'s alone (a region they do not
        cover). Were they revoked for good, that marketplace's own refusals take it out
        too at its next requests."""
        return any(
            m != marketplace and not self._refused_in_a_row.get(m, 0)
            for m in self._accepted_sent_at
        )

    def on_throttled(self, error: ThrottledError, sent_at: float) -> ThrottleVerdict:
        """A request was answered 429: cut the rate, honour Retry-After, or park the key."""
        self.throttled += 1
        spent = self.limiter.exhausted
        verdict = self.adaptive.on_throttled(
            sent_at,
            budget_exhausted=spent,
            quota_used=self.limiter.used_fraction,
            retry_after_s=error.retry_after,
            answered_today=self._answered_today(),
        )
        self.limiter.set_rate(self.adaptive.rate)
        pause = self.adaptive.pause_for(error.retry_after)
        if pause > 0:
            self.limiter.pause_until(self._clock.monotonic() + pause, reason="Retry-After")
            self._paused_reason = "Retry-After"
        parked_as = verdict if verdict is not ThrottleVerdict.RATE else self.circuit.verdict
        told = error.retry_after if error.retry_after is not None else 0.0
        if (
            spent
            and verdict is ThrottleVerdict.QUOTA_EXHAUSTED
            and told < self.adaptive.settings.park_s
            and self.circuit.state is CircuitState.CLOSED
            # Held until the reset by this config's own tpd, not only by another process's
            # lower one, which lapses when that process closes (the key would then send
            # into Amazon's spent quota until ten 429s parked it).
            and self.limiter.quota_until() >= self.limiter.resets_at()
        ):
            # The key's own daily count is spent: its daily limit holds it until the reset
            # already, and a park (15 minutes and more) could outlast that reset (a 429 in
            # flight at 23:59 held the key, and every run of it, until 00:15). A parked
            # key's probe is settled as before, parked again: left unsettled, the key
            # stayed probing for good.
            parked_as = None
        if parked_as is not None and self.circuit.state is not CircuitState.OPEN:
            # A Retry-After of hours is the server's own reset: no probe before it (a day
            # at most: no daily quota is longer).
            until_reset = self.limiter.resets_at() - self.limiter.wall_now()
            probe_at = self.circuit.open(
                parked_as,
                at_least_s=min(told, _LONGEST_TOLD_PARK_S) if told > 0 else 0.0,
                at_most_s=max(0.0, until_reset.total_seconds()) + _AFTER_RESET_S,
            )
            logger.warning(
                "broker.key_parked",
                key=self.name,
                verdict=parked_as.value,
                probe_in_s=round(probe_at - self._clock.monotonic()),
                remedy=_PARK_REMEDY.get(parked_as),
            )
        return verdict

    def _answered_today(self) -> bool:
        """True when a request of this key sent in today's daily window was answered."""
        answered = max(self._accepted_sent_at.values(), default=-math.inf)
        if answered == -math.inf:
            return False
        ago = timedelta(seconds=self._clock.monotonic() - answered)
        day_start = self.limiter.resets_at() - timedelta(days=1)
        return self.limiter.wall_now() - ago >= day_start

    def on_failed_attempt(self, *, transient: bool, reached: bool = True) -> None:
        """An attempt ended without a 2xx or a 429: settle the parked key's probe, if it was one.

        Without this a probe that met anything but a success or a 429 would leave the
        circuit half-open for good, and the key would never send again. A transient failure
        (5xx, reset, network, token endpoint) says nothing about the quota: the key probes
        again after a short wait. One that never ``reached`` Amazon (this process's network
        or token endpoint, or a bug of its own) is this process's trouble: shared, any
        other process may probe at once. Any other answer got past Amazon's throttle: the
        key is back.
        """
        verdict = self.circuit.verdict
        if self.circuit.state is not CircuitState.PROBING or verdict is None:
            return
        if transient:
            self.circuit.probe_unsettled(hand_on=not reached)
            probe_at = self.circuit.probe_at or self._clock.monotonic()
            logger.info(
                "broker.probe_unsettled",
                key=self.name,
                verdict=verdict.value,
                probe_in_s=round(probe_at - self._clock.monotonic()),
            )
            return
        self.circuit.on_success()
        self.adaptive.reset()
        logger.info("broker.key_recovered", key=self.name)

    def pause_after_error(self, error: BaseException, sent_at: float) -> bool:
        """The token endpoint failed: back off exponentially before the key sends again.

        Without a token the key can send nothing, so this counts toward the outage budget.
        Attempts begun before the current pause (the batches that waited on one single-flight
        token fetch) share its round: only an attempt begun after it doubles the pause.

        Returns:
            True when the outage has lasted ``outage_budget_s``: take the key out.
        """
        spent = self._outage_spent(sent_at)
        if sent_at <= self._auth_paused_at or spent:
            # No attempt can begin inside the pause, so one stamped at or before its start
            # waited on the fetch that set it (a coarse clock may stamp both alike). A spent
            # budget takes the key out: no pause to begin.
            return spent
        self._auth_failures += 1
        pause = min(_AUTH_PAUSE_CAP_S, _AUTH_PAUSE_S * 2 ** min(self._auth_failures, 10))
        asked = getattr(error, "retry_after", None)
        if isinstance(asked, int | float) and asked > 0:
            # A throttling token endpoint's Retry-After: asked again sooner, it throttles
            # again (it was asked twice in 5 s after saying 30).
            pause = max(pause, min(float(asked), _AUTH_PAUSE_CAP_S))
        pause = min(pause, self._budget_left())
        self._paused_reason = f"token endpoint: {type(error).__name__}"
        now = self._clock.monotonic()
        self._auth_paused_at = now
        self._local_hold_until = max(self._local_hold_until, now + pause)
        logger.warning(
            "broker.token_fetch_failed",
            key=self.name,
            error=type(error).__name__,
            cause=str(error),
            pause_s=round(pause, 3),
        )
        return spent

    def on_failed_answer(self) -> None:
        """The API failed an attempt transiently: a 5xx, a reset, an unreadable answer.

        A failure long after the previous one starts the streak afresh, as an outage does:
        a storm that outlasted a daemon's last job must not make tomorrow's first 5xx one.
        """
        now = self._clock.monotonic()
        if now - self._failing_last > _OUTAGE_GAP_S:
            self._failing = 0
        self._failing += 1
        self._failing_last = now

    @property
    def failing_systemically(self) -> bool:
        """True once the key's last ``_SYSTEMIC_FAILURES`` attempts all failed transiently.

        Sporadic 5xx and resets are each batch's to retry (B3). A streak this long, across
        the key's batches, is most likely the API (or the way to it) failing as a whole: the
        key then waits between attempts as in an outage (B15), and sends one at a time, so a
        storm costs an attempt a minute instead of every batch's attempts within seconds.
        """
        return self._failing >= _SYSTEMIC_FAILURES

    def on_unreachable(
        self, error: BaseException, sent_at: float, *, failing: bool = False
    ) -> bool:
        """No connection to the API or its token endpoint (``failing``: no usable answer
        from it, see :attr:`failing_systemically`): pause the key, longer each round.

        Requests sent before the current pause began fail together (up to ``max_in_flight``
        of them); only one sent after it starts a new, doubled round, as a 429 cuts the rate
        once per round. The pause is jittered so keys and machines do not probe in step.

        Returns:
            True when the outage has lasted ``outage_budget_s``: take the key out.
        """
        spent = self._outage_spent(sent_at)
        now = self._clock.monotonic()
        if sent_at >= self._outage_paused_at and not spent:
            self._outage_rounds += 1
            ceiling = min(
                _OUTAGE_PAUSE_CAP_S, _OUTAGE_PAUSE_S * 2 ** min(self._outage_rounds - 1, 10)
            )
            pause = min(ceiling * (0.5 + 0.5 * self._jitter()), self._budget_left())
            self._outage_paused_at = now
            state = "failing" if failing else "unreachable"
            self._paused_reason = f"endpoint {state}: {type(error).__name__}"
            self._local_hold_until = max(self._local_hold_until, now + pause)
            logger.warning(
                "broker.endpoint_failing" if failing else "broker.endpoint_unreachable",
                key=self.name,
                error=type(error).__name__,
                cause=str(error),
                pause_s=round(pause, 3),
                outage_s=round(self.outage_s, 3),
            )
        return spent

    def on_reachable(self) -> None:
        """The API gave a usable answer (a 2xx, a 429, or an error that is not transient):
        an outage, if there was one, is over."""
        self._failing = 0
        if self._outage_since is not None:
            logger.info(
                "broker.endpoint_reachable",
                key=self.name,
                outage_s=round(self._clock.monotonic() - self._outage_since, 3),
            )
        self._outage_since = None
        self._outage_rounds = 0
        self._outage_paused_at = -math.inf
        self._outage_probe = False
        self._reachable_at = self._clock.monotonic()

    def _outage_spent(self, sent_at: float) -> bool:
        """Count a failure toward the outage it belongs to; True once that outage has lasted
        ``outage_budget_s``.

        An outage begins when its first failed attempt began (``sent_at``), not when the
        failure was told: a token fetch or a request that hangs until its timeout is time
        without an answer too (a lookup's 5-s budget took 63 s: two 30-s hangs before the
        clock started). Never before the last usable answer, which another attempt may have
        had while this one hung.
        """
        now = self._clock.monotonic()
        if self._outage_probe:
            return True
        if self._outage_since is None or now - self._outage_last > _OUTAGE_GAP_S:
            self._outage_since = max(min(sent_at, now), self._reachable_at)
            self._outage_rounds = 0
            self._outage_paused_at = -math.inf
        self._outage_last = now
        return now - self._outage_since >= self.outage_budget_s

    def _budget_left(self) -> float:
        """Seconds of the outage budget left: no pause runs past it (the key would send
        nothing until then, and go out of rotation only at its end)."""
        return max(0.0, self.outage_budget_s - self.outage_s)

    @property
    def outage_s(self) -> float:
        """Seconds the current outage has lasted (0 when the endpoints answer)."""
        if self._outage_since is None:
            return 0.0
        return self._clock.monotonic() - self._outage_since

    def disable(
        self, code: str, message: str, remedy: str, *, marketplace: str | None = None
    ) -> bool:
        """Take the key (or the key in one marketplace) out of rotation; True if newly done."""
        failure = KeyUnusableError(self.name, code, message, remedy)
        if marketplace is None:
            if self._disabled is not None:
                return False
            self._disabled = failure
            self._disabled_at = self._clock.monotonic()
            return True
        if marketplace in self._disabled_markets:
            return False
        self._disabled_markets[marketplace] = failure
        return True

    @property
    def out_by_outage(self) -> bool:
        """True while an outage (of the endpoint, or of the key-state store) holds the key
        out of rotation: :meth:`revive` may bring it back."""
        return self._disabled is not None and self._disabled.code in OUTAGE_CODES

    @property
    def revive_due(self) -> float:
        """When :meth:`revive` may bring the key back (the key's clock); inf: it may not."""
        return self._disabled_at + OUTAGE_RETRY_S if self.out_by_outage else math.inf

    def revive(self) -> bool:
        """Bring the key back into rotation if an outage took it out ``OUTAGE_RETRY_S`` ago
        or more; True if it came back.

        Only an outage (of the endpoint, or of the shared key-state store): the network,
        the API or Redis may be back by now, where a rejected credential stays rejected. The
        revived key's outage budget stays spent, so a call that finds the endpoint (or the
        store: its limiter keeps its own outage's start until it answers) still down fails
        after one attempt rather than waiting out a whole new budget; an answer ends the
        outage as usual. A key the store's outage took out has spent no endpoint budget.
        """
        failure = self._disabled
        if failure is None or failure.code not in OUTAGE_CODES:
            return False
        waited_s = self._clock.monotonic() - self._disabled_at
        if waited_s < OUTAGE_RETRY_S:
            return False
        self._disabled = None
        self._outage_probe = failure.code == OUTAGE_CODE
        self._paused_reason = None
        logger.info("broker.key_revived", key=self.name, out_s=round(waited_s, 3))
        return True

    # -- introspection ------------------------------------------------------------------------

    @property
    def health(self) -> KeyHealth:
        """The key's state now: disabled too when every marketplace it has a tag for left
        rotation (a wrong tag on its only store), though no failure condemned the key."""
        if self._disabled is not None:
            return KeyHealth.DISABLED
        if self._disabled_markets and not self.active_marketplaces():
            return KeyHealth.DISABLED
        # Parked here, or by another process of the key (its shared state says so): this
        # process sends nothing either, and /readyz, /metrics and --no-wait must say why.
        if self._park() is not None:
            return KeyHealth.PARKED
        if self._paused_reason is not None or self.limiter.blocked_reason is not None:
            return KeyHealth.PAUSED
        return KeyHealth.ACTIVE

    def _park(self) -> tuple[str, datetime | None] | None:
        """Why the key is parked and when its probe is due: by this process's circuit, else
        by another process (the shared state's park); None when it is not parked."""
        verdict = self.circuit.verdict
        if verdict is None:
            return self.limiter.parked()
        probe_in_s = (self.circuit.probe_at or -math.inf) - self._clock.monotonic()
        if probe_in_s <= 0:
            return verdict.value, None
        # Told by the limiter's wall clock (the shared store's), as the daily reset is: a
        # machine whose clock is hours off shows the same probe time as the others.
        return verdict.value, self.limiter.wall_now() + timedelta(seconds=probe_in_s)

    def snapshot(self) -> KeySnapshot:
        """The key's counters and state as a value."""
        reason: str | None = None
        until: str | None = None
        health = self.health
        if health is KeyHealth.DISABLED:
            disabled = self._disabled
            reason = (
                self._markets_out() if disabled is None else f"{disabled.code}: {disabled.remedy}"
            )
        elif health is KeyHealth.PARKED and (park := self._park()) is not None:
            reason, probe_at = park
            if self.limiter.exhausted:
                # Its daily count is spent too: nothing goes before the count lets it (the
                # reset, for its own limit), whatever the probe time (a 429 on the request
                # that took the last of the budget).
                spendable = self.limiter.quota_until()
                probe_at = spendable if probe_at is None else max(probe_at, spendable)
            until = None if probe_at is None else _utc_text(probe_at)
        elif self.limiter.exhausted:
            reason = QUOTA_WAIT
            until = _utc_text(self.limiter.quota_until())
        elif health is KeyHealth.PAUSED:
            reason = self.limiter.blocked_reason or self._paused_reason
            ready_in_s = self.next_ready() - self._clock.monotonic()
            if self.limiter.blocked_reason is None and ready_in_s > 0:
                # On the limiter's wall clock (the shared store's), as the other untils are.
                until = _utc_text(self.limiter.wall_now() + timedelta(seconds=ready_in_s))
        elif self._disabled_markets:
            reason = self._markets_out()  # active in the others
        return KeySnapshot(
            name=self.name,
            state=health.value,
            rate=self.limiter.rate,
            configured_tps=self.config.tps,
            in_flight=self._in_flight,
            sent=self.sent,
            throttled=self.throttled,
            errors=self.errors,
            daily_spent=self.limiter.spent,
            daily_limit=self.config.tpd,
            daily_resets_at=_utc_text(self.limiter.resets_at()) if self.config.tpd else None,
            reason=reason,
            until=until,
            daily_left=self.limiter.remaining,
            marketplaces=tuple(self.active_marketplaces()),
            markets_out=tuple(
                (market, failure.code) for market, failure in self._disabled_markets.items()
            ),
        )

    def _markets_out(self) -> str:
        return markets_out_reason(
            [(market, failure.code) for market, failure in self._disabled_markets.items()]
        )

    def __repr__(self) -> str:
        return f"KeyState({self.name!r}, {self.health.value}, rate={self.limiter.rate:.3g}/s)"


def _utc_text(moment: datetime) -> str:
    """An instant as the snapshots and logs show it: ISO 8601 UTC to the second."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
