"""The spool's file operations under two daemons and crashes: claiming, refusing, filing."""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from broker.errors import ConfigError
from broker.jobs import serve
from broker.jobs.serve import Spool, SpoolJob
from broker.wholefile import copy_for


@pytest.fixture(name="spool")
def _spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    return spool


def _status(job: str) -> dict[str, object]:
    return {"job": job, "outcome": "failed", "error": "reserved"}


def _statuses(directory: Path) -> dict[str, Mapping[str, object]]:
    return {
        path.name: json.loads(path.read_text())
        for path in directory.iterdir()
        if path.name.endswith(".status.json")
    }


class TestRejectRace:
    """Two daemons refusing the same inbox entry: one files it, the other moves on."""

    def test_the_loser_neither_fails_nor_removes_the_winners_status(
        self, spool: Spool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The second daemon's refusal, interleaved with the first's, returns None quietly."""
        (spool.inbox / "r.out.csv").write_text("B000000001\n")
        other = Spool(spool.root)
        original = serve._write_status
        results: list[Path | None] = []
        started: list[bool] = []

        def interleaved(path: Path, status: Mapping[str, object]) -> None:
            if not started:
                started.append(True)
                results.append(other.reject("r.out.csv", _status("r.out.csv")))
            original(path, status)

        monkeypatch.setattr(serve, "_write_status", interleaved)
        results.append(spool.reject("r.out.csv", _status("r.out.csv")))
        filed = [path for path in results if path is not None]
        assert len(filed) == 1
        assert sorted(p.name for p in spool.failed.iterdir()) == [
            "r.out.csv",
            "r.out.csv.status.json",
        ]
        assert _statuses(spool.failed)["r.out.csv.status.json"]["job"] == "r.out.csv"
        assert not list(spool.inbox.iterdir())

    def test_an_entry_put_back_while_it_is_refused_is_left_to_be_refused_again(
        self, spool: Spool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A daemon starting just as another took the entry puts it back into inbox/
        (recover) before the refusal names it: the refusal ends quietly (None), as when the
        rename of its filing finds it gone, instead of raising FileNotFoundError."""
        (spool.inbox / "r.out.csv").write_text("B000000001\n")
        real_stat = os.stat

        def recovered_first(path: object, *args: object, **kwargs: object) -> os.stat_result:
            if serve._REFUSING in str(path):
                Spool(spool.root).recover()
            return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(serve.os, "stat", recovered_first)
        assert spool.reject("r.out.csv", _status("r.out.csv")) is None
        monkeypatch.undo()
        assert [p.name for p in spool.inbox.iterdir()] == ["r.out.csv"]
        assert not [p for p in spool.failed.iterdir()]

    def test_a_crash_mid_refusal_leaves_the_entry_to_be_refused_again(
        self, spool: Spool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A daemon that dies between taking the entry and filing it loses nothing: the next
        start puts the entry back into inbox/, where it is refused again."""
        (spool.inbox / "r.out.csv").write_text("B000000001\n")

        def crash(path: Path, status: Mapping[str, object]) -> None:
            raise SystemExit("killed")

        monkeypatch.setattr(serve, "_write_status", crash)
        with pytest.raises(SystemExit):
            spool.reject("r.out.csv", _status("r.out.csv"))
        monkeypatch.undo()
        assert Spool(spool.root).recover() == ["r.out.csv"]
        assert [p.name for p in spool.inbox.iterdir()] == ["r.out.csv"]
        assert [p.name for p in spool.failed.iterdir()] == []


def _finished_job(spool: Spool, name: str, rows: str) -> SpoolJob:
    (spool.processing / name).write_text("B000000001\n")
    job = spool.job(name, "jsonl")
    job.out.write_text(rows)
    return job


class TestFilingRace:
    """Two daemons filing two jobs at once into names one of them computes as free."""

    def test_a_name_one_daemon_chose_is_not_filed_over_by_another(
        self, spool: Spool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Daemon 1 files a.txt (done/a.txt taken, so as a-2.txt) while daemon 2 files a job
        named a-2.txt: each keeps its own name and rows. Both chose a-2.txt, and the second
        filing replaced the first's job file, outputs and status (a replica pair lost 10
        of 40 such jobs)."""
        earlier = _finished_job(spool, "a.txt", "earlier\n")
        spool.file(earlier, "done", {"job": "a.txt", "outcome": "done"})
        first = _finished_job(spool, "a.txt", "first\n")
        second = _finished_job(spool, "a-2.txt", "second\n")
        other = Spool(spool.root)
        original = serve._write_status
        filed: list[Path] = []
        started: list[bool] = []

        def interleaved(path: Path, status: Mapping[str, object], **options: object) -> None:
            if not started:  # daemon 1 chose its name; daemon 2 files meanwhile
                started.append(True)
                filed.append(other.file(second, "done", {"job": "a-2.txt", "outcome": "done"}))
            original(path, status, **options)  # type: ignore[arg-type]

        monkeypatch.setattr(serve, "_write_status", interleaved)
        filed.append(spool.file(first, "done", {"job": "a.txt", "outcome": "done"}))
        assert len({path.name for path in filed}) == 2
        rows = {
            json.loads((spool.done / f"{p.name}.status.json").read_text())["job"]: (
                spool.done / f"{p.name}.out.jsonl"
            ).read_text()
            for p in filed
        }
        assert rows == {"a.txt": "first\n", "a-2.txt": "second\n"}
        assert len([p for p in spool.done.iterdir() if p.suffix == ".txt"]) == 3
        assert not [p for p in spool.done.iterdir() if p.name.startswith(".")]


class TestFilingCrash:
    """A crash while a job is filed, then the job is filed again at the next start."""

    @pytest.mark.parametrize("crash_at", ["status", "status copy", "marker copy", "job file"])
    def test_refiling_overwrites_the_leftovers_instead_of_a_second_copy(
        self, spool: Spool, monkeypatch: pytest.MonkeyPatch, crash_at: str
    ) -> None:
        """The second filing takes the first one's name: done/ holds the job's rows once,
        and no hidden copy a status write killed mid-way left (it stayed there for good)."""
        job = _finished_job(spool, "crash.txt", '{"asin": "B000000001"}\n')
        crash: Callable[..., None]

        def crash(*args: object, **kwargs: object) -> None:
            raise SystemExit("killed")

        def killed_writing(path: Path, status: object, **options: object) -> None:
            # As a kill -9 in write_whole leaves it: the copy, never renamed nor removed.
            copy_for(path).write_text('{"job": "cra')
            raise SystemExit("killed")

        if crash_at == "status":
            monkeypatch.setattr(serve, "_write_status", crash)
        elif crash_at == "status copy":
            real = serve._write_status

            def status_killed(path: Path, status: object, **options: object) -> None:
                if path.name.endswith(".status.json"):
                    killed_writing(path, status)
                real(path, status, **options)  # type: ignore[arg-type]

            monkeypatch.setattr(serve, "_write_status", status_killed)
        elif crash_at == "marker copy":
            monkeypatch.setattr(serve, "_write_status", killed_writing)
        else:
            monkeypatch.setattr(serve.os, "replace", _failing_for(job.path, crash))
        with pytest.raises(SystemExit):
            spool.file(job, "done", {"job": "crash.txt", "outcome": "done"})
        monkeypatch.undo()
        assert job.path.exists()  # still claimed: it is filed again at the next start
        again = Spool(spool.root)
        job = again.job("crash.txt", "jsonl")
        job.out.write_text('{"asin": "B000000001"}\n')
        filed = again.file(job, "done", {"job": "crash.txt", "outcome": "done"})
        assert filed == spool.done / "crash.txt"
        assert sorted(p.name for p in spool.done.iterdir()) == [
            "crash.txt",
            "crash.txt.out.jsonl",
            "crash.txt.status.json",
        ]
        assert sorted(p.name for p in spool.processing.iterdir()) == []

    def test_outputs_kept_after_their_job_file_was_deleted_are_not_overwritten(
        self, spool: Spool
    ) -> None:
        """Outputs a user kept (the job file deleted from done/) are no leftovers of ours."""
        first = _finished_job(spool, "x.txt", "first\n")
        spool.file(first, "done", {"job": "x.txt", "outcome": "done"})
        (spool.done / "x.txt").unlink()
        second = _finished_job(spool, "x.txt", "second\n")
        assert spool.file(second, "done", {"job": "x.txt", "outcome": "done"}).name == "x-2.txt"
        assert (spool.done / "x.txt.out.jsonl").read_text() == "first\n"


def test_a_job_resumed_after_a_filing_crash_keeps_its_name_while_it_runs(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filing cut short after the output moved into done/: while the job runs again, its
    name in done/ (its /metrics label) is the one it is filed under, not a "-2" one its own
    moved output seemed to take."""
    job = _finished_job(spool, "big.txt", '{"asin": "B000000001"}\n')
    assert spool.done_name(job) == "big.txt"

    def crash(*args: object, **kwargs: object) -> None:
        raise SystemExit("killed")

    real = serve._write_status

    def status_killed(path: Path, status: object, **options: object) -> None:
        if path.name.endswith(".status.json"):
            crash()
        real(path, status, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(serve, "_write_status", status_killed)
    with pytest.raises(SystemExit):
        spool.file(job, "done", {"job": "big.txt", "outcome": "done"})
    monkeypatch.undo()
    assert (spool.done / "big.txt.out.jsonl").exists()
    assert spool.done_name(job) == "big.txt"
    job.out.write_text('{"asin": "B000000001"}\n')
    assert spool.file(job, "done", {"job": "big.txt", "outcome": "done"}).name == "big.txt"


def test_the_sweep_keeps_a_filing_marker_copy_of_a_job_still_there(spool: Spool) -> None:
    """At start, a copy of a filing marker (a sibling writing it now, or a killed write the
    next filing removes) is kept while its job is in processing/, and removed with the
    job's other work files once the job is gone; it was removed either way, and a sibling's
    rename of it then failed."""
    (spool.processing / "here.txt").write_text("B000000001\n")
    kept = copy_for(spool.job("here.txt", "jsonl").filing_marker)
    gone = copy_for(spool.job("gone.txt", "jsonl").filing_marker)
    for copy in (kept, gone):
        copy.write_text("{}")
    assert spool.sweep() == [gone.name]
    assert kept.exists()


@contextlib.contextmanager
def _status_write_killed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Within the block, writing a status file dies as a ``kill -9`` would, its hidden copy
    half written beside it (SystemExit stands for the kill)."""
    real = serve._write_status

    def status_killed(path: Path, status: object, **options: object) -> None:
        if path.name.endswith(".status.json"):
            copy_for(path).write_text('{"job": "')
            raise SystemExit("killed")
        real(path, status, **options)  # type: ignore[arg-type]

    with monkeypatch.context() as patched:
        patched.setattr(serve, "_write_status", status_killed)
        yield


def test_a_refiling_elsewhere_drops_the_status_copy_a_kill_left(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filing into failed/ killed while writing its status, then filed into done/ (the
    outcome changed): failed/ keeps nothing of the first try, not even the hidden copy."""
    job = _finished_job(spool, "j.txt", '{"asin": "B000000001"}\n')
    with _status_write_killed(monkeypatch), pytest.raises(SystemExit):
        spool.file(job, "failed", {"job": "j.txt", "outcome": "failed"})
    job.out.write_text('{"asin": "B000000001"}\n')
    assert spool.file(job, "done", {"job": "j.txt", "outcome": "done"}).name == "j.txt"
    assert list(spool.failed.iterdir()) == []


def test_a_filing_lists_done_only_after_one_was_cut_short(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filing looks for copies a killed filing left in done/ only when its marker says one
    was cut short, and then removes them: every filing listed done/ (a scan of every job
    ever filed, a daemon slowing from 45 to 20 jobs/s over 20,000 jobs)."""
    real_copies = serve.copies_of
    listed: list[Path] = []

    def copies(path: Path) -> list[Path]:
        listed.append(path.parent)
        return real_copies(path)

    monkeypatch.setattr(serve, "copies_of", copies)
    for n in range(3):
        job = _finished_job(spool, f"j{n}.txt", '{"asin": "B000000001"}\n')
        spool.file(job, "done", {"job": job.name, "outcome": "done"})
    assert spool.done not in listed
    job = _finished_job(spool, "k.txt", '{"asin": "B000000001"}\n')
    with _status_write_killed(monkeypatch), pytest.raises(SystemExit):
        spool.file(job, "done", {"job": "k.txt", "outcome": "done"})
    assert spool.file(job, "done", {"job": "k.txt", "outcome": "done"}).name == "k.txt"
    assert spool.done in listed
    assert [p.name for p in spool.done.iterdir() if p.name.startswith(".")] == []


def _failing_for(target: Path, crash: Callable[..., None]) -> Callable[..., None]:
    """``os.replace`` that crashes when it would move ``target``."""
    real = serve.os.replace

    def replace(source: object, dest: object) -> None:
        if Path(str(source)) == target:
            crash()
        real(source, dest)  # type: ignore[arg-type]

    return replace


def test_a_stale_marker_never_touches_a_finished_filing(spool: Spool) -> None:
    """A marker left by a filing that completed (a crash after the job file moved) names an
    earlier job of the same name: the new job is filed beside it, and nothing of the
    finished filing is deleted."""
    first = _finished_job(spool, "daily.txt", "yesterday\n")
    spool.file(first, "done", {"job": "daily.txt", "outcome": "done"})
    (spool.processing / "daily.txt").write_text("B000000001\n")  # today's, same name
    today = spool.job("daily.txt", "jsonl")
    today.filing_marker.write_text(json.dumps({"dest": "done", "name": "daily.txt"}))
    today.out.write_text("today\n")
    assert spool.file(today, "done", {"job": "daily.txt", "outcome": "done"}).name == (
        "daily-2.txt"
    )
    assert (spool.done / "daily.txt.out.jsonl").read_text() == "yesterday\n"
    assert (spool.done / "daily.txt.status.json").exists()
    assert (spool.done / "daily-2.txt.out.jsonl").read_text() == "today\n"


def test_the_claim_lock_does_not_depend_on_the_output_format(spool: Spool) -> None:
    """Daemons configured with other output formats probe the same claim lock."""
    locks = {spool.job("x.txt", fmt).claim_lock().lock_path for fmt in ("jsonl", "csv", "sqlite")}
    assert len(locks) == 1
    assert spool.job("x.txt", "csv").work_files()[-1] == locks.pop()


def test_a_folder_on_another_mount_is_refused_at_start(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """done/ (or inbox/) mounted on its own, even a bind mount of the same file system, would
    fail the first filing with EXDEV and the daemon would exit 74 at every restart: refused
    at start with a ConfigError naming it, and the probe file is gone."""
    spool.check_one_file_system()
    real = os.rename

    def across_mounts(source: Path, target: Path) -> None:
        if target.parent.name == "done":
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real(source, target)

    monkeypatch.setattr(serve.os, "rename", across_mounts)
    with pytest.raises(ConfigError, match=r"done/ of .* on another mount than processing/"):
        spool.check_one_file_system()
    leftovers = [p for d in (spool.inbox, spool.processing, spool.failed) for p in d.iterdir()]
    assert leftovers == []


def test_probes_left_by_a_killed_daemon_are_removed_at_start(spool: Spool) -> None:
    """A mount probe an hour old (a daemon killed while checking) is removed at the next
    start; a fresh one, another daemon's check under way, is left alone."""
    old = spool.done / ".asinb-probe-killed"
    old.write_text("")
    os.utime(old, (1_000_000_000, 1_000_000_000))
    fresh = spool.inbox / ".asinb-probe-running"
    fresh.write_text("")
    spool.check_one_file_system()
    assert not old.exists()
    assert fresh.exists()


def test_a_claim_meeting_a_half_made_claim_drops_the_inbox_entry(spool: Spool) -> None:
    """A daemon claiming inbox/x.txt that is already the same file as processing/x.txt
    (another daemon stopped between link and unlink) drops the inbox entry, or the job ran
    twice once the orphaned claim was taken over and filed."""
    (spool.inbox / "x.txt").write_text("B000000001\n")
    os.link(spool.inbox / "x.txt", spool.processing / "x.txt")  # claimed, not yet unlinked
    assert spool.claim("x.txt") is False
    assert not (spool.inbox / "x.txt").exists()
    assert (spool.processing / "x.txt").read_text() == "B000000001\n"


def test_a_stop_mid_claim_leaves_one_job_and_a_hard_linked_sibling_stays(spool: Spool) -> None:
    """At start, an inbox/ entry that is the job a stop mid-claim left in both places goes,
    but a job of another name that is the same file (a producer's ``ln list inbox/b.txt``)
    stays: it is a job of its own, not a claim already made."""
    source = spool.root / "list.txt"
    source.write_text("B000000001\n")
    os.link(source, spool.inbox / "a.txt")
    os.link(source, spool.inbox / "b.txt")
    os.link(spool.inbox / "a.txt", spool.processing / "a.txt")  # claimed, not yet unlinked
    assert spool.drop_duplicates() == ["a.txt"]
    assert sorted(p.name for p in spool.inbox.iterdir()) == ["b.txt"]


class TestStaleReservations:
    """Name reservations a killed filing left in done/ or failed/, swept at start."""

    @staticmethod
    def _reservation(directory: Path, name: str, identity: int, age_s: float) -> Path:
        path = directory / f"{serve._TAKING}{name}"
        path.write_text(str(identity))
        then = path.stat().st_mtime - age_s
        os.utime(path, (then, then))
        return path

    def test_one_naming_no_file_is_dropped_and_frees_its_name(self, spool: Spool) -> None:
        """A refusal killed after it reserved ``r.txt`` (its entry since deleted from inbox/)
        no longer sends the next failed ``r.txt`` to ``r-2.txt``."""
        gone = self._reservation(spool.failed, "r.txt", 987_654_321, age_s=3600)
        assert spool.drop_stale_reservations() == [f"failed/{gone.name}"]
        (spool.inbox / "r.txt").write_text("B000000001\n")
        filed = spool.reject("r.txt", _status("r.txt"))
        assert filed == spool.failed / "r.txt"
        assert sorted(p.name for p in spool.failed.iterdir()) == ["r.txt", "r.txt.status.json"]

    def test_reservations_a_filing_may_still_hold_are_kept(self, spool: Spool) -> None:
        """Kept: one for a job in processing/ (filed again at start, which takes it back),
        for an entry a cut-short refusal put back into inbox/ (refused again under it, by a
        daemon running meanwhile), for an entry mid-refusal, for the reserved name's own
        file (between its last rename and the reservation's removal), and one made in the
        last minutes."""
        (spool.processing / "p.txt").write_text("B000000001\n")
        (spool.inbox / "i.txt").write_text("B000000001\n")
        (spool.failed / f"{serve._REFUSING}0a1b2c3d.q.txt").write_text("B000000001\n")
        (spool.done / "d.txt").write_text("B000000001\n")
        kept = [
            self._reservation(
                spool.done, "p.txt", (spool.processing / "p.txt").stat().st_ino, 3600
            ),
            self._reservation(
                spool.failed,
                "q.txt",
                (spool.failed / f"{serve._REFUSING}0a1b2c3d.q.txt").stat().st_ino,
                3600,
            ),
            self._reservation(spool.done, "d.txt", (spool.done / "d.txt").stat().st_ino, 3600),
            self._reservation(spool.failed, "i.txt", (spool.inbox / "i.txt").stat().st_ino, 3600),
            self._reservation(spool.done, "n.txt", 987_654_321, age_s=0),
        ]
        assert spool.drop_stale_reservations() == []
        assert all(path.exists() for path in kept)

    def test_a_job_filed_again_after_the_sweep_keeps_its_name(self, spool: Spool) -> None:
        """A job killed mid-filing is filed under the name it chose: the sweep at start left
        its reservation, and nothing else took the name."""
        job = _finished_job(spool, "a.txt", "rows\n")
        self._reservation(spool.done, "a.txt", job.path.stat().st_ino, 3600)
        assert spool.drop_stale_reservations() == []
        assert spool.file(job, "done", {"job": "a.txt", "outcome": "done"}) == spool.done / "a.txt"
        assert not [p for p in spool.done.iterdir() if p.name.startswith(".")]


def test_a_name_filed_many_times_is_not_looked_for_past_every_earlier_filing(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 501st job named ``same.txt`` looks at a few paths, not past all 500 earlier
    filings (about 9 paths each, at every filing and every /metrics scrape while one ran:
    0.7 s of the event loop with 20,000 of them); the names are those a scan from 2 gives."""
    names = [serve._free_name(spool.done, "same.txt")]
    (spool.done / names[0]).touch()
    for _ in range(500):
        names.append(serve._free_name(spool.done, "same.txt"))
        (spool.done / names[-1]).touch()
    assert names[:3] == ["same.txt", "same-2.txt", "same-3.txt"]
    assert names[-1] == "same-501.txt"
    looked: list[str] = []
    real = os.path.lexists

    def counted(path: object) -> bool:
        looked.append(str(path))
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(serve.os.path, "lexists", counted)
    assert serve._free_name(spool.done, "same.txt") == "same-502.txt"
    assert len(looked) < 50
