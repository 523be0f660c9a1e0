"""The STAC Item beside a raster output, read back with pystac and checked with stac-model; offline, no mocks."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.warp import transform_bounds
from stac_model.schema import MLModelProperties

from storage.classes import LabelClass
from storage.errors import ExportError, InvalidInputError
from storage.stac import RASTER_SCHEMA, pystac_misreads, stac_item_path, write_stac_item
from storage.stacassets import plan_item

NAME_PATTERN = re.compile(r"^[0-9A-Za-z\-_]+$")

CLASSES = [
    LabelClass(value=0, name="background", color=(0, 0, 0)),
    LabelClass(value=1, name="Tree cover / forest", color=(0, 128, 10)),
    LabelClass(value=2, name="built-up", color=(255, 0, 171)),
]

MODEL = {
    "name": "demo-landcover",
    "architecture": "unet",
    "framework": "pytorch",
    "weights_sha256": "ab" * 32,
    "bands": ["blue", "green", "red", "nir"],
    "value_scaling": [{"type": "z-score", "mean": m, "stddev": 100.0} for m in (400.0, 600.0, 500.0, 2500.0)],
    "roi": [256, 256],
    "accelerator": "cpu",
}


def raw_bands(item: Path, asset: str) -> list[tuple[str, object]]:
    return [(b["data_type"], b.get("nodata")) for b in json.loads(item.read_text())["assets"][asset]["bands"]]


def make_cog(path: Path, *, crs: str | None = "EPSG:32633", transform: Affine | None = None,
             shape: tuple[int, int] = (64, 48), count: int = 1, dtype: str = "uint8") -> Path:
    """A small tiled, compressed GeoTIFF with an overview: the layout of a COG, made with rasterio alone."""
    transform = transform or Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0)
    data = (np.arange(count * shape[0] * shape[1]) % 3).reshape(count, *shape).astype(dtype)
    with rasterio.open(path, "w", driver="GTiff", width=shape[1], height=shape[0], count=count, dtype=dtype,
                       crs=CRS.from_user_input(crs) if crs else None, transform=transform, tiled=True,
                       blockxsize=16, blockysize=16, compress="deflate") as ds:
        ds.write(data)
        ds.build_overviews([2], rasterio.enums.Resampling.nearest)
    return path


def test_asset_hrefs_are_uri_references_a_hash_in_a_name_does_not_cut(tmp_path: Path) -> None:
    """``scan #1.tif`` was written raw: read as a URI its path was ``scan `` and ``1.tif`` a fragment."""
    from urllib.parse import urljoin

    label = make_cog(tmp_path / "my scène 北 #1?.tif")
    written = write_stac_item(label, item_id="x", label_cog=label, classes=CLASSES, model=MODEL, gsd=10.0,
                              source=str(tmp_path / "in #2.tif"), datetime_=datetime(2024, 5, 17, tzinfo=timezone.utc))
    doc = json.loads(written.read_text())
    href = doc["assets"]["labels"]["href"]
    [source] = [link["href"] for link in doc["links"] if link["rel"] == "derived_from"]
    assert source == f"{tmp_path}/in %232.tif"  # the source's path, not cut at its '#' either
    assert href == "./my scène 北 %231%3F.tif"
    assert urljoin("https://host/out/x.stac.json", href) == "https://host/out/my scène 北 %231%3F.tif"
    from storage.stacassets import _absolute

    assert _absolute(href, tmp_path, None) == str(label.resolve())  # segflow reads its own item back


@pytest.mark.parametrize("name", ["scan #1.tif", "scan?1.tif", "scan;1.tif", "scan 100%.tif"])
def test_names_pystac_misreads_are_named_and_pystac_does_misread_them(tmp_path: Path, name: str) -> None:
    """An output name holding '#', '?', ';' or '%': the href is a valid URI reference, and pystac still does not
    find the file (segflow says so when it writes the item).  If pystac learns to, this test says the warning can go."""
    label = make_cog(tmp_path / name)
    item_path = write_stac_item(label, item_id="x", label_cog=label, classes=CLASSES, model=MODEL, gsd=10.0,
                                source=str(label), datetime_=datetime(2024, 5, 17, tzinfo=timezone.utc))
    plain = item_path.rename(tmp_path / "item.json")  # pystac cannot even read the item under such a name
    asset = pystac.Item.from_file(str(plain)).assets["labels"]
    assert not Path(asset.get_absolute_href()).exists()
    assert pystac_misreads([item_path.name, label.name, "plain é.tif"]) == [item_path.name, label.name]


