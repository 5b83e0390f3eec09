"""No secret, token or signature in any repr, exception message or structlog event."""

from __future__ import annotations

import json
import re
import traceback
from collections.abc import Mapping

import pytest
from conftest import Harness, account, asins, key_doc, make_config, paapi_key_doc
from structlog.testing import capture_logs

from broker.errors import NoUsableKeyError
from broker.simulator.settings import FaultRates, SimulatorSettings

GOOD_SECRET = "G00D-s3cret-value-123"
BAD_SECRET = "BAD-s3cret-value-456"
ENVIRON = {"GOOD": GOOD_SECRET, "BAD": BAD_SECRET}
FAULTS = FaultRates(error_500=0.1, reset=0.1, truncated=0.1)


def _leaks(text: str, needles: set[str]) -> set[str]:
    return {needle for needle in needles if needle and needle in text}


@pytest.mark.parametrize("protocol", ["creators", "paapi5"])
async def test_nothing_secret_escapes(harness: Harness, protocol: str) -> None:
    """A run with retries, a refused key and captured logs never shows a credential."""
    paapi = protocol == "paapi5"
    accounts = (
        account(
            "good",
            "GOODID",
            GOOD_SECRET,
            **({"protocol": "paapi5", "version": ""} if paapi else {}),
        ),
        account(
            "bad",
            "BADID",
            "the-real-bad-secret",
            **({"protocol": "paapi5", "version": ""} if paapi else {}),
        ),
    )
    sim = await harness.simulator(
        SimulatorSettings(limits=False, seed=5, faults=FAULTS, accounts=accounts)
    )
    make_key = paapi_key_doc if paapi else key_doc
    keys = [
        make_key("good", credential_id="GOODID", env="GOOD"),
        make_key("bad", credential_id="BADID", env="BAD"),
    ]
    config = make_config(
        sim.url, protocol=protocol, keys=keys, environ=ENVIRON, retry={"max_attempts": 20}
    )
    transport = await harness.transport()
    with capture_logs() as logs:
        broker = await harness.broker(config, transport=transport)
        results = await broker.get_items(asins(120))
    assert all(result.ok for result in results)
    assert any(e["event"] == "broker.key_disabled" for e in logs)
    assert any(e["event"] == "broker.retry_scheduled" for e in logs)

    needles = {GOOD_SECRET, BAD_SECRET}
    for request in transport.requests:
        authorization = request.headers.get("Authorization", "")
        needles.update(re.findall(r"Signature=([0-9a-f]+)", authorization))
        if authorization.startswith("Bearer "):
            needles.add(authorization.removeprefix("Bearer ").split(",")[0])
    for request, response in zip(transport.requests, transport.responses, strict=False):
        if "/token" in request.url and response.status == 200:
            needles.add(json.loads(response.body)["access_token"])
    assert len(needles) > 2  # tokens or signatures were really collected

    assert not _leaks(repr(logs), needles)
    assert not _leaks(repr(broker) + repr(config) + repr(broker.config.keys), needles)
    assert not _leaks(repr(broker._keys) + repr(broker.metrics()), needles)
    assert not _leaks(repr([r.to_json() for r in results]), needles)
    assert not _leaks(repr(transport.requests), needles)


async def test_no_usable_key_message_has_no_secret(harness: Harness) -> None:
    """Every key refused: the exception and its failures name keys and codes, not secrets."""
    sim = await harness.simulator(SimulatorSettings(limits=False))
    keys = [
        key_doc("one", env="BAD"),
        key_doc("two", credential_id="demo-v2-id", env="GOOD", version="2.1"),
    ]
    broker = await harness.broker(make_config(sim.url, keys=keys, environ=ENVIRON))
    with capture_logs() as logs, pytest.raises(NoUsableKeyError) as info:
        await broker.get_items(asins(20))
    text = str(info.value) + repr(info.value) + repr(info.value.failures) + repr(logs)
    assert "one: invalid_client" in text
    assert "two: invalid_client" in text
    assert not _leaks(text, {GOOD_SECRET, BAD_SECRET})


def _frame_values(error: BaseException) -> list[str]:
    """What an error reporter that records locals (Sentry) takes from ``error``: the value
    of every local of every frame of every exception its chain holds, as it shows them."""
    shown: list[str] = []
    pending, seen = [error], set()
    while pending:
        each = pending.pop()
        if id(each) in seen:
            continue
        seen.add(id(each))
        for frame, _ in traceback.walk_tb(each.__traceback__):
            if frame.f_code.co_filename == __file__:
                continue  # the test's own frame, where it was caught
            for value in frame.f_locals.values():
                shown.append(repr(value))
                if isinstance(value, bytes | bytearray):
                    shown.append(bytes(value).decode("utf-8", "replace"))
                elif isinstance(value, Mapping):
                    shown.extend(repr(v) for v in value.values())
        pending.extend(e for e in (each.__cause__, each.__context__) if e is not None)
    return shown


@pytest.mark.parametrize("protocol", ["creators", "paapi5"])
async def test_a_caught_error_holds_no_secret_in_its_frames(
    harness: Harness, protocol: str
) -> None:
    """An endpoint out of reach: the NoUsableKeyError a caller catches holds the secret in
    no local of any frame of its chain; aiohttp's frames, kept by the chained connection
    error, held the token request's body (client_secret) or the signed headers, and Sentry
    uploads every frame's locals by default."""
    from broker.state.redis_server import free_port

    make_key = paapi_key_doc if protocol == "paapi5" else key_doc
    config = make_config(
        f"http://127.0.0.1:{free_port()}",
        protocol=protocol,
        keys=[make_key("good", env="GOOD")],
        environ=ENVIRON,
        retry={"outage_budget_s": 0.5},
    )
    transport = await harness.transport()
    broker = await harness.broker(config, transport=transport)
    with pytest.raises(NoUsableKeyError) as info:
        await broker.get_items(asins(3))
    needles = {GOOD_SECRET}
    for request in transport.requests:
        needles.update(
            re.findall(r"Signature=([0-9a-f]+)", request.headers.get("Authorization", ""))
        )
    assert len(needles) >= (2 if protocol == "paapi5" else 1)  # signed requests were made
    shown = _frame_values(info.value)
    assert shown  # frames were walked
    assert not [value for value in shown if _leaks(value, needles)]
