"""How Amazon's answers become outcomes and typed errors, the same way for both dialects.

Both APIs are read alike: the body is JSON parsed once, a whole-request failure is classed
by its HTTP status (and a few codes), ``Retry-After`` means the same thing, and per-item
errors name their ASIN only inside the message text. Field spellings (camelCase or
PascalCase) stay in each dialect, which passes them in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Final

from broker.api.base import ItemOutcome, ParsedItems
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
from broker.jsontext import loads
from broker.models import ErrorDetail, ItemSummary, Status

if TYPE_CHECKING:
    from broker.clock import Clock

__all__ = [
    "READ_ERRORS",
    "ItemError",
    "ResultShape",
    "SummaryFields",
    "api_error",
    "assemble",
    "first_object",
    "header",
    "http_date",
    "load_object",
    "not_found_all",
    "number",
    "read_errors",
    "read_items",
    "request_id",
    "require_answer",
    "require_result",
    "retry_after_s",
    "short",
    "strip_type",
    "summarize",
    "text",
    "unreadable_code",
]

#: What reading arbitrary JSON can raise; the public parsers turn these into ResponseError.
#: ``RecursionError`` is there because the C JSON scanner raises it on very deep nesting.
READ_ERRORS: tuple[type[Exception], ...] = (
    KeyError,
    TypeError,
    ValueError,
    AttributeError,
    IndexError,
    OverflowError,
    RecursionError,
)

# Signature and credential codes are AuthError whatever their status (IncompleteSignature
# comes with a 400; the retired-API AccessDenied's status was never captured), so the
# engine's key health sees them as credential problems.
_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedAwsUsers",
        "AssociateEligibilityException",
        "IncompleteSignature",
        "InvalidSignature",
        "RequestExpired",
        "UnrecognizedClient",
    }
)

# Per-item codes and what they mean for the ASIN; any other code naming an ASIN is
# NOT_FOUND with the code kept, because the item cannot be fetched either way.
_ITEM_STATUS: Mapping[str, Status] = {
    "InvalidParameterValue": Status.INVALID,
    "InvalidItemId": Status.INVALID,
    "ItemNotFound": Status.NOT_FOUND,
    "ItemNotAccessible": Status.NOT_FOUND,
}

# An id as Amazon echoes it in a message: ten letters or digits standing alone.
_ID_TOKEN = re.compile(r"(?<![0-9A-Za-z])[0-9A-Za-z]{10}(?![0-9A-Za-z])")

# Messages go into exceptions and output rows; an HTML page or a runaway string must not.
_MAX_MESSAGE = 500


@dataclass(frozen=True, slots=True)
class ItemError:
    """One entry of a 200 response's ``errors`` / ``Errors`` list."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class SummaryFields:
    """How one dialect spells the fields an :class:`ItemSummary` is read from.

    The title is ``item[info][title][display]``; price and currency are
    ``item[offers][listings][0][price][money][amount | currency]``; availability is
    ``listing[availability][type]``, else its ``[message]``; the URL is ``item[url]``; the
    image is ``item[images][primary][size][image_url]`` for the first of ``image_sizes``
    (largest first) the item holds.
    """

    info: str
    title: str
    display: str
    offers: str
    listings: str
    price: str
    money: str
    amount: str
    currency: str
    availability: str
    type: str
    message: str
    url: str
    images: str
    primary: str
    image_sizes: tuple[str, ...]
    image_url: str


