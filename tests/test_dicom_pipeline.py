"""A DICOM folder as radiology gives it, through `segflow segment`: one output set per series, bad ones alone.

The folder holds an oblique, descending CT series, an axial one at another
spacing (segmented in the model's space and brought back), a series with a
missing slice, one whose last slice file was cut short, one with a corrupt RLE
slice that makes the decoder panic, and files that are not images.  Each good series gets labels as
NIfTI on its own grid, a DICOM SEG that reads back to the same labels slice for
slice, label tables, per-label statistics and provenance naming its UIDs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from flows.cli import app
from storage.dicomseg import read_dicom_seg_labels
from storage.layout import open_image_store
from tests.dicom_samples import (DUMMY_PATIENT_ID, DUMMY_PATIENT_NAME, compress_series, corrupt_rle, truncate,
                                 write_bad_series, write_ct_series)
from tests.models import tiny_model


def body(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A smooth CT-like volume in raw units (HU + 1024)."""
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(1.0, 3.0, 3.0))
    return (1024 + 400 * x / np.abs(x).max()).astype(np.int16)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom")
    folder = root / "study"
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    write_ct_series(folder / "oblique", body((9, 30, 28), 1), spacing=(2.5, 0.8, 0.7), iop=(c, s, 0, -s, c, 0),
                    descending=True, series_number=4,
                    # longer than LO's 64 characters: pydicom warns as it reads it, which the command keeps quiet
                    series_description="AX oblique <1mm>/../x, soft-tissue kernel, for the follow-up of the lesion")
    write_ct_series(folder / "axial", body((7, 26, 24), 2), spacing=(3.0, 0.9, 0.9), series_number=5,
                    series_description="AX CT")
    write_bad_series(folder / "broken", "missing_slice")
    cut = write_ct_series(folder / "cut", body((4, 8, 8), 3), series_number=6)
    truncate(cut[-1])  # its last slice cut short: refused naming the file, never segmented without it
    rle = write_ct_series(folder / "rle", body((3, 8, 8), 4), series_number=7)
    compress_series(rle)
    corrupt_rle(rle[1])  # the RLE decoder panics on it: this input fails, the batch goes on
    (folder / "README.txt").write_text("not DICOM")
    model = tiny_model(root / "model", spatial_dims=3, channels=1, spacing=[2.0, 1.0, 1.0], spacing_unit="mm",
                       orientation="RAS")
    out = root / "out"
    env = {**os.environ, "PREFECT_HOME": os.environ["PREFECT_HOME"], "COLUMNS": "300"}
    proc = subprocess.run([sys.executable, "-m", "flows", "segment", str(folder), "--model", str(model.path),
                           "--out", str(out), "--workers", "1", "--chunk-size", "16"],
                          capture_output=True, text=True, env=env, timeout=600)
    return proc, out, folder


def _series_outputs(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("*.nii.gz") if not p.name.endswith(".model-space.nii.gz"))


