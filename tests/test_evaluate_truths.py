"""``segflow evaluate`` against truths as datasets keep them: 16-bit grey label PNGs, values the class table leaves
out, and annotations that are no label raster (vector layers, COCO JSON, panoptic PNGs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import from_origin

from flows.evaluate import evaluate_files
from storage.classes import LabelClass
from tests.test_evaluate import error_lines, invoke, write_plain_tif

pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")


def labels_2d() -> np.ndarray:
    """(24, 24) class numbers 0..2: two squares on a background."""
    a = np.zeros((24, 24), np.uint8)
    a[2:10, 2:10] = 1
    a[12:20, 12:22] = 2
    return a


def write_geo_tif(path: Path, labels: np.ndarray, classes: dict[int, str] | None = None) -> Path:
    """A georeferenced label GeoTIFF at the labels' own dtype, with a segflow CLASSES tag when ``classes``."""
    with rasterio.open(path, "w", driver="GTiff", width=labels.shape[1], height=labels.shape[0], count=1,
                       dtype=labels.dtype.name, crs="EPSG:32633", transform=from_origin(500000, 6000000, 10, 10),
                       nodata=255) as dst:
        dst.write(labels, 1)
        if classes:
            table = [LabelClass(value=v, name=n).model_dump(mode="json") for v, n in classes.items()]
            dst.update_tags(CLASSES=json.dumps(table))
    return path


def test_a_16_bit_grey_label_png_is_read_as_label_values(tmp_path):
    """nnU-Net's picture datasets train on 16-bit grey label PNGs (storage.datasets.nnunetpictures), but
    evaluate refused them: "is not a palette or 8-bit greyscale PNG of label values"."""
    truth = labels_2d().astype(np.uint16)
    truth[0, 0] = 300  # a value past 8 bits survives, as training reads it
    Image.fromarray(truth).save(tmp_path / "cell_003.png")
    assert Image.open(tmp_path / "cell_003.png").mode.startswith("I;16")
    pred = write_plain_tif(tmp_path / "cell_003_0000.tif", labels_2d())
    report = evaluate_files([pred], [tmp_path / "cell_003.png"])
    assert not report["unscored"], report["unscored"]
    rows = {r["value"]: r for r in report["cases"][0]["classes"]}
    assert rows[1]["dice"] == rows[2]["dice"] == 1.0 and rows[300]["truth_pixels"] == 1


def test_truth_values_the_class_table_leaves_out_get_one_warning_and_no_borrowed_name(tmp_path):
    """A geo dataset of values 0, 1, 1000 trains as classes 0..2, and the model names class 2 "class 1000".
    Scored without --classes against the dataset's own raster, value 1000 had been a second row named
    "class 1000", with no word; a Decathlon 0, 1, 2, 4 had given an extra row "class 4" silently."""
    pred_labels = labels_2d()
    truth = pred_labels.astype(np.uint16)
    truth[truth == 2] = 1000
    model = tmp_path / "model"
    model.mkdir()
    pred = write_geo_tif(tmp_path / "tile_3.tif", pred_labels, {0: "class 0", 1: "class 1", 2: "class 1000"})
    (tmp_path / "tile_3.provenance.json").write_text(json.dumps({"model": {"path": str(model)}}))
    (tmp_path / "labels").mkdir()
    write_geo_tif(tmp_path / "labels" / "tile_3.tif", truth)
    result = invoke(pred, "--truth", tmp_path / "labels", "--out", tmp_path / "scores")
    assert result.exit_code == 0, result.output
    [case] = json.loads((tmp_path / "scores" / "evaluation.json").read_text())["cases"]
    names = [r["name"] for r in case["classes"]]
    assert len(names) == len(set(names)), names
    assert names == ["class 0", "class 1", "class 1000", "unlisted value 1000"]
    [warning] = case["warnings"]
    assert "holds values 1000 that are not among the prediction's classes" in warning
    assert f"pass --classes MODEL (the prediction's provenance names {model}" in warning
    assert " ".join(result.output.split()).count("holds values 1000") == 1
    # a truth that holds only the table's values: no warning
    write_geo_tif(tmp_path / "labels" / "tile_3.tif", pred_labels)
    report = evaluate_files([pred], [tmp_path / "labels"])
    assert not report["cases"][0]["warnings"]


@pytest.mark.parametrize("kind", ["geojson", "gpkg"])
def test_a_vector_layer_named_like_the_prediction_is_said_to_be_one(tmp_path, kind):
    """A geo dataset's labels/tile_3.geojson beside no label raster had been "no truth named tile_3.*"."""
    pred = write_geo_tif(tmp_path / "tile_3.tif", labels_2d())
    (tmp_path / "labels").mkdir()
    layer = tmp_path / "labels" / f"tile_3.{kind}"
    layer.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    result = invoke(pred, "--truth", tmp_path / "labels", "--out", tmp_path / "scores")
    assert result.exit_code == 1
    [line] = error_lines(" ".join(result.output.split()).replace(" error:", "\nerror:"))
    assert line.startswith(f"error: {layer}: is a vector layer: evaluate reads label rasters"), line
    assert "rasterise" in line and "Traceback" not in result.output
    result = invoke(pred, "--truth", layer, "--out", tmp_path / "scores")  # given as the truth file itself
    assert result.exit_code == 1 and f"{layer}: is a vector layer" in " ".join(result.output.split())


def test_a_coco_json_or_a_panoptic_png_as_truth_is_one_plain_line(tmp_path):
    """A COCO instances JSON had been "not a label map segflow reads (.tif, ...)", a panoptic PNG (RGB segment
    ids) "is not a palette or 8-bit greyscale PNG": neither said what the file is."""
    pred = write_plain_tif(tmp_path / "000000000001.tif", labels_2d())
    coco = tmp_path / "instances_val2017.json"
    coco.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    panoptic = tmp_path / "panoptic_val2017"
    panoptic.mkdir()
    Image.fromarray(np.stack([labels_2d() * 40] * 3, axis=-1)).save(panoptic / "000000000001.png")
    for truth, says in ((coco, "is a COCO annotation file"),
                        (panoptic, "is an RGB colour picture, a COCO panoptic PNG")):
        result = invoke(pred, "--truth", truth, "--out", tmp_path / "scores")
        assert result.exit_code == 1 and "Traceback" not in result.output
        [line] = error_lines(" ".join(result.output.split()).replace(" error:", "\nerror:"))
        assert says in line and ("label PNG" in line or "class values" in line), line
