"""Amazon's marketplaces and Creators API credential versions, as lookup tables.

The tables follow protocol.md: section 2.1 (Creators marketplaces, regions, credential
versions and their token endpoints) and section 3.1 (PA-API host and SigV4 region per
marketplace). Default language and currency come from the per-locale reference pages
(CDOCS ``locale-reference/<country>``, PDOCS ``locale-reference/<country>.html``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

__all__ = [
    "CREDENTIAL_VERSIONS",
    "MARKETPLACES",
    "NAMING",
    "BodyEncoding",
    "CredentialVersion",
    "Marketplace",
    "Region",
    "TokenFamily",
    "credential_version",
    "marketplace",
    "not_a_name",
    "token_url",
]


class Region(enum.Enum):
    """The Creators API region a marketplace belongs to; it picks the token endpoint."""

    #: North America: US, CA, MX, BR
    NA = "NA"
    #: Europe, plus the Middle East and India
    EU = "EU"
    #: Far East: JP, SG, AU
    FE = "FE"


class TokenFamily(enum.Enum):
    """Which OAuth2 server issues a credential's tokens."""

    #: v2.x credentials: Amazon Cognito; API calls add ``, Version x.y`` to the bearer
    COGNITO = "cognito"
    #: v3.x credentials (created from February 2026 on): Login with Amazon
    LWA = "lwa"


class BodyEncoding(enum.Enum):
    """How a token request carries its fields."""

    #: ``application/x-www-form-urlencoded`` (Cognito)
    FORM = "form"
    #: ``application/json`` (Login with Amazon)
    JSON = "json"


@dataclass(frozen=True, slots=True)
class Marketplace:
    """One Amazon store, as both APIs address it.

    Attributes:
        name: the ``x-marketplace`` / ``Marketplace`` value, for example ``www.amazon.com``.
        country: ISO 3166 country code (``GB`` for the United Kingdom).
        region: the Creators API region (token endpoint family).
        paapi_host: the PA-API host for this marketplace.
        paapi_region: the SigV4 region PA-API requests are signed for.
        currency: the default currency of preference (ISO 4217).
        language: the default language of preference (for example ``en_US``).
    """

    name: str
    country: str
    region: Region
    paapi_host: str
    paapi_region: str
    currency: str
    language: str


@dataclass(frozen=True, slots=True)
class CredentialVersion:
    """One Creators API credential version and how to get a token for it.

    Attributes:
        version: as shown in Associates Central, for example ``2.1`` or ``3.2``.
        region: the region whose token endpoint issues the tokens.
        family: Cognito (v2.x) or Login with Amazon (v3.x).
        token_url: Amazon's token endpoint for this version.
        scope: the OAuth2 scope the token request asks for.
        encoding: how the token request body is encoded.
    """

    version: str
    region: Region
    family: TokenFamily
    token_url: str
    scope: str
    encoding: BodyEncoding

    @property
    def token_path(self) -> str:
        """The token endpoint's path, used under an override base URL (a local simulator)."""
        return "/oauth2/token" if self.family is TokenFamily.COGNITO else "/auth/o2/token"


def _table(*entries: Marketplace) -> Mapping[str, Marketplace]:
    return {entry.name: entry for entry in entries}


_NA, _EU, _FE = Region.NA, Region.EU, Region.FE

