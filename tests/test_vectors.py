"""Label rasters to polygons: band-wise vectorising must equal one whole-raster rasterio.features.shapes run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pyogrio.raw
import pytest
import rasterio.features
import shapely
import zarr
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.transform import Affine
from shapely.geometry import shape

from storage.classes import LabelClass
from storage.errors import ExportError, InvalidInputError
from storage.vectors import write_polygons

CLASSES = [
    LabelClass(value=0, name="background"),
    LabelClass(value=1, name="stripes"),
    LabelClass(value=2, name="u shape"),
    LabelClass(value=3, name="spiral"),
    LabelClass(value=4, name="checks"),
]
NODATA = 255
PIXEL_M = 10.0
TRANSFORM = Affine(PIXEL_M, 0.0, 500_000.0, 0.0, -PIXEL_M, 4_600_000.0)
CRS_UTM = CRS.from_epsg(32631)


def spiral(size: int) -> np.ndarray:
    """A square spiral one pixel wide with one-pixel gaps: one region that winds through many bands."""
    grid = np.zeros((size, size), dtype=bool)
    r, c, dr, dc = 0, 0, 0, 1
    grid[r, c] = True
    turns = 0
    while turns < 2:
        ahead, beyond = (r + dr, c + dc), (r + 2 * dr, c + 2 * dc)
        inside = all(0 <= x < size for x in beyond)
        if inside and not grid[beyond] and not grid[ahead]:
            r, c = ahead
            grid[r, c] = True
            turns = 0
        else:  # turn clockwise; two turns in a row without a step means the spiral is done
            dr, dc = dc, -dr
            turns += 1
    return grid


def label_map() -> np.ndarray:
    """Stripes, a U, a spiral, a checkerboard on band borders (corner contacts only) and nodata holes."""
    lab = np.zeros((300, 200), dtype=np.uint8)
    lab[:, 5:8] = 1  # vertical stripes spanning every band
    lab[:, 12:14] = 1
    lab[40:250, 20:30] = 2  # a U whose arms join only at the bottom, many bands down
    lab[40:250, 50:60] = 2
    lab[240:250, 20:60] = 2
    s = spiral(90)
    lab[150:240, 100:190][s] = 3
    yy, xx = np.mgrid[28:36, 70:90]  # single-pixel checks straddling the band border at row 32
    lab[28:36, 70:90][(yy + xx) % 2 == 0] = 4
    lab[100:120, 120:140] = 1  # a block of stripes' class with a nodata hole crossing the border at row 96/128
    lab[110:115, 125:130] = NODATA
    lab[60:70, 150:200] = NODATA  # nodata reaching the right edge
    lab[280:300, 30:45] = 2  # touches the last band's bottom edge
    return lab


def whole_image(lab: np.ndarray, values: list[int]) -> list[tuple[int, shapely.Polygon]]:
    """The reference: one rasterio.features.shapes run over the whole raster."""
    mask = np.isin(lab, values)
    return [(int(v), shape(g)) for g, v in rasterio.features.shapes(lab, mask=mask, connectivity=4, transform=TRANSFORM)]


def canonical(geoms, values) -> list[tuple[int, str]]:
    return sorted((int(v), shapely.to_wkt(shapely.normalize(g), rounding_precision=3)) for v, g in zip(values, geoms))


def read_back(path: Path, driver: str) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    """Geometries, columns and CRS as a reader sees them (pyogrio; pyarrow for GeoParquet)."""
    if driver == "Parquet":
        table = pq.read_table(path)
        geo = json.loads(table.schema.metadata[b"geo"])
        geoms = shapely.from_wkb(table.column(geo["primary_column"]).to_pylist())
        cols = {n: np.asarray(table.column(n).to_pylist()) for n in ("class", "name", "area_ha")}
        return geoms, cols, json.dumps(geo["columns"]["geometry"]["crs"])
    meta, _, wkb, fields = pyogrio.raw.read(path)
    return shapely.from_wkb(wkb), dict(zip(meta["fields"], fields)), meta["crs"]


@pytest.mark.parametrize("driver", ["GPKG", "Parquet", "GeoJSON"])
def test_bands_merge_to_the_whole_image_polygons(tmp_path: Path, driver: str) -> None:
    lab = label_map()
    store = zarr.create_array(tmp_path / "labels.zarr", shape=lab.shape, chunks=(32, 200), dtype="uint8")
    store[:] = lab
    out = tmp_path / f"regions.{ {'GPKG': 'gpkg', 'Parquet': 'parquet', 'GeoJSON': 'geojson'}[driver]}"
    result = write_polygons(store, TRANSFORM, CRS_UTM, out, classes=CLASSES, nodata=NODATA, chunk=32, driver=driver)

    geoms, cols, crs = read_back(out, driver)
    assert set(cols) >= {"class", "name", "area_ha"}
    ref = whole_image(lab, [c.value for c in CLASSES])
    assert result["polygons"] == len(ref) == len(geoms)
    if driver == "GeoJSON":  # RFC 7946: WGS84 longitude/latitude, exteriors counter-clockwise, no "crs" member
        document = json.loads(out.read_text())
        assert "crs" not in document and document["name"] == "regions"
        assert CRS.from_user_input(crs).to_epsg() == 4326
        assert all(shapely.LinearRing(g.exterior).is_ccw for g in geoms)
        to_utm = Transformer.from_crs("EPSG:4326", "EPSG:32631", always_xy=True)
        geoms = shapely.transform(geoms, lambda xy: np.column_stack(to_utm.transform(xy[:, 0], xy[:, 1])))
        def by_place(pairs):  # noqa: ANN001, ANN202 - (class, polygon) in an order that ~1 cm cannot change
            return sorted(pairs, key=lambda p: (int(p[0]), *np.round(shapely.bounds(p[1]), 1)))

        mine, whole = by_place(zip(cols["class"], geoms)), by_place(ref)
        assert [int(v) for v, _ in mine] == [int(v) for v, _ in whole]
        # 7 decimals of a degree are about 1 cm: the same outlines, vertex for vertex within 2 cm
        assert max(shapely.hausdorff_distance(a, b) for (_, a), (_, b) in zip(mine, whole)) < 0.02
        pixel_ha = PIXEL_M * PIXEL_M / 1e4
        for c in CLASSES:
            assert cols["area_ha"][cols["class"] == c.value].sum() == \
                pytest.approx(int((lab == c.value).sum()) * pixel_ha, rel=1e-12)
        return
    assert CRS.from_user_input(crs).to_epsg() == 32631
    # the very same polygons, vertex for vertex, as one whole-raster run
    assert canonical(geoms, cols["class"]) == canonical([g for _, g in ref], [v for v, _ in ref])
    assert all(isinstance(g, shapely.Polygon) and g.is_valid for g in geoms)

    pixel_ha = PIXEL_M * PIXEL_M / 1e4
    for c in CLASSES:
        pixels = int((lab == c.value).sum())
        mine = cols["area_ha"][cols["class"] == c.value]
        assert mine.sum() == pytest.approx(pixels * pixel_ha, rel=1e-12)
        assert result["area_ha"][c.name] == pytest.approx(pixels * pixel_ha, rel=1e-12)
        assert set(cols["name"][cols["class"] == c.value]) <= {c.name}
    np.testing.assert_allclose(cols["area_ha"], shapely.area(geoms) / 1e4)
    # long regions really did cross many bands: one spiral, one U, two full-height stripes
    assert (cols["class"] == 3).sum() == 1
    spiral_h = shapely.bounds(geoms[cols["class"] == 3][0])
    spiral_rows = np.flatnonzero((lab == 3).any(axis=1))
    assert (spiral_h[3] - spiral_h[1]) / PIXEL_M == spiral_rows[-1] - spiral_rows[0] + 1 > 80
    assert sum(1 for g, v in zip(geoms, cols["class"]) if v == 1 and shapely.bounds(g)[3] - shapely.bounds(g)[1] == 300 * PIXEL_M) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_corner_contacts_stay_apart_and_nodata_makes_no_polygon(tmp_path: Path) -> None:
    lab = label_map()
    out = tmp_path / "checks.gpkg"
    only = [c for c in CLASSES if c.value in (1, 4)]  # background left out: no polygon for it either
    result = write_polygons(lab, TRANSFORM, CRS_UTM, out, classes=only, nodata=NODATA, chunk=32)
    geoms, cols, _ = read_back(out, "GPKG")
    checks = np.asarray(geoms)[cols["class"] == 4]
    # an 8x20 checkerboard of single pixels: 80 polygons, none merged through a corner across row 32
    assert len(checks) == 80 and np.allclose(shapely.area(checks), PIXEL_M * PIXEL_M)
    assert set(cols["class"].tolist()) == {1, 4} and "background" not in result["area_ha"]
    # the block with a nodata hole straddling a band border is one polygon with one hole
    block = [g for g in geoms if shapely.bounds(g)[0] == 500_000 + 120 * PIXEL_M]
    assert len(block) == 1 and len(block[0].interiors) == 1
    assert block[0].area == pytest.approx((400 - 25) * PIXEL_M * PIXEL_M)


def test_two_writes_of_the_same_labels_are_the_same_geopackage_byte_for_byte(tmp_path: Path) -> None:
    """A resumed run's GeoPackage differed from an uninterrupted run's in one field: GDAL's "now" in
    ``gpkg_contents.last_change``.  With ``changed`` (the scene's time, as the STAC item's datetime) it is that."""
    import sqlite3
    import time
    from datetime import datetime, timezone

    when = datetime(2024, 5, 17, 10, 30, 5, 250000, tzinfo=timezone.utc)
    first, second = tmp_path / "a" / "s.gpkg", tmp_path / "b" / "s.gpkg"
    for out in (first, second):
        out.parent.mkdir()
        write_polygons(label_map(), TRANSFORM, CRS_UTM, out, classes=CLASSES, nodata=NODATA, chunk=64, changed=when)
        time.sleep(1.1)  # GDAL's "now" has millisecond digits: a second apart would differ
    assert first.read_bytes() == second.read_bytes()
    with sqlite3.connect(first) as db:
        assert db.execute("SELECT last_change FROM gpkg_contents").fetchall() == [("2024-05-17T10:30:05.250Z",)]
    assert len(read_back(first, "GPKG")[0]) > 0  # still a GeoPackage GDAL reads


def test_band_size_does_not_change_the_result_and_reads_stay_in_bands(tmp_path: Path) -> None:
    lab = label_map()
    rows_read: list[int] = []

    class Rows:
        """A numpy raster that records how many rows each read takes."""

        shape, dtype = lab.shape, lab.dtype

        def __getitem__(self, key: slice) -> np.ndarray:
            part = lab[key]
            rows_read.append(part.shape[0])
            return part

    results = []
    for chunk in (7, 64, 300):
        rows_read.clear()
        out = tmp_path / f"c{chunk}.geojson"
        results.append(write_polygons(Rows(), TRANSFORM, CRS_UTM, out, classes=CLASSES, nodata=NODATA, chunk=chunk, driver="GeoJSON"))
        assert max(rows_read) <= chunk and sum(rows_read) == lab.shape[0]
        geoms, cols, _ = read_back(out, "GeoJSON")
        results[-1]["canonical"] = canonical(geoms, cols["class"])
    assert results[0] == results[1] == results[2]


def test_refusals_name_the_file_and_leave_nothing(tmp_path: Path) -> None:
    lab = label_map()[:40, :30]
    with pytest.raises(InvalidInputError, match="projected CRS"):
        write_polygons(lab, TRANSFORM, "EPSG:4326", tmp_path / "a.gpkg", classes=CLASSES, nodata=NODATA)
    with pytest.raises(InvalidInputError, match="projected CRS, and the labels have none"):
        write_polygons(lab, TRANSFORM, None, tmp_path / "a.gpkg", classes=CLASSES, nodata=NODATA)
    with pytest.raises(InvalidInputError, match="2-D"):
        write_polygons(lab[None], TRANSFORM, CRS_UTM, tmp_path / "a.gpkg", classes=CLASSES, nodata=NODATA)
    missing = tmp_path / "no" / "such" / "dir" / "a.gpkg"
    with pytest.raises(ExportError, match="a.gpkg"):
        write_polygons(lab, TRANSFORM, CRS_UTM, missing, classes=CLASSES, nodata=NODATA)
    assert list(tmp_path.iterdir()) == []


def test_all_nodata_writes_an_empty_layer(tmp_path: Path) -> None:
    lab = np.full((50, 40), NODATA, dtype=np.uint8)
    out = tmp_path / "empty.gpkg"
    result = write_polygons(lab, TRANSFORM, CRS_UTM, out, classes=CLASSES, nodata=NODATA, chunk=16)
    assert result == {"polygons": 0, "area_ha": {c.name: 0.0 for c in CLASSES}}
    meta, _, wkb, _ = pyogrio.raw.read(out)
    assert len(wkb) == 0 and list(meta["fields"]) == ["class", "name", "area_ha"]


def test_segment_writes_polygons_and_a_stac_item_beside_the_cog(tmp_path, dask_cluster):
    """`--vector gpkg` on a real scene: hectares per class equal the label pixels, and the STAC item lists it all."""
    import json

    import pyogrio

    from flows.config import SegmentOptions
    from flows.pipeline import segment_one
    from tests.conftest import shared
    from tests.models import tiny_model

    src = shared("geotiff/RGB.byte.tif")  # EPSG:32618, about 300 m pixels, nodata 0 around the scene
    model = tiny_model(tmp_path / "m", spatial_dims=2, channels=3)
    outcome = segment_one(src, model, tmp_path / "out", SegmentOptions(chunk_size=256, vector="gpkg"), dask_cluster)
    names = sorted(p.split("/")[-1] for p in outcome.outputs)
    assert names == ["RGB.byte.gpkg", "RGB.byte.provenance.json", "RGB.byte.qml", "RGB.byte.stac.json",
                     "RGB.byte.tif", "RGB.byte.zarr"]
    meta, _, _, fields = pyogrio.raw.read(tmp_path / "out" / "RGB.byte.gpkg")
    columns = dict(zip(meta["fields"], fields))
    with rasterio.open(src) as ds:
        pixel_ha = abs(ds.transform.a * ds.transform.e) / 1e4
    pixels = {int(k): n for k, n in outcome.statistics["label_pixels"].items() if int(k) < 3}
    assert len(pixels) >= 2
    for value, n in pixels.items():
        area = float(columns["area_ha"][columns["class"] == value].sum())
        assert area == pytest.approx(n * pixel_ha, rel=1e-9)
    item = json.loads((tmp_path / "out" / "RGB.byte.stac.json").read_text())
    classes = next(a for a in item["assets"].values() if "classification:classes" in a)["classification:classes"]
    assert [c["value"] for c in classes] == [c.value for c in model.card.classes]
    assert any(a["href"].endswith("RGB.byte.gpkg") for a in item["assets"].values())
    assert item["properties"]["mlm:name"] == model.card.name
    # the labels carry their checksum as the weights do (multihash sha2-256), and it is the file's
    from storage.hashing import sha256_file

    cog = tmp_path / "out" / "RGB.byte.tif"
    assert item["assets"]["labels"]["file:checksum"] == "1220" + sha256_file(cog)
    assert item["assets"]["labels"]["file:size"] == cog.stat().st_size
    assert item["stac_extensions"].count("https://stac-extensions.github.io/file/v2.1.0/schema.json") == 1
    # `segflow info` reads the layer back (it had refused segflow's own polygons as "not a segflow artefact")
    from flows.inspect import describe

    info = describe(tmp_path / "out" / "RGB.byte.gpkg")
    assert info["type"] == "polygons" and info["crs"] == "EPSG:32618" and info["features"] == len(columns["class"])
    assert {c["value"]: c["area_ha"] for c in info["classes"]} == \
        pytest.approx({v: n * pixel_ha for v, n in pixels.items()}, rel=1e-9)
    assert info["provenance_sidecar"] == str(tmp_path / "out" / "RGB.byte.provenance.json")


# --- simplification keeping the topology between neighbours (--simplify) ------------------------------------

SCENE_CLASSES = [LabelClass(value=v, name=n) for v, n in
                 enumerate(["water", "forest", "cropland", "road", "built-up"])]


def voronoi_labels(shape: tuple[int, int] = (240, 200), seeds: int = 90) -> np.ndarray:
    """Cells around random seeds, five classes: many regions meeting along staircase borders, and a nodata lake."""
    rng = np.random.default_rng(7)
    points = rng.uniform(0, shape, size=(seeds, 2))
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    nearest = ((yy[..., None] - points[:, 0]) ** 2 + (xx[..., None] - points[:, 1]) ** 2).argmin(-1)
    lab = (nearest % len(SCENE_CLASSES)).astype(np.uint8)
    lab[((yy - 100) ** 2 + (xx - 80) ** 2) < 15 ** 2] = 255
    return lab


def read_ordered(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    meta, _, wkb, fields = pyogrio.raw.read(path)
    return shapely.from_wkb(wkb), dict(zip(meta["fields"], fields))


def test_simplified_polygons_keep_the_coverage_and_ignore_the_band_size(tmp_path: Path) -> None:
    lab, transform, crs = voronoi_labels(), TRANSFORM, CRS_UTM
    pixel = PIXEL_M
    exact = write_polygons(lab, transform, crs, tmp_path / "exact.gpkg", classes=SCENE_CLASSES, nodata=255, chunk=32)
    tol = 2.5 * pixel
    runs = [write_polygons(lab, transform, crs, tmp_path / f"s{chunk}.gpkg", classes=SCENE_CLASSES, nodata=255,
                           chunk=chunk, simplify=tol) for chunk in (13, 256)]
    before, cols0 = read_ordered(tmp_path / "exact.gpkg")
    after, cols = read_ordered(tmp_path / "s13.gpkg")
    other, cols_other = read_ordered(tmp_path / "s256.gpkg")
    assert len(before) > 40 and exact["polygons"] == len(before) == len(after)

    # identical files' content for two band sizes: same polygons, same order, same vertices
    assert shapely.to_wkb(after).tolist() == shapely.to_wkb(other).tolist()
    assert all((cols[k] == cols_other[k]).all() for k in cols)
    assert runs[0] == runs[1]

    # simpler: far fewer vertices, every polygon valid and still one polygon
    n_before, n_after = shapely.get_num_coordinates(before).sum(), shapely.get_num_coordinates(after).sum()
    assert n_after < 0.6 * n_before, (n_before, n_after)
    assert shapely.is_valid(after).all() and (shapely.get_type_id(after) == shapely.GeometryType.POLYGON).all()
    assert (cols["class"] == cols0["class"]).all()  # the same canonical order as the exact layer

    # the union is exactly that of the pixel outlines: no gap opened, nothing spills past the footprint
    u_before, u_after = shapely.union_all(before), shapely.union_all(after)
    assert u_after.area == pytest.approx(u_before.area, rel=1e-12)
    assert u_before.symmetric_difference(u_after).area < 1e-6 * u_before.area
    footprint = shapely.box(*rasterio.transform.array_bounds(*lab.shape, transform))
    nodata_area = (lab == 255).sum() * pixel * pixel
    assert footprint.difference(u_after).area == pytest.approx(nodata_area, rel=1e-9)
    # neighbours do not overlap: every pair of touching polygons meets along lines only
    tree = shapely.STRtree(after)
    a, b = tree.query(after, predicate="intersects")
    pairs = a < b
    assert pairs.sum() > len(after)  # many neighbours really share borders
    assert shapely.area(shapely.intersection(after[a[pairs]], after[b[pairs]])).sum() < 1e-6 * pixel * pixel
    # shared borders moved: the geometry did change where neighbours meet
    moved = shapely.area(shapely.symmetric_difference(before, after))
    assert moved.sum() > 10 * pixel * pixel

    # area_ha is the exact pixel area of each region, not the simplified polygon's
    np.testing.assert_array_equal(cols["area_ha"], cols0["area_ha"])
    for c in SCENE_CLASSES:
        expected = (lab == c.value).sum() * pixel ** 2 / 1e4
        assert cols["area_ha"][cols["class"] == c.value].sum() == pytest.approx(expected, rel=1e-12)
    assert not np.allclose(shapely.area(after) / 1e4, cols["area_ha"])


def test_simplify_zero_is_exact_and_a_bad_tolerance_is_refused(tmp_path: Path) -> None:
    lab = label_map()
    write_polygons(lab, TRANSFORM, CRS_UTM, tmp_path / "a.geojson", classes=CLASSES, nodata=NODATA, chunk=32,
                   driver="GeoJSON")
    write_polygons(lab, TRANSFORM, CRS_UTM, tmp_path / "b.geojson", classes=CLASSES, nodata=NODATA, chunk=32,
                   driver="GeoJSON", simplify=0.0)
    (ga, ca), (gb, cb) = read_ordered(tmp_path / "a.geojson"), read_ordered(tmp_path / "b.geojson")
    assert shapely.to_wkb(ga).tolist() == shapely.to_wkb(gb).tolist() and (ca["area_ha"] == cb["area_ha"]).all()
    with pytest.raises(InvalidInputError, match="c.gpkg: the simplification tolerance"):
        write_polygons(lab, TRANSFORM, CRS_UTM, tmp_path / "c.gpkg", classes=CLASSES, nodata=NODATA, simplify=-1.0)
    assert not (tmp_path / "c.gpkg").exists()
    from flows.config import SegmentOptions

    # the same outputs, so the same run options: `--simplify 0` had its own nightly key and resume identity
    assert SegmentOptions(vector="gpkg", simplify=0.0) == SegmentOptions(vector="gpkg")


def test_segment_command_writes_simplified_polygons(tmp_path: Path) -> None:
    """`segflow segment --vector gpkg --simplify 25`: the polygons cover the label COG's classes exactly."""
    import os
    import subprocess
    import sys

    from storage.samples import make_scene
    from tests.models import tiny_model

    image, _ = make_scene(tmp_path / "scene.tif", size=(160, 160), seed=5)
    model = tiny_model(tmp_path / "m", spatial_dims=2, channels=4)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "flows", "segment", str(image), "--model", str(model.path),
                           "--out", str(out), "--workers", "1", "--no-zarr", "--vector", "gpkg",
                           "--simplify", "25"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "scene.provenance.json").read_text())
    assert record["parameters"]["simplify"] == 25.0
    with rasterio.open(out / "scene.tif") as ds:
        labels, transform, crs, nodata = ds.read(1), ds.transform, ds.crs, ds.nodata
    classes = [LabelClass(value=c.value, name=c.name) for c in model.card.classes]
    exact = tmp_path / "exact.gpkg"
    write_polygons(labels, transform, crs, exact, classes=classes, nodata=int(nodata), chunk=64)
    before, cols0 = read_ordered(exact)
    after, cols = read_ordered(out / "scene.gpkg")
    assert len(after) == len(before) > 1
    assert shapely.get_num_coordinates(after).sum() < shapely.get_num_coordinates(before).sum()
    assert shapely.union_all(before).symmetric_difference(shapely.union_all(after)).area < 1e-3
    np.testing.assert_allclose(cols["area_ha"], cols0["area_ha"], rtol=1e-12)
    item = json.loads((out / "scene.stac.json").read_text())
    assert any(a["href"].endswith("scene.gpkg") for a in item["assets"].values())


