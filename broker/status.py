"""``broker status``: every configured key's shared state, as the state store holds it.

Reads (never writes a reservation, never registers as a process) the store ``[state]``
names, for each key of the config: the shared rate now and configured, requests today and
left, whether it is paused or parked, until when and why, the last 429, and how many
processes used it in the last minute. Times in the store are on the store's clock; they are
shown as wall times computed from "how long from now", so no clock needs to agree.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from broker.bench import format_table
from broker.config import AMAZON, BrokerConfig, redacted_url
from broker.engine.adaptive import AdaptiveSettings
from broker.engine.metrics import QUOTA_WAIT
from broker.engine.shared_limiter import account_day_limit, key_limits
from broker.errors import ConfigError, StateUnavailableError
from broker.exitcode import ExitCode
from broker.progname import prog
from broker.sqlitewal import RefusedFileError, file_in_the_way, real_path, refuse_orphans
from broker.state import KeyView, StateKey, local_state_path, open_store
from broker.stdio import print_json

if TYPE_CHECKING:
    from broker.state import Decision

__all__ = ["NEVER_USED", "KeyStatus", "add_arguments", "key_statuses", "status_command"]

#: The state of a key the store holds no record of.
NEVER_USED = "never used"

_US = 1_000_000


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """One key's shared state, ready to print."""

    name: str
    rate: float
    configured_tps: float
    today: int
    day_limit: int | None
    left: int | None
    state: str
    until: str | None
    reason: str | None
    last_429: str | None
    processes: int

    def to_json(self) -> dict[str, object]:
        """The status as a JSON-able mapping (``--json``)."""
        return {
            "key": self.name,
            "rate": round(self.rate, 4),
            "configured_tps": self.configured_tps,
            "requests_today": self.today,
            "daily_limit": self.day_limit,
            "left_today": self.left,
            "state": self.state,
            "until": self.until,
            "reason": self.reason,
            "last_429": self.last_429,
            "processes_recent": self.processes,
        }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``broker status``."""
    parser.add_argument(
        "--config", help="config file (default: $ASINB_CONFIG if set, else ./config.toml)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def _iso(instant: datetime) -> str:
    return instant.strftime("%Y-%m-%dT%H:%M:%SZ")


def _at(d: Decision, store_us: int) -> datetime:
    """A store time as a UTC instant, told by the store's wall clock at the decision (as
    the daily window is): a machine whose clock is off shows what the others show."""
    return datetime.fromtimestamp(d.wall_us / 1e6, UTC) + timedelta(
        microseconds=store_us - d.now_us
    )


def _status(view: KeyView, configured_tps: float) -> KeyStatus:
    d = view.decision
    # The limit the key keeps to: the lowest a process sharing it asked with recently.
    limit = d.day_limit
    state, until, reason = "active", None, None
    if d.parked_until_us:
        state, reason = "parked", d.park_reason or None
        until = _iso(_at(d, d.parked_until_us)) if d.parked_until_us > d.now_us else None
        if until is None:
            # The park is over; the key's next send (by whichever process) is its probe.
            state = "probe due"
    elif limit is not None and d.count >= limit:
        own = view.limits.day_limit
        if own is None or d.count < own:
            # Only another process's lower tpd stops the key (engine: broker.daily_quota_held);
            # that hold lapses when the process closes, or a minute after it stops asking.
            state, reason = QUOTA_WAIT, f"another process's lower tpd ({limit}/day)"
        else:
            state, reason = QUOTA_WAIT, "daily quota spent"
            # The store's window: another live process's reset may hold it.
            until = _iso(datetime.fromtimestamp(d.window_end_us / 1e6, UTC))
    elif d.paused_until_us:
        state, reason = "paused", d.pause_reason or None
        until = _iso(_at(d, d.paused_until_us))
    elif not view.stored:
        # Its figures are the config's: shown "active" with the day's whole quota left, they
        # read as a key in use when the daemon keeps its state elsewhere (another file,
        # Redis database or key_prefix).
        state = NEVER_USED
    return KeyStatus(
        name=view.key.name,
        rate=d.rate,
        configured_tps=configured_tps,
        today=d.count,
        day_limit=limit,
        left=None if limit is None else max(0, limit - d.count),
        state=state,
        until=until,
        reason=reason,
        last_429=_iso(_at(d, d.last_429_us)) if d.last_429_us else None,
        processes=d.processes,
    )


async def key_statuses(config: BrokerConfig) -> tuple[str, list[KeyStatus]]:
    """Where the shared state was read (a file, a Redis URL without credentials) and every
    configured key's state there.

    Raises:
        StateUnavailableError: the store cannot be opened or reached.
    """
    endpoint = config.api.endpoint
    if endpoint == AMAZON:
        endpoint = f"{AMAZON}:{config.api.protocol.value}"
    store = open_store(config.state)
    try:
        statuses = []
        for key in config.keys:
            settings = AdaptiveSettings(
                beta=config.rate.beta,
                target_loss=config.rate.target_429_share,
                min_rate_per_s=min(config.rate.min_rate, key.tps),
                discover=config.rate.discover,
            )
            limits = key_limits(key, config, settings)
            # Entries naming one credential (one account) keep, in every run of this
            # config, to the lowest daily limit of them: the one shown when no process is
            # using the key.
            lowest = account_day_limit(key, config)
            if lowest != limits.day_limit:
                limits = replace(limits, day_limit=lowest)
            view = await store.view(StateKey.of(endpoint, key.credential_id, name=key.name), limits)
            statuses.append(_status(view, key.tps))
        return store.where, statuses
    finally:
        await store.aclose()


def _render(statuses: list[KeyStatus]) -> str:
    rows = [
        [
            s.name,
            f"{s.rate:.3g}/{s.configured_tps:g}",
            f"{s.today}/{s.day_limit if s.day_limit is not None else '-'}",
            "-" if s.left is None else str(s.left),
            s.state,
            s.until or "",
            s.reason or "",
            s.last_429 or "",
            str(s.processes),
        ]
        for s in statuses
    ]
    headers = ["key", "rate/tps", "today", "left", "state", "until", "why", "last 429", "procs"]
    return format_table(headers, rows)


async def status_command(config: BrokerConfig, args: argparse.Namespace) -> int:
    """``broker status``: print the keys' shared state; exit 69 if the store is unreachable."""
    if config.api.uses_simulator:
        return _nothing_to_show(
            config,
            args,
            "the embedded simulator's keys are per process (each run starts its own "
            "simulator on its own port): no shared state to show",
        )
    if config.state.backend == "memory":
        return _nothing_to_show(
            config,
            args,
            '[state] backend = "memory" keeps each process\'s key state inside that process: '
            "no shared state to show (use the local backend, the default, or redis to share it)",
        )
    if config.state.backend == "local":
        try:
            # Followed as the store follows it: a link's target holds the -wal and -shm.
            path = real_path(local_state_path(config.state))
        except ConfigError as exc:  # no home directory to find the default file in
            return _cannot_show(config, args, f"invalid config: {exc}", ExitCode.CONFIG)
        try:
            path.stat()
            exists = True
        except FileNotFoundError:
            exists = False
        except NotADirectoryError:
            # A file where a folder should be: run and lookup end on it too (exit 74).
            in_the_way = file_in_the_way(path)
            return _cannot_show(
                config,
                args,
                f"{path}: cannot enter its directory: {in_the_way} is a file, not a directory",
                ExitCode.IO_ERROR,
                str(path),
            )
        except OSError as exc:  # a daemon's 0700 state directory, seen by another user
            return _cannot_show(
                config,
                args,
                f"cannot read {path}: {exc.strerror}; run as the user that owns it (for the "
                "systemd unit's state: sudo -u asin-broker ...)",
                ExitCode.IO_ERROR,
                str(path),
            )
        try:
            # The file deleted without its -wal and -shm: run and lookup refuse the path.
            refuse_orphans(path, "the key state")
        except RefusedFileError as exc:
            return _cannot_show(config, args, str(exc), ExitCode.IO_ERROR, str(path))
        if not exists:
            # Opening the store would create an empty one and show every key fresh.
            return _nothing_to_show(
                config,
                args,
                f"no key state at {path} yet: no broker has run with this [state] "
                "(a daemon running as another user keeps its own: name the file in "
                "[state] path)",
                str(path),
            )
    try:
        where, statuses = await key_statuses(config)
    except StateUnavailableError as exc:
        return _cannot_show(config, args, str(exc), ExitCode.UNAVAILABLE, _where(config))
    except ConfigError as exc:  # Redis refusing the password
        return _cannot_show(config, args, f"invalid config: {exc}", ExitCode.CONFIG, _where(config))
    except OSError as exc:  # a damaged or read-only state file
        # Its text names the file and what is wrong; "[Errno 5]" says nothing more.
        return _cannot_show(
            config, args, str(exc.strerror or exc), ExitCode.IO_ERROR, _where(config)
        )
    if args.json:
        document = {
            "backend": config.state.backend,
            "where": where,
            "keys": [s.to_json() for s in statuses],
        }
        print_json(document)
    else:
        print(_render(statuses))
        print(f"\nkey state: {config.state.backend}, {where}")
    if any(s.state == NEVER_USED for s in statuses):
        # Redis that restarted empty (or was flushed) holds no record either: the brokers
        # using the key write it again within half a minute, their counts included.
        lost = (
            ", or the store lost it (a Redis restarted empty or flushed: brokers using the "
            "key write it again within 30 s, with the day's count)"
            if config.state.backend == "redis"
            else ""
        )
        print(
            f"{prog()}: a key {NEVER_USED!r} has no state at {where}: no broker has used it "
            f"there yet{lost}; a broker that uses it keeps its state elsewhere if its [state] "
            "names another path, Redis database or key_prefix, or its [api] another endpoint",
            file=sys.stderr,
        )
    return ExitCode.OK