#: Every marketplace, keyed by its ``x-marketplace`` value.
#:
#: Two PA-API SigV4 regions are uncertain in protocol.md (marked [U]); we use documented
#: defaults and say why: EG signs for ``eu-west-1`` (AAW's table; EG is an EU-region store
#: for the Creators API, and GOARK's ``us-west-1`` fits no other EU store), and IE signs for
#: ``eu-west-1`` (GOARK, the only source, and every other EU store). SE signs for
#: ``eu-west-1`` as three of four sources say.
MARKETPLACES: Mapping[str, Marketplace] = _table(
    Marketplace("www.amazon.com", "US", _NA, "webservices.amazon.com", "us-east-1", "USD", "en_US"),
    Marketplace("www.amazon.ca", "CA", _NA, "webservices.amazon.ca", "us-east-1", "CAD", "en_CA"),
    Marketplace(
        "www.amazon.com.mx", "MX", _NA, "webservices.amazon.com.mx", "us-east-1", "MXN", "es_MX"
    ),
    Marketplace(
        "www.amazon.com.br", "BR", _NA, "webservices.amazon.com.br", "us-east-1", "BRL", "pt_BR"
    ),
    Marketplace(
        "www.amazon.co.uk", "GB", _EU, "webservices.amazon.co.uk", "eu-west-1", "GBP", "en_GB"
    ),
    Marketplace("www.amazon.de", "DE", _EU, "webservices.amazon.de", "eu-west-1", "EUR", "de_DE"),
    Marketplace("www.amazon.fr", "FR", _EU, "webservices.amazon.fr", "eu-west-1", "EUR", "fr_FR"),
    Marketplace("www.amazon.it", "IT", _EU, "webservices.amazon.it", "eu-west-1", "EUR", "it_IT"),
    Marketplace("www.amazon.es", "ES", _EU, "webservices.amazon.es", "eu-west-1", "EUR", "es_ES"),
    Marketplace("www.amazon.nl", "NL", _EU, "webservices.amazon.nl", "eu-west-1", "EUR", "nl_NL"),
    Marketplace("www.amazon.pl", "PL", _EU, "webservices.amazon.pl", "eu-west-1", "PLN", "pl_PL"),
    Marketplace("www.amazon.se", "SE", _EU, "webservices.amazon.se", "eu-west-1", "SEK", "sv_SE"),
    Marketplace(
        "www.amazon.com.be", "BE", _EU, "webservices.amazon.com.be", "eu-west-1", "EUR", "fr_BE"
    ),
    Marketplace(
        "www.amazon.com.tr", "TR", _EU, "webservices.amazon.com.tr", "eu-west-1", "TRY", "tr_TR"
    ),
    Marketplace("www.amazon.ae", "AE", _EU, "webservices.amazon.ae", "eu-west-1", "AED", "en_AE"),
    # SA and EG default to en_AE: that is what their locale pages say.
    Marketplace("www.amazon.sa", "SA", _EU, "webservices.amazon.sa", "eu-west-1", "SAR", "en_AE"),
    Marketplace("www.amazon.eg", "EG", _EU, "webservices.amazon.eg", "eu-west-1", "EGP", "en_AE"),
    Marketplace("www.amazon.in", "IN", _EU, "webservices.amazon.in", "eu-west-1", "INR", "en_IN"),
    Marketplace("www.amazon.ie", "IE", _EU, "webservices.amazon.ie", "eu-west-1", "EUR", "en_IE"),
    Marketplace(
        "www.amazon.co.jp", "JP", _FE, "webservices.amazon.co.jp", "us-west-2", "JPY", "ja_JP"
    ),
    Marketplace(
        "www.amazon.com.au", "AU", _FE, "webservices.amazon.com.au", "us-west-2", "AUD", "en_AU"
    ),
    Marketplace("www.amazon.sg", "SG", _FE, "webservices.amazon.sg", "us-west-2", "SGD", "en_SG"),
)

_COGNITO_SCOPE = "creatorsapi/default"
_LWA_SCOPE = "creatorsapi::default"

