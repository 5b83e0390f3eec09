"""Pacer precision in real time: achieved rate vs nominal for our Pacer and for aiolimiter.

One task sends as fast as each limiter lets it, for a few seconds per rate (and at least 20
intervals), stamping every send with ``loop.time()``. The first send is dropped (it goes at
once, while every later one comes from a timer), and achieved rate is
``(sends - 1) / (last - first)`` over the rest; the minimum gap
shows whether a limiter ever sends two requests closer than ``1/R``. The last case shows the
initial burst of ``AsyncLimiter(R, 1)``: sends in the first second.

Run: ``uv run python benchmarks/pacer_precision.py [--seconds 5]``. Prints a table to
stderr and one JSON line to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import platform
import sys
from collections.abc import Awaitable, Callable

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


async def _bench(seconds: float) -> dict[str, object]:
    results: dict[str, object] = {}
    for rate in RATES:
        # Long enough for 20 gaps at the slowest rate, so one late wake-up at the end of the
        # run moves the figure by well under 0.1 %.
        span = max(seconds, 21.0 / rate)
        results[f"pacer_r{rate:g}"] = _summary(await _pacer(rate, span), rate)
        results[f"aiolimiter_1_per_{1 / rate:g}s_r{rate:g}"] = _summary(
            await _aiolimiter(rate, span), rate
        )
    results["aiolimiter_r100_b100_first_second_sends"] = await _burst_first_second(100.0)
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="run time per rate")
    args = parser.parse_args(argv)
    results = asyncio.run(_bench(args.seconds))
    for name, value in results.items():
        print(f"{name:42} {value}", file=sys.stderr)
    line = {
        "benchmark": "pacer_precision",
        "python": platform.python_version(),
        "seconds_per_rate": args.seconds,
        "results": results,
    }
    print(json.dumps(line, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
