"""A daily re-run of a 10,000-ASIN list with 10 % new ASINs: GetItems requests and wall time saved.

Day 1 looks up the whole list through the broker against the simulator (in its own process),
with the item cache (SQLite, in a temporary directory) consulted first; day 2 looks up the
list again, 90 % the same ASINs and 10 % new ones, 23 hours later (the cache's wall clock is
moved forward; nothing sleeps), then once more without the cache, as the baseline. Requests
are counted by the simulator.

The cache is the engine's own (``[cache]``, SQLite): the broker reads it before batching
and writes every ok answer behind, as ``broker run`` and the library do. Each day is a
broker of its own (closed at the day's end, which writes the last answers), on a clock whose
wall time day 2 moves forward; the baseline is a broker with the cache off.

Two resource sets are run: content only (title, image link) and the default set, which
includes price and availability (``offersV2.*``): those answers are older than
``offers_max_age_s`` (1 h) on day 2, so they are all fetched again, as the policy says.

Run: ``uv run python benchmarks/cache_rerun.py [--quick] [--asins 10000] [--new 0.1] [--tps 50]``.
Prints a table to stderr and one JSON line to stdout, and writes
``benchmarks/results/cache_rerun.json`` (``cache_rerun-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from _harness import (
    LATENCY,
    MAX_TPS,
    MIN_TPS,
    SimulatorProcess,
    add_output_arguments,
    asin_stream,
    broker_config,
    creators_account,
    interruptible,
    machine_info,
    positive,
    print_table,
    quiet_logging,
    report,
    results_name,
    run_loop,
    share,
    sim_stats,
    warn_if_busy,
)

from broker.clock import LoopClock
from broker.config import DEFAULT_RESOURCES, BrokerConfig
from broker.engine.broker import Broker
from broker.models import Query

if TYPE_CHECKING:
    from broker.cache import CacheStats

__all__ = ["main"]

CONTENT = ("itemInfo.title", "images.primary.medium")
RERUN_AFTER_S = 23 * 3600.0
#: The resource sets run: content only, and the default set with prices.
SCENARIOS: dict[str, tuple[str, ...]] = {"content": CONTENT, "with_offers": DEFAULT_RESOURCES}


class _ShiftedClock(LoopClock):
    """The real clock with wall time moved forward: "tomorrow" without waiting a day."""

    __slots__ = ("shift_s",)

    def __init__(self) -> None:
        self.shift_s = 0.0

    def utcnow(self) -> datetime:
        """Return real UTC time plus ``shift_s``."""
        return super().utcnow() + timedelta(seconds=self.shift_s)


async def _day(
    config: BrokerConfig,
    clock: LoopClock,
    session: aiohttp.ClientSession,
    url: str,
    asins: Sequence[str],
    resources: tuple[str, ...],
) -> tuple[dict[str, object], CacheStats | None]:
    """Look up ``asins`` through a broker of ``config``; its figures and cache stats."""
    before = int((await sim_stats(session, url, timestamps=False))["requests"])
    queries = [Query(a, config.api.marketplace, resources) for a in asins]
    wall0 = time.perf_counter()
    async with Broker(config, clock=clock) as broker:
        answers = await broker.get_items(queries)
        stats = await broker.cache_stats()
    wall = time.perf_counter() - wall0
    after = int((await sim_stats(session, url, timestamps=False))["requests"])
    statuses: dict[str, int] = {}
    for result in answers:
        if not result.cached:
            statuses[result.status.value] = statuses.get(result.status.value, 0) + 1
    return {
        "asins": len(asins),
        "hits": sum(result.cached for result in answers),
        "requests": after - before,
        "wall_s": round(wall, 3),
        "fetched_by_status": statuses,
    }, stats


async def _scenario(
    name: str, resources: tuple[str, ...], url: str, args: argparse.Namespace, workdir: Path
) -> dict[str, object]:
    accounts = [creators_account(0, tps=args.tps)]
    plain = broker_config(url, accounts, tps=args.tps, max_in_flight=8)
    cached = dataclasses.replace(
        plain,
        cache=dataclasses.replace(
            plain.cache,
            backend="sqlite",
            path=str(workdir / f"{name}.sqlite3"),
            max_age_s=86_400.0,
            offers_max_age_s=3_600.0,
        ),
    )
    off = dataclasses.replace(plain, cache=dataclasses.replace(plain.cache, max_age_s=0.0))
    stream = asin_stream("C" if name == "content" else "D")
    day1 = [next(stream) for _ in range(args.asins)]
    new = round(args.asins * args.new)
    day2 = day1[new:] + [next(stream) for _ in range(new)]
    clock = _ShiftedClock()
    async with aiohttp.ClientSession() as session:
        first, _ = await _day(cached, clock, session, url, day1, resources)
        clock.shift_s = RERUN_AFTER_S
        second, stats = await _day(cached, clock, session, url, day2, resources)
        baseline, _ = await _day(off, clock, session, url, day2, resources)
    cold = int(baseline["requests"])  # type: ignore[call-overload]
    warm = int(second["requests"])  # type: ignore[call-overload]
    # With no hit the two runs' counts differ only by how batches happened to fill: noise,
    # not requests the cache saved.
    saved = cold - warm if second["hits"] else 0
    return {
        "resources": list(resources),
        "day1_fills_cache": first,
        "day2_rerun": second,
        "day2_no_cache": baseline,
        "requests_saved": saved,
        "requests_saved_pct": round(100.0 * saved / cold, 1) if cold else None,
        "cache": stats.to_json() if stats is not None else None,
    }


async def _main(args: argparse.Namespace) -> dict[str, object]:
    settings = {
        "seed": 7,
        "limits": True,
        "demo_accounts": False,
        "latency": LATENCY,
        "accounts": [creators_account(0, tps=args.tps)],
    }
    scenarios: dict[str, object] = {}
    with SimulatorProcess(settings) as sim, tempfile.TemporaryDirectory() as tmp:
        for name, resources in SCENARIOS.items():
            if name in args.scenarios:
                scenarios[name] = await _scenario(name, resources, sim.url, args, Path(tmp))
    return scenarios


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 ASINs instead of 10,000")
    parser.add_argument(
        "--asins", type=positive(int), help="ASINs in the list (default 10000; quick 1000)"
    )
    parser.add_argument("--new", type=share, default=0.1, help="share of new ASINs on day 2")
    parser.add_argument(
        "--tps",
        type=positive(float, least=MIN_TPS, most=MAX_TPS),
        default=50.0,
        help="the key's TPS",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="comma-separated: content, with_offers (default: both)",
    )
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    args.asins = args.asins or (1_000 if args.quick else 10_000)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(args.scenarios) - set(SCENARIOS))
    if unknown or not args.scenarios:
        parser.error(
            f"--scenarios: {', '.join(unknown) or 'none given'}; choose from "
            + ", ".join(SCENARIOS)
        )
    quiet_logging()
    warn_if_busy()
    scenarios = run_loop("asyncio", _main(args))
    rows = []
    for name, body in scenarios.items():
        assert isinstance(body, dict)
        first, second = body["day1_fills_cache"], body["day2_rerun"]
        baseline = body["day2_no_cache"]
        rows.append(
            [
                name,
                args.asins,
                first["requests"],
                second["hits"],
                f"{second['requests']} / {second['wall_s']:.1f} s",
                f"{baseline['requests']} / {baseline['wall_s']:.1f} s",
                f"{body['requests_saved']} ({body['requests_saved_pct']} %)",
            ]
        )
    print_table(
        [
            "resources",
            "ASINs",
            "day 1 requests",
            "day 2 hits",
            "day 2 cached: requests / wall",
            "day 2 no cache: requests / wall",
            "saved",
        ],
        rows,
    )
    result: dict[str, object] = {
        "benchmark": "cache_rerun",
        "asins": args.asins,
        "new_share": args.new,
        "tps": args.tps,
        "rerun_after_s": RERUN_AFTER_S,
        "integration": "the engine's own cache ([cache], SQLite), a broker per day",
        "scenarios": scenarios,
        "machine": machine_info(),
    }
    report(args, results_name("cache_rerun", args.quick), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(interruptible(main))
