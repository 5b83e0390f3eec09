"""Tests for broker.api.creators: Creators API requests and responses, per protocol.md 2."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import pickle
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.api.base import Dialect, Operation, ParsedItems, RawResponse
from broker.api.creators import USER_AGENT, CreatorsDialect
from broker.engine.retry import RetryPolicy
from broker.errors import (
    CATALOGUE,
    ApiError,
    AuthError,
    BadRequestError,
    ResponseError,
    ServerError,
    ThrottledError,
    describe,
)
from broker.models import ItemSummary, Status
from broker.testing import FakeClock

DIALECT = CreatorsDialect()
SEARCH = Operation.SEARCH_ITEMS
DATE = "Fri, 01 May 2026 12:00:00 GMT"


def response(status: int, body: object, **headers: str) -> RawResponse:
    """A RawResponse with ``body`` JSON-encoded unless it is already bytes."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return RawResponse(status, {k.replace("_", "-"): v for k, v in headers.items()}, raw)


def parse(status: int, body: object, requested: list[str], **headers: str) -> ParsedItems:
    return DIALECT.parse_get_items(response(status, body, **headers), requested)


def failure(status: int, body: object, **headers: str) -> ApiError:
    with pytest.raises(ApiError) as info:
        DIALECT.parse_get_items(response(status, body, **headers), ["B000000001"])
    return info.value


def _retry_after_at(hour: int, retry_after: str, **headers: str) -> float | None:
    """The wait a 429 with ``retry_after`` (and ``headers``) gives a dialect whose clock
    reads ``hour``:00:00 UTC on 2026-05-01."""
    clock = FakeClock(epoch=datetime(2026, 5, 1, hour, 0, 0, tzinfo=UTC))
    raw = response(429, {"type": "ThrottleException"}, retry_after=retry_after, **headers)
    with pytest.raises(ThrottledError) as info:
        CreatorsDialect(clock=clock).parse_get_items(raw, ["B000000001"])
    return info.value.retry_after


# protocol.md 2.6, the documented curl response (explicit nulls for unrequested members).
CURL_RESPONSE = (
    b'{"itemsResult":{"items":[{"asin":"B09B2SBHQK","browseNodeInfo":null,"customerReviews":null,'
    b'"detailPageURL":"https://www.amazon.com/dp/B09B2SBHQK?tag=xyz-20&linkCode=ogi&th=1&psc=1'
    b'&language=en_US","images":{"primary":{"hiRes":null,"large":null,"medium":null,"small":'
    b'{"height":49,"url":"https://m.media-amazon.com/images/I/41cNJGm9ZFL._SL75_.jpg",'
    b'"width":75}},"variants":null},"itemInfo":{"byLineInfo":null,"classifications":null,'
    b'"contentInfo":null,"contentRating":null,"externalIds":null,"features":{"displayValues":'
    b'["\xe2\x80\xa6"],"label":"Features","locale":"en_US"},"manufactureInfo":null,'
    b'"productInfo":null,"technicalInfo":null,"title":{"displayValue":"Amazon Echo Show 5 '
    b'\xe2\x80\xa6","label":"Title","locale":"en_US"},"tradeInInfo":null},"offersV2":null,'
    b'"parentASIN":"B0BZTW3TCH","score":null,"variationAttributes":null}]}}'
)

# protocol.md 2.7, the documented partial-success response.
PARTIAL_RESPONSE = {
    "errors": [
        {
            "code": "InvalidParameterValue",
            "message": "The ItemIds B08N5WRWNW provided in the request is invalid.",
        }
    ],
    "itemsResult": {
        "items": [
            {
                "asin": "B0BL8WSCH3",
                "detailPageURL": "https://www.amazon.com/dp/B0BL8WSCH3?tag=xyz-20&linkCode=ogi&th=1&psc=1",
                "itemInfo": {
                    "title": {
                        "displayValue": "Amazon Fire 7 Kids tablet (newest model) ages 3-7",
                        "label": "Title",
                        "locale": "en_US",
                    }
                },
            }
        ]
    },
}


def offer_item(asin: str, **listing: object) -> dict[str, object]:
    return {"asin": asin, "offersV2": {"listings": [listing]}}


