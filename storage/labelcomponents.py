"""Where to cut a label volume: a voxel at the centre of each class's largest connected component, inside it.

A plane through the volume's middle misses a lesion of a few voxels; planes
through its largest component's centre show it.  The volume is not held:
components are first found on the census's block grids (6-connected, a block
set where any voxel is), sized by their exact voxel counts.  Only the box of
the largest is then read again, at full detail when it has at most
:data:`COMPONENT_VOXELS` voxels (else reduced by blocks again, at the price of
joining components closer than such a block), restricted to that coarse
component.  Blocks may join small components into one coarse one that
outweighs the largest real one, so the next coarse components are read too
while they could still hold a larger one (at most :data:`REFINES` reads).  After
a reduced read, a window around its centre is read at full detail to pick a
voxel of the component itself, not of a speck joined to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from storage.labelcensus import LabelCensus, block_sums, class_grids, grid_dtype
from storage.volumeslabs import Box, LabelVolume

__all__ = ["COMPONENT_VOXELS", "REFINES", "component_centres"]

COMPONENT_VOXELS = 1 << 22  # a box read at full detail has at most this many voxels (4 MiB as a mask)
REFINES = 6  # coarse components read again per class, largest first
_CHUNK = 1 << 18  # grid cells summed at a time: whole-grid sums would copy the grid to 8-byte numbers


def component_centres(volume: LabelVolume, census: LabelCensus, values: Sequence[int]) -> list[tuple[int, int, int]]:
    """For each value, the voxel (i, j, k) at the centre of its largest 6-connected component, inside it.

    The first reads of all values share one pass over the file, so do the
    windows read around reduced centres.
    """
    grids = {v: census.grids[v] for v in values if v in census.grids}
    grids.update(class_grids(volume, census, [v for v in values if v not in grids]))
    searches = [_Search(v, grids.pop(v), census) for v in values]
    first = [s.next() for s in searches]
    _read(volume, first)
    for s, read in zip(searches, first):
        s.take(read)
    for s in searches:
        while s.wants_more():
            read = s.next()
            _read(volume, [read])
            s.take(read)
    windows = [s.window() for s in searches]
    _read(volume, [w for w in windows if w is not None])
    return [s.centre(w) for s, w in zip(searches, windows)]


def _read(volume: LabelVolume, reads: list[_BoxRead]) -> None:
    for n, voxels, k in volume.boxes([r.box for r in reads]):
        reads[n].add(voxels, k)
    for r in reads:
        r.done()


class _Search:
    """One class's coarse components, largest first, and the best full-detail component read so far."""

    def __init__(self, value: int, grid: np.ndarray, census: LabelCensus) -> None:
        self.value, self.block = value, census.block
        self.lo, self.hi = census.lo[value], census.hi[value]
        parts, n = ndimage.label(grid)
        sizes = _sizes(parts, n, grid)
        order = np.argsort(-sizes, kind="stable")[:REFINES]  # ties: the first in scan order, as ndimage numbers them
        objects = ndimage.find_objects(parts)
        self.sizes = [float(sizes[c]) for c in order]
        self.candidates = []
        for c in order:
            where = objects[c]
            own = parts[where] == c + 1
            others = (grid[where] > 0) & ~own  # other components of the class inside this one's block box
            self.candidates.append((where, own if others.any() else None))
        self.tried = 0
        self.best: _BoxRead | None = None

    def next(self) -> _BoxRead:
        where, own = self.candidates[self.tried]
        self.tried += 1
        b = self.block
        box = tuple((max(s.start * b, int(lo)), min(s.stop * b, int(hi) + 1)) for s, lo, hi in zip(where, self.lo, self.hi))
        return _BoxRead(self.value, box, self.lo, coarse=own, coarse_at=tuple(s.start for s in where), block=b)

    def take(self, read: _BoxRead) -> None:
        if self.best is None or read.size > self.best.size:
            self.best = read

    def wants_more(self) -> bool:
        """Another coarse component could hold a larger component than the best one read."""
        return self.tried < len(self.candidates) and self.best is not None and self.sizes[self.tried] > self.best.size

    def window(self) -> _BoxRead | None:
        """A full-detail read around the centre cell when the best component was found on reduced blocks.

        Reduced blocks join a component with specks near it; in a window of
        up to COMPONENT_VOXELS voxels at its centre the component outweighs
        them, so the window's largest piece is taken as the component.
        """
        best = self.best
        assert best is not None
        if best.step == 1:
            return None
        s, side = best.step, max(best.step, int(COMPONENT_VOXELS ** (1 / 3)))
        box = []
        for (o, e), c in zip(best.box, best.cell):
            start = max(o, min(o + c * s + s // 2 - side // 2, e - side))
            box.append((start, min(start + side, e)))
        target = [o + c * s + (s - 1) / 2 for (o, _), c in zip(best.box, best.com)]
        return _BoxRead(self.value, tuple(box), self.lo, coarse=best.coarse, coarse_at=best.coarse_at,
                        block=best.block, step=1, target=target)

    def centre(self, window: _BoxRead | None) -> tuple[int, int, int]:
        if window is not None:
            return window.nearest
        best = self.best
        assert best is not None
        return tuple(o + c for (o, _), c in zip(best.box, best.cell))  # type: ignore[return-value]


class _BoxRead:
    """Voxels of ``value`` in a box, kept to one coarse component where ``coarse`` is given, reduced by ``step``.

    Fed slab by slab (:meth:`add`); :meth:`done` then finds the largest
    6-connected component on the (reduced) grid and keeps only numbers:
    :attr:`size` (voxels), :attr:`com` (voxel-weighted centre, in grid cells),
    :attr:`cell` (the cell in it at that centre) or, when a ``target`` voxel
    is given, :attr:`nearest` (the component's voxel nearest it).
    """

    def __init__(self, value: int, box: Box, origin: np.ndarray, *, coarse: np.ndarray | None,
                 coarse_at: tuple[int, ...], block: int, step: int | None = None,
                 target: Sequence[float] | None = None) -> None:
        self.value, self.box, self.origin, self.target = value, box, origin, target
        self.coarse, self.coarse_at, self.block = coarse, coarse_at, block
        lengths = [e - o for o, e in box]
        self.step = step or max(1, math.ceil((math.prod(lengths) / COMPONENT_VOXELS) ** (1 / 3) - 1e-9))
        self.dtype = grid_dtype(self.step)
        shape = tuple(math.ceil(n / self.step) for n in lengths)
        self.grid: np.ndarray | None = np.zeros(shape, dtype=bool if self.step == 1 else self.dtype)
        self.size = 0.0

    def add(self, voxels: np.ndarray, k: int) -> None:
        """Slices k.. of the box (all of its i and j)."""
        assert self.grid is not None
        mask = voxels == self.value
        if self.coarse is not None:
            self._keep_coarse(mask, k)
        rel, s = k - self.box[2][0], self.step
        if s == 1:
            self.grid[:, :, rel:rel + mask.shape[2]] = mask
            return
        for c in range(rel // s, (rel + mask.shape[2] - 1) // s + 1):
            part = mask[:, :, max(c * s, rel) - rel:min((c + 1) * s, rel + mask.shape[2]) - rel]
            self.grid[:, :, c] += block_sums(part.sum(axis=2, dtype=np.uint16), s, self.dtype)

    def _keep_coarse(self, mask: np.ndarray, k: int) -> None:
        """Clear voxels outside the coarse component's blocks (another component of the class shares the box)."""
        assert self.coarse is not None
        b = self.block
        ci = np.arange(*self.box[0]) // b - self.coarse_at[0]
        cj = np.arange(*self.box[1]) // b - self.coarse_at[1]
        layers = (np.arange(k, k + mask.shape[2]) // b) - self.coarse_at[2]
        for layer in np.unique(layers):
            t = np.flatnonzero(layers == layer)
            mask[:, :, t[0]:t[-1] + 1] &= self.coarse[:, :, layer][np.ix_(ci, cj)][:, :, None]

    def done(self) -> None:
        """The largest component's numbers; the grid is dropped."""
        grid, self.grid = self.grid, None
        assert grid is not None
        parts, n = ndimage.label(grid)
        if not n:
            return
        sizes = _sizes(parts, n, grid)
        best = int(np.argmax(sizes)) + 1
        self.size = float(sizes[best - 1])
        self.com = _centre_of_mass(grid, parts, best)
        del grid
        part = parts == best
        del parts
        if self.target is None:
            shift = [o - int(c) for (o, _), c in zip(self.box, self.origin)] if self.step == 1 else [0, 0, 0]
            self.cell = _inside(part, self.com, shift)
        else:
            near = _nearest(part, [t - o for t, (o, _) in zip(self.target, self.box)])
            self.nearest = tuple(o + c for (o, _), c in zip(self.box, near))


def _sizes(parts: np.ndarray, n: int, weights: np.ndarray) -> np.ndarray:
    """Voxels in each component 1..n (``weights``: voxels per cell, or a mask), a few k slices at a time."""
    sizes = np.zeros(n + 1, dtype=np.float64)
    step = max(1, _CHUNK // max(1, parts.shape[0] * parts.shape[1]))
    for k in range(0, parts.shape[2], step):
        w = None if weights.dtype == bool else weights[:, :, k:k + step].ravel()
        sizes += np.bincount(parts[:, :, k:k + step].ravel(), weights=w, minlength=n + 1)
    return sizes[1:]


def _centre_of_mass(weights: np.ndarray, parts: np.ndarray, label: int) -> np.ndarray:
    """Weighted centre of component ``label`` in grid cells, from exact integer sums, a few k slices at a time."""
    sums, total = np.zeros(3, dtype=np.int64), 0
    step = max(1, _CHUNK // max(1, parts.shape[0] * parts.shape[1]))
    for k in range(0, parts.shape[2], step):
        w = weights[:, :, k:k + step] * (parts[:, :, k:k + step] == label)
        total += int(w.sum(dtype=np.int64))
        for axis in range(3):
            along = w.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64)
            sums[axis] += int(np.dot(along, np.arange(len(along)) + (k if axis == 2 else 0)))
    return sums / total


def _inside(mask: np.ndarray, centre: np.ndarray, shift: Sequence[int]) -> tuple[int, int, int]:
    """The cell at ``centre`` when it lies in the component, else the nearest one in it in the nearest k slice.

    A ring's or a C-shape's centroid is outside it; planes through there
    would miss the structure they were meant to show.  At full detail the
    centre is rounded relative to the class's box (``shift``: this box's
    offset from it), as a search over the class's box would round it.
    """
    c = tuple(int(round(float(x) + s)) - s for x, s in zip(centre, shift))
    if all(0 <= v < n for v, n in zip(c, mask.shape)) and mask[c]:
        return c  # type: ignore[return-value]
    ks = np.flatnonzero(mask.any(axis=(0, 1)))
    k = int(ks[np.argmin(np.abs(ks - centre[2]))])
    ii, jj = np.nonzero(mask[:, :, k])
    n = int(np.argmin((ii - centre[0]) ** 2 + (jj - centre[1]) ** 2))
    return int(ii[n]), int(jj[n]), k


def _nearest(mask: np.ndarray, target: Sequence[float]) -> tuple[int, int, int]:
    """The voxel of ``mask`` nearest ``target`` (ties: the first in i, j, k order), one k slice at a time."""
    best: tuple[float, int, int, int] | None = None
    for k in np.flatnonzero(mask.any(axis=(0, 1))):
        ii, jj = np.nonzero(mask[:, :, k])
        d = (ii - target[0]) ** 2 + (jj - target[1]) ** 2 + (k - target[2]) ** 2
        n = int(np.argmin(d))
        if best is None or (float(d[n]), int(ii[n]), int(jj[n]), int(k)) < best:
            best = (float(d[n]), int(ii[n]), int(jj[n]), int(k))
    assert best is not None
    return best[1], best[2], best[3]
