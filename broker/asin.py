"""ASIN validation and normalisation, so a malformed id is never sent to Amazon.

An ASIN is 10 ASCII letters or digits. All-digit ids are ISBN-10s, whose last character
may be ``X`` and whose check digit must be right; nine digits followed by any other
letter are taken for a mistyped ISBN-10 and rejected. Amazon product URLs (``/dp/``,
``/gp/product/``, ``/gp/aw/d/`` and older forms, on any Amazon domain, with or without
the scheme) are accepted and their ASIN extracted. Only ASCII counts: full-width digits
and look-alike letters are rejected, not folded. A 978 ISBN-13 is converted to its
ISBN-10 only when asked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Final

__all__ = [
    "AsinCheck",
    "check_asin",
    "is_isbn10",
    "isbn13_to_isbn10",
    "normalize_asin",
    "plain_asin",
    "refuse_single_string",
]

_ISBN10 = re.compile(r"[0-9]{9}[0-9X]")
_ISBN13 = re.compile(r"97[89][0-9]{10}")
# Hyphens are formatting wherever they stand, as isbn13_to_isbn10 takes them; an id of
# digits and hyphens whose 13 digits start 978/979 is an ISBN-13, converted or not.
_ISBN13_SHAPED = re.compile(r"[0-9-]+")
#: an ISBN-10 as printed: ten characters, single hyphens between them (``0-306-40615-2``)
_ISBN10_HYPHENATED = re.compile(r"[0-9](?:-?[0-9]){8}-?[0-9Xx]")
# The host must be an Amazon domain (amazon.com, www.amazon.co.uk, smile.amazon.de,
# amazon.com.au ...), so "amazon.com.evil.net" and "amazon.com@evil.net" do not pass.
# The title slug before the marker may hold any characters (amazon.de slugs carry
# umlauts); the ASIN itself must be ASCII and be followed by no letter or digit: the end
# of its path segment, of a link mangled on the way ("&", ";", an encoded "?" or "/"), or
# of one pasted from prose or Markdown (a full stop, a closing bracket or quote after it).
# The path before the marker is matched lazily: the first marker is this URL's, and a second
# URL run on after it (``...dp/B0A,https://amazon.de/dp/B0B``) is left for the tail check.
_URL = re.compile(
    r"(?:https?://)?(?:[a-z0-9-]+\.)*(amazon\.[a-z]{2,3}(?:\.[a-z]{2,3})?)(?::[0-9]{1,5})?"
    r"/(?:[^\s?#]*?/)??"
    r"(?:dp|dp/product|gp/product|gp/aw/d|gp/offer-listing|product-reviews|o/ASIN"
    r"|exec/obidos/ASIN|exec/obidos/tg/detail/-)"
    r"/([a-z0-9]{10})(?![a-z0-9])",
    re.IGNORECASE,
)
#: amazon.com's own short domain, amzn.com (not amzn.to, whose links hold no ASIN): each
#: link's start, up to the ASIN of ``amzn.com/ASIN`` or ``amzn.com/dp/ASIN``, anywhere in the
#: text (not within another host name), is spelled out as amazon.com's product URL before
#: any check, so a link quoted, repeated or followed by another is read as theirs are.
_AMZN_COM = re.compile(
    r"(?<![a-z0-9.-])(?:https?://)?(?:www\.)?amzn\.com(?::[0-9]{1,5})?/(?:dp/|gp/product/)?"
    r"(?=[a-z0-9]{10}(?![a-z0-9]))",
    re.IGNORECASE,
)
_AMAZON_COM_DP = "https://www.amazon.com/dp/"
_LOOKS_LIKE_URL = re.compile(
    r"[a-z][a-z0-9+.-]*://|www\.|(?:[a-z0-9-]+\.)*(?:amazon|amzn)\.[a-z]{2,3}\b",
    re.IGNORECASE,
)
#: What may follow a product URL's ASIN: the rest of the URL (a path, a query, a fragment, a
#: mangled "&", ";" or encoded "?" or "/") or punctuation closing the prose around it.
_URL_GOES_ON = "/?#&;%"
_CLOSERS = ".,;:!?)]}>\"'`\u201d\u2019"
#: A second ASIN listed after a URL (``;B0ZZZZZZZZ``), told from a path parameter
#: (``;jsessionid=1``) by its shape.
_LISTED_ID = re.compile(r"[,;|][a-z0-9]{10}(?![a-z0-9=])", re.IGNORECASE)
#: Where a query string or fragment may list another id (a product URL is looked for after).
_LISTED: Final = re.compile(r"[,;|]")
#: An ASIN ending a query string or fragment after a comma, semicolon or bar. Only one
#: starting "B0" (every ASIN but a book's ISBN-10): the ids a query carries itself
#: (``pf_rd_p=abc,1234567890``) are digits or words.
_LISTED_LAST_ASIN: Final = re.compile(r"[,;|]B0[A-Z0-9]{8}\Z", re.IGNORECASE)
_SHORT_LINK = re.compile(r"(?:https?://)?(?:amzn\.to|amzn\.eu|amzn\.asia|a\.co)/", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: What may stand before a product URL pasted from prose, Markdown or a chat.
_OPENERS = "<([{\"'`\u201c\u2018"


@dataclass(frozen=True, slots=True)
class AsinCheck:
    """The verdict on one raw id: ``asin`` is set when valid, else ``reason`` says why.

    ``store`` is the Amazon domain of a product URL (``amazon.co.uk``), else None: the
    marketplace the id belongs to when nothing more explicit names one.
    """

    raw: str
    asin: str | None
    reason: str | None = None
    store: str | None = None

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
    if not _ISBN13.fullmatch(digits) or not digits.startswith("978"):
        return None
    if not _isbn13_check_ok(digits):
        return None
    core = digits[3:12]
    check = (11 - sum((10 - i) * int(c) for i, c in enumerate(core)) % 11) % 11
    return core + ("X" if check == 10 else str(check))


def _isbn13_check_ok(digits: str) -> bool:
    check13 = sum((1 if i % 2 == 0 else 3) * int(c) for i, c in enumerate(digits[:12]))
    return (10 - check13 % 10) % 10 == int(digits[12])


def _isbn13_reason(text: str, *, convert_isbn13: bool) -> str | None:
    """Say why an ISBN-13-shaped id is not usable, or None if it is not ISBN-13-shaped."""
    if not _ISBN13_SHAPED.fullmatch(text):
        return None
    digits = text.replace("-", "")
    if not _ISBN13.fullmatch(digits):
        return None
    if not _isbn13_check_ok(digits):
        return "an ISBN-13 with a wrong check digit"
    if digits.startswith("979"):
        return "a 979 ISBN-13 has no ISBN-10 form, so no ASIN; look the book up by its ASIN"
    if not convert_isbn13:
        return (
            "an ISBN-13, not an ASIN; look up its ISBN-10 instead (broker.asin.isbn13_to_isbn10 "
            "in code, broker run --convert-isbn13 for a job)"
        )
    return None


def plain_asin(raw: str) -> str | None:
    """``raw`` if it is already a normalised ASIN with no ISBN-10 shape, else None (a plain
    ``str`` even when ``raw`` is a subclass, numpy's ``str_`` from a DataFrame column say: a
    result's ``asin`` is plain text).

    The engine's hot path asks this first, for every id: most ids are such ASINs, and it
    answers them with four string tests and no object. None only means "ask
    :func:`check_asin`", which judges every other id (and gives the same ASIN for these).
    """
    if len(raw) == 10 and raw.isascii() and raw.isalnum() and raw.isupper():
        # Nine leading digits are an ISBN-10's shape: its check digit must be checked.
        # str.__str__: the text itself, whatever a subclass makes of str().
        return None if raw[:9].isdigit() else str.__str__(raw)
    return None


def check_asin(raw: str, *, convert_isbn13: bool = False) -> AsinCheck:
    """Validate one raw id (an ASIN, ISBN-10 or Amazon product URL).

    Whitespace around the id is stripped and letters upper-cased.

    Args:
        raw: the id as written in the input.
        convert_isbn13: convert a 978-prefixed ISBN-13 (hyphens allowed) to its ISBN-10.

    Returns:
        An :class:`AsinCheck` whose ``asin`` is the normalised ASIN, or whose ``reason``
        is a short sentence a user can act on.
    """
    text = raw.strip()
    # The common case, a bare ASIN, costs three string tests and no regex: isalnum() on an
    # ASCII string accepts exactly A-Z, a-z and 0-9.
    if len(text) == 10 and text.isascii() and text.isalnum():
        return _verdict(raw, text if text.isupper() else text.upper())
    if not text:
        return AsinCheck(raw, None, "empty id")
    if "amzn.com" in text.lower():
        # python-amazon-paapi's get_asin reads these links too.
        text = _AMZN_COM.sub(_AMAZON_COM_DP, text)
    # A link quoted or bracketed in prose, Markdown or a chat ('...', "...", <...>, (...)).
    url = _URL.match(text) or _URL.match(text.lstrip(_OPENERS))
    if url:
        if not _url_ends_there(url.string[url.end() :], url.group(2), text.startswith("<")):
            return AsinCheck(
                raw,
                None,
                "holds more than a product URL (another id or URL, or words, after it); "
                "give one id or URL per line or cell",
            )
        verdict = _verdict(raw, url.group(2).upper())
        return replace(verdict, store=url.group(1).lower()) if verdict.valid else verdict
    inner = _unwrapped(text)
    if inner is not None:
        return replace(check_asin(inner, convert_isbn13=convert_isbn13), raw=raw)
    if _SHORT_LINK.match(text):
        return AsinCheck(
            raw, None, "a short link has no ASIN in it; open it and use the full product URL"
        )
    if _LOOKS_LIKE_URL.match(text):
        return AsinCheck(raw, None, "not an Amazon product URL with an ASIN in it")
    if not text.isascii():
        char = next(c for c in text if not c.isascii())
        return AsinCheck(
            raw,
            None,
            f"contains the non-ASCII character {char!r} (U+{ord(char):04X}); "
            "an ASIN has only ASCII letters A-Z and digits 0-9",
        )
    # Two or more id-sized parts: a list in one cell, not one id (nor a number "3,42E+09");
    # before the blanks, which a pasted list has after its commas.
    if sum(len(part.strip()) >= 10 for part in re.split(r"[,;|]", text)) > 1:
        return AsinCheck(raw, None, "holds several ids in one; give one id or URL per line or cell")
    if any(c.isspace() for c in text):
        return AsinCheck(raw, None, "contains whitespace; give one id per line or cell")
    control = _CONTROL.search(text)
    if control:
        return AsinCheck(raw, None, f"contains the control character U+{ord(control.group()):04X}")
    isbn13 = _isbn13_reason(text, convert_isbn13=convert_isbn13)
    if isbn13 is not None:
        return AsinCheck(raw, None, isbn13)
    if convert_isbn13:
        converted = isbn13_to_isbn10(text)
        if converted is not None:
            return AsinCheck(raw, converted)
    if _ISBN10_HYPHENATED.fullmatch(text):
        return _verdict(raw, text.replace("-", "").upper())
    if len(text) != 10:
        return AsinCheck(
            raw, None, f"an ASIN has 10 characters, this has {len(text)}{_as_a_number(text)}"
        )
    bad = next(c for c in text if not c.isalnum())
    return AsinCheck(raw, None, f"contains {bad!r}; an ASIN has only letters A-Z and digits 0-9")


def _url_ends_there(tail: str, asin: str, angled: bool) -> bool:
    """True when ``tail``, what follows a product URL's ASIN, is the rest of that one URL,
    punctuation closing it, or the same link again (Markdown's ``[url](url)``, Slack's
    ``<url|url>`` or ``<url|label>``, when ``angled``), not a second id: another URL or ASIN
    listed after it, or words after a blank. The query and fragment may hold anything but
    blanks (``?keywords=usb,headphones``, a redirect's unencoded URL)."""
    if not tail or tail.strip(_CLOSERS) == "":
        return True
    if angled and tail.startswith("|") and tail.endswith(">"):
        return True  # Slack's <url|label>: the label is text, not an id
    if any(c.isspace() for c in tail):
        return False
    if tail[0] in _URL_GOES_ON:
        path, *query = re.split(r"[?#]", tail, maxsplit=1)
        if _URL.search(path) is not None or "://" in path or _LISTED_ID.search(path):
            return False
        # The query and fragment are free text, but a product URL (or a short link) listed
        # after a comma, semicolon or bar, or an ASIN ending them so, is a second id
        # (browsers' links carry "?th=1&psc=1"; the second id was dropped without a word).
        return not query or not (
            any(
                _URL.match(query[0], found.end()) or _SHORT_LINK.match(query[0], found.end())
                for found in _LISTED.finditer(query[0])
            )
            or _LISTED_LAST_ASIN.search(query[0].rstrip(_CLOSERS))
        )
    # Anything else after the ASIN ("](", "|", ","): only the same link again may follow.
    return [found.group(2).upper() for found in _URL.finditer(tail)] == [asin.upper()]


#: An id a spreadsheet or pandas read as a number: written as a decimal ("3423214066.0"),
#: or in Excel's scientific notation ("9.78342E+12"), whose digits are gone.
_DECIMAL: Final = re.compile(r"\d+\.0+")
_SCIENTIFIC: Final = re.compile(r"\d(?:[.,]\d+)?E\+\d+", re.IGNORECASE)


def _as_a_number(text: str) -> str:
    """Why an id of the wrong length may have been read as a number, or ""."""
    if len(text) == 9 and text.isdigit():
        return (
            " (nine digits: an ISBN-10 whose leading 0 a spreadsheet dropped? keep the "
            "column as text)"
        )
    if _DECIMAL.fullmatch(text):
        return (
            " (a number written as a decimal: the column was read as numbers, by a "
            "spreadsheet or pandas; keep it as text, and its leading zeros with it)"
        )
    if _SCIENTIFIC.fullmatch(text):
        return (
            " (Excel's scientific notation: the id's digits are lost; format the column as "
            "text and export it again)"
        )
    return ""


#: Marks that may wrap a whole id: quotes and brackets of prose, Markdown or a chat.
_WRAPS: Final = {
    '"': '"', "'": "'", "`": "`", "(": ")", "[": "]", "<": ">", "\u201c": "\u201d",
    "\u2018": "\u2019",
}  # fmt: skip


def _unwrapped(text: str) -> str | None:
    """The id inside what wraps it (``"B0..."``, ``(B0...)``, Excel's ``="..."`` formula and
    its leading apostrophe, both written to keep an ISBN's leading zero), or None."""
    if text.startswith('="') and text.endswith('"') and len(text) > 3:
        return text[2:-1].strip()
    if len(text) > 2 and _WRAPS.get(text[0]) == text[-1]:
        return text[1:-1].strip()
    if text.startswith("'") and len(text) > 1:
        return text[1:].strip()
    return None


def _verdict(raw: str, value: str) -> AsinCheck:
    """Judge a 10-character upper-case ASCII alphanumeric id."""
    if not value[0].isdigit() or not value[:9].isdigit():
        return AsinCheck(raw, value)
    if is_isbn10(value):
        return AsinCheck(raw, value)
    if value[9].isdigit():
        return AsinCheck(raw, None, "all-digit id with a wrong ISBN-10 check digit")
    if value[9] == "X":
        return AsinCheck(raw, None, "an ISBN-10 ending in X with a wrong check digit")
    return AsinCheck(raw, None, f"nine digits then {value[9]!r}: an ISBN-10 ends in a digit or X")


def refuse_single_string(asins: object) -> None:
    """Refuse one string given for a collection of ids: it would be iterated character by
    character, ten one-letter "ASINs", all invalid.

    Raises:
        TypeError: ``asins`` is a ``str`` or ``bytes``; for a comma-separated list (what
            python-amazon-paapi's ``get_items("A,B")`` takes) the message says to split it.
    """
    if not isinstance(asins, str | bytes):
        return
    if isinstance(asins, str) and "," in asins:
        raise TypeError(
            "expected an iterable of ASINs, got one string of comma-separated ids; "
            'split it: get_items(text.split(","))'
        )
    raise TypeError("expected an iterable of ASINs, got a single string (use get_item)")


def normalize_asin(raw: str) -> str:
    """Return the normalised ASIN for ``raw``, or raise ValueError with the reason."""
    verdict = check_asin(raw)
    if verdict.asin is None:
        raise ValueError(f"invalid ASIN {raw!r}: {verdict.reason}")
    return verdict.asin
