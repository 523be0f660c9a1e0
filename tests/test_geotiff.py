"""GeoTIFF ingest and COG export against generated and real (odd, broken) files; no mocks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.transform import Affine

from storage.classes import LabelClass
from storage.errors import (
    CorruptInputError,
    ExportError,
    InputError,
    InvalidInputError,
    UnsupportedFormatError,
)
from storage.cogwrite import write_label_cog, write_probability_cog
from storage.geotiff import ingest_geotiff
from storage.hashing import sha256_file
from storage.layout import is_complete, open_image_store

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GEOTIFF, BAD = DATA / "geotiff", DATA / "bad"

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

CLASSES = [LabelClass(value=0, name="low", color=(0, 0, 255)), LabelClass(value=1, name="high", color=(255, 0, 0))]
UTM = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 5_000_000.0)


def real(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.exists():
        pytest.skip(f"real test data {path} is absent (only in the shared workspace, not in a fresh clone)")
    return path


def write_tif(path: Path, data: np.ndarray, *, crs: str | None = "EPSG:32633", transform: Affine | None = UTM,
              tiled: bool = True, **profile) -> Path:
    """A small GeoTIFF fixture; ``tiled=False`` gives a striped one."""
    blocks = dict(tiled=True, blockxsize=128, blockysize=128) if tiled else dict(tiled=False, blockysize=7)
    kw = dict(driver="GTiff", count=data.shape[0], height=data.shape[1], width=data.shape[2], dtype=data.dtype,
              crs=crs, transform=transform, **blocks, **profile)
    with rasterio.open(path, "w", **kw) as dst:
        dst.write(data)
    return path


def read_back(store_path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    store = open_image_store(store_path)
    return store.image[:], (None if store.mask is None else store.mask[:])


def uint16_scene() -> np.ndarray:
    rng = np.random.default_rng(7)
    data = rng.integers(1, 5000, size=(3, 257, 300), dtype=np.uint16)
    data[:, :10, :] = 0  # nodata margins
    data[:, :, 293:] = 0
    return data


# --------------------------------------------------------------------------- ingest, generated files


@pytest.mark.parametrize("tiled", [True, False], ids=["tiled", "striped"])
def test_ingest_copies_pixels_mask_and_geometry(tmp_path: Path, tiled: bool) -> None:
    src_path = write_tif(tmp_path / "scene.tif", uint16_scene(), tiled=tiled, nodata=0)
    with rasterio.open(src_path, "r+") as dst:
        for i, name in enumerate(["red", "green", "nir"], start=1):
            dst.set_band_description(i, name)
            dst.set_band_unit(i, "DN")

    store = ingest_geotiff(src_path, tmp_path / "scene.zarr", chunk=64)

    assert is_complete(store.path)
    reopened = open_image_store(tmp_path / "scene.zarr")
    image, mask = reopened.image, reopened.mask
    assert image.shape == (3, 257, 300) and image.chunks == (3, 64, 64) and image.dtype == np.uint16
    with rasterio.open(src_path) as src:
        np.testing.assert_array_equal(image[:], src.read())
        np.testing.assert_array_equal(mask[:], src.dataset_mask() > 0)
        expected_crs = src.crs
    assert not mask[:10, :].any() and not mask[:, 293:].any() and mask[20:250, :290].all()
    meta = reopened.meta
    g = meta.geometry
    assert (g.width, g.height, g.epsg, g.nodata, g.dtype) == (300, 257, 32633, 0.0, "uint16")
    assert CRS.from_wkt(g.crs_wkt) == expected_crs
    assert g.transform == tuple(UTM)[:6]
    assert g.band_descriptions == ["red", "green", "nir"] and g.units == "DN"
    assert g.bands == [1, 2, 3] and g.mask_source == "nodata"
    assert meta.channel_names == ["red", "green", "nir"] and meta.spatial_dims == 2
    assert meta.source.path == str(src_path.absolute()) and meta.source.format == "GTiff"
    assert meta.source.sha256 == sha256_file(src_path) and meta.source.size == src_path.stat().st_size


@pytest.mark.parametrize("dtype,nodata", [("uint16", 0), ("int16", -5), ("uint8", 255), ("float32", float("nan")),
                                          ("float32", -9999.0), ("float64", 1.5)])
def test_the_nodata_mask_is_gdals_whether_computed_from_the_pixels_or_asked(tmp_path: Path, dtype, nodata) -> None:
    """One nodata value for every band (integer, NaN or a float number): the mask comes from the pixels read (any
    band not nodata is valid), and it equals GDAL's ``dataset_mask``, with pixels where only some bands are
    nodata."""
    from storage.geotiff import _nodata_rule

    rng = np.random.default_rng(11)
    data = rng.integers(0, 3, (3, 90, 140)).astype(dtype)
    data[data == 0] = nodata  # a third of each band: many pixels with some bands nodata, some with all
    path = write_tif(tmp_path / "nd.tif", data, nodata=nodata, compress="deflate")
    store = ingest_geotiff(path, tmp_path / "nd.zarr", chunk=64)
    with rasterio.open(path) as src:
        expected = src.dataset_mask() > 0
        computed = _nodata_rule(src, [1, 2, 3], np.dtype(dtype)) is not None
    if np.dtype(dtype).kind == "f":  # a float pixel with any band NaN or infinite is invalid too (ingest's rule)
        expected &= np.isfinite(data).all(axis=0)
    assert computed
    if not np.isnan(nodata):  # pixels where only some bands are nodata stay valid
        assert 0 < int((~expected).sum()) < int((data == nodata).any(axis=0).sum())
    np.testing.assert_array_equal(store.mask[:], expected)


def test_per_band_nodata_asks_gdal(tmp_path: Path) -> None:
    """A VRT whose bands declare different nodata values: not one rule for every band, so GDAL's mask is used."""
    from storage.geotiff import _nodata_rule

    data = np.random.default_rng(12).integers(0, 4, (2, 40, 50)).astype(np.uint8)
    write_tif(tmp_path / "b.tif", data)  # the VRT's source
    bands = "".join(f'''<VRTRasterBand dataType="Byte" band="{b}"><NoDataValue>{b - 1}</NoDataValue>
      <SimpleSource><SourceFilename relativeToVRT="1">b.tif</SourceFilename><SourceBand>{b}</SourceBand>
      </SimpleSource></VRTRasterBand>''' for b in (1, 2))
    vrt = tmp_path / "b.vrt"
    vrt.write_text(f'<VRTDataset rasterXSize="50" rasterYSize="40"><GeoTransform>{", ".join(map(str, [500000.0, 10.0, 0.0, 5e6, 0.0, -10.0]))}'
                   f'</GeoTransform>{bands}</VRTDataset>')
    store = ingest_geotiff(vrt, tmp_path / "v.zarr", chunk=32)
    with rasterio.open(vrt) as src:
        assert src.nodatavals == (0.0, 1.0)
        assert _nodata_rule(src, [1, 2], np.dtype(np.uint8)) is None
        np.testing.assert_array_equal(store.mask[:], src.dataset_mask() > 0)


