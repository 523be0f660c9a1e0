"""Writing finished output chunks: labels from probabilities, nodata, the label histogram, a completion record.

Every plan ends the same way, whatever grid it stitched on: per output chunk
one write task takes the chunk's probabilities (or labels already taken),
makes the labels (first maximum wins, nodata where the input has none),
stores them (and the probabilities, float32 or quantised to uint8) as one
whole zarr chunk, counts the labels for areas and volumes, and only then
records the chunk as done in the run's journal, so a resumed run never
trusts a chunk that was not stored.  The stitched plan
(:mod:`segmentation.stitching`) and the model-space way back
(:mod:`segmentation.modelspace`) share it.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import dask
import numpy as np
from dask.delayed import Delayed, delayed

from segmentation.regions import Box
from storage.argmax import argmax_first


def label_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint8) if num_classes <= 255 else np.dtype(np.uint16)


def label_nodata(num_classes: int) -> int:
    """The label written where the input has no data: the dtype's maximum, never a class."""
    return int(np.iinfo(label_dtype(num_classes)).max)


# Dask's user priority of the tasks that free memory (finalise, a way back to the input's grid, the writes): on a
# worker they run as soon as they are ready, before any further window is evaluated.  The evaluates and the tasks
# they read keep the default 0, so nothing upstream is loaded early.  Without it, a model-space run's extra steps
# between finalise and write changed the graph's order, and stitched pieces waited for their neighbours' windows.
DRAIN_PRIORITY = 1


def draining() -> Any:
    """The context in which the graph's memory-freeing tasks are built (:data:`DRAIN_PRIORITY`)."""
    return dask.annotate(priority=DRAIN_PRIORITY)


argmax0 = argmax_first  # the argmax over classes, first maximum winning (shared with the model-space way back)


def mark_nodata(labels: np.ndarray, mask: np.ndarray | None, num_classes: int) -> np.ndarray:
    """``labels`` with the nodata label where ``mask`` (True = valid; None: all valid) says the input has none,
    in place."""
    if mask is not None:
        labels[~np.asarray(mask, dtype=bool)] = label_nodata(num_classes)
    return labels


def labels_of(probs: np.ndarray, mask: np.ndarray | None, num_classes: int, unreached: bool = False) -> np.ndarray:
    """The argmax, and nodata where the input has none; with ``unreached`` also where every class is 0 (a
    raster's way back from model space where no valid model pixel reaches a pixel)."""
    labels = argmax0(probs, label_dtype(num_classes), label_nodata(num_classes) if unreached else None)
    return mark_nodata(labels, mask, num_classes)


def _write(probs: np.ndarray, mask: np.ndarray | None, box: Box, num_classes: int,
           labels_target: Any, probs_target: Any, probs_dtype: str,
           index: tuple[int, ...] | None = None, on_written: Callable[[tuple[int, ...], dict], None] | None = None,
           unreached: bool = False) -> dict[str, Any]:
    """Write one whole output chunk; return its label histogram (for areas and volumes).

    ``on_written(index, result)`` runs only after every array of the chunk is
    stored, so a completion record it makes never precedes the data.
    """
    if probs.ndim == len(box):  # already labels (a model-space plan's labels-only way back)
        labels = probs.astype(label_dtype(num_classes), copy=mask is not None)  # a fresh task result: kept as is
        mark_nodata(labels, mask, num_classes)
    else:
        labels = labels_of(probs, mask, num_classes, unreached)
    sl = tuple(slice(lo, hi) for lo, hi in box)
    _store(labels_target, sl, labels)
    if probs_target is not None:
        _store(probs_target, (slice(None),) + sl, quantize_probabilities(probs, probs_dtype, mask))
    return _recorded(index, box, labels, num_classes, on_written)


def _store(target: Any, where: tuple[slice, ...], values: np.ndarray) -> None:
    """``target[where] = values``, a failed write naming the array it was for: a full disk's chunk write said
    only "No space left on device", and the run's line named the output folder instead of the file."""
    try:
        target[where] = values
    except OSError as exc:
        root = getattr(getattr(target, "store", None), "root", None)
        if exc.filename is not None or root is None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), f"{root}/{getattr(target, 'path', '')}") from exc


