"""One job end to end: job file -> ledger -> broker -> ledger -> output, resumable after any crash.

The ledger (SQLite, WAL) is the source of truth: input rows are ingested into it, results
are committed to it, and the output file is written from it, recording how far the output
is known good. A rerun of the same job truncates any torn output tail, re-emits what is
missing and fetches only lookups that have no result yet.

SIGINT/SIGTERM/SIGHUP (the policy of :mod:`broker.jobs.signals`): the first admits no new lookup and
lets those admitted finish (for at most ``drain_grace_s``), a second stops at once whatever the
gap; the run exits 75 if rows remain, else as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeGuard, TypeVar

from broker.api.marketplaces import NAMING
from broker.api.marketplaces import marketplace as lookup_marketplace
from broker.api.resources import resolve_resources
from broker.cache import RUN_MAX_AGE_S, cache_policy
from broker.client import Broker
from broker.engine.adaptive import ThrottleVerdict
from broker.engine.keys import OUTAGE_CODES, KeyHealth, markets_out_reason
from broker.engine.metrics import QUOTA_WAIT, KeySnapshot, MetricsSnapshot
from broker.errors import (
    BrokerError,
    ConfigError,
    JobFileError,
    NoUsableKeyError,
    Scope,
    StateUnavailableError,
    describe,
    os_error_text,
)
from broker.exitcode import ExitCode
from broker.jobs.ledger import (
    Counts,
    DoneRow,
    JobMismatchError,
    Ledger,
    Lookup,
    OtherJobsOutputError,
    SinkState,
    check_not_other_jobs,
    crash_point,
)
from broker.jobs.lock import JobLock
from broker.jobs.paths import (
    StdinUnreadable,
    ledger_path,
    name_too_long_hint,
    ordering_path,
    refresh_path,
    report_path,
    stdin_copies,
)
from broker.jobs.signals import StopSignals, installed, sigint_echo_window
from broker.jobs.sinks import SINK_FORMATS, InvalidReport, ResultSink, create_like, open_sink
from broker.jobs.sources import (
    JobFingerprint,
    JobRow,
    check_encoding,
    check_unchanged,
    fingerprint,
    read_job,
)
from broker.logs import end_live_line, get_logger, scrub, show_live_line
from broker.models import ItemResult, Protocol, Query
from broker.sqlitewal import journal_files, rollback_journal, self_contained
from broker.stdio import as_shown
from broker.termwidth import fit
from broker.wholefile import held_attributes, keep_attributes

if TYPE_CHECKING:
    from broker.config import BrokerConfig

__all__ = [
    "QUOTA_POLL_S",
    "ExitCode",
    "JobOptions",
    "JobSummary",
    "StrictInputError",
    "each_marketplace",
    "finish_promotion",
    "keys_serving",
    "out_of_files",
    "outage_had_part",
    "quota_spent",
    "quota_wait",
    "run_job",
]

logger = get_logger("broker")

#: How many results are committed to the ledger in one transaction, at most.
_COMMIT_ROWS = 500
#: How long results may wait before they are committed and emitted.
_COMMIT_EVERY_S = 1.0


class StrictInputError(JobFileError):
    """``--strict``: the job file has invalid rows, so nothing was sent."""


#: How long answers already on their way are waited for after a first stop signal.
DRAIN_GRACE_S: Final = 20.0


@dataclass(frozen=True, slots=True)
class JobOptions:
    """How to run one job."""

    job: Path
    out: Path
    format: str = "jsonl"
    strict: bool = False
    new_job: bool = False
    encoding: str = "utf-8"
    convert_isbn13: bool = False
    progress: str = "auto"
    progress_every_s: float = 30.0
    handle_signals: bool = True
    #: After a first SIGINT/SIGTERM/SIGHUP, how long lookups already admitted may take to finish
    #: before the run stops anyway; under the 30 s Kubernetes waits before SIGKILL.
    drain_grace_s: float = DRAIN_GRACE_S
    #: How log events name the job (``broker serve``: its spool name); None: the job
    #: file's path as given.
    label: str | None = None
    #: Set by a caller that handles the signals itself (``broker serve``) to drain the run
    #: as a first signal does.
    drain: asyncio.Event | None = field(default=None, compare=False)
    #: Stop (exit 75, resumable) instead of waiting when every usable key's daily quota
    #: is spent; for cron-style runs that should not sit idle until the window resets.
    no_wait: bool = False
    #: Fetch the job again on the same input, beside the finished one; its output and ledger
    #: replace the old ones only when the new run completes.
    refresh: bool = False
    #: Once the job is complete, rewrite the output with its rows in input order.
    ordered: bool = False
    #: Seconds until the first periodic progress event when not on a terminal.
    first_progress_s: float = 2.0
    #: Refuse to resume a job whose file was read with other reading options
    #: (``encoding``, ``convert_isbn13``): run again with others from the command line, a
    #: finished job would say "complete" for a reading it never had. The daemon's jobs go
    #: on as they were read when its settings change (they cannot be read again there).
    pin_reading: bool = True
    #: The item cache's max age for this run (``--max-age``; 0: ``--no-cache``); None: the
    #: config's, else 86,400.
    cache_max_age_s: float | None = None
    #: Read nothing from the item cache, write every answer to it (``refresh`` sets it for
    #: its run: fetched again means from Amazon, and later lookups get the new answers).
    cache_refresh: bool = False
    #: The output whose mode and group a new output takes (a refresh's: the output it is
    #: to replace); None: ``out`` itself, when another format's output is replaced.
    attributes_from: Path | None = None


@dataclass(slots=True)
class JobSummary:
    """What a run did; printed at the end and returned to callers."""

    total: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    pending: int = 0
    requests: int = 0
    throttled: int = 0
    retries: int = 0
    #: lookups the item cache answered (no request sent for them)
    cached: int = 0
    wall_s: float = 0.0
    #: rows earlier runs of the job had done when this one started (after a stop or a
    #: crash); ``requests`` and the other counts above are this run's alone
    resumed_rows: int = 0
    out: str = ""
    invalid_report: str | None = None
    #: a signal ended the run before the job was done (rows remain for a rerun)
    stopped_by_signal: bool = False
    #: a signal stopped ``--ordered`` putting the output of a done job in input order
    ordering_stopped: bool = False
    #: the failed rows by (error code, marketplace, rows), most first
    failed_causes: tuple[tuple[str, str, int], ...] = ()
    #: the job file was read to its end (False: stopped while reading it; ``total`` counts
    #: the rows read so far)
    read_complete: bool = True
    #: ``no_wait``: the run stopped because every usable key's daily quota was spent;
    #: when the earliest one resets (ISO UTC)
    quota_wait_until: str | None = None
    #: ``no_wait``: the keys the rows left needed, all waiting then (whether they still do
    #: is what says the job may go on, not a clock that may not be the store's)
    quota_wait_keys: frozenset[str] = frozenset()
    error: str | None = None
    #: the job was already complete before this run: what to tell the user (nothing fetched)
    already_complete: str | None = None
    #: ``refresh``: the new run did not complete, so the previous output stays in place
    refresh_pending: bool = False
    #: keys out of rotation when the run ended ("name: why", or "name in marketplace:
    #: code" for a rejected tag): the other keys may have done every row, so the exit code
    #: does not tell
    keys_out: tuple[str, ...] = ()

    def exit_code(self) -> int:
        """The exit code this outcome maps to."""
        if self.stopped_by_signal or self.pending:
            return ExitCode.RESUMABLE
        if self.by_status.get("failed"):
            return ExitCode.SOME_FAILED
        return ExitCode.OK


async def run_job(
    config: BrokerConfig, options: JobOptions, *, broker: Broker | None = None
) -> JobSummary:
    """Run a job to the end (or to a signal) and return its summary.

    A job that is already complete is not fetched again: the summary's ``already_complete``
    says so, and when its rows were fetched; ``options.refresh`` fetches it again.

    Raises:
        FileNotFoundError: the job file is missing (nothing is created, not even a lock).
        JobFileError: the input is unreadable, changed since the job started, or has
            invalid rows under ``strict``; or another process holds the job.
        NoUsableKeyError: every key is out of rotation (rows stay pending for a rerun).
        OSError: the output or ledger cannot be written.
    """
    # In a thread: the hash reads the whole file (and unpacks a gzip one).
    job_print = await _in_thread(lambda: fingerprint(options.job))
    finish_promotion(options.out)
    if not options.refresh:
        return await _run_once(config, options, broker, job_print)
    side = refresh_path(options.out)
    # The job's own lock too: no plain run may use the old ledger while it is replaced.
    with JobLock(ledger_path(options.out)):
        if not options.new_job:
            check_not_other_jobs(ledger_path(options.out), job_print, own=stdin_copies(options.out))
        side_options = dataclasses.replace(
            options, out=side, refresh=False, cache_refresh=True, attributes_from=options.out
        )
        try:
            summary = await _run_once(config, side_options, broker, job_print)
        except OtherJobsOutputError:
            # Another job file's refresh, stopped before it completed: not this job's to
            # start over (only --new-job replaces another job's output).
            raise
        except JobMismatchError as exc:
            # --refresh starts the job over on the file (and settings) as they are now: a
            # refresh stopped before they changed starts again instead of refusing, and
            # the previous complete output stays in place until the new one completes.
            logger.warning("broker.refresh_restarted", reason=str(exc))
            side_options = dataclasses.replace(side_options, new_job=True)
            summary = await _run_once(config, side_options, broker, job_print)
        return _after_refresh(summary, side, options.out)


def _after_refresh(summary: JobSummary, side: Path, out: Path) -> JobSummary:
    """Promote a completed refresh; leave the previous output in place otherwise."""
    summary.already_complete = None
    summary.out = str(out)
    if summary.pending or summary.stopped_by_signal:
        summary.refresh_pending = True
        return summary
    _promote(side, out)
    if summary.invalid_report:
        summary.invalid_report = str(report_path(out))
    return summary


def _promote(side: Path, out: Path) -> None:
    """Make a completed refresh the job's output and ledger; resumable after a crash.

    A marker file is written first, so a crash half-way through is finished by the next run
    (:func:`finish_promotion`) instead of leaving a new output with the old ledger.
    """
    for path in (side, ledger_path(side)):
        # Closed, each file alone holds its database (see Ledger.close): one whose -wal still
        # holds pages would be moved without them, damaged.
        if not self_contained(path):
            raise OSError(
                errno.EBUSY,
                f"{path}: part of it is still in its -wal (another program has it open), so "
                "the refresh was not put in place and the previous output stays: close that "
                "program and run the same command again (--refresh resumes)",
                str(path),
            )
    marker = side.with_name(side.name + ".promote")
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    finish_promotion(out, locked=True)


@dataclass(slots=True)
class _Refusal:
    """Set when this run's ingestion refused the job file before storing any row."""

    nothing_read: bool = False


