"""The scripts in benchmarks/ keep working: each runs once, tiny, and reports what it promises.

Each script runs as a subprocess in ``--quick`` mode (shrunk further with its own options so
this file stays well under a minute), with ``--results-dir`` pointing at a temporary
directory, so CI never touches the committed figures. The numbers are not judged (the machine
is shared and noisy); the shape of the JSON line, the files written and the absence of
failures are. A few pure helpers are checked directly.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from broker.state.redis_server import redis_server_binary

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(script: str, tmp_path: Path, *args: str, timeout: float = 90.0) -> dict[str, Any]:
    """Run ``benchmarks/<script>`` and return its one JSON line (after checking it is one)."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--results-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, done.stdout[-2000:]
    body: dict[str, Any] = json.loads(lines[0])
    assert isinstance(body["machine"]["loadavg_1_5_15"], list)
    return body


def _written(tmp_path: Path, name: str, body: dict[str, Any]) -> None:
    """A quick run writes ``<name>-quick.json`` (the same JSON), never ``<name>.json``."""
    assert json.loads((tmp_path / f"{name}-quick.json").read_text()) == body
    assert not (tmp_path / f"{name}.json").exists()


def _check_plot(body: dict[str, Any], path: Path) -> None:
    if HAVE_MATPLOTLIB:
        assert body["plot"] == str(path)
        assert path.read_bytes()[:8] == PNG_MAGIC
    else:
        assert body["plot"] is None
        assert not path.exists()


def test_overhead_quick(tmp_path: Path) -> None:
    """overhead.py measures the pipeline (both key states), bare, bare+json, bare+parse, peer."""
    body = _run(
        "overhead.py", tmp_path, "--quick", "--loop", "uvloop", "--requests", "40", "--repeat", "1"
    )
    assert body["benchmark"] == "overhead"
    assert body["settings"]["quick"] is True
    assert body["settings"]["peer"] == "python-amazon-paapi 7.1.0"
    creators, paapi = body["results"]["uvloop/creators"], body["results"]["uvloop/paapi5"]
    assert set(creators) >= {
        "pipeline",
        "pipeline-mem",
        "bare",
        "bare+json",
        "bare+parse",
        "peer",
        "ratio_peer_to_bare",
        "ratio_pipeline_mem_to_bare",
        "ratio_bare_parse_to_bare",
        "ratio_pipeline_to_bare_parse",
    }
    assert "peer" not in paapi
    assert "ratio_pipeline_to_bare" in paapi
    for entry in (creators, paapi):
        for variant in ("pipeline", "pipeline-mem", "bare", "bare+json", "bare+parse", "peer"):
            if variant in entry:
                assert entry[variant]["failed"] == 0
                assert entry[variant]["requests"] == 40
                assert entry[variant]["cpu_us_per_request"] > 0
    # Every ASIN came back, from the peer too.
    assert creators["peer"]["samples"][0]["items"] == 400
    _written(tmp_path, "overhead", body)


def test_engine_cost_quick(tmp_path: Path) -> None:
    """engine_cost.py measures the engine at 10 and 1 ASINs a request and the floor; splits them."""
    body = _run("engine_cost.py", tmp_path, "--quick", "--requests", "60")
    assert body["benchmark"] == "engine_cost"
    assert body["settings"]["quick"] is True
    # Every request found the answer prepared for it: nothing rendered inside the clock.
    assert body["unprepared"] == 0
    results = body["results"]
    for name in ("engine-10", "engine-1", "floor"):
        assert results[name]["failed"] == 0
        assert results[name]["requests"] == 60
        assert results[name]["cpu_us_per_request"] > 0
    ten = results["engine-10"]["cpu_us_per_request"]
    one = results["engine-1"]["cpu_us_per_request"]
    split = body["split"]
    assert split["per_asin_us"] == pytest.approx((ten - one) / 9, abs=0.06)
    assert split["per_request_us"] == pytest.approx(one - split["per_asin_us"], abs=0.11)
    assert split["floor_per_asin_us"] == pytest.approx(
        results["floor"]["cpu_us_per_request"] / 10, abs=0.06
    )
    _written(tmp_path, "engine_cost", body)


