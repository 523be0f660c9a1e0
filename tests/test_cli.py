"""The `segflow` command as a user runs it: exit codes, one-line errors, verify, info, train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version as prefect_version
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from storage.samples import make_scene
from tests.conftest import shared
from tests.models import tiny_model
from tests.test_pipeline import BAD

SEGFLOW = [sys.executable, "-m", "flows"]


def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": os.environ["PREFECT_HOME"], "COLUMNS": "200", **(env or {})}
    return subprocess.run([*SEGFLOW, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def refused(proc: subprocess.CompletedProcess) -> list[str]:
    """What a usage refusal printed (exit 2): its non-blank stderr lines, which should be one."""
    assert proc.returncode == 2, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.strip()]


def small_scene(path: Path) -> Path:
    """A 40 x 30 three-band GeoTIFF in UTM: the input of checks that stop before any pixel is segmented."""
    with rasterio.open(path, "w", driver="GTiff", width=40, height=30, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 6000000, 10, 10)) as dst:
        dst.write(np.ones((3, 30, 40), np.uint8))
    return path


def model_and_volume(tmp_path: Path):  # noqa: ANN201 - (a tiny 3D model, a 20^3 NIfTI)
    import nibabel as nib

    model = tiny_model(tmp_path / "m3d", spatial_dims=3, channels=1)
    volume = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.int16), np.eye(4)), volume)
    return model, volume


@pytest.fixture(scope="module")
def model2d(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("m") / "tiny", spatial_dims=2, channels=3)


def test_segment_batch_exit_codes_errors_and_verify(model2d, tmp_path):
    good = tmp_path / "in put é.tif"  # spaces and non-ASCII in the path
    data = np.random.default_rng(0).integers(1, 255, (3, 130, 150), dtype=np.uint8)
    with rasterio.open(good, "w", driver="GTiff", width=150, height=130, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 6000000, 10, 10), nodata=0) as dst:
        dst.write(data)
    bad = [shared(p) for p in BAD]  # every file of ../shared/data/bad
    missing = tmp_path / "missing.tif"
    out = tmp_path / "out"
    proc = run("segment", good, *bad, missing, "--model", model2d.path, "--out", out, "--workers", "1")
    assert proc.returncode == 1, proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == len(bad) + 1, proc.stderr
    for path in (*bad, missing):
        assert any(str(path) in line for line in errors), (path, errors)
    assert sorted(p.name for p in out.iterdir()) == ["in put é.provenance.json", "in put é.qml",
                                                      "in put é.stac.json", "in put é.tif", "in put é.zarr",
                                                      "reports"]
    [page] = (out / "reports").glob("segment-*.html")  # the run's report lists the failed inputs too
    assert all(path.name in page.read_text() for path in (*bad, missing) if "<" not in path.name)

    # all good: exit 0; info shows provenance; verify passes, then fails after tampering
    proc = run("segment", good, "--model", model2d.path, "--out", out, "--workers", "1", "--no-zarr")
    assert proc.returncode == 0, proc.stderr
    tif = out / "in put é.tif"
    info = json.loads(run("info", tif).stdout)
    assert info["segflow_provenance"]["model"]["weights_sha256"] == model2d.weights_sha256
    assert run("verify", tif).returncode == 0
    blob = bytearray(tif.read_bytes())
    blob[-1] ^= 0xFF
    tif.write_bytes(bytes(blob))
    proc = run("verify", tif)
    assert proc.returncode == 1 and "changed" in proc.stderr


def test_a_run_whose_every_input_failed_at_ingest_leaves_no_new_out_folder(model2d, tmp_path):
    """README: "a segment run whose every input failed leaves OUT as it was".  An input that passes the header
    check and fails at ingest (every pixel nodata) had left a new, empty OUT (docs probe, 2026-12-06); an OUT
    that existed stays."""
    from tests.corpus import all_nodata

    scene = all_nodata(tmp_path)
    proc = run("segment", scene, "--model", model2d.path, "--out", tmp_path / "new", "--bands", "1,2,3")
    assert proc.returncode == 1 and "has no valid pixel" in proc.stderr, proc.stderr
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    proc = run("segment", scene, "--model", model2d.path, "--out", tmp_path / "mine", "--bands", "1,2,3")
    assert proc.returncode == 1 and (tmp_path / "mine").is_dir() and not list((tmp_path / "mine").iterdir())


def test_info_on_a_raster_without_crs_prints_no_library_warning(tmp_path):
    """rasterio's NotGeoreferencedWarning (two lines of library text) stays out of `segflow info`'s output."""
    tif = tmp_path / "plain.tif"
    with rasterio.open(tif, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8") as dst:
        dst.write(np.ones((1, 8, 8), np.uint8))
    proc = run("info", tif)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["crs"] is None
    assert "Warning" not in proc.stderr, proc.stderr


def test_info_on_damaged_files_is_one_line_naming_the_file(tmp_path):
    """`segflow info` of a damaged file, header or pixels, says what is wrong in one line (each was a traceback)."""
    import nibabel as nib

    labels = np.zeros((600, 600), np.uint8)
    labels[100:500, 50:550] = 1
    cog = tmp_path / "labels.tif"
    with rasterio.open(cog, "w", driver="GTiff", width=600, height=600, count=1, dtype="uint8", tiled=True,
                       blockxsize=256, blockysize=256, compress="deflate", crs="EPSG:32633",
                       transform=from_origin(500000, 6000000, 10, 10)) as dst:
        dst.write(labels[None])
        dst.update_tags(CLASSES=json.dumps([{"value": 0, "name": "other"}, {"value": 1, "name": "field"}]))
    assert run("info", cog).returncode == 0
    with rasterio.open(cog) as src:  # where the tile of rows 256-511, columns 256-511 starts
        offset = int(src.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", bidx=1))
    blob = bytearray(cog.read_bytes())
    blob[offset:offset + 64] = b"\xff" * 64
    cut = tmp_path / "cut.tif"  # its header and class table intact, one tile's deflate stream damaged
    cut.write_bytes(bytes(blob))
    volume = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).integers(0, 3, (40, 40, 40)).astype(np.uint8), np.eye(4)),
             volume)
    damaged = {cut: "to count its labels", tmp_path / "text.tif": "not a GeoTIFF or VRT",
               tmp_path / "half.nii.gz": "cannot read the NIfTI header", tmp_path / "r.json": "is not readable JSON",
               tmp_path / "s.zarr": "not a readable zarr v3 group",
               tmp_path / "codec.zarr": "UnknownCodecError",  # an array's zarr.json: it was a traceback
               # cut short, its header whole: it had been shown as sound (exit 0); cut inside the header: shown with
               # no CRS and an identity transform, the GeoTIFF keys being past the cut
               tmp_path / "short.tif": "data is truncated", tmp_path / "headcut.tif": "data is truncated"}
    whole = tmp_path / "whole.tif"  # its directory first (a tag added later moves it to the end, as on cog)
    with rasterio.open(whole, "w", driver="GTiff", width=256, height=256, count=4, dtype="uint8", tiled=True,
                       blockxsize=64, blockysize=64, compress="deflate", crs="EPSG:32633",
                       transform=from_origin(500000, 6000000, 10, 10)) as dst:
        dst.write(np.random.default_rng(1).integers(0, 255, (4, 256, 256), dtype=np.uint8))
    assert run("info", whole).returncode == 0
    (tmp_path / "short.tif").write_bytes(whole.read_bytes()[:whole.stat().st_size // 3])
    (tmp_path / "headcut.tif").write_bytes(whole.read_bytes()[:400])  # opens, its CRS keys cut off
    (tmp_path / "text.tif").write_text("not an image")
    (tmp_path / "half.nii.gz").write_bytes(volume.read_bytes()[:100])
    (tmp_path / "r.json").write_text("{")
    (tmp_path / "s.zarr").mkdir()
    (tmp_path / "s.zarr" / "zarr.json").write_text("{")
    import zarr

    zarr.create_group(str(tmp_path / "codec.zarr")).create_array("labels", shape=(4, 4), dtype="uint8")
    meta = tmp_path / "codec.zarr" / "labels" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["codecs"].append({"name": "numcodecs.pickle", "configuration": {}})
    meta.write_text(json.dumps(doc))
    for path, problem in damaged.items():
        proc = run("info", path)
        assert proc.returncode == 2 and not proc.stdout, (path, proc.stdout)
        [line] = proc.stderr.splitlines()
        assert line.startswith(f"error: {path}: ") and problem in line, line


def test_out_over_a_file_is_one_line_before_any_work(model2d, tmp_path):
    """`--out` naming a file: ingest, nightly and train tracebacked (FileExistsError, NotADirectoryError), segment
    failed each input after starting its cluster; now each command says so in one line, exit 2, first."""
    scene = small_scene(tmp_path / "scene.tif")
    labels = tmp_path / "labels.tif"
    with rasterio.open(labels, "w", driver="GTiff", width=40, height=30, count=1, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 6000000, 10, 10)) as dst:
        dst.write(np.ones((1, 30, 40), np.uint8))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    truth = tmp_path / "truth.tif"  # a copy: a file is never its own truth (flows.pairing)
    truth.write_bytes(labels.read_bytes())
    commands = {"segment": ("segment", scene, "--model", model2d.path),
                "ingest": ("ingest", scene), "nightly": ("nightly", "--inbox", inbox, "--model", model2d.path),
                "train": ("train", "--card", model2d.path / "card.json", "--image", scene, "--labels", labels,
                          "--steps", "1"),
                "evaluate": ("evaluate", labels, "--truth", truth)}
    for name, args in commands.items():
        proc = run(*args, "--out", blocker)
        assert proc.returncode == 2, (name, proc.stderr)  # evaluate too, before scoring (it said so after, exit 1)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert lines and lines[-1].startswith(f"error: {blocker}: "), (name, proc.stderr)
        assert "Traceback" not in proc.stderr and "Dask" not in proc.stderr, (name, proc.stderr)
        assert blocker.read_text() == "a file, not a folder"
    for name in ("segment", "nightly"):  # an output URL no filesystem serves: it failed each input after its work
        proc = run(*commands[name], "--out", "bogus://bucket/out/")
        assert proc.returncode == 2, (name, proc.stderr)
        assert [line for line in proc.stderr.splitlines() if line.strip()] == [
            "error: bogus://bucket/out/: unknown URL scheme 'bogus' (segflow reads and writes through fsspec: s3://, "
            "http://, ...)"], (name, proc.stderr)


def test_a_url_where_a_command_writes_locally_is_refused(model2d, tmp_path):
    """ingest, evaluate, train, model convert, report and demo write local files: `--out s3://b/x` became a
    folder 's3:' in the working directory, and the command said it had written there."""
    scene = tmp_path / "scene.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=40, height=30, count=1, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 6000000, 10, 10)) as dst:
        dst.write(np.ones((1, 30, 40), np.uint8))
    report = tmp_path / "run.json"
    report.write_text("[]")
    commands = {"ingest": ["ingest", scene], "evaluate": ["evaluate", scene, "--truth", scene],
                "train": ["train", "--card", model2d.path / "card.json", "--image", scene, "--labels", scene],
                "convert": ["model", "convert", model2d.path / "weights.safetensors"],
                "report": ["report", report], "demo": ["demo"]}
    for name, args in commands.items():
        flag = "--workdir" if name == "demo" else "--out"
        proc = run(*args, flag, "s3://bucket/x", cwd=tmp_path)
        assert proc.returncode == 2, (name, proc.stderr)
        assert [line for line in proc.stderr.splitlines() if line.strip()] == [
            f"error: {flag} s3://bucket/x: this command writes to a local path; URLs are for segment, nightly and "
            "schedule"], (name, proc.stderr)
    assert not (tmp_path / "s3:").exists()


def test_options_that_read_as_nothing_and_a_missing_gpu_are_one_line(model2d, tmp_path):
    """`--tta x` read as no axes and ran without test-time augmentation, saying nothing; `--device cuda` without a
    GPU failed each input with torch's AssertionError after the cluster started."""
    import torch

    scene = small_scene(tmp_path / "scene.tif")
    cases = [(("--tta", "x"), "--tta: cannot read numbers from 'x'"),
             (("--roi", ","), "--roi: cannot read numbers from ','"),
             # named by its flag, not the field (it had said "invalid option output_grid")
             (("--output-grid", "foo"), "invalid --output-grid: Input should be 'input' or 'model'"),
             # the flag is --tta, the field flip_tta (it had said "invalid --flip-tta")
             (("--tta", "5"), "invalid --tta: the axes to mirror must be distinct spatial axes: 0, 1 or 2"),
             (("--roi", "-1"), "invalid --roi: roi must ")]  # pydantic's "Value error, " had led its words
    if not torch.cuda.is_available():
        cases.append((("--device", "cuda"), "device 'cuda' asked for, but "))
    for args, problem in cases:
        proc = run("segment", scene, "--model", model2d.path, "--out", tmp_path / "out", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        [line] = [line for line in proc.stderr.splitlines() if line.strip()]
        assert line.startswith(f"error: {problem}"), (args, proc.stderr)
        assert not (tmp_path / "out").exists()


def test_an_input_another_run_is_writing_is_not_touched(model2d, tmp_path):
    """Two `segflow segment` runs of one input into one folder at once both failed, each on the other's
    half-written files (a KeyError and a missing .partial chunk, seen by hand). Each input is now written under
    the per-input lock nightly takes: the second run says who holds it and leaves the files alone."""
    from flows import locks

    names = ("busy.tif", "free.tif")
    for name in names:
        with rasterio.open(tmp_path / name, "w", driver="GTiff", width=40, height=30, count=3, dtype="uint8",
                           crs="EPSG:32633", transform=from_origin(500000, 6000000, 10, 10)) as dst:
            dst.write(np.ones((3, 30, 40), np.uint8))
    out = tmp_path / "out"
    other_run = locks.InputLock(out / locks.LOCKS_DIR, "busy")
    assert other_run.acquire(input="busy.tif") is None
    try:
        proc = run("segment", *(tmp_path / n for n in names), "--model", model2d.path, "--out", out)
        assert proc.returncode == 1, proc.stderr
        [line] = error_lines(proc.stderr)
        assert line.startswith(f"error: {tmp_path / 'busy.tif'}: another run is writing its outputs into {out} "
                               f"(host {locks.HOST}, pid {os.getpid()}, "), line
        assert (out / "free.tif").is_file() and not list(out.glob("busy*"))
        assert other_run.still_held()  # not broken: its holder is alive and beating
    finally:
        other_run.release()
    proc = run("segment", tmp_path / "busy.tif", "--model", model2d.path, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert (out / "busy.tif").is_file() and not (out / locks.LOCKS_DIR).exists()


def test_a_segment_whose_lock_was_taken_over_while_it_stalled_writes_nothing(model2d, tmp_path, monkeypatch):
    """`nightly` checked its lock before the first output; `segment` did not.  A `segment` stalled past the stale
    timeout (a suspended laptop) whose lock another run broke and took went on to write its outputs over that
    run's.  Now it fails the input in one line, writes none, and leaves the other run's lock alone."""
    from flows import locks
    from flows.batch import segment_inputs
    from flows.config import SegmentOptions
    from storage import provenance

    scene, other_scene = small_scene(tmp_path / "s0.tif"), _rgb(tmp_path / "s1.tif", 1)
    out = tmp_path / "out"
    folder = out / locks.LOCKS_DIR
    other: list[locks.InputLock] = []
    real = provenance.make_record

    def stalled_then_taken_over(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - after inference, before output
        if not other:  # only the first input stalls
            (folder / locks.lock_name("s0")).unlink()  # what a breaker does to a lock whose heartbeat is too old
            taker = locks.InputLock(folder, "s0")
            assert taker.acquire(input=str(scene)) is None
            other.append(taker)
        return real(*args, **kwargs)

    monkeypatch.setattr(provenance, "make_record", stalled_then_taken_over)
    try:
        first, second = segment_inputs([str(scene), str(other_scene)], str(model2d.path), str(out),
                                       SegmentOptions())
        assert not first["ok"] and "another run took it over while this one had stalled" in first["error"], first
        assert first["error"].startswith(str(scene)) and "\n" not in first["error"]
        assert not list(out.glob("s0.*")) and not list(out.glob(".s0.*.previous"))  # no output of its own
        assert other[0].still_held()  # the other run's lock was left alone
        assert second["ok"] and (out / "s1.tif").is_file()  # the batch went on
    finally:
        for taker in other:
            taker.release()


@pytest.mark.parametrize("signum, code", [(2, 130), (15, 143)])
def test_ctrl_c_in_train_says_what_is_saved_and_how_to_go_on(model2d, tmp_path, signum, code):
    """Ctrl-C in `segflow train` exited 130 saying nothing; now one line names the step saved and --resume.
    SIGTERM (a scheduler stopping the job) killed it with nothing said (exit -15): now the same line, exit 143."""
    import signal
    import time

    from segmentation.checkpoint import saved_step

    scene, labels = tmp_path / "scene.tif", tmp_path / "labels.tif"
    rng = np.random.default_rng(0)
    for path, data in ((scene, rng.integers(0, 255, (3, 64, 64), dtype=np.uint8)),
                       (labels, rng.integers(0, 3, (1, 64, 64), dtype=np.uint8))):
        with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=data.shape[0], dtype="uint8",
                           crs="EPSG:32633", transform=from_origin(500000, 6000000, 10, 10)) as dst:
            dst.write(data)
    out = tmp_path / "model"
    state = out / "checkpoints" / "resume.safetensors"
    env = {**os.environ, "PREFECT_HOME": os.environ["PREFECT_HOME"], "COLUMNS": "200"}
    proc = subprocess.Popen([*SEGFLOW, "train", "--card", str(model2d.path / "card.json"), "--image", str(scene),
                             "--labels", str(labels), "--out", str(out), "--steps", "100000", "--val-every", "2",
                             "--batch-size", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not state.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    *notes, line = [line for line in stderr.splitlines() if line.strip() and not line.startswith("note: ")]
    assert [n.split(";")[0] for n in notes] == ["no validation: one image/label pair and no --holdout"], stderr
    step = saved_step(out / "checkpoints")
    assert step is not None and step % 2 == 0, stderr
    assert line.startswith(f"interrupted: training did not finish, so {out} holds no new model; its state at the "
                           f"last validation (step {step} of 100000) is saved there: add --resume"), line
    assert saved_step(tmp_path) is None
    if signum == 2:  # --resume says which step it goes on from (it had said nothing until its next validation)
        proc = subprocess.Popen([*SEGFLOW, "train", "--card", str(model2d.path / "card.json"), "--image", str(scene),
                                 "--labels", str(labels), "--out", str(out), "--steps", "100000", "--val-every", "2",
                                 "--batch-size", "1", "--resume"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
        said: list[str] = []
        while len(said) < 2:  # the no-validation line, then the resume line (before any step)
            line = proc.stderr.readline()
            if not line:
                break
            if not line.startswith("note: "):
                said.append(line)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
        assert said[1].strip() == f"resuming from step {step} of 100000, the state saved at its last validation", said
        # a resume the saved state does not belong to is refused, without first saying it resumes
        other = subprocess.run([*SEGFLOW, "train", "--card", str(model2d.path / "card.json"), "--image", str(scene),
                                "--labels", str(labels), "--out", str(out), "--steps", "99998", "--val-every", "2",
                                "--batch-size", "1", "--resume"], capture_output=True, text=True, env=env, timeout=120)
        assert other.returncode != 0 and "resuming" not in other.stderr, other.stderr
        assert "was saved by a different run (steps: 100000 then, 99998 now)" in other.stderr, other.stderr


def test_report_files_that_cannot_be_written_are_one_line(model2d, tmp_path):
    """`--report DIR` was a traceback after every input had been segmented; now it is refused first. A report
    folder that cannot be made (a file OUT/reports) leaves the outputs, says so in one line and exits 1."""
    scene = small_scene(tmp_path / "scene.tif")
    out = tmp_path / "out"
    for report in (tmp_path, out):  # an existing folder, and --out itself (made by the run)
        proc = run("segment", scene, "--model", model2d.path, "--out", out, "--report", report)
        assert refused(proc) == [
            f"error: {report}: is a folder; --report names the JSON file to write"]
        assert not out.exists()
    nested = tmp_path / "logs" / "today" / "run.json"  # its folders are made, as --out's are
    proc = run("segment", scene, "--model", model2d.path, "--out", out, "--report", nested)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(nested.read_text())[0]["ok"] is True
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "reports").write_text("a file where the run's report folder goes")
    proc = run("segment", scene, "--model", model2d.path, "--out", blocked)
    assert proc.returncode == 1, proc.stderr
    [line] = error_lines(proc.stderr)
    assert line == f"error: {blocked / 'reports'}: cannot create the output folder: a file of that name is in the way"
    assert (blocked / "scene.tif").is_file() and "Traceback" not in proc.stderr
    inbox = tmp_path / "inbox"  # nightly wrote every output, then tracebacked on its report: now it stops first
    inbox.mkdir()
    (inbox / "scene.tif").write_bytes(scene.read_bytes())
    (blocked / "scene.tif").unlink()
    proc = run("nightly", "--inbox", inbox, "--model", model2d.path, "--out", blocked)
    assert refused(proc) == [line], proc.stderr
    assert not (blocked / "scene.tif").exists()


def test_vector_output_with_a_3d_model_is_refused_before_any_work(tmp_path):
    """A 3D model segments volumes only, whose labels have no polygons: `--vector` was accepted and ignored."""
    model, volume = model_and_volume(tmp_path)
    proc = run("segment", volume, "--model", model.path, "--out", tmp_path / "out", "--vector", "gpkg")
    assert refused(proc) == [
        f"error: --vector gpkg writes the polygons of raster labels, and model '{model.card.name}' is 3D: it "
        "segments volumes only"]
    assert not (tmp_path / "out").exists()


def test_grid_options_for_the_other_kind_of_input_are_refused_before_any_work(tmp_path, model2d):
    """`--model-space keep` (volumes) with a 2D model and `--output-grid model` (rasters) with a 3D one were
    accepted and ignored: the labels came back on the input's grid only, with no word."""
    scene = small_scene(tmp_path / "scene.tif")
    proc = run("segment", scene, "--model", model2d.path, "--out", tmp_path / "out", "--model-space", "keep")
    assert refused(proc) == [
        "error: --model-space keep applies to 3D models' volumes (a 2D model segments a one-slice volume on its own "
        "grid); a raster's labels stay on the model's grid with --output-grid model"]
    model, volume = model_and_volume(tmp_path)
    proc = run("segment", volume, "--model", model.path, "--out", tmp_path / "out", "--output-grid", "model")
    assert refused(proc) == [
        f"error: --output-grid model applies to rasters, and model '{model.card.name}' is 3D; a volume's labels "
        "are also written on the model's grid with --model-space keep"]
    assert not (tmp_path / "out").exists()
    # a window or a flip axis the model's images do not have, and an empty --out: once, exit 2, before any work
    # (the first two had failed every input, each line blaming the input; the last wrote into the working folder)
    for options, line in ((["--roi", "64,64,64"], "error: --roi 64,64,64 has 3 axes, and the model's images have 2 "
                                                  "spatial axes"),
                          (["--tta", "2"], "error: --tta 2: the axes to mirror are spatial axes 0..1 of the "
                                           "model's 2-D images")):
        proc = run("segment", scene, "--model", model2d.path, "--out", tmp_path / "out", *options)
        assert refused(proc) == [line]
    proc = run("segment", scene, "--model", model2d.path, "--out", "", cwd=tmp_path)
    assert refused(proc)[0].startswith("error: --out is empty")
    # an option that would do nothing: --simplify had run, drawn nothing and recorded the tolerance
    proc = run("segment", scene, "--model", model2d.path, "--out", tmp_path / "out", "--simplify", "15")
    assert refused(proc) == ["error: --simplify applies to --vector polygons; add --vector gpkg, parquet or geojson"]
    (tmp_path / "a-file").write_text("")
    proc = run("segment", scene, "--model", model2d.path, "--out", tmp_path / "out", "--compile",
               env={"SEGFLOW_COMPILE_CACHE": str(tmp_path / "a-file" / "kernels")})
    assert refused(proc) == [f"error: --compile: cannot keep the compiled kernels in {tmp_path / 'a-file' / 'kernels'} "
                             "(Not a directory); set SEGFLOW_COMPILE_CACHE to a writable folder"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "reports").exists()


def test_volume_probabilities_with_no_zarr_are_refused_before_any_work(tmp_path):
    """A volume's probabilities live only in its zarr store: with --no-zarr they were silently dropped while the
    provenance recorded --probabilities float32.  Refused, naming the input, before any work."""
    import nibabel as nib

    model = tiny_model(tmp_path / "m3d", spatial_dims=3, channels=1)
    volume = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32), np.eye(4)),
             volume)
    proc = run("segment", volume, "--model", model.path, "--out", tmp_path / "out", "--probabilities", "float32",
               "--no-zarr")
    assert proc.returncode == 1, proc.stderr
    [line] = error_lines(proc.stderr)
    assert line.startswith(f"error: {volume}: a volume's probabilities are kept only in its zarr store"), line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("v.*"))


def test_vector_output_for_a_raster_without_crs_is_refused_before_any_work(model2d, tmp_path):
    """Polygon areas in hectares need a projected CRS: an input without one is refused at the header check, in
    one line naming it (it failed after segmenting, on "the CRS 'None' is not one GDAL understands")."""
    plain = tmp_path / "plain.tif"
    with rasterio.open(plain, "w", driver="GTiff", width=40, height=30, count=3, dtype="uint8") as dst:
        dst.write(np.ones((3, 30, 40), np.uint8))
    out = tmp_path / "out"
    proc = run("segment", plain, "--model", model2d.path, "--out", out, "--vector", "gpkg")
    assert proc.returncode == 1, proc.stderr
    [line] = error_lines(proc.stderr)
    assert line.startswith(f"error: {plain}: has no CRS") and "--vector gpkg" in line, line
    assert not out.exists() or not any(out.glob("plain*")), sorted(out.iterdir())
    # degrees have no hectares either: refused as early (it was refused after segmenting, naming the .gpkg)
    geo = tmp_path / "geo.tif"
    with rasterio.open(geo, "w", driver="GTiff", width=40, height=30, count=3, dtype="uint8", crs="EPSG:4326",
                       transform=rasterio.transform.from_origin(15.0, 52.0, 1e-4, 1e-4)) as dst:
        dst.write(np.ones((3, 30, 40), np.uint8))
    proc = run("segment", geo, "--model", model2d.path, "--out", out, "--vector", "gpkg")
    assert proc.returncode == 1, proc.stderr
    [line] = error_lines(proc.stderr)
    assert line.startswith(f"error: {geo}: has a geographic CRS (degrees); --vector gpkg") and \
        "--output-grid model" in line, line
    assert not out.exists() or not any(out.glob("geo*")), sorted(out.iterdir())


def test_bad_option_and_bad_model_are_one_line_errors(model2d, tmp_path):
    proc = run("segment", tmp_path / "x.tif", "--model", tmp_path / "nope", "--out", tmp_path / "o")
    assert proc.returncode == 2
    [line] = error_lines(proc.stderr)
    assert line == f"error: {tmp_path / 'nope'}: no such model directory or card file", line
    proc = run("segment", tmp_path / "x.tif", "--model", model2d.path, "--out", tmp_path / "o", "--overlap", "1.5")
    assert proc.returncode == 2 and "overlap" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_train_writes_a_model_directory_with_provenance(tmp_path):
    card = tmp_path / "card.json"
    from segmentation.demo_cards import landcover_card

    c = landcover_card().model_copy(deep=True)
    c.architecture.kwargs.update({"channels": [8, 16], "strides": [2]})
    card.write_text(c.model_dump_json())
    image, truth = make_scene(tmp_path / "scene.tif", size=(160, 160), seed=5)
    proc = run("train", "--card", card, "--image", image, "--labels", truth, "--out", tmp_path / "model",
               "--steps", "3", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    inspected = json.loads(run("model", "inspect", tmp_path / "model").stdout)
    assert inspected["training"]["steps"] == 3
    assert inspected["training"]["inputs"][0]["image"]["path"] == str(image.resolve())
    # when and with which code the weights were made (the record had named no version, commit, host or time)
    from storage.provenance import environment

    made = inspected["training"]["environment"]
    assert made["versions"]["segflow"] and made["git_commit"] == environment("cpu")["git_commit"]
    assert made["host"] and inspected["training"]["finished"].endswith("+00:00")
    from storage.hashing import sha256_file

    assert inspected["weights_sha256"] == sha256_file(tmp_path / "model" / "weights.safetensors")
    # image/label pairs against the card's model space too: a card without spacing records the scene's 10 m
    c.input.spacing = None
    card.write_text(c.model_dump_json())
    proc = run("train", "--card", card, "--image", image, "--labels", truth, "--out", tmp_path / "m0",
               "--steps", "3", "--batch-size", "2")
    assert proc.returncode == 0 and "records the training data's, 10 x 10 m" in " ".join(proc.stderr.split())
    assert json.loads(run("model", "inspect", tmp_path / "m0").stdout)["input"]["spacing"] == [10.0, 10.0]


def _rgb(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).integers(1, 255, (3, 40, 50), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=50, height=40, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 6000000, 10, 10), nodata=0) as dst:
        dst.write(data)
    return path


def test_inputs_that_would_write_the_same_outputs_are_refused_after_the_first(model2d, tmp_path):
    """site1/scan.tif and site2/scan.tif both make OUT/scan.tif: the second used to overwrite the first, both "ok"."""
    first, second = _rgb(tmp_path / "site1" / "scan.tif", 1), _rgb(tmp_path / "site2" / "scan.tif", 2)
    other = _rgb(tmp_path / "site2" / "other.tif", 3)
    out = tmp_path / "out"
    proc = run("segment", first, second, first, other, "--model", model2d.path, "--out", out, "--workers", "1",
               "--report", tmp_path / "report.json")
    assert proc.returncode == 1, proc.stderr
    assert error_lines(proc.stderr) == [
        f"error: {second}: its outputs would overwrite those of {first} (the same name stem 'scan'); rename one of "
        "them",
        f"error: {first}: given more than once; segmented once, under its first mention"]
    outcomes = json.loads((tmp_path / "report.json").read_text())
    assert [(o["input"], o["ok"]) for o in outcomes] == [(str(first), True), (str(second), False),
                                                         (str(first), False), (str(other), True)]
    provenance = json.loads((out / "scan.provenance.json").read_text())
    assert json.dumps(provenance).count(str(first)) and str(second) not in json.dumps(provenance)

    ingested = run("ingest", first, second, first, "--out", tmp_path / "stores")
    assert ingested.returncode == 1
    assert error_lines(ingested.stderr) == [error_lines(proc.stderr)[0],  # ingest ingests (it said "segmented")
                                            f"error: {first}: given more than once; ingested once, under its first "
                                            "mention"]
    assert sorted(p.name for p in (tmp_path / "stores").iterdir()) == ["scan.zarr"]
    info = json.loads(run("info", tmp_path / "stores" / "scan.zarr").stdout)
    assert str(first) in json.dumps(info) and str(second) not in json.dumps(info)
    store = run("segment", tmp_path / "stores" / "scan.zarr", "--model", model2d.path, "--out", tmp_path / "o2")
    assert store.returncode == 1 and error_lines(store.stderr) == [
        f"error: {tmp_path / 'stores' / 'scan.zarr'}: is a directory, expected a file: a zarr store; give the image it "
        "was ingested from (`segflow info` describes the store)"]


def test_an_input_in_the_output_folder_is_never_overwritten_by_its_own_outputs(model2d, tmp_path):
    """`segment data/a.tif --out data` wrote the label map over the image it came from, and said ok."""
    image = _rgb(tmp_path / "data" / "a.tif", 1)
    other = _rgb(tmp_path / "data" / "b.tiff", 2)  # -> data/b.tif: another name, segmented as usual
    before = image.read_bytes()
    proc = run("segment", image, other, "--model", model2d.path, "--out", tmp_path / "data", "--workers", "1")
    assert proc.returncode == 1, proc.stderr
    assert error_lines(proc.stderr) == [f"error: {image}: its output {tmp_path / 'data' / 'a.tif'} would overwrite it "
                                        "(--out is the folder the input is in, and the names coincide); choose "
                                        "another --out"]
    assert image.read_bytes() == before
    assert (tmp_path / "data" / "b.tif").is_file() and other.is_file()

    # a file the input reads: a VRT's source beside it, a STAC item's band file named like the item's id
    import rasterio.shutil

    scene = _rgb(tmp_path / "v" / "scene.tif", 3)
    rasterio.shutil.copy(scene, tmp_path / "v" / "scene.vrt", driver="VRT")
    before = scene.read_bytes()
    proc = run("segment", tmp_path / "v" / "scene.vrt", "--model", model2d.path, "--out", tmp_path / "v",
               "--workers", "1")
    assert proc.returncode == 1 and error_lines(proc.stderr) == [
        f"error: {scene}: its output {scene} would overwrite it, which scene.vrt reads (--out is the folder the input "
        "is in, and the names coincide); choose another --out"], proc.stderr
    assert scene.read_bytes() == before
    from flows.inputs import overwritten_input
    from tests import s2_samples

    item = s2_samples.write_item(tmp_path / "s2", size=32, item_id="B02")  # its outputs: s2/B02.tif ...
    read, why = overwritten_input(str(item), tmp_path / "s2")
    assert read == item.parent / "B02.tif" and "which item.json reads" in why


def test_a_later_run_of_another_input_of_the_same_name_keeps_the_earlier_outputs(model2d, tmp_path):
    """site1/scan.tif segmented into OUT, then site2/scan.tif (other pixels) into OUT: the second run replaced the
    first one's outputs without a word (within one batch that is refused).  The same file moved is the same input."""
    first, second = _rgb(tmp_path / "site1" / "scan.tif", 1), _rgb(tmp_path / "site2" / "scan.tif", 2)
    out = tmp_path / "out"
    proc = run("segment", first, "--model", model2d.path, "--out", out, "--no-prefect", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    before = (out / "scan.tif").read_bytes()
    proc = run("segment", second, "--model", model2d.path, "--out", out, "--no-prefect", "--workers", "1")
    assert proc.returncode == 1 and error_lines(proc.stderr) == [
        f"error: {second}: {out / 'scan'}.* are the outputs of another input, {first} (so says scan.provenance.json), "
        "which its outputs would replace: choose another --out, or delete those to replace them"], proc.stderr
    assert (out / "scan.tif").read_bytes() == before
    moved = tmp_path / "moved" / "scan.tif"
    moved.parent.mkdir()
    first.rename(moved)
    proc = run("segment", moved, "--model", model2d.path, "--out", out, "--no-prefect", "--workers", "1")
    assert proc.returncode == 0, proc.stderr


def test_ingest_command(tmp_path):
    src = shared("nifti/standard.nii.gz")
    proc = run("ingest", src, "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(run("info", tmp_path / "standard.zarr").stdout)
    assert info["arrays"]["image"]["shape"] == [1, 7, 5, 4]
    assert info["attributes"]["segflow"]["geometry"]["sform_code"] == 2


# --- a one-off `segment` without Prefect (issue 12): same outcomes as the Prefect flow run ------------------

def _segflow_lines(stderr: str) -> list[str]:
    """segflow's own stderr lines (`ok ...`, `error: ...`), without the `ok` lines' timing, which may differ."""
    return [line.rsplit("  (", 1)[0] if line.startswith("ok ") else line for line in stderr.splitlines()
            if line.startswith(("ok ", "error:"))]


def test_segment_without_a_prefect_api_runs_without_prefect_and_matches_the_flow_run(model2d, tmp_path):
    good = tmp_path / "good.tif"
    data = np.random.default_rng(1).integers(1, 255, (3, 70, 90), dtype=np.uint8)
    with rasterio.open(good, "w", driver="GTiff", width=90, height=70, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 6000000, 10, 10), nodata=0) as dst:
        dst.write(data)
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00" + b"\x00garbage" * 20)
    missing = tmp_path / "missing.tif"
    results = {}
    # --no-prefect with an API configured (an unreachable one): Prefect is not even asked
    ways = (("default", [], ""), ("prefect", ["--prefect"], ""), ("forced", ["--no-prefect"], "http://127.0.0.1:9/api"))
    for way, flag, api in ways:
        home = tmp_path / f"home-{way}"  # a fresh Prefect home shows whether Prefect's temporary server ran
        env = {"PREFECT_HOME": str(home), "PREFECT_API_URL": api}  # "": no Prefect API, whatever the caller's
        proc = run("segment", good, broken, missing, "--model", model2d.path, "--out", tmp_path / f"out-{way}",
                   "--workers", "1", "--report", tmp_path / f"{way}.json", *flag, env=env)
        with rasterio.open(tmp_path / f"out-{way}" / "good.tif") as src:
            labels = src.read()
        outcomes = json.loads((tmp_path / f"{way}.json").read_text())
        results[way] = dict(code=proc.returncode, stdout=proc.stdout, stderr=_segflow_lines(proc.stderr.replace(f"out-{way}", "OUT")),
                            files=sorted(p.name for p in (tmp_path / f"out-{way}").iterdir()), labels=labels,
                            outcomes=[(o["input"], o["ok"], o.get("error")) for o in outcomes],
                            # Prefect's server records its block registration there when it starts
                            prefect_server=(home / "memo_store.toml").exists(), raw=proc.stderr,
                            prefect_home=sorted(p.relative_to(home).as_posix() for p in home.rglob("*.db*"))
                            if home.exists() else [])
    default = results["default"]
    assert default["code"] == 1
    errors = error_lines("\n".join(default["stderr"]))
    assert len(errors) == 2 and str(broken) in errors[0] and str(missing) in errors[1], default["stderr"]
    assert default["outcomes"] == [(str(good), True, None), (str(broken), False, errors[0][len("error: "):]),
                                   (str(missing), False, errors[1][len("error: "):])]
    assert default["files"] == ["good.provenance.json", "good.qml", "good.stac.json", "good.tif", "good.zarr",
                                "reports"]
    assert not default["prefect_server"], "the default run without a Prefect API started Prefect's temporary server"
    for way, result in results.items():  # nothing but segflow's lines: no library log noise, no traceback
        # (with PREFECT_API_URL="" Prefect 3.9's events worker failed at every event and once hung the exit)
        noise = [line for line in result["raw"].splitlines()
                 if not line.startswith(("ok ", "error: ", "Dask scheduler ", "segment good: ", "report: "))]
        assert not noise, (way, result["raw"])
    assert results["prefect"]["prefect_server"], "--prefect did not run a Prefect flow run"
    assert not results["forced"]["prefect_server"]
    # the temporary server kept the run in a database of its own, gone with it: only the empty template is left
    assert results["prefect"]["prefect_home"] == [f"segflow-empty-prefect-{prefect_version('prefect')}.db"], \
        results["prefect"]["prefect_home"]
    assert results["default"]["prefect_home"] == [] and results["forced"]["prefect_home"] == []
    for way in ("prefect", "forced"):
        other = results[way]
        for key in ("code", "stdout", "stderr", "files", "outcomes"):
            assert other[key] == default[key], (way, key, other[key], default[key])
        np.testing.assert_array_equal(other["labels"], default["labels"])


def test_a_prefect_server_that_is_down_is_one_line_not_three_tracebacks(model2d, tmp_path):
    """PREFECT_API_URL names a server and nothing answers (a nightly cron while the server is down)."""
    good = _rgb(tmp_path / "good.tif", 1)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "good.tif").write_bytes(good.read_bytes())
    env = {"PREFECT_API_URL": "http://127.0.0.1:9/api"}  # the discard port: connection refused
    commands = {"segment": ["segment", good, "--model", model2d.path, "--out", tmp_path / "o1", "--prefect"],
                "nightly": ["nightly", "--inbox", inbox, "--model", model2d.path, "--out", tmp_path / "o2"],
                "schedule": ["schedule", "--inbox", inbox, "--model", model2d.path, "--out", tmp_path / "o3",
                             "--cron", "0 2 * * *"]}
    for name, args in commands.items():
        proc = run(*args, env=env)
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
        [line] = error_lines(proc.stderr)
        assert line.startswith("error: cannot reach the Prefect API at http://127.0.0.1:9/api"), (name, line)
        assert "prefect server start" in line, (name, line)
        assert "serving" not in proc.stdout + proc.stderr, (name, proc.stdout)  # schedule announced, then failed
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    proc = run(*commands["schedule"][:-1], "bogus", env=env)  # a bad --cron is said first, whatever the server
    assert proc.returncode == 2 and error_lines(proc.stderr) == [
        "error: invalid --cron 'bogus' (five fields: minute hour day month weekday, e.g. '0 2 * * *')"], proc.stderr


@pytest.mark.parametrize("case", ["nothing", "env", "env-empty", "dotenv", "prefect-toml", "pyproject",
                                  "profile", "profile-env", "profile-inactive"])
def test_prefect_api_detection_agrees_with_prefect(case, tmp_path, monkeypatch):
    """`segflow segment` picks its way from the same settings Prefect would read, without importing Prefect."""
    from prefect.settings.models.root import Settings

    from flows.runlog import prefect_api_configured

    url = "http://127.0.0.1:4999/api"
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(tmp_path)
    for name in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(home))
    profiles = f'active = "local"\n[profiles.local]\nPREFECT_API_URL = "{url}"\n[profiles.ephemeral]\n'
    if case == "env":
        monkeypatch.setenv("PREFECT_API_URL", url)
    elif case == "env-empty":  # set but empty in the environment: no API, even with a profile naming one
        monkeypatch.setenv("PREFECT_API_URL", "")
        (home / "profiles.toml").write_text(profiles)
    elif case == "dotenv":
        (tmp_path / ".env").write_text(f"PREFECT_API_URL={url}\n")
    elif case == "prefect-toml":
        (tmp_path / "prefect.toml").write_text(f'[api]\nurl = "{url}"\n')
    elif case == "pyproject":
        (tmp_path / "pyproject.toml").write_text(f'[tool.prefect.api]\nurl = "{url}"\n')
    elif case == "profile":
        (home / "profiles.toml").write_text(profiles)
    elif case == "profile-env":
        (home / "profiles.toml").write_text(profiles.replace('active = "local"', 'active = "ephemeral"'))
        monkeypatch.setenv("PREFECT_PROFILE", "local")
    elif case == "profile-inactive":
        (home / "profiles.toml").write_text(profiles.replace('active = "local"', 'active = "ephemeral"'))
    expected = case not in ("nothing", "env-empty", "profile-inactive")
    assert bool(Settings().api.url) is expected  # what Prefect itself reads
    assert prefect_api_configured() is expected