@contextlib.contextmanager
def _forget_refused(ledger_file: Path) -> Iterator[_Refusal]:
    """Delete the ledger this run created if the job file is refused before its first row.

    Nothing was stored or fetched for it, and a ledger left behind would hold the refused
    file's fingerprint: the fixed file would then be refused as "changed since the job
    started". Entered inside the job's lock and around the open ledger, so the files go
    once the ledger is closed and before the lock is released; the lock file itself stays
    (see :mod:`broker.jobs.lock`: unlinking it would let two processes hold the lock).
    """
    fresh = not ledger_file.exists()
    refusal = _Refusal()
    try:
        yield refusal
    except JobFileError:
        if fresh and refusal.nothing_read:
            for path in (ledger_file, *journal_files(ledger_file)):
                path.unlink(missing_ok=True)
        raise


def finish_promotion(out: Path, *, locked: bool = False) -> None:
    """Complete a promotion that a crash interrupted (a no-op when none is under way).

    Under the job's lock (``locked``: the caller holds it): a promotion another process is
    making is its own to finish, and this run is refused as for any job in use.

    Raises:
        JobLockedError: another process holds the job.
    """
    side = refresh_path(out)
    marker = side.with_name(side.name + ".promote")
    if not marker.exists():
        return
    if not locked:
        with JobLock(ledger_path(out)):
            finish_promotion(out, locked=True)
        return
    ledger = ledger_path(out)
    # The report is derived from the ledger and rewritten at the end of every run, so a crash
    # that leaves it out of step only lasts until the next run ends.
    if report_path(side).exists():
        os.replace(report_path(side), report_path(out))
    else:
        report_path(out).unlink(missing_ok=True)
    if side.exists():
        # A journal left by the old output (a SQLite output killed mid-run, in WAL mode or,
        # closed, in rollback-journal mode) must not be replayed into the new one: SQLite
        # would lay the old run's pages over it.
        for path in (*journal_files(out), rollback_journal(out)):
            path.unlink(missing_ok=True)
        keep_attributes(side, out)
        os.replace(side, out)
    _promote_stdin_copy(side, out)
    if ledger_path(side).exists():
        # A journal left by the old ledger must not be replayed into the new one.
        for path in journal_files(ledger):
            path.unlink(missing_ok=True)
        os.replace(ledger_path(side), ledger)
    # The moved files' emptied logs (_promote saw them hold nothing): a next refresh's new
    # files must not be read with them.
    for path in (*journal_files(side), *journal_files(ledger_path(side))):
        path.unlink(missing_ok=True)
    # Nobody holds the refresh's lock now (the main job's lock is held by this run).
    ledger_path(side).with_name(ledger_path(side).name + ".lock").unlink(missing_ok=True)
    marker.unlink()


def _promote_stdin_copy(side: Path, out: Path) -> None:
    """Make the input a refresh of a ``-`` job read (other bytes on stdin) the job's saved
    input; the copies of the input it replaces, under any ``--input``, go."""
    for copy, target in zip(stdin_copies(side), stdin_copies(out), strict=True):
        if copy.exists():
            for old in stdin_copies(out):
                if old != target:
                    old.unlink(missing_ok=True)
            os.replace(copy, target)


def _complete_message(
    ledger: Ledger,
    options: JobOptions,
    counts: Counts,
    causes: Sequence[tuple[str, str, int]],
    *,
    cache_on: bool,
    tagged: Collection[str],
) -> str:
    """What a rerun of a finished job tells the user: complete, when, how to fetch again
    (``causes``: the failed rows by code and marketplace, as the summary has them;
    ``cache_on``: this run reads the item cache; ``tagged``: the marketplaces a key of this
    run's config has a partner tag for)."""
    total = counts.total
    fetched = ledger.fetched_range()
    when = ""
    if fetched is not None:
        first, last = (moment[:16].replace("T", " ") + " UTC" for moment in fetched)
        when = f", fetched {first}" if first == last else f", fetched {first} to {last}"
    refreshing = ""
    if ledger_path(refresh_path(options.out)).exists():
        refreshing = " A --refresh run was stopped before it completed; --refresh resumes it."
    failed = counts.by_status.get("failed", 0)
    unsent = sorted({market for code, market, _ in causes if code == "NoKeyForMarketplace"})
    # Judged by this run's config: the tag the first run asked for may be there now.
    untagged = [market for market in unsent if market not in tagged]
    now_tagged = [market for market in unsent if market in tagged]
    notes = []
    if untagged:
        notes.append(
            f"add a partner tag for {', '.join(untagged)} to a key (no key has one, so those "
            "rows were never sent)"
        )
    if now_tagged:
        notes.append(
            f"a key now has a partner tag for {', '.join(now_tagged)} (those rows were never sent)"
        )
    first = "; ".join(notes) + (", then " if untagged else ": ") if notes else ""
    if unsent or not cache_on:
        # A tag added starts the item cache afresh: the keys' tags are in its namespace.
        again = "--new-job fetches every row again"
    else:
        again = (
            "--new-job fetches the job again, the item cache answering every row it holds an "
            "ok answer for (within its max age): the failed and not-found rows go to Amazon"
        )
    retry = (
        f" {failed} {'row' if failed == 1 else 'rows'} failed: {first}{again}." if failed else ""
    )
    return (
        f"{options.job}: this job is already complete ({total} {'row' if total == 1 else 'rows'}"
        f"{when}); nothing was fetched. Output: {options.out}.{retry} To fetch every row "
        "again, run the same command with --refresh (the output is replaced when the new "
        f"run completes).{refreshing}"
    )