class TestGetItemsRequest:
    def test_satisfies_the_dialect_protocol(self) -> None:
        """CreatorsDialect is a Dialect (mypy checks this assignment)."""
        dialect: Dialect = DIALECT
        assert callable(dialect.parse_get_items)

    def test_body_matches_sdk_shape_byte_for_byte(self) -> None:
        """The body is the SDK wire example of protocol.md 2.5, byte for byte."""
        request = DIALECT.get_items_request(
            ["B0199980K4", "B000HZD168"],
            marketplace="www.amazon.com",
            partner_tag="xyz-20",
            resources=["itemInfo.title", "images.primary.small", "offersV2.listings.price"],
        )
        assert request.body == (
            b'{"partnerTag":"xyz-20","itemIds":["B0199980K4","B000HZD168"],'
            b'"resources":["itemInfo.title","images.primary.small","offersV2.listings.price"]}'
        )

    def test_method_url_and_headers(self) -> None:
        """POST to /catalog/v1/getItems with JSON, x-marketplace and our user agent only."""
        request = DIALECT.get_items_request(
            ["B0199980K4"], marketplace="www.amazon.de", partner_tag="xyz-21", resources=[]
        )
        assert request.method == "POST"
        assert request.url == "https://creatorsapi.amazon/catalog/v1/getItems"
        assert dict(request.headers) == {
            "content-type": "application/json",
            "accept": "application/json",
            "x-marketplace": "www.amazon.de",
            "user-agent": USER_AGENT,
        }

    def test_no_authorization_header(self) -> None:
        """Authorization is added at dispatch time, never by the dialect."""
        request = DIALECT.get_items_request(
            ["B0199980K4"], marketplace="US", partner_tag="t-20", resources=[]
        )
        assert not any(name.lower() == "authorization" for name in request.headers)

    def test_user_agent_names_the_broker(self) -> None:
        """The user agent is asin-broker/<version>."""
        assert USER_AGENT.startswith("asin-broker/")
        assert len(USER_AGENT) > len("asin-broker/")

    def test_empty_resources_are_left_out(self) -> None:
        """With no resources the field is omitted, so Amazon's default applies."""
        request = DIALECT.get_items_request(
            ["B0199980K4"], marketplace="www.amazon.com", partner_tag="t-20", resources=()
        )
        assert request.body == b'{"partnerTag":"t-20","itemIds":["B0199980K4"]}'

    def test_marketplace_alias_is_normalised(self) -> None:
        """A country code becomes the canonical x-marketplace value."""
        request = DIALECT.get_items_request(
            ["B0199980K4"], marketplace="uk", partner_tag="t-21", resources=[]
        )
        assert request.headers["x-marketplace"] == "www.amazon.co.uk"

    @pytest.mark.parametrize("endpoint", ["http://127.0.0.1:8123", "http://127.0.0.1:8123/"])
    def test_endpoint_override(self, endpoint: str) -> None:
        """A simulator endpoint replaces the host; the path stays."""
        request = CreatorsDialect(endpoint).get_items_request(
            ["B0199980K4"], marketplace="www.amazon.com", partner_tag="t-20", resources=[]
        )
        assert request.url == "http://127.0.0.1:8123/catalog/v1/getItems"

    @pytest.mark.parametrize("count", [0, 11])
    def test_batch_size_limits(self, count: int) -> None:
        """Zero or more than ten ASINs is a programming error (ValueError)."""
        with pytest.raises(ValueError, match="1 to 10"):
            DIALECT.get_items_request(
                [f"B00000000{i % 10}" for i in range(count)],
                marketplace="www.amazon.com",
                partner_tag="t-20",
                resources=[],
            )

    def test_ten_asins_are_accepted(self) -> None:
        """Exactly ten ASINs build one request."""
        asins = [f"B00000000{i}" for i in range(10)]
        request = DIALECT.get_items_request(
            asins, marketplace="www.amazon.com", partner_tag="t-20", resources=[]
        )
        assert json.loads(request.body)["itemIds"] == asins

    def test_blank_partner_tag_is_refused(self) -> None:
        """A blank partner tag raises ValueError before anything is sent."""
        with pytest.raises(ValueError, match="partner tag"):
            DIALECT.get_items_request(
                ["B0199980K4"], marketplace="www.amazon.com", partner_tag=" ", resources=[]
            )

    def test_unknown_marketplace_is_refused(self) -> None:
        """An unknown marketplace raises ValueError."""
        with pytest.raises(ValueError, match="unknown marketplace"):
            DIALECT.get_items_request(
                ["B0199980K4"], marketplace="www.amazon.cn", partner_tag="t", resources=[]
            )

    @pytest.mark.parametrize("endpoint", ["creatorsapi.amazon", "ftp://x", ""])
    def test_endpoint_must_be_http(self, endpoint: str) -> None:
        """An endpoint without an http(s) scheme raises ValueError."""
        with pytest.raises(ValueError, match="http"):
            CreatorsDialect(endpoint)


class TestOperationRequest:
    @pytest.mark.parametrize(
        ("operation", "path"),
        [
            (Operation.GET_ITEMS, "/catalog/v1/getItems"),
            (Operation.SEARCH_ITEMS, "/catalog/v1/searchItems"),
            (Operation.GET_VARIATIONS, "/catalog/v1/getVariations"),
            (Operation.GET_BROWSE_NODES, "/catalog/v1/getBrowseNodes"),
        ],
    )
    def test_paths(self, operation: Operation, path: str) -> None:
        """Each operation posts to its SDK path (protocol.md 2.3)."""
        request = DIALECT.operation_request(
            operation, {}, marketplace="www.amazon.com", partner_tag="t-20"
        )
        assert request.url == "https://creatorsapi.amazon" + path

    def test_search_body_puts_partner_tag_first(self) -> None:
        """partnerTag comes first, then the caller's camelCase params in order."""
        request = DIALECT.operation_request(
            Operation.SEARCH_ITEMS,
            {"keywords": "echo dot", "searchIndex": "All", "itemCount": 10},
            marketplace="www.amazon.com",
            partner_tag="xyz-20",
        )
        assert request.body == (
            b'{"partnerTag":"xyz-20","keywords":"echo dot","searchIndex":"All","itemCount":10}'
        )

    def test_params_cannot_override_partner_tag(self) -> None:
        """The key's partner tag wins over one passed in params."""
        request = DIALECT.operation_request(
            Operation.GET_VARIATIONS,
            {"partnerTag": "other-20", "asin": "B0199980K4"},
            marketplace="www.amazon.com",
            partner_tag="mine-20",
        )
        assert json.loads(request.body) == {"partnerTag": "mine-20", "asin": "B0199980K4"}

    def test_browse_nodes_body(self) -> None:
        """GetBrowseNodes carries browseNodeIds and resources as given."""
        request = DIALECT.operation_request(
            Operation.GET_BROWSE_NODES,
            {"browseNodeIds": ["3040", "0"], "resources": ["browseNodes.ancestor"]},
            marketplace="www.amazon.com",
            partner_tag="xyz-20",
        )
        assert request.body == (
            b'{"partnerTag":"xyz-20","browseNodeIds":["3040","0"],'
            b'"resources":["browseNodes.ancestor"]}'
        )

    @pytest.mark.parametrize("bad", [object(), float("nan"), {1, 2}, [None, float("-inf")]])
    def test_non_json_params_raise_value_error(self, bad: object) -> None:
        """Params that cannot be JSON (NaN and infinity, beside a null too) raise ValueError."""
        with pytest.raises(ValueError, match="not JSON"):
            DIALECT.operation_request(
                Operation.SEARCH_ITEMS, {"x": bad}, marketplace="US", partner_tag="t"
            )

    @pytest.mark.parametrize(
        ("params", "wanted"),
        [
            ({"keywords": "café"}, {"keywords": "café"}),
            ({"keywords": "null", "maxPrice": None}, {"keywords": "null", "maxPrice": None}),
            ({"keywords": "a\ud800b"}, {"keywords": "a\ud800b"}),
            ({"minPrice": 2.5, "itemCount": 3}, {"minPrice": 2.5, "itemCount": 3}),
        ],
    )
    def test_params_written_as_given(
        self, params: dict[str, object], wanted: dict[str, object]
    ) -> None:
        """Non-ASCII text, nulls, a lone surrogate and finite floats are sent as given."""
        request = DIALECT.operation_request(
            Operation.SEARCH_ITEMS, params, marketplace="US", partner_tag="t"
        )
        assert json.loads(request.body) == {"partnerTag": "t", **wanted}


