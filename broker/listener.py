"""Starting an aiohttp server on a TCP port so that a cancellation never leaks its socket,
and, for an endpoint anyone on the machine may reach, bounding what its clients hold open.

Used by the embedded simulator and by ``broker serve``'s metrics endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from broker.logs import get_logger

__all__ = ["ConnectionLimits", "Listener", "start_listener"]

logger = get_logger("broker")


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What the clients of one listener may hold open: at most ``max_open`` connections at
    once (a new one past that closes the one heard from longest ago), each closed once its
    client has sent nothing for ``idle_s`` (a request begun and never finished included).

    Without them a client that opens connections and sends nothing keeps each open for
    good, one file descriptor each, until the process runs out of them. A newcomer is let
    in, not the quietest old connection kept: a client holding the cap with a byte now and
    then must not shut out the next health check.
    """

    max_open: int
    idle_s: float


class Listener:
    """A started listener: where it listens, and :meth:`cleanup` to close it."""

    __slots__ = ("_runner", "_server")

    def __init__(self, runner: web.AppRunner, server: asyncio.AbstractServer) -> None:
        self._runner = runner
        self._server = server

    @property
    def addresses(self) -> list[object]:
        """The addresses listened on, as the sockets name them (``(host, port, ...)``)."""
        # asyncio's and uvloop's servers both have sockets (uvloop's is no asyncio.Server).
        sockets: Iterable[socket.socket] = getattr(self._server, "sockets", None) or ()
        return [sock.getsockname() for sock in sockets]

    @property
    def port(self) -> int | None:
        """The TCP port of the first address listened on (the one port 0 picked), or None."""
        for address in self.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                return int(address[1])
        return None

    async def cleanup(self) -> None:
        """Stop accepting, then close the connections and the app."""
        self._server.close()
        await self._runner.cleanup()


async def start_listener(
    app: web.Application,
    host: str,
    port: int,
    *,
    shutdown_timeout_s: float,
    limits: ConnectionLimits | None = None,
) -> Listener:
    """Serve ``app`` on ``host``:``port``, within ``limits`` if given.

    ``shutdown_timeout_s``: how long closing waits for requests still being answered; it
    must be positive (aiohttp takes 0 for no limit at all).

    The loop's ``create_server`` skips a turn once its socket listens, and a cancel landing
    there loses the server it was about to return, socket and all: it would listen until
    the loop closed. So the start is shielded, and a cancelled caller waits for it to end
    (however often it is cancelled meanwhile) and then closes what it opened.
    """
    if not shutdown_timeout_s > 0:
        raise ValueError(f"shutdown_timeout_s must be positive, got {shutdown_timeout_s}")
    _quiet_bad_requests()
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout_s, access_log=None)
    await runner.setup()
    handlers = runner.server
    assert handlers is not None  # set up above
    factory = handlers if limits is None else _Gate(handlers, limits)
    loop = asyncio.get_running_loop()
    start = asyncio.ensure_future(loop.create_server(factory, host, port))
    try:
        server = await asyncio.shield(start)
    except BaseException:
        while not start.done():
            try:
                await asyncio.wait((start,))
            except asyncio.CancelledError:
                # Cancelled again (a TaskGroup's cancel and a timeout's): the cleanup must
                # still come after the start, or the socket it opens is never closed. The
                # first exception is raised below.
                continue
        if not start.cancelled() and start.exception() is None:
            start.result().close()
        await runner.cleanup()
        raise
    return Listener(runner, server)


class _OneLineForBadRequests(logging.Filter):
    """Makes aiohttp's record of a malformed request (answered 400 already) one line with
    the reason, not a traceback, and a warning, not an error: the client's fault (a bug, a
    scanner), which looked like a server crash to a user debugging their own client against
    the simulator, and fired an operator's alert on error-level lines. Other errors keep
    theirs. It is installed on aiohttp's own logger, so any other aiohttp server in the
    process gets such parse errors so too."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, web.RequestPayloadError):
            # A body that cannot be read (gzip that is not), met again while aiohttp drains
            # what is left of it after the answer: the same client fault.
            error = error.__cause__
        if isinstance(error, HttpProcessingError):
            # Its message may span lines (the header quoted, a caret under the fault).
            lines = [line.strip() for line in str(error.message).splitlines() if line.strip()]
            record.msg = f"{record.getMessage()}: {error.code} {' '.join(lines[:2])}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_ONE_LINE = _OneLineForBadRequests()


def _quiet_bad_requests() -> None:
    """Install :class:`_OneLineForBadRequests` on aiohttp's server logger (once)."""
    server_logger = logging.getLogger("aiohttp.server")
    if _ONE_LINE not in server_logger.filters:
        server_logger.addFilter(_ONE_LINE)


class _Gate:
    """A protocol factory: aiohttp's request handlers, each behind a :class:`_Guarded`."""

    __slots__ = ("_handlers", "_open", "_said", "limits")

    def __init__(self, handlers: web.Server, limits: ConnectionLimits) -> None:
        self._handlers = handlers
        self.limits = limits
        # The connections let in and not closing, in the order they came.
        self._open: dict[_Guarded, None] = {}
        self._said = False

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self, self._handlers())

    def admit(self, connection: _Guarded) -> None:
        """Count ``connection`` in, first closing the one heard from longest ago if the
        cap is reached (said once, at warning level)."""
        if len(self._open) >= self.limits.max_open:
            quietest = min(self._open, key=lambda c: c.heard)
            self.leave(quietest)
            quietest.abort()
            if not self._said:
                self._said = True
                logger.warning(
                    "broker.http_connections_capped",
                    max_open=self.limits.max_open,
                    note="each new connection past the cap closes the one heard from longest "
                    "ago; a client holding many open without sending (or a leaking "
                    "scraper) is the likely cause",
                )
        self._open[connection] = None

    def leave(self, connection: _Guarded) -> None:
        """``connection`` closes: it no longer counts."""
        self._open.pop(connection, None)


class _Guarded(asyncio.Protocol):
    """One connection: counted against the cap, closed when its client goes quiet, and
    otherwise handed through to aiohttp's request handler unchanged."""

    __slots__ = ("_gate", "_inner", "_made", "_timer", "_transport", "heard")

    def __init__(self, gate: _Gate, inner: asyncio.Protocol) -> None:
        self._gate = gate
        self._inner = inner
        self._made = False
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: when its client last sent anything (the loop's clock)
        self.heard = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP transport (uvloop's is no asyncio.Transport subclass: no isinstance here).
        self._transport = cast("asyncio.Transport", transport)
        loop = asyncio.get_running_loop()
        self.heard = loop.time()
        self._gate.admit(self)
        self._made = True
        self._timer = loop.call_later(self._gate.limits.idle_s, self._check_idle)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.heard = asyncio.get_running_loop().time()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._gate.leave(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._made:
            self._made = False
            self._inner.connection_lost(exc)

    def abort(self) -> None:
        """Close at once (the cap needs the room)."""
        if self._transport is not None:
            self._transport.abort()

    def _check_idle(self) -> None:
        loop = asyncio.get_running_loop()
        quiet = loop.time() - self.heard
        idle_s = self._gate.limits.idle_s
        if quiet < idle_s:
            # Heard from meanwhile: look again when it would have been quiet long enough.
            self._timer = loop.call_later(idle_s - quiet, self._check_idle)
            return
        self._timer = None
        self._gate.leave(self)
        if self._transport is not None:
            self._transport.close()
