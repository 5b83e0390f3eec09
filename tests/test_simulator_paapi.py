"""The simulated PA-API 5.0: SigV4 verification, every error code on its real trigger, shapes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from datetime import timedelta

import pytest

from broker.simulator.accounts import DEMO_ACCOUNTS, Account
from broker.simulator.catalog import lookup
from broker.simulator.render import render_item
from broker.simulator.settings import SimulatorSettings
from broker.simulator.state import Simulator
from broker.simulator.testclient import SimResponse, SimulatorClient, running_simulator
from broker.testing import FakeClock

Start = Callable[..., Awaitable[tuple[SimulatorClient, Simulator, FakeClock]]]
OPEN = SimulatorSettings(limits=False)
ASIN = "B000TEST01"
ITEMS = [f"B0{i:08d}" for i in range(10)]
BODY = {
    "ItemIds": [ASIN],
    "ItemIdType": "ASIN",
    "PartnerTag": "demo-20",
    "PartnerType": "Associates",
    "Marketplace": "www.amazon.com",
    "Resources": ["ItemInfo.Title", "Images.Primary.Small", "OffersV2.Listings.Price"],
}


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Start simulators on a fake clock; each call returns a client, the state and the clock."""
    async with AsyncExitStack() as stack:

        async def factory(
            settings: SimulatorSettings | None = OPEN,
        ) -> tuple[SimulatorClient, Simulator, FakeClock]:
            clock = FakeClock()
            client, sim = await stack.enter_async_context(running_simulator(settings, clock=clock))
            return client, sim, clock

        yield factory


async def _call(
    client: SimulatorClient, clock: FakeClock, body: object = BODY, **kwargs: object
) -> SimResponse:
    return await client.paapi("GetItems", body, now=clock.utcnow(), **kwargs)  # type: ignore[arg-type]


def _code(response: SimResponse) -> str:
    errors = response.json()["Errors"]
    return str(errors[0]["Code"])


def _key(name: str, **flags: object) -> Account:
    tags = {"www.amazon.com": ("t-20",)}
    return Account(name, "paapi5", name.upper(), "s3cret", "", tags, **flags)  # type: ignore[arg-type]


