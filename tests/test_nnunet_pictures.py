"""nnU-Net v2's 2-D datasets kept as pictures (``file_ending`` .png), trained on and segmented.

nnU-Net keeps natural and microscopy images as PNG: a grey picture is one channel (8 or 16 bits), an RGB
picture in one ``_0000`` file is three, and labels are grey pictures of class values.  segflow had refused every
such dataset ("file_ending '.png' is not supported"), and ``segment`` read every picture as RGB, so a network
trained on grey pictures was refused them ("takes 1 channel, the input has 3").  The pixels reach the network
as nnU-Net's reader gives them in training and in ``segment`` alike; a grey picture given to a network that
takes three channels (one trained on VOC, which decodes grey JPEGs as RGB) gets its grey three times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image

from segmentation import predict
from storage.datasets import open_dataset
from storage.errors import InvalidInputError
from tests.models import tiny_model

SEGFLOW = [sys.executable, "-m", "flows"]


def run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([*SEGFLOW, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})


def discs(rng: np.random.Generator, shape: tuple[int, int] = (40, 48)) -> np.ndarray:
    """A label map of a few discs (class 1) on background, (H, W)."""
    y, x = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    labels = np.zeros(shape, np.uint8)
    for _ in range(3):
        cy, cx, r = rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8), rng.integers(3, 7)
        labels[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = 1
    return labels


def picture_dataset(root: Path, *, rgb: bool = False, depth: type = np.uint8, cases: int = 4) -> Path:
    """``imagesTr/cell_00N_0000.png`` (grey at ``depth``, or RGB) and ``labelsTr/cell_00N.png`` (grey values)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(1)
    scale = 1 if depth == np.uint8 else 200
    for n in range(cases):
        labels = discs(rng)
        grey = (rng.normal(100, 5, labels.shape) + 60 * labels) * scale
        pixels = np.stack([grey, grey * 0.5, 255 - grey], axis=-1) if rgb else grey
        Image.fromarray(pixels.clip(0, np.iinfo(depth).max).astype(depth)).save(
            root / "imagesTr" / f"cell_{n:03d}_0000.png")
        Image.fromarray(labels).save(root / "labelsTr" / f"cell_{n:03d}.png")
    names = {"0": "R", "1": "G", "2": "B"} if rgb else {"0": "microscopy"}
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": names, "labels": {"background": 0, "cell": 1}, "numTraining": cases, "file_ending": ".png"}))
    return root


def card_file(path: Path, channels: int, scale: float = 1.0) -> Path:
    path.write_text(json.dumps({
        "name": "cells", "architecture": {"name": "unet", "kwargs": {"channels": [4, 8], "strides": [2],
                                                                    "num_res_units": 0}},
        "input": {"spatial_dims": 2, "channels": channels,
                  "normalization": {"mode": "zscore", "mean": [120.0 * scale] * channels,
                                    "std": [30.0 * scale] * channels}},
        "classes": [{"value": 0, "name": "background"}, {"value": 1, "name": "cell"}],
        "inference": {"roi": [16, 16]}}))
    return path


