"""Product cost: what the typed item costs when read, and what it costs when it is not.

Three figures per protocol, in microseconds of CPU per item (median of ``--repeat`` rounds):

- ``result_unread``: building an ``ItemResult`` as the engine does for every ASIN, with the
  (empty) slot that caches the typed item, next to ``result_before``, the same dataclass
  without that slot (a copy of ItemResult as it was): the price bulk jobs pay;
- ``first_read``: the first ``result.product`` (reading the raw JSON into a Product), for an
  item rendered with the config's default resources and with every item resource;
- ``cached_read``: any later ``result.product`` (the cached value);

and, for scale, ``json_parse``: ``json.loads`` of the same item's JSON text, a cost every
item already pays in the response parser.

Items come from the simulator's renderer (no network). Run:
``uv run python benchmarks/product_cost.py [--quick] [--items 2000] [--repeat 5]``.
Prints a table to stderr and one JSON line to stdout, and writes
``benchmarks/results/product_cost.json`` (``product_cost-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from _harness import (
    add_output_arguments,
    collector_paused,
    cpu_rounds_us,
    interruptible,
    machine_info,
    positive,
    print_table,
    report,
    results_name,
    warn_if_busy,
)

from broker.config import DEFAULT_RESOURCES
from broker.models import ErrorDetail, ItemResult, ItemSummary, Query, Status
from broker.simulator.render import CREATORS_ITEM_RESOURCES, PAAPI_ITEM_RESOURCES, render_item
from broker.simulator.settings import SimulatorSettings

MARKETPLACE = "www.amazon.com"


@dataclass(frozen=True, slots=True)
class _ResultBefore:
    """ItemResult's fields before the typed item: the baseline of ``result_before``."""

    asin: str
    marketplace: str
    status: Status
    item: Mapping[str, object] | None = None
    summary: ItemSummary | None = None
    error: ErrorDetail | None = None
    attempts: int = 0
    key: str | None = None
    fetched_at: datetime | None = field(default=None)
    query: Query | None = field(default=None, compare=False)
    cached: bool = False


def _items(count: int, protocol: str, resources: frozenset[str]) -> list[dict[str, object]]:
    settings = SimulatorSettings(missing_share=0.0, inaccessible_share=0.0)
    items = []
    for i in range(count):
        item = render_item(
            settings,
            MARKETPLACE,
            f"B{i + 1:09d}",
            resources=resources,
            partner_tag="demo-20",
            protocol=protocol,  # type: ignore[arg-type]
        )
        assert item is not None
        items.append(item)
    return items


def _per_item_us(run: Callable[[], object], count: int, repeat: int) -> float:
    """Median CPU microseconds per item of ``run`` (which handles ``count`` items)."""
    return round(statistics.median(cpu_rounds_us(run, count, repeat)), 3)


def measure(protocol: str, resources_name: str, count: int, repeat: int) -> dict[str, object]:
    """All figures for one protocol and one resource set."""
    if resources_name == "default":
        names: frozenset[str] = frozenset(DEFAULT_RESOURCES)
        if protocol == "paapi5":
            names = frozenset(".".join(p[:1].upper() + p[1:] for p in r.split(".")) for r in names)
    else:
        names = PAAPI_ITEM_RESOURCES if protocol == "paapi5" else CREATORS_ITEM_RESOURCES
    items = _items(count, protocol, names)
    texts = [json.dumps(item) for item in items]
    now = datetime.now()

    def build(kind: type[object]) -> Callable[[], list[object]]:
        def run() -> list[object]:
            return [
                kind(  # type: ignore[call-arg]
                    f"B{i + 1:09d}", MARKETPLACE, Status.OK, item, None, None, 1, "demo", now
                )
                for i, item in enumerate(items)
            ]

        return run

    results: list[ItemResult] = []

    def fresh() -> None:
        results[:] = [ItemResult("B000000001", MARKETPLACE, Status.OK, item=i) for i in items]

    def read_all() -> None:
        for result in results:
            _ = result.product

    first_rounds = []
    for _ in range(repeat):
        fresh()
        with collector_paused():  # as cpu_rounds_us times the other figures
            start = time.process_time()
            read_all()
            first_rounds.append((time.process_time() - start) / count * 1e6)
    return {
        "protocol": protocol,
        "resources": resources_name,
        "items": count,
        "item_json_bytes": round(statistics.mean(len(t) for t in texts)),
        "result_before_us": _per_item_us(build(_ResultBefore), count, repeat),
        "result_unread_us": _per_item_us(build(ItemResult), count, repeat),
        "first_read_us": round(statistics.median(first_rounds), 3),
        "cached_read_us": _per_item_us(read_all, count, repeat),
        "json_parse_us": _per_item_us(lambda: [json.loads(t) for t in texts], count, repeat),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few hundred items, 2 rounds")
    parser.add_argument("--items", type=positive(int), default=2000)
    parser.add_argument("--repeat", type=positive(int), default=5)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    warn_if_busy()
    count, repeat = (
        (min(args.items, 300), min(args.repeat, 2)) if args.quick else (args.items, args.repeat)
    )
    rows = [
        measure(protocol, resources, count, repeat)
        for protocol in ("creators", "paapi5")
        for resources in ("default", "all")
    ]
    print_table(
        ["protocol", "resources", "bytes", "before", "unread", "1st read", "cached", "json"],
        [
            [
                r["protocol"],
                r["resources"],
                r["item_json_bytes"],
                r["result_before_us"],
                r["result_unread_us"],
                r["first_read_us"],
                r["cached_read_us"],
                r["json_parse_us"],
            ]
            for r in rows
        ],
    )
    body: dict[str, object] = {
        "benchmark": "product_cost",
        "unit": "CPU microseconds per item (median of rounds)",
        "quick": args.quick,
        "rows": rows,
        "machine": machine_info(),
    }
    report(args, results_name("product_cost", args.quick), body)
    return 0


if __name__ == "__main__":
    raise SystemExit(interruptible(main))
