"""Where training patches come from: the samples, their class index, and the batches drawn from them.

A training sample is an image and its label map as array-likes, read only patch by patch.  Before training,
each label map is scanned once, slab by slab, for a bounded random set of each class's pixel coordinates
(:func:`_class_index`), so a share of the patches can be centred on a foreground class however rare it is
(``oversample``), at a memory cost set by the cap, not by the map's size.  A patch is normalised by the very
normaliser inference uses, its invalid and non-finite pixels set to 0, its ignored labels (and any padding past
the image's edge) made ``IGNORE``, then flipped, turned and changed as :mod:`segmentation.augment` says.
Split from :mod:`segmentation.training`, which runs the optimisation on these batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from segmentation.augment import Augmentation, affine, dihedral
from segmentation.augment import intensity as augment_intensity
from segmentation.card import ModelCard
from segmentation.losses import IGNORE
from segmentation.metrics import label_range_problem
from segmentation.normalize import Normalizer, resolve, statistics_for, zero_invalid, zero_non_finite
from storage.errors import IncompatibleInputError, InvalidInputError

# Coordinates kept per class for foreground-centred sampling: plenty for
# variety, bounded so indexing a huge label map costs bounded memory.
_INDEX_CAP = 20_000
_BLOCK_ELEMENTS = 1 << 22  # labels are scanned in slabs of about this many pixels


@dataclass
class TrainingSample:
    """One training image and its label map, as array-likes sliced patch by patch.

    ``image`` is (C, *spatial) and ``labels`` (*spatial), numpy or zarr (or
    anything sliceable with a ``shape``). Label pixels equal to
    ``ignore_index`` (e.g. 255 where the image has no data) add no loss.
    ``stats`` = (mean, std) per channel for ``image_zscore`` cards; if None
    they are computed over the whole image, as inference does for an image
    without a mask.  ``valid`` (*spatial, bool; None: all valid) is the
    image's mask: its invalid pixels are 0 after normalisation, as the
    sliding window shows them to the network.
    """

    image: Any
    labels: Any
    stats: tuple[list[float], list[float]] | None = None
    ignore_index: int | None = 255
    name: str | None = None  # what an error about its labels names (the label file)
    valid: Any = None


@dataclass
class _Prepared:
    sample: TrainingSample
    normalizer: Normalizer
    spatial: tuple[int, ...]
    # class value -> (n, ndim) int array of pixel coordinates (a bounded random subset)
    where: dict[int, np.ndarray]


def _class_index(labels: Any, num_classes: int, ignore: int | None,
                 rng: np.random.Generator, name: str | None = None) -> dict[int, np.ndarray]:
    """Random coordinates of each class, found by scanning the labels in slabs.

    Scanning slab by slab keeps memory bounded for zarr-backed label maps;
    each slab contributes in proportion to its pixel count, so the kept
    coordinates are a near-uniform sample of the class.
    """
    shape = tuple(labels.shape)
    row = int(np.prod(shape[1:], dtype=np.int64)) or 1
    step = max(1, _BLOCK_ELEMENTS // row)
    chunks = getattr(labels, "chunks", None)
    if chunks is not None and isinstance(chunks[0], int):
        step = max(chunks[0], (step // chunks[0]) * chunks[0])
    parts: dict[int, list[np.ndarray]] = {}
    weights: dict[int, list[np.ndarray]] = {}
    for start in range(0, shape[0], step):
        block = np.asarray(labels[start:start + step])
        flat = block.ravel()
        counted = flat if ignore is None else flat[flat != ignore]
        if problem := label_range_problem(counted, num_classes, ignore):
            raise InvalidInputError(name, problem)
        for c in np.unique(counted):
            idx = np.flatnonzero(flat == c)
            keep = idx if idx.size <= _INDEX_CAP else rng.choice(idx, _INDEX_CAP, replace=False)
            coords = np.stack(np.unravel_index(keep, block.shape), 1)
            coords[:, 0] += start
            parts.setdefault(int(c), []).append(coords)
            weights.setdefault(int(c), []).append(np.full(len(keep), idx.size / len(keep)))
    where: dict[int, np.ndarray] = {}
    for c, blocks in parts.items():
        coords, w = np.concatenate(blocks), np.concatenate(weights[c])
        if len(coords) > _INDEX_CAP:
            coords = coords[rng.choice(len(coords), _INDEX_CAP, replace=False, p=w / w.sum())]
        where[c] = coords
    return where


def check_shapes(card: ModelCard, sample: TrainingSample) -> None:
    image_shape, label_shape = tuple(sample.image.shape), tuple(sample.labels.shape)
    dims = card.input.spatial_dims
    if len(image_shape) != dims + 1 or image_shape[0] != card.input.channels:
        raise IncompatibleInputError(None, f"image shape {image_shape} is not "
                                           f"({card.input.channels} channels, {dims} spatial axes)")
    if label_shape != image_shape[1:]:
        raise IncompatibleInputError(None, f"labels shape {label_shape} differs from the image's "
                                           f"spatial shape {image_shape[1:]}")


def prepare(card: ModelCard, sample: TrainingSample, rng: np.random.Generator) -> _Prepared:
    check_shapes(card, sample)
    label_shape = tuple(sample.labels.shape)
    stats = sample.stats
    if stats is None:
        stats = statistics_for(card.input.normalization, sample.image)
    normalizer = resolve(card.input.normalization, card.input.channels, stats)
    where = _class_index(sample.labels, card.num_classes, sample.ignore_index, rng, sample.name)
    return _Prepared(sample, normalizer, label_shape, where)


def _read_patch(prep: _Prepared, origin: Sequence[int], patch: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Slice one patch: normalised image, int64 labels with ignored pixels (and padding) as -1."""
    stop = [min(o + p, s) for o, p, s in zip(origin, patch, prep.spatial)]
    region = tuple(slice(o, e) for o, e in zip(origin, stop))
    image = zero_non_finite(prep.normalizer(np.asarray(prep.sample.image[(slice(None),) + region])))
    zero_invalid(image, prep.sample.valid, region)
    raw = np.asarray(prep.sample.labels[region])
    labels = raw.astype(np.int64)
    if prep.sample.ignore_index is not None:
        labels[raw == prep.sample.ignore_index] = IGNORE
    short = [(0, p - (e - o)) for o, e, p in zip(origin, stop, patch)]
    if any(after for _, after in short):
        image = np.pad(image, [(0, 0)] + short)
        labels = np.pad(labels, short, constant_values=IGNORE)
    return image, labels


