"""Decathlon / nnU-Net v2 and geo (raster + label raster or vector layer) dataset layouts, on real files."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely

from storage.classes import LabelClass
from storage.datasets import decathlon, geolabels
from storage.datasets.arrays import ChannelStack, LabelArray, LabelTable
from storage.errors import InvalidInputError
from tests.conftest import shared
from tests.medgeo_datasets import (
    GRID,
    SPACING,
    UTM,
    geo_raster_dataset,
    geo_vector_dataset,
    msd_dataset,
    nnunet_dataset,
    pixel_box,
    raster_image,
    raster_labels,
    write_geotiff,
    write_nifti,
    write_vector,
)

# --------------------------------------------------------------------------- Decathlon / nnU-Net v2


def test_nnunet_v2_detected_with_names_classes_and_channels(tmp_path: Path) -> None:
    nnunet_dataset(tmp_path)
    assert decathlon.LAYOUT.detect(tmp_path) and not geolabels.LAYOUT.detect(tmp_path)
    ds = decathlon.LAYOUT.open(tmp_path)
    assert (ds.layout, ds.flavour, ds.name, ds.spatial_dims) == ("decathlon", "nnunet-v2", "Dataset042_Tiny", 3)
    assert ds.channel_names == ["T1", "T2"] and ds.channels == 2
    assert [(c.value, c.name) for c in ds.classes] == [(0, "background"), (1, "liver"), (2, "tumour")]
    assert ds.classes[0].color == (0, 0, 0) and len({c.color for c in ds.classes}) == 3
    assert [c.id for c in ds.cases] == ["liver_001", "liver_002"]
    assert all(c.split is None for c in ds.cases)
    assert [p.name for p in ds.cases[0].images] == ["liver_001_0000.nii.gz", "liver_001_0001.nii.gz"]
    assert ds.ignore_index == 255


def test_nnunet_read_stacks_channels_in_file_order(tmp_path: Path) -> None:
    expected = nnunet_dataset(tmp_path / "ds")
    ds = decathlon.LAYOUT.open(tmp_path / "ds")
    data = ds.read(ds.cases[1], tmp_path / "work")
    want = expected["liver_002"]
    assert isinstance(data.image, ChannelStack) and data.image.shape == (2, 8, 16, 16)
    assert np.array_equal(data.image[0], want["image"][0]) and np.array_equal(data.image[1], want["image"][1])
    assert data.image[0].min() < 1000 <= data.image[1].min()  # _0000 and _0001 really differ
    assert np.array_equal(data.image[:, 2:5, 3:9, 1:4], want["image"][:, 2:5, 3:9, 1:4])
    assert np.array_equal(data.labels[...], want["labels"]) and data.labels[...].dtype == np.uint8
    assert np.array_equal(data.labels[1:3, :, 4:7], want["labels"][1:3, :, 4:7])
    assert data.spacing == pytest.approx((SPACING[2], SPACING[1], SPACING[0]))  # (z, y, x) = (k, j, i)
    assert data.geometry.kind == "volume"
    assert ds.validate_labels(tmp_path / "work") == {k: int((np.stack([e["labels"] for e in expected.values()])
                                                              == k).sum()) for k in range(3)}


def test_nnunet_ignore_label_reads_as_ignore(tmp_path: Path) -> None:
    expected = nnunet_dataset(tmp_path, labels={"background": 0, "lesion": 1, "ignore": 2}, label_values=[0, 1, 2])
    ds = decathlon.LAYOUT.open(tmp_path)
    assert [c.name for c in ds.classes] == ["background", "lesion"]
    labels = ds.read(ds.cases[0], tmp_path / "work").labels[...]
    raw = expected["liver_001"]["labels"]
    assert np.all(labels[raw == 2] == 255) and np.array_equal(labels[raw < 2], raw[raw < 2])


def test_msd_4d_dataset_maps_labels_to_contiguous_classes(tmp_path: Path) -> None:
    expected = msd_dataset(tmp_path, labels={0: "background", 2: "edema", 5: "tumour"})
    assert decathlon.LAYOUT.detect(tmp_path)
    ds = decathlon.LAYOUT.open(tmp_path)
    assert (ds.flavour, ds.name, ds.channel_names) == ("msd", "BrainTumour", ["FLAIR", "T1w"])
    assert [(c.value, c.name) for c in ds.classes] == [(0, "background"), (1, "edema"), (2, "tumour")]
    assert [c.id for c in ds.cases] == ["BRATS_001", "BRATS_002"]  # the ._ forks are not cases
    data = ds.read(ds.cases[0], tmp_path / "work", check=True)
    want = expected["BRATS_001"]
    assert data.image.shape == (2, 8, 16, 16) and np.array_equal(data.image[...], want["image"])
    mapping = {0: 0, 2: 1, 5: 2}
    assert np.array_equal(data.labels[...], np.vectorize(mapping.get)(want["labels"]))


def test_two_case_names_that_make_one_case_id_are_refused(tmp_path: Path) -> None:
    """``case 000`` and ``case_000`` both became case id ``case_000``: the card's split listed it in training
    and in validation, which read as leakage and said nothing of which file went where (probe, 2026-12-06)."""
    from storage.datasets import open_dataset

    nnunet_dataset(tmp_path, cases=("case 000", "case_000"))
    with pytest.raises(InvalidInputError, match=r"becomes case id 'case_000', as case( |_)000_0000.nii.gz does "):
        open_dataset(tmp_path)


def test_msd_3d_single_modality(tmp_path: Path) -> None:
    expected = msd_dataset(tmp_path, modalities=("CT",), four_d=False, name="")
    ds = decathlon.LAYOUT.open(tmp_path)
    assert ds.name == tmp_path.name and ds.channels == 1
    data = ds.read(ds.cases[1], tmp_path / "work")
    assert np.array_equal(data.image[...], expected["BRATS_002"]["image"])


def test_label_values_outside_the_table_are_found_by_scan_and_by_read(tmp_path: Path) -> None:
    nnunet_dataset(tmp_path / "ds", labels={"background": 0, "liver": 1}, label_values=[0, 1])
    bad = np.zeros((16, 16, 8), dtype=np.uint8)
    bad[3, 4, 5], bad[10, 2, 1] = 7, 9
    write_nifti(tmp_path / "ds" / "labelsTr" / "liver_002.nii.gz", bad)
    ds = decathlon.LAYOUT.open(tmp_path / "ds")  # headers only: not found yet
    with pytest.raises(InvalidInputError, match=r"liver_002\.nii\.gz: label values 7, 9 are not in the label"):
        ds.validate_labels(tmp_path / "work")
    with pytest.raises(InvalidInputError, match="liver_002.nii.gz"):
        ds.read(ds.cases[1], tmp_path / "work", check=True)
    labels = ds.read(ds.cases[1], tmp_path / "work").labels
    assert labels[6:8].max() == 0  # slices that hold no bad value read fine (store order is k, j, i)
    with pytest.raises(InvalidInputError, match="label values 7 are not"):
        labels[5, 4, 3]


def _drop(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _rewrite_json(path: Path, **changes: object) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


BAD_DECATHLON = {
    "no imagesTr": (lambda r: _drop(r / "imagesTr"), "imagesTr: missing"),
    "no labelsTr": (lambda r: _drop(r / "labelsTr"), "labelsTr: missing"),
    "no dataset.json": (lambda r: _drop(r / "dataset.json"), "dataset.json: missing"),
    "image without label": (lambda r: _drop(r / "labelsTr" / "liver_002.nii.gz"),
                            "liver_002_0000.nii.gz: image without a label"),
    "missing channel": (lambda r: _drop(r / "imagesTr" / "liver_001_0001.nii.gz"),
                        "liver_001_0001.nii.gz: missing channel 1"),
    "label without image": (lambda r: write_nifti(r / "labelsTr" / "liver_009.nii.gz", np.zeros((16, 16, 8))),
                            "liver_009.nii.gz: label without an image"),
    "shape mismatch": (lambda r: write_nifti(r / "labelsTr" / "liver_001.nii.gz", np.zeros((16, 16, 7), np.uint8)),
                       r"liver_001.nii.gz: label shape \(16, 16, 7\) does not match"),
    "affine mismatch": (lambda r: write_nifti(r / "labelsTr" / "liver_002.nii.gz", np.zeros((16, 16, 8), np.uint8),
                                              np.diag([1.0, 1.0, 1.0, 1.0])),
                        "liver_002.nii.gz: label affine does not match image liver_002_0000.nii.gz's"),
    "malformed json": (lambda r: (r / "dataset.json").write_text("{\"labels\": {"), "dataset.json: is not valid JSON"),
    "region labels": (lambda r: _rewrite_json(r / "dataset.json", labels={"background": 0, "whole": [1, 2]}),
                      "dataset.json: uses nnU-Net region-based labels"),
    "mha ending": (lambda r: _rewrite_json(r / "dataset.json", file_ending=".mha"),
                   "dataset.json: file_ending '.mha' is not supported"),
    "png ending, NIfTI files": (lambda r: _rewrite_json(r / "dataset.json", file_ending=".png"),
                                r"imagesTr: holds no <case>_XXXX.png files \(dataset.json's file_ending\); it holds "
                                r"liver_001_0000.nii.gz"),
    "count": (lambda r: _rewrite_json(r / "dataset.json", numTraining=5), "dataset.json: numTraining is 5"),
    "no channel names": (lambda r: _rewrite_json(r / "dataset.json", channel_names={}),
                         "dataset.json: 'channel_names' must be"),
    "bad channel name": (lambda r: (r / "imagesTr" / "liver_003.nii.gz").write_bytes(b"x"),
                         "liver_003.nii.gz: image name is not <case>_<XXXX>.nii.gz"),
    # the channel off the grid is named, not the label that matches the first one (it had been blamed)
    "channel off grid": (lambda r: write_nifti(r / "imagesTr" / "liver_001_0001.nii.gz", np.zeros((16, 16, 8)),
                                               np.diag([1.0, 1.0, 1.0, 1.0])),
                         "liver_001_0001.nii.gz: affine does not match the case's first channel file "
                         "liver_001_0000.nii.gz's"),
    # a label saved as .nii beside .nii.gz images: "is missing" alone had hidden the file sitting there
    "label under another ending": (lambda r: (r / "labelsTr" / "liver_002.nii.gz").rename(r / "labelsTr" /
                                                                                          "liver_002.nii"),
                                   r"liver_002_0000.nii.gz: image without a label: labelsTr/liver_002.nii.gz is "
                                   r"missing \(liver_002.nii is there: dataset.json's file_ending is .nii.gz\)"),
    # .nii.gz files with file_ending .nii: the setting is named, not the files' names as nnU-Net's (it had been)
    "ending .nii, files .nii.gz": (lambda r: _rewrite_json(r / "dataset.json", file_ending=".nii"),
                                   "liver_001_0000.nii.gz: does not end in dataset.json's file_ending '.nii'"),
}


@pytest.mark.parametrize("case", sorted(BAD_DECATHLON))
def test_malformed_nnunet_raises_naming_the_file(tmp_path: Path, case: str) -> None:
    nnunet_dataset(tmp_path)
    damage, message = BAD_DECATHLON[case]
    damage(tmp_path)
    with pytest.raises(InvalidInputError, match=message) as err:
        decathlon.LAYOUT.open(tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("entry, message", [
    ({"image": "../../etc/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}, "is not a path like"),
    ({"image": "./imagesTr/BRATS_009.nii.gz", "label": "./labelsTr/BRATS_009.nii.gz"}, "BRATS_009.nii.gz: missing"),
    ({"image": "./imagesTr/BRATS_001.nii.gz"}, "lacks 'image' or 'label'"),
])
def test_malformed_msd_training_list(tmp_path: Path, entry: dict, message: str) -> None:
    msd_dataset(tmp_path, cases=("BRATS_001",))
    _rewrite_json(tmp_path / "dataset.json", training=[entry])
    with pytest.raises(InvalidInputError, match=message):
        decathlon.LAYOUT.open(tmp_path)


def test_msd_channel_count_must_match_modalities(tmp_path: Path) -> None:
    msd_dataset(tmp_path, modalities=("FLAIR", "T1w", "T2w"), four_d=False)
    with pytest.raises(InvalidInputError, match=r"BRATS_001.nii.gz: has 1 channel\(s\).*3 modalities"):
        decathlon.LAYOUT.open(tmp_path)


def test_label_array_and_channel_stack_slice_like_arrays(tmp_path: Path) -> None:
    raw = np.arange(24).reshape(1, 2, 3, 4) % 3 * 10  # values 0, 10, 20
    valid = np.ones((2, 3, 4), dtype=bool)
    valid[0, 0, 0] = False
    table = LabelTable.build({0: "background", 10: "a", 20: "b"}, tmp_path / "t.json")
    labels = LabelArray(raw, table, tmp_path / "l.nii.gz", masks=[valid])
    assert labels.shape == (2, 3, 4) and labels[0, 0, 0] == 255 and np.array_equal(labels[1], raw[0, 1] // 10)
    assert np.array_equal(np.asarray(labels)[..., 1:], raw[0][..., 1:] // 10)
    stack = ChannelStack([np.full((1, 2, 3), 1.5), np.full((2, 2, 3), 7, dtype=np.int16)])
    assert stack.shape == (3, 2, 3) and stack.dtype == np.float64
    assert stack[2, 1, 2] == 7 and np.array_equal(stack[:, 0, 0], [1.5, 7, 7])
    assert stack[0:2, ..., 1:].shape == (2, 2, 2)


# --------------------------------------------------------------------------- geo: label rasters


def test_geo_label_rasters_without_crs_and_table_from_values(tmp_path: Path) -> None:
    expected = geo_raster_dataset(tmp_path / "ds", nodata=0)
    assert geolabels.LAYOUT.detect(tmp_path / "ds") and not decathlon.LAYOUT.detect(tmp_path / "ds")
    ds = geolabels.LAYOUT.open(tmp_path / "ds")
    assert (ds.layout, ds.spatial_dims, ds.channels, ds.channel_names) == ("geo", 2, 2, ["band1", "band2"])
    assert [(c.value, c.name) for c in ds.classes] == [(0, "class 0"), (1, "class 3"), (2, "class 7")]
    assert [c.id for c in ds.cases] == ["tile_a", "tile_b"] and all(c.split is None for c in ds.cases)
    data = ds.read(ds.cases[1], tmp_path / "work", check=True)
    want = expected["tile_b"]
    assert np.array_equal(data.image[...], want["image"]) and data.spacing == (10.0, 10.0)
    labels = data.labels[...]
    assert np.all(labels[:4, :4] == 255)  # the image's nodata corner
    mapped = np.searchsorted([0, 3, 7], want["labels"])
    assert np.array_equal(labels[4:], mapped[4:]) and np.array_equal(labels[:4, 4:], mapped[:4, 4:])
    assert data.geometry.epsg == 32633


def test_geo_label_value_255_is_no_label_as_for_image_label_pairs(tmp_path: Path) -> None:
    """An unlabelled border of 255 in label rasters without nodata: the geo layout made it a trained class
    "class 255" (the same files as --image/--labels pairs ignore it).  It is ignore now, unless classes.json
    lists 255 as a class."""
    geo_raster_dataset(tmp_path / "ds", stems=("a",))
    lab = raster_labels(0, (0, 3, 7))
    lab[:3] = 255
    write_geotiff(tmp_path / "ds" / "labels" / "a.tif", lab)
    ds = geolabels.LAYOUT.open(tmp_path / "ds")
    assert [c.name for c in ds.classes] == ["class 0", "class 3", "class 7"]
    labels = ds.read(ds.cases[0], tmp_path / "work", check=True).labels[...]
    assert np.all(labels[:3] == 255) and np.array_equal(labels[3:], np.searchsorted([0, 3, 7], lab[3:]))
    table = [{"value": v, "name": n} for v, n in ((0, "bg"), (3, "water"), (7, "forest"))]
    (tmp_path / "ds" / "classes.json").write_text(json.dumps(table))
    assert geolabels.LAYOUT.open(tmp_path / "ds").validate_labels(tmp_path / "w2") == {
        0: int(np.sum(lab == 0)), 1: int(np.sum(lab == 3)), 2: int(np.sum(lab == 7))}
    (tmp_path / "ds" / "classes.json").write_text(json.dumps(table + [{"value": 255, "name": "cloud"}]))
    ds = geolabels.LAYOUT.open(tmp_path / "ds")
    assert ds.classes[-1].name == "cloud" and ds.validate_labels(tmp_path / "w3")[3] == int(np.sum(lab == 255))


def test_geo_classes_json_is_the_table(tmp_path: Path) -> None:
    geo_raster_dataset(tmp_path / "ds", stems=("a",), label_crs=True)
    table = [{"value": 0, "name": "background", "color": [0, 0, 0]},
             {"value": 3, "name": "water", "color": [0, 0, 255]},
             {"value": 7, "name": "forest"}, {"value": 9, "name": "urban"}]
    (tmp_path / "ds" / "classes.json").write_text(json.dumps(table))
    ds = geolabels.LAYOUT.open(tmp_path / "ds")
    assert [(c.value, c.name) for c in ds.classes] == [(0, "background"), (1, "water"), (2, "forest"), (3, "urban")]
    assert ds.classes[1].color == (0, 0, 255)
    assert ds.validate_labels(tmp_path / "work")[3] == 0
    (tmp_path / "ds" / "classes.json").write_text(json.dumps(table[:2] + table[3:]))  # 7 left out
    lab = np.full((64, 64), 3, np.uint8)
    lab[0, :5], lab[1, 0] = 7, 200
    lab[2:, :] = 255  # the label raster's own nodata: no label there, whatever the table says
    write_geotiff(tmp_path / "ds" / "labels" / "a.tif", lab, nodata=255)
    ds = geolabels.LAYOUT.open(tmp_path / "ds")
    with pytest.raises(InvalidInputError, match=r"a.tif: label values 7, 200 are not in the label table"):
        ds.validate_labels()
    labels = ds.read(ds.cases[0], tmp_path / "work2").labels
    assert np.all(labels[2:] == 255) and np.all(labels[0:2, 5:] == 1)


def test_a_label_nodata_that_classes_json_names_is_that_class_and_otherwise_no_label(tmp_path):
    """QGIS and GDAL exports often mark a label raster's 0 as nodata while 0 is the background: with classes.json
    naming 0, its pixels were still masked, and the class was never trained on, without a word."""
    geo_raster_dataset(tmp_path / "ds", values=(0, 3, 7), label_crs=True)
    for path in (tmp_path / "ds" / "labels").iterdir():
        with rasterio.open(path, "r+") as dst:
            dst.nodata = 0
    with rasterio.open(tmp_path / "ds" / "labels" / "tile_a.tif") as src:
        truth = src.read(1)
    ds = geolabels.LAYOUT.open(tmp_path / "ds")  # no classes.json: nodata is no label, and the user is told
    assert ds.notes() == ["the label rasters' nodata value 0 marks pixels without a label, which are not trained "
                          "on; if 0 is a class, list it in classes.json"]
    assert ds.nodata_classes() == []
    labels = ds.read(ds.cases[0], tmp_path / "work").labels[...]
    assert np.array_equal(labels == 255, truth == 0) and np.count_nonzero(truth == 0) > 0
    table = [{"value": 0, "name": "background"}, {"value": 3, "name": "water"}, {"value": 7, "name": "forest"}]
    (tmp_path / "ds" / "classes.json").write_text(json.dumps(table))
    ds = geolabels.LAYOUT.open(tmp_path / "ds")
    assert ds.notes() == ["the label rasters' nodata value 0 is the class 'background' in classes.json: its "
                          "pixels are trained as that class"]
    assert ds.nodata_classes() == [0]  # recorded in the card: segflow evaluate --classes MODEL counts it too
    labels = ds.read(ds.cases[0], tmp_path / "work2").labels[...]
    assert np.array_equal(labels, np.searchsorted([0, 3, 7], truth))  # 0, 3, 7 -> classes 0, 1, 2; none ignored


def _shifted_grid(root: Path) -> None:
    write_geotiff(root / "labels" / "tile_a.tif", np.zeros((64, 64), np.uint8), transform=GRID * GRID.translation(3, 0))


BAD_GEO = {
    "no labels folder": (lambda r: _drop(r / "labels"), "labels: missing"),
    "image without label": (lambda r: _drop(r / "labels" / "tile_b.tif"), "tile_b.tif: image without a label"),
    "label without image": (lambda r: write_geotiff(r / "labels" / "tile_c.tif", np.zeros((64, 64), np.uint8)),
                            "tile_c.tif: label without an image"),
    "shape mismatch": (lambda r: write_geotiff(r / "labels" / "tile_a.tif", np.zeros((60, 64), np.uint8), crs=None,
                                               transform=None), "tile_a.tif: label raster is 64x60"),
    "other grid": (_shifted_grid, "tile_a.tif: label raster is not on image tile_a.tif's grid"),
    "other crs": (lambda r: write_geotiff(r / "labels" / "tile_a.tif", np.zeros((64, 64), np.uint8), crs="EPSG:32632"),
                  "tile_a.tif: label raster is not on"),
    "float labels": (lambda r: write_geotiff(r / "labels" / "tile_a.tif", np.zeros((64, 64), np.float32)),
                     "tile_a.tif: label raster has float32 pixels"),
    "two labels": (lambda r: write_vector(r / "labels" / "tile_a.geojson", [pixel_box(0, 0, 2, 2)]),
                   "tile_a.tif: tile_a.geojson already has the stem"),
    "broken link": (lambda r: (r / "labels" / "tile_b.tif").unlink() or (r / "labels" / "tile_b.tif").symlink_to(
        r / "nowhere.tif"), "tile_b.tif: is a broken symbolic link"),
    "bad classes.json": (lambda r: (r / "classes.json").write_text('[{"value": -1, "name": "x"}]'),
                         "classes.json: bad class entry: value"),
}


@pytest.mark.parametrize("case", sorted(BAD_GEO))
def test_malformed_geo_raises_naming_the_file(tmp_path: Path, case: str) -> None:
    geo_raster_dataset(tmp_path)
    damage, message = BAD_GEO[case]
    damage(tmp_path)
    with pytest.raises(InvalidInputError, match=message) as err:
        geolabels.LAYOUT.open(tmp_path)
    assert "\n" not in str(err.value)


def test_geo_detection_is_strict(tmp_path: Path) -> None:
    write_geotiff(tmp_path / "scene.tif", raster_image())
    write_geotiff(tmp_path / "scene_labels.tif", np.zeros((64, 64), np.uint8))
    assert not geolabels.LAYOUT.detect(tmp_path)


# --------------------------------------------------------------------------- geo: vector layers


def test_vector_rectangles_rasterise_to_exact_pixel_counts(tmp_path: Path) -> None:
    boxes = [(0, 0, 10, 10), (20, 20, 30, 40), (50, 5, 63, 9)]
    geo_vector_dataset(tmp_path / "ds", boxes, {"class": ["Roof", "road", "roof"]}, suffix=".gpkg")
    ds = geolabels.LAYOUT.open(tmp_path / "ds")
    assert [(c.value, c.name) for c in ds.classes] == [(0, "background"), (1, "road"), (2, "Roof")]
    case = ds.cases[0]
    assert case.labels is None and case.annotation.class_attribute == "class"
    labels = ds.read(case, tmp_path / "work").labels[...]
    assert (labels == 2).sum() == 100 + 13 * 4 and (labels == 1).sum() == 200
    assert np.all(labels[20:30, 20:40] == 1) and labels[19, 20] == 0
    assert (tmp_path / "work" / "scene.labels.tif").is_file()  # the rasterised layer lives in work


def test_rasterise_by_blocks_equals_at_once_and_numbers_are_values(tmp_path: Path) -> None:
    geo_vector_dataset(tmp_path, [(3, 3, 40, 12), (30, 10, 60, 50)], {"class_id": [4, 9]})
    image = tmp_path / "images" / "scene.tif"
    from storage.ingest import ingest

    store = ingest(image, tmp_path / "image.zarr")
    vector = tmp_path / "labels" / "scene.geojson"
    small = geolabels.rasterise(vector, store, tmp_path / "small.tif", class_attribute="class_id", block_rows=7)
    whole = geolabels.rasterise(vector, store.meta.geometry, tmp_path / "whole.tif", class_attribute="class_id")
    with rasterio.open(small) as a, rasterio.open(whole) as b:
        burnt = a.read(1)
        assert np.array_equal(burnt, b.read(1)) and a.crs == b.crs and a.transform == GRID and a.dtypes[0] == "uint8"
    assert (burnt == 9).sum() == 30 * 40 and (burnt == 4).sum() == 37 * 9 - 10 * 2  # the later feature wins
    ds = geolabels.LAYOUT.open(tmp_path)
    assert [(c.value, c.name) for c in ds.classes] == [(0, "background"), (1, "class 4"), (2, "class 9")]
    classes = [LabelClass(value=0, name="background"), LabelClass(value=4, name="a")]
    with pytest.raises(InvalidInputError, match=r"scene.geojson: feature 1 has class 9 in 'class_id', which is not"):
        geolabels.rasterise(vector, store, tmp_path / "x.tif", class_attribute="class_id", classes=classes)


def test_vector_in_epsg4326_is_reprojected(tmp_path: Path) -> None:
    geo_vector_dataset(tmp_path, [(10, 10, 20, 30)], None, crs="EPSG:4326")
    ds = geolabels.LAYOUT.open(tmp_path)
    assert [(c.value, c.name) for c in ds.classes] == [(0, "background"), (1, "scene")]  # no class attribute
    labels = ds.read(ds.cases[0], tmp_path / "work").labels[...]
    assert (labels == 1).sum() == 200 and np.all(labels[10:20, 10:30] == 1)


def test_vector_names_checked_against_classes_json(tmp_path: Path) -> None:
    geo_vector_dataset(tmp_path, [(0, 0, 5, 5), (10, 10, 20, 20)], {"label": ["building", "BUILDING "]})
    (tmp_path / "classes.json").write_text(json.dumps([{"value": 0, "name": "background"},
                                                        {"value": 6, "name": "Building"}]))
    ds = geolabels.LAYOUT.open(tmp_path)
    assert [(c.value, c.name) for c in ds.classes] == [(0, "background"), (1, "Building")]
    assert ds.validate_labels() == {0: 64 * 64 - 125, 1: 125}  # names match in any case; value 6 -> class 1
    write_vector(tmp_path / "labels" / "scene.geojson", [pixel_box(0, 0, 5, 5), pixel_box(9, 9, 12, 12)],
                 {"label": ["building", "pool"]})
    with pytest.raises(InvalidInputError, match=r"scene.geojson: feature 1 has class 'pool' in 'label'"):
        geolabels.LAYOUT.open(tmp_path)


def test_a_vector_class_0_is_refused_as_the_fill_it_would_vanish_into(tmp_path: Path) -> None:
    """Pixels no feature covers are burnt as 0.  A layer numbering its classes from 0 had its class 0 merged into
    the background without a word; with a classes.json naming 0 "building", the uncovered pixels trained as
    buildings.  And a classes.json without 0 was blamed on the layer (research-group probe, 2026-12-06)."""
    geo_vector_dataset(tmp_path, [(0, 0, 20, 20), (30, 30, 40, 50)], {"class": [0, 1]})
    message = (r"scene.geojson: feature 0 has class 0 in 'class', value 0, which is what the pixels no feature "
               r"covers are burnt as, so its pixels could not be told from them; give the classes values from 1")
    with pytest.raises(InvalidInputError, match=message):
        geolabels.LAYOUT.open(tmp_path)
    write_vector(tmp_path / "labels" / "scene.geojson", [pixel_box(0, 0, 20, 20), pixel_box(30, 30, 40, 50)],
                 {"class": ["building", "road"]})
    (tmp_path / "classes.json").write_text(json.dumps([{"value": 0, "name": "building"},
                                                        {"value": 1, "name": "road"}]))
    with pytest.raises(InvalidInputError, match=r"feature 0 has class 'building' in 'class', value 0, "):
        geolabels.LAYOUT.open(tmp_path)
    (tmp_path / "classes.json").write_text(json.dumps([{"value": 1, "name": "building"},
                                                        {"value": 2, "name": "road"}]))
    with pytest.raises(InvalidInputError, match=r"classes.json: has no class 0, the value the pixels no vector "
                                                r"feature covers are burnt as; add \{\"value\": 0, "):
        geolabels.LAYOUT.open(tmp_path)
    (tmp_path / "classes.json").write_text(json.dumps([{"value": 0, "name": "background"},
                                                        {"value": 1, "name": "building"},
                                                        {"value": 2, "name": "road"}]))
    ds = geolabels.LAYOUT.open(tmp_path)
    assert ds.validate_labels() == {0: 64 * 64 - 400 - 200, 1: 400, 2: 200}


def test_vector_far_from_its_image_is_refused(tmp_path: Path) -> None:
    geo_vector_dataset(tmp_path, [(0, 0, 5, 5)], None)
    write_vector(tmp_path / "labels" / "scene.geojson", [shapely.box(0, 0, 1, 1)], crs="EPSG:4326")
    with pytest.raises(InvalidInputError, match="scene.geojson: vector layer .* does not overlap image scene.tif"):
        geolabels.LAYOUT.open(tmp_path)


def test_a_geojson_in_utm_without_its_crs_member_says_so(tmp_path: Path) -> None:
    """RFC 7946 GeoJSON is longitude and latitude: a UTM export without its 'crs' member reads as EPSG:4326, and
    the line had only said the layer does not overlap the image."""
    geo_vector_dataset(tmp_path, [(0, 0, 5, 5)], None)
    path = tmp_path / "labels" / "scene.geojson"
    doc = json.loads(path.read_text())
    doc.pop("crs", None)
    path.write_text(json.dumps(doc))
    with pytest.raises(InvalidInputError, match=r"scene.geojson: vector layer is read as EPSG:4326 \(longitude, "
                                                r"latitude\) but holds coordinates up to \(\d+, \d+\), which are no "
                                                r"degrees: a GeoJSON in a projected CRS needs its 'crs' member"):
        geolabels.LAYOUT.open(tmp_path)


def test_class_codes_written_as_text_are_class_values(tmp_path: Path) -> None:
    """Codes "1", "10", "2" (GeoJSON exporters often write numbers as text) were sorted as text (class 2 named
    '10'), then read as names: renumbered without the note numbers get, and refused against a classes.json of
    values ("class '1' ... not in the label table").  They are the values they spell, as numbers are."""
    geo_vector_dataset(tmp_path, [(0, 0, 5, 5), (10, 10, 20, 20), (30, 30, 40, 40)], {"class": ["1", "10", "2"]})
    ds = geolabels.LAYOUT.open(tmp_path)
    assert [(c.value, c.name) for c in ds.classes] == [(0, "background"), (1, "class 1"), (2, "class 2"),
                                                       (3, "class 10")]
    assert ds.table.values == (0, 1, 2, 10)  # what training's renumbering note reads (value 10 -> class 3)
    labels = ds.read(ds.cases[0], tmp_path / "work").labels[...]
    assert labels[2, 2] == 1 and labels[15, 15] == 3 and labels[35, 35] == 2
    (tmp_path / "classes.json").write_text(json.dumps([{"value": 0, "name": "background"},
                                                        {"value": 1, "name": "water"}, {"value": 2, "name": "forest"},
                                                        {"value": 10, "name": "urban"}]))
    ds = geolabels.LAYOUT.open(tmp_path)
    labels = ds.read(ds.cases[0], tmp_path / "work2").labels[...]
    assert labels[2, 2] == 1 and labels[15, 15] == 3 and labels[35, 35] == 2
    write_vector(tmp_path / "labels" / "scene.geojson", [pixel_box(0, 0, 5, 5)], {"class": ["4"]})
    with pytest.raises(InvalidInputError, match=r"scene.geojson: feature 0 has class 4 in 'class', which is not in "
                                                r"the label table \(0, 1, 2, 10\)"):
        geolabels.LAYOUT.open(tmp_path)


def _empty_layer(path: Path) -> Path:
    """A GeoJSON FeatureCollection with no feature: a tile with nothing in it, as exporters write one."""
    path.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    return path


def test_a_vector_layer_without_features_is_a_tile_of_background(tmp_path: Path) -> None:
    """An empty FeatureCollection has no attributes, and was refused: "has no class attribute (class, ...) but the
    label table has 2 classes besides background" (with classes.json), or "while other layers have one"."""
    geo_vector_dataset(tmp_path, [(0, 0, 10, 10), (20, 20, 30, 30)], {"class": ["water", "forest"]})
    write_geotiff(tmp_path / "images" / "blank.tif", raster_image(1))
    _empty_layer(tmp_path / "labels" / "blank.geojson")
    ds = geolabels.LAYOUT.open(tmp_path)  # the table from the layers that have features
    assert [c.name for c in ds.classes] == ["background", "forest", "water"]
    assert ds.notes() == ["blank.geojson has no features: its tile is read as background alone"]
    blank = next(c for c in ds.cases if c.id == "blank")
    assert np.all(ds.read(blank, tmp_path / "work").labels[...] == 0)
    (tmp_path / "classes.json").write_text(json.dumps([{"value": 0, "name": "background"},
                                                        {"value": 1, "name": "water"},
                                                        {"value": 2, "name": "forest"}]))
    ds = geolabels.LAYOUT.open(tmp_path)
    assert ds.validate_labels(tmp_path / "work2") == {0: 2 * 64 * 64 - 200, 1: 100, 2: 100}


