"""The simulator's API keys: who may call, with which secret, tags, flags and quotas.

Secrets here are fake credentials of the local simulator, never Amazon's, so they may be
written in config.toml. The demo accounts (:data:`DEMO_ACCOUNTS`) let a fresh clone work with
no setup; their secrets are documented in the README.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from broker.simulator.settings import SimulatorSettings

__all__ = [
    "CREATORS_VERSIONS",
    "DEMO_ACCOUNTS",
    "Account",
    "AccountRegistry",
    "Protocol",
    "simulator_secret",
]

Protocol = Literal["creators", "paapi5"]

#: Creators API credential versions: 2.x are Cognito credentials, 3.x Login with Amazon.
CREATORS_VERSIONS = ("2.1", "2.2", "2.3", "3.1", "3.2", "3.3")


@dataclass(frozen=True, slots=True)
class Account:
    """One key the simulator knows.

    Attributes:
        name: a label used in stats and ``/_sim/control``.
        protocol: ``"creators"`` or ``"paapi5"``.
        credential_id: the Creators credential id (OAuth ``client_id``) or the PA-API access key.
        secret: the Creators credential secret or the PA-API secret key.
        version: Creators credential version (``2.1`` .. ``3.3``); empty for PA-API.
        partner_tags: marketplace -> the tracking ids of this key's store there.
        not_enabled: PA-API answers ``AccessDenied`` (key not enabled for the API).
        aws_credentials: PA-API answers ``AccessDeniedAwsUsers`` (an AWS key, not an
            Associates one).
        not_eligible: Creators answers 403 ``AssociateNotEligible``; PA-API answers every
            request 429 ``TooManyRequests``, as Amazon does for an account without sales.
        no_store: both answer ``InvalidAssociate`` (key not mapped to a store).
        tps: transactions per second allowed.
        tpd: transactions per day allowed (the day starts at 00:00 UTC).
        every_region: a demo account: its Creators tokens serve every marketplace (the
            starter config's UK and DE tags on one key). Amazon's, and the simulator's
            other accounts, serve only their credential version's region (x.1 NA, x.2
            EU, x.3 FE): elsewhere 401 ``InvalidIssuer`` (protocol.md 2.1).
    """

    name: str
    protocol: Protocol
    credential_id: str
    secret: str = field(repr=False)
    version: str = ""
    partner_tags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    not_enabled: bool = False
    aws_credentials: bool = False
    not_eligible: bool = False
    no_store: bool = False
    tps: float = 1.0
    tpd: int = 8640
    every_region: bool = False

    @property
    def region(self) -> str:
        """The Creators region family its credential version serves (``NA``, ``EU``,
        ``FE``), or ``""`` for PA-API keys."""
        if self.protocol != "creators":
            return ""
        return _VERSION_REGIONS.get(self.version.rpartition(".")[2], "")

    @property
    def family(self) -> str:
        """``"v2"`` (Cognito), ``"v3"`` (Login with Amazon), or ``""`` for PA-API keys."""
        if self.protocol != "creators":
            return ""
        return "v3" if self.version.startswith("3.") else "v2"

    def has_tag(self, marketplace: str, tag: str) -> bool:
        """True when ``tag`` is a tracking id of this key's store in ``marketplace``."""
        return tag in self.partner_tags.get(marketplace, ())


#: The region family of a Creators credential version, by its minor number (protocol.md 2.1).
_VERSION_REGIONS: Mapping[str, str] = {"1": "NA", "2": "EU", "3": "FE"}

_DEMO_TAGS: Mapping[str, tuple[str, ...]] = {
    "www.amazon.com": ("demo-20",),
    "www.amazon.co.uk": ("demo-21",),
    "www.amazon.de": ("demo-22",),
}

#: Fixed, documented keys so that a fresh clone works against the simulator with no setup.
DEMO_ACCOUNTS: tuple[Account, ...] = (
    Account(
        "demo",
        "creators",
        "demo-id",
        "demo-secret",
        "3.1",
        _DEMO_TAGS,
        tps=5.0,
        tpd=100_000,
        every_region=True,
    ),
    Account(
        "demo-v2",
        "creators",
        "demo-v2-id",
        "demo-v2-secret",
        "2.1",
        _DEMO_TAGS,
        tps=5.0,
        tpd=100_000,
        every_region=True,
    ),
    Account(
        "demo-paapi",
        "paapi5",
        "DEMOACCESSKEY",
        "demo-secret-key",
        "",
        _DEMO_TAGS,
        tps=5.0,
        tpd=100_000,
        every_region=True,
    ),
)


class AccountRegistry:
    """Lookup of accounts by name and by (protocol, credential id)."""

    __slots__ = ("_by_id", "_by_name")

    def __init__(self, accounts: Iterable[Account]) -> None:
        self._by_name: dict[str, Account] = {}
        self._by_id: dict[tuple[str, str], Account] = {}
        for account in accounts:
            self._by_name[account.name] = account
            self._by_id[(account.protocol, account.credential_id)] = account

    def by_name(self, name: str) -> Account | None:
        """The account called ``name``, or None."""
        return self._by_name.get(name)

    def by_id(self, protocol: str, credential_id: str) -> Account | None:
        """The account of ``protocol`` with this credential id or access key, or None."""
        return self._by_id.get((protocol, credential_id))

    def accounts(self) -> tuple[Account, ...]:
        """Every account, in configuration order."""
        return tuple(self._by_name.values())


def simulator_secret(
    protocol: str, credential_id: str, settings: SimulatorSettings | None = None
) -> str | None:
    """Return the simulator's secret for a key, or None when the simulator has no such key.

    The broker uses this when its config points at the in-process simulator and no secret
    environment variable is set, so demo and simulator keys need no secrets in the environment.

    Args:
        protocol: ``"creators"`` or ``"paapi5"``.
        credential_id: the credential id (Creators) or access key (PA-API).
        settings: the simulator's settings; None means the defaults (the demo accounts).
    """
    from broker.simulator.settings import SimulatorSettings

    effective = settings if settings is not None else SimulatorSettings()
    for account in effective.all_accounts:
        if account.protocol == protocol and account.credential_id == credential_id:
            return account.secret
    return None


def simulator_credentials(protocol: str, settings: SimulatorSettings | None = None) -> list[str]:
    """The credential ids (access keys) of the simulator's accounts for ``protocol``, in
    order: what a config pointed at it may name (a message's hint)."""
    from broker.simulator.settings import SimulatorSettings

    effective = settings if settings is not None else SimulatorSettings()
    return [a.credential_id for a in effective.all_accounts if a.protocol == protocol]
