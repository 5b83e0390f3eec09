"""The PA-API 5.0 wire format: hosts, PascalCase bodies, resource names, responses and errors.

Requests come out unsigned: the engine's SigV4 signer adds ``x-amz-date`` and
``Authorization`` at dispatch time, for the region :meth:`PaapiDialect.signing_region`
names. Shapes follow protocol.md section 3 (SDK-P's field names; the error envelope
``{"__type": …, "Errors": [{"Code", "Message"}]}``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
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
    first_object,
    load_object,
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
from broker.api.marketplaces import Marketplace
from broker.api.marketplaces import marketplace as lookup_marketplace
from broker.api.resources import OPERATION_RESOURCES, pascal_name
from broker.errors import ApiError, BadRequestError, ErrorInfo, ResponseError, Scope

if TYPE_CHECKING:
    from broker.clock import Clock
    from broker.models import ItemSummary

__all__ = [
    "DROPPED_RESOURCES",
    "MAX_ITEM_IDS",
    "RESOURCE_NAMES",
    "SUMMARY_FIELDS",
    "TARGET_PREFIX",
    "InvalidItemIdsError",
    "PaapiDialect",
    "ResourceTranslation",
    "offending_ids",
    "translate_resources",
]

#: GetItems takes at most 10 ItemIds.
MAX_ITEM_IDS = 10

#: ``x-amz-target`` is this prefix plus the operation name.
TARGET_PREFIX = "com.amazon.paapi5.v1.ProductAdvertisingAPIv1."

# Creators API resource names of every operation (one list, in broker/api/resources.py).
_CREATORS_RESOURCES = tuple(
    dict.fromkeys(
        name
        for names in OPERATION_RESOURCES.values()
        for name in names
        if not name.endswith(".highRes")  # PA-API has none (DROPPED_RESOURCES)
    )
)


#: Creators API resource name -> PA-API resource name.
RESOURCE_NAMES: Mapping[str, str] = {name: pascal_name(name) for name in _CREATORS_RESOURCES}

#: Creators API resources PA-API has no equivalent for, and why they are dropped.
DROPPED_RESOURCES: Mapping[str, str] = {
    f"images.{kind}.highRes": "PA-API images come in Small, Medium and Large only; "
    "it has no HighRes resource and rejects unknown names"
    for kind in ("primary", "variants")
}

# Parameter names whose PascalCase is not just a capital first letter.
_PARAM_NAMES: Mapping[str, str] = {"asin": "ASIN"}

# "The value [9791186701072] provided in the request for ItemIds is invalid."
_BRACKETED = re.compile(r"\[([^\]]*)\]")
_ID_TOKEN = re.compile(r"(?<![0-9A-Za-z])[0-9A-Za-z]{10}(?![0-9A-Za-z])")


@dataclass(frozen=True, slots=True)
class ResourceTranslation:
    """Resource names ready for PA-API, and the ones left out.

    Attributes:
        resources: PascalCase names, in the order given, without duplicates.
        dropped: the names left out (see :data:`DROPPED_RESOURCES` for why).
    """

    resources: tuple[str, ...]
    dropped: tuple[str, ...] = ()


def translate_resources(names: Iterable[str]) -> ResourceTranslation:
    """Translate the broker's (Creators, camelCase) resource names to PA-API names.

    Known names use :data:`RESOURCE_NAMES`; PascalCase names pass through unchanged; names
    in :data:`DROPPED_RESOURCES` are dropped; other camelCase names get PA-API's spelling
    rule (a capital first letter per segment), so a resource Amazon adds later still works.
    """
    return _translate(tuple(names))


@functools.lru_cache(maxsize=128)
def _translate(names: tuple[str, ...]) -> ResourceTranslation:
    # Cached: a run uses a handful of resource lists for every one of its requests.
    kept: dict[str, None] = {}
    dropped: list[str] = []
    for name in names:
        if name in DROPPED_RESOURCES or name.rpartition(".")[2] == "highRes":
            dropped.append(name)
            continue
        translated = RESOURCE_NAMES.get(name)
        if translated is None:
            translated = name if name[:1].isupper() else pascal_name(name)
        kept[translated] = None
    return ResourceTranslation(tuple(kept), tuple(dropped))


class InvalidItemIdsError(BadRequestError):
    """A 400 ``InvalidParameterValue`` that names item ids: the whole request failed.

    ``invalid_ids`` holds the named ids (as requested, when the request is known), so the
    engine can mark them invalid and re-send the rest of the batch.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int,
        invalid_ids: Sequence[str],
        retry_after: float | None = None,
        server_date: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(
            code,
            message,
            status=status,
            retry_after=retry_after,
            server_date=server_date,
            request_id=request_id,
        )
        self.invalid_ids = tuple(invalid_ids)


