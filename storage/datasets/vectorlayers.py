"""Vector label layers (GeoJSON, GeoPackage) read for their headers, class attribute and class values.

A geo dataset's vector labels are read twice: at open, where only the layer
header and the class attribute column are read so a bad layer or an unknown
class name shows before any pixel is, and when rasterised, with the
geometries.  Both go through these readers, so a layer that cannot be read
is one :class:`~storage.errors.CorruptInputError` naming it and a feature's
class is turned into a value by one rule (:func:`class_values`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyogrio
import pyogrio.errors
import pyogrio.raw
import shapely
from rasterio.crs import CRS
from rasterio.errors import RasterioError

from storage.classes import LabelClass
from storage.datasets.base import IGNORE
from storage.errors import CorruptInputError, InvalidInputError

CLASS_ATTRIBUTES = ("class", "class_id", "class_name", "classname", "label", "category")
_VECTOR_ERRORS = (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError, pyogrio.errors.FieldError,
                  pyogrio.errors.GeometryError, pyogrio.errors.FeatureError, pyogrio.errors.CRSError, OSError)
_INTEGER = re.compile(r"[+-]?[0-9]+")  # a class code written as text
_LINES = [int(t) for t in (shapely.GeometryType.LINESTRING, shapely.GeometryType.LINEARRING,
                           shapely.GeometryType.MULTILINESTRING)]


def _unreadable(path: Path, exc: BaseException) -> CorruptInputError:
    return CorruptInputError(path, f"cannot read the vector layer: {str(exc).splitlines()[0][:200]}")


def _one_layer(path: Path) -> None:
    """A file with several geometry layers (a GeoPackage of 'water' and 'roads') is refused: only the first was
    read, with a library warning, and the others' features became background."""
    try:
        layers = [str(name) for name, kind in pyogrio.list_layers(path) if kind is not None]
    except _VECTOR_ERRORS as exc:
        raise _unreadable(path, exc) from None
    if len(layers) > 1:
        raise InvalidInputError(path, f"has {len(layers)} layers ({', '.join(layers)}); segflow reads one layer "
                                      "per file: merge them into one, with a class attribute")


def layer_info(path: Path) -> dict[str, Any]:
    """The layer's header (fields, CRS, feature count, bounds) without its features."""
    _one_layer(path)
    try:
        return pyogrio.read_info(path)
    except _VECTOR_ERRORS as exc:
        raise _unreadable(path, exc) from None


def read_layer(path: Path, columns: list[str], geometry: bool) -> tuple[dict[str, Any], Any, list[np.ndarray]]:
    """The layer's header, geometries (WKB; only when ``geometry``) and the ``columns`` asked for."""
    _one_layer(path)
    try:
        meta, _, geoms, fields = pyogrio.raw.read(path, columns=columns, read_geometry=geometry, return_fids=False)
    except _VECTOR_ERRORS as exc:
        raise _unreadable(path, exc) from None
    return meta, geoms, fields


def find_class_attribute(path: Path) -> str | None:
    """The layer's field that holds classes: the first of CLASS_ATTRIBUTES present (any case), or None."""
    lowered = {str(f).lower(): str(f) for f in layer_info(path)["fields"]}
    return next((lowered[c] for c in CLASS_ATTRIBUTES if c in lowered), None)


def attribute_values(path: Path, attribute: str) -> np.ndarray:
    """One attribute column of the layer, as objects; a column the layer lacks is refused in one line."""
    meta, _, fields = read_layer(path, [attribute], geometry=False)
    if attribute not in [str(f) for f in meta["fields"]]:
        raise InvalidInputError(path, f"has no attribute '{attribute}'")
    return np.asarray(fields[0], dtype=object)


def as_numbers(values: Sequence[Any]) -> list[Any]:
    """``values`` with codes written as text ("1", "10") as the integers they are, when every text value is one:
    GIS exports often write a numeric class column as text, which had been read as class names (and renumbered,
    or refused against a classes.json of values).  A column holding any other text is left as it is."""
    texts = [v for v in values if isinstance(v, str) and not is_missing(v)]
    if not texts or not all(_INTEGER.fullmatch(v.strip()) for v in texts):
        return list(values)
    return [int(v.strip()) if isinstance(v, str) and not is_missing(v) else v for v in values]


