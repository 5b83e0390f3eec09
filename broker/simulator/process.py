"""The simulator in a child process, and a small client of its ``/_sim`` endpoints.

``broker bench`` and the scripts in ``benchmarks/`` measure the client's CPU and timers, so
the simulator must not share the client's process: its CPU would land in the client's
``time.process_time`` and its event loop would delay the client's timers (``ratelimit.md``
5.2: count on the server side, with the server's own clock). :class:`SimulatorProcess`
runs ``python -P -m broker simulate --config <tmp toml> --port 0``, reads the bound URL from
the simulator's first stdout line, and removes the temporary file once the child has read it.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from broker.errors import SimulatorStartError
from broker.simulator.settings import SimulatorSettings

if TYPE_CHECKING:
    import aiohttp

__all__ = ["SimulatorProcess", "sim_control", "sim_stats", "toml_document"]

_READY = re.compile(r"listening on (http://\S+)")
#: A simulator that has not printed its URL by then has failed to start.
_START_TIMEOUT_S = 30.0
#: How long a stopping simulator gets after SIGTERM before SIGKILL.
_STOP_TIMEOUT_S = 10.0
#: Lines of the child's stderr kept for the message of a failed start.
_STDERR_TAIL_LINES = 200


def _toml_value(value: object) -> str:
    # Only the shapes a [simulator] table needs. JSON string escapes are valid TOML basic
    # string escapes, so json.dumps quotes strings and keys safely.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"TOML has no portable spelling of {value!r}")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        inner = ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def toml_document(tables: Mapping[str, Mapping[str, object]]) -> str:
    """Write ``{"simulator": {...}}`` as TOML: one ``[table]`` each, nested values inline.

    Inline tables and arrays of inline tables parse to the same dicts and lists as
    ``[simulator.latency]`` and ``[[simulator.accounts]]`` would.
    """
    lines: list[str] = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in table.items())
        lines.append("")
    return "\n".join(lines)


class SimulatorProcess:
    """``broker simulate`` in a child process, for the lifetime of a ``with`` block.

    The settings are validated in this process first, so a bad table fails here with a
    :class:`~broker.errors.ConfigError` naming the key instead of as a dead child.

    Args:
        settings: the ``[simulator]`` table (see :mod:`broker.simulator.settings`).

    Attributes (inside the block): ``url`` (``http://127.0.0.1:PORT``) and ``pid``.
    """

    def __init__(self, settings: Mapping[str, object]) -> None:
        SimulatorSettings.from_mapping(settings)
        self._settings = settings
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._stderr_reader: threading.Thread | None = None
        #: The last lines the child wrote on stderr (bounded: it runs for the block's length).
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self.url = ""
        self.pid = 0

    def __enter__(self) -> SimulatorProcess:
        self._tmp = tempfile.TemporaryDirectory(prefix="asinb-sim-")
        try:
            self._start(Path(self._tmp.name))
        except BaseException:
            # A stop signal (broker bench raises on one) may land anywhere in the start,
            # inside Popen after its fork too: the temporary directory goes whatever, and a
            # child forked then stops with this process (--exit-with-parent).
            self._stop()
            raise
        # The child has read its settings: the directory goes now, not at the block's end, so
        # a parent killed by SIGKILL (no cleanup runs then) leaves nothing behind in /tmp.
        self._remove_tmp()
        # Keep reading stdout so a chatty simulator can never block on a full pipe.
        assert self._proc is not None
        threading.Thread(target=_drain, args=(self._proc.stdout, None), daemon=True).start()
        return self

    def _start(self, tmp: Path) -> None:
        """Start the child with its settings written in ``tmp``; wait for its URL."""
        config = tmp / "simulator.toml"
        config.write_text(toml_document({"simulator": self._settings}), encoding="utf-8")
        env = dict(os.environ)
        # Unbuffered, so the URL line arrives at once.
        env["PYTHONUNBUFFERED"] = "1"
        # This process's broker, whatever the working directory holds: -P keeps that
        # directory off the child's path (a ./broker.py of the user's ran instead), unless
        # this broker was imported from it (a checkout run uninstalled from its root).
        # (Its folder resolved, not the module: a package reached through a link is run
        # from the folder holding the link.)
        home = Path(__file__).absolute().parents[2]
        if home.resolve() == Path.cwd().resolve():
            env["PYTHONPATH"] = os.pathsep.join(
                [str(home), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
            )
        command = [sys.executable, "-P", "-m", "broker", "simulate", "--config", str(config)]
        # Stopped with this process even when it dies by SIGKILL (no cleanup runs then).
        command += ["--exit-with-parent", str(os.getpid())]
        self._proc = subprocess.Popen(
            [*command, "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=env,
        )
        self.pid = self._proc.pid
        # Read all along (a full pipe would block the child); the tail explains a failed start.
        self._stderr_reader = threading.Thread(
            target=_drain, args=(self._proc.stderr, self._stderr_tail), daemon=True
        )
        self._stderr_reader.start()
        self.url = self._read_url()

    def _read_url(self) -> str:
        proc = self._proc
        assert proc is not None
        assert proc.stdout is not None
        stdout = proc.stdout
        found: list[str] = []
        reader = threading.Thread(target=lambda: found.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(_START_TIMEOUT_S)
        line = found[0] if found else ""
        match = _READY.search(line)
        if match is None:
            self._stop_process()
            detail = "".join(self._stderr_tail).strip()
            self._stop()
            raise SimulatorStartError(
                f"the simulator did not start (first line {line!r}); stderr:\n{detail[-2000:]}"
            )
        return match.group(1)

    def _stop(self) -> None:
        self._stop_process()
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            # SIGTERM: serve_forever shuts the app down cleanly.
            proc.terminate()
            try:
                proc.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=_STOP_TIMEOUT_S)
        reader, self._stderr_reader = self._stderr_reader, None
        if reader is not None:
            # The child is gone: its stderr ends, and the reader has every last line.
            reader.join(_STOP_TIMEOUT_S)
        if proc is not None:
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()


def _drain(stream: IO[str] | None, keep: collections.deque[str] | None) -> None:
    """Read a child's pipe to its end (a full pipe would block the child), keeping its
    lines in ``keep`` if given."""
    if stream is None:
        return
    with contextlib.suppress(OSError, ValueError):
        for line in stream:
            if keep is not None:
                keep.append(line)


async def sim_stats(
    session: aiohttp.ClientSession, url: str, *, since: float | None = None, timestamps: bool = True
) -> dict[str, Any]:
    """``GET /_sim/stats``: counters, per-account timestamps and the simulator's ``now``."""
    params = {"timestamps": "1" if timestamps else "0"}
    if since is not None:
        params["since"] = repr(since)
    async with session.get(f"{url}/_sim/stats", params=params) as response:
        response.raise_for_status()
        body: dict[str, Any] = await response.json()
        return body


async def sim_control(session: aiohttp.ClientSession, url: str, **change: object) -> None:
    """``POST /_sim/control``: e.g. ``account="k0", tps=2.5``."""
    async with session.post(f"{url}/_sim/control", json=change) as response:
        response.raise_for_status()
