"""The simulator's settings: the ``[simulator]`` table of config.toml as frozen dataclasses.

Every fact protocol.md marks uncertain is a setting here, with the most likely behaviour as its
default. :meth:`SimulatorSettings.from_mapping` rejects unknown keys and bad values with a
:class:`~broker.errors.ConfigError` naming the full key path (``simulator.accounts[1].tps``).

Settings of ``[simulator]`` (defaults in brackets):

- ``seed`` [0]: seeds the catalogue, fault and latency draws, so a run is reproducible.
- ``token_lifetime_s`` [3600]: lifetime of Creators API access tokens.
- ``burst`` [1]: token-bucket depth of every key's per-second limit.
- ``limits`` [true]: enforce TPS and TPD; false turns rate limiting off (overhead benchmarks).
- ``retry_after`` ["none"]: what a 429 carries: ``none``, ``body`` (``retryAfterSeconds``,
  Creators only), ``header`` (``Retry-After``) or ``both``.
- ``retry_after_s`` [unset]: a fixed Retry-After value; unset means the time until the key's
  bucket has a token again (rounded up to whole seconds).
- ``missing_share`` [0.0]: share of well-formed ASINs that do not exist.
- ``inaccessible_share`` [0.0]: share of well-formed ASINs that exist but are not accessible.
- ``shuffle_items`` [true]: return items in a shuffled order, as Amazon does.
- ``explicit_nulls`` [true]: Creators API items carry unrequested members as ``null``.
- ``items_container`` ["itemsResult"]: the GetItems container key (``itemResults`` per one
  docs page).
- ``field_list_style`` ["objects"]: ``fieldList`` of a ValidationException as
  ``[{"name", "message"}]`` objects or as ``strings``.
- ``not_found_when_all_inaccessible`` [true]: a Creators batch whose ids are all inaccessible
  answers 404, like one whose ids are all unknown (else 200 with ``errors`` only).
- ``paapi_retired`` [false]: every PA-API call answers the AccessDenied deprecation body.
- ``paapi_default_host`` ["webservices.amazon.com"]: the PA-API host assumed for a Host header
  that names no Amazon host (a client talking to 127.0.0.1).
- ``clock_skew_s`` [0.0]: seconds added to the simulator's wall clock (Date header, x-amz-date
  window, daily quota reset).
- ``invalid_client_status`` [401]: HTTP status of a token-endpoint ``invalid_client`` error.
- ``oauth_error_status`` [400]: HTTP status of the other token-endpoint errors.
- ``demo_accounts`` [true]: include :data:`~broker.simulator.accounts.DEMO_ACCOUNTS`.
- ``[simulator.latency]``: ``fixed_ms`` [0] + an exponential of mean ``exp_mean_ms`` [0], drawn
  once before the quota check (request travel) and once after it (response travel).
- ``omitted_asins`` [empty]: ASINs that GetItems answers always leave out, with no error
  entry (an answer silently missing a requested item); a request of only such ASINs gets a
  200 with an empty item list.
- ``[simulator.faults]``: per-request probabilities [all 0.0] of the response faults
  ``error_500``, ``error_502``, ``error_503``, ``error_504``, ``reset`` (connection reset
  mid-body), ``truncated`` (a body cut short), ``html`` (a 502/503 HTML page), ``hang`` (a body
  that never completes, for at most ``hang_s`` [30] seconds), ``disconnect`` (the connection
  closed before any response), ``html_ok`` (a 200 HTML page, as a proxy or captive portal
  sends), ``bad_shape`` (a 200 JSON body of the wrong shape), ``oversized`` (a 200 body of
  ``oversized_bytes`` [50 MiB], streamed without a Content-Length), ``drop_item`` (a GetItems
  answer missing one item), ``extra_item`` (one with an item nobody asked for) and
  ``duplicate_item`` (one with an item twice); the response faults are drawn together, so
  their rates must not add up to more than 1. Drawn on their own: ``expired_token`` (a Creators
  request answered 401 TokenExpired although its token is valid; drawn per request),
  ``token_error`` (the token endpoint answers 503) and ``token_slow`` (the token endpoint
  answers only after ``hang_s``).
- ``[[simulator.accounts]]``: ``name``, ``protocol`` ["creators"], ``credential_id`` (Creators)
  or ``access_key`` (PA-API), ``secret``, ``version`` ["3.1"; Creators only],
  ``partner_tags`` (marketplace -> tag or list of tags), ``tps`` [1.0], ``tpd`` [8640], and the
  flags ``not_enabled``, ``aws_credentials``, ``not_eligible``, ``no_store`` [all false].
  An account named like a demo account replaces it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Final, Literal, cast

from broker.api.marketplaces import marketplace as lookup_marketplace
from broker.errors import ConfigError
from broker.simulator.accounts import CREATORS_VERSIONS, DEMO_ACCOUNTS, Account, Protocol
from broker.simulator.marketplaces import MARKETPLACES, MARKETPLACES_BY_HOST
from broker.tomltable import TomlTable, did_you_mean

#: The least rate an account may have, in config and through ``/_sim/control``.
MIN_ACCOUNT_TPS: Final = 1e-6
#: How far the server's clock may be set off: ten years, well within what its dates hold.
MAX_CLOCK_SKEW_S: Final = 10 * 365 * 86_400.0
# PA-API's account states; a Creators account has no such thing.
_PAAPI_FLAGS: Final = ("not_enabled", "aws_credentials")

__all__ = [
    "MAX_CLOCK_SKEW_S",
    "MIN_ACCOUNT_TPS",
    "FaultRates",
    "LatencyProfile",
    "RetryAfterStyle",
    "SimulatorSettings",
]

RetryAfterStyle = Literal["none", "body", "header", "both"]


@dataclass(frozen=True, slots=True)
class LatencyProfile:
    """One-way latency: ``fixed_ms`` plus an exponential draw of mean ``exp_mean_ms``."""

    fixed_ms: float = 0.0
    exp_mean_ms: float = 0.0

    @property
    def enabled(self) -> bool:
        """True when any latency is added."""
        return self.fixed_ms > 0 or self.exp_mean_ms > 0


@dataclass(frozen=True, slots=True)
class FaultRates:
    """Per-request probabilities of each injected fault (see the module docstring)."""

    error_500: float = 0.0
    error_502: float = 0.0
    error_503: float = 0.0
    error_504: float = 0.0
    reset: float = 0.0
    truncated: float = 0.0
    html: float = 0.0
    hang: float = 0.0
    expired_token: float = 0.0
    hang_s: float = 30.0
    disconnect: float = 0.0
    html_ok: float = 0.0
    bad_shape: float = 0.0
    oversized: float = 0.0
    drop_item: float = 0.0
    extra_item: float = 0.0
    duplicate_item: float = 0.0
    token_error: float = 0.0
    token_slow: float = 0.0
    oversized_bytes: int = 50 * 1024 * 1024

    #: the faults that replace or alter a response; they are drawn together, so their sum is
    #: at most 1. New kinds go at the end: the order fixes which draw hits which kind, so
    #: appending keeps the faults of an existing seed and config where they were.
    RESPONSE_KINDS = (
        "error_500",
        "error_502",
        "error_503",
        "error_504",
        "reset",
        "truncated",
        "html",
        "hang",
        "disconnect",
        "html_ok",
        "bad_shape",
        "oversized",
        "drop_item",
        "extra_item",
        "duplicate_item",
    )
    #: the faults of the token endpoints, drawn from their own seeded stream
    TOKEN_KINDS = ("token_error", "token_slow")

    @staticmethod
    def check_sums(rates: Mapping[str, float], where: str) -> None:
        """Refuse ``rates`` (kind -> rate) whose kinds drawn together add up to more than 1.

        Raises:
            ConfigError: naming ``where`` (a config table, or ``broker bench``'s flag).
        """
        for kind, rate in rates.items():
            if rate < 0:
                # A negative rate would cancel out another's in the sums below.
                raise ConfigError(f"{where}.{kind}", f"must be 0 or more, got {rate:g}")
        total = sum(rates.get(kind, 0.0) for kind in FaultRates.RESPONSE_KINDS)
        if total > 1.0 + 1e-9:
            raise ConfigError(where, f"fault rates add up to {total:g}, more than 1")
        if sum(rates.get(kind, 0.0) for kind in FaultRates.TOKEN_KINDS) > 1.0 + 1e-9:
            raise ConfigError(where, "token_error + token_slow is more than 1")

    def response_rates(self) -> tuple[tuple[str, float], ...]:
        """The response-replacing faults with a non-zero rate, in a fixed order."""
        return tuple(
            (kind, float(getattr(self, kind)))
            for kind in self.RESPONSE_KINDS
            if getattr(self, kind) > 0
        )


#: The faults whose rates are summed: the response kinds, and the token endpoints'.
_DRAWN_KINDS: Final = (*FaultRates.RESPONSE_KINDS, *FaultRates.TOKEN_KINDS)


@dataclass(frozen=True, slots=True)
class SimulatorSettings:
    """Everything that shapes the simulator's behaviour (see the module docstring)."""

    seed: int = 0
    token_lifetime_s: float = 3600.0
    burst: int = 1
    limits: bool = True
    retry_after: RetryAfterStyle = "none"
    retry_after_s: float | None = None
    missing_share: float = 0.0
    inaccessible_share: float = 0.0
    shuffle_items: bool = True
    explicit_nulls: bool = True
    items_container: Literal["itemsResult", "itemResults"] = "itemsResult"
    field_list_style: Literal["objects", "strings"] = "objects"
    not_found_when_all_inaccessible: bool = True
    paapi_retired: bool = False
    paapi_default_host: str = "webservices.amazon.com"
    clock_skew_s: float = 0.0
    invalid_client_status: int = 401
    oauth_error_status: int = 400
    demo_accounts: bool = True
    omitted_asins: frozenset[str] = frozenset()
    latency: LatencyProfile = LatencyProfile()
    faults: FaultRates = FaultRates()
    # Compared but left out of the hash: an account's partner tags are a dict, and the
    # catalogue's caches (a search's results) are keyed on the settings.
    accounts: tuple[Account, ...] = field(default=(), hash=False)

    def __post_init__(self) -> None:
        rates = {kind: float(getattr(self.faults, kind)) for kind in _DRAWN_KINDS}
        FaultRates.check_sums(rates, "simulator.faults")
        # Upper-cased once here, as the catalogue matches ids case-insensitively.
        object.__setattr__(
            self, "omitted_asins", frozenset(asin.upper() for asin in self.omitted_asins)
        )
        if self.missing_share + self.inaccessible_share > 1.0 + 1e-9:
            raise ConfigError(
                "simulator.missing_share", "missing_share + inaccessible_share is more than 1"
            )
        seen: dict[tuple[str, str], str] = {}
        for account in self.all_accounts:
            key = (account.protocol, account.credential_id)
            if key in seen:
                raise ConfigError(
                    "simulator.accounts",
                    f"accounts {seen[key]!r} and "
                    f"{account.name!r} share the id {account.credential_id!r}",
                )
            seen[key] = account.name

    @property
    def all_accounts(self) -> tuple[Account, ...]:
        """The configured accounts plus the demo ones (unless replaced or switched off)."""
        own = {account.name for account in self.accounts}
        demo = tuple(a for a in DEMO_ACCOUNTS if a.name not in own) if self.demo_accounts else ()
        return demo + self.accounts

    @classmethod
    def from_mapping(
        cls, table: Mapping[str, object], *, path: str = "simulator"
    ) -> SimulatorSettings:
        """Parse the ``[simulator]`` table of config.toml.

        Raises:
            ConfigError: naming the full key path of an unknown key or a bad value.
        """
        reader = TomlTable(table, path)
        defaults = cls()
        kwargs: dict[str, object] = {
            "seed": reader.integer("seed", defaults.seed),
            "token_lifetime_s": reader.number(
                "token_lifetime_s", defaults.token_lifetime_s, minimum=0.001
            ),
            "burst": reader.integer("burst", defaults.burst, minimum=1),
            "limits": reader.boolean("limits", defaults.limits),
            "retry_after": reader.choice(
                "retry_after", defaults.retry_after, ("none", "body", "header", "both")
            ),
            "retry_after_s": reader.opt_number("retry_after_s", minimum=0.0),
            "missing_share": reader.number("missing_share", 0.0, minimum=0.0, maximum=1.0),
            "inaccessible_share": reader.number(
                "inaccessible_share", 0.0, minimum=0.0, maximum=1.0
            ),
            "shuffle_items": reader.boolean("shuffle_items", defaults.shuffle_items),
            "explicit_nulls": reader.boolean("explicit_nulls", defaults.explicit_nulls),
            "items_container": reader.choice(
                "items_container", defaults.items_container, ("itemsResult", "itemResults")
            ),
            "field_list_style": reader.choice(
                "field_list_style", defaults.field_list_style, ("objects", "strings")
            ),
            "not_found_when_all_inaccessible": reader.boolean(
                "not_found_when_all_inaccessible", defaults.not_found_when_all_inaccessible
            ),
            "paapi_retired": reader.boolean("paapi_retired", defaults.paapi_retired),
            "paapi_default_host": reader.choice(
                "paapi_default_host", defaults.paapi_default_host, tuple(MARKETPLACES_BY_HOST)
            ),
            "clock_skew_s": reader.number(
                "clock_skew_s",
                defaults.clock_skew_s,
                minimum=-MAX_CLOCK_SKEW_S,
                maximum=MAX_CLOCK_SKEW_S,
            ),
            "invalid_client_status": reader.integer(
                "invalid_client_status", defaults.invalid_client_status, minimum=400, maximum=499
            ),
            "oauth_error_status": reader.integer(
                "oauth_error_status", defaults.oauth_error_status, minimum=400, maximum=499
            ),
            "demo_accounts": reader.boolean("demo_accounts", defaults.demo_accounts),
            "omitted_asins": frozenset(reader.str_list("omitted_asins")),
            "latency": _parse_latency(reader.table("latency")),
            "faults": _parse_faults(reader.table("faults")),
            "accounts": _parse_accounts(reader.array("accounts")),
        }
        _reject_unknown(reader)
        return cls(**kwargs)  # type: ignore[arg-type]


def _reject_unknown(reader: TomlTable) -> None:
    """Refuse a key no getter read, naming the closest known one, else listing them all
    (settings are easy to misspell)."""
    for key in reader.unread():
        hint = did_you_mean(key, reader.read())
        if hint:
            raise ConfigError(reader.key(key), "unknown setting" + hint)
        known = ", ".join(reader.read())
        raise ConfigError(reader.key(key), f"unknown setting (known: {known})")


def _parse_latency(reader: TomlTable) -> LatencyProfile:
    profile = LatencyProfile(
        fixed_ms=reader.number("fixed_ms", 0.0, minimum=0.0),
        exp_mean_ms=reader.number("exp_mean_ms", 0.0, minimum=0.0),
    )
    _reject_unknown(reader)
    return profile


def _parse_faults(reader: TomlTable) -> FaultRates:
    defaults = FaultRates()
    kwargs: dict[str, float] = {}
    for item in fields(FaultRates):
        if item.name == "hang_s":
            kwargs[item.name] = reader.number("hang_s", defaults.hang_s, minimum=0.0)
        elif item.name == "oversized_bytes":
            kwargs[item.name] = reader.integer(
                "oversized_bytes", defaults.oversized_bytes, minimum=1
            )
        else:
            kwargs[item.name] = reader.number(item.name, 0.0, minimum=0.0, maximum=1.0)
    _reject_unknown(reader)
    FaultRates.check_sums(kwargs, reader.path)
    return FaultRates(**kwargs)  # type: ignore[arg-type]


def _parse_accounts(readers: list[TomlTable]) -> tuple[Account, ...]:
    accounts: list[Account] = []
    names: set[str] = set()
    for reader in readers:
        account = _parse_account(reader)
        if account.name in names:
            raise ConfigError(reader.key("name"), f"duplicate account name {account.name!r}")
        names.add(account.name)
        accounts.append(account)
    return tuple(accounts)


def _parse_account(reader: TomlTable) -> Account:
    name = reader.text("name")
    protocol = cast("Protocol", reader.choice("protocol", "creators", ("creators", "paapi5")))
    if protocol == "creators":
        if reader.has("access_key"):
            raise ConfigError(
                reader.key("access_key"),
                "is for paapi5 accounts; a creators account has credential_id",
            )
        credential_id = reader.text("credential_id")
        version = reader.choice("version", "3.1", CREATORS_VERSIONS)
        for flag in _PAAPI_FLAGS:
            if reader.has(flag):
                raise ConfigError(reader.key(flag), "is for paapi5 accounts only")
    else:
        if reader.has("credential_id") and reader.has("access_key"):
            raise ConfigError(
                reader.key("credential_id"), "give access_key or credential_id, not both"
            )
        key = (
            "access_key"
            if reader.has("access_key") or not reader.has("credential_id")
            else "credential_id"
        )
        credential_id = reader.text(key)
        if reader.has("version"):
            raise ConfigError(reader.key("version"), "is for creators accounts only")
        version = ""
    account = Account(
        name=name,
        protocol=protocol,
        credential_id=credential_id,
        secret=reader.text("secret"),
        version=version,
        partner_tags=_parse_tags(reader),
        not_enabled=reader.boolean("not_enabled", False),
        aws_credentials=reader.boolean("aws_credentials", False),
        not_eligible=reader.boolean("not_eligible", False),
        no_store=reader.boolean("no_store", False),
        tps=reader.number("tps", 1.0, minimum=MIN_ACCOUNT_TPS),
        tpd=reader.integer("tpd", 8640, minimum=1),
    )
    _reject_unknown(reader)
    return account


def _parse_tags(reader: TomlTable) -> dict[str, tuple[str, ...]]:
    raw = reader.raw("partner_tags")
    path = reader.key("partner_tags")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(path, "must be a table of marketplace = tag or [tags]")
    tags: dict[str, tuple[str, ...]] = {}
    for name, value in raw.items():
        where = f'{path}."{name}"'
        # Spelled as [[keys]] may spell it: www.amazon.co.uk, amazon.co.uk or UK.
        try:
            marketplace = lookup_marketplace(name).name
        except ValueError:
            marketplace = name
        if marketplace not in MARKETPLACES:
            raise ConfigError(
                where,
                f"unknown marketplace {name!r} (use a name such as www.amazon.com, amazon.de "
                "or UK)",
            )
        if marketplace in tags:
            raise ConfigError(where, f"{marketplace} is given twice (under two spellings)")
        values = [value] if isinstance(value, str) else value
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(v, str) and v.strip() for v in values)
        ):
            raise ConfigError(where, "must be a tag or a non-empty list of tags")
        tags[str(marketplace)] = tuple(cast("list[str]", values))
    return tags