class TestGetItemsSuccess:
    def test_documented_curl_response(self) -> None:
        """The protocol.md 2.6 curl response gives one OK item with title and detail URL."""
        parsed = parse(200, CURL_RESPONSE, ["B09B2SBHQK"])
        outcome = parsed.outcomes["B09B2SBHQK"]
        assert outcome.status is Status.OK
        assert outcome.error is None
        assert outcome.item is not None
        assert outcome.item["parentASIN"] == "B0BZTW3TCH"
        assert outcome.summary is not None
        assert outcome.summary.title == "Amazon Echo Show 5 …"
        assert outcome.summary.detail_url is not None
        assert outcome.summary.detail_url.startswith("https://www.amazon.com/dp/B09B2SBHQK")
        assert outcome.summary.price is None
        assert (parsed.missing, parsed.unexpected) == ((), ())

    def test_a_nan_or_infinity_in_an_item_is_read_as_null(self) -> None:
        """NaN, Infinity and 1e999 in Amazon's item (JSON orjson refuses, the stdlib reads)
        are null: they went into the outputs as bare NaN/Infinity, invalid JSON."""
        body = (
            b'{"itemsResult":{"items":[{"asin":"B000000001","itemInfo":{"title":'
            b'{"displayValue":"T"}},"score":NaN,"low":-Infinity,"amount":1e999,"ok":1.5}]}}'
        )
        parsed = parse(200, body, ["B000000001"])
        item = parsed.outcomes["B000000001"].item
        assert item is not None
        assert (item["score"], item["low"], item["amount"], item["ok"]) == (None, None, None, 1.5)
        json.dumps(item, allow_nan=False)

    def test_documented_partial_response(self) -> None:
        """The protocol.md 2.7 partial response: one OK item, one INVALID with a remedy."""
        parsed = parse(200, PARTIAL_RESPONSE, ["B0BL8WSCH3", "B08N5WRWNW"])
        ok = parsed.outcomes["B0BL8WSCH3"]
        bad = parsed.outcomes["B08N5WRWNW"]
        assert ok.status is Status.OK
        assert ok.summary is not None
        assert ok.summary.title == "Amazon Fire 7 Kids tablet (newest model) ages 3-7"
        assert bad.status is Status.INVALID
        assert bad.item is None
        assert bad.error is not None
        assert bad.error.code == "InvalidParameterValue"
        assert bad.error.message == "The ItemIds B08N5WRWNW provided in the request is invalid."
        assert bad.error.remedy == CATALOGUE["InvalidParameterValue"].remedy
        assert parsed.missing == ()

    @pytest.mark.parametrize(
        ("code", "message", "status"),
        [
            (
                "ItemNotAccessible",
                "The ItemId B01180YUXS is not accessible through the Creators API.",
                Status.NOT_FOUND,
            ),
            ("ItemNotFound", "The ItemId B01180YUXS does not exist.", Status.NOT_FOUND),
            ("InvalidItemId", "The ItemId B01180YUXS is invalid.", Status.INVALID),
            (
                "InvalidParameterValue",
                "The ItemIds B01180YUXS provided in the request is invalid.",
                Status.INVALID,
            ),
        ],
    )
    def test_per_item_codes(self, code: str, message: str, status: Status) -> None:
        """Each per-item code of protocol.md 2.7 maps to its status and keeps its message."""
        body = {"errors": [{"code": code, "message": message}], "itemsResult": {"items": []}}
        outcome = parse(200, body, ["B01180YUXS", "B0BL8WSCH3"]).outcomes["B01180YUXS"]
        assert outcome.status is status
        assert outcome.error is not None
        assert (outcome.error.code, outcome.error.message) == (code, message)
        assert outcome.error.remedy == CATALOGUE[code].remedy

    def test_unknown_item_code_is_not_found_with_code_kept(self) -> None:
        """An unknown per-item code naming an ASIN gives NOT_FOUND with that code."""
        body = {"errors": [{"code": "ItemRetired", "message": "Item B01180YUXS was retired."}]}
        outcome = parse(200, body, ["B01180YUXS", "B0BL8WSCH3"]).outcomes["B01180YUXS"]
        assert outcome.status is Status.NOT_FOUND
        assert outcome.error is not None
        assert outcome.error.code == "ItemRetired"
        assert outcome.error.remedy == describe("ItemRetired").remedy

    def test_item_results_spelling_is_accepted(self) -> None:
        """The docs' itemResults container is read like itemsResult."""
        body = {"itemResults": {"items": [{"asin": "B0BL8WSCH3"}]}}
        assert parse(200, body, ["B0BL8WSCH3"]).outcomes["B0BL8WSCH3"].status is Status.OK

    def test_missing_unexpected_and_duplicates(self) -> None:
        """Unanswered ASINs are missing; unrequested ones unexpected; duplicates kept once."""
        body = {
            "itemsResult": {
                "items": [
                    {"asin": "B000000002", "detailPageURL": "first"},
                    {"asin": "B000000002", "detailPageURL": "second"},
                    {"asin": "B0000000ZZ"},
                    {"asin": "B0000000ZZ"},
                ]
            }
        }
        parsed = parse(200, body, ["B000000001", "B000000002", "B000000003", "B000000001"])
        assert set(parsed.outcomes) == {"B000000002"}
        summary = parsed.outcomes["B000000002"].summary
        assert summary is not None
        assert summary.detail_url == "first"
        assert parsed.missing == ("B000000001", "B000000003")
        assert parsed.unexpected == ("B0000000ZZ",)

    def test_items_keyed_by_asin_not_order(self) -> None:
        """Items come back in any order and are matched by asin."""
        body = {"itemsResult": {"items": [{"asin": "B000000003"}, {"asin": "B000000001"}]}}
        parsed = parse(200, body, ["B000000001", "B000000003"])
        assert [parsed.outcomes[a].asin for a in ("B000000001", "B000000003")] == [
            "B000000001",
            "B000000003",
        ]

    def test_asin_case_is_tolerated(self) -> None:
        """A lower-case asin in the response matches the requested ASIN's spelling."""
        body = {"itemsResult": {"items": [{"asin": "b000000001"}]}}
        parsed = parse(200, body, ["B000000001"])
        assert parsed.outcomes["B000000001"].asin == "B000000001"

    def test_offer_summary(self) -> None:
        """Price, currency and availability come from offersV2.listings[0], whatever the
        listings after it say."""
        item = offer_item(
            "B000000001",
            price={"money": {"amount": 49.99, "currency": "USD", "displayAmount": "$49.99"}},
            availability={"type": "IN_STOCK", "message": "In Stock"},
        )
        item["offersV2"]["listings"].append(  # type: ignore[index]
            {
                "price": {"money": {"amount": 12.0, "currency": "EUR", "displayAmount": "12 €"}},
                "availability": {"type": "OUT_OF_STOCK", "message": "Out of Stock"},
            }
        )
        summary = (
            parse(200, {"itemsResult": {"items": [item]}}, ["B000000001"])
            .outcomes["B000000001"]
            .summary
        )
        assert summary is not None
        assert (summary.price, summary.currency, summary.availability) == (49.99, "USD", "IN_STOCK")

    def test_summary_takes_dataclasses_replace(self) -> None:
        """dataclasses.replace on a result's summary gives a summary with the change, as on
        any frozen ItemSummary (the lazily read one raised TypeError); copies still work."""
        item = offer_item(
            "B000000001",
            price={"money": {"amount": 49.99, "currency": "USD", "displayAmount": "$49.99"}},
        )
        parsed = parse(200, {"itemsResult": {"items": [item]}}, ["B000000001"])
        summary = parsed.outcomes["B000000001"].summary
        assert summary is not None
        cheaper = dataclasses.replace(summary, price=39.99)
        assert isinstance(cheaper, ItemSummary)
        assert (cheaper.price, cheaper.currency) == (39.99, "USD")
        assert dataclasses.replace(summary) == summary
        assert pickle.loads(pickle.dumps(summary)) == summary
        assert copy.deepcopy(summary) == summary

    def test_availability_falls_back_to_message(self) -> None:
        """Without availability.type the availability message is used."""
        item = offer_item("B000000001", availability={"message": "Usually ships in 2 days"})
        summary = (
            parse(200, {"itemsResult": {"items": [item]}}, ["B000000001"])
            .outcomes["B000000001"]
            .summary
        )
        assert summary is not None
        assert summary.availability == "Usually ships in 2 days"

    @pytest.mark.parametrize(
        "listing",
        [
            {"price": {"money": {"amount": True}}},
            {"price": {"money": {"amount": "12.5"}}},
            {"price": {"money": None}},
            {"price": []},
            {"availability": "IN_STOCK"},
        ],
    )
    def test_odd_offer_fields_give_none(self, listing: dict[str, object]) -> None:
        """Offer fields of the wrong type are left out of the summary, not fatal."""
        item = offer_item("B000000001", **listing)
        outcome = parse(200, {"itemsResult": {"items": [item]}}, ["B000000001"]).outcomes[
            "B000000001"
        ]
        assert outcome.status is Status.OK
        assert outcome.summary is not None
        assert (outcome.summary.price, outcome.summary.availability) == (None, None)

    def test_non_finite_price_is_dropped(self) -> None:
        """A NaN or infinite amount (JSON extensions) is not a price."""
        body = (
            b'{"itemsResult":{"items":[{"asin":"B000000001",'
            b'"offersV2":{"listings":[{"price":{"money":{"amount":NaN}}}]}}]}}'
        )
        summary = parse(200, body, ["B000000001"]).outcomes["B000000001"].summary
        assert summary is not None
        assert summary.price is None

    def test_enormous_integer_price_is_dropped(self) -> None:
        """An integer amount too large for a float is not a price, and not a crash."""
        body = (
            b'{"itemsResult":{"items":[{"asin":"B000000001","offersV2":{"listings":'
            b'[{"price":{"money":{"amount":' + b"9" * 4000 + b"}}}]}}]}}"
        )
        summary = parse(200, body, ["B000000001"]).outcomes["B000000001"].summary
        assert summary is not None
        assert summary.price is None

    def test_error_naming_no_asin_goes_to_the_only_open_one(self) -> None:
        """One per-item error without an ASIN and one unanswered ASIN: it is that ASIN's."""
        body = {
            "errors": [{"code": "ItemNotAccessible", "message": "This item is not accessible."}],
            "itemsResult": {"items": [{"asin": "B000000001"}]},
        }
        parsed = parse(200, body, ["B000000001", "B000000002"])
        assert parsed.outcomes["B000000002"].status is Status.NOT_FOUND
        assert parsed.missing == ()

    def test_an_error_naming_an_answered_asin_leaves_its_item(self) -> None:
        """An error naming an ASIN the same answer holds an item for (and one naming it
        twice) keeps the first outcome: the item stays ok, the first error stands."""
        message = "The ItemIds {} provided in the request is invalid."
        body = {
            "errors": [
                {"code": "InvalidParameterValue", "message": message.format("B000000001")},
                {"code": "ItemNotAccessible", "message": message.format("B000000002")},
                {"code": "InvalidParameterValue", "message": message.format("B000000002")},
            ],
            "itemsResult": {"items": [{"asin": "B000000001"}]},
        }
        parsed = parse(200, body, ["B000000001", "B000000002"])
        assert parsed.outcomes["B000000001"].status is Status.OK
        second = parsed.outcomes["B000000002"]
        assert second.error is not None
        assert second.error.code == "ItemNotAccessible"

    def test_unattributable_errors_leave_asins_missing(self) -> None:
        """Per-item errors naming no ASIN, with two open ASINs, leave both missing."""
        body = {
            "errors": [{"code": "ItemNotAccessible", "message": "Not accessible."}],
            "itemsResult": {"items": [{"asin": "B000000001"}]},
        }
        parsed = parse(200, body, ["B000000001", "B000000002", "B000000003"])
        assert parsed.missing == ("B000000002", "B000000003")

    def test_request_level_error_in_200_raises(self) -> None:
        """A 200 holding only a request-level error (no ASIN named) raises BadRequestError."""
        body = {"errors": [{"code": "InvalidPartnerTag", "message": "Partner tag is invalid."}]}
        with pytest.raises(BadRequestError) as info:
            DIALECT.parse_get_items(response(200, body), ["B000000001"])
        assert info.value.code == "InvalidPartnerTag"
        assert info.value.status == 200

    def test_empty_200_is_the_wrong_shape(self) -> None:
        """A 200 with neither items nor errors is a bad response (retried), not missing items."""
        with pytest.raises(ResponseError, match="no result and no error list"):
            parse(200, {}, ["B000000001", "B000000002"])