def test_line_features_are_burnt_with_a_note(tmp_path: Path) -> None:
    """A LineString burns as a 1-pixel-wide stroke where an area was probably meant; it had trained so without a
    word."""
    import pyogrio.raw

    geo_vector_dataset(tmp_path, [(0, 0, 10, 10)], {"class": [1]})
    x0, y0 = GRID * (20, 20)
    x1, y1 = GRID * (40, 20)
    geoms = [pixel_box(0, 0, 10, 10), shapely.LineString([(x0, y0 - 5), (x1, y1 - 5)]),
             shapely.MultiLineString([[(x0, y0 - 205), (x1, y1 - 205)]])]
    pyogrio.raw.write(tmp_path / "labels" / "scene.geojson", geometry=shapely.to_wkb(np.asarray(geoms, dtype=object)),
                      field_data=[np.asarray([1, 2, 2])], fields=["class"], crs=UTM, geometry_type="Unknown",
                      driver="GeoJSON")
    ds = geolabels.LAYOUT.open(tmp_path)
    assert ds.notes() == ["2 line features in scene.geojson were burnt as 1-pixel-wide lines (polygons are "
                          "expected for areas)"]
    labels = ds.read(ds.cases[0], tmp_path / "work").labels[...]
    assert set(np.nonzero(labels == 2)[0].tolist()) == {20, 40} and (labels == 2).sum() >= 2 * 20  # one row each
    assert (labels == 1).sum() == 100
    geo_vector_dataset(tmp_path / "polygons", [(0, 0, 10, 10)], {"class": [1]})
    assert geolabels.LAYOUT.open(tmp_path / "polygons").notes() == []