def _as_nobody() -> list[str]:
    """A command prefix that drops root to 'nobody' (file permissions then apply), or skip."""
    import shutil as _shutil

    if os.geteuid() != 0 or _shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run a command as another user")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_unreadable_model_files_outputs_and_out_folders_are_one_line_errors(tmp_path):
    """A model saved by segflow was private (0600: safetensors and mkstemp), so another user's `segment` got a
    PermissionError traceback; so did `verify` of an output it could not read.  A read-only --out, or one below
    a file, failed each input after the cluster started, naming a lock file."""
    import shutil
    import stat
    import tempfile

    prefix = _as_nobody()
    base = Path(tempfile.mkdtemp(prefix="segflow-nobody-", dir="/tmp"))  # pytest's own folders are private
    try:
        base.chmod(0o777)  # nobody writes its outputs here
        model = tiny_model(base / "m", spatial_dims=2, channels=3)
        for name in ("card.json", "weights.safetensors"):
            assert stat.S_IMODE((model.path / name).stat().st_mode) == 0o644, name
        scene = small_scene(base / "scene.tif")
        scene.chmod(0o644)
        env = {**os.environ, "HOME": str(base), "PREFECT_HOME": str(base / "prefect"), "COLUMNS": "200"}

        def nobody(*args: object) -> subprocess.CompletedProcess:
            return subprocess.run([*prefix, *SEGFLOW, *map(str, args)], capture_output=True, text=True, env=env,
                                  timeout=300)

        for name in ("card.json", "weights.safetensors"):
            (model.path / name).chmod(0o600)
            proc = nobody("segment", scene, "--model", model.path, "--out", base / "out", "--no-prefect")
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
            assert error_lines(proc.stderr) == [f"error: {model.path / name}: cannot read: Permission denied"]
            (model.path / name).chmod(0o644)
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        for out, line in ((locked, f"{locked}: cannot write in the output folder: permission denied"),
                          (locked / "sub", f"{locked / 'sub'}: cannot create the output folder in {locked}: "
                                           "permission denied"),
                          (scene / "sub", f"{scene / 'sub'}: cannot create the output folder: {scene} is a file")):
            proc = nobody("segment", scene, "--model", model.path, "--out", out, "--no-prefect")
            assert proc.returncode == 2 and error_lines(proc.stderr) == [f"error: {line}"], proc.stderr
            assert "Dask" not in proc.stderr  # refused before the cluster started
        # an inbox nobody may list: nightly gave two tracebacks, no report, exit 1; now the ConfigError of a
        # missing inbox (one line, exit 2: test_nightly's exit codes), said before the listing
        inbox = base / "inbox"
        inbox.mkdir(mode=0o700)
        code = ("from flows.inbox import list_inbox\nfrom storage.errors import ConfigError\ntry:\n"
                f"    list_inbox({str(inbox)!r})\nexcept ConfigError as exc:\n    print(exc)\n")
        proc = subprocess.run([*prefix, *SEGFLOW[:-2], "-c", code], capture_output=True, text=True, env=env,
                              timeout=120, cwd=Path(__file__).resolve().parents[1])
        assert proc.stdout.strip() == f"{inbox}: cannot list the inbox: Permission denied", proc.stderr
        out = base / "out"
        assert run("segment", scene, "--model", model.path, "--out", out, "--no-zarr").returncode == 0
        (out / "scene.tif").chmod(0o600)
        proc = nobody("verify", out / "scene.tif")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"output {out / 'scene.tif'} cannot be read: Permission denied" in proc.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_read_only_output_folder_is_said_to_be_one(model2d, tmp_path):
    """A read-only mount was refused as "permission denied", sending an operator to owners and modes."""
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(out)],
                                           check=False, capture_output=True).returncode != 0:
        pytest.skip("mounting a read-only tmpfs needs root and mount rights")
    try:
        proc = run("segment", small_scene(tmp_path / "scene.tif"), "--model", model2d.path, "--out", out)
        assert proc.returncode == 2 and error_lines(proc.stderr) == [
            f"error: {out}: cannot write in the output folder: read-only file system"], proc.stderr
    finally:
        subprocess.run(["umount", str(out)], check=True)