async def _run_once(
    config: BrokerConfig,
    options: JobOptions,
    broker: Broker | None,
    job_print: JobFingerprint,
) -> JobSummary:
    started = time.monotonic()
    ledger_file = ledger_path(options.out)
    checked = options.strict and (options.new_job or not ledger_file.exists())
    if checked:
        # A new job refused for its invalid rows leaves nothing behind (no ledger, no lock),
        # and a --new-job refused so leaves the old job as it was.
        _refuse_invalid(options, config.api.protocol)
    _make_output_directory(options.out.parent)
    summary = JobSummary(out=str(options.out))
    stop = _Stop(options.drain_grace_s)
    with (
        _signals(stop, enabled=options.handle_signals, drain=options.drain),
        JobLock(ledger_file),
        _forget_refused(ledger_file) as refusal,
        Ledger.open(
            ledger_file,
            fingerprint=job_print,
            default_marketplace=config.api.marketplace,
            answer_settings=_answer_settings(config, options),
            new_job=options.new_job,
        ) as ledger,
    ):
        # A --ordered export cut short (kill -9) left its partial copy; the job lock says
        # no other run is writing it.
        ordering_path(options.out).unlink(missing_ok=True)
        at_start = ledger.counts()
        # Rows earlier runs did (rows found invalid while this run reads the job are not).
        summary.resumed_rows = at_start.done
        resumed_complete = ledger.ingest_complete and at_start.pending == 0
        if not ledger.ingest_complete:
            if options.strict and not checked:
                _refuse_invalid(options, config.api.protocol, ledger.stored_through_line)
            ingest_started = time.monotonic()
            try:
                ingested, read_all = await _ingest(ledger, options, stop, job_print)
            except JobFileError:
                # A file refused before its first row (no asin column, not text) leaves
                # nothing; one damaged later keeps the rows read (C11: a truncated .gz).
                refusal.nothing_read = ledger.total_rows == 0
                raise
            ingest_s = time.monotonic() - ingest_started
            if read_all:
                logger.info(
                    "broker.job_ingested",
                    job=_label(options),
                    rows=ingested,
                    seconds=round(ingest_s, 3),
                    rows_per_s=round(ingested / ingest_s) if ingest_s > 0 else None,
                )
            else:
                # Stopped while reading: the rows read so far are not the job's, and nothing
                # is fetched before it is all read, so the job does not start either.
                logger.info(
                    "broker.job_ingest_stopped",
                    job=_label(options),
                    rows=ingested,
                    seconds=round(ingest_s, 3),
                    note="the job file was not read to its end; the next run reads on",
                )
        counts = ledger.counts()
        summary.read_complete = ledger.ingest_complete
        if counts.total == 0 and ledger.ingest_complete:
            logger.warning("broker.job_empty", job=_label(options), note="the job file has no rows")
        if ledger.ingest_complete:
            logger.info(
                "broker.job_started",
                job=_label(options),
                out=str(options.out),
                rows=counts.total,
                done=counts.done,
                pending=counts.pending,
            )
        name = _sink_name(options.format)
        columns: tuple[str, ...] | None = None
        if options.format != "csv" or ledger.ingest_complete:
            columns = await _output(ledger, options, name, summary, broker, config, stop)
        # else stopped while reading the job: nothing is fetched before it is all read, and
        # a CSV header written now would lack for good the pass-through names of the rows
        # not read yet (a resumed output reads its columns back from its header); the
        # invalid rows found so far are written with the rest.

        # The ordering and the report read every row (a minute for a million, ordering), in
        # threads: the loop goes on handling signals. A signal stops the ordering: the output
        # keeps its rows in the order they were done, and a rerun orders it.
        ordering_stopped = False
        if (
            options.ordered
            and ledger.ingest_complete
            and not ledger.pending_lookup_count()
            and not ledger.is_ordered(name)
        ):
            # Only a signal from now on stops it: one that drained the fetch (every row done
            # since) asked for the run to end as it would, ordered.
            signals, halt = stop.signals, threading.Event()
            export = functools.partial(
                _export_ordered,
                ledger,
                options,
                name,
                columns,
                stopped=lambda: halt.is_set() or stop.signals > signals,
            )
            stop.ordering = True
            try:
                ordering_stopped = not await _in_thread(export, on_cancel=halt.set)
            finally:
                stop.ordering = False
        report = report_path(options.out)
        invalid = await _in_thread(functools.partial(InvalidReport(report).write, ledger))
        summary.invalid_report = str(report) if invalid else None
        counts = ledger.counts()
        summary.total = counts.total
        summary.by_status = dict(counts.by_status)
        if counts.by_status.get("failed"):
            # In a thread: a table scan (a second for a million rows).
            summary.failed_causes = tuple(await _in_thread(ledger.failure_causes))
        summary.pending = counts.pending
        summary.quota_wait_until = stop.quota_until if counts.pending else None
        summary.quota_wait_keys = stop.quota_keys if counts.pending else frozenset()
        summary.ordering_stopped = ordering_stopped
        # A forced stop leaves rows done in the ledger but not in the output (their write
        # would have held the run past the signal): the rerun writes them.
        unwritten = counts.done - ledger.sink_state(name).done_order
        summary.stopped_by_signal = ordering_stopped or (
            stop.requested
            and summary.quota_wait_until is None
            and (counts.pending > 0 or not ledger.ingest_complete or unwritten > 0)
        )
        if resumed_complete and not ordering_stopped:
            # In a thread: it reads every result's time (seconds for a million).
            summary.already_complete = await _in_thread(
                functools.partial(
                    _complete_message,
                    ledger,
                    options,
                    counts,
                    summary.failed_causes,
                    cache_on=_cache_on(config, options),
                    tagged=config.tagged_marketplaces,
                )
            )
    summary.wall_s = time.monotonic() - started
    return summary


def _cache_on(config: BrokerConfig, options: JobOptions) -> bool:
    """Whether the run has an item cache (``[cache]``, not ``--no-cache``)."""
    return cache_policy(
        config.cache, default_max_age_s=RUN_MAX_AGE_S, max_age_s=options.cache_max_age_s
    ).enabled


async def _output(
    ledger: Ledger,
    options: JobOptions,
    name: str,
    summary: JobSummary,
    broker: Broker | None,
    config: BrokerConfig,
    stop: _Stop,
) -> tuple[str, ...] | None:
    """Write the rows done so far to output ``name``, then fetch the pending ones, writing
    each as it ends; return a CSV output's pass-through names (None for other formats)."""
    earlier = _forget_other_formats(ledger, name)
    # The replaced output's mode and group go to the new file (a refresh's, or the one
    # another format's output replaces), from its first byte.
    source = options.attributes_from or (options.out if earlier else None)
    held = held_attributes(source) if source is not None else None
    if earlier and options.out.exists():
        # The job's own output in another format (its ledger says so): replaced, in every
        # format alike and said so; a SQLite sink refused it as "not a SQLite database,
        # choose another output path", while JSON lines and CSV overwrote it silently.
        logger.warning(
            "broker.output_format_changed",
            path=str(options.out),
            before=earlier[0],
            now=options.format,
            note="the output is written again in full in the new format",
        )
        options.out.unlink()
    if name in ledger.outputs_reset and options.out.exists():
        logger.warning(
            "broker.output_rewritten",
            path=str(options.out),
            note="begun by an older broker that wrote its cells otherwise (formula-like "
            "cells without a leading '); written again in full under this version's",
        )
    state = ledger.sink_state(name)
    # A CSV output started afresh names every row's pass-through columns in its header,
    # whichever row comes first (a resumed one reads them back from its header). Read
    # for a resumed job too: an output deleted or cut by hand is written again from the
    # ledger, and its first rows may lack a name later rows have.
    # In a thread: a scan of every row (seconds for a million with a few columns).
    columns = await _in_thread(ledger.extra_names) if options.format == "csv" else None
    sink = open_sink(options.format, options.out, extra=columns or ())
    create_like(options.out, held)
    # The sink may cut itself back further than recorded (a hand-truncated file). In a
    # thread: a SQLite output counts its rows as it opens (seconds for a million).
    try:
        last = ledger.last_output_row(name)
        opened = await _in_thread(functools.partial(sink.open, state, last))
    except asyncio.CancelledError:
        _close_after_error(sink)  # opened meanwhile: _in_thread waited for it
        raise
    ledger.set_sink_state(name, opened)
    # No second emit on the way out: _fetch commits and emits what finished, and after
    # a failed write the sink refuses more; the rows stay in the ledger for the rerun.
    try:
        await _emit_yielding(ledger, sink, name, stop)
        if ledger.pending_lookup_count() and not stop.requested:
            # The keys' daily counts, rates and pauses live in the shared key state
            # ([state]; by default a file every broker process of this machine shares),
            # so two jobs on one key count each other's requests.
            # A refresh writes the new answers to the cache, when there is one to write to
            # (--refresh --no-cache only runs the job again).
            cache_on = _cache_on(config, options)
            own = broker or Broker(
                config,
                cache_default_max_age_s=RUN_MAX_AGE_S,
                cache_max_age_s=options.cache_max_age_s,
                cache_refresh=options.cache_refresh and cache_on,
            )
            async with own if broker is None else contextlib.nullcontext(own):
                # A shared broker (the daemon's) counts every job; report this one's.
                before = own.metrics()
                summary.cached = await _fetch(
                    ledger, _Output(sink, name), own, options, stop, config
                )
                after = own.metrics()
                summary.keys_out = _keys_out(after)
                summary.requests = after.requests - before.requests
                summary.throttled = after.throttled - before.throttled
                summary.retries = after.retries - before.retries
    except BaseException:
        _close_after_error(sink)
        raise
    # A SQLite output whose rows a full disk kept in its -wal fails the run here (exit 74).
    sink.close()
    return columns


