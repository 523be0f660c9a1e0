"""Chunked resampling of (C, K, J, I) dask arrays between an input grid and a model grid.

``to_model`` and ``to_input`` apply a ``storage.grids.GridMapping`` lazily.
The orientation part is a view (a transpose and reversed slices, never an
interpolation).  The spacing part is separable: along each axis an output
index ``m`` samples the source at ``offset + scale * m`` with linear (or
nearest) interpolation and border padding, as MONAI's ``grid_sample`` does.
Every output chunk is one task that reads only the source region its
footprint maps to, plus one voxel for the linear kernel, and interpolates it
in float32 with 1-D gather-and-lerp passes, one axis at a time, the most
shrinking axis first and the most expanding last (the order is the
mapping's, not the chunk's), so memory is one output chunk plus its source
region and the values do not depend on how either side is chunked.
"""

from __future__ import annotations

from itertools import product
from operator import getitem
from typing import Literal, Sequence

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from storage.argmax import argmax_first, cell_dtype, clear_labels
from storage.grids import GridMapping, monai_source_coords, sampling_thetas
from storage.separable import outer_take

Mode = Literal["bilinear", "nearest"]


class _Axis:
    """One storage axis of a resampling step: how its output indices read its (already oriented) source."""

    def __init__(self, n_in: int, n_out: int, copy: bool, theta: tuple[float, float]) -> None:
        self.n_in, self.n_out, self.theta = n_in, n_out, theta
        self.copy = copy and n_in == n_out

    def coords(self, start: int, stop: int) -> np.ndarray:
        """Clamped (border-padded) source coordinates of output indices start..stop-1."""
        x = monai_source_coords(np.arange(start, stop), self.n_in, self.n_out, self.theta)
        return np.clip(x, 0.0, self.n_in - 1.0)

    def region(self, start: int, stop: int, mode: Mode) -> tuple[int, int]:
        """Source index range [lo, hi) that output indices start..stop-1 read."""
        if self.copy:
            return start, stop
        x = self.coords(start, stop)
        if mode == "nearest":
            idx = np.rint(x).astype(np.int64)
            return int(idx.min()), int(idx.max()) + 1
        lo = int(np.floor(x.min()))
        return lo, min(int(np.floor(x.max())) + 2, self.n_in)


