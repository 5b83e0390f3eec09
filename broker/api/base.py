"""The shapes shared by both wire protocols: an HTTP request, a raw response, parsed items.

A dialect (:mod:`broker.api.creators`, :mod:`broker.api.paapi5`) turns a lookup into an
unsigned :class:`HttpRequest` and a :class:`RawResponse` back into per-ASIN
:class:`ItemOutcome` values or a typed :class:`~broker.errors.ApiError`. Authorization
(bearer token or SigV4) is added later, at dispatch time, by the engine.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import orjson

if TYPE_CHECKING:
    from broker.models import ErrorDetail, ItemSummary, Status

__all__ = [
    "Dialect",
    "HttpRequest",
    "ItemOutcome",
    "Operation",
    "ParsedItems",
    "RawResponse",
    "encode_body",
]


class Operation(enum.Enum):
    """The catalogue operations both APIs offer; the value is the PA-API operation name."""

    GET_ITEMS = "GetItems"
    SEARCH_ITEMS = "SearchItems"
    GET_VARIATIONS = "GetVariations"
    GET_BROWSE_NODES = "GetBrowseNodes"


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """An HTTP request ready for the transport (once authorized).

    ``url`` is absolute. ``headers`` are sent as given; for PA-API the ``host`` header is
    the marketplace host (signed), which may differ from the URL's host when the endpoint
    is a local simulator.
    """

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes

    def __repr__(self) -> str:
        # Never show header values: they may hold a bearer token or a signature.
        return f"HttpRequest({self.method} {self.url}, headers={sorted(self.headers)})"

    def with_headers(self, extra: Mapping[str, str]) -> HttpRequest:
        """Return a copy with ``extra`` headers added (replacing same-named ones)."""
        replaced = {name.lower() for name in extra}
        merged = {k: v for k, v in self.headers.items() if k.lower() not in replaced}
        merged.update(extra)
        return HttpRequest(self.method, self.url, merged, self.body)


def encode_body(body: Mapping[str, object]) -> bytes:
    """A request body as compact JSON: the bytes that are signed and sent.

    orjson writes it (every GetItems request pays this; the stdlib takes ten times as
    long). orjson writes NaN and infinity as ``null`` where strict JSON must refuse them,
    so a body whose JSON holds ``null`` anywhere (rare: no GetItems body does) is written
    again by the stdlib encoder, which refuses them; so is one orjson refuses (a lone
    surrogate, say) and the stdlib can write.

    Raises:
        ValueError: the body is not JSON (an object of another type, NaN, infinity).
    """
    try:
        data = orjson.dumps(body)
    except orjson.JSONEncodeError:
        pass
    else:
        if b"null" not in data:
            return data
    try:
        return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"request parameters are not JSON: {exc}") from exc


@dataclass(frozen=True, slots=True)
class RawResponse:
    """What the transport read: status, headers (lower-cased names), the whole body, latency."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    elapsed_s: float = 0.0

    def __repr__(self) -> str:
        return f"RawResponse(status={self.status}, bytes={len(self.body)})"


@dataclass(frozen=True, slots=True)
class ItemOutcome:
    """The answer a response gave for one requested ASIN."""

    asin: str
    status: Status
    item: Mapping[str, object] | None = None
    summary: ItemSummary | None = None
    error: ErrorDetail | None = None


@dataclass(frozen=True, slots=True)
class ParsedItems:
    """A GetItems response read item by item.

    Attributes:
        outcomes: one entry per requested ASIN that the response answered (item or error).
        missing: requested ASINs the response did not mention (to be retried).
        unexpected: ASINs in the response that were not requested (ignored, logged).
        duplicated: requested ASINs the response held more than once (the first counts).
    """

    outcomes: Mapping[str, ItemOutcome]
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = field(default=())
    duplicated: tuple[str, ...] = field(default=())


class Dialect(Protocol):
    """Protocol: one wire protocol's request building and response parsing, with no I/O.

    - ``get_items_request`` builds the unsigned GetItems request for 1..10 ASINs.
    - ``operation_request`` builds any other operation from camelCase parameters.
    - ``parse_get_items`` reads a response: per-ASIN outcomes, or raises
      :class:`~broker.errors.ApiError` (whole-request error) or
      :class:`~broker.errors.ResponseError` (unreadable).
    - ``parse_operation`` returns the JSON of any other operation or raises likewise.
    """

    def get_items_request(
        self,
        asins: Sequence[str],
        *,
        marketplace: str,
        partner_tag: str,
        resources: Sequence[str],
    ) -> HttpRequest: ...

    def operation_request(
        self,
        operation: Operation,
        params: Mapping[str, object],
        *,
        marketplace: str,
        partner_tag: str,
    ) -> HttpRequest: ...

    def parse_get_items(self, response: RawResponse, requested: Sequence[str]) -> ParsedItems: ...

    def parse_operation(
        self, response: RawResponse, operation: Operation
    ) -> Mapping[str, object]: ...
