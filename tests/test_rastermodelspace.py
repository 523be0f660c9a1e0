"""Raster model space: a scene at 5 m or 20 m (or in degrees) segmented by a 10 m model, as GDAL and MONAI would.

The oracle is the whole image done at once: ``rasterio.warp.reproject`` to
the model's grid with the same kernel, MONAI's ``sliding_window_inference``
(same ROI, overlap and Gaussian blend as the card), then ``reproject`` back
onto the scene's grid.  segflow does the same chunk by chunk (GDAL warps per
chunk with a halo, exact stitching in model space) and must match it within
1e-4, give the same labels whatever the chunking, and leave a scene already
at the model's gsd exactly as it was.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import rasterio
import torch
from monai.inferers import sliding_window_inference
from rasterio.enums import Resampling
from rasterio.transform import from_origin
from rasterio.warp import reproject

from flows.config import SegmentOptions
from flows.modelspace import mapping_for
from flows.pipeline import segment_one
from segmentation.demo_cards import landcover_card
from storage.errors import InvalidInputError
from storage.layout import LABELS, PROBABILITIES
from storage.samples import SCENE_EPSG, make_scene
from storage.rastergrid import raster_mapping, utm_crs
from storage.warp import to_model
from storage.wayback import RasterWayBack
from tests.models import tiny_model

MEAN = [650.0, 800.0, 750.0, 2700.0]  # fixed normalisation (the demo card's), so the oracle needs no statistics
STD = [300.0, 300.0, 450.0, 850.0]
ROI = [32, 32]


def _model(path: Path, weights: dict | None = None, **extra):
    """The tiny 2-D U-Net with a version-4 card at 10 m; ``weights`` (the trained ones) replace its random ones."""
    from segmentation.modeldir import save_model

    model = tiny_model(path, spatial_dims=2, channels=4, classes=5, roi=ROI, seed=3,
                       normalization={"mode": "zscore", "mean": MEAN, "std": STD},
                       spacing=[10.0, 10.0], spacing_unit="m", **extra)
    if weights is None:
        return model
    model.module.load_state_dict(weights)
    return save_model(path, model.card.model_copy(update={"weights_sha256": None}), model.module.eval())


@pytest.fixture(scope="module")
def weights(scenes, tmp_path_factory) -> dict:
    """A few dozen steps of training on the 10 m scene's truth, so labels follow the scene (several classes)."""
    from storage.samples import truth_path

    model = _model(tmp_path_factory.mktemp("untrained") / "m")
    net = model.module.train()
    with rasterio.open(scenes["10"]) as src, rasterio.open(truth_path(scenes["10"])) as t:
        x = (src.read().astype(np.float32) - np.asarray(MEAN, np.float32)[:, None, None]) / \
            np.asarray(STD, np.float32)[:, None, None]
        y = t.read(1).astype(np.int64)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(40):
        tops = [(rng.integers(0, x.shape[1] - 64), rng.integers(0, x.shape[2] - 64)) for _ in range(4)]
        xb = torch.from_numpy(np.stack([x[:, r:r + 64, c:c + 64] for r, c in tops]))
        yb = torch.from_numpy(np.stack([y[r:r + 64, c:c + 64] for r, c in tops]))
        loss = torch.nn.functional.cross_entropy(net(xb), yb, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.eval().state_dict().items()}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict[str, Path]:
    """The same generated 10 m scene (all valid), and GDAL's 5 m (bilinear) and 20 m (average) versions of it."""
    folder = tmp_path_factory.mktemp("scenes")
    ten, _ = make_scene(folder / "ten.tif", size=(160, 192), seed=5, nodata_margin=0)
    out = {"10": ten}
    with rasterio.open(ten) as src:
        data = src.read().astype(np.float32)
        for res, kernel in ((5.0, Resampling.bilinear), (20.0, Resampling.average)):
            f = 10.0 / res
            h, w = int(src.height * f), int(src.width * f)
            t = src.transform * src.transform.scale(1 / f)
            dst = np.zeros((4, h, w), np.float32)
            reproject(data, dst, src_transform=src.transform, src_crs=src.crs, dst_transform=t, dst_crs=src.crs,
                      resampling=kernel)
            path = folder / f"scene{int(res)}m.tif"
            with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=4, dtype="float32", crs=src.crs,
                               transform=t, tiled=True, blockxsize=64, blockysize=64) as f_out:
                f_out.write(dst)
                for i, name in enumerate(("blue", "green", "red", "nir"), 1):
                    f_out.set_band_description(i, name)
            out[str(int(res))] = path
    return out