class TestGetItemsNotFound:
    def test_documented_404_marks_every_asin_not_found(self) -> None:
        """protocol.md 2.8's all-bad 404 gives NOT_FOUND outcomes, not an exception."""
        body = {
            "type": "ResourceNotFoundException",
            "message": "No items found for the requested item IDs.",
            "resourceType": "Item",
            "resourceId": "B08N5WRWNW",
        }
        parsed = parse(404, body, ["B08N5WRWNW", "B000000001"])
        assert set(parsed.outcomes) == {"B08N5WRWNW", "B000000001"}
        for outcome in parsed.outcomes.values():
            assert outcome.status is Status.NOT_FOUND
            assert outcome.error is not None
            assert outcome.error.code == "ResourceNotFoundException"
            assert outcome.error.message == "No items found for the requested item IDs."
            assert outcome.error.remedy == CATALOGUE["ResourceNotFoundException"].remedy
        assert parsed.missing == ()

    def test_namespaced_type_is_read(self) -> None:
        """The processing-of-errors page's __type spelling is read too."""
        body = {"__type": "com.amazon.creators#ResourceNotFoundException", "message": "none"}
        parsed = parse(404, body, ["B000000001"])
        assert parsed.outcomes["B000000001"].status is Status.NOT_FOUND

    def test_other_404_raises(self) -> None:
        """A 404 naming no code (a gateway's JSON "Not Found" for a path in api.endpoint)
        raises BadRequestError UnknownOperation, not NOT_FOUND, and is not retried, as a
        404 page that is not JSON: it was "Other", and every row failed with its remedy."""
        for status in (404, 405):
            error = failure(status, {"message": "Not Found"})
            assert type(error) is BadRequestError
            assert error.code == "UnknownOperation"
            assert RetryPolicy().next_delay(1, error) is None

    def test_a_404_naming_a_resource_but_no_type_is_nothing_found(self) -> None:
        """A 404 with no ``type`` that names its resource (the SDK's model of "no items
        found") is that answer, every ASIN not_found, not a wrong path that takes every
        key out; a search's is NoResults."""
        body = {
            "message": "No items found for the requested item IDs.",
            "resourceType": "Item",
            "resourceId": "B000000001",
        }
        parsed = parse(404, body, ["B000000001"])
        assert parsed.outcomes["B000000001"].status is Status.NOT_FOUND
        search = {"message": "No results", "resourceType": "SearchResult", "resourceId": "x"}
        with pytest.raises(ApiError) as info:
            DIALECT.parse_operation(response(404, search), SEARCH)
        assert info.value.code == "NoResults"

    @pytest.mark.parametrize(
        ("status", "code"),
        [(404, "UnknownOperation"), (405, "UnknownOperation"), (400, "Other"), (413, "Other")],
    )
    def test_a_4xx_page_that_is_no_answer_is_not_retried(self, status: int, code: str) -> None:
        """A non-JSON 404 or 405 (a path in api.endpoint, a proxy's page) is UnknownOperation
        (global: check api.endpoint), a non-JSON 400 or 413 a refused request: neither is
        retried, where each cost every batch its six attempts."""
        raw = response(status, b"<html>Not Found</html>")
        with pytest.raises(BadRequestError) as info:
            DIALECT.parse_get_items(raw, ["B000000001"])
        assert (info.value.code, info.value.status) == (code, status)
        assert "not JSON" in info.value.message
        assert RetryPolicy().next_delay(1, info.value) is None

    @pytest.mark.parametrize("status", [400, 404])
    def test_a_json_4xx_cut_short_is_still_retried(self, status: int) -> None:
        """A JSON answer cut short (Amazon's 404 "no items found", a 400) is an unreadable
        answer, retried (B6), not a page: a truncated 404 took every key out."""
        body = b'{"type":"ResourceNotFoundException","message":"No items fo'
        with pytest.raises(ResponseError) as info:
            DIALECT.parse_get_items(response(status, b"  " + body), ["B000000001"])
        assert RetryPolicy().next_delay(1, info.value) is not None

    @pytest.mark.parametrize("status", [401, 403, 408])
    def test_a_page_for_401_403_or_408_is_still_retried(self, status: int) -> None:
        """A gateway's non-JSON 401, 403 or 408 stays an unreadable answer, retried."""
        with pytest.raises(ResponseError) as info:
            DIALECT.parse_get_items(response(status, b"<html>x</html>"), ["B000000001"])
        assert RetryPolicy().next_delay(1, info.value) is not None


