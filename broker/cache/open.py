"""Build the configured item cache: the one place that maps ``[cache]`` to a home."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final

from broker.cache.memory import MemoryCache
from broker.cache.paths import default_cache_path
from broker.cache.policy import CEILING_S, CachePolicy
from broker.cache.sqlite import SqliteCache
from broker.errors import ConfigError

if TYPE_CHECKING:
    from broker.cache.base import StoreCache
    from broker.clock import Clock
    from broker.config import CacheConfig

__all__ = ["LIBRARY_MAX_AGE_S", "RUN_MAX_AGE_S", "open_cache", "open_store"]

#: Library default when ``[cache] max_age_s`` is unset: off.
LIBRARY_MAX_AGE_S: Final = 0.0
#: ``broker run`` / ``lookup`` default when ``[cache] max_age_s`` is unset: Amazon's 24 hours.
RUN_MAX_AGE_S: Final = CEILING_S


def open_cache(
    config: CacheConfig,
    *,
    namespace: str,
    default_max_age_s: float = LIBRARY_MAX_AGE_S,
    max_age_s: float | None = None,
    clock: Clock | None = None,
    batch_size: int = 10,
    environ: Mapping[str, str] | None = None,
) -> StoreCache | None:
    """Return the cache ``config`` describes, or None when it is off (max age 0).

    Args:
        config: the ``[cache]`` table.
        namespace: ``config.api.protocol.value`` (the two protocols' items differ in shape).
        default_max_age_s: used when the config leaves ``max_age_s`` unset
            (:data:`LIBRARY_MAX_AGE_S` or :data:`RUN_MAX_AGE_S`).
        max_age_s: a command-line ``--max-age`` that wins over both; 0 turns the cache off.
        clock: wall time for ages.
        batch_size: ASINs per request, for the requests-saved figure.
        environ: for the default state directory (tests pass a dict).

    Raises:
        ConfigError: a max age above the 86,400 s ceiling (quoting Amazon's rule).
    """
    policy = config.policy(default_max_age_s)
    if max_age_s is not None:
        policy = type(policy)(
            max_age_s, policy.offers_max_age_s, policy.max_items, policy.max_bytes
        )
    if not policy.enabled:
        return None
    return open_store(
        config, policy, namespace=namespace, clock=clock, batch_size=batch_size, environ=environ
    )


def open_store(
    config: CacheConfig,
    policy: CachePolicy,
    *,
    namespace: str,
    clock: Clock | None = None,
    batch_size: int = 10,
    environ: Mapping[str, str] | None = None,
) -> StoreCache:
    """Return the configured home with ``policy``, even a disabled one (for ``broker cache``)."""
    if config.backend == "memory":
        return MemoryCache(policy, namespace=namespace, clock=clock, batch_size=batch_size)
    if config.backend == "redis":
        # Imported here: redis is an optional dependency, needed only for this backend.
        from broker.cache.redis_store import RedisCache

        if config.redis_url is None:
            raise ConfigError("cache.redis_url", 'is required with backend = "redis"')
        return RedisCache.from_url(
            config.redis_url,
            policy,
            key_prefix=config.key_prefix,
            namespace=namespace,
            clock=clock,
            batch_size=batch_size,
        )
    path = Path(config.path) if config.path else default_cache_path(environ)
    return SqliteCache(path, policy, namespace=namespace, clock=clock, batch_size=batch_size)
