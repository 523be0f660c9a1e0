"""What a person reads from segflow (issue 14): one-line errors, early header checks, numbers as people write them.

Each test here failed before the issue's fix.  The subprocess tests run the
real ``segflow`` command as a user would, with stderr not a terminal (as in a
log or CI): one line per error and no Prefect traceback; a wrong band count
refused before any cluster or Prefect starts; no Dask port warning; plain
progress lines; ``--quiet``.  The rest check the pieces on tiny generated files:
the number format, the truncated-GeoTIFF probe, the header fit, the progress
reporters, the console filter, ``segflow info``'s class table and ``segflow
model inspect`` on weights ``segment`` refuses.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from typer.testing import CliRunner

from tests.conftest import SHARED_DATA
from tests.models import tiny_model

SEGFLOW = [sys.executable, "-m", "flows"]
SHARED_BAD = ["RGB.byte.truncated.tif", "corrupt.tif", "empty.tif"]


# ----------------------------------------------------------------------------- fixtures (generated, tiny)


def raster(path: Path, bands: int = 3, size: tuple[int, int] = (70, 90), names: list[str] | None = None,
           pixel: float = 10.0, tiled: bool = False) -> Path:
    """A uint8 GeoTIFF of ``bands`` image bands (no alpha) on a UTM grid, with optional band descriptions."""
    data = np.random.default_rng(bands).integers(1, 255, (bands, *size), dtype=np.uint8)
    extra = {"tiled": True, "blockxsize": 32, "blockysize": 32} if tiled else {}
    with rasterio.open(path, "w", driver="GTiff", width=size[1], height=size[0], count=bands, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 6000000, pixel, pixel), nodata=0,
                       photometric="minisblack", **extra) as dst:
        dst.write(data)
        for i, name in enumerate(names or [], 1):
            dst.set_band_description(i, name)
    return path


def truncated(path: Path) -> Path:
    """A GeoTIFF whose header and directory are whole but whose image data is cut off (an interrupted copy)."""
    full = raster(path.with_name("full-" + path.name), tiled=True)
    blob = full.read_bytes()
    path.write_bytes(blob[: len(blob) * 2 // 3])
    full.unlink()
    return path


def truncated_weights(model_dir: Path, target: Path) -> Path:
    """A copy of a model directory whose weights file is cut in half (its card without the weights' hash)."""
    shutil.copytree(model_dir, target)
    weights = target / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    card = json.loads((target / "card.json").read_text())
    card.pop("weights_sha256", None)
    (target / "card.json").write_text(json.dumps(card))
    return target


def pickle_only(model_dir: Path, target: Path) -> Path:
    """A model directory holding its card and a torch.save pickle checkpoint (``model.pt``) instead of safetensors."""
    import torch
    from safetensors.torch import load_file

    target.mkdir()
    shutil.copy(model_dir / "card.json", target / "card.json")
    torch.save(load_file(str(model_dir / "weights.safetensors")), target / "model.pt")
    return target


def run(*args: object, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([*SEGFLOW, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


def lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("read-models")
    return {"3ch": tiny_model(root / "m3", spatial_dims=2, channels=3, roi=[32, 32]),
            "4ch": tiny_model(root / "m4", spatial_dims=2, channels=4, roi=[32, 32])}


# ----------------------------------------------------------------------------- 6. numbers as people write them


@pytest.mark.parametrize("value, text", [
    (0, "0"), (0.004, "0.004"), (0.52, "0.52"), (12.4, "12.4"), (999.96, "1,000"), (85_860, "85,860"),
    (85_859.7, "85,860"), (1.2e9, "1,200,000,000"), (1_234.5, "1,234.5"), (1.2345, "1.23"), (-3.25, "-3.25"),
    (None, "–"), (float("nan"), "–"),
])
def test_readable_numbers(value, text):
    from storage.numbers import readable

    assert readable(value) == text
    if value is not None:
        assert readable(value, "ha") == (f"{text} ha" if text != "–" else "–")


def test_areas_and_volumes_print_readably_in_the_table_and_the_markdown_report():
    from flows.nightly_cli import summary_table
    from flows.report import class_line, render_markdown
    from rich.console import Console

    rep = {"input": "/in/scene.tif", "status": "done", "model": "m", "seconds": 1.0, "attempts": 1,
           "windows": {"evaluated": 3, "skipped": 0}, "measure": "area_ha", "cell_size": 0.01,
           "labels": [{"value": 0, "name": "water", "count": 8_586_000, "area_ha": 85_860.0},
                      {"value": 1, "name": "field", "count": 52, "area_ha": 0.52}], "outputs": []}
    report = {"run": {"summary": "1 input: 1 done, 0 skipped", "started": "t", "state": "Completed",
                      "seconds": 1.0, "out_dir": "/out", "models": []}, "inputs": [rep]}
    console = Console(width=200, record=True)
    console.print(summary_table(report))
    table = console.export_text()
    assert "water 85,860 ha" in table and "field 0.52 ha" in table and "e+" not in table
    md = render_markdown(report)
    assert "water 85,860 ha, field 0.52 ha" in md and "e+" not in md
    line = class_line("lesion", {"voxels": 12_345, "volume_ml": 1_234.5}, None)
    assert line.startswith("lesion: 12,345 voxels, 1,234.5 mL")
    # a skipped volume's statistics come from its sidecar, keys sorted by name: listed by class value all the same
    volume = {**rep, "input": "/in/head.nii.gz", "label_statistics": {"unit": "HU", "classes": {
        "background": {"value": 0, "voxels": 9}, "lesion": {"value": 2, "voxels": 1},
        "tissue": {"value": 1, "voxels": 5}}}}
    md = render_markdown({**report, "inputs": [volume]})
    stats = [ln.split(":")[0].strip("- ") for ln in md.splitlines() if "voxels" in ln and ln.startswith("  - ")]
    assert stats == ["background", "tissue", "lesion"], md
    # names and error lines are text in Markdown, never markup (only "|" was escaped)
    evil = {**rep, "model": "evil<b>model|x", "labels": [{"value": 0, "name": "<script>x</script>", "count": 1,
                                                          "area_ha": 0.01}]}
    bad = {"input": "/in/broken <i>x|y.tif", "status": "failed", "error": "/in/broken <i>x|y.tif: *not* a TIFF",
           "attempts": 1, "labels": [], "outputs": []}
    md = render_markdown({**report, "inputs": [evil, bad]})
    assert "evil\\<b\\>model\\|x" in md and "\\<script\\>x\\</script\\>" in md
    assert "- **failed**: /in/broken \\<i\\>x\\|y.tif: \\*not\\* a TIFF" in md
    assert "<b>" not in md and "<script>" not in md and "<i>" not in md.replace("`broken <i>x\\|y.tif`", "")


# ----------------------------------------------------------------------------- 3. a file that cannot be read


def test_probe_refuses_a_truncated_geotiff_from_its_header(tmp_path):
    from storage.errors import CorruptInputError
    from storage.probe import probe

    good = probe(raster(tmp_path / "good.tif", tiled=True))
    assert good.channels == 3
    with pytest.raises(CorruptInputError, match="data is truncated: its image blocks end at byte") as err:
        probe(truncated(tmp_path / "cut.tif"))
    assert str(err.value).startswith(f"{tmp_path / 'cut.tif'}: ") and "\n" not in str(err.value)
    if (SHARED_DATA / "bad").is_dir():  # real broken files: unreadable whatever the model
        for name in SHARED_BAD:
            with pytest.raises(CorruptInputError):
                probe(SHARED_DATA / "bad" / name)


# ----------------------------------------------------------------------------- 4. the header fit


FEWER = ": give one raster, VRT or STAC item that holds them all (bands in separate files: docs/satellite.md)"


def test_fit_problem_checks_dimensions_band_count_and_band_names(tmp_path):
    from flows.routing import ModelInput, fit_problem
    from storage.probe import probe

    rgb = probe(raster(tmp_path / "rgb.tif", bands=3))
    model = ModelInput("m4", 2, 4)
    # fewer bands than the model takes: where the others may be is said (it had been only the counts)
    assert fit_problem(rgb, model) == f"model 'm4' takes 4 channels, the input has 3{FEWER}"
    assert fit_problem(rgb, ModelInput("m4", 2, 4, ("blue", "green", "red", "nir"))) == \
        f"model 'm4' takes 4 channels (blue, green, red, nir), the input has 3{FEWER}"
    assert fit_problem(rgb, ModelInput("m3", 2, 3)) is None
    # more bands than the model takes, none named: the way to choose them is said (a 13-band S2 file without
    # descriptions got only "takes 4 channels, the input has 13")
    assert fit_problem(rgb, ModelInput("m2", 2, 2, ("red", "nir"))) == \
        "model 'm2' takes 2 channels (red, nir), the input has 3: choose them with --bands, the file's band numbers " \
        "(1 for its first) in the model's order"
    # 13 unnamed bands: the Sentinel-2 order's numbers (it had offered "e.g. --bands 1,2,3,4": coastal as blue)
    s13 = probe(raster(tmp_path / "s13.tif", bands=13))
    assert fit_problem(s13, ModelInput("lc", 2, 4, ("blue", "green", "red", "nir"))).endswith(
        "in the model's order; a Sentinel-2 file of its 13 bands in their usual order (B01, B02, B03, B04, B05, "
        "B06, B07, B08, B8A, B09, B10, B11, B12) takes --bands 2,3,4,8")
    # --bands choosing too few says so, rather than that the 3-band input has 2
    assert fit_problem(rgb, ModelInput("m3", 2, 3), ["1", "2"]) == \
        "model 'm3' takes 3 channels, --bands chose 2 (the input has 3)"
    assert fit_problem(rgb, ModelInput("v", 3, 3)) == "model 'v' is 3D, the input is 2D"
    # a card naming its bands finds them among the file's by name (13 bands in, 4 out), or says which is missing
    s2 = probe(raster(tmp_path / "s2.tif", bands=5, names=["B01", "B02", "B03", "B04", "B08"]))
    named = ModelInput("s2", 2, 4, ("blue", "green", "red", "nir"))
    assert fit_problem(s2, named) is None
    problem = fit_problem(s2, ModelInput("s2", 2, 4, ("blue", "green", "red", "swir16")))
    assert problem.startswith("model 's2' needs swir16, which the input does not offer") and "5:B08" in problem
    assert fit_problem(s2, model, bands=["1", "2", "3", "5"]) is None  # --bands wins
    # nnU-Net's one file per channel: what to do with them is said (it had been "takes 2 channels, the input has 1")
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)), tmp_path / "liver_007_0000.nii.gz")
    assert fit_problem(probe(tmp_path / "liver_007_0000.nii.gz"), ModelInput("mr", 3, 2)) == \
        ("model 'mr' takes 2 channels, the input has 1: give all of the case's nnU-Net channel files together "
         "(liver_007_0000 ... liver_007_0001), which are then one input, or one 4-D NIfTI with the channels on its "
         "4th axis")


def test_check_inputs_keeps_the_order_and_reads_the_card_without_torch(tmp_path, models):
    code = f"""
import json, sys
from flows.batch import check_inputs
from flows.config import SegmentOptions
from flows.routing import model_input
checked = check_inputs({[str(raster(tmp_path / 'a.tif', bands=4)), str(raster(tmp_path / 'b.tif', bands=3)),
                         str(tmp_path / 'missing.tif'), str(truncated(tmp_path / 'cut.tif'))]!r},
                       model_input({str(models['4ch'].path)!r}), SegmentOptions())
print(json.dumps({{"entries": [(label, item is not None, error) for label, item, error in checked.entries],
                  "torch": "torch" in sys.modules}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert not result["torch"], "the header check imported torch (2 s the cluster's start should overlap)"
    got = [(Path(label).name, ok, error) for label, ok, error in result["entries"]]
    assert [g[:2] for g in got] == [("a.tif", True), ("b.tif", False), ("missing.tif", False), ("cut.tif", False)]
    assert got[1][2] == f"{tmp_path / 'b.tif'}: model 'tiny-2d-4ch' takes 4 channels, the input has 3{FEWER}"
    assert got[2][2] == f"{tmp_path / 'missing.tif'}: no such file"
    assert "data is truncated" in got[3][2]


def test_a_wrong_band_count_is_refused_before_a_cluster_or_prefect_starts(models, tmp_path):
    """Before: the cluster (here an unreachable --dask-address) and Prefect were started first (9 s and 17 s)."""
    rgb = raster(tmp_path / "rgb.tif", bands=3)
    for way, flags in (("plain", ["--no-prefect"]), ("prefect", ["--prefect"])):
        home = tmp_path / f"prefect-{way}"
        t0 = time.perf_counter()
        proc = run("segment", rgb, "--model", models["4ch"].path, "--out", tmp_path / f"out-{way}",
                   "--dask-address", "tcp://127.0.0.1:9", *flags, env={"PREFECT_HOME": str(home)})
        seconds = time.perf_counter() - t0
        print(f"{way}: a wrong band count refused in {seconds:.1f} s")
        assert proc.returncode == 1, proc.stderr
        assert lines(proc.stderr, "error:") == [f"error: {rgb}: model 'tiny-2d-4ch' takes 4 channels, the input has 3{FEWER}"]
        assert "Dask" not in proc.stderr and "Traceback" not in proc.stderr
        assert not (home / "prefect.db").exists(), "Prefect's temporary server started"
        assert not (tmp_path / f"out-{way}").exists()


# ----------------------------------------------------------------------------- 1, 3, 8. nightly as a user reads it


def test_nightly_reports_unreadable_files_as_failed_in_one_line_each_without_tracebacks(models, tmp_path):
    inbox, logs = tmp_path / "inbox", tmp_path / "logs"
    inbox.mkdir()
    truncated(inbox / "cut.tif")
    raster(inbox / "rgb.tif", bands=3)  # readable; no model fits it
    shared = [SHARED_DATA / "bad" / n for n in SHARED_BAD if (SHARED_DATA / "bad" / n).is_file()]
    for path in shared:
        shutil.copy(path, inbox / path.name)
    out = tmp_path / "out"
    proc = run("nightly", "--inbox", inbox, "--model", models["4ch"].path, "--out", out, "--quiet",
               env={"SEGFLOW_LOG_DIR": str(logs)})
    assert proc.returncode == 1, proc.stderr
    [report_path] = (out / "reports").glob("*.json")
    status = {Path(r["input"]).name: (r["status"], r["error"]) for r in json.loads(report_path.read_text())["inputs"]}
    assert status["rgb.tif"][0] == "no-model"
    for name in ["cut.tif"] + [p.name for p in shared]:  # whatever the model: a file that cannot be read failed
        assert status[name][0] == "failed", (name, status[name])
    assert "data is truncated" in status["cut.tif"][1]
    # the console: one line per failure, no Prefect traceback or state line; --quiet: no table, progress or paths
    assert "Traceback" not in proc.stderr and "Encountered exception" not in proc.stderr, proc.stderr
    assert "Finished in state" not in proc.stderr, proc.stderr
    failed = lines(proc.stderr, "failed:")
    assert len(failed) == len(shared) + 1 and len(lines(proc.stderr, "no-model:")) == 1, proc.stderr
    assert proc.stdout == "" and "Dask" not in proc.stderr and "nightly inputs" not in proc.stderr
    # ... and Prefect's records of those failures are in the log file
    [log] = logs.glob("nightly-*.log")
    assert "cut.tif: data is truncated" in log.read_text()


def test_an_error_raised_inside_the_nightly_flow_is_one_line_and_its_traceback_goes_to_the_log(models, tmp_path):
    logs = tmp_path / "logs"
    inbox = tmp_path / "inbox"  # an OUT that is the inbox is refused inside the flow (a missing inbox is now
    inbox.mkdir()  # refused before Prefect starts, so it no longer reaches the flow)
    proc = run("nightly", "--inbox", inbox, "--model", models["3ch"].path, "--out", inbox,
               env={"SEGFLOW_LOG_DIR": str(logs)})
    assert proc.returncode == 2
    [error] = lines(proc.stderr, "error:")
    assert error.startswith(f"error: {inbox}: ") and "is the inbox" in error, proc.stderr
    assert "Traceback" not in proc.stderr and "Encountered exception" not in proc.stderr, proc.stderr
    [log] = logs.glob("nightly-*.log")
    text = log.read_text()
    assert "Encountered exception during execution" in text and "Traceback" in text


def test_bad_weights_are_one_line_with_prefect(models, tmp_path):
    broken = truncated_weights(models["3ch"].path, tmp_path / "cut-weights")
    proc = run("segment", raster(tmp_path / "rgb.tif"), "--model", broken, "--out", tmp_path / "out", "--prefect",
               env={"SEGFLOW_LOG_DIR": str(tmp_path / "logs")})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "Encountered exception" not in proc.stderr, proc.stderr
    [error] = lines(proc.stderr, "error:")
    assert str(broken / "weights.safetensors") in error and "not a readable safetensors file" in error
    assert not (tmp_path / "out").exists()


def test_a_refused_model_is_the_only_line_though_the_cluster_started_beside_its_load(models, tmp_path):
    """Without Prefect the cluster starts in a thread while the model loads; its scheduler line came first."""
    broken = truncated_weights(models["3ch"].path, tmp_path / "cut-weights")
    proc = run("segment", raster(tmp_path / "rgb.tif"), "--model", broken, "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [next(iter(lines(proc.stderr, "error:")))], proc.stderr
    assert "not a readable safetensors file" in proc.stderr and not (tmp_path / "out").exists()


def test_segment_truth_that_cannot_be_scored_fails_the_command(models, tmp_path):
    """`segment --truth DIR` with no truth named like the input printed "error: scoring against ..." and exit 0."""
    (tmp_path / "truth").mkdir()
    proc = run("segment", raster(tmp_path / "rgb.tif"), "--model", models["3ch"].path, "--out", tmp_path / "out",
               "--truth", tmp_path / "truth", "-q")
    assert proc.returncode == 1, proc.stderr
    [error] = lines(proc.stderr, "error:")
    assert error.startswith(f"error: scoring against {tmp_path / 'truth'}: ") and "no truth named rgb" in error, error
    assert (tmp_path / "out" / "rgb.tif").is_file()  # the segmentation itself stands


def test_an_input_refused_at_ingest_is_named_as_given(models, tmp_path):
    """Complex pixels (found when the ingest opens the bands) printed the resolved absolute path, where every
    other line of the batch said the file as given."""
    data = (np.ones((3, 16, 16)) + 1j).astype("complex64")
    with rasterio.open(tmp_path / "cplx.tif", "w", driver="GTiff", width=16, height=16, count=3, dtype="complex64",
                       crs="EPSG:32633", transform=from_origin(5e5, 4e6, 10, 10)) as dst:
        dst.write(data)
    proc = subprocess.run([*SEGFLOW, "segment", "cplx.tif", "--model", str(models["3ch"].path), "--out", "out", "-q"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 1
    assert lines(proc.stderr, "error:") == ["error: cplx.tif: complex pixels (complex64) cannot be segmented"]


# ----------------------------------------------------------------------------- 5, 7, 8. segment and info


def test_segment_with_8787_taken_no_port_warning_dashboard_line_progress_lines_and_quiet(models, tmp_path):
    import socket
    import warnings

    from distributed import LocalCluster

    scene = raster(tmp_path / "scene.tif", size=(96, 120))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # when another process holds 8787 already, this cluster moves (and warns)
        other = LocalCluster(n_workers=0, processes=False, dashboard_address=":8787", scheduler_port=0)
    with other, socket.socket() as probe:
        with pytest.raises(OSError):  # 8787 is in use while segflow starts its own cluster
            probe.bind(("0.0.0.0", 8787))
        proc = run("segment", scene, "--model", models["3ch"].path, "--out", tmp_path / "out", "--no-prefect")
        quiet = run("segment", scene, "--model", models["3ch"].path, "--out", tmp_path / "out-quiet", "--no-prefect",
                    "--quiet")
    for p in (proc, quiet):
        assert p.returncode == 0, p.stderr
        assert "already in use" not in p.stdout + p.stderr and "UserWarning" not in p.stderr, p.stderr
    # the cluster's line, once, as a plain line; plain progress (stderr is no terminal); the ok line
    [dask] = lines(proc.stderr, "Dask scheduler ")  # segment's default: the work runs in this process's threads
    assert "Dask scheduler in this process (local cluster, 1 worker)" in dask and "dashboard" in dask
    assert lines(proc.stderr, "segment scene: ") and lines(proc.stderr, "ok ")
    # progress counts the model's windows (what a user compares with the model's speed), all of them at the end
    import json
    import re

    windows = json.loads((tmp_path / "out" / "scene.provenance.json").read_text())["statistics"]["windows_total"]
    last = lines(proc.stderr, "segment scene: ")[-1]
    assert re.match(rf"segment scene: {windows} windows in \d", last), (last, windows)  # a short run: no rate
    assert quiet.stdout == "" and quiet.stderr == "", quiet.stderr
    assert (tmp_path / "out-quiet" / "scene.tif").is_file()

    # 7. info on the label output: its classes with pixels and hectares, the run's counts or counted from the file
    from flows.cli import app

    label = tmp_path / "out" / "scene.tif"
    copy = tmp_path / "elsewhere" / "scene.tif"  # no sidecar beside it: counted from the file
    copy.parent.mkdir()
    shutil.copy(label, copy)
    with rasterio.open(label) as src:
        values, counts = np.unique(src.read(1), return_counts=True)
    expected = {int(v): int(n) for v, n in zip(values, counts) if v != 255}
    for path, source in ((label, "scene.provenance.json"), (copy, "counted chunk by chunk")):
        res = CliRunner().invoke(app, ["info", str(path)], env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        table = json.loads(res.stdout)["label_table"]
        assert table["unit"] == "ha" and source in table["source"]
        assert {r["value"]: r["count"] for r in table["rows"] if r["count"]} == expected
        assert all(r["area_ha"] == pytest.approx(r["count"] * 0.01) for r in table["rows"])
        assert "area (ha)" in res.stderr and f"{max(expected.values()):,}" in res.stderr
    # the label map edited since the run: its own counts, not the run's (they were shown, stale)
    with rasterio.open(label, "r+", IGNORE_COG_LAYOUT_BREAK="YES") as dst:
        edited = dst.read(1)
        edited[:8] = 1
        dst.write(edited, 1)
    res = CliRunner().invoke(app, ["info", str(label)], env={"COLUMNS": "200"})
    table = json.loads(res.stdout)["label_table"]
    values, counts = np.unique(edited, return_counts=True)
    assert "counted chunk by chunk" in table["source"]
    assert {r["value"]: r["count"] for r in table["rows"] if r["count"]} == \
        {int(v): int(n) for v, n in zip(values, counts) if v != 255}


def test_info_counts_a_nifti_label_map_in_millilitres(tmp_path):
    from flows.cli import app
    from storage.classes import LabelClass, slicer_color_table

    labels = np.zeros((30, 20, 12), np.uint8)
    labels[2:12, 2:12, 2:7] = 1  # 500 voxels of 2 x 2 x 2.5 mm = 5 mL
    labels[20:30, 5:15, 0:12] = 2  # 1200 voxels = 12 mL
    img = nib.Nifti1Image(labels, np.diag([2.0, 2.0, 2.5, 1.0]))
    img.header.set_xyzt_units("mm")
    classes = [LabelClass(value=v, name=n, color=[v * 60, 90, 200]) for v, n in enumerate(["background", "lesion",
                                                                                         "liver"])]
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, slicer_color_table(classes).encode()))
    nib.save(img, tmp_path / "case.nii.gz")
    res = CliRunner().invoke(app, ["info", str(tmp_path / "case.nii.gz")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.stdout)["label_table"]["rows"]}
    assert rows["lesion"]["count"] == 500 and rows["lesion"]["volume_ml"] == pytest.approx(5.0)
    assert rows["liver"]["count"] == 1200 and rows["liver"]["volume_ml"] == pytest.approx(12.0)
    assert "volume (mL)" in res.stderr and "1,200" in res.stderr


def test_class_names_with_spaces_and_underscores_read_back_as_the_card_has_them(tmp_path):
    """The NIfTI label table's name column is one word (Slicer's format): 'white matter' was read back as
    'white_matter' by `info` and `evaluate`, and the volume quicklook turned 'left_lung' into 'left lung'."""
    from contextlib import ExitStack

    from flows.cli import app
    from storage.classes import LabelClass
    from storage.labelmaps import open_labels
    from storage.nifti import ingest_nifti, write_label_nifti

    names = ["background", "white matter", "left_lung", "a  b"]
    classes = [LabelClass(value=v, name=n, color=(v * 60, 90, 200)) for v, n in enumerate(names)]
    labels = np.zeros((12, 10, 8), np.uint8)
    for v in range(1, 4):
        labels[v * 3:v * 3 + 2] = v
    img = nib.Nifti1Image(labels, np.diag([2.0, 2.0, 2.5, 1.0]))
    img.header.set_xyzt_units("mm")
    nib.save(img, tmp_path / "in.nii")
    store = ingest_nifti(tmp_path / "in.nii", tmp_path / "in.zarr", chunk=16)
    stored = np.asarray(store.image[0])  # the store's own axis order
    out = write_label_nifti((stored % 4).astype(np.uint8), store.meta.geometry, tmp_path / "case.nii.gz",
                            classes=classes)
    res = CliRunner().invoke(app, ["info", str(out)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert [r["name"] for r in json.loads(res.stdout)["label_table"]["rows"]] == names
    with ExitStack() as stack:
        assert open_labels(out, stack).classes == dict(enumerate(names))
    from storage.quicklook_volume import _file_classes

    assert [c.name for c in _file_classes(nib.load(out))] == names


# ----------------------------------------------------------------------------- 2. model inspect


def test_model_inspect_refuses_what_segment_refuses(models, tmp_path):
    from flows.cli import app

    runner = CliRunner()
    good = runner.invoke(app, ["model", "inspect", str(models["3ch"].path)])
    assert good.exit_code == 0 and json.loads(good.stdout)["name"] == "tiny-2d-3ch"
    pickled = pickle_only(models["3ch"].path, tmp_path / "pickled")
    res = runner.invoke(app, ["model", "inspect", str(pickled)])
    assert res.exit_code == 1 and res.stdout == ""
    [error] = lines(res.stderr, "error:")
    assert "no weights.safetensors" in error and "model.pt is a pickle checkpoint" in error
    assert f"segflow model convert {pickled / 'model.pt'} --card {pickled / 'card.json'}" in error
    image = raster(tmp_path / "in.tif")  # segment says the same, in the same words
    seg = runner.invoke(app, ["segment", str(image), "--model", str(pickled), "--out", str(tmp_path / "o")])
    assert seg.exit_code != 0 and lines(seg.stderr, "error:") == [error]
    # a card whose own window the network cannot take: segment refused it, inspect printed it
    odd = tmp_path / "odd-roi"
    shutil.copytree(models["3ch"].path, odd)
    card = json.loads((odd / "card.json").read_text())
    card["inference"]["roi"] = [33, 33]
    (odd / "card.json").write_text(json.dumps(card))
    res = runner.invoke(app, ["model", "inspect", str(odd)])
    assert res.exit_code == 1 and res.stdout == ""
    assert lines(res.stderr, "error:") == [f"error: {odd}: its card's inference.roi: unet needs each spatial size "
                                           "divisible by 2, got roi (33, 33)"], res.stderr
    cut = truncated_weights(models["3ch"].path, tmp_path / "cut")
    res = runner.invoke(app, ["model", "inspect", str(cut)])
    assert res.exit_code == 1 and "not a readable safetensors file" in res.stderr


# ----------------------------------------------------------------------------- 8. progress and the console filter


def test_plain_progress_lines_and_quiet_notes():
    from rich.console import Console

    from flows.progress import PlainReporter, QuietReporter

    clock = [0.0]
    console = Console(width=200, record=True)
    rep = PlainReporter(console, every=10, clock=lambda: clock[0])
    rep.start("k", "segment scene", 96, "chunks")
    for _ in range(96):
        clock[0] += 0.33
        rep.advance("k")
    rep.finish("k")
    text = console.export_text().splitlines()
    assert text[0] == "segment scene: 31/96 chunks (32%), 3.0 chunks/s, about 21 s left"
    assert text[-1] == "segment scene: 96 chunks in 32 s (3.0 chunks/s)" and len(text) == 4
    # a step cut short (an interrupted nightly had said "1 of 1 processed" before "interrupted: ...") says how far
    rep.start("n", "nightly inputs", 3)
    clock[0] += 5
    rep.advance("n")
    rep.finish("n")
    assert console.export_text().splitlines()[-1] == "nightly inputs: 1 of 3 processed in 5.0 s (0.2/s)"
    quiet = Console(width=200, record=True)
    QuietReporter(quiet).note("Dask scheduler tcp://x", logging.INFO)
    QuietReporter(quiet).note("scene.tif: has no CRS", logging.WARNING)
    assert quiet.export_text() == "scene.tif: has no CRS\n"


def test_a_scheduler_is_named_once_when_two_batches_share_it():
    """The demo runs two batches on one cluster; each batch's ``dask_client`` used to name it again."""
    from distributed import Client, LocalCluster

    from flows.cluster import dask_client
    from flows.progress import reporting

    class Notes:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def note(self, text: str, level: int = logging.INFO) -> None:
            self.lines.append(text)

    notes = Notes()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster), reporting(notes):
        for _ in range(2):
            with dask_client(None, dashboard=True) as client:
                assert client.submit(sum, [1, 2]).result() == 3
    assert len(notes.lines) == 1 and notes.lines[0].startswith("Dask scheduler in this process"), notes.lines


