"""Shared plumbing of the benchmarks: output, machine facts, and re-exports from the package.

The simulator process (:class:`broker.simulator.process.SimulatorProcess`), the account and
config builders and the ASIN generator live in the package (``broker/bench.py``), because
``broker bench`` uses them too; the scripts here import them from this module so that each
script has one import block.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from broker import bench
from broker.bench import (
    MARKETPLACE,
    asin_stream,
    backlog,
    creators_account,
    floor_rate,
    format_table,
    loop_factory,
    paapi_account,
)
from broker.config import MAX_IN_FLIGHT, MAX_TPS
from broker.models import ItemResult, Query, Status
from broker.simulator.process import SimulatorProcess, sim_control, sim_stats, toml_document
from broker.simulator.settings import MIN_ACCOUNT_TPS

if TYPE_CHECKING:
    from broker.api.base import ParsedItems
    from broker.client import Broker
    from broker.config import BrokerConfig

__all__ = [
    "LATENCY",
    "MARKETPLACE",
    "MAX_IN_FLIGHT",
    "MAX_TPS",
    "MIN_TPS",
    "REPO_ROOT",
    "RESULTS_DIR",
    "Sample",
    "SimulatorProcess",
    "add_output_arguments",
    "asin_stream",
    "backlog",
    "broker_config",
    "creators_account",
    "floor_rate",
    "floor_results",
    "interruptible",
    "loop_factory",
    "machine_info",
    "measure_stream",
    "median_of",
    "one_key_config",
    "paapi_account",
    "print_table",
    "quiet_logging",
    "results_name",
    "rotated",
    "run_loop",
    "run_sample",
    "sim_control",
    "sim_stats",
    "start_clock",
    "toml_document",
    "warn_if_busy",
    "write_results",
]

#: Internet-like latency, each way: drawn before the quota check and again after it, so
#: arrivals at the server's bucket are jittered as they are over a real network.
LATENCY = {"fixed_ms": 40.0, "exp_mean_ms": 10.0}
REPO_ROOT = Path(__file__).resolve().parent.parent
#: The least TPS the simulator's accounts take (the config's most is MAX_TPS).
MIN_TPS = MIN_ACCOUNT_TPS
RESULTS_DIR = Path(__file__).resolve().parent / "results"

_T = TypeVar("_T")


@functools.cache
def _state_dir() -> tempfile.TemporaryDirectory[str]:
    """The keys' SQLite state of this benchmark process, removed when it exits: the
    simulator's port, and so its keys, are new each run, and the machine's file would keep
    their rows. Made at the first config, not at import: a process that imports this module
    only (the peer's child, killed at the end) would leave it behind."""
    return tempfile.TemporaryDirectory(prefix="asinb-benchmark-")


def broker_config(
    url: str, accounts: Sequence[Mapping[str, object]], **options: Any
) -> BrokerConfig:
    """:func:`broker.bench.broker_config`, with the keys' state in this process's own file
    unless ``state_path`` names one."""
    if "state_path" not in options:  # not setdefault: its default would make the folder
        options["state_path"] = Path(_state_dir().name) / "keys.sqlite3"
    return bench.broker_config(url, accounts, **options)


def one_key_config(
    url: str, account: Mapping[str, object], secret_env: str, *, tps: float
) -> list[str]:
    """The ``[api]`` and ``[[keys]]`` lines of a config.toml for one Creators key of the
    simulator at ``url``, its secret in the variable ``secret_env`` (never the file), as a
    broker child process (``broker run``, ``broker serve``) reads them; ``tpd = 0``."""
    tags = account["partner_tags"]
    assert isinstance(tags, Mapping)
    return [
        "[api]",
        'protocol = "creators"',
        f"endpoint = {json.dumps(url)}",
        f"marketplace = {json.dumps(MARKETPLACE)}",
        "",
        "[[keys]]",
        'name = "k0"',
        f"credential_id = {json.dumps(str(account['credential_id']))}",
        f"credential_secret_env = {json.dumps(secret_env)}",
        f"version = {json.dumps(str(account['version']))}",
        f"partner_tags = {{ {json.dumps(MARKETPLACE)} = {json.dumps(str(tags[MARKETPLACE]))} }}",
        f"tps = {tps!r}",
        "tpd = 0",
    ]


def interruptible(main: Callable[[], int]) -> int:
    """Run a script's ``main``: Ctrl-C, SIGTERM and SIGHUP end it with one line on stderr
    and 128 + the signal's number, after its cleanup, instead of a traceback (Ctrl-C) or an
    exit that leaves children and temporary files behind (SIGTERM, a closed terminal).

    ``broker bench``'s stop policy (:func:`broker.bench.stop_signals`); a script's event
    loops run through :func:`run_loop`, which hears the signals on the loop itself.
    """
    try:
        with bench.stop_signals():
            return main()
    except bench.Stopped as stop:
        print(f"stopped by {stop.sig.name}: no figures written", file=sys.stderr)
        return bench.STOPPED_CODE[stop.sig]


def run_loop(loop: str, run: Coroutine[Any, Any, _T]) -> _T:
    """``run`` in a fresh ``"uvloop"`` or ``"asyncio"`` loop, stopped by a stop signal.

    A Python handler that raises inside a running loop is not propagated (uvloop prints
    the exception and runs on), so the loop's own handlers cancel the run instead; see
    :func:`broker.bench.run_stoppable`.
    """
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return bench.run_stoppable(runner, run)


# -- running and reporting ------------------------------------------------------------------------


def quiet_logging() -> None:
    """Broker logs at warning and above, to stderr: stdout carries only the JSON line."""
    from broker.logs import configure_logging

    configure_logging("warning", "console", stream=sys.stderr)


def _package(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def machine_info() -> dict[str, object]:
    """Where and when the figures were measured."""
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "aiohttp": _package("aiohttp"),
        "uvloop": _package("uvloop"),
        "asin_broker": _package("asin-broker"),
        # Other work on the machine skews CPU and timer figures: keep the evidence.
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def warn_if_busy() -> None:
    """Say so on stderr when other work is running: it skews CPU and timer figures."""
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    if load > 0.5 * cpus:
        print(
            f"warning: load average {load:.2f} on {cpus} CPUs; other work on this machine "
            "will skew the figures",
            file=sys.stderr,
        )


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain aligned table on stderr."""
    print(format_table(headers, rows), file=sys.stderr)


#: int or float, for :func:`positive`.
_N = TypeVar("_N", int, float)


def positive(
    kind: Callable[[str], _N], *, least: float | None = None, most: float = math.inf
) -> Callable[[str], _N]:
    """An argparse ``type``: ``kind`` (int or float) of the text, refused unless finite and
    above 0 (a window, a count: 0 is no run at all, never "the default"), and within
    ``least``..``most`` (the config's own bounds, refused at start, not minutes into a run)."""

    def read(text: str) -> _N:
        value = kind(text)
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        if least is not None and value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least:g}, got {text}")
        if value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most:g}, got {text}")
        return value

    read.__name__ = kind.__name__
    return read


def non_negative(text: str) -> float:
    """An argparse ``type``: seconds of a warm-up, 0 allowed (no warm-up), never negative."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def share(text: str) -> float:
    """An argparse ``type``: a share of rows or ASINs, from 0 up to (not including) 1."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be from 0 up to 1 (not included), got {text}")
    return value


