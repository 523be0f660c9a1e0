"""``segflow evaluate``: per-class scores equal MONAI's, chunking and cropping change nothing, files and CLI."""

from __future__ import annotations

import csv
import json
import warnings
from contextlib import ExitStack
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import rasterio
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric, SurfaceDistanceMetric
from rasterio.transform import from_origin
from typer.testing import CliRunner

from flows.cli import app
from flows.evaluate import evaluate_files
from flows.pairing import pair_inputs
from segmentation.evaluation import (ABSENT_IN_BOTH, EMPTY_PREDICTION, EMPTY_TRUTH, NO_BACKGROUND_DISTANCES,
                                     scan_labels, score_case, surface_scores)
from storage.classes import LabelClass
from storage.errors import ConfigError, UnsupportedFormatError
from storage.labelmaps import open_labels
from tests.conftest import shared

# MONAI 1.6's metric classes pass get_mask_edges an argument it deprecated itself
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")

SPACING = (0.7, 0.9, 2.5)  # mm, anisotropic like a clinical CT
SHAPE = (30, 34, 14)


# --------------------------------------------------------------------------- fixture generators


def ball(shape: tuple[int, ...], centre: tuple[float, ...], radius: float, spacing: tuple[float, ...]) -> np.ndarray:
    """A sphere (or disc) of ``radius`` in physical units on an anisotropic grid."""
    grid = np.indices(shape, dtype=np.float64)
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing)) <= radius ** 2


def volume_pair() -> tuple[np.ndarray, np.ndarray]:
    """(prediction, truth) uint8 (i, j, k) maps: a ball (1) and a box (2) each, slightly off; class 3 nowhere."""
    truth = np.zeros(SHAPE, np.uint8)
    pred = np.zeros(SHAPE, np.uint8)
    truth[ball(SHAPE, (14, 16, 7), 8.0, SPACING)] = 1
    pred[ball(SHAPE, (15, 17, 7), 7.0, SPACING)] = 1
    truth[2:8, 3:12, 0:5] = 2  # touches the k = 0 edge of the image
    pred[3:9, 3:13, 0:4] = 2
    return pred, truth


def raster_pair() -> tuple[np.ndarray, np.ndarray]:
    """(prediction, truth) uint8 (y, x) maps of 40 x 52 pixels: a disc (1), a field (2), nodata 255 in both."""
    shape = (40, 52)
    truth = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    truth[ball(shape, (20, 20), 80.0, (10.0, 10.0))] = 1
    pred[ball(shape, (21, 19), 70.0, (10.0, 10.0))] = 1
    truth[5:15, 30:50] = 2
    pred[6:16, 32:52] = 2
    truth[:, :3] = 255  # the truth does not know these pixels
    pred[35:, 40:] = 255  # the model had no data here
    return pred, truth


def write_nifti(path: Path, labels: np.ndarray, zooms: tuple[float, ...] = SPACING, dtype: str = "uint8",
                shift: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Path:
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = np.array([-10.0, 20.0, 5.0]) + np.array(shift)
    img = nib.Nifti1Image(labels.astype(dtype), affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)
    return path


def write_tif(path: Path, labels: np.ndarray, *, origin: tuple[float, float] = (500000.0, 6000000.0),
              crs: str = "EPSG:32633", classes: list[LabelClass] | None = None, nodata: int = 255) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=labels.shape[1], height=labels.shape[0], count=1,
                       dtype="uint8", crs=crs, transform=from_origin(*origin, 10, 10), nodata=nodata) as dst:
        dst.write(labels, 1)
        if classes:
            dst.update_tags(CLASSES=json.dumps([c.model_dump(mode="json") for c in classes]))
    return path


def onehot(labels: np.ndarray, n: int) -> torch.Tensor:
    t = torch.nn.functional.one_hot(torch.from_numpy(labels.astype(np.int64)), n)
    return t.permute(labels.ndim, *range(labels.ndim))[None].float()


def by_value(scores) -> dict:
    return {c.value: c for c in scores.classes}


# --------------------------------------------------------------------------- metrics on arrays


@pytest.mark.parametrize("dims", [2, 3])
def test_scores_equal_monai_per_class(dims):
    if dims == 3:
        pred, truth, spacing = *volume_pair(), SPACING
    else:
        pred, truth = raster_pair()
        pred, truth, spacing = np.where(pred == 255, 0, pred), np.where(truth == 255, 0, truth), (10.0, 7.5)
    scores = by_value(score_case(pred, truth, spacing, values=[0, 1, 2], tolerance=1.5))
    p, t = onehot(pred, 3), onehot(truth, 3)
    dice = DiceMetric(include_background=True, reduction="none")(p, t)[0]
    hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(p, t, spacing=list(spacing))[0]
    asd = SurfaceDistanceMetric(include_background=True, symmetric=True, reduction="none")(p, t, spacing=list(spacing))[0]
    nsd = SurfaceDiceMetric([1.5] * 3, include_background=True, reduction="none")(p, t, spacing=list(spacing))[0]
    for c in (1, 2):
        assert scores[c].dice == pytest.approx(float(dice[c]), abs=1e-6)
        assert scores[c].hd95 == pytest.approx(float(hd95[c]), abs=1e-6)
        assert scores[c].asd == pytest.approx(float(asd[c]), abs=1e-6)
        assert scores[c].nsd == pytest.approx(float(nsd[c]), abs=1e-6)
        assert 0.3 < scores[c].dice < 0.99 and scores[c].hd95 > 0  # the shapes really differ
    assert scores[0].dice == pytest.approx(float(dice[0]), abs=1e-6)  # no background named: 0 is a class too
    assert scores[0].hd95 == pytest.approx(float(hd95[0]), abs=1e-6)


def test_background_distances_only_when_asked():
    pred, truth = volume_pair()
    skipped = by_value(score_case(pred, truth, SPACING, background=0))[0]
    kept = by_value(score_case(pred, truth, SPACING))[0]
    assert skipped.hd95 is None and skipped.note == NO_BACKGROUND_DISTANCES
    assert kept.hd95 is not None and kept.hd95 > 0 and kept.note is None
    assert skipped.dice == kept.dice


def test_chunked_equals_whole_with_ignore_and_nodata():
    pred, truth = raster_pair()
    whole = score_case(pred, truth, (10.0, 10.0), values=[0, 1, 2, 3], ignore=255, pred_nodata=255, background=0)
    for block in [(3, 4), (7, 52), (1, 1)]:
        chunked = score_case(pred, truth, (10.0, 10.0), values=[0, 1, 2, 3], ignore=255, pred_nodata=255,
                             block=block, background=0)
        assert chunked.classes == whole.classes
        assert np.array_equal(chunked.confusion(), whole.confusion())
        assert chunked.scan.ignored == whole.scan.ignored == 40 * 3
    pred3, truth3 = volume_pair()
    assert score_case(pred3, truth3, SPACING, block=(4, 5, 3)).classes == score_case(pred3, truth3, SPACING).classes