def test_dataset_and_classes_json_with_a_byte_order_mark_are_read(tmp_path: Path) -> None:
    """Notepad and PowerShell save UTF-8 with a byte-order mark: such a dataset.json was refused as "is not valid
    JSON: Unexpected UTF-8 BOM (decode using utf-8-sig)"."""
    nnunet_dataset(tmp_path / "nn")
    doc = tmp_path / "nn" / "dataset.json"
    doc.write_bytes(b"\xef\xbb\xbf" + doc.read_bytes())
    assert [c.name for c in decathlon.LAYOUT.open(tmp_path / "nn").classes] == ["background", "liver", "tumour"]
    geo_raster_dataset(tmp_path / "geo", stems=("a",))
    table = [{"value": 0, "name": "background"}, {"value": 3, "name": "water"}, {"value": 7, "name": "forest"}]
    (tmp_path / "geo" / "classes.json").write_text(json.dumps(table), encoding="utf-8-sig")
    assert [c.name for c in geolabels.LAYOUT.open(tmp_path / "geo").classes] == ["background", "water", "forest"]


def test_a_vector_layer_with_a_crs_over_an_image_without_one_is_refused(tmp_path: Path) -> None:
    """Nothing could be burnt (the layer's longitudes and latitudes are not on the CRS-less image's grid), and
    training went on with background only: best Dice 0.0, exit 0."""
    geo_vector_dataset(tmp_path, [(0, 0, 5, 5)], None)
    write_geotiff(tmp_path / "images" / "scene.tif", raster_image(0), crs=None)
    with pytest.raises(InvalidInputError, match=r"scene.geojson: vector layer \(EPSG:32633\) has a CRS and image "
                                                r"scene.tif has none"):
        geolabels.LAYOUT.open(tmp_path)


