"""Rendering catalogue items as the APIs send them, honouring the requested resources.

The Creators API gets camelCase with unrequested members as explicit ``null`` (when
``explicit_nulls`` is on) and ``highRes`` sent as ``hiRes``; PA-API gets PascalCase with
unrequested members absent. Served items are cached as JSON text (:func:`item_json`), because
a benchmark asks for the same few thousand items over and over.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

from broker.simulator.catalog import BrowseNodeData, CatalogItem, Listing, lookup_by_key

if TYPE_CHECKING:
    from broker.simulator.settings import SimulatorSettings

__all__ = [
    "CREATORS_ITEM_RESOURCES",
    "EXTRA_RESOURCES",
    "PAAPI_ITEM_RESOURCES",
    "Style",
    "forget_rendered",
    "item_json",
    "paapi_resource",
    "paapi_resource_to_creators",
    "render_item",
    "render_item_json",
    "resources_key",
]

Style = Literal["creators", "paapi5"]

#: GetItems resources of the Creators API (SDK-C ``GetItemsResource``).
CREATORS_ITEM_RESOURCES: frozenset[str] = frozenset(
    {
        "browseNodeInfo.browseNodes",
        "browseNodeInfo.browseNodes.ancestor",
        "browseNodeInfo.browseNodes.salesRank",
        "browseNodeInfo.websiteSalesRank",
        "customerReviews.count",
        "customerReviews.starRating",
        "images.primary.small",
        "images.primary.medium",
        "images.primary.large",
        "images.primary.highRes",
        "images.variants.small",
        "images.variants.medium",
        "images.variants.large",
        "images.variants.highRes",
        "itemInfo.byLineInfo",
        "itemInfo.contentInfo",
        "itemInfo.contentRating",
        "itemInfo.classifications",
        "itemInfo.externalIds",
        "itemInfo.features",
        "itemInfo.manufactureInfo",
        "itemInfo.productInfo",
        "itemInfo.technicalInfo",
        "itemInfo.title",
        "itemInfo.tradeInInfo",
        "offersV2.listings.availability",
        "offersV2.listings.condition",
        "offersV2.listings.dealDetails",
        "offersV2.listings.isBuyBoxWinner",
        "offersV2.listings.loyaltyPoints",
        "offersV2.listings.merchantInfo",
        "offersV2.listings.price",
        "offersV2.listings.type",
        "parentASIN",
    }
)

#: Extra resources other Creators operations accept besides the item ones.
EXTRA_RESOURCES: Mapping[str, frozenset[str]] = {
    "searchItems": frozenset({"searchRefinements"}),
    "getVariations": frozenset(
        {
            "variationSummary.price.highestPrice",
            "variationSummary.price.lowestPrice",
            "variationSummary.variationDimension",
        }
    ),
}


def paapi_resource_to_creators(resource: str) -> str:
    """Map a PA-API resource name (``ItemInfo.Title``) to the Creators one (``itemInfo.title``)."""
    return ".".join(part[:1].lower() + part[1:] for part in resource.split("."))


def paapi_resource(resource: str) -> str:
    """PA-API's spelling of a Creators resource name: every segment capitalised."""
    return ".".join(part[:1].upper() + part[1:] for part in resource.split("."))


#: PA-API 5.0's rental offers (SDK-P ``GetItemsResource``), which the Creators API lacks.
#: Accepted; the catalogue holds no rentals, so no item carries ``RentalOffers`` (as most
#: of Amazon's do not).
PAAPI_RENTAL_RESOURCES: frozenset[str] = frozenset(
    "RentalOffers.Listings." + leaf
    for leaf in (
        "Availability.MaxOrderQuantity",
        "Availability.Message",
        "Availability.MinOrderQuantity",
        "Availability.Type",
        "BasePrice",
        "Condition",
        "Condition.ConditionNote",
        "Condition.SubCondition",
        "DeliveryInfo.IsAmazonFulfilled",
        "DeliveryInfo.IsFreeShippingEligible",
        "DeliveryInfo.IsPrimeEligible",
        "DeliveryInfo.ShippingCharges",
        "MerchantInfo",
    )
)

