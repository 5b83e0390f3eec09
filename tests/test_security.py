"""Security cases D1-D6 of reliability.md section 3.3, and the section 4 rules they rest on.

The D2 cases run the real command line (``python -m broker``) as a subprocess at debug level
against an in-process simulator, force errors in the auth path, and search every byte the
process wrote (stdout, stderr, output file, ledger) for every credential the run used: the
secrets, the bearer tokens the simulator issued, the Authorization header values and the
SigV4 signatures. The simulator records those values itself (a response hook on its app),
so the needles are the ones that really crossed the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import pickle
import re
import secrets
import ssl
import subprocess
import sys
import textwrap
import traceback
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
import pytest
import structlog
from aiohttp import web

from broker import cli
from broker.api.base import HttpRequest, RawResponse
from broker.api.oauth import CreatorsTokenCache
from broker.api.sigv4 import SigV4Signer
from broker.client import Broker, simulator_settings
from broker.config import BrokerConfig, config_from_dict, load_config, parse_config
from broker.engine.authorizer import BearerAuthorizer, SigV4Authorizer
from broker.engine.transport import AiohttpTransport
from broker.errors import AuthError, BrokerError, ConfigError, TransportError
from broker.jobs.metrics_http import MetricsServer
from broker.jobs.metrics_http import check_host as metrics_check_host
from broker.logs import configure_logging, redact, scrub
from broker.models import Secret
from broker.simulator import oauth as sim_oauth
from broker.simulator.accounts import Account
from broker.simulator.app import SIMULATOR_KEY
from broker.simulator.server import SimulatorServer
from broker.simulator.server import check_host as simulator_check_host
from broker.simulator.settings import FaultRates, SimulatorSettings
from broker.testing import FakeClock

US = "www.amazon.com"
EX_CONFIG = 78
#: Anything but loopback; "" and "::" would bind every interface.
REMOTE_HOSTS = ("0.0.0.0", "::", "", "192.168.1.10", "example.com", "127.0.0.1.nip.io")


def _random_secret(label: str) -> str:
    """A secret no other text can contain by chance."""
    return f"{label}-{secrets.token_hex(16)}"


# -- shared helpers -----------------------------------------------------------------------


def _cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI subprocess: ours minus any ASINB_ variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASINB_")}
    env.update(extra or {})
    return env


@dataclass(frozen=True, slots=True)
class Finished:
    """What a CLI subprocess left behind."""

    code: int
    stdout: bytes
    stderr: bytes


async def _cli(
    *args: str, cwd: Path, env: Mapping[str, str] | None = None, script: Path | None = None
) -> Finished:
    """Run ``python -m broker args`` (or ``python script args``) while the loop keeps serving."""
    head = [str(script)] if script is not None else ["-m", "broker"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *head,
        *args,
        cwd=cwd,
        env=_cli_env(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Finished(proc.returncode, out, err)


def _run_cli(*args: str, cwd: Path, env: Mapping[str, str] | None = None) -> Finished:
    """Run ``python -m broker args`` synchronously (no simulator needed)."""
    proc = subprocess.run(
        [sys.executable, "-m", "broker", *args],
        cwd=cwd,
        env=_cli_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    return Finished(proc.returncode, proc.stdout, proc.stderr)


def _key_toml(
    name: str,
    credential_id: str,
    *,
    env: str | None = None,
    version: str | None = "3.1",
    tps: float = 200.0,
    extra: str = "",
) -> str:
    lines = [
        "[[keys]]",
        f'name = "{name}"',
        f'credential_id = "{credential_id}"',
        f'partner_tags = {{ "{US}" = "sec-20" }}',
        f"tps = {tps}",
        "tpd = 1000000",
    ]
    if env is not None:
        lines.append(f'credential_secret_env = "{env}"')
    if version is not None:
        lines.append(f'version = "{version}"')
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


def _config_toml(
    endpoint: str,
    keys: str,
    *,
    protocol: str = "creators",
    log_format: str = "json",
    token_endpoint: str | None = None,
    extra: str = "",
) -> str:
    token = f'token_endpoint = "{token_endpoint}"\n' if token_endpoint else ""
    return (
        f'[api]\nprotocol = "{protocol}"\nendpoint = "{endpoint}"\n{token}\n'
        f"{keys}\n"
        "[engine]\nlinger_s = 0.005\nrequest_timeout_s = 10.0\n\n"
        "[retry]\nmax_attempts = 12\nbase_delay_s = 0.01\nmax_delay_s = 0.05\n\n"
        f'[log]\nlevel = "debug"\nformat = "{log_format}"\n{extra}'
    )


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


# -- D1: a secret written in config.toml ---------------------------------------------------


class TestD1SecretInConfigFile:
    """D1: a secret in config.toml is refused (exit 78), naming the variable to use instead."""

    @pytest.mark.parametrize(
        "line", ['credential_secret = "{s}"', 'secret = "{s}"', 'client_secret = "{s}"']
    )
    def test_cli_refuses_secret_in_keys(self, tmp_path: Path, line: str) -> None:
        """``broker check-config`` exits 78, names the key path and the env var, never the value."""
        secret = _random_secret("d1")
        keys = _key_toml("shop-eu.1", "cid", env="ASINB_X", extra=line.format(s=secret))
        config = _write(tmp_path / "c.toml", _config_toml("https://creatorsapi.example", keys))
        done = _run_cli("check-config", "--config", str(config), cwd=tmp_path)
        err = done.stderr.decode()
        assert done.code == EX_CONFIG
        field_name = line.split(" ", 1)[0]
        assert f"keys[0].{field_name}" in err
        assert 'credential_secret_env = "ASINB_SHOP_EU_1_SECRET"' in err
        assert "environment variable" in err
        assert secret not in err + done.stdout.decode()

    def test_secret_like_key_elsewhere_is_refused_without_echo(self) -> None:
        """A secret-looking key outside [[keys]] (``api.client_secret``) is refused unechoed."""
        secret = _random_secret("d1")
        document = _document()
        document["api"]["client_secret"] = secret
        with pytest.raises(ConfigError) as info:
            parse_config(document, environ=_ENVIRON)
        assert info.value.path == "api.client_secret"
        assert "credential_secret_env" in info.value.message
        assert secret not in str(info.value) + repr(info.value)

    @pytest.mark.parametrize(
        "pasted",
        [
            "amzn1.oa2-cs.v1.0123456789abcdef0123456789abcdef",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "lowercasecognitosecret0123456789abcdefghij",
        ],
    )
    def test_secret_pasted_as_variable_name_is_not_echoed(self, pasted: str) -> None:
        """A secret written where the variable *name* goes is refused without repeating it."""
        document = _document()
        document["keys"][0]["credential_secret_env"] = pasted
        with pytest.raises(ConfigError) as info:
            parse_config(document, environ={})
        assert info.value.path == "keys[0].credential_secret_env"
        assert "not the secret itself" in info.value.message
        assert pasted not in str(info.value)

    @pytest.mark.parametrize(
        "url",
        [
            "htps://id:{s}@creatorsapi.example",
            "https://id:{s}@creatorsapi.example",
            "https://creatorsapi.example/?key={s}",
            "id:{s}@creatorsapi.example",
        ],
    )
    def test_secret_in_endpoint_url_is_not_echoed(self, url: str) -> None:
        """An endpoint URL carrying a credential is refused, and the message masks it."""
        secret = _random_secret("d1")
        document = _document()
        document["api"]["endpoint"] = url.format(s=secret)
        with pytest.raises(ConfigError) as info:
            parse_config(document, environ=_ENVIRON)
        assert info.value.path == "api.endpoint"
        assert secret not in str(info.value)


_ENVIRON = {"ASINB_DEMO_SECRET": "env-secret-value"}


def _document() -> dict[str, Any]:
    return {
        "api": {"protocol": "creators", "endpoint": "https://creatorsapi.example"},
        "keys": [
            {
                "name": "demo",
                "credential_id": "demo-id",
                "credential_secret_env": "ASINB_DEMO_SECRET",
                "version": "3.1",
                "partner_tags": {US: "demo-20"},
            }
        ],
    }


# -- D2: nothing secret in any output, at debug level, with auth errors forced ---------------


@dataclass
class WireRecord:
    """Credentials the simulator saw: every Authorization value and every token it issued."""

    authorizations: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    bad_token_calls: int = 0

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """aiohttp ``on_response_prepare`` hook: note the request's credentials and any token."""
        authorization = request.headers.get("Authorization")
        if authorization:
            self.authorizations.append(authorization)
        if (
            request.path.endswith("/token")
            and response.status == 200
            and isinstance(response, web.Response)
            and isinstance(response.body, bytes)
        ):
            with contextlib.suppress(ValueError):
                token = json.loads(response.body).get("access_token")
                if isinstance(token, str):
                    self.tokens.append(token)

    @property
    def signatures(self) -> list[str]:
        """The SigV4 signatures of the PA-API requests."""
        return [
            match
            for value in self.authorizations
            for match in re.findall(r"Signature=([0-9a-f]{64})", value)
        ]

    @property
    def bearer_tokens(self) -> list[str]:
        """The tokens the client sent as ``Bearer <token>``."""
        return [
            value.removeprefix("Bearer ").split(",", 1)[0]
            for value in self.authorizations
            if value.startswith("Bearer ")
        ]