def test_ignore_and_no_prediction_counts():
    truth = np.array([[1, 1, 1, 255], [0, 0, 2, 2]], np.uint8)
    pred = np.array([[1, 255, 0, 1], [0, 255, 2, 1]], np.uint8)
    scores = score_case(pred, truth, (1.0, 1.0), ignore=255, pred_nodata=255)
    # rows truth 0, 1, 2; columns predicted 0, 1, 2, then "no prediction"; the ignored truth pixel counts nowhere
    assert scores.confusion().tolist() == [[1, 0, 0, 1], [1, 1, 0, 1], [0, 1, 1, 0]]
    s = by_value(scores)
    assert (s[1].truth_count, s[1].pred_count) == (3, 2)  # the 1 predicted on the ignored pixel is not counted
    assert s[1].dice == pytest.approx(2 * 1 / (3 + 2))  # the "no prediction" pixel is a miss
    assert scores.scan.ignored == 1 and scores.scan.counted == 7


def test_empty_class_rules():
    truth = np.zeros((12, 12), np.uint8)
    pred = np.zeros((12, 12), np.uint8)
    truth[2:5, 2:5] = 1  # class 1 only in the truth
    pred[7:10, 7:10] = 2  # class 2 only in the prediction
    s = by_value(score_case(pred, truth, (1.0, 1.0), values=[0, 1, 2, 3], background=0))
    assert (s[1].dice, s[1].iou, s[1].hd95, s[1].asd, s[1].nsd, s[1].note) == (0.0, 0.0, None, None, 0.0,
                                                                                EMPTY_PREDICTION)
    assert (s[2].dice, s[2].hd95, s[2].note) == (0.0, None, EMPTY_TRUTH)
    assert (s[3].dice, s[3].iou, s[3].hd95, s[3].nsd, s[3].note) == (None, None, None, None, ABSENT_IN_BOTH)
    assert (s[3].truth_count, s[3].pred_count) == (0, 0)


def test_crop_gives_the_uncropped_distances():
    pred, truth = volume_pair()
    scan = scan_labels(pred, truth, block=(5, 6, 4))
    for value in (1, 2):
        box = scan.box(value, SHAPE)
        assert np.prod([s.stop - s.start for s in box]) < pred.size / 2  # a real crop
        union = np.argwhere((pred == value) | (truth == value))
        assert [s.start for s in box] == [max(0, v - 1) for v in union.min(axis=0)]
        assert [s.stop for s in box] == [min(n, v + 2) for v, n in zip(union.max(axis=0), SHAPE)]
        cropped = surface_scores(pred[box] == value, truth[box] == value, SPACING, 1.0)
        whole = surface_scores(pred == value, truth == value, SPACING, 1.0)
        assert cropped == pytest.approx(whole, abs=1e-6)
    assert box[2].start == 0  # the box of class 2 is clipped at the image edge


# --------------------------------------------------------------------------- files


def test_volume_millilitres_and_area_hectares(tmp_path):
    pred, truth = volume_pair()
    report = evaluate_files([write_nifti(tmp_path / "p.nii.gz", pred)], [write_nifti(tmp_path / "t.nii", truth)],
                            include_background=True)
    case = report["cases"][0]
    rows = {r["value"]: r for r in case["classes"]}
    voxel_ml = 0.7 * 0.9 * 2.5 / 1000
    assert (case["distance_unit"], case["size_unit"]) == ("mm", "mL")
    assert case["spacing"] == pytest.approx(list(SPACING))
    for v in (1, 2):
        assert rows[v]["truth_size"] == pytest.approx(np.count_nonzero(truth == v) * voxel_ml)
        assert rows[v]["pred_size"] == pytest.approx(np.count_nonzero(pred == v) * voxel_ml)
        assert rows[v]["size_diff"] == pytest.approx(rows[v]["pred_size"] - rows[v]["truth_size"])
    direct = by_value(score_case(pred, truth, SPACING))
    assert rows[1]["hd95"] == pytest.approx(direct[1].hd95) and rows[1]["dice"] == pytest.approx(direct[1].dice)

    rp, rt = raster_pair()
    report = evaluate_files([write_tif(tmp_path / "p.tif", rp)], [write_tif(tmp_path / "t.tif", rt)], chunk=16)
    case = report["cases"][0]
    rows = {r["value"]: r for r in case["classes"]}
    assert (case["distance_unit"], case["size_unit"], case["cell_size"]) == ("m", "ha", pytest.approx(0.01))
    counted = rt != 255
    assert rows[2]["truth_size"] == pytest.approx(np.count_nonzero(rt == 2) * 10 * 10 / 1e4)
    assert rows[2]["pred_size"] == pytest.approx(np.count_nonzero((rp == 2) & counted) * 0.01)
    assert case["ignored_pixels"] == np.count_nonzero(~counted)
    assert case["confusion"]["columns"][-1] == "no prediction"
    assert sum(r[-1] for r in case["confusion"]["matrix"]) == np.count_nonzero((rp == 255) & counted)

    from storage.geotiff import ingest_geotiff  # a truth ingested into a zarr image store reads the same

    store = ingest_geotiff(tmp_path / "t.tif", tmp_path / "t.zarr", chunk=16)
    assert evaluate_files([tmp_path / "p.tif"], [store.path])["cases"][0]["classes"] == case["classes"]


def test_distances_use_the_affines_voxel_size_when_pixdim_disagrees(tmp_path):
    """A header whose pixdim (1 mm) disagrees with its sform (3 mm slices): the sform is where the voxels are, so
    HD95 and NSD use 3 mm, as the volumes in mL already did (they used pixdim: HD95 1.0 instead of 3.0)."""
    truth = np.zeros((20, 20, 12), np.uint8)
    truth[5:15, 5:15, 3:8] = 1
    pred = np.zeros_like(truth)
    pred[5:15, 5:15, 4:9] = 1
    sform = np.diag([1.0, 1.0, 3.0, 1.0])
    paths = []
    for name, arr in (("p", pred), ("t", truth)):
        img = nib.Nifti1Image(arr, sform)
        img.set_qform(np.eye(4), code=1)
        img.set_sform(sform, code=1)
        img.header.set_zooms((1.0, 1.0, 1.0))
        nib.save(img, tmp_path / f"{name}.nii.gz")
        paths.append(tmp_path / f"{name}.nii.gz")
    assert nib.load(paths[0]).header.get_zooms() == (1.0, 1.0, 1.0)
    case = evaluate_files([paths[0]], [paths[1]])["cases"][0]
    assert case["spacing"] == pytest.approx([1.0, 1.0, 3.0])
    row = {r["value"]: r for r in case["classes"]}[1]
    direct = by_value(score_case(pred, truth, (1.0, 1.0, 3.0)))[1]
    assert row["hd95"] == pytest.approx(3.0) and row["hd95"] == pytest.approx(direct.hd95)
    assert row["nsd"] == pytest.approx(direct.nsd)


