"""2-D images kept as NIfTI one slice thick (X x Y x 1, nnU-Net's 2-D datasets) with a 2-D network.

``train --dataset`` had called such a dataset 3-D and refused a 2-D card ("a 3-D dataset, the card's network
is 2-D"), and ``segment`` refused the files ("model is 2D, the input is 3D").  Now the dataset trains a 2-D
network on the slices' plane, and ``segment`` runs a 2-D model over a one-slice volume with labels equal, voxel
for voxel, to the same model's 2-D sliding window over the plane, written back as a NIfTI on the input's grid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segmentation import predict
from segmentation.card import ModelCard
from segmentation.modeldir import build_module, save_model
from storage.datasets import open_dataset

SEGFLOW = [sys.executable, "-m", "flows"]


def run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([*SEGFLOW, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})


def affine() -> np.ndarray:
    a = np.diag([0.8, 0.7, 3.0, 1.0])
    a[:3, 3] = [-20.0, 4.0, 11.0]
    return a


def plane_model(path: Path, *, channels: int, flips: list[int]) -> object:
    """A 2-D U-Net with batch norm (folded at inference, through the one-slice wrapper) and mirrored TTA."""
    card = ModelCard.model_validate({
        "name": "plane-2d",
        "architecture": {"name": "unet", "kwargs": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1,
                                                    "norm": "batch"}},
        "input": {"spatial_dims": 2, "channels": channels,
                  "normalization": {"mode": "zscore", "mean": [100.0] * channels, "std": [20.0] * channels}},
        "classes": [{"value": v, "name": f"class{v}"} for v in range(3)],
        "inference": {"roi": [32, 32], "overlap": 0.5, "batch_size": 4, "flip_tta": flips},
    })
    torch.manual_seed(3)
    module = build_module(card)
    with torch.no_grad():  # running statistics other than 0 and 1, so that folding them changes the weights
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return save_model(path, card, module)


def slice_image(shape_ij: tuple[int, int], channels: int, seed: int = 0) -> np.ndarray:
    """(I, J, 1, C) intensities with structure (blobs), as nnU-Net keeps a 2-D multichannel image."""
    rng = np.random.default_rng(seed)
    i, j = np.meshgrid(np.arange(shape_ij[0]), np.arange(shape_ij[1]), indexing="ij")
    base = 100 + 30 * np.sin(i / 5.0) * np.cos(j / 7.0)
    out = np.stack([base + rng.normal(0, 10, shape_ij) * (c + 1) for c in range(channels)], axis=-1)
    return out[:, :, None, :].astype(np.float32)


@pytest.mark.parametrize("roi_tta", [None, ("32,24", "1")])
def test_a_2d_model_segments_a_one_slice_nifti_as_it_segments_the_plane(tmp_path, roi_tta):
    """Labels equal, voxel for voxel, ``predict`` over the (C, J, I) plane with the same model and window; the
    output is the input's one-slice grid (shape and affine); --roi and --tta name the plane's axes."""
    model = plane_model(tmp_path / "model", channels=2, flips=[0])
    data = slice_image((70, 90), channels=2)
    nib.save(nib.Nifti1Image(data, affine()), tmp_path / "cells_017.nii.gz")
    extra = [] if roi_tta is None else ["--roi", roi_tta[0], "--tta", roi_tta[1]]
    proc = run("segment", tmp_path / "cells_017.nii.gz", "--model", model.path, "--out", tmp_path / "out",
               "--no-prefect", *extra)
    assert proc.returncode == 0, proc.stderr
    assert not [line for line in proc.stderr.splitlines() if "one slice thick" in line]  # no 3-D model warning
    out = nib.load(tmp_path / "out" / "cells_017.nii.gz")
    assert out.shape == (70, 90, 1) and np.array_equal(out.affine, nib.load(tmp_path / "cells_017.nii.gz").affine)
    labels = np.asarray(out.dataobj)[:, :, 0].T  # (J, I), as the plane is stored

    plane = np.ascontiguousarray(data[:, :, 0, :].transpose(2, 1, 0))  # (C, J, I)
    roi = [32, 32] if roi_tta is None else [int(v) for v in roi_tta[0].split(",")]
    flips = [0] if roi_tta is None else [int(roi_tta[1])]
    reference = predict(plane, model, roi=roi, flip_tta=flips, probabilities=False).compute(scheduler="sync")
    assert np.array_equal(labels, reference)
    assert len(np.unique(labels)) > 1  # a label map, not one class everywhere

    record = json.loads((tmp_path / "out" / "cells_017.provenance.json").read_text())
    assert record["parameters"]["roi"] == [1, *roi] and record["parameters"]["flip_tta"] == [f + 1 for f in flips]
    assert record["model"]["card_sha256"] == model.card.shaping_sha256()  # the 2-D card, as the model holds it
    assert run("verify", tmp_path / "out" / "cells_017.provenance.json").returncode == 0


def test_a_2d_model_refuses_a_volume_of_several_slices_in_one_line(tmp_path):
    model = plane_model(tmp_path / "model", channels=1, flips=[])
    nib.save(nib.Nifti1Image(np.zeros((40, 30, 3), np.float32), affine()), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(slice_image((40, 30), 1)[..., 0], affine()), tmp_path / "slice.nii.gz")
    proc = run("segment", tmp_path / "ct.nii.gz", tmp_path / "slice.nii.gz", "--model", model.path,
               "--out", tmp_path / "out", "--no-prefect")
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {tmp_path / 'ct.nii.gz'}: model 'plane-2d' is 2D, the input is 3D (40 x 30 x 3 "
                      "voxels; a 2D model takes volumes one slice thick in k, I x J x 1)"], proc.stderr
    assert not list((tmp_path / "out").glob("ct*"))
    assert (tmp_path / "out" / "slice.nii.gz").is_file()  # the batch went on


def test_vector_output_for_a_one_slice_volume_is_refused_in_one_line(tmp_path):
    """``--vector`` writes a raster's polygons: a scan one slice thick had run and silently written none."""
    model = plane_model(tmp_path / "model", channels=1, flips=[])
    nib.save(nib.Nifti1Image(slice_image((40, 30), 1)[..., 0], affine()), tmp_path / "slice.nii.gz")
    proc = run("segment", tmp_path / "slice.nii.gz", "--model", model.path, "--out", tmp_path / "out",
               "--no-prefect", "--vector", "gpkg")
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {tmp_path / 'slice.nii.gz'}: is a volume, and --vector gpkg writes the polygons of "
                      "a raster's labels (drop --vector for scans)"], proc.stderr
    assert not list((tmp_path / "out").glob("slice*"))