@dataclass
class LeakScene:
    """A simulator with secret-bearing accounts, and what it recorded."""

    server: SimulatorServer
    record: WireRecord
    secrets: dict[str, str]

    @property
    def url(self) -> str:
        return self.server.url

    def needles(self, *extra: str) -> set[str]:
        """Every credential value of the run, plus each one's first and last 16 characters."""
        cores = {
            *self.secrets.values(),
            *self.record.tokens,
            *self.record.bearer_tokens,
            *self.record.signatures,
            *extra,
        }
        found: set[str] = set(self.record.authorizations)
        for core in cores:
            found |= {core, quote(core, safe=""), quote_plus(core), json.dumps(core)[1:-1]}
            if len(core) >= 32:
                found |= {core[:16], core[-16:]}
        return found


def _scene_accounts(real: Mapping[str, str]) -> tuple[Account, ...]:
    """The simulator's keys in the D2 scenes (v3, v2, PA-API) with the secrets in ``real``."""
    tags = {US: ("sec-20",)}
    return (
        Account("v3", "creators", "sec-v3-id", real["v3"], version="3.1", partner_tags=tags),
        Account("v2", "creators", "sec-v2-id", real["v2"], version="2.1", partner_tags=tags),
        Account("pa", "paapi5", "SECPAACCESSKEY", real["pa"], partner_tags=tags),
    )


