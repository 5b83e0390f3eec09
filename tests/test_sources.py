"""Tests for broker.jobs.sources: job files in, one JobRow per input row out.

The bad-input cases C1-C11 of reliability.md section 3.3 are marked in the test names; the
same cases through ``broker run``, and C8 (constant memory), are in tests/test_bad_input.py.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.errors import JobFileError
from broker.jobs import sources
from broker.jobs.sources import (
    DEFAULT_MAX_LINE_BYTES,
    JobFingerprint,
    JobRow,
    count_rows,
    detect_format,
    fingerprint,
    read_job,
)

VALID = "B0ABCDEFGH"


def write(tmp_path: Path, name: str, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, bytes as is) to ``tmp_path / name``, gzipping .gz names."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    return path


def rows(path: Path, **options: object) -> list[JobRow]:
    return list(read_job(path, **options))  # type: ignore[arg-type]


def brief(found: list[JobRow]) -> list[tuple[int, str | None, str | None]]:
    """(line, asin, error) per row, the part most tests pin."""
    return [(row.line, row.asin, row.error) for row in found]


class TestEmpty:
    @pytest.mark.parametrize(
        "name", ["job.txt", "job.csv", "job.jsonl", "job.txt.gz", "job.csv.gz", "job.bin"]
    )
    def test_c1_empty_file_has_no_rows(self, tmp_path: Path, name: str) -> None:
        """C1: an empty file, of any format, yields no rows and counts 0."""
        path = write(tmp_path, name, b"")
        assert rows(path) == []
        assert count_rows(path) == 0

    def test_c1_zero_byte_gz_is_empty(self, tmp_path: Path) -> None:
        """C1: a zero-byte file named .gz is empty, not a gzip error."""
        path = tmp_path / "job.txt.gz"
        path.write_bytes(b"")
        assert rows(path) == []

    @pytest.mark.parametrize(
        ("name", "data"),
        [
            ("job.txt", "\n\n# only a comment\n   \n\t# indented comment\n"),
            ("job.csv", "\r\n\r\n"),
            ("job.csv", "asin,sku\r\n"),
            ("job.jsonl", "\n  \n"),
        ],
    )
    def test_c1_blank_and_comment_only_files(self, tmp_path: Path, name: str, data: str) -> None:
        """C1: blank lines, comments or a lone CSV header yield no rows."""
        path = write(tmp_path, name, data)
        assert rows(path) == []
        assert count_rows(path) == 0


class TestPlainText:
    def test_rows_keep_physical_line_numbers(self, tmp_path: Path) -> None:
        """Blank and comment lines yield nothing but still count for line numbers."""
        path = write(
            tmp_path,
            "job.txt",
            f"# header comment\n\n{VALID}\n  b0abcdefgh  # trailing comment\n\n{VALID}\n",
        )
        assert brief(rows(path)) == [(3, VALID, None), (4, VALID, None), (6, VALID, None)]

    def test_raw_is_the_id_without_comment(self, tmp_path: Path) -> None:
        """raw holds the id as written, stripped and without its trailing comment."""
        path = write(tmp_path, "job.txt", "  b0abcdefgh\t# note\n")
        (row,) = rows(path)
        assert row == JobRow(1, "b0abcdefgh", VALID)

    def test_url_fragment_is_not_a_comment(self, tmp_path: Path) -> None:
        """A '#' inside a URL is a fragment, not a comment; only '#' after whitespace is."""
        url = f"https://www.amazon.com/dp/{VALID}#reviews"
        path = write(tmp_path, "job.txt", f"{url}\n{url} # mine\n")
        assert [(row.raw, row.asin) for row in rows(path)] == [(url, VALID), (url, VALID)]

    def test_urls_of_every_form(self, tmp_path: Path) -> None:
        """Amazon product URLs on any domain give their ASIN."""
        urls = [
            f"https://www.amazon.com/dp/{VALID}?th=1",
            f"https://www.amazon.co.uk/gp/product/{VALID}/ref=x",
            f"https://www.amazon.de/gp/aw/d/{VALID}",
            f"https://www.amazon.de/K\u00fcche/dp/{VALID}",
        ]
        path = write(tmp_path, "job.txt", "\n".join(urls))
        assert [row.asin for row in rows(path)] == [VALID] * 4

    def test_crlf_and_no_final_newline(self, tmp_path: Path) -> None:
        """CRLF endings and a last line without a newline are read."""
        path = write(tmp_path, "job.txt", f"{VALID}\r\nb0abcdefgh")
        assert brief(rows(path)) == [(1, VALID, None), (2, VALID, None)]

    def test_c2_mixed_bad_ids(self, tmp_path: Path) -> None:
        """C2: 9/11-char ids, symbols, full-width digits, spaces are invalid with line numbers;
        lowercase is normalised and valid rows come through."""
        lines = [
            "B0ABCDEFG",  # 9
            "B0ABCDEFGHI",  # 11
            "B0ABC$DEFG",  # symbol
            "B0ABCDEFG１",  # full-width digit
            "B0ABC DEFGH",  # space inside
            "b0abcdefgh",  # lowercase, valid
            VALID,
        ]
        found = rows(write(tmp_path, "job.txt", "\n".join(lines) + "\n"))
        assert [row.line for row in found] == [1, 2, 3, 4, 5, 6, 7]
        assert [row.raw for row in found] == lines
        assert [row.asin for row in found] == [None] * 5 + [VALID, VALID]
        reasons = [row.error or "" for row in found]
        assert "has 9" in reasons[0]
        assert "has 11" in reasons[1]
        assert "'$'" in reasons[2]
        assert "U+FF11" in reasons[3]
        assert "whitespace" in reasons[4]
        assert reasons[5:] == ["", ""]
        assert [row.valid for row in found] == [False] * 5 + [True, True]

    def test_c3_isbn_rules(self, tmp_path: Path) -> None:
        """C3: ISBN-10 ending in X valid; bad checksum invalid; 978 ISBN-13 converted only
        when enabled."""
        path = write(tmp_path, "job.txt", "080442957X\n0306406153\n9780306406157\n")
        assert [row.asin for row in rows(path)] == ["080442957X", None, None]
        converted = rows(path, convert_isbn13=True)
        assert [row.asin for row in converted] == ["080442957X", None, "0306406152"]
        assert converted[2].raw == "9780306406157"
        assert "check digit" in (converted[1].error or "")


class TestCsv:
    def test_c4_no_asin_column_lists_headers(self, tmp_path: Path) -> None:
        """C4: a CSV without an asin column is refused, listing the headers found."""
        path = write(tmp_path, "job.csv", "sku,title,product id\n1,x,B0ABCDEFGH\n")
        with pytest.raises(JobFileError, match="no 'asin' column") as caught:
            rows(path)
        message = str(caught.value)
        assert "'sku', 'title', 'product id'" in message
        assert "line 1" in message
        with pytest.raises(JobFileError):
            count_rows(path)

    def test_duplicate_asin_columns_are_refused(self, tmp_path: Path) -> None:
        """Two asin columns are ambiguous, so the file is refused."""
        path = write(tmp_path, "job.csv", "asin,ASIN\nB0ABCDEFGH,B0ABCDEFGH\n")
        with pytest.raises(JobFileError, match="2 'asin' columns"):
            rows(path)

    def test_c5_bom_crlf_and_quoted_fields(self, tmp_path: Path) -> None:
        """C5: a BOM, CRLF endings and quoted fields (commas, quotes, newlines) parse right."""
        data = (
            "\ufeffASIN,sku,Marketplace,note\r\n"
            f'{VALID},"A,1",www.amazon.de,"say ""hi"""\r\n'
            f'"b0abcdefgh",B2,,"two\r\nlines"\r\n'
            f"0306406152,C3, www.amazon.co.uk ,plain\r\n"
        )
        found = rows(write(tmp_path, "job.csv", data.encode("utf-8")))
        assert brief(found) == [(2, VALID, None), (3, VALID, None), (5, "0306406152", None)]
        assert found[0].extra == {"sku": "A,1", "note": 'say "hi"'}
        assert found[0].marketplace == "www.amazon.de"
        assert found[1].extra == {"sku": "B2", "note": "two\r\nlines"}
        assert found[1].marketplace is None
        assert found[1].raw == "b0abcdefgh"
        assert found[2].marketplace == "www.amazon.co.uk"
        assert all(row.resources is None for row in found)

    def test_a_resources_column_is_each_rows_resources(self, tmp_path: Path) -> None:
        """A CSV ``resources`` column (any case) holds each row's resources, separated by
        commas, semicolons, bars or blanks, as a JSON Lines row's list; an empty cell means
        the configured ones. It travelled as pass-through data, every row looked up with
        the configured resources and nothing said."""
        data = (
            "asin, Resources ,note\n"
            f'{VALID},"itemInfo.title, images.primary.large",a\n'
            f"{VALID},itemInfo.title;offersV2.listings.price,b\n"
            f"{VALID},,c\n"
        )
        found = rows(write(tmp_path, "job.csv", data))
        assert [row.resources for row in found] == [
            ("itemInfo.title", "images.primary.large"),
            ("itemInfo.title", "offersV2.listings.price"),
            None,
        ]
        assert [row.extra for row in found] == [{"note": "a"}, {"note": "b"}, {"note": "c"}]

    def test_bom_with_utf8_sig_encoding(self, tmp_path: Path) -> None:
        """encoding='utf-8-sig' works the same as the utf-8 default."""
        path = write(tmp_path, "job.csv", f"\ufeffasin\n{VALID}\n")
        assert brief(rows(path, encoding="utf-8-sig")) == [(2, VALID, None)]

    def test_short_and_long_rows_are_still_rows(self, tmp_path: Path) -> None:
        """A short row is padded; surplus empty cells are ignored; surplus data makes the
        row invalid, since its columns cannot be trusted; each is one row."""
        data = f"sku,asin,title\nS1,{VALID}\nS2\nS3,{VALID},t,,\nS4,{VALID},t,extra\n"
        found = rows(write(tmp_path, "job.csv", data))
        assert [row.line for row in found] == [2, 3, 4, 5]
        assert found[0].asin == VALID
        assert found[0].extra == {"sku": "S1", "title": ""}
        assert found[1].asin is None
        assert "no asin value" in (found[1].error or "")
        assert found[2].asin == VALID
        assert found[3].asin is None
        assert found[3].raw == VALID
        assert "4 fields but the header has 3" in (found[3].error or "")

    def test_blank_rows_are_skipped(self, tmp_path: Path) -> None:
        """Blank lines and all-blank rows (',,') yield no row; an empty asin cell does."""
        data = f"asin,sku\n\n,\n , \n,S1\n{VALID},S2\n"
        found = rows(write(tmp_path, "job.csv", data))
        assert brief(found) == [(5, None, "empty id"), (6, VALID, None)]

    @pytest.mark.parametrize("delimiter", [";", "\t", "|"])
    def test_other_delimiters_found_from_header(self, tmp_path: Path, delimiter: str) -> None:
        """A header that only splits into an asin column on ; tab or | picks that delimiter."""
        data = f"asin{delimiter}sku\n{VALID}{delimiter}S,1\n"
        (row,) = rows(write(tmp_path, "job.csv", data))
        assert (row.asin, row.extra) == (VALID, {"sku": "S,1"})

    def test_duplicate_and_empty_header_names(self, tmp_path: Path) -> None:
        """Repeated names get .1 suffixes and unnamed columns a positional name."""
        data = f"asin,tag,tag,\n{VALID},a,b,c\n"
        (row,) = rows(write(tmp_path, "job.csv", data))
        assert row.extra == {"tag": "a", "tag.1": "b", "column4": "c"}

    def test_a_duplicate_suffix_never_takes_a_real_columns_name(self, tmp_path: Path) -> None:
        """``note,note,note.1``: the second note becomes note.2, since note.1 is taken by
        a column of that name; it became note.1 too, and one value was lost."""
        data = f"asin,note,note,note.1\n{VALID},a,b,c\n"
        (row,) = rows(write(tmp_path, "job.csv", data))
        assert row.extra == {"note": "a", "note.2": "b", "note.1": "c"}

    def test_an_unnamed_column_never_takes_a_named_ones_name(self, tmp_path: Path) -> None:
        """``asin,,column2``: the header's own column2 keeps its name and its cell, and the
        unnamed column is column2.1; the unnamed one took column2 (and its data went under
        the other's name)."""
        data = f"asin,,column2,cached\n{VALID},a,b,c\n"
        (row,) = rows(write(tmp_path, "job.csv", data))
        assert row.extra == {"column2.1": "a", "column2": "b", "cached": "c"}
        assert list(row.extra or {}) == ["column2.1", "column2", "cached"]  # column order

    def test_no_extra_columns_gives_none(self, tmp_path: Path) -> None:
        """extra is None when the CSV has no other columns."""
        (row,) = rows(write(tmp_path, "job.csv", f"asin,marketplace\n{VALID},\n"))
        assert row.extra is None

    def test_unterminated_quote_costs_one_row(self, tmp_path: Path) -> None:
        """A runaway quoted field ends in one invalid row, and reading continues."""
        runaway = "x" * 60_000  # under the line cap; three pass the csv field limit
        data = f'asin,note\n{VALID},"{runaway}\n{runaway}\n{runaway}\n'
        data += f'{VALID},"ok"\n'
        found = rows(write(tmp_path, "job.csv", data))
        assert found[0].line == 2
        assert found[0].error is not None
        assert "malformed CSV" in found[0].error
        assert found[-1].asin == VALID
        assert count_rows(write(tmp_path, "again.csv", data)) == len(found)

    def test_n1_unclosed_quote_costs_one_row(self, tmp_path: Path) -> None:
        """N1: a quote left open is one invalid row (its line); every later line is a row."""
        data = "asin,note\n" + f'{VALID},"5" screen\n' + f'{VALID},"unclosed quote\n'
        data += "".join(f"{VALID},fine {i}\n" for i in range(50))
        found = rows(write(tmp_path, "job.csv", data))
        assert len(found) == 52
        bad = [row for row in found if not row.valid]
        assert [row.line for row in bad] == [3]
        assert "never closed" in (bad[0].error or "")
        assert bad[0].raw == f'{VALID},"unclosed quote'
        assert bad[0].extra == {"note": ""}
        assert [row.line for row in found[2:]] == list(range(4, 54))
        assert found[-1].extra == {"note": "fine 49"}
        assert count_rows(write(tmp_path, "again.csv", data)) == 52

    def test_n1_quoted_cell_across_lines_still_one_row(self, tmp_path: Path) -> None:
        """N1: a closed quoted cell spanning lines stays one row with its line breaks."""
        data = f'asin,note\n{VALID},"two\nlines"\n{VALID},x\n'
        found = rows(write(tmp_path, "job.csv", data))
        assert [(row.line, row.extra) for row in found] == [
            (2, {"note": "two\nlines"}),
            (4, {"note": "x"}),
        ]

    def test_n1_an_inch_mark_before_a_cell_across_lines_keeps_the_row(self, tmp_path: Path) -> None:
        """N1: a literal quote in an unquoted cell (12" vinyl) before a closed quoted cell
        spanning lines is one valid row, as csv, Excel and LibreOffice read it: the quotes
        were counted, and their odd count made it two invalid rows."""
        data = f'asin,size,note\n{VALID},12" vinyl,"line1\nline2"\n{VALID},7,x\n'
        found = rows(write(tmp_path, "job.csv", data))
        assert [(row.line, row.valid, row.extra) for row in found] == [
            (2, True, {"size": '12" vinyl', "note": "line1\nline2"}),
            (4, True, {"size": "7", "note": "x"}),
        ]

    def test_n1_a_stray_quote_closed_mid_cell_costs_one_row(self, tmp_path: Path) -> None:
        """N1: a quote left open whose lines end at another row's literal quote (12")
        is still one invalid row, and the rows it took are read again."""
        data = f'asin,size\n{VALID},"oops\n{VALID},12" vinyl\n{VALID},7\n'
        found = rows(write(tmp_path, "job.csv", data))
        assert [(row.line, row.valid) for row in found] == [(2, False), (3, True), (4, True)]