def test_a_vector_file_with_several_layers_is_refused_naming_them(tmp_path: Path) -> None:
    """A GeoPackage of a 'water' and a 'roads' layer: only the first was read (with pyogrio's warning on the
    terminal), and every road pixel trained as background."""
    import pyogrio.raw

    path = geo_vector_dataset(tmp_path, [(0, 0, 5, 5)], {"label": ["water"]}, suffix=".gpkg")
    roads = shapely.to_wkb(np.asarray([pixel_box(10, 10, 20, 20)], dtype=object))
    pyogrio.raw.write(path, geometry=roads, field_data=[np.asarray(["road"])], fields=["label"], crs=UTM,
                      geometry_type="Polygon", driver="GPKG", layer="roads")
    with pytest.raises(InvalidInputError, match=r"scene.gpkg: has 2 layers \(scene, roads\); segflow reads one "
                                                r"layer per file"):
        geolabels.LAYOUT.open(tmp_path)


# --------------------------------------------------------------------------- real data and the registry


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def test_real_building_footprints(tmp_path: Path) -> None:
    image = shared("labelled/buildings/sample_geotiff.tif")
    footprints = shared("labelled/buildings/geotiff_labels.geojson")
    mask = shared("labelled/buildings/sample_fp_mask.tif")
    _link(image, tmp_path / "vec" / "images" / "x.tif")
    _link(footprints, tmp_path / "vec" / "labels" / "x.geojson")
    ds = geolabels.LAYOUT.open(tmp_path / "vec")
    assert [c.name for c in ds.classes] == ["background", "x"]  # no class attribute in the layer
    data = ds.read(ds.cases[0], tmp_path / "work")
    labels = data.labels[...]
    assert data.spacing == (0.5, 0.5) and labels.shape == (900, 900)
    # every one of the 43 footprints lies inside the image: pixels burnt = their area in 0.25 m² pixels
    import pyogrio.raw

    area = shapely.area(shapely.union_all(shapely.from_wkb(pyogrio.raw.read(footprints)[2]))) / 0.25
    assert abs((labels == 1).sum() - area) < 0.002 * area
    # the solaris mask beside them was drawn from another annotation (sample.csv), not from these 43
    # footprints: it covers 117996 pixels, the footprints 33818 (Dice 0.075); read it as a label raster
    _link(image, tmp_path / "ras" / "images" / "x.tif")
    _link(mask, tmp_path / "ras" / "labels" / "x.tif")  # no CRS, same shape: taken as on the image grid
    ras = geolabels.LAYOUT.open(tmp_path / "ras")
    with pytest.raises(InvalidInputError, match="hold 0 and 255, and 255 means no label: if it is a class"):
        ras.classes  # noqa: B018 - a 0/255 mask: 255 is no label unless classes.json says it is a class
    (tmp_path / "ras" / "classes.json").write_text(json.dumps([{"value": 0, "name": "background"},
                                                                {"value": 255, "name": "building"}]))
    ras = geolabels.LAYOUT.open(tmp_path / "ras")
    assert [c.name for c in ras.classes] == ["background", "building"]
    assert ras.validate_labels(tmp_path / "work2") == {0: 900 * 900 - 117996, 1: 117996}


