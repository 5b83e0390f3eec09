"""Property tests: arbitrary input never crashes a stage of the pipe.

Each stage may answer bad input only in its documented way: ASIN checks with a verdict (or
``ValueError`` from ``normalize_asin``), job-file readers with invalid rows or
``JobFileError``, response parsers with results, ``ApiError`` or ``ResponseError``. These
complement the fuzz tests next to each module (test_asin.py, test_sources.py,
test_creators.py, test_paapi5.py) with generators that reach deeper: structured URLs and
ISBNs, damaged gzip streams, every format and encoding, and responses that are well
shaped on the outside and junk inside.

Runs are derandomised so CI sees the same examples every time.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from broker.api.base import Dialect, Operation, ParsedItems, RawResponse
from broker.api.creators import CreatorsDialect
from broker.api.paapi5 import PaapiDialect
from broker.asin import check_asin, is_isbn10, isbn13_to_isbn10, normalize_asin
from broker.errors import ApiError, BadRequestError, JobFileError, ResponseError
from broker.jobs.sources import FORMATS, JobRow, count_rows, detect_format, read_job
from broker.models import Status
from broker.testing import FakeClock

# Deterministic and quick: the same examples on every run, no example database.
_FAST = settings(
    max_examples=120,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

_ASIN_SHAPE = re.compile(r"[A-Z0-9]{10}")

_T = TypeVar("_T")


def _attempt(call: Callable[[], _T], *documented: type[Exception]) -> _T | Exception:
    """Return ``call()``, or the exception it raised if that is one of ``documented``.

    Anything else propagates and fails the test: that is the property being checked.
    """
    try:
        return call()
    except documented as exc:
        return exc


# -- ASIN ids -------------------------------------------------------------------------------

_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_b_asins = st.text(alphabet=_ALNUM, min_size=8, max_size=8).map(lambda tail: "B0" + tail)


def _isbn10(core: str) -> str:
    check = (11 - sum((10 - i) * int(c) for i, c in enumerate(core)) % 11) % 11
    return core + ("X" if check == 10 else str(check))


def _isbn13(core: str, prefix: str = "978") -> str:
    digits = prefix + core
    check = (10 - sum((1 if i % 2 == 0 else 3) * int(c) for i, c in enumerate(digits)) % 10) % 10
    return digits + str(check)


_cores = st.text(alphabet="0123456789", min_size=9, max_size=9)
_valid_asins = st.one_of(_b_asins, _cores.map(_isbn10))


def _hyphenate(isbn: str, cuts: list[int]) -> str:
    parts, last = [], 0
    for cut in sorted(set(cuts)):
        if 0 < cut < len(isbn):
            parts.append(isbn[last:cut])
            last = cut
    parts.append(isbn[last:])
    return "-".join(parts)


_url_prefixes = st.sampled_from(
    [
        "https://www.amazon.com/dp/",
        "http://amazon.de/K\u00fcche-Set/dp/",
        "www.amazon.co.uk/gp/product/",
        "https://smile.amazon.co.jp/gp/aw/d/",
        "https://www.amazon.com.evil.net/dp/",
        "https://amzn.to/",
        "ftp://amazon.com/dp/",
        "",
    ]
)
_url_suffixes = st.sampled_from(["", "/", "?th=1", "#reviews", "/ref=x?a=1,2", " ", "X"])
_id_like = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=_ALNUM + _ALNUM.lower() + " -#/\t\x00\uff10\uff21", max_size=16),
    _valid_asins,
    st.builds(_isbn13, _cores, st.sampled_from(["978", "979"])),
    st.builds(
        lambda isbn, cuts: _hyphenate(isbn, cuts),
        st.builds(_isbn13, _cores),
        st.lists(st.integers(0, 13), max_size=5),
    ),
    st.builds(lambda p, a, s: p + a + s, _url_prefixes, _valid_asins, _url_suffixes),
)


@_FAST
@given(raw=_id_like, convert=st.booleans())
def test_check_asin_gives_a_verdict_of_the_documented_shape(raw: str, convert: bool) -> None:
    """Any id gets a verdict, never an exception; a valid ASIN is 10 upper-case ASCII
    letters or digits, an all-digit one a true ISBN-10, and it is its own normal form."""
    verdict = check_asin(raw, convert_isbn13=convert)
    assert verdict.raw == raw
    assert (verdict.asin is None) == (verdict.reason is not None)
    if verdict.asin is None:
        assert verdict.reason
        return
    assert _ASIN_SHAPE.fullmatch(verdict.asin)
    if verdict.asin[:9].isdigit():
        assert is_isbn10(verdict.asin)
    again = check_asin(verdict.asin, convert_isbn13=convert)
    assert again.asin == verdict.asin


@_FAST
@given(raw=_id_like)
def test_normalize_asin_is_idempotent_and_raises_only_value_error(raw: str) -> None:
    """normalize_asin returns the verdict's ASIN or raises ValueError (nothing else), and
    normalising its result changes nothing."""
    asin = _attempt(lambda: normalize_asin(raw), ValueError)
    if isinstance(asin, Exception):
        assert check_asin(raw).asin is None
        assert str(asin).startswith("invalid ASIN")
        return
    assert asin == check_asin(raw).asin
    assert normalize_asin(asin) == asin
    assert normalize_asin(asin.lower()) == asin


@_FAST
@given(
    asin=_valid_asins,
    case=st.sampled_from([str.lower, str.upper, str.swapcase]),
    pad=st.sampled_from(["", " ", "\t", "  \r\n"]),
    prefix=st.sampled_from(
        [
            "",
            "https://www.amazon.com/dp/",
            "amazon.de/Foo/dp/",
            "https://www.amazon.co.uk/gp/product/",
        ]
    ),
)
def test_every_spelling_of_an_asin_normalises_to_it(
    asin: str, case: Callable[[str], str], pad: str, prefix: str
) -> None:
    """Case, surrounding whitespace and an Amazon product URL around a valid ASIN all
    normalise to the same upper-case ASIN."""
    assert check_asin(pad + prefix + case(asin) + pad).asin == asin


@_FAST
@given(core=_cores, cuts=st.lists(st.integers(0, 13), max_size=4))
def test_978_isbn13_converts_exactly_when_enabled(core: str, cuts: list[int]) -> None:
    """A 978 ISBN-13 (hyphens anywhere) maps to the ISBN-10 with the same core when
    conversion is on, and is invalid with a reason when it is off; 979 never converts."""
    isbn10 = _isbn10(core)
    isbn13 = _hyphenate(_isbn13(core), cuts)
    assert isbn13_to_isbn10(isbn13) == isbn10
    assert check_asin(isbn13, convert_isbn13=True).asin == isbn10
    off = check_asin(isbn13)
    assert off.asin is None
    assert "--convert-isbn13" in (off.reason or "")
    assert isbn13_to_isbn10(_isbn13(core, "979")) is None
    assert check_asin(_isbn13(core, "979"), convert_isbn13=True).asin is None


@_FAST
@given(raw=st.text(max_size=30))
def test_isbn_helpers_never_raise(raw: str) -> None:
    """is_isbn10 and isbn13_to_isbn10 answer any text; a conversion is a valid ISBN-10."""
    assert isinstance(is_isbn10(raw), bool)
    converted = isbn13_to_isbn10(raw)
    if converted is not None:
        assert is_isbn10(converted)


# -- job files ------------------------------------------------------------------------------

_FRAGMENTS = [
    b"asin",
    b"ASIN",
    b"marketplace",
    b"resources",
    b",",
    b";",
    b"\t",
    b"|",
    b"\n",
    b"\r\n",
    b"\r",
    b'"',
    b'""',
    b"#",
    b" ",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b'"asin":',
    b'"asin":"B0ABCDEFGH"',
    b'"marketplace":',
    b"null",
    b"\\u0000",
    b"\\ud83d",
    b"\x00",
    b"\x1f\x8b",
    b"\xff",
    b"\xe9",
    b"\xc3\xa9",
    b"\xef\xbb\xbf",
    b"\xfe\xff",
    b"PK\x03\x04",
    b"B0ABCDEFGH",
    b"b0abcdefgh",
    b"080442957X",
    b"9780306406157",
    b"https://www.amazon.com/dp/B0ABCDEFGH",
    b"x" * 70,
]
_file_bytes = st.one_of(
    st.binary(max_size=400),
    st.lists(st.sampled_from(_FRAGMENTS), max_size=50).map(b"".join),
)
_names = st.sampled_from(
    ["job.txt", "job.csv", "job.tsv", "job.jsonl", "job.ndjson", "job.dat", "job"]
)


def _read_all(path: Path, **options: object) -> list[JobRow]:
    return list(read_job(path, **options))  # type: ignore[arg-type]


def _check_rows(found: Sequence[JobRow]) -> None:
    """Rows keep their order, and each is either a valid ASIN or an error, never both."""
    lines = [row.line for row in found]
    assert lines == sorted(set(lines))
    for row in found:
        assert row.line >= 1
        assert isinstance(row.raw, str)
        assert (row.asin is None) == (row.error is not None)
        if row.asin is not None:
            assert _ASIN_SHAPE.fullmatch(row.asin)


@_FAST
@given(
    data=_file_bytes,
    name=_names,
    fmt=st.sampled_from([None, *FORMATS]),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "cp1252", "ascii"]),
    max_line_bytes=st.sampled_from([1, 16, 65536]),
    convert=st.booleans(),
)
def test_any_bytes_in_any_format_give_rows_or_job_file_error(
    tmp_path: Path,
    data: bytes,
    name: str,
    fmt: str | None,
    encoding: str,
    max_line_bytes: int,
    convert: bool,
) -> None:
    """Any bytes read as any format and encoding give well-formed rows or JobFileError,
    never another exception; format detection answers too."""
    path = tmp_path / name
    path.write_bytes(data)
    detected = _attempt(lambda: detect_format(path), JobFileError)
    assert isinstance(detected, JobFileError) or detected in FORMATS
    options: dict[str, object] = {
        "format": fmt,
        "encoding": encoding,
        "max_line_bytes": max_line_bytes,
    }
    found = _attempt(lambda: _read_all(path, convert_isbn13=convert, **options), JobFileError)
    if isinstance(found, Exception):
        assert str(found).startswith(str(path))
        return
    _check_rows(found)
    assert count_rows(path, **options) == len(found)  # type: ignore[arg-type]


@_FAST
@given(
    data=_file_bytes,
    name=st.sampled_from(["job.txt", "job.csv", "job.jsonl"]),
    cut=st.floats(0.0, 1.0),
)
def test_gzip_reads_like_plain_and_truncation_keeps_a_prefix(
    tmp_path: Path, data: bytes, name: str, cut: float
) -> None:
    """A gzipped job reads exactly like the plain file; cut short anywhere, it yields a
    prefix of those rows and then JobFileError (or, cut at the very end, all of them)."""
    assume(not data.startswith(b"\x1f\x8b"))  # that plain file would itself read as gzip
    plain = tmp_path / name
    plain.write_bytes(data)
    read = _attempt(lambda: _read_all(plain), JobFileError)
    expected = None if isinstance(read, Exception) else read
    whole = gzip.compress(data)
    packed = tmp_path / f"{name}.gz"
    packed.write_bytes(whole)
    if expected is None:
        with pytest.raises(JobFileError):
            _read_all(packed)
    else:
        assert _read_all(packed) == expected
    packed.write_bytes(whole[: int(len(whole) * cut)])
    seen: list[JobRow] = []
    # extend keeps the rows it got before an error
    _attempt(lambda: seen.extend(read_job(packed)), JobFileError)
    _check_rows(seen)
    if expected is not None:
        assert seen == expected[: len(seen)]


_cells = st.one_of(
    st.text(alphabet='ab B0XYZ,;|"\r\n\t#', max_size=12),
    _valid_asins,
    st.sampled_from(["www.amazon.de", "", " "]),
)
_header_names = st.sampled_from(["asin", "ASIN", " Asin ", "marketplace", "sku", "title", ""])


@_FAST
@given(
    data=st.data(),
    delimiter=st.sampled_from([",", ";", "\t", "|"]),
    ending=st.sampled_from(["\n", "\r\n"]),
)
def test_quoted_csv_tables_read_back(
    tmp_path: Path, data: st.DataObject, delimiter: str, ending: str
) -> None:
    """A CSV written with full quoting (delimiters, quotes and line breaks inside cells)
    reads back one row per non-blank record with its asin cell as ``raw``; a header
    without exactly one asin column (or with two marketplace columns) is a JobFileError."""
    header = data.draw(st.lists(_header_names, min_size=1, max_size=4), label="header")
    # A line of blank cells before the header is skipped as a blank line is (the header
    # is the first line holding a name): test_sources pins that case.
    assume(any(cell.strip() for cell in header))
    records = data.draw(
        st.lists(st.lists(_cells, min_size=len(header), max_size=len(header)), max_size=6),
        label="records",
    )
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator=ending, quoting=csv.QUOTE_ALL)
    writer.writerows([header, *records])
    path = tmp_path / "job.csv"
    path.write_text(buffer.getvalue(), encoding="utf-8", newline="")
    names = [cell.strip().lower() for cell in header]
    found = _attempt(lambda: _read_all(path), JobFileError)
    if isinstance(found, Exception):
        assert names.count("asin") != 1 or names.count("marketplace") > 1
        assert "column" in str(found)
        return
    assert names.count("asin") == 1
    _check_rows(found)
    column = names.index("asin")
    kept = [record for record in records if any(cell.strip() for cell in record)]
    assert [row.raw for row in found] == [record[column] for record in kept]


# -- responses ------------------------------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=10,
)
_REQUESTED = ["B000000001", "B000000002", "0306406152"]
_requested = st.lists(
    st.sampled_from([*_REQUESTED, "b000000001", "B0000000ZZ", ""]), min_size=1, max_size=5
)
_clock = FakeClock()
_DIALECTS: dict[str, Dialect] = {
    "creators": CreatorsDialect(clock=_clock),
    "paapi5": PaapiDialect(clock=_clock),
}
_headers = st.dictionaries(
    st.sampled_from(["retry-after", "Retry-After", "date", "content-type", "x-amzn-requestid"]),
    st.one_of(
        st.text(max_size=30),
        st.sampled_from(
            [
                "5",
                "-3",
                "1e400",
                "nan",
                "inf",
                "Fri, 01 May 2026 12:00:00 GMT",
                "Fri, 01 May 2026 12:00:00 -0000",
                "Mon, 99 Foo 9999 99:99:99 GMT",
                "Thu, 01 Jan 1970 00:00:00 GMT",
            ]
        ),
    ),
    max_size=3,
)


def _maybe(key: str, value: st.SearchStrategy[object]) -> st.SearchStrategy[dict[str, object]]:
    """``{key: value}`` or ``{}``: a field that may be missing."""
    return st.one_of(st.just({}), value.map(lambda v: {key: v}))


def _mostly(shaped: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """``shaped`` three times in four, else any JSON value, so deep paths are reached."""
    return st.integers(0, 3).flatmap(lambda pick: shaped if pick else _json)


def _nested(path: Sequence[str], leaf: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """A value shaped like ``{path[0]: [{path[1]: ... leaf}]}`` with junk at any level.

    A key named ``[]`` stands for a list whose first element continues the path.
    """
    if not path:
        return _mostly(leaf)
    inner = _nested(path[1:], leaf)
    if path[0] == "[]":
        return _mostly(st.lists(inner, min_size=1, max_size=2))
    return _mostly(
        st.builds(
            lambda value, extra: {**extra, path[0]: value},
            inner,
            st.dictionaries(st.text(max_size=5), _json, max_size=2),
        )
    )


def _item(dialect: str) -> st.SearchStrategy[dict[str, object]]:
    """An item with its ASIN and the summary fields, each well shaped or junk."""
    pascal = dialect == "paapi5"

    def name(camel: str) -> str:
        return camel[0].upper() + camel[1:] if pascal else camel

    asin_key = "ASIN" if pascal else "asin"
    money = [name("offersV2"), name("listings"), "[]", name("price"), name("money")]
    leaf = st.fixed_dictionaries(
        {name("amount"): st.one_of(st.floats(), st.integers(), st.just(10**400), _scalars)},
        optional={name("currency"): _scalars},
    )
    return st.builds(
        lambda asin, info, offers, url: {asin_key: asin, **info, **offers, **url},
        st.sampled_from([*_REQUESTED, "b000000002", "B0000000ZZ"]),
        _maybe(name("itemInfo"), _nested([name("title"), name("displayValue")], _scalars)),
        _maybe(money[0], _nested(money[1:], leaf)),
        _maybe("DetailPageURL" if pascal else "detailPageURL", _scalars),
    )


def _errors(dialect: str) -> st.SearchStrategy[list[dict[str, object]]]:
    code, message = ("Code", "Message") if dialect == "paapi5" else ("code", "message")
    return st.lists(
        st.fixed_dictionaries(
            {
                code: st.sampled_from(
                    ["ItemNotAccessible", "InvalidParameterValue", "NoResults", "X"]
                )
            },
            optional={
                message: st.one_of(
                    _scalars,
                    st.sampled_from(_REQUESTED).map(lambda a: f"The ItemId {a} is not accessible."),
                )
            },
        ),
        max_size=3,
    )


def _check_parsed(parsed: ParsedItems, requested: Sequence[str]) -> None:
    """Every requested ASIN is answered or missing, once; outcomes are well formed."""
    asked = set(requested)
    assert set(parsed.outcomes) <= asked
    assert set(parsed.missing).isdisjoint(parsed.outcomes)
    # ASINs are case-insensitive: two spellings of one in a request are one ASIN, answered
    # (or missing) once, under one of its spellings.
    told = [*parsed.outcomes, *parsed.missing]
    assert sorted(asin.upper() for asin in told) == sorted({asin.upper() for asin in asked})
    for asin, outcome in parsed.outcomes.items():
        assert outcome.asin == asin
        assert isinstance(outcome.status, Status)
        if outcome.status is Status.OK:
            assert outcome.summary is not None
            summary = outcome.summary
            assert summary.title is None or isinstance(summary.title, str)
            assert summary.price is None or math.isfinite(summary.price)
            assert summary.currency is None or isinstance(summary.currency, str)
            assert summary.availability is None or isinstance(summary.availability, str)
            assert summary.detail_url is None or isinstance(summary.detail_url, str)
        else:
            assert outcome.error is not None


def _check_failure(error: Exception, status: int) -> None:
    """A documented parse failure: an ApiError with a code and a sane wait, or a
    ResponseError carrying the HTTP status."""
    if isinstance(error, ApiError):
        assert isinstance(error.code, str)
        assert error.code
        assert error.status == status
        wait = error.retry_after
        assert wait is None or (math.isfinite(wait) and wait >= 0)
    else:
        assert isinstance(error, ResponseError)
        assert error.status == status


@pytest.mark.parametrize("dialect", sorted(_DIALECTS))
@_FAST
@given(data=st.data())
def test_well_shaped_200s_with_junk_inside_always_parse(dialect: str, data: st.DataObject) -> None:
    """A 200 whose items list and errors list are well shaped parses, whatever junk the
    items carry (so no TypeError/KeyError is ever hidden as a ResponseError); only a
    request-level error code may raise, as BadRequestError."""
    items_key, container = (
        ("Items", "ItemsResult") if dialect == "paapi5" else ("items", "itemsResult")
    )
    errors_key = "Errors" if dialect == "paapi5" else "errors"
    body = {
        container: {items_key: data.draw(st.lists(_item(dialect), max_size=4))},
        errors_key: data.draw(_errors(dialect)),
    }
    requested = data.draw(_requested)
    raw = RawResponse(200, data.draw(_headers), json.dumps(body).encode())
    parsed = _attempt(lambda: _DIALECTS[dialect].parse_get_items(raw, requested), BadRequestError)
    if isinstance(parsed, Exception):
        _check_failure(parsed, 200)
        return
    _check_parsed(parsed, requested)


@pytest.mark.parametrize("dialect", sorted(_DIALECTS))
@_FAST
@given(
    status=st.sampled_from([200, 204, 301, 400, 401, 403, 404, 413, 429, 500, 502, 503, 504]),
    body=st.one_of(
        _json.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {},
            optional={
                "type": _scalars,
                "__type": st.sampled_from(["com.amazon#ResourceNotFoundException", "#", "x#"]),
                "reason": _scalars,
                "message": _scalars,
                "Message": _scalars,
                "retryAfterSeconds": _scalars,
                "fieldList": _json,
                "Errors": _json,
                "Code": _scalars,
            },
        ).map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=40),
    ),
    headers=_headers,
    requested=_requested,
)
def test_any_answer_gives_result_or_documented_error(
    dialect: str, status: int, body: bytes, headers: dict[str, str], requested: list[str]
) -> None:
    """Any status, error envelope, headers and requested list give parsed items or an
    ApiError/ResponseError with a sane code and Retry-After; parse_operation likewise."""
    parser = _DIALECTS[dialect]
    raw = RawResponse(status, headers, body)
    parsed = _attempt(lambda: parser.parse_get_items(raw, requested), ApiError, ResponseError)
    if isinstance(parsed, Exception):
        _check_failure(parsed, status)
    else:
        _check_parsed(parsed, requested)
    result = _attempt(
        lambda: parser.parse_operation(raw, Operation.SEARCH_ITEMS), ApiError, ResponseError
    )
    if isinstance(result, Exception):
        _check_failure(result, status)
    else:
        assert status == 200
        assert isinstance(result, dict)