def _labels(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as src:
        return src.read(1), {"crs": src.crs, "transform": src.transform, "shape": (src.height, src.width)}


def _grid(path: Path) -> dict:
    with rasterio.open(path) as src:
        return {"crs": src.crs, "transform": src.transform, "shape": (src.height, src.width)}


def _warped_copy(scene: Path, path: Path, crs: str) -> tuple[Path, object]:
    """``scene`` warped (bilinear) to ``crs`` at GDAL's default resolution, nodata 0 outside it; (path, transform)."""
    from rasterio.warp import calculate_default_transform

    with rasterio.open(scene) as src:
        t, w, h = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds)
        data = np.zeros((src.count, h, w), np.uint16)
        reproject(src.read(), data, src_transform=src.transform, src_crs=src.crs, dst_transform=t, dst_crs=crs,
                  resampling=Resampling.bilinear, dst_nodata=0)
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=data.shape[0], dtype="uint16", crs=crs,
                       transform=t, nodata=0) as dst:
        dst.write(data)
    return path, t


def oracle(scene: Path, model, mapping) -> np.ndarray:
    """Whole image: reproject to the model grid, MONAI's sliding window, reproject the probabilities back."""
    with rasterio.open(scene) as src:
        image = src.read().astype(np.float32)
    kw = dict(XSCALE=mapping.scale[0], YSCALE=mapping.scale[1])
    moved = np.zeros((4, *mapping.model_shape), np.float32)
    crs = mapping.input.gdal_crs()
    reproject(image, moved, src_transform=mapping.input.affine, src_crs=crs, dst_transform=mapping.model.affine,
              dst_crs=crs, resampling=getattr(Resampling, mapping.forward), **kw)
    x = (moved - np.asarray(MEAN, np.float32)[:, None, None]) / np.asarray(STD, np.float32)[:, None, None]
    net = model.module.eval()
    with torch.no_grad():
        probs = sliding_window_inference(torch.from_numpy(x)[None], ROI, 4, lambda t: torch.softmax(net(t), 1),
                                         overlap=0.25, mode="gaussian", sigma_scale=0.125)[0].numpy()
    back = np.zeros((probs.shape[0], *mapping.input_shape), np.float32)
    reproject(probs, back, src_transform=mapping.model.affine, src_crs=crs, dst_transform=mapping.input.affine,
              dst_crs=crs, resampling=getattr(Resampling, mapping.back), XSCALE=1 / mapping.scale[0],
              YSCALE=1 / mapping.scale[1])
    return back


# --- grids and the chunked warp ---------------------------------------------------------------------------------

class _Geometry:
    def __init__(self, transform, epsg=32633, crs_wkt=None):
        self.transform, self.epsg, self.crs_wkt = tuple(transform)[:6], epsg, crs_wkt


def test_model_grid_follows_gdal_and_the_identity_is_none():
    from rasterio.transform import from_origin

    m = raster_mapping(_Geometry(from_origin(500000, 6000000, 20, 20)), (51, 77), spacing=[10, 10], crs=None)
    assert m.model_shape == (102, 154) and m.model.transform[:3] == (10.0, 0.0, 500000.0)
    assert (m.forward, m.back, m.scale) == ("bilinear", "average", (2.0, 2.0))
    m = raster_mapping(_Geometry(from_origin(500000, 6000000, 5, 5)), (101, 80), spacing=[10, 10], crs=None)
    assert m.model_shape == (51, 40)  # ceil(505 m / 10 m): same corner, the last model pixel half outside
    assert (m.forward, m.back) == ("average", "bilinear")
    assert raster_mapping(_Geometry(from_origin(500000, 6000000, 10 + 5e-6, 10)), (64, 64), spacing=[10, 10],
                          crs=None) is None
    assert raster_mapping(_Geometry(from_origin(500000, 6000000, 10, 10)), (64, 64), spacing=[10, 10],
                          crs="utm") is None  # projected input stays in its CRS
    assert utm_crs(14.5, 52.0).to_epsg() == 32633 and utm_crs(-70.6, -33.4).to_epsg() == 32719
    with pytest.raises(InvalidInputError, match="geographic"):
        raster_mapping(_Geometry(from_origin(500000, 6000000, 10, 10)), (8, 8), spacing=[10, 10], crs="EPSG:4326")
    # the demo's 2-D card (version 4, 10 m) on the demo's scenes (10 m UTM) is the identity
    card = landcover_card()
    assert card.applies_raster_model_space and card.input.spacing == [10.0, 10.0]
    assert raster_mapping(_Geometry(from_origin(399960, 5800020, 10, 10), epsg=SCENE_EPSG), (768, 768),
                          spacing=card.input.spacing, crs=card.input.crs) is None