@pytest.mark.parametrize("depth", [np.uint8, np.uint16])
def test_a_grey_png_dataset_trains_and_its_model_segments_a_png_as_it_learnt_it(tmp_path, depth):
    root = picture_dataset(tmp_path / "Dataset502_Cells", depth=depth)
    dataset = open_dataset(root)
    assert dataset.spatial_dims == 2 and dataset.channels == 1 and [c.name for c in dataset.classes] == \
        ["background", "cell"]
    case = dataset.cases[1]
    data = dataset.read(case, tmp_path / "work")
    stored = np.asarray(Image.open(case.images[0]))
    assert stored.dtype == depth and data.image.shape == (1, 40, 48)
    assert np.array_equal(data.image[0], stored)  # its own depth: 16-bit values are not cut to 8
    assert np.array_equal(data.labels[...], np.asarray(Image.open(case.labels)))

    scale = 1.0 if depth == np.uint8 else 200.0
    proc = run("train", "--dataset", root, "--card", card_file(tmp_path / "card.json", 1, scale), "--out",
               tmp_path / "model", "--steps", "3", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    image = root / "imagesTr" / "cell_003_0000.png"
    proc = run("segment", image, "--model", tmp_path / "model", "--out", tmp_path / "out", "--no-prefect")
    assert proc.returncode == 0, proc.stderr  # had been "takes 1 channel, the input has 3"
    with rasterio.open(tmp_path / "out" / "cell_003_0000.tif") as src:
        labels = src.read(1)
    from segmentation.modeldir import load_model

    model = load_model(tmp_path / "model")
    pixels = np.asarray(Image.open(image))[None]
    assert np.array_equal(labels, predict(pixels, model, probabilities=False).compute(scheduler="sync"))
    if depth == np.uint8:  # nnU-Net's .bmp datasets trained, and their model refused its own pictures as input
        bmp = tmp_path / "cell_003_0000.bmp"
        Image.open(image).save(bmp)
        proc = run("segment", bmp, "--model", tmp_path / "model", "--out", tmp_path / "out-bmp", "--no-prefect")
        assert proc.returncode == 0, proc.stderr
        with rasterio.open(tmp_path / "out-bmp" / "cell_003_0000.tif") as src:
            assert np.array_equal(src.read(1), labels)
    proc = run("evaluate", tmp_path / "out" / "cell_003_0000.tif", "--truth", root / "labelsTr" / "cell_003.png",
               "--classes", tmp_path / "model", "--out", tmp_path / "scores")
    assert proc.returncode == 0, proc.stderr


def test_an_rgb_png_in_one_file_is_three_channels(tmp_path):
    root = picture_dataset(tmp_path / "Dataset503_Roads", rgb=True, cases=2)
    dataset = open_dataset(root)
    assert dataset.channels == 3 and dataset.cases[0].images == (root / "imagesTr" / "cell_000_0000.png",)
    data = dataset.read(dataset.cases[0], tmp_path / "work")
    assert np.array_equal(data.image, np.asarray(Image.open(dataset.cases[0].images[0])).transpose(2, 0, 1))


def _damage_rgb_as_one(root: Path) -> None:
    doc = json.loads((root / "dataset.json").read_text())
    doc["channel_names"] = {"0": "grey"}
    (root / "dataset.json").write_text(json.dumps(doc))


BAD = {
    "RGB file, one channel named": (_damage_rgb_as_one, "cell_000_0000.png: the case's pictures hold 3 channel\\(s\\) "
                                                        r"\(cell_000_0000.png 3\) but dataset.json names 1"),
    "RGB label": (lambda r: Image.new("RGB", (48, 40)).save(r / "labelsTr" / "cell_001.png"),
                  "cell_001.png: is an RGB colour picture: a label map is one value per pixel"),
    "size": (lambda r: Image.new("L", (47, 40)).save(r / "labelsTr" / "cell_001.png"),
             "cell_001.png: label size 47x40 does not match image cell_001_0000.png size 48x40"),
    "gap": (lambda r: Image.new("L", (48, 40)).save(r / "imagesTr" / "cell_001_0002.png"),
            r"cell_001_0001.png: missing: the case's files must be numbered _0000, _0001 ... without a gap"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_malformed_picture_dataset_is_refused_naming_the_file(tmp_path, case):
    root = picture_dataset(tmp_path / "ds", rgb=case.startswith("RGB file"), cases=2)
    BAD[case][0](root)
    with pytest.raises(InvalidInputError, match=BAD[case][1]) as err:
        open_dataset(root)
    assert "\n" not in str(err.value)


def test_a_grey_picture_reaches_a_three_channel_network_as_its_grey_thrice(tmp_path):
    """A network that takes RGB (trained on VOC, whose grey JPEGs are decoded as RGB) labels a grey PNG as it
    labels the same picture saved as RGB; a one-channel network takes the grey picture as it is."""
    rng = np.random.default_rng(4)
    grey = (rng.normal(100, 30, (50, 70))).clip(0, 255).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2)).save(tmp_path / "rgb.png")
    model = tiny_model(tmp_path / "m3", spatial_dims=2, channels=3, roi=[32, 32])
    proc = run("segment", tmp_path / "grey.png", tmp_path / "rgb.png", "--model", model.path, "--out",
               tmp_path / "out", "--no-prefect")
    assert proc.returncode == 0, proc.stderr
    with rasterio.open(tmp_path / "out" / "grey.tif") as a, rasterio.open(tmp_path / "out" / "rgb.tif") as b:
        assert np.array_equal(a.read(1), b.read(1)) and len(np.unique(a.read(1))) > 1
    one = tiny_model(tmp_path / "m1", spatial_dims=2, channels=1, roi=[32, 32])
    proc = run("segment", tmp_path / "grey.png", tmp_path / "rgb.png", "--model", one.path, "--out",
               tmp_path / "out1", "--no-prefect")
    assert proc.returncode == 1
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {tmp_path / 'rgb.png'}: model 'tiny-2d-1ch' takes 1 channel, the input has 3: choose them with "
        "--bands, the file's band numbers (1 for its first) in the model's order"], proc.stderr
    with rasterio.open(tmp_path / "out1" / "grey.tif") as src:
        assert np.array_equal(src.read(1), predict(grey[None], one, probabilities=False).compute(scheduler="sync"))


