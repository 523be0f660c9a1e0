"""Mosaics across tiles: a scene cut into tiles and segmented with ``--mosaic`` equals the uncut scene's labels.

A generated 256x256, 3-band scene in UTM zone 33 straddles 18°E (the border of
zone 34).  Cut into 2x2 tiles of 128 pixels, ``segflow segment tiles --mosaic``
gives the uncut scene's labels pixel for pixel, while per-tile runs differ, and
only within one window (ROI) of the cuts.  With the right-hand tiles delivered
in zone 34, the mosaic is refused without ``--crs``; with ``--crs EPSG:32633``
it equals the labels of one reference raster holding the same warped mosaic,
materialised whole here with ``rasterio.warp.reproject`` (bilinear), for two
chunk sizes.  The model windows are 32 pixels with overlap 0.5 (a 16-pixel
step that divides the tiles), so windows away from the cuts are the same in
both runs.
"""

from __future__ import annotations

import shutil

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.warp import Resampling, calculate_default_transform, reproject
from typer.testing import CliRunner

from storage.hashing import sha256_file
from storage.mosaic import MosaicRef, plan_mosaic, write_mosaic_vrt
from tests.models import tiny_model

SIZE, TILE, ROI = 256, 128, 32
ORIGIN = (726000.0, 5200000.0)  # UTM 33N, about 46.9°N 18°E: the scene straddles zone 34's border
PIXEL = 10.0
SEGMENT = ["--overlap", "0.5", "--no-zarr"]