def test_class_0_is_background_only_when_named_so():
    """Cityscapes' class 0 is road, a land-cover map's may be water: scored with distances like any class.  A class
    named background (any case), wherever it is, has none; with no names at all 0 is taken as background."""
    from segmentation.validation import ValidationScore
    from storage.classes import background_value

    assert background_value({0: "road", 1: "sidewalk"}) is None
    assert background_value({0: "water", 1: "forest"}) is None
    assert background_value({0: "Background", 1: "liver"}) == 0
    assert background_value({0: "car", 3: "unlabelled"}) == 3
    assert background_value({}) == 0
    score = ValidationScore({0: 0.9, 1: 0.5, 2: 0.1}, pixels=10, background=None)
    assert score.mean_foreground == pytest.approx(0.5)  # road counts in the mean that picks the checkpoint
    assert ValidationScore({0: 0.9, 1: 0.5, 2: 0.1}, pixels=10, background=0).mean_foreground == pytest.approx(0.3)
    rp, rt = raster_pair()
    scores = score_case(rp, rt, (10.0, 10.0), ignore=255, pred_nodata=255, background=background_value({0: "water"}))
    assert by_value(scores)[0].hd95 is not None and by_value(scores)[0].note != NO_BACKGROUND_DISTANCES


def test_a_truth_stored_in_another_axis_order_is_read_on_the_predictions_grid(tmp_path):
    """The same voxels stored with rows flipped (dcm2niix's order for a DICOM series segflow writes L,P,S) or with
    the axes permuted score exactly as the truth on the prediction's own grid; they were refused ("affines differ
    by up to 13.3 mm").  A grid that is not the same voxels (half a voxel off) is still refused."""
    rng = np.random.default_rng(0)
    pred = (rng.random((20, 16, 12)) > 0.7).astype(np.uint8)
    pred[5:10, 3:9, 2:7] = 2
    truth = pred.copy()
    truth[0:3] = 0
    a = np.array([[-0.8, 0, 0, 50], [0, -0.7, 0, 40], [0, 0, 2.5, -10], [0, 0, 0, 1]])
    p = tmp_path / "p.nii.gz"
    nib.save(nib.Nifti1Image(pred, a), p)
    nib.save(nib.Nifti1Image(truth, a), tmp_path / "same.nii.gz")
    flipped = a.copy()
    flipped[:3, 1] *= -1
    flipped[:3, 3] = a[:3, :3] @ [0, 15, 0] + a[:3, 3]
    nib.save(nib.Nifti1Image(truth[:, ::-1, :].copy(), flipped), tmp_path / "flipped.nii.gz")
    permuted = np.eye(4)
    permuted[:3, :3] = a[:3, [2, 0, 1]]
    permuted[:3, 3] = a[:3, 3]
    nib.save(nib.Nifti1Image(np.transpose(truth, (2, 0, 1)).copy(), permuted), tmp_path / "permuted.nii.gz")
    want = evaluate_files([p], [tmp_path / "same.nii.gz"])["cases"][0]["classes"]
    assert {r["value"]: r["dice"] for r in want}[1] < 1.0
    for name in ("flipped", "permuted"):
        got = evaluate_files([p], [tmp_path / f"{name}.nii.gz"])["cases"][0]["classes"]
        assert [(r["dice"], r["hd95"], r["truth_pixels"]) for r in got] == \
            [(r["dice"], r["hd95"], r["truth_pixels"]) for r in want], name
    off = flipped.copy()
    off[:3, 3] += a[:3, 1] * 0.5
    nib.save(nib.Nifti1Image(truth[:, ::-1, :].copy(), off), tmp_path / "off.nii.gz")
    result = invoke(p, "--truth", tmp_path / "off.nii.gz", "--out", tmp_path / "r")
    assert result.exit_code == 1 and "affines differ" in " ".join(result.output.split()), result.output


def test_store_and_segflow_nifti_outputs_carry_names_and_match(tmp_path):
    from storage.layout import commit_store, create_prediction_store
    from storage.nifti import ingest_nifti, write_label_nifti

    pred, truth = volume_pair()
    truth_path = write_nifti(tmp_path / "case7.nii.gz", truth)
    store = ingest_nifti(truth_path, tmp_path / "work" / "image.zarr", chunk=8)
    classes = [LabelClass(value=0, name="background"), LabelClass(value=1, name="left lung"),
               LabelClass(value=2, name="heart")]
    out = tmp_path / "out"
    out.mkdir()
    write_label_nifti(pred.T, store.meta.geometry, out / "case7.nii.gz", classes=classes)  # (k, j, i) as segflow
    target = out / "case7.zarr"
    _, labels, _ = create_prediction_store(target, meta=store.meta.model_dump(mode="json"), spatial_shape=pred.T.shape,
                                           chunks=(5, 8, 8), label_dtype="uint8", nodata_label=255,
                                           classes=[c.model_dump(mode="json") for c in classes],
                                           probabilities_dtype=None)
    labels[:] = pred.T
    commit_store(target, {})
    from_file = evaluate_files([out / "case7.nii.gz"], [tmp_path], chunk=3)["cases"][0]
    from_store = evaluate_files([target], [truth_path])["cases"][0]
    assert [r["name"] for r in from_file["classes"]] == ["background", "left lung", "heart"]  # the NIfTI label table
    assert from_file["classes"] == from_store["classes"]
    assert from_file["classes"][1]["dice"] == pytest.approx(by_value(score_case(pred, truth, SPACING))[1].dice)


