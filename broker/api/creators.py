"""The Creators API wire format: paths, camelCase bodies, and reading responses and errors.

Requests come out unsigned and without ``Authorization``: the engine adds the bearer
token at dispatch time (:mod:`broker.api.oauth`). Shapes follow protocol.md section 2
(the SDK's field names and order; ``itemsResult``, with ``itemResults`` also accepted).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Final

from broker.api.base import HttpRequest, Operation, ParsedItems, RawResponse, encode_body
from broker.api.errors_map import (
    READ_ERRORS,
    ItemError,
    LazySummary,
    ResultShape,
    SummaryFields,
    api_error,
    assemble,
    load_object,
    not_found_all,
    read_errors,
    read_items,
    require_answer,
    require_result,
    retry_after_s,
    strip_type,
    text,
    unreadable_code,
    wrong_path_code,
)
from broker.api.marketplaces import marketplace as lookup_marketplace
from broker.errors import ApiError, ResponseError

if TYPE_CHECKING:
    from broker.clock import Clock
    from broker.models import ItemSummary

__all__ = [
    "DEFAULT_ENDPOINT",
    "MAX_ITEM_IDS",
    "PATHS",
    "SUMMARY_FIELDS",
    "USER_AGENT",
    "CreatorsDialect",
]

#: The one API host for every marketplace (the marketplace travels in ``x-marketplace``).
DEFAULT_ENDPOINT = "https://creatorsapi.amazon"

#: GetItems takes 1..10 ids (the SDK refuses more before sending).
MAX_ITEM_IDS = 10

#: The path of each operation under the endpoint.
PATHS: Mapping[Operation, str] = {
    Operation.GET_ITEMS: "/catalog/v1/getItems",
    Operation.SEARCH_ITEMS: "/catalog/v1/searchItems",
    Operation.GET_VARIATIONS: "/catalog/v1/getVariations",
    Operation.GET_BROWSE_NODES: "/catalog/v1/getBrowseNodes",
}


def _package_version() -> str:
    try:
        return version("asin-broker")
    except PackageNotFoundError:
        return "0+unknown"


#: What we tell Amazon we are.
USER_AGENT = f"asin-broker/{_package_version()}"

# The code a failure carries when its body names neither a ``reason`` nor a ``type``.
_FALLBACK_CODES: Mapping[int, str] = {
    400: "ValidationException",
    401: "UnauthorizedException",
    403: "AccessDeniedException",
    429: "ThrottleException",
    500: "InternalServerException",
}

#: The ``resourceType`` of a 404 that means nothing was found (a search with no hits, an
#: item with no variations, a page past the last, no browse node of the ids asked):
#: PA-API's ``NoResults``.
_NOTHING_FOUND: Final = frozenset({"SearchResult", "Variation", "BrowseNode"})


class CreatorsDialect:
    """Builds Creators API requests and reads their responses; no I/O.

    Args:
        endpoint: the API base URL; a local simulator's URL in tests and demos.
        clock: used only to read an HTTP-date ``Retry-After`` when the response has no
            ``Date`` header.

    Raises:
        ValueError: the endpoint is not an http(s) URL.
    """

    __slots__ = ("_clock", "_endpoint", "_urls")

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, *, clock: Clock | None = None) -> None:
        base = endpoint.strip().rstrip("/")
        if not base.startswith(("https://", "http://")):
            raise ValueError(f"Creators API endpoint must be an http(s) URL, got {endpoint!r}")
        self._endpoint = base
        self._urls = {operation: base + path for operation, path in PATHS.items()}
        self._clock = clock

    @property
    def endpoint(self) -> str:
        """The API base URL, without a trailing slash."""
        return self._endpoint

    def __repr__(self) -> str:
        return f"CreatorsDialect({self._endpoint!r})"

    def get_items_request(
        self,
        asins: Sequence[str],
        *,
        marketplace: str,
        partner_tag: str,
        resources: Sequence[str],
    ) -> HttpRequest:
        """Build the GetItems request for 1..10 ASINs.

        The body has the SDK's shape and order, compact:
        ``{"partnerTag":…,"itemIds":[…],"resources":[…]}`` (``resources`` left out when
        empty, so Amazon's default ``itemInfo.title`` applies).

        Raises:
            ValueError: no ASINs, more than 10, a blank partner tag, or an unknown
                marketplace.
        """
        ids = list(asins)
        if not 1 <= len(ids) <= MAX_ITEM_IDS:
            raise ValueError(f"GetItems takes 1 to {MAX_ITEM_IDS} ASINs, got {len(ids)}")
        body: dict[str, object] = {"partnerTag": _tag(partner_tag), "itemIds": ids}
        if resources:
            body["resources"] = list(resources)
        return self._request(Operation.GET_ITEMS, body, marketplace)

    def operation_request(
        self,
        operation: Operation,
        params: Mapping[str, object],
        *,
        marketplace: str,
        partner_tag: str,
    ) -> HttpRequest:
        """Build any operation's request from camelCase ``params``.

        ``partnerTag`` comes first and is always the key's tag for this marketplace: a
        ``partnerTag`` in ``params`` is ignored, since another store's tag would fail.

        Raises:
            ValueError: a blank partner tag, an unknown marketplace, or ``params`` that
                are not JSON (NaN included).
        """
        body: dict[str, object] = {"partnerTag": _tag(partner_tag)}
        for key, value in params.items():
            if key != "partnerTag":
                body[key] = value
        return self._request(operation, body, marketplace)

    def _request(
        self, operation: Operation, body: Mapping[str, object], marketplace: str
    ) -> HttpRequest:
        headers = {
            "content-type": "application/json",
            "accept": "application/json",
            "x-marketplace": lookup_marketplace(marketplace).name,
            "user-agent": USER_AGENT,
        }
        return HttpRequest("POST", self._urls[operation], headers, encode_body(body))

    def parse_get_items(self, response: RawResponse, requested: Sequence[str]) -> ParsedItems:
        """Read a GetItems response item by item.

        A 200 gives items keyed by ``asin`` plus per-item ``errors``; a 404
        ``ResourceNotFoundException`` (every id bad) gives every ASIN NOT_FOUND.

        Raises:
            ApiError: any other status, as its subclass (see :meth:`parse_operation`).
            ResponseError: the body cannot be read or has the wrong shape.
        """
        try:
            return self._parse_items(response, requested)
        except READ_ERRORS as exc:
            raise _unreadable("GetItems", response, exc) from exc

    def parse_operation(self, response: RawResponse, operation: Operation) -> Mapping[str, object]:
        """Return the JSON object of a 200 response to ``operation``.

        Raises:
            ApiError: a non-200 answer: :class:`~broker.errors.ThrottledError` (429,
                ``retry_after`` from ``retryAfterSeconds`` or ``Retry-After``),
                :class:`~broker.errors.AuthError` (401/403),
                :class:`~broker.errors.ServerError` (5xx), else
                :class:`~broker.errors.BadRequestError`; ``code`` is the body's
                ``reason``, else its ``type``; ``server_date`` is the ``Date`` header.
                A 200 holding only ``errors`` raises the first as BadRequestError. A 404
                for a search with no hits, or for variations that are not there, has code
                ``NoResults``, as on PA-API.
            ResponseError: the body cannot be read or is not shaped as documented
                (:func:`~broker.api.errors_map.require_result`), or the status is not an
                error.
        """
        what = f"Creators {operation.value}"
        try:
            if response.status != 200:
                raise self._failure(response, operation.value)
            data = load_object(response.body, status=200, what=what)
            errors = _read_errors(data.get("errors"))
            if errors and not any(
                key.endswith(("Result", "Results")) and value is not None
                for key, value in data.items()
            ):
                raise api_error(200, errors[0].code, errors[0].message, response.headers)
            require_result(data, _RESULT_SHAPES[operation], what=what)
            return data
        except READ_ERRORS as exc:
            raise _unreadable(operation.value, response, exc) from exc

    def _parse_items(self, response: RawResponse, requested: Sequence[str]) -> ParsedItems:
        status = response.status
        if status == 200:
            data = load_object(response.body, status=200, what="Creators GetItems")
            container = data.get("itemsResult")
            if container is None:
                container = data.get("itemResults")
            require_answer(data, container, "errors", api="Creators")
            return assemble(
                requested,
                _read_items(container),
                _read_errors(data.get("errors")),
                _summary,
                status=status,
                headers=response.headers,
            )
        if status == 404:
            data = _error_body(response, "GetItems")
            kind = _kind(data, status)
            if kind == "ResourceNotFoundException":
                message = text(data.get("message")) or "No items found for the requested item IDs."
                return not_found_all(requested, kind, message)
            raise self._error(response, data)
        raise self._failure(response, "GetItems")

    def _failure(self, response: RawResponse, what: str) -> ApiError | ResponseError:
        status = response.status
        if not 400 <= status <= 599:
            return ResponseError(f"Creators {what}: unexpected HTTP status {status}", status=status)
        return self._error(response, _error_body(response, what))

    def _error(self, response: RawResponse, data: Mapping[str, object]) -> ApiError:
        status = response.status
        kind = _kind(data, status)
        code = text(data.get("reason")) or kind or _fallback_code(status)
        if kind == "ResourceNotFoundException" and text(data.get("resourceType")) in _NOTHING_FOUND:
            # A search with no hits, an item with no variations: PA-API's name for the same
            # answer, so callers test one code on both APIs.
            code = "NoResults"
        message = text(data.get("message")) or text(data.get("Message")) or f"HTTP {status}"
        resource = text(data.get("resourceId"))
        if resource:
            # A 404's resource: which item's variations, which browse node was not found.
            message = f"{message} ({text(data.get('resourceType')) or 'resource'} {resource})"
        fields = _field_names(data.get("fieldList"))
        if fields:
            message = f"{message} (fields: {', '.join(fields)})"
        wait = retry_after_s(data.get("retryAfterSeconds"), response.headers, self._clock)
        return api_error(status, code, message, response.headers, retry_after=wait)


def _tag(partner_tag: str) -> str:
    if not partner_tag.strip():
        raise ValueError("partner tag must not be blank")
    return partner_tag


def _kind(data: Mapping[str, object], status: int) -> str | None:
    """An error body's exception type: its ``type`` (or ``__type``); for a 404 that names
    none but names a resource, ResourceNotFoundException (the SDK's model of that answer
    requires resourceType and resourceId; protocol.md leaves open which field names the
    type), so "no items found" is never read as a wrong path."""
    kind = strip_type(data.get("type")) or strip_type(data.get("__type"))
    if kind is None and status == 404 and ("resourceType" in data or "resourceId" in data):
        return "ResourceNotFoundException"
    return kind


def _fallback_code(status: int) -> str:
    code = wrong_path_code(status) or _FALLBACK_CODES.get(status)
    if code is not None:
        return code
    return "ServerError" if status >= 500 else "Other"


def _error_body(response: RawResponse, what: str) -> Mapping[str, object]:
    try:
        return load_object(response.body, status=response.status, what=f"Creators {what}")
    except ResponseError as exc:
        # A 429 means throttled whatever its body says; an unreadable one still slows the key.
        if response.status == 429:
            return {}
        # A wrong path's or a proxy's page: the status says enough, and no retry mends it.
        code = unreadable_code(response.status, response.body)
        if code is None:
            raise
        return {"reason": code, "message": str(exc)}


def _unreadable(what: str, response: RawResponse, exc: Exception) -> ResponseError:
    return ResponseError(
        f"Creators {what}: HTTP {response.status} body has the wrong shape ({type(exc).__name__})",
        status=response.status,
    )


def _field_names(raw: object) -> list[str]:
    # fieldList is ["partnerTag"] in the docs and [{"name":…,"message":…}] in the SDK.
    if not isinstance(raw, list):
        return []
    names: list[str] = []
    for entry in raw:
        name = text(entry.get("name")) if isinstance(entry, dict) else text(entry)
        if name:
            names.append(name)
    return names


#: where each operation's answer keeps its entries (GetItems has its own reader)
_RESULT_SHAPES = {
    Operation.SEARCH_ITEMS: ResultShape("searchResult", "items", "asin"),
    Operation.GET_VARIATIONS: ResultShape("variationsResult", "items", "asin"),
    Operation.GET_BROWSE_NODES: ResultShape("browseNodesResult", "browseNodes", "id"),
}

SUMMARY_FIELDS = SummaryFields(
    info="itemInfo",
    title="title",
    display="displayValue",
    offers="offersV2",
    listings="listings",
    price="price",
    money="money",
    amount="amount",
    currency="currency",
    availability="availability",
    type="type",
    message="message",
    url="detailPageURL",
    images="images",
    primary="primary",
    image_sizes=("hiRes", "highRes", "large", "medium", "small"),
    image_url="url",
)


def _read_items(container: object) -> list[tuple[str, Mapping[str, object]]]:
    return read_items(container, items="items", asin="asin", api="Creators")


def _read_errors(raw: object) -> list[ItemError]:
    return read_errors(raw, code="code", message="message", api="Creators")


def _summary(item: Mapping[str, object]) -> ItemSummary:
    return LazySummary(item, SUMMARY_FIELDS)
