"""``broker serve``: claim job files from a spool directory, run each through one broker, file them.

The spool follows the maildir convention (``ecosystem.md`` 2.4)::

    SPOOL/inbox/       producers write name.tmp or .name, then rename() it in here
    SPOOL/processing/  the claimed job file <name> and its work files: <name>.out.<format>,
                       its ledger <name>.out.<format>.ledger and invalid-row report
    SPOOL/done/        <name>, <name>.out.<format>, <name>.out.<format>.invalid.jsonl (if
                       any row was invalid) and <name>.status.json
    SPOOL/failed/      <name> and <name>.status.json naming the error (a data error)
    SPOOL/state/       kept for older daemons' files; every key's daily count, rate and
                       pauses now live in the shared key state ([state]), which all jobs,
                       restarts and other broker processes of the machine share

Choices:

- **Claiming** is a hard link from ``inbox/x`` to ``processing/x`` followed by an unlink of
  ``inbox/x``. Like a rename it is atomic (of two daemons, one link fails), and unlike a
  rename it never replaces a same-named job that another daemon is still processing. A
  filesystem without hard links falls back to a rename.
- **Settling**: a job file is claimed once it has not changed (size, mtime) for
  ``settle_s`` (``[serve] settle_s``, default 2 s), or at once when it was last modified
  longer ago than that (a file renamed into ``inbox/`` after it was written). A producer
  still writing straight into ``inbox/`` is so not claimed half-written; should it write
  again after a pause longer than ``settle_s``, the change is seen when the job ends and
  the job is filed under ``failed/``, never as done with rows missing.
- **Ignored entries**: dotfiles, ``*.tmp`` and other names of files still being written
  (``*.part``, ``*.partial``, ``*.crdownload``, ``*.swp``, ``*~``), symlinks and anything but
  a regular file. Names containing ``.out.jsonl``, ``.out.csv`` or ``.out.sqlite`` are the
  daemon's own work files and are refused into ``failed/``. Output names derive from the
  job's name only.
- **Awkward names**: a job whose name is not UTF-8, or too long to take the work files'
  suffixes (over 200 bytes), is claimed under a safe name (:func:`spool_name`: bytes that
  are not UTF-8 as ``%XX``, a long name cut and given a hash), logged as ``received_as``.
- **Unreadable or vanished jobs**: a job file the daemon cannot read is filed under
  ``failed/`` with the reason; one deleted from ``processing/`` is dropped with its work
  files. Neither stops the daemon. At start, an ``inbox/`` entry that is the same file as a
  job in ``processing/`` (a daemon stopped between the claim's link and unlink) is removed,
  so no job runs twice.
- **Retry**: a job in ``failed/`` runs again when moved back into ``inbox/`` (its work
  files were removed when it was filed, so it starts over).
- **One job at a time**, oldest first, through one :class:`~broker.engine.broker.Broker`
  kept open for the daemon's life; rates, circuits and the daily count are the keys'
  shared state, so they carry over from job to job, across restarts and between daemons.
- **Crash safety**: the job file leaves ``processing/`` last, after its output and status,
  and its ledger is removed after that. A job found in ``processing/`` at start is resumed,
  and so is one no daemon holds at two looks 10 s apart while the daemon runs (another
  replica died; a daemon holds a job's claim lock from before its run to its filing);
  its ledger makes every row come out exactly once. In ``done/`` and ``failed/`` a job
  file's presence marks a complete filing. The name a job is filed under is kept in a
  marker beside it (``<name>.out.<format>.filing``) until the filing ends, so a job whose
  filing was interrupted is filed again under the same name, over that filing's outputs,
  never beside them. A refusal (a reserved name) takes the ``inbox/`` entry first, under a
  hidden ``.refusing-`` name in ``failed/``: of two daemons only one files it, and one
  interrupted is put back into ``inbox/`` at the next start.
- **Signals**: the first SIGTERM/SIGINT/SIGHUP stops claiming and drains the current job as
  ``broker run`` does (the requests already sent are answered and written, for at most 20 s;
  the rest stay pending, and a job not finished so stays in ``processing/`` and resumes at
  the next start), closes the broker and returns (exit 0). A second signal exits at once
  with 75, however soon it follows (only a copy of the first SIGINT that ``uv run``
  forwards within a fraction of a second counts as the same signal).
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import collections
import contextlib
import dataclasses
import errno
import hashlib
import itertools
import json
import math
import os
import resource
import secrets
import signal
import sqlite3
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Final

from broker.cache import RUN_MAX_AGE_S
from broker.client import Broker
from broker.clock import Clock, LoopClock
from broker.errors import (
    BrokerClosedError,
    ConfigError,
    JobChangedError,
    JobFileError,
    NoUsableKeyError,
)
from broker.exitcode import ExitCode
from broker.jobs.ledger import JobFileChangedError, JobSettingsChangedError, read_tally
from broker.jobs.lock import JobLock, JobLockedError
from broker.jobs.metrics_http import JobRows, MetricsServer, SpoolSnapshot, check_host
from broker.jobs.paths import ledger_path, report_path
from broker.jobs.runner import (
    JobOptions,
    JobSummary,
    describe_failure,
    is_about,
    out_of_files,
    outage_had_part,
    quota_wait,
    run_job,
    unexpected,
)
from broker.jobs.signals import (
    STOP_SIGNALS,
    StopSignals,
    release,
    replay_early,
    sigint_echo_window,
)
from broker.jobs.sinks import SINK_FORMATS
from broker.logs import get_logger, logs_are_json
from broker.progname import prog
from broker.sqlitewal import journal_files, rollback_journal, still_at
from broker.wholefile import copies_of, original_of, write_whole

if TYPE_CHECKING:
    from broker.cache.policy import CacheStats
    from broker.config import BrokerConfig
    from broker.engine.metrics import KeySnapshot, MetricsSnapshot

__all__ = [
    "DEFAULT_PORT",
    "Daemon",
    "ServeOptions",
    "Spool",
    "SpoolJob",
    "serve_command",
    "spool_name",
    "stops_daemon",
]

logger = get_logger("broker")

#: The default port of ``/metrics`` (the Prometheus exporter convention's range).
DEFAULT_PORT: Final = 9464
_FORMATS: Final = ("jsonl", "csv", "sqlite")
# The parts of the names of a job's work files (``a.txt.out.jsonl``, its ledger, its report).
_RESERVED: Final = tuple(f".out.{fmt}" for fmt in _FORMATS)
# The end of a filed job's status file: a job named so would overwrite, or be overwritten by,
# another job's status when filed (``orders.status.jsonl`` is a fine job name).
_STATUS_SUFFIX: Final = ".status.json"
_STATUSES: Final = ("ok", "not_found", "invalid", "failed")
#: Finished jobs whose row counts ``/metrics`` keeps showing (bounds label cardinality).
_RECENT_JOBS: Final = 20
# Hard links are not supported here: claim with a rename instead.
_NO_LINKS: Final = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK})
# The longest name a job is processed under, in bytes: the longest work file adds 30 bytes
# (".out.sqlite.invalid.jsonl.tmp") and filing may add "-NNN", within the usual 255.
_MAX_NAME_BYTES: Final = 200
# The ends of names that files still being written carry: ours (``*.tmp``), downloaders'
# (``.part``, ``.partial``, ``.crdownload``) and editors' (``.swp``, ``~``).
_UNFINISHED: Final = (".tmp", ".part", ".partial", ".crdownload", ".swp", "~")
# Waits between tries of a job's claim lock before it is left to the daemon holding it.
_CLAIM_RETRIES_S: Final = (0.05, 0.1, 0.2, 0.0)
# The end of a job's claim lock's name (before ``.lock``): one of the work files' names
# (``.out.jsonl``), whatever the job's output format.
_CLAIM: Final = ".out.jsonl.claim"
# The start of the hidden name under which an inbox/ entry is refused into failed/.
_REFUSING: Final = ".refusing-"
#: The start of a name's reservation in done/ or failed/ (``.taking.a-2.txt``), made with
#: O_EXCL before a filing writes anything under the name: two daemons filing at once never
#: choose one free name (the second filing replaced the first's job file, rows and status).
_TAKING: Final = ".taking."
#: How old a name reservation must be before a daemon starting up may drop it as one a
#: killed filing left (a filing holds its reservation for a few renames).
_STALE_RESERVATION_S: Final = 600.0
#: How often an idle daemon looks in processing/ for a job no live daemon holds (its
#: replica was killed while this one ran).
_ORPHAN_CHECK_S: Final = 10.0
#: How often a running job's file is checked for, so a job deleted from processing/ stops.
_REMOVAL_CHECK_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class _Spent:
    """What this daemon's runs of one job spent before it was deferred: a deferred job is
    filed with the counts of all its stretches, not only of the one that finished it."""

    requests: int = 0
    throttled: int = 0
    retries: int = 0
    #: lookups the item cache answered
    cached: int = 0
    wall_s: float = 0.0
    #: rows done by runs before this daemon's first (a stop, a crash): what the first
    #: stretch found done
    resumed_rows: int | None = None

    def counts(self) -> dict[str, int]:
        """The requests, 429s and retries, as a job's status file gives them (a failed
        job's too: what it spent)."""
        return {"requests": self.requests, "throttled": self.throttled, "retries": self.retries}

    def sent(self, before: MetricsSnapshot, after: MetricsSnapshot) -> _Spent:
        """These counts with one more stretch's requests, 429s and retries: the broker's
        counters around it (a stretch that failed has no summary)."""
        return dataclasses.replace(
            self,
            requests=self.requests + after.requests - before.requests,
            throttled=self.throttled + after.throttled - before.throttled,
            retries=self.retries + after.retries - before.retries,
        )

    def plus(self, summary: JobSummary, before: MetricsSnapshot, after: MetricsSnapshot) -> _Spent:
        """These counts with one more stretch's: ``summary``, the broker's counters around it."""
        return dataclasses.replace(
            self.sent(before, after),
            cached=self.cached + summary.cached,
            wall_s=self.wall_s + summary.wall_s,
            resumed_rows=summary.resumed_rows if self.resumed_rows is None else self.resumed_rows,
        )


def _same_file(path: Path, file_id: tuple[int, int] | None) -> bool:
    """True when ``path`` exists and, with ``file_id`` known, is still that file."""
    return path.exists() if file_id is None else still_at(path, file_id)


