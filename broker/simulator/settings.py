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
  their rates must not add up to more than 1. Drawn on their own: ``expired_token`` (a fresh
  Creators token answered as expired), ``token_error`` (the token endpoint answers 503) and
  ``token_slow`` (the token endpoint answers only after ``hang_s``).
- ``[[simulator.accounts]]``: ``name``, ``protocol`` ["creators"], ``credential_id`` (Creators)
  or ``access_key`` (PA-API), ``secret``, ``version`` ["3.1"; Creators only],
  ``partner_tags`` (marketplace -> tag or list of tags), ``tps`` [1.0], ``tpd`` [8640], and the
  flags ``not_enabled``, ``aws_credentials``, ``not_eligible``, ``no_store`` [all false].
  An account named like a demo account replaces it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Literal, cast

from broker.errors import ConfigError
from broker.simulator.accounts import CREATORS_VERSIONS, DEMO_ACCOUNTS, Account, Protocol
from broker.simulator.marketplaces import MARKETPLACES, MARKETPLACES_BY_HOST

__all__ = ["FaultRates", "LatencyProfile", "RetryAfterStyle", "SimulatorSettings"]

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

    def response_rates(self) -> tuple[tuple[str, float], ...]:
        """The response-replacing faults with a non-zero rate, in a fixed order."""
        return tuple(
            (kind, float(getattr(self, kind)))
            for kind in self.RESPONSE_KINDS
            if getattr(self, kind) > 0
        )


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
    accounts: tuple[Account, ...] = ()

    def __post_init__(self) -> None:
        total = sum(rate for _, rate in self.faults.response_rates())
        if total > 1.0 + 1e-9:
            raise ConfigError("simulator.faults", f"fault rates add up to {total:g}, more than 1")
        if self.faults.token_error + self.faults.token_slow > 1.0 + 1e-9:
            raise ConfigError("simulator.faults", "token_error + token_slow is more than 1")
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
        reader = _Reader(table, path)
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
            "retry_after_s": reader.optional_number("retry_after_s", minimum=0.0),
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
            "clock_skew_s": reader.number("clock_skew_s", defaults.clock_skew_s),
            "invalid_client_status": reader.integer(
                "invalid_client_status", defaults.invalid_client_status, minimum=400, maximum=499
            ),
            "oauth_error_status": reader.integer(
                "oauth_error_status", defaults.oauth_error_status, minimum=400, maximum=499
            ),
            "demo_accounts": reader.boolean("demo_accounts", defaults.demo_accounts),
            "omitted_asins": frozenset(reader.strings("omitted_asins")),
            "latency": _parse_latency(reader.table("latency")),
            "faults": _parse_faults(reader.table("faults")),
            "accounts": _parse_accounts(reader.array_of_tables("accounts")),
        }
        reader.reject_unknown()
        return cls(**kwargs)  # type: ignore[arg-type]


