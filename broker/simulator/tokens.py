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

# Expired tokens are purged when the store passes this size (then twice what a purge left),
# so a long benchmark that fetches many tokens cannot grow memory without bound; tokens
# still alive are kept for their hour, as Amazon's are.
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

    __slots__ = ("_purge_at", "_sweep_at", "_tokens")

    def __init__(self) -> None:
        self._tokens: dict[str, IssuedToken] = {}
        self._purge_at = _PURGE_AT
        self._sweep_at = 0.0

    def issue(self, account: Account, now: float, lifetime_s: float) -> IssuedToken:
        """Create a token for ``account`` valid for ``lifetime_s`` from monotonic ``now``."""
        big = len(self._tokens) >= _PURGE_AT
        if len(self._tokens) >= self._purge_at or (big and now >= self._sweep_at):
            self._tokens = {k: t for k, t in self._tokens.items() if t.expires_at > now}
            # Those alive stay: the next purge waits until the store has doubled, or one
            # that frees nothing (a token asked per call) came again at every token; or
            # until those alive now have expired, so a spike's tokens do not linger.
            self._purge_at = max(_PURGE_AT, 2 * len(self._tokens))
            self._sweep_at = now + lifetime_s
        body = secrets.token_urlsafe(48)
        value = ("eyJ" + body) if account.family == "v2" else ("Atc|" + body)
        token = IssuedToken(value, account, now + lifetime_s)
        self._tokens[value] = token
        return token

    def find(self, value: str) -> IssuedToken | None:
        """The token with this value (expired or not), or None if never issued."""
        return self._tokens.get(value)
