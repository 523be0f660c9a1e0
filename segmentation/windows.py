"""The global sliding-window grid, fixed on the whole image before any chunking.

The grid follows MONAI's ``sliding_window_inference`` exactly (the reference
users compare against): an axis shorter than the ROI is padded symmetrically
to the ROI; the stride is ``int(roi * (1 - overlap))`` (at least 1, and the
whole ROI when the padded axis equals it); windows start at 0, stride,
2·stride, … and the last one is moved back to end at the edge.  Because the
grid depends only on the image shape, ROI and overlap, every chunking and
every worker count evaluates the very same windows.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

from storage.errors import ConfigError


def _axis_starts(size: int, roi: int, overlap: float) -> tuple[int, ...]:
    """Window starts along one (already padded) axis, as MONAI computes them."""
    interval = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    count = 1
    for d in range(int(math.ceil(size / interval))):
        if d * interval + roi >= size:
            count = d + 1
            break
    return tuple(i * interval - max(i * interval + roi - size, 0) for i in range(count))


@dataclass(frozen=True)
class WindowGrid:
    """Windows as per-axis start lists; the grid is their Cartesian product (row-major order).

    ``starts`` are in *image* coordinates: negative (and past the end) only
    along an axis shorter than the ROI, where the window covers zero padding.
    """

    shape: tuple[int, ...]
    roi: tuple[int, ...]
    overlap: tuple[float, ...]
    starts: tuple[tuple[int, ...], ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return math.prod(len(s) for s in self.starts)

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        return iter(itertools.product(*self.starts))

    def slices(self, start: Sequence[int]) -> tuple[slice, ...]:
        return tuple(slice(s, s + r) for s, r in zip(start, self.roi))


def make_grid(shape: Sequence[int], roi: Sequence[int], overlap: float | Sequence[float]) -> WindowGrid:
    shape = tuple(int(s) for s in shape)
    roi = tuple(int(r) for r in roi)
    if len(roi) != len(shape):
        raise ConfigError(None, f"roi {roi} has {len(roi)} axes but the image has {len(shape)} spatial axes")
    if any(r < 1 for r in roi):
        raise ConfigError(None, f"roi {roi} must be positive")
    if any(s < 1 for s in shape):
        raise ConfigError(None, f"image shape {shape} has an empty axis")
    ov = tuple(float(overlap) for _ in shape) if isinstance(overlap, (int, float)) else tuple(map(float, overlap))
    if len(ov) != len(shape) or any(not 0.0 <= o < 1.0 for o in ov):
        raise ConfigError(None, f"overlap {overlap} must be in [0, 1)")
    starts = []
    for size, r, o in zip(shape, roi, ov):
        padded = max(size, r)
        pad_lo = (padded - size) // 2  # MONAI pads diff//2 before, the rest after
        starts.append(tuple(s - pad_lo for s in _axis_starts(padded, r, o)))
    return WindowGrid(shape=shape, roi=roi, overlap=ov, starts=tuple(starts))
