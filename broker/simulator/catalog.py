"""The simulator's catalogue: a deterministic synthetic item for every well-formed ASIN.

Product facts (title, brand, features, images, browse nodes, reviews) come from a seeded hash
of (seed, ASIN), those a variation shares with its siblings from its family's parent; the
offer (price in the marketplace's currency, availability, merchant) and
whether the item exists or is accessible come from a hash of (seed, marketplace, ASIN). So the
same settings always produce the same catalogue, and tests of the whole product can check
output rows against :func:`lookup` (and :func:`broker.simulator.render.render_item` for the
exact wire JSON).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Final, Literal

from broker.simulator.marketplaces import Marketplace, format_amount, served_as

if TYPE_CHECKING:
    from broker.simulator.settings import SimulatorSettings

__all__ = [
    "BrowseNodeData",
    "CatalogEntry",
    "CatalogItem",
    "ItemStatus",
    "Listing",
    "browse_node",
    "is_well_formed",
    "lookup",
    "lookup_by_key",
    "search_results",
    "variation_asins",
]

ItemStatus = Literal["ok", "not_found", "not_accessible", "invalid"]

_WELL_FORMED = re.compile(r"[0-9A-Za-z]{10}")


@dataclass(frozen=True, slots=True)
class Listing:
    """The featured (buy-box) offer of an item in one marketplace."""

    amount: float
    currency: str
    display_amount: str
    availability_type: str
    availability_message: str
    max_order_quantity: int
    condition: str
    merchant_name: str
    merchant_id: str
    saving_basis_amount: float | None
    saving_basis_display: str | None
    savings_amount: float | None
    savings_display: str | None
    savings_percentage: int | None
    deal_badge: str | None
    loyalty_points: int | None


@dataclass(frozen=True, slots=True)
class BrowseNodeData:
    """A browse node and its chain of ancestors, nearest first."""

    id: str
    name: str
    sales_rank: int
    ancestors: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class CatalogItem:
    """Every fact the simulator can render for one ASIN in one marketplace."""

    asin: str
    marketplace: str
    locale: str
    title: str
    brand: str
    manufacturer: str
    features: tuple[str, ...]
    product_group: str
    binding: str
    color: str
    #: a variation's size (in a family of more children than colours), else None
    size: str | None
    model: str
    part_number: str
    ean: str
    release_date: str
    image_ids: tuple[str, ...]
    browse_nodes: tuple[BrowseNodeData, ...]
    website_sales_rank: int
    review_count: int
    star_rating: float
    parent_asin: str | None
    listing: Listing

    def detail_page_url(self, partner_tag: str) -> str:
        """The detail page URL carrying ``partner_tag``, as Amazon builds it."""
        return (
            f"https://{self.marketplace}/dp/{self.asin}?tag={partner_tag}&linkCode=ogi&th=1&psc=1"
        )


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """What the simulator knows of one (marketplace, id): its status and, if any, the item."""

    asin: str
    marketplace: str
    status: ItemStatus
    item: CatalogItem | None


def is_well_formed(item_id: str) -> bool:
    """True when ``item_id`` looks like an ASIN: exactly 10 ASCII letters or digits."""
    return _WELL_FORMED.fullmatch(item_id) is not None


def lookup(settings: SimulatorSettings, marketplace: str, asin: str) -> CatalogEntry:
    """Return whether ``asin`` exists and is accessible in ``marketplace``, and its item.

    ``status`` is ``invalid`` for an id that is not 10 letters or digits, ``not_found`` or
    ``not_accessible`` for the configured shares of well-formed ids, else ``ok``. ``item`` is
    set for ``ok`` only. Lower-case ids are looked up upper-cased.
    """
    return lookup_by_key(
        settings.seed, settings.missing_share, settings.inaccessible_share, marketplace, asin
    )


#: The SearchItems orders the simulator applies (True: descending); the others (Relevance,
#: Featured, NewestArrivals, AvgCustomerReviews) keep its relevance order.
PRICE_ORDERS: Final = {"Price:LowToHigh": False, "Price:HighToLow": True}


def search_index_of(department: str) -> str:
    """A department's search index, spelled as Amazon's are: its name with ``&`` as ``And``
    and without spaces or punctuation (``Home & Kitchen`` is ``HomeAndKitchen``)."""
    return "".join(ch for ch in department.replace("&", "And") if ch.isalnum())


def _department(node: BrowseNodeData) -> str:
    """The name of a node's department (its root)."""
    return node.ancestors[-1][1] if node.ancestors else node.name


