"""The stop policy of ``broker run`` and ``broker serve``: SIGINT/SIGTERM once drains, twice stops.

One rule for both commands: the first signal asks for a graceful stop, any later one stops at
once, however soon it follows. Only a copy arriving within :data:`ECHO_S` of the previous one is
taken for an echo of it: one Ctrl-C or one ``systemctl stop`` can reach the process twice at the
same instant (the terminal or the cgroup signals every process, and ``uv run`` forwards its own
copy), while a person or a script sending a second signal takes longer than that.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from typing import Final

__all__ = ["ECHO_S", "STOP_SIGNALS", "StopSignals", "installed"]

#: A repeat closer than this (seconds) to the previous signal is the same stop delivered twice.
ECHO_S: Final = 0.05
#: The signals that stop a run or the daemon.
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Turns a stream of stop signals into "stop gracefully" (first) and "stop now" (later).

    Args:
        graceful: called with the first signal.
        now: called with every later signal that is not an echo.
        monotonic: the clock (injected in tests).
    """

    __slots__ = ("_graceful", "_last_at", "_monotonic", "_now", "count")

    def __init__(
        self,
        graceful: Callable[[signal.Signals], None],
        now: Callable[[signal.Signals], None],
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._graceful = graceful
        self._now = now
        self._monotonic = monotonic
        self._last_at: float | None = None
        #: signals taken into account so far (echoes not counted)
        self.count = 0

    def __call__(self, sig: signal.Signals) -> None:
        """Handle one delivered signal (a loop signal handler)."""
        at = self._monotonic()
        last, self._last_at = self._last_at, at
        if last is not None and at - last < ECHO_S:
            return
        self.count += 1
        if self.count == 1:
            self._graceful(sig)
        else:
            self._now(sig)


@contextlib.contextmanager
def installed(handler: Callable[[signal.Signals], None], *, enabled: bool = True) -> Iterator[None]:
    """Route SIGINT and SIGTERM to ``handler`` on the running loop while the block runs."""
    loop = asyncio.get_running_loop()
    sigs = STOP_SIGNALS if enabled else ()
    for sig in sigs:
        loop.add_signal_handler(sig, handler, sig)
    try:
        yield
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)