def test_rotated_and_flipped_grids_are_refused_in_model_space():
    """A south-up grid (rows running north: e > 0, as some exports of ascending-latitude arrays write) gave a model
    grid with the same axes, so the network saw the scene upside down; 1.7 % of a demo scene's labels differed
    from its north-up copy's. Refused, as a rotated grid is, at the model's own pixel size too."""
    from affine import Affine

    for transform, problem in ((Affine(5, 0, 500000, 0, 5, 6000000), "rows running south to north"),
                               (Affine(-10, 0, 500000, 0, -10, 6000000), "columns running east to west"),
                               (Affine(10, 1, 500000, 1, -10, 6000000),
                                "has a rotated geotransform.*--mosaic NAME --crs EPSG:n"),
                               (Affine(10, 2, 500000, 0, -10, 6000000), "has a sheared .*not at right angles")):
        with pytest.raises(InvalidInputError, match=problem):
            raster_mapping(_Geometry(transform), (64, 64), spacing=[10, 10], crs=None)
    # a TIFF with no geotransform at all (GDAL's identity, no CRS) had been refused as "flipped"
    with pytest.raises(InvalidInputError, match=r"has no geotransform \(pixel coordinates only\)"):
        raster_mapping(_Geometry(Affine.identity(), epsg=None), (64, 64), spacing=[10, 10], crs=None)
    # with a CRS but no geotransform it still was, and told to warp the file north-up (GIS probe, 2026-12-06)
    with pytest.raises(InvalidInputError, match=r"has no geotransform .*gdal_translate -a_ullr\)"):
        raster_mapping(_Geometry(Affine.identity()), (64, 64), spacing=[10, 10], crs=None)


def test_the_warp_does_not_depend_on_chunking_and_matches_gdal_whole():
    from rasterio.transform import from_origin
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    image = np.stack([gaussian_filter(rng.random((90, 110)), 2) for _ in range(3)]).astype(np.float32) * 1000
    for res in (5.0, 20.0):
        m = raster_mapping(_Geometry(from_origin(500000, 6000000, res, res)), image.shape[1:], spacing=[10, 10],
                           crs=None)
        results = [to_model(da.from_array(image, chunks=(3, c, c)), m, chunks=k)[0].compute(scheduler="sync")
                   for c, k in ((17, 23), (64, 40))]
        whole = np.zeros_like(results[0])
        reproject(image, whole, src_transform=m.input.affine, src_crs="EPSG:32633", dst_transform=m.model.affine,
                  dst_crs="EPSG:32633", resampling=getattr(Resampling, m.forward), XSCALE=m.scale[0],
                  YSCALE=m.scale[1])
        assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], whole)
        way = RasterWayBack(m)
        back = [way.probabilities(da.from_array(whole, chunks=(3, c, c)), (k, k), "bilinear").compute(scheduler="sync")
                for c, k in ((13, 29), (50, 64))]
        assert np.array_equal(back[0], back[1]) and back[0].shape == image.shape
        labels = way.labels(da.from_array(whole, chunks=(3, 13, 13)), (29, 29), "bilinear", np.uint8)
        assert np.array_equal(labels.compute(scheduler="sync"), back[0].argmax(0))


# --- whole runs --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("res", ["5", "20"])
def test_a_10m_model_on_5m_and_20m_scenes_matches_the_whole_image_oracle(res, scenes, weights, tmp_path,
                                                                          dask_cluster):
    model = _model(tmp_path / "m", weights)
    scene = scenes[res]
    a = segment_one(scene, model, tmp_path / "a", SegmentOptions(chunk_size=48, probabilities="float32"),
                    dask_cluster)
    b = segment_one(scene, model, tmp_path / "b", SegmentOptions(chunk_size=72, keep_zarr=False), dask_cluster)
    assert a.ok and b.ok
    space = a.statistics["model_space"]
    assert space["kind"] == "raster" and space["model"]["shape_yx"] == [160, 192]
    la, grid_a = _labels(tmp_path / "a" / scene.name)
    lb, _ = _labels(tmp_path / "b" / scene.name)
    assert grid_a == _grid(scene)  # labels on the input's grid
    assert len(np.unique(la)) >= 2
    assert np.array_equal(la, lb), f"{(la != lb).mean():.2e} of pixels differ between chunkings"
    import zarr

    group = zarr.open_group(str(tmp_path / "a" / (scene.stem + ".zarr")), mode="r")
    ours = np.asarray(group[PROBABILITIES])
    with rasterio.open(scene) as src:
        mapping = raster_mapping(_Geometry(src.transform, epsg=SCENE_EPSG), (src.height, src.width),
                                 spacing=[10, 10], crs=None)
    ref = oracle(scene, model, mapping)
    err = float(np.abs(ours - ref).max())
    assert err <= 1e-4, f"probabilities differ from the whole-image oracle by {err:.2e}"
    agree = float((np.asarray(group[LABELS]) == ref.argmax(0)).mean())
    assert agree >= 0.999, agree
    record = json.loads((tmp_path / "a" / (scene.stem + ".provenance.json")).read_text())
    resampling = record["parameters"]["resampling"]
    assert resampling["to_model"] == ("average" if res == "5" else "bilinear")
    assert resampling["to_input"] == ("bilinear" if res == "5" else "average")
    assert resampling["mapping"]["input"]["shape_yx"] == list(ours.shape[1:])
    assert not list((tmp_path / "a").glob(".segflow-work*"))  # the model-space store went with the run
    print(f"{res} m: max |p - oracle| = {err:.2e}, label agreement {agree:.4%}")


