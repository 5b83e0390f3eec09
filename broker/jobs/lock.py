"""The job lock: one process at a time drives a job (``reliability.md`` A8).

An exclusive ``flock`` on ``<ledger>.lock``, with the holder's PID written into the file so a
refused process can say who holds it. The kernel drops a ``flock`` when its holder dies, even
by ``kill -9``, so a lock file left behind by a dead process never blocks the next run; that
is why there is no PID liveness check and no stale-lock cleanup. The file itself is left in
place on release: unlinking it would let a process that opened the old file before the
unlink and one that creates a new file both hold "the" lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

from broker.errors import JobFileError

__all__ = ["JobLock", "JobLockedError"]


class JobLockedError(JobFileError):
    """Another process holds the job; ``pid`` is its process id when known."""

    def __init__(self, lock_path: Path, pid: int | None) -> None:
        self.lock_path = lock_path
        self.pid = pid
        holder = f"process {pid}" if pid is not None else "another process (PID not known yet)"
        # The lock is the output's (its ledger's): the holder may be another job writing
        # the same output, not this one.
        super().__init__(
            f"{lock_path}: the job writing this output is being run by {holder} (this job, "
            "or another one with the same output); wait for it to finish or stop it, then "
            "run again, or give this job an output of its own."
        )


class JobLock:
    """An exclusive, non-blocking lock on one job, held until :meth:`close`.

    Args:
        path: the job's ledger file; the lock file is ``<path>.lock`` beside it.

    Use as a context manager (``with JobLock(ledger_path):``) or call :meth:`acquire` and
    :meth:`close`.
    """

    __slots__ = ("_fd", "lock_path")

    def __init__(self, path: Path) -> None:
        path = Path(path)
        self.lock_path = path.with_name(path.name + ".lock")
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> JobLock:
        """Take the lock and write our PID into the lock file.

        Raises:
            JobLockedError: another process holds it (the message names its PID).
            OSError: the lock file cannot be created.
        """
        if self._fd is not None:
            return self
        try:
            # Not through a link: the lock is truncated and written, and a link planted at
            # its name (a shared output folder) would have that done to the file it names.
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise OSError(
                errno.ELOOP,
                f"{self.lock_path}: is a symbolic link, not the job's lock file; remove it "
                "(the broker makes its own)",
                str(self.lock_path),
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise JobLockedError(self.lock_path, pid) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            # Closing drops the flock: a lock we cannot label must not stay held.
            os.close(fd)
            raise
        self._fd = fd
        return self

    def held_elsewhere(self) -> bool:
        """True when another process holds the lock; a missing lock file is not created.

        The lock is taken and dropped at once to tell, so a process asking for it in that
        instant is refused as if it were held: callers look seldom (every few seconds).
        """
        if self._fd is not None:
            return False
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        except PermissionError:
            return True  # another user's (a daemon run as another user): left to it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def close(self) -> None:
        """Release the lock (closing the descriptor drops the ``flock``)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> JobLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"JobLock({str(self.lock_path)!r}, held={self.held})"


def _read_pid(fd: int) -> int | None:
    # The holder writes its PID right after it gets the lock, so a racer may read nothing.
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None
