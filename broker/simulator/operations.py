"""The four catalogue operations, written once for both protocols.

GetItems, SearchItems, GetVariations and GetBrowseNodes validate their body, consult the
catalogue and build their result here. Field names are spelled through :class:`Names`
(camelCase for the Creators API, PascalCase for PA-API); whole-request problems are raised as
:class:`Rejected` and per-id problems returned as :class:`ItemError`, so each protocol module
only turns them into its own wire shapes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import quote_plus

from broker.simulator.catalog import (
    browse_node,
    is_well_formed,
    lookup,
    search_index_of,
    search_results,
    variation_asins,
)
from broker.simulator.marketplaces import served_as
from broker.simulator.render import (
    CREATORS_ITEM_RESOURCES,
    EXTRA_RESOURCES,
    PAAPI_ITEM_RESOURCES,
    item_json,
    paapi_resource,
    resources_key,
)

if TYPE_CHECKING:
    from broker.simulator.accounts import Account
    from broker.simulator.settings import SimulatorSettings

__all__ = [
    "RESULT_NAMES",
    "Context",
    "ItemError",
    "Names",
    "Outcome",
    "Rejected",
    "run_operation",
]

Style = Literal["creators", "paapi5"]
RejectKind = Literal[
    "missing", "bad_value", "invalid_associate", "invalid_partner_tag", "not_found"
]
ItemErrorKind = Literal["invalid", "not_found", "not_accessible", "bad_node"]

_SEARCH_FIELDS = (
    "keywords",
    "actor",
    "artist",
    "author",
    "brand",
    "title",
    "browseNodeId",
    "searchIndex",
)
#: The search fields that narrow a search instead of naming what to search for.
_SEARCH_FILTERS = frozenset({"brand", "browseNodeId", "searchIndex"})


#: SearchItems' sortBy values (both APIs; ``Price:*`` reorder the simulator's results).
_SORT_ORDERS = frozenset(
    {
        "AvgCustomerReviews",
        "Featured",
        "NewestArrivals",
        "Price:HighToLow",
        "Price:LowToHigh",
        "Relevance",
    }
)
#: The largest minPrice/maxPrice accepted (smallest currency unit): protocol.md gives no
#: top, so a server's 32-bit integer, as for variationPage.
_MAX_PRICE = 2**31 - 1
#: The condition values each API takes (protocol.md 2.5; PA-API's five).
_CREATORS_CONDITIONS = frozenset({"Any", "New"})
_PAAPI_CONDITIONS = frozenset({"Any", "Collectible", "New", "Refurbished", "Used"})
#: SearchItems' availability and deliveryFlags values (protocol.md 2.5).
_AVAILABILITY = frozenset({"Available", "IncludeOutOfStock"})
_DELIVERY_FLAGS = frozenset({"AmazonGlobal", "FreeShipping", "FulfilledByAmazon", "Prime"})
#: The search terms' length limits (protocol.md 2.5): browseNodeId is a node id.
_TERM_CHARS = 1000
_NODE_ID_CHARS = 19
#: variationPage has no documented top: a server's 32-bit integer.
_MAX_PAGE = 2**31 - 1


#: each operation's result container, its entry list and an entry's id, in camelCase
#: (the Creators simulator may name the GetItems container ``itemResults`` instead)
RESULT_NAMES: dict[str, tuple[str, str, str]] = {
    "getItems": ("itemsResult", "items", "asin"),
    "searchItems": ("searchResult", "items", "asin"),
    "getVariations": ("variationsResult", "items", "asin"),
    "getBrowseNodes": ("browseNodesResult", "browseNodes", "id"),
}


@dataclass(frozen=True, slots=True)
class Names:
    """Spells a camelCase field name in the protocol's style."""

    style: Style

    def __call__(self, camel: str) -> str:
        if self.style == "creators":
            return camel
        if camel == "asin":
            return "ASIN"
        return camel[:1].upper() + camel[1:]


class Rejected(Exception):
    """The whole request is refused; each protocol renders ``kind`` in its own shape."""

    def __init__(
        self,
        kind: RejectKind,
        field: str = "",
        *,
        value: str = "",
        detail: str = "",
        resource_type: str = "",
        resource_id: str = "",
    ) -> None:
        self.kind = kind
        self.field = field
        self.value = value
        self.detail = detail
        self.resource_type = resource_type
        self.resource_id = resource_id
        super().__init__(f"{kind}: {field} {detail}".strip())


