"""Per-label statistics of a label map, as ``TotalSegmentator --statistics`` reports them.

For every class: how many voxels, what volume, the mean and standard deviation
of the input intensity inside it, where it lies (voxel and world bounding box)
and whether it reaches the edge of the volume (an organ cut by the field of
view is probably incomplete, so its volume understates the truth).

The label map is walked one chunk at a time along its own zarr chunk grid, with
the matching block of the input image, so memory is bounded by one chunk
whatever the volume.  Each block gives per-class counts, sums and centred sums
of squares; blocks are merged with Chan et al.'s parallel update, which keeps
the variance exact to rounding without the cancellation of a naive
``Σx² - n·mean²``.  Bounding boxes come from per-axis presence tables
(slice index x class), so the cost does not grow with the number of classes.
On an oblique grid the world box of the voxel box's corners overstates the
class (a 28 mm sphere had read 41 mm), so there each class's world extent is
taken from the first and last voxel of each of its rows, where a linear map
has its extremes.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from storage.classes import LabelClass
from storage.atomic import write_text_atomically
from storage.errors import ExportError
from storage.header import voxel_millilitres

__all__ = ["label_statistics", "write_statistics"]

_DEFAULT_BLOCK_VOXELS = 1 << 22  # block size when the labels have no chunk grid (a plain numpy array)


@dataclass
class _Accumulator:
    """Running per-class count, mean, centred sum of squares and voxel box (one row per class slot)."""

    slots: int
    count: np.ndarray = field(init=False)
    mean: np.ndarray = field(init=False)
    m2: np.ndarray = field(init=False)
    lo: np.ndarray = field(init=False)  # (slots, 3) min (k, j, i)
    hi: np.ndarray = field(init=False)  # (slots, 3) max (k, j, i)
    nodata: int = 0
    oblique: np.ndarray | None = None  # the affine, where its axes are not the world's: world boxes row by row
    world_lo: np.ndarray = field(init=False)  # (slots, 3) min RAS mm of the voxel centres (oblique only)
    world_hi: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.world_lo = np.full((self.slots, 3), np.inf)
        self.world_hi = np.full((self.slots, 3), -np.inf)
        self.count = np.zeros(self.slots, dtype=np.int64)
        self.mean = np.zeros(self.slots, dtype=np.float64)
        self.m2 = np.zeros(self.slots, dtype=np.float64)
        self.lo = np.full((self.slots, 3), np.iinfo(np.int64).max, dtype=np.int64)
        self.hi = np.full((self.slots, 3), -1, dtype=np.int64)

    def merge(self, count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> None:
        """Chan, Golub & LeVeque's pairwise merge of (n, mean, M2) per slot."""
        total = self.count + count
        safe = np.maximum(total, 1)
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + delta * delta * (self.count * count / safe)
        self.mean = np.where(total > 0, self.mean + delta * (count / safe), 0.0)
        self.count = total


