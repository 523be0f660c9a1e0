"""``segflow train`` wiring: files -> zarr stores -> ``segmentation.training`` -> model directory."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from segmentation.card import ModelCard
from segmentation.modeldir import LoadedModel
from segmentation.normalize import image_statistics
from segmentation.training import TrainingSample, save_trained, train
from storage.errors import IncompatibleInputError, InvalidInputError
from storage.ingest import ingest, stem_of
from storage.layout import ImageStore, open_image_store

IGNORE = 255
IN_MEMORY_BYTES = 256 << 20  # training inputs up to this size are read into memory; larger ones stay out of core


class MaskedLabels:
    """Channel 0 of a label store, with IGNORE wherever the *image* has no data; read patch by patch."""

    def __init__(self, labels: ImageStore, image_mask: Any) -> None:
        self.array = labels.image
        self.mask = image_mask
        self.shape = tuple(self.array.shape[1:])
        self.dtype = self.array.dtype
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        out = np.asarray(self.array[(0,) + key])
        if self.mask is not None:
            out = np.where(np.asarray(self.mask[key]), out, IGNORE).astype(out.dtype)
        return out


def _sample(card: ModelCard, image: ImageStore, labels: ImageStore) -> TrainingSample:
    src = labels.meta.source.path
    if image.spatial_shape != labels.spatial_shape:
        raise IncompatibleInputError(src, f"label grid {labels.spatial_shape} differs from the image's "
                                          f"{image.spatial_shape}")
    if labels.image.shape[0] != 1 or not np.issubdtype(labels.image.dtype, np.integer):
        raise InvalidInputError(src, "a label map must have one integer band")
    if image.image.shape[0] != card.input.channels:
        raise IncompatibleInputError(image.meta.source.path, f"has {image.image.shape[0]} channels, the card "
                                                             f"expects {card.input.channels}")
    stats = image_statistics(image.image, image.mask) if card.input.normalization.mode == "image_zscore" else None
    pixels: Any = image.image
    targets: Any = MaskedLabels(labels, image.mask)
    if pixels.nbytes <= IN_MEMORY_BYTES:
        # random patches from a small store would decompress a whole chunk per patch: read it once instead
        pixels, targets = np.asarray(pixels[...]), targets[...]
    return TrainingSample(image=pixels, labels=targets, stats=stats, ignore_index=IGNORE)


def train_from_files(card: ModelCard, pairs: Sequence[tuple[Path, Path]], out: Path, *, steps: int,
                     batch_size: int, lr: float = 2e-3, seed: int = 0, precision: str = "fast",
                     patch: Sequence[int] | None = None,
                     on_step: Callable[[dict], None] | None = None) -> LoadedModel:
    """Ingest each (image, labels) pair out-of-core, train, and write a model directory at ``out``."""
    work = Path(tempfile.mkdtemp(prefix="segflow-train-"))
    try:
        samples, sources = [], []
        for n, (image_path, labels_path) in enumerate(pairs):
            image = _open(image_path, work / f"{n}-{stem_of(image_path)}.image.zarr")
            labels = _open(labels_path, work / f"{n}-{stem_of(labels_path)}.labels.zarr")
            samples.append(_sample(card, image, labels))
            sources.append({"image": image.meta.source.model_dump(), "labels": labels.meta.source.model_dump()})
        result = train(card, samples, steps=steps, batch_size=batch_size, patch=patch, lr=lr, seed=seed,
                       precision=precision, log=on_step)  # type: ignore[arg-type]
        result.provenance["inputs"] = sources
        return save_trained(out, card, result)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _open(path: Path, store: Path) -> ImageStore:
    ingest(path, store)
    return open_image_store(store)
