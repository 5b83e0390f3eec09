"""The PA-API 5.0 front end: host-chosen marketplace, SigV4 verification and PascalCase shapes.

A call to ``POST /paapi5/<operation>`` is checked in this order, each step answering with the
code of protocol.md 3.5: the retired switch (403 AccessDenied, deprecation message), path and
``X-Amz-Target`` (404 UnknownOperation), the Authorization header's parts (400
IncompleteSignature), the access key (401 UnrecognizedClient), ``x-amz-date`` within 15 minutes
of the simulator's skewed clock (401 RequestExpired), the signature over the SignedHeaders the
client listed and the exact body bytes (401 InvalidSignature), the key's flags (403
AccessDeniedAwsUsers / AccessDenied), its quota (429 TooManyRequests), injected faults, then the
operation (400 MissingParameter / InvalidParameterValue / InvalidPartnerTag, 403
InvalidAssociate, or 200 with optional per-item ``Errors``).
"""

from __future__ import annotations

import hmac
import json
from datetime import UTC, datetime
from hashlib import sha256
from typing import TYPE_CHECKING

from broker.api.sigv4 import (
    ALGORITHM,
    SERVICE,
    canonical_request,
    credential_scope,
    derive_signing_key,
    parse_authorization,
    signature,
    string_to_sign,
)
from broker.simulator.faults import (
    ITEM_FAULTS,
    WRITE_FAULTS,
    Reply,
    bad_shape_reply,
    html_page,
)
from broker.simulator.marketplaces import MARKETPLACES, MARKETPLACES_BY_HOST, Marketplace
from broker.simulator.operations import (
    RESULT_NAMES,
    Context,
    ItemError,
    Names,
    Rejected,
    run_operation,
)
from broker.simulator.requestbody import read_body

if TYPE_CHECKING:
    from aiohttp import web

    from broker.simulator.accounts import Account
    from broker.simulator.state import Simulator

__all__ = ["OPERATIONS", "TARGET_PREFIX", "handle"]

TARGET_PREFIX = "com.amazon.paapi5.v1.ProductAdvertisingAPIv1."
#: path segment -> (X-Amz-Target operation, operation name of operations.py)
OPERATIONS = {
    "getitems": ("GetItems", "getItems"),
    "searchitems": ("SearchItems", "searchItems"),
    "getvariations": ("GetVariations", "getVariations"),
    "getbrowsenodes": ("GetBrowseNodes", "getBrowseNodes"),
}
_NAMES = Names("paapi5")
_WINDOW_S = 15 * 60
_KEY_CACHE_SIZE = 256

_RETIRED = (
    "Product Advertising API is deprecated. Please migrate to Creators API using the "
    "migration guide at https://affiliate-program.amazon.com/creatorsapi/docs/en-us/"
    "migrating-to-creatorsapi-from-paapi."
)
# code -> (HTTP status, exception name, message)
_ERRORS: dict[str, tuple[int, str, str]] = {
    "UnknownOperation": (
        404,
        "UnknownOperationException",
        "The requested operation is not supported. Please verify that your "
        "request is valid and X-Amz-Target header is set correctly.",
    ),
    "IncompleteSignature": (
        400,
        "IncompleteSignatureException",
        "The request signature did not include all of the required components.",
    ),
    "UnrecognizedClient": (
        401,
        "UnrecognizedClientException",
        "The Access Key or security token included in the request is invalid.",
    ),
    "RequestExpired": (
        401,
        "RequestExpiredException",
        "The request is past expiry date or the request date (either with 15 "
        "minute padding), or the request date occurs more than 15 minutes in "
        "the future.",
    ),
    "InvalidSignature": (
        401,
        "InvalidSignatureException",
        "The request signature we calculated does not match the signature "
        "you provided. Check your AWS Secret Access Key and signing method. "
        "Consult the service documentation for details.",
    ),
    "AccessDeniedAwsUsers": (
        403,
        "AccessDeniedException",
        "The Access Key Id provided in the request belongs to AWS, not to "
        "the Product Advertising API. Please use the credentials from "
        "Associates Central.",
    ),
    "AccessDenied": (
        403,
        "AccessDeniedException",
        "The Access Key Id is not enabled to access Product Advertising API. "
        "Please migrate your Access Key Id to the Product Advertising API.",
    ),
    "InvalidAssociate": (
        403,
        "AssociateValidationException",
        "Your access key is not mapped to Primary of approved associate "
        "store. Please visit associate central at "
        "https://affiliate-program.amazon.com/.",
    ),
    "InvalidPartnerTag": (
        400,
        "InvalidPartnerTagException",
        "The partner tag is invalid or not present. Please visit Associates "
        "Central to find your valid partner tag.",
    ),
    "TooManyRequests": (
        429,
        "TooManyRequestsException",
        "The request was denied due to request throttling. Please verify the "
        "number of requests made per second to the Amazon Product Advertising "
        "API.",
    ),
    "InternalFailure": (
        500,
        "InternalFailureException",
        "The request processing has failed because of an unknown error, exception or failure.",
    ),
    "ServiceUnavailable": (
        503,
        "ServiceUnavailableException",
        "The service is currently unavailable. Please try again later.",
    ),
}


