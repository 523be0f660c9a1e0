"""Label maps opened as block readers, with their grid and units: what scoring a prediction reads.

A prediction or a ground truth may be a GeoTIFF/VRT, a NIfTI or a segflow
zarr store.  Each is opened as an array-like read block by block (rasterio
windows, nibabel's ``dataobj`` slicing, zarr slicing; volumes indexed
(i, j, k)), never whole, with what comparing two maps needs: the grid (CRS
and transform, or affine), the spacing and its unit (NIfTI zooms converted
from the header's spatial unit; a raster's transform in its CRS's linear
unit, pixels where it has none), the size of one cell (mL or ha), the value
meaning "no prediction", and the class names the file carries (a segflow
COG's CLASSES tag, a segflow NIfTI's label table, a store's ``classes``).
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage import jsontext
from storage.classes import LABEL_TABLE_HEADER, table_names
from storage.errors import CorruptInputError, InvalidInputError, StoreError, UnsupportedFormatError
from storage.inputfiles import check_readable_file

MAX_LABEL = 65535  # the largest label a segflow map holds (uint16); larger values are refused
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".png")  # PNG: a picture's label map (VOC, Cityscapes), no CRS
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".hdr.gz", ".img.gz")


@dataclass
class LabelSource:
    """An opened label map: a block reader, its grid, and its units.  Volumes are indexed (i, j, k)."""

    path: Path
    kind: str  # raster | volume
    array: Any  # .shape and [region] -> integer block
    spacing: tuple[float, ...]  # per array axis, in distance_unit
    distance_unit: str  # mm | m | px
    cell_size: float | None  # mL per voxel or ha per pixel; None when unknown (size_note says why)
    size_unit: str  # mL | ha
    size_note: str | None = None
    nodata: int | None = None  # the prediction's "no prediction" value, when the file declares one
    classes: dict[int, str] = field(default_factory=dict)  # class names the file carries
    crs: Any = None
    transform: tuple[float, ...] | None = None
    affine: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.array.shape)


def _as_labels(data: Any, path: Path) -> Any:
    """An integer block, or an error naming the file: a label map holds class numbers 0..65535."""
    import numpy as np

    a = np.asarray(data)
    if a.dtype.kind == "b":
        return a.view(np.uint8)
    if a.dtype.kind == "f":  # truths are often stored as floats; integral values are accepted
        if not np.isfinite(a).all() or bool((a != np.round(a)).any()):
            raise InvalidInputError(path, "holds non-integer values; a label map holds class numbers")
        a = a.astype(np.int64)
    elif a.dtype.kind not in "iu":
        raise InvalidInputError(path, f"has {a.dtype} pixels; a label map holds integers")
    if a.size and (int(a.min()) < 0 or int(a.max()) > MAX_LABEL):
        raise InvalidInputError(path, f"holds values {a.min()}..{a.max()}; labels lie in 0..{MAX_LABEL}")
    return a


class _RasterArray:
    def __init__(self, src: Any, path: Path) -> None:
        self.src, self.path, self.shape = src, path, (src.height, src.width)

    def __getitem__(self, region: tuple[slice, slice]) -> Any:
        from rasterio.windows import Window

        ys, xs = region
        try:
            data = self.src.read(1, window=Window(xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start))
        except Exception as exc:  # noqa: BLE001 - GDAL raises RasterioError and its own CPLE_* types
            raise CorruptInputError(self.path, f"cannot read pixels (rows {ys.start}-{ys.stop - 1}): "
                                               f"{' '.join(str(exc).split())}") from None
        return _as_labels(data, self.path)


class _NiftiArray:
    def __init__(self, img: Any, path: Path) -> None:
        self.img, self.path = img, path
        self.shape = tuple(int(n) for n in img.shape[:3]) + ((1,) if len(img.shape) == 2 else ())  # 2-D: 1 slice

    def __getitem__(self, region: tuple[slice, ...]) -> Any:
        import numpy as np

        ndim = len(self.img.shape)
        index = region if ndim == 3 else (*region, 0) if ndim == 4 else region[:2]
        try:
            data = np.asanyarray(self.img.dataobj[index])
            if ndim == 2:  # a one-slice image: the region's k range is 0:1
                data = data[..., None][..., region[2]]
        except Exception as exc:  # noqa: BLE001 - nibabel, gzip and zlib raise many types for damaged data
            raise CorruptInputError(self.path, f"cannot read voxel data: {' '.join(str(exc).split())}") from None
        return _as_labels(data, self.path)


class _ZarrArray:
    """A store's labels (or one-channel image); a volume's (k, j, i) arrays are shown as (i, j, k)."""

    def __init__(self, arr: Any, path: Path, *, channel: bool, volume: bool) -> None:
        self.arr, self.path, self.channel, self.volume = arr, path, channel, volume
        shape = tuple(int(n) for n in arr.shape[1 if channel else 0:])
        self.shape = shape[::-1] if volume else shape

    def __getitem__(self, region: tuple[slice, ...]) -> Any:
        index = region[::-1] if self.volume else region
        data = self.arr[(0, *index) if self.channel else index]
        return _as_labels(data.T if self.volume else data, self.path)


def _classes_from_json(text: Any) -> dict[int, str]:
    """``[{"value": 1, "name": "forest", ...}]`` as written by segflow; anything else gives no names."""
    from pydantic import ValidationError

    from storage.classes import LabelClass

    try:
        items = jsontext.loads(text) if isinstance(text, str) else text
        return {c.value: c.name for c in (LabelClass.model_validate(item) for item in items or [])}
    except (ValueError, TypeError, ValidationError):
        return {}


def _raster_units(transform: Any, crs: Any, shape: tuple[int, int] | None = None,
                  ) -> tuple[tuple[float, float], str, float | None, str | None]:
    """(row, col) pixel size and its unit, pixel area in ha and why it is missing."""
    from storage.header import linear_unit_metres, pixel_hectares

    a, b, _, d, e, _ = tuple(transform)[:6]
    area, note = pixel_hectares(transform, crs, shape)
    metres = None if crs is None or crs.is_geographic else linear_unit_metres(crs)
    if metres is None or area is None:  # a projection that gives no hectares (Web Mercator at 52° N) gives no
        return (1.0, 1.0), "px", area, note  # metres either: its distances were 1.6 times the ground's
    return (math.hypot(b, e) * metres, math.hypot(a, d) * metres), "m", area, note


def _volume_units(affine: Any, unit: str) -> tuple[tuple[float, ...], float | None, str | None]:
    """Voxel size (mm, per file axis) and volume (mL), both from the affine the volumes come from: the header's
    pixdim can disagree with the sform, and distances measured with it were wrong while volumes were right."""
    import numpy as np

    from storage.geometry import MM_PER_NIFTI_UNIT
    from storage.header import voxel_millilitres

    factor = MM_PER_NIFTI_UNIT.get(unit, 1.0)
    affine = np.asarray(affine, dtype=np.float64)
    ml, note = voxel_millilitres(affine, unit)
    return tuple(float(np.linalg.norm(affine[:3, n])) * factor for n in range(3)), ml, note


def _open_raster(path: Path, stack: ExitStack) -> LabelSource:
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    try:
        with warnings.catch_warnings():  # a map without CRS or transform: the grid check says what that means
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = stack.enter_context(rasterio.open(path))
    except Exception as exc:  # noqa: BLE001 - see _RasterArray
        raise CorruptInputError(path, f"rasterio cannot open it: {' '.join(str(exc).split())}") from None
    if src.count != 1:
        raise InvalidInputError(path, f"has {src.count} bands; a label map has one")
    spacing, unit, area, note = _raster_units(src.transform, src.crs, (src.height, src.width))
    nodata = src.nodata if src.nodata is not None and float(src.nodata).is_integer() else None
    return LabelSource(path, "raster", _RasterArray(src, path), spacing, unit, area, "ha", note,
                       None if nodata is None else int(nodata), _classes_from_json(src.tags().get("CLASSES")),
                       crs=src.crs, transform=tuple(src.transform)[:6])


def _open_nifti(path: Path, stack: ExitStack) -> LabelSource:
    from storage.niftiopen import open_nifti

    img = open_nifti(path, stack)  # the checks and words of ingest's reader
    shape = tuple(int(n) for n in img.shape)
    if len(shape) not in (2, 3) and not (len(shape) == 4 and shape[3] == 1):
        raise InvalidInputError(path, f"has shape {shape}; a label map is 2-D or 3-D")
    hdr = img.header
    unit = hdr.get_xyzt_units()[0]
    spacing, ml, note = _volume_units(img.affine, unit)
    classes: dict[int, str] = {}
    for ext in hdr.extensions:
        text = ext.get_content()
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
        if text.startswith(LABEL_TABLE_HEADER):
            classes = table_names(text)
    return LabelSource(path, "volume", _NiftiArray(img, path), spacing, "mm", ml, "mL", note, None, classes,
                       affine=img.affine)


def _open_store(path: Path) -> LabelSource:
    import base64

    import nibabel as nib
    from rasterio.crs import CRS
    from rasterio.transform import Affine

    from storage.layout import IMAGE, LABELS, open_image_store

    store = open_image_store(path)  # refuses foreign and half-written stores
    group, geometry = store.group, store.meta.geometry
    if LABELS in group:
        arr, channel = group[LABELS], False
    elif IMAGE in group and group[IMAGE].shape[0] == 1:
        arr, channel = group[IMAGE], True
    else:
        raise StoreError(path, "holds neither labels (a prediction store) nor a one-channel image")
    nodata = group.attrs.get("nodata_label")
    nodata = int(nodata) if isinstance(nodata, int) else None
    classes = _classes_from_json(group.attrs.get("classes"))
    if geometry.kind == "raster":
        crs = CRS.from_wkt(geometry.crs_wkt) if geometry.crs_wkt else CRS.from_epsg(geometry.epsg) \
            if geometry.epsg else None
        spacing, unit, area, note = _raster_units(Affine(*geometry.transform), crs, tuple(arr.shape[-2:]))
        return LabelSource(path, "raster", _ZarrArray(arr, path, channel=channel, volume=False), spacing, unit,
                           area, "ha", note, nodata, classes, crs=crs, transform=tuple(geometry.transform))
    header_class = nib.Nifti2Header if geometry.nifti_version == 2 else nib.Nifti1Header
    header = header_class(binaryblock=base64.b64decode(geometry.header_b64), check=False)
    spacing, ml, note = _volume_units(geometry.affine, header.get_xyzt_units()[0])
    return LabelSource(path, "volume", _ZarrArray(arr, path, channel=channel, volume=True), spacing, "mm", ml,
                       "mL", note, nodata, classes, affine=geometry.affine)


def open_labels(path: Path, stack: ExitStack) -> LabelSource:
    """Open a label GeoTIFF/VRT, NIfTI or segflow zarr store; its files stay open until ``stack`` closes."""
    path = Path(path)
    if path.is_dir() and (path.name.lower().endswith(".zarr") or (path / "zarr.json").is_file()):
        return _open_store(path)
    check_readable_file(path)
    name = path.name.lower()
    if name.endswith(VOLUME_SUFFIXES):
        return _open_nifti(path, stack)
    if name.endswith(".png"):
        return _open_picture(path)
    if name.endswith(RASTER_SUFFIXES):
        return _open_raster(path, stack)
    from storage.segtruth import is_dicom_seg

    if (reason := not_a_label_map(path)) is not None:
        raise UnsupportedFormatError(path, reason)
    if is_dicom_seg(path):  # named or made like a DICOM file
        raise UnsupportedFormatError(path, "is a DICOM file, not a label map; a DICOM SEG is read as the truth of a "
                                           "prediction on its grid (segflow evaluate PRED --truth SEG)")
    raise UnsupportedFormatError(path, "is not a label map segflow reads (.tif, .tiff, .vrt, .png, .nii, .nii.gz, "
                                       ".hdr/.img or a .zarr store)")


VECTOR_SUFFIXES = (".geojson", ".gpkg", ".shp", ".fgb", ".kml", ".gml")  # annotations drawn as vectors
ANNOTATION_SUFFIXES = (*VECTOR_SUFFIXES, ".json")  # truths as people keep them that are no label raster
RASTERISE_HINT = ("burn it into a label raster on the prediction's grid first (as training does, "
                  "storage.datasets.rasterising.rasterise; or gdal_rasterize with the prediction's extent and size)")


def not_a_label_map(path: Path) -> str | None:
    """Why ``path`` is a kind of annotation evaluate does not read (a vector layer, a COCO JSON), said plainly;
    None for any other file.  A folder pairing by name had said "no truth named tile_3.*" beside tile_3.geojson."""
    name = path.name.lower()
    if name.endswith(VECTOR_SUFFIXES):
        return f"is a vector layer: evaluate reads label rasters (GeoTIFF, PNG, NIfTI); {RASTERISE_HINT}"
    if not name.endswith(".json"):
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        head = b""
    if b'"FeatureCollection"' in head:
        return f"is a GeoJSON vector layer: evaluate reads label rasters (GeoTIFF, PNG, NIfTI); {RASTERISE_HINT}"
    if b'"segments_info"' in head:
        what = "a COCO panoptic annotation file"
    elif b'"annotations"' in head or b'"categories"' in head:
        what = "a COCO annotation file (polygons and RLE masks per image)"
    else:
        what = "a JSON file"
    return (f"is {what}, not a label map: evaluate reads label rasters (GeoTIFF, PNG, NIfTI) of class values; "
            "render each image's class map to a label PNG first")


def _open_picture(path: Path) -> LabelSource:
    """A PNG of label values (a palette PNG's indices, as VOC and Cityscapes keep them; 8 or 16-bit grey values,
    as nnU-Net keeps them; read as training reads them), on the pixel grid a picture's prediction is written on:
    no CRS, the identity transform.  An RGB picture is refused in words that say what it likely is."""
    from rasterio.transform import Affine

    from storage.datasets.pictures import VALUE_MODES, mode_words, picture_mode, read_values

    mode = picture_mode(path)
    if mode not in VALUE_MODES:
        what = ("a COCO panoptic PNG (segment ids encoded in its colours, their classes in the JSON's "
                "segments_info) or a colour-coded mask" if mode.startswith("RGB") else "no map of label values")
        raise InvalidInputError(path, f"is {mode_words(mode)} picture, {what}: evaluate reads a PNG of class values "
                                      "(palette indices, or 8 or 16-bit grey); convert it to class values first")
    data = _as_labels(read_values(path), path)
    transform = Affine.identity()
    spacing, unit, area, note = _raster_units(transform, None, data.shape)
    return LabelSource(path, "raster", data, spacing, unit, area, "ha", note, None, {}, crs=None,
                       transform=tuple(transform)[:6])


__all__ = ["ANNOTATION_SUFFIXES", "LabelSource", "MAX_LABEL", "RASTER_SUFFIXES", "VECTOR_SUFFIXES", "VOLUME_SUFFIXES",
           "not_a_label_map", "open_labels"]