def test_a_vrt_of_bands_with_different_types_is_promoted_not_a_traceback(tmp_path: Path) -> None:
    """A VRT stacking a uint16 and a float32 band: rasterio refuses to read both in one call ("more than one
    'dtype' found"), and ingest stopped the whole batch with a traceback.  Read band by band, as float32."""
    from storage.quicklook_raster import raster_quicklook

    rng = np.random.default_rng(4)
    ints = write_tif(tmp_path / "u16.tif", rng.integers(0, 60000, (1, 40, 50)).astype(np.uint16))
    floats = write_tif(tmp_path / "f32.tif", rng.normal(0, 1, (1, 40, 50)).astype(np.float32))
    bands = "".join(f'''<VRTRasterBand dataType="{t}" band="{b}"><SimpleSource>
      <SourceFilename relativeToVRT="1">{f.name}</SourceFilename><SourceBand>1</SourceBand>
      </SimpleSource></VRTRasterBand>''' for b, (t, f) in enumerate([("UInt16", ints), ("Float32", floats)], 1))
    vrt = tmp_path / "mixed.vrt"
    vrt.write_text(f'<VRTDataset rasterXSize="50" rasterYSize="40"><SRS>EPSG:32633</SRS><GeoTransform>'
                   f'{", ".join(map(str, UTM.to_gdal()))}</GeoTransform>{bands}</VRTDataset>')
    store = ingest_geotiff(vrt, tmp_path / "m.zarr", chunk=32)
    image, _ = read_back(store.path)
    assert image.dtype == np.float32
    with rasterio.open(ints) as a, rasterio.open(floats) as b:
        np.testing.assert_array_equal(image, np.concatenate([a.read().astype(np.float32), b.read()]))
    labels = tmp_path / "labels.tif"
    write_tif(labels, (image[:1] > 30000).astype(np.uint8))
    raster_quicklook(labels, tmp_path / "q.png", image_path=vrt, rgb_bands=[1, 2, 2])
    assert (tmp_path / "q.png").stat().st_size > 0


