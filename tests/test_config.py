"""config.toml -> BrokerConfig: every error names its key path, secrets stay out of the file."""

from __future__ import annotations

import copy
import itertools
import os
from pathlib import Path
from typing import Any

import pytest

from broker.api.resources import ITEM_RESOURCES
from broker.client import simulator_settings
from broker.config import TABLES, load_config, parse_config
from broker.errors import ConfigError
from broker.models import Protocol

REPO = Path(__file__).resolve().parent.parent
ENV = {"ASINB_DEMO_SECRET": "s3cr3t-value"}


def _doc(**tables: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "api": {"protocol": "creators", "endpoint": "https://creatorsapi.example"},
        "keys": [
            {
                "name": "demo",
                "credential_id": "demo-id",
                "credential_secret_env": "ASINB_DEMO_SECRET",
                "version": "3.1",
                "partner_tags": {"www.amazon.com": "demo-20"},
            }
        ],
    }
    document.update(tables)
    return document


def _with(path: str, value: object) -> dict[str, Any]:
    """The base document with ``value`` set at a dotted path (``keys.0.tps``)."""
    document = copy.deepcopy(_doc())
    *parents, last = path.split(".")
    node: Any = document
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return document


def _error(document: dict[str, Any], environ: dict[str, str] | None = None) -> ConfigError:
    """The error of loading ``document`` as the CLI does ([simulator] checked at load)."""
    with pytest.raises(ConfigError) as info:
        simulator_settings(parse_config(document, environ=ENV if environ is None else environ))
    return info.value


class TestTables:
    """TABLES, by which broker simulate refuses a misspelt table, is the config's own list."""

    def test_every_table_named_parses(self) -> None:
        """A document with every table of TABLES parses: the simulator refuses none the
        broker reads."""
        document = _doc(**{name: {} for name in TABLES if name not in ("api", "keys")})
        assert set(document) == TABLES
        parse_config(document, environ=ENV)

    def test_a_table_not_named_is_refused_by_the_config_too(self) -> None:
        """A name outside TABLES is an unknown key for the config as for the simulator;
        one that looks like a secret is refused saying where secrets go."""
        assert "simulatr" not in TABLES
        error = _error(_doc(simulatr={"seed": 3}))
        assert (error.path, error.message) == ("simulatr", "unknown key; did you mean simulator?")
        secret = _error(_doc(password="hunter2-do-not-echo"))
        assert secret.path == "password"
        assert "secrets are never read from the config file" in secret.message
        assert "hunter2" not in str(secret)


class TestMisspeltKeys:
    @pytest.mark.parametrize(
        ("where", "meant"),
        [
            ({"engin": {}}, ("engin", "engine")),
            ({"engine": {"queue_sise": 5}}, ("engine.queue_sise", "queue_size")),
            ({"state": {"redis_pasword_env": "X"}}, ("state.redis_pasword_env", None)),
        ],
    )
    def test_the_closest_known_key_is_named(
        self, where: dict[str, object], meant: tuple[str, str | None]
    ) -> None:
        """A misspelt key names the known one closest to it (README: an unknown key is
        usually a typo); it said "unknown key" alone, outside [simulator]."""
        error = _error(_doc(**where))
        path, suggestion = meant
        assert error.path == path
        if suggestion is None:
            assert "unknown key" in error.message or "secrets" in error.message
        else:
            assert error.message == f"unknown key; did you mean {suggestion}?"

    def test_a_misspelt_key_of_a_key_names_tps(self) -> None:
        """tsp = 5 under [[keys]]: did you mean tps?"""
        document = _doc()
        document["keys"][0]["tsp"] = 5
        assert _error(document).message == "unknown key; did you mean tps?"

    @pytest.mark.parametrize("name", ["credential_secret_path", "credentials_secret_file"])
    def test_a_misspelt_secret_source_names_the_file_source(self, name: str) -> None:
        """credential_secret_path = "/etc/...": did you mean credential_secret_file, and
        the file source is named beside the variable; it only said to use a variable."""
        document = _doc()
        document["keys"][0][name] = "/etc/asin-broker/main.secret"
        error = _error(document)
        assert error.path == f"keys[0].{name}"
        assert error.message.startswith("unknown key; did you mean credential_secret_file?")
        assert "named by credential_secret_file" in error.message
        assert "/etc/asin-broker" not in str(error)


class TestFilePaths:
    """[cache] path and [state] path name SQLite files."""

    @pytest.mark.parametrize("table", ["cache", "state"])
    @pytest.mark.parametrize("given", ["sub", "sub/", "new/"])
    def test_a_directory_is_refused(self, tmp_path: Path, table: str, given: str) -> None:
        """A path naming a directory (an existing one, or any ending in /) is refused naming
        the key: check-config said "config ok", and every lookup warned the file could not
        be opened."""
        (tmp_path / "sub").mkdir()
        document = _doc(**{table: {"path": given}})
        with pytest.raises(ConfigError) as info:
            parse_config(document, environ=ENV, base_dir=tmp_path)
        assert info.value.path == f"{table}.path"
        assert "is a directory: name a file in it" in info.value.message

    @pytest.mark.parametrize("table", ["cache", "state"])
    def test_a_file_path_is_taken(self, tmp_path: Path, table: str) -> None:
        """A file's path (existing or not) is taken, relative to the config's folder."""
        config = parse_config(
            _doc(**{table: {"path": "sub/x.sqlite3"}}), environ=ENV, base_dir=tmp_path
        )
        assert str(getattr(config, table).path) == str(tmp_path / "sub" / "x.sqlite3")


