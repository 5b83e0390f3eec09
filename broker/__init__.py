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
from broker.models import ErrorDetail, ItemResult, ItemSummary, Protocol, Status

if TYPE_CHECKING:
    from broker.engine.broker import Broker, Query

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
    if name in ("Broker", "Query"):
        from broker.engine import broker as engine

        return getattr(engine, name)
    raise AttributeError(f"module 'broker' has no attribute {name!r}")
