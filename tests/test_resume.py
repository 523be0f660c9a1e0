"""Nothing lost: a run killed with SIGKILL resumes, a dead Dask worker leaves no hole, an interrupted run with
other parameters is not reused, and disk errors at export leave nothing partial.

The kill points are deterministic: the pipeline's test hook SIGKILLs the run
(its whole process group) after N chunk writes, and a worker plugin kills one
worker after its Nth evaluate task.  No test waits on a timer for anything
but a process group to be gone.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed import WorkerPlugin

from flows.config import SegmentOptions
from flows.infer import KILL_AFTER_CHUNKS_ENV, KILL_SIGNAL_ENV
from flows.nightly import STOPPED_NOTE
from flows.pipeline import WORK_DIR, segment_one
from flows.progress import reporting
from segmentation import load_model
from storage.errors import ExportError
from storage.layout import JOURNAL_DIR, is_complete
from storage.provenance import verify_sidecar
from storage.samples import make_scene
from tests.faults import executing_tasks, group_alive
from tests.models import tiny_model

SIZE, CHUNK = (160, 160), 40  # a 4 x 4 grid of output chunks
CHUNKS = (SIZE[0] // CHUNK) * (SIZE[1] // CHUNK)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = tiny_model(root / "model", spatial_dims=2, channels=4, roi=[32, 32], seed=1)
    image, truth = make_scene(root / "scene.tif", size=SIZE, seed=3)
    truth.unlink()
    return image, model


# --------------------------------------------------------------------------- helpers


def _end_group(pgid: int) -> None:
    """SIGKILL what is left of a run's process group (workers, Prefect's server) and wait until it is gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 60
    while group_alive(pgid):
        assert time.monotonic() < deadline, f"process group {pgid} did not die"
        time.sleep(0.05)


def _segment(image: Path, model: Path, out: Path, *extra: str, kill_after: int | None = None,
             logs: Path, signal_name: str | None = None) -> tuple[int, list[dict], str]:
    """`segflow segment` in its own session (so the test hook can kill the whole group); (rc, outcomes, stderr).
    ``signal_name`` "SIGINT": the hook interrupts the run as Ctrl-C does, instead of SIGKILLing it."""
    env = {**os.environ, "COLUMNS": "250"}
    env.pop(KILL_AFTER_CHUNKS_ENV, None)
    env.pop(KILL_SIGNAL_ENV, None)
    if kill_after is not None:
        env[KILL_AFTER_CHUNKS_ENV] = str(kill_after)
    if signal_name is not None:
        env[KILL_SIGNAL_ENV] = signal_name
    report = logs.with_suffix(".json")
    with open(logs.with_suffix(".out"), "w") as so, open(logs.with_suffix(".err"), "w") as se:
        proc = subprocess.Popen([sys.executable, "-m", "flows", "segment", str(image), "--model", str(model),
                                 "--out", str(out), "--chunk-size", str(CHUNK), "--report", str(report), *extra],
                                stdout=so, stderr=se, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=300)
        finally:
            proc.kill()
            proc.wait()
            _end_group(proc.pid)
    outcomes = json.loads(report.read_text()) if report.exists() and rc == 0 else []
    return rc, outcomes, logs.with_suffix(".err").read_text()


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _inbox(tmp_path: Path, image: Path, *names: str) -> tuple[Path, Path]:
    """An inbox holding copies of ``image`` under ``names``, and the output folder beside it."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    for name in names:
        (inbox / name).write_bytes(image.read_bytes())
    return inbox, out


def _markers(out: Path) -> list[Path]:
    return sorted(out.glob(f".scene.zarr.*.partial/{JOURNAL_DIR}/done/*.json"))


def _killed_at(at: str, image: Path, model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`segflow segment` (in this process, --workers 0) ended as SIGKILL ends it when it calls ``at``
    (``module.function``): what it wrote stays, no cleanup runs."""
    module, name = at.rsplit(".", 1)
    killer = (f"import importlib, os, sys\nsetattr(importlib.import_module({module!r}), {name!r}, "
              "lambda *a, **k: os._exit(137))  # SIGKILL's moment: no cleanup runs\n"
              "from flows.cli import app\nsys.argv = ['segflow', *sys.argv[1:]]\napp()\n")
    return subprocess.run([sys.executable, "-c", killer, "segment", str(image), "--model", str(model), "--out",
                           str(out), "--chunk-size", str(CHUNK), "--workers", "0", *extra],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "250"})