def test_item_round_trip_with_all_extensions(tmp_path: Path) -> None:
    at20 = Affine(20.0, 0.0, 500000.0, 0.0, -20.0, 5000000.0)  # a 20 m input's grid, labels brought back to it
    label = make_cog(tmp_path / "scene.tif", transform=at20)
    probs = make_cog(tmp_path / "scene.probabilities.tif", count=3, dtype="float32", transform=at20)
    vectors = tmp_path / "scene.gpkg"
    vectors.write_bytes(b"")  # only its name and place matter to the item
    when = datetime(2024, 5, 17, 10, 30, tzinfo=timezone.utc)
    weights = {"href": "/models/demo/weights.safetensors", "sha256": "ab" * 32, "size": 1234,
               "type": "application/octet-stream; application=safetensors", "artifact_type": "safetensors"}
    written = write_stac_item(label, item_id="scene", label_cog=label, classes=CLASSES, model=MODEL, gsd=10.0,
                              source="s3://bucket/in/scene.tif", probability_cog=probs, vectors=vectors,
                              datetime_=when, weights=weights)

    assert written == tmp_path / "scene.stac.json" == stac_item_path(label)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    item = pystac.Item.from_file(str(written))
    assert item.id == "scene" and item.datetime == when

    # footprint: the label COG's bounds in EPSG:4326, computed independently
    expected = transform_bounds("EPSG:32633", "EPSG:4326", 500000.0, 4998720.0, 500960.0, 5000000.0, densify_pts=21)
    assert item.bbox == pytest.approx(list(expected), abs=1e-9)
    assert 14.9 < item.bbox[0] < item.bbox[2] < 15.1 and 45.1 < item.bbox[1] < item.bbox[3] < 45.2
    ring = item.geometry["coordinates"][0]
    assert item.geometry["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 5

    # projection: the native grid
    assert item.properties["proj:code"] == "EPSG:32633"
    assert item.properties["proj:shape"] == [64, 48]
    assert item.properties["proj:transform"] == [20.0, 0.0, 500000.0, 0.0, -20.0, 5000000.0]
    assert item.properties["gsd"] == 10.0

    # each raster asset its own pixel size: the item's gsd is the model's, and these were written at 20 m
    assert item.assets["labels"].extra_fields["gsd"] == 20.0
    assert item.assets["probabilities"].extra_fields["gsd"] == 20.0

    # assets, relative to the item and resolving to the files
    labels = item.assets["labels"]
    assert labels.roles == ["data", "labels"] and labels.href == "./scene.tif"
    assert Path(labels.get_absolute_href()).resolve() == label.resolve()
    assert Path(item.assets["probabilities"].get_absolute_href()).resolve() == probs.resolve()
    assert [b["name"] for b in item.assets["probabilities"].extra_fields["bands"]] == \
        ["background", "Tree_cover_forest", "built-up"]
    assert item.assets["polygons"].media_type == "application/geopackage+sqlite3"
    # MLM requires an mlm:model asset: the weights that made the labels
    model_asset = item.assets["model"]
    assert model_asset.roles == ["mlm:model", "mlm:weights"] and model_asset.href == weights["href"]
    assert model_asset.extra_fields["file:checksum"] == "1220" + "ab" * 32
    # what the files' bands hold, as they declare it: the label COG's nodata, the probabilities' type
    assert labels.extra_fields["bands"] == [{"name": "labels", "data_type": "uint8"}]
    assert {b["data_type"] for b in item.assets["probabilities"].extra_fields["bands"]} == {"float32"}
    assert raw_bands(written, "probabilities") == [("float32", None)] * 3

    # classification: exactly the given classes, with legal names and the originals kept
    got = labels.extra_fields["classification:classes"]
    assert [c["value"] for c in got] == [c.value for c in CLASSES]
    assert [c["description"] for c in got] == [c.name for c in CLASSES]
    assert [c["color_hint"] for c in got] == ["000000", "00800A", "FF00AB"]
    assert all(NAME_PATTERN.match(c["name"]) for c in got)
    assert got[1]["name"] == "Tree_cover_forest"

    # MLM, validated by stac-model's own pydantic model
    mlm = MLModelProperties.model_validate(item.properties)
    assert mlm.name == "demo-landcover" and mlm.architecture == "unet" and mlm.framework == "pytorch"
    assert set(mlm.tasks) == {"semantic-segmentation"} and str(mlm.accelerator) == "cpu"
    (inp,) = mlm.input
    assert list(inp.bands) == MODEL["bands"]
    assert inp.input.shape == [-1, 4, 256, 256] and inp.input.dim_order == ["batch", "bands", "height", "width"]
    assert inp.input.data_type == "float32"
    assert [(v.mean, v.stddev) for v in inp.value_scaling] == [(m["mean"], m["stddev"]) for m in MODEL["value_scaling"]]
    (out,) = mlm.output
    assert [(c.value, c.name, c.description) for c in out.classes] == [(c["value"], c["name"], c["description"]) for c in got]
    assert out.result.shape == [-1, 3, 256, 256]

    # lineage
    (link,) = item.get_links("derived_from")
    assert link.href == "s3://bucket/in/scene.tif"
    assert "segflow" in item.properties["processing:lineage"]
    assert MODEL["weights_sha256"] in item.properties["processing:lineage"]

    raw = json.loads(written.read_text())
    exts = raw["stac_extensions"]
    assert any("/projection/" in e for e in exts) and any("/classification/" in e for e in exts)
    assert any("/mlm/" in e for e in exts) and any("/processing/" in e for e in exts)


def test_band_facts_and_a_crs_without_a_code_in_wkt2(tmp_path: Path) -> None:
    """A catalogue reader learns the label COG's nodata and the uint8 probabilities' 1/254 scale from the item,
    and a CRS without an EPSG code comes as WKT2 in proj:wkt2 (it was WKT1: PROJCS/GEOGCS)."""
    from storage.classes import LabelClass as LC
    from storage.geometry import RasterGeometry
    from storage.cogwrite import write_label_cog, write_probability_cog

    custom = CRS.from_proj4("+proj=tmerc +lat_0=0 +lon_0=15 +k=0.9997 +x_0=500000 +y_0=0 +datum=WGS84 +units=m")
    assert custom.to_epsg() is None
    t = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0)
    geometry = RasterGeometry(crs_wkt=custom.to_wkt(), transform=tuple(t)[:6], height=32, width=40, dtype="uint8")
    labels = np.zeros((32, 40), np.uint8)
    labels[:4] = 255
    label = write_label_cog(labels, geometry, tmp_path / "s.tif", classes=[LC(value=0, name="a"),
                                                                          LC(value=1, name="b")])
    probs = np.full((2, 32, 40), 0.5, np.float32)
    prob = write_probability_cog(probs, geometry, tmp_path / "s.probabilities.tif", class_names=["a", "b"],
                                 mask=labels != 255, dtype="uint8")
    written = write_stac_item(label, item_id="s", label_cog=label, classes=CLASSES[:2], model=MODEL, gsd=10.0,
                              source="s.tif", probability_cog=prob)
    raw = json.loads(written.read_text())
    assert raw["properties"]["proj:code"] is None
    assert raw["properties"]["proj:wkt2"].startswith(("PROJCRS[", "BOUNDCRS[")), raw["properties"]["proj:wkt2"][:40]
    assert raw["assets"]["labels"]["bands"] == [{"name": "labels", "data_type": "uint8", "nodata": 255}]
    for band in raw["assets"]["probabilities"]["bands"]:
        assert (band["data_type"], band["nodata"], band["raster:scale"]) == ("uint8", 255, pytest.approx(1 / 254))
    assert RASTER_SCHEMA in raw["stac_extensions"]  # the extension whose field raster:scale is
    # segflow's own item reader (as a catalogue client) reads the scale: it had read a bare "scale" as none
    plan = plan_item(written)
    assert [b.scale for b in plan.assets["probabilities"].bands] == [pytest.approx(1 / 254)] * 2
    floats = write_probability_cog(probs, geometry, tmp_path / "f.probabilities.tif", class_names=["a", "b"],
                                   mask=labels != 255)
    written = write_stac_item(label, item_id="s", label_cog=label, classes=CLASSES[:2], model=MODEL, gsd=10.0,
                              source="s.tif", probability_cog=floats)
    assert raw_bands(written, "probabilities") == [("float32", "nan")] * 2  # JSON has no NaN