@dataclass(slots=True)
class _Deferral:
    """A job ``no_wait`` stopped: when its keys' daily quota resets (as the run was told;
    by this machine's clock it decides only for a job with no key left to ask), the keys
    its rows need (whether they still wait says when it goes on), its
    claim lock, held until it resumes so that no sibling daemon takes it for a dead one's,
    what its runs spent so far, and its rows by status (pending too) for ``/metrics``."""

    until: datetime
    keys: frozenset[str]
    claim: JobLock | None = None
    spent: _Spent = _Spent()
    rows: Mapping[str, int] = field(default_factory=dict)
    #: (device, inode) of the file it ran: another renamed over it while it waited is a job
    #: of its own, not a change to this one
    file_id: tuple[int, int] | None = None


#: The open-file limit ``broker serve`` raises its own soft limit to, when its hard one allows.
_OPEN_FILES: Final = 65_536


def raise_open_files_limit() -> None:
    """Raise this process's soft limit of open files towards its hard one (at most
    :data:`_OPEN_FILES`).

    Each job ``no_wait`` deferred holds one open file (its claim lock) until it resumes,
    and a container's default soft limit is often 1,024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = _OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, _OPEN_FILES)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    # Best effort: a limit that cannot be raised is met by the deferral cap.
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _deferral_cap() -> int:
    """How many deferred jobs (one open file each) the daemon holds before it claims no new
    job: half the open-file limit, the other half left for the runs, the cache, the state."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return _OPEN_FILES // 2 if soft == resource.RLIM_INFINITY else max(1, soft // 2)


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """How to run the daemon.

    Attributes:
        spool: the spool directory (its subdirectories are created as needed).
        host: address of the HTTP endpoints; loopback unless ``allow_remote``.
        port: port of the HTTP endpoints; 0 picks a free one.
        allow_remote: allow a non-loopback ``host``.
        poll_s: seconds between scans of ``inbox/`` while idle.
        progress: progress display of each job (see :class:`~broker.jobs.runner.JobOptions`).
        handle_signals: install SIGTERM/SIGINT/SIGHUP handlers (tests and embedders turn it off and
            call :meth:`Daemon.request_stop`).
        settle_s: claim a job file only once it has not changed for this long (0: at once).
        convert_isbn13: every job turns 978 ISBN-13s into ISBN-10s.
        no_wait: a job whose keys spent their daily quota stays in ``processing/`` and is
            resumed once the quota resets, and the daemon goes on with other jobs.
    """

    spool: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    allow_remote: bool = False
    poll_s: float = 1.0
    progress: str = "auto"
    handle_signals: bool = True
    settle_s: float = 2.0
    convert_isbn13: bool = False
    no_wait: bool = False


def spool_name(name: str) -> str:
    """The name a job file is processed and filed under: ``name``, unless it is awkward.

    Bytes of the name that are not UTF-8 become ``%XX`` (``lat%E9.txt``), because the
    ledger, the logs and the status files hold text; so does every byte that is not ASCII
    where Python's file names are not UTF-8 (a C locale with ``PYTHONUTF8=0``, a Latin-1
    one), as a path of that text could not be named there. A name longer than 200 bytes
    is cut and given a hash of the whole name (keeping its extensions, which tell the
    format), so that the work files' longer names stay within the file system's 255 bytes.
    """
    raw = os.fsencode(name)
    text = raw.decode("utf-8", "surrogateescape")
    if not text.isascii():
        text = "".join(_escaped(char) for char in text)
    if len(text.encode("utf-8")) <= _MAX_NAME_BYTES:
        return text
    # The last one or two suffixes that are extensions (".csv", ".jsonl.gz"): a dot earlier
    # in the name ("v1.2 sales report.csv") starts no extension, and taken for one it made
    # the two too long to keep, so the name lost its ".csv" too.
    suffix = ""
    for part in reversed(PurePath(text).suffixes[-2:]):
        if not (2 <= len(part) <= 8 and part[1:].isascii() and part[1:].isalnum()):
            break
        suffix = part + suffix
    digest = hashlib.sha256(raw).hexdigest()[:12]
    budget = _MAX_NAME_BYTES - len(suffix.encode("utf-8")) - len(digest) - 1
    head = text[: len(text) - len(suffix)].encode("utf-8")[:budget].decode("utf-8", "ignore")
    return f"{head}~{digest}{suffix}"


#: Whether Python names files in UTF-8 here (else a name must be ASCII to be written).
_UTF8_NAMES = codecs.lookup(sys.getfilesystemencoding()).name == "utf-8"


def _escaped(char: str) -> str:
    """``char`` as a spool name keeps it: ``%XX`` for each byte that is not UTF-8, or
    for each byte of a character that is not ASCII where file names are not UTF-8."""
    if "\udc80" <= char <= "\udcff":
        return f"%{ord(char) - 0xDC00:02X}"
    if _UTF8_NAMES or char.isascii():
        return char
    return "".join(f"%{byte:02X}" for byte in char.encode("utf-8"))


def _shown(name: str) -> str:
    """A file name as printable text (bytes that are not UTF-8 as ``\\xNN``)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


@dataclass(frozen=True, slots=True)
class SpoolJob:
    """A claimed job: its file in ``processing/`` and the work files derived from its name."""

    name: str
    path: Path
    format: str

    @property
    def out(self) -> Path:
        """The output file, ``processing/<name>.out.<format>``."""
        return self.path.with_name(f"{self.name}.out.{self.format}")

    @property
    def ledger(self) -> Path:
        """The job's ledger (the runner puts it beside the output)."""
        return ledger_path(self.out)

    @property
    def invalid_report(self) -> Path:
        """The invalid-row report (the runner writes it beside the output)."""
        return report_path(self.out)

    def claim_lock(self) -> JobLock:
        """The lock a daemon holds while the job is its own, from before the run to the
        end of the filing (not the runner's job lock, which the run alone holds). Its name
        does not depend on the output format, which daemons may see differently."""
        return JobLock(self.path.with_name(f"{self.name}{_CLAIM}"))

    @property
    def filing_marker(self) -> Path:
        """Where the job is being filed (see :meth:`Spool.file`), while it is."""
        return self.out.with_name(f"{self.out.name}.filing")

    def work_files(self) -> tuple[Path, ...]:
        """Every file the runner (or a filing) may leave beside the job."""
        ledger = self.ledger
        return (
            self.filing_marker,
            self.out,
            *journal_files(self.out),
            self.invalid_report,
            self.invalid_report.with_name(self.invalid_report.name + ".tmp"),
            ledger,
            *journal_files(ledger),
            rollback_journal(ledger),
            ledger.with_name(ledger.name + ".lock"),
            # Last: the daemon holds it until the filing's end, and a sibling that probes it
            # meanwhile must find the job file gone, not a free lock beside it.
            self.claim_lock().lock_path,
        )


def _run_holds(job: SpoolJob) -> bool:
    """True while a run holds the job's ledger lock, in whichever output format: a daemon
    of a version before claim locks (a rolling upgrade) runs its jobs holding that alone."""
    return any(
        JobLock(dataclasses.replace(job, format=format_).ledger).held_elsewhere()
        for format_ in SINK_FORMATS
    )


#: The name a mount probe starts with (a dotfile: no daemon takes it for a job), and the age
#: past which one is a leftover of a daemon killed while checking.
_PROBE: Final = ".asinb-probe-"
_PROBE_AGE_S: Final = 3_600.0