def _where(config: BrokerConfig) -> str | None:
    """Where the state was to be read, for a failure's ``where``: the file, or the Redis
    URL without credentials."""
    if config.state.backend == "local":
        return str(local_state_path(config.state))
    if config.state.redis_url is not None:
        return redacted_url(config.state.redis_url)
    return None


def _cannot_show(
    config: BrokerConfig,
    args: argparse.Namespace,
    message: str,
    code: ExitCode,
    where: str | None = None,
) -> int:
    """Say why the state cannot be read (``error`` in the JSON document)."""
    return _no_keys(config, args, message, where=where, member="error", code=code)


def _nothing_to_show(
    config: BrokerConfig, args: argparse.Namespace, why: str, where: str | None = None
) -> int:
    """Say why there is no state to show (``note`` in the JSON document); exit 0."""
    return _no_keys(config, args, why, where=where, member="note", code=ExitCode.OK)


def _no_keys(
    config: BrokerConfig,
    args: argparse.Namespace,
    text: str,
    *,
    where: str | None,
    member: str,
    code: ExitCode,
) -> int:
    """Say ``text`` on stderr; with ``--json`` still print a document (no keys, ``text``
    under ``member``), so a script reading stdout always gets one."""
    print(f"{prog()}: {text}", file=sys.stderr)
    if args.json:
        print_no_keys(text, backend=config.state.backend, where=where, member=member)
    return code


def print_no_keys(
    text: str, *, backend: str | None = None, where: str | None = None, member: str = "error"
) -> None:
    """Print ``--json``'s document when there are no keys to show: ``text`` under
    ``member`` (also for a config that cannot be read, with no backend known)."""
    document: dict[str, object] = {"backend": backend, "where": where, "keys": [], member: text}
    print_json(document)