@dataclass(frozen=True, slots=True)
class ItemError:
    """One id of the request that could not be served."""

    kind: ItemErrorKind
    item_id: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """A successful (possibly partial) result: the container and its JSON text."""

    #: the result key in camelCase (``itemsResult``); the protocol spells it
    container: str
    payload: str
    errors: tuple[ItemError, ...]
    items_served: int
    #: requested ids left out of the answer on purpose (``settings.omitted_asins``)
    omitted: int = 0


@dataclass(frozen=True, slots=True)
class Context:
    """What an operation needs besides its body."""

    settings: SimulatorSettings
    account: Account
    marketplace: str
    names: Names
    shuffle: random.Random


def run_operation(operation: str, body: Mapping[str, object], context: Context) -> Outcome:
    """Run one catalogue operation (Creators path name, e.g. ``getItems``) on a parsed body.

    Raises:
        Rejected: the whole request is refused.
    """
    tag = _partner_tag(body, context)
    if operation == "getItems":
        return _get_items(body, context, tag)
    if operation == "searchItems":
        return _search_items(body, context, tag)
    if operation == "getVariations":
        return _get_variations(body, context, tag)
    return _get_browse_nodes(body, context)


def _partner_tag(body: Mapping[str, object], ctx: Context) -> str:
    field = ctx.names("partnerTag")
    tag = body.get(field)
    if tag is None or (isinstance(tag, str) and not tag.strip()):
        raise Rejected("missing", field)
    if not isinstance(tag, str):
        raise Rejected("bad_value", field, value=str(tag), detail="must be a string")
    if ctx.account.no_store:
        raise Rejected("invalid_associate", field, value=tag)
    if not ctx.account.has_tag(ctx.marketplace, tag):
        raise Rejected("invalid_partner_tag", field, value=tag)
    return tag


def _string_list(
    body: Mapping[str, object], field: str, *, low: int, high: int, required: bool = True
) -> list[str] | None:
    raw = body.get(field)
    if raw is None:
        if required:
            raise Rejected("missing", field)
        return None
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        raise Rejected("bad_value", field, value=str(raw), detail="must be a list of strings")
    if not low <= len(raw) <= high:
        if not raw and required:
            raise Rejected("missing", field)
        raise Rejected(
            "bad_value",
            field,
            value=",".join(raw),
            detail=f"must contain between {low} and {high} items",
        )
    return list(raw)


def _integer(body: Mapping[str, object], field: str, default: int, low: int, high: int) -> int:
    raw = body.get(field)
    if raw is None:
        return default
    if isinstance(raw, bool) or not isinstance(raw, int | float) or raw != int(raw):
        raise Rejected("bad_value", field, value=str(raw), detail="must be an integer")
    if not low <= raw <= high:
        raise Rejected(
            "bad_value", field, value=str(raw), detail=f"must be between {low} and {high}"
        )
    return int(raw)


#: PA-API's ``Merchant`` values, ``ItemIdType``'s (and ``itemIdType``'s) one value, and the
#: largest integer its models take.
_MERCHANTS: Final = frozenset({"All", "Amazon"})
_ITEM_ID_TYPES: Final = frozenset({"ASIN"})
_MAX_INT32: Final = 2**31 - 1


def _enum(field: str, value: object, allowed: frozenset[str]) -> str:
    """``value`` when it is one of ``allowed``; anything else, a list or a number too, is
    refused as a bad value (never a 500)."""
    if isinstance(value, str) and value in allowed:
        return value
    raise Rejected(
        "bad_value",
        field,
        value=str(value),
        detail="must be one of " + ", ".join(sorted(allowed)),
    )


def _check_condition(body: Mapping[str, object], ctx: Context) -> None:
    """The Creators API takes ``condition`` ``Any`` or ``New`` only (protocol.md 2.5);
    PA-API its five conditions."""
    field = ctx.names("condition")
    value = body.get(field)
    if value is None:
        return
    _enum(
        field, value, _CREATORS_CONDITIONS if ctx.names.style == "creators" else _PAAPI_CONDITIONS
    )


