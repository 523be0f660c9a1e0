"""Where each band of a stacked raster has data: a pixel is valid only where every band the model needs does.

A STAC item's bands are separate files, and nothing makes them cover the same
ground: a 20 m band may stop half-way across the 10 m ones, or mark a cloud
with its own nodata.  GDAL's dataset mask of the stacking VRT calls a pixel
valid when *any* band is (and a band with no nodata of its own reads 0 past
its file's edge, valid), so the model was fed zeros for the missing band and
labelled them, with nothing to say so.  A model needs all of its channels, so
for a stack the rule is the opposite of GDAL's: valid where the pixel's
centre is inside every band's file and no band holds its nodata value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rasterio.windows import Window

EDGE = 1e-9  # a band's rectangle this close past a stack pixel's edge covers it (float DstRect arithmetic)


@dataclass(frozen=True)
class BandCover:
    """One band of a stack: its file's rectangle on the stack's grid (pixels, may be fractional) and its nodata."""

    x0: float
    y0: float
    width: float
    height: float
    nodata: float | None = None

    def covers_all(self, height: int, width: int) -> bool:
        return self.x0 <= EDGE and self.y0 <= EDGE and self.x0 + self.width >= width - EDGE and \
            self.y0 + self.height >= height - EDGE

    def inside(self, win: Window) -> np.ndarray:
        """(rows, cols) of the window whose pixel centres fall inside the band's rectangle."""
        rows = np.arange(int(win.row_off), int(win.row_off + win.height)) + 0.5
        cols = np.arange(int(win.col_off), int(win.col_off + win.width)) + 0.5
        in_rows = (rows >= self.y0 - EDGE) & (rows < self.y0 + self.height + EDGE)
        in_cols = (cols >= self.x0 - EDGE) & (cols < self.x0 + self.width + EDGE)
        return in_rows[:, None] & in_cols[None, :]


def needs_mask(covers: Sequence[BandCover] | None, height: int, width: int) -> bool:
    """Whether some band leaves a pixel of the stack out (a partial file, or a nodata value to look for)."""
    return covers is not None and any(c.nodata is not None or not c.covers_all(height, width) for c in covers)


def stack_valid(covers: Sequence[BandCover], win: Window, data: np.ndarray, height: int, width: int) -> np.ndarray:
    """Valid pixels of ``data`` (bands, rows, cols; the window ``win`` of a ``height`` x ``width`` stack): inside
    every band's file and, for a band with a nodata value, not that value (NaN nodata: not NaN)."""
    valid = np.ones(data.shape[1:], dtype=bool)
    for band, cover in zip(data, covers):
        if not cover.covers_all(height, width):
            valid &= cover.inside(win)
        if cover.nodata is not None:
            valid &= ~np.isnan(band) if math.isnan(cover.nodata) else band != cover.nodata
    return valid


__all__ = ["BandCover", "needs_mask", "stack_valid"]
