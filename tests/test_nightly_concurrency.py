"""Concurrent nightly runs (issue 12): per-input locks, never an input processed twice.

The end-to-end test starts two real ``segflow nightly`` processes at once on
the same inbox and output folder (each with its own Dask cluster, both on the
same Prefect home) and checks what each reported and what they left: every
input done by exactly one run and skipped or locked by the other, outputs
that verify, one valid ledger entry per input, two reports, no lock files.
The unit tests drive :class:`flows.locks.InputLock` directly: threads racing
for one lock or to break one stale lock, a dead holder on this host, an old
heartbeat, a heartbeat that keeps a lock alive, and a release that must not
remove a lock another run took over.  One in-process flow run checks how a
locked input and a stale lock are reported.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flows import ledger, locks
from flows.config import SegmentOptions
from flows.locks import InputLock
from flows.nightly import nightly, nightly_report
from flows.reaper import POLL_S
from storage import samples
from storage.provenance import verify
from tests.models import tiny_model

REPO = Path(__file__).resolve().parents[1]
SCENES = ["s0.tif", "s1.tif", "s2.tif", "s3.tif"]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Four tiny 4-band scenes in an inbox and a tiny 2D model."""
    root = tmp_path_factory.mktemp("concurrency")
    inbox, gen = root / "inbox", root / "gen"
    inbox.mkdir(), gen.mkdir()
    for i, name in enumerate(SCENES):
        image, _ = samples.make_scene(gen / name, size=(64, 64), seed=30 + i, nodata_margin=4)
        shutil.copy(image, inbox / name)
    model = tiny_model(root / "m2d", spatial_dims=2, channels=4, roi=[32, 32], seed=1)
    return {"root": root, "inbox": inbox, "model": model}


def _report_path(stdout: str) -> Path:
    [line] = [ln for ln in stdout.splitlines() if ln.startswith("report: ") and ln.endswith(".json")]
    return Path(line[len("report: "):])


def _time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def test_two_real_runs_at_once_never_process_an_input_twice(case):
    out = case["root"] / "out-two-runs"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "flows", "nightly", "--inbox", str(case["inbox"]),
               "--model", str(case["model"].path), "--out", str(out), "--workers", "1"]
    env = {**os.environ, "COLUMNS": "200"}  # PREFECT_HOME (conftest's) is shared, as two cron runs share one
    t0 = time.perf_counter()
    runs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    try:
        results = [p.communicate(timeout=600) for p in runs]
    finally:
        for p in runs:
            if p.poll() is None:
                p.kill()
                p.wait()
    wall = time.perf_counter() - t0
    for p, (stdout, stderr) in zip(runs, results):
        assert p.returncode == 0, f"exit {p.returncode}\n{stdout}\n{stderr[-3000:]}"

    reports = [json.loads(_report_path(stdout).read_text()) for stdout, _ in results]
    assert reports[0]["report"]["json"] != reports[1]["report"]["json"]  # neither overwrote the other's report
    a, b = (r["run"] for r in reports)
    assert _time(a["started"]) < _time(b["finished"]) and _time(b["started"]) < _time(a["finished"]), \
        "the two runs did not overlap: the test proved nothing"

    statuses = [{Path(r["input"]).name: r for r in rep["inputs"]} for rep in reports]
    print(f"two runs, {wall:.1f} s wall: " + " | ".join(
        ", ".join(f"{n} {s[n]['status']}" for n in SCENES) for s in statuses))
    for name in SCENES:
        pair = sorted(s[name]["status"] for s in statuses)
        assert pair in (["done", "locked"], ["done", "skipped"]), (name, pair)
    for stdout, _ in results:  # the command says why it left an input alone
        for line in (ln for ln in stdout.splitlines() if ln.startswith("locked: ")):
            assert "in progress in another run (host " in line and ", pid " in line, line
    for rep in reports:
        for r in rep["inputs"]:
            if r["status"] == "locked":
                assert r["outputs"] == [] and r["error"] is None
                assert "in progress in another run" in r["note"] and f"host {locks.HOST}" in r["note"]
        locked = sum(r["status"] == "locked" for r in rep["inputs"])
        assert rep["run"]["counts"].get("locked", 0) == locked
        assert rep["run"]["state"] == "Completed"

    # the outputs of each input: complete, verified, of that input
    for name in SCENES:
        [done] = [s[name] for s in statuses if s[name]["status"] == "done"]
        sidecar = out / f"{Path(name).stem}.provenance.json"
        assert str(sidecar) in done["outputs"]
        found = verify(sidecar)
        assert found.problems == [] and found.verified, (name, found)
        record = json.loads(sidecar.read_text())
        assert record["input"]["sha256"] == done["input_sha256"]

    # the ledger: one valid entry per input, naming its sidecar
    entries = sorted((out / ledger.CACHE_DIR).iterdir())
    assert len(entries) == len(SCENES), [p.name for p in entries]
    named = set()
    for path in entries:
        entry = json.loads(path.read_text())
        assert entry["schema"] == ledger.ENTRY_SCHEMA and path.name == f"{entry['key']}.json"
        named.add(Path(entry["input_path"]).name)
        assert (out / entry["sidecar"]).is_file()
    assert named == set(SCENES)

    # nothing left behind: no locks, no guards, no temporary files, no work folder
    assert not (out / locks.LOCKS_DIR).exists()
    assert not [p for p in out.rglob("*") if p.name.endswith((".lock", ".guard", ".tmp"))]
    assert not (out / ".segflow-work").exists()
    assert len(list((out / "reports").glob("*.json"))) == 2