class ParameterValueError(BadRequestError):
    """A 400 ``InvalidParameterValue`` about a parameter other than the item ids.

    Amazon's message names the parameter (``Marketplace``, ``Resources``, ...): the request
    as a whole is wrong, so no id is blamed and none is re-asked alone (protocol.md 4 drops
    an id only when the error names one). Its rows fail with Amazon's message.
    """

    @property
    def info(self) -> ErrorInfo:
        """The catalogue's entry as a request error, with a remedy about the request."""
        return dataclasses.replace(super().info, scope=Scope.REQUEST, remedy=_PARAMETER_REMEDY)


_PARAMETER_REMEDY = (
    "Amazon refused the parameter its message names, not an item id: check the marketplace, "
    "resources and partner tag in config.toml (and the key's marketplaces); if they are "
    "right, report it with the broker version."
)


def offending_ids(error: BaseException) -> tuple[str, ...]:
    """Return the item ids an error blames (empty unless it is an InvalidItemIdsError)."""
    return error.invalid_ids if isinstance(error, InvalidItemIdsError) else ()


class PaapiDialect:
    """Builds PA-API 5.0 requests and reads their responses; no I/O.

    Args:
        endpoint: None for Amazon (``https://<marketplace host>/paapi5/<op>``), or a base
            URL (a local simulator). Either way the ``host`` header is the marketplace's
            PA-API host: it is signed, and the simulator picks the marketplace from it.
        clock: used only to read an HTTP-date ``Retry-After`` when the response has no
            ``Date`` header.

    Raises:
        ValueError: the endpoint is not an http(s) URL.
    """

    __slots__ = ("_base", "_clock")

    def __init__(self, endpoint: str | None = None, *, clock: Clock | None = None) -> None:
        if endpoint is not None:
            endpoint = endpoint.strip().rstrip("/")
            if not endpoint.startswith(("https://", "http://")):
                raise ValueError(f"PA-API endpoint must be an http(s) URL, got {endpoint!r}")
        self._base = endpoint
        self._clock = clock

    @property
    def endpoint(self) -> str | None:
        """The override base URL, or None when requests go to Amazon's hosts."""
        return self._base

    def __repr__(self) -> str:
        return f"PaapiDialect({self._base!r})"

    def host(self, marketplace: str) -> str:
        """Return the PA-API host of a marketplace (``webservices.amazon.de``)."""
        return lookup_marketplace(marketplace).paapi_host

    def signing_region(self, marketplace: str) -> str:
        """Return the SigV4 region requests for a marketplace are signed for."""
        return lookup_marketplace(marketplace).paapi_region

    def get_items_request(
        self,
        asins: Sequence[str],
        *,
        marketplace: str,
        partner_tag: str,
        resources: Sequence[str],
    ) -> HttpRequest:
        """Build the GetItems request for 1..10 ASINs.

        Body, compact and in SDK-P's order: ``ItemIds``, ``ItemIdType``, ``Marketplace``,
        ``PartnerTag``, ``PartnerType``, ``Resources`` (translated by
        :func:`translate_resources`; left out when empty).

        Raises:
            ValueError: no ASINs, more than 10, a blank partner tag, or an unknown
                marketplace.
        """
        ids = list(asins)
        if not 1 <= len(ids) <= MAX_ITEM_IDS:
            raise ValueError(f"GetItems takes 1 to {MAX_ITEM_IDS} ASINs, got {len(ids)}")
        place = lookup_marketplace(marketplace)
        body: dict[str, object] = {
            "ItemIds": ids,
            "ItemIdType": "ASIN",
            "Marketplace": place.name,
            "PartnerTag": _tag(partner_tag),
            "PartnerType": "Associates",
        }
        translated = translate_resources(resources).resources
        if translated:
            body["Resources"] = list(translated)
        return self._request(Operation.GET_ITEMS, body, place)

    def operation_request(
        self,
        operation: Operation,
        params: Mapping[str, object],
        *,
        marketplace: str,
        partner_tag: str,
    ) -> HttpRequest:
        """Build any operation's request from camelCase (or PascalCase) ``params``.

        Names get a capital first letter (``asin`` becomes ``ASIN``), ``resources`` are
        translated, and ``PartnerTag``, ``PartnerType`` and ``Marketplace`` are set from the
        key and marketplace (values for them in ``params`` are ignored).

        Raises:
            ValueError: a blank partner tag, an unknown marketplace, or ``params`` that
                are not JSON.
        """
        place = lookup_marketplace(marketplace)
        fixed = {"PartnerTag", "PartnerType", "Marketplace"}
        body: dict[str, object] = {}
        for key, value in params.items():
            name = _PARAM_NAMES.get(key) or key[:1].upper() + key[1:]
            if name in fixed:
                continue
            if name == "Resources" and isinstance(value, list | tuple):
                value = list(translate_resources(str(v) for v in value).resources)
            body[name] = value
        if operation is Operation.GET_ITEMS and "ItemIds" in body:
            body.setdefault("ItemIdType", "ASIN")
        body["Marketplace"] = place.name
        body["PartnerTag"] = _tag(partner_tag)
        body["PartnerType"] = "Associates"
        return self._request(operation, body, place)

    def _request(
        self, operation: Operation, body: Mapping[str, object], place: Marketplace
    ) -> HttpRequest:
        path = "/paapi5/" + operation.value.lower()
        base = self._base if self._base is not None else "https://" + place.paapi_host
        headers = {
            "host": place.paapi_host,
            "content-type": "application/json; charset=utf-8",
            "content-encoding": "amz-1.0",
            "x-amz-target": TARGET_PREFIX + operation.value,
        }
        return HttpRequest("POST", base + path, headers, encode_body(body))

    def parse_get_items(self, response: RawResponse, requested: Sequence[str]) -> ParsedItems:
        """Read a GetItems response item by item.

        A 200 gives ``ItemsResult.Items`` keyed by ``ASIN`` plus per-item ``Errors`` (a
        200 with only ``Errors``, every id unknown, gives per-item outcomes too).

        Raises:
            InvalidItemIdsError: a 400 ``InvalidParameterValue`` naming requested ids.
            ApiError: any other failure (see :meth:`parse_operation`).
            ResponseError: the body cannot be read or has the wrong shape.
        """
        try:
            if response.status != 200:
                raise _failure(response, "GetItems", requested, self._clock)
            data = load_object(response.body, status=200, what="PA-API GetItems")
            require_answer(data, data.get("ItemsResult"), "Errors", api="PA-API")
            return assemble(
                requested,
                _read_items(data.get("ItemsResult")),
                _read_errors(data.get("Errors")),
                _summary,
                status=200,
                headers=response.headers,
            )
        except READ_ERRORS as exc:
            raise _unreadable("GetItems", response, exc) from exc

    def parse_operation(self, response: RawResponse, operation: Operation) -> Mapping[str, object]:
        """Return the JSON object of a 200 response to ``operation``.

        Raises:
            ApiError: the subclass by status (429 :class:`~broker.errors.ThrottledError`,
                401/403 and signature codes :class:`~broker.errors.AuthError`, 5xx
                :class:`~broker.errors.ServerError`, else
                :class:`~broker.errors.BadRequestError`), with ``code`` from
                ``Errors[0].Code`` (else the ``__type``'s exception name) and
                ``server_date`` from the ``Date`` header. A 200 holding only ``Errors``
                (``NoResults``) raises the first as BadRequestError.
            ResponseError: the body cannot be read or is not shaped as documented
                (:func:`~broker.api.errors_map.require_result`), or the status is not an
                error.
        """
        what = f"PA-API {operation.value}"
        try:
            if response.status != 200:
                raise _failure(response, operation.value, None, self._clock)
            data = load_object(response.body, status=200, what=what)
            errors = _read_errors(data.get("Errors"))
            if errors and not any(
                key.endswith("Result") and value is not None for key, value in data.items()
            ):
                raise api_error(200, errors[0].code, errors[0].message, response.headers)
            require_result(data, _RESULT_SHAPES[operation], what=what)
            return data
        except READ_ERRORS as exc:
            raise _unreadable(operation.value, response, exc) from exc


