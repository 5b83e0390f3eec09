"""Tests for broker.api.paapi5: PA-API 5.0 requests and responses, per protocol.md 3."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.api.base import Dialect, Operation, ParsedItems, RawResponse
from broker.api.paapi5 import (
    DROPPED_RESOURCES,
    RESOURCE_NAMES,
    InvalidItemIdsError,
    PaapiDialect,
    ParameterValueError,
    offending_ids,
    translate_resources,
)
from broker.errors import (
    CATALOGUE,
    ApiError,
    AuthError,
    BadRequestError,
    ResponseError,
    Scope,
    ServerError,
    ThrottledError,
)
from broker.models import Status

DIALECT = PaapiDialect()
SEARCH = Operation.SEARCH_ITEMS
DATE = "Fri, 01 May 2026 12:20:00 GMT"


def response(status: int, body: object, **headers: str) -> RawResponse:
    """A RawResponse with ``body`` JSON-encoded unless it is already bytes."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return RawResponse(status, {k.replace("_", "-"): v for k, v in headers.items()}, raw)


def parse(status: int, body: object, requested: list[str]) -> ParsedItems:
    return DIALECT.parse_get_items(response(status, body), requested)


def failure(
    status: int, body: object, requested: list[str] | None = None, **headers: str
) -> ApiError:
    with pytest.raises(ApiError) as info:
        DIALECT.parse_get_items(response(status, body, **headers), requested or ["B000000001"])
    return info.value


def envelope(exception: str, code: str, message: str) -> dict[str, object]:
    """The PA-API error envelope of protocol.md 3.4."""
    return {
        "__type": f"com.amazon.paapi5#{exception}",
        "Errors": [{"Code": code, "Message": message}],
    }


# protocol.md 3.4, the real partial capture (sergioteula #82).
PARTIAL_CAPTURE = (
    b'{"Errors":[{"__type":"com.amazon.paapi5#ErrorData","Code":"InvalidParameterValue",'
    b'"Message":"The ItemId B07VMG4ZL5 provided in the request is invalid."}],'
    b'"ItemsResult":{"Items":[{"ASIN":"B084Q4T9NM","DetailPageURL":'
    b'"https://www.amazon.it/dp/B084Q4T9NM?tag=x-21&linkCode=ogi&th=1&psc=1",'
    b'"ItemInfo":{"Title":{"DisplayValue":"Sony KD-49XH9505 \xe2\x80\xa6","Label":"Title",'
    b'"Locale":"it_IT"}}}]}}'
)

# protocol.md 3.4, the malformed-id capture (internetarchive/openlibrary PR #3142).
MALFORMED_CAPTURE = (
    b'{"__type":"com.amazon.paapi5#ValidationException","Errors":[{"Code":'
    b'"InvalidParameterValue","Message":"The value [9791186701072] provided in the request '
    b'for ItemIds is invalid."}]}'
)

RETIRED_MESSAGE = (
    "Product Advertising API is deprecated. Please migrate to Creators API using the migration "
    "guide at https://affiliate-program.amazon.com/creatorsapi/docs/en-us/"
    "migrating-to-creatorsapi-from-paapi."
)


