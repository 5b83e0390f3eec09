"""Keys' shared state: rate, daily count, pauses and circuit, shared by processes and machines.

A key's quota belongs to the Amazon account, not to a process. This package keeps each
key's pacing slot, adaptive rate, daily count, pauses and circuit in a
:class:`KeyStateStore` that every process using the key asks before each send, in one
atomic step. It sits below the engine: it imports neither ``broker.engine`` nor the jobs,
the CLI or the simulator. ``broker.engine.shared_limiter`` puts it behind the engine's
``KeyLimiter`` seam.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from broker.state.model import (
    PROCESS_RECENT_S,
    Decision,
    Feedback,
    KeyLimits,
    ProcessMark,
    StateKey,
    day_number,
)
from broker.state.store import KeyStateStore, KeyView, MemoryStateStore, monotonic_us, wall_us

if TYPE_CHECKING:
    from broker.config import StateConfig

__all__ = [
    "PROCESS_RECENT_S",
    "Decision",
    "Feedback",
    "KeyLimits",
    "KeyStateStore",
    "KeyView",
    "MemoryStateStore",
    "ProcessMark",
    "StateKey",
    "day_number",
    "local_state_path",
    "open_store",
    "process_id",
]


def process_id() -> str:
    """A new id for this process run: ``host:pid:nonce`` (the nonce tells pid reuse apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def open_store(
    config: StateConfig,
    environ: Mapping[str, str] | None = None,
    *,
    now_us: Callable[[], int] = monotonic_us,
    wall: Callable[[], int] = wall_us,
) -> KeyStateStore:
    """Open the store ``[state]`` names.

    ``now_us`` (slots, pauses: the system-wide monotonic clock) and ``wall`` (the daily
    window) are the clocks of the local homes; tests pass their fake clock's. Redis always
    uses its own ``TIME``.

    Raises:
        StateUnavailableError: the SQLite file cannot be opened, or redis-py is missing.
    """
    if config.backend == "memory":
        return MemoryStateStore(now_us, wall)
    if config.backend == "redis":
        from broker.state.redis import RedisStateStore

        assert config.redis_url is not None  # the config parser requires it
        password = None if config.redis_password is None else config.redis_password.reveal()
        return RedisStateStore(config.redis_url, password=password, key_prefix=config.key_prefix)
    from broker.state.sqlite import SqliteStateStore

    return SqliteStateStore(local_state_path(config, environ), now_us=now_us, wall_us=wall)


def local_state_path(config: StateConfig, environ: Mapping[str, str] | None = None) -> Path:
    """The SQLite file of the ``local`` backend: ``[state] path``, else the user's state
    directory's ``keys.sqlite3``."""
    from broker.sqlitewal import state_dir
    from broker.state.sqlite import STATE_FILE

    return config.path if config.path is not None else state_dir(environ) / STATE_FILE
