"""A work array on disk that tasks write chunk by chunk and read back by region, for one run's scratch data.

The model-space way back reads the stitched probabilities (model grid) in
regions a pixel or two wider than the model chunks they come from, once
those chunks are written (:class:`storage.wayback.RasterWayBack`).  As a zarr
array this cost about 1 ms of codec and store machinery per stored chunk, and
a region with its halo touches up to sixteen 256² chunks: 9 ms for a 514²
region against 1 ms of copying (one thread, this project's CPU).  Here every
chunk is its own ``.npy`` file, written once (to a temporary name, then
renamed, so a reader never sees half a chunk), and a region is read through
memory maps of the files it touches: only the bytes it needs.  Nothing is
compressed (a trained model's float32 probabilities compressed 1.2x with
LZ4).  The files live in the run's work folder and go with it.

With reader counts (:meth:`ChunkFiles.counted`) a chunk's file is deleted
once every task that reads it has read it: each reader leaves a marker, and
the one that makes the count deletes the file.  A 16384² scene's way back
staged 1.3 GB of probabilities, all of it new page cache; deleted as it is
read, the next chunks are written into memory the kernel just freed.  On this
project's CPU machines new memory is the slow kind (docs/performance.md,
"Fresh memory"): the way back's finalise-and-stage tasks took 11.4 s there,
2.3-3.0 s with the files deleted (one run each, 2 threads).

When one worker runs every task, the chunks can also stay in that worker's
memory (``memory``, a byte budget shared by every work array of the
process): a write then keeps the stitched array itself, a read copies from
it, and the last reader drops it.  Writing a file put the chunk into new
page cache at about 10 s per GB on these machines: at 8192² (5 m to 10 m)
the way back's 16 staged writes took 1.2-2.1 thread-seconds, a third of what
the warp added to the sliding window.  Past the budget, chunks go to files as
before, so memory stays bounded however wide the scene.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import os
import shutil
import threading
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

__all__ = ["ChunkFiles", "forget", "stage"]

# What a work array stores: a whole chunk (i, j), or (i, j, "top"), (i, j, "left"), (i, j, "top-left") and so on,
# copies of its border ChunkFiles.strip rows, columns or corners kept apart for the readers that need no more of it
# (ChunkFiles.parts_of)
Key = tuple[Any, ...]


class _Held:
    """The chunks work arrays keep in this process's memory, within one byte budget for all of them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.chunks: dict[str, dict[Key, np.ndarray]] = {}
        self.readers: dict[tuple[Any, ...], set[str]] = {}
        self.nbytes = 0
        self.peak = 0  # the most held at once (benchmarks report it)
        self.closed: set[str] = set()  # forgotten arrays: a late write of an abandoned run keeps nothing

    def put(self, path: str, ij: Key, block: np.ndarray, budget: int) -> bool:
        """Keep ``block`` as piece ``ij`` of ``path`` if the budget allows (True: kept, or dropped as closed)."""
        with self.lock:
            if path in self.closed:
                return True
            old = self.chunks.get(path, {}).get(ij)
            size = block.nbytes - (0 if old is None else old.nbytes)
            if self.nbytes + size > budget:
                return False
            self.chunks.setdefault(path, {})[ij] = block
            self.readers.pop((path, *ij), None)  # a rewrite is read afresh
            self.nbytes += size
            self.peak = max(self.peak, self.nbytes)
            return True

    def get(self, path: str, ij: Key) -> np.ndarray | None:
        with self.lock:
            return self.chunks.get(path, {}).get(ij)

    def drop(self, path: str, ij: Key) -> None:
        with self.lock:
            block = self.chunks.get(path, {}).pop(ij, None)
            self.readers.pop((path, *ij), None)
            if block is not None:
                self.nbytes -= block.nbytes

    def read(self, path: str, ij: Key, reader: str, count: int) -> bool:
        """Count ``reader`` for a held piece, dropping it at ``count``; False when the piece is not held."""
        with self.lock:
            held = self.chunks.get(path, {})
            if ij not in held:
                return False
            seen = self.readers.setdefault((path, *ij), set())
            seen.add(reader)
            if len(seen) >= count:
                self.nbytes -= held.pop(ij).nbytes
                del self.readers[(path, *ij)]
            return True

    def forget(self, path: str) -> None:
        with self.lock:
            self.closed.add(path)
            for block in self.chunks.pop(path, {}).values():
                self.nbytes -= block.nbytes
            for key in [k for k in self.readers if k[0] == path]:
                del self.readers[key]


_HELD = _Held()


def forget(path: str | os.PathLike[str]) -> int:
    """Drop what the work array at ``path`` holds in this process's memory (a run's end, whatever its outcome);
    later writes to it keep nothing.  Returns the most bytes held at once by any work array so far."""
    _HELD.forget(str(path))
    return _HELD.peak