def _tag(partner_tag: str) -> str:
    if not partner_tag.strip():
        raise ValueError("partner tag must not be blank")
    return partner_tag


def _fallback_code(status: int) -> str:
    # Amazon's own 5xx names its code (InternalFailure); one without a code came from
    # something in between (a gateway's 502 or 504), as the Creators dialect says too.
    if status == 429:
        return "TooManyRequests"
    return wrong_path_code(status) or ("ServerError" if status >= 500 else "Other")


def _failure(
    response: RawResponse, what: str, requested: Sequence[str] | None, clock: Clock | None
) -> ApiError | ResponseError:
    status = response.status
    if not 400 <= status <= 599:
        return ResponseError(f"PA-API {what}: unexpected HTTP status {status}", status=status)
    try:
        data = load_object(response.body, status=status, what=f"PA-API {what}")
    except ResponseError as exc:
        # A 429 means throttled whatever its body says; an unreadable one still slows the key.
        if status == 429:
            data = {}
        # A wrong path's or a proxy's page: the status says enough, and no retry mends it.
        elif (unreadable := unreadable_code(status, response.body)) is not None:
            data = {"Code": unreadable, "Message": str(exc)}
        else:
            raise
    entries = data.get("Errors")
    first = first_object(entries)
    # The retired-API notice may come flat ({"__type", "Code", "Message"}), not enveloped.
    code = (
        (text(first.get("Code")) if first else None)
        or text(data.get("Code"))
        or strip_type(data.get("__type"))
        or _fallback_code(status)
    )
    message = (
        (text(first.get("Message")) if first else None)
        or text(data.get("Message"))
        or text(data.get("message"))
        or f"HTTP {status}"
    )
    wait = retry_after_s(None, response.headers, clock)
    error = api_error(status, code, message, response.headers, retry_after=wait)
    if code == "InvalidParameterValue" and status < 500 and isinstance(entries, list):
        named = _named_ids(entries, requested)
        if named:
            return InvalidItemIdsError(
                error.code,
                error.message,
                status=status,
                invalid_ids=named,
                server_date=error.server_date,
                request_id=error.request_id,
            )
        if _names_other_parameters(_parameter_messages(entries)):
            return ParameterValueError(
                error.code,
                error.message,
                status=status,
                server_date=error.server_date,
                request_id=error.request_id,
            )
    return error