def _recorded(index: tuple[int, ...] | None, box: Box, labels: np.ndarray, num_classes: int,
              on_written: Callable[[tuple[int, ...], dict], None] | None) -> dict[str, Any]:
    """A stored chunk's result (its label histogram), recorded by ``on_written``: called only once the chunk's
    data is stored."""
    result = {"box": box, "index": index, "histogram": label_histogram(labels, num_classes)}
    if on_written is not None:
        on_written(index, result)  # type: ignore[arg-type]
    return result


FEW_CLASSES = 16  # up to this many classes the histogram counts value by value


def label_histogram(labels: np.ndarray, num_classes: int) -> dict[int, int]:
    """Pixels per label value present (classes, nodata, and any other value), in increasing value order.

    With a few classes one comparison per class and one for nodata beats a ``bincount``, which first widens
    every label to 8 bytes: 0.7-0.8 against 2.0-3.1 ms for a 1024² uint8 chunk of 6 values.  A value that is
    neither (a model that outputs more classes than its card lists) sends it to the ``bincount``.
    """
    if num_classes <= FEW_CLASSES:
        nodata = label_nodata(num_classes)
        counts = {v: int(np.count_nonzero(labels == v)) for v in [*range(num_classes), nodata]}
        if sum(counts.values()) == labels.size:
            return {v: n for v, n in counts.items() if n}
    hist = np.bincount(labels.ravel(), minlength=num_classes + 1 if num_classes < 255 else 0)
    return {int(v): int(n) for v, n in enumerate(hist) if n}


PROBABILITY_SCALE = 254  # uint8 probabilities: round(p * 254); 255 marks no data


def quantize_probabilities(probs: np.ndarray, dtype: str, mask: np.ndarray | None = None) -> np.ndarray:
    """float32, 0 where the input has no data, or uint8 round(p·254) with 255 there (a quarter of the size).

    The stitched plan's probabilities are already 0 there; a model-space way back's are not (a nodata pixel
    beside valid ones gets their warped values), and a reader must not take those for a prediction."""
    if dtype == "float32":
        out = probs.astype(np.float32, copy=False)
        if mask is not None and not np.all(mask):
            out = out.copy() if out is probs else out
            out[:, ~np.asarray(mask, dtype=bool)] = 0.0
        return out
    out = np.clip(np.rint(probs * PROBABILITY_SCALE), 0, PROBABILITY_SCALE).astype(np.uint8)
    if mask is not None:
        out[:, ~np.asarray(mask, dtype=bool)] = 255
    return out


def chunk_boxes(chunks: Sequence[Sequence[int]]) -> dict[tuple[int, ...], Box]:
    """Every chunk of a (spatial) dask chunk grid and its box, in row-major order."""
    bounds = [tuple(itertools.accumulate(c, initial=0)) for c in chunks]
    return {idx: tuple((b[i], b[i + 1]) for b, i in zip(bounds, idx))
            for idx in itertools.product(*(range(len(c)) for c in chunks))}


def chunk_writes(blocks: dict[tuple[int, ...], Any], boxes: dict[tuple[int, ...], Box], mask_blocks: Any,
                 num_classes: int, labels_target: Any, probabilities_target: Any = None,
                 probabilities_dtype: str = "float32", *, name: str,
                 only: Sequence[tuple[int, ...]] | None = None,
                 on_written: Callable[[tuple[int, ...], dict], None] | None = None,
                 unreached: bool = False) -> list[Delayed]:
    """One delayed write per chunk of probability ``blocks`` (delayed (classes, *box) arrays), in order.
    ``unreached``: pixels whose probabilities are all 0 get nodata (:func:`labels_of`).

    Without a probabilities target a block may be the labels themselves
    (*box), when something cheaper than the probabilities gave them.

    Shared by the stitched plan and by anything that brings probabilities onto
    another chunk grid (model space back to the input's grid): the labels,
    nodata, histogram and completion record are made the same way for both.
    """
    wanted = None if only is None else {tuple(i) for i in only}
    if wanted is not None and not wanted <= blocks.keys():
        raise ValueError(f"chunk indexes {sorted(wanted - blocks.keys())} are not in the plan's chunk grid")
    out = []
    for idx, probs in blocks.items():
        if wanted is not None and idx not in wanted:
            continue
        mask = None if mask_blocks is None else mask_blocks[idx]
        with draining():
            out.append(delayed(_write, name=name + "-".join(map(str, idx)), pure=False)(
                probs, mask, boxes[idx], num_classes, labels_target, probabilities_target,
                probabilities_dtype, idx, on_written, unreached))
    return out


