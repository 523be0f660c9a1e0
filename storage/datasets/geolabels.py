"""Rasters with a label raster or a vector layer as a :class:`Dataset` (layout "geo").

The folder holds ``images/<stem>.tif`` and, for each, ``labels/<stem>.tif``
(a label raster on the image's grid) or ``labels/<stem>.geojson`` /
``.gpkg`` (polygons).  Opening reads only raster profiles, layer headers and
attribute columns, so a missing partner, another grid or an unknown class
name is reported before any pixel is read.  The label table is
``classes.json`` when there is one; otherwise it is found from the labels:
the distinct values of the label rasters (a scan, band by band, on first use
of ``classes``), or background plus the distinct values of the layers' class
attribute (``class``, ``class_id``, ``class_name``, ``label``, ``category``,
first found), or one class named after the layer when there is none.

A vector layer becomes a label raster on the image grid (:func:`rasterise`,
in :mod:`storage.datasets.rasterising`; layers are read by
:mod:`storage.datasets.vectorlayers`) in the caller's work folder, block of
rows by block of rows, so the label raster of a large scene never sits in
memory; features are reprojected to the image's CRS first.  Pixels are burnt
by their centre, a later feature over an earlier one.  Splits are not part of
the layout: callers split by a seeded fraction or spatially.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import rasterio.warp
import rasterio.windows
from pydantic import ValidationError
from rasterio.crs import CRS
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.transform import Affine

from storage.classes import LabelClass
from storage.datasets.base import IGNORE, Case, CaseData, Layout, read_json, safe_id
from storage.datasets.arrays import LabelArray, LabelTable, count_classes, ingested
from storage.datasets.rasterising import crs_of, grid_corners, raster_spacing, rasterise, same_grid
from storage.datasets.vectorlayers import (CLASS_ATTRIBUTES, as_numbers, attribute_values, class_values,
                                           find_class_attribute, is_missing, layer_crs, layer_info, line_features)
from storage.errors import CorruptInputError, InvalidInputError
from storage.geometry import RasterGeometry
from storage.inputfiles import check_utf8_name
from storage.layout import ImageStore

IMAGE_SUFFIXES = (".tif", ".tiff")
VECTOR_SUFFIXES = (".geojson", ".gpkg")
CLASSES_FILE = "classes.json"


@dataclass(frozen=True)
class VectorLabels:
    """A vector case's annotation: the layer, the attribute holding each feature's class (None: one class), and
    its feature count from the header (-1: not known), since a layer without features is a tile of background
    alone, whatever its attribute or the table."""

    path: Path
    class_attribute: str | None
    features: int = -1


# --------------------------------------------------------------------------- headers, before any pixel is read


@dataclass(frozen=True)
class _Profile:
    height: int
    width: int
    bands: int  # without alpha
    crs: CRS | None
    transform: Affine
    dtype: str
    descriptions: tuple[str | None, ...]


def _profile(path: Path) -> _Profile:
    """What rasterio says of a raster without reading pixels."""
    check_utf8_name(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotGeoreferencedWarning: a label raster may have no CRS
            with rasterio.open(path) as src:
                bands = [i for i, ci in zip(src.indexes, src.colorinterp) if ci != ColorInterp.alpha]
                return _Profile(src.height, src.width, len(bands), src.crs, src.transform, src.dtypes[0],
                                tuple(src.descriptions[i - 1] for i in bands))
    except (RasterioError, OSError) as exc:
        raise CorruptInputError(path, f"rasterio cannot open it: {str(exc).splitlines()[0][:200]}") from None


def _check_label_raster(image: Path, label: Path, img: _Profile) -> None:
    lab = _profile(label)
    if (lab.height, lab.width) != (img.height, img.width):
        raise InvalidInputError(label, f"label raster is {lab.width}x{lab.height} but image {image.name} is "
                                       f"{img.width}x{img.height}")
    if lab.bands != 1:
        raise InvalidInputError(label, f"label raster has {lab.bands} bands; a label raster has one")
    if np.dtype(lab.dtype).kind not in "iu":
        raise InvalidInputError(label, f"label raster has {lab.dtype} pixels; labels must be integers "
                                       "(gdal_translate -ot Byte)")
    if lab.crs is not None and (lab.crs != img.crs or not same_grid(img.transform, lab.transform,
                                                                      img.width, img.height)):
        raise InvalidInputError(label, f"label raster is not on image {image.name}'s grid (CRS or transform "
                                       "differ); warp it onto the image grid first")


def _check_vector(image: Path, vector: Path, img: _Profile) -> int:
    """The layer opens and, when both have a CRS, overlaps its image: a wrong CRS shows before training.  Returns
    the layer's feature count (-1: the driver does not know it without reading)."""
    info = layer_info(vector)
    bounds, crs = info.get("total_bounds"), layer_crs(info, vector)
    features = int(info.get("features") if info.get("features") is not None else -1)
    if not features or bounds is None:
        return features
    if crs is not None and img.crs is None:  # nothing was burnt, and training went on with background only
        raise InvalidInputError(vector, f"vector layer ({crs.to_string()}) has a CRS and image {image.name} has "
                                        "none: its features cannot be placed on the image (give the image its CRS)")
    if crs is None or img.crs is None:  # neither has one: both in the image transform's coordinates
        left, bottom, right, top = bounds
    else:
        try:
            left, bottom, right, top = rasterio.warp.transform_bounds(crs, img.crs, *bounds)
        except (RasterioError, ValueError):
            return  # bounds that do not transform (a polar layer): the pixels will tell
    corners = grid_corners(img.transform, img.width, img.height)
    (ix0, iy0), (ix1, iy1) = corners.min(axis=0), corners.max(axis=0)
    if right < ix0 or left > ix1 or top < iy0 or bottom > iy1:
        where = crs.to_string() if crs is not None else "no CRS"
        x0, y0, x1, y1 = bounds
        if crs is not None and crs.to_epsg() == 4326 and not (-180 <= x0 <= x1 <= 180 and -90 <= y0 <= y1 <= 90):
            # RFC 7946: GeoJSON is longitude and latitude; a file exported in UTM without its crs member reads so
            raise InvalidInputError(vector, f"vector layer is read as {where} (longitude, latitude) but holds "
                                            f"coordinates up to ({max(abs(x0), abs(x1)):.0f}, "
                                            f"{max(abs(y0), abs(y1)):.0f}), which are no degrees: a GeoJSON in a "
                                            "projected CRS needs its 'crs' member, or save it as GeoPackage")
        raise InvalidInputError(vector, f"vector layer ({where}) does not overlap image {image.name}")
    return features


