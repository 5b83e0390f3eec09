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
from broker.models import ErrorDetail, ItemResult, ItemSummary, Protocol, Query, Status
from broker.product import Product

if TYPE_CHECKING:
    from broker.client import Broker
    from broker.config import config_from_dict
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
    "ConfigError",
    "ErrorDetail",
    "ItemResult",
    "ItemSummary",
    "JobFileError",
    "NoUsableKeyError",
    "Product",
    "Protocol",
    "Query",
    "Status",
    "SyncBroker",
    "WrongEventLoopError",
    "__version__",
    "config_from_dict",
]


def __getattr__(name: str) -> object:
    # Broker pulls in aiohttp and the engine; importing it lazily keeps ``import broker``
    # light for code that needs only the models and errors.
    if name == "Broker":
        from broker.client import Broker

        return Broker
    if name == "SyncBroker":
        from broker.sync import SyncBroker

        return SyncBroker
    if name == "config_from_dict":
        from broker.config import config_from_dict

        return config_from_dict
    raise AttributeError(f"module 'broker' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The lazily imported names too, for an editor's or a REPL's completion.
    return sorted(set(globals()) | set(__all__))
