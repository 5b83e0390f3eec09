"""The shipping kit: wheel metadata, Dockerfile, systemd unit, compose stack, Prometheus, Grafana.

Every file under ``deploy/`` (and the Dockerfile) is parsed and checked against the code it
deploys: the command lines against ``broker serve --help``, the volumes against the paths the
daemon writes, and every metric a dashboard panel or alert rule queries against what a running
``broker serve`` serves on ``/metrics``. Where a tool exists on the machine (``promtool``,
``systemd-analyze``, ``uv``) the files also go through it; otherwise those tests are skipped.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import aiohttp
import pytest
from yaml_subset import load as load_yaml

from broker.config import load_config, parse_config
from broker.errors import ConfigError
from broker.jobs.serve import Daemon, ServeOptions

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
REPO_URL = "https://github.com/asin-broker/asin-broker"
_METRIC = re.compile(r"\b((?:asinb|process)_[a-z0-9_]+)\b")
_SELECTOR = re.compile(r"\b((?:asinb|process)_[a-z0-9_]+)\{([^}]*)\}")
_SECRET_WORDS = re.compile(r"SECRET|PASSWORD|TOKEN|PRIVATE|CREDENTIAL", re.IGNORECASE)


# -- helpers --------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile as (INSTRUCTION, arguments) pairs, continuation lines joined."""
    joined: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined]


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def _exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), arguments
    return [str(part) for part in value]


def _unit_config(tmp_path: Path, replacements: dict[str, str]) -> Path:
    """The unit's example config, with ``replacements`` (old -> new text), as
    ``tmp_path/config.toml``."""
    text = (DEPLOY / "systemd" / "config.toml").read_text()
    for old, new in replacements.items():
        text = text.replace(old, new)
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file as section -> [(key, value)] (keys may repeat, as systemd allows)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"option outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {line}"
        current.append((key.strip(), value.strip()))
    return sections


def _values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [value for name, value in section if name == key]


@functools.cache
def _serve_flags() -> frozenset[str]:
    """The options ``broker serve --help`` documents."""
    done = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return frozenset(re.findall(r"(--[a-z][a-z-]+)", done.stdout))


def _check_serve_command(argv: list[str]) -> dict[str, str | None]:
    """Assert ``argv`` is ``serve`` with documented options only; return option -> value."""
    assert argv[0] == "serve", argv
    options: dict[str, str | None] = {}
    args = iter(argv[1:])
    for arg in args:
        assert arg in _serve_flags(), f"{arg} is not an option of broker serve"
        options[arg] = None if arg == "--allow-remote" else next(args)
    assert "--spool" in options
    return options


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min|m)?", text.strip())
    assert match, text
    factor = {"ms": 0.001, "s": 1.0, None: 1.0, "min": 60.0, "m": 60.0}[match[2]]
    return float(match[1]) * factor


UK = "www.amazon.co.uk"


@functools.cache
def _served() -> dict[str, frozenset[str]]:
    """Families on a running ``broker serve``'s /metrics (after one job) -> their label names."""
    return asyncio.run(_scrape())


async def _scrape() -> dict[str, frozenset[str]]:
    import tempfile

    account = {
        "name": "demo",
        "protocol": "creators",
        "credential_id": "demo-id",
        "secret": "demo-secret",
        "version": "3.1",
        "partner_tags": {"www.amazon.com": "demo-20"},
        "tps": 200.0,
        "tpd": 1_000_000,
    }
    key = {
        "name": "demo",
        "credential_id": "demo-id",
        "version": "3.1",
        "partner_tags": {"www.amazon.com": "demo-20", UK: "demo-21"},
        "tps": 100.0,
    }
    document = {
        "api": {"endpoint": "simulator"},
        "keys": [key],
        "engine": {"linger_s": 0.005},
        "simulator": {"seed": 3, "accounts": [account]},
    }
    config = parse_config(document, environ={})
    with tempfile.TemporaryDirectory() as tmp:
        spool = Path(tmp) / "spool"
        options = ServeOptions(
            spool=spool, port=0, poll_s=0.05, progress="none", handle_signals=False
        )
        daemon = Daemon(config, options)
        task = asyncio.get_running_loop().create_task(daemon.run())
        try:
            async with asyncio.timeout(30):
                await daemon.started.wait()
                (spool / "inbox" / ".j.txt").write_text("B0DEPLOY01\nB0DEPLOY02\nnot-an-asin\n")
                os.rename(spool / "inbox" / ".j.txt", spool / "inbox" / "j.txt")
                # The file system has no event to wait on: poll it.
                while not (spool / "done" / "j.txt.status.json").exists():  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
                # What a rejected UK tag does (the simulator serves US only), for the family
                # present only then.
                assert daemon._broker is not None
                (key_state,) = daemon._broker._keys
                key_state.disable("InvalidPartnerTag", "bad tag", "fix it", marketplace=UK)
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"{daemon.url}/metrics") as response,
                ):
                    text = await response.text()
        finally:
            daemon.request_stop()
            await task
    return _families(text)


