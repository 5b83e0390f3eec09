"""The typed item: one reader for both APIs' JSON, lazy on ItemResult, never raising."""

from __future__ import annotations

import dataclasses
import json
from datetime import date
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import broker.product
from broker.api.operations import read_variations
from broker.models import ItemResult, Protocol, Query, Status
from broker.product import (
    BrowseNode,
    Image,
    Money,
    Product,
    Spelling,
    detect_protocol,
    read_product,
)
from broker.simulator.catalog import lookup
from broker.simulator.render import (
    CREATORS_ITEM_RESOURCES,
    PAAPI_ITEM_RESOURCES,
    render_item,
)
from broker.simulator.settings import SimulatorSettings

US = "www.amazon.com"
SETTINGS = SimulatorSettings()
#: A catalogue item with a saving basis and a lightning deal.
ON_DEAL = "B000000016"


def _render(asin: str, protocol: str, resources: frozenset[str] | None = None) -> dict[str, Any]:
    if resources is None:
        resources = PAAPI_ITEM_RESOURCES if protocol == "paapi5" else CREATORS_ITEM_RESOURCES
    item = render_item(
        SETTINGS,
        US,
        asin,
        resources=resources,
        partner_tag="demo-20",
        protocol=protocol,  # type: ignore[arg-type]
    )
    assert item is not None
    return item


def _creators_without_hires() -> frozenset[str]:
    return frozenset(r for r in CREATORS_ITEM_RESOURCES if not r.endswith("highRes"))