# protocol.md 2.8 error table: (status, type, reason, message, class).
ERROR_TABLE = [
    (400, "ValidationException", "UnknownOperation",
     "The operation requested is invalid. Please verify that the operation name is typed "
     "correctly.", BadRequestError),
    (400, "ValidationException", "CannotParse",
     "Unable to parse the request payload. Please verify that the request body is valid JSON.",
     BadRequestError),
    (400, "ValidationException", "FieldValidationFailed", "Request validation failed.",
     BadRequestError),
    (400, "ValidationException", "InvalidAssociate",
     "Your credential is not linked to the partner tag in the request for the given "
     "Marketplace.", BadRequestError),
    (400, "ValidationException", "InvalidPartnerTag",
     "Partner tag in the request is invalid or is not mapped to the store associated with "
     "your credential.", BadRequestError),
    (400, "ValidationException", "Other", "Request validation failed.", BadRequestError),
    (401, "UnauthorizedException", "TokenExpired", "Authentication token has expired.",
     AuthError),
    (401, "UnauthorizedException", "InvalidToken",
     "The authentication token is invalid or malformed.", AuthError),
    (401, "UnauthorizedException", "InvalidIssuer",
     "Ensure the credential version in your request header matches the region where the token "
     "was generated", AuthError),
    (401, "UnauthorizedException", "MissingClaim", "Missing claim.", AuthError),
    (401, "UnauthorizedException", "MissingKeyId", "Missing key id.", AuthError),
    (401, "UnauthorizedException", "UnsupportedClient", "Unsupported client.", AuthError),
    (401, "UnauthorizedException", "InvalidClient", "Invalid client.", AuthError),
    (401, "UnauthorizedException", "MissingCredential", "Missing authentication credentials.",
     AuthError),
    (401, "UnauthorizedException", "Other", "Unauthorized.", AuthError),
    (403, "AccessDeniedException", "AssociateNotEligible",
     "Your account does not currently meet the eligibility requirements.", AuthError),
    (403, "AccessDeniedException", "AuthorizationFailed", "Authorization failed.", AuthError),
    (403, "AccessDeniedException", "Other", "Access denied.", AuthError),
    (429, "ThrottleException", None,
     "The request was denied due to request throttling. Please verify the number of requests "
     "made per second.", ThrottledError),
    (500, "InternalServerException", None,
     "An unexpected error occurred while processing your request.", ServerError),
]  # fmt: skip


