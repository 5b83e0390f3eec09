"""The command line: ``broker run | serve | lookup | simulate | bench | check-config``.

A thin edge over the library: it parses arguments, configures logging, picks the event
loop (uvloop where available) and maps errors to documented exit codes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="broker",
        description="Asynchronous, rate-limited request broker for Amazon's product APIs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = sub.add_parser(
        "simulate",
        help="run the local simulator of the Creators API and PA-API 5.0",
        description="Run the local Amazon simulator (both APIs) until interrupted.",
    )
    sim.add_argument("--config", default="config.toml", help="config file whose [simulator] "
                     "table sets accounts, limits and faults (default: %(default)s; "
                     "a missing default file means built-in settings)")
    sim.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    sim.add_argument("--port", type=int, default=8787, help="port to bind; 0 picks a free one "
                     "(default: %(default)s)")
    sim.add_argument("--allow-remote", action="store_true",
                     help="allow binding a non-loopback address (the simulator has no TLS)")
    return parser


def _run_loop(coro: object) -> int:
    """Run ``coro`` on uvloop when installed, else on the default asyncio loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop missing (Windows)
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(coro)  # type: ignore[arg-type]
    return int(result) if isinstance(result, int) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    args = _build_parser().parse_args(argv)
    if args.command == "simulate":
        from broker.simulator.cli import simulate_command

        return simulate_command(args, run=_run_loop)
    print(f"unknown command {args.command}", file=sys.stderr)  # pragma: no cover
    return 2