#: Every credential version Amazon issues, keyed by the version string.
CREDENTIAL_VERSIONS: Mapping[str, CredentialVersion] = {
    v.version: v
    for v in (
        CredentialVersion(
            "2.1",
            _NA,
            TokenFamily.COGNITO,
            "https://creatorsapi.auth.us-east-1.amazoncognito.com/oauth2/token",
            _COGNITO_SCOPE,
            BodyEncoding.FORM,
        ),
        CredentialVersion(
            "2.2",
            _EU,
            TokenFamily.COGNITO,
            "https://creatorsapi.auth.eu-south-2.amazoncognito.com/oauth2/token",
            _COGNITO_SCOPE,
            BodyEncoding.FORM,
        ),
        CredentialVersion(
            "2.3",
            _FE,
            TokenFamily.COGNITO,
            "https://creatorsapi.auth.us-west-2.amazoncognito.com/oauth2/token",
            _COGNITO_SCOPE,
            BodyEncoding.FORM,
        ),
        CredentialVersion(
            "3.1",
            _NA,
            TokenFamily.LWA,
            "https://api.amazon.com/auth/o2/token",
            _LWA_SCOPE,
            BodyEncoding.JSON,
        ),
        CredentialVersion(
            "3.2",
            _EU,
            TokenFamily.LWA,
            "https://api.amazon.co.uk/auth/o2/token",
            _LWA_SCOPE,
            BodyEncoding.JSON,
        ),
        CredentialVersion(
            "3.3",
            _FE,
            TokenFamily.LWA,
            "https://api.amazon.co.jp/auth/o2/token",
            _LWA_SCOPE,
            BodyEncoding.JSON,
        ),
    )
}

# Spellings users write for a marketplace besides its x-marketplace value: the bare domain
# and the country code ("UK" as well as ISO's "GB").
_ALIASES: Mapping[str, str] = {
    **{m.name.removeprefix("www."): m.name for m in MARKETPLACES.values()},
    **{m.country.lower(): m.name for m in MARKETPLACES.values()},
    "uk": "www.amazon.co.uk",
}


def not_a_name(value: object, what: str = "marketplace") -> TypeError:
    """The error for a marketplace given as something other than a string."""
    return TypeError(
        f"{what} must be a string such as 'US' or 'www.amazon.com', got {type(value).__name__}"
    )


def marketplace(name: str) -> Marketplace:
    """Return the marketplace named ``name``.

    Accepts the ``x-marketplace`` value (``www.amazon.de``), the bare domain
    (``amazon.de``) or the country code (``DE``; ``UK`` or ``GB``), in any case.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: the name matches no marketplace Amazon's APIs serve.
    """
    if not isinstance(name, str):
        raise not_a_name(name)
    found = MARKETPLACES.get(name)
    if found is not None:
        return found
    key = name.strip().lower()
    canonical = key if key in MARKETPLACES else _ALIASES.get(key)
    if canonical is None:
        known = ", ".join(sorted(MARKETPLACES))
        raise ValueError(f"unknown marketplace {name!r}; expected one of: {known}")
    return MARKETPLACES[canonical]


#: How a marketplace may be named, for a message refusing one that is no Amazon store.
NAMING: Final = "name it by its code (UK), its domain (amazon.co.uk) or www.amazon.co.uk"


def credential_version(version: str) -> CredentialVersion:
    """Return the credential version ``version`` (``2.1`` .. ``2.3``, ``3.1`` .. ``3.3``).

    Raises:
        ValueError: not a version Amazon issues.
    """
    found = CREDENTIAL_VERSIONS.get(version.strip())
    if found is None:
        known = ", ".join(CREDENTIAL_VERSIONS)
        raise ValueError(
            f"unknown Creators API credential version {version!r}; expected one of: {known} "
            "(Associates Central shows it beside the credential)"
        )
    return found


def token_url(version: str, base_url: str | None = None, *, as_given: bool = False) -> str:
    """Return the token endpoint for a credential version.

    Args:
        version: the credential version, for example ``3.1``.
        base_url: an override base (a local simulator, ``http://127.0.0.1:8080``); the
            path is then ``/oauth2/token`` for v2.x and ``/auth/o2/token`` for v3.x. A base
            that already ends with that path (a whole token URL, as python-amazon-paapi's
            ``auth_endpoint`` takes) is used as it is.
        as_given: ``base_url`` is the config's own ``token_endpoint``: one whose path ends
            in ``/token`` is the whole token URL, used as it is, as ``auth_endpoint`` was
            (a mock's ``/lwa/token``); any other path is a base, as it always was.

    Raises:
        ValueError: unknown version.
    """
    entry = credential_version(version)
    if base_url is None:
        return entry.token_url
    base = base_url.rstrip("/")
    if base.endswith(entry.token_path):
        return base
    if as_given and urlsplit(base).path.endswith("/token"):
        return base
    return base + entry.token_path