class TestKeyPaths:
    """Each validation error carries the path of the key that is wrong."""

    @pytest.mark.parametrize(
        ("where", "value", "path"),
        [
            ("api", 3, "api"),
            ("api.protocol", "soap", "api.protocol"),
            ("api.endpoint", "ftp://example.com", "api.endpoint"),
            ("api.endpoint", "", "api.endpoint"),
            ("api.token_endpoint", "not a url", "api.token_endpoint"),
            ("api.marketplace", "www.amazon.cmo", "api.marketplace"),
            ("api.resources", "itemInfo.title", "api.resources"),
            ("api.resources", ["ItemInfo.Bogus"], "api.resources"),
            ("api.resources", ["Offers.Listings.Price"], "api.resources"),
            ("keys", "demo", "keys"),
            ("keys", [], "keys"),
            ("keys.0.name", 7, "keys[0].name"),
            ("keys.0.tps", 0, "keys[0].tps"),
            ("keys.0.tps", "fast", "keys[0].tps"),
            ("keys.0.tps", 5000, "keys[0].tps"),
            ("keys.0.tpd", -1, "keys[0].tpd"),
            ("keys.0.tpd", 1.5, "keys[0].tpd"),
            ("keys.0.max_in_flight", 0, "keys[0].max_in_flight"),
            ("keys.0.max_in_flight", 1001, "keys[0].max_in_flight"),  # above MAX_IN_FLIGHT
            ("keys.0.version", "9.9", "keys[0].version"),
            ("keys.0.partner_tags", {}, "keys[0].partner_tags"),
            (
                "keys.0.partner_tags",
                {"www.amazon.cmo": "x-20"},
                "keys[0].partner_tags.www.amazon.cmo",
            ),
            (
                "keys.0.partner_tags",
                {"www.amazon.com": "x" * 65},
                "keys[0].partner_tags.www.amazon.com",
            ),
            (  # two spellings of one store: which tag was meant?
                "keys.0.partner_tags",
                {"US": "demo-20", "www.amazon.com": "typo-20"},
                "keys[0].partner_tags.www.amazon.com",
            ),
            ("engine.queue_size", 0, "engine.queue_size"),
            ("engine.batch_size", 11, "engine.batch_size"),
            ("engine.linger_s", -0.1, "engine.linger_s"),
            ("engine.request_timeout_s", 0, "engine.request_timeout_s"),
            ("engine.max_body_bytes", 10, "engine.max_body_bytes"),
            ("rate.beta", 1.0, "rate.beta"),
            ("rate.discover", "yes", "rate.discover"),
            ("rate.tpd_guard", 0, "rate.tpd_guard"),
            ("rate.daily_reset_utc", "24:00", "rate.daily_reset_utc"),
            ("rate.daily_reset_utc", "8am", "rate.daily_reset_utc"),
            ("rate.daily_reset_utc", 8, "rate.daily_reset_utc"),
            ("retry.max_attempts", 0, "retry.max_attempts"),
            ("retry.max_age_s", float("inf"), "retry.max_age_s"),
            ("output.format", "xml", "output.format"),
            ("log.level", "loud", "log.level"),
            ("log.format", "xml", "log.format"),
            ("serve.settle_s", -1, "serve.settle_s"),
            ("simulator", "on", "simulator"),
            ("simulator.burst", 0, "simulator.burst"),
            ("simulator.faults.error_500", "often", "simulator.faults.error_500"),
        ],
    )
    def test_bad_value_names_its_path(self, where: str, value: object, path: str) -> None:
        """A bad value is refused with a ConfigError whose path (and message) names the key."""
        error = _error(_with(where, value))
        assert error.path == path
        assert str(error).startswith(f"{path}: ")

    def test_daily_reset_moves_every_keys_window(self) -> None:
        """``[rate] daily_reset_utc`` (documented as configurable, and refused as an unknown
        key) moves the daily window of every key: in the shared state's limits, which
        judge the day and its reset."""
        from broker.engine.adaptive import AdaptiveSettings
        from broker.engine.shared_limiter import key_limits

        config = parse_config(_doc(rate={"daily_reset_utc": "08:30"}), environ=ENV)
        assert config.rate.daily_reset_s == 8 * 3_600 + 30 * 60
        limits = key_limits(config.keys[0], config, AdaptiveSettings())
        assert limits.reset_offset_s == 8 * 3_600 + 30 * 60
        assert parse_config(_doc(), environ=ENV).rate.daily_reset_s == 0

    def test_missing_required_key(self) -> None:
        """A missing credential_id names keys[0].credential_id."""
        document = _doc()
        del document["keys"][0]["credential_id"]
        assert _error(document).path == "keys[0].credential_id"

    def test_creators_key_needs_version(self) -> None:
        """A Creators key without a version names keys[0].version and lists the choices."""
        document = _doc()
        del document["keys"][0]["version"]
        error = _error(document)
        assert error.path == "keys[0].version"
        assert "3.1" in error.message

    def test_duplicate_key_names(self) -> None:
        """Two keys with one name: the second is named."""
        document = _doc()
        document["keys"].append(copy.deepcopy(document["keys"][0]))
        assert _error(document).path == "keys[1].name"

    @pytest.mark.parametrize("name", ["ev\nil", "tab\there", "bell\x07", "nbsp\u00a0x", "l\u2028s"])
    def test_key_name_with_a_control_character_refused(self, name: str) -> None:
        """A key name that is not printable (a line break, a tab, a control character) is
        refused: it would split the rows of ``broker status`` and ``check-config``."""
        document = _doc()
        document["keys"][0]["name"] = name
        error = _error(document)
        assert error.path == "keys[0].name"
        assert "printable" in error.message
        document["keys"][0]["name"] = "main key 😀"
        assert parse_config(document, environ=ENV).keys[0].name == "main key 😀"

    def test_min_rate_not_below_a_keys_tps_refused(self) -> None:
        """[rate] min_rate at or above a key's tps would leave the key no room to slow down
        after a 429 (the floor is the rate): refused, naming both."""
        document = _with("rate.min_rate", 100.0)
        error = _error(document)
        assert error.path == "rate.min_rate"
        assert "keys[0].tps" in error.message
        equal = _error(_with("rate.min_rate", 1.0))  # the key's tps (its default)
        assert equal.path == "rate.min_rate"
        assert equal.message.startswith("1 is not below keys[0].tps (1): ")
        assert parse_config(_with("rate.min_rate", 0.5), environ=ENV).rate.min_rate == 0.5

    def test_unset_secret_env_names_the_variable(self) -> None:
        """With a real endpoint, an unset secret variable is an error naming the variable."""
        error = _error(_doc(), environ={})
        assert error.path == "keys[0].credential_secret_env"
        assert "ASINB_DEMO_SECRET" in error.message

    def test_simulator_endpoint_needs_no_secret(self) -> None:
        """With the embedded simulator a key may name an unset variable (the secret is built in)."""
        config = parse_config(_with("api.endpoint", "simulator"), environ={})
        assert config.keys[0].secret is None
        assert config.api.uses_simulator

    @pytest.mark.parametrize(
        ("where", "path"),
        [
            ("apii", "apii"),
            ("api.endpiont", "api.endpiont"),
            ("keys.0.tsp", "keys[0].tsp"),
            ("engine.lingr_s", "engine.lingr_s"),
            ("rate.bta", "rate.bta"),
            ("retry.attempts", "retry.attempts"),
            ("output.dir", "output.dir"),
            ("log.colour", "log.colour"),
            ("simulator.sede", "simulator.sede"),
            ("simulator.faults.error_501", "simulator.faults.error_501"),
        ],
    )
    def test_unknown_key_refused(self, where: str, path: str) -> None:
        """An unknown key (usually a typo) is refused, naming it."""
        error = _error(_with(where, 1))
        assert error.path == path
        assert "unknown" in error.message


