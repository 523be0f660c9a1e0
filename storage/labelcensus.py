"""How many voxels of each label value a volume holds, and roughly where, from one streaming pass.

A quicklook's legend gives exact volumes, so every voxel is counted; its
planes go through each class's largest connected component, so it must know
where each class lies.  Holding the label volume for that costs memory in
proportion to the scan.  Instead one pass over bounded slabs keeps, per
value, its voxel count and exact bounding box and, per class, a grid of voxel
counts in blocks of ``block``³ voxels.  ``block`` is chosen so the grid has at
most :data:`CELLS` cells whatever the volume's size, so memory stays flat; the
components found on that grid say which boxes to read again at full detail.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from storage.volumeslabs import LabelVolume

__all__ = ["CELLS", "LabelCensus", "block_sums", "class_grids", "grid_dtype", "take_census"]

CELLS = 1 << 20  # at most this many blocks in a class's grid (2 MiB of uint16 counts)
FEW_VALUES = 8  # values up to this are looked for one by one (cheaper than a bincount of the slab)


@dataclass
class LabelCensus:
    """Voxels per value (index = value, background 0 included), each value's box, and per-class block grids."""

    shape: tuple[int, int, int]
    counts: np.ndarray
    lo: np.ndarray  # (values, 3): the first voxel index per axis holding the value
    hi: np.ndarray  # (values, 3): the last
    block: int
    grids: dict[int, np.ndarray] = field(default_factory=dict)  # value -> voxels per block

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        return tuple(math.ceil(n / self.block) for n in self.shape)  # type: ignore[return-value]


def block_for(shape: Sequence[int]) -> int:
    """The block side that keeps a grid over ``shape`` within CELLS cells (1: the grid is the volume)."""
    return max(1, math.ceil((math.prod(shape) / CELLS) ** (1 / 3) - 1e-9))


def grid_dtype(block: int) -> np.dtype:
    """An unsigned type that holds a full block's count."""
    return np.dtype(np.uint16 if block ** 3 <= np.iinfo(np.uint16).max else np.uint32)


def block_sums(plane: np.ndarray, block: int, dtype: np.dtype) -> np.ndarray:
    """A 2-D plane summed over ``block`` x ``block`` cells (the last ones may be smaller)."""
    if block == 1:
        return plane.astype(dtype, copy=False)
    rows = np.add.reduceat(plane, np.arange(0, plane.shape[0], block), axis=0, dtype=dtype)
    return np.add.reduceat(rows, np.arange(0, plane.shape[1], block), axis=1, dtype=dtype)


def take_census(volume: LabelVolume, *, track: int) -> LabelCensus:
    """Every value's count and box in one pass, with block grids for every class while at most ``track`` are present.

    With more classes than that the grids would cost ``classes`` times the
    grid; they are dropped, and :func:`class_grids` reads the few wanted ones.
    """
    scan = _Scan(volume, block_for(volume.shape), wanted=None, track=track)
    scan.run(0, volume.shape[2])
    top = int(np.flatnonzero(scan.counts)[-1]) if scan.counts.any() else 0
    counts = scan.counts[:top + 1].copy()
    counts[0] = math.prod(volume.shape) - int(counts[1:].sum())
    return LabelCensus(volume.shape, counts, scan.lo[:top + 1].copy(), scan.hi[:top + 1].copy(), scan.block,
                       scan.grids if scan.grids is not None else {})


def class_grids(volume: LabelVolume, census: LabelCensus, values: Sequence[int]) -> dict[int, np.ndarray]:
    """Block grids of ``values`` from a second pass over the slices that hold them."""
    values = [v for v in values if census.counts[v] > 0]
    if not values:
        return {}
    scan = _Scan(volume, census.block, wanted=values, track=len(values))
    scan.run(min(int(census.lo[v, 2]) for v in values), max(int(census.hi[v, 2]) for v in values) + 1)
    return scan.grids or {}


class _Scan:
    """The state of one pass: counts, boxes and (while tracked) grids, updated a block of k slices at a time."""

    def __init__(self, volume: LabelVolume, block: int, wanted: Sequence[int] | None, track: int) -> None:
        self.volume, self.block, self.wanted, self.track = volume, block, wanted, track
        size = int(np.iinfo(volume.dtype).max) + 1
        self.counts = np.zeros(size, dtype=np.int64)
        self.lo = np.full((size, 3), -1, dtype=np.int64)
        self.hi = np.full((size, 3), -1, dtype=np.int64)
        self.grids: dict[int, np.ndarray] | None = {}
        self.dtype = grid_dtype(block)
        self.grid_shape = tuple(math.ceil(n / block) for n in volume.shape)

    def run(self, k0: int, k1: int) -> None:
        b = self.block
        depth = b * max(1, self.volume.slab_depth(2) // b)  # whole blocks per slab
        for ks, slab in self.volume.slabs(k0 - k0 % b, k1, depth):
            values = self._values(slab)
            for kb in range(0, slab.shape[2], b):
                sub = slab[:, :, kb:kb + b]
                for v in values:
                    self._add(sub, int(v), ks + kb)

    def _values(self, slab: np.ndarray) -> Iterable[int]:
        """Non-zero values that may be in the slab (absent ones cost a comparison and are skipped)."""
        top = int(slab.max()) if slab.size else 0
        if self.wanted is not None:
            return [v for v in self.wanted if v <= top]
        if top <= FEW_VALUES:
            return range(1, top + 1)
        return np.flatnonzero(np.bincount(slab.ravel(order="K"), minlength=top + 1)[1:]) + 1

    def _add(self, sub: np.ndarray, v: int, k: int) -> None:
        mask = sub == v
        plane = mask.sum(axis=2, dtype=np.uint16) if mask.shape[2] > 1 else mask[:, :, 0]
        n = int(np.count_nonzero(plane)) if plane.dtype == bool else int(plane.sum())
        if not n:
            return
        if not self.counts[v] and self.grids is not None and self.wanted is None:
            if len(self.grids) >= self.track:
                self.grids = None  # too many classes to keep a grid each: a second pass reads the wanted ones
        self.counts[v] += n
        depth = mask.shape[2]
        k_first = next(t for t in range(depth) if mask[:, :, t].any())  # usually the first slice looked at
        k_last = next(t for t in reversed(range(depth)) if mask[:, :, t].any())
        i_any, j_any = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
        first = (int(i_any[0]), int(j_any[0]), k + k_first)
        last = (int(i_any[-1]), int(j_any[-1]), k + k_last)
        lo, hi = self.lo[v], self.hi[v]
        for a in range(3):
            lo[a] = first[a] if lo[a] < 0 else min(int(lo[a]), first[a])
            hi[a] = max(int(hi[a]), last[a])
        if self.grids is not None:
            if v not in self.grids:
                self.grids[v] = np.zeros(self.grid_shape, dtype=self.dtype)
            self.grids[v][:, :, k // self.block] = block_sums(plane, self.block, self.dtype)