def _check_request(body: Mapping[str, object], ctx: Context) -> None:
    """What every operation's request must hold: PA-API's ``PartnerType`` (required, with
    its one value, protocol.md 3.3), and its ``Merchant`` and ``OfferCount`` when given; on
    the Creators API, at most one language (2.5); on both, the optional fields typed as the
    models type them (a currency a string of at most 100 characters, languages a list of
    strings, properties a map of strings). A client that sends them wrongly typed is
    refused, as Amazon refuses it, not served."""
    names = ctx.names
    if names.style == "paapi5":
        partner_type = body.get("PartnerType")
        if partner_type is None:
            raise Rejected("missing", "PartnerType")
        if partner_type != "Associates":
            raise Rejected("bad_value", "PartnerType", value=str(partner_type))
        if body.get("Merchant") is not None:
            _enum("Merchant", body["Merchant"], _MERCHANTS)
        _integer(body, "OfferCount", 1, 1, _MAX_INT32)
    # The Creators model takes one language (protocol.md 2.5); PA-API names no limit.
    high = 1 if names.style == "creators" else _MAX_INT32
    _string_list(body, names("languagesOfPreference"), low=0, high=high, required=False)
    field = names("currencyOfPreference")
    currency = body.get(field)
    if currency is not None and not (isinstance(currency, str) and 0 < len(currency) <= 100):
        raise Rejected("bad_value", field, value=str(currency), detail="must be a currency code")
    field = names("properties")
    properties = body.get(field)
    if properties is not None and not (
        isinstance(properties, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in properties.items())
    ):
        raise Rejected(
            "bad_value", field, value=str(properties), detail="must map strings to strings"
        )


def _search_options(body: Mapping[str, object], ctx: Context) -> dict[str, Any]:
    """SearchItems' enums and ranges beyond the terms and prices (protocol.md 2.5), as
    :func:`search_results` narrows by them."""
    field = ctx.names("availability")
    value = body.get(field)
    availability = None if value is None else _enum(field, value, _AVAILABILITY)
    field = ctx.names("deliveryFlags")
    flags = _string_list(body, field, low=0, high=len(_DELIVERY_FLAGS), required=False)
    for flag in flags or ():
        _enum(field, flag, _DELIVERY_FLAGS)
    rating, saving = ctx.names("minReviewsRating"), ctx.names("minSavingPercent")
    # null is absent, as everywhere in the simulator (not _integer's default of 1).
    stars = None if body.get(rating) is None else _integer(body, rating, 1, 1, 4)
    share = None if body.get(saving) is None else _integer(body, saving, 1, 1, 99)
    return {
        "availability": availability,
        "delivery_flags": tuple(flags or ()),
        "min_reviews_rating": stars,
        "min_saving_percent": share,
    }


def _resources(
    body: Mapping[str, object], ctx: Context, extra: frozenset[str] = frozenset()
) -> frozenset[str]:
    field = ctx.names("resources")
    requested = _string_list(body, field, low=0, high=100, required=False)
    if requested is None:
        requested = [ctx.names("itemInfo") + "." + ctx.names("title")]
    if ctx.names.style == "creators":
        known = CREATORS_ITEM_RESOURCES | extra
    else:
        known = PAAPI_ITEM_RESOURCES | {paapi_resource(r) for r in extra}
    for resource in requested:
        if resource not in known:
            raise Rejected(
                "bad_value", field, value=resource, detail=f"{resource} is not a valid resource"
            )
    return resources_key(requested, ctx.names.style)


def _render(ctx: Context, asin: str, resources: frozenset[str], tag: str) -> str | None:
    return item_json(ctx.settings, ctx.marketplace, asin, resources, tag, ctx.names.style)


def _join(ctx: Context, key: str, parts: Sequence[str], extra: str = "") -> str:
    return "{" + json.dumps(ctx.names(key)) + ":[" + ",".join(parts) + "]" + extra + "}"


