"""A small raw-HTTP client of the simulator, for its own tests and the broker's end-to-end tests.

It speaks the wire formats directly (no broker code), so tests can send exactly the request
they mean, including wrong ones: a token from either endpoint, a Creators call with any
Authorization header, or a PA-API call signed (or mis-signed) with SigV4 for any host.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from hashlib import sha256
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import aiohttp

from broker.api.sigv4 import (
    SERVICE,
    authorization_header,
    canonical_request,
    credential_scope,
    derive_signing_key,
    signature,
    string_to_sign,
)
from broker.simulator.app import SIMULATOR_KEY
from broker.simulator.marketplaces import MARKETPLACES_BY_HOST
from broker.simulator.server import SimulatorServer

if TYPE_CHECKING:
    from broker.clock import Clock
    from broker.simulator.settings import SimulatorSettings
    from broker.simulator.state import Simulator

__all__ = ["SimResponse", "SimulatorClient", "running_simulator"]

_TARGET = "com.amazon.paapi5.v1.ProductAdvertisingAPIv1."


@dataclass(frozen=True, slots=True)
class SimResponse:
    """One answer: status, headers (lower-case names) and the body as text and JSON."""

    status: int
    headers: Mapping[str, str]
    text: str

    def json(self) -> Any:
        """The body parsed as JSON (``Any``: this is the JSON boundary, tests index freely)."""
        return json.loads(self.text)


class SimulatorClient:
    """Raw requests against a simulator at ``base_url`` over ``session``."""

    __slots__ = ("_base", "_session")

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self._base = base_url.rstrip("/")
        self._session = session

    async def post(
        self, path: str, *, data: bytes | str = b"", headers: Mapping[str, str] | None = None
    ) -> SimResponse:
        """POST raw ``data`` to ``path`` with exactly ``headers`` (plus aiohttp's defaults)."""
        async with self._session.post(
            self._base + path, data=data, headers=dict(headers or {})
        ) as response:
            text = await response.text()
            return SimResponse(
                response.status, {k.lower(): v for k, v in response.headers.items()}, text
            )

    async def get(self, path: str) -> SimResponse:
        """GET ``path``."""
        async with self._session.get(self._base + path) as response:
            return SimResponse(
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                await response.text(),
            )

    async def token_response(
        self, client_id: str, secret: str, *, family: str = "v3", style: str | None = None
    ) -> SimResponse:
        """Ask a token endpoint; ``style`` is ``json``, ``form`` or ``basic`` (per family)."""
        style = style or ("json" if family == "v3" else "form")
        scope = "creatorsapi::default" if family == "v3" else "creatorsapi/default"
        path = "/auth/o2/token" if family == "v3" else "/oauth2/token"
        fields = {"grant_type": "client_credentials", "scope": scope}
        headers: dict[str, str] = {}
        if style == "basic":
            pair = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
            headers["Authorization"] = f"Basic {pair}"
        else:
            fields.update(client_id=client_id, client_secret=secret)
        if style == "json":
            headers["Content-Type"] = "application/json"
            return await self.post(path, data=json.dumps(fields), headers=headers)
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        return await self.post(path, data=urlencode(fields), headers=headers)

    async def token(
        self, client_id: str = "demo-id", secret: str = "demo-secret", *, family: str = "v3"
    ) -> str:
        """Return a fresh access token (raises AssertionError if the endpoint refuses)."""
        response = await self.token_response(client_id, secret, family=family)
        assert response.status == 200, response.text
        value = response.json()["access_token"]
        assert isinstance(value, str)
        return value

    async def creators(
        self,
        operation: str,
        body: object,
        *,
        token: str | None,
        version: str | None = None,
        marketplace: str | None = "www.amazon.com",
        raw: bytes | None = None,
    ) -> SimResponse:
        """Call ``/catalog/v1/<operation>``; ``version`` adds ``, Version x.y`` to the header."""
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}" + (
                f", Version {version}" if version else ""
            )
        if marketplace is not None:
            headers["x-marketplace"] = marketplace
        data = raw if raw is not None else json.dumps(body).encode()
        return await self.post(f"/catalog/v1/{operation}", data=data, headers=headers)

    async def paapi(
        self,
        operation: str,
        body: object,
        *,
        access_key: str = "DEMOACCESSKEY",
        secret: str = "demo-secret-key",
        host: str = "webservices.amazon.com",
        now: datetime | None = None,
        region: str | None = None,
        target: str | None = None,
        service: str = SERVICE,
        raw: bytes | None = None,
        extra_headers: Mapping[str, str] | None = None,
        signed: tuple[str, ...] | None = None,
        authorization: str | None = None,
        send: bytes | None = None,
        tight_separators: bool = False,
        query: str = "",
        scope_date: str | None = None,
    ) -> SimResponse:
        """Call ``/paapi5/<operation lower-case>`` signed with SigV4 as SDK-P does.

        Args:
            operation: e.g. ``GetItems``.
            body: the JSON body (ignored when ``raw`` is given).
            access_key: the access key to sign with.
            secret: the secret to sign with (a wrong one makes a bad signature).
            host: the Host header (chooses the marketplace).
            now: the signing time (default: the real UTC time).
            region: the SigV4 region (default: the host's).
            target: the X-Amz-Target (default: the operation's).
            service: the SigV4 service name.
            raw: exact body bytes to send.
            extra_headers: more headers (signed too, unless ``signed`` says otherwise).
            signed: the header names to sign (default: all that are sent).
            authorization: send this Authorization value instead of signing.
            send: send these bytes instead of the signed ones (a tampered body).
            tight_separators: join the Authorization parts with "," instead of ", ".
            query: a query string, sent as given and signed (PA-API sends none).
            scope_date: the credential scope's YYYYMMDD, and the signing key's (default:
                the X-Amz-Date's day; another is refused however consistently signed).
        """
        when = now or datetime.now(UTC)
        amz_date = when.strftime("%Y%m%dT%H%M%SZ")
        data = raw if raw is not None else json.dumps(body).encode()
        headers = {
            "host": host,
            "content-type": "application/json; charset=utf-8",
            "content-encoding": "amz-1.0",
            "x-amz-date": amz_date,
            "x-amz-target": target if target is not None else _TARGET + operation,
        }
        headers.update(extra_headers or {})
        if authorization is None:
            market = MARKETPLACES_BY_HOST.get(host.partition(":")[0])
            scope_region = region or (market.region if market else "us-east-1")
            names = signed or tuple(headers)
            day = scope_date or amz_date[:8]
            scope = credential_scope(day, scope_region, service)
            creq = canonical_request(
                "POST",
                f"/paapi5/{operation.lower()}",
                query,
                headers,
                names,
                sha256(data).hexdigest(),
            )
            key = derive_signing_key(secret, day, scope_region, service)
            sig = signature(key, string_to_sign(amz_date, scope, creq))
            authorization = authorization_header(access_key, scope, names, sig)
            if tight_separators:
                authorization = authorization.replace(", ", ",")
        headers["Authorization"] = authorization
        sent = send if send is not None else data
        path = f"/paapi5/{operation.lower()}" + (f"?{query}" if query else "")
        return await self.post(path, data=sent, headers=headers)


@contextlib.asynccontextmanager
async def running_simulator(
    settings: SimulatorSettings | None = None, *, clock: Clock | None = None
) -> AsyncIterator[tuple[SimulatorClient, Simulator]]:
    """Run a simulator on a free loopback port; yield a client of it and its live state."""
    async with SimulatorServer(settings, clock=clock) as server, aiohttp.ClientSession() as s:
        yield SimulatorClient(server.url, s), server.app[SIMULATOR_KEY]
