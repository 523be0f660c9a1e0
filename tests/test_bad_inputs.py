"""The bad-input corpus (tests/corpus.py plus ../shared/data/bad) through real batch runs.

Few batches keep this bounded: every 2D case through one ``segflow segment``
process (exit code, one stderr line per failed input), every 3D case through
one in-process ``segment-batch`` flow run on the test Dask cluster, every DICOM
folder case through one in-process ``segflow segment`` (CliRunner), and each
DICOM file given alone in a batch of its own (loose files named together would
be grouped into one set of series).  For each case: a one-line error naming the
file, folder or series and the problem, a failed batch, no partial output, and
the good input of the same batch still segmented.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio

from typer.testing import CliRunner

from flows.config import SegmentOptions
from flows.flows import batch_outcomes, segment_batch
from flows.inputs import OUTPUT_SUFFIXES
from storage.errors import ModelError
from tests import corpus
from tests.conftest import SHARED_DATA, shared
from tests.models import tiny_model

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
SHARED_ALL = sorted((SHARED_DATA / "bad").iterdir()) if (SHARED_DATA / "bad").is_dir() else []
SHARED_BAD = [p for p in SHARED_ALL if p.name not in corpus.SHARED_DICOM]  # the DICOM ones: test_dicom_* below


def _good(model: str) -> corpus.Case:
    return corpus.Case("good", "the batch's good input", model, corpus.GOOD[model], ok=True)


def _make_all(root: Path, cases: list[corpus.Case]) -> dict[str, Path]:
    made = {}
    for case in cases:
        folder = root / case.id
        folder.mkdir(parents=True)
        made[case.id] = case.make(folder)
    return made


def _check_outcomes(outcomes: dict[str, dict], cases: list[corpus.Case], paths: dict[str, Path],
                    out: Path) -> None:
    expected_files: set[str] = set()
    for case in cases:
        o = outcomes[str(paths[case.id])]
        if case.ok:
            assert o["ok"], (case.id, o["error"])
            expected_files |= {Path(p).name for p in o["outputs"]}
            continue
        assert not o["ok"], case.id
        error = o["error"]
        assert "\n" not in error, (case.id, error)
        assert error.startswith(f"{paths[case.id]}: "), (case.id, error)  # names the file first
        assert case.expect in error, (case.id, error)
    # every output is named <stem> + one of the suffixes flows.inputs.overwritten_input guards the inputs against
    assert all(name.endswith(OUTPUT_SUFFIXES) for name in expected_files), sorted(expected_files)
    left = {p.name for p in out.iterdir()} if out.exists() else set()
    if "reports" in left:  # the CLI's run report (OUT/reports/segment-*.json|html), written when an input succeeded
        assert expected_files and all(p.name.startswith("segment-") for p in (out / "reports").iterdir())
        left.discard("reports")
    assert left == expected_files, sorted(left ^ expected_files)  # nothing partial, nothing hidden


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus-models")
    return {"2d": tiny_model(root / "m2d", spatial_dims=2, channels=4, roi=[32, 32]),
            "3d": tiny_model(root / "m3d", spatial_dims=3, channels=1, roi=[16, 16, 16])}


@pytest.fixture(scope="module")
def batch_2d(models, tmp_path_factory):
    """Every 2D case (and ../shared/data/bad when present) in one `segflow segment` process."""
    root = tmp_path_factory.mktemp("corpus-2d")
    cases = [c for c in corpus.INPUT_CASES if c.model == "2d"]
    paths = _make_all(root / "in", cases)
    good = corpus.GOOD["2d"](root / "in")
    inputs = [str(good)] + [str(paths[c.id]) for c in cases] + [str(p) for p in SHARED_BAD]
    out, report = root / "out", root / "report.json"
    env = {**os.environ, "COLUMNS": "250"}
    proc = subprocess.run([sys.executable, "-m", "flows", "segment", *inputs, "--model", str(models["2d"].path),
                           "--out", str(out), "--chunk-size", "48", "--report", str(report)],
                          check=False, capture_output=True, text=True, env=env, timeout=400)
    outcomes = {o["input"]: o for o in json.loads(report.read_text())}
    return {"proc": proc, "cases": cases, "paths": paths, "good": good, "out": out, "outcomes": outcomes}


def test_2d_corpus_one_line_errors_non_zero_exit_nothing_partial(batch_2d):
    proc, outcomes = batch_2d["proc"], batch_2d["outcomes"]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert outcomes[str(batch_2d["good"])]["ok"]  # the good input of the batch still completes
    _check_outcomes(outcomes, batch_2d["cases"] + [_good("2d")], {**batch_2d["paths"], "good": batch_2d["good"]},
                    batch_2d["out"])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    failed = [c for c in batch_2d["cases"] if not c.ok]
    assert len(errors) == len(failed) + len(SHARED_BAD), proc.stderr[-3000:]
    for case in failed:
        path = str(batch_2d["paths"][case.id])
        assert any(line.startswith(f"error: {path}: ") and case.expect in line for line in errors), (case.id, errors)


def test_2d_corpus_inputs_that_must_succeed(batch_2d):
    out, outcomes, paths = batch_2d["out"], batch_2d["outcomes"], batch_2d["paths"]
    # NaN/Inf pixels count as no data: they get the nodata label, the rest is segmented
    with rasterio.open(out / "nan_inf.tif") as ds:
        labels = ds.read(1)
        assert ds.nodata == 255
    assert np.all(labels[10:20, 10:20] == 255) and np.all(labels[40:44, 50:60] == 255) and labels[70, 70] == 255
    assert np.all(labels[50:60, 10:20] < 3)
    # ... and take no part in the image statistics the network's input is normalised by (NaN times a 0 weight
    # had made them NaN, and the whole image 0 for the network)
    facts = outcomes[str(paths["nan-inf-pixels"])]["statistics"]["normalization"]
    with rasterio.open(paths["nan-inf-pixels"]) as src:
        pixels = src.read().astype(np.float64)
    valid = np.isfinite(pixels).all(axis=0)
    assert facts["shift"] == pytest.approx([pixels[c][valid].mean() for c in range(4)], rel=1e-9)
    assert facts["factor"] == pytest.approx([1 / pixels[c][valid].std() for c in range(4)], rel=1e-6)
    # no CRS: segmented on the same grid, without a CRS, and the run says so
    with rasterio.open(out / "no_crs.tif") as ds, rasterio.open(paths["no-crs"]) as src:
        assert ds.crs is None and ds.transform == src.transform
    warnings = outcomes[str(paths["no-crs"])]["statistics"]["warnings"]
    assert len(warnings) == 1 and "has no CRS" in warnings[0]
    assert "has no CRS" in batch_2d["proc"].stderr
    # ... in its own words only: no library warning (rasterio's NotGeoreferencedWarning) beside it
    assert "Warning" not in batch_2d["proc"].stderr, batch_2d["proc"].stderr[-3000:]
    # spaces and non-ASCII characters in the path
    assert (out / "in put é ü 北.tif").is_file() and (out / "in put é ü 北.provenance.json").is_file()


def test_shared_bad_files_are_in_the_corpus(batch_2d):
    bad = shared("bad")
    assert set(corpus.SHARED_DICOM) <= {p.name for p in bad.iterdir()}
    for path in sorted(p for p in bad.iterdir() if p.name not in corpus.SHARED_DICOM):
        o = batch_2d["outcomes"][str(path)]
        assert not o["ok"] and o["error"].startswith(f"{path}: ") and "\n" not in o["error"], o


def test_3d_corpus_in_one_batch_flow_run(models, tmp_path, dask_cluster):
    cases = [c for c in corpus.INPUT_CASES if c.model == "3d"]
    paths = _make_all(tmp_path / "in", cases)
    good = corpus.GOOD["3d"](tmp_path / "in")
    out = tmp_path / "out"
    inputs = [str(paths[c.id]) for c in cases[:5]] + [str(good)] + [str(paths[c.id]) for c in cases[5:]]
    state = segment_batch(inputs=inputs, model_dir=str(models["3d"].path), out_dir=str(out),
                          options=SegmentOptions(chunk_size=16), return_state=True)
    assert state.is_failed()
    outcomes = {o["input"]: o for o in batch_outcomes(state)}
    assert outcomes[str(good)]["ok"], outcomes[str(good)]
    _check_outcomes(outcomes, cases + [_good("3d")], {**paths, "good": good}, out)


def test_nibabel_header_notes_stay_off_the_terminal(models, tmp_path):
    """nibabel logs "pixdim[1,2,3] should be non-zero; setting 0 dims to 1" to stderr, before segflow's lines, from
    the header check and again from the worker; segflow checks what it matters for (zero-voxel-size) itself."""
    unknown, fine = corpus.zero_voxel_size(tmp_path), corpus.zero_pixdim_with_sform(tmp_path)
    low = tmp_path / "low_offset.nii"  # nibabel logged "vox offset -4096 too low ..." at ERROR, then raised
    low.write_bytes(corpus._nifti_header_bytes((8, 8, 8)) + b"\0" * 1024)
    with open(low, "r+b") as f:
        f.seek(108)  # vox_offset, a float32
        f.write(np.float32(-4096).tobytes())
    proc = subprocess.run([sys.executable, "-m", "flows", "segment", str(low), "--model", str(models["3d"].path),
                           "--out", str(tmp_path / "low")], check=False, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "250"}, timeout=300)
    assert proc.stderr.splitlines() == [f"error: {low}: cannot read the NIfTI header: vox offset -4096 too low for "
                                        "single file nifti1"], proc.stderr
    proc = subprocess.run([sys.executable, "-m", "flows", "segment", str(unknown), str(fine), "--model",
                           str(models["3d"].path), "--out", str(tmp_path / "out"), "--workers", "1"], check=False,
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "250"}, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "pixdim[1,2,3]" not in proc.stderr, proc.stderr
    [error] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: {unknown}: has a voxel size of 0"), error
    assert (tmp_path / "out" / "zero_pixdim_sform.nii.gz").is_file()
    truth = tmp_path / "truth" / unknown.name  # a copy: a file is never its own truth (flows.pairing)
    truth.parent.mkdir()
    truth.write_bytes(unknown.read_bytes())
    scored = subprocess.run([sys.executable, "-m", "flows", "evaluate", str(unknown), "--truth", str(truth),
                             "--out", str(tmp_path / "ev")], check=False, capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "250"}, timeout=120)
    assert scored.returncode == 1, scored.stderr
    assert scored.stderr.startswith(f"error: {unknown}: has a voxel size of 0"), scored.stderr


def test_bad_models_fail_the_batch_before_any_input(models, tmp_path, dask_cluster):
    good = corpus.GOOD["2d"](tmp_path / "in")
    for case in corpus.MODEL_CASES:
        folder = tmp_path / case.id
        folder.mkdir()
        model_dir = case.make(folder)
        out = tmp_path / f"out-{case.id}"
        state = segment_batch(inputs=[str(good)], model_dir=str(model_dir), out_dir=str(out),
                              options=SegmentOptions(chunk_size=48), return_state=True)
        assert state.is_failed(), case.id
        with pytest.raises(ModelError) as err:
            batch_outcomes(state)
        message = str(err.value)
        assert "\n" not in message and case.expect in message, (case.id, message)
        assert message.startswith(str(model_dir)), (case.id, message)  # names the model's file or folder
        assert not out.exists(), case.id
        assert not (folder / corpus.PAYLOAD_MARKER).exists()  # the pickle's code never ran


def test_bad_model_cli_exit_code(tmp_path):
    model_dir = corpus.unknown_architecture(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "flows", "segment", str(tmp_path / "x.tif"), "--model",
                           str(model_dir), "--out", str(tmp_path / "out")], check=False, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "250"}, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(model_dir) in lines[0] and "unknown architecture 'resnet9000'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_errors_doc_lists_every_case():
    text = DOCS.read_text()
    missing = [case_id for case_id in corpus.all_ids() if f"`{case_id}`" not in text]
    assert not missing, f"docs/errors.md does not list {missing}"
    assert len(corpus.all_ids()) >= 25


# --------------------------------------------------------------------------- DICOM


def _dicom_label(case: corpus.Case, path: Path, outcomes: dict[str, dict]) -> str:
    """How segflow names the case: a series by ``FOLDER [series UID]``, a folder or a lone file by its path."""
    if case.given != "series":
        return str(path)
    [label] = [k for k in outcomes if k.startswith(f"{path} [series ")]
    return label


def _check_dicom(outcomes: dict[str, dict], cases: list[corpus.Case], paths: dict[str, Path], good: Path,
                 out: Path) -> None:
    [good_label] = [k for k in outcomes if k.startswith(f"{good} [series ")]
    assert outcomes[good_label]["ok"], outcomes[good_label]  # the batch's good series still completes
    for case in cases:
        label = _dicom_label(case, paths[case.id], outcomes)
        o = outcomes[label]
        assert not o["ok"], case.id
        assert o["error"].startswith(f"{label}: ") and "\n" not in o["error"], (case.id, o["error"])
        assert case.expect in o["error"], (case.id, o["error"])
    assert len(outcomes) == len(cases) + 1, sorted(outcomes)
    left = {p.name for p in out.iterdir()} - {"reports"}  # the run's report, written when one input succeeded
    assert left == {Path(p).name for p in outcomes[good_label]["outputs"]}, sorted(left)  # nothing partial


def _segment_cli(inputs: list[Path], model: Path, out: Path, report: Path,
                 client: Any) -> tuple[int, list[str], dict]:
    """`segflow segment` in this process, on the test cluster (--dask-address: no second cluster to start)."""
    from flows.cli import app

    res = CliRunner().invoke(app, ["segment", *map(str, inputs), "--model", str(model), "--out", str(out),
                                   "--chunk-size", "16", "--report", str(report),
                                   "--dask-address", client.scheduler.address], env={"COLUMNS": "400"})
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    return res.exit_code, errors, {o["input"]: o for o in json.loads(report.read_text())}


def test_dicom_folder_cases_in_one_segment_run(models, tmp_path, dask_cluster):
    cases = [c for c in corpus.DICOM_CASES if c.given != "file"]
    paths = _make_all(tmp_path / "in", cases)
    good = corpus.GOOD["dicom"](tmp_path / "in")
    out = tmp_path / "out"
    inputs = [paths[c.id] for c in cases[:4]] + [good] + [paths[c.id] for c in cases[4:]]
    code, errors, outcomes = _segment_cli(inputs, models["3d"].path, out, tmp_path / "report.json", dask_cluster)
    assert code == 1, errors
    _check_dicom(outcomes, cases, paths, good, out)
    assert len(errors) == len(cases)
    for case in cases:
        label = _dicom_label(case, paths[case.id], outcomes)
        assert any(line.startswith(f"error: {label}: ") and case.expect in line for line in errors), (case.id, errors)


def test_dicom_files_given_alone_each_in_its_own_batch(models, tmp_path, dask_cluster):
    """SR and SEG objects alone, and the real truncated DICOM files (read as DICOM now, no longer refused by name)."""
    cases = [c for c in corpus.DICOM_CASES if c.given == "file"]
    paths = _make_all(tmp_path / "in", cases)
    good = corpus.GOOD["dicom"](tmp_path / "in")
    for case in cases:
        out = tmp_path / f"out-{case.id}"
        state = segment_batch(inputs=[str(good), str(paths[case.id])], model_dir=str(models["3d"].path),
                              out_dir=str(out), options=SegmentOptions(chunk_size=16), return_state=True)
        assert state.is_failed(), case.id
        _check_dicom({o["input"]: o for o in batch_outcomes(state)}, [case], paths, good, out)


def test_real_truncated_dicom_files_fail_with_one_line(models, tmp_path, dask_cluster):
    good = corpus.GOOD["dicom"](tmp_path / "in")
    for name, expect in corpus.SHARED_DICOM.items():
        path = shared(f"bad/{name}")
        out = tmp_path / f"out-{name}"
        state = segment_batch(inputs=[str(good), str(path)], model_dir=str(models["3d"].path), out_dir=str(out),
                              options=SegmentOptions(chunk_size=16), return_state=True)
        assert state.is_failed(), name
        outcomes = {o["input"]: o for o in batch_outcomes(state)}
        # a file given alone is a series of its own: named by the file and its series UID
        [label] = [k for k in outcomes if k.startswith(f"{path} [series ")]
        case = corpus.Case(name, "real truncated DICOM", "3d", lambda folder: path, expect, given="series")
        assert outcomes[label]["error"].startswith(f"{label}: ") and expect in outcomes[label]["error"]
        _check_dicom(outcomes, [case], {name: path}, good, out)