def test_names_are_sanitised_unique_and_scaling_optional(tmp_path: Path) -> None:
    label = make_cog(tmp_path / "a b.tif")
    classes = [LabelClass(value=0, name="water body"), LabelClass(value=1, name="water/body"),
               LabelClass(value=2, name="ŝ??")]
    model = {**MODEL, "value_scaling": None, "accelerator": "cuda"}
    written = write_stac_item(tmp_path / "a b.stac.json", item_id="a-b", label_cog=label, classes=classes,
                              model=model, gsd=None, source=str(tmp_path / "in.tif"))
    item = pystac.Item.from_file(str(written))
    got = item.assets["labels"].extra_fields["classification:classes"]
    assert [c["name"] for c in got] == ["water_body", "water_body_1", "class_2"]
    assert [c["description"] for c in got] == ["water body", "water/body", "ŝ??"]
    assert item.assets["labels"].href == "./a b.tif"
    assert "gsd" not in item.properties and "probabilities" not in item.assets
    mlm = MLModelProperties.model_validate(item.properties)
    assert mlm.input[0].value_scaling is None and str(mlm.accelerator) == "cuda"


def test_antimeridian_footprint_is_split(tmp_path: Path) -> None:
    # UTM 60N far east of its central meridian (177°E) at 70°N reaches past 180°
    label = make_cog(tmp_path / "east.tif", crs="EPSG:32660",
                     transform=Affine(1000.0, 0.0, 580000.0, 0.0, -1000.0, 7800000.0), shape=(32, 64))
    item = pystac.Item.from_file(str(write_stac_item(
        label, item_id="east", label_cog=label, classes=CLASSES, model=MODEL, gsd=1000.0, source="east.tif")))
    west, _, east, _ = item.bbox
    assert west > east  # crosses the antimeridian, as STAC writes it
    assert item.geometry["type"] == "MultiPolygon" and len(item.geometry["coordinates"]) == 2


