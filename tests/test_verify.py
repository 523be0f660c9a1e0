"""`segflow verify`: every hash the provenance names is recomputed; tampering and missing pieces fail.

An input or weights file that cannot be reached is reported as unverified but
is not a failure (outputs are often copied away from their inputs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.config import SegmentOptions
from flows.pipeline import segment_one
from segmentation import load_model
from segmentation.card import ModelCard
from storage.provenance import embedded, read_embedded, verify
from storage.samples import make_phantom, make_scene
from tests.models import tiny_model


def _flip_one_byte(path: Path, at: int = -1) -> None:
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0x01
    path.write_bytes(bytes(blob))


def _cli_verify(target: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows", "verify", str(target)], check=False, capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "250"}, timeout=120)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, dask_cluster):
    root = tmp_path_factory.mktemp("verify")
    model = tiny_model(root / "model", spatial_dims=2, channels=4, roi=[32, 32])
    (root / "in").mkdir()
    image, truth = make_scene(root / "in" / "scene.tif", size=(80, 72), seed=2)
    truth.unlink()
    segment_one(image, load_model(model.path), root / "out", SegmentOptions(chunk_size=48), dask_cluster)
    model3 = tiny_model(root / "model3", spatial_dims=3, channels=1, roi=[16, 16, 16])
    volume, vtruth = make_phantom(root / "in" / "head.nii.gz", shape=(24, 20, 16), seed=1)
    vtruth.unlink()
    segment_one(volume, load_model(model3.path), root / "out", SegmentOptions(chunk_size=16), dask_cluster)
    return {"root": root, "out": root / "out", "image": image, "volume": volume, "model": model.path}


@pytest.fixture
def copy(outputs, tmp_path, dask_cluster):
    """A fresh raster output of this test's own, with its own input and model, to tamper with."""
    root = tmp_path / "c"
    (root / "in").mkdir(parents=True)
    shutil.copyfile(outputs["image"], root / "in" / "scene.tif")
    shutil.copytree(outputs["model"], root / "model")
    segment_one(root / "in" / "scene.tif", load_model(root / "model"), root / "out", SegmentOptions(chunk_size=48),
                dask_cluster)
    return {"root": root, "out": root / "out", "tif": root / "out" / "scene.tif",
            "sidecar": root / "out" / "scene.provenance.json", "weights": root / "model" / "weights.safetensors",
            "image": root / "in" / "scene.tif"}


def test_untouched_outputs_verify_including_their_embedded_provenance(outputs):
    for stem in ("scene", "head"):
        report = verify(outputs["out"] / f"{stem}.provenance.json")
        assert report.ok and not report.unverified, report
        # label file, zarr store, input, weights, card; a raster also its STAC item and QGIS style, a volume its
        # statistics and tables
        assert len(report.verified) == (7 if stem == "scene" else 8), report.verified
        record = json.loads((outputs["out"] / f"{stem}.provenance.json").read_text())
        for name in record["outputs"]:
            if name.endswith((".tif", ".nii.gz", ".zarr")):  # statistics and label tables carry no provenance
                assert read_embedded(outputs["out"] / name) == embedded(record)


def test_a_volumes_statistics_edited_in_its_sidecar_fail(outputs, tmp_path):
    """The label statistics (mL per class) are not embedded in the NIfTI, and an edited volume in the sidecar had
    verified; they are compared with the statistics file written from the same table, whose hash is recorded."""
    out = tmp_path / "out"
    shutil.copytree(outputs["out"], out)
    sidecar = out / "head.provenance.json"
    record = json.loads(sidecar.read_text())
    classes = record["statistics"]["label_statistics"]["classes"]
    name = next(iter(classes))
    classes[name]["volume_ml"] = 99.0
    sidecar.write_text(json.dumps(record, indent=2, sort_keys=True))
    report = verify(sidecar)
    assert report.problems == [f"head.provenance.json's statistics.label_statistics differ from "
                               f"{out / 'head.statistics.json'}, which its recorded hash vouches for"]


def test_one_changed_byte_of_an_output_fails_and_says_which(copy):
    _flip_one_byte(copy["tif"])
    report = verify(copy["sidecar"])
    [problem] = report.problems
    assert problem.startswith(f"output {copy['tif']} changed: sha256 is ") and "provenance records" in problem
    proc = _cli_verify(copy["tif"])
    assert proc.returncode == 1 and f"mismatch: output {copy['tif']} changed" in proc.stderr


