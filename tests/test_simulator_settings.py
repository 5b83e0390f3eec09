"""Simulator settings: defaults, demo accounts, parsing of [simulator], errors naming key paths."""

from __future__ import annotations

import pytest

from broker.errors import ConfigError
from broker.simulator.accounts import DEMO_ACCOUNTS, simulator_secret
from broker.simulator.settings import FaultRates, LatencyProfile, SimulatorSettings


def test_defaults_are_valid_and_include_demo_accounts() -> None:
    """SimulatorSettings() is valid and holds the three documented demo keys."""
    settings = SimulatorSettings()
    ids = {(a.protocol, a.credential_id, a.secret, a.version) for a in settings.all_accounts}
    assert ids == {
        ("creators", "demo-id", "demo-secret", "3.1"),
        ("creators", "demo-v2-id", "demo-v2-secret", "2.1"),
        ("paapi5", "DEMOACCESSKEY", "demo-secret-key", ""),
    }
    for account in DEMO_ACCOUNTS:
        assert account.partner_tags == {
            "www.amazon.com": ("demo-20",),
            "www.amazon.co.uk": ("demo-21",),
            "www.amazon.de": ("demo-22",),
        }
        assert (account.tps, account.tpd) == (5.0, 100_000)
    assert settings.token_lifetime_s == 3600
    assert settings.burst == 1
    assert settings.shuffle_items
    assert settings.explicit_nulls
    assert settings.limits
    assert settings.items_container == "itemsResult"
    assert settings.field_list_style == "objects"
    assert settings.paapi_default_host == "webservices.amazon.com"


def test_empty_table_equals_defaults() -> None:
    """An empty [simulator] table parses to the defaults."""
    assert SimulatorSettings.from_mapping({}) == SimulatorSettings()


def test_account_tags_take_the_marketplace_spellings_keys_take() -> None:
    """[[simulator.accounts]] partner_tags take UK, amazon.de and www.amazon.fr, as [[keys]]
    does, under the canonical name; "UK" was refused as an unknown marketplace."""
    table = {
        "accounts": [
            {
                "name": "main",
                "credential_id": "abc",
                "secret": "s",
                "version": "3.1",
                "partner_tags": {"UK": "uk-21", "amazon.de": "de-21", "www.amazon.fr": "fr-21"},
            }
        ]
    }
    (main,) = SimulatorSettings.from_mapping(table).accounts
    assert main.partner_tags == {
        "www.amazon.co.uk": ("uk-21",),
        "www.amazon.de": ("de-21",),
        "www.amazon.fr": ("fr-21",),
    }


def test_full_table() -> None:
    """Every documented key parses into its field."""
    table = {
        "seed": 7,
        "token_lifetime_s": 60,
        "burst": 2,
        "limits": False,
        "retry_after": "both",
        "retry_after_s": 2,
        "missing_share": 0.1,
        "inaccessible_share": 0.05,
        "shuffle_items": False,
        "explicit_nulls": False,
        "items_container": "itemResults",
        "field_list_style": "strings",
        "not_found_when_all_inaccessible": False,
        "paapi_retired": True,
        "paapi_default_host": "webservices.amazon.de",
        "clock_skew_s": -30,
        "invalid_client_status": 400,
        "oauth_error_status": 401,
        "demo_accounts": False,
        "latency": {"fixed_ms": 40, "exp_mean_ms": 10},
        "faults": {
            "error_500": 0.01,
            "reset": 0.02,
            "hang": 0.001,
            "hang_s": 5,
            "expired_token": 0.5,
        },
        "accounts": [
            {
                "name": "main",
                "credential_id": "abc",
                "secret": "s",
                "version": "2.2",
                "partner_tags": {"www.amazon.de": "main-21", "www.amazon.fr": ["a-21", "b-21"]},
                "tps": 2.5,
                "tpd": 100,
                "not_eligible": True,
            },
            {
                "name": "old",
                "protocol": "paapi5",
                "access_key": "AKIA",
                "secret": "t",
                "not_enabled": True,
                "aws_credentials": True,
                "no_store": True,
            },
        ],
    }
    settings = SimulatorSettings.from_mapping(table)
    assert settings.seed == 7
    assert settings.burst == 2
    assert not settings.limits
    assert settings.latency == LatencyProfile(40.0, 10.0)
    assert settings.faults == FaultRates(
        error_500=0.01, reset=0.02, hang=0.001, hang_s=5.0, expired_token=0.5
    )
    main, old = settings.accounts
    assert main.partner_tags == {"www.amazon.de": ("main-21",), "www.amazon.fr": ("a-21", "b-21")}
    assert (main.version, main.tps, main.tpd, main.not_eligible) == ("2.2", 2.5, 100, True)
    assert (old.protocol, old.credential_id, old.not_enabled, old.no_store) == (
        "paapi5",
        "AKIA",
        True,
        True,
    )
    assert settings.all_accounts == (main, old)


