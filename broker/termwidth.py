"""How many terminal columns text takes: a CJK character two, a combining mark none.

A line cut or padded by its number of characters is wrong on a terminal as soon as it holds
a wide character: a key named in Japanese made ``broker run``'s live line wrap (a new line on
screen at every redraw) and ``broker status``'s columns drift.
"""

from __future__ import annotations

import unicodedata

__all__ = ["columns", "fit", "pad"]


def _width(char: str) -> int:
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def columns(text: str) -> int:
    """The columns ``text`` takes on a terminal."""
    if text.isascii():
        return len(text)
    return sum(_width(char) for char in text)


def fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` columns and padded with blanks to exactly that many."""
    if text.isascii():
        return text[:width].ljust(width)
    used = 0
    for index, char in enumerate(text):
        step = _width(char)
        if used + step > width:
            return text[:index] + " " * (width - used)
        used += step
    return text + " " * (width - used)


def pad(text: str, width: int, *, right: bool = True) -> str:
    """``text`` padded with blanks to ``width`` columns (right-aligned unless ``right`` is
    False); never cut."""
    blanks = " " * max(width - columns(text), 0)
    return blanks + text if right else text + blanks
