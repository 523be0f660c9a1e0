"""GDAL's own warp of one chunk: what raster model space uses when the map is not separable (a CRS change, a
rotation, bilinear when coarsening).

Each task reads the source region its chunk's footprint maps to (the
footprint's densified outline carried through the exact CRS transform) plus a
halo wider than the kernel, and warps it with a ``WarpedVRT`` over an
in-memory copy of the region.  Two settings make a pixel's value independent
of the window it is computed in: the transformer's error tolerance
(:data:`TOLERANCE`) and the kernel's scale (``XSCALE``/``YSCALE``), fixed from
the whole mapping instead of each window's size (:mod:`storage.warp`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from storage.rastergrid import Kernel, RasterGrid, to_pixels

TOLERANCE = 1e-12  # GDAL's transformer error threshold in pixels: exact, so windows do not change values
# One warp per chunk in one go: GDAL's default 64 MB limit splits it, and a small block cache then re-reads the
# region's blocks for every piece (measured 0.39 s -> 0.17 s for a 1024² model chunk of a 4-band 5 m region).
WARP_MEMORY_MB = 256
GDAL_CACHE_MB = 128
_OUTLINE = 16  # points per edge of a chunk's outline carried into the source grid


def halo(scale: tuple[float, float]) -> int:
    """Source pixels read past a chunk's footprint: more than the kernel reaches (bilinear widens by 1/scale
    when coarsening), so every window sees everything its pixels use."""
    return int(math.ceil(2.0 / min(scale[0], scale[1], 1.0))) + 2


def source_window(src: RasterGrid, dst: RasterGrid, box: Sequence[tuple[int, int]], pad: int
                  ) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The ``src`` region [lo, hi) per (row, col) that the ``dst`` pixels of ``box`` read, or None when they
    fall outside ``src``: the box's outline carried into ``src`` pixels, plus ``pad``, clipped."""
    (y0, y1), (x0, x1) = box
    t = np.linspace(0.0, 1.0, _OUTLINE + 1)
    cols = np.concatenate([x0 + t * (x1 - x0), x0 + t * (x1 - x0), np.full_like(t, x0), np.full_like(t, x1)])
    rows = np.concatenate([np.full_like(t, y0), np.full_like(t, y1), y0 + t * (y1 - y0), y0 + t * (y1 - y0)])
    c, r = to_pixels(src, dst, cols, rows)
    ok = np.isfinite(c) & np.isfinite(r)
    if not ok.any():
        return None
    r0 = max(0, int(math.floor(r[ok].min())) - pad)
    r1 = min(src.height, int(math.ceil(r[ok].max())) + pad)
    c0 = max(0, int(math.floor(c[ok].min())) - pad)
    c1 = min(src.width, int(math.ceil(c[ok].max())) + pad)
    if r1 <= r0 or c1 <= c0:
        return None
    return (r0, r1), (c0, c1)


def _window_transform(grid: RasterGrid, row: int, col: int) -> Any:
    from affine import Affine

    return grid.affine * Affine.translation(col, row)


def _source_crs(grid: RasterGrid, transform: Any, width: int) -> Any:
    """The CRS a source region is warped from.  A geographic region that reaches past 180 E or 180 W gets
    PROJ's ``lon_wrap`` at its centre: GDAL's warper takes the longitudes PROJ gives, in [-180, 180], so the
    part of a scene over the antimeridian was never found (and labelled nodata).  Other regions keep the
    grid's own CRS, untouched."""
    from rasterio.crs import CRS

    crs = grid.gdal_crs()
    if grid.crs is None or not crs.is_geographic:
        return crs
    west, east = sorted((transform.c, transform.c + transform.a * width))
    if -180.0 <= west and east <= 180.0:
        return crs
    return CRS.from_proj4(f"{crs.to_proj4()} +lon_wrap={(west + east) / 2.0!r}")


def warp_block(region: np.ndarray, valid: np.ndarray | None, src: RasterGrid, src_at: tuple[int, int],
               dst: RasterGrid, dst_box: Sequence[tuple[int, int]], kernel: Kernel, scale: tuple[float, float],
               dtype: Any) -> np.ndarray:
    """One destination window from one source region (top-left at ``src_at``), with GDAL.

    ``valid`` (the region's mask) becomes an alpha band, so invalid pixels
    never contribute; destination pixels nothing valid reaches are 0.
    """
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.io import MemoryFile
    from rasterio.vrt import WarpedVRT

    (y0, y1), (x0, x1) = dst_box
    count = region.shape[0]
    work = np.float32 if kernel != "nearest" else region.dtype
    bands = region.astype(work, copy=False)
    if valid is not None:
        bands = np.concatenate([bands, (np.asarray(valid, dtype=bool) * 255).astype(work)[None]])
    extras = {"XSCALE": repr(float(scale[0])), "YSCALE": repr(float(scale[1]))}
    at = _window_transform(src, *src_at)
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), MemoryFile() as memfile:
        with memfile.open(driver="GTiff", width=bands.shape[2], height=bands.shape[1], count=bands.shape[0],
                          dtype=bands.dtype, crs=src.gdal_crs(), transform=at) as ds:
            ds.write(bands)
        with memfile.open() as ds, WarpedVRT(
                ds, src_crs=_source_crs(src, at, bands.shape[2]), crs=dst.gdal_crs(),
                transform=_window_transform(dst, y0, x0), width=x1 - x0, height=y1 - y0,
                resampling=getattr(Resampling, kernel), tolerance=TOLERANCE,
                src_alpha=count + 1 if valid is not None else 0, warp_mem_limit=WARP_MEMORY_MB, **extras) as vrt:
            out = vrt.read(indexes=list(range(1, count + 1)))
    return out.astype(dtype, copy=False)


__all__ = ["GDAL_CACHE_MB", "TOLERANCE", "WARP_MEMORY_MB", "halo", "source_window", "warp_block"]