#: The seller whose offers the delivery flags keep (Amazon's own merchant id in the US).
AMAZON_MERCHANT_ID: Final = "ATVPDKIKX0DER"


# A client pages through one search: each page reads the same list. A search leaves out
# the items out of stock by default, which takes every candidate's item (about 60 ms for a
# few hundred, when they are not already built): once per search, not once per page.
@lru_cache(maxsize=64)
def search_results(
    settings: SimulatorSettings,
    marketplace: str,
    query: str,
    *,
    min_price: int | None = None,
    max_price: int | None = None,
    sort_by: str | None = None,
    browse_node: str | None = None,
    search_index: str | None = None,
    brand: str | None = None,
    availability: str | None = None,
    delivery_flags: tuple[str, ...] = (),
    min_reviews_rating: int | None = None,
    min_saving_percent: int | None = None,
) -> Sequence[str]:
    """Every result of a search, in order, deterministically.

    A query that starts with ``noresults`` finds nothing (a documented simulator convention,
    so tests can reach the no-results answer). ``min_price`` and ``max_price`` (in the
    currency's smallest unit, as both APIs take them) keep the items whose featured offer
    lies within; ``browse_node`` the items under that node (one of theirs or an ancestor);
    ``search_index`` (a department's, as :func:`search_index_of` spells it and the
    refinements give it; ``All`` is every one) the items of that department; ``brand`` (as
    the refinements give it, in any case) the items of that brand; ``sort_by``
    ``Price:LowToHigh`` or ``Price:HighToLow`` orders by the price. ``availability``
    ``IncludeOutOfStock`` keeps the items out of stock, which Amazon's default
    (``Available``, or None) leaves out; ``delivery_flags`` (any of them) keep the items
    Amazon sells itself; ``min_reviews_rating`` the items rated at least that many stars;
    ``min_saving_percent`` the items whose offer saves at least that share.
    """
    if query.lower().startswith("noresults"):
        return ()
    served = _served(
        settings.seed, settings.missing_share, settings.inaccessible_share, marketplace, query
    )
    index = None if search_index in (None, "All") else search_index
    maker = None if brand is None else brand.strip().casefold()
    in_stock = availability != "IncludeOutOfStock"
    filtered = (
        min_price is not None
        or max_price is not None
        or browse_node
        or index
        or maker
        or in_stock
        or delivery_flags
        or min_reviews_rating is not None
        or min_saving_percent is not None
    )
    if not filtered and sort_by not in PRICE_ORDERS:
        return served
    # A filter or a price order needs every result's item: all of them are looked up.
    market = served_as(marketplace)
    unit = 10**market.currency.decimals
    priced: list[tuple[int, str]] = []
    for candidate in served:
        item = lookup(settings, marketplace, candidate).item
        if item is None:
            continue
        offer = item.listing
        if in_stock and offer.availability_type == "OUT_OF_STOCK":
            continue
        if delivery_flags and offer.merchant_id != AMAZON_MERCHANT_ID:
            continue
        if min_reviews_rating is not None and item.star_rating < min_reviews_rating:
            continue
        if min_saving_percent is not None and (offer.savings_percentage or 0) < min_saving_percent:
            continue
        if browse_node and not any(
            browse_node == node.id or any(browse_node == a for a, _ in node.ancestors)
            for node in item.browse_nodes
        ):
            continue
        if index and index not in {search_index_of(_department(n)) for n in item.browse_nodes}:
            continue
        if maker and item.brand.casefold() != maker:
            continue
        price = round(offer.amount * unit)
        if (min_price is None or price >= min_price) and (max_price is None or price <= max_price):
            priced.append((price, candidate))
    if sort_by in PRICE_ORDERS:
        # Stable: items of one price keep their relevance order.
        priced.sort(key=lambda entry: entry[0], reverse=PRICE_ORDERS[sort_by])
    return tuple(asin for _, asin in priced)


@lru_cache(maxsize=64)  # a client pages through one search: each page reads the same list
def _served(
    seed: int, missing: float, inaccessible: float, marketplace: str, query: str
) -> tuple[str, ...]:
    """A search's results in relevance order: the candidates the catalogue serves.

    Only those are results, so pages follow one list (none overlaps the next) and the total
    counts what can be paged through. How many candidates is the query's own, the same
    whatever the page size asked; telling which are served takes a hash each, not an item.
    """
    rng = _rng(seed, "search", marketplace, query)
    candidates = (
        _derived_asin(seed, "search", marketplace, query, str(index))
        for index in range(rng.randrange(30, 1000))
    )
    return tuple(
        asin
        for asin in candidates
        if _status(seed, missing, inaccessible, marketplace, asin) == "ok"
    )


