"""The item cache: successful answers kept at most 24 hours (Amazon's rule), shared by processes.

Read before batching (only misses are sent), filled by ``ok`` answers only. Three homes:
:class:`MemoryCache`, :class:`SqliteCache` (the default, in the user's state directory) and
``broker.cache.redis_store.RedisCache`` (imported on demand: redis is optional).

Only the policy values load with the package (``broker.config`` needs them, and every
command imports the config); the stores load on first use, so a command that never
touches the cache does not pay for sqlite3, threads and structlog here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.cache.policy import (
    AMAZON_RULE,
    CEILING_S,
    CacheKey,
    CachePolicy,
    CacheStats,
    has_offer_resources,
    normalise_resources,
)
from broker.lazyimport import lazy_names as _lazy_names

if TYPE_CHECKING:
    from broker.cache.base import ItemCache, StoreCache, key_of
    from broker.cache.front import CacheFront
    from broker.cache.memory import MemoryCache
    from broker.cache.open import (
        LIBRARY_MAX_AGE_S,
        RUN_MAX_AGE_S,
        cache_namespace,
        cache_policy,
        open_cache,
        open_store,
    )
    from broker.cache.paths import default_cache_path, state_dir
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
    "cache_namespace",
    "cache_policy",
    "default_cache_path",
    "has_offer_resources",
    "key_of",
    "normalise_resources",
    "open_cache",
    "open_store",
    "state_dir",
]

_LAZY = {
    "ItemCache": "base",
    "StoreCache": "base",
    "key_of": "base",
    "CacheFront": "front",
    "MemoryCache": "memory",
    "LIBRARY_MAX_AGE_S": "open",
    "RUN_MAX_AGE_S": "open",
    "cache_namespace": "open",
    "cache_policy": "open",
    "open_cache": "open",
    "open_store": "open",
    "default_cache_path": "paths",
    "state_dir": "paths",
    "SqliteCache": "sqlite",
}


if not TYPE_CHECKING:  # run time only (see broker.lazyimport)
    __getattr__, __dir__ = _lazy_names(
        "broker.cache", {name: f"broker.cache.{home}" for name, home in _LAZY.items()}, globals()
    )
