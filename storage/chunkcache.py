"""Decoded chunks of a stored image, kept in memory until every region that reads them has read them.

An evaluate task of the sliding window reads its region, its chunk and a halo
from each neighbour, from the stored image (:class:`segmentation.regions.RegionReader`).
zarr decodes every stored chunk a read touches, whole, so with a halo each
chunk was decoded by up to nine regions in 2-D: 225 decodes for the 64
regions of an 8192² image in 1024² chunks.  Here a run's reads go
through this process's cache of decoded chunks.  The plan knows, before
anything runs, how many regions read each chunk; the last of them drops it,
so what is held is the band of chunks between regions already read and
regions still to come (about two rows of chunks), never the image.  Where
several worker processes share a run, no process sees every read of a
chunk and the counts never run out: there each process keeps at most three
rows of a run's chunks (the plan's ``limit``), and the chunks whose other
readers went elsewhere, read least recently, go first.  A byte budget per
process caps it all, so a very wide image only decodes more; a run's end
drops whatever is left (:func:`forget`).  The values are the stored ones either way: the cache holds
what zarr decoded, keyed by the run's own token, never shared across runs.
A raster warped on read (:class:`storage.modelview.WarpedImage`, raster model space) is read the same
way: its chunks are whole model-grid chunks, each warped once (its value does not depend on the window
it is computed in), instead of each region warping its own halo again: 64 warps of 1024² chunks against
63 regions of 1152² that each read about 16 stored chunks of the 5 m input, at 16384².
Measured (2026-12-03, ``segflow segment`` of an 8192² × 4 float32 image,
in-process, 2 threads, four interleaved pairs): inference 9.3-10.5 s -> 8.6-9.2 s
(``docs/performance.md``).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

BUDGET_ENV = "SEGFLOW_CHUNK_CACHE_MB"
DEFAULT_BUDGET = 512 * 2**20  # bytes; the band of chunks a run needs is well under it at 1024² chunks

ChunkIndex = tuple[int, ...]


def budget() -> int:
    """The cache's byte budget: ``SEGFLOW_CHUNK_CACHE_MB`` (0 turns caching off), else (unset or not a
    number: it is read inside worker tasks, where an error would fail the run, not the setting) the default."""
    value = os.environ.get(BUDGET_ENV, "").strip()
    if not value:
        return DEFAULT_BUDGET
    try:
        return max(0, int(float(value) * 2**20))
    except (ValueError, OverflowError):  # "inf" overflowed int() and failed every input
        return DEFAULT_BUDGET


class _Cache:
    """This process's decoded chunks: (token, chunk index) -> array, least recently used first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.chunks: OrderedDict[tuple[str, ChunkIndex], np.ndarray] = OrderedDict()
        self.reads: dict[tuple[str, ChunkIndex], int] = {}  # reads so far of chunks with readers still to come
        self.loading: dict[tuple[str, ChunkIndex], threading.Event] = {}
        self.nbytes = 0
        self.held: dict[str, int] = {}  # bytes per run
        self.peak = 0
        self.decodes = 0
        self.hits = 0

    def take(self, key: tuple[str, ChunkIndex], readers: int, load: Any, limit: int, run_limit: int) -> np.ndarray:
        """The chunk for one of its ``readers`` (its total count of reads), decoded by ``load`` if absent;
        ``limit`` caps this process's cache, ``run_limit`` what one run (the key's token) holds in it."""
        while True:
            with self.lock:
                block = self.chunks.get(key)
                if block is not None:
                    self.hits += 1
                    self.chunks.move_to_end(key)
                    self._count(key, readers)
                    return block
                waiting = self.loading.get(key)
                if waiting is None:  # this thread decodes it; another that needs it meanwhile waits for it
                    self.loading[key] = threading.Event()
                    break
            waiting.wait()
        try:
            block = load()
        finally:
            with self.lock:
                self.loading.pop(key).set()
        with self.lock:
            self.decodes += 1
            if self._count(key, readers) and 0 < block.nbytes <= min(limit, run_limit):
                token = key[0]
                self.chunks[key] = block
                self.nbytes += block.nbytes
                self.held[token] = self.held.get(token, 0) + block.nbytes
                while self.held[token] > run_limit:  # this run's least recently read chunk first
                    self._drop(next(k for k in self.chunks if k[0] == token))
                while self.nbytes > limit:
                    self._drop(next(iter(self.chunks)))
                self.peak = max(self.peak, self.nbytes)
        return block

    def _count(self, key: tuple[str, ChunkIndex], readers: int) -> bool:
        """Count one read; True while readers are still to come (drop the chunk when none are)."""
        done = self.reads.get(key, 0) + 1
        if done < readers:
            self.reads[key] = done
            return True
        self.reads.pop(key, None)
        self._drop(key)
        return False

    def _drop(self, key: tuple[str, ChunkIndex]) -> None:
        block = self.chunks.pop(key, None)
        if block is not None:
            self.nbytes -= block.nbytes
            left = self.held[key[0]] - block.nbytes
            if left:
                self.held[key[0]] = left
            else:
                del self.held[key[0]]

    def forget(self, token: str) -> None:
        with self.lock:
            for key in [k for k in self.chunks if k[0] == token]:
                self._drop(key)
            for key in [k for k in self.reads if k[0] == token]:
                del self.reads[key]


