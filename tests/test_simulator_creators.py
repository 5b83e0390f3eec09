"""The simulated Creators API: token endpoints, every error on its real trigger, and shapes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any
from unittest.mock import ANY

import pytest
from creatorsapi_python_sdk.models.access_denied_exception_response_content import (
    AccessDeniedExceptionResponseContent,
)
from creatorsapi_python_sdk.models.get_browse_nodes_response_content import (
    GetBrowseNodesResponseContent,
)
from creatorsapi_python_sdk.models.get_items_response_content import GetItemsResponseContent
from creatorsapi_python_sdk.models.get_variations_response_content import (
    GetVariationsResponseContent,
)
from creatorsapi_python_sdk.models.resource_not_found_exception_response_content import (
    ResourceNotFoundExceptionResponseContent,
)
from creatorsapi_python_sdk.models.search_items_response_content import (
    SearchItemsResponseContent,
)
from creatorsapi_python_sdk.models.throttle_exception_response_content import (
    ThrottleExceptionResponseContent,
)
from creatorsapi_python_sdk.models.unauthorized_exception_response_content import (
    UnauthorizedExceptionResponseContent,
)
from creatorsapi_python_sdk.models.validation_exception_response_content import (
    ValidationExceptionResponseContent,
)

from broker.simulator.accounts import DEMO_ACCOUNTS, Account
from broker.simulator.catalog import lookup, search_results
from broker.simulator.render import CREATORS_ITEM_RESOURCES, render_item
from broker.simulator.settings import FaultRates, SimulatorSettings
from broker.simulator.state import Simulator
from broker.simulator.testclient import SimResponse, SimulatorClient, running_simulator
from broker.testing import FakeClock

Start = Callable[..., Awaitable[tuple[SimulatorClient, Simulator]]]
OPEN = SimulatorSettings(limits=False)
TAGS = {"www.amazon.com": ("t-20",)}
ASIN = "B000TEST01"
ITEMS = [f"B0{i:08d}" for i in range(10)]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Start simulators on free ports; each call returns a client and the live state."""
    async with AsyncExitStack() as stack:

        async def factory(
            settings: SimulatorSettings | None = OPEN, *, clock: FakeClock | None = None
        ) -> tuple[SimulatorClient, Simulator]:
            return await stack.enter_async_context(running_simulator(settings, clock=clock))

        yield factory


def _account(name: str, **flags: object) -> Account:
    return Account(name, "creators", f"{name}-id", f"{name}-secret", "3.1", TAGS, **flags)  # type: ignore[arg-type]


async def _get(
    client: SimulatorClient, token: str | None, ids: list[str], **extra: object
) -> SimResponse:
    body = {"partnerTag": "demo-20", "itemIds": ids, **extra}
    return await client.creators("getItems", body, token=token)


