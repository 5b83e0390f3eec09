"""OAuth2 access tokens of the simulated Creators API: issue, and resolve a bearer value.

A token is an opaque random string bound to (account, family, version, expiry on the
simulator's monotonic clock). Cognito-family (v2.x) tokens look like JWTs (``eyJ...``) and
Login-with-Amazon (v3.x) tokens like ``Atc|...``, as Amazon's do, but carry no meaning.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.simulator.accounts import Account

__all__ = ["IssuedToken", "TokenStore"]

# Expired tokens are purged when the store passes this size, so a long benchmark that fetches
# many tokens cannot grow memory without bound.
_PURGE_AT = 10_000


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """One access token and what it is bound to."""

    value: str
    account: Account
    expires_at: float

    @property
    def family(self) -> str:
        """``v2`` or ``v3``, the credential family that obtained it."""
        return self.account.family

    @property
    def version(self) -> str:
        """The credential version (``2.1`` .. ``3.3``) that obtained it."""
        return self.account.version


class TokenStore:
    """The tokens issued so far, by value."""

    __slots__ = ("_tokens",)

    def __init__(self) -> None:
        self._tokens: dict[str, IssuedToken] = {}

    def issue(self, account: Account, now: float, lifetime_s: float) -> IssuedToken:
        """Create a token for ``account`` valid for ``lifetime_s`` from monotonic ``now``."""
        if len(self._tokens) >= _PURGE_AT:
            self._tokens = {k: t for k, t in self._tokens.items() if t.expires_at > now}
        body = secrets.token_urlsafe(48)
        value = ("eyJ" + body) if account.family == "v2" else ("Atc|" + body)
        token = IssuedToken(value, account, now + lifetime_s)
        self._tokens[value] = token
        return token

    def find(self, value: str) -> IssuedToken | None:
        """The token with this value (expired or not), or None if never issued."""
        return self._tokens.get(value)