class TestErrorResponses:
    @pytest.mark.parametrize(("status", "kind", "reason", "message", "cls"), ERROR_TABLE)
    def test_error_table(
        self, status: int, kind: str, reason: str | None, message: str, cls: type[ApiError]
    ) -> None:
        """Every row of protocol.md 2.8 raises its class with code = reason, else type."""
        body: dict[str, object] = {"type": kind, "message": message}
        if reason is not None:
            body["reason"] = reason
        for parse_call in (
            lambda r: DIALECT.parse_get_items(r, ["B000000001"]),
            lambda r: DIALECT.parse_operation(r, SEARCH),
        ):
            with pytest.raises(cls) as info:
                parse_call(response(status, body, date=DATE))
            error = info.value
            assert type(error) is cls
            assert error.code == (reason or kind)
            assert error.code in CATALOGUE
            assert error.message == message
            assert error.status == status
            assert error.server_date == DATE

    def test_real_captured_403(self) -> None:
        """The captured 403 body (sergioteula #144) is an AuthError AssociateNotEligible."""
        body = (
            b'{"message":"Your account does not currently meet the eligibility requirements.",'
            b'"reason":"AssociateNotEligible","type":"AccessDeniedException"}'
        )
        error = failure(403, body)
        assert isinstance(error, AuthError)
        assert error.code == "AssociateNotEligible"
        assert error.info.remedy == CATALOGUE["AssociateNotEligible"].remedy

    def test_namespaced_type_is_stripped(self) -> None:
        """A com.amazon...# prefix on the type is stripped."""
        error = failure(500, {"__type": "com.amazon.creators#InternalServerException"})
        assert error.code == "InternalServerException"

    @pytest.mark.parametrize(
        "field_list",
        [["partnerTag"], [{"name": "partnerTag", "message": "must not be blank"}]],
    )
    def test_field_list_is_named_in_the_message(self, field_list: list[object]) -> None:
        """fieldList (strings or objects, protocol.md 2.8) names the fields in the message."""
        body = {
            "type": "ValidationException",
            "reason": "FieldValidationFailed",
            "message": "Request validation failed.",
            "fieldList": field_list,
        }
        error = failure(400, body)
        assert error.message == "Request validation failed. (fields: partnerTag)"

    def test_throttle_retry_after_seconds_from_body(self) -> None:
        """retryAfterSeconds in a 429 body becomes retry_after."""
        error = failure(429, {"type": "ThrottleException", "message": "m", "retryAfterSeconds": 3})
        assert isinstance(error, ThrottledError)
        assert error.retry_after == 3.0

    def test_body_retry_after_wins_over_header(self) -> None:
        """The body's retryAfterSeconds wins over a Retry-After header."""
        error = failure(429, {"type": "ThrottleException", "retryAfterSeconds": 2}, retry_after="9")
        assert error.retry_after == 2.0

    def test_retry_after_header_seconds(self) -> None:
        """A Retry-After header in seconds becomes retry_after."""
        error = failure(429, {"type": "ThrottleException"}, retry_after="7")
        assert error.retry_after == 7.0

    def test_retry_after_header_http_date(self) -> None:
        """An HTTP-date Retry-After is measured against the response's Date header."""
        error = failure(
            429,
            {"type": "ThrottleException"},
            retry_after="Fri, 01 May 2026 12:00:05 GMT",
            date=DATE,
        )
        assert error.retry_after == 5.0

    def test_retry_after_http_date_in_the_past_is_zero(self) -> None:
        """A Retry-After date already past means no wait, never a negative one."""
        error = failure(
            429,
            {"type": "ThrottleException"},
            retry_after="Fri, 01 May 2026 11:00:00 GMT",
            date=DATE,
        )
        assert error.retry_after == 0.0

    def test_retry_after_http_date_without_date_uses_clock(self) -> None:
        """Without a Date header an HTTP-date is measured against the injected clock."""
        assert _retry_after_at(12, "Fri, 01 May 2026 12:00:30 GMT") == 30.0

    def test_retry_after_http_date_in_zone_minus_0000_is_utc(self) -> None:
        """An HTTP-date written with zone "-0000" (parsed without a zone) is taken as UTC:
        10 s ahead of a 12:00:00 UTC clock is a 10 s wait, not an error."""
        assert _retry_after_at(12, "Fri, 01 May 2026 12:00:10 -0000") == 10.0

    def test_retry_after_http_date_ignores_a_wrong_local_clock(self) -> None:
        """With the response's Date, an HTTP-date is measured against it, not our clock: a
        local clock an hour off still waits the 30 s the server asked."""
        assert _retry_after_at(13, "Fri, 01 May 2026 12:00:30 GMT", date=DATE) == 30.0

    @pytest.mark.parametrize("value", ["soon", "Fri, 01 May 2026 12:00:30 GMT"])
    def test_unusable_retry_after_is_none(self, value: str) -> None:
        """An unreadable Retry-After, or a date with nothing to measure it from, is ignored."""
        error = failure(429, {"type": "ThrottleException"}, retry_after=value)
        assert error.retry_after is None

    def test_retry_after_header_case_is_tolerated(self) -> None:
        """A transport that kept header case still gets Retry-After and Date read."""
        raw = RawResponse(429, {"Retry-After": "4", "Date": DATE}, b"{}")
        with pytest.raises(ThrottledError) as info:
            DIALECT.parse_operation(raw, SEARCH)
        assert (info.value.retry_after, info.value.server_date) == (4.0, DATE)

    def test_unreadable_429_is_still_throttled(self) -> None:
        """A 429 whose body is not JSON is a ThrottledError: the status decides."""
        error = failure(429, b"<html>Too Many Requests</html>", retry_after="1")
        assert isinstance(error, ThrottledError)
        assert (error.code, error.retry_after) == ("ThrottleException", 1.0)

    @pytest.mark.parametrize(
        ("status", "code", "cls"),
        [
            (400, "ValidationException", BadRequestError),
            (401, "UnauthorizedException", AuthError),
            (403, "AccessDeniedException", AuthError),
            (409, "Other", BadRequestError),
            (500, "InternalServerException", ServerError),
            (503, "ServerError", ServerError),
        ],
    )
    def test_typeless_bodies_fall_back_by_status(
        self, status: int, code: str, cls: type[ApiError]
    ) -> None:
        """A JSON error body with neither reason nor type gets a code from its status."""
        error = failure(status, {"message": "Service Unavailable"})
        assert type(error) is cls
        assert error.code == code

    def test_html_502_is_a_response_error(self) -> None:
        """An HTML 502 from a proxy raises ResponseError carrying the status."""
        with pytest.raises(ResponseError) as info:
            DIALECT.parse_get_items(response(502, b"<html>Bad Gateway</html>"), ["B000000001"])
        assert info.value.status == 502

    @pytest.mark.parametrize("status", [204, 302, 100])
    def test_unexpected_status_is_a_response_error(self, status: int) -> None:
        """A status that is neither 200 nor an error raises ResponseError."""
        with pytest.raises(ResponseError, match=str(status)):
            DIALECT.parse_get_items(response(status, {}), ["B000000001"])

    def test_long_messages_are_capped(self) -> None:
        """An enormous message is cut so it cannot flood logs and output rows."""
        error = failure(500, {"type": "InternalServerException", "message": "x" * 10_000})
        assert len(error.message) <= 500