def test_alpha_band_becomes_the_mask_not_a_channel(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, size=(3, 90, 130), dtype=np.uint8)
    alpha = np.full((1, 90, 130), 255, np.uint8)
    alpha[0, 30:60, 40:100] = 0
    src_path = write_tif(tmp_path / "rgba.tif", np.concatenate([rgb, alpha]), photometric="RGB")
    with rasterio.open(src_path, "r+") as dst:
        dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]

    store = ingest_geotiff(src_path, tmp_path / "rgba.zarr", chunk=64)

    image, mask = read_back(store.path)
    np.testing.assert_array_equal(image, rgb)
    np.testing.assert_array_equal(mask, alpha[0] > 0)
    assert store.meta.geometry.bands == [1, 2, 3] and store.meta.geometry.mask_source == "alpha"
    assert store.meta.channel_names == ["band1", "band2", "band3"]


def test_an_alpha_band_gdal_does_not_mask_with_still_masks(tmp_path: Path) -> None:
    """GDAL masks by a last alpha band only with 2 or 4 bands: a 4-band scene plus alpha reported every pixel
    valid, while the alpha band was dropped as a channel, so its transparent pixels were segmented as data."""
    bands = np.random.default_rng(2).integers(100, 3000, size=(4, 90, 130), dtype=np.uint16)
    alpha = np.full((1, 90, 130), 65535, np.uint16)
    alpha[0, :, :40] = 0
    src_path = write_tif(tmp_path / "scene.tif", np.concatenate([bands, alpha]))
    with rasterio.open(src_path, "r+") as dst:
        dst.colorinterp = [ColorInterp.blue, ColorInterp.green, ColorInterp.red, ColorInterp.undefined,
                           ColorInterp.alpha]
    with rasterio.open(src_path) as src:
        assert all(list(f) == [MaskFlags.all_valid] for f in src.mask_flag_enums)  # GDAL's view: no mask
    store = ingest_geotiff(src_path, tmp_path / "scene.zarr", chunk=64)
    image, mask = read_back(store.path)
    np.testing.assert_array_equal(image, bands)
    np.testing.assert_array_equal(mask, alpha[0] > 0)
    assert store.meta.geometry.bands == [1, 2, 3, 4] and store.meta.geometry.mask_source == "alpha"


