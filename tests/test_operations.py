"""SearchItems, GetVariations, GetBrowseNodes in Python's idiom: checked options, typed answers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import Harness, key_doc, make_config, paapi_key_doc
from hypothesis import given, settings
from hypothesis import strategies as st

import broker.product
from broker.api.base import Operation
from broker.api.operations import (
    Availability,
    DeliveryFlag,
    SortBy,
    browse_nodes_params,
    read_browse_nodes,
    read_search,
    read_variations,
    search_params,
    variations_params,
)
from broker.api.resources import ITEM_RESOURCES, resolve_resources, resource_names
from broker.config import DEFAULT_RESOURCES
from broker.errors import BadRequestError, ResponseError
from broker.models import Protocol
from broker.simulator.catalog import lookup, search_index_of, variation_asins
from broker.simulator.settings import FaultRates, SimulatorSettings

FREE = SimulatorSettings(limits=False)
US = "www.amazon.com"
C, P = Protocol.CREATORS, Protocol.PAAPI5


def _search(protocol: Protocol = C, **options: Any) -> dict[str, object]:
    return search_params(options, protocol=protocol, default_resources=DEFAULT_RESOURCES)  # type: ignore[arg-type]


class TestDefaultResources:
    """Without resources=, an operation asks the config's plus what only it returns."""

    def test_search_adds_refinements_in_the_protocol_spelling(self) -> None:
        """The config's names (either spelling) plus searchRefinements, spelled per API."""
        for protocol, expected in (
            (C, ["itemInfo.title", "searchRefinements"]),
            (P, ["ItemInfo.Title", "SearchRefinements"]),
        ):
            params = search_params(
                {"keywords": "x"}, protocol=protocol, default_resources=["ItemInfo.Title"]
            )
            assert params["resources"] == expected

    def test_variations_add_their_summary(self) -> None:
        """get_variations asks its summary too, so dimensions and prices come back."""
        params = variations_params(
            "B000000001", {}, protocol=C, default_resources=["itemInfo.title"]
        )
        assert params["resources"] == [
            "itemInfo.title",
            "variationSummary.price.highestPrice",
            "variationSummary.price.lowestPrice",
            "variationSummary.variationDimension",
        ]