class TestJsonLines:
    def test_fields_and_extra(self, tmp_path: Path) -> None:
        """asin, marketplace and resources are read; other fields go to extra as the JSON
        values they are."""
        data = (
            '{"asin": "b0abcdefgh", "marketplace": "www.amazon.de", '
            '"resources": ["ItemInfo.Title"], "id": 7, "tag": "x", "meta": {"a": [1, true]}}\n'
            f'{{"asin": "{VALID}"}}\n'
        )
        found = rows(write(tmp_path, "job.jsonl", data))
        assert found[0] == JobRow(
            1,
            "b0abcdefgh",
            VALID,
            "www.amazon.de",
            ("ItemInfo.Title",),
            {"id": 7, "tag": "x", "meta": {"a": [1, True]}},
        )
        assert found[1] == JobRow(2, VALID, VALID)

    def test_c6_malformed_line_reported_rest_processed(self, tmp_path: Path) -> None:
        """C6: a malformed line is an invalid row with its line number; the rest is read,
        and a strict pre-pass sees it at once."""
        data = f'{{"asin": "{VALID}"}}\n{{"asin": "B0ABC\n\n{{"asin": "{VALID}"}}\n'
        found = rows(write(tmp_path, "job.jsonl", data))
        assert [(row.line, row.asin) for row in found] == [(1, VALID), (2, None), (4, VALID)]
        assert (found[1].error or "").startswith("not valid JSON")
        assert found[1].raw == '{"asin": "B0ABC'
        assert [row.line for row in found if not row.valid] == [2]

    def test_c6_error_column_points_into_the_line(self, tmp_path: Path) -> None:
        """C6: the column of a JSON error is where it is on the line, not "column 1" of the
        line end the reader kept."""
        found = rows(write(tmp_path, "job.jsonl", '{"asin": "B0ABCDEFGH"\n'))
        assert found[0].error == "not valid JSON: Expecting ',' delimiter at column 22"

    @pytest.mark.parametrize(
        ("line", "reason_part"),
        [
            ("[1, 2]", "must be an object, got an array"),
            ('"B0ABCDEFGH"', "must be an object, got a string"),
            ("null", "must be an object, got null"),
            ('{"sku": 1}', 'no "asin" field'),
            ('{"ASIN": "B0ABCDEFGH"}', "case-sensitive"),
            # Looked up in the default store, the row's own ignored: US prices for a UK row.
            ('{"asin": "B0ABCDEFGH", "Marketplace": "UK"}', '"Marketplace" is not a field'),
            ('{"asin": "B0ABCDEFGH", "Resources ": ["Images"]}', "case-sensitive"),
            ('{"asin": 306406152}', '"asin" must be a string, got a number'),
            ('{"asin": null}', '"asin" is null: give the ASIN as a string'),
            ('{"asin": "B0ABCDEFGH", "marketplace": 1}', '"marketplace" must be a string'),
            ('{"asin": "B0ABCDEFGH", "resources": "Images"}', "list of strings"),
            ('{"asin": "B0ABCDEFGH", "resources": [1]}', "list of strings"),
            ('{"asin": "B0ABCDEFG"}', "has 9"),
            ('{"asin": "\\ud800"}', "surrogate"),
            ("{" * 100_000, "not valid JSON"),
            ("[" * 60_000, "not valid JSON"),
            ('{"asin": "B0ABCDEFGH", "n": ' + "9" * 5000 + "}", "not valid JSON"),
        ],
    )
    def test_c6_bad_objects_are_invalid_rows(
        self, tmp_path: Path, line: str, reason_part: str
    ) -> None:
        """C6: wrong shapes and types become invalid rows saying why, never an exception."""
        path = write(tmp_path, "job.jsonl", f'{line}\n{{"asin": "{VALID}"}}\n')
        found = rows(path, max_line_bytes=200_000)
        assert len(found) == 2
        assert found[0].asin is None
        assert reason_part in (found[0].error or "")
        assert found[1].asin == VALID

    def test_empty_resources_list_is_kept(self, tmp_path: Path) -> None:
        """An explicit empty resources list is kept as (), distinct from absent (None)."""
        (row,) = rows(write(tmp_path, "job.jsonl", f'{{"asin": "{VALID}", "resources": []}}'))
        assert row.resources == ()


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("job.txt", f"https://www.amazon.co.uk/dp/{VALID}\n{VALID}\n", ["amazon.co.uk", None]),
        (
            "job.csv",
            f"asin,marketplace\nhttps://www.amazon.de/dp/{VALID},\namazon.de/dp/{VALID},US\n",
            ["amazon.de", "US"],
        ),
        (
            "job.jsonl",
            f'{{"asin": "amazon.fr/dp/{VALID}"}}\n'
            f'{{"asin": "amazon.fr/dp/{VALID}", "marketplace": "UK"}}\n',
            ["amazon.fr", "UK"],
        ),
    ],
)
def test_product_url_row_takes_its_store(
    tmp_path: Path, name: str, text: str, expected: list[str | None]
) -> None:
    """A product URL's store is the row's marketplace unless the row names one itself."""
    assert [row.marketplace for row in rows(write(tmp_path, name, text))] == expected


