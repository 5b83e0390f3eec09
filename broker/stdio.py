"""The process's standard streams made safe for a command: closed, full or unwritable.

A command started from cron or a service manager may find a standard descriptor closed
(``>&-``), its stderr on a full disk (``2>>run.log``) or its stdout unwritable
(``>/dev/full``). None of these may crash it or change what it does:

- a closed descriptor 0, 1 or 2 is opened on ``/dev/null`` before anything else opens a
  file: otherwise the next file opened takes its number, and a library that closes it
  believing it is its own (uvloop asserts on closing a descriptor below 3, and aborts)
  or writes to it believing it is stdout corrupts that file;
- stderr reports, and nothing else: a write that fails there is dropped (a job whose rows
  are all written must not exit 1 because its summary could not be printed);
- stdout is the command's output: a write that fails there (a full disk) ends the command
  with exit 74, in one line on stderr (:class:`WatchedStream` tells its errors from those of
  other files, :func:`stdout_failure`).
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import json
import os
import sys
from typing import Any, TextIO

__all__ = [
    "BYTES_OR_ESCAPE",
    "ForgivingStream",
    "WatchedStream",
    "as_shown",
    "drop_stdout",
    "open_closed_descriptors",
    "print_json",
    "stdout_failure",
    "write_stdout",
]

#: An encoding error handler: a file name's undecodable byte (a lone surrogate, as
#: ``surrogateescape`` reads it) is written back as that byte, any other character the
#: encoding lacks as its backslash escape. For a stdout in an ASCII or Latin-1 locale
#: without UTF-8 mode, whose ``surrogateescape`` raises on a key named in Japanese.
BYTES_OR_ESCAPE = "asin-broker-bytes-or-escape"


def _bytes_or_escape(exc: UnicodeError) -> tuple[bytes, int]:
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    out = bytearray()
    for char in exc.object[exc.start : exc.end]:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(code - 0xDC00)
        else:
            out += char.encode("ascii", "backslashreplace")
    return bytes(out), exc.end


codecs.register_error(BYTES_OR_ESCAPE, _bytes_or_escape)


def as_shown(text: str, stream: TextIO) -> str:
    """``text`` as ``stream`` will show it: what its encoding lacks escaped, so that the
    columns a live line takes are counted on what the terminal receives."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        return text.encode(encoding, "backslashreplace").decode(encoding, "replace")
    except LookupError:
        return text


#: The errors of a write to a file that cannot take more, or a device that failed.
_UNWRITABLE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


def open_closed_descriptors() -> None:
    """Open ``/dev/null`` on each of descriptors 0, 1 and 2 that is closed, and give
    ``sys.stdin``, ``sys.stdout`` and ``sys.stderr`` a stream on it where the interpreter,
    started with that descriptor closed, left None."""
    for fd, mode in ((0, os.O_RDONLY), (1, os.O_WRONLY), (2, os.O_WRONLY)):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, mode)
            if opened != fd:  # pragma: no cover - the lowest free number is the closed one
                os.dup2(opened, fd)
                os.close(opened)
    if sys.stdin is None:
        sys.stdin = _stream(0, write=False)
    if sys.stdout is None:
        sys.stdout = _stream(1, write=True)
    if sys.stderr is None:
        sys.stderr = _stream(2, write=True)