def _families(text: str) -> dict[str, frozenset[str]]:
    kinds: dict[str, str] = {}
    labels: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            kinds[name] = kind
            labels.setdefault(name, set())
        elif line and not line.startswith("#"):
            sample = line.rpartition(" ")[0]
            name, _, rest = sample.partition("{")
            family = name
            if family not in kinds:
                family = re.sub(r"_(bucket|sum|count)$", "", name)
            assert family in kinds, line
            labels[family].update(re.findall(r'([a-zA-Z_]\w*)="', rest))
    for name, kind in kinds.items():
        if kind == "histogram":
            labels[name].discard("le")
    return {name: frozenset(found) for name, found in labels.items()}


def _family_of(name: str, served: dict[str, frozenset[str]]) -> str | None:
    if name in served:
        return name
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    return base if base in served else None


def _check_queries(expressions: list[str], where: str) -> None:
    """Every metric in ``expressions`` is served, and every label they match on exists."""
    served = _served()
    assert expressions, f"no queries found in {where}"
    for expr in expressions:
        for name in _METRIC.findall(expr):
            assert _family_of(name, served), f"{where}: {name} is not on /metrics ({expr})"
        for name, matchers in _SELECTOR.findall(expr):
            family = _family_of(name, served)
            assert family is not None
            for label in re.findall(r"([a-zA-Z_]\w*)\s*[!=]~?", matchers):
                allowed = served[family] | ({"le"} if name.endswith("_bucket") else set())
                if label in ("job", "instance"):
                    continue  # attached by Prometheus at scrape time
                assert label in allowed, f"{where}: {name} has no label {label} ({expr})"


def _dashboard() -> dict[str, object]:
    data: dict[str, object] = json.loads((DEPLOY / "grafana" / "asin-broker.json").read_text())
    return data


def _dashboard_exprs() -> list[str]:
    panels = _dashboard()["panels"]
    assert isinstance(panels, list)
    return [str(target["expr"]) for panel in panels for target in panel["targets"]]


def _alert_rules() -> list[dict[str, object]]:
    document = load_yaml((DEPLOY / "prometheus" / "alerts.yml").read_text())
    assert isinstance(document, dict)
    return [rule for group in document["groups"] for rule in group["rules"]]


def _compose() -> dict[str, object]:
    document = load_yaml((DEPLOY / "compose.yaml").read_text())
    assert isinstance(document, dict)
    return document


# -- the package ----------------------------------------------------------------------------