@pytest.mark.parametrize("name", ["job.txt", "job.csv", "job.csv.gz"])
def test_lines_ending_in_cr_alone_are_lines(tmp_path: Path, name: str) -> None:
    """A classic-Mac file (Excel's "CSV (Macintosh)": lines end in CR alone) gives a row
    per line, not one long line; the counter agrees."""
    head = "asin,note\r" if ".csv" in name else ""
    body = f"{VALID}{',a' if head else ''}\r" * 3
    path = write(tmp_path, name, head + body)
    found = rows(path)
    assert [(row.asin, row.error) for row in found] == [(VALID, None)] * 3
    assert count_rows(path) == 3


@pytest.mark.parametrize("name", ["job.csv", "job.csv.gz"])
def test_cr_ended_csv_with_a_line_break_in_a_cell(tmp_path: Path, name: str) -> None:
    """Excel's "CSV (Macintosh)" ends records in CR and breaks lines inside a cell with LF
    (Alt+Enter): still a row per record, the cell's break kept. One LF in the head made it
    read as one line, refused as a malformed header (exit 65)."""
    data = f'asin,note\r{VALID},s1\r{VALID},"line1\nline2"\rB0ABCDEFGJ,s3\r'
    path = write(tmp_path, name, data)
    found = rows(path)
    assert [(row.asin, row.error) for row in found] == [
        (VALID, None),
        (VALID, None),
        ("B0ABCDEFGJ", None),
    ]
    assert [row.extra for row in found] == [
        {"note": "s1"},
        {"note": "line1\nline2"},
        {"note": "s3"},
    ]


def test_cr_ended_csv_with_more_line_breaks_in_cells_than_records(tmp_path: Path) -> None:
    """A CR-ended CSV whose cells hold several LF line breaks each (a 3-line address) is
    still CR-ended: its first line says so, however the cells are written."""
    data = f'asin,addr\r{VALID},"1 Main St\nSpringfield\nUSA"\rB0ABCDEFGJ,"2 Elm\nTown\nUK"\r'
    found = rows(write(tmp_path, "job.csv", data))
    # A record's line is its first physical line, as in an LF file with such cells.
    assert [(row.line, row.asin) for row in found] == [(2, VALID), (5, "B0ABCDEFGJ")]
    assert found[0].extra == {"addr": "1 Main St\nSpringfield\nUSA"}


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_lone_crs_in_cells_keep_an_lf_or_crlf_file_as_it_is(tmp_path: Path, ending: str) -> None:
    """Lone CRs inside quoted cells of an LF or CRLF file (more of them than line endings)
    do not make the file CR-ended: the cells keep their CRs and the rows their lines."""
    data = f'asin,note{ending}{VALID},"a\rb\rc"{ending}{VALID},"d\re\rf"{ending}'
    found = rows(write(tmp_path, "job.csv", data))
    assert [(row.line, row.extra) for row in found] == [
        (2, {"note": "a\rb\rc"}),
        (3, {"note": "d\re\rf"}),
    ]


def test_a_lone_cr_in_an_unquoted_cell_says_what_it_is(tmp_path: Path) -> None:
    """An LF CSV with an old-Mac (CR) export joined after it: the row holding the CRs is
    invalid saying it is a lone carriage return and how to mend the file, not csv's own
    "do you need to open the file in universal-newline mode?"."""
    data = f"asin,note\n{VALID},a\nB0ABCDEFGJ,c\rB0ZZZZZZZZ,d\r"
    found = rows(write(tmp_path, "job.csv", data))
    assert found[0].asin == VALID
    errors = [row.error for row in found if row.error is not None]
    assert errors
    assert all("a lone carriage return (an old-Mac line end)" in e for e in errors)
    assert not any("universal-newline" in e for e in errors)


@pytest.mark.parametrize("name", ["job.txt", "job.jsonl", "job.csv"])
def test_a_bom_mid_file_is_dropped(tmp_path: Path, name: str) -> None:
    """Two UTF-8 exports joined with ``cat``: the second one's BOM, mid-file, is dropped as
    the first one's is; its row was invalid ("contains the non-ASCII character")."""
    line = {"job.txt": VALID, "job.jsonl": f'{{"asin": "{VALID}"}}', "job.csv": VALID}[name]
    head = "asin\n" if name == "job.csv" else ""
    data = "\ufeff" + head + line + "\n" + "\ufeff" + line + "\n"
    found = rows(write(tmp_path, name, data))
    assert [(row.asin, row.error) for row in found] == [(VALID, None)] * 2