def _killed_before_its_sidecar(image: Path, model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """Killed just before its sidecar is written: every output in place."""
    return _killed_at("storage.provenance.write_sidecar", image, model, out, *extra)


def _without_run_fields(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("started", "finished", "statistics")}


# --------------------------------------------------------------------------- SIGKILL of the whole run


def test_sigkill_mid_run_then_rerun_writes_only_unfinished_chunks_byte_identical(scene, tmp_path):
    image, model = scene
    rc, [reference], _ = _segment(image, model.path, tmp_path / "ref", logs=tmp_path / "ref")
    assert rc == 0 and reference["statistics"]["chunks_written"] == CHUNKS

    out = tmp_path / "out"
    rc, _, _ = _segment(image, model.path, out, kill_after=3, logs=tmp_path / "killed")
    assert rc == -signal.SIGKILL
    done = len(_markers(out))  # counted once the whole process group is gone: nothing writes any more
    assert 3 <= done < CHUNKS
    [partial] = out.glob(".scene.zarr.*.partial")
    assert not is_complete(partial)
    assert not any((out / n).exists() for n in ("scene.tif", "scene.zarr", "scene.provenance.json"))
    assert (out / WORK_DIR).is_dir()  # the complete ingest is kept for the rerun

    rc, [resumed], stderr = _segment(image, model.path, out, logs=tmp_path / "resumed")
    assert rc == 0, stderr
    stats = resumed["statistics"]
    assert stats["partial_store"] == "resumed" and stats["ingest_reused"] is True
    assert stats["chunks_resumed"] == done and stats["chunks_written"] == CHUNKS - done
    assert f"{done} of {CHUNKS} chunks already done" in stderr
    # its progress counts the windows of the chunks it had left (it had said all of them, at a rate never run)
    [line] = [x for x in stderr.splitlines() if x.startswith("segment scene (resumed): ")]
    # and those are the windows it ran for the chunks left, owners shared with finished chunks included, as its
    # report says (it had counted the finished chunks' own windows only: fewer, at a rate never run)
    counted = int(line.split(": ")[1].split()[0])
    assert 0 < counted == stats["windows_evaluated"] + stats["windows_skipped"], (line, stats)
    assert stats["label_pixels"] == reference["statistics"]["label_pixels"]

    # the outputs are byte-identical to the uninterrupted run's; the provenance differs in run fields only
    assert (out / "scene.tif").read_bytes() == (tmp_path / "ref" / "scene.tif").read_bytes()
    assert _tree(out / "scene.zarr") == _tree(tmp_path / "ref" / "scene.zarr")
    a, b = (json.loads((d / "scene.provenance.json").read_text()) for d in (tmp_path / "ref", out))
    assert _without_run_fields(a) == _without_run_fields(b)
    assert sorted(p.name for p in out.iterdir()) == ["reports", "scene.provenance.json", "scene.qml", "scene.stac.json",
                                                     "scene.tif", "scene.zarr"]  # reports: the completed run's report only
    assert len(list((out / "reports").glob("segment-*.html"))) == 1  # the killed run wrote none
    assert verify_sidecar(out / "scene.provenance.json") == []


def test_ctrl_c_mid_run_is_one_line_exit_130_and_the_rerun_resumes(scene, tmp_path):
    """Ctrl-C used to end the command with a blank line and nothing said about what it left."""
    image, model = scene
    out = tmp_path / "out"
    rc, _, stderr = _segment(image, model.path, out, kill_after=3, logs=tmp_path / "int", signal_name="SIGINT")
    assert rc == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.rstrip().splitlines()[-1] == (
        f"interrupted: the inputs in progress left nothing in {out} that looks complete (those already done are); "
        "run the same command again with --skip-done to resume them from their finished chunks")
    done = len(_markers(out))
    assert 3 <= done < CHUNKS
    assert not any((out / n).exists() for n in ("scene.tif", "scene.zarr", "scene.provenance.json"))
    rc, [resumed], stderr = _segment(image, model.path, out, logs=tmp_path / "resumed")
    assert rc == 0 and resumed["statistics"]["chunks_resumed"] == done, stderr


def test_skip_done_leaves_out_what_is_done_with_the_same_content_model_and_parameters(scene, tmp_path):
    """A rerun of an interrupted `segment` batch segmented again every input it had finished (the probe's 441
    windows of an input done before the signal); `--skip-done` keeps outputs that verify, as `nightly` does."""
    image, model = scene
    out = tmp_path / "out"
    rc, [first], stderr = _segment(image, model.path, out, logs=tmp_path / "first")
    assert rc == 0 and not first.get("skipped"), stderr
    made = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    rc, [again], stderr = _segment(image, model.path, out, "--skip-done", logs=tmp_path / "again")
    assert rc == 0 and again["skipped"].startswith("same input, model and parameters as its outputs of "), again
    assert again["outputs"][0] == first["outputs"][0] and sorted(again["outputs"]) == sorted(first["outputs"])
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == made  # nothing rewritten
    assert f"skipped {image} -> {out / 'scene.tif'}" in (tmp_path / "again.out").read_text() + stderr
    # another parameter, an edited output: segmented again (no skip), and the outputs verify
    rc, [other], stderr = _segment(image, model.path, out, "--skip-done", "--overlap", "0.5", logs=tmp_path / "o")
    assert rc == 0 and not other.get("skipped"), other
    with open(out / "scene.qml", "a") as f:
        f.write("<!-- edited -->")
    rc, [edited], stderr = _segment(image, model.path, out, "--skip-done", "--overlap", "0.5", logs=tmp_path / "e")
    assert rc == 0 and not edited.get("skipped"), edited
    assert verify_sidecar(out / "scene.provenance.json") == []
    # a sidecar edited after the run (a label count): verify refuses its outputs, and so does the skip (it had
    # skipped them as done); its ledger entry and any adoption are both checked
    sidecar = out / "scene.provenance.json"
    record = json.loads(sidecar.read_text())
    record["statistics"]["label_pixels"] = {k: v + 1 for k, v in record["statistics"]["label_pixels"].items()}
    sidecar.write_text(json.dumps(record, indent=2, sort_keys=True))
    assert verify_sidecar(sidecar) != []
    shutil.rmtree(out / ".segflow-cache", ignore_errors=True)
    rc, [again], stderr = _segment(image, model.path, out, "--skip-done", "--overlap", "0.5", logs=tmp_path / "t")
    assert rc == 0 and not again.get("skipped"), again
    assert verify_sidecar(sidecar) == []


def test_an_interrupted_night_reports_what_it_left_and_the_next_says_what_it_resumed(scene, tmp_path):
    """An interrupted night had written no report at all (under a Prefect deployment, nothing said what got done);
    the input the next night finished from its chunks had read as a suspiciously fast one (its seconds and
    windows are that night's share only)."""
    from flows.nightly import STOPPED_NOTE

    image, model = scene
    inbox, out = _inbox(tmp_path, image, "a.tif", "b.tif")  # one at a time (--parallel 1): b not started when a stops
    command = [sys.executable, "-m", "flows", "nightly", "--inbox", str(inbox), "--model", str(model.path),
               "--out", str(out), "--chunk-size", str(CHUNK), "--workers", "0", "--no-quicklook"]
    env = {**os.environ, "COLUMNS": "250", KILL_AFTER_CHUNKS_ENV: "3", KILL_SIGNAL_ENV: "SIGINT"}
    first = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 130, first.stderr
    done = len(list(out.glob(f".a.zarr.*.partial/{JOURNAL_DIR}/done/*.json")))
    assert 3 <= done < CHUNKS
    [path] = (out / "reports").glob("*.json")
    report = json.loads(path.read_text())
    assert report["run"]["state"] == "Interrupted"
    assert report["run"]["counts"] == {"done": 0, "skipped": 0, "failed": 0, "no-model": 0, "interrupted": 2}
    assert [(r["input"], r["status"], r["note"]) for r in report["inputs"]] == [
        (str(inbox / "a.tif"), "interrupted", STOPPED_NOTE), (str(inbox / "b.tif"), "interrupted", "not started")]
    assert "2 interrupted (the next run resumes them)" in path.with_suffix(".md").read_text()

    env = {k: v for k, v in env.items() if k not in (KILL_AFTER_CHUNKS_ENV, KILL_SIGNAL_ENV)}
    second = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stderr
    latest = max((out / "reports").glob("*.json"), key=lambda p: json.loads(p.read_text())["run"]["started"])
    a, b = json.loads(latest.read_text())["inputs"]
    assert (a["status"], b["status"], b["note"]) == ("done", "done", None)
    assert a["note"] == (f"resumed an interrupted run: {done} of {CHUNKS} output chunks were done before, "
                         f"{CHUNKS - done} computed now"), a
    assert "resumed an interrupted run" in latest.with_suffix(".md").read_text()


def test_a_nightly_flow_run_without_the_commands_handlers_reports_its_interruption_too(scene, tmp_path):
    """As a Prefect worker runs it: the flow itself, no `segflow nightly` around it.  Its signal was forgotten as
    the flow's own handler block ended, so the report listed inputs it had no entry for (KeyError)."""
    image, model = scene
    inbox, out = _inbox(tmp_path, image, "a.tif")
    code = ("import sys\nfrom flows.nightly import nightly\nfrom flows.interrupts import Interrupted\n"
            "try:\n    nightly(inbox=sys.argv[1], model_dirs=[sys.argv[2]], out_dir=sys.argv[3], "
            "options={'chunk_size': 40, 'workers': 0, 'quicklook': False})\n"
            "except Interrupted as exc:\n    print('INTERRUPTED', exc.signum)\n    sys.exit(3)\n")
    env = {**os.environ, KILL_AFTER_CHUNKS_ENV: "3", KILL_SIGNAL_ENV: "SIGINT"}
    proc = subprocess.run([sys.executable, "-c", code, str(inbox), str(model.path), str(out)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 3 and "INTERRUPTED 2" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    [path] = (out / "reports").glob("*.json")
    report = json.loads(path.read_text())
    assert report["run"]["state"] == "Interrupted"
    assert [(r["status"], r["note"]) for r in report["inputs"]] == [("interrupted", STOPPED_NOTE)]


def test_an_input_that_finishes_while_nightly_stops_is_named_done(scene, tmp_path):
    """SIGTERM while an input exported: it finished (outputs, sidecar, ledger), yet the command said only that the
    inputs in progress left nothing complete, and the next night's "skipped" was the only record of it."""
    image, model = scene
    inbox, out = _inbox(tmp_path, image, "scene.tif")
    stopper = ("import os, signal, sys\nimport storage.provenance as p\nwrite = p.write_sidecar\n"
               "def stopped(*a, **k):\n    os.kill(os.getpid(), signal.SIGTERM)  # as it writes the sidecar\n"
               "    return write(*a, **k)\np.write_sidecar = stopped\n"
               "from flows.cli import app\nsys.argv = ['segflow', *sys.argv[1:]]\napp()\n")
    proc = subprocess.run([sys.executable, "-c", stopper, "nightly", "--inbox", str(inbox), "--model", str(model.path),
                           "--out", str(out), "--workers", "0"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "250"})
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1] == (
        f"interrupted: the inputs in progress left nothing in {out} that looks complete (those already done are; "
        f"done in this run: {inbox / 'scene.tif'}); run the same command again to resume them from their finished "
        "chunks"), proc.stderr
    assert verify_sidecar(out / "scene.provenance.json") == []


# --------------------------------------------------------------------------- one Dask worker killed


def test_killed_worker_still_gives_the_identical_output(scene, tmp_path):
    from flows.cluster import dask_client
    from flows.flows import segment
    from tests.faults import KillWorkerOnce

    image, model = scene
    marker = tmp_path / "worker-killed"
    with dask_client(workers=2, threads_per_worker=1) as client:
        options = SegmentOptions(chunk_size=CHUNK, dask_address=client.scheduler_info()["address"])
        reference = segment(input_path=str(image), model_dir=str(model.path), out_dir=str(tmp_path / "ref"),
                            options=options)
        pids = set(client.run(os.getpid).values())
        client.register_plugin(KillWorkerOnce(str(marker), after=2))
        faulted = segment(input_path=str(image), model_dir=str(model.path), out_dir=str(tmp_path / "out"),
                          options=options)
        after = set(client.run(os.getpid).values())
    killed_pid = int(marker.read_text().split()[0])
    assert killed_pid in pids and killed_pid not in after  # a worker really died mid-run, and was replaced
    assert faulted["ok"] and faulted["statistics"]["chunks_written"] == CHUNKS
    assert faulted["statistics"]["label_pixels"] == reference["statistics"]["label_pixels"]
    out, ref = tmp_path / "out", tmp_path / "ref"
    assert (out / "scene.tif").read_bytes() == (ref / "scene.tif").read_bytes()
    assert _tree(out / "scene.zarr") == _tree(ref / "scene.zarr")  # no hole, no chunk written differently
    assert sorted(p.name for p in out.iterdir()) == ["scene.provenance.json", "scene.qml", "scene.stac.json", "scene.tif",
                                                     "scene.zarr"]


# --------------------------------------------------------------------------- interrupted, then other parameters


class _Interrupt:
    """A progress reporter that raises KeyboardInterrupt (Ctrl-C) after ``after`` chunks of a run (one advance
    per chunk written, by the windows it owns)."""

    def __init__(self, after: int) -> None:
        self.after, self.seen = after, 0

    def start(self, key: str, description: str, total: int, unit: str = "") -> None:
        pass

    def advance(self, key: str, amount: int = 1) -> None:
        self.seen += 1
        if self.seen >= self.after:
            raise KeyboardInterrupt

    def finish(self, key: str) -> None:
        pass


def _wait_idle(client) -> None:
    """Until no worker runs a task: the cancelled tasks of the abandoned run that were already running finish
    (and may write a chunk and its marker) before the test counts markers."""
    deadline = time.monotonic() + 120
    while any(client.processing().values()) or any(client.run(executing_tasks).values()):
        assert time.monotonic() < deadline, "the cluster did not go idle"
        time.sleep(0.05)


def _ctrl_c_after(chunks: int, image: Path, model, out: Path, options: SegmentOptions, client) -> None:
    """``segment_one`` stopped as Ctrl-C stops it after ``chunks`` chunks, the cluster idle again."""
    with pytest.raises(KeyboardInterrupt), reporting(_Interrupt(chunks)):
        segment_one(image, model, out, options, client)
    _wait_idle(client)


def test_interrupted_run_resumes_but_other_parameters_start_afresh(scene, tmp_path, dask_cluster):
    image, model_dir = scene
    model = load_model(model_dir.path)
    out = tmp_path / "out"
    options = SegmentOptions(chunk_size=CHUNK)
    _ctrl_c_after(2, image, model, out, options, dask_cluster)
    done = len(_markers(out))
    assert 2 <= done < CHUNKS and (out / WORK_DIR).is_dir()  # Ctrl-C keeps the partial work

    # another overlap: another identity; the partial store is not trusted, the ingest still is
    other = segment_one(image, model, out, SegmentOptions(chunk_size=CHUNK, overlap=0.5), dask_cluster)
    stats = other.statistics
    assert stats["partial_store"] == "discarded" and stats["chunks_resumed"] == 0
    assert stats["chunks_written"] == CHUNKS and stats["ingest_reused"] is True
    assert json.loads((out / "scene.provenance.json").read_text())["parameters"]["overlap"] == 0.5
    assert not list(out.glob(".scene.zarr.*.partial")) and not (out / WORK_DIR).exists()

    # the same command twice: interrupted, then resumed from its markers
    _ctrl_c_after(3, image, model, out, options, dask_cluster)
    done = len(_markers(out))
    resumed = segment_one(image, model, out, options, dask_cluster).statistics
    assert resumed["partial_store"] == "resumed"
    assert (resumed["chunks_resumed"], resumed["chunks_written"]) == (done, CHUNKS - done)


def test_a_store_killed_as_it_was_committed_is_recomputed_saying_why(scene, tmp_path, dask_cluster, caplog):
    """Committing removes the journal first, then renames the store into place: a run killed in between leaves
    a partial store of this very run that is no longer trusted.  The rerun recomputes it, and had said the
    partial was of "another input, model or parameters"."""
    import logging
    import shutil

    image, model_dir = scene
    model = load_model(model_dir.path)
    out = tmp_path / "out"
    options = SegmentOptions(chunk_size=CHUNK)
    _ctrl_c_after(2, image, model, out, options, dask_cluster)
    [partial] = out.glob(".scene.zarr.*.partial")
    shutil.rmtree(partial / JOURNAL_DIR)  # where a kill between the journal's removal and the rename leaves it
    with caplog.at_level(logging.WARNING, logger="segflow"):
        stats = segment_one(image, model, out, options, dask_cluster).statistics
    assert stats["partial_store"] == "discarded" and stats["chunks_written"] == CHUNKS
    assert "cannot be resumed (killed as it committed it, or damaged); starting afresh" in caplog.text
    assert "another input" not in caplog.text


# --------------------------------------------------------------------------- disk errors at export


def _listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_output_path_taken_by_a_directory_fails_cleanly(scene, tmp_path, dask_cluster):
    """A denied write at export, reproducible as root: the COG's final rename meets a directory."""
    image, model_dir = scene
    out = tmp_path / "out"
    (out / "scene.tif").mkdir(parents=True)
    (out / "scene.tif" / "keep.txt").write_text("not ours")
    with pytest.raises(ExportError) as err:
        segment_one(image, load_model(model_dir.path), out, SegmentOptions(chunk_size=CHUNK), dask_cluster)
    message = str(err.value)
    assert message.startswith(str(out / "scene.tif")) and "Is a directory" in message and "\n" not in message
    assert _listing(out) == ["scene.tif"] and _listing(out / "scene.tif") == ["keep.txt"]


def test_a_quicklook_that_cannot_be_written_fails_the_input_as_any_output(scene, tmp_path, dask_cluster,
                                                                          monkeypatch):
    """The disk full at the quicklook (RLIMIT_FSIZE, as test_full_disk_at_export) had been a warning: the input
    done, recorded in nightly's ledger and skipped ever after, its quicklook never made."""
    from flows import pipeline

    image, model_dir = scene
    out = tmp_path / "out"
    real = pipeline.write_quicklook
    monkeypatch.setattr(pipeline, "write_quicklook", lambda *a, **k: _under_file_size_limit(real, *a, **k))
    with pytest.raises(ExportError) as err:
        segment_one(image, load_model(model_dir.path), out, SegmentOptions(chunk_size=CHUNK, quicklook=True),
                    dask_cluster)
    message = str(err.value)
    assert message.startswith(f"{out / 'scene.quicklook.png'}: cannot write the quicklook: ") and \
        "File too large" in message, message
    assert _listing(out) == []  # the label COG and the rest it wrote are removed with it


def test_output_directory_under_a_file_fails_cleanly(scene, tmp_path, dask_cluster):
    image, model_dir = scene
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match=r"out: cannot create the output folder: .*file is a file"):
        segment_one(image, load_model(model_dir.path), tmp_path / "file" / "out", SegmentOptions(chunk_size=CHUNK),
                    dask_cluster)
    assert _listing(tmp_path) == ["file"]


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory writes are refused in: a read-only tmpfs as root (chmod denies root nothing), else mode 0555."""
    path = tmp_path / "locked"
    path.mkdir()
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        yield path, "Permission denied"
        os.chmod(path, 0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                      check=False, capture_output=True).returncode != 0:
        pytest.skip("running as root without mount rights: no way to deny a write")
    yield path, "Read-only file system"
    subprocess.run(["umount", str(path)], check=True)


def test_denied_write_at_export_is_one_line_and_leaves_nothing(unwritable_dir):
    import numpy as np

    from storage.classes import LabelClass
    from storage.geometry import RasterGeometry, VolumeGeometry
    from storage.cogwrite import write_label_cog
    from storage.nifti import write_label_nifti

    out, why = unwritable_dir
    classes = [LabelClass(value=0, name="a"), LabelClass(value=1, name="b")]
    raster = RasterGeometry(width=64, height=48, transform=(10, 0, 0, 0, -10, 0), dtype="uint8")
    with pytest.raises(ExportError) as err:
        write_label_cog(np.zeros((48, 64), np.uint8), raster, out / "x.tif", classes=classes)
    assert str(err.value).startswith(f"{out / 'x.tif'}: cannot write COG") and why in str(err.value)
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((8, 6, 4))
    volume = VolumeGeometry(shape=[8, 6, 4], affine=np.eye(4).tolist(), qform=np.eye(4).tolist(),
                            sform=np.eye(4).tolist(), qform_code=1, sform_code=1, zooms=[1, 1, 1],
                            orientation=["R", "A", "S"], nifti_version=1, dtype="int16",
                            header_b64=__import__("base64").b64encode(hdr.binaryblock).decode())
    with pytest.raises(ExportError) as err:
        write_label_nifti(np.zeros((4, 6, 8), np.uint8), volume, out / "x.nii.gz", classes=classes)
    assert str(err.value).startswith(f"{out / 'x.nii.gz'}: cannot write") and why in str(err.value)
    assert "\n" not in str(err.value) and _listing(out) == []


def _fill(directory: Path, leave: int = 0) -> Path:
    """Fill a small file system up (a tmpfs) until a write fails with ENOSPC, less ``leave`` bytes."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    os.close(fd)
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def _under_file_size_limit(call, *args, **kwargs):  # noqa: ANN001, ANN202
    """``call`` with writes past 4 KiB failing with EFBIG (RLIMIT_FSIZE), as a full disk fails them."""
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process at the limit
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
    try:
        return call(*args, **kwargs)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, old)