class TestGetItemsRequest:
    def test_satisfies_the_dialect_protocol(self) -> None:
        """PaapiDialect is a Dialect (mypy checks this assignment)."""
        dialect: Dialect = DIALECT
        assert callable(dialect.parse_get_items)

    def test_body_matches_sdk_example_byte_for_byte(self) -> None:
        """The body is protocol.md 3.3's example, byte for byte, from camelCase resources."""
        request = DIALECT.get_items_request(
            ["B0199980K4", "B000HZD168"],
            marketplace="www.amazon.com",
            partner_tag="xyz-20",
            resources=["itemInfo.title", "images.primary.small", "offersV2.listings.price"],
        )
        assert request.body == (
            b'{"ItemIds":["B0199980K4","B000HZD168"],"ItemIdType":"ASIN",'
            b'"Marketplace":"www.amazon.com","PartnerTag":"xyz-20","PartnerType":"Associates",'
            b'"Resources":["ItemInfo.Title","Images.Primary.Small","OffersV2.Listings.Price"]}'
        )

    def test_url_and_headers(self) -> None:
        """POST https://<host>/paapi5/getitems with protocol.md 3.2's headers, unsigned."""
        request = DIALECT.get_items_request(
            ["B0199980K4"], marketplace="www.amazon.com", partner_tag="xyz-20", resources=[]
        )
        assert request.method == "POST"
        assert request.url == "https://webservices.amazon.com/paapi5/getitems"
        assert dict(request.headers) == {
            "host": "webservices.amazon.com",
            "content-type": "application/json; charset=utf-8",
            "content-encoding": "amz-1.0",
            "x-amz-target": "com.amazon.paapi5.v1.ProductAdvertisingAPIv1.GetItems",
        }

    def test_no_signature_headers(self) -> None:
        """x-amz-date and Authorization are the signer's, added at dispatch time."""
        request = DIALECT.get_items_request(
            ["B0199980K4"], marketplace="DE", partner_tag="x-21", resources=[]
        )
        names = {name.lower() for name in request.headers}
        assert not names & {"x-amz-date", "authorization"}

    def test_marketplace_picks_host(self) -> None:
        """Each marketplace's request goes to its own PA-API host."""
        request = DIALECT.get_items_request(
            ["B0199980K4"], marketplace="www.amazon.co.jp", partner_tag="x-22", resources=[]
        )
        assert request.url == "https://webservices.amazon.co.jp/paapi5/getitems"
        assert request.headers["host"] == "webservices.amazon.co.jp"
        assert json.loads(request.body)["Marketplace"] == "www.amazon.co.jp"

    @pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9000", "http://127.0.0.1:9000/"])
    def test_simulator_endpoint_keeps_marketplace_host(self, endpoint: str) -> None:
        """With a simulator base URL the URL changes but the signed host header does not."""
        request = PaapiDialect(endpoint).get_items_request(
            ["B0199980K4"], marketplace="www.amazon.de", partner_tag="x-21", resources=[]
        )
        assert request.url == "http://127.0.0.1:9000/paapi5/getitems"
        assert request.headers["host"] == "webservices.amazon.de"

    def test_empty_resources_are_left_out(self) -> None:
        """With no resources (or only dropped ones) the Resources field is omitted."""
        request = DIALECT.get_items_request(
            ["B0199980K4"],
            marketplace="www.amazon.com",
            partner_tag="t-20",
            resources=["images.primary.highRes"],
        )
        assert "Resources" not in json.loads(request.body)

    @pytest.mark.parametrize("count", [0, 11])
    def test_batch_size_limits(self, count: int) -> None:
        """Zero or more than ten ASINs is a programming error (ValueError)."""
        with pytest.raises(ValueError, match="1 to 10"):
            DIALECT.get_items_request(
                ["B0199980K4"] * count, marketplace="US", partner_tag="t-20", resources=[]
            )

    def test_blank_partner_tag_and_unknown_marketplace(self) -> None:
        """A blank tag or an unknown marketplace raises ValueError."""
        with pytest.raises(ValueError, match="partner tag"):
            DIALECT.get_items_request(
                ["B0199980K4"], marketplace="US", partner_tag="", resources=[]
            )
        with pytest.raises(ValueError, match="unknown marketplace"):
            DIALECT.get_items_request(
                ["B0199980K4"], marketplace="xx", partner_tag="t", resources=[]
            )

    def test_endpoint_must_be_http(self) -> None:
        """An endpoint without an http(s) scheme raises ValueError."""
        with pytest.raises(ValueError, match="http"):
            PaapiDialect("127.0.0.1:9000")

    @pytest.mark.parametrize(
        ("marketplace", "region"),
        [("www.amazon.com", "us-east-1"), ("www.amazon.fr", "eu-west-1"), ("SG", "us-west-2")],
    )
    def test_signing_region_and_host(self, marketplace: str, region: str) -> None:
        """The dialect names the SigV4 region and host the signer needs."""
        assert DIALECT.signing_region(marketplace) == region
        assert DIALECT.host(marketplace).startswith("webservices.amazon.")