def _get_items(body: Mapping[str, object], ctx: Context, tag: str) -> Outcome:
    ids = _string_list(body, ctx.names("itemIds"), low=1, high=10)
    assert ids is not None
    _check_request(body, ctx)
    field = ctx.names("itemIdType")
    if body.get(field) is not None:
        _enum(field, body[field], _ITEM_ID_TYPES)  # "ASIN", the only one (protocol.md 2.5)
    if ctx.names.style == "paapi5":
        # PA-API fails the whole request on one malformed id (protocol.md 3.4).
        for item_id in ids:
            if not is_well_formed(item_id):
                raise Rejected("bad_value", "ItemIds", value=item_id)
    _check_condition(body, ctx)
    resources = _resources(body, ctx)
    rendered: list[str] = []
    errors: list[ItemError] = []
    seen: set[str] = set()
    omitted = 0
    for item_id in ids:
        key = item_id.upper()
        if key in seen:
            continue
        seen.add(key)
        if key in ctx.settings.omitted_asins:
            omitted += 1
            continue
        entry = lookup(ctx.settings, ctx.marketplace, item_id)
        if entry.item is None:
            kind: ItemErrorKind = (
                "not_accessible"
                if entry.status == "not_accessible"
                else ("invalid" if entry.status == "invalid" else "not_found")
            )
            errors.append(ItemError(kind, item_id))
            continue
        text = _render(ctx, item_id, resources, tag)
        if text is not None:
            rendered.append(text)
    if not rendered and ctx.names.style == "creators" and (errors or not omitted):
        only_inaccessible = all(e.kind == "not_accessible" for e in errors)
        if not only_inaccessible or ctx.settings.not_found_when_all_inaccessible:
            raise Rejected(
                "not_found",
                resource_type="Item",
                resource_id=",".join(e.item_id for e in errors),
                detail="No items found for the requested item IDs.",
            )
    if ctx.settings.shuffle_items:
        ctx.shuffle.shuffle(rendered)
    # An answer whose every id was omitted still has its (empty) item list: silently
    # missing items, not a malformed answer.
    payload = _join(ctx, "items", rendered) if rendered or omitted else ""
    return Outcome("itemsResult", payload, tuple(errors), len(rendered), omitted)


def _search_items(body: Mapping[str, object], ctx: Context, tag: str) -> Outcome:
    _check_request(body, ctx)
    terms: list[str] = []
    filters: dict[str, str] = {}
    for field in _SEARCH_FIELDS:
        value = body.get(ctx.names(field))
        if value is not None:
            if not isinstance(value, str) or not value.strip():
                raise Rejected(
                    "bad_value",
                    ctx.names(field),
                    value=str(value),
                    detail="must be a non-empty string",
                )
            node = field == "browseNodeId"
            limit = _NODE_ID_CHARS if node else _TERM_CHARS
            if len(value) > limit or (node and not (value.isascii() and value.isdigit())):
                raise Rejected(
                    "bad_value",
                    ctx.names(field),
                    value=value[:40],
                    detail=f"must be a browse node id (at most {limit} digits)"
                    if node
                    else f"must be at most {limit} characters",
                )
            if field in _SEARCH_FILTERS:
                filters[field] = value  # narrows the search; not a search term
            else:
                terms.append(value)
    if not terms and not filters:
        raise Rejected(
            "missing",
            ctx.names("keywords"),
            detail="give at least one of keywords, actor, artist, author, brand, "
            "title, browseNodeId or searchIndex",
        )
    high = 100 if ctx.names.style == "creators" else 10
    count = _integer(body, ctx.names("itemCount"), 10, 1, high)
    page = _integer(body, ctx.names("itemPage"), 1, 1, 10)
    _check_condition(body, ctx)
    narrowing = _search_options(body, ctx)
    resources = _resources(body, ctx, EXTRA_RESOURCES["searchItems"])
    # At least 1 (the lowest currency unit) when given, as the SDK's field rules say.
    low = _integer(body, ctx.names("minPrice"), 0, 1, _MAX_PRICE)
    high = _integer(body, ctx.names("maxPrice"), _MAX_PRICE, 1, _MAX_PRICE)
    sort_by = body.get(ctx.names("sortBy"))
    order = None if sort_by is None else _enum(ctx.names("sortBy"), sort_by, _SORT_ORDERS)
    query = " ".join(terms)
    found = search_results(
        ctx.settings,
        ctx.marketplace,
        query,
        min_price=low if ctx.names("minPrice") in body else None,
        max_price=high if ctx.names("maxPrice") in body else None,
        sort_by=order,
        browse_node=filters.get("browseNodeId"),
        search_index=filters.get("searchIndex"),
        brand=filters.get("brand"),
        **narrowing,
    )
    total, asins = len(found), found[(page - 1) * count : page * count]
    if not asins:
        raise Rejected(
            "not_found",
            resource_type="SearchResult",
            resource_id=query,
            detail="No results found for your search request",
        )
    rendered = [text for asin in asins if (text := _render(ctx, asin, resources, tag))]
    url = f"https://{ctx.marketplace}/s?k={quote_plus(query)}"
    if filters.get("searchIndex", "All") != "All":
        url += f"&i={quote_plus(filters['searchIndex'])}"
    if "browseNodeId" in filters:
        url += f"&rh={quote_plus('n:' + filters['browseNodeId'])}"
    url += f"&tag={tag}&linkCode=osi"
    extra = (
        f",{json.dumps(ctx.names('totalResultCount'))}:{total},"
        f"{json.dumps(ctx.names('searchURL'))}:{json.dumps(url)}"
    )
    if "searchRefinements" in resources:
        refinements = json.dumps(_refinements(ctx, found), ensure_ascii=False)
        extra += f",{json.dumps(ctx.names('searchRefinements'))}:{refinements}"
    return Outcome("searchResult", _join(ctx, "items", rendered, extra), (), len(rendered))


