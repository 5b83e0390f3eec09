"""config.toml -> frozen dataclasses, validated eagerly; secrets come from the environment.

Every problem raises :class:`~broker.errors.ConfigError` naming the TOML key path
(``keys[1].tps``). Unknown keys are errors (they are usually typos). A secret written
into the file itself is refused with the name of the environment variable to use.
Environment access goes through an injectable ``environ`` mapping, so tests pass a dict.
"""

from __future__ import annotations

import copy
import errno
import importlib.util
import ipaddress
import os
import re
import stat
import tomllib
import unicodedata
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

from broker.api.creators import DEFAULT_ENDPOINT as CREATORS_ENDPOINT
from broker.api.marketplaces import MARKETPLACES
from broker.api.marketplaces import marketplace as lookup_marketplace
from broker.api.resources import resolve_resources
from broker.cache.policy import CachePolicy, check_max_age
from broker.errors import ConfigError
from broker.models import Protocol, Secret
from broker.tomltable import TomlTable, did_you_mean, unquoted_time_hint

__all__ = [
    "DEFAULT_RESOURCES",
    "MAX_IN_FLIGHT",
    "MAX_TPS",
    "TABLES",
    "ApiConfig",
    "BrokerConfig",
    "CacheConfig",
    "EngineConfig",
    "KeyConfig",
    "LogConfig",
    "OutputConfig",
    "RateConfig",
    "ReadSecrets",
    "RetryConfig",
    "ServeConfig",
    "ServiceCredentialError",
    "SimulatorTable",
    "StateConfig",
    "check_redis_options",
    "config_from_dict",
    "is_loopback_host",
    "load_config",
    "no_home",
    "parse_config",
    "redacted_url",
    "require_config",
    "secret_url_parameter",
    "shown_url",
]

#: The config file's top-level names: :func:`parse_config` refuses any other, and
#: ``broker simulate``, which reads only ``[simulator]``, lets these through and refuses
#: the rest, so a misspelt ``[simulatr]`` fails there too instead of leaving the simulator
#: on its defaults.
TABLES: Final = frozenset(
    (
        "api",
        "keys",
        "rate",
        "engine",
        "retry",
        "output",
        "log",
        "serve",
        "simulator",
        "cache",
        "state",
    )
)
#: Whether :func:`load_config` reads the keys' secrets: all, none, or all but systemd
#: credentials (``"outside-service"``).
ReadSecrets = bool | Literal["outside-service"]
#: Where systemd puts each unit's credentials (``LoadCredential=``), one directory per unit.
SYSTEMD_CREDENTIALS = Path("/run/credentials")

#: Resources asked for when the config names none: enough for the typed summary.
DEFAULT_RESOURCES: Final = (
    "itemInfo.title",
    "offersV2.listings.price",
    "offersV2.listings.availability",
    "images.primary.medium",
)

SIMULATOR: Final = "simulator"
#: The highest ``tps`` a key may be configured with.
MAX_TPS: Final = 1000.0
#: The most requests a key sends in a day: MAX_TPS for 24 hours.
MAX_TPD: Final = int(MAX_TPS) * 86_400
#: The most requests one key may have in flight (``[[keys]] max_in_flight``).
MAX_IN_FLIGHT: Final = 1000
AMAZON: Final = "amazon"

_CREATORS_VERSIONS: Final = frozenset({"2.1", "2.2", "2.3", "3.1", "3.2", "3.3"})
#: Key names that would hold a credential; such a key is refused without echoing its value.
_SECRET_NAME: Final = re.compile(
    r"secret|passw|private|token(?!_?(endpoint|url))|api_?key", re.IGNORECASE
)
#: A conventional environment variable name: upper-case letters, digits and underscores.
_ENV_NAME: Final = re.compile(r"[A-Z_][A-Z0-9_]{0,127}")
# A shell variable in a path setting ($HOME, ${XDG_STATE_HOME}): TOML expands none, so it
# would name a folder called "$HOME".
_SHELL_VARIABLE: Final = re.compile(r"\$(\{[^}/]*\}?|[A-Za-z_][A-Za-z0-9_]*)")
#: What a PA-API access key may hold: Amazon's are 20 capital letters and digits. A comma,
#: slash, dot or space would break the signature's ``Credential=`` field (IncompleteSignature,
#: which condemns every key), a control character every request of the key (aiohttp refuses
#: the header); ``-`` and ``_`` are let through for the simulator's own accounts.
_ACCESS_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")
#: A PA-API secret key's shape (40 characters of both cases, '+' and '/' among them at
#: times; a few more or less when mistyped): in ``credential_id`` it is the two fields
#: swapped. Access keys are 20 capital letters and digits.
_PAAPI_SECRET: Final = re.compile(r"(?=.*[a-z+/])[A-Za-z0-9+/]{32,48}")
#: A Cognito (Creators 2.x) client secret's shape; its client ids are 26 such characters.
_COGNITO_SECRET: Final = re.compile(r"[a-z0-9]{40,}")
#: How a Login with Amazon (Creators 3.x) client secret starts; ids start
#: ``amzn1.application-oa2-client.``.
_LWA_SECRET_PREFIX: Final = "amzn1.oa2-cs."
#: What a Creators credential id may hold (``amzn1.application-oa2-client.<hex>``): a comma
#: or semicolon is a line of the credentials CSV pasted whole, the secret after it.
_CREDENTIAL_ID: Final = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """Which API to speak and where.

    Attributes:
        protocol: Creators API (current) or PA-API 5.0 (retired in 2026).
        endpoint: ``"simulator"`` (start the embedded simulator), ``"amazon"`` (the real
            hosts: creatorsapi.amazon, or the PA-API host of each marketplace), or a base
            URL (``https://`` unless the host is loopback).
        marketplace: the default marketplace, e.g. ``www.amazon.com``.
        resources: resources asked for (Creators camelCase names; translated for PA-API).
        token_endpoint: override for the Creators token URL (tests, proxies): a base
            (Amazon's path added), or the whole URL when its path ends in ``/token``.
    """

    protocol: Protocol = Protocol.CREATORS
    endpoint: str = SIMULATOR
    marketplace: str = "www.amazon.com"
    resources: tuple[str, ...] = DEFAULT_RESOURCES
    token_endpoint: str | None = None

    @property
    def uses_simulator(self) -> bool:
        """True when the broker should start the embedded simulator."""
        return self.endpoint == SIMULATOR