#: Variation families. A family is made of the ASINs that differ only in their last character
#: (they share its stem), so that an item's parent and a parent's children derive from each
#: other with nothing remembered. Every stem of a B0 ASIN has one: about half of the 36 last
#: characters make its children and one other its parent ASIN. So about half of the B0
#: ASINs are a child with some 17 siblings, and GetVariations of the others finds nothing,
#: as on Amazon, where most items have no variations. Books (ISBN-10 ids, whose last
#: character is a check digit) have none.
_MEMBER_SHARE: Final = 0.5


@lru_cache(maxsize=4096)
def _family(seed: int, stem: str) -> tuple[str, tuple[str, ...]] | None:
    """(parent ASIN, child ASINs in order) of the family of ``stem`` (9 characters, upper
    case), or None for a stem that is not a B0 ASIN's."""
    if not stem.startswith("B0"):
        return None
    rng = _rng(seed, "family", stem)
    parent = rng.choice(_ASIN_CHARS)
    children = tuple(
        stem + char for char in _ASIN_CHARS if char != parent and rng.random() < _MEMBER_SHARE
    )
    return stem + parent, children


def variation_asins(
    settings: SimulatorSettings, marketplace: str, asin: str
) -> tuple[str | None, list[str]]:
    """The parent of ``asin``'s family and its children served in ``marketplace``.

    ``asin`` may be the parent or any child: all get the same family, whose children name
    that parent in their items. ``(None, [])`` for an ASIN that is neither.
    """
    asin = asin.upper()
    family = _family(settings.seed, asin[:-1])
    if family is None or (asin != family[0] and asin not in family[1]):
        return None, []
    parent, children = family
    return parent, [c for c in children if lookup(settings, marketplace, c).status == "ok"]


def browse_node(
    node_id: str,
) -> tuple[str, tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] | None:
    """Return (name, ancestors nearest first, children) of a browse node id, or None.

    Known ids are those of the simulator's small taxonomy; other all-digit ids get a
    synthetic name; anything else (zero, other than 1 to 19 ASCII digits) is invalid.
    """
    if not (node_id.isascii() and node_id.isdigit()) or len(node_id) > 19 or int(node_id) == 0:
        return None
    for chain in (*_TAXONOMY, *_BROWSE_ONLY):
        ids = [node for node, _ in chain]
        if node_id in ids:
            at = ids.index(node_id)
            ancestors = tuple(reversed(chain[:at]))
            children = (chain[at + 1],) if at + 1 < len(chain) else ()
            return chain[at][1], ancestors, children
    return f"Category {node_id}", (), ()


# -- generation -------------------------------------------------------------------------

