"""A daily re-run of a 10,000-ASIN list with 10 % new ASINs: GetItems requests and wall time saved.

Day 1 looks up the whole list through the broker against the simulator (in its own process),
with the item cache (SQLite, in a temporary directory) consulted first; day 2 looks up the
list again, 90 % the same ASINs and 10 % new ones, 23 hours later (the cache's wall clock is
moved forward; nothing sleeps), then once more without the cache, as the baseline. Requests
are counted by the simulator.

The cache is used *cache-aside* here: ``get_many`` for the day's queries, only the misses go
to ``Broker.get_items``, the answers go back with ``put_many``. That is the same split the
engine integration makes (only misses are batched), done at the caller's side because the
engine does not consult the cache yet; the figures measure the store and the real broker.

Two resource sets are run: content only (title, image link) and the default set, which
includes price and availability (``offersV2.*``): those answers are older than
``offers_max_age_s`` (1 h) on day 2, so they are all fetched again, as the policy says.

Run: ``uv run python benchmarks/cache_rerun.py [--quick] [--asins 10000] [--new 0.1] [--tps 50]``.
Prints a table to stderr and one JSON line to stdout, and writes
``benchmarks/results/cache_rerun.json`` (``cache_rerun-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import aiohttp
from _harness import (
    LATENCY,
    SimulatorProcess,
    add_output_arguments,
    asin_stream,
    broker_config,
    creators_account,
    machine_info,
    positive,
    print_table,
    quiet_logging,
    report,
    results_name,
    share,
    sim_stats,
    warn_if_busy,
)

from broker.cache import CachePolicy, SqliteCache
from broker.clock import LoopClock
from broker.config import DEFAULT_RESOURCES
from broker.engine.broker import Broker
from broker.models import ItemResult, Query

__all__ = ["main"]

CONTENT = ("itemInfo.title", "images.primary.medium")
RERUN_AFTER_S = 23 * 3600.0


class _ShiftedClock(LoopClock):
    """The real clock with wall time moved forward: "tomorrow" without waiting a day."""

    __slots__ = ("shift_s",)

    def __init__(self) -> None:
        self.shift_s = 0.0

    def utcnow(self) -> datetime:
        """Return real UTC time plus ``shift_s``."""
        return super().utcnow() + timedelta(seconds=self.shift_s)


async def _day(
    broker: Broker,
    cache: SqliteCache | None,
    session: aiohttp.ClientSession,
    url: str,
    asins: Sequence[str],
    resources: tuple[str, ...],
    marketplace: str,
) -> dict[str, object]:
    """Look up ``asins`` cache-aside; return requests, hits, statuses and times."""
    before = int((await sim_stats(session, url, timestamps=False))["requests"])
    queries = [Query(a, marketplace, resources) for a in asins]
    wall0 = time.perf_counter()
    cached = await cache.get_many(queries) if cache else [None] * len(queries)
    wall_get = time.perf_counter() - wall0
    misses = [q for q, hit in zip(queries, cached, strict=True) if hit is None]
    answers = await broker.get_items(misses) if misses else []
    # One result per distinct query, in order; the engine does not attach queries yet.
    fetched: list[ItemResult] = [
        dataclasses.replace(r, query=q) if r.query is None else r
        for r, q in zip(answers, misses, strict=True)
    ]
    wall_put0 = time.perf_counter()
    stored = await cache.put_many(fetched) if cache else 0
    wall_put = time.perf_counter() - wall_put0
    wall = time.perf_counter() - wall0
    after = int((await sim_stats(session, url, timestamps=False))["requests"])
    statuses: dict[str, int] = {}
    for result in fetched:
        statuses[result.status.value] = statuses.get(result.status.value, 0) + 1
    return {
        "asins": len(asins),
        "hits": len(asins) - len(misses),
        "requests": after - before,
        "wall_s": round(wall, 3),
        "cache_get_ms": round(1000 * wall_get, 1),
        "cache_put_ms": round(1000 * wall_put, 1),
        "stored": stored,
        "fetched_by_status": statuses,
    }


async def _scenario(
    name: str, resources: tuple[str, ...], url: str, args: argparse.Namespace, workdir: Path
) -> dict[str, object]:
    accounts = [creators_account(0, tps=args.tps)]
    config = broker_config(url, accounts, tps=args.tps, max_in_flight=8)
    marketplace = config.api.marketplace
    stream = asin_stream("C" if name == "content" else "D")
    day1 = [next(stream) for _ in range(args.asins)]
    new = round(args.asins * args.new)
    day2 = day1[new:] + [next(stream) for _ in range(new)]
    clock = _ShiftedClock()
    policy = CachePolicy(max_age_s=86_400, offers_max_age_s=3_600)
    async with (
        Broker(config) as broker,
        SqliteCache(workdir / f"{name}.sqlite3", policy, clock=clock) as cache,
        aiohttp.ClientSession() as session,
    ):
        first = await _day(broker, cache, session, url, day1, resources, marketplace)
        clock.shift_s = RERUN_AFTER_S
        second = await _day(broker, cache, session, url, day2, resources, marketplace)
        stats = (await cache.stats()).to_json()
        baseline = await _day(broker, None, session, url, day2, resources, marketplace)
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
        "cache": stats,
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
        for name, resources in (("content", CONTENT), ("with_offers", DEFAULT_RESOURCES)):
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
    parser.add_argument("--tps", type=positive(float), default=50.0, help="the simulated key's TPS")
    parser.add_argument(
        "--scenarios",
        default="content,with_offers",
        help="comma-separated: content, with_offers (default: both)",
    )
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    args.asins = args.asins or (1_000 if args.quick else 10_000)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    quiet_logging()
    warn_if_busy()
    scenarios = asyncio.run(_main(args))
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
                f"{second['cache_get_ms']} / {second['cache_put_ms']}",
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
            "get_many / put_many ms",
        ],
        rows,
    )
    result: dict[str, object] = {
        "benchmark": "cache_rerun",
        "asins": args.asins,
        "new_share": args.new,
        "tps": args.tps,
        "rerun_after_s": RERUN_AFTER_S,
        "integration": "cache-aside at the caller (engine integration not merged yet)",
        "scenarios": scenarios,
        "machine": machine_info(),
    }
    report(args, results_name("cache_rerun", args.quick), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