@pytest.mark.parametrize("ending", ["\r\n", "\r"])
def test_a_first_line_ending_where_the_sniffing_stops_keeps_its_kind(
    tmp_path: Path, ending: str
) -> None:
    """Whether the first CR falls at the end of a read buffer (4,096 or 8,192 bytes) or not,
    a CRLF file stays CRLF and a CR-only file CR-only."""
    for size in (4094, 4095, 4096, 8190, 8191, 8192):
        line = "#" + "x" * (size - 1) + ending  # a comment line whose CR is at byte `size`
        path = write(tmp_path, f"job{size}.txt", line + f"{VALID}{ending}{VALID}{ending}")
        assert [row.line for row in rows(path)] == [2, 3], size
        assert count_rows(path) == 2, size


class TestDuplicates:
    def test_c7_duplicates_each_get_a_row(self, tmp_path: Path) -> None:
        """C7: duplicate ids are not merged here: every input row yields its own row."""
        ids = [VALID, "B0ZZZZZZZZ"] * 50
        found = rows(write(tmp_path, "job.txt", "\n".join(ids)))
        assert len(found) == 100
        assert {row.asin for row in found} == {VALID, "B0ZZZZZZZZ"}
        assert [row.line for row in found] == list(range(1, 101))


class TestLongLinesAndJunk:
    @pytest.mark.parametrize("name", ["job.txt", "job.jsonl", "job.txt.gz"])
    def test_c9_ten_megabyte_line(self, tmp_path: Path, name: str) -> None:
        """C9: a 10 MB line becomes one invalid row, the next line is read, memory stays small."""
        good = f'{{"asin": "{VALID}"}}' if "jsonl" in name else VALID
        path = write(tmp_path, name, f"{good}\n{'A' * 10_000_000}\n{good}\n")
        tracemalloc.start()
        try:
            found = rows(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert brief(found) == [
            (1, VALID, None),
            (2, None, f"line longer than {DEFAULT_MAX_LINE_BYTES} bytes"),
            (3, VALID, None),
        ]
        assert found[1].raw.startswith("AAAA")
        assert len(found[1].raw) < 200
        assert peak < 2_000_000

    def test_c9_long_line_in_csv(self, tmp_path: Path) -> None:
        """C9: an over-long CSV line is an invalid row; rows around it are fine."""
        data = f"asin,note\n{VALID},a\n{VALID},{'n' * 100_000}\n{VALID},c\n"
        found = rows(write(tmp_path, "job.csv", data))
        assert brief(found) == [
            (2, VALID, None),
            (3, None, "line longer than 65536 bytes"),
            (4, VALID, None),
        ]

    def test_c9_long_csv_header_is_refused(self, tmp_path: Path) -> None:
        """C9: a CSV header over the cap cannot be read, so the file is refused."""
        path = write(tmp_path, "job.csv", "asin," + "h" * 100 + f"\n{VALID}\n")
        with pytest.raises(JobFileError, match="header line is longer than 50 bytes"):
            rows(path, max_line_bytes=50)

    @pytest.mark.parametrize(
        ("body", "ok"),
        [("x" * 10, True), ("x" * 11, False)],
    )
    @pytest.mark.parametrize("ending", ["\n", "\r\n", ""])
    def test_line_cap_boundary(self, tmp_path: Path, body: str, ok: bool, ending: str) -> None:
        """The cap counts bytes without the line ending: exactly the cap is fine."""
        path = write(tmp_path, "job.txt", f"{body}{ending}")
        (row,) = rows(path, max_line_bytes=10)
        assert (row.error != "line longer than 10 bytes") == ok

    def test_c9_nul_bytes(self, tmp_path: Path) -> None:
        """C9: NUL bytes make invalid rows with a reason, in every format."""
        txt = write(tmp_path, "job.txt", b"B0ABC\x00DEFG\n\x00\x00\x00\nB0ABCDEFGH\n")
        assert [row.asin for row in rows(txt)] == [None, None, VALID]
        assert "U+0000" in (rows(txt)[0].error or "")
        csv_path = write(tmp_path, "job.csv", b"asin\nB0ABC\x00DEFG\nB0ABCDEFGH\n")
        assert [row.asin for row in rows(csv_path)] == [None, VALID]
        jsonl = write(tmp_path, "job.jsonl", b'{"asin":\x00}\n{"asin":"B0ABCDEFGH"}\n')
        assert [row.asin for row in rows(jsonl)] == [None, VALID]

    def test_c9_binary_junk_is_a_clean_error(self, tmp_path: Path) -> None:
        """C9: random binary is refused as undecodable (or read as junk rows), never a crash."""
        junk = bytes(range(256)) * 4
        path = write(tmp_path, "job.txt", junk)
        with pytest.raises(JobFileError, match="not valid utf-8"):
            rows(path)
        assert all(row.asin is None for row in rows(path, encoding="latin-1"))

    def test_utf16_file_is_refused_with_advice(self, tmp_path: Path) -> None:
        """A UTF-16 file (Excel 'Unicode text') is refused, saying to save as UTF-8."""
        path = write(tmp_path, "job.csv", "asin\nB0ABCDEFGH\n".encode("utf-16"))
        with pytest.raises(JobFileError, match="UTF-16"):
            rows(path)

    @pytest.mark.parametrize("codec", ["utf-32", "utf-32-be"])
    def test_a_utf32_file_is_named_so(self, tmp_path: Path, codec: str) -> None:
        """A file starting with a UTF-32 byte-order mark is called UTF-32 (its little-endian
        mark starts with UTF-16's, and it was called UTF-16)."""
        data = "\ufeffB0ABCDEFGH\n".encode(codec) if codec.endswith("be") else None
        path = write(tmp_path, "job.txt", data or "B0ABCDEFGH\n".encode(codec))
        with pytest.raises(JobFileError, match=r"the file is UTF-32 .*UTF-32 byte-order mark"):
            rows(path)

    @pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-32-le"])
    @pytest.mark.parametrize("name", ["job.csv", "job.txt"])
    def test_utf16_without_a_bom_is_refused_with_advice(
        self, tmp_path: Path, codec: str, name: str
    ) -> None:
        """UTF-16 (or UTF-32) without a byte-order mark is refused as a file, not read as
        rows that each hold NUL characters (every row invalid, exit 0)."""
        path = write(tmp_path, name, "asin\nB0ABCDEFGH\nB0ABCDEFGJ\n".encode(codec))
        with pytest.raises(JobFileError, match="UTF-16"):
            rows(path)

    def test_a_nul_in_a_utf8_row_is_that_rows_problem(self, tmp_path: Path) -> None:
        """One NUL in an otherwise UTF-8 file stays one invalid row, not a refused file."""
        path = write(tmp_path, "job.txt", b"B0ABCDEFGH\nB0AB\x00DEFGJ\nB0ABCDEFGK\n")
        found = rows(path)
        assert [row.asin is None for row in found] == [False, True, False]

    def test_xlsx_is_refused_with_advice(self, tmp_path: Path) -> None:
        """A ZIP (an .xlsx renamed .csv) is refused, saying to export CSV."""
        path = write(tmp_path, "job.csv", b"PK\x03\x04\x14\x00\x06\x00junk")
        with pytest.raises(JobFileError, match="export the sheet as CSV"):
            rows(path)

    @pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
    def test_xls_is_refused_with_advice_in_a_line(self, tmp_path: Path, encoding: str) -> None:
        """An old Excel workbook (.xls, OLE2) is refused saying to export CSV, in a message
        of a line: it got a Windows-1252 hint, and with --encoding latin-1 a refusal
        quoting thousands of characters of the binary as header names."""
        data = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504) + bytes(range(256)) * 8
        path = write(tmp_path, "old.csv", data)
        with pytest.raises(JobFileError, match="Excel 97-2003 workbook") as info:
            rows(path, encoding=encoding)
        assert len(str(info.value)) < 400

    def test_a_refused_header_quotes_a_few_names_cut_short(self, tmp_path: Path) -> None:
        """A header without asin names at most a few of its columns, each cut short."""
        header = ",".join(["x" * 500] + [f"c{i}" for i in range(40)])
        with pytest.raises(JobFileError, match="no 'asin' column") as info:
            rows(write(tmp_path, "job.csv", header + "\n"))
        assert "(41 columns)" in str(info.value)
        assert len(str(info.value)) < 600

    @pytest.mark.parametrize("delimiter", [";", "\t"])
    def test_excels_sep_line_names_the_delimiter(self, tmp_path: Path, delimiter: str) -> None:
        """A first line "sep=;" (Excel's) names the delimiter and the header follows; the
        file was refused with "no 'asin' column (found: 'sep=;')". A tab too."""
        data = f"sep={delimiter}\r\nASIN{delimiter}Titel\r\n{VALID}{delimiter}x,y\r\n"
        found = rows(write(tmp_path, "job.csv", data))
        assert [(row.line, row.asin, row.extra) for row in found] == [(3, VALID, {"Titel": "x,y"})]

    @pytest.mark.parametrize("header", ["asin", "ASIN", '"ASIN"', "Asin "])
    def test_a_plain_lists_asin_header_is_no_row(self, tmp_path: Path, header: str) -> None:
        """A one-column sheet saved as text keeps its header: "asin" as the first line is
        skipped (it was an invalid row, and --strict refused the file for it); count_rows
        agrees."""
        path = write(tmp_path, "job.txt", f"# ids\n{header}\n{VALID}\nasin\n")
        found = rows(path)
        assert [(row.line, row.asin) for row in found] == [(3, VALID), (4, None)]
        assert count_rows(path) == 2