_BRANDS = (
    "Acme",
    "Northwind",
    "Globex",
    "Initech",
    "Umbrella",
    "Stark",
    "Wayne",
    "Tyrell",
    "Soylent",
    "Hooli",
    "Vandelay",
    "Cyberdyne",
    "Aperture",
    "Massive",
    "Wonka",
)
_ADJECTIVES = (
    "Compact",
    "Wireless",
    "Portable",
    "Premium",
    "Smart",
    "Ultra-Slim",
    "Rugged",
    "Classic",
    "Ergonomic",
    "Rechargeable",
    "Stainless",
    "Foldable",
)
_NOUNS = (
    "Bluetooth Speaker",
    "Desk Lamp",
    "Coffee Grinder",
    "Backpack",
    "Headphones",
    "Water Bottle",
    "Keyboard",
    "Phone Stand",
    "Air Purifier",
    "Chef's Knife",
    "Yoga Mat",
    "Travel Mug",
    "Power Bank",
    "Webcam",
    "Electric Kettle",
)
_COLORS = ("Black", "White", "Silver", "Navy Blue", "Red", "Forest Green", "Graphite", "Rose Gold")
#: with _COLORS, a distinct pair for each child of a family (at most 35)
_SIZES = ("Small", "Medium", "Large", "X-Large", "XX-Large")
_FEATURES = (
    "Built to last with premium materials",
    "Easy to set up in minutes, no tools required",
    "Compact design that fits anywhere",
    "Long-lasting battery for all-day use",
    "Backed by a 1-year limited warranty",
    "Energy efficient and quiet in operation",
    "Dishwasher-safe parts for easy cleaning",
    "Works with most devices and accessories",
    "Lightweight for travel and everyday carry",
)
_TAXONOMY: tuple[tuple[tuple[str, str], ...], ...] = (
    (("172282", "Electronics"), ("667846011", "Home Audio"), ("12097479011", "Speakers")),
    (("1055398", "Home & Kitchen"), ("284507", "Kitchen & Dining"), ("289913", "Coffee Grinders")),
    (
        ("541966", "Computers & Accessories"),
        ("172456", "Computer Accessories & Peripherals"),
        ("12879431", "Keyboards"),
    ),
    (
        ("3375251", "Sports & Outdoors"),
        ("706814011", "Outdoor Recreation"),
        ("3400371", "Water Bottles"),
    ),
    (
        ("2335752011", "Cell Phones & Accessories"),
        ("2407755011", "Accessories"),
        ("7073956011", "Portable Power Banks"),
    ),
)
#: Nodes GetBrowseNodes knows that no generated item is filed under (kept out of _TAXONOMY,
#: whose every entry is drawn for items: adding one would change every item of a seed).
#: 283155 (Books) is the node Amazon's and our docs use as the example.
_BROWSE_ONLY: tuple[tuple[tuple[str, str], ...], ...] = (
    (("283155", "Books"), ("1000", "Subjects"), ("5", "Computers & Technology")),
)
_AVAILABILITY = (
    # type, message, weight
    ("IN_STOCK", "In Stock", 80),
    ("IN_STOCK_SCARCE", "Only {n} left in stock - order soon.", 5),
    ("OUT_OF_STOCK", "Currently unavailable.", 5),
    ("LEADTIME", "Usually ships within 4 to 5 days.", 4),
    ("PREORDER", "Available for Pre-order.", 3),
    ("AVAILABLE_DATE", "This item will be released on June 30, 2026.", 3),
)
# Rough price levels per currency, relative to USD, so prices look plausible everywhere.
_PRICE_LEVEL: Mapping[str, float] = {
    "USD": 1.0,
    "CAD": 1.35,
    "MXN": 17.0,
    "BRL": 5.0,
    "GBP": 0.8,
    "EUR": 0.92,
    "PLN": 4.0,
    "SEK": 10.5,
    "TRY": 32.0,
    "AED": 3.67,
    "SAR": 3.75,
    "INR": 83.0,
    "EGP": 48.0,
    "JPY": 150.0,
    "AUD": 1.5,
    "SGD": 1.35,
}
_ASIN_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _digest(*parts: object) -> bytes:
    return hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=16).digest()


def _rng(*parts: object) -> random.Random:
    return random.Random(int.from_bytes(_digest(*parts), "big"))


def _derived_asin(*parts: object) -> str:
    number = int.from_bytes(_digest(*parts), "big")
    chars = []
    for _ in range(8):
        number, rem = divmod(number, 36)
        chars.append(_ASIN_CHARS[rem])
    return "B0" + "".join(chars)


# Bounded well below a big job's ASIN count: the simulator embedded in a broker shares its
# process, and 131,072 items with 65,536 of their JSON held about 340 MB (16,384 of each:
# about 45 MB). An item not kept is rendered again, at about 70 us.
@lru_cache(maxsize=16_384)
def lookup_by_key(
    seed: int, missing: float, inaccessible: float, marketplace: str, asin: str
) -> CatalogEntry:
    """:func:`lookup` by its cache key (seed, shares, marketplace, id); cached."""
    status = _status(seed, missing, inaccessible, marketplace, asin)
    if status == "invalid":
        return CatalogEntry(asin, marketplace, status, None)
    asin = asin.upper()
    if status != "ok":
        return CatalogEntry(asin, marketplace, status, None)
    market = served_as(marketplace)
    return CatalogEntry(asin, marketplace, "ok", _make_item(seed, market, asin))


def _status(
    seed: int, missing: float, inaccessible: float, marketplace: str, asin: str
) -> ItemStatus:
    """Whether ``asin`` is served in ``marketplace``: cheap (a hash), with no item built."""
    if not is_well_formed(asin):
        return "invalid"
    draw = int.from_bytes(_digest(seed, "exists", marketplace, asin.upper())[:8], "big")
    share = draw / 2.0**64
    if share < missing:
        return "not_found"
    if share < missing + inaccessible:
        return "not_accessible"
    return "ok"


