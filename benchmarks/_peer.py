"""The peer: python-amazon-paapi 7.1.0's async Creators client, driven as its docs suggest.

``AsyncAmazonCreatorsApi`` is the strongest client users have today. It is pointed at the
simulator with its ``host=`` and ``auth_endpoint=`` overrides (as in
``tests/test_compat_creators.py``). Its documented way to respect a key's quota is one
client per key with ``throttling`` = seconds between calls (1/TPS), shared by the tasks that
call it; it retries 429s and 5xx ``retries`` times (default 3) with a 1, 2, 4 s backoff
(or Retry-After), and then raises, so the ASINs of that call are lost unless the caller
resubmits them. The benchmarks count them.

Two ways to run it:

- in this process (:func:`peer_client`, :func:`peer_resources`), for the CPU figures of
  ``overhead.py``;
- in a child process (:class:`PeerProcess`), beside the broker against the same simulator,
  for ``utilisation.py`` and ``adaptation.py``: the peer's pydantic parsing then never
  delays the broker's timers, and each side's CPU is its own. The child runs
  ``python benchmarks/_peer.py SPEC`` until its stdin closes, then prints one JSON line:
  every call with its ``time.monotonic()`` finish time (a system-wide clock, so the parent
  can place calls in its own windows), its ASIN count and its outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from _harness import start_clock
from amazon_creatorsapi.aio import AsyncAmazonCreatorsApi
from amazon_creatorsapi.errors import AmazonCreatorsApiError
from creatorsapi_python_sdk.models.get_items_resource import GetItemsResource

from broker.bench import MARKETPLACE, asin_stream, creators_account, loop_factory
from broker.config import DEFAULT_RESOURCES

__all__ = [
    "PEER",
    "PeerCall",
    "PeerProcess",
    "PeerRun",
    "peer_accounts",
    "peer_client",
    "peer_resources",
    "summarise_calls",
]

PEER = f"python-amazon-paapi {version('python-amazon-paapi')}"
ITEMS_PER_CALL = 10
#: Tasks calling each client at once: the broker's default max_in_flight per key.
DEFAULT_TASKS_PER_KEY = 4
_STOP_TIMEOUT_S = 30.0


def peer_resources() -> list[GetItemsResource]:
    """The broker's default resources as the peer's enum, so both send the same request."""
    return [GetItemsResource(name) for name in DEFAULT_RESOURCES]


def peer_accounts(keys: int, tps: float) -> list[dict[str, object]]:
    """Simulator accounts ``peer0``.. for the peer, with credentials no broker key uses."""
    return [{**creators_account(100 + i, tps=tps), "name": f"peer{i}"} for i in range(keys)]


def peer_client(
    url: str, account: Mapping[str, object], *, throttling: float, retries: int | None = None
) -> AsyncAmazonCreatorsApi:
    """One peer client for one simulator account (a Creators 3.x credential)."""
    tags = account["partner_tags"]
    assert isinstance(tags, Mapping)
    kwargs: dict[str, Any] = {
        "credential_id": str(account["credential_id"]),
        "credential_secret": str(account["secret"]),
        "version": str(account["version"]),
        "tag": str(tags[MARKETPLACE]),
        "marketplace": MARKETPLACE,
        "throttling": throttling,
        "host": url,
        # Login with Amazon (3.x credentials) serves tokens here; the simulator too.
        "auth_endpoint": url + "/auth/o2/token",
    }
    if retries is not None:
        kwargs["retries"] = retries
    return AsyncAmazonCreatorsApi(**kwargs)


@dataclass(frozen=True, slots=True)
class PeerCall:
    """One ``get_items`` call of the peer: when it finished, for how many ASINs, and how."""

    key: str
    at: float
    asins: int
    #: "ok", or the exception the peer raised (its ASINs are lost)
    outcome: str


@dataclass(frozen=True, slots=True)
class PeerRun:
    """Everything a peer child process reports."""

    calls: tuple[PeerCall, ...]
    cpu_s: float
    wall_s: float


def summarise_calls(
    calls: Sequence[PeerCall], start: float = float("-inf"), end: float = float("inf")
) -> dict[str, Any]:
    """Calls finished in ``[start, end)``: ASINs answered and lost, and why they were lost."""
    answered = lost = 0
    reasons: Counter[str] = Counter()
    for call in calls:
        if not start <= call.at < end:
            continue
        if call.outcome == "ok":
            answered += call.asins
        else:
            lost += call.asins
            reasons[call.outcome] += call.asins
    finished = answered + lost
    return {
        "asins_answered": answered,
        "asins_lost": lost,
        "lost_pct": round(100.0 * lost / finished, 2) if finished else 0.0,
        "lost_by_error": dict(reasons),
    }


# -- the child process ----------------------------------------------------------------------------


async def _drive(spec: Mapping[str, Any], stop: asyncio.Event) -> list[PeerCall]:
    url = str(spec["url"])
    throttling = 1.0 / float(spec["tps"])
    tasks_per_key = int(spec.get("tasks_per_key", DEFAULT_TASKS_PER_KEY))
    resources = peer_resources()
    calls: list[PeerCall] = []

    async def work(api: AsyncAmazonCreatorsApi, key: str, ids: Iterator[str]) -> None:
        while not stop.is_set():
            chunk = list(itertools.islice(ids, ITEMS_PER_CALL))
            try:
                await api.get_items(chunk, resources=resources)
            except AmazonCreatorsApiError as exc:
                # After its retries the peer raises: the caller has lost these ASINs.
                calls.append(PeerCall(key, time.monotonic(), len(chunk), type(exc).__name__))
            else:
                calls.append(PeerCall(key, time.monotonic(), len(chunk), "ok"))

    async with contextlib.AsyncExitStack() as stack:
        tasks: list[asyncio.Task[None]] = []
        for index, account in enumerate(spec["accounts"]):
            api = await stack.enter_async_context(
                peer_client(url, account, throttling=throttling, retries=spec.get("retries"))
            )
            # One id sequence per key, shared by its tasks; a prefix no broker stream uses.
            ids = asin_stream("P" + format(index, "02X"))
            key = str(account["name"])
            tasks.extend(asyncio.create_task(work(api, key, ids)) for _ in range(tasks_per_key))
        # Imports and clients are ready: the parent's warm-up may start.
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await stop.wait()
        # Calls still in flight are neither answered nor lost: they are left out.
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result
    return calls


async def _child(spec: Mapping[str, Any]) -> PeerRun:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # The parent closes our stdin to stop us; a thread waits for that EOF.
    eof = loop.run_in_executor(None, sys.stdin.buffer.read)
    eof.add_done_callback(lambda _: stop.set())
    cpu0, wall0 = start_clock()
    calls = await _drive(spec, stop)
    return PeerRun(tuple(calls), time.process_time() - cpu0, time.perf_counter() - wall0)


def _child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the peer in a child process (internal)")
    parser.add_argument("spec", help="JSON: url, accounts, tps, tasks_per_key, retries, loop")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec)
    with asyncio.Runner(loop_factory=loop_factory(str(spec.get("loop", "uvloop")))) as runner:
        run = runner.run(_child(spec))
    body = {
        "cpu_s": run.cpu_s,
        "wall_s": run.wall_s,
        "calls": [[c.key, c.at, c.asins, c.outcome] for c in run.calls],
    }
    sys.stdout.write(json.dumps(body) + "\n")
    sys.stdout.flush()
    return 0


# -- the parent's handle --------------------------------------------------------------------------


class PeerProcess:
    """The peer in a child process for the lifetime of a ``with`` block.

    Args:
        url: the simulator.
        accounts: one simulator account per key (Creators 3.x), each given its own client.
        tps: the rate each client is throttled to (``throttling = 1/tps``).
        tasks_per_key: tasks calling each client concurrently.
        loop: the child's event loop.

    :meth:`stop` ends the child and returns its :class:`PeerRun`.
    """

    def __init__(
        self,
        url: str,
        accounts: Sequence[Mapping[str, object]],
        *,
        tps: float,
        tasks_per_key: int = DEFAULT_TASKS_PER_KEY,
        loop: str = "uvloop",
    ) -> None:
        self._spec = {
            "url": url,
            "accounts": [dict(a) for a in accounts],
            "tps": tps,
            "tasks_per_key": tasks_per_key,
            "loop": loop,
        }
        self._proc: subprocess.Popen[bytes] | None = None
        self._stack = contextlib.ExitStack()
        self._stderr: IO[bytes] | None = None

    def __enter__(self) -> PeerProcess:
        # A file, not a pipe: a chatty child (import warnings) can never block on it.
        self._stderr = self._stack.enter_context(tempfile.TemporaryFile())
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), json.dumps(self._spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        # The child imports pydantic models for a second or two; wait until it is sending.
        stdout = self._proc.stdout
        assert stdout is not None
        if stdout.readline().strip() != b"ready":
            detail = self._stderr_tail()
            self.__exit__(None, None, None)
            raise RuntimeError(f"the peer process did not start:\n{detail}")
        return self

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-2000:]

    def stop(self) -> PeerRun:
        """Close the child's stdin, wait for its report, and return it."""
        proc = self._proc
        if proc is None:
            raise RuntimeError("the peer process is not running")
        self._proc = None
        try:
            out, _ = proc.communicate(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise RuntimeError("the peer process did not stop") from None
        if proc.returncode != 0 or not out.strip():
            raise RuntimeError(
                f"the peer process failed ({proc.returncode}):\n{self._stderr_tail()}"
            )
        body = json.loads(out.decode().strip().splitlines()[-1])
        calls = tuple(PeerCall(str(k), float(t), int(n), str(o)) for k, t, n, o in body["calls"])
        return PeerRun(calls, float(body["cpu_s"]), float(body["wall_s"]))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
        self._stack.close()


if __name__ == "__main__":
    raise SystemExit(_child_main())