class TestResources:
    """Resource names in either spelling, checked and spelled for the protocol."""

    @pytest.mark.parametrize("name", ["ItemInfo.Title", "itemInfo.title", "ITEMINFO.TITLE"])
    def test_either_spelling(self, name: str) -> None:
        """Any spelling of a resource resolves to each protocol's own."""
        assert resolve_resources([name], C) == ("itemInfo.title",)
        assert resolve_resources([name], P) == ("ItemInfo.Title",)

    def test_a_misspelt_name_names_the_one_meant(self) -> None:
        """A misspelt resource names the closest accepted one (a command-line user cannot
        call the Python function the message named); a name close to none still says where
        the accepted names are."""
        with pytest.raises(ValueError, match=r"'itemInfo\.titel' .*did you mean itemInfo\.title\?"):
            resolve_resources(["itemInfo.titel"], C)
        with pytest.raises(ValueError, match=r"did you mean OffersV2\.Listings\.Price\?"):
            resolve_resources(["offersv2.listings.prize"], P)
        with pytest.raises(ValueError, match=r"resource_names\('creators'\) lists"):
            resolve_resources(["bogus"], C)

    def test_duplicates_dropped_and_names_sorted(self) -> None:
        """The same resource twice is sent once, and one set in any order resolves to one
        tuple (one lookup identity)."""
        names = ["OffersV2.Listings.Price", "itemInfo.title", "offersV2.listings.price"]
        assert resolve_resources(names, C) == ("itemInfo.title", "offersV2.listings.price")
        assert resolve_resources(list(reversed(names)), C) == resolve_resources(names, C)

    @pytest.mark.parametrize(
        ("name", "protocol", "message"),
        [
            ("ItemInfo.Titel", C, "unknown resource 'ItemInfo.Titel'"),
            ("Offers.Listings.Price", P, "retired on 2026-01-31"),
            ("images.primary.highRes", P, "no PA-API equivalent"),
            ("searchRefinements", C, "is a SearchItems resource"),
            ("RentalOffers.Listings.BasePrice", C, "PA-API 5.0 resource"),
        ],
    )
    def test_unknown_names_raise(self, name: str, protocol: Protocol, message: str) -> None:
        """A name the operation does not take raises ValueError saying why."""
        with pytest.raises(ValueError, match=message):
            resolve_resources([name], protocol)

    def test_single_string_refused(self) -> None:
        """A lone string is not a list of resources."""
        with pytest.raises(TypeError, match="not a single string"):
            resolve_resources("itemInfo.title", C)

    def test_full_lists(self) -> None:
        """Both APIs' item lists: 34 Creators names; PA-API the same less the two highRes,
        plus its 13 RentalOffers names."""
        assert len(ITEM_RESOURCES) == 34
        paapi = resource_names(P)
        assert len(paapi) == 32 + 13
        assert "ParentASIN" in paapi
        assert "RentalOffers.Listings.Condition.ConditionNote" in paapi
        assert "searchRefinements" in resource_names(C, Operation.SEARCH_ITEMS)
        assert "BrowseNodes.Children" in resource_names(P, Operation.GET_BROWSE_NODES)

    def test_lists_by_plain_names(self) -> None:
        """resource_names takes the protocol and operation as the strings users write."""
        assert resource_names("creators") == resource_names(C)
        assert resource_names("paapi5", "GetItems") == resource_names(P)
        assert resource_names("creators", "SearchItems") == resource_names(
            C, Operation.SEARCH_ITEMS
        )
        # The Creators API spells its operations in camelCase: that spelling works too.
        assert resource_names("creators", "searchItems") == resource_names(
            C, Operation.SEARCH_ITEMS
        )
        with pytest.raises(ValueError, match="protocol"):
            resource_names("paapi4")
        with pytest.raises(ValueError, match="operation"):
            resource_names("creators", "GetItem")
        with pytest.raises(ValueError, match="operation"):
            resource_names("creators", "SEARCHITEMS")  # either API's spelling, not any

    def test_unknown_name_message_names_a_call_that_works(self) -> None:
        """The ValueError for an unknown name points at a resource_names call that runs."""
        with pytest.raises(ValueError, match=r"resource_names\('paapi5'\)"):
            resolve_resources(["ItemInfo.Nope"], P)


