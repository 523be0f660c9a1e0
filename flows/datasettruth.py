"""A truth map read as training read its dataset's label files: the table the model's card recorded.

A dataset's label files do not always hold the model's class numbers.  A
Decathlon table of 0, 1, 2, 4 trains as classes 0..3 (the model writes 3 where
the files hold 4); nnU-Net's ``ignore`` label (say 2) marks pixels without
annotation, which training skips; Cityscapes' ``*_gtFine_labelIds.png`` hold
34 label ids of which 19 become train ids 0..18 and the rest are ignored.
Training records that table in the card (``training.dataset.truth_values``:
[file value, class or 255] pairs), and ``segflow evaluate --classes MODEL``
reads the dataset's own files through it, so a score counts what training
counted.  Without it a Cityscapes road (id 7) had been scored as class 7,
"traffic sign", and an nnU-Net ``ignore`` region as false positives.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from storage.datasets.base import IGNORE

__all__ = ["DatasetValues", "dataset_truth_map", "recorded_truth_values", "truth_note"]


def recorded_truth_values(dataset: Any) -> list[list[int]] | None:
    """What training records: the dataset's own table as [file value, class or 255] pairs, or None where the
    files hold the classes as they are (VOC, a contiguous nnU-Net table) or there are no label files (COCO)."""
    own = getattr(dataset, "truth_values", None)
    if callable(own):
        mapping = own()
    else:
        table = getattr(dataset, "table", None)
        if table is None or table.contiguous:
            return None
        mapping = {**{int(v): k for k, v in enumerate(table.values)}, **{int(v): IGNORE for v in table.ignored}}
    if all(v == c for v, c in mapping.items()):  # a label raster's nodata 255 read as 255: nothing to record
        return None
    return [[int(v), int(c)] for v, c in sorted(mapping.items())]


def dataset_truth_map(card: Any) -> dict[int, int] | None:
    """The card's record of its dataset's table (``truth_values``, or the ``label_values`` cards recorded before
    it, class by class), or None where the dataset's files hold the classes as they are."""
    dataset = (card.training or {}).get("dataset") or {}
    pairs = dataset.get("truth_values")
    if isinstance(pairs, list) and pairs:
        return {int(v): int(c) for v, c in pairs}
    values = dataset.get("label_values")
    if not isinstance(values, list) or len(values) != card.num_classes or values == list(range(card.num_classes)):
        return None
    return {int(v): k for k, v in enumerate(values)}


class DatasetValues:
    """A truth map read block by block through the dataset's table.  A value the table lacks stays as it is,
    unless it is a class number, which would then be scored as that class: it becomes one past the largest
    value instead."""

    def __init__(self, array: Any, mapping: dict[int, int]) -> None:
        self.array, self.shape = array, array.shape
        classes = {c for c in mapping.values() if c != IGNORE}
        top = max(max(mapping), max(classes, default=0), IGNORE) + 1
        self.lut = np.arange(top + 1, dtype=np.int64)
        self.lut[[c for c in classes if c not in mapping]] = top  # a class number that is no file value
        for value, target in mapping.items():
            if value >= 0:
                self.lut[value] = target

    def __getitem__(self, region: Any) -> Any:
        block = np.asarray(self.array[region])
        inside = (block >= 0) & (block < len(self.lut))
        out = block.astype(np.int64, copy=True)
        out[inside] = self.lut[block[inside].astype(np.int64)]
        return out


def truth_note(mapping: dict[int, int], most: int = 6) -> str:
    """The case's note on how its truth was read: the values that change, the first few of each kind."""
    def first(items: list[str]) -> str:
        return ", ".join(items[:most]) + (f" ... ({len(items)} values)" if len(items) > most else "")

    changed = [(v, c) for v, c in sorted(mapping.items()) if v != c]
    parts = [first([f"{v} as class {c}" for v, c in changed if c != IGNORE])]
    ignored = [str(v) for v, c in changed if c == IGNORE]
    parts.append(f"{first(ignored)} not counted" if ignored else "")
    return ("the truth's values read through the dataset's label table, which the model's card recorded at "
            "training: " + "; ".join(p for p in parts if p))
