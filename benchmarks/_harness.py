"""Shared plumbing of the benchmarks: output, machine facts, and re-exports from the package.

The simulator process (:class:`broker.simulator.process.SimulatorProcess`), the account and
config builders and the ASIN generator live in the package (``broker/bench.py``), because
``broker bench`` uses them too; the scripts here import them from this module so that each
script has one import block.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from broker.bench import (
    MARKETPLACE,
    asin_stream,
    broker_config,
    creators_account,
    loop_factory,
    paapi_account,
)
from broker.simulator.process import SimulatorProcess, sim_control, sim_stats, toml_document

__all__ = [
    "MARKETPLACE",
    "REPO_ROOT",
    "RESULTS_DIR",
    "SimulatorProcess",
    "asin_stream",
    "broker_config",
    "creators_account",
    "loop_factory",
    "machine_info",
    "paapi_account",
    "print_table",
    "quiet_logging",
    "sim_control",
    "sim_stats",
    "toml_document",
    "warn_if_busy",
    "write_results",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


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
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for number, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)), file=sys.stderr)
        if number == 0:
            print("  ".join("-" * w for w in widths), file=sys.stderr)


def write_results(name: str, data: Mapping[str, object]) -> Path:
    """Write ``benchmarks/results/<name>.json`` (pretty) and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
