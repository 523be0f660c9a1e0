"""Bands by name: a 13-band Sentinel-2 scene feeds a 4-band model the bands it was trained on, in its order."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import rasterio

from flows.config import SegmentOptions
from flows.pipeline import segment_one
from storage.bands import aliases, select_bands
from storage.errors import IncompatibleInputError
from tests.conftest import shared
from tests.models import tiny_model

S2 = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]
GEE_S2 = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12"]  # Google Earth Engine's names
L89 = ["SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7"]  # Landsat 8-9 Collection 2 level 2
L7 = ["SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B7", "ST_B6"]  # Landsat 4-7's: no SR_B6, other numbering


def test_one_band_asked_for_again_by_the_same_token_is_meant():
    from storage.bands import channel_indexes

    assert select_bands(["1", "1", "1"], ["pan"]) == [0, 0, 0]  # a grey image for an RGB model
    assert select_bands(["red", "RED", "nir"], S2) == [3, 3, 7]
    # the stored channels behind the names (the units of a reflectance card are looked up this way)
    assert channel_indexes(["pan"], ["pan", "pan", "pan"]) == [0, 0, 0]
    assert channel_indexes(["nir", "nir", "red"], ["nir", "nir", "red"]) == [0, 1, 2]  # equal descriptions


def test_names_ids_and_indices_resolve_to_the_same_bands():
    assert select_bands(["blue", "green", "red", "nir"], S2) == [1, 2, 3, 7]
    assert select_bands(["B04", "b03", " B02 ", "8"], S2) == [3, 2, 1, 7]  # ids, any case, and an index
    assert select_bands(["red", "nir"], L89) == [3, 4]  # Landsat 8/9 (SR_B2-SR_B5 alone: see below)
    assert select_bands(["nir"], ["B8A", "nir"]) == [1]  # an exact name wins over an alias
    assert "b02" in aliases("blue") and "blue" in aliases("B02")



@pytest.mark.parametrize("offered, expected", [
    (GEE_S2, ["B2", "B3", "B4", "B8"]),  # B8 was Landsat's pan, so B8A answered nir
    (S2, ["B02", "B03", "B04", "B08"]),  # B08 (nir) over B8A (nir08)
    (L89, ["SR_B2", "SR_B3", "SR_B4", "SR_B5"]),
    (L7, ["SR_B1", "SR_B2", "SR_B3", "SR_B4"]),  # was SR_B2-SR_B5: green, red, nir, swir16
    (L7[:-1], ["SR_B1", "SR_B2", "SR_B3", "SR_B4"]),  # exactly Landsat 4-7's SR product
    (["B5", "B6", "B7", "B8A", "B11", "B12"], None),  # Sentinel-2's 20 m bands: nir is B8A, blue is missing
])
def test_band_ids_are_read_for_the_sensor_the_files_ids_tell(offered, expected):
    """One alias table served every sensor: Earth Engine's unpadded Sentinel-2 names gave B8A for nir, a
    Landsat 7 file gave SR_B2-SR_B5 for blue, green, red, nir.  Each id is now read for the sensor its set tells."""
    if expected is None:
        with_red = ["B4", *offered]
        assert [with_red[i] for i in select_bands(["red", "nir", "rededge1", "swir22"], with_red)] == \
            ["B4", "B8A", "B5", "B12"]
        with pytest.raises(IncompatibleInputError, match="needs blue, which the input does not offer"):
            select_bands(["blue"], offered)
        return
    assert [offered[i] for i in select_bands(["blue", "green", "red", "nir"], offered)] == expected
    # a card naming another spelling of the sensor's ids finds them too
    if offered is GEE_S2:
        assert [offered[i] for i in select_bands(["B02", "B03", "B04", "B08", "B8A"], offered)] == [*expected, "B8A"]
    if offered is S2:  # and the other way: B2 ... B8 alone fit both Landsats too (B2 is green in 4-7), a file
        # whose ids are B01 ... B8A only Sentinel-2 (refused as "not offered" until the GIS probe, 2026-12-06)
        assert [offered[i] for i in select_bands(["B2", "B3", "B4", "B8"], offered)] == expected


@pytest.mark.parametrize("offered, wanted, says", [
    (["B2", "B3", "B4", "B5", "B8"], ["blue", "green", "red", "nir"],  # Earth Engine's 4 S2 bands and red edge 1
     "band 5 'B8' is nir in Sentinel-2, pan in Landsat 8-9 and Landsat 4-7"),
    (["B5"], ["nir"], "band 1 'B5' is rededge1 in Sentinel-2, nir08 in Landsat 8-9, swir16 in Landsat 4-7"),
    (["B1", "B2", "B3", "B4", "B5"], ["red"],
     "band 3 'B3' is green in Sentinel-2 and Landsat 8-9, red in Landsat 4-7"),
    (L89[1:5], ["nir"], "band 4 'SR_B5' is nir08 in Landsat 8-9, swir16 in Landsat 4-7"),
])
def test_band_ids_several_sensors_read_differently_are_refused_not_guessed(offered, wanted, says):
    """B2, B3, B4, B5, B8 is a Sentinel-2 export with red edge 1 (B5) or a Landsat 8-9 one with its nir (B5) and
    pan (B8): red edge was fed as nir without a word.  Refused in one line; --bands (names or indices) chooses."""
    with pytest.raises(IncompatibleInputError) as err:
        select_bands(wanted, offered, where="gee.tif", model="model 'lc'")
    text = str(err.value)
    assert text.startswith(f"gee.tif: model 'lc' needs {', '.join(wanted)}, but the input's band ids fit ") and \
        says in text and text.endswith("so which band is meant is not known; choose them with --bands (names or "
                                       "1-based indices)") and "\n" not in text
    assert select_bands(offered[:1] * 2, offered) == [0, 0]  # an exact name is always that band
    assert select_bands([str(len(offered))], offered) == [len(offered) - 1]


def test_a_name_two_bands_share_is_refused_not_guessed():
    """Two bands named 'red' (a stacked export): the first was taken silently. Refused; an index chooses."""
    offered = ["blue", "green", "red", "Red", "nir"]
    with pytest.raises(IncompatibleInputError, match=r"needs 'red' \(bands 3, 4 are all named 'red'\): which one is "
                                                     r"meant is not known; choose them with --bands"):
        select_bands(["blue", "green", "red", "nir"], offered, where="stack.tif", model="model 'lc'")
    assert select_bands(["blue", "green", "4", "nir"], offered) == [0, 1, 3, 4]


@pytest.mark.parametrize("wanted, message", [
    (["blue", "swir99"], r"needs swir99, which the input does not offer \(it has 13 band\(s\): 1:B01, 2:B02"),
    (["14"], r"needs band 14"),
    (["0", "1"], r"needs band 0 \(indices are 1-based\)"),
    (["B04", "red"], r"model 'lc' names input band 4 twice, as 'B04' and 'red'; choose them with --bands"),
    (["blue", "2", "red"], r"names input band 2 twice, as 'blue' and '2'"),
])
def test_missing_or_repeated_bands_are_one_line_refusals(wanted, message):
    with pytest.raises(IncompatibleInputError, match=message) as err:
        select_bands(wanted, S2, where="scene.tif", model="model 'lc'")
    assert str(err.value).startswith("scene.tif: model 'lc'") and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def s2_scene():
    return shared("labelled/landcover-s2/REFERENCE_SCENE_0_S2L1C_13band.tif")


def test_a_13_band_scene_segments_with_a_4_band_model_as_the_hand_stacked_bands(s2_scene, tmp_path, dask_cluster):
    model = tiny_model(tmp_path / "m", spatial_dims=2, channels=4, roi=[32, 32],
                       channel_names=["blue", "green", "red", "nir"])
    stacked = tmp_path / "stacked.tif"  # the bands the model was trained on, stacked by hand in its order
    with rasterio.open(s2_scene) as src:
        profile = {**src.profile, "count": 4}
        with rasterio.open(stacked, "w", **profile) as dst:
            dst.write(src.read([2, 3, 4, 8]))
    options = SegmentOptions(chunk_size=64, keep_zarr=False)
    by_name = segment_one(s2_scene, model, tmp_path / "a", options, dask_cluster)
    assert by_name.statistics["bands"] == ["B02", "B03", "B04", "B08"]
    segment_one(stacked, model, tmp_path / "b", options, dask_cluster)
    with rasterio.open(tmp_path / "a" / s2_scene.name) as a, rasterio.open(tmp_path / "b" / "stacked.tif") as b:
        labels = a.read(1)
        assert np.array_equal(labels, b.read(1))
    assert len(np.unique(labels)) >= 2
    reordered = segment_one(s2_scene, model, tmp_path / "c", options.model_copy(update={"bands": ["4", "3", "2", "8"]}),
                            dask_cluster)
    assert reordered.statistics["bands"] == ["B04", "B03", "B02", "B08"]
    with rasterio.open(tmp_path / "c" / s2_scene.name) as c:
        assert not np.array_equal(c.read(1), labels)  # the order matters, and --bands sets it


def test_wrong_bands_on_the_command_line_is_one_line_and_leaves_nothing(s2_scene, tmp_path):
    model = tiny_model(tmp_path / "m", spatial_dims=2, channels=4, roi=[32, 32])
    out = tmp_path / "out"
    env = {**os.environ, "PREFECT_HOME": os.environ["PREFECT_HOME"], "COLUMNS": "300"}
    proc = subprocess.run([sys.executable, "-m", "flows", "segment", str(s2_scene), "--model", str(model.path),
                           "--out", str(out), "--bands", "B02,B03,B04,B99", "--workers", "1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert f"{s2_scene}: model 'tiny-2d-4ch' needs B99" in line and "13 band(s)" in line
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not [p for p in out.iterdir()]


def test_earth_engine_sentinel2_names_feed_nir_not_red_edge(tmp_path, dask_cluster):
    """A 12-band Sentinel-2 GeoTIFF from Earth Engine (B1 ... B8, B8A ... B12): the model got B8A as nir; with
    only B2, B3, B4, B5, B8 it got red edge B5 as nir.  Now B8, and the 5-band file is refused before any work
    until --bands chooses."""
    model = tiny_model(tmp_path / "m", spatial_dims=2, channels=4, roi=[32, 32],
                       channel_names=["blue", "green", "red", "nir"])
    data = np.random.default_rng(6).integers(500, 3500, (12, 48, 48), dtype=np.uint16)
    full = _raster(tmp_path / "gee_full.tif", data)
    five = _raster(tmp_path / "gee_five.tif", data[[1, 2, 3, 4, 7]].copy())
    with rasterio.open(full, "r+") as dst:
        dst.descriptions = tuple(GEE_S2)
    with rasterio.open(five, "r+") as dst:
        dst.descriptions = ("B2", "B3", "B4", "B5", "B8")
    options = SegmentOptions(chunk_size=64, keep_zarr=False)
    assert segment_one(full, model, tmp_path / "a", options, dask_cluster).statistics["bands"] == \
        ["B2", "B3", "B4", "B8"]
    with pytest.raises(IncompatibleInputError, match=r"model 'tiny-2d-4ch' needs blue, green, red, nir, but the "
                                                     r"input's band ids fit Sentinel-2, Landsat 8-9 and Landsat 4-7"):
        segment_one(five, model, tmp_path / "b", options, dask_cluster)
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").iterdir())
    chosen = segment_one(five, model, tmp_path / "c", options.model_copy(update={"bands": ["B2", "B3", "B4", "B8"]}),
                         dask_cluster)
    assert chosen.statistics["bands"] == ["B2", "B3", "B4", "B8"]
    with rasterio.open(tmp_path / "a" / "gee_full.tif") as a, rasterio.open(tmp_path / "c" / "gee_five.tif") as c:
        assert np.array_equal(a.read(1), c.read(1))


def _raster(path, data):
    from rasterio.transform import from_origin

    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs="EPSG:32633", transform=from_origin(500000, 6000000, 10, 10)) as dst:
        dst.write(data)
    return path


def test_bands_chosen_by_index_reach_the_network_and_the_stac_item_in_that_order(tmp_path, dask_cluster):
    """--bands 3,2,1 on unnamed bands: the STAC item's mlm:input listed band1, band2, band3 (the stored order);
    --bands 1,1,1 (a grey image for an RGB model) was refused as naming a band twice."""
    import json

    model = tiny_model(tmp_path / "m", spatial_dims=2, channels=3, roi=[32, 32])
    rgb = np.random.default_rng(5).integers(1, 255, (3, 60, 70), dtype=np.uint8)
    options = SegmentOptions(chunk_size=64, keep_zarr=False)
    picked = segment_one(_raster(tmp_path / "rgb.tif", rgb), model, tmp_path / "a",
                         options.model_copy(update={"bands": ["3", "2", "1"]}), dask_cluster)
    assert picked.statistics["bands"] == ["band3", "band2", "band1"]
    item = json.loads((tmp_path / "a" / "rgb.stac.json").read_text())
    assert item["properties"]["mlm:input"][0]["bands"] == ["band3", "band2", "band1"]
    segment_one(_raster(tmp_path / "bgr.tif", rgb[::-1].copy()), model, tmp_path / "b", options, dask_cluster)
    with rasterio.open(tmp_path / "a" / "rgb.tif") as a, rasterio.open(tmp_path / "b" / "bgr.tif") as b:
        assert np.array_equal(a.read(1), b.read(1))

    grey = rgb[:1]
    segment_one(_raster(tmp_path / "grey.tif", grey), model, tmp_path / "c",
                options.model_copy(update={"bands": ["1", "1", "1"]}), dask_cluster)
    segment_one(_raster(tmp_path / "grey3.tif", np.repeat(grey, 3, axis=0)), model, tmp_path / "d", options,
                dask_cluster)
    with rasterio.open(tmp_path / "c" / "grey.tif") as c, rasterio.open(tmp_path / "d" / "grey3.tif") as d:
        labels = c.read(1)
        assert np.array_equal(labels, d.read(1)) and len(np.unique(labels)) >= 2


def test_unnamed_bands_taken_in_file_order_are_said(tmp_path, dask_cluster):
    """A card naming its channels and a raster naming none of its bands: the bands go in file order, as before,
    and the run now says which band it took for which channel (warnings, kept in the provenance); not where
    names matched or --bands chose."""
    model = tiny_model(tmp_path / "m", spatial_dims=2, channels=3, roi=[32, 32], channel_names=["red", "green", "blue"])
    data = np.random.default_rng(3).integers(0, 255, (3, 40, 40), dtype=np.uint8)
    options = SegmentOptions(chunk_size=64, keep_zarr=False)
    plain = segment_one(_raster(tmp_path / "plain.tif", data), model, tmp_path / "a", options, dask_cluster)
    assert plain.statistics["warnings"] == [
        f"{tmp_path / 'plain.tif'}: its bands have no names, so they were taken in file order: band 1 as red, "
        "2 as green, 3 as blue (if that is not their order, choose them with --bands)"]
    chosen = segment_one(tmp_path / "plain.tif", model, tmp_path / "b",
                         options.model_copy(update={"bands": ["3", "2", "1"]}), dask_cluster)
    named = _raster(tmp_path / "named.tif", data)
    with rasterio.open(named, "r+") as dst:
        dst.descriptions = ("red", "green", "blue")
    by_name = segment_one(named, model, tmp_path / "c", options, dask_cluster)
    assert "warnings" not in chosen.statistics and "warnings" not in by_name.statistics
    # the bands the network got, in its order, also where they are all of the file's in its order (had been null)
    assert by_name.statistics["bands"] == ["red", "green", "blue"], by_name.statistics
    assert plain.statistics["bands"] == ["band1", "band2", "band3"]
    assert chosen.statistics["bands"] == ["band3", "band2", "band1"]


def test_floats_given_to_a_card_made_for_integers_are_said(tmp_path, dask_cluster):
    """Reflectances (0-1) fed to a model of digital numbers labelled a demo scene 97 % 'water', without a word:
    the run says so; not for a card that normalises by the image's own statistics, which absorb the units."""
    fixed = tiny_model(tmp_path / "fixed", spatial_dims=2, channels=3, roi=[32, 32], dtype="uint16",
                       normalization={"mode": "zscore", "mean": [650.0], "std": [300.0]})
    own = tiny_model(tmp_path / "own", spatial_dims=2, channels=3, roi=[32, 32], dtype="uint16")
    data = np.random.default_rng(4).random((3, 40, 40), dtype=np.float32)
    scene = _raster(tmp_path / "reflectance.tif", data)
    options = SegmentOptions(chunk_size=64, keep_zarr=False)
    told = segment_one(scene, fixed, tmp_path / "a", options, dask_cluster)
    assert told.statistics["warnings"] == [
        f"{scene}: is stored as float32, and the normalisation of model '{fixed.card.name}' was made for uint16 "
        "values: if these are other units (reflectance rather than digital numbers), its labels are meaningless"]
    assert "warnings" not in segment_one(scene, own, tmp_path / "b", options, dask_cluster).statistics
    integers = _raster(tmp_path / "dn.tif", (data * 10000).astype(np.uint16))
    assert "warnings" not in segment_one(integers, fixed, tmp_path / "c", options, dask_cluster).statistics
    # an 8-bit export of the 16-bit scene had gone through without a word (labels mostly one class)
    eight = _raster(tmp_path / "eight.tif", (data * 255).astype(np.uint8))
    assert segment_one(eight, fixed, tmp_path / "c8", options, dask_cluster).statistics["warnings"] == [
        f"{eight}: is stored as uint8 (up to 255), and the normalisation of model '{fixed.card.name}' was made for "
        "uint16 values (up to 65535): if these values were rescaled (an 8-bit export of a 16-bit image), its labels "
        "are meaningless"]
    signed = _raster(tmp_path / "signed.tif", (data * 10000).astype(np.int16))  # the same range: not said
    assert "warnings" not in segment_one(signed, fixed, tmp_path / "c16", options, dask_cluster).statistics
    # the Python API says the same of an array (it had segmented an 8-bit export without a word)
    import warnings

    from segmentation import load_model, predict

    net = load_model(fixed.path)
    with pytest.warns(UserWarning, match=r"^the image is uint8 \(up to 255\), and the normalisation of model "):
        predict((data * 255).astype(np.uint8), net, probabilities=False)
    with pytest.warns(UserWarning, match=r"^the image is float32, and the normalisation of model "):
        predict(data, net, probabilities=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predict((data * 10000).astype(np.uint16), net, probabilities=False)
    # a card declaring its units had silenced the check, though with no scale or offset in the file nothing
    # converts the values: they are taken as digital numbers as they are
    dn = tiny_model(tmp_path / "dn", spatial_dims=2, channels=3, roi=[32, 32], dtype="uint16", units="dn",
                    normalization={"mode": "zscore", "mean": [650.0], "std": [300.0]})
    told = segment_one(scene, dn, tmp_path / "d", options, dask_cluster)
    assert [w for w in told.statistics.get("warnings", []) if "is stored as float32" in w], told.statistics
    scaled = _raster(tmp_path / "scaled.tif", data)
    with rasterio.open(scaled, "r+") as dst:  # reflectance = value * 0.5 + 0.01, which the card converts to DN
        dst.scales, dst.offsets = (0.5,) * 3, (0.01,) * 3
    converted = segment_one(scaled, dn, tmp_path / "e", options, dask_cluster)
    assert not [w for w in converted.statistics.get("warnings", []) if "is stored as float32" in w]


@pytest.mark.parametrize("spacing", [None, [20.0, 20.0]], ids=["input grid", "model space"])
def test_pixels_where_only_the_models_bands_hold_nodata_are_nodata(tmp_path, dask_cluster, spacing):
    """Six bands, nodata 0 for the file: in the top rows bands 2-4 hold 0 and bands 1, 5, 6 hold data, as at a
    swath's edge where each band's detectors stop at their own place.  GDAL's mask calls those pixels valid (some
    band has data), so a model taking bands 2-4 was fed zeros there and labelled them.  They are nodata now, on
    the input's grid and through model space; a model taking bands 1, 5, 6 still labels them; and a file whose
    chosen bands hold nodata everywhere is refused as having nothing to segment."""
    from segmentation.chunkwrites import label_nodata
    from storage.errors import InvalidInputError

    extra = {} if spacing is None else {"spacing": spacing, "spacing_unit": "m"}
    model = tiny_model(tmp_path / "m", spatial_dims=2, channels=3, roi=[32, 32], **extra)
    data = np.random.default_rng(11).integers(100, 2000, (6, 60, 70), dtype=np.uint16)
    data[1:4, :20] = 0
    data[:, 50:] = 0  # every band empty: nodata by GDAL's own rule too
    path = tmp_path / "six.tif"
    with rasterio.open(path, "w", driver="GTiff", width=70, height=60, count=6, dtype="uint16", nodata=0,
                       crs="EPSG:32633", transform=rasterio.transform.from_origin(500000, 6000000, 10, 10)) as dst:
        dst.write(data)
    options = SegmentOptions(chunk_size=32, keep_zarr=False)
    nodata = label_nodata(3)
    segment_one(path, model, tmp_path / "a", options.model_copy(update={"bands": ["2", "3", "4"]}), dask_cluster)
    segment_one(path, model, tmp_path / "b", options.model_copy(update={"bands": ["1", "5", "6"]}), dask_cluster)
    with rasterio.open(tmp_path / "a" / "six.tif") as a, rasterio.open(tmp_path / "b" / "six.tif") as b:
        assert a.nodata == nodata
        chosen, others = a.read(1), b.read(1)
    assert (chosen[:20] == nodata).all() and (chosen[50:] == nodata).all()
    assert (chosen[20:50] != nodata).all()
    assert (others[:50] != nodata).all() and (others[50:] == nodata).all()

    empty = data.copy()
    empty[1:4] = 0
    with rasterio.open(tmp_path / "empty.tif", "w", **{**rasterio.open(path).profile}) as dst:
        dst.write(empty)
    with pytest.raises(InvalidInputError, match="every pixel of the bands the model takes equals nodata=0"):
        segment_one(tmp_path / "empty.tif", model, tmp_path / "c", options.model_copy(update={"bands": ["2", "3", "4"]}),
                    dask_cluster)


def test_a_band_holding_nodata_alone_hides_its_pixel_from_a_model_of_wide_pixels(tmp_path, dask_cluster):
    """uint16 with nodata 0 (Sentinel-2 and Landsat digital numbers reserve 0): where nir alone held 0 the pixel
    was valid by GDAL's any-band rule, and a 4-band model labelled it from a nir of 0.  Now it is nodata.  An 8-bit
    RGB image keeps GDAL's rule (a pure red pixel holds 0 in two bands and is data), and a float scene's NaN in a
    band the model does not take no longer hides the pixel."""
    from segmentation.chunkwrites import label_nodata

    nodata = label_nodata(3)
    options = SegmentOptions(chunk_size=32, keep_zarr=False)
    rng = np.random.default_rng(12)

    def write(path, data, nodata_value):
        with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                           dtype=data.dtype, nodata=nodata_value, crs="EPSG:32633",
                           transform=rasterio.transform.from_origin(500000, 6000000, 10, 10)) as dst:
            dst.write(data)
        return path

    four = tiny_model(tmp_path / "m4", spatial_dims=2, channels=4, roi=[32, 32])
    dn = rng.integers(100, 3000, (4, 50, 60), dtype=np.uint16)
    dn[3, 10:30, 15:40] = 0  # nir empty in a box
    segment_one(write(tmp_path / "dn.tif", dn, 0), four, tmp_path / "a", options, dask_cluster)
    with rasterio.open(tmp_path / "a" / "dn.tif") as a:
        labels = a.read(1)
    assert (labels[10:30, 15:40] == nodata).all() and (labels == nodata).sum() == 20 * 25

    three = tiny_model(tmp_path / "m3", spatial_dims=2, channels=3, roi=[32, 32])
    rgb = rng.integers(1, 255, (3, 50, 60), dtype=np.uint8)
    rgb[1:, 5:15, 5:15] = 0  # pure red: data
    segment_one(write(tmp_path / "rgb.tif", rgb, 0), three, tmp_path / "b", options, dask_cluster)
    with rasterio.open(tmp_path / "b" / "rgb.tif") as b:
        assert (b.read(1) != nodata).all()

    refl = rng.random((4, 50, 60)).astype(np.float32)
    refl[3, 20:40, :] = np.nan  # a band the model does not take
    segment_one(write(tmp_path / "refl.tif", refl, float("nan")), three, tmp_path / "c",
                options.model_copy(update={"bands": ["1", "2", "3"]}), dask_cluster)
    segment_one(write(tmp_path / "refl3.tif", refl[:3].copy(), float("nan")), three, tmp_path / "d", options,
                dask_cluster)
    with rasterio.open(tmp_path / "c" / "refl.tif") as c, rasterio.open(tmp_path / "d" / "refl3.tif") as d:
        picked, alone = c.read(1), d.read(1)
    assert (picked != nodata).all() and np.array_equal(picked, alone)

    # a float scene whose nodata is a number (-9999, or 0.1 as float32 holds it), not NaN: the nir box had been
    # segmented from -9999 (no per-band watch for float nodata)
    for value in (-9999.0, 0.1):
        f32 = rng.random((4, 50, 60)).astype(np.float32) + 1
        f32[3, 10:30, 15:40] = value
        segment_one(write(tmp_path / f"f32-{value}.tif", f32, value), four, tmp_path / f"e{value}", options,
                    dask_cluster)
        with rasterio.open(tmp_path / f"e{value}" / f"f32-{value}.tif") as e:
            labels = e.read(1)
        assert (labels[10:30, 15:40] == nodata).all() and (labels == nodata).sum() == 20 * 25, value