def test_output_grid_model_writes_the_cog_on_the_model_grid(scenes, weights, tmp_path, dask_cluster):
    model = _model(tmp_path / "m", weights)
    scene = scenes["5"]
    out = segment_one(scene, model, tmp_path / "o", SegmentOptions(chunk_size=64, output_grid="model",
                                                                   keep_zarr=False), dask_cluster)
    labels, grid = _labels(tmp_path / "o" / scene.name)
    src = _grid(scene)
    assert grid["shape"] == (160, 192) and grid["crs"] == src["crs"]
    assert grid["transform"].a == 10.0 and grid["transform"].e == -10.0
    assert (grid["transform"].c, grid["transform"].f) == (src["transform"].c, src["transform"].f)
    with rasterio.open(scene) as s:
        mapping = raster_mapping(_Geometry(s.transform, epsg=SCENE_EPSG), (s.height, s.width), spacing=[10, 10],
                                 crs=None)
    with rasterio.open(scenes["10"]) as ten:  # the model grid is the 10 m scene's grid
        assert ten.transform == grid["transform"] and (ten.height, ten.width) == grid["shape"]
    assert len(np.unique(labels)) >= 2
    assert out.statistics["output_grid"] == "model"
    record = json.loads((tmp_path / "o" / (scene.stem + ".provenance.json")).read_text())
    assert record["parameters"]["resampling"]["to_input"] is None
    assert mapping.model_shape == labels.shape
    item = json.loads((tmp_path / "o" / (scene.stem + ".stac.json")).read_text())  # it had said "the input grid"
    assert item["properties"]["processing:lineage"].endswith("labels written on the model's grid (--output-grid "
                                                             "model).")


def test_a_geographic_scene_goes_to_its_utm_zone_and_comes_back_on_degrees(scenes, weights, tmp_path,
                                                                           dask_cluster):
    """A scene in EPSG:4326 (warped from the 10 m UTM one, nodata corners) with a card asking for ``utm``."""
    geo, _ = _warped_copy(scenes["10"], tmp_path / "geo.tif", "EPSG:4326")
    model = _model(tmp_path / "m", weights, crs="utm")
    out = segment_one(geo, model, tmp_path / "g", SegmentOptions(chunk_size=64, keep_zarr=False), dask_cluster)
    space = out.statistics["model_space"]
    assert space["model"]["crs"] == f"EPSG:{SCENE_EPSG}"  # 33N: the scene lies near 14.5 E, 52 N
    assert space["model"]["transform"][0] == 10.0
    labels, grid = _labels(tmp_path / "g" / "geo.tif")
    assert grid == _grid(geo)  # back on the degree grid
    with rasterio.open(geo) as src:
        valid = src.dataset_mask() > 0
        nodata = src.nodata
    with rasterio.open(tmp_path / "g" / "geo.tif") as lab:
        label_nodata = lab.nodata
    assert nodata == 0 and 0.3 < valid.mean() < 1.0
    assert (labels[~valid] == label_nodata).all() and (labels[valid] != label_nodata).all()
    assert len(np.unique(labels[valid])) >= 2
    # and kept on the model's grid, the COG is in the UTM zone
    segment_one(geo, model, tmp_path / "u", SegmentOptions(chunk_size=64, keep_zarr=False, output_grid="model"),
                dask_cluster)
    assert _grid(tmp_path / "u" / "geo.tif")["crs"].to_epsg() == SCENE_EPSG


def test_a_web_mercator_scene_is_measured_on_the_ground(scenes, weights, tmp_path, dask_cluster):
    """The 10 m UTM scene warped to EPSG:3857 at 52° N has 16.4 m pixels in Mercator metres, which are 0.61 ground
    metres there: the 10 m model was given 6 m pixels (a model grid 1.6 times too fine each way).  A projection
    whose scale is off by more than 2 % goes to its UTM zone first, as degrees do, and the labels follow the UTM
    run's.  Without a ground sample distance on the card nothing is warped."""
    merc, t = _warped_copy(scenes["10"], tmp_path / "merc.tif", "EPSG:3857")
    h, w = _grid(merc)["shape"]
    assert 16.0 < t.a < 17.0
    model = _model(tmp_path / "m", weights)
    options = SegmentOptions(chunk_size=64, keep_zarr=False)
    out = segment_one(merc, model, tmp_path / "w", options, dask_cluster)
    space = out.statistics["model_space"]
    assert space["model"]["crs"] == f"EPSG:{SCENE_EPSG}" and space["model"]["transform"][0] == 10.0
    labels, grid = _labels(tmp_path / "w" / "merc.tif")
    assert grid == _grid(merc)
    segment_one(scenes["10"], model, tmp_path / "u", options, dask_cluster)
    with rasterio.open(tmp_path / "u" / scenes["10"].name) as ref:
        expected = np.full((h, w), 255, np.uint8)
        reproject(ref.read(1), expected, src_transform=ref.transform, src_crs=ref.crs, dst_transform=t,
                  dst_crs="EPSG:3857", resampling=Resampling.nearest, src_nodata=255, dst_nodata=255)
    both = (expected != 255) & (labels != 255)
    assert both.mean() > 0.5 and (labels[both] == expected[both]).mean() > 0.95

    class _Merc:
        transform, epsg, crs_wkt = tuple(t)[:6], 3857, None

    assert raster_mapping(_Merc(), (h, w), spacing=None, crs=None) is None


