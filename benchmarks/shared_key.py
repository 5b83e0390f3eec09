"""Shared key: N processes on one key, each pacing alone (today) or through the state store.

One simulator process serves one Creators key at 5 TPS with a bucket of 2 (burst 2) and
Internet-like latency (``_harness.LATENCY``: 40 ms + Exp(10 ms) each way). For N = 1, 2, 4, 8
this script starts N broker processes (``python benchmarks/shared_key.py --worker SPEC``),
all configured with the key at 5 TPS and an endless backlog of unique ASINs, in three modes:

- ``independent``: today's engine, each process with its own in-process pacer, adaptive
  rate and daily count (``Broker(budget_store=...)`` keeps the in-process limiter);
- ``local``: ``[state] backend = "local"``, one SQLite file shared by the N processes;
- ``redis``: ``[state] backend = "redis"``, a ``redis-server`` on a free loopback port.

Measured on the simulator's side over the window after the warm-up (counted from when every
worker has its broker open and sends): utilisation (accepted
requests / (5 TPS x window)) and the 429 share of all arrivals; on each worker's side its
own sends per second (1 s bins, on the system-wide monotonic clock), for the plot. Then the
cost of one decision (reserve + count, no feedback) in microseconds for the local store
(one SQLite transaction), Redis (one ``EVALSHA`` round trip to a loopback Redis) and, for
reference, the in-memory store, measured in this process.

Run: ``uv run --group bench python benchmarks/shared_key.py [--quick] [--duration 20]``.
``--quick`` is N = 1, 2 with 3 s windows. Prints a table to stderr and one JSON line to
stdout; writes ``benchmarks/results/shared_key.json`` and ``shared_key.png``
(``shared_key-quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import faulthandler
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _harness import (
    LATENCY,
    REPO_ROOT,
    SimulatorProcess,
    add_output_arguments,
    asin_stream,
    broker_config,
    creators_account,
    interruptible,
    machine_info,
    non_negative,
    positive,
    print_table,
    quiet_logging,
    report,
    results_name,
    run_loop,
    sim_stats,
    warn_if_busy,
)
from _plots import have_matplotlib

__all__ = ["main"]

TPS = 5.0
BURST = 2
MODES = ("independent", "local", "redis")
FULL_N = (1, 2, 4, 8)
QUICK_N = (1, 2)
_DECISIONS = 2000


# -- the worker: one broker process ----------------------------------------------------------


async def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    from broker.config import StateConfig
    from broker.engine.broker import Broker
    from broker.engine.quota import MemoryBudgetStore
    from broker.engine.transport import AiohttpTransport

    quiet_logging()
    # A worker not up in 120 s, or not finished 60 s after its stop time, is stuck: show
    # where, and end.
    faulthandler.dump_traceback_later(120.0, exit=True)
    account = creators_account(0, tps=TPS)
    mode = spec["mode"]
    # The run's shared file in "local" mode, else one of the worker's own: in the run's
    # temporary directory either way, which goes with the run even if the worker is killed.
    shared = Path(spec["state_path"])
    state_path = shared if mode == "local" else shared.with_name(f"worker-{spec['index']}.sqlite3")
    config = broker_config(spec["url"], [account], tps=TPS, tpd=0, state_path=state_path)
    if mode == "redis":
        config = dataclasses.replace(
            config,
            state=StateConfig(
                backend="redis", redis_url=spec["redis_url"], key_prefix=spec["key_prefix"]
            ),
        )
    sends: list[tuple[float, int]] = []

    class Recording:
        def __init__(self, inner: AiohttpTransport) -> None:
            self.inner = inner

        async def send(self, request: Any) -> Any:
            sent_at = time.monotonic()
            response = await self.inner.send(request)
            if "token" not in request.url and "oauth" not in request.url:
                sends.append((sent_at, response.status))
            return response

    inner = AiohttpTransport()
    budget = MemoryBudgetStore() if mode == "independent" else None
    async with inner, Broker(config, transport=Recording(inner), budget_store=budget) as broker:

        async def consume() -> None:
            ids = asin_stream(f"W{spec['index']}")
            async for _ in broker.stream(ids):
                pass

        task = asyncio.get_running_loop().create_task(consume())
        # Up: the parent starts the warm-up once every worker is, and answers with the
        # stop time (a fixed lead for the slowest start took 5 s of every run).
        print("ready", flush=True)
        stop_at = float(await asyncio.to_thread(sys.stdin.readline))
        faulthandler.dump_traceback_later(stop_at - time.monotonic() + 60.0, exit=True)
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return {"index": spec["index"], "sends": sends}


# -- one run: N workers in one mode -----------------------------------------------------------


def _await_ready(proc: subprocess.Popen[bytes], mode: str, n: int) -> None:
    """Wait for a worker's "ready" line (its broker open), at most 120 s."""
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], 120.0)
    line = proc.stdout.readline() if readable else b""
    if line.strip() != b"ready":
        state = "still running" if readable == [] else f"exit {proc.wait(timeout=5)}"
        raise RuntimeError(f"worker did not start ({mode}, N={n}): {state}")