@pytest.mark.parametrize(
    ("header", "named"),
    [("ASIN\tTitle\tPrice", "tab"), ('"asin";"name"', "';'"), ("sku,asin,price", "','")],
)
def test_a_table_saved_as_txt_is_refused_naming_its_delimiter(
    tmp_path: Path, header: str, named: str
) -> None:
    """A .txt whose first line is a table's header with an asin column (Excel's "Text (Tab
    delimited)", a Seller Central report) is refused naming the delimiter and the ways to
    read it; every row was invalid ("contains whitespace") and the run ended 0. count_rows
    refuses it alike; a format named by the caller is read as asked."""
    cells = header.replace('"', "").split(named.strip("'") if named != "tab" else "\t")
    row = (named.strip("'") if named != "tab" else "\t").join(
        VALID if cell.lower() == "asin" else "x" for cell in cells
    )
    path = write(tmp_path, "report.txt", f"# exported\n{header}\n{row}\n")
    for read in (rows, count_rows):
        with pytest.raises(JobFileError) as caught:
            read(path)
        message = str(caught.value)
        assert f"line 2 is a table's header ({named}-separated, with an asin column)" in message
        assert "rename it to .tsv or .csv (a job read from stdin: give --input csv)" in message
    # Read as a list when the caller names the format (--input txt): what it asked for.
    assert [row.asin for row in rows(path, format="txt")] == [None, None]
    # A plain list whose ids hold a comma is no table: its rows stay rows.
    plain = write(tmp_path, "ids.txt", f"{VALID}, {VALID}\n{VALID}\n")
    assert [row.asin for row in rows(plain)] == [None, VALID]


def test_json_lines_saved_as_txt_are_refused(tmp_path: Path) -> None:
    """A .txt whose first row is a JSON object with an asin field (JSON Lines) is refused
    naming the way to read it; read as ids, every row was invalid and the run ended 0. A
    line that only opens with a brace, and JSON without an asin field, stay rows."""
    path = write(tmp_path, "job.txt", f'{{"asin": "{VALID}", "sku": 1}}\n')
    for read in (rows, count_rows):
        with pytest.raises(JobFileError) as caught:
            read(path)
        assert "line 1 is a JSON object with an asin field (JSON Lines)" in str(caught.value)
        assert "rename it to .jsonl (a job read from stdin: give --input jsonl)" in str(
            caught.value
        )
    for text in ("{not json\n", '{"sku": 1}\n', '{"a": ' + "[" * 5_000 + "\n"):
        assert [row.asin for row in rows(write(tmp_path, "other.txt", text))] == [None]


@pytest.mark.parametrize("blank", [",,,", ";;;", '"","",""', "\t\t"])
def test_an_empty_first_row_before_the_header_is_skipped(tmp_path: Path, blank: str) -> None:
    """A sheet whose used range starts with an empty row exports it as ",,,": skipped as a
    blank line is, the header after it read; the file was refused for a header of empty
    names. count_rows agrees."""
    path = write(tmp_path, "job.csv", f"{blank}\r\nASIN,Title\r\n{VALID},a\r\n")
    assert [(row.line, row.asin, row.extra) for row in rows(path)] == [(3, VALID, {"Title": "a"})]
    assert count_rows(path) == 1


@pytest.mark.parametrize(
    ("header", "said"),
    [
        (
            "item-name\titem-description\tlisting-id\tseller-sku\tprice\tasin1\tfulfillment",
            "found, tab-separated: 'asin1', 'item-name'",
        ),
        ("ASIN-Nummer;Titel", "found, ';'-separated: 'ASIN-Nummer', 'Titel'"),
        # A quoted comma-separated name holding semicolons is a name as parsed.
        ('title,"a;b;c;d",asin1', "found: 'asin1', 'title', 'a;b;c;d'"),
        # A tab-separated header with a comma in a name: still split by its tab.
        ("item-name\tprice, USD\tasin1", "found, tab-separated: 'asin1', 'item-name'"),
    ],
)
def test_a_header_without_asin_shows_its_names_and_the_likely_id_column(
    tmp_path: Path, header: str, said: str
) -> None:
    """A tab- or semicolon-separated header with no asin column is shown split by its own
    delimiter, a name holding "asin" first, with what to rename: it was one long name cut
    at 120 characters (hiding Seller Central's asin1), told to "add a header row"."""
    with pytest.raises(JobFileError) as caught:
        rows(write(tmp_path, "report.csv", f"{header}\nB0X\n"))
    message = str(caught.value)
    assert said in message
    assert "rename the id column (" in message
    assert "to asin" in message
    # No name like it: the header must be the first line that is not blank.
    with pytest.raises(JobFileError, match="the first line that is not blank must be"):
        rows(write(tmp_path, "other.csv", "sku,title\nB0X,y\n"))


class TestEncoding:
    def test_c10_latin1_names_line_and_offset(self, tmp_path: Path) -> None:
        """C10: a Latin-1 file read as UTF-8 fails naming the line, byte offset and the
        --encoding cp1252 remedy (it reads Latin-1's letters alike); rows before it were
        yielded."""
        data = f"{VALID}\n# caf\u00e9\n".encode("latin-1")
        path = write(tmp_path, "job.txt", data)
        seen: list[JobRow] = []
        with pytest.raises(JobFileError) as caught:
            seen.extend(read_job(path))  # extend keeps the rows it got before the error
        assert seen == [JobRow(1, VALID, VALID)]
        message = str(caught.value)
        assert "line 2" in message
        assert "byte 0xe9 at byte offset 16" in message
        assert data[16] == 0xE9
        assert "--encoding cp1252" in message

    def test_a_euro_sign_after_an_umlaut_is_read_by_the_remedy_given(self, tmp_path: Path) -> None:
        """The first odd byte an umlaut, a euro sign two lines on (a German Excel export):
        the remedy given reads both. It was --encoding latin-1, which ran clean and wrote
        the euro sign as a control character."""
        data = f"asin;name;preis\n{VALID};M\u00fcller;1\n{VALID};x;29,99 \u20ac\n"
        path = write(tmp_path, "job.csv", data.encode("cp1252"))
        with pytest.raises(JobFileError) as caught:
            rows(path)
        assert "line 2" in str(caught.value)
        (encoding,) = re.findall(r"--encoding (\S+)", str(caught.value))
        found = rows(path, encoding=encoding)
        assert [row.extra for row in found] == [
            {"name": "M\u00fcller", "preis": "1"},
            {"name": "x", "preis": "29,99 \u20ac"},
        ]

    def test_windows_1252_bytes_get_the_cp1252_remedy(self, tmp_path: Path) -> None:
        """A line with Windows-1252's curly quote or euro sign is told --encoding cp1252:
        the Latin-1 remedy it was given ran clean and wrote control characters instead."""
        data = f"asin,note\n{VALID},it\u2019s \u20ac5\n".encode("cp1252")
        with pytest.raises(JobFileError) as caught:
            rows(write(tmp_path, "job.csv", data))
        assert "--encoding cp1252" in str(caught.value)
        found = rows(write(tmp_path, "job.csv", data), encoding="cp1252")
        assert found[0].extra == {"note": "it\u2019s \u20ac5"}

    @pytest.mark.parametrize("encoding", ["cp1252", "latin-1"])
    def test_a_utf8_mark_under_another_encoding_is_refused(
        self, tmp_path: Path, encoding: str
    ) -> None:
        """A file starting with UTF-8's byte-order mark read with --encoding cp1252 (a cron
        kept from older exports, the sheet now saved as CSV UTF-8): refused, saying it is
        UTF-8; its accented letters came out as two wrong ones each (cafÃ©)."""
        data = f"asin,name\n{VALID},caf\u00e9\n".encode()
        path = write(tmp_path, "job.csv", b"\xef\xbb\xbf" + data)
        with pytest.raises(JobFileError, match=f"UTF-8, not {encoding}; run again without"):
            rows(path, encoding=encoding)
        assert rows(path)[0].extra == {"name": "caf\u00e9"}

    def test_c10_offset_counts_the_bom(self, tmp_path: Path) -> None:
        """C10: the byte offset is in the file's bytes, BOM included."""
        data = b"\xef\xbb\xbfasin\nB0ABCDEFG\xe9\n"
        with pytest.raises(JobFileError, match="byte offset 17 "):
            rows(write(tmp_path, "job.csv", data))
        assert data[17] == 0xE9

    def test_c10_latin1_encoding_works(self, tmp_path: Path) -> None:
        """C10: with encoding='latin-1' the same file is read; the accented line is a
        comment here, and an accented id is invalid with a reason."""
        data = f"{VALID}\n# caf\u00e9\nB0ABCDEF\u00c9H\n".encode("latin-1")
        found = rows(write(tmp_path, "job.txt", data), encoding="latin-1")
        assert brief(found)[0] == (1, VALID, None)
        assert found[1].line == 3
        assert "U+00C9" in (found[1].error or "")

    def test_c10_latin1_csv_extra_decoded(self, tmp_path: Path) -> None:
        """C10: a Latin-1 CSV passes its accented columns through decoded."""
        data = f"asin,title\n{VALID},Cr\u00e8me\n".encode("cp1252")
        (row,) = rows(write(tmp_path, "job.csv", data), encoding="cp1252")
        assert row.extra == {"title": "Cr\u00e8me"}

    def test_c10_error_in_gz_says_decompressed(self, tmp_path: Path) -> None:
        """C10: in a .gz the offset is said to be in the decompressed data."""
        path = write(tmp_path, "job.txt.gz", b"B0ABCDEFGH\n\xe9\n")
        with pytest.raises(JobFileError, match="offset 11 of the decompressed data"):
            rows(path)


