"""Labels on the way back from a separable warp, computed in full only near label boundaries.

The argmax of a convex combination of probability vectors that all share one
clear winner is that winner.  So the labels of a bilinear (or average) way
back from the model grid are the model grid's own labels wherever every model
pixel a destination pixel reads clearly agrees, and only the other pixels,
near boundaries or near ties, are interpolated: by the same arithmetic as
:func:`storage.separable.separable_block`, so the labels equal the argmax of
the full warp pixel for pixel (``tests/test_warp.py``).
"""

from __future__ import annotations

import numpy as np

from storage.argmax import argmax_first, argmax_top_two, cell_dtype, clear_labels
from storage.separable import (SeparableKernel, Taps, gather, keep_mask, outer_take, pixel_grid,
                               point_values, separable_block)

# The argmax of a convex combination of probability vectors that all share one clear winner is that winner (each
# difference p_c* - p_c is a non-negative combination of differences larger than TIE_MARGIN * max|p|; float64
# arithmetic and one float32 rounding move it by far less).  Where every contributing model pixel (weight > 0,
# valid) clearly has one label, that label is copied; the other pixels are computed alone by the same arithmetic as
# the full path, so the labels equal argmax_first of separable_block's values, pixel for pixel.


def separable_labels(region: np.ndarray, valid: np.ndarray | None, ty: Taps, tx: Taps, at: tuple[int, int],
                     kernel: SeparableKernel, dtype: np.dtype, empty: int = 0) -> np.ndarray:
    """``argmax_first(separable_block(...), empty)`` (first maximum wins; ``empty`` where nothing valid reaches
    a pixel), with values computed near boundaries only."""
    from storage.resample import FULL_FRACTION, TIE_MARGIN

    rows, cols = pixel_grid(ty, tx)
    cell = cell_dtype(region.shape[0])
    if kernel == "nearest":
        keep = keep_mask(ty, tx, rows, cols, valid, at, kernel, True)
        labels = gather(argmax_first(region, cell), ty.index[:, 0] - at[0], tx.index[:, 0] - at[1], True)
        return np.where(keep, labels, empty).astype(dtype, copy=False)
    probs = np.asarray(region, dtype=np.float32)
    mark = np.iinfo(cell).max
    # clear: no class but the top one within the margin; None: NaN or infinities, no margins to trust
    winner = clear_labels(probs, cell, TIE_MARGIN) if valid is None else _clear_valid(probs, valid, cell, TIE_MARGIN)
    if winner is None:
        return argmax_first(separable_block(region, valid, ty, tx, at, kernel, np.dtype(np.float32)), dtype,
                            empty or None)
    low = winner if valid is None else np.where(valid, winner, mark).astype(cell)  # invalid: never the minimum
    high = winner if valid is None else np.where(valid, winner, 0).astype(cell)  # ... nor the maximum
    # per destination pixel: the label its contributing source pixels all clearly have, else the mark
    same = _same_pairs(low, high, ty, tx, at, mark) if _pairs(ty) and _pairs(tx) else \
        _same(*_reduce(low, high, ty, tx, at, mark), mark)
    everywhere = valid is None and bool(ty.inside.all() and tx.inside.all())  # every pixel gets a value
    keep = None if everywhere else keep_mask(ty, tx, rows, cols, valid, at, kernel, True)
    todo = same == mark
    if keep is not None:
        todo &= keep
    if np.count_nonzero(todo) > FULL_FRACTION * todo.size:  # mostly boundary: the whole chunk is cheaper
        return argmax_first(separable_block(region, valid, ty, tx, at, kernel, np.dtype(np.float32)), dtype,
                            empty or None)
    labels = same.astype(dtype, copy=False)
    if keep is not None:
        labels = np.where(keep, labels, empty).astype(dtype, copy=False)
    flat = np.flatnonzero(todo)  # one index array: a third of np.nonzero's time on a 1024² chunk
    r, c = np.divmod(flat, todo.shape[1])
    if r.size:
        values = point_values(region, valid, ty, tx, at, kernel, r, c, False).astype(np.float32)
        labels[r, c] = argmax_first(values, cell, empty or None)
    return labels