def _refinements(ctx: Context, asins: Sequence[str]) -> dict[str, object]:
    """SearchRefinements (the SDK's shape) for every item the search found, not only the
    page's: their departments, as root browse nodes and as search indexes, and their
    brands, each bin once in order of first appearance."""
    n = ctx.names
    departments: dict[str, str] = {}
    brands: dict[str, None] = {}
    for asin in asins:
        item = lookup(ctx.settings, ctx.marketplace, asin).item
        if item is None:
            continue
        brands[item.brand] = None
        for node in item.browse_nodes:
            root_id, root_name = node.ancestors[-1] if node.ancestors else (node.id, node.name)
            departments.setdefault(root_id, root_name)

    def refinement(ref_id: str, name: str, bins: list[tuple[str, str]]) -> dict[str, object]:
        return {
            n("bins"): [{n("displayName"): label, n("id"): value} for value, label in bins],
            n("displayName"): name,
            n("id"): ref_id,
        }

    return {
        n("browseNode"): refinement("BrowseNode", "Department", list(departments.items())),
        n("otherRefinements"): [refinement("Brand", "Brand", [(brand, brand) for brand in brands])],
        n("searchIndex"): refinement(
            "SearchIndex",
            "Department",
            [(search_index_of(name), name) for name in departments.values()],
        ),
    }


