"""The typed item: what users read from an item, the same for the Creators API and PA-API.

:func:`read_product` turns an item's raw JSON into a :class:`Product` of frozen, slotted
values. One reader serves both protocols: it asks for each member by its camelCase name and
a :class:`Spelling` turns that into the protocol's (``itemInfo`` or ``ItemInfo``). The reader
never raises on odd JSON: a member that is absent, null or of the wrong type reads as None
or an empty tuple, so any JSON Amazon (or a fuzzer) sends is safe to read.

The typed item is built only when asked for (``ItemResult.product``), so bulk jobs that
never read it pay nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Final

from broker.api.errors_map import number
from broker.models import Protocol

__all__ = [
    "Availability",
    "BrowseNode",
    "Classifications",
    "Condition",
    "Contributor",
    "CustomerReviews",
    "Deal",
    "Delivery",
    "Image",
    "ImageSet",
    "Images",
    "Listing",
    "Merchant",
    "Money",
    "Offers",
    "Price",
    "Product",
    "SalesRank",
    "Savings",
    "Spelling",
    "VariationAttribute",
    "detect_protocol",
    "read_browse_node",
    "read_product",
]

#: How deep a chain of browse-node ancestors is followed (Amazon's trees are about 10 deep).
MAX_ANCESTORS: Final = 64


@dataclass(frozen=True, slots=True)
class Money:
    """An amount of money: ``amount`` in major units (19.99), ISO ``currency``, ``display``."""

    amount: float | None = None
    currency: str | None = None
    #: Amazon's display string, e.g. ``"$19.99"``
    display: str | None = None


@dataclass(frozen=True, slots=True)
class Image:
    """One image in one size."""

    url: str
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True, slots=True)
class ImageSet:
    """One picture in the sizes Amazon sent (None for a size not requested)."""

    small: Image | None = None
    medium: Image | None = None
    large: Image | None = None
    #: the full-size image (Creators ``highRes`` resource, ``hiRes`` in responses)
    hi_res: Image | None = None

    @property
    def largest(self) -> Image | None:
        """The biggest size present, or None."""
        return self.hi_res or self.large or self.medium or self.small


@dataclass(frozen=True, slots=True)
class Images:
    """The primary picture and the variant pictures."""

    primary: ImageSet | None = None
    variants: tuple[ImageSet, ...] = ()


@dataclass(frozen=True, slots=True)
class Contributor:
    """An author, artist, actor... of the item (``byLineInfo.contributors``)."""

    name: str | None = None
    role: str | None = None
    role_type: str | None = None
    locale: str | None = None


@dataclass(frozen=True, slots=True)
class Classifications:
    """Amazon's classification of the item."""

    binding: str | None = None
    product_group: str | None = None


@dataclass(frozen=True, slots=True)
class Savings:
    """How much the price is below the saving basis."""

    money: Money | None = None
    percentage: float | None = None


@dataclass(frozen=True, slots=True)
class Price:
    """A listing's price, with savings and the price it is compared with, when given."""

    money: Money | None = None
    savings: Savings | None = None
    #: the reference price (list price, was price...)
    saving_basis: Money | None = None
    #: e.g. ``LIST_PRICE``, ``WAS_PRICE``
    saving_basis_type: str | None = None
    price_per_unit: Money | None = None
    #: the saving basis as Amazon shows it: ``List Price``, ``Was Price``
    saving_basis_type_label: str | None = None


@dataclass(frozen=True, slots=True)
class Availability:
    """Whether and when the listing can be bought."""

    #: ``IN_STOCK``, ``OUT_OF_STOCK``, ``PREORDER``... (PA-API V1 offers: ``Now``...)
    type: str | None = None
    message: str | None = None
    min_order_quantity: int | None = None
    max_order_quantity: int | None = None


@dataclass(frozen=True, slots=True)
class Condition:
    """New, Used, Refurbished..., with the sub-condition and the seller's note."""

    value: str | None = None
    sub_condition: str | None = None
    note: str | None = None


