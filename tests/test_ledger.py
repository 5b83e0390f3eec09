"""Tests for broker.jobs.ledger and broker.jobs.lock: the job's durable state and its lock.

Crash cases of reliability.md section 3.3 are marked in the test names (A2, A6, A8, A9).
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from conftest import FullAtCheckpoint, sqlite_db
from structlog.testing import capture_logs

from broker.errors import JobFileError
from broker.jobs.ledger import (
    _PENDING_BY_MARKET_SQL,
    _PENDING_IN_SQL,
    _PENDING_SQL,
    CRASH_ENV,
    CRASH_POINTS,
    SCHEMA_VERSION,
    JobMismatchError,
    Ledger,
    Lookup,
    SinkState,
    crash_point,
    read_tally,
)
from broker.jobs.lock import JobLock, JobLockedError
from broker.jobs.sources import JobFingerprint, JobRow, fingerprint
from broker.models import ErrorDetail, ItemResult, ItemSummary, Status
from broker.sqlitewal import self_contained

US = "www.amazon.com"
DE = "www.amazon.de"
FP = JobFingerprint(Path("/jobs/job.txt"), 120, 1_700_000_000_000_000_000, "a" * 64)


def asin(i: int) -> str:
    """A well-formed ASIN for index ``i``."""
    return f"B{i:09d}"


def job_rows(*ids: str | None) -> list[JobRow]:
    """One row per id on lines 1, 2, ...; None makes an invalid row."""
    return [
        JobRow(n, raw or "???", raw, error=None if raw else "not an ASIN: '???'")
        for n, raw in enumerate(ids, 1)
    ]


#: The digest of ledger schema version 2: its tables and the output columns (CSV, SQLite).
_SCHEMA_DIGEST = "d33e594954088cbf"

#: The rows table as brokers before 2026-12-05 made it (no code column), refilled from ours.
_ROWS_BEFORE_CODES = """
ALTER TABLE rows RENAME TO rows_now;
DROP INDEX rows_done;
CREATE TABLE rows (
    seq         INTEGER PRIMARY KEY,   -- 0-based row index in file order
    line        INTEGER NOT NULL,
    raw         TEXT NOT NULL,
    marketplace TEXT NOT NULL,         -- the job's default when the row names none
    asin        TEXT,                  -- NULL for a row that was invalid at ingestion
    resources   TEXT NOT NULL,         -- '' for the job's default, else a JSON array
    status      TEXT NOT NULL,         -- 'pending' until final
    reason      TEXT,                  -- why an invalid row is invalid
    extra       TEXT,                  -- pass-through columns as a JSON object
    done_order  INTEGER                -- 1, 2, 3... in the order rows became final
);
CREATE UNIQUE INDEX rows_done ON rows (done_order) WHERE done_order IS NOT NULL;
INSERT INTO rows SELECT seq, line, raw, marketplace, asin, resources, status, reason, extra,
    done_order FROM rows_now;
