"""Quicklooks: the overlay sits on the image, decimated reads use overviews, planes face the radiological way.

Every fixture is a real GeoTIFF/COG or NIfTI written to tmp_path by the small
generators below; PNGs are read back with Pillow and checked pixel by pixel
where the layout (exposed in QuicklookInfo) says each picture sits.
"""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import rasterio
import rasterio.shutil
from nibabel.nifti1 import Nifti1Extension
from PIL import Image
from rasterio.transform import Affine

from storage import labelcensus, labelcomponents, volumeslabs
from storage.classes import LabelClass, slicer_color_table
from storage.errors import ExportError, IncompatibleInputError, InputError, InvalidInputError
from storage.geometry import RasterGeometry
from storage.cogwrite import write_label_cog
from storage.quicklook import QuicklookInfo, raster_quicklook, volume_quicklook
from storage.quicklook_canvas import ALPHA, palette_color

UTM = "EPSG:32633"
ORIGIN = (400000.0, 5800000.0)
MAGENTA = (255, 0, 255)
GREEN = (0, 200, 0)
# the newest `make demo` run in this checkout, if any (a fresh clone has none: test_quicklook_outputs.py covers
# quicklooks of real runs there)
DEMO = max((Path(__file__).resolve().parents[1] / "demo").glob("run-*"), default=Path("demo/absent"))


# --------------------------------------------------------------------------- fixture generators


def write_raster(path: Path, data: np.ndarray, *, res: float = 10.0, origin: tuple[float, float] = ORIGIN,
                 crs: str | None = UTM, nodata: float | None = None, descriptions: list[str] | None = None,
                 colormap: dict | None = None, tags: dict | None = None) -> Path:
    """A tiled GTiff of (bands, rows, cols) or (rows, cols) pixels, north-up."""
    data = data[None] if data.ndim == 2 else data
    transform = Affine(res, 0.0, origin[0], 0.0, -res, origin[1])
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs=crs, transform=transform, nodata=nodata, tiled=True,
                       blockxsize=256, blockysize=256, compress="deflate") as dst:
        dst.write(data)
        for i, d in enumerate(descriptions or [], start=1):
            dst.set_band_description(i, d)
        if colormap:
            dst.write_colormap(1, colormap)
        if tags:
            dst.update_tags(**tags)
    return path


def bright_square_scene(path: Path, *, res: float = 10.0, origin: tuple[float, float] = ORIGIN,
                        square: tuple[int, int, int, int] = (100, 200, 300, 400), shape: tuple[int, int] = (800, 1000)) -> Path:
    """Dark grey noise (equal in R, G, B) with a bright square at rows square[0]:square[1], cols square[2]:square[3]."""
    rng = np.random.default_rng(0)
    data = np.repeat(rng.integers(20, 41, size=(1, *shape), dtype=np.uint8), 3, axis=0)
    r0, r1, c0, c1 = square
    data[:, r0:r1, c0:c1] = 250
    return write_raster(path, data, res=res, origin=origin, descriptions=["red", "green", "blue"])


def square_labels(path: Path, *, shape: tuple[int, int] = (800, 1000), square=(100, 200, 300, 400)) -> Path:
    """segflow's own label COG (write_label_cog): class 1 in the square, nodata elsewhere."""
    labels = np.full(shape, 255, dtype=np.uint8)
    r0, r1, c0, c1 = square
    labels[r0:r1, c0:c1] = 1
    geometry = RasterGeometry(width=shape[1], height=shape[0], epsg=32633, dtype="uint8",
                              transform=(10.0, 0.0, ORIGIN[0], 0.0, -10.0, ORIGIN[1]))
    return write_label_cog(labels, geometry, path, classes=[LabelClass(value=1, name="square", color=MAGENTA)])


def write_volume(path: Path, data: np.ndarray, affine: np.ndarray, extensions: list[str] | None = None) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    for text in extensions or []:
        img.header.extensions.append(Nifti1Extension(6, text.encode()))
    nib.save(img, path)
    return path


def left_blob_volume(shape=(40, 48, 30)) -> tuple[np.ndarray, np.ndarray]:
    """(image, labels) in RAS voxel order: a blob on the patient's left (low x), anterior (high y), superior."""
    image = np.full(shape, 100, dtype=np.int16)
    labels = np.zeros(shape, dtype=np.uint8)
    sl = (slice(4, 12), slice(34, 42), slice(18, 26))
    image[sl] = 1000
    labels[sl] = 1
    return image, labels