def nnunet_2d_dataset(root: Path, cases: int = 4) -> None:
    """An nnU-Net v2 dataset of 2-D images as one-slice NIfTI files: bright discs are class 1."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(1)
    for n in range(cases):
        i, j = np.meshgrid(np.arange(48), np.arange(40), indexing="ij")
        labels = np.zeros((48, 40), np.uint8)
        for _ in range(3):
            ci, cj, r = rng.integers(8, 40), rng.integers(8, 32), rng.integers(3, 7)
            labels[(i - ci) ** 2 + (j - cj) ** 2 < r * r] = 1
        image = (rng.normal(100, 5, (48, 40)) + 60 * labels).astype(np.float32)
        nib.save(nib.Nifti1Image(image[:, :, None], affine()), root / "imagesTr" / f"cell_{n:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(labels[:, :, None], affine()), root / "labelsTr" / f"cell_{n:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "microscopy"}, "labels": {"background": 0, "cell": 1}, "numTraining": cases,
        "file_ending": ".nii.gz"}))


def card_file(path: Path, spatial_dims: int) -> Path:
    roi = [16, 16] if spatial_dims == 2 else [8, 8, 8]
    path.write_text(json.dumps({
        "name": "cells", "architecture": {"name": "unet", "kwargs": {"channels": [4, 8], "strides": [2],
                                                                    "num_res_units": 0}},
        "input": {"spatial_dims": spatial_dims, "channels": 1,
                  "normalization": {"mode": "zscore", "mean": [120.0], "std": [30.0]}},
        "classes": [{"value": 0, "name": "background"}, {"value": 1, "name": "cell"}],
        "inference": {"roi": roi}}))
    return path


def test_an_nnunet_dataset_of_one_slice_files_trains_a_2d_network_that_segments_and_scores_them(tmp_path):
    root = tmp_path / "Dataset501_Cells"
    nnunet_2d_dataset(root)
    dataset = open_dataset(root)
    assert dataset.spatial_dims == 2
    case = dataset.cases[0]
    data = dataset.read(case, tmp_path / "work")
    assert data.image.shape == (1, 40, 48) and data.labels.shape == (40, 48)  # (C, J, I): the plane
    stored = np.asarray(nib.load(case.images[0]).dataobj)[:, :, 0].T
    assert np.array_equal(data.image[0, 5:20, 3:30], stored[5:20, 3:30])
    assert np.array_equal(data.labels[...], np.asarray(nib.load(case.labels).dataobj)[:, :, 0].T)

    proc = run("train", "--dataset", root, "--card", card_file(tmp_path / "card3d.json", 3), "--out",
               tmp_path / "model3d", "--steps", "2")
    assert proc.returncode != 0
    assert "a 2-D dataset, the card's network is 3-D" in proc.stderr
    proc = run("train", "--dataset", root, "--card", card_file(tmp_path / "card.json", 2), "--out",
               tmp_path / "model", "--steps", "4", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    image = root / "imagesTr" / "cell_003_0000.nii.gz"
    proc = run("segment", image, "--model", tmp_path / "model", "--out", tmp_path / "out", "--no-prefect")
    assert proc.returncode == 0, proc.stderr
    out = nib.load(tmp_path / "out" / "cell_003_0000.nii.gz")
    assert out.shape == (48, 40, 1) and np.array_equal(out.affine, nib.load(image).affine)
    proc = run("evaluate", tmp_path / "out" / "cell_003_0000.nii.gz", "--truth", root / "labelsTr" / "cell_003.nii.gz",
               "--classes", tmp_path / "model", "--out", tmp_path / "scores")
    assert proc.returncode == 0, proc.stderr
    [scored] = json.loads((tmp_path / "scores" / "evaluation.json").read_text())["cases"]
    assert {c["name"] for c in scored["classes"]} >= {"cell"}


def test_a_raster_card_in_metres_is_refused_on_a_scans_slice(tmp_path):
    """A ground sample distance in metres or a CRS means nothing on a scan: refused, naming the input."""
    from segmentation.oneslice import plane_card
    from storage.errors import IncompatibleInputError

    card = plane_model(tmp_path / "model", channels=1, flips=[1]).card
    assert plane_card(card).inference.flip_tta == [2] and plane_card(card).input.spatial_dims == 3
    for update in ({"spacing": [10.0, 10.0], "spacing_unit": "m"}, {"crs": "utm"}, {"units": "reflectance"}):
        raster = card.model_copy(update={"input": card.input.model_copy(update=update)})
        with pytest.raises(IncompatibleInputError, match="works on rasters in metres"):
            plane_card(raster, "slice.nii.gz")
        # routing passes such a model by (nightly tries the next one; segment says so before any work)
        from flows.routing import ModelInput, fit_problem
        from storage.header import Header

        scan = Header(path="slice.nii.gz", kind="volume", spatial_dims=3, channels=1, shape=(40, 30, 1),
                      cell_size=None, cell_unit="mL")
        assert fit_problem(scan, ModelInput.of(card)) is None
        assert fit_problem(scan, ModelInput.of(raster)) == ("model 'plane-2d' is a raster model in metres (its "
                                                           "card's spacing, crs or units), the input is a scan")


def test_nightly_skips_a_one_slice_input_it_has_done_and_routes_past_a_raster_model(tmp_path, dask_cluster):
    """The ledger keyed the run with the card's 2-D window and the provenance recorded the one-slice run's
    [1, h, w]: they never matched, and every night segmented the input again.  And a 2-D raster model (metres)
    listed first had taken a one-slice scan, then failed it; the scan goes on to the next model that fits."""
    from flows.config import SegmentOptions
    from flows.nightly import nightly, nightly_report
    from tests.models import tiny_model

    model = plane_model(tmp_path / "model", channels=1, flips=[1])
    raster = tiny_model(tmp_path / "raster", spatial_dims=2, channels=1, roi=[32, 32], spacing=[10.0, 10.0],
                        spacing_unit="m")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    nib.save(nib.Nifti1Image(slice_image((40, 30), 1)[..., 0], affine()), inbox / "slice.nii.gz")
    options = SegmentOptions(dask_address=dask_cluster.scheduler.address)

    def statuses(*models: object) -> dict[str, tuple[str, str | None]]:
        state = nightly(model_dirs=[str(m.path) for m in models], out_dir=str(tmp_path / "out"), inbox=str(inbox),
                        retries=0, return_state=True, options=options)
        return {Path(r["input"]).name: (r["status"], r["model"]) for r in nightly_report(state)["inputs"]}

    from flows.routing import ModelInput, peek

    assert peek(raster.path).metres and ModelInput.of(raster.card).metres  # read alike with and without pydantic
    assert not peek(model.path).metres and not ModelInput.of(model.card).metres
    assert statuses(raster, model) == {"slice.nii.gz": ("done", "plane-2d")}
    assert statuses(raster, model) == {"slice.nii.gz": ("skipped", "plane-2d")}


def test_nightly_takes_a_cases_one_slice_channel_files_as_one_input_for_a_2d_model(tmp_path, dask_cluster):
    """nnU-Net keeps a multichannel 2-D case as ``cells_000_0000.nii.gz``, ``cells_000_0001.nii.gz`` one slice thick.
    ``nightly`` grouped a case's files by its 3-D models' channel counts only: beside a one-channel 3-D model, the
    2-channel 2-D model never saw the case, and each file was segmented alone as a one-channel scan.  The case is
    one input, labelled as ``segment`` labels the two files given together."""
    from flows.config import SegmentOptions
    from flows.nightly import nightly, nightly_report
    from tests.models import tiny_model

    model = plane_model(tmp_path / "model", channels=2, flips=[])
    scans = tiny_model(tmp_path / "scans", spatial_dims=3, channels=1, roi=[16, 16, 8])
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    data = slice_image((40, 30), channels=2)
    for c in range(2):
        nib.save(nib.Nifti1Image(data[..., c], affine()), inbox / f"cells_000_{c:04d}.nii.gz")
    state = nightly(model_dirs=[str(scans.path), str(model.path)], out_dir=str(tmp_path / "out"), inbox=str(inbox),
                    retries=0, return_state=True, options=SegmentOptions(dask_address=dask_cluster.scheduler.address))
    [report] = nightly_report(state)["inputs"]
    assert (report["status"], report["model"]) == ("done", "plane-2d"), report
    proc = run("segment", inbox / "cells_000_0000.nii.gz", inbox / "cells_000_0001.nii.gz", "--model", model.path,
               "--out", tmp_path / "ref", "--no-prefect")
    assert proc.returncode == 0, proc.stderr
    [out] = [p.name for p in (tmp_path / "out").glob("*.nii.gz")]
    assert np.array_equal(np.asarray(nib.load(tmp_path / "out" / out).dataobj),
                          np.asarray(nib.load(tmp_path / "ref" / out).dataobj))