def _stream(fd: int, *, write: bool) -> TextIO:
    # The process's own stream, for its lifetime: not closed by anyone (closefd=False).
    if write:
        return open(fd, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    return open(fd, encoding="utf-8", errors="backslashreplace", closefd=False)


class ForgivingStream:
    """A text stream (stderr) whose failed writes and flushes are dropped, not raised.

    Everything else (``isatty``, ``fileno``, ``encoding``) is the wrapped stream's. A
    broken pipe is dropped too: a reader of stderr that went away is no reason to stop.
    """

    def __init__(self, stream: TextIO) -> None:
        self.wrapped = stream

    def write(self, text: str) -> int:
        """Write ``text``; a failure is dropped (the text is lost, the command goes on).

        What the stream's encoding cannot write (a file name's undecodable bytes, on a
        stream set to fail on them) is escaped instead, as Python's own stderr does.
        """
        try:
            try:
                return self.wrapped.write(text)
            except UnicodeEncodeError:
                encoding = getattr(self.wrapped, "encoding", None) or "utf-8"
                escaped = text.encode(encoding, "backslashreplace").decode(encoding)
                return self.wrapped.write(escaped)
        except OSError:
            return len(text)

    def flush(self) -> None:
        """Flush; a failure is dropped."""
        with contextlib.suppress(OSError):
            self.wrapped.flush()

    def __getattr__(self, name: str) -> object:
        return getattr(self.wrapped, name)


class WatchedStream:
    """A stream (stdout, or its binary ``buffer``) that remembers the errors of its own
    writes and flushes, so that one reaching the top is known to be stdout's and not that
    of a file whose error names no file. Everything else is the wrapped stream's."""

    def __init__(self, stream: Any, failures: list[OSError]) -> None:
        self.wrapped = stream
        self._failures = failures

    def write(self, data: Any) -> Any:
        """Write ``data``, remembering a failure before it is raised."""
        try:
            return self.wrapped.write(data)
        except OSError as exc:
            self._failures.append(exc)
            raise

    def flush(self) -> None:
        """Flush, remembering a failure before it is raised."""
        try:
            self.wrapped.flush()
        except OSError as exc:
            self._failures.append(exc)
            raise

    @property
    def buffer(self) -> WatchedStream:
        """The binary stream under a text one, watched alike (``--out -`` copies to it)."""
        return WatchedStream(self.wrapped.buffer, self._failures)

    def __getattr__(self, name: str) -> object:
        return getattr(self.wrapped, name)


def stdout_failure(exc: OSError, failures: list[OSError], *, take_over: bool) -> bool:
    """True when ``exc`` is a failed write to stdout that cannot be mended (a full disk, an
    I/O error): one of ``failures``, which the watched stdout recorded, or raised from one.

    ``take_over`` (the process ends with the command): stdout is then pointed at
    ``/dev/null``, so the interpreter's last flush of what is still buffered does not fail
    again on the way out (exit 120).
    """
    if exc.errno not in _UNWRITABLE or not any(_caused_by(exc, failure) for failure in failures):
        return False
    if take_over:
        drop_stdout()
    return True


def drop_stdout() -> None:
    """Point stdout's descriptor at ``/dev/null``: what it still buffers cannot be written
    (its reader is gone, its disk is full), and the interpreter's last flush on the way out
    must not fail again (a traceback, exit 120)."""
    with contextlib.suppress(AttributeError, ValueError, OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _caused_by(exc: BaseException, failure: BaseException) -> bool:
    walked: set[int] = set()
    seen: BaseException | None = exc
    while seen is not None and id(seen) not in walked:  # a cause may lead back (a cycle)
        if seen is failure:
            return True
        walked.add(id(seen))
        seen = seen.__cause__ or seen.__context__
    return False


def write_stdout(data: bytes) -> None:
    """Write ``data`` to stdout's bytes, whatever its text encoding, and flush.

    All of it: a buffered write cut short (a reader gone mid-way, a signal) returns the
    count it wrote without an error; the next one meets the closed pipe (exit 141), or
    goes on.
    """
    sys.stdout.flush()
    out = sys.stdout.buffer
    view = memoryview(data)
    while view:
        view = view[out.write(view) :]
    out.flush()


def print_json(document: object) -> None:
    """``document`` as indented JSON on stdout, in UTF-8 whatever the locale (as ``broker
    lookup --json`` and a run's JSON lines are).

    Text that is no Unicode (a file name's undecodable bytes, kept as lone surrogates) is
    written as its JSON escape: a path under ``$XDG_STATE_HOME=/tmp/caf\xe9`` made ``status
    --json`` fail with an empty stdout, whose one promise is a document.
    """
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    write_stdout(text.encode("utf-8", "backslashreplace"))