def summarize(item: Mapping[str, object], f: SummaryFields) -> ItemSummary:
    """Read the summary of one item; a field that is absent or of the wrong type is None."""
    # Written out rather than through small helpers: this runs for every item of every
    # response, and function calls were most of its cost.
    title: str | None = None
    price: float | None = None
    currency: str | None = None
    availability: str | None = None
    url: str | None = None
    info = item.get(f.info)
    if isinstance(info, dict):
        heading = info.get(f.title)
        if isinstance(heading, dict):
            value = heading.get(f.display)
            if isinstance(value, str):
                title = value
    offers = item.get(f.offers)
    if isinstance(offers, dict):
        listings = offers.get(f.listings)
        listing = listings[0] if isinstance(listings, list) and listings else None
        if isinstance(listing, dict):
            offer_price = listing.get(f.price)
            money = offer_price.get(f.money) if isinstance(offer_price, dict) else None
            if isinstance(money, dict):
                price = number(money.get(f.amount))
                value = money.get(f.currency)
                if isinstance(value, str):
                    currency = value
            stock = listing.get(f.availability)
            if isinstance(stock, dict):
                value = stock.get(f.type)
                if not isinstance(value, str):
                    value = stock.get(f.message)
                if isinstance(value, str):
                    availability = value
    value = item.get(f.url)
    if isinstance(value, str):
        url = value
    image_url: str | None = None
    images = item.get(f.images)
    primary = images.get(f.primary) if isinstance(images, dict) else None
    if isinstance(primary, dict):
        for size in f.image_sizes:
            image = primary.get(size)
            value = image.get(f.image_url) if isinstance(image, dict) else None
            if isinstance(value, str):
                image_url = value
                break
    return ItemSummary(title, price, currency, availability, url, image_url)


class LazySummary(ItemSummary):
    """An :class:`ItemSummary` read from its item only when a field is first read.

    Bulk callers that never look at the summary (a job writing raw items, a benchmark)
    pay one small object per item instead of walking every item's JSON. It compares
    equal to the plain summary with the same values.
    """

    __slots__ = ("_fields", "_item")
    _fields: SummaryFields
    _item: Mapping[str, object]

    def __init__(
        self,
        item: Mapping[str, object] | None = None,
        spelling: SummaryFields | None = None,
        **values: object,
    ) -> None:
        if item is None or spelling is None:
            # dataclasses.replace(summary, price=...) builds the class from every field's
            # value: a summary with those values, read from no item.
            plain = ItemSummary(**values)  # type: ignore[arg-type]
            for name in _SUMMARY_NAMES:
                object.__setattr__(self, name, getattr(plain, name))
            return
        object.__setattr__(self, "_item", item)
        object.__setattr__(self, "_fields", spelling)

    def __getattr__(self, name: str) -> object:
        # Only called for a slot not yet filled: fill them all from the item at once.
        if name not in _SUMMARY_NAMES:
            raise AttributeError(name)
        plain = summarize(self._item, self._fields)
        for field_name in _SUMMARY_NAMES:
            object.__setattr__(self, field_name, getattr(plain, field_name))
        return getattr(plain, name)

    def plain(self) -> ItemSummary:
        """The same values as a plain :class:`ItemSummary`."""
        return ItemSummary(**{name: getattr(self, name) for name in _SUMMARY_NAMES})

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ItemSummary):
            return all(getattr(self, n) == getattr(other, n) for n in _SUMMARY_NAMES)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.plain())

    def __repr__(self) -> str:
        return repr(self.plain())


_SUMMARY_NAMES = tuple(f.name for f in dataclass_fields(ItemSummary))


def load_object(body: bytes, *, status: int, what: str) -> Mapping[str, object]:
    """Parse ``body`` as one JSON object.

    Raises:
        ResponseError: not JSON, not UTF-8, too deep, or not an object; the message says
            which without quoting the body (a token response holds a credential).
    """
    try:
        data = loads(body, answer=True)
    except (ValueError, RecursionError) as exc:
        raise ResponseError(
            f"{what}: HTTP {status} body is not JSON ({len(body)} bytes, {type(exc).__name__})",
            status=status,
        ) from exc
    if not isinstance(data, dict):
        raise ResponseError(
            f"{what}: HTTP {status} body is JSON {type(data).__name__}, not an object",
            status=status,
        )
    return data


#: The code a 4xx answer whose body is no JSON at all (an HTML page: a wrong path, a proxy)
#: stands for. No retry mends these (protocol.md 4 retries 429, 5xx and network errors
#: only): a 404 or 405 is a URL that is no operation (a path in api.endpoint), the others a
#: request the server would not take. 401, 403 and 408 are left to be retried: a
#: gateway's page for those may pass. A body that begins as JSON is Amazon's own answer cut
#: short (reliability.md B6): retried, whatever its status.
_UNREADABLE_4XX: Final[Mapping[int, str]] = {
    400: "Other",
    404: "UnknownOperation",
    405: "UnknownOperation",
    411: "Other",
    413: "Other",
    414: "Other",
    415: "Other",
    422: "Other",
    431: "Other",
}


