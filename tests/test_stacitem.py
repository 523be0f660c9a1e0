"""A STAC item as input: per-band COGs at 10 and 20 m, stacked for the model's bands, in the card's units.

The scene is generated (:mod:`tests.s2_samples`): B02, B03, B04, B08 at 10 m
and B11, B12 at 20 m, uint16 digital numbers, an item listing them with
``eo:bands`` and ``raster:bands`` (scale 0.0001, offset -0.1).  Each run's
labels are compared with the same model on the bands stacked by hand.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.transform
from rasterio.enums import Resampling
from typer.testing import CliRunner

from flows.config import SegmentOptions
from flows.pipeline import segment_one
from storage.bands import BandRequest, apply_units, units_facts
from storage.layout import open_image_store
from storage.stacitem import ingest_item, item_stem
from tests import s2_samples
from tests.models import tiny_model

ITEM_ID = "S2B_33TVL_20240601_0_L2A"
RGBN = ["blue", "green", "red", "nir"]
OPTIONS = SegmentOptions(chunk_size=48, keep_zarr=False)


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    return s2_samples.write_item(tmp_path_factory.mktemp("s2"), item_id=ITEM_ID)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    # "raw" and "reflectance" share their weights (same seed): only the card's units differ
    return {
        "rgbn": tiny_model(root / "rgbn", spatial_dims=2, channels=4, roi=[32, 32], channel_names=RGBN),
        "swir": tiny_model(root / "swir", spatial_dims=2, channels=4, roi=[32, 32], seed=1,
                           channel_names=["red", "nir", "swir16", "swir22"]),
        "reflectance": tiny_model(root / "refl", spatial_dims=2, channels=4, roi=[32, 32], seed=2,
                                  channel_names=RGBN, normalization={"mode": "none"}, units="reflectance"),
        "raw": tiny_model(root / "raw", spatial_dims=2, channels=4, roi=[32, 32], seed=2,
                          channel_names=RGBN, normalization={"mode": "none"}),
    }


def _labels(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def _cli(args: list[str], client) -> tuple[int, list[str], str]:
    from flows.cli import app

    res = CliRunner().invoke(app, ["segment", *args, "--chunk-size", "48", "--dask-address",
                                   client.scheduler.address], env={"COLUMNS": "400"})
    return res.exit_code, [ln for ln in res.output.splitlines() if ln.startswith("error:")], res.output


def test_a_4_band_10m_model_segments_the_item_as_the_hand_stacked_bands(scene, models, tmp_path, dask_cluster):
    out = tmp_path / "out"
    code, errors, output = _cli([str(scene), "--model", str(models["rgbn"].path), "--out", str(out), "--no-zarr"],
                                dask_cluster)
    assert code == 0 and not errors, output
    assert {f"{ITEM_ID}.tif", f"{ITEM_ID}.provenance.json"} <= {p.name for p in out.iterdir()}  # named by the id
    record = json.loads((out / f"{ITEM_ID}.provenance.json").read_text())
    details = record["input"]
    assert details["format"] == "STAC item" and details["path"] == str(scene)
    item = details["stac_item"]
    assert item["id"] == ITEM_ID and item["self_href"].endswith(f"/items/{ITEM_ID}.json")
    assert item["sha256"] == hashlib.sha256(scene.read_bytes()).hexdigest()
    assert [a["key"] for a in item["assets"]] == RGBN
    for asset in item["assets"]:
        assert asset["sha256"] == hashlib.sha256(Path(asset["href"]).read_bytes()).hexdigest()
    assert record["statistics"]["bands"] == ["B02", "B03", "B04", "B08"]
    assert "units" not in record["statistics"]  # the card declares none: the digital numbers as they are
    # the output item is dated by the scene's acquisition, the source item's datetime (was the run's "now")
    written = json.loads((out / f"{ITEM_ID}.stac.json").read_text())
    assert written["properties"]["datetime"] == json.loads(scene.read_text())["properties"]["datetime"]
    from storage.provenance import verify

    report = verify(out / f"{ITEM_ID}.provenance.json")  # the item JSON and each local asset rehashed
    assert not report.problems and not report.unverified, (report.problems, report.unverified)
    assert {v.split(" ", 2)[1] for v in report.verified if v.startswith("asset ")} == set(RGBN)

    stacked = s2_samples.hand_stacked(scene.parent, ["B02", "B03", "B04", "B08"], tmp_path / "stacked.tif")
    segment_one(stacked, models["rgbn"], tmp_path / "ref", OPTIONS, dask_cluster)
    labels = _labels(out / f"{ITEM_ID}.tif")
    assert np.array_equal(labels, _labels(tmp_path / "ref" / "stacked.tif"))
    assert len(np.unique(labels)) >= 2


def test_a_model_with_20m_bands_sees_them_resampled_bilinearly_on_the_10m_grid(scene, models, tmp_path,
                                                                               dask_cluster):
    done = segment_one(scene, models["swir"], tmp_path / "item", OPTIONS, dask_cluster)
    assert done.statistics["bands"] == ["B04", "B08", "B11", "B12"]
    bilinear = s2_samples.hand_stacked(scene.parent, ["B04", "B08", "B11", "B12"], tmp_path / "bilinear.tif")
    segment_one(bilinear, models["swir"], tmp_path / "ref", OPTIONS, dask_cluster)
    labels = _labels(tmp_path / "item" / f"{ITEM_ID}.tif")
    assert labels.shape == (128, 128)  # the finest band's grid
    assert np.array_equal(labels, _labels(tmp_path / "ref" / "bilinear.tif"))
    # the stack really is bilinear: its 20 m band differs from a nearest-neighbour one
    store = ingest_item(scene, tmp_path / "s.image.zarr", chunk=48, bands=BandRequest(("red", "swir16")))
    with rasterio.open(scene.parent / "B11.tif") as src:
        native = src.read(1)
        nearest = src.read(1, out_shape=(128, 128), resampling=Resampling.nearest)
        smooth = src.read(1, out_shape=(128, 128), resampling=Resampling.bilinear)
    assert np.array_equal(store.image[1], smooth) and not np.array_equal(store.image[1], nearest)
    # a card whose input.resampling is nearest gets its coarser bands by nearest neighbour
    request = BandRequest.of(None, ["red", "swir16"], 2, "model", resampling="nearest")
    near = ingest_item(scene, tmp_path / "n.image.zarr", chunk=48, bands=request)
    assert np.array_equal(near.image[1], nearest)
    # the grid is that of the finest band used: 20 m bands alone stay on their own grid, unresampled
    alone = ingest_item(scene, tmp_path / "t.image.zarr", chunk=48, bands=BandRequest(("swir16", "swir22")))
    assert alone.image.shape == (2, 64, 64) and np.array_equal(alone.image[0], native)
    assert alone.meta.geometry.transform[0] == 20.0


def test_a_reflectance_card_sees_dn_times_scale_plus_offset(scene, models, tmp_path, dask_cluster):
    store = ingest_item(scene, tmp_path / "s.image.zarr", chunk=48, bands=BandRequest(tuple(RGBN)))
    store = open_image_store(store.path)
    dn = np.asarray(store.image[:]).astype(np.float64)
    seen = np.asarray(apply_units(store.image, store.meta, units="reflectance"))
    assert seen.dtype == np.float32 and np.array_equal(seen, (dn * 1e-4 - 0.1).astype(np.float32))
    as_dn = np.asarray(apply_units(store.image, store.meta, units="dn", dn_scale=10000.0))
    assert np.allclose(as_dn, dn - 1000.0, atol=1e-3)  # digital numbers without the 04.00 offset
    image = store.image
    assert apply_units(image, store.meta, units=None) is image  # no units: untouched
    assert units_facts(store.meta, units="reflectance")["units"]["scales"] == [1e-4] * 4

    item = segment_one(scene, models["reflectance"], tmp_path / "refl", OPTIONS, dask_cluster)
    assert item.statistics["units"] == {"units": "reflectance", "applied": True, "scales": [1e-4] * 4,
                                        "offsets": [-0.1] * 4}
    by_hand = s2_samples.hand_stacked(scene.parent, ["B02", "B03", "B04", "B08"], tmp_path / "refl.tif",
                                      reflectance=True)
    segment_one(by_hand, models["raw"], tmp_path / "ref", OPTIONS, dask_cluster)  # same weights, no units
    segment_one(scene, models["raw"], tmp_path / "dn", OPTIONS, dask_cluster)
    labels = _labels(tmp_path / "refl" / f"{ITEM_ID}.tif")
    assert np.array_equal(labels, _labels(tmp_path / "ref" / "refl.tif"))
    assert not np.array_equal(labels, _labels(tmp_path / "dn" / f"{ITEM_ID}.tif"))  # the units change the labels


def _item(folder: Path, item_id: str, assets: dict) -> Path:
    folder.mkdir(parents=True)
    path = folder / "item.json"
    path.write_text(json.dumps(s2_samples.item_dict(item_id, assets)))
    return path


def test_bad_items_are_one_line_each_and_leave_nothing(scene, models, tmp_path, dask_cluster):
    src = scene.parent
    bands = {k: s2_samples.band_asset(k, str(src / f"{s2_samples.BANDS[k][0]}.tif")) for k in s2_samples.BANDS}
    no_nir = _item(tmp_path / "a", "no-nir", {k: bands[k] for k in ("blue", "green", "red")})
    (tmp_path / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 64)
    broken = _item(tmp_path / "b", "broken",
                   {**bands, "red": s2_samples.band_asset("red", str(tmp_path / "broken.tif"))})
    no_raster = _item(tmp_path / "c", "previews", {"thumbnail": {"href": "p.png", "type": "image/png",
                                                                 "roles": ["thumbnail"]}})
    collection = tmp_path / "collection.json"
    collection.write_text(json.dumps({"type": "Collection", "stac_version": "1.0.0", "id": "s2", "links": []}))
    # a scale that is not a number was dropped, so that band alone reached the model in digital numbers
    bad_scale = _item(tmp_path / "d", "bad-scale", {**bands, "red": {**bands["red"], "raster:bands": [
        {**bands["red"]["raster:bands"][0], "scale": "0.0001"}]}})
    # blue's raster:bands without its scale and offset: every band was converted alike, blue's digital numbers taken
    # for reflectance, and a reflectance model labelled the scene all one class
    unscaled_blue = _item(tmp_path / "f", "unscaled-blue", {**bands, "blue": {**bands["blue"], "raster:bands": [
        {k: v for k, v in bands["blue"]["raster:bands"][0].items() if k not in ("scale", "offset")}]}})
    numbered = tmp_path / "e" / "item.json"  # an id that is not a string: pydantic's error text, without the file
    _item(tmp_path / "e", "x", bands)
    numbered.write_text(json.dumps({**json.loads(numbered.read_text()), "id": 5}))
    out = tmp_path / "out"
    code, errors, output = _cli([str(no_nir), str(broken), str(no_raster), str(collection), str(bad_scale),
                                 str(numbered), str(unscaled_blue), "--model", str(models["reflectance"].path),
                                 "--out", str(out)], dask_cluster)
    assert code == 1 and len(errors) == 7, output
    expected = {no_nir: "model 'tiny-2d-4ch' needs nir, which no asset of item 'no-nir' offers (it has 3 band(s): "
                        "1:B02/blue [asset blue], 2:B03/green [asset green], 3:B04/red [asset red])",
                broken: "asset 'red' (" + str(tmp_path / "broken.tif") + ") cannot be opened",
                no_raster: "item 'previews' has no raster asset segflow can use (assets: thumbnail (image/png))",
                collection: "is not a STAC item (a STAC Collection)",
                bad_scale: "asset 'red': band 1's scale is '0.0001', not a number",
                numbered: "is not a valid STAC item: its id is int '5', not a string",
                unscaled_blue: "the bands it takes mix units: B03, B04, B08 declare a scale or offset, B02 none"}
    for path, text in expected.items():
        assert any(e.startswith(f"error: {path}: ") and text in e for e in errors), (text, errors)
    assert not out.exists() or not list(out.iterdir())

    code, errors, output = _cli([str(scene), "--model", str(models["rgbn"].path), "--out", str(out),
                                 "--bands", "B02,B03,B99,B08"], dask_cluster)
    assert code == 1 and len(errors) == 1, output
    assert errors[0].startswith(f"error: {scene}: model 'tiny-2d-4ch' needs B99, which no asset of item "
                                f"'{ITEM_ID}' offers (it has 6 band(s): 1:B02/blue [asset blue]")
    assert not out.exists() or not list(out.iterdir())
    # three for a 4-band model: refused as the item is read, as a raster's --bands is (it had been refused only at
    # the windows, as "the input has 3")
    code, errors, output = _cli([str(scene), "--model", str(models["rgbn"].path), "--out", str(out),
                                 "--bands", "B02,B03,B04"], dask_cluster)
    assert code == 1 and len(errors) == 1, output
    assert errors[0].startswith(f"error: {scene}: model 'tiny-2d-4ch' takes 4 band(s), --bands chose 3 (item "
                                f"'{ITEM_ID}' offers 6: 1:B02/blue [asset blue]"), errors
    assert not out.exists() or not list(out.iterdir())


def test_an_item_url_is_staged_and_named_by_its_id(scene, models, tmp_path, dask_cluster):
    """An fsspec URL of the item (assets with absolute hrefs) goes through staging like any input."""
    import fsspec

    from flows.staging import segment_staged

    doc = json.loads(scene.read_text())
    for asset in doc["assets"].values():
        asset["href"] = str((scene.parent / asset["href"]).resolve())
    doc["id"] = "../../S2B 33TVL/2024"  # a name from inside a file: never a path
    url = "memory://segflow-test-items/scene/item.json"
    with fsspec.open(url, "w") as f:
        f.write(json.dumps(doc))
    outcome = segment_staged(url, models["rgbn"], str(tmp_path / "out"), OPTIONS, dask_cluster)
    assert outcome.input == url
    assert {"S2B_33TVL_2024.tif", "S2B_33TVL_2024.provenance.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert item_stem(scene) == ITEM_ID
    fsspec.filesystem("memory").rm("/segflow-test-items", recursive=True)
    shutil.rmtree(tmp_path / "out")


def test_a_geotiffs_own_scales_and_offsets_are_applied_to_the_bands_picked(tmp_path):
    """GDAL scale/offset recorded at ingest, applied per picked band (in --bands order); no units: untouched."""
    from flows.modelspace import band_selection
    from storage.geotiff import ingest_geotiff

    dn = np.stack([s2_samples.band_dn(n, 64) for n in range(3)])
    path = tmp_path / "scaled.tif"
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint16",
                       crs=s2_samples.CRS, transform=rasterio.transform.from_origin(*s2_samples.ORIGIN, 10, 10)) as dst:
        dst.write(dn)
        dst.descriptions = ("B02", "B03", "B04")
        dst.scales, dst.offsets = (1e-4, 2e-4, 3e-4), (-0.1, -0.2, -0.3)
    store = ingest_geotiff(path, tmp_path / "s.image.zarr", chunk=32)
    assert store.meta.geometry.band_scales == [1e-4, 2e-4, 3e-4]
    assert store.meta.geometry.band_offsets == [-0.1, -0.2, -0.3]
    plain = ingest_geotiff(s2_samples.write_cog(tmp_path / "plain.tif", dn, 10), tmp_path / "p.image.zarr")
    assert plain.meta.geometry.band_scales == [] and plain.meta.geometry.band_offsets == []  # none known
    model = tiny_model(tmp_path / "m", spatial_dims=2, channels=2, roi=[32, 32], units="reflectance",
                       channel_names=["red", "blue"])
    image, names = band_selection(store, model, SegmentOptions())
    assert names == ["B04", "B02"]
    expected = np.stack([dn[2] * 3e-4 - 0.3, dn[0] * 1e-4 - 0.1]).astype(np.float32)
    assert np.array_equal(np.asarray(image), expected)
    image, _ = band_selection(store, model, SegmentOptions(bands=["2", "3"]))
    assert np.array_equal(np.asarray(image), np.stack([dn[1] * 2e-4 - 0.2, dn[2] * 3e-4 - 0.3]).astype(np.float32))
    no_units = tiny_model(tmp_path / "n", spatial_dims=2, channels=2, roi=[32, 32], channel_names=["red", "blue"])
    image, _ = band_selection(store, no_units, SegmentOptions())
    assert image.dtype == np.uint16 and np.array_equal(np.asarray(image), dn[[2, 0]])

    # one band's scale: it changed nothing of the bands without one, and the bands taken may not mix the two
    from storage.errors import InvalidInputError

    one = tmp_path / "one-scaled.tif"
    with rasterio.open(one, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint16",
                       crs=s2_samples.CRS, transform=rasterio.transform.from_origin(*s2_samples.ORIGIN, 10, 10)) as dst:
        dst.write(dn)
        dst.descriptions = ("B02", "B03", "B04")
        dst.scales, dst.offsets = (1.0, 1.0, 1e-4), (0.0, 0.0, -0.1)
    store = ingest_geotiff(one, tmp_path / "o.image.zarr", chunk=32)
    image, _ = band_selection(store, model, SegmentOptions(bands=["2", "1"]))  # neither declares a scale
    assert image.dtype == np.uint16 and np.array_equal(np.asarray(image), dn[[1, 0]])
    with pytest.raises(InvalidInputError, match="mix units: B04 declare a scale or offset, B02 none"):
        band_selection(store, model, SegmentOptions())  # red (B04, scaled) and blue (B02, not)


def test_an_items_ingest_is_reused_only_for_the_same_bands_and_content(scene, tmp_path):
    from flows.inputs import ingest_input

    rgbn = BandRequest(tuple(RGBN))
    first, reused = ingest_input(scene, tmp_path / "work", 48, bands=rgbn)
    assert not reused and first.path.name == f"{ITEM_ID}.c48.image.zarr"
    assert ingest_input(scene, tmp_path / "work", 48, bands=rgbn)[1]
    other, reused = ingest_input(scene, tmp_path / "work", 48, bands=BandRequest(("red", "nir")))
    assert not reused and other.meta.channel_names == ["B04", "B08"]
    nearest = BandRequest(("red", "swir16"), resampling="nearest")
    assert not ingest_input(scene, tmp_path / "work", 48, bands=BandRequest(("red", "swir16")))[1]
    assert not ingest_input(scene, tmp_path / "work", 48, bands=nearest)[1]  # another kernel: not reused
    assert ingest_input(scene, tmp_path / "work", 48, bands=nearest)[1]
    assert not [p for p in (tmp_path / "work").iterdir() if p.suffix == ".vrt"]  # the stack's VRT is gone


def test_asset_hrefs_resolve_where_the_item_was_read_from_else_against_its_self_link(tmp_path):
    from storage.stacassets import _absolute, _gdal_path

    (tmp_path / "B02.tif").write_bytes(b"")
    self_href = "s3://bucket/s2/items/x/item.json"
    assert _absolute("./B02.tif", tmp_path, self_href) == str(tmp_path / "B02.tif")  # a downloaded item's files
    assert _absolute("../B03.tif", tmp_path, self_href) == "s3://bucket/s2/items/B03.tif"
    assert _absolute("B03.tif", tmp_path, None) == str(tmp_path / "B03.tif")
    # a downloaded copy: beside the URL it came from, even where a file of that name sits beside the copy
    assert _absolute("./B02.tif", tmp_path, self_href, "s3://bucket/in/x/item.json") == "s3://bucket/in/x/B02.tif"
    assert _absolute("../B02.tif", tmp_path, None, "s3://bucket/in/x/item.json") == "s3://bucket/in/B02.tif"
    # hrefs are URI references: a percent-encoded name (a file URI, or another catalogue's relative href)
    (tmp_path / "red band #1.tif").write_bytes(b"")
    assert _absolute("./red%20band%20%231.tif", tmp_path, None) == str(tmp_path / "red band #1.tif")
    # an item copied away from its band files, its self link a local path or a file URI: beside that (both had
    # been read beside the copy, where nothing is)
    (tmp_path / "catalogue" / "bands").mkdir(parents=True)
    (tmp_path / "catalogue" / "bands" / "B04.tif").write_bytes(b"")
    copy = tmp_path / "copy"
    copy.mkdir()
    for self_link in (str(tmp_path / "catalogue" / "item.json"), (tmp_path / "catalogue" / "item.json").as_uri()):
        assert _absolute("bands/B04.tif", copy, self_link) == str(tmp_path / "catalogue" / "bands" / "B04.tif")
    assert _absolute("bands/B04.tif", copy, "item.json") == str(copy / "bands" / "B04.tif")  # relative: no place
    assert _absolute((tmp_path / "red band #1.tif").as_uri(), tmp_path, None) == str(tmp_path / "red band #1.tif")
    assert _gdal_path("s3://bucket/s2/B03.tif") == "/vsis3/bucket/s2/B03.tif"
    assert _gdal_path("https://host/s2/B03.tif") == "/vsicurl/https://host/s2/B03.tif"
    assert _gdal_path("/vsis3/bucket/B03.tif") == "/vsis3/bucket/B03.tif"


def test_gdal_is_pointed_at_the_s3_endpoint_fsspec_uses():
    from storage.rasteropen import s3_endpoint_options

    assert s3_endpoint_options({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}) == {
        "AWS_S3_ENDPOINT": "127.0.0.1:9000", "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE"}
    assert s3_endpoint_options({"AWS_ENDPOINT_URL": "http://a:1", "AWS_ENDPOINT_URL_S3": "https://minio.lan"}) == {
        "AWS_S3_ENDPOINT": "minio.lan", "AWS_HTTPS": "YES", "AWS_VIRTUAL_HOSTING": "FALSE"}
    assert s3_endpoint_options({"AWS_ENDPOINT_URL": "http://a:1", "AWS_S3_ENDPOINT": "b:2"}) == {}  # GDAL's own wins
    assert s3_endpoint_options({}) == {}


def test_an_items_quicklook_shows_its_red_green_and_blue_under_the_labels(scene, models, tmp_path, dask_cluster):
    """The quicklook of a run on an item draws the labels over the item's B04/B03/B02 (a VRT in the work folder,
    removed after): the same picture as over the same bands stacked by hand into a GeoTIFF."""
    from PIL import Image

    from flows.export import quicklook_image
    from storage.bands import BandRequest
    from storage.quicklook import raster_quicklook

    with quicklook_image(scene, BandRequest(tuple(RGBN)), tmp_path / "work") as vrt, rasterio.open(vrt) as src:
        assert src.descriptions == ("B04", "B03", "B02") and src.count == 3
    with quicklook_image(tmp_path / "nothing.json", BandRequest(tuple(RGBN)), tmp_path / "work") as none:
        assert none is None

    out = tmp_path / "out"
    outcome = segment_one(scene, models["swir"], out, SegmentOptions(quicklook=True, keep_zarr=False), dask_cluster)
    picture = out / f"{ITEM_ID}.quicklook.png"
    assert str(picture) in outcome.outputs and not (out / ".segflow-work").exists()
    hand = s2_samples.hand_stacked(scene.parent, ["B04", "B03", "B02"], tmp_path / "rgb.tif")
    info = raster_quicklook(out / f"{ITEM_ID}.tif", tmp_path / "by-hand.png", image_path=hand,
                            classes=models["swir"].card.classes)
    assert info.rgb_bands == (1, 2, 3)
    left, top, width, height = info.panel("map").box  # the map itself (the legend's areas come another way)
    got, want = (np.asarray(Image.open(p).convert("RGB"))[top:top + height, left:left + width]
                 for p in (picture, info.path))
    assert got.shape == (128 * info.magnification,) * 2 + (3,) and np.array_equal(got, want)
    plain = raster_quicklook(out / f"{ITEM_ID}.tif", tmp_path / "plain.png", classes=models["swir"].card.classes)
    assert not np.array_equal(np.asarray(Image.open(plain.path).convert("RGB"))[top:top + height, left:left + width],
                              want)  # the image does show


def test_the_raster_extensions_nodata_words_are_read_as_numbers(scene, tmp_path):
    """The raster extension allows "nan", "inf" and "-inf" as nodata; any other string is refused (above)."""
    from storage.stacassets import plan_item

    bands = {k: s2_samples.band_asset(k, str(scene.parent / f"{s2_samples.BANDS[k][0]}.tif"))
             for k in s2_samples.BANDS}
    words = {"blue": "nan", "green": "inf", "red": "-inf"}
    for key, word in words.items():
        bands[key] = {**bands[key], "raster:bands": [{**bands[key]["raster:bands"][0], "nodata": word}]}
    plan = plan_item(_item(tmp_path / "w", "words", bands))
    nodata = {band.asset: band.nodata for asset in plan.assets.values() for band in asset.bands}
    assert math.isnan(nodata["blue"]) and nodata["green"] == math.inf and nodata["red"] == -math.inf
    assert nodata["nir"] == 0.0


def test_a_pixel_is_valid_only_where_every_band_the_model_needs_has_data(scene, models, tmp_path, dask_cluster):
    """A 20 m nir file that stops half-way across the 10 m bands, and one with a nodata block of its own: the
    model needs all four bands, so those pixels are nodata in the labels.  GDAL's mask of the stack calls a pixel
    valid where any band is, and they were segmented from nir = 0 ('ok', no warning) before 2026-12-05."""
    src = scene.parent
    nir_file = src / f"{s2_samples.BANDS['nir'][0]}.tif"
    with rasterio.open(nir_file) as f:
        nir = f.read(1)
        res = f.res[0]
    assert res == 10  # the fixture's nir band is 10 m: make 20 m ones from it
    nir20 = nir.reshape(64, 2, 64, 2).mean(axis=(1, 3)).astype(np.uint16)
    folder = tmp_path / "bands"
    folder.mkdir()
    half = s2_samples.write_cog(folder / "B08_west.tif", nir20[:, :32], 20, nodata=None)  # no nodata: reads 0 past
    holed = nir20.copy()
    holed[8:24, 8:24] = 0
    hole = s2_samples.write_cog(folder / "B08_hole.tif", holed, 20)
    bands = {k: s2_samples.band_asset(k, str(src / f"{s2_samples.BANDS[k][0]}.tif")) for k in ("blue", "green", "red")}
    out = tmp_path / "out"
    for name, nir_href in (("west", half), ("hole", hole)):
        nir_asset = {**s2_samples.band_asset("nir", str(nir_href)), "gsd": 20}
        nir_asset["raster:bands"] = [{**nir_asset["raster:bands"][0], "spatial_resolution": 20,
                                      "nodata": None if name == "west" else 0}]
        if name == "west":
            del nir_asset["raster:bands"][0]["nodata"]
        item = _item(tmp_path / name, name, {**bands, "nir": nir_asset})
        code, errors, output = _cli([str(item), "--model", str(models["rgbn"].path), "--out", str(out),
                                     "--no-zarr"], dask_cluster)
        assert code == 0 and not errors, output
    west = _labels(out / "west.tif")
    assert west.shape == (128, 128)
    assert np.all(west[:, 64:] == 255) and not np.any(west[:, :64] == 255)
    holed_labels = _labels(out / "hole.tif")
    assert np.all(holed_labels[18:46, 18:46] == 255)  # inside the 20 m block (rows/cols 16-48 at 10 m)
    outside = np.ones_like(holed_labels, bool)
    outside[14:50, 14:50] = False
    assert not np.any(holed_labels[outside] == 255)


def test_ids_windows_reserves_get_a_name_it_takes():
    """A STAC id "CON" gave OUT/CON.tif, a file Windows and SMB shares cannot make; the other names stay."""
    from storage.stacitem import sanitised

    assert [sanitised(n) for n in ("CON", "nul", "COM1", "LPT9.v2", "CONSOLE", "COMX", "S2A_T33")] == \
        ["CON_", "nul_", "COM1_", "LPT9_.v2", "CONSOLE", "COMX", "S2A_T33"]


def test_control_characters_in_an_error_are_printed_as_escapes():
    """A band name "c\\x00" from an item printed a raw NUL in the error line (and an escape sequence would recolour
    the terminal); the error's path keeps its own characters for file operations."""
    from storage.errors import InputError

    err = InputError("a\x1b[31m.tif", "no band 'c\x00' here; é, 東 stay")
    assert str(err) == "a\\x1b[31m.tif: no band 'c\\x00' here; é, 東 stay" and err.path == "a\x1b[31m.tif"