@pytest.mark.parametrize("x0", [179.98, -180.02])
def test_a_grid_in_degrees_over_the_antimeridian_has_longitudes_in_range(tmp_path: Path, x0: float) -> None:
    """A scene in EPSG:4326 from 179.98 to 180.03 (or -180.02 to -179.97) kept its own longitudes through
    transform_bounds: a bbox past ±180 as one Polygon.  Wrapped, it crosses the antimeridian as STAC writes it."""
    label = make_cog(tmp_path / "am.tif", crs="EPSG:4326", transform=Affine(0.001, 0.0, x0, 0.0, -0.001, 65.0),
                     shape=(27, 50))
    item = pystac.Item.from_file(str(write_stac_item(
        label, item_id="am", label_cog=label, classes=CLASSES, model=MODEL, gsd=50.0, source="am.tif")))
    west, south, east, north = item.bbox
    assert -180 <= west <= 180 and -180 <= east <= 180 and west > east
    assert (west, east) == pytest.approx((179.98, -179.97))  # the same box either way
    assert item.geometry["type"] == "MultiPolygon"
    assert "gsd" not in item.assets["labels"].extra_fields  # a pixel in degrees is no ground sample distance
    for polygon in item.geometry["coordinates"]:
        assert all(-180 <= lon <= 180 for lon, _ in polygon[0])


def test_unusable_inputs_fail_and_leave_nothing(tmp_path: Path) -> None:
    bare = make_cog(tmp_path / "bare.tif", crs=None)
    with pytest.raises(InvalidInputError, match="bare.tif: has no CRS"):
        write_stac_item(bare, item_id="bare", label_cog=bare, classes=CLASSES, model=MODEL, gsd=1.0, source="x")

    label = make_cog(tmp_path / "scene.tif")
    with pytest.raises(ExportError, match=r"scene\.stac\.json: the model description is not valid MLM: .*accelerator"):
        write_stac_item(label, item_id="scene", label_cog=label, classes=CLASSES, model={**MODEL, "accelerator": "tpu"},
                        gsd=1.0, source="x")
    with pytest.raises(ExportError, match="lacks bands"):
        write_stac_item(label, item_id="scene", label_cog=label, classes=CLASSES, model={**MODEL, "bands": []},
                        gsd=1.0, source="x")
    with pytest.raises(ExportError, match="cannot read the label COG"):
        write_stac_item(label, item_id="scene", label_cog=tmp_path / "missing.tif", classes=CLASSES, model=MODEL,
                        gsd=1.0, source="x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.tif", "scene.tif"]
