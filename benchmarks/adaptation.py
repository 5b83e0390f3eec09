"""Adaptation: the server's rate steps down and back up mid-run; how each client follows it.

The simulator (in its own process, latency 40 ms + Exp(10 ms) each way, server burst 2 by
default) enforces a per-key rate that follows a schedule, changed for every key at once through
``POST /_sim/control``: by default 20 s at 5 TPS, 40 s at 2.5 TPS, then 80 s at 5 TPS again.
Two clients run at the same time, each on keys of its own:

- the broker (``Broker.stream`` over an endless backlog), configured at the initial rate;
- the peer, python-amazon-paapi 7.1.0's async Creators client as its docs suggest (one client
  per key, ``throttling`` = 1/TPS at the initial rate, four tasks per client), in a child
  process (see ``_peer.py``).

Sampled over time, in 1 s bins on the server's clock from the ``accepted_at`` and
``throttled_at`` timestamps of ``GET /_sim/stats``: each key's send rate (requests that reached
the server, accepted or not), its accepted rate and its 429s; and every 0.5 s the broker's own
rate per key (``Broker.metrics()``). Per phase: mean sends/s and accepted/s per key, the 429
share, utilisation of the true rate, and ASINs lost (calls the peer gave up on). After the
step down: 429s per key in the first 120 s (the ``ratelimit.md`` 6.4 target is <= 10 per key
in 2 min). After the step up: seconds until a key's accepted rate, averaged over 5 s, is back
at 90 % of the true rate, and the accepted-request deficit of the phase.

Run: ``uv run --group bench python benchmarks/adaptation.py [--quick] [--schedule 20:5,40:2.5,80:5]
[--keys 2] [--burst 2] [--no-peer]``. Prints a table to stderr and one JSON line to stdout,
writes ``benchmarks/results/adaptation.json`` and the plot ``adaptation.png`` (``-quick`` with
``--quick``). Without ``--group bench`` (no matplotlib) everything but the PNG is produced.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from _harness import (
    LATENCY,
    MAX_TPS,
    MIN_TPS,
    SimulatorProcess,
    add_output_arguments,
    backlog,
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
    sim_control,
    sim_stats,
    warn_if_busy,
)
from _peer import PEER, PeerCall, PeerProcess, peer_accounts, summarise_calls
from _plots import AdaptationSeries, plot_adaptation

from broker.client import Broker

__all__ = ["main"]

DEFAULT_SCHEDULE = "20:5,40:2.5,80:5"
QUICK_SCHEDULE = "5:5,8:2.5,8:5"
#: the window after a step down in which 429s are counted (ratelimit.md 6.4: 2 min)
AFTER_DROP_S = 120.0
#: a key has recovered when its accepted rate over this many seconds is back at RECOVERED
RECOVERY_AVERAGE_S = 5
RECOVERED = 0.9
_SAMPLE_EVERY_S = 0.5


@dataclass(frozen=True, slots=True)
class Phase:
    """A stretch of the run at one server rate."""

    seconds: float
    tps: float


def parse_schedule(text: str) -> list[Phase]:
    """``"20:5,40:2.5,60:5"`` -> phases (seconds:tps, in order)."""
    phases: list[Phase] = []
    for part in text.split(","):
        seconds, sep, tps = part.partition(":")
        try:
            phase = Phase(float(seconds), float(tps))
        except ValueError:
            phase = Phase(0.0, 0.0)
        finite = math.isfinite(phase.seconds) and math.isfinite(phase.tps)
        # Whole seconds: the figures count sends in one-second bins per phase.
        whole = finite and phase.seconds >= 1 and phase.seconds.is_integer()
        # The rates the simulator's accounts and the keys' config take: checked here, not
        # when the phase comes, tens of seconds into the run.
        if not sep or not whole or not MIN_TPS <= phase.tps <= MAX_TPS:
            raise argparse.ArgumentTypeError(
                f"expected SECONDS:TPS pairs like {DEFAULT_SCHEDULE} (whole seconds, at "
                f"least 1; TPS from {MIN_TPS:g} to {MAX_TPS:g}), got {part!r}"
            )
        phases.append(phase)
    return phases


def _bins(stamps: Sequence[float], t0: float, count: int) -> list[int]:
    counts = [0] * count
    for t in stamps:
        index = math.floor(t - t0)
        if 0 <= index < count:
            counts[index] += 1
    return counts


@dataclass(frozen=True, slots=True)
class _Series:
    """One client's per-key, per-second server-side counts."""

    accepted: Mapping[str, list[int]]
    throttled: Mapping[str, list[int]]

    def sent(self) -> dict[str, list[int]]:
        return {
            k: [a + t for a, t in zip(self.accepted[k], self.throttled[k], strict=True)]
            for k in self.accepted
        }


def _series(stats: Mapping[str, Any], names: Sequence[str], t0: float, count: int) -> _Series:
    accounts = stats["accounts"]
    return _Series(
        {n: _bins(accounts.get(n, {}).get("accepted_at", []), t0, count) for n in names},
        {n: _bins(accounts.get(n, {}).get("throttled_at", []), t0, count) for n in names},
    )