def _make_item(seed: int, market: Marketplace, asin: str) -> CatalogItem:
    family = _family(seed, asin[:-1])
    place = family[1].index(asin) if family is not None and asin in family[1] else None
    parent = family[0] if family is not None and place is not None else None
    # A family's children are one product in several colours and sizes: what they share
    # (brand, title, features, reviews) comes from the parent, the rest from the ASIN.
    product = _rng(seed, "product", parent or asin)
    own = _rng(seed, "item", asin)
    brand = product.choice(_BRANDS)
    noun = product.choice(_NOUNS)
    color = product.choice(_COLORS)
    size = None
    if family is not None and place is not None:
        color = _COLORS[place % len(_COLORS)]
        if len(family[1]) > len(_COLORS):
            size = _SIZES[place // len(_COLORS)]
    model = f"{brand[:2].upper()}-{product.randrange(100, 9999)}"
    title = f"{brand} {product.choice(_ADJECTIVES)} {noun}, {color}, {model}"
    if size is not None:
        title = f"{title}, {size}"
    features = tuple(product.sample(_FEATURES, product.randint(3, 5)))
    chain = product.choice(_TAXONOMY)
    nodes = (
        BrowseNodeData(
            chain[-1][0], chain[-1][1], own.randrange(1, 50_000), tuple(reversed(chain[:-1]))
        ),
    )
    year = product.randrange(2015, 2026)
    return CatalogItem(
        asin=asin,
        marketplace=market.name,
        locale=market.locale,
        title=title,
        brand=brand,
        manufacturer=f"{brand} Industries",
        features=features,
        product_group=chain[0][1],
        binding=chain[0][1],
        color=color,
        size=size,
        model=model,
        part_number=f"{model}-{own.randrange(10, 99)}",
        ean="".join(str(own.randrange(10)) for _ in range(13)),
        release_date=f"{year}-{product.randrange(1, 13):02d}-{product.randrange(1, 29):02d}"
        "T00:00:01Z",
        image_ids=tuple(_image_id(own) for _ in range(own.randint(1, 4))),
        browse_nodes=nodes,
        website_sales_rank=own.randrange(1, 500_000),
        review_count=product.randrange(0, 25_000),
        star_rating=round(product.uniform(2.5, 5.0), 1),
        parent_asin=parent,
        listing=_make_listing(_rng(seed, "offer", market.name, asin), market, brand),
    )


def _image_id(rng: random.Random) -> str:
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz+-"
    return "".join(rng.choice(alphabet) for _ in range(11))


def _make_listing(rng: random.Random, market: Marketplace, brand: str) -> Listing:
    currency = market.currency
    usd = round(10 ** rng.uniform(0.6, 2.8), 2)
    amount = round(usd * _PRICE_LEVEL.get(currency.code, 1.0), currency.decimals)
    if currency.decimals == 0:
        amount = float(int(amount))
    kinds = [k for k, _, _ in _AVAILABILITY]
    weights = [w for _, _, w in _AVAILABILITY]
    kind = rng.choices(kinds, weights)[0]
    message = next(m for k, m, _ in _AVAILABILITY if k == kind).format(n=rng.randint(1, 9))
    by_amazon = rng.random() < 0.6
    merchant = (
        f"Amazon.{market.name.removeprefix('www.amazon.')}" if by_amazon else f"{brand} Direct"
    )
    merchant_id = (
        AMAZON_MERCHANT_ID
        if by_amazon
        else "A" + "".join(rng.choice(_ASIN_CHARS) for _ in range(12))
    )
    basis = round(amount * rng.uniform(1.1, 1.6), currency.decimals) if rng.random() < 0.3 else None
    saved = round(basis - amount, currency.decimals) if basis is not None else None
    return Listing(
        amount=amount,
        currency=currency.code,
        display_amount=format_amount(amount, currency),
        availability_type=kind,
        availability_message=message,
        max_order_quantity=rng.choice((10, 20, 30)),
        condition="New",
        merchant_name=merchant,
        merchant_id=merchant_id,
        saving_basis_amount=basis,
        saving_basis_display=format_amount(basis, currency) if basis is not None else None,
        savings_amount=saved,
        savings_display=format_amount(saved, currency) if saved is not None else None,
        savings_percentage=round(100 * saved / basis) if saved is not None and basis else None,
        deal_badge="Limited time deal" if rng.random() < 0.1 else None,
        loyalty_points=int(amount * 0.01) if currency.code == "JPY" else None,
    )