#: GetItems resources of PA-API 5.0 (OffersV2 only: Offers V1 was retired in January 2026).
PAAPI_ITEM_RESOURCES: frozenset[str] = (
    frozenset(paapi_resource(r) for r in CREATORS_ITEM_RESOURCES if not r.endswith("highRes"))
    | PAAPI_RENTAL_RESOURCES
)


def render_item(
    settings: SimulatorSettings,
    marketplace: str,
    asin: str,
    *,
    resources: Iterable[str],
    partner_tag: str,
    protocol: Style = "creators",
) -> dict[str, object] | None:
    """Return the item exactly as the simulator sends it, or None when it is not served.

    Args:
        settings: the simulator's settings (seed, shares, ``explicit_nulls``).
        marketplace: e.g. ``www.amazon.com``.
        asin: the requested id.
        resources: the requested resource names in the protocol's own spelling.
        partner_tag: the tag of the request (it goes into ``detailPageURL``).
        protocol: ``"creators"`` (camelCase) or ``"paapi5"`` (PascalCase).
    """
    text = item_json(
        settings, marketplace, asin, resources_key(resources, protocol), partner_tag, protocol
    )
    if text is None:
        return None
    result: dict[str, object] = json.loads(text)
    return result


def item_json(
    settings: SimulatorSettings,
    marketplace: str,
    asin: str,
    resources: frozenset[str],
    partner_tag: str,
    protocol: Style,
) -> str | None:
    """The served item as JSON text (``resources`` from :func:`resources_key`), or None; cached.

    The cache key is made of strings, numbers and a frozenset, whose hashes Python caches, so
    a hit costs far less than rendering (or hashing a whole item).
    """
    nulls = settings.explicit_nulls and protocol == "creators"
    return _item_json(
        settings.seed,
        settings.missing_share,
        settings.inaccessible_share,
        marketplace,
        asin,
        resources,
        partner_tag,
        protocol,
        nulls,
    )


def forget_rendered() -> None:
    """Drop the memoized catalogue items and their rendered JSON.

    A server keeps them (the same ASINs are asked again); a benchmark that renders answers in
    its own process drops them after, so its heap, which every full garbage collection
    walks, does not grow round after round.
    """
    _item_json.cache_clear()
    lookup_by_key.cache_clear()


@lru_cache(maxsize=16_384)  # bounded as catalog.lookup_by_key is, for the same reason
def _item_json(
    seed: int,
    missing: float,
    inaccessible: float,
    marketplace: str,
    asin: str,
    resources: frozenset[str],
    tag: str,
    protocol: Style,
    nulls: bool,
) -> str | None:
    entry = lookup_by_key(seed, missing, inaccessible, marketplace, asin)
    if entry.item is None:
        return None
    return render_item_json(entry.item, resources, tag, protocol, nulls)


def resources_key(resources: Iterable[str], protocol: Style) -> frozenset[str]:
    """Normalise requested resource names to the Creators spelling, as a cache key."""
    if protocol == "paapi5":
        return frozenset(paapi_resource_to_creators(r) for r in resources)
    return frozenset(resources)


def render_item_json(
    item: CatalogItem,
    resources: frozenset[str],
    partner_tag: str,
    protocol: Style,
    explicit_nulls: bool,
) -> str:
    """Render one item as JSON text for ``resources`` (Creators spelling)."""
    tree: object = _build(item, resources, partner_tag)
    if not explicit_nulls:
        tree = _strip_nulls(tree)
    if protocol == "paapi5":
        tree = _pascal(tree)
    return json.dumps(tree, ensure_ascii=False, separators=(",", ":"))


# Rendering works in Creators spelling; PA-API is a key rename of the same tree.


def _attr(value: object, label: str, locale: str) -> dict[str, object]:
    return {"displayValue": value, "label": label, "locale": locale}


def _image(image_id: str, size: int | None) -> dict[str, object]:
    suffix = f"._SL{size}_" if size else ""
    edge = size or 1500
    return {
        "url": f"https://m.media-amazon.com/images/I/{image_id}{suffix}.jpg",
        "height": edge,
        "width": edge,
    }