def _id_item(folder: Path, scene: Path, ids: dict[str, str], item_id: str = "gee") -> Path:
    """An item whose assets are keyed and named by band id alone (no common names): {id: the scene's COG}."""
    assets = {}
    for band_id, file in ids.items():
        asset = s2_samples.band_asset("blue", str(scene.parent / file))
        asset["eo:bands"] = [{"name": band_id}]
        assets[band_id] = asset
    return _item(folder, item_id, assets)


def test_an_items_band_ids_are_read_for_the_sensor_they_tell(scene, tmp_path):
    """Assets named B2 ... B12 without common names (Earth Engine's ids): nir was looked for as B08, B8A or B5, never
    B8 (Landsat's pan), so it was refused, or red edge B5 was taken where the item had one.  Now B8, where the ids
    say Sentinel-2; where they fit several sensors that read them differently, refused in one line."""
    from storage.errors import IncompatibleInputError
    from storage.stacassets import plan_item

    files = {"B2": "B02.tif", "B3": "B03.tif", "B4": "B04.tif", "B8": "B08.tif", "B11": "B11.tif", "B12": "B12.tif"}
    s2 = _id_item(tmp_path / "a", scene, files)
    assert plan_item(s2, BandRequest(tuple(RGBN))).names == ["B2", "B3", "B4", "B8"]
    five = _id_item(tmp_path / "b", scene, {**{k: files[k] for k in ("B2", "B3", "B4")}, "B5": "B11.tif",
                                            "B8": "B08.tif"})
    with pytest.raises(IncompatibleInputError) as err:
        plan_item(five, BandRequest(tuple(RGBN), model="model 'lc'"))
    assert str(err.value).startswith(f"{five}: model 'lc' needs blue, green, red, nir, but the band ids of item 'gee' "
                                     "fit more than one sensor")
    assert "B8 [asset B8] is nir in Sentinel-2, pan in Landsat 8-9 and Landsat 4-7" in str(err.value)
    assert plan_item(five, BandRequest(("B2", "B3", "B4", "B8"), from_user=True)).names == ["B2", "B3", "B4", "B8"]