@pytest.fixture(params=["tmpfs", "fsize-limit"])
def full_disk(request, tmp_path):
    """How the disk fills up: a real 4 MiB tmpfs filled to the last byte (needs mount rights, else skipped),
    or RLIMIT_FSIZE, under which any write past 4 KiB fails with EFBIG (works anywhere)."""
    if request.param == "fsize-limit":
        yield request.param, None
        return
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                                           check=False, capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root and mount rights; the fsize-limit variant covers the path")
    yield request.param, mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_at_export_gives_one_line_and_leaves_nothing(scene, tmp_path, full_disk, dask_cluster,
                                                                 monkeypatch):
    """The disk fills up between inference and export: the export fails, the committed zarr is removed."""
    from flows import pipeline

    how, disk = full_disk
    image, model_dir = scene
    out = (disk or tmp_path) / "out"
    real_export = pipeline.export_labels

    def export_on_a_full_disk(*args, **kwargs):
        if disk is not None:
            _fill(disk)
            return real_export(*args, **kwargs)
        return _under_file_size_limit(real_export, *args, **kwargs)

    monkeypatch.setattr(pipeline, "export_labels", export_on_a_full_disk)
    with pytest.raises(ExportError) as err:
        segment_one(image, load_model(model_dir.path), out, SegmentOptions(chunk_size=CHUNK), dask_cluster)
    message = str(err.value)
    assert message.startswith(f"{out / 'scene.tif'}: cannot write COG: ") and "\n" not in message
    assert ("no space left on device" if how == "tmpfs" else "file size limit exceeded") in message, message
    assert _listing(out) == []  # no zarr, no COG, no temporaries, no work store