def label_statistics(
    labels: Any,
    image: Any,
    affine: np.ndarray,
    classes: list[LabelClass],
    *,
    nodata_label: int | None = None,
    unit: str | None = "HU",
    channel: int = 0,
) -> dict[str, Any]:
    """Per-class voxel count, volume (mL), intensity mean/std, bounding boxes and border contact.

    ``labels`` is (K, J, I); ``image`` is (C, K, J, I) on the same grid, or
    None for geometry-only statistics; ``affine`` maps (i, j, k, 1) to RAS mm.
    Background (value 0) is reported even when the card does not list it;
    nodata voxels are left out of every class.  Voxels whose value is neither a
    class nor nodata are counted in ``unlisted_voxels`` (a model/card mismatch).
    Numbers are plain ints and floats (JSON-safe); an empty class has count 0,
    volume 0 and None for mean, std and boxes.
    """
    shape = tuple(int(n) for n in labels.shape)
    if len(shape) != 3:
        raise ValueError(f"labels must be (K, J, I), got shape {shape}")
    if image is not None and (len(image.shape) != 4 or tuple(image.shape[1:]) != shape):
        raise ValueError(f"image must be (C, K, J, I) with (K, J, I) = {shape}, got {tuple(image.shape)}")
    if image is not None and not 0 <= channel < image.shape[0]:
        raise ValueError(f"channel {channel} out of range for an image with {image.shape[0]} channel(s)")
    if np.dtype(labels.dtype).kind not in "biu":
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    affine = np.asarray(affine, dtype=np.float64)
    ordered = _with_background(classes)
    names = [c.name for c in ordered]
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique to key the statistics, got {names}")

    # Value -> slot lookup: slot 0 collects unlisted values, slot s+1 is ordered[s], and slot n+1 (nodata)
    # is counted but belongs to no class. The last entry stands for every value above ``top``.
    slots = len(ordered) + 1
    top = max([c.value for c in ordered] + [nodata_label or 0])
    lut = np.zeros(top + 2, dtype=np.intp)
    for s, c in enumerate(ordered):
        lut[c.value] = s + 1
    if nodata_label is not None and nodata_label >= 0:
        if lut[nodata_label]:
            raise ValueError(f"nodata label {nodata_label} is also the value of a class")
        lut[nodata_label] = slots
    acc = _Accumulator(slots, oblique=None if _axis_aligned(affine) else affine)

    for region in _blocks(labels):
        lab = np.asarray(labels[region])
        if lab.dtype.kind == "b":
            lab = lab.view(np.uint8)
        if lab.size and lab.min() < 0:
            raise ValueError(f"labels hold negative values in block {region}")
        if np.iinfo(lab.dtype).max > top:  # values past the table all share its last (unlisted) entry
            lab = np.minimum(lab, lab.dtype.type(top + 1))
        slot = lut[lab]
        values = None
        if image is not None:
            values = np.asarray(image[(channel, *region)], dtype=np.float64)
        _accumulate(acc, slot, values, tuple(r.start for r in region))

    voxel_ml, _ = voxel_millilitres(affine, "mm")
    voxel_ml = voxel_ml or 0.0
    out_classes: dict[str, Any] = {}
    for s, c in enumerate(ordered, start=1):
        out_classes[c.name] = _class_entry(c, acc, s, affine, shape, voxel_ml, image is not None)
    return {
        "unit": unit if image is not None else None,
        "channel": channel if image is not None else None,
        "shape_kji": list(shape),
        "voxel_volume_ml": voxel_ml,
        "nodata_voxels": int(acc.nodata),
        "unlisted_voxels": int(acc.count[0]),
        "classes": out_classes,
    }


def _with_background(classes: list[LabelClass]) -> list[LabelClass]:
    ordered = sorted(classes, key=lambda c: c.value)
    if not any(c.value == 0 for c in ordered):
        ordered.insert(0, LabelClass(value=0, name="background", color=(0, 0, 0)))
    return ordered