# ----------------------------------------------------------------------------- the lock itself


def _write_lock(folder: Path, stem: str, *, host: str, pid: int, heartbeat_age_s: float,
                stale_after_s: float | None = None) -> Path:
    """A lock file as another run would have left it, its heartbeat (and mtime) ``heartbeat_age_s`` old."""
    folder.mkdir(parents=True, exist_ok=True)
    moment = time.time() - heartbeat_age_s
    beat = dt.datetime.fromtimestamp(moment, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    path = folder / locks.lock_name(stem)
    declared = {} if stale_after_s is None else {"stale_after_s": stale_after_s}
    path.write_text(json.dumps({"schema": locks.SCHEMA, "host": host, "pid": pid, "token": "theirs",
                                "started": beat, "heartbeat": beat, "input": f"/inbox/{stem}.tif", **declared}))
    os.utime(path, (moment, moment))
    return path


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not locks.pid_alive(child.pid)
    return child.pid


def _race(locks_: list[InputLock]) -> list[tuple[InputLock, locks.Holder | None]]:
    """Each lock acquired by its own thread, all released from one barrier: (lock, holder) per thread."""
    barrier = threading.Barrier(len(locks_))
    results: list = [None] * len(locks_)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = (locks_[i], locks_[i].acquire(input="scene.tif"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(locks_))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_threads_racing_for_one_lock_exactly_one_wins(tmp_path):
    for _ in range(10):
        results = _race([InputLock(tmp_path / locks.LOCKS_DIR, "scene") for _ in range(8)])
        winners = [lock for lock, holder in results if holder is None]
        assert len(winners) == 1
        losers = [holder for _, holder in results if holder is not None]
        assert all(h.host == locks.HOST and h.pid == os.getpid() and h.input == "scene.tif" for h in losers)
        info = json.loads((tmp_path / locks.LOCKS_DIR / "scene.lock").read_text())
        assert info["token"] == winners[0].token
        winners[0].release()
        assert not (tmp_path / locks.LOCKS_DIR).exists()  # released, and the empty folder removed


def test_a_lock_of_a_dead_process_on_this_host_is_broken_at_once(tmp_path):
    folder = tmp_path / locks.LOCKS_DIR
    path = _write_lock(folder, "scene", host=locks.HOST, pid=_dead_pid(), heartbeat_age_s=1)
    lock = InputLock(folder, "scene")  # 10 minutes' timeout: the heartbeat is fresh, the process is gone
    assert lock.acquire() is None
    assert "has ended" in lock.broken and "theirs" not in path.read_text()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()


def test_a_lock_with_an_old_heartbeat_is_broken_and_a_fresh_one_is_not(tmp_path):
    folder = tmp_path / locks.LOCKS_DIR
    _write_lock(folder, "fresh", host="another-host", pid=1, heartbeat_age_s=30)
    holder = InputLock(folder, "fresh", stale_after=600).acquire()
    assert holder is not None and holder.host == "another-host" and holder.pid == 1
    assert 25 < holder.heartbeat_age_s < 60 and "another-host" in holder.describe()

    _write_lock(folder, "old", host="another-host", pid=1, heartbeat_age_s=3600)
    lock = InputLock(folder, "old", stale_after=600)
    assert lock.acquire() is None
    assert "no heartbeat for 3600 s" in lock.broken and "another-host" in lock.broken
    lock.release()


def test_a_holders_own_longer_timeout_is_honoured(tmp_path):
    """`nightly --lock-timeout 5` broke a live `segment`'s lock (600 s, a beat each 60 s) 30 s into a beat, deleted
    its partial store and failed it.  The holder's declared timeout counts when it is the longer."""
    folder = tmp_path / locks.LOCKS_DIR
    _write_lock(folder, "segmenting", host="another-host", pid=1, heartbeat_age_s=30, stale_after_s=600)
    holder = InputLock(folder, "segmenting", stale_after=5).acquire()
    assert holder is not None and holder.host == "another-host"
    _write_lock(folder, "gone", host="another-host", pid=1, heartbeat_age_s=700, stale_after_s=600)
    lock = InputLock(folder, "gone", stale_after=5)
    assert lock.acquire() is None and "stale after 600 s" in lock.broken
    lock.release()


def test_threads_racing_to_break_one_stale_lock_exactly_one_wins(tmp_path):
    folder = tmp_path / locks.LOCKS_DIR
    for _ in range(5):
        _write_lock(folder, "scene", host=locks.HOST, pid=_dead_pid(), heartbeat_age_s=1)
        results = _race([InputLock(folder, "scene") for _ in range(8)])
        winners = [lock for lock, holder in results if holder is None]
        assert len(winners) == 1, [h for _, h in results]
        assert json.loads((folder / "scene.lock").read_text())["token"] == winners[0].token
        assert not (folder / ".scene.lock.guard").exists()
        winners[0].release()


def test_the_heartbeat_keeps_a_long_held_lock_alive(tmp_path):
    folder = tmp_path / locks.LOCKS_DIR
    lock = InputLock(folder, "scene", stale_after=0.6, heartbeat_every=0.1)
    assert lock.acquire() is None
    first = json.loads((folder / "scene.lock").read_text())["heartbeat"]
    time.sleep(1.2)  # twice the timeout: only the heartbeat keeps it live
    holder = InputLock(folder, "scene", stale_after=0.6).acquire()
    assert holder is not None and holder.heartbeat_age_s < 0.6
    assert json.loads((folder / "scene.lock").read_text())["heartbeat"] > first
    lock.release()
    assert not lock.lost


def test_a_holder_whose_lock_was_taken_over_does_not_release_the_new_one(tmp_path):
    folder = tmp_path / locks.LOCKS_DIR
    slow = InputLock(folder, "scene", stale_after=0.3, heartbeat_every=100)  # a run that stopped beating
    assert slow.acquire() is None
    time.sleep(0.5)
    other = InputLock(folder, "scene", stale_after=0.3)
    assert other.acquire() is None and "no heartbeat" in other.broken
    assert not slow.still_held() and other.still_held()
    slow.release()
    assert slow.lost
    assert json.loads((folder / "scene.lock").read_text())["token"] == other.token
    other.release()
    assert not folder.exists()


def test_a_lock_that_cannot_be_written_leaves_no_folder_and_names_the_input(tmp_path):
    """On a full disk `segment` said `OUT/.segflow-locks/scene.lock: cannot take the input's lock` and left an
    empty `.segflow-locks/` in OUT: the input went unnamed, and a failed run left a folder behind."""
    import resource
    import signal

    from flows.batch import input_lock
    from storage.errors import ExportError

    out = tmp_path / "out"
    out.mkdir()
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG, as on a full disk
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16, limits[1]))
    try:
        with pytest.raises(OSError):
            InputLock(out / locks.LOCKS_DIR, "scene").acquire()
        assert list(out.iterdir()) == []
        with pytest.raises(ExportError) as err, input_lock(str(out), "scene", "in/scene.tif"):
            pass
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, old)
    assert str(err.value).startswith("in/scene.tif: cannot take its lock "), err.value
    assert "File too large" in str(err.value) and list(out.iterdir()) == []