class ChunkFiles:
    """A (C, H, W) array stored as one ``.npy`` file per spatial chunk of a dask chunk grid.

    Read with ``[c, rows, cols]`` (``c`` a slice or an index, ``rows`` and
    ``cols`` slices with step 1), as :mod:`storage.warp`'s tasks read a
    stored source.  Picklable: it is a path and the chunk grid.

    With ``strip`` rows, each chunk's first and last ``strip`` rows and
    columns (and the corners where they cross) are also kept apart, as small
    copies: a region that takes no more of a chunk than those reads the copy
    (:meth:`parts_of`), so with reader counts the whole chunk goes as soon as
    the readers that need more of it have read it.  The way back's readers of
    one model chunk read a pixel or two of its neighbours; without the copies
    each chunk was held until its neighbours were stitched (about two rows of
    chunks at once: 419 MB at 16384², 5 m to 10 m).
    """

    def __init__(self, path: str | os.PathLike[str], shape: tuple[int, ...], dtype: Any,
                 chunks: tuple[tuple[int, ...], tuple[int, ...]], memory: int = 0, strip: int = 0,
                 keep: set[Key] | None = None) -> None:
        self.path = str(path)
        self.store = self.path  # what a tokenizer names the array by, as for a zarr array
        self.shape = tuple(int(n) for n in shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(dtype)
        self.bounds = [tuple(itertools.accumulate(c, initial=0)) for c in chunks]
        self.readers: dict[Key, int] | None = None
        self.memory = int(memory)  # chunks kept in this process's memory within this many bytes (one worker only)
        self.strip = int(strip)  # rows and columns along each chunk's borders kept apart (0: none)
        self.keep = keep  # the pieces (parts_of's keys) that are read: only these are stored (None: all)

    def _file(self, key: Key) -> Path:
        return Path(self.path) / (".".join(map(str, key)) + ".npy")

    def _marks(self, key: Key) -> Path:
        return Path(self.path) / ".read" / ".".join(map(str, key))

    def parts_of(self, rows: tuple[int, int], cols: tuple[int, int]) -> list[Key]:
        """What a region [rows) x [cols) reads, per chunk (i, j) it touches: where it takes no more than the
        chunk's first or last :attr:`strip` rows (and not all of them), or columns, the strip or the corner that
        holds what it takes, (i, j, "top"), (i, j, "left"), (i, j, "top-left") and so on; else (i, j)."""
        out: list[Key] = []
        for i in _touched(self.bounds[0], *rows):
            a0, a1 = self.bounds[0][i:i + 2]
            across = self._part(a0, a1, max(rows[0], a0), min(rows[1], a1), ("top", "bottom"))
            for j in _touched(self.bounds[1], *cols):
                b0, b1 = self.bounds[1][j:j + 2]
                along = self._part(b0, b1, max(cols[0], b0), min(cols[1], b1), ("left", "right"))
                name = "-".join(p for p in (across, along) if p)
                out.append((i, j, name) if name else (i, j))
        return out

    def _part(self, a0: int, a1: int, y0: int, y1: int, names: tuple[str, str]) -> str:
        k = self.strip
        if k and y1 - y0 < a1 - a0:
            if y0 == a0 and y1 - a0 <= k:
                return names[0]
            if y1 == a1 and a1 - y0 <= k:
                return names[1]
        return ""

    def counted(self, readers: dict[Key, int]) -> "ChunkFiles":
        """This array, whose piece ``key`` (:meth:`parts_of`) is deleted once ``readers[key]`` distinct readers
        :meth:`release` it.

        Only for a run whose tasks all run in one worker: a reader recomputed
        after its chunk was deleted would find nothing.  In one worker a lost
        worker loses the chunks' writes too, and their rewrite clears the
        markers, so a chunk can outlive its readers but never the reverse.
        """
        out = copy.copy(self)
        out.readers = dict(readers)
        return out

    def release(self, rows: tuple[int, int], cols: tuple[int, int], reader: str) -> None:
        """``reader`` has read the region [rows) x [cols): delete each piece every counted reader has read."""
        if self.readers is None:
            return
        for key in self.parts_of(rows, cols):
            count = self.readers.get(key, 1 << 62)
            if self.memory and _HELD.read(self.path, key, reader, count):
                continue
            marks = self._marks(key)
            marks.mkdir(parents=True, exist_ok=True)
            (marks / reader).touch()
            if len(os.listdir(marks)) >= count:
                self._file(key).unlink(missing_ok=True)

    def write(self, block: np.ndarray, rows: tuple[int, int], cols: tuple[int, int]) -> None:
        """Store the chunk whose box is ``rows`` x ``cols`` (a whole chunk of the grid), and its strips."""
        i, j = self.bounds[0].index(rows[0]), self.bounds[1].index(cols[0])
        if (self.bounds[0][i + 1], self.bounds[1][j + 1]) != (rows[1], cols[1]):
            raise ValueError(f"{rows} x {cols} is not one chunk of {self.path}")
        self._store((i, j), block)
        if self.strip:
            h, w = block.shape[1:]
            k, m = min(self.strip, h), min(self.strip, w)
            for across, ys in (("", slice(None)), ("top", slice(0, k)), ("bottom", slice(h - k, h))):
                for along, xs in (("", slice(None)), ("left", slice(0, m)), ("right", slice(w - m, w))):
                    if across or along:
                        name = "-".join(p for p in (across, along) if p)
                        self._store((i, j, name), np.array(block[:, ys, xs], dtype=self.dtype))

    def _store(self, key: Key, block: np.ndarray) -> None:
        if self.keep is not None and key not in self.keep:
            return  # nobody reads it: kept, it would never be counted out
        target = self._file(key)
        if self.memory:
            block = np.ascontiguousarray(block, dtype=self.dtype)
            if _HELD.put(self.path, key, block, self.memory):
                target.unlink(missing_ok=True)  # an earlier write's file must not outlive this one
                return
            _HELD.drop(self.path, key)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._marks(key), ignore_errors=True)  # a rewrite is read afresh: never deleted early
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(block, dtype=self.dtype))
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def __getitem__(self, key: Any) -> np.ndarray:
        planes, rows, cols = key
        spans = []
        for k, n in ((rows, self.shape[1]), (cols, self.shape[2])):
            lo, hi, step = k.indices(n)
            if step != 1:
                raise IndexError(f"{self.path} is read by slices with step 1, not {key!r}")
            spans.append((lo, max(lo, hi)))
        (r0, r1), (c0, c1) = spans
        out = np.empty((self.shape[0], r1 - r0, c1 - c0), dtype=self.dtype)
        for part in self.parts_of((r0, r1), (c0, c1)):
            i, j = part[:2]
            (a0, a1), (b0, b1) = self.bounds[0][i:i + 2], self.bounds[1][j:j + 2]
            y0, y1, x0, x1 = max(r0, a0), min(r1, a1), max(c0, b0), min(c1, b1)
            chunk = _HELD.get(self.path, part) if self.memory else None
            if chunk is None:
                chunk = np.load(self._file(part), mmap_mode="r")
            name = part[2] if len(part) > 2 else ""  # where the rows and columns this piece holds start:
            top = a1 - chunk.shape[1] if name.startswith("bottom") else a0
            left = b1 - chunk.shape[2] if name.endswith("right") else b0
            out[:, y0 - r0:y1 - r0, x0 - c0:x1 - c0] = chunk[:, y0 - top:y1 - top, x0 - left:x1 - left]
        return out[planes]


