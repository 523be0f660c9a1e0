"""GDAL's warp kernels as per-axis weights: the fast warp between two north-up grids in one CRS.

When the input and the model share a CRS and both grids are north-up, the
map between them is separable: along each axis a destination pixel edge u
lands on the source at ``s(u) = offset + step * u`` (pixel-edge terms, what
GDAL's transformer computes from the two geotransforms).  Each kernel is then
a short list of (source index, weight) taps per destination row and per
destination column, reproducing what ``rasterio.warp.reproject`` (GDAL 3.x's
warp kernel) does on the whole image:

- ``average``: the source pixels a destination pixel covers, each weighted by
  the fraction of it that is covered (GDAL >= 3.1), floor/ceil with GDAL's
  1e-10 tolerance;
- ``bilinear`` at a scale >= 1 (GDAL's 4-sample formula, used when refining):
  the two source pixels around the destination pixel's centre (pixel-centre
  convention), the first one clamped at the left/top edge, a tap past the
  right/bottom edge dropped and the rest renormalised;
- ``nearest``: the source pixel containing the destination pixel's centre.

A destination pixel whose centre falls outside the source (bilinear, nearest)
or that covers no source pixel (average) gets nothing: 0.  Invalid source
pixels (a mask, GDAL's alpha band) get weight 0 and the weights are
renormalised: out = W(x * m) / W(m), computed in float64 as GDAL does, and
the result rounded once to float32.  GDAL also leaves a bilinear destination
pixel empty when the source pixel under its centre is invalid, or when the
valid taps' weights sum below 1e-5; average when no covered pixel is valid.
Every destination pixel's value depends only on its coordinates and the
source pixels its taps name, so any chunking gives the same values; the
tests hold it equal to whole-image ``reproject`` (with the mask as an alpha
band) to float rounding, bit for bit where the weights are exact (5 m <-> 10
m, 20 m <-> 10 m).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np


SeparableKernel = Literal["average", "bilinear", "nearest"]
EPSILON = 1e-10  # GDAL's tolerance on pixel coordinates before floor/ceil (gdalwarpkernel.cpp)
BILINEAR_MIN_DIVISOR = 1e-5  # GDAL leaves a bilinear pixel empty when its valid taps weigh less than this
SLAB = 32  # destination rows averaged at a time: their float64 arrays stay in cache (0.11 -> 0.07 s a chunk)
MEAN_SLAB = 64  # destination rows of a whole-cell mean at a time: 2048 source columns of float32 row sums, 512 kB


@dataclass(frozen=True)
class Taps:
    """Per destination pixel along one axis: up to K source indices and weights, and whether it gets a value.

    ``index`` and ``weight`` are (n, K); a padding tap has weight 0 and a
    valid index.  ``centre`` is the source pixel under the destination
    pixel's centre (bilinear, nearest: it must be valid), -1 where none.
    """

    index: np.ndarray
    weight: np.ndarray
    inside: np.ndarray
    centre: np.ndarray

    @property
    def lo(self) -> int:
        """The first source index any tap reads (the region to read starts here)."""
        return int(self.index.min()) if self.index.size else 0

    @property
    def hi(self) -> int:
        """One past the last source index any tap reads."""
        return int(self.index.max()) + 1 if self.index.size else 0


@dataclass(frozen=True)
class Axis:
    """One axis of a separable map: source pixel edge = ``origin_inv + (dst_origin + u * dst_step) * src_inv``.

    The terms are those of GDAL's geotransforms (the source's inverted), so
    the coordinates are computed in the same order and round the same way.
    """

    n_src: int
    dst_origin: float
    dst_step: float
    src_origin_inv: float
    src_step_inv: float

    @classmethod
    def between(cls, n_src: int, src_origin: float, src_step: float, dst_origin: float,
                dst_step: float) -> "Axis":
        return cls(n_src=n_src, dst_origin=dst_origin, dst_step=dst_step, src_origin_inv=-src_origin / src_step,
                   src_step_inv=1.0 / src_step)

    def source(self, u: np.ndarray) -> np.ndarray:
        """Destination pixel coordinates (edge convention) -> source pixel coordinates."""
        return self.src_origin_inv + (self.dst_origin + u * self.dst_step) * self.src_step_inv

    @property
    def ratio(self) -> float:
        """Source pixels per destination pixel."""
        return abs(self.dst_step * self.src_step_inv)

    def taps(self, kernel: SeparableKernel, start: int, stop: int) -> Taps:
        """The taps of destination pixels [start, stop), read-only: shared by every task of a process that asks
        for the same range (:func:`_cached_taps`)."""
        return _cached_taps(self, kernel, int(start), int(stop))

    def _taps(self, kernel: SeparableKernel, start: int, stop: int) -> Taps:
        u = np.arange(start, stop, dtype=np.float64)
        if kernel == "average":
            return self._average(u)
        return self._point(u, kernel)

    def _point(self, u: np.ndarray, kernel: SeparableKernel) -> Taps:
        n = self.n_src
        s = self.source(u + 0.5)
        centre = np.floor(s + EPSILON)
        inside = (s >= 0) & (centre < n)
        centre = np.where(inside, centre, -1).astype(np.int64)
        if kernel == "nearest":
            idx = np.clip(centre, 0, n - 1)[:, None]
            return Taps(idx, inside.astype(np.float64)[:, None], inside, centre)
        i0 = np.floor(s - 0.5)
        r = 1.5 - (s - i0)  # the first tap's weight
        first = i0 == -1  # left of the first pixel's centre: GDAL takes it alone
        i0 = np.where(first, 0.0, i0)
        r = np.where(first, 1.0, r)
        idx = np.stack([i0, i0 + 1], axis=1)
        w = np.stack([r, 1.0 - r], axis=1)
        ok = (idx >= 0) & (idx < n) & inside[:, None]
        w = np.where(ok, w, 0.0)
        idx = np.clip(idx, 0, n - 1).astype(np.int64)
        return Taps(idx, w, inside, centre)

    def _average(self, u: np.ndarray) -> Taps:
        n = self.n_src
        a, b = self.source(u), self.source(u + 1.0)
        lo_c, hi_c = np.minimum(a, b), np.maximum(a, b)
        i_min = np.maximum(np.floor(lo_c + EPSILON), 0.0)
        i_max = np.minimum(np.ceil(hi_c - EPSILON), float(n))
        i_max = np.where((i_min == i_max) & (i_max < n), i_max + 1, i_max)
        count = np.maximum(i_max - i_min, 0).astype(np.int64)
        k = max(1, int(count.max()) if count.size else 1)
        j = np.arange(k, dtype=np.float64)[None, :]
        idx = i_min[:, None] + j
        first = j == 0
        last = idx + 1 == i_max[:, None]
        w = np.where(first, np.where(i_min[:, None] + 1 == i_max[:, None], 1.0, 1.0 - (lo_c[:, None] - i_min[:, None])),
                     np.where(last, 1.0 - (i_max[:, None] - hi_c[:, None]), 1.0))
        used = j < count[:, None]
        w = np.where(used, w, 0.0)
        idx = np.clip(np.where(used, idx, i_min[:, None]), 0, max(n - 1, 0)).astype(np.int64)
        inside = count > 0
        return Taps(idx, w, inside, np.full(u.shape, -1, dtype=np.int64))


# --- values -----------------------------------------------------------------------------------------------------
#
# Every kernel below computes a set of destination pixels, named by row and column positions that broadcast: the
# whole chunk (rows (ny, 1), columns (1, nx)) or a list of pixels (both (N,)).  The arithmetic per pixel is the same
# either way, so a pixel computed alone equals the same pixel computed with its chunk, bit for bit: the labels' fast
# path relies on it.


@lru_cache(maxsize=256)
def _cached_taps(axis: Axis, kernel: SeparableKernel, start: int, stop: int) -> Taps:
    """:meth:`Axis.taps`, kept per (axis, kernel, range): a warp's tasks ask for the same few ranges again and again
    (one per chunk row or column; a way-back task re-made its taps from its box, 0.7-1.2 ms per 1024² chunk, 256
    times at 16384²).  The arrays are made read-only, so no caller can change another's."""
    taps = axis._taps(kernel, start, stop)
    for a in (taps.index, taps.weight, taps.inside, taps.centre):
        a.flags.writeable = False
    return taps