class TestParseOperation:
    def test_returns_the_json(self) -> None:
        """A 200 returns the parsed JSON object as is."""
        body = {"searchResult": {"items": [{"asin": "B000000001"}], "totalResultCount": 1}}
        assert DIALECT.parse_operation(response(200, body), SEARCH) == body

    @pytest.mark.parametrize(
        ("operation", "body", "problem"),
        [
            (SEARCH, {"itemsResult": {"items": []}}, "no searchResult object"),
            (SEARCH, {"searchResult": {"items": {"asin": "B0"}}}, "searchResult.items is not"),
            (SEARCH, {"searchResult": {"totalResultCount": 3}}, "searchResult.items is not"),
            (
                Operation.GET_VARIATIONS,
                {"variationsResult": {"items": [{"title": "x"}]}},
                "has no asin",
            ),
            (Operation.GET_BROWSE_NODES, {"browseNodesResult": []}, "no browseNodesResult"),
            (
                Operation.GET_BROWSE_NODES,
                {"browseNodesResult": {"browseNodes": ["3040"]}},
                "has no id",
            ),
        ],
    )
    def test_wrong_shape_raises_response_error(
        self, operation: Operation, body: dict[str, object], problem: str
    ) -> None:
        """A 200 without the operation's result, or with entries lacking their id, is refused."""
        with pytest.raises(ResponseError, match="wrong shape") as info:
            DIALECT.parse_operation(response(200, body), operation)
        assert problem in str(info.value)
        assert info.value.status == 200

    def test_browse_nodes_partial_is_returned(self) -> None:
        """protocol.md 2.7's GetBrowseNodes result with errors beside it is returned whole."""
        body = {
            "browseNodesResult": {"browseNodes": [{"id": "3040"}]},
            "errors": [
                {
                    "code": "InvalidParameterValue",
                    "message": "The BrowseNodeId 0 provided in the request is invalid.",
                }
            ],
        }
        assert DIALECT.parse_operation(response(200, body), Operation.GET_BROWSE_NODES) == body

    def test_errors_only_200_raises(self) -> None:
        """A 200 holding only errors raises the first as BadRequestError."""
        body = {"errors": [{"code": "NoResults", "message": "No results found."}]}
        with pytest.raises(BadRequestError) as info:
            DIALECT.parse_operation(response(200, body), SEARCH)
        assert info.value.code == "NoResults"

    def test_search_without_hits_404(self) -> None:
        """The documented SearchItems 404 raises BadRequestError NoResults, as on PA-API."""
        body = {
            "type": "ResourceNotFoundException",
            "message": "No results found for your search request",
            "resourceType": "SearchResult",
            "resourceId": "echo",
        }
        with pytest.raises(BadRequestError) as info:
            DIALECT.parse_operation(response(404, body), SEARCH)
        assert info.value.code == "NoResults"
        assert info.value.message == "No results found for your search request (SearchResult echo)"

    @pytest.mark.parametrize(
        ("resource_type", "code"),
        [
            ("Variation", "NoResults"),
            ("BrowseNode", "NoResults"),
            ("Item", "ResourceNotFoundException"),
        ],
    )
    def test_not_found_404_of_other_operations(self, resource_type: str, code: str) -> None:
        """A 404 for variations or browse nodes that are not there is NoResults as on PA-API
        (callers test one code on both APIs); another resource keeps its own code."""
        body = {
            "type": "ResourceNotFoundException",
            "message": "nothing",
            "resourceType": resource_type,
            "resourceId": "B000000002",
        }
        with pytest.raises(BadRequestError) as info:
            DIALECT.parse_operation(response(404, body), Operation.GET_VARIATIONS)
        assert info.value.code == code

    def test_an_error_names_its_resource_and_amazons_request_id(self) -> None:
        """A whole-call error names the resource a 404 was about and Amazon's request id,
        as python-amazon-paapi's errors do (Amazon's support asks for the id); both were
        dropped."""
        body = {
            "type": "ResourceNotFoundException",
            "message": "No variations found for the requested ASIN.",
            "resourceType": "Variation",
            "resourceId": "0262033844",
        }
        answer = response(404, body, x_amzn_RequestId="af0163bc-1d2e")
        with pytest.raises(BadRequestError) as info:
            DIALECT.parse_operation(answer, Operation.GET_VARIATIONS)
        assert info.value.request_id == "af0163bc-1d2e"
        assert info.value.message == (
            "No variations found for the requested ASIN. (Variation 0262033844)"
        )
        assert str(info.value).endswith("(Variation 0262033844) [request id: af0163bc-1d2e]")
        with pytest.raises(BadRequestError) as info:
            DIALECT.parse_operation(response(400, {"reason": "CannotParse"}), SEARCH)
        assert info.value.request_id is None
        assert "request id" not in str(info.value)

    @pytest.mark.parametrize("body", [b"[]", b'"x"', b"{", b"\xff\xfe\x00", b""])
    def test_unreadable_200_raises_response_error(self, body: bytes) -> None:
        """A 200 that is not one JSON object raises ResponseError."""
        with pytest.raises(ResponseError):
            DIALECT.parse_operation(response(200, body), SEARCH)


