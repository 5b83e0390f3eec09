"""SearchItems, GetVariations and GetBrowseNodes in Python's idiom, as pure functions.

``*_params`` functions take snake_case options (``item_count=3``), check every one before
anything is sent (``TypeError``/``ValueError`` naming the argument) and return the
camelCase parameters a dialect turns into a request (PA-API's dialect capitalises them).
``read_*`` functions turn the answers, in either API's spelling, into typed results whose
items are :class:`~broker.product.Product` values. The broker's methods are thin wrappers
over these.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, TypedDict, TypeVar

from broker.api.base import Operation
from broker.api.errors_map import number
from broker.api.resources import ITEM_RESOURCES, OPERATION_RESOURCES, resolve_resources
from broker.asin import check_asin
from broker.errors import describe
from broker.models import ErrorDetail, Protocol
from broker.product import (
    BrowseNode,
    Money,
    Product,
    Spelling,
    read_browse_node,
    read_product,
    whole_number,
)

__all__ = [
    "Availability",
    "BrowseNodesOptions",
    "BrowseNodesResult",
    "Condition",
    "DeliveryFlag",
    "Merchant",
    "Refinement",
    "RefinementBin",
    "SearchOptions",
    "SearchResult",
    "SortBy",
    "VariationDimension",
    "VariationsOptions",
    "VariationsResult",
    "browse_nodes_params",
    "read_browse_nodes",
    "read_search",
    "read_variations",
    "search_params",
    "variations_params",
    "with_keywords",
]


class SortBy(enum.StrEnum):
    """How SearchItems orders its results."""

    AVG_CUSTOMER_REVIEWS = "AvgCustomerReviews"
    FEATURED = "Featured"
    NEWEST_ARRIVALS = "NewestArrivals"
    PRICE_HIGH_TO_LOW = "Price:HighToLow"
    PRICE_LOW_TO_HIGH = "Price:LowToHigh"
    RELEVANCE = "Relevance"
    # python-amazon-paapi's (and Amazon's SDK's) member names, so code moving over works
    # with only its import changed.
    AVGCUSTOMERREVIEWS = "AvgCustomerReviews"
    NEWESTARRIVALS = "NewestArrivals"
    PRICE_COLON_HIGH_TO_LOW = "Price:HighToLow"
    PRICE_COLON_LOW_TO_HIGH = "Price:LowToHigh"
    # python-amazon-paapi 5.x's (the PA-API 5.0 SDK's), for code from before 7.x.
    PRICE_HIGHTOLOW = "Price:HighToLow"
    PRICE_LOWTOHIGH = "Price:LowToHigh"


class Condition(enum.StrEnum):
    """Offer condition to filter on (the Creators API knows Any and New only)."""

    ANY = "Any"
    NEW = "New"
    USED = "Used"
    COLLECTIBLE = "Collectible"
    REFURBISHED = "Refurbished"


class Availability(enum.StrEnum):
    """Whether SearchItems includes items out of stock."""

    AVAILABLE = "Available"
    INCLUDE_OUT_OF_STOCK = "IncludeOutOfStock"
    INCLUDEOUTOFSTOCK = "IncludeOutOfStock"  # python-amazon-paapi's name


class DeliveryFlag(enum.StrEnum):
    """Delivery programmes SearchItems can filter on."""

    AMAZON_GLOBAL = "AmazonGlobal"
    FREE_SHIPPING = "FreeShipping"
    FULFILLED_BY_AMAZON = "FulfilledByAmazon"
    PRIME = "Prime"
    # python-amazon-paapi's names.
    AMAZONGLOBAL = "AmazonGlobal"
    FREESHIPPING = "FreeShipping"
    FULFILLEDBYAMAZON = "FulfilledByAmazon"


class Merchant(enum.StrEnum):
    """Whose offers to consider (PA-API only)."""

    ALL = "All"
    AMAZON = "Amazon"


class _Common(TypedDict, total=False):
    resources: Sequence[str] | None
    condition: Condition | str | None
    currency_of_preference: str | None
    languages_of_preference: Sequence[str] | None
    merchant: Merchant | str | None


class SearchOptions(_Common, total=False):
    """SearchItems options (all optional; give at least one search term or the index).

    ``min_price``/``max_price`` are in the currency's smallest unit (3241 is $32.41), as
    Amazon takes them. ``item_count`` is 1..10 on PA-API, 1..100 on the Creators API. None,
    for any option of any operation, is "not given" (a wrapper passes its own on).
    """

    keywords: str | None
    actor: str | None
    artist: str | None
    author: str | None
    brand: str | None
    title: str | None
    browse_node_id: str | int | None
    search_index: str | None
    item_count: int | None
    item_page: int | None
    sort_by: SortBy | str | None
    min_price: int | None
    max_price: int | None
    min_reviews_rating: int | None
    min_saving_percent: int | None
    availability: Availability | str | None
    delivery_flags: Sequence[DeliveryFlag | str] | None


class VariationsOptions(_Common, total=False):
    """GetVariations options: page through the variations 1..10 at a time."""

    variation_count: int | None
    variation_page: int | None


class BrowseNodesOptions(TypedDict, total=False):
    """GetBrowseNodes options."""

    resources: Sequence[str] | None
    languages_of_preference: Sequence[str] | None


#: snake_case option -> camelCase wire parameter, where not the obvious conversion.
_WIRE_NAMES: Final = {"browse_node_id": "browseNodeId"}
_SEARCH_TERMS: Final = ("keywords", "actor", "artist", "author", "brand", "title")
_ENUMS: Final[Mapping[str, type[enum.StrEnum]]] = {
    "sort_by": SortBy,
    "condition": Condition,
    "availability": Availability,
    "merchant": Merchant,
}
#: The top of the options protocol.md gives no top for (prices, variation pages): a
#: server's 32-bit integer, past which a request is only spent to be refused.
_MAX_INT32: Final = 2**31 - 1
#: (low, high) per integer option; item_count's high depends on the protocol.
_RANGES: Final[Mapping[str, tuple[int, int | None]]] = {
    "item_page": (1, 10),
    "min_price": (1, _MAX_INT32),
    "max_price": (1, _MAX_INT32),
    "min_reviews_rating": (1, 4),
    "min_saving_percent": (1, 99),
    "variation_count": (1, 10),
    "variation_page": (1, _MAX_INT32),
}

_E = TypeVar("_E", bound=enum.StrEnum)
# A TypedDict's annotations include those of its bases: every option name each one takes.
_SEARCH_KEYS: Final = frozenset(SearchOptions.__annotations__)
_VARIATIONS_KEYS: Final = frozenset(VariationsOptions.__annotations__)
_BROWSE_KEYS: Final = frozenset(BrowseNodesOptions.__annotations__)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return _WIRE_NAMES.get(name) or head + "".join(part.title() for part in rest)


def _check_known(options: Mapping[str, object], known: frozenset[str], what: str) -> None:
    for name in options:
        if name not in known:
            raise TypeError(
                f"{what}() got an unexpected keyword argument {name!r}; "
                f"expected one of: {', '.join(sorted(known))}"
            )


def _text(name: str, value: object, max_len: int = 1000) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{name} must not be blank")
    if len(value) > max_len:
        raise ValueError(f"{name} must be at most {max_len} characters, got {len(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        # A lone surrogate: bytes that were not UTF-8 (an argv or file name decoded with
        # surrogateescape). No JSON body can carry it; Amazon would refuse the request.
        raise ValueError(
            f"{name} holds {value[exc.start]!r} at {exc.start}, a byte that was not UTF-8 "
            "text; decode the text as UTF-8 (or the encoding it was written in) first"
        ) from None
    return value


def _integer(name: str, value: object, low: int, high: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        hint = (
            " (prices are in the smallest currency unit: 3241 for $32.41)"
            if "price" in name
            else ""
        )
        raise TypeError(f"{name} must be an int, got {type(value).__name__}{hint}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _choice(name: str, value: object, kind: type[_E]) -> _E:
    if isinstance(value, kind):
        return value
    choices = ", ".join(repr(m.value) for m in kind)
    if not isinstance(value, str):
        # The wrong type (5, True), as for every other option: a TypeError.
        raise TypeError(
            f"{name} must be a {kind.__name__} or one of {choices}, got {type(value).__name__}"
        )
    folded = value.strip().lower()
    for member in kind:
        if folded in (member.value.lower(), member.name.lower()):
            return member
    raise ValueError(f"{name} must be a {kind.__name__} or one of {choices}, got {value!r}")


def _strings(name: str, value: object, *, low: int, high: int) -> list[str]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list of strings, got {type(value).__name__}")
    items = list(value)
    if not low <= len(items) <= high:
        raise ValueError(f"{name} takes {low} to {high} values, got {len(items)}")
    return [_text(f"{name}[{i}]", v, 100) for i, v in enumerate(items)]


def _node_id(name: str, value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    text = _text(name, value, 19)
    if not (text.isascii() and text.isdigit()):  # "²³" and other digits are not an id
        raise ValueError(f"{name} must be a browse node id (digits), got {text!r}")
    return text


def _common(
    options: Mapping[str, object],
    protocol: Protocol,
    operation: Operation,
    default_resources: Sequence[str],
) -> dict[str, object]:
    """The options every item operation shares, checked and in wire form."""
    params: dict[str, object] = {}
    resources = options.get("resources")
    if resources is None:
        # The config's item resources, plus what only this operation returns (refinements,
        # a variation summary): asked for by default, as the peer's clients do.
        extra = [r for r in OPERATION_RESOURCES[operation] if r not in ITEM_RESOURCES]
        wanted = [*default_resources, *extra]
        params["resources"] = list(resolve_resources(wanted, protocol, operation))
    elif isinstance(resources, Iterable):
        params["resources"] = list(resolve_resources(resources, protocol, operation))
    else:
        raise TypeError(f"resources must be a list of names, got {type(resources).__name__}")
    condition = options.get("condition")
    if condition is not None:
        chosen = _choice("condition", condition, Condition)
        if protocol is Protocol.CREATORS and chosen not in (Condition.ANY, Condition.NEW):
            raise ValueError(f"condition {chosen.value!r}: the Creators API takes Any or New only")
        params["condition"] = chosen.value
    currency = options.get("currency_of_preference")
    if currency is not None:
        params["currencyOfPreference"] = _text("currency_of_preference", currency, 100)
    languages = options.get("languages_of_preference")
    if languages is not None:
        high = 1 if protocol is Protocol.CREATORS else 10
        params["languagesOfPreference"] = _strings(
            "languages_of_preference", languages, low=1, high=high
        )
    merchant = options.get("merchant")
    if merchant is not None:
        if protocol is not Protocol.PAAPI5:
            raise ValueError("merchant: only PA-API takes a merchant filter")
        params["merchant"] = _choice("merchant", merchant, Merchant).value
    return params


def with_keywords(keywords: str | None, options: SearchOptions) -> SearchOptions:
    """``options`` with the keywords a call gave first, unnamed (python-amazon-paapi's
    ``search_items("kettle")``), added.

    Raises:
        TypeError: the keywords were given both ways.
    """
    if keywords is None:
        return options
    # keywords=None is "not given", as None is for every other option.
    if options.get("keywords") is not None:
        raise TypeError("search_items() got keywords both first and as keywords=")
    return {**options, "keywords": keywords}


def search_params(
    options: SearchOptions, *, protocol: Protocol, default_resources: Sequence[str]
) -> dict[str, object]:
    """Check SearchItems options and return the wire parameters (camelCase).

    Raises:
        TypeError: an unknown option, or a value of the wrong type (the message names it).
        ValueError: a value out of range or not among the accepted ones, or no search
            term at all (give keywords, actor, artist, author, brand, title,
            browse_node_id or search_index).
    """
    _check_known(options, _SEARCH_KEYS, "search_items")
    params = _common(options, protocol, Operation.SEARCH_ITEMS, default_resources)
    for name in _SEARCH_TERMS:
        value = options.get(name)
        if value is not None:
            params[name] = _text(name, value)
    node = options.get("browse_node_id")
    if node is not None:
        params["browseNodeId"] = _node_id("browse_node_id", node)
    index = options.get("search_index")
    if index is not None:
        params["searchIndex"] = _text("search_index", index, 100)
    if not any(k in params for k in (*_SEARCH_TERMS, "browseNodeId", "searchIndex")):
        raise ValueError(
            "search_items needs something to search for: keywords, actor, artist, author, "
            "brand, title, browse_node_id or search_index"
        )
    count = options.get("item_count")
    if count is not None:
        params["itemCount"] = _integer(
            "item_count", count, 1, 100 if protocol is Protocol.CREATORS else 10
        )
    for name, (low, high) in _RANGES.items():
        value = options.get(name)
        if value is not None and name in _SEARCH_KEYS:
            params[_camel(name)] = _integer(name, value, low, high)
    low_price, high_price = params.get("minPrice"), params.get("maxPrice")
    if isinstance(low_price, int) and isinstance(high_price, int) and low_price > high_price:
        raise ValueError(f"min_price ({low_price}) must not exceed max_price ({high_price})")
    for name in ("sort_by", "availability"):
        value = options.get(name)
        if value is not None:
            params[_camel(name)] = _choice(name, value, _ENUMS[name]).value
    flags = options.get("delivery_flags")
    if flags is not None:
        if isinstance(flags, str | bytes) or not isinstance(flags, Iterable):
            raise TypeError("delivery_flags must be a list of DeliveryFlag values")
        chosen = [_choice("delivery_flags", f, DeliveryFlag).value for f in flags]
        params["deliveryFlags"] = list(dict.fromkeys(chosen))
    return params


def variations_params(
    asin: str,
    options: VariationsOptions,
    *,
    protocol: Protocol,
    default_resources: Sequence[str],
) -> dict[str, object]:
    """Check GetVariations options and return the wire parameters (camelCase).

    Raises:
        TypeError: an unknown option, or a value of the wrong type.
        ValueError: an invalid ASIN, or a value out of range.
    """
    _check_known(options, _VARIATIONS_KEYS, "get_variations")
    if not isinstance(asin, str):
        raise TypeError(f"asin must be a string, got {type(asin).__name__}")
    verdict = check_asin(asin)
    if verdict.asin is None:
        raise ValueError(f"asin {asin!r} is not a valid ASIN: {verdict.reason}")
    params = {"asin": verdict.asin}
    params_rest = _common(options, protocol, Operation.GET_VARIATIONS, default_resources)
    for name in ("variation_count", "variation_page"):
        value = options.get(name)
        if value is not None:
            low, high = _RANGES[name]
            params_rest[_camel(name)] = _integer(name, value, low, high)
    return {**params, **params_rest}


def browse_nodes_params(
    browse_node_ids: Iterable[str | int], options: BrowseNodesOptions, *, protocol: Protocol
) -> dict[str, object]:
    """Check GetBrowseNodes arguments and return the wire parameters (camelCase).

    ``resources`` defaults to both ``browseNodes.ancestor`` and ``browseNodes.children``.

    Raises:
        TypeError: ``browse_node_ids`` is a single string, or an unknown option.
        ValueError: no ids, more than 10 distinct ones, or an id that is not digits.
    """
    _check_known(options, _BROWSE_KEYS, "get_browse_nodes")
    if isinstance(browse_node_ids, str | bytes | int):
        raise TypeError("browse_node_ids must be a list of ids, e.g. ['283155']")
    # Repeats are one id to Amazon: the limit counts distinct ones.
    ids = list(
        dict.fromkeys(_node_id(f"browse_node_ids[{i}]", v) for i, v in enumerate(browse_node_ids))
    )
    if not 1 <= len(ids) <= 10:
        raise ValueError(f"browse_node_ids takes 1 to 10 distinct ids, got {len(ids)}")
    resources = options.get("resources")
    params: dict[str, object] = {
        "browseNodeIds": ids,
        "resources": list(
            resolve_resources(
                resources
                if resources is not None
                else ("browseNodes.ancestor", "browseNodes.children"),
                protocol,
                Operation.GET_BROWSE_NODES,
            )
        ),
    }
    languages = options.get("languages_of_preference")
    if languages is not None:
        high = 1 if protocol is Protocol.CREATORS else 10
        params["languagesOfPreference"] = _strings(
            "languages_of_preference", languages, low=1, high=high
        )
    return params


# -- typed answers -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RefinementBin:
    """One value to narrow a search by (a browse node, a search index, a brand...)."""

    id: str | None = None
    display_name: str | None = None


@dataclass(frozen=True, slots=True)
class Refinement:
    """A way to narrow a search, with its bins.

    ``kind`` is ``"search_index"``, ``"browse_node"`` or ``"other"``.
    """

    kind: str
    id: str | None = None
    display_name: str | None = None
    bins: tuple[RefinementBin, ...] = ()


@dataclass(frozen=True, slots=True)
class SearchResult:
    """A SearchItems answer: the page of items, the total count, Amazon's search URL."""

    items: tuple[Product, ...] = ()
    total_result_count: int | None = None
    search_url: str | None = None
    refinements: tuple[Refinement, ...] = ()
    raw: Mapping[str, object] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class VariationDimension:
    """A dimension the variations differ in (``color_name``: Red, Blue...)."""

    name: str | None = None
    display_name: str | None = None
    locale: str | None = None
    values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class VariationsResult:
    """A GetVariations answer: one page of variations and the summary of all of them."""

    items: tuple[Product, ...] = ()
    variation_count: int | None = None
    page_count: int | None = None
    dimensions: tuple[VariationDimension, ...] = ()
    lowest_price: Money | None = None
    highest_price: Money | None = None
    raw: Mapping[str, object] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class BrowseNodesResult:
    """A GetBrowseNodes answer: the nodes found, and an error per id Amazon refused."""

    browse_nodes: tuple[BrowseNode, ...] = ()
    errors: tuple[ErrorDetail, ...] = ()
    raw: Mapping[str, object] = field(default_factory=dict, repr=False, compare=False)