class TestPaths:
    """Path settings: ``~`` is the home directory; a NUL is refused naming the key."""

    def test_output_directory_expands_home(self) -> None:
        """[output] directory = "~/x" is the home's x, not a folder named ~ here."""
        config = parse_config(_with("output.directory", "~/asinb-out"), environ=ENV)
        assert config.output.directory == str(Path.home() / "asinb-out")

    def test_home_of_a_user_nobody_is_refused(self) -> None:
        """~nosuchuser/x is refused naming the key, not made as a folder named ~nosuchuser."""
        error = _error(_with("output.directory", "~asinb-no-such-user/out"))
        assert error.path == "output.directory"
        assert "~asinb-no-such-user names no user" in error.message

    def test_home_of_an_empty_home_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """~/x under an empty HOME (which makes it /x, at the file system's root) is refused
        naming the key, as --out=~/x is."""
        monkeypatch.setenv("HOME", "")
        error = _error(_with("output.directory", "~/asinb-out"))
        assert error.path == "output.directory"
        assert "~ names no home folder" in error.message

    @pytest.mark.parametrize(
        ("where", "path"),
        [
            ("output.directory", "output.directory"),
            ("state.path", "state.path"),
            ("cache.path", "cache.path"),
        ],
    )
    def test_nul_in_a_path_is_a_config_error(self, where: str, path: str) -> None:
        """A path holding a NUL is refused at load, naming its key, not a traceback later."""
        error = _error(_with(where, "out\x00put"))
        assert error.path == path
        assert "NUL" in error.message

    @pytest.mark.parametrize("where", ["output.directory", "state.path", "cache.path"])
    @pytest.mark.parametrize(
        ("text", "variable"),
        [
            ("$HOME/items", "$HOME"),
            ("${XDG_STATE_HOME}/x", "${XDG_STATE_HOME}"),
            ("a/$U", "$U"),
            ("${HOME:-/tmp}/state", "${HOME:-"),
        ],
    )
    def test_shell_variable_in_a_path_is_refused(
        self, where: str, text: str, variable: str
    ) -> None:
        """A path holding $NAME or ${NAME} is refused naming the key and the variable: none
        is expanded, and a folder named "$HOME" used to be made beside the config."""
        error = _error(_with(where, text))
        assert error.path == where
        assert f"holds {variable}, but no variable is expanded" in error.message

    def test_shell_variable_in_the_secret_file_is_not_echoed(self) -> None:
        """credential_secret_file = "$HOME/x" is told as naming no file, without its value:
        the value may be a secret pasted there, and a secret may hold a $."""
        document = _doc()
        keys = document["keys"][0]
        del keys["credential_secret_env"]
        keys["credential_secret_file"] = "$HOME/demo.secret"
        error = _error(document, environ={})
        assert error.path == "keys[0].credential_secret_file"
        assert "names no file" in error.message
        assert "$HOME" not in str(error)

    @pytest.mark.parametrize("text", ["price$/out", "out$", "cost-$5/out"])
    def test_a_dollar_that_names_no_variable_is_a_path(self, text: str) -> None:
        """A $ not followed by a name is an ordinary character of a folder's name."""
        config = parse_config(_with("output.directory", text), environ=ENV)
        assert config.output.directory == text


class TestSmallMistakes:
    """Mistakes that were accepted or told confusingly."""

    def test_blank_string_says_empty(self) -> None:
        """An empty string is told as empty, not as "not a string"."""
        error = _error(_with("api.marketplace", ""))
        assert error.path == "api.marketplace"
        assert "must not be empty" in error.message

    @pytest.mark.parametrize("tag", ["", "   "])
    def test_blank_partner_tag_refused(self, tag: str) -> None:
        """A partner tag of white space is refused, naming the marketplace's entry."""
        error = _error(_with("keys.0.partner_tags", {"www.amazon.com": tag}))
        assert error.path.startswith("keys[0].partner_tags")

    @pytest.mark.parametrize("tag", ["demo 20", "demo\t20", "demo-20\u200b"])
    def test_partner_tag_with_white_space_inside_refused(self, tag: str) -> None:
        """A tag with white space or an invisible character inside (a paste error) is
        refused naming its entry; it passed check-config and failed the first lookup."""
        error = _error(_with("keys.0.partner_tags", {"www.amazon.com": tag}))
        assert error.path == "keys[0].partner_tags.www.amazon.com"
        assert "white space or a control character" in error.message

    def test_empty_resources_refused_naming_the_default(self) -> None:
        """api.resources = [] names the default to fall back on; it said "leave resources
        out for the configured ones (api.resources)", of api.resources itself."""
        error = _error(_with("api.resources", []))
        assert error.path == "api.resources"
        assert "leave resources out for the default (itemInfo.title," in error.message
        assert "configured ones" not in error.message

    def test_more_than_100_resources_refused(self) -> None:
        """api.resources of 101 names Amazon knows (repeated) is refused saying Amazon takes
        at most 100; 100 load."""
        names = [*ITEM_RESOURCES * 3][:101]
        error = _error(_with("api.resources", names))
        assert (error.path, error.message) == (
            "api.resources",
            "Amazon accepts at most 100 resources",
        )
        hundred = parse_config(_with("api.resources", names[:100]), environ=ENV)
        assert hundred.api.resources == tuple(names[:100])

    def test_partner_tag_is_stripped(self) -> None:
        """White space around a tag is dropped, as around other strings."""
        config = parse_config(_with("keys.0.partner_tags", {"US": " demo-20 "}), environ=ENV)
        assert config.keys[0].partner_tags == {"www.amazon.com": "demo-20"}

    @pytest.mark.parametrize("value", [False, True, 0.0])
    def test_tpd_of_the_wrong_type_refused(self, value: object) -> None:
        """tpd = false is not "unlimited" (0 is): a boolean or a float is refused."""
        error = _error(_with("keys.0.tpd", value))
        assert error.path == "keys[0].tpd"

    def test_undecodable_byte_offset_counts_the_byte_order_mark(self, tmp_path: Path) -> None:
        """A config with a BOM and a Latin-1 byte names that byte's offset in the file."""
        bad = tmp_path / "bad.toml"
        text = b'[api]\nmarketplace = "www.amazon.com" # caf\xe9\n'
        bad.write_bytes(b"\xef\xbb\xbf" + text)
        with pytest.raises(ConfigError) as info:
            load_config(bad, environ={})
        offset = 3 + text.index(b"\xe9")
        assert f"(byte {offset})" in info.value.message

    def test_config_with_a_byte_order_mark_loads(self, tmp_path: Path) -> None:
        """A config saved with a UTF-8 BOM (Windows Notepad) loads like one without."""
        plain = tmp_path / "plain.toml"
        plain.write_text(
            '[api]\nendpoint = "simulator"\n[[keys]]\nname = "demo"\n'
            'credential_id = "demo-id"\nversion = "3.1"\n'
            'partner_tags = { "www.amazon.com" = "demo-20" }\n'
        )
        bom = tmp_path / "bom.toml"
        bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
        assert load_config(bom, environ={}).keys == load_config(plain, environ={}).keys