def test_full_disk_while_ingesting_names_the_input(scene, tmp_path, dask_cluster, monkeypatch):
    """Two inputs of a batch on a full disk both said `OUT/.segflow-work: cannot write the ingested copy`: which
    input failed was not said."""
    from flows import pipeline

    image, model_dir = scene
    out = tmp_path / "out"
    real_ingest = pipeline.ingest_input

    def ingest_on_a_full_disk(*args, **kwargs):
        return _under_file_size_limit(real_ingest, *args, **kwargs)

    monkeypatch.setattr(pipeline, "ingest_input", ingest_on_a_full_disk)
    with pytest.raises(ExportError) as err:
        segment_one(image, load_model(model_dir.path), out, SegmentOptions(chunk_size=CHUNK), dask_cluster)
    message = str(err.value)
    assert message.startswith(f"{image}: cannot write the ingested copy in ") and "File too large" in message, message
    assert "\n" not in message


def test_a_workers_dump_of_an_error_segflow_reports_itself_stays_off_the_console():
    """A full disk while writing chunks printed five multi-line "Compute Failed" records with tracebacks before
    segflow's one line; an error segflow does not report itself keeps its record."""
    import logging

    from flows.cluster import ReportedFailures

    def record(text: str) -> logging.LogRecord:
        return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, text, None, None)

    quiet = ReportedFailures()
    dump = "Compute Failed\nKey: ('write', 0)\nException: \"{}\"\nTraceback: ..."
    assert not quiet.filter(record(dump.format("OSError(28, 'No space left on device')")))
    assert not quiet.filter(record(dump.format("CorruptInputError('a.tif: cannot read')")))
    assert quiet.filter(record(dump.format("RuntimeError('CUDA error: an illegal memory access')")))
    assert quiet.filter(record("Compute Failed but no exception named"))