def _close_after_error(sink: ResultSink) -> None:
    """Close ``sink`` while an error ends the run: that error is the one to tell, and rows a
    full disk kept in a SQLite output's -wal stay there, whole with it, for the rerun."""
    with contextlib.suppress(OSError):
        sink.close()


def _keys_out(metrics: MetricsSnapshot) -> tuple[str, ...]:
    """The keys out of rotation, and the marketplaces keys are out of, with why."""
    out: list[str] = []
    for key in metrics.keys:
        # Out of every marketplace it has a tag for, a key is disabled too, its reason
        # those same marketplaces: each is told once.
        by_markets = bool(key.markets_out) and key.reason == markets_out_reason(key.markets_out)
        if key.state == KeyHealth.DISABLED.value and not by_markets:
            out.append(f"{key.name}: {key.reason or 'out of rotation'}")
        out.extend(f"{key.name} in {market}: {code}" for market, code in key.markets_out)
    return tuple(out)


def _answer_settings(config: BrokerConfig, options: JobOptions) -> dict[str, str]:
    """The settings a job's rows depend on, as its ledger pins them.

    A resume under another protocol or resource list would mix two kinds of item in one
    output; one under another ``--encoding`` or ``--convert-isbn13`` would mix rows read two
    ways, and a finished job run again with them would say "complete" for a file never read
    so. Resources are compared as a set in the protocol's spelling, and encodings as the
    reader takes them (``UTF8`` and ``utf-8-sig`` are ``utf-8``), so reordering or
    respelling either is not a change.
    """
    protocol = config.api.protocol
    resources = sorted(resolve_resources(config.api.resources, protocol))
    settings = {"api.protocol": protocol.value, "api.resources": ",".join(resources)}
    if options.pin_reading:
        settings["--encoding"] = check_encoding(options.encoding)
        settings["--convert-isbn13"] = "on" if options.convert_isbn13 else "off"
    return settings