@pytest.mark.parametrize(
    ("nodata", "bad_value", "mask_source"),
    [(float("nan"), np.nan, "nodata"), (None, np.inf, "nodata"), (None, None, "none")],
    ids=["nan-nodata", "inf-without-nodata", "all-finite"],
)
def test_float_non_finite_pixels_are_invalid(tmp_path: Path, nodata, bad_value, mask_source: str) -> None:
    data = np.random.default_rng(2).normal(size=(2, 100, 70)).astype(np.float32)
    if bad_value is not None:
        data[0, 5:9, 3:66] = bad_value
    src_path = write_tif(tmp_path / "f.tif", data, nodata=nodata)

    store = ingest_geotiff(src_path, tmp_path / "f.zarr", chunk=32)

    image, mask = read_back(store.path)
    np.testing.assert_array_equal(image, data)  # NaN compares equal here
    assert open_image_store(store.path).meta.geometry.mask_source == mask_source
    if bad_value is None:
        assert mask is None
    else:
        # only band 1 is non-finite there: GDAL's dataset mask still calls those pixels valid
        # (valid if any band is), but a NaN channel would poison the model, so they are not.
        with rasterio.open(src_path) as src:
            assert (src.dataset_mask()[5:9, 3:66] > 0).all()
        np.testing.assert_array_equal(mask, np.isfinite(data).all(axis=0))


@pytest.mark.parametrize("internal", [True, False], ids=["internal-mask", "external-msk"])
def test_per_dataset_mask_is_used(tmp_path: Path, internal: bool) -> None:
    data = np.random.default_rng(3).integers(0, 200, size=(1, 80, 96), dtype=np.uint8)
    valid = np.zeros((80, 96), np.uint8)
    valid[10:70, 5:90] = 255
    src_path = write_tif(tmp_path / "m.tif", data)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=internal), rasterio.open(src_path, "r+") as dst:
        dst.write_mask(valid)
    assert (tmp_path / "m.tif.msk").exists() is not internal

    store = ingest_geotiff(src_path, tmp_path / "m.zarr", chunk=32)

    _, mask = read_back(store.path)
    np.testing.assert_array_equal(mask, valid > 0)
    assert store.meta.geometry.mask_source == "mask"


def test_rotated_transform_and_missing_crs_are_kept(tmp_path: Path) -> None:
    rotated = Affine(10.0, 2.0, 1000.0, 1.5, -10.0, 9000.0)
    data = np.arange(60 * 50, dtype=np.uint8).reshape(1, 60, 50)
    src_path = write_tif(tmp_path / "rot.tif", data, crs=None, transform=rotated)

    store = ingest_geotiff(src_path, tmp_path / "rot.zarr", chunk=32)
    g = store.meta.geometry
    assert g.transform == tuple(rotated)[:6] and g.crs_wkt is None and g.epsg is None

    out = write_label_cog((data[0] > 100).astype(np.uint8), g, tmp_path / "rot_labels.tif", classes=CLASSES)
    with rasterio.open(out) as dst:
        assert dst.transform == rotated and dst.crs is None and (dst.width, dst.height) == (50, 60)


def test_gcp_only_raster_is_refused(tmp_path: Path) -> None:
    gcps = [GroundControlPoint(row=r, col=c, x=500_000 + 10 * c, y=5_000_000 - 10 * r)
            for r, c in [(0, 0), (0, 40), (30, 0), (30, 40)]]
    src_path = tmp_path / "gcps.tif"
    with rasterio.open(src_path, "w", driver="GTiff", width=40, height=30, count=1, dtype="uint8",
                       gcps=gcps, crs="EPSG:32633") as dst:
        dst.write(np.ones((1, 30, 40), np.uint8))

    with pytest.raises(InvalidInputError, match="only GCPs"):
        ingest_geotiff(src_path, tmp_path / "gcps.zarr")
    assert not (tmp_path / "gcps.zarr").exists()


def test_complex_pixels_are_refused(tmp_path: Path) -> None:
    src_path = write_tif(tmp_path / "c.tif", np.ones((1, 16, 16), np.complex64))
    with pytest.raises(InvalidInputError, match="complex"):
        ingest_geotiff(src_path, tmp_path / "c.zarr")
    assert not (tmp_path / "c.zarr").exists()