def test_a_closing_workers_failed_heartbeat_stays_off_the_console():
    """A heartbeat in flight when `segment`'s in-process cluster closed logged "Failed to communicate with scheduler
    during heartbeat" with a StreamClosedError traceback after the run's last line (one CI run).  While segflow
    closes its cluster the record is dropped (seen from a worker plugin's teardown, which runs inside the close);
    a running worker's stays, even beside a closed worker of an earlier cluster still referenced (the first
    version of this filter hid it then, and failed this test in CI's full run)."""
    import logging

    from distributed import LocalCluster, Worker

    from flows.cluster import HEARTBEAT_FAILED, ReportedFailures, dask_client

    heartbeat = logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, HEARTBEAT_FAILED + ".", None, None)
    quiet = ReportedFailures()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as earlier:
        [lingering] = [w for w in Worker._instances if w.address in earlier.scheduler.workers]
    assert lingering.status.name == "closed"  # still referenced, as a test's or a notebook's variable keeps it
    _SEEN_WHILE_CLOSING.clear()
    with dask_client(workers=0) as client:  # a cluster of its own, in this process, whatever client is current
        client.register_plugin(_WatchTheClose(), name="watch")
        assert quiet.filter(heartbeat), "a running worker's failed heartbeat was hidden"
    assert _SEEN_WHILE_CLOSING == [(False, True)], "a heartbeat failing while segflow closes its cluster is printed"
    assert quiet.filter(heartbeat)  # closed and done: a later cluster's heartbeat errors are news again


_SEEN_WHILE_CLOSING: list[bool] = []  # module level: the plugin reaches the in-process worker pickled by reference


class _WatchTheClose(WorkerPlugin):
    """What the filter says of a heartbeat record while the worker closes (its teardown runs inside the close)."""

    def teardown(self, worker) -> None:  # noqa: ANN001
        import logging

        from flows.cluster import HEARTBEAT_FAILED, ReportedFailures, closing_a_cluster

        record = logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, HEARTBEAT_FAILED, None, None)
        # segflow's own mark too: the worker's status says "closing" here, but it is "closed" before the cluster is
        _SEEN_WHILE_CLOSING.append((ReportedFailures().filter(record), closing_a_cluster()))


# --------------------------------------------------------------------------- SIGKILL of a run in raster model space


