"""Logging: the library's loggers, and the command line's set-up of structlog and stdlib logging.

The library never configures logging and never writes to stdout: its modules take their
loggers from :func:`get_logger`, structlog loggers bound to the standard library's
``logging``, so an application decides where events go (with no set-up, Python's last-resort
handler prints warnings and errors to stderr and drops the rest).

The command line calls :func:`configure_logging`: one stderr handler on the root logger,
whose formatter runs every record (the broker's structlog events and plain stdlib records,
aiohttp's among them) through the same chain: level, timestamp, :func:`redact`, which masks
values under secret-looking keys and bearer tokens or SigV4 signatures wherever they appear,
plain tracebacks without local variables, then console or JSON rendering.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from broker.termwidth import columns

__all__ = [
    "configure_logging",
    "end_live_line",
    "get_logger",
    "logs_are_json",
    "redact",
    "scrub",
    "show_live_line",
]

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
    # The user info of a URL (a proxy's or Redis's password), up to its last "@": a
    # password with an unencoded "#", "/" or "?" is in it too.
    r"|(\b[a-z][a-z0-9+.\-]*://)[^\s'\"<>]*(?=@)"
    # ... and one written without a scheme (HTTPS_PROXY=user:pw@host:3128, as curl takes it).
    r"|()(?<![\w/.:@%+-])[\w.~%!$&*+;=-]+:[^\s@/'\"<>]+(?=@[\w\[][\w.\[\]:-]*)"
    # HTTP Basic credentials (a proxy echoing the Proxy-Authorization it refused).
    r"|(Basic\s+)[A-Za-z0-9+/]{8,}={0,2}"
    r"|((?:client_secret|access_token|refresh_token)=)[^&\s\"']+"
    r"|(\\?[\"'](?:client_secret|access_token|refresh_token)\\?[\"']\s*:\s*\\?[\"'])"
    r"(?:[^\"'\\]|\\[^\"'])+",
    re.IGNORECASE,
)


def _keep(match: re.Match[str]) -> str:
    """The part of a secret-bearing match that names it, followed by the mask."""
    return next(group for group in match.groups() if group is not None) + "***"


def scrub(text: str) -> str:
    """``text`` with every credential it shows masked: a bearer token, a SigV4 signature,
    the secret members of a token request or answer, a URL's ``user:password@``.

    For messages built from a foreign exception (aiohttp's quotes the proxy URL, password
    and all), which reach output rows and stderr as well as the log.
    """
    return _SECRET_VALUE.sub(_keep, text)


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
        if key == "exc_info":
            # Left as the tuple it is for the formatter (a list read as "the current
            # exception", which a record logged outside an except clause has not); the text
            # it is formatted to is masked after.
            continue
        if _SECRET_KEY.search(key):
            event[key] = "***"
        else:
            event[key] = _mask(event[key])
    return event


def get_logger(name: str = "broker") -> Any:
    """A structlog logger for library code, bound to the stdlib logger ``name``.

    Its events go to ``logging`` (never to stdout), at the event's level; so nothing shows
    unless the application configures logging, apart from warnings and errors, which
    Python's last-resort handler prints to stderr. See :func:`_route` for their form.
    """
    return structlog.wrap_logger(
        logging.getLogger(name), processors=[_route], wrapper_class=structlog.stdlib.BoundLogger
    )


def _route(logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
    """Run the configured structlog chain if there is one, else make one plain log message.

    An application (or the CLI, :func:`configure_logging`) that configured structlog gets
    the events through its own processors. One that did not gets, through its ``logging``
    handlers, ``"broker.key_disabled key='main' code='...'"``: secrets masked
    (:func:`redact`), no timestamp, level or colour of structlog's development defaults
    (its own formatter adds those), a traceback or stack passed on as ``exc_info`` or
    ``stack_info``.
    """
    if structlog.is_configured():
        result: Any = event
        for processor in structlog.get_config()["processors"]:
            result = processor(logger, method, result)
        return result
    event = redact(logger, method, structlog.contextvars.merge_contextvars(logger, method, event))
    passed = {key: value for key in ("exc_info", "stack_info") if (value := event.pop(key, None))}
    name = str(event.pop("event", ""))
    message = " ".join([name, *(f"{key}={value!r}" for key, value in event.items())])
    return (message,), passed


class _LiveLine:
    """The one status line drawn in place on stderr (``broker run``'s progress), if it is up."""

    text = ""


def show_live_line(text: str) -> None:
    """Draw ``text`` (``\r`` first, padded to the width it must cover) in place on stderr.

    While it is up, the command line's log handler clears it before each record and draws
    it again after, so a log line never prints into the middle of it.
    """
    _LiveLine.text = text
    sys.stderr.write(text)
    sys.stderr.flush()


def end_live_line() -> None:
    """End the live line where it stands (a newline); later records print as usual."""
    if _LiveLine.text:
        _LiveLine.text = ""
        sys.stderr.write("\n")
        sys.stderr.flush()


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler writing to ``stream``, or to whatever ``sys.stderr`` is at each record.

    Resolving stderr late keeps logging working when the stream is replaced (tests, daemons
    that redirect), instead of writing to a closed file.
    """

    def __init__(self, stream: TextIO | None, *, renders_json: bool = False) -> None:
        super().__init__(stream or sys.stderr)
        self._fixed = stream
        #: one JSON object per line (a log shipper parses every line)
        self.renders_json = renders_json

    def emit(self, record: logging.LogRecord) -> None:
        # Not setStream(): that flushes the previous stream, which may be closed by now.
        self.stream = self._fixed or sys.stderr
        live = _LiveLine.text if self.stream is sys.stderr else ""
        if live:
            # Blank the live line, print the record from column 0, then draw the line again.
            self.stream.write("\r" + " " * columns(live.lstrip("\r")) + "\r")
        super().emit(record)
        if live:
            self.stream.write(live)
            self.stream.flush()

    def flush(self) -> None:
        self.stream = self._fixed or sys.stderr
        super().flush()


#: Marks the handler :func:`configure_logging` installs, so a second call replaces it.
_HANDLER_NAME = "broker-cli"


def logs_are_json() -> bool:
    """True when :func:`configure_logging` chose JSON lines: a command's last words then go
    to the log as an event, not as a plain line among the JSON ones."""
    return any(
        isinstance(handler, _StderrHandler) and handler.renders_json
        for handler in logging.getLogger().handlers
        if handler.get_name() == _HANDLER_NAME
    )


def configure_logging(
    level: str = "info", fmt: str = "auto", *, stream: TextIO | None = None
) -> None:
    """Configure structlog and stdlib logging for the CLI: level, console or JSON on ``stream``.

    Every record, the broker's and other libraries' (aiohttp), is rendered by one formatter
    with the same redaction. ``level = "debug"`` lets the engine's per-request and per-429
    events through.
    """
    out = stream or sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: Any
    if use_console:
        renderer = structlog.dev.ConsoleRenderer(
            # Colours on a terminal only (and not under NO_COLOR, nor TERM=dumb: Emacs's
            # shell, some CI logs): a file or a journal the console format is sent to must
            # not fill with escape codes.
            colors=out.isatty()
            and not os.environ.get("NO_COLOR")
            and os.environ.get("TERM") != "dumb",
            exception_formatter=structlog.dev.plain_traceback,
        )
    else:
        renderer = structlog.processors.JSONRenderer()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        # Another library's records say whose they are (aiohttp.server, asyncio).
        foreign_pre_chain=[
            structlog.stdlib.ExtraAdder(),
            structlog.stdlib.add_logger_name,
            *shared,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # Plain text tracebacks: the dict/rich formatters would print local variables.
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
    )
    handler = _StderrHandler(stream, renders_json=not use_console)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # aiohttp's access and client chatter is noise below a warning unless debugging.
    logging.getLogger("aiohttp").setLevel(
        logging.DEBUG if level.lower() == "debug" else logging.WARNING
    )