def group_writes(labels: Any, boxes: dict[tuple[int, ...], Box], mask_blocks: Any, num_classes: int,
                 labels_target: Any, *, name: str, only: Sequence[tuple[int, ...]] | None = None,
                 on_written: Callable[[tuple[int, ...], dict], None] | None = None) -> list[Delayed]:
    """:func:`chunk_writes` of labels (a dask array) whose blocks each span several chunks of ``boxes`` (a
    grouped way back): one task per block that holds a wanted chunk, storing the block's wanted chunks (in one
    store call when it wants them all) and recording each, with one result per chunk."""
    wanted = set(boxes) if only is None else {tuple(i) for i in only}
    if not wanted <= boxes.keys():
        raise ValueError(f"chunk indexes {sorted(wanted - boxes.keys())} are not in the plan's chunk grid")
    blocks = labels.to_delayed()
    # per axis, each block's span and the chunk indexes along that axis it holds whole (boxes is a full grid)
    spans = [list(itertools.pairwise(itertools.accumulate(c, initial=0))) for c in labels.chunks]
    along = [sorted({idx[a]: box[a] for idx, box in boxes.items()}.items()) for a in range(len(spans))]
    holds = [[[i for i, (b0, b1) in ax if lo <= b0 and b1 <= hi] for lo, hi in sp] for sp, ax in zip(spans, along)]
    out = []
    covered: set[tuple[int, ...]] = set()
    for bidx in itertools.product(*(range(len(c)) for c in labels.chunks)):
        lo, hi = zip(*(sp[i] for sp, i in zip(spans, bidx)))
        inside = list(itertools.product(*(h[i] for h, i in zip(holds, bidx))))
        covered.update(inside)
        todo = [idx for idx in inside if idx in wanted]
        if not todo:
            continue
        masks = None if mask_blocks is None else [mask_blocks[idx] for idx in todo]
        with draining():
            out.append(delayed(_write_group, name=name + "-".join(map(str, bidx)), pure=False)(
                blocks[bidx], masks, tuple(zip(lo, hi)), [(idx, boxes[idx]) for idx in todo], len(todo) == len(inside),
                num_classes, labels_target, on_written))
    if covered != boxes.keys():  # a chunk cut by a block border would never be written: a hole, not a result
        raise ValueError(f"label blocks {labels.chunks} do not hold whole chunks: {sorted(boxes.keys() - covered)}")
    return out


def _write_group(labels: np.ndarray, masks: list[np.ndarray] | None, block: Box,
                 chunks: list[tuple[tuple[int, ...], Box]], whole: bool, num_classes: int, labels_target: Any,
                 on_written: Callable[[tuple[int, ...], dict], None] | None) -> list[dict[str, Any]]:
    """Write the ``chunks`` of one block of labels (``whole``: every chunk of the block, stored in one call);
    return one :func:`_write` result per chunk, each recorded only after the block's data is stored."""
    labels = labels.astype(label_dtype(num_classes), copy=masks is not None)
    parts = []
    for k, (idx, box) in enumerate(chunks):
        sl = tuple(slice(lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(box, block))
        if masks is not None:
            mark_nodata(labels[sl], masks[k], num_classes)
        parts.append((idx, box, sl))
    if whole:
        _store(labels_target, tuple(slice(lo, hi) for lo, hi in block), labels)
    else:
        for _, box, sl in parts:
            _store(labels_target, tuple(slice(lo, hi) for lo, hi in box), labels[sl])
    return [_recorded(idx, box, labels[sl], num_classes, on_written) for idx, box, sl in parts]


__all__ = ["DRAIN_PRIORITY", "PROBABILITY_SCALE", "argmax0", "chunk_boxes", "chunk_writes", "draining", "group_writes",
           "label_dtype", "label_histogram", "label_nodata", "labels_of", "mark_nodata", "quantize_probabilities"]