class TestSearchParams:
    """search_params checks every option before a request exists."""

    def test_snake_case_to_wire(self) -> None:
        """Options become the API's camelCase parameters, enums their values."""
        params = _search(
            keywords="kettle",
            search_index="Kitchen",
            item_count=3,
            item_page=2,
            sort_by=SortBy.PRICE_LOW_TO_HIGH,
            min_price=1000,
            max_price=5000,
            brand="Aperture",
            condition="new",
            availability=Availability.AVAILABLE,
            delivery_flags=[DeliveryFlag.PRIME, "FreeShipping"],
            min_reviews_rating=4,
            browse_node_id=283155,
            resources=["ItemInfo.Title", "searchRefinements"],
        )
        assert params == {
            "keywords": "kettle",
            "searchIndex": "Kitchen",
            "itemCount": 3,
            "itemPage": 2,
            "sortBy": "Price:LowToHigh",
            "minPrice": 1000,
            "maxPrice": 5000,
            "brand": "Aperture",
            "condition": "New",
            "availability": "Available",
            "deliveryFlags": ["Prime", "FreeShipping"],
            "minReviewsRating": 4,
            "browseNodeId": "283155",
            "resources": ["itemInfo.title", "searchRefinements"],
        }

    def test_config_resources_by_default(self) -> None:
        """Without resources, the config's are asked for (and the search's refinements)."""
        wanted = sorted([*DEFAULT_RESOURCES, "searchRefinements"])
        assert _search(keywords="x")["resources"] == wanted

    @pytest.mark.parametrize(
        ("options", "error", "names"),
        [
            ({"keywords": "x", "itemcount": 3}, TypeError, "'itemcount'"),
            ({"keywords": "x", "item_count": 0}, ValueError, "item_count must be between 1"),
            ({"keywords": "x", "item_count": 101}, ValueError, "item_count"),
            ({"keywords": "x", "item_count": "3"}, TypeError, "item_count must be an int"),
            ({"keywords": "x", "item_page": 11}, ValueError, "item_page"),
            ({"keywords": "x", "min_price": 9.99}, TypeError, "smallest currency unit"),
            ({"keywords": "x", "min_price": 500, "max_price": 100}, ValueError, "min_price"),
            # Past a server's 32-bit integer: refused before a request is spent on it.
            ({"keywords": "x", "min_price": 2**31}, ValueError, "min_price must be between"),
            ({"keywords": "x", "max_price": 2**70}, ValueError, "max_price must be between"),
            ({"keywords": "x", "sort_by": "cheapest"}, ValueError, "sort_by must be a SortBy"),
            ({"keywords": "x", "condition": "Used"}, ValueError, "Any or New only"),
            ({"keywords": "x", "merchant": "Amazon"}, ValueError, "only PA-API"),
            ({"keywords": "x", "delivery_flags": "Prime"}, TypeError, "delivery_flags"),
            ({"keywords": "x", "browse_node_id": "abc"}, ValueError, "browse_node_id"),
            ({"keywords": "x", "browse_node_id": "\u00b2\u00b3"}, ValueError, "browse_node_id"),
            ({"keywords": "x", "sort_by": 5}, TypeError, "sort_by must be a SortBy"),
            ({"keywords": "x", "availability": 1}, TypeError, "availability"),
            ({"keywords": "x", "delivery_flags": [1]}, TypeError, "delivery_flags"),
            ({"keywords": " "}, ValueError, "keywords must not be blank"),
            # Bytes that are not UTF-8, as Python decodes an argv or file name: no request.
            (
                {"keywords": "caf\udce9"},
                ValueError,
                "keywords holds .* at 3, a byte that was not UTF-8",
            ),
            ({"keywords": "x", "brand": "\ud800"}, ValueError, "brand holds"),
            ({"search_index": "All", "keywords": "x" * 1001}, ValueError, "at most 1000"),
            ({"item_count": 3}, ValueError, "needs something to search for"),
            ({"keywords": "x", "resources": ["Nope"]}, ValueError, "unknown resource 'Nope'"),
        ],
    )
    def test_bad_options_named(
        self, options: dict[str, Any], error: type[Exception], names: str
    ) -> None:
        """Unknown or out-of-range options raise TypeError/ValueError naming them: a value of
        the wrong type (a number for an enum option) TypeError, a digit that is not ASCII in
        a node id ValueError."""
        with pytest.raises(error, match=names):
            _search(**options)

    def test_paapi_limits(self) -> None:
        """PA-API caps item_count at 10 and takes Used and a merchant; Creators takes 100."""
        assert _search(C, keywords="x", item_count=100)["itemCount"] == 100
        with pytest.raises(ValueError, match="between 1 and 10"):
            _search(P, keywords="x", item_count=11)
        params = _search(P, keywords="x", condition="Used", merchant="amazon")
        assert (params["condition"], params["merchant"]) == ("Used", "Amazon")


class TestOtherParams:
    """get_variations and get_browse_nodes arguments."""

    def test_variations(self) -> None:
        """The ASIN is normalised; counts are range-checked."""
        params = variations_params(
            "b000000001",
            {"variation_count": 5, "resources": ["parentASIN"]},
            protocol=C,
            default_resources=(),
        )
        assert params == {"asin": "B000000001", "resources": ["parentASIN"], "variationCount": 5}
        with pytest.raises(ValueError, match="not a valid ASIN"):
            variations_params("nope", {}, protocol=C, default_resources=())
        with pytest.raises(ValueError, match="variation_count must be between 1 and 10"):
            variations_params(
                "B000000001", {"variation_count": 11}, protocol=C, default_resources=()
            )
        with pytest.raises(ValueError, match="variation_page must be between 1 and 2147483647"):
            variations_params(
                "B000000001", {"variation_page": 2**31}, protocol=C, default_resources=()
            )

    def test_browse_nodes(self) -> None:
        """Ids as str or int, 1 to 10, ancestors and children by default."""
        params = browse_nodes_params([283155, "283155", "1"], {}, protocol=P)
        assert params == {
            "browseNodeIds": ["283155", "1"],
            "resources": ["BrowseNodes.Ancestor", "BrowseNodes.Children"],
        }
        with pytest.raises(TypeError, match="list of ids"):
            browse_nodes_params("283155", {}, protocol=C)
        with pytest.raises(ValueError, match="1 to 10"):
            browse_nodes_params([str(i) for i in range(1, 12)], {}, protocol=C)
        with pytest.raises(ValueError, match="a GetItems resource, not a GetBrowseNodes one"):
            browse_nodes_params(["1"], {"resources": ["itemInfo.title"]}, protocol=C)

    def test_browse_node_ids_counted_once_each(self) -> None:
        """The 10-id limit counts distinct ids, as Amazon sees them: one id repeated 11
        times is one id (get_items takes any number of repeats too)."""
        params = browse_nodes_params(["283155"] * 11, {}, protocol=C)
        assert params["browseNodeIds"] == ["283155"]
        many = [str(i) for i in range(1, 11)] * 2
        assert len(browse_nodes_params(many, {}, protocol=C)["browseNodeIds"]) == 10  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="1 to 10 distinct ids, got 11"):
            browse_nodes_params([*many, "11", "1"], {}, protocol=C)