def test_a_geographic_scene_across_the_antimeridian_is_labelled_on_both_sides(scenes, weights, tmp_path,
                                                                              dask_cluster):
    """A scene in degrees over the antimeridian, written from 179.99 E (running past 180) and, the same ground,
    from 180.01 W (running from before -180), for a model in UTM zone 60: every pixel labelled, and the two
    writings give the same probabilities.  The part past 180 was nodata, 'ok', before 2026-12-05: PROJ gives
    longitudes in [-180, 180], which the source regions and GDAL's warper missed."""
    import zarr
    from rasterio.transform import Affine

    with rasterio.open(scenes["10"]) as src:
        data = src.read()[:, :96, :96]
    model = _model(tmp_path / "m", weights, crs="EPSG:32660")
    probs = {}
    for name, west in (("east", 179.99), ("west", 179.99 - 360.0)):
        path = tmp_path / f"{name}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=96, height=96, count=4, dtype=data.dtype,
                           crs="EPSG:4326", transform=Affine(0.000146, 0, west, 0, -0.00009, 52.0)) as dst:
            dst.write(data)
        out = segment_one(path, model, tmp_path / name, SegmentOptions(chunk_size=32, probabilities="float32"),
                          dask_cluster)
        assert out.ok, out.error
        assert out.statistics["model_space"]["model"]["crs"] == "EPSG:32660"
        assert "unlabelled" not in out.statistics and not out.statistics.get("warnings")
        labels, _ = _labels(tmp_path / name / path.name)
        assert not np.any(labels == 255), int((labels == 255).sum())
        assert len(np.unique(labels)) >= 2
        probs[name] = np.asarray(zarr.open_group(str(tmp_path / name / f"{name}.zarr"), mode="r")[PROBABILITIES])
    err = float(np.abs(probs["east"] - probs["west"]).max())
    assert err <= 1e-5, f"the two writings of one place differ by {err:.2e}"


def test_a_local_crs_or_none_warps_as_its_projected_twin(scenes, weights, tmp_path, dask_cluster):
    """A site grid in a local (engineering) CRS in metres had failed with rasterio's "Linear units factor is not
    defined for non projected CRS"; without a CRS the transform's units are taken as metres, which the run now
    says where it resamples.  Both give the labels of the same pixels in their UTM zone."""
    from rasterio.crs import CRS

    model = _model(tmp_path / "m", weights)
    local = CRS.from_wkt('LOCAL_CS["site",UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]')
    with rasterio.open(scenes["5"]) as src:
        profile, data = src.profile, src.read()
    labels = {}
    for name, crs in (("utm", profile["crs"]), ("local", local), ("none", None)):
        path = tmp_path / f"{name}.tif"
        with rasterio.open(path, "w", **{**profile, "crs": crs}) as dst:
            dst.write(data)
        outcome = segment_one(path, model, tmp_path / "out", SegmentOptions(chunk_size=64), dask_cluster)
        assert outcome.ok, outcome.error
        labels[name] = _labels(tmp_path / "out" / f"{name}.tif")[0]
        notes = outcome.statistics.get("warnings") or []
        if name == "none":
            assert any("has no CRS, so its pixel size (5 x 5) is taken as metres and resampled to the 10 x 10 m "
                       "of model" in n for n in notes), notes
    assert np.array_equal(labels["local"], labels["utm"]) and np.array_equal(labels["none"], labels["utm"])
    assert len(np.unique(labels["utm"])) > 1


def test_a_small_coarse_scene_gets_a_model_grid_in_ingest_sized_chunks(weights, tmp_path, dask_cluster):
    """16 x 16 pixels of 600 m for a 10 m model: the model grid (960²) had been cut in the input store's own
    16-pixel chunks, 3600 of them, and the run spent 90 s scheduling them for 1 s of windows."""
    from flows.modelspace import build
    from storage.ingest import ingest

    path = tmp_path / "coarse.tif"
    data = np.random.default_rng(2).integers(300, 3000, (4, 16, 16)).astype(np.uint16)
    with rasterio.open(path, "w", driver="GTiff", width=16, height=16, count=4, dtype="uint16", crs="EPSG:32633",
                       transform=from_origin(400000, 5800000, 600, 600)) as dst:
        dst.write(data)
    store = ingest(path, tmp_path / "coarse.image.zarr")
    assert store.image.chunks[1:] == (16, 16)
    model = _model(tmp_path / "m", weights)
    plan, mapping, _ = build(store, model, SegmentOptions(), dask_cluster)
    chosen, _, _ = build(store, model, SegmentOptions(chunk_size=256), dask_cluster)
    assert mapping.model_shape == (960, 960)
    assert plan.stitch.chunks == ((960,), (960,))  # one chunk, as a 960² scene of its own would have
    assert chosen.stitch.chunks == ((256, 256, 256, 192),) * 2  # --chunk-size still decides