def wrong_path_code(status: int) -> str | None:
    """``UnknownOperation`` for a 404 or 405 whose JSON body names no code (a gateway's
    "Not Found" for a path in api.endpoint, no answer of the API's): as when its body is
    not JSON, no retry mends it. None for any other status."""
    return "UnknownOperation" if status in (404, 405) else None


def unreadable_code(status: int, body: bytes) -> str | None:
    """The error code of a ``status`` answer whose unreadable ``body`` is no API answer,
    or None when it is to be retried (a JSON answer cut short, or a status a page for
    which may pass)."""
    if body.lstrip()[:1] in (b"{", b"["):
        return None
    return _UNREADABLE_4XX.get(status)


def read_items(
    container: object, *, items: str, asin: str, api: str
) -> list[tuple[str, Mapping[str, object]]]:
    """Return ``(asin, item)`` pairs from a result container (``itemsResult`` and the like).

    Args:
        container: the container's value; None (absent or null) means no items.
        items: the key of the item list in it; asin: the key of each item's ASIN.
        api: names the API in error messages.

    Raises:
        ResponseError: the container, its list or an item is not shaped as documented.
    """
    if container is None:
        return []
    if not isinstance(container, dict):
        raise ResponseError(f"{api} response: the result is not an object", status=200)
    raw = container.get(items)
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ResponseError(f"{api} response: {items} is not a list", status=200)
    found: list[tuple[str, Mapping[str, object]]] = []
    for item in raw:
        value = item.get(asin) if isinstance(item, dict) else None
        if not isinstance(value, str):
            raise ResponseError(f"{api} response: an item has no {asin}", status=200)
        found.append((value, item))
    return found


def read_errors(raw: object, *, code: str, message: str, api: str) -> list[ItemError]:
    """Return a 200 response's per-item errors (``errors`` / ``Errors``); None means none.

    Raises:
        ResponseError: not a list, or an entry without a string ``code``.
    """
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ResponseError(f"{api} response: the error list is not a list", status=200)
    found: list[ItemError] = []
    for entry in raw:
        value = entry.get(code) if isinstance(entry, dict) else None
        if not isinstance(value, str):
            raise ResponseError(f"{api} response: an error has no {code}", status=200)
        found.append(ItemError(value, text(entry.get(message)) or ""))
    return found


