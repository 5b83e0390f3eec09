"""The simulator on a socket: SimulatorServer, the stats and control endpoints, and the CLI."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import weakref
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.cli import main
from broker.config import TABLES
from broker.errors import ConfigError
from broker.simulator.cli import EX_CONFIG, load_settings, simulate_command
from broker.simulator.server import SimulatorServer, check_host
from broker.simulator.settings import SimulatorSettings
from broker.simulator.testclient import running_simulator
from broker.testing import FakeClock

BODY = {"partnerTag": "demo-20", "itemIds": ["B000TEST01"]}


async def test_server_binds_a_free_loopback_port() -> None:
    """SimulatorServer on port 0 exposes url, port, app and stats, and answers there."""
    async with SimulatorServer() as server, aiohttp.ClientSession() as session:
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        async with session.get(server.url + "/_sim/stats") as response:
            assert response.status == 200
        assert server.stats.requests == 0


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd")
async def test_a_start_cancelled_at_any_step_leaves_no_socket_open() -> None:
    """Cancelling the server's start at any of its first steps, once or twice, leaves no
    socket behind: a cancel while the loop's create_server skipped a turn lost the listening
    socket, which stayed open (and listening) until the loop closed."""

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    for twice in (False, True):
        for turns in range(8):
            server = SimulatorServer()
            task = asyncio.ensure_future(server.__aenter__())
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            if twice:
                # A second cancel while the first one's cleanup waits (a TaskGroup's and a
                # timeout's, two signals): the start still ends before the cleanup runs.
                await asyncio.sleep(0)
                task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            else:
                await server.__aexit__(None, None, None)
            for _ in range(5):
                await asyncio.sleep(0)
            assert open_fds() == before, f"a socket left open: {turns} turns, twice {twice}"


@pytest.mark.parametrize(
    ("headers", "status", "kind"),
    [
        ({}, 400, "ValidationException"),
        ({"X-Amz-Target": "com.amazon.paapi5.v1.ProductAdvertisingAPIv1.GetItems"}, 404, None),
    ],
)
async def test_a_path_no_api_has_is_an_unknown_operation(
    headers: dict[str, str], status: int, kind: str | None
) -> None:
    """A POST to a path neither API has (an endpoint given with a path of its own) gets the
    API's own UnknownOperation, not a plain-text 404 a client would take for an outage."""
    async with SimulatorServer() as server, aiohttp.ClientSession() as session:
        url = server.url + "/v1/catalog/v1/getItems"
        async with session.post(url, json=BODY, headers=headers) as response:
            assert response.status == status
            body = await response.json(content_type=None)
    if kind is None:
        assert body["Errors"][0]["Code"] == "UnknownOperation"
    else:
        assert (body["type"], body["reason"]) == (kind, "UnknownOperation")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "localhost"])
