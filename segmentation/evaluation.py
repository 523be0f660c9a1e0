"""Per-class scores of a predicted label map against its ground truth, for maps too big to hold whole.

Everything that is a count comes from one pass over the two maps, block by
block: the additive confusion matrix of :mod:`segmentation.metrics` (Dice,
IoU, the pixel counts behind volumes and areas) and, for every label value,
the bounding box of the union of its predicted and true pixels.  Surface
distances need a class's whole boundary, so they are computed afterwards on
that box alone, grown by one pixel (clipped to the image) and read as one
crop: an object strictly inside the image then keeps a background ring, and
one touching the image edge meets that edge as it does in the whole array, so
MONAI's functions (which crop the same way internally) give exactly the
numbers they give on the whole map.  HD95 (``compute_hausdorff_distance`` at
the 95th percentile), the symmetric average surface distance and the
normalised surface Dice at a tolerance are all MONAI's, in the unit of the
spacing given.

Memory: the pass holds one block of each map and a few int64 copies of it
(under 100 bytes a pixel), plus matrices over the label values seen; the
distances then hold one class's crop at a time, with MONAI's float copies and
boundary tables.  The peak is set by the block size and by the largest
class's bounding box, never by the image's size (measured: a 256x256x120
volume in 1M-voxel slabs peaked 50 MB above the 455 MB that importing torch
and MONAI costs).

Rules for classes missing from one side or both, so that no number is made up:

- absent from both prediction and truth: every score is None, note ``absent in both``;
- absent from the prediction only: Dice, IoU and NSD are 0, HD95 and ASD are
  None (the distance to an empty set is infinite), note ``empty prediction``;
- absent from the truth only: likewise, note ``empty truth``;
- the ``background`` value, when named: Dice, IoU and counts as any class, but
  no distances (its box is usually the whole image), note ``background: no distances``.

Truth pixels equal to ``ignore`` (one value or several) are counted nowhere, in either map.  A
prediction equal to ``pred_nodata`` where the truth has a label is "no
prediction": it counts in the truth's total (a miss) but for no predicted class.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from segmentation.metrics import confusion_matrix, dice_from_confusion, iou_from_confusion
from storage.labelmaps import MAX_LABEL

__all__ = ["ABSENT_IN_BOTH", "DISTANCE_LIMIT", "DISTANCES_OVER_LIMIT", "EMPTY_PREDICTION", "EMPTY_TRUTH",
           "NO_BACKGROUND_DISTANCES",
           "CaseScores", "ClassScore", "LabelScan", "blocks", "scan_labels", "score_case", "surface_scores"]

ABSENT_IN_BOTH = "absent in both"
EMPTY_PREDICTION = "empty prediction"
EMPTY_TRUTH = "empty truth"
NO_BACKGROUND_DISTANCES = "background: no distances"
DISTANCES_OVER_LIMIT = "no distances: the class spans too much of the map"
# Pixels of a class's bounding box that one distance pass may hold, an 8192-pixel square: MONAI's edges and distance
# transforms of the box take about 28 bytes a pixel (`segflow evaluate` of an 8000² road grid spanning the map
# peaked at 2.17 GB, a 4000² one at 0.98 GB)
DISTANCE_LIMIT = 1 << 26
Region = tuple[slice, ...]


class LabelArray(Protocol):
    """What the scores read: a shape, and integer blocks by slicing (numpy, zarr, a file reader)."""

    shape: tuple[int, ...]

    def __getitem__(self, region: Region) -> Any: ...


def blocks(shape: Sequence[int], block: Sequence[int]) -> Iterator[Region]:
    """Regions tiling ``shape`` in C order (last axis fastest); edge blocks are clipped."""
    starts = [range(0, int(n), max(1, int(b))) for n, b in zip(shape, block)]
    for corner in itertools.product(*starts):
        yield tuple(slice(a, min(a + max(1, int(b)), int(n))) for a, b, n in zip(corner, block, shape))


class LabelScan:
    """What one pass over a prediction and its truth found: counts and boxes per label value seen.

    Label values are given compact indexes in the order first seen, so a map
    with values up to 65535 costs matrices of the values present only.
    """

    def __init__(self, ndim: int) -> None:
        self.ndim = ndim
        self.values: list[int] = []  # label values, by index
        self.matrix = np.zeros((0, 0), np.int64)  # (n, n) truth x predicted counts
        self.no_prediction = np.zeros(0, np.int64)  # (n,) truth pixels where the prediction is nodata
        self.lo = np.zeros((0, ndim), np.int64)  # (n, ndim) first index of the union, per axis
        self.hi = np.zeros((0, ndim), np.int64)  # (n, ndim) last index (inclusive)
        self.ignored = 0  # truth pixels equal to the ignore value
        self._lut = np.full(MAX_LABEL + 1, -1, np.int64)

    def index(self, value: int) -> int | None:
        return int(self._lut[value]) if 0 <= value <= MAX_LABEL and self._lut[value] >= 0 else None

    def truth_count(self, value: int) -> int:
        i = self.index(value)
        return 0 if i is None else int(self.matrix[i].sum() + self.no_prediction[i])

    def pred_count(self, value: int) -> int:
        i = self.index(value)
        return 0 if i is None else int(self.matrix[:, i].sum())

    @property
    def counted(self) -> int:
        return int(self.matrix.sum() + self.no_prediction.sum())

    def box(self, value: int, shape: Sequence[int], margin: int = 1) -> Region | None:
        """The union's bounding box grown by ``margin`` and clipped to ``shape``; None for an unseen value."""
        i = self.index(value)
        if i is None or self.hi[i, 0] < 0:
            return None
        return tuple(slice(max(0, int(a) - margin), min(int(n), int(b) + 1 + margin))
                     for a, b, n in zip(self.lo[i], self.hi[i], shape))

    def confusion(self, values: Sequence[int]) -> np.ndarray:
        """Rows: truth ``values``; columns: predicted ``values`` then "no prediction"."""
        out = np.zeros((len(values), len(values) + 1), np.int64)
        idx = [self.index(v) for v in values]
        for r, i in enumerate(idx):
            if i is None:
                continue
            out[r, -1] = self.no_prediction[i]
            for c, j in enumerate(idx):
                if j is not None:
                    out[r, c] = self.matrix[i, j]
        return out

    # ------------------------------------------------------------------ accumulation

    def _learn(self, labels: np.ndarray) -> None:
        if not labels.size:
            return
        present = np.flatnonzero(np.bincount(labels))
        for v in present[self._lut[present] < 0]:
            self._lut[v] = len(self.values)
            self.values.append(int(v))

    def _grow(self) -> None:
        n, old = len(self.values), self.matrix.shape[0]
        if n == old:
            return
        matrix = np.zeros((n, n), np.int64)
        matrix[:old, :old] = self.matrix
        self.matrix = matrix
        self.no_prediction = np.concatenate([self.no_prediction, np.zeros(n - old, np.int64)])
        self.lo = np.concatenate([self.lo, np.full((n - old, self.ndim), np.iinfo(np.int64).max, np.int64)])
        self.hi = np.concatenate([self.hi, np.full((n - old, self.ndim), -1, np.int64)])

    def add(self, pred: np.ndarray, truth: np.ndarray, origin: Sequence[int], *,
            ignore: Ignore, pred_nodata: int | None) -> None:
        """Count one block; ``origin`` is its first index in the whole map."""
        t, p = _int_labels(truth, "truth"), _int_labels(pred, "prediction")
        if t.shape != p.shape:
            raise ValueError(f"prediction block {p.shape} differs from truth block {t.shape}")
        counted = counted_pixels(t, ignore)
        predicted = counted & (p != pred_nodata) if pred_nodata is not None else counted
        self._learn(t[counted])
        self._learn(p[predicted])
        self._grow()
        n = len(self.values)
        outside = n + 1  # the bin of uncounted pixels; n is "no prediction"
        ti = np.where(counted, self._lut[t], outside)
        pi = np.where(predicted, self._lut[p], np.where(counted, n, outside))
        cm = confusion_matrix(pi[counted], ti[counted], n + 1)
        self.matrix += cm[:n, :n]
        self.no_prediction += cm[:n, n]
        self.ignored += int(t.size - np.count_nonzero(counted))
        bins = n + 2
        for axis in range(t.ndim):
            length = t.shape[axis]
            if not length:
                continue
            index = np.arange(length).reshape([-1 if a == axis else 1 for a in range(t.ndim)])
            hist = np.bincount((index * bins + ti).ravel(), minlength=length * bins)
            hist += np.bincount((index * bins + pi).ravel(), minlength=length * bins)
            present = hist.reshape(length, bins)[:, :n] > 0
            seen = present.any(axis=0)
            first = np.argmax(present, axis=0) + origin[axis]
            last = length - 1 - np.argmax(present[::-1], axis=0) + origin[axis]
            self.lo[seen, axis] = np.minimum(self.lo[seen, axis], first[seen])
            self.hi[seen, axis] = np.maximum(self.hi[seen, axis], last[seen])


