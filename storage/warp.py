"""Raster model space: the chunked warp both ways between an input grid and the model's (GDAL's kernels).

The grids and the map between them are :mod:`storage.rastergrid`'s.
:func:`warp` moves a (C, H, W) dask array between two grids
one output chunk per task.  In the common case, one CRS and north-up grids,
the map is separable and :mod:`storage.separable` applies GDAL's kernels as
per-axis weights (equal to ``rasterio.warp.reproject`` on the whole image, bit
for bit at 5 m <-> 10 m and 20 m <-> 10 m), each task reading exactly the
source pixels its taps name; a labels-only way back copies the model grid's
argmax wherever the contributing model pixels clearly agree.  Otherwise (CRS
changes, bilinear when coarsening) each task reads the source region its
chunk's footprint maps to (the footprint's densified outline carried through
the exact CRS transform) plus a halo wider than the kernel, and warps it with
GDAL (a ``WarpedVRT`` over an in-memory copy of the region).  Two GDAL
settings make a pixel's value independent of the window it is computed in:
the transformer's error tolerance is 1e-12 pixel (rasterio 1.4 approximates
the transform to 1/8 pixel otherwise, per window), and the kernel's scale
(``XSCALE``/``YSCALE``, how far bilinear reaches when coarsening) is fixed
from the whole mapping instead of each window's size.  With both, chunked
and whole-image warps agree bit for bit where the grids' ratios are exact
(5 m <-> 10 m, 20 m <-> 10 m, UTM <-> degrees in the tests) and to float32
rounding otherwise.  Invalid input pixels (the store's mask) are a GDAL
alpha band: they never blend into valid ones.  A model pixel is valid where
GDAL's warp gives it a value (:func:`validity_kernel`): with ``average`` (a
coarser model) when some input pixel it covers is valid, so a half-covered
last row or column or a thin valid strip is segmented; otherwise when the
input pixel under its centre is.  Model pixels outside the input's footprint
are invalid.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from operator import getitem
from typing import Any, Sequence

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from storage.gdalwarp import halo, source_window, warp_block
from storage.rastergrid import Kernel, RasterGrid, RasterMapping
from storage.resample import argmax_first
from storage.separable import Axis, Taps, destination_valid, region_of, separable_block
from storage.separablelabels import separable_labels

def _bounds_of(n: int, c: int) -> list[tuple[int, int]]:
    return [(s, min(s + c, n)) for s in range(0, n, c)]


def validity_kernel(kernel: Kernel) -> Kernel:
    """The kernel whose footprint decides which destination pixels are valid: GDAL gives a pixel a value under
    ``average`` when any covered source pixel is valid, under ``bilinear`` and ``nearest`` only when the one
    under its centre is.  Marking a half-covered edge pixel invalid instead left the last input row and column
    of an odd-sized 5 m scene, whose taps on the way back need it, unlabelled."""
    return "average" if kernel == "average" else "nearest"


def separable_axes(src: RasterGrid, dst: RasterGrid, kernel: Kernel,
                   scale: tuple[float, float]) -> tuple[Axis, Axis] | None:
    """The (row, col) axis maps when :mod:`storage.separable` reproduces GDAL's warp: one CRS, both grids north-up,
    and a kernel it implements there (average, nearest; bilinear at XSCALE and YSCALE >= 1, GDAL's 4-sample
    formula).  None otherwise: GDAL warps."""
    if src.crs != dst.crs or src.transform[1] or src.transform[3] or dst.transform[1] or dst.transform[3]:
        return None
    if kernel not in ("average", "bilinear", "nearest") or (kernel == "bilinear" and min(scale) < 1.0):
        return None
    a, _, c, _, e, f = src.transform
    da_, _, dc, _, de, df = dst.transform
    return Axis.between(src.height, f, e, df, de), Axis.between(src.width, c, a, dc, da_)


@dataclass(frozen=True)
class Job:
    """How one output chunk is computed: its box, the source region it reads, and the separable taps (None: GDAL)."""

    box: tuple[tuple[int, int], tuple[int, int]]
    window: tuple[tuple[int, int], tuple[int, int]] | None
    taps: tuple[Taps, Taps] | None = None
    mask_taps: tuple[Taps, Taps] | None = None  # the destination mask's taps (with_mask): validity_kernel's
    # a graph's copy: the taps are left out and made again by the task (:meth:`light`, :meth:`made`)
    lazy: bool = False
    with_mask: bool = False  # (a lazy job) whether it had the mask's taps

    def light(self) -> "Job":
        """This job without its taps, for a task graph: 84 kB of taps per 1024² chunk made the way back's graph
        21.6 MB at 16384² (Dask warns past 10 MB); the task makes them again in 0.2 ms."""
        if self.taps is None:
            return self
        return Job(self.box, self.window, lazy=True, with_mask=self.mask_taps is not None)

    def made(self, src: RasterGrid, dst: RasterGrid, kernel: Kernel, scale: tuple[float, float]) -> "Job":
        """The whole job again from a :meth:`light` one (the same taps: they depend on the box alone)."""
        if not self.lazy:
            return self
        job = chunk_jobs(src, dst, kernel, scale, [[self.box[0]], [self.box[1]]], self.with_mask)[(0, 0)]
        assert job.window == self.window, (job.window, self.window)
        return job


def chunk_jobs(src: RasterGrid, dst: RasterGrid, kernel: Kernel, scale: tuple[float, float],
               per_axis: Sequence[list[tuple[int, int]]], with_mask: bool) -> dict[tuple[int, int], Job]:
    axes = separable_axes(src, dst, kernel, scale)
    if with_mask and axes is None:
        raise ValueError("a destination mask plane needs the separable warp")
    pad = halo(scale)
    vk = validity_kernel(kernel)
    jobs = {}
    for idx in product(*(range(len(b)) for b in per_axis)):
        box = (per_axis[0][idx[0]], per_axis[1][idx[1]])
        if axes is None:
            jobs[idx] = Job(box, source_window(src, dst, box, pad))
            continue
        taps = (axes[0].taps(kernel, *box[0]), axes[1].taps(kernel, *box[1]))
        near = (axes[0].taps(vk, *box[0]), axes[1].taps(vk, *box[1])) if with_mask else None
        jobs[idx] = Job(box, region_of(taps, *([near] if near else [])), taps, near)
    return jobs


def _compute(job: Job, region: np.ndarray, valid: np.ndarray | None, src: RasterGrid, dst: RasterGrid,
             kernel: Kernel, scale: tuple[float, float], dtype: Any, argmax: bool, empty: int = 0) -> np.ndarray:
    """One output chunk from its source region (top-left at the job's window start)."""
    assert job.window is not None
    at = (job.window[0][0], job.window[1][0])
    if job.taps is None:
        out = warp_block(region, valid, src, at, dst, job.box, kernel, scale, np.float32 if argmax else dtype)
        return argmax_first(out, dtype, empty or None) if argmax else out
    if argmax:
        return separable_labels(region, valid, *job.taps, at, kernel, dtype, empty)
    out = separable_block(region, valid, *job.taps, at, kernel, dtype)
    if job.mask_taps is not None:
        mask = destination_valid(valid, *job.mask_taps, at, validity_kernel(kernel))
        out = np.concatenate([out, mask[None].astype(dtype)])
    return out


def _empty(job: Job, n_ch: int, dtype: Any, argmax: bool, empty: int = 0) -> np.ndarray:
    shape = tuple(b - a for a, b in job.box)
    if argmax:
        return np.full(shape, empty, dtype=dtype)
    return np.zeros((n_ch + (job.mask_taps is not None), *shape), dtype=dtype)


def warp(source: da.Array, src: RasterGrid, dst: RasterGrid, kernel: Kernel, scale: tuple[float, float],
         chunks: Sequence[int] | int, *, valid: da.Array | None = None, dtype: Any = np.float32,
         argmax: bool = False, with_mask: bool = False, empty: int = 0) -> da.Array:
    """(C, H, W) on ``src`` -> (C, H', W') on ``dst``, lazily, one warp per output chunk.

    ``valid`` is ``src``'s mask (None: every pixel valid).  With ``argmax``
    each task returns the labels of its chunk (first maximum winning) instead
    of the warped values, so the way back never holds more than one chunk,
    and ``empty`` where nothing valid reaches a pixel (every class 0).
    With ``with_mask`` (separable warps only) a last plane holds the
    destination's mask (1 where the source pixel under a pixel's centre is
    valid).  A stored (zarr) ``source`` and ``valid`` are read by each task
    itself, exactly the region its taps need: no source chunk waits in memory
    for its other readers, so memory stays one region per task whatever the
    image's size.  Same CRS and north-up grids take :mod:`storage.separable`
    (GDAL's kernels as per-axis weights); other maps a GDAL ``WarpedVRT``.
    """
    if not isinstance(source, da.Array) and hasattr(source, "store"):
        return _warp_stored(source, src, dst, kernel, scale, chunks, valid=valid, dtype=dtype, argmax=argmax,
                            with_mask=with_mask, empty=empty)
    source = da.asarray(source)
    if source.ndim != 3 or tuple(source.shape[1:]) != src.shape:
        raise ValueError(f"source must be (C, {src.height}, {src.width}), got {source.shape}")
    n_ch = source.shape[0]
    per_axis = chunk_bounds(dst, chunks)
    source = source.rechunk({0: n_ch})
    if valid is not None:
        valid = da.asarray(valid).rechunk(source.chunks[1:])
    edges = [np.cumsum((0, *c)) for c in source.chunks[1:]]
    dtype = np.dtype(dtype)
    token = tokenize(source.name, None if valid is None else valid.name, src, dst, kernel, scale, per_axis,
                     str(dtype), argmax, with_mask, empty)
    name = f"{'warp-argmax' if argmax else 'warp'}-{token}"
    dsk: dict = {}
    for idx, job in chunk_jobs(src, dst, kernel, scale, per_axis, with_mask).items():
        parts, mparts, places = [], [], []
        window = job.window
        if window is not None:
            touched = [range(int(np.searchsorted(e, lo, side="right")) - 1, int(np.searchsorted(e, hi, side="left")))
                       for e, (lo, hi) in zip(edges, window)]
            for chunk in product(*touched):
                local, place = [], []
                for s, c in enumerate(chunk):
                    lo, hi = max(window[s][0], int(edges[s][c])), min(window[s][1], int(edges[s][c + 1]))
                    local.append(slice(lo - int(edges[s][c]), hi - int(edges[s][c])))
                    place.append(slice(lo - window[s][0], hi - window[s][0]))
                parts.append((getitem, (source.name, 0, *chunk), (slice(None), *local)))
                if valid is not None:
                    mparts.append((getitem, (valid.name, *chunk), tuple(local)))
                places.append(tuple(place))
        key = (name, *idx) if argmax else (name, 0, *idx)
        dsk[key] = (_warp_task, parts, mparts if valid is not None else None, places, job, n_ch, source.dtype,
                    src, dst, kernel, scale, dtype, argmax, empty)
    deps = [source] if valid is None else [source, valid]
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=deps)
    return chunk_array(graph, name, per_axis, n_ch + with_mask, dtype, argmax)