def test_an_input_name_too_long_for_its_outputs_is_refused_naming_it(model2d, tmp_path):
    """A 230-byte name (valid, under 255) started the cluster, then failed on a work file's path ('File name too
    long'), leaving an empty OUT; its outputs' temporary names would not have fitted either."""
    scene = small_scene(tmp_path / ("x" * 226 + ".tif"))
    proc = run("segment", scene, "--model", model2d.path, "--out", tmp_path / "out")
    assert proc.returncode == 1 and error_lines(proc.stderr) == [
        f"error: {scene}: its name is 226 bytes long, and the outputs and temporary files named after it need at "
        "most 199 (file names are limited to 255 bytes): give it a shorter name or a shorter link"], proc.stderr
    assert "Dask" not in proc.stderr and not (tmp_path / "out").exists()


def test_file_urls_are_local_paths(model2d, tmp_path):
    """docs/storage.md names file:// among the schemes that work; an output there failed to upload
    (FileNotFoundError) into a folder nothing had made.  A file:// URL is now the local path it names."""
    scene = small_scene(tmp_path / "a scene.tif")
    out = tmp_path / "out dir"
    proc = run("segment", scene.as_uri(), "--model", model2d.path, "--out", out.as_uri(), "--no-zarr")
    assert proc.returncode == 0, proc.stderr
    assert (out / "a scene.tif").is_file() and run("verify", out / "a scene.tif").returncode == 0