def _map(parent: Mapping[str, object], name: str) -> Mapping[str, object]:
    value = parent.get(name)
    return value if isinstance(value, Mapping) else {}


def _maps(value: object) -> list[Mapping[str, object]]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _str(value: object) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) else None


def _texts(value: object) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def _items(result: Mapping[str, object], s: Spelling) -> tuple[Product, ...]:
    return tuple(read_product(item, s.protocol) for item in _maps(result.get(s["items"])))


def _refinement(kind: str, value: Mapping[str, object], s: Spelling) -> Refinement:
    return Refinement(
        kind=kind,
        id=_str(value.get(s["id"])),
        display_name=_str(value.get(s["displayName"])),
        bins=tuple(
            RefinementBin(_str(b.get(s["id"])), _str(b.get(s["displayName"])))
            for b in _maps(value.get(s["bins"]))
        ),
    )


def read_search(raw: Mapping[str, object], protocol: Protocol) -> SearchResult:
    """Read a SearchItems answer (either spelling) as a :class:`SearchResult`; never raises."""
    s = Spelling(protocol)
    result = _map(raw, s["searchResult"])
    found = _map(result, s["searchRefinements"]) or _map(raw, s["searchRefinements"])
    refinements: list[Refinement] = []
    for kind, key in (("search_index", "searchIndex"), ("browse_node", "browseNode")):
        part = _map(found, s[key])
        if part:
            refinements.append(_refinement(kind, part, s))
    refinements.extend(_refinement("other", r, s) for r in _maps(found.get(s["otherRefinements"])))
    return SearchResult(
        items=_items(result, s),
        total_result_count=whole_number(result.get(s["totalResultCount"])),
        search_url=_str(result.get(s["searchURL"])),
        refinements=tuple(refinements),
        raw=raw,
    )