def test_loopback_hosts_are_allowed(host: str) -> None:
    """Loopback addresses and 'localhost' pass the bind check."""
    check_host(host, allow_remote=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.com", "::"])
def test_remote_hosts_need_the_flag(host: str) -> None:
    """A non-loopback host is refused with ConfigError naming --host (the flag it came from;
    there is no simulator.host key) unless allowed."""
    with pytest.raises(ConfigError) as caught:
        SimulatorServer(host=host)
    assert caught.value.path == "--host"
    check_host(host, allow_remote=True)


async def test_stats_endpoint() -> None:
    """GET /_sim/stats reports per-key counters, timestamps (filterable) and faults."""
    clock = FakeClock()
    async with running_simulator(SimulatorSettings(), clock=clock) as (client, _):
        token = await client.token()
        await client.creators("getItems", BODY, token=token)
        await client.creators("getItems", BODY, token=token)
        stats = (await client.get("/_sim/stats")).json()
        demo = stats["accounts"]["demo"]
        assert (demo["accepted"], demo["throttled"], demo["items_served"]) == (1, 1, 1)
        assert demo["accepted_at"] == [clock.monotonic()]
        assert demo["errors"] == {"ThrottleException": 1}
        assert stats["faults"] == {}
        assert stats["now"] == clock.monotonic()
        later = (await client.get(f"/_sim/stats?since={clock.monotonic() + 1}")).json()
        assert later["accounts"]["demo"]["accepted_at"] == []
        bare = (await client.get("/_sim/stats?timestamps=0")).json()
        assert "accepted_at" not in bare["accounts"]["demo"]


async def test_control_changes_tps_and_limits() -> None:
    """POST /_sim/control changes a key's tps at runtime and switches limits off and on."""
    clock = FakeClock()
    async with running_simulator(SimulatorSettings(), clock=clock) as (client, sim):
        token = await client.token()

        async def status() -> int:
            return (await client.creators("getItems", BODY, token=token)).status

        changed = await client.post(
            "/_sim/control", data=json.dumps({"account": "demo", "tps": 0.5})
        )
        assert changed.status == 200
        assert sim.quotas["demo"].tps == 0.5
        assert [await status(), await status()] == [200, 429]
        await clock.advance(1.0)
        assert await status() == 429
        await clock.advance(1.0)
        assert await status() == 200
        await client.post("/_sim/control", data=json.dumps({"limits": False}))
        assert [await status() for _ in range(3)] == [200, 200, 200]
        await client.post("/_sim/control", data=json.dumps({"limits": True}))
        assert await status() == 429


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"account": "nobody", "tps": 1}, 404),
        ({"account": "demo", "tps": 0}, 400),
        ({"account": "demo", "tpd": 1.5}, 400),
        ({"limits": "no"}, 400),
        ([], 400),
        ({"key": "demo", "tps": 2}, 400),
        ({"account": "demo"}, 400),
        ({"tps": 2}, 400),
        ({"limits": False, "account": "nobody", "tps": 2}, 404),
        ({"limits": False, "account": "demo", "tps": -1}, 400),
        ({"account": "demo", "tps": float("nan")}, 400),
        ({"account": "demo", "tps": float("inf")}, 400),
        ({"account": "demo", "tps": 1e-320}, 400),
        (b'{"account":"d\xffemo","tps":1}', 400),
        (b"\xff\xfe\xfa", 400),
        (b'{"limits":false,"account":"demo","tps":1' + b"0" * 400 + b"}", 400),
        (b'{"limits":false,"account":"demo","tpd":1' + b"0" * 5000 + b"}", 400),
    ],
)
async def test_control_rejects_bad_input(body: object, status: int) -> None:
    """Bad control requests are refused with 4xx and change nothing: an unknown field
    (``key`` for ``account``) is refused, not ignored with a 200; so is a tps that is not
    finite or below the config's least (NaN and 1e-320 turned the limit off, Infinity made
    every later /_sim/stats a 500); so are bytes that are no UTF-8 (a 500 and a traceback),
    and an integer tps too large for a float (a 500, after limits had been switched off)."""
    async with running_simulator() as (client, sim):
        data = body if isinstance(body, bytes) else json.dumps(body)
        response = await client.post("/_sim/control", data=data)
        assert response.status == status
        assert sim.quotas["demo"].tps == 5.0
        assert sim.limits


async def test_control_refuses_a_tpd_of_zero() -> None:
    """POST /_sim/control with tpd 0 is a 400 saying tpd must be a positive integer (as
    [simulator] refuses it for an account), and the account's daily quota stays as it was."""
    async with running_simulator() as (client, sim):
        before = sim.quotas["demo"].tpd
        response = await client.post(
            "/_sim/control", data=json.dumps({"account": "demo", "tpd": 0})
        )
        assert response.status == 400
        assert response.json() == {"error": "tpd must be a positive integer"}
        assert sim.quotas["demo"].tpd == before


def _args(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "allow_remote": False,
    }
    values.update(overrides)
    return argparse.Namespace(**values)


def _interrupting_run(seconds: float) -> Any:
    """A ``run`` that serves for a moment, then behaves like Ctrl-C."""

    def run(coro: Coroutine[Any, Any, None]) -> int:
        async def driver() -> None:
            task = asyncio.ensure_future(coro)
            await asyncio.sleep(seconds)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(driver())
        raise KeyboardInterrupt

    return run


def test_cli_serves_until_interrupted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """broker simulate prints the URL and the demo ids, serves, and exits 0 on Ctrl-C."""
    monkeypatch.chdir(tmp_path)
    code = simulate_command(
        _args(), config="config.toml", explicit=False, run=_interrupting_run(0.2)
    )
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("simulator listening on http://127.0.0.1:")
    assert "demo-id" in out
    assert "DEMOACCESSKEY" in out
    assert "demo-secret" not in out
    assert "README" in out