def test_a_scene_at_the_models_gsd_is_not_warped_and_its_outputs_are_unchanged(scenes, weights, tmp_path,
                                                                              dask_cluster):
    """Card version 4 at 10 m on a 10 m scene: the same labels and probabilities as a version 3 card (whose 2-D
    spacing is documentation only), no model-space store, nothing recorded."""
    v4 = _model(tmp_path / "v4", weights)
    v3 = _model(tmp_path / "v3", weights)
    card3 = v3.card.model_copy(update={"card_version": 3})
    v3 = type(v3)(path=v3.path, card=card3, module=v3.module, weights_sha256=v3.weights_sha256,
                  weights_path=v3.weights_path)
    options = SegmentOptions(chunk_size=64, probabilities="float32")
    a = segment_one(scenes["10"], v4, tmp_path / "a", options, dask_cluster)
    b = segment_one(scenes["10"], v3, tmp_path / "b", options, dask_cluster)
    assert "model_space" not in a.statistics and "model_space" not in b.statistics
    record = json.loads((tmp_path / "a" / "ten.provenance.json").read_text())
    assert "resampling" not in record["parameters"]
    with rasterio.open(tmp_path / "a" / "ten.tif") as x, rasterio.open(tmp_path / "b" / "ten.tif") as y:
        assert np.array_equal(x.read(), y.read()) and x.transform == y.transform
    for name in ("ten.probabilities.tif",):
        with rasterio.open(tmp_path / "a" / name) as x, rasterio.open(tmp_path / "b" / name) as y:
            assert np.array_equal(x.read(), y.read())
    assert mapping_for_store_is_none(scenes["10"], v4, tmp_path)


def mapping_for_store_is_none(scene: Path, model, tmp_path: Path) -> bool:
    from storage.ingest import ingest

    store = ingest(scene, tmp_path / "s.image.zarr")
    return mapping_for(store, model) is None


@pytest.mark.parametrize("probabilities", ["none", "float32"])
def test_a_valid_sliver_thinner_than_a_model_pixel_is_segmented(probabilities, scenes, weights, tmp_path,
                                                                 dask_cluster):
    """A 1-pixel valid column in a nodata band of a 5 m scene: GDAL's average gives the 10 m pixel over it a
    value (the mean of its valid input pixels), so the column is segmented, never left as a hole; the band
    around it stays nodata.  (Until 2026-12-05 a model pixel was valid only when the input pixel under its
    centre was, and the sliver came out nodata.)"""
    model = _model(tmp_path / "m", weights)
    with rasterio.open(scenes["5"]) as src:
        data, profile = src.read(), src.profile
    data[:, :, :100] = -9999.0
    data[:, :, 50] = data[:, :, 150]  # the sliver: valid values, one 5 m column wide
    scene = tmp_path / "sliver.tif"
    with rasterio.open(scene, "w", **{**profile, "nodata": -9999.0}) as dst:
        dst.write(data)
    out = segment_one(scene, model, tmp_path / "out", SegmentOptions(chunk_size=64, probabilities=probabilities),
                      dask_cluster)
    assert out.ok, out.error
    labels, _ = _labels(tmp_path / "out" / scene.name)
    nodata = 255
    assert np.all(labels[:, 50] != nodata), np.unique(labels[:, 50])
    assert np.all(labels[:, :50] == nodata) and np.all(labels[:, 51:100] == nodata)
    assert np.all(labels[:, 110:] != nodata) and len(np.unique(labels[:, 110:])) >= 2
    if probabilities == "float32":  # 0 at nodata, as the plain sliding window's; they held the warped values
        import zarr

        probs = np.asarray(zarr.open_group(str(tmp_path / "out" / "sliver.zarr"), mode="r")[PROBABILITIES])
        assert np.all(probs[:, labels == nodata] == 0.0)
        assert np.allclose(probs[:, labels != nodata].sum(0), 1.0, atol=1e-4)


