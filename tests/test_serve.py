"""``broker serve``: the spool daemon and its HTTP endpoints, against the embedded simulator."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import aiohttp
import pytest
import structlog
from conftest import ENV, key_doc, sqlite_db

from broker import cli
from broker.cache import CacheStats
from broker.config import BrokerConfig, parse_config
from broker.engine.adaptive import ThrottleVerdict
from broker.engine.metrics import QUOTA_WAIT, KeySnapshot, MetricsSnapshot
from broker.engine.shared_limiter import SharedKeyLimiter
from broker.errors import ConfigError, NoUsableKeyError
from broker.jobs import serve
from broker.jobs.lock import JobLock
from broker.jobs.metrics_http import (
    JobRows,
    MetricsServer,
    SpoolSnapshot,
    readiness,
    render_metrics,
)
from broker.jobs.runner import ExitCode, JobSummary
from broker.jobs.serve import Daemon, ServeOptions, Spool, SpoolJob, spool_name
from broker.simulator.server import SimulatorServer
from broker.simulator.settings import LatencyProfile, SimulatorSettings
from broker.sqlitewal import journal_files
from broker.testing import FakeClock

if TYPE_CHECKING:
    from broker.client import Broker

QUOTA_SPENT = ThrottleVerdict.QUOTA_EXHAUSTED.value
REVOKED = ThrottleVerdict.ACCESS_REVOKED.value

_ACCOUNT = {
    "name": "demo",
    "protocol": "creators",
    "credential_id": "demo-id",
    "secret": "demo-secret",
    "version": "3.1",
    "partner_tags": {"www.amazon.com": "demo-20"},
    "tps": 200.0,
    "tpd": 1_000_000,
}


def _config(*, tps: float = 100.0, tpd: int = 100_000, batch_size: int = 10) -> BrokerConfig:
    key = {
        "name": "demo",
        "credential_id": "demo-id",
        "version": "3.1",
        "partner_tags": {"www.amazon.com": "demo-20"},
        "tps": tps,
        "tpd": tpd,
    }
    document = {
        "api": {"endpoint": "simulator"},
        "keys": [key],
        "engine": {"linger_s": 0.005, "batch_size": batch_size},
        "simulator": {"seed": 5, "missing_share": 0.1, "accounts": [_ACCOUNT]},
    }
    return parse_config(document, environ={})


def _job_in_processing(tmp_path: Path, text: str) -> tuple[FakeClock, Daemon, SpoolJob]:
    """A daemon on a fake clock whose spool holds job a.txt (``text``) in processing/."""
    clock = FakeClock()
    daemon = Daemon(_config(), ServeOptions(spool=tmp_path, settle_s=0), clock=clock)
    daemon.spool.prepare()
    job = daemon.spool.job("a.txt", "jsonl")
    job.path.write_text(text)
    return clock, daemon, job


def _wrong_uk_tag(**simulator: object) -> BrokerConfig:
    """The demo key with a UK tag the simulator rejects (InvalidPartnerTag) beside its US one."""
    key = {
        "name": "demo",
        "credential_id": "demo-id",
        "version": "3.1",
        "partner_tags": {"www.amazon.com": "demo-20", "www.amazon.co.uk": "wrong-21"},
        "tps": 100.0,
    }
    document = {
        "api": {"endpoint": "simulator"},
        "keys": [key],
        "engine": {"linger_s": 0.005},
        "simulator": {"seed": 5, "accounts": [_ACCOUNT], **simulator},
    }
    return parse_config(document, environ={})


def _config_file(tmp_path: Path, key_extra: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        '[api]\nendpoint = "simulator"\n\n[[keys]]\nname = "demo"\ncredential_id = "demo-id"\n'
        'version = "3.1"\npartner_tags = { "www.amazon.com" = "demo-20" }\ntps = 100.0\n'
        f'{key_extra}\n[log]\nformat = "json"\n'
    )
    return path


def _asins(count: int, prefix: str) -> list[str]:
    return [f"{prefix}{i:0{10 - len(prefix)}d}" for i in range(count)]


def _drop(spool: Path, name: str, text: str) -> Path:
    """Write a job the way producers must: a dotfile first, then rename into inbox/."""
    inbox = spool / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / f".{name}").write_text(text)
    os.rename(inbox / f".{name}", inbox / name)
    return inbox / name


@contextlib.contextmanager
def _daemon(argv: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """A real ``broker serve`` process (stderr piped), killed if it is still running when
    the block ends."""
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def _until(check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    async with asyncio.timeout(timeout_s):
        # The file system has no event to wait on: poll it.
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def _replace_while_running(spool: Path, name: str, rows: int, text: str) -> None:
    """Drop job ``name`` of ``rows`` ASINs; once two rows are written, rename a file holding
    ``text`` over it in processing/, as a producer replacing it would."""
    _drop(spool, name, "\n".join(_asins(rows, "B0OLD")) + "\n")
    out = spool / "processing" / f"{name}.out.jsonl"
    await _until(lambda: out.exists() and len(out.read_text().splitlines()) >= 2)
    newer = spool / "processing" / f".{name}.new"
    newer.write_text(text)
    os.replace(newer, spool / "processing" / name)


async def _filed(spool: Path, name: str, where: str = "done") -> dict[str, Any]:
    status = spool / where / f"{name}.status.json"
    await _until(status.exists)
    result: dict[str, Any] = json.loads(status.read_text())
    return result


async def _get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, response.headers["Content-Type"], await response.text()


def _fail_opening(monkeypatch: pytest.MonkeyPatch, module: object, name: str, number: int) -> None:
    """Make ``module``'s ``open`` of any file called ``name`` fail with errno ``number``,
    naming the file (root opens every file, so taking the permission away would not do)."""
    real_open = open

    def opening(file: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(file).name == name:
            raise OSError(number, os.strerror(number), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(module, "open", opening, raising=False)


class _Unreadable(io.FileIO):
    """A file that opens but whose every read fails with EIO."""

    def __init__(self, path: Any) -> None:
        super().__init__(path, "rb")

    def readinto(self, buffer: Any) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))


def _samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value, checking that every sample's family has HELP and TYPE."""
    typed: set[str] = set()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            family = name.split("{")[0]
            assert (
                family.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
                in (typed)
                or family in typed
            ), line
            values[name] = float(value)
    return values


@dataclass
class _Running:
    daemon: Daemon
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.daemon.request_stop()
        await self.task

    @property
    def url(self) -> str:
        assert self.daemon.url is not None
        return self.daemon.url


