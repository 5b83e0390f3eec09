"""ASIN validation and normalisation, so a malformed id is never sent to Amazon.

An ASIN is 10 ASCII letters or digits. All-digit ids are ISBN-10s, whose last character
may be ``X`` and whose check digit must be right. Amazon product URLs are accepted and
their ASIN extracted. Only ASCII counts: full-width digits and look-alike letters are
rejected, not folded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["AsinCheck", "check_asin", "is_isbn10", "isbn13_to_isbn10", "normalize_asin"]

_ASIN = re.compile(r"[0-9A-Z]{10}")
_ISBN10 = re.compile(r"[0-9]{9}[0-9X]")
_URL = re.compile(
    r"^https?://[^/\s]*amazon\.[^/\s]+/(?:[^\s?#]*/)?"
    r"(?:dp|gp/product|gp/aw/d|dp/product|exec/obidos/ASIN)/([A-Za-z0-9]{10})(?:[/?#]|$)",
)


@dataclass(frozen=True, slots=True)
class AsinCheck:
    """The verdict on one raw id: ``asin`` is set when valid, else ``reason`` says why."""

    raw: str
    asin: str | None
    reason: str | None = None

    @property
    def valid(self) -> bool:
        """True when the id is a well-formed ASIN."""
        return self.asin is not None


def is_isbn10(value: str) -> bool:
    """Return True if ``value`` (upper-case) is an ISBN-10 with a correct check digit."""
    if not _ISBN10.fullmatch(value):
        return False
    total = sum((10 - i) * (10 if c == "X" else int(c)) for i, c in enumerate(value))
    return total % 11 == 0


def isbn13_to_isbn10(value: str) -> str | None:
    """Convert a 978-prefixed ISBN-13 (hyphens allowed) to its ISBN-10, else None."""
    digits = value.replace("-", "")
    if not re.fullmatch(r"978[0-9]{10}", digits):
        return None
    check13 = sum((1 if i % 2 == 0 else 3) * int(c) for i, c in enumerate(digits[:12]))
    if (10 - check13 % 10) % 10 != int(digits[12]):
        return None
    core = digits[3:12]
    check = (11 - sum((10 - i) * int(c) for i, c in enumerate(core)) % 11) % 11
    return core + ("X" if check == 10 else str(check))


def check_asin(raw: str, *, convert_isbn13: bool = False) -> AsinCheck:
    """Validate one raw id (an ASIN, ISBN-10 or Amazon product URL).

    Whitespace is stripped and letters upper-cased. Returns an :class:`AsinCheck`
    whose ``reason`` is a short sentence a user can act on.
    """
    text = raw.strip()
    if not text:
        return AsinCheck(raw, None, "empty id")
    if not text.isascii():
        return AsinCheck(raw, None, "contains non-ASCII characters")
    url = _URL.match(text)
    if url:
        text = url.group(1)
    elif "://" in text:
        return AsinCheck(raw, None, "not an Amazon product URL with an ASIN in it")
    if convert_isbn13:
        converted = isbn13_to_isbn10(text)
        if converted is not None:
            return AsinCheck(raw, converted)
    value = text.upper()
    if len(value) != 10:
        return AsinCheck(raw, None, f"an ASIN has 10 characters, this has {len(value)}")
    if not _ASIN.fullmatch(value):
        return AsinCheck(raw, None, "an ASIN has only letters A-Z and digits 0-9")
    if value[:9].isdigit():
        if is_isbn10(value):
            return AsinCheck(raw, value)
        return AsinCheck(raw, None, "all-digit id with a wrong ISBN-10 check digit")
    return AsinCheck(raw, value)


def normalize_asin(raw: str) -> str:
    """Return the normalised ASIN for ``raw``, or raise ValueError with the reason."""
    verdict = check_asin(raw)
    if verdict.asin is None:
        raise ValueError(f"invalid ASIN {raw!r}: {verdict.reason}")
    return verdict.asin
