"""The synthetic catalogue and the simulator's quota primitive."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from creatorsapi_python_sdk.models.item import Item

from broker.asin import check_asin
from broker.simulator.catalog import (
    browse_node,
    is_well_formed,
    lookup,
    search_results,
    variation_asins,
)
from broker.simulator.marketplaces import MARKETPLACES, format_amount
from broker.simulator.quota import KeyQuota
from broker.simulator.render import (
    CREATORS_ITEM_RESOURCES,
    PAAPI_ITEM_RESOURCES,
    paapi_resource_to_creators,
    render_item,
)
from broker.simulator.settings import SimulatorSettings


def _page(
    settings: SimulatorSettings, marketplace: str, query: str, page: int, count: int
) -> tuple[int, list[str]]:
    """(total, one page) of a search, as the simulator's SearchItems pages it."""
    found = search_results(settings, marketplace, query)
    return len(found), list(found[(page - 1) * count : page * count])


SETTINGS = SimulatorSettings()
ASINS = [f"B0{i:08d}" for i in range(2000)]


class TestCatalogue:
    def test_variation_families_hold_only_valid_asins(self) -> None:
        """Every parent and child of a family is an ASIN the broker accepts, and a book
        (an ISBN-10, whose last character is a check digit) has no family: families of
        every stem gave books siblings with wrong check digits and parents like 291417776Q."""
        settings = SimulatorSettings()
        US = "www.amazon.com"
        families = 0
        for i in range(200):
            parent, children = variation_asins(settings, US, f"B0C{i:07d}")
            if parent is None:
                continue
            families += 1
            for asin in (parent, *children):
                assert check_asin(asin).asin == asin
                assert lookup(settings, US, asin).item is not None
        assert families > 50
        for isbn in ("2914177763", "0306406152", "080442957X"):
            assert check_asin(isbn).asin == isbn
            assert variation_asins(settings, US, isbn) == (None, [])
            item = lookup(settings, US, isbn).item
            assert item is not None
            assert item.parent_asin is None

    def test_deterministic(self) -> None:
        """The same settings give the same item; another seed gives another."""
        first = lookup(SETTINGS, "www.amazon.com", "B000TEST01")
        again = lookup(SimulatorSettings(), "www.amazon.com", "B000TEST01")
        other = lookup(SimulatorSettings(seed=1), "www.amazon.com", "B000TEST01")
        assert first == again
        assert first.item is not None
        assert other.item is not None
        assert first.item.title != other.item.title or first.item.listing != other.item.listing

    @pytest.mark.parametrize(
        "value", ["B000TEST0", "B000TEST011", "B000TEST0!", "ＢＢＢＢＢＢＢＢＢＢ"]
    )
    def test_malformed_ids_are_invalid(self, value: str) -> None:
        """Anything but 10 ASCII letters or digits is invalid."""
        assert not is_well_formed(value)
        assert lookup(SETTINGS, "www.amazon.com", value).status == "invalid"

    @pytest.mark.parametrize("node_id", ["0", "000", "abc", "１２", "12345678901234567890"])
    def test_bad_browse_node_ids_are_invalid(self, node_id: str) -> None:
        """A browse node id is 1 to 19 ASCII digits and not zero (protocol.md: "The
        BrowseNodeId 0 provided in the request is invalid.")."""
        assert browse_node(node_id) is None

    def test_shares(self) -> None:
        """missing_share and inaccessible_share decide the share of each status."""
        settings = replace(SETTINGS, missing_share=0.2, inaccessible_share=0.1)
        statuses = [lookup(settings, "www.amazon.com", a).status for a in ASINS]
        assert statuses.count("not_found") / len(ASINS) == pytest.approx(0.2, abs=0.03)
        assert statuses.count("not_accessible") / len(ASINS) == pytest.approx(0.1, abs=0.03)
        assert all(s == "ok" for s in (lookup(SETTINGS, "www.amazon.com", a).status for a in ASINS))

    @pytest.mark.parametrize(
        ("marketplace", "currency"),
        [
            ("www.amazon.com", "USD"),
            ("www.amazon.co.uk", "GBP"),
            ("www.amazon.de", "EUR"),
            ("www.amazon.co.jp", "JPY"),
            ("www.amazon.in", "INR"),
            ("www.amazon.se", "SEK"),
        ],
    )
    def test_currency_per_marketplace(self, marketplace: str, currency: str) -> None:
        """Prices are in the marketplace's currency; yen have no decimals."""
        item = lookup(SETTINGS, marketplace, "B000TEST01").item
        assert item is not None
        assert item.listing.currency == currency
        if currency == "JPY":
            assert item.listing.amount == int(item.listing.amount)
            assert "." not in item.listing.display_amount

    def test_display_amounts(self) -> None:
        """displayAmount follows each currency's conventions."""
        assert format_amount(1234.5, MARKETPLACES["www.amazon.com"].currency) == "$1,234.50"
        assert format_amount(1234.5, MARKETPLACES["www.amazon.de"].currency) == "1.234,50 €"
        assert format_amount(1234, MARKETPLACES["www.amazon.co.jp"].currency) == "￥1,234"

    def test_every_item_validates_against_the_sdk_model(self) -> None:
        """With every resource requested, items parse with Amazon's SDK Item model."""
        for asin in ASINS[:200]:
            rendered = render_item(
                SETTINGS,
                "www.amazon.com",
                asin,
                resources=CREATORS_ITEM_RESOURCES,
                partner_tag="x-20",
            )
            assert rendered is not None
            parsed = Item.from_dict(rendered)
            assert parsed is not None
            assert parsed.asin == asin
            assert parsed.offers_v2 is not None
            assert parsed.offers_v2.listings

    def test_paapi_rendering(self) -> None:
        """PA-API items are PascalCase with unrequested members absent and no HighRes."""
        rendered = render_item(
            SETTINGS,
            "www.amazon.com",
            "B000TEST01",
            resources=sorted(PAAPI_ITEM_RESOURCES),
            partner_tag="x-20",
            protocol="paapi5",
        )
        assert rendered is not None
        assert "ASIN" in rendered
        assert "asin" not in rendered
        tree: Any = rendered
        listing = tree["OffersV2"]["Listings"][0]
        assert set(listing) >= {
            "Availability",
            "Condition",
            "IsBuyBoxWinner",
            "MerchantInfo",
            "Price",
        }
        assert "HiRes" not in tree["Images"]["Primary"]
        assert not any(r.endswith("HighRes") for r in PAAPI_ITEM_RESOURCES)
        assert paapi_resource_to_creators("OffersV2.Listings.IsBuyBoxWinner") == (
            "offersV2.listings.isBuyBoxWinner"
        )

    def test_search_is_deterministic(self) -> None:
        """A search returns the same page of existing items each time."""
        first = _page(SETTINGS, "www.amazon.com", "lamp", 1, 10)
        assert first == _page(SETTINGS, "www.amazon.com", "lamp", 1, 10)
        assert len(first[1]) == 10
        assert _page(SETTINGS, "www.amazon.com", "noresults", 1, 10) == (0, [])

    def test_ean_label_carries_the_stores_locale(self) -> None:
        """An item's EAN label on www.amazon.de is in de_DE, as its other labels are."""
        from broker.simulator.render import item_json, resources_key

        resources = resources_key(["itemInfo.externalIds"], "creators")
        text = item_json(SETTINGS, "www.amazon.de", "B000TEST01", resources, "demo-22", "creators")
        assert text is not None
        eans = json.loads(text)["itemInfo"]["externalIds"]["eans"]
        assert eans["locale"] == "de_DE"

    @pytest.mark.parametrize("count", [3, 10])
    def test_search_pages_never_overlap_and_the_total_is_what_can_be_served(
        self, count: int
    ) -> None:
        """With a share of missing items, pages 1 to 10 of one search hold no ASIN twice, and
        the total is the query's alone (not the page size's) and counts only items served."""
        settings = replace(SETTINGS, missing_share=0.2)
        pages = [_page(settings, "www.amazon.com", "kettle", page, count) for page in range(1, 11)]
        seen = [asin for _, asins in pages for asin in asins]
        assert len(seen) == len(set(seen)) == 10 * count
        totals = {total for total, _ in pages}
        (total,) = totals
        assert total == _page(settings, "www.amazon.com", "kettle", 1, 1)[0]
        _, last = _page(settings, "www.amazon.com", "kettle", total, 1)
        assert len(last) == 1
        assert _page(settings, "www.amazon.com", "kettle", total + 1, 1)[1] == []