class TestBothProtocols:
    """The same catalogue item reads the same whichever API sent it."""

    @pytest.mark.parametrize("protocol", ["creators", "paapi5"])
    def test_every_member(self, protocol: str) -> None:
        """Every part the simulator renders comes through as typed values."""
        raw = _render(ON_DEAL, protocol)
        product = read_product(raw)
        catalog = lookup(SETTINGS, US, ON_DEAL).item
        assert catalog is not None
        assert product.asin == ON_DEAL
        assert product.title == catalog.title
        assert product.brand == catalog.brand
        assert product.manufacturer == catalog.manufacturer
        assert product.features == catalog.features
        assert product.product_group == catalog.product_group
        assert product.classifications is not None
        assert product.classifications.binding == catalog.binding
        assert product.release_date == date.fromisoformat(catalog.release_date[:10])
        assert (product.color, product.model, product.part_number) == (
            catalog.color,
            catalog.model,
            catalog.part_number,
        )
        assert product.eans == (catalog.ean,)
        assert product.parent_asin == catalog.parent_asin
        assert product.detail_page_url is not None
        assert "tag=demo-20" in product.detail_page_url
        primary = product.images.primary
        assert primary is not None
        assert primary.medium == Image(
            f"https://m.media-amazon.com/images/I/{catalog.image_ids[0]}._SL160_.jpg", 160, 160
        )
        assert len(product.images.variants) == len(catalog.image_ids) - 1
        assert (primary.hi_res is not None) == (protocol == "creators")
        listing = product.listing
        assert listing is not None
        expected = catalog.listing
        assert listing.price is not None
        assert listing.price.money == Money(
            expected.amount, expected.currency, expected.display_amount
        )
        assert product.price == listing.price.money
        assert listing.price.savings is not None
        assert listing.price.savings.money == Money(
            expected.savings_amount, expected.currency, expected.savings_display
        )
        assert listing.price.savings.percentage == expected.savings_percentage
        assert listing.price.saving_basis == Money(
            expected.saving_basis_amount, expected.currency, expected.saving_basis_display
        )
        assert listing.price.saving_basis_type == "LIST_PRICE"
        # Each a typed field, as python-amazon-paapi has it (they were in raw only).
        assert listing.price.saving_basis_type_label == "List Price"
        assert listing.availability is not None
        assert listing.availability.type == expected.availability_type
        assert listing.availability.message == expected.availability_message
        assert listing.availability.max_order_quantity == expected.max_order_quantity
        assert listing.condition is not None
        assert listing.condition.value == expected.condition
        assert listing.merchant is not None
        assert (listing.merchant.name, listing.merchant.id) == (
            expected.merchant_name,
            expected.merchant_id,
        )
        assert listing.deal is not None
        assert listing.deal.badge == expected.deal_badge
        assert listing.deal.early_access_duration_in_milliseconds == 0
        assert listing.type == "LIGHTNING_DEAL"
        assert listing.is_buy_box_winner is True
        assert listing.violates_map is False
        assert product.customer_reviews is not None
        assert product.customer_reviews.count == catalog.review_count
        assert product.customer_reviews.star_rating == catalog.star_rating
        (node,) = product.browse_nodes
        assert (node.id, node.display_name, node.sales_rank) == (
            catalog.browse_nodes[0].id,
            catalog.browse_nodes[0].name,
            catalog.browse_nodes[0].sales_rank,
        )
        chain = []
        ancestor = node.ancestor
        while ancestor is not None:
            chain.append((ancestor.id, ancestor.display_name))
            ancestor = ancestor.ancestor
        assert tuple(chain) == catalog.browse_nodes[0].ancestors
        assert product.website_sales_rank is not None
        assert product.website_sales_rank.sales_rank == catalog.website_sales_rank
        assert product.raw is raw

    def test_image_url_prefers_hi_res_to_large(self) -> None:
        """An item with both a hiRes and a large primary image: image_url is the hiRes one
        (the full-size picture), not the 500 px large one."""
        product = read_product(_render(ON_DEAL, "creators"))
        primary = product.images.primary
        assert primary is not None
        assert primary.hi_res is not None
        assert primary.large is not None
        assert primary.large.url != primary.hi_res.url
        assert product.image_url == primary.hi_res.url

    @pytest.mark.parametrize("protocol", list(Protocol))
    def test_loyalty_points_and_price_per_unit(self, protocol: Protocol) -> None:
        """A listing's loyaltyPoints.points and its pricePerUnit (its money nested as the
        price's own is) come through typed, in either spelling."""
        s = Spelling(protocol)

        def money(amount: float, display: str) -> dict[str, object]:
            return {s["amount"]: amount, s["currency"]: "JPY", s["displayAmount"]: display}

        raw = {
            s["asin"]: "B0C1234567",
            s["offersV2"]: {
                s["listings"]: [
                    {
                        s["isBuyBoxWinner"]: True,
                        s["loyaltyPoints"]: {s["points"]: 30},
                        s["price"]: {
                            s["money"]: money(2980, "￥2,980"),
                            s["pricePerUnit"]: {s["money"]: money(29.8, "(￥30 / 100 g)")},
                        },
                        s["type"]: "BUY_BOX",
                    }
                ]
            },
        }
        listing = read_product(raw, protocol).listing
        assert listing is not None
        assert listing.loyalty_points == 30
        assert listing.price is not None
        assert listing.price.money == Money(2980, "JPY", "￥2,980")
        assert listing.price.price_per_unit == Money(29.8, "JPY", "(￥30 / 100 g)")

    def test_same_product_from_either_spelling(self) -> None:
        """Creators and PA-API JSON of one item give equal Products (raw aside)."""
        creators = read_product(_render(ON_DEAL, "creators", _creators_without_hires()))
        paapi = read_product(_render(ON_DEAL, "paapi5"))
        assert creators == paapi
        assert creators.raw != paapi.raw

    def test_paapi_external_ids_in_amazons_spelling(self) -> None:
        """PA-API spells the id lists EANs, ISBNs and UPCs (not Eans): all three are read."""
        raw = {
            "ASIN": "0316769487",
            "ItemInfo": {
                "ExternalIds": {
                    "EANs": {"DisplayValues": ["9780316769488"], "Label": "EAN"},
                    "ISBNs": {"DisplayValues": ["0316769487"], "Label": "ISBN"},
                    "UPCs": {"DisplayValues": ["012345678905"], "Label": "UPC"},
                }
            },
        }
        product = read_product(raw)
        assert product.eans == ("9780316769488",)
        assert product.isbns == ("0316769487",)
        assert product.upcs == ("012345678905",)
        rendered = _render(ON_DEAL, "paapi5")["ItemInfo"]["ExternalIds"]
        assert set(rendered) <= {"EANs", "ISBNs", "UPCs"}
        assert "EANs" in rendered

    @pytest.mark.parametrize(
        ("protocol", "expected"), [("creators", Protocol.CREATORS), ("paapi5", Protocol.PAAPI5)]
    )
    def test_protocol_detected(self, protocol: str, expected: Protocol) -> None:
        """The spelling of the keys tells which API sent an item."""
        assert detect_protocol(_render("B000000001", protocol)) is expected
        assert detect_protocol({"ItemInfo": {}}) is Protocol.PAAPI5
        assert detect_protocol({}) is Protocol.CREATORS
        assert detect_protocol([1, 2]) is Protocol.CREATORS

    def test_variation_attributes_and_v1_offers(self) -> None:
        """Variation attributes and the retired V1 offers (with delivery flags) are read."""
        raw = {
            "ASIN": "B000000001",
            "VariationAttributes": [{"Name": "color_name", "Value": "Red"}],
            "Offers": {
                "Listings": [
                    {
                        "Price": {"Amount": 9.5, "Currency": "EUR", "DisplayAmount": "9,50 €"},
                        "DeliveryInfo": {
                            "IsPrimeEligible": True,
                            "IsFreeShippingEligible": False,
                            "IsAmazonFulfilled": True,
                        },
                        "Condition": {"Value": "Used", "SubCondition": {"Value": "Good"}},
                        "Availability": {"Type": "Now", "Message": "In stock."},
                    }
                ]
            },
        }
        product = read_product(raw)
        assert [(a.name, a.value) for a in product.variation_attributes] == [("color_name", "Red")]
        listing = product.listing
        assert listing is not None
        assert product.price == Money(9.5, "EUR", "9,50 €")
        assert (listing.is_prime_eligible, listing.is_free_shipping_eligible) == (True, False)
        assert listing.delivery is not None
        assert listing.delivery.is_amazon_fulfilled is True
        assert listing.condition is not None
        assert (listing.condition.value, listing.condition.sub_condition) == ("Used", "Good")

    def test_v1_saving_basis_beside_the_price_and_condition_note_object(self) -> None:
        """V1 offers keep SavingBasis beside Price (V2 inside it) and ConditionNote as an
        object with its Value: both were read as None."""
        raw = {
            "ASIN": "B000000001",
            "Offers": {
                "Listings": [
                    {
                        "Price": {"Amount": 49.99, "Currency": "USD", "DisplayAmount": "$49.99"},
                        "SavingBasis": {
                            "Amount": 59.99,
                            "Currency": "USD",
                            "DisplayAmount": "$59.99",
                        },
                        "Condition": {
                            "Value": "Used",
                            "ConditionNote": {"Value": "Box opened", "Locale": "en_US"},
                        },
                    }
                ]
            },
        }
        listing = read_product(raw).listing
        assert listing is not None
        assert listing.price is not None
        assert listing.price.saving_basis == Money(59.99, "USD", "$59.99")
        assert listing.condition is not None
        assert listing.condition.note == "Box opened"


