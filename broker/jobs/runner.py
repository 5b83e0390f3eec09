"""One job end to end: job file -> ledger -> broker -> ledger -> output, resumable after any crash.

The ledger (SQLite, WAL) is the source of truth: input rows are ingested into it, results
are committed to it, and the output file is written from it, recording how far the output
is known good. A rerun of the same job truncates any torn output tail, re-emits what is
missing and fetches only lookups that have no result yet.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from broker.engine.broker import Broker, Query
from broker.errors import BrokerError, JobFileError, NoUsableKeyError
from broker.jobs.ledger import Ledger, Lookup
from broker.jobs.lock import JobLock
from broker.jobs.sinks import InvalidReport, ResultSink, open_sink
from broker.jobs.sources import fingerprint, read_job

if TYPE_CHECKING:
    from broker.config import BrokerConfig
    from broker.models import ItemResult

__all__ = ["ExitCode", "JobOptions", "JobSummary", "StrictInputError", "run_job"]

logger = structlog.get_logger("broker")

#: How many results are committed to the ledger in one transaction, at most.
_COMMIT_ROWS = 500
#: How long results may wait before they are committed and emitted.
_COMMIT_EVERY_S = 1.0


class ExitCode:
    """The documented exit codes of ``broker run`` (BSD sysexits where one fits)."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    SOME_FAILED = 3
    DATA_ERROR = 65
    NO_INPUT = 66
    UNAVAILABLE = 69
    IO_ERROR = 74
    RESUMABLE = 75
    NO_PERMISSION = 77
    CONFIG = 78


class StrictInputError(JobFileError):
    """``--strict``: the job file has invalid rows, so nothing was sent."""


@dataclass(frozen=True, slots=True)
class JobOptions:
    """How to run one job."""

    job: Path
    out: Path
    format: str = "jsonl"
    strict: bool = False
    new_job: bool = False
    encoding: str = "utf-8"
    progress: str = "auto"
    progress_every_s: float = 30.0
    handle_signals: bool = True