DROP TABLE rows_now;
"""


def open_ledger(tmp_path: Path, fingerprint: JobFingerprint = FP, **options: object) -> Ledger:
    """Open the ledger ``tmp_path / "job.ledger"`` for ``fingerprint``."""
    return Ledger.open(
        tmp_path / "job.ledger",
        fingerprint=fingerprint,
        default_marketplace=str(options.pop("default_marketplace", US)),
        **options,  # type: ignore[arg-type]
    )


def result(lookup: Lookup, status: Status = Status.OK) -> ItemResult:
    """An ItemResult for ``lookup`` as the engine would deliver it."""
    ok = status is Status.OK
    return ItemResult(
        lookup.asin,
        lookup.marketplace,
        status,
        item={"asin": lookup.asin, "title": "Tea, «green»"} if ok else None,
        summary=ItemSummary(title="Tea, «green»", price=4.5, currency="USD") if ok else None,
        error=None if ok else ErrorDetail("ItemNotAccessible", "gone", "check the ASIN"),
        attempts=1,
        key="main",
        fetched_at=datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC),
    )


def finish_all(ledger: Ledger, status: Status = Status.OK) -> int:
    """Record a result for every pending lookup; return rows completed."""
    return ledger.record_results([(lk, result(lk, status)) for lk in ledger.pending_lookups()])


class TestOpen:
    def test_new_ledger_is_private(self, tmp_path: Path) -> None:
        """A new ledger is mode 0600 in a directory created 0700, with the schema version."""
        path = tmp_path / "state" / "job.ledger"
        with Ledger.open(path, fingerprint=FP, default_marketplace=US):
            pass
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        with sqlite_db(path) as conn:
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'")
            assert version.fetchone() == (SCHEMA_VERSION,)
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)

    @pytest.mark.parametrize("content", [b"line 1\nline 2\n", b"\x00" * 4096, b"SQLite format"])
    def test_a9_not_a_database_is_refused_and_untouched(
        self, tmp_path: Path, content: bytes
    ) -> None:
        """A9: a file that is not SQLite is refused with a clear error and never written."""
        path = tmp_path / "job.ledger"
        path.write_bytes(content)
        with pytest.raises(JobFileError, match="not a job ledger"):
            Ledger.open(path, fingerprint=FP, default_marketplace=US)
        assert path.read_bytes() == content
        assert sorted(p.name for p in tmp_path.iterdir()) == ["job.ledger"]

    def test_a9_other_sqlite_database_is_refused_and_untouched(self, tmp_path: Path) -> None:
        """A9: a SQLite file that is not a ledger (say, the SQLite output) is left alone."""
        path = tmp_path / "job.ledger"
        with sqlite_db(path) as conn:
            conn.execute("CREATE TABLE results (seq INTEGER PRIMARY KEY)")
        conn.close()
        before = hashlib.sha256(path.read_bytes()).hexdigest()
        with pytest.raises(JobFileError, match="not an asin-broker job ledger"):
            Ledger.open(path, fingerprint=FP, default_marketplace=US)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before

    def test_a_ledger_without_error_codes_is_read_and_given_them(self, tmp_path: Path) -> None:
        """A ledger of an older broker (no rows.code column) opens: the column is added, its
        invalid rows read as InvalidAsin, and rows ingested now keep their own code."""
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(job_rows(asin(1), None))
        with sqlite_db(tmp_path / "job.ledger") as db:
            db.executescript(_ROWS_BEFORE_CODES)
        with open_ledger(tmp_path) as ledger:
            (old,) = ledger.invalid_rows()
            assert old.error_code == "InvalidAsin"
        with open_ledger(tmp_path, new_job=True) as ledger:
            ledger.ingest([JobRow(1, "{", None, error="not valid JSON", code="InvalidRow")])
            (new,) = ledger.invalid_rows()
            assert new.error_code == "InvalidRow"

    def test_a_ledger_this_broker_writes_is_refused_by_brokers_that_read_version_2(
        self, tmp_path: Path
    ) -> None:
        """A ledger written now says version 3: brokers from before the rows.code column,
        the pinned answer settings and the image_url and cached columns read version 1
        only, those before CSV cells were kept from running as formulas read 2 at most, and
        both refuse it instead of mislabelling its rows or mixing two encodings in its CSV."""
        with open_ledger(tmp_path):
            pass
        with sqlite_db(tmp_path / "job.ledger") as db:
            version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'")
            assert version.fetchone() == (3,)

    def test_a_version_1_ledger_is_read_and_marked_version_3(self, tmp_path: Path) -> None:
        """A ledger of an older broker (version 1, no rows.code) is read, migrated and marked
        version 3, so the older broker no longer takes it back."""
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(job_rows(asin(1), None))
        with sqlite_db(tmp_path / "job.ledger") as db:
            db.executescript(_ROWS_BEFORE_CODES)
            db.execute("UPDATE meta SET value = 1 WHERE key = 'schema_version'")
        with open_ledger(tmp_path) as ledger:
            assert ledger.counts().total == 2
        with sqlite_db(tmp_path / "job.ledger") as db:
            version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'")
            assert version.fetchone() == (SCHEMA_VERSION,)

    def test_a_version_1_ledger_opened_for_another_job_stays_version_1(
        self, tmp_path: Path
    ) -> None:
        """A version-1 ledger opened by mistake for another job is refused (another job)
        and keeps its version, so the older broker that began it still resumes it."""
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(job_rows(asin(1)))
        with sqlite_db(tmp_path / "job.ledger") as db:
            db.execute("UPDATE meta SET value = 1 WHERE key = 'schema_version'")
        other = JobFingerprint(Path("/jobs/job.txt"), 999, FP.mtime_ns + 5, "d" * 64)
        with pytest.raises(JobMismatchError):
            open_ledger(tmp_path, other)
        with sqlite_db(tmp_path / "job.ledger") as db:
            version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'")
            assert version.fetchone() == (1,)

    def test_a_ledger_of_a_newer_broker_is_refused_and_left_untouched(self, tmp_path: Path) -> None:
        """A ledger a newer broker wrote (a higher version) is refused, new job or not, with
        what to do, and its bytes stay as they were."""
        with open_ledger(tmp_path):
            pass
        path = tmp_path / "job.ledger"
        with sqlite_db(path) as db:
            db.execute("UPDATE meta SET value = 9 WHERE key = 'schema_version'")
        before = path.read_bytes()
        for new_job in (False, True):
            with pytest.raises(JobFileError) as caught:
                open_ledger(tmp_path, new_job=new_job).close()
            message = str(caught.value)
            assert "version 9" in message
            assert "a newer broker" in message
            assert "--new-job" not in message
        assert path.read_bytes() == before

    def test_the_schema_version_names_the_schema_and_the_output_columns(self) -> None:
        """Changing the ledger's tables or the output's columns (or how a cell is written)
        means raising SCHEMA_VERSION (and pinning the new digest here): older brokers then
        refuse the ledger instead of resuming it under their own columns."""
        from broker.jobs import ledger as ledger_module
        from broker.jobs import sinks

        text = "\n".join(
            [
                ledger_module._SCHEMA_JOB,
                ledger_module._SCHEMA_LOOKUPS,
                ledger_module._SCHEMA_KEEP,
                ",".join(sinks.CSV_COLUMNS),
                sinks.SQLITE_RESULTS,
            ]
        )
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        assert (SCHEMA_VERSION, digest) == (3, _SCHEMA_DIGEST)

    def test_empty_file_becomes_a_ledger(self, tmp_path: Path) -> None:
        """An empty file (a crash right after creating it) is initialised, not refused."""
        (tmp_path / "job.ledger").touch()
        with open_ledger(tmp_path) as ledger:
            assert ledger.counts().total == 0

    def test_a6_changed_job_file_is_refused_in_one_sentence(self, tmp_path: Path) -> None:
        """A6: a changed file is refused in one sentence saying what changed; no hash dump."""
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(job_rows(asin(1)))
        edited = JobFingerprint(Path("/jobs/job.txt"), 121, FP.mtime_ns + 5, "b" * 64)
        with pytest.raises(JobMismatchError) as caught:
            open_ledger(tmp_path, edited)
        message = str(caught.value)
        assert message == (
            "/jobs/job.txt grew by 1 byte (now 121 bytes) since this job started: run with "
            "--new-job to start over on the new file, --refresh to fetch it beside this "
            "output, or restore the original to resume."
        )
        assert isinstance(caught.value, JobFileError)

    def test_same_content_moved_and_touched_resumes(self, tmp_path: Path) -> None:
        """Same bytes under another path and mtime (spool rename, cp) resume the job."""
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(job_rows(asin(1), asin(2)))
        moved = JobFingerprint(Path("/spool/work/job.txt"), FP.size, FP.mtime_ns + 10, FP.sha256)
        with open_ledger(tmp_path, moved) as ledger:
            assert ledger.ingest_complete
            assert ledger.total_rows == 2

    def test_the_same_rows_compressed_again_resume(self, tmp_path: Path) -> None:
        """A gzip job whose rows are the same but whose file is not (gzip -c again: its
        header holds a time) resumes under the new file's bytes; other rows are refused.
        It was refused as edited ("restore the original"), which nothing could do."""
        import gzip

        raw = b"B000000001\nB000000002\n"
        job = tmp_path / "job.txt.gz"
        job.write_bytes(gzip.compress(raw, mtime=1))
        first = fingerprint(job)
        assert first.content_sha256 == hashlib.sha256(raw).hexdigest()
        with open_ledger(tmp_path, first) as ledger:
            ledger.ingest(job_rows(asin(1)))
        job.write_bytes(gzip.compress(raw, mtime=2))
        again = fingerprint(job)
        assert again.sha256 != first.sha256
        with open_ledger(tmp_path, again) as ledger:
            assert ledger.total_rows == 1
        with open_ledger(tmp_path, again) as ledger:  # its bytes are the job's now
            assert ledger.total_rows == 1
        job.write_bytes(gzip.compress(raw + b"B000000003\n", mtime=2))
        with pytest.raises(JobMismatchError, match="since this job started"):
            open_ledger(tmp_path, fingerprint(job))
        job.write_bytes(gzip.compress(raw, mtime=3)[:-9])  # damaged: no content digest
        assert fingerprint(job).content_sha256 is None

    def test_a_gzip_job_an_older_broker_started_learns_its_content(self, tmp_path: Path) -> None:
        """A gzip job whose ledger an older broker started (no content digest) takes the
        digest at its next opening on the same bytes, so a later re-gzip of the same rows
        resumes too (it stayed refused as edited for ever)."""
        import gzip

        raw = b"B000000001\n"
        job = tmp_path / "job.txt.gz"
        job.write_bytes(gzip.compress(raw, mtime=1))
        first = fingerprint(job)
        older = JobFingerprint(first.path, first.size, first.mtime_ns, first.sha256)
        with open_ledger(tmp_path, older) as ledger:  # as an older broker started it
            ledger.ingest(job_rows(asin(1)))
        with open_ledger(tmp_path, first) as ledger:
            assert ledger.total_rows == 1
        job.write_bytes(gzip.compress(raw, mtime=2))
        with open_ledger(tmp_path, fingerprint(job)) as ledger:
            assert ledger.total_rows == 1

    def test_changed_default_marketplace_is_refused(self, tmp_path: Path) -> None:
        """Resuming with another default marketplace would mix marketplaces: refused."""
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(job_rows(asin(1)))
        with pytest.raises(JobMismatchError, match=DE) as caught:
            open_ledger(tmp_path, default_marketplace=DE)
        assert "--refresh" in str(caught.value)

    def test_changed_answer_settings_are_refused(self, tmp_path: Path) -> None:
        """Resuming with another protocol or resource list would mix two kinds of answers in
        one output: refused, naming the setting; the same settings resume, and a ledger
        started before settings were recorded takes the current ones."""
        settings = {"api.protocol": "creators", "api.resources": "itemInfo.title"}
        with open_ledger(tmp_path, answer_settings=settings) as ledger:
            ledger.ingest(job_rows(asin(1)))
        with open_ledger(tmp_path, answer_settings=settings):
            pass
        changed = {**settings, "api.resources": "itemInfo.title,offersV2.listings.price"}
        with pytest.raises(JobMismatchError, match=r"api\.resources = itemInfo\.title,"):
            open_ledger(tmp_path, answer_settings=changed)
        with pytest.raises(JobMismatchError, match=r"api\.protocol"):
            open_ledger(tmp_path, answer_settings={**settings, "api.protocol": "paapi5"})
        older = tmp_path / "older"
        older.mkdir()
        with open_ledger(older) as ledger:
            ledger.ingest(job_rows(asin(1)))
        with open_ledger(older, answer_settings=settings):
            pass
        with pytest.raises(JobMismatchError, match=r"api\.resources"):
            open_ledger(older, answer_settings=changed)

    def test_settings_adopted_by_a_job_with_done_rows_are_told(self, tmp_path: Path) -> None:
        """A job begun before settings were recorded, with rows done: the settings it takes
        now are logged (broker.job_settings_adopted), as its done rows may have been asked
        under others; they were pinned silently, and an output mixed two kinds of item. A
        job with no row done yet adopts them without a word."""
        settings = {"api.protocol": "creators", "api.resources": "itemInfo.title"}
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        with open_ledger(fresh) as ledger:
            ledger.ingest(job_rows(asin(1), None))  # an invalid row asks nothing
        with capture_logs() as quiet, open_ledger(fresh, answer_settings=settings):
            pass
        assert [e for e in quiet if e["event"] == "broker.job_settings_adopted"] == []
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(job_rows(asin(1)))
            finish_all(ledger)
        with capture_logs() as logs, open_ledger(tmp_path, answer_settings=settings):
            pass
        (told,) = [e for e in logs if e["event"] == "broker.job_settings_adopted"]
        assert told["settings"] == settings
        with capture_logs() as again, open_ledger(tmp_path, answer_settings=settings):
            pass
        assert [e for e in again if e["event"] == "broker.job_settings_adopted"] == []

    def test_new_job_resets_rows_but_keeps_budget(self, tmp_path: Path) -> None:
        """new_job drops rows, results and sink states; the daily counters survive."""
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(job_rows(asin(1), asin(2)))
            finish_all(ledger)
            ledger.set_sink_state("out", SinkState(100, 2))
            ledger.save("main", date(2026, 3, 1), 77)
        edited = JobFingerprint(FP.path, 10, FP.mtime_ns, "c" * 64)
        with open_ledger(tmp_path, edited, new_job=True) as ledger:
            assert not ledger.ingest_complete
            assert ledger.counts().total == 0
            assert ledger.sink_state("out") == SinkState(0, 0)
            assert ledger.load("main", date(2026, 3, 1)) == 77
            assert ledger.ingest(job_rows(asin(3))) == 1
            assert [lk.asin for lk in ledger.pending_lookups()] == [asin(3)]
        with open_ledger(tmp_path, edited) as ledger:
            assert ledger.total_rows == 1

    def test_synchronous_option(self, tmp_path: Path) -> None:
        """synchronous is FULL by default, NORMAL on request, anything else refused."""
        with open_ledger(tmp_path) as ledger:
            assert ledger._conn.execute("PRAGMA synchronous").fetchone() == (2,)
        with open_ledger(tmp_path, synchronous="normal") as ledger:
            assert ledger._conn.execute("PRAGMA synchronous").fetchone() == (1,)
        with pytest.raises(ValueError, match="FULL or NORMAL"):
            open_ledger(tmp_path, synchronous="OFF")


class TestIngest:
    def test_ingest_twice_adds_nothing(self, tmp_path: Path) -> None:
        """A second ingest of a complete job reads nothing and changes nothing."""
        rows = job_rows(asin(1), asin(2), None)
        with open_ledger(tmp_path) as ledger:
            assert ledger.ingest(rows) == 3
            assert ledger.ingest(rows) == 3
            assert ledger.ingest(iter(())) == 3
            assert ledger.counts().total == 3
            assert ledger.pending_lookup_count() == 2

    def test_a2_kill_mid_ingest_resumes_without_duplicates(self, tmp_path: Path) -> None:
        """A2: ingestion stopped half-way (committed chunks kept) resumes with every row once."""
        rows = job_rows(*(asin(i) if i % 4 else None for i in range(10)))

        def dies_after_seven() -> Iterator[JobRow]:
            yield from rows[:7]
            raise KeyboardInterrupt  # stands in for kill -9 mid-ingest

        with open_ledger(tmp_path) as ledger, pytest.raises(KeyboardInterrupt):
            ledger.ingest(dies_after_seven(), chunk=3)
        with open_ledger(tmp_path) as ledger:
            resumed_from = (ledger.ingest_complete, ledger.total_rows)
            assert resumed_from == (False, 6)  # two chunks of 3 committed
            assert ledger.ingest(rows, chunk=3) == 10
            assert ledger.ingest_complete
            finish_all(ledger)
            done = ledger.done_rows_after(0)
            assert ledger.counts().by_status == {"invalid": 3, "ok": 7}
        assert sorted(row.seq for row in done) == list(range(10))
        assert [row.done_order for row in done] == list(range(1, 11))

    def test_invalid_rows_are_final_at_ingest(self, tmp_path: Path) -> None:
        """Invalid rows get status invalid, the reason and a done_order, in file order."""
        rows = [
            JobRow(3, "B000000001", "B000000001"),
            JobRow(4, "12345", None, error="too short: 5 characters"),
            JobRow(7, "x", None, marketplace=DE, extra={"sku": "A-1"}, error="bad"),
        ]
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(rows)
            done = ledger.done_rows_after(0)
            counts = ledger.counts()
        assert [(r.done_order, r.seq, r.line, r.raw, r.asin) for r in done] == [
            (1, 1, 4, "12345", None),
            (2, 2, 7, "x", None),
        ]
        assert done[0].error_reason == "too short: 5 characters"
        assert done[0].marketplace == US
        assert done[1].marketplace == DE
        assert done[1].extra == {"sku": "A-1"}
        assert done[0].result is None
        assert done[0].status == "invalid"
        assert (counts.total, counts.done, counts.pending) == (3, 2, 1)
        assert counts.by_status == {"invalid": 2}

    def test_a_resumed_ingestion_goes_on_after_the_last_stored_row_s_line(
        self, tmp_path: Path
    ) -> None:
        """Resumed, ingestion skips the rows up to the last stored one's line, however many
        the source gives there (another encoding may read one line more or less as a row),
        and stores the rest after them."""
        rows = job_rows(*(asin(i) for i in range(6)))

        def dies() -> Iterator[JobRow]:
            yield from rows[:4]
            raise KeyboardInterrupt

        with open_ledger(tmp_path) as ledger:
            with pytest.raises(KeyboardInterrupt):
                ledger.ingest(dies(), chunk=2)
            assert ledger.stored_through_line == rows[3].line
            extra = JobRow(rows[1].line, "x", None, error="not an ASIN")  # read otherwise now
            assert ledger.ingest([rows[0], extra, *rows[2:]]) == 6
            assert sorted(lookup.asin for lookup in ledger.pending_lookups()) == [
                row.asin for row in rows
            ]


class TestWork:
    def test_duplicates_are_fetched_once_and_copied(self, tmp_path: Path) -> None:
        """Three rows of one ASIN: one pending lookup, one result, three rows done."""
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(job_rows(asin(7), asin(8), asin(7), asin(7)))
            lookups = list(ledger.pending_lookups())
            assert lookups == [Lookup(US, asin(7)), Lookup(US, asin(8))]
            assert ledger.pending_lookup_count() == 2
            assert ledger.record_results([(lookups[0], result(lookups[0]))]) == 3
            done = ledger.done_rows_after(0)
            assert [row.line for row in done] == [1, 3, 4]
            assert all(row.result == result(lookups[0]).to_json() for row in done)
            assert list(ledger.pending_lookups()) == [lookups[1]]
            assert ledger.counts().pending == 1

    def test_lookup_key_includes_marketplace_and_resources(self, tmp_path: Path) -> None:
        """The same ASIN in another marketplace or with other resources is another lookup."""
        rows = [
            JobRow(1, asin(1), asin(1)),
            JobRow(2, asin(1), asin(1), marketplace=US),
            JobRow(3, asin(1), asin(1), marketplace=DE),
            JobRow(4, asin(1), asin(1), resources=("ItemInfo.Title",)),
            JobRow(5, asin(1), asin(1), resources=()),
        ]
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(rows)
            assert list(ledger.pending_lookups()) == [
                Lookup(US, asin(1)),
                Lookup(DE, asin(1)),
                Lookup(US, asin(1), ("ItemInfo.Title",)),
                Lookup(US, asin(1), ()),
            ]
            assert finish_all(ledger) == 5

    def test_done_order_is_dense_and_monotonic(self, tmp_path: Path) -> None:
        """done_order runs 1, 2, 3... across ingest and every commit, each above the last."""
        ids = [asin(i % 5) if i % 7 else None for i in range(40)]
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(job_rows(*ids), chunk=6)
            seen = [row.done_order for row in ledger.done_rows_after(0)]
            for lookup in list(ledger.pending_lookups()):
                before = max(seen)
                ledger.record_results([(lookup, result(lookup, Status.NOT_FOUND))])
                new = [row.done_order for row in ledger.done_rows_after(before)]
                assert new
                assert min(new) == before + 1
                seen += new
            assert seen == list(range(1, 41))
            assert [r.done_order for r in ledger.done_rows_after(10, limit=3)] == [11, 12, 13]

    def test_repeated_result_is_ignored(self, tmp_path: Path) -> None:
        """At-least-once: a second result for a done lookup changes nothing."""
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(job_rows(asin(1), asin(1)))
            (lookup,) = ledger.pending_lookups()
            first = result(lookup)
            assert ledger.record_results([(lookup, first), (lookup, first)]) == 2
            assert ledger.record_results([(lookup, result(lookup, Status.FAILED))]) == 0
            done = ledger.done_rows_after(0)
            assert {row.status for row in done} == {"ok"}
            assert [row.result for row in done] == [first.to_json()] * 2
            assert ledger.counts().by_status == {"ok": 2}
            assert ledger.pending_lookup_count() == 0

    @pytest.mark.parametrize("how", ["deleted", "replaced"])
    def test_a_ledger_deleted_or_replaced_under_the_run_stops_it(
        self, tmp_path: Path, how: str
    ) -> None:
        """A ledger deleted (with its journals) or replaced while the run uses it fails the
        next commit, naming it, instead of committing into an unlinked file: the run went on
        and promised a resume that was then refused (its output had no ledger)."""
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(job_rows(asin(1), asin(2)))
            first, second = ledger.pending_lookups()
            assert ledger.record_results([(first, result(first))]) == 1
            for path in tmp_path.glob("*.ledger*"):
                if not path.name.endswith(".lock"):
                    path.unlink()
            if how == "replaced":
                ledger.path.write_bytes(b"")
            with pytest.raises(OSError, match=r"the job's ledger\) was moved, deleted or replaced"):
                ledger.record_results([(second, result(second))])

    def test_unknown_lookup_rolls_back_the_whole_batch(self, tmp_path: Path) -> None:
        """A lookup not in the job raises ValueError and nothing of the batch is recorded."""
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(job_rows(asin(1)))
            (known,) = ledger.pending_lookups()
            stranger = Lookup(US, asin(99))
            with pytest.raises(ValueError, match="not a lookup of this job"):
                ledger.record_results([(known, result(known)), (stranger, result(stranger))])
            assert ledger.pending_lookup_count() == 1
            assert ledger.done_rows_after(0) == []

    def test_pending_lookups_page_while_results_are_recorded(self, tmp_path: Path) -> None:
        """The stream is paged: recording results while iterating neither repeats nor skips."""
        # NORMAL: 1,200 single-result commits would otherwise spend seconds in fsync.
        with open_ledger(tmp_path, synchronous="NORMAL") as ledger:
            ledger.ingest(job_rows(*(asin(i) for i in range(1200))))
            yielded = []
            for lookup in ledger.pending_lookups():
                yielded.append(lookup.asin)
                ledger.record_results([(lookup, result(lookup))])
            assert yielded == [asin(i) for i in range(1200)]
            assert ledger.pending_lookup_count() == 0
            assert ledger.counts().by_status == {"ok": 1200}

    def test_pending_lookups_of_one_marketplace_across_pages(self, tmp_path: Path) -> None:
        """pending_lookups(marketplace) yields that marketplace's lookups only, in file order,
        over more than one page (broker run streams each marketplace on its own)."""
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(
                [JobRow(i + 1, asin(i), asin(i), US if i % 2 else DE) for i in range(2500)]
            )
            de = [lookup.asin for lookup in ledger.pending_lookups(DE)]
            assert de == [asin(i) for i in range(0, 2500, 2)]
            assert {lookup.marketplace for lookup in ledger.pending_lookups(US)} == {US}
            assert len(list(ledger.pending_lookups())) == 2500
            # Each page walks the pending ids, never every lookup of the marketplace sorted
            # anew (that cost a second a page on a job of a million rows).
            for sql, args in ((_PENDING_SQL, (0, 10)), (_PENDING_IN_SQL, (0, DE, 10))):
                plan = " ".join(
                    str(row[-1]) for row in ledger._conn.execute("EXPLAIN QUERY PLAN " + sql, args)
                )
                assert "lookups_pending" in plan
                assert "TEMP B-TREE" not in plan

    def test_pending_by_marketplace_reads_the_pending_index(self, tmp_path: Path) -> None:
        """The count of pending lookups per marketplace walks the pending index, in file
        order, not lookups_key (ASIN order: a random read per lookup, 7.9 s for 3 million,
        which froze a daemon's /healthz and signals at each job's start)."""
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(
                [JobRow(i + 1, asin(i), asin(i), US if i % 2 else DE) for i in range(100)]
            )
            assert ledger.pending_by_marketplace() == {US: 50, DE: 50}
            plan = " ".join(
                str(row[-1])
                for row in ledger._conn.execute("EXPLAIN QUERY PLAN " + _PENDING_BY_MARKET_SQL)
            )
            assert "lookups_key" not in plan
            assert "lookups_pending" in plan

    def test_results_survive_reopen_and_map_to_rows(self, tmp_path: Path) -> None:
        """Committed results, statuses and counts are there after close and reopen."""
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(job_rows(asin(1), None, asin(2)))
            first, second = ledger.pending_lookups()
            ledger.record_results([(first, result(first)), (second, result(second, Status.FAILED))])
        with open_ledger(tmp_path) as ledger:
            counts = ledger.counts()
            done = ledger.done_rows_after(0)
        assert (counts.total, counts.done, counts.pending) == (3, 3, 0)
        assert counts.by_status == {"failed": 1, "invalid": 1, "ok": 1}
        by_line = {row.line: row for row in done}
        assert by_line[1].result is not None
        assert by_line[1].result["key"] == "main"
        assert by_line[1].result["fetched_at"] == "2026-03-01T12:00:00.000Z"
        assert by_line[3].status == "failed"

    def test_invalid_rows_lists_ingest_and_amazon_rejections(self, tmp_path: Path) -> None:
        """invalid_rows() yields rows invalid at ingest and ids Amazon called invalid."""
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(job_rows(asin(1), None, asin(2)))
            first, second = ledger.pending_lookups()
            rejected = ItemResult(
                asin(2), US, Status.INVALID, error=ErrorDetail("InvalidParameterValue", "no", "x")
            )
            ledger.record_results([(first, result(first)), (second, rejected)])
            assert [(r.line, r.error_reason) for r in ledger.invalid_rows()] == [
                (2, "not an ASIN: '???'"),
                (3, None),
            ]

    def test_invalid_rows_pages_past_the_first_page(self, tmp_path: Path) -> None:
        """invalid_rows() yields every invalid row of a job with more than one page of them."""
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(job_rows(*(None if i % 2 else asin(i) for i in range(3000))))
            assert [row.line for row in ledger.invalid_rows()] == list(range(2, 3001, 2))

    def test_done_rows_in_file_order_pages_past_the_first_page(self, tmp_path: Path) -> None:
        """done_rows_in_file_order() yields every done row once, in file order, over pages,
        whatever order the rows were done in, and leaves out pending rows."""
        ids = [asin(i) if i % 5 else None for i in range(2502)]
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(job_rows(*ids))
            lookups = list(ledger.pending_lookups())
            pending = lookups.pop()  # the last row (seq 2501) stays pending
            assert pending.asin == asin(2501)
            for half in (lookups[1000:], lookups[:1000]):  # the later rows done first
                ledger.record_results([(lk, result(lk)) for lk in half])
            rows = list(ledger.done_rows_in_file_order())
        assert [row.seq for row in rows] == list(range(2501))
        assert rows[0].done_order == 1  # invalid at ingest, done before the lookups
        assert rows[1].done_order > rows[-1].done_order


class TestReadTally:
    def test_a_closed_ledger_is_read_and_left_without_journal_files(self, tmp_path: Path) -> None:
        """The rows by status of a ledger no run has open are read, and its folder is left as
        the run left it: a read-only reader made -wal and -shm files it could not remove (a
        run stopped by a changed job file, exit 65, kept them beside the output)."""
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(job_rows("B000000001", "B000000002", None))
            finish_all(ledger)
            path = ledger.path
        before = sorted(os.listdir(tmp_path))
        assert read_tally(path) == {"ok": 2, "invalid": 1}
        assert sorted(os.listdir(tmp_path)) == before

    def test_a_ledger_a_run_holds_is_read_live(self, tmp_path: Path) -> None:
        """While a run writes its ledger, its rows are read from the side (the daemon's
        /metrics), pending ones among them, and the run's files stay."""
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(job_rows("B000000001", "B000000002"))
            assert read_tally(ledger.path) == {"pending": 2}
            finish_all(ledger)
            assert read_tally(ledger.path) == {"ok": 2}

    def test_no_ledger_reads_as_none_and_is_not_made(self, tmp_path: Path) -> None:
        """A ledger not made yet reads as None, and no file is made for it."""
        assert read_tally(tmp_path / "none.ledger") is None
        assert os.listdir(tmp_path) == []


