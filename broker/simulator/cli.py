"""``broker simulate``: read the ``[simulator]`` table of a config file and serve until Ctrl-C.

Exit codes: 0 after Ctrl-C or SIGTERM, 78 (EX_CONFIG) for a bad config file or a refused
bind address.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tomllib
from collections.abc import Callable, Collection, Coroutine, Mapping
from pathlib import Path
from typing import Any

from broker.errors import ConfigError
from broker.exitcode import ExitCode
from broker.progname import prog
from broker.simulator.server import SimulatorServer, check_host, serve_forever
from broker.simulator.settings import SimulatorSettings
from broker.tomltable import unquoted_time_hint

__all__ = ["EX_CONFIG", "load_settings", "simulate_command"]

#: sysexits.h: configuration error (kept for callers of this module)
EX_CONFIG = ExitCode.CONFIG


def load_settings(
    path: str, *, explicit: bool, tables: Collection[str] = ("simulator",)
) -> SimulatorSettings:
    """Read the ``[simulator]`` table of the TOML file at ``path``.

    The other ``tables`` (the broker's: the file is usually its config.toml) are ignored;
    a top-level name among none of them is refused.

    A missing file means the built-in settings unless the path was given explicitly.

    Raises:
        ConfigError: the file is missing (when explicit), unreadable, not TOML, names a
            table no one reads, or its ``[simulator]`` table is invalid.
    """
    file = Path(path)
    if not file.exists():
        if explicit:
            raise ConfigError("config", f"config file {path} does not exist")
        return SimulatorSettings()
    try:
        text = file.read_text(encoding="utf-8-sig")  # a BOM is dropped
        document = tomllib.loads(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"cannot read {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        hint = unquoted_time_hint(text, str(exc))
        raise ConfigError("config", f"{path} is not valid TOML: {exc}{hint}") from exc
    unknown = sorted(set(document) - {"simulator", *tables})
    if unknown:
        # Read by nothing: most often a misspelt [simulator], whose settings would be lost.
        raise ConfigError(
            unknown[0], "unknown table (the simulator reads [simulator]; the broker the others)"
        )
    table = document.get("simulator", {})
    if not isinstance(table, Mapping):
        raise ConfigError("simulator", "must be a table")
    return SimulatorSettings.from_mapping(table)


def _ready_line(server: SimulatorServer, settings: SimulatorSettings) -> None:
    """Where the simulator listens and the keys it has (its demo keys only when it has them:
    ``demo_accounts = false`` leaves only the configured accounts)."""
    ids = ", ".join(
        f"{a.credential_id} ({'PA-API' if a.protocol == 'paapi5' else 'Creators ' + a.version})"
        for a in settings.all_accounts
    )
    where = "; the demo keys' secrets are in the README" if settings.demo_accounts else ""
    try:
        print(
            f"simulator listening on {server.url} - keys: {ids or 'none'}{where}. Ctrl-C stops it.",
            flush=True,
        )
    except OSError as exc:
        raise _StdoutFailed(exc) from exc


class _StdoutFailed(Exception):
    """The ready line could not be written (a full disk, a reader gone): stdout's failure,
    which the command line reports as for every command, not a port that cannot be bound."""

    def __init__(self, failure: OSError) -> None:
        super().__init__(str(failure))
        self.failure = failure


def simulate_command(
    args: argparse.Namespace,
    *,
    config: str,
    explicit: bool,
    run: Callable[[Coroutine[Any, Any, None]], int],
    tables: Collection[str] = ("simulator",),
) -> int:
    """Run ``broker simulate`` with parsed ``args`` (host, port, allow_remote).

    Args:
        args: the parsed command line.
        config: the config file whose ``[simulator]`` table applies.
        explicit: the user named ``config`` (a missing file is then an error).
        run: runs a coroutine to completion on an event loop (the CLI's loop policy).
        tables: the file's other top-level names that are no mistake (the broker's).

    Returns:
        The process exit code.
    """
    parent = getattr(args, "exit_with_parent", None)
    if parent is not None and parent != os.getppid():
        # Watched, it would stop at its first look, silently and with exit 0.
        print(
            f"{prog()} simulate: --exit-with-parent {parent}: that process is not this one's "
            f"parent (its parent is {os.getppid()})",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    try:
        check_host(args.host, allow_remote=bool(args.allow_remote))
        settings = load_settings(config, explicit=explicit, tables=tables)
        return run(
            serve_forever(
                settings,
                host=args.host,
                port=int(args.port),
                allow_remote=bool(args.allow_remote),
                on_ready=functools.partial(_ready_line, settings=settings),
                parent=parent,
            )
        )
    except ConfigError as exc:
        print(f"{prog()} simulate: {exc}", file=sys.stderr)
        return EX_CONFIG
    except _StdoutFailed as exc:
        raise exc.failure from None
    except OSError as exc:
        print(
            f"{prog()} simulate: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr
        )
        return EX_CONFIG
    except KeyboardInterrupt:
        return ExitCode.OK