class TestReaders:
    """Answers of any shape read as typed results without raising."""

    @pytest.mark.parametrize("raw", [{}, {"searchResult": []}, {"searchResult": {"items": 5}}])
    def test_odd_answers(self, raw: dict[str, object]) -> None:
        """Empty or ill-shaped answers give empty results."""
        assert read_search(raw, C).items == ()
        assert read_variations(raw, C).items == ()
        assert read_browse_nodes(raw, C).browse_nodes == ()

    def test_counts_sent_as_integral_floats_are_read(self) -> None:
        """A count Amazon sends as 722.0 (a JSON number, as the SDK types it) is read as 722,
        as an item's review count is; the three counts read as unknown."""
        search = {"searchResult": {"totalResultCount": 722.0}}
        assert read_search(search, C).total_result_count == 722
        summary = {"variationSummary": {"variationCount": 12.0, "pageCount": 2.0}}
        variations = read_variations({"variationsResult": summary}, C)
        assert (variations.variation_count, variations.page_count) == (12, 2)
        assert (
            read_search({"searchResult": {"totalResultCount": 7.5}}, C).total_result_count is None
        )

    def test_a_protocol_named_by_its_value_is_read_so(self) -> None:
        """The readers take the protocol's name ("creators"), as resource_names() does: a
        Creators answer was read with PA-API's spelling (nothing found), and read_product
        raised KeyError."""
        raw = {"searchResult": {"totalResultCount": 7, "items": [{"asin": "B0ABCDEFGH"}]}}
        result = read_search(raw, "creators")  # type: ignore[arg-type]
        assert [item.asin for item in result.items] == ["B0ABCDEFGH"]
        assert broker.product.read_product({"asin": "B0ABCDEFGH"}, "creators").asin == "B0ABCDEFGH"
        with pytest.raises(ValueError, match="'amazon'"):
            broker.product.read_product({}, "amazon")

    def test_refinements(self) -> None:
        """Search refinements of PA-API's shape are read."""
        raw = {
            "SearchResult": {
                "TotalResultCount": 7,
                "SearchRefinements": {
                    "SearchIndex": {
                        "Id": "SearchIndex",
                        "DisplayName": "Department",
                        "Bins": [{"Id": "Kitchen", "DisplayName": "Kitchen"}],
                    },
                    "OtherRefinements": [{"Id": "Brand", "Bins": [{"Id": "Aperture"}]}],
                },
            }
        }
        result = read_search(raw, P)
        assert result.total_result_count == 7
        assert [(r.kind, r.id) for r in result.refinements] == [
            ("search_index", "SearchIndex"),
            ("other", "Brand"),
        ]
        assert result.refinements[0].bins[0].display_name == "Kitchen"