def _run(
    mode: str,
    n: int,
    url: str,
    *,
    warmup_s: float,
    duration_s: float,
    tmp: Path,
    redis_url: str | None,
) -> dict[str, Any]:
    import aiohttp

    # One prefix per run, the same for its N workers: a fresh key state for every run.
    prefix = f"bench-{mode}-{n}-{time.monotonic_ns()}:"
    procs: list[subprocess.Popen[bytes]] = []
    outputs = []
    try:  # from the first start: a stop between two starts takes the started ones too
        for index in range(n):
            spec = {
                "url": url,
                "mode": mode,
                "index": index,
                "state_path": str(tmp / f"{mode}-{n}.sqlite3"),
                "redis_url": redis_url,
                "key_prefix": prefix,
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", json.dumps(spec)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    cwd=REPO_ROOT,
                    env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                )
            )
        for proc in procs:
            _await_ready(proc, mode, n)
        # Every worker is up and sending: the warm-up starts now.
        start_at = time.monotonic()
        window = (start_at + warmup_s, start_at + warmup_s + duration_s)
        for proc in procs:
            assert proc.stdin is not None
            try:
                proc.stdin.write(f"{window[1] + 0.5}\n".encode())
                proc.stdin.flush()
            except BrokenPipeError:
                # Died between "ready" and its stop time: its traceback is on stderr.
                code = proc.wait(timeout=5)
                raise RuntimeError(f"worker failed ({mode}, N={n}): exit {code}") from None
        for proc in procs:
            out, _ = proc.communicate(timeout=window[1] - time.monotonic() + 120)
            if proc.returncode != 0:
                raise RuntimeError(f"worker failed ({mode}, N={n}): exit {proc.returncode}")
            outputs.append(json.loads(out))
    finally:
        # Stopped or failed, the workers go too: left running, they sent on and wrote
        # their state file into the removed temporary directory.
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    async def stats() -> dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            return await sim_stats(session, url, since=window[0])

    body = run_loop("asyncio", stats())
    final = run_loop(
        "asyncio", _final_state(mode, url, tmp / f"{mode}-{n}.sqlite3", redis_url, prefix)
    )
    account = body["accounts"]["k0"]
    accepted = sum(1 for t in account.get("accepted_at", ()) if window[0] <= t < window[1])
    throttled = sum(1 for t in account.get("throttled_at", ()) if window[0] <= t < window[1])
    per_process = []
    series = []
    bins = int(duration_s)
    for output in outputs:
        times = [t for t, _ in output["sends"] if window[0] <= t < window[1]]
        per_process.append(round(len(times) / duration_s, 3))
        counts = [0] * bins
        for t in times:
            slot = int(t - window[0])
            if 0 <= slot < bins:
                counts[slot] += 1
        series.append(counts)
    arrivals = accepted + throttled
    return {
        "mode": mode,
        "processes": n,
        "accepted": accepted,
        "throttled": throttled,
        "utilisation_pct": round(100.0 * accepted / (TPS * duration_s), 2),
        "share_429_pct": round(100.0 * throttled / arrivals, 2) if arrivals else 0.0,
        "per_process_rps": per_process,
        "final_shared_state": final,
        "series_per_s": series,
    }