def _scene() -> np.ndarray:
    """Three bands of structure at several scales: blobs, stripes and texture, so labels vary across windows."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    blobs = np.zeros((SIZE, SIZE), np.float32)
    for cy, cx, r in rng.uniform([0, 0, 10], [SIZE, SIZE, 40], size=(12, 3)):
        blobs += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return np.stack([blobs * 2 - 1, np.sin(xx / 9.0) * np.cos(yy / 13.0),
                     rng.normal(0, 0.5, (SIZE, SIZE)).astype(np.float32) + (yy - xx) / SIZE]).astype(np.float32)


def _write(path: Path, data: np.ndarray, transform: Any, crs: str = "EPSG:32633", nodata: float | None = None) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype="float32", crs=crs, transform=transform, nodata=nodata, tiled=True, blockxsize=64,
                       blockysize=64) as dst:
        dst.write(data)
    return path


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> dict[str, Any]:
    """The whole scene, its 2x2 tiles in zone 33, and the right-hand tiles reprojected into zone 34."""
    root = tmp_path_factory.mktemp("mosaic")
    data = _scene()
    whole = _write(root / "scene.tif", data, from_origin(*ORIGIN, PIXEL, PIXEL))
    (root / "tiles").mkdir()
    (root / "zones").mkdir()
    tiles, zones = [], []
    for r in range(2):
        for c in range(2):
            transform = from_origin(ORIGIN[0] + c * TILE * PIXEL, ORIGIN[1] - r * TILE * PIXEL, PIXEL, PIXEL)
            part = data[:, r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]
            tile = _write(root / "tiles" / f"tile_{r}_{c}.tif", part, transform)
            tiles.append(tile)
            if c == 0:
                zones.append(_write(root / "zones" / f"z33_{r}_{c}.tif", part, transform))
                continue
            dst_t, w, h = calculate_default_transform("EPSG:32633", "EPSG:32634", TILE, TILE,
                                                      *rasterio.transform.array_bounds(TILE, TILE, transform))
            warped = np.full((3, h, w), np.nan, np.float32)
            reproject(part, warped, src_transform=transform, src_crs="EPSG:32633", dst_transform=dst_t,
                      dst_crs="EPSG:32634", resampling=Resampling.bilinear, dst_nodata=np.nan)
            zones.append(_write(root / "zones" / f"z34_{r}_{c}.tif", warped, dst_t, "EPSG:32634", nodata=np.nan))
    model = tiny_model(root / "model", spatial_dims=2, channels=3, roi=[ROI, ROI], seed=3,
                       normalization={"mode": "zscore", "mean": [0.0, 0.0, 0.0], "std": [0.5, 0.5, 0.5]})
    return {"root": root, "data": data, "whole": whole, "tiles": tiles, "zones": zones, "model": model.path}


def _segment(inputs: list[Path], model: Path, out: Path, client: Any, *extra: str) -> tuple[int, list[str], str]:
    """`segflow segment` in this process on the test cluster; (exit code, error lines, whole output)."""
    from flows.cli import app

    res = CliRunner().invoke(app, ["segment", *map(str, inputs), "--model", str(model), "--out", str(out),
                                   *SEGMENT, *extra, "--dask-address", client.scheduler.address],
                             env={"COLUMNS": "400"})
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    return res.exit_code, errors, res.output


def _labels(path: Path) -> tuple[np.ndarray, Any, Any]:
    with rasterio.open(path) as src:
        return src.read(1), src.transform, src.crs


def test_a_mosaic_of_tiles_gives_the_uncut_scenes_labels_and_per_tile_runs_differ_only_near_the_cuts(
        scene, tmp_path, dask_cluster):
    model = scene["model"]
    code, errors, output = _segment([scene["whole"]], model, tmp_path / "whole", dask_cluster, "--chunk-size", "64")
    assert code == 0, output
    code, errors, output = _segment(scene["tiles"], model, tmp_path / "mosaic", dask_cluster, "--chunk-size", "64",
                                    "--mosaic", "region", "--split-by-tile")
    assert code == 0, output
    whole, whole_t, whole_crs = _labels(tmp_path / "whole" / "scene.tif")
    mosaic, mosaic_t, mosaic_crs = _labels(tmp_path / "mosaic" / "region.tif")
    assert (mosaic_t, mosaic_crs, mosaic.shape) == (whole_t, whole_crs, whole.shape)
    assert np.array_equal(mosaic, whole)  # seamless: no tile edge is an image edge
    assert len(np.unique(whole)) > 1

    # each tile alone: its edges are image edges, so windows near the cuts differ, and only there
    code, errors, output = _segment(scene["tiles"], model, tmp_path / "alone", dask_cluster, "--chunk-size", "64")
    assert code == 0, output
    alone = np.zeros_like(mosaic)
    for r in range(2):
        for c in range(2):
            window = (slice(r * TILE, (r + 1) * TILE), slice(c * TILE, (c + 1) * TILE))
            alone[window] = _labels(tmp_path / "alone" / f"tile_{r}_{c}.tif")[0]
    differ = alone != mosaic
    assert differ.any()
    yy, xx = np.nonzero(differ)
    near_a_cut = (np.abs(yy + 0.5 - TILE) < ROI) | (np.abs(xx + 0.5 - TILE) < ROI)
    assert near_a_cut.all(), f"{(~near_a_cut).sum()} pixels differ farther than one ROI from the cuts"

    # --split-by-tile: one COG per tile, on the tile's own grid, equal to the mosaic's labels in its window
    record = json.loads((tmp_path / "mosaic" / "region.provenance.json").read_text())
    listed = record["input"]["mosaic"]["tiles"]
    assert [t["path"] for t in listed] == [str(t.absolute()) for t in scene["tiles"]]
    assert [t["sha256"] for t in listed] == [sha256_file(t) for t in scene["tiles"]]
    for r in range(2):
        for c in range(2):
            tile = scene["tiles"][2 * r + c]
            cut, cut_t, _ = _labels(tmp_path / "mosaic" / f"{tile.stem}.tif")
            with rasterio.open(tile) as src:
                assert (cut_t, cut.shape) == (src.transform, (src.height, src.width))
            assert np.array_equal(cut, mosaic[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE])
            assert f"{tile.stem}.tif" in record["outputs"]
            # each cut's QGIS style, the mosaic's own classes (the cuts had none: bare values in QGIS)
            style = tmp_path / "mosaic" / f"{tile.stem}.qml"
            assert style.read_bytes() == (tmp_path / "mosaic" / "region.qml").read_bytes()
            assert style.name in record["outputs"]
    assert record["input"]["sha256"] == MosaicRef("region", tuple(str(t.absolute()) for t in scene["tiles"])).sha256()
    item = json.loads((tmp_path / "mosaic" / "region.stac.json").read_text())
    assert [link["href"] for link in item["links"] if link["rel"] == "derived_from"] == [str(t.absolute())
                                                                                        for t in scene["tiles"]]
    from flows.cli import app

    verified = CliRunner().invoke(app, ["verify", str(tmp_path / "mosaic" / "region.tif")])
    assert verified.exit_code == 0, verified.output
    # a cut has no sidecar of its own: the mosaic's records it (verify said "no such provenance file")
    cut = tmp_path / "mosaic" / f"{scene['tiles'][0].stem}.tif"
    verified = CliRunner().invoke(app, ["verify", str(cut)])
    assert verified.exit_code == 0 and "region.provenance.json" in verified.output, verified.output
    from storage.provenance import verify

    report = verify(tmp_path / "mosaic" / "region.provenance.json")  # every tile rehashed, none unreachable
    assert not report.problems and not report.unverified, (report.problems, report.unverified)
    assert sum(v.startswith("mosaic tile ") for v in report.verified) == len(scene["tiles"])
    assert not (tmp_path / "mosaic" / ".segflow-work").exists()


def _composite(zones: list[Path], grid: Path) -> np.ndarray:
    """The warped mosaic computed independently: each zone-34 tile reprojected whole (bilinear) onto the output's
    grid, then the zone-33 tiles pasted as they are (tiles on the grid win over warped ones; the first named
    wins).  NaN where no tile reaches."""
    with rasterio.open(grid) as g:
        transform, crs, h, w = g.transform, g.crs, g.height, g.width
    mosaic = np.full((3, h, w), np.nan, np.float32)
    warped = [z for z in zones if "z34" in z.name]
    for z in reversed(warped):
        with rasterio.open(z) as src:
            part = np.full((3, h, w), np.nan, np.float32)
            reproject(src.read(), part, src_transform=src.transform, src_crs=src.crs, src_nodata=np.nan,
                      dst_transform=transform, dst_crs=crs, dst_nodata=np.nan, resampling=Resampling.bilinear,
                      XSCALE=1, YSCALE=1)  # the kernel segflow uses for tiles of the mosaic's pixel size
            valid = ~np.isnan(part).any(axis=0)
            mosaic[:, valid] = part[:, valid]
    for z in reversed([z for z in zones if z not in warped]):
        with rasterio.open(z) as src:
            col, row = ~transform * (src.transform.c, src.transform.f)
            col, row = int(round(col)), int(round(row))
            mosaic[:, row:row + src.height, col:col + src.width] = src.read()
    return mosaic


def _reference(zones: list[Path], folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """The same warped mosaic materialised whole: its VRT read in one piece, written as one GeoTIFF with its
    footprint as an internal mask (the pixels outside keep the VRT's 0: the network sees them as the run does)."""
    plan = plan_mosaic(MosaicRef("region", tuple(str(z) for z in zones), "EPSG:32633"))
    vrt = write_mosaic_vrt(plan, folder / "vrt")
    with rasterio.open(vrt) as src:
        image, valid = src.read([1, 2, 3]), src.dataset_mask() > 0
    path = folder / "reference.tif"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), \
            rasterio.open(path, "w", driver="GTiff", width=plan.width, height=plan.height, count=3, dtype="float32",
                          crs="EPSG:32633", transform=plan.transform, tiled=True, blockxsize=64, blockysize=64) as dst:
        dst.write(image)
        dst.write_mask(valid.astype(np.uint8) * 255)
    return path, np.where(valid, image, np.float32(np.nan)), valid