def _make_output_directory(directory: Path) -> None:
    """Create the output's directory; a file in its way is named as such ("File exists:
    '/etc/passwd'" for ``--out /etc/passwd/x.jsonl`` told nothing)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        blocker = next((p for p in (directory, *directory.parents) if p.exists()), directory)
        raise OSError(
            f"cannot create the output's directory {directory}: {blocker} is a file, not a "
            "directory; give --out (or [output] directory) a path in a directory"
        ) from exc


def _export_ordered(
    ledger: Ledger,
    options: JobOptions,
    name: str,
    columns: tuple[str, ...] | None,
    *,
    stopped: Callable[[], bool] = lambda: False,
) -> bool:
    """Rewrite the complete output with its rows in input order (``--ordered``); False if
    ``stopped()`` turned true first (a signal: the output stays as it was).

    Rows are read from the ledger a page at a time, so memory stays bounded; the new file
    replaces the old one atomically. It holds the same rows, so the recorded progress (the
    byte size and the row count) stays true and a rerun adds nothing; the ledger records
    that it is ordered, so a rerun of the complete job does not write it again.
    ``columns``: the job's pass-through names if this run already read them (a CSV output
    begun now).
    """
    if options.format == "sqlite":
        return True  # a table has no order of its own; the seq column gives input order
    if options.format == "csv" and columns is None:
        columns = ledger.extra_names()
    temporary = ordering_path(options.out)
    sink = open_sink(options.format, temporary, extra=columns or ())
    state: SinkState | None = None
    try:
        temporary.unlink(missing_ok=True)  # a killed export's: this one starts afresh
        create_like(temporary, held_attributes(options.out))
        sink.open(SinkState())
        chunk: list[DoneRow] = []
        for count, row in enumerate(ledger.done_rows_in_file_order(), 1):
            chunk.append(dataclasses.replace(row, done_order=count))
            if len(chunk) >= 1000:
                if stopped():
                    break
                sink.write(chunk)
                chunk.clear()
        else:
            sink.write(chunk)
            state = sink.flush()
    finally:
        sink.close()
        if state is None:
            # Stopped, or failed (a full disk): the partial copy, as large as the output,
            # must not keep the space the user frees to run again.
            temporary.unlink(missing_ok=True)
    if state is None:
        return False
    os.replace(temporary, options.out)
    ledger.set_sink_state(name, state, ordered=True)
    return True


def _read(options: JobOptions, stored_through_line: int = 0) -> Iterator[JobRow]:
    """The job file's rows, read as the options say (ingestion and --strict read alike);
    those up to ``stored_through_line`` (stored by an earlier run) read leniently."""
    return read_job(
        options.job,
        encoding=options.encoding,
        convert_isbn13=options.convert_isbn13,
        stored_through_line=stored_through_line,
    )


def _refuse_invalid(options: JobOptions, protocol: Protocol, stored_through_line: int = 0) -> None:
    # The whole file, the rows already stored too (a read stopped by Ctrl-C, resumed with
    # --strict): their lines decoded leniently, as ingestion reads them.
    bad = [
        row if row.error else dataclasses.replace(row, error=_row_problem(row, protocol))
        for row in _read(options, stored_through_line)
    ]
    bad = [row for row in bad if row.error]
    if bad:
        shown = "; ".join(f"line {row.line}: {row.error}" for row in bad[:5])
        which = f"the first 5: {shown}" if len(bad) > 5 else shown
        raise StrictInputError(f"{options.job}: {len(bad)} invalid rows; {which}")


def _row_problem(row: JobRow, protocol: Protocol) -> str | None:
    """What makes a readable row invalid all the same: its marketplace or its resources."""
    if row.marketplace:
        try:
            lookup_marketplace(row.marketplace)
        except ValueError:
            return f"unknown marketplace {row.marketplace!r}; {NAMING}"
    if row.resources is not None:
        try:
            resolve_resources(row.resources, protocol)
        except (TypeError, ValueError) as exc:
            return str(exc)
    return None


#: Job rows stored per ingestion transaction (and per check that the file is unchanged).
_INGEST_CHUNK = 5000


class _IngestStopped(Exception):
    """Raised inside the ingestion thread when a signal asks the run to stop."""


async def _ingest(
    ledger: Ledger, options: JobOptions, stop: _Stop, started: JobFingerprint
) -> tuple[int, bool]:
    """Ingest the job file in a worker thread, so a signal is handled while it runs.

    A signal (or a cancelled run) stops ingestion at the next row; the chunks stored so far
    are kept and the next run continues after them. A file that changes from ``started``
    while it is read stops it too (JobFileError), before a row read after the change is
    stored. Returns the rows stored, and whether the file was read to its end.
    """

    read = 0
    # A resumed read goes on after the rows stored (the ledger skips them by line too).
    stored_through_line = ledger.stored_through_line

    def rows() -> Iterator[JobRow]:
        nonlocal read
        for row in _read(options, stored_through_line):
            if stop.requested:
                raise _IngestStopped
            read += 1
            yield row

    ingest = functools.partial(
        ledger.ingest,
        rows(),
        chunk=_INGEST_CHUNK,
        unchanged=functools.partial(check_unchanged, started),
    )
    reporter = (
        None
        if options.progress == "none"
        else asyncio.ensure_future(_say_reading(options, lambda: read))
    )
    try:
        return await _in_thread(ingest, on_cancel=stop.ask), True
    except _IngestStopped:
        return ledger.total_rows, False
    finally:
        if reporter is not None:
            reporter.cancel()


async def _say_reading(options: JobOptions, read: Callable[[], int]) -> None:
    """While a big job file is read (nothing is sent before it all is: a million rows take
    about 15 s), say so as progress would, first after ``first_progress_s`` and then every
    ``progress_every_s``: a 2-million-row job was silent for 26 s, a hang to a watcher."""
    await asyncio.sleep(options.first_progress_s)
    while True:
        logger.info(
            "broker.job_reading",
            job=_label(options),
            rows_read=read(),
            note="the job file is read to its end before anything is sent",
        )
        await asyncio.sleep(options.progress_every_s)


_T = TypeVar("_T")


async def _in_thread(call: Callable[[], _T], *, on_cancel: Callable[[], None] | None = None) -> _T:
    """Run ``call`` in a worker thread, the event loop going on meanwhile (signals, a
    daemon's /healthz): for work over every row of a big job.

    Shielded: if the run is cancelled meanwhile, ``on_cancel`` asks the call to end early and
    the thread is waited for before the cancellation goes on, as the run then closes the
    ledger the call reads and releases the job's lock (a thread left running wrote on a
    closed ledger, or put a file back that the run's end had removed).
    """
    done = asyncio.get_running_loop().run_in_executor(None, call)
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        if on_cancel is not None:
            on_cancel()
        # Shielded again: a second cancellation (a daemon stopping) must not end the wait.
        while not done.done():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.shield(done)
        raise


def _sink_name(format: str) -> str:
    # Per format: offsets of a JSONL file mean nothing to the CSV writer of the same path.
    return f"out.{format}"


def _forget_other_formats(ledger: Ledger, name: str) -> list[str]:
    """Reset the recorded progress of the output's other formats, this one overwriting it;
    return the formats that had some (the output file is the job's own, in one of them)."""
    had = []
    for other in map(_sink_name, SINK_FORMATS):
        if other != name and ledger.sink_state(other) != SinkState():
            ledger.set_sink_state(other, SinkState())
            had.append(other.removeprefix("out."))
    return had


@dataclass(frozen=True, slots=True)
class _Output:
    """An open sink and the name its progress is recorded under in the ledger."""

    sink: ResultSink
    name: str


#: Rows handed to the output per write (and per recorded sink state).
_EMIT_ROWS: Final = 1000


def _emit(ledger: Ledger, sink: ResultSink, name: str, *, pages: int | None = None) -> bool:
    """Write the committed rows the output does not have yet, ``pages`` pages of
    ``_EMIT_ROWS`` at most (None: all), recording the new state after each; True while rows
    are left. Each page starts from the state recorded last, so emitters taking turns
    (:func:`_emit_yielding`) never write a row twice."""
    written = 0
    while pages is None or written < pages:
        state = ledger.sink_state(name)
        rows = ledger.done_rows_after(state.done_order, limit=_EMIT_ROWS)
        if not rows:
            return False
        sink.write(rows)
        state = sink.flush()
        crash_point("after_flush")
        ledger.set_sink_state(name, state)
        written += 1
    return True


async def _emit_yielding(ledger: Ledger, sink: ResultSink, name: str, stop: _Stop) -> None:
    """:func:`_emit` a page at a time, letting the event loop run between pages: half a
    million rows final at ingestion, or a commit that ends 25,000 rows of duplicates, held
    a daemon's /healthz and /metrics and a run's signals for seconds. A forced stop (a
    second signal, the drain's time up) ends it between pages: the rows not written stay
    in the ledger, and the rerun writes them."""
    # A turn for the loop between pages: there is no event to wait on.
    while not stop.forced and _emit(ledger, sink, name, pages=1):  # noqa: ASYNC110
        await asyncio.sleep(0)


async def _fetch(
    ledger: Ledger,
    output: _Output,
    broker: Broker,
    options: JobOptions,
    stop: _Stop,
    config: BrokerConfig,
) -> int:
    """Stream pending lookups through the broker; commit and emit as results arrive.

    A signal winds the stream down (``stop.draining``): nothing more is admitted, lookups
    not sent yet stay pending, and it returns once the requests already sent are answered
    and written, or when :class:`_Stop` cancels it (then those stay pending too).

    Returns:
        How many lookups the item cache answered.
    """

    buffer: list[tuple[Lookup, ItemResult]] = []
    cached = answered = 0
    # Marketplaces whose every key was rejected, as their streams end (see each_marketplace).
    refused: list[NoUsableKeyError] = []

    def queries(marketplace: str | None) -> Iterator[Query]:
        for lookup in ledger.pending_lookups(marketplace):
            if stop.requested:
                return
            # The ledger's lookup rides along as the query's tag and comes back with its
            # result: no matching by (marketplace, ASIN) that could swap rows (K9).
            yield Query(lookup.asin, lookup.marketplace, lookup.resources, tag=lookup)

    last_commit = time.monotonic()
    # When rows were last committed, on the broker's clock (the progress's rows/s).
    committed_at = broker.clock.monotonic()
    # The lookups left per marketplace: no_wait and the progress tell from them which keys
    # the rest of the job needs.
    # In a thread: a scan of every lookup (a second for 3 million) would stall the loop,
    # and with it a daemon's /healthz and /metrics and its signals.
    left = await _in_thread(ledger.pending_by_marketplace)
    needed = functools.partial(_keys_for_markets, broker, left)
    progress = _Progress(
        ledger,
        broker,
        options,
        needed=needed,
        left=left,
        batch_size=config.engine.batch_size,
        committed_at=lambda: committed_at,
    )

    def record() -> bool:
        """Commit the buffered results to the ledger; True if there were any."""
        nonlocal last_commit, committed_at
        last_commit = time.monotonic()
        if not buffer:
            return False
        ledger.record_results(buffer)
        committed_at = broker.clock.monotonic()
        buffer.clear()
        crash_point("after_commit")
        return True

    async def commit() -> None:
        if record():
            # A turn for the loop between the commit and the first page written: the two
            # in one step held it 0.1-0.25 s in big jobs (a daemon's /healthz, signals).
            await asyncio.sleep(0)
            await _emit_yielding(ledger, output.sink, output.name, stop)

    async def consume(marketplace: str | None) -> None:
        nonlocal cached, answered
        async for result in broker.stream(queries(marketplace), stop=stop.draining):
            cached += result.cached
            answered += 1
            assert result.query is not None
            lookup = result.query.tag
            assert isinstance(lookup, Lookup)
            buffer.append((lookup, result))
            # Counted down at the answer, not at its commit: the progress weighs the lookups
            # left against the keys' quota, which counted their requests when booked.
            if lookup.marketplace in left:
                left[lookup.marketplace] -= 1
            if len(buffer) >= _COMMIT_ROWS or time.monotonic() - last_commit >= _COMMIT_EVERY_S:
                await commit()
                progress.tick()

    async def commit_when_idle() -> None:
        # Answers followed by a wait (a daily quota, a pause, an outage) are committed on
        # time anyway: a kill -9 during the wait must not lose answers already paid for.
        while True:
            await asyncio.sleep(_COMMIT_EVERY_S)
            if buffer and time.monotonic() - last_commit >= _COMMIT_EVERY_S:
                try:
                    await commit()
                except Exception as exc:  # a full disk, a failing sink: the run must end
                    stop.fail(exc)
                    return
                progress.tick()

    async def consume_each() -> None:
        # A stream per marketplace: the broker admits a bounded number of lookups per
        # marketplace, so rows whose keys wait out a daily quota never hold up the rows
        # of another marketplace behind them in the file.
        await each_marketplace([consume(market) for market in list(left)], refused)

    loop = asyncio.get_running_loop()
    task = loop.create_task(consume(None) if len(left) <= 1 else consume_each())
    stop.watch(task)
    ticker = loop.create_task(progress.run())
    committer = loop.create_task(commit_when_idle())
    quota_watch = (
        loop.create_task(_watch_quota(broker, stop, needed, lambda: answered))
        if options.no_wait
        else None
    )
    failed = False
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if not stop.forced or (current is not None and current.cancelling()):
            raise
    except Exception:
        failed = True
        raise
    finally:
        ticker.cancel()
        committer.cancel()
        if quota_watch is not None:
            quota_watch.cancel()
        try:
            # Written whether or not anything was left to record: a commit cancelled between
            # pages of its write left rows committed but not yet in the output. Stopping by
            # force (or cancelled), at once, with no turn of the loop, and a page at most when
            # forced: the ledger has the rest, and the rerun writes it. Else a page at a time
            # with the loop going on: a million rows of duplicates took half a minute to
            # write at the end, deaf to a second signal (which now ends it between pages)
            # and to a daemon's /healthz.
            current = asyncio.current_task()
            try:
                record()
                if stop.forced or (current is not None and current.cancelling()):
                    _emit(ledger, output.sink, output.name, pages=1 if stop.forced else None)
                else:
                    stop.writing = True
                    try:
                        await _emit_yielding(ledger, output.sink, output.name, stop)
                    finally:
                        stop.writing = False
            except Exception as exc:
                if not failed and stop.error is None:
                    raise
                # After a failure (a full disk under the output or the ledger), this one is
                # its consequence (a sink that refuses writes once one failed) and must not
                # hide it: what is not written stays in the ledger, and the rerun writes it.
                logger.warning(
                    "broker.job_last_write_failed",
                    error=type(exc).__name__,
                    message=os_error_text(exc) if isinstance(exc, OSError) else str(exc),
                    note="the rows not written stay in the ledger; the rerun writes them",
                )
        finally:
            # Also when the last commit fails: the error message gets a line of its own.
            progress.done()
    if stop.error is not None:
        raise stop.error
    if refused and stop.quota_until is not None:
        # no_wait stopped for the daily quota of the other marketplaces' keys, but rows are
        # left that no key can serve: the rerun after the reset would end in this refusal.
        raise NoUsableKeyError.of_many(refused)
    return cached


async def each_marketplace(
    streams: Sequence[Coroutine[Any, Any, None]], refused: list[NoUsableKeyError] | None = None
) -> None:
    """Run one stream per marketplace together, to their end.

    A stream whose marketplace has no key left (``NoUsableKeyError``: every key that serves
    it was rejected) ends alone: its rows stay pending, the others go on to their end, and
    then one error naming every such marketplace is raised; ``refused``, when given,
    collects such errors as they come (a caller that cancels the others, for the daily
    quota, still learns of them). Any
    other failure stops them all and is raised, the first one, as a single stream would
    raise it (the others are its consequences or of the same cause).
    """
    if refused is None:
        refused = []

    async def noting(stream: Coroutine[Any, Any, None]) -> None:
        try:
            await stream
        except NoUsableKeyError as exc:
            refused.append(exc)

    try:
        async with asyncio.TaskGroup() as group:
            for stream in streams:
                group.create_task(noting(stream))
    except ExceptionGroup as failed:
        first = failed.exceptions[0]
        raise first from first.__cause__
    if refused:
        raise NoUsableKeyError.of_many(refused)


def outage_had_part(exc: NoUsableKeyError) -> bool:
    """True when a key left for an outage (the API's or the key-state store's): it ends by
    itself, and what is left can be done then (exit 69; a daemon stops, to be started
    again), whatever else was rejected beside it (named in the message)."""
    return any(failure.code in OUTAGE_CODES for failure in exc.failures)


#: How often ``no_wait`` (and ``broker lookup``) checks whether every key waits for its
#: daily quota (seconds).
QUOTA_POLL_S: Final = 0.5
#: How long no row may be answered before --no-wait stops for the daily quota.
QUOTA_QUIET_S: Final = 2.0

#: Scopes of codes that take keys out for something else's fault (an endpoint, the client).
_NOT_THE_KEYS: Final = frozenset({Scope.GLOBAL, Scope.TOKEN_URL})

#: Key states that last until Amazon's daily window resets (or, probed, about as long).
_DAY_LONG_WAITS: Final = (
    QUOTA_WAIT,
    ThrottleVerdict.QUOTA_EXHAUSTED.value,
    ThrottleVerdict.ACCESS_REVOKED.value,
)


def quota_wait(
    metrics: MetricsSnapshot, *, keys: Collection[str] | None = None, now: datetime
) -> str | None:
    """When every key that is not disabled (of ``keys``, if given) waits for its daily
    quota, by the broker's ``metrics``: the earliest reset.

    A key parked after sustained 429s whose probe is due at ``now`` (no ``until``, or one
    past) does not wait: work must go to it to carry the probe. A daemon's job deferred on
    such a park stayed deferred for ever, its key waiting for work to probe with.
    """
    waits: list[str] = []
    for key in metrics.keys:
        if key.state == "disabled" or (keys is not None and key.name not in keys):
            continue
        # A key parked after sustained 429s with its own count low waits as long (Amazon's
        # daily quota may be smaller than tpd says, or the account not eligible, and a 429
        # does not tell which): --no-wait stops for it too, until its probe is due.
        if key.reason not in _DAY_LONG_WAITS:
            return None
        parked = key.reason != QUOTA_WAIT
        if parked and (key.until is None or datetime.fromisoformat(key.until) <= now):
            return None
        waits.append(key.until or key.daily_resets_at or "the next window")
    return min(waits) if waits else None


async def _watch_quota(
    broker: Broker,
    stop: _Stop,
    needed: Callable[[], Collection[str]],
    answered: Callable[[], int],
) -> None:
    """``no_wait``: stop the run once :func:`quota_spent` says so."""
    until, keys = await quota_spent(broker, needed, answered)
    stop.quota_spent(until, keys)


async def quota_spent(
    broker: Broker, needed: Callable[[], Collection[str]], answered: Callable[[], int]
) -> tuple[str, Collection[str]]:
    """Return (when the quota resets, the keys) once every key the rows left need
    (``needed()``: those serving a marketplace a row is left for) waits for its daily
    quota; a fresh key that serves none of them cannot help. Not while rows are still being
    answered (``answered()``, the results so far, grew in the last :data:`QUOTA_QUIET_S`):
    the item cache answers rows with no key, and a job whose key spent its quota on its
    first rows stopped with the cached rows after them left pending. A quiet of a few
    looks, not one: a slow cache read (a remote Redis) or a slow commit may leave one look
    with none. ``broker run --no-wait`` and ``broker lookup`` stop on it alike."""
    seen = answered()
    quiet_looks = 0
    while True:
        await asyncio.sleep(QUOTA_POLL_S)
        keys = needed()
        metrics, now = broker.metrics(), broker.clock.utcnow()
        until = quota_wait(metrics, keys=keys, now=now) if keys else None
        count = answered()
        quiet_looks = quiet_looks + 1 if count == seen else 0
        seen = count
        if until is not None and quiet_looks * QUOTA_POLL_S >= QUOTA_QUIET_S:
            return until, keys


def keys_serving(broker: Broker, markets: Collection[str]) -> set[str]:
    """The keys that serve one of ``markets`` now (a key out of rotation there, for a wrong
    tag, cannot help however fresh it is): those whose daily quota decides a wait."""
    return {key.name for key in broker.metrics().serving(markets)}


def _keys_for_markets(broker: Broker, left: Mapping[str, int]) -> set[str]:
    """The keys that serve now a marketplace some lookup is left for."""
    return keys_serving(broker, [market for market, count in left.items() if count > 0])


class _Stop:
    """SIGINT/SIGTERM/SIGHUP during a run: the first drains, a second stops at once.

    Draining admits no new lookup, lets go of those not sent yet (they stay pending), and
    lets the requests already sent be answered and committed, for at most ``grace_s``
    seconds. Then, or at a second signal, the fetch is cancelled: finished results are
    committed and written, and lookups still in flight stay pending for the next run (the
    ledger makes either way resumable).
    """

    __slots__ = (
        "_fetch",
        "_grace_s",
        "_timer",
        "draining",
        "error",
        "forced",
        "ordering",
        "quota_keys",
        "quota_until",
        "requested",
        "signals",
        "writing",
    )

    def __init__(self, grace_s: float) -> None:
        #: the run must stop: a signal, or an error (read by the ingestion thread, too)
        self.requested = False
        #: the fetch was cancelled rather than drained
        self.forced = False
        #: every row is done and the output is being put in input order (``--ordered``)
        self.ordering = False
        #: the fetch has ended and its last rows are being written to the output: a forced
        #: stop ends that write between pages (the rows left stay in the ledger)
        self.writing = False
        #: how many stop signals (or the caller's drain) came so far
        self.signals = 0
        #: why the fetch was stopped, when it was an error (see :meth:`fail`)
        self.error: Exception | None = None
        #: set when ``no_wait`` stopped the run: the earliest daily-quota reset (ISO UTC)
        self.quota_until: str | None = None
        #: and the keys that wait so: those the rows left need
        self.quota_keys: frozenset[str] = frozenset()
        #: set by the first signal: the fetch's stream winds down (``Broker.stream(stop=)``)
        self.draining = asyncio.Event()
        self._grace_s = grace_s
        self._fetch: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def drain_when(self, event: asyncio.Event) -> None:
        """Drain as at a first signal once ``event`` is set (a caller's own signal handling)."""
        await event.wait()
        if not self.requested:
            self._drain(signal=None, asked_by="the caller")

    def on_first_signal(self, sig: signal.Signals) -> None:
        """The first stop signal: admit nothing new, drain for at most the grace period."""
        self._drain(signal=sig.name)

    def ask(self) -> None:
        """The run must stop (it is being cancelled): work in a thread reads this."""
        self.requested = True

    def _drain(self, **why: str | None) -> None:
        self.signals += 1
        self.requested = True
        self.draining.set()
        note = (
            "every row is done; the output stays in the order rows were done, and the same "
            "command puts it in input order"
            if self.ordering
            else "no new requests; those already sent are answered and written, the rest "
            "stay pending; send the signal again to stop at once"
        )
        logger.warning("broker.job_stopping", **why, mode="drain", grace_s=self._grace_s, note=note)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._grace_s, self._force, "drain grace period over")

    def on_next_signal(self, sig: signal.Signals) -> None:
        """A later SIGINT/SIGTERM/SIGHUP: stop at once."""
        self.signals += 1
        self.requested = True
        self._force(f"second {sig.name}")

    def watch(self, fetch: asyncio.Task[None]) -> None:
        """Cancel ``fetch`` when the run must stop at once."""
        self._fetch = fetch

    def close(self) -> None:
        """Cancel the grace timer."""
        if self._timer is not None:
            self._timer.cancel()

    def fail(self, error: Exception) -> None:
        """Stop the fetch at once because of ``error``, which the run then raises."""
        if self.error is None:
            self.error = error
        self.requested = True
        self._cancel()

    def quota_spent(self, until: str, keys: Collection[str] = ()) -> None:
        """``no_wait``: every key (of ``keys``, those the rows left need) waits for its
        daily quota, so stop now (resumable)."""
        self.quota_until = until
        self.quota_keys = frozenset(keys)
        self.requested = True
        logger.warning(
            "broker.job_quota_spent",
            until=until,
            keys=sorted(keys),
            note="no_wait: stopping until the reset; the rows left stay pending (resumable)",
        )
        self._cancel()

    def _force(self, reason: str) -> None:
        ended = self._fetch is not None and self._fetch.done()
        if self.forced or (ended and not self.writing):
            # Also when the fetch has ended (the drain's timer running out during the
            # --ordered export): nothing is in flight to stop, and saying so misled.
            return
        logger.warning(
            "broker.job_stop_forced",
            reason=reason,
            note="the rows not written yet stay in the ledger for the rerun"
            if ended
            else "finished results are written; lookups in flight stay pending for the rerun",
        )
        self._cancel()

    def _cancel(self) -> None:
        self.forced = True
        if self._fetch is not None and not self._fetch.done():
            self._fetch.cancel()


def _label(options: JobOptions) -> str:
    """How the log names the job of ``options``."""
    return options.label if options.label is not None else str(options.job)


@contextlib.contextmanager
def _signals(stop: _Stop, *, enabled: bool, drain: asyncio.Event | None) -> Iterator[None]:
    """Route SIGINT and SIGTERM to ``stop`` for the whole run (when ``enabled``), and a
    caller's ``drain`` event (when given)."""
    waiter = asyncio.ensure_future(stop.drain_when(drain)) if drain is not None else None
    try:
        policy = StopSignals(
            stop.on_first_signal,
            stop.on_next_signal,
            sigint_echo=sigint_echo_window() if enabled else None,
        )
        with installed(policy, enabled=enabled):
            yield
    finally:
        if waiter is not None:
            waiter.cancel()
        stop.close()


#: Lookups a GetItems request carries when its batch is full (the most it takes).
_FULL_BATCH: Final = 10


class _Progress:
    """Progress on stderr: a live line on a terminal, periodic events otherwise."""

    def __init__(
        self,
        ledger: Ledger,
        broker: Broker,
        options: JobOptions,
        *,
        needed: Callable[[], Collection[str]] = frozenset,
        left: Mapping[str, int] | None = None,
        batch_size: int = _FULL_BATCH,
        committed_at: Callable[[], float] | None = None,
    ) -> None:
        self._ledger = ledger
        self._broker = broker
        # When the rows done were last committed (the broker's clock): rows/s is measured
        # up to then, as the ledger's count moves only at each commit (about once a
        # second); measured up to each look, every other look saw about half the rate.
        self._committed_at = committed_at
        # Lookups a request carries (engine.batch_size): the requests the rows left take.
        self._batch_size = batch_size
        # The lookups left per marketplace (the fetch counts them down): the ETA's share of
        # each marketplace's daily quota.
        self._left: Mapping[str, int] = left if left is not None else {}
        # The keys the rows left need: when all of them wait a day long (their daily quota,
        # or parked after sustained 429s), the job is held until the earliest of those
        # waits ends, whatever the average rate says (other marketplaces' keys idle).
        self._needed = needed
        self._live = options.progress == "bar" or (
            options.progress == "auto" and sys.stderr.isatty()
        )
        self._quiet = options.progress == "none"
        self._label = _label(options)
        self._every_s = 1.0 if self._live else options.progress_every_s
        self._first_s = options.first_progress_s
        # On the broker's clock: the rate's start, moved to the last look of a hold.
        self._started = broker.clock.monotonic()
        self._start_done = ledger.counts().done
        # The job's own 429s: a daemon's broker counts every job it ran before this one.
        self._start_throttled = broker.metrics().throttled

    def tick(self) -> None:
        if self._live:
            self._show()

    async def run(self) -> None:
        # Piped output gets a first event soon, so a log reader sees the run is alive.
        await asyncio.sleep(min(self._first_s, self._every_s))
        while True:
            self._show()
            await asyncio.sleep(self._every_s)

    def _show(self) -> None:
        if self._quiet:
            return
        counts = self._ledger.counts()
        metrics = self._broker.metrics()
        keys_needed = self._needed() if counts.pending else ()
        now = self._broker.clock.utcnow()
        waiting = quota_wait(metrics, keys=keys_needed, now=now) if keys_needed else None
        moment = self._broker.clock.monotonic()
        if waiting is not None:
            # Held: rows/s and the ETA count from the last look of the hold once it is
            # over (over the hours waited, they were off by their length).
            self._started, self._start_done = moment, counts.done
        upto = moment if self._committed_at is None else self._committed_at()
        rate = (
            (counts.done - self._start_done) / max(upto - self._started, 1e-6)
            if upto > self._started
            else 0.0
        )
        eta = None
        if rate > 0 and waiting is None:
            # The rows per second, or the days the daily quotas of the rows' marketplaces
            # take, if longer (each marketplace's lookups in batches of engine.batch_size).
            eta = counts.pending / rate
            requests = {m: math.ceil(n / self._batch_size) for m, n in self._left.items() if n > 0}
            if requests:
                now = self._broker.clock.utcnow()
                eta = max(eta, quota_eta(requests, metrics.keys, now=now))
        throttled = metrics.throttled - self._start_throttled
        keys = ", ".join(
            f"{k.name} {_rate_shown(k.rate)}/s"
            + (f" {k.daily_left} left today" if k.daily_left is not None else "")
            + (f" [{k.reason}{' until ' + k.until if k.until else ''}]" if k.reason else "")
            for k in metrics.keys
        )
        if self._live:
            # quota_wait counts a key parked after sustained 429s too (Amazon's quota spent
            # or the account not eligible: a 429 does not say which), as --no-wait does.
            ahead = f"held until {waiting} (keys wait)" if waiting else f"ETA {_fmt_eta(eta)}"
            line = (
                f"\r{counts.done}/{counts.total} rows  {rate:.1f} rows/s  "
                f"{ahead}  429s {throttled}  {keys}"
            )
            show_live_line(_fit(line))
        else:
            logger.info(
                "broker.progress",
                job=self._label,
                done=counts.done,
                total=counts.total,
                rows_per_s=round(rate, 2),
                eta_s=round(eta) if eta else None,
                held_until=waiting,
                throttled=throttled,
                keys=[
                    {
                        "name": k.name,
                        "rate": round(k.rate, 3),
                        "state": k.state,
                        "daily_left": k.daily_left,
                        "reason": k.reason,
                        "until": k.until,
                    }
                    for k in metrics.keys
                ],
            )

    def done(self) -> None:
        if self._live:
            # The last figures are a courtesy: a ledger that cannot be read now (the error
            # that ends the run) must not replace that error, and the line ends either way.
            with contextlib.suppress(Exception):
                self._show()
            end_live_line()


def _fit(line: str) -> str:
    """A ``\\r`` live line cut to the terminal's width (one column spare, so it never wraps)."""
    try:
        columns = os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        columns = 0
    if columns <= 0:
        # No terminal, or one that says 0 x 0 (a pseudo-terminal not sized yet: some CI
        # runners, docker exec -t): $COLUMNS, else 80.
        columns = shutil.get_terminal_size(fallback=(80, 24)).columns
    return "\r" + fit(as_shown(line.lstrip("\r"), sys.stderr), max(columns - 1, 20))


def quota_eta(
    requests_by_market: Mapping[str, float], keys: Collection[KeySnapshot], *, now: datetime
) -> float:
    """Seconds the daily quotas alone hold the rows left: the longest over marketplaces.

    ``requests_by_market``: the requests each marketplace's rows left still need. The
    marketplaces that share keys share their quota, so they are weighed together: a group
    whose need is more than its keys have left today waits for their next reset, then for
    as many days as their daily sends take (each day's stop point, ``tpd`` times the
    guard), then for the rest at their rate. A million ASINs at 8,640 requests a day take
    about twelve days, which the rows per second of the first hour do not tell. 0 when
    every group's need fits in what its keys have left today, or they have no daily limit:
    the rows per second tell the time then.
    """
    # Each marketplace alone, with its own keys, and each group sharing keys: both bound the
    # wait from below (a group's spare quota may sit on keys one of its marketplaces lacks).
    alone = [({m}, [k for k in keys if m in k.marketplaces]) for m in requests_by_market]
    longest = 0.0
    for markets, serving in [*alone, *_sharing(requests_by_market, keys)]:
        needed = sum(requests_by_market[m] for m in markets)
        longest = max(longest, _quota_wait_s(needed, serving, now))
    return longest


def _quota_wait_s(needed: float, serving: Sequence[KeySnapshot], now: datetime) -> float:
    """Seconds ``needed`` requests wait for the daily quotas of the keys ``serving`` them
    (0: today's quota takes them, or a key has no daily limit)."""
    if not serving or any(k.daily_left is None or k.daily_resets_at is None for k in serving):
        return 0.0
    # The requests on the wire are counted spent already, and their rows are still left.
    today = sum(max(k.daily_left or 0, 0) + k.in_flight for k in serving)
    if needed <= today:
        return 0.0
    reset = min(datetime.fromisoformat(k.daily_resets_at or "") for k in serving)
    wait = max((reset - now).total_seconds(), 0.0)
    per_day = sum(max(k.daily_left or 0, 0) + k.daily_spent for k in serving)
    if per_day > 0:
        days, rest = divmod(needed - today, per_day)
        wait += days * 86_400.0 + rest / max(sum(k.rate for k in serving), 1e-9)
    return wait


def _sharing(
    markets: Collection[str], keys: Collection[KeySnapshot]
) -> Iterator[tuple[set[str], list[KeySnapshot]]]:
    """``markets`` in groups joined by the keys that serve them (a key tagged for US and
    UK joins the two), each with those keys."""
    left = set(markets)
    while left:
        group, serving = {left.pop()}, []
        grown = True
        while grown:
            grown = False
            for key in keys:
                if key not in serving and group.intersection(key.marketplaces):
                    serving.append(key)
                    joined = left.intersection(key.marketplaces)
                    group |= joined
                    left -= joined
                    grown = True
        yield group, serving


def _where(filename: object) -> str:
    """Where a relative path is (a default ``out/`` under a working directory the user may
    not know, such as a container's): `` (in DIR)``, or nothing."""
    if not isinstance(filename, str) or os.path.isabs(filename):
        return ""
    try:
        return f" (in {os.getcwd()})"
    except OSError:
        return ""  # the working directory itself is gone


def _rate_shown(rate: float) -> str:
    """A key's rate in two significant digits (0.05, 4.7, 12), whole from 100 on: ``.2g``
    alone showed 1000 TPS as ``1e+03``."""
    return f"{rate:.0f}" if rate >= 99.5 else f"{rate:.2g}"


def _fmt_eta(eta: float | None) -> str:
    if eta is None:
        return "?"
    minutes, seconds = divmod(int(eta), 60)
    hours, minutes = divmod(minutes, 60)
    if hours >= 48:
        days, hours = divmod(hours, 24)
        return f"{days}d{hours:02d}h"
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def is_about(exc: OSError, path: Path) -> bool:
    """True when ``exc`` is about the file ``path``."""
    return exc.filename is not None and Path(exc.filename).absolute() == path.absolute()


def out_of_files(exc: BaseException) -> TypeGuard[OSError]:
    """Whether ``exc`` says this process (or the machine) ran out of open files: no fault
    of the file it names, and gone once files are closed or the limit raised."""
    return isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE)


