"""Shared plumbing of the benchmarks: a simulator in its own process, configs, ASINs, output.

The simulator runs as ``python -m broker simulate --config <tmp toml> --port 0`` in a child
process, so its CPU time never lands in the client's ``time.process_time`` and its event loop
never delays the client's timers (``ratelimit.md`` 5.2: count on the server side, with the
server's own clock). With ``--port 0`` the simulator picks a free port and prints its URL on
its first stdout line, which :class:`SimulatorProcess` reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from broker.config import BrokerConfig, parse_config

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "REPO_ROOT",
    "RESULTS_DIR",
    "SimulatorProcess",
    "asin_stream",
    "broker_config",
    "creators_account",
    "loop_factory",
    "machine_info",
    "paapi_account",
    "print_table",
    "quiet_logging",
    "sim_control",
    "sim_stats",
    "toml_document",
    "warn_if_busy",
    "write_results",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

_READY = re.compile(r"listening on (http://\S+)")
# A simulator that has not printed its URL by then has failed to start (bad config, no port).
_START_TIMEOUT_S = 30.0


# -- TOML -----------------------------------------------------------------------------------------


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


# -- the simulator process ------------------------------------------------------------------------


class SimulatorProcess:
    """``broker simulate`` in a child process, for the lifetime of a ``with`` block.

    Args:
        settings: the ``[simulator]`` table (see ``broker/simulator/settings.py``).

    Attributes (inside the block): ``url`` (``http://127.0.0.1:PORT``) and ``pid``.
    """

    def __init__(self, settings: Mapping[str, object]) -> None:
        self._settings = settings
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._drain: threading.Thread | None = None
        self.url = ""
        self.pid = 0

    def __enter__(self) -> SimulatorProcess:
        self._tmp = tempfile.TemporaryDirectory(prefix="asinb-bench-")
        tmp = Path(self._tmp.name)
        config = tmp / "simulator.toml"
        config.write_text(toml_document({"simulator": self._settings}), encoding="utf-8")
        stderr_path = tmp / "simulator.stderr"
        env = dict(os.environ)
        # The simulator's own log lines are not ours to read; unbuffered so the URL line
        # arrives at once.
        env["PYTHONUNBUFFERED"] = "1"
        with stderr_path.open("w", encoding="utf-8") as stderr:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "broker",
                    "simulate",
                    "--config",
                    str(config),
                    "--port",
                    "0",
                ],
                stdout=subprocess.PIPE,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                text=True,
                cwd=REPO_ROOT,
                env=env,
            )
        self.pid = self._proc.pid
        try:
            self.url = self._read_url(stderr_path)
        except BaseException:
            self._stop()
            raise
        # Keep reading stdout so a chatty simulator can never block on a full pipe.
        self._drain = threading.Thread(target=self._drain_stdout, daemon=True)
        self._drain.start()
        return self

    def _read_url(self, stderr_path: Path) -> str:
        assert self._proc is not None
        assert self._proc.stdout is not None
        found: list[str] = []

        def read_first_line() -> None:
            assert self._proc is not None
            assert self._proc.stdout is not None
            found.append(self._proc.stdout.readline())

        reader = threading.Thread(target=read_first_line, daemon=True)
        reader.start()
        reader.join(_START_TIMEOUT_S)
        line = found[0] if found else ""
        match = _READY.search(line)
        if match is None:
            self._stop()
            detail = stderr_path.read_text(encoding="utf-8", errors="replace").strip()
            raise RuntimeError(
                f"simulator did not start (first line {line!r}); stderr:\n{detail[-2000:]}"
            )
        return match.group(1)

    def _drain_stdout(self) -> None:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        with contextlib.suppress(OSError, ValueError):
            for _ in proc.stdout:
                pass

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            # SIGTERM: serve_forever shuts the app down cleanly.
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc is not None and proc.stdout is not None:
            with contextlib.suppress(OSError):
                proc.stdout.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()


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


# -- accounts and broker configs ------------------------------------------------------------------

MARKETPLACE = "www.amazon.com"


def creators_account(index: int, *, tps: float, tpd: int = 10_000_000) -> dict[str, object]:
    """A Creators v3.1 simulator account ``k<index>`` with its own credential and tag."""
    return {
        "name": f"k{index}",
        "protocol": "creators",
        "credential_id": f"bench-{index}-id",
        "secret": f"bench-{index}-secret",
        "version": "3.1",
        "partner_tags": {MARKETPLACE: f"bench{index}-20"},
        "tps": tps,
        "tpd": tpd,
    }


def paapi_account(index: int, *, tps: float, tpd: int = 10_000_000) -> dict[str, object]:
    """A PA-API simulator account ``p<index>`` with its own access key and tag."""
    return {
        "name": f"p{index}",
        "protocol": "paapi5",
        "access_key": f"BENCHACCESSKEY{index}",
        "secret": f"bench-{index}-secret-key",
        "partner_tags": {MARKETPLACE: f"bench{index}-20"},
        "tps": tps,
        "tpd": tpd,
    }


def broker_config(
    url: str,
    accounts: Sequence[Mapping[str, object]],
    *,
    tps: float,
    max_in_flight: int = 4,
    tpd: int = 0,
    engine: Mapping[str, object] | None = None,
    rate: Mapping[str, object] | None = None,
) -> BrokerConfig:
    """A broker config with one key per simulator account, pointed at ``url``.

    Secrets go through the environment mapping, as they must for a non-simulator endpoint.
    ``tpd = 0`` means no daily guard on the client (the simulator's TPD is set far away).
    """
    protocol = str(accounts[0]["protocol"])
    keys: list[dict[str, object]] = []
    environ: dict[str, str] = {}
    for index, account in enumerate(accounts):
        env_name = f"ASINB_BENCH_{index}_SECRET"
        environ[env_name] = str(account["secret"])
        key: dict[str, object] = {
            "name": str(account["name"]),
            "credential_id": str(account.get("credential_id") or account["access_key"]),
            "credential_secret_env": env_name,
            "partner_tags": dict(account["partner_tags"]),  # type: ignore[call-overload]
            "tps": tps,
            "tpd": tpd,
            "max_in_flight": max_in_flight,
        }
        if protocol == "creators":
            key["version"] = str(account["version"])
        keys.append(key)
    document: dict[str, object] = {
        "api": {"protocol": protocol, "endpoint": url, "marketplace": MARKETPLACE},
        "keys": keys,
        "engine": dict(engine or {}),
        "rate": dict(rate or {}),
    }
    return parse_config(document, environ=environ, source="<benchmark>")


# -- inputs ---------------------------------------------------------------------------------------


def asin_stream(prefix: str = "B", start: int = 0) -> Iterator[str]:
    """Unique well-formed ASINs forever: ``prefix`` + a hex counter, 10 characters.

    The prefix is a letter, so no id is all digits (an ISBN-10 needs a check digit).
    """
    width = 10 - len(prefix)
    number = start
    while True:
        yield f"{prefix}{number:0{width}X}"
        number += 1


# -- running and reporting ------------------------------------------------------------------------


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop factory for ``"uvloop"`` or ``"asyncio"``."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    if name == "asyncio":
        return asyncio.new_event_loop
    raise ValueError(f"unknown loop {name!r}")


def quiet_logging() -> None:
    """Broker logs at warning and above, to stderr: stdout carries only the JSON line."""
    from broker.logs import configure_logging

    configure_logging("warning", "console", stream=sys.stderr)


def _package(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def machine_info() -> dict[str, object]:
    """Where and when the figures were measured."""
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "aiohttp": _package("aiohttp"),
        "uvloop": _package("uvloop"),
        "asin_broker": _package("asin-broker"),
        # Other work on the machine skews CPU and timer figures: keep the evidence.
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def warn_if_busy() -> None:
    """Say so on stderr when other work is running: it skews CPU and timer figures."""
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    if load > 0.5 * cpus:
        print(
            f"warning: load average {load:.2f} on {cpus} CPUs; other work on this machine "
            "will skew the figures",
            file=sys.stderr,
        )


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain aligned table on stderr."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for number, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)), file=sys.stderr)
        if number == 0:
            print("  ".join("-" * w for w in widths), file=sys.stderr)


def write_results(name: str, data: Mapping[str, object]) -> Path:
    """Write ``benchmarks/results/<name>.json`` (pretty) and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