# --------------------------------------------------------------------------- label tables


def _classes_file(path: Path) -> LabelTable:
    try:
        doc = read_json(path)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(path, f"is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(path, f"cannot be read: {exc}") from None
    if not isinstance(doc, list) or not doc or not all(isinstance(e, dict) for e in doc):
        raise InvalidInputError(path, "must be a non-empty list of {\"value\": 0, \"name\": \"background\", "
                                      "\"color\": [0, 0, 0]}")
    try:
        parsed = [LabelClass.model_validate({k: e[k] for k in ("value", "name", "color") if k in e}) for e in doc]
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidInputError(path, f"bad class entry: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if len({c.value for c in parsed}) != len(parsed):
        raise InvalidInputError(path, "lists a class value twice")
    if len({c.name.strip().lower() for c in parsed}) != len(parsed):
        raise InvalidInputError(path, "lists a class name twice (names are matched in any case)")
    colours = {c.value: c.color for c, e in zip(parsed, doc) if "color" in e}
    listed = {c.value for c in parsed}  # 255 is "no label" in the label rasters unless the file makes it a class
    return LabelTable.build({c.value: c.name for c in parsed}, path, colors=colours,
                            ignored=() if IGNORE in listed else (IGNORE,))


def _listed(values: set[int]) -> str:
    ordered = [str(v) for v in sorted(values)]
    return ordered[0] if len(ordered) == 1 else f"{', '.join(ordered[:-1])} and {ordered[-1]}"


def label_nodata(path: Path) -> int | None:
    """A label raster's nodata value as a whole number (None: none, or not a whole number; a vector layer: None)."""
    if not path.name.lower().endswith((".tif", ".tiff", ".vrt")):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rasterio.open(path) as src:
                nodata = src.nodata
    except (RasterioError, OSError):
        return None  # the ingest says what is wrong with it
    return int(nodata) if nodata is not None and float(nodata).is_integer() else None


def _raster_values(path: Path) -> set[int]:
    """The distinct valid values of a label raster, read band of rows by band of rows."""
    found: set[int] = set()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rasterio.open(path) as src:
                step = max(src.block_shapes[0][0], (16 << 20) // max(src.width, 1) // src.block_shapes[0][0]
                           * src.block_shapes[0][0])
                for row in range(0, src.height, step):
                    window = rasterio.windows.Window(0, row, src.width, min(step, src.height - row))
                    data = src.read(1, window=window)
                    found.update(np.unique(data[src.read_masks(1, window=window) > 0]).tolist())
    except (RasterioError, OSError) as exc:
        raise CorruptInputError(path, f"cannot read pixels: {str(exc).splitlines()[0][:200]}") from None
    bad = sorted(v for v in found if not 0 <= v <= 65534)
    if bad:
        raise InvalidInputError(path, f"label values {', '.join(map(str, bad[:12]))} are not class values 0..65534")
    return found


def _vector_table(cases: list[Case], where: Path) -> LabelTable:
    """Background plus the layers' class values, or one class when the layers have no class attribute.  Layers
    without features (all background) say nothing of the table."""
    vectors: list[VectorLabels] = [c.annotation for c in cases if c.annotation.features != 0] or \
        [c.annotation for c in cases]
    with_attribute = [v for v in vectors if v.class_attribute]
    if not with_attribute:
        name = vectors[0].path.name.split(".")[0] if len(vectors) == 1 else "foreground"
        return LabelTable.build({0: "background", 1: name}, vectors[0].path if len(vectors) == 1 else where)
    if len(with_attribute) != len(vectors):
        lacking = next(v for v in vectors if not v.class_attribute)
        raise InvalidInputError(lacking.path, f"has no class attribute ({', '.join(CLASS_ATTRIBUTES)}) while "
                                              f"other layers have one; add one, or a {CLASSES_FILE}")
    names: dict[str, str] = {}  # lower-case -> first spelling seen
    numbers: set[int] = set()
    for v in with_attribute:
        raw = as_numbers([x for x in attribute_values(v.path, v.class_attribute or "") if not is_missing(x)])
        strings = [x.strip() for x in raw if isinstance(x, str)]
        if strings and (len(strings) != len(raw) or numbers) or (not strings and raw and names):
            raise InvalidInputError(v.path, f"'{v.class_attribute}' mixes class names and numbers; add a "
                                            f"{CLASSES_FILE}")
        for text in strings:
            names.setdefault(text.lower(), text)
        if not strings:
            numbers.update(class_values(raw, len(raw), None, v.path, v.class_attribute).tolist())
    if names:
        # natural order: codes written as text ("1", "2", "10") keep their numeric order ("10" came before "2")
        ordered = [names[k] for k in sorted(names, key=lambda k: (0, int(k), k) if k.isdigit() else (1, 0, k))
                   if k != "background"]
        return LabelTable.build({0: "background", **{i + 1: n for i, n in enumerate(ordered)}}, where)
    return LabelTable.build({0: "background", **{n: f"class {n}" for n in sorted(numbers) if n}}, where)


# --------------------------------------------------------------------------- the dataset


@dataclass
class GeoDataset:
    """Rasters with label rasters or vector layers; the label table is found lazily when it needs pixels."""

    root: Path
    name: str
    cases: list[Case]
    channel_names: list[str]
    classes_file: Path | None = None
    layout: str = "geo"
    ignore_index: int | None = IGNORE
    spatial_dims: int = 2
    _table: LabelTable | None = field(default=None, repr=False)

    @property
    def channels(self) -> int:
        return len(self.channel_names)

    @property
    def table(self) -> LabelTable:
        """classes.json, else the values the labels hold (label rasters are scanned on first use)."""
        if self._table is None:
            if any(c.labels is None for c in self.cases):
                self._table = _vector_table(self.cases, self.root / "labels")
            else:
                values: set[int] = set()
                for case in self.cases:
                    values |= _raster_values(case.labels)  # type: ignore[arg-type]
                # 255 is "no label", as for image/label pairs: it was trained as a class named "class 255"
                if IGNORE in values and len(values - {IGNORE}) < 2:
                    raise InvalidInputError(self.root / "labels", f"the label rasters hold {_listed(values)}, "
                                            f"and {IGNORE} means no label: if it is a class (a 0/{IGNORE} mask), "
                                            f"list it in {CLASSES_FILE}")
                self._table = LabelTable.build({v: f"class {v}" for v in sorted(values - {IGNORE})},
                                               self.root / "labels", ignored=(IGNORE,))
        return self._table

    @property
    def classes(self) -> list[LabelClass]:
        return self.table.classes

    def _label_array(self, case: Case, work: Path) -> tuple[LabelArray, ImageStore]:
        work.mkdir(parents=True, exist_ok=True)
        image = ingested(case.images[0], work / f"{case.id}.image.zarr")
        if case.labels is not None:
            label_file = case.labels
        else:
            vector: VectorLabels = case.annotation
            label_file = work / f"{case.id}.labels.tif"
            if not label_file.exists() or label_file.stat().st_mtime < vector.path.stat().st_mtime:
                burnt = [LabelClass(value=v, name=n) for v, n in zip(self.table.values, self.table.names)]
                rasterise(vector.path, image, label_file, class_attribute=vector.class_attribute, classes=burnt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a label raster without CRS is on the image grid
            label = ingested(label_file, work / f"{case.id}.labels.zarr")
        if label.spatial_shape != image.spatial_shape:
            raise InvalidInputError(label_file, f"label raster shape {label.spatial_shape} does not match the "
                                                f"image's {image.spatial_shape}")
        # a label raster's nodata that classes.json names as a class (QGIS and GDAL exports often mark 0 so) is that
        # class: masked, it had never been trained on
        label_mask = None if label_nodata(label_file) in self.table.values and self.classes_file else label.mask
        masks = [m for m in (image.mask, label_mask) if m is not None]
        return LabelArray(label.image, self.table, case.labels or case.annotation.path, masks), image

    def nodata_classes(self) -> list[int]:
        """The label rasters' nodata values that are trained as classes (classes.json names them): ``segflow
        evaluate --classes MODEL`` counts them too, as training did, instead of leaving them out."""
        if not self.classes_file:
            return []
        return sorted({v for case in self.cases if case.labels is not None
                       and (v := label_nodata(case.labels)) is not None and v in self.table.values})

    def notes(self) -> list[str]:
        """What a user should know about the labels: the label rasters' nodata (a class classes.json names, or no
        label), vector layers without features (all background) and line features (burnt 1 pixel wide)."""
        return self._nodata_notes() + self._vector_notes()

    def _vector_notes(self) -> list[str]:
        layers: list[VectorLabels] = [c.annotation for c in self.cases if c.labels is None]
        out = []
        empty = [v.path.name for v in layers if v.features == 0]
        if len(empty) == 1:
            out.append(f"{empty[0]} has no features: its tile is read as background alone")
        elif empty:
            out.append(f"{len(empty)} vector layers have no features ({empty[0]} and {len(empty) - 1} more): their "
                       "tiles are read as background alone")
        lines = {v.path.name: n for v in layers if v.features != 0 and (n := line_features(v.path))}
        if lines:
            count, first = sum(lines.values()), next(iter(lines))
            where = first if len(lines) == 1 else f"{first} and {len(lines) - 1} more layer(s)"
            out.append(f"{count} line feature{'s' if count > 1 else ''} in {where} {'were' if count > 1 else 'was'} "
                       "burnt as 1-pixel-wide lines (polygons are expected for areas)")
        return out

    def _nodata_notes(self) -> list[str]:
        """The label rasters' nodata: a class (classes.json names it) or no label."""
        values = sorted({v for case in self.cases if case.labels is not None
                         and (v := label_nodata(case.labels)) is not None})
        classes = dict(zip(self.table.values, self.table.names))
        out = []
        for value in values:
            if value in classes and self.classes_file:
                out.append(f"the label rasters' nodata value {value} is the class {classes[value]!r} in "
                           f"{CLASSES_FILE}: its pixels are trained as that class")
            elif value != IGNORE:
                out.append(f"the label rasters' nodata value {value} marks pixels without a label, which are not "
                           f"trained on; if {value} is a class, list it in {CLASSES_FILE}")
        return out

    def read(self, case: Case, work: Path, *, check: bool = False) -> CaseData:
        """The case's arrays from stores ingested under ``work`` (a vector layer rasterised there first).

        With ``check`` the whole label store is scanned for values outside the
        table first; without it (the default) a patch meeting one raises.
        Pixels the image or the label raster marks as nodata read as IGNORE.
        """
        labels, image = self._label_array(case, Path(work))
        if check:
            labels.validate()
        geometry = image.meta.geometry
        spacing = raster_spacing(geometry) if isinstance(geometry, RasterGeometry) else (1.0, 1.0)
        return CaseData(image=image.image, labels=labels, spacing=spacing, geometry=geometry, store=image)

    def validate_labels(self, work: Path | None = None) -> dict[int, int]:
        """Scan every case's labels chunk by chunk; raise naming the file with values outside the table,
        else return the pixel count of each class (IGNORE pixels left out).

        Without ``work`` the stores go to a temporary folder.
        """
        return count_classes(self.cases, lambda case, folder: self._label_array(case, folder)[0], work)


def _files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """stem -> file for the visible files of ``folder`` with one of ``suffixes``; a stem twice is an error."""
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = next((s for s in suffixes if path.name.lower().endswith(s)), None)
        if path.name.startswith(".") or suffix is None or path.is_dir():
            continue
        if not path.exists():
            raise InvalidInputError(path, "is a broken symbolic link")
        stem = path.name[: -len(suffix)]
        if stem in out:
            raise InvalidInputError(path, f"{out[stem].name} already has the stem '{stem}'; keep one file per case")
        out[stem] = path
    return out


def detect(root: Path) -> bool:
    """Strict: a folder holding both images/ and labels/ (a lone raster beside its labels is not a dataset)."""
    root = Path(root)
    return root.is_dir() and (root / "images").is_dir() and (root / "labels").is_dir()


def open_geo(root: Path, *, class_attribute: str | None = None) -> GeoDataset:
    """Pair images with labels and check grids and tables from headers; ``class_attribute`` overrides the
    attribute looked for in vector layers."""
    root = Path(root)
    for folder in ("images", "labels"):
        if not (root / folder).is_dir():
            raise InvalidInputError(root / folder, "missing: a geo dataset keeps images/<stem>.tif beside "
                                                   "labels/<stem>.tif, .geojson or .gpkg")
    images = _files(root / "images", IMAGE_SUFFIXES)
    labels = _files(root / "labels", IMAGE_SUFFIXES + VECTOR_SUFFIXES)
    if not images:
        raise InvalidInputError(root / "images", "holds no .tif images")
    for stem, label in labels.items():
        if stem not in images:
            raise InvalidInputError(label, f"label without an image: images/{stem}.tif is missing")
    cases, channel_names = [], None
    for stem, image in images.items():
        label = labels.get(stem)
        if label is None:
            raise InvalidInputError(image, f"image without a label: labels/{stem}.tif, .geojson or .gpkg is missing")
        profile = _profile(image)
        names = [d or f"band{i + 1}" for i, d in enumerate(profile.descriptions)]
        if channel_names is not None and len(names) != len(channel_names):
            raise InvalidInputError(image, f"has {len(names)} bands but the other images have {len(channel_names)}")
        channel_names = channel_names or names
        if label.name.lower().endswith(VECTOR_SUFFIXES):
            features = _check_vector(image, label, profile)
            attribute = None if features == 0 else class_attribute or find_class_attribute(label)
            annotation = VectorLabels(label, attribute, features)
            cases.append(Case(id=safe_id(stem), images=(image,), labels=None, annotation=annotation))
        else:
            _check_label_raster(image, label, profile)
            cases.append(Case(id=safe_id(stem), images=(image,), labels=label))
    if len({c.id for c in cases}) != len(cases):
        raise InvalidInputError(root / "images", "two image names become the same case id; rename one")
    classes_file = root / CLASSES_FILE if (root / CLASSES_FILE).is_file() else None
    table = _classes_file(classes_file) if classes_file else None
    vectors = [c for c in cases if c.labels is None]
    if table is None and vectors and len(vectors) != len(cases):
        raise InvalidInputError(root / "labels", f"mixes label rasters and vector layers; add a {CLASSES_FILE} "
                                                 "to say which value each class has")
    if table is not None and vectors:
        if table.values[-1] >= IGNORE:
            raise InvalidInputError(classes_file, f"class value {table.values[-1]} does not fit a rasterised "
                                                  f"uint8 label (0..{IGNORE - 1})")
        if 0 not in table.values:  # had been blamed on a layer ("label values 0 are not in the label table")
            raise InvalidInputError(classes_file, "has no class 0, the value the pixels no vector feature covers "
                                                  'are burnt as; add {"value": 0, "name": "background"}')
        burnt = [LabelClass(value=v, name=n) for v, n in zip(table.values, table.names)]
        for case in vectors:
            vector: VectorLabels = case.annotation
            if vector.features == 0:  # all background
                continue
            raw = attribute_values(vector.path, vector.class_attribute) if vector.class_attribute else None
            class_values(raw, 1, burnt, vector.path, vector.class_attribute)  # a count of 1: check, not burn
    dataset = GeoDataset(root=root, name=root.resolve().name, cases=sorted(cases, key=lambda c: c.id),
                         channel_names=channel_names or [], classes_file=classes_file, _table=table)
    if table is None and vectors:
        _ = dataset.table  # attributes only: cheap, and a bad layer is better reported at open
    return dataset


LAYOUT = Layout(name="geo", detect=detect, open=open_geo, holds="images/ and labels/")

__all__ = ["CLASS_ATTRIBUTES", "GeoDataset", "LAYOUT", "VectorLabels", "crs_of", "class_values", "detect",
           "find_class_attribute", "open_geo", "raster_spacing", "rasterise"]