def test_pairing_by_folder(tmp_path):
    truths = tmp_path / "truth"
    truths.mkdir()
    for name in ("a.tif", "b.nii.gz", "c.tif", "c.nii.gz", ".hidden.tif", "notes.txt", "e.tif", "e.truth.tif",
                 "f.tif", "f.truth.tif", "f.labels.nii.gz"):
        (truths / name).write_bytes(b"x")
    pairs = pair_inputs([Path("out/a.tif"), Path("out/b.labels.tif"), Path("out/e.tif")], [truths])
    assert pairs == [(Path("out/a.tif"), truths / "a.tif"), (Path("out/b.labels.tif"), truths / "b.nii.gz"),
                     (Path("out/e.tif"), truths / "e.truth.tif")]  # the marked file, not the image beside it
    with pytest.raises(ConfigError, match="2 truths"):
        pair_inputs([Path("c.tif")], [truths])
    with pytest.raises(ConfigError, match=r"3 truths \(f.labels.nii.gz, f.tif, f.truth.tif\)"):
        pair_inputs([Path("f.tif")], [truths])  # two marked files: no guess
    with pytest.raises(ConfigError, match="no truth named d"):
        pair_inputs([Path("d.tif")], [truths])
    for name in ("g.hdr", "g.img", "h.hdr.gz", "h.img.gz"):  # an Analyze/NIfTI pair is one map, by its header
        (truths / name).write_bytes(b"x")
    assert pair_inputs([Path("out/g.nii.gz"), Path("out/h.nii.gz")], [truths]) == [
        (Path("out/g.nii.gz"), truths / "g.hdr"), (Path("out/h.nii.gz"), truths / "h.hdr.gz")]
    # a DICOM SEG named by its case: paired only where no label map is (then read on the prediction's grid:
    # tests/test_dicom_pipeline.py), never taken over the NIfTI beside it; it had been "no truth named"
    for name in ("s.seg.dcm", "t.nii.gz", "t.seg.dcm"):
        (truths / name).write_bytes(b"x")
    assert pair_inputs([Path("out/s.nii.gz"), Path("out/t.nii.gz")], [truths]) == [
        (Path("out/s.nii.gz"), truths / "s.seg.dcm"), (Path("out/t.nii.gz"), truths / "t.nii.gz")]
    seg = tmp_path / "noname"
    seg.write_bytes(bytes(128) + b"DICM" + bytes(64))
    for path in (truths / "s.seg.dcm", seg):
        with pytest.raises(UnsupportedFormatError, match=r"is a DICOM file, not a label map; a DICOM SEG is read"):
            open_labels(path, ExitStack())
    assert pair_inputs([Path("x.tif"), Path("y.tif")], [Path("1.tif"), Path("2.tif")])[1] == (Path("y.tif"),
                                                                                              Path("2.tif"))
    # a folder of outputs as the prediction had been "no truth named out.* in ..." (probe, 2026-12-06)
    (tmp_path / "out").mkdir(exist_ok=True)
    with pytest.raises(ConfigError, match=r"out: is a folder: give the label maps in it"):
        pair_inputs([tmp_path / "out"], [truths])
    # a prediction kept in the truth folder had been its own truth: Dice 1, no word (probe, 2026-12-07)
    with pytest.raises(ConfigError, match=r"a.tif: no truth named a.\* in .*truth besides the prediction itself"):
        pair_inputs([truths / "a.tif"], [truths])
    assert pair_inputs([truths / "e.tif"], [truths]) == [(truths / "e.tif", truths / "e.truth.tif")]
    with pytest.raises(ConfigError, match=r"a.tif: is given as its own truth"):
        pair_inputs([truths / "a.tif"], [Path(f"{truths}/../truth/a.tif")])


# --------------------------------------------------------------------------- the command


def invoke(*args) -> object:
    return CliRunner().invoke(app, ["evaluate", *map(str, args)])


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_cli_writes_json_markdown_and_csv(tmp_path):
    rp, rt = raster_pair()
    classes = [LabelClass(value=0, name="background"), LabelClass(value=1, name="pond|lake"),
               LabelClass(value=2, name="field")]
    preds = [write_tif(tmp_path / "tile1.tif", rp, classes=classes),
             write_tif(tmp_path / "tile2.tif", np.where(rp == 2, 0, rp).astype(np.uint8), classes=classes)]
    truths = [write_tif(tmp_path / "tile1.truth.tif", rt), write_tif(tmp_path / "tile2.truth.tif", rt)]
    out = tmp_path / "report"
    result = invoke(*preds, "--truth", truths[0], "--truth", truths[1], "--out", out, "--tolerance", "10")
    assert result.exit_code == 0, result.output
    assert "pond|lake" in result.output and "mean over 2 case(s)" in result.output
    report = json.loads((out / "evaluation.json").read_text())
    assert [c["case"] for c in report["cases"]] == ["tile1", "tile2"]
    case1 = {r["value"]: r for r in report["cases"][0]["classes"]}
    counted = rt != 255
    expected = score_case(np.where(counted, rp, 255), np.where(counted, rt, 255), (10.0, 10.0), ignore=255,
                          pred_nodata=255, tolerance=10.0)
    assert case1[1]["dice"] == pytest.approx(by_value(expected)[1].dice, abs=1e-12)
    assert case1[1]["hd95"] == pytest.approx(by_value(expected)[1].hd95, abs=1e-6)
    assert case1[1]["name"] == "pond|lake" and case1[0]["hd95"] is None
    case2 = {r["value"]: r for r in report["cases"][1]["classes"]}
    assert case2[2]["note"] == EMPTY_PREDICTION and case2[2]["dice"] == 0.0
    mean = {r["value"]: r for r in report["mean"]}
    assert mean[1]["dice"] == pytest.approx((case1[1]["dice"] + case2[1]["dice"]) / 2)
    assert mean[2]["hd95"] == pytest.approx(case1[2]["hd95"]) and mean[2]["n"]["hd95"] == 1

    rows = list(csv.DictReader((out / "tile1.csv").open()))
    assert [r["name"] for r in rows] == ["background", "pond|lake", "field"]
    assert float(rows[1]["dice"]) == pytest.approx(case1[1]["dice"])
    assert float(rows[2]["hd95_m"]) == pytest.approx(case1[2]["hd95"])
    assert float(rows[2]["truth_size_ha"]) == pytest.approx(np.count_nonzero(rt == 2) * 0.01)
    markdown = (out / "evaluation.md").read_text()
    assert "pond\\|lake" in markdown and f"{case1[1]['dice']:.4g}" in markdown and "## tile2" in markdown
    assert "| truth \\ prediction |" in markdown

    def card(names: list[str]) -> Path:
        path = tmp_path / f"card{len(names)}.json"
        path.write_text(json.dumps({"name": "lc", "architecture": {"name": "unet"}, "input": {"spatial_dims": 2,
                                    "channels": 4}, "inference": {"roi": [64, 64]},
                                    "classes": [{"value": v, "name": n} for v, n in enumerate(names)]}))
        return path

    # --classes: a model card's names win over the files' own
    result = invoke(preds[0], "--truth", truths[0], "--out", out, "--classes", card(["bare", "water", "crop"]))
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "evaluation.json").read_text())["cases"][0]["classes"]
    assert [r["name"] for r in rows] == ["bare", "water", "crop"]
    assert not any("not among" in (r["note"] or "") for r in rows)
    renamed = f"warning: {preds[0]}: its own class names differ from --classes (0 'background' as 'bare', "
    assert renamed in " ".join(result.output.split())  # said: it had renamed them without a word
    # ... but not another model's: the prediction carries the values 0-2, the card names 0-1
    result = invoke(preds[0], "--truth", truths[0], "--out", tmp_path / "other", "--classes", card(["bare", "water"]))
    assert result.exit_code == 1 and not (tmp_path / "other").exists()
    [line] = error_lines(result.output)
    assert "card2.json" in line and "0 bare, 1 water" in line and "2 field" in line and str(preds[0]) in line
    # a prediction with no names of its own takes the card's, and a value the card leaves out is marked
    plain = write_tif(tmp_path / "plain.tif", rp)
    result = invoke(plain, "--truth", truths[0], "--out", out, "--classes", card(["bare", "water"]))
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "evaluation.json").read_text())["cases"][0]["classes"]
    assert [r["name"] for r in rows] == ["bare", "water", "class 2"]
    assert rows[2]["note"] == "value not among the named classes" and "not among" not in (rows[1]["note"] or "")


