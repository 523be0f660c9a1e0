"""Raster model space's way back: the stitched model-grid probabilities brought back onto the input's grid.

The stitched chunks go through a work array (:mod:`storage.workarray`): each
model chunk is stored as soon as it is stitched, and each input chunk's task
reads the region its taps need once the chunks under it are stored, warped as
:func:`storage.warp.warp` would.  When one worker runs every task, each
stored piece is deleted (or dropped from memory) once every task that reads
it has.  An input chunk's taps reach a pixel or two into the model chunks
around the one it lies in, so each model chunk would wait for its neighbours
to be stitched: the chunks also keep their border rows and columns apart
(strips), the input pixels whose taps straddle two model chunks are computed
from those by the task that joins the input chunk, and a model chunk goes as
soon as the input pixels inside it are computed.  Every pixel's value
depends on its taps alone, so the pieces equal the whole chunk's.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass
from operator import getitem
from typing import Any, Sequence

import dask.array as da
import numpy as np
from dask.highlevelgraph import HighLevelGraph

from storage.rastergrid import Kernel, RasterGrid, RasterMapping
from storage.separable import Taps
from storage.warp import (Job, back_scale, chunk_array, chunk_bounds, chunk_jobs, job_piece, read_task, stored_name,
                          warp)
from storage.workarray import ChunkFiles, stage

# The most input chunks per side of a grouped way back's block (RasterWayBack.labels' grouped): 16 MB of labels
MAX_GROUP = 4

# The most rows (columns) of a neighbouring chunk that a way back's straddling pixels may read from the strips
STRIP_ROWS = 8


def _runs(taps: Taps, bounds: Sequence[int]) -> list[tuple[int, int, bool]]:
    """Destination pixels [a, b) along one axis (offsets into a job's box), in runs whose taps read one source
    chunk along it (False) or straddle two or more (True); ``bounds``: the source's chunk bounds there."""
    lo = np.searchsorted(bounds, taps.index.min(axis=1), side="right") - 1
    hi = np.searchsorted(bounds, taps.index.max(axis=1), side="right") - 1
    cuts = [0, *(np.flatnonzero((np.diff(lo) != 0) | (np.diff(hi) != 0)) + 1).tolist(), len(lo)]
    return [(a, b, bool(hi[a] != lo[a])) for a, b in zip(cuts[:-1], cuts[1:])]


def strip_size(jobs: dict[tuple[int, int], Job], bounds: Sequence[Sequence[int]]) -> int:
    """The rows (and columns) along each chunk's borders a stored way back keeps apart
    (:class:`storage.workarray.ChunkFiles` ``strip``) so that its destination pixels whose taps straddle two
    source chunks read those alone: the most such pixels read of either side (1 for bilinear at 2x).  0 (no
    strips) when none straddles, when some read more than :data:`STRIP_ROWS` or three chunks along an axis, or
    when GDAL warps (no taps).  ``bounds``: the source's chunk bounds along rows and columns.

    With the strips, a stitched model chunk is read in full only by the destination pixels inside it, so it goes
    as soon as those are computed instead of waiting for its neighbours to be stitched.
    """
    k = 0
    for job in jobs.values():
        if job.taps is None:
            return 0
        if job.window is None:
            continue
        for taps, edges in zip(job.taps, bounds):
            for a, b, straddles in _runs(taps, edges):
                if not straddles:
                    continue
                index = taps.index[a:b]
                y0, y1 = int(index.min()), int(index.max()) + 1
                c = bisect.bisect_right(edges, y0) - 1
                if c + 2 >= len(edges) or y1 > edges[c + 2]:
                    return 0
                k = max(k, edges[c + 1] - y0, y1 - edges[c + 1])
    return k if k <= STRIP_ROWS else 0


Split = dict[tuple[int, int], list[list[tuple[Job, bool]]]]


def _reads(jobs: dict[tuple[int, int], Job], source: Any) -> tuple[Split, Counter[tuple[Any, ...]]]:
    """(split, readers) of a stored warp from a work array ``source``.  ``split``: where the source keeps strips,
    each chunk's pieces (rows of pieces, each a job and whether it straddles source chunks): the runs of
    :func:`_runs` along both axes crossed (a straddling row run whole), when there is more than one;
    ``readers``: how many tasks read each stored piece of the source
    (:meth:`storage.workarray.ChunkFiles.parts_of`)."""
    split: Split = {}
    if source.strip:
        for idx, job in jobs.items():
            if job.window is None:
                continue
            rows, cols = (_runs(t, b) for t, b in zip(job.taps, source.bounds))  # type: ignore[union-attr]
            if len(rows) * len(cols) > 1:  # a straddling row run whole (one read for its strips and corners)
                split[idx] = [[(job_piece(job, (a, b), (0, job.box[1][1] - job.box[1][0])), True)] if e else
                              [(job_piece(job, (a, b), (c, d)), f) for c, d, f in cols] for a, b, e in rows]
    readers: Counter[tuple[Any, ...]] = Counter()
    for idx, job in jobs.items():
        for part in [p for row in split[idx] for p, _ in row] if idx in split else [job]:
            if part.window is not None:
                readers.update(source.parts_of(*part.window))
    return split, readers


def _inner_task(source: Any, valid: Any, pieces: list[Job], src: RasterGrid, dst: RasterGrid, kernel: Kernel,
                scale: tuple[float, float], dtype: Any, argmax: bool, empty: int,
                _after: Any = None) -> list[np.ndarray]:
    """The pieces of several chunks that read one source chunk, each as :func:`storage.warp.read_task` makes it."""
    return [read_task(source, valid, p, src, dst, kernel, scale, dtype, argmax, empty) for p in pieces]


def _joined_task(parts: list[list[Any]], source: Any, valid: Any, src: RasterGrid, dst: RasterGrid, kernel: Kernel,
                 scale: tuple[float, float], dtype: Any, argmax: bool, empty: int, _after: Any = None) -> np.ndarray:
    """One array from rows of pieces in order: arrays computed by other tasks, and jobs read here, each as
    :func:`storage.warp.read_task` makes it.  A chunk from its pieces (:func:`_reads`' split: those inside one
    source chunk from their own tasks, the straddling ones read here from the strips), or a grouped block from
    its chunks' jobs (computed in turn, so the working arrays stay the size of one chunk: a 2048² way back in one
    piece ran twice as long per pixel).  Each pixel's value depends on its taps alone, so they equal those of
    the whole chunk's task."""
    def made(p: Any) -> np.ndarray:
        return p if isinstance(p, np.ndarray) else \
            read_task(source, valid, p, src, dst, kernel, scale, dtype, argmax, empty)

    lead = 0 if argmax else 1
    return np.concatenate([np.concatenate([made(p) for p in row], axis=lead + 1) for row in parts], axis=lead)


def _merged(bounds: list[tuple[int, int]], k: int) -> list[list[int]]:
    """Indexes of ``bounds`` (chunks along one axis) taken ``k`` at a time."""
    return [list(range(i, min(i + k, len(bounds)))) for i in range(0, len(bounds), k)]


def _staged_warp(source: ChunkFiles, src: RasterGrid, dst: RasterGrid, kernel: Kernel, scale: tuple[float, float],
                 chunks: Sequence[int] | int, *, after: da.Array, written: Sequence[int], valid: Any = None,
                 dtype: Any = np.float32, argmax: bool = False, empty: int = 0,
                 jobs: dict[tuple[int, int], Job] | None = None,
                 reads: tuple[Split, Counter[tuple[Any, ...]]] | None = None, group: int = 1) -> da.Array:
    """The warp of a work array ``source`` (:func:`stage`'d, and its mask): each task reads its own region from
    it, as :func:`storage.warp.warp`'s of a stored array do, once the blocks of ``after`` (:func:`stage`'s
    tokens, one per chunk of ``written`` size) under its region are computed.  ``jobs``: :func:`chunk_jobs` for
    these arguments.  ``reads`` (:func:`_reads`, one worker only): each piece of the source is deleted once
    every task reading it has (:meth:`storage.workarray.ChunkFiles.counted`), and where the source keeps strips
    a chunk's pixels whose taps straddle two source chunks are computed apart, from the strips, by the task
    that joins the chunk's pieces (:func:`strip_size`).  ``group`` > 1 (without strips): blocks of up to
    ``group`` x ``group`` chunks, each one task and one array chunk (:func:`_joined_task`).
    """
    if source.ndim != 3 or tuple(source.shape[1:]) != src.shape:
        raise ValueError(f"source must be (C, {src.height}, {src.width}), got {source.shape}")
    n_ch = source.shape[0]
    per_axis = chunk_bounds(dst, chunks)
    dtype = np.dtype(dtype)
    name = stored_name(source, valid, src, dst, kernel, scale, per_axis, dtype, argmax, False, after.name, empty)
    name = name if group == 1 else f"{name}-g{group}"
    size = tuple(written)
    jobs = chunk_jobs(src, dst, kernel, scale, per_axis, False) if jobs is None else jobs
    split: Split = {}
    if reads is not None:
        split, readers = reads
        source = source.counted(readers)

    def waits(job: Job) -> list:
        if job.window is None:
            return []
        (r0, r1), (c0, c1) = job.window
        return [(after.name, p, i, j) for p in range(after.numblocks[0])
                for i in range(r0 // size[0], (r1 - 1) // size[0] + 1)
                for j in range(c0 // size[1], (c1 - 1) // size[1] + 1)]

    dsk: dict = {}
    common = (src, dst, kernel, scale, dtype, argmax, empty)
    if group > 1 and not split:
        groups = [_merged(bounds, group) for bounds in per_axis]
        for bi, rows in enumerate(groups[0]):
            for bj, cols in enumerate(groups[1]):
                block = [[jobs[(i, j)] for j in cols] for i in rows]
                key = (name, bi, bj) if argmax else (name, 0, bi, bj)
                dsk[key] = (_joined_task, [[job.light() for job in row] for row in block], source, valid, *common,
                            list(dict.fromkeys(w for row in block for job in row for w in waits(job))))
        merged = [[(bounds[g[0]][0], bounds[g[-1]][1]) for g in gs] for bounds, gs in zip(per_axis, groups)]
        graph = HighLevelGraph.from_collections(name, dsk, dependencies=[after])
        return chunk_array(graph, name, merged, n_ch, dtype, argmax)
    # the pieces inside one source chunk (or strip): one task each, which reads it once for all of them
    inner: dict[tuple[Any, ...], list[Job]] = {}
    for idx in split:
        for row in split[idx]:
            for piece, straddles in row:
                if not straddles:
                    inner.setdefault(tuple(source.parts_of(*piece.window)), []).append(piece)
    place: dict[tuple[tuple[int, int], ...], tuple[Any, int]] = {}
    for n, pieces in enumerate(inner.values()):
        dsk[(f"{name}-inner", n)] = (_inner_task, source, valid, [p.light() for p in pieces], *common,
                                     waits(pieces[0]))
        place.update({p.box: ((f"{name}-inner", n), k) for k, p in enumerate(pieces)})
    for idx, job in jobs.items():
        key = (name, *idx) if argmax else (name, 0, *idx)
        if idx not in split:
            dsk[key] = (read_task, source, valid, job.light(), *common, waits(job))
            continue
        # straddling pieces: read from the strips by the joining task, once the chunks it reads are stitched
        parts = [[piece.light() if straddles else (getitem, *place[piece.box]) for piece, straddles in row]
                 for row in split[idx]]
        dsk[key] = (_joined_task, parts, source, valid, *common,
                    [w for row in split[idx] for piece, straddles in row if straddles for w in waits(piece)])
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[after])
    return chunk_array(graph, name, per_axis, n_ch, dtype, argmax)


@dataclass(frozen=True)
class RasterWayBack:
    """Model-grid probabilities back onto the input's grid (what a model-space plan writes), as GDAL warps.

    ``mode`` "bilinear" interpolates with the mapping's way-back kernel
    (bilinear where the input is finer than the model, average where it is
    coarser); "nearest" takes the nearest model pixel.  ``valid`` is the model
    grid's mask (a zarr or dask array) when some model pixels are invalid
    (their zero probabilities are then left out rather than blended in).

    ``stage`` (a folder for a work array, :mod:`storage.workarray`) makes the stitched probabilities
    go through a store: each model chunk is written as soon as it is stitched
    (and then freed, as the plain sliding window's writes free theirs), and each
    input chunk's task reads just the region its taps need once the chunks
    under it are written.  Without it an input chunk holds on to up to four
    stitched chunks that its neighbours also wait for, and the scheduler kept
    most of the model grid's probabilities in memory (the worker's peak grew
    with the scene).
    """

    mapping: RasterMapping
    valid: Any = None
    stage: Any = None
    # staged chunks deleted once read (storage.workarray): when one worker runs every task, and only one way back
    # (labels or probabilities) reads this stage folder, as a run's writes do
    release: bool = False
    # with release: the staged chunks stay in the worker's memory within this many bytes (storage.workarray)
    memory: int = 0
    # input pixels no valid model pixel reaches get no probabilities (all 0): their labels are nodata
    leaves_unreached = True

    @property
    def input_shape(self) -> tuple[int, int]:
        return self.mapping.input_shape

    def _kernel(self, mode: str) -> Kernel:
        return "nearest" if mode == "nearest" else self.mapping.back

    def _warp(self, probs: da.Array, chunks: Sequence[int], mode: str, grouped: bool = False, **kw: Any) -> da.Array:
        m = self.mapping
        if self.stage is None:
            valid = self.valid if self.valid is None or isinstance(self.valid, da.Array) else da.from_zarr(self.valid)
            return warp(probs, m.model, m.input, self._kernel(mode), back_scale(m), chunks, valid=valid, **kw)
        jobs = chunk_jobs(m.model, m.input, self._kernel(mode), back_scale(m), chunk_bounds(m.input, chunks), False)
        reads = None
        strip = 0
        if self.release:  # counted reads; only what is read is stored (a piece nobody reads would stay)
            grid = ChunkFiles(self.stage, probs.shape, probs.dtype, probs.chunks[1:])
            strip = strip_size(jobs, grid.bounds) if self._strips_pay(probs) else 0
            grid.strip = strip
            reads = _reads(jobs, grid)
        staged, written = stage(probs, self.stage, self.memory if self.release else 0, strip,
                                None if reads is None else set(reads[1]))
        valid = self.valid if self.valid is None or not isinstance(self.valid, da.Array) else None
        if valid is None and self.valid is not None:  # a dask mask: staged beside the probabilities
            mask = self.valid.rechunk(probs.chunks[1:])[None].astype(np.float32)
            valid, mask_written = stage(mask, f"{self.stage}-valid")
            written = da.concatenate([written, mask_written], axis=0)
            valid = _Plane(valid)
        return _staged_warp(staged, m.model, m.input, self._kernel(mode), back_scale(m), chunks, valid=valid,
                            after=written, written=tuple(c[0] for c in probs.chunks[1:]), jobs=jobs, reads=reads,
                            group=self._group(probs, chunks) if grouped else 1, **kw)

    def _group(self, probs: da.Array, chunks: Sequence[int]) -> int:
        """Input chunks per block side for a grouped way back: about as many as one model chunk spans (2 for a
        10 m model's 1024² chunks over a 5 m input's 1024² chunks), at most :data:`MAX_GROUP`."""
        (ih, iw), (mh, mw) = self.mapping.input_shape, self.mapping.model_shape
        spans = [max(probs.chunks[1]) * ih / mh / chunks[0], max(probs.chunks[2]) * iw / mw / chunks[1]]
        return max(1, min(MAX_GROUP, *map(int, spans)))

    def _strips_pay(self, probs: da.Array) -> bool:
        """Whether the staged chunks keep their border strips (:func:`strip_size`): only where about three rows
        of model chunks would not fit in the memory budget.

        With strips a chunk goes as soon as the input pixels inside it are computed (at most 85-106 MB were held
        at 16384², 5 m to 10 m, chunks 1024²), but each input chunk takes one more small task: in three
        interleaved ``segment`` pairs there, A's inference took 26.3, 31.8, 28.6 s with them against 26.3, 25.8,
        25.6 s without.  Without them about two rows of chunks wait for their neighbours (20 of 64, 419 MB,
        at 16384²): that is kept while it fits the budget, and a wider scene takes the strips instead of
        spilling chunks to files (new page cache, slower still).
        """
        row = probs.shape[0] * probs.dtype.itemsize * max(probs.chunks[1]) * probs.shape[2]  # one row of chunks
        return 3 * row > self.memory

    def probabilities(self, probs: da.Array, chunks: Sequence[int], mode: str) -> da.Array:
        return self._warp(probs, chunks, mode)

    def labels(self, probs: da.Array, chunks: Sequence[int], mode: str, dtype: Any, empty: int = 0,
               grouped: bool = False) -> da.Array:
        """The argmax of :meth:`probabilities`, chunk by chunk, without keeping the warped classes (labels
        copied from the model grid where every contributing model pixel clearly has one, storage.separablelabels),
        and ``empty`` where no valid model pixel reaches an input pixel (a sliver of the input thinner than the
        model's pixels, whose model pixels hold no data).

        ``grouped``: where the stitched chunks are staged without strips, the array's chunks may be blocks of
        several of ``chunks`` (about what one model chunk spans), each one task: a finer input took four tasks
        and four label writes per model chunk (the writer then takes the block apart, or stores it whole)."""
        return self._warp(probs, chunks, mode, grouped, dtype=dtype, argmax=True, empty=empty)

    def region(self, box: Sequence[tuple[int, int]], mode: str) -> tuple[tuple[int, int], ...]:
        """The model-grid region [lo, hi) per (row, col) the way back reads for the input ``box``."""
        m = self.mapping
        job = chunk_jobs(m.model, m.input, self._kernel(mode), back_scale(m), [[tuple(box[0])], [tuple(box[1])]],
                         False)[(0, 0)]
        return ((0, 0), (0, 0)) if job.window is None else job.window


class _Plane:
    """A staged (1, H, W) mask read as (H, W) booleans."""

    def __init__(self, array: Any) -> None:
        self.array = array
        self.path = getattr(array, "path", "")

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.array[(0, *key)]) > 0


__all__ = ["MAX_GROUP", "RasterWayBack", "STRIP_ROWS", "strip_size"]
