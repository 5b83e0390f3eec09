"""This process's resource figures (memory, CPU, start time, file descriptors) for ``/metrics``.

The figures follow the Prometheus client libraries' standard ``process_*`` metrics, read
without ``prometheus_client`` or ``psutil``: from ``/proc/self`` on Linux, and from the
``resource`` module and ``os.times`` elsewhere, where a figure the platform does not offer
is None (and the exposition leaves it out rather than inventing a value).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["ProcessStats", "read_process_stats"]

_PROC: Final = Path("/proc")
# Read once at import: the daemon imports this module at start, which is close enough to the
# process's start where /proc (the exact figure) is missing.
_IMPORTED_AT: Final = time.time()


@dataclass(frozen=True, slots=True)
class ProcessStats:
    """One reading of this process's resources.

    Attributes:
        cpu_seconds: user plus system CPU time used so far.
        start_time_s: when the process started, seconds since the Unix epoch.
        resident_bytes: resident set size now, or None where unknown.
        virtual_bytes: virtual memory size now, or None where unknown.
        open_fds: open file descriptors now, or None where unknown.
        max_fds: the soft limit on open file descriptors, or None where unknown.
    """

    cpu_seconds: float
    start_time_s: float
    resident_bytes: int | None = None
    virtual_bytes: int | None = None
    open_fds: int | None = None
    max_fds: int | None = None


def read_process_stats(proc: Path = _PROC) -> ProcessStats:
    """Read this process's figures now (``proc`` is the procfs root; tests pass a fake one)."""
    times = os.times()
    cpu = times.user + times.system
    stat = _read(proc / "self" / "stat")
    if stat is None:
        return ProcessStats(cpu, _IMPORTED_AT, max_fds=_max_fds())
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = stat.rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    # fields[0] is field 3 of proc(5): utime is field 14, starttime 22, vsize 23, rss 24.
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    start = _boot_time(proc)
    start_time = start + int(fields[19]) / ticks if start is not None else _IMPORTED_AT
    return ProcessStats(
        cpu_seconds=cpu,
        start_time_s=start_time,
        resident_bytes=int(fields[21]) * page,
        virtual_bytes=int(fields[20]),
        open_fds=_count_fds(proc / "self" / "fd"),
        max_fds=_max_fds(),
    )


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


def _boot_time(proc: Path) -> float | None:
    text = _read(proc / "stat") or ""
    for line in text.splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return None


def _count_fds(directory: Path) -> int | None:
    try:
        return len(os.listdir(directory))
    except OSError:
        return None


def _max_fds() -> int | None:
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except OSError:  # a seccomp filter may refuse the call
        return None
    return None if soft == resource.RLIM_INFINITY else int(soft)