def _names_other_parameters(messages: list[str]) -> bool:
    """True when every message names the parameter it refuses and none is an id parameter.

    Amazon's messages read "The value [...] provided in the request for <Parameter> is
    invalid." A message naming no parameter keeps the catalogue's id-level reading.
    """
    if not messages:
        return False
    for message in messages:
        named = _PARAMETER.search(message)
        if named is None or named.group(1).lower() in _ID_PARAMETERS:
            return False
    return True


#: "... provided in the request for <Parameter> ...": the parameter a message refuses.
_PARAMETER: Final = re.compile(r"provided in the request for (\w+)")
#: Parameters that carry ids (lower case): an error about them is the ids', not the request's.
_ID_PARAMETERS: Final = frozenset({"itemids", "itemid", "asin", "browsenodeids", "browsenodeid"})


def _parameter_messages(entries: list[object]) -> list[str]:
    """The messages of the InvalidParameterValue entries among ``entries``."""
    return [
        text(entry.get("Message")) or ""
        for entry in entries
        if isinstance(entry, dict) and entry.get("Code") == "InvalidParameterValue"
    ]


def _named_ids(entries: list[object], requested: Sequence[str] | None) -> list[str]:
    """The item ids InvalidParameterValue messages blame, limited to the request if known."""
    index = {asin.upper(): asin for asin in requested} if requested is not None else None
    named: dict[str, None] = {}
    for message in _parameter_messages(entries):
        if "ItemId" not in message:
            continue
        bracketed = _BRACKETED.findall(message)
        if bracketed:
            candidates = [part.strip() for group in bracketed for part in group.split(",")]
        else:
            candidates = _ID_TOKEN.findall(message)
        for candidate in candidates:
            if not candidate:
                continue
            if index is None:
                named[candidate] = None
            elif candidate.upper() in index:
                named[index[candidate.upper()]] = None
    return list(named)


def _unreadable(what: str, response: RawResponse, exc: Exception) -> ResponseError:
    return ResponseError(
        f"PA-API {what}: HTTP {response.status} body has the wrong shape ({type(exc).__name__})",
        status=response.status,
    )


#: where each operation's answer keeps its entries (GetItems has its own reader)
_RESULT_SHAPES = {
    Operation.SEARCH_ITEMS: ResultShape("SearchResult", "Items", "ASIN"),
    Operation.GET_VARIATIONS: ResultShape("VariationsResult", "Items", "ASIN"),
    Operation.GET_BROWSE_NODES: ResultShape("BrowseNodesResult", "BrowseNodes", "Id"),
}

SUMMARY_FIELDS = SummaryFields(
    info="ItemInfo",
    title="Title",
    display="DisplayValue",
    offers="OffersV2",
    listings="Listings",
    price="Price",
    money="Money",
    amount="Amount",
    currency="Currency",
    availability="Availability",
    type="Type",
    message="Message",
    url="DetailPageURL",
    images="Images",
    primary="Primary",
    image_sizes=("HiRes", "HighRes", "Large", "Medium", "Small"),
    image_url="URL",
)


def _read_items(container: object) -> list[tuple[str, Mapping[str, object]]]:
    return read_items(container, items="Items", asin="ASIN", api="PA-API")


def _read_errors(raw: object) -> list[ItemError]:
    return read_errors(raw, code="Code", message="Message", api="PA-API")


def _summary(item: Mapping[str, object]) -> ItemSummary:
    return LazySummary(item, SUMMARY_FIELDS)