def test_a_raster_in_a_local_survey_crs_gets_labels_and_polygons_but_no_stac_item(tmp_path: Path) -> None:
    """A site survey grid (an engineering CRS in feet, no place on the Earth): `segment` failed after writing the
    labels, with 25 lines of GDAL errors, taking the STAC footprint to WGS84; `--vector` said "no linear unit".
    Now the labels and polygons are written (areas in the CRS's own unit), and no STAC item, as without a CRS."""
    import os
    import subprocess
    import sys

    from tests.models import tiny_model

    feet = CRS.from_wkt('LOCAL_CS["site grid",UNIT["US survey foot",0.304800609601219],AXIS["X",EAST],'
                        'AXIS["Y",NORTH]]')
    scene = tmp_path / "site.tif"
    data = np.random.default_rng(2).integers(1, 255, (3, 64, 80), dtype=np.uint8)
    with rasterio.open(scene, "w", driver="GTiff", width=80, height=64, count=3, dtype="uint8", crs=feet,
                       transform=Affine(2.0, 0, 1000.0, 0, -2.0, 5000.0)) as dst:
        dst.write(data)
    model = tiny_model(tmp_path / "m", spatial_dims=2, channels=3)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "flows", "segment", str(scene), "--model", str(model.path),
                           "--out", str(out), "--workers", "0", "--no-zarr", "--vector", "gpkg"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "ERROR" not in proc.stderr and "error" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["reports", "site.gpkg", "site.provenance.json", "site.qml",
                                                     "site.tif"]
    _, cols = read_ordered(out / "site.gpkg")
    pixel_ha = (2.0 * 0.304800609601219) ** 2 / 1e4
    assert float(np.sum(cols["area_ha"])) == pytest.approx(64 * 80 * pixel_ha, rel=1e-9)
    proc = subprocess.run([sys.executable, "-m", "flows", "segment", str(scene), "--model", str(model.path),
                           "--out", str(tmp_path / "json"), "--workers", "0", "--vector", "geojson"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 1 and [line for line in proc.stderr.splitlines() if line.strip()] == [
        f"error: {scene}: is in a local CRS with no place on the Earth, and GeoJSON (RFC 7946) is in longitude and "
        "latitude: use --vector gpkg or parquet"], proc.stderr
    with pytest.raises(InvalidInputError, match="GeoJSON .RFC 7946. is in longitude and latitude"):
        write_polygons(np.zeros((4, 4), np.uint8), Affine(2.0, 0, 0, 0, -2.0, 0), feet, tmp_path / "x.geojson",
                       classes=[LabelClass(value=0, name="a")], nodata=255, driver="GeoJSON")


def test_web_mercator_far_from_the_equator_gives_no_hectares(tmp_path: Path) -> None:
    """EPSG:3857 is projected but not equal-area: at 52° N its square metres are 2.6 times the ground's, and
    `--vector` wrote area_ha 1391.72 for 521.4 ha of cropland.  No area there (as for degrees), said once;
    near the equator, and in UTM, areas are as before."""
    from pyproj import Transformer

    from storage.header import pixel_hectares
    from storage.probe import probe

    to_3857 = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
    x, y = to_3857.transform(15.0, 52.0)
    north = Affine(10.0, 0, x, 0, -10.0, y)
    area, why = pixel_hectares(north, CRS.from_epsg(3857), (300, 260))
    assert area is None and why.startswith("EPSG:3857 is not equal-area: an area measured here would be 2.6")
    x, y = to_3857.transform(15.0, 0.5)
    assert pixel_hectares(Affine(10.0, 0, x, 0, -10.0, y), CRS.from_epsg(3857), (300, 260)) == (0.01, None)
    scene = tmp_path / "mercator.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=26, height=30, count=1, dtype="uint8",
                       crs="EPSG:3857", transform=north) as dst:
        dst.write(np.ones((1, 30, 26), np.uint8))
    header = probe(scene)
    assert header.cell_size is None and "not equal-area" in header.cell_note
    with pytest.raises(InvalidInputError, match="need an area-true CRS: EPSG:3857 is not equal-area"):
        write_polygons(np.ones((30, 26), np.uint8), north, "EPSG:3857", tmp_path / "m.gpkg",
                       classes=[LabelClass(value=1, name="a")], nodata=255)
    assert not (tmp_path / "m.gpkg").exists()


@pytest.mark.parametrize("simplify", [None, 250.0])
def test_geojson_polygons_stay_a_coverage_in_longitude_and_latitude(tmp_path: Path, simplify: float | None) -> None:
    """GeoJSON is reprojected to WGS84 vertex by vertex, and a straight UTM edge becomes a curve: where a region
    met two others along one straight border (a T-junction: the meeting point a vertex of theirs, not of its
    own), its edge and theirs bent differently and the layer gained slivers and overlaps (up to 2 m² on the
    demo's scene with --simplify 15). Every such point is now a vertex on both sides."""
    rng = np.random.default_rng(4)
    lab = np.ones((240, 240), dtype=np.uint8)
    lab[120:, :100] = 2  # a long straight border of class 1 meets classes 2, 3 and 4 below it
    lab[120:, 100:170] = 3
    lab[120:, 170:] = 4
    lab[:120, 60:180][rng.random((120, 120)) < 0.02] = 0  # speckle: many small regions and nodes
    big = Affine(500.0, 0.0, 200_000.0, 0.0, -500.0, 7_000_000.0)  # 500 m pixels far from the meridian: curved
    out = tmp_path / "t.geojson"
    write_polygons(lab, big, CRS_UTM, out, classes=CLASSES, nodata=NODATA, driver="GeoJSON", simplify=simplify)
    geoms = np.array([shape(f["geometry"]) for f in json.loads(out.read_text())["features"]], dtype=object)
    assert shapely.is_valid(geoms).all()
    union = shapely.union_all(geoms)
    overlap = float(shapely.area(geoms).sum() - union.area)
    assert union.geom_type == "Polygon" and not list(union.interiors), "slivers between neighbours"
    assert abs(overlap) < 1e-12 * union.area, overlap


@pytest.mark.parametrize("stem, layer", [("[2024] scene", "2024] scene"), ("-x", "x"), ("#1", "1"),
                                         ("(1) a b", "1) a b"), ("ü-x", "ü-x"), ("---", "labels")])
def test_a_stem_geopackage_refuses_as_a_layer_name_gets_one_it_takes(tmp_path: Path, stem: str, layer: str) -> None:
    """GDAL refuses a GeoPackage layer named "[2024] scene": the polygons of such an input failed after the whole
    run ("The layer name may not contain special characters")."""
    out = tmp_path / f"{stem}.gpkg"
    write_polygons(label_map(), TRANSFORM, CRS_UTM, out, classes=CLASSES, nodata=NODATA, chunk=32)
    assert [name for name, _ in pyogrio.list_layers(out)] == [layer]
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_a_failed_cog_write_leaves_nothing_under_a_name_with_glob_characters(tmp_path: Path) -> None:
    """The temporaries were found by a glob of the output's name: "[2024] scene" is a character class there, so a
    failed write left `.[2024] scene.tif.<hex>.tiled.tif` in OUT."""
    from storage.cogwrite import write_label_cog
    from storage.geometry import RasterGeometry

    out = tmp_path / "[2024] scene.tif"
    (out / "keep").mkdir(parents=True)  # a folder where the COG goes: the rename fails after both temporaries
    grid = RasterGeometry(width=64, height=48, transform=(10, 0, 5e5, 0, -10, 4e6), epsg=32633, dtype="uint8")
    with pytest.raises(ExportError, match="cannot write COG"):
        write_label_cog(np.zeros((48, 64), np.uint8), grid, out, classes=CLASSES)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_an_interrupt_after_the_polygons_are_in_place_leaves_no_polygons(tmp_path, dask_cluster, monkeypatch):
    """The polygon writer renames its file into place and then totals the areas; a Ctrl-C between the two had left
    a finished-looking ``.gpkg`` (5 kills of 12 in a probe) that no cleanup knew of, which a later run without
    ``--vector`` kept beside outputs whose provenance does not list it."""
    import storage.vectors
    from flows.config import SegmentOptions
    from flows.pipeline import segment_one
    from tests.models import tiny_model

    written = storage.vectors._write

    def interrupted_after(out, *args, **kwargs):  # the file in place, then the interrupt
        written(out, *args, **kwargs)
        assert out.is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(storage.vectors, "_write", interrupted_after)
    scene = tmp_path / "scene.tif"
    data = np.random.default_rng(0).integers(0, 255, (3, 96, 96)).astype(np.uint8)
    with rasterio.open(scene, "w", driver="GTiff", width=96, height=96, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=Affine(10, 0, 500000, 0, -10, 4000000)) as dst:
        dst.write(data)
    model = tiny_model(tmp_path / "m", spatial_dims=2, channels=3)
    with pytest.raises(KeyboardInterrupt):
        segment_one(scene, model, tmp_path / "out", SegmentOptions(vector="gpkg"), dask_cluster)
    left = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    assert left == [], left  # neither the polygons nor the COG written before them
