"""The one TOML table reader behind config.toml's broker and simulator tables."""

from __future__ import annotations

import tomllib

import pytest
from conftest import embedded_document

from broker.config import parse_config
from broker.errors import ConfigError
from broker.simulator.settings import SimulatorSettings
from broker.tomltable import TomlTable


class TestTomlTable:
    def test_errors_name_the_path_and_never_the_value(self) -> None:
        """A wrong type names the key path and the TOML type, not the value."""
        table = TomlTable({"tps": "hunter2"}, "keys[0]")
        with pytest.raises(ConfigError) as caught:
            table.number("tps", 1.0)
        assert caught.value.path == "keys[0].tps"
        assert "hunter2" not in str(caught.value)
        assert "a string" in caught.value.message

    def test_unknown_keys_are_refused(self) -> None:
        """A key no getter read is refused by finish()."""
        table = TomlTable({"tps": 1, "tpss": 2}, "")
        table.number("tps", 1.0)
        with pytest.raises(ConfigError) as caught:
            table.finish()
        assert caught.value.path == "tpss"

    def test_bounds(self) -> None:
        """Exclusive and inclusive bounds, and integer ranges."""
        table = TomlTable({"a": 0, "b": 11}, "t")
        with pytest.raises(ConfigError, match="must be > 0"):
            table.number("a", 1.0, minimum=0.0, exclusive=True)
        with pytest.raises(ConfigError, match="between 1 and 10"):
            table.integer("b", 1, minimum=1, maximum=10)

    def test_a_boolean_is_not_a_number(self) -> None:
        """``tps = true`` is refused as not a number, not taken as 1 request a second."""
        table = TomlTable({"tps": True}, "keys[0]")
        with pytest.raises(ConfigError) as caught:
            table.number("tps", 1.0)
        assert str(caught.value) == "keys[0].tps: must be a number, not a boolean"

    def test_white_space_alone_is_empty_text(self) -> None:
        """A text value of white space alone is refused as empty, not taken as ``""``."""
        table = TomlTable({"marketplace": " \t "}, "api")
        with pytest.raises(ConfigError) as caught:
            table.text("marketplace", "www.amazon.com")
        assert str(caught.value) == "api.marketplace: must not be empty"

    def test_list_entries_are_stripped(self) -> None:
        """White space around each entry of a list of strings is dropped, as around text."""
        table = TomlTable({"resources": [" itemInfo.title", "images.primary.small\t"]}, "api")
        assert table.str_list("resources") == ("itemInfo.title", "images.primary.small")

    def test_a_value_at_the_maximum_is_accepted(self) -> None:
        """The maximum is inclusive: ``rate.tpd_guard = 1.0`` (no margin: stop at the whole
        daily quota) loads; just above it is refused."""
        table = TomlTable({"tpd_guard": 1.0, "over": 1.01}, "rate")
        assert table.number("tpd_guard", 0.99, exclusive=True, minimum=0.0, maximum=1.0) == 1.0
        with pytest.raises(ConfigError, match=r"must be <= 1, got 1\.01"):
            table.number("over", 0.99, minimum=0.0, maximum=1.0)
        document = embedded_document(rate={"tpd_guard": 1.0})
        assert parse_config(document, environ={}).rate.tpd_guard == 1.0

    def test_an_integer_too_large_for_a_float_is_a_config_error(self) -> None:
        """TOML's integers have no bound: one beyond a float's range, where a number is
        wanted, names its key; it raised OverflowError (a traceback, exit 1)."""
        table = TomlTable({"cap": 10**400}, "rate")
        with pytest.raises(ConfigError, match="must be a finite number") as caught:
            table.number("cap", 1.0)
        assert caught.value.path == "rate.cap"

    def test_config_and_simulator_read_alike(self) -> None:
        """The broker's tables and [simulator] report a bad value the same way."""
        with pytest.raises(ConfigError) as broker_error:
            parse_config(embedded_document(keys={"tps": "x"}), environ={})
        with pytest.raises(ConfigError) as sim_error:
            SimulatorSettings.from_mapping({"burst": "x"})
        assert broker_error.value.message == "must be a number, not a string"
        assert sim_error.value.message == "must be an integer, not a string"
        assert sim_error.value.path == "simulator.burst"


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("tpd = 8640.0", "must be an integer, not a decimal number: write 8640"),
        ("tpd = 2.5", "must be an integer, not a decimal number"),
        ("tpd = 1e300", "must be an integer, not a decimal number"),
    ],
)
def test_a_decimal_where_an_integer_goes_says_what_to_write(text: str, said: str) -> None:
    """``tpd = 8640.0``: "must be an integer, not a decimal number: write 8640"; it said
    "not a number", of a number."""
    table = TomlTable(tomllib.loads(text), "keys[0]")
    with pytest.raises(ConfigError) as info:
        table.integer("tpd", 1)
    assert str(info.value).endswith(f"keys[0].tpd: {said}")


@pytest.mark.parametrize(
    ("text", "kind"),
    [("version = 3.1", "a number"), ("daily_reset_utc = 08:00:00", "a time")],
)
def test_a_bare_value_meant_as_text_is_told_to_be_quoted(text: str, kind: str) -> None:
    """``version = 3.1`` or ``daily_reset_utc = 08:00:00`` written without quotes: the
    message says to write it in quotes; it said "not time", in Python's words."""
    name = text.split(" = ")[0]
    table = TomlTable(tomllib.loads(text), "api")
    with pytest.raises(ConfigError) as info:
        table.text(name)
    assert str(info.value).endswith(
        f"api.{name}: must be a non-empty string, not {kind}: write it in quotes"
    )
