"""Per-label statistics against a whole-array numpy computation, on a multi-chunk zarr store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from storage.classes import LabelClass
from storage.statistics import label_statistics, write_statistics

SHAPE = (13, 20, 17)  # (K, J, I)
CHUNKS = (5, 7, 9)
NODATA = 255
CLASSES = [
    LabelClass(value=0, name="background"),
    LabelClass(value=1, name="liver", color=(200, 100, 50)),
    LabelClass(value=2, name="spleen", color=(20, 200, 50)),
    LabelClass(value=3, name="tumour"),  # confined to the interior: must not touch the border
    LabelClass(value=4, name="absent"),  # never predicted
]


def oblique_affine() -> np.ndarray:
    """An oblique, anisotropic, left-handed voxel-to-RAS affine."""
    theta = np.deg2rad(17.0)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0.0], [np.sin(theta), np.cos(theta), 0.0], [0.0, 0.0, 1.0]])
    tilt = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(0.3), -np.sin(0.3)], [0.0, np.sin(0.3), np.cos(0.3)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ tilt @ np.diag([-0.7, 0.8, 2.5])
    affine[:3, 3] = (-100.0, 35.5, 12.25)
    return affine


def make_store(tmp_path: Path, seed: int = 0) -> tuple[zarr.Array, zarr.Array, np.ndarray, np.ndarray]:
    """Random labels (with nodata, an unlisted value and an interior-only class) and a 2-channel image."""
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, 1, 2], size=SHAPE, p=[0.5, 0.3, 0.2]).astype(np.uint8)
    labels[3:9, 4:15, 2:12][rng.random((6, 11, 10)) < 0.4] = 3
    labels[0, :3, :] = NODATA
    labels[12, 19, 16] = 7  # a value the card does not list
    # CT-like values far from 0, so a naive sum-of-squares variance would lose digits
    image = np.stack([rng.normal(1e5, 3.0, SHAPE), rng.normal(0, 1, SHAPE)]).astype(np.float64)
    root = zarr.open_group(tmp_path / "store.zarr", mode="w")
    zl = root.create_array("labels", shape=SHAPE, chunks=CHUNKS, dtype="uint8")
    zl[...] = labels
    zi = root.create_array("image", shape=(2, *SHAPE), chunks=(1, 6, 6, 6), dtype="float64")
    zi[...] = image
    return zl, zi, labels, image


class ReadLog:
    """A zarr array seen through a log of the regions read from it (to prove memory stays per chunk)."""

    def __init__(self, array: zarr.Array) -> None:
        self.array, self.sizes = array, []

    def __getattr__(self, name: str):  # shape, dtype, chunks
        return getattr(self.array, name)

    def __getitem__(self, region):
        block = self.array[region]
        self.sizes.append(np.asarray(block).size)
        return block


def reference(labels: np.ndarray, image: np.ndarray, affine: np.ndarray, value: int) -> dict:
    mask = labels == value
    k, j, i = np.nonzero(mask)
    # the world extent of the class's voxel centres, every one mapped (on this oblique grid the corners of the
    # voxel box, which the statistics had given, lie outside it: a 28 mm sphere had read 41 mm)
    world = (affine @ np.stack([i, j, k, np.ones_like(i)]).astype(np.float64))[:3]
    return {"voxels": int(mask.sum()), "mean": float(image[0][mask].mean()), "std": float(image[0][mask].std()),
            "bbox_voxel": {"i": [int(i.min()), int(i.max())], "j": [int(j.min()), int(j.max())],
                           "k": [int(k.min()), int(k.max())]},
            "min": world.min(axis=1), "max": world.max(axis=1)}


def test_statistics_match_whole_array_numpy(tmp_path: Path) -> None:
    zl, zi, labels, image = make_store(tmp_path)
    affine = oblique_affine()
    logged = ReadLog(zl)
    stats = label_statistics(logged, zi, affine, CLASSES, nodata_label=NODATA, unit="HU")

    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    assert stats["unit"] == "HU"
    assert stats["voxel_volume_ml"] == pytest.approx(voxel_ml, rel=1e-12)
    assert stats["nodata_voxels"] == int((labels == NODATA).sum()) == 3 * 17
    assert stats["unlisted_voxels"] == 1
    assert set(stats["classes"]) == {c.name for c in CLASSES}
    for c in CLASSES[:4]:
        got, want = stats["classes"][c.name], reference(labels, image, affine, c.value)
        assert got["value"] == c.value
        assert got["voxels"] == want["voxels"] > 0
        assert got["volume_ml"] == pytest.approx(want["voxels"] * voxel_ml, rel=1e-12)
        assert got["mean"] == pytest.approx(want["mean"], rel=1e-9)
        assert got["std"] == pytest.approx(want["std"], rel=1e-9)
        assert got["bbox_voxel"] == want["bbox_voxel"]
        np.testing.assert_allclose(got["bbox_mm"]["min"], want["min"], rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(got["bbox_mm"]["max"], want["max"], rtol=1e-12, atol=1e-9)
    assert stats["classes"]["liver"]["touches_border"] is True
    assert stats["classes"]["tumour"]["touches_border"] is False
    assert stats["classes"]["tumour"]["bbox_voxel"]["k"][0] >= 3
    absent = stats["classes"]["absent"]
    assert absent == {"value": 4, "voxels": 0, "volume_ml": 0.0, "volume_mm3": 0.0, "mean": None, "std": None,
                      "bbox_voxel": None, "bbox_mm": None, "touches_border": False}
    # chunk by chunk: 3 x 3 x 2 chunks, no read larger than one chunk
    assert len(logged.sizes) == 18
    assert max(logged.sizes) == int(np.prod(CHUNKS))


def test_other_channel_and_chunking_independence(tmp_path: Path) -> None:
    zl, zi, labels, image = make_store(tmp_path, seed=3)
    affine = oblique_affine()
    chunked = label_statistics(zl, zi, affine, CLASSES, nodata_label=NODATA, channel=1, unit=None)
    whole = label_statistics(labels, image, affine, CLASSES, nodata_label=NODATA, channel=1, unit=None)
    for name in ("liver", "spleen", "tumour"):
        a, b = chunked["classes"][name], whole["classes"][name]
        assert a["voxels"] == b["voxels"] and a["bbox_voxel"] == b["bbox_voxel"]
        assert a["mean"] == pytest.approx(float(image[1][labels == a["value"]].mean()), rel=1e-9, abs=1e-12)
        assert a["std"] == pytest.approx(b["std"], rel=1e-9)
    assert chunked["unit"] is None


def test_background_added_and_nodata_not_counted_without_image(tmp_path: Path) -> None:
    labels = np.zeros((4, 5, 6), dtype=np.uint16)
    labels[1:3, 2, 2:4] = 9
    labels[0] = 65535
    stats = label_statistics(labels, None, np.diag([2.0, 2.0, 2.0, 1.0]), [LabelClass(value=9, name="lesion")],
                             nodata_label=65535)
    assert list(stats["classes"]) == ["background", "lesion"]
    assert stats["classes"]["background"]["voxels"] == 3 * 5 * 6 - 4
    lesion = stats["classes"]["lesion"]
    assert lesion["voxels"] == 4 and lesion["volume_ml"] == pytest.approx(4 * 8 / 1000)
    assert lesion["mean"] is None and lesion["bbox_voxel"] == {"i": [2, 3], "j": [2, 2], "k": [1, 2]}
    assert lesion["bbox_mm"] == {"frame": "RAS", "min": [4.0, 4.0, 2.0], "max": [6.0, 4.0, 4.0]}
    assert stats["nodata_voxels"] == 30


def test_nodata_equal_to_a_class_is_refused() -> None:
    with pytest.raises(ValueError, match="nodata label 1"):
        label_statistics(np.zeros((2, 2, 2), np.uint8), None, np.eye(4), CLASSES, nodata_label=1)


def test_write_statistics_is_json(tmp_path: Path) -> None:
    zl, zi, _, _ = make_store(tmp_path)
    stats = label_statistics(zl, zi, oblique_affine(), CLASSES, nodata_label=NODATA)
    out = write_statistics(tmp_path / "stats.json", stats)
    assert json.loads(out.read_text()) == stats
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