def test_sigkill_of_a_raster_model_space_run_resumes_byte_identical(scene, tmp_path):
    """A 20 m model on the 10 m scene (warped by the windows' reads) and its staged probabilities: after a
    SIGKILL, the rerun writes only the unfinished input-grid chunks, byte for byte as an uninterrupted run."""
    image, _ = scene
    model = tiny_model(tmp_path / "model20", spatial_dims=2, channels=4, roi=[16, 16], seed=2,
                       spacing=[20.0, 20.0], spacing_unit="m")
    assert model.card.applies_raster_model_space
    rc, [reference], stderr = _segment(image, model.path, tmp_path / "ref", logs=tmp_path / "ref")
    assert rc == 0, stderr
    assert reference["statistics"]["model_space"] and reference["statistics"]["chunks_written"] == CHUNKS

    out = tmp_path / "out"
    rc, _, _ = _segment(image, model.path, out, kill_after=3, logs=tmp_path / "killed")
    assert rc == -signal.SIGKILL
    done = len(_markers(out))
    assert 3 <= done < CHUNKS
    assert not (out / "scene.tif").exists()

    rc, [resumed], stderr = _segment(image, model.path, out, logs=tmp_path / "resumed")
    assert rc == 0, stderr
    stats = resumed["statistics"]
    assert stats["partial_store"] == "resumed" and stats["ingest_reused"] is True
    assert stats["chunks_resumed"] == done and stats["chunks_written"] == CHUNKS - done
    assert stats["model_image"] == "warped by the windows' reads"  # no model-space store to leave behind
    [line] = [x for x in stderr.splitlines() if x.startswith("segment scene (resumed): ")]
    assert int(line.split(": ")[1].split()[0]) == stats["windows_evaluated"] + stats["windows_skipped"], line
    assert stats["label_pixels"] == reference["statistics"]["label_pixels"]
    assert (out / "scene.tif").read_bytes() == (tmp_path / "ref" / "scene.tif").read_bytes()
    assert _tree(out / "scene.zarr") == _tree(tmp_path / "ref" / "scene.zarr")
    assert not (out / WORK_DIR).exists()  # the model grid's work folder and its staged probabilities are gone
    assert verify_sidecar(out / "scene.provenance.json") == []


def _cut(image: Path, folder: Path) -> list[Path]:
    """The scene cut into 2 x 2 GeoTIFF tiles (a grid that does not follow the chunk size)."""
    import rasterio
    from rasterio.windows import Window

    folder.mkdir()
    tiles = []
    with rasterio.open(image) as src:
        rows, cols = (0, 70, src.height), (0, 90, src.width)
        for r in range(2):
            for c in range(2):
                window = Window(cols[c], rows[r], cols[c + 1] - cols[c], rows[r + 1] - rows[r])
                profile = {**src.profile, "width": window.width, "height": window.height,
                           "transform": src.window_transform(window), "tiled": False}
                profile.pop("blockxsize", None)
                profile.pop("blockysize", None)
                tiles.append(folder / f"tile_{r}{c}.tif")
                with rasterio.open(tiles[-1], "w", **profile) as dst:
                    dst.write(src.read(window=window))
    return tiles


def test_sigkill_of_a_mosaic_run_resumes_byte_identical(scene, tmp_path):
    image, model = scene
    tiles = [str(t) for t in _cut(image, tmp_path / "tiles")]
    args = (tiles[0], "--mosaic", "region", *tiles[1:])
    rc, [reference], stderr = _segment(*args[:1], model.path, tmp_path / "ref", *args[1:], logs=tmp_path / "ref")
    assert rc == 0, stderr
    assert reference["statistics"]["chunks_written"] == CHUNKS

    out = tmp_path / "out"
    rc, _, _ = _segment(*args[:1], model.path, out, *args[1:], kill_after=3, logs=tmp_path / "killed")
    assert rc == -signal.SIGKILL
    done = len(sorted(out.glob(f".region.zarr.*.partial/{JOURNAL_DIR}/done/*.json")))
    assert 3 <= done < CHUNKS
    assert not (out / "region.tif").exists()

    rc, [resumed], stderr = _segment(*args[:1], model.path, out, *args[1:], logs=tmp_path / "resumed")
    assert rc == 0, stderr
    stats = resumed["statistics"]
    assert stats["partial_store"] == "resumed" and stats["ingest_reused"] is True
    assert stats["chunks_resumed"] == done and stats["chunks_written"] == CHUNKS - done
    assert (out / "region.tif").read_bytes() == (tmp_path / "ref" / "region.tif").read_bytes()
    assert _tree(out / "region.zarr") == _tree(tmp_path / "ref" / "region.zarr")
    assert verify_sidecar(out / "region.provenance.json") == []


def test_a_resumed_store_drops_the_temporary_files_of_writes_a_kill_interrupted(tmp_path):
    """zarr writes a chunk to "<name>.<32 hex>.partial" and renames it into place; a SIGKILL between the two leaves
    that file, which a resumed store must not keep (it is never data, and it would differ from an uninterrupted
    run's store; seen once in CI in the raster model-space SIGKILL test)."""
    from storage.layout import ChunkJournal, create_prediction_store, partial_path, reopen_prediction_store

    target, identity = tmp_path / "scene.zarr", "a" * 64
    kw = dict(spatial_shape=(32, 32), chunks=(16, 16), label_dtype="uint8", probabilities_dtype=None)
    _, labels, _ = create_prediction_store(target, meta={}, nodata_label=255, classes=[{"value": 0}], identity=identity,
                                           **kw)
    ChunkJournal(partial_path(target, identity), identity).start({"identity": identity})
    labels[:16, :16] = 1
    stray = partial_path(target, identity) / "labels" / "c" / "0" / f"1.{'0123456789abcdef' * 2}.partial"
    stray.write_bytes(b"half a chunk")
    kept = partial_path(target, identity) / "labels" / "keep.partial.txt"  # not zarr's pattern: left alone
    kept.write_text("x")
    assert reopen_prediction_store(target, identity, num_classes=1, **kw) is not None
    assert not stray.exists() and kept.exists()