async def _final_state(
    mode: str, url: str, db: Path, redis_url: str | None, prefix: str
) -> dict[str, Any] | None:
    """The key's shared state after the run: its rate, day count and last 429."""
    from broker.state import KeyLimits, StateKey
    from broker.state.redis import RedisStateStore
    from broker.state.sqlite import SqliteStateStore

    store: Any
    if mode == "local":
        store = SqliteStateStore(db)
    elif mode == "redis" and redis_url is not None:
        store = RedisStateStore(redis_url, key_prefix=prefix)
    else:
        return None
    key = StateKey.of(url, str(creators_account(0, tps=TPS)["credential_id"]))
    view = await store.view(key, KeyLimits(TPS, 0.05, TPS))
    await store.aclose()
    d = view.decision
    return {
        "rate": round(d.rate, 4),
        "count": d.count,
        "last_429_s_ago": round((d.now_us - d.last_429_us) / 1e6, 1) if d.last_429_us else None,
    }


# -- the cost of one decision -------------------------------------------------------------------


async def _decision_cost(tmp: Path, redis_url: str | None) -> dict[str, float | None]:
    from broker.state import Feedback, KeyLimits, MemoryStateStore, ProcessMark, StateKey
    from broker.state.redis import RedisStateStore
    from broker.state.sqlite import SqliteStateStore

    key = StateKey.of("http://bench", "cost")
    # A rate so high that no reservation is ever refused for the horizon.
    limits = KeyLimits(1e6, 1.0, 1e6, day_limit=None, horizon_s=3600.0)
    mark = ProcessMark("bench")
    stores: dict[str, Any] = {
        "memory": MemoryStateStore(),
        "local": SqliteStateStore(tmp / "cost.sqlite3"),
    }
    if redis_url is not None:
        stores["redis"] = RedisStateStore(redis_url, key_prefix="cost:")
    cost: dict[str, float | None] = {"memory": None, "local": None, "redis": None}
    for name, store in stores.items():
        for _ in range(50):  # warm: connection, script load, page cache
            await store.decide(key, limits, feedback=Feedback(), reserve=True, process=mark)
        started = time.perf_counter()
        for _ in range(_DECISIONS):
            await store.decide(key, limits, feedback=Feedback(), reserve=True, process=mark)
        cost[name] = round(1e6 * (time.perf_counter() - started) / _DECISIONS, 1)
        await store.aclose()
    return cost


# -- the plot -------------------------------------------------------------------------------------


def _plot(runs: Sequence[dict[str, Any]], path: Path) -> str | None:
    if not have_matplotlib():
        print(f"note: matplotlib is not installed, so {path.name} was not drawn", file=sys.stderr)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({r["processes"] for r in runs})
    modes = [m for m in MODES if any(r["mode"] == m for r in runs)]
    figure, axes = plt.subplots(
        len(ns), len(modes), figsize=(4.6 * len(modes), 2.4 * len(ns)), sharey=True, squeeze=False
    )
    for row, n in enumerate(ns):
        for col, mode in enumerate(modes):
            ax = axes[row][col]
            run = next((r for r in runs if r["mode"] == mode and r["processes"] == n), None)
            if run is None:
                continue
            for index, counts in enumerate(run["series_per_s"]):
                ax.plot(range(len(counts)), counts, linewidth=1, label=f"p{index}")
            total = [sum(c) for c in zip(*run["series_per_s"], strict=True)]
            ax.plot(range(len(total)), total, color="black", linewidth=1.6, label="all")
            ax.axhline(TPS, color="grey", linestyle="--", linewidth=0.8)
            ax.set_title(
                f"{mode}, N={n}: {run['utilisation_pct']:.1f} %, 429 {run['share_429_pct']:.1f} %",
                fontsize=9,
            )
            if row == len(ns) - 1:
                ax.set_xlabel("second of the window")
            if col == 0:
                ax.set_ylabel("sends/s")
    figure.suptitle(f"one key at {TPS:g} TPS, burst {BURST}: each process's send rate")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    resolved = path.resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(path)