Ignore = int | Collection[int] | None  # truth values counted nowhere


def counted_pixels(truth: np.ndarray, ignore: Ignore) -> np.ndarray:
    """Where the truth counts: not one of the ``ignore`` values."""
    if ignore is None:
        return np.ones(np.shape(truth), bool)
    if isinstance(ignore, (int, np.integer)):
        return np.asarray(truth) != ignore
    values = sorted({int(v) for v in ignore})
    if len(values) == 1:
        return np.asarray(truth) != values[0]
    return ~np.isin(truth, values) if values else np.ones(np.shape(truth), bool)


def _int_labels(block: Any, what: str) -> np.ndarray:
    a = np.asarray(block)
    if a.dtype.kind == "b":
        return a.astype(np.int64)
    if a.dtype.kind not in "iu":
        raise ValueError(f"{what} labels must be integers, got {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if a.size and (a.min() < 0 or a.max() > MAX_LABEL):
        raise ValueError(f"{what} labels must lie in 0..{MAX_LABEL}, found {a.min()}..{a.max()}")
    return a


def scan_labels(pred: LabelArray, truth: LabelArray, *, block: Sequence[int] | None = None,
                ignore: Ignore = None, pred_nodata: int | None = None) -> LabelScan:
    """One pass over both maps, ``block`` at a time (default: whole), reading each block once."""
    shape = tuple(int(n) for n in pred.shape)
    if tuple(int(n) for n in truth.shape) != shape:
        raise ValueError(f"prediction shape {shape} differs from truth shape {tuple(truth.shape)}")
    scan = LabelScan(ndim=len(shape))
    for region in blocks(shape, block or shape):
        scan.add(pred[region], truth[region], [r.start for r in region], ignore=ignore, pred_nodata=pred_nodata)
    return scan


def _class_masks(pred: LabelArray, truth: LabelArray, box: Region, value: int, ignore: Ignore,
                 block: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The class's predicted (where counted) and true masks over ``box``, read ``block`` at a time: one byte a
    pixel each, where reading the box whole held both maps as int64 (16 bytes a pixel) beside them."""
    shape = tuple(b.stop - b.start for b in box)
    p_mask, t_mask = np.zeros(shape, bool), np.zeros(shape, bool)
    for sub in blocks(shape, block):
        at = tuple(slice(b.start + s.start, b.start + s.stop) for b, s in zip(box, sub))
        t = np.asarray(truth[at])
        p_mask[sub] = (np.asarray(pred[at]) == value) & counted_pixels(t, ignore)
        t_mask[sub] = t == value
    return p_mask, t_mask


def surface_scores(pred_mask: np.ndarray, truth_mask: np.ndarray, spacing: Sequence[float],
                   tolerance: float) -> tuple[float, float, float]:
    """(HD95, symmetric ASD, NSD at ``tolerance``) of two non-empty binary masks, from MONAI's functions."""
    import torch  # MONAI's metrics take a few seconds to import: only when a distance is asked for
    from monai.metrics import (compute_average_surface_distance, compute_hausdorff_distance,
                               compute_surface_dice)

    p = torch.from_numpy(np.ascontiguousarray(pred_mask, dtype=np.float32)[None, None])
    t = torch.from_numpy(np.ascontiguousarray(truth_mask, dtype=np.float32)[None, None])
    space = [float(s) for s in spacing]
    with warnings.catch_warnings():  # MONAI 1.6 calls its own deprecated get_mask_edges argument
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=space)
        asd = compute_average_surface_distance(p, t, include_background=True, symmetric=True, spacing=space)
        nsd = compute_surface_dice(p, t, class_thresholds=[float(tolerance)], include_background=True,
                                   spacing=space)
    return float(hd95[0, 0]), float(asd[0, 0]), float(nsd[0, 0])


@dataclass
class ClassScore:
    """One class of one case; None where the rules of the module docstring say no number exists."""

    value: int
    truth_count: int
    pred_count: int
    dice: float | None
    iou: float | None
    hd95: float | None = None
    asd: float | None = None
    nsd: float | None = None
    note: str | None = None


@dataclass
class CaseScores:
    scan: LabelScan
    classes: list[ClassScore]
    shape: tuple[int, ...]

    def confusion(self) -> np.ndarray:
        """Rows: truth of each scored class; columns: its prediction, then "no prediction"."""
        return self.scan.confusion([c.value for c in self.classes])


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def score_case(pred: LabelArray, truth: LabelArray, spacing: Sequence[float], *, values: Collection[int] = (),
               block: Sequence[int] | None = None, ignore: Ignore = None, pred_nodata: int | None = None,
               tolerance: float = 1.0, background: int | None = None,
               distance_limit: int | None = DISTANCE_LIMIT) -> CaseScores:
    """Every score of every class of ``values`` and every label seen, in ascending value order.

    ``spacing`` is the pixel size along each array axis (mm, metres...), the
    unit of HD95, ASD and ``tolerance``.  ``block`` bounds what one read holds
    (default: the whole map); the results do not depend on it.  A class whose
    bounding box holds more than ``distance_limit`` pixels gets no distances
    (note :data:`DISTANCES_OVER_LIMIT`): they need its whole box at once, about
    28 bytes a pixel, and a land-cover class spans the whole scene.
    """
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    shape = tuple(int(n) for n in pred.shape)
    if len(spacing) != len(shape):
        raise ValueError(f"spacing {tuple(spacing)} does not have one entry per axis of {shape}")
    scan = scan_labels(pred, truth, block=block, ignore=ignore, pred_nodata=pred_nodata)
    n = len(scan.values)
    square = np.zeros((n + 1, n + 1), np.int64)  # the last row/column is "no prediction"
    square[:n, :n] = scan.matrix
    square[:n, n] = scan.no_prediction
    dice, iou = dice_from_confusion(square), iou_from_confusion(square)
    scores = []
    for value in sorted(set(int(v) for v in values) | set(scan.values)):
        tc, pc = scan.truth_count(value), scan.pred_count(value)
        if tc == 0 and pc == 0:
            scores.append(ClassScore(value, 0, 0, None, None, note=ABSENT_IN_BOTH))
            continue
        i = scan.index(value)
        score = ClassScore(value, tc, pc, _finite(dice[i]), _finite(iou[i]))
        if pc == 0 or tc == 0:
            score.nsd, score.note = 0.0, EMPTY_PREDICTION if pc == 0 else EMPTY_TRUTH
        elif value == background:
            score.note = NO_BACKGROUND_DISTANCES
        else:
            box = scan.box(value, shape)
            assert box is not None
            size = int(np.prod([b.stop - b.start for b in box], dtype=np.int64))
            if distance_limit is not None and size > distance_limit:
                score.note = f"{DISTANCES_OVER_LIMIT} ({size:,} pixels in its box, over {distance_limit:,})"
                scores.append(score)
                continue
            p_mask, t_mask = _class_masks(pred, truth, box, value, ignore, block or shape)
            # an axis of one pixel is a 2-D map stored as one slice (nnU-Net keeps 2-D data as X x Y x 1 NIfTI):
            # measured in 3-D, every pixel of it is surface, and its distances were those of the nearest pixel
            flat = [a for a, n in enumerate(shape) if n == 1]
            if flat and len(shape) - len(flat) >= 2:
                p_mask, t_mask = p_mask.squeeze(axis=tuple(flat)), t_mask.squeeze(axis=tuple(flat))
                kept = [float(v) for a, v in enumerate(spacing) if a not in flat]
            else:
                kept = list(spacing)
            hd95, asd, nsd = surface_scores(p_mask, t_mask, kept, tolerance)
            score.hd95, score.asd, score.nsd = _finite(hd95), _finite(asd), _finite(nsd)
        scores.append(score)
    return CaseScores(scan=scan, classes=scores, shape=shape)