def chunk_bounds(dst: RasterGrid, chunks: Sequence[int] | int) -> list[list[tuple[int, int]]]:
    size = (int(chunks), int(chunks)) if isinstance(chunks, (int, np.integer)) else tuple(int(c) for c in chunks)
    return [_bounds_of(n, min(c, n)) for n, c in zip(dst.shape, size)]


def chunk_array(graph: HighLevelGraph, name: str, per_axis: Sequence[list[tuple[int, int]]], planes: int,
                dtype: Any, argmax: bool) -> da.Array:
    spatial = tuple(tuple(b - a for a, b in bounds) for bounds in per_axis)
    if argmax:
        return da.Array(graph, name, chunks=spatial, dtype=dtype)
    return da.Array(graph, name, chunks=((planes,), *spatial), dtype=dtype)


def _warp_stored(source: Any, src: RasterGrid, dst: RasterGrid, kernel: Kernel, scale: tuple[float, float],
                 chunks: Sequence[int] | int, *, valid: Any = None, dtype: Any = np.float32, argmax: bool = False,
                 with_mask: bool = False, empty: int = 0) -> da.Array:
    """:func:`warp` of a stored array (and mask): each task reads its own region from the store (a zarr array, or
    any array with ``store``, ``path``, ``shape`` and ``ndim`` read by slices)."""
    if source.ndim != 3 or tuple(source.shape[1:]) != src.shape:
        raise ValueError(f"source must be (C, {src.height}, {src.width}), got {source.shape}")
    per_axis = chunk_bounds(dst, chunks)
    dtype = np.dtype(dtype)
    name = stored_name(source, valid, src, dst, kernel, scale, per_axis, dtype, argmax, with_mask, None, empty)
    dsk = {(name, *idx) if argmax else (name, 0, *idx):
           (read_task, source, valid, job.light(), src, dst, kernel, scale, dtype, argmax, empty)
           for idx, job in chunk_jobs(src, dst, kernel, scale, per_axis, with_mask).items()}
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[])
    return chunk_array(graph, name, per_axis, source.shape[0] + with_mask, dtype, argmax)


