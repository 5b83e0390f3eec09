"""benchmarks/cache_rerun.py keeps working: a tiny run reports requests saved by the cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_cache_rerun_quick(tmp_path: Path) -> None:
    """A 200-ASIN quick run: day 2 hits the 90 % seen on day 1 and sends fewer requests."""
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "cache_rerun.py"),
            "--quick",
            "--asins",
            "200",
            "--tps",
            "200",
            "--results-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    body = json.loads(lines[0])
    assert json.loads((tmp_path / "cache_rerun-quick.json").read_text()) == body
    content = body["scenarios"]["content"]
    assert content["day2_rerun"]["hits"] == 180
    assert content["day2_rerun"]["requests"] < content["day2_no_cache"]["requests"]
    assert body["scenarios"]["with_offers"]["day2_rerun"]["hits"] == 0