def test_a_model_whose_window_the_network_cannot_take_is_refused_before_any_input(model2d, tmp_path):
    """A card with roi [31, 32] (the U-Net needs multiples of its strides) loaded fine, and each input then failed
    with "INPUT: ... divisible by ...", blaming the input for the card's mistake; so did a bad --roi."""
    import json as _json

    card = _json.loads((model2d.path / "card.json").read_text())
    card["inference"]["roi"] = [31, 32]
    bad = tmp_path / "bad-roi"
    bad.mkdir()
    (bad / "card.json").write_text(_json.dumps(card))
    (bad / "weights.safetensors").write_bytes((model2d.path / "weights.safetensors").read_bytes())
    scene = small_scene(tmp_path / "scene.tif")
    proc = run("segment", scene, "--model", bad, "--out", tmp_path / "out", "--no-prefect")
    [line] = error_lines(proc.stderr)
    assert proc.returncode == 2 and line.startswith(f"error: {bad}: its card's inference.roi: "), proc.stderr
    assert "divisible by" in line
    proc = run("segment", scene, "--model", model2d.path, "--out", tmp_path / "out", "--roi", "31,32", "--no-prefect")
    [line] = error_lines(proc.stderr)
    assert proc.returncode == 2 and line.startswith(f"error: {model2d.path}: --roi: "), proc.stderr
    assert not (tmp_path / "out").exists()