def test_cli_lists_the_keys_it_has(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With demo_accounts = false, broker simulate lists its configured accounts, not the
    demo keys it does not have (it announced those whatever the config said)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.toml").write_text(
        '[simulator]\ndemo_accounts = false\n[[simulator.accounts]]\nname = "own"\n'
        'protocol = "creators"\ncredential_id = "own-id"\nsecret = "own-secret"\n'
        'version = "3.1"\npartner_tags = { "www.amazon.com" = "own-20" }\n'
    )
    code = simulate_command(
        _args(), config="config.toml", explicit=False, run=_interrupting_run(0.2)
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "own-id (Creators 3.1)" in out
    assert "demo-id" not in out
    assert "own-secret" not in out


def test_cli_reads_only_the_simulator_table(tmp_path: Path) -> None:
    """load_settings parses [simulator] and ignores the other tables."""
    config = tmp_path / "broker.toml"
    config.write_text('[api]\nprotocol = "creators"\n[simulator]\nseed = 5\nburst = 3\n')
    settings = load_settings(str(config), explicit=True, tables=TABLES)
    assert (settings.seed, settings.burst) == (5, 3)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("[simulator\n", "not valid TOML"),
        # The broker's table in the same file: the same hint as check-config gives.
        ("[rate]\ndaily_reset_utc = 08:00\n", 'write it in quotes (daily_reset_utc = "08:00")'),
        ("[simulator]\nburst = 0\n", "simulator.burst"),
        ("[simulatr]\nseed = 3\n", "simulatr: unknown table"),
        ('[api]\nprotocol = "creators"\n[bogus]\nx = 1\n', "bogus: unknown table"),
    ],
)
def test_cli_config_errors_exit_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    """A missing explicit file, bad TOML, a bad value or a table no one reads (a misspelt
    [simulatr] served the defaults) prints the problem and exits 78."""
    config = tmp_path / "mine.toml"
    if content is not None:
        config.write_text(content)
    code = simulate_command(
        _args(), config=str(config), explicit=True, run=_interrupting_run(0), tables=TABLES
    )
    assert code == EX_CONFIG
    assert message in capsys.readouterr().err


def test_broker_simulate_refuses_a_misspelt_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """broker simulate --config with [simulatr] exits 78 naming it (the CLI passes the
    config's own table names); it served the built-in settings."""
    config = tmp_path / "c.toml"
    config.write_text('[api]\nprotocol = "creators"\n[simulatr]\nseed = 3\n')
    assert main(["simulate", "--config", str(config), "--port", "0"]) == EX_CONFIG
    assert "simulatr: unknown table" in capsys.readouterr().err


def test_cli_missing_default_config_means_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No config.toml in the working directory means the built-in settings."""
    monkeypatch.chdir(tmp_path)
    assert load_settings("config.toml", explicit=False) == SimulatorSettings()


def test_cli_refuses_remote_host(capsys: pytest.CaptureFixture[str]) -> None:
    """broker simulate --host 0.0.0.0 without --allow-remote exits 78 with a clear message."""
    code = main(["simulate", "--host", "0.0.0.0", "--port", "0"])
    assert code == EX_CONFIG
    err = capsys.readouterr().err
    assert "--allow-remote" in err
    assert "0.0.0.0" in err


async def test_stats_count_a_new_day_from_zero_before_any_request() -> None:
    """/_sim/stats' used_today is 0 once the simulator's day has turned, before the key
    asks again: it kept yesterday's count until the key's next request."""
    clock = FakeClock()
    async with running_simulator(SimulatorSettings(), clock=clock) as (client, _sim):
        token = await client.token()
        assert (await client.creators("getItems", BODY, token=token)).status == 200
        before = (await client.get("/_sim/stats?timestamps=0")).json()
        assert before["quotas"]["demo"]["used_today"] == 1
        await clock.advance(86_400)
        after = (await client.get("/_sim/stats?timestamps=0")).json()
        assert after["quotas"]["demo"]["used_today"] == 0


# The test client's own warning about posting 2 MiB of bytes at once.
@pytest.mark.filterwarnings("ignore:Sending a large body:ResourceWarning")
async def test_an_oversized_creators_body_is_a_json_413_and_costs_nothing() -> None:
    """A Creators call whose body is over the 1 MiB taken: a JSON 413, and the key's day
    count unchanged; it was aiohttp's plain-text 413 after a transaction was charged."""
    async with running_simulator(SimulatorSettings(), clock=FakeClock()) as (client, _sim):
        token = await client.token()
        padded = {**BODY, "pad": "x" * (2 << 20)}
        response = await client.creators("getItems", padded, token=token)
        assert response.status == 413
        assert "bytes taken" in response.json()["message"]
        stats = (await client.get("/_sim/stats?timestamps=0")).json()
        assert stats["quotas"]["demo"]["used_today"] == 0
        assert (await client.creators("getItems", BODY, token=token)).status == 200


def test_issuing_tokens_stays_cheap_with_many_alive() -> None:
    """A client that asks a token per call leaves tens of thousands alive: each new one
    rebuilt the whole store past 10,000 (1.9 ms a token at 30,000, the loop blocked), since
    none had expired. Past a purge that frees nothing, the next comes at twice the size."""
    from broker.simulator.accounts import DEMO_ACCOUNTS
    from broker.simulator.tokens import TokenStore

    store = TokenStore()
    purges = 0
    for _ in range(30_000):
        before = store._tokens
        store.issue(DEMO_ACCOUNTS[0], 0.0, 3600.0)
        purges += store._tokens is not before  # a purge builds the store anew
    assert purges <= 2


