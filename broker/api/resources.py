"""Resource names of both APIs: accepted in either spelling, checked, and spelled for the wire.

The Creators API spells resources in camelCase (``itemInfo.title``), PA-API in PascalCase
(``ItemInfo.Title``); callers may use either (case is ignored) and :func:`resolve_resources`
returns the names the protocol in use expects. A name neither API knows for the operation
raises ``ValueError`` naming it, before any request is sent, instead of coming back as a
failed result.
"""

from __future__ import annotations

import difflib
import enum
import functools
from collections.abc import Iterable, Mapping
from typing import Final, TypeVar

from broker.api.base import Operation
from broker.models import Protocol

__all__ = [
    "BROWSE_NODE_RESOURCES",
    "ITEM_RESOURCES",
    "OPERATION_RESOURCES",
    "PAAPI_ONLY_ITEM_RESOURCES",
    "RETIRED_PAAPI_PREFIXES",
    "pascal_name",
    "resolve_resources",
    "resource_names",
]

#: Item resources of the Creators API (SDK-C ``GetItemsResource``, protocol.md 2.5).
ITEM_RESOURCES: Final = (
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
)

#: Item resources PA-API 5.0 has and the Creators API does not: rental offers (SDK-P
#: ``GetItemsResource``, protocol.md 3.3), taken by GetItems, SearchItems and GetVariations.
PAAPI_ONLY_ITEM_RESOURCES: Final = (
    "RentalOffers.Listings.Availability.MaxOrderQuantity",
    "RentalOffers.Listings.Availability.Message",
    "RentalOffers.Listings.Availability.MinOrderQuantity",
    "RentalOffers.Listings.Availability.Type",
    "RentalOffers.Listings.BasePrice",
    "RentalOffers.Listings.Condition",
    "RentalOffers.Listings.Condition.ConditionNote",
    "RentalOffers.Listings.Condition.SubCondition",
    "RentalOffers.Listings.DeliveryInfo.IsAmazonFulfilled",
    "RentalOffers.Listings.DeliveryInfo.IsFreeShippingEligible",
    "RentalOffers.Listings.DeliveryInfo.IsPrimeEligible",
    "RentalOffers.Listings.DeliveryInfo.ShippingCharges",
    "RentalOffers.Listings.MerchantInfo",
)

#: GetBrowseNodes resources (the same names in both APIs, but for the spelling).
BROWSE_NODE_RESOURCES: Final = ("browseNodes.ancestor", "browseNodes.children")

#: Every operation's resources, in Creators spelling.
OPERATION_RESOURCES: Final[Mapping[Operation, tuple[str, ...]]] = {
    Operation.GET_ITEMS: ITEM_RESOURCES,
    Operation.SEARCH_ITEMS: (*ITEM_RESOURCES, "searchRefinements"),
    Operation.GET_VARIATIONS: (
        *ITEM_RESOURCES,
        "variationSummary.price.highestPrice",
        "variationSummary.price.lowestPrice",
        "variationSummary.variationDimension",
    ),
    Operation.GET_BROWSE_NODES: BROWSE_NODE_RESOURCES,
}

#: PA-API resource families Amazon has switched off, with what to use instead.
RETIRED_PAAPI_PREFIXES: Final[Mapping[str, str]] = {
    "offers.": "PA-API Offers (V1) resources were retired on 2026-01-31; use OffersV2.* "
    "(offersV2.*) instead",
}


_E = TypeVar("_E", bound=enum.Enum)


def pascal_name(name: str) -> str:
    """PA-API's spelling of a Creators resource name: a capital first letter per segment
    (itemInfo.byLineInfo -> ItemInfo.ByLineInfo, parentASIN -> ParentASIN)."""
    return ".".join(part[:1].upper() + part[1:] for part in name.split("."))