# --------------------------------------------------------------------------- ingest, bad files


def _generated_bad(tmp_path: Path, kind: str) -> Path:
    if kind == "text.tif":
        (tmp_path / kind).write_text("this is not a raster\n")
    elif kind == "folder.tif":
        (tmp_path / kind).mkdir()
    elif kind == "image.png":
        with rasterio.open(tmp_path / kind, "w", driver="PNG", width=8, height=8, count=1, dtype="uint8") as dst:
            dst.write(np.zeros((1, 8, 8), np.uint8))
    return tmp_path / kind  # "missing.tif" is never created


@pytest.mark.parametrize(
    ("name", "error"),
    [("corrupt.tif", CorruptInputError), ("RGB.byte.truncated.tif", CorruptInputError),
     ("empty.tif", CorruptInputError)],
)
def test_real_bad_files_raise_one_line_errors(tmp_path: Path, name: str, error: type[InputError]) -> None:
    path = real(BAD, name)
    store_path = tmp_path / "bad.zarr"
    with pytest.raises(error) as info:
        ingest_geotiff(path, store_path, chunk=256)
    message = str(info.value)
    assert "\n" not in message and name in message
    assert not store_path.exists()


@pytest.mark.parametrize(
    ("kind", "error"),
    [("text.tif", UnsupportedFormatError), ("missing.tif", InputError), ("folder.tif", UnsupportedFormatError),
     ("image.png", UnsupportedFormatError)],
)
def test_generated_bad_inputs_raise_one_line_errors(tmp_path: Path, kind: str, error: type[InputError]) -> None:
    path = _generated_bad(tmp_path, kind)
    store_path = tmp_path / "bad.zarr"
    with pytest.raises(error) as info:
        ingest_geotiff(path, store_path)
    assert "\n" not in str(info.value) and kind in str(info.value)
    assert not store_path.exists()


# --------------------------------------------------------------------------- real files end to end

REAL = ["RGB.byte.tif", "rgb_lzw.tif", "cogeo.tif", "shade.tif", "RGBA.uint16.tif", "float_nan.tif",
        "float32.tif", "rgb-byte-tenth.tif", "all-nodata.tif", "byte.tif"]


@pytest.mark.parametrize("name", REAL)
def test_real_file_ingest_and_label_cog_on_the_same_grid(tmp_path: Path, name: str) -> None:
    from rio_cogeo.cogeo import cog_validate

    path = real(GEOTIFF, name)
    store = ingest_geotiff(path, tmp_path / "in.zarr", chunk=256)
    g = store.meta.geometry
    image, mask = read_back(store.path)
    with rasterio.open(path) as src:
        np.testing.assert_array_equal(image, src.read(g.bands))
        np.testing.assert_array_equal(mask if mask is not None else True, src.dataset_mask() > 0)
        src_crs, src_transform, src_shape = src.crs, src.transform, (src.height, src.width)
    valid = mask if mask is not None else np.ones(src_shape, bool)
    band = image[0].astype(np.float64)
    threshold = np.median(band[valid]) if valid.any() else 0.0
    labels = np.where(valid, band > threshold, 255).astype(np.uint8)
    provenance = {"source": store.meta.source.sha256, "model": "threshold"}

    out = write_label_cog(labels, g, tmp_path / "labels.tif", classes=CLASSES, provenance=provenance)

    assert out == (tmp_path / "labels.tif").absolute()
    with rasterio.open(out) as dst:
        assert (dst.height, dst.width) == src_shape and dst.crs == src_crs and dst.transform == src_transform
        assert dst.count == 1 and dst.dtypes[0] == "uint8" and dst.nodata == 255
        np.testing.assert_array_equal(dst.read(1), labels)
        colormap = dst.colormap(1)
        assert colormap[0] == (0, 0, 255, 255) and colormap[1] == (255, 0, 0, 255) and colormap[255][3] == 0
        assert dst.descriptions == ("labels",)
        tags = dst.tags()
        assert [c["name"] for c in json.loads(tags["CLASSES"])] == ["low", "high"]
        assert json.loads(tags["SEGFLOW_PROVENANCE"]) == provenance
        if max(src_shape) > 512:
            assert dst.overviews(1), "a COG larger than one block needs overviews"
    is_valid, errors, _ = cog_validate(str(out))
    assert is_valid, errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr", "labels.tif"]  # no temporaries left