class TestWrongShapes:
    @pytest.mark.parametrize(
        "body",
        [
            b'{"itemsResult":{"items":[{"asin":"B0',  # truncated
            b"<html><body>502 Bad Gateway</body></html>",
            b"\xff\xfe\xfa",  # not UTF-8
            b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON scanner goes
            b"[]",
            b"null",
            b'{"itemsResult":[]}',
            b'{"itemsResult":{"items":{}}}',
            b'{"itemsResult":{"items":[null]}}',
            b'{"itemsResult":{"items":[{"title":"no asin"}]}}',
            b'{"itemsResult":{"items":[{"asin":42}]}}',
            b'{"errors":{}}',
            b'{"errors":["InvalidParameterValue"]}',
            b'{"errors":[{"message":"no code"}]}',
        ],
    )
    def test_unreadable_bodies_raise_response_error(self, body: bytes) -> None:
        """Truncated, non-JSON, non-UTF-8, too deep or wrongly shaped bodies: ResponseError."""
        with pytest.raises(ResponseError) as info:
            DIALECT.parse_get_items(RawResponse(200, {}, body), ["B000000001"])
        assert info.value.status == 200

    def test_response_error_message_does_not_quote_the_body(self) -> None:
        """The error says what is wrong without echoing the body."""
        with pytest.raises(ResponseError) as info:
            DIALECT.parse_get_items(RawResponse(200, {}, b"SECRET-BODY"), ["B000000001"])
        assert "SECRET-BODY" not in str(info.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
ASINS = ["B000000001", "B000000002", "B000000003"]


def check_parsed(parsed: ParsedItems, requested: list[str]) -> None:
    """A parse result only ever speaks of requested ASINs, each once."""
    assert set(parsed.outcomes) <= set(requested)
    assert set(parsed.missing).isdisjoint(parsed.outcomes)
    assert set(parsed.outcomes) | set(parsed.missing) == set(requested)


class TestFuzz:
    @settings(max_examples=300, deadline=None)
    @given(status=st.integers(100, 599), body=st.binary(max_size=200))
    def test_arbitrary_bytes(self, status: int, body: bytes) -> None:
        """Any status and bytes give a result or an ApiError/ResponseError, nothing else."""
        raw = RawResponse(status, {}, body)
        with contextlib.suppress(ApiError, ResponseError):
            check_parsed(DIALECT.parse_get_items(raw, ASINS), ASINS)
        with contextlib.suppress(ApiError, ResponseError):
            DIALECT.parse_operation(raw, SEARCH)

    @settings(max_examples=300, deadline=None)
    @given(status=st.sampled_from([200, 400, 401, 403, 404, 429, 500, 503]), value=json_values)
    def test_arbitrary_json(self, status: int, value: object) -> None:
        """Any JSON document gives a result or an ApiError/ResponseError."""
        raw = RawResponse(status, {"retry-after": "x"}, json.dumps(value).encode())
        with contextlib.suppress(ApiError, ResponseError):
            check_parsed(DIALECT.parse_get_items(raw, ASINS), ASINS)

    @settings(max_examples=300, deadline=None)
    @given(
        items=st.lists(
            st.fixed_dictionaries(
                {"asin": st.sampled_from([*ASINS, "B0000000ZZ"])},
                optional={
                    "itemInfo": json_values,
                    "offersV2": json_values,
                    "detailPageURL": json_values,
                },
            ),
            max_size=5,
        ),
        errors=st.lists(
            st.fixed_dictionaries(
                {"code": st.text(max_size=20)},
                optional={"message": st.sampled_from(["", "The ItemId B000000002 is bad."])},
            ),
            max_size=3,
        ),
    )
    def test_well_shaped_200s(
        self, items: list[dict[str, object]], errors: list[dict[str, object]]
    ) -> None:
        """Well-shaped 200s with junk inside always parse, each requested ASIN once."""
        raw = response(200, {"itemsResult": {"items": items}, "errors": errors})
        try:
            parsed = DIALECT.parse_get_items(raw, ASINS)
        except BadRequestError:
            return
        check_parsed(parsed, ASINS)
        for outcome in parsed.outcomes.values():
            assert outcome.summary is not None or outcome.error is not None