class _Reader:
    """Typed reads of one TOML table that remember which keys were used."""

    __slots__ = ("_path", "_table", "_used")

    def __init__(self, table: Mapping[str, object], path: str) -> None:
        if not isinstance(table, Mapping):
            raise ConfigError(path, "must be a table")
        self._table = table
        self._path = path
        self._used: set[str] = set()

    @property
    def path(self) -> str:
        return self._path

    def at(self, key: str) -> str:
        return f"{self._path}.{key}"

    def _raw(self, key: str) -> object:
        self._used.add(key)
        return self._table.get(key)

    def has(self, key: str) -> bool:
        return key in self._table

    def boolean(self, key: str, default: bool) -> bool:
        value = self._raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(self.at(key), f"must be true or false, not {value!r}")
        return value

    def integer(
        self, key: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        value = self._raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.at(key), f"must be an integer, not {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(self.at(key), f"must be at least {minimum}, not {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(self.at(key), f"must be at most {maximum}, not {value}")
        return value

    def number(
        self,
        key: str,
        default: float,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> float:
        value = self.optional_number(key, minimum=minimum, maximum=maximum)
        return default if value is None else value

    def optional_number(
        self, key: str, *, minimum: float | None = None, maximum: float | None = None
    ) -> float | None:
        value = self._raw(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(self.at(key), f"must be a number, not {value!r}")
        number = float(value)
        if not math.isfinite(number):
            raise ConfigError(self.at(key), "must be a finite number")
        if minimum is not None and number < minimum:
            raise ConfigError(self.at(key), f"must be at least {minimum:g}, not {number:g}")
        if maximum is not None and number > maximum:
            raise ConfigError(self.at(key), f"must be at most {maximum:g}, not {number:g}")
        return number

    def string(self, key: str, default: str | None = None) -> str:
        value = self._raw(key)
        if value is None:
            if default is None:
                raise ConfigError(self.at(key), "is required")
            return default
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(self.at(key), f"must be a non-empty string, not {value!r}")
        return value

    def strings(self, key: str) -> list[str]:
        value = self._raw(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise ConfigError(self.at(key), "must be a list of non-empty strings")
        return [v.strip() for v in value]

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.string(key, default)
        if value not in choices:
            raise ConfigError(self.at(key), f"must be one of {', '.join(choices)}; not {value!r}")
        return value

    def table(self, key: str) -> _Reader:
        value = self._raw(key)
        if value is None:
            return _Reader({}, self.at(key))
        if not isinstance(value, Mapping):
            raise ConfigError(self.at(key), "must be a table")
        return _Reader(cast("Mapping[str, object]", value), self.at(key))

    def array_of_tables(self, key: str) -> list[_Reader]:
        value = self._raw(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(self.at(key), "must be an array of tables ([[...]])")
        readers = []
        for index, item in enumerate(value):
            if not isinstance(item, Mapping):
                raise ConfigError(f"{self.at(key)}[{index}]", "must be a table")
            readers.append(_Reader(cast("Mapping[str, object]", item), f"{self.at(key)}[{index}]"))
        return readers

    def raw(self, key: str) -> object:
        return self._raw(key)

    def reject_unknown(self) -> None:
        for key in self._table:
            if key not in self._used:
                known = ", ".join(sorted(self._used))
                raise ConfigError(self.at(key), f"unknown setting (known: {known})")


def _parse_latency(reader: _Reader) -> LatencyProfile:
    profile = LatencyProfile(
        fixed_ms=reader.number("fixed_ms", 0.0, minimum=0.0),
        exp_mean_ms=reader.number("exp_mean_ms", 0.0, minimum=0.0),
    )
    reader.reject_unknown()
    return profile


def _parse_faults(reader: _Reader) -> FaultRates:
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
    reader.reject_unknown()
    total = sum(kwargs[kind] for kind in FaultRates.RESPONSE_KINDS)
    if total > 1.0 + 1e-9:
        raise ConfigError(reader.path, f"fault rates add up to {total:g}, more than 1")
    if kwargs["token_error"] + kwargs["token_slow"] > 1.0 + 1e-9:
        raise ConfigError(reader.path, "token_error + token_slow is more than 1")
    return FaultRates(**kwargs)  # type: ignore[arg-type]


def _parse_accounts(readers: list[_Reader]) -> tuple[Account, ...]:
    accounts: list[Account] = []
    names: set[str] = set()
    for reader in readers:
        account = _parse_account(reader)
        if account.name in names:
            raise ConfigError(reader.at("name"), f"duplicate account name {account.name!r}")
        names.add(account.name)
        accounts.append(account)
    return tuple(accounts)


def _parse_account(reader: _Reader) -> Account:
    name = reader.string("name")
    protocol = cast("Protocol", reader.choice("protocol", "creators", ("creators", "paapi5")))
    if protocol == "creators":
        if reader.has("access_key"):
            raise ConfigError(
                reader.at("access_key"),
                "is for paapi5 accounts; a creators account has credential_id",
            )
        credential_id = reader.string("credential_id")
        version = reader.choice("version", "3.1", CREATORS_VERSIONS)
    else:
        if reader.has("credential_id") and reader.has("access_key"):
            raise ConfigError(
                reader.at("credential_id"), "give access_key or credential_id, not both"
            )
        key = (
            "access_key"
            if reader.has("access_key") or not reader.has("credential_id")
            else "credential_id"
        )
        credential_id = reader.string(key)
        if reader.has("version"):
            raise ConfigError(reader.at("version"), "is for creators accounts only")
        version = ""
    account = Account(
        name=name,
        protocol=protocol,
        credential_id=credential_id,
        secret=reader.string("secret"),
        version=version,
        partner_tags=_parse_tags(reader),
        not_enabled=reader.boolean("not_enabled", False),
        aws_credentials=reader.boolean("aws_credentials", False),
        not_eligible=reader.boolean("not_eligible", False),
        no_store=reader.boolean("no_store", False),
        tps=reader.number("tps", 1.0, minimum=1e-6),
        tpd=reader.integer("tpd", 8640, minimum=1),
    )
    reader.reject_unknown()
    return account


def _parse_tags(reader: _Reader) -> dict[str, tuple[str, ...]]:
    raw = reader.raw("partner_tags")
    path = reader.at("partner_tags")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(path, "must be a table of marketplace = tag or [tags]")
    tags: dict[str, tuple[str, ...]] = {}
    for marketplace, value in raw.items():
        where = f'{path}."{marketplace}"'
        if marketplace not in MARKETPLACES:
            raise ConfigError(
                where, f"unknown marketplace {marketplace!r} (use a name such as www.amazon.com)"
            )
        values = [value] if isinstance(value, str) else value
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(v, str) and v.strip() for v in values)
        ):
            raise ConfigError(where, "must be a tag or a non-empty list of tags")
        tags[str(marketplace)] = tuple(cast("list[str]", values))
    return tags