def sample_batch(preps: Sequence[_Prepared], patch: Sequence[int], batch_size: int, oversample: float,
                  rng: np.random.Generator, augment: Augmentation = Augmentation()) -> tuple[np.ndarray, np.ndarray]:
    """Random patches, a fraction centred on a pixel of a random foreground class, randomly flipped, and with
    the shares ``augment`` names turned and scaled, or changed in contrast, brightness and noise
    (:mod:`segmentation.augment`)."""
    images, labels = [], []
    for _ in range(batch_size):
        prep = preps[rng.integers(len(preps))]
        fg = [c for c in prep.where if c != 0]
        high = [max(s - p, 0) for s, p in zip(prep.spatial, patch)]
        if fg and rng.random() < oversample:
            coords = prep.where[fg[rng.integers(len(fg))]]
            centre = coords[rng.integers(len(coords))]
            # jitter so the class is not always exactly at the patch centre
            origin = [int(np.clip(c - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, h))
                      for c, p, h in zip(centre, patch, high)]
        else:
            origin = [int(rng.integers(0, h + 1)) for h in high]
        img, lab = dihedral(*_read_patch(prep, origin, patch), rng)
        img, lab = affine(img, lab, rng, augment.spatial, IGNORE)
        img = augment_intensity(img, rng, augment.intensity)
        images.append(np.ascontiguousarray(img))
        labels.append(np.ascontiguousarray(lab))
    return np.stack(images), np.stack(labels)


__all__ = ["TrainingSample", "check_shapes", "prepare", "sample_batch"]
