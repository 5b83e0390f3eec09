"""Scale: a 1,000,000-row job through ``broker run``: rows/s and whether memory stays flat.

The job is a text file of ASINs (one a line): unique well-formed ids, with a share of rows
repeating an earlier id (duplicates share one lookup and one request slot) and a few invalid
rows (reported in the output, never sent). The simulator runs in its own process with its
limits off and no latency; ``broker run`` runs as another child process (its item cache on,
as for any run, empty at the start, and its key state in the run's own directory),
``python -m broker run JOB --config <tmp config> --out <tmp>/job.jsonl``, with one key at
1000 TPS and 32 requests in flight, its endpoint the simulator's URL and its secret in an
environment variable, as for a real endpoint.

While it runs, every 0.1 s, the script reads the broker process's ``VmRSS`` and ``VmHWM``
from ``/proc/<pid>/status`` and counts the output rows written so far (new bytes of the
output file). Reported: rows/s over the whole run (ingest included) and between 10 % and
100 % of the rows, the RSS when 10 % of the rows were done (100k of 1M) and at the end, the
peak RSS (the kernel's ``ru_maxrss`` of the finished child), and the output's rows by status,
checked against what the job holds, and the broker process's CPU (user and system, from
the kernel's accounting of the finished child) per row.

Run: ``uv run python benchmarks/scale.py [--quick] [--rows 1000000]``. ``--quick`` is 20,000
rows. Prints a table to stderr and one JSON line to stdout, and writes
``benchmarks/results/scale.json`` (``scale-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _harness import (
    MAX_IN_FLIGHT,
    MAX_TPS,
    MIN_TPS,
    SimulatorProcess,
    add_output_arguments,
    asin_stream,
    creators_account,
    floor_rate,
    interruptible,
    machine_info,
    one_key_config,
    positive,
    print_table,
    report,
    results_name,
    share,
    warn_if_busy,
)

__all__ = ["main"]

DEFAULT_ROWS = 1_000_000
QUICK_ROWS = 20_000
_SAMPLE_EVERY_S = 0.1
_SECRET_ENV = "ASINB_SCALE_SECRET"


@dataclass(frozen=True, slots=True)
class Job:
    """What the generated job file holds."""

    rows: int
    unique: int
    duplicates: int
    invalid: int


def write_job(path: Path, rows: int, *, duplicate_share: float, invalid_share: float) -> Job:
    """A text job of ``rows`` lines: unique ASINs, repeats of earlier ones, and invalid ids."""
    rng = random.Random(5)
    ids = asin_stream("S")
    recent: list[str] = []
    unique = duplicates = invalid = 0
    with path.open("w", encoding="utf-8") as handle:
        for line in range(rows):
            draw = rng.random()
            if draw < invalid_share:
                # Nine characters: too short to be an ASIN or an ISBN-10.
                handle.write(f"BAD{line % 1_000_000:06d}\n")
                invalid += 1
            elif draw < invalid_share + duplicate_share and recent:
                handle.write(rng.choice(recent) + "\n")
                duplicates += 1
            else:
                asin = next(ids)
                handle.write(asin + "\n")
                unique += 1
                # Repeats come from a recent stretch, as they do in real lists; the bound
                # also keeps this generator's own memory small.
                if len(recent) < 50_000:
                    recent.append(asin)
                else:
                    recent[rng.randrange(len(recent))] = asin
    return Job(rows, unique, duplicates, invalid)


def write_config(
    path: Path, url: str, account: dict[str, object], *, tps: float, in_flight: int
) -> None:
    """The broker's config.toml: the simulator's URL as endpoint, the secret from the env."""
    lines = [
        *one_key_config(url, account, _SECRET_ENV, tps=tps),
        f"max_in_flight = {in_flight}",
        "",
        "[rate]",
        # Below a slow key's rate: the config refuses a 429 floor at or above it.
        f"min_rate = {floor_rate(tps)!r}",
        "",
        "[log]",
        'level = "warning"',
        'format = "json"',
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Sample:
    """One look at the broker process."""

    t: float
    rows_done: int
    rss_kb: int
    hwm_kb: int


def _status_kb(pid: int) -> tuple[int, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    if "VmRSS" not in values:
        # A zombie has no memory lines: the process has ended.
        return None
    return values["VmRSS"], values.get("VmHWM", values["VmRSS"])


class _LineCounter:
    """Counts the lines of a file that is being appended to, reading only the new bytes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self.lines = 0

    def update(self) -> int:
        try:
            with self._path.open("rb") as handle:
                handle.seek(self._offset)
                while chunk := handle.read(1 << 20):
                    self.lines += chunk.count(b"\n")
                    self._offset += len(chunk)
        except FileNotFoundError:
            pass
        return self.lines


