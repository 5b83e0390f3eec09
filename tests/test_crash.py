"""Crash and resume: SIGKILL a real ``broker run`` at seeded random moments, then check every row.

The job runs against the embedded simulator with faults on (5xx, resets, truncated
bodies). After the kills, one last run finishes the job; the output must hold every input
row exactly once, every line must parse, and every ok row must equal the simulator's
deterministic item for its ASIN.
"""

from __future__ import annotations

import json
import os
import random
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.simulator.render import render_item
from broker.simulator.settings import SimulatorSettings

_SIM = {
    "seed": 11,
    "missing_share": 0.02,
    "faults": {"error_503": 0.02, "reset": 0.02, "truncated": 0.02},
    "accounts": [
        {
            "name": "crash",
            "protocol": "creators",
            "credential_id": "crash-id",
            "secret": "crash-secret",
            "version": "3.1",
            "partner_tags": {"www.amazon.com": "crash-20"},
            "tps": 200.0,
            "tpd": 10_000_000,
        }
    ],
}

_CONFIG = """\
[api]
endpoint = "simulator"
resources = ["itemInfo.title", "offersV2.listings.price"]

[[keys]]
name = "crash"
credential_id = "crash-id"
version = "3.1"
partner_tags = { "www.amazon.com" = "crash-20" }
tps = 150.0
tpd = 0
max_in_flight = 8

[retry]
max_attempts = 30

[log]
format = "json"

[simulator]
seed = 11
missing_share = 0.02

[simulator.faults]
error_503 = 0.02
reset = 0.02
truncated = 0.02

[[simulator.accounts]]
name = "crash"
protocol = "creators"
credential_id = "crash-id"
secret = "crash-secret"
version = "3.1"
partner_tags = { "www.amazon.com" = "crash-20" }
tps = 200.0
tpd = 10000000
"""


def _job(tmp_path: Path, rows: int, seed: int) -> tuple[Path, list[str]]:
    rng = random.Random(seed)
    alphabet = string.ascii_uppercase + string.digits
    asins = ["B0" + "".join(rng.choice(alphabet) for _ in range(8)) for _ in range(rows)]
    # Duplicates and bad lines exercise dedup and invalid rows across crashes.
    lines = asins + asins[: rows // 10] + ["bad-id", "B0SHORT"]
    rng.shuffle(lines)
    job = tmp_path / "job.txt"
    job.write_text("\n".join(lines) + "\n")
    return job, lines


def _run(tmp_path: Path, job: Path, *, capture: bool = False) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASINB_")}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "broker",
            "run",
            str(job),
            "--config",
            str(tmp_path / "c.toml"),
            "--out",
            str(tmp_path / "out.jsonl"),
            "--progress",
            "none",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE if capture else subprocess.DEVNULL,
        env=env,
        cwd=tmp_path,
    )


def _crash_cycles(tmp_path: Path, cycles: int, rows: int, seed: int) -> None:
    (tmp_path / "c.toml").write_text(_CONFIG)
    job, lines = _job(tmp_path, rows, seed)
    rng = random.Random(seed)
    killed = 0
    for _ in range(cycles):
        proc = _run(tmp_path, job)
        time.sleep(rng.uniform(0.3, 2.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait(timeout=60)
    assert killed > 0, "no run was killed: the harness injected no crash"
    final = _run(tmp_path, job, capture=True)
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err.decode()[-2000:]
    _check_output(tmp_path / "out.jsonl", lines)


def _check_output(out: Path, lines: list[str]) -> None:
    settings = SimulatorSettings.from_mapping(_SIM)
    rows = [json.loads(text) for text in out.read_text().splitlines()]
    numbers = [row["line"] for row in rows]
    assert len(numbers) == len(set(numbers)), "a row was written twice"
    assert sorted(numbers) == list(range(1, len(lines) + 1)), "a row is missing"
    resources = ["itemInfo.title", "offersV2.listings.price"]
    for row in rows:
        raw = lines[row["line"] - 1]
        assert row["input"] == raw
        if row["status"] == "invalid":
            assert len(raw) != 10
            continue
        expected = render_item(
            settings, "www.amazon.com", raw, resources=resources, partner_tag="crash-20"
        )
        if expected is None:
            assert row["status"] == "not_found", row
        else:
            assert row["status"] == "ok", row
            assert row["item"] == expected


def test_kill_nine_at_random_moments_keeps_every_row_exactly_once(tmp_path: Path) -> None:
    """Ten SIGKILLs with faults on: the final output has every row once, equal to the catalogue."""
    _crash_cycles(tmp_path, cycles=10, rows=1500, seed=5)


@pytest.mark.slow
def test_kill_nine_many_cycles(tmp_path: Path) -> None:
    """The full variant: forty SIGKILLs over a bigger job (run with -m slow)."""
    _crash_cycles(tmp_path, cycles=40, rows=6000, seed=9)
