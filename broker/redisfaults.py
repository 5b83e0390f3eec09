"""What a Redis reply means to the broker: a refusal the config must mend, not an outage;
and a cancel redis-py lost.

Both Redis homes (the key state, ``[state]``, and the item cache, ``[cache]``) meet the same
refusals; waiting mends none of them, so each is told as a config error with what to do.
redis-py is an optional extra: it is imported when a reply is judged, never before.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    from redis.asyncio.retry import Retry

__all__ = [
    "ReconnectOptions",
    "barred",
    "cancel_kept",
    "cluster_node",
    "grant",
    "no_database",
    "read_only",
    "reconnect_once",
    "refused_credentials",
]

#: The first words of the replies that only a Redis Cluster node gives.
_CLUSTER_REPLIES = frozenset({"MOVED", "ASK", "CROSSSLOT", "CLUSTERDOWN", "TRYAGAIN"})


class cancel_kept:  # a context manager named as the function it replaced
    """Around an await that may reach Redis: a cancel of the task requested meanwhile that
    the await did not raise is raised as it ends, in place of what it returned or raised.

    redis-py sends each command under ``asyncio.wait_for``, which on Python 3.11 loses a
    cancel that lands as the send completes: the call returns (or raises the send's own
    error, a reset socket at shutdown) as if none came, and the task runs on (a key's
    keep-alive beat for ever, and the broker's close waited for it; a caller's timeout never
    fired). Whatever the call did at the store stands, as for a cancel landing a moment
    later.

    A class rather than a ``contextlib.contextmanager`` generator: it is entered around
    every key-state decision, once per send, and a generator-based manager costs several
    Python calls more each time.
    """

    __slots__ = ("_cancels", "_task")

    def __init__(self) -> None:
        self._task = task = asyncio.current_task()
        self._cancels = 0 if task is None else task.cancelling()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        task = self._task
        if task is None or task.cancelling() <= self._cancels:
            return
        if exc is None:
            raise asyncio.CancelledError
        if isinstance(exc, Exception):
            raise asyncio.CancelledError from exc
        # Any other BaseException (a cancel itself) goes on as it is.


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


def grant(rights: str) -> str:
    """What to do for a user :func:`barred` a command: the ACL ``rights`` a store needs on
    its keys, and ``+select`` with a database other than 0 (redis-py selects it first)."""
    return (
        f"grant it {rights} on the key prefix's keys (and +select for a database other than "
        "/0 in the URL), or use another user"
    )


class ReconnectOptions(TypedDict):
    """Keyword arguments of ``redis.asyncio.Redis.from_url`` (see :func:`reconnect_once`)."""

    retry: Retry
    retry_on_error: list[type[Exception]]


def reconnect_once() -> ReconnectOptions:
    """redis-py client options for one retry of a command on a fresh connection when the
    pooled one turns out dead, never after a timeout.

    A pooled connection dies with a restarted Redis: without the retry the first command
    after a restart failed with Redis up again (the key state took a key out for it; the
    item cache was left alone for a minute). redis-py's own default retries timeouts too:
    a hung Redis held each call twice its timeout, and one that was only slow ran a
    command twice.
    """
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    return ReconnectOptions(
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        retry_on_error=[RedisConnectionError],
    )


def no_database(exc: BaseException) -> bool:
    """True when the URL's database (``/N``, ``?db=N``) is one the server does not have."""
    from redis.exceptions import ResponseError

    return isinstance(exc, ResponseError) and "DB index" in str(exc)


def cluster_node(exc: BaseException) -> bool:
    """True for a reply only a Redis Cluster node gives: a key redirected (``MOVED``,
    ``ASK``), keys of one call in several slots (``CROSSSLOT``), slots not served
    (``CLUSTERDOWN``), a slot being moved (``TRYAGAIN``). redis-py 5 gives these as
    exceptions of their own whose text has lost the first word; before 5.1, ``MOVED`` is a
    plain ``ResponseError``."""
    from redis.exceptions import (
        AskError,
        ClusterCrossSlotError,
        ClusterDownError,
        MasterDownError,
        ResponseError,
        TryAgainError,
    )

    if isinstance(exc, MasterDownError):
        return False  # MASTERDOWN: a replica that lost its primary, no cluster
    if isinstance(exc, AskError | ClusterDownError | ClusterCrossSlotError | TryAgainError):
        return True
    return isinstance(exc, ResponseError) and str(exc).split(" ", 1)[0] in _CLUSTER_REPLIES


def read_only(exc: BaseException) -> str | None:
    """Why a Redis that is up refuses writes: ``"replica"`` (a read-only replica),
    ``"memory"`` (out of memory under ``maxmemory-policy noeviction``), else None."""
    from redis.exceptions import OutOfMemoryError, ReadOnlyError

    if isinstance(exc, ReadOnlyError):
        return "replica"
    if isinstance(exc, OutOfMemoryError):
        return "memory"
    return None
