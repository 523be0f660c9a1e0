"""Where each band of a stacked raster has data: a pixel is valid only where every band the model needs does.

A STAC item's bands are separate files, and nothing makes them cover the same
ground: a 20 m band may stop half-way across the 10 m ones, or mark a cloud
with its own nodata.  GDAL's dataset mask of the stacking VRT calls a pixel
valid when *any* band is (and a band with no nodata of its own reads 0 past
its file's edge, valid), so the model was fed zeros for the missing band and
labelled them, with nothing to say so.  A model needs all of its channels, so
for a stack the rule is the opposite of GDAL's: valid where the pixel's
centre is inside every band's file and no band holds its nodata value.

One file of many bands with one nodata value (:func:`with_bands_mask`): an
8-bit image keeps GDAL's rule, which is right there (a pure red pixel of an RGB
image with nodata 0 holds 0 in two of its bands), over the bands the model
reads; wider pixels (the 16-bit digital numbers of Sentinel-2 and Landsat,
which reserve 0 for no data, and floats, whose NaN already counted per band)
take the stack's rule over the model's bands.  A model was fed a band's nodata
where only that band was empty (at a swath's edge each band's detectors stop at
their own place; a 4-band scene whose nir alone held 0 in a box was labelled
water and built-up there).  Ingest records whether any pixel holds nodata in
some bands but not all (:data:`PARTIAL_ATTR`); where none does, nothing more is
computed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import zarr
from rasterio.windows import Window

from storage.layout import ARRAY_CONFIG, COMPLETE_ATTR, MASK, ImageStore, image_compressors

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


PARTIAL_ATTR = "segflow_partial_nodata"  # an ingested store's: does some pixel hold nodata in some bands only?


def in_dtype(nodata: float, dtype: np.dtype | None) -> float:
    """A nodata value as pixels of ``dtype`` hold it: a float32 scene's 0.1 is float32(0.1), not the double 0.1,
    which no float32 pixel equals."""
    if dtype is None or np.dtype(dtype).kind != "f":
        return nodata
    with np.errstate(over="ignore"):
        return np.dtype(dtype).type(nodata)


class PartialNodata:
    """GDAL's nodata rule for a file's one nodata value (valid where any band differs from it), which also
    watches for pixels holding it in some bands but not in all: one comparison of the pixels for both."""

    def __init__(self, nodata: float, dtype: np.dtype | None = None) -> None:
        self.nodata, self.found = nodata, False
        self.value = in_dtype(nodata, dtype)  # compared in the pixels' dtype, as GDAL compares (0.1 in float32)

    def valid(self, data: np.ndarray) -> np.ndarray:
        filled = ~np.isnan(data) if math.isnan(self.nodata) else data != self.value
        valid = filled.any(axis=0)
        if not self.found:
            self.found = bool((valid & ~filled.all(axis=0)).any())
        return valid


def with_bands_mask(store: ImageStore, bands: Sequence[int]) -> ImageStore:
    """``store`` read through the mask of the bands a model takes (0-based), where ingest found pixels holding
    the file's nodata in some bands only: valid where, over ``bands``, some band (8-bit pixels) or every band
    (wider ones) differs from nodata and is finite; a NaN in a band the model does not take no longer hides a
    pixel.  Made once per set of bands, beside the file's own mask in the ingested store, and found there again
    by a resumed run."""
    geometry = store.meta.geometry
    nodata = getattr(geometry, "nodata", None)
    wanted = sorted({int(b) for b in bands})
    mask = store.mask
    every = np.dtype(store.image.dtype).itemsize > 1
    if mask is None or nodata is None or not store.group.attrs.get(PARTIAL_ATTR, False) or \
            (wanted == list(range(int(store.image.shape[0]))) and not (every and len(wanted) > 1)):
        return store
    name = f"{MASK}-{'every' if every else 'any'}-of-bands-{'-'.join(str(b) for b in wanted)}"
    if name in store.group and store.group[name].attrs.get(COMPLETE_ATTR):
        return replace(store, mask_name=name)
    image = store.image
    writable = zarr.open_group(str(store.path), mode="r+", zarr_format=3)  # an ingested store is opened read-only
    target = writable.create_array(name, shape=mask.shape, dtype="bool", chunks=mask.chunks, fill_value=False,
                                      compressors=image_compressors(), config=ARRAY_CONFIG, overwrite=True,
                                      dimension_names=mask.metadata.dimension_names)

    def one(block: tuple[slice, ...]) -> None:  # the file's mask came from the same rule over all its bands
        data = image.oindex[(wanted, *block)]
        filled = np.isfinite(data) if data.dtype.kind == "f" else np.ones(data.shape, bool)
        if not math.isnan(nodata):
            filled &= data != in_dtype(nodata, data.dtype)
        target[block] = filled.all(axis=0) if every else filled.any(axis=0)

    blocks = [tuple(slice(s, s + c) for s, c in zip(start, mask.chunks))
              for start in itertools.product(*(range(0, n, c) for n, c in zip(mask.shape, mask.chunks)))]
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="segflow-bands-mask") as pool:
        list(pool.map(one, blocks))
    target.attrs[COMPLETE_ATTR] = True
    return replace(store, mask_name=name)


__all__ = ["BandCover", "PARTIAL_ATTR", "PartialNodata", "needs_mask", "stack_valid", "with_bands_mask"]