def test_instructions_quick_without_valgrind(tmp_path: Path) -> None:
    """instructions.py runs both clients at two sizes on prepared answers, without counting
    and without writing."""
    body = _run(
        "instructions.py",
        tmp_path,
        "--quick",
        "--no-valgrind",
        "--small",
        "20",
        "--large",
        "40",
        "--repeat",
        "1",
    )
    assert body["benchmark"] == "instructions"
    assert body["settings"] == {
        "quick": True,
        "small": 20,
        "large": 40,
        "valgrind": False,
        "repeat": 1,
        "concurrency": 16,
        "loop": "uvloop",
        "protocol": "creators",
        "state": "memory",
    }
    for name in ("engine-10", "floor"):
        result = body["results"][name]
        assert result["failed"] == 0
        # The children read every answer the parent rendered: nothing rendered in a count.
        assert result["unprepared"] == 0
        assert result["instructions_per_request"] is None
        assert result["instructions_runs"] == {"20": [None], "40": [None]}
    assert body["engine_10_to_floor"] is None
    # Nothing counted, nothing written: it would replace the figures the README quotes.
    assert list(tmp_path.glob("instructions*.json")) == []


def test_instructions_without_valgrind_says_how_to_get_it(tmp_path: Path) -> None:
    """With no valgrind on the PATH the script exits 69 and names the package."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "instructions.py"), "--results-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
        env={"PATH": str(tmp_path), "HOME": str(tmp_path)},
    )
    assert done.returncode == 69, done.stderr[-2000:]
    assert "apt-get install valgrind" in done.stderr
    assert not list(tmp_path.glob("*.json"))


def test_utilisation_quick(tmp_path: Path) -> None:
    """utilisation.py reports broker and peer side by side, a halving and a keys sweep."""
    body = _run(
        "utilisation.py",
        tmp_path,
        "--quick",
        "--scenario",
        "halving",
        "--keys",
        "1",
        "--duration",
        "2",
        "--warmup",
        "1",
        "--after-halving",
        "2",
        "--keys-sweep",
        "2",
        "--sweep-duration",
        "2",
    )
    assert body["benchmark"] == "utilisation"
    halving = body["scenarios"]["halving"]
    assert set(halving) >= {"window", "after_halving", "client", "peer", "met"}
    # 2 s after the drop: too short for the target, which counts 120 s (it said "met").
    assert halving["met"] is None
    assert halving["after_halving"]["true_tps"] == 2.5
    assert set(halving["peer"]["client"]) >= {"asins_lost", "run", "window", "calls"}
    assert halving["peer"]["window"]["accepted"] > 0
    assert halving["window"]["accepted"] > 0
    sweep = body["sweep"]["2"]
    assert sweep["keys"] == 2
    assert set(sweep["window"]["keys"]) == {"k0", "k1"}
    assert set(sweep["peer"]["window"]["keys"]) == {"peer0", "peer1"}
    assert sweep["client"]["asins_lost"] == 0
    _written(tmp_path, "utilisation", body)
    _check_plot(body, tmp_path / "utilisation-quick.png")


def test_adaptation_quick(tmp_path: Path) -> None:
    """adaptation.py samples both clients per second through a down-and-up schedule."""
    body = _run(
        "adaptation.py",
        tmp_path,
        "--quick",
        "--schedule",
        "2:5,3:2.5,3:5",
        "--keys",
        "1",
        "--warmup",
        "1",
    )
    assert body["benchmark"] == "adaptation"
    assert body["bins"] == list(range(8))
    assert [c["tps"] for c in body["changes"]] == [5.0, 2.5, 5.0]
    for client in ("broker", "peer"):
        side = body[client]
        assert [p["true_tps"] for p in side["phases"]] == [5.0, 2.5, 5.0]
        assert all(len(v) == 8 for v in side["sent"].values())
        assert "throttled_per_key_after_drop" in side["phases"][1]
        assert "recovery_s_per_key" in side["phases"][2]
        assert sum(sum(v) for v in side["accepted"].values()) > 0
    assert set(body["broker"]["own_rate"]) == {"k0"}
    assert body["broker"]["asins_lost"] == 0
    _written(tmp_path, "adaptation", body)
    _check_plot(body, tmp_path / "adaptation-quick.png")


def test_scale_quick(tmp_path: Path) -> None:
    """scale.py runs a job through `broker run`: one output row per input row, RSS sampled."""
    body = _run("scale.py", tmp_path, "--quick", "--rows", "3000")
    assert body["benchmark"] == "scale"
    result = body["results"]
    assert result["exit_code"] == 0
    assert result["rows_out"] == 3000
    assert result["statuses_as_expected"] is True
    assert result["job"]["duplicates"] > 0
    assert result["job"]["invalid"] > 0
    assert result["peak_rss_mb"] > 0
    assert result["rss_mb_at_end"] is not None
    _written(tmp_path, "scale", body)


def test_daemon_memory_quick(tmp_path: Path) -> None:
    """daemon_memory.py files every job through `broker serve` and samples its RSS."""
    body = _run("daemon_memory.py", tmp_path, "--quick", "--waiting", "20")
    assert body["benchmark"] == "daemon_memory"
    result = body["results"]
    assert (result["done"], result["failed"]) == (300, 0)
    assert result["rss_mb_at_early"] > 0
    assert result["rss_mb_at_end"] > 0
    assert result["rss_growth_bytes_per_job"] is not None
    assert result["jobs_per_s_first_tenth"] > 0
    assert result["jobs_per_s_last_tenth"] > 0
    _written(tmp_path, "daemon_memory", body)


def test_sigterm_stops_daemon_memory_and_its_daemon(tmp_path: Path) -> None:
    """SIGTERM to daemon_memory.py stops it with 143 and no figures, its daemon and
    simulator with it, and leaves no temporary directory."""
    argv = [str(BENCHMARKS / "daemon_memory.py"), "--quick", "--jobs", "100000"]
    err = _stopped_with_sigterm(argv, tmp_path, after_s=5.0)
    assert "Traceback" not in err


def test_pacer_precision_quick(tmp_path: Path) -> None:
    """pacer_precision.py reports achieved rates for our pacer and aiolimiter."""
    body = _run("pacer_precision.py", tmp_path, "--quick", "--rates", "10,100")
    assert body["benchmark"] == "pacer_precision"
    assert set(body["results"]) >= {"pacer_r10", "pacer_r100", "aiolimiter_1_per_0.1s_r10"}
    assert body["results"]["pacer_r100"]["sends"] > 50
    _written(tmp_path, "pacer_precision", body)


def test_pacer_precision_measures_as_many_gaps_as_it_says(tmp_path: Path) -> None:
    """A rate whose run is as short as its minimum of gaps allows (--quick: 3) has that many
    gaps measured, each stamp a send: one fewer, as the first send and the one due at the
    run's very end both fell out of the count."""
    body = _run("pacer_precision.py", tmp_path, "--quick", "--rates", "20", "--seconds", "0.01")
    for name in ("pacer_r20", "aiolimiter_1_per_0.05s_r20"):
        assert body["results"][name]["sends"] >= body["min_gaps"] + 1, name