def _prepared(region: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """The region with invalid pixels zeroed (so NaN nodata never reaches a product, even one weighted 0)."""
    return region if valid is None else np.where(valid[None], region, 0).astype(region.dtype, copy=False)


def _take(a: np.ndarray, idx: np.ndarray, axis: int) -> np.ndarray:
    """``np.take`` along ``axis``, as a strided view (no copy) when ``idx`` steps evenly (integer ratios)."""
    idx = np.ravel(idx)
    if idx.size > 1:
        step = int(idx[1] - idx[0])
        if step > 0 and idx[-1] - idx[0] == step * (idx.size - 1) and np.all(np.diff(idx) == step):
            sl = [slice(None)] * a.ndim
            sl[axis] = slice(int(idx[0]), int(idx[-1]) + 1, step)
            return a[tuple(sl)]
    return np.take(a, idx, axis=axis)


def gather(data: np.ndarray, iy: np.ndarray, ix: np.ndarray, grid: bool) -> np.ndarray:
    """data[..., iy, ix]: the outer product (two takes, the fast way) for a grid, paired for a pixel list."""
    if grid:
        return outer_take(data, {data.ndim - 2: iy, data.ndim - 1: ix}, views=True)
    return data[..., iy, ix]


def outer_take(data: np.ndarray, indexes: dict[int, np.ndarray], views: bool = False) -> np.ndarray:
    """``data`` indexed along each given axis by its index array (an outer product: one take per axis): a new
    array, or with ``views`` possibly a view of ``data`` where indexes step evenly (for reading only).

    The order does not change the result, only the cost: axes that shrink first, then the others from the last
    axis to the first, so the last axis's element by element gather runs over the smallest array and the other
    axes' takes copy whole contiguous rows (a 514² label map taken to 1024² at 2x: 0.60-0.69 ms rows first,
    0.32 ms columns first)."""
    def cost(axis: int) -> tuple[bool, int]:
        return np.size(indexes[axis]) >= data.shape[axis], -axis
    take = _take if views else np.take
    out = data
    for axis in sorted(indexes, key=cost):
        out = take(out, np.ravel(indexes[axis]), axis=axis)
    return out if out is not data else data.copy()


def keep_mask(ty: Taps, tx: Taps, rows: np.ndarray, cols: np.ndarray, valid: np.ndarray | None,
          at: tuple[int, int], kernel: str, grid: bool) -> np.ndarray:
    """Destination pixels inside the source whose centre pixel is valid (nearest, bilinear: GDAL's rule)."""
    keep = ty.inside[rows] & tx.inside[cols]
    if valid is not None and kernel != "average":
        cy, cx = ty.centre[rows], tx.centre[cols]
        keep = keep & gather(valid, np.maximum(cy - at[0], 0), np.maximum(cx - at[1], 0), grid)
    return keep


def _average(data: np.ndarray, valid: np.ndarray | None, ty: Taps, tx: Taps, rows: np.ndarray, cols: np.ndarray,
             at: tuple[int, int], grid: bool) -> tuple[np.ndarray, np.ndarray]:
    """GDAL's average: a running weighted mean over the covered pixels, rows outer, columns inner (as
    gdalwarpkernel.cpp accumulates, mean += (v - mean) * (w / total)), and the total weight."""
    shape = np.broadcast_shapes(rows.shape, cols.shape)
    mean = np.zeros((data.shape[0], *shape))
    total = np.zeros(shape)
    for ky in range(ty.index.shape[1]):
        wy, iy = ty.weight[rows, ky], ty.index[rows, ky] - at[0]
        if not wy.any():
            continue
        for kx in range(tx.index.shape[1]):
            w = tx.weight[cols, kx] * wy
            ix = tx.index[cols, kx] - at[1]
            if valid is not None:
                w = np.where(gather(valid, iy, ix, grid), w, 0.0)
            if not w.any():
                continue
            total = total + w
            with np.errstate(invalid="ignore", divide="ignore"):
                f = np.where(w > 0, w / np.where(total > 0, total, 1.0), 0.0)
            for c in range(data.shape[0]):  # band by band: one band's arrays stay in cache
                step = gather(data[c], iy, ix, grid).astype(np.float64)
                step -= mean[c]
                step *= f
                mean[c] += step
    return mean, total


def _bilinear_rows(data: np.ndarray, ty: Taps, r0: int) -> np.ndarray:
    """The row pass of bilinear for every destination row: (C, ny, W) float64."""
    out = np.zeros((data.shape[0], ty.index.shape[0], data.shape[2]))
    for k in range(ty.index.shape[1]):
        w = ty.weight[:, k]
        if w.any():
            out += _take(data, ty.index[:, k] - r0, 1) * w[None, :, None]
    return out


def _bilinear_cols(partial: np.ndarray, tx: Taps, rows: np.ndarray, cols: np.ndarray, c0: int) -> np.ndarray:
    """The column pass of bilinear for a grid of pixels (rows, cols), from :func:`_bilinear_rows`."""
    shape = np.broadcast_shapes(rows.shape, cols.shape)
    out = np.zeros((partial.shape[0], *shape))
    for k in range(tx.index.shape[1]):
        w = tx.weight[cols, k]
        if w.any():
            ix = tx.index[cols, k] - c0
            out += _take(partial, ix, 2) * w
    return out


def _bilinear_grid(data: np.ndarray, ty: Taps, tx: Taps, rows: np.ndarray, cols: np.ndarray,
                   at: tuple[int, int]) -> np.ndarray:
    """Both passes over a grid of pixels: rows first for every column of the region, then columns."""
    return _bilinear_cols(_bilinear_rows(data, ty, at[0]), tx, rows, cols, at[1])


def _bilinear_points(data: np.ndarray, ty: Taps, tx: Taps, rows: np.ndarray, cols: np.ndarray,
                     at: tuple[int, int]) -> np.ndarray:
    """Both passes for a list of pixels, each reading only its own 2×2 taps (the labels' boundary pixels: a row
    pass over whole rows cost more than the rest of the way back).  The products and sums are those of
    :func:`_bilinear_grid`, in the same order (row taps summed from 0, then column taps), so a pixel computed
    here equals the same pixel computed with its chunk, bit for bit."""
    out = np.zeros((data.shape[0], *np.broadcast_shapes(rows.shape, cols.shape)))
    # gathered through flat indexes, one take per tap: 4.9 -> 2.6 ms for the ~20 000 boundary pixels of a 1024²
    # chunk of the demo model's labels (2-array fancy indexing before)
    flat, width, start = _flat_rows(data)
    row_at = [(ty.index[rows, ky] - at[0]) * width + start for ky in range(ty.index.shape[1])]
    for kx in range(tx.index.shape[1]):
        ix = tx.index[cols, kx] - at[1]
        part = np.zeros_like(out)
        for ky in range(ty.index.shape[1]):
            part += np.take(flat, row_at[ky] + ix, axis=1) * ty.weight[rows, ky]
        part *= tx.weight[cols, kx]
        out += part
    return out


def point_values(region: np.ndarray, valid: np.ndarray | None, ty: Taps, tx: Taps, at: tuple[int, int], kernel: str,
            rows: np.ndarray, cols: np.ndarray, grid: bool) -> np.ndarray:
    """float64 values of the pixels (rows, cols); 0 where GDAL writes nothing."""
    keep = keep_mask(ty, tx, rows, cols, valid, at, kernel, grid)
    if kernel == "nearest":
        iy, ix = ty.index[rows, 0] - at[0], tx.index[cols, 0] - at[1]
        return np.where(keep, gather(region, iy, ix, grid), 0).astype(np.float64)
    data = _prepared(region, valid)
    if kernel == "average":
        if not grid:
            value, total = _average(data, valid, ty, tx, rows, cols, at, grid)
            return np.where(keep & (total > 0), value, 0.0)
        out = np.empty((data.shape[0], *keep.shape))
        for y in range(0, keep.shape[0], SLAB):  # a slab of rows at a time: its float64 arrays stay in cache
            value, total = _average(data, valid, ty, tx, rows[y:y + SLAB], cols, at, grid)
            out[:, y:y + SLAB] = np.where(keep[y:y + SLAB] & (total > 0), value, 0.0)
        return out
    if not grid:
        return _bilinear(data, valid, ty, tx, rows, cols, at, keep, False)
    out = np.empty((data.shape[0], *keep.shape))
    for y in range(0, keep.shape[0], SLAB):  # a slab of rows at a time, as for average
        sl = slice(y, y + SLAB)
        slab = Taps(ty.index[sl], ty.weight[sl], ty.inside[sl], ty.centre[sl])
        out[:, sl] = _bilinear(data, valid, slab, tx, rows[:slab.index.shape[0]], cols, at, keep[sl], True)
    return out


def _bilinear(data: np.ndarray, valid: np.ndarray | None, ty: Taps, tx: Taps, rows: np.ndarray, cols: np.ndarray,
              at: tuple[int, int], keep: np.ndarray, grid: bool) -> np.ndarray:
    """GDAL's 4-sample bilinear, renormalised over the valid taps, for the pixels (rows, cols) of ``ty``/``tx``."""
    passes = _bilinear_grid if grid else _bilinear_points
    num = passes(data, ty, tx, rows, cols, at)
    if valid is None:
        den = ty.weight.sum(axis=1)[rows] * tx.weight.sum(axis=1)[cols]
    else:
        den = passes(valid[None].astype(np.float64), ty, tx, rows, cols, at)[0]
    keep = keep & (den >= BILINEAR_MIN_DIVISOR)
    # every pixel's weights sum to 1 (no mask, inside the source): num / 1 is num, bit for bit; skipping the
    # divide and both wheres took 2.06-2.26 -> 1.96-1.99 ms for a 1024² chunk's ~18,000 boundary pixels
    if keep.all() and np.all(den == 1.0):
        return num
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(keep, num / np.where(keep, den, 1.0), 0.0)


def _flat_rows(data: np.ndarray) -> tuple[np.ndarray, int, int]:
    """``data`` (C, H, W) as a (C, n) array in which pixel (y, x) is at ``start + y * pitch + x``: (array, pitch,
    start).  A sub-block of a C-contiguous (C', H', W') array (a way-back region cut from its block's region) is
    read through its base, without a copy; ``reshape`` copied the whole region for the few pixels a boundary
    reads (0.5 ms of a 514² x 5 float32 view), and ``np.take`` copies any array that is not contiguous."""
    c, h, w = data.shape
    if data.flags.c_contiguous:
        return data.reshape(c, -1), w, 0
    base = data.base
    if (isinstance(base, np.ndarray) and base.ndim == 3 and base.flags.c_contiguous and base.dtype == data.dtype
            and base.strides == data.strides):
        offset, rest = divmod(data.ctypes.data - base.ctypes.data, data.itemsize)
        plane = base.shape[1] * base.shape[2]
        k, start = divmod(offset, plane)
        if rest == 0 and k + c <= base.shape[0]:
            return base.reshape(base.shape[0], -1)[k:k + c], base.shape[2], start
    return np.ascontiguousarray(data).reshape(c, -1), w, 0


def pixel_grid(ty: Taps, tx: Taps) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(ty.index.shape[0])[:, None], np.arange(tx.index.shape[0])[None, :]


def separable_block(region: np.ndarray, valid: np.ndarray | None, ty: Taps, tx: Taps, at: tuple[int, int],
                    kernel: SeparableKernel, dtype: np.dtype) -> np.ndarray:
    """(C, ny, nx) destination values from a (C, H, W) source ``region`` whose top-left is source pixel ``at``.

    ``valid`` is the region's mask (None: all valid).  The region must hold
    every index the taps name (:func:`region_of`).
    """
    if kernel == "average" and valid is None:
        fast = _block_mean(region, ty, tx, at)
        if fast is not None:
            return fast.astype(dtype, copy=False)
    rows, cols = pixel_grid(ty, tx)
    return point_values(region, valid, ty, tx, at, kernel, rows, cols, True).astype(dtype, copy=False)


def _cells(taps: Taps) -> int | None:
    """k when every destination pixel along the axis averages k whole source pixels, the next k after its
    neighbour's (an integer ratio, aligned grids, nothing past the source's edge); None otherwise."""
    k = int(np.count_nonzero(taps.weight[0])) if taps.weight.size else 0
    if k < 1 or taps.index.shape[1] < k or not taps.inside.all():
        return None
    if np.any(taps.weight[:, :k] != 1.0) or np.any(taps.weight[:, k:] != 0.0):
        return None
    first = taps.index[:, 0]
    if np.any(taps.index[:, :k] != first[:, None] + np.arange(k)) or np.any(np.diff(first) != k):
        return None
    return k


def _block_mean(region: np.ndarray, ty: Taps, tx: Taps, at: tuple[int, int]) -> np.ndarray | None:
    """``average`` over whole k_y × k_x cells of integers, as strided sums: float32, or None when not exact.

    GDAL's running mean (float64, one division per tap) lands within a few
    float64 ulps of the true mean S / (k_y k_x).  When that mean is exact in
    float32 (k_y k_x a power of two and S < 2**24: uint8, int8, uint16 and
    int16 up to 256 pixels a cell), rounding GDAL's value to float32 gives it
    exactly, and so does an exact sum scaled by a power of two.
    Measured 0.16 -> 0.02 s for a 1024² model chunk of a 4-band uint16 5 m
    region (the warp's largest cost after reading).  Every partial sum is an
    integer below 2**24, so float32 holds it exactly: a slab of
    :data:`MEAN_SLAB` destination rows of one band at a time sums its
    contiguous source rows first, then every k_x columns straight into the
    output, in a buffer made once (whole-region float32 temporaries took fresh
    pages for every region: 24.8-36.1 -> 18.1-19.5 ms for a 4 × 2564² uint16
    region; summing columns first, in uint32, took 10.8-11.2 ms for a
    4 × 2048² region against 7.3-7.8 ms this way).
    """
    if region.dtype.kind not in "ui" or region.dtype.itemsize > 2:
        return None
    ky, kx = _cells(ty), _cells(tx)
    if ky is None or kx is None:
        return None
    cells = ky * kx
    top = max(abs(int(np.iinfo(region.dtype).min)), int(np.iinfo(region.dtype).max))
    if cells & (cells - 1) or cells * top >= 2 ** 24:
        return None
    ny, nx = ty.index.shape[0], tx.index.shape[0]
    r0, c0 = int(ty.index[0, 0]) - at[0], int(tx.index[0, 0]) - at[1]
    scale = np.float32(1.0 / cells)
    out = np.empty((region.shape[0], ny, nx), np.float32)
    rows = np.empty((MEAN_SLAB, nx * kx), np.float32)  # row sums of a slab's source rows
    for c in range(region.shape[0]):
        for y in range(0, ny, MEAN_SLAB):
            h = min(MEAN_SLAB, ny - y)
            sub = region[c, r0 + y * ky:r0 + (y + h) * ky, c0:c0 + nx * kx]
            part, whole = rows[:h], out[c, y:y + h]
            _strided_sum(sub, ky, 0, part)
            _strided_sum(part, kx, 1, whole)
            whole *= scale
    return out


def _strided_sum(a: np.ndarray, k: int, axis: int, out: np.ndarray) -> None:
    """``out`` = the sum of every ``k`` neighbouring entries of ``a`` along ``axis`` (2-D), by strided adds."""
    def part(j: int) -> np.ndarray:
        return a[j::k] if axis == 0 else a[:, j::k]
    if k == 1:
        np.copyto(out, a, casting="unsafe")
        return
    np.add(part(0), part(1), out=out, dtype=out.dtype)
    for j in range(2, k):
        np.add(out, part(j), out=out, dtype=out.dtype)


def destination_valid(valid: np.ndarray | None, ty: Taps, tx: Taps, at: tuple[int, int],
                      kernel: SeparableKernel = "nearest") -> np.ndarray:
    """The destination's mask, GDAL's for ``kernel``'s taps: with nearest taps, inside the source and the source
    pixel under the centre valid; with average taps, some covered source pixel valid (GDAL's average gives such a
    pixel the mean of its valid ones)."""
    rows, cols = pixel_grid(ty, tx)
    keep = keep_mask(ty, tx, rows, cols, valid, at, kernel, True)
    if kernel != "average" or valid is None:
        return keep
    covered = separable_block(valid[None].astype(np.float32), None, ty, tx, at, "average", np.float32)[0]
    return keep & (covered > 0)


def region_of(*taps: tuple[Taps, Taps]) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The source region [lo, hi) per (row, col) every (rows, cols) pair of taps reads; None when none is inside."""
    if not any(ty.inside.any() and tx.inside.any() for ty, tx in taps):
        return None
    return ((min(ty.lo for ty, _ in taps), max(ty.hi for ty, _ in taps)),
            (min(tx.lo for _, tx in taps), max(tx.hi for _, tx in taps)))


__all__ = ["Axis", "SeparableKernel", "Taps", "destination_valid", "gather", "keep_mask", "outer_take",
           "pixel_grid", "point_values", "region_of", "separable_block"]
