"""Values that flow down the pipeline: lookups, batches and per-ASIN results.

All are frozen, slotted dataclasses; JSON payloads from Amazon travel as plain
``Mapping[str, object]`` so nothing here knows either wire format.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Final, cast

if TYPE_CHECKING:
    from broker.product import Product

__all__ = [
    "ErrorDetail",
    "ItemResult",
    "ItemSummary",
    "Protocol",
    "Query",
    "Secret",
    "Status",
]


class Protocol(enum.Enum):
    """The two wire protocols the broker speaks."""

    #: Amazon Creators API: OAuth2 bearer tokens, camelCase JSON, one host
    CREATORS = "creators"
    #: Product Advertising API 5.0 (retired 2026): SigV4, PascalCase JSON, a host per marketplace
    PAAPI5 = "paapi5"


class Status(enum.Enum):
    """The outcome of one ASIN lookup."""

    #: Amazon returned the item
    OK = "ok"
    #: Amazon says the item does not exist (or is not accessible through the API)
    NOT_FOUND = "not_found"
    #: the id is malformed (never sent) or Amazon rejected it as invalid
    INVALID = "invalid"
    #: every attempt failed, or no key could serve it; ``error`` says why
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ErrorDetail:
    """Why a lookup did not end ``ok``: Amazon's code and message, and what to do."""

    code: str
    message: str
    remedy: str

    def to_json(self) -> dict[str, str]:
        """Return the error as the JSON object of an output row."""
        return {"code": self.code, "message": self.message, "remedy": self.remedy}


@dataclass(frozen=True, slots=True)
class ItemSummary:
    """A small typed view of an item, the same for both protocols."""

    title: str | None = None
    price: float | None = None
    currency: str | None = None
    availability: str | None = None
    detail_url: str | None = None
    #: the primary image's URL, the largest size the response holds
    image_url: str | None = None

    def to_json(self) -> dict[str, object]:
        """Return the summary as a JSON object."""
        return {
            "title": self.title,
            "price": self.price,
            "currency": self.currency,
            "availability": self.availability,
            "detail_url": self.detail_url,
            "image_url": self.image_url,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ItemSummary:
        """Read back what :meth:`to_json` wrote; a value of the wrong type reads as None."""
        raw = data.get("price")
        price = float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else None
        return cls(
            title=_text(data.get("title")),
            price=price,
            currency=_text(data.get("currency")),
            availability=_text(data.get("availability")),
            detail_url=_text(data.get("detail_url")),
            image_url=_text(data.get("image_url")),
        )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class Query:
    """What a caller asked: one ASIN, with optional marketplace, resources and caller tag.

    ``marketplace`` and ``resources`` left as None take the config's defaults; the broker
    fills them in, so every :class:`ItemResult` carries the complete query it answers.
    ``tag`` is opaque to the broker (a row number, a request id): it comes back unchanged
    with the result, so callers never match answers back by guessing. ``resources`` given
    as a list is kept as its tuple: a query is a value, hashable like its result.
    """

    asin: str
    marketplace: str | None = None
    resources: tuple[str, ...] | None = None
    tag: object = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # A list is what call-level ``resources=`` takes and the README shows; kept as it
        # came, the query could go in no set or dict (``hash`` raised TypeError).
        given: object = self.resources
        if isinstance(given, list):
            object.__setattr__(self, "resources", tuple(given))


class _ProductSlot:
    """Where :class:`ItemResult` keeps its typed item once read: a slot outside its fields,
    so ``dataclasses.asdict``, ``fields`` and pydantic (a FastAPI response model) see the
    result alone, the same before and after ``product`` was read. As a field it showed in
    them, as None or as the whole typed product again."""

    __slots__ = ("_product",)
    _product: object


@dataclass(frozen=True, slots=True)
class ItemResult(_ProductSlot):
    """The answer for one ASIN in one marketplace.

    Attributes:
        asin: the normalised ASIN (or the raw input when it was invalid).
        marketplace: for example ``www.amazon.com``.
        status: ok / not_found / invalid / failed.
        item: the raw item JSON as Amazon sent it (camelCase for Creators, PascalCase
            for PA-API), or None.
        summary: title, price, currency, availability, detail URL; None unless ok.
        error: why it is not ok, or None.
        attempts: how many requests carried this ASIN.
        key: the name of the key that answered, or None.
        fetched_at: when the answer arrived (UTC), or None if nothing was sent.
        query: the query this result answers, complete (marketplace and resources filled
            in) and with the caller's tag.
        cached: True when the answer came from the item cache instead of a request
            (``fetched_at`` is then when Amazon originally sent it).
        product: ``item`` as typed values (see :class:`broker.product.Product`), read on
            first access and kept; None when there is no item.
    """

    asin: str
    marketplace: str
    status: Status
    # Compared, but left out of the hash (a dict has none): equal results still hash
    # equal, and an ok result goes in a set as a failed one does.
    item: Mapping[str, object] | None = field(default=None, hash=False)
    summary: ItemSummary | None = None
    error: ErrorDetail | None = None
    attempts: int = 0
    key: str | None = None
    fetched_at: datetime | None = field(default=None)
    query: Query | None = field(default=None, compare=False)
    cached: bool = False

    @property
    def ok(self) -> bool:
        """True when Amazon returned the item."""
        return self.status is Status.OK

    @property
    def tag(self) -> object:
        """The caller's tag of the query this result answers (None without one)."""
        return None if self.query is None else self.query.tag

    @property
    def product(self) -> Product | None:
        """The item as typed values, the same for both APIs; None when there is no item.

        Read from ``item`` on first access (the spelling, camelCase or PascalCase, tells
        which API sent it) and kept, so later reads are free.
        """
        # Built on first access: results nobody reads it from (bulk jobs) pay only an
        # empty slot.
        kept = getattr(self, "_product", None)
        if kept is not None:
            return cast("Product", kept)
        if self.item is None:
            return None
        from broker.product import read_product

        product = read_product(self.item)
        # A frozen dataclass: the cache slot is set behind its back, once.
        object.__setattr__(self, "_product", product)
        return product

    def to_json(self) -> dict[str, object]:
        """Return the result as the JSON object used by ``broker lookup`` and output rows."""
        return {
            "asin": self.asin,
            "marketplace": self.marketplace,
            "status": self.status.value,
            "item": self.item,
            "summary": self.summary.to_json() if self.summary else None,
            "error": self.error.to_json() if self.error else None,
            "attempts": self.attempts,
            "key": self.key,
            "fetched_at": _iso(self.fetched_at),
            "cached": self.cached,
        }


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


#: Why a config holding a secret does not reach a ``spawn`` or ``forkserver`` worker, and what
#: to hand the worker instead.
SECRET_NOT_PICKLED: Final = (
    "a Secret cannot be pickled (it would be written out in the clear), nor a config holding "
    "one: hand a worker process the config file's path and open its broker there with "
    "from_config(path) (or the mapping and its secrets, for config_from_dict)"
)


class Secret:
    """A credential that never shows itself: ``repr`` and ``str`` are ``'***'``.

    Call :meth:`reveal` at the one place the value is needed (signing, the token request).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret value itself."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        # f"{secret:>20}" pads the mask instead of failing (object.__format__ refuses a spec).
        return format("***", spec)

    def __eq__(self, other: object) -> bool:
        # Constant time: how long a comparison takes must not tell how much of it matched.
        return isinstance(other, Secret) and hmac.compare_digest(
            other._value.encode(), self._value.encode()
        )

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError(SECRET_NOT_PICKLED)

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: object) -> Secret:
        # Immutable: a copy is the same secret, so a config can be deep-copied (never pickled).
        return self
