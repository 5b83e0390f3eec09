"""Build the configured item cache: the one place that maps ``[cache]`` to a home."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final

from broker.cache.memory import MemoryCache
from broker.cache.paths import default_cache_path
from broker.cache.policy import CEILING_S, CachePolicy
from broker.cache.sqlite import SqliteCache
from broker.config import AMAZON, SIMULATOR
from broker.errors import ConfigError

if TYPE_CHECKING:
    from broker.cache.base import StoreCache
    from broker.clock import Clock
    from broker.config import BrokerConfig, CacheConfig

__all__ = [
    "LIBRARY_MAX_AGE_S",
    "RUN_MAX_AGE_S",
    "cache_namespace",
    "cache_policy",
    "open_cache",
    "open_store",
]

#: Library default when ``[cache] max_age_s`` is unset: off.
LIBRARY_MAX_AGE_S: Final = 0.0
#: ``broker run`` / ``lookup`` default when ``[cache] max_age_s`` is unset: Amazon's 24 hours.
RUN_MAX_AGE_S: Final = CEILING_S


def cache_namespace(config: BrokerConfig) -> str:
    """Whose answers a cache holds: the protocol, the endpoint and the keys' partner tags.

    The two protocols' item JSON differs in shape, and an answer from the simulator must
    never be served to a run against Amazon (nor one from Amazon to a test run). The
    embedded simulator is one source whatever port it listens on (every run starts its
    own), as is Amazon; any other endpoint URL is its own source, named by a short digest
    so Redis keys and SQLite rows stay short. Amazon writes the request's partner tag into
    an item's links (``detailPageURL``), so answers asked with other tags are not this
    config's to serve: the tags of every key (and, for the embedded simulator, its
    ``[simulator]`` table but the accounts, as the seed makes its catalogue) end the name
    as a digest: ``creators.simulator.1c9e4f0a``, ``paapi5.amazon.77d0b2e1``,
    ``creators.url-3f9a0c1b2d4e.9b04c1d2``.
    """
    api = config.api
    if api.endpoint in (SIMULATOR, AMAZON):
        source = api.endpoint
    else:
        source = "url-" + _digest(api.endpoint, 6)
    tags = sorted(
        {f"{market}={tag}" for key in config.keys for market, tag in key.partner_tags.items()}
    )
    shaped: dict[str, object] = {"tags": tags}
    if api.endpoint == SIMULATOR:
        shaped["simulator"] = {k: v for k, v in config.simulator.data.items() if k != "accounts"}
    answers = _digest(json.dumps(shaped, sort_keys=True, default=str), 4)
    return f"{api.protocol.value}.{source}.{answers}"


def _digest(text: str, size: int) -> str:
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


def cache_policy(
    config: CacheConfig, *, default_max_age_s: float, max_age_s: float | None = None
) -> CachePolicy:
    """The policy a run gets: ``max_age_s`` (``--max-age``; 0 is off) over the config's
    ``[cache] max_age_s``, over ``default_max_age_s`` when that is unset."""
    policy = config.policy(default_max_age_s)
    if max_age_s is not None:
        policy = type(policy)(
            max_age_s, policy.offers_max_age_s, policy.max_items, policy.max_bytes
        )
    return policy


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
        namespace: whose answers these are (:func:`cache_namespace`).
        default_max_age_s: used when the config leaves ``max_age_s`` unset
            (:data:`LIBRARY_MAX_AGE_S` or :data:`RUN_MAX_AGE_S`).
        max_age_s: a command-line ``--max-age`` that wins over both; 0 turns the cache off.
        clock: wall time for ages.
        batch_size: ASINs per request, for the requests-saved figure.
        environ: for the default state directory (tests pass a dict).

    Raises:
        ConfigError: a max age above the 86,400 s ceiling (quoting Amazon's rule).
    """
    policy = cache_policy(config, default_max_age_s=default_max_age_s, max_age_s=max_age_s)
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
            variable = config.redis_url_env
            if variable is None:
                raise ConfigError("cache.redis_url", 'is required with backend = "redis"')
            # Not read at load: the config was read without secrets (broker cache).
            environ = os.environ if environ is None else environ
            raise ConfigError(
                "cache.redis_url_env",
                f"environment variable {variable} is "
                f"{'empty' if variable in environ else 'not set'}",
            )
        try:
            return RedisCache.from_url(
                config.redis_url.reveal(),
                policy,
                key_prefix=config.key_prefix,
                namespace=namespace,
                clock=clock,
                batch_size=batch_size,
                setting=(
                    "[cache] redis_url"
                    if config.redis_url_env is None
                    else f"the URL in {config.redis_url_env} ([cache] redis_url_env)"
                ),
            )
        except ConfigError as exc:
            if config.redis_url_env is None:
                raise
            # The URL came from the environment: name the setting the user wrote.
            raise ConfigError(
                "cache.redis_url_env",
                f"the variable {config.redis_url_env} {exc.message}",
            ) from None
    path = Path(config.path) if config.path else default_cache_path(environ)
    return SqliteCache(path, policy, namespace=namespace, clock=clock, batch_size=batch_size)