def test_tiles_in_two_utm_zones_are_refused_without_crs_and_warped_with_it(scene, tmp_path, dask_cluster):
    model, zones = scene["model"], scene["zones"]
    code, errors, output = _segment(zones, model, tmp_path / "refused", dask_cluster, "--mosaic", "region")
    assert code == 1 and len(errors) == 1, output
    assert "its tiles are in 2 CRSs (EPSG:32633: z33_0_0.tif, z33_1_0.tif; EPSG:32634: z34_0_1.tif, " \
           "z34_1_1.tif); give --crs EPSG:n" in errors[0]
    assert not (tmp_path / "refused").exists()  # a run whose every input failed leaves no new OUT
    assert "Dask scheduler" not in output  # refused from the tiles' headers, before any cluster is reached

    labels = {}
    for chunk in ("64", "40"):
        out = tmp_path / f"c{chunk}"
        code, errors, output = _segment(zones, model, out, dask_cluster, "--chunk-size", chunk, "--mosaic", "region",
                                        "--crs", "EPSG:32633", "--split-by-tile")
        assert code == 0, output
        labels[chunk] = _labels(out / "region.tif")
    assert np.array_equal(labels["64"][0], labels["40"][0])  # the warp does not depend on the chunking
    mosaic, transform, crs = labels["64"]
    assert crs.to_epsg() == 32633 and transform.a == PIXEL and (transform.c - ORIGIN[0]) % PIXEL == 0

    reference, whole, valid = _reference(zones, tmp_path)
    independent = _composite(zones, tmp_path / "c64" / "region.tif")
    assert np.array_equal(valid, ~np.isnan(independent).any(axis=0))  # the same footprint, pixel for pixel
    assert np.nanmax(np.abs(whole - independent)) < 1e-3  # GDAL's reproject approximates the transform (1/8 px)
    code, errors, output = _segment([reference], model, tmp_path / "ref", dask_cluster, "--chunk-size", "64")
    assert code == 0, output
    expected, ref_t, _ = _labels(tmp_path / "ref" / "reference.tif")
    assert ref_t == transform
    assert np.array_equal(mosaic, expected)

    # the zone-33 tiles came through untouched: their labels equal the uncut scene's where no warped pixel reaches
    plan = plan_mosaic(MosaicRef("region", tuple(str(z) for z in zones), "EPSG:32633"))
    placed = {Path(p.tile.path).name: p for p in plan.placements}
    assert not placed["z33_0_0.tif"].warped and placed["z34_0_1.tif"].warped
    # split outputs: a warped tile's cut lies on its window of the mosaic's grid, in the mosaic's CRS
    p = placed["z34_1_1.tif"]
    cut, cut_t, cut_crs = _labels(tmp_path / "c64" / "z34_1_1.tif")
    assert cut_crs.to_epsg() == 32633 and cut.shape == (p.height, p.width)
    assert np.array_equal(cut, mosaic[p.row:p.row + p.height, p.col:p.col + p.width])
    assert cut_t == transform * rasterio.Affine.translation(p.col, p.row)


