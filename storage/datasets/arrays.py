"""Label tables and lazy arrays the file-based layouts share (Decathlon / nnU-Net, geo).

A dataset's own label values (any integers, a vector layer's class names)
become contiguous classes through a :class:`LabelTable`; the arrays training
slices are views over ingested zarr stores that map labels, stack channel
files and mark no-data pixels per slice, so nothing is read whole.  A label
value outside the table is an error naming the file, found whenever a slice
meets it or by a chunk-by-chunk scan (:func:`count_classes`).
"""

from __future__ import annotations

import colorsys
import itertools
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from storage.classes import LabelClass
from storage.datasets.base import IGNORE, Case
from storage.errors import InvalidInputError, StoreError
from storage.geometry import VolumeGeometry
from storage.hashing import sha256_input
from storage.ingest import ingest
from storage.layout import ImageStore, open_image_store



def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct colours, always the same ones: black first (background), then hues a golden angle apart."""
    colours = [(0, 0, 0)]
    for i in range(1, n):
        hue = (i * 0.6180339887498949) % 1.0
        value = 0.95 if (i // 5) % 2 == 0 else 0.7  # alternate brightness so that near hues still differ
        r, g, b = colorsys.hsv_to_rgb(hue, 0.75, value)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return colours[:n]


@dataclass(frozen=True)
class LabelTable:
    """A dataset's own label values and what they become: class ``k`` is source value ``values[k]``.

    ``ignored`` holds source values that mean "no label" (nnU-Net's
    ``ignore``, a label raster's nodata): they read as :data:`IGNORE`.
    ``source`` is the file the table came from, for messages.
    """

    values: tuple[int, ...]
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    source: Path
    ignored: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.values) > IGNORE:
            raise InvalidInputError(self.source, f"has {len(self.values)} label classes; at most {IGNORE} fit "
                                                 f"beside the ignore value {IGNORE}")
        if list(self.values) != sorted(set(self.values)):
            raise ValueError("label table values must be sorted and distinct")

    @classmethod
    def build(cls, names_by_value: dict[int, str], source: Path, *, ignored: Sequence[int] = (),
              colors: dict[int, tuple[int, int, int]] | None = None) -> "LabelTable":
        values = tuple(sorted(names_by_value))
        auto = palette(len(values) + 1)  # auto[0] is black: a class that is not background never gets it
        chosen = []
        for k, v in enumerate(values):
            background = v == 0 or names_by_value[v].strip().lower() == "background"
            own = (colors or {}).get(v)
            chosen.append(own or ((0, 0, 0) if background else auto[k or len(values)]))
        return cls(values, tuple(names_by_value[v] for v in values), tuple(chosen), source, tuple(sorted(ignored)))

    @property
    def classes(self) -> list[LabelClass]:
        """The classes as training sees them: contiguous values 0..n-1, the dataset's names and colours."""
        return [LabelClass(value=k, name=n, color=c) for k, (n, c) in enumerate(zip(self.names, self.colors))]

    @property
    def contiguous(self) -> bool:
        return self.values == tuple(range(len(self.values))) and not self.ignored

    def describe(self) -> str:
        return ", ".join(f"{v} {n}" for v, n in zip(self.values, self.names))

    def map(self, raw: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``raw`` as contiguous uint8 classes (IGNORE where not ``valid``), and the unknown values it holds."""
        raw = np.asarray(raw)
        if self.contiguous and raw.dtype.kind in "iu":
            known = (raw >= 0) & (raw < len(self.values))
            out = np.where(known, raw, IGNORE).astype(np.uint8)
        else:
            keys = np.asarray(self.values + self.ignored, dtype=np.float64 if raw.dtype.kind == "f" else np.int64)
            targets = np.asarray(list(range(len(self.values))) + [IGNORE] * len(self.ignored), dtype=np.uint8)
            order = np.argsort(keys, kind="stable")
            keys, targets = keys[order], targets[order]
            at = np.minimum(np.searchsorted(keys, raw), len(keys) - 1)
            known = keys[at] == raw
            out = np.where(known, targets[at], IGNORE).astype(np.uint8)
        if valid is not None:
            valid = np.asarray(valid, dtype=bool)
            out[~valid] = IGNORE
            known = known | ~valid
        return out, np.unique(raw[~known])


def bad_values_problem(values: Sequence[Any], table: LabelTable) -> str:
    """One line for label values that the table does not list."""
    shown = ", ".join(str(v.item() if hasattr(v, "item") else v) for v in list(values)[:12])
    more = f" and {len(values) - 12} more" if len(values) > 12 else ""
    return (f"label values {shown}{more} are not in the label table ({table.describe()}) "
            f"of {table.source.name}")


def _normalise(key: Any, ndim: int) -> tuple[Any, ...]:
    """A basic-indexing key as one entry per axis (Ellipsis expanded); fancy indexing is not offered."""
    key = key if isinstance(key, tuple) else (key,)
    if any(not isinstance(k, (slice, int, np.integer)) and k is not Ellipsis for k in key):
        raise TypeError("only integers, slices and Ellipsis index a dataset array")
    if sum(k is Ellipsis for k in key) > 1:
        raise IndexError("an index can only have a single ellipsis")
    if Ellipsis in key:
        at = key.index(Ellipsis)
        key = key[:at] + (slice(None),) * (ndim - len(key) + 1) + key[at + 1:]
    if len(key) > ndim:
        raise IndexError(f"too many indices: {len(key)} for {ndim} dimensions")
    return key + (slice(None),) * (ndim - len(key))


def chunk_slices(shape: Sequence[int], chunks: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    """The regions of a chunk grid, one stored chunk each: what a scan reads at a time."""
    ranges = [range(0, n, c) for n, c in zip(shape, chunks)]
    for starts in itertools.product(*ranges):
        yield tuple(slice(s, min(s + c, n)) for s, c, n in zip(starts, chunks, shape))


class SlicedArray:
    """What a lazy dataset array shares: ``shape`` and ``dtype`` fixed at creation, numpy on request."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        raise NotImplementedError

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)


class LabelArray(SlicedArray):
    """A label store's channel 0 as contiguous classes, mapped one slice at a time.

    Pixels that a mask (the image's, the label raster's own nodata) calls
    invalid read as IGNORE.  A slice that meets a value outside the table
    raises InvalidInputError naming the label file: patches never silently
    carry a wrong class.  :meth:`validate` scans the whole store chunk by
    chunk for the same errors up front.
    """

    def __init__(self, labels: Any, table: LabelTable, path: Path, masks: Sequence[Any] = ()) -> None:
        self._labels = labels  # (1, *spatial)
        self._masks = list(masks)  # each (*spatial), True = valid
        self.table, self.path = table, path
        self.shape, self.dtype = tuple(labels.shape[1:]), np.dtype(np.uint8)

    def _read(self, key: Any) -> tuple[np.ndarray, np.ndarray]:
        key = _normalise(key, self.ndim)
        valid = None
        for mask in self._masks:
            m = np.asarray(mask[key], dtype=bool)
            valid = m if valid is None else valid & m
        return self.table.map(np.asarray(self._labels[(0,) + key]), valid)

    def __getitem__(self, key: Any) -> np.ndarray:
        out, unknown = self._read(key)
        if unknown.size:
            raise InvalidInputError(self.path, bad_values_problem(unknown, self.table))
        return out

    def validate(self) -> dict[int, int]:
        """Scan every stored chunk; raise naming the file and all bad values, else return pixels per class."""
        counts = np.zeros(IGNORE + 1, dtype=np.int64)
        bad: set[Any] = set()
        for region in chunk_slices(self.shape, tuple(getattr(self._labels, "chunks", self._labels.shape))[1:]):
            out, unknown = self._read(region)
            bad.update(v.item() for v in unknown)
            counts += np.bincount(out.ravel(), minlength=IGNORE + 1)
        if bad:
            raise InvalidInputError(self.path, bad_values_problem(sorted(bad), self.table))
        return {k: int(counts[k]) for k in range(len(self.table.values))}


class ChannelStack(SlicedArray):
    """Several image stores' channels as one (C, *spatial) array-like, stacked only for the slice asked."""

    def __init__(self, arrays: Sequence[Any]) -> None:
        if not arrays or len({tuple(a.shape[1:]) for a in arrays}) != 1:
            raise ValueError("channel arrays must share one spatial shape")
        self._where = [(a, c) for a in arrays for c in range(a.shape[0])]
        self.shape = (len(self._where),) + tuple(arrays[0].shape[1:])
        self.dtype = np.result_type(*(a.dtype for a in arrays))

    def __getitem__(self, key: Any) -> np.ndarray:
        key = _normalise(key, self.ndim)
        wanted = np.arange(len(self._where))[key[0]]
        parts = [np.asarray(arr[(c,) + key[1:]]).astype(self.dtype, copy=False)
                 for arr, c in (self._where[i] for i in np.atleast_1d(wanted))]
        return parts[0] if np.ndim(wanted) == 0 else np.stack(parts)


class OneSlice(SlicedArray):
    """A (C, 1, *plane) or (1, *plane) array-like seen without its one-slice axis.

    nnU-Net keeps 2-D images as NIfTI files one slice thick (X x Y x 1); a
    2-D network trains on their plane.  ``axis`` is the thin axis (1 for an
    image store's (C, K, J, I), 0 for a label array's (K, J, I)).
    """

    def __init__(self, array: Any, axis: int) -> None:
        shape = tuple(int(n) for n in array.shape)
        if shape[axis] != 1:
            raise ValueError(f"axis {axis} of shape {shape} is not one slice thick")
        self._array, self._axis = array, axis
        self.shape, self.dtype = shape[:axis] + shape[axis + 1:], np.dtype(array.dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = _normalise(key, self.ndim)
        return np.asarray(self._array[key[:self._axis] + (0,) + key[self._axis:]])


def ingested(path: Path, store_path: Path) -> ImageStore:
    """``path`` ingested at ``store_path``; a finished store of the same file (by sha256) is reused."""
    if store_path.exists():
        try:
            store = open_image_store(store_path)
            if store.meta.source.sha256 == sha256_input(path):
                return store
        except StoreError:
            pass
    store_path.parent.mkdir(parents=True, exist_ok=True)
    return ingest(path, store_path)


def count_classes(cases: Sequence[Case], labels_of: Callable[[Case, Path], LabelArray],
                  work: Path | None) -> dict[int, int]:
    """Each case's labels validated chunk by chunk, pixel counts per class summed over the cases.

    ``work`` is where ``read`` keeps its stores (they are then reused);
    without it they go to a temporary folder removed afterwards.
    """
    total: dict[int, int] = {}
    with nullcontext(work) if work is not None else TemporaryDirectory(prefix="segflow-labels-") as folder:
        for case in cases:
            for k, n in labels_of(case, Path(folder)).validate().items():
                total[k] = total.get(k, 0) + n
    return total


def volume_spacing(geometry: VolumeGeometry) -> tuple[float, float, float]:
    """Voxel size (mm) along the store's (z, y, x) = the file's (k, j, i) axes, from the affine's columns."""
    affine = np.asarray(geometry.affine, dtype=np.float64)[:3, :3]
    i, j, k = (float(np.linalg.norm(affine[:, n])) for n in range(3))
    return (k, j, i)