def test_a_band_asked_for_again_is_taken_from_an_item_as_from_a_geotiff(scene, models, tmp_path, dask_cluster):
    """--bands 1,1,1,1 (one band as every channel) was taken for a GeoTIFF and refused for an item ("name one band
    of item ... twice"), though the docs say a band may be asked for again.  Two names of one band stay refused."""
    from storage.errors import IncompatibleInputError
    from storage.stacassets import plan_item

    done = segment_one(scene, models["rgbn"], tmp_path / "item", OPTIONS.model_copy(update={"bands": ["1"] * 4}),
                       dask_cluster)
    assert done.statistics["bands"] == ["B02"] * 4
    grey = s2_samples.hand_stacked(scene.parent, ["B02"] * 4, tmp_path / "grey.tif")
    segment_one(grey, models["rgbn"], tmp_path / "ref", OPTIONS.model_copy(update={"bands": ["1", "2", "3", "4"]}),
                dask_cluster)
    assert np.array_equal(_labels(tmp_path / "item" / f"{ITEM_ID}.tif"), _labels(tmp_path / "ref" / "grey.tif"))
    with pytest.raises(IncompatibleInputError, match=f"model 'lc' names band 'B02' of item '{ITEM_ID}' twice, as "
                                                     f"'B02' and 'blue'; name them as listed"):
        plan_item(scene, BandRequest(("B02", "blue", "red", "nir"), model="model 'lc'", from_user=True))