class Spool:
    """The spool directory: listing, claiming and filing jobs (synchronous file operations)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.inbox = self.root / "inbox"
        self.processing = self.root / "processing"
        self.done = self.root / "done"
        self.failed = self.root / "failed"

    def prepare(self) -> list[Path]:
        """Create the subdirectories that are missing; return those it created.

        Raises:
            NotADirectoryError: a file, or a symbolic link, stands where a folder should be.
            PermissionError: ``processing/`` is another user's.
        """
        made = []
        for directory in (self.inbox, self.processing, self.done, self.failed):
            if directory.is_symlink():
                # Followed, the daemon would claim, write and file where the link points (a
                # producer's done/ replaced by a link to another folder had jobs filed there).
                raise NotADirectoryError(
                    errno.ENOTDIR,
                    f"{directory}: a symbolic link stands where the spool's folder should be; "
                    "make it a folder of the spool (the daemon makes a missing one)",
                )
            if not directory.is_dir():
                if directory.exists():
                    # A file in its place: "File exists" from mkdir would send the operator
                    # looking for a folder that is there.
                    raise NotADirectoryError(
                        errno.ENOTDIR,
                        f"{directory}: a file stands where the spool's folder should be; move "
                        "it away (the daemon makes the folder again)",
                    )
                if directory == self.processing:
                    directory.mkdir(parents=True, exist_ok=True)  # the daemon's own
                else:
                    self._make_shared(directory)
                made.append(directory)
        owner = self.processing.stat().st_uid
        if hasattr(os, "geteuid") and owner != os.geteuid():
            # The daemon's own: one a producer made first held links the runs wrote through.
            raise PermissionError(
                errno.EPERM,
                f"{self.processing}: another user's folder (uid {owner}); processing/ is the "
                "daemon's own: remove it, and the daemon makes it again",
            )
        return made

    def check_one_file_system(self) -> None:
        """Raise unless a job can move between ``processing/`` and each other folder.

        Claiming links a job from ``inbox/`` into ``processing/``, and filing renames it
        into ``done/`` or ``failed/``: neither works across mounts, whether of another file
        system or a bind mount of the same one (EXDEV, at the first job), and a copy instead
        would not be atomic. So a dotfile (ignored by every daemon) is renamed into each
        folder and back.

        Raises:
            ConfigError: a folder is a mount of its own.
            OSError: a folder cannot be written.
        """
        self._forget_old_probes()
        # A name of its own: replicas starting at once may share a pid (1, in containers).
        fd, name = tempfile.mkstemp(dir=self.processing, prefix=_PROBE)
        os.close(fd)
        probe = Path(name)
        apart = []
        try:
            for directory in (self.inbox, self.done, self.failed):
                there = directory / probe.name
                try:
                    os.rename(probe, there)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    apart.append(f"{directory.name}/")
                    continue
                os.rename(there, probe)
        finally:
            probe.unlink(missing_ok=True)
        if apart:
            raise ConfigError(
                "serve --spool",
                f"{' and '.join(apart)} of {self.root} on another mount than processing/: "
                "jobs are moved between these folders, which works within one mount only; "
                "mount the spool directory itself, not its folders",
            )

    def _forget_old_probes(self) -> None:
        """Remove probes a daemon killed mid-check left (an hour old: never a live one)."""
        cutoff = time.time() - _PROBE_AGE_S
        for directory in (self.inbox, self.processing, self.done, self.failed):
            for stray in directory.glob(_PROBE + "*"):
                with contextlib.suppress(OSError):
                    if stray.stat().st_mtime < cutoff:
                        stray.unlink()

    def _make_shared(self, directory: Path) -> None:
        """Make ``inbox/``, ``done/`` or ``failed/`` (at the first start, or again after a
        clean-up removed it) with the spool's group access and setgid bit.

        The producers share these folders with the daemon: the systemd layout makes them
        2770 for their group, like the spool. Made with the daemon's umask alone
        (``UMask=0027``: 2750) one would lock the producers out. Only group bits are taken
        from the spool, never others' or the sticky bit.
        """
        directory.mkdir(parents=True, exist_ok=True)
        shared = stat.S_IMODE(self.root.stat().st_mode) & (stat.S_ISGID | stat.S_IRWXG)
        mode = stat.S_IMODE(directory.stat().st_mode)
        if mode | shared != mode:
            directory.chmod(mode | shared)

    def waiting(self) -> list[str]:
        """Job files in ``inbox/``, oldest first."""
        return _job_files(self.inbox)

    def waiting_count(self) -> int:
        """How many job files ``inbox/`` holds now (no ``stat`` per file: a scrape's count)."""
        try:
            with os.scandir(self.inbox) as entries:
                return sum(
                    1
                    for entry in entries
                    if not _not_yet_a_job(entry.name) and entry.is_file(follow_symlinks=False)
                )
        except FileNotFoundError:
            return 0

    def waiting_entries(
        self, skipped: dict[str, str] | None = None
    ) -> list[tuple[str, os.stat_result]]:
        """Job files in ``inbox/`` with what ``stat`` said of them, oldest first.

        ``skipped``, if given, gets each entry that is no job file (a symbolic link, a
        directory...) and what it is.
        """
        return _job_entries(self.inbox, skipped)

    def drop_duplicates(self) -> list[str]:
        """Remove ``inbox/`` entries that are the same file as a job in ``processing/``.

        A daemon stopped between a claim's link and unlink leaves the job in both places;
        it is claimed already, so the ``inbox/`` entry goes (else the job would run twice).
        Only under the name it was claimed as: another name that is the same file (a
        producer's hard links of one list) is a job of its own.
        """
        claimed: set[tuple[int, int, str]] = set()
        for name, info in _job_entries(self.processing):
            if not _is_reserved(name):
                claimed.add((info.st_dev, info.st_ino, name))
        removed = []
        for name, info in _job_entries(self.inbox):
            if (info.st_dev, info.st_ino, spool_name(name)) in claimed:
                try:
                    (self.inbox / name).unlink(missing_ok=True)
                except PermissionError:
                    # The inbox keeps it (another user's file in a sticky inbox/): the
                    # claim is taken back instead, as :meth:`claim` does, and the entry
                    # left there, warned about when it is next seen.
                    (self.processing / spool_name(name)).unlink(missing_ok=True)
                    continue
                removed.append(name)
        return removed

    def claimed(self) -> list[str]:
        """Job files in ``processing/`` (left by a stopped or crashed daemon), oldest first."""
        return [name for name in _job_files(self.processing) if not _is_reserved(name)]

    def sweep(self) -> list[str]:
        """Remove work files in ``processing/`` whose job file is gone; return their names.

        They are what a crash between filing a job and removing its ledger leaves behind.
        A job that is still there (ours to resume, or another daemon's) keeps its files.
        """
        removed = []
        with os.scandir(self.processing) as entries:
            names = [entry.name for entry in entries]
        for name in names:
            owner = _owner(name)
            if owner is not None and not (self.processing / owner).exists():
                (self.processing / name).unlink(missing_ok=True)
                removed.append(name)
        return removed

    def drop_leftovers(self, name: str) -> list[str]:
        """Remove the work files of ``name`` in ``processing/``; return their names.

        For a job just claimed under ``name``: files already there are an earlier job's of
        that name (a daemon killed while filing it, after its job file left), and the new
        job must not resume from them. Until now no daemon could hold the name (its job
        file was not in ``processing/``), so none of them is in use.
        """
        removed = []
        with os.scandir(self.processing) as entries:
            names = [entry.name for entry in entries]
        for each in names:
            if _owner(each) == name:
                (self.processing / each).unlink(missing_ok=True)
                removed.append(each)
        return removed

    def claim(self, name: str, as_name: str | None = None) -> bool:
        """Move ``inbox/<name>`` to ``processing/<as_name>`` (default: the same name).

        Only a regular file is claimed: an entry swapped in after it was listed (a
        symbolic link, a pipe renamed over the name) is put back where it was found.

        Returns:
            False if someone else has it, ``processing/`` has a job of that name, or the
            entry is no longer a regular file.

        Raises:
            PermissionError: the entry may not be moved (a sticky ``inbox/`` and another
                user's file): it is left in ``inbox/``, unclaimed.
        """
        source, target = self.inbox / name, self.processing / (as_name or name)
        if not self._claim(source, target):
            return False
        if stat.S_ISREG(target.lstat().st_mode):
            return True
        # A link or a pipe renamed over the name between the listing and the claim: it
        # would have been opened (a pipe blocks the loop for good; a link to a file only
        # the daemon may read would have been published in done/). Back to the inbox, whose
        # listing leaves it where it is.
        try:
            if not self._claim(target, source):
                raise FileExistsError(errno.EEXIST, "taken meanwhile", str(source))
        except OSError:
            logger.warning(
                "broker.inbox_entry_ignored",
                entry=_shown(name),
                kind="no regular file once claimed",
                note="only regular files are jobs: it was taken out of processing/",
            )
            target.unlink(missing_ok=True)
        return False

    def _claim(self, source: Path, target: Path) -> bool:
        """Move ``source`` to ``target`` by a link and an unlink (or a rename where links
        are not made): False when another daemon has it."""
        try:
            os.link(source, target, follow_symlinks=False)
        except FileNotFoundError:
            return False  # another daemon claimed it first
        except FileExistsError:
            # The same file (a daemon died between link and unlink): it is claimed already.
            with contextlib.suppress(OSError):
                if os.path.samefile(source, target):
                    source.unlink()
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            if target.exists():
                return False
            try:
                os.rename(source, target)
            except FileNotFoundError:
                return False
            return True
        try:
            source.unlink()
        except FileNotFoundError:
            pass
        except PermissionError:
            # Linked, but the inbox keeps it: claimed so, it would run again once filed.
            target.unlink(missing_ok=True)
            raise
        return True

    def job(self, name: str, default_format: str) -> SpoolJob:
        """The claimed job ``name``; a job begun with another output format keeps it."""
        path = self.processing / name
        for fmt in (default_format, *_FORMATS):
            job = SpoolJob(name, path, fmt)
            if job.ledger.exists():
                return job
        return SpoolJob(name, path, default_format)

    def reject(
        self, name: str, status: Mapping[str, object], as_name: str | None = None
    ) -> Path | None:
        """File ``inbox/<name>`` straight into ``failed/`` (as ``as_name``, default the same
        name); None if it vanished meanwhile (another daemon took it).

        The entry is taken first, by a rename to a hidden name in ``failed/``: of two daemons
        refusing it, only one gets it, and the other writes nothing. A crash before it is
        filed leaves the hidden entry, which :meth:`recover` puts back into ``inbox/``.

        Raises:
            PermissionError: the entry may not be moved (as for :meth:`claim`).
        """
        target = as_name or name
        held = self.failed / f"{_REFUSING}{secrets.token_hex(4)}.{target}"
        try:
            os.rename(self.inbox / name, held)
        except FileNotFoundError:
            return None
        try:
            identity = os.stat(held).st_ino
        except FileNotFoundError:
            return None  # a daemon starting meanwhile put it back into inbox/
        base = _take_free_name(self.failed, target, identity)
        try:
            _write_status(_status_path(self.failed, base), status)
            try:
                os.rename(held, self.failed / base)
            except FileNotFoundError:
                # A daemon starting meanwhile put it back into inbox/: refused there again.
                _status_path(self.failed, base).unlink(missing_ok=True)
                return None
            _fsync_dir(self.failed)
        finally:
            _reservation(self.failed, base).unlink(missing_ok=True)
        return self.failed / base

    def recover(self) -> list[str]:
        """Put entries a refusal left half-done (a crash) back into ``inbox/``; their names."""
        recovered = []
        with os.scandir(self.failed) as entries:
            held = [entry.name for entry in entries if entry.name.startswith(_REFUSING)]
        for entry in held:
            _, _, name = entry[len(_REFUSING) :].partition(".")
            if not name:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.failed / entry, self.inbox / _free_name(self.inbox, name))
                recovered.append(name)
        return recovered

    def drop_stale_reservations(self) -> list[str]:
        """Remove name reservations in ``done/`` and ``failed/`` that a killed filing left;
        return their names.

        Left there, one held its name for ever: the next job of that name was filed as
        ``a-2.txt`` beside no ``a.txt``. A reservation is stale when it is older than
        :data:`_STALE_RESERVATION_S` (a filing lasts a few renames) and the file it names is
        nowhere a filing can hold it: not in ``inbox/`` (a refusal a crash cut short puts its
        entry back there, to be refused again under the reservation it left), not in
        ``processing/`` (to be filed again, which takes its reservation back), not
        mid-refusal in ``failed/``, and not the reserved name's own file. The places are
        looked at after the reservations are read, in the order a file moves through them,
        so a filing under way is always found.
        """
        now = time.time()
        found: list[tuple[Path, int, os.stat_result]] = []
        for directory in (self.done, self.failed):
            with os.scandir(directory) as entries:
                names = [entry.name for entry in entries if entry.name.startswith(_TAKING)]
            for name in names:
                path = directory / name
                with contextlib.suppress(OSError, ValueError):
                    info = os.stat(path, follow_symlinks=False)
                    if now - info.st_mtime >= _STALE_RESERVATION_S:
                        found.append((path, int(path.read_bytes()), info))
        if not found:
            return []
        held = _inodes(self.inbox) | _inodes(self.processing) | _inodes(self.failed, _REFUSING)
        dropped = []
        for path, identity, info in found:
            if identity in held:
                continue
            with contextlib.suppress(OSError):
                named = path.parent / path.name[len(_TAKING) :]
                if os.stat(named, follow_symlinks=False).st_ino == identity:
                    continue
            with contextlib.suppress(FileNotFoundError):
                # The same reservation still (not one made again since under its name).
                if os.stat(path, follow_symlinks=False).st_ino == info.st_ino:
                    path.unlink()
                    dropped.append(f"{path.parent.name}/{path.name}")
        return dropped

    def file(self, job: SpoolJob, outcome: str, status: Mapping[str, object]) -> Path:
        """Move a finished job into ``done/`` or ``failed/``, with its outputs: a failed
        job's holds the rows answered before it failed (paid for, and kept).

        Outputs and the status file go first, the job file last, then the work files are
        removed: a crash at any point leaves the job in ``processing/`` to be filed again.

        Returns:
            The job file's new path.
        """
        dest = self.done if outcome == "done" else self.failed
        # Removed while the job ran (a clean-up script): made again, not a failed daemon.
        if not dest.is_dir():
            self._make_shared(dest)
            _say_recreated([dest])
        base, again = self._filing_name(job, dest)
        record = dict(status)
        # A SQLite output a viewer kept in WAL mode holds rows in its -wal: moved with it,
        # first (a file filed without them read "no such table", its rows left behind).
        for journal, suffix in zip(journal_files(job.out), ("-wal", "-shm"), strict=True):
            _move(journal, dest, f"{base}.out.{job.format}{suffix}")
        record["output"] = _move(job.out, dest, f"{base}.out.{job.format}")
        record["invalid_report"] = _move(
            job.invalid_report, dest, f"{base}.out.{job.format}.invalid.jsonl"
        )
        # Copies a killed filing left are looked for only when one was cut short: listing
        # done/ at every filing cost a scan of every job ever filed (quadratic).
        _write_status(_status_path(dest, base), record, only_writer=again)
        os.replace(job.path, dest / base)
        _fsync_dir(dest)
        _fsync_dir(self.processing)
        # The name is the job file's now (a crash before this leaves the reservation, a
        # hidden file naming the job's inode, which its filing again takes back).
        _reservation(dest, base).unlink(missing_ok=True)
        for path in job.work_files():
            path.unlink(missing_ok=True)
        return dest / base

    def _filing_name(self, job: SpoolJob, dest: Path) -> tuple[str, bool]:
        """The name ``job`` is filed under in ``dest``, kept in its filing marker, and
        whether an earlier filing of it under that name was cut short.

        A filing the daemon did not finish (a crash) left the marker: the job is filed
        under the same name again, overwriting that filing's outputs and status, so
        ``dest`` never holds its rows twice. The marker names the job file it was written
        for (its inode): one left by an earlier job of the same name, whose filing
        completed, is ignored, and nothing of that filing is touched. Without a marker of
        this job, the first free name.
        """
        # The inode alone: a device number may change across the restart that follows a
        # crash (network file systems, a volume mounted on another node).
        identity = os.stat(job.path).st_ino
        marked = self._marked(job, identity)
        if marked is not None and marked[0] == dest.name:
            if _reserve(dest, marked[1], identity):
                return marked[1], True
            # Cut short before it wrote anything there, and another daemon's filing has
            # the name since: nothing there is this job's.
            marked = None
        if marked is not None:
            where, name = marked
            # Filed elsewhere before the crash (the job's outcome changed): drop that try,
            # and the copy of its status a kill may have left.
            elsewhere = self.root / where
            for left in (
                *_filing_files(elsewhere, name),
                *copies_of(_status_path(elsewhere, name)),
            ):
                left.unlink(missing_ok=True)
        base = _take_free_name(dest, job.name, identity)
        marker = {"dest": dest.name, "name": base, "file": identity}
        _write_status(job.filing_marker, marker, only_writer=True)
        return base, False

    def _marked(self, job: SpoolJob, identity: int) -> tuple[str, str] | None:
        """(folder, name) of the filing of ``job`` (its file's inode ``identity``) that a
        crash cut short, from its filing marker; None if there is none."""
        try:
            before = json.loads(job.filing_marker.read_text(encoding="utf-8"))
            where, name, ours = str(before["dest"]), str(before["name"]), before["file"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if (
            name
            and ours == identity
            and where in (self.done.name, self.failed.name)
            and not (self.root / where / name).exists()
        ):
            return where, name
        return None

    def done_name(self, job: SpoolJob) -> str:
        """The name ``job`` would be filed under in ``done/`` now, without filing it: the
        name of its filing a crash cut short there (its outputs already moved in), else the
        first free one. Its ``/metrics`` label while it runs."""
        with contextlib.suppress(OSError):
            marked = self._marked(job, os.stat(job.path).st_ino)
            if marked is not None and marked[0] == self.done.name:
                return marked[1]
        return _free_name(self.done, job.name)


def _status_path(directory: Path, name: str) -> Path:
    """The status file of the job filed as ``name`` in ``directory``."""
    return directory / f"{name}{_STATUS_SUFFIX}"


def _reservation(directory: Path, name: str) -> Path:
    """The file that reserves ``name`` in ``directory`` for the filing under way."""
    return directory / f"{_TAKING}{name}"


def _filing_files(directory: Path, name: str) -> list[Path]:
    """The status and output files a filing under ``name`` writes into ``directory``, and
    the name's reservation."""
    names = [_reservation(directory, name).name, _status_path(directory, name).name]
    for fmt in _FORMATS:
        names += [f"{name}.out.{fmt}", f"{name}.out.{fmt}.invalid.jsonl"]
    return [directory / each for each in names]


def _is_reserved(name: str) -> bool:
    """True for names of the daemon's own files, which a job may not take."""
    return name.endswith(_STATUS_SUFFIX) or any(part in name for part in _RESERVED)


def _owner(name: str) -> str | None:
    """The job a work file belongs to (``a.txt`` for ``a.txt.out.csv.ledger``, and for the
    copy of its filing marker a write left, ``.a.txt.out.csv.filing.0a1b2c3d.tmp``), else
    None."""
    name = original_of(name) or name
    cut = min((i for i in (name.find(part) for part in _RESERVED) if i > 0), default=-1)
    return name[:cut] if cut > 0 else None


def _not_yet_a_job(name: str) -> bool:
    """A dotfile or a name producers give a file still being written (``*.tmp``, ...):
    Emacs's auto-save ``#name#`` and an office program's lock file ``~$name`` too."""
    return (
        name.startswith((".", "~$"))
        or name.endswith(_UNFINISHED)
        or (len(name) > 2 and name.startswith("#") and name.endswith("#"))
    )


def _job_files(directory: Path) -> list[str]:
    return [name for name, _ in _job_entries(directory)]


def _job_entries(
    directory: Path, skipped: dict[str, str] | None = None
) -> list[tuple[str, os.stat_result]]:
    found: list[tuple[int, str, os.stat_result]] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if _not_yet_a_job(entry.name):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # taken by another daemon while we looked
            if stat.S_ISREG(info.st_mode):
                found.append((info.st_mtime_ns, entry.name, info))
            elif skipped is not None:
                skipped[entry.name] = _kind(info.st_mode)
    return [(name, info) for _, name, info in sorted(found, key=lambda item: item[:2])]


def _kind(mode: int) -> str:
    """What a directory entry that is no regular file is, in words."""
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "named pipe"
    return "special file"


def _inodes(directory: Path, prefix: str = "") -> set[int]:
    """The inodes of the entries of ``directory`` whose names start with ``prefix``, as
    ``os.stat`` gives them (as a reservation names its file: a directory entry's own inode
    may differ on an overlay file system)."""
    found = set()
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):
                    found.add(entry.stat(follow_symlinks=False).st_ino)
    return found