def test_info_of_a_link_in_a_loop_says_so(tmp_path):
    """`segflow info` said "no such file or directory" where `segment` says what the link is."""
    from flows.inspect import describe
    from storage.errors import InputError

    (tmp_path / "a.tif").symlink_to("b.tif")
    (tmp_path / "b.tif").symlink_to("a.tif")
    (tmp_path / "gone.tif").symlink_to("moved-away.tif")
    with pytest.raises(InputError, match="a symbolic link in a loop"):
        describe(tmp_path / "a.tif")
    with pytest.raises(InputError, match="broken symbolic link"):
        describe(tmp_path / "gone.tif")


def test_the_console_filter_drops_what_segflow_reports_itself():
    from flows.runlog import ReportedElsewhere
    from storage.errors import CorruptInputError, InputError

    keep_out = ReportedElsewhere()

    def record(name: str, level: int, msg: str, exc: BaseException | None = None) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, None, (type(exc), exc, None) if exc else None)

    try:
        raise InputError("a.tif", "no such file") from OSError(2, "gone")
    except InputError as exc:
        ours = exc
    assert not keep_out.filter(record("prefect.flow_runs", logging.ERROR, "Encountered exception", ours))
    wrapped = RuntimeError("flow crashed")
    wrapped.__cause__ = CorruptInputError("b.tif", "damaged")
    assert not keep_out.filter(record("prefect.task_runs", logging.ERROR, "failed", wrapped))
    assert not keep_out.filter(record("prefect.task_runs", logging.ERROR, "Finished in state Failed('Task run "
                                      "encountered an exception CorruptInputError: b.tif: damaged')"))
    assert keep_out.filter(record("prefect.flow_runs", logging.ERROR, "Encountered exception", KeyError("bug")))
    assert keep_out.filter(record("prefect.task_runs", logging.ERROR, "Finished in state Failed('... KeyError: x')"))
    assert not keep_out.filter(record("segflow", logging.INFO, "input failed: a.tif: no such file"))
    assert keep_out.filter(record("segflow", logging.WARNING, "a.tif: has no CRS"))
    # a SIGTERM while Prefect's own handler holds (a flow run starting): the command says "interrupted:" itself
    for signal_words in ("a termination signal", "an interrupt signal"):
        assert not keep_out.filter(record("prefect.flow_runs", logging.ERROR,
                                          f"Crash detected! Execution was aborted by {signal_words}."))
    assert keep_out.filter(record("prefect.flow_runs", logging.ERROR,
                                  "Crash detected! Execution was aborted by Python system exit call."))