Start = Callable[..., Awaitable[_Running]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """A factory of running daemons on a free port (stopped after the test)."""
    running: list[_Running] = []

    async def factory(config: BrokerConfig | None = None, **options: Any) -> _Running:
        settings = {
            "spool": tmp_path / "spool",
            "port": 0,
            "poll_s": 0.05,
            "progress": "none",
            "handle_signals": False,
            "settle_s": 0.0,
            **options,
        }
        clock = settings.pop("clock", None)
        daemon = Daemon(config or _config(), ServeOptions(**settings), clock=clock)
        task = asyncio.get_running_loop().create_task(daemon.run())
        started = asyncio.get_running_loop().create_task(daemon.started.wait())
        await asyncio.wait({task, started}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if task.done():
            task.result()
        handle = _Running(daemon, task)
        running.append(handle)
        return handle

    yield factory
    for handle in running:
        if not handle.task.done():
            await handle.stop()


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    """The spool directory the ``start`` fixture's daemons use."""
    return tmp_path / "spool"


class TestJobs:
    async def test_dropped_job_ends_in_done_with_rows_and_status(
        self, start: Start, spool: Path
    ) -> None:
        """A job dropped into inbox/ is filed in done/ with one row per input row and a status."""
        await start()
        ids = _asins(12, "B0DONE")
        _drop(spool, "job.txt", "\n".join([*ids, ids[0], "not-an-asin"]) + "\n")
        status = await _filed(spool, "job.txt")
        assert (spool / "done" / "job.txt").exists()
        rows = _rows(spool / "done" / "job.txt.out.jsonl")
        assert sorted(r["line"] for r in rows) == list(range(1, 15))
        assert status["outcome"] == "done"
        assert status["exit_code"] == ExitCode.OK
        assert status["rows"]["total"] == 14
        assert status["rows"]["invalid"] == 1
        assert status["rows"]["ok"] + status["rows"]["not_found"] == 13
        assert status["requests"] == 2  # 12 distinct ASINs, 10 per request
        assert status["throttled"] == 0
        assert status["resumed_rows"] == 0
        assert status["output"] == "job.txt.out.jsonl"
        assert status["invalid_report"] == "job.txt.out.jsonl.invalid.jsonl"
        assert datetime.strptime(status["finished_at"], "%Y-%m-%dT%H:%M:%SZ")
        assert os.listdir(spool / "processing") == []

    @pytest.mark.parametrize("relative", [False, True])
    async def test_a_latin1_job_is_failed_with_advice_the_daemon_can_follow(
        self, start: Start, spool: Path, monkeypatch: pytest.MonkeyPatch, relative: bool
    ) -> None:
        """A job that is not UTF-8 is filed in failed/ with a way to fix it that works for a
        spool (convert it; the daemon has no --encoding), naming the job, not processing/,
        whether the spool was given as an absolute or a relative path."""
        if relative:
            monkeypatch.chdir(spool.parent)
            await start(spool=Path(spool.name))
        else:
            await start()
        (spool / "inbox" / "old.txt").write_bytes("B0CAF\xc9S01\n".encode("latin-1"))
        status = await _filed(spool, "old.txt", "failed")
        assert "iconv" in status["error"]
        assert "processing" not in status["error"]
        assert status["error"].startswith("old.txt: ")

    async def test_a_job_changed_while_it_is_read_is_failed_with_spool_advice(
        self, start: Start, spool: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A job file that changes while the daemon reads it is filed in failed/ with what
        to do in a spool (move it back into inbox/), naming the job, never processing/ or
        the command line's --new-job."""
        from broker.jobs import runner

        monkeypatch.setattr(runner, "_INGEST_CHUNK", 100)
        read = runner._read

        def appended_midway(
            options: runner.JobOptions, stored_through_line: int = 0
        ) -> Iterator[Any]:
            for count, row in enumerate(read(options, stored_through_line)):
                if count == 150:  # a producer still writing
                    with options.job.open("a") as handle:
                        handle.write("B0LATEROW1\n")
                yield row

        monkeypatch.setattr(runner, "_read", appended_midway)
        await start()
        _drop(spool, "big.txt", "".join(f"B0{i:08d}\n" for i in range(300)))
        status = await _filed(spool, "big.txt", "failed")
        assert "changed while" in status["error"]
        assert "inbox/" in status["error"]
        assert "--new-job" not in status["error"]
        assert "processing" not in status["error"]

    async def test_bad_job_ends_in_failed_naming_the_error(self, start: Start, spool: Path) -> None:
        """A CSV without an asin column is filed in failed/ with a status naming the error."""
        await start()
        _drop(spool, "bad.csv", "sku,title\nx1,thing\n")
        status = await _filed(spool, "bad.csv", "failed")
        assert status["outcome"] == "failed"
        assert status["exit_code"] == ExitCode.DATA_ERROR
        assert "asin" in status["error"]
        assert (spool / "failed" / "bad.csv").exists()
        assert not (spool / "done" / "bad.csv").exists()
        assert os.listdir(spool / "processing") == []

    async def test_row_for_an_unconfigured_marketplace_fails_alone(
        self, start: Start, spool: Path
    ) -> None:
        """A row for a marketplace no key serves is failed (NoKeyForMarketplace); the rest go on."""
        await start()
        _drop(
            spool,
            "jp.jsonl",
            '{"asin": "B0JPJPJP01", "marketplace": "www.amazon.co.jp"}\n{"asin": "B0USUSUS01"}\n',
        )
        _drop(spool, "next.txt", "B0NEXTNX01\n")
        status = await _filed(spool, "jp.jsonl")
        assert status["exit_code"] == ExitCode.SOME_FAILED
        rows = {r["asin"]: r for r in _rows(spool / "done" / "jp.jsonl.out.jsonl")}
        assert rows["B0JPJPJP01"]["status"] == "failed"
        assert rows["B0JPJPJP01"]["error"]["code"] == "NoKeyForMarketplace"
        assert rows["B0USUSUS01"]["status"] == "ok"
        assert (await _filed(spool, "next.txt"))["rows"]["total"] == 1

    async def test_a_tag_rejected_in_one_marketplace_fails_that_job_alone(
        self, start: Start, spool: Path
    ) -> None:
        """The only key's UK tag is rejected (InvalidPartnerTag) while its US tag works: a
        job with UK rows is filed under failed/ saying why, and the daemon goes on with the
        next job. It stopped with 77 and, restarted, resumed the same job and stopped again,
        so no other job ever ran (a restart loop under compose)."""
        running = await start(_wrong_uk_tag())
        _drop(
            spool,
            "mixed.jsonl",
            '{"asin": "B0UKUKUK01", "marketplace": "www.amazon.co.uk"}\n{"asin": "B0USUSUS01"}\n',
        )
        _drop(spool, "next.txt", "B0NEXTNX01\n")
        failed = await _filed(spool, "mixed.jsonl", "failed")
        assert failed["exit_code"] == ExitCode.NO_PERMISSION
        assert "www.amazon.co.uk" in failed["error"]
        # What a daemon's user does: the job's rows went with the filing, so "rows stay
        # pending, run again" (broker run's advice) was not true here; and the daemon takes
        # the rejected key back only when it starts (moved back alone, the job failed again).
        assert "restart the daemon" in failed["error"]
        assert "move the job back into inbox/" in failed["error"]
        assert "stay pending" not in failed["error"]
        assert (await _filed(spool, "next.txt"))["rows"]["total"] == 1
        assert not running.task.done()

    async def test_a_job_filed_under_failed_keeps_the_rows_it_answered(
        self, start: Start, spool: Path
    ) -> None:
        """A job failed by one marketplace's rejected tag is filed with the output of the
        rows answered before (paid for: the other marketplaces' rows went on) and its rows
        by status; the output and the counts were thrown away with the work files."""
        running = await start(_wrong_uk_tag(missing_share=0.0))
        us_rows = "".join(f'{{"asin": "B0USUSUS{i:02d}"}}\n' for i in range(20))
        _drop(spool, "mixed.jsonl", '{"asin": "B0UKUKUK01", "marketplace": "UK"}\n' + us_rows)
        failed = await _filed(spool, "mixed.jsonl", "failed")
        assert failed["output"] == "mixed.jsonl.out.jsonl"
        rows = _rows(spool / "failed" / "mixed.jsonl.out.jsonl")
        assert sorted(row["line"] for row in rows) == list(range(2, 22))
        # Shaped as a done job's (every status named), with the rows left pending.
        assert failed["rows"] == {
            "total": 21,
            "ok": 20,
            "not_found": 0,
            "invalid": 0,
            "failed": 0,
            "pending": 1,
        }
        # And what it spent, as a done job's status says: the quota its paid rows took
        # (the UK one's refused request too) was recorded nowhere per job.
        assert failed["requests"] >= 2
        assert failed["throttled"] == 0
        assert failed["retries"] >= 0
        # Among the recent jobs of /metrics, as a done job is (named with its folder); the
        # row it left is unfinished (not pending: nothing works on it), so its progress
        # reads 20 of 21.
        samples = _samples((await _get(f"{running.url}/metrics"))[2])
        assert samples['asinb_job_rows{job_file="failed/mixed.jsonl",status="ok"}'] == 20
        assert samples['asinb_job_rows{job_file="failed/mixed.jsonl",status="unfinished"}'] == 1
        assert 'asinb_job_rows{job_file="failed/mixed.jsonl",status="pending"}' not in samples

    async def test_a_done_and_a_failed_job_of_one_name_each_keep_their_rows(
        self, start: Start, spool: Path
    ) -> None:
        """daily.txt filed under done/, then another daily.txt under failed/: /metrics shows
        both jobs' rows (they shared a label, and the done one's vanished), and the failed
        filing's log event carries its exit code."""
        running = await start(_wrong_uk_tag(missing_share=0.0))
        _drop(spool, "daily.jsonl", '{"asin": "B0USUSUS01"}\n{"asin": "B0USUSUS02"}\n')
        await _filed(spool, "daily.jsonl")
        with structlog.testing.capture_logs() as logs:
            _drop(spool, "daily.jsonl", '{"asin": "B0UKUKUK01", "marketplace": "UK"}\n')
            failed = await _filed(spool, "daily.jsonl", "failed")
        samples = _samples((await _get(f"{running.url}/metrics"))[2])
        assert samples['asinb_job_rows{job_file="daily.jsonl",status="ok"}'] == 2
        assert samples['asinb_job_rows{job_file="failed/daily.jsonl",status="unfinished"}'] == 1
        (event,) = [e for e in logs if e["event"] == "broker.job_filed"]
        assert (event["outcome"], event["exit_code"]) == ("failed", failed["exit_code"])
        assert event["exit_code"] == ExitCode.NO_PERMISSION

    async def test_rows_of_a_job_filed_under_failed_stay_counted(
        self, start: Start, spool: Path
    ) -> None:
        """The US row a job wrote before its UK tag was rejected is in asinb_rows_total
        (with the next job's): rows were counted from the ledger after the filing had
        deleted it, so those written since the last scrape were never counted."""
        running = await start(_wrong_uk_tag(missing_share=0.0))
        _drop(
            spool,
            "mixed.jsonl",
            '{"asin": "B0UKUKUK01", "marketplace": "www.amazon.co.uk"}\n{"asin": "B0USUSUS01"}\n',
        )
        _drop(spool, "next.txt", "B0NEXTNX01\n")
        await _filed(spool, "mixed.jsonl", "failed")
        await _filed(spool, "next.txt")
        samples = _samples((await _get(f"{running.url}/metrics"))[2])
        assert samples['asinb_rows_total{status="ok"}'] == 2

    def test_which_key_failures_stop_the_daemon(self) -> None:
        """A job's NoUsableKeyError stops the daemon when an outage had a part in it (a key
        lost to an unreachable token service beside one with a wrong tag: filing the job
        would file every later job of that marketplace too) or when every key is rejected;
        a rejected tag alone, with other keys working, files just that job."""
        from broker.engine.keys import OUTAGE_CODE
        from broker.errors import KeyUnusableError

        def snapshot(name: str, state: str) -> KeySnapshot:
            return KeySnapshot(name, state, 1.0, 1.0, 0, 0, 0, 0, 0, None, None)

        outage = KeyUnusableError("a", OUTAGE_CODE, "token service unreachable", "wait")
        rejected = KeyUnusableError("b", "InvalidPartnerTag", "wrong tag", "fix the tag")
        working = [snapshot("a", "disabled"), snapshot("b", "active")]
        uk = "www.amazon.co.uk"
        assert serve.stops_daemon(NoUsableKeyError(uk, [outage, rejected]), working)
        assert not serve.stops_daemon(NoUsableKeyError(uk, [rejected]), working)
        every = [snapshot("a", "disabled"), snapshot("b", "disabled")]
        assert serve.stops_daemon(NoUsableKeyError(uk, [rejected]), every)

    def test_a_daemon_stopped_for_an_outage_exits_so_as_to_be_restarted(self) -> None:
        """An outage in one marketplace and a rejected tag in another, one error: the daemon
        stops for the outage, and its exit is 69, which systemd restarts; it was 77
        (RestartPreventExitStatus), the daemon left down with the job claimed."""
        from broker.engine.keys import OUTAGE_CODE
        from broker.errors import KeyUnusableError
        from broker.jobs.runner import describe_failure

        outage = KeyUnusableError("a", OUTAGE_CODE, "token service unreachable", "wait")
        rejected = KeyUnusableError("b", "InvalidPartnerTag", "wrong tag", "fix the tag")
        both = NoUsableKeyError.of_many(
            [
                NoUsableKeyError("www.amazon.co.jp", [outage]),
                NoUsableKeyError("www.amazon.co.uk", [rejected]),
            ]
        )
        assert serve.stops_daemon(both, [])
        code, message = describe_failure(both)
        assert code == ExitCode.UNAVAILABLE
        assert "InvalidPartnerTag" in message

    async def test_files_present_at_start_are_picked_up(self, start: Start, spool: Path) -> None:
        """Jobs dropped while the daemon was down are processed; orphaned work files swept."""
        _drop(spool, "first.txt", "\n".join(_asins(3, "B0FRST")) + "\n")
        _drop(spool, "second.csv", "asin,sku\nB0SECOND01,a\nB0SECOND02,b\n")
        (spool / "processing").mkdir()
        orphan = spool / "processing" / "gone.txt.out.jsonl.ledger"
        orphan.write_bytes(b"")  # a crash between filing "gone.txt" and removing its ledger
        await start()
        assert (await _filed(spool, "first.txt"))["rows"]["total"] == 3
        assert (await _filed(spool, "second.csv"))["rows"]["total"] == 2
        extra = [r["extra"] for r in _rows(spool / "done" / "second.csv.out.jsonl")]
        assert sorted(e["sku"] for e in extra) == ["a", "b"]
        assert not orphan.exists()

    async def test_same_name_again_is_filed_beside_the_first(
        self, start: Start, spool: Path
    ) -> None:
        """A second job with a finished job's name gets its own files; nothing is overwritten."""
        await start()
        _drop(spool, "again.txt", "B0AGAIN001\n")
        await _filed(spool, "again.txt")
        _drop(spool, "again.txt", "B0AGAIN002\nB0AGAIN003\n")
        status = await _filed(spool, "again-2.txt")
        assert status["rows"]["total"] == 2
        assert len(_rows(spool / "done" / "again.txt.out.jsonl")) == 1
        assert len(_rows(spool / "done" / "again-2.txt.out.jsonl")) == 2

    async def test_a_reservation_a_killed_filing_left_is_dropped_at_start(
        self, start: Start, spool: Path
    ) -> None:
        """A name reservation a filing killed with SIGKILL left in done/ (its job since
        removed from processing/) is dropped at start: the next job of that name is filed
        under it, not as ``again-2.txt`` beside no ``again.txt``."""
        (spool / "done").mkdir(parents=True)
        left = spool / "done" / ".taking.again.txt"
        left.write_text("987654321")
        os.utime(left, (time.time() - 3600, time.time() - 3600))
        await start()
        _drop(spool, "again.txt", "B0AGAIN001\n")
        await _filed(spool, "again.txt")
        assert not left.exists()

    async def test_a_job_named_like_a_status_file_is_refused(
        self, start: Start, spool: Path
    ) -> None:
        """A job called r.txt.status.json is refused, so job r.txt's status never replaces it."""
        await start()
        _drop(spool, "r.txt.status.json", "B0STATUS01\n")
        reserved = await _filed(spool, "r.txt.status.json", "failed")
        assert "reserved" in reserved["error"]
        _drop(spool, "r.txt", "B0STATUS02\nB0STATUS03\n")
        status = await _filed(spool, "r.txt")
        assert status["rows"]["total"] == 2
        assert (spool / "failed" / "r.txt.status.json").read_text() == "B0STATUS01\n"
        _drop(spool, "orders.status.jsonl", '{"asin": "B0STATUS04"}\n')  # a fine name
        assert (await _filed(spool, "orders.status.jsonl"))["rows"]["total"] == 1

    async def test_a_failing_job_never_overwrites_a_refused_file_named_like_its_status(
        self, start: Start, spool: Path
    ) -> None:
        """A refused r.csv.status.json stays as it is in failed/ when job r.csv fails too: the
        failed job is filed as r-2.csv, its status beside it."""
        await start()
        _drop(spool, "r.csv.status.json", "B0STATUS01\n")
        await _filed(spool, "r.csv.status.json", "failed")
        _drop(spool, "r.csv", "sku,title\nx1,thing\n")  # no ASIN column: a data error
        status = await _filed(spool, "r-2.csv", "failed")
        assert "asin" in status["error"].lower()
        assert (spool / "failed" / "r.csv.status.json").read_text() == "B0STATUS01\n"
        assert (spool / "failed" / "r-2.csv").read_text() == "sku,title\nx1,thing\n"

    async def test_a_job_never_overwrites_an_output_left_in_done(
        self, start: Start, spool: Path
    ) -> None:
        """An output kept in done/ after its job file and status were deleted is not
        overwritten by a new job of that name: the new one is filed as r-2.txt."""
        await start()
        (spool / "done").mkdir(exist_ok=True)
        kept = spool / "done" / "r.txt.out.jsonl"
        kept.write_text('{"asin": "B0KEPT0001"}\n')
        _drop(spool, "r.txt", "B0KEPT0002\n")
        status = await _filed(spool, "r-2.txt")
        assert status["output"] == "r-2.txt.out.jsonl"
        assert kept.read_text() == '{"asin": "B0KEPT0001"}\n'

    async def test_dotfiles_tmp_symlinks_and_directories_are_ignored(
        self, start: Start, spool: Path
    ) -> None:
        """Only regular, finished job files are claimed (not a download's or an editor's file
        still being written: Emacs's #f.txt# and an office lock file ~$g.csv were run as
        jobs); reserved names are refused. A link
        or a directory left in inbox/ is said once (a warning), not passed over in silence."""
        inbox = spool / "inbox"
        inbox.mkdir(parents=True)
        (inbox / ".hidden.txt").write_text("B0HIDDEN01\n")
        (inbox / "writing.txt.tmp").write_text("B0WRITING1\n")
        partial = [
            "a.csv.part",
            "b.csv.partial",
            "c.csv.crdownload",
            "d.txt.swp",
            "e.txt~",
            "#f.txt#",
            "~$g.csv",
        ]
        for name in partial:
            (inbox / name).write_text("B0PARTIAL1\n")
        (inbox / "subdir").mkdir()
        (tmp := spool / "elsewhere.txt").write_text("B0ELSEWHR1\n")
        (inbox / "link.txt").symlink_to(tmp)
        _drop(spool, "x.out.jsonl", '{"asin": "B0RESERVD1"}\n')
        with structlog.testing.capture_logs() as logs:
            await start()
            _drop(spool, "real.txt", "B0REALJOB1\n")
            await _filed(spool, "real.txt")
            await asyncio.sleep(0.2)  # a few more polls of the inbox
        ignored = sorted(
            (e["entry"], e["kind"]) for e in logs if e["event"] == "broker.inbox_entry_ignored"
        )
        assert ignored == [("link.txt", "symbolic link"), ("subdir", "directory")]
        reserved = await _filed(spool, "x.out.jsonl", "failed")
        assert "reserved" in reserved["error"]
        assert sorted(os.listdir(inbox)) == sorted(
            [".hidden.txt", "link.txt", "subdir", "writing.txt.tmp", *partial]
        )
        assert sorted(os.listdir(spool / "done")) == [
            "real.txt",
            "real.txt.out.jsonl",
            "real.txt.status.json",
        ]


async def _stopped_mid_job(start: Start, spool: Path) -> BrokerConfig:
    """A daemon (its slow config returned) stopped with 3 or more of ``slow.txt``'s 25 rows
    done: the job is left in processing/, to be resumed."""
    slow = _config(tps=10.0, batch_size=1)
    first = await start(slow)
    _drop(spool, "slow.txt", "\n".join(_asins(25, "B0SLOW")) + "\n")
    out = spool / "processing" / "slow.txt.out.jsonl"
    await _until(lambda: out.exists() and len(out.read_text().splitlines()) >= 3)
    await first.stop()
    assert (spool / "processing" / "slow.txt").exists()
    return slow


class TestResume:
    async def test_job_left_in_processing_is_resumed_exactly_once(
        self, start: Start, spool: Path
    ) -> None:
        """A job stopped mid-way stays in processing/; the next daemon finishes it, no row twice."""
        slow = _config(tps=10.0, batch_size=1)
        first = await start(slow)
        _drop(spool, "slow.txt", "\n".join(_asins(25, "B0SLOW")) + "\n")
        out = spool / "processing" / "slow.txt.out.jsonl"
        await _until(lambda: out.exists() and len(out.read_text().splitlines()) >= 5)
        live = _samples((await _get(f"{first.url}/metrics"))[2])
        assert live['asinb_job_rows{job_file="slow.txt",status="pending"}'] > 0
        await first.stop()
        assert (spool / "processing" / "slow.txt").exists()
        partial = len(_rows(out))
        assert 5 <= partial < 25
        await start(_config(tps=100.0, batch_size=1))
        status = await _filed(spool, "slow.txt")
        rows = _rows(spool / "done" / "slow.txt.out.jsonl")
        assert sorted(r["line"] for r in rows) == list(range(1, 26))
        assert status["rows"]["total"] == 25
        assert status["requests"] <= 25 - partial + 4  # only what was not done (+ in flight)
        # The counts are the finishing run's, and the status says what earlier runs did.
        assert partial <= status["resumed_rows"] < 25
        assert os.listdir(spool / "processing") == []

    async def test_a_job_whose_ledger_another_program_holds_stays_in_processing(
        self, start: Start, spool: Path
    ) -> None:
        """A job resumed while another program holds its ledger in a transaction (a sqlite3
        shell's BEGIN EXCLUSIVE) stops the daemon with the held-file error (exit 74), the
        job and its ledger kept in processing/; the next start finishes it. It was filed
        under failed/ (65, "cannot be read as a job ledger"), its ledger and rows deleted."""
        slow = await _stopped_mid_job(start, spool)
        ledger = spool / "processing" / "slow.txt.out.jsonl.ledger"
        holder = sqlite3.connect(ledger, isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            running = await start(slow)
            with pytest.raises(OSError, match="held by another program") as caught:
                await asyncio.wait_for(running.task, 30)
        finally:
            holder.close()
        assert caught.value.errno == errno.EBUSY
        assert (spool / "processing" / "slow.txt").exists()
        assert ledger.exists()
        assert not any((spool / "failed").iterdir())
        await start(slow)
        status = await _filed(spool, "slow.txt")
        assert status["rows"]["total"] == 25

    async def test_a_job_file_changed_while_the_daemon_was_down_gets_the_spools_advice(
        self, start: Start, spool: Path
    ) -> None:
        """A job file that grew between a stop and the next start (a producer writing it in
        place) is filed in failed/ with the spool's advice, as one that changes while it
        runs: move it back into inbox/. It got broker run's ("run with --new-job ...,
        --refresh ..., or restore the original to resume"), none of which a daemon has."""
        slow = await _stopped_mid_job(start, spool)
        job = spool / "processing" / "slow.txt"
        job.write_text(job.read_text() + "\n".join(_asins(5, "B0MORE")) + "\n")
        await start(slow)
        status = await _filed(spool, "slow.txt", "failed")
        assert status["exit_code"] == ExitCode.DATA_ERROR
        assert "move the job back into inbox/" in status["error"]
        assert "--new-job" not in status["error"]
        assert "--refresh" not in status["error"]

    async def test_a_job_stopped_under_other_settings_starts_over_under_the_new(
        self, start: Start, spool: Path
    ) -> None:
        """The config's resources changed between a stop and the next start: the job left in
        processing/ starts over under the new settings and ends in done/ with every row.
        It was filed in failed/ (its finished rows deleted) with advice a daemon cannot
        follow ("restore the setting", "--new-job")."""
        slow = await _stopped_mid_job(start, spool)
        changed = dataclasses.replace(
            slow, api=dataclasses.replace(slow.api, resources=("itemInfo.title",))
        )
        with structlog.testing.capture_logs() as logs:
            second = await start(changed)
            status = await _filed(spool, "slow.txt")
        assert status["rows"]["total"] == 25
        # Every row was written again by this daemon, and counted so (the first run's rows
        # were subtracted as if resumed: 14 of 25).
        written = _samples((await _get(f"{second.url}/metrics"))[2])
        assert sum(v for k, v in written.items() if k.startswith("asinb_rows_total")) == 25
        rows = _rows(spool / "done" / "slow.txt.out.jsonl")
        assert sorted(r["line"] for r in rows) == list(range(1, 26))
        (restarted,) = [e for e in logs if e["event"] == "broker.job_restarted"]
        assert restarted["job"] == "slow.txt"
        assert restarted["setting"] == "api.resources"
        assert "--new-job" not in str(restarted)  # no advice a daemon cannot follow
        assert not (spool / "failed").exists() or os.listdir(spool / "failed") == []

    async def test_a_dead_siblings_job_is_taken_over(
        self, start: Start, spool: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A job left in processing/ while this daemon runs (its replica was killed) is
        resumed once no daemon holds its claim; while a live daemon holds it (from its claim
        to its filing), it is left alone."""
        monkeypatch.setattr(serve, "_ORPHAN_CHECK_S", 0.05)
        await start()
        (spool / "processing").mkdir(parents=True, exist_ok=True)
        orphan = spool / "processing" / "orphan.txt"
        orphan.write_text("\n".join(_asins(5, "B0ORPH")) + "\n")
        held = Spool(spool).job("orphan.txt", "jsonl").claim_lock().acquire()
        await asyncio.sleep(0.5)
        assert orphan.exists()  # a live sibling holds it: not ours
        assert not (spool / "done" / "orphan.txt").exists()
        held.close()  # the sibling dies: the kernel drops its lock
        status = await _filed(spool, "orphan.txt")
        assert status["rows"]["total"] == 5
        assert os.listdir(spool / "processing") == []

    async def test_a_job_is_taken_over_only_if_unheld_at_two_looks(self, tmp_path: Path) -> None:
        """A sibling that claimed a job a moment ago and takes its claim lock in between
        two looks keeps it: only a job no daemon held at two looks in a row is taken."""
        clock = FakeClock()
        daemon = Daemon(_config(), ServeOptions(spool=tmp_path), clock=clock)
        daemon.spool.prepare()
        (tmp_path / "processing" / "fresh.txt").write_text("B000000001\n")
        claim = daemon.spool.job("fresh.txt", "jsonl").claim_lock()
        looks = []
        for held in (False, True, False, False):
            if held:
                claim.acquire()
            looks.append(daemon._orphan())
            claim.close()
            await clock.advance(serve._ORPHAN_CHECK_S)
        assert looks == [None, None, None, "fresh.txt"]

    @pytest.mark.parametrize("format_", ["jsonl", "csv"])
    async def test_a_job_whose_run_holds_its_ledger_is_never_taken_for_a_dead_ones(
        self, tmp_path: Path, format_: str
    ) -> None:
        """A job being run without a claim lock (by a daemon of an older version in a
        rolling upgrade, whatever output format it writes) holds its ledger's lock: it is
        left alone, with no "daemon that died" warning, and taken over only once that run
        is gone."""
        clock = FakeClock()
        daemon = Daemon(_config(), ServeOptions(spool=tmp_path), clock=clock)
        daemon.spool.prepare()
        (tmp_path / "processing" / "old.txt").write_text("B000000001\n")
        running = JobLock(daemon.spool.job("old.txt", format_).ledger).acquire()
        looks = []
        with structlog.testing.capture_logs() as logs:
            for _ in range(3):
                looks.append(daemon._orphan())
                await clock.advance(serve._ORPHAN_CHECK_S)
            # Its claim lock file, left by those looks, does not hold new jobs back.
            assert not daemon._looks_dead()
            running.close()
            for _ in range(2):
                looks.append(daemon._orphan())
                await clock.advance(serve._ORPHAN_CHECK_S)
        assert looks == [None, None, None, None, "old.txt"]
        assert [e["event"] for e in logs].count("broker.job_resumed") == 1

    async def test_a_dead_siblings_job_goes_before_new_jobs(self, tmp_path: Path) -> None:
        """Jobs a dead sibling left wait only for their second look, not for the run of a
        new job from inbox/: while one waits for that look, or was seen unheld twice and
        waits its turn, nothing new is claimed."""
        clock = FakeClock()
        daemon = Daemon(_config(), ServeOptions(spool=tmp_path, settle_s=0), clock=clock)
        daemon.spool.prepare()
        (tmp_path / "processing" / "orphan.txt").write_text("B000000001\n")
        (tmp_path / "processing" / "orphan2.txt").write_text("B000000003\n")
        (tmp_path / "inbox" / "new.txt").write_text("B000000002\n")
        broker = cast("Broker", None)  # nothing is deferred: the broker is not asked
        picks = [daemon._next_job(broker)]
        await clock.advance(serve._ORPHAN_CHECK_S)
        picks.append(daemon._next_job(broker))
        (tmp_path / "processing" / "orphan.txt").unlink()  # run and filed meanwhile
        await clock.advance(serve._ORPHAN_CHECK_S)
        picks.append(daemon._next_job(broker))
        (tmp_path / "processing" / "orphan2.txt").unlink()
        picks.append(daemon._next_job(broker))
        assert picks == [None, "orphan.txt", "orphan2.txt", "new.txt"]

    async def test_a_sibling_dying_between_looks_still_goes_before_new_jobs(
        self, tmp_path: Path
    ) -> None:
        """A sibling that dies after a look found its job held: a new job arriving before
        the next look waits for the dead one's takeover, instead of being claimed first and
        holding the takeover back for the whole of its run (48 s in a hunt's run, against
        the README's "within about 20 s ... and before any new job")."""
        clock = FakeClock()
        daemon = Daemon(_config(), ServeOptions(spool=tmp_path, settle_s=0), clock=clock)
        daemon.spool.prepare()
        (tmp_path / "processing" / "busy.txt").write_text("B000000001\n")
        sibling = daemon.spool.job("busy.txt", "jsonl").claim_lock().acquire()
        broker = cast("Broker", None)  # nothing is deferred: the broker is not asked
        picks = [daemon._next_job(broker)]  # the sibling runs its job: nothing to do
        sibling.close()  # killed: the kernel drops its lock, its lock file stays
        (tmp_path / "inbox" / "new.txt").write_text("B000000002\n")
        picks.append(daemon._next_job(broker))  # before the next look is due
        for _ in range(2):
            await clock.advance(serve._ORPHAN_CHECK_S)
            picks.append(daemon._next_job(broker))
        assert picks == [None, None, None, "busy.txt"]
        assert (tmp_path / "inbox" / "new.txt").exists()

    def test_a_new_job_never_resumes_an_old_namesakes_work_files(self, tmp_path: Path) -> None:
        """Work files left in processing/ under a name (a daemon killed while filing that
        job) are dropped when a new job of that name is claimed: the new job was resumed
        from them, its output the old job's rows with no request sent."""
        daemon = Daemon(_config(), ServeOptions(spool=tmp_path, settle_s=0), clock=FakeClock())
        daemon.spool.prepare()
        old = daemon.spool.job("x.txt", "jsonl")
        for path in (old.ledger, old.out, old.invalid_report):
            path.write_text("old\n")
        (tmp_path / "processing" / "y.txt").write_text("B000000009\n")
        kept = daemon.spool.job("y.txt", "jsonl").ledger
        kept.write_text("another job's\n")
        (tmp_path / "inbox" / "x.txt").write_text("B000000001\n")
        assert daemon._claim_next() == "x.txt"
        assert not old.ledger.exists()
        assert not old.out.exists()
        assert not old.invalid_report.exists()
        assert kept.exists()

    async def test_a_deferred_job_deleted_while_it_waits_leaves_no_work_files(
        self, tmp_path: Path
    ) -> None:
        """A job deferred for the daily quota and deleted from processing/ meanwhile (to
        cancel it) has its work files dropped with it, as a running job's are, and is
        forgotten: the next poll says nothing more of it."""
        clock, daemon, job = _job_in_processing(tmp_path, "B000000001\n")
        for path in (job.ledger, job.out):
            path.write_text("old\n")
        claim = job.claim_lock().acquire()
        daemon._deferred["a.txt"] = serve._Deferral(clock.utcnow(), frozenset(), claim)
        job.path.unlink()
        with structlog.testing.capture_logs() as logs:
            assert daemon._next_job(cast("Broker", None)) is None
        assert not job.ledger.exists()
        assert not job.out.exists()
        assert not job.claim_lock().lock_path.exists()
        assert [e["event"] for e in logs] == ["broker.job_vanished"]
        assert "a.txt" not in daemon._deferred
        with structlog.testing.capture_logs() as later:
            assert daemon._next_job(cast("Broker", None)) is None
        assert [e["event"] for e in later] == []

    async def test_a_deferred_job_replaced_while_it_waits_is_dropped_for_the_new_file(
        self, tmp_path: Path
    ) -> None:
        """A job deferred for the daily quota with another list renamed over it in
        processing/ is dropped with its work files, as a running job replaced so is, and
        the new file is left to be claimed as a job of its own: it resumed the old job on
        the new file, which failed it as "shrank" (65) and never ran the new list."""
        clock, daemon, job = _job_in_processing(tmp_path, "B000000001\nB000000002\n")
        job.ledger.write_text("old\n")
        ran = job.path.stat()
        claim = job.claim_lock().acquire()
        daemon._deferred["a.txt"] = serve._Deferral(
            clock.utcnow(), frozenset(), claim, file_id=(ran.st_dev, ran.st_ino)
        )
        newer = tmp_path / "newer.txt"
        newer.write_text("B000000003\n")
        newer.replace(job.path)
        with structlog.testing.capture_logs() as logs:
            assert daemon._due_deferred(cast("Broker", None)) is None
        assert [e["event"] for e in logs] == ["broker.job_vanished"]
        assert "a.txt" not in daemon._deferred
        assert not job.ledger.exists()
        assert job.path.read_text() == "B000000003\n"  # left for a claim of its own
        assert not job.claim_lock().lock_path.exists()

    async def test_a_new_namesake_of_a_deleted_deferred_job_runs_afresh(
        self, tmp_path: Path
    ) -> None:
        """A job deferred until tomorrow's reset and deleted (to cancel it), then a new job
        of that name: the new one is claimed with a claim lock of its own and no deferral,
        and the old one's work files are gone at the next poll. It ran under the old
        deferral: its status carried the old job's requests, and under the old, unlinked
        claim lock a sibling daemon took it for a dead one's."""
        clock, daemon, job = _job_in_processing(tmp_path, "B000000001\n")
        job.ledger.write_text("old\n")
        claim = job.claim_lock().acquire()
        until = clock.utcnow() + timedelta(hours=10)
        daemon._deferred["a.txt"] = serve._Deferral(until, frozenset(), claim)
        job.path.unlink()
        (tmp_path / "inbox" / "a.txt").write_text("B000000002\n")
        with structlog.testing.capture_logs() as logs:
            assert daemon._next_job(cast("Broker", None)) == "a.txt"
        assert "a.txt" not in daemon._deferred
        assert [e["event"] for e in logs] == ["broker.job_vanished", "broker.job_claimed"]
        assert not job.ledger.exists()
        assert job.path.read_text() == "B000000002\n"

    async def test_a_backlog_is_claimed_oldest_first_from_one_listing(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A backlog of waiting jobs is claimed oldest first from one listing of inbox/
        (only the job about to be claimed is looked at again), and the listing is taken
        anew once ``poll_s`` has passed: every claim listed and stat-ed every waiting job,
        so a daemon filing one-ASIN jobs went from 86 to 59 jobs/s with 2,000 waiting."""
        clock = FakeClock()
        daemon = Daemon(_config(), ServeOptions(spool=tmp_path, settle_s=0), clock=clock)
        daemon.spool.prepare()
        inbox = tmp_path / "inbox"
        for n in range(50):
            path = inbox / f"j{n:02}.txt"
            path.write_text("B000000001\n")
            os.utime(path, ns=(n * 10**9, n * 10**9))
        listings = []
        real = Spool.waiting_entries

        def counted(spool: Spool, *args: Any) -> list[tuple[str, os.stat_result]]:
            listings.append(1)
            return real(spool, *args)

        monkeypatch.setattr(Spool, "waiting_entries", counted)
        claimed = [daemon._claim_next() for _ in range(10)]
        assert claimed == [f"j{n:02}.txt" for n in range(10)]
        assert len(listings) == 1
        (inbox / "j11.txt").unlink()  # taken away meanwhile: skipped
        (inbox / "old.txt").write_text("B000000002\n")
        os.utime(inbox / "old.txt", ns=(0, 0))
        assert daemon._claim_next() == "j10.txt"  # seen at the next listing only
        await clock.advance(1.0)
        assert [daemon._claim_next() for _ in range(2)] == ["old.txt", "j12.txt"]
        assert len(listings) == 2

    def test_an_inbox_unreadable_while_a_listing_is_gone_through_is_polled_on(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """inbox/ turns unreadable after a listing was taken (a chmod, an ACL): the next
        claim's look at its job says so once and polls on, and the job is claimed once the
        inbox reads again. The PermissionError of that look ended the daemon."""
        daemon = Daemon(_config(), ServeOptions(spool=tmp_path, settle_s=0), clock=FakeClock())
        daemon.spool.prepare()
        for n in range(3):
            path = tmp_path / "inbox" / f"j{n}.txt"
            path.write_text("B000000001\n")
            os.utime(path, ns=(n * 10**9, n * 10**9))
        assert daemon._claim_next() == "j0.txt"
        real = os.stat

        def unreadable(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            if Path(path).parent == tmp_path / "inbox":
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path, *args, **kwargs)

        with structlog.testing.capture_logs() as logs:
            monkeypatch.setattr(serve.os, "stat", unreadable)
            assert daemon._claim_next() is None
            monkeypatch.undo()
        assert [e["event"] for e in logs] == ["broker.inbox_unreadable"]
        assert daemon._claim_next() == "j1.txt"

    async def test_a_job_that_grew_under_the_same_mtime_is_not_settled(
        self, tmp_path: Path
    ) -> None:
        """A job file whose size changed while its mtime stayed the same (a coarse mtime, or
        one set back) is still being written: it is not claimed on that poll."""
        clock = FakeClock()
        daemon = Daemon(_config(), ServeOptions(spool=tmp_path, settle_s=30), clock=clock)
        daemon.spool.prepare()
        path = tmp_path / "inbox" / "j.txt"
        path.write_text("B000000001\n")
        mtime_ns = path.stat().st_mtime_ns
        assert daemon._claim_next() is None  # just written: first seen
        await clock.advance(30)
        with path.open("a") as stream:
            stream.write("B000000002\n")
        os.utime(path, ns=(mtime_ns, mtime_ns))
        assert daemon._claim_next() is None  # grew: seen anew
        await clock.advance(30)
        assert daemon._claim_next() == "j.txt"

    async def test_no_new_job_is_claimed_while_deferred_jobs_fill_the_open_files(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Each deferred job holds one open file until it resumes: at the cap (half the
        process's open-file limit) no new job is claimed, so the daemon never runs out of
        files (it exited 74, and again at each restart), nor takes up a job left in
        processing/, and says so once."""
        monkeypatch.setattr(serve, "_deferral_cap", lambda: 2)
        clock = FakeClock()
        daemon = Daemon(_config(), ServeOptions(spool=tmp_path, settle_s=0), clock=clock)
        daemon.spool.prepare()
        (tmp_path / "inbox" / "new.txt").write_text("B000000002\n")
        (tmp_path / "processing" / "left.txt").write_text("B000000003\n")  # no daemon's
        later = clock.utcnow() + timedelta(hours=1)
        for name in ("a.txt", "b.txt"):
            (tmp_path / "processing" / name).write_text("B000000004\n")
            daemon._deferred[name] = serve._Deferral(later, frozenset())
        broker = cast("Broker", None)  # nothing deferred is due: the broker is not asked
        with structlog.testing.capture_logs() as logs:
            for _ in range(3):
                assert daemon._next_job(broker) is None
                await clock.advance(serve._ORPHAN_CHECK_S)
        assert [e["event"] for e in logs] == ["broker.deferred_jobs_at_cap"]
        del daemon._deferred["b.txt"]  # resumed and filed
        (tmp_path / "processing" / "b.txt").unlink()
        picks = [daemon._next_job(broker)]
        await clock.advance(serve._ORPHAN_CHECK_S)
        picks.append(daemon._next_job(broker))
        for path in daemon.spool.job("left.txt", "jsonl").work_files():
            path.unlink(missing_ok=True)  # run and filed meanwhile
        (tmp_path / "processing" / "left.txt").unlink()
        picks.append(daemon._next_job(broker))
        assert picks == [None, "left.txt", "new.txt"]

    def test_an_older_brokers_daily_counts_in_the_spool_are_named(self, tmp_path: Path) -> None:
        """A spool an older broker ran (its daily counts in state/budget.sqlite, before the
        keys' shared state) gets a warning naming the file and today's counts: they were
        ignored without a word, and a key near its TPD got a whole new day."""
        tmp_path = tmp_path / "a spool #1?"  # read as a URI: percent-encoded
        daemon = Daemon(_config(), ServeOptions(spool=tmp_path), clock=FakeClock())
        daemon.spool.prepare()
        (tmp_path / "state").mkdir()
        today = daemon._clock.utcnow().date().isoformat()
        with contextlib.closing(sqlite3.connect(tmp_path / "state" / "budget.sqlite")) as conn:
            conn.execute("CREATE TABLE budget (key_name TEXT, day TEXT, count INTEGER)")
            conn.execute(
                "INSERT INTO budget VALUES ('demo', ?, 13), ('demo', '2000-01-01', 9)", (today,)
            )
            conn.commit()
        with structlog.testing.capture_logs() as logs:
            daemon._name_old_budget()
        (event,) = [e for e in logs if e["event"] == "broker.old_daily_counts_ignored"]
        assert event["path"] == str(tmp_path / "state" / "budget.sqlite")
        assert event["today"] == {"demo": 13}

    async def test_daily_count_is_the_keys_shared_state(self, start: Start, spool: Path) -> None:
        """The daemon counts requests in the shared key state, not a spool file of its own."""
        running = await start()
        _drop(spool, "a.txt", "\n".join(_asins(20, "B0BUDGA")) + "\n")
        assert (await _filed(spool, "a.txt"))["requests"] == 2
        spent = 'asinb_key_daily_spent{key="demo"}'
        assert _samples((await _get(f"{running.url}/metrics"))[2])[spent] == 2
        _drop(spool, "b.txt", "\n".join(_asins(5, "B0BUDGB")) + "\n")
        await _filed(spool, "b.txt")
        assert _samples((await _get(f"{running.url}/metrics"))[2])[spent] == 3
        assert not (spool / "state").exists()  # nothing of the keys' state lives in the spool


class TestItemCache:
    async def test_second_job_is_answered_from_the_cache(self, start: Start, spool: Path) -> None:
        """The daemon caches ok answers: the same ASINs again are served from it (and counted)."""
        running = await start()
        _drop(spool, "one.txt", "\n".join(_asins(20, "B0CACHE")) + "\n")
        assert (await _filed(spool, "one.txt"))["requests"] == 2
        ok = {r["asin"] for r in _rows(spool / "done" / "one.txt.out.jsonl") if r["status"] == "ok"}
        _drop(spool, "two.txt", "\n".join(_asins(20, "B0CACHE")) + "\n")
        second = await _filed(spool, "two.txt")
        rows = _rows(spool / "done" / "two.txt.out.jsonl")
        assert {r["asin"] for r in rows if r["cached"]} == ok  # not_found is asked again
        assert second["from_cache"] == len(ok)
        values = _samples((await _get(f"{running.url}/metrics"))[2])
        assert values["asinb_cache_hits_total"] == len(ok)

    async def test_a_broker_closing_as_the_daemon_stops_is_no_cache_failure(
        self, start: Start
    ) -> None:
        """While the daemon's broker closes (its stop, /metrics still answering), a scrape
        shows no cache figures and logs nothing: it showed asinb_cache_up 0 and warned
        metrics.cache_unreadable at every stop."""
        from broker.errors import BrokerClosedError

        running = await start()
        await _until(lambda: running.daemon._broker is not None)

        real = running.daemon._broker

        class _Closing:
            def metrics(self) -> Any:
                return real.metrics()

            async def cache_stats(self) -> None:
                raise BrokerClosedError("the broker is closed")

        running.daemon._broker = cast("Any", _Closing())
        try:
            with structlog.testing.capture_logs() as logs:
                values = _samples((await _get(f"{running.url}/metrics"))[2])
        finally:
            running.daemon._broker = real
        assert "asinb_cache_up" not in values
        assert [e for e in logs if e["event"] == "metrics.cache_unreadable"] == []


class _FlakyCacheSource:
    """A StatusSource whose item cache store fails until ``healed``."""

    def __init__(self) -> None:
        self.healed = False

    def engine_metrics(self) -> None:
        return None

    def spool_snapshot(self) -> SpoolSnapshot:
        return SpoolSnapshot(state="running", jobs_done=2)

    async def cache_stats(self) -> CacheStats:
        if not self.healed:
            raise sqlite3.DatabaseError("file is not a database")
        return CacheStats(hits=3, misses=1, requests_saved=0, entries=3, bytes=900, evictions=0)


class TestHttp:
    async def test_metrics_survive_an_unreadable_cache_store(self) -> None:
        """A cache store that fails gives asinb_cache_up 0 and the other metrics, not a 500."""
        source = _FlakyCacheSource()
        async with MetricsServer(source, host="127.0.0.1", port=0) as server:
            status, _, text = await _get(f"{server.url}/metrics")
            assert status == 200
            values = _samples(text)
            assert values["asinb_cache_up"] == 0
            assert values['asinb_jobs_total{outcome="done"}'] == 2
            assert "asinb_cache_entries" not in values
            source.healed = True
            values = _samples((await _get(f"{server.url}/metrics"))[2])
            assert values["asinb_cache_up"] == 1
            assert values["asinb_cache_entries"] == 3

    async def test_an_unreadable_inbox_leaves_metrics_served(
        self, start: Start, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With inbox/ unreadable (EACCES: a chmod, an NFS or ACL problem), /metrics still
        answers 200 without the inbox count, and says why once in the log; every scrape
        was a 500 that fired AsinBrokerDown for a daemon busy with its job."""
        running = await start()

        def unreadable(self: Spool, *args: object) -> int:
            raise PermissionError(errno.EACCES, "Permission denied", str(self.inbox))

        # Both readers of inbox/ fail, as they would: with the daemon's own listing still
        # reading it, each listing between two scrapes said the inbox was readable again.
        monkeypatch.setattr(Spool, "waiting_count", unreadable)
        monkeypatch.setattr(Spool, "waiting_entries", unreadable)
        with structlog.testing.capture_logs() as logs:
            for _ in range(2):
                code, _, text = await _get(f"{running.url}/metrics")
                assert code == 200
                assert "asinb_inbox_jobs" not in text
                assert "asinb_jobs_total" in text
            assert (await _get(f"{running.url}/readyz"))[0] == 200
        warned = [e for e in logs if e["event"] == "broker.inbox_unreadable"]
        assert len(warned) == 1
        assert "Permission denied" in warned[0]["error"]
        monkeypatch.undo()
        values = _samples((await _get(f"{running.url}/metrics"))[2])
        assert values["asinb_inbox_jobs"] == 0

    async def test_an_unreadable_inbox_keeps_the_daemon_polling(
        self, start: Start, spool: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """inbox/ unreadable while the daemon looks for work: it says so once and polls on,
        and takes the job once the inbox reads again. It exited 74 ("cannot write") at its
        next poll, and under systemd gave up after five restarts."""
        running = await start()

        def unreadable(self: Spool, skipped: dict[str, str]) -> list[Any]:
            raise PermissionError(errno.EACCES, "Permission denied", str(self.inbox))

        with structlog.testing.capture_logs() as logs:
            monkeypatch.setattr(Spool, "waiting_entries", unreadable)
            await asyncio.sleep(0.3)  # several polls
            assert not running.task.done()
            monkeypatch.undo()
            _drop(spool, "later.txt", "B0LATER001\n")
            await _filed(spool, "later.txt")
        warned = [e for e in logs if e["event"] == "broker.inbox_unreadable"]
        assert len(warned) == 1

    async def test_healthz_readyz_and_metrics_answer(self, start: Start, spool: Path) -> None:
        """/healthz and /readyz say 200; /metrics is Prometheus text with the documented names."""
        running = await start()
        _drop(spool, "m.txt", "\n".join(_asins(4, "B0METRIC")) + "\nbad-id\n")
        await _filed(spool, "m.txt")
        _drop(spool, "m.csv", "no_asin_here\nx\n")
        await _filed(spool, "m.csv", "failed")
        assert (await _get(f"{running.url}/healthz"))[0] == 200
        code, _, body = await _get(f"{running.url}/readyz")
        assert (code, json.loads(body)) == (200, {"ready": True})
        code, content_type, text = await _get(f"{running.url}/metrics")
        assert code == 200
        assert content_type.startswith("text/plain; version=0.0.4")
        values = _samples(text)
        assert values['asinb_jobs_total{outcome="done"}'] == 1
        assert values['asinb_jobs_total{outcome="failed"}'] == 1
        assert values['asinb_rows_total{status="invalid"}'] == 1
        assert values['asinb_job_rows{job_file="m.txt",status="invalid"}'] == 1
        assert values['asinb_requests_total{status="200"}'] == 1
        assert values["asinb_throttled_total"] == 0
        assert values["asinb_retries_total"] == 0
        assert values["asinb_transport_errors_total"] == 0
        assert values['asinb_request_duration_seconds_bucket{le="+Inf"}'] == 1
        assert values["asinb_request_duration_seconds_count"] == 1
        assert values['asinb_key_configured_tps{key="demo"}'] == 100.0
        assert values['asinb_key_rate_per_second{key="demo"}'] > 0
        assert values['asinb_key_daily_limit{key="demo"}'] == 100_000
        assert values['asinb_key_state{key="demo",state="active"}'] == 1
        assert values["asinb_queued_batches"] == 0
        assert values["asinb_outstanding_lookups"] == 0
        assert values["asinb_inflight_requests"] == 0
        assert values["asinb_inbox_jobs"] == 0

    async def test_inbox_gauge_counts_jobs_waiting_behind_the_running_one(
        self, start: Start, spool: Path
    ) -> None:
        """asinb_inbox_jobs counts the jobs waiting in inbox/ while a long job runs (the inbox
        is scanned only between jobs, so it read 0 for the whole job)."""
        running = await start(_config(tps=10.0, batch_size=1))
        _drop(spool, "long.txt", "\n".join(_asins(200, "B0LONG")) + "\n")
        out = spool / "processing" / "long.txt.out.jsonl"
        await _until(lambda: out.exists() and len(out.read_text().splitlines()) >= 1)
        for n in range(3):
            _drop(spool, f"wait{n}.txt", "B0WAITJOB1\n")
        (spool / "inbox" / ".still-writing").write_text("B0WAITJOB2\n")
        values = _samples((await _get(f"{running.url}/metrics"))[2])
        assert values["asinb_inbox_jobs"] == 3

    async def test_readyz_503_while_waiting_for_daily_quota(
        self, start: Start, spool: Path
    ) -> None:
        """With the day's budget spent, /readyz is 503 and says until when."""
        running = await start(_config(tpd=3))
        _drop(spool, "big.txt", "\n".join(_asins(60, "B0READY")) + "\n")
        deadline = asyncio.get_running_loop().time() + 20
        while (await _get(f"{running.url}/readyz"))[0] == 200:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        code, _, body = await _get(f"{running.url}/readyz")
        answer = json.loads(body)
        assert code == 503
        assert answer["ready"] is False
        assert answer["reason"] == f"waiting for daily quota until {answer['until']}"
        until = datetime.strptime(answer["until"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert until > datetime.now(UTC)
        assert (await _get(f"{running.url}/healthz"))[0] == 200

    async def test_a_deferred_job_stays_its_daemons(
        self, start: Start, spool: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Under no_wait with two replicas, a job one daemon deferred for the daily quota is
        not taken over by the other, at its start or by its orphan check: the deferring
        daemon holds its claim. The other ran it as one a dead daemon left, deferred it too,
        and the stack counted one job twice in asinb_deferred_jobs."""
        from broker.jobs import serve

        monkeypatch.setattr(serve, "_ORPHAN_CHECK_S", 0.05)
        first = await start(_config(tpd=3), no_wait=True)
        _drop(spool, "d.txt", "\n".join(_asins(60, "B0DEFER")) + "\n")
        await _until(lambda: "d.txt" in first.daemon._deferred)
        with structlog.testing.capture_logs() as logs:
            second = await start(_config(tpd=3), no_wait=True)
            await asyncio.sleep(0.5)  # its start, then several orphan checks
        assert [e for e in logs if e["event"] == "broker.job_resumed"] == []
        values = _samples((await _get(f"{second.url}/metrics"))[2])
        assert values["asinb_deferred_jobs"] == 0
        values = _samples((await _get(f"{first.url}/metrics"))[2])
        assert values["asinb_deferred_jobs"] == 1

    async def test_a_deferred_job_due_by_a_clock_ahead_of_the_stores_waits_for_its_keys(
        self, start: Start, spool: Path
    ) -> None:
        """A deferred job whose reset has come by this machine's clock while its keys still
        wait (the reset is the key-state store's, and Redis's clock is behind) is not run:
        it waits for its keys. It was resumed and deferred again at every poll, eleven
        times in six seconds."""
        running = await start(_config(tpd=3), no_wait=True)
        _drop(spool, "d.txt", "\n".join(_asins(60, "B0AHEAD")) + "\n")
        await _until(lambda: "d.txt" in running.daemon._deferred)
        assert running.daemon._deferred["d.txt"].keys == {"demo"}
        with structlog.testing.capture_logs() as logs:
            running.daemon._deferred["d.txt"].until = datetime.now(UTC) - timedelta(seconds=1)
            await asyncio.sleep(0.5)  # several polls
        assert [e["event"] for e in logs if e.get("job") == "d.txt"] == []
        assert "d.txt" in running.daemon._deferred
        assert (spool / "processing" / "d.txt").exists()

    async def test_a_deferred_job_goes_on_when_its_keys_do_by_a_clock_behind_the_stores(
        self, start: Start, spool: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A deferred job whose keys no longer wait (the store's reset has come) goes on
        though this machine's clock, behind the store's (Redis's), has not reached the
        reset: it waited as long as the clock was behind, hours for a clock hours off."""
        from broker.jobs import serve

        running = await start(_config(tpd=3), no_wait=True)
        _drop(spool, "d.txt", "\n".join(_asins(60, "B0BEHIND")) + "\n")
        await _until(lambda: "d.txt" in running.daemon._deferred)
        running.daemon._deferred["d.txt"].until = datetime.now(UTC) + timedelta(hours=3)
        await asyncio.sleep(0.3)  # polls while its keys wait: it stays deferred
        assert "d.txt" in running.daemon._deferred
        with structlog.testing.capture_logs() as logs:
            monkeypatch.setattr(serve, "quota_wait", lambda *args, **kwargs: None)
            await _until(lambda: any(e.get("event") == "broker.job_resumed" for e in logs))
        assert [e["job"] for e in logs if e.get("event") == "broker.job_resumed"] == ["d.txt"]

    async def test_a_deferred_job_whose_keys_were_taken_out_waits_for_its_reset(
        self, start: Start, spool: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A deferred job whose keys were all taken out since (an outage during another
        job) waits for its reset by this machine's clock: with no key left to say it
        waits, it went on at once, hours early, to end on its keys' failure."""
        import dataclasses

        running = await start(_config(tpd=3), no_wait=True)
        _drop(spool, "d.txt", "\n".join(_asins(60, "B0GONE")) + "\n")
        await _until(lambda: "d.txt" in running.daemon._deferred)
        broker = running.daemon._broker
        assert broker is not None
        real = broker.metrics

        def taken_out() -> Any:
            snapshot = real()
            keys = tuple(dataclasses.replace(k, state="disabled") for k in snapshot.keys)
            return dataclasses.replace(snapshot, keys=keys)

        monkeypatch.setattr(broker, "metrics", taken_out)
        with structlog.testing.capture_logs() as logs:
            await asyncio.sleep(0.5)  # several polls
        assert [e for e in logs if e.get("event") == "broker.job_resumed"] == []
        assert "d.txt" in running.daemon._deferred

    async def test_jobs_deferred_for_the_daily_quota_are_counted(
        self, start: Start, spool: Path
    ) -> None:
        """Under no_wait, jobs stopped until the daily quota resets wait in processing/:
        asinb_deferred_jobs counts them (nothing else in /metrics showed them)."""
        running = await start(_config(tpd=3), no_wait=True)
        for name in ("d1.txt", "d2.txt"):
            _drop(spool, name, "\n".join(_asins(60, "B0" + name[:2].upper())) + "\n")
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            values = _samples((await _get(f"{running.url}/metrics"))[2])
            if values["asinb_deferred_jobs"] == 2:
                break
            assert asyncio.get_running_loop().time() < deadline, values["asinb_deferred_jobs"]
            await asyncio.sleep(0.05)
        assert sorted(os.listdir(spool / "inbox")) == []
        # The keys they wait for decide whether the work waits for its quota.
        assert running.daemon.spool_snapshot().deferred_keys == {"demo"}
        assert values["asinb_work_waiting_quota"] == 1
        # One deleted from processing/ is no longer counted as waiting.
        (spool / "processing" / "d1.txt").unlink()
        values = _samples((await _get(f"{running.url}/metrics"))[2])
        assert values["asinb_deferred_jobs"] == 1

    def test_readiness_when_every_key_is_out_of_rotation(self) -> None:
        """Every key disabled: not ready, and the reason names each key and why."""
        key = KeySnapshot("demo", "disabled", 1.0, 1.0, 0, 3, 0, 1, 3, 8640, None, "AuthError: x")
        snapshot = MetricsSnapshot(0, {}, 0, 0, 0, {}, (0,) * 11, 0.0, 0, 0, 0, keys=(key,))
        verdict = readiness(snapshot, state="running")
        assert not verdict.ready
        assert verdict.reason == "no key can send (demo: AuthError: x)"
        assert readiness(snapshot, state="stopping").reason == "stopping"
        assert readiness(None, state="running").reason == "starting"

    def test_a_stopped_engine_is_not_ready(self) -> None:
        """An engine that stopped (a crash) is not ready, saying why, whatever its keys say."""
        key = KeySnapshot("demo", "active", 1.0, 1.0, 0, 3, 0, 1, 3, 8640, None)
        snapshot = MetricsSnapshot(
            0, {}, 0, 0, 0, {}, (0,) * 11, 0.0, 0, 0, 0, keys=(key,),
            engine_stopped="RuntimeError: boom",
        )  # fmt: skip
        verdict = readiness(snapshot, state="running")
        assert (verdict.ready, verdict.reason) == (False, "engine stopped: RuntimeError: boom")

    async def test_an_idle_daemon_whose_engine_dies_stops_at_once(
        self, start: Start, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An idle daemon whose engine dies stops within a poll, raising the crash: it
        answered ready and healthy, with no engine, until the next job met it."""

        async def crash(self: SharedKeyLimiter) -> None:
            await asyncio.sleep(0.3)
            raise RuntimeError("boom")

        monkeypatch.setattr(SharedKeyLimiter, "keep_alive", crash)
        running = await start()
        assert (await _get(f"{running.url}/readyz"))[0] == 200
        with pytest.raises(RuntimeError, match="boom"):
            async with asyncio.timeout(5):
                await running.task

    def test_a_key_paused_by_retry_after_is_ready_though_it_says_until_when(self) -> None:
        """A Retry-After pause (seconds) shows its until, and the key still counts as able
        to send for /readyz; a pause of a failing endpoint does not."""

        def key(reason: str) -> KeySnapshot:
            return KeySnapshot(
                "demo", "paused", 1, 1, 0, 1, 0, 0, 1, 8640, None, reason,
                "2026-12-06T00:00:03Z",
            )  # fmt: skip

        def snapshot(one: KeySnapshot) -> MetricsSnapshot:
            return MetricsSnapshot(0, {}, 0, 0, 0, {}, (0,) * 11, 0.0, 0, 0, 0, keys=(one,))

        assert readiness(snapshot(key("Retry-After")), state="running").ready
        failing = readiness(snapshot(key("endpoint failing: ServerError")), state="running")
        assert not failing.ready
        assert failing.until == "2026-12-06T00:00:03Z"

    def test_readiness_looks_at_the_keys_the_waiting_work_needs(self) -> None:
        """Work waits for FR only, and every FR key waits for its daily quota while the US
        keys idle: not ready, until the reset (the daemon's job is stuck for hours). It said
        ready, because some key could send. With no work waiting, any key that can send
        makes it ready; so does an FR key that can send."""
        until = "2026-12-06T00:00:00Z"

        def key(name: str, market: str, reason: str | None = None) -> KeySnapshot:
            state = "active" if reason is None else "paused"
            return KeySnapshot(
                name, state, 1, 1, 0, 1, 0, 0, 1, 8640, None, reason,
                until if reason else None, marketplaces=(market,),
            )  # fmt: skip

        us, fr = key("us", "www.amazon.com"), key("fr", "www.amazon.fr", QUOTA_WAIT)

        def snapshot(*keys: KeySnapshot, waiting: tuple[str, ...]) -> MetricsSnapshot:
            return MetricsSnapshot(
                0, {}, 0, 0, 0, {}, (0,) * 11, 0.0, 0, 1, 1, keys=keys, waiting_markets=waiting
            )

        stuck = readiness(snapshot(us, fr, waiting=("www.amazon.fr",)), state="running")
        assert not stuck.ready
        assert stuck.reason == f"{QUOTA_WAIT} until {until}"
        assert stuck.until == until
        assert readiness(snapshot(us, fr, waiting=()), state="running").ready
        fresh_fr = key("fr2", "www.amazon.fr")
        assert readiness(
            snapshot(us, fr, fresh_fr, waiting=("www.amazon.fr",)), state="running"
        ).ready
        # The gauge the no-progress alert stands down for, alike.
        text = render_metrics(snapshot(us, fr, waiting=("www.amazon.fr",)), SpoolSnapshot())
        assert _samples(text)["asinb_work_waiting_quota"] == 1
        text = render_metrics(snapshot(us, fr, waiting=()), SpoolSnapshot())
        assert _samples(text)["asinb_work_waiting_quota"] == 0
        # Nothing queued, but a job [serve] no_wait deferred until the FR keys' reset: the
        # work waits for the quota; the idle US key made it 0, and the no-progress alert
        # fired all day for a job held as documented.
        held = SpoolSnapshot(deferred=1, deferred_keys=frozenset({"fr"}))
        text = render_metrics(snapshot(us, fr, waiting=()), held)
        assert _samples(text)["asinb_work_waiting_quota"] == 1
        held_by_us = SpoolSnapshot(deferred=1, deferred_keys=frozenset({"us"}))
        text = render_metrics(snapshot(us, fr, waiting=()), held_by_us)
        assert _samples(text)["asinb_work_waiting_quota"] == 0

    def test_waiting_quota_is_only_a_quota_wait(self) -> None:
        """asinb_key_waiting_quota is 1 for a key waiting for its daily quota (by its own
        count or Amazon's), not for one parked as not eligible: the NoProgress alert stands
        aside only for the wait that ends by itself."""
        until = "2026-05-02T00:00:00Z"
        keys = (
            KeySnapshot("own", "parked", 1, 1, 0, 1, 0, 0, 1, 8640, None, QUOTA_WAIT, until),
            KeySnapshot("amz", "parked", 1, 1, 0, 1, 0, 0, 1, 8640, None, QUOTA_SPENT, until),
            KeySnapshot("ne", "parked", 1, 1, 0, 1, 0, 0, 1, 8640, None, REVOKED, until),
        )
        snapshot = MetricsSnapshot(0, {}, 0, 0, 0, {}, (0,) * 11, 0.0, 0, 0, 0, keys=keys)
        values = _samples(render_metrics(snapshot, SpoolSnapshot(), None))
        waiting = {k: values[f'asinb_key_waiting_quota{{key="{k}"}}'] for k in ("own", "amz", "ne")}
        assert waiting == {"own": 1, "amz": 1, "ne": 0}

    def test_no_label_is_one_prometheus_sets_on_the_target(self) -> None:
        """No sample uses ``job`` or ``instance``: a scrape would rename it exported_*."""
        key = KeySnapshot("demo", "active", 1.0, 1.0, 0, 3, 0, 1, 3, 8640, None, None)
        snapshot = MetricsSnapshot(
            0, {200: 1}, 0, 0, 0, {"ok": 1}, (0,) * 11, 0.0, 0, 0, 0, keys=(key,)
        )
        cache = CacheStats(hits=1, misses=0, requests_saved=0, entries=1, bytes=10, evictions=0)
        spool = SpoolSnapshot(rows_by_status={"ok": 1}, jobs=(JobRows("a.txt", {"ok": 1}),))
        text = render_metrics(snapshot, spool, cache)
        labels = {
            pair.split("=")[0]
            for line in text.splitlines()
            if "{" in line and not line.startswith("#")
            for pair in line.split("{")[1].split("}")[0].split(",")
        }
        assert "job_file" in labels
        assert not labels & {"job", "instance"}

    def test_label_values_are_escaped(self) -> None:
        """Job names with quotes, backslashes or newlines stay valid exposition text."""
        from broker.jobs.metrics_http import JobRows

        text = render_metrics(None, SpoolSnapshot(jobs=(JobRows('a"b\\c\nd', {"ok": 1}),)))
        assert 'asinb_job_rows{job_file="a\\"b\\\\c\\nd",status="ok"} 1' in text.splitlines()

    async def test_non_loopback_host_is_refused(self, tmp_path: Path) -> None:
        """A non-loopback --host is refused unless --allow-remote."""
        with pytest.raises(ConfigError, match="allow-remote"):
            Daemon(_config(), ServeOptions(spool=tmp_path, host="0.0.0.0"))
        Daemon(_config(), ServeOptions(spool=tmp_path, host="0.0.0.0", allow_remote=True))
        Daemon(_config(), ServeOptions(spool=tmp_path, host="::1"))


class TestProcess:
    def test_cli_refuses_remote_host_with_78(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``broker serve --host 0.0.0.0`` exits 78 and says how to allow it."""
        argv = ["serve", "--spool", str(tmp_path / "s"), "--host", "0.0.0.0"]
        code = cli.main([*argv, "--config", str(_config_file(tmp_path))])
        assert code == ExitCode.CONFIG
        err = capsys.readouterr().err
        assert "--allow-remote" in err
        # Named by its flag: no config key sets it (serve.host read as one, refused).
        assert "--host: refusing" in err
        assert "serve.host" not in err
        assert not (tmp_path / "s").exists()

    def test_cli_refused_its_port_makes_no_spool(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``broker serve`` on a port in use exits 78 and leaves no spool behind: it made
        inbox/, processing/, done/ and failed/ before it found the port taken."""
        with contextlib.closing(socket.socket()) as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            argv = ["serve", "--spool", str(tmp_path / "s"), "--port", str(port)]
            code = cli.main([*argv, "--config", str(_config_file(tmp_path))])
        assert code == ExitCode.CONFIG
        err = capsys.readouterr().err
        assert "--port: cannot listen on" in err
        assert not (tmp_path / "s").exists()

    @pytest.mark.parametrize(
        ("option", "exit_code"),
        [("--host=0.0.0.0", ExitCode.CONFIG), ("--spool-is-a-file", ExitCode.IO_ERROR)],
    )
    def test_json_logs_say_a_failed_start_as_json(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, exit_code: int
    ) -> None:
        """With JSON logs, a daemon that cannot start ends its log with one JSON line,
        broker.daemon_failed with the exit code and why, as a log shipper reads it; a plain
        "broker serve: ..." line came after the JSON ones (or alone, for a config error)."""
        spool = tmp_path / "s"
        argv = ["serve", "--spool", str(spool), "--config", str(_config_file(tmp_path))]
        if option == "--spool-is-a-file":
            spool.write_text("not a folder\n")
        else:
            argv.append(option)
        assert cli.main(argv) == exit_code
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        events = [json.loads(line) for line in lines]
        assert events[-1]["event"] == "broker.daemon_failed"
        assert events[-1]["exit_code"] == exit_code
        assert events[-1]["error"]

    @pytest.mark.parametrize("config", ["secret-unset", "typo", "missing"])
    def test_a_config_it_cannot_use_ends_with_a_daemon_failed_event(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        config: str,
    ) -> None:
        """A daemon refused for its config (exit 78) logs broker.daemon_failed as JSON off a
        terminal, as for any other failed start, and no plain line among the JSON ones."""
        monkeypatch.delenv("ASINB_UNSET_SECRET", raising=False)
        path = tmp_path / "config.toml"
        if config == "secret-unset":
            path.write_text(
                '[api]\nendpoint = "https://creatorsapi.example"\n\n[[keys]]\nname = "demo"\n'
                'credential_id = "demo-id"\nversion = "3.1"\n'
                'credential_secret_env = "ASINB_UNSET_SECRET"\n'
                'partner_tags = { "www.amazon.com" = "demo-20" }\n'
            )
        elif config == "typo":
            path.write_text('[api]\nendpont = "amazon"\n')
        argv = ["serve", "--spool", str(tmp_path / "s"), "--config", str(path), "--port", "0"]
        assert cli.main(argv) == ExitCode.CONFIG
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        (event,) = [json.loads(line) for line in lines]
        assert (event["event"], event["level"]) == ("broker.daemon_failed", "error")
        assert event["exit_code"] == ExitCode.CONFIG
        assert event["error"].startswith("invalid config ") or "not found" in event["error"]
        assert not (tmp_path / "s").exists()

    def test_a_crash_ends_the_daemon_with_its_traceback(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """An engine task dying of a bug ends the daemon with 1 (an internal error, which a
        restart may mend); broker.task_crashed and broker.daemon_failed carry its traceback,
        masked as the rest of the log is."""
        token = "Atc|" + "x" * 40

        async def crash(self: SharedKeyLimiter) -> None:
            raise RuntimeError(f"boom Bearer {token}")

        monkeypatch.setattr(SharedKeyLimiter, "keep_alive", crash)
        spool = tmp_path / "s"
        _drop(spool, "job.txt", "B0CRASH001\n")
        argv = ["serve", "--spool", str(spool), "--config", str(_config_file(tmp_path))]
        assert cli.main([*argv, "--port", "0"]) == ExitCode.INTERNAL
        err = capsys.readouterr().err
        assert token not in err
        events = {e["event"]: e for e in map(json.loads, err.splitlines())}
        for name in ("broker.task_crashed", "broker.daemon_failed"):
            assert events[name]["exception"].startswith("Traceback (most recent call last)")
            assert "RuntimeError: boom Bearer ***" in events[name]["exception"]
        assert events["broker.daemon_failed"]["exit_code"] == ExitCode.INTERNAL
        assert events["broker.daemon_failed"]["error"] == (
            "internal error: RuntimeError: boom Bearer ***"
        )

    def test_every_key_rejected_stops_with_77_and_keeps_the_job(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Bad credentials stop the daemon with 77 naming the key; the job stays in processing/."""
        monkeypatch.setenv("ASINB_BAD", "wrong-secret")
        config = _config_file(tmp_path, 'credential_secret_env = "ASINB_BAD"\n')
        spool = tmp_path / "spool"
        _drop(spool, "job.txt", "B0REJECT01\n")
        argv = ["serve", "--spool", str(spool), "--config", str(config), "--port", "0"]
        assert cli.main(argv) == ExitCode.NO_PERMISSION
        err = capsys.readouterr().err
        assert "demo" in err
        # No bug: one line, no traceback.
        assert "Traceback" not in err
        assert "wrong-secret" not in err
        assert (spool / "processing" / "job.txt").exists()
        assert not (spool / "failed" / "job.txt").exists()

    def test_sigterm_stops_the_process_with_0(self, tmp_path: Path) -> None:
        """A real ``broker serve`` files a job, answers /healthz and exits 0 on SIGTERM."""
        spool = tmp_path / "spool"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ASINB_")}
        argv = [sys.executable, "-m", "broker", "serve", "--spool", str(spool), "--port", "0"]
        argv += ["--config", str(_config_file(tmp_path))]
        with _daemon(argv, env) as proc:
            assert proc.stderr is not None
            url = None
            deadline = time.monotonic() + 20
            while url is None and time.monotonic() < deadline:
                line = proc.stderr.readline()
                assert line, "broker serve exited before it started"
                event = json.loads(line)
                if event["event"] == "broker.daemon_started":
                    url = event["url"]
            assert url is not None
            _drop(spool, "p.txt", "B0PROCES01\n")
            status = spool / "done" / "p.txt.status.json"
            while not status.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert json.loads(status.read_text())["rows"]["total"] == 1
            assert asyncio.run(_get(f"{url}/healthz"))[0] == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0

    def test_a_non_ascii_job_name_where_file_names_are_not_utf8(self, tmp_path: Path) -> None:
        """Under a C locale with UTF-8 mode off, a job named ünï.txt is filed as
        %C3%BCn%C3%AF.txt and the daemon goes on; its claim could not be named there (an
        internal error at once, exit 1, and again at every restart: no job ever ran)."""
        spool = tmp_path / "spool"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ASINB_")}
        env.update(LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
        argv = [sys.executable, "-m", "broker", "serve", "--spool", str(spool), "--port", "0"]
        config = _config_file(tmp_path)
        config.write_text(config.read_text() + "\n[serve]\nsettle_s = 0\n")
        argv += ["--config", str(config)]
        _drop(spool, "\u00fcn\u00ef.txt", "B0PROCES01\n")
        _drop(spool, "plain.txt", "B0PROCES02\n")
        with _daemon(argv, env) as proc:
            done = spool / "done"
            deadline = time.monotonic() + 30
            while len(list(done.glob("*.status.json"))) < 2 and proc.poll() is None:
                assert time.monotonic() < deadline, "the jobs were not filed"
                time.sleep(0.05)
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            status = json.loads((done / "%C3%BCn%C3%AF.txt.status.json").read_text())
            assert status["rows"]["total"] == 1
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0

    async def test_first_signal_drains_the_running_job(self, tmp_path: Path) -> None:
        """A first SIGTERM lets the requests already sent be answered and written, as
        ``broker run`` does: no answer paid for is thrown away, and the job resumes later.
        Meanwhile /readyz says 503 "stopping" (it said ready until the port closed)."""
        settings = SimulatorSettings(limits=False, latency=LatencyProfile(fixed_ms=300.0))
        async with SimulatorServer(settings) as sim:
            document = {
                "api": {"endpoint": sim.url},
                "keys": [{**key_doc(tps=100.0), "max_in_flight": 4}],
                "engine": {"linger_s": 0.005},
            }
            config = parse_config(document, environ=ENV)
            options = ServeOptions(
                spool=tmp_path,
                port=0,
                poll_s=0.05,
                progress="none",
                handle_signals=False,
                settle_s=0.0,
            )
            daemon = Daemon(config, options)
            task = asyncio.get_running_loop().create_task(daemon.run())
            _drop(tmp_path, "big.txt", "\n".join(_asins(200, "B3")) + "\n")
            await _until(lambda: sim.stats.accounts["demo"].accepted >= 2)
            daemon._signals(signal.SIGTERM)
            code, _, body = await _get(f"{daemon.url}/readyz")
            assert (code, json.loads(body)) == (503, {"ready": False, "reason": "stopping"})
            assert not task.done()
            await asyncio.wait_for(task, 15)
            served = sim.stats.accounts["demo"].items_served
        rows = _rows(tmp_path / "processing" / "big.txt.out.jsonl")
        assert 0 < len(rows) < 200
        assert len(rows) == served  # every answer the simulator sent was written
        assert (tmp_path / "processing" / "big.txt").exists()

    async def test_second_signal_forces_exit_75(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The first signal stops gracefully; its echo is ignored; a later one exits 75 at once."""
        exits: list[int] = []
        monkeypatch.setattr(os, "_exit", exits.append)
        clock = FakeClock()
        daemon = Daemon(_config(), ServeOptions(spool=tmp_path), clock=clock)
        daemon._signals(signal.SIGTERM)
        daemon._signals(signal.SIGINT)  # the same Ctrl-C, delivered twice
        assert exits == []
        await clock.advance(0.3)
        daemon._signals(signal.SIGTERM)
        assert exits == [ExitCode.RESUMABLE]


def _wait_drop(spool: Path, name: str, text: str, *, age_s: float = 60.0) -> Path:
    """Write a job straight into inbox/, its mtime ``age_s`` in the past (written long ago)."""
    path = _drop(spool, name, text)
    past = time.time() - age_s
    os.utime(path, (past, past))
    return path


class TestDaemonSurvives:
    async def test_an_entry_it_may_not_move_is_left_and_the_next_job_runs(
        self, start: Start, spool: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Another user's file in a sticky inbox/ (the daemon may not move it: EPERM) is
        left there with one warning, and the other jobs run; the daemon exited 74 on it, and
        a restarting unit met the file again at each start."""
        real_link, real_rename = os.link, os.rename

        def refused(source: Any, *args: Any, **kwargs: Any) -> None:
            if Path(source).name == "theirs.txt":
                raise PermissionError(errno.EPERM, "Operation not permitted", str(source))

        def link(source: Any, *args: Any, **kwargs: Any) -> None:
            refused(source)
            real_link(source, *args, **kwargs)

        def rename(source: Any, *args: Any, **kwargs: Any) -> None:
            refused(source)
            real_rename(source, *args, **kwargs)

        monkeypatch.setattr(serve.os, "link", link)
        monkeypatch.setattr(serve.os, "rename", rename)
        _drop(spool, "theirs.txt", "B0THEIRS01\n")
        with structlog.testing.capture_logs() as logs:
            running = await start()
            _drop(spool, "mine.txt", "B0MINE0001\n")
            assert (await _filed(spool, "mine.txt"))["rows"]["total"] == 1
            await asyncio.sleep(0.2)  # a few more polls of the inbox
            assert not running.task.done()
        told = [e for e in logs if e["event"] == "broker.inbox_entry_ignored"]
        assert [(e["entry"], e["kind"]) for e in told] == [
            ("theirs.txt", "not movable (Operation not permitted)")
        ]
        assert "sticky" in told[0]["note"]
        assert os.listdir(spool / "inbox") == ["theirs.txt"]

    @pytest.mark.parametrize("links", [True, False])
    @pytest.mark.parametrize("kind", ["symlink", "fifo"])
    def test_an_entry_swapped_for_no_file_after_its_listing_is_not_claimed(
        self, spool: Path, tmp_path: Path, kind: str, links: bool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A producer renames a link or a pipe over a job's name between the listing (a
        regular file) and the claim: it is not taken, and goes back to inbox/. Claimed, a
        pipe blocked the daemon's loop for good (/healthz dead, SIGTERM unheard), and a link
        to a file only the daemon may read published it in done/."""
        spool_dir = Spool(spool)
        spool_dir.prepare()
        entry = spool / "inbox" / "j.txt"
        if kind == "symlink":
            secret = tmp_path / "secret"
            secret.write_text("amzn1.oa2-cs.v1.0123\n")
            secret.chmod(0o600)
            entry.symlink_to(secret)
        else:
            os.mkfifo(entry)
        if not links:  # a file system without hard links: claimed (and put back) by rename

            def no_link(*args: Any, **kwargs: Any) -> None:
                raise OSError(errno.EPERM, "Operation not permitted")

            monkeypatch.setattr(serve.os, "link", no_link)
        assert not spool_dir.claim("j.txt")
        assert os.listdir(spool / "processing") == []
        assert os.listdir(spool / "inbox") == ["j.txt"]

    def test_a_claim_whose_inbox_entry_stays_is_undone(
        self, spool: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Linked into processing/ but refused the unlink from inbox/ (a sticky inbox/
        without protected hard links): the link is taken back and PermissionError raised;
        kept, the job would have run again once filed."""
        spool_dir = Spool(spool)
        spool_dir.prepare()
        _drop(spool, "theirs.txt", "B0THEIRS02\n")
        real_unlink = Path.unlink

        def unlink(self: Path, missing_ok: bool = False) -> None:
            if self.parent.name == "inbox":
                raise PermissionError(errno.EPERM, "Operation not permitted", str(self))
            real_unlink(self, missing_ok=missing_ok)

        monkeypatch.setattr(Path, "unlink", unlink)
        with pytest.raises(PermissionError):
            spool_dir.claim("theirs.txt")
        assert os.listdir(spool / "processing") == []
        assert os.listdir(spool / "inbox") == ["theirs.txt"]
        # A daemon stopped between the link and the unlink: at the next start the claim is
        # taken back rather than the daemon failing (it exited at every start).
        os.link(spool / "inbox" / "theirs.txt", spool / "processing" / "theirs.txt")
        assert spool_dir.drop_duplicates() == []
        assert os.listdir(spool / "processing") == []
        assert os.listdir(spool / "inbox") == ["theirs.txt"]

    async def test_n4_latin1_name_is_processed_and_the_next_job_runs(
        self, start: Start, spool: Path
    ) -> None:
        """N4: a job whose name is not UTF-8 runs under a %XX name; the next job runs too."""
        inbox = spool / "inbox"
        inbox.mkdir(parents=True)
        (inbox / os.fsdecode(b"lat\xe9.txt")).write_text("B0LATIN001\n")
        await start()
        _drop(spool, "later.txt", "B0LATER001\n")
        status = await _filed(spool, "lat%E9.txt")
        assert status["rows"]["total"] == 1
        assert (await _filed(spool, "later.txt"))["rows"]["total"] == 1
        assert len(_rows(spool / "done" / "lat%E9.txt.out.jsonl")) == 1
        assert os.listdir(spool / "processing") == []

    async def test_n4_244_byte_name_is_processed_and_the_next_job_runs(
        self, start: Start, spool: Path
    ) -> None:
        """N4: a name too long for its work files runs under a shortened, hashed name."""
        long = "j" * 240 + ".txt"
        _drop(spool, long, "B0LONGNM01\n")
        await start()
        _drop(spool, "later.txt", "B0LATER002\n")
        assert (await _filed(spool, "later.txt"))["rows"]["total"] == 1
        done = os.listdir(spool / "done")
        (job,) = [name for name in done if name.startswith("jjj") and name.endswith(".txt")]
        assert len(job.encode()) <= 200
        assert (await _filed(spool, job))["rows"]["total"] == 1
        assert f"{job}.out.jsonl" in done

    async def test_n4_latin1_name_left_in_processing_is_renamed_and_resumed(
        self, start: Start, spool: Path
    ) -> None:
        """N4: a non-UTF-8 job an older daemon left in processing/ is renamed and finished."""
        processing = spool / "processing"
        processing.mkdir(parents=True)
        (processing / os.fsdecode(b"old\xff.txt")).write_text("B0OLDJOB01\n")
        await start()
        assert (await _filed(spool, "old%FF.txt"))["rows"]["total"] == 1

    async def test_n4_job_deleted_from_processing_is_dropped_and_the_daemon_goes_on(
        self, start: Start, spool: Path
    ) -> None:
        """N4: a job file deleted from processing/ mid-run stops that job within about a
        second (200 rows would take 20 s); the next one runs."""
        await start(_config(tps=10.0, batch_size=1))
        _drop(spool, "gone.txt", "\n".join(_asins(200, "B0GONE")) + "\n")
        out = spool / "processing" / "gone.txt.out.jsonl"
        await _until(lambda: out.exists() and len(out.read_text().splitlines()) >= 2)
        (spool / "processing" / "gone.txt").unlink()
        _drop(spool, "next.txt", "B0NEXTJOB1\n")
        async with asyncio.timeout(8):
            assert (await _filed(spool, "next.txt"))["rows"]["total"] == 1
        assert not (spool / "done" / "gone.txt").exists()
        assert not (spool / "done" / "gone.txt.status.json").exists()
        assert os.listdir(spool / "processing") == []

    @pytest.mark.parametrize("removed", ["processing", "done", "."])
    async def test_spool_folders_removed_while_idle_are_made_again(
        self, start: Start, spool: Path, removed: str
    ) -> None:
        """processing/, done/ or the whole spool removed while the daemon idles (a clean-up
        script): the folders are made again, the next job is claimed and filed, and the
        daemon goes on, where it exited 66 saying a file was not found."""
        await start()
        _drop(spool, "first.txt", "B0FIRST001\n")
        await _filed(spool, "first.txt")
        shutil.rmtree(spool / removed)
        await asyncio.sleep(0.3)
        _drop(spool, "next.txt", "B0NEXTJOB1\n")
        async with asyncio.timeout(8):
            assert (await _filed(spool, "next.txt"))["rows"]["total"] == 1

    async def test_done_removed_while_a_job_runs_is_made_again_with_a_warning(
        self, start: Start, spool: Path
    ) -> None:
        """done/ removed while a job runs: the job is filed in a new done/, and the warning
        that whatever it held is gone is logged; it was made again silently (only a folder
        removed while the daemon idled was told)."""
        await start(_config(tps=10.0, batch_size=1))
        _drop(spool, "slow.txt", "".join(f"B0SLOW{i:04d}\n" for i in range(20)))
        await _until(lambda: (spool / "processing" / "slow.txt").exists())
        with structlog.testing.capture_logs() as logs:
            shutil.rmtree(spool / "done")
            assert (await _filed(spool, "slow.txt"))["rows"]["total"] == 20
        made = [e for e in logs if e["event"] == "broker.spool_folders_recreated"]
        assert [e["folders"] for e in made] == [[str(spool / "done")]]

    def test_shared_folders_made_again_keep_the_spools_group_mode(self, tmp_path: Path) -> None:
        """Under the systemd layout (spool and its inbox/, done/, failed/ 2770 for the
        producers' group, the daemon's umask 0027), a folder removed and made again gets
        the spool's mode, not 2750, which would lock the producers out of it."""
        root = tmp_path / "spool"
        root.mkdir()
        root.chmod(0o2770)
        spool = Spool(root)
        previous = os.umask(0o027)
        try:
            spool.prepare()
            for folder in (spool.inbox, spool.done, spool.failed):
                folder.rmdir()
            made = spool.prepare()
        finally:
            os.umask(previous)
        assert sorted(made) == sorted([spool.inbox, spool.done, spool.failed])
        for folder in (spool.inbox, spool.done, spool.failed):
            assert oct(folder.stat().st_mode & 0o7777) == oct(0o2770), folder
        # processing/ is the daemon's own: the umask's mode, no wider.
        assert spool.processing.stat().st_mode & 0o007 == 0

    def test_a_sqlite_output_is_filed_with_the_rows_in_its_wal(self, tmp_path: Path) -> None:
        """A SQLite output a viewer kept in WAL mode (its rows in the -wal) is filed with
        its -wal and -shm: filed alone it read "no such table", its rows left behind in
        processing/."""
        spool = Spool(tmp_path / "spool")
        spool.prepare()
        (spool.processing / "j.txt").write_text("B0C1234567\n")
        job = spool.job("j.txt", "sqlite")
        with sqlite_db(job.out, isolation_level=None) as writer:
            writer.execute("PRAGMA journal_mode = WAL")
            writer.execute("PRAGMA wal_autocheckpoint = 0")
            writer.execute("CREATE TABLE results (asin TEXT)")
            writer.execute("INSERT INTO results VALUES ('B0C1234567')")
            assert journal_files(job.out)[0].stat().st_size > 0
            filed = spool.file(job, "done", {"job": "j.txt"})
            out = filed.with_name("j.txt.out.sqlite")
            with sqlite_db(out) as reader:  # the viewer still open, as it was
                rows = reader.execute("SELECT asin FROM results").fetchall()
        assert rows == [("B0C1234567",)]
        assert sorted(p.name for p in spool.processing.iterdir()) == []

    def test_a_file_in_place_of_a_spool_folder_is_named_so(self, tmp_path: Path) -> None:
        """inbox/ replaced by a file while the daemon runs: the error says a file stands
        where the folder should be; it was mkdir's "File exists", of a path that is no
        folder."""
        spool = Spool(tmp_path / "spool")
        spool.prepare()
        spool.inbox.rmdir()
        spool.inbox.write_text("x")
        with pytest.raises(NotADirectoryError, match="a file stands where the spool's folder"):
            spool.prepare()

    @pytest.mark.parametrize("folder", ["done", "processing"])
    def test_a_link_in_place_of_a_spool_folder_is_refused(
        self, tmp_path: Path, folder: str
    ) -> None:
        """A spool folder replaced by a link (a producer with write access to the spool):
        refused, never followed; done/ as a link to another folder had the daemon file its
        jobs, outputs and status files there."""
        spool = Spool(tmp_path / "spool")
        spool.prepare()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (spool.root / folder).rmdir()
        (spool.root / folder).symlink_to(elsewhere)
        with pytest.raises(NotADirectoryError, match="a symbolic link stands where"):
            spool.prepare()

    @pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to give it away"
    )
    def test_a_processing_folder_of_another_user_is_refused(self, tmp_path: Path) -> None:
        """processing/ made by someone else before the daemon's first start (a producer of
        the group, the spool writable): refused, not adopted with whatever links it holds."""
        spool = Spool(tmp_path / "spool")
        spool.processing.mkdir(parents=True)
        os.chown(spool.processing, 65534, 65534)
        with pytest.raises(PermissionError, match="another user's folder"):
            spool.prepare()

    def test_a_world_writable_spool_lends_its_folders_no_more_than_group_access(
        self, tmp_path: Path
    ) -> None:
        """A 1777 spool (a shared /tmp-like root) gives its folders group access at most,
        never world-writable or sticky results folders."""
        root = tmp_path / "spool"
        root.mkdir()
        root.chmod(0o1777)
        previous = os.umask(0o022)
        try:
            Spool(root).prepare()
        finally:
            os.umask(previous)
        for name in ("inbox", "done", "failed"):
            assert oct((root / name).stat().st_mode & 0o7777) == oct(0o775), name

    async def test_a_job_replaced_in_processing_stops_and_the_new_file_runs(
        self, start: Start, spool: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A file renamed over a running job in processing/ stops that job within about a
        second (its 200 rows would take 20 s, spending quota nobody wants) and the new file
        then runs as a job of its own, instead of the old rows being fetched to the end and
        filed under failed/ with the new content."""
        monkeypatch.setattr(serve, "_ORPHAN_CHECK_S", 0.2)
        await start(_config(tps=10.0, batch_size=1))
        await _replace_while_running(spool, "swap.txt", 200, "B0NEWJOB01\nB0NEWJOB02\n")
        async with asyncio.timeout(10):
            status = await _filed(spool, "swap.txt")
        assert status["rows"]["total"] == 2
        rows = _rows(spool / "done" / "swap.txt.out.jsonl")
        assert sorted(r["input"] for r in rows) == ["B0NEWJOB01", "B0NEWJOB02"]
        assert not (spool / "failed" / "swap.txt").exists()

    async def test_a_job_replaced_after_the_watchers_last_look_is_not_filed_as_changed(
        self, start: Start, spool: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A file renamed over the job too late for the removal watcher (here it never
        looks) is still told from a change: the old job is dropped, not filed under failed/
        with the new content, and the new file runs as a job of its own."""
        monkeypatch.setattr(serve, "_REMOVAL_CHECK_S", 3600.0)
        monkeypatch.setattr(serve, "_ORPHAN_CHECK_S", 0.2)
        await start(_config(tps=10.0, batch_size=1))
        await _replace_while_running(spool, "late.txt", 15, "B0NEWJOB01\n")
        async with asyncio.timeout(15):
            status = await _filed(spool, "late.txt")
        assert status["rows"]["total"] == 1
        assert not (spool / "failed" / "late.txt").exists()

    async def test_every_event_of_a_job_names_it_alike(self, start: Start, spool: Path) -> None:
        """The log names a job by its spool name in every event, never by its passing place
        in processing/."""
        with structlog.testing.capture_logs() as logs:
            await start()
            _drop(spool, "named.txt", "\n".join(_asins(30, "B0NAME")) + "\n")
            await _filed(spool, "named.txt")
        events = [e for e in logs if "job" in e or e["event"] == "broker.progress"]
        kinds = {e["event"] for e in events}
        assert {"broker.job_claimed", "broker.job_started", "broker.job_filed"} <= kinds
        assert {e.get("job") for e in events} == {"named.txt"}

    async def test_rows_total_never_goes_down(self, start: Start, spool: Path) -> None:
        """asinb_rows_total is a counter: rows written by a job that is then dropped (or
        resumed by a later start) stay counted, and none is counted twice."""
        running = await start(_config(tps=10.0, batch_size=1))
        _drop(spool, "gone.txt", "\n".join(_asins(200, "B0GONE")) + "\n")
        out = spool / "processing" / "gone.txt.out.jsonl"
        await _until(lambda: out.exists() and len(out.read_text().splitlines()) >= 3)

        async def total() -> float:
            samples = _samples((await _get(f"{running.url}/metrics"))[2])
            return sum(v for k, v in samples.items() if k.startswith("asinb_rows_total{"))

        seen = await total()
        assert seen >= 3
        (spool / "processing" / "gone.txt").unlink()
        _drop(spool, "next.txt", "B0NEXTJOB1\n")
        await _filed(spool, "next.txt")
        after = await total()
        assert after >= seen + 1
        written = len(_rows(out)) if out.exists() else None
        assert written is None or after == written + 1

    async def test_n4_long_reserved_name_is_refused_under_a_safe_name(
        self, start: Start, spool: Path
    ) -> None:
        """N4: a refused name too long for its status file is filed under its safe name."""
        long = "r" * 240 + ".out.jsonl"
        _drop(spool, long, '{"asin": "B0LONGRES1"}\n')
        await start()
        _drop(spool, "later.txt", "B0LATER003\n")
        assert (await _filed(spool, "later.txt"))["rows"]["total"] == 1
        safe = spool_name(long)
        assert "reserved" in (await _filed(spool, safe, "failed"))["error"]
        assert os.listdir(spool / "inbox") == []

    async def test_k1_unreadable_job_is_filed_failed_and_the_daemon_goes_on(
        self, start: Start, spool: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """K1: an unreadable job is filed in failed/ with the reason, not "cannot write"."""
        secret = _drop(spool, "secret.txt", "B0SECRET01\n")
        if os.geteuid() == 0:
            # Root reads any file: make the job reader's open fail as it would for a user.
            from broker.jobs import sources

            _fail_opening(monkeypatch, sources, "secret.txt", errno.EACCES)
        else:
            secret.chmod(0)
        await start()
        _drop(spool, "zz_ok.txt", "B0OKJOB001\n")
        status = await _filed(spool, "secret.txt", "failed")
        assert "cannot read" in status["error"]
        assert "Permission denied" in status["error"]
        assert "cannot write" not in status["error"]
        assert status["exit_code"] == ExitCode.NO_INPUT
        assert (await _filed(spool, "zz_ok.txt"))["rows"]["total"] == 1
        assert os.listdir(spool / "processing") == []

    async def test_a_job_whose_read_fails_is_filed_without_permission_advice(
        self, start: Start, spool: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A job file that opens but fails to read (EIO: a failing disk, a dropped mount) is
        filed in failed/ naming the error, with no advice about its permissions."""
        from broker.jobs import sources

        real_open = open

        def failing_reads(file: Any, *args: Any, **kwargs: Any) -> Any:
            stream = real_open(file, *args, **kwargs)
            if Path(file).name == "bad.txt":
                stream.close()
                return io.BufferedReader(_Unreadable(file))
            return stream

        monkeypatch.setattr(sources, "open", failing_reads, raising=False)
        _drop(spool, "bad.txt", "B0BADJOB01\n")
        await start()
        status = await _filed(spool, "bad.txt", "failed")
        assert status["error"] == (
            "cannot read the job file 'bad.txt': Input/output error; move it back into inbox/ "
            "once it reads"
        )
        assert status["exit_code"] == ExitCode.NO_INPUT

    def test_a_daemon_out_of_open_files_keeps_the_job_it_could_not_open(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A job file the daemon cannot open because it ran out of open files is the
        daemon's trouble, not the job's: the error goes up (the daemon stops, "out of open
        files") and the job stays claimed, instead of being filed in failed/ as unreadable."""
        daemon = Daemon(_config(), ServeOptions(spool=tmp_path, settle_s=0), clock=FakeClock())
        daemon.spool.prepare()
        job = daemon.spool.job("j.txt", "jsonl")
        job.path.write_text("B0FILES001\n")
        _fail_opening(monkeypatch, serve, "j.txt", errno.EMFILE)
        with pytest.raises(OSError, match="Too many open files"):
            daemon._check_readable(job)
        assert job.path.exists()
        assert os.listdir(tmp_path / "failed") == []

    async def test_a_daemon_out_of_open_files_while_reading_a_job_keeps_it(
        self, start: Start, spool: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Out of open files when the job reader opens the job file: the daemon stops with
        that error and the job stays claimed; it was filed in failed/ as "cannot read the
        job file ... make it readable"."""
        from broker.jobs import sources

        _fail_opening(monkeypatch, sources, "j.txt", errno.EMFILE)
        running = await start()
        _drop(spool, "j.txt", "B0FILES002\n")
        with pytest.raises(OSError, match="Too many open files"):
            await asyncio.wait_for(running.task, timeout=30)
        assert (spool / "processing" / "j.txt").exists()
        assert not (spool / "failed" / "j.txt").exists()

    async def test_k4_inbox_link_of_a_claimed_job_is_removed_at_start(
        self, start: Start, spool: Path
    ) -> None:
        """K4: a job in both inbox/ and processing/ (stopped mid-claim) runs once."""
        claimed = _drop(spool, "x.txt", "B0CLAIMD01\nB0CLAIMD02\n")
        (spool / "processing").mkdir()
        os.link(claimed, spool / "processing" / "x.txt")
        await start()
        status = await _filed(spool, "x.txt")
        assert status["requests"] == 1
        _drop(spool, "after.txt", "B0AFTER001\n")
        await _filed(spool, "after.txt")
        assert not (spool / "done" / "x-2.txt").exists()
        assert os.listdir(spool / "inbox") == []

    async def test_k8_failed_filing_logs_the_name_it_was_filed_under(
        self, start: Start, spool: Path
    ) -> None:
        """K8: a refused job filed as x-2.out.jsonl is logged with that path, not x.out.jsonl."""
        with structlog.testing.capture_logs() as logs:
            await start()
            _drop(spool, "x.out.jsonl", '{"asin": "B0RESERVD1"}\n')
            await _filed(spool, "x.out.jsonl", "failed")
            _drop(spool, "x.out.jsonl", '{"asin": "B0RESERVD2"}\n')
            await _filed(spool, "x-2.out.jsonl", "failed")
        paths = [e["path"] for e in logs if e["event"] == "broker.job_filed"]
        assert paths == [
            str(spool / "failed" / "x.out.jsonl"),
            str(spool / "failed" / "x-2.out.jsonl"),
        ]

    async def test_n13_same_name_twice_gives_distinct_series(
        self, start: Start, spool: Path
    ) -> None:
        """N13: two jobs called daily.txt are labelled daily.txt and daily-2.txt in /metrics."""
        running = await start()
        _drop(spool, "daily.txt", "B0DAILY001\n")
        await _filed(spool, "daily.txt")
        _drop(spool, "daily.txt", "B0DAILY002\nB0DAILY003\n")
        await _filed(spool, "daily-2.txt")
        text = (await _get(f"{running.url}/metrics"))[2]
        series = [
            line.rpartition(" ")[0] for line in text.splitlines() if "asinb_job_rows{" in line
        ]
        assert len(series) == len(set(series))
        jobs = {line.split('job_file="')[1].split('"')[0] for line in series}
        assert jobs == {"daily.txt", "daily-2.txt"}

    def test_n13_repeated_label_is_rendered_once(self) -> None:
        """N13: the exposition never holds two samples with the same labels."""
        spool = SpoolSnapshot(
            jobs=(JobRows("a.txt", {"ok": 2}), JobRows("a.txt", {"ok": 1})),
        )
        lines = [line for line in render_metrics(None, spool).splitlines() if "job_file=" in line]
        assert lines == ['asinb_job_rows{job_file="a.txt",status="ok"} 2']

    async def test_n14_a_growing_job_is_claimed_only_once_it_settles(
        self, start: Start, spool: Path
    ) -> None:
        """N14: a job written line by line into inbox/ is claimed whole, after it stops growing."""
        await start(settle_s=0.6)
        inbox = spool / "inbox"
        inbox.mkdir(parents=True, exist_ok=True)
        ids = _asins(15, "B0GROW")
        with (inbox / "upload.txt").open("w") as stream:
            for asin in ids:
                stream.write(asin + "\n")
                stream.flush()
                await asyncio.sleep(0.1)
        status = await _filed(spool, "upload.txt")
        assert status["rows"]["total"] == 15
        assert len(_rows(spool / "done" / "upload.txt.out.jsonl")) == 15

    async def test_n14_a_job_changed_while_running_is_filed_failed(
        self, start: Start, spool: Path
    ) -> None:
        """N14: a job written to after it was claimed is never filed as done with rows missing."""
        await start(_config(tps=10.0, batch_size=1))
        job = _drop(spool, "late.txt", "\n".join(_asins(15, "B0LATE")) + "\n")
        out = spool / "processing" / "late.txt.out.jsonl"
        await _until(lambda: out.exists() and len(out.read_text().splitlines()) >= 1)
        with (spool / "processing" / "late.txt").open("a") as stream:
            stream.write("B0LATEXTRA\n")
        assert not job.exists()
        status = await _filed(spool, "late.txt", "failed")
        assert "changed while the job ran" in status["error"]
        assert not (spool / "done" / "late.txt").exists()

    async def test_n14_an_old_file_is_claimed_at_once(self, start: Start, spool: Path) -> None:
        """N14: a file last written longer ago than settle_s (renamed in) waits for nothing."""
        _wait_drop(spool, "old.txt", "B0OLDFILE1\n")
        await start(settle_s=30.0)
        assert (await _filed(spool, "old.txt"))["rows"]["total"] == 1

    async def test_failed_job_moved_back_to_inbox_runs_again(
        self, start: Start, spool: Path
    ) -> None:
        """A job in failed/ runs again when moved back into inbox/ (after fixing it)."""
        await start()
        _drop(spool, "retry.csv", "sku\nB0RETRY001\n")
        await _filed(spool, "retry.csv", "failed")
        failed = spool / "failed" / "retry.csv"
        failed.write_text("asin\nB0RETRY001\n")
        os.rename(failed, spool / "inbox" / "retry.csv")
        status = await _filed(spool, "retry.csv")
        assert status["rows"]["total"] == 1
        assert len(_rows(spool / "done" / "retry.csv.out.jsonl")) == 1

    async def test_convert_isbn13_option_reaches_every_job(self, start: Start, spool: Path) -> None:
        """convert_isbn13 (config [serve]) turns a 978 ISBN-13 row into its ISBN-10."""
        await start(convert_isbn13=True)
        _drop(spool, "isbn.txt", "9780306406157\n")
        await _filed(spool, "isbn.txt")
        (row,) = _rows(spool / "done" / "isbn.txt.out.jsonl")
        assert row["asin"] == "0306406152"
        assert row["status"] != "invalid"


class TestServeConfig:
    def test_serve_table_is_read(self) -> None:
        """[serve] convert_isbn13, no_wait and settle_s are read; defaults off and 2 s."""
        assert _config().serve.settle_s == 2.0
        assert not _config().serve.no_wait
        key = {"name": "d", "credential_id": "x", "version": "3.1", "partner_tags": {"US": "t-20"}}
        document = {
            "api": {"endpoint": "simulator"},
            "keys": [key],
            "serve": {"convert_isbn13": True, "no_wait": True, "settle_s": 0.5},
        }
        serve = parse_config(document, environ={}).serve
        assert (serve.convert_isbn13, serve.no_wait, serve.settle_s) == (True, True, 0.5)

    def test_unknown_serve_key_is_refused(self) -> None:
        """A typo in [serve] is a config error naming the key."""
        key = {"name": "d", "credential_id": "x", "version": "3.1", "partner_tags": {"US": "t-20"}}
        document = {"api": {"endpoint": "simulator"}, "keys": [key], "serve": {"no_wiat": True}}
        with pytest.raises(ConfigError, match=r"serve\.no_wiat"):
            parse_config(document, environ={})

    def test_spool_name_keeps_good_names_and_fixes_awkward_ones(self) -> None:
        """spool_name: UTF-8 names unchanged; bad bytes as %XX; long names cut with a hash,
        keeping their extensions."""
        assert spool_name("prix été.csv") == "prix été.csv"
        assert spool_name(os.fsdecode(b"lat\xe9.txt")) == "lat%E9.txt"
        long = spool_name("j" * 300 + ".csv.gz")
        assert long.endswith(".csv.gz")
        assert len(long.encode()) <= 200
        assert long != spool_name("j" * 301 + ".csv.gz")
        # A dot earlier in a long name starts no extension: the name keeps its own. It lost
        # ".csv" (and ".gz"), and anything collecting done/*.csv missed the job.
        for ending in (".csv", ".jsonl.gz"):
            dotted = spool_name("v1.2 " + "k" * 230 + ending)
            assert dotted.endswith(ending)
            assert len(dotted.encode()) <= 200


def test_a_reservation_a_full_disk_cuts_short_is_named_and_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk while a filing reserves its name raises an error naming the
    reservation, and leaves none behind to hold the name (it named no file)."""

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(serve.os, "write", full)
    with pytest.raises(OSError, match="No space left") as raised:
        serve._reserve(tmp_path, "daily.txt", 1234)
    assert raised.value.filename is not None
    assert Path(raised.value.filename).parent == tmp_path
    assert "daily.txt" in raised.value.filename
    assert list(tmp_path.iterdir()) == []


class TestNoWait:
    async def test_job_deferred_on_spent_quota_stays_claimed_and_the_daemon_goes_on(
        self, start: Start, spool: Path
    ) -> None:
        """no_wait: a job whose key spent its daily quota waits in processing/, the daemon
        goes on, and the job finishes once a key can send again (here: the next start)."""
        with structlog.testing.capture_logs() as logs:
            first = await start(_config(tpd=2, batch_size=1), no_wait=True)
            _drop(spool, "big.txt", "\n".join(_asins(12, "B0NOWAIT")) + "\n")
            await _until(lambda: any(e["event"] == "broker.job_deferred" for e in logs))
            _drop(spool, "next.txt", "B0NOWNEXT1\n")
            await _until(lambda: not (spool / "inbox" / "next.txt").exists())
            assert not first.task.done()
            await first.stop()
        deferred = [e for e in logs if e["event"] == "broker.job_deferred"]
        assert deferred[0]["job"] == "big.txt"
        assert deferred[0]["until"].endswith("T00:00:00Z")
        assert deferred[0]["keys"] == ["demo"]  # which keys' quota, not only "the keys'"
        assert (spool / "processing" / "big.txt").exists()
        assert not (spool / "done" / "big.txt").exists()
        await start(_config(tpd=100_000))
        assert (await _filed(spool, "big.txt"))["rows"]["total"] == 12
        assert (await _filed(spool, "next.txt"))["rows"]["total"] == 1

    async def test_a_job_named_as_a_deferred_one_is_said_to_wait_behind_it(
        self, start: Start, spool: Path
    ) -> None:
        """no_wait: a new job of a deferred job's name stays in inbox/ (processing/ holds the
        name), and a warning says why, once; it is claimed once the deferred one is filed.
        Nothing said why it waited (a day, until the quota reset)."""
        with structlog.testing.capture_logs() as logs:
            first = await start(_config(tpd=2, batch_size=1), no_wait=True)
            _drop(spool, "daily.txt", "\n".join(_asins(12, "B0BEHIND")) + "\n")
            await _until(lambda: any(e["event"] == "broker.job_deferred" for e in logs))
            _drop(spool, "daily.txt", "B0BEHIND99\n")
            _drop(spool, "other.txt", "B0BEHIND98\n")  # claimed after it, in the same pass
            await _until(lambda: not (spool / "inbox" / "other.txt").exists())
            for n in range(3):  # more passes over the waiting entry: warned once only
                _drop(spool, f"other{n}.txt", "B0BEHIND97\n")
                await _until(lambda: not list((spool / "inbox").glob("other?.txt")))
            assert (spool / "inbox" / "daily.txt").exists()
            await first.stop()
        waiting = [e for e in logs if e["event"] == "broker.inbox_entry_waiting"]
        assert len(waiting) == 1
        assert waiting[0]["entry"] == "daily.txt"
        assert waiting[0]["reason"] == (
            "processing/ holds a job of this name, deferred until its keys' daily quota resets"
        )
        await start(_config(tpd=100_000))
        assert (await _filed(spool, "daily.txt"))["rows"]["total"] == 12
        assert (await _filed(spool, "daily-2.txt"))["rows"]["total"] == 1

    async def test_a_file_another_daemon_claimed_first_is_not_said_to_wait(
        self, start: Start, spool: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A claim lost to another daemon (its link first: the file is in processing/ and
        gone from inbox/) is no entry waiting behind a job of its name: no warning."""
        lost: list[str] = []

        def claimed_elsewhere(self: Spool, name: str, as_name: str | None = None) -> bool:
            os.link(self.inbox / name, self.processing / (as_name or name))
            (self.inbox / name).unlink()
            lost.append(name)
            return False

        monkeypatch.setattr(Spool, "claim", claimed_elsewhere)
        with structlog.testing.capture_logs() as logs:
            running = await start(_config())
            _drop(spool, "race.txt", "B0RACE0001\n")
            await _until(lambda: lost == ["race.txt"])
            await running.stop()
        assert [e for e in logs if e["event"] == "broker.inbox_entry_waiting"] == []

    async def test_a_job_deferred_and_resumed_is_filed_with_all_its_requests(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A job no_wait deferred, then resumed by the same daemon after the reset, is filed
        with the requests, 429s, retries and run time of all its stretches, not only of the
        last one (a job that spent 50 requests, waited, then finished with 11 more was filed
        with "requests": 11), and with no rows counted as resumed from another run."""
        daemon = Daemon(_config(), ServeOptions(spool=tmp_path, settle_s=0), clock=FakeClock())
        daemon.spool.prepare()
        job = daemon.spool.job("d.txt", "jsonl")
        job.path.write_text("".join(f"{asin}\n" for asin in _asins(60, "B0SPLIT")))
        broker = _CountingBroker()
        stretches = iter(
            [
                (
                    (50, 1, 2),
                    JobSummary(
                        total=60,
                        by_status={"ok": 49},
                        pending=11,
                        wall_s=10.0,
                        resumed_rows=5,  # done by a run before this daemon's
                        quota_wait_until="2026-12-07T00:00:00Z",
                        quota_wait_keys=frozenset({"demo"}),
                    ),
                ),
                (
                    (11, 0, 1),
                    JobSummary(total=60, by_status={"ok": 60}, wall_s=2.5, resumed_rows=49),
                ),
            ]
        )

        async def run_job(self: Daemon, broker: object, options: object) -> JobSummary:
            counts, summary = next(stretches)
            cast("_CountingBroker", broker).add(*counts)
            return summary

        monkeypatch.setattr(Daemon, "_run_job", run_job)
        await daemon._run_claimed(cast("Broker", broker), job)
        deferral = daemon._deferred.pop("d.txt")
        await daemon._run_claimed(cast("Broker", broker), job, deferral.spent)
        filed = json.loads((tmp_path / "done" / "d.txt.status.json").read_text())
        assert (filed["requests"], filed["throttled"], filed["retries"]) == (61, 1, 3)
        assert filed["wall_s"] == 12.5
        assert filed["resumed_rows"] == 5

    async def test_a_deferred_job_keeps_its_rows_in_metrics(
        self, start: Start, spool: Path
    ) -> None:
        """While a job waits for its keys' daily quota, asinb_job_rows still shows its rows,
        pending ones included: it is not finished, and it dropped out of /metrics until it
        was filed (up to a day later)."""
        running = await start(_config(tpd=3), no_wait=True)
        _drop(spool, "d.txt", "\n".join(_asins(60, "B0SHOWN")) + "\n")
        await _until(lambda: "d.txt" in running.daemon._deferred)
        values = _samples((await _get(f"{running.url}/metrics"))[2])
        pending = values['asinb_job_rows{job_file="d.txt",status="pending"}']
        done = sum(
            n
            for name, n in values.items()
            if name.startswith('asinb_job_rows{job_file="d.txt"') and "pending" not in name
        )
        assert pending > 0
        assert done > 0
        assert pending + done == 60


class _CountingBroker:
    """Stands in for the daemon's broker: counters its fake job runs move on."""

    def __init__(self) -> None:
        self._counts = (0, 0, 0)

    def add(self, requests: int, throttled: int, retries: int) -> None:
        total, limited, again = self._counts
        self._counts = (total + requests, limited + throttled, again + retries)

    def metrics(self) -> MetricsSnapshot:
        requests, throttled, retries = self._counts
        return MetricsSnapshot(
            requests, {}, throttled, retries, 0, {}, (0,) * 11, 0.0, 0, 0, 0, keys=()
        )


def test_serve_raises_its_open_file_limit(tmp_path: Path) -> None:
    """broker serve raises its soft open-file limit towards the hard one (at most 65,536):
    deferred jobs hold a file each, and a container's default soft limit is 1,024."""
    code = (
        "import argparse, asyncio, resource\n"
        "from broker.config import config_from_dict\n"
        "from broker.jobs import serve\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "class Daemon:\n"  # the daemon itself is not what this looks at
        "    def __init__(self, config, options):\n"
        "        pass\n"
        "    async def run(self):\n"
        "        return None\n"
        "serve.Daemon = Daemon\n"
        "config = config_from_dict({'api': {'endpoint': 'simulator'}, 'keys': [{'name': 'k',"
        " 'credential_id': 'demo-id', 'version': '3.1',"
        " 'partner_tags': {'www.amazon.com': 'demo-20'}}]})\n"
        f"args = argparse.Namespace(spool={str(tmp_path)!r}, host='127.0.0.1', port=0,"
        " allow_remote=False)\n"
        "serve.serve_command(config, args, run=asyncio.run)\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    soft, hard = (int(word) for word in done.stdout.split())
    want = 65_536 if hard == -1 else min(hard, 65_536)
    assert soft == max(256, want)


def test_a_status_file_that_cannot_be_written_leaves_no_temporary_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A status file that fails mid-write (a full disk) raises, and its partial temporary
    copy is removed: no later run cleans up done/.<name>.status.json.<hex>.tmp."""

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(serve.os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        serve._write_status(tmp_path / "job.txt.status.json", {"rows": 1})
    assert os.listdir(tmp_path) == []


def test_a_link_at_a_status_files_name_is_not_written_through(tmp_path: Path) -> None:
    """A link planted at a status file's name (a producer can write done/) is replaced by
    the daemon's own file, and the name it would file under is taken by any link: the
    status was written through it, creating or replacing the file it named."""
    victim = tmp_path / "victim.json"
    done = tmp_path / "done"
    done.mkdir()
    (done / "job.txt.status.json").symlink_to(victim)
    assert serve._free_name(done, "job.txt") == "job-2.txt"
    serve._write_status(done / "job.txt.status.json", {"rows": 1})
    assert not victim.exists()
    assert not (done / "job.txt.status.json").is_symlink()
    assert json.loads((done / "job.txt.status.json").read_text()) == {"rows": 1}


def test_a_link_planted_again_while_a_status_file_is_written_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A producer that plants the link again between the daemon's check and its write (it
    races the daemon, link after link): the link is replaced all the same, and the file it
    names is left alone. The write resolved the new link and replaced that file."""
    victim = tmp_path / "victim.txt"
    victim.write_text("private\n")
    done = tmp_path / "done"
    done.mkdir()
    status = done / "job.txt.status.json"
    status.symlink_to(victim)
    real_unlink = Path.unlink

    def planted_again(self: Path, missing_ok: bool = False) -> None:
        real_unlink(self, missing_ok=missing_ok)
        if self == status:
            status.symlink_to(victim)

    monkeypatch.setattr(Path, "unlink", planted_again)
    serve._write_status(status, {"rows": 1})
    monkeypatch.undo()
    assert victim.read_text() == "private\n"
    assert not status.is_symlink()
    assert json.loads(status.read_text()) == {"rows": 1}
