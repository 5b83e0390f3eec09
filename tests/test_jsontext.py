"""JSON text by orjson with the stdlib behind it: the same text, and nothing newly refused."""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.jobs.ledger import Ledger
from broker.jobs.sinks import json_lines, output_row
from broker.jobs.sources import JobFingerprint, JobRow
from broker.jsontext import dumps, loads


def _stdlib(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


ROW = {
    "line": 3,
    "input": "B000000001",
    "asin": "B000000001",
    "status": "ok",
    "item": {
        "asin": "B000000001",
        "itemInfo": {"title": {"displayValue": 'Kettle "Steel" \\ 1.7 l \u00e9\u4e2d\U0001f600'}},
        "offersV2": {"listings": [{"price": {"money": {"amount": 19.99, "currency": "EUR"}}}]},
        "flags": [True, False, None, 0, -1, 2**63 - 1, 1e16, 0.1, 123456.789, -0.0],
    },
    "control": "".join(chr(c) for c in range(32)) + "\x7f\u2028\u2029",
    "extra": {"sku": "A-1", "n": 7},
}


class TestDumps:
    """dumps writes the stdlib's compact text, faster, and falls back to it."""

    def test_same_text_as_the_stdlib(self) -> None:
        """A row with every escape, non-ASCII, floats and ints comes out as the stdlib's."""
        assert dumps(ROW) == _stdlib(ROW)

    def test_a_small_float_may_be_spelt_otherwise_but_is_the_same_number(self) -> None:
        """orjson writes 1e-05 as 0.00001 and 1e-09 as 1e-9: other text, the same float."""
        values = [1e-05, 9.99e-05, 1e-09, 1.5e-07, 2.5e300, 5e-324]
        assert json.loads(dumps(values)) == values

    def test_every_bmp_character_is_escaped_as_the_stdlib_does(self) -> None:
        """No character outside the surrogates is written differently."""
        text = "".join(chr(c) for c in range(0x10000) if not 0xD800 <= c <= 0xDFFF)
        assert dumps(text) == _stdlib(text)

    @pytest.mark.parametrize(
        "value",
        [
            {"title": "half an emoji \ud83d"},
            {"id": 2**64 + 1},
            {1: "an int key"},
        ],
        ids=["lone-surrogate", "big-int", "int-key"],
    )
    def test_what_orjson_refuses_the_stdlib_writes(self, value: object) -> None:
        """A lone surrogate, an integer beyond 64 bits, a key that is no string: as before."""
        assert dumps(value) == _stdlib(value)

    @pytest.mark.parametrize(
        "beside", [None, "half an emoji \ud83d", 2**64 + 1], ids=["alone", "surrogate", "big-int"]
    )
    def test_nan_is_null_not_invalid_json(self, beside: object) -> None:
        """NaN and infinity, which the stdlib writes as bare NaN / Infinity, become null,
        also beside what sends the value to the stdlib (it wrote NaN there)."""
        value = {"a": math.nan, "b": [math.inf, -math.inf], "c": beside}
        assert dumps(value) == '{"a":null,"b":[null,null],"c":' + _stdlib(beside) + "}"

    def test_default_is_asked_for_datetimes_and_dataclasses(self) -> None:
        """orjson's own forms of a datetime or a dataclass are not used: default decides."""

        @dataclass
        class Point:
            x: int

        seen: list[object] = []

        def default(value: object) -> object:
            seen.append(value)
            return "converted"

        moment = datetime(2026, 12, 6, tzinfo=UTC)
        assert dumps([moment, Point(1)], default=default) == '["converted","converted"]'
        assert seen == [moment, Point(1)]

    def test_unserialisable_raises_type_error(self) -> None:
        """Something JSON has no form for raises TypeError, as json.dumps does."""
        with pytest.raises(TypeError):
            dumps({"a": object()})


class TestLoads:
    """loads reads with orjson and falls back to the stdlib for what orjson refuses."""

    def test_reads_what_dumps_wrote(self) -> None:
        """A row round-trips."""
        assert loads(dumps(ROW)) == ROW

    def test_nan_and_lone_surrogate_escapes(self) -> None:
        """NaN reads as null; a lone surrogate escape reads as the stdlib reads it."""
        assert loads(b'{"a": NaN, "b": 1e999, "t": "\\ud83d"}') == {
            "a": None,
            "b": None,
            "t": "\ud83d",
        }

    def test_not_json_raises_value_error(self) -> None:
        """Text that is not JSON raises ValueError."""
        with pytest.raises(ValueError, match="Expecting property name"):
            loads(b"{not json")


def _nested(depth: int) -> list[object]:
    outer: list[object] = []
    inner = outer
    for _ in range(depth - 1):
        deeper: list[object] = []
        inner.append(deeper)
        inner = deeper
    return outer


class TestDeepAnswers:
    """An answer nested as deep as orjson reads is kept, written and read back; deeper is
    refused as the server's bad answer. Some 980 levels crashed a run at its first write
    (RecursionError, exit 1) and again at every rerun, a daemon at every restart."""

    def test_an_answer_orjson_reads_is_written_and_read_back_in_a_row(self) -> None:
        """1,024 levels (orjson's most) inside a row a few levels deeper, from a thread as
        the ledger writes: written by the stdlib, read back, written again the same."""
        item = {"asin": "B000000001", "extra": _nested(1_023)}  # 1,024 levels in all
        answer = loads(dumps(item).encode(), answer=True)
        texts: list[str] = []

        def write() -> None:
            row = dumps({"item": answer, "line": 1})
            texts.append(row)
            texts.append(dumps(loads(row.encode())))

        worker = threading.Thread(target=write)
        worker.start()
        worker.join()
        assert len(texts) == 2
        assert texts[0] == texts[1]
        assert texts[0].count("[") == 1_023

    def test_the_item_cache_keeps_an_answer_orjson_reads(self) -> None:
        """The cache's own encoder writes it too, and decodes it back: it raised
        RecursionError, the write batch was dropped and the cache left alone a minute."""
        from broker.cache.entry import decode, encode
        from broker.cache.policy import CacheKey
        from broker.models import ItemResult, Status

        item = loads(dumps({"asin": "B000000001", "extra": _nested(1_023)}).encode(), answer=True)
        assert isinstance(item, dict)
        result = ItemResult(
            "B000000001", "www.amazon.com", Status.OK, item=item, fetched_at=datetime.now(UTC)
        )
        key = CacheKey.of("www.amazon.com", "B000000001", ("itemInfo.title",))
        entry = encode(key, result)
        assert dumps(decode(entry, None).item) == dumps(item)

    def test_an_answer_deeper_than_orjson_reads_is_refused(self) -> None:
        """Past 1,024 levels an answer is not JSON to the broker (a bad response, retried,
        then failed), never an item it could not write or read back."""
        with pytest.raises(ValueError, match="deeper than 1,024"):
            loads(b"[" * 1_100 + b"]" * 1_100, answer=True)
        assert isinstance(loads(b"[" * 1_100 + b"]" * 1_100), list)  # its own rows: read


def test_a_jobs_extra_column_keeps_a_big_integer_exactly(tmp_path: Path) -> None:
    """An input's extra value beyond 64 bits reaches the output exact (orjson reads it as
    the nearest float, so the ledger reads the user's own values with the stdlib)."""
    big = 123456789012345678901234567890
    fingerprint = JobFingerprint(Path("/jobs/job.jsonl"), 1, 1, "a" * 64)
    row = JobRow(1, "x", None, extra={"order": big}, error="bad")
    with Ledger.open(
        tmp_path / "job.ledger", fingerprint=fingerprint, default_marketplace="www.amazon.com"
    ) as ledger:
        ledger.ingest([row])
        (done,) = ledger.done_rows_after(0)
    assert done.extra == {"order": big}
    assert f'"extra":{{"order":{big}}}' in json_lines([output_row(done)]).decode()