@dataclass(frozen=True, slots=True)
class Merchant:
    """The seller of the listing."""

    name: str | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Deal:
    """A deal on the listing (lightning deal, Prime exclusive...)."""

    badge: str | None = None
    access_type: str | None = None
    start_time: str | None = None
    end_time: str | None = None
    percent_claimed: float | None = None
    #: how long Prime members see the deal before everyone else
    early_access_duration_in_milliseconds: int | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """Delivery flags, where Amazon gives them (PA-API offers' ``DeliveryInfo``)."""

    is_prime_eligible: bool | None = None
    is_free_shipping_eligible: bool | None = None
    is_amazon_fulfilled: bool | None = None


@dataclass(frozen=True, slots=True)
class Listing:
    """One offer for the item (OffersV2 returns the buy-box listing only)."""

    price: Price | None = None
    availability: Availability | None = None
    condition: Condition | None = None
    merchant: Merchant | None = None
    deal: Deal | None = None
    delivery: Delivery | None = None
    is_buy_box_winner: bool | None = None
    loyalty_points: int | None = None
    #: ``LIGHTNING_DEAL``, ``SUBSCRIBE_AND_SAVE``... or None for a plain listing
    type: str | None = None
    violates_map: bool | None = None

    @property
    def is_prime_eligible(self) -> bool | None:
        """Prime eligibility, when Amazon says (None when it does not)."""
        return self.delivery.is_prime_eligible if self.delivery else None

    @property
    def is_free_shipping_eligible(self) -> bool | None:
        """Free-shipping eligibility, when Amazon says."""
        return self.delivery.is_free_shipping_eligible if self.delivery else None


@dataclass(frozen=True, slots=True)
class Offers:
    """The item's offers: ``offersV2`` (or the retired V1 ``Offers`` when that is all there is)."""

    listings: tuple[Listing, ...] = ()


@dataclass(frozen=True, slots=True)
class CustomerReviews:
    """Review count and average star rating, where Amazon gives them."""

    count: int | None = None
    star_rating: float | None = None


@dataclass(frozen=True, slots=True)
class BrowseNode:
    """A browse node (category) and, when requested, its ancestor chain."""

    id: str | None = None
    display_name: str | None = None
    context_free_name: str | None = None
    is_root: bool | None = None
    sales_rank: int | None = None
    ancestor: BrowseNode | None = None
    children: tuple[BrowseNode, ...] = ()


@dataclass(frozen=True, slots=True)
class SalesRank:
    """The item's rank in its website category (``websiteSalesRank``)."""

    id: str | None = None
    display_name: str | None = None
    context_free_name: str | None = None
    sales_rank: int | None = None


@dataclass(frozen=True, slots=True)
class VariationAttribute:
    """One dimension of a variation (``color_name`` = ``Red``)."""

    name: str | None = None
    value: str | None = None


@dataclass(frozen=True, slots=True)
class Product:
    """An item as typed values, read the same way from either API's JSON.

    Everything but ``raw`` is None or empty when Amazon did not send it (usually because
    the resource was not requested). ``raw`` is Amazon's JSON, untouched.
    """

    asin: str | None = None
    title: str | None = None
    brand: str | None = None
    manufacturer: str | None = None
    features: tuple[str, ...] = ()
    contributors: tuple[Contributor, ...] = ()
    classifications: Classifications | None = None
    release_date: date | None = None
    color: str | None = None
    size: str | None = None
    model: str | None = None
    part_number: str | None = None
    eans: tuple[str, ...] = ()
    isbns: tuple[str, ...] = ()
    upcs: tuple[str, ...] = ()
    images: Images = field(default_factory=Images)
    offers: Offers = field(default_factory=Offers)
    customer_reviews: CustomerReviews | None = None
    browse_nodes: tuple[BrowseNode, ...] = ()
    website_sales_rank: SalesRank | None = None
    variation_attributes: tuple[VariationAttribute, ...] = ()
    parent_asin: str | None = None
    detail_page_url: str | None = None
    raw: Mapping[str, object] = field(default_factory=dict, repr=False, compare=False)

    @property
    def product_group(self) -> str | None:
        """``classifications.product_group`` (``"Kitchen"``), or None."""
        return self.classifications.product_group if self.classifications else None

    @property
    def listing(self) -> Listing | None:
        """The first (buy-box) listing, or None."""
        return self.offers.listings[0] if self.offers.listings else None

    @property
    def price(self) -> Money | None:
        """The first listing's price, or None."""
        listing = self.listing
        return listing.price.money if listing and listing.price else None

    @property
    def image_url(self) -> str | None:
        """The URL of the largest primary image, or None."""
        primary = self.images.primary
        largest = primary.largest if primary else None
        return largest.url if largest else None