def test_one_changed_byte_of_the_weights_fails_and_says_which(copy):
    _flip_one_byte(copy["weights"], at=len(copy["weights"].read_bytes()) // 2)
    [problem] = verify(copy["sidecar"]).problems
    assert problem.startswith(f"model weights {copy['weights']} changed: sha256 is ")


def test_an_edited_model_card_fails_and_says_which(copy):
    """The same weights behind an edited card (another normalisation) label otherwise: verify passed it, and a
    nightly run adopted the earlier outputs as this model's."""
    card = copy["root"] / "model" / "card.json"
    doc = json.loads(card.read_text())
    doc["input"]["normalization"]["mode"] = "none"
    card.write_text(json.dumps(doc))
    [problem] = verify(copy["sidecar"]).problems
    assert problem.startswith(f"model card {card.resolve()} changed: sha256 is "), problem
    record = json.loads(copy["sidecar"].read_text())
    assert record["model"]["card_sha256"] != ModelCard.model_validate(doc).shaping_sha256()


def test_changed_input_and_missing_store_fail(copy):
    _flip_one_byte(copy["image"], at=len(copy["image"].read_bytes()) // 2)
    shutil.rmtree(copy["out"] / "scene.zarr")
    problems = verify(copy["sidecar"]).problems
    assert problems == [f"output {copy['out'] / 'scene.zarr'} is missing",
                        problems[1]] and problems[1].startswith(f"input {copy['image']} changed: sha256 is ")


def test_a_sidecar_edited_to_name_other_parameters_no_longer_matches_its_outputs(copy):
    record = json.loads(copy["sidecar"].read_text())
    record["parameters"]["overlap"] = 0.5
    copy["sidecar"].write_text(json.dumps(record))
    problems = verify(copy["sidecar"]).problems
    assert len(problems) == 2 and all("embeds provenance that differs" in p and p.endswith("in: parameters")
                                      for p in problems)


def test_a_sidecar_edited_to_name_files_elsewhere_fails_without_reading_them(copy):
    """Output names are plain names beside the sidecar: a path there is an edited record, and verify read any file
    it named (a FIFO would have blocked it)."""
    import os

    fifo = copy["root"] / "pipe"
    os.mkfifo(fifo)
    record = json.loads(copy["sidecar"].read_text())
    record["outputs"] = {**record["outputs"], "../pipe": "0" * 64, str(fifo): "0" * 64}
    copy["sidecar"].write_text(json.dumps(record))
    problems = verify(copy["sidecar"]).problems
    assert problems == [f"{copy['sidecar']} names an output outside its folder: '../pipe'",
                        f"{copy['sidecar']} names an output outside its folder: {str(fifo)!r}"]


def test_unreachable_input_is_reported_but_is_not_a_failure(copy):
    copy["image"].unlink()
    report = verify(copy["sidecar"])
    assert report.ok and len(report.unverified) == 1
    assert report.unverified[0].startswith(f"input {copy['image']} is not reachable; its sha256 ")
    proc = _cli_verify(copy["sidecar"])
    assert proc.returncode == 0 and "unverified: input" in proc.stderr and "verified" in proc.stderr


def test_missing_or_broken_provenance_and_a_folder_are_one_line_errors(copy, tmp_path):
    sidecar = copy["sidecar"]
    sidecar.write_text('{"schema":')
    proc = _cli_verify(copy["tif"])
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {sidecar}: unreadable provenance (not JSON: ")
    sidecar.unlink()
    proc = _cli_verify(copy["tif"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {copy['tif']}: no provenance beside it records it (scene.provenance.json "
                                   "is absent, and no other .provenance.json there lists it)")
    gone = tmp_path / "gone.tif"  # neither the output nor a sidecar: it named only the sidecar, as though amiss
    proc = _cli_verify(gone)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: {gone}: no such file, and no provenance sidecar beside where it would be")
    proc = _cli_verify(tmp_path)  # the output folder, not an output: it looked for "<folder>.provenance.json"
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path}: is a folder; give one output file (or its .provenance.json)"


def test_a_file_the_record_does_not_list_or_that_is_not_there_is_not_verified(copy):
    """`verify OUT/scene.gpkg` (a copied-in file the record never listed) and `verify OUT/scene.nii.gz` (no such
    file) had said "verified scene.provenance.json" and exited 0."""
    stranger = copy["out"] / "scene.gpkg"
    shutil.copyfile(copy["image"], stranger)
    proc = _cli_verify(stranger)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"mismatch: {stranger} is not among the outputs {copy['sidecar']} records"
    gone = copy["out"] / "scene.nii.gz"
    proc = _cli_verify(gone)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {gone}: no such file (nor among the outputs scene.provenance.json records)"
    copied = copy["out"] / "scene.probabilities.tif"  # no sidecar of its own, and none lists it
    shutil.copyfile(copy["image"], copied)
    proc = _cli_verify(copied)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: {copied}: no provenance beside it records it (scene.probabilities.provenance.json is absent, and "
        "no other .provenance.json there lists it)")


@pytest.mark.parametrize("edit", [("outputs", "scene.tif", 5), ("outputs", None, ["scene.tif"]),
                                  ("input", None, "x"), ("model", None, []), ("input", "sha256", 7),
                                  ("model", "weights_path", 7)], ids=lambda e: f"{e[0]}.{e[1]}")
def test_a_sidecar_with_values_of_the_wrong_type_is_one_line(copy, edit):
    """Each of these had ended verify in a TypeError or AttributeError traceback."""
    record = json.loads(copy["sidecar"].read_text())
    part, key, value = edit
    if key is None:
        record[part] = value
    else:
        record[part][key] = value
    copy["sidecar"].write_text(json.dumps(record))
    proc = _cli_verify(copy["sidecar"])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {copy['sidecar']}: malformed provenance: "), lines


def test_a_fifo_or_a_folder_where_a_file_was_is_said_not_waited_on(copy):
    """A FIFO in an output's place (or named like a sidecar beside it) had blocked verify for ever; a folder in an
    output's place was "changed: sha256 is e3b0c44298fc…" (an empty tree's hash)."""
    copy["tif"].unlink()
    os.mkfifo(copy["tif"])
    proc = _cli_verify(copy["sidecar"])
    assert proc.returncode == 1 and f"mismatch: output {copy['tif']} is not a regular file" in proc.stderr
    copy["tif"].unlink()
    copy["tif"].mkdir()
    proc = _cli_verify(copy["sidecar"])
    assert proc.returncode == 1
    assert f"mismatch: output {copy['tif']} is a folder, where scene.provenance.json records a file" in proc.stderr
    qml = copy["out"] / "scene.qml"
    os.mkfifo(copy["out"] / "zz.provenance.json")
    copy["sidecar"].rename(copy["out"] / "kept.json")  # scene.qml's own sidecar gone: the folder's are searched
    proc = _cli_verify(qml)
    assert proc.returncode == 2 and "no provenance beside it records it" in proc.stderr


def test_weights_gone_beside_their_card_fail_and_strict_fails_what_it_cannot_reach(copy):
    """A model folder whose card is here and weights are gone had been "unverified" and exit 0; an auditor had
    no way to make an unreachable input a failure."""
    copy["image"].unlink()
    proc = subprocess.run([sys.executable, "-m", "flows", "verify", "--strict", str(copy["tif"])], check=False,
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "250"}, timeout=120)
    assert proc.returncode == 1 and "unverified: input" in proc.stderr
    assert f"not verified {copy['sidecar']}: 1 file(s) not reachable (--strict)" in proc.stderr
    assert _cli_verify(copy["tif"]).returncode == 0  # without --strict, as before
    copy["weights"].unlink()
    proc = _cli_verify(copy["tif"])
    assert proc.returncode == 1
    assert f"mismatch: model weights {copy['weights']} is missing, while the model's card is here" in proc.stderr


def test_an_unchanged_input_is_hashed_once_and_a_changed_one_again(tmp_path, monkeypatch):
    from storage import hashing

    reads = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p: reads.append(p) or real(p))
    f = tmp_path / "scene.bin"
    f.write_bytes(b"a" * 1000)
    first = hashing.sha256_input(f)
    assert hashing.sha256_input(f) == first == real(f) and len(reads) == 1
    f.write_bytes(b"b" * 1001)  # new size: a new identity, read again
    assert hashing.sha256_input(f) == real(f) != first and len(reads) == 2


def test_an_installed_copy_names_the_commit_its_image_was_built_from(tmp_path, monkeypatch):
    """A container image has no .git: every output made in production recorded ``git_commit: null``."""
    import storage.provenance as provenance

    monkeypatch.setattr(provenance, "_REPO", tmp_path)  # an installed copy: no .git beside the packages
    monkeypatch.delenv(provenance.SOURCE_COMMIT_VARIABLE, raising=False)
    assert provenance.git_commit() is None
    monkeypatch.setenv(provenance.SOURCE_COMMIT_VARIABLE, "0123abc\n")
    assert provenance.environment("cpu")["git_commit"] == "0123abc"