# -- main ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with ``--worker``, one broker process of it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1, 2 with 3 s windows")
    parser.add_argument(
        "--duration", type=positive(float), default=None, help="measured window, seconds"
    )
    parser.add_argument(
        "--warmup",
        type=non_negative,
        default=None,
        help="warm-up from when every process is up, seconds (default 8; 5 with --quick)",
    )
    parser.add_argument(
        "--processes",
        type=positive(int),
        nargs="+",
        default=None,
        help="the N values (default 1 2 4 8)",
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.worker:
        # The parent stops its workers (a Ctrl-C reaches the whole process group): one
        # line on stderr, not one traceback per worker.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        print(json.dumps(asyncio.run(_worker(json.loads(args.worker)))))
        return 0

    from broker.state.redis_server import RedisServer, redis_server_binary

    warn_if_busy()
    duration = args.duration or (3.0 if args.quick else 20.0)
    # Counted from when every worker is up (it was 3 s after a fixed 4 + N/2 s lead for the
    # starts, about as long from the first send).
    warmup = args.warmup if args.warmup is not None else (5.0 if args.quick else 8.0)
    ns = args.processes or (QUICK_N if args.quick else FULL_N)
    modes = list(args.modes)
    if "redis" in modes and redis_server_binary() is None:
        print("note: no redis-server: the redis mode is skipped", file=sys.stderr)
        modes.remove("redis")
        if not modes:
            # Its file would replace the figures the README quotes with no run at all.
            print(
                "error: nothing to run without redis-server (apt-get install redis-server)",
                file=sys.stderr,
            )
            return 69
    settings = {
        "seed": 1,
        "burst": BURST,
        "limits": True,
        "demo_accounts": False,
        "latency": dict(LATENCY),
        "accounts": [creators_account(0, tps=TPS)],
    }
    runs = []
    with tempfile.TemporaryDirectory(prefix="asinb-shared-") as tmp_name:
        tmp = Path(tmp_name)
        redis = RedisServer() if redis_server_binary() is not None else None
        if redis is not None:
            redis.start()
        try:
            redis_url = None if redis is None else redis.url
            with SimulatorProcess(settings) as sim:
                for n in ns:
                    for mode in modes:
                        run = _run(
                            mode,
                            n,
                            sim.url,
                            warmup_s=warmup,
                            duration_s=duration,
                            tmp=tmp,
                            redis_url=redis_url,
                        )
                        print(
                            f"{mode:>11} N={n}: {run['utilisation_pct']:.1f} % of the key, "
                            f"429 {run['share_429_pct']:.1f} %",
                            file=sys.stderr,
                        )
                        runs.append(run)
            cost = run_loop("asyncio", _decision_cost(tmp, redis_url))
        finally:
            if redis is not None:
                redis.__exit__(None, None, None)
    name = results_name("shared_key", args.quick)
    plot = _plot(runs, args.results_dir / f"{name}.png") if not args.no_write else None
    print_table(
        ["mode", "N", "utilisation %", "429 %", "per-process sends/s"],
        [
            [
                r["mode"],
                r["processes"],
                f"{r['utilisation_pct']:.1f}",
                f"{r['share_429_pct']:.2f}",
                " ".join(f"{x:.2f}" for x in r["per_process_rps"]),
            ]
            for r in runs
        ],
    )
    print_table(
        ["decision cost", "µs"],
        [[k, "-" if v is None else f"{v:.1f}"] for k, v in cost.items()],
    )
    body = {
        "benchmark": "shared_key",
        "quick": args.quick,
        "tps": TPS,
        "burst": BURST,
        "latency_each_way": LATENCY,
        "warmup_s": warmup,
        "duration_s": duration,
        "runs": [{k: v for k, v in r.items() if k != "series_per_s"} for r in runs],
        "series_per_s": {f"{r['mode']}-{r['processes']}": r["series_per_s"] for r in runs},
        "decision_us": cost,
        "plot": plot,
        "machine": machine_info(),
    }
    report(args, name, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(interruptible(main))
