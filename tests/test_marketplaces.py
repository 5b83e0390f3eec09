"""Tests for broker.api.marketplaces: the marketplace and credential-version tables."""

from __future__ import annotations

import pytest

from broker.api.marketplaces import (
    CREDENTIAL_VERSIONS,
    MARKETPLACES,
    BodyEncoding,
    Region,
    TokenFamily,
    credential_version,
    marketplace,
    token_url,
)

# protocol.md 2.1, "Marketplace values for x-marketplace": locale -> (x-marketplace, region).
CREATORS_TABLE = {
    "AU": ("www.amazon.com.au", Region.FE),
    "BE": ("www.amazon.com.be", Region.EU),
    "BR": ("www.amazon.com.br", Region.NA),
    "CA": ("www.amazon.ca", Region.NA),
    "EG": ("www.amazon.eg", Region.EU),
    "FR": ("www.amazon.fr", Region.EU),
    "DE": ("www.amazon.de", Region.EU),
    "IN": ("www.amazon.in", Region.EU),
    "IE": ("www.amazon.ie", Region.EU),
    "IT": ("www.amazon.it", Region.EU),
    "JP": ("www.amazon.co.jp", Region.FE),
    "NL": ("www.amazon.nl", Region.EU),
    "PL": ("www.amazon.pl", Region.EU),
    "SG": ("www.amazon.sg", Region.FE),
    "SA": ("www.amazon.sa", Region.EU),
    "ES": ("www.amazon.es", Region.EU),
    "SE": ("www.amazon.se", Region.EU),
    "TR": ("www.amazon.com.tr", Region.EU),
    "AE": ("www.amazon.ae", Region.EU),
    "GB": ("www.amazon.co.uk", Region.EU),
    "US": ("www.amazon.com", Region.NA),
    "MX": ("www.amazon.com.mx", Region.NA),
}

# protocol.md 3.1: marketplace -> (PA-API host, SigV4 region); EG and IE are [U] defaults.
PAAPI_TABLE = {
    "www.amazon.com": ("webservices.amazon.com", "us-east-1"),
    "www.amazon.ca": ("webservices.amazon.ca", "us-east-1"),
    "www.amazon.com.mx": ("webservices.amazon.com.mx", "us-east-1"),
    "www.amazon.com.br": ("webservices.amazon.com.br", "us-east-1"),
    "www.amazon.co.uk": ("webservices.amazon.co.uk", "eu-west-1"),
    "www.amazon.de": ("webservices.amazon.de", "eu-west-1"),
    "www.amazon.fr": ("webservices.amazon.fr", "eu-west-1"),
    "www.amazon.it": ("webservices.amazon.it", "eu-west-1"),
    "www.amazon.es": ("webservices.amazon.es", "eu-west-1"),
    "www.amazon.nl": ("webservices.amazon.nl", "eu-west-1"),
    "www.amazon.pl": ("webservices.amazon.pl", "eu-west-1"),
    "www.amazon.se": ("webservices.amazon.se", "eu-west-1"),
    "www.amazon.com.be": ("webservices.amazon.com.be", "eu-west-1"),
    "www.amazon.com.tr": ("webservices.amazon.com.tr", "eu-west-1"),
    "www.amazon.ae": ("webservices.amazon.ae", "eu-west-1"),
    "www.amazon.sa": ("webservices.amazon.sa", "eu-west-1"),
    "www.amazon.in": ("webservices.amazon.in", "eu-west-1"),
    "www.amazon.eg": ("webservices.amazon.eg", "eu-west-1"),
    "www.amazon.ie": ("webservices.amazon.ie", "eu-west-1"),
    "www.amazon.co.jp": ("webservices.amazon.co.jp", "us-west-2"),
    "www.amazon.com.au": ("webservices.amazon.com.au", "us-west-2"),
    "www.amazon.sg": ("webservices.amazon.sg", "us-west-2"),
}

# protocol.md 2.1 token table: version -> (region, family, URL).
VERSION_TABLE = {
    "2.1": (
        Region.NA,
        TokenFamily.COGNITO,
        "https://creatorsapi.auth.us-east-1.amazoncognito.com/oauth2/token",
    ),
    "2.2": (
        Region.EU,
        TokenFamily.COGNITO,
        "https://creatorsapi.auth.eu-south-2.amazoncognito.com/oauth2/token",
    ),
    "2.3": (
        Region.FE,
        TokenFamily.COGNITO,
        "https://creatorsapi.auth.us-west-2.amazoncognito.com/oauth2/token",
    ),
    "3.1": (Region.NA, TokenFamily.LWA, "https://api.amazon.com/auth/o2/token"),
    "3.2": (Region.EU, TokenFamily.LWA, "https://api.amazon.co.uk/auth/o2/token"),
    "3.3": (Region.FE, TokenFamily.LWA, "https://api.amazon.co.jp/auth/o2/token"),
}