def test_burst1_model_quick(tmp_path: Path) -> None:
    """burst1_model.py reports the controller's steady state and its windows' scatter."""
    body = _run("burst1_model.py", tmp_path, "--quick", "--trials", "3", "--steady", "120")
    assert body["benchmark"] == "burst1_model"
    results = body["results"]
    assert results["bound_2pct"] == 84.41
    assert 0 < results["steady"]["utilisation_pct"] < results["bound_2pct"]
    assert results["windows"]["trials"] == 3
    assert 0 <= results["windows"]["met"] <= 3
    _written(tmp_path, "burst1_model", body)


# -- helpers, in process ----------------------------------------------------------------------


@pytest.fixture
def bench_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmarks directory on sys.path, as it is for the scripts themselves."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))


@pytest.mark.usefixtures("bench_modules")
@pytest.mark.parametrize(
    ("script", "argv"),
    [
        ("utilisation", ["--duration", "0"]),
        ("utilisation", ["--after-halving", "-5"]),
        ("utilisation", ["--warmup", "-1"]),
        ("overhead", ["--requests", "0"]),
        ("engine_cost", ["--repeat", "0"]),
        ("instructions", ["--small", "0"]),
        ("shared_key", ["--processes", "2", "0"]),
        ("pacer_precision", ["--seconds", "nan"]),
        ("burst1_model", ["--trials", "0"]),
    ],
)
def test_a_zero_or_negative_window_or_count_is_refused(
    script: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """0, a negative number or NaN for a window, a count or a run time is a usage error
    (exit 2) naming the flag, not a silent fall back to the default."""
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as info:
        module.main([*argv, "--no-write"])
    assert info.value.code == 2
    assert argv[0] in capsys.readouterr().err


@pytest.mark.usefixtures("bench_modules")
def test_warmup_zero_means_no_warm_up() -> None:
    """--warmup 0 is read as no warm-up (it used to mean the default)."""
    from _harness import non_negative

    assert non_negative("0") == 0.0


@pytest.mark.usefixtures("bench_modules")
def test_broker_bench_defaults_to_the_benchmarks_latency() -> None:
    """With its defaults `broker bench` has the simulator add what benchmarks/ adds (40 ms
    plus an exponential draw of mean 10 ms, each way), so it measures what is published."""
    from _harness import LATENCY

    from broker.bench import BenchOptions
    from broker.simulator.settings import SimulatorSettings

    settings = SimulatorSettings.from_mapping(BenchOptions().simulator_settings())
    assert (settings.latency.fixed_ms, settings.latency.exp_mean_ms) == (
        LATENCY["fixed_ms"],
        LATENCY["exp_mean_ms"],
    )


@pytest.mark.usefixtures("bench_modules")
def test_scale_job_holds_what_it_says(tmp_path: Path) -> None:
    """The generated job has the stated rows, repeats and invalid ids, one per line."""
    import scale

    job = scale.write_job(tmp_path / "job.txt", 5000, duplicate_share=0.2, invalid_share=0.01)
    lines = (tmp_path / "job.txt").read_text().splitlines()
    assert len(lines) == job.rows == 5000
    assert job.unique + job.duplicates + job.invalid == 5000
    assert len(set(lines)) == job.unique + job.invalid
    assert sum(1 for line in lines if len(line) != 10) == job.invalid
    assert 800 < job.duplicates < 1200


@pytest.mark.usefixtures("bench_modules")
def test_peer_calls_are_counted_in_their_window() -> None:
    """Lost ASINs are the calls that raised, counted by finish time within the window."""
    from _peer import PeerCall, summarise_calls

    calls = [
        PeerCall("peer0", 1.0, 10, "ok"),
        PeerCall("peer0", 2.0, 10, "TooManyRequestsError"),
        PeerCall("peer1", 3.0, 7, "ok"),
        PeerCall("peer1", 4.0, 10, "TooManyRequestsError"),
    ]
    assert summarise_calls(calls) == {
        "asins_answered": 17,
        "asins_lost": 20,
        "lost_pct": 54.05,
        "lost_by_error": {"TooManyRequestsError": 20},
    }
    assert summarise_calls(calls, 1.5, 3.5)["asins_lost"] == 10
    assert summarise_calls(calls, 1.5, 3.5)["asins_answered"] == 7


@pytest.mark.usefixtures("bench_modules")
def test_burst1_target_is_the_jitter_bound() -> None:
    """The burst-1 bound is benchmarks/README.md's: 84.4 % at 5 TPS, 94.9 % at 1 TPS."""
    import utilisation

    assert round(utilisation.burst1_bound_pct(5.0), 1) == 84.4
    assert round(utilisation.burst1_bound_pct(1.0), 1) == 94.9
    burst1 = next(s for s in utilisation.SCENARIOS if s.name == "burst1")
    window = {"utilisation_pct": 82.0, "share_429_pct": 1.5, "throttled": 3}
    assert utilisation._judge(burst1, {"window": window}, 5.0)
    assert not utilisation._judge(burst1, {"window": {**window, "share_429_pct": 2.5}}, 5.0)
    assert not utilisation._judge(burst1, {"window": window}, 1.0)


@pytest.mark.usefixtures("bench_modules")
def test_adaptation_schedule_and_recovery() -> None:
    """A schedule parses to phases; recovery is the first 5 s mean at >= 90 % of the rate."""
    import adaptation

    assert adaptation.parse_schedule("20:5,40:2.5") == [
        adaptation.Phase(20.0, 5.0),
        adaptation.Phase(40.0, 2.5),
    ]
    with pytest.raises(argparse.ArgumentTypeError, match="SECONDS:TPS"):
        adaptation.parse_schedule("20-5")
    accepted = [2, 2, 2, 3, 4, 5, 5, 5, 5, 5, 5]
    # From second 0: the mean of [4,5,5,5,5] (seconds 4..8) is the first >= 4.5.
    assert adaptation._recovery_s(accepted, 0, len(accepted), 5.0) == 9.0
    assert adaptation._recovery_s([1] * 10, 0, 10, 5.0) is None


def test_loop_stall_quick(tmp_path: Path) -> None:
    """loop_stall.py reports, for the job of rows final at ingestion and its --ordered run,
    the rows and the longest loop gap."""
    body = _run("loop_stall.py", tmp_path, "--quick", "--rows", "3000")
    assert body["benchmark"] == "loop_stall"
    for name in ("final", "ordered"):
        result = body["results"][name]
        assert result["rows"] == 3000
        assert result["max_gap_s"] >= 0
    _written(tmp_path, "loop_stall", body)


def test_product_cost_quick(tmp_path: Path) -> None:
    """product_cost.py reports, per protocol, the cost of a result unread, read and re-read."""
    body = _run("product_cost.py", tmp_path, "--quick", "--items", "50")
    assert body["benchmark"] == "product_cost"
    rows = body["rows"]
    assert {(r["protocol"], r["resources"]) for r in rows} == {
        (p, r) for p in ("creators", "paapi5") for r in ("default", "all")
    }
    for row in rows:
        assert row["items"] == 50
        for name in ("result_before_us", "result_unread_us", "first_read_us", "cached_read_us"):
            assert row[name] >= 0
        # A cached read is a slot lookup: never dearer than reading the JSON again.
        assert row["cached_read_us"] <= row["first_read_us"]
    _written(tmp_path, "product_cost", body)


def test_sigv4_cost_quick(tmp_path: Path) -> None:
    """sigv4_cost.py reports the CPU per signed request of our signer and of botocore's."""
    body = _run("sigv4_cost.py", tmp_path, "--quick", "--requests", "50")
    assert body["benchmark"] == "sigv4_cost"
    assert body["requests"] == 50
    assert set(body["us_per_request"]) == {"asin-broker", "botocore"}
    assert all(value > 0 for value in body["us_per_request"].values())
    _written(tmp_path, "sigv4_cost", body)


def test_cache_rerun_quick(tmp_path: Path) -> None:
    """A 200-ASIN quick run: day 2 hits the 90 % seen on day 1 and sends fewer requests."""
    body = _run(
        "cache_rerun.py", tmp_path, "--quick", "--asins", "200", "--tps", "200", timeout=120
    )
    _written(tmp_path, "cache_rerun", body)
    content = body["scenarios"]["content"]
    assert content["day2_rerun"]["hits"] == 180
    assert content["day2_rerun"]["requests"] < content["day2_no_cache"]["requests"]
    assert body["scenarios"]["with_offers"]["day2_rerun"]["hits"] == 0


def test_shared_key_quick_run(tmp_path: Path) -> None:
    """N = 2 for 2 s in each mode: the JSON line, its runs, decision costs and the files."""
    body = _run(
        "shared_key.py",
        tmp_path,
        "--quick",
        "--processes",
        "2",
        "--duration",
        "2",
        "--warmup",
        "0.5",
        timeout=240,
    )
    modes = {run["mode"] for run in body["runs"]}
    expected = {"independent", "local"} | ({"redis"} if redis_server_binary() else set())
    assert modes == expected
    for run in body["runs"]:
        assert run["processes"] == 2
        assert len(run["per_process_rps"]) == 2
        assert run["accepted"] > 0
    assert body["decision_us"]["local"] > 0
    _written(tmp_path, "shared_key", body)


@pytest.mark.parametrize(
    ("script", "args", "said"),
    [
        ("product_cost.py", ["--items", "0"], "--items: must be above 0"),
        ("sigv4_cost.py", ["--requests", "0"], "--requests: must be above 0"),
        ("pacer_precision.py", ["--rates", "10,-5"], "--rates: must be above 0"),
        # 22 intervals at 1e-9/s: 22,000,000,000 s of running.
        ("pacer_precision.py", ["--rates", "1e-9"], "the slowest rate this measures"),
        ("engine_cost.py", ["--concurrency", "0"], "--concurrency: must be above 0"),
        ("utilisation.py", ["--keys", "0"], "--keys: must be above 0"),
        ("adaptation.py", ["--schedule", "2:nan"], "--schedule: expected SECONDS:TPS"),
        ("scale.py", ["--duplicates", "2"], "--duplicates: must be from 0 up to 1"),
        ("scale.py", ["--keep", "{file}"], "give a new or empty directory"),
        ("scale.py", ["--keep", "{file}/sub"], "give a new or empty directory"),
        ("daemon_memory.py", ["--jobs", "0"], "--jobs: must be above 0"),
        ("cache_rerun.py", ["--new", "-0.5"], "--new: must be from 0 up to 1"),
        ("loop_stall.py", ["--results-dir", "{file}/results"], "is not a directory"),
        ("overhead.py", ["--concurrency", "5000"], "--concurrency: must be at most 1000"),
        ("engine_cost.py", ["--concurrency", "5000"], "--concurrency: must be at most 1000"),
        ("adaptation.py", ["--schedule", "5:2000"], "--schedule: expected SECONDS:TPS"),
        ("adaptation.py", ["--schedule", "2:5,2:1e-9"], "--schedule: expected SECONDS:TPS"),
        (
            "utilisation.py",
            ["--scenario", "none", "--keys-sweep", "none"],
            "--scenario none with --keys-sweep none runs nothing",
        ),
    ],
)
def test_a_value_no_run_can_use_is_a_usage_error(
    tmp_path: Path, script: str, args: list[str], said: str
) -> None:
    """A count, rate or share no run can use, or a results path that is a file, exits 2
    naming the option before anything runs; each was a traceback (ZeroDivisionError,
    IndexError, a ConfigError), a run of nonsense ("saved -3"), a failure at the end, a
    run of centuries, or an empty file over the published figures."""
    file = tmp_path / "a-file"
    file.write_text("")
    args = [arg.replace("{file}", str(file)) for arg in args]
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--no-write", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert said in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.usefixtures("bench_modules")
def test_a_key_slower_than_the_default_floor_is_configured(tmp_path: Path) -> None:
    """A benchmark key at 0.05/s or less gets a 429 floor below its rate: its config loads
    (it was a ConfigError, or `broker run` exiting 78, once the simulator had started)."""
    import scale
    from _harness import broker_config

    from broker.bench import creators_account
    from broker.config import load_config

    account = creators_account(0, tps=0.01)
    config = broker_config("http://127.0.0.1:9", [account], tps=0.01)
    assert config.rate.min_rate < 0.01
    scale.write_config(tmp_path / "c.toml", "http://127.0.0.1:9", account, tps=0.01, in_flight=1)
    loaded = load_config(tmp_path / "c.toml", environ={scale._SECRET_ENV: "s"})
    assert loaded.rate.min_rate < loaded.keys[0].tps == 0.01


def _stopped_with_sigterm(argv: list[str], tmp_path: Path, *, after_s: float) -> str:
    """Run a script in a private TMPDIR, SIGTERM it ``after_s`` after it started its first
    child (under its stop policy: before that, on a loaded machine still importing, the
    signal's default action ended it, -15), check it stopped as benchmarks/README.md says
    (exit 143, no figures, no children, no temporary files left) and return its stderr."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    results = tmp_path / "results"
    script = subprocess.Popen(
        [sys.executable, *argv, "--results-dir", str(results)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "TMPDIR": str(temp)},
    )
    deadline = time.monotonic() + 60.0
    while not _has_child(script.pid) and script.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(after_s)
    script.send_signal(signal.SIGTERM)
    _, err = script.communicate(timeout=30)
    assert script.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM: no figures written" in err
    assert not results.exists() or not any(results.iterdir())
    # The children (simulator, workers) go with it: none is left to recreate a file.
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and (any(temp.iterdir()) or _running(str(temp))):
        time.sleep(0.1)
    assert not _running(str(temp))
    assert list(temp.iterdir()) == []
    return err


def _has_child(pid: int) -> bool:
    """Whether the process ``pid`` has started a child that is still running."""
    try:
        return bool(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    except OSError:
        return False


def _running(marker: str) -> bool:
    """Whether a process whose command line names ``marker`` is running."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and marker.encode() in cmdline:
            return True
    return False


@pytest.mark.parametrize(
    "argv",
    [
        ["adaptation.py", "--quick", "--no-peer", "--loop", "uvloop"],
        ["utilisation.py", "--quick", "--no-peer", "--scenario", "burst2", "--keys-sweep", "none"],
    ],
)
def test_sigterm_stops_a_script_on_uvloop(tmp_path: Path, argv: list[str]) -> None:
    """SIGTERM during a run on uvloop stops the script with 143 and no figures; uvloop
    printed the handler's exception and ran on, and the run wrote its figures, exit 0."""
    _stopped_with_sigterm([str(BENCHMARKS / argv[0]), *argv[1:]], tmp_path, after_s=6.0)


def test_sigterm_stops_shared_keys_workers(tmp_path: Path) -> None:
    """SIGTERM to shared_key.py takes its worker processes with it, and their state file;
    the workers ran on to their end and recreated the removed temporary directory."""
    argv = [str(BENCHMARKS / "shared_key.py"), "--quick", "--modes", "local", "--processes", "2"]
    err = _stopped_with_sigterm(argv, tmp_path, after_s=6.0)
    assert "Traceback" not in err


@pytest.mark.usefixtures("bench_modules")
def test_daemon_memory_rates_a_stretch_one_sample_jumps_past() -> None:
    """A short last tenth that one 0.2-s sample jumps past is still rated (from the sample
    before it): it was None, and a quick run's check of it failed on a busy machine."""
    import daemon_memory

    samples = [(0.0, 0, 1), (1.0, 100, 1), (1.2, 120, 1)]
    assert daemon_memory._rate(samples, 108, 120) == 100.0
    assert daemon_memory._rate(samples, 0, 12) == 100.0
    # The first sample after the start may already hold filed jobs: rated from the start.
    assert daemon_memory._rate(samples[1:], 0, 12) == 100.0