# ----------------------------------------------------------------------------- the flow's report


def test_a_locked_input_is_reported_not_processed_and_a_stale_lock_is_taken_over(case, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in SCENES[:3]:
        shutil.copy(case["inbox"] / name, inbox / name)
    out = tmp_path / "out"
    live = InputLock(out / locks.LOCKS_DIR, "s0")  # another run, alive, at work on s0
    assert live.acquire(input=str(inbox / "s0.tif")) is None
    _write_lock(out / locks.LOCKS_DIR, "s1", host=locks.HOST, pid=_dead_pid(), heartbeat_age_s=5)  # a killed run
    try:
        state = nightly(model_dirs=[str(case["model"].path)], out_dir=str(out), inbox=str(inbox),
                        options=SegmentOptions(workers=1), retries=0, return_state=True)
    finally:
        live.release()
    assert state.is_completed(), state.message  # a locked input is not a failure
    report = nightly_report(state)
    got = {Path(r["input"]).name: r for r in report["inputs"]}
    assert {n: r["status"] for n, r in got.items()} == {"s0.tif": "locked", "s1.tif": "done", "s2.tif": "done"}
    assert report["run"]["counts"] == {"done": 2, "skipped": 0, "failed": 0, "no-model": 0, "locked": 1}
    assert "1 locked (in progress in another run)" in report["run"]["summary"]
    assert f"host {locks.HOST}, pid {os.getpid()}" in got["s0.tif"]["note"]
    assert not list(out.glob("s0.*"))  # nothing written for the locked input
    assert "took over a stale lock" in got["s1.tif"]["note"] and "has ended" in got["s1.tif"]["note"]
    assert verify(out / "s1.provenance.json").problems == []
    markdown = Path(report["report"]["markdown"]).read_text()
    assert "| `s0.tif` | locked |" in markdown and "in progress in another run" in markdown
    assert not (out / locks.LOCKS_DIR).exists()

    again = nightly_report(nightly(model_dirs=[str(case["model"].path)], out_dir=str(out), inbox=str(inbox),
                                   options=SegmentOptions(workers=1), retries=0, return_state=True))
    assert {Path(r["input"]).name: r["status"] for r in again["inputs"]} == \
        {"s0.tif": "done", "s1.tif": "skipped", "s2.tif": "skipped"}


def test_a_report_name_taken_meanwhile_by_another_run_is_not_overwritten(tmp_path, monkeypatch):
    """The other run writes ``<stamp>.json`` between this run's check of the name and its write."""
    import flows.report as report_module

    stamp = "20260101T000000Z"
    theirs = tmp_path / "reports" / f"{stamp}.json"
    real_dumps = json.dumps

    class RacingJson:
        @staticmethod
        def dumps(*args, **kwargs):  # noqa: ANN002, ANN003, ANN205
            if not theirs.exists():
                theirs.write_text('{"theirs": true}')
            return real_dumps(*args, **kwargs)

    monkeypatch.setattr(report_module, "json", RacingJson)
    report = {"run": {"started": "2026-01-01T00:00:00+00:00", "summary": "ours", "state": "Completed",
                      "seconds": 1.0, "out_dir": str(tmp_path), "models": []}, "inputs": []}
    json_path, md_path = report_module.write_report(report, tmp_path, stamp)
    assert json_path.name == f"{stamp}-2.json" and md_path.name == f"{stamp}-2.md"
    assert json.loads(theirs.read_text()) == {"theirs": True}
    assert json.loads(json_path.read_text())["report"]["json"] == str(json_path)
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == [f"{stamp}-2.json", f"{stamp}-2.md",
                                                                         f"{stamp}.json"]


def test_a_killed_nightly_leaves_no_prefect_server_running(case, tmp_path):
    """SIGKILL (or the OOM killer) on `segflow nightly` left Prefect's temporary server running, reparented to
    init, for as long as anyone let it (10 minutes when found).  The command's watchdog (flows/reaper.py) ends it
    once the command is gone."""
    import signal

    import psutil

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "COLUMNS": "200"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "flows", "nightly", "--inbox", str(case["inbox"]), "--model",
                             str(case["model"].path), "--out", str(tmp_path / "out")], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    server = None
    deadline = time.monotonic() + 180
    try:
        while server is None and proc.poll() is None and time.monotonic() < deadline:
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if any("prefect.server" in part for part in child.cmdline()):
                        server = child
                except psutil.Error:
                    continue
            time.sleep(0.2)
        assert server is not None, "the nightly ended or timed out before its temporary server was seen"
        time.sleep(3 * POLL_S)  # the watchdog notes the command's descendants once per POLL_S
        proc.send_signal(signal.SIGKILL)  # the command alone, as the OOM killer does: not its process group
        proc.wait()
        server.wait(timeout=30)  # psutil.TimeoutExpired: the server outlived the command
    finally:
        proc.kill()
        for child in psutil.process_iter(["cmdline"]):
            if str(tmp_path) in " ".join(child.info["cmdline"] or []):
                child.kill()


