"""Raster grids for model space: the grid a model works on, chosen as GDAL would, and the map between two grids.

A raster model was trained at one ground sample distance (metres) and often
in a local projected CRS; scenes arrive at 5, 10, 20 or 60 m, sometimes in
degrees.  :func:`raster_mapping` chooses the model's grid as GDAL does: with
the CRS kept, the same top-left corner, pixel size = the gsd and size =
ceil(extent / gsd); with a CRS change (a geographic input goes to the UTM
zone of its centre when the card asks for ``utm``, or has no CRS of its own
in metres; or the card's ``EPSG:n``), ``rasterio.warp.calculate_default_transform``
at the gsd.  It also picks the kernels each way ("auto": average when
coarsening, bilinear when refining) and returns None when the grids are the
same, so nothing is warped.  :mod:`storage.warp` moves arrays between the grids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

from storage.errors import InvalidInputError
from storage.geometry import crs_of
from storage.header import linear_unit_metres

Kernel = Literal["bilinear", "average", "nearest"]
IDENTITY_RTOL = 1e-6  # a pixel size this close (relative) to the gsd is the gsd: no warp at all
PLACEHOLDER_CRS = "EPSG:3857"  # given to GDAL on both sides when the input has no CRS: a plain affine warp
_SNAP = 1e-9  # extent / gsd this close above an integer is that integer (no sliver column)


@dataclass(frozen=True)
class RasterGrid:
    """A raster grid: CRS (WKT, or None when unknown), rasterio affine (a, b, c, d, e, f) and shape."""

    crs: str | None
    transform: tuple[float, float, float, float, float, float]
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def affine(self) -> Any:
        from affine import Affine

        return Affine(*self.transform)

    def gdal_crs(self) -> Any:
        from rasterio.crs import CRS

        return CRS.from_user_input(self.crs or PLACEHOLDER_CRS)

    def to_json(self) -> dict[str, Any]:
        from rasterio.crs import CRS

        epsg = CRS.from_user_input(self.crs).to_epsg() if self.crs else None
        return {"crs": f"EPSG:{epsg}" if epsg else self.crs, "transform": [float(v) for v in self.transform],
                "shape_yx": [self.height, self.width]}


@dataclass(frozen=True)
class RasterMapping:
    """The input grid, the model grid, and the GDAL kernels that move pixels between them.

    ``scale`` is (x, y) model pixels per input pixel, GDAL's XSCALE/YSCALE of
    the warp to the model (the way back uses the reciprocals).
    """

    input: RasterGrid
    model: RasterGrid
    forward: Kernel  # image, input -> model
    back: Kernel  # probabilities, model -> input
    scale: tuple[float, float]
    reason: str = ""  # why the grids differ, for messages and provenance

    @property
    def input_shape(self) -> tuple[int, int]:
        return self.input.shape

    @property
    def model_shape(self) -> tuple[int, int]:
        return self.model.shape

    @property
    def is_identity(self) -> bool:
        return False  # raster_mapping returns None for the identity

    def to_json(self) -> dict[str, Any]:
        """Both grids (CRS, transform, shape) and the kernels, for provenance."""
        return {"kind": "raster", "reference": "GDAL warp kernels (per-axis weights in one CRS, storage.separable; else rasterio "
                                               "WarpedVRT, exact transformer, fixed XSCALE/YSCALE)",
                "input": self.input.to_json(), "model": self.model.to_json(),
                "to_model": self.forward, "to_input": self.back,
                "scale_xy": [float(s) for s in self.scale], "reason": self.reason, "identity": False}


# --- the model's grid ----------------------------------------------------------------------------------------------

def utm_crs(lon: float, lat: float) -> Any:
    """The WGS 84 UTM zone of a point (the regular 6-degree zones): EPSG 326zz north, 327zz south."""
    from rasterio.crs import CRS

    zone = min(max(int(math.floor((lon + 180.0) / 6.0)) + 1, 1), 60)
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def _centre_lonlat(grid: RasterGrid, crs: Any) -> tuple[float, float]:
    from rasterio.warp import transform

    x, y = grid.affine * (grid.width / 2.0, grid.height / 2.0)
    lons, lats = transform(crs, "EPSG:4326", [x], [y])
    return float(lons[0]), float(lats[0])


def _target_crs(src_crs: Any, card_crs: str | None, grid: RasterGrid, gsd: bool = True) -> Any:
    """The CRS the model works in: the card's code, the centre's UTM zone for a geographic input, and for a
    projection whose scale here is far from true when the card gives a ground sample distance (``gsd``), else the
    input's.  Web Mercator's metres at 52° N are 0.61 ground metres: a 10 m model was given 6 m pixels of a
    scene in EPSG:3857 (a 16.35 m grid for 10 m on the ground), and 5 m ones at 60° N."""
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    if card_crs not in (None, "utm"):
        try:
            target = CRS.from_user_input(card_crs)
        except CRSError as exc:
            raise InvalidInputError(None, f"the model's crs {card_crs!r} is not a CRS GDAL knows ({exc})") from None
        if src_crs is None:
            raise InvalidInputError(None, f"has no CRS, and the model works in {card_crs}: it cannot be warped there")
        return target
    if src_crs is not None and src_crs.is_geographic:  # degrees: a gsd in metres needs a local projection
        return utm_crs(*_centre_lonlat(grid, src_crs))
    if gsd and src_crs is not None and src_crs.is_projected and off_true_scale(grid, src_crs):
        return utm_crs(*_centre_lonlat(grid, src_crs))
    return src_crs


def off_true_scale(grid: RasterGrid, crs: Any) -> bool:
    """Whether areas in ``crs`` at the grid's centre are off the ground's by more than the 2 % that also withholds
    hectares (:func:`storage.header.pixel_hectares`); then its lengths are off by about 1 % or more."""
    from storage.header import MAX_AREAL_DISTORTION, areal_scale

    return abs(areal_scale(grid.affine, crs, (grid.height, grid.width)) - 1.0) > MAX_AREAL_DISTORTION


def _metres_per_unit(crs: Any, what: str) -> float:
    if crs is None:
        return 1.0  # no CRS: the transform's units are taken as metres
    if crs.is_geographic:
        raise InvalidInputError(None, f"the model's CRS ({what}) is geographic; a ground sample distance in metres "
                                      "needs a projected CRS (e.g. crs: utm)")
    metres = linear_unit_metres(crs)  # a local (engineering) CRS in metres or feet too, which rasterio refuses
    if metres is None:
        raise InvalidInputError(None, f"the CRS ({what}) has no linear unit, so a ground sample distance in metres "
                                      "cannot be laid on it (give the raster a projected CRS, e.g. gdalwarp -t_srs)")
    return metres


def _auto(kernel: str, coarsening: bool) -> Kernel:
    if kernel == "auto":
        return "average" if coarsening else "bilinear"
    return kernel  # type: ignore[return-value]


def raster_mapping(geometry: Any, shape: Sequence[int], *, spacing: Sequence[float] | None, crs: str | None,
                   resampling: str = "auto") -> RasterMapping | None:
    """The input-to-model mapping of a raster, or None when the model works on the input's own grid.

    ``spacing`` is the card's (row, col) gsd in metres (a value <= 0 keeps
    the input's pixel size on that axis); ``crs`` the card's ("utm",
    "EPSG:n" or None).  ``resampling`` is the card's kernel for the image
    ("auto": average when coarsening, bilinear when refining); the
    probabilities come back with bilinear where the input is finer than the
    model and average where it is coarser.
    """
    from rasterio.warp import calculate_default_transform

    height, width = int(shape[-2]), int(shape[-1])
    src_crs = crs_of(geometry)
    affine6: Any = tuple(float(v) for v in geometry.transform)[:6]
    grid = RasterGrid(crs=src_crs.to_wkt() if src_crs is not None else None, transform=affine6, height=height,
                      width=width)
    a, b, _, d, e, _ = grid.transform
    target = _target_crs(src_crs, crs, grid, gsd=spacing is not None and any(v > 0 for v in spacing))
    same_crs = (target is None and src_crs is None) or (target is not None and src_crs is not None
                                                        and target == src_crs)
    if tuple(grid.transform) == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0):  # GDAL's "no geotransform", with a CRS or not
        how = "gdal_translate -a_ullr" if src_crs is not None else "gdal_translate -a_srs -a_ullr"
        raise InvalidInputError(None, "has no geotransform (pixel coordinates only), and the model works at a "
                                      f"ground sample distance: georeference it first (e.g. {how}), or use a card "
                                      "without input.spacing")
    if b != 0.0 or d != 0.0:
        square = abs(a * b + d * e) <= 1e-9 * (a * a + d * d)  # pixel axes at right angles: a rotation
        kind = "a rotated" if square else "a sheared (its pixel axes are not at right angles)"
        raise InvalidInputError(None, f"has {kind} geotransform; model space needs a north-up grid "
                                      "(warp it north-up first, e.g. gdalwarp, or give it as a one-tile mosaic, "
                                      "--mosaic NAME --crs EPSG:n, whose tiles are warped)")
    if a < 0.0 or e > 0.0:  # the model grid follows the input's axes: the network would see a mirror image
        flipped = "rows running south to north" if e > 0.0 else "columns running east to west"
        raise InvalidInputError(None, f"has a flipped geotransform ({flipped}); model space needs a north-up grid, "
                                      "or the network sees the image mirrored (warp it north-up first, e.g. gdalwarp)")
    unit = _metres_per_unit(target, crs or "the input's")
    if same_crs:
        res = (abs(e), abs(a))  # (row, col) in CRS units
    else:
        guess = calculate_default_transform(src_crs, target, width, height, *_bounds(grid))[0]
        res = (abs(guess.e), abs(guess.a))
    gsd = [res[i] if spacing is None or spacing[i] <= 0 else float(spacing[i]) / unit for i in range(2)]
    if same_crs and all(abs(r - g) <= IDENTITY_RTOL * g for r, g in zip(res, gsd)):
        return None
    if same_crs:
        from affine import Affine

        rows = max(1, math.ceil(height * abs(e) / gsd[0] - _SNAP))
        cols = max(1, math.ceil(width * abs(a) / gsd[1] - _SNAP))
        model_affine = Affine(math.copysign(gsd[1], a), 0.0, grid.transform[2], 0.0, math.copysign(gsd[0], e),
                              grid.transform[5])
        model = RasterGrid(crs=grid.crs, transform=tuple(model_affine)[:6], height=rows,  # type: ignore[arg-type]
                           width=cols)
        scale = (abs(a) / gsd[1], abs(e) / gsd[0])
        reason = f"pixel size {abs(a):g} x {abs(e):g} to the model's {gsd[1]:g} x {gsd[0]:g}"
    else:
        model_affine, cols, rows = calculate_default_transform(src_crs, target, width, height, *_bounds(grid),
                                                               resolution=(gsd[1], gsd[0]))
        model = RasterGrid(crs=target.to_wkt(), transform=tuple(model_affine)[:6],  # type: ignore[arg-type]
                           height=int(rows), width=int(cols))
        scale = _local_scale(grid, model)
        reason = f"CRS {_name(src_crs)} to {_name(target)} at {gsd[1]:g} x {gsd[0]:g}"
    coarsening = scale[0] * scale[1] < 1.0
    return RasterMapping(input=grid, model=model, forward=_auto(resampling, coarsening),
                         back=_auto("auto", not coarsening), scale=scale, reason=reason)


def _name(crs: Any) -> str:
    if crs is None:
        return "none"
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else "custom"


def _bounds(grid: RasterGrid) -> tuple[float, float, float, float]:
    from rasterio.transform import array_bounds

    return array_bounds(grid.height, grid.width, grid.affine)


def to_pixels(src: RasterGrid, dst: RasterGrid, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``dst`` pixel coordinates (col, row) -> ``src`` pixel coordinates, through the exact CRS transform."""
    from rasterio.warp import transform

    xs, ys = dst.affine * (np.asarray(cols, dtype=np.float64), np.asarray(rows, dtype=np.float64))
    if src.crs != dst.crs and src.crs is not None and dst.crs is not None:
        src_crs = src.gdal_crs()
        xs, ys = transform(dst.gdal_crs(), src_crs, np.ravel(xs).tolist(), np.ravel(ys).tolist())
        xs = np.asarray(xs, dtype=np.float64)
        if src_crs.is_geographic:  # PROJ gives longitudes in [-180, 180]; a scene over 180 E runs past it
            centre = (src.affine * (src.width / 2.0, src.height / 2.0))[0]
            xs = xs + 360.0 * np.round((centre - xs) / 360.0)
    c, r = ~src.affine * (np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64))
    return np.asarray(c), np.asarray(r)


def _local_scale(src: RasterGrid, dst: RasterGrid) -> tuple[float, float]:
    """Destination pixels per source pixel along x and y at the source's centre (GDAL's XSCALE, YSCALE)."""
    cx, cy = src.width / 2.0, src.height / 2.0
    c, r = to_pixels(dst, src, np.array([cx, cx + 1.0, cx]), np.array([cy, cy, cy + 1.0]))
    return float(math.hypot(c[1] - c[0], r[1] - r[0])), float(math.hypot(c[2] - c[0], r[2] - r[0]))


# --- the chunked warp ----------------------------------------------------------------------------------------------


__all__ = ["IDENTITY_RTOL", "Kernel", "PLACEHOLDER_CRS", "RasterGrid", "RasterMapping", "raster_mapping", "to_pixels",
           "utm_crs"]