@pytest.mark.parametrize("rows, cols", [(157, 191), (1, 1), (1, 37), (23, 1)])
def test_an_odd_sized_5m_scene_is_labelled_to_its_last_row_and_column(rows, cols, scenes, weights, tmp_path,
                                                                      dask_cluster):
    """An odd number of 5 m pixels: the 10 m grid's last pixel is half over the scene.  GDAL's average gives it
    the value of the half it covers, so the last input row and column (and a 1 x 1 scene) are labelled, and the
    probabilities equal the whole-image oracle's.  They came out nodata, 'ok', before 2026-12-05."""
    model = _model(tmp_path / "m", weights)
    with rasterio.open(scenes["5"]) as src:
        data, profile = src.read()[:, :rows, :cols], src.profile
    scene = tmp_path / "odd.tif"
    with rasterio.open(scene, "w", **{**profile, "height": rows, "width": cols, "tiled": False}) as dst:
        dst.write(data)
    out = segment_one(scene, model, tmp_path / "out", SegmentOptions(chunk_size=48, probabilities="float32"),
                      dask_cluster)
    assert out.ok, out.error
    labels, grid = _labels(tmp_path / "out" / scene.name)
    assert grid == _grid(scene) and not np.any(labels == 255), int((labels == 255).sum())
    import zarr

    ours = np.asarray(zarr.open_group(str(tmp_path / "out" / "odd.zarr"), mode="r")[PROBABILITIES])
    with rasterio.open(scene) as src:
        mapping = raster_mapping(_Geometry(src.transform, epsg=SCENE_EPSG), (rows, cols), spacing=[10, 10],
                                 crs=None)
    assert mapping.model_shape == ((rows + 1) // 2, (cols + 1) // 2)
    ref = oracle(scene, model, mapping)
    err = float(np.abs(ours - ref).max())
    assert err <= 1e-4, f"probabilities differ from the whole-image oracle by {err:.2e}"
    stats = json.loads((tmp_path / "out" / "odd.provenance.json").read_text())["statistics"]
    assert "unlabelled" not in stats and not stats.get("warnings")


def test_valid_pixels_a_crs_change_leaves_unlabelled_are_counted_and_said(scenes, tmp_path, dask_cluster):
    """A 30 m Web-Mercator scene at 70 N, for a 10 m model in polar stereographic (its grid turned by about 45
    degrees), with only every third pixel of every third row valid: some lone valid pixels hold no valid model
    pixel's centre, so nothing comes back to them.  GDAL's pipeline leaves them empty too; segflow says how many,
    in the run's warnings and the provenance, rather than a silent hole.  An odd-sized scene in one CRS has none
    (the test above) and no such warning."""
    from rasterio.transform import Affine
    from rasterio.warp import transform

    model = _model(tmp_path / "m", None, crs="EPSG:3413")
    with rasterio.open(scenes["10"]) as src:
        data, profile = src.read()[:, :96, :96], src.profile
    keep = np.zeros(data.shape[1:], bool)
    keep[::3, ::3] = True
    x, y = transform("EPSG:4326", "EPSG:3857", [0.0], [70.0])
    scene = tmp_path / "polar.tif"
    with rasterio.open(scene, "w", **{**profile, "height": 96, "width": 96, "crs": "EPSG:3857", "nodata": 0,
                                      "transform": Affine(30, 0, x[0], 0, -30, y[0])}) as dst:
        dst.write(np.where(keep, np.maximum(data, 1), 0).astype(data.dtype))
    out = segment_one(scene, model, tmp_path / "out", SegmentOptions(chunk_size=64, keep_zarr=False), dask_cluster)
    assert out.ok, out.error
    labels, _ = _labels(tmp_path / "out" / scene.name)
    lost = int((keep & (labels == 255)).sum())
    assert lost > 0 and not np.any(~keep & (labels != 255))
    stats = json.loads((tmp_path / "out" / "polar.provenance.json").read_text())["statistics"]
    assert stats["unlabelled"] == lost
    assert any(f"{lost:,} valid pixel(s)" in w and "have no label" in w for w in stats["warnings"]), stats["warnings"]


def test_the_way_back_budget_follows_the_machine():
    """A sixteenth of the machine's memory, never under 512 MB (small machines keep the old budget) nor over 2 GB;
    and the budget decides where the border strips take over: at 32768² (5 m to 10 m, 5 classes, 1024² chunks,
    three rows of model chunks 1 GB) a 24 GB machine holds the rows, an 8 GB one takes the strips."""
    from types import SimpleNamespace

    from flows.modelspace import stage_memory
    from storage.wayback import RasterWayBack

    assert stage_memory(1 << 30) == stage_memory(8 << 30) == 512 << 20
    assert stage_memory(24 << 30) == (24 << 30) // 16
    assert stage_memory(32 << 30) == stage_memory(256 << 30) == 2 << 30
    probs = SimpleNamespace(shape=(5, 16384, 16384), dtype=np.dtype(np.float32),
                            chunks=((5,), (1024,) * 16, (1024,) * 16))
    pays = [RasterWayBack._strips_pay(SimpleNamespace(memory=stage_memory(gb << 30)), probs) for gb in (8, 24)]
    assert pays == [True, False]


def test_the_way_back_held_in_memory_gives_the_labels_of_staged_files_and_holds_nothing_after(scenes, weights,
                                                                                             tmp_path, monkeypatch):
    """One local worker keeps the stitched model-grid chunks in memory for the way back (within
    ``STAGE_MEMORY``, files past it): the labels equal those staged through files only, with a budget of two
    chunks (some held, some written) too, and nothing stays held once the run ends."""
    import os

    import flows.modelspace as modelspace
    from flows.cluster import dask_client
    from storage import workarray

    model = _model(tmp_path / "m", weights)
    scene = scenes["5"]
    written: list[str] = []
    replace = os.replace

    def spy(src, dst):  # the staged chunks that went to a file (whole chunks: "i.j.npy")
        if re.fullmatch(r"\d+\.\d+\.npy", os.path.basename(dst)):
            written.append(str(dst))
        return replace(src, dst)

    monkeypatch.setattr(workarray.os, "replace", spy)
    chunk_bytes = 5 * 48 * 48 * 4  # one model-grid chunk of probabilities
    runs = {}
    with dask_client(workers=0, threads_per_worker=2) as client:  # its own one in-process worker, not a session's
        for name, budget in (("files", 0), ("two chunks", 2 * chunk_bytes), ("memory", modelspace.STAGE_MEMORY)):
            monkeypatch.setattr(modelspace, "STAGE_MEMORY", budget)
            written.clear()
            held, workarray._HELD.peak = workarray._HELD.nbytes, 0
            out = segment_one(scene, model, tmp_path / name, SegmentOptions(chunk_size=48, keep_zarr=False), client)
            assert out.ok
            runs[name] = (_labels(tmp_path / name / scene.name)[0], len(written), workarray._HELD.peak)
            assert workarray._HELD.nbytes == held  # nothing left held by the finished run
    labels, files, peak = runs["files"]
    # 160 x 192 model pixels in chunks of 48: 4 x 4, all written (and the strips along their borders that
    # the input pixels straddling two chunks read)
    assert files == 16 and peak == 0
    assert 0 < runs["two chunks"][1] < 16 and 0 < runs["two chunks"][2] <= 2 * chunk_bytes
    assert runs["memory"][1] == 0 and runs["memory"][2] >= 2 * chunk_bytes
    for name in ("two chunks", "memory"):
        assert np.array_equal(runs[name][0], labels), f"{name}: {(runs[name][0] != labels).mean():.2e} differ"


@pytest.mark.parametrize("pixel", [1000.0, 0.1])
def test_a_pixel_size_far_from_the_models_is_refused_before_any_work(pixel, tmp_path, dask_cluster):
    """A 79 x 71 raster at 3 km given to a 10 m model was resampled 300x per axis: a 505-megapixel model grid, a
    231 MiB graph and 3.3 GB after five minutes.  Past 64x per axis either way (a voxel-size rule like volumes'):
    one line naming both pixel sizes, and nothing written."""
    model = _model(tmp_path / "m")
    scene = tmp_path / "far.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=30, height=20, count=4, dtype="float32", crs="EPSG:32633",
                       transform=from_origin(500000, 6000000, pixel, pixel)) as dst:
        dst.write(np.ones((4, 20, 30), np.float32))
    way = "resampled 100x" if pixel > 10 else "averaged 100x"
    with pytest.raises(InvalidInputError, match=f"far.tif: its {pixel:,.4g} m pixels would be {way} per axis to the "
                                                 "10 x 10 m of model .* more than 64x per axis is refused"):
        segment_one(scene, model, tmp_path / "out", SegmentOptions(), dask_cluster)
    assert not list((tmp_path / "out").glob("far*"))
    assert not list((tmp_path / "out").glob("far*"))


def test_a_card_spacing_of_almost_nothing_is_refused_in_a_line_of_readable_numbers(tmp_path, dask_cluster):
    """A card's spacing [0, 1e-300] (0 keeps that axis) printed "its 0 m pixels would be resampled
    3,162,277,660,...x", a number hundreds of digits long, for a scene of 10 m pixels."""
    from tests.models import tiny_model

    model = tiny_model(tmp_path / "m", spatial_dims=2, channels=4, classes=5, roi=ROI, seed=3,
                       spacing=[0.0, 1e-300], spacing_unit="m")
    scene = tmp_path / "tiny.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=30, height=20, count=4, dtype="float32", crs="EPSG:32633",
                       transform=from_origin(500000, 6000000, 10.0, 10.0)) as dst:
        dst.write(np.ones((4, 20, 30), np.float32))
    with pytest.raises(InvalidInputError) as err:
        segment_one(scene, model, tmp_path / "out", SegmentOptions(), dask_cluster)
    message = str(err.value)
    assert "its 10 m pixels would be resampled 3.16e+150x per axis" in message and len(message) < 400, message