def _clear_valid(probs: np.ndarray, valid: np.ndarray, cell: np.dtype, tie_margin: float) -> np.ndarray | None:
    """:func:`storage.argmax.clear_labels` with the margin and the finiteness taken over the valid pixels only (an
    invalid pixel's values, NaN nodata among them, never reach a destination pixel)."""
    if not np.isfinite(probs[:, valid]).all():
        return None
    first, top, second = argmax_top_two(probs, cell)
    floor = top - np.float32(tie_margin * float(np.abs(probs[:, valid]).max(initial=0)))
    return np.where(second < floor, first, np.iinfo(cell).max).astype(cell, copy=False)


def _pairs(taps: Taps) -> bool:
    """Whether every destination pixel's taps are two neighbouring source pixels (bilinear, refining), or the
    last source pixel alone (past the last centre GDAL takes it alone: its second tap repeats it with weight 0)."""
    if taps.index.shape[1] != 2:
        return False
    first, second = taps.index[:, 0], taps.index[:, 1]
    return bool(np.all((second == first + 1) | ((second == first) & (taps.weight[:, 1] == 0))))


def _same_pairs(low: np.ndarray, high: np.ndarray, ty: Taps, tx: Taps, at: tuple[int, int],
                mark: int) -> np.ndarray:
    """:func:`_same` of :func:`_reduce` when each destination pixel's taps are a 2 x 2 block of source pixels:
    the min and max over every 2 x 2 block of the (small) source region, compared there, then one gather per
    axis.  A tap of weight 0 counts here where :func:`_reduce` leaves it out, so a pixel can only lose its
    "uniform" mark and be computed in full instead: the labels are the same.  Measured 12 -> 3 ms for a
    1024² chunk at 2x against :func:`_reduce`.  A pixel whose taps are the region's last row (or column) alone
    reads a copy of it appended below (right): its block is that row's own pixels (the chunks along the scene's
    bottom and right edges, 15 of 64 at 8192², took :func:`_reduce` at 8 ms each before)."""
    rows, cols = ty.index[:, 0] - at[0], tx.index[:, 0] - at[1]
    if rows.size and int(rows.max()) >= low.shape[0] - 1:
        low, high = np.concatenate([low, low[-1:]], axis=0), np.concatenate([high, high[-1:]], axis=0)
    if cols.size and int(cols.max()) >= low.shape[1] - 1:
        low, high = np.concatenate([low, low[:, -1:]], axis=1), np.concatenate([high, high[:, -1:]], axis=1)
    lo = np.minimum(np.minimum(low[:-1, :-1], low[1:, :-1]), np.minimum(low[:-1, 1:], low[1:, 1:]))
    hi = np.maximum(np.maximum(high[:-1, :-1], high[1:, :-1]), np.maximum(high[:-1, 1:], high[1:, 1:]))
    block = np.where(lo == hi, lo, mark).astype(low.dtype, copy=False)
    return outer_take(block, {0: rows, 1: cols})


def _same(low: np.ndarray, high: np.ndarray, mark: int) -> np.ndarray:
    """The label where a destination pixel's min and max agree, ``mark`` elsewhere."""
    return np.where(low == high, low, mark).astype(low.dtype, copy=False)


def _reduce(low: np.ndarray, high: np.ndarray, ty: Taps, tx: Taps, at: tuple[int, int],
            mark: int) -> tuple[np.ndarray, np.ndarray]:
    """Per destination pixel, the min of ``low`` and max of ``high`` over its taps of non-zero weight."""
    for axis, taps, lo in ((0, ty, at[0]), (1, tx, at[1])):
        mn = mx = None
        for k in range(taps.index.shape[1]):
            w = taps.weight[:, k] > 0
            if not w.any():
                continue
            shape = (-1, 1) if axis == 0 else (1, -1)
            a = np.where(w.reshape(shape), np.take(low, taps.index[:, k] - lo, axis=axis), mark)
            b = np.where(w.reshape(shape), np.take(high, taps.index[:, k] - lo, axis=axis), 0)
            mn = a if mn is None else np.minimum(mn, a)
            mx = b if mx is None else np.maximum(mx, b)
        if mn is None:
            n = taps.index.shape[0]
            shape2 = (n, low.shape[1]) if axis == 0 else (low.shape[0], n)
            mn, mx = np.full(shape2, mark, low.dtype), np.zeros(shape2, high.dtype)
        low, high = mn.astype(low.dtype), mx.astype(high.dtype)
    return low, high


__all__ = ["separable_labels"]
