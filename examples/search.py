"""Search the catalogue, list variations and browse nodes, all with typed answers.

    uv run python examples/search.py [--config config.toml] [KEYWORDS]

Options are snake_case and checked before anything is sent: ``item_count=500`` raises
``ValueError`` naming ``item_count`` instead of becoming a failed request.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from broker import Broker
from broker.api.operations import Availability, SortBy

ROOT = Path(__file__).resolve().parent.parent


async def main(config: Path, keywords: str) -> None:
    async with Broker.from_config(config) as broker:
        found = await broker.search_items(
            keywords=keywords,
            item_count=5,
            sort_by=SortBy.PRICE_LOW_TO_HIGH,
            availability=Availability.AVAILABLE,
            min_price=1000,  # in the currency's smallest unit: $10.00
            resources=["itemInfo.title", "offersV2.listings.price", "parentASIN"],
        )
        print(f"{found.total_result_count} results for {keywords!r}: {found.search_url}")
        for product in found.items:
            price = product.price.display if product.price else "-"
            print(f"  {product.asin}  {price:>10}  {product.title}")
        # An item with a parent has variations (its family); get_variations of most others
        # raises BadRequestError, code NoResults.
        child = next((product for product in found.items if product.parent_asin), None)
        if child is not None:
            variations = await broker.get_variations(child.asin or "", variation_count=3)
            print(f"{child.asin} has {variations.variation_count} variations:")
            for variant in variations.items:
                attributes = ", ".join(f"{a.name}={a.value}" for a in variant.variation_attributes)
                print(f"  {variant.asin}  {attributes}")
        nodes = await broker.get_browse_nodes(["283155"])
        for node in nodes.browse_nodes:
            children = ", ".join(c.display_name or "?" for c in node.children[:3])
            print(f"browse node {node.id} {node.display_name!r}: children {children}")
        try:
            await broker.search_items(keywords=keywords, item_count=500)
        except ValueError as exc:
            print(f"refused before sending: {exc}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("keywords", nargs="?", default="kettle")
    parser.add_argument("--config", type=Path, default=ROOT / "config.toml")
    args = parser.parse_args()
    asyncio.run(main(args.config, args.keywords))