def _envelope(
    status: int, exception: str, code: str, message: str, headers: dict[str, str] | None = None
) -> Reply:
    body = {
        "__type": f"com.amazon.paapi5#{exception}",
        "Errors": [{"Code": code, "Message": message}],
    }
    return Reply(status, json.dumps(body, separators=(",", ":")).encode(), headers=headers or {})


def _error(
    sim: Simulator,
    account: str | None,
    code: str,
    message: str | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    status, exception, default = _ERRORS[code]
    sim.stats.error(account, code)
    return _envelope(status, exception, code, message or default, headers)


def _server_error(sim: Simulator, kind: str) -> Reply:
    """The reply of an injected fault (counted by the caller, so not counted here)."""
    if kind == "html":
        return html_page(sim.faults.html_status())
    status = int(kind.removeprefix("error_"))
    if status in (500, 503):
        code = "InternalFailure" if status == 500 else "ServiceUnavailable"
        _, exception, message = _ERRORS[code]
        return _envelope(status, exception, code, message)
    message = "Bad Gateway" if status == 502 else "Gateway Timeout"
    return Reply(status, json.dumps({"message": message}).encode())


class _KeyCache:
    """Derived SigV4 signing keys by (secret, day, region): four HMACs saved per request."""

    __slots__ = ("_keys",)

    def __init__(self) -> None:
        self._keys: dict[tuple[str, str, str], bytes] = {}

    def get(self, secret: str, date_stamp: str, region: str) -> bytes:
        cache_key = (secret, date_stamp, region)
        key = self._keys.get(cache_key)
        if key is None:
            if len(self._keys) >= _KEY_CACHE_SIZE:
                self._keys.clear()
            key = self._keys[cache_key] = derive_signing_key(secret, date_stamp, region, SERVICE)
        return key


_KEYS = _KeyCache()


def _host(request: web.Request) -> str:
    host = request.headers.get("Host", "").strip().lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.partition(":")[0]


def _marketplace(sim: Simulator, request: web.Request, body: object) -> Marketplace:
    known = MARKETPLACES_BY_HOST.get(_host(request))
    if known is not None:
        return known
    # A client talking to the simulator's own address names no Amazon host; its body's
    # Marketplace (if any) says which store it means, else the configured default host.
    if isinstance(body, dict):
        named = body.get("Marketplace")
        if isinstance(named, str) and named in MARKETPLACES:
            return MARKETPLACES[named]
    return MARKETPLACES_BY_HOST[sim.settings.paapi_default_host]


async def handle(request: web.Request, sim: Simulator) -> tuple[Reply, str | None]:
    """Answer one PA-API call; returns the reply and the write fault (if any)."""
    if sim.settings.paapi_retired:
        sim.stats.error(None, "AccessDenied")
        return _envelope(403, "AccessDeniedException", "AccessDenied", _RETIRED), None
    operation = OPERATIONS.get(request.match_info.get("operation", "").lower())
    target = request.headers.get("X-Amz-Target", "")
    if operation is None or target != TARGET_PREFIX + operation[0]:
        return _error(sim, None, "UnknownOperation"), None

    raw = await request.read()
    body = read_body(raw)
    market = _marketplace(sim, request, body)

    verdict = _verify(request, sim, raw, market)
    if isinstance(verdict, Reply):
        return verdict, None
    account = verdict
    if account.aws_credentials:
        return _error(sim, account.name, "AccessDeniedAwsUsers"), None
    if account.not_enabled:
        return _error(sim, account.name, "AccessDenied"), None
    if account.not_eligible:
        # What Amazon shows an account without qualifying sales: throttling, at any rate.
        return _error(sim, account.name, "TooManyRequests"), None

    decision = sim.admit(account)
    if not decision.allowed:
        headers: dict[str, str] = {}
        if sim.settings.retry_after in ("header", "both"):
            headers["Retry-After"] = str(sim.retry_after(decision))
        return _error(sim, account.name, "TooManyRequests", headers=headers), None

    fault = sim.faults.response_fault()
    if fault is not None and fault not in ITEM_FAULTS:
        sim.stats.faults[fault] += 1
        if fault.startswith("error_") or fault == "html":
            sim.stats.error(account.name, "ServerError")
            return _server_error(sim, fault), None
        if fault == "html_ok":
            return html_page(200), None
        if fault == "bad_shape":
            variant = sim.faults.bad_shape_variant()
            container, entries, ident = (_NAMES(name) for name in RESULT_NAMES[operation[1]])
            return bad_shape_reply(variant, container=container, items=entries, asin=ident), None
        if fault in WRITE_FAULTS:
            return Reply(200, b""), fault
    write_fault = None if fault in ITEM_FAULTS else fault

    if not isinstance(body, dict):
        return _error_invalid_body(sim, account.name), write_fault
    context = Context(sim.settings, account, market.name, _NAMES, sim.shuffle)
    try:
        outcome = run_operation(operation[1], body, context)
    except Rejected as rejected:
        return _rejected(sim, account.name, rejected), write_fault
    stats = sim.stats.account(account.name)
    stats.items_served += outcome.items_served
    if outcome.omitted:
        sim.stats.faults["omitted"] += outcome.omitted
    payload = outcome.payload
    if fault in ITEM_FAULTS and payload and outcome.container == "itemsResult":
        ids = body.get("ItemIds")
        requested = (
            {v.upper() for v in ids if isinstance(v, str)} if isinstance(ids, list) else set()
        )
        altered = sim.faults.alter_items(
            payload, fault, items_key="Items", asin_key="ASIN", requested=requested
        )
        if altered is not None:
            sim.stats.faults[fault] += 1
            payload = altered
    parts = []
    if outcome.errors:
        errors = [_item_error(e) for e in outcome.errors]
        for error in errors:
            stats.errors[error["Code"]] += 1
        parts.append('"Errors":' + json.dumps(errors, separators=(",", ":")))
    if payload:
        parts.append(f'"{_NAMES(outcome.container)}":{payload}')
    return Reply(200, ("{" + ",".join(parts) + "}").encode()), write_fault


def _verify(
    request: web.Request, sim: Simulator, raw: bytes, market: Marketplace
) -> Reply | Account:
    header = request.headers.get("Authorization")
    if not header:
        return _error(
            sim,
            None,
            "IncompleteSignature",
            "Authorization header requires 'Credential', 'Signature' and "
            "'SignedHeaders' parameters.",
        )
    try:
        parsed = parse_authorization(header)
    except ValueError as exc:
        return _error(sim, None, "IncompleteSignature", str(exc))
    if parsed.algorithm != ALGORITHM or parsed.terminator != "aws4_request":
        return _error(
            sim,
            None,
            "IncompleteSignature",
            f"Unsupported algorithm or credential terminator; use {ALGORITHM} and aws4_request.",
        )
    if parsed.service != SERVICE:
        return _error(
            sim,
            None,
            "IncompleteSignature",
            f"Credential should be scoped to correct service: '{SERVICE}'.",
        )
    signed = tuple(name.strip().lower() for name in parsed.signed_headers)
    if "host" not in signed:
        return _error(
            sim,
            None,
            "IncompleteSignature",
            "'Host' must be a 'SignedHeader' in the AWS Authorization.",
        )
    amz_date = request.headers.get("X-Amz-Date", "")
    if not amz_date:
        return _error(
            sim,
            None,
            "IncompleteSignature",
            "Authorization header requires existence of an 'X-Amz-Date' header.",
        )
    account = sim.accounts.by_id("paapi5", parsed.access_key)
    if account is None:
        return _error(sim, None, "UnrecognizedClient")
    try:
        sent_at = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return _error(
            sim,
            account.name,
            "IncompleteSignature",
            "X-Amz-Date must be in the ISO-8601 basic format YYYYMMDDTHHMMSSZ.",
        )
    if abs((sent_at - sim.wall()).total_seconds()) > _WINDOW_S:
        return _error(sim, account.name, "RequestExpired")
    if parsed.region != market.region:
        return _error(
            sim,
            account.name,
            "InvalidSignature",
            f"Credential should be scoped to a valid region, not '{parsed.region}'.",
        )
    if parsed.date_stamp != amz_date[:8]:
        return _error(
            sim,
            account.name,
            "InvalidSignature",
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version "
            "of date from HTTP.",
        )
    headers = {
        name: ",".join(request.headers.getall(name)) for name in signed if name in request.headers
    }
    try:
        creq = canonical_request(
            request.method,
            request.raw_path.partition("?")[0],
            # As sent: aiohttp's query_string is decoded ("+" a space, "%25" a "%"), and
            # canonical_request decodes what it is given itself.
            request.raw_path.partition("?")[2],
            headers,
            signed,
            sha256(raw).hexdigest(),
        )
    except ValueError:
        return _error(sim, account.name, "InvalidSignature")
    scope = credential_scope(parsed.date_stamp, parsed.region, parsed.service)
    key = _KEYS.get(account.secret, parsed.date_stamp, parsed.region)
    expected = signature(key, string_to_sign(amz_date, scope, creq))
    if not hmac.compare_digest(expected, parsed.signature.lower()):
        return _error(sim, account.name, "InvalidSignature")
    return account


def _error_invalid_body(sim: Simulator, account: str) -> Reply:
    sim.stats.error(account, "InvalidParameterValue")
    return _envelope(
        400,
        "ValidationException",
        "InvalidParameterValue",
        "The request body is not a valid JSON object.",
    )


def _rejected(sim: Simulator, account: str, rejected: Rejected) -> Reply:
    if rejected.kind == "invalid_associate":
        return _error(sim, account, "InvalidAssociate")
    if rejected.kind == "invalid_partner_tag" or (
        rejected.kind == "missing" and rejected.field == "PartnerTag"
    ):
        return _error(sim, account, "InvalidPartnerTag")
    if rejected.kind == "not_found":
        # protocol.md's documented NoResults body, with the __type real answers carry
        # (com.amazon.paapi5#ErrorData); its status is not documented.
        sim.stats.error(account, "NoResults")
        data = {
            "__type": "com.amazon.paapi5#ErrorData",
            "Code": "NoResults",
            "Message": "No results found for your request.",
        }
        body = {"Errors": [data]}
        return Reply(404, json.dumps(body, separators=(",", ":")).encode())
    if rejected.kind == "missing":
        sim.stats.error(account, "MissingParameter")
        return _envelope(
            400,
            "ValidationException",
            "MissingParameter",
            f"The request must contain the parameter {rejected.field}.",
        )
    sim.stats.error(account, "InvalidParameterValue")
    return _envelope(
        400,
        "ValidationException",
        "InvalidParameterValue",
        f"The value [{rejected.value}] provided in the request for {rejected.field} is invalid.",
    )


def _item_error(error: ItemError) -> dict[str, str]:
    if error.kind == "not_accessible":
        code = "ItemNotAccessible"
        message = (
            f"The ItemId {error.item_id} is not accessible through the Product Advertising API."
        )
    elif error.kind == "bad_node":
        code = "InvalidParameterValue"
        message = f"The BrowseNodeId {error.item_id} provided in the request is invalid."
    else:
        code = "InvalidParameterValue"
        message = f"The ItemId {error.item_id} provided in the request is invalid."
    return {"__type": "com.amazon.paapi5#ErrorData", "Code": code, "Message": message}
