"""Running the simulator app on a socket: an async context manager, and a serve-forever loop.

The simulator has no TLS and fake credentials, so it binds loopback only (127.0.0.0/8, ::1,
``localhost``) unless the caller explicitly allows a remote address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Final

from broker.errors import ConfigError
from broker.listener import Listener, start_listener
from broker.simulator.app import STATS_KEY, create_app

if TYPE_CHECKING:
    from aiohttp import web

    from broker.clock import Clock
    from broker.simulator.settings import SimulatorSettings
    from broker.simulator.stats import SimulatorStats

__all__ = ["SimulatorServer", "check_host", "serve_forever"]

# Hanging responses end at shutdown, so a short grace period is enough for the rest.
_SHUTDOWN_TIMEOUT_S = 2.0


def check_host(host: str, *, allow_remote: bool) -> None:
    """Refuse a non-loopback ``host`` unless ``allow_remote``.

    Raises:
        ConfigError: (path ``--host``, ``broker simulate``'s flag) the address is not
            loopback.
    """
    if allow_remote or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            "--host",
            f"refusing to bind {host!r}: the simulator has no "
            "TLS and fake credentials, so it binds loopback only (127.0.0.1, ::1, "
            "localhost); pass --allow-remote to bind another address",
        )


class SimulatorServer:
    """The simulator listening on a TCP port, for tests and the CLI.

    Usage::

        async with SimulatorServer() as server:
            ...  # server.url is e.g. http://127.0.0.1:54321

    Attributes (after entering): ``url``, ``port``, ``app``, ``stats``.
    ``shutdown_timeout_s``: how long closing waits for requests still being answered.
    """

    def __init__(
        self,
        settings: SimulatorSettings | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock | None = None,
        allow_remote: bool = False,
        shutdown_timeout_s: float = _SHUTDOWN_TIMEOUT_S,
    ) -> None:
        check_host(host, allow_remote=allow_remote)
        self._settings = settings
        self._shutdown_timeout_s = shutdown_timeout_s
        self._host = host
        self._requested_port = port
        self._clock = clock
        self._listener: Listener | None = None
        self.app: web.Application = create_app(settings, clock=clock)
        self.port = 0
        self.url = ""

    @property
    def stats(self) -> SimulatorStats:
        """The app's live counters."""
        return self.app[STATS_KEY]

    async def __aenter__(self) -> SimulatorServer:
        listener = await start_listener(
            self.app, self._host, self._requested_port, shutdown_timeout_s=self._shutdown_timeout_s
        )
        self._listener = listener
        port = listener.port
        self.port = port if port is not None else self._requested_port
        shown = f"[{self._host}]" if ":" in self._host else self._host
        self.url = f"http://{shown}:{self.port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._listener is not None:
            listener, self._listener = self._listener, None
            await listener.cleanup()


#: How often a simulator started with a parent looks whether the parent is still there.
_PARENT_CHECK_S: Final = 1.0


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    # Polled: no event tells a process that its parent died (Linux's PR_SET_PDEATHSIG
    # follows the thread that forked, not the process).
    while True:
        if os.getppid() != parent:
            stop.set()
            return
        await asyncio.sleep(_PARENT_CHECK_S)


async def serve_forever(
    settings: SimulatorSettings | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8787,
    allow_remote: bool = False,
    on_ready: Callable[[SimulatorServer], None] | None = None,
    parent: int | None = None,
) -> None:
    """Serve until cancelled (Ctrl-C) or SIGTERM; ``on_ready`` runs once the port is bound.

    ``parent``: also stop once that process is no longer the parent (it died, even by
    SIGKILL, and the child was handed to another), so a child of ``broker bench`` never
    outlives it.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    watcher = None if parent is None else loop.create_task(_watch_parent(parent, stop))
    try:
        async with SimulatorServer(
            settings, host=host, port=port, allow_remote=allow_remote
        ) as server:
            if on_ready is not None:
                on_ready(server)
            await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)