# --------------------------------------------------------------------------- export


def _geometry(tmp_path: Path, shape: tuple[int, int] = (150, 170)):
    data = np.random.default_rng(4).integers(1, 255, size=(1, *shape), dtype=np.uint8)
    return ingest_geotiff(write_tif(tmp_path / "src.tif", data), tmp_path / "src.zarr", chunk=64).meta.geometry


def test_label_cog_from_zarr_applies_mask_and_uint16_classes(tmp_path: Path) -> None:
    g = _geometry(tmp_path)
    classes = [LabelClass(value=v, name=f"c{v}", color=(v % 256, 0, 0)) for v in (0, 7, 300)]
    values = np.random.default_rng(5).choice([0, 7, 300], size=(150, 170)).astype(np.uint16)
    labels = zarr.create_array(zarr.storage.MemoryStore(), shape=values.shape, chunks=(100, 100), dtype="uint16")
    labels[:] = values
    mask = np.ones(values.shape, bool)
    mask[:20] = False

    out = write_label_cog(labels, g, tmp_path / "l16.tif", classes=classes, mask=mask, block=64)

    with rasterio.open(out) as dst:
        assert dst.dtypes[0] == "uint16" and dst.nodata == 65535 and dst.block_shapes[0] == (64, 64)
        np.testing.assert_array_equal(dst.read(1), np.where(mask, values, 65535))
        assert dst.colormap(1)[300] == (300 % 256, 0, 0, 255)
        assert "SEGFLOW_PROVENANCE" not in dst.tags()


def test_label_cog_rejects_a_grid_mismatch(tmp_path: Path) -> None:
    g = _geometry(tmp_path)
    with pytest.raises(ValueError, match="does not match"):
        write_label_cog(np.zeros((10, 10), np.uint8), g, tmp_path / "x.tif", classes=CLASSES)
    assert not (tmp_path / "x.tif").exists()