def test_a_night_of_many_skipped_inputs_prints_one_row_for_them_and_one_window_is_singular():
    """300 done inputs printed 300 table rows of nothing new (cron logs, CI); "segment x: 1 windows in 0.2 s"."""
    from rich.console import Console

    from flows.nightly_cli import SKIPPED_ROWS, summary_table
    from flows.progress import PlainReporter

    done = {"input": "/in/new.tif", "status": "done", "model": "m", "seconds": 1.0, "windows": {"evaluated": 1,
                                                                                               "skipped": 0}}
    skipped = [{"input": f"/in/old-{i}.tif", "status": "skipped", "model": "m"} for i in range(SKIPPED_ROWS + 5)]
    run = {"summary": "26 inputs: 1 done, 25 skipped"}
    console = Console(width=200, record=True)
    console.print(summary_table({"run": run, "inputs": [done, *skipped]}))
    text = console.export_text()
    assert "new.tif" in text and "old-3.tif" not in text and f"{SKIPPED_ROWS + 5} inputs │ skipped" in text
    console = Console(width=200, record=True)
    console.print(summary_table({"run": run, "inputs": [done, *skipped[:SKIPPED_ROWS]]}))
    text = console.export_text()
    assert all(f"old-{i}.tif" in text for i in range(SKIPPED_ROWS))  # a few are still listed
    console = Console(width=200, record=True)
    plain = PlainReporter(console, clock=iter([0.0, 0.1, 0.2]).__next__)
    plain.start("s", "segment x", 1, "windows")
    plain.advance("s")
    plain.finish("s")
    assert console.export_text().strip() == "segment x: 1 window in 0.2 s"
