"""The command line: ``broker init | run | serve | lookup | status | cache | check-config``.

A thin edge over the library: it parses arguments, finds the config file, configures logging,
picks the event loop (uvloop where available) and maps errors to documented exit codes
(:class:`~broker.exitcode.ExitCode`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import io
import math
import os
import shlex
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO, cast

from broker.exitcode import ExitCode
from broker.progname import prog
from broker.stdio import (
    BYTES_OR_ESCAPE,
    ForgivingStream,
    WatchedStream,
    drop_stdout,
    open_closed_descriptors,
    stdout_failure,
    write_stdout,
)
from broker.wholefile import write_whole

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

    from broker.client import Broker
    from broker.config import BrokerConfig, KeyConfig
    from broker.errors import NoUsableKeyError
    from broker.jobs.paths import RunPaths
    from broker.jobs.runner import JobSummary
    from broker.models import ItemResult

__all__ = ["CONFIG_ENV", "main", "resolve_config_path"]

#: The environment variable that names the config file when ``--config`` is not given.
CONFIG_ENV: Final = "ASINB_CONFIG"
#: The config file used when neither ``--config`` nor :data:`CONFIG_ENV` names one.
DEFAULT_CONFIG: Final = "config.toml"
_CONFIG_HELP: Final = (
    f"config file (default: ${CONFIG_ENV} if set, else ./{DEFAULT_CONFIG}; "
    f"`{prog()} init` writes a starter)"
)
#: ``broker lookup`` gives up this soon when the endpoint cannot be reached (seconds).
LOOKUP_OUTAGE_BUDGET_S: Final = 5.0
#: How long a lookup stopped by a signal waits for the answers already on the wire.
LOOKUP_DRAIN_S: Final = 20.0


def resolve_config_path(given: str | None, environ: dict[str, str] | None = None) -> Path:
    """The config file to read: ``--config``, else ``$ASINB_CONFIG``, else ./config.toml
    (a blank ``$ASINB_CONFIG`` names none: the commands refuse it, :func:`_parse`)."""
    return Path(_home(given or _config_variable(environ) or DEFAULT_CONFIG))


def _shell_word(path: str | os.PathLike[str]) -> str:
    """``path`` as one word of a command a message suggests, to be pasted into a shell as
    it is shown (``my conf.toml`` quoted)."""
    return shlex.quote(os.fspath(path))


def _option_value(path: str | os.PathLike[str]) -> str:
    """``path`` as an option's value in a suggested command: `` p`` quoted, or ``=-p`` for a
    name starting with ``-`` (which argparse would take for an option)."""
    word = _shell_word(path)
    return f"={word}" if word.startswith("-") else f" {word}"


def _config_variable(environ: Mapping[str, str] | None = None) -> str | None:
    """``$ASINB_CONFIG``: None when unset, ``""`` when set but blank (``ASINB_CONFIG=$UNSET``
    in a unit or a script), which names no file and must not fall back silently."""
    value = (os.environ if environ is None else environ).get(CONFIG_ENV)
    return None if value is None else (value if value.strip() else "")


def _add_cache_flags(parser: argparse.ArgumentParser) -> None:
    """``--max-age`` and ``--no-cache``, shared by run and lookup."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--max-age",
        type=_max_age,
        metavar="SECONDS",
        help="serve cached answers up to this old (default: [cache] max_age_s, else 86400; "
        "at most 86400, Amazon's 24-hour rule; 0 = no cache); answers with prices "
        "(offersV2.* resources) stay capped by [cache] offers_max_age_s (3600)",
    )
    group.add_argument(
        "--no-cache",
        action="store_true",
        help="neither read nor fill the item cache",
    )


def _max_age(text: str) -> float:
    """``--max-age``: seconds from 0 to 86,400 (Amazon's 24-hour rule)."""
    from broker.cache.policy import CEILING_S

    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not seconds >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text} is no number of seconds from 0 to 86400")
    if not seconds <= CEILING_S:
        raise argparse.ArgumentTypeError(
            f"{text} is outside 0..{CEILING_S:.0f} s: Amazon allows caching for 24 hours at most"
        )
    return seconds