def stored_name(source: Any, valid: Any, src: RasterGrid, dst: RasterGrid, kernel: Kernel, scale: tuple[float, float],
                per_axis: Sequence[list[tuple[int, int]]], dtype: Any, argmax: bool, with_mask: bool, after: Any,
                empty: int) -> str:
    """The graph name of a stored warp: what it reads (by path) and everything that decides its values."""
    return "warp-stored-" + tokenize(str(source.store), source.path, None if valid is None else valid.path,
                                     source.shape, src, dst, kernel, scale, per_axis, str(dtype), argmax, with_mask,
                                     after, empty)


# A separable task whose source region holds more than this is read and warped in bands of destination rows
# (storage.separable's values do not depend on the window they are computed in).  glibc hands out blocks over
# 32 MB as fresh memory on every allocation, and fresh memory is what this project's CPU machines are slowest at
# (docs/performance.md, "Fresh memory"): a window task's 5 m region of a 4-band uint16 scene (42 MB) and its
# float32 sums cost more to touch than to compute.  Bands keep each block under the threshold, reused from the heap.
BAND_BYTES = 24 << 20


def _row_bands(job: Job, source: Any) -> list[tuple[int, int]]:
    """Destination row ranges [a, b) of ``job`` (offsets into its box) whose source rows each stay within one
    chunk row of ``source`` where they can (no chunk is decoded twice) and under :data:`BAND_BYTES`."""
    assert job.taps is not None and job.window is not None
    ty = job.taps[0]
    n = ty.index.shape[0]
    (r0, r1), (c0, c1) = job.window
    row_bytes = source.shape[0] * (c1 - c0) * np.dtype(source.dtype).itemsize
    if (r1 - r0) * row_bytes <= BAND_BYTES or n < 2:
        return [(0, n)]
    chunks = getattr(source, "chunks", None)
    step = int(chunks[1]) if chunks else r1 - r0  # rows per stored chunk (a work array: none to follow)
    first = ty.index[:, 0]
    cuts = [0, *(int(i) for i in np.flatnonzero(np.diff(first // step)) + 1), n]
    per_band = max(1, int(BAND_BYTES // max(1, row_bytes * max(1.0, (r1 - r0) / n))))
    bands = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        bands += [(y, min(y + per_band, b)) for y in range(a, b, per_band)]
    return bands


def _band(job: Job, a: int, b: int) -> Job:
    """Rows [a, b) of a separable ``job``: its taps, and the source region they read."""
    return job_piece(job, (a, b), (0, job.box[1][1] - job.box[1][0]))


def job_piece(job: Job, rows: tuple[int, int], cols: tuple[int, int]) -> Job:
    """Rows and columns [a, b) (offsets into its box) of a separable ``job``: their taps, and the region they read."""
    assert job.taps is not None

    def cut(t: Taps, a: int, b: int) -> Taps:
        return Taps(t.index[a:b], t.weight[a:b], t.inside[a:b], t.centre[a:b])

    taps = (cut(job.taps[0], *rows), cut(job.taps[1], *cols))
    near = None if job.mask_taps is None else (cut(job.mask_taps[0], *rows), cut(job.mask_taps[1], *cols))
    (y0, _), (x0, _) = job.box
    box = ((y0 + rows[0], y0 + rows[1]), (x0 + cols[0], x0 + cols[1]))
    return Job(box, region_of(taps, *([near] if near else [])), taps, near)


def read_task(source: Any, valid: Any, job: Job, src: RasterGrid, dst: RasterGrid, kernel: Kernel,
               scale: tuple[float, float], dtype: Any, argmax: bool, empty: int, _after: Any = None) -> np.ndarray:
    """One chunk of a stored warp; then its reads counted, for a source that deletes what every reader has read."""
    job = job.made(src, dst, kernel, scale)
    out = _stored_task(source, valid, job, src, dst, kernel, scale, dtype, argmax, empty)
    if job.window is not None and getattr(source, "readers", None) is not None:
        source.release(*job.window, reader=f"{job.box[0][0]}.{job.box[1][0]}")
    return out


def _stored_task(source: Any, valid: Any, job: Job, src: RasterGrid, dst: RasterGrid, kernel: Kernel,
                 scale: tuple[float, float], dtype: Any, argmax: bool, empty: int, _after: Any = None) -> np.ndarray:
    if job.window is None:
        return _empty(job, source.shape[0], dtype, argmax, empty)
    if job.taps is not None and not argmax:
        bands = _row_bands(job, source)
        if len(bands) > 1:
            out = _empty(job, source.shape[0], dtype, argmax)
            for a, b in bands:
                out[:, a:b] = _stored_task(source, valid, _band(job, a, b), src, dst, kernel, scale, dtype, argmax,
                                           empty)
            return out
    (r0, r1), (c0, c1) = job.window
    region = np.asarray(source[:, r0:r1, c0:c1])
    mask = None if valid is None else np.asarray(valid[r0:r1, c0:c1], dtype=bool)
    if mask is not None and mask.all():
        mask = None  # nothing to exclude: the plain kernel, same values
    return _compute(job, region, mask, src, dst, kernel, scale, dtype, argmax, empty)


def warp_region(source: Any, valid: Any, src: RasterGrid, dst: RasterGrid, kernel: Kernel,
                scale: tuple[float, float], box: Sequence[tuple[int, int]], dtype: Any = np.float32) -> np.ndarray:
    """The ``dst`` pixels of ``box`` (a [lo, hi) per row and column), read from a stored ``source`` (and its mask
    ``valid``): exactly the pixels a :func:`warp` task computes for them, as the values of a warp do not depend
    on the window they are computed in (module docstring)."""
    (y0, y1), (x0, x1) = box
    job = chunk_jobs(src, dst, kernel, scale, [[(int(y0), int(y1))], [(int(x0), int(x1))]], False)[(0, 0)]
    return _stored_task(source, valid, job, src, dst, kernel, scale, np.dtype(dtype), False, 0)


def _warp_task(parts: list[np.ndarray], mparts: list[np.ndarray] | None, places: list[tuple[slice, ...]], job: Job,
               n_ch: int, src_dtype: Any, src: RasterGrid, dst: RasterGrid, kernel: Kernel,
               scale: tuple[float, float], dtype: Any, argmax: bool, empty: int = 0) -> np.ndarray:
    if job.window is None:  # nothing of the source under this chunk
        return _empty(job, n_ch, dtype, argmax, empty)
    region_shape = tuple(hi - lo for lo, hi in job.window)
    region = np.empty((n_ch, *region_shape), dtype=src_dtype)
    valid = None if mparts is None else np.empty(region_shape, dtype=bool)
    for i, (part, place) in enumerate(zip(parts, places)):
        region[(slice(None), *place)] = part
        if valid is not None:
            valid[place] = mparts[i]  # type: ignore[index]
    if valid is not None and valid.all():
        valid = None  # nothing to exclude: the plain kernel, same values
    return _compute(job, region, valid, src, dst, kernel, scale, dtype, argmax, empty)


# --- both ways -----------------------------------------------------------------------------------------------------

def to_model(image: da.Array, mapping: RasterMapping, *, chunks: Sequence[int] | int,
             valid: da.Array | None = None) -> tuple[da.Array, da.Array]:
    """(image, valid) on the model grid: the image warped with the mapping's kernel (float32), invalid input
    pixels left out, and the model's valid mask (:func:`validity_kernel`).

    A separable mapping computes both in one task per chunk (one read of the
    region and its mask); otherwise the mask is a second warp, of the mask with :func:`validity_kernel`.
    """
    if separable_axes(mapping.input, mapping.model, mapping.forward, mapping.scale) is not None:
        both = warp(image, mapping.input, mapping.model, mapping.forward, mapping.scale, chunks, valid=valid,
                    with_mask=True)
        n_ch = both.shape[0] - 1
        return both[:n_ch], both[n_ch] > 0
    moved = warp(image, mapping.input, mapping.model, mapping.forward, mapping.scale, chunks, valid=valid)
    if valid is None:
        ones = da.ones(mapping.input_shape, dtype=np.uint8, chunks=tuple(image.chunks[1:]))
    elif isinstance(valid, da.Array) or not hasattr(valid, "store"):
        ones = da.asarray(valid).astype(np.uint8)
    else:
        ones = da.from_zarr(valid).astype(np.uint8)
    return moved, valid_on(ones, mapping, chunks)


def valid_on(ones: da.Array, mapping: RasterMapping, chunks: Sequence[int] | int) -> da.Array:
    """The model grid's valid mask from the input's (1 valid, 0 not; uint8): a warp with :func:`validity_kernel`
    (float32, so a model pixel a tenth covered by valid pixels is not rounded away)."""
    kernel = validity_kernel(mapping.forward)
    dtype = np.float32 if kernel == "average" else np.uint8
    return warp(ones.astype(dtype)[None], mapping.input, mapping.model, kernel, mapping.scale, chunks,
                dtype=dtype)[0] > 0


def back_scale(mapping: RasterMapping) -> tuple[float, float]:
    return 1.0 / mapping.scale[0], 1.0 / mapping.scale[1]


__all__ = ["Job", "back_scale", "chunk_array", "chunk_bounds", "chunk_jobs", "halo", "job_piece", "read_task",
           "separable_axes", "source_window", "stored_name", "to_model", "valid_on", "validity_kernel", "warp",
           "warp_block", "warp_region"]
