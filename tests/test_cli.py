"""The `segflow` command as a user runs it: exit codes, one-line errors, verify, info, train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": os.environ["PREFECT_HOME"], "COLUMNS": "200"}
    return subprocess.run([*SEGFLOW, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


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
    assert sorted(p.name for p in out.iterdir()) == ["in put é.provenance.json", "in put é.stac.json",
                                                      "in put é.tif", "in put é.zarr"]

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


def test_bad_option_and_bad_model_are_one_line_errors(model2d, tmp_path):
    proc = run("segment", tmp_path / "x.tif", "--model", tmp_path / "nope", "--out", tmp_path / "o")
    assert proc.returncode == 2
    assert len(error_lines(proc.stderr)) == 1 and "nope" in proc.stderr
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
    from storage.hashing import sha256_file

    assert inspected["weights_sha256"] == sha256_file(tmp_path / "model" / "weights.safetensors")


def test_ingest_command(tmp_path):
    src = shared("nifti/standard.nii.gz")
    proc = run("ingest", src, "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(run("info", tmp_path / "standard.zarr").stdout)
    assert info["arrays"]["image"]["shape"] == [1, 7, 5, 4]
    assert info["attributes"]["segflow"]["geometry"]["sform_code"] == 2
