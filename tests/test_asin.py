"""Tests for broker.asin: what counts as an ASIN, and what a user is told when it does not."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.asin import (
    AsinCheck,
    check_asin,
    is_isbn10,
    isbn13_to_isbn10,
    normalize_asin,
    plain_asin,
    refuse_single_string,
)


class TestBareIds:
    @pytest.mark.parametrize(
        ("raw", "asin"),
        [
            ("B0ABCDEFGH", "B0ABCDEFGH"),
            ("b0abcdefgh", "B0ABCDEFGH"),
            ("B0aBcDeFgH", "B0ABCDEFGH"),
            ("  B0ABCDEFGH\t", "B0ABCDEFGH"),
            ("B000000001", "B000000001"),
            ("A1B2C3D4E5", "A1B2C3D4E5"),
        ],
    )
    def test_valid_ids_are_normalised(self, raw: str, asin: str) -> None:
        """Surrounding whitespace is stripped and letters upper-cased."""
        verdict = check_asin(raw)
        assert verdict == AsinCheck(raw, asin, None)
        assert verdict.valid

    @pytest.mark.parametrize(
        ("raw", "reason_part"),
        [
            ("", "empty id"),
            ("   ", "empty id"),
            ("B0ABCDEFG", "this has 9"),
            ("B0ABCDEFGHI", "this has 11"),
            ("B0ABC-DEFG", "'-'"),
            ("B0ABC_DEF!", "'_'"),
            ("B0ABC DEFG", "whitespace"),
            ("B0ABC\tDEFG", "whitespace"),
            ("B0ABCDEF\x00H", "control character U+0000"),
            ("B0ABCDEF\x7fH", "control character U+007F"),
        ],
    )
    def test_malformed_ids_say_why(self, raw: str, reason_part: str) -> None:
        """Wrong lengths, symbols, inner spaces and control bytes are invalid with a reason."""
        verdict = check_asin(raw)
        assert verdict.asin is None
        assert not verdict.valid
        assert verdict.reason is not None
        assert reason_part in verdict.reason

    @pytest.mark.parametrize(
        ("raw", "asin"),
        [
            ('"B0ABCDEFGH"', "B0ABCDEFGH"),
            ("'b0abcdefgh'", "B0ABCDEFGH"),
            ("(B0ABCDEFGH)", "B0ABCDEFGH"),
            ("<B0ABCDEFGH>", "B0ABCDEFGH"),
            ("[B0ABCDEFGH]", "B0ABCDEFGH"),
            ("\u201cB0ABCDEFGH\u201d", "B0ABCDEFGH"),
            ('="0316769487"', "0316769487"),
            ("'0316769487", "0316769487"),
        ],
    )
    def test_an_id_quoted_or_bracketed_is_read(self, raw: str, asin: str) -> None:
        """An id in quotes or brackets (as a product URL already was), Excel's ="..."
        formula or its leading apostrophe (both keep an ISBN's leading zero) is read; it was
        invalid, and "an ASIN has 10 characters, this has 12" counted the quotes."""
        verdict = check_asin(raw)
        assert verdict == AsinCheck(raw, asin, None)

    def test_nine_digits_ask_whether_a_leading_zero_was_lost(self) -> None:
        """Nine digits are likely an ISBN-10 whose leading 0 a spreadsheet dropped."""
        reason = check_asin("316769487").reason
        assert reason is not None
        assert "leading 0" in reason

    @pytest.mark.parametrize(
        ("raw", "said"),
        [
            ("3423214066.0", "a number written as a decimal"),
            ("316769487.00", "a number written as a decimal"),
            ("9.78342E+12", "Excel's scientific notation: the id's digits are lost"),
            ("3,42321E+09", "Excel's scientific notation"),
        ],
    )
    def test_an_id_read_as_a_number_says_so(self, raw: str, said: str) -> None:
        """An id a spreadsheet or pandas read as a number (a decimal, or Excel's scientific
        notation) says so and what to do; it was told only its length."""
        reason = check_asin(raw).reason
        assert reason is not None
        assert said in reason

    @pytest.mark.parametrize(
        ("raw", "codepoint"),
        [
            ("B0ABCDEFG１", "U+FF11"),  # full-width digit one
            ("ＢＯＡＢＣＤＥＦＧＨ", "U+FF22"),  # full-width letters
            ("В0ABCDEFGH", "U+0412"),  # Cyrillic capital Ve, looks like B
            ("B0ABC\u200bDEFGH", "U+200B"),  # zero-width space inside
            ("B0ABCDEFGÉ", "U+00C9"),
            ("٠١٢٣٤٥٦٧٨٩", "U+0660"),  # Arabic-Indic digits: isdigit() but not ASCII
        ],
    )
    def test_non_ascii_is_rejected_not_folded(self, raw: str, codepoint: str) -> None:
        """Look-alike and full-width characters are rejected, naming the first one."""
        verdict = check_asin(raw)
        assert verdict.asin is None
        assert verdict.reason is not None
        assert "non-ASCII" in verdict.reason
        assert codepoint in verdict.reason


class TestIsbn10:
    @pytest.mark.parametrize("raw", ["0306406152", "080442957X", "080442957x", "1861972717"])
    def test_valid_isbn10_including_x(self, raw: str) -> None:
        """An ISBN-10 with a right check digit is an ASIN, a final x upper-cased."""
        assert check_asin(raw).asin == raw.upper()
        assert is_isbn10(raw.upper())

    @pytest.mark.parametrize("raw", ["0306406153", "0000000001", "1861972718"])
    def test_all_digit_bad_checksum_is_invalid(self, raw: str) -> None:
        """An all-digit id whose ISBN-10 check digit is wrong is invalid."""
        verdict = check_asin(raw)
        assert verdict.asin is None
        assert verdict.reason == "all-digit id with a wrong ISBN-10 check digit"
        assert not is_isbn10(raw)

    def test_x_with_bad_checksum_is_invalid(self) -> None:
        """Nine digits and X with a wrong check digit is an ISBN-10 typo, not an ASIN."""
        verdict = check_asin("030640615X")
        assert verdict.asin is None
        assert verdict.reason is not None
        assert "ending in X" in verdict.reason

    def test_nine_digits_then_another_letter_is_invalid(self) -> None:
        """Nine digits then a letter other than X is taken for a mistyped ISBN-10."""
        verdict = check_asin("123456789A")
        assert verdict.asin is None
        assert verdict.reason is not None
        assert "digit or X" in verdict.reason

    @pytest.mark.parametrize(
        ("raw", "asin"),
        [
            ("0-306-40615-2", "0306406152"),
            ("0-8044-2957-x", "080442957X"),
            ("3-16-148410-X", "316148410X"),
        ],
    )
    def test_hyphenated_isbn10_is_its_asin(self, raw: str, asin: str) -> None:
        """An ISBN-10 as printed, with hyphens, is the ASIN of its digits."""
        assert check_asin(raw) == AsinCheck(raw, asin, None)

    @pytest.mark.parametrize("raw", ["0-306-40615-3", "-0306406152", "0--306406152", "03064-0615-"])
    def test_hyphenated_isbn10_must_be_right(self, raw: str) -> None:
        """A wrong check digit, or hyphens that do not separate digits, stay invalid."""
        assert check_asin(raw).asin is None

    def test_is_isbn10_wants_upper_case(self) -> None:
        """is_isbn10 is the low-level test: it takes the value already upper-cased."""
        assert not is_isbn10("080442957x")
        assert not is_isbn10("08044295")


class TestIsbn13:
    @pytest.mark.parametrize(
        ("isbn13", "isbn10"),
        [
            ("9780306406157", "0306406152"),
            ("978-0-306-40615-7", "0306406152"),
            ("9780804429573", "080442957X"),
            ("9781861972712", "1861972717"),
        ],
    )
    def test_978_converted_only_when_enabled(self, isbn13: str, isbn10: str) -> None:
        """A 978 ISBN-13 becomes its ISBN-10 with convert_isbn13, and is invalid without."""
        assert isbn13_to_isbn10(isbn13) == isbn10
        assert check_asin(isbn13, convert_isbn13=True) == AsinCheck(isbn13, isbn10, None)
        off = check_asin(isbn13)
        assert off.asin is None
        assert off.reason is not None
        # Both ways in named: the library's converter and the command line's option.
        assert "isbn13_to_isbn10" in off.reason
        assert "--convert-isbn13" in off.reason

    @pytest.mark.parametrize("convert", [True, False])
    def test_979_has_no_isbn10(self, convert: bool) -> None:
        """A 979 ISBN-13 has no ISBN-10 form, so it is invalid either way."""
        verdict = check_asin("9791034304011", convert_isbn13=convert)
        assert verdict.asin is None
        assert verdict.reason is not None
        assert "979" in verdict.reason
        assert isbn13_to_isbn10("9791034304011") is None

    def test_bad_isbn13_check_digit(self) -> None:
        """An ISBN-13 with a wrong check digit is not converted."""
        verdict = check_asin("9780306406158", convert_isbn13=True)
        assert verdict.asin is None
        assert verdict.reason == "an ISBN-13 with a wrong check digit"
        assert isbn13_to_isbn10("9780306406158") is None


class TestUrls:
    @pytest.mark.parametrize(
        "url",
        [
            "https://www.amazon.com/dp/B0ABCDEFGH",
            "https://www.amazon.com/dp/B0ABCDEFGH/",
            "https://www.amazon.com/dp/B0ABCDEFGH?th=1&psc=1",
            "https://www.amazon.com/dp/B0ABCDEFGH#customerReviews",
            "https://www.amazon.com/Some-Product-Title/dp/B0ABCDEFGH/ref=sr_1_1?keywords=x&qid=1",
            "https://www.amazon.com/gp/product/B0ABCDEFGH",
            "https://www.amazon.com/gp/product/B0ABCDEFGH/ref=ox_sc_act_title_1?smid=X",
            "https://www.amazon.com/gp/aw/d/B0ABCDEFGH",
            "https://www.amazon.com/gp/aw/d/B0ABCDEFGH/?tag=x-20",
            "https://www.amazon.com/dp/product/B0ABCDEFGH",
            "https://www.amazon.com/exec/obidos/ASIN/B0ABCDEFGH/tag-20",
            "https://www.amazon.com/o/ASIN/B0ABCDEFGH",
            "https://www.amazon.com/gp/offer-listing/B0ABCDEFGH",
            "https://www.amazon.com/product-reviews/B0ABCDEFGH",
            "https://www.amazon.co.uk/dp/B0ABCDEFGH",
            "https://www.amazon.co.uk/Title/dp/B0ABCDEFGH?ref_=ast_sto_dp",
            "https://www.amazon.de/K\u00fcchen-Waage-Digital/dp/B0ABCDEFGH",
            "https://www.amazon.com.au/dp/B0ABCDEFGH",
            "https://www.amazon.co.jp/gp/product/B0ABCDEFGH",
            "https://smile.amazon.com/dp/B0ABCDEFGH",
            "https://m.amazon.in/dp/B0ABCDEFGH",
            "http://amazon.com/dp/B0ABCDEFGH",
            "HTTPS://WWW.AMAZON.COM/DP/B0ABCDEFGH",
            "https://www.amazon.com:443/dp/B0ABCDEFGH",
            "https://www.amazon.com/dp/b0abcdefgh",
            "www.amazon.com/dp/B0ABCDEFGH",
            "amazon.co.uk/gp/product/B0ABCDEFGH",
            "  https://www.amazon.com/dp/B0ABCDEFGH  ",
            # Shared links mangled on the way (a chat app's "&" for "?", an encoded "?" or
            # "/"), which python-amazon-paapi accepts.
            "https://www.amazon.com/dp/B0ABCDEFGH&tag=x-20",
            "https://www.amazon.com/dp/B0ABCDEFGH%3Fref=abc",
            "https://www.amazon.com/dp/B0ABCDEFGH%2Fref=abc",
            "https://www.amazon.com/dp/B0ABCDEFGH;jsessionid=1",
            # Pasted from prose, Markdown or a chat, as python-amazon-paapi's get_asin reads
            # them: they were invalid, one "an ASIN has 10 characters, this has 38".
            "https://www.amazon.com/dp/B0ABCDEFGH.",
            "https://www.amazon.com/dp/B0ABCDEFGH,",
            "https://www.amazon.com/dp/B0ABCDEFGH)",
            "'https://www.amazon.com/dp/B0ABCDEFGH'",
            '"https://www.amazon.com/dp/B0ABCDEFGH"',
            "<https://www.amazon.com/dp/B0ABCDEFGH>",
            "(https://www.amazon.com/dp/B0ABCDEFGH)",
            "\u201chttps://www.amazon.com/dp/B0ABCDEFGH\u201d",
            # Query strings and links written twice, accepted before the check on what
            # follows a URL (a second id) and kept so.
            "https://www.amazon.com/dp/B0ABCDEFGH/ref=sr_1_1?keywords=kindle,paperwhite&sr=8-1",
            "https://www.amazon.com/dp/B0ABCDEFGH?keywords=usb,headphones",
            "https://www.amazon.com/dp/B0ABCDEFGH?pf_rd_p=abc,1234567890",
            "https://www.amazon.com/dp/B0ABCDEFGH?tag=x-21&ascsubtag=abc|1234567890",
            "https://www.amazon.com/dp/B0ABCDEFGH?ref=https://www.amazon.com/dp/B0ZZZZZZZZ",
            "[https://www.amazon.com/dp/B0ABCDEFGH](https://www.amazon.com/dp/B0ABCDEFGH)",
            "<https://www.amazon.com/dp/B0ABCDEFGH|https://www.amazon.com/dp/B0ABCDEFGH>",
            "<https://www.amazon.com/dp/B0ABCDEFGH|Amazon link>",
        ],
    )
    def test_product_urls_yield_their_asin(self, url: str) -> None:
        """Every Amazon product-URL form, on any Amazon domain, gives its ASIN and store."""
        verdict = check_asin(url)
        assert (verdict.asin, verdict.reason) == ("B0ABCDEFGH", None)
        assert verdict.store is not None
        assert verdict.store in url.lower()

    @pytest.mark.parametrize(
        ("url", "store"),
        [
            ("https://www.amazon.co.uk/dp/B0ABCDEFGH", "amazon.co.uk"),
            ("https://smile.amazon.com/dp/B0ABCDEFGH", "amazon.com"),
            ("https://m.amazon.in/dp/B0ABCDEFGH", "amazon.in"),
            ("HTTPS://WWW.AMAZON.COM.AU:443/dp/B0ABCDEFGH", "amazon.com.au"),
            ("amazon.de/gp/product/B0ABCDEFGH", "amazon.de"),
            # amzn.com: amazon.com's own short domain (python-amazon-paapi's get_asin reads
            # it); it was "not an Amazon product URL".
            ("https://amzn.com/dp/B0ABCDEFGH", "amazon.com"),
            ("http://www.amzn.com/B0ABCDEFGH", "amazon.com"),
            ("amzn.com/B0ABCDEFGH/ref=x?tag=y-20", "amazon.com"),
            ("<https://amzn.com/dp/B0ABCDEFGH>", "amazon.com"),
            # Pasted from a chat or Markdown, as amazon.com links are: they were refused.
            ("<https://amzn.com/B0ABCDEFGH|label here>", "amazon.com"),
            ("<https://amzn.com/B0ABCDEFGH|https://amzn.com/B0ABCDEFGH>", "amazon.com"),
            ("[amzn.com/B0ABCDEFGH](https://amzn.com/B0ABCDEFGH)", "amazon.com"),
        ],
    )
    def test_product_url_names_its_store(self, url: str, store: str) -> None:
        """The URL's Amazon domain is its store (the marketplace it belongs to)."""
        assert check_asin(url) == AsinCheck(url, "B0ABCDEFGH", None, store)
        assert check_asin("B0ABCDEFGH").store is None

    def test_url_with_isbn_is_checked_as_isbn(self) -> None:
        """A book URL carries an ISBN-10, whose check digit still counts."""
        assert check_asin("https://www.amazon.com/dp/0306406152").asin == "0306406152"
        assert check_asin("https://www.amazon.com/dp/0306406153").asin is None

    @pytest.mark.parametrize(
        "url",
        [
            "https://www.amazon.com.evil.net/dp/B0ABCDEFGH",
            "https://www.amazon.com@evil.net/dp/B0ABCDEFGH",
            "https://evilamazon.com/dp/B0ABCDEFGH",
            "https://www.example.com/dp/B0ABCDEFGH",
            "https://www.amazon.com/s?k=B0ABCDEFGH",
            "https://www.amazon.com/dp/B0ABCDEFGHI",
            "https://www.amazon.com/dp/B0ABCDEFG",
            "https://www.amazon.com/",
            "ftp://www.amazon.com/dp/B0ABCDEFGH",
            "https://amzn.com/",
            "https://amzn.com/B0ABCDEFGHI",
            "https://amzn.com.evil.net/B0ABCDEFGH",
        ],
    )
    def test_other_urls_are_invalid(self, url: str) -> None:
        """URLs off Amazon, or without a 10-character id after a product marker, are invalid."""
        verdict = check_asin(url)
        assert verdict.asin is None
        assert verdict.reason == "not an Amazon product URL with an ASIN in it"

    @pytest.mark.parametrize(
        "text",
        [
            "https://www.amazon.co.uk/dp/B0ABCDEFGH,https://www.amazon.de/dp/B0ZZZZZZZZ",
            "https://www.amazon.com/dp/B0ABCDEFGH https://www.amazon.com/dp/B0ZZZZZZZZ",
            "https://www.amazon.com/dp/B0ABCDEFGH great",
            "https://www.amazon.com/dp/B0ABCDEFGH,B0ZZZZZZZZ",
            "https://www.amazon.com/dp/B0ABCDEFGH;B0ZZZZZZZZ",
            "https://www.amazon.com/dp/B0ABCDEFGH/,www.amazon.de/dp/B0ZZZZZZZZ",
            "amazon.co.uk/dp/B0ABCDEFGH,amazon.de/dp/B0ZZZZZZZZ",
            # After a query string or a fragment (a browser's link carries one): the
            # second id was dropped without a word.
            "https://www.amazon.com/dp/B0ABCDEFGH?th=1&psc=1,https://www.amazon.com/dp/B0ZZZZZZZZ",
            "https://www.amazon.com/dp/B0ABCDEFGH?th=1;amazon.de/dp/B0ZZZZZZZZ?th=1",
            "https://www.amazon.com/dp/B0ABCDEFGH#x|https://www.amazon.com/dp/B0ZZZZZZZZ",
            "https://www.amazon.com/K/dp/B0ABCDEFGH/ref=sr_1_1?keywords=kettle;B0ZZZZZZZZ",
            "https://www.amazon.com/dp/B0ABCDEFGH?th=1,b0zzzzzzzz.",
            "https://www.amazon.com/dp/B0ABCDEFGH?th=1,https://amzn.to/3xYzAbC",
            # amzn.com links are product URLs too: the second id was dropped.
            "https://www.amazon.com/dp/B0ABCDEFGH?th=1,amzn.com/B0ZZZZZZZZ",
            "https://www.amazon.com/dp/B0ABCDEFGH/,amzn.com/B0ZZZZZZZZ",
            "amzn.com/B0ABCDEFGH?th=1,amzn.com/B0ZZZZZZZZ",
        ],
    )
    def test_a_url_followed_by_more_ids_is_invalid(self, text: str) -> None:
        """A cell holding a product URL and more (a second URL or ASIN, prose) is invalid:
        one of its ids was dropped, or the second URL's ASIN taken with the first's store."""
        verdict = check_asin(text)
        assert verdict.asin is None
        assert verdict.reason is not None
        assert "one id or URL per line or cell" in verdict.reason

    @pytest.mark.parametrize(
        "text",
        [
            "B0ABCDEFGH,B0ZZZZZZZZ",
            "B0ABCDEFGH;B0ZZZZZZZZ;",
            "B0ABCDEFGH, B0ZZZZZZZZ",
            "a , b0zzzzzzzz, B0ABCDEFGH",
        ],
    )
    def test_ids_listed_in_one_cell_are_named_so(self, text: str) -> None:
        """Two ids in one cell (a comma-separated string, blanks after the commas as pasted
        lists have) say so, not "this has 21" or "contains whitespace"."""
        reason = check_asin(text).reason
        assert reason is not None
        assert "several ids" in reason
        assert "one id or URL per line or cell" in reason

    @pytest.mark.parametrize("url", ["https://amzn.to/3AbCdEf", "a.co/d/abc1234", "amzn.eu/d/x"])
    def test_short_links_explain_themselves(self, url: str) -> None:
        """Short links carry no ASIN; the reason says to use the full URL."""
        verdict = check_asin(url)
        assert verdict.asin is None
        assert verdict.reason is not None
        assert "short link" in verdict.reason


@pytest.mark.parametrize("given", ["B000000001,B000000002", "B000000001, B000000002"])
def test_a_comma_separated_string_for_many_ids_says_to_split_it(given: str) -> None:
    """One string of comma-separated ids where a list is wanted (python-amazon-paapi's
    ``get_items("A,B")``) is a TypeError saying to split it, not to use get_item."""
    with pytest.raises(TypeError) as info:
        refuse_single_string(given)
    assert str(info.value) == (
        "expected an iterable of ASINs, got one string of comma-separated ids; "
        'split it: get_items(text.split(","))'
    )


class TestNormalize:
    def test_normalize_returns_asin(self) -> None:
        """normalize_asin returns the normalised ASIN of a valid id."""
        assert normalize_asin(" b0abcdefgh ") == "B0ABCDEFGH"

    def test_normalize_raises_with_reason(self) -> None:
        """normalize_asin raises ValueError carrying the reason."""
        with pytest.raises(ValueError, match="this has 3"):
            normalize_asin("abc")


@given(st.text(max_size=80))
def test_check_asin_never_raises_and_valid_means_ten_ascii(raw: str) -> None:
    """Any text gets a verdict; a valid one is 10 ASCII upper-case letters or digits."""
    verdict = check_asin(raw)
    assert verdict.raw == raw
    assert (verdict.asin is None) != (verdict.reason is None)
    if verdict.asin is not None:
        assert len(verdict.asin) == 10
        assert verdict.asin.isascii()
        assert verdict.asin.isalnum()
        assert verdict.asin == verdict.asin.upper()
        assert check_asin(verdict.asin).asin == verdict.asin


@given(st.text(alphabet="0123456789", min_size=9, max_size=9), st.sampled_from("0123456789X"))
def test_digit_ids_are_valid_exactly_when_isbn10(digits: str, last: str) -> None:
    """An id of nine digits and a digit or X is valid exactly when it is an ISBN-10."""
    raw = digits + last
    assert check_asin(raw).valid == is_isbn10(raw)


@given(
    st.one_of(
        st.text(max_size=12),
        st.text(alphabet="0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcxyz ", min_size=10, max_size=10),
        st.text(alphabet="0123456789X", min_size=10, max_size=10),
    )
)
def test_plain_asin_agrees_with_check_asin(raw: str) -> None:
    """plain_asin answers only ids check_asin finds valid as they stand, with that ASIN."""
    fast = plain_asin(raw)
    if fast is not None:
        assert fast == raw == check_asin(raw).asin


@pytest.mark.parametrize(
    ("raw", "fast"),
    [
        ("B0ABCDEFGH", "B0ABCDEFGH"),
        ("B012345678", "B012345678"),
        ("b0abcdefgh", None),
        (" B0ABCDEFGH", None),
        ("0306406152", None),
        ("030640615X", None),
        ("0123456789", None),
        ("B0ABCDEFGÉ", None),
    ],
)
def test_plain_asin_leaves_the_rest_to_check_asin(raw: str, fast: str | None) -> None:
    """Lower case, spaces, ISBN-10 shapes and non-ASCII ids go to check_asin."""
    assert plain_asin(raw) == fast


def test_a_str_subclass_gives_a_plain_str_asin() -> None:
    """An id of a str subclass (numpy's str_, from a DataFrame column) gives a plain str:
    plain_asin handed the input object itself back, so results carried numpy strings."""

    class Column(str):
        __slots__ = ()

        def __str__(self) -> str:
            return "not what was validated"

    for raw in (Column("B000000001"), Column(" b000000001 "), Column("0306406152")):
        verdict = check_asin(raw)
        assert type(verdict.asin) is str, raw
    fast = plain_asin(Column("B000000001"))
    assert type(fast) is str
    assert fast == "B000000001"