_CACHE = _Cache()


def forget(token: str) -> dict[str, int]:
    """Drop what one run left in this process's cache (its end, whatever its outcome); the cache's counters."""
    _CACHE.forget(token)
    return stats()


def stats() -> dict[str, int]:
    """Decodes, hits, bytes held now and at most, in this process (for benchmarks and tests)."""
    with _CACHE.lock:
        return {"decodes": _CACHE.decodes, "hits": _CACHE.hits, "bytes": _CACHE.nbytes, "peak_bytes": _CACHE.peak}


def chunks_of(chunks: Sequence[int], box: Sequence[tuple[int, int]]) -> list[ChunkIndex]:
    """The stored chunks (by index) that the box (a [lo, hi) per axis) touches."""
    ranges = [range(lo // c, (hi - 1) // c + 1) if hi > lo else range(0) for (lo, hi), c in zip(box, chunks)]
    return list(itertools.product(*ranges))


def reader_counts(chunks: Sequence[int], boxes: Iterable[Sequence[tuple[int, int]]]) -> dict[ChunkIndex, int]:
    """How many of the boxes read each stored chunk (what a plan hands its readers before anything runs)."""
    counts: dict[ChunkIndex, int] = {}
    for box in boxes:
        for index in chunks_of(chunks, box):
            counts[index] = counts.get(index, 0) + 1
    return counts


def run_limit(array: Any, rows: int = 3) -> int:
    """The bytes of ``rows`` rows of the array's stored chunks (a row: every chunk along the axes after the
    first spatial one): what one process may keep of a run.  One process reading every region in dask's order
    held at most two rows (15 of 64 chunks of an 8192² image)."""
    chunks, shape = array.chunks, array.shape
    per_chunk = int(np.prod(chunks)) * np.dtype(array.dtype).itemsize
    row = int(np.prod([-(-n // c) for n, c in zip(shape, chunks)])) // max(1, -(-shape[1] // chunks[1]))
    return rows * row * per_chunk


class CachedChunks:
    """Reads of a stored (zarr) array, or of an array-like that computes its chunks when read (a raster warped
    on read), through this process's cache of decoded chunks, for one run.

    ``token`` names the run (its chunks are its own); ``readers`` gives, for
    the chunks this reader's box touches, how many reads the whole run makes
    of each (:func:`reader_counts`); ``limit``: the most bytes of the run's
    chunks a process keeps (:func:`run_limit`; None: the budget alone).
    Picklable: the array, the token and the counts travel with a task.
    """

    def __init__(self, array: Any, token: str, readers: Mapping[ChunkIndex, int],
                 limit: int | None = None) -> None:
        self.array = array
        self.token = token
        self.readers = dict(readers)
        self.limit = limit

    def read(self, box: Sequence[tuple[int, int]]) -> np.ndarray:
        """The array's values in ``box`` (a [lo, hi) per axis of the array)."""
        limit = budget()
        if not limit:
            return np.asarray(self.array[tuple(slice(lo, hi) for lo, hi in box)])
        shape, chunks = self.array.shape, self.array.chunks
        out = np.empty([hi - lo for lo, hi in box], dtype=self.array.dtype)
        for index in chunks_of(chunks, box):
            whole = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, chunks, shape))
            block = _CACHE.take((self.token, index), self.readers.get(index, 1),
                                lambda whole=whole: np.asarray(self.array[whole]), limit,
                                limit if self.limit is None else self.limit)
            src, dst = [], []
            for i, c, (lo, hi) in zip(index, chunks, box):
                a, b = max(lo, i * c), min(hi, (i + 1) * c)
                src.append(slice(a - i * c, b - i * c))
                dst.append(slice(a - lo, b - lo))
            out[tuple(dst)] = block[tuple(src)]
        return out


__all__ = ["BUDGET_ENV", "CachedChunks", "budget", "chunks_of", "forget", "reader_counts", "run_limit", "stats"]
