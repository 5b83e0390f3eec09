"""The Creators API token endpoints: OAuth2 client-credentials for both credential families.

``/oauth2/token`` is the Cognito-style endpoint of v2.x credentials (form body or HTTP Basic,
scope ``creatorsapi/default``); ``/auth/o2/token`` the Login-with-Amazon-style endpoint of v3.x
credentials (JSON body, scope ``creatorsapi::default``; form bodies and Basic are accepted too,
as protocol.md 2.2 advises a lenient simulator). Each endpoint knows only its own family's
keys. Errors are standard OAuth2 bodies ``{"error", "error_description"}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from aiohttp import web

from broker.simulator.requestbody import read_body

if TYPE_CHECKING:
    from broker.simulator.state import Simulator

__all__ = ["COGNITO_SCOPE", "LWA_SCOPE", "token_endpoint"]

COGNITO_SCOPE = "creatorsapi/default"
LWA_SCOPE = "creatorsapi::default"


class _OAuthError(Exception):
    def __init__(self, error: str, description: str) -> None:
        self.error = error
        self.description = description
        super().__init__(error)


async def token_endpoint(request: web.Request, sim: Simulator, family: str) -> web.Response:
    """Answer one token request for ``family`` (``v2`` Cognito or ``v3`` LWA).

    The ``token_error`` fault answers 503 ``temporarily_unavailable``; ``token_slow`` answers
    normally after ``hang_s`` on the simulator's clock (or at shutdown).
    """
    fault = sim.faults.token_fault()
    if fault is not None:
        sim.stats.faults[fault] += 1
    if fault == "token_error":
        sim.stats.error(None, "temporarily_unavailable")
        return web.json_response(
            {
                "error_description": "The service is temporarily unavailable.",
                "error": "temporarily_unavailable",
            },
            status=503,
        )
    if fault == "token_slow":
        # The body is read before the stall, while the client still waits for it: one
        # that gives up meanwhile (its timeout) has then left nothing to read that fails.
        await request.read()
        await _stall(sim, sim.settings.faults.hang_s)
    try:
        if family == "v2" and request.content_type != "application/x-www-form-urlencoded":
            # Cognito takes a form body only (protocol.md 2.2); LWA is lenient, Cognito not.
            raise _OAuthError(
                "invalid_request", "The request body must be application/x-www-form-urlencoded."
            )
        params = await _read_params(request)
        body = _grant(sim, family, params, request.headers.get("Authorization", ""))
    except _OAuthError as exc:
        status = (
            sim.settings.invalid_client_status
            if exc.error == "invalid_client"
            else sim.settings.oauth_error_status
        )
        sim.stats.error(None, exc.error)
        return web.json_response(
            {"error_description": exc.description, "error": exc.error}, status=status
        )
    return web.json_response(body)


async def _stall(sim: Simulator, seconds: float) -> None:
    """Wait ``seconds`` on the simulator's clock, or until it shuts down."""
    sleeper = asyncio.ensure_future(sim.clock.sleep(seconds))
    waiter = asyncio.ensure_future(sim.stopping.wait())
    try:
        await asyncio.wait((sleeper, waiter), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sleeper, waiter):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _read_params(request: web.Request) -> dict[str, str]:
    raw = await request.read()
    content_type = request.content_type
    text = raw.decode("utf-8", errors="replace")
    form = content_type == "application/x-www-form-urlencoded"
    if content_type == "application/json" or (not form and text.lstrip().startswith("{")):
        data = read_body(text)
        if data is None:
            raise _OAuthError("invalid_request", "The request body is not valid JSON.")
        if not isinstance(data, dict):
            raise _OAuthError("invalid_request", "The request body must be a JSON object.")
        return {str(k): str(v) for k, v in data.items() if v is not None}
    return dict(parse_qsl(text, keep_blank_values=True))


def _basic(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise _OAuthError("invalid_client", "Client authentication failed") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise _OAuthError("invalid_client", "Client authentication failed")
    return client_id, secret


def _grant(
    sim: Simulator, family: str, params: Mapping[str, str], authorization: str
) -> dict[str, object]:
    grant_type = params.get("grant_type")
    if not grant_type:
        raise _OAuthError(
            "invalid_request", "The request is missing a required parameter : grant_type"
        )
    if grant_type != "client_credentials":
        raise _OAuthError(
            "unsupported_grant_type", f"The authorization grant type {grant_type} is not supported"
        )
    basic = _basic(authorization) if authorization else None
    client_id, secret = basic if basic else (params.get("client_id"), params.get("client_secret"))
    if not client_id:
        raise _OAuthError(
            "invalid_request", "The request is missing a required parameter : client_id"
        )
    if not secret:
        raise _OAuthError(
            "invalid_request", "The request is missing a required parameter : client_secret"
        )
    expected_scope = LWA_SCOPE if family == "v3" else COGNITO_SCOPE
    scope = params.get("scope")
    if scope and scope != expected_scope:
        raise _OAuthError("invalid_scope", "The requested scope is invalid, unknown, or malformed.")
    account = sim.accounts.by_id("creators", client_id)
    if (
        account is None
        or account.family != family
        or not hmac.compare_digest(account.secret.encode(), secret.encode())
    ):
        raise _OAuthError("invalid_client", "Client authentication failed")
    lifetime = sim.settings.token_lifetime_s
    token = sim.tokens.issue(account, sim.clock.monotonic(), lifetime)
    # Whole seconds, rounded down: a client trusting expires_in must not meet TokenExpired
    # first (1.5 s told as 2 did); below a second it still says 1.
    expires_in = max(1, math.floor(lifetime))
    if family == "v3":
        return {
            "access_token": token.value,
            "scope": LWA_SCOPE,
            "token_type": "bearer",
            "expires_in": expires_in,
        }
    return {"access_token": token.value, "expires_in": expires_in, "token_type": "Bearer"}