def rates(text: str) -> list[float]:
    """An argparse ``type``: comma-separated rates per second, each finite and above 0."""
    read = positive(float)
    return [read(part) for part in text.split(",")]


def _results_dir(text: str) -> Path:
    """An argparse ``type``: a directory for results, refused at once if something else is
    there or a file stands where a directory of its path must be (a run of minutes ended in
    a traceback when it came to write)."""
    path = Path(text)
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                raise argparse.ArgumentTypeError(f"{place} is not a directory")
            break
    return path


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--no-write`` and ``--results-dir``, the same in every script."""
    parser.add_argument("--no-write", action="store_true", help="do not write results files")
    parser.add_argument(
        "--results-dir",
        type=_results_dir,
        default=RESULTS_DIR,
        help="where results files go (default: benchmarks/results; tests pass a tmp dir)",
    )


def results_name(name: str, quick: bool) -> str:
    """``<name>`` or ``<name>-quick``: a smoke run never replaces the figures the README quotes."""
    return f"{name}-quick" if quick else name


def rotated(order: Sequence[str], round_no: int) -> list[str]:
    """``order`` for round ``round_no``, rotated so that no variant always runs first."""
    shift = round_no % len(order)
    return [*order[shift:], *order[:shift]]


def write_results(name: str, data: Mapping[str, object], directory: Path = RESULTS_DIR) -> Path:
    """Write ``<directory>/<name>.json`` (pretty) and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def report(args: argparse.Namespace, name: str, data: Mapping[str, object]) -> None:
    """Print ``data`` as the one JSON line on stdout and write it as ``<name>.json``.

    Nothing is written with ``--no-write``; ``args`` carries :func:`add_output_arguments`.
    """
    print(json.dumps(data, sort_keys=True))
    if not args.no_write:
        write_results(name, data, args.results_dir)