def test_a_negative_tpd_says_zero_is_allowed() -> None:
    """tpd = -5 says 0 (unlimited) is allowed too; it said "must be >= 1"."""
    error = _error(_with("keys.0.tpd", -5))
    assert error.path == "keys[0].tpd"
    assert "0 (unlimited)" in error.message


@pytest.mark.parametrize(
    ("document", "path"),
    [
        ({1: {}}, ""),
        ({"engine": {1: 2}}, "engine"),
        ({"keys": [{"name": "main", 7: "x"}]}, "keys[0]"),
    ],
)
def test_a_key_that_is_no_string_is_a_config_error(document: dict[Any, Any], path: str) -> None:
    """A document in code whose table has a key that is no string is a ConfigError naming
    the table; it was a TypeError from a regular expression."""
    from broker.config import config_from_dict

    merged = {**_doc(), **document}
    if "keys" in document:
        merged["keys"] = [{**_doc()["keys"][0], **document["keys"][0]}]
    with pytest.raises(ConfigError) as info:
        config_from_dict(merged, environ=ENV)
    assert info.value.path == path
    assert "not a string" in info.value.message


@pytest.mark.parametrize("document", [None, [], "api"])
def test_a_document_that_is_no_mapping_is_a_config_error(document: object) -> None:
    """config_from_dict of None, a list or a string says the document must be a mapping;
    it was an AttributeError ('... has no attribute get')."""
    from broker.config import config_from_dict

    with pytest.raises(ConfigError, match="must be a mapping"):
        config_from_dict(document, environ=ENV)  # type: ignore[arg-type]


@pytest.mark.parametrize("tpd", [86_400_001, 10**20])
def test_a_tpd_no_key_can_send_is_refused_saying_zero_is_unlimited(tpd: int) -> None:
    """A tpd above what 1,000 TPS sends in a day (10**20, written to mean "no limit") is
    refused naming 0 for unlimited; it passed check-config, then stopped the run with
    "Integer exceeds 64-bit range" (exit 2) when the key state stored it."""
    error = _error(_with("keys.0.tpd", tpd))
    assert error.path == "keys[0].tpd"
    assert "86400000" in error.message
    assert "0 for no daily limit" in error.message


