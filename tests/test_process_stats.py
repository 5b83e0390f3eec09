"""``broker.jobs.process_stats``: this process's figures for /metrics, read from procfs."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest

from broker import __version__
from broker.jobs.metrics_http import SpoolSnapshot, render_metrics
from broker.jobs.process_stats import read_process_stats


def _fake_proc(root: Path, *, fds: int) -> Path:
    """A procfs with a boot time, one process stat line and ``fds`` open descriptors."""
    (root / "self" / "fd").mkdir(parents=True)
    for fd in range(fds):
        (root / "self" / "fd" / str(fd)).touch()
    (root / "stat").write_text("cpu  1 2 3 4\nbtime 1700000000\nprocesses 42\n")
    ticks = os.sysconf("SC_CLK_TCK")
    # Fields 1-24 of proc(5): utime (14) = 3 s, stime (15) = 1 s, starttime (22) = 50 s after
    # boot, vsize (23) = 1 MiB, rss (24) = 10 pages. The name holds a space and a ")".
    fields = ["123", "(py thon) x)", "S", *["0"] * 10, str(3 * ticks), str(1 * ticks)]
    fields += ["0"] * 6 + [str(50 * ticks), str(1 << 20), "10"]
    (root / "self" / "stat").write_text(" ".join(fields) + "\n")
    return root


class TestProcessStats:
    def test_reads_procfs(self, tmp_path: Path) -> None:
        """CPU, start time, memory and descriptors come from /proc/self and /proc/stat."""
        stats = read_process_stats(_fake_proc(tmp_path, fds=7))
        assert stats.cpu_seconds == 4.0
        assert stats.start_time_s == 1_700_000_050.0
        assert stats.virtual_bytes == 1 << 20
        assert stats.resident_bytes == 10 * os.sysconf("SC_PAGE_SIZE")
        assert stats.open_fds == 7

    def test_without_procfs_only_what_is_known(self, tmp_path: Path) -> None:
        """Without /proc, memory and descriptor counts are absent rather than invented."""
        stats = read_process_stats(tmp_path / "missing")
        assert stats.cpu_seconds > 0
        assert stats.resident_bytes is None
        assert stats.open_fds is None
        assert stats.start_time_s > 0

    @pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="no procfs")
    def test_this_process_on_linux(self) -> None:
        """On this machine's real /proc the figures are plausible for a running test process."""
        stats = read_process_stats()
        assert stats.resident_bytes is not None
        assert stats.resident_bytes > 1 << 20
        assert stats.open_fds is not None
        assert stats.open_fds >= 3


class TestExposition:
    def test_build_info_and_process_families(self) -> None:
        """/metrics carries asinb_build_info with the versions and the process_* families."""
        lines = render_metrics(None, SpoolSnapshot()).splitlines()
        info = f'asinb_build_info{{version="{__version__}",python="{platform.python_version()}"}} 1'
        assert info in lines
        assert "# TYPE process_cpu_seconds_total counter" in lines
        assert "# TYPE process_start_time_seconds gauge" in lines
        assert any(line.startswith("process_cpu_seconds_total ") for line in lines)
