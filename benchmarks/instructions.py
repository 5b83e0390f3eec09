"""Instructions per GetItems request of the engine and of the floor, counted by valgrind.

CPU time on a shared machine moves by a fifth or more between two runs of the same code
(``engine_cost.py``'s rounds range 540-990 µs for one client in one session), which hides
any change worth less than that. The number of machine instructions a run executes does
not move: this script counts them with valgrind's callgrind tool (``--cache-sim=no``), for
the two clients of ``engine_cost.py`` that matter for the CPU target:

- ``engine-10``: ``Broker.stream`` over unique ASINs, 10 a request, one key at
  ``tps = 1000``, its state in memory, every answer a prepared body of the simulator's
  rendering (a mock transport);
- ``floor``: the same bodies through the dialect's ``parse_get_items`` and one
  :class:`~broker.models.ItemResult` per ASIN.

Each client runs with ``--small`` and ``--large`` requests, each run a fresh ``python``
under valgrind that reads answers this script rendered beforehand (so rendering is not
counted); the difference of the two totals over the difference of requests is the count
per request, with the interpreter's start, the imports and the warm-up cancelled out.
``PYTHONHASHSEED`` is fixed; each count is run ``--repeat`` times and the smallest kept
(two runs of one count agree to about 0.05 %, but one engine run of about fifteen, on a
busy machine, counted a third more: the engine runs on the real clock, slowed about fifty
times under valgrind, so it is not a fixed program, and extra work only ever adds). Slowed
so, the pacer's slots are always past: the count leaves out its sleeps and wake-ups.
A change to the engine shows as a change in ``engine-10``; instructions are not time
(cache misses and the kernel are not in them), so the figure is for comparing two versions
of the code, and ``overhead.py`` stays the measure of the CPU target.

Run: ``uv run python benchmarks/instructions.py [--quick]`` (needs ``valgrind`` on the
PATH: ``apt-get install valgrind``; about 2 minutes on 2 cores, ``--quick`` a little less).
Prints a table to stderr and one JSON line to stdout, and writes
``benchmarks/results/instructions.json`` (``instructions-quick.json`` with ``--quick``).
``--child`` is the run under valgrind (``--no-valgrind`` runs the same in-process, for a
smoke test on a machine without valgrind; it counts nothing).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from _harness import (
    add_output_arguments,
    interruptible,
    machine_info,
    positive,
    print_table,
    quiet_logging,
    report,
    results_name,
    run_sample,
    warn_if_busy,
)
from engine_cost import ITEMS_PER_REQUEST, Answers, _engine, _floor, batches, warm_count

__all__ = ["main"]

CLIENTS = ("engine-10", "floor")
#: The ASIN prefix of every run: the parent renders exactly what the children ask.
PREFIX = "IC"
CONCURRENCY = 16
_COLLECTED = re.compile(r"Collected : (\d+)")


def _prepare(answers: Answers, requests: int) -> None:
    """Render what ``engine-10`` and ``floor`` will ask in a run of ``requests``."""
    warm, timed = batches(PREFIX, requests, ITEMS_PER_REQUEST)
    answers.prepare(warm + timed)


def _child(client: str, requests: int, answers_path: Path) -> int:
    """One measured run on prepared answers; prints its requests, failures and misses."""
    quiet_logging()
    answers = Answers()
    answers.load(answers_path)
    if client == "engine-10":
        run = functools.partial(
            _engine,
            answers,
            batch_size=ITEMS_PER_REQUEST,
            requests=requests,
            concurrency=CONCURRENCY,
            prefix=PREFIX,
        )
    else:
        run = functools.partial(_floor, answers, requests=requests, prefix=PREFIX)
    sample = run_sample("uvloop", run)
    line = {"requests": sample.requests, "failed": sample.failed, "unprepared": answers.unprepared}
    print(json.dumps(line, sort_keys=True))
    return 0


@dataclass(frozen=True, slots=True)
class Count:
    """One child run: its requests, failures, answers not prepared, instructions executed."""

    client: str
    requests: int
    failed: int
    unprepared: int
    #: None when the run was not under valgrind
    instructions: int | None


class _Children:
    """The children running now, so a Ctrl-C stops them instead of waiting a minute or
    more for every counted run queued behind them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen[str]] = set()
        self.stopping = False

    def stop(self) -> None:
        """Start no more children and end those running."""
        with self.lock:
            self.stopping = True
            for child in self.running:
                child.kill()


_CHILDREN = _Children()