def test_a_run_whose_lock_was_taken_over_while_it_stalled_writes_nothing(case, tmp_path, monkeypatch):
    """A run stalled past the stale timeout (a suspended VM, SIGSTOP) had its lock broken and the input taken
    over by another run; resumed, it went on to write its outputs over that run's, with only a note.  Now it
    checks the lock before its first output, writes none, keeps the partial work the other run may be using,
    and reports the input `locked`."""
    from storage import provenance

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(case["inbox"] / "s0.tif", inbox / "s0.tif")
    out = tmp_path / "out"
    folder = out / locks.LOCKS_DIR
    other: list[InputLock] = []
    real = provenance.make_record

    def stalled_then_taken_over(*args, **kwargs):  # the moment after inference, before the first output
        (folder / locks.lock_name("s0")).unlink()  # what a breaker does to a lock whose heartbeat is too old
        taker = InputLock(folder, "s0")
        assert taker.acquire(input=str(inbox / "s0.tif")) is None
        other.append(taker)
        return real(*args, **kwargs)

    monkeypatch.setattr(provenance, "make_record", stalled_then_taken_over)
    try:
        state = nightly(model_dirs=[str(case["model"].path)], out_dir=str(out), inbox=str(inbox),
                        options=SegmentOptions(workers=1), retries=0, return_state=True)
        [got] = nightly_report(state)["inputs"]
        assert state.is_completed(), state.message
        assert got["status"] == "locked" and "another run took it over while this one had stalled" in got["note"]
        assert not list(out.glob("s0.*")) and not list(out.glob(".s0.*.previous"))  # no output of its own
        assert len(list(out.glob(".s0.zarr.*.partial"))) == 1  # the partial work, which the other run may use
        assert other[0].still_held()  # the other run's lock was left alone
    finally:
        for taker in other:
            taker.release()