_SIZES = (
    ("small", "small", 75),
    ("medium", "medium", 160),
    ("large", "large", 500),
    ("highRes", "hiRes", None),
)


def _image_set(image_id: str, wanted: frozenset[str], prefix: str) -> dict[str, object]:
    return {
        key: (_image(image_id, size) if f"{prefix}.{name}" in wanted else None)
        for name, key, size in _SIZES
    }


def _build(item: CatalogItem, want: frozenset[str], tag: str) -> dict[str, object]:
    """The item tree in Creators spelling, with None for every unrequested member."""
    tree: dict[str, object] = {"asin": item.asin}

    nodes_wanted = {
        "browseNodeInfo.browseNodes",
        "browseNodeInfo.browseNodes.ancestor",
        "browseNodeInfo.browseNodes.salesRank",
    } & want
    rank_wanted = "browseNodeInfo.websiteSalesRank" in want
    if nodes_wanted or rank_wanted:
        tree["browseNodeInfo"] = {
            "browseNodes": [_node(n, want) for n in item.browse_nodes] if nodes_wanted else None,
            "websiteSalesRank": {
                "contextFreeName": item.product_group,
                "displayName": item.product_group,
                "id": item.browse_nodes[0].ancestors[-1][0]
                if item.browse_nodes[0].ancestors
                else item.browse_nodes[0].id,
                "salesRank": item.website_sales_rank,
            }
            if rank_wanted
            else None,
        }
    else:
        tree["browseNodeInfo"] = None

    if want & {"customerReviews.count", "customerReviews.starRating"}:
        tree["customerReviews"] = {
            "count": item.review_count if "customerReviews.count" in want else None,
            "starRating": {"value": item.star_rating}
            if "customerReviews.starRating" in want
            else None,
        }
    else:
        tree["customerReviews"] = None

    tree["detailPageURL"] = item.detail_page_url(tag)

    primary = any(r.startswith("images.primary.") for r in want)
    variants = any(r.startswith("images.variants.") for r in want)
    if primary or variants:
        tree["images"] = {
            "primary": _image_set(item.image_ids[0], want, "images.primary") if primary else None,
            "variants": [_image_set(i, want, "images.variants") for i in item.image_ids[1:]]
            if variants
            else None,
        }
    else:
        tree["images"] = None

    info_keys = (
        "byLineInfo",
        "classifications",
        "contentInfo",
        "contentRating",
        "externalIds",
        "features",
        "manufactureInfo",
        "productInfo",
        "technicalInfo",
        "title",
        "tradeInInfo",
    )
    if any(f"itemInfo.{k}" in want for k in info_keys):
        tree["itemInfo"] = {
            key: _info_member(item, key) if f"itemInfo.{key}" in want else None for key in info_keys
        }
    else:
        tree["itemInfo"] = None

    if any(r.startswith("offersV2.listings.") for r in want):
        tree["offersV2"] = {"listings": [_listing(item.listing, want)]}
    else:
        tree["offersV2"] = None

    tree["parentASIN"] = item.parent_asin if "parentASIN" in want else None
    tree["score"] = None
    tree["variationAttributes"] = None
    return tree


def _info_member(item: CatalogItem, key: str) -> object:
    """One member of ``itemInfo`` (None for the kinds synthetic items do not have)."""
    loc = item.locale
    if key == "byLineInfo":
        return {
            "brand": _attr(item.brand, "Brand", loc),
            "contributors": None,
            "manufacturer": _attr(item.manufacturer, "Manufacturer", loc),
        }
    if key == "classifications":
        return {
            "binding": _attr(item.binding, "Binding", loc),
            "productGroup": _attr(item.product_group, "ProductGroup", loc),
        }
    if key == "externalIds":
        return {
            "eans": {"displayValues": [item.ean], "label": "EAN", "locale": loc},
            "isbns": None,
            "upcs": None,
        }
    if key == "features":
        return {"displayValues": list(item.features), "label": "Features", "locale": loc}
    if key == "manufactureInfo":
        return {
            "itemPartNumber": _attr(item.part_number, "PartNumber", loc),
            "model": _attr(item.model, "Model", loc),
            "warranty": None,
        }
    if key == "productInfo":
        return {
            "color": _attr(item.color, "Color", loc),
            "isAdultProduct": _attr(False, "IsAdultProduct", loc),
            "itemDimensions": None,
            "releaseDate": _attr(item.release_date, "ReleaseDate", loc),
            "size": None if item.size is None else _attr(item.size, "Size", loc),
            "unitCount": _attr(1, "NumberOfItems", loc),
        }
    if key == "title":
        return _attr(item.title, "Title", loc)
    return None


