"""An independent SigV4 implementation (botocore) against the simulated PA-API.

Requests signed by ``botocore.auth.SigV4Auth`` (service ProductAdvertisingAPI, the region of
the host) must be accepted, and the same requests signed with a wrong secret rejected with
InvalidSignature, over many random bodies, header sets and marketplaces.
"""

from __future__ import annotations

import json
import random
import string

import aiohttp
import pytest
from botocore.auth import SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.credentials import Credentials  # type: ignore[import-untyped]

from broker.simulator.render import PAAPI_ITEM_RESOURCES
from broker.simulator.server import SimulatorServer
from broker.simulator.settings import SimulatorSettings

HOSTS = [
    ("webservices.amazon.com", "us-east-1", "www.amazon.com", "demo-20"),
    ("webservices.amazon.co.uk", "eu-west-1", "www.amazon.co.uk", "demo-21"),
    ("webservices.amazon.de", "eu-west-1", "www.amazon.de", "demo-22"),
]
OPERATIONS = {"GetItems": "getitems", "SearchItems": "searchitems"}
CASES = 50


def _random_request(rng: random.Random) -> tuple[str, str, str, dict[str, str], bytes]:
    """(operation, host, region, headers, body) for one random but valid PA-API call."""
    host, region, marketplace, tag = rng.choice(HOSTS)
    operation = rng.choice(list(OPERATIONS))
    body: dict[str, object] = {"PartnerTag": tag, "PartnerType": "Associates"}
    if rng.random() < 0.5:
        body["Marketplace"] = marketplace
    resources = sorted(rng.sample(sorted(PAAPI_ITEM_RESOURCES), rng.randint(0, 8)))
    if resources:
        body["Resources"] = resources
    if operation == "GetItems":
        body["ItemIds"] = [
            "B0" + "".join(rng.choices(string.ascii_uppercase + string.digits, k=8))
            for _ in range(rng.randint(1, 10))
        ]
    else:
        body["Keywords"] = " ".join(rng.choices(["lamp", "usb", "café", "kettle", "tea"], k=3))
    style = rng.randrange(3)
    if style == 0:
        text = json.dumps(body)
    elif style == 1:
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    else:
        text = json.dumps(body, indent=rng.randint(1, 4), sort_keys=True)
    headers = {
        "host": host,
        "content-type": "application/json; charset=utf-8",
        "content-encoding": "amz-1.0",
        "x-amz-target": f"com.amazon.paapi5.v1.ProductAdvertisingAPIv1.{operation}",
    }
    for _ in range(rng.randint(0, 3)):
        name = "x-test-" + "".join(rng.choices(string.ascii_lowercase, k=5))
        value = " ".join(
            "".join(rng.choices(string.ascii_letters + string.digits + "-_/", k=6))
            for _ in range(rng.randint(1, 3))
        )
        headers[name] = value + "  " * rng.randint(0, 1)
    if rng.random() < 0.5:
        headers = {k.title() if rng.random() < 0.5 else k: v for k, v in headers.items()}
    return operation, host, region, headers, text.encode()


def _sign(
    url: str, headers: dict[str, str], body: bytes, region: str, secret: str
) -> dict[str, str]:
    request = AWSRequest(method="POST", url=url, data=body, headers=headers)
    signer = SigV4Auth(Credentials("DEMOACCESSKEY", secret), "ProductAdvertisingAPI", region)
    signer.add_auth(request)
    return dict(request.headers.items())


@pytest.mark.parametrize("wrong_secret", [False, True], ids=["right-secret", "wrong-secret"])
async def test_botocore_signatures(wrong_secret: bool) -> None:
    """botocore-signed requests pass; the same signed with a wrong secret are InvalidSignature."""
    rng = random.Random(20260501)
    secret = "not-the-secret" if wrong_secret else "demo-secret-key"
    settings = SimulatorSettings(limits=False)
    async with SimulatorServer(settings) as server, aiohttp.ClientSession() as session:
        for _ in range(CASES):
            operation, _host, region, headers, body = _random_request(rng)
            url = f"{server.url}/paapi5/{OPERATIONS[operation]}"
            signed = _sign(url, headers, body, region, secret)
            async with session.post(url, data=body, headers=signed) as response:
                payload = await response.json(content_type=None)
                if wrong_secret:
                    assert response.status == 401, payload
                    assert payload["__type"] == "com.amazon.paapi5#InvalidSignatureException"
                    assert payload["Errors"][0]["Code"] == "InvalidSignature"
                else:
                    assert response.status == 200, payload
        accepted = server.stats.accounts["demo-paapi"].accepted
        assert accepted == (0 if wrong_secret else CASES)