def _recovery_s(accepted: Sequence[int], start: int, end: int, tps: float) -> float | None:
    """Seconds from ``start`` until the trailing 5 s mean of accepted/s reaches 90 % of tps."""
    for second in range(start + RECOVERY_AVERAGE_S, end + 1):
        window = accepted[second - RECOVERY_AVERAGE_S : second]
        if sum(window) / RECOVERY_AVERAGE_S >= RECOVERED * tps:
            return float(second - start)
    return None


def _phase_figures(
    series: _Series,
    phases: Sequence[Phase],
    calls: Sequence[PeerCall] | None,
    to_sim: float,
    t0: float,
) -> list[dict[str, Any]]:
    figures: list[dict[str, Any]] = []
    edge = 0
    previous: Phase | None = None
    for phase in phases:
        start, end = edge, edge + round(phase.seconds)
        edge = end
        keys = list(series.accepted)
        accepted = {k: sum(series.accepted[k][start:end]) for k in keys}
        throttled = {k: sum(series.throttled[k][start:end]) for k in keys}
        span = end - start
        arrived = sum(accepted.values()) + sum(throttled.values())
        entry: dict[str, Any] = {
            "start_s": start,
            "end_s": end,
            "true_tps": phase.tps,
            "sent_per_s_per_key": {k: round((accepted[k] + throttled[k]) / span, 2) for k in keys},
            "accepted_per_s_per_key": {k: round(accepted[k] / span, 2) for k in keys},
            "throttled_per_key": throttled,
            "share_429_pct": round(100.0 * sum(throttled.values()) / arrived, 2)
            if arrived
            else 0.0,
            "utilisation_pct": round(
                100.0 * sum(accepted.values()) / (phase.tps * span * len(keys)), 2
            ),
        }
        if previous is not None and phase.tps < previous.tps:
            first = min(end, start + round(AFTER_DROP_S))
            entry["after_drop_s"] = first - start
            entry["throttled_per_key_after_drop"] = {
                k: sum(series.throttled[k][start:first]) for k in keys
            }
        if previous is not None and phase.tps > previous.tps:
            entry["recovery_s_per_key"] = {
                k: _recovery_s(series.accepted[k], start, end, phase.tps) for k in keys
            }
            entry["accepted_deficit"] = round(phase.tps * span * len(keys)) - sum(accepted.values())
        if calls is not None:
            # The peer's call times are on this machine's monotonic clock; shift them onto
            # the simulator's.
            low, high = t0 + start - to_sim, t0 + end - to_sim
            entry["peer_calls"] = summarise_calls(calls, low, high)
        figures.append(entry)
        previous = phase
    return figures


async def _run(args: argparse.Namespace, phases: Sequence[Phase]) -> dict[str, Any]:
    first = phases[0].tps
    accounts = [creators_account(i, tps=first) for i in range(args.keys)]
    names = [str(a["name"]) for a in accounts]
    peers = [] if args.no_peer else peer_accounts(args.keys, first)
    peer_names = [str(a["name"]) for a in peers]
    settings = {
        "seed": args.seed,
        "burst": args.burst,
        "demo_accounts": False,
        "latency": LATENCY,
        "accounts": accounts + peers,
    }
    total = round(sum(p.seconds for p in phases))
    own_rate: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    changes: list[tuple[float, float]] = []
    calls: tuple[PeerCall, ...] | None = None
    with SimulatorProcess(settings) as sim, contextlib.ExitStack() as stack:
        peer = (
            None
            if args.no_peer
            else stack.enter_context(PeerProcess(sim.url, peers, tps=first, loop=args.loop))
        )
        config = broker_config(sim.url, accounts, tps=first)
        async with (
            Broker(config) as broker,
            aiohttp.ClientSession() as session,
            backlog(broker) as statuses,
        ):
            await asyncio.sleep(args.warmup)
            # One reading of both clocks: the offset maps local stamps onto the server's.
            before = time.monotonic()
            t0 = float((await sim_stats(session, sim.url, timestamps=False))["now"])
            to_sim = t0 - (before + time.monotonic()) / 2
            changes.append((0.0, first))
            deadline = t0
            for number, phase in enumerate(phases):
                if number:
                    for name in names + peer_names:
                        await sim_control(session, sim.url, account=name, tps=phase.tps)
                    now = float((await sim_stats(session, sim.url, timestamps=False))["now"])
                    changes.append((now - t0, phase.tps))
                deadline += phase.seconds
                while (now_sim := time.monotonic() + to_sim) < deadline:
                    for key in broker.metrics().keys:
                        own_rate[key.name].append((round(now_sim - t0, 2), round(key.rate, 3)))
                    await asyncio.sleep(min(_SAMPLE_EVERY_S, deadline - now_sim))
            stats = await sim_stats(session, sim.url, since=t0)
            if peer is not None:
                calls = (await asyncio.to_thread(peer.stop)).calls

    ours = _series(stats, names, t0, total)
    result: dict[str, Any] = {
        "schedule": [{"seconds": p.seconds, "tps": p.tps} for p in phases],
        "changes": [{"at_s": round(t, 3), "tps": r} for t, r in changes],
        "bins": list(range(total)),
        "broker": {
            "phases": _phase_figures(ours, phases, None, to_sim, t0),
            "sent": ours.sent(),
            "throttled": dict(ours.throttled),
            "accepted": dict(ours.accepted),
            "own_rate": own_rate,
            "items_by_status": dict(statuses),
            "asins_lost": statuses.get("failed", 0),
        },
    }
    if calls is not None:
        theirs = _series(stats, peer_names, t0, total)
        run = summarise_calls(calls)
        result["peer"] = {
            "library": PEER,
            "throttling_s": round(1.0 / first, 4),
            "phases": _phase_figures(theirs, phases, calls, to_sim, t0),
            "sent": theirs.sent(),
            "throttled": dict(theirs.throttled),
            "accepted": dict(theirs.accepted),
            "run": run,
            "asins_lost": run["asins_lost"],
        }
    return result


