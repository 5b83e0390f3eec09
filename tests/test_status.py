"""``broker status``: each configured key's shared state, from the store other processes use."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import ENV, sqlite_db

from broker import cli
from broker.state import Feedback, KeyLimits, KeyStateStore, KeyView, ProcessMark, StateKey
from broker.state.sqlite import SqliteStateStore

_CONFIG = """
[api]
endpoint = "http://127.0.0.1:9"

[[keys]]
name = "main"
credential_id = "cred-main"
credential_secret_env = "ASINB_DEMO_SECRET"
version = "3.1"
partner_tags = {{ "www.amazon.com" = "demo-20" }}
tps = 5
tpd = 100

[[keys]]
name = "spare"
credential_id = "cred-spare"
credential_secret_env = "ASINB_DEMO_SECRET"
version = "3.1"
partner_tags = {{ "www.amazon.com" = "demo-20" }}
tps = 1
tpd = 50

[state]
path = "{db}"
"""


@pytest.fixture
def config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config with two keys whose state lives in tmp_path/keys.sqlite3."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "config.toml"
    path.write_text(_CONFIG.format(db=tmp_path / "keys.sqlite3"))
    return path


async def _use_main_key(db: Path) -> None:
    """Another process's traffic on key "main": 3 sends, a 429, a Retry-After pause."""
    store = SqliteStateStore(db)
    key = StateKey.of("http://127.0.0.1:9", "cred-main")
    limits = KeyLimits(5.0, 0.05, 5.0, day_limit=99, tpd=100)
    mark = ProcessMark("host:1:x")
    sent = [
        await store.decide(key, limits, feedback=Feedback(), reserve=True, process=mark)
        for _ in range(3)
    ]
    await store.decide(
        key,
        limits,
        feedback=Feedback(throttled=(sent[0].now_us,), pause_s=30.0, pause_reason="Retry-After"),
        reserve=False,
        process=mark,
    )
    await store.aclose()


def _redis_config(tmp_path: Path, url: str) -> Path:
    """The two keys' config with its key state in the Redis at ``url``."""
    text = _CONFIG.format(db=tmp_path / "x.sqlite3").replace(
        f'path = "{tmp_path / "x.sqlite3"}"', f'backend = "redis"\nredis_url = "{url}"'
    )
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