class TestSecrets:
    """Secrets live in the environment or a private file, never in config.toml."""

    @pytest.mark.parametrize(
        "field", ["credential_secret", "secret", "secret_key", "token", "password"]
    )
    def test_secret_in_file_refused(self, field: str) -> None:
        """A secret written in [[keys]] is refused, naming the env var to use, not echoing it."""
        error = _error(_with(f"keys.0.{field}", "hunter2-do-not-echo"))
        assert error.path == f"keys[0].{field}"
        assert 'credential_secret_env = "ASINB_DEMO_SECRET"' in error.message
        assert "hunter2" not in str(error)

    @pytest.mark.parametrize(
        ("table", "hint"),
        [("state", "[state] redis_password_env"), ("cache", "[cache] redis_url_env")],
    )
    def test_a_redis_password_key_names_the_variable_to_use(self, table: str, hint: str) -> None:
        """redis_password written into [state] or [cache] is refused naming where the
        variable goes, not echoed; it was a bare "unknown key"."""
        error = _error(_with(f"{table}.redis_password", "hunter2-do-not-echo"))
        assert error.path == f"{table}.redis_password"
        assert hint in error.message
        assert "hunter2" not in str(error)

    @pytest.mark.parametrize("table", ["serve", "log"])
    def test_a_secret_key_in_a_table_without_secrets_says_where_secrets_go(
        self, table: str
    ) -> None:
        """api_key written into [serve] (or [log]) is refused saying where secrets go, as in
        every other table; [serve] said only "unknown key"."""
        error = _error(_with(f"{table}.api_key", "hunter2-do-not-echo"))
        assert error.path == f"{table}.api_key"
        assert "secrets are never read from the config file" in error.message
        assert "hunter2" not in str(error)

    @pytest.mark.parametrize("backend", ["local", "memory"])
    def test_redis_password_in_the_file_refused_whatever_the_backend(self, backend: str) -> None:
        """A password in [state] redis_url is refused even while the backend does not use it,
        and not echoed."""
        document = _with("state.redis_url", "redis://:hunter2@redis.example/0")
        document["state"]["backend"] = backend
        error = _error(document)
        assert error.path == "state.redis_url"
        assert "hunter2" not in str(error)

    def test_secret_from_env(self) -> None:
        """The secret is read from the named variable and never shown in a repr."""
        config = parse_config(_doc(), environ=ENV)
        key = config.keys[0]
        assert key.secret is not None
        assert key.secret.reveal() == "s3cr3t-value"
        assert key.secret_source == "$ASINB_DEMO_SECRET"
        assert "s3cr3t-value" not in repr(config)
        assert "s3cr3t-value" not in str(key)

    @pytest.mark.parametrize("ending", ["\n", "\r\n", "  \n"])
    def test_secret_from_env_loses_its_line_ending(self, ending: str) -> None:
        """A secret variable ending in a newline (a Docker or Kubernetes secret) is read
        as the same secret from a file is, without it: else every signature is wrong."""
        config = parse_config(_doc(), environ={"ASINB_DEMO_SECRET": "s3cr3t-value" + ending})
        assert config.keys[0].secret is not None
        assert config.keys[0].secret.reveal() == "s3cr3t-value"

    def test_blank_secret_env_is_unset(self) -> None:
        """A secret variable holding only white space is refused as empty."""
        error = _error(_doc(), environ={"ASINB_DEMO_SECRET": " \n"})
        assert error.path == "keys[0].credential_secret_env"
        assert "is empty" in error.message

    def test_secret_file_private(self, tmp_path: Path) -> None:
        """A 0600 secret file next to the config is read (relative to the config's folder)."""
        secret = tmp_path / "demo.secret"
        secret.write_text("file-secret\n")
        secret.chmod(0o600)
        config_file = tmp_path / "config.toml"
        config_file.write_text(
            '[api]\nendpoint = "https://creatorsapi.example"\n'
            '[[keys]]\nname = "demo"\ncredential_id = "demo-id"\n'
            'credential_secret_file = "demo.secret"\nversion = "3.1"\n'
            'partner_tags = { "www.amazon.com" = "demo-20" }\n'
        )
        config = load_config(config_file, environ={})
        assert config.keys[0].secret is not None
        assert config.keys[0].secret.reveal() == "file-secret"

    def test_secret_file_under_home(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """credential_secret_file = "~/demo.secret" is read from the home folder, as ``~`` is
        in every path setting."""
        home = tmp_path / "home"
        home.mkdir()
        monkeypatch.setenv("HOME", str(home))
        secret = home / "demo.secret"
        secret.write_text("home-secret\n")
        secret.chmod(0o600)
        document = _doc()
        keys = document["keys"][0]
        del keys["credential_secret_env"]
        keys["credential_secret_file"] = "~/demo.secret"
        config = parse_config(document, environ={})
        assert config.keys[0].secret is not None
        assert config.keys[0].secret.reveal() == "home-secret"

    @pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
    def test_readable_secret_file_refused(self, tmp_path: Path, mode: int) -> None:
        """A secret file others can read is refused with the chmod that fixes it."""
        secret = tmp_path / "demo.secret"
        secret.write_text("file-secret")
        secret.chmod(mode)
        document = _doc()
        keys = document["keys"][0]
        del keys["credential_secret_env"]
        keys["credential_secret_file"] = str(secret)
        error = _error(document)
        assert error.path == "keys[0].credential_secret_file"
        assert "chmod 600" in error.message
        assert "file-secret" not in str(error)

    def test_a_secret_pasted_as_the_file_name_is_not_echoed(self) -> None:
        """credential_secret_file naming no file (most likely the secret pasted there) is
        refused without repeating the value."""
        document = _doc()
        keys = document["keys"][0]
        del keys["credential_secret_env"]
        keys["credential_secret_file"] = "fast-secret-XYZZY-123"
        error = _error(document)
        assert error.path == "keys[0].credential_secret_file"
        assert "no such file" in error.message.lower()
        assert "XYZZY" not in str(error)

    @pytest.mark.parametrize("pasted", ["S" * 300, "abc\x00def-XYZZY", "a/" + "Q" * 300])
    def test_a_long_or_odd_secret_pasted_as_the_file_name_is_not_echoed(self, pasted: str) -> None:
        """A value no file can have (too long, a NUL) is refused as a pasted secret too:
        a ConfigError that does not repeat it, not a traceback."""
        document = _doc()
        keys = document["keys"][0]
        del keys["credential_secret_env"]
        keys["credential_secret_file"] = pasted
        error = _error(document)
        assert error.path == "keys[0].credential_secret_file"
        assert "the value is not shown" in error.message
        assert "SSSS" not in str(error)
        assert "QQQQ" not in str(error)
        assert "XYZZY" not in str(error)

    def test_a_systemd_credential_outside_its_service_says_so(self) -> None:
        """A /run/credentials/... path missing here (a shell outside the service) is named
        as a systemd credential only its service can read, not as a pasted secret."""
        document = _doc()
        keys = document["keys"][0]
        del keys["credential_secret_env"]
        keys["credential_secret_file"] = "/run/credentials/asin-broker.service/main-secret"
        error = _error(document)
        assert "is a systemd credential, which only its service can read" in error.message
        assert "in case it is the secret itself" not in error.message

    def test_env_and_file_together_refused(self) -> None:
        """Naming both a variable and a file is ambiguous and refused."""
        error = _error(_with("keys.0.credential_secret_file", "x.secret"))
        assert error.path == "keys[0].credential_secret_file"


class TestEndpoints:
    """Credentials never travel in clear text to another machine."""

    @pytest.mark.parametrize("where", ["api.endpoint", "api.token_endpoint"])
    @pytest.mark.parametrize("url", ["http://creatorsapi.example", "http://10.0.0.5:8080"])
    def test_plain_http_to_remote_refused(self, where: str, url: str) -> None:
        """http:// to a non-loopback host is refused for the API and token endpoints."""
        error = _error(_with(where, url))
        assert error.path == where
        assert "https://" in error.message

    @pytest.mark.parametrize(
        "url", ["http://127.0.0.1:8787", "http://localhost:1", "http://[::1]:8787/"]
    )
    def test_plain_http_to_loopback_allowed(self, url: str) -> None:
        """A local simulator may be reached over http:// (the trailing slash is dropped)."""
        config = parse_config(_with("api.endpoint", url), environ=ENV)
        assert config.api.endpoint == url.rstrip("/")

    @pytest.mark.parametrize("where", ["api.endpoint", "api.token_endpoint"])
    @pytest.mark.parametrize(
        "url",
        [
            "https://example.com:99999",
            "https://example.com:-1",
            "https://example.com:abc",
            "http://127.0.0.1:99999",
            "https://exa mple.com",
            "http://127.0.0.1:0",
        ],
    )
    def test_unusable_host_or_port_refused(self, where: str, url: str) -> None:
        """A port outside 1..65535 or not a number, or a host with a space, is a config
        error naming the key, not a traceback nor an outage at run time."""
        error = _error(_with(where, url))
        assert error.path == where

    @pytest.mark.parametrize("value", ["amazon", "simulator", "not a url"])
    def test_a_token_endpoint_that_is_no_url_is_told_it_takes_a_url_only(self, value: str) -> None:
        """api.token_endpoint takes a URL only, and its refusal says so (and to leave it out
        for Amazon's own): it listed "simulator" and "amazon" as allowed, api.endpoint's
        wording, while refusing them."""
        error = _error(_with("api.token_endpoint", value))
        assert error.path == "api.token_endpoint"
        assert '"amazon"' not in error.message
        assert '"simulator"' not in error.message
        assert "an http(s) URL" in error.message
        assert "leave it out for Amazon's own" in error.message

    def test_the_embedded_simulator_with_a_token_endpoint_is_refused(self) -> None:
        """endpoint = "simulator" with api.token_endpoint set is refused naming the setting:
        the embedded simulator accepts only the tokens it issues, and the demo key's secret
        went to that other server (a lookup then failed, credentials rejected)."""
        document = _with("api.endpoint", "simulator")
        document["api"]["token_endpoint"] = "https://tokens.example"
        error = _error(document)
        assert error.path == "api.token_endpoint"
        assert "issues its own tokens" in error.message

    def test_credentials_in_url_refused(self) -> None:
        """A URL carrying user:password is refused."""
        error = _error(_with("api.endpoint", "https://user:pw@creatorsapi.example"))
        assert error.path == "api.endpoint"
        assert "pw@" not in error.message

    @pytest.mark.parametrize("where", ["api.endpoint", "api.token_endpoint"])
    @pytest.mark.parametrize(
        ("url", "password"),
        [
            ("https://user:s3cr/et@host.example", "s3cr/et"),
            ("https://user:se#cret@[::1", "se#cret"),
            ("ftp://user:s3cr/et@host.example", "s3cr/et"),
            ("http://user:p%40ss:w@127.0.0.1:8787", "p%40ss:w"),
            ("https://tok3n@host.example/path", "tok3n"),
        ],
    )
    def test_any_user_info_refused_and_masked(self, where: str, url: str, password: str) -> None:
        """K5: a URL with user info is refused as carrying credentials; the secret shows as ***."""
        error = _error(_with(where, url))
        assert error.path == where
        assert "must not carry credentials" in error.message
        assert password not in str(error)
        assert "***@" in error.message

    def test_query_string_refused(self) -> None:
        """A query string could carry a token: refused, and not echoed."""
        error = _error(_with("api.endpoint", "https://host.example/?api_key=abc123"))
        assert "query string" in error.message
        assert "abc123" not in str(error)


def _readme_defaults() -> dict[tuple[str, str], str]:
    """The README's configuration table (table | key | default | meaning) as {(table, key):
    default as written}; a row naming several keys gives each the default at its place."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index("| table | key | default | meaning |") + 2
    stated: dict[tuple[str, str], str] = {}
    table = ""
    for line in itertools.takewhile(lambda row: row.startswith("|"), lines[start:]):
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        table = cells[0].strip("`") or table
        keys = [key.strip("`") for key in cells[1].split(", ")]
        values = cells[2].split(", ")
        if len(keys) == len(values):
            stated.update({(table, key): value for key, value in zip(keys, values, strict=True)})
    return stated


class TestDefaults:
    """Defaults and normalisation."""

    def test_shipped_config_loads(self) -> None:
        """The shipped config.toml loads with an empty environment (it targets the simulator)."""
        config = load_config(REPO / "config.toml", environ={})
        assert config.api.protocol is Protocol.CREATORS
        assert config.api.uses_simulator
        assert [key.name for key in config.keys] == ["demo"]
        assert config.keys[0].partner_tags == {"www.amazon.com": "demo-20"}
        assert config.source.endswith("config.toml")

    def test_paapi_key_needs_no_version(self) -> None:
        """A PA-API key has no credential version."""
        document = _with("api.protocol", "paapi5")
        del document["keys"][0]["version"]
        config = parse_config(document, environ=ENV)
        assert config.api.protocol is Protocol.PAAPI5
        assert config.keys[0].version is None

    @pytest.mark.parametrize(
        ("credential", "said"),
        [
            (
                "AKIAEXAMPLEKEY123456,wJalrXUtnFEMI/K7MDENG",
                "holds ',' (a PA-API access key is letters and digits only) at character 21, "
                "after 'AKIAEXAMPLEKEY123456'",
            ),
            ("AKIA/EXAMPLE", "holds '/' (a PA-API access key is letters and digits only)"),
            (
                "amzn1.application-oa2-client.abc",
                'a Creators API credential id, but api.protocol = "paapi5" applies to every key',
            ),
            ("AKIAEXAMPLE\u0007", "holds a space, line break or control character at character"),
            ("AKIA\twJalrXUtnFEMI", "holds a space, line break or control character"),
        ],
    )
    def test_a_paapi_access_key_no_request_could_carry_is_refused(
        self, credential: str, said: str
    ) -> None:
        """A PA-API access key pasted with a comma, a slash, a space or a control character,
        or a Creators id under paapi5, is refused naming the key, the character and where,
        never what follows it (a secret pasted in the same line): the comma made every
        signature IncompleteSignature (which condemned the good keys too), the control
        character crashed each batch of the key (its rows failed as ValueError)."""
        document = _with("api.protocol", "paapi5")
        del document["keys"][0]["version"]
        document["keys"][0]["credential_id"] = credential
        error = _error(document)
        assert error.path == "keys[0].credential_id"
        assert said in error.message
        # What follows the bad character may be the secret, pasted in the same line.
        assert "wJalr" not in str(error)

    def test_a_creators_id_with_a_control_character_is_refused(self) -> None:
        """A Creators credential id holding a control character, or a comma (a CSV line
        pasted whole, its secret after it), is refused naming the key; one as Amazon issues
        it (dots and dashes) loads."""
        error = _error(_with("keys.0.credential_id", "amzn1.application-oa2-client.a\tb"))
        assert error.path == "keys[0].credential_id"
        assert "control character" in error.message
        good = _with("keys.0.credential_id", "amzn1.application-oa2-client.0123abcd")
        assert parse_config(good, environ=ENV).keys[0].credential_id.endswith("0123abcd")
        # A line of the credentials CSV pasted whole: refused, the secret not shown.
        pasted = _with("keys.0.credential_id", "amzn1.application-oa2-client.0123,s3cretVALUE")
        error = _error(pasted)
        assert "holds ',' (a credential id is letters, digits, '.', '-' and '_')" in error.message
        assert "s3cret" not in str(error)

    @pytest.mark.parametrize(
        ("protocol", "credential", "said"),
        [
            (
                "creators",
                "amzn1.oa2-cs.v1.9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a3928",
                "looks like a Login with Amazon client secret",
            ),
            (
                "creators",
                "1a2b3c4d5e6f7g8h9i0j1k2l3m4n5o6p7q8r9s0t1u2v3w4x5y6z",
                "looks like a Creators 2.x (Cognito) client secret",
            ),
            ("paapi5", "wJalrXUtnFEMIK7MDENGbPxRfiCY/EXAMPLEKEY", "looks like a PA-API secret key"),
            (
                "paapi5",
                "wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEKEYz",
                "looks like a PA-API secret key",
            ),
            (
                "paapi5",
                "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                "looks like a PA-API secret key",
            ),
            ("paapi5", "wJalrXUtnFEMIK7MDENG/bPxRfiCY", "holds '/' (a PA-API access"),
        ],
    )
    def test_a_secret_in_the_id_field_is_refused_unshown(
        self, protocol: str, credential: str, said: str
    ) -> None:
        """The id and the secret swapped: a Login with Amazon secret or a PA-API secret key
        in ``credential_id`` is refused, and none of it is shown (the LWA one loaded and
        ``check-config`` printed it whole; a PA-API one showed its first 28 characters)."""
        document = _with("api.protocol", protocol)
        if protocol == "paapi5":
            del document["keys"][0]["version"]
        document["keys"][0]["credential_id"] = credential
        error = _error(document)
        assert error.path == "keys[0].credential_id"
        assert said in error.message
        assert credential[12:20] not in str(error)

    def test_engine_rate_and_retry_defaults_are_the_readmes(self) -> None:
        """A minimal config gets max_in_flight 4, max_attempts 6, linger_s 0.05,
        request_timeout_s 30 and tpd_guard 0.99, the defaults the README's table states."""
        config = parse_config(_doc(), environ=ENV)
        assert config.keys[0].max_in_flight == 4
        assert config.retry.max_attempts == 6
        assert config.engine.linger_s == 0.05
        assert config.engine.request_timeout_s == 30.0
        assert config.rate.tpd_guard == 0.99
        stated = _readme_defaults()
        assert stated["[[keys]]", "max_in_flight"] == "4"
        assert stated["[retry]", "max_attempts"] == "6"
        assert stated["[engine]", "linger_s"] == "0.05"
        assert stated["[engine]", "request_timeout_s"] == "30"
        assert stated["[rate]", "tpd_guard"] == "0.99"

    def test_tpd_zero_means_unlimited(self) -> None:
        """tpd = 0 is unlimited; an absent tpd is PA-API's starting 8640."""
        assert parse_config(_with("keys.0.tpd", 0), environ=ENV).keys[0].tpd is None
        assert parse_config(_doc(), environ=ENV).keys[0].tpd == 8640

    def test_marketplace_aliases_canonical(self) -> None:
        """Marketplaces given as a code or domain are stored under their canonical name."""
        document = _with("keys.0.partner_tags", {"DE": "demo-22", "amazon.co.uk": "demo-21"})
        document["api"]["marketplace"] = "de"
        config = parse_config(document, environ=ENV)
        assert config.api.marketplace == "www.amazon.de"
        assert set(config.keys[0].partner_tags) == {"www.amazon.de", "www.amazon.co.uk"}

    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing config file is a ConfigError naming the file."""
        with pytest.raises(ConfigError, match="not found"):
            load_config(tmp_path / "nope.toml", environ={})

    @pytest.mark.parametrize(
        ("line", "hint"),
        [
            ("daily_reset_utc = 08:00", ': write it in quotes (daily_reset_utc = "08:00")'),
            # Two digits of hour, as the key takes it: "8:00" would be refused next.
            (
                "daily_reset_utc = 8:00  # Pacific",
                ': write it in quotes (daily_reset_utc = "08:00")',
            ),
            ("tps = 1.5.2", ""),
            ("tps = 1:30", ""),  # not a time key: quoting it would not mend it
        ],
    )
    def test_a_bare_time_without_seconds_is_told_to_be_quoted(
        self, tmp_path: Path, line: str, hint: str
    ) -> None:
        """``daily_reset_utc = 08:00`` (no seconds: not TOML) says to write it in quotes; it
        was a bare parse error, while ``08:00:00`` parsed and got the hint."""
        bad = tmp_path / "config.toml"
        bad.write_text(f"[rate]\n{line}\n")
        with pytest.raises(ConfigError) as info:
            load_config(bad, environ={})
        assert "(at line 2, column" in info.value.message
        assert info.value.message.endswith(f"){hint}")

    def test_bad_toml(self, tmp_path: Path) -> None:
        """A file that is not TOML is a ConfigError, not a tomllib exception."""
        bad = tmp_path / "config.toml"
        bad.write_text("[api\n")
        with pytest.raises(ConfigError, match="not valid TOML"):
            load_config(bad, environ={})

    @pytest.mark.parametrize(
        "data", [b'[api]\nprotocol = "creators"\n# caf\xe9\n', "[api]\n".encode("utf-16")]
    )
    def test_config_not_utf8(self, tmp_path: Path, data: bytes) -> None:
        """A Latin-1 comment or a UTF-16 file is a ConfigError saying so, not a traceback."""
        bad = tmp_path / "config.toml"
        bad.write_bytes(data)
        with pytest.raises(ConfigError, match="not UTF-8"):
            load_config(bad, environ={})

    def test_environ_defaults_to_os_environ(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without an environ mapping the loader reads os.environ."""
        monkeypatch.setenv("ASINB_DEMO_SECRET", "from-os")
        file = tmp_path / "config.toml"
        file.write_text(
            '[api]\nendpoint = "https://creatorsapi.example"\n[[keys]]\nname = "demo"\n'
            'credential_id = "demo-id"\ncredential_secret_env = "ASINB_DEMO_SECRET"\n'
            'version = "3.1"\npartner_tags = { "www.amazon.com" = "demo-20" }\n'
        )
        secret = load_config(file).keys[0].secret
        assert secret is not None
        assert secret.reveal() == os.environ["ASINB_DEMO_SECRET"]


@pytest.mark.parametrize("table", ["cache", "state"])
def test_redis_backend_without_redis_py_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, table: str
) -> None:
    """backend = "redis" without redis-py installed fails at load, naming the extra to install."""
    import broker.config

    monkeypatch.setattr(broker.config, "_redis_installed", lambda: False)
    redis = {"backend": "redis", "redis_url": "redis://127.0.0.1:6379/0"}
    error = _error(_doc(**{table: redis}))
    assert error.path == f"{table}.backend"
    assert "asin-broker[redis]" in str(error)