def _table(result: Mapping[str, Any]) -> None:
    rows: list[list[object]] = []
    for client in ("broker", "peer"):
        side = result.get(client)
        if side is None:
            continue
        for number, phase in enumerate(side["phases"]):
            after_drop = phase.get("throttled_per_key_after_drop")
            recovery = phase.get("recovery_s_per_key")
            lost = phase["peer_calls"]["asins_lost"] if "peer_calls" in phase else 0
            rows.append(
                [
                    client if number == 0 else "",
                    f"{phase['start_s']}-{phase['end_s']}",
                    f"{phase['true_tps']:g}",
                    ",".join(f"{v:.2f}" for v in phase["sent_per_s_per_key"].values()),
                    ",".join(f"{v:.2f}" for v in phase["accepted_per_s_per_key"].values()),
                    f"{phase['utilisation_pct']:.1f}",
                    f"{phase['share_429_pct']:.1f}",
                    ",".join(str(v) for v in after_drop.values()) if after_drop else "-",
                    ",".join("never" if v is None else f"{v:g}" for v in recovery.values())
                    if recovery
                    else "-",
                    lost if client == "peer" else "-",
                ]
            )
    print_table(
        [
            "client",
            "phase s",
            "true tps",
            "sends/s per key",
            "accepted/s per key",
            "U %",
            "429 %",
            "429s/key after drop",
            "recovery s per key",
            "ASINs lost",
        ],
        rows,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the step schedule and print, save and plot the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"schedule {QUICK_SCHEDULE} (CI)")
    parser.add_argument(
        "--schedule",
        type=parse_schedule,
        help=f"SECONDS:TPS phases (default {DEFAULT_SCHEDULE})",
    )
    parser.add_argument("--keys", type=positive(int), default=2, help="keys per client (default 2)")
    parser.add_argument(
        "--burst", type=positive(int), default=2, help="server bucket depth (default 2)"
    )
    parser.add_argument(
        "--warmup", type=non_negative, help="seconds before the first phase (5; 3 quick)"
    )
    parser.add_argument("--no-peer", action="store_true", help="run the broker alone")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--seed", type=int, default=11, help="the simulator's latency draws")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    phases = args.schedule or parse_schedule(QUICK_SCHEDULE if args.quick else DEFAULT_SCHEDULE)
    if args.warmup is None:
        args.warmup = 3.0 if args.quick else 5.0
    quiet_logging()
    warn_if_busy()
    started = time.perf_counter()
    result = run_loop(args.loop, _run(args, phases))
    _table(result)

    name = results_name("adaptation", args.quick)
    plot = None
    if not args.no_write:
        true_rate = [(c["at_s"], c["tps"]) for c in result["changes"]]
        true_rate.append((float(len(result["bins"])), phases[-1].tps))
        panels = [
            AdaptationSeries(
                f"asin-broker ({args.keys} keys)",
                result["bins"],
                result["broker"]["sent"],
                result["broker"]["throttled"],
                result["broker"]["own_rate"],
            )
        ]
        if "peer" in result:
            lost = result["peer"]["asins_lost"]
            panels.append(
                AdaptationSeries(
                    f"{PEER} async, throttling {1 / phases[0].tps:g} s "
                    f"({args.keys} keys; {lost} ASINs lost)",
                    result["bins"],
                    result["peer"]["sent"],
                    result["peer"]["throttled"],
                )
            )
        plot = plot_adaptation(
            panels,
            true_rate,
            args.results_dir / f"{name}.png",
            subtitle=f" (server burst {args.burst}, latency 40 ms + Exp(10 ms) each way)",
        )
    line = {
        "benchmark": "adaptation",
        "machine": machine_info(),
        "wall_s": round(time.perf_counter() - started, 1),
        "settings": {
            "quick": args.quick,
            "keys": args.keys,
            "burst": args.burst,
            "warmup_s": args.warmup,
            "latency": LATENCY,
            "loop": args.loop,
            "seed": args.seed,
            "peer": None if args.no_peer else PEER,
        },
        "plot": plot,
        **result,
    }
    report(args, name, line)
    return 0


if __name__ == "__main__":
    raise SystemExit(interruptible(main))
