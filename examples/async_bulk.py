"""Look up a whole list of ASINs with the async Broker and report what came back.

Run from the project root (the default config.toml uses the embedded simulator):

    uv run python examples/async_bulk.py [--config config.toml] [examples/asins.txt]

Every input gets exactly one result: ``ok`` results carry the typed ``product``; the others
carry an ``error`` with Amazon's code and a remedy. Nothing here raises for a bad ASIN.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
from pathlib import Path

from broker import Broker

ROOT = Path(__file__).resolve().parent.parent


def read_asins(path: Path) -> list[str]:
    """The non-comment lines of a job file (ASINs or product URLs)."""
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


async def main(config: Path, job: Path) -> None:
    asins = read_asins(job)
    statuses: Counter[str] = Counter()
    async with Broker.from_config(config) as broker:
        # stream() holds at most queue_size lookups at once, whatever the input's length.
        async for result in broker.stream(asins):
            statuses[result.status.value] += 1
            product = result.product
            if product is not None and statuses["ok"] <= 3:
                price = product.price.display if product.price else "no price"
                print(f"{result.asin}  {price:>10}  {product.title}")
    print(f"{len(asins)} inputs: " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", nargs="?", type=Path, default=ROOT / "examples" / "asins.txt")
    parser.add_argument("--config", type=Path, default=ROOT / "config.toml")
    args = parser.parse_args()
    asyncio.run(main(args.config, args.job))