class Spelling(dict[str, str]):
    """Spells the camelCase member names of the Creators API in one protocol's style.

    ``spelling["itemInfo"]`` is ``itemInfo`` for the Creators API and ``ItemInfo`` for
    PA-API, which capitalises the first letter of each name (``asin`` -> ``ASIN``,
    ``url`` -> ``URL`` and the id lists ``eans`` -> ``EANs``, ``isbns`` -> ``ISBNs``,
    ``upcs`` -> ``UPCs`` are the exceptions). A dict that fills itself on first use: a plain
    subscript is the cheapest lookup Python has, and the reader makes a hundred per item.
    """

    __slots__ = ("protocol",)

    def __init__(self, protocol: Protocol | str) -> None:
        super().__init__()
        # A name ("creators", "paapi5") too, as resource_names() takes it: read as PA-API,
        # it found nothing in a Creators answer.
        self.protocol = Protocol(protocol)

    def __missing__(self, camel: str) -> str:
        if self.protocol is Protocol.CREATORS:
            name = camel
        else:
            name = _PASCAL_SPECIAL.get(camel) or camel[:1].upper() + camel[1:]
        self[camel] = name
        return name


_PASCAL_SPECIAL: Final = {
    "asin": "ASIN",
    "url": "URL",
    "eans": "EANs",
    "isbns": "ISBNs",
    "upcs": "UPCs",
}
_SPELLINGS: Final = {protocol: Spelling(protocol) for protocol in Protocol}


def detect_protocol(item: object) -> Protocol:
    """Guess which API sent ``item`` from its keys: PascalCase means PA-API.

    ``asin`` / ``ASIN`` decide when present; otherwise the first key's first letter does.
    Anything else (an empty or non-mapping value) reads as Creators.
    """
    if not isinstance(item, Mapping):
        return Protocol.CREATORS
    if "asin" in item:
        return Protocol.CREATORS
    if "ASIN" in item:
        return Protocol.PAAPI5
    for key in item:
        return Protocol.PAAPI5 if isinstance(key, str) and key[:1].isupper() else Protocol.CREATORS
    return Protocol.CREATORS