def test_cli_bad_inputs_are_one_error_line_and_exit_1_bad_usage_2(tmp_path):
    rp, rt = raster_pair()
    pred = write_tif(tmp_path / "p.tif", rp)
    shifted = write_tif(tmp_path / "shifted.tif", rt, origin=(500010.0, 6000000.0))
    result = invoke(pred, "--truth", shifted, "--out", tmp_path / "o")
    assert result.exit_code == 1
    [line] = error_lines(result.output)
    assert str(pred) in line and str(shifted) in line and "transform" in line
    assert not (tmp_path / "o").exists()

    other_crs = write_tif(tmp_path / "crs.tif", rt, crs="EPSG:32632")
    [line] = error_lines(invoke(pred, "--truth", other_crs).output)
    assert "EPSG:32633 vs EPSG:32632" in line

    pv, tv = volume_pair()
    moved = invoke(write_nifti(tmp_path / "p.nii.gz", pv), "--truth",
                   write_nifti(tmp_path / "t.nii.gz", tv, shift=(0.0, 0.01, 0.0)))
    assert moved.exit_code == 1 and "affines differ by up to 0.01" in error_lines(moved.output)[0]
    nudged = invoke(tmp_path / "p.nii.gz", "--truth", write_nifti(tmp_path / "t.nii.gz", tv, shift=(0, 2e-5, 0)),
                    "--out", tmp_path / "nudged")
    assert nudged.exit_code == 0, nudged.output  # within 1e-4 mm: the same grid

    result = invoke(pred, pred, "--truth", pred)  # a usage error, as other commands' bad options: exit 2
    assert result.exit_code == 2 and "2 predictions but 1 truth:" in error_lines(result.output)[0]
    (tmp_path / "truths").mkdir()
    result = invoke(pred, pred, "--truth", tmp_path / "truths", "--truth", pred)  # it was refused in segment's words
    assert result.exit_code == 2 and error_lines(result.output) == [
        f"error: {tmp_path / 'truths'}: is a folder, and a --truth folder must be the only --truth (its files pair "
        "with the predictions by name); otherwise give one truth file per prediction"], result.output
    result = invoke(tmp_path / "gone.tif", "--truth", tmp_path / "truths")  # was "no truth named gone.* in ..."
    assert result.exit_code == 1 and error_lines(result.output) == [f"error: {tmp_path / 'gone.tif'}: no such file"]
    result = invoke(pred, "--truth", tmp_path / "missing.tif")
    assert result.exit_code == 1 and "missing.tif" in error_lines(result.output)[0]
    fractional = write_nifti(tmp_path / "f.nii.gz", tv * 0.5, dtype="float32")
    result = invoke(write_nifti(tmp_path / "p.nii.gz", pv), "--truth", fractional)
    assert result.exit_code == 1 and "non-integer" in error_lines(result.output)[0]


def test_real_lesion_mask_against_a_shifted_copy(tmp_path):
    truth_path = shared("labelled/brain-lesion/brain1_label.nii.gz")
    img = nib.load(truth_path)
    truth = np.asanyarray(img.dataobj)
    moved = np.roll(truth, 2, axis=0)
    pred_path = tmp_path / "brain1.nii.gz"
    nib.save(nib.Nifti1Image(moved, img.affine, img.header), pred_path)
    report = evaluate_files([pred_path], [truth_path], chunk=4)
    rows = {r["value"]: r for r in report["cases"][0]["classes"]}
    values = [int(v) for v in np.unique(truth) if v != 0]
    spacing = img.header.get_zooms()[:3]
    for v in values:
        direct = by_value(score_case(moved.astype(np.int64), truth.astype(np.int64), spacing))[v]
        assert rows[v]["dice"] == pytest.approx(direct.dice) and 0 < rows[v]["dice"] < 1
        assert rows[v]["hd95"] == pytest.approx(direct.hd95, abs=1e-6)


def test_outputs_of_two_models_are_averaged_apart(tmp_path):
    """A land-cover scene and a scan scored in one run (evaluate out/* after a night with two models): the mean
    had averaged 'water' with the scan's 'background' and 'cropland' with 'lesion', as both had the same value.
    Each group of cases sharing kind, units and class table now has its own mean, and ``mean`` is None."""
    rp, rt = raster_pair()
    land = [LabelClass(value=0, name="water"), LabelClass(value=1, name="forest"), LabelClass(value=2, name="crop")]
    town = [LabelClass(value=0, name="background"), LabelClass(value=1, name="building")]
    preds = [write_tif(tmp_path / "a.tif", rp, classes=land), write_tif(tmp_path / "b.tif", rp, classes=land),
             write_tif(tmp_path / "c.tif", np.where(rp == 2, 0, rp).astype(np.uint8), classes=town)]
    truth = write_tif(tmp_path / "t.tif", rt)
    pv, tv = volume_pair()
    scan = write_nifti(tmp_path / "scan.nii.gz", pv)
    out = tmp_path / "report"
    result = invoke(*preds, scan, *(["--truth", truth] * 3), "--truth", write_nifti(tmp_path / "tv.nii.gz", tv),
                    "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "evaluation.json").read_text())
    assert report["mean"] is None
    groups = {tuple(g["cases"]): g for g in report["means"]}
    assert set(groups) == {("a", "b"), ("c",), ("scan",)}
    cases = {c["case"]: {r["value"]: r for r in c["classes"]} for c in report["cases"]}
    landcover = {r["value"]: r for r in groups[("a", "b")]["classes"]}
    assert landcover[1]["name"] == "forest" and landcover[1]["dice"] == pytest.approx(cases["a"][1]["dice"])
    buildings = {r["value"]: r for r in groups[("c",)]["classes"]}
    assert buildings[1]["name"] == "building" and buildings[1]["dice"] == pytest.approx(cases["c"][1]["dice"])
    assert groups[("scan",)]["distance_unit"] == "mm" and groups[("a", "b")]["distance_unit"] == "m"
    markdown = (out / "evaluation.md").read_text()
    assert "## Mean over a, b (rasters)" in markdown and "## Mean over scan (volumes)" in markdown
    assert "NSD tolerance 1 m, 1 mm" in markdown
    assert "mean over a, b" in result.output and "mean over scan" in result.output

    # scoring one of them again into the same folder: the others' CSVs go with the report that listed them
    assert {p.name for p in out.glob("*.csv")} == {"a.csv", "b.csv", "c.csv", "scan.csv"}
    result = invoke(preds[0], "--truth", truth, "--out", out)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.glob("*.csv")} == {"a.csv"}
    assert json.loads((out / "evaluation.json").read_text())["mean"] is not None


