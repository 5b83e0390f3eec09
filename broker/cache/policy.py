"""What the item cache may keep and serve: Amazon's 24-hour rule, the offers TTL, the size bound.

The values here are pure: a :class:`CachePolicy` says how old an answer may be for the
resources asked, and :class:`CacheKey` names one cached answer, whatever order or spelling
the resources were given in.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from broker.errors import ConfigError

__all__ = [
    "AMAZON_RULE",
    "CEILING_S",
    "FUTURE_S",
    "CacheKey",
    "CachePolicy",
    "CacheStats",
    "check_max_age",
    "has_offer_resources",
    "normalise_resources",
]

#: Amazon allows product content to be cached for at most a day.
CEILING_S: Final = 86_400.0

#: How far ahead of this clock an answer's ``fetched_at`` may be and still be trusted (another
#: machine's clock a little ahead); further ahead, the clock was set back since it was stored.
FUTURE_S: Final = 60.0

#: The clause the ceiling comes from (Associates Program IP License, clause (h)).
AMAZON_RULE: Final = (
    "Amazon's Associates licence allows Product Advertising Content to be cached "
    '"up to 24 hours, after which it must be refreshed through the API" '
    "(86,400 s; ASINs themselves may be stored indefinitely)"
)

# Price and availability live under these resource roots in both protocols (Creators
# offersV2.*, PA-API OffersV2.*, its RentalOffers.* and the retired Offers.*), and the
# trade-in price under itemInfo.tradeInInfo; compared case-folded.
_OFFER_ROOTS: Final = ("offersv2", "offers", "rentaloffers")
_PRICED_INFO: Final = "iteminfo.tradeininfo"


def normalise_resources(resources: Iterable[str]) -> tuple[str, ...]:
    """Resources as one canonical tuple: stripped, case-folded, duplicates dropped, sorted.

    ``offersV2.listings.price`` and ``OffersV2.Listings.Price`` name the same field in the
    two protocols, and the order a caller lists resources in does not change the answer.
    """
    return _normalised(tuple(resources))


# A run asks for a handful of distinct resource sets, once per ASIN: remember them.
@functools.lru_cache(maxsize=256)
def _normalised(resources: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted({name.strip().casefold() for name in resources if name.strip()}))


def has_offer_resources(resources: Iterable[str]) -> bool:
    """True when any resource is a price or availability field (offersV2.*, Offers.*,
    itemInfo.tradeInInfo, whose answer holds a trade-in price)."""
    return _has_offers(tuple(resources))


@functools.lru_cache(maxsize=256)
def _has_offers(resources: tuple[str, ...]) -> bool:
    folded = [name.strip().casefold() for name in resources]
    return any(
        name.split(".", 1)[0] in _OFFER_ROOTS or name.startswith(_PRICED_INFO) for name in folded
    )


def check_max_age(value: float, path: str) -> float:
    """Return ``value`` if it is a usable max age in seconds, else raise.

    Raises:
        ConfigError: negative, not finite, or above Amazon's 24-hour ceiling (the message
            quotes the rule).
    """
    if not value >= 0.0 or value == float("inf"):
        raise ConfigError(path, f"must be a number of seconds >= 0, got {value:.15g}")
    if value > CEILING_S:
        raise ConfigError(
            path,
            f"{value:.15g} s is above the 86,400 s ceiling: {AMAZON_RULE}; use at most 86400",
        )
    return float(value)


@dataclass(frozen=True, slots=True)
class CacheKey:
    """One cached answer: marketplace, ASIN and the normalised resource set.

    Build it with :meth:`of`, which normalises; two keys are equal exactly when the same
    answer would serve both.
    """

    marketplace: str
    asin: str
    resources: tuple[str, ...]

    @classmethod
    def of(cls, marketplace: str, asin: str, resources: Iterable[str]) -> CacheKey:
        """Normalise and build a key (ASIN upper-cased, resources canonical)."""
        return cls(
            marketplace.strip().casefold(), asin.strip().upper(), normalise_resources(resources)
        )

    @property
    def offers(self) -> bool:
        """True when the key asks for price or availability."""
        return has_offer_resources(self.resources)

    def text(self) -> str:
        """A stable one-line form (``marketplace|ASIN|res1,res2``), used as a storage key."""
        return f"{self.marketplace}|{self.asin}|{','.join(self.resources)}"


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """How old a cached answer may be, and how much the cache may hold.

    Attributes:
        max_age_s: an answer older than this is a miss; 0 turns the cache off. At most
            86,400 (Amazon's rule, :data:`AMAZON_RULE`).
        offers_max_age_s: when the resources asked include price or availability
            (offersV2.*, Offers.*), an answer older than this is a miss too.
        max_items: entries kept at most; the oldest answers are evicted beyond it.
        max_bytes: stored payload bytes at most (0: no byte bound); oldest evicted first.
    """

    max_age_s: float = 0.0
    offers_max_age_s: float = 3_600.0
    max_items: int = 100_000
    max_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        check_max_age(self.max_age_s, "cache.max_age_s")
        check_max_age(self.offers_max_age_s, "cache.offers_max_age_s")
        if self.max_items < 1:
            raise ConfigError("cache.max_items", f"must be >= 1, got {self.max_items}")
        if self.max_bytes < 0:
            raise ConfigError("cache.max_bytes", f"must be >= 0, got {self.max_bytes}")

    @property
    def enabled(self) -> bool:
        """False when ``max_age_s`` is 0: nothing is served."""
        return self.max_age_s > 0

    def limit_s(self, key: CacheKey, max_age_s: float | None = None) -> float:
        """The oldest an answer for ``key`` may be, in seconds.

        ``max_age_s`` overrides the policy's (``--max-age``); it is still capped by the
        ceiling and, for offer resources, by ``offers_max_age_s``.
        """
        limit = self.max_age_s if max_age_s is None else check_max_age(max_age_s, "max_age_s")
        if key.offers:
            limit = min(limit, self.offers_max_age_s)
        return min(limit, CEILING_S)

    def fresh(self, key: CacheKey, age_s: float, max_age_s: float | None = None) -> bool:
        """True when an answer ``age_s`` old may be served for ``key``.

        An answer from the future (a wall clock moved back, another machine's clock ahead
        by more than ``FUTURE_S``) is not trusted.
        """
        limit = self.limit_s(key, max_age_s)
        return limit > 0 and -FUTURE_S <= age_s <= limit


@dataclass(frozen=True, slots=True)
class CacheStats:
    """What the cache did and holds, for ``broker cache stats`` and the metrics endpoint.

    Attributes:
        hits: lookups answered from the cache (since this cache object was opened).
        misses: lookups the cache could not answer (absent, too old, unreadable).
        requests_saved: GetItems requests the hits replaced, counted at full batches
            (hits // batch size): a lower bound of the quota saved.
        entries: answers of this namespace the store holds now (every process's).
        bytes: their payload bytes.
        evictions: entries dropped to keep the size bound (since this object was opened).
        oldest_age_s: age of the oldest stored answer, None when empty.
    """

    hits: int
    misses: int
    requests_saved: int
    entries: int
    bytes: int
    evictions: int
    oldest_age_s: float | None = None

    def families(self) -> tuple[tuple[str, str, str, float], ...]:
        """Prometheus families as (name, type, help, value), for the metrics endpoint."""
        return (
            (
                "asinb_cache_hits_total",
                "counter",
                "Lookups answered from the item cache.",
                self.hits,
            ),
            (
                "asinb_cache_misses_total",
                "counter",
                "Lookups the item cache could not answer.",
                self.misses,
            ),
            (
                "asinb_cache_requests_saved_total",
                "counter",
                "GetItems requests the cache hits replaced (hits / batch size).",
                self.requests_saved,
            ),
            (
                "asinb_cache_evictions_total",
                "counter",
                "Entries evicted to keep the item cache's size bound.",
                self.evictions,
            ),
            ("asinb_cache_entries", "gauge", "Answers the item cache holds.", self.entries),
            ("asinb_cache_bytes", "gauge", "Payload bytes the item cache holds.", self.bytes),
        )

    def to_json(self) -> dict[str, object]:
        """Return the stats as a JSON object."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "requests_saved": self.requests_saved,
            "entries": self.entries,
            "bytes": self.bytes,
            "evictions": self.evictions,
            "oldest_age_s": self.oldest_age_s,
        }