def test_expired_tokens_are_purged_once_the_store_is_big() -> None:
    """Past 10,000 tokens, issuing one drops those expired (a long benchmark's memory stays
    bounded) and keeps those still alive."""
    from broker.simulator.accounts import DEMO_ACCOUNTS
    from broker.simulator.tokens import TokenStore

    store = TokenStore()
    alive = store.issue(DEMO_ACCOUNTS[0], 0.0, 3600.0)
    expired = [store.issue(DEMO_ACCOUNTS[0], 0.0, 60.0) for _ in range(10_000)]
    fresh = store.issue(DEMO_ACCOUNTS[0], 120.0, 3600.0)
    assert all(store.find(token.value) is None for token in expired)
    assert store.find(alive.value) is alive
    assert store.find(fresh.value) is fresh


async def test_a_malformed_request_is_logged_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """A request aiohttp cannot parse (two Content-Length headers) is answered 400 and
    logged as one line naming why, at warning level, not an error's traceback that looks
    like a simulator crash."""
    async with SimulatorServer(SimulatorSettings()) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
        )
        with caplog.at_level(logging.WARNING, logger="aiohttp.server"):
            assert (await asyncio.wait_for(reader.read(), timeout=5)).startswith(b"HTTP/1.0 400")
        writer.close()
    (record,) = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert record.levelname == "WARNING"
    assert record.exc_info is None
    assert "400 Duplicate" in record.getMessage()  # the C and the Python parser's words
    assert "Content-Length" in record.getMessage()
    assert "\n" not in record.getMessage()


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("POST", "/_sim/stats", 405), ("GET", "/_sim/control", 405), ("GET", "/_sim/stat", 404)],
)
async def test_a_control_path_asked_wrongly_is_told_so(method: str, path: str, status: int) -> None:
    """A simulator path with the wrong method is 405 naming the right one, and a misspelt
    one is 404 listing the endpoints; a POST to /_sim/stats was answered as an unknown API
    operation (and counted as a request), a typo'd GET was told to POST."""
    async with SimulatorServer(SimulatorSettings()) as server, aiohttp.ClientSession() as session:
        async with session.request(method, server.url + path) as response:
            assert response.status == status
            said = (await response.json())["error"]
        stats = await (await session.get(server.url + "/_sim/stats?timestamps=0")).json()
    assert ("takes" if status == 405 else "/_sim/stats (GET, HEAD)") in said
    assert stats["requests"] == 0


@pytest.mark.parametrize("path", ["/_sim/control", "/auth/o2/token", "/paapi5/getitems"])
async def test_a_body_that_cannot_be_read_is_a_400_in_one_line(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A body that cannot be read (said to be gzip, and not) is answered 400 naming why,
    and logged in one line; it was a 500 with two tracebacks on the simulator's stderr."""
    headers = {
        "Content-Encoding": "gzip",
        "Content-Type": "application/json",
        # Read before the body: without it a PA-API path is an unknown operation.
        "X-Amz-Target": "com.amazon.paapi5.v1.ProductAdvertisingAPIv1.GetItems",
    }
    with caplog.at_level(logging.ERROR, logger="aiohttp.server"):
        async with (
            SimulatorServer(SimulatorSettings()) as server,
            aiohttp.ClientSession() as session,
            session.post(server.url + path, data=b"not gzip", headers=headers) as response,
        ):
            assert response.status == 400
            assert "the request body cannot be read" in (await response.json())["message"]
    logged = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert all(r.exc_info is None for r in logged)


@pytest.mark.parametrize("path", ["/_sim/control", "/auth/o2/token"])
async def test_a_client_gone_mid_body_is_dropped_quietly(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that leaves before its body came leaves nothing to answer and nothing to
    report, on the simulator's own endpoints as on the API's; it was a traceback each."""
    with caplog.at_level(logging.ERROR, logger="aiohttp.server"):
        async with SimulatorServer(SimulatorSettings()) as server:
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Content-Length: 100\r\n\r\n0123456789".encode()
            )
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.close()
            await asyncio.sleep(0.3)
    assert [r for r in caplog.records if r.name == "aiohttp.server"] == []


async def test_a_closed_simulator_is_freed() -> None:
    """A simulator that served requests and closed is freed (a broker per test, per task);
    aiohttp's cache of middleware chains kept each one, up to 1,024 (about 28 MB)."""
    server = SimulatorServer(SimulatorSettings())
    async with server, aiohttp.ClientSession() as session:
        for path in ("/auth/o2/token", "/paapi5/getitems", "/_sim/stats"):
            async with session.post(server.url + path, data=b"{}") as response:
                await response.read()
    app = weakref.ref(server.app)
    del server
    gc.collect()
    assert app() is None