def test_the_truths_nodata_is_not_counted_as_training_reads_it(tmp_path):
    """A truth GeoTIFF declaring nodata 254: training reads those pixels as ignored, evaluate had scored them as
    a class 254 (Dice 0, and background 0.88 instead of 0.98).  Now they count nowhere, as ``--ignore 254``
    does, and the case says so.  A prediction whose nodata is also a named class is said too."""
    rp, rt = raster_pair()
    rt = np.where(rt == 255, 254, rt).astype(np.uint8)
    truth = write_tif(tmp_path / "t.tif", rt, nodata=254)
    pred = write_tif(tmp_path / "p.tif", rp, classes=[LabelClass(value=0, name="background"),
                                                    LabelClass(value=1, name="pond")])
    declared = evaluate_files([pred], [truth])
    # the truth's class 2, which the prediction's table leaves out, has its own warning (test_evaluate_truths.py)
    assert [w.split(": ", 1)[1][:16] for w in declared["cases"][0]["warnings"]] == ["holds values 2 t"]

    def own(case: dict) -> list[str]:
        return [n for n in case["notes"] if n not in case["warnings"]]

    plain = write_tif(tmp_path / "plain-truth.tif", rt, nodata=253)
    asked = evaluate_files([pred], [plain], ignore=254)
    assert [c["value"] for c in declared["cases"][0]["classes"]] == [0, 1, 2]
    for a, b in zip(declared["cases"][0]["classes"], asked["cases"][0]["classes"]):
        assert a["dice"] == b["dice"] and a["hd95"] == b["hd95"]
    assert declared["cases"][0]["ignored_pixels"] == np.count_nonzero(rt == 254)
    assert own(declared["cases"][0]) == ["the truth's nodata 254 not counted (--ignore -1 counts every pixel)"]
    # --ignore -1 counts every pixel, the truth's nodata too (it had still left them out: a nodata 0 that is the
    # background class could not be scored)
    every = evaluate_files([pred], [truth], ignore=None)["cases"][0]
    assert every["ignored_pixels"] == 0 and own(every) == []
    background = write_tif(tmp_path / "t0.tif", rt, nodata=0)
    [note] = own(evaluate_files([pred], [background])["cases"][0])
    assert note == "the truth's nodata 0 not counted, though it is also class 'background' (--ignore -1 counts every pixel)"
    # a model trained with classes.json naming the label rasters' nodata 0 counted it as background: scored so too
    # with its card (left out, the false positives on it had gone uncounted: Dice 0.61 where it was 0.37)
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"name": "lc", "architecture": {"name": "unet"}, "input": {"spatial_dims": 2,
                                "channels": 4}, "inference": {"roi": [64, 64]},
                                "classes": [{"value": 0, "name": "background"}, {"value": 1, "name": "pond"}],
                                "training": {"dataset": {"nodata_classes": [0]}}}))
    with_card = evaluate_files([pred], [background], classes=card)["cases"][0]
    assert with_card["ignored_pixels"] == np.count_nonzero(rt == 255) and own(with_card) == [
        "the truth's nodata 0 counted as class 'background', as the model's training counted it"]
    plain0 = write_tif(tmp_path / "plain0.tif", rt, nodata=None)  # the same pixels, no nodata tag
    untagged = evaluate_files([pred], [plain0], classes=card)["cases"][0]
    assert [c["dice"] for c in with_card["classes"]] == [c["dice"] for c in untagged["classes"]]

    zero = write_tif(tmp_path / "zero.tif", rp, nodata=0, classes=[LabelClass(value=0, name="background"),
                                                                   LabelClass(value=1, name="pond")])
    [note] = own(evaluate_files([zero], [truth])["cases"][0])[1:]
    assert note == "the prediction's nodata 0 is also class 'background': its pixels count as no prediction"


def test_a_truth_with_nothing_counted_is_one_error_line(tmp_path):
    rp, _ = raster_pair()
    pred = write_tif(tmp_path / "p.tif", rp)
    truth = write_tif(tmp_path / "t.tif", np.full(rp.shape, 255, np.uint8))
    result = invoke(pred, "--truth", truth, "--out", tmp_path / "o")
    assert result.exit_code == 1 and not (tmp_path / "o").exists()
    [line] = error_lines(result.output)
    assert line.startswith(f"error: {truth}: every pixel is 255 (not counted): nothing to score {pred}")


def test_a_2d_map_stored_as_one_slice_is_measured_in_2d(tmp_path):
    """nnU-Net keeps 2-D data as X x Y x 1 NIfTI.  Measured in 3-D every pixel of a one-slice map is surface, so
    HD95 and ASD were the distance to the nearest truth pixel (1.1 and 0.11 against MONAI's 2.0 and 1.1 in 2-D)."""
    shape, spacing = (40, 36), (0.5, 0.5)
    truth = ball(shape, (20, 18), 6.0, spacing).astype(np.uint8)
    pred = ball(shape, (21, 17), 5.0, spacing).astype(np.uint8)
    report = evaluate_files([write_nifti(tmp_path / "p.nii.gz", pred[..., None], zooms=(*spacing, 3.0))],
                            [write_nifti(tmp_path / "t.nii.gz", truth[..., None], zooms=(*spacing, 3.0))],
                            tolerance=1.0)
    row = {r["value"]: r for r in report["cases"][0]["classes"]}[1]
    y, t = onehot(pred, 2), onehot(truth, 2)
    hd95 = HausdorffDistanceMetric(percentile=95)(y, t, spacing=list(spacing))[0, 0].item()
    asd = SurfaceDistanceMetric(symmetric=True)(y, t, spacing=list(spacing))[0, 0].item()
    nsd = SurfaceDiceMetric([1.0])(y, t, spacing=list(spacing))[0, 0].item()
    assert row["hd95"] == pytest.approx(hd95, abs=1e-6) and row["asd"] == pytest.approx(asd, abs=1e-6)
    assert row["nsd"] == pytest.approx(nsd, abs=1e-6)


