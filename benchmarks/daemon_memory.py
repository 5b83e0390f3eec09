"""Daemon memory: whether ``broker serve``'s resident set stays flat over thousands of jobs.

A daemon runs for months; memory it keeps per job (a name, a counter, a list that only
grows) adds up. This script starts the simulator in its own process (limits off, no
latency) and ``python -m broker serve --spool <tmp> --config <tmp config> --port 0`` as
another, its endpoint the simulator's URL (so the daemon's process holds the client alone:
the embedded simulator's bounded item caches, 16,384 items, would grow it by about 5 KB per
new ASIN up to about 90 MB and then stay), ``[serve] settle_s = 0``, the item cache on (as by
default) and the key state in the run's own directory. It drops one-ASIN job files into
``inbox/`` (written as ``name.tmp``, then renamed), keeping about ``--waiting`` of them
waiting, each job a new ASIN (every one a request, none answered from the cache), until
``--jobs`` are filed under ``done/``.

Every 0.2 s it reads the daemon's ``VmRSS`` from ``/proc/<pid>/status`` and counts the status
files in ``done/``. Reported: the RSS when 10 % of the jobs were filed and at the end, the
growth between the two per job (in bytes; a few hundred is allocator noise), jobs per
second over the run and over its first and last tenth (filing must not slow as ``done/``
fills), and the jobs filed under ``done/`` and ``failed/`` (every job must be done).

Run: ``uv run python benchmarks/daemon_memory.py [--quick] [--jobs 20000] [--waiting 100]``.
``--quick`` is 300 jobs. Prints a table to stderr and one JSON line to stdout, and writes
``benchmarks/results/daemon_memory.json`` (``daemon_memory-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from _harness import (
    add_output_arguments,
    asin_stream,
    creators_account,
    interruptible,
    machine_info,
    one_key_config,
    positive,
    print_table,
    report,
    results_name,
    warn_if_busy,
)

__all__ = ["main"]

DEFAULT_JOBS = 20_000
QUICK_JOBS = 300
_SAMPLE_EVERY_S = 0.2
_SECRET_ENV = "ASINB_DAEMON_MEMORY_SECRET"
#: How long the daemon may go without filing a job before the run is called stuck.
_STUCK_S = 60.0


def write_config(path: Path, url: str, account: dict[str, object]) -> None:
    """The daemon's config.toml: the simulator's URL as endpoint, the secret from the env,
    jobs claimed as soon as they are renamed into inbox/."""
    lines = [
        *one_key_config(url, account, _SECRET_ENV, tps=1000.0),
        "",
        "[engine]",
        "linger_s = 0.0",
        "",
        "[serve]",
        "settle_s = 0",
        "",
        "[log]",
        'level = "warning"',
        'format = "json"',
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def _rss_kb(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None  # a zombie has no memory lines: the process has ended


def _filed(folder: Path) -> int:
    """Jobs filed in ``folder``: their status files."""
    try:
        with os.scandir(folder) as entries:
            return sum(1 for entry in entries if entry.name.endswith(".status.json"))
    except FileNotFoundError:
        return 0


class _Feeder:
    """Drops one-ASIN jobs into ``inbox/`` so that about ``waiting`` wait there."""

    def __init__(self, inbox: Path, total: int, waiting: int) -> None:
        self._inbox = inbox
        self._total = total
        self._waiting = waiting
        self._ids: Iterator[str] = asin_stream("D")
        self.made = 0

    def top_up(self) -> None:
        with os.scandir(self._inbox) as entries:
            present = sum(1 for entry in entries if not entry.name.endswith(".tmp"))
        for _ in range(min(self._waiting - present, self._total - self.made)):
            name = f"job{self.made:07d}.txt"
            temporary = self._inbox / f"{name}.tmp"
            temporary.write_text(next(self._ids) + "\n", encoding="utf-8")
            temporary.rename(self._inbox / name)
            self.made += 1


def _run(jobs: int, waiting: int, tmp: Path) -> dict[str, Any]:
    from broker.simulator.process import SimulatorProcess

    account = creators_account(0, tps=1000.0)
    settings = {"seed": 3, "limits": False, "demo_accounts": False, "accounts": [account]}
    spool = tmp / "spool"
    (spool / "inbox").mkdir(parents=True)
    samples: list[tuple[float, int, int]] = []
    with SimulatorProcess(settings) as sim:
        config = tmp / "config.toml"
        write_config(config, sim.url, account)
        env = dict(os.environ)
        env[_SECRET_ENV] = str(account["secret"])
        env["XDG_STATE_HOME"] = str(tmp / "state")
        # -P: the installed broker, never a broker.py of the working directory.
        command = [sys.executable, "-P", "-m", "broker", "serve", "--spool", str(spool)]
        command += ["--config", str(config), "--port", "0"]
        feeder = _Feeder(spool / "inbox", jobs, waiting)
        with (tmp / "daemon.stderr").open("w", encoding="utf-8") as stderr:
            started = time.perf_counter()
            proc = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=stderr, stdin=subprocess.DEVNULL, env=env
            )
            try:
                last_progress, last_done = started, -1
                while proc.poll() is None:
                    feeder.top_up()
                    done = _filed(spool / "done") + _filed(spool / "failed")
                    now = time.perf_counter()
                    rss = _rss_kb(proc.pid)
                    if rss is not None:
                        samples.append((now - started, done, rss))
                    if done >= jobs:
                        break
                    if done != last_done:
                        last_progress, last_done = now, done
                    elif now - last_progress > _STUCK_S:
                        raise RuntimeError(f"no job filed for {_STUCK_S:g} s ({done} of {jobs})")
                    time.sleep(_SAMPLE_EVERY_S)
                wall = time.perf_counter() - started
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                proc.wait()
    stderr_text = (tmp / "daemon.stderr").read_text(encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"broker serve exited {proc.returncode}:\n{stderr_text[-3000:]}")
    done, failed = _filed(spool / "done"), _filed(spool / "failed")
    if (done, failed) != (jobs, 0):
        # A daemon that stopped early (a signal of its own) or failed jobs measured nothing.
        raise RuntimeError(f"{done} of {jobs} jobs done, {failed} failed:\n{stderr_text[-3000:]}")
    early_jobs = max(1, jobs // 10)
    early = next((s for s in samples if s[1] >= early_jobs), None)
    last = samples[-1] if samples else None
    growth = (
        round((last[2] - early[2]) * 1024 / (last[1] - early[1]))
        if early is not None and last is not None and last[1] > early[1]
        else None
    )
    return {
        "jobs": jobs,
        # Filing must not slow as done/ fills: the rate over the first tenth and the last.
        "jobs_per_s_first_tenth": _rate(samples, 0, early_jobs),
        "jobs_per_s_last_tenth": _rate(samples, jobs - early_jobs, jobs),
        "waiting": waiting,
        "done": done,
        "failed": failed,
        "wall_s": round(wall, 2),
        "jobs_per_s": round(jobs / wall, 1),
        "early_jobs": early_jobs,
        "rss_mb_at_early": round(early[2] / 1024, 1) if early else None,
        "rss_mb_at_end": round(last[2] / 1024, 1) if last else None,
        "rss_growth_bytes_per_job": growth,
        # About one point a second.
        "samples": [[round(t, 1), done, rss] for t, done, rss in samples[::5]],
        "daemon_stderr_tail": stderr_text[-500:],
    }


def _rate(samples: Sequence[tuple[float, int, int]], start: int, end: int) -> float | None:
    """Jobs per second from the last sample with at most ``start`` jobs filed to the first
    with ``end`` (a sample may jump past a short stretch's end); the daemon's start (no job
    filed at 0 s) counts as a sample."""
    first = next((s for s in reversed([(0.0, 0, 0), *samples]) if s[1] <= start), None)
    last = next((s for s in samples if s[1] >= end), None)
    if first is None or last is None or last[0] <= first[0]:
        return None
    return round((last[1] - first[1]) / (last[0] - first[0]), 1)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the jobs through a daemon and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_JOBS} jobs (CI smoke)")
    parser.add_argument(
        "--jobs", type=positive(int), help=f"one-ASIN jobs to file (default {DEFAULT_JOBS})"
    )
    parser.add_argument(
        "--waiting",
        type=positive(int, most=10_000),
        default=100,
        help="job files kept waiting in inbox/ (100)",
    )
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    jobs = args.jobs or (QUICK_JOBS if args.quick else DEFAULT_JOBS)
    warn_if_busy()
    with tempfile.TemporaryDirectory(prefix="asinb-daemon-memory-") as tmp:
        result = _run(jobs, args.waiting, Path(tmp))
    print_table(
        [
            "jobs",
            "done",
            "failed",
            "jobs/s",
            "first 10 %",
            "last 10 %",
            f"RSS MB at {result['early_jobs']}",
            "RSS MB at end",
            "growth B/job",
        ],
        [
            [
                jobs,
                result["done"],
                result["failed"],
                result["jobs_per_s"],
                result["jobs_per_s_first_tenth"],
                result["jobs_per_s_last_tenth"],
                result["rss_mb_at_early"],
                result["rss_mb_at_end"],
                result["rss_growth_bytes_per_job"],
            ]
        ],
    )
    line = {
        "benchmark": "daemon_memory",
        "machine": machine_info(),
        "settings": {
            "quick": args.quick,
            "jobs": jobs,
            "waiting": args.waiting,
            "simulator": "limits off, no latency, separate process",
        },
        "results": result,
    }
    report(args, results_name("daemon_memory", args.quick), line)
    return 0


if __name__ == "__main__":
    raise SystemExit(interruptible(main))