@pytest.mark.parametrize("target", ["parent-is-file", "parent-missing", "target-is-dir"])
def test_export_errors_leave_nothing_behind(tmp_path: Path, target: str) -> None:
    g = _geometry(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = {"parent-is-file": out_dir / "file.txt" / "labels.tif",
           "parent-missing": out_dir / "nope" / "labels.tif",
           "target-is-dir": out_dir / "labels.tif"}[target]
    if target == "parent-is-file":
        out.parent.write_text("x")
    if target == "target-is-dir":
        (out / "keep").mkdir(parents=True)
    before = sorted(out_dir.rglob("*"))

    with pytest.raises(ExportError) as info:
        write_label_cog(np.zeros((150, 170), np.uint8), g, out, classes=CLASSES)

    assert "\n" not in str(info.value) and "labels.tif" in str(info.value)
    assert sorted(out_dir.rglob("*")) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_export_to_read_only_directory(tmp_path: Path) -> None:
    g = _geometry(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ExportError):
            write_label_cog(np.zeros((150, 170), np.uint8), g, ro / "labels.tif", classes=CLASSES)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_probability_cog(tmp_path: Path, dtype: str) -> None:
    from rio_cogeo.cogeo import cog_validate

    g = _geometry(tmp_path)
    rng = np.random.default_rng(6)
    probs = rng.dirichlet([1.0, 1.0, 1.0], size=(150, 170)).transpose(2, 0, 1).astype(np.float32)
    mask = np.ones((150, 170), bool)
    mask[:, :5] = False

    out = write_probability_cog(probs, g, tmp_path / "p.tif", class_names=["a", "b", "c"], mask=mask, dtype=dtype,
                                provenance={"run": 1}, block=64)

    with rasterio.open(out) as dst:
        assert dst.count == 3 and dst.descriptions == ("a", "b", "c") and dst.dtypes[0] == dtype
        assert dst.transform == Affine(*g.transform) and json.loads(dst.tags()["SEGFLOW_PROVENANCE"]) == {"run": 1}
        got = dst.read().astype(np.float32) * np.float32(dst.scales[0])
        if dtype == "float32":
            assert np.isnan(dst.nodata) and np.isnan(got[:, :, :5]).all()
        else:
            assert dst.nodata == 255 and (dst.read()[:, :, :5] == 255).all()
        np.testing.assert_allclose(got[:, :, 5:], probs[:, :, 5:], atol=0.5 / 254 + 1e-6)
    assert cog_validate(str(out))[0]


def _vrt(path: Path, source: Path, width: int, height: int) -> Path:
    path.write_text(f"""<VRTDataset rasterXSize="{width}" rasterYSize="{height}">
  <SRS>EPSG:32633</SRS>
  <GeoTransform>500000, 10, 0, 5000000, 0, -10</GeoTransform>
  <VRTRasterBand dataType="Byte" band="1">
    <NoDataValue>0</NoDataValue>
    <SimpleSource>
      <SourceFilename relativeToVRT="1">{source.name}</SourceFilename>
      <SourceBand>1</SourceBand>
    </SimpleSource>
  </VRTRasterBand>
</VRTDataset>
""")
    return path


def test_vrt_is_ingested_and_a_vrt_with_a_missing_source_is_corrupt(tmp_path: Path) -> None:
    data = np.random.default_rng(8).integers(0, 4, size=(1, 70, 90), dtype=np.uint8)
    tif = write_tif(tmp_path / "part.tif", data)
    store = ingest_geotiff(_vrt(tmp_path / "ok.vrt", tif, 90, 70), tmp_path / "ok.zarr", chunk=32)
    image, mask = read_back(store.path)
    np.testing.assert_array_equal(image, data)
    np.testing.assert_array_equal(mask, data[0] != 0)
    assert store.meta.source.format == "VRT" and store.meta.geometry.epsg == 32633

    broken = _vrt(tmp_path / "broken.vrt", tmp_path / "gone.tif", 90, 70)
    with pytest.raises(CorruptInputError) as info:
        ingest_geotiff(broken, tmp_path / "broken.zarr")
    assert "broken.vrt" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "broken.zarr").exists()


def test_a_store_path_that_holds_something_else_is_refused_not_removed(tmp_path: Path) -> None:
    """``ingest(scan, "~/Documents")`` removed the folder to make its store there; a file raised a raw
    NotADirectoryError. A prediction store opened as an image said only KeyError('image')."""
    from storage.errors import StoreError
    from storage.samples import make_scene

    scene, _ = make_scene(tmp_path / "scene.tif", size=(64, 64), seed=1)
    folder = tmp_path / "Documents"
    folder.mkdir()
    (folder / "letter.txt").write_text("keep me")
    (tmp_path / "a-file").write_text("keep me too")
    for target, message in ((folder, "not a zarr store"), (tmp_path / "a-file", "a file is in the way")):
        with pytest.raises(StoreError, match=message):
            ingest_geotiff(scene, target)
    assert (folder / "letter.txt").read_text() == "keep me" and (tmp_path / "a-file").read_text() == "keep me too"
    store = ingest_geotiff(scene, tmp_path / "s.zarr")
    assert ingest_geotiff(scene, tmp_path / "s.zarr").image.shape == store.image.shape  # its own store: replaced
    assert repr(store).startswith("ImageStore(") and len(repr(store)) < 200
    os.replace(tmp_path / "s.zarr" / "image", tmp_path / "s.zarr" / "labels")  # a prediction store's layout
    with pytest.raises(StoreError, match="holds no image"):
        open_image_store(tmp_path / "s.zarr").image