class TestSinkStateAndBudget:
    def test_sink_state_round_trip(self, tmp_path: Path) -> None:
        """A sink's state is (0, 0) when new and what was last set afterwards."""
        with open_ledger(tmp_path) as ledger:
            assert ledger.sink_state("out") == SinkState(0, 0)
            ledger.set_sink_state("out", SinkState(10, 1))
            ledger.set_sink_state("out", SinkState(25, 2))
        with open_ledger(tmp_path) as ledger:
            assert ledger.sink_state("out") == SinkState(25, 2)
            assert ledger.sink_state("other") == SinkState()

    def test_an_output_is_ordered_only_as_the_ordered_export_left_it(self, tmp_path: Path) -> None:
        """is_ordered holds after an ordered state is set, not after rows are added, and not
        for a job started over (whose new output may reach the same size)."""
        with open_ledger(tmp_path) as ledger:
            assert not ledger.is_ordered("out")
            ledger.set_sink_state("out", SinkState(25, 2), ordered=True)
            assert ledger.is_ordered("out")
            assert not ledger.is_ordered("other")
            ledger.set_sink_state("out", SinkState(40, 3))
            assert not ledger.is_ordered("out")
            ledger.set_sink_state("out", SinkState(40, 3), ordered=True)
        with open_ledger(tmp_path) as ledger:
            assert ledger.is_ordered("out")
        with open_ledger(tmp_path, new_job=True) as ledger:
            ledger.set_sink_state("out", SinkState(40, 3))
            assert not ledger.is_ordered("out")

    def test_budget_store_round_trip(self, tmp_path: Path) -> None:
        """load/save keep per-key, per-day counts across reopen; date and ISO text agree."""
        day = date(2026, 3, 1)
        with open_ledger(tmp_path) as ledger:
            assert ledger.load("main", day) == 0
            ledger.save("main", day, 5)
            ledger.save("main", day, 8)
            ledger.save("spare", "2026-03-01", 1)
        with open_ledger(tmp_path) as ledger:
            assert ledger.load("main", day) == 8
            assert ledger.load("main", "2026-03-01") == 8
            assert ledger.load("spare", day) == 1
            assert ledger.load("main", date(2026, 3, 2)) == 0