class TestMarketplaceTable:
    def test_table_holds_exactly_the_documented_marketplaces(self) -> None:
        """The table lists the 22 x-marketplace values of protocol.md 2.1, no more."""
        assert set(MARKETPLACES) == {name for name, _ in CREATORS_TABLE.values()}

    @pytest.mark.parametrize(("country", "expected"), sorted(CREATORS_TABLE.items()))
    def test_creators_region_and_country(self, country: str, expected: tuple[str, Region]) -> None:
        """Each marketplace has the Creators region and country of protocol.md 2.1."""
        name, region = expected
        entry = MARKETPLACES[name]
        assert (entry.name, entry.country, entry.region) == (name, country, region)

    @pytest.mark.parametrize(("name", "expected"), sorted(PAAPI_TABLE.items()))
    def test_paapi_host_and_region(self, name: str, expected: tuple[str, str]) -> None:
        """Each marketplace has the PA-API host and SigV4 region of protocol.md 3.1."""
        entry = MARKETPLACES[name]
        assert (entry.paapi_host, entry.paapi_region) == expected

    @pytest.mark.parametrize(
        ("name", "language", "currency"),
        [
            ("www.amazon.com", "en_US", "USD"),
            ("www.amazon.co.uk", "en_GB", "GBP"),
            ("www.amazon.es", "es_ES", "EUR"),
            ("www.amazon.se", "sv_SE", "SEK"),
            ("www.amazon.com.tr", "tr_TR", "TRY"),
            ("www.amazon.ae", "en_AE", "AED"),
            ("www.amazon.sg", "en_SG", "SGD"),
        ],
    )
    def test_documented_locale_defaults(self, name: str, language: str, currency: str) -> None:
        """The locale defaults quoted in protocol.md 2.1 are the table's."""
        entry = MARKETPLACES[name]
        assert (entry.language, entry.currency) == (language, currency)

    def test_every_entry_has_a_language_and_currency(self) -> None:
        """Every marketplace has a locale-shaped language and a three-letter currency."""
        for entry in MARKETPLACES.values():
            assert len(entry.currency) == 3
            assert entry.currency.isupper()
            lang, _, country = entry.language.partition("_")
            assert lang.islower()
            assert country.isupper()

    def test_uncertain_regions_use_documented_defaults(self) -> None:
        """EG, IE and SE, marked uncertain in protocol.md 3.1, sign for eu-west-1."""
        for name in ("www.amazon.eg", "www.amazon.ie", "www.amazon.se"):
            assert MARKETPLACES[name].paapi_region == "eu-west-1"


class TestMarketplaceLookup:
    @pytest.mark.parametrize(
        "spelling",
        ["www.amazon.de", "amazon.de", "DE", "de", " WWW.AMAZON.DE ", "Amazon.De"],
    )
    def test_spellings_resolve(self, spelling: str) -> None:
        """The x-marketplace value, bare domain and country code all find the marketplace."""
        assert marketplace(spelling).name == "www.amazon.de"

    @pytest.mark.parametrize("spelling", ["UK", "uk", "GB", "amazon.co.uk"])
    def test_united_kingdom_spellings(self, spelling: str) -> None:
        """Both UK and ISO's GB name the United Kingdom."""
        assert marketplace(spelling).name == "www.amazon.co.uk"

    @pytest.mark.parametrize("name", ["www.amazon.cn", "", "amazon", "www.ebay.com", "XX"])
    def test_unknown_marketplace_raises_value_error(self, name: str) -> None:
        """An unknown marketplace raises ValueError naming it and the valid values."""
        with pytest.raises(ValueError, match="unknown marketplace") as info:
            marketplace(name)
        assert repr(name) in str(info.value)
        assert "www.amazon.com" in str(info.value)