class TestPackage:
    @pytest.mark.skipif(shutil.which("uv") is None, reason="uv is not on PATH")
    def test_wheel_metadata(self, tmp_path: Path) -> None:
        """The built wheel has the distribution name, both scripts, licence, URLs and typing."""
        subprocess.run(
            ["uv", "build", "--wheel", "--out-dir", str(tmp_path), str(ROOT)],
            check=True,
            capture_output=True,
            timeout=300,
        )
        (wheel,) = tmp_path.glob("asin_broker-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            info = next(n for n in names if n.endswith(".dist-info/METADATA"))
            meta = Parser().parsestr(archive.read(info).decode())
            scripts = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
            licence = archive.read(info.replace("METADATA", "licenses/LICENSE")).decode()
        assert meta["Name"] == "asin-broker"
        assert meta["License-Expression"] == "Apache-2.0"
        assert "Apache License" in licence
        assert "Version 2.0, January 2004" in licence
        assert "END OF TERMS AND CONDITIONS" in licence
        classifiers = meta.get_all("Classifier") or []
        assert "Typing :: Typed" in classifiers
        assert "Programming Language :: Python :: 3.11" in classifiers
        assert "broker/py.typed" in names
        urls = dict(url.split(", ", 1) for url in meta.get_all("Project-URL") or [])
        assert urls["Source"] == REPO_URL
        assert "amazon" in (meta["Keywords"] or "")
        assert "broker = broker.cli:main" in scripts
        assert "asin-broker = broker.cli:main" in scripts
        description = meta.get_payload()
        assert isinstance(description, str)
        assert f"https://raw.githubusercontent.com/{REPO_URL.split('github.com/')[1]}/" in (
            description
        )

    @pytest.mark.skipif(
        shutil.which("uv") is None or shutil.which("git") is None or not (ROOT / ".git").exists(),
        reason="needs uv and a git checkout (an unpacked sdist has no history to list)",
    )
    def test_sdist_holds_only_the_project(self, tmp_path: Path) -> None:
        """The sdist holds the tracked sources, never a stray config, secret or spool file."""
        tree = tmp_path / "tree"
        tracked = (
            subprocess.run(
                ["git", "-C", str(ROOT), "ls-files", "-z"], check=True, capture_output=True
            )
            .stdout.decode()
            .split("\0")
        )
        for name in filter(None, tracked):
            if (ROOT / name).is_file():
                (tree / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, tree / name)
        strays = [
            ".env",
            "main.secret",
            "my-config.toml",
            "spool/inbox/job.txt",
            "notes.txt",
            "deploy/systemd/main.secret",
            "deploy/systemd/credentials/main-secret",
            "deploy/compose/main-secret.txt",
            "deploy/compose/main_secret",
            "examples/tls/client.key",
            "deploy/compose/.env",
            "examples/out/asins.jsonl",
            "examples/keys.sqlite3",
        ]
        for stray in strays:
            (tree / stray).parent.mkdir(parents=True, exist_ok=True)
            (tree / stray).write_text("credential_secret = 'hunter2'\n")
        subprocess.run(
            ["uv", "build", "--sdist", "--out-dir", str(tmp_path / "dist"), str(tree)],
            check=True,
            capture_output=True,
            timeout=300,
        )
        (sdist,) = (tmp_path / "dist").glob("asin_broker-*.tar.gz")
        with tarfile.open(sdist) as archive:
            names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
        for stray in strays:
            assert stray not in names
        assert not any(name.startswith("benchmarks/results/") for name in names)
        for wanted in ("pyproject.toml", "README.md", "LICENSE", "config.toml"):
            assert wanted in names
        assert "broker/cli.py" in names
        assert "broker/state/decide.lua" in names
        assert "tests/test_deploy.py" in names
        assert "tests/test_engine_secrets.py" in names
        assert ".ci/run" in names  # the tests' documented way to run (README, Development)

    def test_readme_links_work_on_a_package_index(self) -> None:
        """README links and images are absolute, so they render on PyPI."""
        readme = (ROOT / "README.md").read_text()
        targets = re.findall(r"\]\(([^)\s]+)\)", readme)
        assert targets
        for target in targets:
            assert target.startswith(("https://", "http://", "#")), target

    def test_python_versions_claimed_are_the_tested_ones(self) -> None:
        """The classifiers name exactly the Python versions the README says are tested."""
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        claimed = {
            c.rsplit(" :: ", 1)[1]
            for c in project["classifiers"]
            if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
        }
        readme = (ROOT / "README.md").read_text()
        section = readme.split("### Python versions", 1)[1].split("\n#", 1)[0]
        tested_line = section.split("**Tested:**", 1)[1].split("\n- ", 1)[0]
        tested = set(re.findall(r"CPython (3\.\d+)\.\d+", tested_line))
        assert claimed == tested
        assert project["requires-python"] == f">={min(claimed, key=lambda v: int(v[2:]))}"


# -- the container --------------------------------------------------------------------------


class TestDockerfile:
    def test_multi_stage_non_root_healthcheck_volumes(self) -> None:
        """Two stages built with uv; the image runs as a non-root user with health and volumes."""
        instructions = _instructions(ROOT / "Dockerfile")
        froms = [args for op, args in instructions if op == "FROM"]
        assert len(froms) >= 2
        assert all(" AS " in args.upper() for args in froms)
        runs = " ".join(args for op, args in instructions if op == "RUN")
        assert "uv sync --frozen --no-dev" in runs
        final = _final_stage(instructions)
        users = [args for op, args in final if op == "USER"]
        assert users, "the runtime stage sets no USER"
        assert users[-1].split(":")[0] not in ("root", "0")
        (health,) = [args for op, args in final if op == "HEALTHCHECK"]
        assert "/healthz" in health
        assert "--interval=" in health
        (volumes,) = [_exec_form(args) for op, args in final if op == "VOLUME"]
        command = _exec_form(next(args for op, args in final if op == "CMD"))
        options = _check_serve_command(command)
        assert options["--spool"] in volumes
        env = " ".join(args for op, args in final if op == "ENV")
        state_home = re.search(r"XDG_STATE_HOME=(\S+)", env)
        assert state_home is not None
        assert f"{state_home[1]}/asin-broker" in volumes
        assert _exec_form(next(args for op, args in final if op == "ENTRYPOINT")) == ["asin-broker"]
        assert ("EXPOSE", options["--port"]) in final

    def test_no_secret_is_baked_in(self) -> None:
        """No ENV/ARG carries a secret, and the build context excludes secret files."""
        for op, args in _instructions(ROOT / "Dockerfile"):
            if op in ("ENV", "ARG"):
                for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args):
                    assert not _SECRET_WORDS.search(name), f"{op} {name} looks like a secret"
            if op in ("COPY", "ADD"):
                assert not re.search(r"\.env\b|secret|credential", args, re.IGNORECASE), args
        ignore = [
            line
            for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line and not line.startswith("#")
        ]
        assert ignore[0] == "*", "the build context should admit only what the image needs"
        assert "**/.env" in ignore
        assert "**/*.secret" in ignore

    def test_the_image_config_is_the_package_template(self) -> None:
        """The image's config is the package's starter config, never the ./config.toml of
        the clone it is built from (edited for real keys, it was baked into the image), and
        the build context does not admit that file at all."""
        copies = [
            args
            for op, args in _final_stage(_instructions(ROOT / "Dockerfile"))
            if op == "COPY" and "/etc/asin-broker/config.toml" in args
        ]
        assert copies == [
            "--from=build /src/broker/templates/config.toml /etc/asin-broker/config.toml"
        ]
        ignore = (ROOT / ".dockerignore").read_text().splitlines()
        assert "!config.toml" not in ignore
        assert "!broker/" in ignore  # the template comes in with the package

    def test_entry_command_serves_health_and_stops_on_sigterm(self, tmp_path: Path) -> None:
        """The image's ENTRYPOINT + CMD, run from this venv, passes its HEALTHCHECK (which
        goes straight to the daemon, even with a proxy in the environment, as Docker sets
        from the client's proxy settings) and stops."""
        final = _final_stage(_instructions(ROOT / "Dockerfile"))
        entry = _exec_form(next(args for op, args in final if op == "ENTRYPOINT"))
        command = _exec_form(next(args for op, args in final if op == "CMD"))
        health = next(args for op, args in final if op == "HEALTHCHECK")
        port = str(_free_port())
        config = tmp_path / "config.toml"
        shutil.copy(ROOT / "broker" / "templates" / "config.toml", config)  # the image's
        replace = {
            "/etc/asin-broker/config.toml": str(config),
            "/var/spool/asin-broker": str(tmp_path / "spool"),
            "9464": port,
            "0.0.0.0": "127.0.0.1",
        }
        argv = [replace.get(arg, arg) for arg in command]
        script = Path(sys.executable).with_name(entry[0])
        assert script.exists(), f"{script}: the console script is not installed"
        env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
        process = subprocess.Popen(
            [str(script), *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        try:
            check = _exec_form(health.split(" CMD ", 1)[1])
            check = [part.replace(":9464/", f":{port}/") for part in check]
            check[0] = sys.executable if check[0].startswith("python") else check[0]
            deadline = time.monotonic() + 30
            proxy = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
            proxied = {**os.environ, "HTTP_PROXY": proxy, "http_proxy": proxy, "NO_PROXY": ""}
            proxied.pop("no_proxy", None)
            while (
                subprocess.run(check, capture_output=True, timeout=10, env=proxied).returncode != 0
            ):
                assert process.poll() is None, process.communicate()[1]
                assert time.monotonic() < deadline, "HEALTHCHECK never passed"
                time.sleep(0.1)
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert process.returncode == 0, stderr
        assert b"broker.daemon_stopped" in stderr


# -- systemd --------------------------------------------------------------------------------


class TestSystemd:
    UNIT = DEPLOY / "systemd" / "asin-broker.service"

    def test_unit_runs_serve_hardened_with_credentials(self) -> None:
        """The unit runs `serve` as its own user, hardened, with secrets as credentials."""
        service = _unit(self.UNIT)["Service"]
        (exec_start,) = _values(service, "ExecStart")
        argv = shlex.split(exec_start)
        assert argv[0].endswith("/asin-broker")
        options = _check_serve_command(argv[1:])
        assert _values(service, "User") == ["asin-broker"]
        assert _values(service, "NoNewPrivileges") == ["yes"]
        assert _values(service, "ProtectSystem") == ["strict"]
        assert _values(service, "ProtectHome") == ["yes"]
        assert _values(service, "PrivateTmp") == ["yes"]
        assert _values(service, "CapabilityBoundingSet") == [""]
        writable = " ".join(_values(service, "ReadWritePaths")).split()
        assert options["--spool"] in writable
        (state,) = _values(service, "StateDirectory")
        assert f"/var/lib/{state}" in writable
        assert "XDG_STATE_HOME=/var/lib" in _values(service, "Environment")
        assert _values(service, "Restart") == ["on-failure"]
        assert set(" ".join(_values(service, "RestartPreventExitStatus")).split()) == {"77", "78"}
        (credential,) = _values(service, "LoadCredential")
        name = credential.split(":", 1)[0]
        config = (DEPLOY / "systemd" / "config.toml").read_text()
        path = f"/run/credentials/{self.UNIT.name}/{name}"
        assert f'credential_secret_file = "{path}"' in config
        assert options["--config"] == "/etc/asin-broker/config.toml"

    def test_producers_can_file_retry_and_clean_up(self) -> None:
        """tmpfiles makes every spool directory a producer of group asin-broker uses (the
        README's drop, retry and clean-up steps: inbox/, failed/, done/) group-writable and
        setgid, so the daemon's UMask=0027 does not leave failed/ and done/ at 2750."""
        (spool,) = (
            a
            for a in shlex.split(_values(_unit(self.UNIT)["Service"], "ExecStart")[0])
            if a.startswith("/var/spool/")
        )
        lines = (DEPLOY / "systemd" / "asin-broker.tmpfiles").read_text().splitlines()
        entries = {
            fields[1]: fields
            for fields in (line.split() for line in lines if line and not line.startswith("#"))
        }
        # The spool is sticky: a producer of the group may not rename a folder of the
        # daemon's (a processing/ of its own had the daemon write through its links).
        for directory, want in (
            (spool, "3770"),
            (f"{spool}/inbox", "2770"),
            (f"{spool}/failed", "2770"),
            (f"{spool}/done", "2770"),
            (f"{spool}/processing", "0750"),
        ):
            kind, _, mode, user, group, *_ = entries[directory]
            assert (kind, mode, user, group) == ("d", want, "asin-broker", "asin-broker")

    def test_stop_matches_the_drain(self) -> None:
        """SIGTERM goes to the daemon alone, and systemd waits past the 20 s drain."""
        service = _unit(self.UNIT)["Service"]
        assert _values(service, "KillMode") == ["mixed"]
        assert _values(service, "KillSignal") == ["SIGTERM"]
        (timeout,) = _values(service, "TimeoutStopSec")
        assert _seconds(timeout) >= 25
        readme = (ROOT / "README.md").read_text()
        drain = re.search(r"for at most (\d+) s; a second signal", readme)
        assert drain is not None
        assert _seconds(timeout) > int(drain[1])

    def test_example_config_names_the_daemons_state_and_cache(self, tmp_path: Path) -> None:
        """The config names the unit's state directory, so a shell's `broker status` with it
        reads the daemon's key state (not ~/.local/state) and cache."""
        service = _unit(self.UNIT)["Service"]
        (state_dir,) = _values(service, "StateDirectory")
        document = tomllib.loads((DEPLOY / "systemd" / "config.toml").read_text())
        assert document["state"]["path"] == f"/var/lib/{state_dir}/keys.sqlite3"
        assert document["cache"]["path"] == f"/var/lib/{state_dir}/item-cache.sqlite3"

    def test_example_config_reads_the_credential(self, tmp_path: Path) -> None:
        """The unit's example config loads, taking the key's secret from the credential file."""
        secret = tmp_path / "main-secret"
        secret.write_text("s3cr3t-value\n")
        secret.chmod(0o600)
        path = _unit_config(
            tmp_path, {"/run/credentials/asin-broker.service/main-secret": str(secret)}
        )
        config = load_config(path, environ={})
        (key,) = config.keys
        assert key.secret is not None
        assert "s3cr3t-value" not in repr(key)

    def test_check_config_while_the_service_runs(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Once the service has started, its credential file exists (root's, mode 0400 with
        an ACL read as group bits): check-config from a shell (after an edit, before the
        restart) still names it as not checked, exit 0, rather than refusing its mode."""
        from broker import cli
        from broker import config as config_module

        monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
        run_credentials = tmp_path / "run" / "credentials"
        monkeypatch.setattr(config_module, "SYSTEMD_CREDENTIALS", run_credentials)
        unit_dir = run_credentials / "asin-broker.service"
        unit_dir.mkdir(parents=True)
        secret = unit_dir / "main-secret"
        secret.write_text("s3cr3t-value\n")
        secret.chmod(0o440)
        config = _unit_config(
            tmp_path,
            {
                "/var/lib/asin-broker": str(tmp_path / "state"),
                "/run/credentials": str(run_credentials),
            },
        )
        assert cli.main(["check-config", "--config", str(config)]) == 0
        captured = capsys.readouterr()
        assert "systemd credential" in captured.err
        assert "not checked" in captured.err
        assert "chmod" not in captured.err
        # Inside the service the very file is read.
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(unit_dir))
        assert cli.main(["check-config", "--config", str(config)]) == 0
        assert "not checked" not in capsys.readouterr().err
        # Checked by a member of the service's group (not root): the unit's directory is
        # its user's alone, so the file cannot even be looked at; still "not checked".
        monkeypatch.delenv("CREDENTIALS_DIRECTORY")
        real_stat = Path.stat

        def denied(self: Path, *, follow_symlinks: bool = True) -> os.stat_result:
            if self == secret:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_stat(self, follow_symlinks=follow_symlinks)

        monkeypatch.setattr(Path, "stat", denied)
        assert cli.main(["check-config", "--config", str(config)]) == 0
        assert "not checked" in capsys.readouterr().err

    def test_check_config_outside_the_service(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """check-config validates the unit's config from a shell before the service runs:
        the systemd credential (only its service can read it) is named as not checked,
        exit 0; a command that needs the secret still refuses, exit 78."""
        from broker import cli

        monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
        config = _unit_config(tmp_path, {"/var/lib/asin-broker": str(tmp_path / "state")})
        text = config.read_text()
        assert cli.main(["check-config", "--config", str(config)]) == 0
        captured = capsys.readouterr()
        assert "config ok" in captured.out
        assert "systemd credential" in captured.err
        assert "not checked" in captured.err
        assert cli.main(["lookup", "B0C1234567", "--config", str(config)]) == 78
        # A second key whose variable is unset is still reported: only the credential skips.
        second = (
            '\n[[keys]]\nname = "second"\ncredential_id = "second-id"\n'
            'credential_secret_env = "ASINB_NOT_SET_ANYWHERE"\nversion = "3.1"\n'
            'partner_tags = { "www.amazon.com" = "second-20" }\n'
        )
        monkeypatch.delenv("ASINB_NOT_SET_ANYWHERE", raising=False)
        config.write_text(text + second)
        capsys.readouterr()
        assert cli.main(["check-config", "--config", str(config)]) == 78
        assert "ASINB_NOT_SET_ANYWHERE" in capsys.readouterr().err

    def test_credential_as_systemd_writes_it_is_accepted(self, tmp_path: Path) -> None:
        """A 0440 file in $CREDENTIALS_DIRECTORY (systemd's ACL) is read; elsewhere, refused."""
        credentials = tmp_path / "credentials"
        credentials.mkdir()
        secret = credentials / "main-secret"
        secret.write_text("s3cr3t-value\n")
        secret.chmod(0o440)  # what a user ACL entry shows as: r for the mask (group bits)
        _unit_config(tmp_path, {"/run/credentials/asin-broker.service/main-secret": str(secret)})
        environ = {"CREDENTIALS_DIRECTORY": str(credentials)}
        (key,) = load_config(tmp_path / "config.toml", environ=environ).keys
        assert key.secret is not None
        with pytest.raises(ConfigError, match="mode 0440"):
            load_config(tmp_path / "config.toml", environ={})
        with pytest.raises(ConfigError, match="mode 0440"):
            load_config(tmp_path / "config.toml", environ={"CREDENTIALS_DIRECTORY": ""})
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        with pytest.raises(ConfigError, match="mode 0440"):
            load_config(tmp_path / "config.toml", environ={"CREDENTIALS_DIRECTORY": str(elsewhere)})

    @pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
    def test_systemd_analyze_verify(self, tmp_path: Path) -> None:
        """systemd-analyze verify accepts the unit without a warning."""
        script = Path(sys.executable).with_name("asin-broker")
        text = self.UNIT.read_text().replace("/opt/asin-broker/bin/asin-broker", str(script))
        unit = tmp_path / self.UNIT.name
        unit.write_text(text)
        done = subprocess.run(
            ["systemd-analyze", "verify", str(unit)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"},
        )
        assert done.returncode == 0, done.stderr
        assert [line for line in done.stderr.splitlines() if self.UNIT.name in line] == []


# -- the stack ------------------------------------------------------------------------------


class TestCompose:
    def test_two_replicas_share_spool_and_redis(self) -> None:
        """Two `serve` replicas share a spool and Redis key state; no broker port is published."""
        services = _compose()["services"]
        assert isinstance(services, dict)
        assert set(services) >= {"broker", "redis", "prometheus", "grafana"}
        broker = services["broker"]
        assert broker["deploy"]["replicas"] == 2
        options = _check_serve_command([str(arg) for arg in broker["command"]])
        mounts = {v.split(":")[1]: v.split(":")[0] for v in broker["volumes"]}
        assert options["--spool"] in mounts
        assert "/var/lib/asin-broker" in mounts
        assert "ports" not in broker
        assert _seconds(broker["stop_grace_period"]) >= 25
        config_source = mounts[str(options["--config"])]
        config = tomllib.loads((DEPLOY / config_source).read_text())
        state = config["state"]
        assert state["backend"] == "redis"
        assert state["redis_url"].startswith("redis://redis:")
        assert state["redis_password_env"] in broker["environment"]
        assert "healthcheck" in services["redis"]
        assert broker["depends_on"]["redis"]["condition"] == "service_healthy"
        for name in ("prometheus", "grafana"):
            for port in services[name].get("ports", []):
                assert str(port).startswith("127.0.0.1:"), port

    def test_every_secret_variable_the_config_names_reaches_the_replicas(self) -> None:
        """Each key's credential_secret_env is in the broker service's environment, so the
        config works once it points at Amazon."""
        services = _compose()["services"]
        assert isinstance(services, dict)
        broker = services["broker"]
        options = _check_serve_command([str(arg) for arg in broker["command"]])
        mounts = {v.split(":")[1]: v.split(":")[0] for v in broker["volumes"]}
        config = tomllib.loads((DEPLOY / mounts[str(options["--config"])]).read_text())
        for key in config["keys"]:
            assert key["credential_secret_env"] in broker["environment"], key["name"]

    def test_mounted_files_exist(self) -> None:
        """Every file the stack bind-mounts is in the repository."""
        services = _compose()["services"]
        assert isinstance(services, dict)
        for service in services.values():
            for volume in service.get("volumes", []):
                source = str(volume).split(":")[0]
                if source.startswith("."):
                    assert (DEPLOY / source).exists(), volume
        assert (DEPLOY / services["broker"]["build"]["context"] / "Dockerfile").exists()

    def test_prometheus_scrapes_the_replicas_and_loads_the_rules(self) -> None:
        """Prometheus discovers every broker replica on its metrics port and loads the rules."""
        config = load_yaml((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        assert isinstance(config, dict)
        services = _compose()["services"]
        assert isinstance(services, dict)
        options = _check_serve_command([str(arg) for arg in services["broker"]["command"]])
        (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "asin-broker"]
        (discovery,) = job["dns_sd_configs"]
        assert discovery["names"] == ["broker"]
        assert str(discovery["port"]) == options["--port"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
        for rule_file in config["rule_files"]:
            assert (DEPLOY / mounts[rule_file]).exists()

    def test_grafana_provisioning_points_at_the_dashboard(self) -> None:
        """The provisioned datasource and dashboard folder match what the dashboard uses."""
        services = _compose()["services"]
        assert isinstance(services, dict)
        provisioning = DEPLOY / "grafana" / "provisioning"
        datasources = load_yaml((provisioning / "datasources" / "prometheus.yaml").read_text())
        providers = load_yaml((provisioning / "dashboards" / "asin-broker.yaml").read_text())
        assert isinstance(datasources, dict)
        assert isinstance(providers, dict)
        (source,) = datasources["datasources"]
        assert source["url"] == "http://prometheus:9090"
        (provider,) = providers["providers"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
        dashboard_path = next(t for t in mounts if t.endswith("/asin-broker.json"))
        assert str(Path(dashboard_path).parent) == provider["options"]["path"]
        panels = _dashboard()["panels"]
        assert isinstance(panels, list)
        for panel in panels:
            assert panel["datasource"]["uid"] == source["uid"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == source["uid"]


class TestDashboard:
    def test_shape(self) -> None:
        """The dashboard is a Grafana dashboard: unique panel ids, positions, PromQL targets."""
        dashboard = _dashboard()
        assert dashboard["uid"] == "asin-broker"
        assert isinstance(dashboard["schemaVersion"], int)
        panels = dashboard["panels"]
        assert isinstance(panels, list)
        ids = [panel["id"] for panel in panels]
        assert len(ids) == len(set(ids))
        for panel in panels:
            assert panel["type"] in ("timeseries", "stat", "bargauge", "table", "state-timeline")
            assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
            refs = [target["refId"] for target in panel["targets"]]
            assert len(refs) == len(set(refs))
            assert all(target["expr"].strip() for target in panel["targets"])

    def test_process_metrics_are_the_brokers_and_tables_join_their_queries(self) -> None:
        """Queries of the process_* metrics keep to job="asin-broker" (Prometheus exposes the
        same names about itself: the Versions table had a row for it), and a table of two
        queries merges them into one row per replica (version and uptime were two frames)."""
        panels = _dashboard()["panels"]
        assert isinstance(panels, list)
        for panel in panels:
            for target in panel["targets"]:
                for name in re.findall(r"\bprocess_\w+", target["expr"]):
                    after = target["expr"].split(name, 1)[1]
                    assert after.startswith('{job="asin-broker"'), (panel["title"], name)
            if panel["type"] == "table" and len(panel["targets"]) > 1:
                ids = [t["id"] for t in panel.get("transformations", [])]
                assert "merge" in ids, panel["title"]

    def test_covers_what_an_operator_needs(self) -> None:
        """Panels show rate vs configured, 429s, TPD, parked keys, queue, jobs, rows, latency."""
        exprs = "\n".join(_dashboard_exprs())
        for needed in (
            "asinb_key_requests_total",
            "asinb_key_configured_tps",
            "asinb_key_throttled_total",
            "asinb_key_daily_spent",
            "asinb_key_daily_limit",
            'asinb_key_state{state="parked"}',
            "asinb_inbox_jobs",
            "asinb_queued_batches",
            "asinb_job_rows",
            "asinb_rows_total",
            "asinb_request_duration_seconds_bucket",
        ):
            assert needed in exprs, needed

    def test_every_queried_metric_is_served(self) -> None:
        """Every metric and label the dashboard queries is on a running daemon's /metrics."""
        _check_queries(_dashboard_exprs(), "dashboard")


class TestAlerts:
    def test_rules_cover_quota_parked_and_stalls(self) -> None:
        """Alerts exist for a nearly spent daily quota, a parked key and 15 minutes stalled."""
        rules = {str(rule["alert"]): rule for rule in _alert_rules()}
        assert {
            "AsinBrokerDailyQuotaNearlySpent",
            "AsinBrokerKeyParked",
            "AsinBrokerNoProgress",
        } <= set(rules)
        assert "[15m]" in str(rules["AsinBrokerNoProgress"]["expr"])
        for rule in rules.values():
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"]

    def test_every_queried_metric_is_served(self) -> None:
        """Every metric and label the alert rules query is on a running daemon's /metrics."""
        _check_queries([str(rule["expr"]) for rule in _alert_rules()], "alerts.yml")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
class TestPromtool:
    def test_check_config_and_rules(self, tmp_path: Path) -> None:
        """promtool accepts the Prometheus config with its rule file."""
        config = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
        shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
        (tmp_path / "prometheus.yml").write_text(
            config.replace("/etc/prometheus/alerts.yml", str(tmp_path / "alerts.yml"))
        )
        done = subprocess.run(
            ["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SUCCESS: 1 rule files found" in done.stdout + done.stderr

    def test_rule_unit_tests(self) -> None:
        """The alerts fire, and stay quiet, on the scripted series of alerts.test.yml."""
        done = subprocess.run(
            ["promtool", "test", "rules", "alerts.test.yml"],
            cwd=DEPLOY / "prometheus",
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SUCCESS" in done.stdout + done.stderr

    def test_shared_key_gauges_are_not_summed_over_replicas(self) -> None:
        """Every replica reports a key's one shared rate and TPS: max over them, never sum."""
        shared = ("asinb_key_rate_per_second", "asinb_key_configured_tps")
        exprs = [e for e in _dashboard_exprs() if any(name in e for name in shared)]
        assert exprs
        for expr in exprs:
            assert "sum" not in expr, expr

    def test_job_progress_shows_a_job_with_no_row_finished(self, tmp_path: Path) -> None:
        """The "Job progress" panel shows a job none of whose rows is finished yet (just
        started, or deferred for the daily quota) at 0, beside one half done; it left such
        a job out, as its numerator had no series for it."""
        panels = _dashboard()["panels"]
        assert isinstance(panels, list)
        (panel,) = [p for p in panels if p["title"] == "Job progress"]
        (target,) = panel["targets"]
        rules = {
            "groups": [{"name": "p", "rules": [{"record": "progress", "expr": target["expr"]}]}]
        }
        (tmp_path / "rules.yml").write_text(json.dumps(rules))
        tests = {
            "rule_files": ["rules.yml"],
            "evaluation_interval": "1m",
            "tests": [
                {
                    "interval": "1m",
                    "input_series": [
                        {"series": 'asinb_job_rows{job_file="q1.txt",status="ok"}', "values": "8"},
                        {
                            "series": 'asinb_job_rows{job_file="q1.txt",status="pending"}',
                            "values": "8",
                        },
                        {
                            "series": 'asinb_job_rows{job_file="q2.txt",status="pending"}',
                            "values": "30",
                        },
                    ],
                    "promql_expr_test": [
                        {
                            "expr": "progress",
                            "eval_time": "0m",
                            "exp_samples": [
                                {"labels": 'progress{job_file="q1.txt"}', "value": 0.5},
                                {"labels": 'progress{job_file="q2.txt"}', "value": 0},
                            ],
                        }
                    ],
                }
            ],
        }
        (tmp_path / "rules.test.yml").write_text(json.dumps(tests))
        done = subprocess.run(
            ["promtool", "test", "rules", "rules.test.yml"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr

    def test_dashboard_queries_parse(self, tmp_path: Path) -> None:
        """Every dashboard query is valid PromQL (Grafana's $__rate_interval set to 5m)."""
        lines = ["groups:", "  - name: dashboard", "    rules:"]
        for i, expr in enumerate(_dashboard_exprs()):
            lines.append(f"      - record: dashboard:query_{i}")
            lines.append(f"        expr: {json.dumps(expr.replace('$__rate_interval', '5m'))}")
        (tmp_path / "queries.yml").write_text("\n".join(lines) + "\n")
        done = subprocess.run(
            ["promtool", "check", "rules", str(tmp_path / "queries.yml")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr


# -- metrics documentation ------------------------------------------------------------------


class TestMetricsDocs:
    def test_readme_table_matches_metrics(self) -> None:
        """The README's metrics table lists exactly the served families with their labels."""
        readme = (ROOT / "README.md").read_text()
        section = readme.split("### Metrics (`/metrics`)", 1)[1].split("\n#", 1)[0]
        documented: dict[str, frozenset[str]] = {}
        for row in re.findall(r"^\| `([a-z_]+)` \|([^|]*)\|([^|]*)\|", section, re.MULTILINE):
            name, _kind, labels = row
            documented[name] = frozenset(re.findall(r"`([a-z_]+)`", labels))
        assert documented == _served()