def _get_variations(body: Mapping[str, object], ctx: Context, tag: str) -> Outcome:
    _check_request(body, ctx)
    field = ctx.names("asin")
    asin = body.get(field)
    if asin is None or asin == "":
        raise Rejected("missing", field)
    if not isinstance(asin, str) or not is_well_formed(asin):
        raise Rejected("bad_value", field, value=str(asin))
    count = _integer(body, ctx.names("variationCount"), 10, 1, 10)
    page = _integer(body, ctx.names("variationPage"), 1, 1, _MAX_PAGE)
    _check_condition(body, ctx)
    resources = _resources(body, ctx, EXTRA_RESOURCES["getVariations"])
    parent, children = variation_asins(ctx.settings, ctx.marketplace, asin)
    if asin.upper() != parent and lookup(ctx.settings, ctx.marketplace, asin).item is None:
        # A child not served here shows no family; a parent, never an offer itself, does.
        children = []
    page_ids = children[(page - 1) * count : page * count]
    if not page_ids:
        raise Rejected(
            "not_found",
            resource_type="Variation",
            resource_id=asin.upper(),
            detail="No variations found for the requested ASIN.",
        )
    # The summary describes the whole set of variations, whichever page is asked for.
    colors: list[str] = []
    sizes: list[str] = []
    prices: list[tuple[float, str, str]] = []
    for child in children:
        child_item = lookup(ctx.settings, ctx.marketplace, child).item
        if child_item is not None:
            colors.append(child_item.color)
            if child_item.size is not None:
                sizes.append(child_item.size)
            listing = child_item.listing
            prices.append((listing.amount, listing.currency, listing.display_amount))
    rendered: list[str] = []
    for child in page_ids:
        child_entry = lookup(ctx.settings, ctx.marketplace, child)
        if child_entry.item is None:
            continue
        text = _render(ctx, child, resources, tag)
        if text is None:
            continue
        tree = json.loads(text)
        # The item names its family's parent itself (when asked); not asked, the member is
        # a null like every other one, only where nulls are sent (Creators, explicit_nulls).
        if ctx.names.style == "creators" and ctx.settings.explicit_nulls:
            tree.setdefault(ctx.names("parentASIN"), None)
        tree[ctx.names("variationAttributes")] = [
            {ctx.names("name"): name, ctx.names("value"): value}
            for name, value in (
                ("color_name", child_entry.item.color),
                ("size_name", child_entry.item.size),
            )
            if value is not None
        ]
        rendered.append(json.dumps(tree, ensure_ascii=False, separators=(",", ":")))
    n = ctx.names
    summary: dict[str, object] = {
        n("pageCount"): max(1, -(-len(children) // count)),
        n("variationCount"): len(children),
    }
    if "variationSummary.variationDimension" in resources:
        locale = served_as(ctx.marketplace).locale
        summary[n("variationDimensions")] = [
            {
                n("displayName"): display,
                n("locale"): locale,
                n("name"): name,
                # In the order the family has them (sizes from small to large).
                n("values"): list(dict.fromkeys(values)),
            }
            for display, name, values in (
                ("Color", "color_name", colors),
                ("Size", "size_name", sizes),
            )
            if values
        ]
    extremes = {"highestPrice": max(prices), "lowestPrice": min(prices)} if prices else {}
    asked = {
        name: price
        for name, price in extremes.items()
        if f"variationSummary.price.{name}" in resources
    }
    if asked:
        # Each price only when asked; the other a null where nulls are sent (protocol.md
        # 2.6: unrequested members are explicit nulls), else left out.
        nulls = ctx.names.style == "creators" and ctx.settings.explicit_nulls
        summary[n("price")] = {
            n(name): (
                {n("amount"): price[0], n("currency"): price[1], n("displayAmount"): price[2]}
                if (price := asked.get(name)) is not None
                else None
            )
            for name in ("highestPrice", "lowestPrice")
            if name in asked or nulls
        }
    extra = f",{json.dumps(n('variationSummary'))}:{json.dumps(summary, ensure_ascii=False)}"
    return Outcome("variationsResult", _join(ctx, "items", rendered, extra), (), len(rendered))


def _get_browse_nodes(body: Mapping[str, object], ctx: Context) -> Outcome:
    _check_request(body, ctx)
    n = ctx.names
    # PA-API never sends an explicit null, nor does the Creators API unless told to.
    bare = ctx.names.style == "paapi5" or not ctx.settings.explicit_nulls
    ids = _string_list(body, n("browseNodeIds"), low=1, high=10)
    assert ids is not None
    requested = _string_list(body, n("resources"), low=0, high=100, required=False) or []
    known = {n("browseNodes") + "." + n("ancestor"), n("browseNodes") + "." + n("children")}
    for resource in requested:
        if resource not in known:
            raise Rejected(
                "bad_value",
                n("resources"),
                value=resource,
                detail=f"{resource} is not a valid resource",
            )
    want_ancestor = n("browseNodes") + "." + n("ancestor") in requested
    want_children = n("browseNodes") + "." + n("children") in requested
    nodes: list[dict[str, object]] = []
    errors: list[ItemError] = []
    for node_id in ids:
        found = browse_node(node_id)
        if found is None:
            errors.append(ItemError("bad_node", node_id))
            continue
        name, ancestors, children = found
        ancestor: dict[str, object] | None = None
        if want_ancestor:
            for anc_id, anc_name in reversed(ancestors):
                ancestor = {
                    n("ancestor"): ancestor,
                    n("contextFreeName"): anc_name,
                    n("displayName"): anc_name,
                    n("id"): anc_id,
                }
                if bare and ancestor[n("ancestor")] is None:
                    del ancestor[n("ancestor")]
        node: dict[str, object] = {
            n("ancestor"): ancestor,
            n("children"): [
                {n("contextFreeName"): c_name, n("displayName"): c_name, n("id"): c_id}
                for c_id, c_name in children
            ]
            if want_children
            else None,
            n("contextFreeName"): name,
            n("displayName"): name,
            n("id"): node_id,
            n("isRoot"): not ancestors,
            n("salesRank"): None,
        }
        if bare:
            node = {k: v for k, v in node.items() if v is not None}
        nodes.append(node)
    if not nodes:
        raise Rejected(
            "not_found",
            resource_type="BrowseNode",
            resource_id=",".join(ids),
            detail="No browse nodes found for the requested browse node IDs.",
        )
    payload = "{" + json.dumps(n("browseNodes")) + ":" + json.dumps(nodes, ensure_ascii=False) + "}"
    return Outcome("browseNodesResult", payload, tuple(errors), len(nodes))
