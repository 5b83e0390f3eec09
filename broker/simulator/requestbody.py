"""Reading a request's JSON body as Amazon's servers would: what they cannot read is refused.

The Creators API, PA-API and the token endpoints each refuse such a body with their own 400;
this module only tells whether there is one to read.
"""

from __future__ import annotations

import json
import math

__all__ = ["read_body"]


def read_body(raw: bytes | str) -> object | None:
    """A request body parsed as JSON (an empty one is ``{}``); None for one no JSON reader
    takes, which each API refuses with its own 400.

    None too for what Python's reader takes and Amazon's would not: ``NaN`` or
    ``Infinity`` (no JSON), a number beyond a double (``1e400``), and a string holding half
    a surrogate pair (``"\\ud800"``, in any of the encodings JSON allows), which is no
    Unicode text. An integer of over 4,300 digits (Python's limit) or nesting past its
    recursion limit is refused as well: each of these was a 500 and a traceback, from a body
    a client sent wrong.
    """
    if not raw.strip():
        return {}
    try:
        body: object = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
        _check_text(body)
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError, UnicodeDecodeError (bytes that are no UTF-8,
        # UTF-16 or UTF-32) and UnicodeEncodeError (half a surrogate pair).
        return None
    return body


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is no JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is beyond a double")
    return value


def _check_text(value: object) -> None:
    """Raise UnicodeEncodeError for a string in ``value`` that is no Unicode text."""
    if isinstance(value, str):
        value.encode()
    elif isinstance(value, dict):
        for key, item in value.items():
            key.encode()
            _check_text(item)
    elif isinstance(value, list):
        for item in value:
            _check_text(item)