class TestOperationRequest:
    @pytest.mark.parametrize(
        ("operation", "path"),
        [
            (Operation.GET_ITEMS, "/paapi5/getitems"),
            (Operation.SEARCH_ITEMS, "/paapi5/searchitems"),
            (Operation.GET_VARIATIONS, "/paapi5/getvariations"),
            (Operation.GET_BROWSE_NODES, "/paapi5/getbrowsenodes"),
        ],
    )
    def test_paths_and_targets(self, operation: Operation, path: str) -> None:
        """Each operation has SDK-P's path and x-amz-target (protocol.md 3.2)."""
        request = DIALECT.operation_request(
            operation, {}, marketplace="www.amazon.com", partner_tag="t-20"
        )
        assert request.url == "https://webservices.amazon.com" + path
        assert request.headers["x-amz-target"] == (
            "com.amazon.paapi5.v1.ProductAdvertisingAPIv1." + operation.value
        )

    def test_search_params_become_pascal_case(self) -> None:
        """camelCase params and resources are spelled PA-API's way; tag and type added."""
        request = DIALECT.operation_request(
            Operation.SEARCH_ITEMS,
            {
                "keywords": "kindle",
                "searchIndex": "All",
                "itemCount": 5,
                "resources": ["itemInfo.title", "searchRefinements"],
            },
            marketplace="www.amazon.com",
            partner_tag="xyz-20",
        )
        assert request.body == (
            b'{"Keywords":"kindle","SearchIndex":"All","ItemCount":5,'
            b'"Resources":["ItemInfo.Title","SearchRefinements"],"Marketplace":"www.amazon.com",'
            b'"PartnerTag":"xyz-20","PartnerType":"Associates"}'
        )

    def test_variations_asin_is_upper_case(self) -> None:
        """The asin parameter is ASIN in PA-API, not Asin."""
        request = DIALECT.operation_request(
            Operation.GET_VARIATIONS,
            {"asin": "B0199980K4", "variationCount": 3},
            marketplace="www.amazon.com",
            partner_tag="xyz-20",
        )
        body = json.loads(request.body)
        assert body["ASIN"] == "B0199980K4"
        assert body["VariationCount"] == 3

    def test_fixed_fields_cannot_be_overridden(self) -> None:
        """PartnerTag, PartnerType and Marketplace come from the key and marketplace."""
        request = DIALECT.operation_request(
            Operation.GET_ITEMS,
            {"itemIds": ["B0199980K4"], "partnerTag": "other", "Marketplace": "www.amazon.de"},
            marketplace="www.amazon.com",
            partner_tag="mine-20",
        )
        assert json.loads(request.body) == {
            "ItemIds": ["B0199980K4"],
            "ItemIdType": "ASIN",
            "Marketplace": "www.amazon.com",
            "PartnerTag": "mine-20",
            "PartnerType": "Associates",
        }


class TestResourceTranslation:
    @pytest.mark.parametrize(
        ("creators", "paapi"),
        [
            ("itemInfo.title", "ItemInfo.Title"),
            ("offersV2.listings.price", "OffersV2.Listings.Price"),
            ("images.primary.small", "Images.Primary.Small"),
            ("images.variants.large", "Images.Variants.Large"),
            ("itemInfo.byLineInfo", "ItemInfo.ByLineInfo"),
            ("itemInfo.externalIds", "ItemInfo.ExternalIds"),
            ("offersV2.listings.isBuyBoxWinner", "OffersV2.Listings.IsBuyBoxWinner"),
            ("browseNodeInfo.websiteSalesRank", "BrowseNodeInfo.WebsiteSalesRank"),
            ("customerReviews.starRating", "CustomerReviews.StarRating"),
            ("parentASIN", "ParentASIN"),
            ("browseNodes.ancestor", "BrowseNodes.Ancestor"),
        ],
    )
    def test_known_names(self, creators: str, paapi: str) -> None:
        """Creators camelCase names map to their PA-API PascalCase names."""
        assert RESOURCE_NAMES[creators] == paapi
        assert translate_resources([creators]).resources == (paapi,)

    @pytest.mark.parametrize("name", ["images.primary.highRes", "images.variants.highRes"])
    def test_high_res_is_dropped_with_a_reason(self, name: str) -> None:
        """highRes has no PA-API equivalent: dropped, and the reason is documented."""
        translation = translate_resources(["itemInfo.title", name])
        assert translation.resources == ("ItemInfo.Title",)
        assert translation.dropped == (name,)
        assert "HighRes" in DROPPED_RESOURCES[name]

    def test_pascal_case_passes_through(self) -> None:
        """PA-API names (even retired Offers V1 ones) pass unchanged."""
        names = ["ItemInfo.Title", "Offers.Listings.Price", "Images.Primary.HighRes"]
        assert translate_resources(names).resources == tuple(names)

    def test_duplicates_are_removed_in_order(self) -> None:
        """A resource named both ways appears once, in first-seen order."""
        names = ["images.primary.small", "itemInfo.title", "ItemInfo.Title"]
        assert translate_resources(names).resources == ("Images.Primary.Small", "ItemInfo.Title")

    def test_unknown_camel_case_follows_the_rule(self) -> None:
        """A camelCase name not in the table gets a capital first letter per segment."""
        assert translate_resources(["itemInfo.newThing"]).resources == ("ItemInfo.NewThing",)

    def test_every_table_value_is_pascal_case(self) -> None:
        """Every translated name starts each segment with a capital letter."""
        for name in RESOURCE_NAMES.values():
            assert all(part[:1].isupper() for part in name.split("."))
        assert not any("highRes" in name for name in RESOURCE_NAMES)


