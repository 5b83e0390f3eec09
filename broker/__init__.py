"""asin-broker: an asynchronous, rate-limited request broker for Amazon's product APIs."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from broker.errors import (
    ApiError,
    BrokerError,
    ConfigError,
    JobFileError,
    NoUsableKeyError,
)
from broker.models import ErrorDetail, ItemResult, ItemSummary, Protocol, Status

try:
    __version__ = version("asin-broker")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "ApiError",
    "BrokerError",
    "ConfigError",
    "ErrorDetail",
    "ItemResult",
    "ItemSummary",
    "JobFileError",
    "NoUsableKeyError",
    "Protocol",
    "Status",
    "__version__",
]
