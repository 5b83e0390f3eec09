"""The item cache: successful answers kept at most 24 hours (Amazon's rule), shared by processes.

Read before batching (only misses are sent), filled by ``ok`` answers only. Three homes:
:class:`MemoryCache`, :class:`SqliteCache` (the default, in the user's state directory) and
``broker.cache.redis_store.RedisCache`` (imported on demand: redis is optional).
"""

from broker.cache.base import ItemCache, StoreCache, key_of
from broker.cache.front import CacheFront
from broker.cache.memory import MemoryCache
from broker.cache.open import LIBRARY_MAX_AGE_S, RUN_MAX_AGE_S, open_cache
from broker.cache.paths import default_cache_path, state_dir
from broker.cache.policy import (
    AMAZON_RULE,
    CEILING_S,
    CacheKey,
    CachePolicy,
    CacheStats,
    has_offer_resources,
    normalise_resources,
)
from broker.cache.sqlite import SqliteCache

__all__ = [
    "AMAZON_RULE",
    "CEILING_S",
    "LIBRARY_MAX_AGE_S",
    "RUN_MAX_AGE_S",
    "CacheFront",
    "CacheKey",
    "CachePolicy",
    "CacheStats",
    "ItemCache",
    "MemoryCache",
    "SqliteCache",
    "StoreCache",
    "default_cache_path",
    "has_offer_resources",
    "key_of",
    "normalise_resources",
    "open_cache",
    "state_dir",
]