class TestGetItemsSuccess:
    def test_real_partial_capture(self) -> None:
        """The captured partial 200 (protocol.md 3.4): one OK item and one INVALID id."""
        parsed = parse(200, PARTIAL_CAPTURE, ["B084Q4T9NM", "B07VMG4ZL5"])
        ok = parsed.outcomes["B084Q4T9NM"]
        bad = parsed.outcomes["B07VMG4ZL5"]
        assert ok.status is Status.OK
        assert ok.summary is not None
        assert ok.summary.title == "Sony KD-49XH9505 …"
        assert ok.summary.detail_url is not None
        assert ok.summary.detail_url.startswith("https://www.amazon.it/dp/B084Q4T9NM")
        assert bad.status is Status.INVALID
        assert bad.error is not None
        assert bad.error.code == "InvalidParameterValue"
        assert bad.error.message == "The ItemId B07VMG4ZL5 provided in the request is invalid."
        assert bad.error.remedy == CATALOGUE["InvalidParameterValue"].remedy

    def test_item_not_accessible(self) -> None:
        """ItemNotAccessible (protocol.md 3.4) is NOT_FOUND for that ASIN."""
        body = {
            "Errors": [
                {
                    "__type": "com.amazon.paapi#ErrorData",
                    "Code": "ItemNotAccessible",
                    "Message": "The ItemId B01180YUXS is not accessible through the Product "
                    "Advertising API.",
                }
            ],
            "ItemsResult": {"Items": [{"ASIN": "B084Q4T9NM"}]},
        }
        parsed = parse(200, body, ["B084Q4T9NM", "B01180YUXS"])
        outcome = parsed.outcomes["B01180YUXS"]
        assert outcome.status is Status.NOT_FOUND
        assert outcome.error is not None
        assert outcome.error.code == "ItemNotAccessible"

    def test_errors_only_200_gives_per_item_outcomes(self) -> None:
        """A 200 with only Errors (every id unknown) gives one outcome per ASIN."""
        body = {
            "Errors": [
                {
                    "Code": "InvalidParameterValue",
                    "Message": f"The ItemId {asin} provided in the request is invalid.",
                }
                for asin in ("B000000001", "B000000002")
            ]
        }
        parsed = parse(200, body, ["B000000001", "B000000002"])
        assert {a: o.status for a, o in parsed.outcomes.items()} == {
            "B000000001": Status.INVALID,
            "B000000002": Status.INVALID,
        }
        assert parsed.missing == ()

    def test_offer_summary(self) -> None:
        """Price, currency and availability come from OffersV2.Listings[0]."""
        item = {
            "ASIN": "B000000001",
            "OffersV2": {
                "Listings": [
                    {
                        "Price": {"Money": {"Amount": 1299, "Currency": "JPY"}},
                        "Availability": {"Type": "IN_STOCK_SCARCE", "Message": "Only 2 left"},
                    }
                ]
            },
        }
        summary = (
            parse(200, {"ItemsResult": {"Items": [item]}}, ["B000000001"])
            .outcomes["B000000001"]
            .summary
        )
        assert summary is not None
        assert (summary.price, summary.currency, summary.availability) == (
            1299.0,
            "JPY",
            "IN_STOCK_SCARCE",
        )

    def test_missing_and_unexpected(self) -> None:
        """Unanswered ASINs are missing; unrequested ones unexpected."""
        body = {"ItemsResult": {"Items": [{"ASIN": "B000000009"}, {"ASIN": "B000000001"}]}}
        parsed = parse(200, body, ["B000000001", "B000000002"])
        assert set(parsed.outcomes) == {"B000000001"}
        assert parsed.missing == ("B000000002",)
        assert parsed.unexpected == ("B000000009",)

    def test_no_results_in_get_items_raises(self) -> None:
        """A 200 carrying only a request-level code raises BadRequestError."""
        body = {"Errors": [{"Code": "NoResults", "Message": "No results found for your request."}]}
        with pytest.raises(BadRequestError) as info:
            DIALECT.parse_get_items(response(200, body), ["B000000001"])
        assert info.value.code == "NoResults"