class TestStatus:
    """The status verb reads, and never writes, the shared state."""

    def test_json_shows_the_shared_state(
        self, config_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--json: rate after the cut, requests today and left, the pause and its reason."""
        asyncio.run(_use_main_key(config_path.parent / "keys.sqlite3"))
        assert cli.main(["status", "--config", str(config_path), "--json"]) == 0
        captured = capsys.readouterr()
        document = json.loads(captured.out)
        assert document["backend"] == "local"
        assert document["where"] == str(config_path.parent / "keys.sqlite3")
        main, spare = document["keys"]
        assert main["key"] == "main"
        assert main["rate"] == pytest.approx(4.5)
        assert main["configured_tps"] == 5
        assert (main["requests_today"], main["daily_limit"], main["left_today"]) == (3, 99, 96)
        assert main["state"] == "paused"
        assert main["reason"] == "Retry-After"
        assert main["until"] is not None
        assert main["last_429"] is not None
        assert main["processes_recent"] == 1
        assert spare["requests_today"] == 0
        # No broker used it at this store: not "active" with its whole quota left.
        assert spare["state"] == "never used"
        assert spare["processes_recent"] == 0
        assert "no broker has used it there yet" in captured.err

    def test_entries_of_one_credential_show_its_lowest_daily_limit(
        self, config_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Two entries naming one credential keep to the lower tpd of the two in every run
        of this config, so status shows both spent at it; the higher entry showed "active"
        with 96 left while the run had just stopped for its daily quota."""
        text = config_path.read_text().replace('"cred-spare"', '"cred-main"')
        config_path.write_text(text.replace("tpd = 50", "tpd = 4"))
        db = config_path.parent / "keys.sqlite3"

        async def spend() -> None:
            store = SqliteStateStore(db)
            key = StateKey.of("http://127.0.0.1:9", "cred-main")
            limits = KeyLimits(1.0, 0.05, 1.0, day_limit=3, tpd=4)
            for _ in range(3):
                await store.decide(key, limits, feedback=Feedback(), reserve=True, process=None)
            await store.aclose()

        asyncio.run(spend())
        assert cli.main(["status", "--config", str(config_path), "--json"]) == 0
        main, spare = json.loads(capsys.readouterr().out)["keys"]
        for entry in (main, spare):
            assert (entry["requests_today"], entry["daily_limit"], entry["left_today"]) == (
                3,
                3,
                0,
            )
            assert entry["state"] == "waiting for daily quota"
            assert entry["reason"] == "daily quota spent"

    @pytest.mark.parametrize("problem", ["missing", "invalid"])
    def test_json_says_a_config_error_in_its_document(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], problem: str
    ) -> None:
        """--json: a config file that is missing or invalid still gives one document on
        stdout (no keys and the error), as the README promises; stdout was empty."""
        path = tmp_path / "broker.toml"
        if problem == "invalid":
            path.write_text("[state]\nbackend = 3\n")
        assert cli.main(["status", "--config", str(path), "--json"]) == 78
        captured = capsys.readouterr()
        document = json.loads(captured.out)
        assert document["keys"] == []
        assert str(path) in document["error"]
        assert document["error"] in captured.err

    def test_json_of_a_path_that_is_no_unicode_is_one_document(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--json with a path whose bytes are not UTF-8 (kept as lone surrogates): one
        document, the byte escaped, exit 78; it raised (orjson refuses surrogates), exit 1,
        stdout empty."""
        path = Path(os.fsdecode(bytes(tmp_path) + b"/missing-\xe9.toml"))
        assert cli.main(["status", "--config", str(path), "--json"]) == 78
        document = json.loads(capsys.readouterr().out)
        assert document["keys"] == []
        assert "missing-\udce9.toml" in document["error"]

    def test_table_names_every_key(
        self, config_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The table has one row per configured key, with today's count."""
        asyncio.run(_use_main_key(config_path.parent / "keys.sqlite3"))
        assert cli.main(["status", "--config", str(config_path)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert "rate/tps" in out[0]
        assert out[2].split()[0] == "main"
        assert "3/99" in out[2]
        assert "Retry-After" in out[2]
        assert out[3].split()[0] == "spare"
        assert out[-1] == f"key state: local, {config_path.parent / 'keys.sqlite3'}"

    def test_no_state_file_says_so_and_creates_none(
        self, config_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A state file no broker has written: say so, create nothing, show no fresh keys."""
        assert cli.main(["status", "--config", str(config_path)]) == 0
        captured = capsys.readouterr()
        assert "no key state at" in captured.err
        assert captured.out == ""
        assert not (config_path.parent / "keys.sqlite3").exists()

    def test_a_deleted_state_files_journals_are_named_not_taken_for_none(
        self, config_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The state file deleted without its -wal and -shm: status exits 74 naming them, as
        run and lookup do, and says to delete them; it said no broker had run, while run
        refused the path."""
        db = config_path.parent / "keys.sqlite3"
        for journal in ("-wal", "-shm"):
            Path(f"{db}{journal}").write_bytes(b"")
        assert cli.main(["status", "--config", str(config_path)]) == 74
        err = capsys.readouterr().err
        assert f"{db}-wal" in err
        assert "no broker has run" not in err
        assert "delete them" in err
        assert "until they stop" not in err

    def test_a_linked_state_files_journals_are_looked_for_beside_its_target(
        self, config_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """[state] path a link whose target was deleted without its -wal and -shm: status
        exits 74 naming them beside the target, as run and lookup refuse it; it looked
        beside the link and said no broker had run."""
        real = config_path.parent / "real"
        real.mkdir()
        for journal in ("-wal", "-shm"):
            (real / f"keys.sqlite3{journal}").write_bytes(b"")
        (config_path.parent / "keys.sqlite3").symlink_to(real / "keys.sqlite3")
        assert cli.main(["status", "--config", str(config_path)]) == 74
        err = capsys.readouterr().err
        assert f"{real / 'keys.sqlite3'}-wal" in err
        assert "no broker has run" not in err

    def test_a_park_that_ran_out_is_a_probe_due_not_probing(
        self, config_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A park whose time is up with nobody probing shows "probe due"."""

        async def park_briefly(db: Path) -> None:
            store = SqliteStateStore(db)
            key = StateKey.of("http://127.0.0.1:9", "cred-main")
            limits = KeyLimits(5.0, 0.05, 5.0, day_limit=99, tpd=100)
            feedback = Feedback(park_s=0.001, park_reason="quota_exhausted")
            await store.decide(key, limits, feedback=feedback, reserve=False, process=None)
            await store.aclose()
            await asyncio.sleep(0.01)

        asyncio.run(park_briefly(config_path.parent / "keys.sqlite3"))
        assert cli.main(["status", "--config", str(config_path), "--json"]) == 0
        main = json.loads(capsys.readouterr().out)["keys"][0]
        assert main["state"] == "probe due"

    def test_damaged_state_file_exits_74_with_a_line(
        self, config_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A state file that is not SQLite: one line saying so and what to do, exit 74; with
        --json, the document's ``where`` names the file (it was null)."""
        (config_path.parent / "keys.sqlite3").write_bytes(os.urandom(8192))
        assert cli.main(["status", "--config", str(config_path)]) == 74
        err = capsys.readouterr().err
        assert "damaged" in err
        assert "[Errno" not in err
        assert "Traceback" not in err
        # --json names the file it could not read, as for every other failure.
        assert cli.main(["status", "--config", str(config_path), "--json"]) == 74
        document = json.loads(capsys.readouterr().out)
        assert document["where"] == str(config_path.parent / "keys.sqlite3")
        assert "damaged" in document["error"]

    @pytest.mark.parametrize(
        "data", ['{"rate": 2.0, "count": "lots"', '{"rate": 2.0, "count": "lots"}', "[1, 2]"]
    )
    def test_a_damaged_key_record_exits_74_with_a_line(
        self, config_path: Path, capsys: pytest.CaptureFixture[str], data: str
    ) -> None:
        """A key's row that is not a record (cut short, a field of the wrong type): one line
        saying the file is damaged and what to do, exit 74, no traceback."""
        db = config_path.parent / "keys.sqlite3"
        asyncio.run(_use_main_key(db))
        with sqlite_db(db) as conn:
            conn.execute("UPDATE key_state SET data = ?", (data,))
        conn.close()
        assert cli.main(["status", "--config", str(config_path)]) == 74
        err = capsys.readouterr().err
        assert "damaged" in err
        assert "to start afresh" in err
        assert "Traceback" not in err

    def test_unreachable_redis_exits_69(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A [state] Redis nobody listens on: exit 69 with the reason on stderr; with --json,
        ``where`` names the URL (it was null)."""
        from broker.state.redis_server import free_port

        for name, value in ENV.items():
            monkeypatch.setenv(name, value)
        path = _redis_config(tmp_path, f"redis://127.0.0.1:{free_port()}/0")
        assert cli.main(["status", "--config", str(path)]) == 69
        assert "key-state store (redis) unavailable" in capsys.readouterr().err
        # With --json, stdout still holds a document a script can read.
        assert cli.main(["status", "--config", str(path), "--json"]) == 69
        document = json.loads(capsys.readouterr().out)
        assert document["keys"] == []
        assert "unavailable" in document["error"]
        assert document["where"].startswith("redis://127.0.0.1:")


class TestWithoutSecrets:
    """Status and cache commands send nothing to Amazon, so they need none of its secrets."""

    @pytest.fixture
    def bare(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        """The two-key config with no secret in the environment and one key's secret in a
        file this user cannot see (the daemon's credentials directory)."""
        for name in ENV:
            monkeypatch.delenv(name, raising=False)
        text = _CONFIG.format(db=tmp_path / "keys.sqlite3").replace(
            'credential_id = "cred-spare"\ncredential_secret_env = "ASINB_DEMO_SECRET"',
            'credential_id = "cred-spare"\n'
            'credential_secret_file = "/run/credentials/asin-broker.service/spare-secret"',
        )
        path = tmp_path / "config.toml"
        path.write_text(text + f'\n[cache]\npath = "{tmp_path / "cache.sqlite3"}"\n')
        return path

    def test_a_redis_asking_a_password_is_named_in_the_document(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A [state] Redis that asks a password none was given for: exit 78, and --json's
        ``where`` names its URL (it was null)."""
        from broker.state.redis_server import RedisServer, redis_server_binary

        if redis_server_binary() is None:
            pytest.skip("no redis-server")
        for name, value in ENV.items():
            monkeypatch.setenv(name, value)
        server = RedisServer(password="right-one")
        server.start()
        try:
            path = _redis_config(tmp_path, server.url)
            assert cli.main(["status", "--config", str(path), "--json"]) == 78
        finally:
            server.__exit__(None, None, None)
        document = json.loads(capsys.readouterr().out)
        assert "requires a password" in document["error"]
        assert document["where"] == server.url

    def test_a_redis_key_with_no_record_may_have_lost_it(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A Redis-kept key with no record (Redis restarted empty, or flushed): the note
        says the store may have lost it and the brokers write it again; it said only that
        no broker had used the key, while three were spending its day."""
        from broker.state.redis_server import RedisServer, redis_server_binary

        if redis_server_binary() is None:
            pytest.skip("no redis-server")
        for name, value in ENV.items():
            monkeypatch.setenv(name, value)
        with RedisServer() as server:
            path = _redis_config(tmp_path, server.url)
            assert cli.main(["status", "--config", str(path)]) == 0
        err = capsys.readouterr().err
        assert "no broker has used it there yet, or the store lost it" in err
        assert "within 30 s" in err

    def test_status_runs_without_the_secrets(
        self, bare: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """broker status reads the shared state with no secret set or readable."""
        asyncio.run(_use_main_key(bare.parent / "keys.sqlite3"))
        assert cli.main(["status", "--config", str(bare), "--json"]) == 0
        main, _ = json.loads(capsys.readouterr().out)["keys"]
        assert main["requests_today"] == 3

    def test_status_needs_no_redis_cache_url(
        self, bare: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """broker status with a Redis item cache whose URL variable (it holds the password)
        is not set in this shell shows the key state (it never opens the cache); it exited
        78 for the variable. broker cache, which needs it, still says it is not set (78)."""
        pytest.importorskip("redis")
        monkeypatch.delenv("ASINB_TEST_RURL", raising=False)
        text = bare.read_text().rsplit("[cache]", 1)[0]
        bare.write_text(text + '[cache]\nbackend = "redis"\nredis_url_env = "ASINB_TEST_RURL"\n')
        asyncio.run(_use_main_key(bare.parent / "keys.sqlite3"))
        assert cli.main(["status", "--config", str(bare), "--json"]) == 0
        main, _ = json.loads(capsys.readouterr().out)["keys"]
        assert main["requests_today"] == 3
        assert cli.main(["cache", "stats", "--config", str(bare)]) == 78
        assert "ASINB_TEST_RURL is not set" in capsys.readouterr().err

    def test_cache_stats_and_purge_run_without_the_secrets(
        self, bare: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """broker cache stats and purge open the item cache with no secret set or readable."""
        assert cli.main(["cache", "stats", "--config", str(bare)]) == 0
        assert cli.main(["cache", "purge", "--config", str(bare)]) == 0
        assert "purged 0 cached answers" in capsys.readouterr().out

    def test_cache_commands_create_no_cache(
        self, bare: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """No item cache yet: stats shows zero entries and purge removes none, saying so,
        and neither creates the file (as status creates no state file)."""
        assert cli.main(["cache", "stats", "--config", str(bare), "--json"]) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out)["entries"] == 0
        assert "no item cache at" in captured.err
        assert cli.main(["cache", "purge", "--config", str(bare)]) == 0
        assert "purged 0 cached answers" in capsys.readouterr().out
        assert not (bare.parent / "cache.sqlite3").exists()

    def test_cache_stats_names_journals_left_without_their_file(
        self, bare: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The cache file deleted without its -wal and -shm: stats and purge exit 74 naming
        them, as every run refuses the cache for them; they said "nothing is cached"."""
        for journal in ("-wal", "-shm"):
            (bare.parent / f"cache.sqlite3{journal}").write_bytes(b"")
        for command in ("stats", "purge"):
            assert cli.main(["cache", command, "--config", str(bare)]) == 74
            err = capsys.readouterr().err
            assert "cache.sqlite3-wal" in err
            assert "nothing is cached" not in err

    def test_a_redis_cache_asking_a_password_is_a_config_error(
        self, bare: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A Redis item cache that asks a password none was given for, or refuses the one
        given: cache stats exits 78 naming the password; it was 74, "check that Redis is
        up"."""
        from broker.state.redis_server import RedisServer, redis_server_binary

        if redis_server_binary() is None:
            pytest.skip("no redis-server")
        server = RedisServer(password="right-one")
        server.start()
        try:
            text = bare.read_text().split("\n[cache]")[0]
            bare.write_text(text + '\n[cache]\nbackend = "redis"\nredis_url_env = "CACHE_URL"\n')
            port = server.url.rsplit(":", 1)[1].split("/")[0]
            for url in (server.url, f"redis://:wrong-one@127.0.0.1:{port}/0"):
                monkeypatch.setenv("CACHE_URL", url)
                assert cli.main(["cache", "stats", "--config", str(bare)]) == 78
                err = capsys.readouterr().err
                assert "Redis refused the connection's authentication" in err
                assert "put the right one in the URL in CACHE_URL" in err
                assert "wrong-one" not in err
        finally:
            server.__exit__(None, None, None)

    def test_a_redis_cache_shows_no_byte_bound(
        self, bare: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """cache stats of a Redis item cache: max_bytes is none (Redis's maxmemory bounds
        it, as the README says); it showed the unused 256 MiB as if it applied."""
        from broker.state.redis_server import RedisServer, redis_server_binary

        if redis_server_binary() is None:
            pytest.skip("no redis-server")
        with RedisServer() as server:
            text = bare.read_text().split("\n[cache]")[0]
            bare.write_text(text + '\n[cache]\nbackend = "redis"\nredis_url_env = "CACHE_URL"\n')
            monkeypatch.setenv("CACHE_URL", server.url)
            assert cli.main(["cache", "stats", "--config", str(bare), "--json"]) == 0
            report = json.loads(capsys.readouterr().out)
            assert (report["backend"], report["max_bytes"]) == ("redis", None)
            assert report["max_items"] == 100_000

    def test_a_cache_path_that_can_never_be_made_is_an_io_error(
        self, bare: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A cache path under a regular file: stats and purge exit 74 naming the error,
        as runs warn; they said "nothing is cached" and exited 0."""
        (bare.parent / "afile").write_text("")
        text = bare.read_text().replace("cache.sqlite3", "afile/cache.sqlite3")
        bare.write_text(text)
        for command in ("stats", "purge"):
            assert cli.main(["cache", command, "--config", str(bare)]) == 74
            err = capsys.readouterr().err
            assert "cannot be used" in err
            assert "nothing is cached" not in err

    def test_run_still_needs_them(self, bare: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A command that sends still refuses a config whose secret is missing (78)."""
        job = bare.parent / "job.txt"
        job.write_text("B0C1234567\n")
        out = bare.parent / "out.jsonl"
        assert cli.main(["run", str(job), "--config", str(bare), "--out", str(out)]) == 78
        assert "ASINB_DEMO_SECRET is not set" in capsys.readouterr().err


class TestJsonWithNothingToShow:
    """--json always prints one JSON document, even when there is no state to show."""

    def test_no_state_file_prints_an_empty_document(
        self, config_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """No state file yet: a document with no keys and the reason, exit 0."""
        assert cli.main(["status", "--config", str(config_path), "--json"]) == 0
        captured = capsys.readouterr()
        document = json.loads(captured.out)
        assert document["keys"] == []
        assert document["where"] == str(config_path.parent / "keys.sqlite3")
        assert "no key state at" in document["note"]
        assert "no key state at" in captured.err

    def test_an_unreadable_state_directory_still_prints_a_document(
        self, config_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A state file this user may not look at (a daemon's 0700 directory): exit 74, and
        with --json stdout still holds a document naming the file and the error."""
        db = config_path.parent / "keys.sqlite3"
        real_stat = Path.stat

        def stat(self: Path, *args: Any, **kwargs: Any) -> os.stat_result:
            if self == db:
                raise PermissionError(13, "Permission denied")
            return real_stat(self, *args, **kwargs)

        monkeypatch.setattr(Path, "stat", stat)
        # The config's own check that the path is no directory is not what is tried here.
        monkeypatch.setattr(Path, "is_dir", lambda self: False)
        assert cli.main(["status", "--config", str(config_path), "--json"]) == 74
        document = json.loads(capsys.readouterr().out)
        assert document["keys"] == []
        assert document["where"] == str(db)
        assert "Permission denied" in document["error"]

    def test_a_file_in_place_of_the_state_directory_is_an_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """[state] path under a regular file: exit 74 naming the file, as run and lookup
        end; it said "no key state yet" and exited 0 (Path.exists() hides ENOTDIR)."""
        (tmp_path / "statefile").touch()
        path = tmp_path / "config.toml"
        path.write_text(_CONFIG.format(db=tmp_path / "statefile" / "keys.sqlite3"))
        assert cli.main(["status", "--config", str(path), "--json"]) == 74
        document = json.loads(capsys.readouterr().out)
        assert f"{tmp_path / 'statefile'} is a file, not a directory" in document["error"]

    def test_memory_state_says_there_is_none_to_show(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """[state] backend = "memory" keeps each process's key state inside it: status says
        so, instead of showing a fresh store's made-up figures (every key active, 0 today)."""
        path = tmp_path / "config.toml"
        path.write_text(
            _CONFIG.format(db=tmp_path / "k.sqlite3").replace(
                "[state]\n", '[state]\nbackend = "memory"\n'
            )
        )
        assert cli.main(["status", "--config", str(path), "--json"]) == 0
        captured = capsys.readouterr()
        document = json.loads(captured.out)
        assert document["keys"] == []
        assert "memory" in document["note"]
        assert "memory" in captured.err

    def test_embedded_simulator_prints_an_empty_document(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The embedded simulator's keys are per process: a document saying so."""
        path = tmp_path / "config.toml"
        path.write_text(
            _CONFIG.format(db=tmp_path / "k.sqlite3").replace("http://127.0.0.1:9", "simulator")
        )
        assert cli.main(["status", "--config", str(path), "--json"]) == 0
        document = json.loads(capsys.readouterr().out)
        assert document["keys"] == []
        assert "simulator" in document["note"]


def test_times_are_told_by_the_stores_clock() -> None:
    """A park's end is shown by the store's wall clock (Redis's, on every machine), as the
    daily reset is; it was this machine's clock plus the time left, hours off on a machine
    whose clock is."""
    from datetime import UTC, datetime, timedelta

    from broker.state import MemoryStateStore
    from broker.status import _status

    store_wall = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)  # not this machine's clock
    store = MemoryStateStore(lambda: 5_000_000, lambda: int(store_wall.timestamp() * 1e6))
    key = StateKey.of("http://sim", "cred", name="k")
    limits = KeyLimits(1.0, 0.05, 1.0, day_limit=100, tpd=100)
    mark = ProcessMark("p:1:a")

    async def view_parked() -> object:
        await store.decide(
            key,
            limits,
            feedback=Feedback(park_s=600.0, park_reason="x"),
            reserve=False,
            process=mark,
        )
        return await store.view(key, limits)

    status = _status(asyncio.run(view_parked()), 1.0)  # type: ignore[arg-type]
    assert status.state == "parked"
    assert status.until == (store_wall + timedelta(seconds=600)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _view_after_sends(
    store: KeyStateStore, key: StateKey, sent_with: KeyLimits, sends: int, seen_with: KeyLimits
) -> KeyView:
    """The key's view under ``seen_with`` once one process sent ``sends`` requests on it
    under ``sent_with``."""

    async def run() -> KeyView:
        for _ in range(sends):
            await store.decide(
                key, sent_with, feedback=Feedback(), reserve=True, process=ProcessMark("p:1:a")
            )
        return await store.view(key, seen_with)

    return asyncio.run(run())


def test_a_key_held_by_another_process_lower_tpd_is_not_shown_spent() -> None:
    """Another process's lower tpd holds the key, this config's own limit not reached:
    status names the hold and no reset time; it said "daily quota spent" until tomorrow's
    reset, while that hold lapses when the other process closes."""
    from broker.state import MemoryStateStore
    from broker.status import _status

    store = MemoryStateStore(lambda: 5_000_000, lambda: 1_800_000_000_000_000)
    key = StateKey.of("http://sim", "cred", name="k")
    low = KeyLimits(5.0, 0.05, 5.0, day_limit=2, tpd=3)
    own = KeyLimits(5.0, 0.05, 5.0, day_limit=50, tpd=51)

    status = _status(_view_after_sends(store, key, low, 3, own), 5.0)
    assert status.state == "waiting for daily quota"
    assert status.reason == "another process's lower tpd (2/day)"
    assert status.until is None


def test_a_spent_day_ends_at_the_configured_reset() -> None:
    """A key whose daily window resets at 08:00 UTC ([rate] daily_reset_utc), its day
    spent: status shows it held until the next 08:00 UTC, not until midnight."""
    from datetime import UTC, datetime

    from broker.state import MemoryStateStore
    from broker.status import _status

    store_wall = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
    store = MemoryStateStore(lambda: 5_000_000, lambda: int(store_wall.timestamp() * 1e6))
    key = StateKey.of("http://sim", "cred", name="k")
    limits = KeyLimits(5.0, 0.05, 5.0, day_limit=2, tpd=2, reset_offset_s=8 * 3_600)

    status = _status(_view_after_sends(store, key, limits, 2, limits), 5.0)
    assert status.state == "waiting for daily quota"
    assert status.reason == "daily quota spent"
    assert status.until == "2026-12-06T08:00:00Z"


def test_a_count_past_the_limit_leaves_none_not_less() -> None:
    """Another process's mark raises the day's count past the limit (it saw more sent
    before the store lost the key): status shows 0 left, never a negative number."""
    from broker.state import MemoryStateStore, day_number
    from broker.status import _status

    wall_us = 1_800_000_000_000_000
    store = MemoryStateStore(lambda: 5_000_000, lambda: wall_us)
    key = StateKey.of("http://sim", "cred", name="k")
    limits = KeyLimits(5.0, 0.05, 5.0, day_limit=2, tpd=2)
    mark = ProcessMark("p:1:a", hwm_day=day_number(wall_us, 0), hwm_count=5)

    async def mark_then_view() -> object:
        await store.decide(key, limits, feedback=Feedback(), reserve=False, process=mark)
        return await store.view(key, limits)

    status = _status(asyncio.run(mark_then_view()), 5.0)  # type: ignore[arg-type]
    assert (status.today, status.day_limit) == (5, 2)
    assert status.left == 0