@pytest.mark.parametrize("table", ["cache", "state"])
@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:abc/0",
        "redis://127.0.0.1:99999/0",
        "redis://127.0.0.1:6379/0?socket_timeout=abc",
        "redis://:hunter2#x@127.0.0.1:6379/0",
        "redis://:hunt'er2#x@127.0.0.1:6379/0",
        "redis://:hunter2[x@127.0.0.1/0",
    ],
)
def test_a_redis_url_redis_py_cannot_read_is_a_config_error(table: str, url: str) -> None:
    """A Redis URL with a port that is no number or out of range, or a bad option, is
    refused at load naming its field (exit 78), never repeating a password a '#' cut out
    of the address; check-config said ok, and every command then failed with a traceback
    or "internal error"."""
    error = _error(_doc(**{table: {"backend": "redis", "redis_url": url}}))
    assert error.path == f"{table}.redis_url"
    assert "redis-py cannot read the URL" in error.message
    assert "er2" not in str(error)


@pytest.mark.parametrize("table", ["cache", "state"])
@pytest.mark.parametrize(
    ("url", "option"),
    [
        ("redis://127.0.0.1:6390/0?socket_timout=5", "'socket_timout'"),
        ("redis://127.0.0.1:6390/0?ssl_cert_reqs=none", "'ssl_cert_reqs'"),
        # Values redis-py cannot use: each a traceback at load (exit 1) in the first version.
        ("rediss://127.0.0.1:6390/0?ssl_cert_reqs=CERT_NONE", None),
        ("redis://127.0.0.1:6390/0?protocol=4", None),
        ("redis://127.0.0.1:6390/0?max_connections=-1", None),
        ("redis://127.0.0.1:6390/0?retry=1", None),
    ],
)
def test_a_redis_url_option_no_connection_takes_is_a_config_error(
    table: str, url: str, option: str | None
) -> None:
    """An option after '?' that a connection does not take (a misspelt one, an ssl_* one
    on redis://) is refused at load naming its field, for the key state as for the cache;
    the key state's passed check-config, then stopped a run with exit 2 or a traceback."""
    pytest.importorskip("redis")
    error = _error(_doc(**{table: {"backend": "redis", "redis_url": url}}))
    assert error.path == f"{table}.redis_url"
    if option is None:
        assert "has a value redis-py cannot use" in error.message
    else:
        assert f"carries {option}" in error.message
        assert "rediss://" in error.message


