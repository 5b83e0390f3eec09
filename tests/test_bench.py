"""``broker bench`` and the simulator child process it measures against."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from conftest import sighup_at_default

from broker.bench import (
    BenchOptions,
    BenchReport,
    _faults,
    render_table,
    run_bench,
    window_latencies_ms,
)
from broker.errors import ConfigError, SimulatorStartError
from broker.simulator.process import SimulatorProcess, toml_document
from broker.simulator.settings import SimulatorSettings


def _bench_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``broker bench ARGS`` in a child process, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "broker", "bench", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class TestOptions:
    def test_defaults_describe_a_new_account(self) -> None:
        """The defaults are one key at 5 TPS behind a strict (burst 1) bucket."""
        options = BenchOptions()
        settings = SimulatorSettings.from_mapping(options.simulator_settings())
        assert (options.keys, options.tps, options.burst) == (1, 5.0, 1)
        assert settings.limits
        assert [a.tps for a in settings.accounts] == [5.0]

    def test_zero_tps_turns_the_simulator_limits_off(self) -> None:
        """--tps 0 means an unlimited server and the broker at its highest configurable rate."""
        options = BenchOptions(tps=0, keys=3)
        settings = SimulatorSettings.from_mapping(options.simulator_settings())
        assert not settings.limits
        assert len(settings.accounts) == 3
        assert options.client_tps == 1000.0

    def test_paapi_accounts_for_the_paapi_protocol(self) -> None:
        """--protocol paapi5 builds PA-API accounts with access keys."""
        settings = SimulatorSettings.from_mapping(
            BenchOptions(protocol="paapi5", keys=2).simulator_settings()
        )
        assert {a.protocol for a in settings.accounts} == {"paapi5"}

    @pytest.mark.parametrize(
        ("kwargs", "path"),
        [
            ({"keys": 0}, "--keys"),
            ({"tps": -1.0}, "--tps"),
            ({"tps": math.nan}, "--tps"),
            ({"broker_tps": 0.0}, "--broker-tps"),
            ({"broker_tps": math.inf}, "--broker-tps"),
            ({"broker_tps": 5000.0}, "--broker-tps"),
            ({"tps": 5000.0}, "--tps"),
            ({"duration_s": 0.0}, "--duration"),
            ({"duration_s": math.nan}, "--duration"),
            ({"warmup_s": -1.0}, "--warmup"),
            ({"latency_ms": -100.0}, "--latency-ms"),
            ({"jitter_ms": math.inf}, "--jitter-ms"),
            ({"max_in_flight": 0}, "--max-in-flight"),
            # Refused later, naming a config key (keys[0].max_in_flight) the user never wrote.
            ({"max_in_flight": 5000}, "--max-in-flight"),
            ({"tps": 1e-7}, "--tps"),
            ({"burst": 0}, "--burst"),
            ({"protocol": "soap"}, "--protocol"),
            ({"faults": {"gremlins": 0.1}}, "--fault"),
            # A token fault with PA-API injected nothing, yet the header named it.
            ({"protocol": "paapi5", "faults": {"expired_token": 1.0}}, "--fault"),
            ({"protocol": "paapi5", "faults": {"token_slow": 0.1}}, "--fault"),
            # Rates drawn together over 1: refused as simulator.faults, after the run began.
            ({"faults": {"error_500": 0.6, "error_503": 0.6}}, "--fault"),
            ({"faults": {"token_error": 0.6, "token_slow": 0.6}}, "--fault"),
        ],
    )
    def test_bad_options_name_the_option(self, kwargs: dict[str, object], path: str) -> None:
        """Every bad option (NaN and infinity included) is refused naming its flag; so is a
        Creators token fault on a PA-API run, which has no token."""
        with pytest.raises(ConfigError) as info:
            BenchOptions(**kwargs)  # type: ignore[arg-type]
        assert info.value.path == path

    def test_fault_specs_parse_to_rates(self) -> None:
        """--fault KIND=P pairs become a rate table."""
        assert _faults(["error_503=0.02", "reset=0.5"]) == {"error_503": 0.02, "reset": 0.5}

    @pytest.mark.parametrize("spec", ["error_503", "error_503=x", "reset=1.5", "reset=-0.1"])
    def test_bad_fault_specs_are_refused(self, spec: str) -> None:
        """A fault spec without a probability in [0, 1] is refused."""
        with pytest.raises(ConfigError):
            _faults([spec])


class TestSimulatorProcess:
    def test_toml_document_round_trips_through_tomllib(self) -> None:
        """The TOML writer produces what tomllib reads back as the same table."""
        table = BenchOptions(keys=2, faults={"reset": 0.25}).simulator_settings()
        assert tomllib.loads(toml_document({"simulator": table}))["simulator"] == table

    def test_bad_settings_fail_before_a_process_starts(self) -> None:
        """Invalid settings raise a ConfigError in the parent, naming the key."""
        with pytest.raises(ConfigError, match="burst"):
            SimulatorProcess({"burst": 0})

    def test_child_serves_and_stops(self) -> None:
        """The child prints its URL, answers /_sim/stats, and is gone after the block."""
        import urllib.request

        with SimulatorProcess({"seed": 1}) as sim:
            assert sim.url.startswith("http://127.0.0.1:")
            with urllib.request.urlopen(f"{sim.url}/_sim/stats?timestamps=0") as response:
                assert "requests" in json.loads(response.read())
            pid = sim.pid
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    def test_no_temporary_directory_outlives_the_start(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Once the child has read its settings, their temporary directory is gone: a parent
        killed by SIGKILL left one in /tmp for good each time."""
        import tempfile

        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        with SimulatorProcess({}) as sim:
            assert sim.url
            assert list(tmp_path.iterdir()) == []

    def test_a_child_that_dies_at_start_is_reported_with_its_stderr(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A child that exits before printing its URL is reported with what it wrote on
        stderr, and leaves no temporary directory."""
        import tempfile

        fake = tmp_path / "code" / "broker"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text("")
        (fake / "__main__.py").write_text(
            "import sys\nprint('the child could not start: boom', file=sys.stderr)\nsys.exit(3)\n"
        )
        (tmp_path / "tmp").mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
        monkeypatch.setenv("PYTHONPATH", str(fake.parent))
        monkeypatch.chdir(tmp_path)
        with (
            pytest.raises(SimulatorStartError, match="could not start: boom"),
            SimulatorProcess({}),
        ):
            pass
        assert list((tmp_path / "tmp").iterdir()) == []


class TestRun:
    def test_short_run_is_paced_within_the_quota(self) -> None:
        """A short run gets answers for every request and never exceeds the allowed rate."""
        options = BenchOptions(
            keys=2, tps=10.0, burst=2, duration_s=1.5, warmup_s=0.5, latency_ms=0, jitter_ms=0
        )
        report = run_bench(options)
        assert report.requests > 0
        assert report.asins == sum(report.items_by_status.values()) > 0
        assert set(report.items_by_status) == {"ok"}
        assert report.allowed_per_s == 20.0
        # A bucket of depth 2 lets through at most R*T + B - 1 per key in the window.
        assert report.granted <= 20.0 * report.window_s + 2 * (2 - 1) + 2
        assert report.latency_p50_ms is not None
        assert report.cpu_us_per_request is not None
        table = render_table([report])
        assert "granted/allowed" in table
        assert "2 key(s) x 10 TPS, server burst 2" in table

    def test_faults_are_injected_and_counted(self) -> None:
        """Injected faults are counted in the report and retried, losing no ASIN. (A 2-s
        window: in 1 s, on a loaded machine, every 503 of the window was answered after it
        ended, so its retry fell outside.)"""
        options = BenchOptions(
            tps=0,
            duration_s=2.0,
            warmup_s=0.3,
            latency_ms=0,
            jitter_ms=0,
            faults={"error_503": 0.2},
        )
        report = run_bench(options)
        assert report.faults_injected.get("error_503", 0) > 0
        assert report.retries > 0
        assert report.utilisation_pct is None
        assert "failed" not in report.items_by_status

    def test_a_run_leaves_nothing_in_the_machines_state_file(self, tmp_path: Path) -> None:
        """The bench's key state lives and dies with the run: each run's simulator has a new
        port, so its keys are new, and the machine's file gathered two rows per run of
        two keys, for ever."""
        options = BenchOptions(keys=2, tps=0, duration_s=0.3, warmup_s=0.1, latency_ms=0)
        run_bench(options)
        state_dir = tmp_path / "xdg-state"
        assert not list(state_dir.rglob("keys.sqlite3*"))

    def test_a_rate_below_the_configs_floor_runs(self) -> None:
        """``--tps 0.01`` runs (the floor after 429s goes below it); it was refused with
        ``rate.min_rate: 0.05 is not below keys[0].tps``, keys the user never wrote."""
        report = run_bench(BenchOptions(tps=0.01, duration_s=0.3, warmup_s=0.1, latency_ms=0))
        assert report.allowed_per_s == 0.01

    def test_faults_that_take_every_key_out_end_with_one_line(self) -> None:
        """``--fault expired_token=1`` takes the only key out: the bench says so in one line
        and exits 77 (a key was rejected), as ``broker run`` does; it ended with a
        NoUsableKeyError traceback and exit 1."""
        completed = _bench_cli(
            "--duration", "1", "--warmup", "0.2", "--latency-ms", "0", "--fault", "expired_token=1"
        )
        assert completed.returncode == 77, completed.stderr
        assert "Traceback" not in completed.stderr
        assert "no key can serve" in completed.stderr
        assert "--fault" in completed.stderr

    def test_cli_prints_one_json_line_per_loop(self) -> None:
        """``broker bench --json`` runs each requested loop and prints one JSON line each."""
        completed = _bench_cli(
            *("--tps", "0", "--duration", "0.5", "--warmup", "0.2"),
            *("--latency-ms", "0", "--jitter-ms", "0"),
            *("--loop", "uvloop", "--loop", "asyncio", "--json"),
        )
        assert completed.returncode == 0, completed.stderr
        lines = [json.loads(line) for line in completed.stdout.splitlines()]
        assert [line["options"]["loop"] for line in lines] == ["uvloop", "asyncio"]
        assert all(line["requests"] > 0 for line in lines)

    def test_cli_refuses_a_bad_fault_with_exit_2(self) -> None:
        """A bad --fault is a usage error (exit 2) that lists the known kinds."""
        completed = _bench_cli("--fault", "gremlins=0.1")
        assert completed.returncode == 2
        assert "error_503" in completed.stderr


@pytest.mark.parametrize(
    ("sig", "then"),
    [
        (signal.SIGTERM, None),
        (signal.SIGINT, None),
        (signal.SIGHUP, None),
        (signal.SIGTERM, signal.SIGINT),
    ],
)
def test_a_stopped_bench_stops_its_simulator(
    sig: signal.Signals, then: signal.Signals | None, tmp_path: Path
) -> None:
    """SIGTERM (a supervisor's stop), Ctrl-C or SIGHUP ends the run without a traceback, and
    the simulator child and its temporary directory go with it; a second signal during
    that cleanup does not interrupt it. (SIGHUP took the default action: the child ran on.)"""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    with sighup_at_default():
        bench = subprocess.Popen(
            [sys.executable, "-m", "broker", "bench", "--tps", "0", "--duration", "60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    assert bench.stderr is not None
    assert "running" in bench.stderr.readline()
    children = [int(pid) for pid in _children(bench.pid)]
    deadline = time.monotonic() + 30
    while not children and time.monotonic() < deadline:
        time.sleep(0.05)
        children = [int(pid) for pid in _children(bench.pid)]
    assert children
    time.sleep(0.5)
    bench.send_signal(sig)
    if then is not None:
        time.sleep(0.05)
        bench.send_signal(then)
    try:
        _, err = bench.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        bench.kill()  # not left running (and its pipes open) into the tests after this one
        bench.communicate()
        raise
    assert "Traceback" not in err
    assert "stopped" in err
    assert bench.returncode == 128 + sig
    # A signal that cut into the child's start (inside Popen, on a busy machine) leaves the
    # child to stop with the bench, within a second (--exit-with-parent), not at once.
    deadline = time.monotonic() + 3
    running = children
    while running and time.monotonic() < deadline:
        time.sleep(0.05)
        running = [c for c in children if Path(f"/proc/{c}").exists() and not _zombie(c)]
    assert not running
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("asinb-sim-")]


def test_a_stop_during_the_simulator_s_start_leaves_no_temporary_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop signal landing inside the child's start (here, in Popen) still removes the
    simulator's temporary directory; only a stop while its URL was awaited did."""
    import subprocess as subprocess_module
    import tempfile

    from broker.simulator.process import SimulatorProcess

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(subprocess_module, "Popen", interrupted)
    with pytest.raises(KeyboardInterrupt), SimulatorProcess({}):
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_bench_killed_by_sigkill_leaves_no_simulator_running() -> None:
    """A process that started the simulator child (as broker bench does) and dies by
    SIGKILL, no cleanup running, leaves the child to stop by itself within seconds,
    instead of serving on for good as an orphan."""
    code = (
        "import time\n"
        "from broker.simulator.process import SimulatorProcess\n"
        "with SimulatorProcess({}) as sim:\n"
        "    print(sim.pid, flush=True)\n"
        "    time.sleep(60)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
    ) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        parent.kill()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists() and not _zombie(child):
        time.sleep(0.1)
    alive = Path(f"/proc/{child}").exists() and not _zombie(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_signal_as_the_run_starts_stops_it(loop: str) -> None:
    """A stop signal that lands as the event loop starts, before the run's first step,
    stops the bench (exit 130): it was swallowed by the loop, and the run went on to the
    end, deaf to any further Ctrl-C."""
    code = (
        "import os, signal\n"
        "import broker.bench as bench\n"
        "from broker import cli\n"
        "real = bench.loop_factory\n"
        "def factory(name):\n"
        "    make = real(name)\n"
        "    def new():\n"
        "        loop = make()\n"
        "        loop.call_soon(os.kill, os.getpid(), signal.SIGINT)\n"
        "        return loop\n"
        "    return new\n"
        "bench.loop_factory = factory\n"
        "argv = ['bench', '--tps', '0', '--duration', '30', '--loop', " + repr(loop) + "]\n"
        "raise SystemExit(cli.main(argv))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 128 + signal.SIGINT, done.stderr
    assert "stopped by SIGINT; no figures" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_stop_whose_raise_was_lost_still_stops_the_run() -> None:
    """A stop signal whose Stopped was raised where Python drops exceptions (a weakref
    callback: "Exception ignored in ...") before the loop ran still stops the bench at once
    (exit 129 for SIGHUP): the stop signals were ignored from then on, and the run went on
    to its end (a CI run hung its 60 s)."""
    code = (
        "import signal, sys, time\n"
        "import broker.bench as bench\n"
        "from broker import cli\n"
        "try:\n"
        "    bench._stop_signal(signal.SIGHUP, None)\n"
        "except bench.Stopped:\n"
        "    pass  # lost, as in a weakref callback\n"
        "started = time.monotonic()\n"
        "code = cli.main(['bench', '--tps', '0', '--duration', '30'])\n"
        "print(code, round(time.monotonic() - started))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    exit_code, seconds = done.stdout.split()
    assert int(exit_code) == 128 + signal.SIGHUP, done.stderr
    assert int(seconds) < 20
    assert "stopped by SIGHUP; no figures" in done.stderr


def test_a_lost_stop_is_no_traceback() -> None:
    """The Stopped Python drops (raised in a weakref callback) is not printed as an
    "Exception ignored" traceback among the bench's lines; any other such error is."""
    from types import SimpleNamespace

    from broker import bench

    told: list[object] = []
    bench._unraisable(told.append, SimpleNamespace(exc_value=bench.Stopped(signal.SIGHUP)))
    assert told == []
    other = SimpleNamespace(exc_value=ValueError("x"))
    bench._unraisable(told.append, other)
    assert told == [other]


def test_stop_signals_stay_ignored_after_a_stop() -> None:
    """Once a stop signal has stopped the bench, a second one on its way out is ignored, not
    a kill by the default action (a SIGINT 50 ms after a SIGTERM exited -2)."""
    code = (
        "import signal, sys\n"
        "import broker.bench as bench\n"
        "def stopped(args):\n"
        "    bench._stop_signal(signal.SIGTERM, None)\n"
        "bench._bench = stopped\n"
        "assert bench.bench_command(None) == 128 + signal.SIGTERM\n"
        "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN,"
        " signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]


def test_a_sigint_ignored_at_start_stays_ignored(tmp_path: Path) -> None:
    """Started with SIGINT ignored (a script's background job), the bench is not stopped by
    one: it runs to the end and prints its figures, as the shell meant."""
    bench = subprocess.Popen(
        [sys.executable, "-m", "broker", "bench", "--tps", "0", "--duration", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert bench.stderr is not None
    assert "running" in bench.stderr.readline()
    time.sleep(1.0)
    bench.send_signal(signal.SIGINT)
    out, err = bench.communicate(timeout=60)
    assert bench.returncode == 0, err
    assert "req/s" in out


def _children(pid: int) -> list[str]:
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(stat_file.parent.name)
    return found


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_report_json_is_serialisable() -> None:
    """A report's JSON form holds every figure and dumps without custom encoders."""
    report = BenchReport(
        options=BenchOptions(),
        window_s=2.0,
        requests=10,
        asins=100,
        items_by_status={"ok": 100},
        granted=10,
        throttled_server=0,
        allowed_per_s=5.0,
        throttled_client=0,
        retries=0,
        latency_p50_ms=50.0,
        latency_p99_ms=60.0,
        cpu_s=0.01,
        peak_rss_mb=60.0,
        faults_injected={},
    )
    data = json.loads(json.dumps(report.to_json()))
    assert data["utilisation_pct"] == 100.0
    assert data["cpu_us_per_request"] == 1000.0
    assert data["asins_per_s"] == 50.0


def test_a_simulator_that_fails_to_start_reports_its_stderr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the child never prints its URL, the error carries the child's stderr."""
    import broker.simulator.process as process

    monkeypatch.setattr(process, "_READY", __import__("re").compile(r"never matches \d{99}"))
    with pytest.raises(SimulatorStartError, match="simulator did not start"), SimulatorProcess({}):
        pass


def test_the_simulator_child_runs_this_broker_whatever_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``broker.py`` in the directory bench runs from (the user's own script, another
    clone) is not what the child runs: ``python -m`` put the working directory first on
    the child's path, and bench ran that script, then failed with a traceback."""
    (tmp_path / "broker.py").write_text("print('my own broker.py script ran')\n")
    monkeypatch.chdir(tmp_path)
    with SimulatorProcess({}) as sim:
        assert sim.url.startswith("http://127.0.0.1:")


def test_a_broker_reached_through_a_link_is_put_on_the_childs_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker imported through a linked package from the working directory (``proj/broker
    -> checkout/broker``, run from ``proj``) is put on the child's path as that folder: the
    link was resolved, the folder taken for another, and the child (``-P``) found no
    broker."""
    import broker
    import broker.simulator.process as process

    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "broker").symlink_to(Path(broker.__file__).parent)
    monkeypatch.chdir(proj)
    monkeypatch.setattr(process, "__file__", str(proj / "broker" / "simulator" / "process.py"))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    seen: dict[str, str] = {}

    def popen(command: list[str], **options: Any) -> None:
        seen.update(options["env"])
        raise OSError("not started")

    monkeypatch.setattr(process.subprocess, "Popen", popen)
    with pytest.raises(OSError, match="not started"), SimulatorProcess({}):
        pass
    assert seen["PYTHONPATH"] == str(proj)


def test_bench_says_in_one_line_that_the_simulator_did_not_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A simulator child that never starts is one line on stderr and exit 1, no figures
    and no traceback."""
    import broker.simulator.process as process
    from broker.cli import main

    monkeypatch.setattr(process, "_READY", __import__("re").compile(r"never matches \d{99}"))
    monkeypatch.setattr(process, "_START_TIMEOUT_S", 5.0)
    assert main(["bench", "--duration", "1", "--warmup", "0"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "bench: the simulator did not start" in err
    assert err.rstrip().endswith("no figures")


class _Answering:
    """A transport that answers each request after ``delay_s`` (forever: None)."""

    def __init__(self, delay_s: float | None) -> None:
        self.delay_s = delay_s

    async def send(self, request: object) -> object:
        import asyncio

        if self.delay_s is None:
            await asyncio.Event().wait()
        else:
            await asyncio.sleep(self.delay_s)
        return "answer"


class _Failing:
    """A transport whose every request times out."""

    async def send(self, request: object) -> object:
        raise TimeoutError("no answer")


async def test_latency_counts_getitems_requests_that_ended() -> None:
    """The latency figures time the GetItems requests that ended, answered or failed: a
    token call is not one (a bench whose every token call failed showed p50 1.6 ms), nor a
    request cut off when the run ended (a hung one showed the whole window as its latency)."""
    import asyncio

    from broker.api.base import HttpRequest
    from broker.bench import _TimedTransport

    now = [0.0]
    token = HttpRequest("POST", "http://127.0.0.1:1/auth/o2/token", {}, b"")
    get_items = HttpRequest("POST", "http://127.0.0.1:1/catalog/v1/getItems", {}, b"")
    signed = HttpRequest("POST", "http://127.0.0.1:1/paapi5/getitems", {}, b"")
    timed = _TimedTransport(_Answering(0.0), lambda: now[0])  # type: ignore[arg-type]
    for request in (token, get_items, signed):
        await timed.send(request)
    assert len(timed.samples) == 2
    failing = _TimedTransport(_Failing(), lambda: now[0])  # type: ignore[arg-type]
    with pytest.raises(TimeoutError):
        await failing.send(get_items)
    assert len(failing.samples) == 1  # a request that ended in an error took its time too
    hung = _TimedTransport(_Answering(None), lambda: now[0])  # type: ignore[arg-type]
    task = asyncio.ensure_future(hung.send(get_items))
    await asyncio.sleep(0.01)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert list(hung.samples) == []


def test_latencies_are_those_of_the_requests_that_ended_in_the_window() -> None:
    """A request counts in the window it ends in, as the README says: a 30-s hang begun
    in the warm-up or in the window and ending in it is counted (by when it began, no hang
    was ever counted in the default 30-s window); one ending after it is not."""
    samples = [(0.5, 30.1), (5.0, 0.2), (10.0, 30.0), (29.9, 0.2)]  # (began, seconds)
    # The warm-up's hang ends in the window; the window's own ends after it.
    assert window_latencies_ms(samples, 3.0, 33.0) == pytest.approx([200.0, 200.0, 30_100.0])
    assert window_latencies_ms(samples, 3.0, 45.0) == pytest.approx(
        [200.0, 200.0, 30_000.0, 30_100.0]
    )