class TestInvalidItemIds:
    def test_malformed_id_capture(self) -> None:
        """The captured 400 names the bad id; it is exposed for the engine to drop."""
        requested = ["9791186701072", "B000000001"]
        with pytest.raises(InvalidItemIdsError) as info:
            DIALECT.parse_get_items(response(400, MALFORMED_CAPTURE), requested)
        error = info.value
        assert isinstance(error, BadRequestError)
        assert error.code == "InvalidParameterValue"
        assert error.invalid_ids == ("9791186701072",)
        assert offending_ids(error) == ("9791186701072",)
        assert error.message.startswith("The value [9791186701072]")
        assert error.request_id is None

    def test_errors_keep_amazons_request_id(self) -> None:
        """Amazon's request id (x-amzn-RequestId) stays on the errors the dialect rebuilds
        for the engine: the named ids' and another parameter's (it was dropped)."""
        with pytest.raises(InvalidItemIdsError) as info:
            DIALECT.parse_get_items(
                response(400, MALFORMED_CAPTURE, x_amzn_RequestId="rid-1"), ["9791186701072"]
            )
        assert info.value.request_id == "rid-1"
        body = envelope(
            "ValidationException",
            "InvalidParameterValue",
            "The value [www.amazon.xx] provided in the request for Marketplace is invalid.",
        )
        with pytest.raises(BadRequestError) as other:
            DIALECT.parse_get_items(response(400, body, x_amzn_RequestId="rid-2"), ["B000000001"])
        assert not isinstance(other.value, InvalidItemIdsError)
        assert other.value.request_id == "rid-2"

    def test_a_server_error_naming_an_id_is_retried_whole(self) -> None:
        """The same InvalidParameterValue in a 5xx is the server's failure: a ServerError to
        retry with every id, not an id to drop (the batch split, the id marked invalid)."""
        requested = ["9791186701072", "B000000001"]
        with pytest.raises(ServerError) as info:
            DIALECT.parse_get_items(response(500, MALFORMED_CAPTURE), requested)
        assert not isinstance(info.value, InvalidItemIdsError)
        assert offending_ids(info.value) == ()

    def test_item_id_wording(self) -> None:
        """'The ItemId B0... provided in the request is invalid.' in a 400 names that id."""
        body = envelope(
            "ValidationException",
            "InvalidParameterValue",
            "The ItemId B0BADBADBA provided in the request is invalid.",
        )
        with pytest.raises(InvalidItemIdsError) as info:
            DIALECT.parse_get_items(response(400, body), ["B000000001", "b0badbadba"])
        assert info.value.invalid_ids == ("b0badbadba",)

    def test_several_errors_and_bracket_lists(self) -> None:
        """Every InvalidParameterValue entry counts, and a bracket may list several ids."""
        body = {
            "__type": "com.amazon.paapi5#ValidationException",
            "Errors": [
                {
                    "Code": "InvalidParameterValue",
                    "Message": "The value [B00000000A, B00000000B] provided in the request "
                    "for ItemIds is invalid.",
                },
                {
                    "Code": "InvalidParameterValue",
                    "Message": "The value [B00000000C] provided in the request for ItemIds "
                    "is invalid.",
                },
            ],
        }
        requested = ["B00000000A", "B00000000B", "B00000000C", "B00000000D"]
        with pytest.raises(InvalidItemIdsError) as info:
            DIALECT.parse_get_items(response(400, body), requested)
        assert info.value.invalid_ids == ("B00000000A", "B00000000B", "B00000000C")

    def test_id_not_in_request_gives_plain_bad_request(self) -> None:
        """If the named id was not requested, dropping it cannot help: plain BadRequestError."""
        error = failure(400, MALFORMED_CAPTURE, ["B000000001"])
        assert type(error) is BadRequestError
        assert offending_ids(error) == ()

    def test_other_parameter_is_plain_bad_request(self) -> None:
        """An InvalidParameterValue about another parameter names no ids: a request error."""
        body = envelope(
            "ValidationException",
            "InvalidParameterValue",
            "The value [Foo] provided in the request for Resources is invalid.",
        )
        error = failure(400, body)
        assert type(error) is ParameterValueError
        assert isinstance(error, BadRequestError)
        assert offending_ids(error) == ()
        assert error.info.scope is Scope.REQUEST
        assert "not an item id" in error.info.remedy

    @pytest.mark.parametrize(
        "message",
        [
            "The value [B0BAD] provided in the request for ASIN is invalid.",
            "The value [123] provided in the request for BrowseNodeIds is invalid.",
            "The value [b0bad] provided in the request for itemIds is invalid.",
            "",
            "Something about the request is invalid.",
        ],
    )
    def test_id_or_unnamed_parameter_stays_an_id_error(self, message: str) -> None:
        """Only a message naming a parameter that is not an id (ASIN, BrowseNodeIds,
        ItemIds in any case) is a request error; an id, or no parameter named, stays the
        catalogue's id-level error."""
        body = envelope("ValidationException", "InvalidParameterValue", message)
        error = failure(400, body)
        assert not isinstance(error, ParameterValueError)
        assert error.info.scope is Scope.ASIN

    def test_parse_operation_reports_raw_ids(self) -> None:
        """Without a request list, the named ids are reported as written."""
        with pytest.raises(InvalidItemIdsError) as info:
            DIALECT.parse_operation(response(400, MALFORMED_CAPTURE), SEARCH)
        assert info.value.invalid_ids == ("9791186701072",)

    def test_offending_ids_of_other_errors_is_empty(self) -> None:
        """offending_ids is empty for any other exception."""
        assert offending_ids(ValueError("x")) == ()
        assert offending_ids(ServerError("InternalFailure", "m", status=500)) == ()


