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

import json
import math
from collections.abc import Callable

import orjson

__all__ = ["dumps", "loads"]

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
    # A lone surrogate, a big integer, a key that is not a string (or something ``default``
    # refused: the stdlib then raises the same refusal).
    try:
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


def _finite(value: object) -> object:
    """``value`` with every NaN and infinity in its dicts, lists and tuples as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def loads(text: bytes | str) -> object:
    """Decode JSON with orjson, falling back to the stdlib for what orjson refuses.

    orjson rejects some JSON the stdlib reads (a lone UTF-16 surrogate escape, ``NaN``):
    one odd title must not fail ten items. A NaN or an infinity (``NaN``, ``Infinity``,
    ``1e999``) is read as null: kept, it would make every output that carries the item
    invalid JSON.

    Raises:
        ValueError: ``text`` is not JSON (``json.JSONDecodeError``).
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text, parse_constant=_null, parse_float=_finite_or_null)


def _null(_text: str) -> None:
    return None


def _finite_or_null(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None