def _encoding(text: str) -> str:
    """``--encoding``: a codec job files can be read with, checked before any file is made."""
    from broker.jobs.sources import check_encoding

    try:
        check_encoding(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _cache_max_age(args: argparse.Namespace) -> float | None:
    """The run's cache override: 0 for --no-cache, --max-age as given, else None."""
    if getattr(args, "no_cache", False):
        return 0.0
    value: float | None = getattr(args, "max_age", None)
    return value


#: The job-file names whose format the name tells (broker.jobs.sources reads them so).
_JOB_NAMES: Final = ".txt, .csv or .tsv, .jsonl, .ndjson or .jsonlines, each optionally .gz"


def _port(text: str) -> int:
    """argparse type of ``--port``: 0 (any free port) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0 to 65535)")
    return port


def _host(text: str) -> str:
    """argparse type of ``--host``: an IPv6 address may come in a URL's brackets
    (``[::1]``), which a socket does not take."""
    host = text.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise argparse.ArgumentTypeError("names no address")
    return host


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose ``--help`` and ``--version`` are output like any other: a
    stdout that cannot take them fails the command (74), where argparse drops the error
    and exits 0."""

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        if message:
            (file or sys.stderr).write(message)


def _build_parser() -> argparse.ArgumentParser:
    from broker import __version__
    from broker.jobs.paths import STDIN_FORMATS

    parser: argparse.ArgumentParser = _Parser(
        prog=prog(),
        description="Asynchronous, rate-limited request broker for Amazon's product APIs.",
        epilog=f"The config file is --config, else ${CONFIG_ENV}, else ./{DEFAULT_CONFIG}.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser(
        "init",
        help="write a commented starter config.toml",
        description="Write a commented starter config that works against the embedded "
        "simulator out of the box; edit it to use real keys.",
        epilog="exit codes: 0 written; 2 the file exists (--force overwrites it) or its path "
        "is a directory, a device, a pipe or a socket; 74 it cannot be written.",
    )
    init.add_argument(
        "path",
        nargs="?",
        default=DEFAULT_CONFIG,
        help="where to write it, '-' for stdout (default: %(default)s)",
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing file")

    sim = sub.add_parser(
        "simulate",
        help="run the local simulator of the Creators API and PA-API 5.0",
        description="Run the local Amazon simulator (both APIs) until interrupted.",
        epilog="exit codes: 0 stopped by SIGINT/SIGTERM; 2 usage; 78 a bad [simulator] table "
        "or config, a --host refused without --allow-remote, or a port that cannot be bound.",
    )
    sim.add_argument(
        "--config",
        help="config file whose [simulator] table sets accounts, limits and faults (default: "
        f"${CONFIG_ENV} if set, else ./{DEFAULT_CONFIG}; a missing default file means "
        "built-in settings)",
    )
    sim.add_argument(
        "--host", type=_host, default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    sim.add_argument(
        "--port",
        type=_port,
        default=8787,
        help="port to bind; 0 picks a free one (default: %(default)s)",
    )
    sim.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow binding a non-loopback address (the simulator has no TLS)",
    )
    sim.add_argument(
        "--exit-with-parent",
        type=int,
        metavar="PID",
        help="stop once process PID is no longer this one's parent (it died, even by "
        "SIGKILL); broker bench starts its simulator so",
    )

    run = sub.add_parser(
        "run",
        help="run a job file to the end (resumable)",
        description="Look up every row of a job file and write one output row per input row. "
        "Run it again with the same job and output to resume after a crash or a stop.",
        epilog="exit codes: 0 done; 2 usage (e.g. --out naming the job file, a job that is a "
        "pipe); 3 done but some rows failed; 65 bad input, input changed or job locked; 66 "
        "input missing or unreadable; 69 no usable answer from the API or its token endpoint, "
        "or the key-state store unreachable, past the outage budget (rows stay pending); 74 "
        "cannot write output, or a damaged or read-only state file; 75 stopped (signal or "
        "--no-wait), run again to resume; 77 a key was rejected, or every key taken out (an "
        "untrusted TLS certificate, a proxy refusing) (rows stay pending); 78 bad config; 141 "
        "stdout's reader went away (--out -)",
    )
    run.add_argument(
        "job",
        help=f"job file: {_JOB_NAMES}; - reads stdin (see --input)",
    )
    run.add_argument("--config", help=_CONFIG_HELP)
    run.add_argument(
        "--out",
        help="output file; - writes the rows (JSON lines, or CSV with --format csv) to stdout "
        "at the end (not resumable) "
        "(default: <output.directory>/<job name>.<format>)",
    )
    run.add_argument(
        "--input",
        choices=STDIN_FORMATS,
        help="format of a job read from stdin (default: txt); a job file's format comes "
        f"from its name ({_JOB_NAMES}), else from its first lines",
    )
    run.add_argument(
        "--format",
        choices=("jsonl", "csv", "sqlite"),
        help="output format (default: the one --out's name says: .jsonl or .ndjson, .csv, "
        ".sqlite, .sqlite3 or .db; else output.format of the config, JSON lines for --out - "
        "when that is sqlite); needed for an --out named for a format not written (.tsv, "
        ".json, .xlsx: exit 2 without it)",
    )
    run.add_argument(
        "--strict",
        action="store_true",
        help="refuse the whole file, before any API call, if a row is invalid",
    )
    run.add_argument(
        "--new-job",
        action="store_true",
        help="start over when the input changed since the job started",
    )
    run.add_argument(
        "--refresh",
        action="store_true",
        help="start the job over on the job file as it is now (a changed file too) and fetch "
        "every row again; the output is replaced only when the new run completes",
    )
    run.add_argument(
        "--ordered",
        action="store_true",
        help="write the output rows in input order (rewritten once the job is complete)",
    )
    run.add_argument(
        "--no-wait",
        action="store_true",
        help="stop (exit 75, resumable) instead of waiting when every key's daily quota is spent "
        "(the rows the item cache answers are written first)",
    )
    _add_cache_flags(run)
    run.add_argument(
        "--encoding",
        default="utf-8",
        type=_encoding,
        help="input encoding, one that writes ASCII as itself (default: %(default)s)",
    )
    run.add_argument(
        "--convert-isbn13",
        action="store_true",
        help="look up a 978 ISBN-13 by its ISBN-10 instead of reporting it invalid",
    )
    run.add_argument(
        "--progress",
        choices=("auto", "bar", "log", "none"),
        default="auto",
        help="live line on a terminal, periodic log events otherwise (default: %(default)s)",
    )

    serve = sub.add_parser(
        "serve",
        help="run the spool daemon: job files in, results filed under done/ or failed/",
        description="Process job files dropped into SPOOL/inbox/ (write name.tmp, then rename), "
        "one at a time; file each with its output and a status file under SPOOL/done/ or "
        "SPOOL/failed/. Serves /healthz, /readyz and Prometheus /metrics.",
        epilog="exit codes: 0 stopped by SIGTERM/SIGINT/SIGHUP (the current job resumes at the "
        "next start); 69 no usable answer from the API or its token endpoint, or the key-state "
        "store unreachable, past the outage budget (the job stays in processing/); 74 cannot "
        "write the spool, or a damaged or read-only state file; 75 forced by a second signal "
        "(still resumable); 77 every key rejected or taken out (an untrusted TLS certificate, "
        "a proxy refusing) (the job stays in processing/); 78 bad config, refused --host or "
        "port in use",
    )
    serve.add_argument("--spool", required=True, metavar="DIR", help="the spool directory")
    serve.add_argument("--config", help=_CONFIG_HELP)
    serve.add_argument(
        "--port",
        type=_port,
        default=9464,
        help="port of /healthz, /readyz and /metrics; 0 picks a free one (default: %(default)s)",
    )
    serve.add_argument(
        "--host", type=_host, default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    serve.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow binding a non-loopback address (the endpoints have no authentication)",
    )

    look = sub.add_parser(
        "lookup",
        help="look up ASINs: a summary on a terminal, JSON lines otherwise",
        description="Look up ASINs (or Amazon product URLs). On a terminal, print a readable "
        "summary; when piped or with --json, print one JSON object per ASIN, the same rows "
        f"as `{prog()} run` writes (line = the argument's position). Ids come as arguments; "
        f"for a list on stdin use `{prog()} run - --out -`.",
        epilog="exit codes: 0 every id answered (ok, not found or invalid); 2 usage (an unknown "
        "--marketplace or resource, --refresh with --no-cache or --max-age 0); 3 some rows "
        "failed; 69 no usable answer from the API or its token endpoint, or the key-state "
        "store unreachable, for the outage budget; 74 a damaged or read-only state file; 75 "
        "every key the unanswered ids need waits for its daily quota, or is parked after "
        "sustained 429s (Amazon's quota spent, or access revoked), or a stop signal left "
        f"ids unanswered (Ctrl-C, SIGTERM, SIGHUP: the first sends nothing more and waits "
        f"at most {LOOKUP_DRAIN_S:g} s for the answers on the wire, a second stops at "
        "once); 77 a "
        "key was rejected, or every key taken out (an untrusted TLS certificate, a proxy "
        "refusing); 78 bad config; 141 stdout's reader "
        "went away (| head). A lookup that stops early prints every answer it has first, "
        "those already on the wire included.",
    )
    look.add_argument("asins", nargs="+", metavar="ASIN")
    look.add_argument("--json", action="store_true", help="JSON lines even on a terminal")
    look.add_argument(
        "--resources",
        help="comma-separated resources to ask for (default: api.resources of the config)",
    )
    look.add_argument(
        "--outage-budget",
        type=float,
        metavar="SECONDS",
        help="give up (exit 69) after this long without a usable answer from the API or its "
        "token endpoint (default: "
        f"retry.outage_budget_s of the config, at most {LOOKUP_OUTAGE_BUDGET_S:g})",
    )
    _add_cache_flags(look)
    look.add_argument(
        "--refresh",
        action="store_true",
        help="ask Amazon even when the item cache has a fresh answer, and keep the new one "
        "in the cache",
    )
    look.add_argument("--config", help=_CONFIG_HELP)
    look.add_argument(
        "--marketplace",
        help="marketplace by its code (UK), its domain (amazon.co.uk) or www.amazon.co.uk, "
        "as in config.toml (default: a product URL's own store, else api.marketplace of the "
        "config)",
    )

    bench = sub.add_parser(
        "bench",
        help="measure throughput against a rate-limited simulator in another process",
        description="Start the simulator in a child process with the chosen limits, latency "
        "and faults, stream unique ASINs through the broker for a while, and print requests/s, "
        "ASINs/s, the rate the server granted against the rate it allows, 429 share, retries, "
        "latency p50/p99, CPU per request and peak memory. Needs no config file.",
        epilog="exit codes: 0 figures printed; 2 usage (a bad option, or one the broker's "
        "config refuses); 77 every key taken out (by the injected --fault kinds; no figures); "
        "129 / 130 / 143 stopped by SIGHUP / SIGINT / SIGTERM (no figures).",
    )
    from broker.bench import add_arguments

    add_arguments(bench)

    check = sub.add_parser(
        "check-config",
        help="validate a config file",
        description="Validate a config file and print a summary (secrets "
        "masked); exit 78 naming the bad key path if it is invalid. It reads the file and "
        "the secrets it names and connects to nothing: a Redis that refuses its password, "
        f"or an endpoint that refuses a key, is found by the first run (or `{prog()} status` "
        "for Redis).",
        epilog="exit codes: 0 valid (warnings may follow); 2 usage; 78 invalid or missing.",
    )
    check.add_argument("--config", help=_CONFIG_HELP)
    cache = sub.add_parser(
        "cache",
        help="show or purge the item cache (stats | purge)",
        description="Inspect or empty the item cache of answers kept within Amazon's 24-hour rule.",
    )
    from broker.cache.cli import add_arguments as add_cache_arguments

    add_cache_arguments(cache)
    _add_status(sub)
    return parser


def _add_status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from broker.status import add_arguments

    status = sub.add_parser(
        "status",
        help="show every key's shared state (rate, today's requests, pauses, parks)",
        description="Show each configured key's state as every process and machine sharing "
        "it sees it: the shared rate now and configured, requests today and left, paused or "
        "parked until when and why, the last 429, processes seen in the last minute.",
        epilog="exit codes: 0 shown; 69 the state store ([state]) cannot be reached; 74 a "
        "damaged or read-only state file, one this user cannot read, or its -wal and -shm "
        "left without it; 78 bad config",
    )
    add_arguments(status)


#: The cyclic garbage collector's youngest generation while a command runs (Python's
#: default is 700 objects). A big job holds some 200,000 objects (the lookups a stream
#: reads ahead, the ledger's pages, the embedded simulator's catalogue), and at 700 the
#: collector promoted them so often that its full collections held the event loop 0.1-0.2
#: s at a time (a daemon's /healthz, a run's signals): a 30,000-row run had 7 such steps
#: under asyncio debug and none at 10,000, and took 7.3 s instead of 9.8 s, at the same
#: peak memory. Only the command line sets it: a library leaves the process's settings
#: to its application.
_GC_YOUNG = 10_000


def _run_loop(coro: Coroutine[Any, Any, object]) -> int:
    """Run ``coro`` on uvloop when installed, else on the default asyncio loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop missing (Windows)
        factory = None
    else:
        factory = uvloop.new_event_loop
    thresholds = gc.get_threshold()
    gc.set_threshold(max(_GC_YOUNG, thresholds[0]), *thresholds[1:])
    runner = asyncio.Runner(loop_factory=factory)
    try:
        try:
            result = runner.run(coro)
        except BaseException:
            with contextlib.suppress(RuntimeError):
                runner.close()
            raise
        try:
            runner.close()
        except RuntimeError as exc:
            # Closing starts a thread to shut the loop's executor down: a process that may
            # start no more (a thread or memory limit) must not turn a finished command into
            # a traceback and exit 1.
            if "can't start new thread" not in str(exc):
                raise
    finally:
        gc.set_threshold(*thresholds)  # cli.main may run inside another program (tests)
    return int(result) if isinstance(result, int) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code.

    The standard streams are made safe first (:mod:`broker.stdio`): a closed descriptor is
    opened on /dev/null, stderr drops writes that fail, and a stdout that cannot be written
    ends the command with 74.
    """
    words = sys.argv[1:] if argv is None else list(argv)
    open_closed_descriptors()
    stdout, stderr = sys.stdout, sys.stderr
    # What stdout's encoding cannot write (a path's undecodable bytes under a strict UTF-8
    # stdout, a key named in Japanese under a Latin-1 or C locale) is escaped, as on
    # stderr: it raised after half the output, a traceback instead of the exit code. Under
    # surrogateescape (a C locale without UTF-8 mode) a path's bytes are still written back
    # as they were, so that a path printed is the path.
    wrapper = stdout if isinstance(stdout, io.TextIOWrapper) else None
    errors = (wrapper.errors or "") if wrapper is not None else ""
    mended = {"strict": "backslashreplace", "surrogateescape": BYTES_OR_ESCAPE}.get(errors)
    if wrapper is not None and mended is not None:
        wrapper.reconfigure(errors=mended)
    failures: list[OSError] = []
    sys.stdout = cast("TextIO", WatchedStream(stdout, failures))
    sys.stderr = cast("TextIO", ForgivingStream(stderr))
    try:
        return _guarded(words, failures, process_ends=argv is None)
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        if wrapper is not None and mended is not None:
            wrapper.reconfigure(errors=errors)


def _guarded(words: list[str], failures: list[OSError], *, process_ends: bool) -> int:
    """:func:`_main`, with the interruptions and stdout failures (``failures``: what the
    watched stdout recorded) every command shares."""
    try:
        try:
            # process_ends: the console script, whose process ends when this returns.
            return _main(words, process_ends=process_ends)
        finally:
            # What is still buffered is the command's output too (--version, --help: argparse
            # prints and exits): a stdout that cannot take it fails the command here, below.
            # After Ctrl-C, the stop the command reports (75, not stdout's 141 or 74), it is
            # dropped instead, or the interpreter's own last flush would fail (exit 120).
            interrupted = isinstance(sys.exc_info()[1], KeyboardInterrupt)
            try:
                sys.stdout.flush()
            except OSError:
                if not interrupted:
                    raise
                if process_ends:
                    drop_stdout()
    except KeyboardInterrupt:
        # Ctrl-C in a command without a signal policy of its own (run and serve drain), or
        # before a command's own handlers are in: one line, no traceback, the stop code every
        # command uses; bench's is the shell's for SIGINT, as once its handlers are in.
        print(f"{prog()}: interrupted", file=sys.stderr)
        if _command_word(words) == "bench":
            return ExitCode.INTERRUPTED
        return ExitCode.RESUMABLE
    except BrokenPipeError:
        if _broken_stdout() is None:
            raise  # another pipe or socket: not the reader of stdout going away
        # stdout's reader went away (``| head``): what it did not read is not wanted, so no
        # traceback.
        drop_stdout()
        return ExitCode.BROKEN_PIPE
    except OSError as exc:
        if not stdout_failure(exc, failures, take_over=process_ends):
            raise
        print(f"{prog()}: cannot write to stdout: {exc.strerror}", file=sys.stderr)
        return ExitCode.IO_ERROR


def _broken_stdout() -> int | None:
    """stdout's descriptor when it is a pipe whose reader has gone, else None."""
    import select

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return None  # no stdout, or one replaced by an object without a descriptor
    if not hasattr(select, "poll"):
        return fd
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    # A pipe with no reader reports an error on its write end (Linux: POLLERR; the BSDs
    # and macOS: POLLHUP).
    gone = select.POLLERR | select.POLLHUP
    return fd if any(event & gone for _, event in poller.poll(0)) else None


def _command_word(words: Sequence[str]) -> str | None:
    """The command of a command line, known before the parser exists: the top level has no
    option that takes a value, so it is the first word that is not an option."""
    return next((w for w in words if not w.startswith("-")), None)


def _config_after_command(words: list[str]) -> list[str]:
    """``words`` with each ``--config FILE`` given before the command moved to just after
    the command's words (``cache stats``, ``run job.txt``), where the commands take it:
    ``broker --config c.toml run job.txt`` was refused as an unknown command named
    ``c.toml``."""
    moved: list[str] = []
    rest = words
    while rest and _names_config(rest[0]):
        if "=" in rest[0]:
            moved, rest = [*moved, rest[0]], rest[1:]
        elif len(rest) > 2:
            moved, rest = [*moved, *rest[:2]], rest[2:]
        else:
            break
    if not moved or not rest or rest[0].startswith("-"):
        return words  # no command right after them: argparse says what is wrong
    # Before the first option after the command's words (or a "--"), else at the end.
    at = next((i for i, word in enumerate(rest) if word.startswith("-")), len(rest))
    return [*rest[:at], *moved, *rest[at:]]


def _names_config(word: str) -> bool:
    """``--config`` (``--config=FILE``), or an abbreviation the commands take (``--conf``)."""
    name = word.partition("=")[0]
    return len(name) >= len("--con") and "--config".startswith(name)


def _main(words: list[str], *, process_ends: bool = False) -> int:
    words = _config_after_command(words)
    if _command_word(words) in ("run", "serve", "lookup"):
        from broker.jobs.signals import caught_early

        # A signal while starting (building the parser imports the simulator and the
        # engine, then the config is read) or finishing must not kill the command with the
        # default action: it is kept for the command's handler, or dropped once it is gone
        # (also while the process exits, when it ends with the command).
        with caught_early(process_ends=process_ends):
            return _command(_parse(words))
    return _command(_parse(words))


def _parse(words: list[str]) -> argparse.Namespace:
    """Parse the command line; a usage error (exit 2) for what argparse lets through."""
    parser = _build_parser()
    if words and _names_config(words[0]):
        # Left before the command (none follows it, or an option comes first): argparse
        # took the file for the command ("invalid choice: 'c.toml'").
        parser.error(
            f"{words[0].partition('=')[0]} goes with a command, which must come right after "
            f"it or first: {prog()} COMMAND ... --config FILE"
        )
    # Known only: an unknown option after a command is told with that command's usage
    # line below (parse_args told it with the top-level one: "usage: broker COMMAND ...").
    args, unknown = parser.parse_known_args(words)
    # Told with the command's own usage line (``broker cache stats``'s for its options), as
    # argparse tells its own errors.
    command = parser
    while True:
        chosen = next(
            (
                action.choices[getattr(args, action.dest)]
                for action in command._actions
                if isinstance(action, argparse._SubParsersAction)
                and getattr(args, action.dest, None) in action.choices
            ),
            None,
        )
        if chosen is None:
            break
        command = chosen
    if unknown:
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    if getattr(args, "config", None) is not None and not args.config.strip():
        # An empty --config (an unset variable in a script) must not fall back silently.
        command.error("--config names no file")
    if hasattr(args, "config") and args.config is None and _config_variable() == "":
        # Nor a blank $ASINB_CONFIG.
        command.error(f"${CONFIG_ENV} is set but names no file (unset it for ./{DEFAULT_CONFIG})")
    if getattr(args, "spool", None) is not None and not args.spool.strip():
        # Path("") is the current directory: an unset variable would make a spool of it.
        command.error("--spool names no directory")
    if getattr(args, "out", None) is not None and not args.out.strip():
        # Unset in a script, it ran to the default output, named after the job.
        command.error("--out names no file (give a path, or - for stdout)")
    if args.command == "init" and not args.path.strip():
        # An unset variable in a script: it wrote a file named " " (or said ". is a
        # directory"), which --config then refused as naming no file.
        command.error("the path names no file (give a config file's path, or - for stdout)")
    if getattr(args, "job", None) is not None and not args.job.strip():
        # Path("") is the current directory: it was refused as "the job . is a directory".
        command.error("the job names no file (give a job file's path, or - for stdin)")
    for name in _PATH_ARGUMENTS:
        given = getattr(args, name, None)
        if isinstance(given, str):
            expanded = _home(given)
            nameless = _no_home(given, expanded)
            # Only where a folder would be made: a job or config named so is not found.
            if nameless is not None and name in _MADE:
                command.error(f"{_MADE[name]}: {nameless}: write the path itself")
            setattr(args, name, expanded)
    return args


#: The command-line arguments that name a file or folder (``path`` is init's).
_PATH_ARGUMENTS: Final = ("config", "job", "out", "spool", "path")
#: Those a command creates (with their folders), as a message names them.
_MADE: Final = {"out": "--out", "spool": "--spool", "path": "the path"}


def _no_home(given: str, expanded: str) -> str | None:
    """Why the leading ``~`` of ``given`` names no folder, else None (as for the config's
    path settings: :func:`broker.config.no_home`); a folder named ``~nosuchuser`` was made
    in the working directory. ``~tmp.jsonl`` alone names a file here, not a user's folder."""
    from broker.config import no_home

    if "/" not in given and given != "~":
        return None
    return no_home(given, expanded)


def _home(given: str) -> str:
    """``given`` with a leading ``~`` (``~user``) made the home folder, as in every path
    setting of the config. The shell leaves it in ``--out=~/o.jsonl``, in quotes and in a
    systemd ``Environment=``: taken as written, the commands made a folder named ``~`` in
    the working directory (which ``rm -rf ~`` then tidies away with the home folder)."""
    return os.path.expanduser(given) if given.startswith("~") else given


def _refused_before_config(args: argparse.Namespace) -> str | None:
    """Why the command line is wrong whatever the config says, else None: told before the
    config is read, so a script sees exit 2 for it even when the config is missing or
    broken (it saw 78, "config file not found", for ``broker lookup -``)."""
    if args.command == "lookup":
        from broker.api.marketplaces import NAMING
        from broker.api.marketplaces import marketplace as lookup_marketplace

        if "-" in args.asins:
            return (
                "lookup takes ids as arguments; '-' is no id and stdin is not read: "
                f"`xargs {prog()} lookup < ids.txt`, or `{prog()} run - --out -` for a list on "
                "stdin"
            )
        if args.marketplace is not None:
            try:
                lookup_marketplace(args.marketplace)
            except ValueError:
                return f"unknown marketplace {args.marketplace!r}; {NAMING}"
        budget = args.outage_budget
        if budget is not None and not 0 < budget < math.inf:  # NaN too: it never runs out
            return "--outage-budget must be a finite number of seconds above 0"
    if args.command == "run" and args.input:
        from broker.jobs.paths import STDIO

        if args.job != STDIO:
            # Silently reading a CSV named .txt as plain text would make every row invalid.
            return (
                f"--input is the format of a job read from stdin; {args.job}'s comes from "
                f"its name ({_JOB_NAMES}), else from its first lines: rename it (e.g. to "
                f".csv), or pipe it: {prog()} run - --input {args.input} < "
                f"{_shell_word(args.job)}"
            )
    return None


def _command(args: argparse.Namespace) -> int:
    """Run the parsed command line."""
    if args.command == "simulate":
        from broker.config import TABLES
        from broker.simulator.cli import simulate_command

        # Named by --config or $ASINB_CONFIG, the file must exist; ./config.toml need not.
        named = args.config or _home(os.environ.get(CONFIG_ENV, ""))
        return simulate_command(
            args,
            config=named or DEFAULT_CONFIG,
            explicit=bool(named),
            run=_run_loop,
            tables=TABLES,
        )
    if args.command == "bench":
        from broker.bench import bench_command

        return bench_command(args)
    if args.command == "init":
        return _init(args.path, force=args.force)
    refused = _refused_before_config(args)
    if refused is not None:
        print(f"{prog()}: {refused}", file=sys.stderr)
        return ExitCode.USAGE
    from broker.config import ReadSecrets, load_config
    from broker.errors import ConfigError

    path = resolve_config_path(args.config)
    if not path.exists() and _cwd_gone(path):
        print(f"{prog()}: {_CWD_GONE}", file=sys.stderr)
        return ExitCode.IO_ERROR
    if not path.exists():
        named = (
            "" if args.config or not os.environ.get(CONFIG_ENV) else f" (named by ${CONFIG_ENV})"
        )
        return _config_failure(
            args,
            f"config file not found: {path}{named}; create a starter with "
            f"`{prog()} init {'-- ' if str(path).startswith('-') else ''}"
            f"{_shell_word(path)}`, or name one with --config or ${CONFIG_ENV}",
        )
    try:
        # Commands that send nothing to Amazon run without its secrets, from any shell.
        read: ReadSecrets = args.command not in ("status", "cache")
        if args.command == "check-config":
            # Run from a shell (the install steps, or after an edit while the service
            # runs): every secret is checked but a systemd credential, which only the
            # service can read.
            read = "outside-service"
        config = load_config(path, read_secrets=read)
        if config.api.uses_simulator or config.simulator.data:
            from broker.client import check_simulator_key, simulator_settings

            settings = simulator_settings(config)  # [simulator] is checked now, not at first use
            if read and config.api.uses_simulator:
                for key in config.keys:
                    # Every request goes to the simulator, so it must have each key's account
                    # (with or without a secret given): checked now, not after a job is read
                    # and its output made, nor as a refusal blaming the credentials.
                    check_simulator_key(config, key, settings)
    except ConfigError as exc:
        return _config_failure(args, f"invalid config {path}: {exc}")
    from broker.logs import configure_logging

    configure_logging(config.log.level, config.log.format)
    if args.command == "check-config":
        return _check_config(config)
    if args.command == "lookup":
        return _lookup_command(config, args)
    if args.command == "status":
        from broker.status import status_command

        return _run_loop(status_command(config, args))
    if args.command == "cache":
        from broker.cache.cli import cache_command

        return _run_loop(cache_command(config, args))
    if args.command == "run":
        return _run_command(config, args)
    if args.command == "serve":
        from broker.jobs.serve import serve_command

        return serve_command(config, args, run=_run_loop)
    print(f"unknown command {args.command}", file=sys.stderr)  # pragma: no cover
    return ExitCode.USAGE


def _config_failure(args: argparse.Namespace, message: str) -> int:
    """A config that cannot be used: say why on stderr, and for ``status --json`` in its
    document on stdout too (a script reading stdout always gets one); exit 78. A ``run``
    ends with its ``broker.job_finished`` error event too, as for every error exit, and a
    ``serve`` with JSON logs with ``broker.daemon_failed``, as for any other failed start
    (a log shipper parses every line), instead of the plain line, as ``serve_command`` ends
    every failed start; both logged as the defaults say: the config that would say
    otherwise is what failed."""
    from broker.logs import configure_logging, get_logger, logs_are_json

    if args.command in ("run", "serve"):
        configure_logging()
    as_event = args.command == "serve" and logs_are_json()
    if not as_event:
        print(f"{prog()}: {message}", file=sys.stderr)
    if args.command == "run":
        get_logger().error(
            "broker.job_finished", job=args.job, error=message, exit_code=int(ExitCode.CONFIG)
        )
    elif as_event:
        get_logger().error("broker.daemon_failed", exit_code=int(ExitCode.CONFIG), error=message)
    if args.command == "status" and args.json:
        from broker.status import print_no_keys

        print_no_keys(message)
    return ExitCode.CONFIG


def _init(given: str, *, force: bool) -> int:
    """``broker init``: write the packaged starter config (never over a file unless --force)."""
    from importlib.resources import files

    from broker.sqlitewal import RefusedFileError, refuse_special

    template = files("broker").joinpath("templates", "config.toml").read_text(encoding="utf-8")
    if given == "-":
        write_stdout(template.encode())
        return ExitCode.OK
    path = Path(given)
    if _cwd_gone(path):
        print(f"{prog()}: {_CWD_GONE}", file=sys.stderr)
        return ExitCode.IO_ERROR
    try:
        # "conf/" names a directory even before it exists (Path drops the slash).
        is_dir = path.is_dir() or given.endswith(("/", os.sep))
        exists = path.exists()
    except OSError as exc:  # a name too long, a loop of symbolic links
        print(f"{prog()}: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return ExitCode.IO_ERROR
    if is_dir:
        print(
            f"{prog()}: {path} is a directory; give the config file's path, such as "
            f"{path / DEFAULT_CONFIG}",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    try:
        # The file is replaced whole (a new file renamed over it): a device's node, such
        # as /dev/null named by --force, would go, and a pipe's reader would read nothing.
        refuse_special(path, "give a config file's path, or '-' for stdout")
    except RefusedFileError as exc:
        print(f"{prog()}: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    if exists and not force:
        print(f"{prog()}: {path} exists; pass --force to overwrite it", file=sys.stderr)
        return ExitCode.USAGE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, template)
    except (FileExistsError, NotADirectoryError):
        # A file where a directory of the path should be ("File exists" said nothing useful).
        print(
            f"{prog()}: cannot write {path}: a file stands where a directory of its path should be",
            file=sys.stderr,
        )
        return ExitCode.IO_ERROR
    except OSError as exc:
        print(f"{prog()}: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return ExitCode.IO_ERROR
    # The file a command reads unless told: $ASINB_CONFIG's may be another one.
    try:
        # A blank $ASINB_CONFIG names no file: the commands refuse it, so say --config.
        found = _config_variable() != "" and resolve_config_path(None).absolute() == path.absolute()
    except OSError:  # the working directory was deleted under the shell: say --config
        found = False
    print(
        f"wrote {path}: it uses the embedded simulator; try `{prog()} lookup B0C1234567"
        f"{'' if found else f' --config{_option_value(path)}'}`",
        file=sys.stderr,
    )
    return ExitCode.OK


def _shared_account_warnings(config: BrokerConfig) -> list[str]:
    """One warning per account named by several ``[[keys]]`` entries: they share its one
    rate and daily quota (the key state is the account's), at the lowest figures of them."""
    by_account: dict[str, list[KeyConfig]] = {}
    for key in config.keys:
        by_account.setdefault(key.credential_id, []).append(key)
    warnings = []
    for credential_id, keys in by_account.items():
        if len(keys) < 2:
            continue
        names = ", ".join(key.name for key in keys)
        tps = min(key.tps for key in keys)
        limits = [key.tpd for key in keys if key.tpd]
        tpd = f"{min(limits)} TPD" if limits else "no daily limit"
        warnings.append(
            f"keys {names} name one credential ({credential_id}): one Amazon account, with one "
            f"rate and one daily quota, which they share at the lowest of their figures "
            f"({tps:g} TPS, {tpd}); give it once, with the partner tags of all"
        )
    return warnings


def _simulator_secret_note(config: BrokerConfig, key: KeyConfig) -> str:
    """Where a key's secret comes from with the embedded simulator, and a warning when the
    simulator will refuse it (a secret that is not its account's)."""
    from broker.client import simulator_account_secret

    if key.secret is None:
        if not key.secret_source:
            return "the simulator's own account"
        # A container's compose file passes ``${VAR:-}``: set, and empty.
        blank = key.secret_source.startswith("$") and key.secret_source[1:] in os.environ
        return f"the simulator's own account, {key.secret_source} {'empty' if blank else 'unset'}"
    # The simulator has the key's account (checked when the config was read).
    own = simulator_account_secret(config, key)
    if own is not None and own != key.secret.reveal():
        if key.secret_source.startswith("file "):
            instead = "remove the key's credential_secret_file"
        elif key.secret_source.startswith("$"):
            instead = "unset the variable"
        else:
            instead = "leave the key out of secrets="
        print(
            f"warning: key {key.name}: the embedded simulator's {config.api.protocol.value} "
            f"account {key.credential_id!r} has another secret than {key.secret_source}: it "
            f"will refuse the key (exit 77); {instead} to use the simulator's own secret",
            file=sys.stderr,
        )
    return key.secret_source


def _region_warnings(config: BrokerConfig) -> list[str]:
    """Creators keys tagged for marketplaces outside their credential version's region:
    Amazon refuses their requests there (401 InvalidIssuer, protocol.md 2.1), and the key
    leaves those marketplaces."""
    import urllib.parse

    from broker.api.marketplaces import credential_version
    from broker.api.marketplaces import marketplace as lookup_marketplace
    from broker.config import is_loopback_host
    from broker.models import Protocol

    if config.api.protocol is not Protocol.CREATORS:
        return []
    demo: set[str] = set()
    if config.api.uses_simulator or is_loopback_host(
        urllib.parse.urlsplit(config.api.endpoint).hostname or ""
    ):
        # The embedded simulator, or a `broker simulate` here (the README's recipe for
        # `broker status`): its demo accounts serve every region (the starter's UK tag);
        # its other accounts, as Amazon's keys, their own region only. Other keys on a
        # loopback address may reach Amazon through a local proxy.
        from broker.simulator.accounts import DEMO_ACCOUNTS

        demo = {account.credential_id for account in DEMO_ACCOUNTS}
    warnings = []
    for key in config.keys:
        if key.version is None or key.credential_id in demo:
            continue
        region = credential_version(key.version).region
        foreign = [m for m in key.partner_tags if lookup_marketplace(m).region is not region]
        if foreign:
            warnings.append(
                f"key {key.name}: credential version {key.version} is for the {region.value} "
                f"region, and {', '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} not: "
                "Amazon refuses its requests there (InvalidIssuer), which takes the key out of "
                "those; give them a key of their own region's version"
            )
    return warnings


def _environment_warnings(config: BrokerConfig, environ: Mapping[str, str]) -> list[str]:
    """What this environment would refuse when the config runs, which ``check-config`` said
    nothing of: no home directory for a default state or cache file, or a proxy variable
    for the API that is no HTTP proxy URL (both refused by ``run``, exit 78)."""
    from urllib.parse import urlsplit

    from broker.config import AMAZON
    from broker.engine.transport import proxies_from_environment, proxy_to
    from broker.errors import ConfigError
    from broker.sqlitewal import state_dir

    found: list[str] = []
    defaults = (config.state.backend == "local" and config.state.path is None) or (
        config.cache.backend == "sqlite" and config.cache.path is None
    )
    if defaults:
        try:
            state_dir(environ)
        except ConfigError as exc:
            found.append(exc.message)
    endpoint = config.api.endpoint
    if not config.api.uses_simulator:
        parts = urlsplit(endpoint) if endpoint != AMAZON else None
        scheme, host = ("https", "") if parts is None else (parts.scheme, parts.hostname or "")
        try:
            proxy_to(scheme, host, proxies_from_environment(environ))
        except ConfigError as exc:
            found.append(f"{exc.path}: {exc.message} (a run stops at its first request)")
    return found


def _token_endpoint_warnings(config: BrokerConfig) -> list[str]:
    """Keys a whole ``api.token_endpoint`` URL cannot serve: one whose path ends in
    ``/token`` is used as it is for every key, but 2.x keys (Cognito) and 3.x keys (Login
    with Amazon) take their tokens from different servers. The keys of the other family are
    refused (``invalid_scope``) and taken out, as if their version were wrong."""
    from urllib.parse import urlsplit

    from broker.api.marketplaces import CREDENTIAL_VERSIONS, credential_version

    url = config.api.token_endpoint
    if url is None or not urlsplit(url).path.endswith("/token"):
        return []  # a base: each version's own path is added
    # The family whose own path the URL ends in, if any (a mock's /lwa/token is neither).
    url_families = {v.family for v in CREDENTIAL_VERSIONS.values() if url.endswith(v.token_path)}
    versions = {key.name: credential_version(key.version) for key in config.keys if key.version}
    if url_families:
        refused = {n: v for n, v in versions.items() if v.family not in url_families}
    elif len({v.family for v in versions.values()}) > 1:
        refused = versions
    else:
        return []
    if not refused:
        return []
    named = ", ".join(f"key {name} ({v.version})" for name, v in refused.items())
    return [
        f"api.token_endpoint {url} is one token URL, used as it is for every key, but 2.x "
        f"keys (Cognito) and 3.x keys (Login with Amazon) take tokens from different "
        f"servers: {named} will be refused (invalid_scope) and taken out; give a base URL "
        "instead (each version's path, /oauth2/token or /auth/o2/token, is added) or keys "
        "of one family"
    ]


def _check_config(config: BrokerConfig) -> int:
    from broker.config import shown_url

    print(f"config ok: {config.source}")
    print(
        f"  api: {config.api.protocol.value} at {shown_url(config.api.endpoint)}, "
        f"marketplace {config.api.marketplace}"
    )
    for key in config.keys:
        # A secret file left unread is a systemd credential outside its service (any other
        # file that cannot be read is a config error), whatever the endpoint: the embedded
        # simulator does not use its own secret instead (a run is refused, exit 78).
        unread = key.secret is None and key.secret_source.startswith("file ")
        if unread:
            print(
                f"note: key {key.name}: its secret ({key.secret_source}) is a systemd "
                "credential, which only its service can read: not checked here",
                file=sys.stderr,
            )
        secret = (
            _simulator_secret_note(config, key)
            if config.api.uses_simulator and not unread
            else key.secret_source
        )
        print(
            f"  key {key.name}: id {key.credential_id}, secret from {secret} (***), "
            f"{key.tps:g} TPS, {key.tpd or 'unlimited'} TPD, "
            f"marketplaces {', '.join(key.partner_tags)}"
        )
    warnings = [
        *_region_warnings(config),
        *_token_endpoint_warnings(config),
        *_shared_account_warnings(config),
        *_environment_warnings(config, os.environ),
    ]
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if config.engine.queue_size < config.engine.batch_size:
        print(
            f"warning: engine.queue_size ({config.engine.queue_size}) is below "
            f"engine.batch_size ({config.engine.batch_size}): no request carries more than "
            f"{config.engine.queue_size} ASINs, so a job takes more of each key's quota "
            "than it needs; raise queue_size to at least batch_size",
            file=sys.stderr,
        )
    if not any(config.api.marketplace in key.partner_tags for key in config.keys):
        print(
            f"warning: no key has a partner tag for the default marketplace "
            f"{config.api.marketplace}: every row without a marketplace will fail; add "
            f'partner_tags = {{ "{config.api.marketplace}" = "your-tracking-id" }} to a key'
            + config.marketplace_hint(),
            file=sys.stderr,
        )
    return ExitCode.OK


def _outage_message(exc: NoUsableKeyError, budget_s: float) -> str:
    """Why a lookup gave up on an outage: what it waited for past the budget, each key's
    failure once (keys failing alike together, each saying how long it lasted: a request
    that hangs counts whole, so it may be longer than the budget), and one remedy said for
    the lookup, not each key's for a run (rows left pending, retry.outage_budget_s)."""
    from broker.engine.keys import STATE_OUTAGE_CODE

    keys: dict[str, list[str]] = {}
    for failure in exc.failures:
        keys.setdefault(f"{failure.code}: {failure.message}", []).append(failure.key)
    reasons = "; ".join(f"{', '.join(names)}: {reason}" for reason, names in keys.items())
    if all(failure.code == STATE_OUTAGE_CODE for failure in exc.failures):
        waited, remedy = (
            "the key-state store out of reach",
            "check that the key-state store ([state]) is up",
        )
    else:
        waited, remedy = (
            "no usable answer",
            "check the network, DNS, proxy or firewall, and api.endpoint (api.token_endpoint "
            "when the last error is the token endpoint's; a 5xx or a reset each time: the API "
            "itself is down, wait for it; a 429 each time: it throttles the key, wait for it)",
        )
    return (
        # Not "after N s": a request that hangs is waited for whole (a 5-s budget ended
        # after a 30-s hang was told "after 5 s"); each failure says how long it lasted.
        f"gave up: {waited} for the outage budget ({budget_s:g} s): "
        f"no key can serve "
        f"{exc.marketplace}: {reasons or 'no key configured'}; {remedy}, then look up again "
        "(--outage-budget SECONDS waits longer)"
    )


def _lookup_command(config: BrokerConfig, args: argparse.Namespace) -> int:
    """``broker lookup``: check the flags, then look up and print."""
    import dataclasses

    from broker.api.marketplaces import marketplace as lookup_marketplace

    # Bytes that are not UTF-8 (Python keeps them as lone surrogates) would make the rows'
    # UTF-8 JSON invalid: they become U+FFFD, and the id is invalid as any non-ASCII one.
    args.asins = [os.fsencode(raw).decode("utf-8", "replace") for raw in args.asins]
    if args.refresh:
        from broker.cache import RUN_MAX_AGE_S, cache_policy

        override = _cache_max_age(args)
        policy = cache_policy(config.cache, default_max_age_s=RUN_MAX_AGE_S, max_age_s=override)
        if not policy.enabled:
            # Refresh writes the new answers to the cache: with it off there is nothing to
            # write to, and every id is asked of Amazon anyway.
            if override == 0:
                off = "--no-cache" if args.no_cache else "--max-age 0"
                hint = f"give one of them ({off} alone also asks Amazon for every id)"
            else:
                off = "[cache] max_age_s = 0 of the config"
                hint = (
                    "leave --refresh out (every id is asked of Amazon anyway), or give --max-age S"
                )
            print(
                f"{prog()}: --refresh keeps the new answers in the item cache, which {off} "
                f"turns off: {hint}",
                file=sys.stderr,
            )
            return ExitCode.USAGE
    # None: each id's own store (a product URL's), else api.marketplace of the config
    # (a name no store has was refused before the config was read).
    market: str | None = None
    if args.marketplace is not None:
        market = lookup_marketplace(args.marketplace).name
    resources: tuple[str, ...] | None = None
    if args.resources is not None:
        from broker.api.resources import resolve_resources

        names = [r.strip() for r in args.resources.split(",") if r.strip()]
        if not names:
            print(
                f"{prog()}: --resources names no resource; give a comma-separated list, or "
                "leave it out for api.resources of the config",
                file=sys.stderr,
            )
            return ExitCode.USAGE
        try:
            # Checked before anything starts (the embedded simulator, the key state).
            resources = resolve_resources(names, config.api.protocol)
        except ValueError as exc:
            # The resolver names its argument "resources:"; here it is the flag.
            reason = str(exc).removeprefix("resources: ")
            print(f"{prog()}: --resources: {reason}", file=sys.stderr)
            return ExitCode.USAGE
    budget = args.outage_budget
    if budget is None:
        budget = min(config.retry.outage_budget_s, LOOKUP_OUTAGE_BUDGET_S)
    config = dataclasses.replace(
        config, retry=dataclasses.replace(config.retry, outage_budget_s=budget)
    )
    as_json = args.json or not sys.stdout.isatty()
    wind_down = asyncio.Event()
    outcome: list[int] = []
    return _run_loop(
        _until_stopped(
            _lookup(
                config,
                args.asins,
                market,
                resources,
                as_json=as_json,
                wind_down=wind_down,
                cache_max_age_s=_cache_max_age(args),
                cache_refresh=args.refresh,
                outcome=outcome,
            ),
            wind_down,
            outcome,
        )
    )


async def _until_stopped(
    command: Coroutine[Any, Any, int],
    wind_down: asyncio.Event,
    outcome: list[int] | None = None,
) -> int:
    """Run ``command``, stopping it at a stop signal (SIGINT, SIGTERM, SIGHUP: ``timeout``,
    a closed terminal); then one line, and exit 75 unless the command got every answer
    (its own code then, as ``broker run``'s drain that finished the job exits 0).

    The first signal sets ``wind_down``: the command sends nothing more and ends once the
    answers already on the wire (paid for) are in, for at most ``LOOKUP_DRAIN_S``, and
    returns 75 itself if ids were left. A second signal, or that time, cancels it, and its
    own CancelledError handling prints what it has.
    """
    from broker.jobs.signals import StoppedWriting, installed

    task = asyncio.current_task()
    stopped: list[signal.Signals] = []
    timers: list[asyncio.TimerHandle] = []

    def cancel() -> None:
        if task is not None:
            task.cancel()  # again at a later signal: it cuts the closing short too

    def stop(sig: signal.Signals) -> None:
        stopped.append(sig)
        if len(stopped) > 1:
            cancel()
            return
        wind_down.set()
        timers.append(asyncio.get_running_loop().call_later(LOOKUP_DRAIN_S, cancel))
        print(
            f"{prog()}: {sig.name}: sending nothing more; waiting at most "
            f"{LOOKUP_DRAIN_S:g} s for the answers already on the wire (again to stop now)",
            file=sys.stderr,
        )

    with installed(stop):
        try:
            code = await command
        except asyncio.CancelledError:
            if not stopped:
                raise
            # Cancelled once every answer was printed (while the broker closed): done.
            code = outcome[0] if outcome else ExitCode.RESUMABLE
        except StoppedWriting as blocked:
            # Printing to a reader that took no more in time: what was not printed is lost.
            print(
                f"{prog()}: {blocked} while printing (its reader took no more in time)",
                file=sys.stderr,
            )
            code = ExitCode.RESUMABLE
        finally:
            for timer in timers:
                timer.cancel()
        if stopped:
            print(f"{prog()}: stopped by {stopped[0].name}", file=sys.stderr)
        return code


def _copy_out(paths: RunPaths, *, signalled: bool) -> None:
    """``--out -``: the finished output to stdout, under the stop policy (a first signal
    lets it go on for the drain's 20 s, a second ends it: a reader that stopped reading held
    the run in its write for good, deaf to every signal); ``signalled``: the run was
    stopped by one already. Ended so, what stdout still buffers is dropped, or the exit's
    own flush would wait for the reader again.

    Raises:
        StoppedWriting: a stop signal ended the copy.
    """
    from broker.jobs.runner import DRAIN_GRACE_S
    from broker.jobs.signals import writes_until_stopped

    with writes_until_stopped(DRAIN_GRACE_S, signalled=signalled):
        paths.copy_out()


async def _lookup(
    config: BrokerConfig,
    asins: Sequence[str],
    marketplace: str | None,
    resources: tuple[str, ...] | None,
    *,
    as_json: bool,
    wind_down: asyncio.Event | None = None,
    cache_max_age_s: float | None = None,
    cache_refresh: bool = False,
    outcome: list[int] | None = None,
) -> int:
    """Look ``asins`` up and print a row for each answer, in argument order.

    ``outcome`` gets the exit code of a lookup cancelled once every id's answer was in (a
    second signal while the broker closes): its caller says 0 (or 3), not 75.

    Setting ``wind_down`` (a stop signal, or every key waiting for its daily quota) sends
    nothing more; the answers already on the wire still come and are printed.
    """
    from broker.cache import RUN_MAX_AGE_S
    from broker.client import Broker
    from broker.errors import (
        ConfigError,
        NoUsableKeyError,
        StateUnavailableError,
        os_error_text,
    )
    from broker.jobs.runner import describe_failure, each_marketplace, keys_serving
    from broker.models import Query

    # Answers by argument position, kept as they come: a lookup that cannot finish (an
    # outage, the daily quota spent, Ctrl-C) still prints the answers it has.
    got: dict[int, ItemResult] = {}
    stopped_short = False
    failure: tuple[int, str] | None = None
    # The marketplace of each argument, to tell when every key that serves one an unanswered
    # argument is for waits for its daily quota.
    needs = [_market_for(config, text, marketplace) for text in asins]
    try:
        # A marketplace no key is configured for is answered by the broker itself
        # (failed, NoKeyForMarketplace) without a request.
        async with Broker(
            config,
            cache_default_max_age_s=RUN_MAX_AGE_S,
            cache_max_age_s=cache_max_age_s,
            cache_refresh=cache_refresh,
        ) as broker:
            # One tagged query per argument: a repeated ASIN is still a row of its own.
            queries = [Query(text, tag=n) for n, text in enumerate(asins)]
            stop = asyncio.Event() if wind_down is None else wind_down

            async def collect(asked: list[Query]) -> None:
                stream = broker.stream(
                    asked, marketplace=marketplace, resources=resources, stop=stop
                )
                async for result in stream:
                    # Every result carries the query that asked for it, tag included.
                    tag = result.query.tag if result.query is not None else None
                    if not isinstance(tag, int):
                        raise RuntimeError(f"a result without its query's position: {result!r}")
                    got[tag] = result

            async def collect_each(positions: list[int]) -> None:
                # A stream per marketplace, as broker run has: one whose keys were all
                # taken out stops only its own ids; the others are still answered, and
                # printed, before the lookup stops with its error.
                by_market: dict[str | None, list[Query]] = {}
                for n in positions:
                    by_market.setdefault(needs[n], []).append(queries[n])
                await each_marketplace([collect(part) for part in by_market.values()])

            def waited_for() -> set[str]:
                markets = {market for n, market in enumerate(needs) if n not in got and market}
                return keys_serving(broker, markets)

            asked = list(range(len(queries)))
            while True:
                until = await _stop_at_spent_quota(
                    broker, collect_each(asked), stop, waited_for, lambda: len(got)
                )
                if until is not None or stop.is_set():
                    break
                # Printed once all are in: an answer read from the cache at the start that
                # aged past its max age while the others were looked up is asked again
                # (Amazon's 24-hour rule counts to what is printed).
                asked = [n for n, result in got.items() if not broker.is_fresh(result)]
                if not asked:
                    break
                for n in asked:
                    del got[n]
            if until is not None and len(got) < len(asins):
                failure = (
                    ExitCode.RESUMABLE,
                    (
                        "stopped: every key these ids need waits for its daily quota, or is "
                        "parked after sustained 429s (Amazon's own quota spent, or access "
                        f"revoked), until {until}; the ids not printed were not looked up (run "
                        "again after that)"
                    ),
                )
            # A stop signal with ids not looked up: 75 (the caller says "stopped by SIGTERM").
            stopped_short = stop.is_set() and len(got) < len(asins)
    except (NoUsableKeyError, StateUnavailableError, ConfigError, OSError) as exc:
        code, message = describe_failure(exc)
        # run's messages speak of rows left pending; a lookup has none, so say it plainly.
        if code == ExitCode.UNAVAILABLE and isinstance(exc, NoUsableKeyError):
            # The failure names what failed (the API, its token endpoint, or the key-state
            # store) and its error; the lead says which was waited for.
            message = _outage_message(exc, config.retry.outage_budget_s)
        elif isinstance(exc, NoUsableKeyError):
            message = f"stopped: {exc}"
        elif isinstance(exc, OSError):
            message = os_error_text(exc)
        elif isinstance(exc, StateUnavailableError):
            message = str(exc)  # it says itself whether it waited out the budget
        failure = (code, message)
    except (TypeError, ValueError) as exc:
        print(f"{prog()}: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except asyncio.CancelledError:
        # Ctrl-C: what it has, then stop.
        _print_lookup_rows(asins, got, as_json=as_json, signalled=True)
        if outcome is not None and len(got) == len(asins):
            outcome.append(_answered_code(got))
        raise
    signalled = wind_down is not None and wind_down.is_set()
    _print_lookup_rows(asins, got, as_json=as_json, signalled=signalled)
    if failure is not None:
        code, message = failure
        print(f"{prog()}: {message}", file=sys.stderr)
        return code
    if stopped_short:
        return ExitCode.RESUMABLE
    return _answered_code(got)


def _answered_code(got: dict[int, ItemResult]) -> int:
    """The exit code of a lookup with these answers: 3 if one failed, else 0."""
    return ExitCode.SOME_FAILED if any(r.status.value == "failed" for r in got.values()) else 0


def _print_lookup_rows(
    asins: Sequence[str], got: dict[int, ItemResult], *, as_json: bool, signalled: bool
) -> None:
    """The rows answered so far, in argument order, under the stop policy (a reader that
    stopped reading held the lookup in its write for good, deaf to every signal; see
    :func:`_copy_out`); ``signalled``: the lookup was stopped by one already.

    Raises:
        StoppedWriting: a stop signal ended the write (what stdout buffers is dropped).
    """
    from broker.jobs.signals import writes_until_stopped
    from broker.jobs.sinks import json_lines

    rows = [_lookup_row(n + 1, asins[n], result) for n, result in sorted(got.items())]
    # Bytes, whatever stdout's encoding (a C locale, cron): JSON lines in UTF-8, as run
    # writes them; the summary in the terminal's encoding, what it cannot show replaced.
    if as_json:
        data = json_lines(rows)
    else:
        encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
        data = "".join(f"{_readable(row)}\n" for row in rows).encode(encoding, "replace")
    with writes_until_stopped(LOOKUP_DRAIN_S, signalled=signalled):
        write_stdout(data)


def _market_for(config: BrokerConfig, text: str, marketplace: str | None) -> str | None:
    """The marketplace ``text`` is asked in (the call's, else a product URL's store, else
    the config's), as the broker chooses it; None for one that is not Amazon's (answered at
    once, so no key is waited for)."""
    from broker.api.marketplaces import marketplace as lookup_marketplace
    from broker.asin import check_asin

    named = marketplace or check_asin(text).store or config.api.marketplace
    try:
        return lookup_marketplace(named).name
    except ValueError:
        return None


async def _stop_at_spent_quota(
    broker: Broker,
    lookups: Coroutine[Any, Any, None],
    wind_down: asyncio.Event,
    waited_for: Callable[[], set[str]],
    answered: Callable[[], int],
) -> str | None:
    """Run ``lookups``; once every key they still wait for waits for its daily quota and no
    answer came for a while (the item cache answers ids with no key: :func:`quota_spent`),
    wind them down (``wind_down``: nothing more is sent, answers on the wire still come)
    and return when that quota resets (None: they ended by themselves).

    A one-shot command must not sit silently until a reset hours away, as a job may.
    """
    from broker.jobs.runner import quota_spent

    task = asyncio.ensure_future(lookups)
    watch = asyncio.ensure_future(quota_spent(broker, waited_for, answered))
    until: str | None = None
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            until, _ = watch.result()
            wind_down.set()
            await asyncio.wait({task})
    finally:
        for left in (watch, task):
            if not left.done():
                left.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await left
    task.result()
    return until


def _lookup_row(line: int, raw: str, result: ItemResult) -> dict[str, object]:
    """The output row ``broker run`` would write for this result (line = argument position)."""
    from broker.jobs.ledger import DoneRow
    from broker.jobs.sinks import output_row

    # An id that is not an ASIN has no ASIN: run's row says null (the text is in ``input``).
    refused = (
        result.error is not None and result.error.code == "InvalidAsin" and not result.attempts
    )
    return output_row(
        DoneRow(
            done_order=line,
            seq=line - 1,
            line=line,
            raw=raw,
            asin=None if refused else result.asin,
            marketplace=result.marketplace,
            status=result.status.value,
            result=result.to_json(),
            error_reason=None,
            extra=None,
        )
    )


# Control characters (C0, DEL, C1) and the bidirectional overrides: text from the API or
# the input must not move the cursor, recolour or retitle a terminal, or forge a line.
_UNPRINTABLE: Final = {
    code: " "
    for code in (*range(0x20), *range(0x7F, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A))
}


def _readable(row: dict[str, object]) -> str:
    """A row as a few lines for a person: status, title, price, availability or the error;
    every value with its control characters blanked (see ``_UNPRINTABLE``)."""
    return "\n".join(line.translate(_UNPRINTABLE) for line in _readable_lines(row))


def _readable_lines(row: dict[str, object]) -> list[str]:
    head = f"{row['asin'] or row['input']}  {row['marketplace']}  {row['status']}"
    if row.get("cached"):
        # Where the answer came from and how old it is: a price read from the cache is not
        # this minute's.
        fetched = str(row.get("fetched_at"))[:16].replace("T", " ")
        head += f"  (from the item cache, fetched {fetched} UTC)"
    lines = [head]
    summary = row.get("summary")
    if isinstance(summary, dict):
        if summary.get("title"):
            lines.append(f"  {summary['title']}")
        price = summary.get("price")
        if isinstance(price, int | float):
            currency = summary.get("currency") or ""
            # ISO 4217's minor units: none for the yen, two for the other stores' currencies.
            places = 0 if currency == "JPY" else 2
            lines.append(f"  price {price:.{places}f} {currency}".rstrip())
        if summary.get("availability"):
            lines.append(f"  {summary['availability']}")
        if summary.get("detail_url"):
            lines.append(f"  {summary['detail_url']}")
    error = row.get("error")
    if isinstance(error, dict):
        lines.append(f"  {error.get('code')}: {error.get('message')}")
        if error.get("remedy"):
            lines.append(f"  remedy: {error['remedy']}")
    return lines


def _run_command(config: BrokerConfig, args: argparse.Namespace) -> int:
    from broker.jobs.paths import UsageError, output_format, plan_paths

    try:
        fmt = output_format(args.out, args.format, config.output.format)
        paths: RunPaths = plan_paths(
            job=args.job,
            out=args.out,
            fmt=fmt,
            directory=Path(config.output.directory),
            stdin_format=args.input or "txt",
        )
    except UsageError as exc:
        print(f"{prog()}: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except OSError as exc:
        code, message = _unusable_path(exc, args.job)
        print(f"{prog()}: {message}", file=sys.stderr)
        # As every error exit of a run does (an alert on the event must not miss it).
        from broker.logs import get_logger

        get_logger().error("broker.job_finished", job=args.job, error=message, exit_code=int(code))
        return code
    with paths:
        return _run_loop(_run(config, args, paths))


#: What every command says when a relative path it was given (or ./config.toml) cannot be
#: found because the working directory was deleted under the shell.
_CWD_GONE: Final = (
    "the working directory is gone (deleted while the shell was in it): cd to a folder that "
    "exists, or give every path in full (nothing was written)"
)


def _cwd_gone(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is relative to a working directory deleted under the shell (a
    relative path then names nothing, and every command said its file was not found)."""
    if os.path.isabs(path):
        return False
    try:
        os.getcwd()
    except FileNotFoundError:
        return True
    return False


def _unusable_path(exc: OSError, job: str) -> tuple[ExitCode, str]:
    """The exit code and message for a path ``broker run`` could not even look at: a name
    too long, a loop of symbolic links, a working directory deleted under the shell."""
    from broker.jobs.paths import STDIO, name_too_long_hint

    reason = exc.strerror or str(exc)
    if exc.filename is None:
        if _cwd_gone("."):
            return ExitCode.IO_ERROR, _CWD_GONE
        return ExitCode.IO_ERROR, f"cannot use the paths given: {reason} (nothing was written)"
    named = os.fsdecode(exc.filename)
    if job != STDIO and Path(named) == Path(job):
        return ExitCode.NO_INPUT, f"cannot read the job file {job}: {reason}"
    hint = name_too_long_hint(exc)
    return ExitCode.IO_ERROR, f"cannot write {named}: {reason}{hint} (nothing was written)"


def _as_stdin(message: str, copy: str) -> str:
    """``message`` naming a line of ``copy`` (stdin's copy) as stdin's line."""
    prefix = f"{copy}: line "
    return f"stdin: line {message[len(prefix) :]}" if message.startswith(prefix) else message


def _log_finished(
    summary: JobSummary, paths: RunPaths, *, failed: str | None = None, reader_gone: bool = False
) -> None:
    """The closing figures as one ``broker.job_finished`` event: with JSON logs, a log
    collector reads them there instead of parsing the plain lines printed after it.
    ``failed``: the run's rows are done, but what ends it is this error (exit 74): logged
    at error level, with it. ``reader_gone``: stdout's reader went away (``| head``), which
    ends it with 141: at info level, the reader's choice."""
    from broker.logs import get_logger

    logger = get_logger()
    extra: dict[str, object] = {} if failed is None else {"error": failed}
    code = summary.exit_code() if failed is None else ExitCode.IO_ERROR
    if reader_gone:
        extra["stdout"] = "its reader went away before it took every row"
        code = ExitCode.BROKEN_PIPE
    (logger.info if failed is None else logger.error)(
        "broker.job_finished",
        **extra,
        job=str(paths.job) if not paths.stdin else "-",
        out=paths.shown_out,
        rows={"total": summary.total, **summary.by_status},
        pending=summary.pending,
        requests=summary.requests,
        throttled=summary.throttled,
        retries=summary.retries,
        from_cache=summary.cached,
        wall_s=round(summary.wall_s, 3),
        resumed_rows=summary.resumed_rows,
        invalid_report=summary.invalid_report if not paths.to_stdout else None,
        stopped_by_signal=summary.stopped_by_signal,
        read_complete=summary.read_complete,
        quota_wait_until=summary.quota_wait_until,
        quota_wait_keys=sorted(summary.quota_wait_keys),
        keys_out=list(summary.keys_out),
        failed=[
            {"code": code, "marketplace": market, "rows": n}
            for code, market, n in summary.failed_causes
        ],
        exit_code=int(code),
    )


def _say_rows(
    total: int, by_status: Mapping[str, int], pending: int, *, read_complete: bool = True
) -> None:
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())) or "none done"
    read = "" if read_complete else " read so far, the job file not read to its end"
    print(f"rows: {total}{read} ({statuses}); pending {pending}", file=sys.stderr)


def _say_failures(causes: Sequence[tuple[str, str, int]]) -> None:
    """Why rows failed, by error code and marketplace (the five largest), so a config fix
    that ends them all (a partner tag for a store) is seen without opening the output."""
    if not causes:
        return
    shown = ", ".join(f"{n} {code} ({market})" for code, market, n in causes[:5])
    more = f", and {len(causes) - 5} more causes" if len(causes) > 5 else ""
    print(
        f"failed: {shown}{more}; the output's rows say more (error.remedy in JSON Lines and "
        "in SQLite's row_json; README, Error codes)",
        file=sys.stderr,
    )


def _log_stopped(
    paths: RunPaths,
    code: int,
    message: str,
    *,
    refresh: bool = False,
    ours: bool = True,
    exc: BaseException | None = None,
) -> None:
    """``broker.job_finished`` of a run an error stopped: its exit code and why, with the
    rows as its ledger has them (none when it has no ledger yet); the rows line and where
    the output is are printed too, as a finished run prints them: rows other marketplaces
    did before the error are written, and resumable. A ``refresh`` run's rows are in its own
    ledger, beside the previous output it replaces only when it completes. Not ``ours``
    (the output is another job file's): no rows, theirs are not this job's. ``exc``: the
    error, whose traceback the event carries when it is a bug (an internal error)."""
    from broker.jobs.ledger import read_tally
    from broker.jobs.paths import ledger_path, refresh_path
    from broker.jobs.runner import unexpected
    from broker.logs import get_logger

    tally = (
        read_tally(ledger_path(refresh_path(paths.out) if refresh else paths.out)) if ours else None
    )
    figures: dict[str, object] = {}
    if tally is not None:
        done = {status: n for status, n in tally.items() if status != "pending"}
        total, pending = sum(tally.values()), tally.get("pending", 0)
        figures = {"rows": {"total": total, **done}, "pending": pending}
    # At error level: an alert on errors must not miss a job that ended on one.
    get_logger().error(
        "broker.job_finished",
        job=str(paths.job) if not paths.stdin else "-",
        out=paths.shown_out,
        **figures,
        error=message,
        exit_code=int(code),
        exc_info=exc if exc is not None and unexpected(exc) else None,
    )
    if tally is not None:
        _say_rows(total, done, pending)
        if refresh:
            print(
                f"output: {paths.shown_out} (the previous one: the refresh replaces it when it "
                "completes)",
                file=sys.stderr,
            )
        elif paths.to_stdout or paths.out.exists():
            print(f"output: {paths.shown_out}", file=sys.stderr)


async def _run(config: BrokerConfig, args: argparse.Namespace, paths: Any) -> int:
    import dataclasses

    from broker.jobs.ledger import OtherJobsOutputError
    from broker.jobs.paths import RunPaths
    from broker.jobs.runner import JobOptions, describe_failure, finish_promotion, run_job
    from broker.jobs.signals import StoppedReading, StoppedWriting, stops_reading

    assert isinstance(paths, RunPaths)
    summary = None
    options = JobOptions(
        job=paths.job,
        out=paths.out,
        format=paths.format,
        strict=args.strict,
        new_job=args.new_job,
        encoding=args.encoding,
        convert_isbn13=args.convert_isbn13,
        no_wait=args.no_wait,
        progress=args.progress,
        refresh=args.refresh,
        ordered=args.ordered,
        cache_max_age_s=_cache_max_age(args),
    )
    try:
        if paths.stdin:
            if sys.stdin.isatty():
                print(
                    "reading the job from the terminal: its lines, then Ctrl-D to run it "
                    "(Ctrl-C leaves)",
                    file=sys.stderr,
                )
            # A refresh's promotion a crash cut short, finished first: its input is the
            # job's saved one that stdin is compared with.
            finish_promotion(paths.out)
            with stops_reading():
                paths.read_stdin(new_job=args.new_job, refresh=args.refresh)
            # A refresh of other input reads its own copy (the job's is kept until it completes).
            options = dataclasses.replace(options, job=paths.job)
        summary = await run_job(config, options)
    except StoppedReading as stop:
        message = f"stopped by {stop.sig.name} while reading the job from stdin: nothing was sent"
        print(f"{prog()}: {message}", file=sys.stderr)
        return ExitCode.RESUMABLE
    except Exception as exc:
        code, message = describe_failure(exc, job=options.job)
        if paths.stdin:
            # A line of the input is stdin's line: the copy read (in a temporary folder
            # gone at exit, for --out -) is not what the user gave.
            message = _as_stdin(message, str(options.job))
        # An output another job file owns: its rows are not this job's.
        ours = not isinstance(exc, OtherJobsOutputError)
        _log_stopped(paths, code, message, refresh=args.refresh, ours=ours, exc=exc)
        print(f"{prog()}: {message}", file=sys.stderr)
        return code
    finally:
        if summary is None:
            try:
                _copy_out(paths, signalled=False)  # what was written before the error
            except StoppedWriting:
                pass  # the run's own error is what it ends on, as its event said
            except OSError as exc:
                if isinstance(exc, BrokenPipeError):
                    raise  # the reader went away: quiet, as ever (141)
                # The run's own error is what it ends on, as its event said.
                print(f"{prog()}: cannot write to stdout: {exc.strerror}", file=sys.stderr)
    try:
        _copy_out(paths, signalled=summary.stopped_by_signal)
    except StoppedWriting as stop:
        print(
            f"{prog()}: {stop} while writing the output to stdout (its reader took no more "
            "in time): run it again to start over",
            file=sys.stderr,
        )
        return ExitCode.RESUMABLE
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            # Quiet on stderr (141, said by the top level), but logged: without its closing
            # event the run read as one that died after broker.job_started.
            _log_finished(summary, paths, reader_gone=True)
        else:
            # stdout unwritable (a full device): the run ends 74 on it, said by the top
            # level, logged with its figures as every error exit of a run is.
            _log_finished(summary, paths, failed=f"cannot write to stdout: {exc.strerror}")
            _say_rows(summary.total, summary.by_status, summary.pending)
        raise
    _log_finished(summary, paths)
    _say_rows(
        summary.total, summary.by_status, summary.pending, read_complete=summary.read_complete
    )
    _say_failures(summary.failed_causes)
    from_cache = f"from the item cache {summary.cached}, " if summary.cached else ""
    print(
        f"requests {summary.requests}, 429s {summary.throttled}, retries {summary.retries}, "
        f"{from_cache}{summary.wall_s:.1f} s",
        file=sys.stderr,
    )
    if paths.to_stdout or paths.out.exists():
        print(f"output: {paths.shown_out}", file=sys.stderr)
    elif not summary.read_complete or summary.refresh_pending:
        # Stopped before the output was begun (a CSV output waits for the whole job file;
        # --refresh writes beside it until the new one is complete).
        print(f"output: {paths.shown_out} (not begun yet)", file=sys.stderr)
    else:
        print(
            f"output: {paths.shown_out} (not there: moved or deleted during the run; run "
            "again to write it from the ledger)",
            file=sys.stderr,
        )
    # --out - keeps no ledger (and no report): its temporary directory goes at exit, so
    # nothing it names can be read or resumed afterwards.
    if summary.invalid_report and not paths.to_stdout:
        print(f"invalid rows: {summary.invalid_report}", file=sys.stderr)
    if summary.keys_out:
        # The other keys may have done every row (exit 0): a broken key must still be seen.
        print(
            f"out of rotation: {'; '.join(summary.keys_out)} (each one's remedy is in its "
            "broker.key_disabled event)",
            file=sys.stderr,
        )
    over = "run it again to start over (--out - keeps no ledger, so it cannot resume)"
    if summary.quota_wait_until:
        tail = (
            f"after that, {over}"
            if paths.to_stdout
            else "run the same command again after that to resume"
        )
        named = (
            f" ({', '.join(sorted(summary.quota_wait_keys))})" if summary.quota_wait_keys else ""
        )
        print(
            f"every key the rows left need{named} waits for its daily quota, or is parked "
            "after sustained 429s (Amazon's own quota spent, or access revoked), until "
            f"{summary.quota_wait_until}: {tail}",
            file=sys.stderr,
        )
    if summary.ordering_stopped:
        print(
            "stopped by signal while putting the output in input order (--ordered): every "
            "row is in it, in the order they were done; run the same command again to order it",
            file=sys.stderr,
        )
    elif summary.stopped_by_signal:
        tail = over if paths.to_stdout else "run the same command again to resume"
        print(f"stopped by signal: {tail}", file=sys.stderr)
    if summary.refresh_pending:
        print("the refresh is not complete: the previous output stays in place", file=sys.stderr)
    if summary.already_complete is not None:
        print(summary.already_complete, file=sys.stderr)
    return summary.exit_code()
