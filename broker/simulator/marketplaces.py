"""The marketplaces the simulator serves: PA-API host, SigV4 region, locale and currency of each.

The table follows protocol.md sections 2.1 and 3.1. Where the sources disagree (the SigV4 region
of Egypt and Ireland) we pick ``eu-west-1``, as most clients do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "MARKETPLACES",
    "MARKETPLACES_BY_HOST",
    "Currency",
    "Marketplace",
    "format_amount",
    "served_as",
]


@dataclass(frozen=True, slots=True)
class Currency:
    """How one currency is written in a ``displayAmount``."""

    code: str
    prefix: str
    suffix: str
    decimals: int
    decimal_sep: str
    thousands_sep: str


@dataclass(frozen=True, slots=True)
class Marketplace:
    """One Amazon store as both APIs name it."""

    #: the ``x-marketplace`` / ``Marketplace`` value, e.g. ``www.amazon.com``
    name: str
    #: the PA-API 5.0 host, e.g. ``webservices.amazon.com``
    paapi_host: str
    #: the SigV4 region of that host
    region: str
    #: the Creators API region family (NA, EU or FE)
    creators_region: str
    #: the default language, e.g. ``en_US``
    locale: str
    currency: Currency


def _cur(
    code: str,
    prefix: str = "",
    suffix: str = "",
    *,
    decimals: int = 2,
    dec: str = ".",
    thou: str = ",",
) -> Currency:
    return Currency(code, prefix, suffix, decimals, dec, thou)


_USD = _cur("USD", "$")
_EUR_SUFFIX = _cur("EUR", suffix=" €", dec=",", thou=".")

_TABLE: tuple[tuple[str, str, str, str, Currency], ...] = (
    # name, region, creators region, locale, currency; the PA-API host is derived from the name
    ("www.amazon.com", "us-east-1", "NA", "en_US", _USD),
    ("www.amazon.ca", "us-east-1", "NA", "en_CA", _cur("CAD", "$")),
    ("www.amazon.com.mx", "us-east-1", "NA", "es_MX", _cur("MXN", "$")),
    ("www.amazon.com.br", "us-east-1", "NA", "pt_BR", _cur("BRL", "R$ ", dec=",", thou=".")),
    ("www.amazon.co.uk", "eu-west-1", "EU", "en_GB", _cur("GBP", "£")),
    ("www.amazon.de", "eu-west-1", "EU", "de_DE", _EUR_SUFFIX),
    ("www.amazon.fr", "eu-west-1", "EU", "fr_FR", _cur("EUR", suffix=" €", dec=",", thou=" ")),
    ("www.amazon.it", "eu-west-1", "EU", "it_IT", _EUR_SUFFIX),
    ("www.amazon.es", "eu-west-1", "EU", "es_ES", _EUR_SUFFIX),
    ("www.amazon.nl", "eu-west-1", "EU", "nl_NL", _cur("EUR", "€ ", dec=",", thou=".")),
    ("www.amazon.pl", "eu-west-1", "EU", "pl_PL", _cur("PLN", suffix=" zł", dec=",", thou=" ")),
    ("www.amazon.se", "eu-west-1", "EU", "sv_SE", _cur("SEK", suffix=" kr", dec=",", thou=" ")),
    ("www.amazon.com.be", "eu-west-1", "EU", "fr_BE", _cur("EUR", suffix=" €", dec=",", thou=".")),
    ("www.amazon.com.tr", "eu-west-1", "EU", "tr_TR", _cur("TRY", suffix=" TL", dec=",", thou=".")),
    ("www.amazon.ae", "eu-west-1", "EU", "en_AE", _cur("AED", "AED ")),
    ("www.amazon.sa", "eu-west-1", "EU", "en_AE", _cur("SAR", "SAR ")),
    ("www.amazon.in", "eu-west-1", "EU", "en_IN", _cur("INR", "₹")),
    ("www.amazon.eg", "eu-west-1", "EU", "en_AE", _cur("EGP", "EGP ")),
    ("www.amazon.ie", "eu-west-1", "EU", "en_IE", _cur("EUR", "€")),
    ("www.amazon.co.jp", "us-west-2", "FE", "ja_JP", _cur("JPY", "￥", decimals=0)),
    ("www.amazon.com.au", "us-west-2", "FE", "en_AU", _cur("AUD", "$")),
    ("www.amazon.sg", "us-west-2", "FE", "en_SG", _cur("SGD", "S$")),
)

#: Every marketplace by its ``x-marketplace`` name.
MARKETPLACES: Mapping[str, Marketplace] = {
    name: Marketplace(name, "webservices." + name.removeprefix("www."), region, family, locale, cur)
    for name, region, family, locale, cur in _TABLE
}

#: Every marketplace by its PA-API host (lower case, without port).
MARKETPLACES_BY_HOST: Mapping[str, Marketplace] = {m.paapi_host: m for m in MARKETPLACES.values()}


def served_as(name: str) -> Marketplace:
    """The marketplace ``name`` is served as: itself, or www.amazon.com for a name the
    simulator does not know (its currency, locale and catalogue)."""
    return MARKETPLACES.get(name) or MARKETPLACES["www.amazon.com"]


def format_amount(amount: float, currency: Currency) -> str:
    """Write ``amount`` the way Amazon's ``displayAmount`` does for ``currency``."""
    text = f"{amount:,.{currency.decimals}f}"
    whole, _, frac = text.partition(".")
    whole = whole.replace(",", currency.thousands_sep)
    body = f"{whole}{currency.decimal_sep}{frac}" if frac else whole
    return f"{currency.prefix}{body}{currency.suffix}"
