"""Loop stall: the longest the event loop goes without a turn while ``broker run`` works a big job.

A daemon's ``/healthz``, ``/readyz`` and ``/metrics`` and a run's signal handlers are event-loop
callbacks: work over every row of a job done on the loop holds them all. This script runs a
job in-process (``run_job``, the embedded simulator, the shipped ``config.toml``) beside a
ticker that sleeps 10 ms at a time, and reports the longest gap between two ticks and how
many exceeded half a second. Two jobs, each made before the clock starts:

- ``final``: ``--rows`` rows of which all but one in 10,000 are invalid at ingestion (978
  ISBN-13s, no ``--convert-isbn13``): their output rows are written at the job's start;
- ``ordered``: the same job again from scratch with ``--ordered``, whose export reads every
  row once the fetch ends, and whose invalid-rows report does too.

Gaps are wall time, so a busy machine lengthens them; compare two versions of the code on
one machine. The item cache is off, so every valid row is fetched (at the demo key's rate,
a few requests), and the key's state is kept in memory.

Run: ``uv run python benchmarks/loop_stall.py [--quick] [--rows 200000]``.
Prints a table to stderr and one JSON line to stdout, and writes
``benchmarks/results/loop_stall.json`` (``loop_stall-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import replace
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
    run_loop,
    warn_if_busy,
)

from broker.config import load_config
from broker.jobs.runner import JobOptions, run_job

__all__ = ["main"]

REPO = Path(__file__).resolve().parent.parent
#: How often the ticker asks for a turn, seconds.
TICK_S = 0.01
#: A gap at least this long counts as a stall (a liveness probe's usual timeout is 1 s).
STALL_S = 0.5


def write_job(path: Path, rows: int) -> None:
    """``rows`` ids, all but one in 10,000 an ISBN-13 (invalid without the conversion)."""
    with path.open("w", encoding="utf-8") as job:
        for i in range(rows):
            job.write(f"B{i:09d}\n" if i % 10_000 == 0 else f"978{i:010d}\n")


async def _measure(job: Path, out: Path, *, ordered: bool) -> dict[str, object]:
    config = load_config(REPO / "config.toml")
    # Key state in this process: nothing left in the user's state directory.
    config = replace(config, state=replace(config.state, backend="memory"))
    gaps: list[float] = []

    async def tick() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(TICK_S)
            now = time.perf_counter()
            gaps.append(now - last - TICK_S)
            last = now

    ticker = asyncio.ensure_future(tick())
    started = time.perf_counter()
    options = JobOptions(
        job=job,
        out=out,
        format="jsonl",
        progress="none",
        handle_signals=False,
        ordered=ordered,
        cache_max_age_s=0,
    )
    try:
        summary = await run_job(config, options)
    finally:
        ticker.cancel()
    return {
        "rows": summary.total,
        "wall_s": round(time.perf_counter() - started, 2),
        "max_gap_s": round(max(gaps, default=0.0), 3),
        "stalls": sum(gap >= STALL_S for gap in gaps),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the two jobs and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 rows (CI smoke)")
    parser.add_argument("--rows", type=positive(int), help="rows per job (default 200000)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    rows = args.rows or (20_000 if args.quick else 200_000)
    quiet_logging()
    warn_if_busy()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        job = folder / "job.txt"
        write_job(job, rows)
        for name, ordered in (("final", False), ("ordered", True)):
            results[name] = run_loop(
                "asyncio", _measure(job, folder / f"{name}.jsonl", ordered=ordered)
            )
    print_table(
        ["job", "rows", "wall s", "max gap s", f"gaps >= {STALL_S} s"],
        [
            [name, r["rows"], r["wall_s"], r["max_gap_s"], r["stalls"]]  # type: ignore[index]
            for name, r in results.items()
        ],
    )
    report(
        args,
        results_name("loop_stall", args.quick),
        {
            "benchmark": "loop_stall",
            "machine": machine_info(),
            "settings": {"rows": rows, "quick": args.quick, "tick_s": TICK_S},
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(interruptible(main))
