"""Lines for a terminal, measured in its columns (a CJK character takes two)."""

from __future__ import annotations

import pytest

from broker.bench import format_table
from broker.termwidth import columns, fit, pad

WIDE = "\u65e5\u672c\u30ad\u30fc"  # four characters, eight columns


def test_columns_counts_wide_and_combining_characters() -> None:
    """A CJK character takes two columns, a combining accent none, ASCII one."""
    assert columns("abc") == 3
    assert columns(WIDE) == 8
    assert columns("e\u0301") == 1


@pytest.mark.parametrize("width", [5, 8, 9, 20])
def test_fit_gives_exactly_the_columns_asked(width: int) -> None:
    """A line with wide characters, cut and padded to a width, takes that many columns
    (a live line sized by characters wrapped, and left a new line at every redraw)."""
    line = f"50/300 rows  {WIDE} 4.9/5"
    assert columns(fit(line, width)) == width
    assert fit("ab", 4) == "ab  "


def test_pad_never_cuts() -> None:
    """Padding aligns by columns, on the right unless told, and never cuts."""
    assert pad(WIDE, 10) == "  " + WIDE
    assert pad(WIDE, 10, right=False) == WIDE + "  "
    assert pad(WIDE, 3) == WIDE


def test_a_table_with_a_wide_name_stays_aligned() -> None:
    """broker status's table with a key named in Japanese: every line takes the same
    columns; the name's column was sized by characters and the others drifted."""
    lines = format_table(["key", "today"], [[WIDE, "1"], ["ab", "22"]]).splitlines()
    assert len({columns(line) for line in lines}) == 1


def test_a_terminal_of_no_columns_takes_columns_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pseudo-terminal that says 0 x 0 (not sized yet): the live line is as wide as
    $COLUMNS says; it was cut to 20 columns."""
    import os

    from broker.jobs import runner

    monkeypatch.setattr(os, "get_terminal_size", lambda *_: os.terminal_size((0, 0)))
    monkeypatch.setenv("COLUMNS", "120")
    assert columns(runner._fit("x" * 200)) == 1 + 119


def test_a_live_line_is_cut_on_what_an_ascii_stderr_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under an ASCII locale a key named in Japanese reaches the terminal escaped: the line
    is cut on the escapes' columns, so it does not wrap at every redraw."""
    import io
    import os
    import sys

    from broker.jobs import runner

    stderr = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="backslashreplace")
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setattr(os, "get_terminal_size", lambda *_: os.terminal_size((40, 24)))
    monkeypatch.delenv("COLUMNS", raising=False)  # read before the terminal when set
    line = runner._fit("\r" + "key \u30c7\u30e2\u9375 " * 5)
    assert line.startswith("\rkey \\u30c7\\u30e2\\u9375 ")
    assert columns(line) == 1 + 39
    assert line.isascii()