# -- CPU samples and the floor ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One measured run of one client: its requests, items, CPU and wall time, failures."""

    requests: int
    items: int
    cpu_s: float
    wall_s: float
    failed: int

    @property
    def cpu_us_per_request(self) -> float:
        return 1e6 * self.cpu_s / self.requests

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s


def run_sample(loop: str, factory: Callable[[], Coroutine[Any, Any, Sample]]) -> Sample:
    """Run one measured client in a fresh ``"uvloop"`` or ``"asyncio"`` loop.

    A fresh loop per sample: nothing one client left behind (tasks, sockets, caches of the
    loop) runs during another's measurement.
    """
    return run_loop(loop, factory())


def median_of(samples: Sequence[Sample]) -> dict[str, Any]:
    """The rounds of one client: medians of CPU per request and rates, and every sample."""
    cpu = [s.cpu_us_per_request for s in samples]
    return {
        "cpu_us_per_request": round(statistics.median(cpu), 1),
        "cpu_us_per_request_samples": [round(c, 1) for c in cpu],
        "requests_per_s": round(statistics.median(s.requests_per_s for s in samples), 1),
        "items_per_s": round(statistics.median(s.items / s.wall_s for s in samples), 1),
        "requests": samples[0].requests,
        "failed": sum(s.failed for s in samples),
        "samples": [asdict(s) for s in samples],
    }


def cpu_rounds_us(run: Callable[[], object], count: int, repeat: int) -> list[float]:
    """CPU microseconds per item of each of ``repeat`` rounds of ``run`` (which handles
    ``count`` items), process time: a figure with no network in it.

    Each round runs with the cyclic garbage collector off, after a collection: its passes
    over what the rounds keep alive grow with ``count`` and were charged to whichever round
    set them off (``json.loads`` of 1,000 items: 88 µs an item with them, 45 without).
    """
    rounds = []
    for _ in range(repeat):
        with collector_paused():
            start = time.process_time()
            run()
            rounds.append((time.process_time() - start) / count * 1e6)
    return rounds


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Collect, then keep the cyclic garbage collector off for the block (on again after,
    if it was)."""
    gc.collect()
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def start_clock() -> tuple[float, float]:
    """Collect the set-up's garbage, then read the CPU and wall clocks: a sample's start.

    Without the collection a sample would pay for what the set-up (or the sample before it)
    left to the interpreter's cyclic garbage collector, and its figure would depend on that.
    """
    gc.collect()
    return time.process_time(), time.perf_counter()


async def measure_stream(broker: Broker, asins: Iterable[str]) -> Sample:
    """Stream ``asins`` through the open ``broker``, timed: requests sent, results, failures.

    CPU and wall time cover the stream only; a result that is not ``ok`` counts as failed.
    """
    sent_before = broker.metrics().requests
    items = failed = 0
    cpu0, wall0 = start_clock()
    async for result in broker.stream(asins):
        items += 1
        if result.status is not Status.OK:
            failed += 1
    cpu1, wall1 = time.process_time(), time.perf_counter()
    sent = broker.metrics().requests - sent_before
    return Sample(sent, items, cpu1 - cpu0, wall1 - wall0, failed)


def floor_results(
    parsed: ParsedItems, marketplace: str, resources: tuple[str, ...], key: str
) -> list[ItemResult]:
    """One result per ASIN of a parsed answer, as the engine builds them, each with its query.

    The least any client that keeps the broker's result contract does with an answer: the
    floor that ``overhead.py`` and ``engine_cost.py`` measure the engine against.
    """
    fetched_at = dt.datetime.now(dt.UTC)
    return [
        ItemResult(
            asin,
            marketplace,
            outcome.status,
            outcome.item,
            outcome.summary,
            outcome.error,
            1,
            key,
            fetched_at,
            Query(asin, marketplace, resources),
        )
        for asin, outcome in parsed.outcomes.items()
    ]