class TestSuccess:
    async def test_signed_get_items(self, start: Start) -> None:
        """A well-signed GetItems gets PascalCase items, no nulls, and the tag in the URL."""
        client, sim, clock = await start()
        response = await _call(client, clock)
        assert response.status == 200
        body = response.json()
        assert set(body) == {"ItemsResult"}
        item = body["ItemsResult"]["Items"][0]
        assert item == render_item(
            OPEN,
            "www.amazon.com",
            ASIN,
            resources=BODY["Resources"],
            partner_tag="demo-20",
            protocol="paapi5",
        )
        assert set(item) == {"ASIN", "DetailPageURL", "Images", "ItemInfo", "OffersV2"}
        assert item["DetailPageURL"].endswith("?tag=demo-20&linkCode=ogi&th=1&psc=1")
        assert item["Images"]["Primary"]["Small"]["URL"].endswith("._SL75_.jpg")
        assert sim.stats.accounts["demo-paapi"].accepted == 1

    async def test_host_chooses_marketplace_and_region(self, start: Start) -> None:
        """webservices.amazon.co.uk serves www.amazon.co.uk (GBP) and needs region eu-west-1."""
        client, _, clock = await start()
        body = {**BODY, "PartnerTag": "demo-21", "Marketplace": "www.amazon.co.uk"}
        response = await _call(client, clock, body, host="webservices.amazon.co.uk")
        assert response.status == 200
        price = response.json()["ItemsResult"]["Items"][0]["OffersV2"]["Listings"][0]["Price"]
        assert price["Money"]["Currency"] == "GBP"
        wrong = await _call(
            client, clock, body, host="webservices.amazon.co.uk", region="us-east-1"
        )
        assert wrong.status == 401
        assert _code(wrong) == "InvalidSignature"

    async def test_unknown_host_uses_body_marketplace_or_default(self, start: Start) -> None:
        """A loopback Host header falls back to the body's Marketplace, else the default host."""
        client, _, clock = await start()
        body = {**BODY, "PartnerTag": "demo-22", "Marketplace": "www.amazon.de"}
        response = await _call(client, clock, body, host="127.0.0.1:9", region="eu-west-1")
        assert response.status == 200
        assert "www.amazon.de/dp/" in response.text
        plain = {k: v for k, v in BODY.items() if k != "Marketplace"}
        assert (await _call(client, clock, plain, host="127.0.0.1:9")).status == 200

    @pytest.mark.parametrize(
        "signed",
        [
            ("content-encoding", "content-type", "host", "x-amz-date", "x-amz-target"),
            ("host", "x-amz-date"),
        ],
    )
    async def test_signed_header_subsets(self, start: Start, signed: tuple[str, ...]) -> None:
        """The signature is checked over the SignedHeaders list the client sent."""
        client, _, clock = await start()
        extra = {"user-agent": "paapi5-python-sdk/1.2.1", "accept": "application/json"}
        response = await _call(client, clock, extra_headers=extra, signed=signed)
        assert response.status == 200

    async def test_separators_without_spaces(self, start: Start) -> None:
        """An Authorization header with ',' separators (no spaces) is accepted."""
        client, _, clock = await start()
        assert (await _call(client, clock, tight_separators=True)).status == 200

    async def test_unknown_items_are_per_item_errors(self, start: Start) -> None:
        """Unknown but well-formed ids are per-item Errors in a 200; ErrorData __type is set."""
        settings = replace(OPEN, missing_share=0.5)
        client, _, clock = await start(settings)
        missing = [a for a in ITEMS if lookup(settings, "www.amazon.com", a).status != "ok"]
        response = await _call(client, clock, {**BODY, "ItemIds": ITEMS})
        body = response.json()
        assert response.status == 200
        assert {e["Message"] for e in body["Errors"]} == {
            f"The ItemId {a} provided in the request is invalid." for a in missing
        }
        assert {e["__type"] for e in body["Errors"]} == {"com.amazon.paapi5#ErrorData"}
        assert len(body["ItemsResult"]["Items"]) == 10 - len(missing)

    async def test_all_unknown_is_errors_only(self, start: Start) -> None:
        """When every id is unknown the 200 carries Errors and no ItemsResult."""
        client, _, clock = await start(replace(OPEN, missing_share=1.0))
        response = await _call(client, clock)
        assert response.status == 200
        assert set(response.json()) == {"Errors"}

    async def test_not_accessible(self, start: Start) -> None:
        """Inaccessible ids are ItemNotAccessible per-item errors."""
        client, _, clock = await start(replace(OPEN, inaccessible_share=1.0))
        response = await _call(client, clock)
        assert response.json()["Errors"][0] == {
            "__type": "com.amazon.paapi5#ErrorData",
            "Code": "ItemNotAccessible",
            "Message": f"The ItemId {ASIN} is not accessible through the Product Advertising API.",
        }

    async def test_other_operations(self, start: Start) -> None:
        """SearchItems, GetVariations and GetBrowseNodes answer in PascalCase."""
        client, _, clock = await start()
        search = await client.paapi(
            "SearchItems",
            {"Keywords": "lamp", "PartnerTag": "demo-20", "PartnerType": "Associates"},
            now=clock.utcnow(),
        )
        assert search.status == 200
        assert "Items" in search.json()["SearchResult"]
        variations = await client.paapi(
            "GetVariations",
            {"ASIN": ASIN, "PartnerTag": "demo-20", "PartnerType": "Associates"},
            now=clock.utcnow(),
        )
        assert variations.status == 200
        assert "VariationsResult" in variations.json()
        # PA-API never sends an explicit null: ParentASIN was not asked, so it is absent.
        assert all("ParentASIN" not in i for i in variations.json()["VariationsResult"]["Items"])
        nodes = await client.paapi(
            "GetBrowseNodes",
            {"BrowseNodeIds": ["172282"], "PartnerTag": "demo-20", "PartnerType": "Associates"},
            now=clock.utcnow(),
        )
        assert nodes.json()["BrowseNodesResult"]["BrowseNodes"][0]["DisplayName"] == "Electronics"
        none = await client.paapi(
            "SearchItems",
            {"Keywords": "noresults", "PartnerTag": "demo-20", "PartnerType": "Associates"},
            now=clock.utcnow(),
        )
        assert none.status == 404  # the status is undocumented (protocol.md: [U])
        assert none.json() == {  # the documented body, with real answers' paapi5 __type
            "Errors": [
                {
                    "__type": "com.amazon.paapi5#ErrorData",
                    "Code": "NoResults",
                    "Message": "No results found for your request.",
                }
            ]
        }