def _bad_tiles(scene: dict[str, Any], folder: Path) -> dict[str, tuple[Path, str]]:
    """One bad tile per case, with what its one-line error says."""
    folder.mkdir()
    data = scene["data"]
    transform = from_origin(ORIGIN[0] + TILE * PIXEL, ORIGIN[1], PIXEL, PIXEL)
    volume = folder / "volume.nii.gz"
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), volume)
    damaged = folder / "damaged.tif"
    damaged.write_bytes(scene["tiles"][1].read_bytes()[:600])
    return {
        "volume": (volume, "is a volume, not a raster tile"),
        "bands": (_write(folder / "two_bands.tif", data[:2, :TILE, TILE:], transform),
                  "has 2 band(s), the mosaic's first tile tile_0_0.tif has 3"),
        "offset": (_write(folder / "offset.tif", data[:, :TILE, TILE:],
                          transform * rasterio.Affine.translation(0.5, 0)),
                   "its grid is offset from the mosaic's by a fraction of a pixel (0.500, 0.000); give --crs"),
        "pixel": (_write(folder / "coarse.tif", data[:, :TILE:2, TILE::2], from_origin(*transform * (0, 0), 20, 20)),
                  "its pixel size is 20 x 20, the mosaic's 10 x 10"),
        "damaged": (damaged, "cannot read pixels"),  # it opens, and fails when its pixels are read
        "dtype": (_integers(folder / "integers.tif", data[:, :TILE, TILE:], transform),
                  "its pixels are int16, the first tile tile_0_0.tif's float32: integers beside floats"),
    }