@contextlib.asynccontextmanager
async def _scene(
    faults: FaultRates | None = None,
    *,
    bad_token_route: bool = False,
    token_lifetime_s: float = 3600.0,
) -> AsyncIterator[LeakScene]:
    real = {name: _random_secret(f"real-{name}") for name in ("v3", "v2", "pa")}
    settings = SimulatorSettings(
        limits=False,
        seed=7,
        token_lifetime_s=token_lifetime_s,
        demo_accounts=False,
        faults=faults or FaultRates(),
        accounts=_scene_accounts(real),
    )
    server = SimulatorServer(settings)
    record = WireRecord()
    server.app.on_response_prepare.append(record.on_prepare)
    if bad_token_route:
        sim = server.app[SIMULATOR_KEY]
        decoy = "Atc|" + secrets.token_urlsafe(48)
        real["decoy"] = decoy

        async def flaky_token(request: web.Request) -> web.StreamResponse:
            # First call: a 200 cut short in the middle of the token (the JSON decoder's
            # error would quote it); later calls: the real endpoint.
            record.bad_token_calls += 1
            if record.bad_token_calls == 1:
                await request.read()
                body = json.dumps({"access_token": decoy, "expires_in": 3600}).encode()
                return web.Response(body=body[: len(body) // 2], content_type="application/json")
            return await sim_oauth.token_endpoint(request, sim, "v3")

        server.app.router.add_post("/flaky/auth/o2/token", flaky_token)
    async with server:
        yield LeakScene(server, record, real)


def _written_bytes(finished: Finished, *trees: Path) -> dict[str, bytes]:
    """stdout, stderr and the bytes of every file under ``trees`` (outputs, ledger, logs)."""
    blobs = {"stdout": finished.stdout, "stderr": finished.stderr}
    for tree in trees:
        for path in sorted(tree.rglob("*")):
            if path.is_file():
                blobs[str(path)] = path.read_bytes()
    return blobs


def _assert_no_leak(blobs: Mapping[str, bytes], needles: Iterable[str]) -> None:
    leaks = [
        (where, needle)
        for where, data in blobs.items()
        for needle in needles
        if needle and needle.encode() in data
    ]
    assert not leaks, f"credentials leaked: {leaks[:5]}"


def _events(stderr: bytes) -> list[dict[str, Any]]:
    """The JSON log events of a run (lines that are not JSON are the CLI's own messages)."""
    events = []
    for line in stderr.decode().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


class TestD2NoSecretInOutput:
    """D2: debug-level runs with forced auth errors never print a secret, token or signature."""

    async def test_lookup_wrong_creators_secrets_invalid_client(self, tmp_path: Path) -> None:
        """Wrong v3 and v2 secrets: invalid_client from the token endpoint, exit 77, no leak."""
        async with _scene() as scene:
            bad = {"BAD_V3": _random_secret("bad-v3"), "BAD_V2": _random_secret("bad-v2")}
            keys = _key_toml("k3", "sec-v3-id", env="BAD_V3") + _key_toml(
                "k2", "sec-v2-id", env="BAD_V2", version="2.1"
            )
            config = _write(tmp_path / "c.toml", _config_toml(scene.url, keys))
            done = await _cli(
                "lookup", "B000000001", "--config", str(config), cwd=tmp_path, env=bad
            )
            invalid_client = scene.server.stats.unattributed_errors["invalid_client"]
            needles = scene.needles(*bad.values())
        assert done.code == 77, done.stderr.decode()[-2000:]
        assert invalid_client >= 2  # both keys were really refused by the token endpoint
        err = done.stderr.decode()
        assert "k3: invalid_client" in err
        assert "k2: invalid_client" in err
        _assert_no_leak(_written_bytes(done, tmp_path), needles)

    @pytest.mark.parametrize("log_format", ["json", "console"])
    async def test_run_token_expires_mid_run(self, tmp_path: Path, log_format: str) -> None:
        """``broker run`` whose tokens expire mid-run, plus 500s: refreshes, exit 0, no leak."""
        # The simulator's tokens die after 0.25 s while the client (told expires_in = 1 s)
        # keeps using them until 0.5 s: the requests in between get TokenExpired. At 20 TPS
        # the 20 batches take about a second, so that happens more than once.
        async with _scene(FaultRates(error_500=0.3), token_lifetime_s=0.25) as scene:
            env = {"GOOD_V3": scene.secrets["v3"]}
            config = _write(
                tmp_path / "c.toml",
                _config_toml(
                    scene.url,
                    _key_toml("k3", "sec-v3-id", env="GOOD_V3", tps=20.0),
                    log_format=log_format,
                ),
            )
            job = tmp_path / "job.txt"
            job.write_text("".join(f"B{i:09d}\n" for i in range(200)))
            out = tmp_path / "out" / "job.jsonl"
            done = await _cli(
                "run", str(job), "--config", str(config), "--out", str(out),
                "--progress", "none", cwd=tmp_path, env=env,
            )  # fmt: skip
            expired = scene.server.stats.account("v3").errors["TokenExpired"]
            errors_500 = scene.server.stats.faults["error_500"]
            tokens = list(scene.record.tokens)
            needles = scene.needles()
        assert done.code == 0, done.stderr.decode()[-2000:]
        assert expired >= 1  # tokens really expired under the client
        assert errors_500 >= 1
        assert len(set(tokens)) >= 2  # and were refreshed
        err = done.stderr.decode()
        assert "broker.credentials_refreshed" in err
        assert "broker.retry_scheduled" in err  # a debug-level event: debug is on
        assert len(out.read_text().splitlines()) == 200
        _assert_no_leak(_written_bytes(done, tmp_path), needles)

    async def test_lookup_wrong_paapi_secret_invalid_signature(self, tmp_path: Path) -> None:
        """PA-API with one wrong secret: InvalidSignature disables it, no signature leaks."""
        async with _scene(FaultRates(error_503=0.2)) as scene:
            env = {"GOOD_PA": scene.secrets["pa"], "BAD_PA": _random_secret("bad-pa")}
            keys = _key_toml("bad", "SECPAACCESSKEY", env="BAD_PA", version=None) + _key_toml(
                "good", "SECPAACCESSKEY", env="GOOD_PA", version=None
            )
            config = _write(tmp_path / "c.toml", _config_toml(scene.url, keys, protocol="paapi5"))
            asins = [f"B{i:09d}" for i in range(100)]
            done = await _cli("lookup", *asins, "--config", str(config), cwd=tmp_path, env=env)
            stats = scene.server.stats.snapshot(timestamps=False)
            signatures = scene.record.signatures
            needles = scene.needles(*env.values())
        assert done.code == 0, done.stderr.decode()[-2000:]
        accounts: Any = stats["accounts"]
        assert accounts["pa"]["errors"].get("InvalidSignature", 0) >= 1  # fault injected
        assert len(set(signatures)) >= 2
        events = _events(done.stderr)
        disabled = [e for e in events if e["event"] == "broker.key_disabled"]
        assert [e["code"] for e in disabled] == ["InvalidSignature"]
        rows = [json.loads(line) for line in done.stdout.decode().splitlines()]
        assert {row["status"] for row in rows} == {"ok"}
        _assert_no_leak(_written_bytes(done, tmp_path), needles)

    @pytest.mark.parametrize("log_format", ["json", "console"])
    async def test_exception_inside_token_fetch(self, tmp_path: Path, log_format: str) -> None:
        """A bug raised inside the token fetch is logged with a traceback but no locals."""
        script = tmp_path / "inject.py"
        script.write_text(
            textwrap.dedent(
                """\
                import sys

                from broker.api import oauth
                from broker.cli import main

                original = oauth.CreatorsTokenCache._token_request


                def failing_token_request(self):
                    # These locals hold the secret: a traceback with locals would print them.
                    request = original(self)
                    secret_value = self._secret.reveal()
                    raise RuntimeError("forced failure inside the token fetch")


                oauth.CreatorsTokenCache._token_request = failing_token_request
                sys.exit(main(sys.argv[1:]))
                """
            )
        )
        async with _scene() as scene:
            env = {"GOOD_V3": scene.secrets["v3"]}
            keys = _key_toml("k3", "sec-v3-id", env="GOOD_V3")
            config = _write(
                tmp_path / "c.toml", _config_toml(scene.url, keys, log_format=log_format)
            )
            done = await _cli(
                "lookup", "B000000001", "--config", str(config),
                cwd=tmp_path, env=env, script=script,
            )  # fmt: skip
            needles = scene.needles()
        assert done.code == 3, done.stderr.decode()[-2000:]
        err = done.stderr.decode()
        # The fault fired and its traceback was rendered, through the structlog pipeline.
        assert "broker.attempt_crashed" in err
        assert "Traceback (most recent call last)" in err
        assert "forced failure inside the token fetch" in err
        assert "in failing_token_request" in err  # the frame is named, its locals are not
        row = json.loads(done.stdout)
        assert row["status"] == "failed"
        assert row["error"]["code"] == "RuntimeError"
        _assert_no_leak(_written_bytes(done, tmp_path), needles)

    async def test_truncated_token_response(self, tmp_path: Path) -> None:
        """A token response cut inside the token is retried; the partial token never shows."""
        async with _scene(bad_token_route=True) as scene:
            env = {"GOOD_V3": scene.secrets["v3"]}
            keys = _key_toml("k3", "sec-v3-id", env="GOOD_V3")
            config = _write(
                tmp_path / "c.toml",
                _config_toml(scene.url, keys, token_endpoint=scene.url + "/flaky"),
            )
            done = await _cli(
                "lookup", "B000000001", "--config", str(config), cwd=tmp_path, env=env
            )
            calls = scene.record.bad_token_calls
            decoy = scene.secrets["decoy"]
            needles = scene.needles(decoy[: len(decoy) // 3])
        assert done.code == 0, done.stderr.decode()[-2000:]
        assert calls == 2  # the truncated answer was served once, then a good one
        failed = [e for e in _events(done.stderr) if e["event"] == "broker.token_fetch_failed"]
        assert [e["error"] for e in failed] == ["ResponseError"]
        assert json.loads(done.stdout)["status"] == "ok"
        _assert_no_leak(_written_bytes(done, tmp_path), needles)

    async def test_run_wrong_secret_stops_77(self, tmp_path: Path) -> None:
        """``broker run`` with a rejected secret stops with 77; ledger and output hold no secret."""
        async with _scene() as scene:
            env = {"BAD_V3": _random_secret("bad-v3")}
            config = _write(
                tmp_path / "c.toml",
                _config_toml(scene.url, _key_toml("k3", "sec-v3-id", env="BAD_V3")),
            )
            job = tmp_path / "job.txt"
            job.write_text("B000000001\nB000000002\n")
            done = await _cli(
                "run", str(job), "--config", str(config), "--out", str(tmp_path / "o.jsonl"),
                "--progress", "none", cwd=tmp_path, env=env,
            )  # fmt: skip
            refused = scene.server.stats.unattributed_errors["invalid_client"]
            needles = scene.needles(*env.values())
        assert done.code == 77, done.stderr.decode()[-2000:]
        assert refused >= 1
        assert "invalid_client" in done.stderr.decode()
        blobs = _written_bytes(done, tmp_path)
        assert any(name.endswith("o.jsonl.ledger") for name in blobs)  # searched too
        _assert_no_leak(blobs, needles)


class TestD2LogPipeline:
    """D2: the CLI's structlog pipeline masks credentials and renders tracebacks without locals."""

    @pytest.fixture(autouse=True)
    def _restore_structlog(self) -> Iterator[None]:
        saved = structlog.get_config()
        yield
        structlog.configure(**saved)

    @pytest.mark.parametrize("fmt", ["json", "console"])
    def test_traceback_has_no_locals(self, fmt: str) -> None:
        """An exception logged at debug shows its traceback, never the values of its locals."""
        secret = _random_secret("local")
        token = "Atc|" + secrets.token_urlsafe(32)
        stream = io.StringIO()
        configure_logging("debug", fmt, stream=stream)
        logger = structlog.get_logger("broker")

        def fetch(client_secret: str) -> None:
            headers = {"Authorization": f"Bearer {token}"}
            body = f"grant_type=client_credentials&client_secret={client_secret}"
            wrapped = Secret(client_secret)
            raise ValueError(
                f"token endpoint failed ({len(body)} bytes, {len(headers)}, {wrapped})"
            )

        try:
            fetch(secret)
        except ValueError:
            logger.exception("test.failed", key="k1")
            logger.debug("test.debug", exc_info=True)
        text = stream.getvalue()
        assert text.count("Traceback (most recent call last)") == 2
        assert "token endpoint failed" in text
        assert secret not in text
        assert token not in text
        assert token.removeprefix("Atc|")[:16] not in text

    @pytest.mark.parametrize("fmt", ["json", "console"])
    def test_secret_fields_and_values_masked(self, fmt: str) -> None:
        """Secret-named fields at any depth, and bearer, signature and token-body values, masked."""
        secret = _random_secret("field")
        token = "Atc|" + secrets.token_urlsafe(32)
        signature = secrets.token_hex(32)
        password = _random_secret("password")
        in_tuple = _random_secret("tuple")
        stream = io.StringIO()
        configure_logging("debug", fmt, stream=stream)
        structlog.get_logger("broker").debug(
            "test.fields",
            client_secret=secret,
            nested={"deep": [{"access_token": token, "credentials": secret}]},
            password=password,
            redis={"password": password},
            pairs=({"access_token": in_tuple},),
            header=f"Bearer {token}, Version 2.1",
            sigv4=f"AWS4-HMAC-SHA256 Credential=AKID/x, SignedHeaders=host, Signature={signature}",
            form=f"grant_type=client_credentials&client_secret={secret}&scope=x",
            json_body=json.dumps({"access_token": token, "expires_in": 3600}),
            wrapped=Secret(secret),
            credential_id="visible-id",
        )
        text = stream.getvalue()
        assert "test.fields" in text
        assert "visible-id" in text  # a credential id is not secret
        for needle in (secret, token, token.removeprefix("Atc|")[:16], signature):
            assert needle not in text
        assert password not in text
        assert in_tuple not in text

    def test_an_exception_never_raised_is_logged(self) -> None:
        """A stdlib record whose exception has no traceback (asyncio's "Task exception was
        never retrieved" for one made, never raised) keeps it, masked; it was dropped, the
        masking having made its tuple a list, read as "the exception being handled"."""
        token = "Atc|" + secrets.token_urlsafe(32)
        stream = io.StringIO()
        configure_logging("info", "json", stream=stream)
        error = RuntimeError(f"refused Bearer {token}")
        logging.getLogger("asyncio").error("never retrieved", exc_info=(RuntimeError, error, None))
        (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
        assert line["exception"].startswith("RuntimeError: refused Bearer ")
        assert token not in line["exception"]
        assert line["logger"] == "asyncio"

    def test_a_malformed_request_to_a_server_is_a_warning(self) -> None:
        """aiohttp's server logs a client's malformed request (two Content-Lengths, from a
        scanner) at error level: a warning, named aiohttp.server, so an alert on error-level
        lines does not fire on it."""
        from aiohttp.http_exceptions import BadHttpMessage

        from broker.listener import _quiet_bad_requests

        stream = io.StringIO()
        configure_logging("info", "json", stream=stream)
        _quiet_bad_requests()  # as a listener (the daemon's /metrics, the simulator) starts
        try:
            raise BadHttpMessage("Duplicate Content-Length")
        except BadHttpMessage:
            logging.getLogger("aiohttp.server").error("Error handling request", exc_info=True)
        (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
        assert (line["level"], line["logger"]) == ("warning", "aiohttp.server")
        assert line["event"] == "Error handling request: 400 Duplicate Content-Length"


# -- D3: secret files readable by others ---------------------------------------------------


class TestD3SecretFilePermissions:
    """D3: a secret file readable by group or others is refused (the libpq .pgpass rule)."""

    @pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o610])
    def test_cli_refuses_open_secret_file(self, tmp_path: Path, mode: int) -> None:
        """``check-config`` exits 78 naming the file and ``chmod 600``, without the secret."""
        secret = _random_secret("file")
        secret_file = _write(tmp_path / "k.secret", secret + "\n", mode)
        keys = _key_toml("k", "cid", extra='credential_secret_file = "k.secret"')
        config = _write(tmp_path / "c.toml", _config_toml("https://creatorsapi.example", keys))
        done = _run_cli("check-config", "--config", str(config), cwd=tmp_path)
        err = done.stderr.decode()
        assert done.code == EX_CONFIG
        assert "keys[0].credential_secret_file" in err
        assert str(secret_file) in err
        assert f"(mode {mode:04o})" in err
        assert f"chmod 600 {secret_file}" in err
        assert secret not in err + done.stdout.decode()

    def test_private_secret_file_is_used(self, tmp_path: Path) -> None:
        """The same file at 0600 is accepted and its secret read (and masked in the summary)."""
        secret = _random_secret("file")
        _write(tmp_path / "k.secret", secret + "\n", 0o600)
        keys = _key_toml("k", "cid", extra='credential_secret_file = "k.secret"')
        config = _write(tmp_path / "c.toml", _config_toml("https://creatorsapi.example", keys))
        loaded = load_config(config, environ={})
        assert loaded.keys[0].secret == Secret(secret)
        done = _run_cli("check-config", "--config", str(config), cwd=tmp_path)
        assert done.code == 0, done.stderr.decode()
        assert "(***)" in done.stdout.decode()
        assert secret not in (done.stdout + done.stderr).decode()

    @pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
    def test_secret_file_of_another_user_refused(self, tmp_path: Path) -> None:
        """A 0600 secret file owned by someone else is refused too (section 4: owner and mode)."""
        secret_file = _write(tmp_path / "k.secret", _random_secret("file"), 0o600)
        os.chown(secret_file, 65534, -1)
        keys = _key_toml("k", "cid", extra='credential_secret_file = "k.secret"')
        config = _write(tmp_path / "c.toml", _config_toml("https://x.example", keys))
        with pytest.raises(ConfigError) as info:
            load_config(config, environ={})
        assert info.value.path == "keys[0].credential_secret_file"
        assert "not owned by the user running the broker" in info.value.message

    def test_directory_or_binary_secret_file_is_a_config_error(self, tmp_path: Path) -> None:
        """A directory or a non-UTF-8 file is a ConfigError (exit 78), not a crash; a
        directory is called one whatever its mode (it was told to chmod 600 first)."""
        (tmp_path / "dir.secret").mkdir()
        (tmp_path / "dir.secret").chmod(0o755)
        binary = _write(tmp_path / "bin.secret", "", 0o600)
        binary.write_bytes(b"\xff\xfe-not-text")
        for name, expected in (("dir.secret", "not a regular file"), ("bin.secret", "UTF-8")):
            keys = _key_toml("k", "cid", extra=f'credential_secret_file = "{name}"')
            config = _write(tmp_path / "c.toml", _config_toml("https://x.example", keys))
            with pytest.raises(ConfigError) as info:
                load_config(config, environ={})
            assert info.value.path == "keys[0].credential_secret_file"
            assert expected in info.value.message
            assert "\\xff" not in info.value.message


class TestSecretText:
    """A secret is read as Associates Central shows it, or refused at the config's check."""

    def test_a_byte_order_mark_and_blanks_around_it_are_dropped(self, tmp_path: Path) -> None:
        """Notepad's UTF-8 file (a byte-order mark, CRLF) or a variable filled from one: the
        secret without them; it was sent with the mark, and refused as invalid_client."""
        secret_file = tmp_path / "k.secret"
        secret_file.write_bytes(b"\xef\xbb\xbfdemo-secret\r\n")
        secret_file.chmod(0o600)
        keys = _key_toml("k", "cid", extra='credential_secret_file = "k.secret"')
        config = _write(tmp_path / "c.toml", _config_toml("https://x.example", keys))
        assert load_config(config, environ={}).keys[0].secret == Secret("demo-secret")
        environ = {"ASINB_DEMO_SECRET": "\ufeffdemo-secret\n"}
        assert parse_config(_document(), environ=environ).keys[0].secret == Secret("demo-secret")

    @pytest.mark.parametrize(
        ("text", "said"),
        [
            ("Credential ID,Secret\ndemo-id,demo-secret\n", "line break or control"),
            ("demo secret", "blank"),
            ("x" * 20_000, "holds 20,000 characters"),
        ],
    )
    def test_more_than_a_secret_is_refused_without_echo(
        self, tmp_path: Path, text: str, said: str
    ) -> None:
        """Two lines (a credentials CSV), a blank inside or a length no secret has, in a
        file or a variable: a config error naming where, never the text; check-config said
        ok and the run was refused by Amazon (exit 77), or blamed the token endpoint."""
        secret_file = _write(tmp_path / "k.secret", text, 0o600)
        keys = _key_toml("k", "cid", extra='credential_secret_file = "k.secret"')
        config = _write(tmp_path / "c.toml", _config_toml("https://x.example", keys))
        with pytest.raises(ConfigError) as info:
            load_config(config, environ={})
        assert info.value.path == "keys[0].credential_secret_file"
        assert said in info.value.message
        assert str(secret_file) in info.value.message
        assert "demo-secret" not in info.value.message
        with pytest.raises(ConfigError) as info:
            parse_config(_document(), environ={"ASINB_DEMO_SECRET": text})
        assert info.value.path == "keys[0].credential_secret_env"
        assert said in info.value.message
        assert "demo-secret" not in info.value.message

    def test_a_huge_file_is_not_read_whole(self, tmp_path: Path) -> None:
        """A secret file over 64 KiB (a log named by mistake) is refused as no secret file."""
        _write(tmp_path / "k.secret", "x" * 100_000, 0o600)
        keys = _key_toml("k", "cid", extra='credential_secret_file = "k.secret"')
        config = _write(tmp_path / "c.toml", _config_toml("https://x.example", keys))
        with pytest.raises(ConfigError, match="is over 64 KiB: no secret file is"):
            load_config(config, environ={})

    @pytest.mark.parametrize("given", ["\n", "   "])
    def test_a_blank_secret_in_code_names_secrets(self, given: str) -> None:
        """secrets={"demo": "\\n"}: the secret given in code is empty, said at secrets['demo'];
        it named an internal variable ASINB_INLINE_SECRET_0 and said to export it."""
        document = _document()
        del document["keys"][0]["credential_secret_env"]
        with pytest.raises(ConfigError) as info:
            config_from_dict(document, secrets={"demo": given})
        assert info.value.path == "secrets['demo']"
        assert "empty (or only white space)" in info.value.message
        assert "ASINB_INLINE_SECRET" not in str(info.value)


# -- D4: binding beyond loopback --------------------------------------------------------------


class TestD4LoopbackOnly:
    """D4: the simulator and the daemon's /metrics bind loopback unless --allow-remote."""

    @pytest.mark.parametrize("host", ["0.0.0.0", "::"])
    def test_simulate_refuses_remote_bind(self, tmp_path: Path, host: str) -> None:
        """``broker simulate --host 0.0.0.0`` exits 78 before binding and names the flag."""
        done = _run_cli("simulate", "--host", host, "--port", "0", cwd=tmp_path)
        err = done.stderr.decode()
        assert done.code == EX_CONFIG
        assert "--allow-remote" in err
        assert repr(host) in err
        assert "listening" not in done.stdout.decode()

    def test_serve_refuses_remote_metrics_bind(self, tmp_path: Path) -> None:
        """``broker serve --host 0.0.0.0`` exits 78, names the flag and creates no spool."""
        keys = _key_toml("k", "demo-id")
        config = _write(tmp_path / "c.toml", _config_toml("simulator", keys))
        spool = tmp_path / "spool"
        done = _run_cli(
            "serve", "--spool", str(spool), "--config", str(config), "--host", "0.0.0.0",
            "--port", "0", cwd=tmp_path,
        )  # fmt: skip
        assert done.code == EX_CONFIG
        assert "--allow-remote" in done.stderr.decode()
        assert not spool.exists()

    @pytest.mark.parametrize("host", REMOTE_HOSTS)
    def test_every_non_loopback_host_needs_the_flag(self, host: str) -> None:
        """Wildcards, the empty host, LAN addresses and names are refused by both servers."""
        with pytest.raises(ConfigError, match="allow-remote"):
            SimulatorServer(host=host)
        with pytest.raises(ConfigError, match="allow-remote"):
            MetricsServer(_NoStatus(), host=host, port=0)
        simulator_check_host(host, allow_remote=True)
        metrics_check_host(host, allow_remote=True)

    async def test_defaults_bind_loopback(self) -> None:
        """With no host given, the simulator and the metrics server listen on 127.0.0.1."""
        async with SimulatorServer() as server:
            assert server.url.startswith("http://127.0.0.1:")
        async with MetricsServer(_NoStatus(), host="127.0.0.1", port=0) as metrics:
            assert metrics.url.startswith("http://127.0.0.1:")
        parser_defaults = _parser_defaults()
        assert parser_defaults == {"simulate": "127.0.0.1", "serve": "127.0.0.1"}


class TestMetricsConnections:
    """What clients of the metrics endpoint can hold open is bounded: any local user can
    reach it, and a daemon out of open files exits."""

    async def test_past_the_cap_a_new_connection_closes_the_quietest(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """At the cap, a new connection is let in and answered, and the one heard from
        longest ago is closed (one warning says so): held connections were kept for good,
        until the daemon ran out of files and exited 74, and a client holding the cap must
        not shut out the next health check."""
        from broker.jobs import metrics_http
        from broker.listener import ConnectionLimits

        monkeypatch.setattr(metrics_http, "LIMITS", ConnectionLimits(max_open=3, idle_s=60.0))
        async with MetricsServer(_NoStatus(), host="127.0.0.1", port=0) as metrics:
            held = []
            for _ in range(3):
                held.append(await asyncio.open_connection("127.0.0.1", metrics.port))
                await asyncio.sleep(0.02)  # each heard from later than the one before
            assert await _ask(*held[1]) == 200  # the second is heard from again
            with structlog.testing.capture_logs() as logs:
                newcomer = await asyncio.open_connection("127.0.0.1", metrics.port)
                assert await _ask(*newcomer) == 200
            assert await asyncio.wait_for(held[0][0].read(), timeout=5) == b""  # closed
            assert [e["event"] for e in logs] == ["broker.http_connections_capped"]
            assert await _ask(*held[1]) == 200  # heard from lately: kept
            for _, writer in [*held, newcomer]:
                writer.close()

    async def test_a_client_that_goes_quiet_is_closed(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A connection that sends nothing, or half a request, is closed once it has been
        quiet for the idle time; one that keeps asking is not."""
        from broker.jobs import metrics_http
        from broker.listener import ConnectionLimits

        monkeypatch.setattr(metrics_http, "LIMITS", ConnectionLimits(max_open=8, idle_s=1.0))
        async with MetricsServer(_NoStatus(), host="127.0.0.1", port=0) as metrics:
            silent = await asyncio.open_connection("127.0.0.1", metrics.port)
            partial = await asyncio.open_connection("127.0.0.1", metrics.port)
            partial[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            busy = await asyncio.open_connection("127.0.0.1", metrics.port)
            for _ in range(4):
                assert await _ask(*busy) == 200
                await asyncio.sleep(0.3)
            for reader, _ in (silent, partial):
                assert await asyncio.wait_for(reader.read(), timeout=5) == b""
            assert await _ask(*busy) == 200  # still open
            for _, writer in (silent, partial, busy):
                writer.close()


async def _ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """One GET /healthz on a kept-alive connection, read whole; its status code."""
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    length = re.search(r"(?i)content-length: *(\d+)", head)
    assert length is not None
    await reader.readexactly(int(length.group(1)))
    return int(head.split()[1])


class _NoStatus:
    """A StatusSource with nothing to report."""

    def engine_metrics(self) -> None:
        return None

    def spool_snapshot(self) -> Any:
        from broker.jobs.metrics_http import SpoolSnapshot

        return SpoolSnapshot()

    async def cache_stats(self) -> None:
        return None


def _parser_defaults() -> dict[str, str]:
    parser = cli._build_parser()
    defaults = {}
    for command, extra in (("simulate", []), ("serve", ["--spool", "s"])):
        defaults[command] = parser.parse_args([command, *extra]).host
    return defaults


# -- D5: clear text and certificate checks -------------------------------------------------


class TestD5TransportSecurity:
    """D5: credentials go over https to remote hosts, and certificates are always verified."""

    @pytest.mark.parametrize(
        "url",
        [
            "http://creatorsapi.amazon",
            "http://10.0.0.5:8080",
            "http://0.0.0.0:8787",
            "http://[::]:8787",
            "http://127.0.0.1.nip.io:8787",
            "http://localhost.example.com",
        ],
    )
    @pytest.mark.parametrize("where", ["endpoint", "token_endpoint"])
    def test_plain_http_to_remote_refused(self, where: str, url: str) -> None:
        """An http:// API or token endpoint on a non-loopback host is refused, naming the key."""
        document = _document()
        document["api"][where] = url
        with pytest.raises(ConfigError) as info:
            parse_config(document, environ=_ENVIRON)
        assert info.value.path == f"api.{where}"
        assert "https://" in info.value.message

    @pytest.mark.parametrize("url", ["http://[::1", "https://[creatorsapi.example"])
    def test_malformed_url_is_a_config_error(self, url: str) -> None:
        """A URL urllib cannot split is a ConfigError naming the key, not a crash."""
        document = _document()
        document["api"]["endpoint"] = url
        with pytest.raises(ConfigError) as info:
            parse_config(document, environ=_ENVIRON)
        assert info.value.path == "api.endpoint"

    def test_cli_exit_code_for_plain_http(self, tmp_path: Path) -> None:
        """Through the command line the same refusal is exit 78."""
        keys = _key_toml("k", "cid", env="ASINB_K")
        config = _write(tmp_path / "c.toml", _config_toml("http://creatorsapi.amazon", keys))
        done = _run_cli("check-config", "--config", str(config), cwd=tmp_path, env={"ASINB_K": "s"})
        assert done.code == EX_CONFIG
        assert "api.endpoint" in done.stderr.decode()

    @pytest.mark.parametrize("url", ["http://127.0.0.1:8787", "http://[::1]:1", "http://localhost"])
    def test_plain_http_to_loopback_allowed(self, url: str) -> None:
        """The local simulator may be reached over http://."""
        document = _document()
        document["api"]["endpoint"] = url
        assert parse_config(document, environ=_ENVIRON).api.endpoint == url

    @pytest.mark.parametrize(
        ("table", "name"),
        [
            ("api", "verify_tls"),
            ("api", "tls_verify"),
            ("api", "verify_ssl"),
            ("api", "insecure"),
            ("api", "ssl"),
            ("engine", "verify_tls"),
            ("engine", "ssl"),
        ],
    )
    def test_no_switch_turns_tls_verification_off(self, table: str, name: str) -> None:
        """There is no option to skip certificate checks: any such key is an unknown key."""
        document = _document()
        document.setdefault(table, {})[name] = False
        with pytest.raises(ConfigError) as info:
            parse_config(document, environ=_ENVIRON)
        assert info.value.path == f"{table}.{name}"
        assert "unknown key" in info.value.message

    async def test_transport_verifies_certificates(self, tls_server: TlsServer) -> None:
        """The engine's transport refuses a certificate no CA vouches for (aiohttp ssl=True)."""
        url = tls_server.url + "/catalog/v1/getItems"
        async with AiohttpTransport(timeout_s=5.0, connect_timeout_s=5.0) as transport:
            with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
                await transport.send(HttpRequest("POST", url, {}, b"{}"))
        assert tls_server.answered == 0
        # Control: a client that trusts this certificate gets through, so the refusal above
        # was the certificate check and nothing else.
        trusting = ssl.create_default_context(cafile=str(tls_server.cert))
        async with aiohttp.ClientSession() as session, session.post(url, ssl=trusting) as reply:
            assert reply.status == 200
        assert tls_server.answered == 1

    async def test_custom_ca_bundle_through_ssl_cert_file(
        self, tls_server: TlsServer, tmp_path: Path
    ) -> None:
        """A corporate CA is trusted through SSL_CERT_FILE, with verification still on."""
        url = tls_server.url + "/catalog/v1/getItems"
        script = _write(
            tmp_path / "probe.py",
            textwrap.dedent(
                """\
                import asyncio, sys

                from broker.api.base import HttpRequest
                from broker.engine.transport import AiohttpTransport


                async def probe() -> int:
                    async with AiohttpTransport(timeout_s=5.0) as transport:
                        response = await transport.send(HttpRequest("POST", sys.argv[1], {}, b""))
                    return response.status


                print(asyncio.run(probe()))
                """
            ),
        )
        done = await _cli(
            url, cwd=tmp_path, env={"SSL_CERT_FILE": str(tls_server.cert)}, script=script
        )
        assert done.code == 0, done.stderr.decode()[-2000:]
        assert done.stdout.decode().strip() == "200"
        assert tls_server.answered == 1


@dataclass
class TlsServer:
    """An HTTPS server with a self-signed certificate, and how many requests it answered."""

    url: str
    cert: Path
    answered: int = 0


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A fresh self-signed certificate for 127.0.0.1 and its key (PEM files)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


@pytest.fixture
async def tls_server(self_signed: tuple[Path, Path]) -> AsyncIterator[TlsServer]:
    """An HTTPS server on 127.0.0.1 presenting the self-signed certificate."""
    cert, key = self_signed
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = TlsServer("", cert)
    app = web.Application()

    async def answer(_request: web.Request) -> web.Response:
        server.answered += 1
        return web.json_response({})

    app.router.add_post("/catalog/v1/getItems", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    server.url = f"https://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield server
    finally:
        await runner.cleanup()


# -- D6: unknown config keys ------------------------------------------------------------------


class TestD6UnknownKey:
    """D6: an unknown config key is refused (exit 78) with its full key path."""

    @pytest.mark.parametrize(
        ("snippet", "path"),
        [
            ('endpiont = "x"\n', "api.endpiont"),
            ("[engine]\nlingr_s = 1\n", "engine.lingr_s"),
            ("[retry]\nattempts = 3\n", "retry.attempts"),
            ("[telemetry]\nenabled = true\n", "telemetry"),
            ("[simulator.faults]\nerror_501 = 0.1\n", "simulator.faults.error_501"),
            (
                '[[simulator.accounts]]\nname = "a"\ncredential_id = "c"\nsecret = "s"\n'
                "colour = 1\n",
                "simulator.accounts[0].colour",
            ),
        ],
    )
    def test_cli_names_unknown_key(self, tmp_path: Path, snippet: str, path: str) -> None:
        """``check-config`` exits 78 and the message names the unknown key's full path."""
        api = snippet if not snippet.startswith("[") else ""
        text = f'[api]\nendpoint = "simulator"\n{api}\n' + _key_toml("k", "demo-id")
        if not api:
            text += "\n" + snippet
        config = _write(tmp_path / "c.toml", text)
        done = _run_cli("check-config", "--config", str(config), cwd=tmp_path)
        err = done.stderr.decode()
        assert done.code == EX_CONFIG, done.stdout.decode()
        assert re.search(rf": {re.escape(path)}: unknown (key|setting)", err), err

    def test_unknown_key_in_second_key_table(self) -> None:
        """The index of the [[keys]] entry is part of the path."""
        document = _document()
        second = dict(document["keys"][0], name="other", tsp=5)
        document["keys"].append(second)
        with pytest.raises(ConfigError) as info:
            parse_config(document, environ=_ENVIRON)
        assert info.value.path == "keys[1].tsp"


# -- section 4: reprs and messages of every object that holds a credential ------------------


class TestReprsHideCredentials:
    """Section 4: no repr, str or message of a credential-holding object shows its value."""

    def test_secret_type(self) -> None:
        """Secret shows ``***`` in repr, str and formatting, and refuses to be pickled."""
        value = _random_secret("type")
        wrapped = Secret(value)
        shown = [repr(wrapped), str(wrapped), f"{wrapped}", f"{wrapped!r}", f"{wrapped:>3}"]
        shown.append(json.dumps({"s": wrapped}, default=repr))
        assert all(value not in text for text in shown)
        assert repr(wrapped) == "Secret('***')"
        with pytest.raises(TypeError):
            pickle.dumps(wrapped)
        assert wrapped.reveal() == value

    async def test_live_objects(self, tmp_path: Path) -> None:
        """Config, KeyState, authorizers, token cache and Broker after real requests hide all."""
        real = {name: _random_secret(f"real-{name}") for name in ("v3", "v2", "pa")}
        record = WireRecord()
        server = SimulatorServer(
            SimulatorSettings(limits=False, demo_accounts=False, accounts=_scene_accounts(real))
        )
        server.app.on_response_prepare.append(record.on_prepare)
        env = {"S_V3": real["v3"], "S_V2": real["v2"], "S_PA": real["pa"]}
        async with server:
            creators = _live_config(server.url, env, "creators")
            paapi = _live_config(server.url, env, "paapi5")
            texts: list[str] = []
            for config in (creators, paapi):
                async with Broker(config) as broker:
                    results = await broker.get_items([f"B{i:09d}" for i in range(40)])
                    assert all(result.ok for result in results)
                    keys = list(broker._keys)
                    texts += [repr(broker), str(broker), repr(broker.metrics())]
                    for key in keys:
                        texts += [repr(key), str(key), repr(key.authorizer), str(key.authorizer)]
                        texts += [repr(key.snapshot())]
                texts += [repr(config), str(config), repr(config.keys), str(config.keys[0])]
        assert record.tokens  # credentials were really used
        assert record.signatures
        needles = {*real.values(), *record.tokens, *record.signatures, *record.authorizations}
        for text in texts:
            assert not [needle for needle in needles if needle in text], text

    async def test_token_cache_and_signers(self) -> None:
        """A token cache holding a token, a signer, and their failure messages hide credentials."""
        secret = _random_secret("cache")
        token = "Atc|" + secrets.token_urlsafe(32)
        answers = [
            RawResponse(200, {}, json.dumps({"access_token": token, "expires_in": 60}).encode()),
            RawResponse(401, {}, json.dumps({"error": "invalid_client",
                                             "error_description": f"bad {secret}"}).encode()),
        ]  # fmt: skip

        async def send(_request: HttpRequest) -> RawResponse:
            return answers.pop(0)

        clock = FakeClock()
        cache = CreatorsTokenCache("cid", Secret(secret), "3.1", send=send, clock=clock)
        assert await cache.token() == token
        request, _ = await cache.authorize(HttpRequest("POST", "https://x/y", {}, b"{}"))
        bearer = BearerAuthorizer(
            CreatorsTokenCache(
                "cid", Secret(secret), "2.1", token_url="https://x/t", send=send, clock=clock
            )
        )
        texts = [repr(cache), str(cache), repr(request), repr(bearer), str(bearer)]
        await clock.advance(120.0)
        with pytest.raises(AuthError) as failure:
            await cache.token()
        texts += [str(failure.value), repr(failure.value), repr(failure.value.args)]
        signer = SigV4Signer("AKID", Secret(secret))
        sigv4 = SigV4Authorizer("AKID", Secret(secret), clock=clock)
        texts += [repr(signer), str(signer), repr(sigv4), str(sigv4)]
        assert "invalid_client" in str(failure.value)
        for text in texts:
            assert secret not in text, text
            assert token not in text, text

    def test_simulator_accounts_stay_out_of_config_repr(self) -> None:
        """Simulator account secrets (allowed in [simulator]) never show in the config's repr."""
        secret = _random_secret("sim")
        document = _document()
        document["api"]["endpoint"] = "simulator"
        document["simulator"] = {
            "accounts": [{"name": "a", "credential_id": "a-id", "secret": secret}]
        }
        config = parse_config(document, environ={})
        settings = simulator_settings(config)
        assert settings.accounts[0].secret == secret
        assert secret not in repr(config) + str(config) + repr(settings)

    def test_config_errors_never_quote_a_secret(self) -> None:
        """Every way of getting a key's secret wrong yields a message without the secret."""
        secret = _random_secret("cfg")
        cases: list[dict[str, Any]] = []
        for field_name in ("credential_secret", "api_key", "private_key", "password"):
            document = _document()
            document["keys"][0][field_name] = secret
            cases.append(document)
        document = _document()
        document["keys"][0]["credential_secret_env"] = secret
        cases.append(document)
        document = _document()
        document["api"]["token_endpoint"] = f"ftp://u:{secret}@host"
        cases.append(document)
        for document in cases:
            with pytest.raises(ConfigError) as info:
                parse_config(document, environ={})
            assert secret not in str(info.value) + repr(info.value)


def _live_config(url: str, env: Mapping[str, str], protocol: str) -> BrokerConfig:
    tags = {US: "sec-20"}
    if protocol == "creators":
        keys = [
            {"name": "k3", "credential_id": "sec-v3-id", "credential_secret_env": "S_V3",
             "version": "3.1", "partner_tags": tags, "tps": 100.0},
            {"name": "k2", "credential_id": "sec-v2-id", "credential_secret_env": "S_V2",
             "version": "2.1", "partner_tags": tags, "tps": 100.0},
        ]  # fmt: skip
    else:
        keys = [
            {"name": "pa", "credential_id": "SECPAACCESSKEY", "credential_secret_env": "S_PA",
             "partner_tags": tags, "tps": 100.0}
        ]  # fmt: skip
    document = {
        "api": {"protocol": protocol, "endpoint": url},
        "keys": keys,
        "engine": {"linger_s": 0.005},
    }
    return parse_config(document, environ=env)


def test_library_events_reach_an_application_plain_and_redacted() -> None:
    """Without the CLI's set-up, an event reaches the app's logging as one plain line: no
    second timestamp or level, no colour codes, secrets masked, tracebacks as exc_info."""
    script = textwrap.dedent(
        """
        import logging, sys
        logging.basicConfig(stream=sys.stdout, format="%(levelname)s|%(message)s", level="INFO")
        from broker.logs import get_logger
        log = get_logger("broker")
        log.warning("broker.test_event", key="demo", client_secret="hunter2")
        try:
            1 / 0
        except ZeroDivisionError:
            log.exception("broker.crashed", key="k")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    lines = done.stdout.splitlines()
    assert lines[0] == "WARNING|broker.test_event key='demo' client_secret='***'"
    assert lines[1] == "ERROR|broker.crashed key='k'"
    assert lines[2].startswith("Traceback")
    assert "ZeroDivisionError" in done.stdout
    assert "\x1b[" not in done.stdout
    assert "hunter2" not in done.stdout


class TestD2CredentialsInForeignMessages:
    """A password a foreign library quotes (a proxy URL, a Redis URL) or a token endpoint
    echoes (encoded as the request sent it) never reaches a message, a cause or a log."""

    _PROXY = "http://user:SEKRIT-PROXY-PW@127.0.0.1:{port}"

    async def test_a_proxy_refusing_the_tunnel_does_not_show_its_password(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A proxy answering CONNECT with 407: the transport error (and its chain, as a
        traceback prints it) masks the proxy URL's password aiohttp quotes."""

        async def refuse(request: web.Request) -> web.Response:
            return web.Response(status=407, headers={"Proxy-Authenticate": "Basic"})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", refuse)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        monkeypatch.setenv("HTTPS_PROXY", self._PROXY.format(port=port))
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        try:
            async with AiohttpTransport(timeout_s=5, connect_timeout_s=2) as transport:
                with pytest.raises(TransportError) as caught:
                    await transport.send(HttpRequest("POST", "https://example.com/x", {}, b"{}"))
        finally:
            await runner.cleanup()
        shown = "".join(traceback.format_exception(caught.value))
        assert "SEKRIT-PROXY-PW" not in shown
        assert "***@127.0.0.1" in str(caught.value)

    @pytest.mark.parametrize(
        "text",
        [
            "Cannot connect to proxy url='http://user:SEKRIT-PW@proxy:3128'",
            "InvalidURL: http://user:SEKRIT#PW@proxy:3128",
            "redis://:SEKRIT/PW@cache.internal:6379/0 refused",
            # Without a scheme, as curl takes HTTPS_PROXY: aiohttp quotes it whole.
            "InvalidURL: puser:SEKRIT-PW@127.0.0.1:18932",
            # A proxy echoing the Proxy-Authorization it refused ("user:SEKRIT" encoded).
            "407 Proxy Authentication Required: Basic dXNlcjpTRUtSSVQ=",
        ],
    )
    def test_scrub_masks_a_urls_user_info(self, text: str) -> None:
        """A URL's user:password@ is masked up to its last @, whatever the password holds,
        with a scheme or without, and HTTP Basic credentials too, in messages and in every
        log event (the schemeless and Basic forms were shown in clear)."""
        for shown in (scrub(text), json.dumps(redact(None, "error", {"event": "x", "c": text}))):
            assert "SEKRIT" not in shown
            assert "dXNlcjpTRUtSSVQ" not in shown

    @pytest.mark.parametrize("password", ["SEKRIT#PW", "SEKRIT/PW", "SEKRIT?PW"])
    def test_an_unreadable_redis_cache_url_is_a_config_error_without_it(
        self, password: str
    ) -> None:
        """A cache Redis URL whose password holds an unencoded #, / or ?: a config error
        naming the setting and the fix, never quoting the password (redis-py's own error
        quotes it)."""
        pytest.importorskip("redis")
        from broker.cache.policy import CachePolicy
        from broker.cache.redis_store import RedisCache

        with pytest.raises(ConfigError) as caught:
            RedisCache.from_url(f"redis://:{password}@127.0.0.1:6379/0", CachePolicy(3600))
        shown = "".join(traceback.format_exception(caught.value))
        assert "SEKRIT" not in shown
        assert caught.value.path == "cache.redis_url"

    def test_an_unreadable_redis_cache_url_from_the_environment_names_the_variable(
        self,
    ) -> None:
        """The URL came from the variable cache.redis_url_env names: the error (at load)
        names that setting and the variable, not a cache.redis_url the config does not
        have, and never the password a '#' cut out of the URL's address."""
        pytest.importorskip("redis")
        document = {
            "api": {"endpoint": "simulator"},
            "keys": [
                {
                    "name": "k",
                    "credential_id": "demo-id",
                    "version": "3.1",
                    "partner_tags": {"www.amazon.com": "demo-20"},
                }
            ],
            "cache": {"max_age_s": 3600, "backend": "redis", "redis_url_env": "ASINB_REDIS"},
        }
        with pytest.raises(ConfigError) as caught:
            parse_config(document, environ={"ASINB_REDIS": "redis://:SEKRIT#PW@h:6379/0"})
        assert caught.value.path == "cache.redis_url_env"
        assert "ASINB_REDIS" in str(caught.value)
        assert "SEKRIT" not in str(caught.value)

    def test_a_gateway_echoing_the_token_in_a_code_or_request_id_is_masked(self) -> None:
        """An API error whose code or request id echoes the bearer token (a gateway's
        doing) has it masked there too, as in its message: the code went unmasked into
        output rows, the ledger and error-level logs."""
        from broker.engine.executor import _request_id, _without_credentials
        from broker.errors import BadRequestError

        token = "Atc|SEKRIT-TOKEN-123456"
        request = HttpRequest(
            "POST", "https://x/getItems", {"Authorization": f"Bearer {token}"}, b""
        )
        error = BadRequestError(f"Bearer {token}", f"refused {token}", status=400, request_id=token)
        shown = _without_credentials(error, request)
        assert "SEKRIT" not in f"{shown.code} {shown.message} {shown.request_id} {shown}"
        answer = RawResponse(400, {"x-amzn-requestid": token}, b"{}")
        assert "SEKRIT" not in str(_request_id(answer, request))

    async def test_a_token_endpoint_echoing_the_secret_in_its_request_id(self) -> None:
        """A token endpoint's request id header echoing the secret is masked in the error's
        request id and text (a warning, the key's error and the final line showed it)."""
        secret = "PlainAsciiSecretMARK42"

        async def endpoint(request: HttpRequest) -> RawResponse:
            return RawResponse(500, {"x-amzn-requestid": secret}, b'{"error":"server_error"}')

        cache = CreatorsTokenCache("id", Secret(secret), "3.1", send=endpoint, clock=FakeClock())
        with pytest.raises(BrokerError) as caught:
            await cache.token()
        assert "MARK42" not in f"{getattr(caught.value, 'request_id', '')} {caught.value}"

    @pytest.mark.parametrize("version", ["2.1", "3.1"])
    async def test_a_token_endpoint_echoing_the_encoded_secret(self, version: str) -> None:
        """An OAuth error member echoing the request body (the secret form- or JSON-encoded)
        is masked in the error's code and message."""
        secret = 'SEKRIT/CANARY+1234="x"'
        echoes = [
            f"grant_type=client_credentials&client_secret={quote_plus(secret, safe='')}",
            f"client_secret={quote(secret, safe='')}",
            json.dumps({"client_secret": secret}),
        ]
        for echo in echoes:

            async def endpoint(request: HttpRequest, echo: str = echo) -> RawResponse:
                body = json.dumps({"error": echo, "error_description": echo}).encode()
                return RawResponse(400, {"content-type": "application/json"}, body)

            cache = CreatorsTokenCache(
                "id", Secret(secret), version, send=endpoint, clock=FakeClock()
            )
            with pytest.raises(AuthError) as caught:
                await cache.token()
            shown = f"{caught.value.code} {caught.value}"
            for form in (secret, quote_plus(secret, safe=""), quote(secret, safe="")):
                assert form not in shown, echo
            assert "SEKRIT" not in shown


def test_a_secret_variable_with_undecodable_bytes_is_a_config_error() -> None:
    """A secret variable holding bytes that are not UTF-8 (decoded by Python as lone
    surrogates) is refused naming the key, never echoed; it gave a traceback carrying the
    whole token request, secret included, at the first token fetch."""
    document = {
        "api": {"endpoint": "http://127.0.0.1:9"},
        "keys": [
            {
                "name": "main",
                "credential_id": "id",
                "version": "2.1",
                "credential_secret_env": "ASINB_SECRET",
                "partner_tags": {"www.amazon.com": "t-20"},
            }
        ],
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(document, environ={"ASINB_SECRET": "SEKRIT\udcff1234"})
    assert caught.value.path == "keys[0].credential_secret_env"
    assert "SEKRIT" not in str(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__