class TestGzip:
    @pytest.mark.parametrize("fmt", ["txt", "csv", "jsonl"])
    def test_gz_of_each_format(self, tmp_path: Path, fmt: str) -> None:
        """A .gz of any format reads like the plain file."""
        body = {
            "txt": f"{VALID}\n",
            "csv": f"asin\n{VALID}\n",
            "jsonl": f'{{"asin": "{VALID}"}}\n',
        }[fmt]
        plain = rows(write(tmp_path, f"job.{fmt}", body))
        assert rows(write(tmp_path, f"job.{fmt}.gz", body)) == plain
        assert plain[0].asin == VALID

    def test_gzip_detected_by_magic_bytes(self, tmp_path: Path) -> None:
        """Gzip data is decompressed whatever the file is called."""
        path = tmp_path / "job.txt"
        path.write_bytes(gzip.compress(f"{VALID}\n".encode()))
        assert brief(rows(path)) == [(1, VALID, None)]

    def test_gz_name_without_gzip_data_is_refused(self, tmp_path: Path) -> None:
        """A file named .gz that is not gzip is refused clearly."""
        path = tmp_path / "job.txt.gz"
        path.write_bytes(f"{VALID}\n".encode())
        with pytest.raises(JobFileError, match="not gzip-compressed"):
            rows(path)

    def test_a_gz_cut_before_its_first_line_says_so(self, tmp_path: Path) -> None:
        """A .gz cut before one whole line was read says so ("after line 0" read oddly)."""
        whole = gzip.compress(b"B000000001\n" * 100)
        path = tmp_path / "job.txt.gz"
        path.write_bytes(whole[:12])
        with pytest.raises(JobFileError, match="gzip data ends early before its first line"):
            list(read_job(path))

    def test_c11_truncated_gz_yields_rows_then_fails(self, tmp_path: Path) -> None:
        """C11: a truncated .gz yields the rows read so far, then a clear JobFileError."""
        body = "".join(f"B{i:09d}\n" for i in range(20_000)).encode()
        whole = gzip.compress(body)
        path = tmp_path / "job.txt.gz"
        path.write_bytes(whole[: len(whole) // 2])
        seen: list[JobRow] = []
        with pytest.raises(JobFileError, match="gzip data ends early after line") as caught:
            seen.extend(read_job(path))  # extend keeps the rows it got before the error
        assert 0 < len(seen) < 20_000
        assert [row.line for row in seen] == list(range(1, len(seen) + 1))
        assert all(row.valid for row in seen)
        assert f"after line {len(seen)}" in str(caught.value)
        assert isinstance(caught.value.__cause__, EOFError)
        with pytest.raises(JobFileError):
            count_rows(path)

    def test_c11_corrupt_gz(self, tmp_path: Path) -> None:
        """C11: corrupt gzip data is a JobFileError, not a zlib traceback."""
        whole = bytearray(gzip.compress(("B0ABCDEFGH\n" * 1000).encode()))
        whole[len(whole) // 2] ^= 0xFF
        whole[len(whole) // 2 + 1] ^= 0xFF
        path = tmp_path / "job.txt.gz"
        path.write_bytes(bytes(whole))
        with pytest.raises(JobFileError, match="gzip data"):
            rows(path)


class TestDetectFormat:
    @pytest.mark.parametrize(
        ("name", "fmt"),
        [
            ("a.txt", "txt"),
            ("a.TXT", "txt"),
            ("a.csv", "csv"),
            ("a.tsv", "csv"),
            ("a.jsonl", "jsonl"),
            ("a.ndjson", "jsonl"),
            ("a.2026.01.csv.gz", "csv"),
            ("a.jsonl.GZ", "jsonl"),
            ("a.txt.gz", "txt"),
        ],
    )
    def test_by_extension(self, name: str, fmt: str) -> None:
        """Known extensions decide without opening the file."""
        assert detect_format(Path("/nonexistent") / name) == fmt

    @pytest.mark.parametrize(
        ("data", "fmt"),
        [
            (f"# ids\n\n{VALID}\n", "txt"),
            (f"https://www.amazon.com/dp/{VALID}?a=1,2\n", "txt"),
            ("\ufeffASIN,sku\n", "csv"),
            ("asin\n", "csv"),
            ("sku;name\n", "csv"),
            (f'\n{{"asin": "{VALID}"}}\n', "jsonl"),
            (f'[{{"asin": "{VALID}"}}]\n', "jsonl"),
            ("[\n", "jsonl"),
            (f"[{VALID}]\n[{VALID}]\n", "txt"),
            (f"{VALID}  # for Anna, Bob\n{VALID}\n", "txt"),
            ("", "txt"),
        ],
    )
    def test_sniffing_unknown_extensions(self, tmp_path: Path, data: str, fmt: str) -> None:
        """Other names are sniffed from the first non-blank, non-comment line."""
        assert detect_format(write(tmp_path, "job.dat", data)) == fmt
        assert detect_format(write(tmp_path, "job.dat.gz", data)) == fmt

    @pytest.mark.parametrize(
        ("name", "data", "hint"),
        [
            ("arr.json", f'[\n  {{"asin": "{VALID}"}},\n  {{"asin": "{VALID}"}}\n]\n', ".[]"),
            ("arr.jsonl", f'[\n  {{"asin": "{VALID}"}}\n]\n', ".[]"),
            ("pretty.jsonl", f'{{\n  "asin": "{VALID}"\n}}\n', "jq -c ."),
        ],
    )
    def test_a_json_document_is_refused_saying_how_to_convert_it(
        self, tmp_path: Path, name: str, data: str, hint: str
    ) -> None:
        """A JSON array (what json.dump and jq write) or a pretty-printed object is refused
        (exit 65) naming jq to convert it; its lines were each an invalid row (or a CSV
        without an asin column), and the run ended with exit 0, nothing looked up."""
        with pytest.raises(JobFileError, match="not JSON Lines") as info:
            rows(write(tmp_path, name, data))
        assert hint in str(info.value)

    @pytest.mark.parametrize("name", ["one.json", "one.jsonl", "one"])
    def test_a_whole_array_of_objects_on_the_first_line_is_refused(
        self, tmp_path: Path, name: str
    ) -> None:
        """An array of objects on one line (what json.dump writes by default) as the first
        line is a JSON document, refused (exit 65) naming jq, as the README says; it was one
        invalid row, and the run ended with exit 0, nothing looked up."""
        data = f'[{{"asin": "{VALID}"}}, {{"asin": "{VALID}"}}]\n'
        with pytest.raises(JobFileError, match="not JSON Lines") as info:
            rows(write(tmp_path, name, data))
        assert "jq -c '.[]'" in str(info.value)

    def test_an_array_on_a_later_line_is_one_row_naming_jq(self, tmp_path: Path) -> None:
        """After a first line that is an object, an array of objects is one JSON value, so
        one invalid row, as every line of JSON Lines is; its reason says how to split it."""
        data = f'{{"asin": "{VALID}"}}\n[{{"asin": "{VALID}"}}, {{"asin": "{VALID}"}}]\n'
        first, second = rows(write(tmp_path, "two.jsonl", data))
        assert first.error is None
        assert second.error is not None
        assert "jq -c '.[]'" in second.error

    def test_read_job_sniffs_and_format_overrides(self, tmp_path: Path) -> None:
        """read_job uses detection by default, and format= overrides it."""
        path = write(tmp_path, "job.list", f"asin,sku\n{VALID},7\n")
        assert brief(rows(path)) == [(2, VALID, None)]
        assert [row.line for row in rows(path, format="txt")] == [1, 2]


class TestArguments:
    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"format": "xml"}, "unknown job-file format"),
            ({"encoding": "no-such-codec"}, "unknown encoding"),
            ({"encoding": "utf-16"}, "not supported"),
            ({"max_line_bytes": 0}, "must be positive"),
        ],
    )
    def test_bad_options_raise_at_call(
        self, tmp_path: Path, options: dict[str, object], message: str
    ) -> None:
        """Bad options raise ValueError when read_job is called, before any reading."""
        with pytest.raises(ValueError, match=message):
            read_job(tmp_path / "missing.txt", **options)  # type: ignore[arg-type]

    def test_missing_file_is_an_oserror(self, tmp_path: Path) -> None:
        """A missing file raises FileNotFoundError (exit 66), not JobFileError (exit 65)."""
        iterator = read_job(tmp_path / "missing.txt")
        with pytest.raises(FileNotFoundError):
            next(iterator)
        with pytest.raises(FileNotFoundError):
            count_rows(tmp_path / "missing.txt")