def test_web_mercator_distances_are_in_pixels_as_its_areas_are_refused(tmp_path):
    """At 52° N Web Mercator's metres are 1.6 ground metres: hectares were refused, HD95 still printed in 'm'."""
    rp, rt = raster_pair()
    origin = (1000000.0, 6800000.0)  # about 52° N
    report = evaluate_files([write_tif(tmp_path / "p.tif", rp, crs="EPSG:3857", origin=origin)],
                            [write_tif(tmp_path / "t.tif", rt, crs="EPSG:3857", origin=origin)])
    case = report["cases"][0]
    assert case["distance_unit"] == "px" and case["cell_size"] is None and "times the ground" in case["size_note"]
    utm = evaluate_files([write_tif(tmp_path / "p2.tif", rp)], [write_tif(tmp_path / "t2.tif", rt)])
    assert utm["cases"][0]["distance_unit"] == "m"
    one = {r["value"]: r for r in case["classes"]}[1]
    assert one["hd95"] == pytest.approx({r["value"]: r for r in utm["cases"][0]["classes"]}[1]["hd95"] / 10)


def test_a_class_too_large_for_one_distance_pass_gets_a_note_not_distances(tmp_path):
    """Distances need a class's whole box in memory (about 28 bytes a pixel): a road grid spanning an 8000² map
    peaked at 2.2 GB, and the peak grew with the map.  Over ``--distance-limit`` pixels the class keeps Dice and
    sizes, its distances are None and the note says why; under it nothing changes."""
    from segmentation.evaluation import DISTANCES_OVER_LIMIT

    rp, rt = raster_pair()
    pred, truth = write_tif(tmp_path / "p.tif", rp), write_tif(tmp_path / "t.tif", rt)
    full = {r["value"]: r for r in evaluate_files([pred], [truth])["cases"][0]["classes"]}
    scan = scan_labels(rp, rt, ignore=255, pred_nodata=255)
    big, small = (int(np.prod([b.stop - b.start for b in scan.box(v, rp.shape)])) for v in (1, 2))
    assert small < big  # the disc's box (grown by a pixel) is larger than the field's
    limited = evaluate_files([pred], [truth], distance_limit=big - 1)
    rows = {r["value"]: r for r in limited["cases"][0]["classes"]}
    assert rows[1]["hd95"] is None and rows[1]["asd"] is None and rows[1]["nsd"] is None
    assert rows[1]["note"].startswith(DISTANCES_OVER_LIMIT) and rows[1]["dice"] == full[1]["dice"]
    assert rows[2]["hd95"] == full[2]["hd95"] and full[1]["hd95"] is not None  # the small field still measured
    result = invoke(pred, "--truth", truth, "--out", tmp_path / "o", "--distance-limit", "-1")
    assert result.exit_code == 2 and "--distance-limit must be >= 0" in error_lines(result.output)[0]


# --------------------------------------------------------------------------- truths without CRS, partial runs


def write_plain_tif(path: Path, labels: np.ndarray, **geo) -> Path:
    """A label GeoTIFF with no CRS and, unless given, no geotransform: a mask saved by an image editor."""
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", width=labels.shape[1], height=labels.shape[0], count=1,
                           dtype="uint8", **geo) as dst:
            dst.write(labels, 1)
    return path


def test_a_truth_without_crs_or_transform_is_read_on_the_predictions_grid(tmp_path, recwarn):
    """Training takes a label raster without CRS or transform by its shape (storage.datasets.geolabels); scoring
    refused the same file ("EPSG:32633 vs no CRS").  It is now read on the prediction's grid, scores as the
    georeferenced truth does, and the case says so.  A truth with a CRS or transform of its own that differs,
    or another shape, is still refused; a prediction without CRS against a georeferenced truth too, in one line
    with no rasterio warning."""
    rp, rt = raster_pair()
    pred = write_tif(tmp_path / "p.tif", rp)
    want = evaluate_files([pred], [write_tif(tmp_path / "geo.tif", rt)])["cases"][0]
    got = evaluate_files([pred], [write_plain_tif(tmp_path / "plain.tif", rt)])["cases"][0]
    assert got["classes"] == want["classes"] and got["spacing"] == [10.0, 10.0] and got["distance_unit"] == "m"
    assert got["notes"] == ["the truth has no CRS or transform: read as on the prediction's grid, as training "
                            "reads it"]
    result = invoke(pred, "--truth", write_plain_tif(tmp_path / "small.tif", rt[:-1]), "--out", tmp_path / "o")
    assert result.exit_code == 1 and "shape (40, 52) vs (39, 52)" in error_lines(result.output)[0]
    placed = write_plain_tif(tmp_path / "placed.tif", rt, transform=from_origin(500000.0, 6000000.0, 10, 10))
    [line] = error_lines(invoke(pred, "--truth", placed, "--out", tmp_path / "o").output)
    assert "EPSG:32633 vs no CRS" in line
    recwarn.clear()
    result = invoke(write_plain_tif(tmp_path / "bare.tif", rp), "--truth", tmp_path / "geo.tif", "--out",
                    tmp_path / "o")
    [line] = error_lines(result.output)
    assert result.exit_code == 1 and "no CRS vs EPSG:32633" in line and not (tmp_path / "o").exists()
    assert not [w for w in recwarn if "georeferenced" in type(w.message).__name__.lower()], list(recwarn)


