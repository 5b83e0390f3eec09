"""Marketplace names in job rows and ``broker lookup --marketplace`` (N2, issue 11)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker import cli
from broker.exitcode import ExitCode

_CONFIG = """
[api]
endpoint = "simulator"
marketplace = "www.amazon.com"

[[keys]]
name = "demo"
credential_id = "demo-id"
version = "3.1"
partner_tags = { "www.amazon.com" = "demo-20", "www.amazon.co.uk" = "demo-21" }
tps = 50.0
tpd = 0

[log]
format = "json"

[simulator]
seed = 3
"""


def _config(tmp_path: Path, text: str = _CONFIG) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def _rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class TestJobRows:
    def test_failed_rows_are_counted_by_cause_with_the_fix_first(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Rows failed for a store no key has a tag for: the run says how many failed for
        what, and a rerun of the complete job says to add the tag before --new-job; it said
        only "1 failed", and that --new-job asks Amazon again (they never went out)."""
        job = tmp_path / "nk.csv"
        job.write_text("asin,marketplace\nB0C1234567,US\nB0E1111111,DE\nB0E1111112,DE\n")
        argv = ["run", str(job), "--config", str(_config(tmp_path))]
        argv += ["--out", str(tmp_path / "out.jsonl"), "--progress", "none"]
        assert cli.main(argv) == ExitCode.SOME_FAILED
        err = capsys.readouterr().err
        assert "failed: 2 NoKeyForMarketplace (www.amazon.de)" in err
        assert cli.main(argv) == ExitCode.SOME_FAILED
        err = capsys.readouterr().err
        assert "add a partner tag for www.amazon.de to a key" in err
        # A tag added starts the item cache afresh (the tags are in its namespace).
        assert "then --new-job fetches every row again." in err

    def test_a_rerun_after_the_tag_was_added_does_not_ask_for_it_again(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Rerun with the partner tag the first run asked for now in the config, a complete
        job says a key has it and --new-job sends those rows; it asked again to add the tag
        no key had, which the user had just done."""
        job = tmp_path / "nk.csv"
        job.write_text("asin,marketplace\nB0C1234567,US\nB0E1111111,DE\nB0E1111112,DE\n")
        argv = ["run", str(job), "--out", str(tmp_path / "out.jsonl"), "--progress", "none"]
        assert cli.main([*argv, "--config", str(_config(tmp_path))]) == ExitCode.SOME_FAILED
        capsys.readouterr()
        tagged = _CONFIG.replace('"www.amazon.co.uk" = "demo-21"', '"DE" = "demo-22"')
        config = tmp_path / "tagged.toml"
        config.write_text(tagged)
        assert cli.main([*argv, "--config", str(config)]) == ExitCode.SOME_FAILED
        err = capsys.readouterr().err
        assert "add a partner tag" not in err
        assert "a key now has a partner tag for www.amazon.de" in err
        assert "--new-job fetches every row again" in err

    def test_a_rerun_with_one_of_two_missing_tags_added_says_both(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """With DE's tag added and FR's still missing, a rerun says to add FR's and that
        DE's is there, as two clauses before what --new-job does; the two ran together."""
        job = tmp_path / "nk.csv"
        job.write_text("asin,marketplace\nB0C1234567,US\nB0E1111111,DE\nB0E1111112,FR\n")
        argv = ["run", str(job), "--out", str(tmp_path / "out.jsonl"), "--progress", "none"]
        assert cli.main([*argv, "--config", str(_config(tmp_path))]) == ExitCode.SOME_FAILED
        capsys.readouterr()
        config = tmp_path / "tagged.toml"
        config.write_text(_CONFIG.replace('"www.amazon.co.uk" = "demo-21"', '"DE" = "demo-22"'))
        assert cli.main([*argv, "--config", str(config)]) == ExitCode.SOME_FAILED
        assert (
            "2 rows failed: add a partner tag for www.amazon.fr to a key (no key has one, so "
            "those rows were never sent); a key now has a partner tag for www.amazon.de (those "
            "rows were never sent), then --new-job fetches every row again."
        ) in " ".join(capsys.readouterr().err.split())

    @pytest.mark.parametrize("cache", ["on", "off"])
    def test_a_rerun_says_what_new_job_would_ask_amazon_for(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], cache: str
    ) -> None:
        """A rerun of a finished job with failed rows says --new-job fetches the failed and
        not-found rows, the item cache answering the rest; without an item cache, every row.
        It said "for them only" in both cases, and the hunt's --new-job sent 370 requests."""
        faults = "\n[retry]\nmax_attempts = 1\n\n[simulator.faults]\nerror_500 = 1.0\n"
        config = _config(tmp_path, _CONFIG + faults)
        job = tmp_path / "j.txt"
        job.write_text("".join(f"B0C12345{i:02d}\n" for i in range(8)))
        argv = ["run", str(job), "--config", str(config), "--out", str(tmp_path / "out.jsonl")]
        argv += ["--progress", "none", *(["--no-cache"] if cache == "off" else [])]
        assert cli.main(argv) == ExitCode.SOME_FAILED
        capsys.readouterr()
        assert cli.main(argv) == ExitCode.SOME_FAILED
        err = capsys.readouterr().err
        assert "8 rows failed: --new-job fetches" in err
        if cache == "on":
            assert "the item cache answering every row it holds an ok answer for" in err
            assert "the failed and not-found rows go to Amazon" in err
        else:
            assert "failed: --new-job fetches every row again." in err

    def test_every_spelling_runs_and_bad_rows_do_not_stop_the_job(self, tmp_path: Path) -> None:
        """US, amazon.com, default, UK: ok; an unserved store failed, unknown invalid; exit 3."""
        job = tmp_path / "mk.csv"
        job.write_text(
            "asin,marketplace\n"
            "B0C1234567,US\n"
            "B0C1234568,amazon.com\n"
            "B0C1234569,\n"
            "B0D7654321,amazon.co.uk\n"
            "B0D7654322,uk\n"
            "B0E1111111,DE\n"
            "B0F2222222,amazon.moon\n"
        )
        out = tmp_path / "out.jsonl"
        code = cli.main(
            [
                "run",
                str(job),
                "--config",
                str(_config(tmp_path)),
                "--out",
                str(out),
                "--progress",
                "none",
            ]
        )
        assert code == ExitCode.SOME_FAILED
        rows = {row["line"]: row for row in _rows(out)}
        assert len(rows) == 7
        markets = [rows[n]["marketplace"] for n in range(2, 9)]
        assert markets[:5] == ["www.amazon.com"] * 3 + ["www.amazon.co.uk"] * 2
        assert {rows[n]["status"] for n in range(2, 7)} <= {"ok", "not_found"}
        unserved = rows[7]
        assert unserved["status"] == "failed"
        assert unserved["marketplace"] == "www.amazon.de"
        error = unserved["error"]
        assert isinstance(error, dict)
        assert error["code"] == "NoKeyForMarketplace"
        assert '"www.amazon.de" = "your-tracking-id"' in error["remedy"]
        assert unserved["attempts"] == 0
        unknown = rows[8]
        assert unknown["status"] == "invalid"
        assert isinstance(unknown["error"], dict)
        assert unknown["error"]["code"] == "UnknownMarketplace"
        assert "amazon.moon" in unknown["error"]["message"]
        assert "its domain (amazon.co.uk)" in unknown["error"]["message"]

    def test_alias_row_same_store_as_canonical(self, tmp_path: Path) -> None:
        """N2: a row for amazon.co.uk finishes ok like www.amazon.co.uk (was exit 77, 0 rows)."""
        job = tmp_path / "mk.csv"
        job.write_text(
            "asin,marketplace\nB0C1234567,www.amazon.com\nB0D7654321,amazon.co.uk\n"
            "B0E1111111,www.amazon.com\n"
        )
        out = tmp_path / "mk.jsonl"
        code = cli.main(
            [
                "run",
                str(job),
                "--config",
                str(_config(tmp_path)),
                "--out",
                str(out),
                "--progress",
                "none",
            ]
        )
        assert code == ExitCode.OK
        rows = sorted(_rows(out), key=lambda row: str(row["line"]))
        assert [row["marketplace"] for row in rows] == [
            "www.amazon.com",
            "www.amazon.co.uk",
            "www.amazon.com",
        ]

    def test_strict_refuses_an_unknown_marketplace(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--strict counts a row for no Amazon store as invalid and refuses the file, saying
        how a marketplace is named (a row's reason was the name alone: "Germany")."""
        job = tmp_path / "mk.csv"
        job.write_text("asin,marketplace\nB0C1234567,UK\nB0D7654321,amazon.moon\n")
        out = tmp_path / "mk.jsonl"
        code = cli.main(
            ["run", str(job), "--config", str(_config(tmp_path)), "--out", str(out), "--strict"]
        )
        assert code == ExitCode.DATA_ERROR
        err = capsys.readouterr().err
        assert "line 3: unknown marketplace 'amazon.moon'; name it by its code (UK)" in err
        assert not out.exists()


class TestLookup:
    @pytest.mark.parametrize("name", ["UK", "uk", "amazon.co.uk", "www.amazon.co.uk"])
    def test_marketplace_flag_takes_config_names(
        self, tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """N2: ``lookup --marketplace UK`` is the UK store (was exit 77 InvalidPartnerTag)."""
        config = _config(tmp_path)
        code = cli.main(["lookup", "B0C1234567", "--config", str(config), "--marketplace", name])
        assert code == ExitCode.OK
        [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert row["marketplace"] == "www.amazon.co.uk"
        assert row["status"] == "ok"

    def test_unknown_marketplace_is_a_usage_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An unknown --marketplace is refused before any request, naming it."""
        config = _config(tmp_path)
        code = cli.main(["lookup", "B0C1234567", "--config", str(config), "--marketplace", "xx"])
        assert code == ExitCode.USAGE
        assert "unknown marketplace 'xx'" in capsys.readouterr().err

    def test_unserved_marketplace_is_a_failed_row(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A marketplace no key serves gives a failed row naming the config line, exit 3."""
        config = _config(tmp_path)
        code = cli.main(["lookup", "B0C1234567", "--config", str(config), "--marketplace", "DE"])
        assert code == ExitCode.SOME_FAILED
        [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert row["status"] == "failed"
        assert row["error"]["code"] == "NoKeyForMarketplace"


class TestCheckConfig:
    def test_warns_when_default_marketplace_has_no_key(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """check-config says when no key has a partner tag for the default marketplace."""
        config = _config(
            tmp_path, _CONFIG.replace('marketplace = "www.amazon.com"', 'marketplace = "DE"')
        )
        assert cli.main(["check-config", "--config", str(config)]) == ExitCode.OK
        err = capsys.readouterr().err
        assert "warning" in err
        assert "www.amazon.de" in err

    def test_warns_of_one_whole_token_url_for_both_credential_families(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A whole token URL (its path ends in /token) is used for every key, but 2.x and
        3.x keys take tokens from different servers: check-config names the keys the URL
        cannot serve; a base URL, or keys of one family, draw no warning. It said nothing,
        and the run took a correct 2.1 key out, blaming its version."""
        monkeypatch.setenv("ASINB_SECRET", "s")
        text = (
            '[api]\nendpoint = "http://127.0.0.1:9"\n'
            'token_endpoint = "http://127.0.0.1:9/auth/o2/token"\n'
            'marketplace = "www.amazon.com"\n'
        )
        for name, version in (("lwa", "3.1"), ("cognito", "2.1")):
            text += (
                f'[[keys]]\nname = "{name}"\ncredential_id = "{name}-id"\n'
                f'credential_secret_env = "ASINB_SECRET"\nversion = "{version}"\n'
                'partner_tags = { "www.amazon.com" = "demo-20" }\n'
            )
        assert cli.main(["check-config", "--config", str(_config(tmp_path, text))]) == 0
        err = capsys.readouterr().err
        assert "api.token_endpoint" in err
        assert "key cognito (2.1)" in err
        assert "key lwa" not in err
        base = text.replace("/auth/o2/token", "")
        assert cli.main(["check-config", "--config", str(_config(tmp_path, base))]) == 0
        assert "token_endpoint" not in capsys.readouterr().err
        one_family = text.replace('version = "2.1"', 'version = "3.1"')
        assert cli.main(["check-config", "--config", str(_config(tmp_path, one_family))]) == 0
        assert "token_endpoint" not in capsys.readouterr().err
        other_family = text.replace('version = "3.1"', 'version = "2.2"')
        assert cli.main(["check-config", "--config", str(_config(tmp_path, other_family))]) == 0
        err = capsys.readouterr().err
        assert "key lwa (2.2), key cognito (2.1) will be refused" in err

    def test_warns_of_tags_outside_the_credential_versions_region(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Against Amazon, a 3.1 (North America) key tagged for the UK: Amazon refuses its
        UK requests (InvalidIssuer) and with them the key everywhere, so check-config says
        so, naming the key, its region and the marketplace; a key of the UK's region is not
        named, and neither is the simulator's demo key (its accounts serve every region)."""
        monkeypatch.setenv("ASINB_REAL_SECRET", "s")
        real = _CONFIG.replace('endpoint = "simulator"', 'endpoint = "amazon"').replace(
            'version = "3.1"', 'version = "3.1"\ncredential_secret_env = "ASINB_REAL_SECRET"'
        )
        assert cli.main(["check-config", "--config", str(_config(tmp_path, real))]) == 0
        err = capsys.readouterr().err
        assert "key demo: credential version 3.1 is for the NA region" in err
        assert "www.amazon.co.uk is not" in err
        eu = real.replace('version = "3.1"', 'version = "3.2"').replace(
            '"www.amazon.com" = "demo-20", ', ""
        )
        assert cli.main(["check-config", "--config", str(_config(tmp_path, eu))]) == 0
        assert "region" not in capsys.readouterr().err
        assert cli.main(["check-config", "--config", str(_config(tmp_path))]) == 0
        assert "region" not in capsys.readouterr().err

    def test_no_region_warning_for_a_simulator_on_this_machine(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A `broker simulate` on a loopback port (the README's recipe for `broker status`,
        with the starter's UK tag on the 3.1 demo key) gets no InvalidIssuer warning for the
        demo key, whose account serves every region; a key of another credential there
        still gets it (a local proxy to Amazon)."""
        monkeypatch.setenv("ASINB_DEMO_SECRET", "demo-secret")
        local = _CONFIG.replace(
            'endpoint = "simulator"', 'endpoint = "http://127.0.0.1:18787"'
        ).replace('version = "3.1"', 'version = "3.1"\ncredential_secret_env = "ASINB_DEMO_SECRET"')
        assert cli.main(["check-config", "--config", str(_config(tmp_path, local))]) == 0
        assert "region" not in capsys.readouterr().err
        proxied = local.replace('credential_id = "demo-id"', 'credential_id = "amzn1.mine"')
        assert cli.main(["check-config", "--config", str(_config(tmp_path, proxied))]) == 0
        assert "key demo: credential version 3.1 is for the NA region" in capsys.readouterr().err

    def test_a_region_warning_for_the_embedded_simulator_s_own_accounts(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The embedded simulator: its demo key needs no warning (its account serves every
        region), but a key of an account configured in [simulator] does, as that account
        serves its own region only, as Amazon's do. Any embedded config went unwarned."""
        assert cli.main(["check-config", "--config", str(_config(tmp_path))]) == 0
        assert "region" not in capsys.readouterr().err
        monkeypatch.setenv("ASINB_MINE", "mine-secret")
        own = _CONFIG.replace('credential_id = "demo-id"', 'credential_id = "mine-id"').replace(
            'version = "3.1"', 'version = "3.1"\ncredential_secret_env = "ASINB_MINE"'
        ) + (
            '\n[[simulator.accounts]]\nname = "mine"\nprotocol = "creators"\n'
            'credential_id = "mine-id"\nsecret = "mine-secret"\nversion = "3.1"\n'
        )
        assert cli.main(["check-config", "--config", str(_config(tmp_path, own))]) == 0
        assert "key demo: credential version 3.1 is for the NA region" in capsys.readouterr().err
