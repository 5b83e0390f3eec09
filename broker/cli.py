"""The command line: ``broker run | serve | lookup | status | simulate | bench | check-config``.

A thin edge over the library: it parses arguments, configures logging, picks the event
loop (uvloop where available) and maps errors to documented exit codes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

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
    sim.add_argument(
        "--config",
        default="config.toml",
        help="config file whose [simulator] "
        "table sets accounts, limits and faults (default: %(default)s; "
        "a missing default file means built-in settings)",
    )
    sim.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    sim.add_argument(
        "--port",
        type=int,
        default=8787,
        help="port to bind; 0 picks a free one (default: %(default)s)",
    )
    sim.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow binding a non-loopback address (the simulator has no TLS)",
    )

    run = sub.add_parser(
        "run",
        help="run a job file to the end (resumable)",
        description="Look up every row of a job file and write one output row per input row. "
        "Run it again with the same job and output to resume after a crash or a stop.",
        epilog="exit codes: 0 done; 3 done but some rows failed; 65 bad input, input changed "
        "or job locked; 66 input missing; 69 API endpoint unreachable past the outage budget "
        "(rows stay pending); 74 cannot write output; 75 stopped (signal or --no-wait), run "
        "again to resume; 77 a key was rejected (rows stay pending); 78 bad config",
    )
    run.add_argument("job", help="job file: .txt, .csv or .jsonl, optionally .gz")
    run.add_argument("--config", default="config.toml", help="config file (default: %(default)s)")
    run.add_argument("--out", help="output file (default: <output.directory>/<job name>.<format>)")
    run.add_argument(
        "--format",
        choices=("jsonl", "csv", "sqlite"),
        help="output format (default: output.format of the config)",
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
        "--no-wait",
        action="store_true",
        help="stop (exit 75, resumable) instead of waiting when every key's daily quota is spent",
    )
    run.add_argument("--encoding", default="utf-8", help="input encoding (default: %(default)s)")
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
        epilog="exit codes: 0 stopped by SIGTERM/SIGINT (the current job resumes at the next "
        "start); 69 the API endpoint stayed unreachable past the outage budget (the job stays in "
        "processing/); 74 cannot write the spool; 75 forced by a second signal (still "
        "resumable); "
        "77 every key was rejected (the job stays in processing/); 78 bad config, refused "
        "--host or port in use",
    )
    serve.add_argument("--spool", required=True, metavar="DIR", help="the spool directory")
    serve.add_argument("--config", default="config.toml", help="config file (default: %(default)s)")
    serve.add_argument(
        "--port",
        type=int,
        default=9464,
        help="port of /healthz, /readyz and /metrics; 0 picks a free one (default: %(default)s)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow binding a non-loopback address (the endpoints have no authentication)",
    )

    look = sub.add_parser(
        "lookup",
        help="look up ASINs and print the results as JSON lines",
        description="Look up ASINs (or Amazon product URLs); print one JSON "
        "object per ASIN on stdout.",
    )
    look.add_argument("asins", nargs="+", metavar="ASIN")
    look.add_argument("--config", default="config.toml", help="config file (default: %(default)s)")
    look.add_argument("--marketplace", help="marketplace (default: api.marketplace of the config)")

    bench = sub.add_parser(
        "bench",
        help="measure throughput against a rate-limited simulator in another process",
        description="Start the simulator in a child process with the chosen limits, latency "
        "and faults, stream unique ASINs through the broker for a while, and print requests/s, "
        "ASINs/s, the rate the server granted against the rate it allows, 429 share, retries, "
        "latency p50/p99, CPU per request and peak memory. Needs no config file.",
    )
    from broker.bench import add_arguments

    add_arguments(bench)

    check = sub.add_parser(
        "check-config",
        help="validate a config file",
        description="Validate a config file and print a summary (secrets "
        "masked); exit 78 naming the bad key path if it is invalid.",
    )
    check.add_argument("--config", default="config.toml", help="config file (default: %(default)s)")
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
        epilog="exit codes: 0 shown; 69 the state store ([state]) cannot be reached; 78 bad config",
    )
    add_arguments(status)


def _run_loop(coro: Coroutine[Any, Any, object]) -> int:
    """Run ``coro`` on uvloop when installed, else on the default asyncio loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop missing (Windows)
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(coro)
    return int(result) if isinstance(result, int) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    args = _build_parser().parse_args(argv)
    if args.command == "simulate":
        from broker.simulator.cli import simulate_command

        return simulate_command(args, run=_run_loop)
    if args.command == "bench":
        from broker.bench import bench_command

        return bench_command(args)
    from broker.config import BrokerConfig, load_config
    from broker.errors import ConfigError

    try:
        config: BrokerConfig = load_config(args.config)
    except ConfigError as exc:
        print(f"broker: invalid config {args.config}: {exc}", file=sys.stderr)
        return 78
    from broker.logs import configure_logging

    configure_logging(config.log.level, config.log.format)
    if args.command == "check-config":
        return _check_config(config)
    if args.command == "lookup":
        return _run_loop(_lookup(config, args.asins, args.marketplace))
    if args.command == "run":
        return _run_loop(_run(config, args))
    if args.command == "status":
        from broker.status import status_command

        return _run_loop(status_command(config, args))
    if args.command == "serve":
        from broker.jobs.serve import serve_command

        return serve_command(config, args, run=_run_loop)
    print(f"unknown command {args.command}", file=sys.stderr)  # pragma: no cover
    return 2


