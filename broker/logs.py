"""structlog set-up for the command line only: console on a terminal, JSON lines otherwise.

The library never configures logging. Every event passes through :func:`redact`, which
masks values under secret-looking keys and bearer tokens or SigV4 signatures wherever
they appear, and tracebacks never carry local variables.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

__all__ = ["configure_logging", "redact"]

# reliability.md section 4: the key list many open-source redaction processors use. A
# credential *id* is not secret (it names the key in messages), so it stays readable.
_SECRET_KEY = re.compile(
    r"secret|token|authorization|password|credential(?!_?id)|signature", re.IGNORECASE
)
# Values that are credentials wherever they appear: a bearer token, a SigV4 signature, and
# the secret or token members of a token request or response (form or JSON).
_SECRET_VALUE = re.compile(
    r"(Bearer\s+)[^\s,\"']+"
    r"|(Signature=)[0-9a-fA-F]{16,}"
    r"|((?:client_secret|access_token|refresh_token)=)[^&\s\"']+"
    r"|(\\?[\"'](?:client_secret|access_token|refresh_token)\\?[\"']\s*:\s*\\?[\"'])"
    r"(?:[^\"'\\]|\\[^\"'])+",
    re.IGNORECASE,
)


def _keep(match: re.Match[str]) -> str:
    """The part of a secret-bearing match that names it, followed by the mask."""
    return next(group for group in match.groups() if group is not None) + "***"


def _mask(value: object) -> object:
    if isinstance(value, str):
        return _SECRET_VALUE.sub(_keep, value)
    if isinstance(value, dict):
        return {k: ("***" if _SECRET_KEY.search(str(k)) else _mask(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(v) for v in value]
    return value


def redact(
    _logger: object, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask secrets by key name and by value pattern, at any depth."""
    for key in list(event):
        if _SECRET_KEY.search(key):
            event[key] = "***"
        else:
            event[key] = _mask(event[key])
    return event


class _StreamFactory:
    """Loggers that write to ``stream``, or to whatever ``sys.stderr`` is at each call.

    Resolving stderr late keeps logging working when the stream is replaced (tests, daemons
    that redirect), instead of writing to a closed file.
    """

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream

    def __call__(self, *args: object) -> structlog.PrintLogger:
        return structlog.PrintLogger(self._stream or sys.stderr)


def configure_logging(
    level: str = "info", fmt: str = "auto", *, stream: TextIO | None = None
) -> None:
    """Configure structlog for the CLI: level, and console or JSON rendering on ``stream``."""
    out = stream or sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: Any
    if use_console:
        renderer = structlog.dev.ConsoleRenderer(
            exception_formatter=structlog.dev.plain_traceback,
        )
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            # Plain text tracebacks: the dict/rich formatters would print local variables.
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)
        ),
        logger_factory=_StreamFactory(stream),
        cache_logger_on_first_use=False,
    )