def test_an_unreadable_asset_is_named_with_a_relative_out(scene, models, tmp_path, monkeypatch, dask_cluster):
    """A damaged band COG opens, and fails when its pixels are read.  With --out relative the error named
    segflow's work VRT (OUT/.segflow-work/....stack.vrt) instead of the item: the VRT's path was compared, relative,
    with the absolute one the ingest's error holds.  Now the item, and the asset that fails."""
    folder = tmp_path / "s2"
    shutil.copytree(scene.parent, folder)
    nir = folder / "B08.tif"
    damaged = bytearray(nir.read_bytes())
    for i in range(len(damaged) // 2, len(damaged) // 2 + 2000):
        damaged[i] ^= 0xFF
    nir.write_bytes(bytes(damaged))
    monkeypatch.chdir(tmp_path)
    code, errors, output = _cli(["s2/item.json", "--model", str(models["rgbn"].path), "--out", "rel"],
                                dask_cluster)
    assert code == 1 and len(errors) == 1, output
    assert errors[0].startswith(f"error: s2/item.json: item '{ITEM_ID}': asset 'nir' ({nir}): cannot read pixels "
                                "(rows "), errors
    assert ".vrt" not in errors[0]
    rel = tmp_path / "rel"
    assert not rel.exists() or not any(rel.iterdir()), sorted(rel.rglob("*"))


def test_ids_of_which_nothing_is_left_name_outputs_after_the_item_file(scene, models, tmp_path, dask_cluster):
    """Ids such as 日本語のシーン or '..' sanitise to nothing: every such item was named 'item', two of them clashed,
    and renaming a file, as the clash's message advises, changed nothing.  The item file's stem names them now."""
    from flows.inputs import output_clashes

    doc = json.loads(scene.read_text())
    for asset in doc["assets"].values():
        asset["href"] = str((scene.parent / asset["href"]).resolve())
    items = []
    for name, ident in (("scene_a", "日本語のシーン"), ("scene_b", "..")):
        items.append(tmp_path / f"{name}.json")
        items[-1].write_text(json.dumps({**doc, "id": ident}))
    assert [item_stem(p) for p in items] == ["scene_a", "scene_b"] and item_stem(scene) == ITEM_ID
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    same = [Path(shutil.copy(item, tmp_path / folder / "item.json")) for item, folder in zip(items, "xy")]
    assert "rename one of them" in output_clashes([str(p) for p in same])[1]
    assert not output_clashes([str(same[0]), str(items[1])])  # renamed: no clash
    # two ids that sanitise to one name: renaming a file changes nothing, and the message does not say it would
    twins = []
    for name, ident in (("one", "Sentinel-2 シーン"), ("two", "Sentinel-2 画像")):
        twins.append(tmp_path / f"{name}.json")
        twins[-1].write_text(json.dumps({**doc, "id": ident}))
    assert output_clashes([str(p) for p in twins])[1].endswith(
        "(the same name stem 'Sentinel-2'); segment one of them into another --out (an item's outputs are named "
        "after its id)")
    out = tmp_path / "out"
    code, errors, output = _cli([*map(str, items), "--model", str(models["rgbn"].path), "--out", str(out),
                                 "--no-zarr"], dask_cluster)
    assert code == 0 and not errors, output
    assert {"scene_a.tif", "scene_b.tif"} <= {p.name for p in out.iterdir()}


def test_an_asset_missing_beside_its_item_is_said_so_when_the_catalogue_copy_fails_too(tmp_path):
    """A relative href not beside the item file is read beside the item's self link (an item downloaded alone);
    when that fails too, the line had named only the catalogue URL and its network error, not the missing file."""
    from storage.errors import InputError
    from storage.ingest import ingest

    item = s2_samples.write_item(tmp_path / "s2", size=32)
    (item.parent / "B08.tif").unlink()
    with pytest.raises(InputError) as err:
        ingest(item, tmp_path / "s.zarr")
    assert str(err.value).startswith(
        f"{item}: asset 'nir': {item.parent / 'B08.tif'} is not beside the item, and the copy beside its self link "
        "(https://catalogue.example.com/collections/s2/items/B08.tif) cannot be opened: "), str(err.value)
    assert not (tmp_path / "s.zarr").exists()
    doc = json.loads(item.read_text())  # the catalogue's copy a local file: both places named too
    doc["links"] = [{"rel": "self", "href": str(tmp_path / "catalogue" / "item.json")}]
    item.write_text(json.dumps(doc))
    with pytest.raises(InputError) as err:
        ingest(item, tmp_path / "s.zarr")
    assert str(err.value).startswith(
        f"{item}: asset 'nir': {item.parent / 'B08.tif'} is not beside the item, and the copy beside its self link "
        f"({tmp_path / 'catalogue' / 'B08.tif'}) cannot be opened: "), str(err.value)


def test_an_asset_that_is_a_fifo_is_one_line_not_a_hang(tmp_path):
    """A FIFO where an item's band file should be had blocked the run until it was killed."""
    import os

    from storage.errors import InputError
    from storage.ingest import ingest

    item = s2_samples.write_item(tmp_path / "s2", size=32)
    (item.parent / "B02.tif").unlink()
    os.mkfifo(item.parent / "B02.tif")
    with pytest.raises(InputError, match=r"asset 'blue' \(.*B02.tif\) is a FIFO \(named pipe\), not a regular file"):
        ingest(item, tmp_path / "s.zarr")


def test_skip_done_leaves_out_an_item_done_before_and_notices_a_changed_asset(models, tmp_path, dask_cluster):
    """`segment --skip-done` had segmented every STAC item again; an item is done when its JSON and the assets the
    card's bands read are what its outputs were made from."""
    item = s2_samples.write_item(tmp_path / "s2", size=64, item_id=ITEM_ID)
    out = tmp_path / "out"
    args = [str(item), "--model", str(models["rgbn"].path), "--out", str(out), "--no-zarr", "--skip-done"]
    code, errors, output = _cli(args, dask_cluster)
    skipped = f"skipped {item} -> "
    assert code == 0 and not errors and skipped not in output, output
    made = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    code, errors, output = _cli(args, dask_cluster)
    assert code == 0 and f"skipped {item} -> {out / (ITEM_ID + '.tif')}" in " ".join(output.split()), output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == made  # nothing rewritten
    # an asset the model does not read (B11) changes nothing; one it reads (B02) is segmented again
    s2_samples.write_cog(item.parent / "B11.tif", s2_samples.band_dn(99, 32), 20.0)
    code, errors, output = _cli(args, dask_cluster)
    assert code == 0 and skipped in output, output
    s2_samples.write_cog(item.parent / "B02.tif", s2_samples.band_dn(99, 64), 10.0)
    code, errors, output = _cli(args, dask_cluster)
    assert code == 0 and not errors and skipped not in output, output
    from storage.provenance import verify

    report = verify(out / f"{ITEM_ID}.provenance.json")
    assert not report.problems and not report.unverified, (report.problems, report.unverified)