class _FailsAfter(io.FileIO):
    """A file whose reads fail with EIO (a failing disk, a network mount that dropped) once
    its first ``good`` bytes are read."""

    def __init__(self, path: Path, good: int) -> None:
        super().__init__(path, "rb")
        self._left = good

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        with memoryview(buffer) as view:
            got = super().readinto(view[: self._left]) or 0
        self._left -= got
        return got


class TestReadErrors:
    @pytest.mark.parametrize("name", ["job.txt", "job.csv", "job.jsonl", "job.dat"])
    @pytest.mark.parametrize("good", [0, 100, 5000])
    def test_a_failed_read_names_the_job_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, good: int
    ) -> None:
        """A read that fails at the start or mid-file raises an OSError naming the job file
        (a failed read names no file, and the run took it for a failure to write)."""
        lines = [
            f'{{"asin": "B0{i:08d}"}}' if name.endswith("jsonl") else f"B0{i:08d}"
            for i in range(500)
        ]
        # job.dat's format is sniffed from its first lines: a long comment first makes the
        # read fail there.
        header = {"csv": "asin\n", "dat": "#" * 150 + "\n"}.get(name.rsplit(".")[1], "")
        path = write(tmp_path, name, header + "\n".join(lines) + "\n")
        monkeypatch.setattr(
            sources, "open", lambda *_: io.BufferedReader(_FailsAfter(path, good)), raising=False
        )
        fmt = None if name.endswith(".dat") else name.rsplit(".")[1]
        for read in (
            lambda: rows(path, format=fmt),
            lambda: count_rows(path),
            lambda: fingerprint(path),
        ):
            with pytest.raises(OSError, match="Input/output error") as failed:
                read()
            assert failed.value.errno == errno.EIO
            assert Path(failed.value.filename).absolute() == path.absolute()


class TestCountAndFingerprint:
    @pytest.mark.parametrize(
        ("name", "data", "expected"),
        [
            ("job.txt", f"# c\n{VALID}\n\nbad\n", 2),
            ("job.csv", f'asin,n\n{VALID},"a\nb"\n,\nx,1\n', 2),
            ("job.jsonl", f'{{"asin": "{VALID}"}}\n\n{{bad\n', 2),
        ],
    )
    def test_count_matches_rows(self, tmp_path: Path, name: str, data: str, expected: int) -> None:
        """count_rows agrees with the number of rows read_job yields."""
        path = write(tmp_path, name, data)
        assert count_rows(path) == len(rows(path)) == expected

    def test_fingerprint_tracks_content(self, tmp_path: Path) -> None:
        """The fingerprint changes with the content; a touch keeps the content the same."""
        path = write(tmp_path, "job.txt", f"{VALID}\n")
        first = fingerprint(path)
        assert first == JobFingerprint(
            path.absolute(),
            11,
            path.stat().st_mtime_ns,
            hashlib.sha256(f"{VALID}\n".encode()).hexdigest(),
        )
        os.utime(path, ns=(first.mtime_ns + 10**9, first.mtime_ns + 10**9))
        touched = fingerprint(path)
        assert touched.mtime_ns != first.mtime_ns
        assert touched.same_content(first)
        path.write_text(f"{VALID}\nB0ZZZZZZZZ\n")
        changed = fingerprint(path)
        assert not changed.same_content(first)
        assert changed.size == 22


# Fragments that reach the interesting paths (headers, quotes, JSON, BOMs, bad UTF-8)
# far more often than uniform random bytes do.
_FRAGMENTS = [
    b"asin",
    b"ASIN",
    b"marketplace",
    b",",
    b";",
    b"\t",
    b"\n",
    b"\r\n",
    b"\r",
    b'"',
    b"#",
    b" ",
    b"{",
    b"}",
    b"[",
    b'"asin":',
    b'"resources":',
    b"\\ud800",
    b"\x00",
    b"\xff",
    b"\xe9",
    b"\xef\xbb\xbf",
    b"\xff\xfe",
    b"PK\x03\x04",
    b"B0ABCDEFGH",
    b"080442957X",
    b"https://www.amazon.com/dp/",
    b"9" * 40,
]
_junk = st.one_of(
    st.binary(max_size=600),
    st.lists(st.sampled_from(_FRAGMENTS), max_size=60).map(b"".join),
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    data=_junk,
    name=st.sampled_from(["job.txt", "job.csv", "job.jsonl", "job.csv.gz", "job.other"]),
    encoding=st.sampled_from(["utf-8", "latin-1"]),
    max_line_bytes=st.sampled_from([8, 64, DEFAULT_MAX_LINE_BYTES]),
)
def test_arbitrary_bytes_never_crash(
    tmp_path: Path, data: bytes, name: str, encoding: str, max_line_bytes: int
) -> None:
    """Any bytes in any job file yield rows or raise JobFileError, nothing else, and
    count_rows agrees with read_job."""
    path = write(tmp_path, name, data)
    options: dict[str, object] = {"encoding": encoding, "max_line_bytes": max_line_bytes}
    try:
        found = rows(path, **options)
    except JobFileError:
        with pytest.raises(JobFileError):
            count_rows(path, **options)  # type: ignore[arg-type]
        return
    assert count_rows(path, **options) == len(found)  # type: ignore[arg-type]
    lines = [row.line for row in found]
    assert lines == sorted(set(lines))
    for row in found:
        assert (row.asin is None) == (row.error is not None)
        assert row.line >= 1


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_json_rows = st.one_of(
    _json_values,
    st.fixed_dictionaries(
        {"asin": st.one_of(st.sampled_from([VALID, "b0abcdefgh", "bad"]), _json_values)},
        optional={
            "marketplace": _json_values,
            "resources": st.one_of(st.lists(st.text(max_size=8), max_size=3), _json_values),
            "id": _json_values,
        },
    ),
)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(values=st.lists(_json_rows, min_size=1, max_size=8))
def test_any_json_values_give_one_row_per_line(tmp_path: Path, values: list[object]) -> None:
    """Every JSON value on a line yields exactly one row; extra values are the line's own
    (or, holding a NaN or an infinity, its text). A first line that is an array of objects
    is a JSON document, refused."""
    lines = [json.dumps(value, ensure_ascii=False) for value in values]
    path = write(tmp_path, "job.jsonl", "\n".join(lines) + "\n")
    first = values[0]
    if isinstance(first, list) and first and isinstance(first[0], dict):
        with pytest.raises(JobFileError, match="not JSON Lines"):
            rows(path)
        return
    found = rows(path)
    assert [row.line for row in found] == list(range(1, len(values) + 1))
    for value, row in zip(values, found, strict=True):
        assert (row.asin is None) == (row.error is not None)
        if row.asin is not None:
            assert isinstance(value, dict)
            assert row.asin == VALID
        for key, item in (row.extra or {}).items():
            assert isinstance(value, dict)
            assert key in value
            # A value holding a NaN or an infinity travels as its compact JSON text.
            text = json.dumps(value[key], ensure_ascii=False, separators=(",", ":"))
            assert item == value[key] or item == text