@pytest.mark.parametrize("table", ["cache", "state"])
@pytest.mark.parametrize("path", ["/db1", "/1x", "/abc", "/0/1"])
def test_a_redis_url_whose_database_is_no_number_is_a_config_error(table: str, path: str) -> None:
    """A database that is no number (``/db1``) is refused naming its field: redis-py read it
    as database 0 while ``broker status`` showed ``db1``, so a machine configured ``/1``
    never shared the key with it."""
    error = _error(
        _doc(**{table: {"backend": "redis", "redis_url": f"redis://127.0.0.1:6379{path}"}})
    )
    assert error.path == f"{table}.redis_url"
    assert "database" in error.message
    for good in ("", "/", "/0", "/15"):
        config = _doc(**{table: {"backend": "redis", "redis_url": f"redis://127.0.0.1:6379{good}"}})
        parse_config(config, environ=ENV)


@pytest.mark.parametrize(
    ("protocol", "endpoint"),
    [("paapi5", "https://creatorsapi.amazon"), ("creators", "https://webservices.amazon.com")],
)
def test_the_other_protocols_amazon_endpoint_is_refused(protocol: str, endpoint: str) -> None:
    """Amazon's endpoint of the other protocol, kept when a config changes protocol: refused,
    saying to use "amazon"; it was taken as a base URL, sent this protocol's requests (and a
    Creators token's) to the other API's host."""
    document = _with("api.endpoint", endpoint)
    document["api"]["protocol"] = protocol
    if protocol == "paapi5":
        del document["keys"][0]["version"]
    with pytest.raises(ConfigError, match='use endpoint = "amazon"') as info:
        parse_config(document, environ=ENV)
    assert info.value.path == "api.endpoint"


