"""The shapes shared by both wire protocols: an HTTP request, a raw response, parsed items.

A dialect (:mod:`broker.api.creators`, :mod:`broker.api.paapi5`) turns a lookup into an
unsigned :class:`HttpRequest` and a :class:`RawResponse` back into per-ASIN
:class:`ItemOutcome` values or a typed :class:`~broker.errors.ApiError`. Authorization
(bearer token or SigV4) is added later, at dispatch time, by the engine.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from broker.models import ErrorDetail, ItemSummary, Status

__all__ = [
    "Dialect",
    "HttpRequest",
    "ItemOutcome",
    "Operation",
    "ParsedItems",
    "RawResponse",
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
        merged = {
            k: v for k, v in self.headers.items() if k.lower() not in {e.lower() for e in extra}
        }
        merged.update(extra)
        return HttpRequest(self.method, self.url, merged, self.body)


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

    def parse_operation(self, response: RawResponse) -> Mapping[str, object]: ...