class TestCredentialVersions:
    @pytest.mark.parametrize(("version", "expected"), sorted(VERSION_TABLE.items()))
    def test_versions_match_protocol_table(
        self, version: str, expected: tuple[Region, TokenFamily, str]
    ) -> None:
        """Each version has the region, family and token URL of protocol.md 2.1."""
        entry = credential_version(version)
        assert (entry.region, entry.family, entry.token_url) == expected

    def test_only_documented_versions(self) -> None:
        """Exactly the six documented versions exist."""
        assert set(CREDENTIAL_VERSIONS) == set(VERSION_TABLE)

    @pytest.mark.parametrize("version", ["2.1", "2.2", "2.3"])
    def test_cognito_scope_and_encoding(self, version: str) -> None:
        """v2.x asks for scope creatorsapi/default in a form body."""
        entry = credential_version(version)
        assert entry.scope == "creatorsapi/default"
        assert entry.encoding is BodyEncoding.FORM

    @pytest.mark.parametrize("version", ["3.1", "3.2", "3.3"])
    def test_lwa_scope_and_encoding(self, version: str) -> None:
        """v3.x asks for scope creatorsapi::default in a JSON body."""
        entry = credential_version(version)
        assert entry.scope == "creatorsapi::default"
        assert entry.encoding is BodyEncoding.JSON

    @pytest.mark.parametrize("version", ["4.1", "2", "3.10", "", "v3.1", "2.0"])
    def test_unknown_version_raises_value_error(self, version: str) -> None:
        """An unknown version raises ValueError naming it and the valid ones."""
        with pytest.raises(ValueError, match="unknown Creators API credential version") as info:
            credential_version(version)
        assert "3.1" in str(info.value)

    def test_version_is_stripped(self) -> None:
        """Whitespace around a version (from a config file) is ignored."""
        assert credential_version(" 3.2 ").version == "3.2"


class TestTokenUrl:
    @pytest.mark.parametrize(("version", "expected"), sorted(VERSION_TABLE.items()))
    def test_default_is_amazons(self, version: str, expected: tuple[object, object, str]) -> None:
        """Without an override, the token URL is Amazon's for the version."""
        assert token_url(version) == expected[2]

    @pytest.mark.parametrize(
        ("version", "path"),
        [
            ("2.1", "/oauth2/token"),
            ("2.3", "/oauth2/token"),
            ("3.1", "/auth/o2/token"),
            ("3.3", "/auth/o2/token"),
        ],
    )
    @pytest.mark.parametrize("base", ["http://127.0.0.1:8123", "http://127.0.0.1:8123/"])
    def test_override_base_uses_simulator_paths(self, version: str, path: str, base: str) -> None:
        """An override base gets /oauth2/token (v2) or /auth/o2/token (v3), slash-safe."""
        assert token_url(version, base) == "http://127.0.0.1:8123" + path

    @pytest.mark.parametrize(
        ("version", "path"), [("2.1", "/oauth2/token"), ("3.1", "/auth/o2/token")]
    )
    @pytest.mark.parametrize("tail", ["", "/"])
    def test_override_that_is_already_the_token_url(
        self, version: str, path: str, tail: str
    ) -> None:
        """A whole token URL (python-amazon-paapi's ``auth_endpoint``) is used as it is, not
        given the path a second time."""
        assert token_url(version, "http://127.0.0.1:8123" + path + tail) == (
            "http://127.0.0.1:8123" + path
        )

    @pytest.mark.parametrize(
        "given", ["http://127.0.0.1:8123/lwa/token", "http://127.0.0.1:8123/token"]
    )
    @pytest.mark.parametrize("version", ["2.1", "3.1"])
    def test_a_token_endpoint_ending_in_token_is_the_whole_url(
        self, version: str, given: str
    ) -> None:
        """The config's token_endpoint whose path ends in /token is used as it is, as
        python-amazon-paapi's auth_endpoint was (a mock's /lwa/token); Amazon's path was
        glued onto it (/lwa/token/auth/o2/token, a 404)."""
        assert token_url(version, given, as_given=True) == given

    @pytest.mark.parametrize(
        ("given", "base"),
        [
            ("http://127.0.0.1:8123", "http://127.0.0.1:8123"),
            ("http://127.0.0.1:8123/", "http://127.0.0.1:8123"),
            ("https://gw.example/amazon-auth", "https://gw.example/amazon-auth"),
        ],
    )
    def test_any_other_token_endpoint_is_a_base(self, given: str, base: str) -> None:
        """A token_endpoint of a host, or with a path prefix (a gateway's, as configs have
        it), is a base: Amazon's path is added, as it always was."""
        assert token_url("3.1", given, as_given=True) == base + "/auth/o2/token"

    def test_the_api_endpoint_as_base_keeps_its_path_prefix(self) -> None:
        """The API endpoint (not as_given) followed as the token base keeps a path prefix
        of its own (a gateway at /amazon) and gets Amazon's path after it."""
        assert (
            token_url("3.1", "https://gw.example/amazon")
            == "https://gw.example/amazon/auth/o2/token"
        )

    def test_override_with_unknown_version_still_raises(self) -> None:
        """A base URL does not make an unknown version acceptable."""
        with pytest.raises(ValueError, match=r"4\.1"):
            token_url("4.1", "http://127.0.0.1:1")
