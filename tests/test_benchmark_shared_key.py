"""benchmarks/shared_key.py keeps working: a tiny --quick run reports every mode and the costs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from broker.state.redis_server import redis_server_binary

REPO = Path(__file__).resolve().parent.parent


def test_shared_key_quick_run(tmp_path: Path) -> None:
    """N = 2 for 2 s in each mode: the JSON line, its runs, decision costs and the files."""
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "shared_key.py"),
            "--quick",
            "--processes",
            "2",
            "--duration",
            "2",
            "--warmup",
            "0.5",
            "--results-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    body = json.loads(lines[0])
    modes = {run["mode"] for run in body["runs"]}
    expected = {"independent", "local"} | ({"redis"} if redis_server_binary() else set())
    assert modes == expected
    for run in body["runs"]:
        assert run["processes"] == 2
        assert len(run["per_process_rps"]) == 2
        assert run["accepted"] > 0
    assert body["decision_us"]["local"] > 0
    assert json.loads((tmp_path / "shared_key-quick.json").read_text()) == body
    assert not (tmp_path / "shared_key.json").exists()
