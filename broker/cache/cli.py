"""``broker cache stats | purge``: look into and empty the item cache from the command line."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

from broker.asin import check_asin
from broker.cache.open import RUN_MAX_AGE_S, cache_namespace, open_store
from broker.cache.policy import CacheStats
from broker.cache.sqlite import SqliteCache
from broker.errors import ConfigError
from broker.exitcode import ExitCode
from broker.progname import prog
from broker.sqlitewal import RefusedFileError, refuse_orphans

if TYPE_CHECKING:
    from pathlib import Path

    from broker.config import BrokerConfig

__all__ = ["add_arguments", "cache_command"]


def _exit_codes(usage: str) -> str:
    return (
        f"exit codes: 0 done; 2 usage{usage}; 74 the item cache cannot be used (a damaged "
        "file, a full or read-only disk, Redis down); 78 a bad config, or Redis refusing "
        "its password."
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``stats`` and ``purge`` sub-commands to the ``broker cache`` parser."""
    sub = parser.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    stats = sub.add_parser(
        "stats",
        help="show what the item cache holds",
        description="Print the entries, payload bytes and oldest answer's age of the "
        "configured item cache ([cache] of the config), and its max ages.",
        epilog=_exit_codes(""),
    )
    stats.add_argument("--config", help="config file (default: $ASINB_CONFIG, else ./config.toml)")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    purge = sub.add_parser(
        "purge",
        help="delete cached answers (all, older than S seconds, or of some ASINs)",
        description="Delete the answers of this config's namespace (its protocol, endpoint "
        "and the keys' partner tags: answers asked with other tags are another namespace's) "
        "from the configured item cache: all of them, or only those fetched more than "
        "--older-than seconds ago, or only those of the --asin list (both filters together: "
        "answers matching both).",
        epilog=_exit_codes(" (a bad --older-than or --asin)"),
    )
    purge.add_argument("--config", help="config file (default: $ASINB_CONFIG, else ./config.toml)")
    purge.add_argument(
        "--older-than",
        type=float,
        metavar="S",
        help="only answers fetched more than S seconds ago",
    )
    purge.add_argument(
        "--asin",
        nargs="+",
        action="extend",
        metavar="ASIN",
        help="only answers for these ASINs (any marketplace and resources)",
    )


async def cache_command(
    config: BrokerConfig, args: argparse.Namespace, *, environ: Mapping[str, str] | None = None
) -> int:
    """Run ``broker cache stats`` or ``broker cache purge``; return the exit code.

    The store is opened even when the cache is off (``max_age_s = 0``), so an old file
    can still be inspected and emptied.
    """
    if args.cache_command == "purge" and not _valid_age(args.older_than):
        print(
            f"{prog()}: --older-than must be a finite number of seconds >= 0, got "
            f"{args.older_than}",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    asins: list[str] | None = None
    if args.cache_command == "purge" and args.asin is not None:
        # Read as run and lookup read an id (a product URL, lower case, an ISBN-13), so
        # the answers they cached are the ones deleted.
        asins = []
        for raw in args.asin:
            check = check_asin(raw, convert_isbn13=True)
            if check.asin is None:
                print(f"{prog()}: --asin {raw!r}: {check.reason}", file=sys.stderr)
                return ExitCode.USAGE
            asins.append(check.asin)
    cache_config = config.cache
    if cache_config.backend == "memory":
        # Each process keeps its own in its memory: this one would show (or empty) a new,
        # empty cache and say so, while a running daemon kept serving from its own.
        print(
            f'{prog()}: [cache] backend = "memory" keeps the cache inside each running '
            "process, out of reach of this command (a daemon's /metrics shows its figures; "
            'restarting it empties it); a "sqlite" or "redis" cache can be shown and '
            "emptied",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    try:
        policy = cache_config.policy(RUN_MAX_AGE_S)
        store = open_store(cache_config, policy, namespace=cache_namespace(config), environ=environ)
    except ConfigError as exc:
        print(f"{prog()}: invalid config: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    where = store.where
    if isinstance(store, SqliteCache) and _missing(store.path):
        try:
            # The file deleted without its -wal and -shm: every run refuses the cache.
            refuse_orphans(store.path, "the item cache")
        except RefusedFileError as exc:
            print(f"{prog()}: {exc}", file=sys.stderr)
            return ExitCode.IO_ERROR
        # Opening the store would create the file (and its directory) to report nothing.
        print(f"{prog()}: no item cache at {where} yet: nothing is cached", file=sys.stderr)
        if args.cache_command == "purge":
            print("purged 0 cached answers")
            return ExitCode.OK
        stats = CacheStats(hits=0, misses=0, requests_saved=0, entries=0, bytes=0, evictions=0)
    else:
        removed: int | None = None
        try:
            async with store:
                if args.cache_command == "purge":
                    removed = await store.purge(older_than_s=args.older_than, asins=asins)
                else:
                    stats = await store.stats()
        except store.failures as exc:
            # The store itself is broken or out of reach: say which and what to do, not a
            # traceback. A password refused is the config's (78, as for [state]).
            print(f"{prog()}: {store.describe_failure(exc)}", file=sys.stderr)
            return ExitCode.CONFIG if store.wrong_config(exc) else ExitCode.IO_ERROR
        if removed is not None:
            # Printed outside: a reader gone from stdout (a BrokenPipeError, an OSError) is
            # no failure of the store's.
            print(f"purged {removed} cached answer{'' if removed == 1 else 's'}")
            return ExitCode.OK
    report: dict[str, object] = {
        "backend": cache_config.backend,
        "where": where,
        "namespace": store.namespace,
        "max_age_s": policy.max_age_s,
        "offers_max_age_s": policy.offers_max_age_s,
        "max_items": policy.max_items,
        # Redis keeps no byte count: its maxmemory is the bound there (README).
        "max_bytes": None if cache_config.backend == "redis" else policy.max_bytes,
        "entries": stats.entries,
        "bytes": stats.bytes,
        "oldest_age_s": None if stats.oldest_age_s is None else round(stats.oldest_age_s, 1),
    }
    if args.json:
        print(json.dumps(report))
    else:
        width = max(len(name) for name in report)
        for name, value in report.items():
            print(f"{name:<{width}}  {'-' if value is None else value}")
    return ExitCode.OK


def _valid_age(seconds: float | None) -> bool:
    return seconds is None or (math.isfinite(seconds) and seconds >= 0)


def _missing(path: Path) -> bool:
    """True when no file is at ``path`` yet (a first run makes it). A path that can never
    be made or looked at (under a regular file, behind a closed directory) is not missing:
    opening it reports the error (exit 74), as every run warns of it."""
    try:
        path.stat()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return False