@pytest.mark.parametrize(
    ("table", "path"),
    [
        ({"sed": 1}, "simulator.sed"),
        ({"burst": 0}, "simulator.burst"),
        ({"burst": 1.5}, "simulator.burst"),
        ({"limits": "yes"}, "simulator.limits"),
        ({"retry_after": "sometimes"}, "simulator.retry_after"),
        ({"missing_share": 1.5}, "simulator.missing_share"),
        ({"missing_share": 0.6, "inaccessible_share": 0.6}, "simulator.missing_share"),
        ({"paapi_default_host": "example.com"}, "simulator.paapi_default_host"),
        ({"latency": {"fixed_ms": -1}}, "simulator.latency.fixed_ms"),
        ({"latency": {"jitter": 1}}, "simulator.latency.jitter"),
        ({"faults": {"error_500": 0.7, "error_503": 0.7}}, "simulator.faults"),
        ({"faults": {"error_501": 0.1}}, "simulator.faults.error_501"),
        ({"accounts": {"name": "x"}}, "simulator.accounts"),
        (
            {
                "accounts": [
                    {"name": "a", "credential_id": "a", "secret": "s"},
                    {"name": "b", "credential_id": "b", "secret": "s", "tps": 0},
                ]
            },
            "simulator.accounts[1].tps",
        ),
        ({"accounts": [{"name": "a", "secret": "s"}]}, "simulator.accounts[0].credential_id"),
        ({"accounts": [{"name": "a", "credential_id": "a"}]}, "simulator.accounts[0].secret"),
        (
            {"accounts": [{"name": "a", "credential_id": "a", "secret": "s", "version": "4.1"}]},
            "simulator.accounts[0].version",
        ),
        (
            {"accounts": [{"name": "a", "credential_id": "a", "secret": "s", "colour": "red"}]},
            "simulator.accounts[0].colour",
        ),
        (
            {
                "accounts": [
                    {
                        "name": "a",
                        "credential_id": "a",
                        "secret": "s",
                        "partner_tags": {"www.amazon.moon": "x"},
                    }
                ]
            },
            'simulator.accounts[0].partner_tags."www.amazon.moon"',
        ),
        (
            {
                "accounts": [
                    {
                        "name": "a",
                        "protocol": "paapi5",
                        "access_key": "A",
                        "secret": "s",
                        "version": "3.1",
                    }
                ]
            },
            "simulator.accounts[0].version",
        ),
        (
            {
                "accounts": [
                    {"name": "a", "credential_id": "a", "secret": "s"},
                    {"name": "a", "credential_id": "b", "secret": "s"},
                ]
            },
            "simulator.accounts[1].name",
        ),
        (
            {"accounts": [{"name": "x", "credential_id": "demo-id", "secret": "s"}]},
            "simulator.accounts",
        ),
        # PA-API's flags on a Creators account did nothing: refused like version on paapi5.
        (
            {"accounts": [{"name": "a", "credential_id": "a", "secret": "s", "not_enabled": True}]},
            "simulator.accounts[0].not_enabled",
        ),
        (
            {
                "accounts": [
                    {"name": "a", "credential_id": "a", "secret": "s", "aws_credentials": False}
                ]
            },
            "simulator.accounts[0].aws_credentials",
        ),
        # A skew the server's dates cannot hold passed check-config, then every answer failed.
        ({"clock_skew_s": 1e12}, "simulator.clock_skew_s"),
        ({"clock_skew_s": -1e300}, "simulator.clock_skew_s"),
        ({"seed": 1, "clock_skew_s": 10**400}, "simulator.clock_skew_s"),
    ],
)
def test_bad_values_name_the_key_path(table: dict[str, object], path: str) -> None:
    """Unknown keys and bad values raise ConfigError naming the full key path."""
    with pytest.raises(ConfigError) as caught:
        SimulatorSettings.from_mapping(table)
    assert caught.value.path == path