def _check_config(config: object) -> int:
    from broker.config import BrokerConfig

    assert isinstance(config, BrokerConfig)
    print(f"config ok: {config.source}")
    print(
        f"  api: {config.api.protocol.value} at {config.api.endpoint}, "
        f"marketplace {config.api.marketplace}"
    )
    for key in config.keys:
        secret = key.secret_source or "simulator demo secret"
        print(
            f"  key {key.name}: id {key.credential_id}, secret from {secret} (***), "
            f"{key.tps:g} TPS, {key.tpd or 'unlimited'} TPD, "
            f"marketplaces {', '.join(key.partner_tags)}"
        )
    return 0


async def _lookup(config: object, asins: Sequence[str], marketplace: str | None) -> int:
    import json

    from broker.config import BrokerConfig
    from broker.engine.broker import Broker
    from broker.errors import NoUsableKeyError

    assert isinstance(config, BrokerConfig)
    try:
        async with Broker(config) as broker:
            results = await broker.get_items(asins, marketplace=marketplace)
    except NoUsableKeyError as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return 77
    for result in results:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    return 0 if all(r.status.value != "failed" for r in results) else 3


async def _run(config: object, args: argparse.Namespace) -> int:
    from pathlib import Path

    from broker.config import BrokerConfig
    from broker.jobs.runner import JobOptions, describe_failure, run_job

    assert isinstance(config, BrokerConfig)
    job = Path(args.job)
    fmt = args.format or config.output.format
    suffix = {"jsonl": ".jsonl", "csv": ".csv", "sqlite": ".sqlite"}[fmt]
    stem = job.name.removesuffix(".gz").rsplit(".", 1)[0] or job.name
    out = Path(args.out) if args.out else Path(config.output.directory) / f"{stem}{suffix}"
    options = JobOptions(
        job=job,
        out=out,
        format=fmt,
        strict=args.strict,
        new_job=args.new_job,
        encoding=args.encoding,
        convert_isbn13=args.convert_isbn13,
        no_wait=args.no_wait,
        progress=args.progress,
    )
    try:
        summary = await run_job(config, options)
    except Exception as exc:
        code, message = describe_failure(exc)
        print(f"broker: {message}", file=sys.stderr)
        return code
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(summary.by_status.items())) or "no rows"
    print(f"rows: {summary.total} ({statuses}); pending {summary.pending}", file=sys.stderr)
    print(
        f"requests {summary.requests}, 429s {summary.throttled}, retries {summary.retries}, "
        f"{summary.wall_s:.1f} s",
        file=sys.stderr,
    )
    print(f"output: {summary.out}", file=sys.stderr)
    if summary.invalid_report:
        print(f"invalid rows: {summary.invalid_report}", file=sys.stderr)
    if summary.quota_wait_until:
        print(
            f"daily quota spent on every key until {summary.quota_wait_until}: "
            "run the same command again after that to resume",
            file=sys.stderr,
        )
    if summary.stopped_by_signal:
        print("stopped by signal: run the same command again to resume", file=sys.stderr)
    return summary.exit_code()
