"""Look up a few ASINs with blocking calls: no asyncio in sight (scripts, notebooks).

    uv run python examples/sync_lookup.py [--config config.toml] [ASIN ...]

``SyncBroker`` runs the broker on a background event-loop thread of its own; its methods
block and may be called from any number of threads. ``with`` closes it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from broker import SyncBroker

ROOT = Path(__file__).resolve().parent.parent


def main(config: Path, asins: list[str]) -> None:
    with SyncBroker.from_config(config) as broker:
        # Resource names in PA-API spelling work on the Creators API too, and vice versa.
        resources = [
            "ItemInfo.Title",
            "ItemInfo.ByLineInfo",
            "ItemInfo.Features",
            "OffersV2.Listings.Price",
            "OffersV2.Listings.Availability",
            "Images.Primary.Large",
        ]
        for result in broker.get_items(asins, resources=resources):
            product = result.product
            if product is None:
                assert result.error is not None
                print(f"{result.asin}: {result.status.value} ({result.error.code})")
                continue
            listing = product.listing
            print(f"{result.asin}: {product.title}")
            print(f"  brand:        {product.brand}")
            if listing is not None and listing.price is not None and listing.price.money:
                print(f"  price:        {listing.price.money.display}")
            if listing is not None and listing.availability is not None:
                print(f"  availability: {listing.availability.message}")
            print(f"  image:        {product.image_url}")
            for feature in product.features[:2]:
                print(f"  - {feature}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("asins", nargs="*", default=["B000000001", "B000000002", "not-an-asin"])
    parser.add_argument("--config", type=Path, default=ROOT / "config.toml")
    args = parser.parse_args()
    main(args.config, args.asins)