# protocol.md 3.5 error table: (code, exception, status, message, class).
ERROR_TABLE = [
    ("TooManyRequests", "TooManyRequestsException", 429,
     "The request was denied due to request throttling. Please verify the number of requests "
     "made per second to the Amazon Product Advertising API.", ThrottledError),
    ("RequestExpired", "RequestExpiredException", 401,
     "The request is past expiry date or the request date (either with 15 minute padding), or "
     "the request date occurs more than 15 minutes in the future.", AuthError),
    ("InvalidSignature", "InvalidSignatureException", 401,
     "The request signature we calculated does not match the signature you provided.",
     AuthError),
    ("IncompleteSignature", "IncompleteSignatureException", 400,
     "The request signature did not include all of the required components.", AuthError),
    ("UnrecognizedClient", "UnrecognizedClientException", 401,
     "The Access Key or security token included in the request is invalid.", AuthError),
    ("AccessDenied", "AccessDeniedException", 403,
     "The Access Key Id is not enabled for accessing Product Advertising API.", AuthError),
    ("AccessDeniedAwsUsers", "AccessDeniedException", 403,
     "The Access Key Id is not enabled for accessing Product Advertising API. Please use the "
     "credentials from Associates Central.", AuthError),
    ("InvalidAssociate", "AssociateValidationException", 403,
     "Your access key is not mapped to Primary of approved associate store.", AuthError),
    ("InvalidPartnerTag", "InvalidPartnerTagException", 400,
     "The partner tag is invalid or not present.", BadRequestError),
    ("InvalidParameterValue", "ValidationException", 400,
     "The value [x] provided in the request for Keywords is invalid.", ParameterValueError),
    ("MissingParameter", "ValidationException", 400,
     "The request must contain the parameter PartnerTag.", BadRequestError),
    ("UnknownOperation", "UnknownOperationException", 404,
     "The operation requested is invalid.", BadRequestError),
    ("InternalFailure", "InternalFailureException", 500,
     "The request processing has failed because of an unknown error.", ServerError),
    ("InternalFailure", "ServiceUnavailableException", 503, "Service unavailable.", ServerError),
]  # fmt: skip