def test_night_options_that_do_not_fit_every_model_are_refused_before_any_input(model2d, tmp_path):
    """A night with a 2D and a 3D model and `--roi 64,64` (or 4 `--bands` and a 1-channel volume model) segmented
    the rasters and failed every volume, every night, each line blaming the volume; `schedule` registered it."""
    model3d, volume = model_and_volume(tmp_path)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    small_scene(inbox / "scene.tif")
    volume.rename(inbox / volume.name)
    every = "; --roi and --bands apply to every model of a run: run this model in a run of its own"
    for extra, problem in ((["--roi", "64,64"], f"--roi 64,64 has 2 axes, model '{model3d.card.name}' is 3D"),
                           (["--bands", "1,2,3"], f"--bands 1,2,3 picks 3 band(s), model '{model3d.card.name}' "
                                                  "takes 1 channel(s)")):
        proc = run("nightly", "--inbox", inbox, "--model", model2d.path, "--model", model3d.path,
                   "--out", tmp_path / "out", *extra)
        assert refused(proc) == [f"error: {model3d.path}: {problem}{every}"], proc.stderr
        assert not (tmp_path / "out").exists()
        proc = run("schedule", "--cron", "0 2 * * *", "--inbox", inbox, "--model", model2d.path, "--model",
                   model3d.path, "--out", tmp_path / "out", *extra)
        assert refused(proc) == [f"error: {model3d.path}: {problem}{every}"], proc.stderr