def _counted(client: str, requests: int, answers_path: Path, valgrind: str | None) -> Count:
    """Run one child, under valgrind unless ``valgrind`` is None, and read what it did."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        client,
        "--requests",
        str(requests),
        "--answers",
        str(answers_path),
    ]
    if valgrind is not None:
        command = [
            valgrind,
            "--tool=callgrind",
            "--cache-sim=no",
            "--callgrind-out-file=/dev/null",
            *command,
        ]
    with _CHILDREN.lock:
        if _CHILDREN.stopping:
            raise RuntimeError("stopped before it started")
        child = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        _CHILDREN.running.add(child)
    try:
        stdout, stderr = child.communicate()
    finally:
        with _CHILDREN.lock:
            _CHILDREN.running.discard(child)
    if child.returncode != 0:
        raise RuntimeError(
            f"{client}, {requests} requests: exit {child.returncode}\n{stderr[-3000:]}"
        )
    line = json.loads(stdout.strip().splitlines()[-1])
    found = _COLLECTED.search(stderr)
    return Count(
        client,
        line["requests"],
        line["failed"],
        line["unprepared"],
        int(found.group(1)) if found else None,
    )


def _fewest(runs: list[Count]) -> int | None:
    """The smallest count of repeated runs (None if nothing was counted).

    The engine's runs repeat their count to within a few in a million, but one run in
    several, on a busy machine, has counted hundreds of millions more (the engine on a real
    clock, slowed fifty times by valgrind, is not a fixed program); extra work only ever
    adds, so the smallest is the program's own.
    """
    counted = [c.instructions for c in runs if c.instructions is not None]
    return min(counted) if counted else None


def main(argv: list[str] | None = None) -> int:
    """Count the instructions and print the figures (or, with ``--child``, be one run)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 and 200 requests (CI smoke)")
    parser.add_argument(
        "--small", type=positive(int), help="requests of the smaller run (default 200)"
    )
    parser.add_argument(
        "--large", type=positive(int), help="requests of the larger run (default 400)"
    )
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs of each count; the smallest is kept (2)"
    )
    parser.add_argument(
        "--no-valgrind",
        action="store_true",
        help="run the children without valgrind (a smoke test: nothing is counted, nothing "
        "written)",
    )
    parser.add_argument("--child", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--answers", type=Path, help=argparse.SUPPRESS)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.child is not None:
        return _child(args.child, args.requests, args.answers)
    small = args.small or (100 if args.quick else 200)
    large = args.large or (200 if args.quick else 400)
    if not 0 < small < large:
        parser.error("--small must be positive and below --large")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if warm_count(small) != warm_count(large):
        parser.error(
            f"--small {small} and --large {large} warm up differently; keep both below 420"
        )
    valgrind = None if args.no_valgrind else shutil.which("valgrind")
    if valgrind is None and not args.no_valgrind:
        print(
            "error: valgrind is not on the PATH (apt-get install valgrind), or pass "
            "--no-valgrind for a run that counts nothing",
            file=sys.stderr,
        )
        return 69
    if valgrind is None:
        # Nothing is counted: its file would replace the figures the README quotes.
        args.no_write = True
    warn_if_busy()

    started = time.perf_counter()
    counts: dict[tuple[str, int], list[Count]] = {}
    with tempfile.TemporaryDirectory(prefix="instructions-") as tmp:
        paths = {}
        for size in (small, large):
            answers = Answers()
            _prepare(answers, size)
            paths[size] = Path(tmp) / f"answers-{size}.pickle"
            answers.save(paths[size])
        runs = list(itertools.product(CLIENTS, (small, large), range(args.repeat)))
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
        try:
            futures = [
                (run, pool.submit(_counted, run[0], run[1], paths[run[1]], valgrind))
                for run in runs
            ]
            for (client, size, _), future in futures:
                counts.setdefault((client, size), []).append(future.result())
        except BaseException:
            _CHILDREN.stop()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown()

    results: dict[str, dict[str, object]] = {}
    slopes: dict[str, int | None] = {}
    rows: list[list[object]] = []
    for client in CLIENTS:
        low, high = _fewest(counts[(client, small)]), _fewest(counts[(client, large)])
        slope = None if low is None or high is None else round((high - low) / (large - small))
        both = counts[(client, small)] + counts[(client, large)]
        failed = sum(c.failed for c in both)
        slopes[client] = slope
        rows.append([client, slope, low, high, failed])
        results[client] = {
            "instructions_per_request": slope,
            "instructions": {str(small): low, str(large): high},
            "instructions_runs": {
                str(size): [c.instructions for c in counts[(client, size)]]
                for size in (small, large)
            },
            "failed": failed,
            "unprepared": sum(c.unprepared for c in both),
        }
    engine, floor = slopes["engine-10"], slopes["floor"]
    ratio = round(engine / floor, 2) if engine is not None and floor else None
    print_table(
        ["client", "instructions/request", f"total at {small}", f"total at {large}", "failed"],
        rows,
    )
    print(
        "engine-10 / floor " + (f"{ratio}x" if ratio is not None else "n/a (nothing counted)"),
        file=sys.stderr,
    )
    line = {
        "benchmark": "instructions",
        "machine": machine_info(),
        "settings": {
            "quick": args.quick,
            "small": small,
            "large": large,
            "valgrind": valgrind is not None,
            "repeat": args.repeat,
            "concurrency": CONCURRENCY,
            "loop": "uvloop",
            "protocol": "creators",
            "state": "memory",
        },
        "results": results,
        "engine_10_to_floor": ratio,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    report(args, results_name("instructions", args.quick), line)
    return 0


if __name__ == "__main__":
    raise SystemExit(interruptible(main))
