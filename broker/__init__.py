"""asin-broker: an asynchronous, rate-limited request broker for Amazon's product APIs."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from broker.errors import (
    ApiError,
    BrokerError,
    ConfigError,
    JobFileError,
    NoUsableKeyError,
)
from broker.models import ErrorDetail, ItemResult, ItemSummary, Protocol, Query, Status

if TYPE_CHECKING:
    from broker.client import Broker

try:
    __version__ = version("asin-broker")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "ApiError",
    "Broker",
    "BrokerError",
    "ConfigError",
    "ErrorDetail",
    "ItemResult",
    "ItemSummary",
    "JobFileError",
    "NoUsableKeyError",
    "Protocol",
    "Query",
    "Status",
    "__version__",
]


def __getattr__(name: str) -> object:
    # Broker pulls in aiohttp and the engine; importing it lazily keeps ``import broker``
    # light for code that needs only the models and errors.
    if name == "Broker":
        from broker.client import Broker

        return Broker
    raise AttributeError(f"module 'broker' has no attribute {name!r}")