def resource_names(
    protocol: Protocol | str, operation: Operation | str = Operation.GET_ITEMS
) -> tuple[str, ...]:
    """Every resource name ``operation`` accepts, spelled for ``protocol``.

    Both may be given as the enum or as its value, in either API's spelling:
    ``resource_names("paapi5")``, ``resource_names("creators", "searchItems")``. PA-API has
    no ``highRes`` images (it stops at Large), so those are not in its list, and has the
    ``RentalOffers.*`` item resources the Creators API lacks.

    Raises:
        ValueError: an unknown protocol or operation (the message lists the known ones).
    """
    chosen = _enum(Operation, operation, "operation")
    names = OPERATION_RESOURCES[chosen]
    if _enum(Protocol, protocol, "protocol") is Protocol.CREATORS:
        return names
    paapi = tuple(pascal_name(n) for n in names if not n.endswith(".highRes"))
    if chosen is Operation.GET_BROWSE_NODES:
        return paapi
    return paapi + PAAPI_ONLY_ITEM_RESOURCES


def _enum(kind: type[_E], value: _E | str, what: str) -> _E:
    if isinstance(value, kind):
        return value
    # Either API's spelling: PA-API's "SearchItems" or the Creators API's "searchItems".
    for member in kind:
        spelled = str(member.value)
        if value in (spelled, spelled[:1].lower() + spelled[1:]):
            return member
    known = ", ".join(repr(member.value) for member in kind)
    raise ValueError(f"unknown {what} {value!r}; expected one of {known}")


def resolve_resources(
    names: Iterable[str], protocol: Protocol, operation: Operation = Operation.GET_ITEMS
) -> tuple[str, ...]:
    """Check resource names given in either spelling and return them spelled for ``protocol``.

    Matching ignores case, so ``ItemInfo.Title``, ``itemInfo.title`` and ``iteminfo.title``
    are one resource; duplicates are dropped and the names sorted, so two lists of the same
    resources in another order are one list (one lookup, sharing batches), as they are one
    request to Amazon.

    Raises:
        TypeError: ``names`` is a single string, or holds something that is not a string.
        ValueError: a name ``operation`` does not accept under ``protocol`` (the message
            names it and, for retired or protocol-specific names, says what to use), or
            no name at all.
    """
    if isinstance(names, str | bytes):
        raise TypeError("resources must be a list of resource names, not a single string")
    listed = tuple(names)
    for name in listed:
        if not isinstance(name, str):
            raise TypeError(f"resources must be strings, got {type(name).__name__}")
    if not listed:
        # Sent so, the request would name no resource and Amazon answer with its own
        # default (the title alone): neither what was configured nor an error.
        raise ValueError(
            "resources: the list is empty; name at least one resource, or leave resources "
            "out for the configured ones (api.resources)"
        )
    return _resolve(listed, protocol, operation)


@functools.lru_cache(maxsize=256)
def _resolve(names: tuple[str, ...], protocol: Protocol, operation: Operation) -> tuple[str, ...]:
    # Cached: an application asks with a handful of resource lists, over and over.
    known = _known(protocol, operation)
    resolved: dict[str, None] = {}
    for name in names:
        spelled = known.get(name.strip().lower())
        if spelled is None:
            raise ValueError(f"resources: {_why_unknown(name, protocol, operation)}")
        resolved[spelled] = None
    return tuple(sorted(resolved))


@functools.cache
def _known(protocol: Protocol, operation: Operation) -> Mapping[str, str]:
    return {name.lower(): name for name in resource_names(protocol, operation)}


def _why_unknown(name: str, protocol: Protocol, operation: Operation) -> str:
    folded = name.strip().lower()
    for prefix, advice in RETIRED_PAAPI_PREFIXES.items():
        if folded.startswith(prefix):
            return f"{name!r} is not available: {advice}"
    if protocol is Protocol.PAAPI5 and folded.endswith(".highres"):
        return f"{name!r} has no PA-API equivalent (PA-API images stop at Large)"
    if protocol is Protocol.CREATORS and folded in _known(Protocol.PAAPI5, operation):
        return f"{name!r} is a PA-API 5.0 resource: the Creators API has no rental offers"
    for other in Operation:
        if other is not operation and folded in _known(Protocol.CREATORS, other):
            return f"{name!r} is a {other.value} resource, not a {operation.value} one"
    known = _known(protocol, operation)
    close = difflib.get_close_matches(folded, list(known), n=1, cutoff=0.75)
    return f"unknown resource {name!r} for {operation.value}" + (
        f"; did you mean {known[close[0]]}?"
        if close
        else f"; names look like {resource_names(protocol, operation)[0]}, in either "
        f"spelling; broker.api.resources.resource_names({protocol.value!r}) lists them all"
    )
