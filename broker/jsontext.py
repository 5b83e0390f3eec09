"""JSON read and written by orjson where it can, and by the stdlib where orjson cannot.

orjson is about ten times faster than the stdlib on an item (a 1 KB item's output row:
0.7 µs against 9.7), and a job pays for JSON three times a row: the ledger's write, its
read, and the output's write. What orjson refuses goes to the stdlib, so nothing that was
readable or writable before fails now:

- :func:`dumps` writes the text of ``json.dumps(value, ensure_ascii=False,
  separators=(",", ":"))`` (the same escapes, the same key order) for the values rows and
  the ledger hold (dicts, lists, strings, numbers, booleans, None), but for two things: a
  float smaller than 0.0001 may be spelt otherwise (``0.00001`` for ``1e-05``, ``1e-9`` for
  ``1e-09``: the same number), and NaN and an infinity are ``null`` (the stdlib's ``NaN``
  is not JSON). A lone surrogate, an integer beyond 64 bits and a key that is not a string
  are written by the stdlib, as before. Beyond those values orjson differs more: it writes
  an enum's value and a UUID (the stdlib asks ``default``), and a dict subclass from its
  storage, whatever its ``items()`` says.
- :func:`loads` reads Amazon's answers and what this package wrote from them. orjson reads
  an integer beyond 64 bits as the nearest float (Amazon's answers hold none); a user's own
  values (a job's extra columns) are read with the stdlib instead, exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Final

import orjson

__all__ = ["deep_enough", "dumps", "loads"]

#: Datetimes and dataclasses go to ``default`` (or are refused), as with the stdlib: orjson
#: would otherwise write them in a form of its own.
_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def dumps(value: object, *, default: Callable[[object], object] | None = None) -> str:
    """``value`` as compact JSON text, non-ASCII characters kept as they are.

    Raises:
        TypeError: ``value`` holds something JSON has no form for (``default`` is asked
            first), as ``json.dumps`` raises.
        ValueError: ``value`` holds itself.
    """
    try:
        return orjson.dumps(value, default=default, option=_OPTIONS).decode()
    except orjson.JSONEncodeError:
        pass
    # A lone surrogate, a big integer, a key that is not a string, nesting deeper than
    # orjson writes (255 levels; it reads 1,024), or something ``default`` refused (the
    # stdlib then raises the same refusal).
    try:
        with deep_enough():
            return json.dumps(
                value, ensure_ascii=False, separators=(",", ":"), default=default, allow_nan=False
            )
    except ValueError as exc:
        if "Out of range float" not in str(exc):
            raise  # a value that holds itself, say
        # NaN or an infinity beside what sent the value here: null, as orjson writes it,
        # so one value never comes out in two spellings.
        return json.dumps(
            _finite(value), ensure_ascii=False, separators=(",", ":"), default=default
        )


#: The recursion limit the stdlib's writer gets: anything orjson read (at most 1,024 levels)
#: fits, where Python's default of 1,000 made an answer nested some 980 deep (a hostile or
#: broken endpoint) crash the run at its first write, and again at every rerun.
_WRITE_RECURSION: Final = 4_000


#: Blocks in :func:`deep_enough` now, over every thread (the ledger writes in workers), and
#: the limit before the first of them: the last one out puts it back, never one in between.
_deep_users = 0
_limit_before = 0
_deep_lock = threading.Lock()


@contextlib.contextmanager
def deep_enough() -> Iterator[None]:
    """Raise the recursion limit to :data:`_WRITE_RECURSION` for the block, if lower: for
    the stdlib's JSON writer and reader, over anything orjson read (the item cache's own
    encoder too)."""
    global _deep_users, _limit_before
    with _deep_lock:
        if _deep_users == 0:
            _limit_before = sys.getrecursionlimit()
            if _limit_before < _WRITE_RECURSION:
                sys.setrecursionlimit(_WRITE_RECURSION)
        _deep_users += 1
    try:
        yield
    finally:
        with _deep_lock:
            _deep_users -= 1
            if _deep_users == 0 and _limit_before < _WRITE_RECURSION:
                sys.setrecursionlimit(_limit_before)


def _finite(value: object) -> object:
    """``value`` with every NaN and infinity in its dicts, lists and tuples as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def loads(text: bytes | str, *, answer: bool = False) -> object:
    """Decode JSON with orjson, falling back to the stdlib for what orjson refuses.

    orjson rejects some JSON the stdlib reads (a lone UTF-16 surrogate escape, ``NaN``):
    one odd title must not fail ten items. A NaN or an infinity (``NaN``, ``Infinity``,
    ``1e999``) is read as null: kept, it would make every output that carries the item
    invalid JSON. ``answer``: the text is a server's answer, refused when nested deeper
    than orjson reads (1,024 levels), so that what the broker keeps of it (a row nests it a
    few levels deeper) is always read back and written again.

    Raises:
        ValueError: ``text`` is not JSON (``json.JSONDecodeError``), or is an ``answer``
            nested too deep.
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        if answer and str(exc).startswith("depth limit exceeded"):
            raise ValueError("JSON nested deeper than 1,024 levels") from exc
    with deep_enough():
        return json.loads(text, parse_constant=_null, parse_float=_finite_or_null)


def _null(_text: str) -> None:
    return None


def _finite_or_null(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None