def line_features(path: Path) -> int:
    """How many of the layer's features are lines, which burn as 1-pixel-wide strokes where an area was probably
    meant; a layer whose header says it holds polygons is not read."""
    kind = str(layer_info(path).get("geometry_type") or "").lower().replace(" z", "").replace(" m", "")
    if kind in ("polygon", "multipolygon"):
        return 0
    _, wkb, _ = read_layer(path, [], geometry=True)
    if not len(wkb):
        return 0
    return int(np.isin(shapely.get_type_id(shapely.from_wkb(wkb)), _LINES).sum())


def is_missing(value: Any) -> bool:
    """Whether an attribute value says nothing: None, NaN or blank text."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str)
                                                                                  and not value.strip())


def class_values(values: Sequence[Any] | None, count: int, classes: list[LabelClass] | None, path: Path,
                 attribute: str | None) -> np.ndarray:
    """Each feature's class value: names by the table (any case), numbers (or codes written as text: see
    :func:`as_numbers`) as they are; None: one class, for ``count`` features (none: a tile without features, all
    background whatever the table)."""
    if values is None:
        if count == 0:
            return np.zeros(0, dtype=np.uint8)
        if classes is None:
            return np.ones(count, dtype=np.uint8)
        foreground = [c for c in classes if c.value != 0]
        if len(foreground) != 1:
            raise InvalidInputError(path, f"has no class attribute ({', '.join(CLASS_ATTRIBUTES)}) but the label "
                                          f"table has {len(foreground)} classes besides background")
        return np.full(count, foreground[0].value, dtype=np.uint8)
    values = as_numbers(values)
    by_name = {c.name.strip().lower(): c.value for c in classes or []}
    known = {c.value for c in classes or []}
    out = np.zeros(len(values), dtype=np.uint8)
    for i, raw in enumerate(values):
        if is_missing(raw):
            raise InvalidInputError(path, f"feature {i} has no value in '{attribute}'")
        if isinstance(raw, str):
            if classes is None:
                raise InvalidInputError(path, f"'{attribute}' holds names ({raw!r}); naming classes needs a "
                                              "label table")
            value = by_name.get(raw.strip().lower())
            if value is None:
                raise InvalidInputError(path, f"feature {i} has class {raw!r} in '{attribute}', which is not in the "
                                              f"label table ({', '.join(sorted(by_name))})")
        else:
            try:
                number = float(raw)
            except (TypeError, ValueError):
                number = math.nan
            if not number.is_integer() or not 0 <= number < IGNORE:
                raise InvalidInputError(path, f"feature {i} has class {raw!r} in '{attribute}'; class values are "
                                              f"integers 0..{IGNORE - 1}")
            value = int(number)
            if classes is not None and value not in known:
                raise InvalidInputError(path, f"feature {i} has class {value} in '{attribute}', which is not in the "
                                              f"label table ({', '.join(str(v) for v in sorted(known))})")
        if value == 0:  # the fill: a class 0 had vanished into the background, or the background trained as it
            raise InvalidInputError(path, f"feature {i} has class {raw!r} in '{attribute}', value 0, which is what "
                                          "the pixels no feature covers are burnt as, so its pixels could not be "
                                          "told from them; give the classes values from 1")
        out[i] = value
    return out


def layer_crs(meta: dict[str, Any], path: Path) -> CRS | None:
    """The CRS a layer header names (None: none); one that cannot be read is refused in one line."""
    try:
        return CRS.from_user_input(meta["crs"]) if meta.get("crs") else None
    except (RasterioError, ValueError):  # rasterio's CRSError is a ValueError
        raise InvalidInputError(path, f"has a CRS that cannot be read: {str(meta['crs'])[:80]}") from None