class TestAbsentParts:
    """Missing data reads as None or empty, never as an error."""

    @pytest.mark.parametrize("protocol", ["creators", "paapi5"])
    def test_title_only(self, protocol: str) -> None:
        """An item rendered with one resource has only that member (explicit nulls or not)."""
        for nulls in (True, False):
            settings = SimulatorSettings(explicit_nulls=nulls)
            raw = render_item(
                settings,
                US,
                "B000000001",
                resources=["itemInfo.title" if protocol == "creators" else "ItemInfo.Title"],
                partner_tag="demo-20",
                protocol=protocol,  # type: ignore[arg-type]
            )
            product = read_product(raw)
            assert product.title
            assert product.detail_page_url
            assert dataclasses.replace(product, title=None, detail_page_url=None) == Product(
                asin="B000000001"
            )

    def test_bare_item(self) -> None:
        """An item with nothing but its ASIN reads as an empty Product."""
        product = read_product({"asin": "B000000001"})
        assert product == Product(asin="B000000001")
        assert product.listing is None
        assert product.price is None
        assert product.image_url is None
        assert product.product_group is None
        assert product.images.primary is None
        assert product.offers.listings == ()

    def test_wrong_types_read_as_absent(self) -> None:
        """Members of the wrong JSON type are skipped (a true is no number), the right ones
        kept."""
        raw = {
            "asin": 12,
            "itemInfo": {"title": {"displayValue": ["x"]}, "features": {"displayValues": "x"}},
            "images": {
                "primary": {
                    "small": {"url": 5},
                    "large": {"url": "u", "width": "9", "height": True},
                }
            },
            "offersV2": {"listings": [None, {"price": {"money": {"amount": "9"}}}]},
            "browseNodeInfo": {"browseNodes": [{"id": 5, "isRoot": "yes", "ancestor": []}]},
            "customerReviews": {"count": 1.0, "starRating": 4},
            "detailPageURL": None,
        }
        product = read_product(raw)
        assert product.asin is None
        assert product.title is None
        assert product.features == ()
        primary = product.images.primary
        assert primary is not None
        assert primary.small is None
        assert primary.large == Image("u", None, None)
        (listing,) = product.offers.listings
        assert listing.price is not None
        assert listing.price.money is None
        assert product.browse_nodes == (BrowseNode(id="5"),)
        assert product.customer_reviews is not None
        assert (product.customer_reviews.count, product.customer_reviews.star_rating) == (1, 4.0)

    def test_deep_ancestor_chain(self) -> None:
        """A very deep ancestor chain is cut, not a RecursionError."""
        node: dict[str, object] = {"id": "0"}
        for i in range(1, 5000):
            node = {"id": str(i), "ancestor": node}
        product = read_product({"browseNodeInfo": {"browseNodes": [node]}})
        depth = 0
        ancestor = product.browse_nodes[0].ancestor
        while ancestor is not None:
            depth += 1
            ancestor = ancestor.ancestor
        assert depth == broker.product.MAX_ANCESTORS


