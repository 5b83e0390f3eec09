"""The stop policy of ``broker run`` and ``broker serve``: a stop signal once drains, twice stops.

The stop signals are SIGINT, SIGTERM and SIGHUP (a closed terminal, an SSH session that
dropped): left to its default, SIGHUP would kill a run mid-request with nothing committed.
A SIGHUP the process was started ignoring (``nohup``) stays ignored.

One rule for both commands: the first signal asks for a graceful stop, any later one stops at
once, however soon it follows. Only a copy arriving within :data:`ECHO_S` of the previous one is
taken for an echo of it: one Ctrl-C or one ``systemctl stop`` can reach the process twice at the
same instant (the terminal or the cgroup signals every process, and ``uv run`` forwards its own
copy of a SIGTERM), while a person or a script sending a second signal takes longer than that.
One more echo is known: under ``uv run`` without a terminal (a script, a supervisor, ``timeout
-s INT``), uv passes on each SIGINT it receives 200 ms later, so a signal sent to the process
group arrives twice; :func:`sigint_echo_window` says when to expect that copy.

The command line calls :func:`caught_early` before its event loop starts, so a signal that comes
while the process is still starting, or after the run has removed its handlers and is
finishing, never kills it with the default action (exit 143 instead of the documented 75): one
that comes early is handed to the run's handler as soon as it is installed, and one that comes
late counts only for the last write of the output to stdout (:func:`writes_until_stopped`), the
process being on its way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

from broker.stdio import drop_stdout

__all__ = [
    "ECHO_S",
    "STOP_SIGNALS",
    "StopSignals",
    "StoppedReading",
    "StoppedWriting",
    "caught_early",
    "installed",
    "release",
    "replay_early",
    "sigint_echo_window",
    "stops_reading",
    "writes_until_stopped",
]

#: A Python-level signal handler.
_Handler = Callable[[int, Any], None]
#: A repeat closer than this (seconds) to the previous signal is the same stop delivered twice.
ECHO_S: Final = 0.05
#: The signals that stop a run or the daemon.
# SIGHUP as the process found it: ignored under ``nohup`` (or a supervisor that sets it so),
# and then left ignored, as the user asked.
_HUP_IGNORED: Final = signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
STOP_SIGNALS: Final = (
    (signal.SIGINT, signal.SIGTERM)
    if _HUP_IGNORED
    else (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
)
#: When uv's forwarded copy of a SIGINT arrives after the original: uv waits 200 ms, and a
#: busy machine adds its scheduling delay to both processes.
UV_SIGINT_ECHO_S: Final = (0.1, 1.0)


def sigint_echo_window(
    *, parent: str | None = None, in_foreground: bool | None = None
) -> tuple[float, float] | None:
    """When a second SIGINT is ``uv run``'s copy of the first: (earliest, latest) seconds after.

    uv passes on every SIGINT it receives, 200 ms later, unless its child is the terminal's
    foreground process group (then the terminal already signalled the child). None when the
    parent is not uv, or this process is in a terminal's foreground (Ctrl-C reaches it once).

    Args:
        parent: the parent process's name (default: read from ``/proc``; None elsewhere).
        in_foreground: whether this process is the terminal's foreground group (default:
            asked of the controlling terminal; False without one).
    """
    if (_parent_name() if parent is None else parent) != "uv":
        return None
    foreground = _in_terminal_foreground() if in_foreground is None else in_foreground
    return None if foreground else UV_SIGINT_ECHO_S


def _parent_name() -> str:
    try:
        with open(f"/proc/{os.getppid()}/comm", encoding="utf-8") as comm:
            return comm.read().strip()
    except OSError:
        return ""


def _in_terminal_foreground() -> bool:
    try:
        tty = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False  # no controlling terminal
    try:
        return os.tcgetpgrp(tty) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(tty)


class StopSignals:
    """Turns a stream of stop signals into "stop gracefully" (first) and "stop now" (later).

    Args:
        graceful: called with the first signal.
        now: called with every later signal that is not an echo.
        monotonic: the clock (injected in tests).
        sigint_echo: (earliest, latest) seconds after a SIGINT at which another SIGINT is a
            copy of it (:func:`sigint_echo_window`); None: only :data:`ECHO_S` applies.
    """

    __slots__ = (
        "_copy_due",
        "_graceful",
        "_last",
        "_monotonic",
        "_now",
        "_sigint_echo",
        "count",
    )

    def __init__(
        self,
        graceful: Callable[[signal.Signals], None],
        now: Callable[[signal.Signals], None],
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sigint_echo: tuple[float, float] | None = None,
    ) -> None:
        self._graceful = graceful
        self._now = now
        self._monotonic = monotonic
        self._sigint_echo = sigint_echo
        self._last: tuple[float, signal.Signals] | None = None
        # uv's copy of the last SIGINT has not arrived yet (one copy per signal).
        self._copy_due = False
        #: signals taken into account so far (echoes not counted)
        self.count = 0

    def __call__(self, sig: signal.Signals) -> None:
        """Handle one delivered signal (a loop signal handler)."""
        at = self._monotonic()
        last = self._last
        if last is not None and self._echo(at - last[0], last[1], sig):
            # An echo is measured against the signal it copies, never against another echo.
            return
        self._last = (at, sig)
        self._copy_due = self._sigint_echo is not None and sig is signal.SIGINT
        self.count += 1
        if self.count == 1:
            self._graceful(sig)
        else:
            self._now(sig)

    def _echo(self, gap: float, previous: signal.Signals, sig: signal.Signals) -> bool:
        if gap < ECHO_S:
            return True
        window = self._sigint_echo
        if (
            window is not None
            and self._copy_due
            and previous is sig is signal.SIGINT
            and window[0] <= gap <= window[1]
        ):
            self._copy_due = False
            return True
        return False


#: Stop signals received while no loop handler was installed (see :func:`caught_early`).
_early: list[signal.Signals] = []
_catching = False


def _remember(signum: int, _frame: object) -> None:
    _early.append(signal.Signals(signum))


@contextlib.contextmanager
def caught_early(*, process_ends: bool = False) -> Iterator[None]:
    """While the block runs, a stop signal with no loop handler installed is kept, not fatal.

    For the command line: the block is the whole command, so the signal handlers it had before
    (Python's defaults) come back when it returns. With ``process_ends`` (the console
    script: the process exits once the command returns) stop signals are ignored instead:
    the command's exit code is decided, and one arriving while the interpreter shuts down
    (tens of milliseconds) must not replace it with the signal's own.
    """
    global _catching
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    _catching = True
    for sig in STOP_SIGNALS:
        signal.signal(sig, _remember)
    try:
        yield
    finally:
        _catching = False
        _early.clear()
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_IGN if process_ends else handler)


class StoppedReading(Exception):
    """A stop signal ended a blocking read the run waited for (its job on stdin)."""

    def __init__(self, sig: signal.Signals) -> None:
        self.sig = sig
        super().__init__(f"stopped by {sig.name}")


@contextlib.contextmanager
def stops_reading() -> Iterator[None]:
    """While the block runs (on the main thread), a stop signal raises
    :class:`StoppedReading` at once, as does one kept before it began.

    For a blocking read before the run begins (its job on stdin, from a terminal or from a
    producer that hangs): Python restarts a read a signal interrupts (PEP 475), so a signal
    only kept for the run (:func:`caught_early`) waited for the end of the input, which a
    terminal or a hung producer never gives; Ctrl-C, ``timeout`` and systemd's SIGTERM did
    nothing. Nothing was sent yet, so there is nothing to drain.
    """
    if _early:
        raise StoppedReading(_early[0])

    def stop(signum: int, _frame: object) -> None:
        # The handlers before go back first: a second copy of one Ctrl-C (the terminal's
        # and uv's) is kept as they keep it, not raised into the read's clean-up.
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        raise StoppedReading(signal.Signals(signum))

    with _handled(dict.fromkeys(STOP_SIGNALS, stop)) as previous:
        yield


@contextlib.contextmanager
def _handled(handlers: Mapping[signal.Signals, _Handler]) -> Iterator[dict[signal.Signals, Any]]:
    """Install ``handlers`` for the block (a stop signal started ignored, nohup's SIGHUP,
    stays so), yield the handlers before, and put those back after."""
    previous = {sig: signal.getsignal(sig) for sig in handlers}
    for sig, handler in handlers.items():
        if sig not in STOP_SIGNALS or previous[sig] is not signal.SIG_IGN:
            signal.signal(sig, handler)
    try:
        yield previous
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def replay_early(handler: Callable[[signal.Signals], None]) -> None:
    """Hand the signals kept by :func:`caught_early` to ``handler`` on the running loop."""
    loop = asyncio.get_running_loop()
    for sig in _early:
        loop.call_soon(handler, sig)
    _early.clear()


class StoppedWriting(Exception):
    """A stop signal ended a blocking write of finished output to stdout (a reader that
    stopped taking it): a second signal, or the first one's grace running out (``sig``
    None)."""

    def __init__(self, sig: signal.Signals | None) -> None:
        self.sig = sig
        super().__init__(
            "stopped by the grace running out" if sig is None else f"stopped by {sig.name}"
        )


@contextlib.contextmanager
def writes_until_stopped(grace_s: float, *, signalled: bool = False) -> Iterator[None]:
    """While the block runs (on the main thread), the stop policy holds for a write of
    finished output to stdout: the first stop signal lets it go on for at most ``grace_s``,
    and a later one (not an echo) ends it at once with :class:`StoppedWriting`, as does the
    grace running out.

    Python restarts a write a signal interrupts (PEP 475), so a write to a reader that
    stopped reading (``| loader``, stalled) waited in it for good, every signal kept or
    handled by the loop and the write started again; only SIGKILL ended it. A reader that
    is only slow gets its whole output, as before, unless told twice.

    ``signalled``: a stop signal came before the block (the command's own drain): the
    grace runs from the start and the next signal ends the write. So does one kept after
    the run removed its handlers (:func:`caught_early`). Ended so, what stdout still
    buffers is dropped with it.
    """

    def first(_sig: signal.Signals) -> None:
        signal.setitimer(signal.ITIMER_REAL, grace_s)

    def now(sig: signal.Signals) -> None:
        raise StoppedWriting(sig)

    policy = StopSignals(first, now, sigint_echo=sigint_echo_window())

    def stop(signum: int, _frame: object) -> None:
        policy(signal.Signals(signum))

    def grace_over(_signum: int, _frame: object) -> None:
        raise StoppedWriting(None)

    handlers: dict[signal.Signals, _Handler] = dict.fromkeys(STOP_SIGNALS, stop)
    handlers[signal.SIGALRM] = grace_over
    try:
        with _handled(handlers):
            try:
                if signalled or _early:
                    policy(_early[0] if _early else signal.SIGTERM)
                yield
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)  # before SIGALRM's default is back
    except StoppedWriting:
        # What stdout still buffers cannot be written either: the exit's own flush would
        # wait for the reader again, with every stop signal ignored by then.
        drop_stdout()
        raise


def release() -> None:
    """After a loop handler is removed: keep catching (when :func:`caught_early` is on)."""
    if _catching:
        for sig in STOP_SIGNALS:
            signal.signal(sig, _remember)
        _early.clear()


@contextlib.contextmanager
def installed(handler: Callable[[signal.Signals], None], *, enabled: bool = True) -> Iterator[None]:
    """Route SIGINT and SIGTERM to ``handler`` on the running loop while the block runs."""
    loop = asyncio.get_running_loop()
    sigs = STOP_SIGNALS if enabled else ()
    for sig in sigs:
        loop.add_signal_handler(sig, handler, sig)
    if enabled:
        replay_early(handler)
    try:
        yield
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)
        if enabled:
            release()