def read_product(raw: object, protocol: Protocol | str | None = None) -> Product:
    """Read an item's raw JSON (either API's spelling) as a :class:`Product`; never raises
    for what ``raw`` holds.

    Args:
        raw: the item object as Amazon sent it (anything else gives an empty Product).
        protocol: the API that sent it (a :class:`Protocol` or its name, ``"creators"`` or
            ``"paapi5"``); None detects it from the keys.

    Raises:
        ValueError: ``protocol`` names no protocol.
    """
    item = _as_dict(raw)
    s = _SPELLINGS[detect_protocol(item) if protocol is None else Protocol(protocol)]
    info = _map(item, s["itemInfo"])
    by_line = _map(info, s["byLineInfo"])
    classes = _map(info, s["classifications"])
    product_info = _map(info, s["productInfo"])
    manufacture = _map(info, s["manufactureInfo"])
    external = _map(info, s["externalIds"])
    browse = _map(item, s["browseNodeInfo"])
    return Product(
        asin=_str(item.get(s["asin"])),
        title=_display(info, s["title"], s),
        brand=_display(by_line, s["brand"], s),
        manufacturer=_display(by_line, s["manufacturer"], s),
        features=_display_list(info, s["features"], s),
        contributors=tuple(
            Contributor(
                name=_str(c.get(s["name"])),
                role=_str(c.get(s["role"])),
                role_type=_str(c.get(s["roleType"])),
                locale=_str(c.get(s["locale"])),
            )
            for c in _maps(by_line.get(s["contributors"]))
        ),
        classifications=Classifications(
            binding=_display(classes, s["binding"], s),
            product_group=_display(classes, s["productGroup"], s),
        )
        if classes
        else None,
        release_date=_date(_display(product_info, s["releaseDate"], s)),
        color=_display(product_info, s["color"], s),
        size=_display(product_info, s["size"], s),
        model=_display(manufacture, s["model"], s),
        part_number=_display(manufacture, s["itemPartNumber"], s),
        eans=_display_list(external, s["eans"], s),
        isbns=_display_list(external, s["isbns"], s),
        upcs=_display_list(external, s["upcs"], s),
        images=_images(_map(item, s["images"]), s),
        offers=_offers(item, s),
        customer_reviews=_reviews(_map(item, s["customerReviews"]), s),
        browse_nodes=tuple(_node(n, s) for n in _maps(browse.get(s["browseNodes"]))),
        website_sales_rank=_sales_rank(_map(browse, s["websiteSalesRank"]), s),
        variation_attributes=tuple(
            VariationAttribute(name=_str(a.get(s["name"])), value=_str(a.get(s["value"])))
            for a in _maps(item.get(s["variationAttributes"]))
        ),
        parent_asin=_str(item.get(s["parentASIN"])),
        detail_page_url=_str(item.get(s["detailPageURL"])),
        raw=item,
    )


def read_browse_node(raw: object, protocol: Protocol | str) -> BrowseNode:
    """Read one browse node (GetBrowseNodes, or an item's ``browseNodes``); never raises
    for what ``raw`` holds (``protocol``, a :class:`Protocol` or its name, must name one)."""
    return _node(_as_dict(raw), _SPELLINGS[Protocol(protocol)])


# -- readers: each takes what may be any JSON value and returns a typed value or None ------


_EMPTY: Final[Mapping[str, object]] = {}


def _as_dict(raw: object) -> Mapping[str, object]:
    # Decoded JSON is made of dicts, and the readers test for dict (a type check, where
    # Mapping walks the ABC registry); another mapping is copied into one first.
    if isinstance(raw, dict):
        return raw
    return dict(raw) if isinstance(raw, Mapping) else _EMPTY


def _map(parent: Mapping[str, object], name: str) -> Mapping[str, object]:
    value = parent.get(name)
    return value if isinstance(value, dict) else _EMPTY


def _maps(value: object) -> list[Mapping[str, object]]:
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, dict)]


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _id(value: object) -> str | None:
    # Browse node ids are strings in the SDK models; one sent as a number is still an id.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _str(value)