class TestAgainstSimulator:
    """The broker's methods end to end, both protocols."""

    @pytest.mark.parametrize("protocol", ["creators", "paapi5"])
    async def test_typed_operations(self, harness: Harness, protocol: str) -> None:
        """item_count is honoured; items, variations and nodes come back typed."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url, protocol=protocol))
        search = await broker.search_items(
            keywords="kettle", item_count=3, resources=["ItemInfo.Title", "OffersV2.Listings.Price"]
        )
        assert len(search.items) == 3
        assert all(p.title and p.price and p.price.amount for p in search.items)
        assert search.total_result_count is not None
        assert search.total_result_count >= 3
        assert search.search_url is not None
        assert "kettle" in search.search_url
        defaults = await broker.get_variations("B000000001")
        assert defaults.dimensions
        assert defaults.lowest_price is not None
        variations = await broker.get_variations(
            "B000000001", variation_count=2, resources=["itemInfo.title", "parentASIN"]
        )
        assert 1 <= len(variations.items) <= 2
        assert all(p.variation_attributes for p in variations.items)
        assert variations.variation_count is not None
        nodes = await broker.get_browse_nodes(["283155"])
        (node,) = nodes.browse_nodes
        assert node.id == "283155"
        assert node.display_name == "Books"
        assert [child.id for child in node.children] == ["1000"]

    async def test_rental_offers_are_asked_on_pa_api(self, harness: Harness) -> None:
        """PA-API's RentalOffers.* resources (protocol.md 3.3: only Offers V1 is retired) are
        accepted by the broker and the simulator, in GetItems and SearchItems; the
        simulator's catalogue holds no rentals, so the item comes back without them."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url, protocol="paapi5"))
        wanted = ["ItemInfo.Title", "RentalOffers.Listings.BasePrice"]
        (result,) = await broker.get_items(["B000000001"], resources=wanted)
        assert result.ok, result.error
        assert result.query is not None
        assert result.query.resources == ("ItemInfo.Title", "RentalOffers.Listings.BasePrice")
        assert result.summary is not None
        assert result.summary.title
        search = await broker.search_items(keywords="kettle", item_count=2, resources=wanted)
        assert len(search.items) == 2

    async def test_operations_given_up_while_the_key_waits_leave_the_queue(
        self, harness: Harness
    ) -> None:
        """Searches timed out while the key waits for its daily reset (the README's advice)
        leave the work queue at once, as lookups do; each stayed queued, and held its
        memory, until the reset."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url, keys=[key_doc(tpd=1)]))
        await broker.search_items(keywords="kettle", item_count=1)  # the day's one request
        for _ in range(5):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await broker.search_items(keywords="kettle", item_count=1)
        await asyncio.sleep(0)
        assert broker.metrics().queued_batches == 0

    async def test_get_variations_of_a_url_asks_its_own_store(self, harness: Harness) -> None:
        """get_variations of an amazon.co.uk link asks www.amazon.co.uk, as get_items does
        (it asked the default store: US prices and US affiliate links for a UK page)."""
        sim = await harness.simulator(FREE)
        tags = {"www.amazon.com": "demo-20", "www.amazon.co.uk": "demo-21"}
        broker = await harness.broker(make_config(sim.url, keys=[key_doc(tags=tags)]))
        link = "https://www.amazon.co.uk/dp/B000000001"
        variations = await broker.get_variations(link, variation_count=2)
        urls = [p.detail_page_url or "" for p in variations.items]
        assert urls
        assert all("amazon.co.uk" in url and "demo-21" in url for url in urls)
        named = await broker.get_variations(link, marketplace="US", variation_count=2)
        assert all("amazon.com/" in (p.detail_page_url or "") for p in named.items)

    @pytest.mark.parametrize("protocol", ["creators", "paapi5"])
    async def test_variation_dimensions_carry_the_stores_locale(
        self, harness: Harness, protocol: str
    ) -> None:
        """The simulator's variation dimensions on www.amazon.de are in de_DE, as its items
        are (they were en_US in every store)."""
        sim = await harness.simulator(FREE)
        tags = {"www.amazon.de": "demo-22"}
        doc = key_doc(tags=tags) if protocol == "creators" else paapi_key_doc(tags=tags)
        broker = await harness.broker(make_config(sim.url, protocol=protocol, keys=[doc]))
        variations = await broker.get_variations("B000000001", marketplace="DE")
        assert variations.dimensions
        assert {d.locale for d in variations.dimensions} == {"de_DE"}

    @pytest.mark.parametrize("protocol", ["creators", "paapi5"])
    async def test_wrong_shape_is_bad_response_not_empty(
        self, harness: Harness, protocol: str
    ) -> None:
        """A 200 of the wrong shape is retried and then raised, never read as "nothing found"."""
        faults = FaultRates(bad_shape=1.0)
        sim = await harness.simulator(SimulatorSettings(limits=False, seed=3, faults=faults))
        broker = await harness.broker(
            make_config(sim.url, protocol=protocol, retry={"max_attempts": 3})
        )
        calls = (
            ("searchResult", lambda: broker.search_items(keywords="kettle")),
            ("variationsResult", lambda: broker.get_variations("B000000001")),
            ("browseNodesResult", lambda: broker.get_browse_nodes(["283155"])),
        )
        for container, call in calls:
            with pytest.raises(ResponseError, match="wrong shape") as caught:
                await call()
            assert container.lower() in str(caught.value).lower()
        assert sim.stats.faults["bad_shape"] == 9

    @pytest.mark.parametrize("protocol", ["creators", "paapi5"])
    async def test_no_hits_is_no_results_on_both_apis(
        self, harness: Harness, protocol: str
    ) -> None:
        """A search that finds nothing raises NoResults with its remedy, whatever the API."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url, protocol=protocol))
        with pytest.raises(BadRequestError) as caught:
            await broker.search_items(keywords="noresults at all")
        assert caught.value.code == "NoResults"
        assert caught.value.info.remedy.startswith("Broaden the search")

    @pytest.mark.parametrize("protocol", ["creators", "paapi5"])
    async def test_browse_node_errors_speak_of_browse_nodes(
        self, harness: Harness, protocol: str
    ) -> None:
        """A browse node id that is no node gets a remedy about node ids, not ASINs, and a
        call none of whose ids is a node raises NoResults on both APIs (Creators raised
        ResourceNotFoundException with an ASIN remedy)."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url, protocol=protocol))
        found = await broker.get_browse_nodes(["283155", "0"])
        assert [e.code for e in found.errors] == ["InvalidParameterValue"]
        assert "browse node" in found.errors[0].remedy
        assert "ASIN" not in found.errors[0].remedy
        with pytest.raises(BadRequestError) as caught:
            await broker.get_browse_nodes(["0"])
        assert caught.value.code == "NoResults"
        assert "browse node" in caught.value.info.remedy

    @pytest.mark.parametrize("protocol", ["creators", "paapi5"])
    async def test_search_index_and_browse_node_filter_the_search(
        self, harness: Harness, protocol: str
    ) -> None:
        """The simulator takes a browse node as a filter (every item found lies under it,
        and fewer are found) and search index All as no filter; neither joins the search
        terms (both were searched for as keywords, so a client that dropped them passed)."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url, protocol=protocol))
        plain = await broker.search_items(keywords="kettle", item_count=10)
        assert (
            await broker.search_items(keywords="kettle", item_count=10, search_index="All") == plain
        )
        first = lookup(FREE, US, plain.items[0].asin or "").item
        assert first is not None
        node = first.browse_nodes[0]
        root = node.ancestors[-1][0] if node.ancestors else node.id
        narrowed = await broker.search_items(keywords="kettle", item_count=10, browse_node_id=root)
        assert narrowed.items
        assert narrowed.total_result_count is not None
        assert plain.total_result_count is not None
        assert narrowed.total_result_count < plain.total_result_count
        for product in narrowed.items:
            item = lookup(FREE, US, product.asin or "").item
            assert item is not None
            assert any(root in {n.id, *(a for a, _ in n.ancestors)} for n in item.browse_nodes)
        assert narrowed.search_url is not None
        assert "k=kettle&" in narrowed.search_url
        index = search_index_of(node.ancestors[-1][1] if node.ancestors else node.name)
        department = await broker.search_items(keywords="kettle", search_index=index)
        assert department.items
        for product in department.items:
            item = lookup(FREE, US, product.asin or "").item
            assert item is not None
            assert any(
                search_index_of(n.ancestors[-1][1] if n.ancestors else n.name) == index
                for n in item.browse_nodes
            )

    async def test_variation_summary_covers_every_page(self, harness: Harness) -> None:
        """The summary (price range, dimension values) is the whole set's on every page."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url))
        pages = [
            await broker.get_variations("B000000001", variation_count=2, variation_page=page)
            for page in (1, 2)
        ]
        assert pages[0].page_count is not None
        assert pages[0].page_count >= 2
        assert pages[0].items[0].asin != pages[1].items[0].asin
        assert pages[0].lowest_price == pages[1].lowest_price
        assert pages[0].highest_price == pages[1].highest_price
        assert pages[0].dimensions == pages[1].dimensions

    @pytest.mark.parametrize("protocol", ["creators", "paapi5"])
    async def test_variation_families_hold_together(self, harness: Harness, protocol: str) -> None:
        """An item's parent lists it among its variations, every variation names that parent,
        the variations differ in colour or size, and the parent and each child get the same
        family; an item with no parent has no variations, NoResults on both APIs (the
        simulator gave every ASIN a family of its own, naming another parent)."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url, protocol=protocol))
        asins = [f"B0FAM{i:05d}" for i in range(40)]
        results = await broker.get_items(asins, resources=["itemInfo.title", "parentASIN"])
        children = [r for r in results if r.product is not None and r.product.parent_asin]
        alone = [r for r in results if r.product is not None and not r.product.parent_asin]
        assert children
        assert alone
        for result in children[:4]:
            assert result.product is not None
            parent = result.product.parent_asin
            family: set[str] = set()
            looks: list[tuple[tuple[str | None, str | None], ...]] = []
            page = 1
            while True:
                found = await broker.get_variations(
                    result.asin, variation_page=page, resources=["parentASIN"]
                )
                family |= {p.asin or "" for p in found.items}
                looks += [
                    tuple((a.name, a.value) for a in p.variation_attributes) for p in found.items
                ]
                assert {p.parent_asin for p in found.items} == {parent}
                if page == found.page_count:
                    break
                page += 1
            assert result.asin in family
            assert len(set(looks)) == len(looks) == len(family)
            for other in (parent or "", sorted(family)[-1]):
                again = await broker.get_variations(other, resources=["parentASIN"])
                assert {p.asin for p in again.items} <= family
                assert again.variation_count == len(family)
        with pytest.raises(BadRequestError) as caught:
            await broker.get_variations(alone[0].asin)
        assert caught.value.code == "NoResults"

    async def test_a_parent_not_served_still_lists_its_family(self, harness: Harness) -> None:
        """GetVariations of a family's parent gives the family even when the parent itself
        is not served (missing_share; a parent has no offer of its own), as the README
        says; it found nothing."""
        settings = SimulatorSettings(limits=False, missing_share=0.3)
        parent = None
        for i in range(200):
            found, children = variation_asins(settings, US, f"B0P{i:07d}")
            if found and children and lookup(settings, US, found).status == "not_found":
                parent = found
                break
        assert parent is not None
        sim = await harness.simulator(settings)
        broker = await harness.broker(make_config(sim.url))
        family = await broker.get_variations(parent, resources=["parentASIN"])
        assert family.items
        assert {p.parent_asin for p in family.items} == {parent}

    async def test_checked_before_any_request(self, harness: Harness) -> None:
        """Bad options and unknown resources raise without a request being sent."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url))
        with pytest.raises(ValueError, match="item_count"):
            await broker.search_items(keywords="kettle", item_count=0)
        with pytest.raises(ValueError, match="unknown resource"):
            await broker.search_items(keywords="kettle", resources=["itemInfo.price"])
        with pytest.raises(TypeError, match="'itemcount'"):
            await broker.search_items(keywords="kettle", itemcount=3)  # type: ignore[call-arg]
        with pytest.raises(ValueError, match="not a valid ASIN"):
            await broker.get_variations("B0")
        assert sim.stats.accounts["demo"].accepted == 0

    async def test_marketplace_names_as_lookups_take_them(self, harness: Harness) -> None:
        """Operations take a marketplace as get_items does ("US", "amazon.com", any case)."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url))
        for name in ("US", "amazon.com", "WWW.AMAZON.COM"):
            found = await broker.search_items(keywords="kettle", item_count=1, marketplace=name)
            assert found.items
        assert (await broker.get_variations("B000000001", marketplace="us")).items
        assert (await broker.get_browse_nodes(["283155"], marketplace="amazon.com")).browse_nodes
        with pytest.raises(ValueError, match="unknown marketplace 'Narnia'"):
            await broker.search_items(keywords="kettle", marketplace="Narnia")