class TestErrorResponses:
    @pytest.mark.parametrize(("code", "exception", "status", "message", "cls"), ERROR_TABLE)
    def test_error_table(
        self, code: str, exception: str, status: int, message: str, cls: type[ApiError]
    ) -> None:
        """Every row of protocol.md 3.5 raises its class with code = Errors[0].Code."""
        for parse_call in (
            lambda r: DIALECT.parse_get_items(r, ["B000000001"]),
            lambda r: DIALECT.parse_operation(r, SEARCH),
        ):
            with pytest.raises(cls) as info:
                parse_call(response(status, envelope(exception, code, message), date=DATE))
            error = info.value
            assert type(error) is cls
            assert (error.code, error.message, error.status) == (code, message, status)
            assert error.code in CATALOGUE
            assert error.server_date == DATE

    def test_request_expired_keeps_server_date(self) -> None:
        """RequestExpired carries the Date header so the engine can learn the clock offset."""
        body = envelope("RequestExpiredException", "RequestExpired", "expired")
        error = failure(401, body, date=DATE)
        assert isinstance(error, AuthError)
        assert error.server_date == DATE
        assert error.info.retryable

    @pytest.mark.parametrize(
        ("exception", "code", "status", "cls"),
        [
            ("RequestExpiredException", "RequestExpired", 401, AuthError),
            ("IncompleteSignatureException", "IncompleteSignature", 400, AuthError),
            ("UnrecognizedClientException", "UnrecognizedClient", 401, AuthError),
        ],
    )
    def test_a_type_alone_is_read_as_the_tables_code(
        self, exception: str, code: str, status: int, cls: type[ApiError]
    ) -> None:
        """An AWS-style body with only ``__type`` (``...#RequestExpiredException``) is the
        table's code (RequestExpired: re-signed and resent), not an unknown one that took
        the key out on a clock skew."""
        error = failure(status, {"__type": f"com.amazon.paapi5#{exception}", "message": "m"})
        assert type(error) is cls
        assert error.code == code

    def test_a_json_404_naming_no_code_is_unknown_operation(self) -> None:
        """A 404 or 405 with a JSON body naming no code (a gateway's "Not Found" for a
        path in api.endpoint) is UnknownOperation, as a page that is not JSON is."""
        for status in (404, 405):
            error = failure(status, {"message": "Not Found"})
            assert isinstance(error, BadRequestError)
            assert error.code == "UnknownOperation"

    def test_code_falls_back_to_type_name(self) -> None:
        """Without Errors the __type's exception name is the code (AssociateEligibility)."""
        body = {"__type": "com.amazon.paapi5#AssociateEligibilityException"}
        error = failure(403, body)
        assert isinstance(error, AuthError)
        assert error.code == "AssociateEligibilityException"

    @pytest.mark.parametrize(
        "body",
        [
            envelope("AccessDeniedException", "AccessDenied", RETIRED_MESSAGE),
            {
                "__type": "com.amazon.paapi5#AccessDeniedException",
                "Code": "AccessDenied",
                "Message": RETIRED_MESSAGE,
            },
        ],
    )
    @pytest.mark.parametrize("status", [403, 400])
    def test_retired_api(self, body: dict[str, object], status: int) -> None:
        """The retirement notice (enveloped or flat) is AuthError AccessDenied at any status."""
        error = failure(status, body)
        assert isinstance(error, AuthError)
        assert error.code == "AccessDenied"
        assert error.message == RETIRED_MESSAGE

    def test_throttle_retry_after_header(self) -> None:
        """A Retry-After header on a 429 becomes retry_after."""
        body = envelope("TooManyRequestsException", "TooManyRequests", "slow down")
        error = failure(429, body, retry_after="2")
        assert isinstance(error, ThrottledError)
        assert error.retry_after == 2.0

    def test_unreadable_429_is_throttled(self) -> None:
        """A 429 whose body is not JSON is ThrottledError TooManyRequests."""
        error = failure(429, b"Rate exceeded")
        assert isinstance(error, ThrottledError)
        assert error.code == "TooManyRequests"

    @pytest.mark.parametrize(
        ("status", "code", "cls"),
        [
            (400, "Other", BadRequestError),
            (403, "Other", AuthError),
            (500, "ServerError", ServerError),
            (502, "ServerError", ServerError),
            (504, "ServerError", ServerError),
        ],
    )
    def test_codeless_bodies_fall_back_by_status(
        self, status: int, code: str, cls: type[ApiError]
    ) -> None:
        """A JSON error body with no Code and no __type gets a code from its status (a 5xx
        without Amazon's code is ServerError, as in the Creators dialect)."""
        error = failure(status, {"message": "?"})
        assert type(error) is cls
        assert error.code == code

    @pytest.mark.parametrize(
        ("status", "code"), [(404, "UnknownOperation"), (405, "UnknownOperation"), (400, "Other")]
    )
    def test_a_4xx_page_that_is_no_answer_is_not_retried(self, status: int, code: str) -> None:
        """A non-JSON 404 or 405 (a wrong path) is UnknownOperation, a non-JSON 400 a
        refused request; they were unreadable answers, retried six times per batch."""
        with pytest.raises(BadRequestError) as info:
            DIALECT.parse_get_items(response(status, b"<html>no</html>"), ["B000000001"])
        assert (info.value.code, info.value.status) == (code, status)

    def test_a_json_404_cut_short_is_still_retried(self) -> None:
        """A PA-API JSON error cut short is an unreadable answer (retried), not a page."""
        body = b'{"__type":"com.amazon.paapi5#ResourceNotFoundException","Errors":[{"Co'
        with pytest.raises(ResponseError):
            DIALECT.parse_get_items(response(404, body), ["B000000001"])

    def test_html_503_is_a_response_error(self) -> None:
        """An HTML error page raises ResponseError carrying the status."""
        with pytest.raises(ResponseError) as info:
            DIALECT.parse_get_items(response(503, b"<html>busy</html>"), ["B000000001"])
        assert info.value.status == 503


