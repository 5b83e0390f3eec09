"""The ``KeyStateStore`` seam, and its in-memory home for tests and single-process use.

Three homes implement it: :class:`MemoryStateStore` (this process only),
:class:`broker.state.sqlite.SqliteStateStore` (every process of this machine, the default)
and :class:`broker.state.redis.RedisStateStore` (every machine).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from broker.state.decision import Record, decide
from broker.state.model import Decision, Feedback, KeyLimits, ProcessMark, StateKey

__all__ = ["KeyStateStore", "KeyView", "MemoryStateStore", "boot_epoch", "monotonic_us", "wall_us"]


def wall_us() -> int:
    """The machine's wall clock in integer microseconds (the local stores' daily window)."""
    return time.time_ns() // 1000


def monotonic_us() -> int:
    """The machine's monotonic clock in µs (the local stores' slots: one for all processes).

    ``CLOCK_MONOTONIC`` is system-wide on Linux and macOS and never jumps with the wall
    clock, so pacing ignores NTP steps; it restarts at boot, which :func:`boot_epoch` tells.
    """
    return time.monotonic_ns() // 1000


def boot_epoch() -> str:
    """The machine's boot id (Linux), so state written before a reboot is recognised."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return ""


@dataclass(frozen=True, slots=True)
class KeyView:
    """A key's shared state as ``broker status`` shows it: a decision that reserved nothing."""

    key: StateKey
    limits: KeyLimits
    decision: Decision
    #: the store holds a record of the key (False: no broker has used it there, and the
    #: decision is a fresh key's: the figures are the config's, not anyone's use)
    stored: bool = True


class KeyStateStore(Protocol):
    """Protocol: where keys' shared state lives; every call is one atomic step.

    - ``await decide(key, limits, feedback=..., reserve=..., process=...)`` applies the
      feedback, and with ``reserve`` reserves the next slot and counts the day, all at
      once, and returns the :class:`Decision`. One call per send; feedback rides along.
    - ``await view(key, limits)`` reads the key's state without reserving or registering.
    - ``backend`` names the home (``"memory"``, ``"local"``, ``"redis"``); ``where`` says
      where it lives (a path, or a URL without credentials) for messages.
    - ``await aclose()`` releases connections.

    Raises:
        StateUnavailableError: (from every call) the store cannot be reached; nothing was
            reserved or applied, and the caller must not send.
    """

    @property
    def backend(self) -> str: ...

    @property
    def where(self) -> str: ...

    async def decide(
        self,
        key: StateKey,
        limits: KeyLimits,
        *,
        feedback: Feedback,
        reserve: bool,
        process: ProcessMark | None,
    ) -> Decision: ...

    async def view(self, key: StateKey, limits: KeyLimits) -> KeyView: ...

    async def aclose(self) -> None: ...


class MemoryStateStore:
    """A :class:`KeyStateStore` in a dict: shared by the limiters of one process only.

    Args:
        now_us: the clock of slots and pauses in µs (monotonic); tests pass a fake.
        wall_us: the wall clock in µs, for the daily window.
    """

    __slots__ = ("_now_us", "_records", "_wall_us")

    def __init__(
        self,
        now_us: Callable[[], int] = monotonic_us,
        wall_us: Callable[[], int] = wall_us,
    ) -> None:
        self._now_us = now_us
        self._wall_us = wall_us
        self._records: dict[str, Record] = {}

    @property
    def backend(self) -> str:
        """``"memory"``."""
        return "memory"

    @property
    def where(self) -> str:
        """``"this process"``."""
        return "this process"

    async def decide(
        self,
        key: StateKey,
        limits: KeyLimits,
        *,
        feedback: Feedback,
        reserve: bool,
        process: ProcessMark | None,
    ) -> Decision:
        """Apply feedback and optionally reserve a send (see :class:`KeyStateStore`)."""
        record = self._records.get(key.digest)
        if record is None:
            # Not setdefault: that would build a throwaway Record on every decision.
            record = self._records[key.digest] = Record()
        return decide(
            record,
            self._now_us(),
            limits,
            feedback=feedback,
            reserve=reserve,
            process=process,
            wall=self._wall_us(),
        )

    async def view(self, key: StateKey, limits: KeyLimits) -> KeyView:
        """Read the key's state; a key never seen reads as fresh (nothing is stored)."""
        stored = key.digest in self._records
        record = Record.from_json(self._records.get(key.digest, Record()).to_json())
        record.processes = dict(record.processes)
        decision = decide(
            record,
            self._now_us(),
            limits,
            feedback=Feedback(),
            reserve=False,
            process=None,
            wall=self._wall_us(),
            view=True,
        )
        return KeyView(key, limits, decision, stored=stored)

    async def aclose(self) -> None:
        """Nothing to release."""

    def drop(self, key: StateKey) -> None:
        """Forget a key's state (tests: a store that lost its data)."""
        self._records.pop(key.digest, None)

    def __repr__(self) -> str:
        return f"MemoryStateStore(keys={len(self._records)})"
