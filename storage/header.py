"""What an input is, as its header says: the :class:`Header` that routing and the run report read, and the
ground size of one pixel (hectares) or voxel (millilitres) that label areas and volumes are counted in.

:mod:`storage.probe` fills a Header from a file without ingesting it; the
readers (DICOM, STAC items) fill theirs as they read, and the statistics and
pictures convert label counts with the same two functions, so every figure a
run reports rests on one definition of a cell's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from storage.geometry import MM_PER_NIFTI_UNIT

SQUARE_METRES_PER_HECTARE = 1e4
CUBIC_MM_PER_ML = 1e3


NO_CRS = "no CRS: pixel size has no ground unit"  # a raster's cell note when it has no CRS


@dataclass(frozen=True)
class Header:
    """What routing and the run report need to know about one input."""

    path: str
    kind: str  # "raster" | "volume"
    spatial_dims: int  # 2 for rasters, 3 for volumes (a 2-D NIfTI is one slice thick)
    channels: int  # image channels, as ingest counts them (alpha bands are not channels)
    shape: tuple[int, ...]  # spatial shape: (height, width) or (i, j, k)
    cell_size: float | None  # hectares per pixel (raster) or millilitres per voxel (volume); None: unknown
    cell_unit: str  # "ha" or "mL"
    cell_note: str | None = None  # why cell_size is None, or an assumption it rests on
    bands: tuple[int, ...] = ()  # a raster's image bands (1-based indexes in the file); empty for volumes
    band_descriptions: tuple[str | None, ...] = ()  # their GDAL descriptions (None: unnamed)
    on_the_earth: bool = True  # a raster's CRS can be taken to longitude/latitude (False: none, or a local grid)
    case: str | None = None  # a case's nnU-Net channel files (storage.channelfiles): the case, one file a channel

    @property
    def names_bands(self) -> bool:
        """Whether the file names any of its bands (then a card's channel names are looked up among them)."""
        return any(self.band_descriptions)

    @property
    def channel_names(self) -> list[str]:
        """The channels' names as ingest records them: the description, else ``band<index>``."""
        return [d or f"band{i}" for d, i in zip(self.band_descriptions, self.bands)]


def linear_unit_metres(crs) -> float | None:  # noqa: ANN001 (rasterio CRS)
    """Metres per unit of a projected CRS, or of a local (engineering) one whose axes share a linear unit (a
    site survey grid in metres or feet, which rasterio's ``linear_units_factor`` refuses); else None."""
    try:
        return float(crs.linear_units_factor[1])
    except Exception:  # noqa: BLE001 - pyproj/GDAL raise several types for CRSs without a linear unit
        pass
    try:
        import pyproj

        axes = pyproj.CRS.from_wkt(crs.to_wkt()).axis_info
    except Exception:  # noqa: BLE001 - a CRS PROJ cannot read has no unit to give
        return None
    factors = {a.unit_conversion_factor for a in axes[:2]}
    units = {(a.unit_name or "").lower() for a in axes[:2]}
    if len(axes) < 2 or len(factors) != 1 or units & {"degree", "radian", "grad", "unknown", ""}:
        return None
    factor = factors.pop()
    return factor if factor and math.isfinite(factor) and factor > 0 else None


def on_the_earth(crs) -> bool:  # noqa: ANN001 (rasterio CRS or None)
    """Whether a CRS places a grid on the Earth, as a STAC item's WGS84 footprint and GeoJSON need: not for a
    raster without a CRS, nor for a local (engineering) one, which PROJ cannot take to longitudes and latitudes."""
    return crs is not None and bool(crs.is_geographic or crs.is_projected)


MAX_AREAL_DISTORTION = 0.02  # a projection whose areas here are off by more than 2 % gives no hectares


def areal_scale(transform, crs, shape: tuple[int, int] | None = None) -> float:  # noqa: ANN001
    """How much larger an area is in the CRS than on the ground, at the grid's centre (the top-left corner when
    ``shape`` is not known): about 1 for UTM within its zone or an equal-area CRS, 2.67 for Web Mercator at
    52° N.  1 where PROJ cannot say (a local grid)."""
    try:
        from pyproj import CRS as ProjCRS
        from pyproj import Proj, Transformer

        h, w = shape if shape is not None else (0, 0)
        x, y = transform * (w / 2, h / 2)
        proj = ProjCRS.from_wkt(crs.to_wkt())
        lon, lat = Transformer.from_crs(proj, "EPSG:4326", always_xy=True).transform(x, y)
        scale = float(Proj(proj).get_factors(lon, lat).areal_scale)
    except Exception:  # noqa: BLE001 - PROJ raises several types for CRSs it cannot take to the ellipsoid
        return 1.0
    return scale if math.isfinite(scale) and scale > 0 else 1.0


def pixel_hectares(transform, crs,  # noqa: ANN001 (affine.Affine, rasterio CRS)
                   shape: tuple[int, int] | None = None) -> tuple[float | None, str | None]:
    """Area of one pixel in hectares, or (None, why) when the grid has no linear unit.

    The area is |det| of the transform's 2x2 part (right for rotated and
    sheared grids), in the CRS's linear unit squared.  A geographic CRS has
    pixels in degrees, whose ground area changes with latitude; the run report
    only has a label histogram for the whole image, not per row, so it gives
    no area rather than a wrong one.  So does a projection that is far from
    equal-area here (Web Mercator away from the equator: its hectares at 52° N
    were 2.67 times the ground's), judged at the grid's centre (``shape``).
    """
    if crs is None:
        return None, NO_CRS
    if crs.is_geographic:
        return None, "geographic CRS (degrees): reproject to a projected CRS for areas"
    metres = linear_unit_metres(crs)
    if metres is None:
        return None, "the CRS has no linear unit"
    a, b, _, d, e, _ = tuple(transform)[:6]
    area_m2 = abs(a * e - b * d) * metres * metres
    if not math.isfinite(area_m2) or area_m2 <= 0:
        return None, "degenerate geotransform"
    scale = areal_scale(transform, crs, shape)
    if abs(scale - 1.0) > MAX_AREAL_DISTORTION:
        name = ":".join(crs.to_authority() or ()) or crs.to_string()[:40]
        return None, (f"{name} is not equal-area: an area measured here would be {scale:.3g} times the ground's, so "
                      "none is given; reproject to UTM or an equal-area CRS for areas")
    return area_m2 / SQUARE_METRES_PER_HECTARE, None


def voxel_millilitres(affine: np.ndarray, space_unit: str) -> tuple[float | None, str | None]:
    """Volume of one voxel in mL: |det| of the affine's 3x3 part (the zooms' product when not sheared).

    NIfTI's ``xyzt_units`` gives the unit; "unknown" is read as mm, as
    nibabel, ITK and most viewers do, and the report says so.
    """
    note = None
    if space_unit in MM_PER_NIFTI_UNIT:
        factor = MM_PER_NIFTI_UNIT[space_unit]
    else:
        factor, note = 1.0, f"spatial unit {space_unit!r} in the header: read as mm"
    volume_mm3 = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) * factor ** 3
    if not math.isfinite(volume_mm3) or volume_mm3 <= 0:
        return None, "singular affine"
    return volume_mm3 / CUBIC_MM_PER_ML, note


__all__ = ["CUBIC_MM_PER_ML", "Header", "NO_CRS", "SQUARE_METRES_PER_HECTARE", "areal_scale", "linear_unit_metres",
           "on_the_earth", "pixel_hectares", "voxel_millilitres"]