def test_creators_settings_under_paapi5_are_refused() -> None:
    """A key's version or api.token_endpoint under protocol = "paapi5" (a Creators config
    half moved, or a Creators key in a PA-API config): refused, naming the setting; they were
    dropped without a word, the key failing at the first request."""
    document = _with("api.protocol", "paapi5")
    with pytest.raises(ConfigError, match=r"a PA-API 5\.0 access key has none") as info:
        parse_config(document, environ=ENV)
    assert info.value.path == "keys[0].version"
    del document["keys"][0]["version"]
    document["api"]["token_endpoint"] = "https://api.amazon.com/auth/o2/token"
    with pytest.raises(ConfigError, match="asks for no token") as info:
        parse_config(document, environ=ENV)
    assert info.value.path == "api.token_endpoint"


@pytest.mark.parametrize(
    ("protocol", "endpoint", "expected"),
    [
        ("creators", "https://creatorsapi.amazon", "amazon"),
        ("creators", "HTTPS://CreatorsAPI.Amazon/", "amazon"),
        ("paapi5", "https://webservices.amazon.de", "amazon"),
        (
            "creators",
            "https://creatorsapi.amazon.example.com",
            "https://creatorsapi.amazon.example.com",
        ),
        ("creators", "https://creatorsapi.amazon/v2", "https://creatorsapi.amazon/v2"),
        ("creators", "https://creatorsapi.amazon:8443", "https://creatorsapi.amazon:8443"),
    ],
)
def test_amazons_own_url_is_the_amazon_endpoint(
    protocol: str, endpoint: str, expected: str
) -> None:
    """Amazon's own API named by its URL is endpoint "amazon": one key identity in the shared
    state and one cache namespace with configs saying "amazon", and Amazon's token endpoint
    and per-marketplace hosts; any other URL stays as given."""
    document = _with("api.endpoint", endpoint)
    document["api"]["protocol"] = protocol
    if protocol == "paapi5":
        del document["keys"][0]["version"]
    config = parse_config(document, environ=ENV)
    assert config.api.endpoint == expected


@pytest.mark.parametrize(
    ("table", "given"),
    [
        ("state", {"redis_url": "redis://127.0.0.1:6379/0"}),
        ("state", {"redis_url": "redis://127.0.0.1:6379/0", "redis_password_env": "RPW"}),
        ("state", {"redis_password_env": "RPW"}),
        ("cache", {"redis_url": "redis://127.0.0.1:6379/0"}),
        ("cache", {"redis_url_env": "ASINB_REDIS_URL"}),
    ],
)
def test_redis_settings_without_a_backend_are_a_config_error(
    table: str, given: dict[str, str]
) -> None:
    """A [state] or [cache] with Redis settings and no backend (config.toml's commented
    lines uncommented but the backend line) is refused naming backend = "redis": it ran on
    this machine's own file, so two machines each spent the key's whole rate and quota."""
    error = _error(_doc(**{table: given}))
    assert error.path == f"{table}.backend"
    assert 'backend = "redis"' in error.message
    if table == "cache":
        # A cache on this machine's file beside unused Redis lines (the starter's [cache]
        # block uncommented) costs nothing but hits elsewhere.
        parse_config(_doc(cache={**given, "backend": "sqlite"}), environ={**ENV, "RPW": "pw"})
        return
    # The starter's [state] block uncommented whole: each machine spent the key's whole
    # rate and quota on its own file, silently.
    for backend in ("local", "memory"):
        error = _error(_doc(state={**given, "backend": backend}))
        assert error.path == "state.backend"
        assert "would go unused" in error.message


def _file_names_in(monkeypatch: pytest.MonkeyPatch, encoding: str) -> None:
    """Make Python name files in ``encoding`` (as a locale without UTF-8 mode does)."""
    monkeypatch.setattr(
        os, "fsencode", lambda text: os.fspath(text).encode(encoding, "surrogateescape")
    )
    monkeypatch.setattr(os, "fsdecode", lambda raw: raw.decode(encoding, "surrogateescape"))


@pytest.mark.parametrize(
    ("encoding", "named"), [("latin-1", "\u00e9tat"), ("ascii", "\udcc3\udca9tat")]
)
def test_a_config_path_is_named_as_the_file_name_encoding_can(
    monkeypatch: pytest.MonkeyPatch, encoding: str, named: str
) -> None:
    """``[cache] path = "état/..."`` stays itself where file names hold é (a Latin-1
    locale: the folder an older version made is found again), and is named by its UTF-8
    bytes where they cannot (ASCII), instead of an encoding error."""
    document = _doc(cache={"path": "/srv/\u00e9tat/cache.sqlite3"})
    _file_names_in(monkeypatch, encoding)
    config = parse_config(document, environ=ENV)
    assert str(config.cache.path) == f"/srv/{named}/cache.sqlite3"


@pytest.mark.parametrize("table", ["cache", "state"])
def test_a_sqlite_path_no_file_can_have_is_a_config_error(table: str, tmp_path: Path) -> None:
    """A ``[cache]`` or ``[state]`` path with a folder name over 255 bytes, or through a
    loop of symbolic links, is refused naming the setting (exit 78; the first was a
    traceback, the second passed check-config and then failed as "a file, not a
    directory")."""
    (tmp_path / "l1").symlink_to("l2")
    (tmp_path / "l2").symlink_to("l1")
    for raw, reason in (
        ("k" * 300 + "/file.sqlite3", "File name too long"),
        (f"{tmp_path}/l1/file.sqlite3", "Too many levels of symbolic links"),
    ):
        with pytest.raises(ConfigError, match=rf"{table}\.path: .*file\.sqlite3: {reason}"):
            parse_config(_doc(**{table: {"path": raw}}), environ=ENV)