def test_accounts_given_as_one_table_name_the_whole_array_to_write() -> None:
    """[simulator.accounts] written as one table is told to be [[simulator.accounts]]; it
    said [[accounts]], which the config then refused as an unknown top-level key."""
    with pytest.raises(ConfigError) as caught:
        SimulatorSettings.from_mapping({"accounts": {"name": "x"}})
    assert "[[simulator.accounts]]" in str(caught.value)


def test_custom_path_prefix() -> None:
    """from_mapping(path=...) prefixes every error path."""
    with pytest.raises(ConfigError) as caught:
        SimulatorSettings.from_mapping({"burst": 0}, path="sim")
    assert caught.value.path == "sim.burst"


def test_account_named_like_a_demo_replaces_it() -> None:
    """An account named 'demo' replaces the demo key; demo_accounts = false drops them all."""
    table = {"accounts": [{"name": "demo", "credential_id": "mine", "secret": "s"}]}
    settings = SimulatorSettings.from_mapping(table)
    ids = [a.credential_id for a in settings.all_accounts]
    assert "mine" in ids
    assert "demo-id" not in ids
    assert "DEMOACCESSKEY" in ids
    assert SimulatorSettings(demo_accounts=False).all_accounts == ()


def test_secrets_stay_out_of_repr() -> None:
    """An account's secret is not shown in its repr."""
    assert "demo-secret" not in repr(DEMO_ACCOUNTS[0])


def test_simulator_secret_lookup() -> None:
    """simulator_secret finds a key's secret by (protocol, id), from defaults or settings."""
    assert simulator_secret("creators", "demo-id") == "demo-secret"
    assert simulator_secret("paapi5", "DEMOACCESSKEY") == "demo-secret-key"
    assert simulator_secret("paapi5", "demo-id") is None
    settings = SimulatorSettings.from_mapping(
        {"accounts": [{"name": "k", "protocol": "paapi5", "access_key": "AK", "secret": "sk"}]}
    )
    assert simulator_secret("paapi5", "AK", settings) == "sk"


def test_a_negative_fault_rate_built_in_code_is_refused() -> None:
    """A negative rate in FaultRates built in code is refused naming it: it cancelled
    another's in the check of the sum (0.9 + 0.9 - 1.0 passed)."""
    from broker.simulator.settings import FaultRates

    with pytest.raises(ConfigError) as caught:
        SimulatorSettings(faults=FaultRates(error_500=0.9, reset=0.9, html=-1.0))
    assert caught.value.path == "simulator.faults.html"


def test_a_misspelt_setting_names_the_closest_one() -> None:
    """A misspelt setting names the one meant, as the broker's tables do; a name close to
    none lists the known settings."""
    with pytest.raises(
        ConfigError, match=r"simulator\.seeed: unknown setting; did you mean seed\?"
    ):
        SimulatorSettings.from_mapping({"seeed": 4}, path="simulator")
    with pytest.raises(ConfigError, match=r"unknown setting \(known: .*token_lifetime_s\)"):
        SimulatorSettings.from_mapping({"zzz": 4}, path="simulator")