def _node(node: BrowseNodeData, want: frozenset[str]) -> dict[str, object]:
    ancestor: dict[str, object] | None = None
    if "browseNodeInfo.browseNodes.ancestor" in want:
        for node_id, name in reversed(node.ancestors):
            ancestor = {
                "ancestor": ancestor,
                "contextFreeName": name,
                "displayName": name,
                "id": node_id,
            }
    return {
        "ancestor": ancestor,
        "children": None,
        "contextFreeName": node.name,
        "displayName": node.name,
        "id": node.id,
        "isRoot": not node.ancestors,
        "salesRank": node.sales_rank if "browseNodeInfo.browseNodes.salesRank" in want else None,
    }


def _listing(listing: Listing, want: frozenset[str]) -> dict[str, object]:
    def on(name: str) -> bool:
        return f"offersV2.listings.{name}" in want

    price: dict[str, object] | None = None
    if on("price"):
        money = {
            "amount": listing.amount,
            "currency": listing.currency,
            "displayAmount": listing.display_amount,
        }
        price = {"money": money, "pricePerUnit": None, "savingBasis": None, "savings": None}
        if listing.saving_basis_amount is not None:
            price["savingBasis"] = {
                "money": {
                    "amount": listing.saving_basis_amount,
                    "currency": listing.currency,
                    "displayAmount": listing.saving_basis_display,
                },
                "savingBasisType": "LIST_PRICE",
                "savingBasisTypeLabel": "List Price",
            }
            price["savings"] = {
                "money": {
                    "amount": listing.savings_amount,
                    "currency": listing.currency,
                    "displayAmount": listing.savings_display,
                },
                "percentage": listing.savings_percentage,
            }
    deal = listing.deal_badge is not None
    return {
        "availability": {
            "maxOrderQuantity": listing.max_order_quantity,
            "message": listing.availability_message,
            "minOrderQuantity": 1,
            "type": listing.availability_type,
        }
        if on("availability")
        else None,
        "condition": {"conditionNote": None, "subCondition": "New", "value": listing.condition}
        if on("condition")
        else None,
        "dealDetails": {
            "accessType": "ALL",
            "badge": listing.deal_badge,
            "earlyAccessDurationInMilliseconds": 0,
            "endTime": "2026-12-31T23:59:59Z",
            "percentClaimed": 42,
            "startTime": "2026-01-01T00:00:00Z",
        }
        if on("dealDetails") and deal
        else None,
        "isBuyBoxWinner": True if on("isBuyBoxWinner") else None,
        "loyaltyPoints": {"points": listing.loyalty_points}
        if on("loyaltyPoints") and listing.loyalty_points is not None
        else None,
        "merchantInfo": {"id": listing.merchant_id, "name": listing.merchant_name}
        if on("merchantInfo")
        else None,
        "price": price,
        "type": "LIGHTNING_DEAL" if on("type") and deal else None,
        "violatesMAP": False if on("price") else None,
    }


def _strip_nulls(value: object) -> object:
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


_PASCAL_SPECIAL = {
    "asin": "ASIN",
    "url": "URL",
    "hiRes": "HiRes",
    "eans": "EANs",
    "isbns": "ISBNs",
    "upcs": "UPCs",
}


@lru_cache(maxsize=512)
def _pascal_key(key: str) -> str:
    return _PASCAL_SPECIAL.get(key) or key[:1].upper() + key[1:]


def _pascal(value: object) -> object:
    if isinstance(value, dict):
        return {_pascal_key(k): _pascal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_pascal(v) for v in value]
    return value