class TestItemResult:
    """``ItemResult.product`` is read lazily, once."""

    def test_lazy_and_cached(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Building a result reads nothing; the first access reads once; later ones reuse it."""
        calls: list[object] = []
        real = broker.product.read_product

        def counting(raw: object, protocol: Protocol | None = None) -> Product:
            calls.append(raw)
            return real(raw, protocol)

        monkeypatch.setattr(broker.product, "read_product", counting)
        item = _render("B000000001", "paapi5")
        result = ItemResult("B000000001", US, Status.OK, item=item)
        assert calls == []
        product = result.product
        assert product is not None
        assert product.title
        assert result.product is product
        assert calls == [item]

    def test_no_item_no_product(self) -> None:
        """A result without an item has no product."""
        assert ItemResult("B000000001", US, Status.NOT_FOUND).product is None

    def test_a_result_with_an_item_hashes_like_one_without(self) -> None:
        """An ok result (it holds its item, a dict) hashes as a failed one does, equal
        results alike, so results go in sets and dict keys; it raised TypeError."""
        item = _render("B000000001", "creators")
        one = ItemResult("B000000001", US, Status.OK, item=item)
        same = ItemResult("B000000001", US, Status.OK, item=dict(item))
        assert hash(one) == hash(same)
        assert len({one, same, ItemResult("B000000001", US, Status.NOT_FOUND)}) == 2

    def test_cache_outside_equality_and_json(self) -> None:
        """Reading the product changes neither equality, repr nor the JSON row."""
        item = _render("B000000001", "creators")
        read = ItemResult("B000000001", US, Status.OK, item=item)
        unread = ItemResult("B000000001", US, Status.OK, item=item)
        before = repr(read)
        assert read.product is not None
        assert read == unread
        assert repr(read) == before
        assert json.dumps(read.to_json()) == json.dumps(unread.to_json())

    def test_tag_is_the_query_tag(self) -> None:
        """``result.tag`` is the caller's tag of the query it answers (None without one),
        typed so strict mypy takes the README's ``save(result.tag, result)``."""
        query = Query("B000000001", US, None, tag=("row", 7))
        assert ItemResult("B000000001", US, Status.OK, query=query).tag == ("row", 7)
        assert ItemResult("B000000001", US, Status.OK).tag is None


# -- property tests ----------------------------------------------------------------------

_FAST = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

#: Member names the reader looks for, in both spellings, so random JSON reaches deep.
_NAMES = sorted(
    {
        name
        for camel in [
            "asin",
            "itemInfo",
            "title",
            "displayValue",
            "displayValues",
            "byLineInfo",
            "brand",
            "manufacturer",
            "contributors",
            "name",
            "role",
            "roleType",
            "locale",
            "features",
            "classifications",
            "binding",
            "productGroup",
            "productInfo",
            "releaseDate",
            "color",
            "size",
            "manufactureInfo",
            "model",
            "itemPartNumber",
            "externalIds",
            "eans",
            "isbns",
            "upcs",
            "images",
            "primary",
            "variants",
            "small",
            "medium",
            "large",
            "hiRes",
            "url",
            "width",
            "height",
            "offersV2",
            "offers",
            "listings",
            "price",
            "money",
            "amount",
            "currency",
            "displayAmount",
            "savings",
            "percentage",
            "savingBasis",
            "savingBasisType",
            "pricePerUnit",
            "availability",
            "type",
            "message",
            "minOrderQuantity",
            "maxOrderQuantity",
            "condition",
            "value",
            "subCondition",
            "conditionNote",
            "merchantInfo",
            "id",
            "dealDetails",
            "badge",
            "accessType",
            "startTime",
            "endTime",
            "percentClaimed",
            "deliveryInfo",
            "isPrimeEligible",
            "isFreeShippingEligible",
            "isAmazonFulfilled",
            "isBuyBoxWinner",
            "loyaltyPoints",
            "points",
            "violatesMAP",
            "customerReviews",
            "count",
            "starRating",
            "browseNodeInfo",
            "browseNodes",
            "ancestor",
            "children",
            "displayName",
            "contextFreeName",
            "isRoot",
            "salesRank",
            "websiteSalesRank",
            "variationAttributes",
            "parentASIN",
            "detailPageURL",
        ]
        for name in (camel, camel[:1].upper() + camel[1:], camel.upper())
    }
)

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(_NAMES) | st.text(max_size=6), inner, max_size=6)
    ),
    max_leaves=60,
)


