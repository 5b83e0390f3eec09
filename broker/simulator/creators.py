"""The Creators API front end: bearer-token checks, quotas and camelCase wire shapes.

A call to ``POST /catalog/v1/<operation>`` is checked in this order, each step answering with
the documented error (protocol.md 2.8): operation name (400 UnknownOperation), Authorization
(401 MissingCredential / InvalidToken / TokenExpired / InvalidIssuer), ``x-marketplace`` (400
FieldValidationFailed), eligibility (403 AssociateNotEligible), the body's bytes (400 or 413
when they cannot be read, never charged), the key's quota (429
ThrottleException), injected server faults, the JSON body (400 CannotParse), then the
operation itself (400 FieldValidationFailed / InvalidAssociate / InvalidPartnerTag, 404
ResourceNotFoundException, or 200 with optional ``errors``).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from broker.simulator.faults import (
    ITEM_FAULTS,
    WRITE_FAULTS,
    Reply,
    bad_shape_reply,
    html_page,
)
from broker.simulator.marketplaces import MARKETPLACES
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

    from broker.simulator.state import Simulator

__all__ = ["OPERATIONS", "handle"]

#: The operations of ``/catalog/v1/`` the simulator serves.
OPERATIONS = frozenset({"getItems", "searchItems", "getVariations", "getBrowseNodes"})

_NAMES = Names("creators")
_BEARER = re.compile(r"^\s*Bearer\s+([^\s,]+)\s*(?:,\s*Version\s+([^\s,]+)\s*)?$", re.IGNORECASE)

_MESSAGES = {
    "UnknownOperation": "The operation requested is invalid. Please verify that the operation "
    "name is typed correctly.",
    "CannotParse": "Unable to parse the request payload. Please verify that the request body "
    "is valid JSON.",
    "FieldValidationFailed": "Request validation failed.",
    "InvalidAssociate": "Your credential is not linked to the partner tag in the request for "
    "the given Marketplace.",
    "InvalidPartnerTag": "Partner tag in the request is invalid or is not mapped to the store "
    "associated with your credential.",
    "TokenExpired": "Authentication token has expired.",
    "InvalidToken": "The authentication token is invalid or malformed.",
    "MissingCredential": "Missing authentication credentials.",
    "InvalidIssuer": "Ensure the credential version in your request header matches the region "
    "where the token was generated.",
    "AssociateNotEligible": "Your account does not currently meet the eligibility requirements.",
}
_THROTTLE_MESSAGE = (
    "The request was denied due to request throttling. Please verify the "
    "number of requests made per second."
)
_SERVER_ERRORS = {
    500: {
        "type": "InternalServerException",
        "message": "An unexpected error occurred while processing your request.",
    },
    502: {"message": "Bad Gateway"},
    503: {"message": "Service Unavailable"},
    504: {"message": "Endpoint request timed out"},
}


def _json(status: int, body: object) -> Reply:
    return Reply(status, json.dumps(body, separators=(",", ":")).encode())


def _error(
    sim: Simulator,
    account: str | None,
    status: int,
    type_: str,
    reason: str | None,
    **extra: object,
) -> Reply:
    sim.stats.error(account, reason or type_)
    body: dict[str, object] = {"type": type_, "message": _MESSAGES.get(reason or "", "")}
    if reason:
        body["reason"] = reason
    body.update(extra)
    return _json(status, body)


def _field_list(sim: Simulator, name: str, message: str) -> list[object]:
    if sim.settings.field_list_style == "strings":
        return [name]
    return [{"name": name, "message": message}]


def _server_error(sim: Simulator, kind: str) -> Reply:
    """The reply of an injected 5xx fault (``error_500`` .. ``error_504``, ``html``)."""
    if kind == "html":
        return html_page(sim.faults.html_status())
    status = int(kind.removeprefix("error_"))
    return _json(status, _SERVER_ERRORS[status])


async def handle(request: web.Request, sim: Simulator) -> tuple[Reply, str | None]:
    """Answer one Creators API call; returns the reply and the write fault (if any)."""
    operation = request.match_info.get("operation", "")
    if operation not in OPERATIONS:
        return _error(sim, None, 400, "ValidationException", "UnknownOperation"), None

    header = request.headers.get("Authorization")
    if not header:
        return _error(sim, None, 401, "UnauthorizedException", "MissingCredential"), None
    match = _BEARER.match(header)
    token = sim.tokens.find(match.group(1)) if match else None
    if match is None or token is None:
        return _error(sim, None, 401, "UnauthorizedException", "InvalidToken"), None
    account = token.account
    version = match.group(2)
    if sim.clock.monotonic() >= token.expires_at:
        return _error(sim, account.name, 401, "UnauthorizedException", "TokenExpired"), None
    if (token.family == "v2" and version != token.version) or (
        token.family == "v3" and version is not None and version != token.version
    ):
        return _error(sim, account.name, 401, "UnauthorizedException", "InvalidIssuer"), None
    if sim.faults.expired_token():
        sim.stats.faults["expired_token"] += 1
        return _error(sim, account.name, 401, "UnauthorizedException", "TokenExpired"), None

    marketplace = request.headers.get("x-marketplace", "").strip()
    if marketplace not in MARKETPLACES:
        message = (
            "x-marketplace header is required"
            if not marketplace
            else f"{marketplace} is not a supported marketplace"
        )
        return _error(
            sim,
            account.name,
            400,
            "ValidationException",
            "FieldValidationFailed",
            fieldList=_field_list(sim, "x-marketplace", message),
        ), None
    if not account.every_region and MARKETPLACES[marketplace].creators_region != account.region:
        # Tokens are bound to their credential version's region family.
        return _error(sim, account.name, 401, "UnauthorizedException", "InvalidIssuer"), None
    if account.not_eligible:
        return _error(sim, account.name, 403, "AccessDeniedException", "AssociateNotEligible"), None

    # Read before the quota is asked: a body that cannot be read (or is too large) is
    # refused without spending a transaction, as PA-API's, read before its signature is.
    raw = await request.read()
    decision = sim.admit(account)
    if not decision.allowed:
        sim.stats.error(account.name, "ThrottleException")
        body: dict[str, object] = {"type": "ThrottleException", "message": _THROTTLE_MESSAGE}
        headers: dict[str, str] = {}
        wait = sim.retry_after(decision)
        if sim.settings.retry_after in ("body", "both"):
            body["retryAfterSeconds"] = wait
        if sim.settings.retry_after in ("header", "both"):
            headers["Retry-After"] = str(wait)
        return Reply(429, json.dumps(body, separators=(",", ":")).encode(), headers=headers), None

    fault = sim.faults.response_fault()
    if fault is not None and fault not in ITEM_FAULTS:
        sim.stats.faults[fault] += 1
        if fault.startswith("error_") or fault == "html":
            sim.stats.error(account.name, "ServerError")
            return _server_error(sim, fault), None
        replaced = _replacement(sim, fault, operation)
        if replaced is not None:
            return replaced, fault if fault in WRITE_FAULTS else None

    reply = _operation(
        sim,
        account.name,
        operation,
        raw,
        Context(sim.settings, account, marketplace, _NAMES, sim.shuffle),
        fault,
    )
    return reply, None if fault in ITEM_FAULTS else fault


def _replacement(sim: Simulator, fault: str, operation: str) -> Reply | None:
    """The whole answer of a fault that needs no operation result, else None."""
    if fault == "html_ok":
        return html_page(200)
    if fault == "bad_shape":
        container, entries, ident = RESULT_NAMES[operation]
        if operation == "getItems":
            container = sim.settings.items_container
        return bad_shape_reply(
            sim.faults.bad_shape_variant(), container=container, items=entries, asin=ident
        )
    if fault in WRITE_FAULTS:
        # Written by deliver(): nothing of the operation is sent.
        return Reply(200, b"")
    return None


def _operation(
    sim: Simulator,
    account_name: str,
    operation: str,
    raw: bytes,
    context: Context,
    fault: str | None = None,
) -> Reply:
    body = read_body(raw)
    if not isinstance(body, dict):
        return _error(sim, account_name, 400, "ValidationException", "CannotParse")
    try:
        outcome = run_operation(operation, body, context)
    except Rejected as rejected:
        return _rejected(sim, account_name, rejected)
    stats = sim.stats.account(account_name)
    stats.items_served += outcome.items_served
    if outcome.omitted:
        sim.stats.faults["omitted"] += outcome.omitted
    container = outcome.container
    payload = outcome.payload
    if container == "itemsResult":
        container = sim.settings.items_container
        if fault in ITEM_FAULTS and payload:
            altered = sim.faults.alter_items(
                payload,
                fault,
                items_key="items",
                asin_key="asin",
                requested=_requested(body, "itemIds"),
            )
            if altered is not None:
                sim.stats.faults[fault] += 1
                payload = altered
    parts = []
    if payload:
        parts.append(f'"{container}":{payload}')
    if outcome.errors:
        errors = [_item_error(e) for e in outcome.errors]
        for error in errors:
            stats.errors[error["code"]] += 1
        parts.append('"errors":' + json.dumps(errors, separators=(",", ":")))
    return Reply(200, ("{" + ",".join(parts) + "}").encode())


def _requested(body: dict[str, object], field: str) -> set[str]:
    ids = body.get(field)
    return {v.upper() for v in ids if isinstance(v, str)} if isinstance(ids, list) else set()


def _rejected(sim: Simulator, account: str, rejected: Rejected) -> Reply:
    if rejected.kind == "invalid_associate":
        return _error(sim, account, 400, "ValidationException", "InvalidAssociate")
    if rejected.kind == "invalid_partner_tag":
        return _error(sim, account, 400, "ValidationException", "InvalidPartnerTag")
    if rejected.kind == "not_found":
        sim.stats.error(account, "ResourceNotFoundException")
        return _json(
            404,
            {
                "type": "ResourceNotFoundException",
                "message": rejected.detail,
                "resourceType": rejected.resource_type,
                "resourceId": rejected.resource_id,
            },
        )
    if rejected.kind == "missing":
        message = rejected.detail or f"{rejected.field} is required"
    else:
        message = rejected.detail or f"{rejected.value} is not a valid value for {rejected.field}"
    return _error(
        sim,
        account,
        400,
        "ValidationException",
        "FieldValidationFailed",
        fieldList=_field_list(sim, rejected.field, message),
    )


def _item_error(error: ItemError) -> dict[str, str]:
    if error.kind == "not_accessible":
        return {
            "code": "ItemNotAccessible",
            "message": f"The ItemId {error.item_id} is not accessible through the Creators API.",
        }
    if error.kind == "bad_node":
        return {
            "code": "InvalidParameterValue",
            "message": f"The BrowseNodeId {error.item_id} provided in the request is invalid.",
        }
    return {
        "code": "InvalidParameterValue",
        "message": f"The ItemIds {error.item_id} provided in the request is invalid.",
    }
