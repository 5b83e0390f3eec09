"""Command-line habits: --version, init, ASINB_CONFIG, stdin/stdout, safe paths, lookup."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import errno
import fcntl
import gzip
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import FullAtCheckpoint, embedded_toml, key_doc, make_config
from conftest import asins as asins_of

from broker import __version__, cli
from broker.exitcode import ExitCode
from broker.simulator.server import SimulatorServer
from broker.simulator.settings import LatencyProfile, SimulatorSettings

REPO = Path(__file__).resolve().parent.parent

_CONFIG = embedded_toml(simulator="seed = 3")

_DEAD = """
[api]
endpoint = "http://127.0.0.1:9"

[[keys]]
name = "demo"
credential_id = "demo-id"
credential_secret_env = "ASINB_DEMO_SECRET"
version = "3.1"
partner_tags = { "www.amazon.com" = "demo-20" }

[retry]
outage_budget_s = 600

[log]
format = "json"
level = "error"
"""


def _config(tmp_path: Path, text: str = _CONFIG) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def _job(tmp_path: Path, n: int = 5, name: str = "job.txt") -> Path:
    job = tmp_path / name
    job.write_text("".join(f"B0TEST{i:04d}\n" for i in range(n)))
    return job


def _stdin_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: bytes, *args: str) -> int:
    """``broker run -`` with ``data`` on stdin; its exit code."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    return cli.main(["run", "-", "--config", str(_config(tmp_path)), "--progress", "none", *args])