def first_object(value: object) -> Mapping[str, object] | None:
    """Return the first element of a JSON array if it is an object, else None."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return value[0]
    return None


def text(value: object) -> str | None:
    """Return ``value`` if it is a string, else None."""
    return value if isinstance(value, str) else None


def number(value: object) -> float | None:
    """Return ``value`` as a finite float if it is a JSON number (not a bool), else None."""
    # Exact type checks: bool is an int subclass, and JSON numbers are exactly int or float.
    if type(value) is float:
        return value if math.isfinite(value) else None
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:
            return None
    return None


def short(message: str) -> str:
    """Cap a message from Amazon at a length fit for logs and output rows."""
    return message if len(message) <= _MAX_MESSAGE else message[: _MAX_MESSAGE - 3] + "..."


def strip_type(value: object) -> str | None:
    """Return an exception type without its namespace (``com.amazon.paapi5#X`` -> ``X``),
    and without an ``Exception`` suffix the code of Amazon's tables lacks (an AWS-style
    ``...#RequestExpiredException`` is the table's ``RequestExpired``)."""
    if not isinstance(value, str) or not value:
        return None
    name = value.rpartition("#")[2]
    bare = name.removesuffix("Exception")
    if name not in CATALOGUE and bare in CATALOGUE:
        return bare
    return name or None


def header(headers: Mapping[str, str], name: str) -> str | None:
    """Return header ``name`` (lower-case), tolerating transports that kept the case."""
    value = headers.get(name)
    if value is not None:
        return value
    for key, candidate in headers.items():
        if key.lower() == name:
            return candidate
    return None


def retry_after_s(
    body_value: object, headers: Mapping[str, str], clock: Clock | None = None
) -> float | None:
    """Return how long the server asked us to wait, in seconds, or None.

    The body's ``retryAfterSeconds`` wins; then the ``Retry-After`` header, as seconds or
    as an HTTP-date. An HTTP-date is measured against the response's own ``Date`` header
    (both come from the server's clock, so our clock's error cancels out), else against
    ``clock.utcnow()``. Negative waits become 0.
    """
    seconds = number(body_value)
    if seconds is None and isinstance(body_value, str):
        seconds = _seconds(body_value)
    if seconds is not None:
        return max(0.0, seconds)
    raw = header(headers, "retry-after")
    if raw is None:
        return None
    seconds = _seconds(raw)
    if seconds is not None:
        return max(0.0, seconds)
    until = http_date(raw)
    if until is None:
        return None
    server_now = http_date(header(headers, "date") or "")
    now = server_now or (clock.utcnow() if clock is not None else None)
    if now is None:
        return None
    return max(0.0, (until - now).total_seconds())


def _seconds(raw: str) -> float | None:
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def http_date(raw: str) -> datetime | None:
    """An HTTP-date header value (``Date``, ``Retry-After``) as an aware datetime, or None
    when it is empty or not one."""
    if not raw:
        return None
    try:
        moment = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    # An HTTP-date is GMT by definition; a naive result means the zone was written "-0000".
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def api_error(
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str],
    *,
    retry_after: float | None = None,
) -> ApiError:
    """Build the :class:`ApiError` subclass for a whole-request failure.

    429 is :class:`ThrottledError`; 401, 403 and signature codes :class:`AuthError`; 5xx
    :class:`ServerError`; anything else :class:`BadRequestError`. ``server_date`` is the
    response's ``Date`` header, from which the engine learns our clock's offset;
    ``request_id`` Amazon's id of the request.
    """
    cls: type[ApiError]
    if status == 429:
        cls = ThrottledError
    elif status in (401, 403) or code in _AUTH_CODES:
        cls = AuthError
    elif status >= 500:
        cls = ServerError
    else:
        cls = BadRequestError
    return cls(
        code,
        short(message),
        status=status,
        retry_after=retry_after,
        server_date=header(headers, "date"),
        request_id=request_id(headers),
    )


def request_id(headers: Mapping[str, str]) -> str | None:
    """Amazon's id of the request, from the first header of the names clients read (the
    header's name is not documented: python-amazon-paapi reads these three)."""
    for name in ("x-amzn-requestid", "x-amzn-request-id", "x-amz-request-id"):
        value = header(headers, name)
        if value:
            # Shown in messages: kept short and to one line, whatever a gateway sends.
            return short(" ".join(value.split()))
    return None


def _detail(code: str, message: str) -> ErrorDetail:
    return ErrorDetail(code, short(message), describe(code).remedy)


def assemble(
    requested: Sequence[str],
    items: Iterable[tuple[str, Mapping[str, object]]],
    errors: Sequence[ItemError],
    summary: Callable[[Mapping[str, object]], ItemSummary],
    *,
    status: int,
    headers: Mapping[str, str],
) -> ParsedItems:
    """Match a 200 response's items and per-item errors to the requested ASINs.

    ``summary`` reads one item's :class:`ItemSummary` (the dialect's spelling).

    - Items are keyed by their ASIN (case-insensitively); a duplicate keeps the first (and
      goes to ``duplicated``), one nobody asked for goes to ``unexpected``.
    - An error is attributed to every requested, still unanswered ASIN its message names.
      If exactly one per-item error names none and exactly one ASIN is unanswered, it is
      that ASIN's (the only reading that fits).
    - Requested ASINs left unanswered are ``missing``, so the engine retries them.

    Raises:
        BadRequestError: nothing was answered and the errors name no ASIN and are not
            per-item codes: the 200 carries a request-level error (``NoResults``, say).
    """
    index = {asin.upper(): asin for asin in requested}
    outcomes: dict[str, ItemOutcome] = {}
    unexpected: dict[str, None] = {}
    duplicated: dict[str, None] = {}
    for asin, item in items:
        key = index.get(asin.upper())
        if key is None:
            unexpected[asin] = None
        elif key not in outcomes:
            outcomes[key] = ItemOutcome(key, Status.OK, item, summary(item))
        else:
            duplicated[key] = None
    unnamed: list[ItemError] = []
    for error in errors:
        named = False
        for token in _ID_TOKEN.findall(error.message):
            key = index.get(token.upper())
            if key is None:
                continue
            named = True
            if key not in outcomes:
                outcomes[key] = _error_outcome(key, error)
        if not named:
            unnamed.append(error)
    if unnamed:
        per_item = [e for e in unnamed if e.code in _ITEM_STATUS]
        open_asins = [asin for asin in index.values() if asin not in outcomes]
        if len(per_item) == 1 and len(open_asins) == 1:
            outcomes[open_asins[0]] = _error_outcome(open_asins[0], per_item[0])
        elif not outcomes:
            request_level = next((e for e in unnamed if e.code not in _ITEM_STATUS), None)
            if request_level is not None:
                raise api_error(status, request_level.code, request_level.message, headers)
    missing = tuple(asin for asin in index.values() if asin not in outcomes)
    return ParsedItems(outcomes, missing, tuple(unexpected), tuple(duplicated))


