"""Vector labels burnt into a label raster on an image's grid, and the grid arithmetic that needs.

A vector layer becomes a uint8 label GeoTIFF on the image's grid
(:func:`rasterise`), block of rows by block of rows, so the label raster of a
large scene never sits in memory.  The grid helpers (a raster's CRS, corners,
spacing in metres, whether two grids are one) live here because rasterising
needs them first; the geo layout uses the same ones to check label rasters
and layers against their images before any pixel is read, and ``segflow
train``'s image/label pairs :func:`label_grid_problem`.
"""

from __future__ import annotations

import math
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.features
import rasterio.warp
import rasterio.windows
import shapely
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.transform import Affine
from shapely.geometry import mapping, shape

from storage.classes import LabelClass
from storage.datasets.vectorlayers import class_values, layer_crs, read_layer
from storage.errors import ExportError, InvalidInputError
from storage.geometry import RasterGeometry, VolumeGeometry, crs_of, same_affine
from storage.header import linear_unit_metres
from storage.layout import ImageStore

_EARTH_RADIUS_M = 6371008.8  # mean radius: spacing of a geographic raster is only used for surface distances
_GRID_TOLERANCE = 0.01  # pixels: how far two grids' corners may lie apart and still be one grid


def raster_spacing(geometry: RasterGeometry) -> tuple[float, float]:
    """Pixel size in metres along (y, x); in pixels (1.0) for a raster without CRS or transform."""
    a, b, _, d, e, f = geometry.transform
    rows, cols = math.hypot(b, e), math.hypot(a, d)
    crs = crs_of(geometry)
    if crs is None:
        return (rows, cols)
    if crs.is_geographic:  # degrees: a sphere is close enough for distances between label surfaces
        lat = f + e * geometry.height / 2 + d * geometry.width / 2
        metres = math.pi / 180 * _EARTH_RADIUS_M
        return (rows * metres, cols * metres * max(math.cos(math.radians(lat)), 1e-6))
    factor = linear_unit_metres(crs) or 1.0  # a CRS without linear units says nothing better than its own numbers
    return (rows * factor, cols * factor)


def grid_corners(transform: Affine, width: int, height: int) -> np.ndarray:
    """The grid's four corners in CRS coordinates, one (x, y) row each."""
    return np.array([transform * xy for xy in ((0, 0), (width, 0), (0, height), (width, height))])


def same_grid(t1: Affine, t2: Affine, width: int, height: int) -> bool:
    """Whether two transforms put a width x height grid's corners within a hundredth of a pixel."""
    pixel = min(math.hypot(t1.a, t1.d), math.hypot(t1.b, t1.e)) or 1.0
    apart = np.abs(grid_corners(t1, width, height) - grid_corners(t2, width, height))
    return bool(np.all(apart <= _GRID_TOLERANCE * pixel))


def label_grid_problem(image: RasterGeometry | VolumeGeometry, labels: RasterGeometry | VolumeGeometry,
                       image_name: str) -> str | None:
    """Why a label map of the image's shape still does not lie on its grid (None when it does); the image is
    called ``image_name`` in the message.

    A label raster without a CRS is taken by its shape (a mask exported from
    an image editor has no georeference), as the geo dataset layout takes it;
    one with a CRS must share the image's CRS and transform.  A label volume
    must share the image's affine.
    """
    if image.kind != labels.kind:
        return f"is a {labels.kind}, the image {image_name} a {image.kind}"
    if isinstance(image, RasterGeometry) and isinstance(labels, RasterGeometry):
        if labels.crs_wkt is None:
            return None
        same_crs = image.crs_wkt is not None and CRS.from_wkt(image.crs_wkt) == CRS.from_wkt(labels.crs_wkt)
        if not same_crs or not same_grid(Affine(*image.transform), Affine(*labels.transform), image.width,
                                         image.height):
            return f"is not on the grid of {image_name} (CRS or transform differ); warp it onto that grid first"
        return None
    if not same_affine(image.affine, labels.affine):  # type: ignore[union-attr]
        return f"label affine does not match that of {image_name}: the label is not on the image's voxel grid"
    return None