def _jsonl(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _run_and_lookup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The row ``broker run`` writes for a one-line job ``text``, and ``lookup --json``'s."""
    config = _config(tmp_path)
    job = tmp_path / "one.txt"
    job.write_text(f"{text}\n")
    out = tmp_path / "one.jsonl"
    assert cli.main(["run", str(job), "--config", str(config), "--out", str(out)]) == 0
    [run_row] = _jsonl(out.read_text())
    capsys.readouterr()
    argv = ["lookup", text, "--config", str(config), "--json", "--no-cache"]
    assert cli.main(argv) == 0
    [lookup_row] = _jsonl(capsys.readouterr().out)
    return run_row, lookup_row


class TestVersionAndInit:
    def test_version(self, capsys: pytest.CaptureFixture[str]) -> None:
        """``broker --version`` prints the package version and exits 0."""
        with pytest.raises(SystemExit) as info:
            cli.main(["--version"])
        assert info.value.code == 0
        assert capsys.readouterr().out.strip() == f"broker {__version__}"

    def test_second_name_says_its_own_name(self) -> None:
        """Run as ``asin-broker``, --version and usage name asin-broker, not broker."""
        # pyproject.toml declares the script, so the project's environment always has it.
        script = Path(sys.executable).parent / "asin-broker"
        done = subprocess.run([str(script), "--version"], capture_output=True, text=True)
        assert done.stdout.strip() == f"asin-broker {__version__}"
        usage = subprocess.run([str(script), "run"], capture_output=True, text=True)
        assert usage.returncode == ExitCode.USAGE
        assert usage.stderr.startswith("usage: asin-broker run ")

    @pytest.mark.parametrize("age", ["90000", "-1", "nan", "soon"])
    def test_bad_max_age_is_a_usage_error_naming_the_flag(
        self, age: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--max-age outside 0..86400 s is refused by the parser, naming --max-age."""
        with pytest.raises(SystemExit) as info:
            cli.main(["lookup", "B0C1234567", "--max-age", age])
        assert info.value.code == ExitCode.USAGE
        err = capsys.readouterr().err
        assert "--max-age" in err
        # Only a value above the ceiling is told of Amazon's 24 hours.
        assert ("24 hours" in err) == (age == "90000")

    def test_init_writes_a_config_that_works_with_the_simulator(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``broker init PATH`` writes the packaged template; lookup works with it at once."""
        path = tmp_path / "conf" / "broker.toml"
        assert cli.main(["init", str(path)]) == ExitCode.OK
        text = path.read_text()
        assert text.startswith("# asin-broker configuration")
        assert cli.main(["check-config", "--config", str(path)]) == ExitCode.OK
        capsys.readouterr()
        assert cli.main(["lookup", "B0C1234567", "--config", str(path), "--json"]) == 0
        [row] = _jsonl(capsys.readouterr().out)
        assert row["status"] == "ok"

    def test_check_config_warns_of_no_home_directory(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """check-config warns that no home directory holds the default cache file (an empty
        HOME, no XDG_STATE_HOME): it said OK, and run then refused the config (78)."""
        monkeypatch.setenv("HOME", "")
        monkeypatch.delenv("XDG_STATE_HOME", raising=False)
        assert cli.main(["check-config", "--config", str(_config(tmp_path))]) == ExitCode.OK
        assert "warning: no home directory found" in capsys.readouterr().err

    @pytest.mark.parametrize(("endpoint", "warned"), [("amazon", True), ("simulator", False)])
    def test_check_config_warns_of_a_proxy_the_api_cannot_take(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        endpoint: str,
        warned: bool,
    ) -> None:
        """A socks5:// https_proxy is warned of for Amazon's endpoint (its first request
        stops the run), not for the embedded simulator, which no proxy sees."""
        for name in ("HTTPS_PROXY", "NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("https_proxy", "socks5://u:hunter2@proxy.example:1080")
        monkeypatch.setenv("ASINB_DEMO_SECRET", "a" * 64)
        text = _DEAD.replace('endpoint = "http://127.0.0.1:9"', f'endpoint = "{endpoint}"')
        assert cli.main(["check-config", "--config", str(_config(tmp_path, text))]) == 0
        err = capsys.readouterr().err
        assert ("warning: https_proxy (environment): " in err) is warned
        assert "hunter2" not in err

    def test_init_template_shows_the_optional_tables(self, tmp_path: Path) -> None:
        """The starter shows [state], [serve] and [cache] (commented), as the repository's
        config.toml does, so a user of the installed wheel finds them too."""
        path = tmp_path / "config.toml"
        assert cli.main(["init", str(path)]) == ExitCode.OK
        text = path.read_text()
        repository = (Path(__file__).parent.parent / "config.toml").read_text()
        for table in ("state", "serve", "cache"):
            assert f"# [{table}]" in repository, table
            assert f"# [{table}]" in text, table

    def test_init_never_overwrites_without_force(self, tmp_path: Path) -> None:
        """An existing file is kept unless --force is given."""
        path = tmp_path / "config.toml"
        path.write_text("mine")
        assert cli.main(["init", str(path)]) == ExitCode.USAGE
        assert path.read_text() == "mine"
        assert cli.main(["init", str(path), "--force"]) == ExitCode.OK
        assert path.read_text() != "mine"

    @pytest.mark.parametrize("blank", ["", " "])
    def test_init_with_a_blank_path_writes_nothing(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        blank: str,
    ) -> None:
        """``init`` given a blank path (an unset variable) is a usage error naming it: it
        wrote a file named " " that --config then refused, or said ". is a directory"."""
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SystemExit) as exited:
            cli.main(["init", blank])
        assert exited.value.code == ExitCode.USAGE
        assert "the path names no file" in capsys.readouterr().err
        assert list(tmp_path.iterdir()) == []

    def test_init_on_an_existing_file_says_to_pass_force(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``init`` on a file that exists is a usage error (2) whose one line says the file
        exists and how to overwrite it, so the user knows what to do next."""
        path = tmp_path / "config.toml"
        path.write_text("mine")
        assert cli.main(["init", str(path)]) == ExitCode.USAGE == 2
        captured = capsys.readouterr()
        assert f"{path} exists; pass --force to overwrite it" in captured.err
        assert captured.out == ""

    def test_init_force_replaces_the_file_whole(self, tmp_path: Path) -> None:
        """``init --force`` puts a whole new file in place of the old one (a reader that
        opened the old one still reads it whole: a run starting meanwhile never reads an
        empty or half-written config); a symbolic link stays a link, the file's mode stays,
        and no temporary file is left."""
        target = tmp_path / "real.toml"
        target.write_text("mine")
        target.chmod(0o640)
        link = tmp_path / "config.toml"
        link.symlink_to(target.name)
        with target.open() as reader:
            assert cli.main(["init", str(link), "--force"]) == ExitCode.OK
            assert reader.read() == "mine"
        assert link.is_symlink()
        assert "[[keys]]" in target.read_text()
        assert target.stat().st_mode & 0o777 == 0o640
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "real.toml"]


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_init_on_a_directory_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], force: list[str]
) -> None:
    """``init DIR`` says DIR is a directory (with or without --force), never "pass --force"
    then "Is a directory"."""
    assert cli.main(["init", str(tmp_path), *force]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "is a directory" in err
    assert "--force" not in err


def test_init_of_a_path_ending_in_a_slash_writes_no_file_of_that_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``init conf/`` (a directory not made yet) is refused as a directory is; it wrote a
    file named conf."""
    assert cli.main(["init", f"{tmp_path / 'conf'}/"]) == ExitCode.USAGE
    assert "is a directory" in capsys.readouterr().err
    assert not (tmp_path / "conf").exists()


@pytest.mark.parametrize("through_a_link", [False, True])
def test_init_force_onto_a_pipe_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], through_a_link: bool
) -> None:
    """``init --force`` onto a pipe or a device (or a link to one) is a usage error that
    leaves it as it was: the file was replaced whole, a device's node by a regular file
    (run as root, ``/dev/null`` itself)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    target = fifo
    if through_a_link:
        target = tmp_path / "link"
        target.symlink_to(fifo)
    assert cli.main(["init", str(target), "--force"]) == ExitCode.USAGE
    assert "is a device, a pipe or a socket, not a file" in capsys.readouterr().err
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_init_dash_prints_the_starter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``init -`` prints the starter on stdout, as ``-`` means elsewhere; it wrote a file
    named ``-``."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["init", "-"]) == ExitCode.OK
    assert "[[keys]]" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_init_under_a_file_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``init f/config.toml`` where f is a file says a file stands in the path (74); it said
    "File exists"."""
    (tmp_path / "f").write_text("")
    assert cli.main(["init", str(tmp_path / "f" / "config.toml")]) == ExitCode.IO_ERROR
    assert "a file stands where a directory of its path should be" in capsys.readouterr().err


def test_init_hint_names_the_file_when_asinb_config_names_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``broker init`` with $ASINB_CONFIG naming another file suggests lookup --config
    config.toml; the suggested lookup read $ASINB_CONFIG's file and exited 78."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ASINB_CONFIG", str(tmp_path / "etc" / "config.toml"))
    assert cli.main(["init"]) == ExitCode.OK
    assert "lookup B0C1234567 --config config.toml`" in capsys.readouterr().err
    monkeypatch.delenv("ASINB_CONFIG")
    assert cli.main(["init", "--force"]) == ExitCode.OK
    assert "lookup B0C1234567`" in capsys.readouterr().err


class TestConfigLookup:
    def test_env_names_the_config(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Without --config, $ASINB_CONFIG names the file; --config still wins."""
        config = _config(tmp_path)
        monkeypatch.setenv("ASINB_CONFIG", str(config))
        other = tmp_path / "sub"
        other.mkdir()
        monkeypatch.chdir(other)
        assert cli.main(["check-config"]) == ExitCode.OK
        assert f"config ok: {config}" in capsys.readouterr().out
        assert cli.main(["check-config", "--config", "nope.toml"]) == ExitCode.CONFIG

    def test_a_key_the_simulator_has_no_account_for_is_refused_at_load(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """With the embedded simulator, a key with no secret set whose credential the
        simulator does not have (a Creators id in a PA-API config) fails check-config with
        78, as run does, naming the key's path and the simulator's PA-API credentials (the
        advice was to set the variable, whose warning then said to unset it: a circle), and
        run fails before it reads the job or makes an output."""
        monkeypatch.delenv("ASINB_DEMO_SECRET", raising=False)
        text = (
            '[api]\nprotocol = "paapi5"\nendpoint = "simulator"\n'
            '[[keys]]\nname = "creators-key"\ncredential_id = "demo-id"\n'
            'credential_secret_env = "ASINB_DEMO_SECRET"\n'
            'partner_tags = { "www.amazon.com" = "demo-20" }\n'
        )
        config = str(_config(tmp_path, text))
        assert cli.main(["check-config", "--config", config]) == ExitCode.CONFIG
        err = capsys.readouterr().err
        assert "keys[0]: no secret for credential 'demo-id'" in err
        assert "'demo-id' is its creators account" in err
        assert "the simulator's paapi5 accounts are 'DEMOACCESSKEY'" in err
        monkeypatch.setenv("ASINB_DEMO_SECRET", "demo-secret-key")
        # With its secret set too: every request would go to the simulator, which would
        # refuse the key (exit 77) blaming its credentials.
        assert cli.main(["check-config", "--config", config]) == ExitCode.CONFIG
        err = capsys.readouterr().err
        assert "keys[0]: credential 'demo-id' is no paapi5 account of the embedded" in err
        assert 'set api.endpoint = "amazon"' in err
        assert "set credential_id to one of those" in err
        assert "unset the variable" not in err
        assert cli.main(["run", str(_job(tmp_path)), "--config", config]) == ExitCode.CONFIG
        monkeypatch.delenv("ASINB_DEMO_SECRET")
        job = _job(tmp_path)
        out = tmp_path / "out.jsonl"
        assert cli.main(["run", str(job), "--config", config, "--out", str(out)]) == 78
        assert not out.exists()
        assert not out.with_name("out.jsonl.ledger").exists()

    def test_check_config_warns_of_a_queue_smaller_than_a_batch(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """engine.queue_size below engine.batch_size is allowed, but no request then carries
        a full batch (41 requests of 5 for 200 ASINs): check-config says so."""
        config = str(_config(tmp_path, embedded_toml(engine="queue_size = 5\nbatch_size = 10")))
        assert cli.main(["check-config", "--config", config]) == ExitCode.OK
        err = capsys.readouterr().err
        assert "warning: engine.queue_size (5) is below engine.batch_size (10)" in err
        config = str(_config(tmp_path, embedded_toml(engine="queue_size = 10")))
        assert cli.main(["check-config", "--config", config]) == ExitCode.OK
        assert "queue_size" not in capsys.readouterr().err

    def test_check_config_warns_of_a_secret_the_simulator_will_refuse(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """With the embedded simulator, check-config says where an unset secret comes from
        (the simulator's own account), and warns when the variable holds another secret."""
        text = (
            '[api]\nendpoint = "simulator"\n'
            '[[keys]]\nname = "demo"\ncredential_id = "demo-id"\nversion = "3.1"\n'
            'credential_secret_env = "ASINB_DEMO_SECRET"\n'
            'partner_tags = { "www.amazon.com" = "demo-20" }\n'
        )
        config = str(_config(tmp_path, text))
        monkeypatch.delenv("ASINB_DEMO_SECRET", raising=False)
        assert cli.main(["check-config", "--config", config]) == ExitCode.OK
        out, err = capsys.readouterr()
        assert "secret from the simulator's own account, $ASINB_DEMO_SECRET unset" in out
        assert "warning" not in err
        monkeypatch.setenv("ASINB_DEMO_SECRET", "")
        assert cli.main(["check-config", "--config", config]) == ExitCode.OK
        assert "own account, $ASINB_DEMO_SECRET empty" in capsys.readouterr().out
        monkeypatch.setenv("ASINB_DEMO_SECRET", "not-the-demo-secret")
        assert cli.main(["check-config", "--config", config]) == ExitCode.OK
        err = capsys.readouterr().err
        assert "warning: key demo: the embedded simulator's creators account 'demo-id' has " in err
        assert "unset the variable" in err
        assert "not-the-demo-secret" not in err

    def test_check_config_says_to_drop_a_secret_file_the_simulator_will_refuse(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A secret file the embedded simulator will refuse: the warning says to remove
        credential_secret_file; it said to unset a variable the key does not have."""
        secret = tmp_path / "demo.secret"
        secret.write_text("not-the-demo-secret\n")
        secret.chmod(0o600)
        text = (
            '[api]\nendpoint = "simulator"\n'
            '[[keys]]\nname = "demo"\ncredential_id = "demo-id"\nversion = "3.1"\n'
            f'credential_secret_file = "{secret}"\n'
            'partner_tags = { "www.amazon.com" = "demo-20" }\n'
        )
        config = str(_config(tmp_path, text))
        assert cli.main(["check-config", "--config", config]) == ExitCode.OK
        err = capsys.readouterr().err
        assert f"has another secret than file {secret}" in err
        assert "remove the key's credential_secret_file to use the simulator's own secret" in err
        assert "variable" not in err
        assert "not-the-demo-secret" not in err

    def test_missing_config_named_by_env_says_so_and_hints_the_typed_command(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A missing file named by $ASINB_CONFIG: the message says where the name came from,
        and its hint names the command as typed (asin-broker, not the clashing broker)."""
        missing = tmp_path / "nowhere.toml"
        monkeypatch.setenv("ASINB_CONFIG", str(missing))
        monkeypatch.setattr(sys, "argv", ["/opt/asin-broker/bin/asin-broker", "check-config"])
        assert cli.main(["check-config"]) == ExitCode.CONFIG
        err = capsys.readouterr().err
        assert f"config file not found: {missing} (named by $ASINB_CONFIG)" in err
        assert f"`asin-broker init {missing}`" in err
        assert err.startswith("asin-broker: ")

    def test_a_leading_tilde_the_shell_left_is_the_home_folder(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """``~`` the shell does not expand (``--config=~/c.toml``, a quoted path,
        ``$ASINB_CONFIG``) is the home folder, as in the config's path settings: no folder
        named ``~`` is made in the working directory, and the hint's file is found."""
        home, work = tmp_path / "home", tmp_path / "work"
        home.mkdir()
        work.mkdir()
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.chdir(work)
        assert cli.main(["init", "~/c.toml"]) == ExitCode.OK
        assert (home / "c.toml").is_file()
        assert cli.main(["check-config", "--config=~/c.toml"]) == ExitCode.OK
        monkeypatch.setenv("ASINB_CONFIG", "~/c.toml")
        assert cli.main(["check-config"]) == ExitCode.OK
        assert not (work / "~").exists()
        capsys.readouterr()

    @pytest.mark.parametrize(
        ("out", "home", "why"),
        [
            ("~nosuchuser-asinb/o.jsonl", None, "~nosuchuser-asinb names no user"),
            ("~/o.jsonl", "", "~ names no home folder"),
        ],
    )
    def test_a_tilde_naming_no_folder_is_a_usage_error(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        out: str,
        home: str | None,
        why: str,
    ) -> None:
        """``--out=~nosuchuser/o.jsonl``, or ``~/o.jsonl`` with an empty HOME, is a usage
        error naming the option, as in the config's path settings: a folder literally named
        ``~nosuchuser`` was made (and ``/o.jsonl`` written)."""
        monkeypatch.chdir(tmp_path)
        if home is not None:
            monkeypatch.setenv("HOME", home)
        job = _job(tmp_path)
        argv = ["run", str(job), "--config", str(_config(tmp_path)), f"--out={out}"]
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        assert exited.value.code == ExitCode.USAGE
        err = capsys.readouterr().err
        assert f"--out: {why}" in err
        assert not [p for p in tmp_path.iterdir() if p.name.startswith("~")]

    def test_an_output_named_with_a_leading_tilde_is_a_file_here(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``--out ~tmp.jsonl`` (no slash: no user's folder) is that file in the working
        directory, as it always was: it was refused as "names no user"."""
        monkeypatch.chdir(tmp_path)
        job = _job(tmp_path)
        argv = ["run", str(job), "--config", str(_config(tmp_path)), "--out", "~tmp.jsonl"]
        assert cli.main([*argv, "--progress", "none"]) == ExitCode.OK
        assert len(_jsonl((tmp_path / "~tmp.jsonl").read_text())) == 5

    @pytest.mark.parametrize(
        "argv",
        [["status"], ["lookup", "B0C1234567"], ["check-config"], ["init"], ["cache", "stats"]],
    )
    def test_a_deleted_working_directory_is_named(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        argv: list[str],
    ) -> None:
        """From a working directory deleted under the shell, every command says so (74), as
        broker run does: they said "config file not found: config.toml", and init then
        failed to write it."""
        gone = tmp_path / "gone"
        gone.mkdir()
        monkeypatch.chdir(gone)
        gone.rmdir()
        monkeypatch.delenv("ASINB_CONFIG", raising=False)
        assert cli.main(argv) == ExitCode.IO_ERROR
        err = capsys.readouterr().err
        assert "the working directory is gone (deleted while the shell was in it)" in err
        assert "not found" not in err

    def test_hints_name_paths_as_a_shell_takes_them(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A path with a space (or a leading ``-``) is quoted in the commands the messages
        suggest, so each runs as shown."""
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "argv", ["broker", "init"])
        assert cli.main(["init", "my conf.toml"]) == ExitCode.OK
        assert "--config 'my conf.toml'`" in capsys.readouterr().err
        assert cli.main(["check-config", "--config", "no such.toml"]) == ExitCode.CONFIG
        assert "`broker init 'no such.toml'`" in capsys.readouterr().err
        assert cli.main(["check-config", "--config=-x.toml"]) == ExitCode.CONFIG
        assert "`broker init -- -x.toml`" in capsys.readouterr().err
        assert cli.main(["init", "--", "-x.toml"]) == ExitCode.OK
        assert "--config=-x.toml`" in capsys.readouterr().err

    def test_python_m_broker_names_itself_so(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Run as `python -m broker` (the README's way round the clashing `broker`), messages
        and hints name that command, not the `broker` script the user avoided."""
        missing = tmp_path / "nowhere.toml"
        main_py = str(Path(cli.__file__).with_name("__main__.py"))
        monkeypatch.setattr(sys, "argv", [main_py, "check-config"])
        assert cli.main(["check-config", "--config", str(missing)]) == ExitCode.CONFIG
        err = capsys.readouterr().err
        assert err.startswith("python -m broker: ")
        assert f"`python -m broker init {missing}`" in err

    def test_status_reads_the_env_config(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """`broker status` finds its config through $ASINB_CONFIG like every other command."""
        config = _config(tmp_path, _DEAD)
        monkeypatch.setenv("ASINB_CONFIG", str(config))
        monkeypatch.setenv("ASINB_DEMO_SECRET", "s")
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
        from broker.state.sqlite import SqliteStateStore

        # A store some broker made (status shows none without one, and makes none).
        made = SqliteStateStore(tmp_path / "state" / "asin-broker" / "keys.sqlite3")
        asyncio.run(made.aclose())
        other = tmp_path / "sub"
        other.mkdir()
        monkeypatch.chdir(other)
        assert cli.main(["status", "--json"]) == ExitCode.OK
        [key] = json.loads(capsys.readouterr().out)["keys"]
        assert key["key"] == "demo"

    def test_simulate_reads_the_env_config(self, tmp_path: Path) -> None:
        """`broker simulate` reads $ASINB_CONFIG's [simulator] table: a bad one is exit 78."""
        bad = tmp_path / "bad.toml"
        bad.write_text("[simulator]\nseed = 'three'\n", encoding="utf-8")
        done = subprocess.run(
            [sys.executable, "-m", "broker", "simulate", "--port", "0"],
            cwd=tmp_path,
            env={**os.environ, "ASINB_CONFIG": str(bad)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == ExitCode.CONFIG, done.stderr
        assert "seed" in done.stderr

    def test_missing_config_says_how_to_create_one(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """No config anywhere: the error names the file and `broker init`."""
        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv("ASINB_CONFIG", raising=False)
        assert cli.main(["lookup", "B0C1234567"]) == ExitCode.CONFIG
        err = capsys.readouterr().err
        assert "config file not found: config.toml" in err
        assert "broker init config.toml" in err
        assert "ASINB_CONFIG" in err


def test_simulate_refuses_to_watch_a_process_that_is_not_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``simulate --exit-with-parent PID`` naming a process that is not its parent is a
    usage error (exit 2): it said "listening" and then exited 0 at its first look."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ASINB_CONFIG", raising=False)
    other = os.getppid() + 1
    code = cli.main(["simulate", "--port", "0", "--exit-with-parent", str(other)])
    assert code == ExitCode.USAGE
    err = capsys.readouterr().err
    assert f"--exit-with-parent {other}: that process is not this one's parent" in err


@pytest.mark.parametrize("command", [["simulate"], ["serve", "--spool", "spool"]])
@pytest.mark.parametrize("port", ["99999", "65536", "-1", "http"])
def test_port_out_of_range_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], command: list[str], port: str
) -> None:
    """--port outside 0..65535 is refused naming the flag (exit 2), not bound modulo 65536
    (simulate listened on 34463 for 99999) nor reported as a config error."""
    with pytest.raises(SystemExit) as info:
        cli.main([*command, "--port", port])
    assert info.value.code == ExitCode.USAGE
    assert "--port" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "usage"),
    [(["status"], "status"), (["run", "job.txt"], "run"), (["cache", "stats"], "cache stats")],
)
def test_an_unknown_option_is_told_with_the_commands_usage(
    capsys: pytest.CaptureFixture[str], command: list[str], usage: str
) -> None:
    """``broker status --jsn`` prints the usage of ``broker status``, whose options the
    user needs to see; it printed the top-level one ("usage: broker [-h] ... COMMAND")."""
    with pytest.raises(SystemExit) as info:
        cli.main([*command, "--jsn"])
    assert info.value.code == ExitCode.USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"usage: broker {usage} ")
    assert "error: unrecognized arguments: --jsn" in err


@pytest.mark.parametrize("command", [["check-config"], ["lookup", "B0C1234567"], ["status"]])
def test_empty_config_flag_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """``--config ""`` (an unset variable in a script) is refused, not read as ./config.toml."""
    with pytest.raises(SystemExit) as info:
        cli.main([*command, "--config", ""])
    assert info.value.code == ExitCode.USAGE
    assert "--config names no file" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["", "  "])
@pytest.mark.parametrize("command", [["check-config"], ["status"], ["simulate"]])
def test_an_empty_config_variable_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
    value: str,
) -> None:
    """$ASINB_CONFIG set but empty is refused as an empty --config is; it fell back to
    ./config.toml without a word."""
    monkeypatch.setenv("ASINB_CONFIG", value)
    with pytest.raises(SystemExit) as info:
        cli.main(command)
    assert info.value.code == ExitCode.USAGE
    assert "$ASINB_CONFIG is set but names no file" in capsys.readouterr().err


@pytest.mark.parametrize("form", ["separate", "joined"])
def test_config_before_the_command_is_taken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], form: str
) -> None:
    """``broker --config FILE COMMAND`` reads FILE as ``COMMAND --config FILE`` does; it was
    refused as an unknown command named FILE."""
    config = str(_config(tmp_path))
    words = ["--config", config] if form == "separate" else [f"--config={config}"]
    assert cli.main([*words, "check-config"]) == ExitCode.OK
    assert f"config ok: {config}" in capsys.readouterr().out
    # A command of two words takes it after both (it was refused as an action named FILE).
    assert cli.main([*words, "cache", "stats"]) == ExitCode.OK
    assert "Traceback" not in capsys.readouterr().err


def test_config_before_the_command_abbreviated_or_without_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``broker --conf FILE COMMAND`` is taken as after the command; ``broker --config FILE``
    with no command right after says where --config goes (exit 2), not "invalid choice:
    FILE"."""
    config = str(_config(tmp_path))
    assert cli.main(["--conf", config, "check-config"]) == ExitCode.OK
    capsys.readouterr()
    for words in (["--config", config], ["--config", config, "--json", "status"]):
        with pytest.raises(SystemExit) as info:
            cli.main(words)
        assert info.value.code == ExitCode.USAGE
        err = capsys.readouterr().err
        assert "--config goes with a command" in err
        assert "invalid choice" not in err


@pytest.mark.parametrize(
    "words",
    [
        ["lookup", "-"],
        ["lookup", "--marketplace", "XX", "B0C1234567"],
        ["lookup", "--outage-budget", "-1", "B0C1234567"],
        ["run", "job.txt", "--input", "csv"],
    ],
)
def test_a_bad_command_line_is_a_usage_error_whatever_the_config(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    words: list[str],
) -> None:
    """Flags wrong whatever the config says exit 2 with no config file there: they were
    checked after it was read, so a script saw 78 ("config file not found")."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ASINB_CONFIG", raising=False)
    assert cli.main(words) == ExitCode.USAGE
    assert "config file not found" not in capsys.readouterr().err


def test_config_given_twice_before_the_command_takes_the_last(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``broker --config A --config B COMMAND`` reads B, as the same two flags after the
    command do; it was refused as an unknown command named B."""
    config = str(_config(tmp_path))
    assert cli.main(["--config", "nowhere.toml", "--config", config, "check-config"]) == 0
    assert f"config ok: {config}" in capsys.readouterr().out


def test_init_under_a_blank_config_variable_names_its_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With $ASINB_CONFIG set but blank, init's hint names its file with --config: the
    plain command it suggested is refused for that variable."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ASINB_CONFIG", "")
    assert cli.main(["init"]) == ExitCode.OK
    assert "--config config.toml" in capsys.readouterr().err


def test_empty_out_flag_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--out ""`` (an unset variable in a script) is refused; it ran to the default
    output, named after the job."""
    monkeypatch.chdir(tmp_path)
    job = _job(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(["run", str(job), "--config", str(_config(tmp_path)), "--out", ""])
    assert info.value.code == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "--out names no file" in err
    assert " run [-h]" in err  # the command's usage line, not the top level's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "job.txt"]


def test_empty_job_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``broker run ""`` (an unset variable in a script) says the job names no file; it
    said "the job . is a directory"."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "", "--config", str(_config(tmp_path))])
    assert info.value.code == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "the job names no file" in err
    assert "directory" not in err


def test_an_out_under_proc_that_is_not_there_is_not_called_a_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--out /proc/o.jsonl`` (no such file) is refused for where it is, not called "a
    device or a pipe"."""
    job = _job(tmp_path)
    code = cli.main(["run", str(job), "--config", str(_config(tmp_path)), "--out", "/proc/o.jsonl"])
    assert code == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "--out /proc/o.jsonl is under /dev or /proc" in err
    assert "a device or a pipe" not in err


def test_empty_spool_flag_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``serve --spool ""`` (an unset variable) is refused; it made the current directory
    the spool, creating inbox/ processing/ done/ failed/ there."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--spool", "", "--port", "0"])
    assert info.value.code == ExitCode.USAGE
    assert "--spool names no directory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_broken_pipe_not_of_stdout_is_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A BrokenPipeError while stdout is fine (another pipe or socket) is not taken for
    stdout's reader going away: it propagates instead of a silent exit 141."""

    def broken(argv: object, **_: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_main", broken)
    with pytest.raises(BrokenPipeError):
        cli.main(["status"])


@pytest.mark.parametrize("script", ["asin-broker", "broker"])
def test_messages_name_the_command_typed(tmp_path: Path, script: str) -> None:
    """Run as ``asin-broker`` (the name units and images use), a message says
    ``asin-broker:``, not ``broker:``; run as ``broker``, ``broker:``."""
    path = Path(sys.executable).with_name(script)
    config = str(_config(tmp_path))
    done = subprocess.run(
        [str(path), "lookup", "B0C1234567", "--outage-budget", "nan", "--config", config],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert done.returncode == ExitCode.USAGE
    assert done.stderr.startswith(f"{script}: --outage-budget must be")


class TestRunPaths:
    def test_a_tilde_path_is_the_path_as_given(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A job named ``~nosuchuser/job.txt`` (a ~ the shell left, quoted or unknown) is the
        relative path it reads as, not found (66): it ended in a traceback (exit 1) when the
        output's check tried to expand a home no one has."""
        monkeypatch.chdir(tmp_path)
        config = str(_config(tmp_path))
        code = cli.main(["run", "~nosuchuser/job.txt", "--config", config])
        err = capsys.readouterr().err
        assert code == ExitCode.NO_INPUT, err
        assert "input not found" in err
        assert "Traceback" not in err

    @pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux's /proc")
    def test_a_job_file_that_fails_to_read_is_named_as_the_job(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A job file whose read fails (EIO: a failing disk, a network mount that dropped;
        here /proc/self/mem, which opens but cannot be read from its start) exits 66 naming
        the job file, without advice about its permissions; it said "cannot write:
        Input/output error" (74), which sent the user to look at the output's disk."""
        job = tmp_path / "job.txt"
        job.symlink_to("/proc/self/mem")
        code = cli.main(["run", str(job), "--config", str(_config(tmp_path))])
        err = capsys.readouterr().err
        assert code == ExitCode.NO_INPUT, err
        assert f"cannot read the job file {job}: Input/output error\n" in err
        assert "cannot write" not in err

    def test_out_naming_the_job_is_refused_before_writing(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """N10: --out naming the job file is a usage error; the job file is untouched."""
        job = _job(tmp_path)
        before = job.read_bytes()
        code = cli.main(["run", str(job), "--config", str(_config(tmp_path)), "--out", str(job)])
        assert code == ExitCode.USAGE
        assert "would overwrite it" in capsys.readouterr().err
        assert job.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "job.txt"]

    def test_paths_that_cannot_be_looked_at_are_said_in_one_line(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A job or --out in a loop of symbolic links, and an --out whose side files' names
        are too long, exit 66 or 74 in one line with nothing written (each was a traceback,
        exit 1)."""
        config = str(_config(tmp_path))
        job = _job(tmp_path)
        (tmp_path / "l1").symlink_to("l2")
        (tmp_path / "l2").symlink_to("l1")
        loop = str(tmp_path / "l1")
        for given in (loop, f"{tmp_path}/./l1", f"{loop}/"):
            assert cli.main(["run", given, "--config", config]) == ExitCode.NO_INPUT
            err = capsys.readouterr().err
            assert f"cannot read the job file {given}: " in err
            # Logged as every error exit of a run is (it was not).
            events = [json.loads(line) for line in err.splitlines() if line[:1] == "{"]
            (finished,) = [e for e in events if e["event"] == "broker.job_finished"]
            assert (finished["level"], finished["exit_code"]) == ("error", 66)
        assert cli.main(["run", str(job), "--config", config, "--out", loop]) == 74
        assert f"cannot write {loop}: " in capsys.readouterr().err
        long = str(tmp_path / ("c" * 250))
        assert cli.main(["run", str(job), "--config", config, "--out", long]) == 74
        err = capsys.readouterr().err
        assert "File name too long" in err
        assert "give --out a name of at most 229 bytes" in err
        assert "Traceback" not in err
        # A folder's name too long is no --out's suffix: no advice to shorten --out.
        folder = _config(tmp_path, _CONFIG + f'\n[output]\ndirectory = "{"k" * 300}"\n')
        assert cli.main(["run", str(job), "--config", str(folder)]) == ExitCode.IO_ERROR
        err = capsys.readouterr().err
        assert "File name too long" in err
        assert "--out" not in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "job.txt", "l1", "l2"]

    def test_a_working_directory_deleted_under_the_shell(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``run`` in a folder deleted while the shell was in it says so (exit 74; it was a
        traceback), and ``init`` to a full path there exits 0 (it wrote, then raised)."""
        config = str(_config(tmp_path))
        job = str(_job(tmp_path))
        gone = tmp_path / "gone"
        gone.mkdir()
        monkeypatch.chdir(gone)
        gone.rmdir()
        assert cli.main(["run", job, "--config", config]) == ExitCode.IO_ERROR
        assert "the working directory is gone" in capsys.readouterr().err
        assert cli.main(["init", str(tmp_path / "new.toml")]) == ExitCode.OK
        assert f"--config {tmp_path / 'new.toml'}" in capsys.readouterr().err

    def test_out_with_a_trailing_slash_is_a_directory(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``--out results/`` names a directory even before it exists: a usage error, not a
        file called ``results`` with a ledger beside it."""
        job = _job(tmp_path)
        out = f"{tmp_path}/results/"
        code = cli.main(["run", str(job), "--config", str(_config(tmp_path)), "--out", out])
        assert code == ExitCode.USAGE
        assert "is a directory" in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "job.txt"]

    def test_out_on_a_device_is_refused_before_anything_is_made(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``--out`` naming a device (here through a link to /dev/null) is a usage error that
        points at ``--out -``; no ledger is made beside it."""
        job = _job(tmp_path)
        device = tmp_path / "null.jsonl"
        device.symlink_to(os.devnull)
        code = cli.main(["run", str(job), "--config", str(_config(tmp_path)), "--out", str(device)])
        assert code == ExitCode.USAGE
        assert "--out -" in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "job.txt", device.name]

    def test_out_on_dev_stdout_is_refused_even_when_it_is_a_file(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``--out /dev/stdout`` is a usage error even when stdout is redirected to a regular
        file (where it passed as one and a ledger was made in /dev)."""
        job = _job(tmp_path)
        config = str(_config(tmp_path))
        assert cli.main(["run", str(job), "--config", config, "--out", "/dev/stdout"]) == 2
        assert "--out -" in capsys.readouterr().err
        assert not Path("/dev/stdout.ledger").exists()

    @pytest.mark.parametrize(
        "side",
        [".refresh", ".ledger.lock", ".ledger-wal", ".ledger-shm", ".ordering", ".refresh.ledger"],
    )
    def test_job_named_as_a_side_file_is_refused(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], side: str
    ) -> None:
        """A job named like a file kept beside the output (``k.jsonl.refresh`` for
        ``--out k.jsonl``) is refused before anything is written: it would be overwritten
        or deleted."""
        job = _job(tmp_path, name="k.jsonl" + side)
        before = job.read_bytes()
        out = tmp_path / "k.jsonl"
        code = cli.main(["run", str(job), "--config", str(_config(tmp_path)), "--out", str(out)])
        assert code == ExitCode.USAGE
        assert "would overwrite" in capsys.readouterr().err
        assert job.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", job.name]

    @pytest.mark.parametrize(
        ("job_name", "out_name"),
        [
            ("k.txt.gz", "k.txt"),
            ("k.txt", "k"),
            ("k.txt.tmpl", "k.txt"),
            ("k.txt.refreshed.txt", "k.txt"),
            ("k-walkthrough.txt", "k"),
        ],
    )
    def test_job_merely_named_after_the_output_runs(
        self, tmp_path: Path, job_name: str, out_name: str
    ) -> None:
        """A job whose name only starts with the output's (k.txt.gz for --out k.txt, k.txt
        for --out k) is no side file: it runs."""
        raw = b"B0TEST0001\n"
        job = tmp_path / job_name
        job.write_bytes(gzip.compress(raw) if job_name.endswith(".gz") else raw)
        out = tmp_path / out_name
        code = cli.main(["run", str(job), "--config", str(_config(tmp_path)), "--out", str(out)])
        assert code == ExitCode.OK
        assert len(_jsonl(out.read_text())) == 1

    def test_stdin_copy_named_as_the_job_resumes(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The copy of a stdin job (``<out>.stdin.txt``) may be named as the job: it is that
        job, not a side file, so the run finds it complete."""
        out = tmp_path / "o" / "a.jsonl"
        assert _stdin_run(tmp_path, monkeypatch, b"B0FIRST001\n", "--out", str(out)) == 0
        copy = out.with_name("a.jsonl.stdin.txt")
        args = ["run", str(copy), "--config", str(_config(tmp_path)), "--out", str(out)]
        assert cli.main(args) == ExitCode.OK
        assert len(_jsonl(out.read_text())) == 1

    def test_output_under_a_file_is_named_as_such(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--out under a path that is a file says the file is in the way (exit 74)."""
        job = _job(tmp_path)
        blocker = tmp_path / "plain"
        blocker.write_text("x")
        out = blocker / "sub" / "x.jsonl"
        code = cli.main(["run", str(job), "--config", str(_config(tmp_path)), "--out", str(out)])
        assert code == ExitCode.IO_ERROR
        err = capsys.readouterr().err
        assert f"{blocker} is a file, not a directory" in err

    def test_default_output_equal_to_the_job_is_refused(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """N10: ``broker run out/y.jsonl`` (default output out/y.jsonl) is refused too."""
        monkeypatch.chdir(tmp_path)
        (tmp_path / "out").mkdir()
        job = tmp_path / "out" / "y.jsonl"
        job.write_text('{"asin": "B0TEST0001"}\n')
        before = job.read_bytes()
        code = cli.main(["run", "out/y.jsonl", "--config", str(_config(tmp_path))])
        assert code == ExitCode.USAGE
        assert job.read_bytes() == before
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["y.jsonl"]

    @pytest.mark.parametrize("fmt", ["jsonl", "csv", "sqlite"])
    def test_existing_file_no_job_wrote_is_never_overwritten(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
    ) -> None:
        """--out naming a file with content and no ledger beside it (another tool's data,
        the item cache): exit 2, the file untouched, nothing written."""
        job = _job(tmp_path)
        out = tmp_path / f"precious.{fmt}"
        out.write_bytes(b'{"precious": "data"}\n')
        args = ["run", str(job), "--config", str(_config(tmp_path)), "--out", str(out)]
        assert cli.main([*args, "--format", fmt]) == ExitCode.USAGE
        assert "was not written by a broker job" in capsys.readouterr().err
        assert out.read_bytes() == b'{"precious": "data"}\n'
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "config.toml",
            "job.txt",
            f"precious.{fmt}",
        ]

    def test_a_file_named_as_the_report_is_never_overwritten(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A new job whose <out>.invalid.jsonl exists and is no report (a file of the
        user's): exit 2, the file untouched; it was replaced by the job's report. A report
        a job left (its output and ledger deleted to start over) is rewritten."""
        job = tmp_path / "job.txt"
        job.write_text("B0TEST0001\nnot-an-asin\n")
        out = tmp_path / "k.jsonl"
        mine = out.with_name("k.jsonl.invalid.jsonl")
        mine.write_bytes(b"B0C1234567\n")
        args = ["run", str(job), "--config", str(_config(tmp_path)), "--out", str(out)]
        assert cli.main(args) == ExitCode.USAGE
        assert "k.jsonl.invalid.jsonl" in capsys.readouterr().err
        assert mine.read_bytes() == b"B0C1234567\n"
        assert not out.exists()
        mine.unlink()
        assert cli.main(args) == ExitCode.OK
        report = mine.read_bytes()
        assert b'"reason"' in report
        out.unlink()
        out.with_name("k.jsonl.ledger").unlink()
        assert cli.main(args) == ExitCode.OK
        assert mine.read_bytes() == report

    def test_a_report_name_that_is_another_jobs_output_says_so(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """<out>.invalid.jsonl that is another job's output (its ledger beside it): refused
        saying so; it was "a file no broker job wrote"."""
        config = str(_config(tmp_path))
        (tmp_path / "good.txt").write_text("B0TEST0001\n")
        (tmp_path / "bad.txt").write_text("not-an-asin\n")
        other = tmp_path / "r.jsonl.invalid.jsonl"
        assert (
            cli.main(["run", str(tmp_path / "good.txt"), "--config", config, "--out", str(other)])
            == 0
        )
        capsys.readouterr()
        argv = [
            "run",
            str(tmp_path / "bad.txt"),
            "--config",
            config,
            "--out",
            str(tmp_path / "r.jsonl"),
        ]
        assert cli.main(argv) == ExitCode.USAGE
        assert "is another job's output" in capsys.readouterr().err

    def test_own_output_and_an_empty_file_are_written(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An empty file is taken as the output; a job's own output (ledger beside it) is
        resumed, and --new-job starts it over."""
        job = _job(tmp_path)
        out = tmp_path / "out.jsonl"
        out.touch()
        args = ["run", str(job), "--config", str(_config(tmp_path)), "--out", str(out)]
        assert cli.main(args) == ExitCode.OK
        assert out.stat().st_size > 0
        assert cli.main(args) == ExitCode.OK
        assert cli.main([*args, "--new-job"]) == ExitCode.OK
        assert "already complete" in capsys.readouterr().err

    def test_input_flag_with_a_job_file_is_a_usage_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--input names stdin's format: with a job file (a CSV named .txt) it is refused,
        naming the remedy, instead of being ignored and every row read as invalid."""
        job = tmp_path / "export.txt"
        job.write_text("asin,sku\nB0TEST0001,1\n")
        out = tmp_path / "out.jsonl"
        args = ["run", str(job), "--config", str(_config(tmp_path)), "--out", str(out)]
        assert cli.main([*args, "--input", "csv"]) == ExitCode.USAGE
        err = capsys.readouterr().err
        assert "rename it" in err
        assert "broker run - --input csv" in err
        assert not out.exists()

    @pytest.mark.parametrize(
        ("name", "fmt"),
        [
            ("x.csv", "csv"),
            ("x.CSV", "csv"),
            ("x.sqlite", "sqlite"),
            ("x.db", "sqlite"),
            ("x.out", "jsonl"),
        ],
    )
    def test_out_name_tells_the_format_when_format_is_not_given(
        self, tmp_path: Path, name: str, fmt: str
    ) -> None:
        """--out x.csv without --format writes CSV (not JSON lines named .csv); a name that
        tells nothing keeps the config's format."""
        job = _job(tmp_path)
        out = tmp_path / name
        args = ["run", str(job), "--config", str(_config(tmp_path)), "--out", str(out)]
        assert cli.main(args) == ExitCode.OK
        head = out.read_bytes()[:16]
        if fmt == "csv":
            assert head.startswith(b"line,")
        elif fmt == "sqlite":
            assert head == b"SQLite format 3\x00"
        else:
            assert head.startswith(b'{"line":1')

    @pytest.mark.parametrize("how", [["--ordered"], ["--refresh"]])
    def test_a_symlinked_out_is_written_through(self, tmp_path: Path, how: list[str]) -> None:
        """--out LINK (a "latest" symlink): --ordered and a finished --refresh write the file
        it names and the link stays; they replaced the link with a plain file and left the
        target with the old rows."""
        (tmp_path / "runs").mkdir()
        target = tmp_path / "runs" / "today.jsonl"
        link = tmp_path / "latest.jsonl"
        link.symlink_to(target)
        job = _job(tmp_path)
        args = ["run", str(job), "--config", str(_config(tmp_path)), "--out", str(link)]
        assert cli.main(args) == 0
        job.write_text("".join(f"B0TEST{i:04d}\n" for i in range(7)))
        assert cli.main([*args, *how] if how == ["--refresh"] else [*args, "--new-job", *how]) == 0
        assert link.is_symlink()
        assert link.resolve() == target.resolve()
        rows = _jsonl(target.read_text())
        assert [row["line"] for row in rows] == list(range(1, 8))

    def test_a_job_begun_through_a_link_with_its_ledger_beside_it_resumes(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A job an older broker began through --out LINK keeps its ledger beside the link:
        the run goes on there; resolving the link looked for the ledger beside the target
        and refused the target as "not written by a broker job" (exit 2)."""
        job = _job(tmp_path)
        link = tmp_path / "latest.jsonl"
        args = ["run", str(job), "--config", str(_config(tmp_path)), "--out", str(link)]
        assert cli.main(args) == 0
        (tmp_path / "runs").mkdir()
        target = tmp_path / "runs" / "day1.jsonl"
        link.rename(target)  # as an older broker left it: the ledger beside the link
        link.symlink_to(target)
        capsys.readouterr()
        assert cli.main(args) == 0
        assert "already complete" in capsys.readouterr().err
        assert link.is_symlink()

    @pytest.mark.parametrize("name", ["res.csv.gz", "res.jsonl.GZ", "res.xz"])
    @pytest.mark.parametrize("fmt", [None, "csv"])
    def test_a_compressed_out_name_is_refused(
        self,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        name: str,
        fmt: str | None,
    ) -> None:
        """--out res.csv.gz is a usage error (exit 2) saying the output is written plain,
        before anything is sent or made; it wrote JSON lines, uncompressed, under that name."""
        job = _job(tmp_path)
        out = tmp_path / name
        args = ["run", str(job), "--config", str(_config(tmp_path)), "--out", str(out)]
        assert cli.main([*args, *(["--format", fmt] if fmt else [])]) == ExitCode.USAGE
        err = capsys.readouterr().err
        assert "written uncompressed" in err
        assert f"name it {Path(name).stem}" in err
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("res")]

    @pytest.mark.parametrize("name", ["res.tsv", "res.JSON", "res.xlsx"])
    def test_an_out_named_for_a_format_not_written_needs_format(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
    ) -> None:
        """--out res.tsv is a usage error (exit 2) naming the formats written (it wrote JSON
        lines into res.tsv); with --format the name is taken and holds that format."""
        job = _job(tmp_path)
        out = tmp_path / name
        args = ["run", str(job), "--config", str(_config(tmp_path)), "--out", str(out)]
        assert cli.main(args) == ExitCode.USAGE
        assert "name it .jsonl, .csv or .sqlite, or give --format" in capsys.readouterr().err
        assert not out.exists()
        assert cli.main([*args, "--format", "csv"]) == ExitCode.OK
        assert out.read_text().startswith("line,")

    def test_format_flag_wins_over_the_out_name(self, tmp_path: Path) -> None:
        """--format jsonl --out x.csv writes what --format says."""
        job = _job(tmp_path)
        out = tmp_path / "x.csv"
        args = ["run", str(job), "--config", str(_config(tmp_path)), "--out", str(out)]
        assert cli.main([*args, "--format", "jsonl"]) == ExitCode.OK
        assert out.read_bytes().startswith(b'{"line":1')

    def test_jsonl_pass_through_fields_keep_their_json_types(self, tmp_path: Path) -> None:
        """A JSON Lines job's own fields come back as the values they were in JSON Lines
        output (an integer id joins back), and as compact JSON text in CSV cells."""
        job = tmp_path / "job.jsonl"
        job.write_text('{"asin": "B0TEST0001", "id": 7, "flags": [1, true], "note": null}\n')
        config = str(_config(tmp_path))
        jsonl, csv_out = tmp_path / "out.jsonl", tmp_path / "out.csv"
        assert cli.main(["run", str(job), "--config", config, "--out", str(jsonl)]) == 0
        (row,) = _jsonl(jsonl.read_text())
        assert row["extra"] == {"id": 7, "flags": [1, True], "note": None}
        assert cli.main(["run", str(job), "--config", config, "--out", str(csv_out)]) == 0
        header, line = csv_out.read_text().splitlines()
        cells = dict(zip(header.split(","), next(csv.reader([line])), strict=True))
        assert (cells["id"], cells["flags"], cells["note"]) == ("7", "[1,true]", "")

    def test_jsonl_nan_and_infinity_pass_through_as_text(self, tmp_path: Path) -> None:
        """A NaN or an infinity in a JSON Lines field (Python's json reads them) comes back as
        its text, so every output line stays valid JSON."""
        job = tmp_path / "job.jsonl"
        job.write_text('{"asin": "B0TEST0001", "x": NaN, "big": 1e999, "ok": [1.5]}\n')
        out = tmp_path / "out.jsonl"
        assert (
            cli.main(["run", str(job), "--config", str(_config(tmp_path)), "--out", str(out)]) == 0
        )
        (line,) = out.read_text().splitlines()
        row = json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name} in output"))
        assert row["extra"] == {"x": "NaN", "big": "Infinity", "ok": [1.5]}

    def test_missing_input_leaves_no_lock_or_directory(self, tmp_path: Path) -> None:
        """A missing job file exits 66 and creates nothing (no out/, no lock file)."""
        out = tmp_path / "out" / "x.jsonl"
        code = cli.main(
            ["run", str(tmp_path / "x.txt"), "--config", str(_config(tmp_path)), "--out", str(out)]
        )
        assert code == ExitCode.NO_INPUT
        assert not (tmp_path / "out").exists()

    @pytest.mark.parametrize("kind", ["fifo", "directory"])
    def test_job_that_is_not_a_regular_file_is_a_usage_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
    ) -> None:
        """A pipe (read once, so it would look empty) or a directory as the job: exit 2."""
        job = tmp_path / "job.txt"
        if kind == "fifo":
            os.mkfifo(job)
        else:
            job.mkdir()
        out = tmp_path / "out" / "x.jsonl"
        code = cli.main(["run", str(job), "--config", str(_config(tmp_path)), "--out", str(out)])
        assert code == ExitCode.USAGE
        err = capsys.readouterr().err
        assert ("broker run -" in err) if kind == "fifo" else ("directory" in err)
        assert not (tmp_path / "out").exists()

    @pytest.mark.parametrize(
        "flags", [["--encoding", "bogus"], ["--encoding", "utf-16"], ["--out", "outdir"]]
    )
    def test_bad_encoding_or_directory_output_is_usage_and_writes_nothing(
        self, tmp_path: Path, flags: list[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An encoding no job can be read with, or --out naming a directory: exit 2, no files."""
        monkeypatch.chdir(tmp_path)
        job = _job(tmp_path)
        (tmp_path / "outdir").mkdir()
        config = _config(tmp_path)
        before = sorted(p.name for p in tmp_path.iterdir())
        try:
            code: object = cli.main(["run", str(job), "--config", str(config), *flags])
        except SystemExit as exc:  # argparse's own usage error
            code = exc.code
        assert code == ExitCode.USAGE
        assert sorted(p.name for p in tmp_path.iterdir()) == before
        assert list((tmp_path / "outdir").iterdir()) == []

    @pytest.mark.parametrize("job", ["mx.csv.gz", "mx.csv.GZ", "mx.csv.Gz", "mx.csv"])
    def test_default_output_drops_gz_in_any_case(self, tmp_path: Path, job: str) -> None:
        """The default output of x.csv.GZ is out/x.jsonl, as for x.csv.gz (the reader takes
        .GZ as gzip; the name kept it: out/x.csv.jsonl)."""
        from broker.jobs.paths import plan_paths

        paths = plan_paths(job=str(tmp_path / job), out=None, fmt="jsonl", directory=tmp_path)
        assert paths.out == tmp_path / "mx.jsonl"

    def test_stdin_copy_is_renamed_into_place(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A run still reading its stdin copy keeps its own bytes when another ``-`` run
        starts a new job (--new-job) over it."""
        from broker.jobs.paths import plan_paths

        paths = plan_paths(job="-", out=str(tmp_path / "o.jsonl"), fmt="jsonl", directory=tmp_path)
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"B0FIRST001\n")))
        paths.read_stdin()
        with paths.job.open("rb") as reading:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"B0OTHER002\n")))
            paths.read_stdin(new_job=True)
            assert reading.read() == b"B0FIRST001\n"
        assert paths.job.read_bytes() == b"B0OTHER002\n"
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    def test_a_copy_left_by_a_killed_run_is_swept(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A run killed (kill -9) while copying its stdin leaves its partial copy; the next
        run of that output removes it, but not a copy another run still holds (reading its
        pipe) nor one made a moment ago. They stayed for ever, one per kill."""
        from broker.jobs.paths import plan_paths

        paths = plan_paths(job="-", out=str(tmp_path / "o.jsonl"), fmt="jsonl", directory=tmp_path)
        killed, held, new = (
            tmp_path / f".{paths.job.name}.{suffix}"
            for suffix in ("k1ll3d00", "h3ld0000", "n3w00000")
        )
        a_minute_ago = time.time() - 60
        for left in (killed, held, new):
            left.write_bytes(b"B0FIRST001\n")
        for left in (killed, held):
            os.utime(left, (a_minute_ago, a_minute_ago))
        with held.open("rb") as holder:
            fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"B0FIRST001\n")))
            paths.read_stdin()
        left_over = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
        assert left_over == sorted([held.name, new.name])

    @pytest.mark.parametrize("other", [b"", b"B0FIRST001\n"])
    def test_other_stdin_never_replaces_the_saved_copy_of_a_job(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other: bytes
    ) -> None:
        """Other bytes on stdin (an empty pipe, a part of the input) for an output whose job
        exists: exit 65 and the saved copy kept, so the same input still runs the job; the
        same bytes again are accepted."""
        saved = b"B0FIRST001\nB0SECOND02\n"
        out = tmp_path / "o" / "a.jsonl"
        copy = out.with_name("a.jsonl.stdin.txt")
        assert _stdin_run(tmp_path, monkeypatch, saved, "--out", str(out)) == ExitCode.OK
        assert _stdin_run(tmp_path, monkeypatch, other, "--out", str(out)) == ExitCode.DATA_ERROR
        assert copy.read_bytes() == saved
        assert _stdin_run(tmp_path, monkeypatch, saved, "--out", str(out)) == ExitCode.OK
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []

    def test_refresh_runs_other_stdin_as_the_jobs_new_input(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A daily cron's ``produce-list | broker run - --refresh``: the new list is the
        job's input and the output holds its rows. It was refused (exit 65, "add
        --new-job"), though --refresh is the README's remedy for a regenerated list."""
        out = tmp_path / "o" / "a.jsonl"
        copy = out.with_name("a.jsonl.stdin.txt")
        day1, day2 = b"B0FIRST001\n", b"B0FIRST001\nB0SECOND02\nB0THIRD003\n"
        assert _stdin_run(tmp_path, monkeypatch, day1, "--out", str(out)) == ExitCode.OK
        args = ("--out", str(out), "--refresh")
        assert _stdin_run(tmp_path, monkeypatch, day2, *args) == ExitCode.OK
        assert copy.read_bytes() == day2
        assert sorted(row["asin"] for row in _jsonl(out.read_text())) == [
            "B0FIRST001",
            "B0SECOND02",
            "B0THIRD003",
        ]

    @pytest.mark.parametrize("then", ["day1", "day2"])
    def test_stopped_refresh_of_other_stdin_keeps_the_jobs_saved_input(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, then: str
    ) -> None:
        """``--refresh`` with a new list on stdin, stopped before it completes, leaves the
        previous output with the input it was made from: the old list still reruns its job
        and the next ``--refresh`` (of either list) completes with that list's rows. The new
        list replaced the saved copy at once, so the old list was refused (65)."""
        from broker.jobs import runner

        out = tmp_path / "o" / "a.jsonl"
        copy = out.with_name("a.jsonl.stdin.txt")
        inputs = {"day1": b"B0FIRST001\n", "day2": b"B0FIRST001\nB0SECOND02\n"}
        assert _stdin_run(tmp_path, monkeypatch, inputs["day1"], "--out", str(out)) == 0

        async def stopped(*args: object, **kwargs: object) -> None:
            raise OSError(28, "No space left on device")

        with monkeypatch.context() as patch:
            patch.setattr(runner, "_fetch", stopped)
            args = ("--out", str(out), "--refresh")
            code = _stdin_run(tmp_path, monkeypatch, inputs["day2"], *args)
        assert code == ExitCode.IO_ERROR
        assert copy.read_bytes() == inputs["day1"]
        assert _stdin_run(tmp_path, monkeypatch, inputs["day1"], "--out", str(out)) == 0
        args = ("--out", str(out), "--refresh")
        assert _stdin_run(tmp_path, monkeypatch, inputs[then], *args) == ExitCode.OK
        assert copy.read_bytes() == inputs[then]
        rows = {row["asin"] for row in _jsonl(out.read_text())}
        assert len(rows) == inputs[then].count(b"\n")
        assert sorted(p.name for p in out.parent.iterdir() if "refresh" in p.name) == []

    def test_other_stdin_under_another_input_format_names_the_copy_kept(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A CSV piped with --input csv to the output of a plain-text stdin job is refused
        naming the copy that exists (``.stdin.txt``), not one it would have made."""
        out = tmp_path / "o" / "a.jsonl"
        assert _stdin_run(tmp_path, monkeypatch, b"B0FIRST001\n", "--out", str(out)) == 0
        capsys.readouterr()
        csv_input = b"asin\nB0FIRST001\n"
        args = ("--out", str(out), "--input", "csv")
        assert _stdin_run(tmp_path, monkeypatch, csv_input, *args) == ExitCode.DATA_ERROR
        err = capsys.readouterr().err
        assert "a.jsonl.stdin.txt, kept as it is" in err
        assert "stdin.csv" not in err

    def test_a_stdin_that_cannot_be_read_is_unreadable_input(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """``broker run - 0>/dev/null`` (stdin open for writing only, as under nohup on a
        terminal) says it cannot read the job from stdin, exit 66: it said "cannot write:
        Bad file descriptor", exit 74."""
        fd = os.open(os.devnull, os.O_WRONLY)
        stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(fd, "r", closefd=True)))
        monkeypatch.setattr(sys, "stdin", stdin)
        try:
            argv = ["run", "-", "--config", str(_config(tmp_path)), "--progress", "none"]
            code = cli.main([*argv, "--out", str(tmp_path / "x.jsonl")])
        finally:
            stdin.close()
        err = capsys.readouterr().err
        assert code == ExitCode.NO_INPUT, err
        assert "cannot read the job from stdin: Bad file descriptor" in err

    def test_a_full_disk_under_the_stdin_copy_names_the_copy(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A full disk while stdin is saved says which file it could not write (exit 74),
        and leaves no partial copy: it said "cannot write: No space left on device"."""
        from broker.jobs import paths

        def full(target: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(paths, "_copy_stdin", full)
        code = _stdin_run(
            tmp_path, monkeypatch, b"B0C1234567\n", "--out", str(tmp_path / "a.jsonl")
        )
        err = capsys.readouterr().err
        assert code == ExitCode.IO_ERROR, err
        assert re.search(r"cannot write: .*/\.a\.jsonl\.stdin\.txt\.\w+: No space left", err), err
        assert not list(tmp_path.glob(".a.jsonl.stdin.txt.*"))

    @pytest.mark.parametrize("out", ["-", "a.jsonl"])
    def test_a_bad_line_on_stdin_is_named_as_stdin(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        out: str,
    ) -> None:
        """A CSV on stdin without an asin column is refused as "stdin: line 1", not under
        the path of the copy read (for --out -, in a temporary folder gone at exit)."""
        args = ("--out", out if out == "-" else str(tmp_path / out), "--input", "csv")
        assert _stdin_run(tmp_path, monkeypatch, b"B0FIRST001\n", *args) == ExitCode.DATA_ERROR
        err = capsys.readouterr().err
        assert ": stdin: line 1: the CSV header has no 'asin' column" in err
        assert ".stdin.csv" not in err

    def test_json_lines_on_stdin_without_input_jsonl_are_refused_then_run_with_it(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """JSON Lines piped in without --input jsonl are refused (65, saying to give it),
        and the same bytes then run with it: read as ids, every row was invalid, the run
        ended 0, and the rerun with --input jsonl was refused as other input."""
        job = b'{"asin": "B0FIRST001", "sku": "a"}\n{"asin": "B0FIRST002", "sku": "b"}\n'
        out = tmp_path / "o" / "a.jsonl"
        assert _stdin_run(tmp_path, monkeypatch, job, "--out", str(out)) == ExitCode.DATA_ERROR
        err = capsys.readouterr().err
        assert "stdin: line 1 is a JSON object with an asin field" in err
        assert "give --input jsonl" in err
        args = ("--out", str(out), "--input", "jsonl")
        assert _stdin_run(tmp_path, monkeypatch, job, *args) == ExitCode.OK
        assert sorted(row["asin"] for row in _jsonl(out.read_text())) == [
            "B0FIRST001",
            "B0FIRST002",
        ]

    def test_fixed_stdin_after_a_refused_first_run_is_accepted(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A first run refused before it made a job (--strict, an invalid row) leaves no job
        to resume: the fixed input on the next run replaces the copy and runs."""
        out = tmp_path / "o" / "a.jsonl"
        bad, fixed = b"B0FIRST001\nnot-an-asin\n", b"B0FIRST001\n"
        strict = ("--out", str(out), "--strict")
        assert _stdin_run(tmp_path, monkeypatch, bad, *strict) == ExitCode.DATA_ERROR
        assert _stdin_run(tmp_path, monkeypatch, fixed, *strict) == ExitCode.OK
        assert len(_jsonl(out.read_text())) == 1

    def test_new_job_never_replaces_the_copy_of_a_job_another_process_runs(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """--new-job with other input while another process holds the job: refused (65,
        naming the holder) before the copy that process reads is touched."""
        from broker.jobs.lock import JobLock

        saved = b"B0FIRST001\n"
        out = tmp_path / "o" / "a.jsonl"
        copy = out.with_name("a.jsonl.stdin.txt")
        assert _stdin_run(tmp_path, monkeypatch, saved, "--out", str(out)) == ExitCode.OK
        with JobLock(out.with_name("a.jsonl.ledger")):  # the other process's run
            args = ("--out", str(out), "--new-job")
            code = _stdin_run(tmp_path, monkeypatch, b"B0OTHER002\n", *args)
        assert code == ExitCode.DATA_ERROR
        assert copy.read_bytes() == saved

    def test_stdin_to_stdout(self, tmp_path: Path) -> None:
        """``broker run - --out -`` reads ASINs on stdin and writes only JSON lines to stdout."""
        config = _config(tmp_path)
        proc = subprocess.run(
            [sys.executable, "-m", "broker", "run", "-", "--out", "-", "--config", str(config)],
            input="B0TEST0001\nB0TEST0002\nnot-an-asin\n",
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        rows = _jsonl(proc.stdout)
        assert sorted(str(row["input"]) for row in rows) == [
            "B0TEST0001",
            "B0TEST0002",
            "not-an-asin",
        ]
        assert not (tmp_path / "-").exists()
        assert not (tmp_path / "out").exists()

    @pytest.mark.parametrize("command", ["lookup", "run"])
    def test_reader_gone_is_quiet(self, tmp_path: Path, command: str) -> None:
        """stdout's reader leaving (``| head``) ends the command quietly with 141, no traceback."""
        config = str(_config(tmp_path))
        asins = [f"B0PIPE{i:04d}" for i in range(40)]
        if command == "lookup":
            args = ["lookup", "--json", *asins, "--config", config]
        else:
            job = tmp_path / "job.txt"
            job.write_text("\n".join(asins) + "\n")
            args = ["run", str(job), "--out", "-", "--config", config]
        err = _with_stdout_gone(tmp_path, args)
        assert "Traceback" not in err
        assert "BrokenPipeError" not in err

    def test_a_run_whose_reader_left_logs_its_end(self, tmp_path: Path) -> None:
        """``broker run --out - | head``: the run's closing event is logged with exit 141
        (info: the reader chose to stop), not left out, which read as a run that died after
        ``broker.job_started``."""
        job = tmp_path / "job.txt"
        job.write_text("".join(f"B0PIPE{i:04d}\n" for i in range(40)))
        args = ["run", str(job), "--out", "-", "--config", str(_config(tmp_path))]
        err = _with_stdout_gone(tmp_path, args)
        (finished,) = [
            json.loads(line) for line in err.splitlines() if '"broker.job_finished"' in line
        ]
        assert (finished["exit_code"], finished["level"]) == (141, "info")
        assert finished["rows"]["total"] == 40
        assert "reader" in finished["stdout"]

    def test_cache_purge_into_a_gone_reader_is_quiet(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """cache purge whose stdout reader left ends with 141 and no message, as cache stats
        does; it exited 74 saying the cache might be damaged, after purging it."""
        config = str(_config(tmp_path))
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
        assert cli.main(["lookup", "--json", "B0PIPE0001", "--config", config]) == 0
        err = _with_stdout_gone(tmp_path, ["cache", "purge", "--config", config])
        assert "cannot be used" not in err
        assert "Traceback" not in err


def _with_stdout_gone(tmp_path: Path, args: list[str], *, after: int = 0) -> str:
    """Run ``broker ARGS`` whose stdout reader is gone before the first line (or after
    reading ``after`` bytes); exit 141 is asserted, its stderr returned."""
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    with subprocess.Popen(
        [sys.executable, "-m", "broker", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=env,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        if after:
            assert proc.stdout.read(after)
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == ExitCode.BROKEN_PIPE
    return err


class TestReruns:
    def _stopped_run(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> int:
        """A run whose fetch fails at once (a full disk): nothing fetched, exit 74."""
        from broker.jobs import runner

        async def stopped(*args: object, **kwargs: object) -> None:
            raise OSError(28, "No space left on device")

        with monkeypatch.context() as patch:
            patch.setattr(runner, "_fetch", stopped)
            return self._run(tmp_path, *extra)

    def _run(self, tmp_path: Path, *extra: str) -> int:
        job = tmp_path / "job.txt"
        return cli.main(
            [
                "run",
                str(job),
                "--config",
                str(_config(tmp_path)),
                "--out",
                str(tmp_path / "out.jsonl"),
                "--progress",
                "none",
                *extra,
            ]
        )

    def test_finished_job_says_it_is_complete(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A rerun of a finished job says complete, when fetched, and how to fetch again."""
        _job(tmp_path)
        assert self._run(tmp_path) == ExitCode.OK
        capsys.readouterr()
        assert self._run(tmp_path) == ExitCode.OK
        err = capsys.readouterr().err
        assert "this job is already complete (5 rows, fetched 20" in err
        assert "--refresh" in err
        assert "requests 0," in err

    @pytest.mark.parametrize(
        "how", [("--refresh",), ("--ordered",), ("--format", "csv"), ("--new-job",)]
    )
    def test_a_replaced_output_keeps_its_mode_and_group(
        self, tmp_path: Path, how: tuple[str, ...]
    ) -> None:
        """An output --refresh, --ordered or another --format replaces keeps the mode and
        group the user gave it, as a plain resume and --new-job (which starts it over in
        place) do: it became 0644, the chgrp lost."""
        _job(tmp_path)
        assert self._run(tmp_path) == ExitCode.OK
        out = tmp_path / "out.jsonl"
        out.chmod(0o600)
        others = [g for g in os.getgroups() if g != out.stat().st_gid]
        group = others[0] if others else (4242 if os.geteuid() == 0 else None)
        if group is not None:
            os.chown(out, -1, group)
        assert self._run(tmp_path, *how) == ExitCode.OK
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        if group is not None:
            assert out.stat().st_gid == group

    @pytest.mark.parametrize("fmt", ["jsonl", "sqlite"])
    def test_a_refresh_under_way_has_the_outputs_mode_from_its_first_byte(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
    ) -> None:
        """The new output of a --refresh stopped before it completes (a full disk here) has
        the old output's mode: it was 0644 (new rows readable by all) until the refresh was
        put in place."""
        from broker.jobs import runner

        _job(tmp_path)
        out = tmp_path / f"out.{fmt}"
        assert self._run(tmp_path, "--out", str(out), "--format", fmt) == ExitCode.OK
        out.chmod(0o600)

        async def stopped(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        with monkeypatch.context() as patch:
            patch.setattr(runner, "_fetch", stopped)
            code = self._run(tmp_path, "--out", str(out), "--format", fmt, "--refresh")
        assert code == ExitCode.IO_ERROR
        side = out.with_name(out.name + ".refresh")
        assert stat.S_IMODE(side.stat().st_mode) == 0o600

    def test_a_refresh_whose_files_still_have_a_wal_is_not_promoted(self, tmp_path: Path) -> None:
        """A refresh's new output or ledger whose -wal still holds pages (a viewer kept them
        there) is not put in place: moved without it, it would be damaged or short."""
        from broker.jobs import runner

        out = tmp_path / "out.jsonl"
        side = out.with_name("out.jsonl.refresh")
        side.write_text("{}\n")
        side.with_name(side.name + "-wal").write_bytes(b"pages")
        with pytest.raises(OSError, match="still in its -wal") as caught:
            runner._promote(side, out)
        assert caught.value.errno == errno.EBUSY
        assert not side.with_name(side.name + ".promote").exists()
        assert side.exists()
        assert not out.exists()

    def test_a_second_signal_ends_the_last_write_between_pages(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two SIGTERMs during the run's last write (every row committed at the end, a page
        of one row each) stop it between pages; the rerun writes the rest, each row once.
        The second signal did nothing there (the fetch had ended), and a long last write
        ran to its end."""
        from broker.jobs import runner, signals

        # Two signals a loop turn apart would be one signal and its copy (ECHO_S).
        monkeypatch.setattr(signals, "ECHO_S", 0.0)
        monkeypatch.setattr(runner, "_COMMIT_ROWS", 10**9)
        monkeypatch.setattr(runner, "_COMMIT_EVERY_S", 3600.0)
        monkeypatch.setattr(runner, "_EMIT_ROWS", 1)
        real_emit = runner._emit
        calls: list[int | None] = []

        def emit(*args: Any, pages: int | None = None) -> bool:
            calls.append(pages)
            # The first call is the output's opening one (nothing done yet); the last write
            # begins with the second.
            if len(calls) in (2, 3):
                os.kill(os.getpid(), signal.SIGTERM)
            return real_emit(*args, pages=pages)

        monkeypatch.setattr(runner, "_emit", emit)
        _job(tmp_path)
        self._run(tmp_path)
        out = tmp_path / "out.jsonl"
        assert len(_jsonl(out.read_text())) < 5
        monkeypatch.setattr(runner, "_emit", real_emit)
        assert self._run(tmp_path) == ExitCode.OK
        assert sorted(row["line"] for row in _jsonl(out.read_text())) == [1, 2, 3, 4, 5]

    def test_the_last_write_leaves_the_event_loop_free(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A run's last write to the output goes a page at a time, the loop turning between
        pages: a million rows of a few ASINs took half a minute in one write at the end,
        deaf to a second signal and a daemon's /healthz."""
        from broker.jobs import runner

        real_emit = runner._emit
        whole: list[int | None] = []

        def emit(*args: Any, pages: int | None = None) -> bool:
            if pages is None:
                whole.append(pages)
            return real_emit(*args, pages=pages)

        monkeypatch.setattr(runner, "_emit", emit)
        _job(tmp_path)
        assert self._run(tmp_path) == ExitCode.OK
        assert len(_jsonl((tmp_path / "out.jsonl").read_text())) == 5
        assert whole == []

    def test_refresh_runs_the_job_file_as_it_is_now(self, tmp_path: Path) -> None:
        """--refresh of a list regenerated since (a daily cron) fetches the new list."""
        job = _job(tmp_path)
        assert self._run(tmp_path) == ExitCode.OK
        with job.open("a") as handle:
            handle.write("B0NEWAAAAA\n")
        assert self._run(tmp_path, "--refresh") == ExitCode.OK
        rows = _jsonl((tmp_path / "out.jsonl").read_text())
        assert len(rows) == 6
        assert "B0NEWAAAAA" in {row["input"] for row in rows}

    def test_refresh_fetches_again_and_replaces_on_completion(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--refresh fetches every row again; the new output replaces the old one."""
        _job(tmp_path)
        assert self._run(tmp_path) == ExitCode.OK
        out = tmp_path / "out.jsonl"
        first = {row["line"]: row["fetched_at"] for row in _jsonl(out.read_text())}
        time.sleep(0.01)
        capsys.readouterr()
        assert self._run(tmp_path, "--refresh") == ExitCode.OK
        assert "requests" in capsys.readouterr().err
        second = {row["line"]: row["fetched_at"] for row in _jsonl(out.read_text())}
        assert second.keys() == first.keys()
        assert all(str(second[n]) > str(first[n]) for n in first)
        leftovers = sorted(p.name for p in tmp_path.iterdir() if "refresh" in p.name)
        assert leftovers == []
        capsys.readouterr()
        assert self._run(tmp_path) == ExitCode.OK
        assert "already complete" in capsys.readouterr().err

    def test_stopped_refresh_keeps_the_previous_output(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A refresh that fails before completing leaves the previous complete output, and
        its rows line counts the refresh's rows (the previous run's, all ok, were shown)."""
        _job(tmp_path)
        assert self._run(tmp_path) == ExitCode.OK
        out = tmp_path / "out.jsonl"
        before = out.read_bytes()
        capsys.readouterr()
        assert self._stopped_run(tmp_path, monkeypatch, "--refresh") == ExitCode.IO_ERROR
        err = capsys.readouterr().err
        assert "rows: 5 (none done); pending 5" in err
        assert "the refresh replaces it when it completes" in err
        assert out.read_bytes() == before
        assert self._run(tmp_path, "--refresh") == ExitCode.OK
        assert out.read_bytes() != before
        assert len(_jsonl(out.read_text())) == 5

    @pytest.mark.parametrize("fmt", ["jsonl", "sqlite"])
    def test_a_refresh_whose_files_a_full_disk_keeps_in_their_wal_is_not_promoted(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        fmt: str,
    ) -> None:
        """A --refresh whose new ledger (and SQLite output) a full disk keeps partly in their
        -wal at close exits 74 naming the file and leaves the previous output and ledger in
        place; the next --refresh completes it. It exited 0 and moved them into place
        without their -wal: the next run found the ledger damaged (65)."""
        from broker.jobs.ledger import Ledger
        from broker.jobs.sinks import SqliteSink

        _job(tmp_path)
        out = tmp_path / f"out.{fmt}"
        run = ["run", str(tmp_path / "job.txt"), "--config", str(_config(tmp_path))]
        run += ["--out", str(out), "--progress", "none", "--format", fmt]
        assert cli.main(run) == ExitCode.OK
        before = out.read_bytes()

        def full_at_close(close: Any) -> Any:
            def closing(self: Any) -> None:
                if ".refresh" in str(getattr(self, "path", "")):
                    self._conn = FullAtCheckpoint(self._conn)
                close(self)

            return closing

        capsys.readouterr()
        with monkeypatch.context() as patch:
            patch.setattr(Ledger, "close", full_at_close(Ledger.close))
            patch.setattr(SqliteSink, "close", full_at_close(SqliteSink.close))
            assert cli.main([*run, "--refresh"]) == ExitCode.IO_ERROR
        err = capsys.readouterr().err
        first = "out.sqlite.refresh:" if fmt == "sqlite" else "out.jsonl.refresh.ledger:"
        assert f"{first} disk full" in err
        assert out.read_bytes() == before
        assert not list(tmp_path.glob("*.promote"))
        assert cli.main(run) == ExitCode.OK  # the previous ledger: whole, complete
        assert "already complete" in capsys.readouterr().err
        assert cli.main([*run, "--refresh"]) == ExitCode.OK
        assert out.read_bytes() != before
        assert sorted(p.name for p in tmp_path.iterdir() if "refresh" in p.name) == []
        assert cli.main(run) == ExitCode.OK
        assert "already complete" in capsys.readouterr().err

    def test_changed_resources_are_refused_not_mixed(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A job stopped, its config's api.resources changed, then resumed: refused (65)
        naming the setting, instead of writing items of two resource lists into one
        output; --refresh fetches it again under the new list."""
        _job(tmp_path)
        assert self._stopped_run(tmp_path, monkeypatch) == ExitCode.IO_ERROR
        _config(tmp_path, embedded_toml(simulator="seed = 3", api='resources = ["itemInfo.title"]'))
        capsys.readouterr()
        job = tmp_path / "job.txt"
        args = ["run", str(job), "--out", str(tmp_path / "out.jsonl"), "--progress", "none"]
        config = ["--config", str(tmp_path / "config.toml")]
        assert cli.main([*args, *config]) == ExitCode.DATA_ERROR
        err = capsys.readouterr().err
        assert "api.resources" in err
        assert "--refresh" in err
        assert cli.main([*args, *config, "--refresh"]) == ExitCode.OK
        rows = _jsonl((tmp_path / "out.jsonl").read_text())
        assert len(rows) == 5
        assert all(row["item"]["offersV2"] is None for row in rows)  # type: ignore[index]

    def test_stopped_refresh_of_a_regenerated_list_starts_over(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A --refresh stopped before the list was regenerated (a daily cron) starts over on
        the new list at the next --refresh instead of refusing it; the previous output stays
        until the new one completes."""
        job = _job(tmp_path)
        assert self._run(tmp_path) == ExitCode.OK
        out = tmp_path / "out.jsonl"
        before = out.read_bytes()
        assert self._stopped_run(tmp_path, monkeypatch, "--refresh") == ExitCode.IO_ERROR
        with job.open("a") as handle:
            handle.write("B0NEWAAAAA\n")
        assert out.read_bytes() == before
        assert self._run(tmp_path, "--refresh") == ExitCode.OK
        rows = _jsonl(out.read_text())
        assert len(rows) == 6
        assert "B0NEWAAAAA" in {row["input"] for row in rows}

    def test_promotion_interrupted_by_a_crash_is_finished_next_time(self, tmp_path: Path) -> None:
        """A crash after the new output moved but before the ledger did is finished later."""
        from broker.jobs import runner

        out = tmp_path / "out.jsonl"
        side = tmp_path / "out.jsonl.refresh"
        for path, text in [
            (out, "old rows"),
            (tmp_path / "out.jsonl.ledger", "old ledger"),
            (tmp_path / "out.jsonl.ledger-wal", "old journal"),
            (side, "new rows"),
            (tmp_path / "out.jsonl.refresh.ledger", "new ledger"),
        ]:
            path.write_text(text)
        marker = tmp_path / "out.jsonl.refresh.promote"
        marker.touch()
        side.replace(out)  # the crash came right after the output moved
        runner.finish_promotion(out)
        assert out.read_text() == "new rows"
        assert (tmp_path / "out.jsonl.ledger").read_text() == "new ledger"
        assert not (tmp_path / "out.jsonl.ledger-wal").exists()
        # The job's lock file stays, as every lock file does (see broker/jobs/lock.py).
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == ["out.jsonl", "out.jsonl.ledger", "out.jsonl.ledger.lock"]
        runner.finish_promotion(out)  # nothing under way: a no-op
        assert out.read_text() == "new rows"

    def test_promotion_makes_a_refreshs_stdin_the_jobs_saved_input(self, tmp_path: Path) -> None:
        """A refresh of a ``-`` job that read other input (here under --input csv) makes it
        the job's saved input when promoted, even after a crash half-way (the new output
        moved already); the copy of the input it replaced goes."""
        from broker.jobs import runner

        out = tmp_path / "out.jsonl"
        for path, text in [
            (out, "old rows"),
            (tmp_path / "out.jsonl.ledger", "old ledger"),
            (tmp_path / "out.jsonl.stdin.txt", "old input"),
            (tmp_path / "out.jsonl.refresh.ledger", "new ledger"),
            (tmp_path / "out.jsonl.refresh.stdin.csv", "new input"),
        ]:
            path.write_text(text)
        (tmp_path / "out.jsonl.refresh.promote").touch()
        runner.finish_promotion(out)
        assert (tmp_path / "out.jsonl.stdin.csv").read_text() == "new input"
        assert (tmp_path / "out.jsonl.ledger").read_text() == "new ledger"
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == [
            "out.jsonl",
            "out.jsonl.ledger",
            "out.jsonl.ledger.lock",
            "out.jsonl.stdin.csv",
        ]

    def test_a_promotion_another_process_makes_is_left_to_it(self, tmp_path: Path) -> None:
        """A run started while another process promotes its completed refresh (holding the
        job's lock) is refused as for a job in use and touches nothing; it finished that
        promotion itself, without the lock, racing the other process's file moves."""
        from broker.jobs import runner
        from broker.jobs.lock import JobLock, JobLockedError

        out = tmp_path / "out.jsonl"
        for path, text in [
            (out, "old rows"),
            (tmp_path / "out.jsonl.ledger", "old ledger"),
            (tmp_path / "out.jsonl.refresh", "new rows"),
            (tmp_path / "out.jsonl.refresh.ledger", "new ledger"),
        ]:
            path.write_text(text)
        (tmp_path / "out.jsonl.refresh.promote").touch()
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
        with JobLock(tmp_path / "out.jsonl.ledger"):
            with pytest.raises(JobLockedError):
                runner.finish_promotion(out)
            after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix != ".lock"}
        assert after == before

    def test_an_ordering_stopped_by_a_signal_says_so_once(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--ordered on a complete job stopped by a signal while it orders: exit 75 and one
        message saying the same command orders it; it also said "run the same command again
        to resume" and "already complete ... --refresh", each wrong here."""
        from broker.jobs import runner

        _job(tmp_path, 40)
        assert self._run(tmp_path) == ExitCode.OK
        capsys.readouterr()
        monkeypatch.setattr(runner, "_export_ordered", lambda *args, **kwargs: False)
        assert self._run(tmp_path, "--ordered") == ExitCode.RESUMABLE
        err = capsys.readouterr().err
        assert "run the same command again to order it" in err
        assert "to resume" not in err
        assert "already complete" not in err

    def test_ordered_writes_rows_in_input_order(self, tmp_path: Path) -> None:
        """--ordered: the finished output lists rows in input order."""
        _job(tmp_path, 40)
        assert self._run(tmp_path, "--ordered") == ExitCode.OK
        lines = [row["line"] for row in _jsonl((tmp_path / "out.jsonl").read_text())]
        assert lines == list(range(1, 41))
        assert self._run(tmp_path, "--ordered") == ExitCode.OK
        assert len(_jsonl((tmp_path / "out.jsonl").read_text())) == 40

    def test_ordered_rerun_of_a_complete_job_leaves_the_ordered_output_alone(
        self, tmp_path: Path
    ) -> None:
        """--ordered again on a complete job whose output is already in order does not
        rewrite it (a minute per million rows): the same file, not a new copy."""
        _job(tmp_path, 40)
        out = tmp_path / "out.jsonl"
        assert self._run(tmp_path, "--ordered") == ExitCode.OK
        inode, text = out.stat().st_ino, out.read_text()
        assert self._run(tmp_path, "--ordered") == ExitCode.OK
        assert (out.stat().st_ino, out.read_text()) == (inode, text)

    @pytest.mark.parametrize("flags", [(), ("--ordered",)])
    def test_a_rerun_after_a_cell_was_edited_longer_leaves_every_row_whole(
        self, tmp_path: Path, flags: tuple[str, ...]
    ) -> None:
        """A complete job's output with one cell made longer by hand, run again: it said
        "already complete; nothing was fetched" and cut the last row in two. The output
        is written again from the ledger (ordered again with --ordered)."""
        _job(tmp_path, 40)
        out = tmp_path / "out.jsonl"
        assert self._run(tmp_path, *flags) == ExitCode.OK
        written = out.read_text()
        edited = written.replace('"status":"ok"', '"status":"ok (checked)"', 1)
        assert edited != written
        out.write_text(edited)
        assert self._run(tmp_path, *flags) == ExitCode.OK
        assert out.read_text() == written

    def test_a_csv_output_an_older_broker_began_is_written_again_under_this_one(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A CSV job begun before formula-like cells got their leading ' (ledger version 2),
        resumed now: the output is written again in full, every such cell escaped; resumed
        as it was, the rows before the upgrade kept live formulas beside escaped ones."""
        import sqlite3

        job = tmp_path / "job.csv"
        notes = ["-" if i % 5 == 0 else "x" for i in range(19)] + ["x"]
        job.write_text("asin,note\n" + "".join(f"B0TEST{i:04d},{n}\n" for i, n in enumerate(notes)))
        out = tmp_path / "out.csv"
        argv = ["run", str(job), "--config", str(_config(tmp_path)), "--out", str(out)]
        assert cli.main([*argv, "--progress", "none"]) == ExitCode.OK
        written = out.read_bytes()
        assert written.count(b",'-\r\n") == 4
        # As the older broker left it: its cells as they came, its ledger version 2.
        older = written.replace(b",'-\r\n", b",-\r\n")
        out.write_bytes(older)
        with contextlib.closing(sqlite3.connect(tmp_path / "out.csv.ledger")) as db, db:
            db.execute("UPDATE sinks SET offset = ?", (len(older),))
            db.execute("UPDATE meta SET value = 2 WHERE key = 'schema_version'")
        capsys.readouterr()
        assert cli.main([*argv, "--progress", "none"]) == ExitCode.OK
        assert out.read_bytes() == written
        err = capsys.readouterr().err
        assert "broker.output_rewritten" in err
        assert "broker.output_changed" not in err  # not taken for a hand edit

    def test_ordered_rerun_orders_again_what_a_plain_run_appended(self, tmp_path: Path) -> None:
        """An ordered output cut short by hand gets its missing rows back on a rerun, and
        --ordered then puts them in input order again."""
        _job(tmp_path, 40)
        out = tmp_path / "out.jsonl"
        assert self._run(tmp_path, "--ordered") == ExitCode.OK
        text = out.read_text()
        out.write_text(text[: text.index("\n", len(text) // 3) + 1])
        assert self._run(tmp_path, "--ordered") == ExitCode.OK
        lines = [row["line"] for row in _jsonl(out.read_text())]
        assert lines == list(range(1, 41))

    def test_a_format_changed_on_the_job_s_own_output_rewrites_it(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The same --out in another --format (JSON lines, then SQLite, then CSV): the job's
        own output is written again in the new format and the change is said; SQLite
        refused it ("not a SQLite database ... choose another output path", exit 65)."""
        _job(tmp_path, 20)
        out = tmp_path / "f.db"
        for fmt in ("jsonl", "sqlite", "csv"):
            assert self._run(tmp_path, "--out", str(out), "--format", fmt) == ExitCode.OK
        assert out.read_bytes().startswith(b"line,")
        assert len(out.read_text().splitlines()) == 21
        assert capsys.readouterr().err.count("broker.output_format_changed") == 2

    def test_an_ordered_output_deleted_is_ordered_again(self, tmp_path: Path) -> None:
        """An ordered output deleted (or cut to nothing) is written again from the ledger
        in the order the rows were done, and --ordered orders it again; the rewrite ended
        at the very state the export had left (the same rows, the same bytes), so it read
        as still ordered and stayed in completion order for good."""
        # Invalid rows are done as they are read, before any answer: done order is not
        # input order.
        rows = [f"B0TEST{i:04d}" if i % 5 else f"not-an-asin-{i}" for i in range(1, 41)]
        (tmp_path / "job.txt").write_text("".join(f"{row}\n" for row in rows))
        out = tmp_path / "out.jsonl"
        assert self._run(tmp_path, "--ordered") == ExitCode.OK
        ordered = out.read_text()
        assert [row["line"] for row in _jsonl(ordered)] == list(range(1, 41))
        out.unlink()
        assert self._run(tmp_path, "--ordered") == ExitCode.OK
        assert out.read_text() == ordered


def _two_daily_jobs(tmp_path: Path) -> str:
    """sa/daily.txt (3 rows) run to the end, sb/daily.txt (2 rows) beside it; the config."""
    config = str(_config(tmp_path))
    for folder, count in (("sa", 3), ("sb", 2)):
        (tmp_path / folder).mkdir()
        _job(tmp_path / folder, count, "daily.txt")
    assert cli.main(["run", "sa/daily.txt", "--config", config]) == ExitCode.OK
    return config


def test_same_named_jobs_sharing_a_default_output_name_the_other_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two daily.txt in two folders share out/daily.jsonl: the second run names the first
    job's file, instead of calling its own input changed, and prints no rows line (the
    first job's 3 rows were shown as its own)."""
    monkeypatch.chdir(tmp_path)
    config = _two_daily_jobs(tmp_path)
    capsys.readouterr()
    assert cli.main(["run", "sb/daily.txt", "--config", config]) == ExitCode.DATA_ERROR
    err = capsys.readouterr().err
    assert f"is the output of another job file, {tmp_path / 'sa' / 'daily.txt'}" in err
    assert "--out" in err
    assert "rows: " not in err


def test_refresh_does_not_replace_another_job_files_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--refresh`` of sb/daily.txt over sa/daily.txt's output (the shared default name) is
    refused as a plain run is, and sa's output stays; it replaced it unasked, so two daily
    jobs of one name took turns overwriting each other. ``--new-job`` still replaces it."""
    monkeypatch.chdir(tmp_path)
    config = _two_daily_jobs(tmp_path)
    before = (tmp_path / "out" / "daily.jsonl").read_bytes()
    capsys.readouterr()
    code = cli.main(["run", "sb/daily.txt", "--config", config, "--refresh"])
    assert code == ExitCode.DATA_ERROR
    err = capsys.readouterr().err
    assert f"is the output of another job file, {tmp_path / 'sa' / 'daily.txt'}" in err
    assert (tmp_path / "out" / "daily.jsonl").read_bytes() == before
    assert cli.main(["run", "sa/daily.txt", "--config", config, "--refresh"]) == ExitCode.OK
    assert (
        cli.main(["run", "sb/daily.txt", "--config", config, "--refresh", "--new-job"])
        == ExitCode.OK
    )
    assert len((tmp_path / "out" / "daily.jsonl").read_text().splitlines()) == 2


def test_out_dash_writes_json_lines_when_the_config_says_sqlite(
    tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    """``--out -`` with ``[output] format = "sqlite"`` in the config writes JSON lines (the
    config's format is for files); it was a usage error that did not name the config.
    ``--format sqlite`` asked on the command line still is one."""
    config = str(_config(tmp_path, _CONFIG + '\n[output]\nformat = "sqlite"\n'))
    job = _job(tmp_path, 2)
    args = ["run", str(job), "--out", "-", "--config", config, "--progress", "none"]
    assert cli.main(args) == ExitCode.OK
    rows = [json.loads(line) for line in capfdbinary.readouterr().out.splitlines()]
    assert [row["input"] for row in rows] == ["B0TEST0000", "B0TEST0001"]
    assert cli.main([*args, "--format", "sqlite"]) == ExitCode.USAGE


def test_refresh_does_not_replace_another_job_files_stopped_refresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """sa's ``--refresh`` stopped before it completed (its rows and ledger beside the
    output): sb's ``--refresh`` of the same output is refused and leaves them. It took the
    other job's refresh for its own stopped before a change, started it over, and
    promoted its own output."""
    monkeypatch.chdir(tmp_path)
    config = str(_config(tmp_path))
    for folder, count in (("sa", 3), ("sb", 2)):
        (tmp_path / folder).mkdir()
        _job(tmp_path / folder, count, "daily.txt")
    # As a stopped refresh of sa leaves it (a plain run to that path makes the same files).
    side = tmp_path / "out" / "daily.jsonl.refresh"
    assert cli.main(["run", "sa/daily.txt", "--config", config, "--out", str(side)]) == 0
    kept = side.read_bytes()
    capsys.readouterr()
    code = cli.main(["run", "sb/daily.txt", "--config", config, "--refresh"])
    assert code == ExitCode.DATA_ERROR
    assert "output of another job file" in capsys.readouterr().err
    assert side.read_bytes() == kept
    assert not (tmp_path / "out" / "daily.jsonl").exists()


def test_a_finished_gzip_job_compressed_again_is_still_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A producer's cron re-gzips the same list (gzip's header holds a time): the finished
    job is complete still, not refused as edited (exit 65, "restore the original")."""
    monkeypatch.chdir(tmp_path)
    config = str(_config(tmp_path))
    raw = "".join(f"B0TEST{i:04d}\n" for i in range(3)).encode()
    job = tmp_path / "list.txt.gz"
    job.write_bytes(gzip.compress(raw, mtime=1))
    assert cli.main(["run", str(job), "--config", config]) == ExitCode.OK
    job.write_bytes(gzip.compress(raw, mtime=2))
    capsys.readouterr()
    assert cli.main(["run", str(job), "--config", config]) == ExitCode.OK
    assert "already complete" in capsys.readouterr().err


def test_embedded_simulator_runs_leave_no_key_state_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each embedded simulator is a new port, so new keys: a run keeps their state in memory
    instead of adding a row to the machine's key-state file every time."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    config = str(_config(tmp_path))
    job = _job(tmp_path, 3)
    assert cli.main(["run", str(job), "--config", config, "--out", str(tmp_path / "o.jsonl")]) == 0
    assert cli.main(["lookup", "B0TEST0001", "--config", config]) == 0
    assert not (tmp_path / "state" / "asin-broker" / "keys.sqlite3").exists()


class TestNoHome:
    """With no home directory (``env -i``, a container's ``--user 4242``) and no
    XDG_STATE_HOME, every command that needs the default state or cache file says so."""

    @pytest.fixture(autouse=True)
    def _no_home(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def no_home() -> Path:
            raise RuntimeError("Could not determine home directory.")

        monkeypatch.delenv("XDG_STATE_HOME", raising=False)
        monkeypatch.delenv("HOME", raising=False)
        monkeypatch.setattr(Path, "home", no_home)
        monkeypatch.setenv("ASINB_DEMO_SECRET", "not-a-real-secret")

    @pytest.mark.parametrize(
        ("argv", "text"),
        [
            (["lookup", "B0C1234567"], _CONFIG),
            (["cache", "stats"], _CONFIG),
            (["status"], _DEAD),
            (["run", "job.txt", "--out", "o.jsonl", "--progress", "none"], _CONFIG),
        ],
    )
    def test_a_command_says_there_is_no_home(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        argv: list[str],
        text: str,
    ) -> None:
        """Exit 78 with one message naming XDG_STATE_HOME and the path settings (lookup and
        cache stats printed a traceback, run an "internal error: RuntimeError")."""
        monkeypatch.chdir(tmp_path)
        _job(tmp_path)
        assert cli.main([*argv, "--config", str(_config(tmp_path, text))]) == ExitCode.CONFIG
        err = capsys.readouterr().err
        assert "no home directory found" in err
        assert "XDG_STATE_HOME" in err
        assert "RuntimeError" not in err


class TestLookup:
    def test_a_dash_is_a_usage_error_pointing_to_run(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``broker lookup -`` (as ``broker run -`` reads stdin) is a usage error naming
        the ways to look up a list; it was an invalid row "this has 1"."""
        code = cli.main(["lookup", "-", "--config", str(_config(tmp_path)), "--json"])
        assert code == ExitCode.USAGE
        out, err = capsys.readouterr()
        assert out == ""
        assert "run - --out -" in err

    def test_an_argument_that_is_not_utf8_gives_valid_utf8_json(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An argument with a byte that is not UTF-8 (kept by Python as a lone surrogate)
        is an invalid row whose JSON is valid UTF-8: U+FFFD for the byte. The surrogate was
        written out, and strict JSON readers refused the row."""
        arg = os.fsdecode(b"\xffB0C123456")
        code = cli.main(["lookup", arg, "--config", str(_config(tmp_path)), "--json"])
        assert code == ExitCode.OK
        out = capsys.readouterr().out
        out.encode("utf-8")  # no lone surrogate left
        [row] = _jsonl(out)
        assert row["input"] == "\ufffdB0C123456"
        assert row["status"] == "invalid"

    def test_a_hanging_token_endpoint_is_told_as_the_time_it_took(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A token endpoint that hangs until request_timeout_s (2 s) under a 0.5-s budget:
        the lookup gives up at that first timeout (about 2 s, not two of them), and its
        message says the outage lasted that long, not "gave up after 0.5 s"."""
        monkeypatch.delenv("ASINB_DEMO_SECRET", raising=False)
        text = (
            '[api]\nendpoint = "simulator"\n[engine]\nrequest_timeout_s = 2\n'
            "[simulator.faults]\ntoken_slow = 1.0\nhang_s = 60\n"
            '[[keys]]\nname = "demo"\ncredential_id = "demo-id"\nversion = "3.1"\n'
            'credential_secret_env = "ASINB_DEMO_SECRET"\n'
            'partner_tags = { "www.amazon.com" = "demo-20" }\n'
        )
        config = _config(tmp_path, text)
        started = time.monotonic()
        code = cli.main(["lookup", "B0C1234567", "--config", str(config), "--outage-budget", "0.5"])
        took = time.monotonic() - started
        assert code == ExitCode.UNAVAILABLE
        assert took < 4.0
        err = capsys.readouterr().err
        assert "gave up: no usable answer for the outage budget (0.5 s)" in err
        assert "no usable answer from the API or its token endpoint for 2" in err
        assert "gave up after" not in err

    def test_outage_exits_69_within_the_budget(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """K10: an unreachable endpoint makes lookup give up after --outage-budget, exit 69."""
        monkeypatch.setenv("ASINB_DEMO_SECRET", "not-a-real-secret")
        config = _config(tmp_path, _DEAD)
        started = time.monotonic()
        code = cli.main(["lookup", "B0C1234567", "--config", str(config), "--outage-budget", "0.5"])
        took = time.monotonic() - started
        assert code == ExitCode.UNAVAILABLE
        assert took < 30
        err = capsys.readouterr().err
        assert "gave up: no usable answer for the outage budget (0.5 s)" in err
        # Not "the endpoint <api.endpoint> stayed unreachable": a failing token endpoint ends
        # so too, while the API endpoint was never asked; the remedy names both settings.
        assert "stayed unreachable" not in err
        assert "api.token_endpoint" in err
        # A lookup leaves no rows pending; run's remedy said so once per key.
        [failure] = [line for line in err.splitlines() if line.startswith("broker: gave up")]
        assert "pending" not in failure
        assert "retry.outage_budget_s" not in failure

    @pytest.mark.parametrize(
        ("flags", "said"),
        [
            (["--outage-budget", "nan"], "--outage-budget must be"),
            (["--outage-budget", "inf"], "--outage-budget must be"),
            (["--outage-budget", "0"], "--outage-budget must be"),
            (["--resources", ","], "--resources names no resource"),
            (["--resources", " "], "--resources names no resource"),
            (["--resources", "bogus"], ": --resources: unknown resource 'bogus'"),
        ],
    )
    def test_flag_without_a_usable_value_is_a_usage_error(
        self,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        flags: list[str],
        said: str,
    ) -> None:
        """A budget that is not a finite positive number (NaN never runs out) and a
        resource list naming nothing are usage errors (2), before anything is sent."""
        code = cli.main(["lookup", "B0C1234567", "--config", str(_config(tmp_path)), *flags])
        assert code == ExitCode.USAGE
        assert said in capsys.readouterr().err

    def test_one_row_per_argument_repeats_included(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A repeated ASIN is a row per argument; line is the position, input as typed."""
        args = ["B0C1234567", "B0C1234567", "https://www.amazon.com/dp/B0PF91DHOD", "bad-id"]
        code = cli.main(["lookup", *args, "--json", "--config", str(_config(tmp_path))])
        assert code == ExitCode.OK
        rows = _jsonl(capsys.readouterr().out)
        assert [(r["line"], r["input"]) for r in rows] == list(enumerate(args, 1))
        assert [r["asin"] for r in rows] == ["B0C1234567", "B0C1234567", "B0PF91DHOD", None]

    def test_product_url_is_looked_up_in_its_store(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """lookup asks a product URL in its own store; --marketplace, when given, wins."""
        url = "https://www.amazon.de/dp/B0PF91DHOD"
        config = str(_config(tmp_path))
        assert cli.main(["lookup", url, "--json", "--config", config]) == ExitCode.SOME_FAILED
        (row,) = _jsonl(capsys.readouterr().out)
        assert row["marketplace"] == "www.amazon.de"  # the demo key tags .com only
        assert cli.main(["lookup", url, "--json", "--config", config, "--marketplace", "US"]) == 0
        (row,) = _jsonl(capsys.readouterr().out)
        assert (row["marketplace"], row["status"]) == ("www.amazon.com", "ok")

    def test_rows_match_run_rows(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """lookup --json prints the row ``run`` writes for the same ASIN (bar fetch times)."""
        run_row, lookup_row = _run_and_lookup(tmp_path, capsys, "B0C1234567")
        for row in (run_row, lookup_row):
            row.pop("fetched_at")
        assert lookup_row == run_row

    def test_invalid_id_row_matches_run_row(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An id that is not an ASIN: lookup prints run's row (asin null, input the text)."""
        run_row, lookup_row = _run_and_lookup(tmp_path, capsys, "not-an-asin")
        assert (lookup_row["asin"], lookup_row["input"]) == (None, "not-an-asin")
        assert lookup_row["error"]["code"] == run_row["error"]["code"] == "InvalidAsin"
        assert {k: v for k, v in lookup_row.items() if k != "error"} == {
            k: v for k, v in run_row.items() if k != "error"
        }

    def test_resources_flag(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """--resources picks what the item carries."""
        config = _config(tmp_path)
        code = cli.main(
            [
                "lookup",
                "B0C1234567",
                "--config",
                str(config),
                "--json",
                "--resources",
                "itemInfo.title",
            ]
        )
        assert code == 0
        [row] = _jsonl(capsys.readouterr().out)
        item = row["item"]
        assert isinstance(item, dict)
        assert item.get("itemInfo")
        assert not item.get("offersV2")

    def test_unknown_resource_is_refused_before_anything_starts(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--resources naming no resource: exit 2 naming it, with no simulator started."""
        config = _config(tmp_path)
        code = cli.main(
            ["lookup", "B0C1234567", "--config", str(config), "--resources", "bogus.thing"]
        )
        assert code == ExitCode.USAGE
        err = capsys.readouterr().err
        assert "--resources" in err
        assert "'bogus.thing'" in err
        assert "broker.started" not in err

    def test_terminal_gets_a_readable_summary(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """On a terminal lookup prints a few readable lines per ASIN, not JSON."""
        config = _config(tmp_path)
        monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
        assert cli.main(["lookup", "B0C1234567", "--config", str(config)]) == 0
        out = capsys.readouterr().out
        assert out.startswith("B0C1234567  www.amazon.com  ok\n")
        assert "{" not in out

    def test_terminal_summary_never_passes_control_characters(self) -> None:
        """Text from the API (a title, an error message) reaches a terminal without its
        control characters: an escape sequence in a title set the window's title and the
        colours, and a bare CR/LF forged a line."""
        row: dict[str, object] = {
            "asin": "B0C1234567",
            "input": "B0C1234567",
            "marketplace": "www.amazon.com",
            "status": "ok",
            "summary": {"title": "\x1b]0;pwned\x07\x1b[31mRED\r\nfake line\u202e"},
            "error": {"code": "X", "message": "bad\x1b[2Jclear", "remedy": None},
        }
        text = cli._readable(row)
        assert not set(text) & {"\x1b", "\x07", "\r", "\u202e"}
        assert len(text.splitlines()) == 3  # head, title, error: none forged
        assert "RED" in text
        assert "fake line" in text


class TestProgress:
    def test_live_line_fits_the_terminal(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The live progress line is cut to the terminal's width (it never wraps)."""
        from broker.jobs import runner

        monkeypatch.setattr(os, "get_terminal_size", lambda fd=0: os.terminal_size((50, 20)))
        line = runner._fit("\r" + "x" * 300)
        assert line.startswith("\r")
        assert len(line) == 50

    def test_first_progress_event_comes_early_when_piped(self, tmp_path: Path) -> None:
        """Piped, the first broker.progress event comes within a few seconds, not 30."""
        job = _job(tmp_path, 600)
        config = _config(tmp_path, _CONFIG.replace("tps = 50.0", "tps = 5.0"))
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "broker",
                "run",
                str(job),
                "--config",
                str(config),
                "--out",
                str(tmp_path / "o.jsonl"),
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stderr is not None
        started = None
        seen = None
        try:
            for line in proc.stderr:
                # Timed from the job's start: interpreter start-up varies with machine load.
                if '"broker.job_started"' in line:
                    started = time.monotonic()
                if '"broker.progress"' in line and started is not None:
                    seen = time.monotonic() - started
                    break
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            proc.stderr.close()
        assert seen is not None
        assert seen < 8.0


def test_run_ends_with_a_job_finished_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With JSON logs, a run's closing figures are one broker.job_finished event too, so a
    log collector reads them without parsing the plain summary lines."""
    job = _job(tmp_path, 12)
    job.write_text(job.read_text() + "not-an-asin\n")
    out = tmp_path / "out.jsonl"
    argv = ["run", str(job), "--config", str(_config(tmp_path)), "--out", str(out)]
    assert cli.main([*argv, "--progress", "none"]) == ExitCode.OK
    err = capsys.readouterr().err
    events = [json.loads(line) for line in err.splitlines() if line[:1] == "{"]
    (event,) = [e for e in events if e["event"] == "broker.job_finished"]
    assert event["job"] == str(job)
    assert event["out"] == str(out)
    assert event["rows"] == {"total": 13, "ok": 12, "invalid": 1}
    assert event["pending"] == 0
    # The same figures as the plain summary printed after it.
    assert f"requests {event['requests']}, 429s {event['throttled']}, " in err
    assert event["exit_code"] == 0
    assert event["level"] == "info"
    assert event["invalid_report"] == f"{out}.invalid.jsonl"
    assert {"throttled", "retries", "from_cache", "wall_s", "stopped_by_signal"} <= set(event)


@pytest.mark.parametrize("config", ["typo", "missing"])
def test_a_run_refused_for_its_config_ends_with_a_job_finished_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: str
) -> None:
    """A run refused for its config (exit 78: a typo, no file) ends with a
    broker.job_finished error event, as every error exit does (an alert on it missed
    them)."""
    job = _job(tmp_path, 1)
    path = tmp_path / "config.toml"
    if config == "typo":
        path.write_text('[api]\nendpont = "amazon"\n')
    argv = ["run", str(job), "--config", str(path), "--progress", "none"]
    assert cli.main(argv) == ExitCode.CONFIG
    err = capsys.readouterr().err
    events = [json.loads(line) for line in err.splitlines() if line[:1] == "{"]
    (event,) = [e for e in events if e["event"] == "broker.job_finished"]
    assert (event["level"], event["exit_code"], event["job"]) == ("error", 78, str(job))
    assert "config" in event["error"]


def test_library_stdout_is_only_the_scripts_output(tmp_path: Path) -> None:
    """A script using the library prints JSON: its stdout parses as that JSON alone."""
    config = _config(tmp_path)
    script = tmp_path / "script.py"
    script.write_text(
        "import asyncio, json, sys\n"
        "from broker import Broker\n"
        "async def main():\n"
        f"    async with Broker.from_config({str(config)!r}) as broker:\n"
        "        results = await broker.get_items(['B0C1234567', 'B0C1234568'])\n"
        "    json.dump([r.status.value for r in results], sys.stdout)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["ok", "ok"]


@pytest.mark.parametrize(
    ("tty", "no_color", "term", "coloured"),
    [
        (False, None, "xterm", False),
        (True, None, "xterm", True),
        (True, "1", "xterm", False),
        (True, None, "dumb", False),
    ],
)
def test_console_logs_are_coloured_only_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, tty: bool, no_color: str | None, term: str, coloured: bool
) -> None:
    """``format = "console"`` colours its lines only on a terminal, and not under NO_COLOR
    or TERM=dumb: redirected to a file or a journal (broker bench's stderr too) it wrote
    ANSI escapes."""
    import logging

    from broker.logs import configure_logging, get_logger

    stream = io.StringIO()
    monkeypatch.setattr(stream, "isatty", lambda: tty)
    monkeypatch.setenv("TERM", term)
    if no_color is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", no_color)
    configure_logging("info", "console", stream=stream)
    try:
        get_logger("broker").warning("broker.key_disabled", key="demo")
    finally:
        for handler in list(logging.getLogger().handlers):
            if handler.get_name() == "broker-cli":
                logging.getLogger().removeHandler(handler)
    assert "broker.key_disabled" in stream.getvalue()
    assert ("\x1b[" in stream.getvalue()) is coloured


def test_cli_routes_stdlib_records_through_redaction() -> None:
    """The CLI's logging renders aiohttp's stdlib records with the same redaction."""
    import logging

    from broker.logs import configure_logging, get_logger

    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    try:
        logging.getLogger("aiohttp.client").warning("sent Authorization: Bearer abc.def")
        get_logger("broker").debug("broker.request", key="demo", status=200)
    finally:
        for handler in list(logging.getLogger().handlers):
            if handler.get_name() == "broker-cli":
                logging.getLogger().removeHandler(handler)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert records[0]["event"] == "sent Authorization: Bearer ***"
    assert records[1]["event"] == "broker.request"
    assert records[1]["level"] == "debug"


def _screen(text: str) -> list[str]:
    """What a terminal shows for ``text``: ``\\r`` returns to column 0 and overwrites."""
    lines: list[str] = []
    row: list[str] = []
    column = 0
    for char in text:
        if char == "\r":
            column = 0
        elif char == "\n":
            lines.append("".join(row).rstrip())
            row, column = [], 0
        else:
            if column < len(row):
                row[column] = char
            else:
                row.append(char)
            column += 1
    lines.append("".join(row).rstrip())
    return lines


def test_log_lines_never_print_into_the_live_progress_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A log record while the progress line is up clears the line first and draws it again
    after: every line on the screen is either a log record or the progress line."""
    import logging

    from broker.logs import configure_logging, end_live_line, get_logger, show_live_line

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("info", "json")
    try:
        show_live_line("\r10/20 rows  5.0 rows/s".ljust(60))
        get_logger("broker").warning("broker.key_parked", key="demo")
        show_live_line("\r11/20 rows  5.0 rows/s".ljust(60))
        end_live_line()
    finally:
        for handler in list(logging.getLogger().handlers):
            if handler.get_name() == "broker-cli":
                logging.getLogger().removeHandler(handler)
    screen = [line for line in _screen(stream.getvalue()) if line]
    assert json.loads(screen[0])["event"] == "broker.key_parked"
    assert screen[1:] == ["11/20 rows  5.0 rows/s"]


def test_a_failing_commit_still_ends_the_live_progress_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run whose ledger cannot be written (a full disk) ends the live progress line
    before its error message, which starts on a line of its own."""
    from broker import logs
    from broker.jobs.ledger import Ledger

    def full(self: Ledger, results: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Ledger, "record_results", full)
    job = tmp_path / "job.txt"
    job.write_text("B0LIVE0001\nB0LIVE0002\n")
    # The line as the ticker leaves it between two draws (a short run may end before one).
    logs.show_live_line("\r0/2 rows".ljust(40))
    out = tmp_path / "out.jsonl"
    config = str(_config(tmp_path))
    code = cli.main(["run", str(job), "--config", config, "--out", str(out), "--progress", "bar"])
    assert code == ExitCode.IO_ERROR
    assert logs._LiveLine.text == ""
    screen = _screen(capsys.readouterr().err)
    assert any(line.startswith("broker: cannot write") for line in screen)


class TestLookupEnds:
    """``broker lookup`` is a one-shot command: it ends soon, and prints what it has."""

    async def test_every_key_waiting_for_its_daily_quota_exits_75_at_once(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """With the only key's daily quota spent, a lookup needing a request exits 75 within
        seconds naming the reset, instead of waiting silently for hours; the answer the
        item cache had is printed."""
        async with SimulatorServer(SimulatorSettings(limits=False)) as sim:
            config = make_config(sim.url, keys=[key_doc(tpd=1)])
            assert await cli._lookup(config, ["B0QUOTA001"], None, None, as_json=True) == 0
            capsys.readouterr()
            async with asyncio.timeout(15):
                code = await cli._lookup(
                    config, ["B0QUOTA001", "B0QUOTA002"], None, None, as_json=True
                )
        out, err = capsys.readouterr()
        assert code == ExitCode.RESUMABLE
        # A 429 does not say whether the quota is spent or access revoked: both are named.
        assert "waits for its daily quota, or is parked after sustained 429s" in err
        assert [json.loads(line)["input"] for line in out.splitlines()] == ["B0QUOTA001"]

    async def test_ids_the_cache_answers_slowly_are_printed_with_the_quota_spent(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Every id cached and the only key's quota spent, the cache slow to answer (a remote
        Redis, a busy disk): every answer is printed and the lookup exits 0. It stopped at
        the first look that found the key spent, before the cache had answered, and said the
        ids "were not looked up"."""
        from broker.cache.sqlite import SqliteCache

        wanted = [f"B0SLOWC{n:03d}" for n in range(10)]
        async with SimulatorServer(SimulatorSettings(limits=False)) as sim:
            config = make_config(sim.url, keys=[key_doc(tpd=1)])
            assert await cli._lookup(config, wanted, None, None, as_json=True) == 0
            capsys.readouterr()
            load = SqliteCache._load

            async def slow_load(self: SqliteCache, keys: Any) -> Any:
                await asyncio.sleep(1.2)
                return await load(self, keys)

            monkeypatch.setattr(SqliteCache, "_load", slow_load)
            async with asyncio.timeout(15):
                code = await cli._lookup(config, wanted, None, None, as_json=True)
        out, err = capsys.readouterr()
        assert code == ExitCode.OK, err
        assert sorted(json.loads(line)["input"] for line in out.splitlines()) == wanted

    async def test_the_last_request_of_the_day_in_flight_is_still_answered(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The request that spends the key's last daily request is on the wire when the
        quota check runs: the lookup winds down instead of being cancelled, so its answers
        are printed and it exits 0 (nothing was left to look up)."""
        slow = SimulatorSettings(limits=False, latency=LatencyProfile(fixed_ms=700))
        async with SimulatorServer(slow) as sim:
            config = make_config(sim.url, keys=[key_doc(tpd=1)])
            code = await cli._lookup(config, asins_of(10, "B0LASTQ"), None, None, as_json=True)
        out = capsys.readouterr().out
        assert code == ExitCode.OK
        assert len(out.splitlines()) == 10

    async def test_a_spent_key_is_not_hidden_by_a_key_of_another_marketplace(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The only US key's quota spent and a UK-only key idle: a US lookup still stops at
        once (the UK key cannot answer it), where it waited for the reset."""
        async with SimulatorServer(SimulatorSettings(limits=False)) as sim:
            keys = [
                key_doc("us", tpd=1),
                key_doc("uk", tags={"www.amazon.co.uk": "demo-21"}),
            ]
            config = make_config(sim.url, keys=keys)
            assert await cli._lookup(config, ["B0QUOTA001"], None, None, as_json=True) == 0
            capsys.readouterr()
            async with asyncio.timeout(15):
                code = await cli._lookup(config, ["B0QUOTA002"], None, None, as_json=True)
        assert code == ExitCode.RESUMABLE
        assert "daily quota" in capsys.readouterr().err

    async def test_an_outage_still_prints_the_answers_it_had(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The endpoint down: the cached answer and the invalid id are printed before the
        exit 69, not dropped with the unanswered lookup."""
        async with SimulatorServer(SimulatorSettings(limits=False)) as sim:
            config = make_config(sim.url, retry={"outage_budget_s": 0.5})
            assert await cli._lookup(config, ["B0OUTAGE01"], None, None, as_json=True) == 0
        capsys.readouterr()
        code = await cli._lookup(
            config, ["B0OUTAGE01", "not-an-id", "B0OUTAGE02"], None, None, as_json=True
        )
        out, err = capsys.readouterr()
        assert code == ExitCode.UNAVAILABLE
        rows = [json.loads(line) for line in out.splitlines()]
        assert [(row["input"], row["status"]) for row in rows] == [
            ("B0OUTAGE01", "ok"),
            ("not-an-id", "invalid"),
        ]
        # The failure line itself (a log line says "unreachable" only where an earlier test
        # routed logs to stderr: the test passed alone only after one).
        assert "broker: gave up: no usable answer for the outage budget" in err
        assert "connection failed, no connection made" in err

    def test_ctrl_c_ends_quietly_with_75(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Ctrl-C during lookup (or status, or cache) ends with one line and exit 75, not a
        KeyboardInterrupt traceback."""

        def interrupted(argv: object, **_: object) -> int:
            raise KeyboardInterrupt

        monkeypatch.setattr(cli, "_main", interrupted)
        assert cli.main(["lookup", "B000000001"]) == ExitCode.RESUMABLE
        assert "interrupted" in capsys.readouterr().err

    def test_ctrl_c_while_bench_starts_ends_with_130(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Ctrl-C before bench's own handlers are in (while it parses and imports) ends with
        130, the code the README gives bench for Ctrl-C, not the resumable 75."""

        def interrupted(argv: object, **_: object) -> int:
            raise KeyboardInterrupt

        monkeypatch.setattr(cli, "_main", interrupted)
        assert cli.main(["bench", "--duration", "1"]) == 130
        assert "interrupted" in capsys.readouterr().err


def test_lookup_with_an_uncreatable_state_file_exits_74(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A [state] path whose folder cannot be made: lookup exits 74 as run does (README: an
    uncreatable key-state file), not 66 "input not found" (lookup reads no file)."""
    monkeypatch.setenv("ASINB_DEMO_SECRET", "demo-secret")
    # No folder can be made in /proc: ENOENT, which read as a missing input file.
    text = _DEAD + '\n[state]\npath = "/proc/asin-broker-nope/keys.sqlite3"\n'
    config = str(_config(tmp_path, text))
    assert cli.main(["lookup", "B0UJZDE8GX", "--config", config]) == ExitCode.IO_ERROR
    assert "input not found" not in capsys.readouterr().err


def _with_second_key(name: str, marketplace: str, env: str) -> str:
    """The embedded simulator's demo key, and a key ``name`` for ``marketplace`` whose
    secret is read from ``env`` (the simulator has its account, with another secret)."""
    tags = f'partner_tags = {{ "{marketplace}" = "{name}-21" }}\n'
    # Its region's version: the simulator's own accounts, as Amazon's, serve no other.
    version = "3.2" if marketplace in ("www.amazon.co.uk", "www.amazon.de") else "3.1"
    key = (
        f'[[keys]]\nname = "{name}"\ncredential_id = "{name}-id"\nversion = "{version}"\n'
        f'credential_secret_env = "{env}"\n{tags}\n'
    )
    account = (
        f'[[simulator.accounts]]\nname = "{name}"\nprotocol = "creators"\n'
        f'credential_id = "{name}-id"\nsecret = "{name}-secret"\nversion = "{version}"\n{tags}'
    )
    log = '[log]\nformat = "json"\n'
    return embedded_toml(simulator="seed = 3").replace(log, key + log) + account


def test_no_wait_names_the_keys_it_stopped_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--no-wait stopping for spent daily quotas names the keys waited for, in the line and
    in broker.job_finished; it said "every key the rows left need" of five keys and six
    stores alike."""
    text = embedded_toml(simulator="seed = 3").replace("tpd = 0", "tpd = 2")
    config = str(_config(tmp_path, text))
    job, out = _job(tmp_path, 40), tmp_path / "out.jsonl"
    args = ["run", str(job), "--config", config, "--out", str(out), "--no-wait"]
    assert cli.main([*args, "--progress", "none"]) == ExitCode.RESUMABLE
    err = capsys.readouterr().err
    assert "every key the rows left need (demo) waits for its daily quota" in err
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    (finished,) = [e for e in events if e.get("event") == "broker.job_finished"]
    assert finished["quota_wait_keys"] == ["demo"]
    (spent,) = [e for e in events if e.get("event") == "broker.job_quota_spent"]
    assert spent["keys"] == ["demo"]


def test_no_wait_with_a_marketplace_no_key_can_serve_exits_77(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--no-wait: the US key's day is spent and the UK rows' only key was rejected there (a
    wrong tag): the run ends 77 naming the rejection, not 75 "run again after the reset",
    which would only end in the same refusal (a cron wrapper retrying on 75 never alerts)."""
    monkeypatch.setenv("ASINB_EU", "eu-secret")
    text = _with_second_key("eu", "www.amazon.co.uk", "ASINB_EU").replace("tpd = 0", "tpd = 2")
    # The eu key's tag (its first mention; the simulator account's comes after) is wrong.
    text = text.replace('"www.amazon.co.uk" = "eu-21"', '"www.amazon.co.uk" = "wrong-21"', 1)
    config = str(_config(tmp_path, text))
    job = tmp_path / "job.jsonl"
    uk = '{"asin": "B0UKUKUK01", "marketplace": "UK"}\n'
    job.write_text(uk + "".join(f'{{"asin": "B0TEST{i:04d}"}}\n' for i in range(40)))
    out = tmp_path / "out.jsonl"
    args = ["run", str(job), "--config", config, "--out", str(out), "--no-wait"]
    assert cli.main([*args, "--progress", "none"]) == ExitCode.NO_PERMISSION
    err = capsys.readouterr().err
    assert "InvalidPartnerTag" in err
    assert "run the same command again after that" not in err
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    (finished,) = [e for e in events if e.get("event") == "broker.job_finished"]
    assert finished["level"] == "error"  # an alert on errors sees the job that ended on one


def test_no_wait_stops_when_amazon_answers_with_a_retry_after_of_hours(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An account whose daily quota is spent on Amazon's side (the broker's own count far
    from it) and whose 429s carry a Retry-After to the reset: --no-wait stops (75) with the
    rows pending, until about the time the server named; it paused a minute at a time,
    sending one 429'd request a minute, and never stopped."""
    account = (
        '\n[[simulator.accounts]]\nname = "demo"\nprotocol = "creators"\n'
        'credential_id = "demo-id"\nsecret = "demo-secret"\nversion = "3.1"\n'
        'partner_tags = { "www.amazon.com" = "demo-20" }\ntps = 50.0\ntpd = 3\n'
    )
    simulator = 'seed = 3\nretry_after = "both"\nretry_after_s = 7200'
    config = str(_config(tmp_path, embedded_toml(simulator=simulator) + account))
    job, out = _job(tmp_path, 60), tmp_path / "out.jsonl"
    args = ["run", str(job), "--config", config, "--out", str(out), "--no-wait"]
    assert cli.main([*args, "--progress", "none"]) == ExitCode.RESUMABLE
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line[:1] == "{"]
    (finished,) = [e for e in events if e.get("event") == "broker.job_finished"]
    assert finished["quota_wait_keys"] == ["demo"]
    assert finished["rows"].get("failed", 0) == 0
    assert finished["pending"] > 0
    until = datetime.fromisoformat(finished["quota_wait_until"])
    assert until - datetime.now(UTC) > timedelta(hours=1)


def test_run_names_a_key_taken_out_though_the_others_did_every_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two US keys, one with a wrong secret: the other does every row (exit 0), and the
    summary and broker.job_finished name the key out of rotation and why; only one
    broker.key_disabled line among the logs said so."""
    monkeypatch.setenv("ASINB_BAD", "wrong-secret")
    config = str(_config(tmp_path, _with_second_key("bad", "www.amazon.com", "ASINB_BAD")))
    job, out = _job(tmp_path, 30), tmp_path / "out.jsonl"
    args = ["run", str(job), "--config", config, "--out", str(out), "--progress", "none"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert len(_jsonl(out.read_text())) == 30
    assert "out of rotation: bad: " in err
    assert "invalid_client" in err.split("out of rotation: ", 1)[1]
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    (finished,) = [e for e in events if e.get("event") == "broker.job_finished"]
    assert [entry.split(":")[0] for entry in finished["keys_out"]] == ["bad"]
    assert "wrong-secret" not in err


def _us_and_uk_job(tmp_path: Path) -> Path:
    """A JSON Lines job of 10 US rows and 10 UK rows, interleaved."""
    job = tmp_path / "job.jsonl"
    job.write_text(
        "".join(
            f'{{"asin": "B0TEST{i:04d}", "marketplace": "{m}"}}\n'
            for i in range(10)
            for m in ("www.amazon.com", "www.amazon.co.uk")
        )
    )
    return job


def test_a_run_stopped_by_an_error_ends_with_job_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run a rejected key stops (77) ends its log with broker.job_finished too: the exit
    code, the error and the rows as its ledger has them; the JSON log ended with
    broker.key_disabled, so a collector never saw how it ended."""
    monkeypatch.setenv("ASINB_UK", "wrong-secret")
    config = str(_config(tmp_path, _with_second_key("uk", "www.amazon.co.uk", "ASINB_UK")))
    job = _us_and_uk_job(tmp_path)
    args = ["run", str(job), "--config", config, "--out", str(tmp_path / "o.jsonl")]
    assert cli.main([*args, "--progress", "none"]) == ExitCode.NO_PERMISSION
    err = capsys.readouterr().err
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    (finished,) = [e for e in events if e.get("event") == "broker.job_finished"]
    assert finished["exit_code"] == ExitCode.NO_PERMISSION
    assert "no key can serve www.amazon.co.uk" in finished["error"]
    assert finished["rows"] == {"total": 20, "ok": 10}
    assert finished["pending"] == 10
    assert "wrong-secret" not in err


def test_a_run_stopped_by_an_error_prints_its_rows_and_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run a rejected UK key stops (77) after the US rows were done prints the rows line
    and where its output is before the error, as a finished run does; it printed only the
    error, so the ten rows written were not to be seen."""
    monkeypatch.setenv("ASINB_UK", "wrong-secret")
    config = str(_config(tmp_path, _with_second_key("uk", "www.amazon.co.uk", "ASINB_UK")))
    job = _us_and_uk_job(tmp_path)
    out = tmp_path / "o.jsonl"
    args = ["run", str(job), "--config", config, "--out", str(out), "--progress", "none"]
    assert cli.main(args) == ExitCode.NO_PERMISSION
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("{")]
    assert lines[:2] == ["rows: 20 (10 ok); pending 10", f"output: {out}"]
    assert "no key can serve www.amazon.co.uk" in lines[2]


def test_lookup_prints_what_other_marketplaces_answered_when_one_has_no_key_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """lookup of a US id and a UK link whose only key is rejected (a wrong secret): the US
    answer is printed, then exit 77 naming the UK; nothing at all was printed."""
    monkeypatch.setenv("ASINB_UK", "wrong-secret")
    config = str(_config(tmp_path, _with_second_key("uk", "www.amazon.co.uk", "ASINB_UK")))
    link = "https://www.amazon.co.uk/dp/B0C1234568"
    args = ["lookup", "B0C1234567", link, "--config", config, "--json", "--no-cache"]
    assert cli.main(args) == ExitCode.NO_PERMISSION
    out, err = capsys.readouterr()
    rows = _jsonl(out)
    assert [(row["line"], row["status"]) for row in rows] == [(1, "ok")]
    assert "no key can serve www.amazon.co.uk" in err


class _AsciiStdout(io.TextIOWrapper):
    """A stdout whose encoding is ASCII (a C locale, cron), a terminal or not."""

    terminal = False

    def isatty(self) -> bool:
        return self.terminal


@pytest.mark.parametrize("terminal", [False, True])
def test_lookup_on_a_stdout_that_is_not_utf8_prints_its_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, terminal: bool
) -> None:
    """lookup's rows reach a stdout whose encoding is not UTF-8: JSON lines as UTF-8 bytes,
    the same bytes run writes; the summary with what the terminal cannot show replaced. A
    German price ("4,36 €") ended the command in a UnicodeEncodeError traceback, exit 1."""
    tags = '{ "www.amazon.com" = "demo-20", "www.amazon.de" = "demo-22" }'
    text = _CONFIG.replace('{ "www.amazon.com" = "demo-20" }', tags)
    config = str(_config(tmp_path, text))
    raw = io.BytesIO()
    stdout = _AsciiStdout(raw, encoding="ascii")
    stdout.terminal = terminal
    monkeypatch.setattr(sys, "stdout", stdout)
    args = ["lookup", "--no-cache", "--config", config, "--marketplace", "DE", "B0C0000001"]
    assert cli.main(args) == 0
    stdout.flush()
    out = raw.getvalue()
    if terminal:
        assert out.decode("ascii").startswith("B0C0000001")
    else:
        (line,) = out.decode("utf-8").splitlines(keepends=True)
        row = json.loads(line)
        assert "€" in json.dumps(row["item"], ensure_ascii=False)
        assert line == json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"


def test_lookup_summary_on_an_ascii_terminal_replaces_what_it_cannot_show(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a terminal that cannot show a title's characters, the summary shows "?" for them
    (and the rest of the row), not a UnicodeEncodeError."""
    from broker.models import ItemResult, ItemSummary, Status

    raw = io.BytesIO()
    stdout = _AsciiStdout(raw, encoding="ascii")
    stdout.terminal = True
    monkeypatch.setattr(sys, "stdout", stdout)
    summary = ItemSummary(title="Thé vert", price=4.5, currency="EUR")
    result = ItemResult("B0C0000001", "www.amazon.de", Status.OK, summary=summary)
    cli._print_lookup_rows(["B0C0000001"], {0: result}, as_json=False, signalled=False)
    lines = raw.getvalue().splitlines()
    assert lines[1:] == [b"  Th? vert", b"  price 4.50 EUR"]


def test_lookup_whose_reader_leaves_mid_output_exits_141(tmp_path: Path) -> None:
    """lookup's rows written to a reader that goes away after the first bytes (| head -c):
    exit 141, as when it is gone before the first line. One write cut short by the closed
    pipe returned what it had written without an error, and lookup exited 0."""
    args = ["lookup", "--json", "--no-cache", "--config", str(_config(tmp_path))]
    _with_stdout_gone(tmp_path, args + [f"B0PIPE{i:04d}" for i in range(300)], after=100)


def test_lookup_asks_again_for_a_cached_answer_that_aged_while_it_waited(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """lookup prints once all are in: an answer read from the cache at the start that aged
    past its max age while the others were looked up (1.5 s a round trip here) is asked
    again, not printed stale (it was printed 9 s old against --max-age 6)."""
    from broker.engine.broker import Broker

    slow = embedded_toml(simulator="seed = 3\n[simulator.latency]\nfixed_ms = 750")
    config = str(_config(tmp_path, slow))
    assert cli.main(["lookup", "B0C1234567", "--json", "--config", config]) == 0
    capsys.readouterr()
    verdicts: list[bool] = []
    is_fresh = Broker.is_fresh

    def spy(self: Broker, result: Any) -> bool:
        verdicts.append(is_fresh(self, result))
        return verdicts[-1]

    monkeypatch.setattr(Broker, "is_fresh", spy)
    argv = ["lookup", "B0C1234567", "B0C1234568", "--json", "--max-age", "1"]
    assert cli.main([*argv, "--config", config]) == 0
    rows = _jsonl(capsys.readouterr().out)
    assert [(row["asin"], row["cached"]) for row in rows] == [
        ("B0C1234567", False),
        ("B0C1234568", False),
    ]
    assert False in verdicts  # the cached answer was read, and found aged


def test_lookup_shows_a_price_with_its_currency_s_decimals() -> None:
    """The summary shows $9.00 as 9.00 USD, not 9.0, and yen without decimals."""
    row: dict[str, object] = {
        "asin": "B0C1234568",
        "input": "B0C1234568",
        "marketplace": "www.amazon.com",
        "status": "ok",
        "summary": {"price": 9.0, "currency": "USD"},
    }
    assert "  price 9.00 USD" in cli._readable(row).splitlines()
    row["summary"] = {"price": 1280.0, "currency": "JPY"}
    assert "  price 1280 JPY" in cli._readable(row).splitlines()


@pytest.mark.parametrize("off", [["--no-cache"], ["--max-age", "0"]])
def test_lookup_refresh_with_no_cache_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], off: list[str]
) -> None:
    """lookup --refresh with --no-cache (or --max-age 0, the same) contradict each other
    (refresh writes the cache): exit 2 saying so, where it was accepted and wrote nothing."""
    config = str(_config(tmp_path))
    assert cli.main(["lookup", "B000000001", "--refresh", *off, "--config", config]) == 2
    assert " ".join(off) in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "flags"), [("", ["--no-cache"]), ("\n[cache]\nmax_age_s = 0\n", [])]
)
def test_run_refresh_with_the_cache_off_runs_the_job_again(
    tmp_path: Path, extra: str, flags: list[str]
) -> None:
    """run --refresh with the cache off (--no-cache, or max_age_s = 0) runs the job again
    and writes no cache: a refresh of a job is more than a refresh of the cache."""
    config = str(_config(tmp_path, _CONFIG + extra))
    job, out = _job(tmp_path), tmp_path / "out.jsonl"
    args = ["run", str(job), "--config", config, "--out", str(out), *flags]
    assert cli.main(args) == 0
    assert cli.main([*args, "--refresh"]) == 0
    assert len(_jsonl(out.read_text())) == 5


def test_lookup_refresh_with_the_cache_off_in_the_config_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """lookup --refresh with [cache] max_age_s = 0 in the config: exit 2 saying the config
    turns the cache off (it was accepted and wrote nothing); --max-age S turns it on."""
    config = str(_config(tmp_path, _CONFIG + "\n[cache]\nmax_age_s = 0\n"))
    assert cli.main(["lookup", "B000000001", "--refresh", "--config", config]) == 2
    assert "[cache] max_age_s = 0" in capsys.readouterr().err
    args = ["lookup", "B000000001", "--refresh", "--max-age", "60", "--config", config, "--json"]
    assert cli.main(args) == 0


@pytest.mark.parametrize("command", [["serve", "--spool", "spool"], ["simulate"]])
def test_an_ipv6_host_in_brackets_is_bound_without_them(command: list[str]) -> None:
    """--host [::1] (an address as a URL writes it) binds ::1; it passed the loopback check
    and then failed to bind, blaming the port ("cannot listen on [::1]:0")."""
    args = cli._build_parser().parse_args([*command, "--host", "[::1]"])
    assert args.host == "::1"
    with pytest.raises(SystemExit):
        cli._build_parser().parse_args([*command, "--host", "[]"])


def test_run_help_names_every_job_file_extension_read() -> None:
    """broker run --help lists every job-file name whose format its name tells (.tsv,
    .ndjson and .jsonlines were read, unlisted)."""
    from broker.jobs import sources

    for extension in sources._EXTENSIONS:
        assert extension in cli._JOB_NAMES


def _check_config(config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``broker check-config --config CONFIG`` in a process of its own, with ``env`` added."""
    return subprocess.run(
        [sys.executable, "-m", "broker", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **env},
    )


class TestCheckConfigOutput:
    def test_keys_tagged_elsewhere_are_told_to_set_the_default_marketplace(
        self, tmp_path: Path
    ) -> None:
        """check-config of keys tagged for amazon.de only, [api] marketplace unset: the
        warning names `marketplace = "www.amazon.de"` under [api] as well as the missing tag."""
        config = tmp_path / "config.toml"
        config.write_text(
            embedded_toml().replace('"www.amazon.com" = "demo-20"', '"www.amazon.de" = "demo-22"')
        )
        done = _check_config(config, ASINB_DEMO_SECRET="demo-secret")
        assert done.returncode == 0, done.stderr
        assert 'marketplace = "www.amazon.de" under [api]' in done.stderr

    def test_check_config_in_a_locale_that_cannot_write_a_key_name(self, tmp_path: Path) -> None:
        """check-config of a key named in Japanese, stdout ASCII (a Latin-1 or C locale):
        the name escaped and exit 0; it printed two lines, then a UnicodeEncodeError."""
        config = tmp_path / "config.toml"
        config.write_text(embedded_toml().replace('name = "demo"', 'name = "\u65e5\u672c"'))
        done = _check_config(config, PYTHONIOENCODING="ascii", ASINB_DEMO_SECRET="demo-secret")
        assert done.returncode == 0, done.stderr
        assert "key \\u65e5\\u672c: id demo-id" in done.stdout
        assert "Traceback" not in done.stderr

    def test_a_c_locale_prints_a_path_s_bytes_as_they_are(self, tmp_path: Path) -> None:
        """Under the C locale (a container's), a config path whose bytes are not UTF-8 is
        printed back byte for byte, as Python's surrogateescape writes it; escaping every
        stdout made it caf\\udce9, a path that does not exist."""
        folder = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
        folder.mkdir()
        config = folder / "config.toml"
        config.write_text(embedded_toml())
        done = subprocess.run(
            [sys.executable, "-m", "broker", "check-config", "--config", str(config)],
            capture_output=True,
            timeout=60,
            check=False,
            env={**os.environ, "LC_ALL": "C", "ASINB_DEMO_SECRET": "demo-secret"},
        )
        assert done.returncode == 0, done.stderr
        assert b"/caf\xe9/config.toml" in done.stdout

    def test_a_c_locale_without_utf8_mode_escapes_a_key_name(self, tmp_path: Path) -> None:
        """Under the C locale with UTF-8 mode off (PYTHONUTF8=0), stdout's surrogateescape
        raised on a key named in Japanese (a traceback, exit 1): the name is escaped, and a
        path's bytes are still printed as they are."""
        folder = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
        folder.mkdir()
        config = folder / "config.toml"
        config.write_text(embedded_toml().replace('name = "demo"', 'name = "\u65e5\u672c"'))
        done = subprocess.run(
            [sys.executable, "-m", "broker", "check-config", "--config", os.fsencode(config)],
            capture_output=True,
            timeout=60,
            check=False,
            env={
                **os.environ,
                "LC_ALL": "C",
                "PYTHONUTF8": "0",
                "PYTHONCOERCECLOCALE": "0",
                "ASINB_DEMO_SECRET": "demo-secret",
            },
        )
        assert done.returncode == 0, done.stderr
        assert b"/caf\xe9/config.toml" in done.stdout
        assert b"key \\u65e5\\u672c: id demo-id" in done.stdout
        assert b"Traceback" not in done.stderr

    def test_a_non_ascii_config_path_where_file_names_are_not_utf8(self, tmp_path: Path) -> None:
        """Under the C locale with UTF-8 mode off, ``[cache] path = "état/..."`` is a folder
        named in UTF-8 there too (the run ended "internal error: UnicodeEncodeError")."""
        config = tmp_path / "config.toml"
        config.write_text(embedded_toml() + '\n[cache]\npath = "\u00e9tat/cache.sqlite3"\n')
        job = _job(tmp_path, 2)
        done = subprocess.run(
            [sys.executable, "-m", "broker", "run", str(job), "--config", str(config)],
            capture_output=True,
            timeout=60,
            check=False,
            cwd=tmp_path,
            env={
                **os.environ,
                "LC_ALL": "C",
                "PYTHONUTF8": "0",
                "PYTHONCOERCECLOCALE": "0",
                "ASINB_DEMO_SECRET": "demo-secret",
            },
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert (tmp_path / "\u00e9tat" / "cache.sqlite3").exists()

    def test_check_config_of_a_systemd_credential_with_the_simulator(self, tmp_path: Path) -> None:
        """A key whose secret is a systemd credential, with the embedded simulator: noted as
        not checked here, not claimed to use the simulator's own secret (the run refuses it,
        exit 78)."""
        config = tmp_path / "config.toml"
        credential = "/run/credentials/asin-broker.service/main-secret"
        config.write_text(
            embedded_toml().replace(
                'version = "3.1"', f'version = "3.1"\ncredential_secret_file = "{credential}"'
            )
        )
        done = _check_config(config)
        assert done.returncode == 0, done.stderr
        assert "not checked here" in done.stderr
        assert "simulator's own account" not in done.stdout
        assert f"secret from file {credential}" in done.stdout

    def test_check_config_warns_of_two_entries_on_one_account(self, tmp_path: Path) -> None:
        """Two [[keys]] entries naming one credential: a warning that they share one rate
        and daily quota at the lowest figures; check-config said ok and listed both."""
        config = tmp_path / "config.toml"
        text = embedded_toml()
        second = (
            text[text.index("[[keys]]") : text.index("[log]")]
            .replace('name = "demo"', 'name = "demo2"')
            .replace("tps = 50.0", "tps = 5.0")
            .replace("tpd = 0", "tpd = 20")
        )
        config.write_text(text.replace("[log]", second + "[log]"))
        done = _check_config(config, ASINB_DEMO_SECRET="demo-secret")
        assert done.returncode == 0, done.stderr
        assert "keys demo, demo2 name one credential (demo-id)" in done.stderr
        assert "(5 TPS, 20 TPD)" in done.stderr


def test_an_output_path_longer_than_sqlite_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An --out whose ledger's full path is over what SQLite opens (512 bytes with room for
    "-journal") exits 74 saying so and leaves no empty ledger (it was "internal error:
    OperationalError: unable to open database file", exit 1)."""
    folder = tmp_path
    while len(os.fsencode(folder)) < 400:
        folder = folder / ("e" * 50)
    # The ledger's full path 508 bytes: within 512, but not with room for "-journal".
    folder = folder / ("f" * (508 - len(os.fsencode(folder)) - len("/x.jsonl.ledger") - 1))
    folder.mkdir(parents=True)
    out = folder / "x.jsonl"
    assert len(os.fsencode(f"{out}.ledger")) == 508
    code = cli.main(
        ["run", str(_job(tmp_path)), "--config", str(_config(tmp_path)), "--out", str(out)]
    )
    assert code == ExitCode.IO_ERROR
    err = capsys.readouterr().err
    assert "longer than the 504 bytes SQLite can open; choose a shorter path" in err
    assert "--out a shorter name" not in err
    assert not (folder / "x.jsonl.ledger").exists()


def test_commands_run_with_a_larger_young_generation_and_restore_it() -> None:
    """A command's event loop runs with the garbage collector's youngest generation at
    10,000 objects (700 made full collections stall big jobs' loops), and the process's
    own thresholds come back when it ends (cli.main may run inside another program)."""
    import gc

    before = gc.get_threshold()

    async def seen() -> int:
        return gc.get_threshold()[0]

    assert cli._run_loop(seen()) == 10_000
    assert gc.get_threshold() == before


def test_a_bug_in_a_run_logs_its_traceback_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bug outside the engine (the runner's own code) ends the run with 1 and a
    broker.job_finished that carries its traceback, masked as the log is: the event said
    only "internal error: RuntimeError: ...", nothing to report."""
    from broker.jobs import runner

    token = "Atc|" + "y" * 40

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"boom Bearer {token}")

    monkeypatch.setattr(runner, "run_job", broken)
    args = ["run", str(_job(tmp_path)), "--config", str(_config(tmp_path)), "--progress", "none"]
    assert cli.main(args) == ExitCode.INTERNAL
    err = capsys.readouterr().err
    assert token not in err
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    [event] = [e for e in events if e["event"] == "broker.job_finished"]
    assert event["exception"].startswith("Traceback (most recent call last)")
    assert "RuntimeError: boom Bearer ***" in event["exception"]