def test_real_brain_lesion_as_nnunet(tmp_path: Path) -> None:
    image = shared("labelled/brain-lesion/brain1_image.nii.gz")
    label = shared("labelled/brain-lesion/brain1_label.nii.gz")
    _link(image, tmp_path / "imagesTr" / "brain1_0000.nii.gz")
    _link(label, tmp_path / "labelsTr" / "brain1.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "numTraining": 1,
                                                       "labels": {"background": 0, "lesion": 1},
                                                       "file_ending": ".nii.gz"}))
    ds = decathlon.LAYOUT.open(tmp_path)
    data = ds.read(ds.cases[0], tmp_path / "work", check=True)
    assert data.image.shape == (1, 25, 256, 256) and data.labels.shape == (25, 256, 256)
    assert data.spacing == pytest.approx((6.5, 0.78125, 0.78125))
    assert ds.validate_labels(tmp_path / "work")[1] == 4137


def test_open_dataset_finds_both_layouts(tmp_path: Path) -> None:
    if any(importlib.util.find_spec(f"storage.datasets.{m}") is None for m in ("voc", "cityscapes", "coco")):
        pytest.skip("storage.datasets.voc, cityscapes and coco are not written yet")
    from storage.datasets import open_dataset

    nnunet_dataset(tmp_path / "nn")
    geo_raster_dataset(tmp_path / "geo")
    msd_dataset(tmp_path / "msd")
    assert [open_dataset(tmp_path / p).layout for p in ("nn", "geo", "msd")] == ["decathlon", "geo", "decathlon"]
