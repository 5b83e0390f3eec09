"""asin-broker: an asynchronous, rate-limited request broker for Amazon's product APIs."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from broker.errors import (
    ApiError,
    BrokerClosedError,
    BrokerError,
    ConfigError,
    JobFileError,
    NoUsableKeyError,
    WrongEventLoopError,
)
from broker.lazyimport import lazy_names as _lazy_names
from broker.models import ErrorDetail, ItemResult, ItemSummary, Protocol, Query, Secret, Status
from broker.product import Product

if TYPE_CHECKING:
    from broker.api.operations import BrowseNodesResult, SearchResult, VariationsResult
    from broker.cache.policy import CacheStats
    from broker.client import Broker
    from broker.config import config_from_dict
    from broker.engine.metrics import KeySnapshot, MetricsSnapshot
    from broker.sync import SyncBroker

try:
    __version__ = version("asin-broker")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "ApiError",
    "Broker",
    "BrokerClosedError",
    "BrokerError",
    "BrowseNodesResult",
    "CacheStats",
    "ConfigError",
    "ErrorDetail",
    "ItemResult",
    "ItemSummary",
    "JobFileError",
    "KeySnapshot",
    "MetricsSnapshot",
    "NoUsableKeyError",
    "Product",
    "Protocol",
    "Query",
    "SearchResult",
    "Secret",
    "Status",
    "SyncBroker",
    "VariationsResult",
    "WrongEventLoopError",
    "__version__",
    "config_from_dict",
]

#: Names imported when first asked for (module, name): Broker pulls in aiohttp and the
#: engine, so ``import broker`` stays light for code that needs only the models and errors.
#: The types the public methods return or take are here too, so users annotate with them.
_LAZY = {
    "Broker": "broker.client",
    "SyncBroker": "broker.sync",
    "config_from_dict": "broker.config",
    "MetricsSnapshot": "broker.engine.metrics",
    "KeySnapshot": "broker.engine.metrics",
    "CacheStats": "broker.cache.policy",
    "SearchResult": "broker.api.operations",
    "VariationsResult": "broker.api.operations",
    "BrowseNodesResult": "broker.api.operations",
}

if not TYPE_CHECKING:  # run time only (see broker.lazyimport)
    __getattr__, __dir__ = _lazy_names("broker", _LAZY, globals())
