"""A chunk's labels in two steps, so that a chunk waiting for the owners after it holds only its border band.

A chunk's Σ w·p comes from its own owner's windows and, near its far edges,
from the owners after it (below, right: windows are owned by their end
corner).  The pixels no later owner's piece reaches are *settled* as soon as
the chunk's own owner has run: their sums are complete, so their labels can be
taken then, and only the own piece's *band* (the rest of the chunk) need wait
for the later pieces.  Where dask's ordering runs an owner long before the
owners after it (past ten chunks an axis: ``docs/performance.md``, "Why it
grew"), the waiting chunk then holds its band's sums and its settled labels
instead of its owner's whole region of sums: with 1024² chunks and a 256²
ROI, at most 44 % of the chunk's sums, against the whole region's.

The labels are those of the one-step path pixel for pixel: the settled box
takes the labels of the own piece alone, which is the whole sum there (0 + x
is x), and the band adds its pieces in the same owner order as
``segmentation.stitching._sums``.  Every step after the sums is per pixel:
`fast` takes the argmax of the undivided sums, `exact` divides by Σ w first
(:func:`divided`, with Σ w of the same windows in the same order over any
part of the chunk).  Labels only, on the host: probabilities are as large as
the sums they come from, so two steps would save nothing there.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from segmentation.chunkwrites import label_dtype, labels_of
from segmentation.ownership import weight_sum
from segmentation.regions import Box
from segmentation.windows import WindowGrid

# The settled box must be at least this share of its chunk for the two steps to pay (3-D chunks of 128³ with
# a 96³ ROI settle 1.7 %: there the band is the whole piece)
MIN_SETTLED = 0.5


def settled_box(index: tuple[int, ...], box: Box, later: Sequence[tuple[tuple[int, ...], Box]]) -> Box | None:
    """The part of chunk ``index`` (covering ``box``) that no later owner's piece reaches, from the chunk's start
    corner, or None where there are no later pieces or it is under :data:`MIN_SETTLED` of the chunk.

    ``later``: (owner, piece box) of each later owner.  A later owner comes after the chunk along at least one
    axis; cutting every such axis where its piece starts leaves the piece outside the box."""
    if not later:
        return None
    cuts = []
    for a, (lo, hi) in enumerate(box):
        tails = [p[a][0] for owner, p in later if owner[a] > index[a]]
        cuts.append(max(lo, min(tails, default=hi)))
    size = np.prod([hi - lo for lo, hi in box])
    settled = tuple((lo, cut) for (lo, _), cut in zip(box, cuts))
    if np.prod([cut - lo for lo, cut in settled]) < MIN_SETTLED * size:
        return None
    return settled


def band(box: Box, settled: Box) -> list[Box]:
    """The rest of ``box`` past ``settled``, as disjoint slabs: along each axis its tail, with the axes before it
    cut to the settled box and the axes after it whole."""
    slabs = []
    for a, ((lo, hi), (_, cut)) in enumerate(zip(box, settled)):
        if cut < hi:
            slabs.append(tuple(settled[b] if b < a else (cut, hi) if b == a else box[b] for b in range(len(box))))
    return slabs


def _overlap(a: Box, b: Box) -> Box | None:
    """Where two boxes meet, or None."""
    inter = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b))
    return inter if all(lo < hi for lo, hi in inter) else None


def _part(array: Any, outer: Box, inner: Box, lead: int) -> Any:
    """The part ``inner`` of an array covering ``outer`` (its first ``lead`` axes whole)."""
    return array[(slice(None),) * lead + tuple(slice(i0 - o0, i1 - o0) for (i0, i1), (o0, _) in zip(inner, outer))]


def divided(acc: np.ndarray, weights: np.ndarray, mask: np.ndarray | None, logits: bool) -> np.ndarray:
    """Probabilities from Σ w·p, in place: / Σ w (``weights``), then a softmax where logits were blended, and 0
    where the input has no data (``mask`` False)."""
    acc /= weights
    if logits:
        acc -= acc.max(axis=0, keepdims=True)
        np.exp(acc, out=acc)
        acc /= acc.sum(axis=0, keepdims=True)
    if mask is not None:
        acc[:, ~np.asarray(mask, dtype=bool)] = 0.0
    return acc


def _labels(sums: np.ndarray, part: Box, mask: np.ndarray | None, num_classes: int, grid: WindowGrid | None,
            weights: np.ndarray | None, logits: bool) -> np.ndarray:
    """The labels of a part of a chunk from its complete sums (overwritten where divided): the argmax of the
    sums themselves without ``grid`` (`fast`), else of the probabilities."""
    if grid is not None:
        sums = divided(sums, weight_sum(part, grid, weights), mask, logits)
    return labels_of(sums, mask, num_classes)


def settle(output: dict, key: tuple[int, ...], own: Box, box: Box, settled: Box, mask: np.ndarray | None,
           num_classes: int, grid: WindowGrid | None = None, weights: np.ndarray | None = None,
           logits: bool = False) -> tuple[np.ndarray, list[tuple[Box, np.ndarray]]]:
    """First step, as soon as the chunk's own owner ran: (the settled box's labels, the own piece's band as
    copies).  ``output``: the owner's whole evaluate output (its piece for this chunk under ``key``, covering
    ``own``); ``mask``: the chunk's (True = valid) or None; ``grid`` and ``weights``: divide by Σ w (`exact`)."""
    piece = output[key]
    part = None if mask is None else _part(np.asarray(mask), box, settled, 0)
    sums = _part(piece, own, settled, 1)
    labels = _labels(sums if grid is None else np.array(sums), settled, part, num_classes, grid, weights, logits)
    kept = []
    for slab in band(box, settled):
        inter = _overlap(slab, own)
        if inter is not None:
            kept.append((inter, np.array(_part(piece, own, inter, 1))))
    return labels, kept


def settled_labels(box: Box, settled: Box, first: tuple[np.ndarray, list[tuple[Box, np.ndarray]]],
                   later: list[tuple[Box, np.ndarray]], mask: np.ndarray | None, num_classes: int,
                   grid: WindowGrid | None = None, weights: np.ndarray | None = None,
                   logits: bool = False) -> np.ndarray:
    """Second step, once the later owners ran: the chunk's labels, the settled box's from :func:`settle` and the
    band's from its own sums plus the later pieces (in that order, as the one-step path adds them)."""
    labels_settled, own_band = first
    labels = np.empty(tuple(hi - lo for lo, hi in box), dtype=label_dtype(num_classes))
    _part(labels, box, settled, 0)[...] = labels_settled
    for slab in band(box, settled):
        acc = np.zeros((num_classes,) + tuple(hi - lo for lo, hi in slab), dtype=np.float32)
        for pbox, piece in [*own_band, *later]:
            inter = _overlap(slab, pbox)
            if inter is not None:
                _part(acc, slab, inter, 1)[...] += _part(piece, pbox, inter, 1)
        part = None if mask is None else _part(np.asarray(mask), box, slab, 0)
        _part(labels, box, slab, 0)[...] = _labels(acc, slab, part, num_classes, grid, weights, logits)
    return labels


__all__ = ["MIN_SETTLED", "band", "divided", "settle", "settled_box", "settled_labels"]