class TestParseOperation:
    def test_returns_the_json(self) -> None:
        """A 200 SearchItems answer is returned as parsed."""
        body = {"SearchResult": {"Items": [{"ASIN": "B000000001"}], "TotalResultCount": 1}}
        assert DIALECT.parse_operation(response(200, body), SEARCH) == body

    @pytest.mark.parametrize(
        ("operation", "body", "problem"),
        [
            (SEARCH, {"ItemsResult": {"Items": []}}, "no SearchResult object"),
            (SEARCH, {"SearchResult": {"Items": {"ASIN": "B0"}}}, "SearchResult.Items is not"),
            (Operation.GET_VARIATIONS, {"VariationsResult": {"Items": [{}]}}, "has no ASIN"),
            (
                Operation.GET_BROWSE_NODES,
                {"BrowseNodesResult": {"BrowseNodes": [{"id": "3040"}]}},
                "has no Id",
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

    def test_no_results(self) -> None:
        """The documented NoResults body raises BadRequestError NoResults (any status)."""
        body = {
            "Errors": [
                {
                    "__type": "com.amazon.paapi#ErrorData",
                    "Code": "NoResults",
                    "Message": "No results found for your request.",
                }
            ]
        }
        for status in (200, 404):
            with pytest.raises(BadRequestError) as info:
                DIALECT.parse_operation(response(status, body), SEARCH)
            assert info.value.code == "NoResults"


class TestWrongShapes:
    @pytest.mark.parametrize(
        "body",
        [
            b'{"ItemsResult":{"Items":[{"ASIN":"B0',
            b"<html>500</html>",
            b"\xc3\x28",
            b"[" * 100_000,
            b"42",
            b'{"ItemsResult":"x"}',
            b'{"ItemsResult":{"Items":"x"}}',
            b'{"ItemsResult":{"Items":[[]]}}',
            b'{"ItemsResult":{"Items":[{"asin":"lower-case key"}]}}',
            b'{"Errors":[{"code":"lower-case key"}]}',
            b'{"Errors":"x"}',
        ],
    )
    def test_unreadable_bodies_raise_response_error(self, body: bytes) -> None:
        """Truncated, non-JSON, non-UTF-8 or wrongly shaped bodies raise ResponseError."""
        with pytest.raises(ResponseError):
            DIALECT.parse_get_items(RawResponse(200, {}, body), ["B000000001"])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
ASINS = ["B000000001", "B000000002", "B000000003"]


class TestFuzz:
    @settings(max_examples=300, deadline=None)
    @given(status=st.integers(100, 599), body=st.binary(max_size=200))
    def test_arbitrary_bytes(self, status: int, body: bytes) -> None:
        """Any status and bytes give a result or an ApiError/ResponseError, nothing else."""
        raw = RawResponse(status, {}, body)
        try:
            parsed = DIALECT.parse_get_items(raw, ASINS)
            assert set(parsed.outcomes) | set(parsed.missing) == set(ASINS)
        except (ApiError, ResponseError):
            pass
        with contextlib.suppress(ApiError, ResponseError):
            DIALECT.parse_operation(raw, SEARCH)

    @settings(max_examples=300, deadline=None)
    @given(status=st.sampled_from([200, 400, 401, 403, 404, 429, 500]), value=json_values)
    def test_arbitrary_json(self, status: int, value: object) -> None:
        """Any JSON document gives a result or an ApiError/ResponseError."""
        raw = RawResponse(status, {"retry-after": "Mon, 99 Foo"}, json.dumps(value).encode())
        try:
            parsed = DIALECT.parse_get_items(raw, ASINS)
            assert set(parsed.outcomes) | set(parsed.missing) == set(ASINS)
        except (ApiError, ResponseError):
            pass

    @settings(max_examples=300, deadline=None)
    @given(
        errors=st.lists(
            st.fixed_dictionaries(
                {"Code": st.sampled_from(["InvalidParameterValue", "X"])},
                optional={"Message": st.text(max_size=60) | json_values},
            ),
            max_size=3,
        ),
        exception=st.text(alphabet="abcXYZ#.", max_size=20),
    )
    def test_arbitrary_error_envelopes(
        self, errors: list[dict[str, object]], exception: str
    ) -> None:
        """Any 400 envelope raises a BadRequestError whose invalid ids were requested."""
        raw = response(400, {"__type": exception, "Errors": errors})
        with pytest.raises(BadRequestError) as info:
            DIALECT.parse_get_items(raw, ASINS)
        assert set(offending_ids(info.value)) <= set(ASINS)