def _touch(value: object) -> None:
    """Read every field and property of a typed value, recursively."""
    if isinstance(value, tuple):
        for member in value:
            _touch(member)
        return
    if not dataclasses.is_dataclass(value):
        return
    for name in dir(type(value)):
        if not name.startswith("_"):
            attribute = getattr(value, name)
            if not callable(attribute):
                _touch(attribute)
    hash(dataclasses.replace(value))  # type: ignore[type-var]


class TestNeverRaises:
    """Any JSON reads as a Product whose every member can be read."""

    @_FAST
    @given(raw=_json, protocol=st.sampled_from([None, *Protocol]))
    def test_any_json(self, raw: object, protocol: Protocol | None) -> None:
        """Arbitrary JSON, in either spelling, never raises on reading or on access."""
        product = read_product(raw, protocol)
        _touch(product)
        if isinstance(raw, dict) and protocol is None:
            result = ItemResult("B000000001", US, Status.OK, item=raw)
            assert result.product == product

    @pytest.mark.parametrize("protocol", list(Protocol))
    def test_numbers_too_large_for_a_float(self, protocol: Protocol) -> None:
        """Integers past a float's range (legal JSON; the stdlib decoder reads them) read as
        absent, in an item and in GetVariations' summary, instead of raising OverflowError."""
        s = Spelling(protocol)
        huge = 10**400
        money = {s["amount"]: huge, s["currency"]: "USD"}
        raw = {
            s["asin"]: "B000000001",
            s["offersV2"]: {s["listings"]: [{s["price"]: {s["money"]: money}}]},
            s["customerReviews"]: {s["starRating"]: {s["value"]: huge}},
        }
        product = read_product(raw, protocol)
        _touch(product)
        assert product.price is None or product.price.amount is None
        variations = {
            s["variationsResult"]: {s["variationSummary"]: {s["price"]: {s["highestPrice"]: money}}}
        }
        result = read_variations(variations, protocol)
        assert result.highest_price is not None
        assert result.highest_price.amount is None
        assert result.highest_price.currency == "USD"

    @_FAST
    @given(
        asin=st.integers(1, 3000).map(lambda i: f"B{i:09d}"),
        protocol=st.sampled_from(["creators", "paapi5"]),
        resources=st.sets(st.sampled_from(sorted(CREATORS_ITEM_RESOURCES)), max_size=12),
    )
    def test_any_simulator_item(self, asin: str, protocol: str, resources: set[str]) -> None:
        """Whatever resources the simulator renders an item with, it reads and agrees."""
        if protocol == "paapi5":
            wanted = frozenset(
                ".".join(p[:1].upper() + p[1:] for p in r.split("."))
                for r in resources
                if not r.endswith("highRes")
            )
        else:
            wanted = frozenset(resources)
        raw = render_item(
            SETTINGS,
            US,
            asin,
            resources=wanted,
            partner_tag="demo-20",
            protocol=protocol,  # type: ignore[arg-type]
        )
        if raw is None:
            return
        product = read_product(raw)
        _touch(product)
        assert product.asin == asin
        assert (product.title is not None) == ("itemInfo.title" in resources)
        priced = "offersV2.listings.price" in resources
        assert (product.price is not None) == priced