#: The suffix number each (folder, job name) was last found free at, newest last: where
#: :func:`_free_name` looks next. Bounded: a daemon meets ever new names.
_NEXT_SUFFIX: dict[tuple[str, str], int] = {}
_NEXT_SUFFIX_KEPT: Final = 1024


def _free_name(directory: Path, name: str, identity: int | None = None) -> str:
    """``name``, or ``head-2.rest``, ``head-3.rest``... whichever has no file of its own yet:
    no job file, status file, output or reservation (a refused file named
    ``r.txt.status.json`` holds ``r.txt``'s status; an output kept after its job file was
    deleted holds its outputs); a reservation for the file ``identity`` is its own."""

    def free(candidate: str) -> bool:
        reservation = _reservation(directory, candidate)
        taken = [directory / candidate, *_filing_files(directory, candidate)]
        if identity is not None and _reserved_for(reservation) == identity:
            taken.remove(reservation)
        # A link takes its name too, dangling or not: written through, a status file would
        # land wherever a producer who can write done/ pointed it.
        return not any(os.path.lexists(path) for path in taken)

    if free(name):
        return name
    head, dot, rest = name.partition(".")
    # Counted on from the number found last for this name here, not from 2: a name dropped
    # in every day (a cron job's asins.csv) was looked for past every earlier filing, about
    # 9 paths each, at each filing and at each /metrics scrape while one ran (20,000 filings
    # took 0.7 s, and the event loop with them). A number freed since is not reused.
    memo = (os.fspath(directory), name)
    for n in itertools.count(_NEXT_SUFFIX.pop(memo, 2)):
        candidate = f"{head}-{n}{dot}{rest}"
        if free(candidate):
            _NEXT_SUFFIX[memo] = n
            if len(_NEXT_SUFFIX) > _NEXT_SUFFIX_KEPT:
                del _NEXT_SUFFIX[next(iter(_NEXT_SUFFIX))]  # the name used longest ago
            return candidate
    raise AssertionError("unreachable")  # pragma: no cover


def _take_free_name(directory: Path, name: str, identity: int) -> str:
    """The first free name for ``name`` in ``directory`` (:func:`_free_name`), reserved for
    the file ``identity`` (its inode): of two daemons that found one name free, one takes it
    and the other the next (see :data:`_TAKING`)."""
    while True:
        base = _free_name(directory, name, identity)
        if _reserve(directory, base, identity):
            return base


def _reserve(directory: Path, name: str, identity: int) -> bool:
    """Reserve ``name`` in ``directory`` for the file ``identity``; False when another
    file's filing holds it. The reservation is made with O_EXCL and names the file, so the
    same job filed again after a crash takes its own reservation back."""
    path = _reservation(directory, name)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return _reserved_for(path) == identity
    try:
        try:
            os.write(fd, str(identity).encode())
        finally:
            os.close(fd)
    except OSError as exc:
        # An empty reservation would hold the name from every filing until it is swept;
        # and a full disk names no file by itself.
        path.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    return True


