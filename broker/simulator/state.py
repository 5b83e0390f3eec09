"""The live state of one simulator app: accounts, tokens, quotas, counters, faults and clocks.

Both protocol front ends share one :class:`Simulator`, so a key's quota and counters are the
same whichever route it calls, and ``/_sim/control`` changes apply everywhere at once.
"""

from __future__ import annotations

import asyncio
import math
import random
from datetime import datetime, timedelta
from email.utils import format_datetime
from typing import TYPE_CHECKING

from broker.simulator.accounts import Account, AccountRegistry
from broker.simulator.faults import FaultInjector
from broker.simulator.quota import KeyQuota, QuotaDecision
from broker.simulator.stats import SimulatorStats
from broker.simulator.tokens import TokenStore

if TYPE_CHECKING:
    from broker.clock import Clock
    from broker.simulator.settings import SimulatorSettings

__all__ = ["Simulator"]


class Simulator:
    """Everything that changes while the simulator runs.

    Attributes:
        settings: the settings it was created with (never changed).
        clock: the simulator's clock (monotonic for quotas and tokens, wall for dates).
        accounts: every known key.
        tokens: issued Creators API access tokens.
        quotas: per account name, its TPS bucket and TPD counter (tps/tpd adjustable).
        stats: the counters.
        faults: the seeded latency and fault draws.
        limits: whether quotas are enforced (``/_sim/control`` can flip it).
        shuffle: the seeded RNG that shuffles item order.
        stopping: set when the app shuts down, so hanging responses end.
    """

    def __init__(self, settings: SimulatorSettings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self.accounts = AccountRegistry(settings.all_accounts)
        self.tokens = TokenStore()
        self.quotas: dict[str, KeyQuota] = {
            a.name: KeyQuota(a.tps, a.tpd, settings.burst) for a in self.accounts.accounts()
        }
        self.stats = SimulatorStats()
        for account in self.accounts.accounts():
            self.stats.account(account.name)
        self.faults = FaultInjector(settings.faults, settings.latency, settings.seed)
        self.limits = settings.limits
        self.shuffle = random.Random(f"shuffle/{settings.seed}")
        self.stopping = asyncio.Event()
        self._skew = timedelta(seconds=settings.clock_skew_s)
        self._date_second: int | None = None
        self._date_text = ""

    def wall(self) -> datetime:
        """The simulator's wall clock (UTC), including the configured skew."""
        return self.clock.utcnow() + self._skew

    def http_date(self) -> str:
        """The ``Date`` header value (RFC 1123) of the skewed wall clock, cached per second."""
        now = self.wall()
        second = int(now.timestamp())
        if second != self._date_second:
            self._date_second = second
            self._date_text = format_datetime(now.replace(microsecond=0), usegmt=True)
        return self._date_text

    def admit(self, account: Account) -> QuotaDecision:
        """Charge one transaction to ``account``, or refuse it; counts either way."""
        stats = self.stats.account(account.name)
        now = self.clock.monotonic()
        if self.limits:
            decision = self.quotas[account.name].check(now, self.wall())
        else:
            decision = QuotaDecision(True)
        if decision.allowed:
            stats.accepted += 1
            stats.accepted_at.append(now)
        else:
            stats.throttled += 1
            stats.throttled_at.append(now)
        return decision

    def retry_after(self, decision: QuotaDecision) -> int:
        """Whole seconds a 429 asks the client to wait (fixed setting, else the real wait)."""
        fixed = self.settings.retry_after_s
        wait = decision.retry_after_s if fixed is None else fixed
        return max(0 if fixed is not None else 1, math.ceil(wait))