def _integers(path: Path, data: np.ndarray, transform: Any) -> Path:
    """The tile as integers (the same values, scaled): a mosaic of these beside floats had gone through, warned
    about as float32 throughout."""
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype="int16", crs="EPSG:32633", transform=transform) as dst:
        dst.write((data * 1000).astype(np.int16))
    return path


def test_a_bad_tile_fails_the_whole_mosaic_in_one_line_naming_it(scene, tmp_path, dask_cluster):
    from flows.config import SegmentOptions
    from flows.pipeline import segment_one
    from segmentation import load_model
    from storage.errors import SegflowError
    from storage.mosaic import mosaic_ref

    good = [scene["tiles"][0], scene["tiles"][2], scene["tiles"][3]]
    model = load_model(scene["model"])
    cases = _bad_tiles(scene, tmp_path / "bad")
    damaged, says = cases.pop("damaged")  # through the CLI below; the others through the pipeline itself
    for case, (bad, says) in cases.items():
        out = tmp_path / case
        inputs = [str(p) for p in (good[0], bad, *good[1:])]
        with pytest.raises(SegflowError) as err:
            segment_one(mosaic_ref("region", inputs), model, out, SegmentOptions(mosaic="region"), dask_cluster)
        assert str(err.value).startswith(f"{bad.absolute()}: ") and says in str(err.value), (case, str(err.value))
        assert "\n" not in str(err.value)
        assert not out.exists() or not any(out.iterdir()), (case, sorted(out.rglob("*")))
    out = tmp_path / "damaged"
    code, errors, output = _segment([good[0], damaged, *good[1:]], scene["model"], out, dask_cluster,
                                    "--mosaic", "region")
    assert code == 1 and len(errors) == 1, output
    assert errors[0].startswith(f"error: {damaged.absolute()}: cannot read pixels (rows 0-63, cols 0-63)"), errors
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))
    code, errors, output = _segment(good, scene["model"], tmp_path / "x", dask_cluster, "--split-by-tile")
    assert code == 2 and "--split-by-tile applies to a mosaic of tiles; add --mosaic NAME" in output
    clash = [*good, scene["root"] / "tiles" / "region.tif"]
    clash[-1].write_bytes(scene["tiles"][1].read_bytes())
    code, errors, output = _segment(clash, scene["model"], tmp_path / "clash", dask_cluster, "--mosaic", "region",
                                    "--split-by-tile")
    clash[-1].unlink()
    assert code == 1 and len(errors) == 1 and "is named like the mosaic 'region'" in errors[0], output
    # --split-by-tile into the tiles' own folder: each tile's cut (OUT/<tile stem>.tif) would replace the tile
    own = tmp_path / "own"
    own.mkdir()
    tiles = [Path(shutil.copy(t, own / t.name)) for t in good]
    before = [t.read_bytes() for t in tiles]
    code, errors, output = _segment(tiles, scene["model"], own, dask_cluster, "--mosaic", "region", "--split-by-tile")
    assert code == 1, output
    assert errors == [f"error: {tiles[0]}: its output {own / tiles[0].name} would overwrite it (--out is the folder "
                      "the input is in, and the names coincide); choose another --out"], output
    assert [t.read_bytes() for t in tiles] == before
    assert sorted(p.name for p in own.iterdir()) == sorted(t.name for t in tiles)