def _reserved_for(path: Path) -> int | None:
    """The inode the reservation ``path`` names; None if none can be read (being written,
    gone, or cut short by a crash: never this filing's)."""
    try:
        return int(path.read_bytes())
    except (OSError, ValueError):
        return None


def _move(source: Path, directory: Path, name: str) -> str | None:
    if not source.exists():
        return None
    os.replace(source, directory / name)
    return name


def _say_recreated(made: Sequence[Path]) -> None:
    """Warn that spool folders removed while the daemon ran were made again: whatever they
    held (results filed earlier) is gone, which the operator must learn."""
    logger.warning(
        "broker.spool_folders_recreated",
        folders=[str(path) for path in made],
        note="removed while the daemon ran; whatever they held is gone",
    )


def _write_status(path: Path, status: Mapping[str, object], *, only_writer: bool = False) -> None:
    """Write a status (or filing marker) file whole. ``only_writer``: this daemon holds the
    job's claim, so copies of the file beside it are a killed filing's (they were left in
    done/ for good), not a sibling's write under way (two daemons refusing one entry)."""
    if only_writer:
        for left in copies_of(path):
            left.unlink(missing_ok=True)
    # The daemon's own file: a link put in its place (before, or while it writes) is
    # replaced, never written through (it would create or replace the file it names, as the
    # daemon's user).
    write_whole(path, json.dumps(status, ensure_ascii=False, indent=2) + "\n", through_links=False)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Daemon:
    """The spool daemon; see the module docstring. Implements the HTTP ``StatusSource``.

    Args:
        config: the validated configuration (the broker's and the jobs' output format).
        options: spool, HTTP address and behaviour.
        clock: time source of the broker and of ``finished_at`` stamps.

    Raises:
        ConfigError: ``options.host`` is not loopback and remote binding is not allowed, or
            ``options.port`` is not a port number.
    """

    def __init__(
        self, config: BrokerConfig, options: ServeOptions, *, clock: Clock | None = None
    ) -> None:
        check_host(options.host, allow_remote=options.allow_remote)
        if not 0 <= options.port <= 65535:
            raise ConfigError("--port", f"{options.port} is not a port number (0-65535)")
        self._config = config
        self._options = options
        self._clock: Clock = clock or LoopClock()
        self.spool = Spool(options.spool)
        self._stop = asyncio.Event()
        #: set once the HTTP endpoints listen and the broker is open
        self.started = asyncio.Event()
        self.url: str | None = None
        self._state = "starting"
        self._signals = StopSignals(
            self._on_first_signal,
            self._on_next_signal,
            monotonic=self._clock.monotonic,
            sigint_echo=sigint_echo_window() if options.handle_signals else None,
        )
        self._broker: Broker | None = None
        self._current: SpoolJob | None = None
        self._jobs_done = 0
        self._jobs_failed = 0
        # Rows this process wrote, by final status: only ever grows (``asinb_rows_total``).
        self._rows: collections.Counter[str] = collections.Counter()
        # The current job's rows already in ``_rows`` (its tally before this run, at first).
        self._rows_counted: dict[str, int] = {}
        self._recent: collections.deque[JobRows] = collections.deque(maxlen=_RECENT_JOBS)
        # inbox/ name -> (what stat said, monotonic time it was first seen so)
        self._settling: dict[str, tuple[tuple[int, int, int], float]] = {}
        # The last listing of inbox/ not yet gone through (oldest first), and when it was
        # taken (monotonic): a backlog is claimed from one listing, not one per claim.
        self._listing: collections.deque[tuple[str, os.stat_result]] = collections.deque()
        self._listed_at = -math.inf
        # inbox/ entries that are no job files, already warned about
        self._ignored: set[str] = set()
        # inbox/ entries the daemon may not move, warned about once each
        self._immovable: set[str] = set()
        # inbox/ entries waiting for processing/ to let go of their name, warned about once
        self._behind: set[str] = set()
        # Why inbox/ could not be counted at the last scrape (warned once), or None.
        self._inbox_error: str | None = None
        # Jobs stopped by ``no_wait``, until their keys' daily quota resets.
        self._deferred: dict[str, _Deferral] = {}
        self._said_at_cap = False
        # When processing/ is next looked at for jobs a dead daemon left (monotonic), and
        # the jobs no daemon held at the last look.
        self._orphans_due = 0.0
        self._unheld: set[str] = set()

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until :meth:`request_stop` or a signal, then close everything and return.

        Raises:
            NoUsableKeyError: every key is out of rotation (the job stays in processing/).
            ConfigError: the HTTP port cannot be bound, or a key has no secret.
            OSError: the spool cannot be written.
            Exception: what stopped the broker's engine (a crash), within a poll of it.
        """
        loop = asyncio.get_running_loop()
        if self._options.handle_signals:
            for sig in STOP_SIGNALS:
                loop.add_signal_handler(sig, self._signals, sig)
            replay_early(self._signals)
        try:
            async with contextlib.AsyncExitStack() as stack:
                # Bound first: a daemon refused its port (in use) leaves no spool behind.
                self.url = await self._listen(stack)
                self.spool.prepare()
                self.spool.check_one_file_system()
                # Daily counts, rates and pauses live in the shared key state ([state]),
                # shared with every other broker process (and daemon) using the keys.
                broker = Broker(
                    self._config, clock=self._clock, cache_default_max_age_s=RUN_MAX_AGE_S
                )
                self._broker = await stack.enter_async_context(broker)
                self._state = "running"
                self.started.set()
                logger.info("broker.daemon_started", spool=str(self.spool.root), url=self.url)
                try:
                    await self._work(self._broker)
                finally:
                    self._state = "stopping"
            self._broker = None
        finally:
            self._state = "stopping"
            if self._options.handle_signals:
                for sig in STOP_SIGNALS:
                    loop.remove_signal_handler(sig)
                release()
        logger.info(
            "broker.daemon_stopped", jobs_done=self._jobs_done, jobs_failed=self._jobs_failed
        )

    def request_stop(self) -> None:
        """Stop claiming and drain the current job as ``broker run`` does at a first signal:
        requests already sent are answered and written (for at most ``drain_grace_s``), the
        rest stay pending, and the job resumes at the next start."""
        self._stop.set()

    def _on_first_signal(self, sig: signal.Signals) -> None:
        logger.warning(
            "broker.daemon_stopping",
            signal=sig.name,
            job=self._current.name if self._current else None,
            note="no new requests; those already sent are answered and written, and an "
            "unfinished job resumes at the next start; send the signal again to stop at once",
        )
        self.request_stop()

    def _on_next_signal(self, sig: signal.Signals) -> None:
        logger.warning("broker.daemon_forced", signal=sig.name, exit_code=ExitCode.RESUMABLE)
        sys.stderr.flush()
        # The ledgers are crash-safe, so even this leaves every job resumable.
        os._exit(ExitCode.RESUMABLE)

    async def _listen(self, stack: contextlib.AsyncExitStack) -> str:
        options = self._options
        server = MetricsServer(
            self, host=options.host, port=options.port, allow_remote=options.allow_remote
        )
        try:
            await stack.enter_async_context(server)
        except OSError as exc:
            raise ConfigError(
                "--port", f"cannot listen on {options.host}:{options.port}: {exc.strerror}"
            ) from exc
        return server.url

    # -- the work loop ------------------------------------------------------------------------

    async def _work(self, broker: Broker) -> None:
        try:
            await self._work_loop(broker)
        finally:
            for deferral in self._deferred.values():
                if deferral.claim is not None:
                    deferral.claim.close()
                    deferral.claim = None

    async def _work_loop(self, broker: Broker) -> None:
        self._name_old_budget()
        self._rename_awkward_claims()
        swept = self.spool.sweep()
        if swept:
            logger.info("broker.spool_swept", removed=swept)
        recovered = self.spool.recover()
        if recovered:
            logger.warning(
                "broker.spool_refusals_recovered",
                jobs=[_shown(name) for name in recovered],
                note="a stop mid-refusal: back in inbox/, they are refused again",
            )
        stale = self.spool.drop_stale_reservations()
        if stale:
            logger.info("broker.spool_reservations_dropped", removed=stale)
        duplicates = self.spool.drop_duplicates()
        if duplicates:
            logger.warning(
                "broker.spool_duplicates_removed",
                removed=[_shown(name) for name in duplicates],
                note="each was the same file as a job in processing/ (a stop mid-claim)",
            )
        for left in self.spool.claimed():
            if self._stop.is_set():
                return
            if self._at_deferral_cap():
                break  # the rest are taken up as unheld jobs once deferred ones resume
            await self._process(broker, left, resumed=True)
        while not self._stop.is_set():
            stopped = broker.engine_error
            if stopped is not None:
                # Every job would fail on it, so stop now (its exit code, 1 for a crash: a
                # service manager restarts the daemon with a new engine) rather than idle
                # on, answering healthy, until the next job meets it.
                raise stopped
            self._restore_folders()
            name = self._next_job(broker)
            if name is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._options.poll_s):
                        await self._stop.wait()
                continue
            deferral = self._deferred.pop(name, None)
            if deferral is None:
                await self._process(broker, name)
            else:
                await self._process(broker, name, deferral.claim, spent=deferral.spent)

    def _next_job(self, broker: Broker) -> str | None:
        """The job to run next, if any: a deferred one whose quota reset, one a dead sibling
        left in processing/, else a new one from inbox/ (oldest first).

        While a job in processing/ waits for its second look as a dead sibling's, nothing
        new is claimed: taken first, a new job kept it waiting for the whole of its run.
        Nor while one looks dead between two looks (its claim lock left, no one holding it):
        a sibling killed just after a look would otherwise wait for the next job's run.
        """
        name = self._due_deferred(broker)
        if name is None and not self._at_deferral_cap():
            name = self._orphan()
            if name is None and not self._unheld:
                name = self._claim_next()
        return name

    def _looks_dead(self) -> bool:
        """True when a job in processing/ that is not deferred here has a claim lock file
        that no daemon holds (nor a run its ledger): its daemon died, or is in the instant
        of taking or dropping the lock; the looks of :meth:`_orphan` tell which."""
        format_ = self._config.output.format
        return any(
            name not in self._deferred
            and self.spool.job(name, format_).claim_lock().lock_path.exists()
            and self._held_by_none(name)
            for name in self.spool.claimed()
        )

    def _at_deferral_cap(self) -> bool:
        """True while deferred jobs hold as many open files as the daemon allows them (said
        once each time): a new job may be deferred too, and the daemon ran out of files."""
        full = len(self._deferred) >= _deferral_cap()
        if full and not self._said_at_cap:
            logger.warning(
                "broker.deferred_jobs_at_cap",
                deferred=len(self._deferred),
                note="each deferred job holds an open file until its keys' daily quota "
                "resets; no new job is claimed until one resumes (raise the open-file limit, "
                "LimitNOFILE or ulimit -n, to hold more)",
            )
        self._said_at_cap = full
        return full

    def _name_old_budget(self) -> None:
        """Warn about the daily counts a broker from before the keys' shared state kept in
        the spool (``state/budget.sqlite``): they are not read, so today's count of each key
        starts from what the key-state store knows, and a key near its TPD may send past
        Amazon's quota today (Amazon's 429s then park it)."""
        path = self.spool.root / "state" / "budget.sqlite"
        if not path.is_file():
            return
        today = self._clock.utcnow().date().isoformat()
        try:
            # As a URI (read-only), percent-encoded: a spool path may hold '?' or '#'.
            read_only = f"{path.absolute().as_uri()}?mode=ro"
            with contextlib.closing(sqlite3.connect(read_only, uri=True)) as conn:
                rows = conn.execute(
                    "SELECT key_name, count FROM budget WHERE day = ?", (today,)
                ).fetchall()
        except sqlite3.Error:
            rows = []
        logger.warning(
            "broker.old_daily_counts_ignored",
            path=str(path),
            today={str(name): int(count) for name, count in rows},
            note="an older broker's daily counts, kept in the spool; this version keeps them in "
            "the key-state store and does not read this file: delete it once its day is over",
        )

    def _restore_folders(self) -> None:
        """Make again the spool folders removed while the daemon runs (a clean-up script,
        an operator resetting the spool), so new jobs are still claimed and filed."""
        made = self.spool.prepare()
        if made:
            _say_recreated(made)

    def _rename_awkward_claims(self) -> None:
        """Give jobs left in processing/ under an awkward name (an older daemon's) a safe one."""
        for name in self.spool.claimed():
            safe = spool_name(name)
            if safe != name and not (self.spool.processing / safe).exists():
                os.rename(self.spool.processing / name, self.spool.processing / safe)
                logger.info("broker.job_renamed", job=safe, received_as=_shown(name))

    def _due_deferred(self, broker: Broker) -> str | None:
        """A job stopped by ``no_wait`` whose keys' daily quota has reset, if any.

        Judged by its keys, at every poll: the job goes on once they no longer wait. Their
        reset is the key-state store's (Redis's clock), not this machine's: a clock ahead
        of the store's made the job run and defer again at every poll, and one behind held
        it past the real reset by as much as it is behind. A job with no key left to ask
        (none named, or each taken out since) goes on at its reset by this machine's clock,
        to end as its keys say.
        """
        now = self._clock.utcnow()
        metrics: MetricsSnapshot | None = None
        for name, deferral in list(self._deferred.items()):
            if not _same_file(self.spool.processing / name, deferral.file_id):
                # Removed while it waited (to cancel it), or replaced (another list renamed
                # over it: claimed next as a job of its own, as for a running job), looked
                # for at every poll: its work files and claim go with it now, not at its
                # reset hours later, or a new job of that name would run under its deferral
                # (its figures, its claim lock already unlinked, so a sibling took the job
                # for a dead one's).
                del self._deferred[name]
                self._vanished(self.spool.job(name, self._config.output.format))
                if deferral.claim is not None:
                    deferral.claim.close()
                continue
            if deferral.keys:
                # One snapshot a poll, for every deferred job.
                metrics = metrics or broker.metrics()
            if metrics is not None and _keys_in_use(metrics, deferral.keys):
                waiting = quota_wait(metrics, keys=deferral.keys, now=now) is not None
            else:
                waiting = deferral.until > now
            if waiting:
                continue
            # Left in _deferred: the work loop takes it, and its claim, from there.
            logger.info("broker.job_resumed", job=name, note="daily quota reset")
            return name
        return None

    def _orphan(self) -> str | None:
        """A job in processing/ no daemon holds, seen so at two looks some seconds apart.

        Jobs found there at start are resumed then; this takes over one whose daemon died
        while this one ran (two replicas on one spool). A daemon holds a job's claim lock
        from before it runs the job until it has filed it; the second look lets a sibling
        that has just claimed a job take its lock. A job whose run holds its ledger's lock
        is left alone too (a daemon of a version before claim locks runs it, in a rolling
        upgrade). This daemon's deferred jobs wait their turn.
        """
        now = self._clock.monotonic()
        if now < self._orphans_due:
            return None
        self._orphans_due = now + _ORPHAN_CHECK_S
        seen, self._unheld = self._unheld, set()
        for name in self.spool.claimed():
            if name in self._deferred or not self._held_by_none(name):
                continue
            if name not in seen:
                self._unheld.add(name)
                continue
            logger.warning(
                "broker.job_resumed", job=name, note="left in processing/ by a daemon that died"
            )
            # The others seen unheld twice are taken next, each before any new job: kept as
            # seen, else the next look counted them afresh and new jobs went first.
            self._unheld |= (seen - {name}) & set(self.spool.claimed())
            return name
        return None

    def _held_by_none(self, name: str) -> bool:
        """True when no daemon holds the claim of ``processing/<name>`` and no run its
        ledger (a daemon of a version before claim locks), the job file still there."""
        job = self.spool.job(name, self._config.output.format)
        claim = job.claim_lock()
        try:
            claim.acquire()
        except (JobLockedError, OSError):
            return False
        try:
            if not job.path.exists():
                claim.lock_path.unlink(missing_ok=True)  # filed since it was listed
                return False
            # Looked at while the claim is held: a newer sibling cannot claim the job and
            # start its run in between (the probe would refuse that run its ledger lock).
            return not _run_holds(job)
        finally:
            claim.close()

    def _inbox_unreadable(self, exc: OSError) -> None:
        """Say once (until the inbox reads again) that inbox/ cannot be read, and why."""
        if self._inbox_error is None:
            self._inbox_error = str(exc)
            logger.warning("broker.inbox_unreadable", inbox=str(self.spool.inbox), error=str(exc))

    def _say_immovable(self, name: str, exc: PermissionError) -> None:
        """Warn once about an inbox/ entry the daemon may not move (it stays there)."""
        if name not in self._immovable:
            self._immovable.add(name)
            logger.warning(
                "broker.inbox_entry_ignored",
                entry=_shown(name),
                kind=f"not movable ({exc.strerror})",
                note="the daemon's user may not move it out of inbox/ (a sticky inbox/ lets "
                "only a file's owner move it): drop the sticky bit, or have producers run as "
                "the daemon's user; it is taken once it can be moved",
            )

    def _say_behind(self, name: str, safe: str) -> None:
        """Warn once about an inbox/ entry left there because ``processing/`` holds a job of
        its name: a deferred one (``no_wait``), or another daemon's. It is claimed once that
        one is filed; until then nothing else would say why it waits."""
        held = self.spool.processing / safe
        try:
            if name in self._behind or os.path.samefile(self.spool.inbox / name, held):
                return  # the claim of this very file (another daemon's, or one recovered)
        except FileNotFoundError:
            return  # gone from inbox/ (claimed by another daemon), or nothing holds the name
        self._behind.add(name)
        logger.warning(
            "broker.inbox_entry_waiting",
            entry=_shown(name),
            reason="processing/ holds a job of this name"
            + (", deferred until its keys' daily quota resets" if safe in self._deferred else ""),
            note="it is claimed once that job is filed; give each job a name of its own (a "
            "date or a counter in it) to run them side by side",
        )

    def _say_ignored(self, skipped: dict[str, str]) -> None:
        """Warn once about each inbox/ entry that is no job file and stays there for good."""
        for name in skipped.keys() - self._ignored:
            logger.warning(
                "broker.inbox_entry_ignored",
                entry=_shown(name),
                kind=skipped[name],
                note="only regular files are jobs: move the file itself into inbox/",
            )
        self._ignored = set(skipped)

    def _claim_next(self) -> str | None:
        """Claim the oldest settled job of ``inbox/``, if any.

        Taken from the last listing of ``inbox/`` while that is younger than ``poll_s``
        and not gone through, else from a new one: listing (and ``stat``-ing) every waiting
        job for each claim made a backlog cost its size squared. A job put in meanwhile is
        seen at the next listing, within ``poll_s``; the one about to be claimed is looked
        at again first.
        """
        now = self._clock.monotonic()
        fresh = not self._listing or now - self._listed_at >= self._options.poll_s
        if fresh:
            skipped: dict[str, str] = {}
            try:
                waiting = self.spool.waiting_entries(skipped)
            except PermissionError as exc:
                # A chmod, an ACL or an NFS mapping the operator can mend: polled on, not a
                # daemon that exits (and a unit that gives up after its restarts).
                self._inbox_unreadable(exc)
                return None
            self._inbox_error = None
            self._say_ignored(skipped)
            seen = {name for name, _ in waiting}
            for gone in self._settling.keys() - seen:
                del self._settling[gone]
            self._immovable &= seen
            self._behind &= seen
            self._listing = collections.deque(waiting)
            self._listed_at = now
        looks_dead: bool | None = None
        while self._listing:
            name, info = self._listing.popleft()
            if not fresh:
                try:
                    info = os.stat(self.spool.inbox / name, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # claimed by another daemon, or taken back
                except PermissionError as exc:
                    # inbox/ unreadable since the listing: polled on, as at a listing.
                    self._listing.clear()
                    self._inbox_unreadable(exc)
                    return None
                if not stat.S_ISREG(info.st_mode):
                    continue  # no longer a job file: the next listing says what it is
            if _is_reserved(name):
                message = (
                    f"the name {_shown(name)!r} is reserved for the daemon's work files "
                    f"(it contains {' or '.join(_RESERVED)}, or ends in {_STATUS_SUFFIX}); "
                    "rename the job"
                )
                safe = spool_name(name)
                try:
                    path = self.spool.reject(name, self._failure_status(safe, message), safe)
                except PermissionError as exc:
                    self._say_immovable(name, exc)
                    continue
                if path is not None:
                    self._count_failed(name, message, path, ExitCode.DATA_ERROR)
                continue
            if not self._settled(name, info):
                continue
            if looks_dead is None:
                # Looked at only with a job to claim: probing locks at every idle poll
                # costs a lock round-trip per job on a network file system.
                looks_dead = self._looks_dead()
            if looks_dead:
                self._listing.appendleft((name, info))
                return None
            safe = spool_name(name)
            try:
                claimed = self.spool.claim(name, safe)
            except PermissionError as exc:
                # Another user's file in a sticky inbox/: the entry's trouble, not the
                # daemon's (it exited 74, and a restarting unit met the file again).
                self._say_immovable(name, exc)
                continue
            if not claimed:
                self._say_behind(name, safe)
                continue
            self._settling.pop(name, None)
            left = self.spool.drop_leftovers(safe)
            if left:
                logger.warning(
                    "broker.job_leftovers_dropped",
                    job=safe,
                    removed=[_shown(each) for each in left],
                    note="an earlier job of this name left them (a daemon killed while "
                    "filing it); the new job starts afresh",
                )
            if safe == name:
                logger.info("broker.job_claimed", job=safe)
            else:
                logger.info("broker.job_claimed", job=safe, received_as=_shown(name))
            return safe
        return None

    def _settled(self, name: str, info: os.stat_result) -> bool:
        """True when ``inbox/<name>`` has stopped changing (see "Settling" above)."""
        settle_s = self._options.settle_s
        if settle_s <= 0:
            return True
        # The mtime is the file system's wall-clock time, so it is read against the real
        # wall clock, not the daemon's (possibly fake) one.
        if time.time() - info.st_mtime_ns / 1e9 >= settle_s:
            return True
        signature = (info.st_ino, info.st_size, info.st_mtime_ns)
        now = self._clock.monotonic()
        first = self._settling.get(name)
        if first is None or first[0] != signature:
            self._settling[name] = (signature, now)
            return False
        return now - first[1] >= settle_s

    async def _process(
        self,
        broker: Broker,
        name: str,
        claim: JobLock | None = None,
        *,
        resumed: bool = False,
        spent: _Spent | None = None,
    ) -> None:
        """Run and file the claimed job ``name``, holding its claim lock throughout (a
        sibling daemon then knows it is not left over), unless another daemon holds it.

        ``claim``: the job's lock, already held (a deferred job resuming). A job deferred
        for the daily quota keeps its lock held until it resumes. ``resumed``: a job found
        in processing/ at the start, said to be resumed once its lock is this daemon's.
        ``spent``: what its runs before a deferral spent.
        """
        job = self.spool.job(name, self._config.output.format)
        if claim is None:
            claim = job.claim_lock()
            for wait_s in _CLAIM_RETRIES_S:
                try:
                    claim.acquire()
                    break
                except JobLockedError as exc:
                    held = exc
                # A sibling's look at the job holds the lock for an instant; its run, for good.
                await self._clock.sleep(wait_s)
            else:
                logger.info(
                    "broker.job_held", job=name, pid=held.pid, note="another daemon runs it"
                )
                return
        if resumed:
            logger.info("broker.job_resumed", job=name)
        try:
            if job.path.exists():
                await self._run_claimed(broker, job, spent)
            else:
                # Filed meanwhile (listed before): the lock file this made goes too.
                claim.lock_path.unlink(missing_ok=True)
        finally:
            deferral = self._deferred.get(name)
            if deferral is not None and job.path.exists():
                deferral.claim = claim
            else:
                claim.close()

    async def _run_claimed(
        self, broker: Broker, job: SpoolJob, spent: _Spent | None = None
    ) -> None:
        name = job.name
        before_stat = self._check_readable(job)
        if before_stat is None:
            return
        options = JobOptions(
            job=job.path,
            out=job.out,
            format=job.format,
            progress=self._options.progress,
            handle_signals=False,
            convert_isbn13=self._options.convert_isbn13,
            pin_reading=False,
            no_wait=self._options.no_wait,
            drain=self._stop,
            label=name,
        )
        before = broker.metrics()
        # A resumed job's rows of earlier runs were counted by the process that wrote them.
        self._rows_counted = read_tally(job.ledger) or {}
        self._current = job
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._run_job(broker, options))
        watcher = loop.create_task(self._watch_removal(job, task, before_stat))
        try:
            try:
                summary = await task
            finally:
                # Before any filing: failed/ and a vanished job's dropping take the ledger
                # with them, and its rows since the last scrape would never be counted.
                self._count_rows(read_tally(job.ledger) or {})
        except asyncio.CancelledError:
            if watcher.done() and not watcher.cancelled() and watcher.result():
                self._vanished(job)
                return
            current = asyncio.current_task()
            if self._stop.is_set() and (current is None or not current.cancelling()):
                logger.info("broker.job_stopped", job=name, note="resumes at the next start")
                return
            raise
        except JobLockedError as exc:
            logger.warning("broker.job_skipped", job=name, reason=str(exc))
            return
        except JobChangedError as exc:
            used = self._used(spent, before, broker)
            if not self._fail_changed(job, before_stat, used):
                self._fail(job, exc, used)  # changed and changed back: still refused
            return
        except JobFileChangedError as exc:
            # Changed while no daemon ran it (a producer writing it in place): the same
            # advice as for a change while it runs, not broker run's --new-job or --refresh.
            message = _changed_message(f"{exc.change} since the job started")
            self._fail_message(job, message, ExitCode.DATA_ERROR)
            return
        except JobFileError as exc:
            self._fail(job, exc, self._used(spent, before, broker))
            return
        except NoUsableKeyError as exc:
            if stops_daemon(exc, broker.metrics().keys):
                raise  # the job stays claimed, for the next start (with the keys back)
            self._fail(job, exc, self._used(spent, before, broker))
            return
        except OSError as exc:
            if out_of_files(exc):
                raise  # the daemon's own shortage, not the job's: it stays claimed
            if not job.path.exists():
                self._vanished(job)
                return
            if is_about(exc, job.path):
                self._fail_unreadable(job, exc)
                return
            raise
        finally:
            watcher.cancel()
            self._current = None
        spent = (spent or _Spent()).plus(summary, before, broker.metrics())
        if summary.quota_wait_until is not None:
            self._defer(job, summary.quota_wait_until, summary.quota_wait_keys, spent, before_stat)
            return
        if summary.stopped_by_signal or summary.pending:
            if self._stop.is_set():
                logger.info(
                    "broker.job_stopped",
                    job=name,
                    pending=summary.pending,
                    note="resumes at the next start",
                )
            else:
                logger.error("broker.job_unfinished", job=name, pending=summary.pending)
            return
        if self._fail_changed(job, before_stat, spent.counts()):
            return
        self._finish(job, summary, spent)

    @staticmethod
    def _used(spent: _Spent | None, before: MetricsSnapshot, broker: Broker) -> dict[str, int]:
        """What a job's runs spent, its last stretch (since ``before``) ended by a failure."""
        return (spent or _Spent()).sent(before, broker.metrics()).counts()

    async def _run_job(self, broker: Broker, options: JobOptions) -> JobSummary:
        """Run a job; one stopped under other answer settings than the config's now (a
        resources or marketplace change between two starts) starts over under the new ones.

        ``broker run`` asks for ``--new-job`` or ``--refresh`` there; a daemon has neither,
        and filing the job in failed/ would throw away its rows and leave it undone.
        """
        try:
            return await run_job(self._config, options, broker=broker)
        except JobSettingsChangedError as exc:
            logger.warning(
                "broker.job_restarted",
                job=options.label,
                setting=exc.setting,
                was=exc.then,
                now=exc.now,
                note="started over under the config's settings now; its rows are fetched again",
            )
            # Its rows are all new now: none was counted by an earlier run.
            self._rows_counted = {}
            again = dataclasses.replace(options, new_job=True)
            return await run_job(self._config, again, broker=broker)

    def _fail_changed(
        self, job: SpoolJob, before: os.stat_result, spent: Mapping[str, int] | None = None
    ) -> bool:
        """File ``job`` in failed/ if it changed since ``before``, or drop it if it vanished
        or was replaced by another file; True if so.

        The spool's own advice: a job that changed was still being written, and is run
        again by moving it back into inbox/ (its ledger goes with the filing).
        """
        try:
            after = os.stat(job.path)
        except FileNotFoundError:
            self._vanished(job)
            return True
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
            # Another file renamed over the job, after the watcher's last look: the job's
            # rows are nobody's now, and the new file is claimed as a job of its own.
            self._vanished(job)
            return True
        if (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):
            return False
        message = _changed_message(
            f"changed while the job ran ({before.st_size} bytes when it started, "
            f"{after.st_size} now)"
        )
        self._fail_message(job, message, ExitCode.DATA_ERROR, spent)
        return True

    def _check_readable(self, job: SpoolJob) -> os.stat_result | None:
        """The job file's stat; None (the job filed or dropped) when it cannot be read."""
        try:
            with open(job.path, "rb"):
                pass
            return os.stat(job.path)
        except FileNotFoundError:
            self._vanished(job)
        except OSError as exc:
            if out_of_files(exc):
                raise  # the daemon's own shortage: the job stays claimed for the next start
            self._fail_unreadable(job, exc)
        return None

    def _defer(
        self,
        job: SpoolJob,
        until: str,
        keys: frozenset[str],
        spent: _Spent,
        ran: os.stat_result,
    ) -> None:
        """``no_wait``: the daily quota of ``keys`` (those the job's rows need) is spent;
        resume the job after the reset (``spent``: what its runs spent so far; ``ran``: the
        file it ran)."""
        try:
            when = datetime.fromisoformat(until.replace("Z", "+00:00"))
        except ValueError:
            when = self._clock.utcnow()
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        # Read once: the ledger does not change while the job waits, and /metrics shows it.
        rows = read_tally(job.ledger) or {}
        file_id = (ran.st_dev, ran.st_ino)
        self._deferred[job.name] = _Deferral(when, keys, spent=spent, rows=rows, file_id=file_id)
        logger.warning(
            "broker.job_deferred",
            job=job.name,
            until=until,
            keys=sorted(keys),
            note="the keys' daily quota is spent; the job stays in processing/ and resumes "
            "after the reset",
        )

    async def _watch_removal(
        self, job: SpoolJob, task: asyncio.Task[JobSummary], claimed: os.stat_result
    ) -> bool:
        """Cancel ``task`` once its job file leaves processing/ (deleted, moved away, or
        replaced by another file renamed over it): nobody wants its rows any more, so its
        quota is not spent on them. True then; a file put in its place is a job of its own,
        claimed afresh."""
        while not task.done():
            await self._clock.sleep(_REMOVAL_CHECK_S)
            if task.done():
                break
            try:
                now = job.path.stat()
            except FileNotFoundError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (claimed.st_dev, claimed.st_ino):
                task.cancel()
                return True
        return False

    def _vanished(self, job: SpoolJob) -> None:
        """The job file was deleted from processing/: drop its work files and go on."""
        for path in job.work_files():
            path.unlink(missing_ok=True)
        logger.warning(
            "broker.job_vanished",
            job=job.name,
            path=str(job.path),
            note="the job file was removed from processing/ (or replaced: a file put in its "
            "place is claimed as a job of its own); its work files are dropped",
        )

    # -- filing -------------------------------------------------------------------------------

    def _finish(self, job: SpoolJob, summary: JobSummary, spent: _Spent) -> None:
        rows = {status: summary.by_status.get(status, 0) for status in _STATUSES}
        rows.update(summary.by_status)
        status: dict[str, object] = {
            "job": job.name,
            "outcome": "done",
            "exit_code": summary.exit_code(),
            "rows": {"total": summary.total, **rows},
            # This daemon's runs of the job (several when it was deferred for the quota)...
            **spent.counts(),
            "from_cache": spent.cached,
            "wall_s": round(spent.wall_s, 3),
            # ...and the rows done before the first of them (a stop, a crash):
            "resumed_rows": spent.resumed_rows or 0,
            "finished_at": self._now(),
            "error": None,
        }
        if not job.path.exists():
            self._vanished(job)
            return
        path = self.spool.file(job, "done", status)
        self._jobs_done += 1
        self._count_rows(summary.by_status)
        # Labelled by the filed name: two jobs called daily.txt are daily.txt and daily-2.txt.
        self._recent.appendleft(JobRows(path.name, dict(summary.by_status)))
        logger.info(
            "broker.job_filed",
            job=job.name,
            outcome="done",
            path=str(path),
            **{key: value for key, value in status.items() if key not in ("job", "outcome")},
        )

    def _fail(
        self, job: SpoolJob, exc: BaseException, spent: Mapping[str, int] | None = None
    ) -> None:
        code, message = describe_failure(exc, job=job.path, spooled=True)
        # The job is filed under failed/ by now: name it, not its place in processing/
        # (messages name the path as given, or made absolute).
        for place in (str(job.path.absolute()), str(job.path)):
            message = message.replace(place, job.name)
        self._fail_message(job, message, code, spent)

    def _fail_unreadable(self, job: SpoolJob, exc: OSError) -> None:
        reason = exc.strerror or str(exc)
        # Only a refusal is the file's permissions (a failing disk or mount is not).
        mend = "make it readable by the daemon and " if isinstance(exc, PermissionError) else ""
        message = (
            f"cannot read the job file {job.name!r}: {reason}; {mend}move it back into "
            "inbox/ once it reads"
        )
        self._fail_message(job, message, ExitCode.NO_INPUT)

    def _fail_message(
        self, job: SpoolJob, message: str, code: int, spent: Mapping[str, int] | None = None
    ) -> None:
        """File ``job`` under failed/ with ``message``; ``spent``: the requests, 429s and
        retries its runs made, when it ran."""
        if not job.path.exists():
            self._vanished(job)
            return
        status = self._failure_status(job.name, message, code)
        if spent is not None:
            status.update(spent)
        tally = read_tally(job.ledger) if job.ledger.exists() else None
        if tally is not None:
            # The rows it answered before it failed are in its output, filed with it: by
            # status as a done job's (every status named), and those left pending.
            rows = {key: tally.get(key, 0) for key in (*_STATUSES, "pending")}
            status["rows"] = {"total": sum(tally.values()), **rows}
        path = self.spool.file(job, "failed", status)
        if tally is not None:
            # The rows it left are "unfinished", not "pending": nothing waits for them (the
            # no-progress alert counts pending rows as work), yet they are rows of the job
            # (its progress was shown as 100 %).
            left = {"unfinished" if key == "pending" else key: n for key, n in tally.items()}
            # Named with its folder: failed/ and done/ each number their own names, so a
            # done daily.txt and a failed one would share a label (and only one show).
            self._recent.appendleft(JobRows(f"failed/{path.name}", left))
        self._count_failed(job.name, message, path, code)

    def _failure_status(
        self, name: str, message: str, code: int = ExitCode.DATA_ERROR
    ) -> dict[str, object]:
        return {
            "job": name,
            "outcome": "failed",
            "exit_code": code,
            "error": message,
            "finished_at": self._now(),
        }

    def _count_failed(self, name: str, message: str, path: Path, code: int) -> None:
        self._jobs_failed += 1
        logger.warning(
            "broker.job_filed",
            job=_shown(name),
            outcome="failed",
            exit_code=int(code),
            error=message,
            path=str(path),
        )

    def _now(self) -> str:
        return self._clock.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")

    # -- StatusSource -------------------------------------------------------------------------

    def engine_metrics(self) -> MetricsSnapshot | None:
        """The broker's counters, or None while it is not open."""
        return self._broker.metrics() if self._broker is not None else None

    async def cache_stats(self) -> CacheStats | None:
        """The item cache's figures (None while the broker is closed or the cache is off)."""
        if self._broker is None:
            return None
        try:
            return await self._broker.cache_stats()
        except BrokerClosedError:
            # Closing as the daemon stops, while /metrics still answers: no figures, not a
            # cache that failed.
            return None

    def _count_rows(self, tally: Mapping[str, int]) -> None:
        """Add the current job's rows not counted yet (``tally``: its rows by status)."""
        for status, n in tally.items():
            if status == "pending":
                continue
            new = n - self._rows_counted.get(status, 0)
            if new > 0:
                self._rows[status] += new
                self._rows_counted[status] = n

    def spool_snapshot(self) -> SpoolSnapshot:
        """The daemon's job counters: the current job's rows read live from its ledger,
        those of the jobs deferred for the daily quota, and those of recent ones."""
        jobs: list[JobRows] = []
        if self._current is not None:
            live = read_tally(self._current.ledger) or {}
            # Counted as they are written: a job dropped or stopped later keeps them counted.
            self._count_rows(live)
            # The name it will be filed under, so it never repeats a finished job's label.
            jobs.append(JobRows(self.spool.done_name(self._current), live))
        # Jobs waiting for their keys' daily quota are not finished either (the first few:
        # each is a label set of its own).
        for name, deferral in itertools.islice(self._deferred.items(), _RECENT_JOBS):
            if deferral.rows and (self.spool.processing / name).exists():
                jobs.append(JobRows(_free_name(self.spool.done, name), dict(deferral.rows)))
        jobs.extend(self._recent)
        try:
            inbox: int | None = self.spool.waiting_count()
            self._inbox_error = None
        except OSError as exc:
            # A scrape must still answer (a 500 fires AsinBrokerDown for a daemon busy with
            # its job): the count is left out, and why is told once.
            inbox = None
            self._inbox_unreadable(exc)
        # Only those still there: one deleted meanwhile is forgotten when it comes due.
        held = [d for name, d in self._deferred.items() if (self.spool.processing / name).exists()]
        return SpoolSnapshot(
            # Stopping from the first signal on: a load balancer must stop sending work
            # while the current job drains, not when the port closes.
            state="stopping" if self._stop.is_set() and self._state == "running" else self._state,
            jobs_done=self._jobs_done,
            jobs_failed=self._jobs_failed,
            # Counted now: the inbox is scanned only between jobs, which may take hours.
            inbox=inbox,
            deferred=len(held),
            deferred_keys=frozenset(key for deferral in held for key in deferral.keys),
            rows_by_status=dict(self._rows),
            jobs=tuple(jobs),
        )


def _changed_message(change: str) -> str:
    """A failed job's message for a job file that changed (``change`` says how and when)."""
    return (
        f"the job file {change}: still being written, or edited, so the rows run are not "
        "all the file's. Producers should write name.tmp and rename it into inbox/; move "
        "the job back into inbox/ to run it again"
    )


def _keys_in_use(metrics: MetricsSnapshot, names: frozenset[str]) -> bool:
    """True when one of the keys ``names`` is in the broker and not taken out (so whether
    the keys still wait for their quota can be asked of them)."""
    return any(key.name in names and key.state != "disabled" for key in metrics.keys)


def stops_daemon(exc: NoUsableKeyError, keys: Sequence[KeySnapshot]) -> bool:
    """Whether a job's ``NoUsableKeyError`` stops the daemon, or only files the job.

    It stops when an outage had a part in it (it ends by itself, and the job resumes at the
    next start with the key back) or when every key was rejected (no job can run). A
    marketplace no key serves otherwise (none has a tag for it, or Amazon rejected the
    tags) is that job's problem: it is filed under failed/, and the daemon goes on with the
    jobs its keys can serve instead of stopping on it at every start.
    """
    if outage_had_part(exc):
        return True
    return all(key.state == "disabled" for key in keys)


def serve_command(
    config: BrokerConfig,
    args: argparse.Namespace,
    *,
    run: Callable[[Coroutine[Any, Any, object]], int],
) -> int:
    """Run ``broker serve`` with parsed ``args`` (spool, host, port, allow_remote).

    The options of every job (``convert_isbn13``, ``no_wait``) and ``settle_s`` come from
    the config's ``[serve]`` table.

    Args:
        config: the loaded configuration.
        args: the parsed command line.
        run: runs a coroutine to completion on an event loop (the CLI's loop policy).

    Returns:
        The process exit code: 0 after a stop by signal, else the code of the failure.
    """
    options = ServeOptions(
        spool=Path(args.spool),
        host=str(args.host),
        port=int(args.port),
        allow_remote=bool(args.allow_remote),
        settle_s=config.serve.settle_s,
        convert_isbn13=config.serve.convert_isbn13,
        no_wait=config.serve.no_wait,
    )
    raise_open_files_limit()
    try:
        daemon = Daemon(config, options)
        run(daemon.run())
    except Exception as exc:
        code: int
        if isinstance(exc, ConfigError):
            code, message = ExitCode.CONFIG, str(exc)
        else:
            code, message = describe_failure(exc)
        bug = unexpected(exc)
        if logs_are_json() or bug:
            # A log shipper (journald's, a container's) parses every line: the last words
            # are an event too. A bug's carries its traceback, in either format.
            logger.error(
                "broker.daemon_failed", exit_code=code, error=message, exc_info=exc if bug else None
            )
        if not logs_are_json():
            print(f"{prog()} serve: {message}", file=sys.stderr)
        return code
    return ExitCode.OK
