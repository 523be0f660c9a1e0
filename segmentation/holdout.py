"""Spatial hold-out: train on one part of a large image, validate on the rest.

A single big scene has no second case to validate on, so it is cut along one
axis ("train on the left half, evaluate on the right").  The two parts are
:class:`Region` views: they translate every index into the underlying
array-like (numpy, zarr, a masked label reader) and never copy it, so a
20000² scene split in two still costs the memory of the patches read.
Nothing reading a view can reach pixels outside its box, which is what keeps
training patches out of the validation part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from storage.errors import ConfigError

# the spatial axis each name means, counted from the end: x = columns, y = rows, z = slices
AXES = {"x": 1, "y": 2, "z": 3}


@dataclass(frozen=True)
class Holdout:
    """Keep the first ``fraction`` of the image along ``axis`` for training, validate on the rest; a negative
    ``fraction`` keeps the last part instead (``y:-0.5``: train on the far half along y, e.g. a RAS volume's
    anterior half, and validate on the near one)."""

    axis: str
    fraction: float

    @classmethod
    def parse(cls, text: str) -> "Holdout":
        """``AXIS:FRACTION`` as the command line takes it, e.g. ``x:0.5`` (or ``x:-0.5``, the last half)."""
        axis, sep, value = str(text).strip().partition(":")
        axis = axis.strip().lower()
        try:
            fraction = float(value)
        except ValueError:
            fraction = math.nan
        if not sep or axis not in AXES or not 0.0 < abs(fraction) < 1.0:
            raise ConfigError(None, f"holdout {text!r} is not AXIS:FRACTION with AXIS x, y or z and FRACTION "
                                    "strictly between 0 and 1, or between -1 and 0 for the last part (e.g. "
                                    "x:0.5, y:-0.5)")
        return cls(axis, fraction)

    def boxes(self, spatial: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """The (training, validation) boxes of an image of this spatial shape."""
        position = AXES[self.axis]
        if position > len(spatial):
            raise ConfigError(None, f"holdout axis {self.axis} does not exist in a {len(spatial)}-D image")
        axis = len(spatial) - position
        size = spatial[axis]
        cut = int(round(size * self.fraction)) if self.fraction > 0 else size - int(round(size * -self.fraction))
        if not 0 < cut < size:
            raise ConfigError(None, f"holdout {self} leaves nothing on one side of an image {size} pixels "
                                    f"along {self.axis}")
        first = tuple(slice(0, cut) if a == axis else slice(0, s) for a, s in enumerate(spatial))
        last = tuple(slice(cut, size) if a == axis else slice(0, s) for a, s in enumerate(spatial))
        return (first, last) if self.fraction > 0 else (last, first)

    def __str__(self) -> str:
        return f"{self.axis}:{self.fraction:g}"


def box_list(box: tuple[slice, ...]) -> list[list[int]]:
    """A box as JSON-friendly [start, stop] pairs, for provenance."""
    return [[int(s.start), int(s.stop)] for s in box]


class Region:
    """A box of an array-like, read lazily through index translation.

    ``lead`` axes come first and are passed through untouched (the channel
    axis of an image); the rest are spatial and offset by the box.  Supports
    what training and validation use: slices with a positive step, integers
    and an Ellipsis.
    """

    def __init__(self, base: Any, box: tuple[slice, ...], lead: int = 0) -> None:
        base_shape = tuple(base.shape)
        if len(box) != len(base_shape) - lead:
            raise ValueError(f"box {box} does not cover the {len(base_shape) - lead} spatial axes")
        starts = [int(b.start or 0) for b in box]
        stops = [int(s if b.stop is None else b.stop) for b, s in zip(box, base_shape[lead:])]
        if any(not 0 <= a < b <= s for a, b, s in zip(starts, stops, base_shape[lead:])):
            raise ValueError(f"box {box} is not inside the spatial shape {base_shape[lead:]}")
        self.base = base
        self.lead = lead
        self.offset = tuple(starts)
        self.shape = base_shape[:lead] + tuple(b - a for a, b in zip(starts, stops))
        self.dtype = base.dtype
        self.ndim = len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def _translate(self, key: Any) -> tuple[Any, ...]:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = next(i for i, k in enumerate(key) if k is Ellipsis)
            key = key[:at] + (slice(None),) * (self.ndim - len(key) + 1) + key[at + 1:]
        if len(key) > self.ndim:
            raise IndexError(f"too many indices ({len(key)}) for a {self.ndim}-D region")
        key = key + (slice(None),) * (self.ndim - len(key))
        out: list[Any] = []
        for axis, (k, size) in enumerate(zip(key, self.shape)):
            if axis < self.lead:
                out.append(k)
                continue
            origin = self.offset[axis - self.lead]
            if isinstance(k, slice):
                start, stop, step = k.indices(size)
                if step < 1:
                    raise IndexError("a region is sliced with positive steps only")
                out.append(slice(origin + start, origin + max(stop, start), step))
            elif isinstance(k, (int, np.integer)):
                i = int(k) + (size if k < 0 else 0)
                if not 0 <= i < size:
                    raise IndexError(f"index {int(k)} is out of a region {size} long")
                out.append(origin + i)
            else:
                raise IndexError(f"a region takes slices and integers, not {type(k).__name__}")
        return tuple(out)

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.base[self._translate(key)])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)