def test_an_unreadable_tile_is_named_with_a_relative_out(scene, tmp_path, monkeypatch, dask_cluster):
    """With --out relative, a tile whose pixels cannot be read was reported as segflow's work VRT
    (OUT/.segflow-work/.NAME....vrt-.../NAME.vrt): its folder, relative, was compared with the absolute path the
    ingest's error holds.  Now the tile, as with an absolute --out."""
    good = [scene["tiles"][0], scene["tiles"][2], scene["tiles"][3]]
    damaged, _ = _bad_tiles(scene, tmp_path / "bad")["damaged"]
    monkeypatch.chdir(tmp_path)
    code, errors, output = _segment([good[0], damaged, *good[1:]], scene["model"], Path("rel"), dask_cluster,
                                    "--mosaic", "region")
    assert code == 1 and len(errors) == 1, output
    assert errors[0].startswith(f"error: {damaged.absolute()}: cannot read pixels (rows 0-63, cols 0-63)"), errors
    rel = tmp_path / "rel"
    assert not rel.exists() or not any(rel.iterdir()), sorted(rel.rglob("*"))


def test_the_mosaics_identity_is_its_tiles_content_and_its_ingest_is_never_a_tiles(scene, tmp_path):
    from flows.inputs import ingest_input
    from storage.mosaic import mosaic_ref

    tiles = [str(t) for t in scene["tiles"]]
    ref = mosaic_ref("region", tiles)
    moved = tmp_path / "moved"
    moved.mkdir()
    copies = []
    for t in scene["tiles"]:
        copies.append(moved / t.name)
        copies[-1].write_bytes(t.read_bytes())
    assert mosaic_ref("region", [str(c) for c in copies]).sha256() == ref.sha256()  # content, not paths
    assert mosaic_ref("region", tiles[::-1]).sha256() != ref.sha256()  # the order decides overlaps
    assert mosaic_ref("region", tiles, "EPSG:32633").sha256() != ref.sha256()

    work = tmp_path / "work"
    store, reused = ingest_input(ref, work, 64)
    assert not reused and store.meta.source.sha256 == ref.sha256() and store.meta.source.format == "mosaic"
    assert np.array_equal(store.image[:], scene["data"])
    region_tile = moved / "region.tif"  # a tile named like the mosaic, ingested in the same work folder
    region_tile.write_bytes(scene["tiles"][0].read_bytes())
    tile_store, tile_reused = ingest_input(region_tile, work, 64)
    assert not tile_reused and tile_store.path != store.path and tile_store.meta.source.format == "GTiff"
    again, reused = ingest_input(ref, work, 64)
    assert reused and again.path == store.path
    with rasterio.open(copies[1], "r+") as dst:  # one pixel of one tile changes: another mosaic
        dst.write(np.full((1, 1), 9.0, np.float32), 1, window=rasterio.windows.Window(0, 0, 1, 1))
    changed = mosaic_ref("region", [str(c) for c in copies])
    assert changed.sha256() != ref.sha256()
    fresh, reused = ingest_input(changed, work, 64)
    assert not reused and fresh.image[0, 0, TILE] == 9.0


def test_an_unknown_crs_is_one_line_with_nothing_from_gdal_before_it(scene, tmp_path):
    """GDAL had printed its own "ERROR 1: PROJ: ... crs not found" on the terminal before segflow's line.  A bad
    option is exit 2, before any work; it had been a failed mosaic, exit 1 (GIS probe, 2026-12-06)."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "flows", "segment", str(scene["zones"][0]), "--mosaic", "m",
                           "--crs", "EPSG:99999", "--model", str(scene["model"]), "--out", str(tmp_path / "out"),
                           "--no-prefect"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "400"})
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --crs 'EPSG:99999' is not a CRS GDAL knows"), proc.stderr
    assert not (tmp_path / "out").exists()