def test_each_series_is_its_own_input_and_the_bad_one_fails_alone(run):
    proc, out, folder = run
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = sorted(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    assert len(errors) == 3 and all("[series " in e for e in errors), proc.stderr
    for problem in ("slice(s) missing", "IM0004.dcm is a CT Image Storage file without Rows and Columns",
                    "cannot decode the pixel data of IM0002.dcm"):
        assert sum(problem in e for e in errors) == 1, (problem, errors)
    assert "Traceback" not in proc.stdout + proc.stderr and "PanicException" not in proc.stdout + proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr  # no library warning above the command's own lines
    labels = _series_outputs(out)
    assert len(labels) == 2
    names = sorted(p.name for p in labels)
    assert names[0].startswith("series-4-") and names[1].startswith("series-5-")
    assert all(set(n) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") for n in names)
    assert not (out / ".segflow-work").exists()


def test_outputs_a_radiology_group_opens(run):
    proc, out, folder = run
    for nifti in _series_outputs(out):
        stem = nifti.name.removesuffix(".nii.gz")
        record = json.loads((out / f"{stem}.provenance.json").read_text())
        dicom = record["input"]["dicom"]
        img = nib.load(nifti)
        labels = np.asarray(img.dataobj)
        series_dir = folder / ("oblique" if stem.startswith("series-4") else "axial")
        first = pydicom.dcmread(next(series_dir.glob("*.dcm")))
        # the labels lie on the series' own grid: columns x rows x slices
        assert labels.shape == (first.Columns, first.Rows, len(list(series_dir.glob("*.dcm"))))
        assert dicom["series_instance_uid"] == first.SeriesInstanceUID
        assert dicom["deidentification"] == {"patient_name_present": True, "patient_id_present": True}
        # the SEG references the series and reads back to the NIfTI labels, slice k = instance k
        seg = pydicom.dcmread(out / f"{stem}.seg.dcm")
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
        assert seg.SeriesInstanceUID != first.SeriesInstanceUID
        store_geometry = _geometry_from(record, labels)
        back = read_dicom_seg_labels(out / f"{stem}.seg.dcm", store_geometry)
        assert np.array_equal(back, labels.transpose(2, 1, 0))
        assert len(np.unique(labels)) >= 2
        from flows.inspect import describe  # `segflow info` of the SEG (it had been "not a segflow artefact")

        info = describe(out / f"{stem}.seg.dcm")
        assert info["type"] == "DICOM SEG" and info["referenced_series"] == [first.SeriesInstanceUID]
        assert [s["label"] for s in info["segments"]] == [str(s.SegmentLabel) for s in seg.SegmentSequence]
        assert info["provenance_sidecar"] == str(out / f"{stem}.provenance.json")
        # statistics agree with the label map; tables name the classes
        stats = json.loads((out / f"{stem}.statistics.json").read_text())
        counts = np.bincount(labels.ravel(), minlength=3)
        assert [stats["classes"][f"class{v}"]["voxels"] for v in range(3)] == counts.tolist()
        assert stats["unit"] == "HU"
        assert record["statistics"]["label_statistics"]["classes"]["class1"]["voxels"] == counts[1]
        assert "class2" in (out / f"{stem}.ctbl").read_text() and "class2" in (out / f"{stem}.itksnap.txt").read_text()
        for path in out.glob(f"{stem}*"):
            if path.is_file():
                data = path.read_bytes()
                assert DUMMY_PATIENT_ID.encode() not in data or path.suffix == ".dcm", path
                assert DUMMY_PATIENT_NAME.encode() not in data or path.suffix == ".dcm", path
    oblique = next(p for p in _series_outputs(out) if p.name.startswith("series-4"))
    record = json.loads((out / oblique.name.replace(".nii.gz", ".provenance.json")).read_text())
    # 0.7 x 0.8 x 2.5 mm was taken to the model's 1 x 1 x 2 mm, and the mapping recorded
    mapping = record["parameters"]["resampling"]["mapping"]
    assert mapping["model"]["shape_kji"] != mapping["input"]["shape_kji"]
    axial = next(p for p in _series_outputs(out) if p.name.startswith("series-5"))
    record = json.loads((out / axial.name.replace(".nii.gz", ".provenance.json")).read_text())
    assert "resampling" in record["parameters"] and "model_space" in record["statistics"]


def _geometry_from(record: dict, labels: np.ndarray):
    """The VolumeGeometry the SEG reader needs, as ingest made it (re-ingested from the recorded files)."""
    from storage.dicom import find_series, ingest_dicom

    [ref] = [r for r in find_series([record["input"]["path"]])
             if r.series_instance_uid == record["input"]["dicom"]["series_instance_uid"]]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        store = ingest_dicom(ref, Path(tmp) / "s.zarr")
        return open_image_store(store.path).meta.geometry


def test_verify_checks_every_file_of_the_series(run):
    proc, out, folder = run
    nifti = next(p for p in _series_outputs(out) if p.name.startswith("series-5"))
    result = CliRunner().invoke(app, ["verify", str(nifti)])
    assert result.exit_code == 0, result.output
    victim = sorted((folder / "axial").glob("*.dcm"))[2]
    original = victim.read_bytes()
    try:
        victim.write_bytes(original[:-2] + b"\x00\x01")
        result = CliRunner().invoke(app, ["verify", str(nifti)])
        assert result.exit_code != 0 and victim.name in result.output
        # a slice deleted from a series whose other files are here is a mismatch (it was "unverified", exit 0)
        victim.unlink()
        result = CliRunner().invoke(app, ["verify", str(nifti)])
        assert result.exit_code == 1 and "is missing, while the input's other files are here" in \
            " ".join(result.output.split()), result.output
    finally:
        victim.write_bytes(original)
    # a slice of the series added to its folder after the run: every recorded file still matched, and verify
    # passed while a rerun gave a volume one slice taller
    import pydicom
    from pydicom.uid import generate_uid

    added = folder / "axial" / "zz_added.dcm"
    ds = pydicom.dcmread(victim)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(added)
    try:
        result = CliRunner().invoke(app, ["verify", str(nifti)])
        assert result.exit_code == 1 and "has 1 file(s) of it that the record does not list (axial/zz_added.dcm)" \
            in " ".join(result.output.split()), result.output
    finally:
        added.unlink()
    # ...and in a folder below the one segmented, which a rerun searches too (verify had looked only beside the
    # recorded files, and passed)
    deeper = folder / "axial" / "later" / "zz_deeper.dcm"
    deeper.parent.mkdir()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(deeper)
    try:
        result = CliRunner().invoke(app, ["verify", str(nifti)])
        assert result.exit_code == 1 and "has 1 file(s) of it that the record does not list " \
            "(axial/later/zz_deeper.dcm)" in " ".join(result.output.split()), result.output
    finally:
        deeper.unlink()
        deeper.parent.rmdir()
    assert CliRunner().invoke(app, ["verify", str(nifti)]).exit_code == 0


def test_a_real_series_through_ingest_segment_and_export(tmp_path, dask_cluster):
    """pydicom's CT5N (5 slices, descending z): labels on dcm2niix's grid, SEG slice k = NIfTI slice k."""
    from flows.config import SegmentOptions
    from flows.pipeline import segment_one
    from storage.dicom import find_series
    from tests.conftest import shared
    from tests.test_dicom import _dcm2niix

    folder = shared("dicom/CT5N")
    result = CliRunner().invoke(app, ["ingest", str(folder), "--out", str(tmp_path / "stores")])
    assert result.exit_code == 0, result.output
    [store_path] = list((tmp_path / "stores").glob("*.zarr"))
    assert open_image_store(store_path).meta.geometry.dicom is not None
    [ref] = find_series([folder])
    model = tiny_model(tmp_path / "model", spatial_dims=3, channels=1, roi=[8, 8, 8],
                       normalization={"mode": "scale", "offset": [0.0], "scale": [0.01]})
    outcome = segment_one(ref, model, tmp_path / "out", SegmentOptions(chunk_size=8, dicom_seg="labelmap"),
                          dask_cluster)
    assert outcome.ok and outcome.input == ref.display
    labels_path = tmp_path / "out" / f"{ref.name}.nii.gz"
    img = nib.load(labels_path)
    [reference] = _dcm2niix(folder, tmp_path / "dcm2niix")
    ref_img = nib.load(reference)
    canonical = nib.as_closest_canonical(img)
    assert np.allclose(canonical.affine, nib.as_closest_canonical(ref_img).affine, atol=1e-3)
    assert canonical.shape == nib.as_closest_canonical(ref_img).shape[:3]
    geometry = open_image_store(store_path).meta.geometry
    back = read_dicom_seg_labels(tmp_path / "out" / f"{ref.name}.seg.dcm", geometry)
    assert np.array_equal(back, np.asarray(img.dataobj).transpose(2, 1, 0))
    assert pydicom.dcmread(tmp_path / "out" / f"{ref.name}.seg.dcm").SegmentationType == "LABELMAP"


def test_each_series_seg_scores_as_the_truth_of_its_own_labels(run, tmp_path):
    """A DICOM SEG as the truth (radiology groups keep their annotations so): it had been refused as "no truth
    named" by folder.  Its frames cover only the annotated slices, in LPS, here of an oblique descending series:
    placed on the prediction's voxel grid, segflow's own SEG scores Dice 1 against the labels it was written
    from, its segments taking the classes' values by name; another series' SEG is refused as off the grid."""
    from contextlib import ExitStack

    from flows.evaluate import evaluate_files
    from storage.errors import IncompatibleInputError
    from storage.labelmaps import open_labels
    from storage.segtruth import open_seg_truth

    _, out, _ = run
    outputs = _series_outputs(out)
    assert len(outputs) == 2
    for nifti in outputs:
        seg = out / nifti.name.replace(".nii.gz", ".seg.dcm")
        [case] = evaluate_files([nifti], [seg])["cases"]
        scored = [row for row in case["classes"] if row["dice"] is not None]
        assert scored and all(row["dice"] == 1.0 for row in scored), case["classes"]
        assert case["warnings"] == []
        with ExitStack() as stack:
            pred = open_labels(nifti, stack)
            truth, note = open_seg_truth(seg, pred)
            assert note is None and np.array_equal(np.asarray(truth.array), np.asarray(pred.array[...]))
    with ExitStack() as stack, pytest.raises(IncompatibleInputError, match="is not on the voxel grid of"):
        open_seg_truth(out / outputs[1].name.replace(".nii.gz", ".seg.dcm"), open_labels(outputs[0], stack))
    # another study's SEG on a grid that happens to agree: scored, but no longer without a word
    other = pydicom.dcmread(out / outputs[0].name.replace(".nii.gz", ".seg.dcm"))
    other.ReferencedSeriesSequence[0].SeriesInstanceUID = "1.2.3.4"
    foreign = tmp_path / "foreign.seg.dcm"
    other.save_as(foreign)
    [case] = evaluate_files([outputs[0]], [foreign])["cases"]
    made_from = pydicom.dcmread(out / outputs[0].name.replace(".nii.gz", ".seg.dcm")).ReferencedSeriesSequence[0]
    assert case["warnings"] == [f"{foreign}: the DICOM SEG references series 1.2.3.4, the prediction was made from "
                                f"series {made_from.SeriesInstanceUID}: another scan's annotation?"]