def test_nnunets_ignore_label_is_not_counted_by_evaluate_and_a_prediction_pairs_with_its_case(tmp_path):
    """nnU-Net's ``ignore`` label (here 2) marks pixels without annotation: training skips them, but ``evaluate
    --classes MODEL`` had counted them, a 'class 2' row and false positives wherever the model said 'cell' there.
    And a prediction named by its image file, ``cell_003_0000.tif``, had found no truth ``cell_003_0000.*`` in
    ``labelsTr/``, which holds ``cell_003.png``."""
    root = picture_dataset(tmp_path / "Dataset504_Ignore")
    doc = json.loads((root / "dataset.json").read_text())
    doc["labels"]["ignore"] = 2
    (root / "dataset.json").write_text(json.dumps(doc))
    truth_path = root / "labelsTr" / "cell_003.png"
    truth = np.asarray(Image.open(truth_path)).copy()
    truth[:, :10] = 2  # a strip nobody annotated
    Image.fromarray(truth).save(truth_path)
    proc = run("train", "--dataset", root, "--card", card_file(tmp_path / "card.json", 1), "--out",
               tmp_path / "model", "--steps", "2", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    proc = run("segment", root / "imagesTr" / "cell_003_0000.png", "--model", tmp_path / "model", "--out",
               tmp_path / "out", "--no-prefect")
    assert proc.returncode == 0, proc.stderr
    prediction = tmp_path / "out" / "cell_003_0000.tif"
    # right wherever annotated, 'cell' all over the unannotated strip
    with rasterio.open(prediction, "r+", IGNORE_COG_LAYOUT_BREAK="YES") as dst:
        dst.write(np.where(truth == 2, 1, truth).astype(np.uint8), 1)
    proc = run("evaluate", prediction, "--truth", root / "labelsTr", "--classes", tmp_path / "model", "--out",
               tmp_path / "scores")
    assert proc.returncode == 0, proc.stderr
    [case] = json.loads((tmp_path / "scores" / "evaluation.json").read_text())["cases"]
    assert case["truth"] == str(truth_path)
    assert {r["name"]: r["dice"] for r in case["classes"]} == {"background": 1.0, "cell": 1.0}
    assert case["ignored_pixels"] == int((truth == 2).sum())
    assert any("2 not counted" in n for n in case["notes"]), case["notes"]


def test_a_pictures_quicklook_shows_the_picture_under_its_labels(tmp_path):
    """A picture's quicklook had shown the labels over no image (only GeoTIFF, VRT and NIfTI inputs were drawn)."""
    from flows.export import quicklook_image
    from storage.bands import BandRequest

    y, x = np.mgrid[0:40, 0:48]
    grey = ((np.sin(x / 5) * np.cos(y / 7) + 1) * 120).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    with quicklook_image(tmp_path / "grey.png", BandRequest(), tmp_path / "work") as image:
        assert image == tmp_path / "grey.png"
    model = tiny_model(tmp_path / "m", spatial_dims=2, channels=1, roi=[16, 16])
    proc = run("segment", tmp_path / "grey.png", "--model", model.path, "--out", tmp_path / "out", "--no-prefect",
               "--quicklook")
    assert proc.returncode == 0, proc.stderr  # GDAL reads the picture under the labels' pixel grid
    assert (tmp_path / "out" / "grey.quicklook.png").stat().st_size > 0