@dataclass(frozen=True, slots=True)
class KeyConfig:
    """One credential ("key") and its quota.

    Attributes:
        name: a label used in logs, output rows and metrics.
        credential_id: Creators credential id, or PA-API access key (not secret).
        secret: the credential secret; None only with the simulator endpoint, where the
            simulator's own account secret is used.
        secret_source: where the secret came from (an env var or file name), for messages.
        version: Creators credential version (2.1-2.3 Cognito, 3.1-3.3 Login with Amazon).
        partner_tags: tracking id per marketplace; a key serves only these marketplaces.
        tps: requests per second Amazon grants this key.
        tpd: requests per day (None: unlimited).
        max_in_flight: concurrent requests on this key.
    """

    name: str
    credential_id: str
    secret: Secret | None = field(default=None, repr=False)
    secret_source: str = ""
    version: str | None = None
    partner_tags: Mapping[str, str] = field(default_factory=dict)
    tps: float = 1.0
    tpd: int | None = 8640
    max_in_flight: int = 4


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Pipeline sizes and timeouts."""

    #: lookups outstanding at once per marketplace (admitted, not yet answered), and a
    #: stream's window: what bounds memory (a job of N marketplaces holds up to N times it)
    queue_size: int = 10_000
    #: how long a partial batch waits for more ASINs before it is sent
    linger_s: float = 0.05
    #: ASINs per GetItems request (Amazon allows at most 10)
    batch_size: int = 10
    #: whole-request timeout (connect + send + read)
    request_timeout_s: float = 30.0
    #: connect timeout
    connect_timeout_s: float = 10.0
    #: response bodies larger than this are refused
    max_body_bytes: int = 8 * 1024 * 1024
    #: connections in the pool (across hosts)
    max_connections: int = 64


@dataclass(frozen=True, slots=True)
class RateConfig:
    """Adaptive backoff on TooManyRequests (ratelimit.md section 6.3 defaults)."""

    #: multiplicative cut per fresh 429
    beta: float = 0.1
    #: target share of 429s while the rate climbs back below 75 % of a key's tps (or at
    #: any rate with ``discover``); near the tps the cap's own share (1.25 %) holds
    target_429_share: float = 0.01
    #: the lowest rate a key is cut to, requests/s
    min_rate: float = 0.05
    #: probe above the configured tps to find a grown quota
    discover: bool = False
    #: longest pause honoured from Retry-After / retryAfterSeconds
    retry_after_cap_s: float = 60.0
    #: share of TPD after which a key stops for the day
    tpd_guard: float = 0.99
    #: when the daily window resets, seconds after 00:00 UTC (Amazon does not document it)
    daily_reset_s: int = 0


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """Retries of transient failures (5xx, resets, timeouts, unreadable bodies)."""

    max_attempts: int = 6
    max_age_s: float = 600.0
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    #: how long a key may find the endpoint unreachable before the run gives up (exit 69)
    outage_budget_s: float = 900.0


@dataclass(frozen=True, slots=True)
class OutputConfig:
    """Defaults for job output (``broker run``)."""

    format: str = "jsonl"
    directory: str = "out"


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """``broker serve``: the options of every job it runs, and when a job file is claimed."""

    #: turn 978 ISBN-13s into ISBN-10s (``broker run --convert-isbn13``)
    convert_isbn13: bool = False
    #: a job whose keys have spent their daily quota stays in processing/ and is resumed
    #: after the reset, instead of holding the daemon (``broker run --no-wait``)
    no_wait: bool = False
    #: a job file is claimed once it has not changed for this long (0: at once; for
    #: producers that always write ``name.tmp`` and rename it into inbox/)
    settle_s: float = 2.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    """CLI logging: level and renderer (auto: console on a terminal, JSON otherwise)."""

    level: str = "info"
    format: str = "auto"


class SimulatorTable:
    """The ``[simulator]`` table as written, for the embedded simulator to read.

    The config layer does not import the simulator that judges the client (the import
    layers, ``tests/test_layers.py``): :func:`broker.client.simulator_settings` reads and
    checks this table, and the command line does so right after loading the file. Its
    values may hold account secrets, so its repr shows only the key names.
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, object] | None = None) -> None:
        self._data: Mapping[str, object] = copy.deepcopy(dict(data or {}))

    @property
    def data(self) -> Mapping[str, object]:
        """The table's contents (a private copy)."""
        return copy.deepcopy(dict(self._data))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SimulatorTable) and other._data == self._data

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._data)))

    def __repr__(self) -> str:
        return f"SimulatorTable(keys={sorted(self._data)})"


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The item cache (``[cache]``): how old an answer may be served, where it is kept.

    Attributes:
        max_age_s: answers older than this are fetched again; None (unset) means the
            caller's default: 0 (off) for the library, 86,400 for ``broker run``. At most
            86,400 (Amazon's 24-hour rule).
        offers_max_age_s: the max age when the resources include price or availability.
        max_items / max_bytes: the size bound; the oldest answers are evicted beyond it.
        backend: ``"sqlite"`` (a file shared by the machine's processes), ``"redis"`` or
            ``"memory"``.
        path: the SQLite file (None: ``item-cache.sqlite3`` in the state directory).
        redis_url: the Redis URL (``redis://host:port/db``), from ``redis_url`` or the
            variable ``redis_url_env`` names; a :class:`Secret`, as the variable's may carry
            a password. None: not Redis.
        redis_url_env: the environment variable holding the Redis URL (it may carry a
            password), or None.
        key_prefix: prefix of every Redis key.
    """

    max_age_s: float | None = None
    offers_max_age_s: float = 3_600.0
    max_items: int = 100_000
    max_bytes: int = 256 * 1024 * 1024
    backend: str = "sqlite"
    path: str | None = None
    redis_url: Secret | None = None
    redis_url_env: str | None = None
    key_prefix: str = "asinb:cache:"

    def policy(self, default_max_age_s: float = 0.0) -> CachePolicy:
        """The cache policy, with ``default_max_age_s`` when ``max_age_s`` is unset."""
        max_age = self.max_age_s if self.max_age_s is not None else default_max_age_s
        return CachePolicy(max_age, self.offers_max_age_s, self.max_items, self.max_bytes)


@dataclass(frozen=True, slots=True)
class StateConfig:
    """Where keys' shared state (rate, daily count, pauses, circuit) lives: ``[state]``.

    Attributes:
        backend: ``"local"`` (a SQLite file shared by this machine's processes, the
            default), ``"redis"`` (shared across machines) or ``"memory"`` (this process only).
        path: the SQLite file (local); None: ``$XDG_STATE_HOME/asin-broker/keys.sqlite3``.
        redis_url: ``redis://host:port/db`` (redis).
        redis_password_env: the env var holding the Redis password (a secret, never in
            the file); None: no password, or one inside ``redis_url``.
        redis_password: its value, read at load time.
        key_prefix: prepended to every Redis key.
    """

    backend: str = "local"
    path: Path | None = None
    redis_url: str | None = None
    redis_password_env: str | None = None
    redis_password: Secret | None = field(default=None, repr=False)
    key_prefix: str = "asin-broker:"


def secret_url_parameter(name: str) -> bool:
    """True for a Redis URL query parameter that carries a secret.

    redis-py passes every query parameter on as a keyword: ``?password=``, and
    ``?ssl_password=`` (the TLS key's passphrase) among them. The one rule for refusing
    them in a file and leaving them out of what is shown.
    """
    return "password" in name.lower()


def redacted_url(url: str) -> str:
    """``url`` without a user name or password, for messages and ``broker status``.

    redis-py also reads credentials from the query (``?password=...``), so those go from it
    too; the rest stays (``?db=2`` names the database redis-py uses, and tells two
    deployments apart), as does a unix socket's ``unix:///path``.
    """
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    query = urlencode(
        [
            (name, value)
            for name, value in parse_qsl(parts.query, keep_blank_values=True)
            # The user name goes with the password, as it does from user:pw@.
            if not secret_url_parameter(name) and name.lower() != "username"
        ]
    )
    # urlunsplit drops an empty netloc's "//" (unix:/run/redis.sock): written out here.
    text = f"{parts.scheme}://{netloc}{parts.path}"
    return f"{text}?{query}" if query else text


def _url_has_password(url: str) -> bool:
    """True when a Redis URL carries a password, as ``user:pw@`` or in its query
    (:func:`secret_url_parameter`): a file must not hold one. A URL that cannot be read
    at all is left to :func:`_check_redis_url`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return bool(parts.password) or any(
        secret_url_parameter(name) for name, _ in parse_qsl(parts.query, keep_blank_values=True)
    )


def _redis_installed() -> bool:
    return importlib.util.find_spec("redis") is not None


#: The URL schemes redis-py connects with.
_REDIS_SCHEMES: Final = ("redis", "rediss", "unix")


def _check_redis_url(url: str, where: str, *, variable: str | None = None) -> None:
    """Refuse a URL that is not a Redis one or that redis-py cannot read (a port that is no
    number or out of range, an option of the wrong type): every command would fail on it.

    ``variable``: the environment variable the URL came from. The reader's complaint is
    never repeated: a password that is misplaced (a ``#`` in it ends the URL's address)
    shows up in it as the port or a value.
    """
    what = "the URL" if variable is None else f"the URL in ${variable}"
    try:
        parts = urlsplit(url)
        scheme = parts.scheme
        if scheme in _REDIS_SCHEMES:
            _ = parts.port
            if _redis_installed():
                from redis.connection import parse_url

                parse_url(url)  # type: ignore[no-untyped-call]  # redis-py ships no types
    except ValueError as exc:
        text = str(exc)
        if text.startswith("Port"):
            why = (
                "its port is not a number from 0 to 65535 (a '#' in a password ends the "
                "address: percent-encode it as %23)"
            )
        elif text.startswith("Invalid value for"):
            why = "an option after '?' has a value of the wrong type"
        elif text.startswith("Redis URL must specify"):
            why = (
                "it must start with redis://, rediss:// or unix://, in lower case and with "
                "two slashes"
            )
        else:
            why = (
                "its address cannot be read (a '#', '[' or '@' in a password must be "
                "percent-encoded)"
            )
        raise ConfigError(where, f"redis-py cannot read {what}: {why}") from None
    if scheme not in _REDIS_SCHEMES:
        named = "" if variable is None else f"the URL in ${variable} "
        raise ConfigError(where, f"{named}must be a redis://, rediss:// or unix:// URL")
    database = parts.path.removeprefix("/")
    if scheme != "unix" and database and not (database.isascii() and database.isdigit()):
        # redis-py reads a path that is no number as database 0, without a word.
        raise ConfigError(
            where,
            f"the database of {what} must be a number (redis://host:6379/1), not {database!r}",
        )
    if _redis_installed():
        check_redis_options(url, where)


def check_redis_options(url: str, where: str) -> None:
    """Refuse a Redis URL carrying an option its connection does not take (a misspelt one,
    an ``ssl_*`` one on ``redis://``): each command would fail on it, with a traceback.

    The connection is built, not connected. Needs redis-py.

    Raises:
        ConfigError: naming ``where`` and the option.
    """
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    try:
        Redis.from_url(url).connection_pool.make_connection()  # type: ignore[no-untyped-call]  # redis-py ships no types
    except TypeError as exc:
        named = "unexpected keyword argument " in str(exc)
        option = str(exc).rpartition("argument ")[2] if named else "an option"
        raise ConfigError(
            where,
            f"carries {option}, which a {urlsplit(url).scheme}:// connection does not take "
            "(an ssl_* option needs rediss://)",
        ) from None
    except (ValueError, AttributeError, RedisError):
        # A value redis-py cannot use (ssl_cert_reqs=CERT_NONE, protocol=4,
        # max_connections=-1). Its text is not repeated: it may quote the URL.
        raise ConfigError(
            where, "an option after '?' has a value redis-py cannot use; check each option"
        ) from None


def _require_redis(path: str) -> None:
    """A Redis backend needs redis-py, an optional dependency: say so when the file loads,
    so ``check-config`` catches it instead of the first lookup failing with a traceback."""
    if not _redis_installed():
        raise ConfigError(
            path,
            "\"redis\" needs redis-py, which is not installed: pip install 'asin-broker[redis]'",
        )


def _cache_redis_needs_backend(table: TomlTable) -> None:
    """``[cache]`` Redis settings with no ``backend`` line are refused: config.toml lists
    them on lines of their own, and uncommenting them alone left the cache on this machine's
    file, silently. (``[state]`` refuses them beside any other backend, written or not.)"""
    given = [name for name in ("redis_url", "redis_url_env") if table.has(name)]
    if given and not table.has("backend"):
        raise ConfigError(
            "cache.backend",
            f'is not set, so {", ".join(given)} would go unused: add backend = "redis" to '
            'use Redis, or backend = "sqlite" to keep this machine\'s own file',
        )


def _parse_state(table: TomlTable, environ: Mapping[str, str], base_dir: Path) -> StateConfig:
    backend = table.text("backend", "local")
    if backend not in ("local", "redis", "memory"):
        raise ConfigError("state.backend", 'must be "local", "redis" or "memory"')
    path = _file_path(table, "path", base_dir)
    redis_url = table.opt_text("redis_url")
    password_env = table.opt_text("redis_password_env")
    key_prefix = table.text("key_prefix", "asin-broker:")
    _finish(table, secret_in="[state] redis_password_env")
    password: Secret | None = None
    if redis_url is not None and _url_has_password(redis_url):
        # Refused whatever the backend: a secret written into the file is one too many.
        raise ConfigError(
            "state.redis_url",
            "must not hold a password: name its env var in redis_password_env (an ACL user "
            "name may stay: redis://USER@host:port/0)",
        )
    unused = [name for name in ("redis_url", "redis_password_env") if table.has(name)]
    if unused and backend != "redis":
        # Uncommented without the backend line, or config.toml's [state] block uncommented
        # whole: each machine would spend the key's whole rate and daily quota on its own
        # file, silently.
        written = f'is "{backend}"' if table.has("backend") else f'is not set ("{backend}")'
        raise ConfigError(
            "state.backend",
            f'{written}, so {", ".join(unused)} would go unused: set backend = "redis" to '
            "share the keys' state across machines, or remove the redis_* lines",
        )
    if backend == "redis":
        _require_redis("state.backend")
        if redis_url is None:
            raise ConfigError("state.redis_url", 'is required with backend = "redis"')
        _check_redis_url(redis_url, "state.redis_url")
        if password_env is not None:
            if not _ENV_NAME.fullmatch(password_env):
                raise ConfigError(
                    "state.redis_password_env", "must be an environment variable name"
                )
            value = environ.get(password_env, "").strip()
            if not value:
                raise ConfigError(
                    "state.redis_password_env",
                    f"environment variable {password_env} is "
                    f"{'empty' if password_env in environ else 'not set'}",
                )
            password = Secret(value)
    return StateConfig(backend, path, redis_url, password_env, password, key_prefix)


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """The whole configuration."""

    api: ApiConfig = field(default_factory=ApiConfig)
    keys: tuple[KeyConfig, ...] = ()
    engine: EngineConfig = field(default_factory=EngineConfig)
    rate: RateConfig = field(default_factory=RateConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    log: LogConfig = field(default_factory=LogConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    simulator: SimulatorTable = field(default_factory=SimulatorTable)
    source: str = "<objects>"
    cache: CacheConfig = field(default_factory=CacheConfig)
    state: StateConfig = field(default_factory=StateConfig)

    @property
    def tagged_marketplaces(self) -> frozenset[str]:
        """The marketplaces some key has a partner tag for: the ones a lookup can go to."""
        return frozenset(m for key in self.keys for m in key.partner_tags)

    def marketplace_hint(self) -> str:
        """The other remedy when no key has a partner tag for the default marketplace but
        keys are tagged elsewhere: a config for one store (``DE``) that forgot
        ``api.marketplace``, whose default is www.amazon.com. Empty otherwise."""
        default = self.api.marketplace
        tagged = sorted(self.tagged_marketplaces)
        if not tagged or default in tagged:
            return ""
        named = tagged[0] if len(tagged) == 1 else "one of " + ", ".join(tagged)
        setting = (
            f'"api": {{"marketplace": "{tagged[0]}"}}'
            if self.source.startswith("<")
            else f'marketplace = "{tagged[0]}" under [api] in {self.source}'
        )
        return (
            f"; or, if the lookups are meant for {named} (where the keys have tags), make it "
            f"the default marketplace ({default} now): {setting}"
        )


def require_config(config: object, owner: str) -> BrokerConfig:
    """``config`` if it is a :class:`BrokerConfig`; else a TypeError naming the two ways to
    build one (a path or a dict is the natural first try, and failed later, deep inside)."""
    if not isinstance(config, BrokerConfig):
        raise TypeError(
            f"{owner} takes a BrokerConfig, not {type(config).__name__}: build it with "
            f"{owner}.from_config(path) for a config file, or {owner}.from_dict(document) "
            "for a dict in config.toml's shape"
        )
    return config


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ::1."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(
    path: str | os.PathLike[str],
    *,
    environ: Mapping[str, str] | None = None,
    read_secrets: ReadSecrets = True,
) -> BrokerConfig:
    """Read and validate a config file.

    With ``read_secrets=False`` no key's secret is read (every ``KeyConfig.secret`` is None),
    for commands that send nothing to Amazon: ``broker status`` and ``broker cache``, run from
    a shell that cannot see the daemon's secrets. With ``"outside-service"`` every secret is
    read but a systemd credential, which only its service can (that key's secret is None):
    ``broker check-config`` run before the service.

    Raises:
        ConfigError: the file is missing, not TOML, or invalid (the message names the key).
    """
    file = Path(path)
    bom = 0
    try:
        raw = file.read_bytes()
        # A UTF-8 byte order mark (Windows Notepad writes one) is not TOML: dropped.
        bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
        document = tomllib.loads(raw[bom:].decode())
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {file}") from None
    except tomllib.TOMLDecodeError as exc:
        hint = unquoted_time_hint(raw[bom:].decode("utf-8", "replace"), str(exc))
        raise ConfigError("", f"{file} is not valid TOML: {exc}{hint}") from None
    except UnicodeDecodeError as exc:
        # TOML is UTF-8 by definition; a Latin-1 comment or a UTF-16 file fails here. The
        # offset counts from the file's start, a dropped byte order mark included.
        raise ConfigError(
            "",
            f"{file} is not UTF-8 (byte {exc.start + bom}): TOML files must be saved as UTF-8",
        ) from None
    except OSError as exc:
        raise ConfigError("", f"cannot read {file}: {exc.strerror}") from None
    return parse_config(
        document,
        environ=os.environ if environ is None else environ,
        source=str(file),
        base_dir=file.parent,
        read_secrets=read_secrets,
    )


def parse_config(
    document: Mapping[str, object],
    *,
    environ: Mapping[str, str],
    source: str = "<mapping>",
    base_dir: Path | None = None,
    read_secrets: ReadSecrets = True,
    in_code: bool = False,
) -> BrokerConfig:
    """Validate a parsed TOML document into a :class:`BrokerConfig` (``read_secrets``: as
    for :func:`load_config`; ``in_code``: the document was given in code, so a secret
    found in it is refused pointing at ``secrets=``)."""
    # TABLES is the one list of them (broker simulate lets these through); a name that
    # looks like a secret is refused at the end, saying where secrets go.
    table = TomlTable(document, "")
    unknown = sorted(name for name in document if name not in TABLES and not _looks_secret(name))
    if unknown:
        raise ConfigError(unknown[0], "unknown key" + did_you_mean(unknown[0], sorted(TABLES)))
    api = _parse_api(table.table("api"))
    keys = tuple(
        _parse_key(
            item,
            f"keys[{i}]",
            api,
            environ,
            base_dir or Path.cwd(),
            read_secrets,
            in_code=in_code,
        )
        for i, item in enumerate(table.array("keys"))
    )
    names = [k.name for k in keys]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"keys[{i}].name", f"duplicate key name {name!r}")
    if not keys:
        raise ConfigError("keys", "at least one [[keys]] entry is required")
    sim_table = table.raw("simulator")
    if sim_table is not None and not isinstance(sim_table, Mapping):
        raise ConfigError("simulator", "must be a table")
    rate = _parse_rate(table.table("rate"))
    for i, key in enumerate(keys):
        if rate.min_rate >= key.tps:
            raise ConfigError(
                "rate.min_rate",
                f"{rate.min_rate:g} is not below keys[{i}].tps ({key.tps:g}): the key could "
                "not slow down after a 429; set it well below the lowest tps (default 0.05)",
            )
    config = BrokerConfig(
        api=api,
        keys=keys,
        engine=_parse_engine(table.table("engine")),
        rate=rate,
        retry=_parse_retry(table.table("retry")),
        output=_parse_output(table.table("output")),
        log=_parse_log(table.table("log")),
        serve=_parse_serve(table.table("serve")),
        simulator=SimulatorTable(sim_table),
        source=source,
        cache=_parse_cache(
            table.table("cache"), base_dir or Path.cwd(), environ, read_secrets=read_secrets
        ),
        state=_parse_state(table.table("state"), environ, base_dir or Path.cwd()),
    )
    _finish(table)
    return config


def config_from_dict(
    document: Mapping[str, object],
    *,
    secrets: Mapping[str, str | Secret] | None = None,
    environ: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> BrokerConfig:
    """Validate a configuration given in code: the checks and messages of config.toml.

    ``document`` has the shape of the TOML file (``{"api": {...}, "keys": [{...}]}``).
    Secrets are never in it: a key names its environment variable
    (``credential_secret_env``, read from ``environ``, default ``os.environ``), or the
    application passes ``secrets``, a key's name to its secret, for credentials kept in
    its own settings.

    Raises:
        ConfigError: the document is invalid (the message names the key path), or
            ``secrets`` names no key or a key that already names its secret's source.
    """
    if not isinstance(document, Mapping):
        raise ConfigError(
            "",
            'the document must be a mapping of tables ({"api": {...}, "keys": [...]}), '
            f"not {type(document).__name__}",
        )
    env = dict(os.environ if environ is None else environ)
    given = dict(secrets or {})
    keys = document.get("keys")
    inline: dict[str, str] = {}
    if given:
        if not isinstance(keys, list | tuple):
            raise ConfigError("keys", "must be an array of tables ([[keys]])")
        patched: list[object] = []
        for i, table in enumerate(keys):
            name = table.get("name") if isinstance(table, Mapping) else None
            if not isinstance(table, Mapping) or not isinstance(name, str) or name not in given:
                patched.append(table)
                continue
            if table.get("credential_secret_env") or table.get("credential_secret_file"):
                raise ConfigError(
                    f"keys[{i}]",
                    f"key {name!r} has its secret in secrets= and names another source; give one",
                )
            value = given.pop(name)
            text = value.reveal() if isinstance(value, Secret) else value
            if not isinstance(text, str):
                raise ConfigError(
                    f"keys[{i}]",
                    f"the secret given for key {name!r} must be a str or a Secret, not "
                    f"{type(text).__name__}",
                )
            text, problem = _clean_secret(text)
            if not text:
                raise ConfigError(
                    f"secrets[{name!r}]",
                    f"the secret given for key {name!r} is empty (or only white space)",
                )
            if problem is not None:
                raise ConfigError(
                    f"secrets[{name!r}]", f"the secret given for key {name!r} {problem}"
                )
            # The secret travels the TOML path through a variable of our own, so a key
            # given in code is checked exactly as one read from the file.
            variable = f"ASINB_INLINE_SECRET_{i}"
            env[variable] = text
            inline[name] = variable
            patched.append({**table, "credential_secret_env": variable})
        if given:
            raise ConfigError("secrets", f"no key named {sorted(given)[0]!r} in keys")
        document = {**document, "keys": patched}
    config = parse_config(
        document,
        environ=env,
        source="<dict>",
        base_dir=Path(base_dir) if base_dir is not None else None,
        in_code=True,
    )
    if not inline:
        return config
    keys_out = tuple(
        replace(key, secret_source=f"secrets[{key.name!r}]") if key.name in inline else key
        for key in config.keys
    )
    return replace(config, keys=keys_out)


_KEY_SECRET_HINT: Final = "keys[].credential_secret_env (or use credential_secret_file)"


def _finish(table: TomlTable, *, secret_in: str = _KEY_SECRET_HINT) -> None:
    """Refuse unknown keys; one that looks like a secret is refused without its value,
    saying where to name the variable that holds it (``secret_in``)."""
    for name in table.unread():
        if _looks_secret(name):
            # Never echo the value: it is probably a real credential.
            raise ConfigError(
                table.key(name),
                "unknown key; secrets are never read from the config file: put the "
                f"secret in an environment variable and name it in {secret_in}",
            )
    table.finish()


def _parse_api(table: TomlTable) -> ApiConfig:
    protocol_name = table.text("protocol", "creators")
    try:
        protocol = Protocol(protocol_name)
    except ValueError:
        raise ConfigError("api.protocol", 'must be "creators" or "paapi5"') from None
    endpoint = table.text("endpoint", SIMULATOR)
    if endpoint not in (SIMULATOR, AMAZON):
        _check_url(endpoint, "api.endpoint", takes='"simulator", "amazon" or an http(s) URL')
        other = Protocol.PAAPI5 if protocol is Protocol.CREATORS else Protocol.CREATORS
        if _is_amazons(endpoint, other):
            # Kept from the other protocol's config (a move from PA-API): taken as a base
            # URL, it would receive this protocol's requests, and its tokens' requests.
            raise ConfigError(
                "api.endpoint",
                f"{endpoint} is Amazon's {other.value} endpoint, but protocol = "
                f'"{protocol.value}": use endpoint = "amazon" for Amazon\'s {protocol.value} '
                "API (or set protocol to match)",
            )
        if _is_amazons(endpoint, protocol):
            # Amazon's own API named by its URL is "amazon": one key identity and one cache
            # namespace with configs that say "amazon", and its real token endpoint and
            # per-marketplace hosts rather than ones derived from this URL.
            endpoint = AMAZON
    token_endpoint = table.opt_text("token_endpoint")
    if token_endpoint is not None:
        if protocol is Protocol.PAAPI5:
            raise ConfigError(
                "api.token_endpoint",
                "is the Creators API's OAuth token URL; PA-API 5.0 signs each request with "
                'its access key and asks for no token: remove it (or set protocol = "creators")',
            )
        _check_url(
            token_endpoint,
            "api.token_endpoint",
            takes="an http(s) URL (leave it out for Amazon's own token endpoint)",
        )
        if endpoint == SIMULATOR:
            # No real use: the embedded simulator answers only tokens it issued itself, and
            # the demo key's secret would go to the other server, to be refused there.
            raise ConfigError(
                "api.token_endpoint",
                'cannot be set with endpoint = "simulator": the embedded simulator issues its '
                "own tokens; remove token_endpoint (or set endpoint to the API it belongs with)",
            )
    resources = table.str_list("resources", DEFAULT_RESOURCES)
    if not resources:
        # resolve_resources' own word ("leave it out for the configured ones") is for a
        # call or a row; here it is the configured ones.
        raise ConfigError(
            "api.resources",
            "the list is empty: name at least one resource, or leave resources out for the "
            f"default ({', '.join(DEFAULT_RESOURCES)})",
        )
    if len(resources) > 100:
        raise ConfigError("api.resources", "Amazon accepts at most 100 resources")
    try:
        resolve_resources(resources, protocol)
    except ValueError as exc:
        raise ConfigError("api.resources", str(exc).removeprefix("resources: ")) from None
    marketplace = _marketplace(table.text("marketplace", "www.amazon.com"), "api.marketplace")
    _finish(table)
    return ApiConfig(
        protocol,
        endpoint.rstrip("/"),
        marketplace,
        resources,
        token_endpoint.rstrip("/") if token_endpoint else None,
    )


def _is_amazons(url: str, protocol: Protocol) -> bool:
    """True when ``url`` is Amazon's own endpoint for ``protocol`` (scheme and case aside)."""
    parsed = urllib.parse.urlsplit(url.strip())
    host = (parsed.hostname or "").lower()
    if parsed.scheme != "https" or parsed.path.strip("/") or parsed.port not in (None, 443):
        return False
    if protocol is Protocol.CREATORS:
        return host == urllib.parse.urlsplit(CREATORS_ENDPOINT).hostname
    return host in {market.paapi_host for market in MARKETPLACES.values()}


def _marketplace(name: str, path: str) -> str:
    """The canonical name (``www.amazon.de``) of a marketplace given as name, domain or code."""
    try:
        return lookup_marketplace(name).name
    except ValueError as exc:
        raise ConfigError(path, str(exc)) from None


def _check_url(url: str, path: str, *, takes: str) -> None:
    """Refuse ``url`` at ``path`` unless it is an http(s) URL fit to send credentials to;
    ``takes`` says what the setting takes, for the refusal of what is no URL."""
    # Credentials first, before any parsing: urlsplit reads "user:pa/ss@host" or "user:pa#ss@host"
    # as a host and a path or fragment, so only a plain "@" anywhere is a safe test (K5).
    if "@" in url:
        raise ConfigError(
            path,
            f"must not carry credentials (user:password@), got {shown_url(url)!r}; "
            "keys authenticate with credential_id and credential_secret_env",
        )
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
        port = parts.port  # a port out of 0..65535 or not a number raises here
    except ValueError:
        # urlsplit refuses some malformed hosts (an unclosed "[" for instance).
        raise ConfigError(path, f"must be {takes}, got {shown_url(url)!r}") from None
    if parts.scheme not in ("http", "https") or not hostname or any(c.isspace() for c in url):
        raise ConfigError(path, f"must be {takes}, got {shown_url(url)!r}")
    if port == 0:
        raise ConfigError(path, "port 0 cannot be connected to; give the server's port")
    if parts.scheme == "http" and not is_loopback_host(hostname):
        raise ConfigError(
            path,
            "plain http:// is only allowed for a loopback host; use https:// so "
            "credentials are not sent in clear text",
        )
    if parts.query or parts.fragment:
        raise ConfigError(path, "must not carry a query string or a fragment")


def shown_url(url: str) -> str:
    """``url`` fit for a message or a log: any ``user:password@`` and query string as ``***``.

    Everything up to the last ``@`` after the scheme is user info, however many ``/``, ``#``
    or ``:`` it holds.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    rest = re.sub(r"[?#].*", "?***", rest)
    return f"{scheme}{sep}{rest}"


def _looks_secret(name: str) -> bool:
    """True for a key name that would hold a credential (``secret``, ``token``, ...)."""
    return _SECRET_NAME.search(name) is not None


def _parse_key(
    table: TomlTable,
    path: str,
    api: ApiConfig,
    environ: Mapping[str, str],
    base_dir: Path,
    read_secrets: ReadSecrets,
    *,
    in_code: bool = False,
) -> KeyConfig:
    for name in list(table.data):
        if _looks_secret(name) and name.lower() not in (
            "credential_secret_env",
            "credential_secret_file",
        ):
            key_name = table.data.get("name")
            label = re.sub(r"[^A-Z0-9]+", "_", str(key_name).upper()).strip("_")
            if not isinstance(key_name, str) or not label:
                label = "KEY"
            env_name = f"ASINB_{label}_SECRET"
            if in_code:
                shown = key_name if isinstance(key_name, str) else "NAME"
                raise ConfigError(
                    f"{path}.{name}",
                    "secrets are never read from the configuration document; pass it apart, "
                    f"as secrets={{{shown!r}: ...}}, or put it in an environment variable and "
                    f'name it here: credential_secret_env = "{env_name}"',
                )
            # A misspelt source (credential_secret_path, secret_file) holds a name, not a
            # secret: the source meant is named first.
            lowered = name.lower()
            if any(word in lowered for word in ("path", "file", "dir")):
                meant = "; did you mean credential_secret_file?"
            elif any(word in lowered for word in ("env", "var")):
                meant = "; did you mean credential_secret_env?"
            else:
                meant = did_you_mean(name, ["credential_secret_env", "credential_secret_file"])
            raise ConfigError(
                f"{path}.{name}",
                (f"unknown key{meant} S" if meant else "s")
                + "ecrets are never read from the config file; put the secret in an "
                f'environment variable and name it here: credential_secret_env = "{env_name}", '
                "or in a file only you can read (chmod 600) named by credential_secret_file",
            )
    name = table.text("name", required=True)
    if not name.isprintable():
        # A line break or a tab would split the rows of `broker status` and check-config.
        raise ConfigError(
            f"{path}.name",
            f"must be printable (no line breaks, tabs or control characters): {name!r}",
        )
    credential_id = table.text("credential_id", required=True)
    _check_credential_id(credential_id, api.protocol, f"{path}.credential_id")
    secret_env = table.opt_text("credential_secret_env")
    secret_file = table.opt_text("credential_secret_file")
    if secret_env and secret_file:
        raise ConfigError(
            f"{path}.credential_secret_file",
            "give credential_secret_env or credential_secret_file, not both",
        )
    secret: Secret | None = None
    source = ""
    if secret_file:
        source = f"file {secret_file}"
        if read_secrets:
            try:
                secret = _read_secret_file(
                    # ~ is the home folder here too, as in every path setting. No other
                    # check of _path_text: the value may be a pasted secret, never echoed.
                    base_dir / os.path.expanduser(_named_on_disk(secret_file)),
                    f"{path}.credential_secret_file",
                    credentials_dir=environ.get("CREDENTIALS_DIRECTORY"),
                )
            except ServiceCredentialError:
                if read_secrets != "outside-service":
                    raise
    elif secret_env:
        if not _ENV_NAME.fullmatch(secret_env):
            # Not a variable name: most likely the secret itself pasted here, so never echo it.
            raise ConfigError(
                f"{path}.credential_secret_env",
                "must be the name of an environment variable (upper-case letters, digits "
                "and _), not the secret itself; put the secret in a variable such as "
                'ASINB_SECRET and write credential_secret_env = "ASINB_SECRET"',
            )
        source = f"${secret_env}"
        # Cleaned as a secret file is (a Docker or Kubernetes secret's newline at its end).
        value, problem = _clean_secret(environ.get(secret_env, "") if read_secrets else "")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                # Bytes the environment could not decode (a Latin-1 file sourced into it):
                # no request could carry them, and the bytes are not echoed.
                raise ConfigError(
                    f"{path}.credential_secret_env",
                    f"environment variable {secret_env} holds bytes that are not UTF-8 text; "
                    "set it to the secret exactly as Associates Central shows it",
                ) from None
        if problem is not None:
            raise ConfigError(
                f"{path}.credential_secret_env", f"environment variable {secret_env} {problem}"
            )
        if value:
            secret = Secret(value)
        elif read_secrets and not api.uses_simulator:
            raise ConfigError(
                f"{path}.credential_secret_env",
                f"environment variable {secret_env} is "
                f"{'empty' if secret_env in environ else 'not set'}; export it with the secret "
                f"of key {name!r}",
            )
    elif not api.uses_simulator:
        raise ConfigError(
            f"{path}.credential_secret_env",
            "is required: name the environment variable that holds this key's secret (or "
            f"give credential_secret_file; in code, pass secrets={{{name!r}: ...}})",
        )
    version = table.opt_text("version")
    if version is not None and api.protocol is Protocol.PAAPI5:
        raise ConfigError(
            f"{path}.version",
            "is a Creators API credential's version; a PA-API 5.0 access key has none: remove "
            'it, or set protocol = "creators" under [api] if this key is a Creators credential',
        )
    if api.protocol is Protocol.CREATORS:
        if version is None:
            raise ConfigError(
                f"{path}.version",
                "is required for the Creators API "
                "(2.1/2.2/2.3 or 3.1/3.2/3.3, shown in Associates Central)",
            )
        if version not in _CREATORS_VERSIONS:
            raise ConfigError(
                f"{path}.version",
                f"unsupported version {version!r}; expected "
                "one of " + ", ".join(sorted(_CREATORS_VERSIONS)),
            )
    tags: dict[str, str] = {}
    spelled: dict[str, str] = {}
    for market, tag in table.str_map("partner_tags").items():
        marketplace = _marketplace(market, f"{path}.partner_tags.{market}")
        if marketplace in tags:
            raise ConfigError(
                f"{path}.partner_tags.{marketplace}",
                f"is given twice, as {spelled[marketplace]!r} and {market!r}: keep one",
            )
        tags[marketplace], spelled[marketplace] = tag, market
    if not tags:
        raise ConfigError(
            f"{path}.partner_tags",
            "is required: a tracking id per marketplace, "
            'e.g. partner_tags = { "www.amazon.com" = "yourtag-20" }',
        )
    for marketplace, tag in tags.items():
        if len(tag) > 64:
            raise ConfigError(f"{path}.partner_tags.{marketplace}", "is longer than 64 characters")
        if any(c.isspace() or not c.isprintable() for c in tag):
            # No tracking id has one (a paste that took a neighbour's text): refused here,
            # not by Amazon at the first request (InvalidPartnerTag, exit 77).
            raise ConfigError(
                f"{path}.partner_tags.{marketplace}",
                f"{tag!r} holds white space or a control character, which no tracking id "
                "has: write it as Associates Central shows it (like yourtag-20)",
            )
    tps = table.number("tps", 1.0, exclusive=True, maximum=MAX_TPS, minimum=0.0)
    tpd_value = table.raw("tpd")
    tpd: int | None
    # 0 is "unlimited"; false and 0.0 equal 0 in Python, so the type is checked too.
    if tpd_value is None or (type(tpd_value) is int and tpd_value == 0):
        tpd = None if tpd_value == 0 else 8640
    else:
        if type(tpd_value) is int and tpd_value < 0:
            raise ConfigError(
                table.key("tpd"), f"must be 0 (unlimited) or a positive number, got {tpd_value}"
            )
        if isinstance(tpd_value, int) and tpd_value > MAX_TPD:
            # Stored as a 64-bit integer by the key state: 10**20, written to mean "no
            # limit", stopped the run there.
            raise ConfigError(
                table.key("tpd"),
                f"must be at most {MAX_TPD} (what {MAX_TPS:g} TPS sends in a day), got "
                f"{tpd_value}; 0 for no daily limit",
            )
        tpd = table.integer("tpd", 8640, minimum=1)
    max_in_flight = table.integer("max_in_flight", 4, minimum=1, maximum=MAX_IN_FLIGHT)
    _finish(table)
    return KeyConfig(name, credential_id, secret, source, version, tags, tps, tpd, max_in_flight)


def _check_credential_id(credential_id: str, protocol: Protocol, path: str) -> None:
    """Refuse a credential id no request could carry: pasted with a comma or a stray
    character, or a Creators id under ``protocol = "paapi5"``.

    Only the id's part before the first bad character is shown: what follows a comma, a
    tab or a space may be the secret, pasted from the credentials CSV in the same line.

    Raises:
        ConfigError: naming the character, where it is, and what to do.
    """
    paapi = protocol is Protocol.PAAPI5
    # The two fields swapped (a common slip): refused without showing any of the value.
    if credential_id.startswith(_LWA_SECRET_PREFIX):
        raise ConfigError(
            path,
            f"looks like a Login with Amazon client secret (it starts {_LWA_SECRET_PREFIX}), "
            "not a credential id (amzn1.application-oa2-client...): put the secret in "
            "credential_secret_env or credential_secret_file and the id here (the value is "
            "not shown)",
        )
    if not paapi and _COGNITO_SECRET.fullmatch(credential_id):
        raise ConfigError(
            path,
            "looks like a Creators 2.x (Cognito) client secret (40 or more lower-case letters "
            "and digits), not a credential id (26 of them for 2.x, amzn1.application-oa2-"
            "client... for 3.x): put the secret in credential_secret_env or "
            "credential_secret_file and the id here (the value is not shown)",
        )
    if paapi and _PAAPI_SECRET.fullmatch(credential_id):
        raise ConfigError(
            path,
            "looks like a PA-API secret key (40 characters), not an access key (20 capitals "
            "and digits, such as AKIA...): put the secret in credential_secret_env or "
            "credential_secret_file and the access key here (the value is not shown)",
        )
    if paapi and credential_id.startswith("amzn1."):
        raise ConfigError(
            path,
            'is a Creators API credential id, but api.protocol = "paapi5" applies to every '
            'key: set protocol = "creators" (with each key\'s version) to use it',
        )
    for place, char in enumerate(credential_id):
        if not char.isprintable() or char.isspace():
            what = "a space, line break or control character"
        elif paapi and not _ACCESS_KEY.fullmatch(char):
            what = f"{char!r} (a PA-API access key is letters and digits only)"
        elif not paapi and not _CREDENTIAL_ID.fullmatch(char):
            what = f"{char!r} (a credential id is letters, digits, '.', '-' and '_')"
        else:
            continue
        # A '+' or '/' in a PA-API id: the whole field may be a secret key (those hold
        # them), so not even the part before it is shown.
        after = "" if paapi and char in "+/" else f", after {credential_id[:place]!r}"
        raise ConfigError(
            path,
            f"holds {what} at character {place + 1}{after}: copy the id alone again from "
            "Associates Central (the rest is not shown: it may be the secret)",
        )


def _read_secret_file(file: Path, path: str, *, credentials_dir: str | None = None) -> Secret:
    """Read a secret file, refusing one that others can read (the libpq .pgpass rule).

    A file in ``credentials_dir`` (systemd's ``$CREDENTIALS_DIRECTORY``, filled by
    ``LoadCredential=``) skips the owner and mode checks: systemd makes such a file root's,
    mode 0400, and grants the service user read access with an ACL (which shows as group
    bits), in a directory private to the service.
    """
    try:
        info = file.stat()
    except ValueError:
        raise _no_such_file(file, path) from None  # a NUL: no file has this name
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
            raise _no_such_file(file, path) from None
        if exc.errno in (errno.EACCES, errno.EPERM) and _is_inside(file, SYSTEMD_CREDENTIALS):
            # The unit's credentials directory is its user's alone: a member of the
            # service's group checking the config while it runs cannot even look.
            raise _service_credential(file, path) from None
        raise ConfigError(path, f"cannot read {file}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(path, f"{file} is not a regular file")
    trusted = bool(credentials_dir and _is_inside(file, Path(credentials_dir)))
    if not trusted and _is_inside(file, SYSTEMD_CREDENTIALS):
        # Another unit's credential (its service runs): systemd's owner and mode are not
        # ours to judge, and this process is not the one meant to read it.
        raise _service_credential(file, path)
    if not trusted and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        mode = stat.S_IMODE(info.st_mode)
        raise ConfigError(
            path,
            f"{file} is accessible by group or others (mode {mode:04o}); run chmod 600 {file}",
        )
    if not trusted and hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise ConfigError(path, f"{file} is not owned by the user running the broker")
    try:
        with file.open("rb") as stream:
            # Bounded: a file named by mistake (a log, an archive) is not read whole.
            raw = stream.read(_MAX_SECRET_FILE + 1)
        if len(raw) > _MAX_SECRET_FILE:
            raise ConfigError(
                path, f"{file} is over {_MAX_SECRET_FILE // 1024} KiB: no secret file is"
            )
        text = raw.decode("utf-8")
    except OSError as exc:
        raise ConfigError(path, f"cannot read {file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        # The decoder's message quotes bytes of the file: say where, not what.
        raise ConfigError(path, f"{file} is not UTF-8 text") from None
    value, problem = _clean_secret(text)
    if not value:
        raise ConfigError(path, f"{file} is empty")
    if problem is not None:
        raise ConfigError(path, f"{file} {problem}")
    return Secret(value)


#: Longer than any credential secret Amazon issues (they are under 100 characters).
_MAX_SECRET: Final = 512
#: The most of a secret file read: beyond it, the file is no secret file.
_MAX_SECRET_FILE: Final = 64 * 1024


def _clean_secret(raw: str) -> tuple[str, str | None]:
    """A secret as Associates Central shows it, and why it cannot be one (None: it can).

    Blanks and line ends around it are dropped (a variable filled from a Docker or
    Kubernetes secret often ends in a newline), and so is a byte-order mark (Notepad saves
    one): either would make every request fail as a wrong secret. Inside it, a blank, a
    line break or a control character means more than the secret was pasted (two lines, a
    credentials CSV), and so does a length no secret has; the reason never quotes it.
    """
    value = raw.strip().lstrip("\ufeff").strip()
    if any(char.isspace() or unicodedata.category(char).startswith("C") for char in value):
        return value, (
            "holds a blank, line break or control character inside the secret (two lines, "
            "or a credentials CSV pasted?); leave the secret alone there"
        )
    if len(value) > _MAX_SECRET:
        return value, (
            f"holds {len(value):,} characters, more than any credential secret; leave the "
            "secret alone there"
        )
    return value, None


class ServiceCredentialError(ConfigError):
    """A key's secret file is a systemd credential (``/run/credentials/<unit>/...``) and this
    process is not that unit: only the service can read it. ``broker check-config`` then
    validates the rest and says the secret was not checked."""


def _service_credential(file: Path, path: str) -> ServiceCredentialError:
    """The error for a systemd credential read by a process that is not its service."""
    return ServiceCredentialError(
        path,
        f"{file} is a systemd credential, which only its service can read: run this "
        "command as part of the service, or give it a config with a key of its own",
    )


def _no_such_file(file: Path, path: str) -> ConfigError:
    """The error for a secret file name that names no file."""
    if file.is_absolute() and _is_inside(file, SYSTEMD_CREDENTIALS):
        # A systemd credential: it exists only inside its service (LoadCredential=).
        return _service_credential(file, path)
    # Most likely the secret itself pasted here (missing, too long for a path, holding a
    # NUL): never echo the value.
    return ConfigError(
        path,
        "names no file (No such file or directory; the value is not shown, in case it is "
        "the secret itself): give the path of a file holding the secret, relative to the "
        "config file's directory",
    )


def _is_inside(file: Path, directory: Path) -> bool:
    try:
        return file.resolve().is_relative_to(directory.resolve())
    except (OSError, ValueError):  # ValueError: a NUL in the name
        return False


def _parse_engine(table: TomlTable) -> EngineConfig:
    config = EngineConfig(
        queue_size=table.integer("queue_size", 10_000, minimum=1),
        linger_s=table.number("linger_s", 0.05, maximum=60.0, minimum=0.0),
        batch_size=table.integer("batch_size", 10, minimum=1, maximum=10),
        request_timeout_s=table.number("request_timeout_s", 30.0, exclusive=True, minimum=0.0),
        connect_timeout_s=table.number("connect_timeout_s", 10.0, exclusive=True, minimum=0.0),
        max_body_bytes=table.integer("max_body_bytes", 8 * 1024 * 1024, minimum=1024),
        max_connections=table.integer("max_connections", 64, minimum=1),
    )
    _finish(table)
    return config


def _parse_rate(table: TomlTable) -> RateConfig:
    config = RateConfig(
        beta=table.number("beta", 0.1, exclusive=True, maximum=0.9, minimum=0.0),
        target_429_share=table.number(
            "target_429_share", 0.01, exclusive=True, maximum=0.5, minimum=0.0
        ),
        min_rate=table.number("min_rate", 0.05, exclusive=True, minimum=0.0),
        discover=table.boolean("discover", False),
        retry_after_cap_s=table.number("retry_after_cap_s", 60.0, minimum=0.0),
        tpd_guard=table.number("tpd_guard", 0.99, exclusive=True, maximum=1.0, minimum=0.0),
        daily_reset_s=_time_of_day(table, "daily_reset_utc"),
    )
    _finish(table)
    return config


def _time_of_day(table: TomlTable, name: str) -> int:
    """A time of day written ``"HH:MM"`` (or ``"HH:MM:SS"``), UTC, as seconds after
    midnight; 0 when absent."""
    text = table.opt_text(name)
    if text is None:
        return 0
    match = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?", text.strip())
    if match is None:
        raise ConfigError(table.key(name), 'must be a UTC time of day, "HH:MM" (e.g. "08:00")')
    hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return hours * 3_600 + minutes * 60 + seconds


def _parse_retry(table: TomlTable) -> RetryConfig:
    config = RetryConfig(
        max_attempts=table.integer("max_attempts", 6, minimum=1, maximum=100),
        max_age_s=table.number("max_age_s", 600.0, exclusive=True, minimum=0.0),
        base_delay_s=table.number("base_delay_s", 0.5, minimum=0.0),
        max_delay_s=table.number("max_delay_s", 30.0, minimum=0.0),
        outage_budget_s=table.number("outage_budget_s", 900.0, exclusive=True, minimum=0.0),
    )
    _finish(table)
    return config


def _path_text(table: TomlTable, name: str) -> str | None:
    """A path setting, ``~`` expanded; None when unset.

    Raises:
        ConfigError: it holds a NUL, which no path can (the OS would refuse it later, far
            from the config), or a shell variable, which nothing here expands.
    """
    raw = table.opt_text(name)
    if raw is None:
        return None
    if "\x00" in raw:
        raise ConfigError(table.key(name), "holds a NUL character, which no path can hold")
    variable = _SHELL_VARIABLE.search(raw)
    if variable is not None:
        raise ConfigError(
            table.key(name),
            f"holds {variable.group()}, but no variable is expanded in a path setting (only a "
            "leading ~, for your home): write the path itself",
        )
    expanded = os.path.expanduser(_named_on_disk(raw))
    why = no_home(raw, expanded)
    if why is not None:
        raise ConfigError(table.key(name), why)
    return expanded


def no_home(given: str, expanded: str) -> str | None:
    """Why the leading ``~`` of the path ``given`` names no folder (``expanded`` is what
    ``os.path.expanduser`` made of it), else None.

    ``~name`` of a user this machine does not have comes back as written, and a folder
    named ``~name`` would be made; ``~`` with no home (HOME unset and no /etc/passwd entry,
    or HOME empty, which makes ``~/x`` into ``/x``) likewise.
    """
    if not given.startswith("~"):
        return None
    user = given.split("/", 1)[0]
    if user == "~" and (expanded.startswith("~") or os.environ.get("HOME") == ""):
        return "~ names no home folder (HOME is empty, or unset with no /etc/passwd entry)"
    if expanded.startswith("~"):
        return f"{user} names no user on this machine"
    return None


def _named_on_disk(text: str) -> str:
    """A path the config wrote (Unicode) as Python names files here: the same text where
    the file-name encoding holds it (UTF-8, or a Latin-1 locale for ``é``: the files an
    older version made are found again); else (``é`` under a C locale with
    ``PYTHONUTF8=0``) its UTF-8 bytes, so that ``état/`` is a folder there too, not an
    encoding error."""
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return os.fsdecode(text.encode("utf-8", "surrogateescape"))
    return text


def _file_path(table: TomlTable, name: str, base_dir: Path) -> Path | None:
    """A SQLite file's path setting, relative to ``base_dir`` (an absolute one stays).

    Raises:
        ConfigError: it names a directory, where the file would never open.
    """
    raw = _path_text(table, name)
    if raw is None:
        return None
    path = base_dir / raw
    try:
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
    except OSError as exc:
        if exc.errno in (errno.ENAMETOOLONG, errno.ELOOP):  # a path no file can ever have
            raise ConfigError(table.key(name), f"{raw}: {exc.strerror}") from exc
        is_dir = False  # not there yet, or not ours to look at: the store says at its open
    if raw.endswith(("/", os.sep)) or is_dir:
        raise ConfigError(
            table.key(name),
            f"{raw} is a directory: name a file in it ({path / 'asin-broker.sqlite3'}, say)",
        )
    return path


def _parse_output(table: TomlTable) -> OutputConfig:
    fmt = table.text("format", "jsonl")
    if fmt not in ("jsonl", "csv", "sqlite"):
        raise ConfigError("output.format", 'must be "jsonl", "csv" or "sqlite"')
    config = OutputConfig(fmt, _path_text(table, "directory") or "out")
    _finish(table)
    return config


def _parse_serve(table: TomlTable) -> ServeConfig:
    config = ServeConfig(
        convert_isbn13=table.boolean("convert_isbn13", False),
        no_wait=table.boolean("no_wait", False),
        settle_s=table.number("settle_s", 2.0, minimum=0.0, maximum=3600.0),
    )
    _finish(table)
    return config


def _parse_log(table: TomlTable) -> LogConfig:
    level = table.text("level", "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log.level", 'must be "debug", "info", "warning" or "error"')
    fmt = table.text("format", "auto")
    if fmt not in ("auto", "console", "json"):
        raise ConfigError("log.format", 'must be "auto", "console" or "json"')
    _finish(table)
    return LogConfig(level, fmt)


def _parse_cache(
    table: TomlTable, base_dir: Path, environ: Mapping[str, str], *, read_secrets: ReadSecrets
) -> CacheConfig:
    raw_max_age = table.raw("max_age_s")
    max_age = None
    if raw_max_age is not None:
        max_age = check_max_age(table.number("max_age_s", 0.0), "cache.max_age_s")
    offers = check_max_age(table.number("offers_max_age_s", 3_600.0), "cache.offers_max_age_s")
    _cache_redis_needs_backend(table)
    backend = table.text("backend", "sqlite")
    if backend not in ("sqlite", "redis", "memory"):
        raise ConfigError("cache.backend", 'must be "sqlite", "redis" or "memory"')
    file = _file_path(table, "path", base_dir)
    path = None if file is None else str(file)
    redis_url = table.opt_text("redis_url")
    redis_url_env = table.opt_text("redis_url_env")
    if redis_url is not None:
        if _url_has_password(redis_url):
            raise ConfigError(
                "cache.redis_url",
                "must not carry a password: put the whole URL in an environment variable "
                'and name it in redis_url_env = "ASINB_REDIS_URL"',
            )
        _check_redis_url(redis_url, "cache.redis_url")
    if redis_url_env is not None and not _ENV_NAME.fullmatch(redis_url_env):
        raise ConfigError("cache.redis_url_env", "must be the name of an environment variable")
    if redis_url_env is not None and backend == "redis":
        # Read only for Redis, as [state] reads its password: a block naming the variable
        # beside another backend needs none.
        redis_url = environ.get(redis_url_env, "").strip() or None
        if redis_url is None and read_secrets is not False:
            raise ConfigError(
                "cache.redis_url_env",
                f"environment variable {redis_url_env} is "
                f"{'empty' if redis_url_env in environ else 'not set'}",
            )
        if redis_url is not None:
            _check_redis_url(redis_url, "cache.redis_url_env", variable=redis_url_env)
    if backend == "redis":
        _require_redis("cache.backend")
        # Unread without secrets (broker status, from a shell without the daemon's
        # environment): the cache commands, which open the cache, say so then.
        if redis_url is None and redis_url_env is None:
            raise ConfigError("cache.redis_url", 'is required with backend = "redis"')
    config = CacheConfig(
        max_age_s=max_age,
        offers_max_age_s=offers,
        max_items=table.integer("max_items", 100_000, minimum=1),
        max_bytes=table.integer("max_bytes", 256 * 1024 * 1024, minimum=0),
        backend=backend,
        path=path,
        redis_url=None if redis_url is None else Secret(redis_url),
        redis_url_env=redis_url_env,
        key_prefix=table.text("key_prefix", "asinb:cache:"),
    )
    # The cache's Redis password travels in its URL, read from a variable.
    _finish(table, secret_in="[cache] redis_url_env (the whole URL, password included)")
    return config