class TestKeyQuota:
    NOON = datetime(2026, 5, 1, 12, tzinfo=UTC)

    def test_rate_and_burst(self) -> None:
        """GCRA admits burst at once, then one per interval; refusals consume nothing."""
        quota = KeyQuota(tps=2.0, tpd=1000, burst=2)
        assert [quota.check(0.0, self.NOON).allowed for _ in range(3)] == [True, True, False]
        refused = quota.check(0.1, self.NOON)
        assert not refused.allowed
        assert refused.retry_after_s == pytest.approx(0.4)
        assert quota.check(0.5, self.NOON).allowed
        assert not quota.check(0.5, self.NOON).allowed

    def test_rate_change_at_runtime(self) -> None:
        """Raising tps takes effect on the next request: spaced by the new interval from the
        last one admitted, not the old (a key moved from 0.001 to 5 TPS stayed throttled
        for 1,000 s); lowering it spaces the next request by the new, longer interval; no
        burst of saved-up tokens either way."""
        quota = KeyQuota(tps=1.0, tpd=1000, burst=1)
        assert quota.check(0.0, self.NOON).allowed
        quota.tps = 10.0
        assert not quota.check(0.05, self.NOON).allowed
        assert quota.check(0.1, self.NOON).allowed
        assert not quota.check(0.15, self.NOON).allowed
        assert quota.check(0.2, self.NOON).allowed
        quota.tps = 0.001
        refused = quota.check(0.3, self.NOON)
        assert not refused.allowed
        assert refused.retry_after_s == pytest.approx(999.9)
        quota.tps = 5.0
        assert quota.check(0.4 + 1e-9, self.NOON).allowed  # 0.2 after the last (float noise)

    def test_rate_change_keeps_a_spent_burst_spent(self) -> None:
        """With a burst of 10 spent, a rate change rescales what is owed: raised from 1 to 5
        TPS the next is due 0.2 s after the last (it waited 7.4 s), lowered from 5 to 1 TPS
        none goes through at once (7 did)."""
        raised = KeyQuota(tps=1.0, tpd=1000, burst=10)
        assert all(raised.check(0.0, self.NOON).allowed for _ in range(10))
        raised.tps = 5.0
        assert not raised.check(0.1, self.NOON).allowed
        assert raised.check(0.2, self.NOON).allowed
        lowered = KeyQuota(tps=5.0, tpd=1000, burst=10)
        assert all(lowered.check(0.0, self.NOON).allowed for _ in range(10))
        lowered.tps = 1.0
        assert not lowered.check(0.0, self.NOON).allowed
        assert not lowered.check(0.9, self.NOON).allowed
        assert lowered.check(1.0, self.NOON).allowed

    def test_daily_limit(self) -> None:
        """TPD refuses until 00:00 UTC, then the count starts again."""
        quota = KeyQuota(tps=100.0, tpd=2, burst=1)
        assert quota.check(0.0, self.NOON).allowed
        assert quota.check(1.0, self.NOON).allowed
        refused = quota.check(2.0, self.NOON)
        assert refused.limit == "tpd"
        assert refused.retry_after_s == 12 * 3600
        assert quota.check(3.0, self.NOON + timedelta(hours=12)).allowed