def test_stores_write_every_chunk_even_one_of_fill_value_also_when_reopened(tmp_path):
    """zarr's default compares each written chunk with the fill value in its one event-loop thread, and skips
    storing it when equal: a quarter of a label chunk write's time.  segflow's arrays store every chunk (the
    values read back are the same either way), created or reopened for a resumed run."""
    import numpy as np

    from storage.layout import ChunkJournal, create_prediction_store, partial_path, reopen_prediction_store

    target, identity = tmp_path / "scene.zarr", "b" * 64
    kw = dict(spatial_shape=(32, 32), chunks=(16, 16), label_dtype="uint8", probabilities_dtype="uint8")
    _, labels, probs = create_prediction_store(target, meta={}, nodata_label=255, classes=[{"value": 0}],
                                               identity=identity, **kw)
    ChunkJournal(partial_path(target, identity), identity).start({"identity": identity})
    labels[:16, :16] = 255  # all nodata: the fill value
    probs[:, :16, :16] = 0
    chunk = partial_path(target, identity) / "labels" / "c" / "0" / "0"
    assert chunk.is_file() and (partial_path(target, identity) / "probabilities" / "c" / "0" / "0" / "0").is_file()
    chunk.unlink()
    _, labels, probs = reopen_prediction_store(target, identity, num_classes=1, **kw)
    labels[:16, :16] = 255
    assert chunk.is_file() and labels.config.write_empty_chunks and probs.config.write_empty_chunks
    assert np.all(labels[:] == 255)


def test_a_run_killed_while_replacing_an_earlier_runs_outputs_leaves_no_sidecar_that_describes_them(scene,
                                                                                                    tmp_path):
    """Killed between its new label COG and its new sidecar, a rerun with other parameters left the new labels
    beside the earlier run's sidecar, every file looking complete (verify: "changed").  The earlier sidecar is
    now retired first: the folder has no provenance until the run's own is written.  The next run still removes
    the earlier run's outputs it does not write (known from the retired sidecar), and the temporary files the
    killed run left (an unfinished COG stayed forever)."""
    image, model = scene
    out = tmp_path / "out"
    rc, _, err = _segment(image, model.path, out, "--probabilities", "uint8", logs=tmp_path / "a")
    assert rc == 0 and (out / "scene.probabilities.tif").is_file(), err
    proc = _killed_before_its_sidecar(image, model.path, out, "--overlap", "0.5")
    assert proc.returncode == 137, proc.stderr
    assert not (out / "scene.provenance.json").exists() and (out / ".scene.provenance.json.previous").is_file()
    verify = subprocess.run([sys.executable, "-m", "flows", "verify", str(out / "scene.tif")], capture_output=True,
                            text=True, timeout=120)
    assert verify.returncode == 2 and "no provenance beside it records it" in verify.stderr
    (out / ".scene.tif.0123456789ab.tiled.tif").write_bytes(b"half a COG")  # as a kill in GDAL's write leaves
    (out / ".other.tif.0123456789ab.tmp").write_bytes(b"another input's")
    (out / ".scene.tif.notes").write_text("not segflow's")
    rc, [outcome], err = _segment(image, model.path, out, "--overlap", "0.5", logs=tmp_path / "b")
    assert rc == 0, err
    assert verify_sidecar(out / "scene.provenance.json") == []
    assert not (out / ".scene.provenance.json.previous").exists()
    assert not (out / "scene.probabilities.tif").exists()  # the earlier run's, named only by its retired sidecar
    assert not (out / ".scene.tif.0123456789ab.tiled.tif").exists()
    assert (out / ".other.tif.0123456789ab.tmp").exists() and (out / ".scene.tif.notes").exists()


def test_a_rerun_that_fails_while_exporting_leaves_the_earlier_runs_outputs_as_they_were(scene, tmp_path):
    """A rerun with --probabilities failed at its probability COG after its label COG had replaced the earlier
    run's; its cleanup removed that COG and put the earlier sidecar back, which then described a label map that
    was gone.  The earlier outputs are set aside first and put back: the folder is the earlier run's again."""
    image, model = scene
    out = tmp_path / "out"
    rc, _, err = _segment(image, model.path, out, logs=tmp_path / "a")
    assert rc == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (out / "scene.probabilities.tif").mkdir()  # someone's folder where the new run's probability COG goes
    rc, _, err = _segment(image, model.path, out, "--overlap", "0.5", "--probabilities", "uint8",
                          logs=tmp_path / "b")
    assert rc == 1 and "scene.probabilities.tif: cannot write: Is a directory" in err, err
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before  # the earlier label COG, STAC item, sidecar and quicklook, byte for byte
    assert verify_sidecar(out / "scene.provenance.json") == []
    assert (out / "scene.probabilities.tif").is_dir() and (out / "scene.zarr").is_dir()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".scene.")]


def test_what_a_run_killed_while_exporting_wrote_goes_when_the_earlier_command_runs_again(scene, tmp_path):
    """A run with --vector and --probabilities killed before its sidecar: rerunning the earlier command left the
    killed run's polygons and probability COG beside its outputs, listed in no sidecar (verify passed)."""
    image, model = scene
    out = tmp_path / "out"
    rc, _, err = _segment(image, model.path, out, "--no-zarr", logs=tmp_path / "a")
    assert rc == 0, err
    proc = _killed_before_its_sidecar(image, model.path, out, "--no-zarr", "--vector", "gpkg", "--probabilities",
                                      "uint8")
    assert proc.returncode == 137, proc.stderr
    assert (out / "scene.gpkg").is_file() and (out / "scene.probabilities.tif").is_file()
    (out / "scene.notes.txt").write_text("mine")
    rc, [outcome], err = _segment(image, model.path, out, "--no-zarr", logs=tmp_path / "c")
    assert rc == 0, err
    assert not (out / "scene.gpkg").exists() and not (out / "scene.probabilities.tif").exists()
    assert verify_sidecar(out / "scene.provenance.json") == []
    listed = set(json.loads((out / "scene.provenance.json").read_text())["outputs"]) | {"scene.provenance.json"}
    assert {p.name for p in out.iterdir() if p.name.startswith("scene.")} == listed | {"scene.notes.txt"}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".scene.")]


def test_a_run_killed_while_exporting_resumes_with_every_chunk_done(scene, tmp_path):
    """The store was committed before the exports, so a kill while the COG was written left a complete store and
    no partial one: the rerun recomputed every chunk.  The exports now read the partial store, committed after
    them, and the rerun only exports again."""
    image, model = scene
    out = tmp_path / "out"
    proc = _killed_at("flows.export.export_labels", image, model.path, out)
    assert proc.returncode == 137, proc.stderr
    assert not (out / "scene.zarr").exists() and len(list(out.glob(".scene.zarr.*.partial"))) == 1
    rc, [resumed], err = _segment(image, model.path, out, logs=tmp_path / "resumed")
    assert rc == 0, err
    stats = resumed["statistics"]
    assert stats["partial_store"] == "resumed" and stats["chunks_resumed"] == CHUNKS and stats["chunks_written"] == 0
    rc, [reference], _ = _segment(image, model.path, tmp_path / "ref", logs=tmp_path / "ref")
    assert rc == 0 and (out / "scene.tif").read_bytes() == (tmp_path / "ref" / "scene.tif").read_bytes()
    assert verify_sidecar(out / "scene.provenance.json") == []