def test_peer_enums_accepted() -> None:
    """python-amazon-paapi's enum members (str enums of Amazon's values) work as they are."""
    from amazon_creatorsapi.models import Condition as PeerCondition
    from amazon_creatorsapi.models import SortBy as PeerSortBy

    params = _search(
        keywords="x", sort_by=PeerSortBy.PRICE_COLON_LOW_TO_HIGH, condition=PeerCondition.NEW
    )
    assert (params["sortBy"], params["condition"]) == ("Price:LowToHigh", "New")


def test_peer_enum_member_names_are_ours_too() -> None:
    """Every member name of python-amazon-paapi's SortBy, Condition, Availability and
    DeliveryFlag is one of ours, naming the same value, so swapping only the import line
    works (``DeliveryFlag.FREESHIPPING`` raised AttributeError)."""
    from amazon_creatorsapi import models as peer

    from broker.api import operations as ours

    for name in ("SortBy", "Condition", "Availability", "DeliveryFlag"):
        theirs, mine = getattr(peer, name), getattr(ours, name)
        for member in theirs:
            assert mine[member.name].value == member.value, (name, member.name)


#: python-amazon-paapi 5.x's enums (``amazon_paapi.models``, the PA-API 5.0 SDK's classes of
#: string constants; 5.0.1 is not installed beside 7.x, so its members are copied here).
PEER_5X_ENUMS = {
    "SortBy": {
        "AVGCUSTOMERREVIEWS": "AvgCustomerReviews",
        "FEATURED": "Featured",
        "NEWESTARRIVALS": "NewestArrivals",
        "PRICE_HIGHTOLOW": "Price:HighToLow",
        "PRICE_LOWTOHIGH": "Price:LowToHigh",
        "RELEVANCE": "Relevance",
    },
    "Condition": {
        "ANY": "Any",
        "COLLECTIBLE": "Collectible",
        "NEW": "New",
        "REFURBISHED": "Refurbished",
        "USED": "Used",
    },
    "Availability": {"AVAILABLE": "Available", "INCLUDEOUTOFSTOCK": "IncludeOutOfStock"},
    "Merchant": {"ALL": "All", "AMAZON": "Amazon"},
    "DeliveryFlag": {
        "AMAZONGLOBAL": "AmazonGlobal",
        "FREESHIPPING": "FreeShipping",
        "FULFILLEDBYAMAZON": "FulfilledByAmazon",
        "PRIME": "Prime",
    },
}