def unexpected(exc: BaseException) -> bool:
    """Whether ``exc`` is one no run expects, which :func:`describe_failure` tells as an
    ``internal error`` (exit 1): a bug, whose log event carries its traceback for the
    report. The broker's own errors, a file's, memory running out are one line each."""
    return not isinstance(exc, BrokerError | OSError | MemoryError)


def describe_failure(
    exc: BaseException, *, job: Path | None = None, spooled: bool = False
) -> tuple[int, str]:
    """Map an exception of a run to (exit code, one-line message for the user).

    ``job``: the job file, so an error reading it (missing, not readable by this user) is
    told from one writing the output or the state; without it no file is input.
    ``spooled``: the job is a spool daemon's, filed under failed/ with its work files, so
    its rows do not stay pending and it is run again from inbox/.
    """
    if isinstance(exc, NoUsableKeyError) and outage_had_part(exc):
        # Another key's or marketplace's rejection beside it is named in the message; the
        # outage ends by itself, and a daemon stopped for it is started again (69).
        return ExitCode.UNAVAILABLE, (
            f"stopped: {exc}. Unfinished rows stay pending for the next run."
        )
    if isinstance(exc, NoUsableKeyError):
        # A global or token-URL code (a wrong endpoint, a client bug) is no key's fault.
        at_fault = (
            "what it names (the config, or a bug to report)"
            if any(describe(failure.code).scope in _NOT_THE_KEYS for failure in exc.failures)
            else "the key"
        )
        again = (
            f"fix {at_fault}, restart the daemon (it reads its config, and takes a rejected "
            "key back, only when it starts), and move the job back into inbox/ to run it again"
            if spooled
            else f"Unfinished rows stay pending; fix {at_fault} and run again"
        )
        return ExitCode.NO_PERMISSION, f"stopped: {exc}. {again[0].upper()}{again[1:]}."
    if isinstance(exc, ConfigError):
        return ExitCode.CONFIG, f"invalid config: {exc}"
    if isinstance(exc, StateUnavailableError):
        return ExitCode.UNAVAILABLE, (
            f"stopped: {exc}. Unfinished rows stay pending for the next run."
        )
    if out_of_files(exc):
        # Nothing need have been written, nor the job file be unreadable: any open fails so.
        return ExitCode.IO_ERROR, (
            f"out of open files: {os_error_text(exc)}{_where(exc.filename)}; raise the "
            "open-file limit (ulimit -n; LimitNOFILE= in a systemd unit)"
        )
    if isinstance(exc, StdinUnreadable):
        return ExitCode.NO_INPUT, f"cannot read the job from stdin: {exc.strerror}"
    if isinstance(exc, FileNotFoundError) and job is not None and is_about(exc, job):
        return ExitCode.NO_INPUT, f"input not found: {exc.filename}"
    if isinstance(exc, JobFileError):
        return ExitCode.DATA_ERROR, str(exc)
    if isinstance(exc, OSError) and job is not None and is_about(exc, job):
        # Only a refusal is the file's permissions (a failing disk, a loop of links is not).
        advice = (
            "; make it readable by the user the broker runs as"
            if isinstance(exc, PermissionError)
            else ""
        )
        return ExitCode.NO_INPUT, f"cannot read the job file {job}: {exc.strerror or exc}{advice}"
    if isinstance(exc, OSError):
        return ExitCode.IO_ERROR, (
            f"cannot write: {os_error_text(exc)}{_where(exc.filename)}{name_too_long_hint(exc)}"
        )
    if isinstance(exc, BrokerError):
        return ExitCode.INTERNAL, str(exc)
    if isinstance(exc, MemoryError):
        # No bug of the broker's: the process's memory limit (ulimit -v, a container's),
        # which several threads' malloc arenas reach long before their memory is used.
        return ExitCode.INTERNAL, (
            "out of memory: the process's memory limit is too low for it (ulimit -v, "
            "MemoryMax= in a systemd unit, a container's limit); raise it, or set "
            "MALLOC_ARENA_MAX=2, which lowers what its threads reserve. "
            + (
                "The job is filed under failed/ with the rows it answered; move it back into "
                "inbox/ to run it again."
                if spooled
                else "Rows done so far are kept; run again to go on."
            )
        )
    # Printed as it is on stderr, unlike the log's copy: a credential a foreign message
    # quotes is masked here.
    return ExitCode.INTERNAL, f"internal error: {type(exc).__name__}: {scrub(str(exc))}"