@pytest.mark.parametrize("query", ["a=b", "a=%2526", "q=a+b", "b=2&a=%20x"])
async def test_a_signed_query_string_is_verified_as_sent(start: Start, query: str) -> None:
    """A query string signed as sent verifies: the simulator decoded it twice (its
    query_string is decoded already), so "%2526" or "+" failed with InvalidSignature."""
    client, _, clock = await start()
    response = await _call(client, clock, query=query)
    assert response.status == 200, response.text


class TestErrors:
    @pytest.mark.parametrize(
        ("kwargs", "status", "code"),
        [
            (
                {"target": "com.amazon.paapi5.v1.ProductAdvertisingAPIv1.GetItem"},
                404,
                "UnknownOperation",
            ),
            ({"target": ""}, 404, "UnknownOperation"),
            ({"authorization": ""}, 400, "IncompleteSignature"),
            (
                {
                    "authorization": "AWS4-HMAC-SHA256 Credential=DEMOACCESSKEY/20260501/us-east-1/"
                    "ProductAdvertisingAPI/aws4_request, SignedHeaders=host"
                },
                400,
                "IncompleteSignature",
            ),
            ({"service": "ProductAdvertisingAPIv1"}, 400, "IncompleteSignature"),
            ({"signed": ("content-type", "x-amz-date")}, 400, "IncompleteSignature"),
            ({"access_key": "AKIAUNKNOWN"}, 401, "UnrecognizedClient"),
            ({"secret": "wrong"}, 401, "InvalidSignature"),
            ({"region": "eu-west-1"}, 401, "InvalidSignature"),
        ],
    )
    async def test_request_level_codes(
        self, start: Start, kwargs: dict[str, object], status: int, code: str
    ) -> None:
        """Each malformed or mis-signed request gets its PA-API code and status."""
        client, sim, clock = await start()
        response = await _call(client, clock, **kwargs)
        assert response.status == status
        assert _code(response) == code
        assert response.json()["__type"].startswith("com.amazon.paapi5#")
        assert sim.stats.accounts["demo-paapi"].accepted == 0

    async def test_wrong_path_is_unknown_operation(self, start: Start) -> None:
        """A path that is no operation is 404 UnknownOperation."""
        client, _, clock = await start()
        response = await client.paapi("GetItemz", BODY, now=clock.utcnow())
        assert response.status == 404
        assert _code(response) == "UnknownOperation"

    @pytest.mark.parametrize(
        "raw",
        [
            b'{"ItemIds":["B000000001"],"X":' + b"1" * 5000 + b"}",
            b"[" * 100_000 + b"]" * 100_000,
            b'{"ItemIds":["B000000001"],"ItemCount":1e400}',
            b'{"ItemIds":["B000000001"],"MinPrice":NaN}',
            b'{"ItemIds":["B000000001"],"Keywords":"\\ud800"}',
        ],
        ids=["long-integer", "deep-nesting", "overflow", "nan", "lone-surrogate"],
    )
    async def test_a_body_no_json_reader_takes_is_refused(self, start: Start, raw: bytes) -> None:
        """Signed, such a body is 400 InvalidParameterValue; unsigned, 400
        IncompleteSignature, as for any body: each was a 500 and a traceback."""
        client, _, clock = await start()
        signed = await _call(client, clock, raw=raw)
        assert signed.status == 400
        assert _code(signed) == "InvalidParameterValue"
        unsigned = await _call(client, clock, raw=raw, authorization="")
        assert unsigned.status == 400
        assert _code(unsigned) == "IncompleteSignature"

    async def test_body_changed_after_signing(self, start: Start) -> None:
        """The body hash covers the exact bytes: re-serialised JSON breaks the signature."""
        client, _, clock = await start()
        signed_for = json.dumps(BODY).encode()
        assert (await _call(client, clock, raw=signed_for)).status == 200
        sent = json.dumps(BODY, separators=(",", ":")).encode()
        tampered = await _call(client, clock, raw=signed_for, send=sent)
        assert tampered.status == 401
        assert _code(tampered) == "InvalidSignature"

    @pytest.mark.parametrize(
        ("offset_min", "status"), [(-16, 401), (16, 401), (-14, 200), (14, 200)]
    )
    async def test_request_expired_window(self, start: Start, offset_min: int, status: int) -> None:
        """x-amz-date more than 15 minutes from the simulator's clock is 401 RequestExpired."""
        client, _, clock = await start()
        when = clock.utcnow() + timedelta(minutes=offset_min)
        response = await client.paapi("GetItems", BODY, now=when)
        assert response.status == status
        if status == 401:
            assert _code(response) == "RequestExpired"

    async def test_clock_skew_moves_the_window(self, start: Start) -> None:
        """With the server clock skewed by 20 minutes, an accurate client's date is expired."""
        client, _, clock = await start(replace(OPEN, clock_skew_s=1200))
        assert _code(await _call(client, clock)) == "RequestExpired"
        skewed = clock.utcnow() + timedelta(seconds=1200)
        assert (await client.paapi("GetItems", BODY, now=skewed)).status == 200

    async def test_credential_scope_dated_a_day_early(self, start: Start) -> None:
        """A credential scope dated the day before the X-Amz-Date is 401 InvalidSignature,
        even signed consistently with that scope: Amazon checks the dates agree."""
        client, sim, clock = await start()
        day_before = (clock.utcnow() - timedelta(days=1)).strftime("%Y%m%d")
        response = await _call(client, clock, scope_date=day_before)
        assert response.status == 401
        assert _code(response) == "InvalidSignature"
        assert response.json()["Errors"][0]["Message"].startswith(
            "Date in Credential scope does not match YYYYMMDD"
        )
        assert sim.stats.accounts["demo-paapi"].accepted == 0

    @pytest.mark.parametrize(
        ("flag", "status", "code", "exception"),
        [
            ("aws_credentials", 403, "AccessDeniedAwsUsers", "AccessDeniedException"),
            ("not_enabled", 403, "AccessDenied", "AccessDeniedException"),
            ("no_store", 403, "InvalidAssociate", "AssociateValidationException"),
            # As Amazon answers an account without qualifying sales (protocol.md 3.5).
            ("not_eligible", 429, "TooManyRequests", "TooManyRequestsException"),
        ],
    )
    async def test_key_flags(
        self, start: Start, flag: str, status: int, code: str, exception: str
    ) -> None:
        """A key's flags give AccessDeniedAwsUsers, AccessDenied, InvalidAssociate or, for an
        ineligible account, TooManyRequests on every request."""
        client, _, clock = await start(replace(OPEN, accounts=(_key("flagged", **{flag: True}),)))
        body = {**BODY, "PartnerTag": "t-20"}
        response = await _call(client, clock, body, access_key="FLAGGED", secret="s3cret")
        assert response.status == status
        assert response.json()["__type"] == f"com.amazon.paapi5#{exception}"
        assert _code(response) == code

    @pytest.mark.parametrize(
        ("body", "host"),
        [
            ({**BODY, "PartnerTag": "demo-20"}, "webservices.amazon.co.uk"),
            ({**BODY, "PartnerTag": "someone-20"}, "webservices.amazon.com"),
            ({k: v for k, v in BODY.items() if k != "PartnerTag"}, "webservices.amazon.com"),
        ],
    )
    async def test_invalid_partner_tag(
        self, start: Start, body: dict[str, object], host: str
    ) -> None:
        """A tag that is not this key's in this marketplace (or none) is 400 InvalidPartnerTag."""
        client, _, clock = await start()
        response = await _call(client, clock, body, host=host)
        assert response.status == 400
        assert response.json()["__type"] == "com.amazon.paapi5#InvalidPartnerTagException"
        assert _code(response) == "InvalidPartnerTag"

    async def test_missing_item_ids(self, start: Start) -> None:
        """A GetItems without ItemIds is 400 MissingParameter."""
        client, _, clock = await start()
        body = {k: v for k, v in BODY.items() if k != "ItemIds"}
        response = await _call(client, clock, body)
        assert response.status == 400
        assert _code(response) == "MissingParameter"

    async def test_answers_carry_both_request_ids(self, start: Start) -> None:
        """An answer carries x-amzn-RequestId and PA-API's x-amz-rid (protocol.md 3.4)."""
        client, _, clock = await start()
        response = await _call(client, clock, BODY)
        assert response.headers["x-amzn-requestid"]
        assert len(response.headers["x-amz-rid"]) == 20

    @pytest.mark.parametrize(
        ("value", "code"), [(None, "MissingParameter"), ("Bogus", "InvalidParameterValue")]
    )
    async def test_partner_type_is_required(
        self, start: Start, value: str | None, code: str
    ) -> None:
        """PartnerType is required (protocol.md 3.3) and its one value is Associates."""
        client, _, clock = await start()
        body = {k: v for k, v in BODY.items() if k != "PartnerType"}
        if value is not None:
            body["PartnerType"] = value
        response = await _call(client, clock, body)
        assert response.status == 400
        assert _code(response) == code

    @pytest.mark.parametrize(
        ("operation", "body"),
        [
            ("SearchItems", {"Keywords": "lamp"}),
            ("GetVariations", {"ASIN": ASIN}),
            ("GetBrowseNodes", {"BrowseNodeIds": ["172282"]}),
        ],
    )
    @pytest.mark.parametrize(
        ("value", "code"), [(None, "MissingParameter"), ("Bogus", "InvalidParameterValue")]
    )
    async def test_every_operation_requires_partner_type(
        self,
        start: Start,
        operation: str,
        body: dict[str, object],
        value: str | None,
        code: str,
    ) -> None:
        """PartnerType (Associates) is required by every operation, not GetItems alone."""
        client, _, clock = await start()
        sent = {**body, "PartnerTag": "demo-20"}
        if value is not None:
            sent["PartnerType"] = value
        response = await client.paapi(operation, sent, now=clock.utcnow())
        assert response.status == 400
        assert _code(response) == code

    @pytest.mark.parametrize(
        ("extra", "status"),
        [
            ({"ItemIdType": "ASIN", "CurrencyOfPreference": "USD", "OfferCount": 1}, 200),
            ({"Merchant": "All", "LanguagesOfPreference": ["en_US"], "Properties": {}}, 200),
            ({"ItemIdType": "UPC"}, 400),
            ({"ItemIdType": 5}, 400),
            ({"CurrencyOfPreference": 12}, 400),
            ({"CurrencyOfPreference": "U" * 101}, 400),
            ({"LanguagesOfPreference": "en_US"}, 400),
            ({"Merchant": "Nobody"}, 400),
            ({"OfferCount": 0}, 400),
            ({"Properties": {"a": 1}}, 400),
        ],
    )
    async def test_optional_fields_are_typed_as_the_model_types_them(
        self, start: Start, extra: dict[str, object], status: int
    ) -> None:
        """GetItems' optional fields of the wrong type or value (protocol.md 3.3) are 400
        InvalidParameterValue, as Amazon answers; they were ignored, so a client that sent
        them wrongly was served."""
        client, _, clock = await start()
        response = await _call(client, clock, {**BODY, **extra})
        assert response.status == status, response.text
        if status == 400:
            assert _code(response) == "InvalidParameterValue"

    async def test_search_condition_is_one_of_paapis(self, start: Start) -> None:
        """A SearchItems Condition outside Any, Collectible, New, Refurbished, Used is refused."""
        client, _, clock = await start()
        body = {"Keywords": "lamp", "PartnerTag": "demo-20", "PartnerType": "Associates"}
        for condition, status in (("Used", 200), ("Broken", 400)):
            response = await client.paapi(
                "SearchItems", {**body, "Condition": condition}, now=clock.utcnow()
            )
            assert response.status == status

    async def test_languages_and_variation_pages_are_not_capped(self, start: Start) -> None:
        """PA-API names no limit on LanguagesOfPreference (the Creators model takes one) nor a
        top VariationPage: two languages are answered, and page 1001 is past the end (404),
        not a bad value (400)."""
        client, _, clock = await start()
        base = {"PartnerTag": "demo-20", "PartnerType": "Associates"}
        search = {**base, "Keywords": "lamp", "LanguagesOfPreference": ["en_US", "es_US"]}
        response = await client.paapi("SearchItems", search, now=clock.utcnow())
        assert response.status == 200
        variations = {**base, "ASIN": ASIN, "VariationPage": 1001}
        response = await client.paapi("GetVariations", variations, now=clock.utcnow())
        assert response.status == 404

    async def test_get_variations_gives_only_the_price_asked(self, start: Start) -> None:
        """VariationSummary.Price.HighestPrice alone: the highest price only (PA-API sends
        no nulls); the lowest came back too."""
        client, _, clock = await start()
        body = {
            "ASIN": ASIN,
            "PartnerTag": "demo-20",
            "PartnerType": "Associates",
            "Resources": ["VariationSummary.Price.HighestPrice"],
        }
        response = await client.paapi("GetVariations", body, now=clock.utcnow())
        price = response.json()["VariationsResult"]["VariationSummary"]["Price"]
        assert list(price) == ["HighestPrice"]
        assert price["HighestPrice"]["Amount"] > 0

    async def test_browse_node_ancestors_carry_no_nulls(self, start: Start) -> None:
        """PA-API never sends an explicit null, the root of an ancestor chain included."""
        client, _, clock = await start()
        body = {
            "BrowseNodeIds": ["1000"],
            "PartnerTag": "demo-20",
            "PartnerType": "Associates",
            "Resources": ["BrowseNodes.Ancestor"],
        }
        response = await client.paapi("GetBrowseNodes", body, now=clock.utcnow())
        assert response.status == 200
        assert "null" not in response.text

    async def test_one_malformed_id_fails_the_request(self, start: Start) -> None:
        """One malformed ItemId fails the whole request with the captured 400 body."""
        client, _, clock = await start()
        response = await _call(client, clock, {**BODY, "ItemIds": [ASIN, "9791186701072"]})
        assert response.status == 400
        assert response.json() == {
            "__type": "com.amazon.paapi5#ValidationException",
            "Errors": [
                {
                    "Code": "InvalidParameterValue",
                    "Message": "The value [9791186701072] provided in the request for ItemIds "
                    "is invalid.",
                }
            ],
        }

    async def test_too_many_ids(self, start: Start) -> None:
        """More than 10 ItemIds is 400 InvalidParameterValue."""
        client, _, clock = await start()
        response = await _call(client, clock, {**BODY, "ItemIds": [*ITEMS, ASIN]})
        assert response.status == 400
        assert _code(response) == "InvalidParameterValue"

    async def test_throttled(self, start: Start) -> None:
        """Over the key's rate is 429 TooManyRequests, with Retry-After when switched on."""
        client, sim, clock = await start(SimulatorSettings(retry_after="header"))
        assert (await _call(client, clock)).status == 200
        response = await _call(client, clock)
        assert response.status == 429
        assert response.json()["__type"] == "com.amazon.paapi5#TooManyRequestsException"
        assert _code(response) == "TooManyRequests"
        assert response.headers["retry-after"] == "1"
        assert sim.stats.accounts["demo-paapi"].throttled == 1

    async def test_retired(self, start: Start) -> None:
        """In retired mode every call gets the AccessDenied deprecation body."""
        client, _, clock = await start(replace(OPEN, paapi_retired=True))
        response = await _call(client, clock)
        assert response.status == 403
        assert response.json()["Errors"][0]["Message"].startswith(
            "Product Advertising API is deprecated. Please migrate to Creators API"
        )


def test_demo_paapi_key_is_documented() -> None:
    """The demo PA-API key is DEMOACCESSKEY / demo-secret-key with tag demo-20."""
    key = next(a for a in DEMO_ACCOUNTS if a.protocol == "paapi5")
    assert (key.credential_id, key.secret) == ("DEMOACCESSKEY", "demo-secret-key")
    assert key.partner_tags["www.amazon.com"] == ("demo-20",)