@dataclass(slots=True)
class JobSummary:
    """What a run did; printed at the end and returned to callers."""

    total: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    pending: int = 0
    requests: int = 0
    throttled: int = 0
    retries: int = 0
    wall_s: float = 0.0
    out: str = ""
    invalid_report: str | None = None
    stopped_by_signal: bool = False
    error: str | None = None

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

    Raises:
        JobFileError: the input is unreadable, changed since the job started, or has
            invalid rows under ``strict``; or another process holds the job.
        NoUsableKeyError: every key is out of rotation (rows stay pending for a rerun).
        OSError: the output or ledger cannot be written.
    """
    started = time.monotonic()
    ledger_path = options.out.with_name(options.out.name + ".ledger")
    options.out.parent.mkdir(parents=True, exist_ok=True)
    summary = JobSummary(out=str(options.out))
    with (
        JobLock(ledger_path),
        Ledger.open(
            ledger_path,
            fingerprint=fingerprint(options.job),
            default_marketplace=config.api.marketplace,
            new_job=options.new_job,
        ) as ledger,
    ):
        if not ledger.ingest_complete:
            if options.strict:
                _refuse_invalid(options)
            ledger.ingest(read_job(options.job, encoding=options.encoding))
        counts = ledger.counts()
        logger.info(
            "broker.job_started",
            job=str(options.job),
            out=str(options.out),
            rows=counts.total,
            done=counts.done,
            pending=counts.pending,
        )
        sink = open_sink(options.format, options.out)
        # The sink may cut itself back further than recorded (a hand-truncated file).
        ledger.set_sink_state("out", sink.open(ledger.sink_state("out")))
        try:
            _emit(ledger, sink)
            if ledger.pending_lookup_count():
                own = broker or Broker(config, budget_store=ledger)
                async with own if broker is None else contextlib.nullcontext(own):
                    summary.stopped_by_signal = await _fetch(ledger, sink, own, options)
                    metrics = own.metrics()
                    summary.requests = metrics.requests
                    summary.throttled = metrics.throttled
                    summary.retries = metrics.retries
        finally:
            _emit(ledger, sink)
            sink.close()
        report = options.out.with_name(options.out.name + ".invalid.jsonl")
        invalid = InvalidReport(report).write(ledger)
        summary.invalid_report = str(report) if invalid else None
        counts = ledger.counts()
        summary.total = counts.total
        summary.by_status = dict(counts.by_status)
        summary.pending = counts.pending
    summary.wall_s = time.monotonic() - started
    return summary


def _refuse_invalid(options: JobOptions) -> None:
    bad = [row for row in read_job(options.job, encoding=options.encoding) if row.error]
    if bad:
        shown = "; ".join(f"line {row.line}: {row.error}" for row in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise StrictInputError(f"{options.job}: {len(bad)} invalid rows{more}: {shown}")


def _emit(ledger: Ledger, sink: ResultSink) -> None:
    """Write every committed row the output does not have yet, then record the new state."""
    state = ledger.sink_state("out")
    while True:
        rows = ledger.done_rows_after(state.done_order, limit=1000)
        if not rows:
            break
        sink.write(rows)
        state = sink.flush()
        ledger.set_sink_state("out", state)


async def _fetch(ledger: Ledger, sink: ResultSink, broker: Broker, options: JobOptions) -> bool:
    """Stream pending lookups through the broker; commit and emit as results arrive.

    Returns True when stopped by SIGINT/SIGTERM (work remains, resumable).
    """
    waiting: dict[tuple[str, str], collections.deque[Lookup]] = {}

    def queries() -> Iterator[Query]:
        for lookup in ledger.pending_lookups():
            waiting.setdefault((lookup.marketplace, lookup.asin), collections.deque()).append(
                lookup
            )
            yield Query(lookup.asin, lookup.marketplace, lookup.resources)

    buffer: list[tuple[Lookup, ItemResult]] = []
    last_commit = time.monotonic()
    progress = _Progress(ledger, broker, options)

    def commit() -> None:
        nonlocal last_commit
        if buffer:
            ledger.record_results(buffer)
            buffer.clear()
            _emit(ledger, sink)
        last_commit = time.monotonic()

    async def consume() -> None:
        async for result in broker.stream(queries()):
            pending = waiting.get((result.marketplace, result.asin))
            if not pending:
                continue
            lookup = pending.popleft()
            if not pending:
                del waiting[(result.marketplace, result.asin)]
            buffer.append((lookup, result))
            if len(buffer) >= _COMMIT_ROWS or time.monotonic() - last_commit >= _COMMIT_EVERY_S:
                commit()
                progress.tick()

    task = asyncio.get_running_loop().create_task(consume())
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    if options.handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, _on_signal, task, stopped)
    ticker = loop.create_task(progress.run())
    try:
        await task
    except asyncio.CancelledError:
        if not stopped.is_set():
            raise
    finally:
        ticker.cancel()
        if options.handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        commit()
        progress.done()
    return stopped.is_set()


def _on_signal(task: asyncio.Task[None], stopped: asyncio.Event) -> None:
    if stopped.is_set():
        return
    stopped.set()
    logger.warning(
        "broker.job_stopping",
        reason="signal",
        note="committing finished results; in-flight lookups stay pending",
    )
    task.cancel()


class _Progress:
    """Progress on stderr: a live line on a terminal, periodic events otherwise."""

    def __init__(self, ledger: Ledger, broker: Broker, options: JobOptions) -> None:
        self._ledger = ledger
        self._broker = broker
        self._live = options.progress == "bar" or (
            options.progress == "auto" and sys.stderr.isatty()
        )
        self._quiet = options.progress == "none"
        self._every_s = 1.0 if self._live else options.progress_every_s
        self._started = time.monotonic()
        self._start_done = ledger.counts().done

    def tick(self) -> None:
        if self._live:
            self._show()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._every_s)
            self._show()

    def _show(self) -> None:
        if self._quiet:
            return
        counts = self._ledger.counts()
        metrics = self._broker.metrics()
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = (counts.done - self._start_done) / elapsed
        eta = counts.pending / rate if rate > 0 else None
        keys = ", ".join(
            f"{k.name} {k.rate:.2g}/s"
            + (f" {k.daily_limit - k.daily_spent} left today" if k.daily_limit else "")
            + (f" [{k.reason}{' until ' + k.until if k.until else ''}]" if k.reason else "")
            for k in metrics.keys
        )
        if self._live:
            line = (
                f"\r{counts.done}/{counts.total} rows  {rate:.1f} rows/s  "
                f"ETA {_fmt_eta(eta)}  429s {metrics.throttled}  {keys}"
            )
            sys.stderr.write(line[:200].ljust(120))
            sys.stderr.flush()
        else:
            logger.info(
                "broker.progress",
                done=counts.done,
                total=counts.total,
                rows_per_s=round(rate, 2),
                eta_s=round(eta) if eta else None,
                throttled=metrics.throttled,
                keys=[
                    {
                        "name": k.name,
                        "rate": round(k.rate, 3),
                        "state": k.state,
                        "daily_left": (k.daily_limit - k.daily_spent if k.daily_limit else None),
                        "reason": k.reason,
                        "until": k.until,
                    }
                    for k in metrics.keys
                ],
            )

    def done(self) -> None:
        if self._live:
            self._show()
            sys.stderr.write("\n")


def _fmt_eta(eta: float | None) -> str:
    if eta is None:
        return "?"
    minutes, seconds = divmod(int(eta), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def describe_failure(exc: BaseException) -> tuple[int, str]:
    """Map an exception of a run to (exit code, one-line message for the user)."""
    if isinstance(exc, NoUsableKeyError):
        return ExitCode.NO_PERMISSION, (
            f"stopped: {exc}. Unfinished rows stay pending; fix the key and run again."
        )
    if isinstance(exc, FileNotFoundError):
        return ExitCode.NO_INPUT, f"input not found: {exc.filename}"
    if isinstance(exc, JobFileError):
        return ExitCode.DATA_ERROR, str(exc)
    if isinstance(exc, OSError):
        return ExitCode.IO_ERROR, f"cannot write: {exc}"
    if isinstance(exc, BrokerError):
        return ExitCode.INTERNAL, str(exc)
    return ExitCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
