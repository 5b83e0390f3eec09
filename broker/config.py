"""config.toml -> frozen dataclasses, validated eagerly; secrets come from the environment.

Every problem raises :class:`~broker.errors.ConfigError` naming the TOML key path
(``keys[1].tps``). Unknown keys are errors (they are usually typos). A secret written
into the file itself is refused with the name of the environment variable to use.
Environment access goes through an injectable ``environ`` mapping, so tests pass a dict.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from broker.api.marketplaces import marketplace as lookup_marketplace
from broker.errors import ConfigError
from broker.models import Protocol, Secret
from broker.simulator.settings import SimulatorSettings

__all__ = [
    "DEFAULT_RESOURCES",
    "ApiConfig",
    "BrokerConfig",
    "EngineConfig",
    "KeyConfig",
    "LogConfig",
    "OutputConfig",
    "RateConfig",
    "RetryConfig",
    "StateConfig",
    "is_loopback_host",
    "load_config",
    "parse_config",
]

#: Resources asked for when the config names none: enough for the typed summary.
DEFAULT_RESOURCES: Final = (
    "itemInfo.title",
    "offersV2.listings.price",
    "offersV2.listings.availability",
    "images.primary.medium",
)

SIMULATOR: Final = "simulator"
AMAZON: Final = "amazon"

_CREATORS_VERSIONS: Final = frozenset({"2.1", "2.2", "2.3", "3.1", "3.2", "3.3"})
#: Key names that would hold a credential; such a key is refused without echoing its value.
_SECRET_NAME: Final = re.compile(
    r"secret|passw|private|token(?!_?(endpoint|url))|api_?key", re.IGNORECASE
)
#: A conventional environment variable name: upper-case letters, digits and underscores.
_ENV_NAME: Final = re.compile(r"[A-Z_][A-Z0-9_]{0,127}")


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
        token_endpoint: override for the Creators token URL base (tests, proxies).
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

    #: bound of the intake queue (lookups waiting to be batched)
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
    #: target share of 429s at equilibrium
    target_429_share: float = 0.01
    #: the lowest rate a key is cut to, requests/s
    min_rate: float = 0.05
    #: probe above the configured tps to find a grown quota
    discover: bool = False
    #: longest pause honoured from Retry-After / retryAfterSeconds
    retry_after_cap_s: float = 60.0
    #: share of TPD after which a key stops for the day
    tpd_guard: float = 0.99


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
class LogConfig:
    """CLI logging: level and renderer (auto: console on a terminal, JSON otherwise)."""

    level: str = "info"
    format: str = "auto"


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


def _parse_state(table: _Table, environ: Mapping[str, str], base_dir: Path) -> StateConfig:
    backend = table.text("backend", "local")
    if backend not in ("local", "redis", "memory"):
        raise ConfigError("state.backend", 'must be "local", "redis" or "memory"')
    raw_path = table.opt_text("path")
    path = None if raw_path is None else base_dir / Path(raw_path).expanduser()
    redis_url = table.opt_text("redis_url")
    password_env = table.opt_text("redis_password_env")
    key_prefix = table.text("key_prefix", "asin-broker:")
    table.finish()
    password: Secret | None = None
    if backend == "redis":
        if redis_url is None:
            raise ConfigError("state.redis_url", 'is required with backend = "redis"')
        if urlsplit(redis_url).scheme not in ("redis", "rediss", "unix"):
            raise ConfigError("state.redis_url", "must be a redis://, rediss:// or unix:// URL")
        if urlsplit(redis_url).password:
            raise ConfigError(
                "state.redis_url",
                "must not hold a password: name its env var in redis_password_env",
            )
        if password_env is not None:
            if not _ENV_NAME.fullmatch(password_env):
                raise ConfigError(
                    "state.redis_password_env", "must be an environment variable name"
                )
            value = environ.get(password_env, "")
            if not value:
                raise ConfigError(
                    "state.redis_password_env", f"environment variable {password_env} is not set"
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
    simulator: SimulatorSettings = field(default_factory=SimulatorSettings)
    source: str = "<objects>"
    state: StateConfig = field(default_factory=StateConfig)


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
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> BrokerConfig:
    """Read and validate a config file.

    Raises:
        ConfigError: the file is missing, not TOML, or invalid (the message names the key).
    """
    file = Path(path)
    try:
        with file.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {file}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{file} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError("", f"cannot read {file}: {exc.strerror}") from None
    return parse_config(
        document,
        environ=os.environ if environ is None else environ,
        source=str(file),
        base_dir=file.parent,
    )


def parse_config(
    document: Mapping[str, object],
    *,
    environ: Mapping[str, str],
    source: str = "<mapping>",
    base_dir: Path | None = None,
) -> BrokerConfig:
    """Validate a parsed TOML document into a :class:`BrokerConfig`."""
    table = _Table(document, "")
    api = _parse_api(table.table("api"))
    keys = tuple(
        _parse_key(item, f"keys[{i}]", api, environ, base_dir or Path.cwd())
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
    config = BrokerConfig(
        api=api,
        keys=keys,
        engine=_parse_engine(table.table("engine")),
        rate=_parse_rate(table.table("rate")),
        retry=_parse_retry(table.table("retry")),
        output=_parse_output(table.table("output")),
        log=_parse_log(table.table("log")),
        simulator=SimulatorSettings.from_mapping(sim_table or {}, path="simulator"),
        source=source,
        state=_parse_state(table.table("state"), environ, base_dir or Path.cwd()),
    )
    table.finish()
    return config


class _Table:
    """A TOML table being read: typed getters that name the key path, and unknown-key checks."""

    def __init__(self, data: Mapping[str, object], path: str) -> None:
        self._data = data
        self._path = path
        self._seen: set[str] = set()

    def _key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def raw(self, name: str) -> object | None:
        self._seen.add(name)
        return self._data.get(name)

    def table(self, name: str) -> _Table:
        value = self.raw(name)
        if value is None:
            return _Table({}, self._key(name))
        if not isinstance(value, Mapping):
            raise ConfigError(self._key(name), "must be a table")
        return _Table(value, self._key(name))

    def array(self, name: str) -> list[_Table]:
        value = self.raw(name)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise ConfigError(self._key(name), f"must be an array of tables ([[{name}]])")
        return [_Table(v, f"{self._key(name)}[{i}]") for i, v in enumerate(value)]

    def text(self, name: str, default: str | None = None, *, required: bool = False) -> str:
        value = self.raw(name)
        if value is None:
            if required or default is None:
                raise ConfigError(self._key(name), "is required")
            return default
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(self._key(name), "must be a non-empty string")
        return value.strip()

    def opt_text(self, name: str) -> str | None:
        if self._data.get(name) is None:
            self._seen.add(name)
            return None
        return self.text(name)

    def number(
        self,
        name: str,
        default: float,
        *,
        minimum: float = 0.0,
        exclusive: bool = False,
        maximum: float | None = None,
    ) -> float:
        value = self.raw(name)
        if value is None:
            return default
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ConfigError(self._key(name), "must be a number")
        number = float(value)
        if number < minimum or (exclusive and number == minimum):
            op = ">" if exclusive else ">="
            raise ConfigError(self._key(name), f"must be {op} {minimum:g}, got {number:g}")
        if maximum is not None and number > maximum:
            raise ConfigError(self._key(name), f"must be <= {maximum:g}, got {number:g}")
        return number

    def integer(
        self, name: str, default: int, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self._key(name), "must be an integer")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ConfigError(self._key(name), f"must be {bound}, got {value}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(self._key(name), "must be true or false")
        return value

    def str_list(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(self._key(name), "must be a list of non-empty strings")
        return tuple(value)

    def str_map(self, name: str) -> dict[str, str]:
        value = self.raw(name)
        if value is None:
            return {}
        if not isinstance(value, Mapping) or not all(
            isinstance(v, str) and v for v in value.values()
        ):
            raise ConfigError(self._key(name), "must be a table of strings")
        return {str(k): str(v) for k, v in value.items()}

    def finish(self) -> None:
        """Raise for any key that no getter read: an unknown key is almost always a typo."""
        for name in self._data:
            if name not in self._seen:
                if _looks_secret(name):
                    # Never echo the value: it is probably a real credential.
                    raise ConfigError(
                        self._key(name),
                        "unknown key; secrets are never read from the config file: put the "
                        "secret in an environment variable and name it in "
                        "keys[].credential_secret_env (or use credential_secret_file)",
                    )
                raise ConfigError(self._key(name), "unknown key")


def _parse_api(table: _Table) -> ApiConfig:
    protocol_name = table.text("protocol", "creators")
    try:
        protocol = Protocol(protocol_name)
    except ValueError:
        raise ConfigError("api.protocol", 'must be "creators" or "paapi5"') from None
    endpoint = table.text("endpoint", SIMULATOR)
    if endpoint not in (SIMULATOR, AMAZON):
        _check_url(endpoint, "api.endpoint")
    token_endpoint = table.opt_text("token_endpoint")
    if token_endpoint is not None:
        _check_url(token_endpoint, "api.token_endpoint")
    resources = table.str_list("resources", DEFAULT_RESOURCES)
    if len(resources) > 100:
        raise ConfigError("api.resources", "Amazon accepts at most 100 resources")
    marketplace = _marketplace(table.text("marketplace", "www.amazon.com"), "api.marketplace")
    table.finish()
    return ApiConfig(
        protocol,
        endpoint.rstrip("/"),
        marketplace,
        resources,
        token_endpoint.rstrip("/") if token_endpoint else None,
    )


def _marketplace(name: str, path: str) -> str:
    """The canonical name (``www.amazon.de``) of a marketplace given as name, domain or code."""
    try:
        return lookup_marketplace(name).name
    except ValueError as exc:
        raise ConfigError(path, str(exc)) from None


def _check_url(url: str, path: str) -> None:
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
        has_credentials = bool(parts.username or parts.password or parts.query)
    except ValueError:
        # urlsplit refuses some malformed hosts (an unclosed "[" for instance).
        raise ConfigError(
            path, f'must be "simulator", "amazon" or an http(s) URL, got {_shown_url(url)!r}'
        ) from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise ConfigError(
            path, f'must be "simulator", "amazon" or an http(s) URL, got {_shown_url(url)!r}'
        )
    if parts.scheme == "http" and not is_loopback_host(hostname):
        raise ConfigError(
            path,
            "plain http:// is only allowed for a loopback host; use https:// so "
            "credentials are not sent in clear text",
        )
    if has_credentials:
        raise ConfigError(path, "must not carry credentials or a query string")


def _shown_url(url: str) -> str:
    """``url`` fit for an error message: user:password@ and any query string cut out."""
    shown = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)?[^/?#]*@", r"\1***@", url)
    return re.sub(r"[?#].*", "?***", shown)


def _looks_secret(name: str) -> bool:
    """True for a key name that would hold a credential (``secret``, ``token``, ...)."""
    return _SECRET_NAME.search(name) is not None


def _parse_key(
    table: _Table, path: str, api: ApiConfig, environ: Mapping[str, str], base_dir: Path
) -> KeyConfig:
    for name in list(table._data):
        if _looks_secret(name) and name.lower() not in (
            "credential_secret_env",
            "credential_secret_file",
        ):
            key_name = table._data.get("name")
            label = re.sub(r"[^A-Z0-9]+", "_", str(key_name).upper()).strip("_")
            if not isinstance(key_name, str) or not label:
                label = "KEY"
            env_name = f"ASINB_{label}_SECRET"
            raise ConfigError(
                f"{path}.{name}",
                "secrets are never read from the config file; put the secret in an "
                f'environment variable and name it here: credential_secret_env = "{env_name}"',
            )
    name = table.text("name", required=True)
    credential_id = table.text("credential_id", required=True)
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
        secret = _read_secret_file(base_dir / secret_file, f"{path}.credential_secret_file")
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
        value = environ.get(secret_env, "")
        if value:
            secret = Secret(value)
        elif not api.uses_simulator:
            raise ConfigError(
                f"{path}.credential_secret_env",
                f"environment variable {secret_env} is not set; export it with the secret of "
                f"key {name!r}",
            )
    elif not api.uses_simulator:
        raise ConfigError(
            f"{path}.credential_secret_env",
            "is required: name the environment variable that holds this key's secret",
        )
    version = table.opt_text("version")
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
    tags = {
        _marketplace(market, f"{path}.partner_tags.{market}"): tag
        for market, tag in table.str_map("partner_tags").items()
    }
    if not tags:
        raise ConfigError(
            f"{path}.partner_tags",
            "is required: a tracking id per marketplace, "
            'e.g. partner_tags = { "www.amazon.com" = "yourtag-20" }',
        )
    for marketplace, tag in tags.items():
        if len(tag) > 64:
            raise ConfigError(f"{path}.partner_tags.{marketplace}", "is longer than 64 characters")
    tps = table.number("tps", 1.0, exclusive=True, maximum=1000.0)
    tpd_value = table.raw("tpd")
    tpd: int | None
    if tpd_value is None or tpd_value == 0:
        tpd = None if tpd_value == 0 else 8640
    else:
        tpd = table.integer("tpd", 8640, minimum=1)
    max_in_flight = table.integer("max_in_flight", 4, minimum=1, maximum=1000)
    table.finish()
    return KeyConfig(name, credential_id, secret, source, version, tags, tps, tpd, max_in_flight)


def _read_secret_file(file: Path, path: str) -> Secret:
    """Read a secret file, refusing one that others can read (the libpq .pgpass rule)."""
    try:
        info = file.stat()
    except OSError as exc:
        raise ConfigError(path, f"cannot read {file}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        mode = stat.S_IMODE(info.st_mode)
        raise ConfigError(
            path,
            f"{file} is accessible by group or others (mode {mode:04o}); run chmod 600 {file}",
        )
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise ConfigError(path, f"{file} is not owned by the user running the broker")
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(path, f"{file} is not a regular file")
    try:
        value = file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(path, f"cannot read {file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        # The decoder's message quotes bytes of the file: say where, not what.
        raise ConfigError(path, f"{file} is not UTF-8 text") from None
    if not value:
        raise ConfigError(path, f"{file} is empty")
    return Secret(value)


def _parse_engine(table: _Table) -> EngineConfig:
    config = EngineConfig(
        queue_size=table.integer("queue_size", 10_000, minimum=1),
        linger_s=table.number("linger_s", 0.05, maximum=60.0),
        batch_size=table.integer("batch_size", 10, minimum=1, maximum=10),
        request_timeout_s=table.number("request_timeout_s", 30.0, exclusive=True),
        connect_timeout_s=table.number("connect_timeout_s", 10.0, exclusive=True),
        max_body_bytes=table.integer("max_body_bytes", 8 * 1024 * 1024, minimum=1024),
        max_connections=table.integer("max_connections", 64, minimum=1),
    )
    table.finish()
    return config


def _parse_rate(table: _Table) -> RateConfig:
    config = RateConfig(
        beta=table.number("beta", 0.1, exclusive=True, maximum=0.9),
        target_429_share=table.number("target_429_share", 0.01, exclusive=True, maximum=0.5),
        min_rate=table.number("min_rate", 0.05, exclusive=True),
        discover=table.boolean("discover", False),
        retry_after_cap_s=table.number("retry_after_cap_s", 60.0),
        tpd_guard=table.number("tpd_guard", 0.99, exclusive=True, maximum=1.0),
    )
    table.finish()
    return config


def _parse_retry(table: _Table) -> RetryConfig:
    config = RetryConfig(
        max_attempts=table.integer("max_attempts", 6, minimum=1, maximum=100),
        max_age_s=table.number("max_age_s", 600.0, exclusive=True),
        base_delay_s=table.number("base_delay_s", 0.5),
        max_delay_s=table.number("max_delay_s", 30.0),
        outage_budget_s=table.number("outage_budget_s", 900.0, exclusive=True),
    )
    table.finish()
    return config


def _parse_output(table: _Table) -> OutputConfig:
    fmt = table.text("format", "jsonl")
    if fmt not in ("jsonl", "csv", "sqlite"):
        raise ConfigError("output.format", 'must be "jsonl", "csv" or "sqlite"')
    config = OutputConfig(fmt, table.text("directory", "out"))
    table.finish()
    return config


def _parse_log(table: _Table) -> LogConfig:
    level = table.text("level", "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log.level", 'must be "debug", "info", "warning" or "error"')
    fmt = table.text("format", "auto")
    if fmt not in ("auto", "console", "json"):
        raise ConfigError("log.format", 'must be "auto", "console" or "json"')
    table.finish()
    return LogConfig(level, fmt)