def whole_number(value: object) -> int | None:
    """A JSON count as an int: an integral float (``722.0``, valid JSON for a number the
    SDK types as one) too; None for anything else, a bool included."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _bool(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def _display(parent: Mapping[str, object], name: str, s: Spelling) -> str | None:
    """The ``displayValue`` of a ``{displayValue, label, locale}`` member, as text."""
    value = _map(parent, name).get(s["displayValue"])
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return str(value)
    return _str(value)


def _display_list(parent: Mapping[str, object], name: str, s: Spelling) -> tuple[str, ...]:
    values = _map(parent, name).get(s["displayValues"])
    if not isinstance(values, list):
        return ()
    return tuple(v for v in values if isinstance(v, str))


def _date(text: str | None) -> date | None:
    # Amazon sends "2021-05-01T00:00:01Z" or "2021-05-01"; the date part is what matters.
    if text is None or len(text) < 10:
        return None
    try:
        return date.fromisoformat(text[:10])
    except ValueError:
        return None


def _image(value: object, s: Spelling) -> Image | None:
    if not isinstance(value, dict):
        return None
    url = _str(value.get(s["url"]))
    if url is None:
        return None
    return Image(url, whole_number(value.get(s["width"])), whole_number(value.get(s["height"])))


def _image_set(value: Mapping[str, object], s: Spelling) -> ImageSet:
    return ImageSet(
        small=_image(value.get(s["small"]), s),
        medium=_image(value.get(s["medium"]), s),
        large=_image(value.get(s["large"]), s),
        hi_res=_image(value.get(s["hiRes"]), s),
    )


def _images(images: Mapping[str, object], s: Spelling) -> Images:
    primary = images.get(s["primary"])
    return Images(
        primary=_image_set(primary, s) if isinstance(primary, dict) else None,
        variants=tuple(_image_set(v, s) for v in _maps(images.get(s["variants"]))),
    )


def _money(value: object, s: Spelling) -> Money | None:
    if not isinstance(value, dict):
        return None
    amount = number(value.get(s["amount"]))
    currency = _str(value.get(s["currency"]))
    display = _str(value.get(s["displayAmount"]))
    if amount is None and currency is None and display is None:
        return None
    return Money(amount, currency, display)


def _price(value: object, s: Spelling) -> Price | None:
    """OffersV2 nests the amount in ``money``; V1 offers carry it in the price itself."""
    if not isinstance(value, dict):
        return None
    money_key = s["money"]
    money = _money(value.get(money_key), s) if money_key in value else _money(value, s)
    savings_raw = value.get(s["savings"])
    savings: Savings | None = None
    if isinstance(savings_raw, dict):
        savings_money = (
            _money(savings_raw.get(money_key), s) if money_key in savings_raw else None
        ) or _money(savings_raw, s)
        savings = Savings(savings_money, number(savings_raw.get(s["percentage"])))
    basis_raw = value.get(s["savingBasis"])
    basis: Money | None = None
    basis_type: str | None = None
    basis_label: str | None = None
    if isinstance(basis_raw, dict):
        basis = (_money(basis_raw.get(money_key), s) if money_key in basis_raw else None) or _money(
            basis_raw, s
        )
        basis_type = _str(basis_raw.get(s["savingBasisType"]))
        basis_label = _str(basis_raw.get(s["savingBasisTypeLabel"]))
    per_unit = value.get(s["pricePerUnit"])
    return Price(
        money=money,
        savings=savings,
        saving_basis=basis,
        saving_basis_type=basis_type,
        saving_basis_type_label=basis_label,
        price_per_unit=_money(per_unit.get(money_key), s)
        if isinstance(per_unit, dict) and money_key in per_unit
        else _money(per_unit, s),
    )


def _listing(value: Mapping[str, object], s: Spelling) -> Listing:
    availability = _map(value, s["availability"])
    condition = _map(value, s["condition"])
    merchant = _map(value, s["merchantInfo"])
    deal = _map(value, s["dealDetails"])
    delivery = _map(value, s["deliveryInfo"])
    sub_condition = condition.get(s["subCondition"])
    if isinstance(sub_condition, dict):  # V1 offers: {"Value": "New", ...}
        sub_condition = sub_condition.get(s["value"])
    condition_value = condition.get(s["value"])
    note = condition.get(s["conditionNote"])
    if isinstance(note, dict):  # V1 offers: {"Value": "...", "Locale": "en_US"}
        note = note.get(s["value"])
    price = _price(value.get(s["price"]), s)
    basis_raw = value.get(s["savingBasis"])
    if price is not None and price.saving_basis is None and isinstance(basis_raw, dict):
        # V1 offers keep the saving basis beside the price, OffersV2 inside it.
        price = replace(
            price,
            saving_basis=_money(basis_raw, s),
            saving_basis_type=_str(basis_raw.get(s["savingBasisType"])),
            saving_basis_type_label=_str(basis_raw.get(s["savingBasisTypeLabel"])),
        )
    return Listing(
        price=price,
        availability=Availability(
            type=_str(availability.get(s["type"])),
            message=_str(availability.get(s["message"])),
            min_order_quantity=whole_number(availability.get(s["minOrderQuantity"])),
            max_order_quantity=whole_number(availability.get(s["maxOrderQuantity"])),
        )
        if availability
        else None,
        condition=Condition(
            value=_str(condition_value),
            sub_condition=_str(sub_condition),
            note=_str(note),
        )
        if condition
        else None,
        merchant=Merchant(_str(merchant.get(s["name"])), _str(merchant.get(s["id"])))
        if merchant
        else None,
        deal=Deal(
            badge=_str(deal.get(s["badge"])),
            access_type=_str(deal.get(s["accessType"])),
            start_time=_str(deal.get(s["startTime"])),
            end_time=_str(deal.get(s["endTime"])),
            percent_claimed=number(deal.get(s["percentClaimed"])),
            early_access_duration_in_milliseconds=whole_number(
                deal.get(s["earlyAccessDurationInMilliseconds"])
            ),
        )
        if deal
        else None,
        delivery=Delivery(
            is_prime_eligible=_bool(delivery.get(s["isPrimeEligible"])),
            is_free_shipping_eligible=_bool(delivery.get(s["isFreeShippingEligible"])),
            is_amazon_fulfilled=_bool(delivery.get(s["isAmazonFulfilled"])),
        )
        if delivery
        else None,
        is_buy_box_winner=_bool(value.get(s["isBuyBoxWinner"])),
        loyalty_points=whole_number(_map(value, s["loyaltyPoints"]).get(s["points"])),
        type=_str(value.get(s["type"])),
        violates_map=_bool(value.get(s["violatesMAP"])),
    )


def _offers(item: Mapping[str, object], s: Spelling) -> Offers:
    offers = _map(item, s["offersV2"]) or _map(item, s["offers"])
    return Offers(tuple(_listing(v, s) for v in _maps(offers.get(s["listings"]))))


def _reviews(reviews: Mapping[str, object], s: Spelling) -> CustomerReviews | None:
    if not reviews:
        return None
    rating = reviews.get(s["starRating"])
    value = rating.get(s["value"]) if isinstance(rating, dict) else rating
    return CustomerReviews(count=whole_number(reviews.get(s["count"])), star_rating=number(value))


def _node(value: Mapping[str, object], s: Spelling) -> BrowseNode:
    # Ancestors form a chain of any depth: read it iteratively (no recursion limit), then
    # build it from the root down, since each node holds its ancestor.
    chain: list[Mapping[str, object]] = []
    ancestor = value.get(s["ancestor"])
    while isinstance(ancestor, dict) and len(chain) < MAX_ANCESTORS:
        chain.append(ancestor)
        ancestor = ancestor.get(s["ancestor"])
    built: BrowseNode | None = None
    for raw in reversed(chain):
        built = _flat_node(raw, s, built, ())
    children = tuple(_flat_node(c, s, None, ()) for c in _maps(value.get(s["children"])))
    return _flat_node(value, s, built, children)


def _flat_node(
    value: Mapping[str, object],
    s: Spelling,
    ancestor: BrowseNode | None,
    children: tuple[BrowseNode, ...],
) -> BrowseNode:
    return BrowseNode(
        id=_id(value.get(s["id"])),
        display_name=_str(value.get(s["displayName"])),
        context_free_name=_str(value.get(s["contextFreeName"])),
        is_root=_bool(value.get(s["isRoot"])),
        sales_rank=whole_number(value.get(s["salesRank"])),
        ancestor=ancestor,
        children=children,
    )


def _sales_rank(value: Mapping[str, object], s: Spelling) -> SalesRank | None:
    if not value:
        return None
    return SalesRank(
        id=_id(value.get(s["id"])),
        display_name=_str(value.get(s["displayName"])),
        context_free_name=_str(value.get(s["contextFreeName"])),
        sales_rank=whole_number(value.get(s["salesRank"])),
    )
