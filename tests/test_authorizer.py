"""Authorization at dispatch time: bearer tokens (single flight) and SigV4 with a learned offset."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from email.utils import format_datetime

from structlog.testing import capture_logs

from broker.api.base import HttpRequest, RawResponse
from broker.api.oauth import CreatorsTokenCache
from broker.engine.authorizer import BearerAuthorizer, SigV4Authorizer
from broker.errors import ApiError, AuthError
from broker.models import Secret
from broker.testing import FakeClock, settle

SECRET = "very-secret-value"
URL = "https://creators.test/catalog/v1/getItems"
TARGET = "com.amazon.paapi5.v1.ProductAdvertisingAPIv1.GetItems"


def _request() -> HttpRequest:
    return HttpRequest("POST", URL, {"content-type": "application/json"}, b"{}")


class _TokenEndpoint:
    """Answers token requests with tok1, tok2, ...; held until ``gate`` opens."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, request: HttpRequest) -> RawResponse:
        self.calls += 1
        await self.gate.wait()
        body = {"access_token": f"tok{self.calls}", "expires_in": 3600, "token_type": "bearer"}
        return RawResponse(200, {}, json.dumps(body).encode())


def _bearer(endpoint: _TokenEndpoint, version: str = "3.1") -> BearerAuthorizer:
    return BearerAuthorizer(
        CreatorsTokenCache(
            "client-id",
            Secret(SECRET),
            version,
            token_url="https://creators.test/auth/o2/token",
            send=endpoint,
            clock=FakeClock(),
        )
    )


class TestBearer:
    """Creators API tokens."""

    async def test_header(self) -> None:
        """A 3.x token goes alone; a 2.x token carries its version."""
        assert (await _bearer(_TokenEndpoint()).authorize(_request(), region="x")).headers[
            "Authorization"
        ] == "Bearer tok1"
        v2 = await _bearer(_TokenEndpoint(), "2.1").authorize(_request(), region="x")
        assert v2.headers["Authorization"] == "Bearer tok1, Version 2.1"

    async def test_single_flight(self) -> None:
        """Many requests authorized at once share one token request."""
        endpoint = _TokenEndpoint()
        endpoint.gate.clear()
        authorizer = _bearer(endpoint)
        tasks = [
            asyncio.get_running_loop().create_task(authorizer.authorize(_request(), region="x"))
            for _ in range(5)
        ]
        await settle()
        endpoint.gate.set()
        signed = await asyncio.gather(*tasks)
        assert endpoint.calls == 1
        assert {r.headers["Authorization"] for r in signed} == {"Bearer tok1"}

    async def test_recover_token_expired_once(self) -> None:
        """TokenExpired from several requests with the same token: one refresh."""
        endpoint = _TokenEndpoint()
        authorizer = _bearer(endpoint)
        sent = [await authorizer.authorize(_request(), region="x") for _ in range(3)]
        expired = AuthError("TokenExpired", "expired", status=401)
        assert all(authorizer.recover(expired, request) for request in sent)
        fresh = await authorizer.authorize(_request(), region="x")
        assert fresh.headers["Authorization"] == "Bearer tok2"
        assert endpoint.calls == 2

    async def test_other_codes_not_recovered(self) -> None:
        """An error a new token cannot fix is not 'recovered'."""
        authorizer = _bearer(_TokenEndpoint())
        request = await authorizer.authorize(_request(), region="x")
        assert not authorizer.recover(AuthError("InvalidClient", "no", status=401), request)

    async def test_repr_hides_secrets(self) -> None:
        """Neither the secret nor the token appears in the repr."""
        authorizer = _bearer(_TokenEndpoint())
        await authorizer.authorize(_request(), region="x")
        assert SECRET not in repr(authorizer)
        assert "tok1" not in repr(authorizer)


class TestSigV4:
    """PA-API signatures taken at send time, with the server's clock once learned."""

    def _paapi(self) -> HttpRequest:
        return HttpRequest(
            "POST",
            "https://paapi.test/paapi5/getitems",
            {
                "host": "webservices.amazon.com",
                "content-type": "application/json; charset=utf-8",
                "x-amz-target": TARGET,
            },
            b'{"ItemIds":["B000000001"]}',
        )

    async def test_signs_with_clock_now(self) -> None:
        """x-amz-date is the clock's wall time when authorize runs (not when queued)."""
        clock = FakeClock()
        authorizer = SigV4Authorizer("AKID", Secret(SECRET), clock=clock)
        await clock.advance(90)
        signed = await authorizer.authorize(self._paapi(), region="us-east-1")
        assert signed.headers["x-amz-date"] == clock.utcnow().strftime("%Y%m%dT%H%M%SZ")
        assert signed.headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKID/")
        assert SECRET not in signed.headers["Authorization"]

    async def test_request_expired_learns_offset(self) -> None:
        """RequestExpired with the server's Date teaches the offset; later signatures use it."""
        clock = FakeClock()
        authorizer = SigV4Authorizer("AKID", Secret(SECRET), clock=clock)
        request = await authorizer.authorize(self._paapi(), region="us-east-1")
        server_now = clock.utcnow() + timedelta(minutes=20)
        error = AuthError(
            "RequestExpired",
            "too old",
            status=401,
            server_date=format_datetime(server_now, usegmt=True),
        )
        with capture_logs() as logs:
            assert authorizer.recover(error, request)
            assert authorizer.recover(error, request)
        assert authorizer.clock_offset_s == 1200
        # Said once, as a warning naming the offset: it showed only as credentials refreshed.
        (told,) = [e for e in logs if e["event"] == "broker.clock_offset"]
        assert (told["log_level"], told["offset_s"]) == ("warning", 1200)
        again = await authorizer.authorize(self._paapi(), region="us-east-1")
        assert again.headers["x-amz-date"] == server_now.strftime("%Y%m%dT%H%M%SZ")
        assert "clock_offset_s=1200" in repr(authorizer)

    async def test_no_date_re_signs_without_learning(self) -> None:
        """RequestExpired without a usable Date header is still re-signed with the current
        time and resent (protocol.md: "re-sign with the current time and resend once"; a
        request held up on its way expires too), but no offset is learned; another code is
        not recovered."""
        authorizer = SigV4Authorizer("AKID", Secret(SECRET), clock=FakeClock())
        request = self._paapi()
        assert authorizer.recover(AuthError("RequestExpired", "x", status=401), request)
        assert authorizer.recover(
            AuthError("RequestExpired", "x", status=401, server_date="yesterday-ish"), request
        )
        assert not authorizer.recover(
            ApiError(
                "InvalidSignature", "x", status=401, server_date="Fri, 01 May 2026 12:20:00 GMT"
            ),
            request,
        )
        assert authorizer.clock_offset_s == 0
        assert SECRET not in repr(authorizer)
