"""What a Redis reply means to the broker: a refusal the config must mend, not an outage.

Both Redis homes (the key state, ``[state]``, and the item cache, ``[cache]``) meet the same
refusals; waiting mends none of them, so each is told as a config error with what to do.
redis-py is an optional extra: it is imported when a reply is judged, never before.
"""

from __future__ import annotations

__all__ = ["barred", "refused_credentials"]


def refused_credentials(exc: BaseException) -> bool:
    """True for Redis refusing the connection's password: none given, or a wrong one.

    redis-py raises ``NOAUTH`` and ``WRONGPASS`` as ``AuthenticationError``; an older one
    (5.0) sends a script call unauthenticated, and a Redis that wants a password refuses
    its size instead: a ``ResponseError`` saying "unauthenticated".
    """
    from redis.exceptions import AuthenticationError, ResponseError

    return isinstance(exc, AuthenticationError) or (
        isinstance(exc, ResponseError) and "unauthenticated" in str(exc)
    )


def barred(exc: BaseException) -> bool:
    """True for an ACL that bars a command the broker runs (``NOPERM``, or Redis's "can't
    run this command" for a script's own commands)."""
    from redis.exceptions import NoPermissionError, ResponseError

    text = str(exc)
    return isinstance(exc, NoPermissionError) or (
        isinstance(exc, ResponseError)
        and (text.startswith("NOPERM") or "can't run this command" in text)
    )