def _reprojected(geoms: np.ndarray, src: CRS, dst: CRS, path: Path) -> np.ndarray:
    try:
        return np.array([shape(rasterio.warp.transform_geom(src, dst, mapping(g))) for g in geoms], dtype=object)
    except (RasterioError, ValueError) as exc:
        raise InvalidInputError(path, f"features cannot be reprojected from {src.to_string()} to the image's "
                                      f"{dst.to_string()}: {str(exc).splitlines()[0][:120]}") from None


def rasterise(vector: Path, grid: ImageStore | RasterGeometry, out: Path, *, class_attribute: str | None = None,
              classes: list[LabelClass] | None = None, block_rows: int = 1024) -> Path:
    """Burn ``vector``'s features into a uint8 label GeoTIFF on ``grid``, ``block_rows`` rows at a time.

    Each block gets only the features whose bounds meet it; the features
    are held in memory (a layer is far smaller than its raster).  A layer
    without CRS, or an image without one, is taken to be in the image's
    coordinates; otherwise features are reprojected to the image's CRS.  The
    file is written under a temporary name and renamed: whole or absent.
    """
    vector, out = Path(vector), Path(out)
    geometry = grid.meta.geometry if isinstance(grid, ImageStore) else grid
    if not isinstance(geometry, RasterGeometry):
        raise ValueError("rasterise needs a raster grid")
    meta, wkb, fields = read_layer(vector, [class_attribute] if class_attribute else [], geometry=True)
    if class_attribute and class_attribute not in [str(f) for f in meta["fields"]]:
        raise InvalidInputError(vector, f"has no attribute '{class_attribute}'")
    geoms = shapely.from_wkb(wkb) if len(wkb) else np.array([], dtype=object)
    values = class_values(fields[0] if class_attribute else None, len(geoms), classes, vector, class_attribute)
    keep = ~(shapely.is_missing(geoms) | shapely.is_empty(geoms)) if len(geoms) else np.zeros(0, dtype=bool)
    geoms, values = geoms[keep], values[keep]
    src_crs, dst_crs = layer_crs(meta, vector), crs_of(geometry)
    if len(geoms) and src_crs is not None and dst_crs is not None and src_crs != dst_crs:
        geoms = _reprojected(geoms, src_crs, dst_crs, vector)
    bounds = shapely.bounds(geoms) if len(geoms) else np.zeros((0, 4))
    transform = Affine(*geometry.transform)
    height, width = geometry.height, geometry.width
    profile: dict[str, Any] = {"driver": "GTiff", "width": width, "height": height, "count": 1, "dtype": "uint8",
                               "crs": dst_crs, "transform": transform, "compress": "deflate"}
    if min(width, height) >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.tmp.tif")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotGeoreferencedWarning for an image without CRS
            with rasterio.open(tmp, "w", **profile) as dst:
                for row in range(0, height, block_rows):
                    window = rasterio.windows.Window(0, row, width, min(block_rows, height - row))
                    dst.write(_burn(window, transform, geoms, values, bounds), 1, window=window)
        os.replace(tmp, out)
    except (RasterioError, OSError) as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ExportError(out, f"cannot write the rasterised labels: {str(exc).splitlines()[0][:200]}") from None
    return out


def _burn(window: Any, transform: Affine, geoms: np.ndarray, values: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    rows, cols = int(window.height), int(window.width)
    block_transform = rasterio.windows.transform(window, transform)
    corners = grid_corners(block_transform, cols, rows)
    x0, y0 = corners.min(axis=0)
    x1, y1 = corners.max(axis=0)
    meets = (bounds[:, 0] <= x1) & (bounds[:, 2] >= x0) & (bounds[:, 1] <= y1) & (bounds[:, 3] >= y0)
    if not meets.any():
        return np.zeros((rows, cols), dtype=np.uint8)
    return rasterio.features.rasterize(zip(geoms[meets], values[meets].tolist()), out_shape=(rows, cols),
                                       transform=block_transform, fill=0, dtype="uint8")