def _money(value: object, s: Spelling) -> Money | None:
    if not isinstance(value, Mapping):
        return None
    return Money(
        number(value.get(s["amount"])),
        _str(value.get(s["currency"])),
        _str(value.get(s["displayAmount"])),
    )


def read_variations(raw: Mapping[str, object], protocol: Protocol) -> VariationsResult:
    """Read a GetVariations answer (either spelling) as a :class:`VariationsResult`."""
    s = Spelling(protocol)
    result = _map(raw, s["variationsResult"])
    summary = _map(result, s["variationSummary"])
    price = _map(summary, s["price"])
    return VariationsResult(
        items=_items(result, s),
        variation_count=whole_number(summary.get(s["variationCount"])),
        page_count=whole_number(summary.get(s["pageCount"])),
        dimensions=tuple(
            VariationDimension(
                name=_str(d.get(s["name"])),
                display_name=_str(d.get(s["displayName"])),
                locale=_str(d.get(s["locale"])),
                values=_texts(d.get(s["values"])),
            )
            for d in _maps(summary.get(s["variationDimensions"]))
        ),
        lowest_price=_money(price.get(s["lowestPrice"]), s),
        highest_price=_money(price.get(s["highestPrice"]), s),
        raw=raw,
    )


#: The remedy of a GetBrowseNodes entry whose id is no node.
_BAD_NODE: Final = (
    "Check the browse node id: digits only, a node of this marketplace (the ids differ "
    "between stores)."
)


def read_browse_nodes(raw: Mapping[str, object], protocol: Protocol) -> BrowseNodesResult:
    """Read a GetBrowseNodes answer (either spelling) as a :class:`BrowseNodesResult`."""
    s = Spelling(protocol)
    result = _map(raw, s["browseNodesResult"])
    errors: list[ErrorDetail] = []
    for entry in _maps(raw.get(s["errors"])):
        code = _str(entry.get(s["code"])) or "Unknown"
        message = _str(entry.get(s["message"])) or ""
        # An entry names a node id, not an item: the ASIN remedy of the code would mislead.
        remedy = _BAD_NODE if code == "InvalidParameterValue" else describe(code).remedy
        errors.append(ErrorDetail(code, message, remedy))
    return BrowseNodesResult(
        browse_nodes=tuple(
            read_browse_node(n, protocol) for n in _maps(result.get(s["browseNodes"]))
        ),
        errors=tuple(errors),
        raw=raw,
    )
