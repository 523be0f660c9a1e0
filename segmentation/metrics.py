"""Overlap metrics between a predicted and a true label map, computed chunk by chunk.

Outputs are too big to hold twice in memory, so everything goes through a
confusion matrix, which is additive: the matrix of a whole image is the sum of
the matrices of its blocks, and Dice, IoU and accuracy follow from it exactly.
"""

from __future__ import annotations

import math

import numpy as np


def confusion_matrix(pred: np.ndarray, truth: np.ndarray, num_classes: int,
                     ignore: int | None = None) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = truth class, columns = predicted class.

    Pixels whose truth equals ``ignore`` are skipped. Any other value outside
    0..num_classes-1, in either array, is a ValueError: a prediction of
    "no data" where the truth has data is a bug to surface, not a class.
    """
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    t = truth.ravel()
    p = pred.ravel()
    if ignore is not None:
        keep = t != ignore
        t, p = t[keep], p[keep]
    t = t.astype(np.int64)
    p = p.astype(np.int64)
    for name, a in (("truth", t), ("prediction", p)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} holds values outside 0..{num_classes - 1} "
                             f"(found {a.min()}..{a.max()}) at counted pixels")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def dice_from_confusion(matrix: np.ndarray) -> dict[int, float]:
    """Dice per class, 2·TP / (|truth| + |pred|); NaN for a class absent from both."""
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    denom = matrix.sum(axis=0) + matrix.sum(axis=1)
    return {c: (float(2.0 * tp[c] / denom[c]) if denom[c] > 0 else math.nan) for c in range(len(tp))}


def iou_from_confusion(matrix: np.ndarray) -> dict[int, float]:
    """Intersection over union per class; NaN for a class absent from both."""
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - tp
    return {c: (float(tp[c] / union[c]) if union[c] > 0 else math.nan) for c in range(len(tp))}


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int, *,
                   ignore: int | None = None) -> dict[int, float]:
    """Dice of every class 0..num_classes-1 over one pair of arrays.

    Every class is a key; a class absent from both prediction and truth (at
    non-ignored pixels) is NaN, since any number would be made up.
    """
    return dice_from_confusion(confusion_matrix(pred, truth, num_classes, ignore))


def mean_dice(dice: dict[int, float], *, exclude: tuple[int, ...] = ()) -> float:
    """Mean over the classes not excluded, skipping NaN (absent) classes; NaN if none is left."""
    values = [v for c, v in dice.items() if c not in exclude and not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


class ConfusionAccumulator:
    """Sum confusion matrices over blocks, so a big output is scored without loading it whole."""

    def __init__(self, num_classes: int, ignore: int | None = None) -> None:
        self.num_classes = num_classes
        self.ignore = ignore
        self.matrix = np.zeros((num_classes, num_classes), np.int64)

    def update(self, pred_block: np.ndarray, truth_block: np.ndarray) -> "ConfusionAccumulator":
        self.matrix += confusion_matrix(pred_block, truth_block, self.num_classes, self.ignore)
        return self

    @property
    def count(self) -> int:
        """Pixels counted so far (ignored ones excluded)."""
        return int(self.matrix.sum())

    def dice(self) -> dict[int, float]:
        return dice_from_confusion(self.matrix)

    def iou(self) -> dict[int, float]:
        return iou_from_confusion(self.matrix)

    def accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else math.nan


def label_range_problem(values: np.ndarray, num_classes: int, ignore: int | None) -> str | None:
    """What is wrong with label values that are neither a class nor the ignore value (None when all are)."""
    counted = values if ignore is None else values[values != ignore]
    if not counted.size or (counted.min() >= 0 and counted.max() < num_classes):
        return None
    bad = np.unique(counted[(counted < 0) | (counted >= num_classes)])
    shown = ", ".join(str(v) for v in bad[:5]) + (f" and {bad.size - 5} more" if bad.size > 5 else "")
    return (f"holds label value(s) {shown}, which are not among the card's classes 0..{num_classes - 1}"
            + ("" if ignore is None else f" (nor the ignore value {ignore})"))