def test_peer_5x_enum_member_names_are_ours_too() -> None:
    """Every member name of python-amazon-paapi 5.x's enums is one of ours, naming the same
    value (``SortBy.PRICE_LOWTOHIGH`` raised AttributeError)."""
    from broker.api import operations as ours

    for name, members in PEER_5X_ENUMS.items():
        mine = getattr(ours, name)
        for member, value in members.items():
            assert mine[member].value == value, (name, member)


_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_keys = st.sampled_from(
    [
        "searchResult",
        "SearchResult",
        "items",
        "Items",
        "totalResultCount",
        "searchURL",
        "searchRefinements",
        "SearchRefinements",
        "searchIndex",
        "otherRefinements",
        "bins",
        "Bins",
        "variationsResult",
        "VariationsResult",
        "variationSummary",
        "variationDimensions",
        "values",
        "price",
        "lowestPrice",
        "amount",
        "browseNodesResult",
        "BrowseNodesResult",
        "browseNodes",
        "BrowseNodes",
        "ancestor",
        "children",
        "errors",
        "Errors",
        "code",
        "Code",
        "id",
        "displayName",
    ]
) | st.text(max_size=5)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=5),
    max_leaves=40,
)


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(raw=st.dictionaries(_keys, _json, max_size=4), protocol=st.sampled_from(list(Protocol)))
def test_readers_never_raise(raw: dict[str, object], protocol: Protocol) -> None:
    """Any JSON object reads as a typed answer of each operation, without raising."""
    assert read_search(raw, protocol).raw is raw
    assert read_variations(raw, protocol).raw is raw
    assert read_browse_nodes(raw, protocol).raw is raw