class TestTokenEndpoints:
    async def test_lwa_json_token(self, start: Start) -> None:
        """A v3 key gets an LWA-shaped bearer token from /auth/o2/token with a JSON body."""
        client, _ = await start()
        response = await client.token_response("demo-id", "demo-secret", family="v3")
        body = response.json()
        assert response.status == 200
        assert str(body["access_token"]).startswith("Atc|")
        assert body["token_type"] == "bearer"
        assert body["scope"] == "creatorsapi::default"
        assert body["expires_in"] == 3600

    @pytest.mark.parametrize("style", ["form", "basic"])
    async def test_lwa_lenient_bodies(self, start: Start, style: str) -> None:
        """The LWA endpoint also accepts a form body and HTTP Basic credentials."""
        client, _ = await start()
        response = await client.token_response("demo-id", "demo-secret", style=style)
        assert response.status == 200

    @pytest.mark.parametrize("style", ["form", "basic"])
    async def test_cognito_token(self, start: Start, style: str) -> None:
        """A v2 key gets a Cognito-shaped token from /oauth2/token (form body or Basic)."""
        client, _ = await start()
        response = await client.token_response(
            "demo-v2-id", "demo-v2-secret", family="v2", style=style
        )
        body = response.json()
        assert response.status == 200
        assert str(body["access_token"]).startswith("eyJ")
        assert body["token_type"] == "Bearer"
        assert body["expires_in"] == 3600

    async def test_cognito_takes_no_json(self, start: Start) -> None:
        """Cognito (v2) takes a form body only (protocol.md 2.2); the JSON that LWA also
        takes is refused, so a client sending LWA's body to Cognito is caught."""
        client, _ = await start()
        response = await client.token_response(
            "demo-v2-id", "demo-v2-secret", family="v2", style="json"
        )
        assert response.status == 400
        assert response.json()["error"] == "invalid_request"

    @pytest.mark.parametrize(
        "raw",
        [
            b'{"grant_type":' + b"1" * 5000 + b"}",
            b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            b'{"grant_type":"client_credentials","client_id":"demo-id","client_secret":"\\ud800"}',
            b'{"grant_type":"client_credentials","client_id":"demo-id","client_secret":NaN}',
        ],
    )
    async def test_a_token_body_no_json_reader_takes_is_invalid_request(
        self, start: Start, raw: bytes
    ) -> None:
        """An integer of 5,000 digits, nesting 100,000 deep, half a surrogate pair or NaN in
        a token request is 400 invalid_request, as any body that is no JSON; each was a 500
        and a traceback, or an invalid_client."""
        client, _ = await start()
        headers = {"content-type": "application/json"}
        response = await client.post("/auth/o2/token", data=raw, headers=headers)
        assert response.status == 400
        assert response.json()["error"] == "invalid_request"

    @pytest.mark.parametrize(
        ("client_id", "secret", "family"),
        [
            ("demo-id", "wrong", "v3"),
            ("nobody", "demo-secret", "v3"),
            ("demo-v2-id", "demo-v2-secret", "v3"),
            ("demo-id", "demo-secret", "v2"),
            ("DEMOACCESSKEY", "demo-secret-key", "v3"),
        ],
    )
    async def test_invalid_client(
        self, start: Start, client_id: str, secret: str, family: str
    ) -> None:
        """A wrong secret, unknown id or a key of the other family is 401 invalid_client."""
        client, _ = await start()
        response = await client.token_response(client_id, secret, family=family)
        assert response.status == 401
        assert response.json()["error"] == "invalid_client"
        assert response.json()["error_description"] == "Client authentication failed"

    async def test_invalid_client_status_knob(self, start: Start) -> None:
        """invalid_client_status changes the status of invalid_client answers."""
        client, _ = await start(replace(OPEN, invalid_client_status=400))
        response = await client.token_response("demo-id", "wrong")
        assert response.status == 400

    @pytest.mark.parametrize(
        ("fields", "error"),
        [
            ({"grant_type": "client_credentials", "scope": "creatorsapi/default"}, "invalid_scope"),
            ({"grant_type": "password"}, "unsupported_grant_type"),
            ({}, "invalid_request"),
            ({"grant_type": "client_credentials", "client_secret": None}, "invalid_request"),
        ],
    )
    async def test_oauth_errors(self, start: Start, fields: dict[str, object], error: str) -> None:
        """A wrong scope, grant type or missing parameter is a 400 OAuth2 error body."""
        client, _ = await start()
        body: dict[str, object] = {"client_id": "demo-id", "client_secret": "demo-secret"}
        body.update(fields)
        body = {k: v for k, v in body.items() if v is not None}
        response = await client.post(
            "/auth/o2/token", data=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        assert response.status == 400
        assert response.json()["error"] == error

    async def test_token_lifetime_setting(self, start: Start) -> None:
        """token_lifetime_s sets expires_in, rounded down: 1.5 s said 2, and a client
        trusting it met TokenExpired first."""
        client, _ = await start(replace(OPEN, token_lifetime_s=120))
        response = await client.token_response("demo-id", "demo-secret")
        assert response.json()["expires_in"] == 120
        client, _ = await start(replace(OPEN, token_lifetime_s=1.5))
        response = await client.token_response("demo-id", "demo-secret")
        assert response.json()["expires_in"] == 1


class TestAuthorization:
    async def test_missing_credential(self, start: Start) -> None:
        """No Authorization header is 401 MissingCredential."""
        client, _ = await start()
        response = await _get(client, None, [ASIN])
        assert response.status == 401
        assert response.json() == {
            "type": "UnauthorizedException",
            "message": "Missing authentication credentials.",
            "reason": "MissingCredential",
        }
        UnauthorizedExceptionResponseContent.from_json(response.text)

    @pytest.mark.parametrize("token", ["never-issued", "Atc|forged", "a b c"])
    async def test_invalid_token(self, start: Start, token: str) -> None:
        """A token the simulator never issued is 401 InvalidToken."""
        client, _ = await start()
        response = await _get(client, token, [ASIN])
        assert response.status == 401
        assert response.json()["reason"] == "InvalidToken"

    async def test_token_expires_on_the_simulator_clock(self, start: Start) -> None:
        """A token used after its lifetime is 401 TokenExpired; a new one works."""
        clock = FakeClock()
        client, _ = await start(replace(OPEN, token_lifetime_s=60), clock=clock)
        token = await client.token()
        assert (await _get(client, token, [ASIN])).status == 200
        await clock.advance(60.5)
        expired = await _get(client, token, [ASIN])
        assert expired.status == 401
        assert expired.json()["reason"] == "TokenExpired"
        assert expired.json()["message"] == "Authentication token has expired."
        assert (await _get(client, await client.token(), [ASIN])).status == 200

    @pytest.mark.parametrize(
        ("family", "version", "status"),
        [
            ("v2", "2.1", 200),
            ("v2", None, 401),
            ("v2", "2.2", 401),
            ("v2", "3.1", 401),
            ("v3", None, 200),
            ("v3", "3.1", 200),
            ("v3", "2.1", 401),
            ("v3", "3.2", 401),
        ],
    )
    async def test_version_must_match_the_token(
        self, start: Start, family: str, version: str | None, status: int
    ) -> None:
        """A v2 token needs its ', Version x.y'; another version or family is InvalidIssuer."""
        client, _ = await start()
        if family == "v2":
            token = await client.token("demo-v2-id", "demo-v2-secret", family="v2")
        else:
            token = await client.token()
        body = {"partnerTag": "demo-20", "itemIds": [ASIN]}
        response = await client.creators("getItems", body, token=token, version=version)
        assert response.status == status
        if status == 401:
            assert response.json()["reason"] == "InvalidIssuer"

    @pytest.mark.parametrize(
        ("version", "marketplace", "status"),
        [
            ("3.1", "www.amazon.com", 200),
            ("3.1", "www.amazon.de", 401),
            ("3.2", "www.amazon.de", 200),
            ("3.2", "www.amazon.com", 401),
            ("3.3", "www.amazon.co.jp", 200),
            ("3.3", "www.amazon.co.uk", 401),
        ],
    )
    async def test_a_token_serves_its_credential_version_s_region_only(
        self, start: Start, version: str, marketplace: str, status: int
    ) -> None:
        """A key's token used in a marketplace outside its version's region family is 401
        InvalidIssuer, as Amazon answers (protocol.md 2.1); it was served, so the broker's
        handling of that refusal was never met over the wire. The demo accounts serve every
        region (the starter config tags the demo key for the UK and Germany)."""
        tags = {marketplace: ("t-21",)}
        account = Account("k", "creators", "k-id", "k-secret", version, tags)
        client, _ = await start(replace(OPEN, accounts=(account,)))
        token = await client.token("k-id", "k-secret")
        body = {"partnerTag": "t-21", "itemIds": [ASIN]}
        response = await client.creators("getItems", body, token=token, marketplace=marketplace)
        assert response.status == status, response.text
        if status == 401:
            assert response.json()["reason"] == "InvalidIssuer"
        demo = await client.creators(
            "getItems",
            {"partnerTag": "demo-22", "itemIds": [ASIN]},
            token=await client.token(),
            marketplace="www.amazon.de",
        )
        assert demo.status == 200

    async def test_expired_token_injection(self, start: Start) -> None:
        """The expired_token fault answers a fresh token with 401 TokenExpired, and counts."""
        client, sim = await start(replace(OPEN, faults=FaultRates(expired_token=1.0)))
        response = await _get(client, await client.token(), [ASIN])
        assert response.status == 401
        assert response.json()["reason"] == "TokenExpired"
        assert sim.stats.faults["expired_token"] == 1

    async def test_not_eligible(self, start: Start) -> None:
        """An ineligible account gets the captured 403 AssociateNotEligible body."""
        settings = replace(OPEN, accounts=(_account("poor", not_eligible=True),))
        client, _ = await start(settings)
        token = await client.token("poor-id", "poor-secret")
        response = await client.creators(
            "getItems", {"partnerTag": "t-20", "itemIds": [ASIN]}, token=token
        )
        assert response.status == 403
        assert response.json() == {
            "type": "AccessDeniedException",
            "message": "Your account does not currently meet the eligibility requirements.",
            "reason": "AssociateNotEligible",
        }
        AccessDeniedExceptionResponseContent.from_json(response.text)


class TestValidation:
    async def test_unknown_operation(self, start: Start) -> None:
        """A path that is no operation is 400 ValidationException UnknownOperation."""
        client, _ = await start()
        response = await client.creators("getItem", {}, token=await client.token())
        assert response.status == 400
        assert response.json()["reason"] == "UnknownOperation"
        ValidationExceptionResponseContent.from_json(response.text)

    @pytest.mark.parametrize("marketplace", [None, "www.amazon.moon"])
    async def test_marketplace_header(self, start: Start, marketplace: str | None) -> None:
        """A missing or unknown x-marketplace is 400 FieldValidationFailed naming it."""
        client, _ = await start()
        body = {"partnerTag": "demo-20", "itemIds": [ASIN]}
        token = await client.token()
        response = await client.creators("getItems", body, token=token, marketplace=marketplace)
        assert response.status == 400
        assert response.json()["reason"] == "FieldValidationFailed"
        assert response.json()["fieldList"][0]["name"] == "x-marketplace"

    @pytest.mark.parametrize(
        ("extra", "status"),
        [
            ({"itemIdType": "ASIN", "currencyOfPreference": "EUR", "properties": {"a": "b"}}, 200),
            ({"languagesOfPreference": ["en_US"]}, 200),
            ({"itemIdType": "ISBN"}, 400),
            ({"itemIdType": 123}, 400),
            ({"currencyOfPreference": ["USD"]}, 400),
            ({"currencyOfPreference": "U" * 101}, 400),
            ({"properties": [1]}, 400),
            ({"properties": {"a": 1}}, 400),
        ],
    )
    async def test_optional_fields_are_typed_as_the_model_types_them(
        self, start: Start, extra: dict[str, object], status: int
    ) -> None:
        """getItems' optional fields of the wrong type or value (protocol.md 2.5) are 400
        FieldValidationFailed, as Amazon answers; they were ignored and served."""
        client, _ = await start()
        response = await _get(client, await client.token(), [ASIN], **extra)
        assert response.status == status, response.text
        if status == 400:
            assert response.json()["reason"] == "FieldValidationFailed"

    async def test_cannot_parse(self, start: Start) -> None:
        """A body that is not JSON is 400 CannotParse."""
        client, _ = await start()
        response = await client.creators("getItems", None, token=await client.token(), raw=b"{")
        assert response.status == 400
        assert response.json()["reason"] == "CannotParse"
        assert response.json()["message"].startswith("Unable to parse the request payload.")

    @pytest.mark.parametrize(
        ("operation", "raw"),
        [
            (
                "getItems",
                b'{"partnerTag":"demo-20","itemIds":["B000000001"],"x":' + b"1" * 5000 + b"}",
            ),
            ("getItems", b"[" * 100_000 + b"]" * 100_000),
            ("searchItems", b'{"partnerTag":"demo-20","keywords":"lamp","itemCount":1e400}'),
            ("searchItems", b'{"partnerTag":"demo-20","keywords":"lamp","minPrice":NaN}'),
            (
                "getVariations",
                b'{"partnerTag":"demo-20","asin":"B000000010","variationPage":1e400}',
            ),
            ("searchItems", b'{"partnerTag":"demo-20","keywords":"\\ud800"}'),
            ("searchItems", '{"partnerTag":"demo-20","keywords":"\\ud800"}'.encode("utf-16")),
            ("searchItems", '{"partnerTag":"demo-20","keywords":"\\ud800"}'.encode("utf-32-le")),
        ],
        ids=[
            "long-integer",
            "deep-nesting",
            "overflow",
            "nan",
            "overflow-page",
            "lone-surrogate",
            "lone-surrogate-utf16",
            "lone-surrogate-utf32",
        ],
    )
    async def test_a_body_no_json_reader_takes_is_cannot_parse(
        self, start: Start, operation: str, raw: bytes
    ) -> None:
        """An integer of 5,000 digits, nesting 100,000 deep, 1e400, NaN or half a surrogate
        pair is 400 CannotParse; each was a 500 and a traceback."""
        client, _ = await start()
        response = await client.creators(operation, None, token=await client.token(), raw=raw)
        assert response.status == 400
        assert response.json()["reason"] == "CannotParse"

    async def test_missing_partner_tag(self, start: Start) -> None:
        """A missing partnerTag is FieldValidationFailed with fieldList naming it."""
        client, _ = await start()
        response = await client.creators(
            "getItems", {"itemIds": [ASIN]}, token=await client.token()
        )
        assert response.status == 400
        assert response.json()["fieldList"][0]["name"] == "partnerTag"

    async def test_invalid_associate(self, start: Start) -> None:
        """A key not mapped to a store is 400 InvalidAssociate."""
        client, _ = await start(replace(OPEN, accounts=(_account("lost", no_store=True),)))
        token = await client.token("lost-id", "lost-secret")
        response = await client.creators(
            "getItems", {"partnerTag": "t-20", "itemIds": [ASIN]}, token=token
        )
        assert response.status == 400
        assert response.json()["reason"] == "InvalidAssociate"

    @pytest.mark.parametrize(
        ("tag", "marketplace"),
        [
            ("other-20", "www.amazon.com"),
            ("demo-20", "www.amazon.co.uk"),
            ("demo-20", "www.amazon.fr"),
        ],
    )
    async def test_invalid_partner_tag(self, start: Start, tag: str, marketplace: str) -> None:
        """A tag that is not this key's in this marketplace is 400 InvalidPartnerTag."""
        client, _ = await start()
        body = {"partnerTag": tag, "itemIds": [ASIN]}
        token = await client.token()
        response = await client.creators("getItems", body, token=token, marketplace=marketplace)
        assert response.status == 400
        assert response.json()["reason"] == "InvalidPartnerTag"

    @pytest.mark.parametrize("ids", [[], [*ITEMS, "B0XXXXXXXX"]])
    async def test_item_count_bounds(self, start: Start, ids: list[str]) -> None:
        """0 or more than 10 itemIds is FieldValidationFailed with an object fieldList."""
        client, _ = await start()
        response = await _get(client, await client.token(), ids)
        assert response.status == 400
        body = response.json()
        assert body["reason"] == "FieldValidationFailed"
        assert body["message"] == "Request validation failed."
        assert body["fieldList"][0]["name"] == "itemIds"
        assert isinstance(body["fieldList"][0]["message"], str)
        ValidationExceptionResponseContent.from_json(response.text)

    async def test_field_list_strings_knob(self, start: Start) -> None:
        """field_list_style = strings sends fieldList as bare names."""
        client, _ = await start(replace(OPEN, field_list_style="strings"))
        response = await _get(client, await client.token(), [])
        assert response.json()["fieldList"] == ["itemIds"]

    async def test_unknown_resource(self, start: Start) -> None:
        """A resource name outside the enum (e.g. PA-API spelling) fails validation."""
        client, _ = await start()
        response = await _get(client, await client.token(), [ASIN], resources=["ItemInfo.Title"])
        assert response.status == 400
        assert response.json()["fieldList"][0]["name"] == "resources"

    @pytest.mark.parametrize(
        ("operation", "body", "field"),
        [
            ("getItems", {"itemIds": [ASIN], "condition": "Used"}, "condition"),
            ("searchItems", {"keywords": "lamp", "condition": "Refurbished"}, "condition"),
            ("searchItems", {"keywords": "lamp", "minPrice": 0}, "minPrice"),
            ("searchItems", {"keywords": "lamp", "maxPrice": 0}, "maxPrice"),
            ("searchItems", {"keywords": "x" * 1001}, "keywords"),
            ("searchItems", {"browseNodeId": "not-a-node"}, "browseNodeId"),
            ("searchItems", {"keywords": "lamp", "availability": "Sometimes"}, "availability"),
            ("searchItems", {"keywords": "lamp", "deliveryFlags": ["Teleport"]}, "deliveryFlags"),
            ("searchItems", {"keywords": "lamp", "minReviewsRating": 9}, "minReviewsRating"),
            ("searchItems", {"keywords": "lamp", "minSavingPercent": 150}, "minSavingPercent"),
            (
                "searchItems",
                {"keywords": "lamp", "languagesOfPreference": ["en_US", "de_DE"]},
                "languagesOfPreference",
            ),
            (
                "getVariations",
                {"asin": ASIN, "languagesOfPreference": ["en_US", "de_DE"]},
                "languagesOfPreference",
            ),
            ("getItems", {"itemIds": [ASIN], "condition": ["New"]}, "condition"),
            ("searchItems", {"keywords": "lamp", "availability": {"a": 1}}, "availability"),
            ("searchItems", {"keywords": "lamp", "sortBy": ["Relevance"]}, "sortBy"),
        ],
    )
    async def test_field_rules(
        self, start: Start, operation: str, body: dict[str, object], field: str
    ) -> None:
        """condition is Any or New; minPrice/maxPrice are at least 1; search terms at most
        1000 characters (a node id 19 digits); availability, deliveryFlags, minReviewsRating
        1..4, minSavingPercent 1..99 and one language at most, as protocol.md 2.5 says."""
        client, _ = await start()
        token = await client.token()
        response = await client.creators(operation, {"partnerTag": "demo-20", **body}, token=token)
        assert response.status == 400
        assert response.json()["fieldList"][0]["name"] == field

    async def test_unknown_body_fields_are_ignored(self, start: Start) -> None:
        """Documented extras (itemIdType, marketplace, operation) are accepted."""
        client, _ = await start()
        extra = {"itemIdType": "ASIN", "marketplace": "www.amazon.com", "operation": "GetItems"}
        response = await _get(client, await client.token(), [ASIN], **extra)
        assert response.status == 200


class TestGetItems:
    async def test_items_match_the_catalogue(self, start: Start) -> None:
        """Every served item is exactly render_item's, with no errors key when all are good."""
        client, _ = await start()
        resources = sorted(CREATORS_ITEM_RESOURCES)
        response = await _get(client, await client.token(), ITEMS, resources=resources)
        body = response.json()
        assert response.status == 200
        assert "errors" not in body
        items = {item["asin"]: item for item in body["itemsResult"]["items"]}
        assert set(items) == set(ITEMS)
        for asin in ITEMS:
            expected = render_item(
                OPEN, "www.amazon.com", asin, resources=resources, partner_tag="demo-20"
            )
            assert items[asin] == expected
        parsed = GetItemsResponseContent.from_json(response.text)
        assert parsed is not None
        assert parsed.items_result is not None
        assert len(parsed.items_result.items or []) == 10

    async def test_unrequested_members_are_null(self, start: Start) -> None:
        """Only requested members are filled; the rest are explicit nulls; highRes is hiRes."""
        client, _ = await start()
        resources = ["itemInfo.title", "images.primary.highRes"]
        response = await _get(client, await client.token(), [ASIN], resources=resources)
        item = response.json()["itemsResult"]["items"][0]
        assert item["offersV2"] is None
        assert item["browseNodeInfo"] is None
        assert item["itemInfo"]["features"] is None
        assert item["itemInfo"]["title"]["label"] == "Title"
        assert item["images"]["primary"]["small"] is None
        assert item["images"]["primary"]["hiRes"]["url"].startswith("https://m.media-amazon.com/")
        assert item["detailPageURL"] == (
            f"https://www.amazon.com/dp/{ASIN}?tag=demo-20&linkCode=ogi&th=1&psc=1"
        )

    async def test_default_resources_title_only(self, start: Start) -> None:
        """Without resources, only itemInfo.title is returned."""
        client, _ = await start()
        item = (await _get(client, await client.token(), [ASIN])).json()["itemsResult"]["items"][0]
        assert item["itemInfo"]["title"] is not None
        assert item["offersV2"] is None

    async def test_explicit_nulls_off(self, start: Start) -> None:
        """explicit_nulls = false omits unrequested members."""
        client, _ = await start(replace(OPEN, explicit_nulls=False))
        item = (await _get(client, await client.token(), [ASIN])).json()["itemsResult"]["items"][0]
        assert set(item) == {"asin", "detailPageURL", "itemInfo"}
        assert set(item["itemInfo"]) == {"title"}

    async def test_price_in_marketplace_currency(self, start: Start) -> None:
        """offersV2 prices use the marketplace's currency and the partner tag of that store."""
        client, _ = await start()
        token = await client.token()
        body = {
            "partnerTag": "demo-22",
            "itemIds": [ASIN],
            "resources": ["offersV2.listings.price"],
        }
        response = await client.creators("getItems", body, token=token, marketplace="www.amazon.de")
        item = response.json()["itemsResult"]["items"][0]
        money = item["offersV2"]["listings"][0]["price"]["money"]
        assert money["currency"] == "EUR"
        assert money["displayAmount"].endswith(" €")
        assert "tag=demo-22" in item["detailPageURL"]

    async def test_partial_success(self, start: Start) -> None:
        """Unknown and malformed ids come back in errors beside the good items, naming the id."""
        settings = replace(OPEN, missing_share=0.5)
        client, _ = await start(settings)
        missing = [a for a in ITEMS if lookup(settings, "www.amazon.com", a).status == "not_found"]
        present = [a for a in ITEMS if a not in missing]
        assert missing
        assert present
        response = await _get(client, await client.token(), [*ITEMS[:9], "bad!"])
        body = response.json()
        assert response.status == 200
        served = {item["asin"] for item in body["itemsResult"]["items"]}
        assert served == set(present[: len(served)]) | (served & set(present))
        assert served.isdisjoint(missing)
        messages = [e["message"] for e in body["errors"]]
        assert all(e["code"] == "InvalidParameterValue" for e in body["errors"])
        for asin in [*[a for a in missing if a in ITEMS[:9]], "bad!"]:
            assert f"The ItemIds {asin} provided in the request is invalid." in messages
        GetItemsResponseContent.from_json(response.text)

    async def test_not_accessible(self, start: Start) -> None:
        """Inaccessible items are ItemNotAccessible errors with the documented message."""
        settings = replace(OPEN, inaccessible_share=0.5)
        client, _ = await start(settings)
        hidden = [a for a in ITEMS if lookup(settings, "www.amazon.com", a).status != "ok"]
        response = await _get(client, await client.token(), ITEMS)
        errors = response.json()["errors"]
        assert {e["message"] for e in errors} == {
            f"The ItemId {a} is not accessible through the Creators API." for a in hidden
        }

    async def test_all_bad_is_404(self, start: Start) -> None:
        """When no id is good the answer is 404 ResourceNotFoundException naming them."""
        client, _ = await start(replace(OPEN, missing_share=1.0))
        response = await _get(client, await client.token(), ["B08N5WRWNW"])
        assert response.status == 404
        assert response.json() == {
            "type": "ResourceNotFoundException",
            "message": "No items found for the requested item IDs.",
            "resourceType": "Item",
            "resourceId": "B08N5WRWNW",
        }
        ResourceNotFoundExceptionResponseContent.from_json(response.text)

    @pytest.mark.parametrize(("knob", "status"), [(True, 404), (False, 200)])
    async def test_all_inaccessible_knob(self, start: Start, knob: bool, status: int) -> None:
        """not_found_when_all_inaccessible decides 404 vs 200 errors-only."""
        settings = replace(OPEN, inaccessible_share=1.0, not_found_when_all_inaccessible=knob)
        client, _ = await start(settings)
        response = await _get(client, await client.token(), [ASIN])
        assert response.status == status
        if status == 200:
            assert set(response.json()) == {"errors"}

    async def test_items_container_knob(self, start: Start) -> None:
        """items_container = itemResults renames the container, as one docs page shows."""
        client, _ = await start(replace(OPEN, items_container="itemResults"))
        body = (await _get(client, await client.token(), [ASIN])).json()
        assert "itemResults" in body
        assert "itemsResult" not in body

    async def test_item_order_is_shuffled(self, start: Start) -> None:
        """Items come back in shuffled order by default, in request order when switched off."""
        client, _ = await start()
        token = await client.token()
        orders = set()
        for _ in range(5):
            body = (await _get(client, token, ITEMS)).json()
            orders.add(tuple(i["asin"] for i in body["itemsResult"]["items"]))
        assert len(orders) > 1
        client, _ = await start(replace(OPEN, shuffle_items=False))
        body = (await _get(client, await client.token(), ITEMS)).json()
        assert [i["asin"] for i in body["itemsResult"]["items"]] == ITEMS

    async def test_duplicates_and_case(self, start: Start) -> None:
        """A repeated id is served once and a lower-case id upper-cased."""
        client, sim = await start()
        body = (await _get(client, await client.token(), [ASIN, ASIN, ASIN.lower()])).json()
        assert [i["asin"] for i in body["itemsResult"]["items"]] == [ASIN]
        assert sim.stats.accounts["demo"].items_served == 1


#: A search whose items name their brand, with the refinements.
_BRAND_SEARCH = {
    "partnerTag": "demo-20",
    "keywords": "kettle",
    "itemCount": 10,
    "resources": ["itemInfo.byLineInfo", "searchRefinements"],
}


class TestOtherOperations:
    async def test_search_items(self, start: Start) -> None:
        """searchItems returns searchResult with items and a total count."""
        client, _ = await start()
        body = {"partnerTag": "demo-20", "keywords": "kettle", "itemCount": 5}
        response = await client.creators("searchItems", body, token=await client.token())
        assert response.status == 200
        result = response.json()["searchResult"]
        assert len(result["items"]) == 5
        assert result["totalResultCount"] >= 5
        SearchItemsResponseContent.from_json(response.text)

    async def test_search_refinements_when_asked(self, start: Start) -> None:
        """resources searchRefinements adds searchResult.searchRefinements in the SDK's shape:
        the departments (search index, root browse node) of the items found, and their
        brands; without it there are none."""
        client, _ = await start()
        body = {"partnerTag": "demo-20", "keywords": "kettle", "itemCount": 10}
        token = await client.token()
        plain = (await client.creators("searchItems", body, token=token)).json()
        assert "searchRefinements" not in plain["searchResult"]
        asked = {**body, "resources": ["itemInfo.title", "searchRefinements"]}
        response = await client.creators("searchItems", asked, token=token)
        parsed = SearchItemsResponseContent.from_json(response.text)
        assert parsed is not None
        assert parsed.search_result is not None
        found = parsed.search_result.search_refinements
        assert found is not None
        assert found.browse_node is not None
        assert found.search_index is not None
        assert found.browse_node.bins
        assert all(b.id and b.display_name for b in found.browse_node.bins)
        assert len(found.search_index.bins or []) == len(found.browse_node.bins)
        (brand,) = found.other_refinements or []
        assert brand.id == "Brand"
        assert brand.bins

    async def test_search_narrowed_by_a_brand_refinement(self, start: Start) -> None:
        """brand narrows a search to that brand's items, as following a Brand refinement
        bin does on Amazon: fewer results, every one of the brand (it widened the search,
        as one more search term, from 386 results to 904)."""
        client, _ = await start()
        token = await client.token()
        body = _BRAND_SEARCH
        plain = (await client.creators("searchItems", body, token=token)).json()["searchResult"]
        (brands,) = plain["searchRefinements"]["otherRefinements"]
        chosen = brands["bins"][0]["id"]
        narrowed = await client.creators("searchItems", {**body, "brand": chosen}, token=token)
        assert narrowed.status == 200
        result = narrowed.json()["searchResult"]
        assert 0 < result["totalResultCount"] < plain["totalResultCount"]
        assert {i["itemInfo"]["byLineInfo"]["brand"]["displayValue"] for i in result["items"]} == {
            chosen
        }

    async def test_search_refinements_describe_the_whole_search(self, start: Start) -> None:
        """Every page of a search gives the same refinements, those of all its results: the
        brands of page 1 were 3 of the search's 14, and page 2 named others."""
        client, _ = await start()
        token = await client.token()
        body = _BRAND_SEARCH
        pages = [
            (await client.creators("searchItems", {**body, "itemPage": n}, token=token)).json()
            for n in (1, 2, 3)
        ]
        refinements = [page["searchResult"]["searchRefinements"] for page in pages]
        assert refinements[0] == refinements[1] == refinements[2]
        (brands,) = refinements[0]["otherRefinements"]
        named = {b["id"] for b in brands["bins"]}
        seen = [
            {
                i["itemInfo"]["byLineInfo"]["brand"]["displayValue"]
                for i in page["searchResult"]["items"]
            }
            for page in pages
        ]
        assert set.union(*seen) <= named
        assert len(named) > len(seen[0])

    @pytest.mark.parametrize(
        ("option", "value", "kept"),
        [
            ("minReviewsRating", 4, lambda i: i["customerReviews"]["starRating"]["value"] >= 4),
            (
                "minSavingPercent",
                30,
                lambda i: i["offersV2"]["listings"][0]["price"]["savings"]["percentage"] >= 30,
            ),
            (
                "deliveryFlags",
                ["Prime"],
                lambda i: i["offersV2"]["listings"][0]["merchantInfo"]["id"] == "ATVPDKIKX0DER",
            ),
            (
                "availability",
                "Available",
                lambda i: i["offersV2"]["listings"][0]["availability"]["type"] != "OUT_OF_STOCK",
            ),
        ],
    )
    async def test_search_narrowed_by_its_filters(
        self, start: Start, option: str, value: object, kept: Any
    ) -> None:
        """minReviewsRating, minSavingPercent, deliveryFlags and availability narrow a search
        (they were checked, then ignored): fewer results, each one as asked."""
        client, _ = await start()
        token = await client.token()
        body = {
            "partnerTag": "demo-20",
            "keywords": "kettle",
            "itemCount": 50,
            "availability": "IncludeOutOfStock",
            "resources": [
                "customerReviews.starRating",
                "offersV2.listings.price",
                "offersV2.listings.merchantInfo",
                "offersV2.listings.availability",
            ],
        }
        wide = (await client.creators("searchItems", body, token=token)).json()["searchResult"]
        response = await client.creators("searchItems", {**body, option: value}, token=token)
        assert response.status == 200
        narrow = response.json()["searchResult"]
        assert 0 < narrow["totalResultCount"] < wide["totalResultCount"]
        assert all(kept(item) for item in narrow["items"])

    def test_a_search_with_accounts_of_its_own(self) -> None:
        """A simulator given accounts of its own (``[[simulator.accounts]]``) searches: its
        settings keyed the search's cache, and an account's dict of partner tags made every
        SearchItems a 500."""
        from conftest import account

        own = SimulatorSettings(accounts=(account("mine", "mine-id", "mine-secret"),))
        assert hash(own) == hash(SimulatorSettings())
        found = search_results(own, "www.amazon.com", "kettle")
        assert found == search_results(SimulatorSettings(), "www.amazon.com", "kettle")
        assert found

    async def test_a_null_filter_is_no_filter(self, start: Start) -> None:
        """minSavingPercent or minReviewsRating null narrows nothing, as a null is absent
        everywhere else (it narrowed as a 1)."""
        client, _ = await start()
        token = await client.token()
        body = {"partnerTag": "demo-20", "keywords": "kettle", "itemCount": 10}
        plain = (await client.creators("searchItems", body, token=token)).json()
        for field in ("minSavingPercent", "minReviewsRating"):
            nulled = await client.creators("searchItems", {**body, field: None}, token=token)
            assert nulled.json()["searchResult"] == plain["searchResult"]

    async def test_search_leaves_out_of_stock_items_out_by_default(self, start: Start) -> None:
        """Amazon's default availability is Available: a search without it finds what
        availability Available finds, and IncludeOutOfStock finds more."""
        client, _ = await start()
        token = await client.token()
        body = {"partnerTag": "demo-20", "keywords": "kettle", "itemCount": 10}
        totals = [
            (await client.creators("searchItems", {**body, **extra}, token=token)).json()[
                "searchResult"
            ]["totalResultCount"]
            for extra in ({}, {"availability": "Available"}, {"availability": "IncludeOutOfStock"})
        ]
        assert totals[0] == totals[1] < totals[2]

    @pytest.mark.parametrize(
        ("order", "descending"), [("Price:LowToHigh", False), ("Price:HighToLow", True)]
    )
    async def test_search_sorts_and_filters_by_price(
        self, start: Start, order: str, descending: bool
    ) -> None:
        """sortBy orders by the featured price; minPrice/maxPrice (cents) bound it."""
        client, _ = await start()
        body = {
            "partnerTag": "demo-20",
            "keywords": "kettle",
            "itemCount": 10,
            "resources": ["offersV2.listings.price"],
            "sortBy": order,
            "minPrice": 2000,
            "maxPrice": 9000,
        }
        response = await client.creators("searchItems", body, token=await client.token())
        assert response.status == 200
        result = response.json()["searchResult"]
        prices = [i["offersV2"]["listings"][0]["price"]["money"]["amount"] for i in result["items"]]
        assert prices
        assert prices == sorted(prices, reverse=descending)
        assert all(20.0 <= p <= 90.0 for p in prices)
        assert result["totalResultCount"] >= len(prices)

    async def test_search_refuses_an_unknown_sort(self, start: Start) -> None:
        """An unknown sortBy value is a 400 naming the field."""
        client, _ = await start()
        body = {"partnerTag": "demo-20", "keywords": "kettle", "sortBy": "Cheapest"}
        response = await client.creators("searchItems", body, token=await client.token())
        assert response.status == 400
        assert "sortBy" in response.text

    async def test_search_without_results(self, start: Start) -> None:
        """A search with no hits is 404 with resourceType SearchResult."""
        client, _ = await start()
        body = {"partnerTag": "demo-20", "keywords": "noresults at all"}
        response = await client.creators("searchItems", body, token=await client.token())
        assert response.status == 404
        assert response.json()["resourceType"] == "SearchResult"

    async def test_get_variations(self, start: Start) -> None:
        """getVariations returns child items with variationAttributes and a summary."""
        client, _ = await start()
        body = {
            "partnerTag": "demo-20",
            "asin": ASIN,
            "resources": ["itemInfo.title", "parentASIN", "variationSummary.variationDimension"],
        }
        response = await client.creators("getVariations", body, token=await client.token())
        assert response.status == 200
        result = response.json()["variationsResult"]
        assert result["items"][0]["variationAttributes"][0]["name"] == "color_name"
        assert result["variationSummary"]["variationCount"] >= 1
        GetVariationsResponseContent.from_json(response.text)

    async def test_get_variations_sends_no_null_when_told_not_to(self, start: Start) -> None:
        """With explicit_nulls off, a variation not asked for parentASIN has no such member
        (with it on, the unrequested member is a null, as for every other member)."""
        body = {"partnerTag": "demo-20", "asin": ASIN, "resources": ["itemInfo.title"]}
        for nulls in (False, True):
            client, _ = await start(replace(OPEN, explicit_nulls=nulls))
            response = await client.creators("getVariations", body, token=await client.token())
            items = response.json()["variationsResult"]["items"]
            assert items
            if nulls:
                assert all(i["parentASIN"] is None for i in items)
            else:
                assert all("parentASIN" not in i for i in items)

    @pytest.mark.parametrize("nulls", [True, False])
    async def test_get_variations_gives_only_the_price_asked(
        self, start: Start, nulls: bool
    ) -> None:
        """variationSummary.price.lowestPrice alone: the lowest price, and the highest a
        null where nulls are sent (absent without them); both came back."""
        body = {
            "partnerTag": "demo-20",
            "asin": ASIN,
            "resources": ["variationSummary.price.lowestPrice"],
        }
        client, _ = await start(replace(OPEN, explicit_nulls=nulls))
        response = await client.creators("getVariations", body, token=await client.token())
        price = response.json()["variationsResult"]["variationSummary"]["price"]
        assert price["lowestPrice"]["amount"] > 0
        assert price == ({**price, "highestPrice": None} if nulls else {"lowestPrice": ANY})
        GetVariationsResponseContent.from_json(response.text)

    async def test_get_browse_nodes(self, start: Start) -> None:
        """getBrowseNodes returns nodes with ancestors and children; bad ids are errors."""
        client, _ = await start()
        body = {
            "partnerTag": "demo-20",
            "browseNodeIds": ["667846011", "abc"],
            "resources": ["browseNodes.ancestor", "browseNodes.children"],
        }
        response = await client.creators("getBrowseNodes", body, token=await client.token())
        assert response.status == 200
        result = response.json()
        node = result["browseNodesResult"]["browseNodes"][0]
        assert node["ancestor"]["id"] == "172282"
        assert node["children"][0]["id"] == "12097479011"
        assert result["errors"][0]["message"] == (
            "The BrowseNodeId abc provided in the request is invalid."
        )
        GetBrowseNodesResponseContent.from_json(response.text)


class TestQuota:
    async def test_one_transaction_per_request(self, start: Start) -> None:
        """At 1 TPS with burst 1 a second request in the same instant is 429, whatever its size."""
        clock = FakeClock()
        slow = replace(DEMO_ACCOUNTS[0], tps=1.0)
        client, sim = await start(SimulatorSettings(accounts=(slow,)), clock=clock)
        token = await client.token()
        assert (await _get(client, token, ITEMS)).status == 200
        throttled = await _get(client, token, [ASIN])
        assert throttled.status == 429
        assert throttled.json() == {
            "type": "ThrottleException",
            "message": "The request was denied due to request throttling. Please verify the "
            "number of requests made per second.",
        }
        assert "retry-after" not in throttled.headers
        ThrottleExceptionResponseContent.from_json(throttled.text)
        await clock.advance(1.0)
        assert (await _get(client, token, [ASIN])).status == 200
        stats = sim.stats.accounts["demo"]
        assert (stats.accepted, stats.throttled, stats.items_served) == (2, 1, 11)
        assert list(stats.throttled_at) == [clock.monotonic() - 1.0]

    async def test_burst(self, start: Start) -> None:
        """burst = 3 lets three requests through at once, then throttles."""
        clock = FakeClock()
        client, _ = await start(SimulatorSettings(burst=3), clock=clock)
        token = await client.token()
        statuses = [(await _get(client, token, [ASIN])).status for _ in range(4)]
        assert statuses == [200, 200, 200, 429]

    @pytest.mark.parametrize(
        ("style", "in_body", "in_header"),
        [("body", True, False), ("header", False, True), ("both", True, True)],
    )
    async def test_retry_after_knob(
        self, start: Start, style: str, in_body: bool, in_header: bool
    ) -> None:
        """retry_after puts retryAfterSeconds and/or Retry-After on a 429."""
        clock = FakeClock()
        settings = SimulatorSettings(retry_after=style, retry_after_s=7)  # type: ignore[arg-type]
        client, _ = await start(settings, clock=clock)
        token = await client.token()
        await _get(client, token, [ASIN])
        response = await _get(client, token, [ASIN])
        assert response.status == 429
        assert (response.json().get("retryAfterSeconds") == 7) is in_body
        assert (response.headers.get("retry-after") == "7") is in_header

    async def test_computed_retry_after(self, start: Start) -> None:
        """Without a fixed value, Retry-After is the wait until the bucket refills, rounded up."""
        clock = FakeClock()
        slow = replace(DEMO_ACCOUNTS[0], tps=0.25)
        client, _ = await start(
            SimulatorSettings(accounts=(slow,), retry_after="both"), clock=clock
        )
        token = await client.token()
        await _get(client, token, [ASIN])
        await clock.advance(1.5)
        response = await _get(client, token, [ASIN])
        assert response.json()["retryAfterSeconds"] == 3
        assert response.headers["retry-after"] == "3"

    async def test_daily_quota_resets_at_midnight_utc(self, start: Start) -> None:
        """After TPD requests the key is throttled until 00:00 UTC of the simulator clock."""
        clock = FakeClock()
        limited = replace(DEMO_ACCOUNTS[0], tps=100.0, tpd=2)
        client, sim = await start(SimulatorSettings(accounts=(limited,)), clock=clock)
        token = await client.token()
        assert (await _get(client, token, [ASIN])).status == 200
        await clock.advance(1)
        assert (await _get(client, token, [ASIN])).status == 200
        await clock.advance(59)
        assert (await _get(client, token, [ASIN])).status == 429
        # The fake epoch is 12:00 UTC; midnight is 12 hours (minus the minute) away.
        await clock.advance(12 * 3600 - 61)
        assert (await _get(client, await client.token(), [ASIN])).status == 429
        await clock.advance(2)
        assert (await _get(client, await client.token(), [ASIN])).status == 200
        assert sim.quotas["demo"].used_on(sim.wall()) == 1

    async def test_limits_off(self, start: Start) -> None:
        """limits = false never throttles, but still counts accepted requests."""
        client, sim = await start(SimulatorSettings(limits=False))
        token = await client.token()
        assert {(await _get(client, token, [ASIN])).status for _ in range(20)} == {200}
        assert sim.stats.accounts["demo"].accepted == 20

    async def test_only_authenticated_requests_count(self, start: Start) -> None:
        """Requests with a bad token or an unknown operation do not use the quota."""
        clock = FakeClock()
        client, sim = await start(SimulatorSettings(), clock=clock)
        for _ in range(3):
            await _get(client, "forged", [ASIN])
        assert sim.stats.accounts["demo"].accepted == 0
        assert sim.stats.unattributed_errors["InvalidToken"] == 3
        assert (await _get(client, await client.token(), [ASIN])).status == 200


class TestHeaders:
    async def test_request_id_and_skewed_date_everywhere(self, start: Start) -> None:
        """Every response, errors and token answers included, has x-amzn-RequestId and Date."""
        clock = FakeClock()
        client, _ = await start(replace(OPEN, clock_skew_s=3600), clock=clock)
        responses = [
            await client.token_response("demo-id", "demo-secret"),
            await client.token_response("demo-id", "bad"),
            await _get(client, "forged", [ASIN]),
            await client.get("/_sim/stats"),
        ]
        ids = {r.headers["x-amzn-requestid"] for r in responses}
        assert len(ids) == len(responses)
        assert {r.headers["date"] for r in responses} == {"Fri, 01 May 2026 13:00:00 GMT"}