#: A row's own status comes before its item (``architecture.md``, output rows), so the first
#: match on a line is the row's; a regex is ten times faster than decoding 1.5 KB rows.
_STATUS = re.compile(rb'"status":\s*"([a-z_]+)"')


def _statuses(path: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    with path.open("rb") as handle:
        for line in handle:
            match = _STATUS.search(line)
            counts[match.group(1).decode() if match else "unreadable"] += 1
    return counts


def _at(samples: Sequence[Sample], rows: int) -> Sample | None:
    """The first sample with at least ``rows`` rows done."""
    return next((s for s in samples if s.rows_done >= rows), None)


def _run(args: argparse.Namespace, rows: int, tmp: Path) -> dict[str, Any]:
    job_path = tmp / "job.txt"
    made = time.perf_counter()
    job = write_job(job_path, rows, duplicate_share=args.duplicates, invalid_share=args.invalid)
    print(
        f"job: {job.rows} rows ({job.unique} unique, {job.duplicates} repeats, "
        f"{job.invalid} invalid), written in {time.perf_counter() - made:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    account = creators_account(0, tps=1000.0)
    settings = {"seed": 2, "limits": False, "demo_accounts": False, "accounts": [account]}
    out = tmp / "job.jsonl"
    samples: list[Sample] = []
    with SimulatorProcess(settings) as sim:
        config = tmp / "config.toml"
        write_config(config, sim.url, account, tps=args.tps, in_flight=args.max_in_flight)
        env = dict(os.environ)
        env[_SECRET_ENV] = str(account["secret"])
        # The key state and the item cache (on, as for any run) in the run's own directory:
        # never the user's, and the cache starts empty, as a first run's does.
        env["XDG_STATE_HOME"] = str(tmp / "state")
        command = [
            sys.executable,
            "-P",  # the installed broker, never a broker.py of the working directory
            "-m",
            "broker",
            "run",
            str(job_path),
            "--config",
            str(config),
            "--out",
            str(out),
            "--progress",
            "none",
        ]
        counter = _LineCounter(out)
        # The CPU of children waited for so far, before and after this one: the broker's own
        # (the simulator is still running, so it is not counted).
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with (tmp / "broker.stderr").open("w", encoding="utf-8") as stderr:
            started = time.perf_counter()
            proc = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=stderr, stdin=subprocess.DEVNULL, env=env
            )
            try:
                while proc.poll() is None:
                    memory = _status_kb(proc.pid)
                    if memory is not None:
                        samples.append(
                            Sample(time.perf_counter() - started, counter.update(), *memory)
                        )
                    time.sleep(_SAMPLE_EVERY_S)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            wall = time.perf_counter() - started
        # The largest resident set of any child waited for so far: only this broker (the
        # simulator is still running).
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak_kb = after.ru_maxrss
        cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    stderr_text = (tmp / "broker.stderr").read_text(encoding="utf-8", errors="replace")
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"broker run exited {proc.returncode}:\n{stderr_text[-3000:]}")
    statuses = _statuses(out)
    done = counter.update()
    early_rows = max(1, rows // 10)
    early = _at(samples, early_rows)
    last = samples[-1] if samples else None
    steady = (
        round((last.rows_done - early.rows_done) / (last.t - early.t), 1)
        if early is not None and last is not None and last.t > early.t
        else None
    )
    expected = {"ok": job.unique + job.duplicates, "invalid": job.invalid}
    return {
        "job": asdict(job),
        "exit_code": proc.returncode,
        "wall_s": round(wall, 2),
        "rows_out": done,
        "statuses": dict(statuses),
        "statuses_as_expected": dict(statuses) == {k: v for k, v in expected.items() if v},
        "rows_per_s": round(rows / wall, 1),
        "broker_cpu_s": round(cpu_s, 2),
        "broker_cpu_us_per_row": round(cpu_s / rows * 1e6, 1),
        "rows_per_s_after_early": steady,
        "early_rows": early_rows,
        "rss_mb_at_early": round(early.rss_kb / 1024, 1) if early else None,
        "early_at_s": round(early.t, 2) if early else None,
        "rss_mb_at_end": round(last.rss_kb / 1024, 1) if last else None,
        "rows_done_at_last_sample": last.rows_done if last else None,
        "last_sample_at_s": round(last.t, 2) if last else None,
        # The kernel's peak of the finished child, or the highest VmHWM seen if that is higher
        # (they count slightly different pages).
        "peak_rss_mb": round(max(peak_kb, *(s.hwm_kb for s in samples)) / 1024, 1),
        "peak_hwm_mb_seen": round(max(s.hwm_kb for s in samples) / 1024, 1) if samples else None,
        "rss_growth_early_to_end_pct": (
            round(100.0 * (last.rss_kb - early.rss_kb) / early.rss_kb, 1)
            if early is not None and last is not None
            else None
        ),
        "output_mb": round(out.stat().st_size / 2**20, 1),
        "ledger_mb": round(sum(p.stat().st_size for p in tmp.glob("job.jsonl.ledger*")) / 2**20, 1),
        # Every 10th sample keeps the JSON small: about one point a second.
        "samples": [[round(s.t, 2), s.rows_done, s.rss_kb] for s in samples[::10]],
        "broker_stderr_tail": stderr_text[-500:],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROWS} rows (CI smoke)")
    parser.add_argument(
        "--rows", type=positive(int), help=f"rows in the job (default {DEFAULT_ROWS})"
    )
    parser.add_argument(
        "--duplicates", type=share, default=0.1, help="share of rows repeating an id (0.1)"
    )
    parser.add_argument(
        "--invalid", type=share, default=0.001, help="share of invalid rows (0.001)"
    )
    parser.add_argument(
        "--tps",
        type=positive(float, least=MIN_TPS, most=MAX_TPS),
        default=1000.0,
        help="the key's configured TPS",
    )
    parser.add_argument(
        "--max-in-flight",
        type=positive(int, most=MAX_IN_FLIGHT),
        default=32,
        help="the key's max_in_flight",
    )
    parser.add_argument(
        "--keep", type=Path, help="keep the job, config and output in this new or empty dir"
    )
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    rows = args.rows or (QUICK_ROWS if args.quick else DEFAULT_ROWS)
    warn_if_busy()
    if args.keep is not None:
        try:
            args.keep.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file there, or in its path: a usage error, not a traceback
            parser.error(f"--keep {args.keep}: {exc.strerror}; give a new or empty directory")
        if any(args.keep.iterdir()):
            # The job left there would be resumed (nothing measured) or refused as changed.
            parser.error(f"--keep {args.keep}: not empty; give a new or empty directory")
        result = _run(args, rows, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="asinb-scale-") as tmp:
            result = _run(args, rows, Path(tmp))
    print_table(
        [
            "rows",
            "wall s",
            "rows/s",
            "rows/s after 10 %",
            "CPU us/row",
            f"RSS MB at {result['early_rows']}",
            "RSS MB at end",
            "peak RSS MB",
            "statuses",
        ],
        [
            [
                rows,
                result["wall_s"],
                result["rows_per_s"],
                result["rows_per_s_after_early"],
                result["broker_cpu_us_per_row"],
                result["rss_mb_at_early"],
                result["rss_mb_at_end"],
                result["peak_rss_mb"],
                ", ".join(f"{n} {s}" for s, n in sorted(result["statuses"].items())),
            ]
        ],
    )
    line = {
        "benchmark": "scale",
        "machine": machine_info(),
        "settings": {
            "quick": args.quick,
            "rows": rows,
            "duplicate_share": args.duplicates,
            "invalid_share": args.invalid,
            "key_tps": args.tps,
            "max_in_flight": args.max_in_flight,
            "simulator": "limits off, no latency, separate process",
        },
        "results": result,
    }
    report(args, results_name("scale", args.quick), line)
    return 0


if __name__ == "__main__":
    raise SystemExit(interruptible(main))