def test_pairs_that_cannot_be_scored_do_not_stop_the_others(tmp_path):
    """One missing truth or one shifted grid had left the whole run unscored (no report, exit 1).  Every pair that
    can be is now scored and reported; each other one is one error line, listed in the JSON and Markdown too,
    and the command exits 1."""
    pv, tv = volume_pair()
    good = write_nifti(tmp_path / "good.nii.gz", pv)
    shifted = write_nifti(tmp_path / "shifted.nii.gz", pv, shift=(0.0, 0.5, 0.0))
    t1, t2 = write_nifti(tmp_path / "t1.nii.gz", tv), write_nifti(tmp_path / "t2.nii.gz", tv)
    out = tmp_path / "report"
    result = invoke(good, shifted, "--truth", t1, "--truth", t2, "--out", out)
    assert result.exit_code == 1
    [line] = error_lines(result.output)
    assert str(shifted) in line and str(t2) in line and "affines differ" in line
    report = json.loads((out / "evaluation.json").read_text())
    assert [c["case"] for c in report["cases"]] == ["good"] and report["mean"] is not None
    assert report["cases"][0]["classes"] == evaluate_files([good], [t1])["cases"][0]["classes"]
    [unscored] = report["unscored"]
    assert unscored["prediction"] == str(shifted) and unscored["truth"] == str(t2)
    assert line == f"error: {unscored['error']}"
    assert {p.name for p in out.glob("*.csv")} == {"good.csv"}
    markdown = (out / "evaluation.md").read_text()
    assert "1 case(s), 1 not scored (listed below)" in markdown and "## Not scored" in markdown
    assert unscored["error"] in " ".join(markdown.split())

    # by folder: a prediction without a truth there, and one whose truth holds nothing to count
    truths = tmp_path / "truths"
    truths.mkdir()
    rp, rt = raster_pair()
    preds = [write_tif(tmp_path / n, rp) for n in ("a.tif", "b.tif", "c.tif")]
    write_tif(truths / "a.tif", rt)
    write_tif(truths / "c.tif", np.full(rt.shape, 255, np.uint8))
    result = invoke(*preds, "--truth", truths, "--out", out)
    assert result.exit_code == 1
    lines = error_lines(result.output)
    assert lines == [f"error: {preds[1]}: no truth named b.* in {truths}",
                     f"error: {truths / 'c.tif'}: every pixel is 255 (not counted): nothing to score {preds[2]} "
                     "against"]
    report = json.loads((out / "evaluation.json").read_text())
    assert [c["case"] for c in report["cases"]] == ["a"]
    assert [(u["case"], u["truth"]) for u in report["unscored"]] == [("b", None), ("c", str(truths / "c.tif"))]
    assert {p.name for p in out.glob("*.csv")} == {"a.csv"}  # good.csv went with the report that listed it

    # nothing scorable: no report at all
    result = invoke(preds[1], "--truth", truths, "--out", tmp_path / "none")
    assert result.exit_code == 1 and len(error_lines(result.output)) == 1 and not (tmp_path / "none").exists()


def test_a_report_that_cannot_be_written_whole_leaves_the_folder_as_it_was(tmp_path):
    """A CSV that could not be written (a folder in its place) had left evaluation.json and .md describing it.
    Every file is now written under a temporary name and renamed once all are: the folder keeps the run
    before's report, whole, and no temporary."""
    rp, rt = raster_pair()
    preds = [write_tif(tmp_path / "p.tif", rp), write_tif(tmp_path / "q.tif", rp)]
    truth = write_tif(tmp_path / "t.tif", rt)
    out = tmp_path / "report"
    assert invoke(preds[0], "--truth", truth, "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"evaluation.json", "evaluation.md", "p.csv"}
    (out / "q.csv").mkdir()
    result = invoke(*preds, "--truth", truth, "--truth", truth, "--out", out, "--tolerance", "25")  # new NSDs
    assert result.exit_code == 1
    [line] = error_lines(result.output)
    assert line == f"error: {out / 'q.csv'}: cannot write the evaluation: Is a directory"
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.json", "evaluation.md", "p.csv", "q.csv"]


def test_segment_scores_the_outputs_it_has_truths_for_read_as_training_reads_them(tmp_path):
    """``segment A B --truth DIR`` with a model trained on label rasters without CRS: the same files were refused
    as truths ("EPSG:32633 vs no CRS"), and B having no truth in DIR left A unscored too.  A is now scored
    (its note says how its truth was read), B is one error line, and the command exits 1."""
    from tests.medgeo_datasets import geo_raster_dataset

    root = tmp_path / "geo"
    geo_raster_dataset(root, stems=("tile_a", "tile_b", "tile_c"), values=(0, 1, 2), label_crs=False)
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"name": "tiny", "architecture": {"name": "unet", "kwargs": {
        "channels": [4, 8], "strides": [2], "num_res_units": 0}}, "input": {"spatial_dims": 2, "channels": 2},
        "classes": [{"value": 0, "name": "a"}, {"value": 1, "name": "b"}], "inference": {"roi": [16, 16]}}))
    runner = CliRunner()
    trained = runner.invoke(app, ["train", "--dataset", str(root), "--card", str(card), "--out",
                                  str(tmp_path / "model"), "--steps", "2", "--batch-size", "2", "--val-every", "2"])
    assert trained.exit_code == 0, trained.output
    truths = tmp_path / "truths"
    truths.mkdir()
    (truths / "tile_a.tif").write_bytes((root / "labels" / "tile_a.tif").read_bytes())
    out = tmp_path / "out"
    seg = runner.invoke(app, ["segment", *(str(root / "images" / f"{s}.tif") for s in ("tile_a", "tile_b")),
                              "--model", str(tmp_path / "model"), "--out", str(out), "--no-prefect",
                              "--truth", str(truths)])
    assert seg.exit_code == 1, seg.output
    [line] = error_lines(seg.output)
    assert line == f"error: scoring against {truths}: {out / 'tile_b.tif'}: no truth named tile_b.* in {truths}"
    report = json.loads((out / "evaluation" / "evaluation.json").read_text())
    [case] = report["cases"]
    assert case["case"] == "tile_a" and case["distance_unit"] == "m"
    assert "the truth has no CRS or transform" in case["notes"][-1]
    assert [u["case"] for u in report["unscored"]] == ["tile_b"]


def test_a_0_255_mask_as_truth_is_warned_on_the_terminal(tmp_path):
    """Its 255s are the default ignore value: the lesion scored "-" against 0 mL of truth, and only the report
    files said that every one of them was left out."""
    pred = np.zeros((40, 40), np.uint8)
    pred[10:20, 10:20] = 1
    truth = np.where(pred == 1, 255, 0).astype(np.uint8)
    p, t = write_tif(tmp_path / "pred.tif", pred), write_tif(tmp_path / "mask.tif", truth)
    result = invoke(p, "--truth", t, "--out", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    assert (f"warning: {t}: 100 truth pixels are the ignore value 255 and every other one is class 0: a 0/255 "
            "mask? Relabel it 0/1, or --ignore -1 to count 255 as a class") in " ".join(result.output.split())
    # a truth whose other classes are there too (ignored borders, as VOC draws them) is no such mask
    truth[0, :] = 255
    truth[10:20, 10:20] = 1
    result = invoke(p, "--truth", write_tif(tmp_path / "voc.tif", truth), "--out", tmp_path / "ev2")
    assert result.exit_code == 0 and "warning" not in result.output, result.output


def test_a_near_perfect_score_never_prints_as_perfect_and_a_mean_says_how_many_cases():
    """A probe: a Dice of 0.99998 printed "1"; a class's mean over 1 of 3 cases looked like a mean over all."""
    from flows.evalreport import METRICS, _md_table, fmt

    assert [fmt(x) for x in (0.99998, 1.0, 0.98765, 62.21, None, 3)] == ["0.9999", "1", "0.9877", "62.21", "-", "3"]
    row = {"value": 2, "name": "road", "cases": 1, **{m: 0.5 for m in METRICS}, "note": None}
    head, _, line = _md_table([row], "mm", "mL", 1.0, counted=True)
    assert head.startswith("| class | cases | Dice |") and line.startswith("| 2 road | 1 | 0.5 |")
