"""Which output chunk owns which windows of the grid, and the few helpers that follow from it.

Each window belongs to exactly one output chunk, the one holding its
(clipped) end corner, so every window is evaluated once, by that chunk's
evaluate task (:mod:`segmentation.stitching`), over a region of the chunk
plus at most one ROI before it.  Where one owner holds many times the average
(few chunks an axis: the last chunk owns the clipped end windows), its windows
are split into parts (:func:`owner_parts`), each its own task, so that one task
does not set the run's critical path.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from segmentation.regions import Box
from segmentation.windows import WindowGrid


@dataclass(frozen=True)
class ChunkAxis:
    """One spatial axis of the plan: chunk bounds and which window starts each chunk owns."""

    bounds: tuple[int, ...]  # 0 = b0 < b1 < ... < bn = size
    owned: tuple[tuple[int, ...], ...]  # per chunk: starts of the windows it owns
    roi: int
    size: int

    @property
    def nchunks(self) -> int:
        return len(self.bounds) - 1

    def chunk(self, c: int) -> tuple[int, int]:
        return self.bounds[c], self.bounds[c + 1]

    def chunks_overlapping(self, lo: int, hi: int) -> range:
        first = bisect.bisect_right(self.bounds, lo) - 1
        last = bisect.bisect_left(self.bounds, hi) - 1
        return range(max(first, 0), min(last, self.nchunks - 1) + 1)


def make_axis(starts: Sequence[int], roi: int, chunks: Sequence[int], size: int) -> ChunkAxis:
    bounds = tuple(itertools.accumulate(chunks, initial=0))
    owned: list[list[int]] = [[] for _ in chunks]
    for s in starts:
        owned[bisect.bisect_right(bounds, min(s + roi, size) - 1) - 1].append(s)
    return ChunkAxis(bounds=bounds, owned=tuple(tuple(o) for o in owned), roi=roi, size=size)


def owner_parts(owned: tuple[tuple[int, ...], ...], cap: int) -> list[tuple[tuple[int, ...], ...]]:
    """An owner's windows (starts per axis) as the parts its evaluate tasks run: itself, or, holding more than
    twice ``cap`` windows, cut into ``ceil(n / cap)`` runs of consecutive starts along its axis with the most.

    A 256³ volume in 128³ chunks with a 96³ ROI gives its owners 1, 3, 3, 9, 3, 9, 9 and 27 of its 64
    windows: on two threads the 27-window task alone is most of the run.  Cut into three of 9, the region each
    reads shrinks with it (96 × 184² instead of 184³).  The parts depend on the grid and the chunks only, so
    the sums are as deterministic as before; a chunk adds the parts' pieces in owner, then part, order.
    """
    n = int(np.prod([len(o) for o in owned]))
    if cap < 1 or n <= 2 * cap:
        return [owned]
    axis = max(range(len(owned)), key=lambda a: len(owned[a]))
    starts = owned[axis]
    k = min(len(starts), -(-n // cap))
    if k < 2:
        return [owned]
    bounds = [round(i * len(starts) / k) for i in range(k + 1)]
    return [owned[:axis] + (starts[lo:hi],) + owned[axis + 1:] for lo, hi in zip(bounds, bounds[1:])]


def part_region(owned: tuple[tuple[int, ...], ...], roi: Sequence[int], shape: Sequence[int]) -> Box:
    """The input region an owner's (or a part's) windows cover, clipped to the image."""
    return tuple((max(min(s), 0), min(max(s) + r, size)) for s, r, size in zip(owned, roi, shape))


def assemble(box: Box, pieces: Sequence[tuple[Box, np.ndarray]], lead: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Copy the parts of blocks (each with its own box) that fall inside ``box``."""
    out = np.zeros(lead + tuple(hi - lo for lo, hi in box), dtype=dtype)
    for pbox, block in pieces:
        inter = [(max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(box, pbox)]
        if any(lo >= hi for lo, hi in inter):
            continue
        dst = tuple(slice(lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(inter, box))
        src = tuple(slice(lo - p0, hi - p0) for (lo, hi), (p0, _) in zip(inter, pbox))
        out[(Ellipsis,) + dst] = block[(Ellipsis,) + src]
    return out


def kept_windows(owned: tuple[tuple[int, ...], ...], region: Box, roi: Sequence[int],
                 valid: np.ndarray | None) -> list[tuple[int, ...]]:
    """The starts of the owned windows that see any valid pixel (all of them without a mask)."""
    kept = []
    for start in itertools.product(*owned):
        if valid is not None:
            win = tuple(slice(max(s, r0) - r0, min(s + r, r1) - r0) for s, r, (r0, r1) in zip(start, roi, region))
            if not valid[win].any():
                continue
        kept.append(start)
    return kept


def window_counts(owned: tuple[tuple[int, ...], ...], region: Box, roi: tuple[int, ...],
                  mask_blocks: list[tuple[Box, np.ndarray]]) -> tuple[int, int]:
    """(evaluated, skipped) windows of one owner, from the mask alone: the same rule as the evaluate task's
    (:func:`kept_windows`).

    A task of its own, not a second output of the evaluate: a graph that
    optimises the evaluate into its one consumer (Dask fuses linear chains)
    and also asks for the counts would otherwise run that evaluate twice.
    """
    total = int(np.prod([len(o) for o in owned]))
    evaluated = len(kept_windows(owned, region, roi, assemble(region, mask_blocks, (), bool)))
    return evaluated, total - evaluated


def weight_sum(box: Box, grid: WindowGrid, weights: np.ndarray) -> np.ndarray:
    """Σ w over every grid window touching ``box``: data-independent, so recomputed, never shipped."""
    out = np.zeros(tuple(hi - lo for lo, hi in box), dtype=np.float32)
    per_axis = [[s for s in starts if s < hi and s + r > lo]
                for starts, r, (lo, hi) in zip(grid.starts, grid.roi, box)]
    for start in itertools.product(*per_axis):
        inter = [(max(s, lo), min(s + r, hi)) for s, r, (lo, hi) in zip(start, grid.roi, box)]
        dst = tuple(slice(a - lo, b - lo) for (a, b), (lo, _) in zip(inter, box))
        src = tuple(slice(a - s, b - s) for (a, b), s in zip(inter, start))
        out[dst] += weights[src]
    return out


__all__ = ["ChunkAxis", "assemble", "kept_windows", "make_axis", "owner_parts", "part_region", "weight_sum",
           "window_counts"]