class TestFailures:
    def test_a7_disk_full_is_an_os_error_and_rolls_back(self, tmp_path: Path) -> None:
        """A7: a full disk under the ledger raises OSError(ENOSPC) and records nothing."""
        with open_ledger(tmp_path) as ledger:
            ledger.ingest(job_rows(*(asin(i) for i in range(2000))))
            results = [(lk, result(lk)) for lk in ledger.pending_lookups()]
            conn = ledger._conn
            (pages,) = conn.execute("PRAGMA page_count").fetchone()
            conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk has no room left
            with pytest.raises(OSError, match="disk full") as caught:
                ledger.record_results(results)
            assert caught.value.errno == errno.ENOSPC
            assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
            assert ledger.counts().done == 0
            assert ledger.pending_lookup_count() == 2000
            conn.execute("PRAGMA max_page_count = 1073741823")  # space freed
            assert ledger.record_results(results) == 2000
            done = ledger.done_rows_after(1995)
            assert [row.done_order for row in done] == list(range(1996, 2001))

    def test_a_full_disk_at_close_is_an_os_error_naming_the_ledger(self, tmp_path: Path) -> None:
        """A full disk that keeps the ledger's pages in its -wal at close raises ENOSPC naming
        the ledger, and closes it all the same (SQLite's own copy at close failed silently:
        a refresh then moved the ledger into place without its pages, damaged)."""
        ledger = open_ledger(tmp_path)
        ledger.ingest(job_rows(*(asin(i) for i in range(20))))
        real = ledger._conn
        ledger._conn = FullAtCheckpoint(real)  # type: ignore[assignment]
        with pytest.raises(OSError, match="disk full") as caught:
            ledger.close()
        assert caught.value.errno == errno.ENOSPC
        assert caught.value.filename == str(ledger.path)
        with pytest.raises(sqlite3.ProgrammingError):
            real.execute("SELECT 1")  # closed

    def test_a_reader_at_close_is_no_error_and_a_second_close_nothing(self, tmp_path: Path) -> None:
        """A reader on an older snapshot (a sqlite3 shell in BEGIN; SELECT) keeping pages in
        the -wal at close is no error: the ledger is whole with its log, and a completed run
        exited 74 (a daemon stopped). A second close does nothing."""
        ledger = open_ledger(tmp_path)
        with sqlite_db(ledger.path, isolation_level=None) as reader:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM sqlite_master").fetchone()
            ledger.ingest(job_rows(*(asin(i) for i in range(20))))
            ledger.close()
            ledger.close()
            assert not self_contained(ledger.path)  # its pages wait in the -wal, whole with it
            reader.execute("COMMIT")
        with open_ledger(tmp_path) as again:
            assert again.total_rows == 20

    def test_an_error_ending_the_block_is_not_masked_by_the_close(self, tmp_path: Path) -> None:
        """The error that ended a ``with`` block is the one raised, not a full disk's at close
        (the pages stay in the -wal beside the ledger, whole with it)."""

        def fails() -> None:
            with open_ledger(tmp_path) as ledger:
                ledger._conn = FullAtCheckpoint(ledger._conn)  # type: ignore[assignment]
                raise ValueError("the block's own")

        with pytest.raises(ValueError, match="the block's own"):
            fails()

    def test_crash_hook_signals_once_at_the_nth_hit_of_its_point(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The crash hook fires at the n-th hit of the named point only; ``before`` is KILL-only."""
        seen: list[str] = []
        previous = signal.signal(signal.SIGUSR1, lambda *_: seen.append("signal"))
        try:
            monkeypatch.setenv(CRASH_ENV, "test_point_a:2:USR1")
            for name in ("test_point_b", "test_point_a", "test_point_a", "test_point_a"):
                crash_point(name, before=lambda name=name: seen.append(f"before {name}"))
                seen.append(f"passed {name}")
        finally:
            signal.signal(signal.SIGUSR1, previous)
        assert seen == [
            "passed test_point_b",
            "passed test_point_a",
            "signal",
            "passed test_point_a",
            "passed test_point_a",
        ]
        assert "mid_commit" in CRASH_POINTS


class TestHeldByAnotherProgram:
    """A ledger another program holds in a transaction (a sqlite3 shell's BEGIN EXCLUSIVE)."""

    def test_at_the_start_it_is_an_os_error_saying_to_close_it(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Opening it is an OSError (exit 74) saying another program holds it: it was "cannot
        be read as a job ledger", with advice to move a healthy ledger away (65)."""
        open_ledger(tmp_path).close()
        connect = sqlite3.connect
        monkeypatch.setattr(
            sqlite3, "connect", lambda *a, **k: connect(*a, **{**k, "timeout": 0.05})
        )
        with sqlite_db(tmp_path / "job.ledger", isolation_level=None) as holder:
            holder.execute("BEGIN EXCLUSIVE")
            try:
                with pytest.raises(OSError, match="held by another program") as caught:
                    open_ledger(tmp_path)
            finally:
                holder.execute("ROLLBACK")
        assert caught.value.errno == errno.EBUSY
        assert not isinstance(caught.value, JobFileError)
        assert str(tmp_path / "job.ledger") in str(caught.value)
        open_ledger(tmp_path).close()  # untouched, and whole

    def test_mid_run_it_is_an_os_error_not_an_internal_one(self, tmp_path: Path) -> None:
        """A statement meeting it mid-run is an OSError (exit 74) saying another program
        holds it: it was a bare sqlite3 "database is locked", an internal error (exit 1)."""
        ledger = open_ledger(tmp_path)
        try:
            ledger.ingest(job_rows(*(asin(i) for i in range(20))))
            results = [(lk, result(lk)) for lk in ledger.pending_lookups()]
            ledger._conn.execute("PRAGMA busy_timeout = 50")
            with sqlite_db(tmp_path / "job.ledger", isolation_level=None) as holder:
                holder.execute("BEGIN EXCLUSIVE")
                try:
                    with pytest.raises(OSError, match="held by another program") as caught:
                        ledger.record_results(results)
                finally:
                    holder.execute("ROLLBACK")
            assert caught.value.errno == errno.EBUSY
            assert ledger.record_results(results) == 20  # let go: the run goes on
        finally:
            ledger.close()


_HOLDER = """
import sys
from pathlib import Path
from broker.jobs.lock import JobLock
lock = JobLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
sys.stdin.read()
"""


class TestLock:
    def test_a8_second_process_is_refused_with_holder_pid(self, tmp_path: Path) -> None:
        """A8: while a process holds the job, another is refused and told the holder's PID."""
        ledger_path = tmp_path / "job.ledger"
        with subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(ledger_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as holder:
            try:
                assert holder.stdout is not None
                assert holder.stdout.readline().strip() == "held"
                with pytest.raises(JobLockedError) as caught:
                    JobLock(ledger_path).acquire()
                assert caught.value.pid == holder.pid
                assert str(holder.pid) in str(caught.value)
                assert isinstance(caught.value, JobFileError)
            finally:
                holder.kill()
        # The dead holder's PID is still in the file, but its flock died with it.
        assert (tmp_path / "job.ledger.lock").read_text().strip() == str(holder.pid)
        with JobLock(ledger_path) as lock:
            assert lock.held
            assert (tmp_path / "job.ledger.lock").read_text().strip() == str(os.getpid())

    def test_a_held_lock_speaks_of_the_output_not_only_this_job(self, tmp_path: Path) -> None:
        """The lock is the output's: its holder may be another job writing the same output,
        and the message says so, with the way out (another output); it said "this job is
        being run" to a different job that shared an --out."""
        first = JobLock(tmp_path / "out.jsonl.ledger").acquire()
        try:
            with pytest.raises(JobLockedError) as caught:
                JobLock(tmp_path / "out.jsonl.ledger").acquire()
        finally:
            first.close()
        message = str(caught.value)
        assert "another one with the same output" in message
        assert "an output of its own" in message
        assert "this job is being run" not in message

    def test_lock_is_exclusive_in_process_and_released_on_close(self, tmp_path: Path) -> None:
        """A second JobLock is refused while the first is held, and succeeds after close."""
        first = JobLock(tmp_path / "job.ledger").acquire()
        with pytest.raises(JobLockedError, match=str(os.getpid())):
            JobLock(tmp_path / "job.ledger").acquire()
        first.close()
        assert not first.held
        with JobLock(tmp_path / "job.ledger") as second:
            assert second.held
        assert stat.S_IMODE((tmp_path / "job.ledger.lock").stat().st_mode) == 0o600

    @pytest.mark.parametrize("dangling", [False, True])
    def test_a_link_at_the_locks_name_is_refused_not_written_through(
        self, tmp_path: Path, dangling: bool
    ) -> None:
        """A symbolic link planted at the lock's name (a shared output folder) is refused:
        taking the lock truncated the file it named and wrote a PID into it, or made it."""
        victim = tmp_path / "precious.txt"
        if not dangling:
            victim.write_text("keep me\n")
        (tmp_path / "job.ledger.lock").symlink_to(victim)
        with pytest.raises(OSError, match="is a symbolic link"):
            JobLock(tmp_path / "job.ledger").acquire()
        if dangling:
            assert not victim.exists()
        else:
            assert victim.read_text() == "keep me\n"

    def test_held_elsewhere_tells_without_taking_or_creating(self, tmp_path: Path) -> None:
        """held_elsewhere: False with no lock file (none is created) or a free one, True
        while another holder has it, and the lock stays free for the next to take."""
        probe = JobLock(tmp_path / "job.ledger")
        assert not probe.held_elsewhere()
        assert not (tmp_path / "job.ledger.lock").exists()
        holder = JobLock(tmp_path / "job.ledger").acquire()
        assert probe.held_elsewhere()
        holder.close()
        assert not probe.held_elsewhere()
        with JobLock(tmp_path / "job.ledger") as again:
            assert again.held


def test_a_ledger_damaged_inside_is_a_job_file_error_naming_it(tmp_path: Path) -> None:
    """A ledger whose header opens but one of whose pages is damaged (found only when a
    statement reads it) is a JobFileError naming the file and saying it was left untouched
    (exit 65), whichever statement finds it; it was a bare sqlite3.DatabaseError, an
    "internal error" (exit 1) after the run had sent its requests."""
    with open_ledger(tmp_path) as ledger:
        ledger.ingest(_rows(3000))
    path = tmp_path / "job.ledger"
    with sqlite_db(path) as conn:
        pages = [
            page
            for (page,) in conn.execute(
                "SELECT pageno FROM dbstat WHERE name = 'lookups' AND pagetype = 'leaf' "
                "ORDER BY pageno"
            )
        ]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    with path.open("r+b") as file:
        file.seek((pages[len(pages) // 2] - 1) * page_size)
        file.write(b"\xde\xad\xbe\xef" * (page_size // 4))
    with open_ledger(tmp_path) as ledger:
        with pytest.raises(JobFileError, match="damaged") as info:
            list(ledger.pending_lookups())
        assert str(path) in str(info.value)
        assert "left untouched" in str(info.value)
        with pytest.raises(JobFileError, match="damaged"):
            ledger.fetched_range()  # a scan of every lookup


def _rows(count: int) -> Iterator[JobRow]:
    """``count`` rows: half of them duplicates, one in a hundred invalid."""
    for i in range(count):
        if i % 100 == 99:
            yield JobRow(i + 1, "bad", None, error="not an ASIN")
        else:
            value = asin(i % (count // 2))
            yield JobRow(i + 1, value, value)


def _measure(tmp_path: Path, count: int) -> tuple[float, float, int]:
    """Ingest ``count`` rows and stream the pending lookups under tracemalloc.

    Returns (seconds, peak MB, lookups streamed).
    """
    tracemalloc.start()
    try:
        started = time.perf_counter()
        with open_ledger(tmp_path) as ledger:
            assert ledger.ingest(_rows(count)) == count
            streamed = sum(1 for _ in ledger.pending_lookups())
            assert streamed == ledger.pending_lookup_count()
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()
    return elapsed, peak, streamed


class TestScale:
    def test_ingest_and_stream_memory_is_flat(self, tmp_path: Path) -> None:
        """100,000 rows ingest and stream with a traced peak of a few MB, not O(rows)."""
        elapsed, peak, streamed = _measure(tmp_path, 100_000)
        print(f"\n100k rows: {elapsed:.2f} s under tracemalloc, peak {peak:.1f} MB")
        assert streamed == 49_500
        assert peak < 20

    @pytest.mark.slow
    def test_million_rows(self, tmp_path: Path) -> None:
        """1,000,000 rows ingest and stream with a traced peak under 50 MB (run with -m slow)."""
        elapsed, peak, streamed = _measure(tmp_path, 1_000_000)
        print(f"\n1M rows: {elapsed:.1f} s under tracemalloc, peak {peak:.1f} MB")
        assert streamed == 495_000
        assert peak < 50