def _blocks(labels: Any) -> Iterator[tuple[slice, ...]]:
    """Regions along the labels' own chunk grid (zarr), or slabs of bounded size (numpy)."""
    shape = labels.shape
    chunks = getattr(labels, "chunks", None)
    if not chunks or len(chunks) != 3 or not all(isinstance(n, (int, np.integer)) for n in chunks):
        plane = max(1, int(shape[1]) * int(shape[2]))
        chunks = (max(1, _DEFAULT_BLOCK_VOXELS // plane), shape[1], shape[2])
    starts = [range(0, int(n), int(c)) for n, c in zip(shape, chunks)]
    for corner in itertools.product(*starts):
        yield tuple(slice(a, min(a + int(c), int(n))) for a, c, n in zip(corner, chunks, shape))


def _accumulate(acc: _Accumulator, slot: np.ndarray, values: np.ndarray | None, origin: tuple[int, ...]) -> None:
    """Add one block: per-slot counts, block means and centred M2, then the per-axis presence boxes."""
    n = acc.slots
    bins = n + 1  # the extra bin holds nodata voxels, which are counted and then dropped
    flat = slot.ravel()
    count = np.bincount(flat, minlength=bins)
    acc.nodata += int(count[n])
    count = count[:n]
    if values is not None:
        v = values.ravel()
        sums = np.bincount(flat, weights=v, minlength=bins)[:n]
        mean = sums / np.maximum(count, 1)
        centred = v - np.append(mean, 0.0)[flat]
        m2 = np.bincount(flat, weights=centred * centred, minlength=bins)[:n]
    else:
        mean = np.zeros(n)
        m2 = np.zeros(n)
    acc.merge(count.astype(np.int64), mean, m2)

    # Presence of each slot per index along each axis: a (length, bins) table from one bincount.
    for axis in range(3):
        length = slot.shape[axis]
        index = np.arange(length).reshape([-1 if a == axis else 1 for a in range(3)])
        present = np.bincount((index * bins + slot).ravel(), minlength=length * bins).reshape(length, bins)[:, :n] > 0
        seen = present.any(axis=0)
        if not seen.any():
            continue
        first = np.argmax(present, axis=0) + origin[axis]
        last = length - 1 - np.argmax(present[::-1], axis=0) + origin[axis]
        acc.lo[seen, axis] = np.minimum(acc.lo[seen, axis], first[seen])
        acc.hi[seen, axis] = np.maximum(acc.hi[seen, axis], last[seen])
    if acc.oblique is not None:
        _world_extent(acc, slot, count, origin)


def _axis_aligned(affine: np.ndarray) -> bool:
    """Whether each voxel axis runs along one world axis (then the voxel box's corners give the world box)."""
    rotation = np.abs(affine[:3, :3])
    return bool(((rotation > 1e-9 * max(rotation.max(), 1e-300)).sum(axis=0) == 1).all())


def _world_extent(acc: _Accumulator, slot: np.ndarray, count: np.ndarray, origin: tuple[int, ...]) -> None:
    """Each present class's RAS extent in this block: along a row of i, a linear map is extreme at the row's
    first or last voxel of the class, so those alone are mapped."""
    assert acc.oblique is not None
    width = slot.shape[2]
    for s in np.flatnonzero(count):
        mask = slot == s
        kk, jj = np.nonzero(mask.any(axis=2))
        first = np.argmax(mask, axis=2)[kk, jj]
        last = width - 1 - np.argmax(mask[:, :, ::-1], axis=2)[kk, jj]
        for ii in (first, last):
            ijk = np.stack([ii + origin[2], jj + origin[1], kk + origin[0]]).astype(np.float64)
            world = acc.oblique[:3, :3] @ ijk + acc.oblique[:3, 3:4]
            acc.world_lo[s] = np.minimum(acc.world_lo[s], world.min(axis=1))
            acc.world_hi[s] = np.maximum(acc.world_hi[s], world.max(axis=1))


def _class_entry(c: LabelClass, acc: _Accumulator, s: int, affine: np.ndarray, shape: tuple[int, ...],
                 voxel_ml: float, with_image: bool) -> dict[str, Any]:
    n = int(acc.count[s])
    entry: dict[str, Any] = {"value": c.value, "voxels": n, "volume_ml": n * voxel_ml,
                             "volume_mm3": n * voxel_ml * 1000.0}
    if n == 0:
        entry.update(mean=None, std=None, bbox_voxel=None, bbox_mm=None, touches_border=False)
        return entry
    mean = float(acc.mean[s]) if with_image else None
    std = math.sqrt(max(float(acc.m2[s]) / n, 0.0)) if with_image else None  # population std, as numpy's
    k0, j0, i0 = (int(x) for x in acc.lo[s])
    k1, j1, i1 = (int(x) for x in acc.hi[s])
    corners = np.array([[i, j, k, 1.0] for i in (i0, i1) for j in (j0, j1) for k in (k0, k1)])
    world = (affine @ corners.T)[:3]
    low, high = (acc.world_lo[s], acc.world_hi[s]) if acc.oblique is not None else \
        (world.min(axis=1), world.max(axis=1))
    touches = i0 == 0 or j0 == 0 or k0 == 0 or i1 == shape[2] - 1 or j1 == shape[1] - 1 or k1 == shape[0] - 1
    entry.update(
        mean=_finite(mean),
        std=_finite(std),
        bbox_voxel={"i": [i0, i1], "j": [j0, j1], "k": [k0, k1]},
        # NIfTI's world frame, which a DICOM reader (LPS) would not assume: said in the entry
        bbox_mm={"frame": "RAS", "min": [float(x) for x in low], "max": [float(x) for x in high]},
        touches_border=bool(touches),
    )
    return entry


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


def write_statistics(path: str | PathLike[str], stats: dict[str, Any]) -> Path:
    """Write the statistics as JSON under a temporary name, then rename it into place."""
    out = Path(path)
    try:
        text = json.dumps(stats, indent=2, allow_nan=False) + "\n"
    except ValueError as exc:
        raise ExportError(out, f"statistics are not JSON-safe: {exc}") from None
    return write_text_atomically(out, text, "statistics")