def test_a_refused_input_gets_no_warning_that_reads_as_if_it_ran(tmp_path):
    """A raster without a CRS for a model that works in EPSG:32633: the run said "has no CRS; the output is written
    on the same pixel grid without a CRS" and then refused the input.  Warnings come once the run is under way."""
    model = tiny_model(tmp_path / "m", spatial_dims=2, channels=3, spacing=[10.0, 10.0], spacing_unit="m",
                       crs="EPSG:32633")
    plain = tmp_path / "plain.tif"
    with rasterio.open(plain, "w", driver="GTiff", width=40, height=30, count=3, dtype="uint8",
                       transform=from_origin(500000, 6000000, 5, 5)) as dst:
        dst.write(np.ones((3, 30, 40), np.uint8))
    proc = run("segment", plain, "--model", model.path, "--out", tmp_path / "out")
    assert proc.returncode == 1, proc.stderr
    [line] = error_lines(proc.stderr)
    assert "has no CRS, and the model works in EPSG:32633" in line, line
    assert "the output is written on the same pixel grid" not in proc.stderr


def test_a_one_slice_image_given_to_a_3d_model_is_said(tmp_path):
    """A 2-D NIfTI went through a 3-D model as one slice padded to the model's windows, without a word."""
    import nibabel as nib

    model = tiny_model(tmp_path / "m3d", spatial_dims=3, channels=1)
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((24, 20)).astype(np.float32), np.eye(4)), flat)
    proc = run("segment", flat, "--model", model.path, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "flat.nii.gz: is one slice thick (24 x 20 x 1 voxels), and model 'tiny-3d-1ch' is 3D (windows of " \
           "16 x 16 x 16)" in " ".join(proc.stderr.split())
    record = json.loads((tmp_path / "out" / "flat.provenance.json").read_text())
    assert any("is one slice thick" in w for w in record["statistics"]["warnings"])


def test_a_home_that_cannot_be_written_still_runs_nightly(model2d, tmp_path):
    """A service account's unwritable home: Prefect's temporary server could not make its database under
    ~/.prefect, and `nightly` printed 6,757 lines of tracebacks over two minutes, then failed."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    _rgb(inbox / "scene.tif", 4)
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "MPLCONFIGDIR", "XDG_CONFIG_HOME")}
    (tmp_path / "not-a-folder").write_text("")
    env.update(HOME="/proc", COLUMNS="200",  # a folder nobody can make ~/.prefect in, root included
               SEGFLOW_LOG_DIR=str(tmp_path / "not-a-folder"))  # no log: said once, not lost without a word
    proc = subprocess.run([*SEGFLOW, "nightly", "--inbox", str(inbox), "--model", str(model2d.path), "--out",
                           str(tmp_path / "out"), "--workers", "0"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "matplotlib" not in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "out" / "scene.tif").is_file()
    assert "not-a-folder: cannot keep this run's log there" in " ".join(proc.stderr.split())


def test_version_short_help_and_ingest_takes_its_options_as_segment_does(tmp_path):
    """A CLI probe: no way to ask the version; `-h` refused; `ingest --out ""` wrote into the working directory,
    `ingest --chunk 3` wrote 3 x 3 chunks where `segment --chunk-size 3` is refused, and an unreadable input
    failed the whole ingest batch at parse time (a usage box, the readable input never ingested)."""
    import shutil

    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"segflow {prefect_version('segflow')}", proc
    assert run("ingest", "-h").returncode == 0
    for args, line in ((["segment", "--bogus"], "error: No such option: --bogus (Possible options: --gpus, --out); "
                                                "see 'segflow segment -h'"),
                       (["nosuch"], "error: No such command 'nosuch'; see 'segflow -h'"),
                       (["model", "inspect"], "error: Missing argument 'path'; see 'segflow model inspect -h'"),
                       (["train", "--steps", "x"], "error: Invalid value for '--steps': Input should be a valid "
                                                   "integer, unable to parse string as an integer; see 'segflow "
                                                   "train -h'")):
        proc = run(*args)  # click's four lines (usage, hint, blank, error) put the error last
        assert proc.returncode == 2 and proc.stderr.strip() == line, proc.stderr
    for args, line in ((["--steps", "0"], "error: --steps must be a positive number, got 0"),  # was "steps and
                       (["--val-fraction", "1.5"], "error: --val-fraction must be in [0, 1), got 1.5")):  # batch_size"
        proc = run("train", "--card", "c.json", "--image", "a.tif", "--labels", "b.tif", "--out", "m", *args,
                   cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.strip() == line, proc.stderr
    scene = small_scene(tmp_path / "scene.tif")
    proc = run("ingest", scene, "--out", "", cwd=tmp_path)
    assert proc.returncode == 2 and error_lines(proc.stderr) == [proc.stderr.strip()], proc.stderr
    assert "--out is empty" in proc.stderr and not list(tmp_path.glob("*.zarr"))
    proc = run("ingest", scene, "--out", tmp_path / "st", "--chunk", "3")
    assert proc.returncode == 2 and "--chunk-size must be at least 8" in proc.stderr, proc.stderr
    proc = run("ingest", scene, "--out", tmp_path / "st", "--chunk-size", "16")
    assert proc.returncode == 0 and "ingested" in proc.stdout + proc.stderr, proc
    proc = run("ingest", scene, "--out", tmp_path / "st-quiet", "-q")  # as `segment -q`: errors only
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc
    assert (tmp_path / "st-quiet" / "scene.zarr").is_dir()
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("setpriv (util-linux) as root drops the read bypass this check needs")
    secret = small_scene(tmp_path / "secret.tif")
    secret.chmod(0)
    proc = subprocess.run([setpriv, "--bounding-set=-dac_override,-dac_read_search", "--", *SEGFLOW, "ingest",
                           str(secret), str(scene), "--out", str(tmp_path / "st2")], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert error_lines(proc.stderr) == [f"error: {secret}: cannot read file: Permission denied"], proc.stderr
    assert (tmp_path / "st2" / "scene.zarr").is_dir()
