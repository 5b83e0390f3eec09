"""Pacer precision in real time: achieved rate vs nominal for our Pacer and for aiolimiter.

One task sends as fast as each limiter lets it, for a few seconds per rate (and at least 20
intervals), stamping every send with ``loop.time()``. The first send is dropped (it goes at
once, while every later one comes from a timer), and achieved rate is
``(sends - 1) / (last - first)`` over the rest; the minimum gap
shows whether a limiter ever sends two requests closer than ``1/R``. The last case shows the
initial burst of ``AsyncLimiter(R, 1)``: sends in the first second.

Run: ``uv run python benchmarks/pacer_precision.py [--quick] [--seconds 5]``. Prints a table
to stderr and one JSON line to stdout, and writes ``benchmarks/results/pacer_precision.json``
(``pacer_precision-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
from collections.abc import Awaitable, Callable, Sequence

from _harness import (
    add_output_arguments,
    interruptible,
    machine_info,
    positive,
    print_table,
    rates,
    report,
    results_name,
    run_loop,
    warn_if_busy,
)
from aiolimiter import AsyncLimiter

from broker.clock import LoopClock
from broker.engine.limiter import Pacer

__all__ = ["main"]

RATES = (1.0, 10.0, 100.0)


async def _run(acquire: Callable[[], Awaitable[object]], seconds: float) -> list[float]:
    loop = asyncio.get_running_loop()
    stamps: list[float] = []
    end = loop.time() + seconds
    while True:
        await acquire()
        now = loop.time()
        if now > end:
            break
        stamps.append(now)
    return stamps[1:]


def _summary(stamps: list[float], rate: float) -> dict[str, float | int]:
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    span = stamps[-1] - stamps[0]
    achieved = (len(stamps) - 1) / span if span > 0 else float("nan")
    return {
        "sends": len(stamps),
        "achieved_pct": round(100.0 * achieved / rate, 3),
        "mean_gap_ms": round(1000.0 * span / len(gaps), 3) if gaps else float("nan"),
        "min_gap_ms": round(1000.0 * min(gaps), 3) if gaps else float("nan"),
    }


async def _pacer(rate: float, seconds: float) -> list[float]:
    pacer = Pacer(LoopClock(), rate)

    async def acquire() -> None:
        await pacer.wait_ready()
        pacer.commit()

    return await _run(acquire, seconds)


async def _aiolimiter(rate: float, seconds: float) -> list[float]:
    limiter = AsyncLimiter(1, 1.0 / rate)
    return await _run(limiter.acquire, seconds)


async def _burst_first_second(rate: float) -> int:
    limiter = AsyncLimiter(rate, 1)
    # _run drops the first send; it belongs to the burst, so count it back.
    return len(await _run(limiter.acquire, 1.0)) + 1


#: The longest one rate may run (its ``min_gaps + 2`` intervals), in seconds.
MAX_SPAN_S = 3600.0


def _intervals(min_gaps: int) -> int:
    """The intervals a run spans to measure ``min_gaps`` gaps: the first send is dropped
    (its start is the run's, not a gap's), and the one due at the run's very end lands
    just past it (a timer is never early), so two more than the gaps."""
    return min_gaps + 2


async def _bench(seconds: float, rates: Sequence[float], min_gaps: int) -> dict[str, object]:
    results: dict[str, object] = {}
    for rate in rates:
        # Long enough for 20 gaps at the slowest rate, so one late wake-up at the end of the
        # run moves the figure by well under 0.1 % (a quick run settles for 3).
        span = max(seconds, _intervals(min_gaps) / rate)
        results[f"pacer_r{rate:g}"] = _summary(await _pacer(rate, span), rate)
        results[f"aiolimiter_1_per_{1 / rate:g}s_r{rate:g}"] = _summary(
            await _aiolimiter(rate, span), rate
        )
    results["aiolimiter_r100_b100_first_second_sends"] = await _burst_first_second(100.0)
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="1 s per rate, at least 3 gaps (CI smoke)"
    )
    parser.add_argument("--seconds", type=positive(float), help="run time per rate (default 5)")
    parser.add_argument(
        "--rates",
        type=rates,
        default=list(RATES),
        help="rates per second to measure, e.g. 1,10,100 (the default)",
    )
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    min_gaps = 3 if args.quick else 20
    slowest = min(args.rates)
    if _intervals(min_gaps) / slowest > MAX_SPAN_S:
        # Each rate runs for at least min_gaps + 2 intervals: 1e-9 would run for 600 years.
        parser.error(
            f"--rates: {slowest:g}/s needs {_intervals(min_gaps) / slowest:,.0f} s for "
            f"{_intervals(min_gaps)} intervals; the slowest rate this measures is "
            f"{_intervals(min_gaps) / MAX_SPAN_S:g}/s"
        )
    warn_if_busy()
    results = run_loop("asyncio", _bench(seconds, args.rates, min_gaps))
    summaries = {name: value for name, value in results.items() if isinstance(value, dict)}
    if summaries:
        columns = list(next(iter(summaries.values())))
        rows = [[name, *(value.get(c) for c in columns)] for name, value in summaries.items()]
        print_table(["client", *columns], rows)
    for name, value in results.items():
        if not isinstance(value, dict):
            print(f"{name} {value}", file=sys.stderr)
    line = {
        "benchmark": "pacer_precision",
        "machine": machine_info(),
        "quick": args.quick,
        "seconds_per_rate": seconds,
        "min_gaps": min_gaps,
        "results": results,
    }
    report(args, results_name("pacer_precision", args.quick), line)
    return 0


if __name__ == "__main__":
    raise SystemExit(interruptible(main))