def stored_as(codes: str, data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RAS-ordered voxels and their affine, re-stored with axes ``codes`` (e.g. "LPS", "PSL") at the same places."""
    ornt = nib.orientations.axcodes2ornt(tuple(codes))
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), ornt)
    stored = np.ascontiguousarray(nib.orientations.apply_orientation(data, transform))
    return stored, affine @ nib.orientations.inv_ornt_aff(transform, data.shape)


def ras_affine(zooms=(1.0, 1.0, 1.0), origin=(-20.0, -24.0, -15.0)) -> np.ndarray:
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = origin
    return affine


def png(info: QuicklookInfo) -> np.ndarray:
    """The PNG's pixels as (rows, cols, 3) ints (no uint8 wrap-around in comparisons)."""
    return np.asarray(Image.open(info.path).convert("RGB")).astype(np.int32)


def raster_map(info: QuicklookInfo) -> np.ndarray:
    """A raster quicklook's map, one pixel per map pixel (a small map is drawn magnified, in blocks)."""
    return crop(png(info), info.panel("map").box)[::info.magnification, ::info.magnification]


def crop(pixels: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    left, top, width, height = box
    return pixels[top:top + height, left:left + width]


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


# --------------------------------------------------------------------------- raster


def test_overlay_sits_on_the_bright_square_and_is_not_flipped(tmp_path: Path) -> None:
    image = bright_square_scene(tmp_path / "scene.tif")
    labels = square_labels(tmp_path / "labels.tif")
    info = raster_quicklook(labels, tmp_path / "q.png", image_path=image, max_size=250)
    assert info.read_shape == (200, 250) and info.decimation == (4.0, 4.0)
    assert info.rgb_bands == (1, 2, 3)
    m = raster_map(info)
    assert m.shape[:2] == (200, 250)
    tinted = (m[..., 1] < m[..., 0] - 60) & (m[..., 1] < m[..., 2] - 60)
    # source rows 100-199, cols 300-399 at 1:4 -> map rows 25-49, cols 75-99; a flip would put it at rows 150-174
    assert bbox(tinted) == (25, 49, 75, 99)
    assert not tinted[150:175].any() and not tinted[:, 150:175].any()
    # under the tint is the bright square (stretched to white), not the dark noise beside it
    expected = np.rint(255 * (1 - ALPHA) + np.array(MAGENTA) * ALPHA)
    assert np.abs(m[25:50, 75:100].reshape(-1, 3) - expected).max() <= 1
    outside = m[60:100, 150:250]
    assert (outside[..., 0] == outside[..., 1]).all()  # grey noise: no class drawn where labels are nodata


def test_image_on_a_finer_larger_grid_is_cut_to_the_labels(tmp_path: Path) -> None:
    # 5 m pixels, extending 100 m further west and north: the square sits at rows 220-419, cols 620-819
    image = bright_square_scene(tmp_path / "scene5m.tif", res=5.0, origin=(ORIGIN[0] - 100, ORIGIN[1] + 100),
                                square=(220, 420, 620, 820), shape=(1700, 2100))
    labels = square_labels(tmp_path / "labels.tif")
    info = raster_quicklook(labels, tmp_path / "q.png", image_path=image, max_size=250)
    m = raster_map(info)
    tinted = m[..., 1] < m[..., 0] - 60
    assert bbox(tinted) == (25, 49, 75, 99)
    expected = np.rint(255 * (1 - ALPHA) + np.array(MAGENTA) * ALPHA)
    assert np.abs(m[25:50, 75:100].reshape(-1, 3) - expected).max() <= 2


def test_big_label_cog_is_read_from_its_overview(tmp_path: Path) -> None:
    # Full resolution says class 2 everywhere, the overviews (built before) class 1: what is drawn tells
    # which level GDAL read.
    path = tmp_path / "big.tif"
    ones = np.ones((4096, 4096), dtype=np.uint8)
    write_raster(path, ones, colormap={1: (0, 0, 255, 255), 2: (255, 0, 0, 255)})
    with rasterio.open(path, "r+") as dst:
        dst.build_overviews([2, 4, 8, 16], rasterio.enums.Resampling.nearest)
        dst.write(ones * 2, 1)
    start = time.perf_counter()
    info = raster_quicklook(path, tmp_path / "q.png", max_size=1024)
    elapsed = time.perf_counter() - start
    assert info.read_shape == (1024, 1024) and info.overview == 4
    assert [c.value for c in info.classes] == [1]
    assert info.by_value(1).color == (0, 0, 255)
    assert info.by_value(1).amount == pytest.approx(4096 * 4096 * 100 / 1e4)
    assert info.by_value(1).exact is False
    assert elapsed < 5.0, f"a 4096^2 quicklook took {elapsed:.1f} s"


def test_legend_areas_in_hectares(tmp_path: Path) -> None:
    labels = np.zeros((80, 100), dtype=np.uint8)
    labels[10:30, 40:70] = 2  # 600 pixels of 10 m x 10 m = 6 ha
    path = write_raster(tmp_path / "l.tif", labels)
    full = raster_quicklook(path, tmp_path / "a.png", max_size=128)
    assert full.by_value(2).amount == pytest.approx(6.0) and full.by_value(2).exact
    assert full.by_value(0).amount == pytest.approx((8000 - 600) * 100 / 1e4)
    half = raster_quicklook(path, tmp_path / "b.png", max_size=50)
    assert half.decimation == (2.0, 2.0)
    assert half.by_value(2).amount == pytest.approx(6.0) and not half.by_value(2).exact
    given = raster_quicklook(path, tmp_path / "c.png", max_size=50, areas_ha={2: 6.25})
    assert given.by_value(2).amount == 6.25 and given.by_value(2).exact
    geographic = write_raster(tmp_path / "g.tif", labels, res=0.001, origin=(15.0, 52.0), crs="EPSG:4326")
    deg = raster_quicklook(geographic, tmp_path / "d.png")
    assert deg.note == "area n/a (degrees)" and deg.by_value(2).amount is None


def test_classes_come_from_the_cog_tags_then_colour_table_then_palette(tmp_path: Path) -> None:
    labels = np.zeros((40, 60), dtype=np.uint8)
    labels[:, 30:] = 1
    geometry = RasterGeometry(width=60, height=40, epsg=32633, dtype="uint8",
                              transform=(10.0, 0.0, ORIGIN[0], 0.0, -10.0, ORIGIN[1]))
    classes = [LabelClass(value=0, name="water", color=(30, 90, 200)),
               LabelClass(value=1, name="forest", color=(20, 110, 40)),
               LabelClass(value=2, name="road", color=(90, 90, 90))]
    tagged = write_label_cog(labels, geometry, tmp_path / "tagged.tif", classes=classes)
    info = raster_quicklook(tagged, tmp_path / "t.png")
    assert [(c.name, c.color) for c in info.classes] == [(c.name, c.color) for c in classes]
    assert info.by_value(2).amount == 0.0  # listed but absent: shown with no area
    m = raster_map(info)
    assert tuple(m[20, 45]) == (20, 110, 40) and tuple(m[20, 10]) == (30, 90, 200)  # no image: full colour

    coloured = write_raster(tmp_path / "cmap.tif", labels, colormap={0: (1, 2, 3, 255), 1: (200, 0, 0, 255)})
    info = raster_quicklook(coloured, tmp_path / "c.png")
    assert [(c.name, c.color) for c in info.classes] == [("class 0", (1, 2, 3)), ("class 1", (200, 0, 0))]

    bare = write_raster(tmp_path / "bare.tif", labels, tags={"CLASSES": "not json ["})
    info = raster_quicklook(bare, tmp_path / "b.png")
    assert [(c.name, c.color) for c in info.classes] == [("class 0", palette_color(0)), ("class 1", palette_color(1))]
    m = raster_map(info)
    assert tuple(m[20, 45]) == palette_color(1)


@pytest.mark.parametrize("names, wanted, expected", [
    (["blue", "green", "red", "nir"], None, (3, 2, 1)),
    (["B02", "B03", "B04", "B08"], None, (3, 2, 1)),  # Sentinel-2 ids: B04 is red by alias
    ([None, None, None, None], None, (1, 2, 3)),
    (["blue", "green", "red", "nir"], ["nir", "red", "green"], (4, 3, 2)),
    (["pan"], None, (1,)),
])
def test_rgb_bands_are_chosen_by_name(tmp_path: Path, names, wanted, expected) -> None:
    data = np.full((len(names), 32, 32), 10, dtype=np.uint16)
    data[:, :16] = 20  # each band has a spread to stretch
    data[2 if len(names) > 2 else 0, 16:, :] = 900  # band 3 (red, B04) is bright in the lower half
    image = write_raster(tmp_path / "img.tif", data, descriptions=[n or "" for n in names] if any(names) else None)
    labels = write_raster(tmp_path / "l.tif", np.full((32, 32), 255, dtype=np.uint8), nodata=255)
    info = raster_quicklook(labels, tmp_path / "q.png", image_path=image, rgb_bands=wanted)
    assert info.rgb_bands == expected
    if expected == (3, 2, 1):
        m = raster_map(info)
        assert tuple(m[28, 28]) == (255, 0, 0)  # red band bright, green and blue at their low end: red


def test_png_stays_small_for_a_noisy_1024_scene(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    image = write_raster(tmp_path / "noise.tif", rng.integers(0, 255, size=(3, 1024, 1024), dtype=np.uint8))
    labels = write_raster(tmp_path / "l.tif", rng.integers(0, 6, size=(1024, 1024), dtype=np.uint8))
    info = raster_quicklook(labels, tmp_path / "q.png", image_path=image)
    assert info.path.stat().st_size < 1.1e6
    assert info.read_shape == (1024, 1024)


def test_raster_errors_name_the_file(tmp_path: Path) -> None:
    labels = write_raster(tmp_path / "l.tif", np.zeros((20, 20), dtype=np.uint8))
    with pytest.raises(InputError, match="missing.tif"):
        raster_quicklook(tmp_path / "missing.tif", tmp_path / "q.png")
    with pytest.raises(ExportError, match="does not exist"):
        raster_quicklook(labels, tmp_path / "nowhere" / "q.png")
    far = write_raster(tmp_path / "far.tif", np.zeros((3, 20, 20), dtype=np.uint8), origin=(0.0, 0.0))
    with pytest.raises(IncompatibleInputError, match="does not overlap"):
        raster_quicklook(labels, tmp_path / "q.png", image_path=far)


# --------------------------------------------------------------------------- volume


def _green_columns(info: QuicklookInfo, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns, inside panel ``name``, of the class outline (drawn in the pure class colour)."""
    panel = crop(png(info), info.panel(name).box)
    return np.nonzero((panel == GREEN).all(axis=-1))


@pytest.mark.parametrize("stored", ["RAS", "LPS", "RAI", "PSL"])
def test_blob_on_the_patients_left_is_on_the_viewers_right(tmp_path: Path, stored: str) -> None:
    ras_image, ras_labels = left_blob_volume()
    image, affine = stored_as(stored, ras_image, ras_affine())
    labels, _ = stored_as(stored, ras_labels, ras_affine())
    assert "".join(nib.aff2axcodes(affine)) == stored
    table = slicer_color_table([LabelClass(value=1, name="blob", color=GREEN)])
    lab = write_volume(tmp_path / "labels.nii.gz", labels, affine, [table])
    img = write_volume(tmp_path / "image.nii.gz", image, affine)
    info = volume_quicklook(lab, tmp_path / "q.png", image_path=img)
    assert info.panel("axial").letters == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert info.panel("coronal").letters == {"left": "R", "right": "L", "top": "S", "bottom": "I"}
    assert info.panel("sagittal").letters == {"left": "A", "right": "P", "top": "S", "bottom": "I"}
    for name in ("axial", "coronal"):
        rows, cols = _green_columns(info, name)
        assert cols.size and cols.min() > info.panel(name).box[2] / 2, f"{name}: blob not on the viewer's right"
    rows, cols = _green_columns(info, "axial")
    assert rows.max() < info.panel("axial").box[3] / 2  # anterior is up
    rows, cols = _green_columns(info, "sagittal")
    assert cols.max() < info.panel("sagittal").box[2] / 2  # anterior on the left
    assert rows.max() < info.panel("sagittal").box[3] / 2  # superior is up
    if stored != "RAS":  # the same picture as the RAS twin, panel for panel
        twin = volume_quicklook(write_volume(tmp_path / "ras.nii.gz", ras_labels, ras_affine(), [table]),
                                tmp_path / "ras.png", image_path=write_volume(tmp_path / "rasi.nii", ras_image, ras_affine()))
        for name in ("axial", "coronal", "sagittal"):
            assert np.array_equal(crop(png(info), info.panel(name).box), crop(png(twin), twin.panel(name).box))


@pytest.mark.parametrize("stored", ["RAS", "PSL"])
def test_an_ingested_volume_is_drawn_as_its_nifti_file_is(tmp_path: Path, stored: str) -> None:
    """A DICOM series is no one file: its quicklook had no image under the labels ("window 0 to 1 (no image)").
    The ingested store (the NIfTI's voxel axes reversed) now gives the same picture as the file."""
    from storage.ingest import ingest
    from storage.layout import open_image_store

    ras_image, ras_labels = left_blob_volume()
    image, affine = stored_as(stored, ras_image, ras_affine())
    labels, _ = stored_as(stored, ras_labels, ras_affine())
    table = slicer_color_table([LabelClass(value=1, name="blob", color=GREEN)])
    lab = write_volume(tmp_path / "labels.nii.gz", labels, affine, [table])
    img = write_volume(tmp_path / "image.nii.gz", image, affine)
    ingest(img, tmp_path / "image.zarr", chunk=16)
    store = open_image_store(tmp_path / "image.zarr")
    from_file = volume_quicklook(lab, tmp_path / "file.png", image_path=img)
    from_store = volume_quicklook(lab, tmp_path / "store.png", image_store=store.image)
    nothing = volume_quicklook(lab, tmp_path / "none.png")
    assert np.array_equal(png(from_file), png(from_store))
    assert not np.array_equal(png(from_file), png(nothing))


def test_thick_slices_are_not_squashed(tmp_path: Path) -> None:
    labels = np.zeros((60, 40, 20), dtype=np.uint8)
    labels[20:40, 10:30, 5:15] = 1
    info = volume_quicklook(write_volume(tmp_path / "l.nii", labels, ras_affine((1.0, 1.0, 3.0))), tmp_path / "q.png")
    _, _, w, h = info.panel("coronal").box  # 60 mm wide (x), 60 mm high (20 slices x 3 mm)
    assert abs(w - h) <= 1
    _, _, w, h = info.panel("axial").box  # 60 mm by 40 mm
    assert abs(w / h - 1.5) < 0.02


def test_an_oblique_scan_says_its_planes_follow_the_voxel_grid(tmp_path: Path) -> None:
    """An oblique acquisition was captioned "stored RAS" alone, as if its planes were the anatomical ones."""
    labels = np.zeros((30, 30, 20), dtype=np.uint8)
    labels[10:20, 10:20, 5:15] = 1
    tilted = ras_affine()
    turn = np.radians(20)  # 20 degrees about the x axis, as a tilted-gantry CT
    tilted[:3, :3] = np.array([[1, 0, 0], [0, np.cos(turn), -np.sin(turn)], [0, np.sin(turn), np.cos(turn)]])
    oblique = volume_quicklook(write_volume(tmp_path / "o.nii", labels, tilted), tmp_path / "o.png")
    assert "stored RAS, 20 degrees oblique (planes follow the voxel grid)" in oblique.subtitles[0]
    square = volume_quicklook(write_volume(tmp_path / "s.nii", labels, ras_affine()), tmp_path / "s.png")
    assert "oblique" not in square.subtitles[0] and "stored RAS;" in square.subtitles[0]


@pytest.mark.parametrize("thin", [2, 1])
def test_a_volume_one_slice_thick_shows_the_one_plane_across_it(tmp_path: Path, thin: int) -> None:
    """A 2-D image kept as NIfTI (X x Y x 1, nnU-Net's way; or a coronal radiograph one voxel thick along y) has
    one plane to show: the other two were strips one voxel wide beside it."""
    shape = [40, 30, 20]
    shape[thin] = 1
    labels = np.zeros(shape, dtype=np.uint8)
    index = [slice(10, 25), slice(8, 20), slice(5, 15)]
    index[thin] = slice(None)
    labels[tuple(index)] = 1
    table = slicer_color_table([LabelClass(value=1, name="cell", color=GREEN)])
    info = volume_quicklook(write_volume(tmp_path / "l.nii.gz", labels, ras_affine((0.5, 0.5, 0.5)), [table]),
                            tmp_path / "q.png")
    expected = {2: "axial", 1: "coronal"}[thin]
    assert [p.name for p in info.panels] == [expected]
    _, _, w, h = info.panel(expected).box
    assert min(w, h) > 100  # the plane drawn at the sheet's size, not a strip
    rows, _ = _green_columns(info, expected)
    assert rows.size  # the labelled square is outlined in it


def test_legend_volume_in_millilitres(tmp_path: Path) -> None:
    labels = np.zeros((30, 40, 20), dtype=np.uint8)
    labels[5:15, 10:30, 5:10] = 3  # 1000 voxels of 1 x 1.5 x 2 mm = 3000 mm^3 = 3 mL
    path = write_volume(tmp_path / "l.nii.gz", labels, ras_affine((1.0, 1.5, 2.0)))
    info = volume_quicklook(path, tmp_path / "q.png")
    assert info.by_value(3).amount == pytest.approx(3.0) and info.by_value(3).unit == "mL"
    assert info.by_value(3).name == "class 3"
    given = volume_quicklook(path, tmp_path / "g.png", volumes_ml={3: 2.75})
    assert given.by_value(3).amount == 2.75


def test_rows_follow_classes_and_cut_through_each_component(tmp_path: Path) -> None:
    labels = np.zeros((48, 48, 24), dtype=np.uint8)
    yy, xx = np.mgrid[:48, :48]
    ring = (np.hypot(yy - 24, xx - 24) < 14) & (np.hypot(yy - 24, xx - 24) > 9)
    labels[:, :, 8:16][ring] = 1  # a ring: its centroid lies in the hole
    labels[2:5, 2:5, 2:5] = 2  # a small component of class 2 ...
    labels[40:46, 40:46, 16:22] = 2  # ... and its largest one
    info = volume_quicklook(write_volume(tmp_path / "l.nii", labels, ras_affine()), tmp_path / "q.png")
    assert len(info.panels) == 6 and [p.through_class for p in info.panels] == [1, 1, 1, 2, 2, 2]
    for value, centre in zip((1, 2), info.centres):
        assert labels[centre] == value
    assert all(40 <= v < 46 for v in info.centres[1][:2])

    many = np.zeros((30, 30, 30), dtype=np.uint8)
    for v in range(1, 7):
        many[v * 4:v * 4 + 3, 5:5 + v * 3, 10:20] = v
    info = volume_quicklook(write_volume(tmp_path / "m.nii", many, ras_affine()), tmp_path / "m.png")
    assert len(info.panels) == 3 and info.panels[0].through_class == 6
    assert len(info.classes) == 6


def test_window_and_errors(tmp_path: Path) -> None:
    image, labels = left_blob_volume()
    lab = write_volume(tmp_path / "l.nii", labels, ras_affine())
    img = write_volume(tmp_path / "i.nii", image, ras_affine())
    info = volume_quicklook(lab, tmp_path / "w.png", image_path=img, window=(10.0, 100.0))  # 95..105
    axial = crop(png(info), info.panel("axial").box)
    assert axial[5, axial.shape[1] // 2 - 20].tolist() == [128, 128, 128]  # background 100 mid-window: mid grey
    with pytest.raises(IncompatibleInputError, match="i2.nii"):
        volume_quicklook(lab, tmp_path / "x.png", image_path=write_volume(tmp_path / "i2.nii", image[:-1], ras_affine()))
    with pytest.raises(InvalidInputError, match="4d.nii"):
        volume_quicklook(write_volume(tmp_path / "4d.nii", np.zeros((4, 4, 4, 2), np.uint8), ras_affine()),
                         tmp_path / "x.png")
    negative = np.zeros((8, 8, 4), dtype=np.int16)
    negative[0, 0, 0] = -1
    with pytest.raises(InvalidInputError, match="negative"):
        volume_quicklook(write_volume(tmp_path / "neg.nii.gz", negative, ras_affine()), tmp_path / "x.png")
    floats = np.zeros((8, 8, 4), dtype=np.float32)
    floats[2:4, 2:4, 1:3] = 2.0  # float label maps (some tools write them) are fine when whole numbers
    assert volume_quicklook(write_volume(tmp_path / "f.nii", floats, ras_affine()),
                            tmp_path / "f.png").by_value(2).amount == pytest.approx(8 / 1000)
    with pytest.raises(InputError, match="nothing.nii"):
        volume_quicklook(tmp_path / "nothing.nii", tmp_path / "x.png")


def _panels_through(info: QuicklookInfo, value: int) -> list:
    return [p for p in info.panels if p.through_class == value]


def test_a_few_voxel_lesion_and_the_largest_components_in_a_large_volume(tmp_path: Path) -> None:
    # 256x256x160 voxels: the census keeps 3x3x3 block grids, so components are first found coarsely
    shape = (256, 256, 160)
    assert labelcensus.block_for(shape) == 3
    labels = np.zeros(shape, dtype=np.uint8)
    ii, jj, kk = np.ogrid[:shape[0], :shape[1], :shape[2]]
    labels[((ii - 150) / 60) ** 2 + ((jj - 130) / 50) ** 2 + ((kk - 80) / 40) ** 2 < 1] = 1  # an organ
    labels[30:32, 200:202, 140] = 2  # a lesion of 4 voxels, far from everything
    labels[200:206, 30:36, 20:26] = 3  # class 3: a 6x6x6 cube (216 voxels) ...
    labels[60:100:2, 20:60:2, 100:140:2] = 3  # ... and 8000 isolated specks, in adjacent blocks: one coarse clump
    labels[10:15, 10:15, 10:15] = 4  # class 4: two solid components, the second larger
    labels[230:237, 230:237, 100:107] = 4
    colors = {1: (200, 120, 40), 2: (255, 0, 255), 3: (0, 200, 0), 4: (0, 120, 255)}
    table = slicer_color_table([LabelClass(value=v, name=f"c{v}", color=c) for v, c in colors.items()])
    path = write_volume(tmp_path / "big.nii.gz", labels, ras_affine(), [table])
    info = volume_quicklook(path, tmp_path / "q.png")
    assert [p.through_class for p in info.panels] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    organ, lesion, cube, blob = info.centres
    assert labels[organ] == 1 and abs(organ[0] - 150) <= 1 and abs(organ[1] - 130) <= 1 and abs(organ[2] - 80) <= 1
    assert 30 <= lesion[0] < 32 and 200 <= lesion[1] < 202 and lesion[2] == 140
    assert all(lo <= v < lo + 6 for v, lo in zip(cube, (200, 30, 20)))  # not one of the specks that outweigh it
    assert all(lo <= v < lo + 7 for v, lo in zip(blob, (230, 230, 100)))
    assert info.by_value(2).amount == pytest.approx(4 / 1000)  # every voxel counted
    assert info.by_value(3).amount == pytest.approx((216 + 8000) / 1000)
    pixels = png(info)
    for panel in _panels_through(info, 2):  # the lesion is drawn in each of its three planes
        assert (crop(pixels, panel.box) == colors[2]).all(axis=-1).any(), panel.name


def test_a_big_component_found_on_reduced_blocks_is_cut_inside_it(tmp_path: Path, monkeypatch) -> None:
    # Boxes over 4096 voxels are searched on 4x4x4 blocks, which join the ring with the specks beside it;
    # the centre must still be a voxel of the ring (whose centroid lies in its hole), not of a speck.
    monkeypatch.setattr(labelcomponents, "COMPONENT_VOXELS", 4096)
    labels = np.zeros((96, 96, 64), dtype=np.uint8)
    yy, xx = np.mgrid[:96, :96]
    radius = np.hypot(yy - 48, xx - 48)
    ring = (radius > 15) & (radius < 35) & ~((yy > 48) & (np.abs(xx - 48) < 6))  # a C: open at the bottom
    labels[:, :, 10:54][ring] = 1
    labels[::2, ::2, 56:64:2][radius[::2, ::2] < 40] = 1  # isolated specks just above the ring
    info = volume_quicklook(write_volume(tmp_path / "c.nii.gz", labels, ras_affine()), tmp_path / "q.png")
    centre = info.centres[0]
    assert 10 <= centre[2] < 54 and ring[centre[:2]], centre


def test_more_classes_than_rows_read_the_largest_class_again(tmp_path: Path, monkeypatch) -> None:
    # Six classes: no grid per class is kept in the census, the largest one's is read in a second pass.
    monkeypatch.setattr(labelcensus, "CELLS", 512)
    labels = np.zeros((48, 48, 48), dtype=np.uint8)
    assert labelcensus.block_for(labels.shape) == 6
    for v in range(1, 6):
        labels[v * 8:v * 8 + 3, 2:6, 2:6] = v
    labels[2:6, 30:36, 30:36] = 6  # the largest class: a small component ...
    labels[30:40, 30:40, 30:40] = 6  # ... and its largest one
    info = volume_quicklook(write_volume(tmp_path / "m.nii.gz", labels, ras_affine()), tmp_path / "q.png")
    assert [p.through_class for p in info.panels] == [6, 6, 6]
    assert all(30 <= v < 40 for v in info.centres[0])
    assert [c.amount for c in info.classes] == pytest.approx([0.048] * 5 + [(144 + 1000) / 1000])


def test_memory_stays_flat_as_the_volume_grows(tmp_path: Path, monkeypatch) -> None:
    # Slabs, grids and boxes made small so that a 16 MiB volume is "large": the quicklook's own peak
    # (Python and numpy allocations) must stay well under the label volume and grow much less than it.
    monkeypatch.setattr(volumeslabs, "SLAB_BYTES", 1 << 19)
    monkeypatch.setattr(labelcensus, "CELLS", 1 << 14)
    monkeypatch.setattr(labelcomponents, "COMPONENT_VOXELS", 1 << 15)
    peaks, sizes = [], []
    for depth in (64, 256):
        ii, jj, kk = np.ogrid[:256, :256, :depth]
        labels = ((((ii - 128) / 100) ** 2 + ((jj - 128) / 85) ** 2 + ((kk - depth / 2) / (depth / 2.2)) ** 2) < 1)
        labels = labels.astype(np.uint8)
        labels[10:13, 60:63, depth // 3:depth // 3 + 2] = 2
        lab = write_volume(tmp_path / f"l{depth}.nii.gz", labels, ras_affine())
        img = write_volume(tmp_path / f"i{depth}.nii.gz", (labels * 100).astype(np.int16), ras_affine())
        tracemalloc.start()
        try:
            info = volume_quicklook(lab, tmp_path / f"q{depth}.png", image_path=img)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        sizes.append(labels.nbytes)
        assert labels[info.centres[1]] == 2
    assert peaks[1] < sizes[1] / 2, f"peak {peaks[1] / 2**20:.1f} MiB for a {sizes[1] / 2**20:.0f} MiB volume"
    assert peaks[1] - peaks[0] < (sizes[1] - sizes[0]) / 4, [p / 2**20 for p in peaks]


# --------------------------------------------------------------------------- real outputs


def test_demo_outputs_give_non_blank_quicklooks(tmp_path: Path) -> None:
    outputs, inputs = DEMO / "outputs", DEMO / "inputs"
    if not outputs.is_dir():
        pytest.skip(f"{outputs} is absent (demo runs are not part of a fresh clone)")
    scene, phantom = outputs / "scene-heldout-101.tif", outputs / "phantom-heldout-101.nii.gz"
    if not scene.exists() or not phantom.exists():
        pytest.skip("the demo run lacks its label outputs")
    image = inputs / "scene-heldout-101.tif"
    info = raster_quicklook(scene, tmp_path / "scene.png", image_path=image if image.exists() else None, max_size=512)
    m = raster_map(info)
    assert m.std() > 10 and len(np.unique(m.reshape(-1, 3), axis=0)) > 50
    assert {c.name for c in info.classes} >= {"water", "forest"}
    volume = inputs / "phantom-heldout-101.nii.gz"
    info = volume_quicklook(phantom, tmp_path / "phantom.png", image_path=volume if volume.exists() else None)
    axial = crop(png(info), info.panel("axial").box)
    assert axial.std() > 10
    lesion = [c for c in info.classes if c.name == "lesion"]
    assert lesion and lesion[0].amount and lesion[0].amount > 0


def test_the_quicklook_font_draws_the_letters_people_name_things_with():
    """ü, é and ✓ in a file or class name came out as empty boxes (Pillow's default font lacks them): each is now
    a glyph of its own, unlike a code point no font has (drawn as the 'missing' box)."""
    from storage.quicklook_canvas import font

    f = font(14)

    def glyph(ch: str) -> bytes:
        return bytes(f.getmask(ch))

    missing = glyph("\U0010fffd")
    for ch in "üé✓":
        assert glyph(ch) != missing, ch


# --------------------------------------------------------------------------- raster: north up, square on the ground


def _marked_labels(path: Path, transform: Affine, *, shape=(40, 60), crs: str = UTM,
                   mark=(slice(2, 10), slice(3, 9))) -> Path:
    """Class 0 everywhere but a block of class 1 at ``mark`` (stored rows, cols), on any geotransform."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[mark] = 1
    with rasterio.open(path, "w", driver="GTiff", width=shape[1], height=shape[0], count=1, dtype="uint8",
                       crs=crs, transform=transform, nodata=255) as dst:
        dst.write(labels, 1)
    return path


MARK = [LabelClass(value=0, name="ground", color=(40, 40, 40)), LabelClass(value=1, name="mark", color=MAGENTA)]


def _magenta(info: QuicklookInfo) -> np.ndarray:
    m = raster_map(info)
    return (m[..., 0] > 200) & (m[..., 1] < 60) & (m[..., 2] > 200)


def test_a_raster_stored_south_up_or_mirrored_is_drawn_north_up(tmp_path: Path) -> None:
    """Drawn in storage order, a south-up GeoTIFF's picture was upside down, with nothing saying so."""
    x0, y0, rows, cols = ORIGIN[0], ORIGIN[1], 40, 60
    north = raster_quicklook(_marked_labels(tmp_path / "n.tif", Affine(10, 0, x0, 0, -10, y0)), tmp_path / "n.png",
                             classes=MARK)
    # the same ground, stored with rows running north, and with columns running west
    south = raster_quicklook(_marked_labels(tmp_path / "s.tif", Affine(10, 0, x0, 0, 10, y0 - 10 * rows),
                                            mark=(slice(rows - 10, rows - 2), slice(3, 9))), tmp_path / "s.png",
                             classes=MARK)
    west = raster_quicklook(_marked_labels(tmp_path / "w.tif", Affine(-10, 0, x0 + 10 * cols, 0, -10, y0),
                                           mark=(slice(2, 10), slice(cols - 9, cols - 3))), tmp_path / "w.png",
                            classes=MARK)
    assert bbox(_magenta(north)) == (2, 9, 3, 8)  # north-west, as stored
    for turned, words in ((south, "shown north up (stored south up)"), (west, "shown north up (stored east-west "
                                                                                 "mirrored)")):
        np.testing.assert_array_equal(crop(png(turned), turned.panel("map").box),
                                      crop(png(north), north.panel("map").box))
        assert turned.subtitles[-1] == words
    assert not any("north up" in line for line in north.subtitles)  # a north-up map is drawn as stored, untouched


def test_oblong_pixels_and_degrees_are_drawn_at_their_ground_proportions(tmp_path: Path) -> None:
    """384 x 128 pixels of 10 x 30 m (a square on the ground) were drawn three times too flat, captioned 10 m."""
    oblong = raster_quicklook(_marked_labels(tmp_path / "o.tif", Affine(10, 0, ORIGIN[0], 0, -30, ORIGIN[1]),
                                             shape=(40, 120)), tmp_path / "o.png", classes=MARK)
    assert oblong.magnification == 2 and oblong.panel("map").box[2:] == (240, 240)  # 120 x 120 map pixels
    assert "EPSG:32633, 10 x 30 m pixels" in oblong.subtitles[0]
    assert oblong.subtitles[0].endswith("each pixel drawn 2 x 2")  # a small map was a dot beside its legend
    assert oblong.subtitles[-1] == "oblong pixels drawn at their ground proportions"
    assert bbox(_magenta(oblong)) == (6, 29, 3, 8)  # stored rows 2-9 of 30 m: 3x as tall
    # square degrees at 60 degrees north are half as wide on the ground as they are tall
    geographic = raster_quicklook(_marked_labels(tmp_path / "g.tif", Affine(0.001, 0, 10.0, 0, -0.001, 60.02),
                                                 shape=(40, 40), crs="EPSG:4326"), tmp_path / "g.png", classes=MARK)
    assert geographic.magnification == 6 and geographic.panel("map").box[2:] == (120, 240)  # 20 x 40
    assert geographic.subtitles[-1] == "degree pixels drawn at their ground proportions at latitude 60"


def test_a_rotated_geotransform_is_drawn_turned_with_its_pixel_size(tmp_path: Path) -> None:
    """A transform rotated 30 degrees was captioned "8.66025 m pixels" (its `a` term) and drawn unturned."""
    transform = Affine.translation(*ORIGIN) * Affine.rotation(30) * Affine.scale(10, -10)
    info = raster_quicklook(_marked_labels(tmp_path / "r.tif", transform), tmp_path / "r.png", classes=MARK)
    assert "EPSG:32633, 10 m pixels" in info.subtitles[0]
    assert info.subtitles[-1] == "shown north up (stored rotated 30 degrees)"
    # the mark's centre sits where its ground position puts it within the picture's ground extent
    corners = [transform * (c, r) for c, r in ((0, 0), (60, 0), (0, 40), (60, 40))]
    xs, ys = [p[0] for p in corners], [p[1] for p in corners]
    left, top, width, height = (n // info.magnification for n in info.panel("map").box)  # in map pixels
    scale = width / (max(xs) - min(xs))
    assert abs(height / (max(ys) - min(ys)) - scale) < 0.05
    gx, gy = transform * (6.0, 6.0)  # the centre of stored cols 3-8, rows 2-9
    rows, cols = np.nonzero(_magenta(info))
    assert abs(cols.mean() + 0.5 - (gx - min(xs)) * scale) < 1.0
    assert abs(rows.mean() + 0.5 - (max(ys) - gy) * scale) < 1.0


def test_a_legend_of_hundreds_of_classes_lists_those_on_the_map(tmp_path: Path) -> None:
    """A 300-class model's legend listed every class, "0 ha" after "0 ha": a picture 5,524 pixels tall."""
    classes = MARK + [LabelClass(value=v, name=f"class {v}", color=palette_color(v)) for v in range(2, 300)]
    info = raster_quicklook(_marked_labels(tmp_path / "l.tif", Affine(10, 0, ORIGIN[0], 0, -10, ORIGIN[1])),
                            tmp_path / "l.png", classes=classes)
    assert len(info.classes) == 299  # value 255 is the label nodata
    # two classes, the notes, the title: a few lines of 18 pixels beside the (magnified) map
    assert info.size[1] < max(info.panel("map").box[3], 8 * 18) + 100, info.size


def test_the_greys_where_nothing_is_labelled_are_in_the_legend(tmp_path: Path) -> None:
    """Nodata was drawn flat grey with no legend entry, while the caption spoke of transparency."""
    labels = np.zeros((40, 60), dtype=np.uint8)
    labels[20:, 30:] = 255  # the label nodata: a corner outside the scene
    path = tmp_path / "l.tif"
    with rasterio.open(path, "w", driver="GTiff", width=60, height=40, count=1, dtype="uint8", crs=UTM,
                       transform=Affine(10, 0, ORIGIN[0], 0, -10, ORIGIN[1]), nodata=255) as dst:
        dst.write(labels, 1)
    alone = raster_quicklook(path, tmp_path / "a.png", classes=MARK)
    assert "no label (nodata)" in alone.legend
    image = np.full((3, 40, 60), 90, dtype=np.uint8)
    image[:, 20:, 30:] = 0  # the image has no data there either
    scene = write_raster(tmp_path / "s.tif", image, nodata=0)
    over = raster_quicklook(path, tmp_path / "o.png", image_path=scene, classes=MARK)
    assert "no image data, no label" in over.legend and "no label (nodata)" not in over.legend
    whole = raster_quicklook(path, tmp_path / "w.png", image_path=write_raster(tmp_path / "f.tif", image + 1),
                             classes=MARK)
    assert not any(line.startswith("no ") for line in whole.legend)  # the image shows under every unlabelled pixel


def test_areas_and_volumes_read_as_the_report_pages_write_them(tmp_path: Path) -> None:
    """The page said "301 ha" and the picture beside it "301.0 ha" (two formatting rules): both now use
    storage.numbers.readable."""
    from storage.numbers import readable

    path = _marked_labels(tmp_path / "l.tif", Affine(10, 0, ORIGIN[0], 0, -10, ORIGIN[1]))
    info = raster_quicklook(path, tmp_path / "q.png", classes=MARK, areas_ha={0: 301.0, 1: 1719.34})
    assert "ground (0): 301 ha" in info.legend and "mark (1): 1,719.3 ha" in info.legend
    assert readable(301.0, "ha") == "301 ha" and readable(1719.34, "ha") == "1,719.3 ha"
    labels = np.zeros((20, 20, 10), dtype=np.uint8)
    labels[5:15, 5:15, 2:8] = 1  # 600 voxels of 2 x 2 x 2.5 mm: 6 mL
    volume = volume_quicklook(write_volume(tmp_path / "v.nii", labels, ras_affine((2.0, 2.0, 2.5))),
                              tmp_path / "v.png")
    assert any(line.endswith(": 6 mL") for line in volume.legend), volume.legend