_WRITE_UNDER_LIMIT = """
import resource, signal, sys
import numpy as np
from pathlib import Path
from storage.classes import LabelClass
from storage.cogwrite import write_label_cog
from storage.geometry import RasterGeometry
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
labels = np.random.default_rng(0).integers(0, 4, (2048, 2048), dtype=np.uint8)
grid = RasterGeometry(width=2048, height=2048, transform=(10, 0, 5e5, 0, -10, 4e6), epsg=32633, dtype="uint8")
limit = int(sys.argv[2])
if limit:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    write_label_cog(labels, grid, Path(sys.argv[1]) / "labels.tif",
                    classes=[LabelClass(value=i, name=f"c{i}") for i in range(4)])
    print("written")
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def test_a_cog_cut_short_by_a_full_disk_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    """On a full disk libtiff printed `_tiffWriteProc: No space left on device` and GDAL's COG copy returned success:
    the truncated COG was renamed into place, hashed into the provenance, called ok, and passed `verify`.  A file
    size limit cuts the writes as a full disk does; at every size short of the whole file, the write fails and
    leaves nothing."""
    import subprocess
    import sys

    def write(folder: Path, limit: int) -> str:
        folder.mkdir()
        proc = subprocess.run([sys.executable, "-c", _WRITE_UNDER_LIMIT, str(folder), str(limit)],
                              capture_output=True, text=True, timeout=120)
        # nothing on stderr: libtiff's own handlers had printed "_tiffWriteProc: File too large." up to ten
        # times above segflow's one line (storage.rasteropen.quiet_libtiff)
        assert proc.stderr == "", proc.stderr[-2000:]
        return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]

    assert write(tmp_path / "whole", 0) == "written"
    size = (tmp_path / "whole" / "labels.tif").stat().st_size
    for fraction in (0.5, 0.9, 0.99, 0.999):
        folder = tmp_path / f"cut-{fraction}"
        said = write(folder, int(size * fraction))
        # the limit is said as such (GDAL had blamed what it read back: "Failed to read directory at offset")
        assert said.startswith(f"ExportError {folder / 'labels.tif'}: cannot write COG: file size limit exceeded"), \
            (fraction, said)
        assert list(folder.iterdir()) == [], (fraction, said)


def test_a_libtiff_write_error_whose_cause_is_gone_is_said_as_a_failed_write(tmp_path: Path, monkeypatch) -> None:
    """A batch filled the disk and freed it again before the COG's error was probed: the line was libtiff's
    "cannot write COG: TIFFAppendToStrip:Write error at scanline 0". The failing copy stands in for that disk
    (a tmpfs filled by concurrent writers cannot be timed in a test); nothing is left either way."""
    import rasterio.shutil
    from rasterio.errors import RasterioIOError

    from storage.classes import LabelClass
    from storage.cogwrite import write_label_cog
    from storage.errors import ExportError
    from storage.geometry import RasterGeometry

    def fails(*args, **kwargs):  # noqa: ANN002, ANN003, ARG001
        raise RasterioIOError("TIFFAppendToStrip:Write error at scanline 0")

    monkeypatch.setattr(rasterio.shutil, "copy", fails)
    grid = RasterGeometry(width=64, height=64, transform=(10, 0, 5e5, 0, -10, 4e6), epsg=32633, dtype="uint8")
    with pytest.raises(ExportError) as caught:
        write_label_cog(np.zeros((64, 64), np.uint8), grid, tmp_path / "labels.tif",
                        classes=[LabelClass(value=0, name="c0")])
    assert f"cannot write COG: a write in {tmp_path} failed (libtiff: TIFFAppendToStrip:Write error at scanline " \
           "0); was the disk full while it was written?" in str(caught.value)
    assert list(tmp_path.iterdir()) == []