def require_answer(
    data: Mapping[str, object], container: object, errors_key: str, *, api: str
) -> None:
    """Refuse a 200 GetItems body that holds neither a result container nor an error list.

    Amazon's every 200 answer carries one or both, so a body with neither (only unknown
    fields, or nothing) is the wrong shape, not "every item missing": reading it as missing
    items would report real ASINs ``not_found`` (reliability B7). Unknown fields *next to*
    the documented ones are ignored, so a field Amazon adds later breaks nothing.

    Raises:
        ResponseError: neither is present.
    """
    if container is None and data.get(errors_key) is None:
        raise ResponseError(
            f"{api} GetItems: HTTP 200 body has no result and no error list "
            f"({len(data)} other fields)",
            status=200,
        )


@dataclass(frozen=True, slots=True)
class ResultShape:
    """Where an operation's answer keeps its entries, in one protocol's spelling.

    Attributes:
        container: the result object (``searchResult``).
        entries: the list inside it (``items``, ``browseNodes``).
        ident: the member every entry carries (``asin``, ``id``).
    """

    container: str
    entries: str
    ident: str


def require_result(data: Mapping[str, object], shape: ResultShape, *, what: str) -> None:
    """Refuse a 200 answer of SearchItems, GetVariations or GetBrowseNodes of the wrong shape.

    The readers of these answers never raise, so a body without its result container (or
    with entries that are not objects carrying their id) would read as "nothing found".
    Like a GetItems body of the wrong shape (reliability B7) it is a :class:`ResponseError`,
    retried. Unknown fields next to the documented ones are ignored.

    Raises:
        ResponseError: the container, its entry list or an entry's id is missing or of
            the wrong type.
    """
    container = data.get(shape.container)
    if not isinstance(container, Mapping):
        problem = f"no {shape.container} object"
    else:
        entries = container.get(shape.entries)
        if not isinstance(entries, list):
            problem = f"{shape.container}.{shape.entries} is not a list"
        elif not all(
            isinstance(entry, Mapping) and isinstance(entry.get(shape.ident), str | int)
            for entry in entries
        ):
            problem = f"an entry of {shape.container}.{shape.entries} has no {shape.ident}"
        else:
            return
    raise ResponseError(f"{what}: HTTP 200 body has the wrong shape ({problem})", status=200)


def _error_outcome(asin: str, error: ItemError) -> ItemOutcome:
    status = _ITEM_STATUS.get(error.code, Status.NOT_FOUND)
    return ItemOutcome(asin, status, error=_detail(error.code, error.message))


def not_found_all(requested: Sequence[str], code: str, message: str) -> ParsedItems:
    """Every requested ASIN NOT_FOUND with the same error (Creators' 404 for an all-bad batch)."""
    detail = _detail(code, message)
    outcomes = {
        asin: ItemOutcome(asin, Status.NOT_FOUND, error=detail) for asin in dict.fromkeys(requested)
    }
    return ParsedItems(outcomes)