def _weights(ax: _Axis, start: int, stop: int, lo: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Region-local gather indices (i0, i1) and float32 weights (w0, w1) of outputs start..stop-1.

    The coordinates are MONAI's, computed in float64 as before; only the
    weights are rounded to float32, where the interpolation then runs.
    """
    x = ax.coords(start, stop)
    f = np.floor(x)
    w1 = (x - f).astype(np.float32)  # grid_sample's weights: (i0 + 1 - x) and (x - i0)
    w0 = ((f + 1.0) - x).astype(np.float32)
    i0 = f.astype(np.int64)
    i1 = np.minimum(i0 + 1, ax.n_in - 1)
    return i0 - lo, i1 - lo, w0, w1


def _lerp(a: np.ndarray, b: np.ndarray, w0: np.ndarray, w1: np.ndarray) -> np.ndarray:
    """``a * w0 + b * w1`` in float32, each product and the sum rounded once, as every path here does it."""
    if a.dtype == np.float32 and b.dtype == np.float32:
        a *= w0
        b *= w1
        a += b
        return a
    out = np.multiply(a, w0, dtype=np.float32)
    out += np.multiply(b, w1, dtype=np.float32)
    return out


def _resample_axis(block: np.ndarray, axis: int, ax: _Axis, start: int, stop: int, lo: int, mode: Mode) -> np.ndarray:
    """One 1-D pass: gather the source samples of outputs start..stop-1 along ``axis`` and interpolate."""
    if ax.copy:
        return block
    if mode == "nearest":
        return np.take(block, np.rint(ax.coords(start, stop)).astype(np.int64) - lo, axis=axis)
    i0, i1, w0, w1 = _weights(ax, start, stop, lo)
    shape = [1] * block.ndim
    shape[axis] = -1
    return _lerp(np.take(block, i0, axis=axis), np.take(block, i1, axis=axis), w0.reshape(shape), w1.reshape(shape))


def _pass_order(axes: Sequence[_Axis]) -> list[int]:
    """Storage axes in the order their passes run: the most-shrinking first, the most-expanding last.

    Every pass costs the size of what it writes, so shrinking early and
    expanding late keeps the intermediates small.  The order depends on the
    mapping alone, never on a chunk, so values stay independent of chunking.
    """
    def step(s: int) -> float:  # source voxels per output voxel
        ax = axes[s]
        return abs(ax.theta[0]) * ax.n_in / max(ax.n_out, 1)
    return sorted((s for s in range(len(axes)) if not axes[s].copy), key=lambda s: (-step(s), s))


def _as_float32_source(src: np.ndarray) -> np.ndarray:
    """Sources that float32 holds exactly stay as they are (the first pass converts); others become float32."""
    return src if np.can_cast(src.dtype, np.float32, casting="safe") else np.asarray(src, dtype=np.float32)


def _resample_block(src: np.ndarray, axes: Sequence[_Axis], out_ranges: Sequence[tuple[int, int]],
                    src_lo: Sequence[int], mode: Mode, dtype: np.dtype) -> np.ndarray:
    """An output chunk from its source region, one separable float32 pass per axis, cheapest order first."""
    if all(a.copy for a in axes):
        return src.astype(dtype, copy=False)
    block = src if mode == "nearest" else _as_float32_source(src)
    for s in _pass_order(axes):
        block = _resample_axis(block, s + 1, axes[s], *out_ranges[s], src_lo[s], mode)
    return block.astype(dtype, copy=False)


# --- labels of the way back ------------------------------------------------------------------------------------------
#
# The argmax of a bilinear interpolation is, wherever the 2^3 model voxels around an input voxel all have the
# same clear winner, that winner: each class difference p_c* - p_c is a non-negative combination of differences
# that are all larger than TIE_MARGIN * max|p| at the corners, and the float32 passes (three lerps, each product
# and sum rounded once) move a difference by at most about 12 * 2^-24 * max|p|, far less than that margin.  So the
# label is copied there.  The other voxels, near label boundaries or near ties, get the separable passes but the
# last (the most expanding, the dearest) over the region, then the last pass's lerp for them alone, with the same
# operands, weights and order: their values, and so the labels, equal the full path's bit for bit.

TIE_MARGIN = 2.0 ** -16  # a top class closer than this (times the region's max |p|) to another counts as a tie
FULL_FRACTION = 0.2  # above this share of non-uniform cells, the separable passes over the whole chunk are cheaper


def _uniform_cells(region: np.ndarray, order: Sequence[int], dtype: np.dtype) -> np.ndarray | None:
    """Per model voxel r (along each interpolated axis the cell from r to r + 1, clamped at the region's end):
    the label its corners all clearly share, or the dtype's maximum where they do not; None where a value is not
    finite (no margins to trust)."""
    mark = np.iinfo(dtype).max
    cells = clear_labels(region, dtype, TIE_MARGIN)  # clear: no class but the top one within the margin
    if cells is None:
        return None
    for s in order:
        n = cells.shape[s]
        upper = np.take(cells, np.minimum(np.arange(n) + 1, n - 1), axis=s)
        cells = np.where(cells == upper, cells, mark).astype(dtype, copy=False)
    return cells


def _interpolate_points(partial: np.ndarray, last: int, todo: np.ndarray, out_shape: Sequence[int],
                        gather: tuple[np.ndarray, ...]) -> np.ndarray:
    """(C, N) float32 values of N output voxels, bit for bit what the separable passes give them.

    ``partial`` is the region after every pass but the ``last`` (the most
    expanding, the dearest): it has the output's shape except along ``last``.
    ``todo`` are the voxels' flat indices in the output chunk of ``out_shape``
    and ``gather`` the last axis's (i0, i1, w0, w1).  Only the last pass's lerp
    runs, on those voxels alone, with the same operands and weights.
    """
    inner = int(np.prod(out_shape[last + 1:], dtype=np.int64))
    outer, rest = np.divmod(todo, out_shape[last] * inner)
    m, low = np.divmod(rest, inner)
    base = outer * (partial.shape[last + 1] * inner) + low
    flat = partial.reshape(partial.shape[0], -1)
    i0, i1, w0, w1 = (g[m] for g in gather)
    return _lerp(np.take(flat, base + i0 * inner, axis=1), np.take(flat, base + i1 * inner, axis=1), w0, w1)


def _argmax_block(src: np.ndarray, axes: Sequence[_Axis], out_ranges: Sequence[tuple[int, int]],
                  src_lo: Sequence[int], mode: Mode, dtype: np.dtype) -> np.ndarray:
    """The labels of one output chunk: ``argmax_first(_resample_block(...))``, computed cheaply.

    Nearest: the label of the nearest voxel, gathered.  Bilinear: the shared
    label where a voxel's interpolation cell is uniform (:func:`_uniform_cells`),
    the argmax of the interpolated values elsewhere.
    """
    region = np.asarray(src, dtype=np.float32)  # what the passes compute in (exact for float32 probabilities)
    order = _pass_order(axes)
    cells_dtype = cell_dtype(region.shape[0])
    if mode == "nearest":
        labels = outer_take(argmax_first(region, cells_dtype),
                            {s: np.rint(axes[s].coords(*out_ranges[s])).astype(np.int64) - src_lo[s] for s in order})
        return labels.astype(dtype, copy=False)
    labels = _uniform_cells(region, order, cells_dtype) if order else None
    if labels is None:  # nothing to interpolate, or NaN/inf: no margins to trust
        return argmax_first(_resample_block(region, axes, out_ranges, src_lo, mode, np.dtype(np.float32)), dtype)
    gathers: list[tuple[np.ndarray, ...]] = []
    for s in range(3):
        start, stop = out_ranges[s]
        if s in order:
            gathers.append(_weights(axes[s], start, stop, src_lo[s]))
        else:
            gathers.append((np.arange(start, stop) - src_lo[s],))
    if np.count_nonzero(labels == np.iinfo(cells_dtype).max) > FULL_FRACTION * labels.size:  # mostly boundary
        return argmax_first(_resample_block(region, axes, out_ranges, src_lo, mode, np.dtype(np.float32)), dtype)
    labels = outer_take(labels, {s: gathers[s][0] for s in range(3)})
    todo = np.flatnonzero(labels == np.iinfo(cells_dtype).max)
    if todo.size:
        partial = region
        for s in order[:-1]:
            partial = _resample_axis(partial, s + 1, axes[s], *out_ranges[s], src_lo[s], mode)
        values = _interpolate_points(partial, order[-1], todo, labels.shape, gathers[order[-1]])
        labels.reshape(-1)[todo] = argmax_first(values, cells_dtype)
    return labels.astype(dtype, copy=False)


def _normalise_chunks(chunks: int | Sequence[int] | None, default: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    if chunks is None:
        sizes = list(default)
    elif isinstance(chunks, (int, np.integer)):
        sizes = [int(chunks)] * 3
    else:
        sizes = [int(c) for c in chunks]
        if len(sizes) == 4:  # (C, K, J, I) given: the channel axis always stays one chunk
            sizes = sizes[1:]
    if len(sizes) != 3 or any(c < 1 for c in sizes):
        raise ValueError(f"chunks must be one or three positive spatial sizes, got {chunks!r}")
    return tuple(min(c, max(n, 1)) for c, n in zip(sizes, shape))


def _bounds(n: int, c: int) -> list[tuple[int, int]]:
    return [(s, min(s + c, n)) for s in range(0, n, c)]


def _flipped(bounds: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """The chunk bounds that become ``bounds`` once the axis is reversed."""
    return [(n - b, n - a) for a, b in reversed(bounds)]


def _resample(source: da.Array, axes: Sequence[_Axis], per_axis: Sequence[list[tuple[int, int]]], mode: Mode,
              dtype: np.dtype, *, argmax: bool = False) -> da.Array:
    """Build the graph: one task per output chunk, fed by exactly the source region it maps to.

    The region is cut from the source chunks it overlaps and assembled inside
    the task, so a task holds its region, its output chunk and nothing else.
    With ``argmax`` the output drops the leading axis: the task returns the
    labels of its chunk (:func:`_argmax_block`), not the interpolated values.
    """
    n_ch = source.shape[0]
    spatial = tuple(tuple(b - a for a, b in bounds) for bounds in per_axis)
    out_chunks = spatial if argmax else ((n_ch,), *spatial)
    if all(a.copy for a in axes) and not argmax:
        return source.astype(dtype).rechunk(out_chunks)
    source = source.rechunk({0: n_ch})  # all channels of a region together: a chunk is classes x volume
    edges = [np.cumsum((0, *c)) for c in source.chunks[1:]]
    token = tokenize(source.name, [(a.n_in, a.n_out, a.copy, a.theta) for a in axes], per_axis, mode, str(dtype),
                     argmax)
    name = f"{'resample-argmax' if argmax else 'resample'}-{token}"
    dsk: dict = {}
    for idx in product(*(range(len(b)) for b in per_axis)):
        ranges = [per_axis[s][idx[s]] for s in range(3)]
        regions = [axes[s].region(*ranges[s], mode) for s in range(3)]
        touched = [range(int(np.searchsorted(e, lo, side="right")) - 1, int(np.searchsorted(e, hi, side="left")))
                   for e, (lo, hi) in zip(edges, regions)]
        parts, places = [], []
        for chunk in product(*touched):
            local, place = [slice(None)], [slice(None)]
            for s, c in enumerate(chunk):
                lo, hi = max(regions[s][0], int(edges[s][c])), min(regions[s][1], int(edges[s][c + 1]))
                local.append(slice(lo - int(edges[s][c]), hi - int(edges[s][c])))
                place.append(slice(lo - regions[s][0], hi - regions[s][0]))
            parts.append((getitem, (source.name, 0, *chunk), tuple(local)))  # run inside the task
            places.append(tuple(place))
        region_shape = (n_ch, *(hi - lo for lo, hi in regions))
        key = (name, *idx) if argmax else (name, 0, *idx)
        dsk[key] = (_region_task, parts, places, region_shape, source.dtype, list(axes), ranges,
                    [lo for lo, _ in regions], mode, dtype, argmax)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[source])
    return da.Array(graph, name, chunks=out_chunks, dtype=dtype)


def _region_task(parts: list[np.ndarray], places: list[tuple[slice, ...]], shape: tuple[int, ...],
                 src_dtype: np.dtype, axes: Sequence[_Axis], ranges: Sequence[tuple[int, int]],
                 src_lo: Sequence[int], mode: Mode, dtype: np.dtype, argmax: bool = False) -> np.ndarray:
    """Assemble a source region from its pieces, then resample it into one output chunk (or its labels)."""
    if len(parts) == 1 and parts[0].shape == shape:
        region = np.asarray(parts[0])
    else:
        region = np.empty(shape, dtype=src_dtype)
        for part, place in zip(parts, places):
            region[place] = part
    if argmax:
        return _argmax_block(region, axes, ranges, src_lo, mode, dtype)
    return _resample_block(region, axes, ranges, src_lo, mode, dtype)


def _check(image: da.Array, shape: Sequence[int], what: str) -> da.Array:
    image = da.asarray(image)
    if image.ndim != 4 or tuple(image.shape[1:]) != tuple(shape):
        raise ValueError(f"{what} must be (C, {', '.join(map(str, shape))}), got {image.shape}")
    return image


def _mode(mode: str) -> Mode:
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    return mode  # type: ignore[return-value]


def to_model(image: da.Array, mapping: GridMapping, *, chunks: int | Sequence[int] | None = None,
             mode: Literal["bilinear", "nearest"] = "bilinear", dtype=np.float32) -> da.Array:
    """(C, K, J, I) on the input grid -> (C, K', J', I') on the model grid, lazily, as MONAI's
    ``Orientationd`` + ``Spacingd`` would.  ``chunks`` are the output's spatial chunk sizes
    (default: the input's chunk sizes of the axes they read)."""
    mode = _mode(mode)
    image = _check(image, mapping.input_shape, "image")
    dtype = np.dtype(dtype)
    # Orientation as a view: transpose to the model's axis order, then reverse the flipped axes.
    oriented = image.transpose(0, *(a.source_axis + 1 for a in mapping.axes))
    oriented = oriented[(slice(None), *(slice(None, None, -1) if a.flip else slice(None) for a in mapping.axes))]
    thetas = sampling_thetas(mapping)
    axes = [_Axis(oriented.shape[s + 1], a.size, a.is_copy, thetas[s]) for s, a in enumerate(mapping.axes)]
    default = [image.chunksize[a.source_axis + 1] for a in mapping.axes]
    out_chunks = _normalise_chunks(chunks, default, mapping.model_shape)
    return _resample(oriented, axes, [_bounds(n, c) for n, c in zip(mapping.model_shape, out_chunks)], mode, dtype)


def _inverse(probs: da.Array, mapping: GridMapping, chunks: int | Sequence[int] | None,
             ) -> tuple[da.Array, list[_Axis], list[list[tuple[int, int]]], dict[int, int]]:
    """The way back's set-up: axes, and output chunk bounds on the oriented grid that land on the input's
    chunks once the orientation view is undone (the flipped axes' bounds reversed)."""
    probs = _check(probs, mapping.model_shape, "probabilities")
    oriented_shape = mapping.oriented_shape
    thetas = sampling_thetas(mapping, inverse=True)
    axes = [_Axis(a.size, oriented_shape[s], a.is_copy, thetas[s]) for s, a in enumerate(mapping.axes)]
    inv = {a.source_axis: s for s, a in enumerate(mapping.axes)}
    default = [probs.chunksize[inv[t] + 1] for t in range(3)]
    in_chunks = _normalise_chunks(chunks, default, mapping.input_shape)
    bounds = []
    for s, a in enumerate(mapping.axes):
        n = oriented_shape[s]
        regular = _bounds(n, in_chunks[a.source_axis])
        bounds.append(_flipped(regular, n) if a.flip else regular)
    return probs, axes, bounds, inv


def to_input(probs: da.Array, mapping: GridMapping, *, chunks: int | Sequence[int] | None = None,
             mode: Literal["bilinear", "nearest"] = "bilinear") -> da.Array:
    """(N, K', J', I') on the model grid -> (N, K, J, I) on the input grid, float32, as MONAI's
    ``Invertd`` undoes ``Spacingd`` (``nearest_interp=False``: bilinear; ``True``: nearest) and then
    ``Orientationd``.  ``chunks`` are the output's spatial chunk sizes (default: the model array's)."""
    mode = _mode(mode)
    probs, axes, bounds, inv = _inverse(probs, mapping, chunks)
    oriented = _resample(probs, axes, bounds, mode, np.dtype(np.float32))
    # Undo the orientation view: un-flip, then put each axis back where the input had it.
    oriented = oriented[(slice(None), *(slice(None, None, -1) if a.flip else slice(None) for a in mapping.axes))]
    return oriented.transpose(0, *(inv[t] + 1 for t in range(3)))


def argmax_to_input(probs: da.Array, mapping: GridMapping, *, chunks: int | Sequence[int] | None = None,
                    mode: Literal["bilinear", "nearest"] = "bilinear", dtype=np.uint8) -> da.Array:
    """(K, J, I) labels on the input grid: the argmax over the leading axis (first maximum winning) of
    :func:`to_input`'s float32 result, voxel for voxel, without interpolating every class everywhere.

    Nearest takes each model voxel's label and gathers it.  Bilinear copies the
    label wherever the model voxels around an input voxel share one clear
    winner, and interpolates (exactly as :func:`to_input` does) only the rest:
    the voxels near label boundaries and near ties.  ``dtype`` must hold every
    class index.
    """
    mode = _mode(mode)
    probs, axes, bounds, inv = _inverse(probs, mapping, chunks)
    oriented = _resample(probs, axes, bounds, mode, np.dtype(dtype), argmax=True)
    oriented = oriented[tuple(slice(None, None, -1) if a.flip else slice(None) for a in mapping.axes)]
    return oriented.transpose(*(inv[t] for t in range(3)))


def model_region(mapping: GridMapping, box: Sequence[tuple[int, int]],
                 mode: Literal["bilinear", "nearest"] = "bilinear") -> tuple[tuple[int, int], ...]:
    """The model-space region [lo, hi) per model axis that :func:`to_input` reads for the input ``box``.

    ``box`` is [lo, hi) per input storage axis (k, j, i).  A resumed run uses
    it to know which model-space work the chunks it still writes depend on.
    """
    mode = _mode(mode)
    thetas = sampling_thetas(mapping, inverse=True)
    oriented_shape = mapping.oriented_shape
    out = []
    for s, a in enumerate(mapping.axes):
        n = oriented_shape[s]
        lo, hi = box[a.source_axis]
        start, stop = (n - hi, n - lo) if a.flip else (lo, hi)
        out.append(_Axis(a.size, n, a.is_copy, thetas[s]).region(start, stop, mode))
    return tuple(out)