def test_a_non_finite_pass_through_value_travels_as_its_text(tmp_path: Path) -> None:
    """NaN and infinities (which Python's json reads) in a row's own fields travel as their
    JSON text, so the output stays valid JSON; finite values stay as they are."""
    line = f'{{"asin": "{VALID}", "x": NaN, "y": Infinity, "z": [1, -Infinity], "n": 2.5}}\n'
    (row,) = rows(write(tmp_path, "job.jsonl", line))
    assert row.extra == {"x": "NaN", "y": "Infinity", "z": "[1,-Infinity]", "n": 2.5}


def test_fast_row_builder_matches_the_constructor() -> None:
    """The internal fast row builder fills every field as the dataclass constructor does."""
    from broker.jobs.sources import _row

    fields = (7, "raw", "B0ABCDEFGH", "www.amazon.de", ("Images",), {"k": "v"}, None)
    built = _row(*fields)
    assert built == JobRow(*fields)
    assert [getattr(built, name) for name in JobRow.__slots__] == [*fields, "InvalidAsin"]


def test_a_quoted_cell_over_the_field_limit_is_one_invalid_row(tmp_path: Path) -> None:
    """A quoted cell spanning lines and longer in all than csv's field limit is one invalid
    row, read to its end: the lines inside it were replayed as rows of their own, and the
    ASINs written in the cell were looked up (2 records gave 6 rows, 2 of them ok)."""
    long = "n" * 60_000
    data = (
        f'asin,notes\nB0UJZDE8GX,"{long}\n{long}\n{long}\nB0PF91DHOD\n'
        'B0ZDOC9IS0,see above"\nB0D6NCF10E,ok\n'
    )
    path = write(tmp_path, "job.csv", data)
    found = rows(path)
    assert [(row.line, row.asin) for row in found] == [(2, None), (7, "B0D6NCF10E")]
    assert found[0].raw.startswith("B0UJZDE8GX")
    assert found[0].error is not None
    assert "longer than" in found[0].error
    assert count_rows(path) == 2


def test_a_quoted_cell_over_the_field_limit_never_closed_is_a_stray_quote(
    tmp_path: Path,
) -> None:
    """Such a cell never closed is a quote left open: one invalid row, and the lines after
    its first are read as rows of their own."""
    long = "n" * 60_000
    path = write(
        tmp_path, "job.csv", f'asin,notes\nB0UJZDE8GX,"{long}\n{long}\n{long}\nB0PF91DHOD\n'
    )
    assert [(row.line, row.asin) for row in rows(path)] == [
        (2, None),
        (3, None),
        (4, None),
        (5, "B0PF91DHOD"),
    ]
    assert count_rows(path) == 4


def test_a_csv_line_too_long_names_its_row_by_its_start(tmp_path: Path) -> None:
    """A CSV record with a line over the cap is reported with its first characters (its
    ASIN), not an empty input."""
    path = write(tmp_path, "job.csv", f'asin,d\nB0UJZDE8GX,"{"z" * 70_000}"\nB0D6NCF10E,ok\n')
    found = rows(path)
    assert [(row.line, row.asin) for row in found] == [(2, None), (3, "B0D6NCF10E")]
    assert found[0].raw.startswith("B0UJZDE8GX")


@pytest.mark.parametrize("name", ["job.txt", "job.txt.gz"])
def test_a_cr_ended_file_with_crlf_lines_later_counts_each_line_once(
    tmp_path: Path, name: str
) -> None:
    """A CR-ended file joined with a CRLF one (cat of an old-Mac and a Windows export): a
    CRLF is one line break, not two (rows were on lines 1, 2, 4, 6 of a 4-line file)."""
    path = write(tmp_path, name, f"{VALID}\rB0ABCDEFGJ\r\nB0ABCDEFGK\r\nxx\r\n")
    assert [(row.line, row.asin) for row in rows(path)] == [
        (1, VALID),
        (2, "B0ABCDEFGJ"),
        (3, "B0ABCDEFGK"),
        (4, None),
    ]
    assert count_rows(path) == 4


def test_a_crlf_in_a_cell_of_a_cr_ended_csv_is_one_line_break(tmp_path: Path) -> None:
    """In a CR-ended CSV, a cell's CRLF stays one line break (it became two, the cell's
    text changed)."""
    data = f'asin,t\r"{VALID}","a\r\nb"\rB0ABCDEFGJ,c\r'
    found = rows(write(tmp_path, "job.csv", data))
    assert [(row.line, row.asin, row.extra) for row in found] == [
        (2, VALID, {"t": "a\nb"}),
        (4, "B0ABCDEFGJ", {"t": "c"}),
    ]


@pytest.mark.parametrize(
    ("compress", "kind"),
    [
        (lzma.compress, "xz"),
        (bz2.compress, "bzip2"),
        (lambda data: b"\x28\xb5\x2f\xfd" + data, "zstd"),
    ],
)
def test_a_job_compressed_other_than_gzip_is_refused_as_such(
    tmp_path: Path, compress: Callable[[bytes], bytes], kind: str
) -> None:
    """An xz, bzip2 or zstd job file is refused as compressed, saying to decompress it or
    gzip it; it was taken for Latin-1 text, with advice to give --encoding latin-1."""
    path = tmp_path / "job.csv.x"
    path.write_bytes(compress(f"asin\n{VALID}\n".encode()))
    with pytest.raises(JobFileError, match=rf"{kind}-compressed.*gzip") as caught:
        rows(path, format="csv")
    assert "latin-1" not in str(caught.value)


@pytest.mark.parametrize(
    "head", ["\ufeffasin,title\r\n", "sep=;\r\nasin;title\r\n", "\ufeffsep=;\r\nasin;title\r\n"]
)
def test_the_header_of_a_second_export_joined_with_cat_is_no_row(tmp_path: Path, head: str) -> None:
    """Two CSV exports joined with cat: the second one's header (and its sep= line) is not
    a row; each was an invalid row ("an ASIN has 10 characters, this has 4"), so --strict
    refused the file."""
    sep = ";" if "sep=" in head else ","
    data = f"{head}{VALID}{sep}a\r\n{head}B0ABCDEFGJ{sep}b\r\n"
    path = write(tmp_path, "job.csv", data)
    found = rows(path)
    assert [(row.line, row.asin, row.error) for row in found] == [
        (2 + head.count("\n") - 1, VALID, None),
        (2 * (head.count("\n") + 1), "B0ABCDEFGJ", None),
    ]
    assert count_rows(path) == 2


def test_a_stray_quote_before_more_than_is_kept_still_costs_one_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quote left open with more of the file after it than a long record keeps: the
    lines after it are still rows of their own (one stray quote in a 24 MB file made it
    one invalid row, and no ASIN of the 500,000 after it was looked up)."""
    monkeypatch.setattr(sources, "_LONG_RECORD_KEPT", 150_000)
    long = "x" * 60_000
    data = f'asin,note\n{VALID},"12 inch\n{long}\n{long}\n{long}\n' + f"{VALID},a\n" * 1000
    found = rows(write(tmp_path, "job.csv", data))
    assert len(found) == 1004
    assert [row.line for row in found] == list(range(2, 1006))
    assert [row.asin for row in found[:4]] == [None] * 4
    assert all(row.asin == VALID for row in found[4:])


def test_a_resumed_read_of_a_file_shorter_than_its_stored_rows_is_refused(
    tmp_path: Path,
) -> None:
    """Resumed after line 5 (``stored_through_line``), a file of three lines is refused as
    changed: the job's rows cannot be found in it."""
    job = tmp_path / "job.txt"
    job.write_text("B000000001\nB000000002\nB000000003\n")
    with pytest.raises(JobFileError, match="ends at line 3, before line 5"):
        list(read_job(job, stored_through_line=5))
    assert [row.line for row in read_job(job, stored_through_line=3)] == [1, 2, 3]