def test_a_run_killed_while_exporting_leaves_no_output_under_its_own_name(scene, tmp_path):
    """Every output is written in a staging folder and renamed into OUT only once all are written and hashed, just
    before the sidecar: a kill while exporting (seconds, at scale) had left the label COG, polygons and a STAC item
    under their own names with no sidecar, which a catalogue crawling OUT takes for a delivery."""
    image, model = scene
    out = tmp_path / "out"
    proc = _killed_at("flows.pipeline._publish", image, model.path, out, "--vector", "gpkg")
    assert proc.returncode == 137, proc.stderr
    # the store alone (committed, as the exports read it while partial; no sidecar lists it yet)
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == ["scene.zarr"]
    assert sorted(p.name for p in (out / WORK_DIR / "scene.export").iterdir()) == [
        "scene.gpkg", "scene.qml", "scene.stac.json", "scene.tif"]  # written, not published
    rc, _, err = _segment(image, model.path, out, "--vector", "gpkg", logs=tmp_path / "again")
    assert rc == 0, err
    assert verify_sidecar(out / "scene.provenance.json") == []
    assert not (out / WORK_DIR).exists()
    item = json.loads((out / "scene.stac.json").read_text())
    assert item["assets"]["labels"]["href"] == "./scene.tif" and item["assets"]["polygons"]["href"] == "./scene.gpkg"


def test_outputs_are_published_into_an_output_folder_given_as_a_relative_path(scene, tmp_path):
    """``--out out`` (relative) with absolute staged paths: every output stayed in the staging folder, which is
    then removed, and the run said "ok" (the demo caught it; the tests had all named OUT absolutely)."""
    image, model = scene
    proc = subprocess.run([sys.executable, "-m", "flows", "segment", str(image), "--model", str(model.path), "--out",
                           "out", "--chunk-size", str(CHUNK), "--workers", "0", "--vector", "gpkg"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert f"-> {out / 'scene.tif'}" in proc.stdout + proc.stderr
    assert verify_sidecar(out / "scene.provenance.json") == []
    assert {"scene.tif", "scene.gpkg", "scene.stac.json"} <= {p.name for p in out.iterdir()}
    assert not (out / WORK_DIR).exists()


def test_a_file_of_someone_elses_under_an_output_name_survives_a_failed_run_and_a_killed_one(scene, tmp_path):
    """A first run into a folder that held a user's ``scene.tif`` (no sidecar lists it) wrote its label COG over
    it, failed at the STAC item, and removed what it wrote: the user's file was gone.  It is set aside first and
    put back on failure and after a kill; a run that succeeds replaces it, saying so."""
    image, model = scene
    out = tmp_path / "out"
    out.mkdir()
    (out / "scene.tif").write_bytes(b"the user's own scene.tif")
    (out / "scene.probabilities.tif").write_bytes(b"the user's probabilities")
    (out / "scene.stac.json").mkdir()  # someone's folder where the STAC item goes: the run fails there
    rc, _, err = _segment(image, model.path, out, logs=tmp_path / "a")
    assert rc == 1 and "scene.stac.json: cannot write: Is a directory" in err, err
    assert (out / "scene.tif").read_bytes() == b"the user's own scene.tif"
    assert (out / "scene.probabilities.tif").read_bytes() == b"the user's probabilities"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".scene.")]
    (out / "scene.stac.json").rmdir()
    proc = _killed_before_its_sidecar(image, model.path, out)
    assert proc.returncode == 137, proc.stderr
    assert (out / ".scene.tif.previous").read_bytes() == b"the user's own scene.tif"
    rc, _, err = _segment(image, model.path, out, logs=tmp_path / "c")
    assert rc == 0, err
    assert "scene.tif: replaced a file of this name that no earlier segflow run had written" in err
    assert verify_sidecar(out / "scene.provenance.json") == []
    assert (out / "scene.probabilities.tif").read_bytes() == b"the user's probabilities"  # not written: left
    assert not [p.name for p in out.iterdir() if p.name.startswith(".scene.")]


def test_a_qgis_style_of_the_users_is_kept_by_a_rerun(scene, tmp_path):
    """QGIS's "Save as Default" writes <stem>.qml beside <stem>.tif: a rerun replaced the user's style with
    segflow's plain one.  A style that segflow did not write, or wrote and someone changed since, is kept, and
    the run writes none (its sidecar then lists no style)."""
    image, model = scene
    out = tmp_path / "out"
    rc, _, err = _segment(image, model.path, out, logs=tmp_path / "a")
    assert rc == 0 and "scene.qml" in json.loads((out / "scene.provenance.json").read_text())["outputs"], err
    (out / "scene.qml").write_text("<qgis><!-- the user's style --></qgis>")
    rc, _, err = _segment(image, model.path, out, "--overlap", "0.5", logs=tmp_path / "b")
    assert rc == 0, err
    assert (out / "scene.qml").read_text() == "<qgis><!-- the user's style --></qgis>"
    assert "scene.qml" not in json.loads((out / "scene.provenance.json").read_text())["outputs"]
    assert verify_sidecar(out / "scene.provenance.json") == []
    rc, _, err = _segment(image, model.path, out, logs=tmp_path / "c")  # and again: still the user's
    assert rc == 0 and (out / "scene.qml").read_text() == "<qgis><!-- the user's style --></qgis>", err
    assert not [p.name for p in out.iterdir() if p.name.startswith(".scene.")]


def test_progress_shares_add_up_to_the_windows_a_run_computes():
    """The console's count is the sum of these shares: it must equal the report's windows, whatever the split."""
    from flows.progress import spread

    assert spread(49, {"a": 9, "b": 3, "c": 3, "d": 1}) == {"a": 27, "b": 9, "c": 9, "d": 4}
    assert spread(16, {"a": 16}) == {"a": 16} and spread(5, {}) == {}
    assert spread(7, {"a": 0, "b": 0, "c": 0}) == {"a": 2, "b": 2, "c": 3}  # no weight: evenly
    assert sum(spread(1000, {i: (i * 7) % 5 for i in range(37)}).values()) == 1000