def _touched(bounds: tuple[int, ...], lo: int, hi: int) -> range:
    """The chunks along one axis that [lo, hi) overlaps."""
    if hi <= lo:
        return range(0)
    return range(bisect.bisect_right(bounds, lo) - 1, bisect.bisect_left(bounds, hi))


def stage(array: da.Array, path: str | os.PathLike[str], memory: int = 0, strip: int = 0,
          keep: set[Key] | None = None) -> tuple[ChunkFiles, da.Array]:
    """(:class:`ChunkFiles` at ``path``, tokens): ``array`` written chunk by chunk as it is computed, and a
    (1, n, m) grid of tiny blocks, one per spatial chunk of ``array``, each computed once that chunk is written
    (what readers wait for).  ``memory``: chunks kept in the worker's memory within that many bytes, when one
    worker runs every task (the writers and the readers must share a process); ``path`` then names one run's
    array only, as :func:`forget` closes it for good in the worker.  ``strip`` and ``keep``: as
    :class:`ChunkFiles` takes them."""
    shutil.rmtree(path, ignore_errors=True)  # an earlier run's chunks: never read in place of this run's
    array = array.rechunk({0: -1})
    target = ChunkFiles(path, array.shape, array.dtype, tuple(array.chunks[1:]), memory,  # type: ignore[arg-type]
                        strip, keep)
    tokens = array.map_blocks(partial(_stage_block, target), dtype=bool, chunks=(1, 1, 1))
    return target, tokens


def _stage_block(target: ChunkFiles, block: np.ndarray, block_info: Any = None) -> np.ndarray:
    (_, _), rows, cols = block_info[0]["array-location"]
    target.write(block, rows, cols)
    return np.ones((1, 1, 1), dtype=bool)
